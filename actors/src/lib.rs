//! # GridWeaver Edge runtime
//!
//! The actix shell around the core (`gridweaver_core`): each actor owns one core value and
//! its handlers are glue (decode, call the core with `now`, carry out what it returns).
//!
//! # Layout
//! - [`controller`]: builds and wires the actors from a config; graceful shutdown.
//! - [`bridge`]: `MqttBridge`, the inbound MQTT connection: decode once into a bounded
//!   inbox, route, reconnect; it never waits.
//! - [`dispatcher`]: `DispatcherActor`, owns the core `Engine` (fleet view, dispatches in
//!   flight, commitment ledger, fallbacks, tuner); carries out each step durable-first.
//! - [`supervisor`]: `Supervisor`, fleet membership: the vehicle actors.
//! - [`vehicle`]: `VehicleActor`, one per vehicle: its latest state, forwarded on change.
//! - [`store`]: `StoreActor` (the one SQLite writer thread, group commit) and readers;
//!   `LogLock`, the lock that keeps one gateway per log.
//! - [`publish`]: the outbound MQTT connection and its two lanes.
//! - [`mqtt`]: what both connections' poll loops share (backoff, link state, clean close).
//! - [`clock`]: `now()`, the controller's only clock read.
//! - [`cli`]: the `gridweaver` commands; [`demo`]: `gridweaver demo`.
//! - [`environment`]: what a config names on this machine (password file, the log's
//!   directory), checked before `check-config` says ok and before `run` starts anything.
//! - [`sim`]: the seeded simulated fleet (demo, tests, benchmarks); [`broker`]: the demo's
//!   embedded MQTT broker.

pub mod bridge;
#[cfg(feature = "demo")]
pub mod broker;
pub mod cli;
pub mod clock;
pub mod controller;
#[cfg(feature = "demo")]
pub mod demo;
pub mod dispatcher;
pub mod environment;
pub mod guard;
pub mod mqtt;
pub mod publish;
#[cfg(feature = "demo")]
pub mod sim;
pub mod store;
pub mod supervisor;
pub mod vehicle;

/// Mailbox capacity of the actors fed from outside (signals, states, ACKs): a whole
/// dispatch's ACKs fit; beyond it the bridge waits (back-pressure).
pub const MAILBOX: usize = 16_384;
