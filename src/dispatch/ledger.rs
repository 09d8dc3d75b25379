//! The commitment ledger: the power the gateway has ordered and not yet released.
//!
//! Every order that is outstanding (sent, not answered) or accepted commits its power on
//! its vehicle and on every limit row it loads (site, feeder group, phase) for its window
//! `[start, until)`. A rejection, a cancel (deadline, replacement, shutdown), the vehicle
//! leaving, or the end of the window releases it. The planner plans every new signal
//! against what is left, so overlapping dispatches together never exceed a vehicle's rating
//! or a shared limit.
//!
//! Directions: a vehicle committed in one direction over part of a window is not ordered
//! in the other direction over that window (it is excluded with
//! [`crate::allocation::filter::Exclusion::CommittedOtherWay`]); power in opposite directions is never
//! netted. A vehicle's commitments in one direction over a window are summed as if they
//! all overlapped (a safe upper bound when they only partly do).
//!
//! Kept in `BTreeMap`s so that everything derived from it is deterministic.

use std::collections::BTreeMap;

use crate::allocation::limits::LimitSet;
use crate::model::{Direction, DispatchId, Order, OrderDirection, OrderId, Phase, Vehicle, VehicleId, Wiring};
use crate::time::Timestamp;

/// One order's claim on its vehicle and on the shared rows.
#[derive(Clone, Debug, PartialEq)]
pub struct Commitment {
    /// The order.
    pub order_id: OrderId,
    /// Its dispatch.
    pub dispatch_id: DispatchId,
    /// Its vehicle.
    pub vehicle_id: VehicleId,
    /// The signal direction it serves.
    pub direction: Direction,
    /// Power, kW.
    pub power_kw: f64,
    /// Start of its window.
    pub start: Timestamp,
    /// End of its window (exclusive).
    pub until: Timestamp,
    /// Whether the vehicle accepted it (else it is still outstanding).
    pub accepted: bool,
}

impl Commitment {
    /// The commitment an order makes when it is sent.
    pub fn of(order: &Order) -> Self {
        Self {
            order_id: order.order_id.clone(),
            dispatch_id: order.dispatch_id.clone(),
            vehicle_id: order.vehicle_id.clone(),
            direction: match order.direction {
                OrderDirection::Discharge => Direction::Up,
                OrderDirection::Charge => Direction::Down,
            },
            power_kw: order.power_kw,
            start: order.start,
            until: order.until,
            accepted: false,
        }
    }

    fn overlaps(&self, from: Timestamp, to: Timestamp) -> bool {
        self.start < to && from < self.until
    }
}

/// The commitments in force, by vehicle.
#[derive(Clone, Debug, Default)]
pub struct Ledger {
    by_vehicle: BTreeMap<VehicleId, Vec<Commitment>>,
    vehicle_of: BTreeMap<OrderId, VehicleId>,
    per_dispatch: BTreeMap<DispatchId, usize>,
}

impl Ledger {
    /// An empty ledger.
    pub fn new() -> Self {
        Self::default()
    }

    /// Commitments in force.
    pub fn len(&self) -> usize {
        self.vehicle_of.len()
    }

    /// Whether nothing is committed.
    pub fn is_empty(&self) -> bool {
        self.vehicle_of.is_empty()
    }

    /// Records `c` (an order being sent, or one restored from the log). An order id already
    /// committed is replaced.
    pub fn commit(&mut self, c: Commitment) {
        self.release(&c.order_id);
        self.vehicle_of.insert(c.order_id.clone(), c.vehicle_id.clone());
        *self.per_dispatch.entry(c.dispatch_id.clone()).or_default() += 1;
        // Kept in order-id order, whatever order they were committed and released in: sums
        // over a vehicle's commitments then add in one order, so the ledger the log rebuilds
        // gives the very same free capacity to the last bit (the auditor compares plans).
        let list = self.by_vehicle.entry(c.vehicle_id.clone()).or_default();
        let at = list.partition_point(|x| x.order_id < c.order_id);
        list.insert(at, c);
    }

    /// Marks an order accepted; false when it is not committed (any more).
    pub fn accept(&mut self, order_id: &str) -> bool {
        let Some(v) = self.vehicle_of.get(order_id) else { return false };
        let Some(c) = self.by_vehicle.get_mut(v).and_then(|cs| cs.iter_mut().find(|c| c.order_id == order_id)) else {
            return false;
        };
        c.accepted = true;
        true
    }

    /// Releases one order's commitment.
    pub fn release(&mut self, order_id: &str) -> Option<Commitment> {
        let v = self.vehicle_of.remove(order_id)?;
        let list = self.by_vehicle.get_mut(&v)?;
        let i = list.iter().position(|c| c.order_id == order_id)?;
        let c = list.remove(i);
        if list.is_empty() {
            self.by_vehicle.remove(&v);
        }
        uncount(&mut self.per_dispatch, &c.dispatch_id);
        Some(c)
    }

    /// Releases everything committed on a vehicle (it left).
    pub fn release_vehicle(&mut self, id: &VehicleId) -> Vec<Commitment> {
        let released = self.by_vehicle.remove(id).unwrap_or_default();
        for c in &released {
            self.vehicle_of.remove(&c.order_id);
            uncount(&mut self.per_dispatch, &c.dispatch_id);
        }
        released
    }

    /// Drops the commitments whose window has ended by `now`; returns how many.
    pub fn expire(&mut self, now: Timestamp) -> usize {
        let mut ended = 0;
        let (vehicle_of, per_dispatch) = (&mut self.vehicle_of, &mut self.per_dispatch);
        self.by_vehicle.retain(|_, list| {
            list.retain(|c| {
                let keep = c.until > now;
                if !keep {
                    vehicle_of.remove(&c.order_id);
                    uncount(per_dispatch, &c.dispatch_id);
                    ended += 1;
                }
                keep
            });
            !list.is_empty()
        });
        ended
    }

    /// The commitments in force, by vehicle id then order of commitment.
    pub fn iter(&self) -> impl Iterator<Item = &Commitment> {
        self.by_vehicle.values().flatten()
    }

    /// The order ids committed by one dispatch, sorted.
    pub fn orders_of(&self, dispatch_id: &str) -> Vec<OrderId> {
        let mut ids: Vec<OrderId> =
            self.iter().filter(|c| c.dispatch_id == dispatch_id).map(|c| c.order_id.clone()).collect();
        ids.sort();
        ids
    }

    /// Whether a dispatch still has anything committed.
    pub fn has_dispatch(&self, dispatch_id: &str) -> bool {
        self.per_dispatch.contains_key(dispatch_id)
    }

    /// One committed order.
    pub fn get(&self, order_id: &str) -> Option<&Commitment> {
        let v = self.vehicle_of.get(order_id)?;
        self.by_vehicle.get(v)?.iter().find(|c| c.order_id == order_id)
    }

    /// Power committed on `id` in `direction` over any part of `[from, to)`, kW.
    pub fn committed_kw(&self, id: &VehicleId, direction: Direction, from: Timestamp, to: Timestamp) -> f64 {
        self.by_vehicle.get(id).map_or(0.0, |cs| {
            cs.iter().filter(|c| c.direction == direction && c.overlaps(from, to)).map(|c| c.power_kw).sum()
        })
    }

    /// Energy that `id`'s commitments in `direction` still draw from its battery after
    /// `now` (each from `now` or its start, to its end), kWh. A new order must leave them
    /// theirs: power committed over different windows still empties one battery.
    pub fn committed_kwh(&self, id: &VehicleId, direction: Direction, now: Timestamp) -> f64 {
        self.by_vehicle.get(id).map_or(0.0, |cs| {
            cs.iter()
                .filter(|c| c.direction == direction)
                .map(|c| {
                    let from = c.start.as_millis().max(now.as_millis());
                    c.power_kw * (c.until.as_millis() - from).max(0) as f64 / 3_600_000.0
                })
                .sum()
        })
    }

    /// Whether `id` is committed against `direction` over any part of `[from, to)`.
    pub fn committed_other_way(&self, id: &VehicleId, direction: Direction, from: Timestamp, to: Timestamp) -> bool {
        self.by_vehicle.get(id).is_some_and(|cs| cs.iter().any(|c| c.direction != direction && c.overlaps(from, to)))
    }

    /// Takes the load of the commitments in `direction` over `[from, to)` off the rows of
    /// `set` (never below 0). A row's load follows the vehicle's state in `fleet` (its group
    /// and wiring); a vehicle not in `fleet` loads the site row and every phase row in full,
    /// which is never less than it really does.
    pub fn reduce(
        &self,
        set: &mut LimitSet,
        fleet: &BTreeMap<VehicleId, Vehicle>,
        direction: Direction,
        from: Timestamp,
        to: Timestamp,
    ) {
        if set.rows.is_empty() {
            return;
        }
        let mut site = None;
        let mut phases = [None; 3];
        let mut groups: BTreeMap<&str, usize> = BTreeMap::new();
        for (i, row) in set.rows.iter().enumerate() {
            match row.name.as_str() {
                "site" => site = Some(i),
                "phase/L1" => phases[0] = Some(i),
                "phase/L2" => phases[1] = Some(i),
                "phase/L3" => phases[2] = Some(i),
                name => {
                    if let Some(g) = name.strip_prefix("group/") {
                        groups.insert(g, i);
                    }
                }
            }
        }
        let mut load = vec![0.0; set.rows.len()];
        for c in self.iter().filter(|c| c.direction == direction && c.overlaps(from, to)) {
            let kw = c.power_kw;
            if let Some(r) = site {
                load[r] += kw;
            }
            let vehicle = fleet.get(&c.vehicle_id);
            if let Some(r) = vehicle.and_then(|v| v.group.as_deref()).and_then(|g| groups.get(g)) {
                load[*r] += kw;
            }
            match vehicle.map(|v| v.wiring) {
                Some(Wiring::ThreePhase) => phases.iter().flatten().for_each(|r| load[*r] += kw / 3.0),
                Some(Wiring::SinglePhase(p)) => {
                    let k = match p {
                        Phase::L1 => 0,
                        Phase::L2 => 1,
                        Phase::L3 => 2,
                    };
                    if let Some(r) = phases[k] {
                        load[r] += kw;
                    }
                }
                None => phases.iter().flatten().for_each(|r| load[*r] += kw),
            }
        }
        for (row, used) in set.rows.iter_mut().zip(load) {
            row.cap_kw = (row.cap_kw - used).max(0.0);
        }
    }
}

fn uncount(per_dispatch: &mut BTreeMap<DispatchId, usize>, dispatch_id: &str) {
    if let Some(n) = per_dispatch.get_mut(dispatch_id) {
        *n -= 1;
        if *n == 0 {
            per_dispatch.remove(dispatch_id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::allocation::limits::Limits;
    use crate::allocation::Candidate;

    const T0: Timestamp = Timestamp::from_millis(1_795_000_000_000);

    fn order(id: &str, vehicle: &str, kw: f64, from_s: i64, to_s: i64, direction: OrderDirection) -> Order {
        Order {
            order_id: id.into(),
            dispatch_id: DispatchId::from(format!("d-{id}").as_str()),
            vehicle_id: vehicle.into(),
            direction,
            power_kw: kw,
            start: T0.plus_millis(from_s * 1000),
            until: T0.plus_millis(to_s * 1000),
            attempt: 1,
        }
    }

    #[test]
    fn commitments_count_over_overlapping_windows_only() {
        let mut l = Ledger::new();
        l.commit(Commitment::of(&order("a", "v1", 5.0, 0, 900, OrderDirection::Discharge)));
        l.commit(Commitment::of(&order("b", "v1", 3.0, 900, 1800, OrderDirection::Discharge)));
        let v1 = VehicleId::from("v1");
        let at = |s: i64| T0.plus_millis(s * 1000);
        assert_eq!(l.committed_kw(&v1, Direction::Up, at(0), at(900)), 5.0, "b starts when a's window ends");
        assert_eq!(l.committed_kw(&v1, Direction::Up, at(600), at(1200)), 8.0);
        assert_eq!(l.committed_kw(&v1, Direction::Down, at(0), at(900)), 0.0);
        assert!(l.committed_other_way(&v1, Direction::Down, at(0), at(60)));
        assert!(!l.committed_other_way(&v1, Direction::Down, at(1800), at(1900)));
        assert_eq!(l.expire(at(900)), 1);
        assert_eq!(l.len(), 1);
        assert!(l.release("b").is_some());
        assert!(l.is_empty() && l.release("b").is_none());
    }

    #[test]
    fn rows_lose_the_committed_load() {
        let mut a = Vehicle::new("a", 0.5, 60.0, 11.0);
        a.group = Some("f1".into());
        let mut b = Vehicle::new("b", 0.5, 60.0, 11.0);
        b.wiring = Wiring::SinglePhase(Phase::L2);
        let fleet: BTreeMap<VehicleId, Vehicle> = [(a.id.clone(), a.clone()), (b.id.clone(), b.clone())].into();
        let limits = Limits {
            export_kw: Some(100.0),
            import_kw: None,
            groups: BTreeMap::from([("f1".to_owned(), 20.0)]),
            phase_kw: Some(30.0),
        };
        let cands: Vec<Candidate> =
            [&a, &b].iter().map(|v| Candidate { vehicle: v, capacity_kw: 11.0, participation: 0.0 }).collect();
        let mut set = LimitSet::new(&limits, Direction::Up, &cands);
        let mut l = Ledger::new();
        l.commit(Commitment::of(&order("o1", "a", 6.0, 0, 900, OrderDirection::Discharge)));
        l.commit(Commitment::of(&order("o2", "b", 9.0, 0, 900, OrderDirection::Discharge)));
        l.commit(Commitment::of(&order("o3", "gone", 1.0, 0, 900, OrderDirection::Discharge)));
        l.commit(Commitment::of(&order("o4", "a", 50.0, 0, 900, OrderDirection::Charge)));
        l.reduce(&mut set, &fleet, Direction::Up, T0, T0.plus_millis(900_000));
        let caps: Vec<(&str, f64)> = set.rows.iter().map(|r| (r.name.as_str(), r.cap_kw)).collect();
        assert_eq!(
            caps,
            [("site", 84.0), ("group/f1", 14.0), ("phase/L1", 27.0), ("phase/L2", 18.0), ("phase/L3", 27.0)],
            "a: 2 kW per phase; b: 9 kW on L2; the unknown vehicle 1 kW on every phase; charging does not count"
        );
    }

    #[test]
    fn a_vehicle_leaving_releases_its_commitments() {
        let mut l = Ledger::new();
        l.commit(Commitment::of(&order("a", "v1", 5.0, 0, 900, OrderDirection::Discharge)));
        l.commit(Commitment::of(&order("b", "v2", 5.0, 0, 900, OrderDirection::Discharge)));
        assert!(l.accept("a") && !l.accept("zzz"));
        let gone = l.release_vehicle(&VehicleId::from("v1"));
        assert_eq!(gone.len(), 1);
        assert!(gone[0].accepted);
        assert_eq!(l.orders_of("d-b"), ["b"]);
        assert!(!l.has_dispatch("d-a"));
    }
}
