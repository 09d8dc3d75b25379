//! FallbackActor: owns the configured [`Fallback`] and answers reallocation requests.

use actix::prelude::*;
use gridweaver_core::allocation::lp::LpDispatcher;
use gridweaver_core::dispatch::fallback::{Fallback, Reallocation};
use gridweaver_core::dispatch::FallbackRequest;

use crate::guard::guarded;

/// Runs the fallback rule for the supervisor. Supervised: a panicking rule answers "nothing
/// reallocated" (the residual becomes the shortfall) and the actor restarts.
pub struct FallbackActor {
    fallback: Box<dyn Fallback>,
    /// Tops up a fallback that places less than the limits allow.
    lp: LpDispatcher,
}

impl FallbackActor {
    /// An actor applying `fallback`.
    pub fn new(fallback: Box<dyn Fallback>) -> Self {
        Self { fallback, lp: LpDispatcher::default() }
    }
}

impl Actor for FallbackActor {
    type Context = Context<Self>;
}

impl Supervised for FallbackActor {
    fn restarting(&mut self, _ctx: &mut Context<Self>) {
        tracing::warn!("fallback actor restarting");
    }
}

/// Reallocate a dispatch's residual; the answer carries the request back.
#[derive(Message)]
#[rtype(result = "(FallbackRequest, Reallocation)")]
pub struct Reallocate(pub FallbackRequest);

impl Handler<Reallocate> for FallbackActor {
    type Result = MessageResult<Reallocate>;

    fn handle(&mut self, msg: Reallocate, ctx: &mut Context<Self>) -> Self::Result {
        let (fallback, lp) = (&self.fallback, &mut self.lp);
        let request = &msg.0;
        let realloc =
            guarded("reallocating a residual", || request.reallocate(fallback.as_ref(), lp)).unwrap_or_else(|| {
                ctx.stop();
                Reallocation { power_kw: vec![0.0; request.candidates.len()], skipped: Vec::new() }
            });
        MessageResult((msg.0, realloc))
    }
}
