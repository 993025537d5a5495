//! [`annals::EventImport`] on SQLite: one writer-thread job, a member of a
//! group transaction like an append (see `event_store`), in its own
//! savepoint: read the heads of the batch's streams and the rows stored
//! under its ids, let the core plan ([`annals::plan_import`]), then insert
//! each run with the append's own statements, in input order, with each
//! event's `recorded_at`. Positions come from `AUTOINCREMENT`, so they
//! follow input order and commit order as for any append.

use std::collections::HashMap;

use annals::{plan_import, EventImport, ImportEvent, ImportReport, Result};
use rusqlite::Connection;

use crate::codec::{sql_int, to_micros, RawEvents};
use crate::error::{db, map_err};
use crate::event_store::{head_version, INSERT_SQL, READ_EVENT_SQL, UPSERT_STREAM_SQL};
use crate::SqliteEventStore;

impl EventImport for SqliteEventStore {
    async fn import_events(&self, events: Vec<ImportEvent>) -> Result<ImportReport> {
        if events.is_empty() {
            return Ok(ImportReport::default());
        }
        let report = self
            .conns()
            .write_in_group(move |conn| import_job(conn, events))
            .await?;
        if report.imported > 0 {
            metrics::counter!("annals_events_appended_total", "backend" => "sqlite")
                .increment(report.imported);
        }
        Ok(report)
    }
}

fn import_job(conn: &mut Connection, events: Vec<ImportEvent>) -> Result<ImportReport> {
    let sp = conn.savepoint().map_err(db("starting an import"))?;
    let report = import_in(&sp, events)?;
    sp.commit().map_err(db("releasing an import's savepoint"))?;
    Ok(report)
}

/// The import's work on `sp`, an open savepoint (committed by the caller).
pub(crate) fn import_in(sp: &Connection, events: Vec<ImportEvent>) -> Result<ImportReport> {
    let mut heads = HashMap::new();
    for e in &events {
        if !heads.contains_key(&e.stream_id) {
            heads.insert(e.stream_id.clone(), head_version(sp, &e.stream_id)?);
        }
    }
    let mut stored = HashMap::new();
    {
        let mut lookup = sp
            .prepare_cached(READ_EVENT_SQL)
            .map_err(db("preparing an event lookup"))?;
        for e in &events {
            let mut rows = lookup
                .query([&e.event_id.0.as_bytes()[..]])
                .map_err(db("reading an event by id"))?;
            let page = RawEvents::collect(&mut rows, 1, usize::MAX, "reading an event by id")?;
            if let Some(found) = page.decode(None).next().transpose()? {
                stored.insert(e.event_id, found);
            }
        }
    }
    let plan = plan_import(events, &heads, &stored)?;
    let mut positions = Vec::with_capacity(plan.runs.len());
    {
        let mut insert = sp
            .prepare_cached(INSERT_SQL)
            .map_err(db("preparing the event insert"))?;
        let mut upsert = sp
            .prepare_cached(UPSERT_STREAM_SQL)
            .map_err(db("preparing the stream head update"))?;
        for run in &plan.runs {
            let head = run.head.map_or(0, |v| v.get());
            let mut assigned = Vec::with_capacity(run.events.len());
            for (i, (e, t)) in run.events.iter().zip(&run.recorded_at).enumerate() {
                insert
                    .execute(rusqlite::params![
                        &e.event_id.0.as_bytes()[..],
                        run.stream.as_str(),
                        run.stream.category(),
                        sql_int(head + i as u64 + 1),
                        e.event_type,
                        i64::from(e.event_version),
                        e.data,
                        e.metadata,
                        to_micros(*t),
                        &e.fingerprint.as_bytes()[..],
                    ])
                    .map_err(|err| {
                        map_err(
                            &format!("importing {} version {}", run.stream, head + i as u64 + 1),
                            err,
                        )
                    })?;
                assigned.push(annals::GlobalPosition::from_seq(
                    sp.last_insert_rowid() as u64
                ));
            }
            upsert
                .execute(rusqlite::params![
                    run.stream.as_str(),
                    run.stream.category(),
                    sql_int(head + run.events.len() as u64)
                ])
                .map_err(db("moving the stream head"))?;
            positions.push(assigned);
        }
    }
    plan.finish("sqlite", positions)
}
