//! Allocation speed: Equal and Smart over 100, 1,000 and 10,000 eligible vehicles.
//!
//! `cargo bench -p gridweaver-core --bench allocation`

use criterion::{black_box, criterion_group, criterion_main, BenchmarkId, Criterion};
use gridweaver_core::dispatch::{AllocationRequest, Candidate, Dispatcher, EqualDispatcher, SmartDispatcher};
use gridweaver_core::model::{Direction, Signal, SignalType, Vehicle};
use gridweaver_core::time::Timestamp;

/// A deterministic, varied fleet (no rand dependency: a fixed LCG).
fn fleet(n: usize) -> Vec<Vehicle> {
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
            v
        })
        .collect()
}

fn bench(c: &mut Criterion) {
    let mut group = c.benchmark_group("allocate");
    for n in [100usize, 1_000, 10_000] {
        let vehicles = fleet(n);
        let signal = Signal {
            id: "bench".into(),
            kind: SignalType::Afrr,
            direction: Direction::Up,
            power_kw: 0.0,
            start: Timestamp::from_millis(0),
            duration_s: 900,
            region: None,
            leader_term: None,
        };
        let candidates: Vec<Candidate<'_>> = vehicles
            .iter()
            .enumerate()
            .map(|(i, v)| Candidate {
                vehicle: v,
                capacity_kw: v.effective_capacity(Direction::Up, 0.0, 900.0),
                participation: (i % 4) as f64,
            })
            .collect();
        let capacity: f64 = candidates.iter().map(|c| c.capacity_kw).sum();
        // 60 % of what the fleet can give: enough that many vehicles saturate.
        let req = AllocationRequest {
            signal: &signal,
            now: Timestamp::from_millis(0),
            target_kw: 0.6 * capacity,
            candidates: &candidates,
        };
        let smart = SmartDispatcher::default();
        group.bench_with_input(BenchmarkId::new("equal", n), &req, |b, req| {
            b.iter(|| EqualDispatcher.allocate(black_box(req)))
        });
        group.bench_with_input(BenchmarkId::new("smart", n), &req, |b, req| b.iter(|| smart.allocate(black_box(req))));
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
