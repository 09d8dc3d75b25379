//! `gridweaver migrate`: a site's existing state, as a documented JSON snapshot, turned into
//! synthetic events that open a new log (actor `migrate`).
//!
//! ```json
//! {
//!   "site": "depot1",
//!   "taken_at": "2026-12-01T06:00:00Z",
//!   "fleet": [ { "id": "ev1", "soc": 0.6, "capacity_kwh": 60, "max_charge_kw": 11,
//!                "max_discharge_kw": 11, "plugged_in": true } ],
//!   "weights": { "afrr": { "soc": 0.6, "time": 0.3, "priority": 0.3, "availability": 0.9,
//!                          "price": 0.1, "wear": 0.4 } },
//!   "programs": { "winter-peak": { "required_mw": 1.5, "window_start": "2026-12-01T17:00:00Z",
//!                                  "window_end": "2026-12-01T19:00:00Z" } }
//! }
//! ```
//! Each fleet entry is a contract VehicleState with its `id`, checked as the gateway checks
//! a state on MQTT; each weight set becomes a `WeightsTuned` (from the defaults of its
//! signal type); the programs and a summary go in one `SnapshotImported`.

use std::collections::BTreeMap;

use serde::Deserialize;
use serde_json::Value;

use crate::allocation::Weights;
use crate::learning::tuning::WeightsChange;
use crate::model::{SignalType, VehicleId};
use crate::time::Timestamp;
use crate::wire::{decode, Inbound, Topics};

use crate::events::payload::{SnapshotImported, SnapshotProgram, VehicleState, WeightsTuned};
use crate::events::Event;

/// The snapshot file.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Snapshot {
    /// The site (the events' region).
    pub site: String,
    /// When the state was taken (default: now).
    #[serde(default)]
    pub taken_at: Option<Timestamp>,
    /// Contract VehicleStates, each with its `id`.
    #[serde(default)]
    pub fleet: Vec<Value>,
    /// Weights per signal type (code or name).
    #[serde(default)]
    pub weights: BTreeMap<String, Weights>,
    /// Demand-response programs by id.
    #[serde(default)]
    pub programs: BTreeMap<String, SnapshotProgram>,
}

/// A snapshot that cannot be imported; names the entry and field.
#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    /// Not the documented shape.
    #[error("snapshot: {0}")]
    Shape(#[from] serde_json::Error),
    /// A fleet entry is not a valid state.
    #[error("snapshot: fleet[{index}]: {error}")]
    Vehicle {
        /// Its position.
        index: usize,
        /// Why.
        error: String,
    },
    /// Two fleet entries with one id.
    #[error("snapshot: fleet[{index}]: vehicle `{id}` is listed twice")]
    DuplicateVehicle {
        /// Its position.
        index: usize,
        /// The id.
        id: String,
    },
    /// A weights key that names no signal type.
    #[error("snapshot: weights.{0}: not a signal type (fcr, afrr, mfrr, dr, or a code)")]
    SignalType(String),
    /// Weights out of range.
    #[error("snapshot: weights.{key}: {error}")]
    Weights {
        /// The key.
        key: String,
        /// Why.
        error: String,
    },
    /// A program that cannot be.
    #[error("snapshot: programs.{id}: {error}")]
    Program {
        /// Its id.
        id: String,
        /// Why.
        error: String,
    },
}

/// The events that import `snapshot` at `now`, in order: vehicles, weights, the summary.
pub fn events(snapshot: &Snapshot, now: Timestamp) -> Result<Vec<Event>, MigrateError> {
    let taken_at = snapshot.taken_at.unwrap_or(now);
    let region = Some(snapshot.site.as_str());
    let topics = Topics::new("migrate");
    let mut out = Vec::new();
    let mut seen = std::collections::BTreeSet::new();
    for (index, entry) in snapshot.fleet.iter().enumerate() {
        let bad = |error: String| MigrateError::Vehicle { index, error };
        let id = entry.get("id").and_then(Value::as_str).ok_or_else(|| bad("field `id` is missing".into()))?;
        let vid = VehicleId::parse(id).ok_or_else(|| bad(format!("field `id`: `{id}` is not a vehicle id")))?;
        let mut state = entry.clone();
        if let Some(o) = state.as_object_mut() {
            o.remove("id");
        }
        let body = serde_json::to_vec(&state)?;
        let vehicle = match decode(&topics, &topics.vehicle_state(&vid), &body, taken_at) {
            Some(Ok(Inbound::VehicleState(_, Some(v)))) => *v,
            Some(Err(rejection)) => return Err(bad(rejection.error.to_string())),
            _ => return Err(bad("an empty state".into())),
        };
        if !seen.insert(vid.clone()) {
            return Err(MigrateError::DuplicateVehicle { index, id: id.to_owned() });
        }
        let payload = VehicleState { vehicle, discovered: true };
        out.push(Event::of(taken_at, "migrate", &payload).region(region));
    }
    let mut types = Vec::new();
    for (key, weights) in &snapshot.weights {
        let kind = SignalType::parse(key).ok_or_else(|| MigrateError::SignalType(key.clone()))?;
        crate::config::validate_weights(&format!("weights.{key}"), weights)
            .map_err(|error| MigrateError::Weights { key: key.clone(), error: error.to_string() })?;
        let change = WeightsChange {
            signal_type: kind,
            dispatch_id: "snapshot".into(),
            ack_rate: 0.0,
            before: Weights::default_for(kind),
            after: *weights,
            reason: format!("imported from the snapshot taken at {taken_at}"),
        };
        out.push(Event::of(taken_at, "migrate", &WeightsTuned { change }).region(region));
        types.push(kind);
    }
    for (id, p) in &snapshot.programs {
        let bad = |error: &str| MigrateError::Program { id: id.clone(), error: error.to_owned() };
        if !(p.required_mw.is_finite() && p.required_mw > 0.0) {
            return Err(bad("required_mw must be a number > 0"));
        }
        if p.window_end <= p.window_start {
            return Err(bad("window_end must be after window_start"));
        }
    }
    let summary =
        SnapshotImported { taken_at, vehicles: seen.len(), weights: types, programs: snapshot.programs.clone() };
    out.push(Event::of(now, "migrate", &summary).region(region));
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::{EventStore, MemoryStore};
    use crate::replay::DispatchProjection;

    const NOW: Timestamp = Timestamp::from_millis(1_795_000_000_000);

    fn snapshot(text: &str) -> Result<Vec<Event>, MigrateError> {
        events(&serde_json::from_str::<Snapshot>(text)?, NOW)
    }

    const GOOD: &str = r#"{
      "site": "depot1",
      "taken_at": "2026-12-01T06:00:00Z",
      "fleet": [
        {"id": "ev1", "soc": 0.6, "capacity_kwh": 60, "max_charge_kw": 11, "max_discharge_kw": 11, "plugged_in": true},
        {"id": "ev2", "soc": 0.4, "capacity_kwh": 40, "max_charge_kw": 7, "max_discharge_kw": 7, "plugged_in": true,
         "phases": 1, "phase": "L2"}
      ],
      "weights": {"afrr": {"soc": 0.6, "time": 0.3, "priority": 0.3, "availability": 0.7, "price": 0.1, "wear": 0.4}},
      "programs": {"winter": {"required_mw": 1.5, "window_start": "2026-12-01T17:00:00Z",
                              "window_end": "2026-12-01T19:00:00Z"}}
    }"#;

    #[test]
    fn a_snapshot_becomes_events_the_projection_folds() {
        let events = snapshot(GOOD).unwrap();
        let kinds: Vec<crate::events::EventKind> = events.iter().map(|e| e.kind).collect();
        use crate::events::EventKind as K;
        assert_eq!(kinds, [K::VehicleDiscovered, K::VehicleDiscovered, K::WeightsTuned, K::SnapshotImported]);
        let mut log = MemoryStore::default();
        log.append(&events).unwrap();
        let mut p = DispatchProjection::new();
        for row in log.rows() {
            p.apply(row).unwrap();
        }
        assert_eq!(p.state().fleet.len(), 2);
        assert_eq!(p.state().weights[&SignalType::Afrr].availability, 0.7);
        assert_eq!(events[0].ts.to_string(), "2026-12-01T06:00:00Z", "stamped when the state was taken");
    }

    #[test]
    fn a_bad_snapshot_names_the_entry_and_field() {
        let err = |text: &str| snapshot(text).unwrap_err().to_string();
        let e = err(r#"{"site": "s", "fleet": [{"id": "a", "soc": 1.7, "capacity_kwh": 60, "max_charge_kw": 11,
            "max_discharge_kw": 11, "plugged_in": true}]}"#);
        assert!(e.contains("fleet[0]") && e.contains("soc"), "{e}");
        let e = err(r#"{"site": "s", "fleet": [{"soc": 0.5}]}"#);
        assert!(e.contains("fleet[0]: field `id`"), "{e}");
        let e = err(r#"{"site": "s", "weights": {"solar": {"soc": 1, "time": 1, "priority": 1, "availability": 1,
            "price": 1, "wear": 1}}}"#);
        assert!(e.contains("weights.solar"), "{e}");
        let e = err(r#"{"site": "s", "programs": {"p": {"required_mw": 1, "window_start": "2026-12-01T19:00:00Z",
            "window_end": "2026-12-01T17:00:00Z"}}}"#);
        assert!(e.contains("programs.p: window_end"), "{e}");
        let e = err(r#"{"site": "s", "fleeet": []}"#);
        assert!(e.contains("unknown field `fleeet`"), "{e}");
        let twice = r#"{"site": "s", "fleet": [
            {"id": "a", "soc": 0.5, "capacity_kwh": 60, "max_charge_kw": 11, "max_discharge_kw": 11, "plugged_in": true},
            {"id": "a", "soc": 0.5, "capacity_kwh": 60, "max_charge_kw": 11, "max_discharge_kw": 11, "plugged_in": true}]}"#;
        assert!(err(twice).contains("fleet[1]: vehicle `a` is listed twice"));
    }
}
