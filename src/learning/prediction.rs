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
//! The weighted sums are kept per vehicle as of its latest observation and decayed to the
//! time asked (every weight shares the factor `0.5^((at - latest) / half_life)`), so a
//! prediction costs the same with 1 or 512 observations: planning 1,000 vehicles with full
//! histories does not read half a million observations. The sums are rebuilt from the
//! history when observations leave it (at most once per `history` of them), and a prediction
//! for a time before the latest observation (a clock step) is computed from the history.
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
    history: HashMap<VehicleId, History>,
}

/// One vehicle's observations and their weighted sums as of the latest.
#[derive(Clone, Debug, Default)]
struct History {
    seen: VecDeque<(Timestamp, bool)>,
    /// Time of the latest observation: the sums weigh each one `0.5^((latest - t) / half_life)`.
    latest: Option<Timestamp>,
    /// `sum(w x x')` and `sum(w y x)`.
    xtwx: Matrix3<f64>,
    xtwy: Vector3<f64>,
    /// Observations that left the history since the sums were last rebuilt.
    dropped: usize,
}

impl History {
    /// The sums again from every observation held, as of the latest.
    fn rebuild(&mut self, half_life_ms: f64) {
        self.latest = self.seen.iter().map(|(t, _)| *t).max();
        let (mut xtwx, mut xtwy) = (Matrix3::zeros(), Vector3::zeros());
        if let Some(latest) = self.latest {
            for (t, delivered) in &self.seen {
                let w = weight(latest, *t, half_life_ms);
                let x = features(*t);
                xtwx += x * x.transpose() * w;
                xtwy += x * (w * if *delivered { 1.0 } else { 0.0 });
            }
        }
        (self.xtwx, self.xtwy, self.dropped) = (xtwx, xtwy, 0);
    }
}

/// The weight at `at` of an observation at `t`: 1 when fresh, half after `half_life_ms`.
fn weight(at: Timestamp, t: Timestamp, half_life_ms: f64) -> f64 {
    let age = (at.as_millis() - t.as_millis()).max(0) as f64;
    0.5f64.powf(age / half_life_ms)
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
        let (keep, half_life_ms) = (self.cfg.history.max(1), self.half_life_ms());
        let h = self.history.entry(vehicle.clone()).or_default();
        h.seen.push_back((at, delivered));
        let Some(latest) = h.latest.filter(|latest| at >= *latest) else {
            // The first observation, or one out of time order: the sums from scratch.
            while h.seen.len() > keep {
                h.seen.pop_front();
            }
            return h.rebuild(half_life_ms);
        };
        // Decayed to `at`, the new observation added, any that leave the history taken out.
        let decay = weight(at, latest, half_life_ms);
        let x = features(at);
        h.xtwx = h.xtwx * decay + x * x.transpose();
        h.xtwy = h.xtwy * decay + x * if delivered { 1.0 } else { 0.0 };
        h.latest = Some(at);
        while h.seen.len() > keep {
            let Some((t, delivered)) = h.seen.pop_front() else { break };
            let w = weight(at, t, half_life_ms);
            let x = features(t);
            h.xtwx -= x * x.transpose() * w;
            h.xtwy -= x * (w * if delivered { 1.0 } else { 0.0 });
            h.dropped += 1;
        }
        // Subtractions round: the sums are rebuilt once per `history` observations dropped.
        if h.dropped >= keep {
            h.rebuild(half_life_ms);
        }
    }

    fn half_life_ms(&self) -> f64 {
        (self.cfg.half_life_days * 86_400_000.0).max(1.0)
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
        self.history.retain(|_, h| h.seen.back().is_some_and(|(at, _)| *at >= before));
    }

    /// Forgets a vehicle.
    pub fn forget(&mut self, vehicle: &VehicleId) {
        self.history.remove(vehicle);
    }

    /// Observations held for a vehicle.
    pub fn observations(&self, vehicle: &VehicleId) -> usize {
        self.history.get(vehicle).map_or(0, |h| h.seen.len())
    }

    /// The predicted availability of `vehicle` at `at`; `None` without history.
    pub fn predict(&self, vehicle: &VehicleId, at: Timestamp) -> Option<f64> {
        let h = self.history.get(vehicle).filter(|h| !h.seen.is_empty())?;
        let c = &self.cfg;
        let half_life_ms = self.half_life_ms();
        let lambda = c.prior_weight.max(1e-6);
        let mut xtwx = Matrix3::identity() * lambda;
        let mut xtwy = Vector3::new(c.prior_mean, 0.0, 0.0) * lambda;
        match h.latest {
            Some(latest) if at >= latest => {
                let decay = weight(at, latest, half_life_ms);
                xtwx += h.xtwx * decay;
                xtwy += h.xtwy * decay;
            }
            // Asked about a time before the latest observation: newer ones weigh 1.
            _ => {
                for (t, delivered) in &h.seen {
                    let w = weight(at, *t, half_life_ms);
                    let x = features(*t);
                    xtwx += x * x.transpose() * w;
                    xtwy += x * (w * if *delivered { 1.0 } else { 0.0 });
                }
            }
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

    /// The prediction from every observation held, weighed one by one.
    fn from_scratch(cfg: &PredictionConfig, seen: &VecDeque<(Timestamp, bool)>, at: Timestamp) -> f64 {
        let half_life_ms = (cfg.half_life_days * 86_400_000.0).max(1.0);
        let lambda = cfg.prior_weight.max(1e-6);
        let mut xtwx = Matrix3::identity() * lambda;
        let mut xtwy = Vector3::new(cfg.prior_mean, 0.0, 0.0) * lambda;
        for (t, delivered) in seen {
            let w = weight(at, *t, half_life_ms);
            let x = features(*t);
            xtwx += x * x.transpose() * w;
            xtwy += x * (w * if *delivered { 1.0 } else { 0.0 });
        }
        xtwx.cholesky().unwrap().solve(&xtwy).dot(&features(at)).clamp(cfg.floor, 1.0)
    }

    proptest::proptest! {
        /// The kept sums (decayed, added to, with observations taken out as they leave the
        /// history, rebuilt now and then) predict what the whole history weighed one by one
        /// does, also for times before the latest observation and after steps back.
        #[test]
        fn the_kept_sums_predict_what_the_whole_history_does(
            steps in proptest::collection::vec((-2 * HOUR..3 * DAY, proptest::bool::ANY, -DAY..5 * DAY), 1..300),
            keep in 1usize..40,
            half_life_days in 0.5f64..30.0,
        ) {
            let cfg = PredictionConfig { history: keep, half_life_days, ..PredictionConfig::default() };
            let mut e = PredictionEngine::new(cfg.clone());
            let mut seen = VecDeque::new();
            let mut t = 1_795_000_000_000i64;
            for (dt, delivered, ask) in steps {
                t += dt;
                e.observe(&id(), Timestamp::from_millis(t), delivered);
                seen.push_back((Timestamp::from_millis(t), delivered));
                while seen.len() > keep {
                    seen.pop_front();
                }
                let at = Timestamp::from_millis(t + ask);
                let (kept, whole) = (e.predict(&id(), at).unwrap(), from_scratch(&cfg, &seen, at));
                proptest::prop_assert!((kept - whole).abs() <= 1e-9, "kept {} whole {}", kept, whole);
            }
        }
    }
}
