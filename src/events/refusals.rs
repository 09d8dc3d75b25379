//! Refusals under a flood: at most one row per reason per second.
//!
//! Every refused message is answered on `errors` by whoever refused it; what goes to the
//! log is decided here. While refusals are rare each is its own `SignalRejected` or
//! `InputRejected` row. Refusals of one reason (a [`Refused::reason`] code) that come
//! within a second of that reason's last row join a batch instead, written as one row once
//! the second is up: it counts them (`count`), lists the first [`MAX_REFS`] ids (`refs`) and
//! keeps the first message whole. A client stuck in a loop costs the log one row a second
//! per reason instead of one per message, and nothing is lost: every refusal is counted.
//!
//! Pure: time is an argument, and the owner (the store's writer) asks [`RefusalBook::due`]
//! at [`RefusalBook::next_due`].

use std::collections::BTreeMap;

use super::payload::Rejected;
use super::{Event, EventKind};
use crate::time::Timestamp;

/// Ids listed in a batch, at most (the count says how many there were).
pub const MAX_REFS: usize = 100;

/// How long after a reason's last row its next refusals are batched, ms.
pub const WINDOW_MS: i64 = 1_000;

/// Reasons followed at once, at most; refusals of any further reason share one batch
/// (`other`), so made-up input cannot grow the book.
pub const MAX_REASONS: usize = 256;

/// One refused message, as the log records it.
#[derive(Clone, Debug, PartialEq)]
pub struct Refused {
    /// `SignalRejected` or `InputRejected`.
    pub kind: EventKind,
    /// Who refused it, or whose input it was.
    pub actor: String,
    /// The region of the row.
    pub region: Option<String>,
    /// The dispatch it is about, where known.
    pub correlation: Option<String>,
    /// The reason's code: refusals with the same code are batched together.
    pub reason: String,
    /// The message's id, where it could be read.
    pub reference: Option<String>,
    /// The row's payload for this message alone.
    pub rejected: Rejected,
    /// When it was received.
    pub at: Timestamp,
}

impl Refused {
    /// This refusal alone, as its row.
    pub fn event(self) -> Event {
        let Refused { actor, region, correlation, reason, mut rejected, at, .. } = self;
        rejected.reason = Some(reason);
        let event = Event::of(at, actor, &rejected).region(region.as_deref());
        match correlation {
            Some(id) => event.correlation(id),
            None => event,
        }
    }
}

/// Refusals of one reason since its last row.
#[derive(Debug)]
struct Batch {
    first: Refused,
    count: u64,
    refs: Vec<String>,
    last_at: Timestamp,
}

impl Batch {
    fn new(first: Refused) -> Self {
        let refs = first.reference.iter().cloned().collect();
        Self { last_at: first.at, first, count: 1, refs }
    }

    fn add(&mut self, r: Refused) {
        self.count += 1;
        self.last_at = self.last_at.max(r.at);
        if let Some(id) = r.reference {
            if self.refs.len() < MAX_REFS {
                self.refs.push(id);
            }
        }
    }

    /// The batch's row, stamped `now`.
    fn event(self, now: Timestamp) -> Event {
        if self.count == 1 {
            return Refused { at: now, ..self.first }.event();
        }
        let Refused { actor, region, reason, mut rejected, at, .. } = self.first;
        rejected.reason = Some(reason);
        rejected.count = self.count;
        rejected.refs = self.refs;
        rejected.first_at = Some(at);
        rejected.last_at = Some(self.last_at);
        Event::of(now, actor, &rejected).region(region.as_deref())
    }
}

/// A reason's last row and the batch since.
#[derive(Debug)]
struct Reason {
    last_row: Timestamp,
    batch: Option<Batch>,
}

/// The refusals of every reason: what to record now, and the batches to record later.
#[derive(Debug, Default)]
pub struct RefusalBook {
    reasons: BTreeMap<(EventKind, String), Reason>,
    /// Refusals taken, in all.
    taken: u64,
}

impl RefusalBook {
    /// Takes a refusal at `now`. Returns its row when it should be recorded now (its reason
    /// had no row in the last second, and `room`: the log takes a row now); else it joins
    /// its reason's batch and `None` is returned.
    pub fn refuse(&mut self, now: Timestamp, r: Refused, room: bool) -> Option<Event> {
        self.taken += 1;
        let mut key = (r.kind, r.reason.clone());
        if !self.reasons.contains_key(&key) && self.reasons.len() >= MAX_REASONS {
            key = (r.kind, "other".to_owned());
        }
        let reason =
            self.reasons.entry(key).or_insert_with(|| Reason { last_row: now.plus_millis(-WINDOW_MS), batch: None });
        let quiet = now.as_millis() - reason.last_row.as_millis() >= WINDOW_MS;
        if reason.batch.is_none() && quiet && room {
            reason.last_row = now;
            return Some(r.event());
        }
        match &mut reason.batch {
            Some(batch) => batch.add(r),
            None => reason.batch = Some(Batch::new(r)),
        }
        None
    }

    /// The rows of the batches due at `now` (their reason's last row is a second old; every
    /// batch when `all`, as at shutdown), stamped `now`. Reasons quiet for a second are
    /// forgotten.
    pub fn due(&mut self, now: Timestamp, all: bool) -> Vec<Event> {
        let mut rows = Vec::new();
        self.reasons.retain(|_, reason| {
            let quiet = now.as_millis() - reason.last_row.as_millis() >= WINDOW_MS;
            if quiet || all {
                if let Some(batch) = reason.batch.take() {
                    rows.push(batch.event(now));
                    reason.last_row = now;
                    return true;
                }
            }
            !quiet
        });
        rows
    }

    /// When the next batch is due, if one waits.
    pub fn next_due(&self) -> Option<Timestamp> {
        self.reasons.values().filter(|r| r.batch.is_some()).map(|r| r.last_row.plus_millis(WINDOW_MS)).min()
    }

    /// Refusals waiting in batches.
    pub fn waiting(&self) -> u64 {
        self.reasons.values().filter_map(|r| r.batch.as_ref()).map(|b| b.count).sum()
    }

    /// Refusals taken since the book was made.
    pub fn taken(&self) -> u64 {
        self.taken
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::payload::{decode_str, Decoded};

    const T0: Timestamp = Timestamp::from_millis(1_795_000_000_000);

    fn refused(reason: &str, id: &str, at: Timestamp) -> Refused {
        let payload = format!(r#"{{"id":"{id}"}}"#);
        Refused {
            kind: EventKind::SignalRejected,
            actor: "dispatcher".into(),
            region: Some("depot".into()),
            correlation: None,
            reason: reason.into(),
            reference: Some(id.into()),
            rejected: crate::wire::rejected(EventKind::SignalRejected, "p/signals", "why", payload.as_bytes()),
            at,
        }
    }

    fn rejected(e: &Event) -> Rejected {
        match decode_str(e.kind.as_str(), &e.payload).unwrap() {
            Decoded::Rejected(r) => r,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_lone_refusal_is_its_own_row_at_once() {
        let mut book = RefusalBook::default();
        let row = book.refuse(T0, refused("duplicate", "a", T0), true).expect("recorded now");
        let r = rejected(&row);
        assert_eq!((r.count, r.reason.as_deref(), row.ts), (1, Some("duplicate"), T0));
        assert!(book.next_due().is_none());
        // A second later the same reason is again a row of its own.
        assert!(book.refuse(T0.plus_millis(1_000), refused("duplicate", "b", T0), true).is_some());
    }

    /// A flood of one reason: one row at once, then one row a second counting the rest,
    /// with the first ids; another reason is its own batch; nothing is lost.
    #[test]
    fn a_flood_is_one_row_a_second_per_reason_and_every_refusal_is_counted() {
        let mut book = RefusalBook::default();
        let mut rows = Vec::new();
        for i in 0..5_000 {
            let now = T0.plus_millis(i / 2);
            let reason = if i % 10 == 0 { "invalid:power_kw" } else { "planner_behind" };
            rows.extend(book.refuse(now, refused(reason, &format!("s{i}"), now), true));
            rows.extend(book.due(now, false));
        }
        rows.extend(book.due(T0.plus_millis(10_000), false));
        assert_eq!(book.waiting(), 0);
        let counted: u64 = rows.iter().map(|e| rejected(e).count).sum();
        assert_eq!(counted, 5_000);
        // 2.5 s of flood: per reason a row at once, then one per second (and the remainder).
        assert!(rows.len() <= 2 * 4, "{} rows", rows.len());
        let batch = rows.iter().map(rejected).find(|r| r.count > 1).unwrap();
        assert_eq!(batch.refs.len(), MAX_REFS);
        assert!(batch.first_at.unwrap() <= batch.last_at.unwrap());
        assert!(rows.windows(2).all(|w| w[0].ts <= w[1].ts), "rows in time order");
    }

    #[test]
    fn refusals_that_find_the_log_full_wait_in_a_batch_and_all_is_written_at_shutdown() {
        let mut book = RefusalBook::default();
        assert!(book.refuse(T0, refused("log_behind", "a", T0), false).is_none());
        assert_eq!(book.next_due(), Some(T0), "due as soon as the log has room");
        assert!(book.refuse(T0, refused("log_behind", "b", T0), true).is_none());
        let rows = book.due(T0.plus_millis(10), true);
        assert_eq!(rows.len(), 1);
        assert_eq!(rejected(&rows[0]).refs, ["a", "b"]);
    }

    #[test]
    fn made_up_reasons_cannot_grow_the_book() {
        let mut book = RefusalBook::default();
        for i in 0..10 * MAX_REASONS {
            book.refuse(T0, refused(&format!("r{i}"), "x", T0), true);
        }
        assert!(book.reasons.len() <= MAX_REASONS + 1);
        assert_eq!(book.taken(), 10 * MAX_REASONS as u64);
    }
}
