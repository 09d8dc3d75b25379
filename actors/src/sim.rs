//! Seeded simulated EV fleet that behaves like real vehicles over MQTT (see `CONTRACT.md`).
//!
//! Owns: one MQTT connection (one rumqttc 0.25 `AsyncClient` for the whole fleet) on its own OS thread with its
//! own current-thread tokio runtime, so it never competes with the controller's runtime; the fleet's state
//! (SoC, ratings, behaviour, whether each vehicle is present).
//!
//! Accepts: orders on `<prefix>/vehicles/+/order` (QoS 1). An order is a JSON object with `order_id` (string or
//! number, echoed back), `direction` (`charge`|`discharge`), `power_kw` (> 0), `start` and `until` (RFC 3339,
//! `until >= start`); `vehicle_id`, if present, must equal the topic's vehicle id. Other fields are ignored.
//! An OrderCancel (`"cancel": true`) is counted and not answered. Anything else on an order topic is counted
//! as malformed and ignored (never answered, never a panic).
//!
//! Emits:
//! - `<prefix>/vehicles/<id>/state`, retained, QoS 1: each present vehicle's VehicleState on every (re)connect,
//!   after [`Simulator::rejoin`], and after an accepted order when [`SimConfig::soc_drift`] is on; an empty
//!   retained payload when a vehicle leaves ([`Simulator::leave`], [`Simulator::clear_retained`]).
//! - `<prefix>/vehicles/<id>/ack`, QoS 1: `{"order_id": .., "status": "accepted"|"rejected", "reason"?: ..}`
//!   according to the vehicle's [`Behaviour`]. A vehicle that is not plugged in rejects (unless it is
//!   [`Behaviour::Silent`]). Orders for unknown vehicles or vehicles that left are ignored.
//!
//! On every connect the simulator first subscribes to the order topics, then publishes the states, so a
//! controller that sees a state can already order that vehicle. The session is clean: orders published while
//! the simulator is disconnected are lost, like orders to a vehicle that is out of coverage.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc as std_mpsc, Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::Duration;

use chrono::{DateTime, Utc};
use rand::rngs::SmallRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rumqttc::{
    AsyncClient, ClientError, Event, EventLoop, MqttOptions, NetworkOptions, Outgoing, Packet, QoS, Request,
};
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::sync::mpsc;
use tokio::time::Instant;

/// Largest MQTT packet the simulator sends or accepts (bytes).
const MAX_PACKET_BYTES: usize = 1024 * 1024;
/// Order payloads above this size are malformed (the contract's 64 KiB limit).
const MAX_ORDER_BYTES: usize = 64 * 1024;
/// First and largest pause between reconnection attempts.
const RECONNECT_BACKOFF: (Duration, Duration) = (Duration::from_millis(100), Duration::from_secs(2));
/// After a stop is requested: how long the simulator may take to say goodbye to the broker.
const STOP_GRACE: Duration = Duration::from_secs(2);
/// How long [`Simulator::stop`] waits for the simulator thread to end.
const STOP_WAIT: Duration = Duration::from_secs(5);

/// How a simulated vehicle answers orders.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Behaviour {
    /// Accepts after a delay drawn uniformly from [`SimConfig::prompt_ack_ms`] (immediately if that is `(0, 0)`).
    Prompt,
    /// Accepts after [`SimConfig::late_ack_ms`], meant to land after the controller's ACK deadline.
    Late,
    /// Never answers.
    Silent,
    /// Rejects (with a `reason`) after a delay drawn from [`SimConfig::prompt_ack_ms`].
    Rejecting,
}

impl Behaviour {
    /// Lower-case name: `prompt`, `late`, `silent`, `rejecting`.
    pub fn as_str(self) -> &'static str {
        match self {
            Behaviour::Prompt => "prompt",
            Behaviour::Late => "late",
            Behaviour::Silent => "silent",
            Behaviour::Rejecting => "rejecting",
        }
    }
}

/// One simulated vehicle: what it reports in its VehicleState and how it answers orders.
#[derive(Debug, Clone, PartialEq)]
pub struct SimVehicle {
    /// Vehicle id, the `<vehicle_id>` of its topics (`ev001`, ...).
    pub id: String,
    /// State of charge, 0.0..=1.0.
    pub soc: f64,
    /// Battery capacity in kWh (> 0).
    pub capacity_kwh: f64,
    /// Largest charging power in kW.
    pub max_charge_kw: f64,
    /// Largest discharging power in kW.
    pub max_discharge_kw: f64,
    /// Reported availability, 0.0..=1.0.
    pub availability: f64,
    /// Reported battery degradation, 0.0..=1.0.
    pub degradation: f64,
    /// Reported priority, 0.0..=1.0.
    pub priority: f64,
    /// How the vehicle answers orders.
    pub behaviour: Behaviour,
    /// Whether the vehicle is plugged in; one that is not rejects orders (unless it is silent).
    pub plugged_in: bool,
    /// More VehicleState fields to report as they are (`group`, `phases`, `phase`,
    /// `segment`, `departure`, ...); they override the fields above on a clash.
    pub extra_state: serde_json::Map<String, Value>,
}

impl SimVehicle {
    /// The vehicle's VehicleState payload as the contract defines it (fields the vehicle does not set are left
    /// to their contract defaults).
    pub fn state_json(&self) -> Value {
        let mut state = json!({
            "soc": self.soc,
            "capacity_kwh": self.capacity_kwh,
            "max_charge_kw": self.max_charge_kw,
            "max_discharge_kw": self.max_discharge_kw,
            "plugged_in": self.plugged_in,
            "availability": self.availability,
            "degradation": self.degradation,
            "priority": self.priority,
        });
        if let Some(map) = state.as_object_mut() {
            map.extend(self.extra_state.clone());
        }
        state
    }
}

/// Share of each non-prompt behaviour in a generated fleet; the rest is [`Behaviour::Prompt`].
///
/// Fractions are of the fleet size, rounded to whole vehicles; negative or NaN counts as 0 and the total is
/// capped at the fleet size (late first, then silent, then rejecting).
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct FleetMix {
    /// Fraction of [`Behaviour::Late`] vehicles.
    pub late: f64,
    /// Fraction of [`Behaviour::Silent`] vehicles.
    pub silent: f64,
    /// Fraction of [`Behaviour::Rejecting`] vehicles.
    pub rejecting: f64,
}

impl FleetMix {
    /// Every vehicle prompt.
    pub const ALL_PROMPT: FleetMix = FleetMix { late: 0.0, silent: 0.0, rejecting: 0.0 };
}

/// The id of vehicle number `index` (0-based) in a fleet of `n`: `ev` and `index + 1` zero-padded to
/// `max(3, digits(n))` digits (`ev001`, ..., or `ev0001` in fleets of 1,000 or more), so ids sort in order.
pub fn vehicle_id(index: usize, n: usize) -> String {
    let width = n.to_string().len().max(3);
    format!("ev{:0width$}", index + 1)
}

/// A deterministic fleet of `n` vehicles: the same `seed`, `n` and `mix` always give the same fleet.
///
/// SoC 0.15..0.95, capacity 40..120 kWh, charge rating 7..50 kW, discharge rating 7 kW..the charge rating,
/// availability 0.7..1.0, degradation 0.0..0.3, priority 0.0..1.0, about 5 % not plugged in; behaviours per
/// `mix`, spread over the fleet by a seeded shuffle. Ids from [`vehicle_id`].
pub fn generate_fleet(seed: u64, n: usize, mix: FleetMix) -> Vec<SimVehicle> {
    let mut rng = SmallRng::seed_from_u64(seed);
    let mut fleet: Vec<SimVehicle> = (0..n)
        .map(|i| {
            let max_charge_kw = round_to(rng.gen_range(7.0..50.0), 1);
            SimVehicle {
                id: vehicle_id(i, n),
                soc: round_to(rng.gen_range(0.15..0.95), 3),
                capacity_kwh: round_to(rng.gen_range(40.0..120.0), 1),
                max_charge_kw,
                max_discharge_kw: round_to(rng.gen_range(7.0..=max_charge_kw), 1),
                availability: round_to(rng.gen_range(0.7..=1.0), 2),
                degradation: round_to(rng.gen_range(0.0..0.3), 2),
                priority: round_to(rng.gen_range(0.0..=1.0), 2),
                behaviour: Behaviour::Prompt,
                plugged_in: !rng.gen_bool(0.05),
                extra_state: serde_json::Map::new(),
            }
        })
        .collect();

    let share =
        |fraction: f64| if fraction.is_finite() && fraction > 0.0 { (fraction * n as f64).round() } else { 0.0 };
    let mut left = n;
    let mut take = |fraction: f64| {
        let count = (share(fraction) as usize).min(left);
        left -= count;
        count
    };
    let counts = [
        (Behaviour::Late, take(mix.late)),
        (Behaviour::Silent, take(mix.silent)),
        (Behaviour::Rejecting, take(mix.rejecting)),
    ];
    let mut order: Vec<usize> = (0..n).collect();
    order.shuffle(&mut rng);
    let mut slots = order.into_iter();
    for (behaviour, count) in counts {
        for index in slots.by_ref().take(count) {
            fleet[index].behaviour = behaviour;
        }
    }
    fleet
}

fn round_to(value: f64, decimals: i32) -> f64 {
    let scale = 10f64.powi(decimals);
    (value * scale).round() / scale
}

/// Where and how the simulator connects, and how its vehicles time their answers.
#[derive(Debug, Clone, PartialEq)]
pub struct SimConfig {
    /// Broker host name or address.
    pub host: String,
    /// Broker port.
    pub port: u16,
    /// Topic prefix `<p>` (for example `gridweaver/demo`), without a trailing `/`.
    pub prefix: String,
    /// MQTT client id of the simulator's single connection (must differ from the controller's).
    pub client_id: String,
    /// Delay range in ms (inclusive) for prompt answers, drawn uniformly per order; `(0, 0)` answers at once.
    pub prompt_ack_ms: (u64, u64),
    /// Delay in ms before a [`Behaviour::Late`] vehicle accepts.
    pub late_ack_ms: u64,
    /// Seed of the delay draws (the fleet has its own seed in [`generate_fleet`]).
    pub seed: u64,
    /// Whether an accepted order changes the vehicle's SoC (and republishes its state).
    pub soc_drift: bool,
}

impl Default for SimConfig {
    /// `127.0.0.1:1883`, prefix `gridweaver/demo`, client id `gridweaver-sim`, prompt answers after 5..=50 ms,
    /// late answers after 10 s, seed 42, no SoC drift.
    fn default() -> Self {
        SimConfig {
            host: "127.0.0.1".to_owned(),
            port: 1883,
            prefix: "gridweaver/demo".to_owned(),
            client_id: "gridweaver-sim".to_owned(),
            prompt_ack_ms: (5, 50),
            late_ack_ms: 10_000,
            seed: 42,
            soc_drift: false,
        }
    }
}

/// Counters of what the simulator has done since it started (over all reconnections).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SimStats {
    /// Messages received on order topics (well-formed or not).
    pub orders_received: u64,
    /// `accepted` ACKs handed to the MQTT client.
    pub acks_accepted: u64,
    /// `rejected` ACKs handed to the MQTT client.
    pub acks_rejected: u64,
    /// Orders that could not be parsed or failed validation (ignored).
    pub malformed: u64,
    /// Order cancels (`"cancel": true`) received; a simulated vehicle just stops.
    pub cancels: u64,
    /// Well-formed orders deliberately left unanswered by [`Behaviour::Silent`] vehicles.
    pub unanswered: u64,
    /// Well-formed orders for vehicles the simulator does not have or that have left (ignored).
    pub ignored: u64,
    /// Non-empty retained state publishes handed to the MQTT client.
    pub states_published: u64,
    /// Successful connections to the broker (1 + reconnections).
    pub connects: u64,
}

#[derive(Default)]
struct Counters {
    orders_received: AtomicU64,
    acks_accepted: AtomicU64,
    acks_rejected: AtomicU64,
    malformed: AtomicU64,
    cancels: AtomicU64,
    unanswered: AtomicU64,
    ignored: AtomicU64,
    states_published: AtomicU64,
    connects: AtomicU64,
}

impl Counters {
    fn bump(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    fn snapshot(&self) -> SimStats {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        SimStats {
            orders_received: get(&self.orders_received),
            acks_accepted: get(&self.acks_accepted),
            acks_rejected: get(&self.acks_rejected),
            malformed: get(&self.malformed),
            cancels: get(&self.cancels),
            unanswered: get(&self.unanswered),
            ignored: get(&self.ignored),
            states_published: get(&self.states_published),
            connects: get(&self.connects),
        }
    }
}

/// A vehicle and whether it is currently present (has a retained state on the broker).
struct Slot {
    vehicle: SimVehicle,
    present: bool,
}

/// State shared between the caller's thread and the simulator thread.
struct Shared {
    counters: Counters,
    fleet: Mutex<BTreeMap<String, Slot>>,
    /// Set by [`Simulator::stop`]: connection errors end the loop instead of reconnecting.
    stopping: AtomicBool,
    /// Ends the event loop at once (used when a graceful disconnect takes too long).
    exit: tokio::sync::Notify,
    /// Readiness of the current connection: order subscription acknowledged, states acknowledged.
    ready: Mutex<Readiness>,
    ready_changed: Condvar,
}

#[derive(Default)]
struct Readiness {
    subscribed: bool,
    /// PubAcks received since the current connection was made.
    pubacks: u64,
    /// Number of state publishes of the current connection's announcement, once all are handed over.
    announced: Option<u64>,
    /// Latched once the first connection was ready.
    ready: bool,
}

impl Shared {
    fn fleet(&self) -> MutexGuard<'_, BTreeMap<String, Slot>> {
        // A panic while holding the lock cannot leave the map inconsistent (plain field writes): keep going.
        self.fleet.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn readiness<R>(&self, update: impl FnOnce(&mut Readiness) -> R) -> R {
        let mut readiness = self.ready.lock().unwrap_or_else(PoisonError::into_inner);
        let result = update(&mut readiness);
        if !readiness.ready && readiness.subscribed && readiness.announced.is_some_and(|n| readiness.pubacks >= n) {
            readiness.ready = true;
            self.ready_changed.notify_all();
        }
        result
    }
}

/// What the simulator refused or could not do.
#[derive(Debug, thiserror::Error)]
pub enum SimError {
    /// The configuration or fleet cannot be simulated.
    #[error("{0}")]
    Invalid(String),
    /// Its thread or runtime could not be started.
    #[error("{what}: {error}")]
    Start {
        /// What was being started.
        what: &'static str,
        /// Why it failed.
        error: std::io::Error,
    },
    /// The fleet was not on the broker in time.
    #[error("the simulated fleet was not ready on the broker within {0:?}")]
    NotReady(Duration),
    /// No such vehicle.
    #[error("the simulated fleet has no vehicle {0:?}")]
    UnknownVehicle(String),
    /// The simulator thread has ended.
    #[error("the simulator has stopped")]
    Stopped,
}

/// Requests from the caller's thread to the simulator thread, handled one at a time in order.
enum Command {
    Leave(String),
    Rejoin(String),
    ClearRetained,
    Stop,
}

/// A running simulated fleet. See the module documentation for what it accepts and emits.
///
/// Dropping it without [`Simulator::stop`] asks the thread to stop but does not wait for it.
pub struct Simulator {
    shared: Arc<Shared>,
    commands: mpsc::UnboundedSender<Command>,
    thread: Option<JoinHandle<()>>,
    done: Mutex<std_mpsc::Receiver<()>>,
    vehicle_ids: Vec<String>,
}

impl std::fmt::Debug for Simulator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Simulator").field("vehicles", &self.vehicle_ids.len()).field("stats", &self.stats()).finish()
    }
}

impl Simulator {
    /// Starts the simulator on its own thread and returns at once; it connects (and reconnects) in the
    /// background. Use [`Simulator::wait_ready`] to wait until the fleet is visible on the broker.
    ///
    /// MQTT settings: clean session, keep-alive 30 s, `TCP_NODELAY`, 5 s connection timeout, 1 MiB packets,
    /// in-flight window and request channel of `max(2 * fleet size, 100)` (capped at 65,535 in flight).
    ///
    /// # Errors
    /// Duplicate or empty vehicle ids, an empty prefix or client id, or the runtime or thread could not be
    /// created. An unreachable broker is not an error: the simulator keeps retrying.
    pub fn start(cfg: SimConfig, fleet: Vec<SimVehicle>) -> Result<Simulator, SimError> {
        let prefix = cfg.prefix.trim_end_matches('/').to_owned();
        if prefix.is_empty() || prefix.contains(['+', '#']) {
            return Err(SimError::Invalid(format!(
                "simulator prefix {:?} must be non-empty and free of MQTT wildcards",
                cfg.prefix
            )));
        }
        if cfg.client_id.is_empty() {
            return Err(SimError::Invalid("simulator client_id must not be empty".to_owned()));
        }
        let mut slots = BTreeMap::new();
        let mut vehicle_ids = Vec::with_capacity(fleet.len());
        for vehicle in fleet {
            if vehicle.id.is_empty() || vehicle.id.contains(['/', '+', '#']) {
                return Err(SimError::Invalid(format!(
                    "simulated vehicle id {:?} must be non-empty and free of '/', '+', '#'",
                    vehicle.id
                )));
            }
            vehicle_ids.push(vehicle.id.clone());
            let id = vehicle.id.clone();
            if slots.insert(id.clone(), Slot { vehicle, present: true }).is_some() {
                return Err(SimError::Invalid(format!("simulated vehicle id {id:?} appears twice in the fleet")));
            }
        }

        let capacity = (2 * vehicle_ids.len()).max(100);
        let mut options = MqttOptions::new(cfg.client_id.clone(), cfg.host.clone(), cfg.port);
        options
            .set_clean_session(true)
            .set_keep_alive(Duration::from_secs(30))
            .set_max_packet_size(MAX_PACKET_BYTES, MAX_PACKET_BYTES)
            .set_inflight(u16::try_from(capacity).unwrap_or(u16::MAX))
            .set_request_channel_capacity(capacity);
        let (client, mut eventloop) = AsyncClient::new(options, capacity);
        // Start from `NetworkOptions::new()`: its `Default` has a 0 s connection timeout.
        let mut network = NetworkOptions::new();
        network.set_tcp_nodelay(true);
        network.set_connection_timeout(5);
        eventloop.set_network_options(network);

        let shared = Arc::new(Shared {
            counters: Counters::default(),
            fleet: Mutex::new(slots),
            stopping: AtomicBool::new(false),
            exit: tokio::sync::Notify::new(),
            ready: Mutex::new(Readiness::default()),
            ready_changed: Condvar::new(),
        });
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|error| SimError::Start { what: "could not build the simulator's tokio runtime", error })?;
        let (commands, command_rx) = mpsc::unbounded_channel();
        let (done_tx, done) = std_mpsc::channel();
        let sim = Arc::new(SimContext { cfg: SimConfig { prefix, ..cfg }, client, shared: Arc::clone(&shared) });
        let thread = std::thread::Builder::new()
            .name("gridweaver-sim".to_owned())
            .spawn(move || {
                runtime.block_on(run(sim, eventloop, command_rx));
                // Dropping the runtime here cancels pending delayed answers.
                drop(runtime);
                let _ = done_tx.send(());
            })
            .map_err(|error| SimError::Start { what: "could not spawn the simulator thread", error })?;
        Ok(Simulator { shared, commands, thread: Some(thread), done: Mutex::new(done), vehicle_ids })
    }

    /// Blocks until the first connection is ready: the order subscription is acknowledged and the broker has
    /// acknowledged as many publishes as there were vehicle states to announce (so a new subscriber to the
    /// state topics sees the fleet).
    ///
    /// # Errors
    /// Not ready within `timeout` (broker unreachable, or the simulator was stopped).
    pub fn wait_ready(&self, timeout: Duration) -> Result<(), SimError> {
        let guard = self.shared.ready.lock().unwrap_or_else(PoisonError::into_inner);
        let (guard, _) = self
            .shared
            .ready_changed
            .wait_timeout_while(guard, timeout, |r| !r.ready)
            .unwrap_or_else(PoisonError::into_inner);
        if guard.ready {
            Ok(())
        } else {
            Err(SimError::NotReady(timeout))
        }
    }

    /// Whether the first connection has become ready (see [`Simulator::wait_ready`]).
    pub fn is_ready(&self) -> bool {
        self.shared.ready.lock().unwrap_or_else(PoisonError::into_inner).ready
    }

    /// The counters so far.
    pub fn stats(&self) -> SimStats {
        self.shared.counters.snapshot()
    }

    /// Ids of the fleet's vehicles in the order they were given to [`Simulator::start`].
    pub fn vehicle_ids(&self) -> &[String] {
        &self.vehicle_ids
    }

    /// A snapshot of the vehicles (with their current SoC), ordered by id, and whether each is present.
    pub fn vehicles(&self) -> Vec<(SimVehicle, bool)> {
        self.shared.fleet().values().map(|slot| (slot.vehicle.clone(), slot.present)).collect()
    }

    /// The vehicle leaves: an empty retained payload is published on its state topic and it ignores orders
    /// from now on. Asynchronous: the publish is queued on the simulator thread.
    ///
    /// # Errors
    /// Unknown vehicle id, or the simulator thread has ended.
    pub fn leave(&self, id: &str) -> Result<(), SimError> {
        self.known(id)?;
        self.send(Command::Leave(id.to_owned()))
    }

    /// The vehicle (back) joins: its state is published retained and it answers orders again.
    /// Asynchronous like [`Simulator::leave`].
    ///
    /// # Errors
    /// Unknown vehicle id, or the simulator thread has ended.
    pub fn rejoin(&self, id: &str) -> Result<(), SimError> {
        self.known(id)?;
        self.send(Command::Rejoin(id.to_owned()))
    }

    /// Every vehicle leaves: an empty retained payload on every vehicle's state topic, so the broker keeps no
    /// state of this fleet (use it before [`Simulator::stop`] to leave a shared test broker clean).
    /// `stop` does not clear retained states by itself. Asynchronous, but ordered before a later `stop`, which
    /// disconnects only after these publishes were sent.
    ///
    /// # Errors
    /// The simulator thread has ended.
    pub fn clear_retained(&self) -> Result<(), SimError> {
        self.send(Command::ClearRetained)
    }

    /// Disconnects from the broker (after everything queued before it has been sent) and joins the thread,
    /// waiting at most about 5 s; returns the final counters. Retained states stay on the broker unless
    /// [`Simulator::clear_retained`] was called first. Pending delayed answers are dropped.
    pub fn stop(mut self) -> SimStats {
        self.request_stop();
        if let Some(thread) = self.thread.take() {
            let done = self.done.lock().unwrap_or_else(PoisonError::into_inner).recv_timeout(STOP_WAIT);
            match done {
                Ok(()) | Err(std_mpsc::RecvTimeoutError::Disconnected) => {
                    if thread.join().is_err() {
                        tracing::warn!("the simulator thread panicked");
                    }
                }
                Err(std_mpsc::RecvTimeoutError::Timeout) => {
                    tracing::warn!("the simulator thread did not stop within {STOP_WAIT:?}; leaving it behind");
                }
            }
        }
        self.stats()
    }

    fn request_stop(&self) {
        self.shared.stopping.store(true, Ordering::SeqCst);
        if self.commands.send(Command::Stop).is_err() {
            // The command loop is gone: wake the event loop directly.
            self.shared.exit.notify_one();
        }
    }

    fn known(&self, id: &str) -> Result<(), SimError> {
        if self.shared.fleet().contains_key(id) {
            Ok(())
        } else {
            Err(SimError::UnknownVehicle(id.to_owned()))
        }
    }

    fn send(&self, command: Command) -> Result<(), SimError> {
        self.commands.send(command).map_err(|_| SimError::Stopped)
    }
}

impl Drop for Simulator {
    fn drop(&mut self) {
        if self.thread.is_some() {
            self.request_stop();
        }
    }
}

/// Everything the simulator thread's tasks share.
struct SimContext {
    cfg: SimConfig,
    client: AsyncClient,
    shared: Arc<Shared>,
}

impl SimContext {
    fn state_topic(&self, id: &str) -> String {
        format!("{}/vehicles/{id}/state", self.cfg.prefix)
    }

    fn ack_topic(&self, id: &str) -> String {
        format!("{}/vehicles/{id}/ack", self.cfg.prefix)
    }

    fn order_filter(&self) -> String {
        format!("{}/vehicles/+/order", self.cfg.prefix)
    }

    /// The vehicle id of an order topic `<prefix>/vehicles/<id>/order`.
    fn order_vehicle<'t>(&self, topic: &'t str) -> Option<&'t str> {
        let id = topic.strip_prefix(self.cfg.prefix.as_str())?.strip_prefix("/vehicles/")?.strip_suffix("/order")?;
        (!id.is_empty() && !id.contains('/')).then_some(id)
    }
}

/// What a publish is, for the counters.
#[derive(Clone, Copy)]
enum Kind {
    Accepted,
    Rejected,
    State,
    Clear,
}

impl Kind {
    fn count(self, counters: &Counters) {
        match self {
            Kind::Accepted => Counters::bump(&counters.acks_accepted),
            Kind::Rejected => Counters::bump(&counters.acks_rejected),
            Kind::State => Counters::bump(&counters.states_published),
            Kind::Clear => {}
        }
    }
}

/// Queues a QoS 1 publish and counts it; waits for room in the request channel.
async fn publish(sim: &SimContext, topic: String, retain: bool, payload: Vec<u8>, kind: Kind) {
    match sim.client.publish(topic, QoS::AtLeastOnce, retain, payload).await {
        Ok(()) => kind.count(&sim.shared.counters),
        Err(error) => tracing::debug!(%error, "simulator publish dropped: MQTT event loop gone"),
    }
}

/// Queues a QoS 1 publish without waiting; if the request channel is full, a task waits for room instead.
fn publish_now(sim: &Arc<SimContext>, topic: String, retain: bool, payload: Vec<u8>, kind: Kind) {
    match sim.client.try_publish(topic, QoS::AtLeastOnce, retain, payload) {
        Ok(()) => kind.count(&sim.shared.counters),
        Err(ClientError::TryRequest(Request::Publish(request)) | ClientError::Request(Request::Publish(request))) => {
            let sim = Arc::clone(sim);
            tokio::spawn(async move {
                publish(&sim, request.topic, retain, request.payload.to_vec(), kind).await;
            });
        }
        Err(error) => tracing::debug!(%error, "simulator publish dropped"),
    }
}

/// The simulator thread: drives the MQTT event loop and dispatches incoming orders.
async fn run(sim: Arc<SimContext>, mut eventloop: EventLoop, commands: mpsc::UnboundedReceiver<Command>) {
    tokio::spawn(command_loop(Arc::clone(&sim), commands));
    let mut rng = SmallRng::seed_from_u64(sim.cfg.seed);
    let mut announcer: Option<tokio::task::JoinHandle<()>> = None;
    let mut backoff = RECONNECT_BACKOFF.0;
    let mut retry_at: Option<Instant> = None;
    let mut goodbye_deadline: Option<Instant> = None;
    loop {
        let event = tokio::select! {
            event = eventloop.poll(), if retry_at.is_none() => event,
            () = sleep_until(retry_at), if retry_at.is_some() => {
                retry_at = None;
                continue;
            }
            () = sim.shared.exit.notified() => break,
            () = sleep_until(goodbye_deadline), if goodbye_deadline.is_some() => break,
        };
        match event {
            Ok(Event::Incoming(Packet::Publish(publish))) => {
                handle_order(&sim, &mut rng, &publish.topic, &publish.payload);
            }
            Ok(Event::Incoming(Packet::ConnAck(_))) => {
                backoff = RECONNECT_BACKOFF.0;
                Counters::bump(&sim.shared.counters.connects);
                sim.shared.readiness(|r| {
                    r.subscribed = false;
                    r.pubacks = 0;
                    r.announced = None;
                });
                if let Some(previous) = announcer.take() {
                    previous.abort();
                }
                announcer = Some(tokio::spawn(announce(Arc::clone(&sim))));
            }
            Ok(Event::Incoming(Packet::SubAck(_))) => sim.shared.readiness(|r| r.subscribed = true),
            Ok(Event::Incoming(Packet::PubAck(_))) => sim.shared.readiness(|r| r.pubacks += 1),
            Ok(Event::Outgoing(Outgoing::Disconnect)) => {
                // Keep reading until the broker closes the connection, so that our close does not reset a
                // socket with unread acknowledgements; give up after the grace period.
                goodbye_deadline = Some(Instant::now() + STOP_GRACE);
            }
            Ok(_) => {}
            Err(error) => {
                if sim.shared.stopping.load(Ordering::SeqCst) {
                    break;
                }
                tracing::warn!(%error, host = %sim.cfg.host, port = sim.cfg.port, "simulator MQTT connection failed; retrying");
                retry_at = Some(Instant::now() + backoff);
                backoff = (backoff * 2).min(RECONNECT_BACKOFF.1);
            }
        }
    }
    if let Some(announcer) = announcer {
        announcer.abort();
    }
}

/// Sleeps until `deadline`, or forever when there is none.
async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

/// On each connection: subscribe to orders first, then publish every present vehicle's state.
async fn announce(sim: Arc<SimContext>) {
    if let Err(error) = sim.client.subscribe(sim.order_filter(), QoS::AtLeastOnce).await {
        tracing::debug!(%error, "simulator could not subscribe: MQTT event loop gone");
        return;
    }
    let states: Vec<(String, Vec<u8>)> = sim
        .shared
        .fleet()
        .values()
        .filter(|slot| slot.present)
        .map(|slot| (sim.state_topic(&slot.vehicle.id), slot.vehicle.state_json().to_string().into_bytes()))
        .collect();
    let count = states.len() as u64;
    for (topic, payload) in states {
        publish(&sim, topic, true, payload, Kind::State).await;
    }
    sim.shared.readiness(|r| r.announced = Some(count));
}

/// Handles requests from the caller's thread, one at a time, in order.
async fn command_loop(sim: Arc<SimContext>, mut commands: mpsc::UnboundedReceiver<Command>) {
    while let Some(command) = commands.recv().await {
        match command {
            Command::Leave(id) => {
                let known = sim.shared.fleet().get_mut(&id).map(|slot| slot.present = false).is_some();
                if known {
                    publish(&sim, sim.state_topic(&id), true, Vec::new(), Kind::Clear).await;
                }
            }
            Command::Rejoin(id) => {
                let state = sim.shared.fleet().get_mut(&id).map(|slot| {
                    slot.present = true;
                    slot.vehicle.state_json().to_string().into_bytes()
                });
                if let Some(state) = state {
                    publish(&sim, sim.state_topic(&id), true, state, Kind::State).await;
                }
            }
            Command::ClearRetained => {
                let ids: Vec<String> = sim
                    .shared
                    .fleet()
                    .values_mut()
                    .map(|slot| {
                        slot.present = false;
                        slot.vehicle.id.clone()
                    })
                    .collect();
                for id in ids {
                    publish(&sim, sim.state_topic(&id), true, Vec::new(), Kind::Clear).await;
                }
            }
            Command::Stop => {
                // Queued behind everything sent so far; the event loop ends when the broker closes the connection.
                let _ = tokio::time::timeout(STOP_GRACE, sim.client.disconnect()).await;
                tokio::time::sleep(STOP_GRACE).await;
                sim.shared.exit.notify_one();
                return;
            }
        }
    }
}

/// The fields of an order the simulator uses.
#[derive(Debug, Deserialize)]
struct OrderPayload {
    order_id: Value,
    #[serde(default)]
    vehicle_id: Option<String>,
    direction: String,
    power_kw: f64,
    start: DateTime<Utc>,
    until: DateTime<Utc>,
}

/// A validated order.
#[derive(Debug)]
struct Order {
    order_id: Value,
    vehicle_id: String,
    discharge: bool,
    power_kw: f64,
    hours: f64,
}

fn parse_order(vehicle_id: &str, payload: &[u8]) -> Result<Order, String> {
    if payload.len() > MAX_ORDER_BYTES {
        return Err(format!("payload of {} bytes exceeds {MAX_ORDER_BYTES}", payload.len()));
    }
    let order: OrderPayload = serde_json::from_slice(payload).map_err(|e| e.to_string())?;
    let id_ok = match &order.order_id {
        Value::String(s) => !s.is_empty(),
        Value::Number(_) => true,
        _ => false,
    };
    if !id_ok {
        return Err("order_id must be a non-empty string or a number".to_owned());
    }
    if let Some(payload_vehicle) = &order.vehicle_id {
        if payload_vehicle != vehicle_id {
            return Err(format!("vehicle_id {payload_vehicle:?} does not match the topic's {vehicle_id:?}"));
        }
    }
    let discharge = match order.direction.as_str() {
        "discharge" => true,
        "charge" => false,
        other => return Err(format!("direction {other:?} is neither \"charge\" nor \"discharge\"")),
    };
    if !(order.power_kw.is_finite() && order.power_kw > 0.0) {
        return Err(format!("power_kw {} must be a finite number > 0", order.power_kw));
    }
    if order.until < order.start {
        return Err("until is before start".to_owned());
    }
    let hours = (order.until - order.start).num_milliseconds() as f64 / 3_600_000.0;
    Ok(Order {
        order_id: order.order_id,
        vehicle_id: vehicle_id.to_owned(),
        discharge,
        power_kw: order.power_kw,
        hours,
    })
}

/// What a vehicle does with a well-formed order.
enum Reply {
    None,
    Answer { accept: bool, reason: Option<&'static str>, delay: Duration },
}

fn handle_order(sim: &Arc<SimContext>, rng: &mut SmallRng, topic: &str, payload: &[u8]) {
    let counters = &sim.shared.counters;
    Counters::bump(&counters.orders_received);
    if serde_json::from_slice::<serde_json::Value>(payload).is_ok_and(|v| v["cancel"] == true) {
        Counters::bump(&counters.cancels);
        return;
    }
    let order = match sim
        .order_vehicle(topic)
        .ok_or_else(|| format!("not an order topic: {topic}"))
        .and_then(|id| parse_order(id, payload))
    {
        Ok(order) => order,
        Err(reason) => {
            Counters::bump(&counters.malformed);
            tracing::debug!(topic, %reason, "simulator ignored a malformed order");
            return;
        }
    };
    let vehicle = sim
        .shared
        .fleet()
        .get(&order.vehicle_id)
        .filter(|slot| slot.present)
        .map(|slot| (slot.vehicle.behaviour, slot.vehicle.plugged_in));
    let Some((behaviour, plugged_in)) = vehicle else {
        Counters::bump(&counters.ignored);
        return;
    };
    let (lo, hi) = sim.cfg.prompt_ack_ms;
    let mut prompt = || Duration::from_millis(if hi > lo { rng.gen_range(lo..=hi) } else { lo });
    let reply = match behaviour {
        Behaviour::Silent => Reply::None,
        _ if !plugged_in => Reply::Answer { accept: false, reason: Some("vehicle is not plugged in"), delay: prompt() },
        Behaviour::Prompt => Reply::Answer { accept: true, reason: None, delay: prompt() },
        Behaviour::Late => {
            Reply::Answer { accept: true, reason: None, delay: Duration::from_millis(sim.cfg.late_ack_ms) }
        }
        Behaviour::Rejecting => Reply::Answer {
            accept: false,
            reason: Some("vehicle declines flexibility orders (simulated rejecting vehicle)"),
            delay: prompt(),
        },
    };
    match reply {
        Reply::None => Counters::bump(&counters.unanswered),
        Reply::Answer { accept, reason, delay } if delay.is_zero() => answer(sim, order, accept, reason),
        Reply::Answer { accept, reason, delay } => {
            let sim = Arc::clone(sim);
            tokio::spawn(async move {
                tokio::time::sleep(delay).await;
                answer(&sim, order, accept, reason);
            });
        }
    }
}

/// Sends the ACK and, for an accepted order with SoC drift on, the vehicle's new state.
fn answer(sim: &Arc<SimContext>, order: Order, accept: bool, reason: Option<&'static str>) {
    let mut ack = json!({ "order_id": order.order_id, "status": if accept { "accepted" } else { "rejected" } });
    if let (Some(reason), Some(map)) = (reason, ack.as_object_mut()) {
        map.insert("reason".to_owned(), Value::from(reason));
    }
    let kind = if accept { Kind::Accepted } else { Kind::Rejected };
    publish_now(sim, sim.ack_topic(&order.vehicle_id), false, ack.to_string().into_bytes(), kind);

    if accept && sim.cfg.soc_drift {
        let state = sim.shared.fleet().get_mut(&order.vehicle_id).filter(|slot| slot.present).map(|slot| {
            let vehicle = &mut slot.vehicle;
            let delta = order.power_kw * order.hours / vehicle.capacity_kwh;
            let soc = if order.discharge { vehicle.soc - delta } else { vehicle.soc + delta };
            vehicle.soc = if soc.is_finite() { soc.clamp(0.0, 1.0) } else { vehicle.soc };
            vehicle.state_json().to_string().into_bytes()
        });
        if let Some(state) = state {
            publish_now(sim, sim.state_topic(&order.vehicle_id), true, state, Kind::State);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn simulator_can_be_shared_between_threads() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<Simulator>();
    }

    #[test]
    fn fleet_is_deterministic_and_in_range() {
        let mix = FleetMix { late: 0.1, silent: 0.05, rejecting: 0.2 };
        let a = generate_fleet(7, 200, mix);
        assert_eq!(a, generate_fleet(7, 200, mix));
        assert_ne!(a, generate_fleet(8, 200, mix));
        assert_eq!(a[0].id, "ev001");
        assert_eq!(a[199].id, "ev200");
        let count = |b: Behaviour| a.iter().filter(|v| v.behaviour == b).count();
        assert_eq!((count(Behaviour::Late), count(Behaviour::Silent), count(Behaviour::Rejecting)), (20, 10, 40));
        assert_eq!(count(Behaviour::Prompt), 130);
        for v in &a {
            assert!((0.15..=0.95).contains(&v.soc), "{v:?}");
            assert!((40.0..=120.0).contains(&v.capacity_kwh), "{v:?}");
            assert!((7.0..=50.0).contains(&v.max_charge_kw), "{v:?}");
            assert!((7.0..=v.max_charge_kw).contains(&v.max_discharge_kw), "{v:?}");
        }
        let unplugged = a.iter().filter(|v| !v.plugged_in).count();
        assert!((1..=25).contains(&unplugged), "{unplugged} unplugged");
    }

    #[test]
    fn ids_widen_for_large_fleets() {
        assert_eq!(vehicle_id(0, 5), "ev001");
        assert_eq!(vehicle_id(999, 1000), "ev1000");
        assert_eq!(vehicle_id(0, 1000), "ev0001");
        assert_eq!(generate_fleet(1, 0, FleetMix::ALL_PROMPT).len(), 0);
    }

    #[test]
    fn mix_is_capped_and_sanitised() {
        let fleet = generate_fleet(3, 10, FleetMix { late: 0.8, silent: 0.8, rejecting: f64::NAN });
        let late = fleet.iter().filter(|v| v.behaviour == Behaviour::Late).count();
        let silent = fleet.iter().filter(|v| v.behaviour == Behaviour::Silent).count();
        assert_eq!((late, silent), (8, 2));
    }

    #[test]
    fn state_json_has_contract_fields() {
        let v = &generate_fleet(1, 1, FleetMix::ALL_PROMPT)[0];
        let state = v.state_json();
        for field in [
            "soc",
            "capacity_kwh",
            "max_charge_kw",
            "max_discharge_kw",
            "plugged_in",
            "availability",
            "degradation",
            "priority",
        ] {
            assert!(state.get(field).is_some(), "missing {field}");
        }
    }

    #[test]
    fn orders_are_validated() {
        let good = br#"{"order_id":"o1","dispatch_id":"d","vehicle_id":"ev001","direction":"discharge","power_kw":10,
            "start":"2026-11-23T10:00:00Z","until":"2026-11-23T10:30:00Z","attempt":1}"#;
        let order = parse_order("ev001", good).unwrap();
        assert!(order.discharge);
        assert!((order.hours - 0.5).abs() < 1e-9);
        assert!(parse_order("ev002", good).is_err(), "vehicle mismatch");
        for bad in [
            &br#"{"order_id":"o1","direction":"up","power_kw":10,"start":"2026-11-23T10:00:00Z","until":"2026-11-23T10:30:00Z"}"#[..],
            br#"{"order_id":"o1","direction":"charge","power_kw":0,"start":"2026-11-23T10:00:00Z","until":"2026-11-23T10:30:00Z"}"#,
            br#"{"order_id":"o1","direction":"charge","power_kw":5,"start":"2026-11-23T10:00:00Z","until":"2026-11-23T09:30:00Z"}"#,
            br#"{"order_id":null,"direction":"charge","power_kw":5,"start":"2026-11-23T10:00:00Z","until":"2026-11-23T10:30:00Z"}"#,
            br#"{"direction":"charge","power_kw":5,"start":"2026-11-23T10:00:00Z","until":"2026-11-23T10:30:00Z"}"#,
            b"not json",
            b"",
        ] {
            assert!(parse_order("ev001", bad).is_err(), "{}", String::from_utf8_lossy(bad));
        }
    }
}
