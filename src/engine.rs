//! The dispatch state machine.
//!
//! [`Planner`] owns the fleet view and turns a signal into a [`Dispatch`] plus the first
//! [`Step`]: the events to record, the orders to send (after those events are durable) and
//! the ACK deadline. [`DispatchBook`] holds the dispatches in flight: it takes ACKs and
//! timeouts, asks for a fallback when the first attempt leaves a residual
//! ([`Step::fallback`]), takes the fallback's answer, and finally emits the
//! `DispatchCompleted` event and the [`DispatchOutcome`].
//!
//! Nothing here reads a clock or does I/O: `now` comes in, steps go out. One dispatch:
//!
//! ```text
//! Planner::plan ──► Waiting(attempt 1, deadline) ──(all answered | deadline)──► settle
//!     settle: residual > 0 and a fallback and vehicles that accepted ──► AwaitingFallback
//!             otherwise ──► Done (DispatchCompleted, outcome)
//!     AwaitingFallback ──apply_fallback──► Waiting(attempt 2, deadline) ──► settle ──► Done
//! ```

pub mod ledger;

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};

use serde::Serialize;
use serde_json::json;

use crate::config::Limits;
use crate::dispatch::{AllocationRequest, Candidate, Dispatcher, MIN_ORDER_KW};
use crate::events::{Event, EventKind};
use crate::fallback::{Fallback, FallbackCandidate, Reallocation};
use crate::filter::{Exclusion, VehicleFilter};
use crate::limits::LimitSet;
use crate::model::{
    Ack, AckStatus, Direction, DispatchOutcome, FallbackKind, Order, OrderCancel, Signal, StrategyKind, Vehicle,
    VehicleCounts, VehicleId,
};
use crate::prediction::PredictionEngine;
use crate::time::Timestamp;
use ledger::{Commitment, Ledger};

/// Settings of the planner and its dispatches.
#[derive(Clone, Debug)]
pub struct EngineConfig {
    /// The region of this site (events' `region`; signals for another region are refused).
    pub region: String,
    /// How long vehicles have to answer an order, ms.
    pub ack_timeout_ms: i64,
    /// The fallback used for residuals.
    pub fallback: FallbackKind,
    /// Attempts per dispatch (1 = no fallback round).
    pub max_attempts: u32,
    /// Per-dispatch decay of participation scores (0..1; 0.9 keeps 90 %).
    pub participation_decay: f64,
    /// Signal ids remembered for duplicate detection.
    pub remembered_signals: usize,
    /// Site, group and phase limits every allocation respects.
    pub limits: Limits,
    /// Segments whose vehicles are never asked twice (`dispatch.segments.<name>.fallback:
    /// false`); vehicles of other segments, or of none, may be asked in the fallback round.
    pub no_fallback_segments: BTreeSet<String>,
    /// Dispatches waiting for ACKs or a fallback at once; beyond it new signals are refused.
    pub max_in_flight: usize,
    /// How far ahead a signal may start, ms.
    pub max_start_ahead_ms: i64,
    /// Longest signal window, seconds.
    pub max_duration_s: u64,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            region: "default".into(),
            ack_timeout_ms: 5_000,
            fallback: FallbackKind::Balanced,
            max_attempts: 2,
            participation_decay: 0.9,
            remembered_signals: 100_000,
            limits: Limits::default(),
            no_fallback_segments: BTreeSet::new(),
            max_in_flight: 32,
            max_start_ahead_ms: 86_400_000,
            max_duration_s: 86_400,
        }
    }
}

/// What the runtime must do next for a dispatch, in this order: record `events` (durably),
/// then publish `orders`, arm `deadline`, run `fallback` and publish `outcome`.
#[derive(Debug, Default)]
pub struct Step {
    /// Events to append, in order.
    pub events: Vec<Event>,
    /// Orders to withdraw once the events are durable, published before `orders`.
    pub cancels: Vec<OrderCancel>,
    /// Orders to publish once the events are durable.
    pub orders: Vec<Order>,
    /// When the dispatch next needs [`DispatchBook::on_timeout`], if it waits for ACKs.
    pub deadline: Option<Timestamp>,
    /// A residual to hand to the fallback; answer with [`DispatchBook::apply_fallback`].
    pub fallback: Option<FallbackRequest>,
    /// Once settled: each order's vehicle, when, and whether it accepted (for the
    /// availability prediction).
    pub answers: Vec<(VehicleId, Timestamp, bool)>,
    /// The results of the dispatches this step settled (a replacement settles the
    /// dispatch it replaces in the same step as it plans its own).
    pub outcomes: Vec<DispatchOutcome>,
}

impl Step {
    fn merge(&mut self, other: Step) {
        self.events.extend(other.events);
        self.cancels.extend(other.cancels);
        self.orders.extend(other.orders);
        self.deadline = other.deadline.or(self.deadline);
        self.fallback = other.fallback.or(self.fallback.take());
        self.outcomes.extend(other.outcomes);
        self.answers.extend(other.answers);
    }

    /// Whether there is nothing to do.
    pub fn is_empty(&self) -> bool {
        self.events.is_empty()
            && self.cancels.is_empty()
            && self.orders.is_empty()
            && self.fallback.is_none()
            && self.outcomes.is_empty()
            && self.answers.is_empty()
    }
}

/// A residual waiting for the fallback: the vehicles that accepted, with their state at
/// planning time and the capacity they have left.
#[derive(Clone, Debug)]
pub struct FallbackRequest {
    /// The dispatch.
    pub dispatch_id: String,
    /// Power still missing, kW.
    pub residual_kw: f64,
    /// Vehicles that accepted, with remaining effective capacity, kW.
    pub candidates: Vec<(Vehicle, f64)>,
    /// The shared limits over the candidates, with the room the accepted power has
    /// already used taken off.
    pub limits: LimitSet,
}

impl FallbackRequest {
    /// The candidates as the [`crate::fallback::Fallback`] trait takes them.
    pub fn fallback_candidates(&self) -> Vec<FallbackCandidate<'_>> {
        self.candidates.iter().map(|(v, r)| FallbackCandidate { vehicle: v, remaining_kw: *r }).collect()
    }

    /// Runs `fallback` on this request, then makes sure it places min(residual, the most
    /// the candidates and limits allow) ([`crate::repair::fill_to_max`]; vehicles the
    /// fallback skipped are used only when the others cannot carry it). Noop places nothing:
    /// it is the choice not to reallocate.
    pub fn reallocate(&self, fallback: &dyn Fallback, lp: &mut crate::lp::LpDispatcher) -> Reallocation {
        let mut r = fallback.reallocate(self.residual_kw, &self.fallback_candidates(), &self.limits);
        if fallback.kind() == FallbackKind::Noop {
            return r;
        }
        let n = self.candidates.len();
        r.power_kw.resize(n, 0.0);
        let caps: Vec<f64> = self.candidates.iter().map(|(_, c)| *c).collect();
        let scores: Vec<f64> = (0..n).map(|i| if r.skipped.contains(&i) { 0.0 } else { 1.0 }).collect();
        crate::repair::fill_to_max(lp, &mut r.power_kw, &caps, self.residual_kw, &self.limits, &scores);
        r
    }
}

/// Why a signal was not dispatched.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum SignalRefused {
    /// Its id was seen before.
    #[error("signal `{0}` was already received; it is not dispatched again")]
    Duplicate(String),
    /// Addressed to another region.
    #[error("field `region` names `{got}`, but this gateway serves `{ours}`")]
    OtherRegion {
        /// The signal's region.
        got: String,
        /// This site's.
        ours: String,
    },
    /// A transfer with a leader term below the highest seen.
    #[error("field `leader_term` is {got}, lower than the highest term seen ({highest}): stale leader")]
    StaleTerm {
        /// The signal's term.
        got: u64,
        /// The highest seen.
        highest: u64,
    },
    /// Its window `[start, start + duration_s)` ended before it arrived.
    #[error("fields `start` and `duration_s` give a window that ended at {end}, before the signal arrived ({now})")]
    WindowOver {
        /// The window's end.
        end: Timestamp,
        /// When it arrived.
        now: Timestamp,
    },
    /// It starts further ahead than `dispatch.max_start_ahead_s`.
    #[error("field `start` is {start}, more than {max_s} s ahead (dispatch.max_start_ahead_s)")]
    TooFarAhead {
        /// The signal's start.
        start: Timestamp,
        /// The limit, seconds.
        max_s: i64,
    },
    /// Its window is longer than `dispatch.max_duration_s`.
    #[error("field `duration_s` is {got}, more than the {max} allowed (dispatch.max_duration_s)")]
    TooLong {
        /// The signal's duration.
        got: u64,
        /// The limit.
        max: u64,
    },
    /// `dispatch.max_in_flight` dispatches are already waiting for their vehicles.
    #[error("{0} dispatches are already in flight (dispatch.max_in_flight); signal refused, send it again later")]
    Busy(usize),
    /// `replaces` names no dispatch in force.
    #[error("field `replaces` names `{0}`, which is no signal with a dispatch in force (unknown, already replaced, or its window is over)")]
    UnknownReplacement(String),
}

/// What happened to a vehicle's state update.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FleetChange {
    /// First state of a vehicle.
    Discovered,
    /// A known vehicle's new state.
    Updated,
    /// A known vehicle left.
    Lost,
    /// An unknown vehicle "left": nothing changed.
    Unchanged,
}

/// The site's flexibility now, published retained on `<p>/capacity`.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Capacity {
    /// Power the eligible fleet can deliver (discharge), kW, for a default-length signal.
    pub up_kw: f64,
    /// Power it can absorb (charge), kW.
    pub down_kw: f64,
    /// Vehicles plugged in and eligible in at least one direction.
    pub vehicles: usize,
    /// When computed.
    pub at: Timestamp,
}

/// Signal ids seen, bounded: the oldest are forgotten first.
#[derive(Debug, Default)]
struct SeenIds {
    set: HashSet<String>,
    order: VecDeque<String>,
    cap: usize,
}

impl SeenIds {
    /// Remembers `id`; false if it was already there.
    fn insert(&mut self, id: &str) -> bool {
        if self.set.contains(id) {
            return false;
        }
        self.set.insert(id.to_owned());
        self.order.push_back(id.to_owned());
        while self.order.len() > self.cap.max(1) {
            if let Some(old) = self.order.pop_front() {
                self.set.remove(&old);
            }
        }
        true
    }
}

/// Owns the fleet view, the filter, the strategy and the fairness scores; plans dispatches.
pub struct Planner {
    cfg: EngineConfig,
    fleet: BTreeMap<VehicleId, Vehicle>,
    filter: Box<dyn VehicleFilter>,
    strategy: Box<dyn Dispatcher>,
    participation: HashMap<VehicleId, f64>,
    prediction: Option<PredictionEngine>,
    seen: SeenIds,
    highest_term: Option<u64>,
    dispatches: u64,
}

/// A default signal length for [`Planner::capacity`], seconds.
pub const CAPACITY_HORIZON_S: u64 = 900;

impl Planner {
    /// A planner with no vehicles.
    pub fn new(cfg: EngineConfig, filter: Box<dyn VehicleFilter>, strategy: Box<dyn Dispatcher>) -> Self {
        let seen = SeenIds { cap: cfg.remembered_signals, ..SeenIds::default() };
        Self {
            cfg,
            fleet: BTreeMap::new(),
            filter,
            strategy,
            participation: HashMap::new(),
            prediction: None,
            seen,
            highest_term: None,
            dispatches: 0,
        }
    }

    /// The configuration.
    pub fn config(&self) -> &EngineConfig {
        &self.cfg
    }

    /// Remembers a signal id received before a restart (from the event log), so that a
    /// redelivery is still a duplicate.
    pub fn remember_signal(&mut self, id: &str) {
        self.seen.insert(id);
    }

    /// Uses `engine` to predict the availability of vehicles that do not state theirs.
    pub fn set_prediction(&mut self, engine: PredictionEngine) {
        self.prediction = Some(engine);
    }

    /// Records what vehicles answered (a settled dispatch's [`Step::answers`]); the
    /// histories of vehicles not heard of for 30 days are dropped.
    pub fn observe_answers(&mut self, answers: &[(VehicleId, Timestamp, bool)]) {
        if let Some(p) = self.prediction.as_mut() {
            for (v, at, delivered) in answers {
                p.observe(v, *at, *delivered);
            }
            if let Some(latest) = answers.iter().map(|(_, at, _)| *at).max() {
                p.prune(latest.plus_millis(-30 * 86_400_000));
            }
        }
    }

    /// Replaces the score weights of one signal type (the tuner's output).
    pub fn set_weights(&mut self, kind: crate::model::SignalType, weights: crate::dispatch::Weights) {
        self.strategy.set_weights(kind, weights);
    }

    /// Vehicles whose availability is predicted now, with the prediction applied.
    fn predicted(&self, now: Timestamp) -> HashMap<VehicleId, Vehicle> {
        let Some(p) = &self.prediction else { return HashMap::new() };
        self.fleet
            .values()
            .filter(|v| !v.availability_stated)
            .filter_map(|v| p.predict(&v.id, now).map(|a| (v.id.clone(), Vehicle { availability: a, ..v.clone() })))
            .collect()
    }

    /// One dispatch's effect on the fairness scores: every score decays, and each vehicle
    /// ordered in its first attempt gains 1.
    fn note_participation<'v>(&mut self, ordered: impl Iterator<Item = &'v VehicleId>) {
        for p in self.participation.values_mut() {
            *p *= self.cfg.participation_decay;
        }
        for v in ordered {
            *self.participation.entry(v.clone()).or_insert(0.0) += 1.0;
        }
        self.participation.retain(|_, p| *p > 1e-3);
    }

    /// Replays the fairness scores from the vehicles each past dispatch ordered in its
    /// first attempt (oldest first), as the live planner built them.
    pub fn remember_participation(&mut self, dispatches: &[Vec<VehicleId>]) {
        for ordered in dispatches {
            self.note_participation(ordered.iter());
        }
    }

    /// The fairness score of each vehicle used lately.
    pub fn participation(&self) -> &HashMap<VehicleId, f64> {
        &self.participation
    }

    /// Continues dispatch numbering after `n` (the last dispatch before a restart), so that
    /// dispatch ids stay unique across restarts.
    pub fn remember_dispatches(&mut self, n: u64) {
        self.dispatches = self.dispatches.max(n);
    }

    /// Remembers the highest leader term seen before a restart.
    pub fn remember_term(&mut self, term: u64) {
        self.highest_term = self.highest_term.max(Some(term));
    }

    /// The known vehicles.
    pub fn fleet(&self) -> impl Iterator<Item = &Vehicle> {
        self.fleet.values()
    }

    /// One vehicle's latest state.
    pub fn vehicle(&self, id: &VehicleId) -> Option<&Vehicle> {
        self.fleet.get(id)
    }

    /// Applies a vehicle's state (`None` = it left); returns the change and, for a
    /// discovery or a loss, the event to record.
    pub fn apply_state(
        &mut self,
        now: Timestamp,
        id: VehicleId,
        state: Option<Vehicle>,
    ) -> (FleetChange, Option<Event>) {
        let actor = format!("vehicle/{id}");
        match state {
            Some(v) => {
                let event =
                    Event::new(now, EventKind::VehicleDiscovered, actor).region(Some(&self.cfg.region)).payload(&v);
                match self.fleet.insert(id, v) {
                    None => (FleetChange::Discovered, Some(event)),
                    Some(_) => (FleetChange::Updated, None),
                }
            }
            None => match self.fleet.remove(&id) {
                Some(_) => {
                    self.participation.remove(&id);
                    let event = Event::new(now, EventKind::VehicleLost, actor)
                        .region(Some(&self.cfg.region))
                        .payload(json!({ "vehicle_id": id }));
                    (FleetChange::Lost, Some(event))
                }
                None => (FleetChange::Unchanged, None),
            },
        }
    }

    /// The flexibility the fleet still offers now, after `ledger`'s commitments, for a
    /// signal of [`CAPACITY_HORIZON_S`] seconds: per direction, what an allocation of
    /// everything that is free would place within the free room of the shared limits.
    pub fn capacity(&self, now: Timestamp, ledger: &Ledger) -> Capacity {
        let probe = |direction| Signal {
            id: String::new(),
            kind: crate::model::SignalType::Afrr,
            direction,
            power_kw: 1.0,
            start: now,
            duration_s: CAPACITY_HORIZON_S,
            region: None,
            leader_term: None,
            replaces: None,
            program: None,
        };
        let mut cap = Capacity { up_kw: 0.0, down_kw: 0.0, vehicles: 0, at: now };
        let predicted = self.predicted(now);
        let mut eligible: BTreeSet<&VehicleId> = BTreeSet::new();
        for direction in [Direction::Up, Direction::Down] {
            let sig = probe(direction);
            let (candidates, _) = self.candidates(&sig, ledger, &predicted);
            let caps: Vec<f64> = candidates.iter().map(|c| c.capacity_kw).collect();
            let limits = self.limits(&sig, &candidates, ledger);
            let total: f64 = caps.iter().sum();
            let free: f64 = crate::dispatch::greedy_fill(&vec![1.0; caps.len()], &caps, total, &limits).iter().sum();
            match direction {
                Direction::Up => cap.up_kw = free,
                Direction::Down => cap.down_kw = free,
            }
            eligible.extend(candidates.iter().map(|c| &c.vehicle.id));
        }
        cap.vehicles = eligible.len();
        cap
    }

    /// The candidates for `signal` (each with the capacity `ledger` leaves it) and the
    /// vehicles excluded, with why.
    fn candidates<'a>(
        &'a self,
        signal: &Signal,
        ledger: &Ledger,
        predicted: &'a HashMap<VehicleId, Vehicle>,
    ) -> (Vec<Candidate<'a>>, Vec<(&'a VehicleId, Exclusion)>) {
        candidates(&self.fleet, self.filter.as_ref(), &self.participation, signal, ledger, predicted)
    }

    /// The shared limits over `candidates` for `signal`, less what `ledger` has committed.
    fn limits(&self, signal: &Signal, candidates: &[Candidate<'_>], ledger: &Ledger) -> LimitSet {
        let mut limits = LimitSet::new(&self.cfg.limits, signal.direction, candidates);
        ledger.reduce(&mut limits, &self.fleet, signal.direction, signal.start, signal.end());
        limits
    }

    /// Checks a signal without changing anything: region, duplicate, leader term, window.
    pub fn admit(&self, now: Timestamp, signal: &Signal) -> Result<(), SignalRefused> {
        if let Some(region) = signal.region.as_ref().filter(|r| **r != self.cfg.region) {
            return Err(SignalRefused::OtherRegion { got: region.clone(), ours: self.cfg.region.clone() });
        }
        if self.seen.set.contains(&signal.id) {
            return Err(SignalRefused::Duplicate(signal.id.clone()));
        }
        if let (Some(got), Some(highest)) = (signal.leader_term, self.highest_term) {
            if got < highest {
                return Err(SignalRefused::StaleTerm { got, highest });
            }
        }
        if signal.duration_s > self.cfg.max_duration_s {
            return Err(SignalRefused::TooLong { got: signal.duration_s, max: self.cfg.max_duration_s });
        }
        if signal.start > now.plus_millis(self.cfg.max_start_ahead_ms) {
            return Err(SignalRefused::TooFarAhead { start: signal.start, max_s: self.cfg.max_start_ahead_ms / 1000 });
        }
        if signal.end() <= now {
            return Err(SignalRefused::WindowOver { end: signal.end(), now });
        }
        Ok(())
    }

    /// Plans a dispatch for an admitted `signal` against what `ledger` leaves free. Returns
    /// the dispatch (to hand to the [`DispatchBook`]) and its first step.
    fn plan(&mut self, now: Timestamp, signal: Signal, ledger: &Ledger) -> (Dispatch, Step) {
        self.seen.insert(&signal.id);
        if let Some(term) = signal.leader_term {
            self.remember_term(term);
        }
        self.dispatches += 1;
        let dispatch_id = format!("d{}-{}", now.as_millis(), self.dispatches);
        let region = Some(self.cfg.region.as_str());
        let ev = |kind| Event::new(now, kind, "dispatcher").correlation(&dispatch_id).region(region);

        let predicted = self.predicted(now);
        let (candidates, excluded) =
            candidates(&self.fleet, self.filter.as_ref(), &self.participation, &signal, ledger, &predicted);
        let capacity_kw: f64 = candidates.iter().map(|c| c.capacity_kw).sum();
        let target_kw = signal.power_kw;
        let mut limits = LimitSet::new(&self.cfg.limits, signal.direction, &candidates);
        ledger.reduce(&mut limits, &self.fleet, signal.direction, signal.start, signal.end());
        let req = AllocationRequest { signal: &signal, now, target_kw, candidates: &candidates, limits: &limits };
        let allocation = self.strategy.allocate(&req);

        let mut events = vec![
            ev(EventKind::SignalReceived).payload(&signal),
            ev(EventKind::ConstraintApplied).payload(json!({
                "eligible": candidates.len(),
                "excluded": excluded.iter().map(|(id, why)| json!({"vehicle_id": id, "reason": why})).collect::<Vec<_>>(),
                "capacity_kw": capacity_kw,
                "target_kw": target_kw,
                "target_capped_to_capacity": capacity_kw < target_kw,
                "limits": limits.rows,
            })),
        ];
        let until = signal.end();
        let mut orders = Vec::new();
        let mut slots = HashMap::new();
        let mut plan_rows = Vec::with_capacity(candidates.len());
        for (i, c) in candidates.iter().enumerate() {
            let power = allocation.power_kw.get(i).copied().unwrap_or(0.0).clamp(0.0, c.capacity_kw);
            plan_rows.push(PlanRow {
                vehicle: c.vehicle,
                capacity_kw: c.capacity_kw,
                participation: c.participation,
                score: allocation.scores.get(i).copied(),
                power_kw: power,
            });
            if power < MIN_ORDER_KW {
                continue;
            }
            orders.push(Order {
                order_id: format!("{dispatch_id}-1-{}", orders.len() + 1),
                dispatch_id: dispatch_id.clone(),
                vehicle_id: c.vehicle.id.clone(),
                direction: signal.direction.order_direction(),
                power_kw: power,
                start: signal.start,
                until,
                attempt: 1,
            });
            slots.insert(c.vehicle.id.clone(), Slot { vehicle: c.vehicle.clone(), accepted_kw: 0.0 });
        }
        let allocated_kw: f64 = orders.iter().map(|o| o.power_kw).sum();
        let powers: Vec<f64> = candidates
            .iter()
            .zip(allocation.power_kw.iter().chain(std::iter::repeat(&0.0)))
            .map(|(c, p)| if *p >= MIN_ORDER_KW { p.clamp(0.0, c.capacity_kw) } else { 0.0 })
            .collect();
        let limit_loads: Vec<LoadRow<'_>> = limits
            .loads(&powers)
            .into_iter()
            .zip(&limits.rows)
            .map(|(load_kw, row)| LoadRow { name: &row.name, load_kw, cap_kw: row.cap_kw })
            .collect();
        let mut predicted_ids: Vec<&VehicleId> = predicted.keys().collect();
        predicted_ids.sort();
        events.push(ev(EventKind::DispatchPlanCreated).payload(PlanPayload {
            dispatch_id: &dispatch_id,
            signal_id: &signal.id,
            strategy: allocation.strategy,
            note: allocation.note.as_deref(),
            solver: allocation.solver.as_ref(),
            weights: allocation.weights.as_ref(),
            predicted_availability: predicted_ids,
            fallback: self.cfg.fallback,
            target_kw,
            allocated_kw,
            rounds: allocation.rounds,
            limit_loads,
            candidates: plan_rows,
        }));

        self.note_participation(orders.iter().map(|o| &o.vehicle_id));

        let mut dispatch = Dispatch {
            id: dispatch_id,
            signal,
            strategy: allocation.strategy,
            fallback: self.cfg.fallback,
            no_fallback_segments: self.cfg.no_fallback_segments.clone(),
            region: self.cfg.region.clone(),
            ack_timeout_ms: self.cfg.ack_timeout_ms,
            max_attempts: self.cfg.max_attempts,
            attempt: 0,
            state: State::Waiting { deadline: now },
            orders: Vec::new(),
            index: HashMap::new(),
            slots,
            allocated_kw: 0.0,
            acknowledged_kw: 0.0,
            counts: VehicleCounts::default(),
            interrupted: None,
        };
        let mut step = Step { events, ..Step::default() };
        step.merge(dispatch.send(now, orders));
        (dispatch, step)
    }
}

/// The candidates for `signal` among `fleet` (predicted availability applied), each with
/// the capacity `ledger` leaves it, and the vehicles excluded, with why.
fn candidates<'a>(
    fleet: &'a BTreeMap<VehicleId, Vehicle>,
    filter: &dyn VehicleFilter,
    participation: &HashMap<VehicleId, f64>,
    signal: &Signal,
    ledger: &Ledger,
    predicted: &'a HashMap<VehicleId, Vehicle>,
) -> (Vec<Candidate<'a>>, Vec<(&'a VehicleId, Exclusion)>) {
    let (from, to) = (signal.start, signal.end());
    let mut excluded = Vec::new();
    let mut out = Vec::with_capacity(fleet.len());
    for v in fleet.values().map(|v| predicted.get(&v.id).unwrap_or(v)) {
        if let Err(why) = filter.check(v, signal) {
            excluded.push((&v.id, why));
            continue;
        }
        if ledger.committed_other_way(&v.id, signal.direction, from, to) {
            excluded.push((&v.id, Exclusion::CommittedOtherWay));
            continue;
        }
        let committed = ledger.committed_kw(&v.id, signal.direction, from, to);
        let capacity_kw = v.effective_capacity(signal.direction, committed, signal.duration_s as f64);
        if capacity_kw <= 0.0 {
            excluded.push((&v.id, Exclusion::NoCapacity));
            continue;
        }
        let participation = participation.get(&v.id).copied().unwrap_or(0.0);
        out.push(Candidate { vehicle: v, capacity_kw, participation });
    }
    (out, excluded)
}

/// One candidate in `DispatchPlanCreated`.
#[derive(Serialize)]
struct PlanRow<'a> {
    vehicle: &'a Vehicle,
    capacity_kw: f64,
    participation: f64,
    score: Option<f64>,
    power_kw: f64,
}

/// A shared row's load in `DispatchPlanCreated`.
#[derive(Serialize)]
struct LoadRow<'a> {
    name: &'a str,
    load_kw: f64,
    cap_kw: f64,
}

/// The `DispatchPlanCreated` payload: the inputs, the strategy's report and the result.
#[derive(Serialize)]
struct PlanPayload<'a> {
    dispatch_id: &'a str,
    signal_id: &'a str,
    strategy: StrategyKind,
    note: Option<&'a str>,
    solver: Option<&'a crate::lp::SolverReport>,
    weights: Option<&'a crate::dispatch::Weights>,
    predicted_availability: Vec<&'a VehicleId>,
    fallback: FallbackKind,
    target_kw: f64,
    allocated_kw: f64,
    rounds: u32,
    limit_loads: Vec<LoadRow<'a>>,
    candidates: Vec<PlanRow<'a>>,
}

/// The `DispatchCompleted` payload: the outcome plus how it settled.
#[derive(Serialize)]
struct CompletedPayload<'a> {
    #[serde(flatten)]
    outcome: &'a DispatchOutcome,
    attempts: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    interrupted: Option<&'a str>,
}

/// A vehicle ordered in a dispatch: its state at planning time and what it accepted.
#[derive(Clone, Debug)]
struct Slot {
    vehicle: Vehicle,
    accepted_kw: f64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
enum Answer {
    Pending,
    Accepted,
    Rejected,
    TimedOut,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    Waiting { deadline: Timestamp },
    AwaitingFallback,
    Done,
}

/// Why an ACK was ignored (recorded as `InputRejected`).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum AckIgnored {
    /// No order in flight or recently settled has this id.
    #[error("field `order_id` names no order of this vehicle (`{0}`)")]
    UnknownOrder(String),
    /// The order belongs to another vehicle (the answer says no more than for an unknown
    /// order: a sender learns nothing about other vehicles).
    #[error("field `order_id` names no order of this vehicle (`{order_id}`)")]
    WrongVehicle {
        /// The order.
        order_id: String,
        /// Its vehicle.
        owner: VehicleId,
    },
    /// The order's deadline passed (or its dispatch settled) before the ACK arrived.
    #[error("order `{0}` was already settled: the ACK came after its deadline")]
    Late(String),
    /// The order was already answered.
    #[error("order `{0}` was already answered")]
    AlreadyAnswered(String),
}

/// One dispatch in flight.
#[derive(Debug)]
pub struct Dispatch {
    id: String,
    signal: Signal,
    strategy: StrategyKind,
    fallback: FallbackKind,
    no_fallback_segments: BTreeSet<String>,
    region: String,
    ack_timeout_ms: i64,
    max_attempts: u32,
    attempt: u32,
    state: State,
    orders: Vec<(Order, Answer)>,
    index: HashMap<String, usize>,
    slots: HashMap<VehicleId, Slot>,
    allocated_kw: f64,
    acknowledged_kw: f64,
    counts: VehicleCounts,
    interrupted: Option<String>,
}

impl Dispatch {
    /// Its id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The signal it serves.
    pub fn signal(&self) -> &Signal {
        &self.signal
    }

    /// Its ACK deadline, while it waits for ACKs.
    pub fn deadline(&self) -> Option<Timestamp> {
        match self.state {
            State::Waiting { deadline } => Some(deadline),
            _ => None,
        }
    }

    /// Whether it has settled.
    pub fn is_done(&self) -> bool {
        self.state == State::Done
    }

    /// Ids of its orders.
    pub fn order_ids(&self) -> impl Iterator<Item = &str> {
        self.orders.iter().map(|(o, _)| o.order_id.as_str())
    }

    fn event(&self, now: Timestamp, kind: EventKind, actor: &str) -> Event {
        Event::new(now, kind, actor).correlation(&self.id).region(Some(&self.region))
    }

    /// Starts the next attempt with `orders` (none = settle at once).
    fn send(&mut self, now: Timestamp, orders: Vec<Order>) -> Step {
        self.attempt += 1;
        let mut step = Step::default();
        for o in orders {
            step.events.push(self.event(now, EventKind::OrderSent, "dispatcher").payload(&o));
            self.allocated_kw += o.power_kw;
            self.index.insert(o.order_id.clone(), self.orders.len());
            self.orders.push((o.clone(), Answer::Pending));
            step.orders.push(o);
        }
        if step.orders.is_empty() {
            step.merge(self.settle(now));
        } else {
            let deadline = now.plus_millis(self.ack_timeout_ms);
            self.state = State::Waiting { deadline };
            step.deadline = Some(deadline);
        }
        step
    }

    /// Takes an ACK from `from` (the vehicle whose topic it came on).
    pub fn on_ack(&mut self, now: Timestamp, from: &VehicleId, ack: &Ack) -> Result<Step, AckIgnored> {
        let i = *self.index.get(&ack.order_id).ok_or_else(|| AckIgnored::UnknownOrder(ack.order_id.clone()))?;
        let (order, answer) = &self.orders[i];
        if order.vehicle_id != *from {
            return Err(AckIgnored::WrongVehicle { order_id: ack.order_id.clone(), owner: order.vehicle_id.clone() });
        }
        let in_time =
            matches!(self.state, State::Waiting { deadline } if now <= deadline) && order.attempt == self.attempt;
        match answer {
            Answer::Pending if in_time => {}
            Answer::Pending | Answer::TimedOut => return Err(AckIgnored::Late(ack.order_id.clone())),
            Answer::Accepted | Answer::Rejected => return Err(AckIgnored::AlreadyAnswered(ack.order_id.clone())),
        }
        let power = order.power_kw;
        let answer = match ack.status {
            AckStatus::Accepted => {
                self.acknowledged_kw += power;
                self.counts.accepted += 1;
                if let Some(slot) = self.slots.get_mut(from) {
                    slot.accepted_kw += power;
                }
                Answer::Accepted
            }
            AckStatus::Rejected => {
                self.counts.rejected += 1;
                Answer::Rejected
            }
        };
        self.orders[i].1 = answer;
        let mut step = Step::default();
        step.events.push(self.event(now, EventKind::AckReceived, &format!("vehicle/{from}")).payload(json!({
            "order_id": ack.order_id,
            "vehicle_id": from,
            "status": ack.status,
            "reason": ack.reason,
            "power_kw": power,
            "attempt": self.attempt,
        })));
        if !self.orders.iter().any(|(o, a)| *a == Answer::Pending && o.attempt == self.attempt) {
            step.merge(self.settle(now));
        }
        Ok(step)
    }

    /// The deadline passed: pending orders time out, are cancelled, and the attempt settles.
    pub fn on_deadline(&mut self, now: Timestamp) -> Step {
        if !matches!(self.state, State::Waiting { .. }) {
            return Step::default();
        }
        let mut step = self.cancel_pending(now, "no answer by the ACK deadline");
        step.merge(self.settle(now));
        step
    }

    /// Every pending order times out and is withdrawn (`OrderCancelled`, with `reason`).
    fn cancel_pending(&mut self, now: Timestamp, reason: &str) -> Step {
        let mut step = Step::default();
        for i in 0..self.orders.len() {
            if self.orders[i].1 != Answer::Pending {
                continue;
            }
            self.orders[i].1 = Answer::TimedOut;
            self.counts.timed_out += 1;
            let o = &self.orders[i].0;
            step.events.push(self.event(now, EventKind::AckTimedOut, "supervisor").payload(json!({
                "order_id": o.order_id, "vehicle_id": o.vehicle_id, "power_kw": o.power_kw, "attempt": o.attempt,
            })));
            let cancel = OrderCancel::of(&o.order_id, &self.id, &o.vehicle_id, reason, now);
            step.events.push(self.event(now, EventKind::OrderCancelled, "supervisor").payload(&cancel));
            step.cancels.push(cancel);
        }
        step
    }

    /// The orders of the current attempt were published at `now`: their ACK window starts.
    pub fn published(&mut self, now: Timestamp) {
        if let State::Waiting { deadline } = &mut self.state {
            *deadline = (*deadline).max(now.plus_millis(self.ack_timeout_ms));
        }
    }

    fn residual_kw(&self) -> f64 {
        (self.signal.power_kw - self.acknowledged_kw).max(0.0)
    }

    /// The current attempt is over: ask for a fallback or complete. The request names the
    /// vehicles that accepted (outside `fallback: false` segments); the [`Engine`] fills in
    /// what each still has free and the room of the shared limits.
    fn settle(&mut self, now: Timestamp) -> Step {
        let residual_kw = self.residual_kw();
        let wants_fallback =
            residual_kw >= MIN_ORDER_KW && self.attempt < self.max_attempts && self.fallback != FallbackKind::Noop;
        if wants_fallback {
            let mut candidates: Vec<(Vehicle, f64)> = self
                .slots
                .values()
                .filter(|s| s.accepted_kw > 0.0)
                .filter(|s| s.vehicle.segment.as_ref().is_none_or(|seg| !self.no_fallback_segments.contains(seg)))
                .map(|s| (s.vehicle.clone(), 0.0))
                .collect();
            candidates.sort_by(|a, b| a.0.id.cmp(&b.0.id));
            if !candidates.is_empty() {
                self.state = State::AwaitingFallback;
                let request = FallbackRequest {
                    dispatch_id: self.id.clone(),
                    residual_kw,
                    candidates,
                    limits: LimitSet::default(),
                };
                return Step { fallback: Some(request), ..Step::default() };
            }
        }
        self.complete(now)
    }

    /// The fallback's answer to this dispatch's [`FallbackRequest`].
    pub fn apply_fallback(&mut self, now: Timestamp, request: &FallbackRequest, realloc: &Reallocation) -> Step {
        if self.state != State::AwaitingFallback {
            return Step::default();
        }
        let mut orders = Vec::new();
        let mut rows = Vec::new();
        for (i, (v, remaining)) in request.candidates.iter().enumerate() {
            let power = realloc.power_kw.get(i).copied().unwrap_or(0.0).clamp(0.0, *remaining);
            rows.push(json!({"vehicle_id": v.id, "soc": v.soc, "remaining_kw": remaining, "power_kw": power,
                             "skipped": realloc.skipped.contains(&i)}));
            if power >= MIN_ORDER_KW {
                orders.push(Order {
                    order_id: format!("{}-{}-{}", self.id, self.attempt + 1, orders.len() + 1),
                    dispatch_id: self.id.clone(),
                    vehicle_id: v.id.clone(),
                    direction: self.signal.direction.order_direction(),
                    power_kw: power,
                    start: self.signal.start,
                    until: self.signal.end(),
                    attempt: self.attempt + 1,
                });
            }
        }
        let placed: f64 = orders.iter().map(|o| o.power_kw).sum();
        let mut step = Step::default();
        step.events.push(self.event(now, EventKind::FallbackApplied, "fallback").payload(json!({
            "fallback": self.fallback,
            "attempt": self.attempt + 1,
            "residual_kw": request.residual_kw,
            "reallocated_kw": placed,
            "candidates": rows,
        })));
        if orders.is_empty() {
            step.merge(self.complete(now));
        } else {
            step.merge(self.send(now, orders));
        }
        step
    }

    /// Settles at once, without fallback (shutdown, replacement): pending orders time out
    /// and are cancelled with `why` as the reason.
    pub fn interrupt(&mut self, now: Timestamp, why: &str) -> Step {
        if self.state == State::Done {
            return Step::default();
        }
        self.max_attempts = self.attempt;
        self.interrupted = Some(why.to_owned());
        let mut step = self.cancel_pending(now, why);
        step.merge(self.complete(now));
        step
    }

    fn complete(&mut self, now: Timestamp) -> Step {
        self.state = State::Done;
        let outcome = DispatchOutcome {
            dispatch_id: self.id.clone(),
            signal_id: self.signal.id.clone(),
            kind: self.signal.kind,
            direction: self.signal.direction,
            requested_kw: self.signal.power_kw,
            allocated_kw: self.allocated_kw,
            acknowledged_kw: self.acknowledged_kw,
            shortfall_kw: self.residual_kw(),
            strategy: self.strategy,
            fallback: self.fallback,
            vehicles: self.counts,
            completed_at: now,
        };
        let event = self.event(now, EventKind::DispatchCompleted, "supervisor").payload(CompletedPayload {
            outcome: &outcome,
            attempts: self.attempt,
            interrupted: self.interrupted.as_deref(),
        });
        // An interrupted dispatch says nothing about the vehicles that had no time to answer.
        let answers = match self.interrupted {
            Some(_) => Vec::new(),
            None => self.orders.iter().map(|(o, a)| (o.vehicle_id.clone(), now, *a == Answer::Accepted)).collect(),
        };
        Step { events: vec![event], outcomes: vec![outcome], answers, ..Step::default() }
    }
}

/// The dispatches in flight, with their order index and deadlines.
#[derive(Debug, Default)]
pub struct DispatchBook {
    live: HashMap<String, Dispatch>,
    orders: HashMap<String, String>,
    settled: HashSet<String>,
    settled_order: VecDeque<String>,
}

/// Settled dispatches remembered, so that a late ACK to one of their orders is called late
/// rather than unknown. Order ids are `<dispatch id>-<attempt>-<n>`, so remembering the
/// dispatch is enough (a few dozen bytes a dispatch, not one string per order).
const SETTLED_DISPATCHES_KEPT: usize = 10_000;

/// The dispatch an order id belongs to, by the id's shape.
fn dispatch_of(order_id: &str) -> Option<&str> {
    let mut parts = order_id.rsplitn(3, '-');
    let (_n, _attempt) = (parts.next()?, parts.next()?);
    parts.next()
}

impl DispatchBook {
    /// An empty book.
    pub fn new() -> Self {
        Self::default()
    }

    /// Dispatches in flight.
    pub fn len(&self) -> usize {
        self.live.len()
    }

    /// Whether nothing is in flight.
    pub fn is_empty(&self) -> bool {
        self.live.is_empty()
    }

    /// Ids of the dispatches in flight.
    pub fn ids(&self) -> impl Iterator<Item = &str> {
        self.live.keys().map(String::as_str)
    }

    /// Adds a planned dispatch (one that settled at planning is dropped at once).
    pub fn insert(&mut self, dispatch: Dispatch) {
        if dispatch.is_done() {
            return;
        }
        for id in dispatch.order_ids() {
            self.orders.insert(id.to_owned(), dispatch.id.clone());
        }
        self.live.insert(dispatch.id.clone(), dispatch);
    }

    /// The earliest deadline in flight.
    pub fn next_deadline(&self) -> Option<Timestamp> {
        self.live.values().filter_map(Dispatch::deadline).min()
    }

    /// Routes an ACK to its dispatch.
    pub fn on_ack(&mut self, now: Timestamp, from: &VehicleId, ack: &Ack) -> Result<Step, AckIgnored> {
        let Some(dispatch_id) = self.orders.get(&ack.order_id) else {
            return Err(if dispatch_of(&ack.order_id).is_some_and(|d| self.settled.contains(d)) {
                AckIgnored::Late(ack.order_id.clone())
            } else {
                AckIgnored::UnknownOrder(ack.order_id.clone())
            });
        };
        let dispatch_id = dispatch_id.clone();
        let step = self
            .live
            .get_mut(&dispatch_id)
            .ok_or_else(|| AckIgnored::Late(ack.order_id.clone()))?
            .on_ack(now, from, ack)?;
        self.after(&dispatch_id);
        Ok(step)
    }

    /// Settles every dispatch whose deadline is at or before `now`.
    pub fn on_timeout(&mut self, now: Timestamp) -> Vec<Step> {
        let mut due: Vec<String> =
            self.live.values().filter(|d| d.deadline().is_some_and(|t| t <= now)).map(|d| d.id.clone()).collect();
        due.sort();
        let mut steps = Vec::new();
        for id in due {
            if let Some(d) = self.live.get_mut(&id) {
                steps.push(d.on_deadline(now));
            }
            self.after(&id);
        }
        steps
    }

    /// The fallback's answer for `request`.
    pub fn apply_fallback(&mut self, now: Timestamp, request: &FallbackRequest, realloc: &Reallocation) -> Step {
        let Some(d) = self.live.get_mut(&request.dispatch_id) else { return Step::default() };
        let step = d.apply_fallback(now, request, realloc);
        for o in &step.orders {
            self.orders.insert(o.order_id.clone(), request.dispatch_id.clone());
        }
        self.after(&request.dispatch_id);
        step
    }

    /// Whether `dispatch_id` is in flight.
    pub fn contains(&self, dispatch_id: &str) -> bool {
        self.live.contains_key(dispatch_id)
    }

    /// The orders of `dispatch_id`'s current attempt were published at `now`.
    pub fn published(&mut self, dispatch_id: &str, now: Timestamp) {
        if let Some(d) = self.live.get_mut(dispatch_id) {
            d.published(now);
        }
    }

    /// Settles one dispatch now, without fallback (it was replaced).
    pub fn interrupt(&mut self, now: Timestamp, dispatch_id: &str, why: &str) -> Option<Step> {
        let step = self.live.get_mut(dispatch_id)?.interrupt(now, why);
        self.after(dispatch_id);
        Some(step)
    }

    /// Settles everything in flight now, without fallback (graceful shutdown).
    pub fn shutdown(&mut self, now: Timestamp, why: &str) -> Vec<Step> {
        let mut ids: Vec<String> = self.live.keys().cloned().collect();
        ids.sort();
        ids.iter().filter_map(|id| self.interrupt(now, id, why)).collect()
    }

    /// Drops a settled dispatch, remembering its orders as settled.
    fn after(&mut self, dispatch_id: &str) {
        if !self.live.get(dispatch_id).is_some_and(Dispatch::is_done) {
            return;
        }
        let Some(d) = self.live.remove(dispatch_id) else { return };
        for id in d.order_ids() {
            self.orders.remove(id);
        }
        self.settled.insert(d.id.clone());
        self.settled_order.push_back(d.id);
        while self.settled_order.len() > SETTLED_DISPATCHES_KEPT {
            if let Some(old) = self.settled_order.pop_front() {
                self.settled.remove(&old);
            }
        }
    }
}

/// The dispatch core: the one owner of the fleet view, the dispatches in flight and the
/// commitment ledger. Every input (a signal, a vehicle state, an ACK, a deadline, a
/// fallback's answer, shutdown) goes through it, so that what is committed is always what
/// was ordered and not yet released, and every plan sees it.
pub struct Engine {
    planner: Planner,
    book: DispatchBook,
    ledger: Ledger,
    /// Signal id -> dispatch id, for signals that may still be replaced (in flight or with
    /// commitments in force).
    streams: BTreeMap<String, String>,
}

impl Engine {
    /// An engine around `planner`, with nothing in flight or committed.
    pub fn new(planner: Planner) -> Self {
        Self { planner, book: DispatchBook::new(), ledger: Ledger::new(), streams: BTreeMap::new() }
    }

    /// The planner (fleet view, strategy, memory of signals).
    pub fn planner(&self) -> &Planner {
        &self.planner
    }

    /// The planner, to restore what the log remembers or to set weights.
    pub fn planner_mut(&mut self) -> &mut Planner {
        &mut self.planner
    }

    /// The commitments in force.
    pub fn ledger(&self) -> &Ledger {
        &self.ledger
    }

    /// The dispatches in flight.
    pub fn book(&self) -> &DispatchBook {
        &self.book
    }

    /// The earliest ACK deadline in flight.
    pub fn next_deadline(&self) -> Option<Timestamp> {
        self.book.next_deadline()
    }

    /// The flexibility still free now.
    pub fn capacity(&mut self, now: Timestamp) -> Capacity {
        self.ledger.expire(now);
        self.planner.capacity(now, &self.ledger)
    }

    /// Restores a commitment the log says is in force (an accepted order whose window has
    /// not ended), so that new plans respect it after a restart.
    pub fn restore(&mut self, signal_id: &str, order: &Order, accepted: bool) {
        let mut c = Commitment::of(order);
        c.accepted = accepted;
        self.streams.insert(signal_id.to_owned(), order.dispatch_id.clone());
        self.ledger.commit(c);
    }

    /// Plans `signal` against what is free. A replacement (`replaces`) first settles the
    /// dispatch it replaces and withdraws that dispatch's orders, in the same step. A
    /// refused signal changes nothing.
    pub fn on_signal(&mut self, now: Timestamp, signal: Signal) -> Result<Step, SignalRefused> {
        self.ledger.expire(now);
        let (book, ledger) = (&self.book, &self.ledger);
        self.streams.retain(|_, d| book.contains(d) || ledger.has_dispatch(d));
        self.planner.admit(now, &signal)?;
        let replaced = match &signal.replaces {
            None => None,
            Some(old) => Some(self.replaceable(old).ok_or_else(|| SignalRefused::UnknownReplacement(old.clone()))?),
        };
        if self.book.len() >= self.planner.cfg.max_in_flight {
            return Err(SignalRefused::Busy(self.book.len()));
        }
        let mut step = Step::default();
        if let (Some(dispatch_id), Some(old)) = (replaced, signal.replaces.as_ref()) {
            step.merge(self.withdraw(now, &dispatch_id, &format!("replaced by signal {}", signal.id)));
            self.streams.remove(old);
        }
        let signal_id = signal.id.clone();
        let (dispatch, first) = self.planner.plan(now, signal, &self.ledger);
        self.streams.insert(signal_id, dispatch.id().to_owned());
        self.book.insert(dispatch);
        step.merge(first);
        self.commit(&step.orders);
        Ok(step)
    }

    /// The dispatch of signal `signal_id`, if it can still be replaced.
    fn replaceable(&self, signal_id: &str) -> Option<String> {
        let d = self.streams.get(signal_id)?;
        (self.book.contains(d) || self.ledger.has_dispatch(d)).then(|| d.clone())
    }

    /// Settles `dispatch_id` if it is in flight and withdraws every order of it still
    /// committed: pending ones through the dispatch (they count as not answered), accepted
    /// ones here.
    fn withdraw(&mut self, now: Timestamp, dispatch_id: &str, why: &str) -> Step {
        let mut step = self.book.interrupt(now, dispatch_id, why).unwrap_or_default();
        self.release(&step.cancels);
        for order_id in self.ledger.orders_of(dispatch_id) {
            if let Some(c) = self.ledger.release(&order_id) {
                let cancel = OrderCancel::of(&c.order_id, &c.dispatch_id, &c.vehicle_id, why, now);
                step.events.push(self.cancel_event(now, &cancel));
                step.cancels.push(cancel);
            }
        }
        step
    }

    /// Closes `dispatch_id` as failed (its step could not be recorded): it settles now and
    /// everything it committed is released. `None` when nothing of it is left.
    pub fn abort(&mut self, now: Timestamp, dispatch_id: &str, why: &str) -> Option<Step> {
        if !self.book.contains(dispatch_id) && !self.ledger.has_dispatch(dispatch_id) {
            return None;
        }
        Some(self.withdraw(now, dispatch_id, why))
    }

    fn cancel_event(&self, now: Timestamp, cancel: &OrderCancel) -> Event {
        Event::new(now, EventKind::OrderCancelled, "dispatcher")
            .correlation(&cancel.dispatch_id)
            .region(Some(&self.planner.cfg.region))
            .payload(cancel)
    }

    fn commit(&mut self, orders: &[Order]) {
        for o in orders {
            self.ledger.commit(Commitment::of(o));
        }
    }

    fn release(&mut self, cancels: &[OrderCancel]) {
        for c in cancels {
            self.ledger.release(&c.order_id);
        }
    }

    /// Applies a vehicle's state (`None` = it left). A vehicle that leaves releases what it
    /// had committed (the `VehicleLost` event lists those orders).
    pub fn on_state(&mut self, now: Timestamp, id: VehicleId, state: Option<Vehicle>) -> (FleetChange, Option<Event>) {
        let lost = state.is_none();
        let (change, event) = self.planner.apply_state(now, id.clone(), state);
        if !lost || change != FleetChange::Lost {
            return (change, event);
        }
        let released: Vec<String> = self.ledger.release_vehicle(&id).into_iter().map(|c| c.order_id).collect();
        let event = Event::new(now, EventKind::VehicleLost, format!("vehicle/{id}"))
            .region(Some(&self.planner.cfg.region))
            .payload(json!({ "vehicle_id": id, "released_orders": released }));
        (change, Some(event))
    }

    /// Takes an ACK from `from` (the vehicle whose topic it came on).
    pub fn on_ack(&mut self, now: Timestamp, from: &VehicleId, ack: &Ack) -> Result<Step, AckIgnored> {
        let mut step = self.book.on_ack(now, from, ack)?;
        match ack.status {
            AckStatus::Accepted => {
                self.ledger.accept(&ack.order_id);
            }
            AckStatus::Rejected => {
                self.ledger.release(&ack.order_id);
            }
        }
        self.settled(now, &mut step);
        Ok(step)
    }

    /// Settles every attempt whose deadline is at or before `now`: unanswered orders are
    /// cancelled (and released) before any fallback runs.
    pub fn on_timeout(&mut self, now: Timestamp) -> Vec<Step> {
        self.ledger.expire(now);
        let mut steps = self.book.on_timeout(now);
        for step in &mut steps {
            self.release(&step.cancels);
            self.settled(now, step);
        }
        steps
    }

    /// The orders of `dispatch_id`'s current attempt were published at `now`: its ACK
    /// window starts now.
    pub fn published(&mut self, dispatch_id: &str, now: Timestamp) {
        self.book.published(dispatch_id, now);
    }

    /// Fills in a fallback request with what each candidate still has free (its current
    /// state less everything committed on it) and the free room of the shared limits.
    fn settled(&mut self, now: Timestamp, step: &mut Step) {
        let Some(req) = step.fallback.as_mut() else { return };
        let Some(d) = self.book.live.get(&req.dispatch_id) else { return };
        let signal = d.signal();
        let (from, to, direction, duration) = (signal.start, signal.end(), signal.direction, signal.duration_s as f64);
        let candidates: Vec<(Vehicle, f64)> = std::mem::take(&mut req.candidates)
            .into_iter()
            .filter_map(|(planned, _)| {
                let v = self.planner.fleet.get(&planned.id)?;
                let committed = self.ledger.committed_kw(&v.id, direction, from, to);
                let free = v.effective_capacity(direction, committed, duration);
                (free >= MIN_ORDER_KW).then(|| (v.clone(), free))
            })
            .collect();
        let cands: Vec<Candidate<'_>> = candidates
            .iter()
            .map(|(v, free)| Candidate { vehicle: v, capacity_kw: *free, participation: 0.0 })
            .collect();
        let mut limits = LimitSet::new(&self.planner.cfg.limits, direction, &cands);
        self.ledger.reduce(&mut limits, &self.planner.fleet, direction, from, to);
        drop(cands);
        req.candidates = candidates;
        req.limits = limits;
        let _ = now;
    }

    /// The fallback's answer for `request`; its orders are committed.
    pub fn apply_fallback(&mut self, now: Timestamp, request: &FallbackRequest, realloc: &Reallocation) -> Step {
        let step = self.book.apply_fallback(now, request, realloc);
        self.commit(&step.orders);
        step
    }

    /// Graceful shutdown: every dispatch in flight settles now; its unanswered orders are
    /// cancelled. Accepted orders stay in force until their window ends (the vehicles were
    /// told to deliver until then); a restart restores them as commitments.
    pub fn shutdown(&mut self, now: Timestamp, why: &str) -> Vec<Step> {
        let steps = self.book.shutdown(now, why);
        for step in &steps {
            self.release(&step.cancels);
        }
        steps
    }
}

#[cfg(test)]
mod tests;
