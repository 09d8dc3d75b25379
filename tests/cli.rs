//! The command line: exit codes, config checking, reading the log, and the demo.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::{free_port, gridweaver, Gateway, Mosquitto};

/// Runs `cmd` to its end and returns what it printed; kills it and fails the test if it
/// is still running after `within` (a `run` that should have refused to start).
fn output_within(cmd: &mut Command, within: Duration) -> Output {
    let mut child = cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("spawn gridweaver");
    let deadline = Instant::now() + within;
    while child.try_wait().expect("wait").is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let out = child.wait_with_output().expect("output");
            panic!("still running after {within:?}; stderr:\n{}", String::from_utf8_lossy(&out.stderr));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().expect("output")
}

/// A config in `dir` with `mqtt` entries (YAML flow map) and the log at `log`; no broker
/// listens on its port.
fn write_config(dir: &Path, mqtt: &str, log: &Path) -> PathBuf {
    let config = dir.join("gateway.yaml");
    let yaml = format!(
        "site: x\nmqtt: {{ host: 127.0.0.1, port: {}, {mqtt} }}\nstore: {{ path: {:?} }}\n",
        free_port(),
        log.display().to_string()
    );
    std::fs::write(&config, yaml).expect("write config");
    config
}

/// `check-config FILE` and `run --config FILE` both exit 2 with one line on stderr that
/// contains every one of `needles`.
fn assert_config_error(config: &Path, needles: &[&str]) {
    for args in [vec!["check-config"], vec!["run", "--config"]] {
        let out = output_within(gridweaver().args(&args).arg(config), Duration::from_secs(20));
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        for needle in needles {
            assert!(err.contains(needle), "{args:?}: `{needle}` not in: {err}");
        }
        assert_eq!(err.lines().count(), 1, "{args:?}: one line: {err}");
    }
}

/// How many rows of `kind` the log at `db` holds (0 while it does not exist).
fn rows_of(db: &Path, kind: &str) -> i64 {
    let Ok(conn) = rusqlite::Connection::open_with_flags(db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY) else {
        return 0;
    };
    conn.query_row("SELECT COUNT(*) FROM events WHERE kind = ?1", [kind], |r| r.get(0)).unwrap_or(0)
}

/// Waits until the log at `db` holds `n` rows of `kind`.
fn await_rows(db: &Path, kind: &str, n: i64, gateway: &Gateway) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while rows_of(db, kind) < n {
        assert!(Instant::now() < deadline, "the log never held {n} {kind}:\n{}", gateway.log());
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn check_config_accepts_the_shipped_configs_and_names_bad_keys() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut checked = 0;
    for entry in std::fs::read_dir(root.join("config")).expect("config/") {
        let path = entry.expect("entry").path();
        if path.extension().is_some_and(|e| e == "yaml") {
            // They name /var/lib and /etc paths of a gateway, not of this machine.
            let out = gridweaver().args(["check-config", "--skip-environment"]).arg(&path).output().expect("run");
            assert!(out.status.success(), "{}: {}", path.display(), String::from_utf8_lossy(&out.stderr));
            checked += 1;
        }
    }
    assert!(checked >= 1);

    let dir = tempfile::tempdir().expect("tmp");
    let bad = dir.path().join("bad.yaml");
    std::fs::write(&bad, "site: x\ndispatch:\n  ack_timeout_seconds: -2\n").expect("write");
    let out = gridweaver().arg("check-config").arg(&bad).output().expect("run");
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("dispatch.ack_timeout_seconds"), "{err}");
    assert_eq!(err.lines().count(), 1, "one line: {err}");

    std::fs::write(&bad, "site: x\nmqtt:\n  hots: a\n").expect("write");
    let out = gridweaver().arg("check-config").arg(&bad).output().expect("run");
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("mqtt: unknown field `hots`"));

    let out = gridweaver().arg("check-config").arg(dir.path().join("missing.yaml")).output().expect("run");
    assert_eq!(out.status.code(), Some(2));
    let out = gridweaver().arg("no-such-command").output().expect("run");
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn events_on_a_missing_log_is_a_runtime_error_and_bad_filters_are_usage_errors() {
    let dir = tempfile::tempdir().expect("tmp");
    let out = gridweaver().args(["events", "--db"]).arg(dir.path().join("none.db")).output().expect("run");
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no event log"));
    let out = gridweaver().args(["events", "--kind", "Nope", "--db", "x.db"]).output().expect("run");
    assert_eq!(out.status.code(), Some(2));
    let out = gridweaver().args(["events", "--since", "yesterday", "--db", "x.db"]).output().expect("run");
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn the_demo_exits_zero_and_its_log_holds_completed_dispatches() {
    let dir = tempfile::tempdir().expect("tmp");
    let db = dir.path().join("demo.db");
    let out = gridweaver().args(["demo", "--db"]).arg(&db).output().expect("run the demo");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "demo failed:\n{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("summary"), "{stdout}");

    let out =
        gridweaver().args(["events", "--json", "--kind", "DispatchCompleted", "--db"]).arg(&db).output().expect("run");
    assert!(out.status.success());
    let completed: Vec<serde_json::Value> =
        String::from_utf8_lossy(&out.stdout).lines().map(|l| serde_json::from_str(l).expect("json")).collect();
    assert_eq!(completed.len(), 10, "one per scripted signal");
    assert!(completed.iter().all(|e| e["payload"]["requested_kw"].as_f64().is_some()));
    assert!(
        completed.iter().any(|e| e["payload"]["vehicles"]["timed_out"].as_u64() > Some(0)),
        "some vehicles are silent"
    );

    // The table view reads the same log.
    let out = gridweaver()
        .args(["events", "--correlation"])
        .arg(completed[0]["correlation_id"].as_str().unwrap())
        .arg("--db")
        .arg(&db)
        .output()
        .expect("run");
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(table.contains("DispatchPlanCreated") && table.contains("OrderSent"), "{table}");
}

/// `audit` re-runs the demo's decisions and finds them all; `replay` prints the state at
/// a time; an edited row is named by the chain check, and audit fails.
#[test]
fn audit_and_replay_read_the_demo_log_and_an_edit_is_caught() {
    let dir = tempfile::tempdir().expect("tmp");
    let db = dir.path().join("demo.db");
    let out = gridweaver().args(["demo", "--vehicles", "30", "--db"]).arg(&db).output().expect("run the demo");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

    let out = gridweaver().args(["audit", "--json", "--db"]).arg(&db).output().expect("audit");
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("a JSON report");
    assert!(out.status.success(), "{report}\n{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(report["chain"]["ok"], true);
    assert_eq!(report["report"]["plans"], 10, "{report}");
    assert!(report["report"]["fallbacks"].as_u64() > Some(0), "{report}");
    assert_eq!(report["report"]["findings"].as_array().map(Vec::len), Some(0));

    // Replay: the whole log, then before the first signal.
    let out = gridweaver().args(["replay", "--db"]).arg(&db).output().expect("replay");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let end: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(end["fleet"].as_object().map(|f| f.len()), Some(30));
    assert_eq!(end["settled"], 10);
    assert_eq!(end["in_flight"].as_object().map(|f| f.len()), Some(0));
    assert!(end["config"]["hash"].as_str().is_some_and(|h| h.len() == 64));
    let first = &end["outcomes"][0];
    let conn = rusqlite::Connection::open(&db).expect("open");
    let first_signal_ms: i64 = conn
        .query_row("SELECT MIN(ts_ms) FROM events WHERE kind = 'SignalReceived'", [], |r| r.get(0))
        .expect("a signal");
    let before = gridweaver_core::time::Timestamp::from_millis(first_signal_ms - 1).to_string();
    let out = gridweaver().args(["replay", "--to", &before, "--db"]).arg(&db).output().expect("replay");
    let then: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(then["settled"], 0, "nothing settled before the first signal");
    assert_eq!(then["fleet"].as_object().map(|f| f.len()), Some(30));
    assert!(first["dispatch_id"].as_str().is_some());
    let out = gridweaver().args(["replay", "--to", "soon", "--db"]).arg(&db).output().expect("replay");
    assert_eq!(out.status.code(), Some(2));

    // Compaction in the middle of a dispatch (at its first fallback): replay gives the
    // same state, audit re-runs every decision after the cut from the snapshot.
    let compacted = dir.path().join("compacted.db");
    conn.execute("VACUUM INTO ?1", [compacted.to_str().expect("utf-8 path")]).expect("copy");
    let cut_ms: i64 = conn
        .query_row("SELECT ts_ms FROM events WHERE kind = 'FallbackApplied' ORDER BY seq LIMIT 1 OFFSET 3", [], |r| {
            r.get(0)
        })
        .expect("a fourth fallback");
    let cut = gridweaver_core::time::Timestamp::from_millis(cut_ms).to_string();
    let out =
        gridweaver().args(["compact", "--vacuum", "--before", &cut, "--db"]).arg(&compacted).output().expect("compact");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("removed"), "{}", String::from_utf8_lossy(&out.stdout));
    let kept = rusqlite::Connection::open(&compacted).expect("open");
    let count = |sql: &str| -> u64 { kept.query_row(sql, [], |r| r.get::<_, i64>(0)).expect(sql) as u64 };
    assert_eq!(count(&format!("SELECT COUNT(*) FROM events WHERE ts_ms < {cut_ms} AND kind != 'LogCompacted'")), 0);
    let (signals, fallbacks) = (
        count("SELECT COUNT(*) FROM events WHERE kind = 'SignalReceived'"),
        count("SELECT COUNT(*) FROM events WHERE kind = 'FallbackApplied'"),
    );
    assert!(signals < 10 && fallbacks > 0, "{signals} signals and {fallbacks} fallbacks after the cut");
    let out = gridweaver().args(["replay", "--db"]).arg(&compacted).output().expect("replay");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let mut after: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    let mut whole = end.clone();
    for v in [&mut after, &mut whole] {
        v.as_object_mut().map(|o| (o.remove("seq"), o.remove("ts")));
    }
    assert_eq!(after, whole, "the state after compaction is the state before");
    let out = gridweaver().args(["audit", "--json", "--db"]).arg(&compacted).output().expect("audit");
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("a JSON report");
    assert!(out.status.success(), "{report}\n{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(
        (report["report"]["plans"].as_u64(), report["report"]["fallbacks"].as_u64()),
        (Some(signals), Some(fallbacks))
    );
    let out = gridweaver().args(["replay", "--to", &before, "--db"]).arg(&compacted).output().expect("replay");
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("compacted through event"));

    // Someone edits a delivered figure behind the triggers' back.
    conn.execute_batch(
        "DROP TRIGGER events_no_update;
         UPDATE events SET payload = json_set(payload, '$.acknowledged_kw', 999.0)
           WHERE seq = (SELECT MIN(seq) FROM events WHERE kind = 'DispatchCompleted');",
    )
    .expect("edit");
    let edited: i64 =
        conn.query_row("SELECT MIN(seq) FROM events WHERE kind = 'DispatchCompleted'", [], |r| r.get(0)).expect("seq");
    drop(conn);
    let out = gridweaver().args(["audit", "--db"]).arg(&db).output().expect("audit");
    assert_eq!(out.status.code(), Some(1));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains(&format!("event {edited} does not match its hash")), "{text}");
}

#[test]
fn migrate_starts_a_new_log_from_a_snapshot_and_refuses_an_existing_one() {
    let dir = tempfile::tempdir().expect("tmp");
    let snap = dir.path().join("snapshot.json");
    std::fs::write(
        &snap,
        r#"{"site": "depot1", "taken_at": "2026-12-01T06:00:00Z",
            "fleet": [{"id": "ev1", "soc": 0.6, "capacity_kwh": 60, "max_charge_kw": 11, "max_discharge_kw": 11,
                       "plugged_in": true}],
            "weights": {"mfrr": {"soc": 0.5, "time": 0.3, "priority": 0.3, "availability": 0.8, "price": 0.1, "wear": 0.4}},
            "programs": {}}"#,
    )
    .expect("write");
    let db = dir.path().join("new.db");
    let out = gridweaver().args(["migrate", "--snapshot"]).arg(&snap).arg("--db").arg(&db).output().expect("run");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let out = gridweaver().args(["replay", "--db"]).arg(&db).output().expect("replay");
    let state: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(state["weights"]["mfrr"]["availability"], 0.8);
    assert_eq!(state["fleet"]["ev1"]["soc"], 0.6);
    let out = gridweaver().args(["audit", "--db"]).arg(&db).output().expect("audit");
    assert!(
        out.status.success(),
        "imported weights are inputs, not decisions: {}",
        String::from_utf8_lossy(&out.stdout)
    );

    let again = gridweaver().args(["migrate", "--snapshot"]).arg(&snap).arg("--db").arg(&db).output().expect("run");
    assert_eq!(again.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&again.stderr).contains("already holds"));
    std::fs::write(&snap, r#"{"site": "x", "fleet": [{"id": "ev1", "soc": "full"}]}"#).expect("write");
    let bad = gridweaver().args(["migrate", "--snapshot"]).arg(&snap).arg("--db").arg(dir.path().join("b.db")).output();
    let bad = bad.expect("run");
    assert_eq!(bad.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("fleet[0]"), "{}", String::from_utf8_lossy(&bad.stderr));
}

#[test]
fn a_missing_or_unreadable_password_file_is_a_config_error_for_check_config_and_run() {
    let dir = tempfile::tempdir().expect("tmp");
    let db = dir.path().join("events.db");
    // A directory cannot be read as a file, even by root (for whom no mode bit forbids it).
    for file in [dir.path().join("missing-password"), dir.path().join("a-directory")] {
        if file.ends_with("a-directory") {
            std::fs::create_dir(&file).expect("mkdir");
        }
        let mqtt = format!("username: gw, password_file: {:?}", file.display().to_string());
        let config = write_config(dir.path(), &mqtt, &db);
        assert_config_error(&config, &["mqtt.password_file", &file.display().to_string()]);
        assert!(!db.exists(), "run stopped before it opened the log");
    }
    // A readable one passes.
    let file = dir.path().join("password");
    std::fs::write(&file, "s3cret\n").expect("write");
    let mqtt = format!("username: gw, password_file: {:?}", file.display().to_string());
    let out = gridweaver().arg("check-config").arg(write_config(dir.path(), &mqtt, &db)).output().expect("run");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn a_log_in_a_missing_directory_is_a_config_error_for_check_config_and_run() {
    let dir = tempfile::tempdir().expect("tmp");
    let missing = dir.path().join("no-such-dir");
    let config = write_config(dir.path(), "", &missing.join("events.db"));
    assert_config_error(&config, &["store.path", &missing.display().to_string()]);
    assert!(!missing.exists(), "nothing was created");
    let out = gridweaver().args(["check-config", "--skip-environment"]).arg(&config).output().expect("run");
    assert!(out.status.success(), "the text alone is valid: {}", String::from_utf8_lossy(&out.stderr));
}

/// One gateway per log: a second `run` (or a `migrate`) on a live gateway's log exits 1
/// and writes nothing; readers work beside it; `kill -9` releases the lock.
#[test]
fn a_second_gateway_on_the_same_log_exits_1_while_the_first_runs() {
    let broker = Mosquitto::start();
    let mut first = Gateway::start(&broker, "locked", "");
    // The first has taken the lock and recorded its configuration.
    await_rows(&first.db, "ConfigRecorded", 1, &first);
    let lock = format!("{}.lock", first.db.display());

    let out = output_within(gridweaver().args(["run", "--config"]).arg(&first.config), Duration::from_secs(20));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "the second gateway: {err}");
    assert!(err.contains(&lock) && err.contains("another gateway holds"), "{err}");
    assert_eq!(err.lines().count(), 1, "one line: {err}");

    let snapshot = first.dir.path().join("snapshot.json");
    std::fs::write(
        &snapshot,
        r#"{"site": "locked", "taken_at": "2026-12-01T06:00:00Z", "fleet": [], "weights": {}, "programs": {}}"#,
    )
    .expect("write");
    let out = gridweaver().args(["migrate", "--snapshot"]).arg(&snapshot).arg("--db").arg(&first.db).output();
    let out = out.expect("run");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "migrate: {err}");
    assert!(err.contains(&lock) && err.contains("another gateway holds"), "{err}");

    for reader in ["events", "replay", "audit"] {
        let out = gridweaver().args([reader, "--db"]).arg(&first.db).output().expect("run");
        assert!(out.status.success(), "{reader} beside the gateway: {}", String::from_utf8_lossy(&out.stderr));
    }
    assert_eq!(rows_of(&first.db, "ConfigRecorded"), 1, "the refused ones wrote nothing");

    // A crash releases it: the next start takes the lock and runs.
    first.kill();
    first.restart();
    await_rows(&first.db, "ConfigRecorded", 2, &first);
    assert!(first.terminate().success(), "{}", first.log());
}
