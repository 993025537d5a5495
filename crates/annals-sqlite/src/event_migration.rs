//! [`annals::EventMigration`] on SQLite: every call is one solo job on the
//! writer thread in a `BEGIN IMMEDIATE` transaction, so a batch and its
//! checkpoint commit together, and the swap runs while no append can.
//!
//! The copy `events_migrating` is created from the live table's own DDL
//! (`sqlite_schema`), so it has every column a later migration added. It
//! has only the table's constraints while it fills; the swap drops the live
//! table's indexes and triggers (they stay with the renamed backup only by
//! name), renames the tables, creates them again from their stored DDL on
//! the new `events`, and keeps `sqlite_sequence` at least where it was, so a
//! position is never handed out twice.

use annals::{
    backup_table_name, EventMigration, GlobalPosition, MigratedSource, MigrationCheckFailure,
    MigrationRun, MigrationState, Result, StreamId, StreamVersion, SwapReport, TailTransform,
    MIGRATION_TABLE,
};
use rusqlite::{params, Connection, OptionalExtension, TransactionBehavior};

use crate::codec::{event_columns, from_micros, now_micros, sql_int, RawEvents};
use crate::error::db;
use crate::SqliteEventStore;

const RUN_SQL: &str = "SELECT id, plan_file, plan, state, started_at, source_position, \
    source_events, written_events, renumbered, backup_table, swapped_at \
    FROM event_migrations WHERE state <> 'done' ORDER BY id DESC LIMIT 1";

fn run_row(conn: &Connection) -> Result<Option<MigrationRun>> {
    let row = conn
        .prepare_cached(RUN_SQL)
        .and_then(|mut s| {
            s.query_row([], |r| {
                Ok((
                    r.get::<_, i64>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, String>(2)?,
                    r.get::<_, String>(3)?,
                    r.get::<_, i64>(4)?,
                    r.get::<_, Option<i64>>(5)?,
                    r.get::<_, i64>(6)?,
                    r.get::<_, i64>(7)?,
                    r.get::<_, bool>(8)?,
                    r.get::<_, Option<String>>(9)?,
                    r.get::<_, Option<i64>>(10)?,
                ))
            })
            .optional()
        })
        .map_err(db("reading the migration run"))?;
    let Some((
        id,
        plan_file,
        plan,
        state,
        started,
        source,
        copied,
        written,
        renumbered,
        backup,
        swapped,
    )) = row
    else {
        return Ok(None);
    };
    let state = MigrationState::parse(&state).ok_or_else(|| annals::Error::Backend {
        backend: "sqlite",
        message: format!("event_migrations row {id}: unknown state {state:?}"),
        source: None,
    })?;
    let time = |t: i64| {
        from_micros(t).ok_or_else(|| annals::Error::Backend {
            backend: "sqlite",
            message: format!("event_migrations row {id}: time {t} out of range"),
            source: None,
        })
    };
    Ok(Some(MigrationRun {
        id,
        plan_file,
        plan,
        state,
        started_at: time(started)?,
        checkpoint: source
            .and_then(|p| u64::try_from(p).ok())
            .map(GlobalPosition::from_seq),
        source_events: u64::try_from(copied).unwrap_or(0),
        written_events: u64::try_from(written).unwrap_or(0),
        renumbered,
        backup_table: backup,
        swapped_at: swapped.map(time).transpose()?,
    }))
}

fn begin_job(conn: &mut Connection, plan_file: String, plan: String) -> Result<MigrationRun> {
    let tx = conn
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .map_err(db("starting a migration"))?;
    if let Some(run) = run_row(&tx)? {
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
    let ddl: String = tx
        .query_row(
            "SELECT sql FROM sqlite_schema WHERE type = 'table' AND name = 'events'",
            [],
            |r| r.get(0),
        )
        .map_err(db("reading the events table's DDL"))?;
    let body = ddl
        .find('(')
        .map(|i| &ddl[i..])
        .ok_or_else(|| annals::Error::Backend {
            backend: "sqlite",
            message: format!("unexpected DDL of the events table: {ddl}"),
            source: None,
        })?;
    tx.execute_batch(&format!(
        "DROP TABLE IF EXISTS {MIGRATION_TABLE}; CREATE TABLE {MIGRATION_TABLE} {body}; \
         DELETE FROM event_migration_streams; DELETE FROM event_migration_removed;"
    ))
    .map_err(db("creating the migration's copy table"))?;
    tx.execute(
        "INSERT INTO event_migrations (plan_file, plan, state, started_at) VALUES (?1, ?2, 'copying', ?3)",
        params![plan_file, plan, now_micros()],
    )
    .map_err(db("recording a migration run"))?;
    let run = run_row(&tx)?.ok_or_else(|| annals::Error::Backend {
        backend: "sqlite",
        message: "the migration run just recorded is gone".into(),
        source: None,
    })?;
    tx.commit().map_err(db("committing a migration's start"))?;
    Ok(run)
}

fn deltas(conn: &Connection) -> Result<Vec<(StreamId, i64)>> {
    let rows: Vec<(String, i64)> = conn
        .prepare_cached("SELECT stream_id, delta FROM event_migration_streams")
        .and_then(|mut s| {
            s.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?
                .collect::<rusqlite::Result<_>>()
        })
        .map_err(db("reading the migration's stream deltas"))?;
    rows.into_iter()
        .map(|(s, d)| Ok((StreamId::parse(&s)?, d)))
        .collect()
}

const INSERT_COPY_SQL: &str = "INSERT INTO events_migrating (position, event_id, stream_id, \
    category, stream_version, event_type, event_version, data, metadata, recorded_at, data_digest) \
    VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, \
    COALESCE(?11, (SELECT data_digest FROM events WHERE event_id = ?2)))";

fn copying(conn: &Connection, run: i64) -> Result<MigrationRun> {
    match run_row(conn)? {
        Some(r) if r.id == run && r.state == MigrationState::Copying => Ok(r),
        _ => Err(annals::Error::Unsafe(format!(
            "migration run {run} is not copying (swapped or dropped meanwhile)"
        ))),
    }
}

/// Writes `batch` into the copy and moves the run's checkpoint, inside the
/// caller's transaction.
fn write_in(conn: &Connection, run: i64, batch: Vec<MigratedSource>) -> Result<()> {
    let (mut delta, mut renumbered): (i64, bool) = conn
        .query_row(
            "SELECT position_delta, renumbered FROM event_migrations WHERE id = ?1",
            [run],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .map_err(db("reading the migration run"))?;
    let mut insert = conn
        .prepare_cached(INSERT_COPY_SQL)
        .map_err(db("preparing the copy's insert"))?;
    let mut last = None;
    let (mut sources, mut written) = (0i64, 0i64);
    for s in batch {
        let source = i64::try_from(s.source.seq()).unwrap_or(i64::MAX);
        let n = s.events.len() as i64;
        for (i, e) in s.events.iter().enumerate() {
            insert
                .execute(params![
                    source + delta + i as i64,
                    e.event_id.0.as_bytes().as_slice(),
                    e.stream_id.as_str(),
                    e.stream_id.category(),
                    sql_int(e.stream_version.0),
                    e.event_type,
                    e.event_version,
                    e.data,
                    e.metadata,
                    crate::codec::to_micros(e.recorded_at),
                    e.fingerprint.map(|f| f.as_bytes().to_vec()),
                ])
                .map_err(db("writing an event into the migration's copy"))?;
        }
        if n != 1 {
            renumbered = true;
            delta += n - 1;
        }
        if let Some((id, stream, version)) = &s.removed {
            conn.prepare_cached(
                "INSERT OR REPLACE INTO event_migration_removed (event_id, stream_id, stream_version) VALUES (?1, ?2, ?3)",
            )
            .and_then(|mut st| {
                st.execute(params![id.0.as_bytes().as_slice(), stream.as_str(), sql_int(version.0)])
            })
            .map_err(db("recording a removed event"))?;
        }
        if let Some((stream, d)) = &s.delta {
            conn.prepare_cached(
                "INSERT INTO event_migration_streams (stream_id, delta) VALUES (?1, ?2) \
                 ON CONFLICT (stream_id) DO UPDATE SET delta = excluded.delta",
            )
            .and_then(|mut st| st.execute(params![stream.as_str(), d]))
            .map_err(db("recording a stream's delta"))?;
        }
        sources += 1;
        written += n;
        last = Some(source);
    }
    if let Some(last) = last {
        conn.execute(
            "UPDATE event_migrations SET source_position = ?2, source_events = source_events + ?3, \
             written_events = written_events + ?4, position_delta = ?5, renumbered = ?6 WHERE id = ?1",
            params![run, last, sources, written, delta, renumbered],
        )
        .map_err(db("moving the migration's checkpoint"))?;
    }
    Ok(())
}

fn write_job(conn: &mut Connection, run: i64, batch: Vec<MigratedSource>) -> Result<()> {
    let tx = conn
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .map_err(db("starting a migration batch"))?;
    copying(&tx, run)?;
    write_in(&tx, run, batch)?;
    tx.commit().map_err(db("committing a migration batch"))
}

fn check_failure(
    stream: &str,
    version: Option<i64>,
    position: Option<i64>,
    what: String,
) -> annals::Error {
    match StreamId::parse(stream) {
        Ok(stream) => annals::Error::MigrationCheck(Box::new(MigrationCheckFailure {
            stream,
            version: version
                .and_then(|v| u64::try_from(v).ok())
                .map(StreamVersion),
            position: position
                .and_then(|p| u64::try_from(p).ok())
                .map(GlobalPosition::from_seq),
            what,
        })),
        Err(e) => e,
    }
}

/// The verification before a swap (see the trait docs).
fn verify(conn: &Connection) -> Result<()> {
    let counts: Option<(String, i64, i64, i64, i64)> = conn
        .query_row(
            "WITH s AS (SELECT stream_id, count(*) AS n FROM events GROUP BY stream_id), \
                  t AS (SELECT stream_id, count(*) AS n, max(stream_version) AS m \
                        FROM events_migrating GROUP BY stream_id) \
             SELECT s.stream_id, s.n, coalesce(d.delta, 0), coalesce(t.n, 0), coalesce(t.m, 0) \
             FROM s LEFT JOIN t ON t.stream_id = s.stream_id \
             LEFT JOIN event_migration_streams d ON d.stream_id = s.stream_id \
             WHERE coalesce(t.n, 0) <> s.n + coalesce(d.delta, 0) OR coalesce(t.m, 0) <> coalesce(t.n, 0) \
             LIMIT 1",
            [],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?)),
        )
        .optional()
        .map_err(db("verifying the copy's counts"))?;
    if let Some((stream, source, delta, copied, head)) = counts {
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
    let missing: Option<(String, i64, i64)> = conn
        .query_row(
            "SELECT e.stream_id, e.stream_version, e.position FROM events e \
             WHERE NOT EXISTS (SELECT 1 FROM events_migrating c WHERE c.event_id = e.event_id) \
               AND NOT EXISTS (SELECT 1 FROM event_migration_removed r WHERE r.event_id = e.event_id) \
             ORDER BY e.position LIMIT 1",
            [],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )
        .optional()
        .map_err(db("verifying the copy's ids"))?;
    if let Some((stream, version, position)) = missing {
        return Err(check_failure(
            &stream,
            Some(version),
            Some(position),
            "the event's id is not in the copy, and the plan did not remove it".into(),
        ));
    }
    Ok(())
}

fn swap_job(conn: &mut Connection, run: i64, mut tail: TailTransform) -> Result<SwapReport> {
    let tx = conn
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .map_err(db("starting the swap"))?;
    let r = copying(&tx, run)?;
    // The events appended since the last batch: no append runs meanwhile.
    let after = r.checkpoint.map_or(0, |p| sql_int(p.seq()));
    let page = {
        let mut stmt = tx
            .prepare(concat!(
                "SELECT ",
                event_columns!(),
                " FROM events WHERE position > ?1 ORDER BY position"
            ))
            .map_err(db("reading the events appended during the copy"))?;
        let mut rows = stmt
            .query([after])
            .map_err(db("reading the events appended during the copy"))?;
        RawEvents::collect(&mut rows, usize::MAX, usize::MAX, "reading the tail")?
    };
    let mut batch = Vec::new();
    let mut tail_events = 0u64;
    for event in page.decode(None) {
        batch.extend(tail(Some(event?))?);
        tail_events += 1;
    }
    batch.extend(tail(None)?);
    write_in(&tx, run, batch)?;
    verify(&tx)?;
    let renumbered: bool = tx
        .query_row(
            "SELECT renumbered FROM event_migrations WHERE id = ?1",
            [run],
            |r| r.get(0),
        )
        .map_err(db("reading the migration run"))?;

    let now = now_micros();
    let mut backup = backup_table_name(from_micros(now).unwrap_or_else(chrono::Utc::now));
    let taken = |name: &str| -> Result<bool> {
        tx.query_row(
            "SELECT EXISTS (SELECT 1 FROM sqlite_schema WHERE name = ?1)",
            [name],
            |r| r.get(0),
        )
        .map_err(db("checking the backup table's name"))
    };
    let base = backup.clone();
    let mut n = 1;
    while taken(&backup)? {
        n += 1;
        backup = format!("{base}_{n}");
    }
    let objects: Vec<(String, String, String)> = {
        let mut s = tx
            .prepare(
                "SELECT type, name, sql FROM sqlite_schema \
                 WHERE type IN ('index', 'trigger') AND tbl_name = 'events' AND sql IS NOT NULL",
            )
            .map_err(db("listing the events table's indexes"))?;
        s.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
            .and_then(|rows| rows.collect::<rusqlite::Result<_>>())
            .map_err(db("listing the events table's indexes"))?
    };
    let old_seq: i64 = tx
        .query_row(
            "SELECT coalesce(max(seq), 0) FROM sqlite_sequence WHERE name = 'events'",
            [],
            |r| r.get(0),
        )
        .map_err(db("reading the events table's sequence"))?;
    for (kind, name, _) in &objects {
        let kind = if kind == "index" { "INDEX" } else { "TRIGGER" };
        tx.execute_batch(&format!("DROP {kind} \"{name}\""))
            .map_err(db("dropping an index of the old table"))?;
    }
    tx.execute_batch(&format!(
        "ALTER TABLE events RENAME TO \"{backup}\"; ALTER TABLE {MIGRATION_TABLE} RENAME TO events;"
    ))
    .map_err(db("renaming the tables"))?;
    for (_, _, sql) in &objects {
        tx.execute_batch(sql)
            .map_err(db("creating an index on the new table"))?;
    }
    let new_max: i64 = tx
        .query_row("SELECT coalesce(max(position), 0) FROM events", [], |r| {
            r.get(0)
        })
        .map_err(db("reading the new table's last position"))?;
    tx.execute("DELETE FROM sqlite_sequence WHERE name = 'events'", [])
        .map_err(db("resetting the new table's sequence"))?;
    tx.execute(
        "INSERT INTO sqlite_sequence (name, seq) VALUES ('events', ?1)",
        [new_max.max(old_seq)],
    )
    .map_err(db("setting the new table's sequence"))?;
    tx.execute_batch(
        "UPDATE streams SET version = version + \
           (SELECT d.delta FROM event_migration_streams d WHERE d.stream_id = streams.stream_id) \
         WHERE stream_id IN (SELECT stream_id FROM event_migration_streams);",
    )
    .map_err(db("moving the changed streams' heads"))?;
    let snapshots_removed = tx
        .execute("DELETE FROM snapshots", [])
        .map_err(db("removing the snapshots"))? as u64;
    tx.execute("DELETE FROM snapshot_staging", [])
        .map_err(db("removing the staged snapshots"))?;
    let mut checkpoints_reset = Vec::new();
    let mut dead_letters_removed = 0;
    if renumbered {
        let mut s = tx
            .prepare("SELECT name FROM checkpoints ORDER BY name")
            .map_err(db("listing the checkpoints"))?;
        checkpoints_reset = s
            .query_map([], |r| r.get(0))
            .and_then(|rows| rows.collect::<rusqlite::Result<Vec<String>>>())
            .map_err(db("listing the checkpoints"))?;
        drop(s);
        tx.execute("DELETE FROM checkpoints", [])
            .map_err(db("removing the checkpoints"))?;
        dead_letters_removed = tx
            .execute("DELETE FROM dead_letters", [])
            .map_err(db("removing the dead letters"))? as u64;
    }
    tx.execute_batch("DELETE FROM event_migration_streams; DELETE FROM event_migration_removed;")
        .map_err(db("clearing the migration's bookkeeping"))?;
    tx.execute(
        "UPDATE event_migrations SET state = 'swapped', backup_table = ?2, swapped_at = ?3 WHERE id = ?1",
        params![run, backup, now],
    )
    .map_err(db("recording the swap"))?;
    let events: i64 = tx
        .query_row("SELECT count(*) FROM events", [], |r| r.get(0))
        .map_err(db("counting the events"))?;
    tx.commit().map_err(db("committing the swap"))?;
    Ok(SwapReport {
        backup_table: backup,
        tail_events,
        events: u64::try_from(events).unwrap_or(0),
        checkpoints_reset,
        dead_letters_removed,
        snapshots_removed,
    })
}

fn drop_job(conn: &mut Connection) -> Result<Option<String>> {
    let tx = conn
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .map_err(db("starting to drop a migration's table"))?;
    let Some(run) = run_row(&tx)? else {
        return Ok(None);
    };
    let table = match run.state {
        MigrationState::Copying => MIGRATION_TABLE.to_owned(),
        _ => run.backup_table.clone().unwrap_or_default(),
    };
    if !table.is_empty() {
        tx.execute_batch(&format!("DROP TABLE IF EXISTS \"{table}\""))
            .map_err(db("dropping a migration's table"))?;
    }
    tx.execute_batch("DELETE FROM event_migration_streams; DELETE FROM event_migration_removed;")
        .map_err(db("clearing the migration's bookkeeping"))?;
    tx.execute(
        "UPDATE event_migrations SET state = 'done' WHERE id = ?1",
        [run.id],
    )
    .map_err(db("closing the migration run"))?;
    tx.commit().map_err(db("committing the drop"))?;
    Ok(Some(table))
}

impl EventMigration for SqliteEventStore {
    async fn begin_migration(&self, plan_file: &str, plan: &str) -> Result<MigrationRun> {
        let (plan_file, plan) = (plan_file.to_owned(), plan.to_owned());
        self.conns()
            .write(move |conn| begin_job(conn, plan_file, plan))
            .await
    }

    async fn migration_run(&self) -> Result<Option<MigrationRun>> {
        self.conns().read(run_row).await
    }

    async fn migration_deltas(&self) -> Result<Vec<(StreamId, i64)>> {
        self.conns().read(deltas).await
    }

    async fn write_migration_batch(&self, run: i64, batch: Vec<MigratedSource>) -> Result<()> {
        self.conns()
            .write(move |conn| write_job(conn, run, batch))
            .await
    }

    async fn swap_migration(&self, run: i64, tail: TailTransform) -> Result<SwapReport> {
        self.conns()
            .write(move |conn| swap_job(conn, run, tail))
            .await
    }

    async fn drop_migration_backup(&self) -> Result<Option<String>> {
        self.conns().write(drop_job).await
    }
}
