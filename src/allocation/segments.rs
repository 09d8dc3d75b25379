//! Per-segment strategies: `dispatch.segments.<name>` gives a fleet segment its own Smart
//! weights and its own strategy (`heuristic` = Smart, `lp` = the LP over those weights).
//!
//! How the target is split: vehicles are grouped by segment (a missing or unconfigured
//! segment joins the default group, which uses the default Smart weights of the signal
//! type). Each group's share of the target is proportional to the effective capacity it
//! has for this signal. Groups are then served in order (configured segments by name, the
//! default group last), each within the room the shared site, feeder and phase limits have
//! left after the groups before it. Whatever a group could not place (its share exceeded
//! what its limits allowed) is offered, in a second pass and in the same order, to the
//! groups that still have capacity, so the split never costs delivery the fleet could give.
//!
//! `fallback: true` is applied by the engine: only vehicles of such segments (and of the
//! default group) are asked again in the fallback round; the others are never asked twice.

use std::collections::BTreeMap;

use crate::allocation::limits::LimitSet;
use crate::allocation::lp::LpDispatcher;
use crate::allocation::{
    proportional_fill, Allocation, AllocationRequest, Candidate, Dispatcher, SmartDispatcher, EPS_KW,
};
use crate::config::Segment;
use crate::model::StrategyKind;

/// The segmented strategy.
pub struct SegmentedSmartDispatcher {
    /// The configured segments.
    pub segments: BTreeMap<String, Segment>,
    /// Default scoring (weights per type, rounds, fairness); segments replace the weights.
    pub smart: SmartDispatcher,
    /// The LP used by `lp` segments.
    pub lp: LpDispatcher,
}

impl SegmentedSmartDispatcher {
    /// Segments over `smart`'s defaults.
    pub fn new(segments: BTreeMap<String, Segment>, smart: SmartDispatcher) -> Self {
        let lp = LpDispatcher::new(smart.clone(), Default::default());
        Self { segments, smart, lp }
    }

    /// The same with explicit LP settings for `lp` segments.
    pub fn with_lp_settings(mut self, settings: crate::allocation::lp::LpSettings) -> Self {
        self.lp.settings = settings;
        self
    }

    /// The group of each candidate: `Some(name)` for a configured segment, `None` default.
    fn group_of<'s>(&'s self, c: &Candidate<'_>) -> Option<&'s str> {
        let name = c.vehicle.segment.as_deref()?;
        self.segments.get_key_value(name).map(|(k, _)| k.as_str())
    }

    /// Allocates `target` over the candidates at `idx`, within `room` (rows over all
    /// candidates, caps already reduced by earlier groups). Returns powers by position in `idx`.
    fn allocate_group(
        &mut self,
        req: &AllocationRequest<'_>,
        idx: &[usize],
        segment: Option<&str>,
        caps: &[f64],
        target: f64,
        room: &LimitSet,
    ) -> (Vec<f64>, Vec<f64>, Option<String>) {
        let sub: Vec<Candidate<'_>> =
            idx.iter().map(|&i| Candidate { capacity_kw: caps[i], ..req.candidates[i] }).collect();
        let sub_limits =
            LimitSet { rows: room.rows.clone(), members: idx.iter().map(|&i| room.members[i].clone()).collect() };
        let sub_req = AllocationRequest { target_kw: target, candidates: &sub, limits: &sub_limits, ..*req };
        let (weights, lp) = match segment.and_then(|s| self.segments.get(s)) {
            Some(seg) => (seg.weights, seg.lp),
            None => (self.smart.weights[usize::from(req.signal.kind.code())], false),
        };
        let scores = self.smart.scores_with(&sub_req, &weights);
        let mut note = None;
        if lp {
            match self.lp.solve(&sub_req, &scores) {
                Ok((power, _)) => return (power, scores, None),
                Err(e) => {
                    note = Some(format!("segment {}: {e}; Smart ran for it instead", segment.unwrap_or("default")))
                }
            }
        }
        let sub_caps: Vec<f64> = sub.iter().map(|c| c.capacity_kw).collect();
        let (power, _) = proportional_fill(&scores, &sub_caps, target, self.smart.max_rounds, &sub_limits);
        (power, scores, note)
    }
}

impl Dispatcher for SegmentedSmartDispatcher {
    fn kind(&self) -> StrategyKind {
        StrategyKind::Segmented
    }

    fn allocate(&mut self, req: &AllocationRequest<'_>) -> Allocation {
        let n = req.candidates.len();
        // Groups in service order: configured segments by name, then the default group.
        let mut groups: Vec<(Option<String>, Vec<usize>)> = Vec::new();
        for (i, c) in req.candidates.iter().enumerate() {
            let g = self.group_of(c).map(str::to_owned);
            match groups.iter_mut().find(|(k, _)| *k == g) {
                Some((_, v)) => v.push(i),
                None => groups.push((g, vec![i])),
            }
        }
        groups.sort_by(|a, b| match (&a.0, &b.0) {
            (Some(x), Some(y)) => x.cmp(y),
            (Some(_), None) => std::cmp::Ordering::Less,
            (None, Some(_)) => std::cmp::Ordering::Greater,
            (None, None) => std::cmp::Ordering::Equal,
        });
        let total_cap: f64 = req.candidates.iter().map(|c| c.capacity_kw).sum();
        let goal = req.target_kw.min(total_cap).max(0.0);

        let mut power = vec![0.0; n];
        let mut scores = vec![0.0; n];
        let mut notes = Vec::new();
        let mut room = req.limits.clone();
        let mut caps: Vec<f64> = req.candidates.iter().map(|c| c.capacity_kw).collect();
        // Pass 1: proportional shares. Pass 2: what is left, to whoever has room.
        for pass in 0..2 {
            for (segment, idx) in &groups {
                let placed: f64 = power.iter().sum();
                let left = goal - placed;
                if left <= EPS_KW {
                    break;
                }
                let share = if pass == 0 {
                    let group_cap: f64 = idx.iter().map(|&i| req.candidates[i].capacity_kw).sum();
                    if total_cap > 0.0 {
                        goal * group_cap / total_cap
                    } else {
                        0.0
                    }
                } else {
                    left
                };
                let target = share.min(left);
                if target <= EPS_KW {
                    continue;
                }
                let (p, s, note) = self.allocate_group(req, idx, segment.as_deref(), &caps, target, &room);
                notes.extend(note);
                let mut given = vec![0.0; n];
                for (k, &i) in idx.iter().enumerate() {
                    let g = p.get(k).copied().unwrap_or(0.0).clamp(0.0, caps[i]);
                    power[i] += g;
                    caps[i] -= g;
                    given[i] = g;
                    if pass == 0 {
                        scores[i] = s.get(k).copied().unwrap_or(0.0);
                    }
                }
                let used = room.loads(&given);
                for (row, u) in room.rows.iter_mut().zip(used) {
                    row.cap_kw = (row.cap_kw - u).max(0.0);
                }
            }
        }
        let mut a = Allocation::heuristic(StrategyKind::Segmented, power, scores, 2);
        if !notes.is_empty() {
            a.note = Some(notes.join("; "));
        }
        a
    }

    fn set_weights(&mut self, kind: crate::model::SignalType, weights: crate::allocation::Weights) {
        self.smart.weights[usize::from(kind.code())] = weights;
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::allocation::limits::Limits;
    use crate::allocation::Weights;
    use crate::model::{Direction, Signal, SignalType, Vehicle};
    use crate::time::Timestamp;

    fn segments(lp_vans: bool) -> BTreeMap<String, Segment> {
        let w = |soc, time| Weights { soc, time, priority: 0.0, availability: 0.0, price: 0.0, wear: 0.0 };
        BTreeMap::from([
            ("buses".to_owned(), Segment { lp: false, fallback: true, weights: w(1.0, 0.0) }),
            ("vans".to_owned(), Segment { lp: lp_vans, fallback: false, weights: w(0.0, 1.0) }),
        ])
    }

    fn run(
        d: &mut SegmentedSmartDispatcher,
        fleet: &[Vehicle],
        target: f64,
        limits: &Limits,
    ) -> (Allocation, Vec<f64>, LimitSet) {
        let sig = Signal::new("s", SignalType::Mfrr, Direction::Up, target, Timestamp::from_millis(0));
        let cands: Vec<Candidate<'_>> = fleet
            .iter()
            .map(|v| Candidate {
                vehicle: v,
                capacity_kw: v.effective_capacity(Direction::Up, 0.0, 900.0),
                participation: 0.0,
            })
            .collect();
        let caps = cands.iter().map(|c| c.capacity_kw).collect();
        let set = LimitSet::new(limits, Direction::Up, &cands);
        let req = AllocationRequest {
            signal: &sig,
            now: Timestamp::from_millis(0),
            target_kw: target,
            candidates: &cands,
            limits: &set,
        };
        (d.allocate(&req), caps, set)
    }

    fn vehicle(id: &str, segment: Option<&str>, kw: f64) -> Vehicle {
        let mut v = Vehicle::new(id, 0.8, 100.0, kw);
        v.segment = segment.map(str::to_owned);
        v
    }

    #[test]
    fn the_target_is_split_by_capacity_and_unknown_segments_use_the_default() {
        let fleet = [
            vehicle("b1", Some("buses"), 20.0),
            vehicle("b2", Some("buses"), 20.0),
            vehicle("v1", Some("vans"), 10.0),
            vehicle("x1", Some("taxis"), 10.0),
            vehicle("n1", None, 20.0),
        ];
        let mut d = SegmentedSmartDispatcher::new(segments(false), SmartDispatcher::default());
        let (a, _, _) = run(&mut d, &fleet, 40.0, &Limits::default());
        assert_eq!(a.strategy, StrategyKind::Segmented);
        let by = |ids: &[usize]| ids.iter().map(|&i| a.power_kw[i]).sum::<f64>();
        // Capacity 80 kW: buses 40, vans 10, default (taxis + none) 30 -> 20, 5 and 15 kW.
        assert!((by(&[0, 1]) - 20.0).abs() < 1e-9, "{a:?}");
        assert!((by(&[2]) - 5.0).abs() < 1e-9, "{a:?}");
        assert!((by(&[3, 4]) - 15.0).abs() < 1e-9, "{a:?}");
    }

    #[test]
    fn a_segment_held_back_by_a_limit_hands_its_share_to_the_others() {
        let mut fleet = vec![vehicle("b1", Some("buses"), 20.0), vehicle("v1", Some("vans"), 20.0)];
        fleet[0].group = Some("depot-a".into());
        let limits = Limits { groups: [("depot-a".to_owned(), 5.0)].into(), ..Limits::default() };
        for lp in [false, true] {
            let mut d = SegmentedSmartDispatcher::new(segments(lp), SmartDispatcher::default());
            let (a, _, set) = run(&mut d, &fleet, 30.0, &limits);
            assert!((a.power_kw[0] - 5.0).abs() < 1e-6, "{a:?}");
            assert!((a.power_kw[1] - 20.0).abs() < 1e-6, "{a:?}");
            assert!(set.violations(&a.power_kw, 1e-6).is_empty());
        }
    }

    proptest! {
        #[test]
        fn segmented_stays_within_capacity_and_limits_and_meets_feasible_targets(
            specs in prop::collection::vec((0.3f64..0.95, 1.0f64..40.0, 0usize..4, 0usize..3), 1..30),
            target in 1.0f64..600.0,
            group_cap in prop::option::of(5.0f64..100.0),
            lp in any::<bool>(),
        ) {
            let names = ["buses", "vans", "taxis", "none"];
            let fleet: Vec<Vehicle> = specs.iter().enumerate().map(|(i, (soc, kw, seg, group))| {
                let mut v = vehicle(&format!("v{i}"), (*seg < 3).then_some(names[*seg]), *kw);
                v.soc = *soc;
                v.group = Some(format!("g{group}"));
                v
            }).collect();
            let limits = Limits {
                groups: group_cap.map(|c| (0..3).map(|g| (format!("g{g}"), c)).collect()).unwrap_or_default(),
                ..Limits::default()
            };
            let mut d = SegmentedSmartDispatcher::new(segments(lp), SmartDispatcher::default());
            let (a, caps, set) = run(&mut d, &fleet, target, &limits);
            for (p, c) in a.power_kw.iter().zip(&caps) {
                prop_assert!(*p >= 0.0 && *p <= c + 1e-9);
            }
            prop_assert!(set.violations(&a.power_kw, 1e-6).is_empty());
            let total: f64 = a.power_kw.iter().sum();
            prop_assert!(total <= target + 1e-6);
            let cap: f64 = caps.iter().sum();
            if group_cap.is_none() {
                prop_assert!((total - target.min(cap)).abs() <= 1e-6 * target.max(1.0), "{} vs {}", total, target.min(cap));
            }
        }
    }
}
