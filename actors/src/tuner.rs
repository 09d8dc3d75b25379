//! TunerActor: owns the [`LearningTuner`]. Learns from every completed dispatch; a change
//! of weights goes to the dispatcher, which records it (`WeightsTuned`) and applies it.

use actix::prelude::*;
use gridweaver_core::learning::tuning::LearningTuner;
use gridweaver_core::model::DispatchOutcome;

use crate::dispatcher::{DispatcherActor, SetWeights};
use crate::guard::guarded;

/// Learns weights from outcomes.
pub struct TunerActor {
    tuner: Box<dyn LearningTuner>,
    dispatcher: Addr<DispatcherActor>,
}

impl TunerActor {
    /// An actor around `tuner` (already restored from the log).
    pub fn new(tuner: Box<dyn LearningTuner>, dispatcher: Addr<DispatcherActor>) -> Self {
        Self { tuner, dispatcher }
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

    fn handle(&mut self, msg: Learn, _ctx: &mut Context<Self>) {
        let tuner = &mut self.tuner;
        let Some(Some(change)) = guarded("tuning weights", || tuner.observe(&msg.0)) else { return };
        tracing::info!(signal_type = %change.signal_type, reason = %change.reason, "weights tuned");
        if self.dispatcher.try_send(SetWeights(change)).is_err() {
            tracing::error!("the dispatcher cannot take a tuned weight now; it is not applied");
        }
    }
}
