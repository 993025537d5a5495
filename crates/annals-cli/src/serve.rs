//! `annals serve`, and [`MetricsServer`]: `/metrics` in the Prometheus text
//! format and `/health` (the checks of `annals check`) over HTTP.
//!
//! The counters of the library (appends, loads, snapshot writes: see
//! `docs/metrics.md`) count what the process that records them does. `annals
//! serve` is the operators' process beside the applications: it shows the
//! gauges that need a query (refreshed on an interval, so a scrape never
//! waits on the database) and the health checks, plus what its own checks
//! read. An application that wants its own counters scraped runs the same
//! server in its process with [`MetricsServer`], on the recorder it installed.
//!
//! `/health` runs every check on each request (the decode check reads every
//! event of the registered aggregate types), one request at a time: point a
//! load balancer's frequent probe at something cheaper, and `/health` at a
//! monitor that polls every minute or so.
//!
//! The library never installs a recorder; the `annals serve` command
//! installs the process's global one (the `metrics` facade has one per
//! process), so it refuses to start when one is installed already.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use annals::{EventStore, StreamCatalog};
use anyhow::{anyhow, Context};
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use serde_json::json;
use tokio::net::TcpListener;

use crate::check::{self, Severity};
use crate::cli::{CheckOptions, ServeArgs};
use crate::commands::Env;
use crate::keys::KeySource;
use crate::output::note;
use crate::{AnyStore, App, Outcome};

/// The default refresh interval of the gauges.
const DEFAULT_INTERVAL: Duration = Duration::from_secs(15);

/// Buckets of `annals_append_duration_seconds`, in seconds: an append takes
/// about a millisecond on a local database.
const APPEND_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
];

/// The gauges and counters of the server itself, with their help text
/// (the rows of `docs/metrics.md` under "annals serve").
pub const SERVE_METRICS: &[(&str, &str)] = &[
    ("annals_streams", "Streams in the store."),
    ("annals_events", "Events in the store."),
    (
        "annals_head_position",
        "The sequence number of the last event in the global order (0 when empty).",
    ),
    (
        "annals_storage_bytes",
        "The store's own bytes (SQLite: the database pages; PostgreSQL: the schema's tables with their indexes and TOAST).",
    ),
    (
        "annals_storage_free_bytes",
        "SQLite: bytes of free pages inside the database file.",
    ),
    (
        "annals_database_bytes",
        "PostgreSQL: the whole database, as pg_database_size reports it.",
    ),
    (
        "annals_pg_horizon_lag_events",
        "PostgreSQL: committed events that readers of the global order cannot see yet (an older transaction is still open).",
    ),
    (
        "annals_gauges_refreshed_timestamp_seconds",
        "When the gauges were last refreshed, in seconds since the Unix epoch.",
    ),
    (
        "annals_gauge_refresh_failures_total",
        "Refreshes of the gauges that failed (the error is logged).",
    ),
];

/// `/metrics` and `/health` for one store, with the gauges that need a query
/// refreshed on an interval.
///
/// The server renders the recorder behind `handle`; recording goes to
/// whatever recorder the process (or the thread) has installed, which is
/// the one of `handle` when the caller installed it. The `annals serve`
/// command builds one with `PrometheusBuilder::build_recorder` and installs
/// it as the global recorder; a test can instead install it with
/// `metrics::set_default_local_recorder` on the thread that runs its
/// workload, and serve its handle from another.
///
/// `app` supplies the aggregate types that the decode check folds.
pub struct MetricsServer {
    app: App,
    store: AnyStore,
    handle: PrometheusHandle,
    interval: Duration,
    checks: CheckOptions,
    keys: KeySource,
}

impl std::fmt::Debug for MetricsServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MetricsServer")
            .field("app", &self.app)
            .field("backend", &self.store.backend())
            .field("interval", &self.interval)
            .finish_non_exhaustive()
    }
}

impl MetricsServer {
    /// A server for `store` that renders `handle`'s recorder, refreshing the
    /// gauges every 15 seconds and checking with `annals check`'s defaults.
    ///
    /// The decode check finds the master key in `ANNALS_MASTER_KEY`, else
    /// (SQLite) in the key file beside the database; see
    /// [`MetricsServer::key_file`].
    pub fn new(app: App, store: AnyStore, handle: PrometheusHandle) -> Self {
        let keys = KeySource::of_store(&store);
        MetricsServer {
            app,
            store,
            handle,
            interval: DEFAULT_INTERVAL,
            checks: CheckOptions::default(),
            keys,
        }
    }

    /// Reads the master key from `file` when `ANNALS_MASTER_KEY` is unset
    /// (what `--key-file` does), instead of the default key file.
    pub fn key_file(self, file: std::path::PathBuf) -> Self {
        self.keys(KeySource::from_file(file))
    }

    /// Where the checks find the master key.
    fn keys(mut self, keys: KeySource) -> Self {
        self.keys = keys;
        self
    }

    /// Sets how often the gauges are refreshed (a zero interval is taken as
    /// one millisecond).
    pub fn refresh_interval(mut self, interval: Duration) -> Self {
        self.interval = interval.max(Duration::from_millis(1));
        self
    }

    fn checks(mut self, checks: CheckOptions) -> Self {
        self.checks = checks;
        self
    }

    /// Refreshes the gauges once (also done every interval while
    /// [`MetricsServer::run`] runs).
    pub async fn refresh(&self) -> anyhow::Result<()> {
        refresh(&self.store).await
    }

    /// Serves on `listener` until `shutdown` completes, then finishes the
    /// requests in flight and returns. Refreshes the gauges first, then every
    /// interval; a failed refresh is logged and counted, and the server goes
    /// on.
    pub async fn run(
        self,
        listener: TcpListener,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> std::io::Result<()> {
        let shared = Arc::new(Shared {
            app: self.app,
            store: self.store,
            handle: self.handle,
            checks: self.checks,
            keys: self.keys,
            health: tokio::sync::Mutex::new(()),
        });
        let refresher = {
            let shared = shared.clone();
            let interval = self.interval;
            async move {
                let mut ticks = tokio::time::interval(interval);
                ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    ticks.tick().await;
                    if let Err(e) = refresh(&shared.store).await {
                        metrics::counter!("annals_gauge_refresh_failures_total").increment(1);
                        tracing::warn!(error = %format!("{e:#}"), "cannot refresh the gauges");
                    }
                    // Drains the histograms' pending samples.
                    shared.handle.run_upkeep();
                }
            }
        };
        let router = Router::new()
            .route("/metrics", get(render))
            .route("/health", get(health))
            .with_state(shared);
        let server = axum::serve(listener, router).with_graceful_shutdown(shutdown);
        // The refresher never ends: the server's end ends it.
        tokio::select! {
            result = server => result,
            () = refresher => Ok(()),
        }
    }
}

struct Shared {
    app: App,
    store: AnyStore,
    handle: PrometheusHandle,
    checks: CheckOptions,
    keys: KeySource,
    /// One `/health` run at a time: each reads the whole store.
    health: tokio::sync::Mutex<()>,
}

async fn render(State(shared): State<Arc<Shared>>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        shared.handle.render(),
    )
}

async fn health(State(shared): State<Arc<Shared>>) -> impl IntoResponse {
    let _turn = shared.health.lock().await;
    match check::findings(&shared.app, &shared.store, &shared.keys, &shared.checks).await {
        Ok(findings) => {
            let count = |s| findings.iter().filter(|f| f.severity == s).count();
            let (errors, warnings) = (count(Severity::Error), count(Severity::Warning));
            let status = if errors > 0 {
                StatusCode::SERVICE_UNAVAILABLE
            } else {
                StatusCode::OK
            };
            let body = json!({
                "status": if errors > 0 { "unhealthy" } else { "healthy" },
                "errors": errors,
                "warnings": warnings,
                "findings": findings,
            });
            (status, Json(body))
        }
        Err(e) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({ "status": "failed", "error": format!("{e:#}") })),
        ),
    }
}

/// Queries the store and sets the gauges.
async fn refresh(store: &AnyStore) -> anyhow::Result<()> {
    let stats = store
        .stats()
        .await
        .context("cannot read the store's stats")?;
    metrics::gauge!("annals_streams").set(stats.streams as f64);
    metrics::gauge!("annals_events").set(stats.events as f64);
    let head = store
        .head_position()
        .await
        .context("cannot read the head position")?;
    metrics::gauge!("annals_head_position").set(head.map_or(0, |p| p.seq()) as f64);
    let size = store
        .storage_size()
        .await
        .context("cannot read the database size")?;
    metrics::gauge!("annals_storage_bytes").set(size.store_bytes as f64);
    if let Some(free) = size.free_bytes {
        metrics::gauge!("annals_storage_free_bytes").set(free as f64);
    }
    if let Some(database) = size.database_bytes {
        metrics::gauge!("annals_database_bytes").set(database as f64);
    }
    if let AnyStore::Postgres(pg) = store {
        // Sets `annals_pg_horizon_lag_events` itself.
        pg.horizon_lag()
            .await
            .context("cannot measure the horizon lag")?;
    }
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64());
    metrics::gauge!("annals_gauges_refreshed_timestamp_seconds").set(now);
    Ok(())
}

/// Describes the library's metrics and the server's own to the current
/// recorder (their `# HELP` lines).
pub fn describe_serve_metrics() {
    annals::describe_metrics();
    for (name, help) in SERVE_METRICS {
        if name.ends_with("_total") {
            metrics::describe_counter!(*name, *help);
        } else {
            metrics::describe_gauge!(*name, *help);
        }
    }
}

/// A Prometheus recorder with the buckets of the library's histograms; the
/// caller installs it (globally, or on a thread) and gives its handle to
/// [`MetricsServer::new`].
pub fn prometheus_recorder() -> anyhow::Result<metrics_exporter_prometheus::PrometheusRecorder> {
    Ok(PrometheusBuilder::new()
        .set_buckets_for_metric(
            Matcher::Full("annals_append_duration_seconds".to_owned()),
            APPEND_BUCKETS,
        )
        .context("cannot set the histogram buckets")?
        .build_recorder())
}

/// `annals serve`.
pub(crate) async fn run(env: Env<'_>, args: ServeArgs) -> anyhow::Result<Outcome> {
    let url = env.database_url()?;
    // The master key as every read command finds it (`--key-file`).
    let keys = env.key_source()?;
    let recorder = prometheus_recorder()?;
    let handle = recorder.handle();
    metrics::set_global_recorder(recorder).map_err(|_| {
        anyhow!("cannot install the metrics recorder: this process has one already (is --metrics-file set?)")
    })?;
    describe_serve_metrics();
    let store = env.open(false).await?;
    let listener = TcpListener::bind(args.metrics_addr)
        .await
        .with_context(|| format!("cannot listen on {}", args.metrics_addr))?;
    let local = listener
        .local_addr()
        .with_context(|| format!("cannot read the address bound for {}", args.metrics_addr))?;
    let server = MetricsServer::new(env.app.clone(), store, handle)
        .refresh_interval(args.interval)
        .checks(args.checks)
        .keys(keys);
    // The first refresh before the address is announced, so the first scrape
    // has the gauges; a failure here is the command's (bad schema, ...).
    server
        .refresh()
        .await
        .with_context(|| format!("cannot read {url}"))?;
    writeln!(env.out, "listening on http://{local}")?;
    env.out.flush()?;
    server
        .run(listener, shutdown_signal())
        .await
        .with_context(|| format!("serving on {local}"))?;
    note(&format!("stopped serving on {local}"));
    Ok(Outcome::Success)
}

/// Completes on Ctrl-C (SIGINT) or, on Unix, SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = async {
        if tokio::signal::ctrl_c().await.is_err() {
            // No handler: wait for SIGTERM alone.
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {}
        () = term => {}
    }
}
