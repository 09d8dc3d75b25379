//! TunerActor: owns the [`LearningTuner`]. Learns from every completed dispatch; a change
//! of weights is made durable as a `WeightsTuned` event, then handed to the dispatcher.

use actix::prelude::*;
use gridweaver_core::learning::tuning::LearningTuner;
use gridweaver_core::model::DispatchOutcome;

use crate::dispatcher::{DispatcherActor, SetWeights};
use crate::guard::guarded;
use crate::publish::now;
use crate::store::StoreHandle;

/// Learns weights from outcomes.
pub struct TunerActor {
    tuner: Box<dyn LearningTuner>,
    dispatcher: Addr<DispatcherActor>,
    store: StoreHandle,
    region: String,
}

impl TunerActor {
    /// An actor around `tuner` (already restored from the log).
    pub fn new(
        tuner: Box<dyn LearningTuner>,
        dispatcher: Addr<DispatcherActor>,
        store: StoreHandle,
        region: String,
    ) -> Self {
        Self { tuner, dispatcher, store, region }
    }
}

impl Actor for TunerActor {
    type Context = Context<Self>;
}

/// A completed dispatch to learn from.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Learn(pub DispatchOutcome);

impl Handler<Learn> for TunerActor {
    type Result = ();

    fn handle(&mut self, msg: Learn, ctx: &mut Context<Self>) {
        let tuner = &mut self.tuner;
        let Some(Some(change)) = guarded("tuning weights", || tuner.observe(&msg.0)) else { return };
        tracing::info!(signal_type = %change.signal_type, reason = %change.reason, "weights tuned");
        let durable = self.store.append(vec![change.event(now(), &self.region)]);
        let dispatcher = self.dispatcher.clone();
        ctx.spawn(
            async move {
                match durable.await {
                    Ok(Ok(_)) => {
                        let set = SetWeights { kind: change.signal_type, weights: change.after };
                        if dispatcher.send(set).await.is_err() {
                            tracing::error!("the dispatcher is gone; a tuned weight was not applied");
                        }
                    }
                    _ => tracing::error!("a weights change was not recorded, so it is not applied"),
                }
            }
            .into_actor(self),
        );
    }
}
