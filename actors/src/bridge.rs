//! MqttBridge: the inbound rumqttc connection. It runs on its own arbiter (thread), polls
//! the event loop, takes the time each inbound publish arrived, decodes it once with the
//! core's [`decode`], and routes the typed value with that time: signals and ACKs to the
//! dispatcher, vehicle states to the supervisor (fleet membership). Rejected input is
//! answered on `<p>/errors` and recorded (`SignalRejected` / `InputRejected`) here, and
//! changes nothing else.
//!
//! The bridge never waits for anything but the event loop, so the socket is always read:
//! a broker whose queue for a client that does not read fills up drops what it would send
//! that client, acknowledgements included. What it decodes goes into an [`Inbox`], bounded
//! by construction, from which a router task on the same thread delivers to the actors (and
//! does the waiting): signals are refused at the door once [`SIGNALS_WAITING_MAX`] wait, a
//! vehicle's newer state replaces the one still waiting (at most [`STATES_WAITING`]
//! vehicles), and ACKs beyond [`ACKS_WAITING`] are refused on `errors`.
//!
//! On every (re)connection it subscribes to its inbound topics, whether or not the broker
//! kept the session (a resumed session does not re-send retained vehicle states; a new
//! SUBSCRIBE does, and a changed `mqtt.prefix` needs it), and publishes `status` online
//! (retained; this connection's last will says offline). A lost connection is retried with
//! exponential backoff up to `mqtt.reconnect_max_s`.

use std::cell::RefCell;
use std::collections::{HashMap, VecDeque};
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use gridweaver_core::events::EventKind;
use gridweaver_core::model::{Signal, VehicleId};
use gridweaver_core::time::Timestamp;
use gridweaver_core::wire::{decode, Inbound, Topics};
use rumqttc::{AsyncClient, Event, EventLoop, Packet, QoS, SubscribeFilter};

use crate::clock::now;
use crate::dispatcher::{AckIn, DispatcherActor, Intake, SignalIn, Subscribed, SIGNALS_WAITING_MAX};
use crate::mqtt::{Connection, Polled};
use crate::publish::{Link, Publisher, Refusal, Side};
use crate::store::StoreHandle;
use crate::supervisor::{Supervisor, VehicleStateIn};

/// Where decoded messages go.
#[derive(Clone)]
pub struct Routes {
    /// Signals and ACKs.
    pub dispatcher: Addr<DispatcherActor>,
    /// Vehicle states.
    pub supervisor: Addr<Supervisor>,
    /// Rejection events.
    pub store: StoreHandle,
    /// Error answers and status.
    pub publisher: Publisher,
    /// The region named in rejection events.
    pub region: String,
    /// Signals on their way to the planner.
    pub intake: Intake,
}

/// ACKs decoded and not yet taken by the dispatcher, at most: more are refused on `errors`
/// (a whole dispatch of the largest fleet fits).
pub const ACKS_WAITING: usize = 32_768;

/// Vehicles whose newest state waits for the supervisor, at most: a state of another
/// vehicle beyond it is refused (a vehicle already waiting keeps its place, newest state).
pub const STATES_WAITING: usize = crate::supervisor::MAX_VEHICLES;

/// Places the inbox keeps allocated when it is empty.
const INBOX_KEPT: usize = 64;

/// A decoded message on its way to an actor.
enum Routed {
    Signal(SignalIn),
    Ack(AckIn),
    /// A vehicle's newest state (`None`: it left).
    State(VehicleStateIn),
    Link(Link),
    Subscribed,
}

/// What the bridge decoded and the actors have not taken yet, in the order it arrived,
/// bounded: signals by the intake, ACKs by [`ACKS_WAITING`], states by one per vehicle and
/// [`STATES_WAITING`] vehicles; links and subscriptions are one per connection event.
#[derive(Default)]
pub struct Inbox {
    queue: VecDeque<Routed>,
    /// The seq of `queue[0]` (every item ever queued has the next seq).
    head: u64,
    /// Per vehicle, the seq of its state waiting in `queue`.
    states: HashMap<VehicleId, u64>,
    acks: usize,
}

/// Why the inbox did not take a message.
#[derive(Debug, PartialEq, Eq)]
pub enum Refused {
    /// [`ACKS_WAITING`] ACKs already wait.
    Acks,
    /// [`STATES_WAITING`] vehicles' states already wait.
    States,
}

impl Inbox {
    fn push(&mut self, item: Routed) {
        self.queue.push_back(item);
    }

    /// Queues an ACK, unless [`ACKS_WAITING`] already wait.
    fn ack(&mut self, ack: AckIn) -> Result<(), Refused> {
        if self.acks >= ACKS_WAITING {
            return Err(Refused::Acks);
        }
        self.acks += 1;
        self.push(Routed::Ack(ack));
        Ok(())
    }

    /// Queues a vehicle's state, or replaces its state still waiting (which keeps its place).
    fn state(&mut self, state: VehicleStateIn) -> Result<(), Refused> {
        if let Some(seq) = self.states.get(&state.id) {
            let at = usize::try_from(seq - self.head).unwrap_or(usize::MAX);
            if let Some(Routed::State(waiting)) = self.queue.get_mut(at) {
                *waiting = state;
                return Ok(());
            }
        }
        if self.states.len() >= STATES_WAITING {
            return Err(Refused::States);
        }
        self.states.insert(state.id.clone(), self.head + self.queue.len() as u64);
        self.push(Routed::State(state));
        Ok(())
    }

    fn pop(&mut self) -> Option<Routed> {
        let Some(item) = self.queue.pop_front() else {
            // Empty after a burst (a dispatch's ACKs, the fleet's retained states at start-up):
            // what the burst grew is given back, the gateway's memory stays flat.
            if self.queue.capacity() > INBOX_KEPT {
                self.queue.shrink_to(INBOX_KEPT);
                self.states.shrink_to(INBOX_KEPT);
            }
            return None;
        };
        let seq = self.head;
        self.head += 1;
        match &item {
            Routed::Ack(_) => self.acks -= 1,
            Routed::State(s) if self.states.get(&s.id) == Some(&seq) => {
                self.states.remove(&s.id);
            }
            _ => {}
        }
        Some(item)
    }

    /// Messages waiting.
    pub fn len(&self) -> usize {
        self.queue.len()
    }

    /// Nothing waits.
    pub fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }
}

/// The inbox and the router's wake-up, shared by the two tasks of the bridge's thread.
#[derive(Clone, Default)]
struct Shared {
    inbox: Rc<RefCell<Inbox>>,
    wake: Rc<tokio::sync::Notify>,
}

impl Shared {
    /// Queues what needs no bound of its own (signals are counted by the intake; links and
    /// subscriptions come one per connection event).
    fn push(&self, item: Routed) {
        self.inbox.borrow_mut().push(item);
        self.wake.notify_one();
    }

    fn queue(&self, f: impl FnOnce(&mut Inbox) -> Result<(), Refused>) -> Result<(), Refused> {
        let taken = f(&mut self.inbox.borrow_mut());
        if taken.is_ok() {
            self.wake.notify_one();
        }
        taken
    }
}

/// Sends `msg`, waiting (for the actor to take it) when the mailbox is full: only the
/// router does this, never the loop that reads the socket.
async fn deliver<A, M>(addr: &Addr<A>, msg: M)
where
    A: Actor<Context = Context<A>> + Handler<M>,
    M: Message<Result = ()> + Send + 'static,
{
    if let Err(SendError::Full(msg)) = addr.try_send(msg) {
        let _ = addr.send(msg).await;
    }
}

/// Delivers what the inbox holds, in order, for as long as the bridge runs.
async fn router(routes: Routes, shared: Shared) {
    loop {
        let next = shared.inbox.borrow_mut().pop();
        match next {
            None => shared.wake.notified().await,
            Some(Routed::Signal(m)) => deliver(&routes.dispatcher, m).await,
            Some(Routed::Ack(m)) => deliver(&routes.dispatcher, m).await,
            Some(Routed::State(m)) => deliver(&routes.supervisor, m).await,
            Some(Routed::Link(m)) => deliver(&routes.dispatcher, m).await,
            Some(Routed::Subscribed) => deliver(&routes.dispatcher, Subscribed).await,
        }
    }
}

/// Decodes one publish and queues it for the router, or refuses it. Never waits.
fn route(routes: &Routes, shared: &Shared, topics: &Topics, topic: &str, payload: &[u8]) {
    let at = now();
    match decode(topics, topic, payload, at) {
        None => {}
        Some(Ok(Inbound::Signal(signal))) => signal_in(routes, shared, topic, payload, signal, at),
        Some(Ok(Inbound::VehicleState(id, state))) => {
            let state = VehicleStateIn { id, state: state.map(|b| *b), at };
            if shared.queue(|inbox| inbox.state(state)).is_err() {
                let why = format!(
                    "state not taken: the states of {STATES_WAITING} vehicles already wait for the gateway (it is behind); publish it again"
                );
                reject(
                    routes,
                    refusal(topic, &why, payload, EventKind::InputRejected, "mqtt".into(), at, "states_waiting"),
                );
            }
        }
        Some(Ok(Inbound::Ack(vehicle, ack))) => {
            let order_id = ack.order_id.clone();
            let actor = format!("vehicle/{vehicle}");
            if shared.queue(|inbox| inbox.ack(AckIn { vehicle, ack, at })).is_err() {
                let why = format!(
                    "ACK for order `{order_id}` not taken: {ACKS_WAITING} ACKs already wait for the gateway (it is behind); send it again"
                );
                let r = refusal(topic, &why, payload, EventKind::InputRejected, actor, at, "acks_waiting");
                reject(routes, Refusal { reference: Some(&order_id), ..r });
            }
        }
        Some(Ok(Inbound::Bid(bid))) => {
            let why = format!(
                "bid `{}` is valid, but this gateway does not run a demand-response bid book yet; it was not recorded as a bid",
                bid.request_id
            );
            let r = refusal(topic, &why, payload, EventKind::InputRejected, "mqtt".into(), at, "no_bid_book");
            reject(routes, Refusal { reference: Some(&bid.request_id), ..r });
        }
        Some(Err(rejection)) => {
            let why = rejection.error.to_string();
            tracing::info!(%topic, error = %why, "inbound message rejected");
            let r =
                refusal(topic, &why, payload, rejection.event_kind(), rejection.actor(), at, rejection.error.code());
            reject(routes, Refusal { reference: rejection.reference.as_deref(), ..r });
        }
    }
}

fn signal_in(routes: &Routes, shared: &Shared, topic: &str, payload: &[u8], signal: Signal, at: Timestamp) {
    if !signal.unknown_fields.is_empty() {
        tracing::warn!(%topic, signal = %signal.id, unknown = ?signal.unknown_fields, "signal fields this gateway does not know are ignored (a typo?); they are listed in its SignalReceived");
    }
    match routes.intake.enter() {
        Ok(()) => {
            shared.push(Routed::Signal(SignalIn { signal, at }));
        }
        Err(waiting) => {
            // Admission at the door: the planner has enough waiting already.
            let why = format!(
                "signal `{}` was not dispatched: {waiting} signals already wait for the planner (at most {SIGNALS_WAITING_MAX}): the gateway is behind; send it again later",
                signal.id
            );
            let r = refusal(topic, &why, payload, EventKind::SignalRejected, "dispatcher".into(), at, "planner_behind");
            reject(routes, Refusal { reference: Some(&signal.id), ..r });
        }
    }
}

fn refusal<'a>(
    topic: &'a str,
    why: &'a str,
    payload: &'a [u8],
    kind: EventKind,
    actor: String,
    received_at: Timestamp,
    reason: impl Into<String>,
) -> Refusal<'a> {
    Refusal { kind, actor, topic, why, payload, received_at, reference: None, correlation: None, reason: reason.into() }
}

fn reject(routes: &Routes, r: Refusal<'_>) {
    crate::publish::reject(&routes.store, &routes.publisher, &routes.region, r);
}

/// The connection actor.
pub struct MqttBridge {
    eventloop: Option<EventLoop>,
    client: AsyncClient,
    routes: Routes,
    topics: Arc<Topics>,
    reconnect_max: Duration,
}

impl MqttBridge {
    /// A bridge over `client` and its `eventloop` (the inbound connection).
    pub fn new(
        client: AsyncClient,
        eventloop: EventLoop,
        routes: Routes,
        topics: Arc<Topics>,
        reconnect_max: Duration,
    ) -> Self {
        Self { eventloop: Some(eventloop), client, routes, topics, reconnect_max }
    }
}

impl Actor for MqttBridge {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        let Some(eventloop) = self.eventloop.take() else { return };
        let shared = Shared::default();
        ctx.spawn(router(self.routes.clone(), shared.clone()).into_actor(self));
        let connection = Connection::new(eventloop, "inbound", self.reconnect_max);
        let poll = poll(connection, self.client.clone(), self.routes.clone(), shared, self.topics.clone());
        ctx.spawn(poll.into_actor(self).map(|_, _, ctx| ctx.stop()));
    }
}

/// Reads the inbound connection until it is closed after a DISCONNECT: decodes and queues
/// what arrives, subscribes on every connection ([`Connection`] reconnects with backoff).
async fn poll(mut connection: Connection, client: AsyncClient, routes: Routes, shared: Shared, topics: Arc<Topics>) {
    let link = |up: bool| shared.push(Routed::Link(Link { side: Side::Inbound, up }));
    loop {
        match connection.next().await {
            Polled::Event(Event::Incoming(Packet::Publish(p))) => {
                route(&routes, &shared, &topics, &p.topic, &p.payload)
            }
            Polled::Link(true) => {
                let filters = topics.subscriptions().map(|t| SubscribeFilter::new(t, QoS::AtLeastOnce));
                // Through the request channel; a task, because this loop must keep polling
                // the event loop for the channel to drain.
                let client = client.clone();
                tokio::spawn(async move {
                    if let Err(e) = client.subscribe_many(filters).await {
                        tracing::error!(error = %e, "cannot subscribe");
                    }
                });
                routes.publisher.status(true);
                link(true);
            }
            Polled::Link(false) => link(false),
            // The broker sends the retained vehicle states after this.
            Polled::Event(Event::Incoming(Packet::SubAck(_))) => shared.push(Routed::Subscribed),
            Polled::Event(_) | Polled::Unreachable => {}
            Polled::Closed => break,
        }
    }
}

/// Ends the inbound connection cleanly: a DISCONNECT (so the broker does not publish the
/// last will); the bridge stops once the broker has closed the connection.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Disconnect;

impl Handler<Disconnect> for MqttBridge {
    type Result = ResponseFuture<()>;

    fn handle(&mut self, _: Disconnect, _ctx: &mut Context<Self>) -> Self::Result {
        let client = self.client.clone();
        Box::pin(async move {
            let _ = client.disconnect().await;
        })
    }
}

#[cfg(test)]
mod tests {
    use gridweaver_core::model::{Ack, AckStatus, Vehicle};

    use super::*;

    fn state(id: &str, soc: f64) -> VehicleStateIn {
        let v = Vehicle::new(id, soc, 60.0, 11.0);
        VehicleStateIn { id: v.id.clone(), state: Some(v), at: Timestamp::from_millis(0) }
    }

    fn ack(vehicle: &str, order: usize) -> AckIn {
        let ack = Ack { order_id: format!("o{order}"), status: AckStatus::Accepted, reason: None };
        AckIn { vehicle: VehicleId::parse(vehicle).unwrap(), ack, at: Timestamp::from_millis(0) }
    }

    fn soc(item: &Routed) -> Option<(String, f64)> {
        match item {
            Routed::State(s) => s.state.as_ref().map(|v| (s.id.to_string(), v.soc)),
            _ => None,
        }
    }

    /// A flood of states costs one place per vehicle: a newer state replaces the one that
    /// waits, which keeps its place in the order things arrived.
    #[test]
    fn a_vehicles_newer_state_replaces_the_waiting_one_in_its_place() {
        let mut inbox = Inbox::default();
        inbox.state(state("a", 0.1)).unwrap();
        inbox.ack(ack("b", 1)).unwrap();
        for i in 0..1_000 {
            inbox.state(state("a", 0.2 + f64::from(i) * 1e-4)).unwrap();
            inbox.state(state("c", 0.5)).unwrap();
        }
        assert_eq!(inbox.len(), 3);
        assert_eq!(soc(&inbox.pop().unwrap()), Some(("a".into(), 0.2 + 999.0 * 1e-4)));
        assert!(matches!(inbox.pop(), Some(Routed::Ack(_))));
        // Once taken, a vehicle's next state queues at the back again.
        inbox.state(state("a", 0.9)).unwrap();
        assert_eq!(soc(&inbox.pop().unwrap()), Some(("c".into(), 0.5)));
        assert_eq!(soc(&inbox.pop().unwrap()), Some(("a".into(), 0.9)));
        assert!(inbox.pop().is_none() && inbox.is_empty());
    }

    /// The inbox is bounded whatever arrives: ACKs past their bound and states of more
    /// vehicles than the bound are refused (and answered), never queued.
    #[test]
    fn acks_and_vehicles_past_their_bounds_are_refused() {
        let mut inbox = Inbox::default();
        for i in 0..ACKS_WAITING {
            inbox.ack(ack("v", i)).unwrap();
        }
        assert_eq!(inbox.ack(ack("v", 0)), Err(Refused::Acks));
        inbox.pop();
        assert!(inbox.ack(ack("v", 0)).is_ok(), "one taken, one more fits");
        let mut inbox = Inbox::default();
        for i in 0..STATES_WAITING {
            inbox.state(state(&format!("v{i}"), 0.5)).unwrap();
        }
        assert_eq!(inbox.state(state("newcomer", 0.5)), Err(Refused::States));
        assert!(inbox.state(state("v7", 0.6)).is_ok(), "a vehicle already waiting keeps its place");
        assert_eq!(inbox.len(), STATES_WAITING);
    }
}
