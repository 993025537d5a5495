//! The command line, as clap types.
//!
//! Every value is parsed and validated here, before any database is opened,
//! so bad input is reported with the option's name and nothing is written
//! (opening an SQLite file creates it).

use annals::{ExpectedVersion, GlobalPosition, Metadata, StreamId, StreamVersion};
use chrono::{DateTime, Utc};
use clap::{Args, Parser, Subcommand, ValueEnum};
use serde_json::Value;

use crate::store::{Backend, DEFAULT_DATABASE_URL};

/// The most aggregates a snapshot job processes at once: each holds a
/// database connection or a read for its whole fold.
const MAX_CONCURRENCY: usize = 256;

pub(crate) const EXIT_CODES: &str = "\
Exit status:
  0  success (a closed output pipe, as in `annals read-all | head`, is success)
  1  a check failed: an append's expected version did not match (the message
     names the actual version), a demo consistency check failed, an
     aggregate has no events (with --as-of: none recorded by then), `annals
     event` found no such event, or a snapshot job found failed aggregates or
     mismatches (see `annals snapshots --help`), `annals check` found
     an error (see `annals check --help`), or `annals adopt` met streams
     it did not write (see `annals adopt --help`)
  2  error: bad input, unknown URL scheme, unreachable database, schema not
     initialized, an aggregate type this binary does not register, ...; bad
     input is refused before anything is written

Logs go to stderr, errors only by default; set RUST_LOG (for example
RUST_LOG=warn or RUST_LOG=annals=debug) to see more.";

/// Annals operations: inspect and write an Annals event store.
#[derive(Parser, Debug)]
#[command(name = "annals", version, after_help = EXIT_CODES)]
#[command(arg_required_else_help = true)]
pub(crate) struct Cli {
    /// Database URL: sqlite://PATH or postgres://USER@HOST/DB.
    #[arg(
        long,
        global = true,
        env = "ANNALS_DATABASE_URL",
        default_value = DEFAULT_DATABASE_URL,
        value_name = "URL",
        hide_env_values = true
    )]
    pub(crate) database_url: String,

    /// PostgreSQL schema that holds the tables (default: public). Ignored
    /// for SQLite.
    #[arg(
        long,
        global = true,
        env = "ANNALS_PG_SCHEMA",
        value_name = "NAME",
        hide_env_values = true
    )]
    pub(crate) pg_schema: Option<String>,

    /// After the command, write the metrics it recorded (snapshot writes,
    /// skips, drops, conflicts, PostgreSQL horizon lag, ...) to this file in
    /// the Prometheus text format, e.g. for node_exporter's textfile
    /// collector when `annals` runs from cron.
    #[arg(long, global = true, env = "ANNALS_METRICS_FILE", value_name = "PATH")]
    pub(crate) metrics_file: Option<std::path::PathBuf>,

    /// The master key file of personal-data encryption, used when
    /// ANNALS_MASTER_KEY is unset (default: the SQLite database's path plus
    /// `.key`; PostgreSQL has no default). `annals demo` creates it when no
    /// key is configured.
    #[arg(long, global = true, env = "ANNALS_KEY_FILE", value_name = "PATH")]
    pub(crate) key_file: Option<std::path::PathBuf>,

    #[command(subcommand)]
    pub(crate) command: Command,
}

#[derive(Subcommand, Debug)]
pub(crate) enum Command {
    /// Create or upgrade the database schema (idempotent).
    Init,
    /// Print the DDL of a backend's schema.
    Schema {
        /// The backend.
        #[arg(long, value_enum)]
        backend: BackendArg,
    },
    /// Append one event to a stream and print what was recorded.
    Append(AppendArgs),
    /// Read one stream (with --follow, then wait for its new events).
    Read(ReadArgs),
    /// Read the whole store in global order (with --follow, then wait for
    /// new events).
    ReadAll(ReadAllArgs),
    /// Streams and events per category, events per type, first and last
    /// recorded_at, the largest streams, the events appended in the last
    /// hour and day, the database size; on PostgreSQL also the horizon lag
    /// (committed events that readers of the global order cannot see yet).
    Stats(StatsArgs),
    /// Show an aggregate's state, version and how it was loaded.
    Aggregate(AggregateArgs),
    /// Show one event (by id or global position) with its metadata, the
    /// events it caused, and the rest of its correlation as a tree.
    Event(EventArgs),
    /// Run the bank example: open accounts, deposit and withdraw through the
    /// repository, then print balances and check the totals.
    Demo(DemoArgs),
    /// Snapshot coverage and freshness, create and delete, prepopulate, the
    /// staged migration (migrate, verify, promote), verification of live
    /// snapshots, history and rollback.
    #[command(subcommand)]
    Snapshots(SnapshotsCommand),
    /// Run the health checks and print one row per finding (check, severity,
    /// subject, detail). Exit status 1 when any finding is an error.
    #[command(after_help = CHECK_HELP)]
    Check(CheckArgs),
    /// Turn the rows of an existing table into the first event of one stream
    /// per row (CATEGORY-ID), idempotently: a rerun adds nothing.
    #[command(after_help = ADOPT_HELP)]
    Adopt(AdoptArgs),
    /// Serve the Prometheus metrics (`/metrics`) and the health checks
    /// (`/health`: 200 when no finding is an error, 503 otherwise, with the
    /// findings as JSON) over HTTP until Ctrl-C or SIGTERM.
    #[command(after_help = SERVE_HELP)]
    Serve(ServeArgs),
    /// Write the events (in global order), checkpoints and live snapshots
    /// as JSON Lines: a header, one line each, a trailer with the counts.
    #[command(after_help = EXPORT_HELP)]
    Export(ExportArgs),
    /// Import an export (see `annals export`): events keep their ids,
    /// versions, metadata and recorded_at and get new positions;
    /// checkpoints are translated; a rerun adds nothing.
    #[command(after_help = IMPORT_HELP)]
    Import(ImportArgs),
    /// The projections this binary registers: list them, show their
    /// checkpoint and lag, run them, reset them.
    #[command(subcommand)]
    Projections(ProjectionsCommand),
    /// Move the closed streams of a category (no event recorded at or after
    /// --before) to zstd JSON Lines files with a checksummed manifest in
    /// --to, and remove their events, leaving a tombstone per stream.
    #[command(after_help = ARCHIVE_HELP)]
    Archive(ArchiveArgs),
    /// Bring the streams of an archive directory back (checksums checked
    /// first; ids, versions, metadata and recorded_at kept; new positions).
    #[command(name = "restore-archive", after_help = RESTORE_ARCHIVE_HELP)]
    RestoreArchive(RestoreArchiveArgs),
    /// GDPR crypto-shredding: forget a subject, or show its status.
    #[command(subcommand)]
    Gdpr(crate::gdpr::GdprCommand),
    /// Copy-and-transform migrations of the event table: migrate (with
    /// --dry-run), swap, drop-backup.
    #[command(subcommand)]
    Events(crate::events_cmd::EventsCommand),
}

const PROJECTIONS_HELP: &str = "\
State (status): `not-started` (no checkpoint), `caught-up` (checkpoint at the
head), `behind` (events after the checkpoint). Whether a runner is running
somewhere is not recorded in the database, so status does not claim it.
Lag in seconds: recorded_at of the head event minus recorded_at of the first
event after the checkpoint (0 when caught up).

Rebuild: without --blue-green the read model is reset and rebuilt in place
(readers see it fill up); an interrupted rebuild (Ctrl-C, a crash) is resumed
by running the same command again. With --blue-green the new version builds
into shadow tables under its own lock while the old version's runner keeps
serving; an interrupted one resumes from its shadow checkpoint. After a
blue-green swap, run the new version: the old runner stops at its next batch.

Exit status: 0 done, 1 a dead letter's retry failed again, 2 error (an unknown
projection, a runner or rebuild that failed, an unknown dead letter).";

/// `annals projections …`.
#[derive(Subcommand, Debug)]
#[command(after_help = PROJECTIONS_HELP)]
pub(crate) enum ProjectionsCommand {
    /// The registered projections: name, checkpoint name, what they build.
    List {
        /// Print JSON Lines.
        #[arg(long)]
        json: bool,
    },
    /// Per projection: checkpoint, head, lag in events and in seconds,
    /// state.
    Status {
        /// Print JSON Lines, one object per projection.
        #[arg(long)]
        json: bool,
    },
    /// Run projections (all registered ones without NAME) until Ctrl-C or
    /// SIGTERM, or with --until-caught-up until they have applied the head
    /// read at the start.
    Run {
        /// The projections to run.
        #[arg(value_name = "NAME")]
        names: Vec<String>,
        /// Stop once every projection has reached the head read at start.
        #[arg(long)]
        until_caught_up: bool,
        /// At most this many events per batch.
        #[arg(long, value_name = "N", default_value = "500", value_parser = parse_batch_size)]
        batch_size: usize,
        /// Run each projection as P partitions by hash of the stream id,
        /// each with its own checkpoint. On PostgreSQL this process is one
        /// worker: the workers running the same command share the
        /// partitions through leases (each takes about P / workers); on
        /// SQLite it runs all P.
        #[arg(long, value_name = "P", value_parser = parse_partitions)]
        partitions: Option<u32>,
        /// With --partitions: the lease of each partition, in seconds: a
        /// worker that dies leaves its partitions to the others after this
        /// long. Renewed every third of it. (Without --partitions the
        /// projection lock keeps its lease of 30 s.)
        #[arg(long, value_name = "SECS", default_value = "30", value_parser = parse_lease_ttl)]
        lease_ttl: f64,
        /// How long a runner keeps retrying a store it cannot reach (a
        /// database restart or failover), in seconds, before it stops with
        /// the error: a read or checkpoint save is retried with a backoff
        /// that doubles from 10 ms up to 2 s.
        #[arg(long, value_name = "SECS", default_value = "300", value_parser = parse_retry_for)]
        retry_for: u32,
    },
    /// Delete a projection's checkpoint and its read model's rows (in one
    /// transaction), so the next run rebuilds it from the first event.
    Reset {
        /// The projection.
        #[arg(value_name = "NAME")]
        name: String,
    },
    /// Rebuild a projection from the first event up to the head, with a
    /// progress bar; run it again after Ctrl-C to resume. --blue-green
    /// builds into shadow tables while the live ones keep serving, then
    /// swaps them in one transaction.
    Rebuild {
        /// The projection.
        #[arg(value_name = "NAME")]
        name: String,
        /// Build into shadow tables and swap them in (the live tables serve
        /// until the swap).
        #[arg(long)]
        blue_green: bool,
        /// Events read per page; the checkpoint is saved every 2 pages
        /// (batches larger than a live runner's: a batch's transaction,
        /// lease check and checkpoint are paid once per 2 pages).
        #[arg(long, value_name = "N", default_value = "5000", value_parser = parse_batch_size)]
        batch_size: usize,
        /// Start over even when an interrupted rebuild could be resumed.
        #[arg(long)]
        from_start: bool,
    },
    /// A projection's parked events (error policy Park): list them, or
    /// apply one again (--retry) or delete one (--drop).
    #[command(name = "dead-letters")]
    DeadLetters {
        /// The projection.
        #[arg(value_name = "NAME")]
        name: String,
        /// Apply the parked event with this id again through the handler.
        #[arg(long, value_name = "EVENT_ID", conflicts_with = "drop")]
        retry: Option<uuid::Uuid>,
        /// Delete the parked event with this id.
        #[arg(long, value_name = "EVENT_ID")]
        drop: Option<uuid::Uuid>,
        /// Print JSON Lines.
        #[arg(long)]
        json: bool,
    },
}

const ARCHIVE_HELP: &str = "\
Each batch of streams is written, fsynced, read back and checksummed, and
entered in DIR/manifest.json, before one transaction removes its events and
records the tombstones. An archived stream keeps its head: reading it,
asking its version or appending to it fails with an error naming its
archive file. A rerun completes an interrupted run and archives nothing
twice.

Exit status: 0 archived (or nothing to archive), 2 error.";

const RESTORE_ARCHIVE_HELP: &str = "\
A file that is missing or does not match its checksum is named, and nothing
of it is restored; the other files are. A rerun adds nothing.

Exit status: 0 restored, 1 some files were not restored or some streams
conflict (listed), 2 error.";

#[derive(Args, Debug)]
pub(crate) struct ArchiveArgs {
    /// The category whose closed streams are archived.
    #[arg(long, value_name = "CATEGORY", value_parser = parse_category)]
    pub(crate) category: String,
    /// Archive the streams whose last event was recorded before this
    /// instant (RFC 3339).
    #[arg(long, value_name = "RFC3339", value_parser = parse_time)]
    pub(crate) before: DateTime<Utc>,
    /// The archive directory (created if needed).
    #[arg(long, value_name = "DIR")]
    pub(crate) to: std::path::PathBuf,
    /// Streams per archive file (and per removal transaction).
    #[arg(long, value_name = "N", default_value = "1000", value_parser = parse_batch_size)]
    pub(crate) streams_per_file: usize,
}

#[derive(Args, Debug)]
pub(crate) struct RestoreArchiveArgs {
    /// The archive directory (with its manifest.json).
    #[arg(value_name = "DIR")]
    pub(crate) dir: std::path::PathBuf,
}

const ADOPT_HELP: &str = "\
Each row of the query becomes one event of type --type whose payload is the
row as a JSON object (PostgreSQL: row_to_json; SQLite: integers, reals, text
and NULL; a BLOB column is refused, select hex(col) instead), appended to a
new stream CATEGORY-ID, ID being the --id-column's value (text or integer).
The event's id is derived from the stream name, so a rerun adds nothing:
rows adopted before are counted as already adopted, or as changed when the
row's values differ now (the stream is kept as it is). A stream that exists
without an adopted event is a conflict; the row is not adopted.

Exit status: 0 every row adopted or already adopted (changed rows are
listed), 1 conflicts (listed on stdout), 2 error (bad query, no such id column,
a NULL id, ...; rows before the bad one stay adopted and a rerun goes on).";

#[derive(Args, Debug)]
pub(crate) struct AdoptArgs {
    /// The query whose rows to adopt, e.g. "SELECT * FROM customers".
    #[arg(long, value_name = "SQL")]
    pub(crate) query: String,
    /// The category of the new streams.
    #[arg(long, value_name = "C", value_parser = parse_category)]
    pub(crate) category: String,
    /// The column that holds each row's id (the stream is CATEGORY-ID).
    #[arg(long, value_name = "COL")]
    pub(crate) id_column: String,
    /// The event type of the adopted events.
    #[arg(long = "type", value_name = "T")]
    pub(crate) event_type: String,
    /// Their payload schema version.
    #[arg(long, value_name = "N", default_value = "1", value_parser = clap::value_parser!(u32).range(1..))]
    pub(crate) event_version: u32,
    /// Where the table is, if not in the store's database: sqlite://PATH or
    /// postgres://… (read only).
    #[arg(long, value_name = "URL")]
    pub(crate) source: Option<String>,
    /// Rows per atomic append.
    #[arg(long, value_name = "N", default_value = "100", value_parser = parse_batch_size)]
    pub(crate) batch_size: usize,
    /// Print the summary as one JSON object.
    #[arg(long)]
    pub(crate) json: bool,
}

const EXPORT_HELP: &str = "\
Events up to the head position found at the start are written, in global
order, one page at a time. Checkpoints are exported only without filters;
snapshots not with --since or --until (with --category, only its own).

Exit status: 0 exported, 2 error.";

const IMPORT_HELP: &str = "\
Events are written a batch at a time (--batch-size lines), each batch once
all its lines are read: a file cut or corrupt at line N stops with that line
named, having written the complete batches before it and nothing after;
checkpoints are saved only after the trailer was read and its counts match.
An event already stored identically is skipped; a stream whose events
disagree with the store (another event at a version, an id stored as another
event, a version gap) is reported with its first such version and none of its
events are written; the other streams are imported.

Exit status: 0 imported, 1 some streams conflicted (listed; the rest was
imported), 2 error (a bad or truncated file, an unreachable database, ...).";

#[derive(Args, Debug)]
pub(crate) struct ExportArgs {
    /// Only this category (repeatable).
    #[arg(long, value_name = "CATEGORY", value_parser = parse_category)]
    pub(crate) category: Vec<String>,
    /// Only events recorded at or after this instant (RFC 3339).
    #[arg(long, value_name = "RFC3339", value_parser = parse_time)]
    pub(crate) since: Option<DateTime<Utc>>,
    /// Only events recorded at or before this instant (RFC 3339).
    #[arg(long, value_name = "RFC3339", value_parser = parse_time)]
    pub(crate) until: Option<DateTime<Utc>>,
    /// Write to this file (zstd-compressed when it ends in .zst) instead of
    /// standard output.
    #[arg(long, short = 'o', value_name = "FILE")]
    pub(crate) output: Option<std::path::PathBuf>,
}

#[derive(Args, Debug)]
pub(crate) struct ImportArgs {
    /// The export file (.jsonl, or .jsonl.zst).
    #[arg(value_name = "FILE")]
    pub(crate) file: std::path::PathBuf,
    /// Events (and snapshots) per write.
    #[arg(long, value_name = "N", default_value = "500", value_parser = parse_batch_size)]
    pub(crate) batch_size: usize,
}

fn parse_batch_size(s: &str) -> Result<usize, String> {
    match s.parse::<usize>() {
        Ok(n) if (1..=100_000).contains(&n) => Ok(n),
        _ => Err(format!("{s:?} is not a batch size from 1 to 100000")),
    }
}

fn parse_partitions(s: &str) -> Result<u32, String> {
    match s.parse::<u32>() {
        Ok(n) if (1..=1024).contains(&n) => Ok(n),
        _ => Err(format!(
            "{s:?} is not a number of partitions from 1 to 1024"
        )),
    }
}

fn parse_retry_for(s: &str) -> Result<u32, String> {
    match s.parse::<u32>() {
        Ok(n) if n <= 86_400 => Ok(n),
        _ => Err(format!("{s:?} is not a number of seconds from 0 to 86400")),
    }
}

fn parse_lease_ttl(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(n) if (0.1..=3600.0).contains(&n) => Ok(n),
        _ => Err(format!("{s:?} is not a lease in seconds from 0.1 to 3600")),
    }
}

const SERVE_HELP: &str = "\
Prints `listening on http://ADDR` on stdout once bound (ADDR is the actual
address: with port 0 the system picks one). The gauges that need a query
(streams, events, head position, storage size; on PostgreSQL the horizon lag)
are refreshed every --interval; /health runs the checks of `annals check`,
with the same options, one request at a time. The library's counters (appends,
loads, snapshots) count what this process does; an application exposes its
own with `annals_cli::MetricsServer`. Metric names: docs/metrics.md.";

#[derive(Args, Debug)]
pub(crate) struct ServeArgs {
    /// The address to listen on.
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:9187")]
    pub(crate) metrics_addr: std::net::SocketAddr,
    /// How often the gauges that need a query are refreshed (as in 15s, 1m).
    #[arg(long, value_name = "DURATION", default_value = "15s", value_parser = parse_interval)]
    pub(crate) interval: std::time::Duration,
    #[command(flatten)]
    pub(crate) checks: CheckOptions,
}

impl Default for CheckOptions {
    /// The command line's defaults (a test holds them equal).
    fn default() -> Self {
        CheckOptions {
            clock_tolerance: std::time::Duration::from_secs(1),
            min_coverage: 0.0,
            stale_events: 1000,
            max_transaction_age: std::time::Duration::from_secs(60),
            max_findings: 100,
            max_projection_lag: 10_000,
            max_projection_age: std::time::Duration::from_secs(300),
        }
    }
}

/// A refresh interval: a duration above zero.
fn parse_interval(s: &str) -> Result<std::time::Duration, String> {
    let d = parse_duration(s)?;
    if d.is_zero() {
        return Err("the interval must be above zero".to_owned());
    }
    Ok(d)
}

const CHECK_HELP: &str = "\
Checks: schema (the database schema is behind this build, its migrations
pending: run `annals init`; or ahead of it), stream-versions
(stored events not exactly versions 1..head, or a head in `streams` that
disagrees), clock (recorded_at going backwards along the global order by more
than --clock-tolerance), decode (events of a registered aggregate type whose
type is unknown or whose payload does not decode), snapshot-ahead (a live
snapshot beyond its stream's head), snapshot-stale and snapshot-coverage
(warnings), horizon (PostgreSQL: a transaction open longer than
--max-transaction-age; an error when it holds a transaction id, which keeps
readers of the global order from passing it), upcast (events of a registered
aggregate type that the application's upcasters fail on: stream, version,
position), projection-lag (an error: a registered projection with a
checkpoint more than --max-projection-lag events behind the head, or whose
first unapplied event was recorded more than --max-projection-age before the
head event; projections that never ran are not checked), migration (a
warning: a copy-and-transform migration copying and not swapped, or the
backup table of a swap not dropped yet).

Exit status: 0 healthy (warnings alone are healthy), 1 an error finding, 2 the
checks could not run.";

#[derive(Args, Debug)]
pub(crate) struct CheckArgs {
    #[command(flatten)]
    pub(crate) options: CheckOptions,
    /// Print JSON Lines, one object per finding.
    #[arg(long)]
    pub(crate) json: bool,
}

/// The thresholds of the health checks (`annals check`, and `/health` of
/// `annals serve`).
#[derive(Args, Debug, Clone)]
pub(crate) struct CheckOptions {
    /// How far recorded_at may go backwards along the global order (as in
    /// 1s, 250ms, 2m; a bare number is seconds).
    #[arg(long, value_name = "DURATION", default_value = "1s", value_parser = parse_duration)]
    pub(crate) clock_tolerance: std::time::Duration,
    /// Warn about aggregate types where fewer than this percentage of
    /// aggregates have a live snapshot (0, the default, turns it off).
    #[arg(long, value_name = "PERCENT", default_value = "0", value_parser = parse_percent)]
    pub(crate) min_coverage: f64,
    /// Warn about live snapshots more than N events behind their head.
    #[arg(long, value_name = "N", default_value = "1000", value_parser = parse_count, allow_hyphen_values = true)]
    pub(crate) stale_events: u64,
    /// PostgreSQL: report transactions open longer than this.
    #[arg(long, value_name = "DURATION", default_value = "60s", value_parser = parse_duration)]
    pub(crate) max_transaction_age: std::time::Duration,
    /// Findings shown per check (the rest are counted in one more row).
    #[arg(long, value_name = "N", default_value = "100", value_parser = parse_max_findings, allow_hyphen_values = true)]
    pub(crate) max_findings: usize,
    /// Report registered projections more than N events behind the head.
    #[arg(long, value_name = "N", default_value = "10000", value_parser = parse_count, allow_hyphen_values = true)]
    pub(crate) max_projection_lag: u64,
    /// Report registered projections whose first unapplied event is older
    /// than this, measured from the head event's recorded_at.
    #[arg(long, value_name = "DURATION", default_value = "5m", value_parser = parse_duration)]
    pub(crate) max_projection_age: std::time::Duration,
}

/// `annals snapshots …`. `status`, `stale`, `delete`, `invalidate`,
/// `history`, `rollback` and `keep` work on any aggregate type; the others
/// fold events and need the type registered.
#[derive(Subcommand, Debug)]
#[command(after_help = SNAPSHOT_EXIT_CODES)]
pub(crate) enum SnapshotsCommand {
    /// Coverage per aggregate type: aggregates, with and without a snapshot,
    /// snapshots per schema version.
    Status(StatusArgs),
    /// Aggregates whose head is more than N events past their snapshot, that
    /// have none, or whose snapshot is ahead of the head (events restored
    /// from an older backup), by stream id; with --limit, the most behind.
    Stale(StaleArgs),
    /// Take a snapshot of one aggregate now (the type must be registered).
    Create(CreateArgs),
    /// Delete the snapshots of one aggregate; prints how many.
    Delete(DeleteArgs),
    /// Delete the snapshots of a type (optionally only those below a schema
    /// version); prints how many.
    Invalidate(InvalidateArgs),
    /// Snapshot existing aggregates that are stale (see `stale`), in
    /// aggregate-id order. Safe to interrupt and rerun: finished aggregates
    /// are not redone.
    Prepopulate(PrepopulateArgs),
    /// Build snapshots at the current schema version for every aggregate of
    /// a type into the staging table, while the application keeps using the
    /// live one. Resumable: a rerun skips what is staged already.
    Migrate(MigrateArgs),
    /// Fold staged aggregates from scratch and compare with the staged state
    /// (with --live, the live snapshots instead).
    Verify(VerifyArgs),
    /// Move the staged snapshots into the live table in one transaction,
    /// after verifying them (unless --force). A live snapshot that is newer
    /// at the same schema version is kept.
    Promote(PromoteArgs),
    /// List the snapshots kept for one aggregate: version, schema version,
    /// when written, which one is live and which were rolled back.
    History(HistoryArgs),
    /// Make an older snapshot of one aggregate live. The newer ones are kept
    /// but marked rolled back: loads never use them, and a write at or below
    /// their version (a retry of the bad one) is refused; the next snapshot
    /// of later events becomes live as usual.
    Rollback(RollbackArgs),
    /// Show, or set, how many snapshots the store keeps per aggregate (the
    /// live one included). The number is recorded in the database, so every
    /// process trims to it; setting it trims every aggregate at once.
    Keep(KeepArgs),
}

const SNAPSHOT_EXIT_CODES: &str = "\
Exit status:
  0  success
  1  a check failed: an aggregate that does not exist, or a snapshot that
     was built but not stored because a newer one is kept (create; the reason
     names it), aggregates that failed (prepopulate, migrate; listed with
     their reason), staged or live snapshots that do not match a replay
     (verify), or a promote blocked by that verification
  2  error: bad input, an aggregate type this binary does not register (for
     create, prepopulate, migrate, verify, promote), no snapshot at the
     version to roll back to, unreachable database, ...

Progress bars are drawn on stderr when it is a terminal.";

#[derive(Args, Debug)]
pub(crate) struct StatusArgs {
    /// Only this aggregate type.
    #[arg(value_name = "TYPE", value_parser = parse_category)]
    pub(crate) aggregate_type: Option<String>,
    /// Print JSON Lines, one object per type.
    #[arg(long)]
    pub(crate) json: bool,
}

#[derive(Args, Debug)]
pub(crate) struct StaleArgs {
    /// List aggregates more than this many events past their snapshot.
    #[arg(long, value_name = "N", default_value = "0", value_parser = parse_count, allow_hyphen_values = true)]
    pub(crate) min_events: u64,
    /// Only this aggregate type.
    #[arg(long = "type", value_name = "TYPE", value_parser = parse_category)]
    pub(crate) aggregate_type: Option<String>,
    /// Only the N most behind, most behind first (without it every stale
    /// aggregate is listed, by stream id, as the store pages through them).
    #[arg(long, value_name = "N", value_parser = parse_count, allow_hyphen_values = true)]
    pub(crate) limit: Option<u64>,
    /// Print JSON Lines, one object per aggregate.
    #[arg(long)]
    pub(crate) json: bool,
}

#[derive(Args, Debug)]
pub(crate) struct CreateArgs {
    /// The aggregate type, as registered.
    #[arg(value_name = "TYPE")]
    pub(crate) aggregate_type: String,
    /// The aggregate id.
    #[arg(value_name = "ID")]
    pub(crate) id: String,
    /// Print the snapshot as one JSON object.
    #[arg(long)]
    pub(crate) json: bool,
}

#[derive(Args, Debug)]
pub(crate) struct DeleteArgs {
    /// The aggregate type.
    #[arg(value_name = "TYPE", value_parser = parse_category)]
    pub(crate) aggregate_type: String,
    /// The aggregate id.
    #[arg(value_name = "ID")]
    pub(crate) id: String,
    /// Print one JSON object.
    #[arg(long)]
    pub(crate) json: bool,
}

#[derive(Args, Debug)]
pub(crate) struct InvalidateArgs {
    /// The aggregate type.
    #[arg(value_name = "TYPE", value_parser = parse_category)]
    pub(crate) aggregate_type: String,
    /// Only snapshots whose schema version is below N.
    #[arg(long, value_name = "N", value_parser = parse_schema_version, allow_hyphen_values = true)]
    pub(crate) schema_version_below: Option<u32>,
    /// Print one JSON object.
    #[arg(long)]
    pub(crate) json: bool,
}

#[derive(Args, Debug)]
pub(crate) struct PrepopulateArgs {
    /// The aggregate type, as registered.
    #[arg(value_name = "TYPE")]
    pub(crate) aggregate_type: String,
    /// Only aggregates more than N events past their snapshot (0: every one
    /// without an up-to-date snapshot).
    #[arg(long, value_name = "N", default_value = "0", value_parser = parse_count, allow_hyphen_values = true)]
    pub(crate) min_events: u64,
    /// Aggregates processed at once.
    #[arg(long, value_name = "C", default_value = "4", value_parser = parse_concurrency, allow_hyphen_values = true)]
    pub(crate) concurrency: usize,
    /// Print the report as one JSON object.
    #[arg(long)]
    pub(crate) json: bool,
}

#[derive(Args, Debug)]
pub(crate) struct MigrateArgs {
    /// The aggregate type, as registered.
    #[arg(value_name = "TYPE")]
    pub(crate) aggregate_type: String,
    /// Discard the type's staged snapshots first and build every one again
    /// (after fixing code that staged wrong states; a plain rerun keeps them).
    #[arg(long)]
    pub(crate) restart: bool,
    /// Aggregates processed at once.
    #[arg(long, value_name = "C", default_value = "4", value_parser = parse_concurrency, allow_hyphen_values = true)]
    pub(crate) concurrency: usize,
    /// Print the report as one JSON object.
    #[arg(long)]
    pub(crate) json: bool,
}

#[derive(Args, Debug)]
pub(crate) struct VerifyArgs {
    /// The aggregate type, as registered.
    #[arg(value_name = "TYPE")]
    pub(crate) aggregate_type: String,
    /// Check the live snapshots (the ones loads use) instead of the staged
    /// ones.
    #[arg(long)]
    pub(crate) live: bool,
    /// Check this many aggregates, evenly spread over the ids (default: all).
    #[arg(long, value_name = "N", value_parser = parse_sample, allow_hyphen_values = true)]
    pub(crate) sample: Option<usize>,
    /// Print the report as one JSON object.
    #[arg(long)]
    pub(crate) json: bool,
}

#[derive(Args, Debug)]
pub(crate) struct PromoteArgs {
    /// The aggregate type, as registered.
    #[arg(value_name = "TYPE")]
    pub(crate) aggregate_type: String,
    /// Promote without verifying (or despite mismatches).
    #[arg(long, conflicts_with = "verify_sample")]
    pub(crate) force: bool,
    /// Verify this many staged aggregates first (default: all).
    #[arg(long, value_name = "N", value_parser = parse_sample, allow_hyphen_values = true)]
    pub(crate) verify_sample: Option<usize>,
    /// Print the report as one JSON object.
    #[arg(long)]
    pub(crate) json: bool,
}

#[derive(Args, Debug)]
pub(crate) struct HistoryArgs {
    /// The aggregate type.
    #[arg(value_name = "TYPE", value_parser = parse_category)]
    pub(crate) aggregate_type: String,
    /// The aggregate id.
    #[arg(value_name = "ID")]
    pub(crate) id: String,
    /// Print JSON Lines, one object per snapshot.
    #[arg(long)]
    pub(crate) json: bool,
}

#[derive(Args, Debug)]
pub(crate) struct RollbackArgs {
    /// The aggregate type.
    #[arg(value_name = "TYPE", value_parser = parse_category)]
    pub(crate) aggregate_type: String,
    /// The aggregate id.
    #[arg(value_name = "ID")]
    pub(crate) id: String,
    /// The version of the snapshot to make live (see `annals snapshots
    /// history`).
    #[arg(long, value_name = "V", value_parser = parse_version, allow_hyphen_values = true)]
    pub(crate) to_version: StreamVersion,
    /// Print one JSON object.
    #[arg(long)]
    pub(crate) json: bool,
}

#[derive(Args, Debug)]
pub(crate) struct KeepArgs {
    /// Snapshots to keep per aggregate, 1 or more (omit to show the current
    /// number).
    #[arg(value_name = "N", value_parser = parse_history_size, allow_hyphen_values = true)]
    pub(crate) keep: Option<u32>,
    /// Print one JSON object.
    #[arg(long)]
    pub(crate) json: bool,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub(crate) enum BackendArg {
    /// Embedded SQLite.
    Sqlite,
    /// PostgreSQL.
    #[value(alias = "postgresql", alias = "pg")]
    Postgres,
}

impl From<BackendArg> for Backend {
    fn from(b: BackendArg) -> Backend {
        match b {
            BackendArg::Sqlite => Backend::Sqlite,
            BackendArg::Postgres => Backend::Postgres,
        }
    }
}

#[derive(Args, Debug)]
pub(crate) struct AppendArgs {
    /// The stream, `<Category>-<id>` (for example Account-42).
    #[arg(value_parser = parse_stream)]
    pub(crate) stream: StreamId,
    /// The event type.
    #[arg(long = "type", value_name = "TYPE")]
    pub(crate) event_type: String,
    /// The payload, a JSON value; `@FILE` reads it from a file and `-` from
    /// standard input (for payloads beyond the shell's argument limit).
    #[arg(long, value_name = "JSON|@FILE|-", value_parser = parse_data, allow_hyphen_values = true)]
    pub(crate) data: JsonInput<Value>,
    /// The payload's schema version (1 or more).
    #[arg(long, value_name = "N", default_value = "1", value_parser = parse_event_version, allow_hyphen_values = true)]
    pub(crate) event_version: u32,
    /// Metadata, a JSON object (correlation_id and causation_id must be
    /// UUIDs); `@FILE` reads it from a file and `-` from standard input.
    #[arg(long, value_name = "JSON|@FILE|-", value_parser = parse_metadata_input, allow_hyphen_values = true)]
    pub(crate) metadata: Option<JsonInput<Metadata>>,
    /// The stream head the append expects: any, no-stream, exists or a
    /// version N (0 means no stream).
    #[arg(long, value_name = "any|no-stream|exists|N", default_value = "any", value_parser = parse_expected, allow_hyphen_values = true)]
    pub(crate) expected_version: ExpectedVersion,
    /// The event id (a UUID), for idempotent retries: appending the same
    /// event again is a no-op. Default: a fresh UUID v7.
    #[arg(long, value_name = "UUID")]
    pub(crate) event_id: Option<uuid::Uuid>,
    /// Print JSON Lines.
    #[arg(long)]
    pub(crate) json: bool,
}

#[derive(Args, Debug)]
pub(crate) struct ReadArgs {
    /// The stream, `<Category>-<id>`.
    #[arg(value_parser = parse_stream)]
    pub(crate) stream: StreamId,
    /// First version to show (inclusive).
    #[arg(long, value_name = "VERSION", value_parser = parse_version, allow_hyphen_values = true)]
    pub(crate) from: Option<StreamVersion>,
    /// Time travel: ignore events recorded after this instant (RFC 3339, for
    /// example 2025-01-31T12:00:00Z); the same as --until.
    #[arg(long, value_name = "RFC3339", value_parser = parse_time, conflicts_with_all = ["until", "follow"])]
    pub(crate) as_of: Option<DateTime<Utc>>,
    /// Only events of this type (repeatable).
    #[arg(long = "type", value_name = "TYPE")]
    pub(crate) event_type: Vec<String>,
    /// Only events recorded at or after this instant (RFC 3339).
    #[arg(long, value_name = "RFC3339", value_parser = parse_time)]
    pub(crate) since: Option<DateTime<Utc>>,
    /// Only events recorded at or before this instant (RFC 3339).
    #[arg(long, value_name = "RFC3339", value_parser = parse_time, conflicts_with = "follow")]
    pub(crate) until: Option<DateTime<Utc>>,
    /// At most this many events (after the filters; with --follow, in all).
    #[arg(long, value_name = "N", value_parser = parse_count, allow_hyphen_values = true)]
    pub(crate) limit: Option<u64>,
    /// Newest first.
    #[arg(long, conflicts_with = "follow")]
    pub(crate) backward: bool,
    #[command(flatten)]
    pub(crate) follow: FollowArgs,
    #[command(flatten)]
    pub(crate) upcast: UpcastArgs,
    /// Print JSON Lines.
    #[arg(long)]
    pub(crate) json: bool,
}

#[derive(Args, Debug)]
pub(crate) struct ReadAllArgs {
    /// Show events strictly after this global position (`N` or `COMMIT:SEQ`,
    /// as printed in the POSITION column).
    #[arg(long, value_name = "POS", value_parser = parse_position, allow_hyphen_values = true)]
    pub(crate) from: Option<GlobalPosition>,
    /// At most this many events (with --follow, in all).
    #[arg(long, value_name = "N", value_parser = parse_count, allow_hyphen_values = true)]
    pub(crate) limit: Option<u64>,
    /// Only this category (repeatable).
    #[arg(long, value_name = "CATEGORY")]
    pub(crate) category: Vec<String>,
    /// Only this event type (repeatable).
    #[arg(long = "type", value_name = "TYPE")]
    pub(crate) event_type: Vec<String>,
    /// Only events recorded at or after this instant (RFC 3339). A filter:
    /// the read still walks the global order (recorded_at need not grow
    /// along it).
    #[arg(long, value_name = "RFC3339", value_parser = parse_time)]
    pub(crate) since: Option<DateTime<Utc>>,
    /// Only events recorded at or before this instant (RFC 3339).
    #[arg(long, value_name = "RFC3339", value_parser = parse_time, conflicts_with = "follow")]
    pub(crate) until: Option<DateTime<Utc>>,
    #[command(flatten)]
    pub(crate) follow: FollowArgs,
    #[command(flatten)]
    pub(crate) upcast: UpcastArgs,
    /// Print JSON Lines.
    #[arg(long)]
    pub(crate) json: bool,
}

/// How a read command treats events stored at older payload versions.
#[derive(Args, Debug, Default)]
pub(crate) struct UpcastArgs {
    /// Upcast the events with this plan: a TOML file of steps (event_type,
    /// from_version, rename_to, and a jq filter for the payload), in place of
    /// the application's upcasters. Upcasted events show the version they
    /// are stored at.
    #[arg(long, value_name = "FILE")]
    pub(crate) plan: Option<std::path::PathBuf>,
    /// Show events as stored: no upcasting.
    #[arg(long, conflicts_with = "plan")]
    pub(crate) raw: bool,
}

/// Tailing a read.
#[derive(Args, Debug)]
pub(crate) struct FollowArgs {
    /// After the events stored now, keep waiting for new ones and print
    /// them as they arrive, until interrupted (or --limit events).
    #[arg(long)]
    pub(crate) follow: bool,
    /// With --follow: how long to wait between two looks for new events,
    /// from 10ms (as in 500ms, 2s).
    #[arg(long, value_name = "DURATION", default_value = "500ms", value_parser = parse_poll_interval, requires = "follow")]
    pub(crate) poll_interval: std::time::Duration,
}

#[derive(Args, Debug)]
pub(crate) struct StatsArgs {
    /// How many of the largest streams to list.
    #[arg(long, value_name = "N", default_value = "10", value_parser = parse_count, allow_hyphen_values = true)]
    pub(crate) top: u64,
    /// Print one JSON object.
    #[arg(long)]
    pub(crate) json: bool,
}

#[derive(Args, Debug)]
pub(crate) struct AggregateArgs {
    /// The aggregate type, as registered (for example Account).
    #[arg(value_name = "TYPE")]
    pub(crate) aggregate_type: String,
    /// The aggregate id (the stream name after `<TYPE>-`).
    #[arg(value_name = "ID")]
    pub(crate) id: String,
    /// Time travel: the state as of this stream version (full replay).
    #[arg(long, value_name = "VERSION", value_parser = parse_version, allow_hyphen_values = true)]
    pub(crate) at_version: Option<StreamVersion>,
    /// Time travel: the state at this instant (RFC 3339), folded from the
    /// events recorded at or before it (full replay; the first event
    /// recorded later ends the fold).
    #[arg(long, value_name = "RFC3339", value_parser = parse_time, conflicts_with = "at_version")]
    pub(crate) as_of: Option<DateTime<Utc>>,
    /// Ignore snapshots and replay the whole stream.
    #[arg(long)]
    pub(crate) no_snapshot: bool,
    #[command(flatten)]
    pub(crate) upcast: UpcastArgs,
    /// Print one JSON object.
    #[arg(long)]
    pub(crate) json: bool,
}

#[derive(Args, Debug)]
pub(crate) struct EventArgs {
    /// The event's id (a UUID) or its global position (`N` or `COMMIT:SEQ`,
    /// as printed in the POSITION column).
    #[arg(value_name = "ID|POSITION", value_parser = parse_event_ref)]
    pub(crate) event: EventRef,
    /// At most this many events of its correlation, and of the events it
    /// caused, are shown (the rest are counted).
    #[arg(long, value_name = "N", default_value = "1000", value_parser = parse_count, allow_hyphen_values = true)]
    pub(crate) limit: u64,
    #[command(flatten)]
    pub(crate) upcast: UpcastArgs,
    /// Print one JSON object.
    #[arg(long)]
    pub(crate) json: bool,
}

/// How `annals event` names an event.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum EventRef {
    /// By its id.
    Id(annals::EventId),
    /// By its global position.
    Position(GlobalPosition),
}

#[derive(Args, Debug)]
pub(crate) struct DemoArgs {
    /// Accounts to open.
    #[arg(long, default_value = "5", value_name = "N", value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub(crate) accounts: u32,
    /// Deposits and withdrawals to attempt.
    #[arg(long, default_value = "50", value_name = "M", value_parser = parse_count, allow_hyphen_values = true)]
    pub(crate) operations: u64,
    /// Seed of the pseudo-random choice of account, operation and amount:
    /// the same seed makes the same run.
    #[arg(long, default_value = "42", value_name = "SEED")]
    pub(crate) seed: u64,
    /// Print the summary as one JSON object.
    #[arg(long)]
    pub(crate) json: bool,
}

fn parse_stream(s: &str) -> Result<StreamId, String> {
    StreamId::parse(s).map_err(|e| e.to_string())
}

fn parse_json(s: &str) -> Result<Value, String> {
    serde_json::from_str(s).map_err(|e| format!("not valid JSON: {e}"))
}

fn parse_metadata(s: &str) -> Result<Metadata, String> {
    Metadata::from_value(parse_json(s)?)
}

/// A JSON option's value: given inline (parsed and checked here), or the
/// name of where to read it, which the command reads before it opens the
/// database (reading here would block the async runtime).
#[derive(Clone, Debug, PartialEq)]
pub(crate) enum JsonInput<T> {
    /// The value itself.
    Inline(T),
    /// `@PATH`: the contents of a file.
    File(std::path::PathBuf),
    /// `-`: standard input.
    Stdin,
}

fn parse_json_input<T>(
    s: &str,
    inline: impl FnOnce(&str) -> Result<T, String>,
) -> Result<JsonInput<T>, String> {
    if s == "-" {
        return Ok(JsonInput::Stdin);
    }
    match s.strip_prefix('@') {
        Some("") => Err("expected a file name after @ (as in @event.json)".to_owned()),
        Some(path) => Ok(JsonInput::File(path.into())),
        None => inline(s).map(JsonInput::Inline),
    }
}

fn parse_data(s: &str) -> Result<JsonInput<Value>, String> {
    parse_json_input(s, parse_json)
}

fn parse_metadata_input(s: &str) -> Result<JsonInput<Metadata>, String> {
    parse_json_input(s, parse_metadata)
}

fn parse_expected(s: &str) -> Result<ExpectedVersion, String> {
    s.parse()
}

fn parse_u64(s: &str, what: &str) -> Result<u64, String> {
    s.trim()
        .parse::<u64>()
        .map_err(|_| format!("expected {what}, got {s:?}"))
}

fn parse_version(s: &str) -> Result<StreamVersion, String> {
    match parse_u64(s, "a stream version (1 or more)")? {
        0 => Err("stream versions start at 1".to_owned()),
        v => Ok(StreamVersion(v)),
    }
}

fn parse_event_version(s: &str) -> Result<u32, String> {
    match s.trim().parse::<u32>() {
        Ok(0) => Err("event versions start at 1".to_owned()),
        Ok(v) => Ok(v),
        Err(_) => Err(format!("expected an event version (1 or more), got {s:?}")),
    }
}

fn parse_count(s: &str) -> Result<u64, String> {
    parse_u64(s, "a count (0 or more)")
}

fn parse_category(s: &str) -> Result<String, String> {
    annals::validate_category(s)
        .map(|()| s.to_owned())
        .map_err(|e| e.to_string())
}

fn parse_schema_version(s: &str) -> Result<u32, String> {
    s.trim()
        .parse::<u32>()
        .map_err(|_| format!("expected a schema version (0 or more), got {s:?}"))
}

fn parse_concurrency(s: &str) -> Result<usize, String> {
    match s.trim().parse::<usize>() {
        Ok(n) if (1..=MAX_CONCURRENCY).contains(&n) => Ok(n),
        _ => Err(format!(
            "expected a concurrency from 1 to {MAX_CONCURRENCY}, got {s:?}"
        )),
    }
}

fn parse_sample(s: &str) -> Result<usize, String> {
    match s.trim().parse::<usize>() {
        Ok(0) => Err("a sample checks at least 1 aggregate".to_owned()),
        Ok(n) => Ok(n),
        Err(_) => Err(format!("expected a sample size (1 or more), got {s:?}")),
    }
}

fn parse_history_size(s: &str) -> Result<u32, String> {
    match s.trim().parse::<u32>() {
        Ok(0) => Err("the store keeps at least 1 snapshot per aggregate (the live one)".to_owned()),
        Ok(n) => Ok(n),
        Err(_) => Err(format!(
            "expected a number of snapshots (1 or more), got {s:?}"
        )),
    }
}

fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (number, unit) = t.split_at(split);
    let scale = match unit.trim() {
        "" | "s" => 1.0,
        "ms" => 0.001,
        "m" | "min" => 60.0,
        "h" => 3600.0,
        _ => f64::NAN,
    };
    match number.parse::<f64>() {
        Ok(n) if scale.is_finite() => std::time::Duration::try_from_secs_f64(n * scale)
            .map_err(|e| format!("duration {s:?} out of range: {e}")),
        _ => Err(format!(
            "expected a duration such as 1s, 250ms, 2m or 1h, got {s:?}"
        )),
    }
}

/// The shortest wait between two looks of a follower: a shorter one would
/// keep a database busy answering "nothing new".
const MIN_POLL_INTERVAL: std::time::Duration = std::time::Duration::from_millis(10);

fn parse_poll_interval(s: &str) -> Result<std::time::Duration, String> {
    match parse_duration(s)? {
        d if d < MIN_POLL_INTERVAL => Err(format!("a poll interval is at least 10ms, got {s:?}")),
        d => Ok(d),
    }
}

fn parse_percent(s: &str) -> Result<f64, String> {
    match s.trim().trim_end_matches('%').parse::<f64>() {
        Ok(p) if (0.0..=100.0).contains(&p) => Ok(p),
        _ => Err(format!("expected a percentage from 0 to 100, got {s:?}")),
    }
}

fn parse_max_findings(s: &str) -> Result<usize, String> {
    match s.trim().parse::<usize>() {
        Ok(n) if n >= 1 => Ok(n),
        _ => Err(format!(
            "expected a number of findings (1 or more), got {s:?}"
        )),
    }
}

fn parse_position(s: &str) -> Result<GlobalPosition, String> {
    s.parse::<GlobalPosition>().map_err(|e| e.to_string())
}

fn parse_event_ref(s: &str) -> Result<EventRef, String> {
    let t = s.trim();
    if let Ok(id) = uuid::Uuid::parse_str(t) {
        return Ok(EventRef::Id(annals::EventId(id)));
    }
    t.parse::<GlobalPosition>()
        .map(EventRef::Position)
        .map_err(|_| {
            format!(
                "expected an event id (a UUID) or a global position (N or COMMIT:SEQ), got {s:?}"
            )
        })
}

fn parse_time(s: &str) -> Result<DateTime<Utc>, String> {
    DateTime::parse_from_rfc3339(s.trim())
        .map(|t| t.with_timezone(&Utc))
        .map_err(|e| format!("expected an RFC 3339 time such as 2025-01-31T12:00:00Z ({e})"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_is_well_formed() {
        Cli::command().debug_assert();
    }

    #[test]
    fn check_options_default_to_the_command_line_defaults() {
        let cli = Cli::try_parse_from(["annals", "check"]).expect("parses");
        let Command::Check(args) = cli.command else {
            panic!("not check: {:?}", cli.command);
        };
        let d = CheckOptions::default();
        let o = args.options;
        assert_eq!(
            (o.clock_tolerance, o.stale_events, o.max_transaction_age),
            (d.clock_tolerance, d.stale_events, d.max_transaction_age)
        );
        assert_eq!(
            (o.min_coverage, o.max_findings),
            (d.min_coverage, d.max_findings)
        );
        assert_eq!(
            (o.max_projection_lag, o.max_projection_age),
            (d.max_projection_lag, d.max_projection_age)
        );
    }

    #[test]
    fn value_parsers_reject_bad_input() {
        assert!(parse_expected("-1").is_err());
        assert_eq!(parse_expected("no-stream"), Ok(ExpectedVersion::NoStream));
        assert!(parse_version("0").is_err());
        assert!(parse_version("-3").is_err());
        assert_eq!(parse_version("3"), Ok(StreamVersion(3)));
        assert!(parse_position("x").is_err());
        assert_eq!(parse_position("5:9"), Ok(GlobalPosition::new(5, 9)));
        assert!(parse_json("{").is_err());
        assert!(parse_metadata("[1]").is_err());
        assert_eq!(parse_data("-"), Ok(JsonInput::Stdin));
        assert_eq!(
            parse_data("-1"),
            Ok(JsonInput::Inline(serde_json::json!(-1)))
        );
        assert_eq!(
            parse_data("@some file.json"),
            Ok(JsonInput::File("some file.json".into()))
        );
        assert!(parse_data("@").is_err());
        assert!(parse_metadata_input("{\"correlation_id\": \"req-123\"}").is_err());
        assert_eq!(parse_metadata_input("-"), Ok(JsonInput::Stdin));
        assert!(parse_time("yesterday").is_err());
        assert!(parse_event_version("0").is_err());
        let ms = std::time::Duration::from_millis;
        assert_eq!(parse_duration("1s"), Ok(ms(1000)));
        assert_eq!(parse_duration("250ms"), Ok(ms(250)));
        assert_eq!(parse_duration("2m"), Ok(ms(120_000)));
        assert_eq!(parse_duration("1.5"), Ok(ms(1500)));
        assert!(parse_duration("soon").is_err());
        assert!(parse_duration("-1s").is_err());
        assert!(parse_duration("5 days").is_err());
        assert!(parse_percent("101").is_err());
        assert_eq!(parse_percent("50%"), Ok(50.0));
        assert!(parse_max_findings("0").is_err());
        assert!(parse_poll_interval("1ms").is_err());
        assert_eq!(
            parse_event_ref("12"),
            Ok(EventRef::Position(GlobalPosition::from_seq(12)))
        );
        assert_eq!(
            parse_event_ref("7:3"),
            Ok(EventRef::Position(GlobalPosition::new(7, 3)))
        );
        assert!(matches!(
            parse_event_ref("0190a1b2-0000-7000-8000-000000000001"),
            Ok(EventRef::Id(_))
        ));
        assert!(parse_event_ref("last").is_err());
        assert_eq!(parse_poll_interval("250ms"), Ok(ms(250)));
    }
}
