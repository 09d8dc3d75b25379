use std::collections::{BTreeMap, BTreeSet};

use super::*;
use crate::allocation::filter::{SimpleVehicleFilter, VehicleFilter};
use crate::allocation::{Dispatcher, EqualDispatcher, SmartDispatcher};
use crate::events::EventKind;
use crate::model::{Direction, SignalType, VehicleCounts};
use proptest::prelude::*;

const T0: Timestamp = Timestamp::from_millis(1_795_000_000_000);

fn planner(fallback: FallbackKind) -> Engine {
    planner_with(fallback, Box::new(SmartDispatcher::default()))
}

fn planner_with(fallback: FallbackKind, strategy: Box<dyn Dispatcher>) -> Engine {
    let cfg = EngineConfig { region: "north".into(), ack_timeout_ms: 2_000, fallback, ..EngineConfig::default() };
    Engine::new(Planner::new(cfg, Box::new(SimpleVehicleFilter), strategy))
}

fn with_fleet(mut p: Engine, fleet: &[Vehicle]) -> Engine {
    for v in fleet {
        p.on_state(T0, v.id.clone(), Some(v.clone()));
    }
    p
}

fn fleet(n: usize) -> Vec<Vehicle> {
    (0..n).map(|i| Vehicle::new(format!("v{i:02}"), 0.5 + 0.04 * i as f64, 60.0, 10.0)).collect()
}

fn signal(id: &str, kw: f64) -> Signal {
    Signal::new(id, SignalType::Afrr, Direction::Up, kw, T0)
}

fn ack(o: &Order, status: AckStatus) -> Ack {
    Ack { order_id: o.order_id.to_string(), status, reason: None }
}

fn kinds(step: &Step) -> Vec<EventKind> {
    step.events.iter().map(|e| e.kind).collect()
}

#[test]
fn all_vehicles_ack_and_the_dispatch_completes_without_fallback() {
    let mut p = with_fleet(planner(FallbackKind::Balanced), &fleet(4));
    let step = p.on_signal(T0, signal("s1", 30.0)).unwrap();
    assert_eq!(
        kinds(&step)[..3],
        [EventKind::SignalReceived, EventKind::ConstraintApplied, EventKind::DispatchPlanCreated]
    );
    assert_eq!(step.orders.len(), 4);
    assert!(step.events[3..].iter().all(|e| e.kind == EventKind::OrderSent));
    assert_eq!(step.deadline, Some(T0.plus_millis(2_000)));
    let total: f64 = step.orders.iter().map(|o| o.power_kw).sum();
    assert!((total - 30.0).abs() < 1e-9);

    let book = &mut p;
    let mut last = Step::default();
    for o in &step.orders {
        last = book.on_ack(T0.plus_millis(10), &o.vehicle_id, &ack(o, AckStatus::Accepted)).unwrap();
    }
    let out = last.outcomes.first().cloned().expect("settles when the last ACK arrives");
    assert_eq!(kinds(&last), [EventKind::AckReceived, EventKind::DispatchCompleted]);
    assert!((out.acknowledged_kw - 30.0).abs() < 1e-9 && out.shortfall_kw < 1e-9);
    assert_eq!(out.vehicles, VehicleCounts { accepted: 4, rejected: 0, timed_out: 0 });
    assert!(book.book().is_empty());
}

#[test]
fn silent_vehicles_time_out_and_the_fallback_asks_those_that_accepted() {
    let mut p = with_fleet(planner_with(FallbackKind::Balanced, Box::new(EqualDispatcher)), &fleet(4));
    let step = p.on_signal(T0, signal("s1", 24.0)).unwrap();
    let book = &mut p;
    // Two answer, two stay silent.
    for o in &step.orders[..2] {
        let s = book.on_ack(T0.plus_millis(5), &o.vehicle_id, &ack(o, AckStatus::Accepted)).unwrap();
        assert!(s.outcomes.is_empty() && s.orders.is_empty());
    }
    // The ACKs' record is an engine deadline of its own, due before the ACK window ends;
    // the settlement at the window records them itself (nothing is left to record after).
    assert_eq!(book.next_deadline(), Some(T0.plus_millis(5 + ACK_RECORD_DELAY_MS)));
    let deadline = T0.plus_millis(book.planner().config().ack_timeout_ms);
    let mut steps = book.on_timeout(deadline);
    assert_eq!(steps.len(), 1);
    let step2 = steps.remove(0);
    assert_eq!(
        kinds(&step2)[..4],
        [EventKind::AckReceived, EventKind::AckTimedOut, EventKind::OrderCancelled, EventKind::FallbackApplied],
        "the two ACKs in one event, then the two timeouts and the two cancels, one event each, then the fallback in the same step"
    );
    assert_eq!(step2.events[0].payload_value()["accepted"], serde_json::json!([1, 2]));
    assert_eq!(step2.events[1].payload_value()["orders"], serde_json::json!([3, 4]));
    assert_eq!(step2.events[2].payload_value()["orders"], serde_json::json!([[1, 3], [1, 4]]));
    let silent: Vec<&str> = step.orders[2..].iter().map(|o| o.order_id.as_str()).collect();
    let cancelled: Vec<&str> = step2.cancels.iter().map(|c| c.order_id.as_str()).collect();
    assert_eq!(cancelled, silent, "the silent vehicles' orders are withdrawn before the fallback runs");
    assert!(step2.cancels.iter().all(|c| c.cancel && c.reason.contains("deadline")));
    let applied = step2.events[3].payload_value();
    assert_eq!(applied["candidates"].as_array().map(Vec::len), Some(2), "the two that accepted are asked");
    assert_eq!(applied["residual_kw"], 12.0);
    assert_eq!(step2.events.last().map(|e| e.kind), Some(EventKind::OrderSent));
    // Each accepted 6 kW of 10 kW: 4 kW left each, 8 kW in all.
    let placed: f64 = step2.orders.iter().map(|o| o.power_kw).sum();
    assert!((placed - 8.0).abs() < 1e-9, "{placed}");
    assert!(step2.orders.iter().all(|o| o.attempt == 2));

    let mut last = Step::default();
    for o in &step2.orders {
        last = book.on_ack(deadline.plus_millis(5), &o.vehicle_id, &ack(o, AckStatus::Accepted)).unwrap();
    }
    let out = last.outcomes.pop().unwrap();
    assert!((out.acknowledged_kw - 20.0).abs() < 1e-9);
    assert!((out.shortfall_kw - 4.0).abs() < 1e-9);
    assert_eq!(out.vehicles, VehicleCounts { accepted: 4, rejected: 0, timed_out: 2 });
    assert_eq!(out.fallback, FallbackKind::Balanced);
}

#[test]
fn a_window_over_by_its_ack_deadline_gets_no_fallback() {
    let mut p = with_fleet(planner_with(FallbackKind::Balanced, Box::new(EqualDispatcher)), &fleet(4));
    let mut short = signal("s1", 24.0);
    short.duration_s = 1;
    let step = p.on_signal(T0, short).unwrap();
    for o in &step.orders[..2] {
        p.on_ack(T0.plus_millis(5), &o.vehicle_id, &ack(o, AckStatus::Accepted)).unwrap();
    }
    // The 2 s ACK deadline comes after the 1 s window: nothing is left to deliver.
    let mut steps = p.on_timeout(T0.plus_millis(2_000));
    let done = steps.remove(0);
    assert!(done.orders.is_empty() && done.fallback.is_none(), "no fallback orders for a window that is over");
    assert!(!kinds(&done).contains(&EventKind::FallbackApplied));
    assert_eq!(done.cancels.len(), 2, "the silent orders are still withdrawn");
    let out = done.outcomes.first().expect("it completes at once");
    assert!((out.shortfall_kw - 12.0).abs() < 1e-9);
}

#[test]
fn restarted_windows_run_their_whole_ack_timeout_again() {
    let mut p = with_fleet(planner(FallbackKind::Balanced), &fleet(4));
    let step = p.on_signal(T0, signal("s1", 24.0)).unwrap();
    assert_eq!(p.next_deadline(), Some(T0.plus_millis(2_000)));
    // The link came back 5 s later: the window counts from then.
    let back = T0.plus_millis(5_000);
    let restarted = p.restart_windows(T0.plus_millis(100), back);
    assert_eq!(kinds(&restarted), [EventKind::BrokerReconnected]);
    let named = &restarted.events[0].payload_value()["windows_restarted"];
    assert_eq!(named, &serde_json::json!([step.orders[0].dispatch_id]));
    assert_eq!(p.next_deadline(), Some(back.plus_millis(2_000)));
    assert!(p.on_timeout(back.plus_millis(1_999)).is_empty(), "nothing times out inside the new window");
    let o = &step.orders[0];
    let late_but_inside = p.on_ack(back.plus_millis(1_000), &o.vehicle_id, &ack(o, AckStatus::Accepted));
    assert!(late_but_inside.is_ok(), "an ACK after the first window but inside the restarted one counts");
}

#[test]
fn segments_without_fallback_are_never_asked_twice() {
    let mut fleet = fleet(3);
    fleet[0].segment = Some("buses".into());
    fleet[1].segment = Some("vans".into());
    let cfg = EngineConfig {
        ack_timeout_ms: 1_000,
        no_fallback_segments: BTreeSet::from(["buses".to_owned()]),
        ..EngineConfig::default()
    };
    let mut p = Engine::new(Planner::new(cfg, Box::new(SimpleVehicleFilter), Box::new(EqualDispatcher)));
    for v in &fleet {
        p.on_state(T0, v.id.clone(), Some(v.clone()));
    }
    let step = p.on_signal(T0, signal("s1", 24.0)).unwrap();
    let book = &mut p;
    // All but the last accept: the residual goes to the fallback round.
    for o in &step.orders[..2] {
        book.on_ack(T0, &o.vehicle_id, &ack(o, AckStatus::Accepted)).unwrap();
    }
    let steps = book.on_timeout(T0.plus_millis(1_000));
    let applied = steps[0].events.iter().find(|e| e.kind == EventKind::FallbackApplied).expect("a fallback round");
    let applied = applied.payload_value();
    let asked: Vec<&str> = applied["candidates"].as_array().unwrap().iter().filter_map(|c| c[0].as_str()).collect();
    assert_eq!(asked, ["v01"], "the bus (fallback: false) is not asked again");
}

#[test]
fn rejections_count_and_noop_leaves_the_shortfall() {
    let mut p = with_fleet(planner(FallbackKind::Noop), &fleet(3));
    let step = p.on_signal(T0, signal("s1", 30.0)).unwrap();
    let book = &mut p;
    let mut last = Step::default();
    for (i, o) in step.orders.iter().enumerate() {
        let status = if i == 0 { AckStatus::Rejected } else { AckStatus::Accepted };
        last = book.on_ack(T0, &o.vehicle_id, &ack(o, status)).unwrap();
    }
    let out = last.outcomes.pop().unwrap();
    assert_eq!(out.vehicles.rejected, 1);
    assert!((out.shortfall_kw - 10.0).abs() < 1e-9);
}

#[test]
fn duplicates_other_regions_and_stale_terms_are_refused() {
    let mut p = with_fleet(planner(FallbackKind::Balanced), &fleet(2));
    p.on_signal(T0, signal("s1", 5.0)).unwrap();
    assert_eq!(p.on_signal(T0, signal("s1", 5.0)).unwrap_err(), SignalRefused::Duplicate("s1".into()));
    let mut other = signal("s2", 5.0);
    other.region = Some("south".into());
    assert!(matches!(p.on_signal(T0, other).unwrap_err(), SignalRefused::OtherRegion { .. }));
    let mut own = signal("s2", 5.0);
    own.region = Some("north".into());
    assert!(p.on_signal(T0, own).is_ok(), "a refused signal's id stays usable");
    let transfer = |id: &str, term| Signal { kind: SignalType::Transfer, leader_term: Some(term), ..signal(id, 1.0) };
    p.on_signal(T0, transfer("t1", 7)).unwrap();
    assert_eq!(p.on_signal(T0, transfer("t2", 6)).unwrap_err(), SignalRefused::StaleTerm { got: 6, highest: 7 });
    p.planner_mut().remember_signal("old");
    assert!(matches!(p.on_signal(T0, signal("old", 1.0)), Err(SignalRefused::Duplicate(_))));
}

#[test]
fn acks_from_the_wrong_vehicle_unknown_late_or_repeated_are_ignored() {
    let mut p = with_fleet(planner(FallbackKind::Noop), &fleet(2));
    let step = p.on_signal(T0, signal("s1", 12.0)).unwrap();
    let book = &mut p;
    let (a, b) = (&step.orders[0], &step.orders[1]);
    let wrong = book.on_ack(T0, &b.vehicle_id, &ack(a, AckStatus::Accepted)).unwrap_err();
    assert!(matches!(wrong, AckIgnored::WrongVehicle { .. }));
    let unknown = Ack { order_id: "nope".into(), status: AckStatus::Accepted, reason: None };
    let unknown = book.on_ack(T0, &a.vehicle_id, &unknown).unwrap_err();
    assert!(matches!(unknown, AckIgnored::UnknownOrder(_)));
    // Each case says which it is, and never names the order's vehicle.
    let (wrong_text, unknown_text) = (wrong.to_string(), unknown.to_string());
    assert!(wrong_text.contains("another vehicle") && !wrong_text.contains(a.vehicle_id.as_str()), "{wrong_text}");
    assert!(unknown_text.contains("no order") && unknown_text != wrong_text, "{unknown_text}");
    book.on_ack(T0, &a.vehicle_id, &ack(a, AckStatus::Accepted)).unwrap();
    let again = book.on_ack(T0, &a.vehicle_id, &ack(a, AckStatus::Accepted)).unwrap_err();
    assert!(matches!(again, AckIgnored::AlreadyAnswered(_)));
    // After the deadline the dispatch has settled: b's ACK is late, and a's ACK sent on
    // b's topic gets the very same answer (nothing about a's order comes out).
    let steps = book.on_timeout(T0.plus_millis(2_000));
    assert!(!steps[0].outcomes.is_empty());
    let late = book.on_ack(T0.plus_millis(2_001), &b.vehicle_id, &ack(b, AckStatus::Accepted)).unwrap_err();
    assert!(matches!(late, AckIgnored::Settled(_)));
    let foreign = book.on_ack(T0.plus_millis(2_001), &b.vehicle_id, &ack(a, AckStatus::Rejected)).unwrap_err();
    let made_up = Ack { order_id: format!("{}9", a.order_id), status: AckStatus::Accepted, reason: None };
    let made_up = book.on_ack(T0.plus_millis(2_001), &b.vehicle_id, &made_up).unwrap_err();
    let text = |e: &AckIgnored, id: &str| e.to_string().replace(id, "ID");
    assert_eq!(text(&foreign, &a.order_id), text(&made_up, &format!("{}9", a.order_id)));
    assert_eq!(text(&foreign, &a.order_id), text(&late, &b.order_id));
}

#[test]
fn a_signal_no_vehicle_can_serve_completes_at_once_with_a_full_shortfall() {
    let mut v = Vehicle::new("flat", 0.2, 60.0, 11.0);
    v.plugged_in = false;
    let mut p = with_fleet(planner(FallbackKind::Balanced), &[v]);
    let step = p.on_signal(T0, signal("s1", 50.0)).unwrap();
    assert!(p.book().is_empty());
    let out = step.outcomes.first().cloned().unwrap();
    assert_eq!(out.shortfall_kw, 50.0);
    assert_eq!(*kinds(&step).last().unwrap(), EventKind::DispatchCompleted);
    let constraint = &step.events[1].payload_value();
    assert_eq!(constraint["excluded"], serde_json::json!({ "not_plugged_in": ["flat"] }));
}

/// The tuner learns from dispatches that ran their course: silence cut short by a
/// shutdown says nothing about the vehicles, silence past the deadline does.
#[test]
fn the_tuner_does_not_learn_from_dispatches_cut_short() {
    use crate::learning::tuning::AckBasedTuner;
    let tuned = |e: &mut Engine, until: Timestamp, shut: bool| {
        let step = e.on_signal(T0, signal("s", 30.0)).unwrap();
        assert_eq!(step.orders.len(), 5);
        let steps = if shut { e.shutdown(until, "gateway shutdown") } else { e.on_timeout(until) };
        steps.iter().flat_map(|s| &s.events).filter(|ev| ev.kind == EventKind::WeightsTuned).count()
    };
    let engine = || {
        let tuner = AckBasedTuner::new(SignalType::ALL.map(crate::allocation::Weights::default_for));
        with_fleet(planner(FallbackKind::Noop), &fleet(5)).with_tuner(Some(Box::new(tuner)))
    };
    assert_eq!(tuned(&mut engine(), T0.plus_millis(500), true), 0, "shut down: no change");
    assert_eq!(
        tuned(&mut engine(), T0.plus_millis(2_000), false),
        1,
        "no ACK by the deadline: availability counts more"
    );
}

/// Fairness scores count the last `PARTICIPATION_DISPATCHES` dispatches only, exactly as
/// the projection rebuilds them from the log: past that many dispatches, the live scores
/// and the rebuilt ones agree (the auditor re-runs plans with the rebuilt ones).
#[test]
fn fairness_scores_are_the_ones_the_log_rebuilds_after_many_dispatches() {
    use crate::dispatch::PARTICIPATION_DISPATCHES;
    let mut e = with_fleet(planner(FallbackKind::Noop), &fleet(6));
    let mut firsts: Vec<Vec<VehicleId>> = Vec::new();
    for k in 0..(PARTICIPATION_DISPATCHES + 37) {
        let now = T0.plus_millis(10_000 * k as i64);
        let step = e.on_signal(now, Signal { start: now, ..signal(&format!("s{k}"), 2.0 + (k % 5) as f64 * 7.0) });
        let step = step.unwrap();
        firsts.push(step.orders.iter().map(|o| o.vehicle_id.clone()).collect());
        for o in &step.orders {
            e.on_ack(now, &o.vehicle_id, &ack(o, AckStatus::Accepted)).unwrap();
        }
    }
    let mut rebuilt = with_fleet(planner(FallbackKind::Noop), &fleet(6));
    rebuilt.planner_mut().remember_participation(&firsts[firsts.len() - PARTICIPATION_DISPATCHES..]);
    let (live, again) = (e.planner().participation(), rebuilt.planner().participation());
    assert_eq!(live.len(), again.len(), "{live:?} vs {again:?}");
    for (v, p) in live {
        assert!((p - again[v]).abs() <= 1e-12 * p.abs().max(1.0), "{v}: live {p}, rebuilt {}", again[v]);
    }
}

#[test]
fn shutdown_settles_what_is_in_flight() {
    let mut p = with_fleet(planner(FallbackKind::Balanced), &fleet(3));
    let step = p.on_signal(T0, signal("s1", 15.0)).unwrap();
    let book = &mut p;
    book.on_ack(T0, &step.orders[0].vehicle_id, &ack(&step.orders[0], AckStatus::Accepted)).unwrap();
    let steps = book.shutdown(T0.plus_millis(100), "shutdown");
    assert_eq!(steps.len(), 1);
    let out = steps[0].outcomes.first().unwrap();
    assert_eq!(out.vehicles.timed_out, 2);
    assert!(steps[0].events.iter().all(|e| e.kind != EventKind::FallbackApplied), "no fallback at shutdown");
    let done = steps[0].events.last().unwrap();
    assert_eq!(done.payload_value()["interrupted"], "shutdown");
    assert!(book.book().is_empty());
}

#[test]
fn fleet_changes_produce_discovery_and_loss_events() {
    let mut p = planner(FallbackKind::Balanced);
    let v = Vehicle::new("v1", 0.5, 60.0, 11.0);
    let (c, e) = p.on_state(T0, v.id.clone(), Some(v.clone()));
    assert_eq!((c, e.map(|e| e.kind)), (FleetChange::Discovered, Some(EventKind::VehicleDiscovered)));
    assert_eq!(p.on_state(T0, v.id.clone(), Some(v.clone())), (FleetChange::Unchanged, None));
    let drift = Vehicle { soc: 0.504, ..v.clone() };
    assert_eq!(p.on_state(T0, v.id.clone(), Some(drift)), (FleetChange::Unchanged, None), "below the deadband");
    let (c, e) = p.on_state(T0, v.id.clone(), Some(Vehicle { soc: 0.51, ..v.clone() }));
    assert_eq!((c, e.map(|e| e.kind)), (FleetChange::Updated, Some(EventKind::VehicleStateChanged)));
    let (c, e) = p.on_state(T0, v.id.clone(), Some(v.clone()));
    assert_eq!((c, e.map(|e| e.kind)), (FleetChange::Updated, Some(EventKind::VehicleStateChanged)));
    let cap = p.capacity(T0);
    assert_eq!((cap.up_kw, cap.down_kw, cap.vehicles), (11.0, 11.0, 1));
    let (c, e) = p.on_state(T0, v.id.clone(), None);
    assert_eq!((c, e.map(|e| e.kind)), (FleetChange::Lost, Some(EventKind::VehicleLost)));
    assert_eq!(p.on_state(T0, v.id, None).0, FleetChange::Unchanged);
}

/// A tiny deterministic generator for the simulation (the core has no rand dependency).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> f64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// How simulated vehicles answer `orders` sent at `now`: below `silent_below` of a draw they
/// never answer, below `reject_below` they reject, else they accept; each answer lands up to
/// `max_delay_ms` later. Pushed to `pending` as (due, vehicle, ACK).
fn schedule_answers(
    orders: &[Order],
    now: Timestamp,
    rng: &mut Rng,
    pending: &mut Vec<(Timestamp, VehicleId, Ack)>,
    (silent_below, reject_below): (f64, f64),
    max_delay_ms: f64,
) {
    for o in orders {
        let r = rng.next();
        if r < silent_below {
            continue;
        }
        let status = if r < reject_below { AckStatus::Rejected } else { AckStatus::Accepted };
        pending.push((now.plus_millis((rng.next() * max_delay_ms) as i64), o.vehicle_id.clone(), ack(o, status)));
    }
}

/// A seeded fleet, a virtual clock and a loop: many dispatches with vehicles that answer
/// at random times, reject, or never answer. Checks the invariants of every dispatch.
#[test]
fn seeded_simulation_of_many_dispatches_keeps_every_invariant() {
    for seed in 1..=20u64 {
        let mut rng = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
        let fleet: Vec<Vehicle> = (0..30)
            .map(|i| {
                let mut v = Vehicle::new(
                    format!("v{i:02}"),
                    0.1 + 0.85 * rng.next(),
                    40.0 + 80.0 * rng.next(),
                    7.0 + 43.0 * rng.next(),
                );
                v.plugged_in = rng.next() > 0.1;
                v.availability = 0.5 + 0.5 * rng.next();
                v
            })
            .collect();
        let fallback = if seed % 3 == 0 { FallbackKind::Noop } else { FallbackKind::Balanced };
        let strategy: Box<dyn Dispatcher> =
            if seed % 2 == 0 { Box::new(EqualDispatcher) } else { Box::new(SmartDispatcher::default()) };
        let cfg = EngineConfig { ack_timeout_ms: 1_000, fallback, ..EngineConfig::default() };
        let mut p = Engine::new(Planner::new(cfg, Box::new(SimpleVehicleFilter), strategy));
        for v in &fleet {
            p.on_state(T0, v.id.clone(), Some(v.clone()));
        }
        let mut now = T0;
        // Pending ACKs: (due, vehicle, ack).
        let mut pending: Vec<(Timestamp, VehicleId, Ack)> = Vec::new();
        let mut outcomes = Vec::new();
        let mut events = Vec::new();
        // 15 % silent, 10 % reject; delays up to 1.4 s, some after the 1 s deadline.
        let schedule = |orders: &[Order], now, rng: &mut Rng, pending: &mut Vec<_>| {
            schedule_answers(orders, now, rng, pending, (0.15, 0.25), 1_400.0)
        };
        for k in 0..15 {
            let kw = 20.0 + 400.0 * rng.next();
            let sig = Signal { id: format!("s{k}"), start: now, ..signal("", kw) };
            let mut step = p.on_signal(now, sig.clone()).unwrap();
            for o in &step.orders {
                let v = p.planner().vehicle(&o.vehicle_id).unwrap();
                assert!(SimpleVehicleFilter.check(v, &sig).is_ok(), "order to a filtered-out vehicle");
                assert!(o.power_kw <= v.effective_capacity(Direction::Up, 0.0, 900.0) + 1e-9);
            }
            let book = &mut p;
            schedule(&step.orders, now, &mut rng, &mut pending);
            events.append(&mut step.events);
            outcomes.append(&mut step.outcomes);
            // Drive the clock to the next event: an ACK or a deadline.
            loop {
                pending.sort_by_key(|(t, _, _)| *t);
                let next_ack = pending.first().map(|(t, _, _)| *t);
                let next = match (next_ack, book.next_deadline()) {
                    (Some(a), Some(d)) => a.min(d),
                    (Some(a), None) => a,
                    (None, Some(d)) => d,
                    (None, None) => break,
                };
                now = now.max(next);
                let mut steps = Vec::new();
                if next_ack == Some(next) {
                    let (_, vid, a) = pending.remove(0);
                    if let Ok(s) = book.on_ack(now, &vid, &a) {
                        steps.push(s);
                    }
                } else {
                    steps = book.on_timeout(now);
                }
                for mut s in steps {
                    schedule(&s.orders, now, &mut rng, &mut pending);
                    events.append(&mut s.events);
                    outcomes.append(&mut s.outcomes);
                }
            }
            now = now.plus_millis(5_000);
        }
        assert!(p.book().is_empty(), "seed {seed}: every dispatch settles");
        assert_eq!(outcomes.len(), 15, "seed {seed}");
        for o in &outcomes {
            assert!(o.acknowledged_kw <= o.requested_kw + 1e-6, "seed {seed}: {o:?}");
            assert!(o.acknowledged_kw <= o.allocated_kw + 1e-9);
            assert!((o.shortfall_kw - (o.requested_kw - o.acknowledged_kw).max(0.0)).abs() < 1e-9);
            let completed = events
                .iter()
                .filter(|e| {
                    e.kind == EventKind::DispatchCompleted && e.correlation_id.as_deref() == Some(&o.dispatch_id)
                })
                .count();
            assert_eq!(completed, 1);
            let sent: u32 = events
                .iter()
                .filter(|e| e.kind == EventKind::OrderSent && e.correlation_id.as_deref() == Some(&o.dispatch_id))
                .map(|e| e.payload_value()["orders"].as_array().map_or(0, Vec::len) as u32)
                .sum();
            assert_eq!(sent, o.vehicles.accepted + o.vehicles.rejected + o.vehicles.timed_out, "seed {seed}");
        }
    }
}

proptest! {
    #[test]
    fn plans_never_order_filtered_vehicles_or_exceed_capacity(
        specs in prop::collection::vec((0.0f64..=1.0, 10.0f64..100.0, 0.0f64..50.0, any::<bool>(), 0u64..3_600_000), 0..30),
        kw in 0.1f64..1500.0,
        down in any::<bool>(),
    ) {
        let fleet: Vec<Vehicle> = specs.iter().enumerate().map(|(i, (soc, cap, rating, plugged, dep))| {
            let mut v = Vehicle::new(format!("v{i}"), *soc, *cap, *rating);
            v.plugged_in = *plugged;
            v.departure = Some(T0.plus_millis(*dep as i64));
            v
        }).collect();
        let mut p = with_fleet(planner(FallbackKind::Balanced), &fleet);
        let direction = if down { Direction::Down } else { Direction::Up };
        let sig = Signal { direction, ..signal("s", kw) };
        let step = p.on_signal(T0, sig.clone()).unwrap();
        let mut total = 0.0;
        for o in &step.orders {
            let v = fleet.iter().find(|v| v.id == o.vehicle_id).unwrap();
            prop_assert!(SimpleVehicleFilter.check(v, &sig).is_ok());
            prop_assert!(o.power_kw <= v.effective_capacity(direction, 0.0, 900.0) + 1e-9);
            total += o.power_kw;
        }
        prop_assert!(total <= kw + 1e-6);
    }
}

#[test]
fn vehicles_that_do_not_state_availability_get_the_predicted_one() {
    let mut flaky = Vehicle::new("flaky", 0.8, 60.0, 10.0);
    flaky.availability_stated = false;
    let steady = Vehicle::new("steady", 0.8, 60.0, 10.0);
    let mut p = with_fleet(planner(FallbackKind::Noop), &[flaky.clone(), steady]);
    p.planner_mut().set_prediction(crate::learning::prediction::PredictionEngine::default());
    let misses: Vec<(VehicleId, Timestamp, bool)> =
        (0..30).map(|k| (flaky.id.clone(), T0.plus_millis(-k * 60_000), false)).collect();
    p.planner_mut().observe_answers(&misses);
    let cap = p.capacity(T0);
    assert!(cap.up_kw < 10.0 + 2.0, "the flaky vehicle's capacity is discounted: {cap:?}");
    let step = p.on_signal(T0, signal("s1", 10.0)).unwrap();
    let plan = &step.events[2].payload_value();
    assert_eq!(plan["predicted_availability"], serde_json::json!(["flaky"]));
    let power = |id: &str| step.orders.iter().find(|o| o.vehicle_id.as_str() == id).map_or(0.0, |o| o.power_kw);
    assert!(power("steady") > power("flaky"), "{:?}", step.orders);
}

#[test]
fn settled_dispatches_report_each_vehicles_answer_and_tuned_weights_reach_the_strategy() {
    let mut p = with_fleet(planner(FallbackKind::Noop), &fleet(2));
    let step = p.on_signal(T0, signal("s1", 12.0)).unwrap();
    let book = &mut p;
    book.on_ack(T0, &step.orders[0].vehicle_id, &ack(&step.orders[0], AckStatus::Accepted)).unwrap();
    let done = book.on_timeout(T0.plus_millis(2_000)).remove(0);
    let mut answers: Vec<(String, bool)> = done.answers.iter().map(|(v, _, ok)| (v.as_str().to_owned(), *ok)).collect();
    answers.sort();
    assert_eq!(answers, [("v00".to_owned(), true), ("v01".to_owned(), false)]);

    let tuned =
        crate::allocation::Weights { availability: 0.123, ..crate::allocation::Weights::default_for(SignalType::Afrr) };
    p.planner_mut().set_weights(SignalType::Afrr, tuned);
    let step = p.on_signal(T0, signal("s2", 5.0)).unwrap();
    assert_eq!(step.events[2].payload_value()["weights"]["availability"], 0.123);
}

fn engine_with_limits(fallback: FallbackKind, limits: Limits, fleet: &[Vehicle]) -> Engine {
    let cfg =
        EngineConfig { region: "north".into(), ack_timeout_ms: 2_000, fallback, limits, ..EngineConfig::default() };
    with_fleet(
        Engine::new(Planner::new(cfg, Box::new(SimpleVehicleFilter), Box::new(SmartDispatcher::default()))),
        fleet,
    )
}

fn accept_all(e: &mut Engine, now: Timestamp, orders: &[Order]) -> Vec<Step> {
    orders.iter().map(|o| e.on_ack(now, &o.vehicle_id, &ack(o, AckStatus::Accepted)).unwrap()).collect()
}

fn total(orders: &[Order]) -> f64 {
    orders.iter().map(|o| o.power_kw).sum()
}

#[test]
fn overlapping_signals_together_stay_within_the_site_limit() {
    let fleet: Vec<Vehicle> = (0..4).map(|i| Vehicle::new(format!("v{i}"), 0.9, 400.0, 100.0)).collect();
    let limits = Limits { export_kw: Some(150.0), ..Limits::default() };
    let mut e = engine_with_limits(FallbackKind::Noop, limits, &fleet);
    let a = e.on_signal(T0, signal("a", 150.0)).unwrap();
    assert!((total(&a.orders) - 150.0).abs() < 1e-6);
    accept_all(&mut e, T0.plus_millis(10), &a.orders);
    let cap = e.capacity(T0.plus_millis(20));
    assert!(cap.up_kw.abs() < 1e-6, "nothing is free at the connection after A: {cap:?}");
    let b = e.on_signal(T0.plus_millis(1_000), Signal { kind: SignalType::Fcr, ..signal("b", 150.0) }).unwrap();
    assert!(b.orders.is_empty(), "B finds the export limit taken: {:?}", b.orders);
    assert!((b.outcomes[0].shortfall_kw - 150.0).abs() < 1e-6);
}

#[test]
fn overlapping_signals_never_exceed_a_vehicles_rating() {
    let fleet: Vec<Vehicle> = (0..2).map(|i| Vehicle::new(format!("v{i}"), 0.9, 400.0, 100.0)).collect();
    let mut e = engine_with_limits(FallbackKind::Noop, Limits::default(), &fleet);
    let a = e.on_signal(T0, signal("a", 150.0)).unwrap();
    let b = e.on_signal(T0.plus_millis(500), signal("b", 150.0)).unwrap();
    assert!((total(&b.orders) - 50.0).abs() < 1e-6, "only 50 kW of rating is left: {:?}", b.orders);
    for v in &fleet {
        let on = |s: &Step| s.orders.iter().filter(|o| o.vehicle_id == v.id).map(|o| o.power_kw).sum::<f64>();
        assert!(on(&a) + on(&b) <= 100.0 + 1e-6, "{}: {} + {}", v.id, on(&a), on(&b));
    }
}

/// A battery's energy is booked once: a second signal while the first still draws on it
/// gets only what the first leaves (not what the second's shorter window alone would allow).
#[test]
fn overlapping_signals_never_book_a_battery_twice() {
    // 0.5 kWh above min_soc (0.25 - 0.2 of 10 kWh): 2 kW for 15 min takes all of it.
    let small = Vehicle::new("y1", 0.25, 10.0, 20.0);
    let mut e = engine_with_limits(FallbackKind::Noop, Limits::default(), std::slice::from_ref(&small));
    let a = e.on_signal(T0, signal("ea", 2.0)).unwrap();
    assert!((total(&a.orders) - 2.0).abs() < 1e-6, "{:?}", a.orders);
    accept_all(&mut e, T0.plus_millis(10), &a.orders);
    let later = T0.plus_millis(1_000);
    let b = e.on_signal(later, Signal { start: later, duration_s: 60, ..signal("eb", 15.0) }).unwrap();
    // Left: 0.5 kWh less 2 kW over the 899 s still to go = 0.56 Wh, 0.033 kW over a minute.
    let left_kw = (0.5 - 2.0 * 899.0 / 3600.0) / (60.0 / 3600.0);
    assert!(total(&b.orders) <= left_kw + 1e-9, "{} kW ordered, {left_kw} kW left", total(&b.orders));
    let cap = e.capacity(later);
    assert!(cap.up_kw <= 0.001 + 1e-9, "capacity counts the energy committed too: {cap:?}");
}

/// The SoC the gateway plans with is as of its last recorded state: the energy a
/// commitment drew since then is still counted, however long ago that state came (a SoC
/// step below the deadband is not a new state), so it is not offered a second time.
#[test]
fn energy_drawn_since_the_last_state_is_not_offered_again() {
    let mut small = Vehicle::new("y1", 0.21, 50.0, 20.0);
    small.min_soc = 0.2;
    let mut e = engine_with_limits(FallbackKind::Noop, Limits::default(), std::slice::from_ref(&small));
    let g1 = e.on_signal(T0, signal("g1", 2.0)).unwrap();
    assert!((total(&g1.orders) - 2.0).abs() < 1e-6, "{:?}", g1.orders);
    accept_all(&mut e, T0.plus_millis(10), &g1.orders);
    let later = T0.plus_millis(30_000);
    // The vehicle reports what it gave: 0.0167 kWh, below the deadband, so not a new state.
    let (change, _) = e.on_state(later, small.id.clone(), Some(Vehicle { soc: 0.209_667, ..small.clone() }));
    assert_eq!(change, FleetChange::Unchanged);
    let g2 = e.on_signal(later, Signal { start: later, duration_s: 60, ..signal("g2", 5.0) }).unwrap();
    assert!(total(&g2.orders) < 1e-6, "g1 holds all 0.5 kWh: {:?}", g2.orders);
    let (a, b) = (e.capacity(T0.plus_millis(60_000)), e.capacity(T0.plus_millis(600_000)));
    assert_eq!((a.up_kw, b.up_kw), (0.0, 0.0), "no energy frees up as g1 runs on");
}

/// `capacity` is the most a dispatch can deliver under overlapping phase and group rows
/// (the exact maximum, as every strategy delivers it), not a heuristic's fill.
#[test]
fn capacity_is_the_most_the_limits_allow() {
    use crate::model::{Phase, Wiring};
    let mut fleet = Vec::new();
    for i in 0..3 {
        let mut v = Vehicle::new(format!("l1-{i}"), 0.9, 400.0, 7.0);
        v.wiring = Wiring::SinglePhase(Phase::L1);
        fleet.push(v);
    }
    for i in 0..2 {
        let mut v = Vehicle::new(format!("fa-{i}"), 0.9, 400.0, 11.0);
        (v.wiring, v.group) = (Wiring::SinglePhase(Phase::L2), Some("fa".into()));
        fleet.push(v);
    }
    fleet.extend((0..2).map(|i| Vehicle::new(format!("tp-{i}"), 0.9, 400.0, 22.0)));
    let groups = [("fa".to_owned(), 15.0)].into_iter().collect();
    let limits = Limits { phase_kw: Some(20.0), groups, ..Limits::default() };
    let mut e = engine_with_limits(FallbackKind::Noop, limits, &fleet);
    // Both three-phase vehicles in full (14.67 kW on each phase), then 5.33 kW on L1 and L2.
    let most = 44.0 + 2.0 * (20.0 - 44.0 / 3.0);
    let cap = e.capacity(T0);
    assert!((cap.up_kw - most).abs() <= 0.001, "{cap:?}, the most is {most}");
    assert_eq!(cap.up_kw.to_bits(), ((cap.up_kw * 1000.0).round() / 1000.0).to_bits(), "to the watt");
}

#[test]
fn releases_free_the_power_for_later_signals() {
    let fleet: Vec<Vehicle> = (0..2).map(|i| Vehicle::new(format!("v{i}"), 0.9, 400.0, 100.0)).collect();
    let mut e = engine_with_limits(FallbackKind::Noop, Limits::default(), &fleet);
    // A short window: 60 s.
    let a = e.on_signal(T0, Signal { duration_s: 60, ..signal("a", 200.0) }).unwrap();
    // v0 rejects, v1 stays silent.
    let o0 = a.orders.iter().find(|o| o.vehicle_id.as_str() == "v0").unwrap();
    e.on_ack(T0, &o0.vehicle_id, &ack(o0, AckStatus::Rejected)).unwrap();
    assert!((e.capacity(T0).up_kw - 100.0).abs() < 1e-6, "the rejection released v0");
    let steps = e.on_timeout(T0.plus_millis(2_000));
    assert_eq!(steps[0].cancels.len(), 1, "the silent order is cancelled");
    assert!((e.capacity(T0.plus_millis(2_000)).up_kw - 200.0).abs() < 1e-6, "the timeout released v1");
    // Accepted, then the window ends.
    let b = e
        .on_signal(T0.plus_millis(3_000), Signal { start: T0.plus_millis(3_000), duration_s: 60, ..signal("b", 200.0) })
        .unwrap();
    accept_all(&mut e, T0.plus_millis(3_010), &b.orders);
    assert!(e.capacity(T0.plus_millis(4_000)).up_kw < 1e-6);
    assert!((e.capacity(T0.plus_millis(63_000)).up_kw - 200.0).abs() < 1e-6, "the window's end released both");
    assert!(e.ledger().is_empty());
}

#[test]
fn a_vehicle_leaving_releases_its_commitments_and_says_which() {
    let fleet: Vec<Vehicle> = (0..2).map(|i| Vehicle::new(format!("v{i}"), 0.9, 400.0, 100.0)).collect();
    let mut e = engine_with_limits(FallbackKind::Noop, Limits::default(), &fleet);
    let a = e.on_signal(T0, signal("a", 200.0)).unwrap();
    accept_all(&mut e, T0, &a.orders);
    let (change, event) = e.on_state(T0, "v0".into(), None);
    assert_eq!(change, FleetChange::Lost);
    let payload = event.unwrap().payload_value();
    assert_eq!(payload["released_orders"].as_array().map(Vec::len), Some(1));
    assert_eq!(e.ledger().len(), 1);
}

#[test]
fn a_vehicle_committed_one_way_is_not_ordered_the_other_way() {
    let fleet = [Vehicle::new("v0", 0.5, 400.0, 100.0), Vehicle::new("v1", 0.5, 400.0, 100.0)];
    let mut e = engine_with_limits(FallbackKind::Noop, Limits::default(), &fleet);
    let a = e.on_signal(T0, signal("a", 50.0)).unwrap();
    let up: BTreeSet<&VehicleId> = a.orders.iter().map(|o| &o.vehicle_id).collect();
    let b = e.on_signal(T0, Signal { direction: Direction::Down, ..signal("b", 200.0) }).unwrap();
    assert!(b.orders.iter().all(|o| !up.contains(&o.vehicle_id)), "{:?} vs {up:?}", b.orders);
    let constraint = b.events[1].payload_value();
    assert!(constraint["excluded"].to_string().contains("committed_other_way"), "{constraint}");
}

#[test]
fn a_setpoint_stream_never_stacks() {
    let fleet: Vec<Vehicle> = (0..3).map(|i| Vehicle::new(format!("v{i}"), 0.9, 400.0, 100.0)).collect();
    let mut e = engine_with_limits(FallbackKind::Noop, Limits::default(), &fleet);
    let mut prev = "s0".to_owned();
    let first = e.on_signal(T0, signal("s0", 120.0)).unwrap();
    accept_all(&mut e, T0, &first.orders);
    for k in 1..20 {
        let now = T0.plus_millis(k * 4_000);
        let kw = 60.0 + 10.0 * k as f64;
        let id = format!("s{k}");
        let sig = Signal { start: now, replaces: Some(prev.clone()), ..signal(&id, kw) };
        let step = e.on_signal(now, sig).unwrap();
        assert!(!step.cancels.is_empty(), "{id}: the replaced orders are withdrawn");
        assert!((total(&step.orders) - kw).abs() < 1e-6, "{id}: the new setpoint is ordered in full");
        accept_all(&mut e, now, &step.orders);
        let committed: f64 = e.ledger().iter().map(|c| c.power_kw).sum();
        assert!((committed - kw).abs() < 1e-6, "{id}: committed {committed}, not stacked on earlier setpoints");
        prev = id;
    }
    let again = e.on_signal(T0.plus_millis(90_000), Signal { replaces: Some("s3".into()), ..signal("x", 1.0) });
    assert!(matches!(again, Err(SignalRefused::UnknownReplacement(_))), "an already replaced signal");
    let unknown = e.on_signal(T0.plus_millis(90_000), Signal { replaces: Some("nope".into()), ..signal("y", 1.0) });
    assert!(matches!(unknown, Err(SignalRefused::UnknownReplacement(_))));
}

/// A setpoint that got nothing (every vehicle rejected it) does not end its stream: the
/// next one replaces it while its window is open; once the window is over it cannot.
#[test]
fn a_setpoint_that_got_nothing_can_still_be_replaced() {
    let fleet: Vec<Vehicle> = (0..2).map(|i| Vehicle::new(format!("v{i}"), 0.9, 400.0, 100.0)).collect();
    let mut e = engine_with_limits(FallbackKind::Noop, Limits::default(), &fleet);
    let a = e.on_signal(T0, Signal { duration_s: 60, ..signal("w3", 50.0) }).unwrap();
    for o in &a.orders {
        e.on_ack(T0, &o.vehicle_id, &ack(o, AckStatus::Rejected)).unwrap();
    }
    assert!(e.ledger().is_empty());
    let t = T0.plus_millis(4_000);
    let b = Signal { start: t, duration_s: 60, replaces: Some("w3".into()), ..signal("w4", 50.0) };
    let b = e.on_signal(t, b).expect("w3's window is open");
    assert!((total(&b.orders) - 50.0).abs() < 1e-6);
    let late = T0.plus_millis(70_000);
    let c = Signal { start: late, replaces: Some("w3".into()), ..signal("w5", 50.0) };
    assert!(matches!(e.on_signal(late, c), Err(SignalRefused::UnknownReplacement(_))), "w3 was replaced already");
    let d = Signal { start: late, replaces: Some("w4".into()), ..signal("w6", 10.0) };
    assert!(e.on_signal(late, d).is_ok(), "w4 still has commitments");
}

#[test]
fn replacing_a_dispatch_in_flight_settles_it_with_what_it_had() {
    let fleet: Vec<Vehicle> = (0..2).map(|i| Vehicle::new(format!("v{i}"), 0.9, 400.0, 100.0)).collect();
    let mut e = engine_with_limits(FallbackKind::Balanced, Limits::default(), &fleet);
    let a = e.on_signal(T0, signal("a", 100.0)).unwrap();
    let o = &a.orders[0];
    e.on_ack(T0, &o.vehicle_id, &ack(o, AckStatus::Accepted)).unwrap();
    let b = e.on_signal(T0.plus_millis(100), Signal { replaces: Some("a".into()), ..signal("b", 80.0) }).unwrap();
    assert_eq!(b.outcomes.len(), 1, "A settles in B's step");
    assert!((b.outcomes[0].acknowledged_kw - o.power_kw).abs() < 1e-9);
    assert_eq!(b.cancels.len(), a.orders.len(), "A's accepted and pending orders are both withdrawn");
    assert!((total(&b.orders) - 80.0).abs() < 1e-6);
    assert_eq!(e.book().len(), 1);
}

#[test]
fn windows_over_or_far_ahead_and_floods_are_refused() {
    let mut e = engine_with_limits(FallbackKind::Noop, Limits::default(), &fleet(2));
    let old = Signal { start: T0.plus_millis(-1_000_000), duration_s: 60, ..signal("old", 5.0) };
    assert!(matches!(e.on_signal(T0, old), Err(SignalRefused::WindowOver { .. })));
    let far = Signal { start: T0.plus_millis(2 * 86_400_000), ..signal("far", 5.0) };
    assert!(matches!(e.on_signal(T0, far), Err(SignalRefused::TooFarAhead { .. })));
    let long = Signal { duration_s: 10 * 86_400, ..signal("long", 5.0) };
    assert!(matches!(e.on_signal(T0, long), Err(SignalRefused::TooLong { .. })));
    for k in 0..32 {
        e.on_signal(T0, signal(&format!("s{k}"), 0.5)).unwrap();
    }
    assert_eq!(e.on_signal(T0, signal("one-more", 0.5)).unwrap_err(), SignalRefused::Busy(32));
    let setpoint = Signal { replaces: Some("s31".into()), ..signal("s31b", 0.5) };
    assert!(e.on_signal(T0, setpoint).is_ok(), "a replacement takes its predecessor's place in flight");
    assert_eq!(e.book().len(), 32);
    let later = T0.plus_millis(2_000);
    assert_eq!(e.on_timeout(later).len(), 32);
    assert!(e.on_signal(later, Signal { start: later, ..signal("old", 5.0) }).is_ok(), "a refused id stays usable");
}

/// Overlapping dispatches on a seeded fleet: signals arrive before earlier ones settle,
/// vehicles ACK, reject or stay silent at random, windows end. At every step the power
/// committed per vehicle stays within its rating and per shared row within its limit.
#[test]
fn overlapping_dispatches_never_overcommit_a_vehicle_or_a_limit() {
    for seed in 1..=30u64 {
        let mut rng = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
        let fleet: Vec<Vehicle> = (0..24)
            .map(|i| {
                let mut v = Vehicle::new(
                    format!("v{i:02}"),
                    0.3 + 0.6 * rng.next(),
                    60.0 + 100.0 * rng.next(),
                    7.0 + 40.0 * rng.next(),
                );
                v.group = Some(format!("g{}", i % 3));
                if i % 4 == 0 {
                    v.wiring = crate::model::Wiring::SinglePhase(crate::model::Phase::L1);
                }
                v
            })
            .collect();
        let limits = Limits {
            export_kw: Some(150.0 + 300.0 * rng.next()),
            import_kw: Some(150.0 + 300.0 * rng.next()),
            groups: [("g0".to_owned(), 120.0), ("g1".to_owned(), 200.0)].into(),
            phase_kw: Some(60.0 + 120.0 * rng.next()),
        };
        let fallback = if seed % 2 == 0 { FallbackKind::Balanced } else { FallbackKind::Noop };
        let mut e = engine_with_limits(fallback, limits.clone(), &fleet);
        let mut now = T0;
        let mut pending: Vec<(Timestamp, VehicleId, Ack)> = Vec::new();
        let mut streams: Vec<String> = Vec::new();
        let schedule = |orders: &[Order], now, rng: &mut Rng, pending: &mut Vec<_>| {
            schedule_answers(orders, now, rng, pending, (0.2, 0.3), 2_500.0)
        };
        for k in 0..60 {
            // Signals every 0-1.5 s: most arrive before the previous one settles.
            now = now.plus_millis((rng.next() * 1_500.0) as i64);
            let direction = if rng.next() < 0.7 { Direction::Up } else { Direction::Down };
            let replaces = if rng.next() < 0.3 { streams.last().cloned() } else { None };
            let sig = Signal {
                id: format!("s{k}"),
                direction,
                power_kw: 20.0 + 300.0 * rng.next(),
                start: now,
                duration_s: 5 + (rng.next() * 60.0) as u64,
                replaces,
                ..signal("", 1.0)
            };
            if let Ok(step) = e.on_signal(now, sig) {
                schedule(&step.orders, now, &mut rng, &mut pending);
                streams.push(format!("s{k}"));
            }
            // Drive ACKs and deadlines up to the next signal.
            let until = now.plus_millis(1_000);
            while let Some((t, is_ack)) = next_input(&e, &mut pending, until) {
                let t = t.max(now);
                let mut steps = Vec::new();
                if is_ack {
                    let (_, vid, a) = pending.remove(0);
                    steps.extend(e.on_ack(t, &vid, &a).ok());
                } else {
                    steps = e.on_timeout(t);
                }
                for s in steps {
                    schedule(&s.orders, t, &mut rng, &mut pending);
                }
                check_commitments(&e, &fleet, &limits, t, seed);
            }
            check_commitments(&e, &fleet, &limits, now, seed);
        }
    }
}

/// The next input of a simulation up to `until`: the earliest ACK due (`true`) or ACK
/// deadline (`false`), an ACK first when both fall at once.
fn next_input(e: &Engine, pending: &mut [(Timestamp, VehicleId, Ack)], until: Timestamp) -> Option<(Timestamp, bool)> {
    pending.sort_by_key(|(t, _, _)| *t);
    let next_ack = pending.first().map(|(t, _, _)| *t).filter(|t| *t <= until);
    let next_deadline = e.next_deadline().filter(|t| *t <= until);
    match (next_ack, next_deadline) {
        (Some(a), Some(d)) if a <= d => Some((a, true)),
        (_, Some(d)) => Some((d, false)),
        (Some(a), None) => Some((a, true)),
        (None, None) => None,
    }
}

/// At `now`, per vehicle and direction the committed power is within the rating, and per
/// shared row within its limit.
fn check_commitments(e: &Engine, fleet: &[Vehicle], limits: &Limits, now: Timestamp, seed: u64) {
    let live: Vec<&ledger::Commitment> = e.ledger().iter().filter(|c| c.start <= now && now < c.until).collect();
    for direction in [Direction::Up, Direction::Down] {
        let mut site = 0.0;
        let mut phases = [0.0; 3];
        let mut groups: BTreeMap<String, f64> = BTreeMap::new();
        for v in fleet {
            let kw: f64 =
                live.iter().filter(|c| c.vehicle_id == v.id && c.direction == direction).map(|c| c.power_kw).sum();
            assert!(kw <= v.rating_kw(direction) + 1e-6, "seed {seed}: {} {direction:?} {kw} > rating", v.id);
            site += kw;
            if let Some(g) = &v.group {
                *groups.entry(g.clone()).or_default() += kw;
            }
            match v.wiring {
                crate::model::Wiring::ThreePhase => phases.iter_mut().for_each(|p| *p += kw / 3.0),
                crate::model::Wiring::SinglePhase(_) => phases[0] += kw,
            }
        }
        let site_cap = if direction == Direction::Up { limits.export_kw } else { limits.import_kw };
        assert!(site <= site_cap.unwrap_or(f64::INFINITY) + 1e-6, "seed {seed}: site {site} over {site_cap:?}");
        for (g, kw) in &groups {
            let cap = limits.groups.get(g).copied().unwrap_or(f64::INFINITY);
            assert!(*kw <= cap + 1e-6, "seed {seed}: group {g} {kw} over {cap}");
        }
        for p in phases {
            assert!(
                p <= limits.phase_kw.unwrap_or(f64::INFINITY) + 1e-6,
                "seed {seed}: phase {p} over {:?}",
                limits.phase_kw
            );
        }
    }
}

/// The log is the source of state: on seeded runs with overlapping dispatches, random
/// answers, fallbacks, replacements, vehicles whose state changes or who leave, folding
/// the events into the projection gives what the live engine holds (fleet, dispatches in
/// flight, commitments, fairness, signals seen, numbering), checked after every input.
#[test]
fn replaying_the_log_gives_the_live_state() {
    use crate::events::{EventStore, MemoryStore};
    use crate::replay::{build, DispatchProjection};
    for seed in 1..=12u64 {
        let mut rng = Rng(seed.wrapping_mul(0x2545_F491_4F6C_DD1D) | 1);
        let fleet: Vec<Vehicle> = (0..16)
            .map(|i| {
                let mut v = Vehicle::new(format!("v{i:02}"), 0.3 + 0.6 * rng.next(), 80.0, 7.0 + 30.0 * rng.next());
                v.group = Some(format!("g{}", i % 2));
                v
            })
            .collect();
        // The gateway's own build from a recorded configuration, so the log can be audited.
        let fallback = if seed % 2 == 0 { "balanced" } else { "noop" };
        let cfg = crate::config::Config::from_yaml(&format!(
            "site: north\nstore: {{ path: x.db }}\ndispatch:\n  ack_timeout_seconds: 2\n  fallback: {fallback}\n  limits: {{ export_kw: 200, groups: {{ g0: 90 }} }}\n"
        ))
        .unwrap();
        let mut e = build::engine(&cfg, &crate::events::ProjectedState::default()).unwrap();
        let mut log = MemoryStore::default();
        log.append(&[Event::of(T0, "gateway", &crate::events::payload::ConfigRecorded::of(&cfg))]).unwrap();
        for v in &fleet {
            log.append(&e.on_state(T0, v.id.clone(), Some(v.clone())).1.into_iter().collect::<Vec<_>>()).unwrap();
        }
        let mut now = T0;
        let mut pending: Vec<(Timestamp, VehicleId, Ack)> = Vec::new();
        let mut projection = DispatchProjection::new();
        // The same log folded from its text, as the SQLite store reads it (the fast paths
        // of `apply_text` included).
        let mut from_text = DispatchProjection::new();
        let mut folded = 0u64;
        // Carries out the steps of one input (a timeout may settle several dispatches at
        // once), logs their events, folds them and compares.
        let mut record = |e: &mut Engine, steps: Vec<Step>, t: Timestamp, rng: &mut Rng, pending: &mut Vec<_>| {
            for step in steps {
                schedule_answers(&step.orders, t, rng, pending, (0.15, 0.3), 2_500.0);
                log.append(&step.events).unwrap();
            }
            for row in log.read_from(folded + 1, usize::MAX).unwrap() {
                projection.apply(&row).unwrap();
                let text = row.payload.to_string();
                from_text.apply_text(row.seq, row.ts_ms, &row.kind, row.correlation_id.as_deref(), &text).unwrap();
                folded = row.seq;
            }
            same_state(e, projection.state(), t, seed);
            same_state(e, from_text.state(), t, seed);
        };
        // The latest input's time: the clock never runs back (a commitment the engine let
        // expire would be in force again for the log).
        let mut latest = T0;
        for k in 0..40 {
            now = now.max(latest).plus_millis((rng.next() * 1_500.0) as i64);
            // Now and then a vehicle's state changes, or it leaves and comes back.
            let v = &fleet[(rng.next() * fleet.len() as f64) as usize];
            let state = match rng.next() {
                r if r < 0.15 => None,
                r if r < 0.5 => Some(Vehicle { soc: (v.soc + 0.1 * rng.next()).min(0.95), ..v.clone() }),
                _ => Some(v.clone()),
            };
            let events: Vec<Event> = e.on_state(now, v.id.clone(), state).1.into_iter().collect();
            record(&mut e, vec![Step { events, ..Step::default() }], now, &mut rng, &mut pending);
            let replaces = (rng.next() < 0.25 && k > 0).then(|| format!("s{}", k - 1));
            let sig = Signal {
                id: format!("s{k}"),
                direction: if rng.next() < 0.7 { Direction::Up } else { Direction::Down },
                power_kw: 10.0 + 150.0 * rng.next(),
                start: now,
                duration_s: 5 + (rng.next() * 40.0) as u64,
                replaces,
                ..signal("", 1.0)
            };
            if let Ok(step) = e.on_signal(now, sig) {
                record(&mut e, vec![step], now, &mut rng, &mut pending);
            }
            let until = now.plus_millis(1_000);
            while let Some((t, is_ack)) = next_input(&e, &mut pending, until) {
                let t = t.max(now);
                latest = t;
                if is_ack {
                    let (_, vid, a) = pending.remove(0);
                    if let Ok(step) = e.on_ack(t, &vid, &a) {
                        record(&mut e, vec![step], t, &mut rng, &mut pending);
                    }
                    // ACKs are recorded in batches, as the runtime does shortly after.
                    if rng.next() < 0.5 {
                        let step = e.record_acks();
                        record(&mut e, vec![step], t, &mut rng, &mut pending);
                    }
                } else {
                    let steps = e.on_timeout(t);
                    record(&mut e, steps, t, &mut rng, &mut pending);
                }
            }
        }
        // The audit re-runs every decision of the run from the log alone, and agrees.
        let rows = log.read_from(1, usize::MAX).unwrap();
        let mut auditor = crate::replay::audit::Auditor::new(None, None);
        rows.iter().for_each(|r| auditor.apply(r).unwrap());
        let report = auditor.finish();
        assert!(report.findings.is_empty(), "seed {seed}: {:?}", report.findings);
        assert!(report.plans > 20 && report.not_checked == 0, "seed {seed}: {report:?}");
        if fallback == "balanced" {
            assert!(report.fallbacks > 0, "seed {seed}: {report:?}");
        }
        // Compaction: the state at any row, written as a snapshot's JSON and read back,
        // then folded on with the rows after it, gives the state of the whole fold.
        let whole = projection.state().clone();
        for _ in 0..4 {
            let cut = (rng.next() * rows.len() as f64) as usize;
            let mut head = DispatchProjection::new();
            rows[..cut].iter().for_each(|r| head.apply(r).unwrap());
            let json = serde_json::to_string(head.state()).unwrap();
            let back: crate::events::ProjectedState = serde_json::from_str(&json).unwrap();
            assert_eq!(&back, head.state(), "seed {seed}: the state at row {cut} reads back from its JSON");
            let mut resumed = DispatchProjection::resume(back);
            rows[cut..].iter().for_each(|r| resumed.apply(r).unwrap());
            assert_eq!(resumed.state(), &whole, "seed {seed}: resumed from row {cut}");
        }
    }
}

/// What the live engine holds equals what the projection of its log says, once every ACK
/// taken is recorded (an ACK not yet recorded is known in memory only).
fn same_state(e: &Engine, s: &crate::events::ProjectedState, now: Timestamp, seed: u64) {
    let fleet: BTreeMap<VehicleId, Vehicle> = e.planner().fleet().map(|v| (v.id.clone(), v.clone())).collect();
    assert_eq!(fleet, s.fleet, "seed {seed}: fleet");
    let in_flight: BTreeSet<&str> = e.book().ids().collect();
    assert_eq!(in_flight, s.in_flight.keys().map(DispatchId::as_str).collect(), "seed {seed}: dispatches in flight");
    let mut live: Vec<(String, f64, bool)> =
        e.ledger().iter().filter(|c| c.until > now).map(|c| (c.order_id.to_string(), c.power_kw, c.accepted)).collect();
    let mut projected: Vec<(String, f64, bool)> = s
        .commitments_at(now)
        .into_iter()
        .map(|(_, o, accepted)| (o.order_id.to_string(), o.power_kw, accepted))
        .collect();
    live.sort_by(|a, b| a.0.cmp(&b.0));
    projected.sort_by(|a, b| a.0.cmp(&b.0));
    if e.has_unrecorded_acks() {
        // ACKs not yet recorded: for the log those orders are still outstanding (a rejected
        // one still committed), which errs on the safe side.
        let outstanding: BTreeMap<&str, f64> = projected.iter().map(|(id, kw, _)| (id.as_str(), *kw)).collect();
        for (id, kw, _) in &live {
            assert_eq!(outstanding.get(id.as_str()), Some(kw), "seed {seed}: {id} committed live, not in the log");
        }
    } else {
        assert_eq!(live, projected, "seed {seed}: commitments at {now:?}");
    }
    let seen: Vec<&str> = e.planner().seen_signals().collect();
    assert_eq!(seen, s.signal_ids.iter().map(String::as_str).collect::<Vec<_>>(), "seed {seed}: signals seen");
    assert_eq!(e.planner().dispatch_count(), s.dispatches, "seed {seed}: numbering");
    let mut rebuilt = Planner::new(EngineConfig::default(), Box::new(SimpleVehicleFilter), Box::new(EqualDispatcher));
    rebuilt.remember_participation(&s.participation.iter().cloned().collect::<Vec<_>>());
    let scores = |p: &Planner| {
        let mut v: Vec<(VehicleId, f64)> = p.participation().iter().map(|(k, x)| (k.clone(), *x)).collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    };
    assert_eq!(scores(&rebuilt), scores(e.planner()), "seed {seed}: fairness scores");
}

/// ACKs taken are recorded at a deadline of the engine's own, [`ACK_RECORD_DELAY_MS`] after
/// the first of them (on virtual time: the runtime only arms a timer for
/// `next_deadline`), in one event per attempt; a dispatch that settles sooner records its
/// ACKs itself, and no record is then due.
#[test]
fn acks_are_recorded_at_an_engine_deadline_after_the_first_unrecorded_one() {
    let mut p = with_fleet(planner(FallbackKind::Noop), &fleet(3));
    let step = p.on_signal(T0, signal("s1", 25.0)).unwrap();
    p.published(step.orders[0].dispatch_id.as_str(), T0);
    let window = p.next_deadline().unwrap();
    assert_eq!(window, T0.plus_millis(p.planner().config().ack_timeout_ms));
    let at = T0.plus_millis(10);
    let first = p.on_ack(at, &step.orders[0].vehicle_id, &ack(&step.orders[0], AckStatus::Accepted)).unwrap();
    assert!(first.events.is_empty(), "an ACK is recorded later, with others");
    let later = at.plus_millis(50);
    p.on_ack(later, &step.orders[1].vehicle_id, &ack(&step.orders[1], AckStatus::Accepted)).unwrap();
    let due = at.plus_millis(ACK_RECORD_DELAY_MS);
    assert_eq!(p.next_deadline(), Some(due.min(window)), "counted from the first unrecorded ACK");
    assert!(p.on_timeout(due.plus_millis(-1)).is_empty(), "nothing is due before");
    let steps = p.on_timeout(due);
    let recorded: Vec<EventKind> = steps.iter().flat_map(|s| s.events.iter().map(|e| e.kind)).collect();
    assert_eq!(recorded, [EventKind::AckReceived], "both ACKs in one event");
    assert_eq!(p.next_deadline(), Some(window), "only the ACK window is left");
    // The last ACK settles the dispatch, which records its own: no record is due after.
    let last = p.on_ack(due, &step.orders[2].vehicle_id, &ack(&step.orders[2], AckStatus::Accepted)).unwrap();
    assert!(last.events.iter().any(|e| e.kind == EventKind::AckReceived) && !last.outcomes.is_empty());
    assert_eq!(p.next_deadline(), None);
}

/// A log that cannot be written: signals are refused (and counted), the log is tried again
/// at an engine deadline every [`LOG_PROBE_EVERY_MS`] with a step that records
/// `LogRecovered`; the outage ends when a step is written, and signals are taken again.
#[test]
fn a_log_outage_refuses_signals_and_is_probed_at_an_engine_deadline() {
    let mut p = with_fleet(planner(FallbackKind::Noop), &fleet(2));
    p.log_failed(T0, "disk full");
    let refused = p.on_signal(T0.plus_millis(10), signal("s1", 5.0)).unwrap_err();
    assert!(matches!(refused, SignalRefused::LogUnwritable { .. }) && refused.to_string().contains("disk full"));
    assert_eq!(p.next_deadline(), Some(T0.plus_millis(LOG_PROBE_EVERY_MS)));
    assert!(p.on_timeout(T0.plus_millis(LOG_PROBE_EVERY_MS - 1)).is_empty());
    let probe = p.on_timeout(T0.plus_millis(LOG_PROBE_EVERY_MS));
    let recovered = probe[0].events[0].payload_value();
    assert_eq!(probe[0].events[0].kind, EventKind::LogRecovered);
    assert_eq!((recovered["error"].as_str(), recovered["signals_refused"].as_u64()), (Some("disk full"), Some(1)));
    // That probe failed too: the next is a second later; then one is written.
    p.log_failed(T0.plus_millis(LOG_PROBE_EVERY_MS), "disk full");
    assert_eq!(p.next_deadline(), Some(T0.plus_millis(2 * LOG_PROBE_EVERY_MS)));
    let ended = p.log_written().expect("an outage ended");
    assert_eq!((ended.since, ended.refused), (T0, 1));
    assert_eq!(p.next_deadline(), None);
    assert!(p.on_signal(T0.plus_millis(2_500), signal("s1", 5.0)).is_ok(), "a refused signal's id stays usable");
}
