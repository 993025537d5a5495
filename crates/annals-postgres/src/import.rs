//! [`annals::EventImport`] on PostgreSQL: one transaction per call, through
//! the append machinery.
//!
//! 1. Every stream's advisory lock (the key `annals_append` takes) is taken
//!    in increasing key order, as `annals_append_many` does, before the
//!    transaction has an id: for each stream the previous writer got its id
//!    before this one, so the per-stream guard holds and `read_all` needs
//!    nothing new.
//! 2. The heads of the streams and the rows stored under the batch's ids are
//!    read (under the locks, so they cannot move), and the core plans
//!    ([`annals::plan_import`]).
//! 3. The runs are written by `annals_append` itself, one call per run in
//!    input order, in one statement (a `LATERAL` call per row of
//!    `generate_series`), so each run's `seq`s follow the previous run's.
//! 4. `recorded_at` is set on the rows just inserted (by `seq`), and the
//!    transaction commits.

use std::collections::HashMap;

use annals::{
    plan_import, EventImport, GlobalPosition, ImportEvent, ImportReport, Result, StreamId,
    StreamVersion,
};
use chrono::{DateTime, Utc};
use deadpool_postgres::Transaction;
use uuid::Uuid;

use crate::error::{backend_msg, Context};
use crate::rows::{decode_event, event_columns, position, to_i64};
use crate::PgEventStore;

const LOCK_SQL: &str = "SELECT count(pg_advisory_xact_lock(o.k)) FROM \
     (SELECT DISTINCT hashtextextended(s.id, 0) AS k FROM unnest($1::text[]) AS s(id) \
      ORDER BY 1) AS o";

const HEADS_SQL: &str = "SELECT stream_id, version FROM streams WHERE stream_id = ANY($1)";

const STORED_SQL: &str = concat!(
    "SELECT ",
    event_columns!(),
    " FROM events e WHERE e.event_id = ANY($1)"
);

/// One `annals_append` per run, in run order: run `i` is events
/// `$5[i] ..= $6[i]` of the flattened arrays.
const RUNS_SQL: &str = "SELECT g.i, r.r_outcome, r.r_tx, r.r_seqs \
     FROM generate_series(1, cardinality($1::text[])) AS g(i), \
     LATERAL annals_append(($1::text[])[g.i], ($2::text[])[g.i], 3::smallint, \
        ($3::bigint[])[g.i], ($4::uuid[])[($5::int[])[g.i]:($6::int[])[g.i]], \
        ($7::text[])[($5::int[])[g.i]:($6::int[])[g.i]], \
        ($8::int[])[($5::int[])[g.i]:($6::int[])[g.i]], \
        (($9::text[])[($5::int[])[g.i]:($6::int[])[g.i]])::jsonb[], \
        (($10::text[])[($5::int[])[g.i]:($6::int[])[g.i]])::jsonb[], \
        ($11::bytea[])[($5::int[])[g.i]:($6::int[])[g.i]]) AS r ORDER BY g.i";

const RECORDED_AT_SQL: &str = "UPDATE events e SET recorded_at = u.t \
     FROM unnest($1::bigint[], $2::timestamptz[]) AS u(seq, t) WHERE e.seq = u.seq";

impl EventImport for PgEventStore {
    async fn import_events(&self, events: Vec<ImportEvent>) -> Result<ImportReport> {
        if events.is_empty() {
            return Ok(ImportReport::default());
        }
        let mut client = self.ready_client("import events").await?;
        let tx = client
            .transaction()
            .await
            .context("cannot start an import")?;
        lock_streams(&tx, &events).await?;
        let report = import_locked(&tx, events).await?;
        tx.commit().await.context("cannot commit an import")?;
        if report.imported > 0 {
            metrics::counter!("annals_events_appended_total", "backend" => "postgres")
                .increment(report.imported);
        }
        Ok(report)
    }
}

/// Step 1: the advisory locks of the events' streams, taken in `tx` before
/// it writes anything (so before it has an id).
pub(crate) async fn lock_streams(tx: &Transaction<'_>, events: &[ImportEvent]) -> Result<()> {
    let mut names: Vec<&str> = events.iter().map(|e| e.stream_id.as_str()).collect();
    names.sort_unstable();
    names.dedup();
    tx.query(LOCK_SQL, &[&names])
        .await
        .context("cannot lock the imported streams")?;
    Ok(())
}

/// Steps 2 to 4 in `tx`, which holds the streams' locks
/// ([`lock_streams`]); the caller commits.
pub(crate) async fn import_locked(
    tx: &Transaction<'_>,
    events: Vec<ImportEvent>,
) -> Result<ImportReport> {
    let mut names: Vec<&str> = events.iter().map(|e| e.stream_id.as_str()).collect();
    names.sort_unstable();
    names.dedup();
    let mut heads: HashMap<StreamId, Option<StreamVersion>> = HashMap::new();
    for row in tx
        .query(HEADS_SQL, &[&names])
        .await
        .context("cannot read the imported streams' heads")?
    {
        let name: String = row.try_get(0).context("cannot decode a stream head")?;
        let version: i64 = row.try_get(1).context("cannot decode a stream head")?;
        let stream = StreamId::parse(&name)?;
        heads.insert(stream, u64::try_from(version).ok().map(StreamVersion));
    }
    let ids: Vec<Uuid> = events.iter().map(|e| e.event_id.0).collect();
    let mut stored = HashMap::new();
    for row in tx
        .query(STORED_SQL, &[&ids])
        .await
        .context("cannot look up the imported event ids")?
    {
        let e = decode_event(&row, &mut None, None)?;
        stored.insert(e.event_id, e);
    }
    let plan = plan_import(events, &heads, &stored)?;
    if plan.runs.is_empty() {
        return plan.finish("postgres", Vec::new());
    }
    let mut streams = Vec::new();
    let mut categories = Vec::new();
    let mut run_heads = Vec::new();
    let (mut from, mut to) = (Vec::new(), Vec::new());
    let (mut ids, mut types, mut versions, mut data, mut metadata, mut digests) = (
        Vec::new(),
        Vec::new(),
        Vec::new(),
        Vec::new(),
        Vec::new(),
        Vec::new(),
    );
    let mut times: Vec<DateTime<Utc>> = Vec::new();
    for run in &plan.runs {
        streams.push(run.stream.as_str());
        categories.push(run.stream.category());
        run_heads.push(to_i64(run.head.map_or(0, StreamVersion::get)));
        from.push(ids.len() as i32 + 1);
        for e in &run.events {
            ids.push(e.event_id.0);
            types.push(e.event_type.as_str());
            versions.push(i32::try_from(e.event_version).map_err(|_| {
                annals::Error::InvalidEvent {
                    stream: run.stream.clone(),
                    reason: format!(
                        "event type {:?} has event_version {}; this store keeps at most {}",
                        e.event_type,
                        e.event_version,
                        i32::MAX
                    ),
                }
            })?);
            data.push(e.data.as_str());
            metadata.push(e.metadata.as_str());
            digests.push(&e.fingerprint.as_bytes()[..]);
        }
        times.extend(&run.recorded_at);
        to.push(ids.len() as i32);
    }
    let rows = tx
        .query(
            RUNS_SQL,
            &[
                &streams,
                &categories,
                &run_heads,
                &ids,
                &from,
                &to,
                &types,
                &versions,
                &data,
                &metadata,
                &digests,
            ],
        )
        .await
        .context("cannot import events")?;
    if rows.len() != plan.runs.len() {
        return Err(backend_msg(format!(
            "import: annals_append answered {} of {} runs",
            rows.len(),
            plan.runs.len()
        )));
    }
    let mut positions: Vec<Vec<GlobalPosition>> = Vec::with_capacity(rows.len());
    let mut all_seqs: Vec<i64> = Vec::with_capacity(ids.len());
    for (row, run) in rows.iter().zip(&plan.runs) {
        let what = "cannot decode an import's append";
        let outcome: i16 = row.try_get(1).context(what)?;
        if outcome != 0 {
            // Cannot happen under the locks held: abort (the transaction
            // rolls back when dropped).
            return Err(backend_msg(format!(
                "import: {} changed under its lock (annals_append outcome {outcome})",
                run.stream
            )));
        }
        let tx_id: i64 = row.try_get(2).context(what)?;
        let seqs: Vec<i64> = row.try_get(3).context(what)?;
        // The runs must have been written in input order (the lateral
        // calls run in `generate_series` order); check rather than trust.
        if seqs
            .first()
            .zip(all_seqs.last())
            .is_some_and(|(f, l)| f <= l)
        {
            return Err(backend_msg(format!(
                "import: the events of {} were not written after the previous run",
                run.stream
            )));
        }
        positions.push(
            seqs.iter()
                .map(|&s| position(tx_id, s))
                .collect::<Result<_>>()?,
        );
        all_seqs.extend(seqs);
    }
    tx.execute(RECORDED_AT_SQL, &[&all_seqs, &times])
        .await
        .context("cannot set the imported events' recorded_at")?;
    plan.finish("postgres", positions)
}
