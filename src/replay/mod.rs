//! The log's readers, above [`crate::dispatch`]: they fold what the dispatch core and the
//! rest of the gateway recorded and rebuild or re-run it.
//!
//! - [`projection`]: `DispatchProjection`, the one fold of the log into the
//!   [`crate::events::ProjectedState`] (the gateway's state as of any row); replay to a time.
//! - [`build`]: the planner, prediction, tuner and engine from a config and a projected state
//!   (what the gateway does at start-up, and the auditor before each re-run).
//! - [`audit`]: re-runs every recorded decision on the state just before it.
//! - [`migrate`]: imports a legacy snapshot as events.

pub mod audit;
pub mod build;
pub mod migrate;
pub mod projection;

pub use projection::{DispatchProjection, ProjectionError};
