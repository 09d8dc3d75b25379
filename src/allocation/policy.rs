//! Which strategy runs for a signal: the configured one, or the LP first for the signal
//! types listed in `dispatch.lp_first`, falling back to Smart when the LP fails.

use crate::allocation::lp::fill_to_max;
use crate::allocation::lp::LpDispatcher;
use crate::allocation::{Allocation, AllocationRequest, Dispatcher, EqualDispatcher, SmartDispatcher};
use crate::model::StrategyKind;

/// The configured strategies and the LP-first policy.
pub struct Strategies {
    /// The strategy for types without LP-first.
    pub default: StrategyKind,
    /// LP first, per signal type code.
    pub lp_first: [bool; 5],
    /// Smart (also the LP's fallback and scorer).
    pub smart: SmartDispatcher,
    /// The LP.
    pub lp: LpDispatcher,
    /// Per-segment strategies, when `default` is `Segmented`.
    pub segmented: Option<Box<dyn Dispatcher>>,
}

impl Strategies {
    /// `default` for every type, no LP-first, the LP with `settings`.
    pub fn new(default: StrategyKind, smart: SmartDispatcher, settings: crate::allocation::lp::LpSettings) -> Self {
        let lp = LpDispatcher::new(smart.clone(), settings);
        Self { default, lp_first: [false; 5], smart, lp, segmented: None }
    }

    fn run_lp(&mut self, req: &AllocationRequest<'_>) -> Allocation {
        // The LP scores with (and falls back to) its own copy of Smart, kept in step by
        // `set_weights`.
        self.lp.allocate(req)
    }
}

impl Dispatcher for Strategies {
    fn kind(&self) -> StrategyKind {
        self.default
    }

    fn set_weights(&mut self, kind: crate::model::SignalType, weights: crate::allocation::Weights) {
        self.smart.set_weights(kind, weights);
        self.lp.scoring.set_weights(kind, weights);
        if let Some(seg) = self.segmented.as_mut() {
            seg.set_weights(kind, weights);
        }
    }

    fn allocate(&mut self, req: &AllocationRequest<'_>) -> Allocation {
        let kind = req.signal.kind;
        if self.lp_first[usize::from(kind.code())] || self.default == StrategyKind::Lp {
            return self.run_lp(req);
        }
        let mut a = match (self.default, self.segmented.as_mut()) {
            (StrategyKind::Equal, _) => EqualDispatcher.allocate(req),
            (StrategyKind::Segmented, Some(seg)) => seg.allocate(req),
            _ => self.smart.allocate(req),
        };
        let mut note = format!("LP skipped: dispatch.lp_first is not set for {kind}");
        // The delivery guarantee: the strategy chose the vehicles; if it placed less than the
        // limits allow, the LP over its own scores places the rest.
        let caps: Vec<f64> = req.candidates.iter().map(|c| c.capacity_kw).collect();
        let n = caps.len();
        let scores = if a.scores.len() == n { a.scores.clone() } else { vec![1.0; n] };
        a.power_kw.resize(n, 0.0);
        if let Some(r) = fill_to_max(&mut self.lp, &mut a.power_kw, &caps, req.target_kw, req.limits, &scores) {
            note.push_str(&format!(
                "; repaired: {} placed {:.3} kW within the limits, the LP over its scores {:.3} kW",
                a.strategy.name(),
                r.before_kw,
                r.after_kw
            ));
        }
        a.note = Some(note);
        a
    }
}
