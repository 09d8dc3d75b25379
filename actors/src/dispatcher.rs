//! DispatcherActor: owns the core [`Planner`] (fleet view, filter, strategy, fairness,
//! duplicate memory). Turns each signal into a planned dispatch handed to the supervisor,
//! records fleet discoveries and losses, and keeps the retained `<p>/capacity` fresh.

use std::time::Duration;

use actix::prelude::*;
use gridweaver_core::engine::Planner;
use gridweaver_core::events::EventKind;
use gridweaver_core::model::{Signal, Vehicle, VehicleId};

use crate::guard::guarded;
use crate::publish::{now, reject, Publisher};
use crate::store::StoreHandle;
use crate::supervisor::{Begin, Resync, Supervisor};

/// How often a changed capacity is republished, at most.
const CAPACITY_EVERY: Duration = Duration::from_millis(250);

/// Builds a fresh planner (config plus what the event log remembers) after a restart.
pub type PlannerFactory = Box<dyn Fn() -> Planner>;

/// Plans dispatches. Supervised: if a core call panics the actor stops, and actix restarts
/// it with a planner rebuilt by its factory and the fleet re-reported by the supervisor.
pub struct DispatcherActor {
    planner: Planner,
    rebuild: PlannerFactory,
    supervisor: Addr<Supervisor>,
    store: StoreHandle,
    publisher: Publisher,
    capacity_dirty: bool,
}

impl DispatcherActor {
    /// An actor around a planner made by `rebuild` (which it calls again on restart).
    pub fn new(
        rebuild: PlannerFactory,
        supervisor: Addr<Supervisor>,
        store: StoreHandle,
        publisher: Publisher,
    ) -> Self {
        Self { planner: rebuild(), rebuild, supervisor, store, publisher, capacity_dirty: true }
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

impl Supervised for DispatcherActor {
    fn restarting(&mut self, _ctx: &mut Context<Self>) {
        tracing::warn!("dispatcher restarting: planner rebuilt from the event log, fleet re-reported");
        self.planner = (self.rebuild)();
        self.capacity_dirty = true;
        self.supervisor.do_send(Resync);
    }
}

/// A decoded signal from `<p>/signals`.
#[derive(Message)]
#[rtype(result = "()")]
pub struct SignalIn(pub Signal);

impl Handler<SignalIn> for DispatcherActor {
    type Result = ();

    fn handle(&mut self, msg: SignalIn, ctx: &mut Context<Self>) {
        let t = now();
        let started = std::time::Instant::now();
        let signal = msg.0.clone();
        let planner = &mut self.planner;
        let Some(planned) = guarded("planning a dispatch", || planner.plan(t, msg.0)) else {
            ctx.stop();
            return;
        };
        tracing::debug!(signal = %signal.id, plan_us = started.elapsed().as_micros() as u64, "planned");
        match planned {
            Ok((dispatch, step)) => {
                self.capacity_dirty = true;
                self.supervisor.do_send(Begin { dispatch, step });
            }
            Err(refused) => {
                let reason = refused.to_string();
                tracing::info!(%reason, "signal refused");
                let topic = self.publisher.topics().signals();
                let raw = serde_json::to_vec(&signal).unwrap_or_default();
                let region = &self.planner.config().region;
                let kind = EventKind::SignalRejected;
                reject(&self.store, &self.publisher, region, kind, "dispatcher".into(), &topic, &reason, &raw);
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

    fn handle(&mut self, msg: FleetUpdate, ctx: &mut Context<Self>) {
        let planner = &mut self.planner;
        let Some((_, event)) = guarded("updating the fleet", || planner.apply_state(now(), msg.id, msg.state)) else {
            ctx.stop();
            return;
        };
        if let Some(e) = event {
            self.store.record(vec![e]);
        }
        self.capacity_dirty = true;
    }
}

/// New weights for one signal type, from the tuner (already durable).
#[derive(Message)]
#[rtype(result = "()")]
pub struct SetWeights {
    /// The signal type.
    pub kind: gridweaver_core::model::SignalType,
    /// Its weights.
    pub weights: gridweaver_core::dispatch::Weights,
}

impl Handler<SetWeights> for DispatcherActor {
    type Result = ();

    fn handle(&mut self, msg: SetWeights, _ctx: &mut Context<Self>) {
        self.planner.set_weights(msg.kind, msg.weights);
    }
}

/// How vehicles answered a settled dispatch, for the availability prediction.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Answers(pub Vec<(VehicleId, gridweaver_core::time::Timestamp, bool)>);

impl Handler<Answers> for DispatcherActor {
    type Result = ();

    fn handle(&mut self, msg: Answers, _ctx: &mut Context<Self>) {
        self.planner.observe_answers(&msg.0);
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
