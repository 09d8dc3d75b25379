//! The event log in SQLite: one writer thread (the StoreActor) and read-only readers.
//!
//! The writer owns the only read-write [`rusqlite::Connection`]. Callers submit steps of
//! events to the store's [`UnifiedPipeline`] ([`StoreHandle::append`]; bounded in events
//! and bytes: a caller waits for room, and [`StoreHandle::behind`] tells it to refuse new
//! work first); the thread drains every whole step waiting, writes them all in one
//! transaction (group commit), commits, and only
//! then answers each caller with the seq of its first row and its events handed back (the
//! caller renders them for the `<p>/events` live tail: [`tail_json`]). A caller that publishes orders after its answer therefore
//! never publishes a decision that is not durable.
//!
//! The table is the contract's `events` table. Triggers refuse UPDATE and DELETE, so the
//! log is append-only even against a careless `sqlite3` session; the one exception is
//! [`compact`], the logged retention step (see `schema.rs`).

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread;

use gridweaver_core::events::payload::{decode_str, LogCompacted};
use gridweaver_core::events::pipeline::{Envelope, PipelineCounters, UnifiedPipeline};
use gridweaver_core::events::refusals::{RefusalBook, Refused};
use gridweaver_core::events::{Decoded, Event, EventKind, EventStore, ProjectedState, StoredEvent};
use gridweaver_core::replay::projection::{self, SentHeader};
use gridweaver_core::replay::{DispatchProjection, ProjectionError};
use gridweaver_core::time::Timestamp;
use rusqlite::{params, Connection, OpenFlags, OptionalExtension};
use tokio::sync::oneshot;

mod lock;
pub mod schema;

pub use lock::{lock_path, LogLock};

/// What can go wrong with the event log.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The file could not be opened or set up.
    #[error("cannot open the event log {}: {error}", path.display())]
    Open {
        /// The file.
        path: PathBuf,
        /// SQLite's answer.
        error: rusqlite::Error,
    },
    /// No file at the path.
    #[error("no event log at {}", .0.display())]
    Missing(PathBuf),
    /// A database without the contract's table.
    #[error("{} is not a GridWeaver event log (no `events` table)", .0.display())]
    NotALog(PathBuf),
    /// A row whose payload is not JSON (the log was edited by hand).
    #[error("{}: event {seq} has a payload that is not JSON: {error}", path.display())]
    BadPayload {
        /// The file.
        path: PathBuf,
        /// The row.
        seq: i64,
        /// The parser's answer.
        error: serde_json::Error,
    },
    /// A row the projection cannot read.
    #[error("{}: {error}", path.display())]
    Unreadable {
        /// The file.
        path: PathBuf,
        /// Which row, and why.
        error: ProjectionError,
    },
    /// A log written by a newer build.
    #[error("the event log has schema version {found}; this build knows up to {known}: use a newer gridweaver")]
    NewerSchema {
        /// Its version.
        found: i64,
        /// The newest this build knows.
        known: i64,
    },
    /// A read or write failed.
    #[error("event log: {0}")]
    Sql(#[from] rusqlite::Error),
    /// More rows than a seq can number.
    #[error("event log: seq out of range")]
    SeqOverflow,
    /// The writer thread could not be started.
    #[error("cannot start the store thread: {0}")]
    Thread(std::io::Error),
    /// A time before the log's last compaction.
    #[error("{}: the log was compacted through event {through_seq} ({at}); it replays from that time on", path.display())]
    Compacted {
        /// The file.
        path: PathBuf,
        /// The last row removed.
        through_seq: u64,
        /// Its time.
        at: Timestamp,
    },
    /// The snapshot a compacted log starts from is missing or unreadable.
    #[error("{}: the snapshot of the retention step through event {through_seq} (event {seq}): {reason}", path.display())]
    Snapshot {
        /// The file.
        path: PathBuf,
        /// The retention step.
        through_seq: i64,
        /// Its `LogCompacted` row.
        seq: i64,
        /// Why.
        reason: String,
    },
    /// Another `compact` recorded a retention step while this one was computing its own.
    #[error("{}: another compaction ran at the same time; nothing was changed, run it again", .0.display())]
    Concurrent(PathBuf),
    /// Another process (a gateway, or a `migrate`) holds the log's lock.
    #[error(
        "{}: another gateway holds the lock of this event log{}; one gateway per log",
        path.display(),
        holder.map(|pid| format!(" (pid {pid})")).unwrap_or_default()
    )]
    Locked {
        /// The lock file.
        path: PathBuf,
        /// The pid the holder wrote into it, when readable.
        holder: Option<u32>,
    },
    /// The lock file could not be created or locked.
    #[error("cannot lock the event log with {}: {error}", path.display())]
    Lock {
        /// The lock file.
        path: PathBuf,
        /// Why.
        error: std::io::Error,
    },
    /// The chain is broken: compacting would hide it.
    #[error("{}: the log does not match its hash chain ({error}); it is not compacted, so that the evidence stays", path.display())]
    Broken {
        /// The file.
        path: PathBuf,
        /// Where.
        error: schema::ChainBreak,
    },
}

impl From<std::num::TryFromIntError> for StoreError {
    fn from(_: std::num::TryFromIntError) -> Self {
        StoreError::SeqOverflow
    }
}

/// Events waiting for the writer, at most (a step goes in whole or waits).
pub const QUEUE_EVENTS: usize = 16_384;

/// Payload bytes waiting for the writer, at most (a step that alone is larger goes in
/// when nothing else waits).
pub const QUEUE_BYTES: usize = 8 << 20;

/// How long rows that nobody waits for (fleet changes, refusals) may wait for company
/// before the writer commits them: under a stream of them the log is written in few large
/// commits, not one small one each (on an SD card each commit rewrites the table's last page
/// and syncs). A decision, a flush or a quarter-full queue takes them along at once.
pub const RECORD_LINGER: std::time::Duration = std::time::Duration::from_millis(50);

/// Most events written in one transaction.
const MAX_BATCH_EVENTS: usize = 20_000;

/// What an append got: its first seq, and its events back.
#[derive(Debug)]
pub struct Appended {
    /// Seq of the first event (the rest follow without gaps).
    pub first_seq: u64,
    /// The events, now durable, in their order.
    pub events: Vec<Event>,
}

type Reply = oneshot::Sender<Result<Appended, String>>;

/// The store's answer to an append, once its events are durable (or why they are not).
pub type Durable = oneshot::Receiver<Result<Appended, String>>;

/// Takes the durable rows of [`StoreHandle::record`]ed events (an append's caller gets
/// its own back).
pub type TailSink = Box<dyn Fn(Appended) + Send + Sync>;

enum Request {
    Append {
        events: Vec<Event>,
        reply: Option<Reply>,
    },
    /// Answered once what was queued before it is durable; with `checkpoint`, once it is
    /// also copied from the WAL into the database file.
    Flush {
        reply: oneshot::Sender<()>,
        checkpoint: bool,
    },
}

/// What a request is, while its events wait in the pipeline.
enum Pending {
    Append { events: usize, bytes: usize, reply: Option<Reply> },
    Flush { reply: oneshot::Sender<()>, checkpoint: bool },
}

/// The writer's input: the store's [`UnifiedPipeline`] (bounded: a producer waits for
/// room instead of the queue growing; the writer drains it in whole steps), and per
/// request how many of its events are whose.
struct Queue {
    pipeline: UnifiedPipeline<Event>,
    pending: VecDeque<Pending>,
    bytes: usize,
    /// Every handle is gone: the writer ends once the queue is empty.
    producers_gone: bool,
    /// The writer thread has ended (or panicked): nothing is taken any more.
    writer_gone: bool,
    /// Refusals, batched by reason under a flood (the writer writes the batches when due).
    refusals: RefusalBook,
    /// Since when rows that nobody waits for (observations: fleet changes, refusals) have
    /// waited, while nothing else does: the writer commits them together after
    /// [`RECORD_LINGER`].
    records_since: Option<std::time::Instant>,
}

impl Queue {
    /// Whether `events` of `bytes` fit now (a step alone larger than the byte bound goes in
    /// when nothing else waits).
    fn room_for(&self, events: usize, bytes: usize) -> bool {
        self.pipeline.room() >= events && (self.bytes == 0 || self.bytes + bytes <= QUEUE_BYTES)
    }

    fn push(&mut self, events: Vec<Event>, bytes: usize, reply: Option<Reply>) {
        if self.pending.is_empty() {
            self.records_since = Some(std::time::Instant::now());
        }
        let at = crate::clock::now();
        let n = events.len();
        for e in events {
            // Room for all of them was checked; without ids or seqs nothing is a duplicate.
            if let Err(full) = self.pipeline.submit(at, Envelope::of(e, None)) {
                tracing::error!(capacity = full.capacity, "the store's queue refused an event it had room for");
            }
        }
        self.bytes += bytes;
        self.pending.push_back(Pending::Append { events: n, bytes, reply });
    }

    /// Queues the refusal batches due at `now` (all of them when `all`) while there is room.
    fn queue_due_refusals(&mut self, now: Timestamp, all: bool) {
        if self.refusals.next_due().is_none_or(|due| due > now && !all) || !self.room_for(1, 0) {
            return;
        }
        for event in self.refusals.due(now, all) {
            let bytes = event.payload.len();
            self.push(vec![event], bytes, None);
        }
    }
}

/// Why the store did not take an append.
enum Refusal {
    /// The queue is full now: the events back, to offer again once there is room.
    Full(Vec<Event>),
    /// It never will (too large, or the writer has stopped).
    Never(String, Option<Reply>),
}

struct Journal {
    queue: Mutex<Queue>,
    /// Where the rows of appends nobody waits for go once durable (the live tail).
    tail: std::sync::OnceLock<TailSink>,
    /// The writer waits on it for work (or for the next batch of refusals to be due).
    work: Condvar,
    /// Producers that found the queue full wait on it, asynchronously, for room.
    room: tokio::sync::Notify,
}

impl Journal {
    fn lock(&self) -> MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Queues one request if the queue has room for it; never waits. `Err` gives the
    /// events back when it is full, or says why it can never take them.
    fn try_enqueue(&self, events: Vec<Event>, reply: Option<Reply>) -> Result<(), Refusal> {
        if events.len() > QUEUE_EVENTS {
            let why =
                format!("a step of {} events is more than the store takes at once ({QUEUE_EVENTS})", events.len());
            return Err(Refusal::Never(why, reply));
        }
        let bytes: usize = events.iter().map(|e| e.payload.len()).sum();
        let mut q = self.lock();
        if q.writer_gone {
            return Err(Refusal::Never("the store thread has stopped".into(), reply));
        }
        if !q.room_for(events.len(), bytes) {
            return Err(Refusal::Full(events));
        }
        q.push(events, bytes, reply);
        drop(q);
        self.work.notify_one();
        Ok(())
    }

    /// Takes a refusal: its row is queued now, or it joins its reason's batch, which the
    /// writer writes when due. Never waits, never loses a refusal.
    fn refuse(&self, refused: Refused) {
        let mut q = self.lock();
        if q.writer_gone {
            return;
        }
        let room = q.room_for(1, refused.rejected.bytes.min(16 * 1024));
        if let Some(event) = q.refusals.refuse(crate::clock::now(), refused, room) {
            let bytes = event.payload.len();
            q.push(vec![event], bytes, None);
        }
        drop(q);
        // Also when batched: the writer's wait may now end sooner.
        self.work.notify_one();
    }

    fn flush(&self, reply: oneshot::Sender<()>, checkpoint: bool) {
        let mut q = self.lock();
        if q.writer_gone {
            let _ = reply.send(());
            return;
        }
        q.pending.push_back(Pending::Flush { reply, checkpoint });
        drop(q);
        self.work.notify_one();
    }

    /// The writer's next batch: whole requests, up to [`MAX_BATCH_EVENTS`] events (at
    /// least one request); `None` once every handle is gone and nothing waits.
    fn next_batch(&self) -> Option<Vec<Request>> {
        let mut q = self.lock();
        loop {
            let now = crate::clock::now();
            let all = q.producers_gone;
            q.queue_due_refusals(now, all);
            if q.producers_gone {
                break;
            }
            // Rows nobody waits for linger a moment, so that a stream of them is one commit
            // (one rewrite of the last page, one fsync) instead of one each; a decision, a
            // flush or a full queue takes them along at once.
            let lingering = q.pending.iter().all(|p| matches!(p, Pending::Append { reply: None, .. }))
                && q.pipeline.waiting() * 4 < QUEUE_EVENTS
                && q.records_since.is_some_and(|t| t.elapsed() < RECORD_LINGER);
            if !q.pending.is_empty() && !lingering {
                break;
            }
            let linger = q.records_since.filter(|_| lingering).map(|t| RECORD_LINGER.saturating_sub(t.elapsed()));
            let due = q.refusals.next_due().map(|due| {
                std::time::Duration::from_millis(u64::try_from(due.as_millis() - now.as_millis()).unwrap_or(0))
            });
            let wake = match (linger, due) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
            q = match wake {
                // This is the writer's own thread: it waits here, never an actor.
                Some(wait) => {
                    self.work
                        .wait_timeout(q, wait.max(std::time::Duration::from_millis(1)))
                        .unwrap_or_else(PoisonError::into_inner)
                        .0
                }
                None => self.work.wait(q).unwrap_or_else(PoisonError::into_inner),
            };
        }
        if q.pending.is_empty() {
            return None;
        }
        let mut taken = Vec::new();
        let mut events = 0;
        while let Some(p) = q.pending.front() {
            let n = if let Pending::Append { events, .. } = p { *events } else { 0 };
            if !taken.is_empty() && events + n > MAX_BATCH_EVENTS {
                break;
            }
            events += n;
            taken.extend(q.pending.pop_front());
        }
        let mut drained = q.pipeline.drain_up_to(crate::clock::now(), events).into_iter().map(|e| e.item);
        let mut batch = Vec::with_capacity(taken.len());
        for p in taken {
            batch.push(match p {
                Pending::Append { events, bytes, reply } => {
                    q.bytes -= bytes;
                    Request::Append { events: drained.by_ref().take(events).collect(), reply }
                }
                Pending::Flush { reply, checkpoint } => Request::Flush { reply, checkpoint },
            });
        }
        drop(q);
        self.room.notify_waiters();
        Some(batch)
    }
}

/// Marks the journal when the last handle goes, so that the writer ends.
struct Producers(Arc<Journal>);

impl Drop for Producers {
    fn drop(&mut self) {
        self.0.lock().producers_gone = true;
        self.0.work.notify_all();
    }
}

/// Marks the journal when the writer ends (or unwinds), so that no producer waits for it.
struct WriterGone(Arc<Journal>);

impl Drop for WriterGone {
    fn drop(&mut self) {
        let mut q = self.0.lock();
        q.writer_gone = true;
        for p in q.pending.drain(..) {
            match p {
                Pending::Append { reply: Some(reply), .. } => {
                    let _ = reply.send(Err("the store thread has stopped".into()));
                }
                Pending::Append { reply: None, .. } => {}
                Pending::Flush { reply, .. } => {
                    let _ = reply.send(());
                }
            }
        }
        drop(q);
        self.0.room.notify_waiters();
    }
}

/// How far behind the writer is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Backlog {
    /// Events waiting.
    pub events: usize,
    /// Their payload bytes.
    pub bytes: usize,
}

/// A handle to the writer thread. Cheap to clone.
#[derive(Clone)]
pub struct StoreHandle {
    producers: Arc<Producers>,
}

/// Opens (creating if needed) the database at `path` and applies the schema.
pub fn open_writer(path: &Path, sync_full: bool) -> Result<Connection, StoreError> {
    let open = |error| StoreError::Open { path: path.to_owned(), error };
    let mut conn = Connection::open(path).map_err(open)?;
    let mode: String = conn.query_row("PRAGMA journal_mode=WAL", [], |r| r.get(0))?;
    if !mode.eq_ignore_ascii_case("wal") {
        tracing::warn!(mode, "SQLite refused WAL mode; continuing in {mode} mode");
    }
    conn.pragma_update(None, "synchronous", if sync_full { "FULL" } else { "NORMAL" })?;
    conn.busy_timeout(std::time::Duration::from_secs(5))?;
    // A small page cache: the writer appends and reads little (the gateway's RAM budget;
    // at 1,000 vehicles SQLite was 2 MB of the gateway's 8 MB live heap with 1 MiB here).
    conn.pragma_update(None, "cache_size", -512)?;
    schema::migrate(&mut conn)?;
    Ok(conn)
}

impl StoreHandle {
    /// Starts the writer thread on `conn`.
    pub fn start(conn: Connection) -> Result<(StoreHandle, thread::JoinHandle<()>), StoreError> {
        let journal = Arc::new(Journal {
            queue: Mutex::new(Queue {
                pipeline: UnifiedPipeline::new(QUEUE_EVENTS, 1),
                pending: VecDeque::new(),
                bytes: 0,
                producers_gone: false,
                writer_gone: false,
                refusals: RefusalBook::default(),
                records_since: None,
            }),
            work: Condvar::new(),
            room: tokio::sync::Notify::new(),
            tail: std::sync::OnceLock::new(),
        });
        let gone = WriterGone(journal.clone());
        let join = thread::Builder::new()
            .name("store".into())
            .spawn(move || writer(conn, gone))
            .map_err(StoreError::Thread)?;
        Ok((StoreHandle { producers: Arc::new(Producers(journal)) }, join))
    }

    fn journal(&self) -> &Journal {
        &self.producers.0
    }

    /// Queues `events` if the queue has room for them now; the answer comes once they are
    /// durable. Never waits: `Err` gives the events back when the queue is full (offer them
    /// again after [`StoreHandle::room`]); [`StoreHandle::behind`] lets a caller refuse new
    /// work before that.
    pub fn try_append(&self, events: Vec<Event>) -> Result<Durable, Vec<Event>> {
        let (reply, rx) = oneshot::channel();
        match self.journal().try_enqueue(events, Some(reply)) {
            Ok(()) => Ok(rx),
            Err(Refusal::Full(events)) => Err(events),
            Err(Refusal::Never(why, reply)) => {
                if let Some(reply) = reply {
                    let _ = reply.send(Err(why));
                }
                Ok(rx)
            }
        }
    }

    /// Queues `events` without an answer (observations that gate nothing) if the queue has
    /// room for them now; never waits. `Err` gives them back when it is full.
    pub fn try_record(&self, events: Vec<Event>) -> Result<(), Vec<Event>> {
        if events.is_empty() {
            return Ok(());
        }
        let n = events.len();
        match self.journal().try_enqueue(events, None) {
            Ok(()) => Ok(()),
            Err(Refusal::Full(events)) => Err(events),
            Err(Refusal::Never(why, _)) => {
                tracing::error!(events = n, error = %why, "events not recorded");
                Ok(())
            }
        }
    }

    /// [`StoreHandle::try_append`], waiting (asynchronously) for room first.
    pub async fn append(&self, mut events: Vec<Event>) -> Durable {
        loop {
            let room = self.room(events.len(), 0);
            match self.try_append(events) {
                Ok(durable) => return durable,
                Err(back) => events = back,
            }
            room.await;
        }
    }

    /// [`StoreHandle::try_record`], waiting (asynchronously) for room first.
    pub async fn record(&self, mut events: Vec<Event>) {
        loop {
            let room = self.room(events.len(), 0);
            match self.try_record(events) {
                Ok(()) => return,
                Err(back) => events = back,
            }
            room.await;
        }
    }

    /// Resolves once the queue has room for `events` events (of `bytes`), or the writer has
    /// stopped. Owns what it needs: an actor can wait on it without borrowing the handle.
    pub fn room(&self, events: usize, bytes: usize) -> impl std::future::Future<Output = ()> + 'static {
        let producers = self.producers.clone();
        async move {
            let journal = &producers.0;
            loop {
                let notified = journal.room.notified();
                tokio::pin!(notified);
                // Registered before looking, so that a drain in between is not missed.
                notified.as_mut().enable();
                {
                    let q = journal.lock();
                    if q.writer_gone || q.room_for(events, bytes) {
                        return;
                    }
                }
                notified.await;
            }
        }
    }

    /// Records a refused inbound message: its row is queued at once, or, under a flood, it
    /// joins its reason's batch ([`RefusalBook`]). Never waits.
    pub fn refuse(&self, refused: Refused) {
        self.journal().refuse(refused);
    }

    /// Resolves once everything queued before it is durable.
    pub fn flush(&self) -> oneshot::Receiver<()> {
        let (reply, rx) = oneshot::channel();
        self.journal().flush(reply, false);
        rx
    }

    /// [`StoreHandle::flush`], and the WAL copied into the database file and emptied: the
    /// file alone is then the whole log (for whoever copies it after a shutdown).
    pub fn checkpoint(&self) -> oneshot::Receiver<()> {
        let (reply, rx) = oneshot::channel();
        self.journal().flush(reply, true);
        rx
    }

    /// Where the rows of [`StoreHandle::record`] go once durable (set once; later calls
    /// change nothing).
    pub fn set_tail(&self, sink: TailSink) {
        let _ = self.journal().tail.set(sink);
    }

    /// What waits for the writer now.
    pub fn backlog(&self) -> Backlog {
        let q = self.journal().lock();
        Backlog { events: q.pipeline.waiting(), bytes: q.bytes }
    }

    /// The backlog, when it is past half of the queue's bound in events or bytes: the
    /// writer is not keeping up, and new work should be refused rather than queued.
    pub fn behind(&self) -> Option<Backlog> {
        let b = self.backlog();
        (b.events * 2 >= QUEUE_EVENTS || b.bytes * 2 >= QUEUE_BYTES).then_some(b)
    }

    /// The store pipeline's counters (for `status`).
    pub fn counters(&self) -> PipelineCounters {
        self.journal().lock().pipeline.counters()
    }
}

fn writer(mut conn: Connection, journal: WriterGone) {
    while let Some(mut batch) = journal.0.next_batch() {
        match write_batch(&mut conn, &batch) {
            Ok(mut seq) => {
                for req in batch.drain(..) {
                    match req {
                        Request::Append { events, reply: Some(reply) } => {
                            let n = events.len() as u64;
                            let _ = reply.send(Ok(Appended { first_seq: seq, events }));
                            seq += n;
                        }
                        Request::Append { events, reply: None } => {
                            let n = events.len() as u64;
                            if let Some(tail) = journal.0.tail.get() {
                                tail(Appended { first_seq: seq, events });
                            }
                            seq += n;
                        }
                        Request::Flush { reply, checkpoint } => {
                            if checkpoint {
                                let done =
                                    conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |r| r.get::<_, i64>(0));
                                if let Err(e) = done {
                                    tracing::warn!(error = %e, "the WAL could not be checkpointed; the log is whole with it");
                                }
                            }
                            let _ = reply.send(());
                        }
                    }
                }
            }
            Err(e) => {
                tracing::error!(error = %format!("{e:#}"), "event log write failed; the batch's decisions are not carried out");
                for req in batch.drain(..) {
                    match req {
                        Request::Append { reply: Some(reply), .. } => {
                            let _ = reply.send(Err(format!("event log write failed: {e:#}")));
                        }
                        Request::Append { reply: None, .. } => {}
                        Request::Flush { reply, .. } => {
                            let _ = reply.send(());
                        }
                    }
                }
            }
        }
    }
}

/// Appends `events` on `conn` directly, in one transaction: for the start-up recovery,
/// before the writer thread owns the connection.
pub fn append_direct(conn: &mut Connection, events: Vec<Event>) -> Result<(), StoreError> {
    write_batch(conn, &[Request::Append { events, reply: None }])?;
    Ok(())
}

/// The log as the core's [`EventStore`], on one connection of its own: for tools and tests
/// that append and read synchronously (the gateway's writes go through [`StoreHandle`]).
pub struct SqliteStore {
    conn: Connection,
    path: PathBuf,
}

impl SqliteStore {
    /// Opens (creating and migrating if needed) the log at `path`.
    pub fn open(path: &Path, sync_full: bool) -> Result<SqliteStore, StoreError> {
        Ok(SqliteStore { conn: open_writer(path, sync_full)?, path: path.to_owned() })
    }

    fn read(&self, q: &Query) -> Result<Vec<StoredEvent>, StoreError> {
        let mut out = Vec::new();
        for_each_row(&self.conn, &self.path, q, |e| {
            out.push(e);
            Ok::<_, StoreError>(())
        })?;
        Ok(out)
    }
}

impl EventStore for SqliteStore {
    type Error = StoreError;

    fn append(&mut self, events: &[Event]) -> Result<u64, StoreError> {
        write_batch(&mut self.conn, &[Request::Append { events: events.to_vec(), reply: None }])
    }

    fn read_from(&self, from: u64, limit: usize) -> Result<Vec<StoredEvent>, StoreError> {
        self.read(&Query { from_seq: Some(from), limit: Some(limit), ..Query::default() })
    }

    fn read_correlation(&self, id: &str) -> Result<Vec<StoredEvent>, StoreError> {
        self.read(&Query { correlation: Some(id.to_owned()), ..Query::default() })
    }
}

/// Writes every append of `batch` in one transaction, each row chained to the one before.
/// Returns the seq of the first row.
fn write_batch(conn: &mut Connection, batch: &[Request]) -> Result<u64, StoreError> {
    // IMMEDIATE: the next seq and the last hash are read under the write lock, so another
    // writer (`gridweaver compact` on a running gateway's log) cannot slip in between.
    let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    let first = insert_rows(&tx, batch)?;
    tx.commit()?;
    Ok(first)
}

/// Appends every event of `batch` after the last row in `tx`, chained; returns the first
/// seq.
fn insert_rows(tx: &rusqlite::Transaction<'_>, batch: &[Request]) -> Result<u64, StoreError> {
    let next: i64 = tx.query_row("SELECT COALESCE(MAX(seq), 0) + 1 FROM events", [], |r| r.get(0))?;
    let first = u64::try_from(next)?;
    let mut seq = first;
    let mut hash = schema::last_hash(tx)?;
    let mut insert = tx.prepare_cached(
        "INSERT INTO events (seq, ts_ms, kind, correlation_id, actor, region, payload) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
    )?;
    let mut link = tx.prepare_cached("INSERT INTO event_chain (seq, hash) VALUES (?1, ?2)")?;
    for req in batch {
        if let Request::Append { events, .. } = req {
            for e in events {
                let payload = e.payload.as_str();
                let row = schema::RowRef {
                    seq: i64::try_from(seq)?,
                    ts_ms: e.ts.as_millis(),
                    kind: e.kind.as_str(),
                    correlation_id: e.correlation_id.as_deref(),
                    actor: &e.actor,
                    region: e.region.as_deref(),
                    payload,
                };
                insert.execute(params![
                    row.seq,
                    row.ts_ms,
                    row.kind,
                    row.correlation_id,
                    row.actor,
                    row.region,
                    row.payload
                ])?;
                hash = schema::chain_hash(&hash, &row);
                link.execute(params![row.seq, hash])?;
                seq += 1;
            }
        }
    }
    Ok(first)
}

/// Live-tail payloads larger than this are replaced by a note of their size: the tail is
/// QoS 0 and for watching; the full row is in the log (`gridweaver events --correlation`).
/// A large fleet's `DispatchPlanCreated` is hundreds of KB, more than an MQTT packet may be.
pub const TAIL_MAX_PAYLOAD: usize = 16 * 1024;

/// The live-tail JSON of row `seq`, reusing the payload text already rendered for SQLite.
pub fn tail_json(seq: u64, e: &Event) -> String {
    let payload = e.payload.as_str();
    let omitted;
    let payload = if payload.len() > TAIL_MAX_PAYLOAD {
        omitted = format!(r#"{{"omitted_bytes":{},"see":"the event log, seq {seq}"}}"#, payload.len());
        omitted.as_str()
    } else {
        payload
    };
    let quote =
        |s: &Option<String>| s.as_ref().map_or("null".to_owned(), |s| serde_json::Value::from(s.as_str()).to_string());
    format!(
        r#"{{"seq":{seq},"ts_ms":{},"kind":"{}","correlation_id":{},"actor":{},"region":{},"payload":{payload}}}"#,
        e.ts.as_millis(),
        e.kind.as_str(),
        quote(&e.correlation_id),
        serde_json::Value::from(e.actor.as_str()),
        quote(&e.region),
    )
}

/// Filters of `gridweaver events`.
#[derive(Clone, Debug, Default)]
pub struct Query {
    /// Only this kind.
    pub kind: Option<EventKind>,
    /// Only this correlation id.
    pub correlation: Option<String>,
    /// Only events at or after this time (epoch ms).
    pub since_ms: Option<i64>,
    /// Only events at or before this time (epoch ms).
    pub until_ms: Option<i64>,
    /// Only events with at least this seq.
    pub from_seq: Option<u64>,
    /// At most this many.
    pub limit: Option<usize>,
}

/// How much of a log a reader maps into memory: 1 GiB on a 64-bit gateway, 256 MiB on a
/// 32-bit one (its address space is 3 GiB); SQLite reads the rest with `pread`.
const READ_MMAP_BYTES: i64 = if cfg!(target_pointer_width = "64") { 1 << 30 } else { 256 << 20 };

/// A read-only view of an event log.
pub struct Reader {
    conn: Connection,
    path: PathBuf,
}

impl Reader {
    /// Opens `path` read-only; it must exist and hold an `events` table.
    pub fn open(path: &Path) -> Result<Reader, StoreError> {
        if !path.exists() {
            return Err(StoreError::Missing(path.to_owned()));
        }
        let conn =
            Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX)
                .map_err(|error| StoreError::Open { path: path.to_owned(), error })?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        // Reads map the file rather than copy each page (SQLite falls back to reads where
        // it cannot map: a 32-bit gateway's address space).
        conn.pragma_update(None, "mmap_size", READ_MMAP_BYTES)?;
        let has: Option<String> = conn
            .query_row("SELECT name FROM sqlite_master WHERE type = 'table' AND name = 'events'", [], |r| r.get(0))
            .optional()?;
        if has.is_none() {
            return Err(StoreError::NotALog(path.to_owned()));
        }
        Ok(Reader { conn, path: path.to_owned() })
    }

    /// The read-only connection.
    pub fn connection(&self) -> &Connection {
        &self.conn
    }

    /// Calls `f` on every event matching `q`, in seq order, without collecting them.
    pub fn for_each<E: From<StoreError>>(
        &self,
        q: &Query,
        f: impl FnMut(StoredEvent) -> Result<(), E>,
    ) -> Result<(), E> {
        for_each_row(&self.conn, &self.path, q, f)
    }
}

/// Calls `f` on every event of `conn` matching `q`, in seq order, without collecting them.
fn for_each_row<E: From<StoreError>>(
    conn: &Connection,
    path: &Path,
    q: &Query,
    mut f: impl FnMut(StoredEvent) -> Result<(), E>,
) -> Result<(), E> {
    let mut sql = String::from("SELECT seq, ts_ms, kind, correlation_id, actor, region, payload FROM events WHERE 1=1");
    let mut args: Vec<rusqlite::types::Value> = Vec::new();
    if let Some(k) = q.kind {
        sql.push_str(" AND kind = ?");
        args.push(k.as_str().to_owned().into());
    }
    if let Some(c) = &q.correlation {
        sql.push_str(" AND correlation_id = ?");
        args.push(c.clone().into());
    }
    if let Some(t) = q.since_ms {
        sql.push_str(" AND ts_ms >= ?");
        args.push(t.into());
    }
    if let Some(t) = q.until_ms {
        sql.push_str(" AND ts_ms <= ?");
        args.push(t.into());
    }
    // Rows a retention step removed but a compaction cut off while deleting left behind
    // are no longer part of the log.
    let kept_from = schema::last_retention(conn)?.map_or(1, |(through, _, _)| through.saturating_add(1));
    let from = q.from_seq.map_or(1, |s| i64::try_from(s).unwrap_or(i64::MAX)).max(kept_from);
    if from > 1 {
        sql.push_str(" AND seq >= ?");
        args.push(from.into());
    }
    sql.push_str(" ORDER BY seq");
    if let Some(n) = q.limit {
        sql.push_str(" LIMIT ?");
        args.push(i64::try_from(n).unwrap_or(i64::MAX).into());
    }
    let mut stmt = conn.prepare(&sql).map_err(StoreError::from)?;
    let mut rows = stmt.query(rusqlite::params_from_iter(args)).map_err(StoreError::from)?;
    while let Some(r) = rows.next().map_err(StoreError::from)? {
        let payload: String = r.get(6).map_err(StoreError::from)?;
        let seq: i64 = r.get(0).map_err(StoreError::from)?;
        f(StoredEvent {
            seq: u64::try_from(seq).unwrap_or(0),
            ts_ms: r.get(1).map_err(StoreError::from)?,
            kind: r.get(2).map_err(StoreError::from)?,
            correlation_id: r.get(3).map_err(StoreError::from)?,
            actor: r.get(4).map_err(StoreError::from)?,
            region: r.get(5).map_err(StoreError::from)?,
            payload: serde_json::from_str(&payload).map_err(|error| StoreError::BadPayload {
                path: path.to_owned(),
                seq,
                error,
            })?,
        })?;
    }
    Ok(())
}

/// Folds the log at `path` into the projection, in seq order, stopping before the first
/// row stamped after `to` (the whole log without it). A compacted log is folded from its
/// last snapshot on; a `to` before the snapshot is an error. A row the projection cannot
/// read stops the fold with an error when `strict`; otherwise it is logged and skipped (the
/// gateway starts on what it can read rather than not at all). Row by row, reading each
/// payload's text in place: nothing is collected, no JSON tree is built. The reading thread
/// also parses order batches, into buffers its chunks reuse (decoding whole events there was
/// measured slower: glibc frees across threads).
pub fn project(path: &Path, to: Option<Timestamp>, strict: bool) -> Result<DispatchProjection, StoreError> {
    let reader = Reader::open(path)?;
    fold(&reader.conn, path, to, None, strict)
}

/// The state a compacted log starts from (the snapshot of its last retention step), or
/// `None` for a log never compacted.
pub fn snapshot(conn: &Connection, path: &Path) -> Result<Option<ProjectedState>, StoreError> {
    let Some((through_seq, _, seq)) = schema::last_retention(conn)? else { return Ok(None) };
    let fail = |reason: String| StoreError::Snapshot { path: path.to_owned(), through_seq, seq, reason };
    let payload: Option<String> = conn
        .query_row("SELECT payload FROM events WHERE seq = ?1 AND kind = 'LogCompacted'", [seq], |r| r.get(0))
        .optional()?;
    let payload = payload.ok_or_else(|| fail("no such LogCompacted event".into()))?;
    match decode_str(EventKind::LogCompacted.as_str(), &payload) {
        Ok(Decoded::LogCompacted(c)) if i64::try_from(c.through_seq) == Ok(through_seq) => Ok(Some(c.state)),
        Ok(_) => Err(fail("it names another retention step".into())),
        Err(e) => Err(fail(e.to_string())),
    }
}

/// [`project`] on an open connection, through row `through` at most.
fn fold(
    conn: &Connection,
    path: &Path,
    to: Option<Timestamp>,
    through: Option<u64>,
    strict: bool,
) -> Result<DispatchProjection, StoreError> {
    let start = match snapshot(conn, path) {
        Ok(start) => start,
        Err(e) if !strict => {
            tracing::error!(error = %e, "the log's snapshot cannot be read; starting from the rows after it");
            None
        }
        Err(e) => return Err(e),
    };
    let mut projection = match start {
        Some(state) => {
            if let (Some(to), Some(at)) = (to, state.ts) {
                if to < at {
                    return Err(StoreError::Compacted { path: path.to_owned(), through_seq: state.seq, at });
                }
            }
            DispatchProjection::resume(state)
        }
        None => DispatchProjection::new(),
    };
    let after = i64::try_from(projection.state().seq)?;
    let through = through.map_or(Ok(i64::MAX), i64::try_from)?;
    let mut stmt = conn.prepare(
        "SELECT seq, ts_ms, kind, correlation_id, payload FROM events WHERE seq > ?1 AND seq <= ?2 ORDER BY seq",
    )?;
    let mut rows = stmt.query([after, through])?;
    // Two stages on two threads: this one reads rows into chunks, a folder thread decodes
    // and folds them. At most FOLD_CHUNKS chunks are in flight (their buffers come back
    // to be filled again), so memory stays bounded whatever the log's length.
    std::thread::scope(|scope| {
        let (full_tx, full_rx) = std::sync::mpsc::sync_channel::<Chunk>(FOLD_CHUNKS);
        let (empty_tx, empty_rx) = std::sync::mpsc::channel::<Chunk>();
        let folder = scope.spawn(move || {
            for chunk in full_rx {
                for row in &chunk.rows {
                    let (kind, correlation, payload) = chunk.columns(row);
                    if let Some((header, orders)) = &row.sent {
                        let ts = Timestamp::from_millis(row.ts_ms);
                        if projection.apply_sent(row.seq, ts, correlation, *header, chunk.orders(orders.clone())) {
                            continue;
                        }
                        // A vehicle the fleet does not know: the general way below.
                    }
                    match projection.apply_text(row.seq, row.ts_ms, kind, correlation, payload) {
                        Ok(()) => {}
                        Err(error) if strict => return Err(StoreError::Unreadable { path: path.to_owned(), error }),
                        Err(e) => tracing::error!(error = %e, "an event could not be read back; skipped"),
                    }
                }
                let _ = empty_tx.send(chunk);
            }
            Ok(projection)
        });
        let mut chunk = Chunk::default();
        let read = (|| -> Result<(), StoreError> {
            while let Some(r) = rows.next()? {
                let ts_ms: i64 = r.get(1)?;
                if to.is_some_and(|to| ts_ms > to.as_millis()) {
                    break;
                }
                let seq = u64::try_from(r.get::<_, i64>(0)?)?;
                let kind = r.get_ref(2)?.as_str().map_err(|e| StoreError::Sql(e.into()))?;
                let correlation = r.get_ref(3)?.as_str_or_null().map_err(|e| StoreError::Sql(e.into()))?;
                let payload = r.get_ref(4)?.as_str().map_err(|e| StoreError::Sql(e.into()))?;
                match EventKind::parse(kind) {
                    // The fold does not read them: their text is not copied.
                    Some(k) if !projection::folds(k) => chunk.push(seq, ts_ms, kind, correlation, ""),
                    // The orders are parsed here, so the two threads share the work.
                    Some(EventKind::OrderSent) => {
                        chunk.push(seq, ts_ms, kind, correlation, payload);
                        if let Some((header, orders)) = projection::read_sent(payload) {
                            chunk.sent(header, orders);
                        }
                    }
                    _ => chunk.push(seq, ts_ms, kind, correlation, payload),
                }
                if chunk.is_full() {
                    let next = empty_rx.try_recv().map(Chunk::cleared).unwrap_or_default();
                    if full_tx.send(std::mem::replace(&mut chunk, next)).is_err() {
                        // The folder stopped (an unreadable row, strict): its error is the answer.
                        return Ok(());
                    }
                }
            }
            if !chunk.rows.is_empty() {
                let _ = full_tx.send(chunk);
            }
            Ok(())
        })();
        drop(full_tx);
        let folded = folder.join().unwrap_or_else(|panic| std::panic::resume_unwind(panic));
        read?;
        folded
    })
}

/// Chunks of rows between the reader and the folder of [`fold`], at most.
const FOLD_CHUNKS: usize = 4;

/// Rows read and not yet folded: their text columns in one buffer, and the orders of
/// `OrderSent` rows already parsed (vehicle names in a second buffer). Chunks are reused,
/// so the reader allocates nothing per row that the folder frees.
#[derive(Default)]
struct Chunk {
    text: String,
    rows: Vec<ChunkRow>,
    names: String,
    /// Per order: where its vehicle's name ends in `names` (it starts where the one before
    /// ends), and its kW.
    orders: Vec<(usize, f64)>,
}

struct ChunkRow {
    seq: u64,
    ts_ms: i64,
    /// Where the row's text starts in `text`, and where its kind, correlation id (if any)
    /// and payload end.
    start: usize,
    kind_end: usize,
    correlation_end: Option<usize>,
    payload_end: usize,
    /// An `OrderSent` read by the reader: its header and its orders' range in `orders`.
    sent: Option<(SentHeader, std::ops::Range<usize>)>,
}

impl Chunk {
    /// Rows or text in a chunk, at most (whichever comes first).
    const ROWS: usize = 2_048;
    const TEXT: usize = 1 << 20;

    fn push(&mut self, seq: u64, ts_ms: i64, kind: &str, correlation: Option<&str>, payload: &str) {
        let start = self.text.len();
        self.text.push_str(kind);
        let kind_end = self.text.len();
        let correlation_end = correlation.map(|c| {
            self.text.push_str(c);
            self.text.len()
        });
        self.text.push_str(payload);
        let payload_end = self.text.len();
        self.rows.push(ChunkRow { seq, ts_ms, start, kind_end, correlation_end, payload_end, sent: None });
    }

    /// The last row pushed is an `OrderSent` read as `header` and `orders`.
    fn sent(&mut self, header: SentHeader, orders: Vec<(&str, f64)>) {
        let first = self.orders.len();
        for (name, kw) in orders {
            self.names.push_str(name);
            self.orders.push((self.names.len(), kw));
        }
        if let Some(row) = self.rows.last_mut() {
            row.sent = Some((header, first..self.orders.len()));
        }
    }

    /// The orders `range` of an `OrderSent` row, as (vehicle name, kW).
    fn orders(&self, range: std::ops::Range<usize>) -> impl Iterator<Item = (&str, f64)> {
        let start = |i: usize| if i == 0 { 0 } else { self.orders[i - 1].0 };
        range.map(move |i| (&self.names[start(i)..self.orders[i].0], self.orders[i].1))
    }

    fn is_full(&self) -> bool {
        self.rows.len() >= Self::ROWS || self.text.len() >= Self::TEXT
    }

    fn cleared(mut self) -> Self {
        self.text.clear();
        self.rows.clear();
        self.names.clear();
        self.orders.clear();
        self
    }

    /// Kind, correlation id and payload of `row`.
    fn columns(&self, row: &ChunkRow) -> (&str, Option<&str>, &str) {
        let payload_start = row.correlation_end.unwrap_or(row.kind_end);
        let correlation = row.correlation_end.map(|end| &self.text[row.kind_end..end]);
        (&self.text[row.start..row.kind_end], correlation, &self.text[payload_start..row.payload_end])
    }
}

/// What `gridweaver compact` did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Compacted {
    /// Rows removed.
    pub removed: u64,
    /// The last row removed.
    pub through_seq: u64,
    /// The `LogCompacted` row holding the state they folded to.
    pub snapshot_seq: u64,
    /// Its payload's size.
    pub snapshot_bytes: usize,
}

/// Rows [`compact`] deletes per transaction: a running gateway's writes wait for one
/// chunk at most (tens of ms), never for the whole compaction.
const DELETE_CHUNK: i64 = 5_000;

/// `gridweaver compact`: removes every row before the first one stamped at or after
/// `before`. The state those rows fold to is computed on a read snapshot (a running
/// gateway goes on writing meanwhile); then one short transaction appends a
/// `LogCompacted` event (stamped `now`) with that state and records the retention step:
/// from that commit on the log starts at the snapshot, and the rows it covers are deleted
/// in chunks of [`DELETE_CHUNK`]. If that is cut off, the rows left over are disowned
/// (the chain, replay and audit start at the snapshot) and the next `compact` removes them.
/// The projection of the log is the same after as before (but for the last row folded,
/// the new one). `None` when no row is that old. A log that does not match its hash chain,
/// or has a row the projection cannot read, is refused untouched.
pub fn compact(path: &Path, before: Timestamp, now: Timestamp) -> Result<Option<Compacted>, StoreError> {
    drop(Reader::open(path)?); // an existing event log, not a new or foreign file
    let mut conn = open_writer(path, true)?;
    // What an earlier compaction that was cut off left, first.
    let leftover = remove_retained(&mut conn)?;
    let Some((step, retained)) = retention_step(&mut conn, path, before)? else {
        if leftover == 0 {
            return Ok(None);
        }
        // Only the earlier step's rows went: say so.
        let Some((through, _, snapshot_seq)) = schema::last_retention(&conn)? else { return Ok(None) };
        let bytes: i64 =
            conn.query_row("SELECT length(payload) FROM events WHERE seq = ?1", [snapshot_seq], |r| r.get(0))?;
        return Ok(Some(Compacted {
            removed: leftover,
            through_seq: u64::try_from(through)?,
            snapshot_seq: u64::try_from(snapshot_seq)?,
            snapshot_bytes: usize::try_from(bytes)?,
        }));
    };
    let (through_seq, snapshot_seq, snapshot_bytes) = record_retention(&mut conn, path, step, retained, now)?;
    let removed = leftover + remove_retained(&mut conn)?;
    Ok(Some(Compacted { removed, through_seq, snapshot_seq, snapshot_bytes }))
}

/// Appends the `LogCompacted` event of `step` and its retention row in one short
/// transaction, unless another compaction recorded a step since `retained` was read.
/// Returns the step's `through_seq`, the event's seq and its payload's size.
fn record_retention(
    conn: &mut Connection,
    path: &Path,
    step: LogCompacted,
    retained: Option<i64>,
    now: Timestamp,
) -> Result<(u64, u64, usize), StoreError> {
    let through = i64::try_from(step.through_seq)?;
    let anchor = step.anchor.clone();
    let event = Event::of(now, "compact", &step);
    let bytes = event.payload.len();
    let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    if schema::last_retention(&tx)?.map(|(t, _, _)| t) != retained {
        return Err(StoreError::Concurrent(path.to_owned()));
    }
    let snapshot_seq = insert_rows(&tx, &[Request::Append { events: vec![event], reply: None }])?;
    tx.execute(
        "INSERT INTO retention (through_seq, anchor, snapshot_seq, ts_ms) VALUES (?1, ?2, ?3, ?4)",
        params![through, anchor, i64::try_from(snapshot_seq)?, now.as_millis()],
    )?;
    tx.commit()?;
    Ok((step.through_seq, snapshot_seq, bytes))
}

/// The retention step for `before`, computed in one read transaction (the chain verified,
/// the rows folded), with the retention step it follows; `None` when no row is that old.
fn retention_step(
    conn: &mut Connection,
    path: &Path,
    before: Timestamp,
) -> Result<Option<(LogCompacted, Option<i64>)>, StoreError> {
    let read = conn.transaction()?;
    let retained = schema::last_retention(&read)?.map(|(t, _, _)| t);
    if let Err(error) = schema::verify_chain(&read)? {
        return Err(StoreError::Broken { path: path.to_owned(), error });
    }
    let after = retained.unwrap_or(0);
    let (first, through): (Option<i64>, Option<i64>) = read.query_row(
        "SELECT MIN(seq), COALESCE((SELECT MIN(seq) FROM events WHERE seq > ?2 AND ts_ms >= ?1), MAX(seq) + 1) - 1
         FROM events WHERE seq > ?2",
        params![before.as_millis(), after],
        |r| Ok((r.get(0)?, r.get(1)?)),
    )?;
    let (Some(first), Some(through)) = (first, through) else { return Ok(None) };
    if through < first {
        return Ok(None);
    }
    let state = fold(&read, path, None, Some(u64::try_from(through)?), true)?.into_state();
    let anchor: String = read.query_row("SELECT hash FROM event_chain WHERE seq = ?1", [through], |r| r.get(0))?;
    let removed = u64::try_from(through - first + 1)?;
    let step = LogCompacted { before, through_seq: u64::try_from(through)?, removed, anchor, state };
    Ok(Some((step, retained)))
}

/// Deletes the rows (and their chain hashes) that the last retention step covers and that
/// are still there, [`DELETE_CHUNK`] per transaction; returns how many.
fn remove_retained(conn: &mut Connection) -> Result<u64, StoreError> {
    let Some((through, _, _)) = schema::last_retention(conn)? else { return Ok(0) };
    let mut removed = 0u64;
    loop {
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let low: Option<i64> = tx.query_row(
            "SELECT MIN(s) FROM (SELECT MIN(seq) AS s FROM events UNION ALL SELECT MIN(seq) FROM event_chain)",
            [],
            |r| r.get(0),
        )?;
        let Some(low) = low.filter(|&l| l <= through) else { return Ok(removed) };
        let high = through.min(low.saturating_add(DELETE_CHUNK - 1));
        tx.execute("DELETE FROM event_chain WHERE seq BETWEEN ?1 AND ?2", [low, high])?;
        removed += tx.execute("DELETE FROM events WHERE seq BETWEEN ?1 AND ?2", [low, high])? as u64;
        tx.commit()?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use gridweaver_core::time::Timestamp;

    fn ev(kind: EventKind, corr: &str, payload: serde_json::Value) -> Event {
        Event::new(Timestamp::from_millis(1_000), kind, "dispatcher").correlation(corr).payload(payload)
    }

    #[tokio::test]
    async fn appends_are_numbered_without_gaps_durable_and_append_only() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log.db");
        let (store, join) = StoreHandle::start(open_writer(&path, true).unwrap()).unwrap();
        let signal = serde_json::json!({"v": 1, "id": "s1", "type": "afrr", "direction": "up", "power_kw": 5.0,
            "start": "2026-12-01T00:00:00Z", "duration_s": 60});
        let a = store.append(vec![ev(EventKind::SignalReceived, "d1", signal)]).await;
        store.record(vec![ev(EventKind::AckReceived, "d1", serde_json::json!({}))]).await;
        let b = store
            .append(vec![
                ev(
                    EventKind::DispatchPlanCreated,
                    "d1",
                    serde_json::json!({"v": 2, "dispatch_id": "d1", "signal_id": "s1",
                "strategy": "equal", "note": null, "solver": null, "weights": null, "predicted_availability": [],
                "fallback": "noop", "target_kw": 5.0, "allocated_kw": 3.5, "rounds": 1, "limit_loads": []}),
                ),
                ev(EventKind::OrderSent, "d1", serde_json::json!({"power_kw": 3.5})),
            ])
            .await;
        let (a, b) = (a.await.unwrap().unwrap(), b.await.unwrap().unwrap());
        assert_eq!((a.first_seq, b.first_seq), (1, 3));
        let row: serde_json::Value = serde_json::from_str(&tail_json(b.first_seq + 1, &b.events[1])).unwrap();
        assert_eq!((row["seq"].as_u64(), row["kind"].as_str()), (Some(4), Some("OrderSent")));
        assert_eq!(row["payload"]["power_kw"], 3.5);
        drop(store);
        join.join().unwrap();

        let conn = Connection::open(&path).unwrap();
        assert!(conn.execute("UPDATE events SET kind = 'x'", []).is_err());
        assert!(conn.execute("DELETE FROM events", []).is_err());
        let state = project(&path, None, false).unwrap().into_state();
        assert_eq!(state.signal_ids, vec!["s1".to_owned()]);
        assert_eq!(state.unfinished(), vec![(gridweaver_core::model::DispatchId::from("d1"), "s1".to_owned())]);
        let strict = project(&path, None, true).err().unwrap().to_string();
        assert!(strict.contains("event 2: AckReceived payload"), "the empty ACK row is named: {strict}");

        let reader = Reader::open(&path).unwrap();
        let mut seqs = Vec::new();
        reader
            .for_each(&Query { kind: Some(EventKind::OrderSent), ..Query::default() }, |e| {
                seqs.push(e.seq);
                Ok::<_, StoreError>(())
            })
            .unwrap();
        assert_eq!(seqs, vec![4]);
    }

    /// `gridweaver compact` on the log of a running gateway: the writer's next rows follow
    /// the snapshot, chained.
    #[tokio::test]
    async fn a_running_writer_goes_on_after_a_compaction() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log.db");
        let (store, join) = StoreHandle::start(open_writer(&path, false).unwrap()).unwrap();
        let recovered = |ms| {
            let p = gridweaver_core::events::payload::LogRecovered {
                error: "x".into(),
                failed_since: Timestamp::from_millis(ms),
                signals_refused: 0,
            };
            Event::of(Timestamp::from_millis(ms), "gateway", &p)
        };
        store.append(vec![recovered(1_000), recovered(2_000)]).await.await.unwrap().unwrap();
        let c = compact(&path, Timestamp::from_millis(1_500), Timestamp::from_millis(3_000)).unwrap().unwrap();
        assert_eq!((c.removed, c.snapshot_seq), (1, 3));
        let next = store.append(vec![recovered(4_000)]).await.await.unwrap().unwrap();
        assert_eq!(next.first_seq, 4);
        drop(store);
        join.join().unwrap();
        let conn = Connection::open(&path).unwrap();
        assert_eq!(schema::verify_chain(&conn).unwrap(), Ok(3));
    }

    /// A writer that cannot write (another connection holds the write lock): the queue
    /// says it is behind once half full; past its bound an append is refused at once (the
    /// events come back, nothing waits), and one that waits for room asynchronously goes in
    /// once the writer goes on; then every row is there, in order. Refusals meanwhile are
    /// counted in a batch, never lost, and never wait either.
    #[test]
    fn a_writer_that_falls_behind_refuses_appends_past_its_bound_without_blocking_and_drops_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log.db");
        let (store, join) = StoreHandle::start(open_writer(&path, false).unwrap()).unwrap();
        let blocker = Connection::open(&path).unwrap();
        blocker.execute_batch("BEGIN IMMEDIATE").unwrap();
        let row = |i: usize| ev(EventKind::LogRecovered, "probe", serde_json::json!({ "i": i }));
        // The first step is taken by the writer, which then waits for the lock.
        store.try_record(vec![row(0)]).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(100));
        let mut sent = 1;
        while store.behind().is_none() {
            store.try_record((sent..sent + 64).map(row).collect()).unwrap();
            sent += 64;
        }
        let backlog = store.behind().unwrap();
        assert!(backlog.events >= QUEUE_EVENTS / 2 && backlog.events <= sent, "{backlog:?}");
        // Fill it to its bound: the next step is refused at once and given back whole.
        while store.backlog().events + 64 <= QUEUE_EVENTS {
            store.try_record((sent..sent + 64).map(row).collect()).unwrap();
            sent += 64;
        }
        let started = std::time::Instant::now();
        let back = store.try_append((sent..sent + 64).map(row).collect()).unwrap_err();
        assert_eq!(back.len(), 64);
        assert!(started.elapsed() < std::time::Duration::from_millis(50), "a full queue answers at once");
        for i in 0..1_000 {
            let rejected = gridweaver_core::wire::rejected(EventKind::SignalRejected, "p/signals", "busy", b"{}");
            store.refuse(Refused {
                kind: EventKind::SignalRejected,
                actor: "dispatcher".into(),
                region: None,
                correlation: None,
                reason: "log_behind".into(),
                reference: Some(format!("s{i}")),
                rejected,
                at: crate::clock::now(),
            });
        }
        assert!(started.elapsed() < std::time::Duration::from_millis(500), "refusals never wait");
        assert!(store.backlog().events <= QUEUE_EVENTS);
        // A producer that waits for room (asynchronously) goes in once the writer goes on.
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let waiting = std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_millis(200));
            blocker.execute_batch("ROLLBACK").unwrap();
        });
        let durable = rt.block_on(store.append(back));
        rt.block_on(durable).unwrap().unwrap();
        waiting.join().unwrap();
        sent += 64;
        let flushed = store.flush();
        flushed.blocking_recv().unwrap();
        drop(store);
        join.join().unwrap();
        let conn = Connection::open(&path).unwrap();
        let (rows, last): (i64, String) = conn
            .query_row(
                "SELECT COUNT(*), (SELECT payload FROM events WHERE kind = 'LogRecovered' ORDER BY seq DESC LIMIT 1)
                 FROM events WHERE kind = 'LogRecovered'",
                [],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .unwrap();
        assert_eq!(rows as usize, sent);
        assert_eq!(last, format!("{{\"i\":{}}}", sent - 1));
        let refused: i64 = conn
            .query_row(
                "SELECT SUM(COALESCE(json_extract(payload, '$.count'), 1)) FROM events WHERE kind = 'SignalRejected'",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(refused, 1_000, "every refusal is counted");
        let refusal_rows: i64 =
            conn.query_row("SELECT COUNT(*) FROM events WHERE kind = 'SignalRejected'", [], |r| r.get(0)).unwrap();
        assert!(refusal_rows <= 2, "{refusal_rows} rows for 1,000 refusals of one reason");
        assert!(schema::verify_chain(&conn).unwrap().is_ok());
    }

    #[test]
    fn the_live_tail_omits_payloads_too_large_for_an_mqtt_packet() {
        let big = ev(EventKind::DispatchPlanCreated, "d1", serde_json::json!({"pad": "x".repeat(TAIL_MAX_PAYLOAD)}));
        let row: serde_json::Value = serde_json::from_str(&tail_json(7, &big)).unwrap();
        assert_eq!(row["seq"], 7);
        assert_eq!(row["payload"]["omitted_bytes"].as_u64(), Some(big.payload.len() as u64));
        let small = ev(EventKind::OrderSent, "d1", serde_json::json!({"power_kw": 1.5}));
        let row: serde_json::Value = serde_json::from_str(&tail_json(8, &small)).unwrap();
        assert_eq!(row["payload"]["power_kw"], 1.5);
    }

    #[test]
    fn a_missing_or_foreign_file_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let missing = Reader::open(&dir.path().join("nope.db")).err().unwrap().to_string();
        assert!(missing.contains("no event log"), "{missing}");
        let other = dir.path().join("other.db");
        Connection::open(&other).unwrap().execute_batch("CREATE TABLE t (x INTEGER)").unwrap();
        let foreign = Reader::open(&other).err().unwrap().to_string();
        assert!(foreign.contains("no `events` table"), "{foreign}");
    }
}

#[cfg(test)]
mod schema_tests {
    use super::schema::{self, ChainBreak};
    use super::*;

    /// A log as a version 1 gateway left it: the contract's table, no schema version, rows
    /// of the fixture file.
    fn v1_log(path: &Path) {
        let conn = Connection::open(path).unwrap();
        conn.execute_batch(
            "CREATE TABLE events (seq INTEGER PRIMARY KEY, ts_ms INTEGER NOT NULL, kind TEXT NOT NULL,
               correlation_id TEXT, actor TEXT NOT NULL, region TEXT, payload TEXT NOT NULL);",
        )
        .unwrap();
        let rows = include_str!("../../../tests/fixtures/events-v1.jsonl");
        for (i, line) in rows.lines().enumerate() {
            let r: StoredEvent = serde_json::from_str(line).unwrap();
            conn.execute(
                "INSERT INTO events VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                params![i as i64 + 1, r.ts_ms, r.kind, r.correlation_id, r.actor, r.region, r.payload.to_string()],
            )
            .unwrap();
        }
    }

    #[test]
    fn a_version_1_log_is_migrated_chained_and_readable_through_the_views() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("old.db");
        v1_log(&path);
        let mut conn = open_writer(&path, false).unwrap();
        let version: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0)).unwrap();
        assert_eq!(version, schema::VERSION);
        assert_eq!(schema::verify_chain(&conn).unwrap(), Ok(29), "every old row is chained");
        let orders: i64 = conn.query_row("SELECT COUNT(*) FROM orders", [], |r| r.get(0)).unwrap();
        assert_eq!(orders, 2, "both version 1 OrderSent rows");
        let count = |sql: &str| -> i64 { conn.query_row(sql, [], |r| r.get(0)).unwrap() };
        assert_eq!(count("SELECT COUNT(*) FROM answers WHERE answer = 'accepted'"), 2);
        assert_eq!(count("SELECT COUNT(*) FROM answers WHERE answer = 'timed_out'"), 2);
        assert_eq!(count("SELECT COUNT(*) FROM cancellations"), 2);
        assert_eq!(count("SELECT COUNT(*) FROM dispatches WHERE delivered_kw > 0"), 2);
        // New rows follow the chain, and the projection reads old and new alike.
        let e = Event::of(
            Timestamp::from_millis(5),
            "gateway",
            &gridweaver_core::events::payload::LogRecovered {
                error: "x".into(),
                failed_since: Timestamp::from_millis(1),
                signals_refused: 0,
            },
        );
        append_direct(&mut conn, vec![e]).unwrap();
        assert_eq!(schema::verify_chain(&conn).unwrap(), Ok(30));
        assert!(project(&path, None, true).is_ok());
        drop(conn);
        // Opening again changes nothing.
        let conn = open_writer(&path, false).unwrap();
        assert_eq!(schema::verify_chain(&conn).unwrap(), Ok(30));
    }

    #[test]
    fn an_edited_or_removed_row_breaks_the_chain_at_that_row() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log.db");
        v1_log(&path);
        let conn = open_writer(&path, false).unwrap();
        // Someone with write access drops the triggers and edits a row.
        conn.execute_batch(
            "DROP TRIGGER events_no_update; DROP TRIGGER events_no_delete;
             UPDATE events SET payload = replace(payload, '80.0', '8.0') WHERE seq = 11",
        )
        .unwrap();
        assert_eq!(schema::verify_chain(&conn).unwrap(), Err(ChainBreak::Mismatch(11)));
        let path2 = dir.path().join("log2.db");
        v1_log(&path2);
        let conn = open_writer(&path2, false).unwrap();
        conn.execute_batch("DROP TRIGGER events_no_delete; DELETE FROM events WHERE seq = 7").unwrap();
        assert_eq!(schema::verify_chain(&conn).unwrap(), Err(ChainBreak::Missing(7)));
        conn.execute("INSERT INTO events VALUES (100, 1, 'LogRecovered', NULL, 'me', NULL, '{}')", []).unwrap();
        assert_eq!(schema::verify_chain(&conn).unwrap(), Err(ChainBreak::Unchained(100)));
    }

    /// A compaction cut off after its step was recorded, before every row it covers was
    /// deleted: the leftover rows are disowned (chain, projection, audit start at the
    /// snapshot) and the next `compact` removes them first.
    #[test]
    fn a_compaction_cut_off_while_deleting_leaves_a_whole_log() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("v1.db");
        v1_log(&path);
        let mut conn = open_writer(&path, false).unwrap();
        let whole = project(&path, None, true).unwrap().into_state();
        let mid: i64 = conn.query_row("SELECT ts_ms FROM events WHERE seq = 15", [], |r| r.get(0)).unwrap();
        let now = Timestamp::from_millis(whole.ts.unwrap().as_millis() + 60_000);
        let (step, retained) = retention_step(&mut conn, &path, Timestamp::from_millis(mid)).unwrap().unwrap();
        let removed = step.removed;
        let (through, snapshot_seq, _) = record_retention(&mut conn, &path, step, retained, now).unwrap();
        // Cut off after one chunk's worth: here, after deleting a single row.
        conn.execute("DELETE FROM events WHERE seq = 1", []).unwrap();
        conn.execute("DELETE FROM event_chain WHERE seq = 1", []).unwrap();
        let left: i64 = conn.query_row("SELECT COUNT(*) FROM events WHERE seq <= ?1", [through], |r| r.get(0)).unwrap();
        assert_eq!(left as u64, removed - 1);
        assert_eq!(schema::verify_chain(&conn).unwrap(), Ok(29 - through + 1), "the chain starts at the anchor");
        let mut after = project(&path, None, true).unwrap().into_state();
        assert_eq!(after.seq, snapshot_seq);
        (after.seq, after.ts) = (whole.seq, whole.ts);
        assert_eq!(after, whole, "the projection starts at the snapshot");
        // Readers and the views see the log from the retention step on, not what is left.
        let mut seen = Vec::new();
        for from_seq in [None, Some(1)] {
            let q = Query { from_seq, ..Query::default() };
            Reader::open(&path)
                .unwrap()
                .for_each(&q, |e| {
                    seen.push(e.seq);
                    Ok::<_, StoreError>(())
                })
                .unwrap();
        }
        assert!(!seen.is_empty() && seen.iter().all(|s| *s > through), "{seen:?}");
        let count = |sql: &str| conn.query_row(sql, [through], |r| r.get::<_, i64>(0)).unwrap();
        assert_eq!(count("SELECT COUNT(*) FROM kept_events WHERE seq <= ?1"), 0);
        assert!(count("SELECT COUNT(*) FROM events WHERE seq <= ?1 AND kind = 'OrderSent'") > 0);
        assert_eq!(count("SELECT COUNT(*) FROM orders WHERE sent_seq <= ?1"), 0);
        drop(conn);
        let c = compact(&path, Timestamp::from_millis(mid), now.plus_millis(1)).unwrap().unwrap();
        assert_eq!((c.removed, c.through_seq, c.snapshot_seq), (removed - 1, through, snapshot_seq));
        let conn = Connection::open(&path).unwrap();
        let first: i64 = conn.query_row("SELECT MIN(seq) FROM events", [], |r| r.get(0)).unwrap();
        assert_eq!(first as u64, through + 1);
        assert_eq!(schema::verify_chain(&conn).unwrap(), Ok(29 - through + 1));
    }

    /// Compaction at every time the log holds: the projection is the one before (but for
    /// the last row folded, the snapshot's), the chain holds from the anchor, new rows
    /// follow, a second compaction goes on from the first, and nothing else may delete.
    #[test]
    fn compaction_keeps_the_projection_and_the_chain() {
        let dir = tempfile::tempdir().unwrap();
        let original = dir.path().join("v1.db");
        v1_log(&original);
        drop(open_writer(&original, false).unwrap());
        let whole = project(&original, None, true).unwrap().into_state();
        let times: std::collections::BTreeSet<i64> = {
            let conn = Connection::open(&original).unwrap();
            let mut stmt = conn.prepare("SELECT ts_ms FROM events").unwrap();
            stmt.query_map([], |r| r.get(0)).unwrap().map(Result::unwrap).collect()
        };
        let last = *times.last().unwrap();
        let now = Timestamp::from_millis(last + 60_000);
        for (i, t) in times.iter().skip(1).chain([&(last + 1)]).enumerate() {
            let path = dir.path().join(format!("c{i}.db"));
            std::fs::copy(&original, &path).unwrap();
            let c = compact(&path, Timestamp::from_millis(*t), now).unwrap().expect("rows before it");
            let conn = Connection::open(&path).unwrap();
            let first: i64 = conn.query_row("SELECT MIN(seq) FROM events", [], |r| r.get(0)).unwrap();
            let older: i64 = conn
                .query_row("SELECT COUNT(*) FROM events WHERE ts_ms < ?1 AND kind != 'LogCompacted'", [t], |r| r.get(0))
                .unwrap();
            assert_eq!((first as u64, older), (c.through_seq + 1, 0), "at {t}: every older row went, no newer one");
            assert_eq!(schema::verify_chain(&conn).unwrap(), Ok(29 - c.removed + 1), "at {t}");
            let mut after = project(&path, None, true).unwrap().into_state();
            assert_eq!((after.seq, after.ts), (c.snapshot_seq, Some(now)));
            (after.seq, after.ts) = (whole.seq, whole.ts);
            assert_eq!(after, whole, "compacted before {t}");
            // Replay cannot reach back before the snapshot.
            let early = project(&path, Some(Timestamp::from_millis(times.first().unwrap() - 1)), true);
            assert!(matches!(early, Err(StoreError::Compacted { .. })), "at {t}");
            // Only rows a retention step covers may go.
            assert!(conn.execute("DELETE FROM events WHERE seq = ?1", [c.snapshot_seq]).is_err());
            assert!(conn.execute("DELETE FROM retention", []).is_err());
        }
        // New rows chain on; a second compaction goes on from the first.
        let path = dir.path().join("twice.db");
        std::fs::copy(&original, &path).unwrap();
        let mid = *times.iter().nth(times.len() / 2).unwrap();
        let first = compact(&path, Timestamp::from_millis(mid), now).unwrap().unwrap();
        let mut conn = open_writer(&path, false).unwrap();
        let recovered =
            gridweaver_core::events::payload::LogRecovered { error: "x".into(), failed_since: now, signals_refused: 3 };
        append_direct(&mut conn, vec![Event::of(now.plus_millis(1), "gateway", &recovered)]).unwrap();
        assert_eq!(schema::verify_chain(&conn).unwrap(), Ok(29 - first.removed + 2));
        let before_second = project(&path, None, true).unwrap().into_state();
        let second = compact(&path, now.plus_millis(1), now.plus_millis(2)).unwrap().unwrap();
        assert_eq!(second.through_seq, first.snapshot_seq, "the first snapshot goes too");
        assert_eq!(schema::verify_chain(&conn).unwrap(), Ok(2));
        let mut after = project(&path, None, true).unwrap().into_state();
        (after.seq, after.ts) = (before_second.seq, before_second.ts);
        assert_eq!(after, before_second);
        assert_eq!(compact(&path, Timestamp::from_millis(1), now).unwrap(), None, "nothing that old is left");
    }

    #[test]
    fn a_log_that_breaks_its_chain_or_its_retention_record_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log.db");
        v1_log(&path);
        let conn = open_writer(&path, false).unwrap();
        conn.execute_batch("DROP TRIGGER events_no_update; UPDATE events SET actor = 'me' WHERE seq = 3").unwrap();
        let refused = compact(&path, Timestamp::from_millis(i64::MAX), Timestamp::from_millis(0)).err().unwrap();
        assert!(refused.to_string().contains("event 3 does not match"), "{refused}");
        let rows: i64 = conn.query_row("SELECT COUNT(*) FROM events", [], |r| r.get(0)).unwrap();
        assert_eq!(rows, 29, "nothing removed");

        // Rows removed with their hashes but no retention step; then a forged step.
        let path = dir.path().join("cut.db");
        v1_log(&path);
        let conn = open_writer(&path, false).unwrap();
        conn.execute_batch(
            "DROP TRIGGER events_no_delete; DROP TRIGGER event_chain_no_delete;
             DELETE FROM events WHERE seq <= 5; DELETE FROM event_chain WHERE seq <= 5",
        )
        .unwrap();
        assert_eq!(schema::verify_chain(&conn).unwrap(), Err(ChainBreak::Truncated(6)));
        conn.execute("INSERT INTO retention VALUES (5, 'x', 6, 0)", []).unwrap();
        assert_eq!(schema::verify_chain(&conn).unwrap(), Err(ChainBreak::Retention(5)));
    }

    #[test]
    fn a_log_from_a_newer_build_is_refused_untouched() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("new.db");
        Connection::open(&path).unwrap().execute_batch("PRAGMA user_version = 99").unwrap();
        let err = open_writer(&path, false).err().unwrap().to_string();
        assert!(err.contains("schema version 99"), "{err}");
    }
}

#[cfg(test)]
mod event_store_tests {
    use super::*;
    use gridweaver_core::events::{EventStore, MemoryStore};

    /// The SQLite store and the in-memory one answer alike: seq from 1 without gaps,
    /// `read_from` with a limit, `read_correlation`; and the SQLite one chains its rows.
    #[test]
    fn the_sqlite_store_is_an_event_store_like_the_memory_one() {
        let dir = tempfile::tempdir().unwrap();
        let mut sqlite = SqliteStore::open(&dir.path().join("log.db"), true).unwrap();
        let mut memory = MemoryStore::default();
        let t = Timestamp::from_millis(5);
        let batches = [
            vec![Event::new(t, EventKind::SignalReceived, "dispatcher").correlation("d1")],
            vec![
                Event::new(t, EventKind::OrderSent, "dispatcher").correlation("d2"),
                Event::new(t, EventKind::OrderSent, "dispatcher").correlation("d1"),
                Event::new(t, EventKind::LogRecovered, "dispatcher"),
            ],
        ];
        for b in &batches {
            assert_eq!(sqlite.append(b).unwrap(), memory.append(b).unwrap());
        }
        assert_eq!(sqlite.read_from(2, 2).unwrap(), memory.read_from(2, 2).unwrap());
        assert_eq!(sqlite.read_from(1, 100).unwrap().len(), 4);
        assert_eq!(sqlite.read_correlation("d1").unwrap(), memory.read_correlation("d1").unwrap());
        assert_eq!(schema::verify_chain(&sqlite.conn).unwrap(), Ok(4));
    }
}

#[cfg(test)]
mod replay_tests {
    use super::*;

    /// `project` reads rows on one thread and folds them on another, order batches parsed
    /// by the reader: it must give what folding every row the general way gives, whole and
    /// to a time, over chunks of many rows.
    #[test]
    fn replay_folds_a_run_as_its_rows_fold_one_by_one() {
        use gridweaver_core::config::Config;
        use gridweaver_core::events::payload::ConfigRecorded;
        use gridweaver_core::model::{Ack, AckStatus, Direction, Signal, SignalType, Vehicle};
        use gridweaver_core::replay::build;

        let cfg = Config::from_yaml("site: t\nstore: { path: x.db }\ndispatch: { ack_timeout_seconds: 1 }\n").unwrap();
        let mut engine = build::engine(&cfg, &ProjectedState::default()).unwrap();
        let t0 = Timestamp::from_millis(1_795_000_000_000);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("run.db");
        let mut conn = open_writer(&path, true).unwrap();
        let mut fleet = Vec::new();
        let mut events = vec![Event::of(t0, "gateway", &ConfigRecorded::of(&cfg))];
        // One name that JSON escapes: its orders cannot be read in place.
        for (i, name) in (0..30).map(|i| format!("ev{i}")).chain([r#"ev"q\"#.to_owned()]).enumerate() {
            let v = Vehicle::new(name, 0.2 + 0.02 * i as f64, 60.0, 7.0 + i as f64 / 3.0);
            events.extend(engine.on_state(t0, v.id.clone(), Some(v.clone())).1);
            fleet.push(v);
        }
        append_direct(&mut conn, events).unwrap();
        let mut middle = t0;
        for k in 0..800u64 {
            let now = t0.plus_millis(2_000 * (k as i64 + 1));
            let mut batch = Vec::new();
            if k % 50 == 25 {
                // A vehicle leaves with orders in force (they are released), and comes back.
                let v = &fleet[(k as usize / 50) % fleet.len()];
                batch.extend(engine.on_state(now, v.id.clone(), None).1);
                batch.extend(engine.on_state(now, v.id.clone(), Some(v.clone())).1);
            }
            let direction = if k % 3 == 0 { Direction::Down } else { Direction::Up };
            let signal = Signal::new(format!("s{k}"), SignalType::ALL[(k % 5) as usize], direction, 40.0, now);
            let step = engine.on_signal(now, Signal { duration_s: 1 + k % 5, ..signal }).unwrap();
            batch.extend(step.events);
            // The last dispatch is left in flight.
            for (j, o) in step.orders.iter().enumerate().filter(|_| k < 799) {
                let status = if (j as u64 + k).is_multiple_of(7) { AckStatus::Rejected } else { AckStatus::Accepted };
                let ack = Ack { order_id: o.order_id.to_string(), status, reason: None };
                let Ok(mut answered) = engine.on_ack(now.plus_millis(20), &o.vehicle_id, &ack) else { continue };
                batch.append(&mut answered.events);
                for o in std::mem::take(&mut answered.orders) {
                    let ack = Ack { order_id: o.order_id.to_string(), status: AckStatus::Accepted, reason: None };
                    batch.extend(
                        engine.on_ack(now.plus_millis(40), &o.vehicle_id, &ack).map(|s| s.events).unwrap_or_default(),
                    );
                }
            }
            append_direct(&mut conn, batch).unwrap();
            if k == 400 {
                middle = now.plus_millis(30);
            }
        }
        drop(conn);
        let mut rows = Vec::new();
        Reader::open(&path)
            .unwrap()
            .for_each(&Query::default(), |row| {
                rows.push(row);
                Ok::<_, StoreError>(())
            })
            .unwrap();
        assert!(rows.len() > 3 * Chunk::ROWS, "{} rows: several chunks", rows.len());
        let fold = |to: Option<Timestamp>| {
            let mut p = DispatchProjection::new();
            for row in rows.iter().filter(|r| to.is_none_or(|to| r.ts_ms <= to.as_millis())) {
                p.apply(row).unwrap();
            }
            p.into_state()
        };
        let whole = project(&path, None, true).unwrap().into_state();
        assert!(!whole.in_flight.is_empty() && !whole.commitments.is_empty() && whole.settled == 799);
        assert_eq!(whole, fold(None));
        assert_eq!(project(&path, Some(middle), true).unwrap().into_state(), fold(Some(middle)));
    }
}
