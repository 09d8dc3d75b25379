//! The event log under faults: the gateway killed at random points, a full disk, a log
//! made read-only while the gateway runs. What was published must be on record, the log
//! must stay whole, and the gateway must recover on its own.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::{await_fleet, fleet_of, gridweaver, operator, vehicle, Gateway, Mosquitto, Operator};
use gridweaver_actors::sim::Behaviour;
use serde_json::Value;

fn signal(id: &str, kw: f64, duration_s: u64) -> String {
    format!(r#"{{"id":"{id}","type":"afrr","direction":"up","power_kw":{kw},"duration_s":{duration_s}}}"#)
}

/// A tiny deterministic generator (the kill points are random, but the same every run).
struct Lcg(u64);

impl Lcg {
    fn below(&mut self, n: u64) -> u64 {
        self.0 = self.0.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
        (self.0 >> 33) % n
    }
}

/// Every order the vehicles were sent (not the cancels), by id.
fn orders_seen(op: &Operator) -> BTreeMap<String, Value> {
    op.seen
        .iter()
        .filter(|(t, _)| t.ends_with("/order"))
        .filter_map(|(_, p)| serde_json::from_slice::<Value>(p).ok())
        .filter(|v| v.get("cancel").is_none())
        .filter_map(|v| Some((v["order_id"].as_str()?.to_owned(), v)))
        .collect()
}

/// What must hold of a log after any fault: SQLite's integrity check, no gap in `seq`, an
/// unbroken hash chain, every order on the wire recorded after the decision that made it.
fn check_log(g: &Gateway, on_wire: &BTreeMap<String, Value>) {
    let integrity = g.query("PRAGMA integrity_check");
    assert_eq!(integrity[0]["integrity_check"], "ok", "{integrity:?}");
    let span = &g.query("SELECT COUNT(*) AS n, MIN(seq) AS lo, MAX(seq) AS hi FROM events")[0];
    assert_eq!(span["n"].as_i64(), Some(span["hi"].as_i64().unwrap() - span["lo"].as_i64().unwrap() + 1), "{span}");
    assert_eq!(span["lo"], 1);
    let out = gridweaver().args(["audit", "--json", "--db"]).arg(&g.db).output().expect("audit");
    let report: Value = serde_json::from_slice(&out.stdout).expect("an audit report");
    assert_eq!(report["chain"]["ok"], true, "{report}");

    let recorded: BTreeMap<String, (i64, i64)> = g
        .query(
            "SELECT o.order_id, o.sent_seq,
               (SELECT MAX(d.seq) FROM events d WHERE d.correlation_id = o.dispatch_id AND d.seq < o.sent_seq
                  AND d.kind IN ('DispatchPlanCreated', 'FallbackApplied')) AS decision_seq
             FROM orders o",
        )
        .into_iter()
        .map(|r| {
            let id = r["order_id"].as_str().unwrap().to_owned();
            (id, (r["sent_seq"].as_i64().unwrap(), r["decision_seq"].as_i64().unwrap_or(-1)))
        })
        .collect();
    for (id, order) in on_wire {
        let (sent, decision) =
            recorded.get(id).unwrap_or_else(|| panic!("{order} was published but is not in the log"));
        assert!(
            *decision > 0 && decision < sent,
            "{id}: its decision ({decision}) must precede its OrderSent ({sent})"
        );
    }
}

/// SIGKILL at random points while dispatches run, 20 times on one log; then a clean stop.
#[test]
fn twenty_kills_leave_a_whole_log_and_nothing_published_unrecorded() {
    let broker = Mosquitto::start();
    let mut g = Gateway::start(&broker, "kills", "ack_timeout_seconds: 1, fallback: balanced");
    let mut op = operator(&broker, &g.prefix);
    let mut fleet: Vec<_> = (0..8).map(|i| vehicle(&format!("p{i}"), 0.8, 11.0, Behaviour::Prompt)).collect();
    fleet.push(vehicle("mute", 0.8, 11.0, Behaviour::Silent));
    fleet.push(vehicle("no", 0.8, 11.0, Behaviour::Rejecting));
    let sim = fleet_of(&broker, &g.prefix, fleet);
    await_fleet(&mut op, 10);
    let topic = format!("{}/signals", g.prefix);
    let mut rng = Lcg(20261201);
    let mut sent = BTreeSet::new();
    for round in 0..20 {
        for k in 0..1 + rng.below(3) {
            let id = format!("r{round}-{k}");
            op.publish(&topic, signal(&id, 5.0 + rng.below(60) as f64, 2 + rng.below(20)));
            sent.insert(id);
            std::thread::sleep(Duration::from_millis(rng.below(150)));
        }
        // Somewhere in planning, publishing, waiting for ACKs, the fallback or settling.
        std::thread::sleep(Duration::from_millis(rng.below(1_400)));
        op.drain(Duration::from_millis(0));
        g.kill();
        g.restart();
        std::thread::sleep(Duration::from_millis(200 + rng.below(600)));
    }
    // The live tail's pipeline counts what it delivered, on `status` (every 10 s).
    let status = op
        .wait_for(Duration::from_secs(15), |t, p| {
            let v: Value = serde_json::from_slice(p).ok()?;
            (t.ends_with("/status") && v["events"]["delivered"].as_u64() > Some(0)).then_some(v)
        })
        .expect("status with the pipeline's counters");
    assert_eq!(status["state"], "online");
    assert_eq!(status["events"]["refused"], 0, "{status}");
    op.drain(Duration::from_millis(500));
    assert!(g.terminate().success(), "{}", g.log());
    let on_wire = orders_seen(&op);
    assert!(on_wire.len() >= 20, "dispatches ran between the kills: {} orders", on_wire.len());
    check_log(&g, &on_wire);

    // Every dispatch ended: completed, or found unfinished at the next start.
    let open = g.query(
        "SELECT p.correlation_id FROM events p WHERE p.kind = 'DispatchPlanCreated' AND NOT EXISTS (
           SELECT 1 FROM events c WHERE c.correlation_id = p.correlation_id
             AND c.kind IN ('DispatchCompleted', 'DispatchInterrupted'))",
    );
    assert!(open.is_empty(), "dispatches without an end: {open:?}");
    // No signal was dispatched twice (QoS 1 redelivers what a killed gateway had not acked).
    let twice = g.query(
        "SELECT json_extract(payload, '$.id') AS id, COUNT(*) AS n FROM events WHERE kind = 'SignalReceived'
         GROUP BY 1 HAVING n > 1",
    );
    assert!(twice.is_empty(), "dispatched twice: {twice:?}");
    let dispatched: BTreeSet<String> = g
        .query("SELECT json_extract(payload, '$.id') AS id FROM events WHERE kind = 'SignalReceived'")
        .into_iter()
        .filter_map(|r| r["id"].as_str().map(str::to_owned))
        .collect();
    assert!(dispatched.is_subset(&sent));
    assert!(dispatched.len() * 2 >= sent.len(), "most signals were dispatched: {} of {}", dispatched.len(), sent.len());
    let cut = g.query("SELECT COUNT(*) AS n FROM events WHERE kind = 'DispatchInterrupted'");
    assert!(cut[0]["n"].as_i64() >= Some(3), "kills landed in dispatches: {cut:?}");
    let cancelled = g.query("SELECT COUNT(*) AS n FROM cancellations WHERE reason LIKE 'unanswered when%'");
    eprintln!("{} dispatches cut off, {} orders cancelled at a restart", cut[0]["n"], cancelled[0]["n"]);
    let starts = g.query("SELECT COUNT(*) AS n FROM events WHERE kind = 'ConfigRecorded'");
    assert_eq!(starts[0]["n"], 21, "one start each");
    sim.stop();
}

/// A small ext4 file system of our own (a loop device; needs root, as CI has).
struct SmallDisk {
    mount: PathBuf,
    _dir: tempfile::TempDir,
}

impl SmallDisk {
    fn new(mb: u32) -> SmallDisk {
        let dir = tempfile::tempdir().expect("tmp");
        let image = dir.path().join("disk.img");
        let mount = dir.path().join("mnt");
        std::fs::create_dir(&mount).expect("mkdir");
        run("truncate", &["-s", &format!("{mb}M"), image.to_str().unwrap()]);
        run("mkfs.ext4", &["-q", "-m", "0", image.to_str().unwrap()]);
        run("mount", &["-o", "loop", image.to_str().unwrap(), mount.to_str().unwrap()]);
        SmallDisk { mount, _dir: dir }
    }

    /// Writes a file until the disk is full.
    fn fill(&self) -> PathBuf {
        use std::io::Write;
        let path = self.mount.join("filler");
        let mut f = std::fs::File::create(&path).expect("filler");
        let block = vec![0u8; 64 * 1024];
        while f.write_all(&block).and_then(|()| f.sync_all()).is_ok() {}
        let small = vec![0u8; 512];
        while f.write_all(&small).and_then(|()| f.sync_all()).is_ok() {}
        path
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.mount).status();
    }
}

fn run(cmd: &str, args: &[&str]) {
    let out = Command::new(cmd).args(args).output().unwrap_or_else(|e| panic!("{cmd}: {e}"));
    assert!(
        out.status.success(),
        "{cmd} {args:?} failed (this test needs root and loop devices): {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn chattr(flag: &str, db: &Path) {
    for suffix in ["", "-wal"] {
        let path = format!("{}{suffix}", db.display());
        run("chattr", &[flag, &path]);
    }
}

/// Sends signals until one is refused because the log cannot be written; returns the ids
/// sent and the error.
fn until_refused(op: &mut Operator, topic: &str, tag: &str) -> (Vec<String>, Value) {
    op.drain(Duration::from_millis(0));
    op.seen.retain(|(t, _)| !t.ends_with("/errors"));
    let mut ids = Vec::new();
    for i in 0..40 {
        let id = format!("{tag}-{i}");
        op.publish(topic, signal(&id, 5.0, 30));
        ids.push(id.clone());
        // The signal whose step failed is named; later ones are refused while the log fails.
        let refused = op.wait_for(Duration::from_secs(3), |t, p| {
            let v: Value = serde_json::from_slice(p).ok()?;
            let text = v["error"].as_str()?;
            let about = text.contains(&format!("`{id}`")) || text.contains("signals are refused");
            (t.ends_with("/errors") && about && text.contains("event log cannot be written")).then_some(v)
        });
        if let Some(v) = refused {
            return (ids, v);
        }
    }
    panic!("the gateway never refused a signal for want of a log");
}

/// Waits until the gateway dispatches `id` again (it probes the log once a second).
fn dispatched_after_recovery(op: &mut Operator, topic: &str, id: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut n = 0;
    while Instant::now() < deadline {
        n += 1;
        let attempt = format!("{id}-{n}");
        op.publish(topic, signal(&attempt, 5.0, 30));
        if let Some(out) = op.wait_json(Duration::from_secs(2), "", "signal_id", attempt.as_str()) {
            return out;
        }
    }
    panic!("the gateway did not dispatch again once the log could be written");
}

#[test]
fn a_full_disk_and_a_read_only_log_refuse_new_dispatches_and_the_gateway_recovers() {
    let disk = SmallDisk::new(8);
    let broker = Mosquitto::start();
    let db = disk.mount.join("events.db");
    let mut g = Gateway::start_at(&broker, "disk", "ack_timeout_seconds: 1", &db);
    let mut op = operator(&broker, &g.prefix);
    let fleet: Vec<_> = (0..6).map(|i| vehicle(&format!("v{i}"), 0.8, 11.0, Behaviour::Prompt)).collect();
    let sim = fleet_of(&broker, &g.prefix, fleet);
    await_fleet(&mut op, 6);
    let topic = format!("{}/signals", g.prefix);
    op.publish(&topic, signal("first", 20.0, 30));
    op.wait_json(Duration::from_secs(10), "", "signal_id", "first").expect("a dispatch while there is room");

    // The disk fills up.
    let filler = disk.fill();
    until_refused(&mut op, &topic, "full");
    std::fs::remove_file(&filler).expect("free the disk");
    let after = dispatched_after_recovery(&mut op, &topic, "room-again");
    assert!(after["acknowledged_kw"].as_f64().unwrap() > 0.0, "{after}");

    // Someone makes the log read-only (immutable) under the running gateway.
    chattr("+i", &db);
    let (_, refused) = until_refused(&mut op, &topic, "ro");
    chattr("-i", &db);
    assert!(refused["error"].as_str().unwrap().contains("event log"), "{refused}");
    dispatched_after_recovery(&mut op, &topic, "writable-again");

    op.drain(Duration::from_millis(500));
    assert!(g.terminate().success(), "{}", g.log());
    check_log(&g, &orders_seen(&op));
    let recovered = g.query("SELECT COUNT(*) AS n FROM events WHERE kind = 'LogRecovered'");
    assert_eq!(
        recovered[0]["n"],
        2,
        "each outage is on record once it ends: {:?}\n{}",
        g.query("SELECT seq, kind, payload FROM events WHERE kind IN ('LogRecovered', 'SignalRejected')"),
        g.log()
    );
    sim.stop();
}
