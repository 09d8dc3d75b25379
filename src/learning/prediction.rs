//! Availability prediction from a vehicle's ACK history.
//!
//! Each answered or unanswered order is an observation `(time, delivered?)`. For a vehicle
//! the engine fits `availability(h) = b0 + b1 cos(2 pi h / 24) + b2 sin(2 pi h / 24)` (h =
//! hour of day, UTC) by weighted ridge regression: each observation weighs
//! `0.5^(age / half_life)` (recent answers count most), and the ridge pulls toward a prior
//! of `prior_mean` with no daily swing, with the strength of `prior_weight` observations,
//! so a vehicle with little history stays near the prior. The 3x3 normal equations are
//! solved with nalgebra's Cholesky. The prediction is clamped to `floor..=1`.
//!
//! It feeds the Smart scores and the probabilistic fallback for vehicles whose state does
//! not state an `availability` (see `Planner`).

use std::collections::{HashMap, VecDeque};
use std::f64::consts::PI;

use nalgebra::{Matrix3, Vector3};

use crate::model::VehicleId;
use crate::time::Timestamp;

/// Settings of the [`PredictionEngine`].
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct PredictionConfig {
    /// Age at which an observation weighs half, days.
    pub half_life_days: f64,
    /// Availability assumed without history.
    pub prior_mean: f64,
    /// How many observations the prior is worth.
    pub prior_weight: f64,
    /// Observations kept per vehicle (oldest dropped).
    pub history: usize,
    /// Lowest prediction.
    pub floor: f64,
}

impl Default for PredictionConfig {
    fn default() -> Self {
        Self { half_life_days: 14.0, prior_mean: 0.8, prior_weight: 2.0, history: 512, floor: 0.02 }
    }
}

/// Per-vehicle ACK histories and the fitted availability.
#[derive(Clone, Debug, Default)]
pub struct PredictionEngine {
    cfg: PredictionConfig,
    history: HashMap<VehicleId, VecDeque<(Timestamp, bool)>>,
}

fn features(t: Timestamp) -> Vector3<f64> {
    let ms_of_day = t.as_millis().rem_euclid(86_400_000) as f64;
    let angle = 2.0 * PI * ms_of_day / 86_400_000.0;
    Vector3::new(1.0, angle.cos(), angle.sin())
}

impl PredictionEngine {
    /// An engine with `cfg`.
    pub fn new(cfg: PredictionConfig) -> Self {
        Self { cfg, history: HashMap::new() }
    }

    /// Records whether `vehicle` delivered an order sent at `at`.
    pub fn observe(&mut self, vehicle: &VehicleId, at: Timestamp, delivered: bool) {
        let h = self.history.entry(vehicle.clone()).or_default();
        h.push_back((at, delivered));
        while h.len() > self.cfg.history.max(1) {
            h.pop_front();
        }
    }

    /// Records the answers of a settled dispatch (vehicle, when, delivered?), then forgets
    /// the vehicles not heard of for 30 days before the latest of them.
    pub fn observe_answers<'a>(&mut self, answers: impl IntoIterator<Item = &'a (VehicleId, Timestamp, bool)>) {
        let mut latest = None;
        for (v, at, delivered) in answers {
            self.observe(v, *at, *delivered);
            latest = latest.max(Some(*at));
        }
        if let Some(latest) = latest {
            self.prune(latest.plus_millis(-30 * 86_400_000));
        }
    }

    /// Forgets every vehicle whose latest observation is before `before` (vehicles long
    /// gone), so the histories do not grow with every vehicle ever seen.
    pub fn prune(&mut self, before: Timestamp) {
        self.history.retain(|_, h| h.back().is_some_and(|(at, _)| *at >= before));
    }

    /// Forgets a vehicle.
    pub fn forget(&mut self, vehicle: &VehicleId) {
        self.history.remove(vehicle);
    }

    /// Observations held for a vehicle.
    pub fn observations(&self, vehicle: &VehicleId) -> usize {
        self.history.get(vehicle).map_or(0, VecDeque::len)
    }

    /// The predicted availability of `vehicle` at `at`; `None` without history.
    pub fn predict(&self, vehicle: &VehicleId, at: Timestamp) -> Option<f64> {
        let h = self.history.get(vehicle).filter(|h| !h.is_empty())?;
        let c = &self.cfg;
        let half_life_ms = (c.half_life_days * 86_400_000.0).max(1.0);
        let lambda = c.prior_weight.max(1e-6);
        let mut xtwx = Matrix3::identity() * lambda;
        let mut xtwy = Vector3::new(c.prior_mean, 0.0, 0.0) * lambda;
        for (t, delivered) in h {
            let age = (at.as_millis() - t.as_millis()).max(0) as f64;
            let w = 0.5f64.powf(age / half_life_ms);
            let x = features(*t);
            xtwx += x * x.transpose() * w;
            xtwy += x * (w * if *delivered { 1.0 } else { 0.0 });
        }
        let beta = xtwx.cholesky()?.solve(&xtwy);
        let p = beta.dot(&features(at));
        Some(p.clamp(c.floor, 1.0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DAY: i64 = 86_400_000;
    const HOUR: i64 = 3_600_000;

    fn id() -> VehicleId {
        VehicleId::from("bus-1")
    }

    #[test]
    fn no_history_no_prediction_and_little_history_stays_near_the_prior() {
        let mut e = PredictionEngine::default();
        assert_eq!(e.predict(&id(), Timestamp::from_millis(0)), None);
        e.observe(&id(), Timestamp::from_millis(12 * HOUR), false);
        let p = e.predict(&id(), Timestamp::from_millis(12 * HOUR)).unwrap();
        assert!(p > 0.3 && p < 0.8, "one miss moves it, but not to zero: {p}");
    }

    #[test]
    fn a_vehicle_that_answers_by_day_and_not_at_night_is_predicted_so() {
        let mut e = PredictionEngine::default();
        for day in 0..20 {
            for hour in 0..24 {
                let t = Timestamp::from_millis(day * DAY + hour * HOUR);
                e.observe(&id(), t, (8..18).contains(&hour));
            }
        }
        let at = |h: i64| e.predict(&id(), Timestamp::from_millis(20 * DAY + h * HOUR)).unwrap();
        assert!(at(13) > 0.75, "midday {}", at(13));
        assert!(at(1) < 0.2, "night {}", at(1));
    }

    #[test]
    fn recent_answers_outweigh_old_ones() {
        let mut e = PredictionEngine::new(PredictionConfig { half_life_days: 2.0, ..PredictionConfig::default() });
        for k in 0..50 {
            e.observe(&id(), Timestamp::from_millis(k * HOUR), false); // long ago: never answered
        }
        for k in 0..50 {
            e.observe(&id(), Timestamp::from_millis(60 * DAY + k * HOUR), true);
            // lately: always
        }
        let p = e.predict(&id(), Timestamp::from_millis(63 * DAY)).unwrap();
        assert!(p > 0.9, "{p}");
    }

    #[test]
    fn vehicles_not_heard_of_are_pruned() {
        let mut e = PredictionEngine::default();
        let (old, new) = (VehicleId::from("old"), VehicleId::from("new"));
        e.observe(&old, Timestamp::from_millis(1_000), true);
        e.observe(&new, Timestamp::from_millis(90_000), true);
        e.prune(Timestamp::from_millis(50_000));
        assert_eq!((e.observations(&old), e.observations(&new)), (0, 1));
    }

    #[test]
    fn history_is_bounded_per_vehicle() {
        let mut e = PredictionEngine::new(PredictionConfig { history: 10, ..PredictionConfig::default() });
        for k in 0..100 {
            e.observe(&id(), Timestamp::from_millis(k), true);
        }
        assert_eq!(e.observations(&id()), 10);
        e.forget(&id());
        assert_eq!(e.observations(&id()), 0);
    }
}
