//! # GridWeaver Edge core
//!
//! The pure part of the controller: deterministic, synchronous, no I/O and no clock. Every
//! function that needs the time takes it as an argument; every decision comes back as data
//! (events to record, orders to send, the next deadline) for the runtime in `actors/` to
//! carry out.
//!
//! # Layout (by concern)
//! - [`time`]: [`time::Timestamp`], epoch milliseconds with RFC 3339 on the wire.
//! - [`model`]: vehicles, signals, orders, cancels, ACKs, outcomes; `Vehicle::effective_capacity`.
//! - [`wire`]: the MQTT topic layout and the one decoder of inbound payloads.
//! - [`config`]: the YAML config, raw and validated, one validation per section.
//! - [`allocation`]: how much each vehicle is asked for: the `Dispatcher` trait, the filter,
//!   limit rows, Equal, Smart, the LP, segments, the LP-first policy and the repair step that
//!   makes every strategy deliver the most the limits allow.
//! - [`dispatch`]: the `Engine` (planner, the state machine of each dispatch, the book of
//!   dispatches in flight, the commitment ledger) and the fallbacks.
//! - [`learning`]: the weight tuner and the availability prediction.
//! - [`events`]: event kinds, rows and the `EventStore` trait.
#![deny(missing_docs)]

pub mod allocation;
pub mod bounded;
pub mod config;
pub mod dispatch;
pub mod events;
pub mod learning;
pub mod model;
pub mod replay;
pub mod time;
pub mod wire;
