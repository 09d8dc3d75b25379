//! Outbound MQTT and the controller's clock.
//!
//! Everything the gateway publishes goes out on a connection of its own
//! ([`Publisher::connect`]), which subscribes to nothing: the broker queues nothing for it
//! but acknowledgements, so a flood of inbound messages (which the broker queues on the
//! other connection) can neither hold back nor drop its PUBACKs, and rumqttc, which takes
//! new requests only while its in-flight window has room and frees a slot only on a PUBACK,
//! never stops publishing for that reason. Its event loop and the task that drains the
//! queues run on the MQTT thread (the inbound bridge's), off the actors' thread: nothing
//! there ever blocks.
//!
//! Every actor that publishes holds a [`Publisher`]: a cheap, cloneable handle to two
//! bounded, first-in-first-out lanes that a single task drains into the rumqttc client,
//! decisions (orders, cancels, outcomes, `status`) before answers (errors, capacity, the
//! live tail). Each lane keeps every vehicle's messages in the order they were queued (a
//! cancel before the order that follows it); when a lane is full a message is dropped with
//! an error log rather than held in a growing pile of tasks (the ACK deadline covers a lost
//! order, and its cancel follows it).
//!

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use gridweaver_core::model::{DispatchOutcome, Order, OrderCancel};
use gridweaver_core::time::Timestamp;
use gridweaver_core::wire::{ErrorReport, Topics};
use rumqttc::{AsyncClient, Event, MqttOptions, NetworkOptions, Outgoing, Packet, QoS};
use tokio::sync::mpsc;
use tokio::time::Instant;

pub use crate::mqtt::DISCONNECT_WAIT;
use crate::mqtt::{Connection, Polled};

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
    /// The reason's code (`invalid:power_kw`, `duplicate`, ...): refusals of one reason
    /// within a second share a row in the log under a flood.
    pub reason: String,
}

/// Refuses an inbound message the contract's way: answers on `<p>/errors` and records the
/// refusal (its own row, or under a flood its reason's row of the second:
/// [`gridweaver_core::events::refusals`]). Nothing else changes; nothing here waits.
pub fn reject(store: &crate::store::StoreHandle, publisher: &Publisher, region: &str, r: Refusal<'_>) {
    publisher.error(r.topic, r.why, r.received_at, r.reference);
    store.refuse(gridweaver_core::events::refusals::Refused {
        kind: r.kind,
        actor: r.actor,
        region: Some(region.to_owned()),
        correlation: r.correlation.map(str::to_owned),
        reason: r.reason,
        reference: r.reference.map(str::to_owned),
        rejected: gridweaver_core::wire::rejected(r.kind, r.topic, r.why, r.payload),
        at: r.received_at,
    });
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

enum Outbound {
    Publish {
        topic: String,
        qos: QoS,
        retain: bool,
        payload: Vec<u8>,
    },
    /// Answered once everything queued before it (in its lane) is with the client.
    Flush(tokio::sync::oneshot::Sender<()>),
}

/// Which of the gateway's two MQTT connections changed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    /// The connection that subscribes (signals, states, ACKs) and carries the last will.
    Inbound,
    /// The connection everything the gateway publishes goes out on.
    Outbound,
}

/// A connection of the gateway to the broker went down (`up: false`) or came back.
#[derive(actix::Message, Clone, Copy, Debug)]
#[rtype(result = "()")]
pub struct Link {
    /// Which connection.
    pub side: Side,
    /// Connected now.
    pub up: bool,
}

/// Whether the outbound connection is up, and where its [`Link`] changes go (set once the
/// dispatcher runs).
#[derive(Default)]
struct LinkState {
    up: std::sync::atomic::AtomicBool,
    to: std::sync::OnceLock<actix::Recipient<Link>>,
}

impl LinkState {
    fn tell(&self, up: bool) {
        self.up.store(up, Ordering::Release);
        if let Some(to) = self.to.get() {
            let _ = to.try_send(Link { side: Side::Outbound, up });
        }
    }
}

type LinkSink = Arc<LinkState>;

/// How long QoS 1 publishes may wait for the broker's PUBACK, with none arriving at all,
/// before the outbound connection is dropped and made again (what was unacknowledged is
/// sent again), in keep-alive periods (20 s at the default 10 s): a broker that drops
/// acknowledgements (Mosquitto does, for a client whose queue is full) would otherwise
/// leave rumqttc's in-flight window full for good, and the gateway would never publish
/// again.
pub const PUBACK_WATCHDOG_KEEP_ALIVES: u32 = 2;

/// Publishes the contract's outbound messages on a connection of its own, through two
/// ordered, bounded lanes: decisions (orders, cancels, outcomes, `status`) and answers
/// (errors, capacity, the live tail). A task drains them into the MQTT client, decisions
/// first; each lane keeps its order (a vehicle's cancel precedes its next order).
#[derive(Clone)]
pub struct Publisher {
    client: AsyncClient,
    topics: Arc<Topics>,
    decisions: mpsc::Sender<Outbound>,
    answers: mpsc::Sender<Outbound>,
    /// Payload bytes queued and not yet handed to the client.
    bytes: Arc<AtomicUsize>,
    /// QoS 1 publishes written and not yet acknowledged by the broker.
    unacked: Arc<AtomicUsize>,
    link: LinkSink,
}

impl Publisher {
    /// A publisher on `client` under `topics`, whose event loop someone else polls (tests).
    /// Starts the task that drains its lanes, so call it inside a tokio runtime.
    pub fn new(client: AsyncClient, topics: Arc<Topics>) -> Self {
        let (decisions, answers, lanes) = Lanes::new();
        let bytes = Arc::new(AtomicUsize::new(0));
        tokio::spawn(lanes.drain(client.clone(), bytes.clone()));
        let (unacked, link) = (Arc::default(), Arc::default());
        Self { client, topics, decisions, answers, bytes, unacked, link }
    }

    /// A publisher with a connection of its own (`opts`: no subscriptions, so the broker
    /// queues nothing for it but acknowledgements, and an inbound flood can never hold back
    /// or drop them), polled with the drain task on `arbiter`'s thread, off the actors'
    /// (the controller gives it the bridge's: nothing there blocks).
    pub fn connect(
        opts: MqttOptions,
        net: NetworkOptions,
        topics: Arc<Topics>,
        reconnect_max: Duration,
        arbiter: &actix::ArbiterHandle,
    ) -> Self {
        // A rendezvous: the drain task hands a message over only when the event loop takes
        // it, so a reconnection never finds requests waiting that it would re-number.
        let watchdog = opts.keep_alive().max(Duration::from_secs(1)) * PUBACK_WATCHDOG_KEEP_ALIVES;
        let (client, mut eventloop) = AsyncClient::new(opts, 0);
        eventloop.set_network_options(net);
        let (decisions, answers, lanes) = Lanes::new();
        let bytes = Arc::new(AtomicUsize::new(0));
        let (unacked, link): (Arc<AtomicUsize>, LinkSink) = (Arc::default(), Arc::default());
        arbiter.spawn(lanes.drain(client.clone(), bytes.clone()));
        let connection = Connection::new(eventloop, "outbound", reconnect_max);
        arbiter.spawn(outbound_loop(connection, unacked.clone(), link.clone(), watchdog));
        Self { client, topics, decisions, answers, bytes, unacked, link }
    }

    /// Tells `to` whenever the outbound connection goes down or comes back (set once), and
    /// at once if it is up already.
    pub fn on_link(&self, to: actix::Recipient<Link>) {
        if self.link.to.set(to.clone()).is_ok() && self.link.up.load(Ordering::Acquire) {
            let _ = to.try_send(Link { side: Side::Outbound, up: true });
        }
    }

    /// The topic layout.
    pub fn topics(&self) -> &Topics {
        &self.topics
    }

    /// Messages queued and not yet handed to the client.
    pub fn queued(&self) -> usize {
        (OUTBOUND_QUEUE - self.decisions.capacity()) + (ANSWERS_QUEUE - self.answers.capacity())
    }

    /// Ends the outbound connection cleanly: once everything queued before it is with the
    /// client and the broker has acknowledged every QoS 1 publish (at most `within`), a
    /// DISCONNECT. (A client that vanishes while the broker still writes it PUBACKs, or
    /// without a DISCONNECT, makes Mosquitto log an error and publish its last will.)
    pub async fn disconnect(&self, within: Duration) {
        let unacked = self.unacked.clone();
        let waited = tokio::time::timeout(within, async {
            self.flush().await;
            // Until the event loop has taken what was handed over and the broker has
            // acknowledged it all (the loop counts publishes as they are written).
            let mut quiet = 0;
            while quiet < 3 {
                tokio::time::sleep(Duration::from_millis(10)).await;
                quiet = if unacked.load(Ordering::Acquire) == 0 { quiet + 1 } else { 0 };
            }
        })
        .await;
        if waited.is_err() {
            let unacked = self.unacked.load(Ordering::Acquire);
            tracing::warn!(unacked, "the broker did not acknowledge everything before the disconnect");
        }
        let _ = self.client.disconnect().await;
    }

    /// The queue is past half full (in messages or bytes): new work should be refused
    /// rather than answered later than the broker can take it. Returns what waits.
    pub fn busy(&self) -> Option<usize> {
        let (queued, bytes) = (self.queued(), self.bytes.load(Ordering::Relaxed));
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
        let bytes = self.bytes.load(Ordering::Relaxed);
        if !class.admits(self.queued(), bytes) {
            if class != Class::Tail {
                tracing::warn!(%topic, queued = self.queued(), bytes, "outbound queue busy; an answer is not published");
            }
            return;
        }
        // Counted before it is queued: the drain task may take it (and count it off) at once.
        let n = payload.len();
        self.bytes.fetch_add(n, Ordering::Relaxed);
        let lane = if class == Class::Decision { &self.decisions } else { &self.answers };
        let sent = lane.try_send(Outbound::Publish { topic, qos, retain, payload });
        if let Err(e) = sent {
            self.bytes.fetch_sub(n, Ordering::Relaxed);
            match e {
                mpsc::error::TrySendError::Full(_) => {
                    tracing::error!(queued = self.queued(), "outbound queue full; message dropped")
                }
                mpsc::error::TrySendError::Closed(_) => {
                    tracing::error!("the outbound queue has stopped; message dropped")
                }
            }
        }
    }

    /// Resolves once everything queued before it (in both lanes) has been handed to the
    /// MQTT client.
    pub async fn flush(&self) {
        for lane in [&self.decisions, &self.answers] {
            let (done, wait) = tokio::sync::oneshot::channel();
            if lane.send(Outbound::Flush(done)).await.is_ok() {
                let _ = wait.await;
            }
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

/// Messages waiting in the answers lane, at most (errors and capacity stop at three
/// quarters of [`OUTBOUND_QUEUE`] in all, the tail at an eighth).
const ANSWERS_QUEUE: usize = OUTBOUND_QUEUE * 3 / 4;

/// The two lanes' receiving ends, drained by one task.
struct Lanes {
    decisions: mpsc::Receiver<Outbound>,
    answers: mpsc::Receiver<Outbound>,
}

impl Lanes {
    fn new() -> (mpsc::Sender<Outbound>, mpsc::Sender<Outbound>, Lanes) {
        let (d, decisions) = mpsc::channel(OUTBOUND_QUEUE);
        let (a, answers) = mpsc::channel(ANSWERS_QUEUE);
        (d, a, Lanes { decisions, answers })
    }

    /// Hands every message to `client`, decisions before answers, each lane in its order;
    /// ends when both lanes are closed.
    async fn drain(mut self, client: AsyncClient, bytes: Arc<AtomicUsize>) {
        let (mut decisions, mut answers) = (true, true);
        while decisions || answers {
            let m = tokio::select! {
                biased;
                m = self.decisions.recv(), if decisions => match m {
                    Some(m) => m,
                    None => { decisions = false; continue; }
                },
                m = self.answers.recv(), if answers => match m {
                    Some(m) => m,
                    None => { answers = false; continue; }
                },
            };
            match m {
                Outbound::Publish { topic, qos, retain, payload } => {
                    bytes.fetch_sub(payload.len(), Ordering::Relaxed);
                    if let Err(e) = client.publish(topic.clone(), qos, retain, payload).await {
                        tracing::error!(%topic, error = %e, "publish failed: the MQTT client has stopped");
                    }
                }
                Outbound::Flush(done) => {
                    let _ = done.send(());
                }
            }
        }
    }
}

/// Polls the outbound connection: counts QoS 1 publishes until the broker acknowledges
/// them, reconnects with backoff up to `reconnect_max`, says when the link goes down or
/// comes back, drops and remakes a connection whose PUBACKs stopped for `watchdog`
/// ([`PUBACK_WATCHDOG_KEEP_ALIVES`]), and ends after a DISCONNECT once the broker has closed
/// the connection.
async fn outbound_loop(mut connection: Connection, unacked: Arc<AtomicUsize>, link: LinkSink, watchdog: Duration) {
    // The last PUBACK, or since when nothing is unacknowledged.
    let mut progress = Instant::now();
    loop {
        match connection.next().await {
            Polled::Event(Event::Outgoing(Outgoing::Publish(pkid))) if pkid != 0 => {
                if unacked.fetch_add(1, Ordering::AcqRel) == 0 {
                    progress = Instant::now();
                }
            }
            Polled::Event(Event::Incoming(Packet::PubAck(_))) => {
                let _ = unacked.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1));
                progress = Instant::now();
            }
            Polled::Link(up) => {
                if up {
                    // What was unacknowledged is sent again on this connection, and counted again.
                    unacked.store(0, Ordering::Release);
                    progress = Instant::now();
                }
                link.tell(up);
            }
            Polled::Event(_) | Polled::Unreachable => {}
            Polled::Closed => break,
        }
        // Keep-alive pings return from `next` at least every keep-alive period.
        let waiting = unacked.load(Ordering::Acquire);
        if connection.is_up() && waiting > 0 && progress.elapsed() >= watchdog {
            tracing::warn!(
                unacknowledged = waiting,
                silent_s = progress.elapsed().as_secs(),
                "the broker acknowledged none of the gateway's publishes for too long (it drops acknowledgements when it cannot keep up): reconnecting, the unacknowledged ones are sent again"
            );
            connection.remake();
            link.tell(false);
        }
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

    /// A broker on a free port that speaks just enough MQTT 3.1.1 for a publisher: it
    /// answers CONNECT (the session present from the second connection on) and PINGREQ, and
    /// acknowledges publishes only from its `acks_from`-th connection on, as Mosquitto does
    /// not for a client whose queue is full. Each publish's payload is sent to `seen` with the
    /// connection's number.
    fn stingy_broker(acks_from: usize) -> (u16, std::sync::mpsc::Receiver<(usize, Vec<u8>)>) {
        use std::io::{Read, Write};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let (seen, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for (n, stream) in listener.incoming().enumerate() {
                let Ok(mut s) = stream else { return };
                let seen = seen.clone();
                std::thread::spawn(move || loop {
                    let mut head = [0u8; 1];
                    if s.read_exact(&mut head).is_err() {
                        return;
                    }
                    let (mut len, mut shift) = (0usize, 0);
                    loop {
                        let mut b = [0u8; 1];
                        if s.read_exact(&mut b).is_err() {
                            return;
                        }
                        len |= usize::from(b[0] & 0x7f) << shift;
                        shift += 7;
                        if b[0] & 0x80 == 0 {
                            break;
                        }
                    }
                    let mut body = vec![0u8; len];
                    if s.read_exact(&mut body).is_err() {
                        return;
                    }
                    let reply: Vec<u8> = match head[0] >> 4 {
                        1 => vec![0x20, 0x02, u8::from(n > 0), 0x00],
                        3 => {
                            let topic = usize::from(u16::from_be_bytes([body[0], body[1]]));
                            let qos = (head[0] >> 1) & 3;
                            let (pkid, payload) = if qos > 0 {
                                (Some([body[2 + topic], body[3 + topic]]), body[4 + topic..].to_vec())
                            } else {
                                (None, body[2 + topic..].to_vec())
                            };
                            let _ = seen.send((n, payload));
                            match pkid {
                                Some([hi, lo]) if n + 1 >= acks_from => vec![0x40, 0x02, hi, lo],
                                _ => Vec::new(),
                            }
                        }
                        12 => vec![0xd0, 0x00],
                        14 => return,
                        _ => Vec::new(),
                    };
                    if s.write_all(&reply).is_err() {
                        return;
                    }
                });
            }
        });
        (port, rx)
    }

    /// The mechanism of the flood bench's stall: a broker that drops PUBACKs leaves
    /// rumqttc's in-flight window full, and rumqttc then takes no more requests while the
    /// connection stays up (pings are answered). The watchdog drops the connection and makes
    /// it again; what was not acknowledged is sent again and the rest follows.
    #[actix_rt::test]
    async fn a_broker_that_drops_acknowledgements_does_not_stop_the_gateway_publishing() {
        let (port, seen) = stingy_broker(2);
        let mut opts = MqttOptions::new("stingy", "127.0.0.1", port);
        opts.set_keep_alive(Duration::from_secs(1)).set_clean_session(false).set_inflight(4);
        let mut net = NetworkOptions::new();
        net.set_connection_timeout(2);
        let topics = Arc::new(Topics::new("t"));
        let publisher = Publisher::connect(opts, net, topics, Duration::from_millis(200), &actix::Arbiter::current());
        for i in 0..10u8 {
            publisher.raw(Class::Decision, "t/x".into(), QoS::AtLeastOnce, false, vec![i]);
        }
        // The first connection gets the window's four and acknowledges none; the rest of the
        // ten arrive on the second, after the watchdog (2 keep-alives of 1 s).
        let got = tokio::task::spawn_blocking(move || {
            let mut got = std::collections::BTreeMap::<u8, Vec<usize>>::new();
            let deadline = std::time::Instant::now() + Duration::from_secs(15);
            while got.len() < 10 || got.values().any(|c| !c.contains(&1)) {
                let left = deadline.saturating_duration_since(std::time::Instant::now());
                let Ok((conn, payload)) = seen.recv_timeout(left) else { break };
                got.entry(payload[0]).or_default().push(conn);
            }
            got
        })
        .await
        .unwrap();
        let first: Vec<u8> = got.iter().filter(|(_, c)| c.contains(&0)).map(|(p, _)| *p).collect();
        assert_eq!(first, [0, 1, 2, 3], "the first connection took the window's four: {got:?}");
        assert!(
            got.len() == 10 && got.values().all(|c| c.contains(&1)),
            "every message reached the broker on the second connection: {got:?}"
        );
    }
}
