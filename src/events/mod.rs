//! The event log's vocabulary: every decision the controller takes becomes an [`Event`].
//!
//! The runtime appends events to SQLite (the contract's `events` table) in the order the
//! core produced them; [`EventStore`] is the interface, [`MemoryStore`] an in-memory one
//! for tests. A stored event gets its `seq` from the store: strictly increasing, no gaps.

use std::fmt;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::time::Timestamp;

pub mod payload;
pub mod pipeline;
pub mod refusals;

pub use payload::ProjectedState;
pub use payload::{decode, Decoded, Payload, PayloadError};

macro_rules! event_kinds {
    ($($(#[$doc:meta])* $name:ident),* $(,)?) => {
        /// The contract's event kinds.
        #[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
        pub enum EventKind {
            $($(#[$doc])* $name,)*
        }

        impl EventKind {
            /// Every kind.
            pub const ALL: &'static [EventKind] = &[$(EventKind::$name,)*];

            /// The contract's name, as stored in the `kind` column.
            pub fn as_str(self) -> &'static str {
                match self {
                    $(EventKind::$name => stringify!($name),)*
                }
            }
        }
    };
}

event_kinds! {
    /// A valid signal arrived.
    SignalReceived,
    /// A signal was refused (malformed, duplicate, stale term, other region).
    SignalRejected,
    /// Other inbound input was refused (vehicle state, ACK, bid).
    InputRejected,
    /// The allocation of a dispatch: inputs, strategy, result.
    DispatchPlanCreated,
    /// The constraints applied before allocating: exclusions, capacity caps.
    ConstraintApplied,
    /// An order to a vehicle (written before it is published).
    OrderSent,
    /// A vehicle answered an order in time.
    AckReceived,
    /// An order was not answered by its deadline.
    AckTimedOut,
    /// The residual of a dispatch was reallocated.
    FallbackApplied,
    /// A dispatch settled; the payload is its outcome.
    DispatchCompleted,
    /// A demand-response program was activated.
    DemandResponseActivated,
    /// A curtailment was recorded.
    CurtailmentRecorded,
    /// The tuner changed weights.
    WeightsTuned,
    /// A vehicle published its first state.
    VehicleDiscovered,
    /// A vehicle cleared its retained state.
    VehicleLost,
    /// A bid arrived.
    BidSubmitted,
    /// A bid was accepted.
    BidAccepted,
    /// A bid was rejected.
    BidRejected,
    /// A bid expired.
    BidExpired,
    /// The leader ordered a cross-region transfer.
    TransferOrdered,
    /// This node became leader.
    LeaderElected,
    /// A dispatch was found unfinished at start-up.
    DispatchInterrupted,
    /// An order was withdrawn (no answer by its deadline, replaced, shutdown).
    OrderCancelled,
    /// The event log could be written again after it failed (since when, why, how many
    /// signals were refused meanwhile).
    LogRecovered,
    /// The MQTT broker could be reached again after the connection was lost (since when,
    /// and the ACK windows restarted because of it).
    BrokerReconnected,
    /// A known vehicle's state changed in a way that matters to a plan.
    VehicleStateChanged,
    /// The validated configuration in force (at start-up, and whenever it changes).
    ConfigRecorded,
    /// A site's existing state imported into a new log (`gridweaver migrate`).
    SnapshotImported,
    /// Older rows removed in one retention step, with the state they folded to
    /// (`gridweaver compact`).
    LogCompacted,
}

impl EventKind {
    /// The kind with this name (exact, as stored).
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.iter().copied().find(|k| k.as_str() == s)
    }
}

impl fmt::Display for EventKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One decision or observation, before the store numbers it.
#[derive(Clone, Debug, PartialEq)]
pub struct Event {
    /// When it happened.
    pub ts: Timestamp,
    /// What it is.
    pub kind: EventKind,
    /// The dispatch, bid or transfer it belongs to.
    pub correlation_id: Option<String>,
    /// Who decided: `dispatcher`, `vehicle/<id>`, `supervisor`, ...
    pub actor: String,
    /// The region of the deciding site.
    pub region: Option<String>,
    /// Everything needed to reproduce the decision: a JSON object, already serialized
    /// (decisions are written once and rarely read back, so they are rendered straight to
    /// text without building a JSON tree).
    pub payload: String,
}

impl Event {
    /// An event with an empty payload; fill it in with the builder methods.
    pub fn new(ts: Timestamp, kind: EventKind, actor: impl Into<String>) -> Self {
        Self { ts, kind, correlation_id: None, actor: actor.into(), region: None, payload: "{}".to_owned() }
    }

    /// The event recording `payload`, written in its current version.
    pub fn of<P: Payload>(ts: Timestamp, actor: impl Into<String>, payload: &P) -> Self {
        let versioned = payload::Versioned { v: P::VERSION, payload };
        Self::new(ts, payload.kind(), actor).payload(versioned)
    }

    /// Sets the correlation id.
    pub fn correlation(mut self, id: impl Into<String>) -> Self {
        self.correlation_id = Some(id.into());
        self
    }

    /// Sets the region.
    pub fn region(mut self, region: Option<&str>) -> Self {
        self.region = region.map(str::to_owned);
        self
    }

    /// Sets the payload from anything serializable (a serialization failure, which the
    /// core's own types cannot produce, is recorded as `{"error": ...}`, never lost).
    pub fn payload(mut self, payload: impl Serialize) -> Self {
        self.payload = serde_json::to_string(&payload)
            .unwrap_or_else(|e| serde_json::json!({ "error": e.to_string() }).to_string());
        self
    }

    /// The payload parsed (for tests and readers; `Null` if it were not JSON).
    pub fn payload_value(&self) -> Value {
        serde_json::from_str(&self.payload).unwrap_or(Value::Null)
    }
}

/// An event as stored: a row of the `events` table. Serializes as that row with the
/// payload inlined, which is also the `<p>/events` live-tail payload.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StoredEvent {
    /// Position in the log.
    pub seq: u64,
    /// Unix epoch milliseconds.
    pub ts_ms: i64,
    /// The kind's name.
    pub kind: String,
    /// The correlation id.
    pub correlation_id: Option<String>,
    /// Who decided.
    pub actor: String,
    /// The region.
    pub region: Option<String>,
    /// The payload object.
    pub payload: Value,
}

impl StoredEvent {
    /// The row for `event` at position `seq`.
    pub fn new(seq: u64, event: Event) -> Self {
        Self {
            seq,
            ts_ms: event.ts.as_millis(),
            kind: event.kind.as_str().to_owned(),
            correlation_id: event.correlation_id,
            actor: event.actor,
            region: event.region,
            payload: serde_json::from_str(&event.payload).unwrap_or(Value::Null),
        }
    }
}

/// An append-only event log.
pub trait EventStore {
    /// The store's error.
    type Error: std::error::Error + Send + Sync + 'static;
    /// Appends `events` atomically, in order; returns the seq of the first (the rest follow
    /// without gaps). Durable when it returns.
    fn append(&mut self, events: &[Event]) -> Result<u64, Self::Error>;
    /// Up to `limit` events with `seq >= from`, in order.
    fn read_from(&self, from: u64, limit: usize) -> Result<Vec<StoredEvent>, Self::Error>;
    /// Every event of one correlation id, in order.
    fn read_correlation(&self, id: &str) -> Result<Vec<StoredEvent>, Self::Error>;
}

/// An [`EventStore`] in memory, for tests of the core.
#[derive(Clone, Debug, Default)]
pub struct MemoryStore {
    rows: Vec<StoredEvent>,
}

impl MemoryStore {
    /// Every stored row.
    pub fn rows(&self) -> &[StoredEvent] {
        &self.rows
    }
}

impl EventStore for MemoryStore {
    type Error = std::convert::Infallible;

    fn append(&mut self, events: &[Event]) -> Result<u64, Self::Error> {
        let first = self.rows.len() as u64 + 1;
        for (i, e) in events.iter().enumerate() {
            self.rows.push(StoredEvent::new(first + i as u64, e.clone()));
        }
        Ok(first)
    }

    fn read_from(&self, from: u64, limit: usize) -> Result<Vec<StoredEvent>, Self::Error> {
        let start = usize::try_from(from.saturating_sub(1)).unwrap_or(usize::MAX).min(self.rows.len());
        Ok(self.rows[start..].iter().take(limit).cloned().collect())
    }

    fn read_correlation(&self, id: &str) -> Result<Vec<StoredEvent>, Self::Error> {
        Ok(self.rows.iter().filter(|r| r.correlation_id.as_deref() == Some(id)).cloned().collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_round_trip_by_name() {
        for k in EventKind::ALL {
            assert_eq!(EventKind::parse(k.as_str()), Some(*k));
        }
        assert_eq!(EventKind::ALL.len(), 29);
        assert_eq!(EventKind::parse("signalreceived"), None);
    }

    #[test]
    fn memory_store_numbers_without_gaps_and_reads_by_correlation() {
        let mut s = MemoryStore::default();
        let t = Timestamp::from_millis(5);
        let first = s.append(&[Event::new(t, EventKind::SignalReceived, "dispatcher").correlation("d1")]).unwrap();
        let second = s
            .append(&[
                Event::new(t, EventKind::OrderSent, "dispatcher").correlation("d2"),
                Event::new(t, EventKind::OrderSent, "dispatcher").correlation("d1"),
            ])
            .unwrap();
        assert_eq!((first, second), (1, 2));
        assert_eq!(s.read_from(2, 10).unwrap().iter().map(|r| r.seq).collect::<Vec<_>>(), vec![2, 3]);
        assert_eq!(s.read_correlation("d1").unwrap().iter().map(|r| r.seq).collect::<Vec<_>>(), vec![1, 3]);
    }

    #[test]
    fn stored_rows_serialize_with_the_payload_inlined() {
        let e = Event::new(Timestamp::from_millis(7), EventKind::AckReceived, "vehicle/v1")
            .correlation("d1")
            .payload(serde_json::json!({"order_id": "o1"}));
        let row = serde_json::to_value(StoredEvent::new(3, e)).unwrap();
        assert_eq!(row["kind"], "AckReceived");
        assert_eq!(row["payload"]["order_id"], "o1");
        assert_eq!(row["seq"], 3);
    }
}
