//! The delivery guarantee: every strategy and fallback orders min(requested, the most the
//! free capacities and limits allow). Strategies choose which vehicles carry the power;
//! this module makes sure they never decide how much.
//!
//! - [`crate::allocation::lp::fill_to_max`] (beside the LP it solves): when a heuristic's fill falls short of the target under shared rows
//!   (greedy and proportional fills can block a row with the wrong vehicles, e.g. a phase
//!   filled by single-phase vehicles that three-phase ones could have shared), the LP is
//!   solved with the heuristic's own scores and its answer replaces the heuristic's when it
//!   delivers more. Without shared rows the heuristics already place min(target, sum of
//!   capacities), so nothing is solved.
//! - [`polish`]: amounts below [`MIN_ORDER_KW`] (which would be dropped, not ordered) are
//!   moved to vehicles with room, and power left a hair under a bound is topped up to it, so
//!   what is ordered is what was allocated.
//! - [`to_watts`]: orders are whole watts (an order of `31.700000000000003` kW is `31.7`),
//!   without exceeding a capacity, a row or the total placed.

use std::cmp::Ordering;

use crate::allocation::limits::{LimitSet, Room};
use crate::allocation::MIN_ORDER_KW;

/// A cheap upper bound on the most `caps` can place within `limits` and `target`: the
/// least of the target, the capacities, each row on its own (a fractional knapsack over the
/// row's coefficients, everyone else at capacity), the groups together (they are disjoint:
/// each vehicle is in at most one) and the phases together (a vehicle's phase coefficients add
/// up to 1). When a heuristic reaches it, it has placed the maximum and no LP is needed.
pub fn upper_bound(caps: &[f64], target: f64, limits: &LimitSet) -> f64 {
    let total: f64 = caps.iter().map(|c| c.max(0.0)).sum();
    let mut bound = target.max(0.0).min(total);
    if limits.rows.is_empty() {
        return bound;
    }
    let rows = limits.rows.len();
    // Per row: its members with their coefficients.
    let mut members: Vec<Vec<(f64, f64)>> = vec![Vec::new(); rows];
    let mut in_group = vec![false; caps.len()];
    for (i, m) in limits.members.iter().enumerate() {
        for &(r, coef) in m {
            members[r].push((coef, caps[i].max(0.0)));
            if limits.rows[r].name.starts_with("group/") {
                in_group[i] = true;
            }
        }
    }
    let (mut groups, mut phases, mut has_phases) = (0.0, 0.0, false);
    for (r, row) in limits.rows.iter().enumerate() {
        let m = &mut members[r];
        let inside: f64 = m.iter().map(|(_, c)| c).sum();
        m.sort_by(|a, b| a.0.partial_cmp(&b.0).unwrap_or(Ordering::Equal));
        let (mut room, mut placed) = (row.cap_kw.max(0.0), 0.0);
        for &(coef, cap) in m.iter() {
            let take = if coef > 0.0 { cap.min(room / coef) } else { cap };
            placed += take;
            room -= take * coef;
            if room <= 0.0 {
                break;
            }
        }
        bound = bound.min(total - inside + placed);
        if row.name.starts_with("group/") {
            groups += placed;
        } else if row.name.starts_with("phase/") {
            has_phases = true;
            phases += row.cap_kw.max(0.0);
        }
    }
    let ungrouped: f64 = caps.iter().zip(&in_group).filter(|(_, g)| !**g).map(|(c, _)| c.max(0.0)).sum();
    bound = bound.min(groups + ungrouped);
    if has_phases {
        bound = bound.min(phases);
    }
    bound
}

/// Moves amounts below the minimum order to candidates with room (best `scores` first) and
/// tops up toward `target` wherever the rows and capacities leave room, so every candidate
/// gets 0 or at least [`MIN_ORDER_KW`], none is left a hair under its bound, and nothing
/// exceeds a capacity, a row or the target.
pub fn polish(power: &mut [f64], caps: &[f64], target: f64, limits: &LimitSet, scores: &[f64]) {
    let n = power.len();
    for (p, c) in power.iter_mut().zip(caps) {
        *p = p.clamp(0.0, c.max(0.0));
    }
    // Crumbs go back into the pool.
    for p in power.iter_mut() {
        if *p < MIN_ORDER_KW {
            *p = 0.0;
        }
    }
    let total: f64 = power.iter().sum();
    let mut left = target - total;
    if left <= 1e-12 {
        return;
    }
    let mut room = Room::new(limits);
    for (i, p) in power.iter().enumerate() {
        room.take(i, *p);
    }
    let mut order: Vec<usize> = (0..n).filter(|&i| caps[i] - power[i] > 1e-12).collect();
    let score = |i: usize| scores.get(i).copied().unwrap_or(0.0);
    // Vehicles already ordered first (topping them up adds no order), then by score (the
    // index breaks ties, so the order is total and an unstable sort is deterministic).
    order.sort_unstable_by(|&a, &b| {
        (power[b] > 0.0).cmp(&(power[a] > 0.0)).then(score(b).total_cmp(&score(a))).then(a.cmp(&b))
    });
    for i in order {
        let give = room.allow(i, (caps[i] - power[i]).min(left)).max(0.0);
        if give <= 0.0 || (power[i] == 0.0 && give < MIN_ORDER_KW) {
            continue;
        }
        power[i] += give;
        room.take(i, give);
        left -= give;
        if left <= 1e-12 {
            break;
        }
    }
}

/// The smallest step of power an order carries, kW: one watt.
pub const WATT_KW: f64 = 0.001;

/// Makes every amount of `power` a whole number of watts without exceeding its capacity,
/// a row of `limits` or the total placed: each is floored to the watt (amounts below the
/// minimum order become 0), then the watts the floors took from the total ordered (itself
/// floored to the watt) go back, one each, to the ordered amounts that lost the most
/// (ties by index) where the capacity and every row they load leave a watt. What it
/// returns is what no amount could take back (0 unless rows bind).
pub fn to_watts(power: &mut [f64], caps: &[f64], limits: &LimitSet) -> f64 {
    // A hair above a whole watt is that watt (float noise of sums and solvers).
    const NOISE: f64 = 1e-6;
    let ordered = power.iter().filter(|p| **p >= MIN_ORDER_KW).sum::<f64>();
    let total = (ordered * 1_000.0 + NOISE).floor();
    let mut lost = Vec::with_capacity(power.len());
    let mut placed = 0.0;
    for (i, p) in power.iter_mut().enumerate() {
        let w = if *p < MIN_ORDER_KW { 0.0 } else { (*p * 1_000.0 + NOISE).floor() };
        if w > 0.0 {
            lost.push((*p * 1_000.0 - w, i));
        }
        *p = w / 1_000.0;
        placed += w;
    }
    let mut missing = total - placed;
    if missing < 1.0 {
        return 0.0;
    }
    // Rows over these amounts (none when the set is not theirs, as a fallback's before the
    // engine fills it in).
    let none;
    let limits = if limits.members.len() == power.len() {
        limits
    } else {
        none = LimitSet::none(power.len());
        &none
    };
    let mut room = Room::new(limits);
    for (i, p) in power.iter().enumerate() {
        room.take(i, *p);
    }
    lost.sort_unstable_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
    for (_, i) in lost {
        if missing < 1.0 {
            break;
        }
        let more = power[i] + WATT_KW;
        let fits_cap = caps.get(i).is_none_or(|c| more <= c + 1e-9);
        if fits_cap && room.allow(i, WATT_KW) >= WATT_KW - 1e-12 {
            power[i] = ((power[i] * 1_000.0).round() + 1.0) / 1_000.0;
            room.take(i, WATT_KW);
            missing -= 1.0;
        }
    }
    missing.max(0.0) / 1_000.0
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::allocation::limits::Limits;
    use crate::allocation::lp::LpDispatcher;
    use crate::allocation::{Candidate, SmartDispatcher};
    use crate::model::{Direction, Phase, Vehicle, Wiring};

    fn rows(fleet: &[Vehicle], limits: &Limits) -> (Vec<f64>, LimitSet) {
        let cands: Vec<Candidate> = fleet
            .iter()
            .map(|v| Candidate { vehicle: v, capacity_kw: v.max_discharge_kw, participation: 0.0 })
            .collect();
        (fleet.iter().map(|v| v.max_discharge_kw).collect(), LimitSet::new(limits, Direction::Up, &cands))
    }

    #[test]
    fn orders_become_whole_watts_without_exceeding_a_cap_a_row_or_the_total() {
        let fleet: Vec<Vehicle> = (0..3).map(|i| Vehicle::new(format!("v{i}"), 0.9, 60.0, 100.0)).collect();
        let (caps, none) = rows(&fleet, &Limits::default());
        // 139 kW over three: the floors leave 138.999; the watt goes back to one of them.
        let mut p = vec![139.0 / 3.0; 3];
        assert_eq!(to_watts(&mut p, &caps, &none), 0.0);
        assert_eq!(p, [46.334, 46.333, 46.333]);
        assert_eq!(serde_json::to_string(&p).unwrap(), "[46.334,46.333,46.333]");
        // Float noise is not a watt: 31.700000000000003 is 31.7; below the minimum is 0.
        let mut p = vec![31.700_000_000_000_003, 0.004, 20.0 - 1e-12];
        to_watts(&mut p, &caps, &none);
        assert_eq!(p, [31.7, 0.0, 20.0]);
        // A total that is not whole watts is floored: never more than was placed.
        let mut p = vec![10.000_4, 10.000_4];
        to_watts(&mut p, &caps, &none);
        assert_eq!(p, [10.0, 10.0]);
        // A binding row: the watt cannot go back where the row has no room for it.
        let limits = Limits { export_kw: Some(100.0), ..Limits::default() };
        let (caps, site) = rows(&fleet, &limits);
        let mut p = vec![100.0 / 3.0; 3];
        let kept = to_watts(&mut p, &caps, &site);
        assert!(p.iter().sum::<f64>() <= 100.0 + 1e-9 && kept <= 0.001 + 1e-12, "{p:?}");
        assert!(p.iter().all(|x| ((x * 1_000.0).round() / 1_000.0 - x).abs() < 1e-12));
        // Capacities hold.
        let mut p = vec![7.000_9, 7.000_9];
        to_watts(&mut p, &[7.000_9, 7.000_9], &LimitSet::none(2));
        assert!(p.iter().all(|x| *x <= 7.000_9), "{p:?}");
    }

    #[test]
    fn crumbs_move_to_vehicles_with_room_and_bounds_are_met() {
        let fleet: Vec<Vehicle> = (0..3).map(|i| Vehicle::new(format!("v{i}"), 0.9, 60.0, 10.0)).collect();
        let (caps, limits) = rows(&fleet, &Limits::default());
        let mut p = vec![9.999_999_9, 0.004, 5.0];
        polish(&mut p, &caps, 15.003_999_9, &limits, &[0.5, 0.9, 0.1]);
        assert_eq!(p[1], 0.0, "the crumb is gone");
        assert!((p.iter().sum::<f64>() - 15.003_999_9).abs() < 1e-9, "{p:?}");
        assert!((p[0] - 10.0).abs() < 1e-9, "topped up to its bound: {p:?}");
    }

    #[test]
    fn the_upper_bound_is_never_below_the_lp_maximum_and_tight_for_disjoint_groups() {
        let fleet: Vec<Vehicle> = (0..12)
            .map(|i| {
                let mut v = Vehicle::new(format!("v{i}"), 0.9, 60.0, 10.0);
                v.group = Some(format!("g{}", i % 3));
                if i % 4 == 0 {
                    v.wiring = Wiring::SinglePhase(Phase::L2);
                }
                v
            })
            .collect();
        let limits = Limits {
            export_kw: Some(100.0),
            groups: [("g0".to_owned(), 15.0), ("g1".to_owned(), 25.0)].into(),
            phase_kw: Some(30.0),
            ..Limits::default()
        };
        let (caps, set) = rows(&fleet, &limits);
        let mut lp = LpDispatcher::new(SmartDispatcher::default(), Default::default());
        let (p, _) = lp.solve_for(1_000.0, &caps, &set, &vec![0.0; caps.len()]).unwrap();
        let max: f64 = p.iter().sum();
        let ub = upper_bound(&caps, 1_000.0, &set);
        assert!(ub >= max - 1e-6, "bound {ub} below the maximum {max}");
        let groups_only = Limits { groups: limits.groups.clone(), ..Limits::default() };
        let (caps, set) = rows(&fleet, &groups_only);
        assert!((upper_bound(&caps, 1_000.0, &set) - (15.0 + 25.0 + 40.0)).abs() < 1e-9);
    }

    #[test]
    fn a_phase_blocked_by_single_phase_vehicles_is_repaired_to_the_maximum() {
        // Six cheap single-phase vehicles on L1, ten three-phase 11 kW vehicles, 20 kW per
        // phase: 60 kW is deliverable only through the three-phase vehicles.
        let mut fleet: Vec<Vehicle> = (0..6)
            .map(|i| {
                let mut v = Vehicle::new(format!("s{i}"), 0.9, 60.0, 7.0);
                v.wiring = Wiring::SinglePhase(Phase::L1);
                v
            })
            .collect();
        fleet.extend((0..10).map(|i| Vehicle::new(format!("t{i}"), 0.9, 60.0, 11.0)));
        let limits = Limits { phase_kw: Some(20.0), ..Limits::default() };
        let (caps, set) = rows(&fleet, &limits);
        // What a greedy fill that prefers the single-phase vehicles does: L1 is full at 20 kW.
        let scores: Vec<f64> = (0..16).map(|i| if i < 6 { 1.0 } else { 0.5 }).collect();
        let mut p = crate::allocation::greedy_fill(&scores, &caps, 60.0, &set);
        assert!(p.iter().sum::<f64>() < 21.0);
        let mut lp = LpDispatcher::new(SmartDispatcher::default(), Default::default());
        let r = crate::allocation::lp::fill_to_max(&mut lp, &mut p, &caps, 60.0, &set, &scores).expect("a repair");
        assert!((r.after_kw - 60.0).abs() < 1e-6, "{r:?}");
        assert!(set.violations(&p, 1e-9).is_empty());
    }
}
