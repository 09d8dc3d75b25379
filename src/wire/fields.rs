//! A JSON object with typed accessors whose errors name the field and the real limit, and
//! the range checks every inbound payload shares.

use serde_json::{Map, Value};

use super::*;

pub(super) fn object(payload: &[u8]) -> Result<Obj, InputError> {
    if payload.len() > MAX_PAYLOAD_BYTES {
        return Err(InputError::TooLarge(payload.len()));
    }
    match serde_json::from_slice::<Value>(payload) {
        Ok(Value::Object(map)) => Ok(Obj(map)),
        Ok(_) => Err(InputError::NotObject),
        Err(e) => Err(InputError::NotJson(e.to_string())),
    }
}

/// A JSON object with typed, field-naming accessors. `null` counts as absent.
pub(super) struct Obj(Map<String, Value>);

impl Obj {
    pub(super) fn get(&self, f: &'static str) -> Option<&Value> {
        self.0.get(f).filter(|v| !v.is_null())
    }

    /// The names of fields not in `known`, in the object's order: at most
    /// [`MAX_UNKNOWN_FIELDS`], each cut to [`MAX_UNKNOWN_NAME`] bytes (on a character
    /// boundary), so that a message of a thousand made-up keys costs the log little.
    pub(super) fn unknown(&self, known: &[&str]) -> Vec<String> {
        self.0
            .keys()
            .filter(|k| !known.contains(&k.as_str()))
            .take(MAX_UNKNOWN_FIELDS)
            .map(|k| {
                let mut end = k.len().min(MAX_UNKNOWN_NAME);
                while !k.is_char_boundary(end) {
                    end -= 1;
                }
                k[..end].to_owned()
            })
            .collect()
    }

    /// Field `f` when it can name the message in an answer: a string of 1 to
    /// [`MAX_ID_LEN`] bytes without control characters.
    pub(super) fn reference(&self, f: &'static str) -> Option<String> {
        match self.get(f) {
            Some(Value::String(s)) if !s.is_empty() && s.len() <= MAX_ID_LEN && !s.chars().any(char::is_control) => {
                Some(s.clone())
            }
            _ => None,
        }
    }

    /// A string of at most `max` bytes.
    pub(super) fn opt_str_max(&self, f: &'static str, max: usize) -> Result<Option<&str>, InputError> {
        match self.get(f) {
            None => Ok(None),
            Some(Value::String(s)) if s.is_empty() => Err(invalid(f, "must not be empty")),
            Some(Value::String(s)) if s.len() > max => {
                Err(invalid(f, format!("is {} bytes long, more than the {max} allowed", s.len())))
            }
            Some(Value::String(s)) => Ok(Some(s)),
            Some(v) => Err(invalid(f, format!("must be a string, got {}", type_name(v)))),
        }
    }

    pub(super) fn opt_str(&self, f: &'static str) -> Result<Option<&str>, InputError> {
        self.opt_str_max(f, MAX_TEXT_LEN)
    }

    pub(super) fn str(&self, f: &'static str) -> Result<&str, InputError> {
        self.opt_str(f)?.ok_or(InputError::Missing(f))
    }

    pub(super) fn opt_id(&self, f: &'static str) -> Result<Option<String>, InputError> {
        Ok(self.opt_str_max(f, MAX_ID_LEN)?.map(str::to_owned))
    }

    pub(super) fn id(&self, f: &'static str) -> Result<String, InputError> {
        self.opt_id(f)?.ok_or(InputError::Missing(f))
    }

    pub(super) fn opt_num(&self, f: &'static str) -> Result<Option<f64>, InputError> {
        match self.get(f) {
            None => Ok(None),
            Some(Value::Number(n)) => match n.as_f64() {
                Some(x) if x.is_finite() => Ok(Some(x)),
                _ => Err(invalid(f, "must be a finite number")),
            },
            Some(v) => Err(invalid(f, format!("must be a number, got {}", type_name(v)))),
        }
    }

    pub(super) fn num(&self, f: &'static str) -> Result<f64, InputError> {
        self.opt_num(f)?.ok_or(InputError::Missing(f))
    }

    pub(super) fn opt_uint(&self, f: &'static str) -> Result<Option<u64>, InputError> {
        match self.get(f) {
            None => Ok(None),
            // `60.0` is the whole number 60 (some encoders write every number as a float).
            Some(Value::Number(n)) => match (n.as_u64(), n.as_f64()) {
                (Some(u), _) => Ok(Some(u)),
                (None, Some(x)) if x.fract() == 0.0 && (0.0..=9_007_199_254_740_992.0).contains(&x) => {
                    Ok(Some(x as u64))
                }
                _ => Err(invalid(f, format!("must be a whole number >= 0, got {n}"))),
            },
            Some(v) => Err(invalid(f, format!("must be a whole number, got {}", type_name(v)))),
        }
    }

    pub(super) fn opt_bool(&self, f: &'static str) -> Result<Option<bool>, InputError> {
        match self.get(f) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(v) => Err(invalid(f, format!("must be true or false, got {}", type_name(v)))),
        }
    }

    pub(super) fn opt_time(&self, f: &'static str) -> Result<Option<Timestamp>, InputError> {
        match self.opt_str(f)? {
            None => Ok(None),
            Some(s) => Timestamp::parse_rfc3339(s)
                .map(Some)
                .ok_or_else(|| invalid(f, format!("must be an RFC 3339 time such as 2026-11-23T10:00:00Z, got `{s}`"))),
        }
    }

    pub(super) fn time(&self, f: &'static str) -> Result<Timestamp, InputError> {
        self.opt_time(f)?.ok_or(InputError::Missing(f))
    }
}

pub(super) fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// `x` checked against a rule; `ok` says whether it holds, `rule` how to say it.
pub(super) fn check(f: &'static str, x: f64, ok: bool, rule: &str) -> Result<f64, InputError> {
    if ok {
        Ok(x)
    } else {
        Err(invalid(f, format!("must be {rule}, got {}", compact(x))))
    }
}

/// `x` as a person writes it: `1e308` rather than 309 digits.
pub(super) fn compact(x: f64) -> String {
    if x != 0.0 && !(1e-6..1e15).contains(&x.abs()) {
        format!("{x:e}")
    } else {
        x.to_string()
    }
}

pub(super) fn positive(f: &'static str, x: f64) -> Result<f64, InputError> {
    check(f, x, x > 0.0, "a number > 0")
}

/// A number > 0 and at most `max` (a plausibility bound, named in the error).
pub(super) fn within(f: &'static str, x: f64, max: f64) -> Result<f64, InputError> {
    check(f, x, x > 0.0 && x <= max, &format!("a number > 0 and at most {max}"))
}

/// A vehicle's power rating: 0..=[`MAX_VEHICLE_KW`].
pub(super) fn rating(f: &'static str, x: f64) -> Result<f64, InputError> {
    check(f, x, (0.0..=MAX_VEHICLE_KW).contains(&x), &format!("within 0..={MAX_VEHICLE_KW} kW"))
}

pub(super) fn non_negative(f: &'static str, x: f64) -> Result<f64, InputError> {
    check(f, x, x >= 0.0, "a number >= 0")
}

pub(super) fn fraction(f: &'static str, x: f64) -> Result<f64, InputError> {
    check(f, x, (0.0..=1.0).contains(&x), "within 0..=1")
}

pub(super) fn opt_fraction(o: &Obj, f: &'static str, default: f64) -> Result<f64, InputError> {
    o.opt_num(f)?.map_or(Ok(default), |x| fraction(f, x))
}
