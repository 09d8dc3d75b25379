//! DispatcherActor: owns the core [`Planner`] (fleet view, filter, strategy, fairness,
//! duplicate memory). Turns each signal into a planned dispatch handed to the supervisor,
//! records fleet discoveries and losses, and keeps the retained `<p>/capacity` fresh.

use std::time::Duration;

use actix::prelude::*;
use gridweaver_core::engine::Planner;
use gridweaver_core::events::EventKind;
use gridweaver_core::model::{Signal, Vehicle, VehicleId};
use gridweaver_core::wire::rejection_event;

use crate::publish::{now, Publisher};
use crate::store::StoreHandle;
use crate::supervisor::{Begin, Supervisor};

/// How often a changed capacity is republished, at most.
const CAPACITY_EVERY: Duration = Duration::from_millis(250);

/// Plans dispatches.
pub struct DispatcherActor {
    planner: Planner,
    supervisor: Addr<Supervisor>,
    store: StoreHandle,
    publisher: Publisher,
    capacity_dirty: bool,
}

impl DispatcherActor {
    /// An actor around `planner`.
    pub fn new(planner: Planner, supervisor: Addr<Supervisor>, store: StoreHandle, publisher: Publisher) -> Self {
        Self { planner, supervisor, store, publisher, capacity_dirty: true }
    }

    fn publish_capacity(&mut self) {
        if std::mem::take(&mut self.capacity_dirty) {
            self.publisher.capacity(&self.planner.capacity(now()));
        }
    }
}

impl Actor for DispatcherActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        ctx.set_mailbox_capacity(crate::MAILBOX);
        ctx.run_interval(CAPACITY_EVERY, |act, _| act.publish_capacity());
    }
}

/// A decoded signal from `<p>/signals`.
#[derive(Message)]
#[rtype(result = "()")]
pub struct SignalIn(pub Signal);

impl Handler<SignalIn> for DispatcherActor {
    type Result = ();

    fn handle(&mut self, msg: SignalIn, _ctx: &mut Context<Self>) {
        let t = now();
        let topic = self.publisher.topics().signals();
        let raw = serde_json::to_vec(&msg.0).unwrap_or_default();
        match self.planner.plan(t, msg.0) {
            Ok((dispatch, step)) => {
                self.capacity_dirty = true;
                self.supervisor.do_send(Begin { dispatch, step });
            }
            Err(refused) => {
                let reason = refused.to_string();
                tracing::info!(%reason, "signal refused");
                let region = self.planner.config().region.clone();
                self.store.record(vec![rejection_event(
                    t,
                    EventKind::SignalRejected,
                    "dispatcher",
                    &region,
                    &topic,
                    &reason,
                    &raw,
                )]);
                self.publisher.error(&topic, &reason, t);
            }
        }
    }
}

/// A vehicle's state changed (`None` = it left).
#[derive(Message)]
#[rtype(result = "()")]
pub struct FleetUpdate {
    /// The vehicle.
    pub id: VehicleId,
    /// Its state, or `None` when it left.
    pub state: Option<Vehicle>,
}

impl Handler<FleetUpdate> for DispatcherActor {
    type Result = ();

    fn handle(&mut self, msg: FleetUpdate, _ctx: &mut Context<Self>) {
        let (_, event) = self.planner.apply_state(now(), msg.id, msg.state);
        if let Some(e) = event {
            self.store.record(vec![e]);
        }
        self.capacity_dirty = true;
    }
}

/// The broker connection came back: republish the retained capacity.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Reconnected;

impl Handler<Reconnected> for DispatcherActor {
    type Result = ();

    fn handle(&mut self, _: Reconnected, _ctx: &mut Context<Self>) {
        self.capacity_dirty = true;
        self.publish_capacity();
    }
}
