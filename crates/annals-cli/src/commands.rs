//! The subcommands. Each one validates its input completely before it opens
//! the database, so bad input never creates a file or writes an event.

use std::future::Future;
use std::io::{Read, Write};
use std::sync::Arc;

use annals::StreamCatalog;
use annals::{validate_batch, EventStore, Metadata, NewEvent, ReadStream, StreamId};
use anyhow::{anyhow, Context};
use chrono::{DateTime, Duration, Utc};
use futures::StreamExt;
use serde_json::Value;

use crate::cli::{AggregateArgs, AppendArgs, Command, JsonInput, StatsArgs, UpcastArgs};
use crate::output::{json_line, timestamp, EventPrinter, Table};
use crate::registry::LoadRequest;
use crate::store::{Backend, DatabaseUrl, OpenOptions};
use crate::{check, demo, event, read, serve, snapshots, AggregateOps, AnyStore, App, Outcome};

/// What every command that touches the database needs.
pub(crate) struct Env<'a> {
    pub(crate) app: &'a App,
    pub(crate) url: &'a str,
    pub(crate) pg_schema: Option<String>,
    /// `--key-file`.
    pub(crate) key_file: Option<std::path::PathBuf>,
    pub(crate) out: &'a mut (dyn Write + Send),
}

impl Env<'_> {
    pub(crate) fn database_url(&self) -> anyhow::Result<DatabaseUrl> {
        Ok(self.url.parse::<DatabaseUrl>()?)
    }

    /// Opens the store. `create` says whether a missing SQLite file may be
    /// created (writing commands) or is an error (reading commands).
    ///
    /// Not an `async fn`: the future must not borrow `self`, whose output
    /// writer is `Send` but not `Sync`, so that `App::run` stays `Send`.
    pub(crate) fn open(
        &self,
        create: bool,
    ) -> impl Future<Output = anyhow::Result<AnyStore>> + Send + 'static {
        self.open_upcasting(create, self.app.upcasters.clone())
    }

    /// Where the master key comes from (see `keys`).
    pub(crate) fn key_source(&self) -> anyhow::Result<crate::keys::KeySource> {
        Ok(crate::keys::KeySource::new(
            &self.database_url()?,
            self.key_file.clone(),
        ))
    }

    /// Opens the store as stored (no upcasters) for a read command, with
    /// how to turn each stored event into what it shows: as stored with
    /// `--raw`, else decrypted (`"[encrypted]"` without a master key) and
    /// upcast by the plan of `--plan` or the application's upcasters.
    pub(crate) fn open_reading(
        &self,
        upcast: &UpcastArgs,
    ) -> impl Future<Output = anyhow::Result<(AnyStore, crate::keys::Reading)>> + Send + 'static
    {
        let upcasters = if upcast.raw {
            Ok(None)
        } else if let Some(file) = &upcast.plan {
            annals::Plan::load(file)
                .and_then(annals::Plan::build_without_types)
                .map(|u| Some(Arc::new(u)))
                .map_err(anyhow::Error::from)
        } else {
            Ok(self.app.upcasters.clone())
        };
        let raw = upcast.raw;
        let keys = self.key_source();
        let open = upcasters.map(|u| (u, self.open_upcasting(false, None)));
        async move {
            let (upcasters, open) = open?;
            let keys = keys?;
            let store = open.await?;
            let reading = crate::keys::Reading::new(keys.crypto(&store), raw, upcasters);
            Ok((store, reading))
        }
    }

    /// Opens the store for the operations of registered aggregate types
    /// (snapshot commands): decrypting with the master key, and encrypting
    /// the accounts' snapshots.
    pub(crate) fn open_ops(
        &self,
        create: bool,
    ) -> impl Future<Output = anyhow::Result<crate::OpsStore>> + Send + 'static {
        let keys = self.key_source();
        let open = self.open(create);
        async move {
            let keys = keys?;
            let store = open.await?;
            Ok(crate::ops_store(&store, keys.provider()))
        }
    }

    fn open_upcasting(
        &self,
        create: bool,
        upcasters: Option<Arc<annals::Upcasters>>,
    ) -> impl Future<Output = anyhow::Result<AnyStore>> + Send + 'static {
        let url = self.database_url();
        let options = OpenOptions {
            pg_schema: self.pg_schema.clone(),
            must_exist: !create,
            upcasters,
        };
        async move {
            let url = url?;
            AnyStore::open_with(&url, &options)
                .await
                .with_context(|| format!("cannot open {url}"))
        }
    }
}

pub(crate) async fn dispatch(env: Env<'_>, command: Command) -> anyhow::Result<Outcome> {
    match command {
        Command::Init => init(env).await,
        Command::Schema { backend } => {
            let sql = Backend::from(backend).schema_sql();
            env.out.write_all(sql.as_bytes())?;
            if !sql.ends_with('\n') {
                env.out.write_all(b"\n")?;
            }
            Ok(Outcome::Success)
        }
        Command::Append(args) => append(env, args).await,
        Command::Read(args) => read::read(env, args).await,
        Command::ReadAll(args) => read::read_all(env, args).await,
        Command::Stats(args) => stats(env, args).await,
        Command::Aggregate(args) => aggregate(env, args).await,
        Command::Event(args) => event::run(env, args).await,
        Command::Demo(args) => {
            let url = env.database_url()?;
            let keys = env.key_source()?;
            let store = env.open(true).await?;
            let db = crate::ReadModelDb {
                store,
                url: env.url.to_owned(),
                pg_schema: env.pg_schema.clone(),
                key_file: env.key_file.clone(),
            };
            demo::run(&db, &keys, &url.to_string(), &args, env.out).await
        }
        Command::Snapshots(command) => snapshots::dispatch(env, command).await,
        Command::Check(args) => check::run(env, args).await,
        Command::Adopt(args) => crate::adopt::run(env, args).await,
        Command::Serve(args) => serve::run(env, args).await,
        Command::Export(args) => crate::transfer::export_cmd(env, args).await,
        Command::Import(args) => crate::transfer::import_cmd(env, args).await,
        Command::Projections(command) => crate::projections_cmd::dispatch(env, command).await,
        Command::Archive(args) => crate::archive::archive_cmd(env, args).await,
        Command::RestoreArchive(args) => crate::archive::restore_cmd(env, args).await,
        Command::Gdpr(command) => crate::gdpr::dispatch(env, command).await,
        Command::Events(command) => crate::events_cmd::dispatch(env, command).await,
    }
}

/// The operations of a registered aggregate type, or an error that lists the
/// registered ones.
pub(crate) fn registered<'a>(
    app: &'a App,
    aggregate_type: &str,
) -> anyhow::Result<&'a dyn AggregateOps> {
    app.aggregate(aggregate_type).ok_or_else(|| {
        let known: Vec<&str> = app.aggregate_types().collect();
        if known.is_empty() {
            anyhow!("unknown aggregate type {aggregate_type:?}: this binary registers no aggregate types")
        } else {
            anyhow!(
                "unknown aggregate type {aggregate_type:?}: registered types are {}",
                known.join(", ")
            )
        }
    })
}

async fn init(env: Env<'_>) -> anyhow::Result<Outcome> {
    let url = env.database_url()?;
    let store = env.open(true).await?;
    store
        .migrate()
        .await
        .with_context(|| format!("cannot migrate {url}"))?;
    writeln!(env.out, "{url}: schema is up to date")?;
    Ok(Outcome::Success)
}

/// The value of a JSON option, reading `@FILE` or `-` (standard input) on a
/// blocking thread; `parse` turns the JSON into the option's type. Errors
/// name the option and the file, and where in it the JSON went wrong.
async fn load_json<T: Send + 'static>(
    input: JsonInput<T>,
    option: &'static str,
    parse: fn(Value) -> Result<T, String>,
) -> anyhow::Result<T> {
    let (source, bytes) = match input {
        JsonInput::Inline(value) => return Ok(value),
        JsonInput::File(path) => {
            let source = format!("{option} file {}", path.display());
            let bytes = tokio::task::spawn_blocking(move || std::fs::read(path))
                .await
                .context("the file reader stopped")?
                .with_context(|| format!("cannot read {source}"))?;
            (source, bytes)
        }
        JsonInput::Stdin => {
            let source = format!("{option} from standard input");
            let bytes = tokio::task::spawn_blocking(|| {
                let mut bytes = Vec::new();
                std::io::stdin().read_to_end(&mut bytes).map(|_| bytes)
            })
            .await
            .context("the standard input reader stopped")?
            .with_context(|| format!("cannot read {source}"))?;
            (source, bytes)
        }
    };
    // serde_json's message ends with the line and column of the fault.
    let value: Value =
        serde_json::from_slice(&bytes).map_err(|e| anyhow!("{source} is not valid JSON: {e}"))?;
    parse(value).map_err(|e| anyhow!("{source}: {e}"))
}

async fn append(env: Env<'_>, args: AppendArgs) -> anyhow::Result<Outcome> {
    if args.data == JsonInput::Stdin && args.metadata == Some(JsonInput::Stdin) {
        anyhow::bail!("--data and --metadata cannot both read standard input (-)");
    }
    let data = load_json(args.data, "--data", Ok).await?;
    let metadata = match args.metadata {
        Some(input) => Some(load_json(input, "--metadata", Metadata::from_value).await?),
        None => None,
    };
    let mut event = NewEvent::new(args.event_type, data).with_event_version(args.event_version);
    if let Some(metadata) = metadata {
        event = event.with_metadata(metadata);
    }
    if let Some(id) = args.event_id {
        event = event.with_id(annals::EventId(id));
    }
    let batch = vec![event];
    validate_batch(&args.stream, &batch)?;
    let count = batch.len() as u64;

    let store = env.open(true).await?;
    let result = store
        .append(&args.stream, args.expected_version, batch)
        .await?;
    if result.deduplicated {
        tracing::info!(stream = %args.stream, "event already stored; nothing was written");
    }
    // Read back what the store recorded: positions and timestamps are the
    // store's, not ours.
    let mut events = store.read_stream(
        &args.stream,
        ReadStream::forward()
            .from(result.first_version)
            .limit(count),
    );
    let mut printer = EventPrinter::new(args.json);
    while let Some(e) = events.next().await {
        printer.print(env.out, &e?)?;
    }
    printer.finish(env.out)?;
    Ok(Outcome::Success)
}

/// The events appended over a window before now, and their rate.
#[derive(serde::Serialize)]
struct AppendRate {
    events: u64,
    per_second: f64,
}

impl AppendRate {
    async fn over(store: &AnyStore, now: DateTime<Utc>, window: Duration) -> anyhow::Result<Self> {
        let events = store
            .events_recorded_since(now - window)
            .await
            .context("cannot count the recent events")?;
        let seconds = window.num_seconds().max(1) as f64;
        Ok(AppendRate {
            events,
            per_second: events as f64 / seconds,
        })
    }
}

impl std::fmt::Display for AppendRate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} events ({:.2}/min)",
            self.events,
            self.per_second * 60.0
        )
    }
}

async fn stats(env: Env<'_>, args: StatsArgs) -> anyhow::Result<Outcome> {
    let store = env.open(false).await?;
    let stats = store.stats().await?;
    let top = usize::try_from(args.top).unwrap_or(usize::MAX);
    let largest = store
        .largest_streams(top)
        .await
        .context("cannot list the largest streams")?;
    // The window ends at this host's clock; events are stamped by the
    // appending host's (SQLite) or the server's (PostgreSQL).
    let now = Utc::now();
    let last_hour = AppendRate::over(&store, now, Duration::hours(1)).await?;
    let last_day = AppendRate::over(&store, now, Duration::days(1)).await?;
    let size = store
        .storage_size()
        .await
        .context("cannot read the database size")?;
    // PostgreSQL: committed events that readers cannot see yet because an
    // older transaction is still open (also sets the horizon-lag gauge).
    let horizon_lag = match &store {
        AnyStore::Postgres(pg) => Some(pg.horizon_lag().await?),
        // `AnyStore` is non-exhaustive: a backend without a horizon.
        _ => None,
    };
    let out = env.out;
    if args.json {
        let mut value = serde_json::to_value(&stats)?;
        if let Some(map) = value.as_object_mut() {
            map.insert("largest_streams".into(), serde_json::to_value(&largest)?);
            map.insert(
                "appended".into(),
                serde_json::json!({ "last_hour": last_hour, "last_day": last_day }),
            );
            map.insert("storage".into(), serde_json::to_value(size)?);
            if let Some(lag) = horizon_lag {
                map.insert("horizon_lag_events".into(), lag.into());
            }
        }
        json_line(out, &value)?;
        return Ok(Outcome::Success);
    }
    let time =
        |t: &Option<chrono::DateTime<chrono::Utc>>| t.as_ref().map_or("-".to_owned(), timestamp);
    writeln!(out, "streams           {}", stats.streams)?;
    writeln!(out, "events            {}", stats.events)?;
    writeln!(out, "first recorded_at {}", time(&stats.first_recorded_at))?;
    writeln!(out, "last recorded_at  {}", time(&stats.last_recorded_at))?;
    writeln!(out, "appended, 1 hour  {last_hour}")?;
    writeln!(out, "appended, 1 day   {last_day}")?;
    writeln!(out, "store size        {}", bytes(size.store_bytes))?;
    if let Some(free) = size.free_bytes {
        writeln!(out, "free in file      {}", bytes(free))?;
    }
    if let Some(database) = size.database_bytes {
        writeln!(out, "database size     {}", bytes(database))?;
    }
    if let Some(lag) = horizon_lag {
        writeln!(out, "horizon lag       {lag} events")?;
    }
    if !stats.categories.is_empty() {
        writeln!(out)?;
        let mut t = Table::new(&["CATEGORY", "STREAMS", "EVENTS"]).right_align(&[1, 2]);
        for c in &stats.categories {
            t.push(
                out,
                vec![
                    c.category.clone(),
                    c.streams.to_string(),
                    c.events.to_string(),
                ],
            )?;
        }
        t.finish(out)?;
    }
    if !stats.event_types.is_empty() {
        writeln!(out)?;
        let mut t = Table::new(&["EVENT_TYPE", "EVENTS"]).right_align(&[1]);
        for e in &stats.event_types {
            t.push(out, vec![e.event_type.clone(), e.events.to_string()])?;
        }
        t.finish(out)?;
    }
    if !largest.is_empty() {
        writeln!(out)?;
        let mut t = Table::new(&["LARGEST_STREAM", "EVENTS"]).right_align(&[1]);
        for s in &largest {
            t.push(out, vec![s.stream_id.to_string(), s.version.to_string()])?;
        }
        t.finish(out)?;
    }
    Ok(Outcome::Success)
}

/// A byte count for people: `12.3 MiB (12897484 bytes)`.
fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = n as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{value:.1} {} ({n} bytes)", UNITS[unit])
    }
}

async fn aggregate(env: Env<'_>, args: AggregateArgs) -> anyhow::Result<Outcome> {
    let ops = registered(env.app, &args.aggregate_type)?;
    let stream = StreamId::new(ops.aggregate_type(), &args.id)?;
    let (store, reading) = env.open_reading(&args.upcast).await?;
    let request = LoadRequest {
        at_version: args.at_version,
        as_of: args.as_of,
        no_snapshot: args.no_snapshot,
    };
    let view = ops
        .load(&reading.ops_store(&store), &args.id, request)
        .await?;
    if view.version.is_none() {
        return Ok(Outcome::CheckFailed(match args.as_of {
            Some(t) => format!(
                "aggregate {stream} did not exist at {} (no event recorded at or before it)",
                timestamp(&t)
            ),
            None => format!("aggregate {stream} does not exist (its stream has no events)"),
        }));
    }
    let out = env.out;
    if args.json {
        json_line(out, &view)?;
        return Ok(Outcome::Success);
    }
    let version = view.version.map_or("-".to_owned(), |v| v.to_string());
    let snapshot = match (&view.snapshot_version, &view.snapshot_skipped) {
        (Some(v), _) if view.snapshot_migrated => format!("used, version {v} (migrated)"),
        (Some(v), _) => format!("used, version {v}"),
        (None, Some(why)) => format!("not used: {why}"),
        (None, None) => "not used".to_owned(),
    };
    writeln!(out, "aggregate        {stream}")?;
    if let Some(t) = &args.as_of {
        writeln!(out, "as of            {}", timestamp(t))?;
    }
    writeln!(out, "version          {version}")?;
    writeln!(out, "snapshot         {snapshot}")?;
    writeln!(out, "events replayed  {}", view.events_replayed)?;
    writeln!(out, "state")?;
    serde_json::to_writer_pretty(&mut *out, &view.state)?;
    writeln!(out)?;
    Ok(Outcome::Success)
}
