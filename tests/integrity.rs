//! Dispatch integrity end to end: the real binary, a real Mosquitto, the simulated fleet.
//! Overlapping signals share the site's limits and the vehicles' ratings, windows that end
//! free their power, setpoint streams never stack, silent orders are cancelled, and a
//! restart (graceful or not, with or without a changed prefix) keeps the fleet and what was
//! committed.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::{await_fleet, fleet_of, gridweaver, operator, vehicle, Gateway, Mosquitto, Operator};
use gridweaver_actors::sim::Behaviour;
use serde_json::{json, Value};

const WAIT: Duration = Duration::from_secs(15);

fn signal(id: &str, kind: &str, kw: f64, duration_s: u64) -> String {
    json!({"id": id, "type": kind, "direction": "up", "power_kw": kw, "duration_s": duration_s}).to_string()
}

fn num(v: &Value, field: &str) -> f64 {
    v[field].as_f64().unwrap_or_else(|| panic!("`{field}` in {v}"))
}

/// What each vehicle was last told and not told to stop: order id -> (vehicle, kW), from
/// everything seen on the order topics so far.
fn in_force(op: &mut Operator, within: Duration) -> BTreeMap<String, (String, f64)> {
    let mut orders = BTreeMap::new();
    // Drain what is already there and whatever arrives within `within`.
    let _ = op.wait_for(within, |_, _| None::<()>);
    for (topic, payload) in &op.seen {
        if !topic.ends_with("/order") {
            continue;
        }
        let Ok(v) = serde_json::from_slice::<Value>(payload) else { continue };
        let id = v["order_id"].as_str().unwrap_or_default().to_owned();
        if v["cancel"] == true {
            orders.remove(&id);
        } else {
            orders.insert(id, (v["vehicle_id"].as_str().unwrap_or_default().to_owned(), num(&v, "power_kw")));
        }
    }
    orders
}

fn per_vehicle(orders: &BTreeMap<String, (String, f64)>) -> BTreeMap<String, f64> {
    let mut kw = BTreeMap::new();
    for (vehicle, p) in orders.values() {
        *kw.entry(vehicle.clone()).or_insert(0.0) += p;
    }
    kw
}

#[test]
fn two_signals_at_once_share_the_export_limit() {
    let broker = Mosquitto::start();
    let mut g = Gateway::start(&broker, "site150", "ack_timeout_seconds: 2, limits: { export_kw: 150 }");
    let mut op = operator(&broker, &g.prefix);
    let fleet = (0..4).map(|i| vehicle(&format!("ev{i}"), 0.9, 100.0, Behaviour::Prompt)).collect();
    let sim = fleet_of(&broker, &g.prefix, fleet);
    await_fleet(&mut op, 4);
    let topic = format!("{}/signals", g.prefix);

    op.publish(&topic, signal("a", "afrr", 150.0, 900));
    let a = op.wait_json(WAIT, "", "signal_id", "a").expect("A's outcome");
    assert!((num(&a, "acknowledged_kw") - 150.0).abs() < 1e-6, "{a}");
    op.publish(&topic, signal("b", "fcr", 150.0, 900));
    let b = op.wait_json(WAIT, "", "signal_id", "b").expect("B's outcome");
    assert!(num(&b, "acknowledged_kw") < 1e-6, "the connection is full with A: {b}");
    assert!((num(&b, "shortfall_kw") - 150.0).abs() < 1e-6, "{b}");

    let orders = in_force(&mut op, Duration::from_millis(300));
    let total: f64 = orders.values().map(|(_, kw)| kw).sum();
    assert!(total <= 150.0 + 1e-6, "{total} kW ordered on a 150 kW connection: {orders:?}");
    let cap = op
        .wait_for(WAIT, |t, p| {
            let v: Value = serde_json::from_slice(p).ok()?;
            (t.ends_with("/capacity") && v["up_kw"].as_f64()? < 1e-6).then_some(v)
        })
        .expect("the capacity says nothing is free upwards");
    assert!(num(&cap, "down_kw") >= 0.0);
    assert!(g.terminate().success());
    sim.stop();
}

#[test]
fn overlapping_signals_never_order_a_vehicle_beyond_its_rating_and_a_short_window_frees_it() {
    let broker = Mosquitto::start();
    let mut g = Gateway::start(&broker, "ratings", "ack_timeout_seconds: 2");
    let mut op = operator(&broker, &g.prefix);
    let fleet = (0..2).map(|i| vehicle(&format!("ev{i}"), 0.9, 100.0, Behaviour::Prompt)).collect();
    let sim = fleet_of(&broker, &g.prefix, fleet);
    await_fleet(&mut op, 2);
    let topic = format!("{}/signals", g.prefix);

    // A: 150 kW for 4 s; B, while A runs: only 50 kW of rating is left.
    op.publish(&topic, signal("a", "afrr", 150.0, 4));
    let a = op.wait_json(WAIT, "", "signal_id", "a").expect("A's outcome");
    assert!((num(&a, "acknowledged_kw") - 150.0).abs() < 1e-6, "{a}");
    op.publish(&topic, signal("b", "fcr", 150.0, 900));
    let b = op.wait_json(WAIT, "", "signal_id", "b").expect("B's outcome");
    assert!((num(&b, "acknowledged_kw") - 50.0).abs() < 1e-6, "{b}");
    let orders = in_force(&mut op, Duration::from_millis(300));
    for (vehicle, kw) in per_vehicle(&orders) {
        assert!(kw <= 100.0 + 1e-6, "{vehicle} ordered {kw} kW in all, above its 100 kW rating");
    }

    // A's window ends: its 150 kW are free again for C.
    std::thread::sleep(Duration::from_secs(4));
    op.publish(&topic, signal("c", "mfrr", 150.0, 900));
    let c = op.wait_json(WAIT, "", "signal_id", "c").expect("C's outcome");
    assert!((num(&c, "acknowledged_kw") - 150.0).abs() < 1e-6, "A's window has ended: {c}");
    assert!(g.terminate().success());
    sim.stop();
}

#[test]
fn a_stream_of_twenty_setpoints_never_stacks() {
    let broker = Mosquitto::start();
    let mut g = Gateway::start(&broker, "stream", "ack_timeout_seconds: 2");
    let mut op = operator(&broker, &g.prefix);
    let fleet = (0..3).map(|i| vehicle(&format!("ev{i}"), 0.9, 100.0, Behaviour::Prompt)).collect();
    let sim = fleet_of(&broker, &g.prefix, fleet);
    await_fleet(&mut op, 3);
    let topic = format!("{}/signals", g.prefix);
    let mut last = 0.0;
    for k in 0..20 {
        last = if k % 2 == 0 { 250.0 } else { 120.0 + k as f64 };
        let mut s = json!({"id": format!("sp{k}"), "type": "afrr", "direction": "up", "power_kw": last});
        if k > 0 {
            s["replaces"] = json!(format!("sp{}", k - 1));
        }
        op.publish(&topic, s.to_string());
        std::thread::sleep(Duration::from_millis(150));
    }
    op.wait_json(WAIT, "", "signal_id", "sp19").expect("the last setpoint's outcome");
    let orders = in_force(&mut op, Duration::from_millis(500));
    let total: f64 = orders.values().map(|(_, kw)| kw).sum();
    assert!((total - last).abs() < 1e-6, "in force: {total} kW, the last setpoint is {last} kW: {orders:?}");
    for (vehicle, kw) in per_vehicle(&orders) {
        assert!(kw <= 100.0 + 1e-6, "{vehicle}: {kw} kW");
    }
    assert!(g.events(Some("OrderCancelled")).len() >= 19, "each replacement withdraws the orders it replaces");
    let err = json!({"id": "late", "type": "afrr", "direction": "up", "power_kw": 10, "replaces": "sp3"});
    op.publish(&topic, err.to_string());
    let e = op.wait_error(WAIT, "replaces").expect("replacing an already replaced signal is an error");
    assert!(e["error"].as_str().unwrap().contains("sp3"), "{e}");
    assert!(g.terminate().success());
    sim.stop();
}

#[test]
fn a_stream_whose_last_setpoint_got_nothing_goes_on_after_a_restart() {
    let broker = Mosquitto::start();
    let mut g = Gateway::start(&broker, "stream-restart", "ack_timeout_seconds: 2");
    let mut op = operator(&broker, &g.prefix);
    let sim = fleet_of(&broker, &g.prefix, vec![vehicle("ev0", 0.9, 100.0, Behaviour::Prompt)]);
    await_fleet(&mut op, 1);
    let topic = format!("{}/signals", g.prefix);
    // A takes the whole vehicle, so setpoint sp1 of the stream gets nothing.
    op.publish(&topic, signal("a", "afrr", 100.0, 900));
    op.wait_json(WAIT, "", "signal_id", "a").expect("A's outcome");
    op.publish(&topic, signal("sp1", "fcr", 40.0, 900));
    let sp1 = op.wait_json(WAIT, "", "signal_id", "sp1").expect("sp1's outcome");
    assert!(num(&sp1, "allocated_kw") < 1e-9, "nothing left for sp1: {sp1}");

    g.kill();
    g.restart();
    std::thread::sleep(Duration::from_secs(1));
    op.seen.clear();
    let sp2 =
        json!({"id": "sp2", "type": "fcr", "direction": "up", "power_kw": 30, "duration_s": 900, "replaces": "sp1"});
    op.publish(&topic, sp2.to_string());
    let out = op
        .wait_for(WAIT, |t, p| {
            let v: Value = serde_json::from_slice(p).ok()?;
            (t.ends_with("/errors") || v["signal_id"] == "sp2").then_some((t.to_owned(), v))
        })
        .expect("an answer to sp2");
    assert!(out.0.contains("/dispatches/"), "the stream goes on after the restart: {out:?}");
    assert!(g.terminate().success());
    sim.stop();
}

#[test]
fn an_order_left_unanswered_is_cancelled_before_the_fallback_orders_go_out() {
    let broker = Mosquitto::start();
    let mut g = Gateway::start(&broker, "cancel", "ack_timeout_seconds: 1, strategy: equal");
    let mut op = operator(&broker, &g.prefix);
    let fleet = vec![vehicle("ok", 0.9, 20.0, Behaviour::Prompt), vehicle("mute", 0.9, 20.0, Behaviour::Silent)];
    let sim = fleet_of(&broker, &g.prefix, fleet);
    await_fleet(&mut op, 2);
    op.publish(&format!("{}/signals", g.prefix), signal("s", "afrr", 30.0, 900));
    let out = op.wait_json(WAIT, "", "signal_id", "s").expect("an outcome");
    assert_eq!(out["vehicles"]["timed_out"], 1, "{out}");
    let order_msgs: Vec<Value> = op
        .seen
        .iter()
        .filter(|(t, _)| t.ends_with("/order"))
        .filter_map(|(_, p)| serde_json::from_slice(p).ok())
        .collect();
    let cancel = order_msgs.iter().position(|v| v["cancel"] == true).expect("a cancel on the order topic");
    assert_eq!(order_msgs[cancel]["vehicle_id"], "mute");
    assert!(order_msgs[cancel]["reason"].as_str().unwrap().contains("deadline"), "{}", order_msgs[cancel]);
    let fallback = order_msgs.iter().position(|v| v["attempt"] == 2).expect("a fallback order");
    assert!(cancel < fallback, "the cancel goes out before the fallback's order: {order_msgs:?}");
    let cancelled = g.events(Some("OrderCancelled"));
    assert_eq!(cancelled.len(), 1);
    let fallback_seq = g.events(Some("FallbackApplied"))[0]["seq"].as_u64().unwrap();
    assert!(cancelled[0]["seq"].as_u64().unwrap() < fallback_seq, "recorded before the fallback");
    // The silent vehicle wakes up and accepts the cancelled order: recorded and ignored.
    let late = json!({"order_id": order_msgs[cancel]["order_id"], "status": "accepted"});
    op.publish(&format!("{}/vehicles/mute/ack", g.prefix), late.to_string());
    op.wait_for(WAIT, |t, _| t.ends_with("/errors").then_some(())).expect("the late ACK is answered");
    assert!(g.terminate().success());
    assert_eq!(sim.stop().cancels, 1);
    // In the log, the ignored ACK sits with its dispatch's rows.
    let ignored = g.events(Some("InputRejected"));
    let late_row = ignored.iter().find(|e| e["actor"] == "vehicle/mute").expect("the late ACK recorded");
    assert_eq!(late_row["correlation_id"], out["dispatch_id"], "{late_row}");
}

#[test]
fn a_restart_keeps_the_fleet_and_the_power_already_committed_even_after_compaction() {
    let broker = Mosquitto::start();
    let mut g = Gateway::start(&broker, "restart", "ack_timeout_seconds: 2");
    let mut op = operator(&broker, &g.prefix);
    let fleet = (0..2).map(|i| vehicle(&format!("ev{i}"), 0.9, 100.0, Behaviour::Prompt)).collect();
    let sim = fleet_of(&broker, &g.prefix, fleet);
    await_fleet(&mut op, 2);
    let topic = format!("{}/signals", g.prefix);
    op.publish(&topic, signal("a", "afrr", 120.0, 900));
    op.wait_json(WAIT, "", "signal_id", "a").expect("A's outcome");

    // SIGKILL: the accepted 120 kW stay committed across the restart.
    g.kill();
    g.restart();
    std::thread::sleep(Duration::from_secs(1));
    op.publish(&topic, signal("b", "fcr", 150.0, 900));
    let b = op.wait_json(WAIT, "", "signal_id", "b").expect("B's outcome after a crash");
    assert!(
        (num(&b, "acknowledged_kw") - 80.0).abs() < 1e-6,
        "the fleet is known and A's power is still committed: {b}"
    );

    // SIGTERM: accepted orders stay in force too, and the fleet is there at once.
    assert!(g.terminate().success());
    g.restart();
    std::thread::sleep(Duration::from_secs(1));
    op.publish(&topic, signal("c", "mfrr", 10.0, 900));
    let c = op.wait_json(WAIT, "", "signal_id", "c").expect("C's outcome after a graceful restart");
    assert!(num(&c, "acknowledged_kw") < 1e-6, "everything is committed to A and B: {c}");
    let plans = g.events(Some("DispatchPlanCreated"));
    let last = plans.last().unwrap();
    assert_eq!(last["payload"]["allocated_kw"], 0.0, "no capacity left on either vehicle");
    assert_eq!(last["payload"]["fleet"]["vehicles"], 2, "both known");
    let constraint = g.events(Some("ConstraintApplied"));
    let excluded = constraint.last().unwrap()["payload"]["excluded"].as_object().cloned().unwrap_or_default();
    let left_out: usize = excluded.values().filter_map(|ids| ids.as_array()).map(Vec::len).sum();
    assert_eq!(left_out, 2, "both known: {excluded:?}");
    let ids: Vec<&str> = plans.iter().filter_map(|e| e["correlation_id"].as_str()).collect();
    let unique: std::collections::BTreeSet<&&str> = ids.iter().collect();
    assert_eq!(unique.len(), ids.len(), "dispatch ids stay unique across restarts: {ids:?}");

    // Compacted to nothing but its snapshot, the log still holds all of it.
    assert!(g.terminate().success());
    let now = gridweaver_core::time::Timestamp::from_millis(
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as i64 + 1,
    );
    let out = gridweaver().args(["compact", "--before", &now.to_string(), "--db"]).arg(&g.db).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(g.events(None).len(), 1, "only the snapshot is left");
    g.restart();
    std::thread::sleep(Duration::from_secs(1));
    op.publish(&topic, signal("a", "afrr", 120.0, 900));
    op.wait_error(WAIT, "already received").expect("a signal from before the compaction is still a duplicate");
    op.publish(&topic, signal("d", "mfrr", 10.0, 900));
    let d = op.wait_json(WAIT, "", "signal_id", "d").expect("D's outcome after compaction");
    assert!(num(&d, "acknowledged_kw") < 1e-6, "A's and B's power is still committed: {d}");
    let plans = g.events(Some("DispatchPlanCreated"));
    assert_eq!(plans.len(), 1);
    assert_eq!(plans[0]["payload"]["fleet"]["vehicles"], 2, "both known");
    assert!(!ids.contains(&plans[0]["correlation_id"].as_str().unwrap()), "a new dispatch id");
    assert!(g.terminate().success());
    sim.stop();
}

/// A vehicle that left while the gateway was down (its retained state cleared) is not in
/// the fleet after the restart (a run learns its fleet from the retained states), and the
/// power it had accepted is released: once the states are in, it is recorded lost.
#[test]
fn a_vehicle_gone_while_the_gateway_was_down_is_recorded_lost_at_start_up() {
    let broker = Mosquitto::start();
    let mut g = Gateway::start(&broker, "vanished", "ack_timeout_seconds: 2");
    let mut op = operator(&broker, &g.prefix);
    let fleet = (0..2).map(|i| vehicle(&format!("ev{i}"), 0.9, 50.0, Behaviour::Prompt)).collect();
    let sim = fleet_of(&broker, &g.prefix, fleet);
    await_fleet(&mut op, 2);
    let topic = format!("{}/signals", g.prefix);
    op.publish(&topic, signal("a", "afrr", 60.0, 900));
    let a = op.wait_json(WAIT, "", "signal_id", "a").expect("A's outcome");
    assert!((num(&a, "acknowledged_kw") - 60.0).abs() < 1e-6, "accepted: {a}");
    let ev0 = g.query("SELECT power_kw FROM orders WHERE vehicle_id = 'ev0'");
    let ev0_kw = ev0.first().and_then(|o| o["power_kw"].as_f64()).unwrap_or(0.0);
    assert!(g.terminate().success());
    sim.stop();

    // ev1 leaves while the gateway is down; ev0's state stays retained.
    op.publish_retained(&format!("{}/vehicles/ev1/state", g.prefix), "");
    op.drain(Duration::from_millis(300));
    g.restart();
    let capacity = op
        .wait_for(WAIT, |t, p| {
            let v: Value = serde_json::from_slice(p).ok()?;
            (t.ends_with("/capacity") && v["vehicles"].as_u64() == Some(1)).then_some(v)
        })
        .expect("capacity with one vehicle");
    // The event is durable shortly after the capacity goes out.
    let mut lost = g.events(Some("VehicleLost"));
    for _ in 0..50 {
        if !lost.is_empty() {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
        lost = g.events(Some("VehicleLost"));
    }
    assert_eq!(lost.len(), 1, "{lost:?}");
    assert_eq!(lost[0]["payload"]["vehicle_id"], "ev1");
    assert_eq!(lost[0]["payload"]["released_orders"].as_array().map(Vec::len), Some(1), "{lost:?}");
    assert!(
        (num(&capacity, "up_kw") - (50.0 - ev0_kw)).abs() < 1e-6,
        "ev0 alone, with its {ev0_kw} kW still committed to A: {capacity}"
    );
    assert!(g.terminate().success());
}

/// The broker keeps a signal sent while the gateway was down and delivers it as soon as the
/// session resumes, before the retained vehicle states: it is held until the fleet is
/// learnt, then planned with it (not with an empty fleet, its id used up).
#[test]
fn a_signal_sent_while_the_gateway_was_down_is_planned_with_the_fleet() {
    let broker = Mosquitto::start();
    let mut g = Gateway::start(&broker, "queued", "ack_timeout_seconds: 2");
    let mut op = operator(&broker, &g.prefix);
    let fleet = (0..2).map(|i| vehicle(&format!("ev{i}"), 0.9, 50.0, Behaviour::Prompt)).collect();
    let sim = fleet_of(&broker, &g.prefix, fleet);
    await_fleet(&mut op, 2);
    assert!(g.terminate().success());
    op.publish(&format!("{}/signals", g.prefix), signal("queued", "mfrr", 60.0, 900));
    std::thread::sleep(Duration::from_millis(300));
    g.restart();
    let out = op.wait_json(WAIT, "", "signal_id", "queued").expect("the queued signal's outcome");
    assert!((num(&out, "acknowledged_kw") - 60.0).abs() < 1e-6, "planned with both vehicles: {out}");
    let plan = g.events(Some("DispatchPlanCreated"));
    assert_eq!(plan.last().unwrap()["payload"]["fleet"]["vehicles"], 2, "{plan:?}");
    assert!(g.terminate().success());
    sim.stop();
}

#[test]
fn a_resumed_session_with_a_new_prefix_still_hears_its_fleet() {
    let broker = Mosquitto::start();
    let mut g = Gateway::start_with(&broker, "moved", "client_id: gw-moved", "ack_timeout_seconds: 2");
    let mut op = operator(&broker, &g.prefix);
    await_fleet(&mut op, 0);
    assert!(g.terminate().success());

    g.configure(&broker, "moved", "client_id: gw-moved, prefix: depots/moved", "ack_timeout_seconds: 2");
    g.restart();
    let mut op = operator(&broker, &g.prefix);
    let sim = fleet_of(&broker, &g.prefix, vec![vehicle("ev0", 0.9, 50.0, Behaviour::Prompt)]);
    await_fleet(&mut op, 1);
    op.publish(&format!("{}/signals", g.prefix), signal("s", "afrr", 20.0, 900));
    let out = op.wait_json(WAIT, "", "signal_id", "s").expect("the gateway hears its new prefix");
    assert!((num(&out, "acknowledged_kw") - 20.0).abs() < 1e-6, "{out}");
    assert!(g.terminate().success());
    sim.stop();
}

#[test]
fn smart_delivers_what_overlapping_phase_limits_allow() {
    let broker = Mosquitto::start();
    let mut g = Gateway::start(&broker, "phases", "ack_timeout_seconds: 2, limits: { phase_kw: 20 }");
    let mut op = operator(&broker, &g.prefix);
    let mut fleet: Vec<_> = (0..6)
        .map(|i| {
            let mut v = vehicle(&format!("single{i}"), 0.9, 7.0, Behaviour::Prompt);
            for (k, val) in [("phases", json!(1)), ("phase", json!("L1")), ("price_per_kwh", json!(0.01))] {
                v.extra_state.insert(k.into(), val);
            }
            v
        })
        .collect();
    fleet.extend((0..10).map(|i| {
        let mut v = vehicle(&format!("three{i}"), 0.9, 11.0, Behaviour::Prompt);
        v.extra_state.insert("price_per_kwh".into(), json!(0.5));
        v
    }));
    let sim = fleet_of(&broker, &g.prefix, fleet);
    await_fleet(&mut op, 16);
    let s = json!({"id": "dr60", "type": "dr", "direction": "down", "power_kw": 60});
    op.publish(&format!("{}/signals", g.prefix), s.to_string());
    let out = op.wait_json(WAIT, "", "signal_id", "dr60").expect("an outcome");
    assert!((num(&out, "acknowledged_kw") - 60.0).abs() < 1e-6, "60 kW fit through the three-phase vehicles: {out}");
    assert_eq!(out["strategy"], "smart");
    let plan = g.events(Some("DispatchPlanCreated"));
    assert!(
        plan[0]["payload"]["note"].as_str().unwrap_or_default().contains("repaired"),
        "{}",
        plan[0]["payload"]["note"]
    );
    assert!(g.terminate().success());
    sim.stop();
}

#[test]
fn a_store_that_fails_mid_run_publishes_nothing_unrecorded_refuses_signals_and_recovers() {
    let broker = Mosquitto::start();
    let mut g = Gateway::start(&broker, "diskfull", "ack_timeout_seconds: 2");
    let mut op = operator(&broker, &g.prefix);
    let sim = fleet_of(
        &broker,
        &g.prefix,
        (0..2).map(|i| vehicle(&format!("ev{i}"), 0.9, 50.0, Behaviour::Prompt)).collect(),
    );
    await_fleet(&mut op, 2);
    let topic = format!("{}/signals", g.prefix);
    op.publish(&topic, signal("before", "afrr", 10.0, 2));
    op.wait_json(WAIT, "", "signal_id", "before").expect("a dispatch while the store works");

    // Every write now fails, as on a full disk (a trigger: no mount needed in a test).
    let db = rusqlite::Connection::open(&g.db).unwrap();
    db.busy_timeout(Duration::from_secs(5)).unwrap();
    db.execute_batch(
        "CREATE TRIGGER full BEFORE INSERT ON events BEGIN SELECT RAISE(ABORT, 'database or disk is full'); END;",
    )
    .unwrap();
    op.seen.clear();
    op.publish(&topic, signal("during", "afrr", 10.0, 900));
    let e = op.wait_error(WAIT, "`during`").expect("the signal whose plan could not be recorded is answered");
    assert!(e["error"].as_str().unwrap().contains("disk is full"), "{e}");
    op.publish(&topic, signal("refused", "afrr", 10.0, 900));
    let e = op.wait_error(WAIT, "refused until").expect("new signals are refused while the log cannot be written");
    assert!(e["error"].as_str().unwrap().contains("event log"), "{e}");
    std::thread::sleep(Duration::from_millis(500));
    let orders: Vec<&(String, Vec<u8>)> = op.seen.iter().filter(|(t, _)| t.ends_with("/order")).collect();
    assert!(orders.is_empty(), "nothing unrecorded was ordered: {orders:?}");

    // Space returns: the gateway notices by itself and dispatches again, the signal whose
    // plan was lost included.
    db.execute_batch("DROP TRIGGER full;").unwrap();
    std::thread::sleep(Duration::from_millis(1_500));
    op.publish(&topic, signal("during", "afrr", 10.0, 900));
    let again =
        op.wait_json(WAIT, "", "signal_id", "during").expect("the unrecorded signal, sent again, is dispatched");
    assert!((num(&again, "acknowledged_kw") - 10.0).abs() < 1e-6, "{again}");
    op.publish(&topic, signal("after", "afrr", 10.0, 900));
    let out = op.wait_json(WAIT, "", "signal_id", "after").expect("dispatched once the log works");
    assert!((num(&out, "acknowledged_kw") - 10.0).abs() < 1e-6, "{out}");
    let recovered = g.events(Some("LogRecovered"));
    assert_eq!(recovered.len(), 1, "the outage is on record");
    assert!(recovered[0]["payload"]["signals_refused"].as_u64().unwrap() >= 1);
    // Every order on the wire has its OrderSent in the log.
    let sent: std::collections::BTreeSet<String> =
        g.query("SELECT order_id FROM orders").iter().map(|r| r["order_id"].as_str().unwrap().to_owned()).collect();
    for (t, p) in op.seen.iter().filter(|(t, _)| t.ends_with("/order")) {
        let v: Value = serde_json::from_slice(p).unwrap();
        assert!(sent.contains(v["order_id"].as_str().unwrap()), "{t}: {v} is not in the log");
    }
    assert!(g.terminate().success());
    sim.stop();
}

#[test]
fn a_flood_is_bounded_by_admission_and_a_fresh_signal_is_dispatched_after_it() {
    let broker = Mosquitto::start();
    let mut g = Gateway::start(&broker, "flood", "ack_timeout_seconds: 2, max_in_flight: 4");
    let mut op = operator(&broker, &g.prefix);
    let sim = fleet_of(
        &broker,
        &g.prefix,
        (0..4).map(|i| vehicle(&format!("ev{i}"), 0.9, 50.0, Behaviour::Silent)).collect(),
    );
    await_fleet(&mut op, 4);
    let topic = format!("{}/signals", g.prefix);
    // Silent vehicles: every dispatch waits its full 2 s, so at most 4 can be in flight.
    for k in 0..3_000 {
        op.publish(&topic, signal(&format!("f{k}"), "fcr", 0.5, 900));
        if k % 3 == 0 {
            op.publish(
                &format!("{}/vehicles/ev{}/state", g.prefix, k % 4),
                common::state(0.5 + (k % 40) as f64 / 100.0, 50.0),
            );
        }
    }
    std::thread::sleep(Duration::from_secs(3));
    op.publish(&topic, signal("fresh", "afrr", 1.0, 900));
    op.wait_json(Duration::from_secs(30), "", "signal_id", "fresh")
        .expect("a fresh signal is dispatched after the flood");

    let mut live = 0i64;
    let mut most = 0i64;
    for e in g.events(None) {
        match e["kind"].as_str() {
            Some("DispatchPlanCreated") => live += 1,
            Some("DispatchCompleted") => live -= 1,
            _ => {}
        }
        most = most.max(live);
    }
    assert!(most <= 4, "{most} dispatches were in flight at once, more than dispatch.max_in_flight");
    assert!(g.terminate().success());
    // Refusals of one reason within a second share a row that counts them.
    let rows = g.events(Some("SignalRejected"));
    let busy: u64 = rows
        .iter()
        .filter(|e| {
            let why = e["payload"]["error"].as_str().unwrap_or_default();
            why.contains("max_in_flight") || why.contains("the gateway is behind")
        })
        .map(|e| e["payload"]["count"].as_u64().unwrap_or(1))
        .sum();
    assert!(busy > 100, "the flood beyond admission is refused and recorded ({busy})");
    assert!(rows.len() < 100, "a flood of refusals is a few rows, not one each ({} rows)", rows.len());
    sim.stop();
}

/// Fallbacks amid a stream of overlapping signals: a fallback runs in the step that
/// settles its attempt, so no signal planned meanwhile can take the room it counted on.
/// Every order accepted stays within the site limit and each vehicle's rating, and
/// `gridweaver audit` reproduces every plan and every fallback of the log.
#[test]
fn fallbacks_amid_overlapping_signals_keep_the_limits_and_audit_clean() {
    let broker = Mosquitto::start();
    let dispatch = "ack_timeout_seconds: 1, fallback: balanced, strategy: smart, limits: { export_kw: 100 }";
    let mut g = Gateway::start(&broker, "overlap", dispatch);
    let mut op = operator(&broker, &g.prefix);
    let behaviours = [Behaviour::Prompt, Behaviour::Silent, Behaviour::Rejecting];
    let fleet = (0..12).map(|i| vehicle(&format!("ev{i:02}"), 0.8, 22.0, behaviours[i % 3])).collect();
    let sim = fleet_of(&broker, &g.prefix, fleet);
    await_fleet(&mut op, 12);
    let topic = format!("{}/signals", g.prefix);
    // 4 kW every 8 ms, all in force for 15 minutes: while the first ones time out and fall
    // back, new ones are still being planned for the same room.
    for k in 0..150 {
        op.publish(&topic, signal(&format!("o{k}"), "afrr", 4.0, 900));
        std::thread::sleep(Duration::from_millis(8));
    }
    op.publish(&topic, signal("last", "afrr", 4.0, 900));
    op.wait_json(WAIT, "", "signal_id", "last").expect("the last signal settles");
    std::thread::sleep(Duration::from_secs(3));
    assert!(g.terminate().success());
    sim.stop();

    let accepted = g.query(
        "SELECT vehicle_id, SUM(power_kw) AS kw FROM order_answers WHERE answer = 'accepted' GROUP BY vehicle_id",
    );
    let total: f64 = accepted.iter().map(|r| num(r, "kw")).sum();
    assert!(total <= 100.0 + 1e-6, "{total} kW accepted on a 100 kW export limit: {accepted:?}");
    assert!(total > 80.0, "the prompt vehicles are filled up to their 88 kW ({total})");
    for r in &accepted {
        assert!(num(r, "kw") <= 22.0 + 1e-6, "a 22 kW vehicle holds {r}");
    }
    let fallbacks = g.query("SELECT COUNT(*) AS n FROM events WHERE kind = 'FallbackApplied'");
    assert!(num(&fallbacks[0], "n") > 0.0, "silent vehicles' shares went to the fallback");

    let out = gridweaver().args(["audit", "--json", "--db"]).arg(&g.db).output().expect("audit");
    let report: Value = serde_json::from_slice(&out.stdout).expect("a JSON report");
    assert!(out.status.success(), "{report}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(report["report"]["fallbacks"].as_u64() > Some(0), "{report}");
    assert_eq!(report["report"]["findings"].as_array().map(Vec::len), Some(0), "{report}");
}
