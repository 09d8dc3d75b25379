//! One typed, versioned payload per event kind.
//!
//! Every payload is written with a version field `v` (see [`Payload::VERSION`]) and read
//! back through [`decode`], which also reads every older version of it (upcasting): rows
//! written before versions existed have no `v` and are version 1. Readers (the
//! projection, replay, audit) only ever see the current shape.
//!
//! The log is lean by construction: a vehicle's state is its own event when it changes
//! ([`VehicleState`]), a plan refers to the fleet as the log holds it at the plan
//! ([`FleetRef`]), and the orders, ACKs, timeouts and cancels of one attempt are one event
//! each, with orders named by number (`<dispatch id>-<attempt>-<n>`, see [`order_id`]).

use std::collections::BTreeMap;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::allocation::filter::Exclusion;
use crate::allocation::limits::LimitRow;
use crate::allocation::lp::SolverReport;
use crate::allocation::Weights;
use crate::model::{
    Attempt, DispatchId, DispatchOutcome, FallbackKind, Order, OrderDirection, OrderId, Signal, StrategyKind, Vehicle,
    VehicleId,
};
use crate::time::Timestamp;

use super::EventKind;

mod decode;
mod hash;
mod state;

pub use decode::{decode, decode_str, Decoded, PayloadError};
pub use hash::{fleet_fingerprint, hex, sha256_hex};
pub use state::{
    CommittedOrders, LogCompacted, OrderAnswer, ProjectedCommitments, ProjectedDispatch, ProjectedOrder,
    ProjectedState, ANSWER_DAYS, REMEMBERED_ANSWERS, REMEMBERED_OUTCOMES, REMEMBERED_SIGNALS,
};

/// A typed event payload: its kind and the version it is written in.
pub trait Payload: Serialize + DeserializeOwned {
    /// The version written today.
    const VERSION: u32;
    /// The kind it records.
    fn kind(&self) -> EventKind;
}

/// The payload as written: `v` first, then the payload's own fields.
#[derive(Serialize)]
pub(super) struct Versioned<'a, P: Serialize> {
    pub(super) v: u32,
    #[serde(flatten)]
    pub(super) payload: &'a P,
}

macro_rules! payload {
    ($ty:ty, $kind:ident, $version:literal) => {
        impl Payload for $ty {
            const VERSION: u32 = $version;
            fn kind(&self) -> EventKind {
                EventKind::$kind
            }
        }
    };
}

/// `SignalReceived`: the signal as decoded. (Read back as the signal itself: serde's
/// `flatten` buffers every field, and replay reads millions of these.)
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(from = "Signal")]
pub struct SignalReceived {
    /// The signal.
    #[serde(flatten)]
    pub signal: Signal,
}
payload!(SignalReceived, SignalReceived, 1);

impl From<Signal> for SignalReceived {
    fn from(signal: Signal) -> Self {
        Self { signal }
    }
}

/// `SignalRejected` or `InputRejected`: an inbound message that was refused.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Rejected {
    /// The topic it came on.
    pub topic: String,
    /// Why, naming the field.
    pub error: String,
    /// Its size.
    pub bytes: usize,
    /// The message as JSON when it parsed and was small, else an excerpt as a string.
    pub message: Value,
    /// A signal (`SignalRejected`) or other input (`InputRejected`).
    #[serde(skip)]
    pub signal: bool,
    /// Why, as a short code that refusals of the same reason share (`invalid:power_kw`,
    /// `duplicate`, `planner_behind`, ...). Absent in version 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// How many messages this row refuses: more than one when refusals of one reason came
    /// within a second of the last row of that reason (a flood); `topic`, `error`, `bytes`
    /// and `message` are then the first's. 1 in version 1.
    #[serde(default = "one", skip_serializing_if = "is_one")]
    pub count: u64,
    /// The refused messages' ids (`id`, `order_id`, `request_id`) where they could be read,
    /// the first [`crate::events::refusals::MAX_REFS`] of a batch.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub refs: Vec<String>,
    /// A batch: when its first and last message arrived.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub first_at: Option<Timestamp>,
    /// A batch: when its last message arrived.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_at: Option<Timestamp>,
}

fn one() -> u64 {
    1
}

fn is_one(n: &u64) -> bool {
    *n == 1
}

impl Payload for Rejected {
    const VERSION: u32 = 2;
    fn kind(&self) -> EventKind {
        if self.signal {
            EventKind::SignalRejected
        } else {
            EventKind::InputRejected
        }
    }
}

/// `ConstraintApplied`: what the plan was allowed to use.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ConstraintApplied {
    /// Candidates left after the filter.
    pub eligible: usize,
    /// Vehicles left out, by why (each list in fleet order). Version 1 wrote one
    /// `{"vehicle_id", "reason"}` object per vehicle: 55 bytes a vehicle named like
    /// `ev00001` where this takes 10, on every dispatch of a depot whose vehicles are all
    /// committed the other way.
    pub excluded: BTreeMap<Exclusion, Vec<VehicleId>>,
    /// Their free capacity, kW.
    pub capacity_kw: f64,
    /// The request, kW.
    pub target_kw: f64,
    /// Whether the request exceeds the capacity.
    pub target_capped_to_capacity: bool,
    /// The shared limits, less what is committed.
    pub limits: Vec<LimitRow>,
}

impl ConstraintApplied {
    /// The vehicles left out, grouped by why, each group in the order given.
    pub fn by_reason(
        excluded: impl IntoIterator<Item = (VehicleId, Exclusion)>,
    ) -> BTreeMap<Exclusion, Vec<VehicleId>> {
        let mut by = BTreeMap::<Exclusion, Vec<VehicleId>>::new();
        for (id, why) in excluded {
            by.entry(why).or_default().push(id);
        }
        by
    }

    /// How many vehicles were left out.
    pub fn excluded_count(&self) -> usize {
        self.excluded.values().map(Vec::len).sum()
    }
}
payload!(ConstraintApplied, ConstraintApplied, 2);

/// A limit row's load under a plan.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LoadRow {
    /// The row.
    pub name: String,
    /// Planned load, kW.
    pub load_kw: f64,
    /// Its free room, kW.
    pub cap_kw: f64,
}

/// The fleet a plan saw: the vehicles the log holds just before the plan (the fold of
/// `VehicleDiscovered`, `VehicleStateChanged` and `VehicleLost`), and a fingerprint of them
/// so that a replay can tell it rebuilt the same inputs.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct FleetRef {
    /// Vehicles known.
    pub vehicles: usize,
    /// [`fleet_fingerprint`] of them, hex.
    pub fingerprint: String,
}

/// `DispatchPlanCreated`: the allocation decision.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PlanCreated {
    /// The dispatch.
    pub dispatch_id: DispatchId,
    /// Its signal.
    pub signal_id: String,
    /// The strategy that decided.
    pub strategy: StrategyKind,
    /// Why that strategy, or what the repair did.
    pub note: Option<String>,
    /// The LP's report, when it ran.
    pub solver: Option<SolverReport>,
    /// The weights used, for the weighted strategies.
    pub weights: Option<Weights>,
    /// Vehicles whose availability came from the prediction.
    pub predicted_availability: Vec<VehicleId>,
    /// The fallback of this dispatch.
    pub fallback: FallbackKind,
    /// The request after capping, kW.
    pub target_kw: f64,
    /// Ordered in the first attempt, kW.
    pub allocated_kw: f64,
    /// Rounds of the heuristic.
    pub rounds: u32,
    /// Load per limit row.
    pub limit_loads: Vec<LoadRow>,
    /// The fleet it planned with (absent in version 1 rows, which inlined every candidate).
    #[serde(default)]
    pub fleet: Option<FleetRef>,
}
payload!(PlanCreated, DispatchPlanCreated, 2);

/// `OrderSent`: the orders of one attempt, numbered from `first`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct OrdersSent {
    /// The attempt.
    pub attempt: u32,
    /// Discharge or charge.
    pub direction: OrderDirection,
    /// Window start.
    pub start: Timestamp,
    /// Window end.
    pub until: Timestamp,
    /// Number of the first order (the rest follow).
    pub first: u32,
    /// `[vehicle, kW]` per order.
    pub orders: Vec<(VehicleId, f64)>,
}
payload!(OrdersSent, OrderSent, 2);

impl OrdersSent {
    /// The event for `orders` (one attempt of one dispatch, numbered consecutively).
    pub fn of(orders: &[Order]) -> Option<OrdersSent> {
        let o = orders.first()?;
        Some(OrdersSent {
            attempt: o.attempt,
            direction: o.direction,
            start: o.start,
            until: o.until,
            first: o.order_id.number().map_or(1, |(_, n)| n),
            orders: orders.iter().map(|o| (o.vehicle_id.clone(), o.power_kw)).collect(),
        })
    }

    /// The orders, as they were published.
    pub fn to_orders(&self, dispatch_id: &DispatchId) -> Vec<Order> {
        let (direction, start, until) = (self.direction, self.start, self.until);
        let attempt = Attempt { dispatch_id, attempt: self.attempt, direction, start, until };
        (self.first..).zip(&self.orders).map(|(n, (vehicle, kw))| attempt.order(n, vehicle.clone(), *kw)).collect()
    }
}

/// `AckReceived`: answers to orders of one attempt, by order number.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct AcksReceived {
    /// The attempt.
    pub attempt: u32,
    /// Orders accepted.
    pub accepted: Vec<u32>,
    /// Orders rejected, with the vehicle's reason.
    pub rejected: Vec<(u32, Option<String>)>,
}
payload!(AcksReceived, AckReceived, 2);

/// `AckTimedOut`: orders of one attempt without an answer by the deadline.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AcksTimedOut {
    /// The attempt.
    pub attempt: u32,
    /// Their numbers.
    pub orders: Vec<u32>,
}
payload!(AcksTimedOut, AckTimedOut, 2);

/// `OrderCancelled`: orders of one dispatch withdrawn for one reason, `[attempt, n]` each.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct OrdersCancelled {
    /// Why.
    pub reason: String,
    /// When.
    pub at: Timestamp,
    /// `[attempt, number]` per order.
    pub orders: Vec<(u32, u32)>,
}
payload!(OrdersCancelled, OrderCancelled, 2);

/// A fallback candidate: `[vehicle, remaining kW, reallocated kW]`.
pub type FallbackRow = (VehicleId, f64, f64);

/// `FallbackApplied`: the residual of a dispatch reallocated.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct FallbackApplied {
    /// The fallback.
    pub fallback: FallbackKind,
    /// The attempt it opens.
    pub attempt: u32,
    /// What was left to place, kW.
    pub residual_kw: f64,
    /// What it placed, kW.
    pub reallocated_kw: f64,
    /// Every candidate it was offered.
    pub candidates: Vec<FallbackRow>,
    /// Indexes of the candidates it skipped.
    pub skipped: Vec<usize>,
}
payload!(FallbackApplied, FallbackApplied, 2);

/// `DispatchCompleted`: the outcome and how it settled.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(from = "CompletedFields")]
pub struct DispatchCompleted {
    /// The outcome.
    #[serde(flatten)]
    pub outcome: DispatchOutcome,
    /// Attempts made. (Why it ended early, if it did, is the outcome's `interrupted`.)
    pub attempts: u32,
}
payload!(DispatchCompleted, DispatchCompleted, 1);

/// `DispatchCompleted`'s fields as written, read without `flatten`.
#[derive(Deserialize)]
struct CompletedFields {
    dispatch_id: DispatchId,
    signal_id: String,
    #[serde(rename = "type")]
    kind: crate::model::SignalType,
    direction: crate::model::Direction,
    requested_kw: f64,
    allocated_kw: f64,
    acknowledged_kw: f64,
    shortfall_kw: f64,
    strategy: StrategyKind,
    fallback: FallbackKind,
    vehicles: crate::model::VehicleCounts,
    completed_at: Timestamp,
    attempts: u32,
    #[serde(default)]
    interrupted: Option<String>,
}

impl From<CompletedFields> for DispatchCompleted {
    fn from(f: CompletedFields) -> Self {
        let outcome = DispatchOutcome {
            dispatch_id: f.dispatch_id,
            signal_id: f.signal_id,
            kind: f.kind,
            direction: f.direction,
            requested_kw: f.requested_kw,
            allocated_kw: f.allocated_kw,
            acknowledged_kw: f.acknowledged_kw,
            shortfall_kw: f.shortfall_kw,
            strategy: f.strategy,
            fallback: f.fallback,
            vehicles: f.vehicles,
            completed_at: f.completed_at,
            interrupted: f.interrupted,
        };
        Self { outcome, attempts: f.attempts }
    }
}

/// A change of one signal type's weights.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct WeightsChange {
    /// The signal type whose weights changed.
    pub signal_type: crate::model::SignalType,
    /// The dispatch that caused it.
    pub dispatch_id: crate::model::DispatchId,
    /// Its ACK rate.
    pub ack_rate: f64,
    /// Weights before.
    pub before: Weights,
    /// Weights after.
    pub after: Weights,
    /// Why, in words.
    pub reason: String,
}

impl WeightsChange {
    /// The `WeightsTuned` event recording this change.
    pub fn event(&self, now: Timestamp, region: &str) -> super::Event {
        super::Event::of(now, "tuner", &WeightsTuned { change: self.clone() })
            .correlation(&self.dispatch_id)
            .region(Some(region))
    }
}

/// A program as the snapshot gives it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotProgram {
    /// MW needed.
    pub required_mw: f64,
    /// Window start.
    pub window_start: Timestamp,
    /// Window end.
    pub window_end: Timestamp,
}

/// `SnapshotImported`: what a migration brought in.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SnapshotImported {
    /// When the state was taken.
    pub taken_at: Timestamp,
    /// Vehicles imported.
    pub vehicles: usize,
    /// Signal types whose weights were imported.
    pub weights: Vec<crate::model::SignalType>,
    /// Programs imported.
    pub programs: std::collections::BTreeMap<String, SnapshotProgram>,
}

impl Payload for SnapshotImported {
    const VERSION: u32 = 1;
    fn kind(&self) -> EventKind {
        EventKind::SnapshotImported
    }
}

/// `WeightsTuned`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(from = "WeightsChange")]
pub struct WeightsTuned {
    /// The change.
    #[serde(flatten)]
    pub change: WeightsChange,
}
payload!(WeightsTuned, WeightsTuned, 1);

impl From<WeightsChange> for WeightsTuned {
    fn from(change: WeightsChange) -> Self {
        Self { change }
    }
}

/// `VehicleDiscovered` (first state) or `VehicleStateChanged` (a change that matters).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(from = "Vehicle")]
pub struct VehicleState {
    /// The state.
    #[serde(flatten)]
    pub vehicle: Vehicle,
    /// First state (`VehicleDiscovered`) or a change.
    #[serde(skip)]
    pub discovered: bool,
}

impl From<Vehicle> for VehicleState {
    fn from(vehicle: Vehicle) -> Self {
        Self { vehicle, discovered: false }
    }
}

impl Payload for VehicleState {
    const VERSION: u32 = 1;
    fn kind(&self) -> EventKind {
        if self.discovered {
            EventKind::VehicleDiscovered
        } else {
            EventKind::VehicleStateChanged
        }
    }
}

/// `VehicleLost`: the vehicle cleared its retained state.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct VehicleLost {
    /// The vehicle.
    pub vehicle_id: VehicleId,
    /// Orders whose commitments it released.
    #[serde(default)]
    pub released_orders: Vec<OrderId>,
}
payload!(VehicleLost, VehicleLost, 1);

/// `DispatchInterrupted`: a dispatch found unfinished at start-up.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DispatchInterrupted {
    /// The dispatch.
    pub dispatch_id: DispatchId,
    /// Its signal.
    pub signal_id: String,
    /// Why.
    pub reason: String,
    /// What it had delivered when it was settled at start-up (v2; v1 rows have none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outcome: Option<crate::model::DispatchOutcome>,
}
payload!(DispatchInterrupted, DispatchInterrupted, 2);

/// `LogRecovered`: the log could be written again.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LogRecovered {
    /// What failed.
    pub error: String,
    /// Since when.
    pub failed_since: Timestamp,
    /// Signals refused meanwhile.
    pub signals_refused: u64,
}
payload!(LogRecovered, LogRecovered, 1);

/// `BrokerReconnected`: the MQTT connection is back after it was lost. Time without the
/// broker does not count against a vehicle: every attempt that was waiting for ACKs got its
/// whole ACK window again from this event's time.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BrokerReconnected {
    /// When the connection was found lost.
    pub lost_at: Timestamp,
    /// The dispatches whose ACK window restarted.
    pub windows_restarted: Vec<DispatchId>,
}
payload!(BrokerReconnected, BrokerReconnected, 1);

/// `ConfigRecorded`: the validated configuration in force from now on.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ConfigRecorded {
    /// SHA-256 of `config` as written here, hex.
    pub hash: String,
    /// The configuration (the YAML's keys, defaults filled in).
    pub config: Value,
}
payload!(ConfigRecorded, ConfigRecorded, 1);

impl ConfigRecorded {
    /// The record of `config`.
    pub fn of(config: &crate::config::Config) -> ConfigRecorded {
        // A config is plain data with string keys: serializing it cannot fail.
        let config = serde_json::to_value(config).unwrap_or(Value::Null);
        ConfigRecorded { hash: sha256_hex(config.to_string().as_bytes()), config }
    }

    /// The configuration recorded.
    pub fn config(&self) -> Result<crate::config::Config, serde_json::Error> {
        crate::config::Config::deserialize(&self.config)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::{Event, StoredEvent};
    use crate::replay::DispatchProjection;

    #[test]
    fn hashes_are_lower_case_hex_of_sha256() {
        assert_eq!(hex(&[0x00, 0xab, 0x0f, 0xf0]), "00ab0ff0");
        // SHA-256 of "abc" (FIPS 180-2, appendix B.1).
        assert_eq!(sha256_hex(b"abc"), "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
    }

    /// Rows as the gateway wrote them before payloads had versions (from a demo run, plus
    /// the kinds a demo does not produce), one per line.
    const V1_ROWS: &str = include_str!("../../../tests/fixtures/events-v1.jsonl");

    fn v1_rows() -> Vec<StoredEvent> {
        V1_ROWS.lines().map(|l| serde_json::from_str(l).unwrap()).collect()
    }

    #[test]
    fn every_version_1_row_reads_in_todays_shape() {
        let rows = v1_rows();
        let mut kinds = std::collections::BTreeSet::new();
        for row in &rows {
            let decoded = decode(&row.kind, &row.payload).unwrap_or_else(|e| panic!("seq {}: {e}", row.seq));
            kinds.insert(row.kind.clone());
            match decoded {
                Decoded::OrdersSent(o) => {
                    let id = row.payload["order_id"].as_str().unwrap();
                    let orders = o.to_orders(&DispatchId::from(row.correlation_id.as_deref().unwrap()));
                    assert_eq!(orders.len(), 1);
                    assert_eq!(orders[0].order_id, id, "the order keeps its id");
                    assert_eq!(orders[0].power_kw, row.payload["power_kw"].as_f64().unwrap());
                }
                Decoded::AcksReceived(a) => {
                    let (_, n) = crate::model::order_number(row.payload["order_id"].as_str().unwrap()).unwrap();
                    assert_eq!(a.accepted, vec![n]);
                }
                Decoded::AcksTimedOut(t) => assert_eq!(t.orders.len(), 1),
                Decoded::OrdersCancelled(c) => assert_eq!(c.reason, row.payload["reason"].as_str().unwrap()),
                Decoded::FallbackApplied(f) => {
                    assert_eq!(f.candidates.len(), row.payload["candidates"].as_array().unwrap().len());
                }
                Decoded::PlanCreated(p) => assert!(p.fleet.is_none(), "version 1 plans inlined their fleet"),
                Decoded::ConstraintApplied(c) => {
                    assert_eq!(c.excluded_count(), row.payload["excluded"].as_array().unwrap().len());
                }
                Decoded::VehicleLost(l) if l.vehicle_id.as_str() == "ev049" => assert!(l.released_orders.is_empty()),
                Decoded::Untyped(k) => panic!("{k} has a typed payload"),
                _ => {}
            }
        }
        assert_eq!(kinds.len(), 16, "the fixture covers every kind a version 1 gateway wrote: {kinds:?}");
        // And the projection folds them.
        let mut p = DispatchProjection::new();
        for row in &rows {
            p.apply(row).unwrap();
        }
        assert_eq!(p.state().signal_ids.len(), 2);
        assert!(p.state().weights.contains_key(&crate::model::SignalType::Fcr));
    }

    #[test]
    fn todays_payloads_read_back_equal_and_newer_versions_are_refused() {
        let sent = OrdersSent {
            attempt: 2,
            direction: crate::model::OrderDirection::Discharge,
            start: Timestamp::from_millis(1_000),
            until: Timestamp::from_millis(61_000),
            first: 1,
            orders: vec![(VehicleId::from("a"), 1.5), (VehicleId::from("b"), 0.1 + 0.2)],
        };
        let e = Event::of(Timestamp::from_millis(5), "dispatcher", &sent).correlation("d1");
        let row = StoredEvent::new(1, e);
        assert_eq!(row.payload["v"], 2);
        assert_eq!(decode(&row.kind, &row.payload).unwrap(), Decoded::OrdersSent(sent.clone()));
        assert_eq!(sent.to_orders(&DispatchId::from("d1"))[1].order_id, "d1-2-2");
        let mut newer = row.payload.clone();
        newer["v"] = 3.into();
        let err = decode("OrderSent", &newer).unwrap_err().to_string();
        assert!(err.contains("version 3 is newer"), "{err}");
        assert!(decode("NoSuchKind", &newer).is_err());
        assert_eq!(crate::model::order_number("d1796165615160-1-2-18"), Some((2, 18)));
        assert_eq!(crate::model::order_number("x"), None);
    }

    /// Version 1 of `ConstraintApplied` (one object per vehicle left out, as gateways wrote
    /// it with `"v":1`) reads grouped by reason; today's is grouped on the wire, a fifth of
    /// the size for a depot whose 1,000 vehicles are all committed.
    #[test]
    fn constraints_of_version_1_read_grouped_and_todays_are_small() {
        let v1 = r#"{"v":1,"eligible":1,"excluded":[{"vehicle_id":"ev1","reason":"committed_other_way"},{"vehicle_id":"ev2","reason":"not_plugged_in"},{"vehicle_id":"ev3","reason":"committed_other_way"}],"capacity_kw":7.0,"target_kw":20.0,"target_capped_to_capacity":true,"limits":[]}"#;
        let Ok(Decoded::ConstraintApplied(c)) = decode_str("ConstraintApplied", v1) else { panic!("decodes") };
        let ids = |r| c.excluded[&r].iter().map(VehicleId::as_str).collect::<Vec<_>>();
        assert_eq!(ids(Exclusion::CommittedOtherWay), ["ev1", "ev3"]);
        assert_eq!(ids(Exclusion::NotPluggedIn), ["ev2"]);
        assert_eq!((c.excluded.len(), c.excluded_count(), c.eligible), (2, 3, 1));

        let all: Vec<VehicleId> = (0..1_000).map(|i| VehicleId::from(format!("ev{i:05}").as_str())).collect();
        let today = ConstraintApplied {
            eligible: 0,
            excluded: BTreeMap::from([(Exclusion::CommittedOtherWay, all.clone())]),
            capacity_kw: 0.0,
            target_kw: 500.0,
            target_capped_to_capacity: true,
            limits: Vec::new(),
        };
        let e = Event::of(Timestamp::from_millis(5), "dispatcher", &today);
        assert!(e.payload.starts_with(r#"{"v":2,"#), "{}", &e.payload[..20]);
        assert_eq!(decode_str("ConstraintApplied", &e.payload).unwrap(), Decoded::ConstraintApplied(today));
        let v1: Vec<serde_json::Value> =
            all.iter().map(|id| serde_json::json!({ "vehicle_id": id, "reason": "committed_other_way" })).collect();
        let v1_bytes = serde_json::to_string(&v1).unwrap().len();
        assert!(
            e.payload.len() * 4 < v1_bytes,
            "{} bytes against {v1_bytes} for the list of version 1",
            e.payload.len()
        );
    }
}
