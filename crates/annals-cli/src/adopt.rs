//! `annals adopt`: the rows of an existing table become the first event of
//! one stream each (seed 003, incremental migration from CRUD).
//!
//! The rows come from a query run on the source database (the store's own by
//! default, or another SQLite file or PostgreSQL URL), read as they arrive:
//! SQLite on a thread of its own over a bounded channel, PostgreSQL through a
//! portal in pages, so a table of any size is never held in memory. Each row
//! becomes a JSON object of its columns (PostgreSQL: `row_to_json`, so
//! numbers, booleans, JSON and arrays keep their types and timestamps become
//! text; SQLite: integers, reals, text and NULL; a BLOB is refused with the
//! column's name, select `hex(col)` instead) and is appended as event
//! `--type` of stream `CATEGORY-ID`, expected to be new.
//!
//! Idempotent: the event id is derived from the stream name (UUID v5), so a
//! rerun finds each adopted row already stored with the same id and content
//! and the store answers with the original append (`deduplicated`): nothing
//! is added. A row whose stream holds a different first event (the row
//! changed since it was adopted, or the query returns an id twice) is
//! reported as `changed`, and a stream that exists without an adopted event
//! (written by something else) as a conflict; neither is overwritten.
//!
//! Rows are appended `--batch-size` at a time with one atomic `append_many`
//! when every stream of the batch is new (one commit per batch); a batch that
//! meets streams that exist is retried row by row to classify each one.

use std::path::Path;

use annals::{
    AppendResult, Error as StoreError, EventId, EventStore, ExpectedVersion, Metadata,
    MultiStreamAppend, NewEvent, StreamBatch, StreamId,
};
use anyhow::{anyhow, bail, Context};
use futures::StreamExt;
use indicatif::ProgressBar;
use serde_json::{json, Map, Value};
use tokio::sync::mpsc;
use uuid::Uuid;

use crate::cli::AdoptArgs;
use crate::commands::Env;
use crate::store::{AnyStore, DatabaseUrl};
use crate::Outcome;

/// The namespace of adopted events' ids: id = UUID v5(this, stream name).
/// Fixed forever: changing it would make a rerun adopt every row again.
const ADOPT_NAMESPACE: Uuid = Uuid::from_u128(0x5b1c_7e0a_6f3d_4c2e_9a47_0d8e_61f2_b3a9);

/// How many row appends run at once when a batch is retried row by row.
const ROW_CONCURRENCY: usize = 16;

/// Rows read ahead of the appends.
const CHANNEL_ROWS: usize = 1024;

/// The id of the event adopted for `stream`.
pub(crate) fn adopted_event_id(stream: &StreamId) -> EventId {
    EventId(Uuid::new_v5(&ADOPT_NAMESPACE, stream.as_str().as_bytes()))
}

/// One row of the query: its 1-based number and its columns.
struct Row {
    number: u64,
    columns: Map<String, Value>,
}

/// What happened to the rows.
#[derive(Default, Debug)]
struct Tally {
    rows: u64,
    adopted: u64,
    already: u64,
    changed: Vec<String>,
    conflicts: Vec<String>,
}

/// At most this many streams are named per list in the summary.
const NAMED: usize = 20;

pub(crate) async fn run(env: Env<'_>, args: AdoptArgs) -> anyhow::Result<Outcome> {
    let target_url = env.database_url()?;
    let source_url = match &args.source {
        Some(url) => url
            .parse::<DatabaseUrl>()
            .with_context(|| format!("--source {url}"))?,
        None => target_url.clone(),
    };
    // The target's schema is the default search path of a PostgreSQL source
    // that is the store's own database.
    let source_schema = match (&args.source, &source_url) {
        (None, DatabaseUrl::Postgres(_)) => env.pg_schema.clone(),
        _ => None,
    };
    let store = env.open(true).await?;

    let (tx, mut rx) = mpsc::channel::<anyhow::Result<Row>>(CHANNEL_ROWS);
    let reader = match &source_url {
        DatabaseUrl::Sqlite(path) => {
            let path = path.clone();
            let query = args.query.clone();
            tokio::task::spawn_blocking(move || read_sqlite(&path, &query, &tx))
        }
        DatabaseUrl::Postgres(url) => {
            let url = url.clone();
            let query = args.query.clone();
            let schema = source_schema.clone();
            tokio::spawn(async move {
                if let Err(e) = read_postgres(&url, schema.as_deref(), &query, &tx).await {
                    let _ = tx.send(Err(e)).await;
                }
            })
        }
    };

    let bar = progress_bar();
    let mut tally = Tally::default();
    let mut batch: Vec<(StreamId, NewEvent)> = Vec::with_capacity(args.batch_size);
    let result: anyhow::Result<()> = async {
        while let Some(row) = rx.recv().await {
            // A bad row stops the run, after the rows before it are
            // appended, so that "the rows before it stay adopted" holds
            // whatever the batch size.
            let event = row.and_then(|row| to_event(&args, row, &source_url));
            let event = match event {
                Ok(event) => event,
                Err(e) => {
                    if !batch.is_empty() {
                        append_batch(&store, std::mem::take(&mut batch), &mut tally).await?;
                    }
                    return Err(e);
                }
            };
            tally.rows += 1;
            batch.push(event);
            if batch.len() >= args.batch_size {
                append_batch(&store, std::mem::take(&mut batch), &mut tally).await?;
                bar.set_position(tally.rows);
            }
        }
        if !batch.is_empty() {
            append_batch(&store, std::mem::take(&mut batch), &mut tally).await?;
        }
        Ok(())
    }
    .await;
    bar.finish_and_clear();
    drop(rx);
    reader
        .await
        .map_err(|e| anyhow!("the row reader stopped: {e}"))?;
    result?;

    report(env, &args, &tally)
}

/// The stream and event a row becomes.
fn to_event(
    args: &AdoptArgs,
    row: Row,
    source: &DatabaseUrl,
) -> anyhow::Result<(StreamId, NewEvent)> {
    let Row { number, columns } = row;
    let id = match columns.get(&args.id_column) {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Number(n)) if n.is_i64() || n.is_u64() => n.to_string(),
        Some(Value::Null) => bail!(
            "row {number} of the query: id column {:?} is NULL",
            args.id_column
        ),
        Some(other) => bail!(
            "row {number} of the query: id column {:?} holds {other}, not text or an integer",
            args.id_column
        ),
        None => {
            let names: Vec<&str> = columns.keys().map(String::as_str).collect();
            bail!(
                "the query has no column {:?} (--id-column); its columns are: {}",
                args.id_column,
                names.join(", ")
            )
        }
    };
    let stream = StreamId::new(&args.category, &id)
        .with_context(|| format!("row {number} of the query: id {id:?}"))?;
    let mut headers = Map::new();
    headers.insert(
        "adopted_from".into(),
        json!({ "source": source.to_string(), "row": number }),
    );
    let event = NewEvent::new(args.event_type.clone(), Value::Object(columns))
        .with_id(adopted_event_id(&stream))
        .with_event_version(args.event_version)
        .with_metadata(Metadata {
            headers,
            ..Metadata::default()
        });
    Ok((stream, event))
}

/// Appends one batch: all at once when every stream is new, else row by row.
async fn append_batch(
    store: &AnyStore,
    batch: Vec<(StreamId, NewEvent)>,
    tally: &mut Tally,
) -> anyhow::Result<()> {
    let batches: Vec<StreamBatch> = batch
        .iter()
        .map(|(s, e)| StreamBatch::new(s.clone(), ExpectedVersion::NoStream, vec![e.clone()]))
        .collect();
    match store.append_many(batches).await {
        Ok(results) => {
            for r in &results {
                count(r, tally);
            }
            return Ok(());
        }
        // Streams that exist (adopted before, or written by something
        // else), or one id twice in the batch: classify row by row.
        Err(
            StoreError::WrongExpectedVersion { .. }
            | StoreError::DuplicateEventId { .. }
            | StoreError::InvalidEvent { .. },
        ) => {}
        Err(e) => return Err(e).context("appending adopted rows"),
    }
    let outcomes: Vec<(StreamId, Result<AppendResult, StoreError>)> =
        futures::stream::iter(batch.into_iter().map(|(stream, event)| async move {
            let r = store
                .append(&stream, ExpectedVersion::NoStream, vec![event])
                .await;
            (stream, r)
        }))
        .buffered(ROW_CONCURRENCY)
        .collect()
        .await;
    for (stream, outcome) in outcomes {
        match outcome {
            Ok(r) => count(&r, tally),
            Err(StoreError::DuplicateEventId { .. }) => tally.changed.push(stream.to_string()),
            Err(StoreError::WrongExpectedVersion { .. }) => {
                // The stream exists: adopted before (with the same row: a
                // retry that the store answers as one; with another: the
                // row changed) or written by something else.
                match store.read_event(adopted_event_id(&stream)).await {
                    Ok(Some(e)) if e.stream_id == stream => tally.changed.push(stream.to_string()),
                    Ok(_) => tally.conflicts.push(stream.to_string()),
                    Err(e) => {
                        return Err(e)
                            .with_context(|| format!("looking up the adopted event of {stream}"))
                    }
                }
            }
            Err(e) => return Err(e).with_context(|| format!("adopting {stream}")),
        }
    }
    Ok(())
}

fn count(r: &AppendResult, tally: &mut Tally) {
    if r.deduplicated {
        tally.already += 1;
    } else {
        tally.adopted += 1;
    }
}

fn report(env: Env<'_>, args: &AdoptArgs, t: &Tally) -> anyhow::Result<Outcome> {
    if args.json {
        let line = json!({
            "rows": t.rows,
            "adopted": t.adopted,
            "already_adopted": t.already,
            "changed": t.changed.len(),
            "conflicts": t.conflicts.len(),
            "changed_streams": t.changed.iter().take(NAMED).collect::<Vec<_>>(),
            "conflicting_streams": t.conflicts.iter().take(NAMED).collect::<Vec<_>>(),
        });
        writeln!(env.out, "{line}")?;
    } else {
        writeln!(
            env.out,
            "{} row(s): {} adopted, {} already adopted, {} changed since adopted, {} conflict(s)",
            t.rows,
            t.adopted,
            t.already,
            t.changed.len(),
            t.conflicts.len()
        )?;
        for s in t.changed.iter().take(NAMED) {
            writeln!(
                env.out,
                "changed  {s}: adopted before from a row with other values; kept as it is"
            )?;
        }
        for s in t.conflicts.iter().take(NAMED) {
            writeln!(
                env.out,
                "conflict {s}: the stream exists and was not written by adopt; row not adopted"
            )?;
        }
    }
    if t.conflicts.is_empty() {
        Ok(Outcome::Success)
    } else {
        Ok(Outcome::CheckFailed(format!(
            "{} row(s) not adopted: their streams exist and were not written by adopt",
            t.conflicts.len()
        )))
    }
}

fn progress_bar() -> ProgressBar {
    crate::progress::progress_bar("{spinner} {pos} rows adopted ({per_sec})", "")
}

/// Runs `query` on the SQLite file read-only and sends its rows.
fn read_sqlite(path: &Path, query: &str, tx: &mpsc::Sender<anyhow::Result<Row>>) {
    let result = (|| -> anyhow::Result<()> {
        use rusqlite::types::ValueRef;
        if !path.exists() {
            bail!("source database {} does not exist", path.display());
        }
        let conn = rusqlite::Connection::open_with_flags(
            path,
            rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .with_context(|| format!("opening {} read-only", path.display()))?;
        conn.busy_timeout(std::time::Duration::from_secs(30))?;
        let mut stmt = conn
            .prepare(query)
            .with_context(|| format!("the query {query:?} on {}", path.display()))?;
        let names: Vec<String> = stmt.column_names().into_iter().map(str::to_owned).collect();
        let mut rows = stmt
            .query([])
            .with_context(|| format!("the query {query:?} on {}", path.display()))?;
        let mut number = 0u64;
        while let Some(row) = rows
            .next()
            .with_context(|| format!("the query {query:?}, after row {number}"))?
        {
            number += 1;
            let mut columns = Map::with_capacity(names.len());
            for (i, name) in names.iter().enumerate() {
                let value = match row.get_ref(i)? {
                    ValueRef::Null => Value::Null,
                    ValueRef::Integer(n) => json!(n),
                    ValueRef::Real(x) => json!(x),
                    ValueRef::Text(t) => Value::String(
                        std::str::from_utf8(t)
                            .with_context(|| {
                                format!("row {number}, column {name:?}: text that is not UTF-8")
                            })?
                            .to_owned(),
                    ),
                    ValueRef::Blob(_) => bail!(
                        "row {number}, column {name:?} is a BLOB, which has no JSON form: \
                         select it as text, e.g. hex({name})"
                    ),
                };
                columns.insert(name.clone(), value);
            }
            if tx.blocking_send(Ok(Row { number, columns })).is_err() {
                // The appends stopped (an error); they report it.
                return Ok(());
            }
        }
        Ok(())
    })();
    if let Err(e) = result {
        let _ = tx.blocking_send(Err(e));
    }
}

/// Runs `query` on PostgreSQL through a portal, 500 rows a page, each row as
/// `row_to_json`.
async fn read_postgres(
    url: &str,
    schema: Option<&str>,
    query: &str,
    tx: &mpsc::Sender<anyhow::Result<Row>>,
) -> anyhow::Result<()> {
    let (mut client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .context("connecting to the PostgreSQL source")?;
    let conn = tokio::spawn(connection);
    let result = async {
        if let Some(schema) = schema {
            let ident = schema.replace('"', "\"\"");
            client
                .batch_execute(&format!("SET search_path TO \"{ident}\", public"))
                .await
                .context("setting the search path")?;
        }
        let t = client.transaction().await?;
        let inner = query.trim().trim_end_matches(';');
        let wrapped = format!("SELECT row_to_json(q)::text FROM ({inner}) AS q");
        let portal = t
            .bind(wrapped.as_str(), &[])
            .await
            .with_context(|| format!("the query {query:?}"))?;
        let mut number = 0u64;
        loop {
            let page = t
                .query_portal(&portal, 500)
                .await
                .with_context(|| format!("the query {query:?}, after row {number}"))?;
            if page.is_empty() {
                break;
            }
            for r in page {
                number += 1;
                let text: &str = r.try_get(0)?;
                let columns = match serde_json::from_str::<Value>(text) {
                    Ok(Value::Object(m)) => m,
                    Ok(_) | Err(_) => bail!("row {number}: row_to_json gave no object"),
                };
                if tx.send(Ok(Row { number, columns })).await.is_err() {
                    return Ok(());
                }
            }
        }
        t.commit().await?;
        anyhow::Ok(())
    }
    .await;
    drop(client);
    let _ = conn.await;
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn adopted_ids_are_stable_and_per_stream() {
        let a = StreamId::new("Customer", "1").expect("valid");
        let b = StreamId::new("Customer", "2").expect("valid");
        assert_eq!(adopted_event_id(&a), adopted_event_id(&a));
        assert_ne!(adopted_event_id(&a), adopted_event_id(&b));
        assert_eq!(adopted_event_id(&a).0.get_version_num(), 5);
    }
}
