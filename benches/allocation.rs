//! Allocation speed.
//!
//! `cargo bench -p gridweaver-core --bench allocation`
//!
//! - `allocate/{equal,smart}/N`: no shared limits, N = 100, 1,000, 10,000 eligible vehicles.
//! - `limited/{lp,smart,equal,segmented}/N`: N = 100, 1,000, 5,000 vehicles in 20 feeder
//!   groups (and three segments, one of them LP), with a site export limit and three phase
//!   limits that bind (problem build included for the LP).
//!
//! - `limited/smart+repair/N`: Smart through the configured policy, with the repair step
//!   that tops a heuristic's shortfall up to the most the limits allow (the LP over Smart's
//!   scores, run only when Smart falls short).
//! - `phase_bound/lp/N`: the LP at N = 1,000 and 5,000 with only phase limits, binding hard
//!   (the class form has to widen its first windows; rounds printed).
//! - `plan/engine/N`: the whole plan of a signal by the dispatch engine at N vehicles with
//!   binding limits, against a ledger that already holds an accepted dispatch of the same
//!   fleet (candidates with their committed power, rows less the committed load, Smart with
//!   the repair, the plan's events and orders); each iteration then withdraws the dispatch
//!   again (`Engine::abort`), which is included.
//!
//! Before timing, the LP's objective on each limited instance is compared with a reference
//! solve at clarabel's defaults plus iterative refinement and a 1e-10 gap, and printed.

use std::collections::BTreeMap;

use criterion::{black_box, criterion_group, criterion_main, BenchmarkId, Criterion};
use gridweaver_core::allocation::filter::SimpleVehicleFilter;
use gridweaver_core::allocation::limits::LimitSet;
use gridweaver_core::allocation::limits::Limits;
use gridweaver_core::allocation::lp::{Formulation, LpDispatcher, LpSettings};
use gridweaver_core::allocation::policy::Strategies;
use gridweaver_core::allocation::segments::SegmentedSmartDispatcher;
use gridweaver_core::allocation::{
    objective, AllocationRequest, Candidate, Dispatcher, EqualDispatcher, SmartDispatcher, Weights,
};
use gridweaver_core::config::Segment;
use gridweaver_core::dispatch::{Engine, EngineConfig, Planner};
use gridweaver_core::model::{Ack, AckStatus, Direction, Phase, Signal, SignalType, StrategyKind, Vehicle, Wiring};
use gridweaver_core::time::Timestamp;

/// A deterministic, varied fleet (no rand dependency: a fixed LCG).
fn fleet(n: usize, groups: usize) -> Vec<Vehicle> {
    let mut x: u64 = 0x2545_F491_4F6C_DD1D;
    let mut next = move || {
        x = x.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
        (x >> 11) as f64 / (1u64 << 53) as f64
    };
    (0..n)
        .map(|i| {
            let mut v =
                Vehicle::new(format!("ev{i:05}"), 0.25 + 0.7 * next(), 40.0 + 80.0 * next(), 7.0 + 43.0 * next());
            v.availability = 0.6 + 0.4 * next();
            v.degradation = 0.2 * next();
            v.priority = next();
            v.price_per_kwh = 0.1 + 0.2 * next();
            v.departure = Some(Timestamp::from_millis(3_600_000 * (1 + (next() * 10.0) as i64)));
            if groups > 0 {
                v.group = Some(format!("feeder{:02}", i % groups));
                v.segment = Some(["buses", "vans", "cars"][i % 3].to_owned());
            }
            let r = next();
            v.wiring = if r < 0.7 {
                Wiring::ThreePhase
            } else if r < 0.8 {
                Wiring::SinglePhase(Phase::L1)
            } else if r < 0.9 {
                Wiring::SinglePhase(Phase::L2)
            } else {
                Wiring::SinglePhase(Phase::L3)
            };
            v
        })
        .collect()
}

fn signal() -> Signal {
    Signal::new("bench", SignalType::Fcr, Direction::Up, 0.0, Timestamp::from_millis(0))
}

fn candidates(vehicles: &[Vehicle]) -> Vec<Candidate<'_>> {
    vehicles
        .iter()
        .enumerate()
        .map(|(i, v)| Candidate {
            vehicle: v,
            capacity_kw: v.effective_capacity(Direction::Up, 0.0, 900.0),
            participation: (i % 4) as f64,
        })
        .collect()
}

/// Limits that bind: groups at 60 % of their members' capacity, each phase at 30 % of the
/// fleet's, the site at 80 %.
fn binding_limits(cands: &[Candidate<'_>]) -> Limits {
    let total: f64 = cands.iter().map(|c| c.capacity_kw).sum();
    let mut groups: BTreeMap<String, f64> = BTreeMap::new();
    for c in cands {
        if let Some(g) = &c.vehicle.group {
            *groups.entry(g.clone()).or_default() += 0.6 * c.capacity_kw;
        }
    }
    Limits { export_kw: Some(0.8 * total), import_kw: None, groups, phase_kw: Some(0.3 * total) }
}

fn unlimited(c: &mut Criterion) {
    let mut group = c.benchmark_group("allocate");
    let sig = signal();
    for n in [100usize, 1_000, 10_000] {
        let vehicles = fleet(n, 0);
        let cands = candidates(&vehicles);
        let capacity: f64 = cands.iter().map(|c| c.capacity_kw).sum();
        let limits = LimitSet::none(n);
        // 60 % of what the fleet can give: enough that many vehicles saturate.
        let req = AllocationRequest {
            signal: &sig,
            now: Timestamp::from_millis(0),
            target_kw: 0.6 * capacity,
            candidates: &cands,
            limits: &limits,
        };
        let mut smart = SmartDispatcher::default();
        group.bench_with_input(BenchmarkId::new("equal", n), &req, |b, req| {
            b.iter(|| EqualDispatcher.allocate(black_box(req)))
        });
        group.bench_with_input(BenchmarkId::new("smart", n), &req, |b, req| b.iter(|| smart.allocate(black_box(req))));
    }
    group.finish();
}

fn limited(c: &mut Criterion) {
    let mut group = c.benchmark_group("limited");
    let sig = signal();
    for n in [100usize, 1_000, 5_000] {
        let vehicles = fleet(n, 20);
        let cands = candidates(&vehicles);
        let capacity: f64 = cands.iter().map(|c| c.capacity_kw).sum();
        let limits = LimitSet::new(&binding_limits(&cands), Direction::Up, &cands);
        let req = AllocationRequest {
            signal: &sig,
            now: Timestamp::from_millis(0),
            target_kw: 0.7 * capacity,
            candidates: &cands,
            limits: &limits,
        };
        let mut lp = LpDispatcher::default();
        let mut smart = SmartDispatcher::default();
        let scores = smart.scores(&req);
        let (power, report) = lp.solve(&req, &scores).expect("the LP solves");
        let reference_settings = LpSettings {
            tol_gap: 1e-10,
            tol_feas: 1e-10,
            equilibrate: true,
            iterative_refinement: true,
            ..LpSettings::default()
        };
        let (_, reference) =
            LpDispatcher::new(SmartDispatcher::default(), reference_settings).solve(&req, &scores).expect("reference");
        let smart_obj = objective(&scores, &smart.allocate(&req).power_kw, req.target_kw);
        eprintln!(
            "n={n}: lp {} ({}, {} variables, {} rows) in {} iterations over {} rounds, objective {:.6} (reference {:.6}, relative gap {:.1e}); smart objective {:.6}; \
             lp delivers {:.1} of {:.1} kW",
            report.status,
            report.formulation,
            report.variables,
            report.constraints,
            report.iterations,
            report.rounds,
            report.objective,
            reference.objective,
            (report.objective - reference.objective).abs() / reference.objective.abs().max(1.0),
            smart_obj,
            power.iter().sum::<f64>(),
            req.target_kw
        );
        group.bench_with_input(BenchmarkId::new("lp", n), &req, |b, req| {
            b.iter(|| {
                let scores = lp.scoring.scores(req);
                lp.solve(black_box(req), &scores)
            })
        });
        group.bench_with_input(BenchmarkId::new("smart", n), &req, |b, req| b.iter(|| smart.allocate(black_box(req))));
        group.bench_with_input(BenchmarkId::new("equal", n), &req, |b, req| {
            b.iter(|| EqualDispatcher.allocate(black_box(req)))
        });
        let mut segmented = SegmentedSmartDispatcher::new(segments(), SmartDispatcher::default());
        group.bench_with_input(BenchmarkId::new("segmented", n), &req, |b, req| {
            b.iter(|| segmented.allocate(black_box(req)))
        });
        let mut policy = Strategies::new(StrategyKind::Smart, SmartDispatcher::default(), LpSettings::default());
        let repaired = policy.allocate(&req);
        eprintln!(
            "n={n}: smart places {:.1} kW, smart+repair {:.1} kW ({})",
            smart.allocate(&req).total_kw(),
            repaired.total_kw(),
            repaired.note.as_deref().unwrap_or_default()
        );
        group.bench_with_input(BenchmarkId::new("smart+repair", n), &req, |b, req| {
            b.iter(|| policy.allocate(black_box(req)))
        });
    }
    group.finish();
}

/// The LP where the phases bind hardest (each at 12 % of the fleet's capacity, no other
/// row): the greedy fill that opens the class form's windows gives the phases to the
/// best-scored single-phase vehicles, the optimum shares them with three-phase ones, so
/// windows have to be widened (the rounds are printed).
fn phase_bound(c: &mut Criterion) {
    let mut group = c.benchmark_group("phase_bound");
    let sig = signal();
    for n in [1_000usize, 5_000] {
        let vehicles = fleet(n, 20);
        let cands = candidates(&vehicles);
        let capacity: f64 = cands.iter().map(|c| c.capacity_kw).sum();
        let limits = Limits { phase_kw: Some(0.12 * capacity), ..Limits::default() };
        let limits = LimitSet::new(&limits, Direction::Up, &cands);
        let req = AllocationRequest {
            signal: &sig,
            now: Timestamp::from_millis(0),
            target_kw: 0.7 * capacity,
            candidates: &cands,
            limits: &limits,
        };
        let mut lp = LpDispatcher::default();
        let scores = lp.scoring.scores(&req);
        let (power, report) = lp.solve(&req, &scores).expect("the LP solves");
        let per_vehicle = LpSettings { formulation: Formulation::PerVehicle, ..LpSettings::default() };
        let (_, reference) =
            LpDispatcher::new(SmartDispatcher::default(), per_vehicle).solve(&req, &scores).expect("reference");
        eprintln!(
            "n={n}, phases binding: lp {} ({}, {} rows) in {} iterations over {} rounds, objective {:.6} \
             (per vehicle {:.6}, relative gap {:.1e}); delivers {:.1} of {:.1} kW",
            report.status,
            report.formulation,
            report.constraints,
            report.iterations,
            report.rounds,
            report.objective,
            reference.objective,
            (report.objective - reference.objective).abs() / reference.objective.abs().max(1.0),
            power.iter().sum::<f64>(),
            req.target_kw
        );
        group.bench_with_input(BenchmarkId::new("lp", n), &req, |b, req| {
            b.iter(|| {
                let scores = lp.scoring.scores(req);
                lp.solve(black_box(req), &scores)
            })
        });
    }
    group.finish();
}

/// The engine's whole plan against a ledger holding an earlier accepted dispatch.
fn plan(c: &mut Criterion) {
    let mut group = c.benchmark_group("plan");
    for n in [1_000usize, 5_000] {
        let vehicles = fleet(n, 20);
        let cands = candidates(&vehicles);
        let capacity: f64 = cands.iter().map(|c| c.capacity_kw).sum();
        let cfg = EngineConfig { limits: binding_limits(&cands), max_in_flight: 1_000_000, ..EngineConfig::default() };
        let strategy = Strategies::new(StrategyKind::Smart, SmartDispatcher::default(), LpSettings::default());
        let mut engine = Engine::new(Planner::new(cfg, Box::new(SimpleVehicleFilter), Box::new(strategy)));
        let t = Timestamp::from_millis(0);
        for v in &vehicles {
            engine.on_state(t, v.id.clone(), Some(v.clone()));
        }
        let first = engine.on_signal(t, Signal { id: "first".into(), power_kw: 0.3 * capacity, ..signal() }).unwrap();
        for o in &first.orders {
            let ack = Ack { order_id: o.order_id.to_string(), status: AckStatus::Accepted, reason: None };
            engine.on_ack(t, &o.vehicle_id, &ack).unwrap();
        }
        let mut k = 0u64;
        group.bench_function(BenchmarkId::new("engine", n), |b| {
            b.iter(|| {
                k += 1;
                let sig = Signal { id: format!("s{k}"), power_kw: 0.4 * capacity, ..signal() };
                let step = engine.on_signal(t, black_box(sig)).unwrap();
                let id = step.orders.first().map(|o| o.dispatch_id.to_string()).unwrap_or_default();
                black_box(&step);
                engine.abort(t, &id, "bench")
            })
        });
    }
    group.finish();
}

/// Three segments: buses and cars by the heuristic, vans by the LP.
fn segments() -> BTreeMap<String, Segment> {
    let w = |soc, time, availability| Weights { soc, time, priority: 0.3, availability, price: 0.2, wear: 0.3 };
    BTreeMap::from([
        ("buses".to_owned(), Segment { lp: false, fallback: true, weights: w(1.0, 0.2, 0.5) }),
        ("vans".to_owned(), Segment { lp: true, fallback: true, weights: w(0.5, 1.0, 0.8) }),
        ("cars".to_owned(), Segment { lp: false, fallback: false, weights: w(0.6, 0.6, 1.0) }),
    ])
}

criterion_group!(benches, unlimited, limited, phase_bound, plan);
criterion_main!(benches);
