//! End to end: the real `gridweaver` binary, a real Mosquitto, real SQLite files, and the
//! simulated fleet over MQTT.

mod common;

use std::time::Duration;

use common::{await_fleet, fleet_of, operator, vehicle, Gateway, Mosquitto, Operator};
use gridweaver_actors::sim::{Behaviour, SimVehicle};
use serde_json::json;

const WAIT: Duration = Duration::from_secs(15);

fn signal(id: &str, kw: f64) -> String {
    json!({"id": id, "type": "afrr", "direction": "up", "power_kw": kw, "duration_s": 900}).to_string()
}

fn kinds_for(g: &Gateway, correlation: &str) -> Vec<String> {
    g.events(None)
        .into_iter()
        .filter(|e| e["correlation_id"] == correlation)
        .map(|e| e["kind"].as_str().unwrap_or("").to_owned())
        .collect()
}

#[test]
fn every_vehicle_acks_and_the_outcome_matches_the_log() {
    let broker = Mosquitto::start();
    let mut g = Gateway::start(&broker, "allack", "ack_timeout_seconds: 3");
    let mut op = operator(&broker, &g.prefix);
    let fleet: Vec<SimVehicle> = (0..8).map(|i| vehicle(&format!("ev{i}"), 0.8, 11.0, Behaviour::Prompt)).collect();
    let sim = fleet_of(&broker, &g.prefix, fleet);
    await_fleet(&mut op, 8);

    op.publish(&format!("{}/signals", g.prefix), signal("s1", 50.0));
    let out = op.wait_json(WAIT, "", "signal_id", "s1").expect("an outcome");
    assert_eq!(out["requested_kw"], 50.0);
    assert!((out["acknowledged_kw"].as_f64().unwrap() - 50.0).abs() < 1e-6, "{out}");
    assert!(out["shortfall_kw"].as_f64().unwrap().abs() < 1e-6, "{out}");
    // How Smart spreads 50 kW over eight 11 kW vehicles is its business; at least five answer.
    assert!(out["vehicles"]["accepted"].as_u64().unwrap() >= 5, "{out}");
    assert_eq!((out["vehicles"]["rejected"].as_u64(), out["vehicles"]["timed_out"].as_u64()), (Some(0), Some(0)));
    assert_eq!(out["strategy"], "smart");

    let id = out["dispatch_id"].as_str().unwrap().to_owned();
    let kinds = kinds_for(&g, &id);
    assert_eq!(&kinds[..3], ["SignalReceived", "ConstraintApplied", "DispatchPlanCreated"]);
    let done = kinds.iter().position(|k| k == "DispatchCompleted").expect("completed");
    assert!(kinds[done + 1..].iter().all(|k| k == "WeightsTuned"), "only the tuner may follow: {kinds:?}");
    let orders = kinds.iter().filter(|k| *k == "OrderSent").count();
    assert_eq!(orders, kinds.iter().filter(|k| *k == "AckReceived").count());
    let seqs: Vec<u64> = g.events(None).iter().map(|e| e["seq"].as_u64().unwrap()).collect();
    assert!(seqs.windows(2).all(|w| w[1] == w[0] + 1), "seq has gaps: {seqs:?}");

    let status = g.terminate();
    assert!(status.success(), "{status:?}\n{}", g.log());
    sim.stop();
}

#[test]
fn silent_and_rejecting_vehicles_lead_to_timeouts_fallback_and_a_shortfall() {
    let broker = Mosquitto::start();
    let mut g = Gateway::start(&broker, "mixed", "ack_timeout_seconds: 1, strategy: equal");
    let mut op = operator(&broker, &g.prefix);
    let fleet = vec![
        vehicle("ok1", 0.8, 20.0, Behaviour::Prompt),
        vehicle("ok2", 0.8, 20.0, Behaviour::Prompt),
        vehicle("mute", 0.8, 20.0, Behaviour::Silent),
        vehicle("no", 0.8, 20.0, Behaviour::Rejecting),
    ];
    let sim = fleet_of(&broker, &g.prefix, fleet);
    await_fleet(&mut op, 4);

    // Equal: 10 kW each. ok1 and ok2 accept 10, mute times out, no rejects: residual 20 kW,
    // which the balanced fallback gives to ok1 and ok2 (10 kW of room each).
    op.publish(&format!("{}/signals", g.prefix), signal("s-mixed", 40.0));
    let out = op.wait_json(WAIT, "", "signal_id", "s-mixed").expect("an outcome");
    assert_eq!(out["fallback"], "balanced");
    assert_eq!(out["vehicles"], json!({"accepted": 4, "rejected": 1, "timed_out": 1}), "{out}");
    assert!((out["acknowledged_kw"].as_f64().unwrap() - 40.0).abs() < 1e-6, "{out}");

    // Beyond what the fleet can do: a shortfall is reported, not hidden.
    op.publish(&format!("{}/signals", g.prefix), signal("s-big", 500.0));
    let big = op.wait_json(WAIT, "", "signal_id", "s-big").expect("an outcome");
    assert!(big["shortfall_kw"].as_f64().unwrap() > 400.0, "{big}");

    let id = out["dispatch_id"].as_str().unwrap().to_owned();
    let kinds = kinds_for(&g, &id);
    for k in ["AckTimedOut", "FallbackApplied", "DispatchCompleted"] {
        assert!(kinds.iter().any(|x| x == k), "{k} missing from {kinds:?}");
    }
    let rejected = g.query("SELECT vehicle_id FROM order_answers WHERE answer = 'rejected'");
    assert!(rejected.iter().any(|r| r["vehicle_id"] == "no"), "{rejected:?}");
    let timed_out = g.query("SELECT vehicle_id FROM order_answers WHERE answer = 'timed_out'");
    assert!(!timed_out.is_empty() && timed_out.iter().all(|r| r["vehicle_id"] == "mute"), "{timed_out:?}");
    assert!(g.terminate().success());
    sim.stop();
}

#[test]
fn duplicate_signals_are_dispatched_once_and_answered_as_duplicates() {
    let broker = Mosquitto::start();
    let mut g = Gateway::start(&broker, "dup", "ack_timeout_seconds: 2");
    let mut op = operator(&broker, &g.prefix);
    let sim = fleet_of(&broker, &g.prefix, vec![vehicle("a", 0.7, 10.0, Behaviour::Prompt)]);
    await_fleet(&mut op, 1);
    let topic = format!("{}/signals", g.prefix);
    op.publish(&topic, signal("same", 5.0));
    op.wait_json(WAIT, "", "signal_id", "same").expect("first dispatch");
    op.publish(&topic, signal("same", 5.0));
    let err = op.wait_error(WAIT, "already received").expect("a duplicate answer on errors");
    assert_eq!(err["topic"], topic);
    assert!(op.wait_json(Duration::from_secs(2), "", "signal_id", "same").is_none(), "dispatched twice");
    assert_eq!(g.events(Some("SignalReceived")).len(), 1);
    assert_eq!(g.events(Some("SignalRejected")).len(), 1);

    // A restart remembers: the redelivered id is still a duplicate.
    assert!(g.terminate().success());
    g.restart();
    op.publish(&topic, signal("same", 5.0));
    assert!(op.wait_json(Duration::from_secs(3), "", "signal_id", "same").is_none(), "dispatched again after restart");
    assert!(g.terminate().success());
    sim.stop();
}

/// SIGTERM while a dispatch waits for a silent vehicle: the dispatch's outcome is published
/// with `interrupted`, then `offline` once, and the gateway leaves the broker with a clean
/// DISCONNECT (so the broker never sends its last will, a second `offline`).
#[test]
fn a_stop_publishes_the_open_dispatch_interrupted_then_offline_once_and_disconnects_cleanly() {
    let broker = Mosquitto::start();
    let mut g = Gateway::start_with(&broker, "stop", "client_id: gw-stop", "ack_timeout_seconds: 30");
    let p = g.prefix.clone();
    let subs = ["dispatches/+", "status", "capacity", "vehicles/+/order"].map(|t| format!("{p}/{t}"));
    let mut op = Operator::connect(&broker, "stop-op", &subs);
    let sim = fleet_of(&broker, &p, vec![vehicle("mute", 0.8, 11.0, Behaviour::Silent)]);
    await_fleet(&mut op, 1);
    op.publish(&format!("{p}/signals"), signal("s-stop", 5.0));
    op.wait_json(WAIT, "/vehicles/mute/order", "vehicle_id", "mute").expect("the order");
    op.drain(Duration::from_millis(300));
    op.seen.clear();

    let status = g.terminate();
    assert!(status.success(), "{status:?}\n{}", g.log());
    let out = op.wait_json(Duration::from_secs(5), "", "signal_id", "s-stop").expect("the interrupted outcome");
    assert!(out["interrupted"].as_str().is_some_and(|why| !why.is_empty()), "{out}");
    assert_eq!(out["vehicles"]["timed_out"], 1, "{out}");
    op.drain(Duration::from_secs(2));
    let offline = op
        .seen
        .iter()
        .filter(|(t, body)| t.ends_with("/status") && String::from_utf8_lossy(body).contains("offline"))
        .count();
    assert_eq!(offline, 1, "`offline` once: {:?}", op.seen);
    let said = broker.log();
    let gateway: Vec<&str> = said.lines().filter(|l| l.contains("gw-stop")).collect();
    assert!(gateway.iter().any(|l| l.ends_with("disconnected.")), "a clean DISCONNECT:\n{said}");
    assert!(!gateway.iter().any(|l| l.contains("out of memory") || l.contains("closed its connection")), "{said}");
    sim.stop();
}
