//! Decoding and validation of everything that arrives from outside.
//!
//! [`Topics`] knows the topic layout under the configured prefix; [`decode`] turns one
//! MQTT publish (topic + payload) into a typed [`Inbound`] value or an [`InputError`] whose
//! message is a sentence naming the offending field. It is the only place where inbound
//! JSON is looked at: handlers downstream see validated values only.
//!
//! `topics.rs` has the layout; `fields.rs` the typed accessors and range checks; one file
//! per inbound payload (`signal.rs`, `vehicle.rs`, `ack.rs`, `bid.rs`).

mod ack;
mod bid;
mod fields;
mod signal;
mod topics;
mod vehicle;

pub use bid::BidSubmission;
pub use topics::{InboundTopic, Topics};

use serde::Serialize;
use serde_json::Value;

use ack::decode_ack;
use bid::decode_bid;
use fields::object;
use signal::decode_signal;
use vehicle::decode_vehicle;

use crate::events::{Event, EventKind};
use crate::model::{Ack, Signal, Vehicle, VehicleId};
use crate::time::Timestamp;

/// Inbound payloads larger than this are rejected unread.
pub const MAX_PAYLOAD_BYTES: usize = 64 * 1024;

/// Longest id (signal, vehicle, order, ...) accepted, bytes.
pub const MAX_ID_LEN: usize = crate::model::MAX_VEHICLE_ID_LEN;

/// Longest other text field (a reason, a region) accepted, bytes.
pub const MAX_TEXT_LEN: usize = 512;

/// Largest power rating a vehicle may state, kW (10 MW): anything above is a lie or a typo,
/// and refusing it keeps every sum of ratings finite.
pub const MAX_VEHICLE_KW: f64 = 10_000.0;

/// Largest battery a vehicle may state, kWh (10 MWh).
pub const MAX_VEHICLE_KWH: f64 = 10_000.0;

/// Largest power a signal may request, kW (1 GW).
pub const MAX_SIGNAL_KW: f64 = 1_000_000.0;

/// Largest leader term a transfer may carry: 2^53 - 1, the largest whole number every JSON
/// reader keeps exactly (an etcd revision takes centuries to get there). Terms only go up,
/// so one message with a term near `u64::MAX` would otherwise lock out every later leader.
pub const MAX_LEADER_TERM: u64 = (1 << 53) - 1;

/// Unknown fields of a signal listed in its `SignalReceived`, at most (the rest are
/// ignored unlisted).
pub const MAX_UNKNOWN_FIELDS: usize = 16;

/// Longest unknown field name listed, bytes (a longer one is cut).
pub const MAX_UNKNOWN_NAME: usize = 64;

/// Largest energy price a vehicle may state, per kWh.
pub const MAX_PRICE_PER_KWH: f64 = 1_000_000.0;

/// Why an inbound message was rejected. The `Display` text is published on `<p>/errors`.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum InputError {
    /// More than [`MAX_PAYLOAD_BYTES`].
    #[error("payload is {0} bytes, more than the 65536 allowed")]
    TooLarge(usize),
    /// Not parseable JSON.
    #[error("payload is not valid JSON ({0})")]
    NotJson(String),
    /// JSON, but not an object.
    #[error("payload must be one JSON object")]
    NotObject,
    /// A required field is absent (or null).
    #[error("field `{0}` is required")]
    Missing(&'static str),
    /// A field has the wrong type or is out of range.
    #[error("field `{field}` {problem}")]
    Invalid {
        /// The field's name.
        field: &'static str,
        /// What is wrong, as the end of a sentence ("must be a number > 0, got -3").
        problem: String,
    },
    /// A vehicle id in a topic that cannot be an id.
    #[error("vehicle id `{0}` in the topic is not valid (1-128 characters, no wildcards)")]
    BadVehicleId(String),
    /// A topic under the prefix that nothing reads.
    #[error("topic is not one this gateway reads")]
    UnknownTopic,
}

impl InputError {
    /// A short code for the reason, the same for every message refused the same way
    /// (`invalid:power_kw`, `missing:id`, `not_json`, ...): what a flood's refusals are
    /// grouped by.
    pub fn code(&self) -> String {
        match self {
            InputError::TooLarge(_) => "too_large".into(),
            InputError::NotJson(_) => "not_json".into(),
            InputError::NotObject => "not_object".into(),
            InputError::Missing(field) => format!("missing:{field}"),
            InputError::Invalid { field, .. } => format!("invalid:{field}"),
            InputError::BadVehicleId(_) => "bad_vehicle_id".into(),
            InputError::UnknownTopic => "unknown_topic".into(),
        }
    }
}

pub(crate) fn invalid(field: &'static str, problem: impl Into<String>) -> InputError {
    InputError::Invalid { field, problem: problem.into() }
}

/// One decoded inbound message.
#[derive(Clone, Debug, PartialEq)]
pub enum Inbound {
    /// A flexibility request.
    Signal(Signal),
    /// A vehicle's state; `None` = an empty retained payload, the vehicle left.
    VehicleState(VehicleId, Option<Box<Vehicle>>),
    /// A vehicle's answer to an order, on that vehicle's own topic.
    Ack(VehicleId, Ack),
    /// A demand-response bid.
    Bid(BidSubmission),
}

/// A rejected inbound message: which topic it came on, what kind it was, and why.
#[derive(Clone, Debug, PartialEq)]
pub struct Rejection {
    /// The classified topic, when the topic itself was fine.
    pub topic: Option<InboundTopic>,
    /// Why.
    pub error: InputError,
    /// The message's `id`, `order_id` or `request_id` (by topic), where it could be read:
    /// the Error's `ref`.
    pub reference: Option<String>,
}

impl Rejection {
    /// Whether this is a rejected signal (`SignalRejected`) rather than other input.
    pub fn is_signal(&self) -> bool {
        self.topic == Some(InboundTopic::Signals)
    }
}

/// The `<p>/errors` payload: one per rejected inbound message.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ErrorReport {
    /// The topic the rejected message came on.
    pub topic: String,
    /// What was wrong, as a sentence naming the field.
    pub error: String,
    /// When it was received.
    pub received_at: Timestamp,
    /// The refused message's `id`, `order_id` or `request_id`, where it could be read.
    #[serde(rename = "ref", skip_serializing_if = "Option::is_none")]
    pub reference: Option<String>,
}

/// The event recording a rejected inbound message: `kind` is `SignalRejected` or
/// `InputRejected`; the payload keeps the topic, the reason and the message itself (as JSON
/// when it parses and is small, else as an excerpt), so an auditor sees what was refused.
pub fn rejection_event(
    now: Timestamp,
    kind: EventKind,
    actor: impl Into<String>,
    region: &str,
    topic: &str,
    error: &str,
    payload: &[u8],
) -> Event {
    Event::of(now, actor, &rejected(kind, topic, error, payload)).region(Some(region))
}

/// The payload of [`rejection_event`]: the message as JSON when it parses and is small,
/// else an excerpt as a string.
pub fn rejected(kind: EventKind, topic: &str, error: &str, payload: &[u8]) -> crate::events::payload::Rejected {
    const KEEP: usize = 4096;
    let message = match serde_json::from_slice::<Value>(payload) {
        Ok(v) if payload.len() <= KEEP => v,
        _ => Value::String(String::from_utf8_lossy(&payload[..payload.len().min(KEEP / 4)]).into_owned()),
    };
    crate::events::payload::Rejected {
        topic: topic.to_owned(),
        error: error.to_owned(),
        bytes: payload.len(),
        message,
        signal: kind == EventKind::SignalRejected,
        reason: None,
        count: 1,
        refs: Vec::new(),
        first_at: None,
        last_at: None,
    }
}

impl Rejection {
    /// The event kind that records this rejection.
    pub fn event_kind(&self) -> EventKind {
        if self.is_signal() {
            EventKind::SignalRejected
        } else {
            EventKind::InputRejected
        }
    }

    /// The actor to name in the event: the vehicle for vehicle topics, else `mqtt`.
    pub fn actor(&self) -> String {
        match &self.topic {
            Some(InboundTopic::VehicleState(id) | InboundTopic::VehicleAck(id)) => format!("vehicle/{id}"),
            _ => "mqtt".to_owned(),
        }
    }
}

/// Decodes one publish. Returns `None` for topics outside the prefix (not ours to answer).
/// `now` is the default `start` of a signal and the reference for "in the future".
pub fn decode(topics: &Topics, topic: &str, payload: &[u8], now: Timestamp) -> Option<Result<Inbound, Rejection>> {
    let kind = match topics.classify(topic)? {
        Ok(kind) => kind,
        Err(error) => return Some(Err(Rejection { topic: None, error, reference: None })),
    };
    if let InboundTopic::VehicleState(id) = &kind {
        if payload.is_empty() {
            return Some(Ok(Inbound::VehicleState(id.clone(), None)));
        }
    }
    let obj = match object(payload) {
        Ok(obj) => obj,
        Err(error) => return Some(Err(Rejection { topic: Some(kind), error, reference: None })),
    };
    let decoded = match &kind {
        InboundTopic::Signals => decode_signal(&obj, now).map(Inbound::Signal),
        InboundTopic::VehicleState(id) => {
            decode_vehicle(id.clone(), &obj).map(|v| Inbound::VehicleState(id.clone(), Some(Box::new(v))))
        }
        InboundTopic::VehicleAck(id) => decode_ack(&obj).map(|a| Inbound::Ack(id.clone(), a)),
        InboundTopic::Bids => decode_bid(&obj, now).map(Inbound::Bid),
    };
    Some(decoded.map_err(|error| {
        let reference = kind.reference_field().and_then(|f| obj.reference(f));
        Rejection { topic: Some(kind), error, reference }
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{AckStatus, Direction, Phase, SignalType, Wiring};
    use proptest::strategy::Strategy;

    const NOW: Timestamp = Timestamp::from_millis(1_795_000_000_000);

    fn topics() -> Topics {
        Topics::new("gridweaver/depot1")
    }

    fn dec(topic: &str, payload: &str) -> Result<Inbound, Rejection> {
        decode(&topics(), &format!("gridweaver/depot1/{topic}"), payload.as_bytes(), NOW).unwrap()
    }

    fn err(topic: &str, payload: &str) -> String {
        dec(topic, payload).unwrap_err().error.to_string()
    }

    #[test]
    fn whole_floats_and_names_in_any_case_are_read() {
        let Inbound::Signal(sig) =
            dec("signals", r#"{"id":"s","type":"AFRR","direction":"DOWN","power_kw":1,"duration_s":60.0}"#).unwrap()
        else {
            panic!("a signal")
        };
        assert_eq!((sig.direction, sig.duration_s), (Direction::Down, 60));
        let err = dec("signals", r#"{"id":"s","type":"afrr","direction":"up","power_kw":1,"duration_s":60.5}"#);
        assert!(err.unwrap_err().error.to_string().contains("field `duration_s`"));
    }

    #[test]
    fn a_full_signal_decodes() {
        let s = r#"{"id":"s1","type":"afrr","direction":"down","power_kw":120.5,
                    "start":"2026-11-23T10:00:00Z","duration_s":300,"region":"north","extra":1}"#;
        let Inbound::Signal(sig) = dec("signals", s).unwrap() else { panic!() };
        assert_eq!(sig.kind, SignalType::Afrr);
        assert_eq!(sig.direction, Direction::Down);
        assert_eq!(sig.power_kw, 120.5);
        assert_eq!(sig.duration_s, 300);
        assert_eq!(sig.start.to_string(), "2026-11-23T10:00:00Z");
        assert_eq!(sig.region.as_deref(), Some("north"));
        assert_eq!(sig.unknown_fields, ["extra"]);
    }

    #[test]
    fn unknown_signal_fields_are_listed_bounded_and_a_typo_does_not_pass_unseen() {
        let Inbound::Signal(sig) =
            dec("signals", r#"{"id":"s","type":"afrr","direction":"up","power_kw":1,"duraton_s":60}"#).unwrap()
        else {
            panic!("a signal")
        };
        assert_eq!((sig.duration_s, sig.unknown_fields), (900, vec!["duraton_s".to_owned()]));
        let many: Vec<String> = (0..100).map(|i| format!(r#""{}{i}":1"#, "é".repeat(40))).collect();
        let payload = format!(r#"{{"id":"s","type":"afrr","direction":"up","power_kw":1,{}}}"#, many.join(","));
        let Inbound::Signal(sig) = dec("signals", &payload).unwrap() else { panic!("a signal") };
        assert_eq!(sig.unknown_fields.len(), MAX_UNKNOWN_FIELDS);
        assert!(sig.unknown_fields.iter().all(|f| f.len() <= MAX_UNKNOWN_NAME && f.starts_with('é')));
        let Inbound::Signal(known) =
            dec("signals", r#"{"id":"s","type":"afrr","direction":"up","power_kw":1,"mode":"setpoint"}"#).unwrap()
        else {
            panic!("a signal")
        };
        assert!(known.unknown_fields.is_empty());
    }

    #[test]
    fn a_signal_id_with_a_hash_and_an_unsupported_mode_are_refused_by_name() {
        assert!(err("signals", r#"{"id":"s#1","type":"fcr","direction":"up","power_kw":1}"#).contains("field `id`"));
        let droop = err("signals", r#"{"id":"s","type":"fcr","mode":"droop","power_kw":1,"direction":"up"}"#);
        assert!(droop.contains("field `mode`") && droop.contains("droop"), "{droop}");
    }

    #[test]
    fn a_rejection_names_the_message_where_its_id_could_be_read() {
        let reference = |topic: &str, payload: &str| dec(topic, payload).unwrap_err().reference;
        assert_eq!(reference("signals", r#"{"id":"s9","type":"afrr","power_kw":-1}"#).as_deref(), Some("s9"));
        assert_eq!(reference("vehicles/v1/ack", r#"{"order_id":"o1","status":"maybe"}"#).as_deref(), Some("o1"));
        assert_eq!(reference("bids", r#"{"request_id":"r1"}"#).as_deref(), Some("r1"));
        assert_eq!(reference("signals", r#"{"id":7,"type":"afrr"}"#), None);
        assert_eq!(reference("signals", "not json"), None);
        assert_eq!(reference("vehicles/v1/state", r#"{"soc":2}"#), None);
        let long = "x".repeat(MAX_ID_LEN + 1);
        assert_eq!(reference("signals", &format!(r#"{{"id":"{long}"}}"#)), None);
    }

    #[test]
    fn signal_defaults_and_numeric_type_codes() {
        let Inbound::Signal(sig) = dec("signals", r#"{"id":"s","type":0,"direction":"up","power_kw":1}"#).unwrap()
        else {
            panic!()
        };
        assert_eq!(sig.kind, SignalType::Fcr);
        assert_eq!(sig.start, NOW);
        assert_eq!(sig.duration_s, 900);
    }

    #[test]
    fn bad_signals_name_the_field() {
        let cases = [
            (r#"{"type":"fcr","direction":"up","power_kw":1}"#, "field `id` is required"),
            (r#"{"id":"s","type":"ffr","direction":"up","power_kw":1}"#, "field `type`"),
            (r#"{"id":"s","type":9,"direction":"up","power_kw":1}"#, "field `type`"),
            (r#"{"id":"s","type":"fcr","direction":"sideways","power_kw":1}"#, "field `direction`"),
            (
                r#"{"id":"s","type":"fcr","direction":"up","power_kw":-3}"#,
                "field `power_kw` must be a number > 0 and at most 1000000, got -3",
            ),
            (
                r#"{"id":"s","type":"fcr","direction":"up","power_kw":1e308}"#,
                "field `power_kw` must be a number > 0 and at most 1000000, got 1e308",
            ),
            (
                r#"{"id":"s","type":"fcr","direction":"up","power_kw":1,"replaces":"s"}"#,
                "field `replaces` names the signal itself",
            ),
            (
                &format!(r#"{{"id":"{}","type":"fcr","direction":"up","power_kw":1}}"#, "x".repeat(129)),
                "field `id` is 129 bytes long, more than the 128 allowed",
            ),
            (
                r#"{"id":"s","type":"fcr","direction":"up","power_kw":"3"}"#,
                "field `power_kw` must be a number, got a string",
            ),
            (r#"{"id":"s","type":"fcr","direction":"up","power_kw":1,"duration_s":0}"#, "field `duration_s`"),
            (r#"{"id":"s","type":"fcr","direction":"up","power_kw":1,"duration_s":1.5}"#, "field `duration_s`"),
            (r#"{"id":"s","type":"fcr","direction":"up","power_kw":1,"duration_s":-900}"#, "seconds > 0, got -900"),
            (r#"{"id":"s","type":"fcr","direction":"up","power_kw":1,"duration_s":0}"#, "seconds > 0, got 0"),
            (
                r#"{"id":"s","type":"transfer","direction":"up","power_kw":1,"leader_term":18446744073709551615}"#,
                "field `leader_term` must be at most 9007199254740991",
            ),
            (r#"{"id":"s","type":"fcr","direction":"up","power_kw":1,"start":"soon"}"#, "field `start`"),
            (r#"{"id":"s","type":"transfer","direction":"up","power_kw":1}"#, "field `leader_term` is required"),
            (r#"{"id":"","type":"fcr","direction":"up","power_kw":1}"#, "field `id` must not be empty"),
            ("[1,2]", "one JSON object"),
            ("{not json", "not valid JSON"),
        ];
        for (payload, want) in cases {
            let got = err("signals", payload);
            assert!(got.contains(want), "{payload}: got `{got}`, want `{want}`");
        }
    }

    #[test]
    fn oversized_payloads_are_rejected_unread() {
        let big = format!(r#"{{"id":"{}"}}"#, "x".repeat(MAX_PAYLOAD_BYTES));
        assert!(matches!(dec("signals", &big).unwrap_err().error, InputError::TooLarge(_)));
    }

    #[test]
    fn vehicle_state_decodes_with_defaults() {
        let p = r#"{"soc":0.5,"capacity_kwh":60,"max_charge_kw":11,"max_discharge_kw":7,"plugged_in":true}"#;
        let Inbound::VehicleState(id, Some(v)) = dec("vehicles/bus-7/state", p).unwrap() else { panic!() };
        assert_eq!(id.as_str(), "bus-7");
        assert_eq!((v.min_soc, v.max_soc, v.availability, v.priority), (0.2, 1.0, 1.0, 0.5));
        assert_eq!(v.wiring, Wiring::ThreePhase);
    }

    #[test]
    fn empty_retained_state_means_the_vehicle_left() {
        assert_eq!(dec("vehicles/bus-7/state", "").unwrap(), Inbound::VehicleState("bus-7".into(), None));
    }

    #[test]
    fn a_vehicle_names_its_demand_response_participant() {
        let p = r#"{"soc":0.5,"capacity_kwh":60,"max_charge_kw":7,"max_discharge_kw":7,"plugged_in":true,"participant":"fleet-a"}"#;
        let Inbound::VehicleState(_, Some(v)) = dec("vehicles/v1/state", p).unwrap() else { panic!() };
        assert_eq!(v.participant.as_deref(), Some("fleet-a"));
        let long = p.replace("fleet-a", &"x".repeat(200));
        assert!(err("vehicles/v1/state", &long).contains("field `participant`"));
    }

    #[test]
    fn bad_vehicle_states_name_the_field() {
        let base = r#""capacity_kwh":60,"max_charge_kw":11,"max_discharge_kw":7,"plugged_in":true"#;
        let cases = [
            (format!(r#"{{"soc":1.2,{base}}}"#), "field `soc` must be within 0..=1"),
            (format!(r#"{{{base}}}"#), "field `soc` is required"),
            (format!(r#"{{"soc":0.5,{base},"phases":1}}"#), "field `phase` is required"),
            (format!(r#"{{"soc":0.5,{base},"phases":2}}"#), "field `phases` must be 1 or 3"),
            (format!(r#"{{"soc":0.5,{base},"min_soc":0.9,"max_soc":0.8}}"#), "field `min_soc` must not exceed"),
            (format!(r#"{{"soc":0.5,{base},"priority":-1}}"#), "field `priority`"),
            (
                r#"{"soc":0.5,"capacity_kwh":0,"max_charge_kw":11,"max_discharge_kw":7,"plugged_in":true}"#.into(),
                "field `capacity_kwh`",
            ),
            (
                r#"{"soc":0.5,"capacity_kwh":60,"max_charge_kw":11,"max_discharge_kw":7,"plugged_in":"yes"}"#.into(),
                "field `plugged_in`",
            ),
            (
                r#"{"soc":0.5,"capacity_kwh":60,"max_charge_kw":11,"max_discharge_kw":1e308,"plugged_in":true}"#.into(),
                "field `max_discharge_kw` must be within 0..=10000 kW, got 1e308",
            ),
            (
                r#"{"soc":0.5,"capacity_kwh":2e4,"max_charge_kw":11,"max_discharge_kw":7,"plugged_in":true}"#.into(),
                "field `capacity_kwh` must be a number > 0 and at most 10000, got 20000",
            ),
            (format!(r#"{{"soc":0.5,{base},"price_per_kwh":1e9}}"#), "field `price_per_kwh` must be within"),
        ];
        for (payload, want) in cases {
            let got = err("vehicles/v1/state", &payload);
            assert!(got.contains(want), "{payload}: got `{got}`, want `{want}`");
        }
    }

    #[test]
    fn single_phase_vehicles_name_their_phase() {
        let p = r#"{"soc":0.5,"capacity_kwh":60,"max_charge_kw":7,"max_discharge_kw":7,"plugged_in":true,"phases":1,"phase":"L2"}"#;
        let Inbound::VehicleState(_, Some(v)) = dec("vehicles/v/state", p).unwrap() else { panic!() };
        assert_eq!(v.wiring, Wiring::SinglePhase(Phase::L2));
    }

    #[test]
    fn acks_decode_and_reject_unknown_status() {
        let Inbound::Ack(id, ack) =
            dec("vehicles/v9/ack", r#"{"order_id":"o1","status":"rejected","reason":"cold"}"#).unwrap()
        else {
            panic!()
        };
        assert_eq!((id.as_str(), ack.status, ack.reason.as_deref()), ("v9", AckStatus::Rejected, Some("cold")));
        assert!(err("vehicles/v9/ack", r#"{"order_id":"o1","status":"maybe"}"#).contains("field `status`"));
    }

    #[test]
    fn bids_are_validated() {
        let ok = r#"{"request_id":"r","participant":"p","program":"winter","price_per_mw":50,"min_mw":1,"max_mw":2,
                     "start":"2030-01-01T00:00:00Z","end":"2030-01-01T01:00:00Z","reliability":0.9}"#;
        assert!(matches!(dec("bids", ok).unwrap(), Inbound::Bid(_)));
        let past = ok.replace("2030-01-01T01", "2020-01-01T01").replace("2030-01-01T00", "2020-01-01T00");
        assert!(err("bids", &past).contains("field `end` must be in the future"));
        assert!(err("bids", &ok.replace(r#""max_mw":2"#, r#""max_mw":0.5"#)).contains("field `max_mw`"));
    }

    proptest::proptest! {
        /// Whatever arrives, decoding answers with a value or an error, never a panic.
        #[test]
        fn decoding_never_panics(
            leaf in proptest::sample::select(vec!["signals", "bids", "vehicles/v/state", "vehicles/v/ack", "vehicles/+/ack", "x"]),
            bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..300),
        ) {
            let _ = decode(&topics(), &format!("gridweaver/depot1/{leaf}"), &bytes, NOW);
        }

        /// JSON objects with the right field names and wild values: still no panic.
        #[test]
        fn decoding_wild_json_never_panics(
            leaf in proptest::sample::select(vec!["signals", "bids", "vehicles/v/state", "vehicles/v/ack"]),
            fields in proptest::collection::btree_map(
                proptest::sample::select(vec!["id", "type", "direction", "power_kw", "start", "duration_s", "soc",
                    "capacity_kwh", "max_charge_kw", "max_discharge_kw", "plugged_in", "phases", "phase", "order_id",
                    "status", "min_mw", "max_mw", "end", "reliability", "leader_term", "min_soc", "max_soc"]),
                proptest::prop_oneof![
                    proptest::num::f64::ANY.prop_map(|x| serde_json::json!(x)),
                    proptest::num::i64::ANY.prop_map(|x| serde_json::json!(x)),
                    "[a-zA-Z0-9:+-]{0,12}".prop_map(|s| serde_json::json!(s)),
                    proptest::bool::ANY.prop_map(|b| serde_json::json!(b)),
                    proptest::strategy::Just(serde_json::Value::Null),
                ],
                0..12,
            ),
        ) {
            let body = serde_json::to_vec(&fields).unwrap();
            let _ = decode(&topics(), &format!("gridweaver/depot1/{leaf}"), &body, NOW);
        }
    }

    #[test]
    fn topics_outside_the_prefix_are_not_ours_and_unknown_ones_are_errors() {
        assert!(decode(&topics(), "other/signals", b"{}", NOW).is_none());
        assert!(decode(&topics(), "gridweaver/depot1x/signals", b"{}", NOW).is_none());
        assert_eq!(dec("weather", "{}").unwrap_err().error, InputError::UnknownTopic);
        assert!(dec("vehicles/a/b/ack", "{}").is_err());
    }
}
