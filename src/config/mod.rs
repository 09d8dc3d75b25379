//! The YAML configuration, in two stages.
//!
//! [`RawConfig`] mirrors the file (`deny_unknown_fields` everywhere, so a typo is an error);
//! [`Config::from_yaml`] deserializes it and validates it into [`Config`], whose values are
//! typed and within range. Every error names the key path
//! (`dispatch.segments.commuter.weights.soc: must be within 0..=1, got 1.5`). Reading the
//! file is the runtime's business; this module only sees its text.

use crate::allocation::limits::Limits;
use std::collections::BTreeMap;
use std::fmt;

use crate::allocation::Weights;
use crate::model::{FallbackKind, SignalType, StrategyKind};
use crate::time::Timestamp;

/// A config error: the key path and what is wrong with it.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
#[error("{key}: {message}")]
pub struct ConfigError {
    /// Dotted key path (`dispatch.ack_timeout_seconds`), or `<document>` for syntax errors.
    pub key: String,
    /// What is wrong.
    pub message: String,
}

mod raw;
pub mod tuner;

pub use raw::*;

pub(crate) fn err(key: impl fmt::Display, message: impl Into<String>) -> ConfigError {
    ConfigError { key: key.to_string(), message: message.into() }
}

/// A validated config.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Config {
    /// The site name (also the region).
    pub site: String,
    /// The broker connection.
    pub mqtt: MqttConfig,
    /// The event log.
    pub store: StoreConfig,
    /// Dispatch settings.
    pub dispatch: DispatchConfig,
    /// Demand-response programs.
    pub programs: BTreeMap<String, Program>,
    /// The tuner's settings, `None` when disabled.
    pub tuner: Option<tuner::TunerConfig>,
    /// The prediction's settings, `None` when disabled.
    pub prediction: Option<crate::learning::prediction::PredictionConfig>,
}

/// Validated `mqtt:`.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct MqttConfig {
    /// Host.
    pub host: String,
    /// Port.
    pub port: u16,
    /// Topic prefix, no trailing slash.
    pub prefix: String,
    /// User name.
    pub username: Option<String>,
    /// Password file path.
    pub password_file: Option<String>,
    /// Client id.
    pub client_id: String,
    /// Keep-alive, seconds.
    pub keep_alive_s: u64,
    /// Longest reconnection backoff, seconds.
    pub reconnect_max_s: u64,
    /// Outbound window.
    pub inflight: u16,
}

/// Validated `store:`.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct StoreConfig {
    /// SQLite file.
    pub path: String,
    /// `synchronous=FULL` (true) or `NORMAL`.
    pub sync_full: bool,
}

/// Validated `dispatch:`.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct DispatchConfig {
    /// ACK deadline, ms.
    pub ack_timeout_ms: i64,
    /// Allocation strategy.
    pub strategy: StrategyKind,
    /// Residual fallback.
    pub fallback: FallbackKind,
    /// Smart rounds.
    pub max_rounds: u32,
    /// Smart fairness.
    pub fairness: f64,
    /// Smart weights per signal type, by code.
    pub weights: [Weights; 5],
    /// LP-first per signal type, by code.
    pub lp_first: [bool; 5],
    /// Segments by name.
    pub segments: BTreeMap<String, Segment>,
    /// Site limits.
    pub limits: Limits,
    /// LP solver settings.
    pub lp: crate::allocation::lp::LpSettings,
    /// Admission: dispatches in flight at once.
    pub max_in_flight: usize,
    /// How far ahead a signal may start, seconds.
    pub max_start_ahead_s: u64,
    /// Longest signal window, seconds.
    pub max_duration_s: u64,
}

/// A validated segment.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Segment {
    /// `lp` (true) or `heuristic`.
    pub lp: bool,
    /// Takes residual power in the fallback round.
    pub fallback: bool,
    /// Its weights.
    pub weights: Weights,
}

/// A validated demand-response program.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Program {
    /// MW needed.
    pub required_mw: f64,
    /// Window start.
    pub window_start: Timestamp,
    /// Window end.
    pub window_end: Timestamp,
}

impl Config {
    /// Parses and validates a YAML document.
    pub fn from_yaml(text: &str) -> Result<Config, ConfigError> {
        let de = serde_yaml::Deserializer::from_str(text);
        let raw: RawConfig = serde_path_to_error::deserialize(de).map_err(|e| {
            let path = e.path().to_string();
            let inner = e.into_inner().to_string();
            let inner = inner.strip_prefix(&format!("{path}: ")).map(str::to_owned).unwrap_or(inner);
            let key = if matches!(path.as_str(), "" | "." | "?") { "<document>".to_owned() } else { path };
            err(key, inner)
        })?;
        raw.validate()
    }
}

pub(crate) fn positive(key: &str, x: f64) -> Result<f64, ConfigError> {
    if x.is_finite() && x > 0.0 {
        Ok(x)
    } else {
        Err(err(key, format!("must be a number > 0, got {x}")))
    }
}

pub(crate) fn signal_type(key: &str, name: &str) -> Result<SignalType, ConfigError> {
    SignalType::parse(name)
        .ok_or_else(|| err(key, format!("`{name}` is not a signal type (fcr, afrr, mfrr, dr, transfer or 0-4)")))
}

pub(crate) fn validate_weights(key: &str, w: &Weights) -> Result<Weights, ConfigError> {
    let named = [
        ("soc", w.soc),
        ("time", w.time),
        ("priority", w.priority),
        ("availability", w.availability),
        ("price", w.price),
        ("wear", w.wear),
    ];
    for (name, x) in named {
        if !(0.0..=1.0).contains(&x) {
            return Err(err(format!("{key}.{name}"), format!("must be within 0..=1, got {x}")));
        }
    }
    if named.iter().all(|(_, x)| *x == 0.0) {
        return Err(err(key, "at least one weight must be > 0"));
    }
    Ok(*w)
}

pub(crate) fn topic_safe(key: &str, s: &str) -> Result<(), ConfigError> {
    if s.is_empty() {
        return Err(err(key, "must not be empty"));
    }
    if s.contains(['+', '#']) || s.chars().any(char::is_control) {
        return Err(err(key, format!("must not contain MQTT wildcards or control characters, got `{s}`")));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn error(yaml: &str) -> String {
        Config::from_yaml(yaml).unwrap_err().to_string()
    }

    #[test]
    fn a_minimal_config_gets_the_defaults() {
        let c = Config::from_yaml("site: depot1\n").unwrap();
        assert_eq!(c.mqtt.prefix, "gridweaver/depot1");
        assert_eq!((c.mqtt.host.as_str(), c.mqtt.port), ("localhost", 1883));
        assert_eq!(c.dispatch.ack_timeout_ms, 5000);
        assert_eq!(c.dispatch.strategy, StrategyKind::Smart);
        assert_eq!(c.dispatch.fallback, FallbackKind::Balanced);
        assert!(c.store.sync_full);
    }

    #[test]
    fn contract_keys_are_read() {
        let c = Config::from_yaml(
            r#"
site: north
dispatch:
  ack_timeout_seconds: 2.5
  lp_first: { fcr: true, "1": false }
  segments:
    commuter: { dispatcher_type: lp, fallback: true, weights: { soc: 0.5, time: 1.0 } }
  limits: { export_kw: 400, import_kw: 600, phase_kw: 150, groups: { feeder_a: 120 } }
programs:
  winter: { required_mw: 1.5, window_start: "2026-12-01T16:00:00Z", window_end: "2026-12-01T19:00:00Z" }
"#,
        )
        .unwrap();
        assert_eq!(c.dispatch.ack_timeout_ms, 2500);
        assert!(c.dispatch.lp_first[0] && !c.dispatch.lp_first[1]);
        assert!(c.dispatch.segments["commuter"].lp);
        assert_eq!(c.dispatch.limits.groups["feeder_a"], 120.0);
        assert_eq!(c.programs["winter"].required_mw, 1.5);
    }

    #[test]
    fn errors_name_the_key_path() {
        let cases = [
            ("site: a\nmqtt: { hots: x }\n", "mqtt: unknown field `hots`"),
            ("site: a\nbogus: 1\n", "bogus"),
            ("mqtt: {}\n", "site: is required"),
            ("site: a\ndispatch: { ack_timeout_seconds: -1 }\n", "dispatch.ack_timeout_seconds: must be a number > 0"),
            ("site: a\ndispatch: { ack_timeout_seconds: fast }\n", "dispatch.ack_timeout_seconds"),
            ("site: a\ndispatch: { lp_first: { ffr: true } }\n", "dispatch.lp_first.ffr"),
            (
                "site: a\ndispatch: { segments: { c: { dispatcher_type: lp, weights: { soc: 1.5 } } } }\n",
                "dispatch.segments.c.weights.soc: must be within 0..=1, got 1.5",
            ),
            (
                "site: a\ndispatch: { segments: { c: { dispatcher_type: lp, weights: { sco: 1 } } } }\n",
                "dispatch.segments.c.weights: unknown field `sco`",
            ),
            ("site: a\ndispatch: { segments: { c: { dispatcher_type: lp, weights: {} } } }\n", "at least one weight"),
            ("site: a\ndispatch: { limits: { groups: { f1: 0 } } }\n", "dispatch.limits.groups.f1"),
            ("site: a\nmqtt: { port: 70000 }\n", "mqtt.port"),
            ("site: a/b\n", "site: must not contain `/`"),
            (
                "site: a\nprograms: { w: { required_mw: 1, window_start: x, window_end: y } }\n",
                "programs.w.window_start",
            ),
            ("site: a\n  - b: [\n", "<document>"),
            ("site: a\ntuner: { low_ack_rate: 0.99, high_ack_rate: 0.5 }\n", "tuner.low_ack_rate: must not exceed"),
            ("site: a\ntuner: { step_up: 0 }\n", "tuner.step_up"),
            ("site: a\ntuner: { speed: 1 }\n", "tuner: unknown field `speed`"),
            ("site: a\nprediction: { prior_mean: 2 }\n", "prediction.prior_mean"),
        ];
        for (yaml, want) in cases {
            let got = error(yaml);
            assert!(got.contains(want), "{yaml:?}: got `{got}`, want `{want}`");
        }
    }
}
