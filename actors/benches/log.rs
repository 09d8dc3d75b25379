//! The event log's throughput, measured on a generated but real run (the core engine plans
//! every dispatch; vehicles accept or reject; the tuner tunes):
//!
//! 1. append: the same rows through the store (writer thread, group commit, hash chain,
//!    durable: `synchronous=FULL`, the default) and through a bare rusqlite insert loop in
//!    one transaction into the same schema, in the same run;
//! 2. replay: the log folded into the projection (`store::project`);
//! 3. compaction of the older half (`store::compact`), and replay from its snapshot;
//! 4. audit: every plan, fallback and weight change of a log re-run (`Auditor`).
//!
//! `cargo bench -p gridweaver-actors --bench log -- [--events 1000000] [--audit-dispatches 10000]
//!  [--audit-vehicles 100] [--append-rounds 3] [--replay-rounds 5] [--keep FILE]` (`--keep`: a copy
//!  of the generated log)

use std::path::Path;
use std::time::Instant;

use anyhow::{Context, Result};
use gridweaver_actors::store::{self, Query, Reader, StoreHandle};
use gridweaver_core::config::Config;
use gridweaver_core::events::payload::{ConfigRecorded, LogRecovered};
use gridweaver_core::events::{Event, ProjectedState};
use gridweaver_core::model::{Ack, AckStatus, Direction, Signal, SignalType, Vehicle};
use gridweaver_core::replay::audit::Auditor;
use gridweaver_core::replay::build;
use gridweaver_core::time::Timestamp;
use rusqlite::params;

fn arg(name: &str, default: usize) -> usize {
    let args: Vec<String> = std::env::args().collect();
    args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// A run of the gateway's core: `steps` of events, as the dispatcher hands them to the store.
fn generate(min_events: usize, max_dispatches: usize, vehicles: usize) -> Vec<Vec<Event>> {
    let cfg = Config::from_yaml("site: bench\nstore: { path: x.db }\ndispatch: { ack_timeout_seconds: 1 }\n")
        .expect("a valid config");
    let empty = ProjectedState::default();
    let mut engine = build::engine(&cfg, &empty).expect("a valid tuner");
    let t0 = Timestamp::from_millis(1_795_000_000_000);
    let mut steps = vec![vec![Event::of(t0, "gateway", &ConfigRecorded::of(&cfg))]];
    let mut fleet = Vec::new();
    for i in 0..vehicles {
        let v = Vehicle::new(format!("ev{i:05}"), 0.3 + 0.6 * (i % 97) as f64 / 97.0, 60.0, 7.0 + (i % 15) as f64);
        fleet.extend(engine.on_state(t0, v.id.clone(), Some(v)).1);
    }
    steps.push(fleet);
    let mut events: usize = steps.iter().map(Vec::len).sum();
    let mut k = 0u64;
    while events < min_events && (k as usize) < max_dispatches {
        let now = t0.plus_millis(2_000 * (k as i64 + 1));
        let direction = if k.is_multiple_of(3) { Direction::Down } else { Direction::Up };
        let signal = Signal::new(format!("s{k}"), SignalType::ALL[(k % 5) as usize], direction, 20.0, now);
        k += 1;
        let step = engine.on_signal(now, Signal { duration_s: 1, ..signal });
        let step = step.unwrap_or_else(|e| panic!("signal {k} refused: {e}"));
        let orders = step.orders.clone();
        let mut batch = step.events;
        for (j, o) in orders.iter().enumerate() {
            // Every tenth vehicle rejects: the fallback reallocates to those that accepted.
            let status = if j % 10 == 9 { AckStatus::Rejected } else { AckStatus::Accepted };
            let ack = Ack { order_id: o.order_id.to_string(), status, reason: None };
            let Ok(mut s) = engine.on_ack(now.plus_millis(20), &o.vehicle_id, &ack) else { continue };
            batch.append(&mut s.events);
            // The last answer settles the attempt and runs the fallback in the same step.
            for o in std::mem::take(&mut s.orders) {
                let ack = Ack { order_id: o.order_id.to_string(), status: AckStatus::Accepted, reason: None };
                if let Ok(done) = engine.on_ack(now.plus_millis(40), &o.vehicle_id, &ack) {
                    batch.extend(done.events);
                }
            }
        }
        events += batch.len();
        steps.push(batch);
    }
    steps
}

fn bare_insert(path: &Path, steps: &[Vec<Event>]) -> Result<f64> {
    // The same schema as the store's (indexes, chain table, views), no chain written.
    let mut conn = store::open_writer(path, true)?;
    let start = Instant::now();
    let tx = conn.transaction()?;
    {
        let mut insert = tx.prepare(
            "INSERT INTO events (seq, ts_ms, kind, correlation_id, actor, region, payload) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
        )?;
        for (seq, e) in (1i64..).zip(steps.iter().flatten()) {
            insert.execute(params![
                seq,
                e.ts.as_millis(),
                e.kind.as_str(),
                e.correlation_id,
                e.actor,
                e.region,
                e.payload
            ])?;
        }
    }
    tx.commit()?;
    Ok(start.elapsed().as_secs_f64())
}

fn through_store(path: &Path, steps: Vec<Vec<Event>>) -> Result<f64> {
    let conn = store::open_writer(path, true)?;
    let (store, join) = StoreHandle::start(conn)?;
    // The store never blocks a producer: a full queue is waited for asynchronously.
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let start = Instant::now();
    let mut last = None;
    for step in steps {
        last = Some(rt.block_on(store.append(step)));
    }
    if let Some(rx) = last {
        rx.blocking_recv().context("the store answered")?.map_err(anyhow::Error::msg)?;
    }
    let elapsed = start.elapsed().as_secs_f64();
    drop(store);
    join.join().map_err(|_| anyhow::anyhow!("the store thread panicked"))?;
    Ok(elapsed)
}

fn main() -> Result<()> {
    let target = arg("--events", 1_000_000);
    let audit_dispatches = arg("--audit-dispatches", 10_000);
    let audit_vehicles = arg("--audit-vehicles", 100);
    let dir = tempfile::tempdir()?;

    let t = Instant::now();
    let steps = generate(target, usize::MAX, 20);
    let rows: usize = steps.iter().map(Vec::len).sum();
    let dispatches = steps.len() - 2;
    let bytes: usize = steps.iter().flatten().map(|e| e.payload.len()).sum();
    println!(
        "generated {rows} events ({dispatches} dispatches of 20 vehicles, {:.1} MB of payloads) in {:.1} s",
        bytes as f64 / 1e6,
        t.elapsed().as_secs_f64()
    );

    // Rounds alternate the two on fresh files (the disk's fsync times vary from minute to
    // minute on a shared machine); the median of the ratios is the figure.
    let rounds = arg("--append-rounds", 3).max(1);
    let steps_count = steps.len();
    println!("\nappend, {rows} rows, synchronous=FULL, {rounds} rounds:");
    let mut ratios = Vec::new();
    let mut steps = Some(steps);
    for round in 1..=rounds {
        let bare_db = dir.path().join("bare.db");
        let store_db = dir.path().join("store.db");
        for f in [&bare_db, &store_db] {
            for suffix in ["", "-wal", "-shm"] {
                let _ = std::fs::remove_file(format!("{}{suffix}", f.display()));
            }
        }
        let these = steps.as_ref().context("steps")?;
        let bare = bare_insert(&bare_db, these)?;
        let these = if round == rounds { steps.take().context("steps")? } else { these.clone() };
        let stored = through_store(&store_db, these)?;
        ratios.push(bare / stored);
        println!(
            "  round {round}: bare rusqlite, one transaction, no chain {bare:.2} s ({:.0} rows/s); store ({steps_count} appends, group commit, hash chain) {stored:.2} s ({:.0} rows/s) = {:.0} % of bare",
            rows as f64 / bare,
            rows as f64 / stored,
            100.0 * bare / stored
        );
    }
    ratios.sort_by(f64::total_cmp);
    println!(
        "  store / bare: median {:.0} % (lowest {:.0} %, highest {:.0} %)",
        100.0 * ratios[ratios.len() / 2],
        100.0 * ratios[0],
        100.0 * ratios[ratios.len() - 1]
    );

    let db = dir.path().join("store.db");
    if let Some(keep) = std::env::args().skip_while(|a| a != "--keep").nth(1) {
        // The generated log, for profiling replay on it (`gridweaver replay --db FILE`).
        rusqlite::Connection::open(&db)?.execute("VACUUM INTO ?1", [&keep])?;
        println!("log kept in {keep}");
    }
    // Where replay time goes: reading the rows, then decoding them, then the fold.
    let conn = rusqlite::Connection::open(&db)?;
    let t = Instant::now();
    let (mut scanned, mut decoded) = (0usize, 0usize);
    {
        let mut stmt = conn.prepare("SELECT kind, payload FROM events ORDER BY seq")?;
        let mut rows = stmt.query([])?;
        while let Some(r) = rows.next()? {
            scanned += r.get_ref(1)?.as_str()?.len();
        }
    }
    let scan = t.elapsed().as_secs_f64();
    let t = Instant::now();
    {
        let mut stmt = conn.prepare("SELECT kind, payload FROM events ORDER BY seq")?;
        let mut rows = stmt.query([])?;
        while let Some(r) = rows.next()? {
            let ok = gridweaver_core::events::payload::decode_str(r.get_ref(0)?.as_str()?, r.get_ref(1)?.as_str()?);
            decoded += usize::from(ok.is_ok());
        }
    }
    let decode = t.elapsed().as_secs_f64();
    drop(conn);
    println!(
        "\nreplay parts: reading {:.1} MB of rows {scan:.2} s; reading and decoding {decoded} payloads {decode:.2} s",
        scanned as f64 / 1e6
    );
    let mut replays = Vec::new();
    let mut state = ProjectedState::default();
    for _ in 0..arg("--replay-rounds", 5).max(1) {
        let t = Instant::now();
        state = store::project(&db, None, true)?.into_state();
        replays.push(t.elapsed().as_secs_f64());
    }
    replays.sort_by(f64::total_cmp);
    let replay = replays[replays.len() / 2];
    println!(
        "\nreplay: {} events folded in {:.2} s median of {} ({:.0} events/s; fastest {:.2} s, slowest {:.2} s); {} dispatches settled, {} vehicles",
        state.seq,
        replay,
        replays.len(),
        state.seq as f64 / replay,
        replays[0],
        replays[replays.len() - 1],
        state.settled,
        state.fleet.len()
    );

    // Compaction of the older half, then replay from its snapshot.
    let half: i64 = rusqlite::Connection::open(&db)?.query_row(
        "SELECT ts_ms FROM events WHERE seq = (SELECT MAX(seq) / 2 FROM events)",
        [],
        |r| r.get(0),
    )?;
    // A gateway writing beside it: one small durable append every 10 ms, each timed.
    let (writer, writer_thread) = StoreHandle::start(store::open_writer(&db, true)?)?;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let beside = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let (mut waits, mut failed) = (Vec::new(), 0usize);
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("a runtime");
            let last = Timestamp::from_millis(4_102_444_800_000); // 2100: after every row
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let probe = LogRecovered { error: "bench".into(), failed_since: last, signals_refused: 0 };
                let e = Event::of(last, "gateway", &probe);
                let t = Instant::now();
                match rt.block_on(writer.append(vec![e])).blocking_recv() {
                    Ok(Ok(_)) => waits.push(t.elapsed().as_secs_f64() * 1e3),
                    _ => failed += 1,
                }
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            (waits, failed)
        })
    };
    let t = Instant::now();
    let compacted = store::compact(&db, Timestamp::from_millis(half), state.ts.unwrap_or_default())?
        .context("rows before the middle")?;
    let compaction = t.elapsed().as_secs_f64();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (mut waits, failed) = beside.join().map_err(|_| anyhow::anyhow!("the writer beside panicked"))?;
    writer_thread.join().map_err(|_| anyhow::anyhow!("the store thread panicked"))?;
    waits.sort_by(f64::total_cmp);
    let pct = |q: f64| waits.get(((waits.len() as f64 - 1.0) * q) as usize).copied().unwrap_or(f64::NAN);
    let t = Instant::now();
    let after = store::project(&db, None, true)?.into_state();
    let replay_after = t.elapsed().as_secs_f64();
    anyhow::ensure!(after.settled == state.settled && after.fleet == state.fleet, "compaction changed the state");
    println!(
        "
compact: {} rows removed in {compaction:.2} s; snapshot {:.1} KB; replay after it {replay_after:.2} s
  a writer beside it (one durable append every 10 ms): {} appends, {failed} failed; wait p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
        compacted.removed,
        compacted.snapshot_bytes as f64 / 1e3,
        waits.len(),
        pct(0.5),
        pct(0.99),
        pct(1.0)
    );

    let t = Instant::now();
    let steps = generate(usize::MAX, audit_dispatches, audit_vehicles);
    let rows: usize = steps.iter().map(Vec::len).sum();
    let audit_db = dir.path().join("audit.db");
    through_store(&audit_db, steps)?;
    println!(
        "\naudit log: {audit_dispatches} dispatches of {audit_vehicles} vehicles, {rows} events (made in {:.1} s)",
        t.elapsed().as_secs_f64()
    );
    let t = Instant::now();
    let reader = Reader::open(&audit_db)?;
    let chain = store::schema::verify_chain(reader.connection())?;
    let chained = t.elapsed().as_secs_f64();
    let mut auditor = Auditor::new(None, None);
    reader.for_each(&Query::default(), |row| auditor.apply(&row).map_err(anyhow::Error::from))?;
    let report = auditor.finish();
    let audit = t.elapsed().as_secs_f64();
    println!(
        "audit: chain {} in {:.2} s; {} plans, {} fallbacks and {} weight changes re-run in {:.2} s in all ({:.2} ms per dispatch); {} differ",
        if chain.is_ok() { "ok" } else { "BROKEN" },
        chained,
        report.plans,
        report.fallbacks,
        report.tunings,
        audit,
        1e3 * audit / audit_dispatches as f64,
        report.findings.len()
    );
    Ok(())
}
