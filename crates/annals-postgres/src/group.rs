//! Group commit on PostgreSQL (`PgOptions::group_commit`), off by default.
//!
//! An append is queued; up to `connections` leader tasks each take every
//! append waiting (at most [`MAX_GROUP`]) and run them as one statement,
//! [`GROUP_SQL`], in one implicit transaction: one round trip and one
//! commit for the whole group. A group of one runs the ordinary
//! `annals_append` statement. The decision to keep it off by default, and
//! the measurements behind it, are in `docs/adr/003-postgres-group-commit.md`.
//!
//! The guarantees are those of a single append:
//! - Per-stream order: the statement first takes the advisory lock of every
//!   member's stream, in increasing key order (so two groups, or a group and
//!   an `append_many`, never deadlock), before the transaction has an id;
//!   then each member runs `annals_append` (whose own lock is then already
//!   held). So, as for `annals_append_many`, the previous writer of each
//!   stream got its transaction id first, and positions follow versions.
//! - Global order: the members share one transaction id; the feed's horizon
//!   needs nothing new (the transaction is open for one statement).
//! - A member whose expected version does not hold writes nothing
//!   (`annals_append` returns before writing) and only its caller gets the
//!   conflict; the others commit.
//! - Anything the statement cannot answer per member (an error, which
//!   aborts the whole statement: a reused event id, a payload PostgreSQL
//!   refuses, a lost connection; or a stream last written by a younger
//!   transaction) is answered by running that member's append again on its
//!   own, in its caller's task, on the ordinary path. That path gives the
//!   exact answer an append without grouping gets, and a member whose group
//!   did commit before its reply was lost finds its event ids stored and is
//!   answered with its original assignment.
//!
//! Every caller is answered only after the group's commit, so each append is
//! durable when its call returns.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use annals::{AppendResult, ExpectedVersion, PreparedEvent, Result, StreamId};
use tokio::sync::{oneshot, OwnedSemaphorePermit, Semaphore};
use tokio_postgres::types::ToSql;
use uuid::Uuid;

use crate::error::{backend_msg, Context};
use crate::event_store::{appended_from, event_versions, expected_params, APPENDED, WRONG_VERSION};
use crate::PgEventStore;

/// The most appends one group takes.
pub(crate) const MAX_GROUP: usize = 64;

/// The group's statement. `locked` takes every member stream's lock in key
/// order (the key `annals_append` uses); the lateral reference to it makes
/// every `annals_append` call wait for that row, that is for all the locks.
/// Member `i` has the events `lo[i]..=hi[i]` of the flattened arrays; the
/// slices are cast to `jsonb` after slicing, so each payload is parsed once.
const GROUP_SQL: &str = "SELECT m.ord, r.r_outcome, r.r_version, r.r_tx, r.r_seqs \
     FROM (SELECT count(pg_advisory_xact_lock(q.k)) AS n \
             FROM (SELECT DISTINCT hashtextextended(s.id, 0) AS k \
                     FROM unnest($1::text[]) AS s(id) ORDER BY 1) AS q) AS locked \
     CROSS JOIN LATERAL unnest($1::text[], $2::text[], $3::smallint[], $4::bigint[], \
                               $5::int[], $6::int[]) \
          WITH ORDINALITY AS m(stream_id, category, kind, expected, lo, hi, ord) \
     CROSS JOIN LATERAL annals_append(m.stream_id, m.category, m.kind, \
          m.expected + 0 * locked.n, \
          ($7::uuid[])[m.lo:m.hi], ($8::text[])[m.lo:m.hi], ($9::int[])[m.lo:m.hi], \
          (($10::text[])[m.lo:m.hi])::jsonb[], (($11::text[])[m.lo:m.hi])::jsonb[], \
          ($12::bytea[])[m.lo:m.hi]) AS r \
     ORDER BY m.ord";

/// What the group tells one member's caller.
enum Answer {
    /// The member's events are stored (committed with the group).
    Appended(AppendResult),
    /// The member's expected version did not hold; the stream's head.
    WrongVersion(Option<i64>),
    /// The caller runs its append on its own (see the module docs).
    Alone,
    /// A group of one: the ordinary path's own answer.
    Done(Result<AppendResult>),
}

/// One queued append.
struct Member {
    stream: StreamId,
    expected: ExpectedVersion,
    events: Arc<Vec<PreparedEvent>>,
    reply: oneshot::Sender<Answer>,
}

/// The queue and its leaders (one per store, shared by its clones).
pub(crate) struct GroupCommit {
    waiting: Mutex<VecDeque<Member>>,
    leaders: Arc<Semaphore>,
}

impl GroupCommit {
    /// Group commit over at most `connections` groups at once.
    pub(crate) fn new(connections: usize) -> Self {
        GroupCommit {
            waiting: Mutex::new(VecDeque::new()),
            leaders: Arc::new(Semaphore::new(connections)),
        }
    }

    fn queue(&self) -> MutexGuard<'_, VecDeque<Member>> {
        // A plain queue: a panic while it was held leaves it valid.
        self.waiting.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Appends waiting for a group.
    pub(crate) fn waiting(&self) -> usize {
        self.queue().len()
    }

    /// Queues one append, makes sure a leader will take it, and waits for
    /// its answer.
    pub(crate) async fn append(
        &self,
        store: &PgEventStore,
        stream: &StreamId,
        expected: ExpectedVersion,
        events: Arc<Vec<PreparedEvent>>,
    ) -> Result<AppendResult> {
        // An event this store cannot hold is refused here, so that it never
        // fails a group.
        event_versions(stream, &events)?;
        let (reply, answer) = oneshot::channel();
        self.queue().push_back(Member {
            stream: stream.clone(),
            expected,
            events: events.clone(),
            reply,
        });
        // Queued before the permit is tried: a leader that gives its permit
        // back checks the queue afterwards, so one of the two sees the other.
        if let Ok(permit) = self.leaders.clone().try_acquire_owned() {
            tokio::spawn(lead(store.clone(), permit));
        }
        // A leader that went away without answering (its runtime shut down)
        // leaves the append to its caller, like a failed group.
        match answer.await.unwrap_or(Answer::Alone) {
            Answer::Appended(done) => Ok(done),
            Answer::Done(result) => result,
            Answer::WrongVersion(head) => {
                store.wrong_version(stream, expected, &events, head).await
            }
            Answer::Alone => store.append_prepared(stream, expected, &events).await,
        }
    }
}

/// A leader: runs groups while appends are waiting, then gives its permit
/// back.
async fn lead(store: PgEventStore, mut permit: OwnedSemaphorePermit) {
    let Some(group) = store.inner.group.as_ref() else {
        return;
    };
    loop {
        let members: Vec<Member> = {
            let mut queue = group.queue();
            let n = queue.len().min(MAX_GROUP);
            queue.drain(..n).collect()
        };
        if members.is_empty() {
            drop(permit);
            // An append queued after the drain but before the permit came
            // back found no permit: take it over.
            if group.waiting() == 0 {
                return;
            }
            match group.leaders.clone().try_acquire_owned() {
                Ok(p) => permit = p,
                Err(_) => return,
            }
            continue;
        }
        run_group(&store, members).await;
    }
}

/// Runs one group and answers each member.
async fn run_group(store: &PgEventStore, mut members: Vec<Member>) {
    metrics::counter!("annals_pg_group_commits_total").increment(1);
    metrics::histogram!("annals_pg_group_commit_size").record(members.len() as f64);
    if members.len() == 1 {
        if let Some(m) = members.pop() {
            let result = store
                .append_prepared(&m.stream, m.expected, &m.events)
                .await;
            let _ = m.reply.send(Answer::Done(result));
        }
        return;
    }
    match group_statement(store, &members).await {
        Ok(answers) => {
            for (m, a) in members.into_iter().zip(answers) {
                let _ = m.reply.send(a);
            }
        }
        Err(e) => {
            tracing::debug!(error = %e, members = members.len(),
                "group commit failed; its appends run on their own");
            metrics::counter!("annals_pg_group_commit_failures_total").increment(1);
            for m in members {
                let _ = m.reply.send(Answer::Alone);
            }
        }
    }
}

/// The group's statement on a pooled connection: one answer per member, in
/// order.
async fn group_statement(store: &PgEventStore, members: &[Member]) -> Result<Vec<Answer>> {
    let mut streams = Vec::with_capacity(members.len());
    let mut categories = Vec::with_capacity(members.len());
    let mut kinds = Vec::with_capacity(members.len());
    let mut expected = Vec::with_capacity(members.len());
    let mut lo = Vec::with_capacity(members.len());
    let mut hi = Vec::with_capacity(members.len());
    let (mut ids, mut types, mut versions) = (Vec::new(), Vec::new(), Vec::new());
    let (mut data, mut metadata, mut digests) = (Vec::new(), Vec::new(), Vec::new());
    for m in members {
        streams.push(m.stream.as_str());
        categories.push(m.stream.category());
        let (kind, version) = expected_params(m.expected);
        kinds.push(kind);
        expected.push(version);
        // PostgreSQL arrays are 1-based; an empty batch never reaches a
        // store (the core refuses it).
        lo.push(array_index(ids.len() + 1)?);
        versions.extend(event_versions(&m.stream, &m.events)?);
        for e in m.events.iter() {
            ids.push(e.event_id.0);
            types.push(e.event_type.as_str());
            data.push(e.data.as_str());
            metadata.push(e.metadata.as_str());
            digests.push(&e.fingerprint.as_bytes()[..]);
        }
        hi.push(array_index(ids.len())?);
    }
    let ids: Vec<Uuid> = ids;
    let params: [&(dyn ToSql + Sync); 12] = [
        &streams,
        &categories,
        &kinds,
        &expected,
        &lo,
        &hi,
        &ids,
        &types,
        &versions,
        &data,
        &metadata,
        &digests,
    ];
    let client = store.ready_client("group commit").await?;
    let stmt = client
        .prepare_cached(GROUP_SQL)
        .await
        .context("cannot prepare the group commit")?;
    let rows = client.query(&stmt, &params).await.context("group commit")?;
    if rows.len() != members.len() {
        return Err(backend_msg(format!(
            "the group commit answered {} of {} appends",
            rows.len(),
            members.len()
        )));
    }
    let what = "cannot decode the group commit";
    let mut answers = Vec::with_capacity(rows.len());
    for (row, m) in rows.iter().zip(members) {
        let outcome: i16 = row.try_get(1).context(what)?;
        answers.push(match outcome {
            APPENDED => Answer::Appended(appended_from(row, 2, m.events.len())?),
            WRONG_VERSION => Answer::WrongVersion(row.try_get(2).context(what)?),
            // A younger writer (or anything new): the ordinary path retries.
            _ => Answer::Alone,
        });
    }
    Ok(answers)
}

/// An index into the flattened event arrays, as PostgreSQL's `int`.
fn array_index(i: usize) -> Result<i32> {
    i32::try_from(i)
        .map_err(|_| backend_msg("a group commit holds more events than a PostgreSQL array"))
}
