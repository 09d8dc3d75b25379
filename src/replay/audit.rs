//! Re-computing recorded decisions with today's code.
//!
//! [`Auditor`] folds the log like the projection does and, at every decision, runs the code
//! again on the inputs the log held just before it, under the configuration recorded at
//! the time:
//! - **plan**: at each `SignalReceived` a planner is built from the projected state (fleet,
//!   commitments in force, fairness, weights, answers for the prediction, numbering); it
//!   plans the signal, and its `DispatchPlanCreated` and first `OrderSent` are compared
//!   with the recorded ones;
//! - **fallback**: at each `FallbackApplied` the request is rebuilt (each candidate's free
//!   capacity from the projected fleet and commitments, the free room of the limits) and
//!   the fallback run again; the power per candidate and the orders of that attempt are
//!   compared;
//! - **tuning**: a tuner, restored like the gateway's at every start, observes each outcome;
//!   the changes it makes are compared with the recorded `WeightsTuned`.
//!
//! Powers must agree to 1e-6 relative ([`agree`]). An LP that the solver's time limit cut
//! short (status `MaxTime`) is reported as such rather than as a difference.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use serde::Serialize;

use crate::allocation::lp::LpDispatcher;
use crate::allocation::MIN_ORDER_KW;
use crate::config::Config;
use crate::dispatch::fallback::by_kind;
use crate::dispatch::ledger::{Commitment, Ledger};
use crate::dispatch::{fallback_room, Engine, FallbackRequest};
use crate::learning::prediction::PredictionEngine;
use crate::learning::tuning::{AckBasedTuner, LearningTuner, WeightsChange};
use crate::model::{DispatchId, Signal, VehicleId};
use crate::time::Timestamp;

use super::build;
use super::projection::{DispatchProjection, ProjectionError};
use crate::events::payload::{FallbackApplied, OrderAnswer, OrdersSent, PlanCreated};
use crate::events::{decode, Decoded, ProjectedState, StoredEvent};

/// Two powers agree when they differ by at most 1e-6 relative (of the larger; absolute
/// below 1 W).
pub fn agree(a: f64, b: f64) -> bool {
    (a - b).abs() <= 1e-6 * a.abs().max(b.abs()).max(1e-3)
}

/// Whether a recorded power and today's agree: [`agree`], or, for a figure recorded before
/// orders became whole watts (one off the watt grid), within `watts` watts: today's is the
/// same allocation made whole watts ([`crate::allocation::repair::to_watts`]).
pub fn agree_kw(recorded: f64, today: f64, watts: usize) -> bool {
    let off_grid = ((recorded * 1_000.0).round() - recorded * 1_000.0).abs() > 1e-6;
    agree(recorded, today) || (off_grid && (recorded - today).abs() <= watts as f64 * 0.001 + 1e-9)
}

/// A recorded decision that today's code does not reproduce.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Finding {
    /// The row of the decision.
    pub seq: u64,
    /// Its dispatch.
    pub dispatch_id: Option<String>,
    /// `plan`, `fallback` or `tuning`.
    pub decision: &'static str,
    /// What differs.
    pub detail: String,
}

/// What an audit found.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct AuditReport {
    /// Rows read.
    pub rows: u64,
    /// Plans re-run.
    pub plans: u64,
    /// Fallbacks re-run.
    pub fallbacks: u64,
    /// Weight changes compared.
    pub tunings: u64,
    /// Decisions the LP's time limit cut short (not comparable; listed by seq).
    pub time_limited: Vec<u64>,
    /// Decisions that could not be re-run (no recorded configuration before them).
    pub not_checked: u64,
    /// Every decision that differs.
    pub findings: Vec<Finding>,
}

/// What a re-run plan decided, waiting for the recorded rows to compare.
struct Expected {
    plan: PlanCreated,
    orders: Option<OrdersSent>,
}

/// The fold and the re-runs.
pub struct Auditor {
    projection: DispatchProjection,
    config: Option<Config>,
    /// The prediction, fed as the live planner's is: answers at each settlement.
    prediction: Option<PredictionEngine>,
    tuner: Option<AckBasedTuner>,
    tunings: VecDeque<(u64, WeightsChange)>,
    plans: BTreeMap<String, Expected>,
    /// Orders a re-run fallback decided, by dispatch (compared with its next `OrderSent`).
    fallback_orders: BTreeMap<String, Vec<(VehicleId, f64)>>,
    lp: LpDispatcher,
    /// The commitments the projection holds, kept as rows are folded and lent to each re-run
    /// (rebuilding them for every decision made the audit quadratic in what is in force).
    ledger: Ledger,
    /// The latest time `ledger` was expired at: a decision stamped earlier (a clock step)
    /// rebuilds it from the projection.
    expired_at: Option<Timestamp>,
    window: (Option<Timestamp>, Option<Timestamp>),
    report: AuditReport,
}

impl Auditor {
    /// Audits the decisions stamped within `[from, to]` (either open); the whole log is
    /// folded all the same, since every decision depends on what came before it.
    pub fn new(from: Option<Timestamp>, to: Option<Timestamp>) -> Self {
        Self {
            projection: DispatchProjection::new(),
            config: None,
            prediction: None,
            tuner: None,
            tunings: VecDeque::new(),
            plans: BTreeMap::new(),
            fallback_orders: BTreeMap::new(),
            lp: LpDispatcher::default(),
            ledger: Ledger::new(),
            expired_at: None,
            window: (from, to),
            report: AuditReport::default(),
        }
    }

    /// [`Auditor::new`] on a compacted log: goes on from its snapshot, as the gateway does at
    /// a start (tuner and prediction rebuilt from the state, under its recorded config).
    pub fn resume(state: ProjectedState, from: Option<Timestamp>, to: Option<Timestamp>) -> Self {
        let mut auditor = Self::new(from, to);
        auditor.config = state.config.as_ref().and_then(|c| c.config().ok());
        auditor.projection = DispatchProjection::resume(state);
        auditor.restart();
        auditor.sync_all();
        auditor
    }

    /// The gateway (re)starts under `self.config`: it rebuilds its tuner and prediction
    /// from the log.
    fn restart(&mut self) {
        let state = self.projection.state();
        self.tuner = self.config.as_ref().and_then(|cfg| build::tuner(cfg, state)).and_then(Result::ok);
        self.prediction = self.config.as_ref().and_then(|cfg| build::prediction(cfg, state));
    }

    /// The ledger again from every commitment the projection holds.
    fn sync_all(&mut self) {
        self.ledger = ledger_of(self.projection.state(), None);
        self.expired_at = None;
    }

    /// The ledger's commitments of `dispatch_id` again from the projection's.
    fn sync_dispatch(&mut self, dispatch_id: &str) {
        for id in self.ledger.orders_of(dispatch_id) {
            self.ledger.release(&id);
        }
        for (order, accepted) in self.projection.state().committed_orders(dispatch_id) {
            let mut c = Commitment::of(&order);
            c.accepted = accepted;
            self.ledger.commit(c);
        }
    }

    /// The ledger without the windows over at `ts`: what the projection holds in force then.
    fn expire_at(&mut self, ts: Timestamp) {
        if self.expired_at.is_some_and(|at| ts < at) {
            self.sync_all();
        }
        self.ledger.expire(ts);
        self.expired_at = Some(ts);
    }

    /// The report so far.
    pub fn report(&self) -> &AuditReport {
        &self.report
    }

    /// The report, once every row is read: a recorded decision still waiting for its rows
    /// (the log ends mid-step) is not a finding.
    pub fn finish(self) -> AuditReport {
        self.report
    }

    fn in_window(&self, ts: Timestamp) -> bool {
        self.window.0.is_none_or(|f| ts >= f) && self.window.1.is_none_or(|t| ts <= t)
    }

    fn finding(&mut self, seq: u64, dispatch_id: Option<&str>, decision: &'static str, detail: String) {
        self.report.findings.push(Finding { seq, dispatch_id: dispatch_id.map(str::to_owned), decision, detail });
    }

    /// Reads one row: re-runs the decision it records (if any), then folds it.
    pub fn apply(&mut self, row: &StoredEvent) -> Result<(), ProjectionError> {
        let decoded = decode(&row.kind, &row.payload).map_err(|error| ProjectionError { seq: row.seq, error })?;
        let ts = Timestamp::from_millis(row.ts_ms);
        let corr = row.correlation_id.as_deref();
        self.report.rows += 1;
        let audit = self.in_window(ts);
        match &decoded {
            Decoded::ConfigRecorded(c) => {
                self.config = c.config().ok();
                self.restart();
            }
            Decoded::SignalReceived(s) if audit => self.rerun_plan(row.seq, ts, corr, &s.signal),
            Decoded::PlanCreated(p) => self.compare_plan(row.seq, p),
            Decoded::OrdersSent(o) => self.compare_orders(row.seq, corr.unwrap_or_default(), o),
            Decoded::FallbackApplied(f) if audit => self.rerun_fallback(row.seq, ts, corr.unwrap_or_default(), f),
            Decoded::DispatchCompleted(done) => {
                if done.outcome.interrupted.is_none() {
                    if let (Some(p), Some(d)) =
                        (self.prediction.as_mut(), self.projection.state().in_flight.get(&done.outcome.dispatch_id))
                    {
                        let answers: Vec<(VehicleId, Timestamp, bool)> = d
                            .orders
                            .values()
                            .map(|o| (o.vehicle_id.clone(), ts, o.answer == OrderAnswer::Accepted))
                            .collect();
                        p.observe_answers(&answers);
                    }
                }
                // The tuner learns from dispatches that ran their course, as the gateway's.
                let tuned = done.outcome.interrupted.is_none().then_some(()).and(self.tuner.as_mut());
                if let Some(change) = tuned.and_then(|t| t.observe(&done.outcome)) {
                    self.tunings.push_back((row.seq, change));
                }
            }
            // Weights imported by `gridweaver migrate` are inputs, not decisions.
            Decoded::WeightsTuned(_) if row.actor == "migrate" => {}
            Decoded::WeightsTuned(w) if audit => self.compare_tuning(row.seq, &w.change),
            Decoded::WeightsTuned(_) => {
                self.tunings.pop_front();
            }
            _ => {}
        }
        // What the fold changes in the commitments, the ledger follows.
        let touched: Vec<String> = match &decoded {
            Decoded::OrdersSent(_)
            | Decoded::AcksReceived(_)
            | Decoded::AcksTimedOut(_)
            | Decoded::OrdersCancelled(_) => corr.map(str::to_owned).into_iter().collect(),
            Decoded::VehicleLost(lost) => {
                let ids: BTreeSet<&str> = lost.released_orders.iter().filter_map(|id| id.dispatch()).collect();
                ids.into_iter().map(str::to_owned).collect()
            }
            _ => Vec::new(),
        };
        let settled = matches!(decoded, Decoded::DispatchCompleted(_));
        self.projection.apply_decoded(row.seq, ts, corr, decoded);
        for dispatch_id in &touched {
            self.sync_dispatch(dispatch_id);
        }
        if settled {
            // The projection dropped the windows over (see `ProjectedState::prune`).
            self.expire_at(ts);
        }
        Ok(())
    }

    fn rerun_plan(&mut self, seq: u64, ts: Timestamp, corr: Option<&str>, signal: &Signal) {
        let Some(cfg) = &self.config else {
            self.report.not_checked += 1;
            return;
        };
        self.report.plans += 1;
        let mut engine = Engine::new(build::planner_with(cfg, self.projection.state(), self.prediction.clone()));
        self.expire_at(ts);
        debug_assert_eq!(
            self.ledger.iter().collect::<Vec<_>>(),
            ledger_of(self.projection.state(), Some(ts)).iter().collect::<Vec<_>>(),
            "the audit's ledger is the projection's commitments at seq {seq}"
        );
        engine.set_ledger(std::mem::take(&mut self.ledger));
        // A replacement's withdrawal is already in the log before its signal.
        let signal = Signal { replaces: None, ..signal.clone() };
        let planned = engine.on_signal(ts, signal);
        // Back to what the log holds: today's plan committed its own orders.
        self.ledger = engine.take_ledger();
        let today: BTreeSet<DispatchId> =
            planned.iter().flat_map(|step| step.orders.iter().map(|o| o.dispatch_id.clone())).collect();
        for dispatch_id in &today {
            self.sync_dispatch(dispatch_id);
        }
        let step = match planned {
            Ok(step) => step,
            Err(refused) => {
                return self.finding(
                    seq,
                    corr,
                    "plan",
                    format!("recorded as dispatched; today it is refused: {refused}"),
                );
            }
        };
        let mut plan = None;
        let mut orders = None;
        for e in &step.events {
            match crate::events::payload::decode_str(e.kind.as_str(), &e.payload) {
                Ok(Decoded::PlanCreated(p)) => plan = Some(p),
                Ok(Decoded::OrdersSent(o)) => orders = Some(o),
                _ => {}
            }
        }
        let Some(plan) = plan else { return self.finding(seq, corr, "plan", "today's code made no plan".into()) };
        if corr != Some(plan.dispatch_id.as_str()) {
            let detail = format!("dispatch id: recorded {corr:?}, today {}", plan.dispatch_id);
            self.finding(seq, corr, "plan", detail);
        }
        self.plans.insert(corr.unwrap_or_default().to_owned(), Expected { plan, orders });
    }

    fn compare_plan(&mut self, seq: u64, recorded: &PlanCreated) {
        let Some(expected) = self.plans.get(recorded.dispatch_id.as_str()) else { return };
        let today = &expected.plan;
        let cut = |p: &PlanCreated| p.solver.as_ref().is_some_and(|s| s.status == "MaxTime");
        if cut(recorded) || cut(today) {
            self.report.time_limited.push(seq);
            self.plans.remove(recorded.dispatch_id.as_str());
            return;
        }
        let mut diffs = Vec::new();
        if recorded.strategy != today.strategy {
            diffs.push(format!("strategy {:?} -> {:?}", recorded.strategy, today.strategy));
        }
        let orders = expected.orders.as_ref().map_or(0, |o| o.orders.len());
        if !agree_kw(recorded.allocated_kw, today.allocated_kw, orders) {
            diffs.push(format!("allocated {} kW -> {} kW", recorded.allocated_kw, today.allocated_kw));
        }
        if !agree(recorded.target_kw, today.target_kw) {
            diffs.push(format!("target {} kW -> {} kW", recorded.target_kw, today.target_kw));
        }
        if let (Some(r), Some(t)) = (&recorded.fleet, &today.fleet) {
            if r != t {
                diffs.push(format!(
                    "the fleet rebuilt from the log differs from the one planned with ({} vehicles, {} -> {} vehicles, {})",
                    r.vehicles, r.fingerprint, t.vehicles, t.fingerprint
                ));
            }
        }
        let nothing_ordered = expected.orders.is_none();
        if !diffs.is_empty() {
            let id = recorded.dispatch_id.clone();
            self.finding(seq, Some(&id), "plan", diffs.join("; "));
        }
        if nothing_ordered {
            self.plans.remove(recorded.dispatch_id.as_str());
        }
    }

    fn compare_orders(&mut self, seq: u64, dispatch_id: &str, recorded: &OrdersSent) {
        let (decision, today) = if recorded.attempt == 1 {
            match self.plans.remove(dispatch_id) {
                Some(e) => ("plan", e.orders.map(|o| o.orders).unwrap_or_default()),
                None => return,
            }
        } else {
            match self.fallback_orders.remove(dispatch_id) {
                Some(o) => ("fallback", o),
                None => return,
            }
        };
        if let Some(detail) = differ(&recorded.orders, &today) {
            self.finding(seq, Some(dispatch_id), decision, format!("orders of attempt {}: {detail}", recorded.attempt));
        }
    }

    fn rerun_fallback(&mut self, seq: u64, ts: Timestamp, dispatch_id: &str, recorded: &FallbackApplied) {
        self.expire_at(ts);
        let state = self.projection.state();
        let (Some(_), Some(d)) = (&self.config, state.in_flight.get(dispatch_id)) else {
            self.report.not_checked += 1;
            return;
        };
        let Some(signal) = d.signal.clone() else {
            self.report.not_checked += 1;
            return;
        };
        self.report.fallbacks += 1;
        let limits = self.config.as_ref().map(|c| c.dispatch.limits.clone()).unwrap_or_default();
        let ledger = &self.ledger;
        debug_assert_eq!(ledger.iter().collect::<Vec<_>>(), ledger_of(state, Some(ts)).iter().collect::<Vec<_>>());
        let ids: Vec<VehicleId> = recorded.candidates.iter().map(|(id, _, _)| id.clone()).collect();
        let (candidates, limits) =
            fallback_room(&limits, (&state.fleet, &state.fleet_at), ledger, &signal, d.planned_at, &ids);
        let mut diffs = Vec::new();
        let free_of: BTreeMap<&VehicleId, f64> = candidates.iter().map(|(v, free)| (&v.id, *free)).collect();
        for (id, remaining, _) in &recorded.candidates {
            match free_of.get(id) {
                None => diffs.push(format!("candidate {id} has no free capacity in the state the log holds")),
                Some(free) if !agree(*free, *remaining) => {
                    diffs.push(format!("{id} had {remaining} kW free, the log gives {free} kW"))
                }
                Some(_) => {}
            }
        }
        let request = FallbackRequest {
            dispatch_id: DispatchId::from(dispatch_id),
            kind: recorded.fallback,
            residual_kw: recorded.residual_kw,
            candidates,
            limits,
        };
        let realloc = request.reallocate(by_kind(recorded.fallback).as_ref(), &mut self.lp);
        let today_of: BTreeMap<&VehicleId, f64> = request
            .candidates
            .iter()
            .enumerate()
            .map(|(i, (v, free))| (&v.id, realloc.power_kw.get(i).copied().unwrap_or(0.0).clamp(0.0, *free)))
            .collect();
        let mut orders = Vec::new();
        for (id, remaining, power) in &recorded.candidates {
            let today = today_of.get(id).copied().unwrap_or(0.0);
            if !agree_kw(*power, today, 1) {
                diffs.push(format!("{id}: {power} kW -> {today} kW (of {remaining} free)"));
            }
            if today >= MIN_ORDER_KW {
                orders.push((id.clone(), today));
            }
        }
        if !diffs.is_empty() {
            self.finding(seq, Some(dispatch_id), "fallback", diffs.join("; "));
        }
        if !orders.is_empty() {
            self.fallback_orders.insert(dispatch_id.to_owned(), orders);
        }
    }

    fn compare_tuning(&mut self, seq: u64, recorded: &WeightsChange) {
        self.report.tunings += 1;
        let Some((_, today)) = self.tunings.pop_front() else {
            let detail = format!("recorded a change of {} weights; today's tuner makes none", recorded.signal_type);
            return self.finding(seq, Some(&recorded.dispatch_id), "tuning", detail);
        };
        let same = today.signal_type == recorded.signal_type
            && today.dispatch_id == recorded.dispatch_id
            && agree(today.after.availability, recorded.after.availability);
        if !same {
            let detail = format!(
                "recorded {} availability {} after {}; today {} availability {} after {}",
                recorded.signal_type,
                recorded.after.availability,
                recorded.dispatch_id,
                today.signal_type,
                today.after.availability,
                today.dispatch_id
            );
            self.finding(seq, Some(&recorded.dispatch_id), "tuning", detail);
        }
    }
}

/// The commitments of `state` as a ledger (windows ending after `after`, or all).
fn ledger_of(state: &ProjectedState, after: Option<Timestamp>) -> Ledger {
    let mut ledger = Ledger::new();
    for (_, order, accepted) in state.commitments_at(after.unwrap_or(Timestamp::from_millis(i64::MIN))) {
        let mut c = Commitment::of(&order);
        c.accepted = accepted;
        ledger.commit(c);
    }
    ledger
}

/// How two order lists differ, if they do.
fn differ(recorded: &[(VehicleId, f64)], today: &[(VehicleId, f64)]) -> Option<String> {
    let by_vehicle = |o: &[(VehicleId, f64)]| -> BTreeMap<VehicleId, f64> {
        let mut m = BTreeMap::new();
        for (v, p) in o {
            *m.entry(v.clone()).or_insert(0.0) += p;
        }
        m
    };
    let (was, now) = (by_vehicle(recorded), by_vehicle(today));
    let vehicles: BTreeSet<&VehicleId> = was.keys().chain(now.keys()).collect();
    let diffs: Vec<String> = vehicles
        .into_iter()
        .filter_map(|v| {
            let (r, t) = (was.get(v).copied().unwrap_or(0.0), now.get(v).copied().unwrap_or(0.0));
            (!agree_kw(r, t, 1)).then(|| format!("{v} {r} kW -> {t} kW"))
        })
        .collect();
    if diffs.is_empty() {
        return None;
    }
    let total = |o: &[(VehicleId, f64)]| o.iter().map(|(_, p)| p).sum::<f64>();
    let shown = diffs.len().min(5);
    let more = if diffs.len() > shown { format!(" and {} more", diffs.len() - shown) } else { String::new() };
    Some(format!(
        "{} orders ({} kW) recorded, {} ({} kW) today: {}{more}",
        recorded.len(),
        total(recorded),
        today.len(),
        total(today),
        diffs[..shown].join(", ")
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dispatch::Step;
    use crate::events::payload::ConfigRecorded;
    use crate::events::{Event, EventStore, MemoryStore};
    use crate::model::{Ack, AckStatus, Direction, SignalType, Vehicle};

    const T0: Timestamp = Timestamp::from_millis(1_795_000_000_000);

    fn config(strategy: &str) -> Config {
        Config::from_yaml(&format!(
            "site: north\nstore: {{ path: x.db }}\ndispatch:\n  ack_timeout_seconds: 2\n  strategy: {strategy}\n  fallback: balanced\n  limits: {{ export_kw: 120, groups: {{ g0: 50 }} }}\n"
        ))
        .unwrap()
    }

    /// A gateway's run as the runtime drives it: the config recorded, a fleet, signals that
    /// overlap, vehicles that accept, reject or stay silent, fallbacks, a tuner.
    fn run(cfg: &Config, recorded: &Config) -> MemoryStore {
        let mut log = MemoryStore::default();
        log.append(&[Event::of(T0, "gateway", &ConfigRecorded::of(recorded))]).unwrap();
        let mut engine = build::engine(cfg, &ProjectedState::default()).unwrap();
        for i in 0..12 {
            let mut v = Vehicle::new(format!("v{i:02}"), 0.3 + 0.05 * i as f64, 70.0, 8.0 + i as f64);
            v.group = Some(format!("g{}", i % 2));
            log.append(&engine.on_state(T0, v.id.clone(), Some(v)).1.into_iter().collect::<Vec<_>>()).unwrap();
        }
        let mut now = T0;
        for k in 0..8u32 {
            now = now.plus_millis(700);
            let signal = Signal::new(format!("s{k}"), SignalType::Afrr, Direction::Up, 30.0 + 10.0 * f64::from(k), now);
            let Ok(step) = engine.on_signal(now, Signal { duration_s: 60, ..signal }) else { continue };
            let mut steps = vec![step];
            // Every third vehicle rejects, every fifth stays silent.
            let orders = steps[0].orders.clone();
            for (j, o) in orders.iter().enumerate() {
                if j % 5 == 4 {
                    continue;
                }
                let status = if j % 3 == 2 { AckStatus::Rejected } else { AckStatus::Accepted };
                let ack = Ack { order_id: o.order_id.to_string(), status, reason: None };
                steps.push(engine.on_ack(now.plus_millis(10), &o.vehicle_id, &ack).unwrap());
            }
            // A fallback runs in the step that settles the attempt: its orders are in it,
            // and they are answered before their own deadline.
            let answer = |engine: &mut Engine, log: &mut MemoryStore, steps: Vec<Step>, at: Timestamp| {
                for step in steps {
                    let fallback_orders: Vec<_> = step.orders.iter().filter(|o| o.attempt > 1).cloned().collect();
                    log_step(log, step);
                    for o in &fallback_orders {
                        let ack = Ack { order_id: o.order_id.to_string(), status: AckStatus::Accepted, reason: None };
                        log_step(log, engine.on_ack(at, &o.vehicle_id, &ack).unwrap());
                    }
                }
            };
            answer(&mut engine, &mut log, steps, now.plus_millis(20));
            let recorded = vec![engine.record_acks()];
            answer(&mut engine, &mut log, recorded, now.plus_millis(30));
            let timeouts = engine.on_timeout(now.plus_millis(2_500));
            answer(&mut engine, &mut log, timeouts, now.plus_millis(2_600));
        }
        log
    }

    fn log_step(log: &mut MemoryStore, step: Step) {
        log.append(&step.events).unwrap();
    }

    fn audit(log: &MemoryStore) -> AuditReport {
        let mut auditor = Auditor::new(None, None);
        for row in log.rows() {
            auditor.apply(row).unwrap();
        }
        auditor.finish()
    }

    #[test]
    fn every_recorded_decision_is_reproduced_by_todays_code() {
        let cfg = config("smart");
        let report = audit(&run(&cfg, &cfg));
        assert!(report.plans >= 6 && report.fallbacks >= 1, "{report:?}");
        assert!(report.findings.is_empty(), "{:#?}", report.findings);
        assert_eq!(report.not_checked, 0);
    }

    #[test]
    fn decisions_taken_under_other_settings_than_recorded_are_listed() {
        // The gateway ran with Smart but its log says Equal: every plan differs.
        let report = audit(&run(&config("smart"), &config("equal")));
        assert!(report.findings.iter().any(|f| f.decision == "plan" && f.detail.contains("strategy")), "{report:?}");
        // A window that excludes everything re-runs nothing.
        let mut auditor = Auditor::new(Some(T0.plus_millis(86_400_000)), None);
        for row in run(&config("smart"), &config("equal")).rows() {
            auditor.apply(row).unwrap();
        }
        assert_eq!(auditor.finish().plans, 0);
    }
}
