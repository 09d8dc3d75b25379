use std::collections::BTreeSet;

use super::*;
use crate::dispatch::{EqualDispatcher, SmartDispatcher};
use crate::fallback::{BalancedFallback, Fallback, NoopFallback};
use crate::filter::SimpleVehicleFilter;
use crate::model::SignalType;
use proptest::prelude::*;

const T0: Timestamp = Timestamp::from_millis(1_795_000_000_000);

fn planner(fallback: FallbackKind) -> Planner {
    planner_with(fallback, Box::new(SmartDispatcher::default()))
}

fn planner_with(fallback: FallbackKind, strategy: Box<dyn Dispatcher>) -> Planner {
    let cfg = EngineConfig { region: "north".into(), ack_timeout_ms: 2_000, fallback, ..EngineConfig::default() };
    Planner::new(cfg, Box::new(SimpleVehicleFilter), strategy)
}

fn with_fleet(mut p: Planner, fleet: &[Vehicle]) -> Planner {
    for v in fleet {
        p.apply_state(T0, v.id.clone(), Some(v.clone()));
    }
    p
}

fn fleet(n: usize) -> Vec<Vehicle> {
    (0..n).map(|i| Vehicle::new(format!("v{i:02}"), 0.5 + 0.04 * i as f64, 60.0, 10.0)).collect()
}

fn signal(id: &str, kw: f64) -> Signal {
    Signal {
        id: id.into(),
        kind: SignalType::Afrr,
        direction: Direction::Up,
        power_kw: kw,
        start: T0,
        duration_s: 900,
        region: None,
        leader_term: None,
    }
}

fn ack(o: &Order, status: AckStatus) -> Ack {
    Ack { order_id: o.order_id.clone(), status, reason: None }
}

fn kinds(step: &Step) -> Vec<EventKind> {
    step.events.iter().map(|e| e.kind).collect()
}

fn run_fallback(book: &mut DispatchBook, now: Timestamp, step: &mut Step, f: &dyn Fallback) {
    if let Some(req) = step.fallback.take() {
        let realloc = f.reallocate(req.residual_kw, &req.fallback_candidates(), &req.limits);
        let next = book.apply_fallback(now, &req, &realloc);
        step.merge(next);
    }
}

#[test]
fn all_vehicles_ack_and_the_dispatch_completes_without_fallback() {
    let mut p = with_fleet(planner(FallbackKind::Balanced), &fleet(4));
    let (d, step) = p.plan(T0, signal("s1", 30.0)).unwrap();
    assert_eq!(
        kinds(&step)[..3],
        [EventKind::SignalReceived, EventKind::ConstraintApplied, EventKind::DispatchPlanCreated]
    );
    assert_eq!(step.orders.len(), 4);
    assert!(step.events[3..].iter().all(|e| e.kind == EventKind::OrderSent));
    assert_eq!(step.deadline, Some(T0.plus_millis(2_000)));
    let total: f64 = step.orders.iter().map(|o| o.power_kw).sum();
    assert!((total - 30.0).abs() < 1e-9);

    let mut book = DispatchBook::new();
    book.insert(d);
    let mut last = Step::default();
    for o in &step.orders {
        last = book.on_ack(T0.plus_millis(10), &o.vehicle_id, &ack(o, AckStatus::Accepted)).unwrap();
    }
    let out = last.outcome.clone().expect("settles when the last ACK arrives");
    assert_eq!(kinds(&last), [EventKind::AckReceived, EventKind::DispatchCompleted]);
    assert!((out.acknowledged_kw - 30.0).abs() < 1e-9 && out.shortfall_kw < 1e-9);
    assert_eq!(out.vehicles, VehicleCounts { accepted: 4, rejected: 0, timed_out: 0 });
    assert!(book.is_empty());
}

#[test]
fn silent_vehicles_time_out_and_the_fallback_asks_those_that_accepted() {
    let mut p = with_fleet(planner_with(FallbackKind::Balanced, Box::new(EqualDispatcher)), &fleet(4));
    let (d, step) = p.plan(T0, signal("s1", 24.0)).unwrap();
    let mut book = DispatchBook::new();
    book.insert(d);
    // Two answer, two stay silent.
    for o in &step.orders[..2] {
        let s = book.on_ack(T0.plus_millis(5), &o.vehicle_id, &ack(o, AckStatus::Accepted)).unwrap();
        assert!(s.outcome.is_none() && s.fallback.is_none());
    }
    assert!(book.on_timeout(T0.plus_millis(1_999)).is_empty());
    let deadline = book.next_deadline().unwrap();
    let mut steps = book.on_timeout(deadline);
    assert_eq!(steps.len(), 1);
    let mut step2 = steps.remove(0);
    assert_eq!(kinds(&step2), [EventKind::AckTimedOut, EventKind::AckTimedOut]);
    let req = step2.fallback.as_ref().expect("residual goes to the fallback");
    assert_eq!(req.candidates.len(), 2);
    assert!((req.residual_kw - 12.0).abs() < 1e-9);
    run_fallback(&mut book, deadline, &mut step2, &BalancedFallback::default());
    assert_eq!(step2.events.last().map(|e| e.kind), Some(EventKind::OrderSent));
    assert!(step2.events.iter().any(|e| e.kind == EventKind::FallbackApplied));
    // Each accepted 6 kW of 10 kW: 4 kW left each, 8 kW in all.
    let placed: f64 = step2.orders.iter().map(|o| o.power_kw).sum();
    assert!((placed - 8.0).abs() < 1e-9, "{placed}");
    assert!(step2.orders.iter().all(|o| o.attempt == 2));

    let mut last = Step::default();
    for o in &step2.orders {
        last = book.on_ack(deadline.plus_millis(5), &o.vehicle_id, &ack(o, AckStatus::Accepted)).unwrap();
    }
    let out = last.outcome.unwrap();
    assert!((out.acknowledged_kw - 20.0).abs() < 1e-9);
    assert!((out.shortfall_kw - 4.0).abs() < 1e-9);
    assert_eq!(out.vehicles, VehicleCounts { accepted: 4, rejected: 0, timed_out: 2 });
    assert_eq!(out.fallback, FallbackKind::Balanced);
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
    let mut p = Planner::new(cfg, Box::new(SimpleVehicleFilter), Box::new(EqualDispatcher));
    for v in &fleet {
        p.apply_state(T0, v.id.clone(), Some(v.clone()));
    }
    let (d, step) = p.plan(T0, signal("s1", 24.0)).unwrap();
    let mut book = DispatchBook::new();
    book.insert(d);
    // All but the last accept: the residual goes to the fallback round.
    for o in &step.orders[..2] {
        book.on_ack(T0, &o.vehicle_id, &ack(o, AckStatus::Accepted)).unwrap();
    }
    let steps = book.on_timeout(T0.plus_millis(1_000));
    let req = steps[0].fallback.as_ref().expect("a fallback round");
    let asked: Vec<&str> = req.candidates.iter().map(|(v, _)| v.id.0.as_str()).collect();
    assert_eq!(asked, ["v01"], "the bus (fallback: false) is not asked again");
}

#[test]
fn rejections_count_and_noop_leaves_the_shortfall() {
    let mut p = with_fleet(planner(FallbackKind::Noop), &fleet(3));
    let (d, step) = p.plan(T0, signal("s1", 30.0)).unwrap();
    let mut book = DispatchBook::new();
    book.insert(d);
    let mut last = Step::default();
    for (i, o) in step.orders.iter().enumerate() {
        let status = if i == 0 { AckStatus::Rejected } else { AckStatus::Accepted };
        last = book.on_ack(T0, &o.vehicle_id, &ack(o, status)).unwrap();
    }
    let out = last.outcome.unwrap();
    assert_eq!(out.vehicles.rejected, 1);
    assert!((out.shortfall_kw - 10.0).abs() < 1e-9);
}

#[test]
fn duplicates_other_regions_and_stale_terms_are_refused() {
    let mut p = with_fleet(planner(FallbackKind::Balanced), &fleet(2));
    p.plan(T0, signal("s1", 5.0)).unwrap();
    assert_eq!(p.plan(T0, signal("s1", 5.0)).unwrap_err(), SignalRefused::Duplicate("s1".into()));
    let mut other = signal("s2", 5.0);
    other.region = Some("south".into());
    assert!(matches!(p.plan(T0, other).unwrap_err(), SignalRefused::OtherRegion { .. }));
    let mut own = signal("s2", 5.0);
    own.region = Some("north".into());
    assert!(p.plan(T0, own).is_ok(), "a refused signal's id stays usable");
    let transfer = |id: &str, term| Signal { kind: SignalType::Transfer, leader_term: Some(term), ..signal(id, 1.0) };
    p.plan(T0, transfer("t1", 7)).unwrap();
    assert_eq!(p.plan(T0, transfer("t2", 6)).unwrap_err(), SignalRefused::StaleTerm { got: 6, highest: 7 });
    p.remember_signal("old");
    assert!(matches!(p.plan(T0, signal("old", 1.0)), Err(SignalRefused::Duplicate(_))));
}

#[test]
fn acks_from_the_wrong_vehicle_unknown_late_or_repeated_are_ignored() {
    let mut p = with_fleet(planner(FallbackKind::Noop), &fleet(2));
    let (d, step) = p.plan(T0, signal("s1", 12.0)).unwrap();
    let mut book = DispatchBook::new();
    book.insert(d);
    let (a, b) = (&step.orders[0], &step.orders[1]);
    let wrong = book.on_ack(T0, &b.vehicle_id, &ack(a, AckStatus::Accepted)).unwrap_err();
    assert!(matches!(wrong, AckIgnored::WrongVehicle { .. }));
    let unknown = Ack { order_id: "nope".into(), status: AckStatus::Accepted, reason: None };
    assert!(matches!(book.on_ack(T0, &a.vehicle_id, &unknown), Err(AckIgnored::UnknownOrder(_))));
    book.on_ack(T0, &a.vehicle_id, &ack(a, AckStatus::Accepted)).unwrap();
    let again = book.on_ack(T0, &a.vehicle_id, &ack(a, AckStatus::Accepted)).unwrap_err();
    assert!(matches!(again, AckIgnored::AlreadyAnswered(_)));
    // After the deadline the dispatch has settled: b's ACK is late.
    let steps = book.on_timeout(T0.plus_millis(2_000));
    assert!(steps[0].outcome.is_some());
    assert!(matches!(
        book.on_ack(T0.plus_millis(2_001), &b.vehicle_id, &ack(b, AckStatus::Accepted)),
        Err(AckIgnored::Late(_))
    ));
}

#[test]
fn a_signal_no_vehicle_can_serve_completes_at_once_with_a_full_shortfall() {
    let mut v = Vehicle::new("flat", 0.2, 60.0, 11.0);
    v.plugged_in = false;
    let mut p = with_fleet(planner(FallbackKind::Balanced), &[v]);
    let (d, step) = p.plan(T0, signal("s1", 50.0)).unwrap();
    assert!(d.is_done());
    let out = step.outcome.clone().unwrap();
    assert_eq!(out.shortfall_kw, 50.0);
    assert_eq!(*kinds(&step).last().unwrap(), EventKind::DispatchCompleted);
    let constraint = &step.events[1].payload_value();
    assert_eq!(constraint["excluded"][0]["reason"], "not_plugged_in");
}

#[test]
fn shutdown_settles_what_is_in_flight() {
    let mut p = with_fleet(planner(FallbackKind::Balanced), &fleet(3));
    let (d, step) = p.plan(T0, signal("s1", 15.0)).unwrap();
    let mut book = DispatchBook::new();
    book.insert(d);
    book.on_ack(T0, &step.orders[0].vehicle_id, &ack(&step.orders[0], AckStatus::Accepted)).unwrap();
    let steps = book.shutdown(T0.plus_millis(100), "shutdown");
    assert_eq!(steps.len(), 1);
    let out = steps[0].outcome.as_ref().unwrap();
    assert_eq!(out.vehicles.timed_out, 2);
    assert!(steps[0].fallback.is_none());
    let done = steps[0].events.last().unwrap();
    assert_eq!(done.payload_value()["interrupted"], "shutdown");
    assert!(book.is_empty());
}

#[test]
fn fleet_changes_produce_discovery_and_loss_events() {
    let mut p = planner(FallbackKind::Balanced);
    let v = Vehicle::new("v1", 0.5, 60.0, 11.0);
    let (c, e) = p.apply_state(T0, v.id.clone(), Some(v.clone()));
    assert_eq!((c, e.map(|e| e.kind)), (FleetChange::Discovered, Some(EventKind::VehicleDiscovered)));
    assert_eq!(p.apply_state(T0, v.id.clone(), Some(v.clone())).0, FleetChange::Updated);
    let cap = p.capacity(T0);
    assert_eq!((cap.up_kw, cap.down_kw, cap.vehicles), (11.0, 11.0, 1));
    let (c, e) = p.apply_state(T0, v.id.clone(), None);
    assert_eq!((c, e.map(|e| e.kind)), (FleetChange::Lost, Some(EventKind::VehicleLost)));
    assert_eq!(p.apply_state(T0, v.id, None).0, FleetChange::Unchanged);
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
        let mut p = Planner::new(cfg, Box::new(SimpleVehicleFilter), strategy);
        for v in &fleet {
            p.apply_state(T0, v.id.clone(), Some(v.clone()));
        }
        let fb: Box<dyn Fallback> =
            if fallback == FallbackKind::Noop { Box::new(NoopFallback) } else { Box::new(BalancedFallback::default()) };
        let mut book = DispatchBook::new();
        let mut now = T0;
        // Pending ACKs: (due, vehicle, ack).
        let mut pending: Vec<(Timestamp, VehicleId, Ack)> = Vec::new();
        let mut outcomes = Vec::new();
        let mut events = Vec::new();
        let schedule = |orders: &[Order], now: Timestamp, rng: &mut Rng, pending: &mut Vec<_>| {
            for o in orders {
                let r = rng.next();
                if r < 0.15 {
                    continue; // silent
                }
                let status = if r < 0.25 { AckStatus::Rejected } else { AckStatus::Accepted };
                let delay = (rng.next() * 1_400.0) as i64; // some land after the deadline
                pending.push((now.plus_millis(delay), o.vehicle_id.clone(), ack(o, status)));
            }
        };
        for k in 0..15 {
            let kw = 20.0 + 400.0 * rng.next();
            let (d, mut step) = p.plan(now, Signal { id: format!("s{k}"), start: now, ..signal("", kw) }).unwrap();
            for o in &step.orders {
                let v = p.vehicle(&o.vehicle_id).unwrap();
                assert!(SimpleVehicleFilter.check(v, d.signal()).is_ok(), "order to a filtered-out vehicle");
                assert!(o.power_kw <= v.effective_capacity(Direction::Up, 0.0, 900.0) + 1e-9);
            }
            book.insert(d);
            schedule(&step.orders, now, &mut rng, &mut pending);
            events.append(&mut step.events);
            outcomes.extend(step.outcome.take());
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
                    run_fallback(&mut book, now, &mut s, fb.as_ref());
                    schedule(&s.orders, now, &mut rng, &mut pending);
                    events.append(&mut s.events);
                    outcomes.extend(s.outcome.take());
                }
            }
            now = now.plus_millis(5_000);
        }
        assert!(book.is_empty(), "seed {seed}: every dispatch settles");
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
            let sent = events
                .iter()
                .filter(|e| e.kind == EventKind::OrderSent && e.correlation_id.as_deref() == Some(&o.dispatch_id))
                .count() as u32;
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
        let (_, step) = p.plan(T0, sig.clone()).unwrap();
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
    p.set_prediction(crate::prediction::PredictionEngine::default());
    let misses: Vec<(VehicleId, Timestamp, bool)> =
        (0..30).map(|k| (flaky.id.clone(), T0.plus_millis(-k * 60_000), false)).collect();
    p.observe_answers(&misses);
    let cap = p.capacity(T0);
    assert!(cap.up_kw < 10.0 + 2.0, "the flaky vehicle's capacity is discounted: {cap:?}");
    let (_, step) = p.plan(T0, signal("s1", 10.0)).unwrap();
    let plan = &step.events[2].payload_value();
    assert_eq!(plan["predicted_availability"], serde_json::json!(["flaky"]));
    let power = |id: &str| step.orders.iter().find(|o| o.vehicle_id.0 == id).map_or(0.0, |o| o.power_kw);
    assert!(power("steady") > power("flaky"), "{:?}", step.orders);
}

#[test]
fn settled_dispatches_report_each_vehicles_answer_and_tuned_weights_reach_the_strategy() {
    let mut p = with_fleet(planner(FallbackKind::Noop), &fleet(2));
    let (d, step) = p.plan(T0, signal("s1", 12.0)).unwrap();
    let mut book = DispatchBook::new();
    book.insert(d);
    book.on_ack(T0, &step.orders[0].vehicle_id, &ack(&step.orders[0], AckStatus::Accepted)).unwrap();
    let done = book.on_timeout(T0.plus_millis(2_000)).remove(0);
    let mut answers: Vec<(String, bool)> = done.answers.iter().map(|(v, _, ok)| (v.0.clone(), *ok)).collect();
    answers.sort();
    assert_eq!(answers, [("v00".to_owned(), true), ("v01".to_owned(), false)]);

    let tuned =
        crate::dispatch::Weights { availability: 0.123, ..crate::dispatch::Weights::default_for(SignalType::Afrr) };
    p.set_weights(SignalType::Afrr, tuned);
    let (_, step) = p.plan(T0, signal("s2", 5.0)).unwrap();
    assert_eq!(step.events[2].payload_value()["weights"]["availability"], 0.123);
}
