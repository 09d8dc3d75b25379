//! Learning from outcomes: the tuner adjusts the Smart weights per signal type from the ACK
//! rate of completed dispatches.
//!
//! [`AckBasedTuner`]: after each completed dispatch with at least `min_orders` orders, the
//! ACK rate is `accepted / orders`. Below `low_ack_rate` the availability weight of that
//! signal type rises by `step_up` (unreliable vehicles should count for less), above
//! `high_ack_rate` it falls by `step_down` (the fleet answers; other features may lead),
//! always within `min_weight..=max_weight`. Every change is a [`WeightsChange`], recorded
//! as a `WeightsTuned` event; replaying those events restores the weights after a restart.

use crate::allocation::Weights;
use crate::model::{DispatchOutcome, SignalType};

/// A change of one signal type's weights (the `WeightsTuned` event's content, in the log's
/// vocabulary).
pub use crate::events::payload::WeightsChange;

/// Something that learns weights from completed dispatches.
pub trait LearningTuner: Send {
    /// Takes a completed dispatch; returns the change to record and apply, if any.
    fn observe(&mut self, outcome: &DispatchOutcome) -> Option<WeightsChange>;
    /// The current weights of a signal type.
    fn weights(&self, kind: SignalType) -> Weights;
    /// Sets weights recorded earlier (replaying `WeightsTuned` at start-up).
    fn restore(&mut self, kind: SignalType, weights: Weights);
}

/// Settings of [`AckBasedTuner`] (the config's `tuner` section) and their error.
pub use crate::config::tuner::{TunerConfig, TunerError};

/// Tunes the availability weight per signal type from ACK rates.
#[derive(Clone, Debug)]
pub struct AckBasedTuner {
    cfg: TunerConfig,
    weights: [Weights; 5],
}

impl AckBasedTuner {
    /// A tuner with the default settings over `weights` (by signal type code).
    pub fn new(weights: [Weights; 5]) -> Self {
        Self { cfg: TunerConfig::default(), weights }
    }

    /// A tuner with `cfg`, which must be valid.
    pub fn with_config(weights: [Weights; 5], cfg: TunerConfig) -> Result<Self, TunerError> {
        cfg.validate()?;
        Ok(Self { cfg, weights })
    }
}

impl LearningTuner for AckBasedTuner {
    fn observe(&mut self, o: &DispatchOutcome) -> Option<WeightsChange> {
        let orders = o.vehicles.accepted + o.vehicles.rejected + o.vehicles.timed_out;
        if orders < self.cfg.min_orders.max(1) {
            return None;
        }
        let rate = f64::from(o.vehicles.accepted) / f64::from(orders);
        let before = self.weights[usize::from(o.kind.code())];
        let c = &self.cfg;
        let (target, reason) = if rate < c.low_ack_rate {
            (
                before.availability + c.step_up,
                format!("ACK rate {rate:.3} below {}: availability counts more", c.low_ack_rate),
            )
        } else if rate > c.high_ack_rate {
            (
                before.availability - c.step_down,
                format!("ACK rate {rate:.3} above {}: availability counts less", c.high_ack_rate),
            )
        } else {
            return None;
        };
        let availability = target.clamp(c.min_weight, c.max_weight);
        if (availability - before.availability).abs() < 1e-12 {
            return None;
        }
        let after = Weights { availability, ..before };
        self.weights[usize::from(o.kind.code())] = after;
        Some(WeightsChange {
            signal_type: o.kind,
            dispatch_id: o.dispatch_id.clone(),
            ack_rate: rate,
            before,
            after,
            reason,
        })
    }

    fn weights(&self, kind: SignalType) -> Weights {
        self.weights[usize::from(kind.code())]
    }

    fn restore(&mut self, kind: SignalType, weights: Weights) {
        self.weights[usize::from(kind.code())] = weights;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::EventKind;
    use crate::model::{Direction, FallbackKind, StrategyKind, VehicleCounts};
    use crate::time::Timestamp;

    fn outcome(kind: SignalType, accepted: u32, rejected: u32, timed_out: u32) -> DispatchOutcome {
        DispatchOutcome {
            dispatch_id: "d1".into(),
            signal_id: "s1".into(),
            kind,
            direction: Direction::Up,
            requested_kw: 10.0,
            allocated_kw: 10.0,
            acknowledged_kw: 5.0,
            shortfall_kw: 5.0,
            strategy: StrategyKind::Smart,
            fallback: FallbackKind::Balanced,
            vehicles: VehicleCounts { accepted, rejected, timed_out },
            completed_at: Timestamp::from_millis(0),
            interrupted: None,
        }
    }

    fn tuner() -> AckBasedTuner {
        AckBasedTuner::new(SignalType::ALL.map(Weights::default_for))
    }

    #[test]
    fn low_ack_rates_raise_the_availability_weight_of_that_type_only() {
        let mut t = tuner();
        let before = t.weights(SignalType::Mfrr).availability;
        let change = t.observe(&outcome(SignalType::Mfrr, 5, 2, 3)).expect("a change");
        assert_eq!(change.signal_type, SignalType::Mfrr);
        assert!((change.after.availability - (before + 0.05)).abs() < 1e-12);
        assert_eq!(t.weights(SignalType::Mfrr), change.after);
        assert_eq!(t.weights(SignalType::Afrr), Weights::default_for(SignalType::Afrr));
        let e = change.event(Timestamp::from_millis(9), "north");
        assert_eq!(e.kind, EventKind::WeightsTuned);
        assert_eq!(e.payload_value()["after"]["availability"], change.after.availability);
    }

    #[test]
    fn high_ack_rates_lower_it_within_bounds_and_middling_ones_change_nothing() {
        let mut t = AckBasedTuner::with_config(
            SignalType::ALL.map(Weights::default_for),
            TunerConfig { step_down: 0.5, min_weight: 0.4, ..TunerConfig::default() },
        )
        .unwrap();
        let c = t.observe(&outcome(SignalType::Fcr, 10, 0, 0)).unwrap();
        assert_eq!(c.after.availability, 0.5);
        assert_eq!(t.observe(&outcome(SignalType::Fcr, 10, 0, 0)).unwrap().after.availability, 0.4);
        assert!(t.observe(&outcome(SignalType::Fcr, 10, 0, 0)).is_none(), "at the bound: no change");
        assert!(t.observe(&outcome(SignalType::Fcr, 9, 1, 0)).is_none(), "0.9 is between the thresholds");
        assert!(t.observe(&outcome(SignalType::Fcr, 1, 0, 1)).is_none(), "too few orders to learn from");
    }

    #[test]
    fn the_maximum_caps_the_rise() {
        let mut t = tuner();
        for _ in 0..50 {
            t.observe(&outcome(SignalType::Dr, 0, 0, 5));
        }
        assert_eq!(t.weights(SignalType::Dr).availability, 1.0);
    }

    #[test]
    fn invalid_settings_are_errors_naming_the_setting() {
        let w = SignalType::ALL.map(Weights::default_for);
        let err = |cfg| AckBasedTuner::with_config(w, cfg).unwrap_err().to_string();
        assert!(err(TunerConfig { low_ack_rate: 0.9, high_ack_rate: 0.8, ..TunerConfig::default() })
            .starts_with("low_ack_rate"));
        assert!(err(TunerConfig { high_ack_rate: 1.5, ..TunerConfig::default() }).starts_with("high_ack_rate"));
        assert!(err(TunerConfig { step_up: 0.0, ..TunerConfig::default() }).starts_with("step_up"));
        assert!(err(TunerConfig { step_down: -0.1, ..TunerConfig::default() }).starts_with("step_down"));
        assert!(
            err(TunerConfig { min_weight: 0.9, max_weight: 0.5, ..TunerConfig::default() }).starts_with("min_weight")
        );
    }

    #[test]
    fn replayed_changes_restore_the_weights() {
        let mut live = tuner();
        let changes: Vec<WeightsChange> =
            (0..4).filter_map(|_| live.observe(&outcome(SignalType::Afrr, 1, 0, 4))).collect();
        let mut restarted = tuner();
        for c in &changes {
            let replayed: WeightsChange =
                serde_json::from_str(&c.event(Timestamp::from_millis(0), "x").payload).unwrap();
            restarted.restore(replayed.signal_type, replayed.after);
        }
        assert_eq!(restarted.weights(SignalType::Afrr), live.weights(SignalType::Afrr));
    }
}
