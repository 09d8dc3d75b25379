//! Outbound MQTT: a cheap, cloneable handle to the one client's request channel.
//!
//! Every actor that publishes holds a [`Publisher`]. `try_publish` puts the message on
//! rumqttc's bounded request channel without waiting; when the channel is full the
//! message is handed to a task that waits for room, so an order is never dropped by the
//! gateway itself (a broker outage may still lose it: the ACK deadline covers that).

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use gridweaver_core::model::{DispatchOutcome, Order};
use gridweaver_core::time::Timestamp;
use gridweaver_core::wire::{ErrorReport, Topics};
use rumqttc::{AsyncClient, ClientError, QoS, Request};

/// Refuses an inbound message the contract's way: records a `SignalRejected` or
/// `InputRejected` event (`kind`) naming `actor`, and answers on `<p>/errors`. Nothing else
/// changes.
#[allow(clippy::too_many_arguments)]
pub fn reject(
    store: &crate::store::StoreHandle,
    publisher: &Publisher,
    region: &str,
    kind: gridweaver_core::events::EventKind,
    actor: String,
    topic: &str,
    why: &str,
    payload: &[u8],
) {
    let t = now();
    store.record(vec![gridweaver_core::wire::rejection_event(t, kind, actor, region, topic, why, payload)]);
    publisher.error(topic, why, t);
}

/// Largest MQTT packet the gateway sends or accepts.
pub const MAX_PACKET_BYTES: usize = 256 * 1024;

/// The wall clock, as the core's time type. The only clock read of the controller.
pub fn now() -> Timestamp {
    let ms = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis());
    Timestamp::from_millis(i64::try_from(ms).unwrap_or(i64::MAX))
}

/// Publishes the contract's outbound messages.
#[derive(Clone)]
pub struct Publisher {
    client: AsyncClient,
    topics: Arc<Topics>,
}

impl Publisher {
    /// A publisher on `client` under `topics`.
    pub fn new(client: AsyncClient, topics: Arc<Topics>) -> Self {
        Self { client, topics }
    }

    /// The topic layout.
    pub fn topics(&self) -> &Topics {
        &self.topics
    }

    /// The client, for subscribing and disconnecting.
    pub fn client(&self) -> &AsyncClient {
        &self.client
    }

    /// Publishes `payload` on `topic`; waits for room in a task when the channel is full.
    /// A message larger than the client's packet limit is dropped with an error log: rumqttc
    /// would otherwise fail the whole connection over it.
    pub fn raw(&self, topic: String, qos: QoS, retain: bool, payload: Vec<u8>) {
        if payload.len() + topic.len() + 16 > MAX_PACKET_BYTES {
            tracing::error!(%topic, bytes = payload.len(), "message larger than the MQTT packet limit; not published");
            return;
        }
        match self.client.try_publish(topic, qos, retain, payload) {
            Ok(()) => {}
            Err(ClientError::TryRequest(Request::Publish(p)) | ClientError::Request(Request::Publish(p))) => {
                if qos == QoS::AtMostOnce {
                    return; // live tail: dropped under load by design
                }
                let client = self.client.clone();
                tokio::spawn(async move {
                    if let Err(e) = client.publish(p.topic.clone(), p.qos, p.retain, p.payload.to_vec()).await {
                        tracing::error!(topic = %p.topic, error = %e, "publish failed: the MQTT client has stopped");
                    }
                });
            }
            Err(e) => tracing::error!(error = %e, "publish failed"),
        }
    }

    /// Publishes a serializable value as JSON.
    fn json(&self, topic: String, qos: QoS, retain: bool, value: &impl serde::Serialize) {
        match serde_json::to_vec(value) {
            Ok(bytes) => self.raw(topic, qos, retain, bytes),
            Err(e) => tracing::error!(%topic, error = %e, "cannot serialize an outbound message"),
        }
    }

    /// `<p>/vehicles/<id>/order`, QoS 1.
    pub fn order(&self, order: &Order) {
        self.json(self.topics.vehicle_order(&order.vehicle_id), QoS::AtLeastOnce, false, order);
    }

    /// `<p>/dispatches/<id>`, QoS 1.
    pub fn outcome(&self, outcome: &DispatchOutcome) {
        self.json(self.topics.dispatch(&outcome.dispatch_id), QoS::AtLeastOnce, false, outcome);
    }

    /// `<p>/capacity`, QoS 1, retained.
    pub fn capacity(&self, capacity: &impl serde::Serialize) {
        self.json(self.topics.capacity(), QoS::AtLeastOnce, true, capacity);
    }

    /// `<p>/errors`, QoS 1: one per rejected inbound message.
    pub fn error(&self, topic: &str, error: &str, received_at: Timestamp) {
        let report = ErrorReport { topic: topic.to_owned(), error: error.to_owned(), received_at };
        self.json(self.topics.errors(), QoS::AtLeastOnce, false, &report);
    }

    /// `<p>/events`, QoS 0: rows already rendered by the store.
    pub fn tail(&self, rows: Vec<String>) {
        let topic = self.topics.events();
        for row in rows {
            self.raw(topic.clone(), QoS::AtMostOnce, false, row.into_bytes());
        }
    }

    /// `<p>/status`, QoS 1, retained: `online` or `offline`.
    pub fn status(&self, online: bool) {
        let state = if online { "online" } else { "offline" };
        self.json(self.topics.status(), QoS::AtLeastOnce, true, &serde_json::json!({ "state": state }));
    }
}
