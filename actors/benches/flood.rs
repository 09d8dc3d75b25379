//! Flood benchmark: the real gateway under a flood of signals and state updates at ten times
//! the rate it can dispatch, against a real Mosquitto.
//!
//! ```sh
//! cargo bench -p gridweaver-actors --bench flood                  # 100 vehicles, 10 s flood
//! cargo bench -p gridweaver-actors --bench flood -- --vehicles 100 --seconds 10 --factor 10
//! cargo bench -p gridweaver-actors --bench flood -- --vehicles 1000 --power-kw 5000  # 1,000 orders a dispatch
//! ```
//!
//! 1. Capacity: signals are sent one at a time, each after the previous outcome, for 3 s:
//!    that rate R is what the gateway can dispatch.
//! 2. Flood: for `--seconds` s, signals (unique ids) and as many vehicle state updates are
//!    published at `--factor` x R per second each, and at least `--min-rate` (4,000) per
//!    second each; the gateway's VmRSS is sampled every 100 ms from /proc.
//! 3. After the flood: one fresh signal; the time from its publish to its outcome.
//! 4. `gridweaver audit` of the flooded log, timed (`--keep-db FILE` keeps a copy of it).
//!
//! Reported: R, the rates published, peak and final VmRSS, the fresh signal's latency, how
//! the flood was answered (dispatched, refused as busy), and the audit's time and verdict.
//! Loopback only; every wait is bounded. The issue's targets: RSS under 64 MB, the fresh signal within 2 s.

#[path = "../../tests/common/mod.rs"]
mod common;

use std::time::{Duration, Instant};

use common::{await_fleet, fleet_of, vehicle, Gateway, Mosquitto, Operator};
use gridweaver_actors::sim::Behaviour;
use serde_json::{json, Value};

fn arg(name: &str, default: u64) -> u64 {
    let args: Vec<String> = std::env::args().collect();
    args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// The number after `key` in `/proc/<pid>/<file>` (0 when it cannot be read).
fn proc_number(pid: u32, file: &str, key: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/{file}"))
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with(key)).map(str::to_owned))
        .and_then(|l| l.split_whitespace().nth(1).and_then(|n| n.parse().ok()))
        .unwrap_or(0)
}

/// Bytes the process has caused to be written to storage (`/proc/<pid>/io` `write_bytes`).
fn write_bytes(pid: u32) -> u64 {
    proc_number(pid, "io", "write_bytes:")
}

/// The log's size as SQLite counts it (pages in use, the WAL's committed pages included).
fn log_bytes(g: &Gateway) -> u64 {
    let pages = g.query("PRAGMA page_count")[0]["page_count"].as_u64().unwrap_or(0);
    let size = g.query("PRAGMA page_size")[0]["page_size"].as_u64().unwrap_or(0);
    pages * size
}

fn rss_kb(pid: u32) -> u64 {
    proc_number(pid, "status", "VmRSS:")
}

/// A 1-second up signal of `kw` (`--power-kw`, default 1 kW: one vehicle; more spreads each
/// dispatch over many vehicles, one order each).
fn signal(id: &str, kw: f64) -> String {
    json!({"id": id, "type": "afrr", "direction": "up", "power_kw": kw, "duration_s": 1}).to_string()
}

fn main() {
    let (n, seconds, factor) = (arg("--vehicles", 100) as usize, arg("--seconds", 10), arg("--factor", 10));
    let kw = arg("--power-kw", 1) as f64;
    let broker = Mosquitto::start();
    let mut g = Gateway::start(&broker, "flood", "ack_timeout_seconds: 2");
    // Only what the bench reads: a subscription to every order would flood the bench itself.
    let subs = ["dispatches/+", "capacity"].map(|t| format!("{}/{t}", g.prefix));
    let mut op = Operator::connect(&broker, "flood-op", &subs);
    let sim = fleet_of(
        &broker,
        &g.prefix,
        (0..n).map(|i| vehicle(&format!("ev{i:04}"), 0.8, 11.0, Behaviour::Prompt)).collect(),
    );
    await_fleet(&mut op, n as u64);
    let pid = g.pid().expect("the gateway runs");
    let topic = format!("{}/signals", g.prefix);
    let idle_kb = rss_kb(pid);

    // 1. What the gateway can dispatch, one signal at a time.
    let started = Instant::now();
    let mut done = 0u64;
    while started.elapsed() < Duration::from_secs(3) {
        let id = format!("cap-{done}");
        op.publish(&topic, signal(&id, kw));
        op.wait_json(Duration::from_secs(10), "", "signal_id", id.as_str()).expect("an outcome");
        done += 1;
    }
    let rate = done as f64 / started.elapsed().as_secs_f64();
    op.seen.clear();

    // 2. The flood, paced per 10 ms slot.
    // Ten times what it dispatched one at a time, and at least the 4,000/s of the flood that
    // once took the gateway to 8 GiB.
    let per_s = ((rate * factor as f64).ceil() as u64).max(arg("--min-rate", 4_000));
    let (written_before, log_before) = (write_bytes(pid), log_bytes(&g));
    let flood_start = Instant::now();
    let (mut sent, mut peak_kb, mut next_sample) = (0u64, 0u64, Instant::now());
    while flood_start.elapsed() < Duration::from_secs(seconds) {
        let due = (flood_start.elapsed().as_secs_f64() * per_s as f64) as u64;
        while sent < due {
            op.publish(&topic, signal(&format!("flood-{sent}"), kw));
            let v = sent as usize % n;
            op.publish(
                &format!("{}/vehicles/ev{v:04}/state", g.prefix),
                common::state(0.5 + (sent % 40) as f64 / 100.0, 11.0),
            );
            sent += 1;
        }
        if Instant::now() >= next_sample {
            peak_kb = peak_kb.max(rss_kb(pid));
            next_sample += Duration::from_millis(100);
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let flood_s = flood_start.elapsed().as_secs_f64();

    // 3. A fresh signal after the flood, sent again (same id) while the gateway answers it is
    //    busy, as an operator would; timed from its first publish. A new client, so that the
    //    flood's answers queued for the first one are not in the way.
    let subs = ["dispatches/+", "errors", "vehicles/+/order"].map(|t| format!("{}/{t}", g.prefix));
    let mut watch = Operator::connect(&broker, "flood-watch", &subs);
    std::thread::sleep(Duration::from_millis(200));
    let fresh = Instant::now();
    watch.publish(&topic, signal("fresh", kw));
    let mut after_kb = peak_kb;
    let (mut retries, mut last_try) = (0, Instant::now());
    // When each dispatch's first order reached this client (the fresh one's is found by the
    // dispatch id its outcome names).
    let mut first_order: std::collections::BTreeMap<String, Duration> = std::collections::BTreeMap::new();
    let mut fresh_dispatch = String::new();
    let fresh_latency = loop {
        after_kb = after_kb.max(rss_kb(pid));
        let answer = watch.wait_for(Duration::from_millis(100), |t, p| {
            let v: Value = serde_json::from_slice(p).ok()?;
            if t.ends_with("/order") {
                if let Some(d) = v["dispatch_id"].as_str() {
                    first_order.entry(d.to_owned()).or_insert_with(|| fresh.elapsed());
                }
                return None;
            }
            if t.contains("/dispatches/") && v["signal_id"] == "fresh" {
                fresh_dispatch = v["dispatch_id"].as_str().unwrap_or_default().to_owned();
                return Some(true);
            }
            (t.ends_with("/errors") && v["error"].as_str()?.contains("signal `fresh` was not dispatched"))
                .then_some(false)
        });
        watch.seen.clear();
        match answer {
            Some(true) => break fresh.elapsed(),
            // A busy answer: try again, at most every 200 ms.
            Some(false) if last_try.elapsed() > Duration::from_millis(200) => {
                retries += 1;
                last_try = Instant::now();
                watch.publish(&topic, signal("fresh", kw));
            }
            _ => {}
        }
        if fresh.elapsed() > Duration::from_secs(120) {
            panic!("no outcome for the fresh signal within 120 s:\n{}", g.log());
        }
    };
    peak_kb = peak_kb.max(after_kb);
    let orders_after = first_order.get(&fresh_dispatch).copied();
    // Drained: the log has not grown for 1.5 s (refusals batched per second are written by then).
    let (mut rows_seen, mut stable_since) = (u64::MAX, Instant::now());
    while stable_since.elapsed() < Duration::from_millis(1_500) {
        let rows = g.query("SELECT max(seq) AS n FROM events")[0]["n"].as_u64().unwrap_or(0);
        if rows != rows_seen {
            (rows_seen, stable_since) = (rows, Instant::now());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let drained_after = flood_start.elapsed();
    let (written, grown) = (write_bytes(pid) - written_before, log_bytes(&g).saturating_sub(log_before));
    let final_kb = rss_kb(pid);
    let dispatched = g.events(Some("DispatchPlanCreated")).len();
    let refusals = g.events(Some("SignalRejected"));
    // A row may count many refusals of one reason (under a flood, one row a second).
    let count = |e: &Value| e["payload"]["count"].as_u64().unwrap_or(1) as usize;
    let refused = |why: &str| {
        refusals
            .iter()
            .filter(|e| e["payload"]["error"].as_str().unwrap_or_default().contains(why))
            .map(count)
            .sum::<usize>()
    };
    let state_rows = g.events(Some("VehicleStateChanged")).len();
    let (busy, late, behind) = (refused("max_in_flight"), refused("for the planner"), refused("is behind"));
    assert!(g.terminate().success(), "the gateway did not stop cleanly:\n{}", g.log());
    sim.stop();

    // 4. The auditor's view of the flooded log: `gridweaver audit` re-runs every decision.
    if let Some(keep) = std::env::args().skip_while(|a| a != "--keep-db").nth(1) {
        std::fs::copy(&g.db, &keep).expect("the log copied to --keep-db");
    }
    let rows = g.query("SELECT count(*) AS n FROM events")[0]["n"].as_u64().unwrap_or(0);
    let audit_start = Instant::now();
    let audit = common::gridweaver().args(["audit", "--db"]).arg(&g.db).output().expect("gridweaver audit runs");
    let audit_s = audit_start.elapsed().as_secs_f64();
    let audit_last = String::from_utf8_lossy(&audit.stdout).lines().last().unwrap_or_default().to_owned();

    println!("GridWeaver Edge flood benchmark: {n} vehicles, {kw} kW signals, flood {seconds} s at {factor}x");
    println!("| what | value |\n|---|---:|");
    println!("| dispatch capacity, one at a time | {rate:.0} signals/s |");
    println!(
        "| flood published | {sent} signals + {sent} state updates in {flood_s:.1} s ({:.0}/s each) |",
        sent as f64 / flood_s
    );
    println!("| dispatched (DispatchPlanCreated, the whole run) | {dispatched} |");
    println!("| refused as busy (dispatch.max_in_flight), recorded | {busy} |");
    println!("| refused as late (waited over 1 s for the planner), recorded | {late} |");
    println!("| refused as behind (log or publishing), recorded, besides the late | {} |", behind - late);
    println!(
        "| SignalRejected rows, all reasons (refusals they count) | {} ({}) |",
        refusals.len(),
        refusals.iter().map(count).sum::<usize>()
    );
    println!("| VehicleStateChanged rows, the whole run | {state_rows} |");
    println!(
        "| written to storage from the flood's start until drained ({:.1} s), /proc io write_bytes | {:.1} MB (target <= 64 MB) |",
        drained_after.as_secs_f64(),
        written as f64 / 1e6
    );
    println!("| the log's growth over the same time (SQLite pages) | {:.1} MB (target <= 16 MB) |", grown as f64 / 1e6);
    match orders_after {
        Some(t) => println!(
            "| fresh signal after the flood -> its first order at a vehicle | {:.0} ms (target: within 1 s) |",
            t.as_secs_f64() * 1000.0
        ),
        None => println!("| fresh signal after the flood -> its first order | none seen (nothing ordered?) |"),
    }
    println!(
        "| VmRSS idle / peak / after | {:.1} / {:.1} / {:.1} MB (target: peak < 64 MB) |",
        idle_kb as f64 / 1024.0,
        peak_kb as f64 / 1024.0,
        final_kb as f64 / 1024.0
    );
    println!(
        "| fresh signal after the flood -> outcome | {:.0} ms, {retries} times sent again after a busy answer (target: within 2 s) |",
        fresh_latency.as_secs_f64() * 1000.0
    );
    println!(
        "| `gridweaver audit` of the log ({rows} rows) | {audit_s:.1} s, {}: {audit_last} |",
        if audit.status.success() { "exit 0" } else { "FAILED" }
    );
}
