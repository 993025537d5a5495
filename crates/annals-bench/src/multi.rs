//! W3m (docs/benchmarks.md): W3's events, M accounts per atomic write, on a
//! separate empty store so W4's data set stays the same. Annals writes with
//! `MultiStreamAppend::append_many`; the raw baseline is one plain-SQL
//! transaction inserting the M streams' events and stream rows. Both sides
//! are checked afterwards (untimed): every account at version L with the
//! pattern's balance.

use std::path::Path;
use std::time::Instant;

use annals::bank::Account;
use annals::{
    encode_event, ExpectedVersion, MultiStreamAppend, NewEvent, Repository, StreamBatch, StreamId,
};
use anyhow::{ensure, Context};
use serde_json::{json, Value};
use tokio_postgres::types::Json;
use tokio_postgres::NoTls;
use uuid::Uuid;

use crate::workload::{account_id, owner, pattern_balance, pattern_event, Sizes, Throughput};

/// W3m on Annals and, unless skipped, raw SQL.
pub struct W3m {
    /// Streams per atomic write.
    pub streams_per_commit: u64,
    /// Annals.
    pub annals: Throughput,
    /// The raw baseline.
    pub raw: Option<Throughput>,
}

impl W3m {
    /// Puts W3m into a result line: `w3m`, `raw.w3m` and `ratio_to_raw.w3m`.
    pub fn add_to(&self, line: &mut Value) {
        let figures = |t: &Throughput| {
            json!({
                "events_per_sec": (t.events_per_sec() * 1000.0).round() / 1000.0,
                "events": t.events,
                "seconds": (t.seconds * 1000.0).round() / 1000.0,
                "streams_per_commit": self.streams_per_commit,
            })
        };
        line["w3m"] = figures(&self.annals);
        if let Some(raw) = &self.raw {
            if line.get("raw").is_some() {
                line["raw"]["w3m"] = figures(raw);
            }
            if line.get("ratio_to_raw").is_some() {
                let r = self.annals.events_per_sec() / raw.events_per_sec().max(1e-9);
                line["ratio_to_raw"]["w3m"] = json!((r * 1000.0).round() / 1000.0);
            }
        }
    }
}

/// The accounts of W3m, M per write: `(stream, owner)` lists.
fn groups(sz: &Sizes) -> Vec<Vec<(String, String)>> {
    let accounts = sz.bulk_events / sz.bulk_stream_len.max(1);
    let per = sz.multi_streams.max(1);
    let all: Vec<(String, String)> = (1..=accounts)
        .map(|i| {
            let o = owner("w3m", i);
            (format!("Account-{}", account_id(&o)), o)
        })
        .collect();
    all.chunks(per as usize).map(<[_]>::to_vec).collect()
}

/// W3m on an Annals store (empty).
pub async fn annals<S: MultiStreamAppend>(store: S, sz: &Sizes) -> anyhow::Result<Throughput> {
    let groups = groups(sz);
    let t = Instant::now();
    let mut events = 0u64;
    for group in &groups {
        let mut batches = Vec::with_capacity(group.len());
        for (stream, o) in group {
            let new: Vec<NewEvent> = (1..=sz.bulk_stream_len)
                .map(|k| {
                    let (t, version, data) = encode_event(&pattern_event(o, k))?;
                    Ok(NewEvent::new(t, data).with_event_version(version))
                })
                .collect::<annals::Result<_>>()?;
            events += new.len() as u64;
            batches.push(StreamBatch::new(
                StreamId::parse(stream)?,
                ExpectedVersion::NoStream,
                new,
            ));
        }
        let results = store.append_many(batches).await?;
        ensure!(
            results.len() == group.len()
                && results
                    .iter()
                    .all(|r| r.last_version.get() == sz.bulk_stream_len),
            "W3m: append_many answered {results:?} for {} new streams of {} events",
            group.len(),
            sz.bulk_stream_len
        );
    }
    let done = Throughput {
        events,
        seconds: t.elapsed().as_secs_f64(),
    };
    // Untimed: every account reads back whole, through the repository.
    let repo = Repository::<Account, _>::new(store);
    let want = pattern_balance(sz.bulk_stream_len);
    for (_, o) in groups.iter().flatten() {
        let loaded = repo.load(&account_id(o)).await?;
        ensure!(
            loaded.version.map(|v| v.get()) == Some(sz.bulk_stream_len)
                && loaded.state.balance == want,
            "W3m verification failed: account {o} at {:?} with balance {}",
            loaded.version,
            loaded.state.balance
        );
    }
    Ok(done)
}

/// Checks a raw baseline's W3m store: `events` events over `streams`
/// streams, `full` of them at version L.
fn verify_raw(sz: &Sizes, events: i64, streams: i64, full: i64) -> anyhow::Result<()> {
    let accounts = groups(sz).iter().map(Vec::len).sum::<usize>() as i64;
    let want = (accounts * sz.bulk_stream_len as i64, accounts, accounts);
    ensure!(
        (events, streams, full) == want,
        "W3m raw verification failed: got events={events} streams={streams} \
         at version L={full}, expected {want:?}"
    );
    Ok(())
}

/// W3m in plain rusqlite on a fresh file: one `BEGIN IMMEDIATE` transaction
/// per M streams.
pub fn raw_sqlite(path: &Path, sz: &Sizes) -> anyhow::Result<Throughput> {
    let mut conn =
        rusqlite::Connection::open(path).with_context(|| format!("open {}", path.display()))?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", "FULL")?;
    conn.execute_batch(&annals_sqlite::SqliteEventStore::schema_sql())?;
    let groups = groups(sz);
    let t = Instant::now();
    let mut events = 0u64;
    for group in &groups {
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        {
            let mut insert = tx.prepare_cached(
                "INSERT INTO events (event_id, stream_id, category, stream_version, event_type, event_version, data, metadata, recorded_at) VALUES (?1, ?2, 'Account', ?3, ?4, 1, ?5, '{}', ?6)",
            )?;
            let mut stream_row = tx.prepare_cached(
                "INSERT INTO streams (stream_id, category, version) VALUES (?1, 'Account', ?2)",
            )?;
            let at = chrono::Utc::now().timestamp_micros();
            for (stream, o) in group {
                for k in 1..=sz.bulk_stream_len {
                    let (t, data) = crate::raw_sqlite::encode(&pattern_event(o, k));
                    insert.execute(rusqlite::params![
                        Uuid::now_v7().as_bytes().as_slice(),
                        stream,
                        k as i64,
                        t,
                        data,
                        at
                    ])?;
                    events += 1;
                }
                stream_row.execute(rusqlite::params![stream, sz.bulk_stream_len as i64])?;
            }
        }
        tx.commit()?;
    }
    let done = Throughput {
        events,
        seconds: t.elapsed().as_secs_f64(),
    };
    let (events, streams): (i64, i64) = conn.query_row(
        "SELECT count(*), count(DISTINCT stream_id) FROM events",
        [],
        |r| Ok((r.get(0)?, r.get(1)?)),
    )?;
    let full: i64 = conn.query_row(
        "SELECT count(*) FROM streams WHERE version = ?1",
        [sz.bulk_stream_len as i64],
        |r| r.get(0),
    )?;
    verify_raw(sz, events, streams, full)?;
    Ok(done)
}

/// W3m in plain tokio-postgres in schema `schema` (migrated by the backend,
/// empty): one transaction per M streams, one insert for their events and
/// one for their stream rows.
pub async fn raw_pg(url: &str, schema: &str, sz: &Sizes) -> anyhow::Result<Throughput> {
    let store = annals_postgres::PgEventStore::connect_with(
        url,
        annals_postgres::PgOptions {
            schema: Some(schema.to_owned()),
            ..Default::default()
        },
    )
    .await?;
    store.migrate().await?;
    drop(store);
    let (mut client, conn) = tokio_postgres::connect(url, NoTls)
        .await
        .context("raw connect")?;
    let h = tokio::spawn(conn);
    client
        .batch_execute(&format!("SET search_path TO \"{schema}\""))
        .await?;
    let insert = client
        .prepare(
            "INSERT INTO events (event_id, stream_id, category, stream_version, event_type, event_version, data, metadata) \
             SELECT i, s, 'Account', v, t, 1, d, '{}' \
             FROM unnest($1::uuid[], $2::text[], $3::bigint[], $4::text[], $5::jsonb[]) AS u(i, s, v, t, d)",
        )
        .await?;
    let streams_insert = client
        .prepare(
            "INSERT INTO streams (stream_id, category, version, last_tx) \
             SELECT s, 'Account', $2, pg_current_xact_id() FROM unnest($1::text[]) AS u(s)",
        )
        .await?;
    let groups = groups(sz);
    let t = Instant::now();
    let mut events = 0u64;
    for group in &groups {
        let n = group.len() * sz.bulk_stream_len as usize;
        let (mut ids, mut streams, mut versions, mut types, mut data) = (
            Vec::with_capacity(n),
            Vec::with_capacity(n),
            Vec::with_capacity(n),
            Vec::with_capacity(n),
            Vec::with_capacity(n),
        );
        for (stream, o) in group {
            for k in 1..=sz.bulk_stream_len {
                let (t, d) = crate::raw_pg::encode(&pattern_event(o, k));
                ids.push(Uuid::now_v7());
                streams.push(stream.as_str());
                versions.push(k as i64);
                types.push(t);
                data.push(Json(d));
            }
        }
        let names: Vec<&str> = group.iter().map(|(s, _)| s.as_str()).collect();
        let tx = client.transaction().await?;
        tx.execute(&insert, &[&ids, &streams, &versions, &types, &data])
            .await?;
        tx.execute(&streams_insert, &[&names, &(sz.bulk_stream_len as i64)])
            .await?;
        tx.commit().await?;
        events += n as u64;
    }
    let done = Throughput {
        events,
        seconds: t.elapsed().as_secs_f64(),
    };
    let counts = client
        .query_one(
            "SELECT count(*), count(DISTINCT stream_id) FROM events",
            &[],
        )
        .await?;
    let full: i64 = client
        .query_one(
            "SELECT count(*) FROM streams WHERE version = $1",
            &[&(sz.bulk_stream_len as i64)],
        )
        .await?
        .get(0);
    verify_raw(sz, counts.get(0), counts.get(1), full)?;
    drop(client);
    let _ = h.await;
    Ok(done)
}

/// W3m for `backend` (`sqlite` or `postgres`), each on its own empty store:
/// SQLite files in `dir`, PostgreSQL schemas created and dropped here.
pub async fn run(
    backend: &str,
    dir: Option<&Path>,
    url: &str,
    no_raw: bool,
    sz: &Sizes,
) -> anyhow::Result<W3m> {
    let id = Uuid::now_v7().simple().to_string();
    let (annals, raw) = if backend == "sqlite" {
        let tmp = tempfile::tempdir()?;
        let dir = dir.unwrap_or(tmp.path()).to_path_buf();
        std::fs::create_dir_all(&dir)?;
        let store =
            annals_sqlite::SqliteEventStore::open(dir.join(format!("annals-w3m-{id}.db"))).await?;
        let annals = annals(store, sz).await?;
        let raw = if no_raw {
            None
        } else {
            let path = dir.join(format!("raw-w3m-{id}.db"));
            let sizes = sz.clone();
            Some(tokio::task::spawn_blocking(move || raw_sqlite(&path, &sizes)).await??)
        };
        (annals, raw)
    } else {
        let schema = format!("annals_w3m_{id}");
        let store = annals_postgres::PgEventStore::connect_with(
            url,
            annals_postgres::PgOptions {
                schema: Some(schema.clone()),
                ..Default::default()
            },
        )
        .await?;
        store.migrate().await?;
        let annals = annals(store, sz).await;
        crate::raw_pg::drop_schema(url, &schema).await?;
        let annals = annals?;
        let raw = if no_raw {
            None
        } else {
            let raw_schema = format!("raw_w3m_{id}");
            let r = raw_pg(url, &raw_schema, sz).await;
            crate::raw_pg::drop_schema(url, &raw_schema).await?;
            Some(r?)
        };
        (annals, raw)
    };
    Ok(W3m {
        streams_per_commit: sz.multi_streams,
        annals,
        raw,
    })
}
