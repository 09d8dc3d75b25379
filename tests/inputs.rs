//! Bad input on every inbound topic: answered on `errors` with a sentence naming the field,
//! recorded, and nothing else changes.

mod common;

use std::time::Duration;

use common::{Gateway, Mosquitto, Operator};
use serde_json::Value;

#[test]
fn malformed_payloads_on_every_inbound_topic_are_answered_recorded_and_change_nothing() {
    let broker = Mosquitto::start();
    let mut g = Gateway::start(&broker, "bad", "ack_timeout_seconds: 1");
    let p = g.prefix.clone();
    let subs = [format!("{p}/errors"), format!("{p}/dispatches/+"), format!("{p}/vehicles/+/order")];
    let mut op = Operator::connect(&broker, "bad-op", &subs);
    // One well-formed vehicle, so that a dispatch would happen if bad input slipped through.
    op.publish_retained(&format!("{p}/vehicles/good/state"), common::state(0.8, 11.0));
    std::thread::sleep(Duration::from_millis(500));

    let big = format!(r#"{{"id":"big","pad":"{}"}}"#, "x".repeat(70 * 1024));
    let cases: Vec<(String, String, &str, Option<&str>)> = vec![
        (format!("{p}/signals"), "not json".into(), "not valid JSON", None),
        (format!("{p}/signals"), "[1]".into(), "one JSON object", None),
        (format!("{p}/signals"), big, "65536", None),
        (format!("{p}/signals"), r#"{"type":"fcr","direction":"up","power_kw":1}"#.into(), "field `id` is required", None),
        (format!("{p}/signals"), r#"{"id":"x1","type":"fcr","direction":"up","power_kw":-1}"#.into(), "field `power_kw`", Some("x1")),
        (format!("{p}/signals"), r#"{"id":"x2","type":"fcr","direction":"up","power_kw":"1"}"#.into(), "field `power_kw`", Some("x2")),
        (format!("{p}/signals"), r#"{"id":"x3","type":"ffr","direction":"up","power_kw":1}"#.into(), "field `type`", Some("x3")),
        (format!("{p}/signals"), r#"{"id":"x4","type":1,"direction":"left","power_kw":1}"#.into(), "field `direction`", Some("x4")),
        (format!("{p}/signals"), r#"{"id":"x5","type":1,"direction":"up","power_kw":1,"duration_s":0}"#.into(), "field `duration_s`", Some("x5")),
        (format!("{p}/signals"), r#"{"id":"x6","type":"afrr","direction":"up","power_kw":1,"start":"noon"}"#.into(), "field `start`", Some("x6")),
        (format!("{p}/signals"), r#"{"id":"x7","type":"transfer","direction":"up","power_kw":1}"#.into(), "field `leader_term`", Some("x7")),
        (format!("{p}/signals"), r#"{"id":"x8","type":"afrr","direction":"up","power_kw":1,"region":"elsewhere"}"#.into(), "field `region`", Some("x8")),
        (format!("{p}/signals"), r#"{"id":"x#9","type":"afrr","direction":"up","power_kw":1}"#.into(), "field `id`", Some("x#9")),
        (format!("{p}/signals"), r#"{"id":"x10","type":"fcr","mode":"droop","power_kw":1}"#.into(), "field `mode`", Some("x10")),
        (format!("{p}/vehicles/v1/state"), r#"{"soc":1.5,"capacity_kwh":60,"max_charge_kw":11,"max_discharge_kw":11,"plugged_in":true}"#.into(), "field `soc`", None),
        (format!("{p}/vehicles/v1/state"), r#"{"soc":0.5,"capacity_kwh":60,"max_charge_kw":11,"max_discharge_kw":11}"#.into(), "field `plugged_in`", None),
        (format!("{p}/vehicles/v1/state"), r#"{"soc":0.5,"capacity_kwh":60,"max_charge_kw":7,"max_discharge_kw":7,"plugged_in":true,"phases":1}"#.into(), "field `phase`", None),
        (format!("{p}/vehicles/v1/state"), "{".into(), "not valid JSON", None),
        (format!("{p}/vehicles/good/ack"), r#"{"status":"accepted"}"#.into(), "field `order_id`", None),
        (format!("{p}/vehicles/good/ack"), r#"{"order_id":"o","status":"maybe"}"#.into(), "field `status`", Some("o")),
        (format!("{p}/vehicles/good/ack"), r#"{"order_id":"nope","status":"accepted"}"#.into(), "names no order", Some("nope")),
        (format!("{p}/bids"), r#"{"request_id":"b","participant":"p","program":"w","price_per_mw":-1,"min_mw":1,"max_mw":2,"start":"2030-01-01T00:00:00Z","end":"2030-01-01T01:00:00Z","reliability":0.5}"#.into(), "field `price_per_mw`", Some("b")),
        (format!("{p}/bids"), r#"{"request_id":"b"}"#.into(), "field `participant`", Some("b")),
    ];
    for (topic, payload, want, reference) in &cases {
        op.publish(topic, payload.as_bytes().to_vec());
        let err: Value = op
            .wait_for(Duration::from_secs(10), |t, body| {
                let v: Value = serde_json::from_slice(body).ok()?;
                (t.ends_with("/errors") && v["topic"] == topic.as_str()).then_some(v)
            })
            .unwrap_or_else(|| panic!("no error answer for {topic} {:.80}", payload));
        let text = err["error"].as_str().unwrap_or_default();
        assert!(text.contains(want), "{topic}: `{text}` should mention `{want}`");
        assert!(err["received_at"].as_str().is_some_and(|t| t.ends_with('Z')), "{err}");
        assert_eq!(err["ref"].as_str(), *reference, "{topic} {:.80}: the answer's `ref`", payload);
    }
    // Nothing was dispatched, no order went out, v1 never joined the fleet.
    assert!(op.wait_for(Duration::from_millis(500), |t, _| (!t.ends_with("/errors")).then_some(())).is_none());
    assert!(g.events(Some("SignalReceived")).is_empty());
    assert!(g.events(Some("OrderSent")).is_empty());
    assert!(g.events(Some("VehicleDiscovered")).iter().all(|e| e["actor"] != "vehicle/v1"));
    // Still alive and well: a good signal is dispatched.
    // A field the contract does not know is ignored, but never unseen: a warning in the
    // gateway's log, and listed in the signal's SignalReceived.
    op.publish(&format!("{p}/signals"), r#"{"id":"fine","type":"afrr","direction":"up","power_kw":2,"duraton_s":60}"#);
    assert!(op.wait_json(Duration::from_secs(10), "", "signal_id", "fine").is_some(), "{}", g.log());
    let received = g.events(Some("SignalReceived"));
    assert_eq!(received[0]["payload"]["unknown_fields"], serde_json::json!(["duraton_s"]));
    assert_eq!(received[0]["payload"]["duration_s"], 900);
    assert!(g.terminate().success());
    assert!(g.log().contains("duraton_s"), "the unknown field is named in the gateway's log:\n{}", g.log());
    // Every refusal is in the log: a row each, or (for refusals of one reason within a
    // second of the last row of that reason) counted in its reason's row of that second.
    let rows: Vec<Value> =
        g.events(Some("SignalRejected")).into_iter().chain(g.events(Some("InputRejected"))).collect();
    let counted: u64 = rows.iter().map(|r| r["payload"]["count"].as_u64().unwrap_or(1)).sum();
    assert_eq!(counted, cases.len() as u64, "{rows:?}");
    assert!(rows.iter().all(|r| r["payload"]["reason"].is_string()), "each row names its reason: {rows:?}");
}

/// The live tail (`<p>/events`) carries every row the log gets while one listens: a
/// dispatch's rows, and those recorded outside a dispatch (a vehicle joining, a refused
/// signal, bad input), each as its row with the payload inlined.
#[test]
fn the_live_tail_carries_every_row_the_log_gets() {
    let broker = Mosquitto::start();
    let mut g = Gateway::start(&broker, "tail", "ack_timeout_seconds: 1");
    let p = g.prefix.clone();
    let mut op = Operator::connect(&broker, "tail-op", &[format!("{p}/events"), format!("{p}/dispatches/+")]);
    std::thread::sleep(Duration::from_millis(800));
    op.publish_retained(&format!("{p}/vehicles/v1/state"), common::state(0.8, 11.0));
    std::thread::sleep(Duration::from_millis(300));
    op.publish(&format!("{p}/signals"), "not json");
    op.publish(&format!("{p}/vehicles/v1/ack"), r#"{"order_id":"nope","status":"accepted"}"#);
    op.publish(&format!("{p}/signals"), r#"{"id":"ok","type":"afrr","direction":"up","power_kw":2}"#);
    op.wait_json(Duration::from_secs(10), "", "signal_id", "ok").expect("the dispatch's outcome");
    std::thread::sleep(Duration::from_millis(500));
    assert!(g.terminate().success());
    let mut tail = std::collections::BTreeMap::new();
    while let Some(row) = op.wait_for(Duration::from_millis(200), |t, body| {
        t.ends_with("/events").then(|| serde_json::from_slice::<Value>(body).ok()).flatten()
    }) {
        tail.insert(row["seq"].as_u64().expect("a seq"), row);
    }
    let first = *tail.keys().next().expect("rows on the tail");
    let log: Vec<Value> = g.events(None).into_iter().filter(|e| e["seq"].as_u64() >= Some(first)).collect();
    for row in &log {
        let seq = row["seq"].as_u64().unwrap();
        let on_tail = tail.get(&seq).unwrap_or_else(|| panic!("row {seq} ({}) is not on the tail", row["kind"]));
        assert_eq!(on_tail["kind"], row["kind"]);
        assert_eq!(on_tail["payload"], row["payload"], "row {seq}");
    }
    let kinds: Vec<&str> = log.iter().filter_map(|r| r["kind"].as_str()).collect();
    for k in ["VehicleDiscovered", "SignalRejected", "InputRejected", "SignalReceived", "DispatchCompleted"] {
        assert!(kinds.contains(&k), "{k} in {kinds:?}");
    }
}
