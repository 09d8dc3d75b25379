//! The event log in SQLite: one writer thread (the StoreActor) and read-only readers.
//!
//! The writer owns the only read-write [`rusqlite::Connection`]. Callers send batches of
//! events through a bounded channel ([`StoreHandle::append`]); the thread drains every
//! batch waiting, writes them all in one transaction (group commit), commits, and only
//! then answers each caller with the seq numbers it got and the rows rendered as JSON for
//! the `<p>/events` live tail. A caller that publishes orders after its answer therefore
//! never publishes a decision that is not durable.
//!
//! The table is the contract's `events` table. Triggers refuse UPDATE and DELETE, so the
//! log is append-only even against a careless `sqlite3` session.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::thread;

use gridweaver_core::allocation::Weights;
use gridweaver_core::events::{Event, EventKind, StoredEvent};
use gridweaver_core::learning::tuning::WeightsChange;
use gridweaver_core::model::{Order, SignalType, VehicleId};
use gridweaver_core::time::Timestamp;
use rusqlite::{params, Connection, OpenFlags, OptionalExtension};
use tokio::sync::oneshot;

/// The schema: the contract's table, indexes for the CLI's filters, append-only triggers.
const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS events (
  seq            INTEGER PRIMARY KEY,
  ts_ms          INTEGER NOT NULL,
  kind           TEXT    NOT NULL,
  correlation_id TEXT,
  actor          TEXT    NOT NULL,
  region         TEXT,
  payload        TEXT    NOT NULL
);
CREATE INDEX IF NOT EXISTS events_by_correlation ON events (correlation_id);
CREATE INDEX IF NOT EXISTS events_by_kind ON events (kind);
CREATE TRIGGER IF NOT EXISTS events_no_update BEFORE UPDATE ON events
  BEGIN SELECT RAISE(ABORT, 'the events table is append-only'); END;
CREATE TRIGGER IF NOT EXISTS events_no_delete BEFORE DELETE ON events
  BEGIN SELECT RAISE(ABORT, 'the events table is append-only'); END;
";

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
    /// A read or write failed.
    #[error("event log: {0}")]
    Sql(#[from] rusqlite::Error),
    /// More rows than a seq can number.
    #[error("event log: seq out of range")]
    SeqOverflow,
    /// The writer thread could not be started.
    #[error("cannot start the store thread: {0}")]
    Thread(std::io::Error),
}

impl From<std::num::TryFromIntError> for StoreError {
    fn from(_: std::num::TryFromIntError) -> Self {
        StoreError::SeqOverflow
    }
}

/// Requests queued to the writer; the queue holds at most this many (each request is a
/// batch of events; the channel's slots are allocated up front, 48 bytes each).
const QUEUE: usize = 1024;

/// Most events written in one transaction.
const MAX_BATCH_EVENTS: usize = 20_000;

/// What an append got: its first seq and each row as the JSON of the live tail.
#[derive(Debug)]
pub struct Appended {
    /// Seq of the first event (the rest follow without gaps).
    pub first_seq: u64,
    /// Each row, serialized (contract row with the payload inlined).
    pub rows: Vec<String>,
}

enum Request {
    Append { events: Vec<Event>, reply: Option<oneshot::Sender<Result<Appended, String>>> },
    Flush(oneshot::Sender<()>),
}

/// A handle to the writer thread. Cheap to clone.
#[derive(Clone)]
pub struct StoreHandle {
    tx: mpsc::SyncSender<Request>,
}

/// Opens (creating if needed) the database at `path` and applies the schema.
pub fn open_writer(path: &Path, sync_full: bool) -> Result<Connection, StoreError> {
    let open = |error| StoreError::Open { path: path.to_owned(), error };
    let conn = Connection::open(path).map_err(open)?;
    let mode: String = conn.query_row("PRAGMA journal_mode=WAL", [], |r| r.get(0))?;
    if !mode.eq_ignore_ascii_case("wal") {
        tracing::warn!(mode, "SQLite refused WAL mode; continuing in {mode} mode");
    }
    conn.pragma_update(None, "synchronous", if sync_full { "FULL" } else { "NORMAL" })?;
    conn.busy_timeout(std::time::Duration::from_secs(5))?;
    // A small page cache: the writer appends and reads little (the gateway's RAM budget;
    // at 1,000 vehicles SQLite was 2 MB of the gateway's 8 MB live heap with 1 MiB here).
    conn.pragma_update(None, "cache_size", -512)?;
    conn.execute_batch(SCHEMA).map_err(open)?;
    Ok(conn)
}

impl StoreHandle {
    /// Starts the writer thread on `conn`.
    pub fn start(conn: Connection) -> Result<(StoreHandle, thread::JoinHandle<()>), StoreError> {
        let next: i64 = conn.query_row("SELECT COALESCE(MAX(seq), 0) + 1 FROM events", [], |r| r.get(0))?;
        let (tx, rx) = mpsc::sync_channel(QUEUE);
        let join = thread::Builder::new()
            .name("store".into())
            .spawn(move || writer(conn, rx, u64::try_from(next).unwrap_or(1)))
            .map_err(StoreError::Thread)?;
        Ok((StoreHandle { tx }, join))
    }

    /// Queues `events`; the answer comes once they are durable. Blocks only while the
    /// queue is full (back-pressure).
    pub fn append(&self, events: Vec<Event>) -> oneshot::Receiver<Result<Appended, String>> {
        let (reply, rx) = oneshot::channel();
        if let Err(mpsc::SendError(Request::Append { reply: Some(reply), .. })) =
            self.tx.send(Request::Append { events, reply: Some(reply) })
        {
            let _ = reply.send(Err("the store thread has stopped".into()));
        }
        rx
    }

    /// Queues `events` without waiting for them (observations that gate nothing).
    pub fn record(&self, events: Vec<Event>) {
        if !events.is_empty() && self.tx.send(Request::Append { events, reply: None }).is_err() {
            tracing::error!("the store thread has stopped; events lost");
        }
    }

    /// Resolves once everything queued before it is durable.
    pub fn flush(&self) -> oneshot::Receiver<()> {
        let (reply, rx) = oneshot::channel();
        let _ = self.tx.send(Request::Flush(reply));
        rx
    }
}

fn writer(mut conn: Connection, rx: mpsc::Receiver<Request>, mut next: u64) {
    let mut batch = Vec::new();
    while let Ok(first) = rx.recv() {
        batch.push(first);
        let mut events = match &batch[0] {
            Request::Append { events, .. } => events.len(),
            Request::Flush(_) => 0,
        };
        while events < MAX_BATCH_EVENTS {
            match rx.try_recv() {
                Ok(r) => {
                    if let Request::Append { events: e, .. } = &r {
                        events += e.len();
                    }
                    batch.push(r);
                }
                Err(_) => break,
            }
        }
        match write_batch(&mut conn, &batch, next) {
            Ok((after, mut rendered)) => {
                next = after;
                let mut seq = next - rendered.iter().map(Vec::len).sum::<usize>() as u64;
                for (req, rows) in batch.drain(..).zip(rendered.drain(..)) {
                    match req {
                        Request::Append { reply: Some(reply), .. } => {
                            let n = rows.len() as u64;
                            let _ = reply.send(Ok(Appended { first_seq: seq, rows }));
                            seq += n;
                        }
                        Request::Append { reply: None, .. } => seq += rows.len() as u64,
                        Request::Flush(reply) => {
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
                        Request::Flush(reply) => {
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
    let next: i64 = conn.query_row("SELECT COALESCE(MAX(seq), 0) + 1 FROM events", [], |r| r.get(0))?;
    write_batch(conn, &[Request::Append { events, reply: None }], u64::try_from(next).unwrap_or(1))?;
    Ok(())
}

/// Writes every append of `batch` in one transaction. Returns the next seq and, per
/// request, its rows rendered as JSON.
fn write_batch(conn: &mut Connection, batch: &[Request], mut seq: u64) -> Result<(u64, Vec<Vec<String>>), StoreError> {
    let tx = conn.transaction()?;
    let mut rendered = Vec::with_capacity(batch.len());
    {
        let mut insert = tx.prepare_cached(
            "INSERT INTO events (seq, ts_ms, kind, correlation_id, actor, region, payload) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
        )?;
        for req in batch {
            let mut rows = Vec::new();
            if let Request::Append { events, .. } = req {
                for e in events {
                    let payload = e.payload.as_str();
                    insert.execute(params![
                        i64::try_from(seq)?,
                        e.ts.as_millis(),
                        e.kind.as_str(),
                        e.correlation_id,
                        e.actor,
                        e.region,
                        payload
                    ])?;
                    rows.push(tail_json(seq, e, payload));
                    seq += 1;
                }
            }
            rendered.push(rows);
        }
    }
    tx.commit()?;
    Ok((seq, rendered))
}

/// Live-tail payloads larger than this are replaced by a note of their size: the tail is
/// QoS 0 and for watching; the full row is in the log (`gridweaver events --correlation`).
/// A large fleet's `DispatchPlanCreated` is hundreds of KB, more than an MQTT packet may be.
pub const TAIL_MAX_PAYLOAD: usize = 16 * 1024;

/// The live-tail JSON of a row, reusing the payload text already rendered for SQLite.
fn tail_json(seq: u64, e: &Event, payload: &str) -> String {
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
}

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
        let has: Option<String> = conn
            .query_row("SELECT name FROM sqlite_master WHERE type = 'table' AND name = 'events'", [], |r| r.get(0))
            .optional()?;
        if has.is_none() {
            return Err(StoreError::NotALog(path.to_owned()));
        }
        Ok(Reader { conn, path: path.to_owned() })
    }

    /// Calls `f` on every event matching `q`, in seq order, without collecting them.
    pub fn for_each<E: From<StoreError>>(
        &self,
        q: &Query,
        mut f: impl FnMut(StoredEvent) -> Result<(), E>,
    ) -> Result<(), E> {
        let mut sql =
            String::from("SELECT seq, ts_ms, kind, correlation_id, actor, region, payload FROM events WHERE 1=1");
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
        sql.push_str(" ORDER BY seq");
        let mut stmt = self.conn.prepare(&sql).map_err(StoreError::from)?;
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
                    path: self.path.clone(),
                    seq,
                    error,
                })?,
            })?;
        }
        Ok(())
    }
}

/// What a restart needs from the log.
#[derive(Debug, Default)]
pub struct Recovery {
    /// Ids of signals already received (newest last), for duplicate detection.
    pub signal_ids: Vec<String>,
    /// Highest leader term seen on a signal.
    pub highest_term: Option<u64>,
    /// Dispatches planned but never completed: (dispatch id, signal id).
    pub unfinished: Vec<(String, String)>,
    /// The latest tuned weights per signal type (from `WeightsTuned`).
    pub tuned: Vec<(SignalType, Weights)>,
    /// Answers to orders of the last 30 days (vehicle, when, accepted?), oldest first.
    pub answers: Vec<(VehicleId, Timestamp, bool)>,
    /// Orders still committed (not rejected, timed out or cancelled, window not over), with
    /// their signal id and whether they were accepted, in the order they were sent.
    pub commitments: Vec<(String, Order, bool)>,
    /// The vehicles each of the last dispatches ordered in its first attempt, oldest
    /// first (the fairness scores are replayed from them).
    pub participation: Vec<Vec<VehicleId>>,
    /// The dispatch counter of the last dispatch planned (`d<ms>-<n>`), so that ids stay
    /// unique across restarts and clock steps.
    pub dispatches: u64,
}

/// The orders that `conn` says are still committed at `now`: sent within `horizon_ms`
/// before `now`, never rejected, timed out or cancelled, with a window ending after `now`.
fn committed_orders(
    conn: &Connection,
    now: Timestamp,
    horizon_ms: i64,
) -> Result<Vec<(String, Order, bool)>, StoreError> {
    let since = now.as_millis().saturating_sub(horizon_ms);
    let mut signal_of: HashMap<String, String> = HashMap::new();
    let mut stmt = conn.prepare(
        "SELECT correlation_id, json_extract(payload, '$.signal_id') FROM events
         WHERE kind = 'DispatchPlanCreated' AND ts_ms >= ?1",
    )?;
    let mut rows = stmt.query([since])?;
    while let Some(r) = rows.next()? {
        if let (Some(d), Some(sig)) = (r.get::<_, Option<String>>(0)?, r.get::<_, Option<String>>(1)?) {
            signal_of.insert(d, sig);
        }
    }
    let mut orders: Vec<(Order, bool)> = Vec::new();
    let mut index: HashMap<String, usize> = HashMap::new();
    let mut released: HashSet<String> = HashSet::new();
    let mut stmt = conn.prepare(
        "SELECT kind, payload, json_extract(payload, '$.order_id'), json_extract(payload, '$.status') FROM events
         WHERE kind IN ('OrderSent', 'AckReceived', 'AckTimedOut', 'OrderCancelled') AND ts_ms >= ?1 ORDER BY seq",
    )?;
    let mut rows = stmt.query([since])?;
    while let Some(r) = rows.next()? {
        let kind: String = r.get(0)?;
        let Some(order_id) = r.get::<_, Option<String>>(2)? else { continue };
        match kind.as_str() {
            "OrderSent" => {
                let payload: String = r.get(1)?;
                match serde_json::from_str::<Order>(&payload) {
                    Ok(o) if o.until > now => {
                        index.insert(order_id, orders.len());
                        orders.push((o, false));
                    }
                    Ok(_) => {}
                    Err(e) => tracing::warn!(error = %e, "an OrderSent event could not be read; skipped"),
                }
            }
            "AckReceived" if r.get::<_, Option<String>>(3)?.as_deref() == Some("accepted") => {
                if let Some(i) = index.get(&order_id) {
                    orders[*i].1 = true;
                }
            }
            _ => {
                released.insert(order_id);
            }
        }
    }
    Ok(orders
        .into_iter()
        .filter(|(o, _)| !released.contains(&o.order_id))
        .map(|(o, accepted)| (signal_of.get(&o.dispatch_id).cloned().unwrap_or_default(), o, accepted))
        .collect())
}

/// Dispatches whose first-attempt orders are replayed into the fairness scores: after this
/// many, a score has decayed below what the planner keeps (0.9^100 < 1e-3).
const PARTICIPATION_DISPATCHES: i64 = 100;

/// The vehicles each of the last `n` dispatches ordered in its first attempt, oldest first.
fn first_attempts(conn: &Connection, n: i64) -> Result<Vec<Vec<VehicleId>>, StoreError> {
    let since: i64 = conn.query_row(
        "SELECT COALESCE(MIN(seq), 0) FROM (SELECT seq FROM events WHERE kind = 'DispatchPlanCreated' ORDER BY seq DESC LIMIT ?1)",
        [n],
        |r| r.get(0),
    )?;
    // A plan opens a dispatch (even one that ordered nothing: the scores decay all the
    // same); its first-attempt orders follow it in the same step.
    let mut stmt = conn.prepare(
        "SELECT kind, json_extract(payload, '$.vehicle_id') FROM events
         WHERE seq >= ?1 AND (kind = 'DispatchPlanCreated'
           OR (kind = 'OrderSent' AND json_extract(payload, '$.attempt') = 1)) ORDER BY seq",
    )?;
    let mut rows = stmt.query([since])?;
    let mut out: Vec<Vec<VehicleId>> = Vec::new();
    while let Some(r) = rows.next()? {
        let kind: String = r.get(0)?;
        match (kind.as_str(), r.get::<_, Option<String>>(1)?, out.last_mut()) {
            ("DispatchPlanCreated", _, _) => out.push(Vec::new()),
            (_, Some(v), Some(last)) => last.extend(VehicleId::parse(&v)),
            _ => {}
        }
    }
    Ok(out)
}

/// [`recover`] from a read-only connection to the log at `path`.
pub fn recover_path(path: &Path, remembered: usize, now: Timestamp, horizon_ms: i64) -> Result<Recovery, StoreError> {
    let conn = Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX)
        .map_err(|error| StoreError::Open { path: path.to_owned(), error })?;
    recover(&conn, remembered, now, horizon_ms)
}

/// Reads what a restart needs, from the writer's connection: `remembered` signal ids, and
/// the orders still committed at `now` among those sent in the `horizon_ms` before it.
pub fn recover(conn: &Connection, remembered: usize, now: Timestamp, horizon_ms: i64) -> Result<Recovery, StoreError> {
    let mut rec = Recovery::default();
    let mut stmt = conn.prepare(
        "SELECT json_extract(payload, '$.id'), json_extract(payload, '$.leader_term') FROM events
         WHERE kind = 'SignalReceived' ORDER BY seq DESC LIMIT ?1",
    )?;
    let mut rows = stmt.query([i64::try_from(remembered).unwrap_or(i64::MAX)])?;
    while let Some(r) = rows.next()? {
        if let Some(id) = r.get::<_, Option<String>>(0)? {
            rec.signal_ids.push(id);
        }
        if let Some(term) = r.get::<_, Option<i64>>(1)? {
            let term = u64::try_from(term).unwrap_or(0);
            rec.highest_term = rec.highest_term.max(Some(term));
        }
    }
    rec.signal_ids.reverse();
    let mut stmt = conn.prepare(
        "SELECT p.correlation_id, json_extract(p.payload, '$.signal_id') FROM events p
         WHERE p.kind = 'DispatchPlanCreated' AND NOT EXISTS (
           SELECT 1 FROM events c WHERE c.correlation_id = p.correlation_id
             AND c.kind IN ('DispatchCompleted', 'DispatchInterrupted'))
         ORDER BY p.seq",
    )?;
    let mut rows = stmt.query([])?;
    while let Some(r) = rows.next()? {
        let id: Option<String> = r.get(0)?;
        let signal: Option<String> = r.get(1)?;
        if let Some(id) = id {
            rec.unfinished.push((id, signal.unwrap_or_default()));
        }
    }
    let mut stmt = conn.prepare("SELECT payload FROM events WHERE kind = 'WeightsTuned' ORDER BY seq")?;
    let mut rows = stmt.query([])?;
    while let Some(r) = rows.next()? {
        let payload: String = r.get(0)?;
        match serde_json::from_str::<WeightsChange>(&payload) {
            Ok(c) => {
                rec.tuned.retain(|(t, _)| *t != c.signal_type);
                rec.tuned.push((c.signal_type, c.after));
            }
            Err(e) => tracing::warn!(error = %e, "a WeightsTuned event could not be read; skipped"),
        }
    }
    let mut stmt = conn.prepare(
        "SELECT ts_ms, json_extract(payload, '$.vehicle_id'), kind = 'AckReceived' AND json_extract(payload, '$.status') = 'accepted'
         FROM events WHERE kind IN ('AckReceived', 'AckTimedOut')
           AND ts_ms >= (SELECT COALESCE(MAX(ts_ms), 0) FROM events) - 30 * 86400000
         ORDER BY seq DESC LIMIT 200000",
    )?;
    let mut rows = stmt.query([])?;
    while let Some(r) = rows.next()? {
        if let Some(vehicle) = r.get::<_, Option<String>>(1)? {
            if let Some(id) = VehicleId::parse(&vehicle) {
                rec.answers.push((id, Timestamp::from_millis(r.get(0)?), r.get(2)?));
            }
        }
    }
    rec.answers.reverse();
    rec.commitments = committed_orders(conn, now, horizon_ms)?;
    rec.participation = first_attempts(conn, PARTICIPATION_DISPATCHES)?;
    let last: Option<String> = conn
        .query_row(
            "SELECT correlation_id FROM events WHERE kind = 'DispatchPlanCreated' ORDER BY seq DESC LIMIT 1",
            [],
            |r| r.get(0),
        )
        .optional()?
        .flatten();
    rec.dispatches = last.and_then(|id| id.rsplit('-').next().and_then(|n| n.parse().ok())).unwrap_or(0);
    Ok(rec)
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
        let a = store.append(vec![ev(EventKind::SignalReceived, "d1", serde_json::json!({"id": "s1"}))]);
        store.record(vec![ev(EventKind::AckReceived, "d1", serde_json::json!({}))]);
        let b = store.append(vec![
            ev(EventKind::DispatchPlanCreated, "d1", serde_json::json!({"signal_id": "s1"})),
            ev(EventKind::OrderSent, "d1", serde_json::json!({"power_kw": 3.5})),
        ]);
        let (a, b) = (a.await.unwrap().unwrap(), b.await.unwrap().unwrap());
        assert_eq!((a.first_seq, b.first_seq), (1, 3));
        let row: serde_json::Value = serde_json::from_str(&b.rows[1]).unwrap();
        assert_eq!((row["seq"].as_u64(), row["kind"].as_str()), (Some(4), Some("OrderSent")));
        assert_eq!(row["payload"]["power_kw"], 3.5);
        drop(store);
        join.join().unwrap();

        let conn = Connection::open(&path).unwrap();
        assert!(conn.execute("UPDATE events SET kind = 'x'", []).is_err());
        assert!(conn.execute("DELETE FROM events", []).is_err());
        let rec = recover(&conn, 100, Timestamp::from_millis(2_000), 86_400_000).unwrap();
        assert_eq!(rec.signal_ids, vec!["s1".to_owned()]);
        assert_eq!(rec.unfinished, vec![("d1".to_owned(), "s1".to_owned())]);

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

    #[test]
    fn the_live_tail_omits_payloads_too_large_for_an_mqtt_packet() {
        let big = ev(EventKind::DispatchPlanCreated, "d1", serde_json::json!({"pad": "x".repeat(TAIL_MAX_PAYLOAD)}));
        let row: serde_json::Value = serde_json::from_str(&tail_json(7, &big, &big.payload)).unwrap();
        assert_eq!(row["seq"], 7);
        assert_eq!(row["payload"]["omitted_bytes"].as_u64(), Some(big.payload.len() as u64));
        let small = ev(EventKind::OrderSent, "d1", serde_json::json!({"power_kw": 1.5}));
        let row: serde_json::Value = serde_json::from_str(&tail_json(8, &small, &small.payload)).unwrap();
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
