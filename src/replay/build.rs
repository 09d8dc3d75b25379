//! Building the dispatch core from a validated configuration and the projected log: what
//! the gateway does at start-up, and what `gridweaver audit` does before re-running a
//! recorded decision.

use crate::allocation::filter::SimpleVehicleFilter;
use crate::allocation::policy::Strategies;
use crate::allocation::segments::SegmentedSmartDispatcher;
use crate::allocation::SmartDispatcher;
use crate::config::Config;
use crate::events::ProjectedState;
use crate::learning::prediction::PredictionEngine;
use crate::learning::tuning::{AckBasedTuner, LearningTuner, TunerError};
use crate::model::{StrategyKind, VehicleId};

use crate::dispatch::{Engine, EngineConfig, Planner};

/// The engine settings of `cfg`.
pub fn engine_config(cfg: &Config) -> EngineConfig {
    let d = &cfg.dispatch;
    EngineConfig {
        region: cfg.site.clone(),
        ack_timeout_ms: d.ack_timeout_ms,
        fallback: d.fallback,
        limits: d.limits.clone(),
        no_fallback_segments: d.segments.iter().filter(|(_, s)| !s.fallback).map(|(n, _)| n.clone()).collect(),
        max_in_flight: d.max_in_flight,
        max_start_ahead_ms: i64::try_from(d.max_start_ahead_s.saturating_mul(1000)).unwrap_or(i64::MAX),
        max_duration_s: d.max_duration_s,
        ..EngineConfig::default()
    }
}

/// The planner for `cfg`, remembering what the log says (`recovery`): signals seen, the
/// leader term, numbering, fairness, tuned weights, answers for the prediction, the fleet.
pub fn planner(cfg: &Config, recovery: &ProjectedState) -> Planner {
    planner_with(cfg, recovery, prediction(cfg, recovery))
}

/// The prediction of `cfg` (none when it is off), fed the answers the log holds.
pub fn prediction(cfg: &Config, recovery: &ProjectedState) -> Option<PredictionEngine> {
    let mut p = PredictionEngine::new(cfg.prediction.clone()?);
    p.observe_answers(&recovery.answers);
    Some(p)
}

/// [`planner`] with a prediction already fed (the auditor keeps one as the gateway did).
pub fn planner_with(cfg: &Config, recovery: &ProjectedState, prediction: Option<PredictionEngine>) -> Planner {
    let d = &cfg.dispatch;
    let engine = engine_config(cfg);
    let smart = SmartDispatcher {
        weights: d.weights,
        max_rounds: d.max_rounds,
        fairness: d.fairness,
        ..SmartDispatcher::default()
    };
    let mut strategies = Strategies::new(d.strategy, smart.clone(), d.lp.clone());
    strategies.lp_first = d.lp_first;
    if d.strategy == StrategyKind::Segmented {
        let segmented = SegmentedSmartDispatcher::new(d.segments.clone(), smart).with_lp_settings(d.lp.clone());
        strategies.segmented = Some(Box::new(segmented));
    }
    let mut planner = Planner::new(engine, Box::new(SimpleVehicleFilter), Box::new(strategies));
    for id in &recovery.signal_ids {
        planner.remember_signal(id);
    }
    if let Some(term) = recovery.highest_term {
        planner.remember_term(term);
    }
    planner.remember_dispatches(recovery.dispatches);
    let participation: Vec<Vec<VehicleId>> = recovery.participation.iter().cloned().collect();
    planner.remember_participation(&participation);
    for (kind, weights) in &recovery.weights {
        planner.set_weights(*kind, *weights);
    }
    if let Some(p) = prediction {
        planner.set_prediction(p);
    }
    for v in recovery.fleet.values() {
        planner.restore_vehicle(v.clone(), recovery.fleet_at.get(&v.id).copied());
    }
    planner
}

/// The tuner of `cfg` (none when tuning is off), with the weights the log says it tuned.
pub fn tuner(cfg: &Config, recovery: &ProjectedState) -> Option<Result<AckBasedTuner, TunerError>> {
    let tc = cfg.tuner.clone()?;
    Some(AckBasedTuner::with_config(cfg.dispatch.weights, tc).map(|mut t| {
        for (kind, weights) in &recovery.weights {
            t.restore(*kind, *weights);
        }
        t
    }))
}

/// The engine of `cfg` as `recovery` leaves it: planner and tuner (nothing in flight or
/// committed yet: see [`Engine::recover`]).
pub fn engine(cfg: &Config, recovery: &ProjectedState) -> Result<Engine, TunerError> {
    let tuner = tuner(cfg, recovery).transpose()?.map(|t| Box::new(t) as Box<dyn LearningTuner>);
    Ok(Engine::new(planner(cfg, recovery)).with_tuner(tuner))
}
