//! Supervisor: owns fleet membership, the vehicle actors.
//!
//! A vehicle's first retained state starts its [`VehicleActor`]; later states go to that
//! actor, which forwards changes to the dispatcher; an empty retained state stops it and
//! tells the dispatcher the vehicle left. When a restarted dispatcher asks ([`Resync`]),
//! every vehicle actor reports its state again. The supervisor keeps only the actors'
//! addresses: the vehicle's state lives in its actor (as reported) and in the dispatcher's
//! engine (as planned with). It refuses new vehicles beyond [`MAX_VEHICLES`].

use std::collections::BTreeMap;

use actix::prelude::*;
use gridweaver_core::events::EventKind;
use gridweaver_core::model::{Vehicle, VehicleId};
use gridweaver_core::time::Timestamp;

use crate::dispatcher::{DispatcherActor, FleetUpdate, Resync};
use crate::publish::{reject, Publisher, Refusal};
use crate::store::StoreHandle;
use crate::vehicle::{NewState, Report, VehicleActor};

/// Vehicles one gateway follows at most; a state from one more is refused.
pub const MAX_VEHICLES: usize = 20_000;

/// Owns the vehicle actors.
pub struct Supervisor {
    vehicles: BTreeMap<VehicleId, Addr<VehicleActor>>,
    dispatcher: Addr<DispatcherActor>,
    store: StoreHandle,
    publisher: Publisher,
    region: String,
}

impl Supervisor {
    /// A supervisor reporting the fleet to `dispatcher`.
    pub fn new(dispatcher: Addr<DispatcherActor>, store: StoreHandle, publisher: Publisher, region: String) -> Self {
        Self { vehicles: BTreeMap::new(), dispatcher, store, publisher, region }
    }

    /// Sends `msg` to `addr` now if its mailbox has room, else waits for room before this
    /// actor handles anything else (back-pressure onto the bridge, and so onto the broker).
    fn deliver<A, M>(&self, addr: &Addr<A>, msg: M, ctx: &mut Context<Self>)
    where
        A: Actor<Context = Context<A>> + Handler<M>,
        M: Message<Result = ()> + Send + 'static,
    {
        if let Err(SendError::Full(msg)) = addr.try_send(msg) {
            ctx.wait(addr.send(msg).into_actor(self).map(|_, _, _| ()));
        }
    }
}

impl Actor for Supervisor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        ctx.set_mailbox_capacity(crate::MAILBOX);
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
    /// When it arrived.
    pub at: Timestamp,
}

impl Handler<VehicleStateIn> for Supervisor {
    type Result = ();

    fn handle(&mut self, msg: VehicleStateIn, ctx: &mut Context<Self>) {
        match (msg.state, self.vehicles.get(&msg.id)) {
            (Some(state), Some(addr)) => {
                let addr = addr.clone();
                self.deliver(&addr, NewState(state), ctx);
            }
            (Some(_), None) if self.vehicles.len() >= MAX_VEHICLES => {
                let topic = self.publisher.topics().vehicle_state(&msg.id);
                let why = format!("this gateway already follows {MAX_VEHICLES} vehicles, its most; state not taken");
                let actor = format!("vehicle/{}", msg.id);
                let refusal = Refusal {
                    kind: EventKind::InputRejected,
                    actor,
                    topic: &topic,
                    why: &why,
                    payload: b"",
                    received_at: msg.at,
                    reference: None,
                    correlation: None,
                    reason: "fleet_full".into(),
                };
                reject(&self.store, &self.publisher, &self.region, refusal);
            }
            (Some(state), None) => {
                let dispatcher = self.dispatcher.clone();
                let addr = actix::Supervisor::start(move |_| VehicleActor::new(state, dispatcher));
                self.vehicles.insert(msg.id, addr);
            }
            (None, known) => {
                // Dropping the last address stops the actor for good.
                if known.is_some() {
                    self.vehicles.remove(&msg.id);
                }
                let dispatcher = self.dispatcher.clone();
                self.deliver(&dispatcher, FleetUpdate { id: msg.id, state: None }, ctx);
            }
        }
    }
}

impl Handler<Resync> for Supervisor {
    type Result = ();

    fn handle(&mut self, _: Resync, _ctx: &mut Context<Self>) {
        for (id, addr) in &self.vehicles {
            if addr.try_send(Report).is_err() {
                tracing::warn!(vehicle = %id, "a vehicle actor is busy; it reports when its queue drains");
            }
        }
    }
}
