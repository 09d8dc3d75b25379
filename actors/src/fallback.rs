//! FallbackActor: owns the configured [`Fallback`] and answers reallocation requests.

use actix::prelude::*;
use gridweaver_core::engine::FallbackRequest;
use gridweaver_core::fallback::{Fallback, Reallocation};

/// Runs the fallback rule for the supervisor.
pub struct FallbackActor {
    fallback: Box<dyn Fallback>,
}

impl FallbackActor {
    /// An actor applying `fallback`.
    pub fn new(fallback: Box<dyn Fallback>) -> Self {
        Self { fallback }
    }
}

impl Actor for FallbackActor {
    type Context = Context<Self>;
}

/// Reallocate a dispatch's residual; the answer carries the request back.
#[derive(Message)]
#[rtype(result = "(FallbackRequest, Reallocation)")]
pub struct Reallocate(pub FallbackRequest);

impl Handler<Reallocate> for FallbackActor {
    type Result = MessageResult<Reallocate>;

    fn handle(&mut self, msg: Reallocate, _ctx: &mut Context<Self>) -> Self::Result {
        let realloc = self.fallback.reallocate(msg.0.residual_kw, &msg.0.fallback_candidates());
        MessageResult((msg.0, realloc))
    }
}
