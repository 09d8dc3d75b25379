//! Optimal and adaptive dispatch over real MQTT: LP-first under site, group and phase
//! limits, the fall back to Smart when the LP fails, and tuned weights that survive a
//! restart.

mod common;

use std::time::Duration;

use common::{await_fleet, fleet_of, operator, vehicle, Gateway, Mosquitto};
use gridweaver_actors::sim::{Behaviour, SimVehicle};
use serde_json::{json, Value};

const WAIT: Duration = Duration::from_secs(15);

/// Eight vehicles: four single-phase on L1 in feeder f1, four three-phase in feeder f2.
fn depot() -> Vec<SimVehicle> {
    (0..8)
        .map(|i| {
            let mut v = vehicle(&format!("ev{i}"), 0.9, 15.0, Behaviour::Prompt);
            let extra = if i < 4 {
                json!({"group": "f1", "phases": 1, "phase": "L1", "priority": 1.0})
            } else {
                json!({"group": "f2", "priority": 0.0})
            };
            v.extra_state = extra.as_object().cloned().unwrap_or_default();
            v
        })
        .collect()
}

const LIMITS: &str = "limits: { export_kw: 70, phase_kw: 20, groups: { f1: 30, f2: 45 } }";

fn plan_of(g: &Gateway, dispatch_id: &str) -> Value {
    g.events(Some("DispatchPlanCreated"))
        .into_iter()
        .find(|e| e["correlation_id"] == dispatch_id)
        .map(|e| e["payload"].clone())
        .expect("a DispatchPlanCreated event")
}

fn fcr(id: &str, kw: f64) -> String {
    json!({"id": id, "type": "fcr", "direction": "up", "power_kw": kw, "duration_s": 300}).to_string()
}

#[test]
fn fcr_with_lp_first_takes_the_lp_path_and_respects_every_limit() {
    let broker = Mosquitto::start();
    let mut g =
        Gateway::start(&broker, "lpsite", &format!("ack_timeout_seconds: 3, lp_first: {{ fcr: true }}, {LIMITS}"));
    let mut op = operator(&broker, &g.prefix);
    let sim = fleet_of(&broker, &g.prefix, depot());
    await_fleet(&mut op, 8);

    op.publish(&format!("{}/signals", g.prefix), fcr("f-1", 100.0));
    let out = op.wait_json(WAIT, "", "signal_id", "f-1").expect("an outcome");
    assert_eq!(out["strategy"], "lp", "{out}");
    let plan = plan_of(&g, out["dispatch_id"].as_str().unwrap());
    assert_eq!(plan["solver"]["status"], "Solved", "{plan}");
    assert!(plan["solver"]["iterations"].as_u64() > Some(0));
    assert!(plan["solver"]["solve_time_ms"].as_f64().is_some());
    // L1 (20 kW) binds: single-phase vehicles carry at most 20 kW, three-phase ones a third of
    // theirs per phase; the export limit (70) and the feeders hold too.
    for row in plan["limit_loads"].as_array().unwrap() {
        assert!(row["load_kw"].as_f64().unwrap() <= row["cap_kw"].as_f64().unwrap() + 1e-6, "{row}");
    }
    let orders = g.query("SELECT vehicle_id, power_kw FROM orders");
    let kw = |pred: &dyn Fn(usize) -> bool| -> f64 {
        orders
            .iter()
            .filter(|o| pred(o["vehicle_id"].as_str().unwrap()[2..].parse().unwrap()))
            .map(|o| o["power_kw"].as_f64().unwrap())
            .sum()
    };
    let (single, three) = (kw(&|i| i < 4), kw(&|i| i >= 4));
    assert!(single <= 20.0 + 1e-6, "L1 limit: {single}");
    assert!(single + three / 3.0 <= 20.0 + 1e-6, "L1 carries the single-phase power and a third of the rest");
    assert!(single + three <= 70.0 + 1e-6, "export limit");
    // The LP fills the phases the best way: 20 kW on L1 in all, 45 kW through f2's three-phase chargers.
    assert!((out["acknowledged_kw"].as_f64().unwrap() - (single + three)).abs() < 1e-6);
    assert!(single + three > 44.0, "the LP should reach the feeder limit of f2: {single} + {three}");

    // A signal type without LP-first runs Smart under the same limits, and says why.
    op.publish(
        &format!("{}/signals", g.prefix),
        json!({"id": "a-1", "type": "afrr", "direction": "up", "power_kw": 100}).to_string(),
    );
    let smart = op.wait_json(WAIT, "", "signal_id", "a-1").expect("an outcome");
    assert_eq!(smart["strategy"], "smart");
    let plan = plan_of(&g, smart["dispatch_id"].as_str().unwrap());
    assert!(plan["note"].as_str().unwrap().contains("lp_first is not set for afrr"), "{plan}");
    for row in plan["limit_loads"].as_array().unwrap() {
        assert!(row["load_kw"].as_f64().unwrap() <= row["cap_kw"].as_f64().unwrap() + 1e-6, "{row}");
    }
    assert!(g.terminate().success());
    sim.stop();
}

#[test]
fn an_lp_that_cannot_be_solved_falls_back_to_smart_and_the_events_say_so() {
    let broker = Mosquitto::start();
    let mut g = Gateway::start(
        &broker,
        "lpfail",
        &format!("ack_timeout_seconds: 3, lp_first: {{ fcr: true }}, lp: {{ max_iterations: 1 }}, {LIMITS}"),
    );
    let mut op = operator(&broker, &g.prefix);
    let sim = fleet_of(&broker, &g.prefix, depot());
    await_fleet(&mut op, 8);
    op.publish(&format!("{}/signals", g.prefix), fcr("f-2", 100.0));
    let out = op.wait_json(WAIT, "", "signal_id", "f-2").expect("an outcome");
    assert_eq!(out["strategy"], "smart", "{out}");
    let plan = plan_of(&g, out["dispatch_id"].as_str().unwrap());
    assert_eq!(plan["strategy"], "smart");
    assert_eq!(plan["solver"]["status"], "MaxIterations", "{plan}");
    assert!(plan["note"].as_str().unwrap().contains("Smart strategy ran instead"), "{plan}");
    for row in plan["limit_loads"].as_array().unwrap() {
        assert!(row["load_kw"].as_f64().unwrap() <= row["cap_kw"].as_f64().unwrap() + 1e-6, "{row}");
    }
    assert!(g.terminate().success());
    sim.stop();
}

#[test]
fn tuned_weights_are_recorded_and_survive_a_restart() {
    let broker = Mosquitto::start();
    let mut g = Gateway::start(&broker, "tune", "ack_timeout_seconds: 1, fallback: noop");
    let mut op = operator(&broker, &g.prefix);
    // Half the fleet never answers: the ACK rate is low, so the availability weight rises.
    let fleet: Vec<SimVehicle> = (0..6)
        .map(|i| vehicle(&format!("t{i}"), 0.8, 10.0, if i % 2 == 0 { Behaviour::Prompt } else { Behaviour::Silent }))
        .collect();
    let sim = fleet_of(&broker, &g.prefix, fleet);
    await_fleet(&mut op, 6);
    for k in 0..2 {
        let id = format!("m-{k}");
        op.publish(
            &format!("{}/signals", g.prefix),
            json!({"id": id, "type": "mfrr", "direction": "up", "power_kw": 30}).to_string(),
        );
        op.wait_json(WAIT, "", "signal_id", id.as_str()).expect("an outcome");
    }
    std::thread::sleep(Duration::from_millis(300));
    let tuned = g.events(Some("WeightsTuned"));
    assert_eq!(tuned.len(), 2, "one change per low-ACK dispatch");
    let last = tuned.last().unwrap()["payload"]["after"].clone();
    assert_eq!(tuned[0]["payload"]["signal_type"], "mfrr");
    assert!(last["availability"].as_f64() > tuned[0]["payload"]["before"]["availability"].as_f64());

    assert!(g.terminate().success());
    g.restart();
    await_fleet(&mut op, 6);
    op.publish(
        &format!("{}/signals", g.prefix),
        json!({"id": "m-after", "type": "mfrr", "direction": "up", "power_kw": 5}).to_string(),
    );
    let out = op.wait_json(WAIT, "", "signal_id", "m-after").expect("an outcome after the restart");
    let plan = plan_of(&g, out["dispatch_id"].as_str().unwrap());
    assert_eq!(plan["weights"], last, "the restarted gateway dispatches with the tuned weights");
    assert!(g.terminate().success());
    sim.stop();
}
