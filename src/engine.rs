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

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};

use serde::Serialize;
use serde_json::json;

use crate::config::Limits;
use crate::dispatch::{AllocationRequest, Candidate, Dispatcher, MIN_ORDER_KW};
use crate::events::{Event, EventKind};
use crate::fallback::{FallbackCandidate, Reallocation};
use crate::filter::{Exclusion, VehicleFilter};
use crate::limits::LimitSet;
use crate::model::{
    Ack, AckStatus, Direction, DispatchOutcome, FallbackKind, Order, Signal, StrategyKind, Vehicle, VehicleCounts,
    VehicleId,
};
use crate::prediction::PredictionEngine;
use crate::time::Timestamp;

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
        }
    }
}

/// What the runtime must do next for a dispatch, in this order: record `events` (durably),
/// then publish `orders`, arm `deadline`, run `fallback` and publish `outcome`.
#[derive(Debug, Default)]
pub struct Step {
    /// Events to append, in order.
    pub events: Vec<Event>,
    /// Orders to publish once the events are durable.
    pub orders: Vec<Order>,
    /// When the dispatch next needs [`DispatchBook::on_timeout`], if it waits for ACKs.
    pub deadline: Option<Timestamp>,
    /// A residual to hand to the fallback; answer with [`DispatchBook::apply_fallback`].
    pub fallback: Option<FallbackRequest>,
    /// Once settled: each order's vehicle, when, and whether it accepted (for the
    /// availability prediction).
    pub answers: Vec<(VehicleId, Timestamp, bool)>,
    /// The final result, once settled.
    pub outcome: Option<DispatchOutcome>,
}

impl Step {
    fn merge(&mut self, other: Step) {
        self.events.extend(other.events);
        self.orders.extend(other.orders);
        self.deadline = other.deadline.or(self.deadline);
        self.fallback = other.fallback.or(self.fallback.take());
        self.outcome = other.outcome.or(self.outcome.take());
        self.answers.extend(other.answers);
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

    /// Records what vehicles answered (a settled dispatch's [`Step::answers`]).
    pub fn observe_answers(&mut self, answers: &[(VehicleId, Timestamp, bool)]) {
        if let Some(p) = self.prediction.as_mut() {
            for (v, at, delivered) in answers {
                p.observe(v, *at, *delivered);
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

    /// The flexibility the fleet offers now for a signal of [`CAPACITY_HORIZON_S`] seconds.
    pub fn capacity(&self, now: Timestamp) -> Capacity {
        let probe = |direction| Signal {
            id: String::new(),
            kind: crate::model::SignalType::Afrr,
            direction,
            power_kw: 1.0,
            start: now,
            duration_s: CAPACITY_HORIZON_S,
            region: None,
            leader_term: None,
        };
        let (up, down) = (probe(Direction::Up), probe(Direction::Down));
        let mut cap = Capacity { up_kw: 0.0, down_kw: 0.0, vehicles: 0, at: now };
        let predicted = self.predicted(now);
        for v in self.fleet.values().map(|v| predicted.get(&v.id).unwrap_or(v)) {
            let mut eligible = false;
            for (sig, total) in [(&up, &mut cap.up_kw), (&down, &mut cap.down_kw)] {
                if self.filter.check(v, sig).is_ok() {
                    let c = v.effective_capacity(sig.direction, 0.0, sig.duration_s as f64);
                    *total += c;
                    eligible |= c > 0.0;
                }
            }
            cap.vehicles += usize::from(eligible);
        }
        cap
    }

    /// Plans a dispatch for `signal`. On success returns the dispatch (to hand to the
    /// [`DispatchBook`]) and its first step; a refused signal changes nothing but the
    /// memory of ids (a duplicate stays a duplicate).
    pub fn plan(&mut self, now: Timestamp, signal: Signal) -> Result<(Dispatch, Step), SignalRefused> {
        if let Some(region) = signal.region.as_ref().filter(|r| **r != self.cfg.region) {
            return Err(SignalRefused::OtherRegion { got: region.clone(), ours: self.cfg.region.clone() });
        }
        if self.seen.set.contains(&signal.id) {
            return Err(SignalRefused::Duplicate(signal.id));
        }
        if let (Some(got), Some(highest)) = (signal.leader_term, self.highest_term) {
            if got < highest {
                return Err(SignalRefused::StaleTerm { got, highest });
            }
        }
        self.seen.insert(&signal.id);
        if let Some(term) = signal.leader_term {
            self.remember_term(term);
        }
        self.dispatches += 1;
        let dispatch_id = format!("d{}-{}", now.as_millis(), self.dispatches);
        let region = Some(self.cfg.region.as_str());
        let ev = |kind| Event::new(now, kind, "dispatcher").correlation(&dispatch_id).region(region);

        let mut excluded: Vec<(&VehicleId, Exclusion)> = Vec::new();
        let mut candidates: Vec<Candidate<'_>> = Vec::with_capacity(self.fleet.len());
        let predicted = self.predicted(now);
        for v in self.fleet.values().map(|v| predicted.get(&v.id).unwrap_or(v)) {
            let capacity_kw = v.effective_capacity(signal.direction, 0.0, signal.duration_s as f64);
            match self.filter.check(v, &signal) {
                Err(why) => excluded.push((&v.id, why)),
                Ok(()) if capacity_kw <= 0.0 => excluded.push((&v.id, Exclusion::NoCapacity)),
                Ok(()) => candidates.push(Candidate {
                    vehicle: v,
                    capacity_kw,
                    participation: self.participation.get(&v.id).copied().unwrap_or(0.0),
                }),
            }
        }
        let capacity_kw: f64 = candidates.iter().map(|c| c.capacity_kw).sum();
        let target_kw = signal.power_kw;
        let limits = LimitSet::new(&self.cfg.limits, signal.direction, &candidates);
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

        for p in self.participation.values_mut() {
            *p *= self.cfg.participation_decay;
        }
        for o in &orders {
            *self.participation.entry(o.vehicle_id.clone()).or_insert(0.0) += 1.0;
        }
        self.participation.retain(|_, p| *p > 1e-3);

        let mut dispatch = Dispatch {
            id: dispatch_id,
            signal,
            strategy: allocation.strategy,
            fallback: self.cfg.fallback,
            limits: self.cfg.limits.clone(),
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
        Ok((dispatch, step))
    }
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
    #[error("field `order_id` names no order of this gateway (`{0}`)")]
    UnknownOrder(String),
    /// The order belongs to another vehicle.
    #[error("order `{order_id}` was sent to vehicle `{owner}`, not to this one")]
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
    limits: Limits,
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

    /// The deadline passed: pending orders time out and the attempt settles.
    pub fn on_deadline(&mut self, now: Timestamp) -> Step {
        let mut step = Step::default();
        if !matches!(self.state, State::Waiting { .. }) {
            return step;
        }
        for i in 0..self.orders.len() {
            if self.orders[i].1 == Answer::Pending {
                self.orders[i].1 = Answer::TimedOut;
                self.counts.timed_out += 1;
                let o = &self.orders[i].0;
                let e = self.event(now, EventKind::AckTimedOut, "supervisor").payload(json!({
                    "order_id": o.order_id, "vehicle_id": o.vehicle_id, "power_kw": o.power_kw, "attempt": o.attempt,
                }));
                step.events.push(e);
            }
        }
        step.merge(self.settle(now));
        step
    }

    fn residual_kw(&self) -> f64 {
        (self.signal.power_kw - self.acknowledged_kw).max(0.0)
    }

    /// The current attempt is over: ask for a fallback or complete.
    fn settle(&mut self, now: Timestamp) -> Step {
        let residual_kw = self.residual_kw();
        let wants_fallback =
            residual_kw >= MIN_ORDER_KW && self.attempt < self.max_attempts && self.fallback != FallbackKind::Noop;
        if wants_fallback {
            let duration = self.signal.duration_s as f64;
            let direction = self.signal.direction;
            let mut candidates: Vec<(Vehicle, f64)> = self
                .slots
                .values()
                .filter(|s| s.accepted_kw > 0.0)
                .filter(|s| s.vehicle.segment.as_ref().is_none_or(|seg| !self.no_fallback_segments.contains(seg)))
                .map(|s| (s.vehicle.clone(), s.vehicle.effective_capacity(direction, s.accepted_kw, duration)))
                .filter(|(_, remaining)| *remaining >= MIN_ORDER_KW)
                .collect();
            candidates.sort_by(|a, b| a.0.id.cmp(&b.0.id));
            if !candidates.is_empty() {
                self.state = State::AwaitingFallback;
                let limits = self.fallback_room(&candidates);
                let request = FallbackRequest { dispatch_id: self.id.clone(), residual_kw, candidates, limits };
                return Step { fallback: Some(request), ..Step::default() };
            }
        }
        self.complete(now)
    }

    /// The shared rows over the fallback candidates, less the load of everything accepted.
    fn fallback_room(&self, candidates: &[(Vehicle, f64)]) -> LimitSet {
        let direction = self.signal.direction;
        let candidate = |v, kw| Candidate { vehicle: v, capacity_kw: kw, participation: 0.0 };
        let accepted: Vec<Candidate<'_>> = self.slots.values().map(|s| candidate(&s.vehicle, s.accepted_kw)).collect();
        let accepted_kw: Vec<f64> = accepted.iter().map(|c| c.capacity_kw).collect();
        let used = LimitSet::new(&self.limits, direction, &accepted);
        let used_load = used.loads(&accepted_kw);
        let asked: Vec<Candidate<'_>> = candidates.iter().map(|(v, r)| candidate(v, *r)).collect();
        let mut room = LimitSet::new(&self.limits, direction, &asked);
        for row in &mut room.rows {
            if let Some(r) = used.rows.iter().position(|u| u.name == row.name) {
                row.cap_kw = (row.cap_kw - used_load[r]).max(0.0);
            }
        }
        room
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

    /// Settles at once (shutdown): pending orders count as timed out, no fallback.
    pub fn interrupt(&mut self, now: Timestamp, why: &str) -> Step {
        if self.state == State::Done {
            return Step::default();
        }
        self.max_attempts = self.attempt;
        self.interrupted = Some(why.to_owned());
        let mut step = self.on_deadline(now);
        if self.state != State::Done {
            step.merge(self.complete(now));
        }
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
        Step { events: vec![event], outcome: Some(outcome), answers, ..Step::default() }
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
        let due: Vec<String> =
            self.live.values().filter(|d| d.deadline().is_some_and(|t| t <= now)).map(|d| d.id.clone()).collect();
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

    /// Settles everything in flight now, without fallback (graceful shutdown).
    pub fn shutdown(&mut self, now: Timestamp, why: &str) -> Vec<Step> {
        let ids: Vec<String> = self.live.keys().cloned().collect();
        let mut steps = Vec::new();
        for id in ids {
            if let Some(d) = self.live.get_mut(&id) {
                steps.push(d.interrupt(now, why));
            }
            self.after(&id);
        }
        steps
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

#[cfg(test)]
mod tests;
