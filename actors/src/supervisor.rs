//! Supervisor: owns the dispatches in flight (the core [`DispatchBook`]) and their ACK
//! deadlines, and the vehicle actors.
//!
//! Every [`Step`] the core produces is carried out here in the contract's order: its events
//! go to the store, and only once they are durable are its orders handed to the vehicle
//! actors (which publish them) and its outcome published. One timer is armed for the
//! book's earliest deadline. A residual goes to the FallbackActor and its answer back into
//! the book. Vehicle actors are created on a vehicle's first state and stopped when it
//! leaves. The dispatcher, the fallback and the vehicle actors run under actix's
//! supervision: one that stops after a panic in a core call is restarted (see
//! [`crate::guard`]), and a restarted dispatcher gets the fleet again from here ([`Resync`]).

use std::collections::HashMap;
use std::time::Duration;

use actix::prelude::*;
use gridweaver_core::engine::{Dispatch, DispatchBook, FallbackRequest, Step};
use gridweaver_core::events::EventKind;
use gridweaver_core::model::{Ack, Order, Vehicle, VehicleId};

use crate::dispatcher::{Answers, DispatcherActor, FleetUpdate};
use crate::fallback::{FallbackActor, Reallocate};
use crate::guard::guarded;
use crate::publish::{now, reject, Publisher};
use crate::store::StoreHandle;
use crate::tuner::{Learn, TunerActor};
use crate::vehicle::{NewState, SendOrder, VehicleAck, VehicleActor};

/// Owns deadlines and vehicle actors.
pub struct Supervisor {
    book: DispatchBook,
    /// Each vehicle's latest state (to re-report after a dispatcher restart) and actor.
    vehicles: HashMap<VehicleId, (Vehicle, Addr<VehicleActor>)>,
    dispatcher: Addr<DispatcherActor>,
    fallback: Addr<FallbackActor>,
    tuner: Option<Addr<TunerActor>>,
    store: StoreHandle,
    publisher: Publisher,
    region: String,
    timer: Option<(gridweaver_core::time::Timestamp, SpawnHandle)>,
    completed: u64,
}

impl Supervisor {
    /// A supervisor; `dispatcher` is made from its address (the two know each other).
    pub fn new(
        dispatcher: Addr<DispatcherActor>,
        fallback: Addr<FallbackActor>,
        store: StoreHandle,
        publisher: Publisher,
        region: String,
    ) -> Self {
        Self {
            book: DispatchBook::new(),
            vehicles: HashMap::new(),
            dispatcher,
            fallback,
            tuner: None,
            store,
            publisher,
            region,
            timer: None,
            completed: 0,
        }
    }

    /// Carries out a step: events durable first, then orders, outcome and the live tail;
    /// a fallback request goes to the FallbackActor; the deadline timer is re-armed.
    fn carry_out(&mut self, step: Step, ctx: &mut Context<Self>) {
        let Step { events, orders, deadline: _, fallback, outcome, answers } = step;
        if !answers.is_empty() {
            self.dispatcher.do_send(Answers(answers));
        }
        if !events.is_empty() {
            let (queued, rows) = (std::time::Instant::now(), events.len());
            let durable = self.store.append(events);
            let after = durable.into_actor(self).map(move |res, act, ctx| {
                match res {
                    Ok(Ok(appended)) => {
                        let n = orders.len();
                        tracing::debug!(
                            rows,
                            orders = n,
                            durable_us = queued.elapsed().as_micros() as u64,
                            "step durable"
                        );
                        for order in orders {
                            act.send_order(order);
                        }
                        if let Some(outcome) = outcome {
                            act.publisher.outcome(&outcome);
                            act.completed += 1;
                            if let Some(tuner) = &act.tuner {
                                tuner.do_send(Learn(outcome));
                            }
                        }
                        // The live tail waits a tick, so that the orders (queued to the vehicle
                        // actors just now) reach the MQTT client ahead of it.
                        let rows = appended.rows;
                        if n == 0 {
                            act.publisher.tail(rows);
                        } else {
                            ctx.run_later(std::time::Duration::from_millis(1), move |act, _| act.publisher.tail(rows));
                        }
                    }
                    Ok(Err(e)) => tracing::error!(error = %e, "decision not durable: its orders are not published"),
                    Err(_) => tracing::error!("the store thread is gone: orders are not published"),
                }
                if let Some(request) = fallback {
                    act.run_fallback(request, ctx);
                }
            });
            ctx.spawn(after);
        } else if let Some(request) = fallback {
            self.run_fallback(request, ctx);
        }
        self.arm_timer(ctx);
    }

    fn send_order(&self, order: Order) {
        match self.vehicles.get(&order.vehicle_id) {
            Some((_, addr)) => addr.do_send(SendOrder(order)),
            // The vehicle left between planning and now: the order still goes out, so the
            // log and the wire agree; its ACK deadline settles it.
            None => self.publisher.order(&order),
        }
    }

    fn run_fallback(&mut self, request: FallbackRequest, ctx: &mut Context<Self>) {
        let answer = self.fallback.send(Reallocate(request)).into_actor(self).map(|res, act, ctx| match res {
            Ok((request, realloc)) => {
                let book = &mut act.book;
                if let Some(step) = guarded("applying a fallback", || book.apply_fallback(now(), &request, &realloc)) {
                    act.carry_out(step, ctx);
                }
            }
            Err(e) => tracing::error!(error = %e, "the fallback actor did not answer"),
        });
        ctx.spawn(answer);
    }

    fn arm_timer(&mut self, ctx: &mut Context<Self>) {
        let next = self.book.next_deadline();
        if self.timer.as_ref().map(|(t, _)| *t) == next {
            return;
        }
        if let Some((_, handle)) = self.timer.take() {
            ctx.cancel_future(handle);
        }
        if let Some(deadline) = next {
            let wait = u64::try_from(deadline.as_millis() - now().as_millis()).unwrap_or(0);
            let handle = ctx.run_later(Duration::from_millis(wait), |act, ctx| {
                act.timer = None;
                let book = &mut act.book;
                for step in guarded("settling deadlines", || book.on_timeout(now())).unwrap_or_default() {
                    act.carry_out(step, ctx);
                }
                act.arm_timer(ctx);
            });
            self.timer = Some((deadline, handle));
        }
    }

    fn reject_ack(&self, vehicle: &VehicleId, ack: &Ack, why: &str) {
        let topic = self.publisher.topics().vehicle_ack(vehicle);
        let raw = serde_json::to_vec(ack).unwrap_or_default();
        let actor = format!("vehicle/{vehicle}");
        reject(&self.store, &self.publisher, &self.region, EventKind::InputRejected, actor, &topic, why, &raw);
    }
}

impl Actor for Supervisor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        ctx.set_mailbox_capacity(crate::MAILBOX);
    }
}

/// Connects the tuner (started after the supervisor, since it needs the dispatcher).
#[derive(Message)]
#[rtype(result = "()")]
pub struct SetTuner(pub Addr<TunerActor>);

impl Handler<SetTuner> for Supervisor {
    type Result = ();

    fn handle(&mut self, msg: SetTuner, _ctx: &mut Context<Self>) {
        self.tuner = Some(msg.0);
    }
}

/// A planned dispatch and its first step, from the dispatcher.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Begin {
    /// The dispatch.
    pub dispatch: Dispatch,
    /// Its first step.
    pub step: Step,
}

impl Handler<Begin> for Supervisor {
    type Result = ();

    fn handle(&mut self, msg: Begin, ctx: &mut Context<Self>) {
        self.book.insert(msg.dispatch);
        self.carry_out(msg.step, ctx);
    }
}

/// A vehicle's retained state (`None` = empty payload: it left).
#[derive(Message)]
#[rtype(result = "()")]
pub struct VehicleStateIn {
    /// The vehicle.
    pub id: VehicleId,
    /// Its state.
    pub state: Option<Vehicle>,
}

impl Handler<VehicleStateIn> for Supervisor {
    type Result = ();

    fn handle(&mut self, msg: VehicleStateIn, ctx: &mut Context<Self>) {
        match (msg.state, self.vehicles.get_mut(&msg.id)) {
            (Some(state), Some((known, addr))) => {
                known.clone_from(&state);
                addr.do_send(NewState(state));
            }
            (Some(state), None) => {
                let (dispatcher, supervisor, publisher) =
                    (self.dispatcher.clone(), ctx.address(), self.publisher.clone());
                let first = state.clone();
                let addr =
                    actix::Supervisor::start(move |_| VehicleActor::new(first, dispatcher, supervisor, publisher));
                self.vehicles.insert(msg.id, (state, addr));
            }
            (None, _) => {
                // Dropping the last address stops the actor for good.
                self.vehicles.remove(&msg.id);
                self.dispatcher.do_send(FleetUpdate { id: msg.id, state: None });
            }
        }
    }
}

/// An ACK from a vehicle's `ack` topic, as the bridge decoded it.
#[derive(Message)]
#[rtype(result = "()")]
pub struct AckIn {
    /// The vehicle whose topic it came on.
    pub vehicle: VehicleId,
    /// The ACK.
    pub ack: Ack,
}

impl Handler<AckIn> for Supervisor {
    type Result = ();

    fn handle(&mut self, msg: AckIn, ctx: &mut Context<Self>) {
        match self.vehicles.get(&msg.vehicle) {
            Some((_, addr)) => addr.do_send(VehicleAck(msg.ack)),
            None => self.handle(AckFromVehicle { vehicle: msg.vehicle, ack: msg.ack }, ctx),
        }
    }
}

/// An ACK routed by its vehicle actor.
#[derive(Message)]
#[rtype(result = "()")]
pub struct AckFromVehicle {
    /// The vehicle.
    pub vehicle: VehicleId,
    /// The ACK.
    pub ack: Ack,
}

impl Handler<AckFromVehicle> for Supervisor {
    type Result = ();

    fn handle(&mut self, msg: AckFromVehicle, ctx: &mut Context<Self>) {
        let book = &mut self.book;
        match guarded("taking an ACK", || book.on_ack(now(), &msg.vehicle, &msg.ack)) {
            Some(Ok(step)) => self.carry_out(step, ctx),
            Some(Err(ignored)) => self.reject_ack(&msg.vehicle, &msg.ack, &ignored.to_string()),
            None => {}
        }
    }
}

/// A restarted dispatcher asks for the fleet again.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Resync;

impl Handler<Resync> for Supervisor {
    type Result = ();

    fn handle(&mut self, _: Resync, _ctx: &mut Context<Self>) {
        for (id, (state, _)) in &self.vehicles {
            self.dispatcher.do_send(FleetUpdate { id: id.clone(), state: Some(state.clone()) });
        }
    }
}

/// Graceful shutdown: settle everything in flight, then wait until the log is durable.
/// Answers with the number of dispatches it settled.
#[derive(Message)]
#[rtype(result = "usize")]
pub struct Shutdown;

impl Handler<Shutdown> for Supervisor {
    type Result = ResponseActFuture<Self, usize>;

    fn handle(&mut self, _: Shutdown, ctx: &mut Context<Self>) -> Self::Result {
        let book = &mut self.book;
        let steps = guarded("shutting down", || book.shutdown(now(), "shutdown")).unwrap_or_default();
        let settled = steps.len();
        for step in steps {
            self.carry_out(step, ctx);
        }
        let flushed = self.store.flush();
        Box::pin(
            async move {
                let _ = flushed.await;
                // Let the futures that publish after durability run before answering.
                tokio::task::yield_now().await;
            }
            .into_actor(self)
            .map(move |_, _, _| settled),
        )
    }
}

/// How many dispatches have completed (their outcome published).
#[derive(Message)]
#[rtype(result = "u64")]
pub struct Completed;

impl Handler<Completed> for Supervisor {
    type Result = u64;

    fn handle(&mut self, _: Completed, _ctx: &mut Context<Self>) -> u64 {
        self.completed
    }
}
