//! The topic layout under the configured prefix, and which inbound topic a publish came on.

use super::*;

/// The topic layout under one prefix (`gridweaver/<site>` by default).
#[derive(Clone, Debug)]
pub struct Topics {
    prefix: String,
}

/// Which inbound topic a publish arrived on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum InboundTopic {
    /// `<p>/signals`
    Signals,
    /// `<p>/vehicles/<id>/state`
    VehicleState(VehicleId),
    /// `<p>/vehicles/<id>/ack`
    VehicleAck(VehicleId),
    /// `<p>/bids`
    Bids,
}

impl InboundTopic {
    /// The field that names a message of this topic in an Error's `ref`: a signal's `id`,
    /// an ACK's `order_id`, a bid's `request_id` (a vehicle state has none).
    pub fn reference_field(&self) -> Option<&'static str> {
        match self {
            InboundTopic::Signals => Some("id"),
            InboundTopic::VehicleAck(_) => Some("order_id"),
            InboundTopic::Bids => Some("request_id"),
            InboundTopic::VehicleState(_) => None,
        }
    }
}

impl Topics {
    /// The layout under `prefix` (no trailing slash).
    pub fn new(prefix: impl Into<String>) -> Self {
        Self { prefix: prefix.into().trim_end_matches('/').to_owned() }
    }

    /// The prefix.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The filters to subscribe to, in order.
    pub fn subscriptions(&self) -> [String; 4] {
        let p = &self.prefix;
        [format!("{p}/signals"), format!("{p}/vehicles/+/state"), format!("{p}/vehicles/+/ack"), format!("{p}/bids")]
    }

    /// `<p>/signals`
    pub fn signals(&self) -> String {
        format!("{}/signals", self.prefix)
    }
    /// `<p>/bids`
    pub fn bids(&self) -> String {
        format!("{}/bids", self.prefix)
    }
    /// `<p>/vehicles/<id>/state`
    pub fn vehicle_state(&self, id: &VehicleId) -> String {
        format!("{}/vehicles/{id}/state", self.prefix)
    }
    /// `<p>/vehicles/<id>/ack`
    pub fn vehicle_ack(&self, id: &VehicleId) -> String {
        format!("{}/vehicles/{id}/ack", self.prefix)
    }
    /// `<p>/vehicles/<id>/order`
    pub fn vehicle_order(&self, id: &VehicleId) -> String {
        format!("{}/vehicles/{id}/order", self.prefix)
    }
    /// `<p>/dispatches/<dispatch_id>`
    pub fn dispatch(&self, dispatch_id: &str) -> String {
        format!("{}/dispatches/{dispatch_id}", self.prefix)
    }
    /// `<p>/capacity`
    pub fn capacity(&self) -> String {
        format!("{}/capacity", self.prefix)
    }
    /// `<p>/events`
    pub fn events(&self) -> String {
        format!("{}/events", self.prefix)
    }
    /// `<p>/errors`
    pub fn errors(&self) -> String {
        format!("{}/errors", self.prefix)
    }
    /// `<p>/status`
    pub fn status(&self) -> String {
        format!("{}/status", self.prefix)
    }

    /// Classifies a topic; `None` when it is not under the prefix at all.
    pub fn classify(&self, topic: &str) -> Option<Result<InboundTopic, InputError>> {
        let rest = topic.strip_prefix(&self.prefix)?.strip_prefix('/')?;
        let parts: Vec<&str> = rest.split('/').collect();
        Some(match parts.as_slice() {
            ["signals"] => Ok(InboundTopic::Signals),
            ["bids"] => Ok(InboundTopic::Bids),
            ["vehicles", id, leaf @ ("state" | "ack")] => match vehicle_id(id) {
                Ok(id) if *leaf == "state" => Ok(InboundTopic::VehicleState(id)),
                Ok(id) => Ok(InboundTopic::VehicleAck(id)),
                Err(e) => Err(e),
            },
            _ => Err(InputError::UnknownTopic),
        })
    }
}

pub(super) fn vehicle_id(s: &str) -> Result<VehicleId, InputError> {
    VehicleId::parse(s).ok_or_else(|| InputError::BadVehicleId(s.chars().take(MAX_ID_LEN).collect()))
}
