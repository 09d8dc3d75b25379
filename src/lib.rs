//! # GridWeaver Edge core
//!
//! The pure part of the controller: deterministic, synchronous, no I/O and no clock. Every
//! function that needs the time takes it as an argument; every decision comes back as data
//! (events to record, orders to send, the next deadline) for the runtime in `actors/` to
//! carry out.
//!
//! # Layout
//! - [`time`]: [`time::Timestamp`], epoch milliseconds with RFC 3339 on the wire.
//! - [`model`]: vehicles, signals, orders, ACKs, outcomes; `Vehicle::effective_capacity`.
//! - [`wire`]: the MQTT topic layout and the one decoder of inbound payloads.
//! - [`filter`]: which vehicles may take part in a dispatch.
//! - [`dispatch`]: allocation strategies (Equal, Smart) behind the `Dispatcher` trait.
//! - [`limits`]: site, feeder-group and phase limits as linear rows every strategy respects.
//! - [`lp`]: `LpDispatcher`, the LP over the same scores and limits, solved with clarabel.
//! - [`segments`]: `SegmentedSmartDispatcher`, per-segment weights and strategy.
//! - [`policy`]: which strategy runs per signal type (LP-first, falling back to Smart).
//! - [`repair`]: the delivery guarantee (fill to the most the limits allow; LP polish).
//! - [`fallback`]: reallocation of residuals (Noop, Balanced, Probabilistic) behind the `Fallback` trait.
//! - [`engine`]: the dispatch state machine: `Planner`, `Dispatch`, `DispatchBook`.
//! - [`tuning`]: `LearningTuner`, `AckBasedTuner`: weights from ACK rates.
//! - [`prediction`]: `PredictionEngine`: availability from ACK history (nalgebra).
//! - [`events`]: event kinds, rows and the `EventStore` trait.
//! - [`config`]: the YAML config, raw and validated.
#![deny(missing_docs)]

pub mod config;
pub mod dispatch;
pub mod engine;
pub mod events;
pub mod fallback;
pub mod filter;
pub mod limits;
pub mod lp;
pub mod model;
pub mod policy;
pub mod prediction;
pub mod repair;
pub mod segments;
pub mod time;
pub mod tuning;
pub mod wire;
