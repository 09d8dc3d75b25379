//! MqttBridge: the one rumqttc connection. It runs on its own arbiter (thread), polls the
//! event loop, takes the time each inbound publish arrived, decodes it once with the core's
//! [`decode`], and routes the typed value with that time: signals and ACKs to the
//! dispatcher, vehicle states to the supervisor (fleet membership). Rejected input is
//! answered on `<p>/errors` and recorded (`SignalRejected` / `InputRejected`) here, and
//! changes nothing else. While an actor's mailbox is full the bridge stops reading the
//! socket, so a flood is held back by MQTT flow control rather than queued.
//!
//! On every (re)connection it subscribes to its inbound topics, whether or not the broker
//! kept the session (a resumed session does not re-send retained vehicle states; a new
//! SUBSCRIBE does, and a changed `mqtt.prefix` needs it), and publishes `status` online
//! (retained; the last will says offline). A lost connection is retried with exponential
//! backoff up to `mqtt.reconnect_max_s`.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use gridweaver_core::events::EventKind;
use gridweaver_core::wire::{decode, Inbound, Topics};
use rumqttc::{Event, EventLoop, Outgoing, Packet, QoS, SubscribeFilter};

use crate::dispatcher::{
    AckIn, Disconnected, DispatcherActor, Intake, Reconnected, SignalIn, Subscribed, SIGNALS_WAITING_MAX,
};
use crate::publish::{now, Publisher, Refusal};
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

/// Sends `msg` without waiting when the mailbox has room, else waits for room: the bridge
/// stops reading the socket while an actor is saturated (back-pressure onto the broker).
async fn deliver<A, M>(addr: &Addr<A>, msg: M)
where
    A: Actor<Context = Context<A>> + Handler<M>,
    M: Message<Result = ()> + Send + 'static,
{
    if let Err(SendError::Full(msg)) = addr.try_send(msg) {
        let _ = addr.send(msg).await;
    }
}

/// Decodes and routes one publish.
async fn route(routes: &Routes, topics: &Topics, topic: &str, payload: &[u8]) {
    let at = now();
    match decode(topics, topic, payload, at) {
        None => {}
        Some(Ok(Inbound::Signal(signal))) => {
            if !signal.unknown_fields.is_empty() {
                tracing::warn!(%topic, signal = %signal.id, unknown = ?signal.unknown_fields, "signal fields this gateway does not know are ignored (a typo?); they are listed in its SignalReceived");
            }
            match routes.intake.enter() {
                Ok(()) => deliver(&routes.dispatcher, SignalIn { signal, at }).await,
                Err(waiting) => {
                    // Admission at the door: the planner has enough waiting already.
                    let why = format!(
                        "signal `{}` was not dispatched: {waiting} signals already wait for the planner (at most {SIGNALS_WAITING_MAX}): the gateway is behind; send it again later",
                        signal.id
                    );
                    let r = refusal(topic, &why, payload, EventKind::SignalRejected, "dispatcher".into(), at);
                    reject(routes, Refusal { reference: Some(&signal.id), ..r });
                }
            }
        }
        Some(Ok(Inbound::VehicleState(id, state))) => {
            deliver(&routes.supervisor, VehicleStateIn { id, state: state.map(|b| *b), at }).await
        }
        Some(Ok(Inbound::Ack(vehicle, ack))) => deliver(&routes.dispatcher, AckIn { vehicle, ack, at }).await,
        Some(Ok(Inbound::Bid(bid))) => {
            let why = format!(
                "bid `{}` is valid, but this gateway does not run a demand-response bid book yet; it was not recorded as a bid",
                bid.request_id
            );
            let r = refusal(topic, &why, payload, EventKind::InputRejected, "mqtt".into(), at);
            reject(routes, Refusal { reference: Some(&bid.request_id), ..r });
        }
        Some(Err(rejection)) => {
            let why = rejection.error.to_string();
            tracing::info!(%topic, error = %why, "inbound message rejected");
            let r = refusal(topic, &why, payload, rejection.event_kind(), rejection.actor(), at);
            reject(routes, Refusal { reference: rejection.reference.as_deref(), ..r });
        }
    }
}

fn refusal<'a>(
    topic: &'a str,
    why: &'a str,
    payload: &'a [u8],
    kind: EventKind,
    actor: String,
    received_at: gridweaver_core::time::Timestamp,
) -> Refusal<'a> {
    Refusal { kind, actor, topic, why, payload, received_at, reference: None, correlation: None }
}

fn reject(routes: &Routes, r: Refusal<'_>) {
    crate::publish::reject(&routes.store, &routes.publisher, &routes.region, r);
}

/// The connection actor.
pub struct MqttBridge {
    eventloop: Option<EventLoop>,
    routes: Routes,
    topics: Arc<Topics>,
    reconnect_max: Duration,
    /// QoS 1 publishes written and not yet acknowledged by the broker (on this connection).
    unacked: Arc<AtomicUsize>,
}

impl MqttBridge {
    /// A bridge over `eventloop`.
    pub fn new(eventloop: EventLoop, routes: Routes, topics: Arc<Topics>, reconnect_max: Duration) -> Self {
        Self { eventloop: Some(eventloop), routes, topics, reconnect_max, unacked: Arc::default() }
    }
}

/// How long a clean disconnect waits for the broker: for the PUBACKs of what was published
/// before it, and then for the broker to close the connection.
const DISCONNECT_WAIT: Duration = Duration::from_secs(3);

impl Actor for MqttBridge {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        let Some(mut eventloop) = self.eventloop.take() else { return };
        let routes = self.routes.clone();
        let topics = self.topics.clone();
        let reconnect_max = self.reconnect_max;
        let unacked = self.unacked.clone();
        let poll = async move {
            let mut backoff = Duration::from_millis(100);
            let mut connected = false;
            // After our DISCONNECT went out: the broker closes the connection, and only then
            // is ours closed (closing first can cut off PUBACKs the broker still writes).
            let mut leaving: Option<tokio::time::Instant> = None;
            loop {
                let polled = match leaving {
                    None => eventloop.poll().await,
                    Some(since) => {
                        let left = DISCONNECT_WAIT.saturating_sub(since.elapsed());
                        match tokio::time::timeout(left, eventloop.poll()).await {
                            Ok(Ok(_)) => continue,
                            Ok(Err(_)) => {
                                tracing::info!("disconnected from the MQTT broker");
                                break;
                            }
                            Err(_) => {
                                tracing::warn!("the MQTT broker did not close the connection after our DISCONNECT");
                                break;
                            }
                        }
                    }
                };
                match polled {
                    Ok(Event::Incoming(Packet::Publish(p))) => route(&routes, &topics, &p.topic, &p.payload).await,
                    Ok(Event::Outgoing(Outgoing::Publish(pkid))) if pkid != 0 => {
                        unacked.fetch_add(1, Ordering::AcqRel);
                    }
                    Ok(Event::Incoming(Packet::PubAck(_))) => {
                        let _ = unacked.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1));
                    }
                    Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                        tracing::info!(session_present = ack.session_present, "connected to the MQTT broker");
                        // What was unacknowledged is sent again on this connection, and counted again.
                        unacked.store(0, Ordering::Release);
                        connected = true;
                        backoff = Duration::from_millis(100);
                        let filters = topics.subscriptions().map(|t| SubscribeFilter::new(t, QoS::AtLeastOnce));
                        // Through the request channel; a task, because this loop must keep
                        // polling the event loop for a full channel to drain.
                        let client = routes.publisher.client().clone();
                        tokio::spawn(async move {
                            if let Err(e) = client.subscribe_many(filters).await {
                                tracing::error!(error = %e, "cannot subscribe");
                            }
                        });
                        routes.publisher.status(true);
                        deliver(&routes.dispatcher, Reconnected).await;
                    }
                    // The broker sends the retained vehicle states after this.
                    Ok(Event::Incoming(Packet::SubAck(_))) => deliver(&routes.dispatcher, Subscribed).await,
                    Ok(Event::Outgoing(Outgoing::Disconnect)) => leaving = Some(tokio::time::Instant::now()),
                    Ok(_) => {}
                    Err(e) => {
                        if connected {
                            tracing::warn!(error = %e, "lost the MQTT broker; reconnecting");
                            deliver(&routes.dispatcher, Disconnected).await;
                        } else {
                            tracing::warn!(error = %e, retry_in_ms = backoff.as_millis() as u64, "cannot reach the MQTT broker");
                        }
                        connected = false;
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(reconnect_max);
                    }
                }
            }
        };
        ctx.spawn(poll.into_actor(self).map(|_, _, ctx| ctx.stop()));
    }
}

/// Ends the connection cleanly: once everything queued before it is with the client and
/// the broker has acknowledged every QoS 1 publish (at most [`DISCONNECT_WAIT`]), a
/// DISCONNECT; the broker then closes the connection and the bridge stops. A broker whose
/// client vanishes with PUBACKs still to write (or without a DISCONNECT) logs an error and
/// publishes the last will, a second `offline`.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Disconnect;

impl Handler<Disconnect> for MqttBridge {
    type Result = ResponseFuture<()>;

    fn handle(&mut self, _: Disconnect, _ctx: &mut Context<Self>) -> Self::Result {
        let (publisher, unacked) = (self.routes.publisher.clone(), self.unacked.clone());
        Box::pin(async move {
            let waited = tokio::time::timeout(DISCONNECT_WAIT, async {
                publisher.flush().await;
                // Until the event loop has taken what was handed to it and the broker has
                // acknowledged it all (the loop counts publishes as they are written).
                let mut quiet = 0;
                while quiet < 3 {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    quiet = if unacked.load(Ordering::Acquire) == 0 { quiet + 1 } else { 0 };
                }
            })
            .await;
            if waited.is_err() {
                let unacked = unacked.load(Ordering::Acquire);
                tracing::warn!(unacked, "the broker did not acknowledge everything before the disconnect");
            }
            let _ = publisher.client().disconnect().await;
        })
    }
}
