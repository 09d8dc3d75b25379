//! The file as written: `deny_unknown_fields` structs, one per section, each with the
//! `validate` that turns it into its typed section of [`super::Config`].

use crate::allocation::limits::Limits;
use std::collections::BTreeMap;

use serde::Deserialize;

use super::*;

/// The file, as written.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    /// The site's name: default MQTT prefix `gridweaver/<site>`, and the region.
    pub site: Option<String>,
    /// The broker connection.
    #[serde(default)]
    pub mqtt: RawMqtt,
    /// The event log.
    #[serde(default)]
    pub store: RawStore,
    /// Dispatch settings.
    #[serde(default)]
    pub dispatch: RawDispatch,
    /// Demand-response programs.
    #[serde(default)]
    pub programs: BTreeMap<String, RawProgram>,
    /// The weight tuner.
    #[serde(default)]
    pub tuner: RawTuner,
    /// The availability prediction.
    #[serde(default)]
    pub prediction: RawPrediction,
}

/// `tuner:` (see [`crate::learning::tuning`]); unset values take the defaults.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTuner {
    /// On by default.
    pub enabled: Option<bool>,
    /// Below this ACK rate the availability weight rises (0.8).
    pub low_ack_rate: Option<f64>,
    /// Above this ACK rate it falls (0.95).
    pub high_ack_rate: Option<f64>,
    /// Rise per dispatch (0.05).
    pub step_up: Option<f64>,
    /// Fall per dispatch (0.02).
    pub step_down: Option<f64>,
    /// Lowest availability weight (0.1).
    pub min_weight: Option<f64>,
    /// Highest availability weight (1.0).
    pub max_weight: Option<f64>,
    /// Dispatches with fewer orders are not learned from (3).
    pub min_orders: Option<u32>,
}

/// `prediction:` (see [`crate::learning::prediction`]); unset values take the defaults.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPrediction {
    /// On by default.
    pub enabled: Option<bool>,
    /// Age at which an ACK weighs half, days (14).
    pub half_life_days: Option<f64>,
    /// Availability assumed without history (0.8).
    pub prior_mean: Option<f64>,
    /// How many ACKs the prior is worth (2).
    pub prior_weight: Option<f64>,
}

/// `mqtt:`
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawMqtt {
    /// Broker host (`localhost`).
    pub host: Option<String>,
    /// Broker port (1883).
    pub port: Option<u16>,
    /// Topic prefix (`gridweaver/<site>`).
    pub prefix: Option<String>,
    /// User name, if the broker wants one.
    pub username: Option<String>,
    /// File whose first line is the password.
    pub password_file: Option<String>,
    /// MQTT client id (`gridweaver-<site>`).
    pub client_id: Option<String>,
    /// Keep-alive, seconds (10).
    pub keep_alive_s: Option<u64>,
    /// Longest wait between reconnection attempts, seconds (10).
    pub reconnect_max_s: Option<u64>,
    /// Outbound messages in flight and queued (2000): size it for a whole dispatch.
    pub inflight: Option<u16>,
}

/// `store:`
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawStore {
    /// SQLite file (`gridweaver.db`).
    pub path: Option<String>,
    /// `full` (default: every commit survives power loss) or `normal`.
    pub synchronous: Option<String>,
}

/// `dispatch:`
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawDispatch {
    /// Seconds vehicles have to ACK an order (5).
    pub ack_timeout_seconds: Option<f64>,
    /// `smart` (default), `equal`, `lp` or `segmented`.
    pub strategy: Option<String>,
    /// `balanced` (default), `probabilistic` or `noop`.
    pub fallback: Option<String>,
    /// Proportional rounds of the Smart strategy (8).
    pub max_rounds: Option<u32>,
    /// How strongly recent participation lowers a vehicle's score (0.5).
    pub fairness: Option<f64>,
    /// Smart weights per signal type (name or code); unset types keep their defaults.
    #[serde(default)]
    pub weights: BTreeMap<String, Weights>,
    /// Signal types (name or code) for which the LP runs first.
    #[serde(default)]
    pub lp_first: BTreeMap<String, bool>,
    /// Per-segment strategies.
    #[serde(default)]
    pub segments: BTreeMap<String, RawSegment>,
    /// Site limits.
    #[serde(default)]
    pub limits: RawLimits,
    /// LP solver bounds.
    #[serde(default)]
    pub lp: RawLp,
    /// Dispatches waiting for ACKs or a fallback at once; beyond it signals are refused (32).
    pub max_in_flight: Option<usize>,
    /// How far ahead a signal may start, seconds (86400).
    pub max_start_ahead_s: Option<u64>,
    /// Longest signal window, seconds (86400).
    pub max_duration_s: Option<u64>,
}

/// `dispatch.lp:` bounds on each LP solve; a solve that hits one fails and Smart runs.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawLp {
    /// Interior-point iterations (100).
    pub max_iterations: Option<u32>,
    /// Wall-clock time, ms (1000).
    pub time_limit_ms: Option<u64>,
}

/// `dispatch.segments.<name>:`
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawSegment {
    /// `heuristic` or `lp`.
    pub dispatcher_type: String,
    /// Whether the segment takes residual power in the fallback round.
    #[serde(default)]
    pub fallback: bool,
    /// Its Smart weights.
    pub weights: Weights,
}

/// `dispatch.limits:`
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawLimits {
    /// Grid-connection export limit, kW.
    pub export_kw: Option<f64>,
    /// Grid-connection import limit, kW.
    pub import_kw: Option<f64>,
    /// Feeder/charger group limits, kW.
    #[serde(default)]
    pub groups: BTreeMap<String, f64>,
    /// Per-phase limit, kW.
    pub phase_kw: Option<f64>,
}

/// `programs.<id>:`
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawProgram {
    /// Capacity the program needs, MW.
    pub required_mw: f64,
    /// Window start (RFC 3339).
    pub window_start: String,
    /// Window end (RFC 3339).
    pub window_end: String,
}

impl RawConfig {
    /// Validates into a [`Config`], one section at a time.
    pub fn validate(self) -> Result<Config, ConfigError> {
        let site = self.site.ok_or_else(|| err("site", "is required"))?;
        topic_safe("site", &site)?;
        if site.contains('/') {
            return Err(err("site", format!("must not contain `/`, got `{site}`")));
        }

        Ok(Config {
            mqtt: self.mqtt.validate(&site)?,
            store: self.store.validate()?,
            dispatch: self.dispatch.validate()?,
            programs: validate_programs(self.programs)?,
            tuner: self.tuner.validate()?,
            prediction: self.prediction.validate()?,
            site,
        })
    }
}

impl RawMqtt {
    /// `mqtt:`; the prefix and client id default from the site's name.
    fn validate(self, site: &str) -> Result<MqttConfig, ConfigError> {
        let m = self;
        let prefix = m.prefix.unwrap_or_else(|| format!("gridweaver/{site}"));
        topic_safe("mqtt.prefix", &prefix)?;
        if prefix.ends_with('/') || prefix.starts_with('/') {
            return Err(err("mqtt.prefix", format!("must not start or end with `/`, got `{prefix}`")));
        }
        let host = m.host.unwrap_or_else(|| "localhost".into());
        if host.is_empty() {
            return Err(err("mqtt.host", "must not be empty"));
        }
        let port = m.port.unwrap_or(1883);
        if port == 0 {
            return Err(err("mqtt.port", "must be within 1..=65535, got 0"));
        }
        let keep_alive_s = m.keep_alive_s.unwrap_or(10);
        if !(5..=3600).contains(&keep_alive_s) {
            return Err(err("mqtt.keep_alive_s", format!("must be within 5..=3600, got {keep_alive_s}")));
        }
        let reconnect_max_s = m.reconnect_max_s.unwrap_or(10);
        if !(1..=3600).contains(&reconnect_max_s) {
            return Err(err("mqtt.reconnect_max_s", format!("must be within 1..=3600, got {reconnect_max_s}")));
        }
        let inflight = m.inflight.unwrap_or(2000);
        if inflight == 0 {
            return Err(err("mqtt.inflight", "must be > 0"));
        }
        if m.password_file.is_some() && m.username.is_none() {
            return Err(err("mqtt.password_file", "needs mqtt.username"));
        }
        Ok(MqttConfig {
            host,
            port,
            client_id: m.client_id.unwrap_or_else(|| format!("gridweaver-{site}")),
            prefix,
            username: m.username,
            password_file: m.password_file,
            keep_alive_s,
            reconnect_max_s,
            inflight,
        })
    }
}

impl RawStore {
    /// `store:`.
    fn validate(self) -> Result<StoreConfig, ConfigError> {
        let path = self.path.unwrap_or_else(|| "gridweaver.db".into());
        if path.is_empty() {
            return Err(err("store.path", "must not be empty"));
        }
        let sync_full = match self.synchronous.as_deref() {
            None | Some("full") => true,
            Some("normal") => false,
            Some(other) => return Err(err("store.synchronous", format!("must be `full` or `normal`, got `{other}`"))),
        };
        Ok(StoreConfig { path, sync_full })
    }
}

impl RawLimits {
    /// `dispatch.limits:`.
    fn validate(self) -> Result<Limits, ConfigError> {
        let l = self;
        let opt = |key: &str, x: Option<f64>| x.map(|x| positive(key, x)).transpose();
        let mut groups = BTreeMap::new();
        for (g, kw) in l.groups {
            let kw = positive(&format!("dispatch.limits.groups.{g}"), kw)?;
            groups.insert(g, kw);
        }
        Ok(Limits {
            export_kw: opt("dispatch.limits.export_kw", l.export_kw)?,
            import_kw: opt("dispatch.limits.import_kw", l.import_kw)?,
            groups,
            phase_kw: opt("dispatch.limits.phase_kw", l.phase_kw)?,
        })
    }
}

impl RawLp {
    /// `dispatch.lp:`.
    fn validate(self) -> Result<crate::allocation::lp::LpSettings, ConfigError> {
        let mut lp = crate::allocation::lp::LpSettings::default();
        if let Some(it) = self.max_iterations {
            if it == 0 {
                return Err(err("dispatch.lp.max_iterations", "must be >= 1"));
            }
            lp.max_iter = it;
        }
        if let Some(ms) = self.time_limit_ms {
            if ms == 0 {
                return Err(err("dispatch.lp.time_limit_ms", "must be >= 1"));
            }
            lp.time_limit_s = ms as f64 / 1000.0;
        }
        Ok(lp)
    }
}

impl RawDispatch {
    /// `dispatch:` (with its `limits`, `lp`, `segments`, `weights` and `lp_first`).
    fn validate(self) -> Result<DispatchConfig, ConfigError> {
        let d = self;
        let ack_timeout = positive("dispatch.ack_timeout_seconds", d.ack_timeout_seconds.unwrap_or(5.0))?;
        if ack_timeout > 3600.0 {
            return Err(err("dispatch.ack_timeout_seconds", format!("must be at most 3600, got {ack_timeout}")));
        }
        let strategy = match d.strategy.as_deref() {
            None | Some("smart") => StrategyKind::Smart,
            Some("equal") => StrategyKind::Equal,
            Some("lp") => StrategyKind::Lp,
            Some("segmented") => StrategyKind::Segmented,
            Some(other) => {
                return Err(err(
                    "dispatch.strategy",
                    format!("must be `smart`, `equal`, `lp` or `segmented`, got `{other}`"),
                ))
            }
        };
        let fallback = match d.fallback.as_deref() {
            None | Some("balanced") => FallbackKind::Balanced,
            Some("noop") => FallbackKind::Noop,
            Some("probabilistic") => FallbackKind::Probabilistic,
            Some(other) => {
                return Err(err(
                    "dispatch.fallback",
                    format!("must be `balanced`, `probabilistic` or `noop`, got `{other}`"),
                ))
            }
        };
        let max_rounds = d.max_rounds.unwrap_or(8);
        if max_rounds == 0 {
            return Err(err("dispatch.max_rounds", "must be >= 1"));
        }
        let fairness = d.fairness.unwrap_or(0.5);
        if !(fairness.is_finite() && fairness >= 0.0) {
            return Err(err("dispatch.fairness", format!("must be a number >= 0, got {fairness}")));
        }
        let mut weights = SignalType::ALL.map(Weights::default_for);
        for (name, w) in &d.weights {
            let key = format!("dispatch.weights.{name}");
            let t = signal_type(&key, name)?;
            weights[usize::from(t.code())] = validate_weights(&key, w)?;
        }
        let mut lp_first = [false; 5];
        for (name, on) in &d.lp_first {
            let t = signal_type(&format!("dispatch.lp_first.{name}"), name)?;
            lp_first[usize::from(t.code())] = *on;
        }
        let mut segments = BTreeMap::new();
        for (name, s) in d.segments {
            let key = format!("dispatch.segments.{name}");
            let lp = match s.dispatcher_type.as_str() {
                "heuristic" => false,
                "lp" => true,
                other => {
                    return Err(err(
                        format!("{key}.dispatcher_type"),
                        format!("must be `heuristic` or `lp`, got `{other}`"),
                    ))
                }
            };
            let weights = validate_weights(&format!("{key}.weights"), &s.weights)?;
            segments.insert(name, Segment { lp, fallback: s.fallback, weights });
        }
        let limits = d.limits.validate()?;
        let lp = d.lp.validate()?;
        let max_in_flight = d.max_in_flight.unwrap_or(32);
        if !(1..=10_000).contains(&max_in_flight) {
            return Err(err("dispatch.max_in_flight", format!("must be within 1..=10000, got {max_in_flight}")));
        }
        let max_start_ahead_s = d.max_start_ahead_s.unwrap_or(86_400);
        if max_start_ahead_s > 366 * 86_400 {
            return Err(err(
                "dispatch.max_start_ahead_s",
                format!("must be at most 31622400 (a year), got {max_start_ahead_s}"),
            ));
        }
        let max_duration_s = d.max_duration_s.unwrap_or(86_400);
        if !(1..=366 * 86_400).contains(&max_duration_s) {
            return Err(err(
                "dispatch.max_duration_s",
                format!("must be within 1..=31622400 (a year), got {max_duration_s}"),
            ));
        }
        Ok(DispatchConfig {
            max_in_flight,
            max_start_ahead_s,
            max_duration_s,
            ack_timeout_ms: (ack_timeout * 1000.0).round() as i64,
            strategy,
            fallback,
            max_rounds,
            fairness,
            weights,
            lp_first,
            segments,
            limits,
            lp,
        })
    }
}

/// `programs:`.
fn validate_programs(raw: BTreeMap<String, RawProgram>) -> Result<BTreeMap<String, Program>, ConfigError> {
    let mut programs = BTreeMap::new();
    for (id, p) in raw {
        let key = format!("programs.{id}");
        let required_mw = positive(&format!("{key}.required_mw"), p.required_mw)?;
        let time = |field: &str, s: &str| {
            Timestamp::parse_rfc3339(s)
                .ok_or_else(|| err(format!("{key}.{field}"), format!("must be an RFC 3339 time, got `{s}`")))
        };
        let window_start = time("window_start", &p.window_start)?;
        let window_end = time("window_end", &p.window_end)?;
        if window_end <= window_start {
            return Err(err(format!("{key}.window_end"), "must be after window_start"));
        }
        programs.insert(id, Program { required_mw, window_start, window_end });
    }
    Ok(programs)
}

impl RawTuner {
    /// `tuner:` (`None` when disabled).
    fn validate(self) -> Result<Option<super::tuner::TunerConfig>, ConfigError> {
        let t = self;
        Ok(if t.enabled.unwrap_or(true) {
            let d = super::tuner::TunerConfig::default();
            let cfg = super::tuner::TunerConfig {
                low_ack_rate: t.low_ack_rate.unwrap_or(d.low_ack_rate),
                high_ack_rate: t.high_ack_rate.unwrap_or(d.high_ack_rate),
                step_up: t.step_up.unwrap_or(d.step_up),
                step_down: t.step_down.unwrap_or(d.step_down),
                min_weight: t.min_weight.unwrap_or(d.min_weight),
                max_weight: t.max_weight.unwrap_or(d.max_weight),
                min_orders: t.min_orders.unwrap_or(d.min_orders),
            };
            cfg.validate().map_err(|e| err(format!("tuner.{}", e.field), e.problem))?;
            Some(cfg)
        } else {
            None
        })
    }
}

impl RawPrediction {
    /// `prediction:` (`None` when disabled).
    fn validate(self) -> Result<Option<crate::learning::prediction::PredictionConfig>, ConfigError> {
        let pr = self;
        Ok(if pr.enabled.unwrap_or(true) {
            let d = crate::learning::prediction::PredictionConfig::default();
            let half_life_days = positive("prediction.half_life_days", pr.half_life_days.unwrap_or(d.half_life_days))?;
            let prior_mean = pr.prior_mean.unwrap_or(d.prior_mean);
            if !(0.0..=1.0).contains(&prior_mean) {
                return Err(err("prediction.prior_mean", format!("must be within 0..=1, got {prior_mean}")));
            }
            let prior_weight = positive("prediction.prior_weight", pr.prior_weight.unwrap_or(d.prior_weight))?;
            Some(crate::learning::prediction::PredictionConfig { half_life_days, prior_mean, prior_weight, ..d })
        } else {
            None
        })
    }
}
