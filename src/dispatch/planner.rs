//! The planner: the fleet view, the filter, the strategy, the fairness scores and the
//! memory of signals; it turns an admitted signal into a dispatch planned against the
//! commitment ledger.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};

use serde::Serialize;

use crate::allocation::filter::{Exclusion, VehicleFilter};
use crate::allocation::limits::LimitSet;
use crate::allocation::{AllocationRequest, Candidate, Dispatcher, MIN_ORDER_KW};
use crate::bounded::BoundedSet;
use crate::events::payload::{
    fleet_fingerprint, ConstraintApplied, FleetRef, LoadRow, PlanCreated, SignalReceived, VehicleLost, VehicleState,
};
use crate::events::Event;
use crate::learning::prediction::PredictionEngine;
use crate::model::{Attempt, Direction, DispatchId, Signal, Vehicle, VehicleCounts, VehicleId};
use crate::time::Timestamp;

use super::ledger::Ledger;
use super::machine::{Dispatch, Slot, State};
use super::{EngineConfig, SignalRefused, Step};

/// Dispatches whose first-attempt vehicles are kept for the fairness scores: after this
/// many, a score has decayed below what the planner keeps (0.9^100 < 1e-3).
pub const PARTICIPATION_DISPATCHES: usize = 100;

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
    /// Power the eligible fleet can deliver (discharge), kW, for a default-length signal
    /// (to the watt on the wire).
    #[serde(serialize_with = "crate::model::serialize_watts")]
    pub up_kw: f64,
    /// Power it can absorb (charge), kW.
    #[serde(serialize_with = "crate::model::serialize_watts")]
    pub down_kw: f64,
    /// Vehicles plugged in and eligible in at least one direction.
    pub vehicles: usize,
    /// When computed.
    pub at: Timestamp,
}

/// Owns the fleet view, the filter, the strategy and the fairness scores; plans dispatches.
pub struct Planner {
    pub(super) cfg: EngineConfig,
    pub(super) fleet: BTreeMap<VehicleId, Vehicle>,
    /// When each vehicle's state in `fleet` was taken: its battery has given the energy its
    /// commitments drew since then, which its SoC does not show yet.
    pub(super) state_at: BTreeMap<VehicleId, Timestamp>,
    filter: Box<dyn VehicleFilter>,
    strategy: Box<dyn Dispatcher>,
    participation: HashMap<VehicleId, f64>,
    /// The vehicles each of the last [`PARTICIPATION_DISPATCHES`] dispatches ordered first:
    /// the scores are exactly theirs, as the log's projection rebuilds them.
    recent: VecDeque<Vec<VehicleId>>,
    prediction: Option<PredictionEngine>,
    /// Signal ids seen, bounded: the oldest are forgotten first.
    seen: BoundedSet<String>,
    highest_term: Option<u64>,
    dispatches: u64,
}

/// A default signal length for [`Planner::capacity`], seconds.
pub const CAPACITY_HORIZON_S: u64 = 900;

/// SoC steps smaller than this (a fraction of the battery: 0.5 %) are not a new state of
/// a known vehicle: they are neither planned with nor recorded (see
/// [`Vehicle::same_for_planning`]).
pub const SOC_DEADBAND: f64 = 0.005;

impl Planner {
    /// A planner with no vehicles.
    pub fn new(cfg: EngineConfig, filter: Box<dyn VehicleFilter>, strategy: Box<dyn Dispatcher>) -> Self {
        let seen = BoundedSet::new(cfg.remembered_signals);
        Self {
            cfg,
            fleet: BTreeMap::new(),
            state_at: BTreeMap::new(),
            filter,
            strategy,
            participation: HashMap::new(),
            recent: VecDeque::new(),
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
        self.seen.insert(id.to_owned());
    }

    /// The signal ids remembered, oldest first.
    pub fn seen_signals(&self) -> impl Iterator<Item = &str> {
        self.seen.iter().map(String::as_str)
    }

    /// The number of the last dispatch planned (`d<ms>-<n>`).
    pub fn dispatch_count(&self) -> u64 {
        self.dispatches
    }

    /// Forgets a signal id (its dispatch could not be recorded), so that it is no duplicate.
    pub fn forget_signal(&mut self, id: &str) {
        self.seen.remove(id);
    }

    /// Uses `engine` to predict the availability of vehicles that do not state theirs.
    pub fn set_prediction(&mut self, engine: PredictionEngine) {
        self.prediction = Some(engine);
    }

    /// Records what vehicles answered (a settled dispatch's [`Step::answers`]); the
    /// histories of vehicles not heard of for 30 days are dropped.
    pub fn observe_answers(&mut self, answers: &[(VehicleId, Timestamp, bool)]) {
        if let Some(p) = self.prediction.as_mut() {
            p.observe_answers(answers);
        }
    }

    /// Replaces the score weights of one signal type (the tuner's output).
    pub fn set_weights(&mut self, kind: crate::model::SignalType, weights: crate::allocation::Weights) {
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
    /// Only the last [`PARTICIPATION_DISPATCHES`] dispatches count: the oldest one's share
    /// (`decay^N` by now) is taken off again as it leaves the window, so that the scores
    /// are those the projection rebuilds from the log (the auditor re-runs plans with them).
    fn note_participation<'v>(&mut self, ordered: impl Iterator<Item = &'v VehicleId>) {
        let decay = self.cfg.participation_decay;
        for p in self.participation.values_mut() {
            *p *= decay;
        }
        let ordered: Vec<VehicleId> = ordered.cloned().collect();
        for v in &ordered {
            *self.participation.entry(v.clone()).or_insert(0.0) += 1.0;
        }
        self.recent.push_back(ordered);
        if self.recent.len() > PARTICIPATION_DISPATCHES {
            let share = decay.powi(PARTICIPATION_DISPATCHES as i32);
            for v in self.recent.pop_front().unwrap_or_default() {
                if let Some(p) = self.participation.get_mut(&v) {
                    *p -= share;
                }
            }
        }
        self.participation.retain(|_, p| *p > 1e-12);
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

    /// Knows `vehicle` as the log last recorded it (start-up; no event).
    pub fn restore_vehicle(&mut self, vehicle: Vehicle, at: Option<Timestamp>) {
        if let Some(at) = at {
            self.state_at.insert(vehicle.id.clone(), at);
        }
        self.fleet.insert(vehicle.id.clone(), vehicle);
    }

    /// One vehicle's latest state.
    pub fn vehicle(&self, id: &VehicleId) -> Option<&Vehicle> {
        self.fleet.get(id)
    }

    /// Applies a vehicle's state (`None` = it left); returns the change and the event to
    /// record: `VehicleDiscovered`, `VehicleStateChanged` or `VehicleLost`. A state that
    /// differs from the known one only by a SoC step below [`SOC_DEADBAND`] changes nothing
    /// and is not recorded, so the fleet a plan sees is always the fleet the log holds.
    pub fn apply_state(
        &mut self,
        now: Timestamp,
        id: VehicleId,
        state: Option<Vehicle>,
    ) -> (FleetChange, Option<Event>) {
        let actor = format!("vehicle/{id}");
        let region = Some(self.cfg.region.as_str());
        match state {
            Some(v) => {
                let change = match self.fleet.get(&id) {
                    None => FleetChange::Discovered,
                    Some(known) if known.same_for_planning(&v, SOC_DEADBAND) => return (FleetChange::Unchanged, None),
                    Some(_) => FleetChange::Updated,
                };
                let payload = VehicleState { vehicle: v, discovered: change == FleetChange::Discovered };
                let event = Event::of(now, actor, &payload).region(region);
                self.state_at.insert(id.clone(), now);
                self.fleet.insert(id, payload.vehicle);
                (change, Some(event))
            }
            None => match self.fleet.remove(&id) {
                Some(_) => {
                    self.participation.remove(&id);
                    self.state_at.remove(&id);
                    for ordered in &mut self.recent {
                        ordered.retain(|v| *v != id);
                    }
                    let lost = VehicleLost { vehicle_id: id, released_orders: Vec::new() };
                    (FleetChange::Lost, Some(Event::of(now, actor, &lost).region(region)))
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
            unknown_fields: Vec::new(),
        };
        let mut cap = Capacity { up_kw: 0.0, down_kw: 0.0, vehicles: 0, at: now };
        let predicted = self.predicted(now);
        let mut eligible: BTreeSet<&VehicleId> = BTreeSet::new();
        for direction in [Direction::Up, Direction::Down] {
            let sig = probe(direction);
            let (candidates, _) = self.candidates(now, &sig, ledger, &predicted);
            let caps: Vec<f64> = candidates.iter().map(|c| c.capacity_kw).collect();
            let limits = self.limits(&sig, &candidates, ledger);
            let total: f64 = caps.iter().sum();
            // The most the limits allow, as every dispatch delivers it: the greedy fill,
            // repaired (the LP) where overlapping rows leave it short.
            let ones = vec![1.0; caps.len()];
            let mut power = crate::allocation::greedy_fill(&ones, &caps, total, &limits);
            let mut lp = crate::allocation::lp::LpDispatcher::default();
            crate::allocation::lp::fill_to_max(&mut lp, &mut power, &caps, total, &limits, &ones);
            // To the watt: a prediction that drifts by micro-watts is not a new capacity
            // (and never `-0`).
            let free = (power.iter().sum::<f64>() * 1000.0).round() / 1000.0 + 0.0;
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
        now: Timestamp,
        signal: &Signal,
        ledger: &Ledger,
        predicted: &'a HashMap<VehicleId, Vehicle>,
    ) -> (Vec<Candidate<'a>>, Vec<(&'a VehicleId, Exclusion)>) {
        let fleet = (&self.fleet, &self.state_at);
        candidates(now, fleet, self.filter.as_ref(), &self.participation, signal, ledger, predicted)
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
        if self.seen.contains(signal.id.as_str()) {
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
    pub(super) fn plan(&mut self, now: Timestamp, signal: Signal, ledger: &Ledger) -> (Dispatch, Step) {
        self.seen.insert(signal.id.clone());
        if let Some(term) = signal.leader_term {
            self.remember_term(term);
        }
        self.dispatches += 1;
        let dispatch_id = DispatchId::new(now, self.dispatches);
        let region = Some(self.cfg.region.as_str());
        let ev = |e: Event| e.correlation(&dispatch_id).region(region);

        let predicted = self.predicted(now);
        let (candidates, excluded) = candidates(
            now,
            (&self.fleet, &self.state_at),
            self.filter.as_ref(),
            &self.participation,
            &signal,
            ledger,
            &predicted,
        );
        let capacity_kw: f64 = candidates.iter().map(|c| c.capacity_kw).sum();
        let target_kw = signal.power_kw;
        let mut limits = LimitSet::new(&self.cfg.limits, signal.direction, &candidates);
        ledger.reduce(&mut limits, &self.fleet, signal.direction, signal.start, signal.end());
        let req = AllocationRequest { signal: &signal, now, target_kw, candidates: &candidates, limits: &limits };
        let mut allocation = self.strategy.allocate(&req);
        // Orders are whole watts (the wire carries what the ledger commits).
        allocation.power_kw.resize(candidates.len(), 0.0);
        let caps: Vec<f64> = candidates.iter().map(|c| c.capacity_kw).collect();
        crate::allocation::repair::to_watts(&mut allocation.power_kw, &caps, &limits);

        let mut events = vec![
            ev(Event::of(now, "dispatcher", &SignalReceived { signal: signal.clone() })),
            ev(Event::of(
                now,
                "dispatcher",
                &ConstraintApplied {
                    eligible: candidates.len(),
                    excluded: ConstraintApplied::by_reason(excluded.iter().map(|(id, why)| ((*id).clone(), *why))),
                    capacity_kw,
                    target_kw,
                    target_capped_to_capacity: capacity_kw < target_kw,
                    limits: limits.rows.clone(),
                },
            )),
        ];
        let until = signal.end();
        let first = Attempt {
            dispatch_id: &dispatch_id,
            attempt: 1,
            direction: signal.direction.order_direction(),
            start: signal.start,
            until,
        };
        let mut orders = Vec::new();
        let mut slots = HashMap::new();
        for (i, c) in candidates.iter().enumerate() {
            let power = allocation.power_kw.get(i).copied().unwrap_or(0.0).clamp(0.0, c.capacity_kw);
            if power < MIN_ORDER_KW {
                continue;
            }
            orders.push(first.order(orders.len() as u32 + 1, c.vehicle.id.clone(), power));
            slots.insert(c.vehicle.id.clone(), Slot { vehicle: c.vehicle.clone(), accepted_kw: 0.0 });
        }
        let allocated_kw: f64 = orders.iter().map(|o| o.power_kw).sum();
        let powers: Vec<f64> = candidates
            .iter()
            .zip(allocation.power_kw.iter().chain(std::iter::repeat(&0.0)))
            .map(|(c, p)| if *p >= MIN_ORDER_KW { p.clamp(0.0, c.capacity_kw) } else { 0.0 })
            .collect();
        let limit_loads: Vec<LoadRow> = limits
            .loads(&powers)
            .into_iter()
            .zip(&limits.rows)
            .map(|(load_kw, row)| LoadRow { name: row.name.clone(), load_kw, cap_kw: row.cap_kw })
            .collect();
        let mut predicted_availability: Vec<VehicleId> = predicted.keys().cloned().collect();
        predicted_availability.sort();
        events.push(ev(Event::of(
            now,
            "dispatcher",
            &PlanCreated {
                dispatch_id: dispatch_id.clone(),
                signal_id: signal.id.clone(),
                strategy: allocation.strategy,
                note: allocation.note.clone(),
                solver: allocation.solver.clone(),
                weights: allocation.weights,
                predicted_availability,
                fallback: self.cfg.fallback,
                target_kw,
                allocated_kw,
                rounds: allocation.rounds,
                limit_loads,
                fleet: Some(FleetRef {
                    vehicles: self.fleet.len(),
                    fingerprint: fleet_fingerprint(self.fleet.values()),
                }),
            },
        )));

        self.note_participation(orders.iter().map(|o| &o.vehicle_id));

        let mut dispatch = Dispatch {
            id: dispatch_id,
            signal,
            planned_at: now,
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
            unrecorded: None,
        };
        let mut step = Step { events, ..Step::default() };
        step.merge(dispatch.send(now, orders));
        (dispatch, step)
    }
}

/// The candidates for `signal` among `fleet` (predicted availability applied), each with
/// the capacity `ledger` leaves it, and the vehicles excluded, with why.
fn candidates<'a>(
    now: Timestamp,
    (fleet, state_at): (&'a BTreeMap<VehicleId, Vehicle>, &BTreeMap<VehicleId, Timestamp>),
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
        let since = state_at.get(&v.id).map_or(now, |at| (*at).min(now));
        let energy = ledger.committed_kwh(&v.id, signal.direction, since);
        let capacity_kw = v.capacity_beside(signal.direction, committed, energy, signal.duration_s as f64);
        if capacity_kw <= 0.0 {
            excluded.push((&v.id, Exclusion::NoCapacity));
            continue;
        }
        let participation = participation.get(&v.id).copied().unwrap_or(0.0);
        out.push(Candidate { vehicle: v, capacity_kw, participation });
    }
    (out, excluded)
}
