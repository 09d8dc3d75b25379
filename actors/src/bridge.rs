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

use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use gridweaver_core::events::EventKind;
use gridweaver_core::wire::{decode, Inbound, Topics};
use rumqttc::{Event, EventLoop, Outgoing, Packet, QoS, SubscribeFilter};

use crate::dispatcher::{
    AckIn, Disconnected, DispatcherActor, Intake, Reconnected, SignalIn, Subscribed, SIGNALS_WAITING_MAX,
};
use crate::publish::{now, Publisher};
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
        Some(Ok(Inbound::Signal(signal))) => match routes.intake.enter() {
            Ok(()) => deliver(&routes.dispatcher, SignalIn { signal, at }).await,
            Err(waiting) => {
                // Admission at the door: the planner has enough waiting already.
                let why = format!(
                    "signal `{}` was not dispatched: {waiting} signals already wait for the planner (at most {SIGNALS_WAITING_MAX}): the gateway is behind; send it again later",
                    signal.id
                );
                reject(routes, topic, &why, payload, EventKind::SignalRejected, "dispatcher".into(), at);
            }
        },
        Some(Ok(Inbound::VehicleState(id, state))) => {
            deliver(&routes.supervisor, VehicleStateIn { id, state: state.map(|b| *b), at }).await
        }
        Some(Ok(Inbound::Ack(vehicle, ack))) => deliver(&routes.dispatcher, AckIn { vehicle, ack, at }).await,
        Some(Ok(Inbound::Bid(bid))) => {
            let why = format!(
                "bid `{}` is valid, but this gateway does not run a demand-response bid book yet; it was not recorded as a bid",
                bid.request_id
            );
            reject(routes, topic, &why, payload, EventKind::InputRejected, "mqtt".into(), at);
        }
        Some(Err(rejection)) => {
            let why = rejection.error.to_string();
            tracing::info!(%topic, error = %why, "inbound message rejected");
            reject(routes, topic, &why, payload, rejection.event_kind(), rejection.actor(), at);
        }
    }
}

fn reject(
    routes: &Routes,
    topic: &str,
    why: &str,
    payload: &[u8],
    kind: EventKind,
    actor: String,
    at: gridweaver_core::time::Timestamp,
) {
    crate::publish::reject(
        &routes.store,
        &routes.publisher,
        &routes.region,
        kind,
        actor,
        topic,
        why,
        payload,
        at,
        None,
    );
}

/// The connection actor.
pub struct MqttBridge {
    eventloop: Option<EventLoop>,
    routes: Routes,
    topics: Arc<Topics>,
    reconnect_max: Duration,
}

impl MqttBridge {
    /// A bridge over `eventloop`.
    pub fn new(eventloop: EventLoop, routes: Routes, topics: Arc<Topics>, reconnect_max: Duration) -> Self {
        Self { eventloop: Some(eventloop), routes, topics, reconnect_max }
    }
}

impl Actor for MqttBridge {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        let Some(mut eventloop) = self.eventloop.take() else { return };
        let routes = self.routes.clone();
        let topics = self.topics.clone();
        let reconnect_max = self.reconnect_max;
        let poll = async move {
            let mut backoff = Duration::from_millis(100);
            let mut connected = false;
            loop {
                match eventloop.poll().await {
                    Ok(Event::Incoming(Packet::Publish(p))) => route(&routes, &topics, &p.topic, &p.payload).await,
                    Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                        tracing::info!(session_present = ack.session_present, "connected to the MQTT broker");
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
                    Ok(Event::Outgoing(Outgoing::Disconnect)) => {
                        tracing::info!("disconnected from the MQTT broker");
                        break;
                    }
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

/// Ends the connection cleanly (after everything queued before it is sent).
#[derive(Message)]
#[rtype(result = "()")]
pub struct Disconnect;

impl Handler<Disconnect> for MqttBridge {
    type Result = ResponseFuture<()>;

    fn handle(&mut self, _: Disconnect, _ctx: &mut Context<Self>) -> Self::Result {
        let client = self.routes.publisher.client().clone();
        Box::pin(async move {
            let _ = client.disconnect().await;
        })
    }
}
