//! The `annals` operations CLI, and the library to build an application's
//! own ops binary with its aggregates compiled in.
//!
//! # Overview
//!
//! - [`App`]: the command line. [`App::register`] adds an aggregate type so
//!   that domain commands (`annals aggregate TYPE ID`) can fold its events;
//!   [`App::run`] parses arguments, runs one command and returns the exit code.
//! - [`AnyStore`]: the store a database URL names (`sqlite://PATH` or
//!   `postgres://…`), from the `annals-any` crate (re-exported here; an
//!   application that needs only the store depends on `annals-any`). It
//!   implements every trait of the core by delegation, so every generic
//!   function of the core runs on it.
//! - [`AggregateOps`] and [`Registered`]: the type-erased registry behind
//!   [`App::register`], with the snapshot jobs of a registered type.
//! - [`MetricsServer`]: `/metrics` and `/health` over HTTP (`annals
//!   serve`), which an application can also run on its own recorder.
//!
//! The database comes from `--database-url` or `ANNALS_DATABASE_URL`
//! (default `sqlite://annals.db`). Output is an aligned table by default and
//! JSON Lines with `--json`: one object per event with the model's fields
//! (`event_id`, `stream_id`, `stream_version`, `global_position`,
//! `event_type`, `event_version`, `data`, `metadata`, `recorded_at`).
//!
//! # Exit codes
//!
//! - `0`: success. A closed output pipe (`annals read-all | head`) is success.
//! - `1`: a check failed: an append's expected version did not match (the
//!   message names the actual version), the demo's consistency check failed,
//!   an aggregate has no events (with `--as-of`: none recorded by then), or
//!   `annals event` found no event with that id or position. For `annals
//!   snapshots`: `create` built a snapshot that the guarded write did not
//!   store (the message names the snapshot that kept it out),
//!   `prepopulate` or `migrate` left aggregates
//!   that failed, `verify` found staged (or, with `--live`, live) snapshots
//!   that do not match a replay, or `promote` was refused by that
//!   verification. These print their whole report on stdout first.
//!   For `annals check`: a finding of severity error (the findings are on
//!   stdout; warnings alone exit 0, and a schema that needs `annals init` is
//!   a finding there rather than an error). For `annals adopt`: rows whose
//!   streams exist and were not started by `adopt` (listed on stdout).
//! - `2`: error: bad input, an unknown URL scheme, an unreachable database, a
//!   schema that needs `annals init` (except for `annals check`), an
//!   aggregate type the binary does not register (for the commands that
//!   fold events). The message is one line on stderr; bad input is refused
//!   before anything is written.
//!
//! # Snapshots
//!
//! `annals snapshots status|stale|delete|invalidate|history|rollback|keep`
//! run on the [`annals::SnapshotStore`] and [`annals::SnapshotAdmin`] queries
//! and work for any aggregate type;
//! `annals snapshots create|prepopulate|migrate|verify|promote` run
//! [`annals::SnapshotJobs`] through [`AggregateOps`] and need the type
//! registered. Long jobs draw a progress bar on stderr when it is a terminal
//! and print a summary (`--json`: one object) when they end. The number of
//! snapshots kept per aggregate is the store's own setting (`keep`), never
//! an option of the CLI, so no command trims an application's history.
//!
//! # Example
//!
//! An ops binary for an application whose domain is the bank `Account`: run
//! the demo on a temporary SQLite file, then inspect one account.
//!
//! ```
//! use std::process::ExitCode;
//!
//! use annals::bank::Account;
//! use annals_cli::App;
//!
//! # tokio::runtime::Runtime::new()?.block_on(async {
//! let dir = tempfile::tempdir()?;
//! let url = format!("sqlite://{}", dir.path().join("bank.db").display());
//!
//! let app = || App::new().register::<Account>();
//! let demo = ["annals", "demo", "--accounts", "3", "--operations", "20", "--database-url", &url];
//! assert_eq!(app().run(demo).await, ExitCode::SUCCESS);
//!
//! let show = ["annals", "aggregate", "Account", "demo1-1", "--json", "--database-url", &url];
//! assert_eq!(app().run(show).await, ExitCode::SUCCESS);
//!
//! // Commands that need no database work anywhere.
//! assert_eq!(app().run(["annals", "schema", "--backend", "sqlite"]).await, ExitCode::SUCCESS);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! # })?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! # Crate features
//!
//! None: both backends are always compiled in, so one binary serves SQLite
//! and PostgreSQL.
//!
//! See `docs/architecture.md` in the repository for the crates and how an
//! event flows through them.
#![forbid(unsafe_code)]
#![deny(missing_docs)]

// The README's Rust examples, compiled and run as doctests of this crate
// (the one that depends on every other), so they cannot rot.
#[doc = include_str!("../../../README.md")]
#[cfg(doctest)]
pub struct ReadmeDoctests;

mod adopt;
pub mod archive;
mod check;
mod cli;
mod commands;
mod demo;
mod event;
mod events_cmd;
mod gdpr;
mod keys;
mod output;
mod progress;
mod projections;
mod projections_cmd;
mod read;
mod registry;
mod serve;
mod snapshots;
mod store;
pub mod transfer;

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::io::{self, Write};
use std::process::ExitCode;
use std::sync::Arc;

use clap::Parser;

pub use projections::{
    account_balances, AccountBalances, BalanceRow, ProjectionOps, ReadModelDb, RebuildRequest,
    RunningProjection, ACCOUNT_BALANCES_TABLE,
};
pub use registry::{
    ops_store, AggregateOps, AggregateView, CreateOutcome, LoadRequest, OpsStore, Registered,
};
pub use serve::{describe_serve_metrics, prometheus_recorder, MetricsServer, SERVE_METRICS};
pub use store::{AnyStore, Backend, DatabaseUrl, OpenOptions, DEFAULT_DATABASE_URL};

/// Exit code of a failed check (a conflict, a failed demo check).
const EXIT_CHECK_FAILED: u8 = 1;
/// Exit code of an error.
const EXIT_ERROR: u8 = 2;

/// How a command ended, when it did not fail outright.
pub(crate) enum Outcome {
    Success,
    /// A check failed; the message goes to stderr and the exit code is 1.
    CheckFailed(String),
}

/// The `annals` command line, with the aggregate types it knows.
///
/// `App::new()` knows none; register the application's aggregates with
/// [`App::register`] (the stock `annals` binary registers the demo's
/// [`annals::bank::Account`]).
#[derive(Clone, Default)]
pub struct App {
    aggregates: BTreeMap<&'static str, Arc<dyn AggregateOps>>,
    upcasters: Option<Arc<annals::Upcasters>>,
    projections: projections::Registry,
}

impl std::fmt::Debug for App {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("App")
            .field("aggregates", &self.aggregates.keys().collect::<Vec<_>>())
            .field("upcasters", &self.upcasters)
            .field("projections", &self.projections.keys().collect::<Vec<_>>())
            .finish()
    }
}

impl App {
    /// An app with no aggregate types.
    pub fn new() -> Self {
        Self::default()
    }

    /// Upcasts every event the commands read with `upcasters` (the
    /// application's own, see [`annals::Upcasters`]). The read commands'
    /// `--plan FILE` replaces them for one run, and `--raw` reads as stored.
    pub fn with_upcasters(mut self, upcasters: Arc<annals::Upcasters>) -> Self {
        self.upcasters = Some(upcasters);
        self
    }

    /// An app that knows the demo domain, [`annals::bank::Account`], and
    /// its projection [`AccountBalances`].
    pub fn with_demo() -> Self {
        Self::new()
            .register::<annals::bank::Account>()
            .register_projection(Arc::new(AccountBalances))
    }

    /// Registers a projection under [`ProjectionOps::name`] (registering a
    /// name twice keeps the last), for `annals projections`, the
    /// `projection-lag` check of `annals check`, and (for
    /// [`AccountBalances`]) `annals demo`.
    pub fn register_projection(mut self, projection: Arc<dyn ProjectionOps>) -> Self {
        self.projections
            .insert(projection.name().to_owned(), projection);
        self
    }

    /// The registered projections, sorted by name.
    pub fn projections(&self) -> impl Iterator<Item = &dyn ProjectionOps> + '_ {
        self.projections.values().map(|p| &**p)
    }

    /// A registered projection.
    pub fn projection(&self, name: &str) -> Option<&dyn ProjectionOps> {
        self.projections.get(name).map(|p| &**p)
    }

    /// Registers aggregate type `A` under [`annals::Aggregate::TYPE`]
    /// (registering a type twice keeps the last).
    pub fn register<A: annals::Aggregate>(self) -> Self {
        self.register_ops(Arc::new(Registered::<A>::new()))
    }

    /// Registers hand-written [`AggregateOps`] (to wrap or fake a type).
    pub fn register_ops(mut self, ops: Arc<dyn AggregateOps>) -> Self {
        self.aggregates.insert(ops.aggregate_type(), ops);
        self
    }

    /// The registered aggregate types, sorted.
    pub fn aggregate_types(&self) -> impl Iterator<Item = &'static str> + '_ {
        self.aggregates.keys().copied()
    }

    /// The registered aggregate types with their operations.
    pub(crate) fn aggregate_map(&self) -> BTreeMap<&'static str, Arc<dyn AggregateOps>> {
        self.aggregates.clone()
    }

    /// The operations of a registered aggregate type.
    pub fn aggregate(&self, aggregate_type: &str) -> Option<&dyn AggregateOps> {
        self.aggregates.get(aggregate_type).map(|ops| &**ops)
    }

    /// Parses `args` (the first item is the program name, as in
    /// [`std::env::args_os`]), runs the command with output to stdout and
    /// returns the exit code. Errors are one line on stderr.
    ///
    /// Also installs a `tracing` subscriber that logs to stderr, filtered by
    /// `RUST_LOG` (default `error`: the command reports its own failure, and
    /// warnings such as a snapshot passed over are shown by `aggregate`
    /// itself), unless one is installed already.
    pub async fn run<I, T>(self, args: I) -> ExitCode
    where
        I: IntoIterator<Item = T>,
        T: Into<OsString> + Clone,
    {
        let mut out = io::BufWriter::new(io::stdout());
        self.run_with_output(args, &mut out).await
    }

    /// [`App::run`] with the command's output written to `out` instead of
    /// stdout (help, errors and logs still go to stdout and stderr).
    pub async fn run_with_output<I, T, W>(self, args: I, out: &mut W) -> ExitCode
    where
        I: IntoIterator<Item = T>,
        T: Into<OsString> + Clone,
        W: Write + Send,
    {
        init_tracing();
        let cli = match cli::Cli::try_parse_from(args) {
            Ok(cli) => cli,
            Err(e) => return clap_exit(&e),
        };
        // The `metrics` facade has one process-wide recorder; install the
        // Prometheus one only when asked, and render it once at the end.
        let metrics = match &cli.metrics_file {
            Some(path) => {
                match metrics_exporter_prometheus::PrometheusBuilder::new().install_recorder() {
                    Ok(handle) => Some((path.clone(), handle)),
                    Err(e) => {
                        report(&format!("cannot record metrics: {e}"));
                        return ExitCode::from(EXIT_ERROR);
                    }
                }
            }
            None => None,
        };
        let env = commands::Env {
            app: &self,
            url: &cli.database_url,
            pg_schema: cli.pg_schema.clone(),
            key_file: cli.key_file.clone(),
            out,
        };
        let result = commands::dispatch(env, cli.command).await;
        // Flush before judging: a broken pipe may only show up here.
        let result = result.and_then(|outcome| {
            out.flush()?;
            Ok(outcome)
        });
        let result = match (result, metrics) {
            (Ok(outcome), Some((path, handle))) => std::fs::write(&path, handle.render())
                .map(|()| outcome)
                .map_err(|e| anyhow::anyhow!("cannot write metrics to {}: {e}", path.display())),
            (result, _) => result,
        };
        match result {
            Ok(Outcome::Success) => ExitCode::SUCCESS,
            Ok(Outcome::CheckFailed(message)) => {
                report(&message);
                ExitCode::from(EXIT_CHECK_FAILED)
            }
            Err(e) if output::is_broken_pipe(&e) => ExitCode::SUCCESS,
            Err(e) => {
                report(&format!("{e:#}"));
                let conflict = e.chain().any(|cause| {
                    cause
                        .downcast_ref::<annals::Error>()
                        .is_some_and(annals::Error::is_conflict)
                });
                ExitCode::from(if conflict {
                    EXIT_CHECK_FAILED
                } else {
                    EXIT_ERROR
                })
            }
        }
    }
}

/// Writes `error: <message>` as one line on stderr.
fn report(message: &str) {
    // Nothing sensible is left to do when stderr itself is gone.
    let _ = writeln!(io::stderr(), "error: {}", output::one_line(message));
}

/// Help and version go to stdout with status 0; a usage error is one line on
/// stderr with status 2 (clap's usage block would bury the reason).
fn clap_exit(e: &clap::Error) -> ExitCode {
    use clap::error::ErrorKind;
    match e.kind() {
        ErrorKind::DisplayHelp | ErrorKind::DisplayVersion => {
            // A closed pipe while printing help is still success.
            let _ = e.print();
            ExitCode::SUCCESS
        }
        ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand => {
            let _ = e.print();
            ExitCode::from(EXIT_ERROR)
        }
        _ => {
            let rendered = e.render().to_string();
            // The first paragraph is the reason; the rest is usage and a
            // pointer to --help.
            let reason = rendered.split("\n\n").next().unwrap_or(&rendered);
            let reason = reason.strip_prefix("error: ").unwrap_or(reason);
            report(&format!("{reason} (see --help)"));
            ExitCode::from(EXIT_ERROR)
        }
    }
}

fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("error"));
    // Fails when the embedding program installed its own subscriber: keep it.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(io::stderr)
        .try_init();
}
