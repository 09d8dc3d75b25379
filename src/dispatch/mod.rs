//! The dispatch core: what is planned, ordered, answered, withdrawn and committed.
//!
//! [`Engine`] is the one owner of dispatch state and the entry point for every input: it
//! holds the [`Planner`] (fleet view, strategy, fairness, memory of signals), the
//! [`DispatchBook`] of dispatches in flight, each a [`Dispatch`] state machine, and the
//! commitment [`ledger`]. Each call returns [`Step`]s: the events to record, then the cancels
//! and orders to publish (only once those events are durable), the ACK deadline, the
//! outcomes. The engine keeps the ledger in step with every order it returns, and runs the
//! fallback of an attempt in the step that settles it.
//!
//! Nothing here reads a clock or does I/O: `now` comes in, steps go out. One dispatch:
//!
//! ```text
//! Planner::plan ──► Waiting(attempt 1, deadline) ──(all answered | deadline: cancels)──► settle
//!     settle: residual > 0 and a fallback and vehicles that accepted ──► AwaitingFallback
//!             otherwise ──► Done (DispatchCompleted, outcome)
//!     AwaitingFallback ──the fallback, same step──► Waiting(attempt 2, deadline) ──► settle ──► Done
//!     replaced, shut down or aborted ──► Done at once (pending orders cancelled)
//! ```

mod book;
pub mod fallback;
pub mod ledger;
mod machine;
mod planner;

pub use book::DispatchBook;
pub(crate) use machine::FallbackRequest;
pub use machine::{AckIgnored, Dispatch};
pub use planner::{Capacity, FleetChange, Planner, CAPACITY_HORIZON_S, PARTICIPATION_DISPATCHES};

use std::collections::{BTreeMap, BTreeSet};

use crate::allocation::limits::LimitSet;
use crate::allocation::limits::Limits;
use crate::allocation::lp::LpDispatcher;
use crate::allocation::{Candidate, MIN_ORDER_KW};
use crate::events::payload::{BrokerReconnected, DispatchInterrupted, LogRecovered, VehicleLost};
use crate::events::Event;
use crate::learning::tuning::LearningTuner;
use crate::model::{
    Ack, AckStatus, DispatchId, DispatchOutcome, FallbackKind, Order, OrderCancel, Signal, Vehicle, VehicleId,
};
use crate::time::Timestamp;
use ledger::{Commitment, Ledger};

/// Streams of setpoints remembered at most while their windows are open (beyond it only
/// those with a dispatch in flight or commitments in force are kept).
pub const MAX_STREAMS: usize = 4_096;

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
/// then publish `cancels`, `orders` (a fallback's orders among them), arm `deadline` and
/// publish `outcomes`.
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
    /// A residual the engine hands to the fallback before the step leaves it.
    pub(crate) fallback: Option<FallbackRequest>,
    /// Once settled: each order's vehicle, when, and whether it accepted (for the
    /// availability prediction).
    pub answers: Vec<(VehicleId, Timestamp, bool)>,
    /// The results of the dispatches this step settled (a replacement settles the
    /// dispatch it replaces in the same step as it plans its own).
    pub outcomes: Vec<DispatchOutcome>,
    /// Dispatches this step settled early (replaced in flight, shut down): their outcomes
    /// say what happened, but the tuner does not learn from them.
    pub interrupted: Vec<DispatchId>,
}

impl Step {
    pub(crate) fn merge(&mut self, other: Step) {
        self.events.extend(other.events);
        self.cancels.extend(other.cancels);
        self.orders.extend(other.orders);
        self.deadline = other.deadline.or(self.deadline);
        self.fallback = other.fallback.or(self.fallback.take());
        self.outcomes.extend(other.outcomes);
        self.answers.extend(other.answers);
        self.interrupted.extend(other.interrupted);
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
    /// The event log cannot be written: nothing new is decided until it can.
    #[error("signal `{signal}` was not dispatched: the event log cannot be written ({error}); signals are refused until it can")]
    LogUnwritable {
        /// The signal's id.
        signal: String,
        /// What failed.
        error: String,
    },
    /// `replaces` names no dispatch in force.
    #[error("field `replaces` names `{0}`, which is no signal with a dispatch in force (unknown, already replaced, or its window is over)")]
    UnknownReplacement(String),
}

impl SignalRefused {
    /// Whether the refusal can be recorded: not while the log itself cannot be written
    /// (such refusals are answered and counted in the `LogRecovered` that ends the outage).
    pub fn recorded(&self) -> bool {
        !matches!(self, SignalRefused::LogUnwritable { .. })
    }

    /// A short code for the reason (what a flood's refusals are grouped by in the log).
    pub fn code(&self) -> &'static str {
        match self {
            SignalRefused::Duplicate(_) => "duplicate",
            SignalRefused::OtherRegion { .. } => "other_region",
            SignalRefused::StaleTerm { .. } => "stale_term",
            SignalRefused::WindowOver { .. } => "window_over",
            SignalRefused::TooFarAhead { .. } => "too_far_ahead",
            SignalRefused::TooLong { .. } => "too_long",
            SignalRefused::Busy(_) => "busy",
            SignalRefused::UnknownReplacement(_) => "unknown_replacement",
            SignalRefused::LogUnwritable { .. } => "log_unwritable",
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
    /// Signal id -> (dispatch id, window end), for signals that may still be replaced (in
    /// flight, with commitments in force, or with their window still open).
    streams: BTreeMap<String, (DispatchId, Timestamp)>,
    /// Learns weights from each outcome, in the step that settles it.
    tuner: Option<Box<dyn LearningTuner>>,
    /// Tops up a fallback that places less than the limits allow.
    fallback_lp: LpDispatcher,
    /// Since when ACKs have been taken that no event records yet: they are recorded at
    /// [`ACK_RECORD_DELAY_MS`] after that, a deadline like the others.
    acks_unrecorded_since: Option<Timestamp>,
    /// While the event log cannot be written: why, since when, signals refused meanwhile, and
    /// when it is next tried (a deadline).
    log_outage: Option<LogOutage>,
}

/// The event log could not be written ([`Engine::log_failed`]).
#[derive(Clone, Debug, PartialEq)]
pub struct LogOutage {
    /// What failed first.
    pub error: String,
    /// Since when.
    pub since: Timestamp,
    /// Signals refused meanwhile.
    pub refused: u64,
    /// When the log is next tried: [`Engine::on_timeout`] returns a step that records
    /// `LogRecovered`, whose being written ends the outage ([`Engine::log_written`]).
    pub next_probe: Timestamp,
}

/// How often a log that could not be written is tried again, ms.
pub const LOG_PROBE_EVERY_MS: i64 = 1_000;

/// ACKs are recorded at most this long after they arrive, many to an event (most
/// dispatches settle sooner and record theirs with their outcome, in one commit).
pub const ACK_RECORD_DELAY_MS: i64 = 200;

impl Engine {
    /// An engine around `planner`, with nothing in flight or committed.
    pub fn new(planner: Planner) -> Self {
        Self {
            planner,
            book: DispatchBook::new(),
            ledger: Ledger::new(),
            streams: BTreeMap::new(),
            tuner: None,
            fallback_lp: LpDispatcher::default(),
            acks_unrecorded_since: None,
            log_outage: None,
        }
    }

    /// Tunes the strategy's weights with `tuner`: a change is applied and recorded
    /// (`WeightsTuned`) in the step that settles the dispatch it learned from, so that in
    /// the log every plan after the change used it and none before did.
    pub fn with_tuner(mut self, tuner: Option<Box<dyn LearningTuner>>) -> Self {
        self.tuner = tuner;
        self
    }

    /// What a step teaches: the answers of settled dispatches feed the prediction, their
    /// outcomes the tuner.
    fn learn(&mut self, now: Timestamp, step: &mut Step) {
        if !step.answers.is_empty() {
            self.planner.observe_answers(&step.answers);
        }
        let Some(tuner) = self.tuner.as_mut() else { return };
        for outcome in step.outcomes.iter().filter(|o| !step.interrupted.contains(&o.dispatch_id)) {
            if let Some(change) = tuner.observe(outcome) {
                self.planner.set_weights(change.signal_type, change.after);
                step.events.push(change.event(now, &self.planner.cfg.region));
            }
        }
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

    /// Plans from now on against `ledger` instead (the auditor keeps the log's commitments
    /// as it folds it and lends them to each re-run; [`Engine::take_ledger`] gives them back).
    pub fn set_ledger(&mut self, ledger: Ledger) {
        self.ledger = ledger;
    }

    /// The commitments, taken out (the engine holds none after).
    pub fn take_ledger(&mut self) -> Ledger {
        std::mem::take(&mut self.ledger)
    }

    /// The dispatches in flight.
    pub fn book(&self) -> &DispatchBook {
        &self.book
    }

    /// The earliest ACK deadline in flight.
    pub fn next_deadline(&self) -> Option<Timestamp> {
        let probe = self.log_outage.as_ref().map(|o| o.next_probe);
        [self.book.next_deadline(), self.ack_record_due(), probe].into_iter().flatten().min()
    }

    /// A step could not be made durable at `now` (`why`): from now on signals are refused
    /// and the log is tried again every [`LOG_PROBE_EVERY_MS`] until a step is written.
    pub fn log_failed(&mut self, now: Timestamp, why: &str) {
        let next_probe = now.plus_millis(LOG_PROBE_EVERY_MS);
        match &mut self.log_outage {
            Some(outage) => outage.next_probe = outage.next_probe.max(next_probe),
            None => self.log_outage = Some(LogOutage { error: why.to_owned(), since: now, refused: 0, next_probe }),
        }
    }

    /// A step was written: an outage, if there was one, is over (it is returned).
    pub fn log_written(&mut self) -> Option<LogOutage> {
        self.log_outage.take()
    }

    /// The outage of the event log, while there is one.
    pub fn log_outage(&self) -> Option<&LogOutage> {
        self.log_outage.as_ref()
    }

    /// Carries an outage over to an engine rebuilt after a restart.
    pub fn set_log_outage(&mut self, outage: Option<LogOutage>) {
        self.log_outage = outage;
    }

    /// When the ACKs taken and not yet recorded are due to be recorded.
    fn ack_record_due(&self) -> Option<Timestamp> {
        self.acks_unrecorded_since.filter(|_| self.has_unrecorded_acks()).map(|t| t.plus_millis(ACK_RECORD_DELAY_MS))
    }

    /// The flexibility still free now.
    pub fn capacity(&mut self, now: Timestamp) -> Capacity {
        self.ledger.expire(now);
        self.planner.capacity(now, &self.ledger)
    }

    /// Closes what a previous run left unfinished, from what its log says: each unfinished
    /// dispatch `(dispatch id, signal id)` is recorded as `DispatchInterrupted`; each order
    /// still committed `(signal id, order, accepted)` is committed again when it was accepted
    /// (the vehicle is delivering it), and cancelled when it was never answered.
    pub fn recover(
        &mut self,
        now: Timestamp,
        unfinished: &[(DispatchId, String, Option<DispatchOutcome>)],
        orders: &[(String, Order, bool)],
    ) -> Step {
        let region = self.planner.cfg.region.clone();
        let mut step = Step::default();
        for (dispatch_id, signal_id, outcome) in unfinished {
            let payload = DispatchInterrupted {
                dispatch_id: dispatch_id.clone(),
                signal_id: signal_id.clone(),
                reason: "found unfinished at start-up: the gateway stopped before it settled".to_owned(),
                outcome: outcome.clone(),
            };
            step.events.push(Event::of(now, "supervisor", &payload).correlation(dispatch_id).region(Some(&region)));
            step.outcomes.extend(outcome.clone());
        }
        for (signal_id, order, accepted) in orders {
            if *accepted {
                self.restore(signal_id, order, true);
            } else {
                let why = "unanswered when the gateway stopped";
                step.cancels.push(OrderCancel::of(&order.order_id, &order.dispatch_id, &order.vehicle_id, why, now));
            }
        }
        step.events.extend(machine::cancel_events(now, "supervisor", &region, &step.cancels));
        step
    }

    /// Restores the setpoint streams the log says are open at `now` (signal id -> its
    /// dispatch and window end), so a `replaces` after a restart finds its predecessor even
    /// when that one got nothing.
    pub fn restore_streams<'a>(
        &mut self,
        now: Timestamp,
        streams: impl IntoIterator<Item = (&'a String, &'a (DispatchId, Timestamp))>,
    ) {
        for (signal_id, (dispatch_id, until)) in streams {
            if now < *until {
                self.streams.entry(signal_id.clone()).or_insert_with(|| (dispatch_id.clone(), *until));
            }
        }
    }

    /// Restores a commitment the log says is in force (an accepted order whose window has
    /// not ended), so that new plans respect it after a restart.
    pub fn restore(&mut self, signal_id: &str, order: &Order, accepted: bool) {
        let mut c = Commitment::of(order);
        c.accepted = accepted;
        self.streams.insert(signal_id.to_owned(), (order.dispatch_id.clone(), order.until));
        self.ledger.commit(c);
    }

    /// Plans `signal` against what is free. A replacement (`replaces`) first settles the
    /// dispatch it replaces and withdraws that dispatch's orders, in the same step. A
    /// refused signal changes nothing.
    pub fn on_signal(&mut self, now: Timestamp, signal: Signal) -> Result<Step, SignalRefused> {
        if let Some(outage) = &mut self.log_outage {
            outage.refused += 1;
            return Err(SignalRefused::LogUnwritable { signal: signal.id, error: outage.error.clone() });
        }
        self.ledger.expire(now);
        let (book, ledger) = (&self.book, &self.ledger);
        // A stream goes on while its last signal's window is open, even when that setpoint
        // got nothing (all rejected, or no room): the next one replaces it all the same.
        self.streams.retain(|_, (d, until)| now < *until || book.contains(d) || ledger.has_dispatch(d));
        if self.streams.len() > MAX_STREAMS {
            self.streams.retain(|_, (d, _)| book.contains(d) || ledger.has_dispatch(d));
        }
        self.planner.admit(now, &signal)?;
        let replaced = match &signal.replaces {
            None => None,
            Some(old) => Some(self.replaceable(old).ok_or_else(|| SignalRefused::UnknownReplacement(old.clone()))?),
        };
        // A replacement settles its predecessor, so it takes no new place in flight.
        let freed = usize::from(replaced.as_deref().is_some_and(|d| self.book.contains(d)));
        if self.book.len() - freed >= self.planner.cfg.max_in_flight {
            return Err(SignalRefused::Busy(self.book.len()));
        }
        // The ACKs taken so far changed the ledger this plan reads (a rejection frees its
        // room): they are recorded first, so the log before the plan is what it saw.
        let mut step = self.record_acks();
        if let (Some(dispatch_id), Some(old)) = (replaced, signal.replaces.as_ref()) {
            step.merge(self.withdraw(now, &dispatch_id, &format!("replaced by signal {}", signal.id)));
            self.streams.remove(old);
        }
        let (signal_id, until) = (signal.id.clone(), signal.end());
        let (dispatch, first) = self.planner.plan(now, signal, &self.ledger);
        self.streams.insert(signal_id, (dispatch.id().clone(), until));
        self.book.insert(dispatch);
        step.merge(first);
        self.commit(&step.orders);
        self.learn(now, &mut step);
        Ok(step)
    }

    /// The dispatch of signal `signal_id`, if it can still be replaced.
    fn replaceable(&self, signal_id: &str) -> Option<DispatchId> {
        self.streams.get(signal_id).map(|(d, _)| d.clone())
    }

    /// Settles `dispatch_id` if it is in flight and withdraws every order of it still
    /// committed: pending ones through the dispatch (they count as not answered), accepted
    /// ones here.
    fn withdraw(&mut self, now: Timestamp, dispatch_id: &str, why: &str) -> Step {
        let mut step = self.book.interrupt(now, dispatch_id, why).unwrap_or_default();
        self.release(&step.cancels);
        let mut cancels = Vec::new();
        for order_id in self.ledger.orders_of(dispatch_id) {
            if let Some(c) = self.ledger.release(&order_id) {
                cancels.push(OrderCancel::of(&c.order_id, &c.dispatch_id, &c.vehicle_id, why, now));
            }
        }
        step.events.extend(machine::cancel_events(now, "dispatcher", &self.planner.cfg.region, &cancels));
        step.cancels.extend(cancels);
        step
    }

    /// Closes `dispatch_id` as failed (its step could not be recorded): it settles now and
    /// everything it committed is released. `None` when nothing of it is left.
    /// Its signal id is forgotten, so that the same signal, sent again, is dispatched once
    /// the log works (a dispatch whose step failed is not on record as settled).
    pub fn abort(&mut self, now: Timestamp, dispatch_id: &str, why: &str) -> Option<Step> {
        if !self.book.contains(dispatch_id) && !self.ledger.has_dispatch(dispatch_id) {
            return None;
        }
        let signal_id = self.book.live.get(dispatch_id).map(|d| d.signal().id.clone());
        let mut step = self.withdraw(now, dispatch_id, why);
        if let Some(id) = signal_id {
            self.planner.forget_signal(&id);
        }
        self.learn(now, &mut step);
        Some(step)
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
        (change, Some(self.lost(now, id)))
    }

    /// Vehicles that hold commitments but are not in the fleet: after a restart, those
    /// whose state the broker did not send again once the fleet was learnt (they left while
    /// the gateway was down, their retained state cleared). Each one's commitments are
    /// released and it is recorded lost (`VehicleLost`, in id order).
    pub fn release_absent(&mut self, now: Timestamp) -> Vec<Event> {
        let absent: BTreeSet<VehicleId> = self
            .ledger
            .iter()
            .map(|c| &c.vehicle_id)
            .filter(|id| self.planner.vehicle(id).is_none())
            .cloned()
            .collect();
        absent.into_iter().map(|id| self.lost(now, id)).collect()
    }

    /// Releases what `id` had committed and records it lost.
    fn lost(&mut self, now: Timestamp, id: VehicleId) -> Event {
        let released_orders = self.ledger.release_vehicle(&id).into_iter().map(|c| c.order_id).collect();
        let actor = format!("vehicle/{id}");
        let lost = VehicleLost { vehicle_id: id, released_orders };
        Event::of(now, actor, &lost).region(Some(&self.planner.cfg.region))
    }

    /// Takes an ACK from `from` (the vehicle whose topic it came on).
    pub fn on_ack(&mut self, now: Timestamp, from: &VehicleId, ack: &Ack) -> Result<Step, AckIgnored> {
        if !self.has_unrecorded_acks() {
            self.acks_unrecorded_since = None;
        }
        let mut step = self.book.on_ack(now, from, ack)?;
        match ack.status {
            AckStatus::Accepted => {
                self.ledger.accept(&ack.order_id);
            }
            AckStatus::Rejected => {
                self.ledger.release(&ack.order_id);
            }
        }
        self.reallocate(now, &mut step);
        self.learn(now, &mut step);
        if self.acks_unrecorded_since.is_none() && self.has_unrecorded_acks() {
            self.acks_unrecorded_since = Some(now);
        }
        Ok(step)
    }

    /// Whether ACKs were taken that no event records yet (see [`Engine::record_acks`]).
    pub fn has_unrecorded_acks(&self) -> bool {
        self.book.live.values().any(Dispatch::has_unrecorded_acks)
    }

    /// The `AckReceived` events of every ACK taken and not yet recorded, one per attempt.
    /// ACKs are recorded in batches: [`Engine::on_timeout`] calls this
    /// [`ACK_RECORD_DELAY_MS`] after the first unrecorded one (a deadline in
    /// [`Engine::next_deadline`]), a dispatch records its own before anything else it decides, and a plan or a fallback
    /// records every one taken before it reads the ledger. Until then an ACK is
    /// known in memory only; a gateway killed meanwhile treats the order as unanswered at
    /// its next start, and cancels it.
    pub fn record_acks(&mut self) -> Step {
        let events = self.book.live.values_mut().filter_map(Dispatch::record_acks).collect();
        Step { events, ..Step::default() }
    }

    /// Records the ACKs taken and not yet recorded when [`ACK_RECORD_DELAY_MS`] has passed
    /// since the first of them, and settles every attempt whose deadline is at or before
    /// `now`: unanswered orders are cancelled (and released) before any fallback runs.
    pub fn on_timeout(&mut self, now: Timestamp) -> Vec<Step> {
        self.ledger.expire(now);
        let due = self.ack_record_due().is_some_and(|due| due <= now);
        let mut steps = self.book.on_timeout(now);
        for step in &mut steps {
            self.release(&step.cancels);
            self.reallocate(now, step);
            self.learn(now, step);
        }
        // The dispatches settled above recorded their own; the rest are recorded after them.
        if due {
            self.acks_unrecorded_since = None;
            let recorded = self.record_acks();
            if !recorded.is_empty() {
                steps.push(recorded);
            }
        }
        // A log that failed is tried again: the step records that it works again.
        if let Some(outage) = self.log_outage.as_mut().filter(|o| o.next_probe <= now) {
            outage.next_probe = now.plus_millis(LOG_PROBE_EVERY_MS);
            let recovered = LogRecovered {
                error: outage.error.clone(),
                failed_since: outage.since,
                signals_refused: outage.refused,
            };
            let event = Event::of(now, "dispatcher", &recovered).region(Some(&self.planner.cfg.region));
            steps.push(Step { events: vec![event], ..Step::default() });
        }
        steps
    }

    /// The orders of `dispatch_id`'s current attempt were published at `now`: its ACK
    /// window starts now.
    pub fn published(&mut self, dispatch_id: &str, now: Timestamp) {
        self.book.published(dispatch_id, now);
    }

    /// The broker was out of reach from `lost_at` until `now`: every attempt waiting for ACKs
    /// gets its whole ACK window from now (orders queued meanwhile reach the broker only now,
    /// and answers sent meanwhile were lost with it), so a link outage never counts against a
    /// vehicle. The runtime holds deadlines while the link is down. The step records it
    /// (`BrokerReconnected`, naming the dispatches restarted).
    pub fn restart_windows(&mut self, lost_at: Timestamp, now: Timestamp) -> Step {
        let windows_restarted = self.book.restart_windows(now);
        let back = BrokerReconnected { lost_at, windows_restarted };
        let event = Event::of(now, "dispatcher", &back).region(Some(&self.planner.cfg.region));
        Step { events: vec![event], ..Step::default() }
    }

    /// Runs the fallback an attempt that settled with a residual asks for, in the same
    /// step: the room is what each candidate still has free (its current state less
    /// everything committed on it) and the free room of the shared limits, read after the
    /// step's cancels were released and before anything else can commit. So no other
    /// dispatch takes that room in between, and the log holds, just before
    /// `FallbackApplied`, exactly the state the fallback ran on (the auditor re-runs it there;
    /// ACKs taken and not yet recorded are recorded before it for that reason).
    fn reallocate(&mut self, now: Timestamp, step: &mut Step) {
        let Some(mut req) = step.fallback.take() else { return };
        // Windows over by now commit nothing any more (an ACK can settle an attempt long
        // after the last plan or deadline expired the ledger).
        self.ledger.expire(now);
        // Other dispatches' ACKs taken and not yet recorded changed the ledger: recorded
        // first, like before a plan.
        step.merge(self.record_acks());
        let Some(d) = self.book.live.get(&req.dispatch_id) else { return };
        let ids: Vec<VehicleId> = std::mem::take(&mut req.candidates).into_iter().map(|(v, _)| v.id).collect();
        let fleet = (&self.planner.fleet, &self.planner.state_at);
        let (candidates, limits) =
            fallback_room(&self.planner.cfg.limits, fleet, &self.ledger, d.signal(), d.planned_at, &ids);
        req.candidates = candidates;
        req.limits = limits;
        let realloc = req.reallocate(fallback::by_kind(req.kind).as_ref(), &mut self.fallback_lp);
        let next = self.book.apply_fallback(now, &req, &realloc);
        self.commit(&next.orders);
        step.merge(next);
    }

    /// Graceful shutdown: every dispatch in flight settles now; its unanswered orders are
    /// cancelled. Accepted orders stay in force until their window ends (the vehicles were
    /// told to deliver until then); a restart restores them as commitments.
    pub fn shutdown(&mut self, now: Timestamp, why: &str) -> Vec<Step> {
        let mut steps = self.book.shutdown(now, why);
        for step in &mut steps {
            self.release(&step.cancels);
            self.learn(now, step);
        }
        steps
    }
}

/// What a fallback for `signal` over the vehicles `ids` may use: each one's free capacity
/// (its state in `fleet` less everything `ledger` commits on it over the signal's window,
/// and the energy its commitments draw after `planned_at`;
/// vehicles with less than the minimum order left, or unknown, are left out) and the free
/// room of the shared `limits`. The engine asks it before a fallback runs; the auditor asks
/// it again on the projected state.
pub fn fallback_room(
    limits: &Limits,
    (fleet, state_at): (&BTreeMap<VehicleId, Vehicle>, &BTreeMap<VehicleId, Timestamp>),
    ledger: &Ledger,
    signal: &Signal,
    planned_at: Timestamp,
    ids: &[VehicleId],
) -> (Vec<(Vehicle, f64)>, LimitSet) {
    let (from, to, direction, duration) = (signal.start, signal.end(), signal.direction, signal.duration_s as f64);
    let candidates: Vec<(Vehicle, f64)> = ids
        .iter()
        .filter_map(|id| {
            let v = fleet.get(id)?;
            let since = state_at.get(id).map_or(planned_at, |at| (*at).min(planned_at));
            let (kw, kwh) = (ledger.committed_kw(id, direction, from, to), ledger.committed_kwh(id, direction, since));
            let free = v.capacity_beside(direction, kw, kwh, duration);
            (free >= MIN_ORDER_KW).then(|| (v.clone(), free))
        })
        .collect();
    let cands: Vec<Candidate<'_>> =
        candidates.iter().map(|(v, free)| Candidate { vehicle: v, capacity_kw: *free, participation: 0.0 }).collect();
    let mut room = LimitSet::new(limits, direction, &cands);
    ledger.reduce(&mut room, fleet, direction, from, to);
    drop(cands);
    (candidates, room)
}

#[cfg(test)]
mod tests;
