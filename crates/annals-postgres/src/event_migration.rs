//! [`annals::EventMigration`] on PostgreSQL: one transaction per call on a
//! pooled connection.
//!
//! The copy is `events_migrating`, created `LIKE events INCLUDING ALL`
//! (columns, defaults, identity, constraints and indexes under generated
//! names). Batches are read by the caller with `read_all` (below the
//! snapshot horizon, so no event still in flight is passed) and written
//! with one `INSERT … SELECT FROM unnest(…)`. Positions keep their
//! `(tx_id, seq)` until the first drop, split or merge; from then on the
//! transaction id is kept and `seq` counts up from above every written one
//! (see `sql/0010_event_migrations.sql`), which keeps the order and ADR
//! 001's guarantee: the rows' transactions all finished long ago.
//!
//! The swap takes `streams` and then `events` in `ACCESS EXCLUSIVE` mode:
//! the first waits for every append in flight (they read `streams` first)
//! and keeps new ones out, so the events read after it are all there are
//! and no append can have read a head the swap changes. It copies the
//! tail, verifies, renames the old table's indexes (constraints follow
//! their index) and identity sequence to backup names and gives their
//! names to the copy's (matched by definition), recreates the old table's
//! triggers on the copy, renames the tables, and moves the identity
//! sequence past every position handed out. Appends waiting on the lock
//! then resolve `events` again by name and write into the new table.

use std::collections::HashMap;

use annals::{
    backup_table_name, EventMigration, GlobalPosition, MigratedSource, MigrationCheckFailure,
    MigrationRun, MigrationState, Result, StreamId, StreamVersion, SwapReport, TailTransform,
    MIGRATION_TABLE,
};
use chrono::{DateTime, Utc};
use deadpool_postgres::Transaction;
use tokio_postgres::Row;

use crate::error::{backend_msg, Context};
use crate::rows::{decode_event, event_columns, position, to_i64};
use crate::PgEventStore;

const RUN_SQL: &str = "SELECT id, plan_file, plan, state, started_at, source_commit, source_seq, \
    source_events, written_events, renumbered, backup_table, swapped_at \
    FROM event_migrations WHERE state <> 'done' ORDER BY id DESC LIMIT 1";

fn run_from(row: &Row) -> Result<MigrationRun> {
    let what = "cannot decode the migration run";
    let state: String = row.try_get(3).context(what)?;
    let commit: Option<i64> = row.try_get(5).context(what)?;
    let seq: Option<i64> = row.try_get(6).context(what)?;
    let checkpoint = match (commit, seq) {
        (Some(c), Some(s)) => Some(position(c, s)?),
        _ => None,
    };
    let source: i64 = row.try_get(7).context(what)?;
    let written: i64 = row.try_get(8).context(what)?;
    Ok(MigrationRun {
        id: row.try_get(0).context(what)?,
        plan_file: row.try_get(1).context(what)?,
        plan: row.try_get(2).context(what)?,
        state: MigrationState::parse(&state)
            .ok_or_else(|| backend_msg(format!("unknown migration state {state:?}")))?,
        started_at: row.try_get::<_, DateTime<Utc>>(4).context(what)?,
        checkpoint,
        source_events: u64::try_from(source).unwrap_or(0),
        written_events: u64::try_from(written).unwrap_or(0),
        renumbered: row.try_get(9).context(what)?,
        backup_table: row.try_get(10).context(what)?,
        swapped_at: row.try_get(11).context(what)?,
    })
}

async fn run_in(client: &impl deadpool_postgres::GenericClient) -> Result<Option<MigrationRun>> {
    let row = client
        .query_opt(RUN_SQL, &[])
        .await
        .context("cannot read the migration run")?;
    row.as_ref().map(run_from).transpose()
}

async fn copying(tx: &Transaction<'_>, run: i64) -> Result<MigrationRun> {
    match run_in(tx).await? {
        Some(r) if r.id == run && r.state == MigrationState::Copying => Ok(r),
        _ => Err(annals::Error::Unsafe(format!(
            "migration run {run} is not copying (swapped or dropped meanwhile)"
        ))),
    }
}

const INSERT_SQL: &str =
    "INSERT INTO events_migrating (seq, tx_id, event_id, stream_id, category, \
    stream_version, event_type, event_version, data, metadata, recorded_at, data_digest) \
    OVERRIDING SYSTEM VALUE \
    SELECT u.seq, u.tx::text::xid8, u.id, u.stream, u.category, u.version, u.etype, u.ever, \
           u.data::jsonb, u.meta::jsonb, u.at, \
           coalesce(u.digest, (SELECT e.data_digest FROM events e WHERE e.event_id = u.id)) \
    FROM unnest($1::bigint[], $2::bigint[], $3::uuid[], $4::text[], $5::text[], $6::bigint[], \
                $7::text[], $8::int[], $9::text[], $10::text[], $11::timestamptz[], $12::bytea[]) \
         AS u(seq, tx, id, stream, category, version, etype, ever, data, meta, at, digest)";

/// The columns of a batch of the copy, one array each for `unnest`.
#[derive(Default)]
struct Columns {
    seq: Vec<i64>,
    tx: Vec<i64>,
    id: Vec<uuid::Uuid>,
    stream: Vec<String>,
    category: Vec<String>,
    version: Vec<i64>,
    event_type: Vec<String>,
    event_version: Vec<i32>,
    data: Vec<String>,
    metadata: Vec<String>,
    at: Vec<DateTime<Utc>>,
    digest: Vec<Option<Vec<u8>>>,
}

/// Writes `batch` into the copy and moves the run's checkpoint, inside the
/// caller's transaction.
async fn write_in(tx: &Transaction<'_>, run: i64, batch: Vec<MigratedSource>) -> Result<()> {
    let what = "cannot write a batch of the migration's copy";
    let row = tx
        .query_one(
            "SELECT next_seq, renumbered FROM event_migrations WHERE id = $1",
            &[&run],
        )
        .await
        .context(what)?;
    let mut next_seq: i64 = row.try_get(0).context(what)?;
    let mut renumbered: bool = row.try_get(1).context(what)?;
    let mut cols = Columns::default();
    let mut removed: (Vec<uuid::Uuid>, Vec<String>, Vec<i64>) = Default::default();
    let mut deltas: HashMap<String, i64> = HashMap::new();
    let mut last = None;
    let (mut sources, mut written) = (0i64, 0i64);
    for s in batch {
        let src_tx = to_i64(s.source.commit());
        let src_seq = to_i64(s.source.seq());
        let n = s.events.len();
        if n != 1 && !renumbered {
            renumbered = true;
            let max: i64 = tx
                .query_one("SELECT coalesce(max(seq), 0) FROM events_migrating", &[])
                .await
                .context(what)?
                .try_get(0)
                .context(what)?;
            // Above every seq written, including this batch's so far.
            next_seq = max.max(cols.seq.iter().copied().max().unwrap_or(0)) + 1;
        }
        for e in s.events {
            let seq = if renumbered {
                next_seq += 1;
                next_seq - 1
            } else {
                src_seq
            };
            cols.seq.push(seq);
            cols.tx.push(src_tx);
            cols.id.push(e.event_id.0);
            cols.category.push(e.stream_id.category().to_owned());
            cols.stream.push(e.stream_id.as_str().to_owned());
            cols.version.push(to_i64(e.stream_version.0));
            cols.event_type.push(e.event_type);
            cols.event_version
                .push(i32::try_from(e.event_version).unwrap_or(i32::MAX));
            cols.data.push(e.data);
            cols.metadata.push(e.metadata);
            cols.at.push(e.recorded_at);
            cols.digest
                .push(e.fingerprint.map(|f| f.as_bytes().to_vec()));
        }
        if let Some((id, stream, version)) = s.removed {
            removed.0.push(id.0);
            removed.1.push(stream.as_str().to_owned());
            removed.2.push(to_i64(version.0));
        }
        if let Some((stream, d)) = s.delta {
            deltas.insert(stream.as_str().to_owned(), d);
        }
        sources += 1;
        written += n as i64;
        last = Some((src_tx, src_seq));
    }
    tx.execute(
        INSERT_SQL,
        &[
            &cols.seq,
            &cols.tx,
            &cols.id,
            &cols.stream,
            &cols.category,
            &cols.version,
            &cols.event_type,
            &cols.event_version,
            &cols.data,
            &cols.metadata,
            &cols.at,
            &cols.digest,
        ],
    )
    .await
    .context(what)?;
    tx.execute(
        "INSERT INTO event_migration_removed (event_id, stream_id, stream_version) \
         SELECT * FROM unnest($1::uuid[], $2::text[], $3::bigint[]) ON CONFLICT DO NOTHING",
        &[&removed.0, &removed.1, &removed.2],
    )
    .await
    .context(what)?;
    let (names, values): (Vec<String>, Vec<i64>) = deltas.into_iter().unzip();
    tx.execute(
        "INSERT INTO event_migration_streams (stream_id, delta) \
         SELECT * FROM unnest($1::text[], $2::bigint[]) \
         ON CONFLICT (stream_id) DO UPDATE SET delta = excluded.delta",
        &[&names, &values],
    )
    .await
    .context(what)?;
    if let Some((c, s)) = last {
        tx.execute(
            "UPDATE event_migrations SET source_commit = $2, source_seq = $3, \
             source_events = source_events + $4, written_events = written_events + $5, \
             next_seq = $6, renumbered = $7 WHERE id = $1",
            &[&run, &c, &s, &sources, &written, &next_seq, &renumbered],
        )
        .await
        .context(what)?;
    }
    Ok(())
}

fn check_failure(
    stream: &str,
    version: Option<i64>,
    position: Option<GlobalPosition>,
    what: String,
) -> annals::Error {
    match StreamId::parse(stream) {
        Ok(stream) => annals::Error::MigrationCheck(Box::new(MigrationCheckFailure {
            stream,
            version: version
                .and_then(|v| u64::try_from(v).ok())
                .map(StreamVersion),
            position,
            what,
        })),
        Err(e) => e,
    }
}

async fn verify(tx: &Transaction<'_>) -> Result<()> {
    let what = "cannot verify the migration's copy";
    let counts = tx
        .query_opt(
            "WITH s AS (SELECT stream_id, count(*) AS n FROM events GROUP BY stream_id), \
                  t AS (SELECT stream_id, count(*) AS n, max(stream_version) AS m \
                        FROM events_migrating GROUP BY stream_id) \
             SELECT s.stream_id::text, s.n, coalesce(d.delta, 0), coalesce(t.n, 0), coalesce(t.m, 0) \
             FROM s LEFT JOIN t ON t.stream_id = s.stream_id \
             LEFT JOIN event_migration_streams d ON d.stream_id = s.stream_id \
             WHERE coalesce(t.n, 0) <> s.n + coalesce(d.delta, 0) OR coalesce(t.m, 0) <> coalesce(t.n, 0) \
             LIMIT 1",
            &[],
        )
        .await
        .context(what)?;
    if let Some(r) = counts {
        let stream: String = r.try_get(0).context(what)?;
        let source: i64 = r.try_get(1).context(what)?;
        let delta: i64 = r.try_get(2).context(what)?;
        let copied: i64 = r.try_get(3).context(what)?;
        let head: i64 = r.try_get(4).context(what)?;
        return Err(check_failure(
            &stream,
            None,
            None,
            format!(
                "the copy has {copied} events (last version {head}), expected {} ({source} stored, {delta:+} by the plan)",
                source + delta
            ),
        ));
    }
    let missing = tx
        .query_opt(
            "SELECT e.stream_id::text, e.stream_version, e.tx_id::text::bigint, e.seq FROM events e \
             WHERE NOT EXISTS (SELECT 1 FROM events_migrating c WHERE c.event_id = e.event_id) \
               AND NOT EXISTS (SELECT 1 FROM event_migration_removed r WHERE r.event_id = e.event_id) \
             ORDER BY e.tx_id, e.seq LIMIT 1",
            &[],
        )
        .await
        .context(what)?;
    if let Some(r) = missing {
        let stream: String = r.try_get(0).context(what)?;
        let version: i64 = r.try_get(1).context(what)?;
        let at = position(r.try_get(2).context(what)?, r.try_get(3).context(what)?)?;
        return Err(check_failure(
            &stream,
            Some(version),
            Some(at),
            "the event's id is not in the copy, and the plan did not remove it".into(),
        ));
    }
    Ok(())
}

/// What an index does, without its name and table: its `indexdef` from
/// `USING` on, and whether it is unique.
fn index_key(def: &str) -> (bool, String) {
    let unique = def.starts_with("CREATE UNIQUE INDEX");
    let body = def.find(" USING ").map_or(def, |i| &def[i..]);
    (unique, body.to_owned())
}

async fn indexes(tx: &Transaction<'_>, table: &str) -> Result<Vec<(String, (bool, String))>> {
    let rows = tx
        .query(
            "SELECT indexname::text, indexdef FROM pg_indexes \
             WHERE schemaname = current_schema() AND tablename = $1",
            &[&table],
        )
        .await
        .context("cannot list the indexes of the events tables")?;
    rows.iter()
        .map(|r| {
            let name: String = r.try_get(0).context("cannot list indexes")?;
            let def: String = r.try_get(1).context("cannot list indexes")?;
            Ok((name, index_key(&def)))
        })
        .collect()
}

fn quote(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

async fn swap_in(tx: &Transaction<'_>, run: i64, mut tail: TailTransform) -> Result<SwapReport> {
    let what = "cannot swap the migration's copy";
    tx.batch_execute(
        "LOCK TABLE streams IN ACCESS EXCLUSIVE MODE; LOCK TABLE events IN ACCESS EXCLUSIVE MODE",
    )
    .await
    .context(what)?;
    let r = copying(tx, run).await?;
    let (c, s) = r
        .checkpoint
        .map_or((0, 0), |p| (to_i64(p.commit()), to_i64(p.seq())));
    let sql = concat!(
        "SELECT ",
        event_columns!(),
        " FROM events e WHERE (e.tx_id, e.seq) > ($1::bigint::text::xid8, $2) ORDER BY e.tx_id, e.seq"
    );
    let rows = tx.query(sql, &[&c, &s]).await.context(what)?;
    let mut last = None;
    let mut batch = Vec::with_capacity(rows.len());
    for row in &rows {
        batch.extend(tail(Some(decode_event(row, &mut last, None)?))?);
    }
    batch.extend(tail(None)?);
    let tail_events = rows.len() as u64;
    if !batch.is_empty() {
        write_in(tx, run, batch).await?;
    }
    verify(tx).await?;
    let renumbered: bool = tx
        .query_one(
            "SELECT renumbered FROM event_migrations WHERE id = $1",
            &[&run],
        )
        .await
        .context(what)?
        .try_get(0)
        .context(what)?;

    let now: DateTime<Utc> = tx
        .query_one("SELECT now()", &[])
        .await
        .context(what)?
        .try_get(0)
        .context(what)?;
    let base = backup_table_name(now);
    let mut backup = base.clone();
    let mut n = 1;
    while tx
        .query_one(
            "SELECT to_regclass(quote_ident(current_schema()) || '.' || quote_ident($1)) IS NOT NULL",
            &[&backup],
        )
        .await
        .context(what)?
        .try_get::<_, bool>(0)
        .context(what)?
    {
        n += 1;
        backup = format!("{base}_{n}");
    }

    // Indexes (constraints follow their index): the old ones to backup
    // names, the copy's to the old names, matched by definition.
    let old = indexes(tx, "events").await?;
    let mut new = indexes(tx, MIGRATION_TABLE).await?;
    let mut renames = Vec::new();
    for (i, (name, _)) in old.iter().enumerate() {
        renames.push(format!(
            "ALTER INDEX {} RENAME TO {}",
            quote(name),
            quote(&format!("{backup}_{i}"))
        ));
    }
    for (name, key) in &old {
        let Some(i) = new.iter().position(|(_, k)| k == key) else {
            return Err(backend_msg(format!(
                "the copy has no index like {name} of events; drop the copy (`annals events drop-backup`) and migrate again"
            )));
        };
        let (copy_name, _) = new.swap_remove(i);
        renames.push(format!(
            "ALTER INDEX {} RENAME TO {}",
            quote(&copy_name),
            quote(name)
        ));
    }
    let triggers: Vec<String> = tx
        .query(
            "SELECT pg_get_triggerdef(oid) FROM pg_trigger \
             WHERE tgrelid = 'events'::regclass AND NOT tgisinternal",
            &[],
        )
        .await
        .context(what)?
        .iter()
        .map(|r| r.try_get(0).context(what))
        .collect::<Result<_>>()?;
    let old_seq: String = tx
        .query_one("SELECT pg_get_serial_sequence('events', 'seq')", &[])
        .await
        .context(what)?
        .try_get(0)
        .context(what)?;
    let old_last: i64 = tx
        .query_one(&format!("SELECT last_value FROM {old_seq}"), &[])
        .await
        .context(what)?
        .try_get(0)
        .context(what)?;
    let new_seq: String = tx
        .query_one(
            "SELECT pg_get_serial_sequence(quote_ident($1), 'seq')",
            &[&MIGRATION_TABLE],
        )
        .await
        .context(what)?
        .try_get(0)
        .context(what)?;
    let mut ddl = renames.join("; ");
    ddl.push_str(&format!(
        "; ALTER SEQUENCE {old_seq} RENAME TO {}; ALTER SEQUENCE {new_seq} RENAME TO events_seq_seq\
         ; ALTER TABLE events RENAME TO {}; ALTER TABLE {MIGRATION_TABLE} RENAME TO events",
        quote(&format!("{backup}_seq_seq")),
        quote(&backup)
    ));
    for t in &triggers {
        ddl.push_str("; ");
        ddl.push_str(t);
    }
    tx.batch_execute(&ddl).await.context(what)?;
    tx.execute(
        "SELECT setval(pg_get_serial_sequence('events', 'seq'), \
                greatest((SELECT coalesce(max(seq), 0) FROM events), $1, 1))",
        &[&old_last],
    )
    .await
    .context(what)?;
    tx.batch_execute(
        "UPDATE streams s SET version = s.version + d.delta \
           FROM event_migration_streams d WHERE d.stream_id = s.stream_id",
    )
    .await
    .context(what)?;
    let snapshots_removed = tx
        .execute("DELETE FROM snapshots", &[])
        .await
        .context(what)?;
    tx.execute("DELETE FROM snapshot_staging", &[])
        .await
        .context(what)?;
    let mut checkpoints_reset = Vec::new();
    let mut dead_letters_removed = 0;
    if renumbered {
        for r in tx
            .query("DELETE FROM checkpoints RETURNING name::text", &[])
            .await
            .context(what)?
        {
            checkpoints_reset.push(r.try_get::<_, String>(0).context(what)?);
        }
        checkpoints_reset.sort();
        dead_letters_removed = tx
            .execute("DELETE FROM dead_letters", &[])
            .await
            .context(what)?;
    }
    tx.batch_execute("DELETE FROM event_migration_streams; DELETE FROM event_migration_removed")
        .await
        .context(what)?;
    tx.execute(
        "UPDATE event_migrations SET state = 'swapped', backup_table = $2, swapped_at = $3 WHERE id = $1",
        &[&run, &backup, &now],
    )
    .await
    .context(what)?;
    let events: i64 = tx
        .query_one("SELECT count(*) FROM events", &[])
        .await
        .context(what)?
        .try_get(0)
        .context(what)?;
    Ok(SwapReport {
        backup_table: backup,
        tail_events,
        events: u64::try_from(events).unwrap_or(0),
        checkpoints_reset,
        dead_letters_removed,
        snapshots_removed,
    })
}

impl EventMigration for PgEventStore {
    async fn begin_migration(&self, plan_file: &str, plan: &str) -> Result<MigrationRun> {
        let what = "cannot start a migration";
        let mut client = self.ready_client("start a migration").await?;
        let tx = client.transaction().await.context(what)?;
        tx.batch_execute("LOCK TABLE event_migrations IN EXCLUSIVE MODE")
            .await
            .context(what)?;
        if let Some(run) = run_in(&tx).await? {
            return match run.state {
                MigrationState::Copying if run.plan == plan => Ok(run),
                MigrationState::Copying => Err(annals::Error::Unsafe(format!(
                    "migration run {} is copying with another plan ({}): finish it with `annals events swap`, or drop its copy with `annals events drop-backup`",
                    run.id, run.plan_file
                ))),
                _ => Err(annals::Error::Unsafe(format!(
                    "migration run {} left the backup table {}: drop it with `annals events drop-backup` first",
                    run.id,
                    run.backup_table.as_deref().unwrap_or("?")
                ))),
            };
        }
        tx.batch_execute(&format!(
            "DROP TABLE IF EXISTS {MIGRATION_TABLE}; \
             CREATE TABLE {MIGRATION_TABLE} (LIKE events INCLUDING ALL); \
             DELETE FROM event_migration_streams; DELETE FROM event_migration_removed"
        ))
        .await
        .context(what)?;
        tx.execute(
            "INSERT INTO event_migrations (plan_file, plan, state) VALUES ($1, $2, 'copying')",
            &[&plan_file, &plan],
        )
        .await
        .context(what)?;
        let run = run_in(&tx)
            .await?
            .ok_or_else(|| backend_msg("the migration run just recorded is gone"))?;
        tx.commit().await.context(what)?;
        Ok(run)
    }

    async fn migration_run(&self) -> Result<Option<MigrationRun>> {
        let client = self.ready_client("read the migration run").await?;
        run_in(&client).await
    }

    async fn migration_deltas(&self) -> Result<Vec<(StreamId, i64)>> {
        let what = "cannot read the migration's stream deltas";
        let client = self.ready_client("read the migration's deltas").await?;
        client
            .query(
                "SELECT stream_id::text, delta FROM event_migration_streams",
                &[],
            )
            .await
            .context(what)?
            .iter()
            .map(|r| {
                let s: String = r.try_get(0).context(what)?;
                Ok((StreamId::parse(&s)?, r.try_get(1).context(what)?))
            })
            .collect()
    }

    async fn write_migration_batch(&self, run: i64, batch: Vec<MigratedSource>) -> Result<()> {
        let what = "cannot write a migration batch";
        let mut client = self.ready_client("write a migration batch").await?;
        let tx = client.transaction().await.context(what)?;
        copying(&tx, run).await?;
        write_in(&tx, run, batch).await?;
        tx.commit().await.context(what)
    }

    async fn swap_migration(&self, run: i64, tail: TailTransform) -> Result<SwapReport> {
        let mut client = self.ready_client("swap the migration's copy").await?;
        let tx = client
            .transaction()
            .await
            .context("cannot start the swap")?;
        let report = swap_in(&tx, run, tail).await?;
        tx.commit().await.context("cannot commit the swap")?;
        Ok(report)
    }

    async fn drop_migration_backup(&self) -> Result<Option<String>> {
        let what = "cannot drop a migration's table";
        let mut client = self.ready_client("drop a migration's table").await?;
        let tx = client.transaction().await.context(what)?;
        let Some(run) = run_in(&tx).await? else {
            return Ok(None);
        };
        let table = match run.state {
            MigrationState::Copying => MIGRATION_TABLE.to_owned(),
            _ => run.backup_table.clone().unwrap_or_default(),
        };
        if !table.is_empty() {
            tx.batch_execute(&format!("DROP TABLE IF EXISTS {}", quote(&table)))
                .await
                .context(what)?;
        }
        tx.batch_execute(
            "DELETE FROM event_migration_streams; DELETE FROM event_migration_removed",
        )
        .await
        .context(what)?;
        tx.execute(
            "UPDATE event_migrations SET state = 'done' WHERE id = $1",
            &[&run.id],
        )
        .await
        .context(what)?;
        tx.commit().await.context(what)?;
        Ok(Some(table))
    }
}
