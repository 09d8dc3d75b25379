//! The `gridweaver` command line (CONTRACT.md, "Command line"). Exit status: 0 success,
//! 2 usage or config errors, 1 runtime failures, each with a one-line reason on stderr.

use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use gridweaver_core::config::Config;
use gridweaver_core::events::{decode, Decoded, EventKind, StoredEvent};
use gridweaver_core::replay::audit::Auditor;
use gridweaver_core::time::Timestamp;

use crate::store::{LogLock, Query, Reader};
use crate::{controller, environment};

/// GridWeaver Edge: an edge controller that dispatches grid-flexibility signals over an
/// EV depot's chargers and records every decision in an append-only SQLite log.
#[derive(Debug, Parser)]
#[command(name = "gridweaver", version, about)]
pub struct Cli {
    /// Log filter (tracing's syntax: `info`, `gridweaver_actors=debug`); overrides RUST_LOG.
    #[arg(long, global = true)]
    pub log: Option<String>,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Self-contained demo: embedded broker, simulated fleet, scripted signals; writes
    /// gridweaver-demo.db and prints a summary.
    #[cfg(feature = "demo")]
    Demo {
        /// Where to write the event log (replaced if it exists).
        #[arg(long, default_value = "gridweaver-demo.db")]
        db: PathBuf,
        /// Simulated vehicles.
        #[arg(long, default_value_t = 50)]
        vehicles: usize,
        /// Seed of the simulated fleet.
        #[arg(long, default_value_t = 7)]
        seed: u64,
    },
    /// The gateway daemon against the configured broker. Stops on SIGTERM or SIGINT.
    Run {
        /// The YAML config.
        #[arg(long)]
        config: PathBuf,
    },
    /// Validates a config; errors name the offending key. Also checks what it names on this
    /// machine, as `run` does first: `mqtt.password_file` readable, the directory of
    /// `store.path` present.
    CheckConfig {
        /// The YAML config.
        file: PathBuf,
        /// Only the file's content: do not look at the files and directories it names (to
        /// check a config on another machine than its gateway's).
        #[arg(long)]
        skip_environment: bool,
    },
    /// Prints events from a log, oldest first.
    Events {
        /// The SQLite event log.
        #[arg(long)]
        db: PathBuf,
        /// Only this kind (`DispatchCompleted`, ...).
        #[arg(long)]
        kind: Option<String>,
        /// Only this correlation id (a dispatch id).
        #[arg(long)]
        correlation: Option<String>,
        /// Only events at or after this RFC 3339 time.
        #[arg(long)]
        since: Option<String>,
        /// Only events at or before this RFC 3339 time.
        #[arg(long)]
        until: Option<String>,
        /// One JSON object per line (the row, payload inlined) instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Verifies the log's hash chain, then re-runs every recorded decision (plan, fallback,
    /// tuning) on the inputs the log held before it, under the configuration recorded then;
    /// lists every decision whose result differs beyond 1e-6 relative. Exit 0 only when the
    /// chain holds and every decision matches.
    Audit {
        /// The SQLite event log.
        #[arg(long)]
        db: PathBuf,
        /// Only decisions at or after this RFC 3339 time.
        #[arg(long)]
        from: Option<String>,
        /// Only decisions at or before this RFC 3339 time.
        #[arg(long)]
        to: Option<String>,
        /// The report as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Starts a new log from a site's existing state: a JSON snapshot (fleet, weights,
    /// programs; see the README) becomes synthetic events. The log must be new or empty.
    Migrate {
        /// The snapshot (JSON).
        #[arg(long)]
        snapshot: PathBuf,
        /// The SQLite event log to create.
        #[arg(long)]
        db: PathBuf,
    },
    /// Removes the rows older than a time in one logged retention step: a `LogCompacted`
    /// event holds the state they fold to, so replay, audit and start-up give what they gave
    /// before. Refused when the hash chain is broken.
    Compact {
        /// The SQLite event log.
        #[arg(long)]
        db: PathBuf,
        /// RFC 3339 time: every row before the first one stamped at or after it goes.
        #[arg(long)]
        before: String,
        /// Then rewrite the file to give the freed pages back to the file system (SQLite
        /// reuses them for new rows anyway).
        #[arg(long)]
        vacuum: bool,
    },
    /// Prints the gateway's state as the log leaves it at a time (JSON): fleet, dispatches
    /// in flight, commitments, weights, the last outcomes, numbering.
    Replay {
        /// The SQLite event log.
        #[arg(long)]
        db: PathBuf,
        /// RFC 3339 time: events stamped later are not folded (default: the whole log).
        #[arg(long)]
        to: Option<String>,
    },
}

/// A failure and its exit status.
pub enum Failure {
    /// Usage or config: exit 2.
    Usage(String),
    /// Runtime: exit 1.
    Runtime(anyhow::Error),
}

impl From<anyhow::Error> for Failure {
    fn from(e: anyhow::Error) -> Self {
        Failure::Runtime(e)
    }
}

/// Parses the arguments, runs the command, and maps the result to an exit status.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let default_level = match cli.command {
        // rumqttd logs every client disconnect as an error; the demo's broker is ours.
        #[cfg(feature = "demo")]
        Command::Demo { .. } => "warn,rumqttd=off",
        _ => "info",
    };
    init_tracing(cli.log.as_deref(), default_level);
    match run(cli.command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure::Usage(msg)) => {
            eprintln!("gridweaver: {msg}");
            ExitCode::from(2)
        }
        Err(Failure::Runtime(e)) => {
            eprintln!("gridweaver: {e:#}");
            ExitCode::from(1)
        }
    }
}

fn init_tracing(flag: Option<&str>, default_level: &str) {
    use tracing_subscriber::EnvFilter;
    let filter = match flag {
        Some(f) => EnvFilter::try_new(f),
        None => EnvFilter::try_from_default_env().or_else(|_| EnvFilter::try_new(default_level)),
    }
    .unwrap_or_else(|_| EnvFilter::new("info"));
    // Colours only for a person at a terminal: a file or the journal gets plain text.
    let ansi = io::IsTerminal::is_terminal(&io::stderr());
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(io::stderr)
        .with_target(false)
        .with_ansi(ansi)
        .try_init();
}

fn run(command: Command) -> Result<(), Failure> {
    match command {
        #[cfg(feature = "demo")]
        Command::Demo { db, vehicles, seed } => crate::demo::run(&db, vehicles, seed).map_err(Failure::Runtime),
        Command::Run { config } => {
            let cfg = load_config(&config)?;
            check_environment(&config, &cfg)?;
            // One gateway per log, for the whole process: the OS releases the lock at any exit.
            let _lock = LogLock::acquire(Path::new(&cfg.store.path)).map_err(|e| Failure::Runtime(e.into()))?;
            tracing::info!(
                broker = %format!("{}:{}", cfg.mqtt.host, cfg.mqtt.port),
                prefix = %cfg.mqtt.prefix,
                log = %cfg.store.path,
                site = %cfg.site,
                version = env!("CARGO_PKG_VERSION"),
                "gridweaver starting"
            );
            let system = actix::System::new();
            system.block_on(controller::run_until(&cfg, shutdown_signal())).map_err(|e| Failure::Runtime(e.into()))?;
            Ok(())
        }
        Command::CheckConfig { file, skip_environment } => {
            let cfg = load_config(&file)?;
            if !skip_environment {
                check_environment(&file, &cfg)?;
            }
            println!(
                "{}: ok (site `{}`, broker {}:{}, prefix `{}`, log {}, strategy {:?}, fallback {:?})",
                file.display(),
                cfg.site,
                cfg.mqtt.host,
                cfg.mqtt.port,
                cfg.mqtt.prefix,
                cfg.store.path,
                cfg.dispatch.strategy,
                cfg.dispatch.fallback
            );
            Ok(())
        }
        Command::Events { db, kind, correlation, since, until, json } => {
            let kind = kind
                .map(|k| {
                    EventKind::parse(&k).ok_or_else(|| {
                        let names: Vec<&str> = EventKind::ALL.iter().map(|k| k.as_str()).collect();
                        Failure::Usage(format!("--kind: `{k}` is not an event kind ({})", names.join(", ")))
                    })
                })
                .transpose()?;
            let since_ms = time_arg("--since", since)?.map(Timestamp::as_millis);
            let until_ms = time_arg("--until", until)?.map(Timestamp::as_millis);
            let q = Query { kind, correlation, since_ms, until_ms, ..Query::default() };
            print_events(&db, &q, json).map_err(Failure::Runtime)
        }
        Command::Audit { db, from, to, json } => {
            let (from, to) = (time_arg("--from", from)?, time_arg("--to", to)?);
            audit(&db, from, to, json).map_err(Failure::Runtime)
        }
        Command::Migrate { snapshot, db } => migrate(&snapshot, &db),
        Command::Compact { db, before, vacuum } => {
            let before = time_arg("--before", Some(before))?.unwrap_or_default();
            compact(&db, before, vacuum).map_err(Failure::Runtime)
        }
        Command::Replay { db, to } => {
            let to = time_arg("--to", to)?;
            let state = crate::store::project(&db, to, true).map_err(|e| Failure::Runtime(e.into()))?.into_state();
            let stdout = io::stdout();
            let mut out = io::BufWriter::new(stdout.lock());
            let written = serde_json::to_writer_pretty(&mut out, &state.summary())
                .map_err(io::Error::from)
                .and_then(|()| writeln!(out))
                .and_then(|()| out.flush());
            match written {
                Err(e) if e.kind() != io::ErrorKind::BrokenPipe => Err(Failure::Runtime(e.into())),
                _ => Ok(()),
            }
        }
    }
}

/// `gridweaver audit`: the chain first, then the decisions.
fn audit(db: &Path, from: Option<Timestamp>, to: Option<Timestamp>, json: bool) -> anyhow::Result<()> {
    let reader = Reader::open(db)?;
    let chained = crate::store::schema::verify_chain(reader.connection())?;
    let mut auditor = Auditor::new(from, to);
    if chained.is_ok() {
        let mut q = Query::default();
        if let Some(start) = crate::store::snapshot(reader.connection(), db)? {
            q.from_seq = Some(start.seq + 1);
            auditor = Auditor::resume(start, from, to);
        }
        reader.for_each(&q, |row| auditor.apply(&row).map_err(anyhow::Error::from))?;
    }
    let report = auditor.finish();
    if json {
        let chain = match &chained {
            Ok(rows) => serde_json::json!({ "ok": true, "rows": rows }),
            Err(broken) => serde_json::json!({ "ok": false, "error": broken.to_string() }),
        };
        println!("{}", serde_json::json!({ "chain": chain, "report": report }));
    } else {
        match &chained {
            Ok(rows) => println!("hash chain: ok ({rows} rows)"),
            Err(broken) => println!("hash chain: BROKEN: {broken}"),
        }
        if chained.is_ok() {
            println!(
                "re-ran {} plans, {} fallbacks, {} weight changes over {} rows; {} differ",
                report.plans,
                report.fallbacks,
                report.tunings,
                report.rows,
                report.findings.len()
            );
            if !report.time_limited.is_empty() {
                println!("cut short by the LP's time limit (not comparable): seq {:?}", report.time_limited);
            }
            if report.not_checked > 0 {
                println!("{} decisions could not be re-run: no configuration recorded before them", report.not_checked);
            }
            for f in &report.findings {
                println!("  seq {} {} {}: {}", f.seq, f.decision, f.dispatch_id.as_deref().unwrap_or("-"), f.detail);
            }
        }
    }
    if let Err(broken) = chained {
        anyhow::bail!("the log does not match its hash chain: {broken}");
    }
    anyhow::ensure!(
        report.findings.is_empty(),
        "{} recorded decisions differ from today's code",
        report.findings.len()
    );
    anyhow::ensure!(report.not_checked == 0, "{} recorded decisions could not be re-run", report.not_checked);
    Ok(())
}

/// `gridweaver compact`.
fn compact(db: &Path, before: Timestamp, vacuum: bool) -> anyhow::Result<()> {
    match crate::store::compact(db, before, crate::clock::now())? {
        None => println!("{}: no event before {before}; nothing removed", db.display()),
        Some(c) => println!(
            "{}: removed {} events (through seq {}); their state is event {} ({} bytes)",
            db.display(),
            c.removed,
            c.through_seq,
            c.snapshot_seq,
            c.snapshot_bytes
        ),
    }
    if vacuum {
        let conn = crate::store::open_writer(db, true)?;
        conn.execute_batch("VACUUM").with_context(|| format!("{}: VACUUM", db.display()))?;
        println!("{}: vacuumed", db.display());
    }
    Ok(())
}

/// `gridweaver migrate`.
fn migrate(snapshot: &Path, db: &Path) -> Result<(), Failure> {
    use gridweaver_core::replay::migrate::{events, Snapshot};
    let text = std::fs::read_to_string(snapshot)
        .map_err(|e| Failure::Usage(format!("cannot read {}: {e}", snapshot.display())))?;
    let parsed: Snapshot =
        serde_json::from_str(&text).map_err(|e| Failure::Usage(format!("{}: snapshot: {e}", snapshot.display())))?;
    let rows =
        events(&parsed, crate::clock::now()).map_err(|e| Failure::Usage(format!("{}: {e}", snapshot.display())))?;
    // Not beside a gateway (or another migrate) writing the same log.
    let _lock = LogLock::acquire(db).map_err(|e| Failure::Runtime(e.into()))?;
    let mut conn = crate::store::open_writer(db, true).map_err(|e| Failure::Runtime(e.into()))?;
    let existing: i64 =
        conn.query_row("SELECT COUNT(*) FROM events", [], |r| r.get(0)).map_err(|e| Failure::Runtime(e.into()))?;
    if existing > 0 {
        return Err(Failure::Usage(format!(
            "{} already holds {existing} events: a snapshot starts a new log",
            db.display()
        )));
    }
    let n = rows.len();
    crate::store::append_direct(&mut conn, rows).map_err(|e| Failure::Runtime(e.into()))?;
    println!("{}: {n} events imported from {}", db.display(), snapshot.display());
    Ok(())
}

/// An optional RFC 3339 time argument.
fn time_arg(flag: &str, value: Option<String>) -> Result<Option<Timestamp>, Failure> {
    value
        .map(|s| {
            Timestamp::parse_rfc3339(&s).ok_or_else(|| {
                Failure::Usage(format!("{flag}: `{s}` is not an RFC 3339 time (e.g. 2026-12-01T10:00:00Z)"))
            })
        })
        .transpose()
}

/// Reads and validates a config file; any failure is a usage error naming the file.
pub fn load_config(path: &Path) -> Result<Config, Failure> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| Failure::Usage(format!("cannot read config {}: {e}", path.display())))?;
    Config::from_yaml(&text).map_err(|e| Failure::Usage(format!("{}: {e}", path.display())))
}

/// [`environment::check_environment`]; a failure is a config error naming the file.
fn check_environment(path: &Path, cfg: &Config) -> Result<(), Failure> {
    environment::check_environment(cfg).map_err(|e| Failure::Usage(format!("{}: {e}", path.display())))
}

async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

fn is_broken_pipe(e: &anyhow::Error) -> bool {
    e.chain().any(|c| c.downcast_ref::<io::Error>().is_some_and(|io| io.kind() == io::ErrorKind::BrokenPipe))
}

fn print_events(db: &Path, q: &Query, json: bool) -> anyhow::Result<()> {
    let reader = Reader::open(db)?;
    let stdout = io::stdout();
    let mut out = io::BufWriter::new(stdout.lock());
    if !json {
        let header = writeln!(
            out,
            "{:>6}  {:<24}  {:<20}  {:<18}  {:<16}  summary",
            "seq", "time", "kind", "correlation", "actor"
        );
        if let Err(e) = header {
            return if e.kind() == io::ErrorKind::BrokenPipe { Ok(()) } else { Err(e.into()) };
        }
    }
    let result = reader.for_each(q, |e| {
        if json {
            serde_json::to_writer(&mut out, &e)?;
            writeln!(out)?;
        } else {
            let time = Timestamp::from_millis(e.ts_ms).to_string();
            writeln!(
                out,
                "{:>6}  {:<24}  {:<20}  {:<18}  {:<16}  {}",
                e.seq,
                time,
                e.kind,
                e.correlation_id.as_deref().unwrap_or("-"),
                e.actor,
                summary(&e)
            )?;
        }
        Ok(())
    });
    let result = result.and_then(|()| out.flush().context("cannot write to stdout"));
    match result {
        // A closed pipe (`| head`) is not a failure.
        Err(e) if is_broken_pipe(&e) => Ok(()),
        other => other,
    }
}

/// A one-line digest of an event's payload for the table view.
fn summary(e: &StoredEvent) -> String {
    let kw: fn(f64) -> String = |x| format!("{x:.1}");
    match decode(&e.kind, &e.payload) {
        Ok(Decoded::SignalReceived(r)) => {
            let g = &r.signal;
            format!("signal {} {} {:?} {} kW", g.id, g.kind, g.direction, kw(g.power_kw))
        }
        Ok(Decoded::PlanCreated(p)) => format!(
            "{:?} planned {} of {} kW; fleet of {}",
            p.strategy,
            kw(p.allocated_kw),
            kw(p.target_kw),
            p.fleet.map_or("?".to_owned(), |f| f.vehicles.to_string())
        ),
        Ok(Decoded::ConstraintApplied(c)) => {
            format!("{} eligible, {} excluded, capacity {} kW", c.eligible, c.excluded_count(), kw(c.capacity_kw))
        }
        Ok(Decoded::OrdersSent(o)) => {
            let total: f64 = o.orders.iter().map(|(_, p)| p).sum();
            format!("{} orders, {} kW in all (attempt {})", o.orders.len(), kw(total), o.attempt)
        }
        Ok(Decoded::AcksReceived(a)) => {
            format!("{} accepted, {} rejected (attempt {})", a.accepted.len(), a.rejected.len(), a.attempt)
        }
        Ok(Decoded::AcksTimedOut(t)) => format!("{} orders unanswered (attempt {})", t.orders.len(), t.attempt),
        Ok(Decoded::OrdersCancelled(c)) => format!("{} orders cancelled: {}", c.orders.len(), c.reason),
        Ok(Decoded::FallbackApplied(f)) => {
            format!("{:?}: {} of {} kW reallocated", f.fallback, kw(f.reallocated_kw), kw(f.residual_kw))
        }
        Ok(Decoded::DispatchCompleted(d)) => format!(
            "requested {} kW, acknowledged {} kW, shortfall {} kW",
            kw(d.outcome.requested_kw),
            kw(d.outcome.acknowledged_kw),
            kw(d.outcome.shortfall_kw)
        ),
        Ok(Decoded::Rejected(r)) => r.error,
        Ok(Decoded::VehicleState(v)) => format!("soc {:.3}, plugged in: {}", v.vehicle.soc, v.vehicle.plugged_in),
        Ok(Decoded::ConfigRecorded(c)) => format!("configuration {}", &c.hash[..c.hash.len().min(16)]),
        Ok(_) | Err(_) => e.payload.to_string().chars().take(90).collect(),
    }
}
