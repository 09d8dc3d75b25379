//! Shared limits: the site's grid connection, feeder/charger groups and phases.
//!
//! A [`LimitSet`] turns the configured [`Limits`] into linear rows over a request's
//! candidates: each row has a capacity (kW) and, per candidate, the share of its power that
//! counts against it: 1 for the site limit (export for `up`, import for `down`), 1 for the
//! vehicle's group, and for phases 1/3 on each phase for a three-phase vehicle or 1 on its
//! phase for a single-phase one. Every strategy respects the same rows: the LP as
//! constraints, the heuristics through [`Room`], which clips each allocation step.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::allocation::Candidate;
use crate::model::{Direction, Phase, Wiring};

/// The site's limits, kW (`None` = unlimited): the config's `dispatch.limits`, validated.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Limits {
    /// Export (up) limit.
    pub export_kw: Option<f64>,
    /// Import (down) limit.
    pub import_kw: Option<f64>,
    /// Group limits.
    pub groups: BTreeMap<String, f64>,
    /// Per-phase limit.
    pub phase_kw: Option<f64>,
}

impl Limits {
    /// Whether any limit is set.
    pub fn is_empty(&self) -> bool {
        self.export_kw.is_none() && self.import_kw.is_none() && self.groups.is_empty() && self.phase_kw.is_none()
    }
}

/// One shared limit.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LimitRow {
    /// `site`, `group/<name>` or `phase/L1`..
    pub name: String,
    /// Capacity, kW.
    pub cap_kw: f64,
}

/// The limits that apply to one request's candidates.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct LimitSet {
    /// The rows.
    pub rows: Vec<LimitRow>,
    /// Per candidate, the rows it counts against and with which coefficient.
    pub members: Vec<Vec<(usize, f64)>>,
}

impl LimitSet {
    /// No limits for `n` candidates.
    pub fn none(n: usize) -> Self {
        Self { rows: Vec::new(), members: vec![Vec::new(); n] }
    }

    /// The rows of `limits` in `direction` over `candidates`. Groups nobody belongs to are
    /// left out; a vehicle whose group has no configured limit counts only against the
    /// site and phase rows.
    pub fn new(limits: &Limits, direction: Direction, candidates: &[Candidate<'_>]) -> Self {
        let mut set = LimitSet::none(candidates.len());
        let site = match direction {
            Direction::Up => limits.export_kw,
            Direction::Down => limits.import_kw,
        };
        if let Some(cap_kw) = site {
            set.rows.push(LimitRow { name: "site".into(), cap_kw });
            for m in &mut set.members {
                m.push((0, 1.0));
            }
        }
        let mut group_rows: Vec<(&str, usize)> = Vec::new();
        for (i, c) in candidates.iter().enumerate() {
            let Some(group) = c.vehicle.group.as_deref() else { continue };
            let Some(cap_kw) = limits.groups.get(group) else { continue };
            let row = match group_rows.iter().find(|(g, _)| *g == group) {
                Some((_, r)) => *r,
                None => {
                    set.rows.push(LimitRow { name: format!("group/{group}"), cap_kw: *cap_kw });
                    group_rows.push((group, set.rows.len() - 1));
                    set.rows.len() - 1
                }
            };
            set.members[i].push((row, 1.0));
        }
        if let Some(cap_kw) = limits.phase_kw {
            let first = set.rows.len();
            for p in ["L1", "L2", "L3"] {
                set.rows.push(LimitRow { name: format!("phase/{p}"), cap_kw });
            }
            for (i, c) in candidates.iter().enumerate() {
                match c.vehicle.wiring {
                    Wiring::ThreePhase => set.members[i].extend((0..3).map(|k| (first + k, 1.0 / 3.0))),
                    Wiring::SinglePhase(p) => {
                        let k = match p {
                            Phase::L1 => 0,
                            Phase::L2 => 1,
                            Phase::L3 => 2,
                        };
                        set.members[i].push((first + k, 1.0));
                    }
                }
            }
        }
        set
    }

    /// Whether there is no row at all.
    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    /// Load of each row under `power_kw`.
    pub fn loads(&self, power_kw: &[f64]) -> Vec<f64> {
        let mut load = vec![0.0; self.rows.len()];
        for (members, p) in self.members.iter().zip(power_kw) {
            for (r, coef) in members {
                load[*r] += coef * p;
            }
        }
        load
    }

    /// Rows whose load under `power_kw` exceeds the capacity by more than `tol` kW.
    pub fn violations(&self, power_kw: &[f64], tol: f64) -> Vec<(String, f64, f64)> {
        self.loads(power_kw)
            .into_iter()
            .zip(&self.rows)
            .filter(|(load, row)| *load > row.cap_kw + tol)
            .map(|(load, row)| (row.name.clone(), load, row.cap_kw))
            .collect()
    }
}

/// Remaining room of each row while a heuristic allocates.
#[derive(Clone, Debug)]
pub struct Room<'a> {
    set: &'a LimitSet,
    left: Vec<f64>,
}

impl<'a> Room<'a> {
    /// Full room.
    pub fn new(set: &'a LimitSet) -> Self {
        Self { set, left: set.rows.iter().map(|r| r.cap_kw).collect() }
    }

    /// The most candidate `i` may still be given, kW, up to `want`.
    pub fn allow(&self, i: usize, want: f64) -> f64 {
        self.set.members[i].iter().fold(want, |m, (r, coef)| m.min((self.left[*r] / coef).max(0.0)))
    }

    /// Records `kw` given to candidate `i`.
    pub fn take(&mut self, i: usize, kw: f64) {
        for (r, coef) in &self.set.members[i] {
            self.left[*r] -= coef * kw;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Vehicle;
    use std::collections::BTreeMap;

    #[test]
    fn rows_follow_direction_groups_and_wiring() {
        let mut a = Vehicle::new("a", 0.5, 60.0, 11.0);
        a.group = Some("f1".into());
        let mut b = Vehicle::new("b", 0.5, 60.0, 7.0);
        b.wiring = Wiring::SinglePhase(Phase::L2);
        b.group = Some("unlimited".into());
        let cands: Vec<Candidate> =
            [&a, &b].iter().map(|v| Candidate { vehicle: v, capacity_kw: 5.0, participation: 0.0 }).collect();
        let limits = Limits {
            export_kw: Some(100.0),
            import_kw: None,
            groups: BTreeMap::from([("f1".to_owned(), 8.0)]),
            phase_kw: Some(4.0),
        };
        let up = LimitSet::new(&limits, Direction::Up, &cands);
        let names: Vec<&str> = up.rows.iter().map(|r| r.name.as_str()).collect();
        assert_eq!(names, ["site", "group/f1", "phase/L1", "phase/L2", "phase/L3"]);
        assert_eq!(up.loads(&[3.0, 2.0]), vec![5.0, 3.0, 1.0, 3.0, 1.0]);
        assert_eq!(up.violations(&[3.0, 3.5], 1e-9), vec![("phase/L2".to_owned(), 4.5, 4.0)]);
        let down = LimitSet::new(&limits, Direction::Down, &cands);
        assert_eq!(down.rows[0].name, "group/f1", "no import limit configured");

        let mut room = Room::new(&up);
        assert_eq!(room.allow(1, 10.0), 4.0, "single phase L2 is bound by its phase");
        room.take(1, 4.0);
        assert!((room.allow(0, 10.0) - 0.0).abs() < 1e-12, "L2 is full, so a three-phase vehicle has no room");
    }
}
