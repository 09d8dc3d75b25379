//! Time as data.
//!
//! The core never reads a clock: every function that needs "now" takes a [`Timestamp`]
//! from its caller. A timestamp is unix epoch milliseconds in UTC; on the wire it is an
//! RFC 3339 string (`2026-11-23T10:00:00Z`), in the event log an integer (`ts_ms`).

use std::fmt;

use chrono::{DateTime, SecondsFormat, Utc};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A point in time: unix epoch milliseconds, UTC.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Timestamp(i64);

impl Timestamp {
    /// The timestamp `ms` milliseconds after the unix epoch.
    pub const fn from_millis(ms: i64) -> Self {
        Self(ms)
    }

    /// Milliseconds since the unix epoch.
    pub const fn as_millis(self) -> i64 {
        self.0
    }

    /// Parses an RFC 3339 time (any offset; stored as UTC).
    pub fn parse_rfc3339(s: &str) -> Option<Self> {
        DateTime::parse_from_rfc3339(s).ok().map(|t| Self(t.with_timezone(&Utc).timestamp_millis()))
    }

    /// This time plus `ms` milliseconds (saturating).
    pub fn plus_millis(self, ms: i64) -> Self {
        Self(self.0.saturating_add(ms))
    }

    /// This time plus `s` seconds (saturating).
    pub fn plus_secs(self, s: u64) -> Self {
        self.plus_millis(i64::try_from(s.saturating_mul(1000)).unwrap_or(i64::MAX))
    }

    /// Seconds from `self` until `later` (negative when `later` is earlier).
    pub fn secs_until(self, later: Timestamp) -> f64 {
        (later.0 - self.0) as f64 / 1000.0
    }
}

impl fmt::Display for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match DateTime::<Utc>::from_timestamp_millis(self.0) {
            Some(t) => f.write_str(&t.to_rfc3339_opts(SecondsFormat::AutoSi, true)),
            None => write!(f, "@{}ms", self.0),
        }
    }
}

impl Serialize for Timestamp {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// Read from the text in place, without a `String` in between.
impl<'de> Deserialize<'de> for Timestamp {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Text;
        impl serde::de::Visitor<'_> for Text {
            type Value = Timestamp;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an RFC 3339 time")
            }
            fn visit_str<E: serde::de::Error>(self, s: &str) -> Result<Timestamp, E> {
                Timestamp::parse_rfc3339(s).ok_or_else(|| E::custom(format!("`{s}` is not an RFC 3339 time")))
            }
        }
        d.deserialize_str(Text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_round_trips_in_utc() {
        let t = Timestamp::parse_rfc3339("2026-11-23T10:00:00Z").unwrap();
        assert_eq!(t.to_string(), "2026-11-23T10:00:00Z");
        let offset = Timestamp::parse_rfc3339("2026-11-23T11:00:00.250+01:00").unwrap();
        assert_eq!(offset.to_string(), "2026-11-23T10:00:00.250Z");
        assert_eq!(offset.as_millis() - t.as_millis(), 250);
    }

    #[test]
    fn garbage_is_not_a_time() {
        assert!(Timestamp::parse_rfc3339("yesterday").is_none());
        assert!(Timestamp::parse_rfc3339("2026-13-01T00:00:00Z").is_none());
    }
}
