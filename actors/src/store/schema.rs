//! The log's schema: the contract's `events` table and what we keep around it (indexes,
//! append-only triggers, the hash chain, views for `sqlite3` users), its version in
//! `PRAGMA user_version`, and the migrations from older versions.

use rusqlite::{params, Connection, OptionalExtension, Transaction};
use sha2::{Digest, Sha256};

use super::StoreError;

/// The schema version this build writes.
pub const VERSION: i64 = 3;

/// Version 1: the contract's table, indexes for the CLI's filters, append-only triggers.
/// Logs written before schema versions existed have exactly this (with `user_version` 0).
const V1: &str = "
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

/// Version 2: the hash chain. Row `seq`'s hash covers its content and the hash of the row
/// before it ([`chain_hash`]); it is written in the same transaction as the row.
const V2: &str = "
CREATE TABLE IF NOT EXISTS event_chain (
  seq  INTEGER PRIMARY KEY,
  hash TEXT NOT NULL
);
CREATE TRIGGER IF NOT EXISTS event_chain_no_update BEFORE UPDATE ON event_chain
  BEGIN SELECT RAISE(ABORT, 'the event chain is append-only'); END;
CREATE TRIGGER IF NOT EXISTS event_chain_no_delete BEFORE DELETE ON event_chain
  BEGIN SELECT RAISE(ABORT, 'the event chain is append-only'); END;
";

/// Version 3: retention. `gridweaver compact` removes the rows up to `through_seq` in one
/// transaction that first records the step here (with the chain hash of the last row
/// removed, which the first row kept chains to, and the seq of its `LogCompacted` event).
/// The delete triggers let only rows at or below a recorded step go; nothing else may.
const V3: &str = "
CREATE TABLE IF NOT EXISTS retention (
  through_seq  INTEGER PRIMARY KEY,
  anchor       TEXT    NOT NULL,
  snapshot_seq INTEGER NOT NULL,
  ts_ms        INTEGER NOT NULL
);
CREATE TRIGGER IF NOT EXISTS retention_no_update BEFORE UPDATE ON retention
  BEGIN SELECT RAISE(ABORT, 'the retention record is append-only'); END;
CREATE TRIGGER IF NOT EXISTS retention_no_delete BEFORE DELETE ON retention
  BEGIN SELECT RAISE(ABORT, 'the retention record is append-only'); END;
DROP TRIGGER IF EXISTS events_no_delete;
CREATE TRIGGER events_no_delete BEFORE DELETE ON events
  WHEN OLD.seq > (SELECT COALESCE(MAX(through_seq), 0) FROM retention)
  BEGIN SELECT RAISE(ABORT, 'the events table is append-only (only gridweaver compact removes rows)'); END;
DROP TRIGGER IF EXISTS event_chain_no_delete;
CREATE TRIGGER event_chain_no_delete BEFORE DELETE ON event_chain
  WHEN OLD.seq > (SELECT COALESCE(MAX(through_seq), 0) FROM retention)
  BEGIN SELECT RAISE(ABORT, 'the event chain is append-only (only gridweaver compact removes rows)'); END;
";

/// Views for the common questions, made anew at every open (they hold no data). Each reads
/// both the batched rows of today (`v` 2) and the one-row-per-order rows of version 1, from
/// `kept_events`: the rows no retention step removed (a compaction cut off while deleting
/// leaves some of those behind until the next one).
const VIEWS: &str = "
DROP VIEW IF EXISTS kept_events;
CREATE VIEW kept_events AS
  SELECT * FROM events WHERE seq > (SELECT COALESCE(MAX(through_seq), 0) FROM retention);
DROP VIEW IF EXISTS orders;
CREATE VIEW orders AS
  SELECT e.seq AS sent_seq, e.ts_ms AS sent_ms, e.correlation_id AS dispatch_id,
         e.correlation_id || '-' || json_extract(e.payload, '$.attempt') || '-'
           || (json_extract(e.payload, '$.first') + o.key) AS order_id,
         json_extract(e.payload, '$.attempt') AS attempt,
         json_extract(o.value, '$[0]') AS vehicle_id,
         json_extract(o.value, '$[1]') AS power_kw,
         json_extract(e.payload, '$.direction') AS direction,
         json_extract(e.payload, '$.start') AS start,
         json_extract(e.payload, '$.until') AS until
  FROM kept_events e, json_each(e.payload, '$.orders') o
  WHERE e.kind = 'OrderSent' AND json_extract(e.payload, '$.v') >= 2
  UNION ALL
  SELECT seq, ts_ms, correlation_id, json_extract(payload, '$.order_id'), json_extract(payload, '$.attempt'),
         json_extract(payload, '$.vehicle_id'), json_extract(payload, '$.power_kw'),
         json_extract(payload, '$.direction'), json_extract(payload, '$.start'), json_extract(payload, '$.until')
  FROM kept_events WHERE kind = 'OrderSent' AND json_extract(payload, '$.v') IS NULL;

DROP VIEW IF EXISTS answers;
CREATE VIEW answers AS
  SELECT e.seq, e.ts_ms, e.correlation_id || '-' || json_extract(e.payload, '$.attempt') || '-' || a.value AS order_id,
         'accepted' AS answer, NULL AS reason
  FROM kept_events e, json_each(e.payload, '$.accepted') a WHERE e.kind = 'AckReceived'
  UNION ALL
  SELECT e.seq, e.ts_ms, e.correlation_id || '-' || json_extract(e.payload, '$.attempt') || '-'
           || json_extract(r.value, '$[0]'), 'rejected', json_extract(r.value, '$[1]')
  FROM kept_events e, json_each(e.payload, '$.rejected') r WHERE e.kind = 'AckReceived'
  UNION ALL
  SELECT e.seq, e.ts_ms, e.correlation_id || '-' || json_extract(e.payload, '$.attempt') || '-' || t.value,
         'timed_out', NULL
  FROM kept_events e, json_each(e.payload, '$.orders') t WHERE e.kind = 'AckTimedOut'
  UNION ALL
  SELECT seq, ts_ms, json_extract(payload, '$.order_id'),
         CASE kind WHEN 'AckTimedOut' THEN 'timed_out' ELSE json_extract(payload, '$.status') END,
         json_extract(payload, '$.reason')
  FROM kept_events WHERE kind IN ('AckReceived', 'AckTimedOut') AND json_extract(payload, '$.v') IS NULL;

DROP VIEW IF EXISTS order_answers;
CREATE VIEW order_answers AS
  SELECT o.*, a.answer, a.reason, a.seq AS answer_seq, a.ts_ms AS answer_ms
  FROM orders o LEFT JOIN answers a ON a.order_id = o.order_id;

DROP VIEW IF EXISTS cancellations;
CREATE VIEW cancellations AS
  SELECT e.seq, e.ts_ms, e.correlation_id AS dispatch_id,
         e.correlation_id || '-' || json_extract(c.value, '$[0]') || '-' || json_extract(c.value, '$[1]') AS order_id,
         json_extract(e.payload, '$.reason') AS reason
  FROM kept_events e, json_each(e.payload, '$.orders') c
  WHERE e.kind = 'OrderCancelled' AND json_extract(e.payload, '$.v') >= 2
  UNION ALL
  SELECT seq, ts_ms, correlation_id, json_extract(payload, '$.order_id'), json_extract(payload, '$.reason')
  FROM kept_events WHERE kind = 'OrderCancelled' AND json_extract(payload, '$.v') IS NULL;

DROP VIEW IF EXISTS dispatches;
CREATE VIEW dispatches AS
  SELECT correlation_id AS dispatch_id, json_extract(payload, '$.signal_id') AS signal_id,
         json_extract(payload, '$.type') AS type, json_extract(payload, '$.direction') AS direction,
         json_extract(payload, '$.requested_kw') AS requested_kw,
         json_extract(payload, '$.allocated_kw') AS allocated_kw,
         json_extract(payload, '$.acknowledged_kw') AS delivered_kw,
         json_extract(payload, '$.shortfall_kw') AS shortfall_kw,
         json_extract(payload, '$.strategy') AS strategy, json_extract(payload, '$.fallback') AS fallback,
         json_extract(payload, '$.attempts') AS attempts, json_extract(payload, '$.interrupted') AS interrupted,
         ts_ms AS completed_ms, seq
  FROM kept_events WHERE kind = 'DispatchCompleted'
  UNION ALL
  SELECT correlation_id, json_extract(payload, '$.signal_id'),
         json_extract(payload, '$.outcome.type'), json_extract(payload, '$.outcome.direction'),
         json_extract(payload, '$.outcome.requested_kw'), json_extract(payload, '$.outcome.allocated_kw'),
         json_extract(payload, '$.outcome.acknowledged_kw'), json_extract(payload, '$.outcome.shortfall_kw'),
         json_extract(payload, '$.outcome.strategy'), json_extract(payload, '$.outcome.fallback'),
         NULL, json_extract(payload, '$.reason'), ts_ms, seq
  FROM kept_events WHERE kind = 'DispatchInterrupted';
";

/// Brings the schema at `conn` to [`VERSION`], in one transaction. A log written by a newer
/// build is refused rather than changed.
pub fn migrate(conn: &mut Connection) -> Result<(), StoreError> {
    let found: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0))?;
    if found > VERSION {
        return Err(StoreError::NewerSchema { found, known: VERSION });
    }
    let tx = conn.transaction()?;
    if found < 1 {
        tx.execute_batch(V1)?;
    }
    if found < 2 {
        tx.execute_batch(V2)?;
        backfill_chain(&tx)?;
    }
    if found < 3 {
        tx.execute_batch(V3)?;
    }
    tx.execute_batch(VIEWS)?;
    tx.pragma_update(None, "user_version", VERSION)?;
    tx.commit()?;
    Ok(())
}

/// Chains every row that has no hash yet (a version 1 log's rows), in seq order.
fn backfill_chain(tx: &Transaction<'_>) -> Result<(), StoreError> {
    let mut prev = last_hash(tx)?;
    let mut stmt = tx.prepare(
        "SELECT seq, ts_ms, kind, correlation_id, actor, region, payload FROM events
         WHERE seq > (SELECT COALESCE(MAX(seq), 0) FROM event_chain) ORDER BY seq",
    )?;
    let mut insert = tx.prepare("INSERT INTO event_chain (seq, hash) VALUES (?1, ?2)")?;
    let mut rows = stmt.query([])?;
    while let Some(r) = rows.next()? {
        let row = OwnedRow::read(r)?;
        prev = chain_hash(&prev, &row.as_ref());
        insert.execute(params![row.seq, prev])?;
    }
    Ok(())
}

/// The hash of the last chained row ("" before the first).
pub fn last_hash(conn: &Connection) -> Result<String, StoreError> {
    Ok(conn
        .query_row("SELECT hash FROM event_chain ORDER BY seq DESC LIMIT 1", [], |r| r.get(0))
        .optional()?
        .unwrap_or_default())
}

/// One row's content, as the chain covers it.
pub struct RowRef<'a> {
    /// `seq`.
    pub seq: i64,
    /// `ts_ms`.
    pub ts_ms: i64,
    /// `kind`.
    pub kind: &'a str,
    /// `correlation_id`.
    pub correlation_id: Option<&'a str>,
    /// `actor`.
    pub actor: &'a str,
    /// `region`.
    pub region: Option<&'a str>,
    /// `payload`, as stored.
    pub payload: &'a str,
}

/// A row read back: columns 0..=6 of a query are the table's, in its order.
struct OwnedRow {
    seq: i64,
    ts_ms: i64,
    kind: String,
    correlation_id: Option<String>,
    actor: String,
    region: Option<String>,
    payload: String,
}

impl OwnedRow {
    fn read(r: &rusqlite::Row<'_>) -> rusqlite::Result<OwnedRow> {
        Ok(OwnedRow {
            seq: r.get(0)?,
            ts_ms: r.get(1)?,
            kind: r.get(2)?,
            correlation_id: r.get(3)?,
            actor: r.get(4)?,
            region: r.get(5)?,
            payload: r.get(6)?,
        })
    }

    fn as_ref(&self) -> RowRef<'_> {
        RowRef {
            seq: self.seq,
            ts_ms: self.ts_ms,
            kind: &self.kind,
            correlation_id: self.correlation_id.as_deref(),
            actor: &self.actor,
            region: self.region.as_deref(),
            payload: &self.payload,
        }
    }
}

/// SHA-256 over the previous row's hash and every column of `row`, each length-prefixed
/// (so that no two different rows encode alike), lower-case hex.
pub fn chain_hash(prev: &str, row: &RowRef<'_>) -> String {
    let mut h = Sha256::new();
    let mut field = |bytes: Option<&[u8]>| match bytes {
        Some(b) => {
            h.update((b.len() as u64).to_le_bytes());
            h.update(b);
        }
        None => h.update(u64::MAX.to_le_bytes()),
    };
    field(Some(prev.as_bytes()));
    field(Some(&row.seq.to_le_bytes()));
    field(Some(&row.ts_ms.to_le_bytes()));
    field(Some(row.kind.as_bytes()));
    field(row.correlation_id.map(str::as_bytes));
    field(Some(row.actor.as_bytes()));
    field(row.region.map(str::as_bytes));
    field(Some(row.payload.as_bytes()));
    gridweaver_core::events::payload::hex(&h.finalize())
}

/// The last retention step: (through seq, anchor hash, seq of its `LogCompacted` row).
pub fn last_retention(conn: &Connection) -> Result<Option<(i64, String, i64)>, StoreError> {
    // Logs opened only for reading may predate the table.
    let has: Option<String> = conn
        .query_row("SELECT name FROM sqlite_master WHERE type = 'table' AND name = 'retention'", [], |r| r.get(0))
        .optional()?;
    if has.is_none() {
        return Ok(None);
    }
    Ok(conn
        .query_row(
            "SELECT through_seq, anchor, snapshot_seq FROM retention ORDER BY through_seq DESC LIMIT 1",
            [],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )
        .optional()?)
}

/// What [`verify_chain`] found.
#[derive(Debug, PartialEq, Eq)]
pub enum ChainBreak {
    /// Row `seq` does not match its hash (edited, or the chain row was).
    Mismatch(i64),
    /// Row `seq` has no hash.
    Unchained(i64),
    /// A hash for row `seq`, which is not in the log (removed).
    Missing(i64),
    /// The log starts after row 1 (or after its last retention step) with no retention
    /// step that removed the rows before `seq`.
    Truncated(i64),
    /// The retention step through `seq` does not match its chained `LogCompacted` row.
    Retention(i64),
}

impl std::fmt::Display for ChainBreak {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ChainBreak::Mismatch(s) => {
                write!(f, "event {s} does not match its hash: the row (or its hash) was changed")
            }
            ChainBreak::Unchained(s) => write!(f, "event {s} has no hash: it was added outside the gateway"),
            ChainBreak::Missing(s) => write!(f, "event {s} is chained but missing: rows were removed"),
            ChainBreak::Truncated(s) => {
                write!(f, "the log starts at event {s}: the rows before it were removed without a retention step")
            }
            ChainBreak::Retention(s) => write!(
                f,
                "the retention step through event {s} does not match its LogCompacted event: the record was changed"
            ),
        }
    }
}

/// Checks the chain over the whole log: `Ok(rows checked)`, or the first row that breaks it.
/// A compacted log starts from its last retention step: the first row kept must follow the
/// last row removed and chain to its hash, and the step must match its `LogCompacted` row.
pub fn verify_chain(conn: &Connection) -> Result<Result<u64, ChainBreak>, StoreError> {
    let retention = last_retention(conn)?;
    let (mut expected, mut prev) = match &retention {
        Some((through, anchor, _)) => (through + 1, anchor.clone()),
        None => (1, String::new()),
    };
    if let Some((through, anchor, snapshot_seq)) = &retention {
        let recorded: Option<String> = conn
            .query_row("SELECT payload FROM events WHERE seq = ?1 AND kind = 'LogCompacted'", [snapshot_seq], |r| {
                r.get(0)
            })
            .optional()?;
        #[derive(serde::Deserialize)]
        struct Step {
            through_seq: i64,
            anchor: String,
        }
        let step = recorded.and_then(|p| serde_json::from_str::<Step>(&p).ok());
        if !step.is_some_and(|s| s.through_seq == *through && s.anchor == *anchor) {
            return Ok(Err(ChainBreak::Retention(*through)));
        }
    }
    // Rows up to the retention step's `through_seq` that are still there (a compaction
    // stopped while deleting them) are no longer part of the log: not checked.
    let mut stmt = conn.prepare(
        "SELECT e.seq, e.ts_ms, e.kind, e.correlation_id, e.actor, e.region, e.payload, c.seq, c.hash
         FROM event_chain c LEFT JOIN events e ON e.seq = c.seq WHERE c.seq >= ?1
         UNION ALL
         SELECT e.seq, e.ts_ms, e.kind, e.correlation_id, e.actor, e.region, e.payload, NULL, NULL
         FROM events e WHERE e.seq >= ?1 AND e.seq NOT IN (SELECT seq FROM event_chain)
         ORDER BY 8, 1",
    )?;
    // Unchained rows sort first (NULL chain seq); any of them is a break.
    let mut rows = stmt.query([expected])?;
    let mut checked = 0u64;
    while let Some(r) = rows.next()? {
        let chain_seq: Option<i64> = r.get(7)?;
        let seq: Option<i64> = r.get(0)?;
        let (Some(chain_seq), Some(seq)) = (chain_seq, seq) else {
            return Ok(Err(match (chain_seq, seq) {
                (None, Some(seq)) => ChainBreak::Unchained(seq),
                (Some(c), _) => ChainBreak::Missing(c),
                (None, None) => continue,
            }));
        };
        if chain_seq > expected {
            // Rows and their hashes removed together.
            return Ok(Err(if checked == 0 {
                ChainBreak::Truncated(chain_seq)
            } else {
                ChainBreak::Missing(expected)
            }));
        }
        let row = OwnedRow::read(r)?;
        let hash: String = r.get(8)?;
        if row.seq != seq || chain_hash(&prev, &row.as_ref()) != hash {
            return Ok(Err(ChainBreak::Mismatch(chain_seq)));
        }
        prev = hash;
        expected = chain_seq + 1;
        checked += 1;
    }
    Ok(Ok(checked))
}
