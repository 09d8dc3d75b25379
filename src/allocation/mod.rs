//! Allocation: how much power each eligible vehicle is asked for.
//!
//! A [`Dispatcher`] gets the eligible vehicles as [`Candidate`]s, each with its effective
//! capacity for the signal already worked out (after what is committed), and the shared
//! [`limits`] rows with the room they have left, and returns one power per candidate. The
//! invariants every strategy keeps (property-tested): no candidate gets more than its
//! capacity or less than 0, no row is exceeded, the total never exceeds the target, and
//! (through [`repair`]) the total is the most the capacities and limits allow up to the
//! target.
//!
//! - [`filter`]: which vehicles may take part; [`limits`]: site, group and phase rows.
//! - Equal and Smart (here), [`lp`] (clarabel), [`segments`] (per-segment strategies).
//! - [`policy`]: the configured strategy per signal type, LP-first, and the repair.
//! - [`repair`]: the delivery guarantee and the LP polish.

pub mod filter;
pub mod limits;
pub mod lp;
pub mod policy;
pub mod repair;
pub mod segments;

use std::cmp::Ordering;

use serde::{Deserialize, Serialize};

use crate::allocation::limits::{LimitSet, Room};
use crate::model::{Direction, Signal, StrategyKind, Vehicle};
use crate::time::Timestamp;

/// Allocations below this many kW are dropped: nobody orders a vehicle for 1 W.
pub const MIN_ORDER_KW: f64 = 0.01;

/// Tolerance for "the target is met", kW.
pub const EPS_KW: f64 = 1e-6;

/// An eligible vehicle, as a strategy sees it.
#[derive(Clone, Copy, Debug)]
pub struct Candidate<'a> {
    /// Its latest state.
    pub vehicle: &'a Vehicle,
    /// Its effective capacity for this signal, kW.
    pub capacity_kw: f64,
    /// How much it has been used lately (0 = not at all); lowers its Smart score.
    pub participation: f64,
}

/// What to allocate.
#[derive(Clone, Copy, Debug)]
pub struct AllocationRequest<'a> {
    /// The signal being served.
    pub signal: &'a Signal,
    /// The time of the decision.
    pub now: Timestamp,
    /// Power to allocate, kW.
    pub target_kw: f64,
    /// The eligible vehicles.
    pub candidates: &'a [Candidate<'a>],
    /// The shared limits over those candidates.
    pub limits: &'a LimitSet,
}

/// A strategy's answer.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Allocation {
    /// Which strategy produced it.
    pub strategy: StrategyKind,
    /// Power per candidate, kW, in the candidates' order.
    pub power_kw: Vec<f64>,
    /// Per-candidate score, where the strategy scores (empty otherwise).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub scores: Vec<f64>,
    /// Allocation rounds used (solver iterations for the LP).
    pub rounds: u32,
    /// The solver's report, when an LP ran (even one that failed).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub solver: Option<crate::allocation::lp::SolverReport>,
    /// Why the strategy that ran is not the one asked for (LP failed, ...).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
    /// The score weights used, where one set was.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub weights: Option<Weights>,
}

impl Allocation {
    /// Total allocated power, kW.
    pub fn total_kw(&self) -> f64 {
        self.power_kw.iter().sum()
    }
}

/// An allocation strategy.
pub trait Dispatcher: Send {
    /// Its name in events and outcomes.
    fn kind(&self) -> StrategyKind;
    /// Splits `req.target_kw` over `req.candidates` within `req.limits`.
    fn allocate(&mut self, req: &AllocationRequest<'_>) -> Allocation;

    /// Replaces the weights used for signals of `kind` (the tuner's output). Strategies
    /// without weights ignore it.
    fn set_weights(&mut self, _kind: crate::model::SignalType, _weights: Weights) {}
}

impl Allocation {
    /// An allocation by a heuristic.
    pub fn heuristic(strategy: StrategyKind, power_kw: Vec<f64>, scores: Vec<f64>, rounds: u32) -> Self {
        Self { strategy, power_kw, scores, rounds, solver: None, note: None, weights: None }
    }
}

/// The penalty per kW of shortfall in the dispatch objective, for these scores: high enough
/// that delivering more always beats delivering to better-scored vehicles (a kW moved
/// between vehicles shifts at most 3 kW of phase room), small enough to keep the score
/// term well inside the solver's tolerance.
pub fn shortfall_penalty(scores: &[f64]) -> f64 {
    3.0 * scores.iter().copied().fold(0.0, f64::max) + 1.0
}

/// The dispatch objective every strategy is judged by: the weighted score of the allocated
/// power less the penalised shortfall, `sum(score * p) - penalty * (target - sum(p))`.
pub fn objective(scores: &[f64], power_kw: &[f64], target_kw: f64) -> f64 {
    let total: f64 = power_kw.iter().sum();
    let score: f64 = scores.iter().zip(power_kw).map(|(s, p)| s * p).sum();
    score - shortfall_penalty(scores) * (target_kw - total).max(0.0)
}

/// Equal shares: every candidate gets the same power, except those whose capacity is
/// smaller, which get their capacity (water-filling; exact, O(n log n)).
#[derive(Clone, Copy, Debug, Default)]
pub struct EqualDispatcher;

impl Dispatcher for EqualDispatcher {
    fn kind(&self) -> StrategyKind {
        StrategyKind::Equal
    }

    fn allocate(&mut self, req: &AllocationRequest<'_>) -> Allocation {
        let caps: Vec<f64> = req.candidates.iter().map(|c| c.capacity_kw).collect();
        if req.limits.is_empty() {
            return Allocation::heuristic(StrategyKind::Equal, water_fill(&caps, req.target_kw), Vec::new(), 1);
        }
        // Equal weights through the limit-aware proportional fill: equal shares, clipped
        // by each vehicle's capacity and the room left in its rows.
        let ones = vec![1.0; caps.len()];
        let (power_kw, rounds) = proportional_fill(&ones, &caps, req.target_kw, 64, req.limits);
        Allocation::heuristic(StrategyKind::Equal, power_kw, Vec::new(), rounds)
    }
}

/// Water-filling: the largest level `l` with `sum(min(cap, l)) <= target`; each gets `min(cap, l)`.
pub fn water_fill(caps: &[f64], target: f64) -> Vec<f64> {
    let mut order: Vec<usize> = (0..caps.len()).filter(|&i| caps[i] > 0.0).collect();
    order.sort_unstable_by(|&a, &b| caps[a].total_cmp(&caps[b]));
    let mut out = vec![0.0; caps.len()];
    let mut remaining = target.max(0.0);
    let mut left = order.len();
    let mut level = f64::INFINITY;
    for &i in &order {
        let share = remaining / left as f64;
        if caps[i] <= share {
            out[i] = caps[i];
            remaining -= caps[i];
            left -= 1;
        } else {
            level = share;
            break;
        }
    }
    if level.is_finite() {
        for &i in &order {
            if out[i] == 0.0 {
                out[i] = level;
            }
        }
    }
    out
}

/// Weights of the Smart score's features; the config names them `soc`, `time`,
/// `priority`, `availability`, `price` and `wear`. Each is within 0..=1.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Weights {
    /// Energy headroom in the signal's direction.
    #[serde(default)]
    pub soc: f64,
    /// Time until departure.
    #[serde(default)]
    pub time: f64,
    /// The vehicle's stated priority.
    #[serde(default)]
    pub priority: f64,
    /// Its availability.
    #[serde(default)]
    pub availability: f64,
    /// Cheapness of its energy.
    #[serde(default)]
    pub price: f64,
    /// Low battery wear.
    #[serde(default)]
    pub wear: f64,
}

impl Weights {
    /// The defaults per service: FCR and aFRR favour vehicles that answer (availability)
    /// and have room; mFRR favours energy and time; demand response favours price.
    pub fn default_for(kind: crate::model::SignalType) -> Self {
        use crate::model::SignalType::*;
        let w =
            |soc, time, priority, availability, price, wear| Weights { soc, time, priority, availability, price, wear };
        match kind {
            Fcr => w(0.6, 0.3, 0.3, 1.0, 0.1, 0.4),
            Afrr | Transfer => w(0.7, 0.5, 0.4, 0.8, 0.2, 0.3),
            Mfrr => w(0.8, 0.7, 0.4, 0.6, 0.3, 0.3),
            Dr => w(0.5, 0.5, 0.4, 0.5, 1.0, 0.2),
        }
    }

    fn sum(&self) -> f64 {
        self.soc + self.time + self.priority + self.availability + self.price + self.wear
    }
}

/// A vehicle's features, each normalised to 0..=1 (1 = better to use).
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct Features {
    /// Energy headroom over its usable SoC window.
    pub soc: f64,
    /// Time between the signal's end and departure, over [`SmartDispatcher::horizon_s`].
    pub time: f64,
    /// Stated priority.
    pub priority: f64,
    /// Availability.
    pub availability: f64,
    /// Price rank among the candidates (1 = cheapest).
    pub price: f64,
    /// `1 - degradation`.
    pub wear: f64,
}

impl Features {
    /// The weighted mean of the features, 0..=1.
    pub fn score(&self, w: &Weights) -> f64 {
        let total = w.sum();
        if total <= 0.0 {
            return 1.0;
        }
        (w.soc * self.soc
            + w.time * self.time
            + w.priority * self.priority
            + w.availability * self.availability
            + w.price * self.price
            + w.wear * self.wear)
            / total
    }
}

/// The weighted heuristic. Each candidate gets a score (the weighted mean of its
/// normalised [`Features`], divided by `1 + fairness * participation` so that vehicles
/// used often rest); then in each of at most `max_rounds` rounds the unplaced power is
/// split over the unsaturated candidates in proportion to their scores, capped at each
/// one's capacity. Power still unplaced after the last round goes to the best-scored
/// candidates with room, so the target is met whenever the capacity exists.
#[derive(Clone, Debug)]
pub struct SmartDispatcher {
    /// Weights per service, indexed by [`crate::model::SignalType::code`].
    pub weights: [Weights; 5],
    /// Bound on proportional rounds.
    pub max_rounds: u32,
    /// How strongly participation lowers a score.
    pub fairness: f64,
    /// Departures this far after the signal's end, or further, count as "no hurry", seconds.
    pub horizon_s: f64,
}

impl Default for SmartDispatcher {
    fn default() -> Self {
        Self {
            weights: crate::model::SignalType::ALL.map(Weights::default_for),
            max_rounds: 8,
            fairness: 0.5,
            horizon_s: 8.0 * 3600.0,
        }
    }
}

impl SmartDispatcher {
    /// The features of every candidate for this request.
    pub fn features(&self, req: &AllocationRequest<'_>) -> Vec<Features> {
        let (lo, hi) = req.candidates.iter().fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), c| {
            (lo.min(c.vehicle.price_per_kwh), hi.max(c.vehicle.price_per_kwh))
        });
        let end = req.signal.end();
        req.candidates
            .iter()
            .map(|c| {
                let v = c.vehicle;
                let window = (v.max_soc - v.min_soc) * v.capacity_kwh;
                let soc = if window > 0.0 {
                    (v.energy_headroom_kwh(req.signal.direction) / window).clamp(0.0, 1.0)
                } else {
                    0.0
                };
                let time = v.departure.map_or(1.0, |d| (end.secs_until(d) / self.horizon_s).clamp(0.0, 1.0));
                let price = if hi > lo { (hi - v.price_per_kwh) / (hi - lo) } else { 1.0 };
                Features {
                    soc,
                    time,
                    priority: v.priority,
                    availability: v.availability,
                    price,
                    wear: 1.0 - v.degradation,
                }
            })
            .collect()
    }
}

impl SmartDispatcher {
    /// Each candidate's score for this request: the weighted mean of its features under the
    /// signal type's weights, lowered by its participation. The LP maximises the same.
    pub fn scores(&self, req: &AllocationRequest<'_>) -> Vec<f64> {
        self.scores_with(req, &self.weights[usize::from(req.signal.kind.code())])
    }

    /// [`SmartDispatcher::scores`] under explicit weights.
    pub fn scores_with(&self, req: &AllocationRequest<'_>, w: &Weights) -> Vec<f64> {
        self.features(req)
            .iter()
            .zip(req.candidates)
            .map(|(f, c)| f.score(w) / (1.0 + self.fairness * c.participation.max(0.0)))
            .collect()
    }
}

impl Dispatcher for SmartDispatcher {
    fn kind(&self) -> StrategyKind {
        StrategyKind::Smart
    }

    fn set_weights(&mut self, kind: crate::model::SignalType, weights: Weights) {
        self.weights[usize::from(kind.code())] = weights;
    }

    fn allocate(&mut self, req: &AllocationRequest<'_>) -> Allocation {
        let scores = self.scores(req);
        let caps: Vec<f64> = req.candidates.iter().map(|c| c.capacity_kw).collect();
        let (power_kw, rounds) = proportional_fill(&scores, &caps, req.target_kw, self.max_rounds, req.limits);
        let mut a = Allocation::heuristic(StrategyKind::Smart, power_kw, scores, rounds);
        a.weights = Some(self.weights[usize::from(req.signal.kind.code())]);
        a
    }
}

/// Splits `target` over candidates in proportion to `weights`, capped at `caps` and at the
/// room left in the shared `limits`, in at most `max_rounds` rounds; what is left then goes
/// to the highest weights with room (a weight of 0 still gets power when nothing else has
/// room). Within a round, candidates are served by descending weight, so when a shared row
/// binds the better-scored ones keep their share. Returns the powers and rounds used.
pub fn proportional_fill(
    weights: &[f64],
    caps: &[f64],
    target: f64,
    max_rounds: u32,
    limits: &LimitSet,
) -> (Vec<f64>, u32) {
    let n = caps.len();
    let mut out = vec![0.0; n];
    let mut room = Room::new(limits);
    let total_cap: f64 = caps.iter().map(|c| c.max(0.0)).sum();
    let mut remaining = target.max(0.0).min(total_cap);
    let by_weight = |idx: &mut Vec<usize>| {
        idx.sort_by(|&a, &b| weights[b].partial_cmp(&weights[a]).unwrap_or(Ordering::Equal).then(a.cmp(&b)))
    };
    let mut active: Vec<usize> = (0..n).filter(|&i| caps[i] > 0.0 && weights[i] > 0.0).collect();
    by_weight(&mut active);
    let mut full = vec![false; n];
    let mut rounds = 0;
    while rounds < max_rounds && remaining > EPS_KW && !active.is_empty() {
        rounds += 1;
        let wsum: f64 = active.iter().map(|&i| weights[i]).sum();
        let round_total = remaining;
        let mut saturated = false;
        for &i in &active {
            let want = (round_total * weights[i] / wsum).min(caps[i] - out[i]);
            let give = room.allow(i, want).min(remaining);
            out[i] += give;
            room.take(i, give);
            remaining -= give;
            if give < want - EPS_KW || caps[i] - out[i] <= EPS_KW {
                full[i] = true;
                saturated = true;
            }
        }
        if saturated {
            active.retain(|&i| !full[i]);
        }
    }
    if remaining > EPS_KW {
        let mut order: Vec<usize> = (0..n).filter(|&i| caps[i] - out[i] > 0.0).collect();
        by_weight(&mut order);
        for i in order {
            let give = room.allow(i, remaining.min(caps[i] - out[i]));
            out[i] += give;
            room.take(i, give);
            remaining -= give;
            if remaining <= EPS_KW {
                break;
            }
        }
    }
    (out, rounds)
}

/// The exact optimum of the dispatch objective when the shared rows do not overlap (each
/// vehicle in at most one group, plus the site row; no phases): sort by score, fill each
/// vehicle to the least of its capacity, its rows' room and what is left of the target.
/// The LP's test oracle, and where the LP's class form opens its windows.
pub fn greedy_fill(scores: &[f64], caps: &[f64], target: f64, limits: &LimitSet) -> Vec<f64> {
    let mut order: Vec<usize> = (0..caps.len()).collect();
    order.sort_by(|&a, &b| scores[b].partial_cmp(&scores[a]).unwrap_or(Ordering::Equal).then(a.cmp(&b)));
    let mut room = Room::new(limits);
    let mut out = vec![0.0; caps.len()];
    let mut remaining = target.max(0.0);
    for i in order {
        let give = room.allow(i, caps[i].max(0.0).min(remaining));
        out[i] = give;
        room.take(i, give);
        remaining -= give;
    }
    out
}

/// The direction a capacity is measured in, for readers of [`Candidate::capacity_kw`].
pub fn capacity_of(v: &Vehicle, direction: Direction, duration_s: u64) -> f64 {
    v.effective_capacity(direction, 0.0, duration_s as f64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::SignalType;
    use proptest::prelude::*;

    fn signal(kind: SignalType, power_kw: f64) -> Signal {
        Signal {
            id: "s".into(),
            kind,
            direction: Direction::Up,
            power_kw,
            start: Timestamp::from_millis(0),
            duration_s: 900,
            region: None,
            leader_term: None,
            replaces: None,
            program: None,
            unknown_fields: Vec::new(),
        }
    }

    fn run(d: &mut dyn Dispatcher, fleet: &[Vehicle], target: f64, participation: &[f64]) -> Allocation {
        let sig = signal(SignalType::Afrr, target);
        let cands: Vec<Candidate> = fleet
            .iter()
            .zip(participation.iter().chain(std::iter::repeat(&0.0)))
            .map(|(v, &p)| Candidate {
                vehicle: v,
                capacity_kw: capacity_of(v, sig.direction, sig.duration_s),
                participation: p,
            })
            .collect();
        let limits = LimitSet::none(cands.len());
        d.allocate(&AllocationRequest {
            signal: &sig,
            now: Timestamp::from_millis(0),
            target_kw: target,
            candidates: &cands,
            limits: &limits,
        })
    }

    #[test]
    fn water_fill_gives_small_vehicles_their_capacity_and_the_rest_equal_shares() {
        let out = water_fill(&[2.0, 10.0, 10.0, 0.0], 12.0);
        assert_eq!(out, vec![2.0, 5.0, 5.0, 0.0]);
        assert_eq!(water_fill(&[2.0, 3.0], 100.0), vec![2.0, 3.0]);
        assert_eq!(water_fill(&[], 5.0), Vec::<f64>::new());
    }

    #[test]
    fn smart_prefers_high_scores() {
        let mut good = Vehicle::new("good", 0.9, 60.0, 11.0);
        good.availability = 1.0;
        let mut poor = Vehicle::new("poor", 0.3, 60.0, 11.0);
        poor.availability = 0.6;
        poor.degradation = 0.5;
        let a = run(&mut SmartDispatcher::default(), &[good, poor], 8.0, &[]);
        assert!(a.power_kw[0] > a.power_kw[1], "{a:?}");
        assert!((a.total_kw() - 8.0).abs() < 1e-9);
    }

    #[test]
    fn participation_lowers_a_vehicles_share() {
        let fleet = [Vehicle::new("a", 0.8, 60.0, 11.0), Vehicle::new("b", 0.8, 60.0, 11.0)];
        let a = run(&mut SmartDispatcher::default(), &fleet, 10.0, &[3.0, 0.0]);
        assert!(a.power_kw[0] < a.power_kw[1], "{a:?}");
    }

    #[test]
    fn smart_meets_the_target_even_when_rounds_run_out() {
        let fleet: Vec<Vehicle> =
            (0..50).map(|i| Vehicle::new(format!("v{i}"), 0.25 + i as f64 * 0.01, 60.0, 11.0)).collect();
        let mut d = SmartDispatcher { max_rounds: 1, ..SmartDispatcher::default() };
        let cap: f64 = run(&mut d, &fleet, 1e9, &[]).total_kw();
        let a = run(&mut d, &fleet, cap * 0.95, &[]);
        assert!((a.total_kw() - cap * 0.95).abs() < 1e-6);
    }

    fn arb_fleet() -> impl Strategy<Value = Vec<Vehicle>> {
        prop::collection::vec(
            (0.0f64..=1.0, 10.0f64..100.0, 0.0f64..50.0, 0.0f64..=1.0, 0.0f64..=1.0, any::<bool>()),
            0..40,
        )
        .prop_map(|specs| {
            specs
                .into_iter()
                .enumerate()
                .map(|(i, (soc, cap, kw, avail, degr, plugged))| {
                    let mut v = Vehicle::new(format!("v{i}"), soc, cap, kw);
                    v.availability = avail;
                    v.degradation = degr;
                    v.plugged_in = plugged;
                    v
                })
                .collect()
        })
    }

    proptest! {
        #[test]
        fn allocations_stay_within_capacity_and_meet_feasible_targets(
            fleet in arb_fleet(),
            target in 0.0f64..2000.0,
            rounds in 1u32..10,
            participation in prop::collection::vec(0.0f64..5.0, 0..40),
        ) {
            let mut smart = SmartDispatcher { max_rounds: rounds, ..SmartDispatcher::default() };
            let mut equal = EqualDispatcher;
            for d in [&mut equal as &mut dyn Dispatcher, &mut smart] {
                let a = run(d, &fleet, target, &participation);
                let caps: Vec<f64> = fleet.iter().map(|v| capacity_of(v, Direction::Up, 900)).collect();
                for (p, c) in a.power_kw.iter().zip(&caps) {
                    prop_assert!(*p >= 0.0 && *p <= c + 1e-9, "{:?}: {} > {}", d.kind(), p, c);
                }
                let total: f64 = caps.iter().sum();
                prop_assert!(a.total_kw() <= target + 1e-6);
                if total >= target {
                    prop_assert!((a.total_kw() - target).abs() <= 1e-6 * target.max(1.0), "{:?}: {} != {}", d.kind(), a.total_kw(), target);
                } else {
                    prop_assert!((a.total_kw() - total).abs() <= 1e-6 * total.max(1.0));
                }
            }
        }
    }
}
