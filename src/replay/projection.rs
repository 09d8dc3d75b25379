//! The gateway's state as a fold of its event log.
//!
//! [`DispatchProjection`] reads events in seq order and keeps what the gateway knows at
//! that point: the fleet, the dispatches in flight and the last ones settled, the orders
//! still committed, tuned weights, the answers the prediction learns from, participation,
//! the signal ids already seen and the dispatch numbering. At start-up the runtime builds
//! its engine from it ([`ProjectedState`]); `gridweaver replay` prints it as of a time;
//! `gridweaver audit` re-runs each decision on it. Memory is bounded: every history it
//! keeps has a cap, and orders leave it when their window ends.

use std::collections::{BTreeMap, VecDeque};

use serde::{Deserialize, Serialize};

use crate::model::{watts, DispatchId, DispatchOutcome, FallbackKind, Order, StrategyKind, VehicleCounts, VehicleId};
use crate::time::Timestamp;

use crate::dispatch::PARTICIPATION_DISPATCHES;
use crate::events::payload::{
    Decoded, OrderAnswer, OrdersSent, ProjectedCommitments, ProjectedDispatch, ProjectedOrder, ProjectedState,
    ANSWER_DAYS, REMEMBERED_ANSWERS, REMEMBERED_OUTCOMES, REMEMBERED_SIGNALS,
};
use crate::events::{decode, EventKind, PayloadError, StoredEvent};

impl ProjectedState {
    /// Dispatches in flight as (dispatch id, signal id), in id order.
    pub fn unfinished(&self) -> Vec<(DispatchId, String)> {
        self.in_flight.iter().map(|(id, d)| (id.clone(), d.signal_id.clone())).collect()
    }

    /// The outcome of unfinished dispatch `dispatch_id`, settled at `now` as it stands:
    /// what was ordered and accepted; orders never answered count as timed out. `None` for
    /// a dispatch not in flight, or whose signal the log lacks. `configured` are the
    /// strategy (for a plan whose strategy the log does not say) and the fallback.
    pub fn interrupted_outcome(
        &self,
        dispatch_id: &str,
        now: Timestamp,
        configured: (StrategyKind, FallbackKind),
    ) -> Option<DispatchOutcome> {
        let d = self.in_flight.get(dispatch_id)?;
        let signal = d.signal.as_ref()?;
        let mut counts = VehicleCounts::default();
        let (mut allocated_kw, mut acknowledged_kw) = (0.0, 0.0);
        for o in d.orders.values() {
            allocated_kw += o.power_kw;
            match o.answer {
                OrderAnswer::Accepted => {
                    counts.accepted += 1;
                    acknowledged_kw += o.power_kw;
                }
                OrderAnswer::Rejected => counts.rejected += 1,
                OrderAnswer::Pending | OrderAnswer::TimedOut => counts.timed_out += 1,
            }
        }
        Some(DispatchOutcome {
            dispatch_id: DispatchId::from(dispatch_id),
            signal_id: d.signal_id.clone(),
            kind: signal.kind,
            direction: signal.direction,
            requested_kw: watts(signal.power_kw),
            allocated_kw: watts(allocated_kw),
            acknowledged_kw: watts(acknowledged_kw),
            shortfall_kw: watts((watts(signal.power_kw) - watts(acknowledged_kw)).max(0.0)),
            strategy: d.strategy.unwrap_or(configured.0),
            fallback: configured.1,
            vehicles: counts,
            completed_at: now,
            interrupted: Some("the gateway stopped before it settled".to_owned()),
        })
    }

    /// Orders still committed at `now` (window not over), in the order they were sent,
    /// with their signal id and whether they were accepted.
    pub fn commitments_at(&self, now: Timestamp) -> Vec<(String, Order, bool)> {
        let mut out = Vec::new();
        for (dispatch_id, c) in self.commitments.iter().filter(|(_, c)| c.until > now) {
            out.extend(c.orders(dispatch_id).map(|(order, accepted)| (c.signal_id.clone(), order, accepted)));
        }
        out.sort_by_key(|(_, o, _)| sent_order(o));
        out
    }

    /// The orders `dispatch_id` still has committed (whatever their window), with whether
    /// each was accepted.
    pub fn committed_orders(&self, dispatch_id: &str) -> Vec<(Order, bool)> {
        self.commitments.get_key_value(dispatch_id).map(|(id, c)| c.orders(id).collect()).unwrap_or_default()
    }

    /// Releases order `[attempt, n]` of `dispatch_id`.
    fn release(&mut self, dispatch_id: &str, order: (u32, u32)) {
        if let Some(c) = self.commitments.get_mut(dispatch_id) {
            c.orders.remove(&order);
            if c.orders.is_empty() {
                self.commitments.remove(dispatch_id);
            }
        }
    }
}

impl ProjectedState {
    /// The state as `gridweaver replay` prints it: everything, except that the long
    /// histories (signal ids, answers) show as `{"count": n, "last": [the last 10]}`.
    pub fn summary(&self) -> serde_json::Value {
        fn count_and_tail<T: Serialize>(v: &VecDeque<T>) -> serde_json::Value {
            let last: Vec<&T> = v.iter().skip(v.len().saturating_sub(10)).collect();
            serde_json::json!({ "count": v.len(), "last": last })
        }
        let short = ProjectedState { signal_ids: VecDeque::new(), answers: VecDeque::new(), ..self.clone() };
        // The state is plain data with string keys: it always serializes.
        let mut out = serde_json::to_value(&short).unwrap_or_default();
        out["signal_ids"] = count_and_tail(&self.signal_ids);
        out["answers"] = count_and_tail(&self.answers);
        out
    }
}

/// Sort key that puts orders in the order they were sent: dispatch number, attempt, number.
fn sent_order(o: &Order) -> (u64, u32, u32) {
    let dispatch = o.dispatch_id.number().unwrap_or(0);
    let (attempt, n) = o.order_id.number().unwrap_or((0, 0));
    (dispatch, attempt, n)
}

/// A row the projection could not fold.
#[derive(Debug, thiserror::Error)]
#[error("event {seq}: {error}")]
pub struct ProjectionError {
    /// The row.
    pub seq: u64,
    /// Why.
    pub error: PayloadError,
}

/// The fold.
#[derive(Clone, Debug, Default)]
pub struct DispatchProjection {
    state: ProjectedState,
}

impl DispatchProjection {
    /// Nothing folded yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// The state so far.
    pub fn state(&self) -> &ProjectedState {
        &self.state
    }

    /// The state, taken.
    pub fn into_state(self) -> ProjectedState {
        self.state
    }

    /// Goes on from `state` (a compaction's snapshot): the next row folded is the one
    /// after `state.seq`.
    pub fn resume(state: ProjectedState) -> Self {
        Self { state }
    }

    /// Folds one stored row.
    pub fn apply(&mut self, row: &StoredEvent) -> Result<(), ProjectionError> {
        let decoded = decode(&row.kind, &row.payload).map_err(|error| ProjectionError { seq: row.seq, error })?;
        self.apply_decoded(row.seq, Timestamp::from_millis(row.ts_ms), row.correlation_id.as_deref(), decoded);
        Ok(())
    }

    /// Folds one stored row given as its columns, reading the payload text directly.
    pub fn apply_text(
        &mut self,
        seq: u64,
        ts_ms: i64,
        kind: &str,
        correlation: Option<&str>,
        payload: &str,
    ) -> Result<(), ProjectionError> {
        let error = |error| ProjectionError { seq, error };
        let k = EventKind::parse(kind).ok_or_else(|| error(PayloadError::UnknownKind(kind.to_owned())))?;
        let ts = Timestamp::from_millis(ts_ms);
        if !folds(k) {
            // Nothing in it changes the state: not read at all (`audit` reads every row).
            (self.state.seq, self.state.ts) = (seq, Some(ts));
            return Ok(());
        }
        if k == EventKind::DispatchPlanCreated {
            // The fold needs two of a plan's fields; the rest is skipped, not parsed.
            #[derive(Deserialize)]
            struct Plan {
                v: u32,
                dispatch_id: DispatchId,
                signal_id: String,
                strategy: StrategyKind,
            }
            if let Ok(p) = serde_json::from_str::<Plan>(payload) {
                if p.v == <crate::events::payload::PlanCreated as crate::events::Payload>::VERSION {
                    (self.state.seq, self.state.ts) = (seq, Some(ts));
                    self.state.planned(ts, p.dispatch_id, p.signal_id, p.strategy);
                    return Ok(());
                }
            }
        }
        if k == EventKind::OrderSent && self.orders_sent_text(seq, ts, correlation, payload) {
            return Ok(());
        }
        let decoded = crate::events::payload::decode_str(kind, payload).map_err(error)?;
        self.apply_decoded(seq, ts, correlation, decoded);
        Ok(())
    }

    /// Folds an `OrderSent` of the current version read in place ([`read_sent`]). `false`
    /// when it is not that (an older version, an escaped name, a vehicle the fleet does not
    /// know): the caller decodes it the general way.
    fn orders_sent_text(&mut self, seq: u64, ts: Timestamp, correlation: Option<&str>, payload: &str) -> bool {
        read_sent(payload).is_some_and(|(header, orders)| self.apply_sent(seq, ts, correlation, header, orders))
    }

    /// Folds an `OrderSent` already read by [`read_sent`] (a replay reads them on another
    /// thread than the one folding): its vehicle names are resolved to the fleet's ids, one
    /// allocation per vehicle for the whole log, not one per order. `false`, and nothing
    /// folded, when a vehicle is not in the fleet: the caller folds the row with
    /// [`apply_text`](Self::apply_text).
    pub fn apply_sent<'n>(
        &mut self,
        seq: u64,
        ts: Timestamp,
        correlation: Option<&str>,
        header: SentHeader,
        orders: impl IntoIterator<Item = (&'n str, f64)>,
    ) -> bool {
        let orders = orders.into_iter();
        let mut resolved = Vec::with_capacity(orders.size_hint().0);
        for (name, kw) in orders {
            let Some(id) = self.state.vehicle(name) else { return false };
            resolved.push((id, kw));
        }
        let SentHeader { attempt, direction, start, until, first } = header;
        let sent = OrdersSent { attempt, direction, start, until, first, orders: resolved };
        (self.state.seq, self.state.ts) = (seq, Some(ts));
        self.state.orders_sent(correlation.unwrap_or_default(), sent);
        true
    }

    /// Folds one event already decoded.
    pub fn apply_decoded(&mut self, seq: u64, ts: Timestamp, correlation: Option<&str>, event: Decoded) {
        let s = &mut self.state;
        s.seq = seq;
        s.ts = Some(ts);
        let corr = correlation.unwrap_or_default();
        match event {
            Decoded::SignalReceived(e) => {
                s.signal_ids.push_back(e.signal.id.clone());
                if s.signal_ids.len() > REMEMBERED_SIGNALS {
                    s.signal_ids.pop_front();
                }
                if let Some(term) = e.signal.leader_term {
                    s.highest_term = s.highest_term.max(Some(term));
                }
                s.last_signal = Some(e.signal);
            }
            Decoded::Rejected(r) => s.rejected += r.count,
            Decoded::PlanCreated(p) => s.planned(ts, p.dispatch_id, p.signal_id, p.strategy),
            Decoded::OrdersSent(mut sent) => {
                for (vehicle, _) in &mut sent.orders {
                    *vehicle = s.vehicle(vehicle.as_str()).unwrap_or_else(|| vehicle.clone());
                }
                s.orders_sent(corr, sent);
            }
            Decoded::AcksReceived(acks) => {
                // One lookup of the dispatch per event, not per order.
                let mut flight = s.in_flight.get_mut(corr);
                let mut committed = s.commitments.get_mut(corr);
                for n in acks.accepted {
                    if let Some(o) = flight.as_mut().and_then(|d| d.orders.get_mut(&(acks.attempt, n))) {
                        o.answer = OrderAnswer::Accepted;
                    }
                    if let Some(o) = committed.as_mut().and_then(|c| c.orders.get_mut(&(acks.attempt, n))) {
                        o.2 = true;
                    }
                }
                for (n, _) in acks.rejected {
                    s.answer(corr, (acks.attempt, n), OrderAnswer::Rejected);
                    s.release(corr, (acks.attempt, n));
                }
            }
            Decoded::AcksTimedOut(t) => {
                for n in t.orders {
                    s.answer(corr, (t.attempt, n), OrderAnswer::TimedOut);
                    s.release(corr, (t.attempt, n));
                }
            }
            Decoded::OrdersCancelled(c) => {
                for order in c.orders {
                    s.release(corr, order);
                }
            }
            Decoded::DispatchCompleted(done) => {
                if let Some(d) = s.in_flight.remove(corr) {
                    if done.outcome.interrupted.is_none() {
                        for o in d.orders.into_values() {
                            s.answers.push_back((o.vehicle_id, ts, o.answer == OrderAnswer::Accepted));
                        }
                    }
                }
                s.settled += 1;
                s.outcomes.push_back(done.outcome);
                if s.outcomes.len() > REMEMBERED_OUTCOMES {
                    s.outcomes.pop_front();
                }
                s.prune(ts);
            }
            Decoded::DispatchInterrupted(i) => {
                if s.in_flight.remove(&i.dispatch_id).is_some() {
                    s.settled += 1;
                }
            }
            Decoded::WeightsTuned(w) => {
                s.weights.insert(w.change.signal_type, w.change.after);
            }
            Decoded::VehicleState(v) => {
                s.fleet_at.insert(v.vehicle.id.clone(), ts);
                s.fleet.insert(v.vehicle.id.clone(), v.vehicle);
            }
            Decoded::VehicleLost(lost) => {
                s.fleet.remove(&lost.vehicle_id);
                s.fleet_at.remove(&lost.vehicle_id);
                for id in &lost.released_orders {
                    if let (Some(order), Some(dispatch)) = (id.number(), id.dispatch()) {
                        s.release(dispatch, order);
                    }
                }
                for ordered in &mut s.participation {
                    ordered.retain(|v| *v != lost.vehicle_id);
                }
            }
            Decoded::ConfigRecorded(c) => {
                // A run starts with an empty fleet: the gateway learns it again from the
                // vehicles' retained states.
                s.fleet.clear();
                s.fleet_at.clear();
                s.config = Some(c);
            }
            // The state it holds is what the rows before it folded to.
            Decoded::LogCompacted(_)
            | Decoded::ConstraintApplied(_)
            | Decoded::SnapshotImported(_)
            | Decoded::FallbackApplied(_)
            | Decoded::LogRecovered(_)
            | Decoded::BrokerReconnected(_)
            | Decoded::Untyped(_) => {}
        }
    }
}

/// Whether events of `kind` change the projected state (the others are only counted as
/// the last row folded, their payload not read).
pub fn folds(kind: EventKind) -> bool {
    use EventKind as K;
    match kind {
        K::SignalReceived
        | K::SignalRejected
        | K::InputRejected
        | K::DispatchPlanCreated
        | K::OrderSent
        | K::AckReceived
        | K::AckTimedOut
        | K::OrderCancelled
        | K::DispatchCompleted
        | K::DispatchInterrupted
        | K::WeightsTuned
        | K::VehicleDiscovered
        | K::VehicleStateChanged
        | K::VehicleLost
        | K::ConfigRecorded => true,
        K::ConstraintApplied
        | K::FallbackApplied
        | K::DemandResponseActivated
        | K::CurtailmentRecorded
        | K::BidSubmitted
        | K::BidAccepted
        | K::BidRejected
        | K::BidExpired
        | K::TransferOrdered
        | K::LeaderElected
        | K::LogRecovered
        | K::BrokerReconnected
        | K::SnapshotImported
        | K::LogCompacted => false,
    }
}

/// An `OrderSent` of the current version but its orders.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SentHeader {
    /// The attempt.
    pub attempt: u32,
    /// Discharge or charge.
    pub direction: crate::model::OrderDirection,
    /// Window start.
    pub start: Timestamp,
    /// Window end.
    pub until: Timestamp,
    /// Number of the first order.
    pub first: u32,
}

/// Reads the payload of an `OrderSent` of the current version in place: its header and
/// its `[vehicle, kW]` pairs, the names borrowed from `payload`. `None` for anything else
/// (an older version, a name with an escape in it, not that shape at all), which
/// [`DispatchProjection::apply_text`] decodes the general way.
pub fn read_sent(payload: &str) -> Option<(SentHeader, Vec<(&str, f64)>)> {
    #[derive(Deserialize)]
    struct Sent<'a> {
        v: u32,
        attempt: u32,
        direction: crate::model::OrderDirection,
        start: Timestamp,
        until: Timestamp,
        first: u32,
        // The numbers as written: the standard library reads them several times faster than
        // serde_json's exact parser, to the same correctly rounded value (property-tested).
        // What JSON cannot hold (beyond f64's range) is left to the general decode to refuse.
        #[serde(borrow)]
        orders: Vec<(&'a str, &'a serde_json::value::RawValue)>,
    }
    let p = serde_json::from_str::<Sent<'_>>(payload).ok()?;
    if p.v != <OrdersSent as crate::events::Payload>::VERSION {
        return None;
    }
    let header =
        SentHeader { attempt: p.attempt, direction: p.direction, start: p.start, until: p.until, first: p.first };
    let orders =
        p.orders.into_iter().map(|(name, kw)| Some((name, kw.get().parse::<f64>().ok().filter(|kw| kw.is_finite())?)));
    Some((header, orders.collect::<Option<Vec<_>>>()?))
}

impl ProjectedState {
    /// The fleet's id for `name`. Every order, commitment and answer of a vehicle shares
    /// it: one allocation per vehicle, not per order (200,000 answers are kept).
    fn vehicle(&self, name: &str) -> Option<VehicleId> {
        self.fleet.get_key_value(name).map(|(id, _)| id.clone())
    }

    /// The orders of one attempt of dispatch `corr` went out.
    fn orders_sent(&mut self, corr: &str, sent: OrdersSent) {
        let signal_id = self.in_flight.get(corr).map(|d| d.signal_id.clone()).unwrap_or_default();
        if sent.attempt == 1 {
            if let Some(last) = self.participation.back_mut() {
                last.extend(sent.orders.iter().map(|(v, _)| v.clone()));
            }
        }
        if let Some(d) = self.in_flight.get_mut(corr) {
            d.attempts = d.attempts.max(sent.attempt);
            for (n, (vehicle_id, power_kw)) in (sent.first..).zip(&sent.orders) {
                let order = ProjectedOrder {
                    attempt: sent.attempt,
                    n,
                    vehicle_id: vehicle_id.clone(),
                    power_kw: *power_kw,
                    answer: OrderAnswer::Pending,
                };
                d.orders.insert((sent.attempt, n), order);
            }
        }
        let c = self.commitments.entry(DispatchId::from(corr)).or_insert_with(|| ProjectedCommitments {
            signal_id,
            direction: sent.direction,
            start: sent.start,
            until: sent.until,
            orders: BTreeMap::new(),
        });
        for (n, (vehicle, kw)) in (sent.first..).zip(sent.orders) {
            c.orders.insert((sent.attempt, n), (vehicle, kw, false));
        }
    }

    /// Dispatch `dispatch_id` of `signal_id` was planned at `ts`.
    fn planned(&mut self, ts: Timestamp, dispatch_id: DispatchId, signal_id: String, strategy: StrategyKind) {
        if let Some(n) = dispatch_id.number() {
            self.dispatches = self.dispatches.max(n);
        }
        self.participation.push_back(Vec::new());
        if self.participation.len() > PARTICIPATION_DISPATCHES {
            self.participation.pop_front();
        }
        let signal = self.last_signal.take().filter(|g| g.id == signal_id);
        if let Some(g) = &signal {
            // A replacement takes its predecessor's place in the stream.
            if let Some(old) = &g.replaces {
                self.streams.remove(old);
            }
            self.streams.insert(signal_id.clone(), (dispatch_id.clone(), g.end()));
            if self.streams.len() > crate::dispatch::MAX_STREAMS {
                let (live, committed) = (&self.in_flight, &self.commitments);
                self.streams.retain(|_, (d, _)| live.contains_key(d) || committed.contains_key(d));
            }
        }
        let strategy = Some(strategy);
        let d = ProjectedDispatch { signal_id, signal, planned_at: ts, strategy, attempts: 0, orders: BTreeMap::new() };
        self.in_flight.insert(dispatch_id, d);
    }

    fn answer(&mut self, dispatch_id: &str, order: (u32, u32), answer: OrderAnswer) {
        if let Some(o) = self.in_flight.get_mut(dispatch_id).and_then(|d| d.orders.get_mut(&order)) {
            o.answer = answer;
        }
    }

    /// Drops what no longer matters at `now`: commitments whose window ended, answers
    /// older than [`ANSWER_DAYS`] or beyond [`REMEMBERED_ANSWERS`].
    fn prune(&mut self, now: Timestamp) {
        self.commitments.retain(|_, c| c.until > now);
        self.streams.retain(|_, (_, until)| *until > now);
        let since = now.as_millis().saturating_sub(ANSWER_DAYS * 86_400_000);
        while self.answers.front().is_some_and(|(_, at, _)| at.as_millis() < since)
            || self.answers.len() > REMEMBERED_ANSWERS
        {
            self.answers.pop_front();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::payload::decode_str;
    use crate::events::Event;
    use crate::model::OrderDirection;
    use proptest::prelude::*;

    fn sent(orders: Vec<(VehicleId, f64)>) -> Event {
        let t = Timestamp::from_millis(1_795_000_000_000);
        let sent = OrdersSent {
            attempt: 2,
            direction: OrderDirection::Charge,
            start: t,
            until: t.plus_millis(90_000),
            first: 4,
            orders,
        };
        Event::of(t, "dispatcher", &sent)
    }

    proptest! {
        /// What replay reads in place is what the general decode reads, to the bit.
        #[test]
        fn an_order_batch_read_in_place_is_the_decoded_one(
            kws in proptest::collection::vec(prop_oneof![
                any::<f64>().prop_filter("finite", |x| x.is_finite()),
                (0u64..1_000_000_000_000).prop_map(|w| w as f64 / 1e6),
                Just(0.0), Just(-0.0), Just(f64::MIN_POSITIVE), Just(5e-324), Just(f64::MAX),
            ], 0..40),
        ) {
            let orders: Vec<(VehicleId, f64)> =
                kws.iter().enumerate().map(|(i, kw)| (VehicleId::from(format!("ev{i}").as_str()), *kw)).collect();
            let e = sent(orders);
            let Ok(Decoded::OrdersSent(decoded)) = decode_str("OrderSent", &e.payload) else { panic!("decodes") };
            let (header, read) = read_sent(&e.payload).expect("read in place");
            prop_assert_eq!(
                header,
                SentHeader { attempt: 2, direction: OrderDirection::Charge, start: decoded.start, until: decoded.until, first: 4 }
            );
            prop_assert_eq!(read.len(), decoded.orders.len());
            for ((name, kw), (id, want)) in read.iter().zip(&decoded.orders) {
                prop_assert_eq!(*name, id.as_str());
                prop_assert_eq!(kw.to_bits(), want.to_bits());
            }
        }
    }

    #[test]
    fn what_cannot_be_read_in_place_is_left_to_the_general_decode() {
        let e = sent(vec![(VehicleId::from("ev0"), 1.5)]);
        let edit = |from: &str, to: &str| e.payload.replace(from, to);
        // Beyond f64's range: the general decode refuses it, replay must not read infinity.
        let huge = edit("1.5", "1e400");
        assert!(read_sent(&huge).is_none() && decode_str("OrderSent", &huge).is_err());
        // A name with an escape in it cannot be borrowed; it decodes the general way.
        let escaped = edit("\"ev0\"", r#""ev\"0""#);
        assert!(read_sent(&escaped).is_none());
        assert!(
            matches!(decode_str("OrderSent", &escaped), Ok(Decoded::OrdersSent(o)) if o.orders[0].0.as_str() == "ev\"0")
        );
        // A number written as a string, or missing: not an order batch at all.
        assert!(read_sent(&edit("1.5", "\"1.5\"")).is_none());
        assert!(read_sent(&edit("1.5", "null")).is_none());
        // An older version.
        assert!(read_sent(&edit("\"v\":2", "\"v\":1")).is_none());
    }
}
