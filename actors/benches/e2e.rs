//! End-to-end benchmark: dispatch latency and gateway memory against a real Mosquitto.
//!
//! ```sh
//! cargo bench -p gridweaver-actors --bench e2e                      # N = 100 and 1000, 20 rounds
//! cargo bench -p gridweaver-actors --bench e2e -- --vehicles 100,1000 --rounds 20 --warmup 3
//! ```
//!
//! `GRIDWEAVER_BIN=path` runs another gateway binary (e.g. one built without the demo feature).
//!
//! Options (after `--`; unknown arguments such as cargo's `--bench` are ignored):
//! `--vehicles LIST` fleet sizes (default `100,1000`), `--rounds R` measured rounds (20),
//! `--warmup W` unmeasured rounds first (3), `--gateway-log LEVEL` the gateway's `--log` (info),
//! `--synchronous full|normal` the gateway's `store.synchronous` (full), `--quiet-ms Q` quiet
//! before every round, raw and dispatch alike (1200; at least 1000: each signal's window is
//! 1 s, so its commitments have ended when the next one arrives), `--keep` keeps the temp
//! dirs (gateway config, log and event log) and prints where they are.
//!
//! One Mosquitto is started on a free loopback port with the tuned config (`set_tcp_nodelay
//! true`, `max_inflight_messages 0`, `max_queued_messages 100000`). For each fleet size N, with
//! a simulated fleet of N vehicles that ACK at once:
//!
//! 1. Raw floor: a plain rumqttc 0.25 client (TCP_NODELAY, inflight and request channel 2N)
//!    publishes one contract Order per vehicle (QoS 1) and measures first publish -> last ACK.
//! 2. Dispatch: the real `gridweaver run` process; a signal (aFRR up, half the retained
//!    capacity's `up_kw`, so every vehicle gets an order) is published and the time to its
//!    outcome on `<p>/dispatches/<id>` is measured.
//! 3. The gateway's VmRSS / VmHWM after 10 dispatches, and a breakdown of where the dispatch
//!    time goes, from the timestamps of the gateway's own event log (millisecond resolution).
//!
//! Everything talks to 127.0.0.1 only; every wait is bounded and fails with a message. The
//! results go to stdout (progress to stderr); the exit status is 1 if anything failed or the
//! gateway did not exit 0 after SIGTERM. Run it on an otherwise idle machine: with 2 cores, the
//! broker, the simulator and the gateway already compete for the CPU.

use std::collections::{HashMap, HashSet};
use std::fmt::Write as _;
use std::io::Write as _;
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, bail, ensure, Context as _, Result};
use gridweaver_actors::sim::{generate_fleet, FleetMix, SimConfig, SimStats, SimVehicle, Simulator};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use serde_json::{json, Value};
use tokio::sync::mpsc;
use tokio::time::Instant;

const HOST: &str = "127.0.0.1";

/// The gateway binary: `GRIDWEAVER_BIN` if set (for example a gateway build without the
/// demo feature: `cargo build --release -p gridweaver-actors --no-default-features`), else the
/// one cargo built for this bench.
fn gateway_bin() -> PathBuf {
    std::env::var_os("GRIDWEAVER_BIN").map_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_gridweaver")), PathBuf::from)
}
/// The issue's memory target for the gateway at 1,000 vehicles.
const RSS_TARGET_KB: u64 = 16 * 1024;
/// Dispatches after which the gateway's memory is read.
const RSS_AFTER_DISPATCHES: usize = 10;

const BROKER_START: Duration = Duration::from_secs(10);
const CONNECT: Duration = Duration::from_secs(10);
const SIM_READY: Duration = Duration::from_secs(60);
const RAW_ROUND: Duration = Duration::from_secs(10);
const CAPACITY_WAIT: Duration = Duration::from_secs(60);
/// A dispatch settles at the latest at its ACK deadline (10 s) plus the fallback's deadline.
const DISPATCH_ROUND: Duration = Duration::from_secs(40);
const GATEWAY_STOP: Duration = Duration::from_secs(20);
const ACK_TIMEOUT_S: u32 = 10;

fn main() {
    match run() {
        Ok(true) => {}
        Ok(false) => std::process::exit(1),
        Err(e) => {
            eprintln!("e2e benchmark failed: {e:#}");
            std::process::exit(1);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Options

struct Options {
    vehicles: Vec<usize>,
    rounds: usize,
    warmup: usize,
    gateway_log: String,
    synchronous: String,
    keep: bool,
    /// Quiet before each measured round (raw and dispatch alike), ms.
    quiet_ms: u64,
}

fn parse_options() -> Result<Options> {
    let mut o = Options {
        vehicles: vec![100, 1000],
        rounds: 20,
        warmup: 3,
        gateway_log: "info".into(),
        synchronous: "full".into(),
        keep: false,
        quiet_ms: 1200,
    };
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let (name, inline) = match arg.split_once('=') {
            Some((n, v)) => (n.to_owned(), Some(v.to_owned())),
            None => (arg.clone(), None),
        };
        let known = ["--vehicles", "--rounds", "--warmup", "--gateway-log", "--synchronous", "--quiet-ms"];
        if !known.contains(&name.as_str()) {
            if name == "--keep" {
                o.keep = true;
            }
            continue; // `--bench` from cargo, and anything else we do not know
        }
        let value = match inline {
            Some(v) => v,
            None => args.next().with_context(|| format!("{name} needs a value"))?,
        };
        match name.as_str() {
            "--vehicles" => {
                o.vehicles = value
                    .split(',')
                    .map(|s| s.trim().parse::<usize>().with_context(|| format!("--vehicles: `{s}` is not a count")))
                    .collect::<Result<_>>()?;
                ensure!(o.vehicles.iter().all(|&n| (1..=20_000).contains(&n)), "--vehicles: each in 1..=20000");
            }
            "--rounds" => {
                o.rounds = value.parse().with_context(|| format!("--rounds: `{value}` is not a count"))?;
                ensure!(o.rounds >= 1, "--rounds must be at least 1");
            }
            "--warmup" => o.warmup = value.parse().with_context(|| format!("--warmup: `{value}` is not a count"))?,
            "--gateway-log" => o.gateway_log = value,
            "--quiet-ms" => {
                o.quiet_ms = value.parse().with_context(|| format!("--quiet-ms: `{value}` is not a count"))?;
                // Each signal's window is 1 s: after that much quiet its power is free again.
                ensure!(o.quiet_ms >= 1000, "--quiet-ms must be at least 1000 (the signals' 1 s window)");
            }
            "--synchronous" => {
                ensure!(value == "full" || value == "normal", "--synchronous: `full` or `normal`, got `{value}`");
                o.synchronous = value;
            }
            _ => unreachable!("checked against `known`"),
        }
    }
    Ok(o)
}

// ---------------------------------------------------------------------------------------------
// Mosquitto

/// The tuned broker config (FACTS.md).
fn mosquitto_conf(port: u16) -> String {
    format!(
        "listener {port} {HOST}\nallow_anonymous true\npersistence false\nset_tcp_nodelay true\n\
         max_inflight_messages 0\nmax_queued_messages 100000\nlog_dest none\n"
    )
}

fn free_port() -> Result<u16> {
    let listener = TcpListener::bind((HOST, 0)).context("cannot bind a loopback port to find a free one")?;
    Ok(listener.local_addr().context("local address of the probe socket")?.port())
}

fn mosquitto_bin() -> Result<PathBuf> {
    let path = std::env::var("PATH").unwrap_or_default();
    let found = path
        .split(':')
        .chain(["/usr/sbin", "/sbin", "/usr/local/sbin"])
        .map(|dir| Path::new(dir).join("mosquitto"))
        .find(|p| p.is_file());
    found.ok_or_else(|| {
        anyhow!("mosquitto is not installed (Debian: apt-get install mosquitto; scripts/test.sh does it)")
    })
}

struct Mosquitto {
    child: Child,
    port: u16,
    version: String,
    conf: String,
    _dir: tempfile::TempDir,
}

impl Mosquitto {
    fn start() -> Result<Mosquitto> {
        let bin = mosquitto_bin()?;
        let version = Command::new(&bin)
            .arg("-h")
            .output()
            .ok()
            .and_then(|o| String::from_utf8_lossy(&o.stdout).lines().next().map(str::to_owned))
            .unwrap_or_else(|| "mosquitto (version unknown)".into());
        let dir = tempfile::tempdir().context("temp dir for mosquitto.conf")?;
        let port = free_port()?;
        let conf = mosquitto_conf(port);
        let conf_path = dir.path().join("mosquitto.conf");
        std::fs::write(&conf_path, &conf).with_context(|| format!("cannot write {}", conf_path.display()))?;
        let child = Command::new(&bin)
            .arg("-c")
            .arg(&conf_path)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| format!("cannot start {}", bin.display()))?;
        let mut m = Mosquitto { child, port, version, conf, _dir: dir };
        let deadline = std::time::Instant::now() + BROKER_START;
        while TcpStream::connect((HOST, port)).is_err() {
            if let Some(status) = m.child.try_wait().context("waiting for mosquitto")? {
                bail!("mosquitto exited at start ({status}); port {port} may have been taken meanwhile");
            }
            ensure!(
                std::time::Instant::now() < deadline,
                "mosquitto did not listen on {HOST}:{port} within {BROKER_START:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(m)
    }

    fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        self.stop();
    }
}

// ---------------------------------------------------------------------------------------------
// The bench's own MQTT client

enum Incoming {
    Publish { topic: String, payload: Vec<u8>, at: Instant },
    SubAck,
    Failed(String),
}

/// A plain rumqttc 0.25 client: TCP_NODELAY, inflight window and request channel of `window`.
struct BenchClient {
    client: AsyncClient,
    rx: mpsc::UnboundedReceiver<Incoming>,
    poller: tokio::task::JoinHandle<()>,
}

impl BenchClient {
    async fn connect(port: u16, id: &str, window: usize, subscriptions: &[String]) -> Result<BenchClient> {
        let window = window.max(100);
        let mut opts = MqttOptions::new(id, HOST, port);
        opts.set_keep_alive(Duration::from_secs(30))
            .set_clean_session(true)
            .set_inflight(u16::try_from(window).unwrap_or(u16::MAX))
            .set_request_channel_capacity(window)
            .set_max_packet_size(1 << 20, 1 << 20);
        let (client, mut eventloop) = AsyncClient::new(opts, window);
        let mut net = eventloop.network_options();
        net.set_tcp_nodelay(true);
        net.set_connection_timeout(5);
        eventloop.set_network_options(net);
        let (tx, rx) = mpsc::unbounded_channel();
        let poller = tokio::spawn(async move {
            loop {
                let msg = match eventloop.poll().await {
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        Incoming::Publish { topic: p.topic, payload: p.payload.to_vec(), at: Instant::now() }
                    }
                    Ok(Event::Incoming(Packet::SubAck(_))) => Incoming::SubAck,
                    Ok(_) => continue,
                    Err(e) => {
                        let _ = tx.send(Incoming::Failed(e.to_string()));
                        return;
                    }
                };
                if tx.send(msg).is_err() {
                    return;
                }
            }
        });
        let mut c = BenchClient { client, rx, poller };
        for s in subscriptions {
            c.client.subscribe(s.clone(), QoS::AtLeastOnce).await.with_context(|| format!("subscribe {s}"))?;
        }
        let deadline = Instant::now() + CONNECT;
        let mut acked = 0;
        while acked < subscriptions.len() {
            match c.next(deadline).await.with_context(|| format!("bench client {id}: connect and subscribe"))? {
                Some(Incoming::SubAck) => acked += 1,
                Some(_) => {}
                None => bail!("bench client {id}: not connected and subscribed within {CONNECT:?}"),
            }
        }
        Ok(c)
    }

    /// The next event; `None` at `deadline`; an error when the connection failed.
    async fn next(&mut self, deadline: Instant) -> Result<Option<Incoming>> {
        match tokio::time::timeout_at(deadline, self.rx.recv()).await {
            Err(_) => Ok(None),
            Ok(None) => bail!("the MQTT event loop ended"),
            Ok(Some(Incoming::Failed(e))) => bail!("MQTT connection failed: {e}"),
            Ok(Some(m)) => Ok(Some(m)),
        }
    }

    fn publish(&self, topic: String, payload: Vec<u8>) -> Result<()> {
        self.client.try_publish(topic, QoS::AtLeastOnce, false, payload).context("the request channel is full")
    }

    async fn close(self) {
        let _ = tokio::time::timeout(Duration::from_secs(2), self.client.disconnect()).await;
        let _ = tokio::time::timeout(Duration::from_secs(2), self.poller).await;
    }
}

// ---------------------------------------------------------------------------------------------
// Statistics

#[derive(Clone, Copy, Default)]
struct Summary {
    median_ms: f64,
    p90_ms: f64,
    min_ms: f64,
    max_ms: f64,
}

fn summarize(samples: &[Duration]) -> Summary {
    let mut ms: Vec<f64> = samples.iter().map(|d| d.as_secs_f64() * 1e3).collect();
    ms.sort_by(f64::total_cmp);
    summarize_ms(&ms)
}

/// `ms` sorted ascending. Median (mean of the middle two for an even count); p90 by nearest rank.
fn summarize_ms(ms: &[f64]) -> Summary {
    if ms.is_empty() {
        return Summary::default();
    }
    let n = ms.len();
    let median = if n % 2 == 1 { ms[n / 2] } else { (ms[n / 2 - 1] + ms[n / 2]) / 2.0 };
    let rank = ((0.9 * n as f64).ceil() as usize).clamp(1, n);
    Summary { median_ms: median, p90_ms: ms[rank - 1], min_ms: ms[0], max_ms: ms[n - 1] }
}

fn median_of(mut values: Vec<f64>) -> Option<f64> {
    values.sort_by(f64::total_cmp);
    (!values.is_empty()).then(|| summarize_ms(&values).median_ms)
}

fn wall_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

// ---------------------------------------------------------------------------------------------
// One fleet size

/// Memory of the gateway process, kB.
#[derive(Clone, Copy, Default)]
struct Memory {
    rss_kb: u64,
    hwm_kb: u64,
}

fn read_memory(pid: u32) -> Result<Memory> {
    let path = format!("/proc/{pid}/status");
    let status = std::fs::read_to_string(&path).with_context(|| format!("cannot read {path}"))?;
    let field = |name: &str| -> Result<u64> {
        let line =
            status.lines().find(|l| l.starts_with(name)).with_context(|| format!("{path} has no {name} line"))?;
        line[name.len()..]
            .trim()
            .trim_end_matches("kB")
            .trim()
            .parse()
            .with_context(|| format!("{path}: cannot parse `{line}`"))
    };
    Ok(Memory { rss_kb: field("VmRSS:")?, hwm_kb: field("VmHWM:")? })
}

/// The gateway's resident memory by kind of mapping, from `/proc/<pid>/smaps`: `[heap]` (the
/// main malloc arena), anonymous mappings (other threads' malloc arenas, large allocations,
/// thread stacks), files (the binary and libraries), and the rest.
fn smaps_summary(pid: u32) -> Result<String> {
    let path = format!("/proc/{pid}/smaps");
    let smaps = std::fs::read_to_string(&path).with_context(|| format!("cannot read {path}"))?;
    let (mut heap, mut anon, mut file, mut other) = (0u64, 0u64, 0u64, 0u64);
    let (mut anon_big, mut kind) = (0usize, 0u8);
    for line in smaps.lines() {
        let mut fields = line.split_whitespace();
        let first = fields.next().unwrap_or_default();
        if first.contains('-') && first.chars().all(|c| c.is_ascii_hexdigit() || c == '-') {
            let name = fields.nth(4).unwrap_or_default();
            kind = match name {
                "[heap]" => 0,
                "" => 1,
                n if n.starts_with('/') => 2,
                _ => 3,
            };
        } else if first == "Rss:" {
            let kb: u64 = fields.next().unwrap_or_default().parse().unwrap_or(0);
            match kind {
                0 => heap += kb,
                1 => {
                    anon += kb;
                    anon_big += usize::from(kb >= 1024);
                }
                2 => file += kb,
                _ => other += kb,
            }
        }
    }
    Ok(format!(
        "[heap] {}, anonymous {} ({anon_big} mappings >= 1 MB), files {}, other {}",
        mb(heap),
        mb(anon),
        mb(file),
        mb(other)
    ))
}

/// `text` without ANSI colour sequences (the gateway colours its log even into a file).
fn strip_ansi(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            // ESC [ parameters final-byte
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "unknown".into())
}

/// One measured dispatch: what the bench saw and when (wall clock, for the event log).
struct DispatchSample {
    dispatch_id: String,
    latency: Duration,
    published_wall_ms: i64,
    received_wall_ms: i64,
}

/// Where a dispatch's time goes, from the gateway's event log (ms, medians over the rounds).
#[derive(Default)]
struct Breakdown {
    /// Signal published -> `SignalReceived` (broker, bridge decode, dispatcher mailbox).
    inbound: Option<f64>,
    /// `SignalReceived` -> first `AckReceived` (plan, commit, orders out, one round trip).
    to_first_ack: Option<f64>,
    /// First -> last `AckReceived`.
    ack_spread: Option<f64>,
    /// Last `AckReceived` -> `DispatchCompleted`.
    to_completed: Option<f64>,
    /// `DispatchCompleted` -> outcome received by the bench (commit, publish, broker).
    outbound: Option<f64>,
    rounds: usize,
}

struct SizeResult {
    n: usize,
    order_bytes: usize,
    raw: Summary,
    dispatch: Summary,
    /// Per measured dispatch: (accepted, rejected, timed_out) that differ from (N, 0, 0).
    anomalies: Vec<String>,
    idle: Option<Memory>,
    after10: Option<(usize, Memory)>,
    smaps: Option<String>,
    at_end: Option<Memory>,
    breakdown: Breakdown,
    gateway_exit: String,
    /// Whether the gateway exited 0 after SIGTERM.
    gateway_clean_exit: bool,
    sim_stats: SimStats,
    up_kw: f64,
    dir: Option<PathBuf>,
    problems: Vec<String>,
    /// What the dispatches wrote to the event log.
    log_bytes: Option<LogBytes>,
}

/// Bytes the event log took per dispatch at this fleet size.
#[derive(Clone, Copy, Debug)]
struct LogBytes {
    dispatches: usize,
    /// Rows those dispatches added.
    rows: i64,
    /// Growth of the database (vacuumed, with and without those rows), per dispatch.
    growth: f64,
    /// `write_bytes` of /proc/<pid>/io over the dispatches (WAL, checkpoints), per dispatch.
    written: f64,
}

/// `write_bytes` of /proc/<pid>/io: what the process caused to be written to storage.
fn write_bytes(pid: u32) -> Result<u64> {
    let io = std::fs::read_to_string(format!("/proc/{pid}/io")).context("read /proc/<pid>/io")?;
    io.lines()
        .find_map(|l| l.strip_prefix("write_bytes:"))
        .and_then(|v| v.trim().parse().ok())
        .context("no write_bytes in /proc/<pid>/io")
}

/// The database's size with and without the rows after `seq`, both vacuumed into copies.
fn growth_after(db: &Path, seq: i64, dir: &Path) -> Result<(i64, u64)> {
    let conn = rusqlite::Connection::open(db)?;
    let rows: i64 = conn.query_row("SELECT COUNT(*) FROM events WHERE seq > ?1", [seq], |r| r.get(0))?;
    let (full, trimmed) = (dir.join("full.db"), dir.join("trimmed.db"));
    for p in [&full, &trimmed] {
        let _ = std::fs::remove_file(p);
        conn.execute("VACUUM INTO ?1", [p.display().to_string()])?;
    }
    let cut = rusqlite::Connection::open(&trimmed)?;
    cut.execute_batch(&format!(
        "DROP TRIGGER events_no_delete; DROP TRIGGER event_chain_no_delete;
         DELETE FROM events WHERE seq > {seq}; DELETE FROM event_chain WHERE seq > {seq}; VACUUM;"
    ))?;
    drop(cut);
    let size = |p: &Path| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0);
    Ok((rows, size(&full).saturating_sub(size(&trimmed))))
}

/// The fleet: seeded, every vehicle plugged in and with SoC 0.3..0.9, so each one is a
/// candidate in both directions (the generator leaves ~5 % unplugged and some under min SoC).
fn fleet(n: usize) -> Vec<SimVehicle> {
    generate_fleet(7, n, FleetMix::ALL_PROMPT)
        .into_iter()
        .map(|mut v| {
            v.plugged_in = true;
            v.soc = (0.3 + (v.soc - 0.15) * 0.75).clamp(0.3, 0.9);
            v
        })
        .collect()
}

/// A contract Order as the gateway would send it (~190 bytes).
fn order_payload(order_id: &str, dispatch_id: &str, vehicle_id: &str) -> Vec<u8> {
    json!({
        "order_id": order_id,
        "dispatch_id": dispatch_id,
        "vehicle_id": vehicle_id,
        "direction": "discharge",
        "power_kw": 11.25,
        "start": "2026-11-23T10:00:00Z",
        "until": "2026-11-23T10:15:00Z",
        "attempt": 1,
    })
    .to_string()
    .into_bytes()
}

async fn raw_floor(cx: &Ctx<'_>, ids: &[String]) -> Result<(Summary, usize)> {
    let Ctx { broker, opts, prefix, nonce, n } = *cx;
    let mut client = BenchClient::connect(
        broker.port,
        &format!("bench-raw-{nonce}-{n}"),
        2 * n,
        &[format!("{prefix}/vehicles/+/ack")],
    )
    .await?;
    let mut samples = Vec::with_capacity(opts.rounds);
    let mut order_bytes = 0;
    for round in 0..opts.warmup + opts.rounds {
        let dispatch_id = format!("raw-{nonce}-{round}");
        let tag = format!("{dispatch_id}-");
        let batch: Vec<(String, Vec<u8>)> = ids
            .iter()
            .map(|id| (format!("{prefix}/vehicles/{id}/order"), order_payload(&format!("{tag}{id}"), &dispatch_id, id)))
            .collect();
        order_bytes = batch.iter().map(|(_, p)| p.len()).sum::<usize>() / n.max(1);
        let mut seen = HashSet::with_capacity(n);
        tokio::time::sleep(Duration::from_millis(opts.quiet_ms)).await;
        let start = Instant::now();
        for (topic, payload) in batch {
            client.publish(topic, payload).with_context(|| format!("raw round {round}: publish an order"))?;
        }
        let deadline = start + RAW_ROUND;
        let mut last = start;
        while seen.len() < n {
            let msg = client.next(deadline).await.with_context(|| format!("raw round {round}"))?;
            let msg = msg
                .with_context(|| format!("raw round {round}: only {} of {n} ACKs within {RAW_ROUND:?}", seen.len()))?;
            if let Incoming::Publish { payload, at, .. } = msg {
                let ack: Value = serde_json::from_slice(&payload).context("an ACK that is not JSON")?;
                let order_id = ack["order_id"].as_str().unwrap_or_default();
                if order_id.starts_with(&tag) && seen.insert(order_id.to_owned()) {
                    ensure!(ack["status"] == "accepted", "raw round {round}: ACK {ack} is not `accepted`");
                    last = at;
                }
            }
        }
        if round >= opts.warmup {
            samples.push(last - start);
        }
    }
    client.close().await;
    Ok((summarize(&samples), order_bytes))
}

/// The running gateway process; killed on drop if it is still running.
struct Gateway {
    child: Option<Child>,
    pid: u32,
    db: PathBuf,
    log: PathBuf,
}

impl Gateway {
    fn start(dir: &Path, broker: &Mosquitto, prefix: &str, n: usize, opts: &Options) -> Result<Gateway> {
        let db = dir.join("events.db");
        let log = dir.join("gateway.log");
        let config = dir.join("gateway.yaml");
        let inflight = (2 * n + 100).max(2000);
        let inflight = u16::try_from(inflight).context("2N + 100 exceeds mqtt.inflight's range (65535)")?;
        let yaml = format!(
            "site: bench\n\
             mqtt:\n  host: {HOST}\n  port: {port}\n  prefix: {prefix}\n  client_id: gridweaver-bench-{n}\n  \
             inflight: {inflight}\n  reconnect_max_s: 1\n\
             store:\n  path: {db:?}\n  synchronous: {sync}\n\
             dispatch:\n  ack_timeout_seconds: {ACK_TIMEOUT_S}\n  strategy: smart\n",
            port = broker.port,
            db = db.display().to_string(),
            sync = opts.synchronous,
        );
        std::fs::write(&config, yaml).with_context(|| format!("cannot write {}", config.display()))?;
        let stderr = std::fs::File::create(&log).with_context(|| format!("cannot create {}", log.display()))?;
        let child = Command::new(gateway_bin())
            .args(["--log", &opts.gateway_log, "run", "--config"])
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .context("cannot start the gridweaver binary")?;
        let pid = child.id();
        Ok(Gateway { child: Some(child), pid, db, log })
    }

    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(15)..].join("\n")
    }

    /// Fails if the process has exited.
    fn check_alive(&mut self) -> Result<()> {
        if let Some(child) = self.child.as_mut() {
            if let Some(status) = child.try_wait().context("waiting for the gateway")? {
                self.child = None;
                bail!("the gateway exited early ({status}); its log ends with:\n{}", self.log_tail());
            }
        }
        Ok(())
    }

    /// SIGTERM, then waits (bounded) for the exit.
    fn terminate(&mut self) -> Result<ExitStatus> {
        let child = self.child.as_mut().context("the gateway is not running")?;
        let sent = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status()
            .context("cannot run `kill` to send SIGTERM")?;
        ensure!(sent.success(), "`kill -TERM {}` failed ({sent})", child.id());
        let deadline = std::time::Instant::now() + GATEWAY_STOP;
        loop {
            if let Some(status) = child.try_wait().context("waiting for the gateway")? {
                self.child = None;
                return Ok(status);
            }
            if std::time::Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                self.child = None;
                bail!(
                    "the gateway did not stop within {GATEWAY_STOP:?} of SIGTERM (killed); log:\n{}",
                    self.log_tail()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Events of one kind from the log, via `gridweaver events --json`.
    fn events(&self, kind: &str) -> Result<Vec<Value>> {
        let out = Command::new(gateway_bin())
            .args(["events", "--json", "--kind", kind, "--db"])
            .arg(&self.db)
            .output()
            .context("cannot run `gridweaver events`")?;
        ensure!(out.status.success(), "`gridweaver events` failed: {}", String::from_utf8_lossy(&out.stderr).trim());
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(|l| {
                serde_json::from_str(l).with_context(|| format!("`gridweaver events` printed a non-JSON line: {l}"))
            })
            .collect()
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Waits for the retained capacity to show `n` vehicles; returns its `up_kw`.
async fn wait_capacity(client: &mut BenchClient, gateway: &mut Gateway, prefix: &str, n: usize) -> Result<f64> {
    let topic = format!("{prefix}/capacity");
    let deadline = Instant::now() + CAPACITY_WAIT;
    let mut last = Value::Null;
    loop {
        gateway.check_alive()?;
        let step = (Instant::now() + Duration::from_millis(500)).min(deadline);
        match client.next(step).await.context("waiting for the capacity")? {
            Some(Incoming::Publish { topic: t, payload, .. }) if t == topic => {
                last = serde_json::from_slice(&payload).with_context(|| format!("{topic} is not JSON"))?;
                let vehicles =
                    last["vehicles"].as_u64().with_context(|| format!("{topic} has no `vehicles`: {last}"))?;
                if vehicles == n as u64 {
                    return last["up_kw"].as_f64().with_context(|| format!("{topic} has no `up_kw`: {last}"));
                }
                ensure!(vehicles <= n as u64, "{topic} shows {vehicles} vehicles, more than the fleet's {n}: {last}");
            }
            Some(_) => {}
            None if Instant::now() < deadline => {}
            None => bail!("the gateway's {topic} did not show {n} vehicles within {CAPACITY_WAIT:?} (last: {last})"),
        }
    }
}

/// What one fleet size's phases share.
struct Ctx<'a> {
    broker: &'a Mosquitto,
    opts: &'a Options,
    prefix: &'a str,
    nonce: &'a str,
    n: usize,
}

async fn dispatches(
    cx: &Ctx<'_>,
    client: &mut BenchClient,
    gateway: &mut Gateway,
    up_kw: f64,
    result: &mut SizeResult,
) -> Result<Vec<DispatchSample>> {
    let Ctx { opts, prefix, nonce, n, .. } = *cx;
    let signals = format!("{prefix}/signals");
    let outcomes = format!("{prefix}/dispatches/");
    let errors = format!("{prefix}/errors");
    let power_kw = (up_kw / 2.0 * 1000.0).round() / 1000.0;
    let mut samples = Vec::with_capacity(opts.rounds);
    for round in 0..opts.warmup + opts.rounds {
        let signal_id = format!("bench-{nonce}-n{n}-{round}");
        let payload =
            json!({ "id": signal_id, "type": "afrr", "direction": "up", "power_kw": power_kw, "duration_s": 1 })
                .to_string();
        tokio::time::sleep(Duration::from_millis(opts.quiet_ms)).await;
        let published_wall_ms = wall_ms();
        let start = Instant::now();
        client.publish(signals.clone(), payload.into_bytes()).context("publish a signal")?;
        let deadline = start + DISPATCH_ROUND;
        let (outcome, at) = loop {
            let Some(msg) = client.next(deadline).await.with_context(|| format!("round {round}"))? else {
                gateway.check_alive()?;
                bail!("round {round}: no outcome for signal {signal_id} within {DISPATCH_ROUND:?}");
            };
            let Incoming::Publish { topic, payload, at } = msg else { continue };
            if topic == errors {
                let report: Value = serde_json::from_slice(&payload).unwrap_or(Value::Null);
                if report["topic"] == signals.as_str() {
                    bail!("round {round}: the gateway rejected signal {signal_id}: {report}");
                }
                result.problems.push(format!("N={n}: the gateway reported an error: {report}"));
            } else if topic.starts_with(&outcomes) {
                let outcome: Value =
                    serde_json::from_slice(&payload).with_context(|| format!("{topic} is not JSON"))?;
                if outcome["signal_id"] == signal_id.as_str() {
                    break (outcome, at);
                }
            }
        };
        let received_wall_ms = wall_ms();
        let count = |k: &str| outcome["vehicles"][k].as_u64().unwrap_or(u64::MAX);
        let (accepted, rejected, timed_out) = (count("accepted"), count("rejected"), count("timed_out"));
        if (accepted, rejected, timed_out) != (n as u64, 0, 0) {
            result.anomalies.push(format!(
                "round {round} ({signal_id}): accepted {accepted}, rejected {rejected}, timed_out {timed_out}, \
                 requested {} kW, acknowledged {} kW",
                outcome["requested_kw"], outcome["acknowledged_kw"]
            ));
        }
        if round + 1 == RSS_AFTER_DISPATCHES {
            result.after10 = Some((round + 1, read_memory(gateway.pid)?));
            result.smaps = smaps_summary(gateway.pid).ok();
        }
        if round >= opts.warmup {
            samples.push(DispatchSample {
                dispatch_id: outcome["dispatch_id"].as_str().unwrap_or_default().to_owned(),
                latency: at - start,
                published_wall_ms,
                received_wall_ms,
            });
        }
    }
    result.dispatch = summarize(&samples.iter().map(|s| s.latency).collect::<Vec<_>>());
    Ok(samples)
}

/// Medians of the phases of each measured dispatch, from the event log's timestamps.
fn breakdown(gateway: &Gateway, samples: &[DispatchSample]) -> Result<Breakdown> {
    let wanted: HashMap<&str, &DispatchSample> = samples.iter().map(|s| (s.dispatch_id.as_str(), s)).collect();
    #[derive(Default)]
    struct Times {
        received: Option<i64>,
        first_ack: Option<i64>,
        last_ack: Option<i64>,
        completed: Option<i64>,
    }
    let mut times: HashMap<String, Times> = HashMap::new();
    for kind in ["SignalReceived", "AckReceived", "DispatchCompleted"] {
        for e in gateway.events(kind)? {
            let Some(id) = e["correlation_id"].as_str().filter(|id| wanted.contains_key(id)) else { continue };
            let ts = e["ts_ms"].as_i64().with_context(|| format!("an event without ts_ms: {e}"))?;
            let t = times.entry(id.to_owned()).or_default();
            match kind {
                "SignalReceived" => t.received = Some(ts),
                "AckReceived" => {
                    t.first_ack = Some(t.first_ack.map_or(ts, |x| x.min(ts)));
                    t.last_ack = Some(t.last_ack.map_or(ts, |x| x.max(ts)));
                }
                _ => t.completed = Some(ts),
            }
        }
    }
    let mut phases: [Vec<f64>; 5] = Default::default();
    for (id, t) in &times {
        let s = wanted[id.as_str()];
        let (Some(rx), Some(first), Some(last), Some(done)) = (t.received, t.first_ack, t.last_ack, t.completed) else {
            continue;
        };
        for (slot, v) in phases.iter_mut().zip([
            rx - s.published_wall_ms,
            first - rx,
            last - first,
            done - last,
            s.received_wall_ms - done,
        ]) {
            slot.push(v as f64);
        }
    }
    let [a, b, c, d, e] = phases;
    Ok(Breakdown {
        rounds: a.len(),
        inbound: median_of(a),
        to_first_ack: median_of(b),
        ack_spread: median_of(c),
        to_completed: median_of(d),
        outbound: median_of(e),
    })
}

async fn one_size(broker: &Mosquitto, n: usize, opts: &Options, nonce: &str) -> Result<SizeResult> {
    let prefix = format!("gridweaver/bench-{nonce}-n{n}");
    let vehicles = fleet(n);
    let ids: Vec<String> = vehicles.iter().map(|v| v.id.clone()).collect();
    let sim_cfg = SimConfig {
        host: HOST.into(),
        port: broker.port,
        prefix: prefix.clone(),
        client_id: format!("bench-sim-{nonce}-{n}"),
        prompt_ack_ms: (0, 0),
        soc_drift: false,
        ..SimConfig::default()
    };
    let sim = Simulator::start(sim_cfg, vehicles).context("cannot start the simulator")?;
    let cx = Ctx { broker, opts, prefix: &prefix, nonce, n };
    let outcome = with_sim(&cx, &sim, &ids).await;
    let _ = sim.clear_retained();
    let stats = sim.stop();
    let mut result = outcome?;
    result.sim_stats = stats;
    Ok(result)
}

async fn with_sim(cx: &Ctx<'_>, sim: &Simulator, ids: &[String]) -> Result<SizeResult> {
    let Ctx { broker, opts, prefix, nonce, n } = *cx;
    let deadline = Instant::now() + SIM_READY;
    while !sim.is_ready() {
        ensure!(Instant::now() < deadline, "the simulated fleet was not ready on the broker within {SIM_READY:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    eprintln!("N={n}: raw floor, {} + {} rounds", opts.warmup, opts.rounds);
    let (raw, order_bytes) = raw_floor(cx, ids).await.context("raw floor")?;

    let tmp = tempfile::Builder::new().prefix(&format!("gridweaver-e2e-n{n}-")).tempdir().context("temp dir")?;
    let mut result = SizeResult {
        n,
        order_bytes,
        raw,
        dispatch: Summary::default(),
        anomalies: Vec::new(),
        idle: None,
        after10: None,
        smaps: None,
        at_end: None,
        breakdown: Breakdown::default(),
        gateway_exit: String::new(),
        gateway_clean_exit: false,
        sim_stats: SimStats::default(),
        up_kw: 0.0,
        dir: None,
        problems: Vec::new(),
        log_bytes: None,
    };
    let mut gateway = Gateway::start(tmp.path(), broker, prefix, n, opts)?;
    let measured = async {
        let subs = [format!("{prefix}/capacity"), format!("{prefix}/dispatches/+"), format!("{prefix}/errors")];
        let mut client = BenchClient::connect(broker.port, &format!("bench-op-{nonce}-{n}"), 2 * n, &subs).await?;
        eprintln!("N={n}: waiting for the gateway's capacity to show {n} vehicles");
        let up_kw = wait_capacity(&mut client, &mut gateway, prefix, n).await?;
        result.up_kw = up_kw;
        result.idle = Some(read_memory(gateway.pid)?);
        // Let the fleet's discoveries reach the log, then mark where the dispatches begin.
        tokio::time::sleep(Duration::from_millis(500)).await;
        let idle_seq: i64 = rusqlite::Connection::open(&gateway.db)?.query_row(
            "SELECT COALESCE(MAX(seq), 0) FROM events",
            [],
            |r| r.get(0),
        )?;
        let idle_written = write_bytes(gateway.pid)?;
        eprintln!(
            "N={n}: dispatch, {} + {} rounds (up_kw {up_kw:.1}, signal {:.1} kW)",
            opts.warmup,
            opts.rounds,
            up_kw / 2.0
        );
        let samples = dispatches(cx, &mut client, &mut gateway, up_kw, &mut result).await?;
        // The last ACK batches are recorded within 50 ms.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let written = write_bytes(gateway.pid)?.saturating_sub(idle_written);
        result.at_end = Some(read_memory(gateway.pid)?);
        if result.after10.is_none() {
            result.after10 = result.at_end.map(|m| (opts.warmup + opts.rounds, m));
            result.smaps = smaps_summary(gateway.pid).ok();
        }
        client.close().await;
        anyhow::Ok((samples, idle_seq, written))
    }
    .await;
    let (samples, idle_seq, written) = match measured {
        Ok(s) => s,
        Err(e) => {
            let _ = gateway.terminate();
            drop(gateway);
            let kept = tmp.keep();
            return Err(e.context(format!("gateway config, log and event log kept in {}", kept.display())));
        }
    };
    let status = gateway.terminate()?;
    let dispatched = opts.warmup + opts.rounds;
    match growth_after(&gateway.db, idle_seq, tmp.path()) {
        Ok((rows, growth)) => {
            result.log_bytes = Some(LogBytes {
                dispatches: dispatched,
                rows,
                growth: growth as f64 / dispatched as f64,
                written: written as f64 / dispatched as f64,
            });
        }
        Err(e) => result.problems.push(format!("N={n}: cannot measure the log's growth: {e:#}")),
    }
    result.gateway_exit = status.to_string();
    result.gateway_clean_exit = status.success();
    if !status.success() {
        result.problems.push(format!("N={n}: the gateway exited with {status} after SIGTERM (expected 0)"));
    }
    match breakdown(&gateway, &samples) {
        Ok(b) => result.breakdown = b,
        Err(e) => result.problems.push(format!("N={n}: no breakdown from the event log: {e:#}")),
    }
    let log = strip_ansi(&std::fs::read_to_string(&gateway.log).unwrap_or_default());
    let noisy = |l: &&str| l.contains("WARN") || l.contains("ERROR");
    let count = log.lines().filter(noisy).count();
    if count > 0 {
        let first = log.lines().find(noisy).unwrap_or_default();
        result.problems.push(format!("N={n}: the gateway logged {count} WARN/ERROR lines, e.g. {first}"));
    }
    if opts.keep {
        result.dir = Some(tmp.keep());
    }
    Ok(result)
}

// ---------------------------------------------------------------------------------------------
// Report

fn ms(v: f64) -> String {
    if v >= 100.0 {
        format!("{v:.0} ms")
    } else {
        format!("{v:.2} ms")
    }
}

fn opt_ms(v: Option<f64>) -> String {
    v.map_or_else(|| "-".into(), |v| format!("{v:.1}"))
}

fn mb(kb: u64) -> String {
    format!("{:.1} MB", kb as f64 / 1024.0)
}

fn report(broker: &Mosquitto, opts: &Options, results: &[SizeResult], load: (&str, &str)) -> String {
    let mut out = String::new();
    let w = &mut out;
    let _ = writeln!(
        w,
        "\nGridWeaver Edge end-to-end benchmark ({} measured rounds after {} warm-ups)",
        opts.rounds, opts.warmup
    );
    let _ = writeln!(
        w,
        "broker: {} on {HOST}:{}, config: {}",
        broker.version,
        broker.port,
        broker.conf.trim().replace('\n', "; ")
    );
    let _ = writeln!(
        w,
        "bench client: rumqttc 0.25 AsyncClient, TCP_NODELAY on, clean session, inflight = request channel = max(2N, 100), QoS 1"
    );
    let _ = writeln!(
        w,
        "fleet: gridweaver_actors::sim, one connection, all prompt, prompt_ack_ms (0, 0), all plugged in, SoC 0.3..0.9"
    );
    let _ = writeln!(
        w,
        "gateway: release `gridweaver run`, site bench, strategy smart, ack_timeout_seconds {ACK_TIMEOUT_S}, \
         store.synchronous {}, mqtt.inflight max(2N + 100, 2000), log level {}",
        opts.synchronous, opts.gateway_log
    );
    let _ = writeln!(
        w,
        "machine: {} CPUs, load average (1/5/15 min) at start {}, at end {} (other work on the machine skews the results)",
        std::thread::available_parallelism().map_or(0, usize::from),
        load.0,
        load.1
    );
    let _ = writeln!(
        w,
        "raw: first order published -> last ACK received; dispatch: signal published -> outcome received\n"
    );
    let _ = writeln!(
        w,
        "| N | order | raw median | raw p90 | dispatch median | dispatch p90 | dispatch min..max | dispatch/raw | all accepted |"
    );
    let _ = writeln!(w, "|---:|---:|---:|---:|---:|---:|---:|---:|:---|");
    for r in results {
        let _ = writeln!(
            w,
            "| {} | {} B | {} | {} | {} | {} | {}..{} | {:.1}x | {} |",
            r.n,
            r.order_bytes,
            ms(r.raw.median_ms),
            ms(r.raw.p90_ms),
            ms(r.dispatch.median_ms),
            ms(r.dispatch.p90_ms),
            ms(r.dispatch.min_ms),
            ms(r.dispatch.max_ms),
            r.dispatch.median_ms / r.raw.median_ms,
            if r.anomalies.is_empty() { "yes".to_owned() } else { format!("NO ({} rounds)", r.anomalies.len()) },
        );
    }
    let _ = writeln!(w, "\nEvent log per dispatch (target <= 128 KB at 1,000 vehicles):\n");
    let _ = writeln!(
        w,
        "| N | dispatches | rows per dispatch | database growth per dispatch | written (/proc io) per dispatch |"
    );
    let _ = writeln!(w, "|---:|---:|---:|---:|---:|");
    for r in results {
        if let Some(b) = r.log_bytes {
            let _ = writeln!(
                w,
                "| {} | {} | {:.1} | {:.1} KB | {:.1} KB |",
                r.n,
                b.dispatches,
                b.rows as f64 / b.dispatches as f64,
                b.growth / 1024.0,
                b.written / 1024.0
            );
        }
    }
    let _ = writeln!(w, "\nGateway memory (/proc/<pid>/status):\n");
    let _ = writeln!(w, "| N | idle VmRSS | after K dispatches: VmRSS | VmHWM | at end: VmRSS | VmHWM | target |");
    let _ = writeln!(w, "|---:|---:|---:|---:|---:|---:|:---|");
    for r in results {
        let (k, m) = r.after10.unwrap_or_default();
        let end = r.at_end.unwrap_or_default();
        let target = if r.n == 1000 {
            if m.rss_kb <= RSS_TARGET_KB {
                "<= 16 MB: met".to_owned()
            } else {
                format!("<= 16 MB: MISSED by {}", mb(m.rss_kb - RSS_TARGET_KB))
            }
        } else {
            "-".to_owned()
        };
        let _ = writeln!(
            w,
            "| {} | {} | K={k}: {} | {} | {} | {} | {target} |",
            r.n,
            mb(r.idle.unwrap_or_default().rss_kb),
            mb(m.rss_kb),
            mb(m.hwm_kb),
            mb(end.rss_kb),
            mb(end.hwm_kb),
        );
    }
    for r in results {
        if let (Some((k, _)), Some(smaps)) = (r.after10, &r.smaps) {
            let _ = writeln!(w, "N={} after {k} dispatches, VmRSS by mapping: {smaps}", r.n);
        }
    }
    let _ = writeln!(w, "\nWhere the dispatch time goes (medians, ms; event-log timestamps have 1 ms resolution):\n");
    let _ = writeln!(w, "| N | publish -> SignalReceived | -> first AckReceived | first -> last Ack | last Ack -> DispatchCompleted | -> outcome at bench | rounds |");
    let _ = writeln!(w, "|---:|---:|---:|---:|---:|---:|---:|");
    for r in results {
        let b = &r.breakdown;
        let _ = writeln!(
            w,
            "| {} | {} | {} | {} | {} | {} | {} |",
            r.n,
            opt_ms(b.inbound),
            opt_ms(b.to_first_ack),
            opt_ms(b.ack_spread),
            opt_ms(b.to_completed),
            opt_ms(b.outbound),
            b.rounds
        );
    }
    let _ = writeln!(w);
    for r in results {
        let s = &r.sim_stats;
        let _ = writeln!(
            w,
            "N={}: capacity up_kw {:.1} (signal {:.1} kW); gateway exit after SIGTERM: {}; simulator: {} orders, {} accepted, \
             {} rejected, {} malformed, {} ignored",
            r.n,
            r.up_kw,
            r.up_kw / 2.0,
            r.gateway_exit,
            s.orders_received,
            s.acks_accepted,
            s.acks_rejected,
            s.malformed,
            s.ignored
        );
        if let Some(dir) = &r.dir {
            let _ = writeln!(w, "N={}: kept {}", r.n, dir.display());
        }
        for a in &r.anomalies {
            let _ = writeln!(w, "N={}: NOT every vehicle accepted: {a}", r.n);
        }
        for p in &r.problems {
            let _ = writeln!(w, "PROBLEM: {p}");
        }
    }
    out
}

fn run() -> Result<bool> {
    let opts = parse_options()?;
    let nonce = format!("{:x}", wall_ms() % 0x100_0000);
    // One thread: the bench client's event loop and the measuring code take turns, leaving the
    // two cores to the broker, the simulator and the gateway.
    let runtime =
        tokio::runtime::Builder::new_current_thread().enable_all().build().context("cannot build the tokio runtime")?;
    let load_start = load_average();
    let mut broker = Mosquitto::start()?;
    eprintln!("mosquitto on {HOST}:{}; fleet sizes {:?}", broker.port, opts.vehicles);
    let mut results = Vec::new();
    for &n in &opts.vehicles {
        let r = runtime.block_on(one_size(&broker, n, &opts, &nonce)).with_context(|| format!("N = {n}"))?;
        results.push(r);
    }
    let text = report(&broker, &opts, &results, (&load_start, &load_average()));
    broker.stop();
    let mut stdout = std::io::stdout().lock();
    stdout.write_all(text.as_bytes()).context("cannot write the report")?;
    stdout.flush().context("cannot write the report")?;
    Ok(results.iter().all(|r| r.gateway_clean_exit))
}
