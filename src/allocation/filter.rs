//! Which vehicles may take part in a dispatch.

use serde::{Deserialize, Serialize};

use crate::model::{Direction, Signal, Vehicle};

/// Why a vehicle was left out of a dispatch (recorded in `ConstraintApplied`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Exclusion {
    /// Not connected to a charger.
    NotPluggedIn,
    /// At or beyond its SoC bound in the signal's direction.
    SocAtBound,
    /// Leaves before the signal ends.
    LeavesBeforeEnd,
    /// States an availability of 0.
    Unavailable,
    /// Has no effective capacity left for this signal.
    NoCapacity,
    /// Is committed in the other direction over part of the signal's window.
    CommittedOtherWay,
}

/// Decides whether a vehicle may be ordered for a signal.
pub trait VehicleFilter: Send {
    /// `Ok` when `vehicle` may take part in `signal`, else why not.
    fn check(&self, vehicle: &Vehicle, signal: &Signal) -> Result<(), Exclusion>;
}

/// Plugged in, SoC inside its bound in the signal's direction, not leaving before the
/// signal ends, and not stating itself unavailable.
#[derive(Clone, Copy, Debug, Default)]
pub struct SimpleVehicleFilter;

impl VehicleFilter for SimpleVehicleFilter {
    fn check(&self, v: &Vehicle, signal: &Signal) -> Result<(), Exclusion> {
        if !v.plugged_in {
            return Err(Exclusion::NotPluggedIn);
        }
        let inside = match signal.direction {
            Direction::Up => v.soc > v.min_soc,
            Direction::Down => v.soc < v.max_soc,
        };
        if !inside {
            return Err(Exclusion::SocAtBound);
        }
        if v.departure.is_some_and(|d| d < signal.end()) {
            return Err(Exclusion::LeavesBeforeEnd);
        }
        if v.availability <= 0.0 {
            return Err(Exclusion::Unavailable);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::SignalType;
    use crate::time::Timestamp;

    fn signal(direction: Direction) -> Signal {
        Signal::new("s", SignalType::Afrr, direction, 10.0, Timestamp::from_millis(0))
    }

    #[test]
    fn plugged_in_vehicles_inside_their_bounds_pass() {
        let v = Vehicle::new("a", 0.5, 60.0, 11.0);
        assert_eq!(SimpleVehicleFilter.check(&v, &signal(Direction::Up)), Ok(()));
        assert_eq!(SimpleVehicleFilter.check(&v, &signal(Direction::Down)), Ok(()));
    }

    #[test]
    fn exclusions_say_why() {
        let f = SimpleVehicleFilter;
        let mut v = Vehicle::new("a", 0.2, 60.0, 11.0);
        assert_eq!(f.check(&v, &signal(Direction::Up)), Err(Exclusion::SocAtBound));
        assert_eq!(f.check(&v, &signal(Direction::Down)), Ok(()));
        v.soc = 1.0;
        assert_eq!(f.check(&v, &signal(Direction::Down)), Err(Exclusion::SocAtBound));
        v.departure = Some(Timestamp::from_millis(899_999));
        assert_eq!(f.check(&v, &signal(Direction::Up)), Err(Exclusion::LeavesBeforeEnd));
        v.departure = Some(Timestamp::from_millis(900_000));
        assert_eq!(f.check(&v, &signal(Direction::Up)), Ok(()));
        v.availability = 0.0;
        assert_eq!(f.check(&v, &signal(Direction::Up)), Err(Exclusion::Unavailable));
        v.plugged_in = false;
        assert_eq!(f.check(&v, &signal(Direction::Up)), Err(Exclusion::NotPluggedIn));
    }
}
