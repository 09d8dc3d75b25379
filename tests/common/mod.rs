//! Test harness: a real Mosquitto on a free port per test, the real `gridweaver` binary as
//! a process, a real SQLite file in a temp dir, and an MQTT client playing the operator.
#![allow(dead_code)]

use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use gridweaver_actors::sim::{Behaviour, SimConfig, SimVehicle, Simulator};
use rumqttc::{Client, Event, MqttOptions, Packet, QoS};
use serde_json::Value;

/// A port nobody listens on right now.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).expect("a free port")
}

fn mosquitto_bin() -> PathBuf {
    for dir in std::env::var("PATH").unwrap_or_default().split(':').chain(["/usr/sbin", "/sbin"]) {
        let p = Path::new(dir).join("mosquitto");
        if p.exists() {
            return p;
        }
    }
    panic!("mosquitto is not installed: run the tests through scripts/test.sh, which installs it");
}

/// A Mosquitto broker of this test's own.
pub struct Mosquitto {
    child: Option<Child>,
    pub port: u16,
    conf: PathBuf,
    _dir: tempfile::TempDir,
}

impl Mosquitto {
    pub fn start() -> Mosquitto {
        let dir = tempfile::tempdir().expect("temp dir");
        let port = free_port();
        let conf = dir.path().join("mosquitto.conf");
        std::fs::write(
            &conf,
            format!(
                "listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\nset_tcp_nodelay true\n\
                 max_inflight_messages 0\nmax_queued_messages 100000\nlog_dest stderr\n\
                 log_type error\nlog_type warning\nlog_type notice\n"
            ),
        )
        .expect("write mosquitto.conf");
        let mut m = Mosquitto { child: None, port, conf, _dir: dir };
        m.spawn();
        m
    }

    fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new().create(true).append(true).open(self.log_path()).expect("broker log");
        let child = Command::new(mosquitto_bin())
            .arg("-c")
            .arg(&self.conf)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start mosquitto");
        self.child = Some(child);
        wait_for_port(self.port, Duration::from_secs(10));
    }

    fn log_path(&self) -> PathBuf {
        self.conf.with_file_name("mosquitto.log")
    }

    /// What the broker logged so far (connections and disconnections: notices and up).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// Kills the broker (as a crash would).
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts it again on the same port.
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        self.kill();
    }
}

pub fn wait_for_port(port: u16, within: Duration) {
    let deadline = Instant::now() + within;
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "nothing listens on port {port}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The `gridweaver` binary built for this test run, or the command in `GRIDWEAVER_BIN`
/// (a bench run under a profiler, e.g. a script that runs `heaptrack` on the binary).
pub fn gridweaver() -> Command {
    Command::new(std::env::var_os("GRIDWEAVER_BIN").unwrap_or_else(|| env!("CARGO_BIN_EXE_gridweaver").into()))
}

/// A gateway process with its own config and event log.
pub struct Gateway {
    child: Option<Child>,
    pub dir: tempfile::TempDir,
    pub db: PathBuf,
    pub config: PathBuf,
    pub prefix: String,
}

impl Gateway {
    /// Starts `gridweaver run` against `broker` with `dispatch` appended to the config's
    /// dispatch section (YAML flow-map entries, e.g. `ack_timeout_seconds: 1`).
    pub fn start(broker: &Mosquitto, site: &str, dispatch: &str) -> Gateway {
        Gateway::start_with(broker, site, "", dispatch)
    }

    /// [`Gateway::start`] with the event log at `db`.
    pub fn start_at(broker: &Mosquitto, site: &str, dispatch: &str, db: &std::path::Path) -> Gateway {
        let dir = tempfile::tempdir().expect("temp dir");
        let config = dir.path().join("gateway.yaml");
        let mut g = Gateway { child: None, dir, db: db.to_owned(), config, prefix: format!("gridweaver/{site}") };
        g.configure(broker, site, "", dispatch);
        g.spawn();
        g
    }

    /// [`Gateway::start`] with `mqtt` appended to the config's mqtt section (flow-map
    /// entries, e.g. `client_id: gw, prefix: depot/a`).
    pub fn start_with(broker: &Mosquitto, site: &str, mqtt: &str, dispatch: &str) -> Gateway {
        let dir = tempfile::tempdir().expect("temp dir");
        let db = dir.path().join("events.db");
        let config = dir.path().join("gateway.yaml");
        let mut g = Gateway { child: None, dir, db, config, prefix: format!("gridweaver/{site}") };
        g.configure(broker, site, mqtt, dispatch);
        g.spawn();
        g
    }

    /// Rewrites the config (takes effect at the next [`Gateway::restart`]); a `prefix:` in
    /// `mqtt` becomes the gateway's prefix.
    pub fn configure(&mut self, broker: &Mosquitto, site: &str, mqtt: &str, dispatch: &str) {
        let sep = if mqtt.is_empty() { "" } else { ", " };
        std::fs::write(
            &self.config,
            format!(
                "site: {site}\nmqtt: {{ host: 127.0.0.1, port: {}, reconnect_max_s: 1{sep}{mqtt} }}\nstore: {{ path: {:?} }}\n\
                 dispatch: {{ {dispatch} }}\n",
                broker.port,
                self.db.display().to_string()
            ),
        )
        .expect("write config");
        self.prefix = mqtt
            .split(',')
            .find_map(|kv| kv.trim().strip_prefix("prefix:").map(|p| p.trim().to_owned()))
            .unwrap_or_else(|| format!("gridweaver/{site}"));
    }

    fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("gateway.log"))
            .expect("log file");
        let child = gridweaver()
            .args(["--log", "info", "run", "--config"])
            .arg(&self.config)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start gridweaver");
        self.child = Some(child);
    }

    /// Kills the process at once (SIGKILL), as a power cut would.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts the process again (after [`Gateway::terminate`]), same config and log.
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "still running");
        self.spawn();
    }

    /// The process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// The gateway's stderr so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("gateway.log")).unwrap_or_default()
    }

    /// Sends SIGTERM and waits for the exit (at most 10 s).
    pub fn terminate(&mut self) -> ExitStatus {
        let child = self.child.as_mut().expect("running");
        let _ = Command::new("kill").args(["-TERM", &child.id().to_string()]).status();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(status) = child.try_wait().expect("wait") {
                self.child = None;
                return status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("gridweaver did not stop within 10 s of SIGTERM:\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Rows of the event log, as JSON (via the `events` command).
    pub fn events(&self, kind: Option<&str>) -> Vec<Value> {
        let mut cmd = gridweaver();
        cmd.args(["events", "--json", "--db"]).arg(&self.db);
        if let Some(k) = kind {
            cmd.args(["--kind", k]);
        }
        let out = cmd.output().expect("run gridweaver events");
        assert!(out.status.success(), "events failed: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).lines().map(|l| serde_json::from_str(l).expect("a JSON row")).collect()
    }

    /// The rows of `sql` on the log, read-only, as a `sqlite3` user would run it: each row
    /// a JSON object by column name.
    pub fn query(&self, sql: &str) -> Vec<Value> {
        let conn = rusqlite::Connection::open_with_flags(&self.db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
            .expect("open the log");
        let mut stmt = conn.prepare(sql).unwrap_or_else(|e| panic!("{sql}: {e}"));
        let names: Vec<String> = stmt.column_names().into_iter().map(str::to_owned).collect();
        let mut rows = stmt.query([]).expect("query");
        let mut out = Vec::new();
        while let Some(r) = rows.next().expect("a row") {
            let mut obj = serde_json::Map::new();
            for (i, name) in names.iter().enumerate() {
                let v = match r.get_ref(i).expect("a column") {
                    rusqlite::types::ValueRef::Null => Value::Null,
                    rusqlite::types::ValueRef::Integer(n) => Value::from(n),
                    rusqlite::types::ValueRef::Real(x) => Value::from(x),
                    rusqlite::types::ValueRef::Text(t) => Value::from(String::from_utf8_lossy(t).into_owned()),
                    rusqlite::types::ValueRef::Blob(b) => Value::from(b.len()),
                };
                obj.insert(name.clone(), v);
            }
            out.push(Value::Object(obj));
        }
        out
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

/// An MQTT client for the test: publishes, and collects what arrives on its subscriptions.
pub struct Operator {
    client: Client,
    rx: mpsc::Receiver<(String, Vec<u8>)>,
    /// Messages received but not yet matched by a `wait_for`.
    pub seen: Vec<(String, Vec<u8>)>,
}

impl Operator {
    pub fn connect(broker: &Mosquitto, id: &str, subscriptions: &[String]) -> Operator {
        let mut opts = MqttOptions::new(id, "127.0.0.1", broker.port);
        opts.set_keep_alive(Duration::from_secs(5)).set_max_packet_size(1 << 20, 1 << 20);
        let (client, mut connection) = Client::new(opts, 1000);
        for s in subscriptions {
            client.subscribe(s.clone(), QoS::AtLeastOnce).expect("subscribe");
        }
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for event in connection.iter() {
                match event {
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        if tx.send((p.topic.clone(), p.payload.to_vec())).is_err() {
                            break;
                        }
                    }
                    Ok(_) => {}
                    Err(_) => std::thread::sleep(Duration::from_millis(50)),
                }
            }
        });
        Operator { client, rx, seen: Vec::new() }
    }

    pub fn publish(&self, topic: &str, payload: impl Into<Vec<u8>>) {
        self.client.publish(topic, QoS::AtLeastOnce, false, payload.into()).expect("publish");
    }

    pub fn publish_retained(&self, topic: &str, payload: impl Into<Vec<u8>>) {
        self.client.publish(topic, QoS::AtLeastOnce, true, payload.into()).expect("publish");
    }

    /// The first message (seen or new) for which `pick` returns something.
    pub fn wait_for<T>(&mut self, within: Duration, mut pick: impl FnMut(&str, &[u8]) -> Option<T>) -> Option<T> {
        if let Some(i) = self.seen.iter().position(|(t, p)| pick(t, p).is_some()) {
            let (t, p) = self.seen.remove(i);
            return pick(&t, &p);
        }
        let deadline = Instant::now() + within;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let (t, p) = self.rx.recv_timeout(left).ok()?;
            if let Some(x) = pick(&t, &p) {
                return Some(x);
            }
            self.seen.push((t, p));
        }
    }

    /// Moves every message that arrives within `within` (and all already queued) to `seen`.
    pub fn drain(&mut self, within: Duration) {
        let deadline = Instant::now() + within;
        while let Ok(m) = self.rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            self.seen.push(m);
        }
        while let Ok(m) = self.rx.try_recv() {
            self.seen.push(m);
        }
    }

    /// The next `<p>/errors` report whose `error` contains `text`.
    pub fn wait_error(&mut self, within: Duration, text: &str) -> Option<Value> {
        self.wait_for(within, |t, p| {
            let v: Value = serde_json::from_slice(p).ok()?;
            (t.ends_with("/errors") && v["error"].as_str()?.contains(text)).then_some(v)
        })
    }

    /// The next JSON message on a topic ending with `suffix` whose `field` equals `value`.
    pub fn wait_json(&mut self, within: Duration, suffix: &str, field: &str, value: impl Into<Value>) -> Option<Value> {
        let want = value.into();
        self.wait_for(within, |t, p| {
            if !t.ends_with(suffix) {
                return None;
            }
            let v: Value = serde_json::from_slice(p).ok()?;
            (v[field] == want).then_some(v)
        })
    }
}

/// A vehicle state payload (contract fields).
pub fn state(soc: f64, kw: f64) -> String {
    format!(r#"{{"soc":{soc},"capacity_kwh":60,"max_charge_kw":{kw},"max_discharge_kw":{kw},"plugged_in":true}}"#)
}

pub fn vehicle(id: &str, soc: f64, kw: f64, behaviour: Behaviour) -> SimVehicle {
    SimVehicle {
        id: id.into(),
        soc,
        capacity_kwh: 80.0,
        max_charge_kw: kw,
        max_discharge_kw: kw,
        availability: 1.0,
        degradation: 0.0,
        priority: 0.5,
        behaviour,
        plugged_in: true,
        extra_state: serde_json::Map::new(),
    }
}

pub fn fleet_of(broker: &Mosquitto, prefix: &str, fleet: Vec<SimVehicle>) -> Simulator {
    Simulator::start(
        SimConfig {
            host: "127.0.0.1".into(),
            port: broker.port,
            prefix: prefix.into(),
            client_id: format!("fleet-{}", free_port()),
            prompt_ack_ms: (0, 20),
            late_ack_ms: 4_000,
            seed: 1,
            soc_drift: false,
        },
        fleet,
    )
    .expect("simulator")
}

pub fn operator(broker: &Mosquitto, prefix: &str) -> Operator {
    let subs = ["dispatches/+", "errors", "capacity", "status", "vehicles/+/order"].map(|t| format!("{prefix}/{t}"));
    Operator::connect(broker, &format!("op-{}", free_port()), &subs)
}

/// Waits until the retained capacity shows `n` eligible vehicles.
pub fn await_fleet(op: &mut Operator, n: u64) {
    op.wait_for(Duration::from_secs(15), |t, p| {
        let v: Value = serde_json::from_slice(p).ok()?;
        (t.ends_with("/capacity") && v["vehicles"].as_u64() == Some(n)).then_some(())
    })
    .unwrap_or_else(|| panic!("the gateway never saw {n} vehicles"));
}
