//! VehicleActor: one per discovered vehicle.
//!
//! Owns the vehicle's latest state and the ids of its orders not yet answered. It turns
//! orders into MQTT publishes on its own `order` topic, reports its state to the
//! dispatcher's fleet view, and routes the ACKs of its own topic to the supervisor. The
//! supervisor creates it on the vehicle's first retained state and stops it when the
//! vehicle clears its state.

use std::collections::HashSet;

use actix::prelude::*;
use gridweaver_core::model::{Ack, Order, Vehicle};

use crate::dispatcher::{DispatcherActor, FleetUpdate};
use crate::publish::Publisher;
use crate::supervisor::{AckFromVehicle, Supervisor};

/// One vehicle.
pub struct VehicleActor {
    state: Vehicle,
    outstanding: HashSet<String>,
    dispatcher: Addr<DispatcherActor>,
    supervisor: Addr<Supervisor>,
    publisher: Publisher,
}

impl VehicleActor {
    /// An actor for `state`'s vehicle.
    pub fn new(
        state: Vehicle,
        dispatcher: Addr<DispatcherActor>,
        supervisor: Addr<Supervisor>,
        publisher: Publisher,
    ) -> Self {
        Self { state, outstanding: HashSet::new(), dispatcher, supervisor, publisher }
    }

    fn report(&self) {
        self.dispatcher.do_send(FleetUpdate { id: self.state.id.clone(), state: Some(self.state.clone()) });
    }
}

impl Actor for VehicleActor {
    type Context = Context<Self>;

    fn started(&mut self, _ctx: &mut Context<Self>) {
        self.report();
    }
}

/// Supervised: restarted with the same state if it stops while the supervisor still holds
/// its address; it stops for good when the supervisor drops it (the vehicle left).
impl Supervised for VehicleActor {
    fn restarting(&mut self, _ctx: &mut Context<Self>) {
        tracing::warn!(vehicle = %self.state.id, "vehicle actor restarting");
    }
}

/// A new state from the vehicle's retained `state` topic.
#[derive(Message)]
#[rtype(result = "()")]
pub struct NewState(pub Vehicle);

impl Handler<NewState> for VehicleActor {
    type Result = ();

    fn handle(&mut self, msg: NewState, _ctx: &mut Context<Self>) {
        self.state = msg.0;
        self.report();
    }
}

/// An order to publish, already durable in the event log.
#[derive(Message)]
#[rtype(result = "()")]
pub struct SendOrder(pub Order);

impl Handler<SendOrder> for VehicleActor {
    type Result = ();

    fn handle(&mut self, msg: SendOrder, _ctx: &mut Context<Self>) {
        self.publisher.order(&msg.0);
        self.outstanding.insert(msg.0.order_id);
    }
}

/// An ACK that arrived on this vehicle's `ack` topic.
#[derive(Message)]
#[rtype(result = "()")]
pub struct VehicleAck(pub Ack);

impl Handler<VehicleAck> for VehicleActor {
    type Result = ();

    fn handle(&mut self, msg: VehicleAck, _ctx: &mut Context<Self>) {
        // The supervisor's book decides whether the ACK counts (deadline, ownership);
        // here it only stops being outstanding.
        self.outstanding.remove(&msg.0.order_id);
        self.supervisor.do_send(AckFromVehicle { vehicle: self.state.id.clone(), ack: msg.0 });
    }
}
