//! [`UnifiedPipeline`]: one entry point for events on their way to a consumer (the store,
//! the live `events` tail), with a bounded buffer, de-duplication, composable stages and
//! counters.
//!
//! `submit` never grows the buffer past its capacity: a full pipeline answers
//! [`Backpressure`], and the caller waits (or refuses its own input) instead of the
//! pipeline dropping anything it accepted. An event is a duplicate when its id, or its
//! seq, was seen within the de-duplication window ([`BoundedSet`]). The stages run when
//! the consumer drains: `filter_by_kind` and `filter_by_region` drop what the consumer does
//! not want (counted as filtered), `window` holds events back until a batch of `n` is
//! complete or the oldest is `d` old, and the terminal `sort_by_sequence` hands each batch
//! over in seq order (events without a seq keep their submission order, after those with).

use std::collections::{BTreeSet, VecDeque};

use serde::Serialize;

use crate::bounded::BoundedSet;
use crate::time::Timestamp;

use super::{Event, EventKind};

/// An event with what identifies it: the id its producer gives it (a signal's id, an
/// order's ACK, ...) and, once stored, its seq; `item` is what the consumer takes (the
/// [`Event`] for the store, the rendered row for the live tail).
#[derive(Clone, Debug, PartialEq)]
pub struct Envelope<T = Event> {
    /// Producer-given id (duplicates of it are dropped).
    pub id: Option<String>,
    /// Position in the log, once it has one (duplicates of it are dropped).
    pub seq: Option<u64>,
    /// Its kind.
    pub kind: EventKind,
    /// Its region.
    pub region: Option<String>,
    /// What the consumer takes.
    pub item: T,
}

impl Envelope<Event> {
    /// `event`, with its producer's id.
    pub fn of(event: Event, id: Option<String>) -> Self {
        Self { id, seq: None, kind: event.kind, region: event.region.clone(), item: event }
    }
}

/// The pipeline is full: the event was not taken.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
#[error("the event pipeline is full ({capacity} events waiting); try again when the consumer has drained it")]
pub struct Backpressure<T: std::fmt::Debug = Event> {
    /// Its capacity.
    pub capacity: usize,
    /// The event, handed back.
    pub event: Box<Envelope<T>>,
}

/// What `submit` did with an event it took.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Submitted {
    /// Buffered for the consumer.
    Queued,
    /// Seen before within the window: dropped as a duplicate.
    Duplicate,
}

/// How a window holds events back.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Window {
    /// Until `n` are waiting.
    Count(usize),
    /// Until the oldest waiting is this many ms old.
    Millis(i64),
}

/// A stage a drained event passes.
#[derive(Clone, Debug, PartialEq)]
enum Stage {
    Kinds(BTreeSet<EventKind>),
    Region(String),
}

/// Counters, for the `status` topic.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct PipelineCounters {
    /// Events offered to `submit` (taken or not).
    pub submitted: u64,
    /// Refused because the buffer was full.
    pub refused: u64,
    /// Dropped as duplicates.
    pub deduplicated: u64,
    /// Dropped by a filter stage.
    pub filtered: u64,
    /// Handed to the consumer.
    pub delivered: u64,
    /// Waiting now.
    pub waiting: u64,
}

/// The pipeline.
#[derive(Clone, Debug)]
pub struct UnifiedPipeline<T = Event> {
    buffer: VecDeque<(Timestamp, Envelope<T>)>,
    capacity: usize,
    ids: BoundedSet<String>,
    seqs: BoundedSet<u64>,
    stages: Vec<Stage>,
    window: Option<Window>,
    sort: bool,
    counters: PipelineCounters,
}

impl<T: std::fmt::Debug> UnifiedPipeline<T> {
    /// A pipeline holding at most `capacity` events, remembering the last `dedup_window`
    /// ids and seqs.
    pub fn new(capacity: usize, dedup_window: usize) -> Self {
        Self {
            buffer: VecDeque::new(),
            capacity: capacity.max(1),
            ids: BoundedSet::new(dedup_window),
            seqs: BoundedSet::new(dedup_window),
            stages: Vec::new(),
            window: None,
            sort: false,
            counters: PipelineCounters::default(),
        }
    }

    /// Only events of these kinds reach the consumer.
    pub fn filter_by_kind(mut self, kinds: impl IntoIterator<Item = EventKind>) -> Self {
        self.stages.push(Stage::Kinds(kinds.into_iter().collect()));
        self
    }

    /// Only events of this region (or of none) reach the consumer.
    pub fn filter_by_region(mut self, region: impl Into<String>) -> Self {
        self.stages.push(Stage::Region(region.into()));
        self
    }

    /// Events are handed over in windows.
    pub fn window(mut self, window: Window) -> Self {
        self.window = Some(window);
        self
    }

    /// Each batch is handed over in seq order (terminal).
    pub fn sort_by_sequence(mut self) -> Self {
        self.sort = true;
        self
    }

    /// The counters.
    pub fn counters(&self) -> PipelineCounters {
        PipelineCounters { waiting: self.buffer.len() as u64, ..self.counters }
    }

    /// How many more events it takes before it answers [`Backpressure`].
    pub fn room(&self) -> usize {
        self.capacity - self.buffer.len().min(self.capacity)
    }

    /// Events waiting for the consumer.
    pub fn waiting(&self) -> usize {
        self.buffer.len()
    }

    /// Offers `event`, received at `now`. A full pipeline hands it back.
    pub fn submit(&mut self, now: Timestamp, event: Envelope<T>) -> Result<Submitted, Backpressure<T>> {
        self.counters.submitted += 1;
        let seen_id = event.id.as_ref().is_some_and(|id| self.ids.contains(id.as_str()));
        let seen_seq = event.seq.is_some_and(|s| self.seqs.contains(&s));
        if seen_id || seen_seq {
            self.counters.deduplicated += 1;
            return Ok(Submitted::Duplicate);
        }
        if self.buffer.len() >= self.capacity {
            self.counters.refused += 1;
            return Err(Backpressure { capacity: self.capacity, event: Box::new(event) });
        }
        if let Some(id) = &event.id {
            self.ids.insert(id.clone());
        }
        if let Some(seq) = event.seq {
            self.seqs.insert(seq);
        }
        self.buffer.push_back((now, event));
        Ok(Submitted::Queued)
    }

    /// Whether the window lets the waiting events go at `now`.
    fn window_open(&self, now: Timestamp) -> bool {
        match self.window {
            None => true,
            Some(Window::Count(n)) => self.buffer.len() >= n.max(1),
            Some(Window::Millis(ms)) => {
                self.buffer.front().is_some_and(|(at, _)| now.as_millis() - at.as_millis() >= ms)
            }
        }
    }

    /// What the consumer gets at `now`: every waiting event that passes the stages, once
    /// the window opens (a count window hands over whole windows only).
    pub fn drain(&mut self, now: Timestamp) -> Vec<Envelope<T>> {
        self.drain_up_to(now, usize::MAX)
    }

    /// [`UnifiedPipeline::drain`], at most the first `max` waiting events (a consumer that
    /// takes whole batches: the store takes whole steps). A count window still hands over
    /// whole windows only.
    pub fn drain_up_to(&mut self, now: Timestamp, max: usize) -> Vec<Envelope<T>> {
        if self.buffer.is_empty() || !self.window_open(now) {
            return Vec::new();
        }
        let take = match self.window {
            Some(Window::Count(n)) => {
                let n = n.max(1);
                let whole = self.buffer.len().min(max);
                whole - whole % n
            }
            _ => self.buffer.len().min(max),
        };
        let mut out: Vec<Envelope<T>> = Vec::with_capacity(take);
        for (_, e) in self.buffer.drain(..take) {
            let keep = self.stages.iter().all(|s| match s {
                Stage::Kinds(k) => k.contains(&e.kind),
                Stage::Region(r) => e.region.as_ref().is_none_or(|x| x == r),
            });
            if keep {
                out.push(e);
            } else {
                self.counters.filtered += 1;
            }
        }
        if self.sort {
            // Stable: events without a seq keep their order, after those with one.
            out.sort_by_key(|e| e.seq.unwrap_or(u64::MAX));
        }
        self.counters.delivered += out.len() as u64;
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: Timestamp = Timestamp::from_millis(1_000);

    fn env(id: Option<&str>, seq: Option<u64>, kind: EventKind, region: Option<&str>) -> Envelope {
        Envelope { seq, ..Envelope::of(Event::new(T, kind, "t").region(region), id.map(str::to_owned)) }
    }

    #[test]
    fn a_full_pipeline_hands_the_event_back_and_keeps_what_it_took() {
        let mut p = UnifiedPipeline::new(2, 10);
        assert_eq!(p.submit(T, env(Some("a"), None, EventKind::SignalReceived, None)), Ok(Submitted::Queued));
        assert_eq!(p.submit(T, env(Some("b"), None, EventKind::SignalReceived, None)), Ok(Submitted::Queued));
        let refused = p.submit(T, env(Some("c"), None, EventKind::SignalReceived, None)).unwrap_err();
        assert_eq!(refused.event.id.as_deref(), Some("c"));
        assert_eq!(p.drain(T).len(), 2, "nothing accepted was dropped");
        assert_eq!(p.submit(T, env(Some("c"), None, EventKind::SignalReceived, None)), Ok(Submitted::Queued));
        let c = p.counters();
        assert_eq!((c.submitted, c.refused, c.delivered, c.waiting), (4, 1, 2, 1));
    }

    #[test]
    fn duplicates_by_id_or_seq_are_dropped_within_the_window() {
        let mut p = UnifiedPipeline::new(100, 2);
        p.submit(T, env(Some("a"), Some(1), EventKind::OrderSent, None)).unwrap();
        assert_eq!(p.submit(T, env(Some("a"), None, EventKind::OrderSent, None)), Ok(Submitted::Duplicate));
        assert_eq!(p.submit(T, env(None, Some(1), EventKind::OrderSent, None)), Ok(Submitted::Duplicate));
        p.submit(T, env(Some("b"), Some(2), EventKind::OrderSent, None)).unwrap();
        p.submit(T, env(Some("c"), Some(3), EventKind::OrderSent, None)).unwrap();
        // "a" and seq 1 are out of the two-entry window now.
        assert_eq!(p.submit(T, env(Some("a"), Some(1), EventKind::OrderSent, None)), Ok(Submitted::Queued));
        assert_eq!(p.counters().deduplicated, 2);
    }

    #[test]
    fn stages_filter_window_and_sort() {
        let mut p = UnifiedPipeline::new(100, 100)
            .filter_by_kind([EventKind::OrderSent, EventKind::AckReceived])
            .filter_by_region("north")
            .window(Window::Count(3))
            .sort_by_sequence();
        p.submit(T, env(None, Some(9), EventKind::OrderSent, Some("north"))).unwrap();
        p.submit(T, env(None, Some(4), EventKind::SignalReceived, Some("north"))).unwrap();
        assert!(p.drain(T).is_empty(), "the window of 3 is not complete");
        p.submit(T, env(None, Some(7), EventKind::AckReceived, None)).unwrap();
        p.submit(T, env(None, Some(5), EventKind::OrderSent, Some("south"))).unwrap();
        let out: Vec<u64> = p.drain(T).iter().filter_map(|e| e.seq).collect();
        assert_eq!(out, [7, 9], "one whole window, filtered, in seq order");
        let c = p.counters();
        assert_eq!((c.filtered, c.delivered, c.waiting), (1, 2, 1));

        let mut counted = UnifiedPipeline::new(10, 10).window(Window::Count(2));
        for seq in 1..=5 {
            counted.submit(T, env(None, Some(seq), EventKind::OrderSent, None)).unwrap();
        }
        assert_eq!(counted.room(), 5);
        let firsts: Vec<u64> = counted.drain_up_to(T, 3).iter().filter_map(|e| e.seq).collect();
        assert_eq!(firsts, [1, 2], "at most 3, in whole windows of 2");
        assert_eq!((counted.waiting(), counted.room()), (3, 7));

        let mut timed = UnifiedPipeline::new(10, 10).window(Window::Millis(500));
        timed.submit(T, env(None, Some(1), EventKind::OrderSent, None)).unwrap();
        assert!(timed.drain(T.plus_millis(499)).is_empty());
        assert_eq!(timed.drain(T.plus_millis(500)).len(), 1);
    }
}
