//! One dispatch's state machine: attempts, ACKs, deadlines (with the cancels of what was
//! not answered), the fallback round and the settlement.

use std::collections::{BTreeSet, HashMap};

use crate::allocation::limits::LimitSet;
use crate::allocation::MIN_ORDER_KW;
use crate::dispatch::fallback::{Fallback, FallbackCandidate, Reallocation};
use crate::events::payload::{
    AcksReceived, AcksTimedOut, DispatchCompleted, FallbackApplied, OrdersCancelled, OrdersSent,
};
use crate::events::{Event, Payload};
use crate::model::{
    watts, Ack, AckStatus, Attempt, DispatchId, DispatchOutcome, FallbackKind, Order, OrderCancel, OrderId, Signal,
    StrategyKind, Vehicle, VehicleCounts, VehicleId,
};
use crate::time::Timestamp;
use serde::Serialize;

use super::Step;

/// A residual waiting for the fallback: the vehicles that accepted, with their state at
/// planning time and the capacity they have left.
#[derive(Clone, Debug)]
pub struct FallbackRequest {
    /// The dispatch.
    pub dispatch_id: DispatchId,
    /// The fallback the dispatch was planned with.
    pub kind: FallbackKind,
    /// Power still missing, kW.
    pub residual_kw: f64,
    /// Vehicles that accepted, with remaining effective capacity, kW.
    pub candidates: Vec<(Vehicle, f64)>,
    /// The shared limits over the candidates, with the room the accepted power has
    /// already used taken off.
    pub limits: LimitSet,
}

impl FallbackRequest {
    /// The candidates as the [`crate::dispatch::fallback::Fallback`] trait takes them.
    pub fn fallback_candidates(&self) -> Vec<FallbackCandidate<'_>> {
        self.candidates.iter().map(|(v, r)| FallbackCandidate { vehicle: v, remaining_kw: *r }).collect()
    }

    /// Runs `fallback` on this request, then makes sure it places min(residual, the most
    /// the candidates and limits allow) ([`crate::allocation::lp::fill_to_max`]; vehicles the
    /// fallback skipped are used only when the others cannot carry it). Noop places nothing:
    /// it is the choice not to reallocate.
    pub fn reallocate(&self, fallback: &dyn Fallback, lp: &mut crate::allocation::lp::LpDispatcher) -> Reallocation {
        let mut r = fallback.reallocate(self.residual_kw, &self.fallback_candidates(), &self.limits);
        if fallback.kind() == FallbackKind::Noop {
            return r;
        }
        let n = self.candidates.len();
        r.power_kw.resize(n, 0.0);
        let caps: Vec<f64> = self.candidates.iter().map(|(_, c)| *c).collect();
        let scores: Vec<f64> = (0..n).map(|i| if r.skipped.contains(&i) { 0.0 } else { 1.0 }).collect();
        crate::allocation::lp::fill_to_max(lp, &mut r.power_kw, &caps, self.residual_kw, &self.limits, &scores);
        crate::allocation::repair::to_watts(&mut r.power_kw, &caps, &self.limits);
        r
    }
}

/// A vehicle ordered in a dispatch: its state at planning time and what it accepted.
#[derive(Clone, Debug)]
pub(super) struct Slot {
    pub(super) vehicle: Vehicle,
    pub(super) accepted_kw: f64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub(super) enum Answer {
    Pending,
    Accepted,
    Rejected,
    TimedOut,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum State {
    Waiting { deadline: Timestamp },
    AwaitingFallback,
    Done,
}

/// Why an ACK was ignored (recorded as `InputRejected`).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum AckIgnored {
    /// No order in flight or recently settled has this id.
    #[error(
        "field `order_id` names no order this gateway sent (`{0}`), or one settled too long ago to remember; the ACK is ignored"
    )]
    UnknownOrder(String),
    /// The order belongs to another vehicle while its dispatch is open (the answer does not
    /// say which vehicle: a sender learns nothing about other vehicles).
    #[error(
        "field `order_id` names an order of another vehicle (`{order_id}`): an ACK counts only on the ordered vehicle's own topic; ignored"
    )]
    WrongVehicle {
        /// The order.
        order_id: String,
        /// Its vehicle.
        owner: VehicleId,
    },
    /// The order's deadline passed before the ACK arrived (its dispatch is still open).
    #[error("order `{0}` was already settled: the ACK came after its deadline (the order was cancelled); ignored")]
    Late(String),
    /// The order's dispatch has settled: whether the order was this vehicle's is no longer
    /// known, so the answer is the same for any vehicle and any order number of it.
    #[error("order `{0}` belongs to a dispatch that has already settled: the ACK came too late and is ignored")]
    Settled(String),
    /// The order was already answered.
    #[error("order `{0}` was already answered; this ACK is ignored")]
    AlreadyAnswered(String),
}

impl AckIgnored {
    /// A short code for the reason (what a flood's refusals are grouped by in the log).
    pub fn code(&self) -> &'static str {
        match self {
            AckIgnored::UnknownOrder(_) => "ack_unknown_order",
            AckIgnored::WrongVehicle { .. } => "ack_other_vehicle",
            AckIgnored::Late(_) => "ack_late",
            AckIgnored::Settled(_) => "ack_settled",
            AckIgnored::AlreadyAnswered(_) => "ack_answered",
        }
    }

    /// The dispatch the ignored ACK is about, when it is one the gateway knows (the order
    /// is late, answered twice, or of a dispatch that has settled): its `InputRejected` is
    /// correlated with that dispatch in the log, so the dispatch's rows show it with the
    /// rest. The answer on `errors` says no more than before. Unknown orders and other
    /// vehicles' orders are not correlated.
    pub fn dispatch(&self) -> Option<&str> {
        match self {
            AckIgnored::Late(order_id) | AckIgnored::AlreadyAnswered(order_id) | AckIgnored::Settled(order_id) => {
                crate::model::order_dispatch(order_id)
            }
            AckIgnored::UnknownOrder(_) | AckIgnored::WrongVehicle { .. } => None,
        }
    }
}

/// One dispatch in flight.
#[derive(Debug)]
pub struct Dispatch {
    pub(super) id: DispatchId,
    pub(super) signal: Signal,
    /// When it was planned (the time its fallback counts committed energy from).
    pub(super) planned_at: Timestamp,
    pub(super) strategy: StrategyKind,
    pub(super) fallback: FallbackKind,
    pub(super) no_fallback_segments: BTreeSet<String>,
    pub(super) region: String,
    pub(super) ack_timeout_ms: i64,
    pub(super) max_attempts: u32,
    pub(super) attempt: u32,
    pub(super) state: State,
    pub(super) orders: Vec<(Order, Answer)>,
    pub(super) index: HashMap<OrderId, usize>,
    pub(super) slots: HashMap<VehicleId, Slot>,
    pub(super) allocated_kw: f64,
    pub(super) acknowledged_kw: f64,
    pub(super) counts: VehicleCounts,
    pub(super) interrupted: Option<String>,
    /// ACKs taken and not yet recorded: when the last arrived, and the batch.
    pub(super) unrecorded: Option<(Timestamp, AcksReceived)>,
}

impl Dispatch {
    /// Its id.
    pub fn id(&self) -> &DispatchId {
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
    pub fn order_ids(&self) -> impl Iterator<Item = &OrderId> {
        self.orders.iter().map(|(o, _)| &o.order_id)
    }

    fn event<P: Payload>(&self, now: Timestamp, actor: &str, payload: &P) -> Event {
        Event::of(now, actor, payload).correlation(&self.id).region(Some(&self.region))
    }

    /// Starts the next attempt with `orders` (none = settle at once).
    pub(super) fn send(&mut self, now: Timestamp, orders: Vec<Order>) -> Step {
        self.attempt += 1;
        let mut step = Step::default();
        if let Some(sent) = OrdersSent::of(&orders) {
            step.events.push(self.event(now, "dispatcher", &sent));
        }
        for o in orders {
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
        let i = *self.index.get(ack.order_id.as_str()).ok_or_else(|| AckIgnored::UnknownOrder(ack.order_id.clone()))?;
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
        let n = crate::model::order_number(&ack.order_id).map_or(0, |(_, n)| n);
        let acks =
            self.unrecorded.get_or_insert_with(|| (now, AcksReceived { attempt: self.attempt, ..Default::default() }));
        acks.0 = now;
        match answer {
            Answer::Accepted => acks.1.accepted.push(n),
            _ => acks.1.rejected.push((n, ack.reason.clone())),
        }
        let mut step = Step::default();
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

    /// Whether ACKs were taken that no event records yet.
    pub fn has_unrecorded_acks(&self) -> bool {
        self.unrecorded.is_some()
    }

    /// The `AckReceived` event of the ACKs taken since the last one (they are recorded in
    /// one event per attempt: at the latest when the attempt settles, or when the runtime
    /// asks, shortly after they arrived). Stamped with the time the last of them arrived.
    pub fn record_acks(&mut self) -> Option<Event> {
        let (at, acks) = self.unrecorded.take()?;
        Some(self.event(at, "vehicles", &acks))
    }

    /// Every pending order times out and is withdrawn (`OrderCancelled`, with `reason`).
    fn cancel_pending(&mut self, now: Timestamp, reason: &str) -> Step {
        let mut step = Step::default();
        step.events.extend(self.record_acks());
        let mut timed_out = Vec::new();
        for i in 0..self.orders.len() {
            if self.orders[i].1 != Answer::Pending {
                continue;
            }
            self.orders[i].1 = Answer::TimedOut;
            self.counts.timed_out += 1;
            let o = &self.orders[i].0;
            timed_out.push((o.attempt, o.order_id.number().map_or(0, |(_, n)| n)));
            step.cancels.push(OrderCancel::of(&o.order_id, &self.id, &o.vehicle_id, reason, now));
        }
        let mut attempts: Vec<u32> = timed_out.iter().map(|(a, _)| *a).collect();
        attempts.dedup();
        for attempt in attempts {
            let orders = timed_out.iter().filter(|(a, _)| *a == attempt).map(|(_, n)| *n).collect();
            step.events.push(self.event(now, "supervisor", &AcksTimedOut { attempt, orders }));
        }
        step.events.extend(cancel_events(now, "supervisor", &self.region, &step.cancels));
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
        let acks: Vec<Event> = self.record_acks().into_iter().collect();
        let mut step = self.settle_recorded(now);
        step.events.splice(0..0, acks);
        step
    }

    fn settle_recorded(&mut self, now: Timestamp) -> Step {
        let residual_kw = self.residual_kw();
        // A window already over has nothing left to deliver: no fallback orders for it.
        let wants_fallback = residual_kw >= MIN_ORDER_KW
            && self.attempt < self.max_attempts
            && self.fallback != FallbackKind::Noop
            && now < self.signal.end();
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
                    kind: self.fallback,
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
    pub(crate) fn apply_fallback(&mut self, now: Timestamp, request: &FallbackRequest, realloc: &Reallocation) -> Step {
        if self.state != State::AwaitingFallback {
            return Step::default();
        }
        let (direction, start, until) = (self.signal.direction.order_direction(), self.signal.start, self.signal.end());
        let next = Attempt { dispatch_id: &self.id, attempt: self.attempt + 1, direction, start, until };
        let mut orders = Vec::new();
        let mut rows = Vec::new();
        for (i, (v, remaining)) in request.candidates.iter().enumerate() {
            let power = realloc.power_kw.get(i).copied().unwrap_or(0.0).clamp(0.0, *remaining);
            rows.push((v.id.clone(), *remaining, power));
            if power >= MIN_ORDER_KW {
                orders.push(next.order(orders.len() as u32 + 1, v.id.clone(), power));
            }
        }
        let placed: f64 = orders.iter().map(|o| o.power_kw).sum();
        let mut step = Step::default();
        let mut skipped: Vec<usize> = realloc.skipped.iter().copied().filter(|i| *i < rows.len()).collect();
        skipped.sort_unstable();
        skipped.dedup();
        step.events.push(self.event(
            now,
            "fallback",
            &FallbackApplied {
                fallback: self.fallback,
                attempt: self.attempt + 1,
                residual_kw: request.residual_kw,
                reallocated_kw: placed,
                candidates: rows,
                skipped,
            },
        ));
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
        step.interrupted.push(self.id.clone());
        step
    }

    fn complete(&mut self, now: Timestamp) -> Step {
        self.state = State::Done;
        let outcome = DispatchOutcome {
            dispatch_id: self.id.clone(),
            signal_id: self.signal.id.clone(),
            kind: self.signal.kind,
            direction: self.signal.direction,
            requested_kw: watts(self.signal.power_kw),
            allocated_kw: watts(self.allocated_kw),
            acknowledged_kw: watts(self.acknowledged_kw),
            shortfall_kw: watts((watts(self.signal.power_kw) - watts(self.acknowledged_kw)).max(0.0)),
            strategy: self.strategy,
            fallback: self.fallback,
            vehicles: self.counts,
            completed_at: now,
            interrupted: self.interrupted.clone(),
        };
        let event =
            self.event(now, "supervisor", &DispatchCompleted { outcome: outcome.clone(), attempts: self.attempt });
        // An interrupted dispatch says nothing about the vehicles that had no time to answer.
        let answers = match self.interrupted {
            Some(_) => Vec::new(),
            None => self.orders.iter().map(|(o, a)| (o.vehicle_id.clone(), now, *a == Answer::Accepted)).collect(),
        };
        Step { events: vec![event], outcomes: vec![outcome], answers, ..Step::default() }
    }
}

/// The `OrderCancelled` events of `cancels`: one per run of cancels of one dispatch for one
/// reason.
pub(super) fn cancel_events(now: Timestamp, actor: &str, region: &str, cancels: &[OrderCancel]) -> Vec<Event> {
    let mut events = Vec::new();
    for run in cancels.chunk_by(|a, b| a.dispatch_id == b.dispatch_id && a.reason == b.reason) {
        let first = &run[0];
        let payload = OrdersCancelled {
            reason: first.reason.clone(),
            at: first.at,
            orders: run.iter().filter_map(|c| c.order_id.number()).collect(),
        };
        events.push(Event::of(now, actor, &payload).correlation(&first.dispatch_id).region(Some(region)));
    }
    events
}
