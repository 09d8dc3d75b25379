//! The gateway's state as the log folds to it ([`ProjectedState`]): what a compaction's
//! snapshot ([`LogCompacted`]) holds. The fold itself is [`crate::replay::projection`]'s.

use std::collections::{BTreeMap, VecDeque};

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use super::ConfigRecorded;
use crate::allocation::Weights;
use crate::model::{Attempt, DispatchId, DispatchOutcome, Order, Signal, SignalType, StrategyKind, Vehicle, VehicleId};
use crate::time::Timestamp;

/// Signal ids remembered for duplicate detection.
pub const REMEMBERED_SIGNALS: usize = 100_000;
/// Answers kept for the prediction: at most this many, of the last [`ANSWER_DAYS`] days.
pub const REMEMBERED_ANSWERS: usize = 200_000;
/// Days of answers kept for the prediction.
pub const ANSWER_DAYS: i64 = 30;
/// Settled dispatches whose outcome is kept.
pub const REMEMBERED_OUTCOMES: usize = 100;

/// What became of an order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OrderAnswer {
    /// Sent, not answered.
    Pending,
    /// The vehicle accepted.
    Accepted,
    /// The vehicle refused.
    Rejected,
    /// No answer by the deadline.
    TimedOut,
}

/// An order of a dispatch in flight.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ProjectedOrder {
    /// Its attempt.
    pub attempt: u32,
    /// Its number in the attempt.
    pub n: u32,
    /// The vehicle.
    pub vehicle_id: VehicleId,
    /// kW ordered.
    pub power_kw: f64,
    /// What became of it.
    pub answer: OrderAnswer,
}

/// A dispatch planned and not yet settled.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ProjectedDispatch {
    /// Its signal's id.
    pub signal_id: String,
    /// The signal (absent when the log lacks its `SignalReceived`).
    pub signal: Option<Signal>,
    /// When it was planned.
    pub planned_at: Timestamp,
    /// The strategy its plan used (absent in snapshots from before it was kept).
    #[serde(default)]
    pub strategy: Option<StrategyKind>,
    /// Attempts sent so far.
    pub attempts: u32,
    /// Every order sent, in the order they were sent (by attempt and number).
    #[serde(with = "sent_orders")]
    pub orders: BTreeMap<(u32, u32), ProjectedOrder>,
}

/// A dispatch's orders as a list (each names its attempt and number).
mod sent_orders {
    use super::*;

    pub fn serialize<S: Serializer>(m: &BTreeMap<(u32, u32), ProjectedOrder>, s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(m.values())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<BTreeMap<(u32, u32), ProjectedOrder>, D::Error> {
        let orders = Vec::<ProjectedOrder>::deserialize(d)?;
        Ok(orders.into_iter().map(|o| ((o.attempt, o.n), o)).collect())
    }
}

/// The orders of one dispatch whose power is still committed (sent or accepted, not
/// released). Every order of a dispatch serves one signal window.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ProjectedCommitments {
    /// The signal of the dispatch.
    pub signal_id: String,
    /// Discharge or charge.
    pub direction: crate::model::OrderDirection,
    /// Window start.
    pub start: Timestamp,
    /// Window end.
    pub until: Timestamp,
    /// `[attempt, n]` -> vehicle, kW, accepted?
    #[serde(with = "committed_orders")]
    pub orders: CommittedOrders,
}

impl ProjectedCommitments {
    /// Its orders, with whether each was accepted, in `[attempt, n]` order.
    pub(crate) fn orders<'a>(&'a self, dispatch_id: &'a DispatchId) -> impl Iterator<Item = (Order, bool)> + 'a {
        self.orders.iter().map(move |((attempt, n), (vehicle, kw, accepted))| {
            let (direction, start, until) = (self.direction, self.start, self.until);
            let attempt = Attempt { dispatch_id, attempt: *attempt, direction, start, until };
            (attempt.order(*n, vehicle.clone(), *kw), *accepted)
        })
    }
}

/// The committed orders of a dispatch: `[attempt, n]` -> vehicle, kW, accepted?
pub type CommittedOrders = BTreeMap<(u32, u32), (VehicleId, f64, bool)>;

/// Committed orders as a list of rows.
mod committed_orders {
    use super::*;

    #[derive(Serialize, Deserialize)]
    struct Row<V> {
        attempt: u32,
        n: u32,
        vehicle_id: V,
        power_kw: f64,
        accepted: bool,
    }

    pub fn serialize<S: Serializer>(m: &CommittedOrders, s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(m.iter().map(|((attempt, n), (vehicle_id, power_kw, accepted))| Row {
            attempt: *attempt,
            n: *n,
            vehicle_id,
            power_kw: *power_kw,
            accepted: *accepted,
        }))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<CommittedOrders, D::Error> {
        let rows = Vec::<Row<VehicleId>>::deserialize(d)?;
        Ok(rows.into_iter().map(|r| ((r.attempt, r.n), (r.vehicle_id, r.power_kw, r.accepted))).collect())
    }
}

/// The gateway's state after the events folded so far. Its JSON is complete (a
/// compaction's snapshot is this state, read back exactly); [`ProjectedState::summary`] is
/// the shorter form `gridweaver replay` prints.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ProjectedState {
    /// The last event folded.
    pub seq: u64,
    /// Its time.
    pub ts: Option<Timestamp>,
    /// The configuration in force, as last recorded.
    pub config: Option<ConfigRecorded>,
    /// The vehicles known, by id.
    pub fleet: BTreeMap<VehicleId, Vehicle>,
    /// When each one's state was recorded (the energy its commitments drew since then is
    /// not in its SoC yet).
    #[serde(default)]
    pub fleet_at: BTreeMap<VehicleId, Timestamp>,
    /// Signal ids seen, oldest first (at most [`REMEMBERED_SIGNALS`]).
    pub signal_ids: VecDeque<String>,
    /// The highest leader term on a signal.
    pub highest_term: Option<u64>,
    /// The number of the last dispatch planned (`d<ms>-<n>`).
    pub dispatches: u64,
    /// Dispatches planned and not settled, by id.
    pub in_flight: BTreeMap<DispatchId, ProjectedDispatch>,
    /// Dispatches settled (completed or interrupted).
    pub settled: u64,
    /// The last settled outcomes, oldest first (at most [`REMEMBERED_OUTCOMES`]).
    pub outcomes: VecDeque<DispatchOutcome>,
    /// Orders still committed, by dispatch.
    pub commitments: BTreeMap<DispatchId, ProjectedCommitments>,
    /// Tuned weights per signal type.
    pub weights: BTreeMap<SignalType, Weights>,
    /// Answers to orders (vehicle, when the dispatch settled, accepted?), oldest first.
    pub answers: VecDeque<(VehicleId, Timestamp, bool)>,
    /// The vehicles each of the last dispatches ordered in its first attempt, oldest first.
    pub participation: VecDeque<Vec<VehicleId>>,
    /// Inbound messages refused.
    pub rejected: u64,
    /// Signals dispatched whose window is still open, with their dispatch: what a
    /// `replaces` can name. A setpoint stream goes on after a restart even when its last
    /// setpoint got nothing (no order, so no commitment to find it by).
    #[serde(default)]
    pub streams: BTreeMap<String, (DispatchId, Timestamp)>,
    /// The last signal received, until its plan claims it.
    #[serde(default, rename = "pending_signal", skip_serializing_if = "Option::is_none")]
    pub(crate) last_signal: Option<Signal>,
}

/// `LogCompacted`: `gridweaver compact` removed the rows up to `through_seq` in one
/// retention step; `state` is what they folded to. Replay, audit and start-up begin from
/// it and fold the rows after `through_seq`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LogCompacted {
    /// The time given to `--before`: every row removed was before the first row stamped at
    /// or after it.
    pub before: Timestamp,
    /// The last row removed.
    pub through_seq: u64,
    /// Rows removed (every row from the log's first up to `through_seq`).
    pub removed: u64,
    /// The chain hash of row `through_seq`: the first row kept chains to it.
    pub anchor: String,
    /// The projected state as of `through_seq`.
    pub state: ProjectedState,
}
impl super::Payload for LogCompacted {
    const VERSION: u32 = 1;
    fn kind(&self) -> super::EventKind {
        super::EventKind::LogCompacted
    }
}
