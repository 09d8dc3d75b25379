//! `<p>/signals`: a Signal.

use super::fields::*;
use super::*;
use crate::model::{Direction, Signal, SignalType};
use serde_json::Value;

/// The fields of a Signal the contract names.
const FIELDS: [&str; 11] = [
    "id",
    "type",
    "direction",
    "power_kw",
    "start",
    "duration_s",
    "region",
    "leader_term",
    "replaces",
    "program",
    "mode",
];

pub(super) fn decode_signal(o: &Obj, now: Timestamp) -> Result<Signal, InputError> {
    let id = o.id("id")?;
    if id.contains('#') {
        // `<signal id>#<n>` names the setpoints of an FCR droop commitment.
        return Err(invalid("id", "must not contain `#` (it is kept for the setpoints of a signal, `<id>#<n>`)"));
    }
    match o.opt_str("mode")? {
        None | Some("setpoint") => {}
        Some(other) => {
            let shown: String = other.chars().take(64).collect();
            return Err(invalid(
                "mode",
                format!("`{shown}` is not supported by this gateway (only `setpoint`; FCR droop from measured frequency is planned)"),
            ));
        }
    }
    let kind = match o.get("type") {
        None => return Err(InputError::Missing("type")),
        Some(Value::String(s)) => SignalType::parse(s),
        Some(Value::Number(n)) => n.as_u64().and_then(SignalType::from_code),
        Some(_) => None,
    }
    .ok_or_else(|| invalid("type", "must be one of fcr, afrr, mfrr, dr, transfer or their codes 0-4"))?;
    // Names in any case, as for `type`.
    let direction = match o.str("direction")? {
        d if d.eq_ignore_ascii_case("up") => Direction::Up,
        d if d.eq_ignore_ascii_case("down") => Direction::Down,
        other => {
            let shown: String = other.chars().take(64).collect();
            return Err(invalid("direction", format!("must be `up` or `down`, got `{shown}`")));
        }
    };
    let power_kw = within("power_kw", o.num("power_kw")?, MAX_SIGNAL_KW)?;
    let start = o.opt_time("start")?.unwrap_or(now);
    // One message for every number that is not a whole positive count of seconds.
    let not_seconds = |n: &Value| invalid("duration_s", format!("must be a whole number of seconds > 0, got {n}"));
    let duration_s = match o.opt_uint("duration_s") {
        Ok(None) => 900,
        Ok(Some(0)) => return Err(not_seconds(&Value::from(0))),
        Ok(Some(d)) => d,
        Err(e) => match o.get("duration_s") {
            Some(n @ Value::Number(_)) => return Err(not_seconds(n)),
            _ => return Err(e),
        },
    };
    let region = o.opt_id("region")?;
    let leader_term = o.opt_uint("leader_term")?;
    if let Some(term) = leader_term.filter(|t| *t > MAX_LEADER_TERM) {
        return Err(invalid("leader_term", format!("must be at most {MAX_LEADER_TERM}, got {term}")));
    }
    if kind == SignalType::Transfer && leader_term.is_none() {
        return Err(InputError::Missing("leader_term"));
    }
    let replaces = o.opt_id("replaces")?;
    if replaces.as_deref() == Some(id.as_str()) {
        return Err(invalid("replaces", "names the signal itself; it must name an earlier signal"));
    }
    let program = o.opt_id("program")?;
    let unknown_fields = o.unknown(&FIELDS);
    Ok(Signal {
        id,
        kind,
        direction,
        power_kw,
        start,
        duration_s,
        region,
        leader_term,
        replaces,
        program,
        unknown_fields,
    })
}
