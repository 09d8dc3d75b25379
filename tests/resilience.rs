//! Broker outages and shutdown: the gateway keeps its word when the network does not.

mod common;

use std::time::Duration;

use common::{Gateway, Mosquitto, Operator};
use serde_json::Value;

fn status_is(op: &mut Operator, state: &str) -> bool {
    op.wait_for(Duration::from_secs(15), |t, p| {
        let v: Value = serde_json::from_slice(p).ok()?;
        (t.ends_with("/status") && v["state"] == state).then_some(())
    })
    .is_some()
}

#[test]
fn time_without_the_broker_does_not_count_against_a_vehicles_ack_deadline() {
    let mut broker = Mosquitto::start();
    let mut g = Gateway::start(&broker, "outage", "ack_timeout_seconds: 2");
    let p = g.prefix.clone();
    let mut op = Operator::connect(&broker, "outage-op", &[format!("{p}/vehicles/+/order"), format!("{p}/status")]);
    assert!(status_is(&mut op, "online"));
    op.publish_retained(&format!("{p}/vehicles/quiet/state"), common::state(0.8, 11.0));
    std::thread::sleep(Duration::from_millis(500));
    op.publish(&format!("{p}/signals"), r#"{"id":"during","type":"mfrr","direction":"up","power_kw":5}"#);
    let order: Value = op
        .wait_for(Duration::from_secs(10), |t, p| {
            t.ends_with("/order").then(|| serde_json::from_slice(p).ok()).flatten()
        })
        .expect("an order went out");

    // The broker dies with the order unanswered and stays away past the deadline: the
    // vehicle could not have answered, so nothing times out meanwhile.
    broker.kill();
    std::thread::sleep(Duration::from_millis(3_000));
    assert!(g.events(Some("AckTimedOut")).is_empty(), "a deadline ran out while the broker was gone:\n{}", g.log());
    assert!(g.events(Some("DispatchCompleted")).is_empty());
    broker.restart();

    // The gateway reconnects (and resubscribes: the new broker has no session for it); the
    // attempt's ACK window starts again then, so the answer sent now is taken.
    let mut op = Operator::connect(&broker, "outage-op2", &[format!("{p}/dispatches/+"), format!("{p}/status")]);
    assert!(status_is(&mut op, "online"), "no online status after the restart:\n{}", g.log());
    let ack = serde_json::json!({ "order_id": order["order_id"], "status": "accepted" });
    op.publish(&format!("{p}/vehicles/quiet/ack"), ack.to_string());
    let outcome = op.wait_json(Duration::from_secs(10), "", "signal_id", "during").expect("the dispatch settles");
    assert_eq!(outcome["vehicles"]["accepted"], 1, "{outcome}\n{}", g.log());
    assert_eq!(outcome["vehicles"]["timed_out"], 0, "{outcome}");
    let back = g.events(Some("BrokerReconnected"));
    assert_eq!(back.len(), 1, "{back:?}");
    assert_eq!(back[0]["payload"]["windows_restarted"], serde_json::json!([order["dispatch_id"]]));

    // And it goes on dispatching.
    op.publish_retained(&format!("{p}/vehicles/quiet/state"), common::state(0.8, 11.0));
    std::thread::sleep(Duration::from_millis(300));
    op.publish(&format!("{p}/signals"), r#"{"id":"after","type":"mfrr","direction":"up","power_kw":5}"#);
    assert!(op.wait_json(Duration::from_secs(10), "", "signal_id", "after").is_some(), "{}", g.log());
    assert!(g.terminate().success());
}

#[test]
fn the_gateway_runs_with_no_broker_and_connects_when_one_appears() {
    let mut broker = Mosquitto::start();
    broker.kill();
    let mut g = Gateway::start(&broker, "late", "");
    std::thread::sleep(Duration::from_millis(1_500));
    broker.restart();
    let mut op = Operator::connect(&broker, "late-op", &[format!("{}/status", g.prefix)]);
    assert!(status_is(&mut op, "online"), "{}", g.log());
    assert!(g.terminate().success());
}

#[test]
fn sigterm_settles_in_flight_dispatches_publishes_offline_and_exits_zero() {
    let broker = Mosquitto::start();
    let mut g = Gateway::start(&broker, "term", "ack_timeout_seconds: 30");
    let p = g.prefix.clone();
    let mut op = Operator::connect(
        &broker,
        "term-op",
        &[format!("{p}/vehicles/+/order"), format!("{p}/status"), format!("{p}/dispatches/+")],
    );
    assert!(status_is(&mut op, "online"));
    op.publish_retained(&format!("{p}/vehicles/slow/state"), common::state(0.8, 11.0));
    std::thread::sleep(Duration::from_millis(500));
    op.publish(&format!("{p}/signals"), r#"{"id":"long","type":"dr","direction":"down","power_kw":5}"#);
    op.wait_for(Duration::from_secs(10), |t, _| t.ends_with("/order").then_some(())).expect("an order went out");

    let status = g.terminate();
    assert!(status.success(), "{status:?}\n{}", g.log());
    let cancel =
        op.wait_json(Duration::from_secs(5), "/order", "cancel", true).expect("the unanswered order is cancelled");
    assert_eq!(cancel["reason"], "gateway shutdown");
    let out = op.wait_json(Duration::from_secs(5), "", "signal_id", "long").expect("the in-flight outcome");
    assert_eq!(out["vehicles"]["timed_out"], 1);
    assert!(status_is(&mut op, "offline"));
    let done = g.events(Some("DispatchCompleted"));
    assert_eq!(done.len(), 1);
    assert_eq!(done[0]["payload"]["interrupted"], "gateway shutdown");
    let cancelled = g.events(Some("OrderCancelled"));
    assert_eq!(cancelled.len(), 1);
    assert_eq!(cancelled[0]["payload"]["reason"], "gateway shutdown");
    let rows = g.query("SELECT order_id FROM cancellations");
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0]["order_id"], cancel["order_id"]);
    // After a graceful stop the database file alone is the whole log (the WAL was copied
    // into it): a copy of just that file, as an auditor would take, has every row.
    let copy = g.dir.path().join("copy.db");
    std::fs::copy(&g.db, &copy).expect("copy the file");
    let rows: i64 = rusqlite::Connection::open(&copy)
        .and_then(|c| c.query_row("SELECT COUNT(*) FROM events", [], |r| r.get(0)))
        .expect("the copy is a whole log");
    assert_eq!(rows as usize, g.events(None).len());
}

#[test]
fn a_dispatch_cut_off_by_a_crash_is_recorded_as_interrupted_at_the_next_start() {
    let broker = Mosquitto::start();
    let mut g = Gateway::start(&broker, "crash", "ack_timeout_seconds: 30");
    let p = g.prefix.clone();
    let subs = [format!("{p}/vehicles/+/order"), format!("{p}/status"), format!("{p}/dispatches/+")];
    let mut op = Operator::connect(&broker, "crash-op", &subs);
    assert!(status_is(&mut op, "online"));
    op.publish_retained(&format!("{p}/vehicles/v/state"), common::state(0.8, 11.0));
    std::thread::sleep(Duration::from_millis(500));
    op.publish(&format!("{p}/signals"), r#"{"id":"cut","type":"afrr","direction":"up","power_kw":5}"#);
    op.wait_for(Duration::from_secs(10), |t, _| t.ends_with("/order").then_some(())).expect("an order went out");
    g.kill();
    assert!(g.events(Some("DispatchCompleted")).is_empty());
    g.restart();
    assert!(status_is(&mut op, "online"));
    // The recovery step is recorded as the dispatcher starts, which is not ordered with
    // the bridge's `online`.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let mut interrupted = g.events(Some("DispatchInterrupted"));
    while interrupted.is_empty() && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
        interrupted = g.events(Some("DispatchInterrupted"));
    }
    assert_eq!(interrupted.len(), 1, "{}", g.log());
    assert_eq!(interrupted[0]["payload"]["signal_id"], "cut");
    let cancel =
        op.wait_json(Duration::from_secs(5), "/order", "cancel", true).expect("the order cut off is cancelled");
    assert_eq!(cancel["reason"], "unanswered when the gateway stopped");
    assert_eq!(g.events(Some("OrderCancelled")).len(), 1);
    // Settled at the restart with what it had: its outcome is published and in the view.
    let out = op.wait_json(Duration::from_secs(5), "", "signal_id", "cut").expect("the interrupted outcome");
    assert_eq!((out["requested_kw"].as_f64(), out["acknowledged_kw"].as_f64()), (Some(5.0), Some(0.0)), "{out}");
    assert_eq!(out["vehicles"]["timed_out"], 1, "{out}");
    let rows = g.query("SELECT signal_id, requested_kw, delivered_kw, interrupted FROM dispatches");
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert_eq!((rows[0]["signal_id"].as_str(), rows[0]["delivered_kw"].as_f64()), (Some("cut"), Some(0.0)));
    assert!(rows[0]["interrupted"].as_str().is_some_and(|r| r.contains("unfinished")), "{rows:?}");
    assert!(g.terminate().success());
}
