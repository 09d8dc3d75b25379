//! Reallocation of what the first attempt of a dispatch did not deliver.
//!
//! When a dispatch's first orders are settled (every vehicle answered, or the ACK deadline
//! passed) the residual, `target - accepted`, goes to a [`Fallback`]. It sees only the
//! vehicles that accepted, each with the capacity it has left on top of what it accepted,
//! and returns extra power per vehicle; those become attempt-2 orders.

use serde::Serialize;

use crate::allocation::limits::LimitSet;
use crate::allocation::proportional_fill;
use crate::model::{FallbackKind, Vehicle};

/// A vehicle that accepted its first order, and what it can still give.
#[derive(Clone, Copy, Debug)]
pub struct FallbackCandidate<'a> {
    /// Its state when the dispatch was planned.
    pub vehicle: &'a Vehicle,
    /// Effective capacity left after the power it accepted, kW.
    pub remaining_kw: f64,
}

/// A fallback's answer: extra power per candidate, kW, in the candidates' order.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Reallocation {
    /// Power per candidate.
    pub power_kw: Vec<f64>,
    /// Why candidates got nothing, by index, where the fallback skips some.
    pub skipped: Vec<usize>,
}

/// A reallocation rule.
pub trait Fallback: Send {
    /// Its name in events and outcomes.
    fn kind(&self) -> FallbackKind;
    /// Spreads `residual_kw` over `candidates` within the room `limits` has left.
    fn reallocate(&self, residual_kw: f64, candidates: &[FallbackCandidate<'_>], limits: &LimitSet) -> Reallocation;
}

/// Never reallocates: the residual is the dispatch's shortfall.
#[derive(Clone, Copy, Debug, Default)]
pub struct NoopFallback;

impl Fallback for NoopFallback {
    fn kind(&self) -> FallbackKind {
        FallbackKind::Noop
    }

    fn reallocate(&self, _residual_kw: f64, candidates: &[FallbackCandidate<'_>], _limits: &LimitSet) -> Reallocation {
        Reallocation { power_kw: vec![0.0; candidates.len()], skipped: Vec::new() }
    }
}

/// Spreads the residual over the vehicles that accepted, in proportion to their remaining
/// effective capacity weighted by SoC (`remaining_kw * soc`), capped at that capacity,
/// skipping vehicles below [`BalancedFallback::min_soc`] (30 % by default) in either
/// direction. What cannot be placed stays a shortfall.
#[derive(Clone, Copy, Debug)]
pub struct BalancedFallback {
    /// Vehicles below this SoC are not asked again.
    pub min_soc: f64,
}

impl Default for BalancedFallback {
    fn default() -> Self {
        Self { min_soc: 0.3 }
    }
}

impl Fallback for BalancedFallback {
    fn kind(&self) -> FallbackKind {
        FallbackKind::Balanced
    }

    fn reallocate(&self, residual_kw: f64, candidates: &[FallbackCandidate<'_>], limits: &LimitSet) -> Reallocation {
        let mut skipped = Vec::new();
        let caps: Vec<f64> = candidates
            .iter()
            .enumerate()
            .map(|(i, c)| {
                if c.vehicle.soc < self.min_soc {
                    skipped.push(i);
                    0.0
                } else {
                    c.remaining_kw.max(0.0)
                }
            })
            .collect();
        let weights: Vec<f64> = caps.iter().zip(candidates).map(|(cap, c)| cap * c.vehicle.soc).collect();
        let (power_kw, _) = proportional_fill(&weights, &caps, residual_kw, u32::MAX, limits);
        Reallocation { power_kw, skipped }
    }
}

/// Orders the residual to the vehicles most likely to deliver it.
///
/// Each candidate delivers an ordered kW with probability `q = availability * (1 -
/// degradation)` (its stated availability, or the prediction from its ACK history). The
/// residual is spread in proportion to `q` (the reliable and healthy get more), each
/// vehicle capped at what it has left and every shared row at its room; vehicles with `q`
/// below `min_probability` are not asked. Like every strategy and fallback it orders
/// min(residual, the most the capacities and limits allow), never more: a shortfall of
/// the ones who then reject is the next attempt's to cover, not an over-order's.
#[derive(Clone, Copy, Debug)]
pub struct ProbabilisticFallback {
    /// Vehicles less likely than this to deliver are not asked.
    pub min_probability: f64,
}

impl Default for ProbabilisticFallback {
    fn default() -> Self {
        Self { min_probability: 0.05 }
    }
}

impl Fallback for ProbabilisticFallback {
    fn kind(&self) -> FallbackKind {
        FallbackKind::Probabilistic
    }

    fn reallocate(&self, residual_kw: f64, candidates: &[FallbackCandidate<'_>], limits: &LimitSet) -> Reallocation {
        let q: Vec<f64> = candidates
            .iter()
            .map(|c| (c.vehicle.availability * (1.0 - c.vehicle.degradation)).clamp(0.0, 1.0))
            .collect();
        let skipped: Vec<usize> = (0..candidates.len()).filter(|&i| q[i] < self.min_probability).collect();
        let weights: Vec<f64> = q.iter().map(|&p| if p < self.min_probability { 0.0 } else { p }).collect();
        let caps: Vec<f64> = candidates
            .iter()
            .zip(&weights)
            .map(|(c, w)| if *w > 0.0 { c.remaining_kw.max(0.0) } else { 0.0 })
            .collect();
        let (power_kw, _) = proportional_fill(&weights, &caps, residual_kw.max(0.0), u32::MAX, limits);
        Reallocation { power_kw, skipped }
    }
}

/// The fallback named in config.
pub fn by_kind(kind: FallbackKind) -> Box<dyn Fallback> {
    match kind {
        FallbackKind::Noop => Box::new(NoopFallback),
        FallbackKind::Balanced => Box::new(BalancedFallback::default()),
        FallbackKind::Probabilistic => Box::new(ProbabilisticFallback::default()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::allocation::limits::Limits;
    use proptest::prelude::*;

    fn cands(fleet: &[(Vehicle, f64)]) -> Vec<FallbackCandidate<'_>> {
        fleet.iter().map(|(v, r)| FallbackCandidate { vehicle: v, remaining_kw: *r }).collect()
    }

    #[test]
    fn noop_places_nothing() {
        let fleet = [(Vehicle::new("a", 0.8, 60.0, 11.0), 5.0)];
        assert_eq!(NoopFallback.reallocate(3.0, &cands(&fleet), &LimitSet::none(1)).power_kw, vec![0.0]);
    }

    #[test]
    fn balanced_skips_low_soc_and_weights_by_soc() {
        let fleet = [
            (Vehicle::new("low", 0.25, 60.0, 11.0), 5.0),
            (Vehicle::new("mid", 0.4, 60.0, 11.0), 5.0),
            (Vehicle::new("high", 0.8, 60.0, 11.0), 5.0),
        ];
        let r = BalancedFallback::default().reallocate(3.0, &cands(&fleet), &LimitSet::none(3));
        assert_eq!(r.power_kw[0], 0.0);
        assert_eq!(r.skipped, vec![0]);
        assert!((r.power_kw[2] - 2.0 * r.power_kw[1]).abs() < 1e-9, "{r:?}");
        assert!((r.power_kw.iter().sum::<f64>() - 3.0).abs() < 1e-9);
    }

    #[test]
    fn balanced_caps_at_remaining_capacity_and_reports_what_it_cannot_place() {
        let fleet = [(Vehicle::new("a", 0.9, 60.0, 11.0), 1.0), (Vehicle::new("b", 0.5, 60.0, 11.0), 2.0)];
        let r = BalancedFallback::default().reallocate(10.0, &cands(&fleet), &LimitSet::none(2));
        assert_eq!(r.power_kw, vec![1.0, 2.0]);
    }

    #[test]
    fn probabilistic_orders_the_residual_to_the_likeliest_first() {
        let mut sure = Vehicle::new("sure", 0.8, 60.0, 22.0);
        sure.availability = 1.0;
        let mut coin = Vehicle::new("coin", 0.8, 60.0, 22.0);
        coin.availability = 0.5;
        let mut never = Vehicle::new("never", 0.8, 60.0, 22.0);
        never.availability = 0.01;
        let fleet = [(sure, 20.0), (coin, 20.0), (never, 20.0)];
        let r = ProbabilisticFallback::default().reallocate(9.0, &cands(&fleet), &LimitSet::none(3));
        assert_eq!(r.skipped, vec![2]);
        assert_eq!(r.power_kw[2], 0.0);
        assert!((r.power_kw.iter().sum::<f64>() - 9.0).abs() < 1e-9, "exactly the residual: {r:?}");
        // Shares go by probability: 6 kW to `sure`, 3 to `coin`.
        assert!((r.power_kw[0] - 6.0).abs() < 1e-9 && (r.power_kw[1] - 3.0).abs() < 1e-9, "{r:?}");
    }

    #[test]
    fn probabilistic_respects_limits_on_the_ordered_power() {
        let mut a = Vehicle::new("a", 0.8, 60.0, 22.0);
        a.availability = 0.5;
        let fleet = [(a, 20.0)];
        let c = cands(&fleet);
        let limits = Limits { export_kw: Some(4.0), ..Limits::default() };
        let cand = [crate::allocation::Candidate { vehicle: c[0].vehicle, capacity_kw: 20.0, participation: 0.0 }];
        let set = LimitSet::new(&limits, crate::model::Direction::Up, &cand);
        let r = ProbabilisticFallback::default().reallocate(10.0, &c, &set);
        assert!((r.power_kw[0] - 4.0).abs() < 1e-9, "the site row caps the order: {r:?}");
    }

    proptest! {
        #[test]
        fn probabilistic_never_exceeds_remaining_capacity_limits_or_the_residual(
            specs in prop::collection::vec((0.0f64..=1.0, 0.0f64..=1.0, 0.0f64..20.0), 0..30),
            residual in 0.0f64..300.0,
            site in prop::option::of(1.0f64..200.0),
        ) {
            let fleet: Vec<(Vehicle, f64)> = specs.iter().enumerate().map(|(i, (avail, degr, rem))| {
                let mut v = Vehicle::new(format!("v{i}"), 0.8, 60.0, 22.0);
                v.availability = *avail;
                v.degradation = *degr;
                (v, *rem)
            }).collect();
            let c = cands(&fleet);
            let as_cands: Vec<crate::allocation::Candidate> =
                c.iter().map(|f| crate::allocation::Candidate { vehicle: f.vehicle, capacity_kw: f.remaining_kw, participation: 0.0 }).collect();
            let set = LimitSet::new(&Limits { export_kw: site, ..Limits::default() }, crate::model::Direction::Up, &as_cands);
            let r = ProbabilisticFallback::default().reallocate(residual, &c, &set);
            for ((_, rem), p) in fleet.iter().zip(&r.power_kw) {
                prop_assert!(*p >= 0.0 && *p <= rem + 1e-9);
            }
            prop_assert!(set.violations(&r.power_kw, 1e-6).is_empty());
            prop_assert!(r.power_kw.iter().sum::<f64>() <= residual + 1e-6);
        }

        #[test]
        fn balanced_never_exceeds_remaining_capacity(
            specs in prop::collection::vec((0.0f64..=1.0, 0.0f64..20.0), 0..30),
            residual in 0.0f64..300.0,
        ) {
            let fleet: Vec<(Vehicle, f64)> = specs.iter().enumerate()
                .map(|(i, (soc, rem))| (Vehicle::new(format!("v{i}"), *soc, 60.0, 22.0), *rem)).collect();
            let r = BalancedFallback::default().reallocate(residual, &cands(&fleet), &LimitSet::none(fleet.len()));
            let mut room = 0.0;
            for ((v, rem), p) in fleet.iter().zip(&r.power_kw) {
                prop_assert!(*p >= 0.0 && *p <= rem + 1e-9);
                if v.soc < 0.3 { prop_assert_eq!(*p, 0.0); } else { room += rem; }
            }
            let placed: f64 = r.power_kw.iter().sum();
            prop_assert!((placed - residual.min(room)).abs() <= 1e-6 * residual.max(1.0));
        }
    }
}
