//! The fleet and the messages of the contract, as typed values.
//!
//! Everything here is plain data with serde derives that match CONTRACT.md. Inbound
//! payloads are not deserialized straight into these types: [`crate::wire`] decodes and
//! validates them first, so a value of these types is always within its contract ranges.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::time::Timestamp;

/// A vehicle's id: the `<vehicle_id>` segment of its topics. Built from outside input only
/// through [`VehicleId::parse`], which checks it. Shared, not copied: an id is held by the
/// fleet, every order, commitment and answer, so a clone is a reference count.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(transparent)]
pub struct VehicleId(std::sync::Arc<str>);

/// Read from the text in place (one allocation, where `Arc<str>`'s own goes through a
/// `String`). Ids read back from the log were checked when they were recorded.
impl<'de> Deserialize<'de> for VehicleId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Text;
        impl serde::de::Visitor<'_> for Text {
            type Value = VehicleId;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a vehicle id")
            }
            fn visit_str<E: serde::de::Error>(self, s: &str) -> Result<VehicleId, E> {
                Ok(VehicleId(s.into()))
            }
        }
        d.deserialize_str(Text)
    }
}

/// Lookups by the id's text (maps keyed by [`VehicleId`]).
impl std::borrow::Borrow<str> for VehicleId {
    fn borrow(&self) -> &str {
        &self.0
    }
}

/// Longest vehicle id, bytes.
pub const MAX_VEHICLE_ID_LEN: usize = 128;

impl VehicleId {
    /// `s` as a vehicle id, if it can be one: 1 to 128 bytes, no `/`, MQTT wildcards or
    /// control characters (it becomes a topic segment).
    pub fn parse(s: &str) -> Option<Self> {
        let ok = !s.is_empty()
            && s.len() <= MAX_VEHICLE_ID_LEN
            && !s.contains(['/', '+', '#'])
            && !s.chars().any(char::is_control);
        ok.then(|| Self(s.into()))
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for VehicleId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// For ids written in code (tests, the simulator's fleet): not checked; input from outside
/// goes through [`VehicleId::parse`].
impl From<&str> for VehicleId {
    fn from(s: &str) -> Self {
        Self(s.into())
    }
}

/// What an id made of text can do: be read as text (`as_str`, `Display`, `Deref` and
/// `Borrow<str>` for lookups), be compared with text, and be made from text that was
/// checked before (ids read back from the log, or written in tests).
macro_rules! text_id {
    ($ty:ident) => {
        impl $ty {
            /// The id as text.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $ty {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl std::ops::Deref for $ty {
            type Target = str;
            fn deref(&self) -> &str {
                &self.0
            }
        }

        impl std::borrow::Borrow<str> for $ty {
            fn borrow(&self) -> &str {
                &self.0
            }
        }

        impl PartialEq<str> for $ty {
            fn eq(&self, other: &str) -> bool {
                self.0 == other
            }
        }

        impl PartialEq<&str> for $ty {
            fn eq(&self, other: &&str) -> bool {
                self.0 == *other
            }
        }

        /// Not checked: for ids read back from the log or written in tests.
        impl From<&str> for $ty {
            fn from(s: &str) -> Self {
                Self(s.to_owned())
            }
        }
    };
}

/// A dispatch's id, `d<ms>-<n>`: the time it was planned (epoch ms) and its number, which
/// never repeats within a log. Orders are named after it (`d<ms>-<n>-<attempt>-<k>`).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct DispatchId(String);

impl DispatchId {
    /// Dispatch number `n`, planned at `planned`.
    pub fn new(planned: Timestamp, n: u64) -> Self {
        Self(format!("d{}-{n}", planned.as_millis()))
    }

    /// Its number (`n` of `d<ms>-<n>`), if it has one.
    pub fn number(&self) -> Option<u64> {
        self.0.rsplit('-').next().and_then(|n| n.parse().ok())
    }
}

impl From<&DispatchId> for String {
    fn from(id: &DispatchId) -> String {
        id.0.clone()
    }
}

text_id!(DispatchId);

/// An order's id, `<dispatch id>-<attempt>-<n>`: order `n` of an attempt of a dispatch.
/// What a vehicle names in its ACK is plain text until it is matched to one of these.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct OrderId(String);

impl OrderId {
    /// Order `n` of `attempt` of `dispatch`.
    pub fn new(dispatch: &str, attempt: u32, n: u32) -> Self {
        Self(format!("{dispatch}-{attempt}-{n}"))
    }

    /// Its attempt and number, if it is named like [`OrderId::new`] names them.
    pub fn number(&self) -> Option<(u32, u32)> {
        order_number(&self.0)
    }

    /// Its dispatch's id, if it is named like [`OrderId::new`] names them.
    pub fn dispatch(&self) -> Option<&str> {
        order_dispatch(&self.0)
    }
}

/// The dispatch of an order id named like [`OrderId::new`] names them (any text: a v1 row
/// or an ACK may hold anything).
pub fn order_dispatch(order_id: &str) -> Option<&str> {
    let mut parts = order_id.rsplitn(3, '-');
    let (_n, _attempt) = (parts.next()?, parts.next()?);
    parts.next()
}

/// The attempt and number of an order id named like [`OrderId::new`] names them.
pub fn order_number(order_id: &str) -> Option<(u32, u32)> {
    let mut parts = order_id.rsplitn(3, '-');
    let n = parts.next()?.parse().ok()?;
    let attempt = parts.next()?.parse().ok()?;
    parts.next()?;
    Some((attempt, n))
}

text_id!(OrderId);

/// What a signal asks of the fleet.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    /// Deliver power to the grid: discharge, or charge less.
    Up,
    /// Absorb power from the grid: charge more.
    Down,
}

impl Direction {
    /// The order direction that serves this signal direction.
    pub fn order_direction(self) -> OrderDirection {
        match self {
            Direction::Up => OrderDirection::Discharge,
            Direction::Down => OrderDirection::Charge,
        }
    }

    /// The contract's name: `up` or `down`.
    pub fn as_str(self) -> &'static str {
        match self {
            Direction::Up => "up",
            Direction::Down => "down",
        }
    }
}

/// What an order asks of one vehicle.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OrderDirection {
    /// Give power to the grid.
    Discharge,
    /// Take power from the grid.
    Charge,
}

/// The flexibility service a signal belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SignalType {
    /// Frequency containment reserve (code 0).
    Fcr,
    /// Automatic frequency restoration reserve (code 1).
    Afrr,
    /// Manual frequency restoration reserve (code 2).
    Mfrr,
    /// Demand response (code 3).
    Dr,
    /// A cross-region cascade ordered by the cluster leader (code 4).
    Transfer,
}

impl SignalType {
    /// Every type, in code order.
    pub const ALL: [SignalType; 5] =
        [SignalType::Fcr, SignalType::Afrr, SignalType::Mfrr, SignalType::Dr, SignalType::Transfer];

    /// The contract's numeric code.
    pub fn code(self) -> u8 {
        self as u8
    }

    /// The contract's name (`fcr`, `afrr`, ...).
    pub fn name(self) -> &'static str {
        match self {
            SignalType::Fcr => "fcr",
            SignalType::Afrr => "afrr",
            SignalType::Mfrr => "mfrr",
            SignalType::Dr => "dr",
            SignalType::Transfer => "transfer",
        }
    }

    /// The type with this name (case-insensitive) or numeric code (`"0"`..`"4"`).
    pub fn parse(s: &str) -> Option<Self> {
        let s = s.trim();
        Self::ALL.into_iter().find(|t| t.name().eq_ignore_ascii_case(s) || t.code().to_string() == s)
    }

    /// The type with this numeric code.
    pub fn from_code(code: u64) -> Option<Self> {
        Self::ALL.into_iter().find(|t| u64::from(t.code()) == code)
    }
}

impl fmt::Display for SignalType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// An AC phase of the site's connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Phase {
    /// Phase 1.
    L1,
    /// Phase 2.
    L2,
    /// Phase 3.
    L3,
}

/// How a vehicle is wired to the site.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Wiring {
    /// Three-phase: a third of its power on each phase.
    ThreePhase,
    /// Single-phase, on the given phase.
    SinglePhase(Phase),
}

/// A flexibility request, decoded and validated.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Signal {
    /// Unique id; a repeated id is a duplicate.
    pub id: String,
    /// The service.
    #[serde(rename = "type")]
    pub kind: SignalType,
    /// Up (deliver) or down (absorb).
    pub direction: Direction,
    /// Requested power, kW, > 0.
    pub power_kw: f64,
    /// When delivery starts.
    pub start: Timestamp,
    /// How long delivery lasts, seconds, > 0.
    pub duration_s: u64,
    /// The region it is meant for (`None` = this site).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub region: Option<String>,
    /// The cluster leader's term, for `transfer` signals.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub leader_term: Option<u64>,
    /// The id of an earlier signal this one supersedes (a setpoint stream).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replaces: Option<String>,
    /// For `dr`: the demand-response program whose accepted bids this activates.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub program: Option<String>,
    /// Fields of the message that the contract does not know (ignored, but recorded in
    /// `SignalReceived` so that a typo such as `duraton_s` is visible in the log).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub unknown_fields: Vec<String>,
}

impl Signal {
    /// A signal with the contract's defaults: a 900 s window from `start`, for this site,
    /// replacing nothing.
    pub fn new(id: impl Into<String>, kind: SignalType, direction: Direction, power_kw: f64, start: Timestamp) -> Self {
        Self {
            id: id.into(),
            kind,
            direction,
            power_kw,
            start,
            duration_s: 900,
            region: None,
            leader_term: None,
            replaces: None,
            program: None,
            unknown_fields: Vec::new(),
        }
    }

    /// When delivery ends.
    pub fn end(&self) -> Timestamp {
        self.start.plus_secs(self.duration_s)
    }
}

/// One vehicle's latest state, as its `vehicles/<id>/state` topic reported it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Vehicle {
    /// Its id.
    pub id: VehicleId,
    /// State of charge, 0..=1.
    pub soc: f64,
    /// Usable battery capacity, kWh, > 0.
    pub capacity_kwh: f64,
    /// Charging power rating, kW.
    pub max_charge_kw: f64,
    /// Discharging power rating, kW.
    pub max_discharge_kw: f64,
    /// Whether it is connected to a charger.
    pub plugged_in: bool,
    /// When it leaves (`None` = not known).
    pub departure: Option<Timestamp>,
    /// The SoC it must not be discharged below.
    pub min_soc: f64,
    /// The SoC it must not be charged above.
    pub max_soc: f64,
    /// Its fleet segment (`None` = default weights).
    pub segment: Option<String>,
    /// Probability that it follows an order, 0..=1.
    pub availability: f64,
    /// Whether its state stated `availability` (if not, the prediction from its ACK history
    /// is used where there is one).
    #[serde(default = "yes")]
    pub availability_stated: bool,
    /// Battery wear, 0..=1; scales the power it is asked for.
    pub degradation: f64,
    /// The operator's preference for using it for flexibility, 0..=1 (higher = used first).
    pub priority: f64,
    /// What its energy costs, per kWh (lower = used first).
    pub price_per_kwh: f64,
    /// The feeder/charger group whose kW limit it shares.
    pub group: Option<String>,
    /// Its phase wiring.
    pub wiring: Wiring,
    /// The demand-response participant (fleet sub-operator or owner) whose bids it serves;
    /// `None` = the depot's own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub participant: Option<String>,
}

impl Vehicle {
    /// A plugged-in vehicle with the contract's defaults, for tests and the simulator.
    pub fn new(id: impl Into<String>, soc: f64, capacity_kwh: f64, max_kw: f64) -> Self {
        Self {
            id: VehicleId(id.into().into()),
            soc,
            capacity_kwh,
            max_charge_kw: max_kw,
            max_discharge_kw: max_kw,
            plugged_in: true,
            departure: None,
            min_soc: 0.2,
            max_soc: 1.0,
            segment: None,
            availability: 1.0,
            availability_stated: true,
            degradation: 0.0,
            priority: 0.5,
            price_per_kwh: 0.0,
            group: None,
            wiring: Wiring::ThreePhase,
            participant: None,
        }
    }

    /// Whether `other` is this state as far as a plan can tell: every field equal, and the
    /// SoC within `soc_deadband` (a fraction of the battery) of this one. The gateway
    /// records a vehicle's state only when it changes beyond that, so a fleet that drifts
    /// by a few Wh does not write a row per vehicle per report.
    pub fn same_for_planning(&self, other: &Vehicle, soc_deadband: f64) -> bool {
        (self.soc - other.soc).abs() < soc_deadband && *self == Vehicle { soc: self.soc, ..other.clone() }
    }

    /// The power rating in a direction, kW.
    pub fn rating_kw(&self, direction: Direction) -> f64 {
        match direction {
            Direction::Up => self.max_discharge_kw,
            Direction::Down => self.max_charge_kw,
        }
    }

    /// Energy it can still move in a direction before reaching its SoC bound, kWh
    /// (`min_soc` when discharging, `max_soc` when charging; never negative).
    pub fn energy_headroom_kwh(&self, direction: Direction) -> f64 {
        let soc_room = match direction {
            Direction::Up => self.soc - self.min_soc,
            Direction::Down => self.max_soc - self.soc,
        };
        (soc_room * self.capacity_kwh).max(0.0)
    }

    /// The power it can still give in `direction`, kW, on top of `current_kw` it already
    /// gives in that direction, sustained for `duration_s` seconds (as if `current_kw` ran
    /// over the same window: [`Vehicle::capacity_beside`] with its energy).
    pub fn effective_capacity(&self, direction: Direction, current_kw: f64, duration_s: f64) -> f64 {
        let current = current_kw.max(0.0);
        self.capacity_beside(direction, current, current * duration_s.max(0.0) / 3600.0, duration_s)
    }

    /// The power it can still give in `direction` for `duration_s` seconds beside what it
    /// is committed to: `committed_kw` at once during the window (against its rating) and
    /// `committed_kwh` still to be delivered from its SoC by every commitment (against the
    /// energy between its SoC and its bound).
    ///
    /// It is the smaller of the rating's headroom and the power the energy left sustains
    /// over the duration; then scaled by its availability and by `1 - degradation`. A
    /// battery at or beyond its bound, or whose energy is all committed, gives 0. A zero
    /// duration moves no energy, so only the rating limits it. Never negative.
    pub fn capacity_beside(&self, direction: Direction, committed_kw: f64, committed_kwh: f64, duration_s: f64) -> f64 {
        let power_room = self.rating_kw(direction) - committed_kw.max(0.0);
        let energy = self.energy_headroom_kwh(direction) - committed_kwh.max(0.0);
        if energy <= 0.0 || power_room <= 0.0 {
            return 0.0;
        }
        let energy_room = if duration_s > 0.0 { energy / (duration_s / 3600.0) } else { f64::INFINITY };
        let scale = self.availability.clamp(0.0, 1.0) * (1.0 - self.degradation.clamp(0.0, 1.0));
        (power_room.min(energy_room) * scale).max(0.0)
    }
}

fn yes() -> bool {
    true
}

/// An order to one vehicle.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Order {
    /// Unique id; its ACK names it.
    pub order_id: OrderId,
    /// The dispatch it serves.
    pub dispatch_id: DispatchId,
    /// The vehicle it is for.
    pub vehicle_id: VehicleId,
    /// Charge or discharge.
    pub direction: OrderDirection,
    /// Power to add in that direction, kW, > 0. On the wire to the watt
    /// ([`serialize_watts`]); the ledger keeps it exact.
    #[serde(serialize_with = "serialize_watts")]
    pub power_kw: f64,
    /// When to start.
    pub start: Timestamp,
    /// When to stop.
    pub until: Timestamp,
    /// 1 = first allocation, 2+ = fallback.
    pub attempt: u32,
}

/// What the orders of one attempt of a dispatch share: the dispatch, the attempt, the
/// direction and the window. [`Attempt::order`] makes its `n`-th order.
#[derive(Clone, Copy, Debug)]
pub struct Attempt<'a> {
    /// The dispatch.
    pub dispatch_id: &'a DispatchId,
    /// 1 = first allocation, 2+ = fallback.
    pub attempt: u32,
    /// Charge or discharge.
    pub direction: OrderDirection,
    /// When to start.
    pub start: Timestamp,
    /// When to stop.
    pub until: Timestamp,
}

impl Attempt<'_> {
    /// Order number `n` of the attempt: `power_kw` for `vehicle_id`.
    pub fn order(&self, n: u32, vehicle_id: VehicleId, power_kw: f64) -> Order {
        Order {
            order_id: OrderId::new(self.dispatch_id, self.attempt, n),
            dispatch_id: self.dispatch_id.clone(),
            vehicle_id,
            direction: self.direction,
            power_kw,
            start: self.start,
            until: self.until,
            attempt: self.attempt,
        }
    }
}

/// Withdraws an order: the vehicle stops delivering it. Published on the vehicle's
/// `order` topic; a vehicle tells it from an [`Order`] by the `cancel` field.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct OrderCancel {
    /// The order withdrawn.
    pub order_id: OrderId,
    /// Its dispatch.
    pub dispatch_id: DispatchId,
    /// Its vehicle.
    pub vehicle_id: VehicleId,
    /// Always `true`.
    pub cancel: bool,
    /// Why (`no answer by the ACK deadline`, `replaced by signal s2`, `gateway shutdown`).
    pub reason: String,
    /// When it was withdrawn.
    pub at: Timestamp,
}

impl OrderCancel {
    /// The cancel of `order`.
    pub fn of(
        order_id: &OrderId,
        dispatch_id: &DispatchId,
        vehicle_id: &VehicleId,
        reason: impl Into<String>,
        at: Timestamp,
    ) -> Self {
        Self {
            order_id: order_id.clone(),
            dispatch_id: dispatch_id.clone(),
            vehicle_id: vehicle_id.clone(),
            cancel: true,
            reason: reason.into(),
            at,
        }
    }
}

/// A vehicle's answer to an order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AckStatus {
    /// It will deliver the ordered power.
    Accepted,
    /// It will not.
    Rejected,
}

/// An ACK, decoded and validated.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Ack {
    /// The order it answers.
    pub order_id: String,
    /// Accepted or rejected.
    pub status: AckStatus,
    /// Why, if the vehicle said.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// The allocation strategy that planned a dispatch.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StrategyKind {
    /// Equal shares up to each vehicle's capacity.
    Equal,
    /// The weighted heuristic.
    Smart,
    /// Linear programming.
    Lp,
    /// Per-segment strategies.
    Segmented,
}

impl StrategyKind {
    /// The contract's name: `equal`, `smart`, `lp` or `segmented`.
    pub fn name(self) -> &'static str {
        match self {
            StrategyKind::Equal => "equal",
            StrategyKind::Smart => "smart",
            StrategyKind::Lp => "lp",
            StrategyKind::Segmented => "segmented",
        }
    }
}

/// The fallback that reallocates a dispatch's residual.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FallbackKind {
    /// Never reallocate.
    Noop,
    /// Spread the residual over vehicles that ACKed, by capacity weighted by SoC.
    Balanced,
    /// Reallocate by availability probability and degradation.
    Probabilistic,
}

/// How many vehicles answered a dispatch, and how.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VehicleCounts {
    /// Orders accepted.
    pub accepted: u32,
    /// Orders rejected.
    pub rejected: u32,
    /// Orders not answered by their deadline.
    pub timed_out: u32,
}

/// The result of a settled dispatch, published on `dispatches/<id>`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DispatchOutcome {
    /// The dispatch.
    pub dispatch_id: DispatchId,
    /// The signal it served.
    pub signal_id: String,
    /// The signal's service.
    #[serde(rename = "type")]
    pub kind: SignalType,
    /// The signal's direction.
    pub direction: Direction,
    /// Power requested, kW.
    pub requested_kw: f64,
    /// Power ordered across all attempts, kW.
    pub allocated_kw: f64,
    /// Power accepted by vehicles, kW.
    pub acknowledged_kw: f64,
    /// `requested_kw - acknowledged_kw`, never negative.
    pub shortfall_kw: f64,
    /// The strategy of the first allocation.
    pub strategy: StrategyKind,
    /// The fallback configured for the residual.
    pub fallback: FallbackKind,
    /// Orders by answer (orders, not distinct vehicles: a vehicle asked twice counts twice).
    pub vehicles: VehicleCounts,
    /// When it settled.
    pub completed_at: crate::time::Timestamp,
    /// Why it ended early (replaced, gateway shutdown, interrupted by a stop), if it did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interrupted: Option<String>,
}

/// `kw` to the watt, and never a negative zero: how power figures go on the wire (an order
/// of `31.700000000000003` kW is `31.7`).
pub fn watts(kw: f64) -> f64 {
    (kw * 1_000.0).round() / 1_000.0 + 0.0
}

/// Serializes a kW figure to the watt ([`watts`]).
pub fn serialize_watts<S: serde::Serializer>(kw: &f64, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_f64(watts(*kw))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(soc: f64) -> Vehicle {
        Vehicle::new("v", soc, 60.0, 11.0)
    }

    #[test]
    fn capacity_is_the_rating_when_energy_is_plentiful() {
        // 0.8 -> 0.2 of 60 kWh = 36 kWh over 15 min = 144 kW of energy room; rating 11 kW.
        assert_eq!(ev(0.8).effective_capacity(Direction::Up, 0.0, 900.0), 11.0);
        assert_eq!(ev(0.5).effective_capacity(Direction::Down, 0.0, 900.0), 11.0);
    }

    #[test]
    fn empty_battery_cannot_discharge() {
        assert_eq!(ev(0.2).effective_capacity(Direction::Up, 0.0, 900.0), 0.0);
        assert_eq!(ev(0.1).effective_capacity(Direction::Up, 0.0, 900.0), 0.0);
        assert_eq!(ev(0.1).effective_capacity(Direction::Up, 0.0, 0.0), 0.0);
    }

    #[test]
    fn full_battery_cannot_charge() {
        let mut v = ev(0.9);
        v.max_soc = 0.9;
        assert_eq!(v.effective_capacity(Direction::Down, 0.0, 900.0), 0.0);
        assert_eq!(ev(1.0).effective_capacity(Direction::Down, 0.0, 900.0), 0.0);
        assert_eq!(ev(1.0).effective_capacity(Direction::Up, 0.0, 900.0), 11.0);
    }

    #[test]
    fn energy_limits_power_over_long_durations() {
        // 0.3 -> 0.2 of 60 kWh = 6 kWh over 2 h = 3 kW.
        let c = ev(0.3).effective_capacity(Direction::Up, 0.0, 7200.0);
        assert!((c - 3.0).abs() < 1e-9, "{c}");
    }

    #[test]
    fn zero_duration_is_limited_by_rating_only() {
        assert_eq!(ev(0.21).effective_capacity(Direction::Up, 0.0, 0.0), 11.0);
    }

    #[test]
    fn current_power_uses_up_the_rating() {
        assert_eq!(ev(0.8).effective_capacity(Direction::Up, 4.0, 900.0), 7.0);
        assert_eq!(ev(0.8).effective_capacity(Direction::Up, 11.0, 900.0), 0.0);
        assert_eq!(ev(0.8).effective_capacity(Direction::Up, 15.0, 900.0), 0.0);
    }

    #[test]
    fn current_power_draws_on_the_same_energy() {
        // 6 kWh over 2 h = 3 kW in all; 1 kW already given leaves 2 kW.
        let c = ev(0.3).effective_capacity(Direction::Up, 1.0, 7200.0);
        assert!((c - 2.0).abs() < 1e-9, "{c}");
    }

    #[test]
    fn availability_and_degradation_scale_the_result() {
        let mut v = ev(0.8);
        v.availability = 0.5;
        v.degradation = 0.2;
        let c = v.effective_capacity(Direction::Up, 0.0, 900.0);
        assert!((c - 11.0 * 0.5 * 0.8).abs() < 1e-9, "{c}");
    }

    #[test]
    fn signal_types_parse_by_name_or_code() {
        assert_eq!(SignalType::parse("FCR"), Some(SignalType::Fcr));
        assert_eq!(SignalType::parse("3"), Some(SignalType::Dr));
        assert_eq!(SignalType::from_code(4), Some(SignalType::Transfer));
        assert_eq!(SignalType::parse("5"), None);
        assert_eq!(SignalType::parse("ffr"), None);
    }
}
