//! Reading payloads back: [`decode`] every kind, every version (older versions upcast to
//! the current shape: `mod v1`).

use serde_json::Value;

use super::*;

/// A payload read back, in its current shape.
#[derive(Clone, Debug, PartialEq)]
pub enum Decoded {
    /// `SignalReceived`.
    SignalReceived(SignalReceived),
    /// `SignalRejected`, `InputRejected`.
    Rejected(Rejected),
    /// `ConstraintApplied`.
    ConstraintApplied(ConstraintApplied),
    /// `DispatchPlanCreated`.
    PlanCreated(PlanCreated),
    /// `OrderSent`.
    OrdersSent(OrdersSent),
    /// `AckReceived`.
    AcksReceived(AcksReceived),
    /// `AckTimedOut`.
    AcksTimedOut(AcksTimedOut),
    /// `OrderCancelled`.
    OrdersCancelled(OrdersCancelled),
    /// `FallbackApplied`.
    FallbackApplied(FallbackApplied),
    /// `DispatchCompleted`.
    DispatchCompleted(DispatchCompleted),
    /// `WeightsTuned`.
    WeightsTuned(WeightsTuned),
    /// `VehicleDiscovered`, `VehicleStateChanged`.
    VehicleState(VehicleState),
    /// `VehicleLost`.
    VehicleLost(VehicleLost),
    /// `DispatchInterrupted`.
    DispatchInterrupted(DispatchInterrupted),
    /// `LogRecovered`.
    LogRecovered(LogRecovered),
    /// `BrokerReconnected`.
    BrokerReconnected(BrokerReconnected),
    /// `ConfigRecorded`.
    ConfigRecorded(ConfigRecorded),
    /// `SnapshotImported`.
    SnapshotImported(SnapshotImported),
    /// `LogCompacted`.
    LogCompacted(Box<LogCompacted>),
    /// A kind with no typed payload yet (bids, transfers, programs, leadership).
    Untyped(EventKind),
}

/// A payload that cannot be read.
#[derive(Debug, thiserror::Error)]
pub enum PayloadError {
    /// No such kind.
    #[error("unknown event kind `{0}`")]
    UnknownKind(String),
    /// A version newer than this build knows.
    #[error("{kind} payload version {got} is newer than this build reads (at most {max})")]
    TooNew {
        /// The kind.
        kind: EventKind,
        /// Its version.
        got: u64,
        /// The newest known.
        max: u32,
    },
    /// The fields do not match the kind and version.
    #[error("{kind} payload (version {v}): {error}")]
    Shape {
        /// The kind.
        kind: EventKind,
        /// Its version.
        v: u64,
        /// serde's answer.
        error: serde_json::Error,
    },
}

/// Reads a stored payload of `kind`, upcasting older versions to the current shape.
pub fn decode(kind: &str, payload: &Value) -> Result<Decoded, PayloadError> {
    let v = payload.get("v").and_then(Value::as_u64).unwrap_or(1);
    decode_from(kind, v, payload)
}

/// [`decode`] straight from the stored text, without building a JSON tree first (the fast
/// path of replay: every payload this build writes starts with its version).
pub fn decode_str(kind: &str, payload: &str) -> Result<Decoded, PayloadError> {
    match written_version(payload) {
        Some(v) => decode_from(kind, v, &Text(payload)),
        None => {
            let k = EventKind::parse(kind).ok_or_else(|| PayloadError::UnknownKind(kind.to_owned()))?;
            let value: Value =
                serde_json::from_str(payload).map_err(|error| PayloadError::Shape { kind: k, v: 1, error })?;
            decode(kind, &value)
        }
    }
}

/// The version of a payload written by [`super::Event::of`] (`{"v":N,...`).
fn written_version(payload: &str) -> Option<u64> {
    let rest = payload.strip_prefix("{\"v\":")?;
    let end = rest.find(|c: char| !c.is_ascii_digit())?;
    rest[..end].parse().ok()
}

/// Where a payload is read from: a JSON tree or the stored text.
trait Source {
    fn read<P: DeserializeOwned>(&self) -> Result<P, serde_json::Error>;
}

impl Source for Value {
    fn read<P: DeserializeOwned>(&self) -> Result<P, serde_json::Error> {
        P::deserialize(self)
    }
}

struct Text<'a>(&'a str);

impl Source for Text<'_> {
    fn read<P: DeserializeOwned>(&self) -> Result<P, serde_json::Error> {
        serde_json::from_str(self.0)
    }
}

fn decode_from<S: Source>(kind: &str, v: u64, payload: &S) -> Result<Decoded, PayloadError> {
    let kind = EventKind::parse(kind).ok_or_else(|| PayloadError::UnknownKind(kind.to_owned()))?;
    let shape = |error| PayloadError::Shape { kind, v, error };
    fn read<P: Payload, S: Source>(kind: EventKind, v: u64, payload: &S) -> Result<P, PayloadError> {
        if v > u64::from(P::VERSION) {
            return Err(PayloadError::TooNew { kind, got: v, max: P::VERSION });
        }
        payload.read::<P>().map_err(|error| PayloadError::Shape { kind, v, error })
    }
    use EventKind as K;
    Ok(match kind {
        K::SignalReceived => Decoded::SignalReceived(read(kind, v, payload)?),
        K::SignalRejected | K::InputRejected => {
            let mut r: Rejected = read(kind, v, payload)?;
            r.signal = kind == K::SignalRejected;
            Decoded::Rejected(r)
        }
        K::ConstraintApplied if v == 1 => {
            let c = payload.read::<v1::Constraint>().map_err(shape)?;
            Decoded::ConstraintApplied(ConstraintApplied {
                eligible: c.eligible,
                excluded: ConstraintApplied::by_reason(c.excluded.into_iter().map(|e| (e.vehicle_id, e.reason))),
                capacity_kw: c.capacity_kw,
                target_kw: c.target_kw,
                target_capped_to_capacity: c.target_capped_to_capacity,
                limits: c.limits,
            })
        }
        K::ConstraintApplied => Decoded::ConstraintApplied(read(kind, v, payload)?),
        K::DispatchPlanCreated => Decoded::PlanCreated(read(kind, v, payload)?),
        K::OrderSent if v == 1 => {
            let o = payload.read::<Order>().map_err(shape)?;
            let mut sent = OrdersSent::of(std::slice::from_ref(&o)).unwrap_or_else(|| unreachable!());
            sent.first = o.order_id.number().map_or(1, |(_, n)| n);
            Decoded::OrdersSent(sent)
        }
        K::OrderSent => Decoded::OrdersSent(read(kind, v, payload)?),
        K::AckReceived if v == 1 => {
            let a = payload.read::<v1::Ack>().map_err(shape)?;
            let n = v1::number(&a.order_id, a.attempt).map_err(shape)?;
            let mut acks = AcksReceived { attempt: a.attempt, ..AcksReceived::default() };
            match a.status.as_str() {
                "accepted" => acks.accepted.push(n),
                _ => acks.rejected.push((n, a.reason)),
            }
            Decoded::AcksReceived(acks)
        }
        K::AckReceived => Decoded::AcksReceived(read(kind, v, payload)?),
        K::AckTimedOut if v == 1 => {
            let a = payload.read::<v1::Timeout>().map_err(shape)?;
            let n = v1::number(&a.order_id, a.attempt).map_err(shape)?;
            Decoded::AcksTimedOut(AcksTimedOut { attempt: a.attempt, orders: vec![n] })
        }
        K::AckTimedOut => Decoded::AcksTimedOut(read(kind, v, payload)?),
        K::OrderCancelled if v == 1 => {
            let c = payload.read::<crate::model::OrderCancel>().map_err(shape)?;
            let number = c
                .order_id
                .number()
                .ok_or_else(|| shape(serde::de::Error::custom(format!("order id `{}` has no number", c.order_id))))?;
            Decoded::OrdersCancelled(OrdersCancelled { reason: c.reason, at: c.at, orders: vec![number] })
        }
        K::OrderCancelled => Decoded::OrdersCancelled(read(kind, v, payload)?),
        K::FallbackApplied if v == 1 => {
            let f = payload.read::<v1::Fallback>().map_err(shape)?;
            let skipped = f.candidates.iter().enumerate().filter(|(_, c)| c.skipped).map(|(i, _)| i).collect();
            Decoded::FallbackApplied(FallbackApplied {
                fallback: f.fallback,
                attempt: f.attempt,
                residual_kw: f.residual_kw,
                reallocated_kw: f.reallocated_kw,
                candidates: f.candidates.into_iter().map(|c| (c.vehicle_id, c.remaining_kw, c.power_kw)).collect(),
                skipped,
            })
        }
        K::FallbackApplied => Decoded::FallbackApplied(read(kind, v, payload)?),
        K::DispatchCompleted => Decoded::DispatchCompleted(read(kind, v, payload)?),
        K::WeightsTuned => Decoded::WeightsTuned(read(kind, v, payload)?),
        K::VehicleDiscovered | K::VehicleStateChanged => {
            let mut s: VehicleState = read(kind, v, payload)?;
            s.discovered = kind == K::VehicleDiscovered;
            Decoded::VehicleState(s)
        }
        K::VehicleLost => Decoded::VehicleLost(read(kind, v, payload)?),
        K::DispatchInterrupted => Decoded::DispatchInterrupted(read(kind, v, payload)?),
        K::LogRecovered => Decoded::LogRecovered(read(kind, v, payload)?),
        K::BrokerReconnected => Decoded::BrokerReconnected(read(kind, v, payload)?),
        K::ConfigRecorded => Decoded::ConfigRecorded(read(kind, v, payload)?),
        K::SnapshotImported => Decoded::SnapshotImported(read(kind, v, payload)?),
        K::LogCompacted => Decoded::LogCompacted(Box::new(read(kind, v, payload)?)),
        K::DemandResponseActivated
        | K::CurtailmentRecorded
        | K::BidSubmitted
        | K::BidAccepted
        | K::BidRejected
        | K::BidExpired
        | K::TransferOrdered
        | K::LeaderElected => Decoded::Untyped(kind),
    })
}

/// Version 1 shapes (one row per order, ACK, timeout and cancel) that differ from today's.
mod v1 {
    use serde::Deserialize;

    use crate::model::{FallbackKind, VehicleId};

    #[derive(Deserialize)]
    pub(super) struct Ack {
        pub(super) order_id: String,
        pub(super) status: String,
        pub(super) reason: Option<String>,
        pub(super) attempt: u32,
    }

    #[derive(Deserialize)]
    pub(super) struct Timeout {
        pub(super) order_id: String,
        pub(super) attempt: u32,
    }

    #[derive(Deserialize)]
    pub(super) struct Excluded {
        pub(super) vehicle_id: VehicleId,
        pub(super) reason: crate::allocation::filter::Exclusion,
    }

    #[derive(Deserialize)]
    pub(super) struct Constraint {
        pub(super) eligible: usize,
        pub(super) excluded: Vec<Excluded>,
        pub(super) capacity_kw: f64,
        pub(super) target_kw: f64,
        pub(super) target_capped_to_capacity: bool,
        pub(super) limits: Vec<crate::allocation::limits::LimitRow>,
    }

    #[derive(Deserialize)]
    pub(super) struct FallbackRow {
        pub(super) vehicle_id: VehicleId,
        pub(super) remaining_kw: f64,
        pub(super) power_kw: f64,
        pub(super) skipped: bool,
    }

    #[derive(Deserialize)]
    pub(super) struct Fallback {
        pub(super) fallback: FallbackKind,
        pub(super) attempt: u32,
        pub(super) residual_kw: f64,
        pub(super) reallocated_kw: f64,
        pub(super) candidates: Vec<FallbackRow>,
    }

    /// The number of an order of `attempt`.
    pub(super) fn number(order_id: &str, attempt: u32) -> Result<u32, serde_json::Error> {
        match crate::model::order_number(order_id) {
            Some((a, n)) if a == attempt => Ok(n),
            _ => Err(serde::de::Error::custom(format!("order id `{order_id}` is not an order of attempt {attempt}"))),
        }
    }
}
