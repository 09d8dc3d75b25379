//! `tuner:`: the settings of the ACK-based tuner, validated where the config is (the tuner
//! itself is in [`crate::learning::tuning`]).

use serde::{Deserialize, Serialize};

/// Settings of the ACK-based tuner ([`crate::learning::tuning::AckBasedTuner`]).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TunerConfig {
    /// Below this ACK rate the availability weight rises.
    pub low_ack_rate: f64,
    /// Above this ACK rate it falls.
    pub high_ack_rate: f64,
    /// Rise per dispatch.
    pub step_up: f64,
    /// Fall per dispatch.
    pub step_down: f64,
    /// Lowest availability weight.
    pub min_weight: f64,
    /// Highest availability weight.
    pub max_weight: f64,
    /// Dispatches with fewer orders teach nothing.
    pub min_orders: u32,
}

impl Default for TunerConfig {
    fn default() -> Self {
        Self {
            low_ack_rate: 0.8,
            high_ack_rate: 0.95,
            step_up: 0.05,
            step_down: 0.02,
            min_weight: 0.1,
            max_weight: 1.0,
            min_orders: 3,
        }
    }
}

/// An invalid tuner setting; the message names it.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
#[error("{field}: {problem}")]
pub struct TunerError {
    /// The setting (`low_ack_rate`, ...).
    pub field: &'static str,
    /// What is wrong.
    pub problem: String,
}

impl TunerConfig {
    /// Checks ranges and order.
    pub fn validate(&self) -> Result<(), TunerError> {
        let bad = |field, problem: String| Err(TunerError { field, problem });
        for (field, x) in [("low_ack_rate", self.low_ack_rate), ("high_ack_rate", self.high_ack_rate)] {
            if !(0.0..=1.0).contains(&x) {
                return bad(field, format!("must be within 0..=1, got {x}"));
            }
        }
        if self.low_ack_rate > self.high_ack_rate {
            return bad(
                "low_ack_rate",
                format!("must not exceed high_ack_rate ({}), got {}", self.high_ack_rate, self.low_ack_rate),
            );
        }
        for (field, x) in [("step_up", self.step_up), ("step_down", self.step_down)] {
            if !(x.is_finite() && x > 0.0 && x <= 1.0) {
                return bad(field, format!("must be > 0 and at most 1, got {x}"));
            }
        }
        for (field, x) in [("min_weight", self.min_weight), ("max_weight", self.max_weight)] {
            if !(0.0..=1.0).contains(&x) {
                return bad(field, format!("must be within 0..=1, got {x}"));
            }
        }
        if self.min_weight > self.max_weight {
            return bad(
                "min_weight",
                format!("must not exceed max_weight ({}), got {}", self.max_weight, self.min_weight),
            );
        }
        Ok(())
    }
}
