//! The dispatches in flight, indexed by order id, with their deadlines.

use std::collections::{BTreeMap, HashMap};

use crate::bounded::BoundedSet;
use crate::model::order_dispatch;

use crate::dispatch::fallback::Reallocation;
use crate::model::{Ack, DispatchId, OrderId, VehicleId};
use crate::time::Timestamp;

use super::machine::{AckIgnored, Dispatch, FallbackRequest};
use super::Step;

/// The dispatches in flight, with their order index and deadlines.
#[derive(Debug)]
pub struct DispatchBook {
    pub(super) live: BTreeMap<DispatchId, Dispatch>,
    pub(super) orders: HashMap<OrderId, DispatchId>,
    pub(super) settled: BoundedSet<DispatchId>,
}

impl Default for DispatchBook {
    fn default() -> Self {
        Self { live: BTreeMap::new(), orders: HashMap::new(), settled: BoundedSet::new(SETTLED_DISPATCHES_KEPT) }
    }
}

/// Settled dispatches remembered, so that a late ACK to one of their orders is called late
/// rather than unknown. Order ids are `<dispatch id>-<attempt>-<n>`, so remembering the
/// dispatch is enough (a few dozen bytes a dispatch, not one string per order).
const SETTLED_DISPATCHES_KEPT: usize = 10_000;

impl DispatchBook {
    /// An empty book.
    pub fn new() -> Self {
        Self::default()
    }

    /// Dispatches in flight.
    pub fn len(&self) -> usize {
        self.live.len()
    }

    /// Whether nothing is in flight.
    pub fn is_empty(&self) -> bool {
        self.live.is_empty()
    }

    /// Ids of the dispatches in flight.
    pub fn ids(&self) -> impl Iterator<Item = &str> {
        self.live.keys().map(DispatchId::as_str)
    }

    /// Adds a planned dispatch (one that settled at planning is dropped at once).
    pub fn insert(&mut self, dispatch: Dispatch) {
        if dispatch.is_done() {
            return;
        }
        for id in dispatch.order_ids() {
            self.orders.insert(id.clone(), dispatch.id.clone());
        }
        self.live.insert(dispatch.id.clone(), dispatch);
    }

    /// The earliest deadline in flight.
    pub fn next_deadline(&self) -> Option<Timestamp> {
        self.live.values().filter_map(Dispatch::deadline).min()
    }

    /// Routes an ACK to its dispatch.
    pub fn on_ack(&mut self, now: Timestamp, from: &VehicleId, ack: &Ack) -> Result<Step, AckIgnored> {
        let Some(dispatch_id) = self.orders.get(ack.order_id.as_str()) else {
            return Err(if order_dispatch(&ack.order_id).is_some_and(|d| self.settled.contains(d)) {
                AckIgnored::Settled(ack.order_id.clone())
            } else {
                AckIgnored::UnknownOrder(ack.order_id.clone())
            });
        };
        let dispatch_id = dispatch_id.clone();
        let step = self
            .live
            .get_mut(&dispatch_id)
            .ok_or_else(|| AckIgnored::Settled(ack.order_id.clone()))?
            .on_ack(now, from, ack)?;
        self.after(&dispatch_id);
        Ok(step)
    }

    /// Settles every dispatch whose deadline is at or before `now`.
    pub fn on_timeout(&mut self, now: Timestamp) -> Vec<Step> {
        let mut due: Vec<DispatchId> =
            self.live.values().filter(|d| d.deadline().is_some_and(|t| t <= now)).map(|d| d.id.clone()).collect();
        due.sort();
        let mut steps = Vec::new();
        for id in due {
            if let Some(d) = self.live.get_mut(&id) {
                steps.push(d.on_deadline(now));
            }
            self.after(&id);
        }
        steps
    }

    /// The fallback's answer for `request`.
    pub(crate) fn apply_fallback(&mut self, now: Timestamp, request: &FallbackRequest, realloc: &Reallocation) -> Step {
        let Some(d) = self.live.get_mut(&request.dispatch_id) else { return Step::default() };
        let step = d.apply_fallback(now, request, realloc);
        for o in &step.orders {
            self.orders.insert(o.order_id.clone(), request.dispatch_id.clone());
        }
        self.after(&request.dispatch_id);
        step
    }

    /// Whether `dispatch_id` is in flight.
    pub fn contains(&self, dispatch_id: &str) -> bool {
        self.live.contains_key(dispatch_id)
    }

    /// The orders of `dispatch_id`'s current attempt were published at `now`.
    pub fn published(&mut self, dispatch_id: &str, now: Timestamp) {
        if let Some(d) = self.live.get_mut(dispatch_id) {
            d.published(now);
        }
    }

    /// Every attempt waiting for ACKs gets its whole window from `now`; their ids.
    pub fn restart_windows(&mut self, now: Timestamp) -> Vec<DispatchId> {
        let waiting = self.live.values_mut().filter(|d| d.deadline().is_some());
        waiting
            .map(|d| {
                d.published(now);
                d.id().clone()
            })
            .collect()
    }

    /// Settles one dispatch now, without fallback (it was replaced).
    pub fn interrupt(&mut self, now: Timestamp, dispatch_id: &str, why: &str) -> Option<Step> {
        let step = self.live.get_mut(dispatch_id)?.interrupt(now, why);
        self.after(dispatch_id);
        Some(step)
    }

    /// Settles everything in flight now, without fallback (graceful shutdown).
    pub fn shutdown(&mut self, now: Timestamp, why: &str) -> Vec<Step> {
        let mut ids: Vec<DispatchId> = self.live.keys().cloned().collect();
        ids.sort();
        ids.iter().filter_map(|id| self.interrupt(now, id, why)).collect()
    }

    /// Drops a settled dispatch, remembering its orders as settled.
    fn after(&mut self, dispatch_id: &str) {
        if !self.live.get(dispatch_id).is_some_and(Dispatch::is_done) {
            return;
        }
        let Some(d) = self.live.remove(dispatch_id) else { return };
        for id in d.order_ids() {
            self.orders.remove(id);
        }
        self.settled.insert(d.id);
    }
}
