//! VehicleActor: one per discovered vehicle, the vehicle's inbox for its state reports.
//!
//! It keeps the latest state the vehicle reported and forwards it to the dispatcher only
//! when it changed (a broker re-sending retained states after a new subscription changes
//! nothing), and only one at a time: while the dispatcher's mailbox is full, newer reports
//! replace the one waiting here, so a vehicle that floods its `state` topic costs one
//! queued message, not thousands. The supervisor creates it on the vehicle's first
//! retained state and stops it when the vehicle clears its state.

use std::time::Duration;

use actix::prelude::*;
use gridweaver_core::model::Vehicle;

use crate::dispatcher::{DispatcherActor, FleetUpdate};

/// How soon a report that found the dispatcher busy is tried again.
const RETRY: Duration = Duration::from_millis(20);

/// One vehicle.
pub struct VehicleActor {
    /// The latest state reported.
    latest: Vehicle,
    /// Whether `latest` still has to reach the dispatcher.
    unsent: bool,
    retry_armed: bool,
    dispatcher: Addr<DispatcherActor>,
}

impl VehicleActor {
    /// An actor for `state`'s vehicle, which it reports once started.
    pub fn new(state: Vehicle, dispatcher: Addr<DispatcherActor>) -> Self {
        Self { latest: state, unsent: true, retry_armed: false, dispatcher }
    }

    /// Forwards the latest state if it has not reached the dispatcher yet.
    fn forward(&mut self, ctx: &mut Context<Self>) {
        if !self.unsent {
            return;
        }
        let update = FleetUpdate { id: self.latest.id.clone(), state: Some(self.latest.clone()) };
        match self.dispatcher.try_send(update) {
            Ok(()) => self.unsent = false,
            Err(SendError::Full(_)) if !self.retry_armed => {
                self.retry_armed = true;
                ctx.run_later(RETRY, |act, ctx| {
                    act.retry_armed = false;
                    act.forward(ctx);
                });
            }
            Err(SendError::Full(_)) => {}
            Err(SendError::Closed(_)) => {
                // A restarting dispatcher asks for the fleet again (Report).
            }
        }
    }
}

impl Actor for VehicleActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        self.forward(ctx);
    }
}

/// Supervised: restarted with the same state if it stops while the supervisor still holds
/// its address; it stops for good when the supervisor drops it (the vehicle left).
impl Supervised for VehicleActor {
    fn restarting(&mut self, _ctx: &mut Context<Self>) {
        tracing::warn!(vehicle = %self.latest.id, "vehicle actor restarting");
        self.unsent = true;
    }
}

/// A new state from the vehicle's retained `state` topic.
#[derive(Message)]
#[rtype(result = "()")]
pub struct NewState(pub Vehicle);

impl Handler<NewState> for VehicleActor {
    type Result = ();

    fn handle(&mut self, msg: NewState, ctx: &mut Context<Self>) {
        if msg.0 != self.latest {
            self.latest = msg.0;
            self.unsent = true;
        }
        self.forward(ctx);
    }
}

/// Report the latest state again (the dispatcher was rebuilt).
#[derive(Message)]
#[rtype(result = "()")]
pub struct Report;

impl Handler<Report> for VehicleActor {
    type Result = ();

    fn handle(&mut self, _: Report, ctx: &mut Context<Self>) {
        self.unsent = true;
        self.forward(ctx);
    }
}
