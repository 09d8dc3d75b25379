//! Outbound MQTT and the controller's clock.
//!
//! Every actor that publishes holds a [`Publisher`]: a cheap, cloneable handle to one
//! bounded, first-in-first-out queue that a single task drains into the rumqttc client.
//! One queue and one task keep every vehicle's messages in the order they were queued (a
//! cancel before the order that follows it); when the queue is full a message is dropped
//! with an error log rather than held in a growing pile of tasks (the ACK deadline covers a
//! lost order, and its cancel follows it).
//!
//! [`now`] is the only clock read of the controller (see its docs).

use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use gridweaver_core::model::{DispatchOutcome, Order, OrderCancel};
use gridweaver_core::time::Timestamp;
use gridweaver_core::wire::{ErrorReport, Topics};
use rumqttc::{AsyncClient, QoS};
use tokio::sync::mpsc;
use tokio::time::Instant;

/// An inbound message refused: what its `SignalRejected` / `InputRejected` event and its
/// answer on `<p>/errors` say.
pub struct Refusal<'a> {
    /// `SignalRejected` or `InputRejected`.
    pub kind: gridweaver_core::events::EventKind,
    /// Who refused it, or whose input it was (`dispatcher`, `vehicle/<id>`, `mqtt`).
    pub actor: String,
    /// The topic it came on.
    pub topic: &'a str,
    /// Why, as a sentence naming the field.
    pub why: &'a str,
    /// The message as received (or as the gateway read it).
    pub payload: &'a [u8],
    /// When the bridge received it.
    pub received_at: Timestamp,
    /// The message's `id`, `order_id` or `request_id`, where it could be read (the Error's
    /// `ref`).
    pub reference: Option<&'a str>,
    /// The dispatch it is about, where the gateway knows it (the event's correlation).
    pub correlation: Option<&'a str>,
}

/// Refuses an inbound message the contract's way: records the refusal's event and answers
/// on `<p>/errors`. Nothing else changes.
pub fn reject(store: &crate::store::StoreHandle, publisher: &Publisher, region: &str, r: Refusal<'_>) {
    let mut event =
        gridweaver_core::wire::rejection_event(r.received_at, r.kind, r.actor, region, r.topic, r.why, r.payload);
    if let Some(id) = r.correlation {
        event = event.correlation(id);
    }
    store.record(vec![event]);
    publisher.error(r.topic, r.why, r.received_at, r.reference);
}

/// Largest MQTT packet the gateway sends or accepts.
pub const MAX_PACKET_BYTES: usize = 256 * 1024;

/// Messages waiting to be handed to the MQTT client, at most.
pub const OUTBOUND_QUEUE: usize = 32_768;

/// Payload bytes waiting, beyond which only decisions are queued.
const OUTBOUND_BYTES: usize = 8 << 20;

/// What a message is, for what a busy queue still takes. Decisions (orders, cancels,
/// outcomes, `status`) take the whole queue, and the dispatcher refuses new signals
/// before it fills ([`Publisher::busy`]); answers (errors, capacity) stop at three
/// quarters, and the live tail (QoS 0, the log has every row) at an eighth, so neither can
/// crowd a decision out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Class {
    Decision,
    Answer,
    Tail,
}

impl Class {
    /// Whether a queue holding `queued` messages of `bytes` takes one more of this class.
    fn admits(self, queued: usize, bytes: usize) -> bool {
        match self {
            Class::Decision => true,
            Class::Answer => queued < OUTBOUND_QUEUE * 3 / 4 && bytes < OUTBOUND_BYTES,
            Class::Tail => queued < OUTBOUND_QUEUE / 8 && bytes < OUTBOUND_BYTES / 4,
        }
    }
}

/// The controller's clock: wall time that never goes backwards.
///
/// It follows the wall clock forwards (so a gateway whose clock is set by NTP after boot
/// stamps its events with the real time from then on) and ignores a step backwards: from
/// such a step on, time runs on the monotonic clock from the last reading. ACK deadlines
/// are therefore never stretched by a clock step (their timers run on tokio's monotonic
/// clock, and the time they are compared with never goes back), and dispatch ids, which
/// contain the time, never repeat. The monotonic part is tokio's clock, so tests can run the
/// controller on paused, virtual time.
pub fn now() -> Timestamp {
    // One small lock per reading; nothing else is ever done under it.
    // tokio's Instant: the monotonic clock, which a test may pause and advance.
    static ANCHOR: Mutex<Option<(i64, Instant)>> = Mutex::new(None);
    let wall =
        SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX));
    let mut anchor = ANCHOR.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    let (at, mono) = anchor.get_or_insert((wall, Instant::now()));
    let running = at.saturating_add(i64::try_from(mono.elapsed().as_millis()).unwrap_or(i64::MAX));
    if wall > running {
        *anchor = Some((wall, Instant::now()));
        return Timestamp::from_millis(wall);
    }
    Timestamp::from_millis(running)
}

enum Outbound {
    Publish {
        topic: String,
        qos: QoS,
        retain: bool,
        payload: Vec<u8>,
    },
    /// Answered once everything queued before it is with the client.
    Flush(tokio::sync::oneshot::Sender<()>),
}

/// Publishes the contract's outbound messages through one ordered, bounded queue.
#[derive(Clone)]
pub struct Publisher {
    client: AsyncClient,
    topics: Arc<Topics>,
    queue: mpsc::Sender<Outbound>,
    /// Payload bytes queued and not yet handed to the client.
    bytes: Arc<std::sync::atomic::AtomicUsize>,
}

impl Publisher {
    /// A publisher on `client` under `topics`. Starts the task that drains its queue, so
    /// call it inside a tokio runtime.
    pub fn new(client: AsyncClient, topics: Arc<Topics>) -> Self {
        let (queue, mut rx) = mpsc::channel::<Outbound>(OUTBOUND_QUEUE);
        let drain = client.clone();
        let bytes = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let drained = bytes.clone();
        tokio::spawn(async move {
            while let Some(m) = rx.recv().await {
                match m {
                    Outbound::Publish { topic, qos, retain, payload } => {
                        drained.fetch_sub(payload.len(), std::sync::atomic::Ordering::Relaxed);
                        if let Err(e) = drain.publish(topic.clone(), qos, retain, payload).await {
                            tracing::error!(%topic, error = %e, "publish failed: the MQTT client has stopped");
                        }
                    }
                    Outbound::Flush(done) => {
                        let _ = done.send(());
                    }
                }
            }
        });
        Self { client, topics, queue, bytes }
    }

    /// The topic layout.
    pub fn topics(&self) -> &Topics {
        &self.topics
    }

    /// The client, for subscribing and disconnecting.
    pub fn client(&self) -> &AsyncClient {
        &self.client
    }

    /// Messages queued and not yet handed to the client.
    pub fn queued(&self) -> usize {
        OUTBOUND_QUEUE - self.queue.capacity()
    }

    /// The queue is past half full (in messages or bytes): new work should be refused
    /// rather than answered later than the broker can take it. Returns what waits.
    pub fn busy(&self) -> Option<usize> {
        let (queued, bytes) = (self.queued(), self.bytes.load(std::sync::atomic::Ordering::Relaxed));
        (queued * 2 >= OUTBOUND_QUEUE || bytes * 2 >= OUTBOUND_BYTES).then_some(queued)
    }

    /// Queues `payload` for `topic` if a queue this busy still takes its `class`. A message
    /// larger than the packet limit is dropped with an error log (rumqttc would otherwise
    /// fail the whole connection over an oversized packet); so is one that finds the queue
    /// full, which admission keeps from happening to decisions. The live tail is shed
    /// quietly.
    fn raw(&self, class: Class, topic: String, qos: QoS, retain: bool, payload: Vec<u8>) {
        if payload.len() + topic.len() + 16 > MAX_PACKET_BYTES {
            tracing::error!(%topic, bytes = payload.len(), "message larger than the MQTT packet limit; not published");
            return;
        }
        let bytes = self.bytes.load(std::sync::atomic::Ordering::Relaxed);
        if !class.admits(self.queued(), bytes) {
            if class != Class::Tail {
                tracing::warn!(%topic, queued = self.queued(), bytes, "outbound queue busy; an answer is not published");
            }
            return;
        }
        // Counted before it is queued: the drain task may take it (and count it off) at once.
        let n = payload.len();
        self.bytes.fetch_add(n, std::sync::atomic::Ordering::Relaxed);
        let sent = self.queue.try_send(Outbound::Publish { topic, qos, retain, payload });
        if let Err(e) = sent {
            self.bytes.fetch_sub(n, std::sync::atomic::Ordering::Relaxed);
            match e {
                mpsc::error::TrySendError::Full(_) => {
                    tracing::error!(queued = OUTBOUND_QUEUE, "outbound queue full; message dropped")
                }
                mpsc::error::TrySendError::Closed(_) => {
                    tracing::error!("the outbound queue has stopped; message dropped")
                }
            }
        }
    }

    /// Resolves once everything queued before it has been handed to the MQTT client.
    pub async fn flush(&self) {
        let (done, wait) = tokio::sync::oneshot::channel();
        if self.queue.send(Outbound::Flush(done)).await.is_ok() {
            let _ = wait.await;
        }
    }

    /// Publishes a serializable value as JSON.
    fn json(&self, class: Class, topic: String, qos: QoS, retain: bool, value: &impl serde::Serialize) {
        match serde_json::to_vec(value) {
            Ok(bytes) => self.raw(class, topic, qos, retain, bytes),
            Err(e) => tracing::error!(%topic, error = %e, "cannot serialize an outbound message"),
        }
    }

    /// `<p>/vehicles/<id>/order`, QoS 1.
    pub fn order(&self, order: &Order) {
        self.json(Class::Decision, self.topics.vehicle_order(&order.vehicle_id), QoS::AtLeastOnce, false, order);
    }

    /// `<p>/vehicles/<id>/order`, QoS 1: the order's withdrawal.
    pub fn cancel(&self, cancel: &OrderCancel) {
        self.json(Class::Decision, self.topics.vehicle_order(&cancel.vehicle_id), QoS::AtLeastOnce, false, cancel);
    }

    /// `<p>/dispatches/<id>`, QoS 1.
    pub fn outcome(&self, outcome: &DispatchOutcome) {
        self.json(Class::Decision, self.topics.dispatch(&outcome.dispatch_id), QoS::AtLeastOnce, false, outcome);
    }

    /// `<p>/capacity`, QoS 1, retained.
    pub fn capacity(&self, capacity: &impl serde::Serialize) {
        self.json(Class::Answer, self.topics.capacity(), QoS::AtLeastOnce, true, capacity);
    }

    /// `<p>/errors`, QoS 1: one per rejected inbound message; `reference` is its `id`,
    /// `order_id` or `request_id` where it could be read.
    pub fn error(&self, topic: &str, error: &str, received_at: Timestamp, reference: Option<&str>) {
        let report = ErrorReport {
            topic: topic.to_owned(),
            error: error.to_owned(),
            received_at,
            reference: reference.map(str::to_owned),
        };
        self.json(Class::Answer, self.topics.errors(), QoS::AtLeastOnce, false, &report);
    }

    /// `<p>/events`, QoS 0: rows already rendered by the store.
    pub fn tail(&self, rows: Vec<String>) {
        let topic = self.topics.events();
        for row in rows {
            self.raw(Class::Tail, topic.clone(), QoS::AtMostOnce, false, row.into_bytes());
        }
    }

    /// `<p>/status`, QoS 1, retained: `online`, with `extra`'s fields (counters).
    pub fn status_with(&self, extra: &serde_json::Value) {
        let mut body = serde_json::json!({ "state": "online" });
        if let (Some(b), Some(e)) = (body.as_object_mut(), extra.as_object()) {
            b.extend(e.clone());
        }
        self.json(Class::Answer, self.topics.status(), QoS::AtLeastOnce, true, &body);
    }

    /// `<p>/status`, QoS 1, retained: `online` or `offline`.
    pub fn status(&self, online: bool) {
        let state = if online { "online" } else { "offline" };
        self.json(
            Class::Decision,
            self.topics.status(),
            QoS::AtLeastOnce,
            true,
            &serde_json::json!({ "state": state }),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_busy_queue_sheds_the_tail_first_then_answers_never_decisions() {
        let at = |q: usize| (Class::Tail.admits(q, 0), Class::Answer.admits(q, 0), Class::Decision.admits(q, 0));
        assert_eq!(at(0), (true, true, true));
        assert_eq!(at(OUTBOUND_QUEUE / 8), (false, true, true));
        assert_eq!(at(OUTBOUND_QUEUE * 3 / 4), (false, false, true));
        assert_eq!(at(OUTBOUND_QUEUE - 1), (false, false, true));
        assert!(!Class::Tail.admits(0, OUTBOUND_BYTES / 4) && Class::Answer.admits(0, OUTBOUND_BYTES / 4));
        assert!(!Class::Answer.admits(0, OUTBOUND_BYTES) && Class::Decision.admits(0, OUTBOUND_BYTES));
    }

    #[test]
    fn the_clock_never_goes_backwards() {
        let mut last = now();
        for _ in 0..1000 {
            let t = now();
            assert!(t >= last);
            last = t;
        }
    }
}
