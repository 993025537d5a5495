//! An in-memory store: every trait on one `Vec`, for tests and examples.
//!
//! One mutex guards all state; appends take it once, so the global order is
//! the commit order by construction. Reads copy one batch at a time out of the
//! lock, like the database backends do.

use std::collections::{BTreeMap, HashMap};
use std::ops::Bound;
use std::sync::{Arc, Mutex, MutexGuard};

use chrono::{DateTime, Utc};
use futures::stream::{self, BoxStream, StreamExt};
use uuid::Uuid;

use crate::event_store::{
    CategoryStats, Direction, EventStream, EventTypeStats, ReadAll, ReadStream, StoreStats,
    StreamInfo, DEFAULT_BATCH_SIZE,
};
use crate::idempotency::{check_retry, prepare_batch, Fingerprint, PreparedEvent, StoredEvent};
use crate::multi_stream::{check_retry_many, prepare_many, MultiStreamAppend, StreamBatch};
use crate::snapshot::{
    no_such_snapshot, validate_history_size, PromoteReport, RollbackReport, Snapshot,
    SnapshotCoverage, SnapshotHistoryEntry, SnapshotStore, SnapshotWrite, StaleSnapshot,
    DEFAULT_SNAPSHOT_HISTORY,
};
use crate::telemetry::StoreMetrics;
use crate::{
    AppendResult, CheckpointStore, Error, EventId, EventStore, ExpectedVersion, GlobalPosition,
    Metadata, NewEvent, Payload, RecordedEvent, Result, StreamId, StreamVersion, Upcasters,
};

static LABELS: [metrics::Label; 1] = [metrics::Label::from_static_parts("backend", "memory")];
/// The append and read metrics of this backend.
static METRICS: StoreMetrics = StoreMetrics::new(&LABELS);

#[derive(Default)]
struct State {
    /// All events in global order; `events[i]` has position `i + 1`.
    events: Vec<RecordedEvent>,
    /// Stream -> indexes into `events`, in version order.
    streams: BTreeMap<StreamId, Vec<usize>>,
    /// Event id -> index into `events`.
    ids: HashMap<crate::EventId, usize>,
    /// The payload fingerprint of `events[i]`.
    fingerprints: Vec<Fingerprint>,
    /// Each aggregate's snapshot history (see [`crate::snapshot`]).
    snapshots: BTreeMap<(String, String), Vec<SnapRow>>,
    snapshot_history: HistorySize,
    staged: BTreeMap<(String, String), Snapshot>,
    checkpoints: HashMap<String, GlobalPosition>,
    /// Projection locks by checkpoint name.
    locks: HashMap<String, crate::ProjectionLock>,
    /// Parked events by checkpoint name and position.
    dead_letters: BTreeMap<(String, GlobalPosition), crate::DeadLetter>,
}

/// One row of an aggregate's snapshot history.
#[derive(Clone)]
struct SnapRow {
    snap: Snapshot,
    rolled_back_at: Option<DateTime<Utc>>,
}

/// Snapshots kept per aggregate.
#[derive(Clone, Copy)]
struct HistorySize(u32);

impl Default for HistorySize {
    fn default() -> Self {
        HistorySize(DEFAULT_SNAPSHOT_HISTORY)
    }
}

/// The in-memory store. Clones share the same data.
#[derive(Clone)]
pub struct InMemoryStore {
    state: Arc<Mutex<State>>,
    /// Applied to every event a read returns (see [`crate::Upcasters`]).
    upcasters: Option<Arc<Upcasters>>,
    /// Raised after every append that stored events ([`EventStore::append_signal`]).
    appended: Arc<tokio::sync::watch::Sender<u64>>,
    /// Subject keys and the erasure log ([`crate::KeyStore`]).
    keys: crate::gdpr::MemoryKeyStore,
}

impl Default for InMemoryStore {
    fn default() -> Self {
        InMemoryStore {
            state: Arc::default(),
            appended: Arc::new(tokio::sync::watch::Sender::new(0)),
            upcasters: None,
            keys: crate::gdpr::MemoryKeyStore::new(),
        }
    }
}

impl InMemoryStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    /// This store (the same data) with every read upcast by `upcasters`.
    pub fn with_upcasters(mut self, upcasters: Arc<Upcasters>) -> Self {
        self.upcasters = Some(upcasters);
        self
    }

    /// This store (the same data) reading events as stored, without
    /// upcasters.
    pub fn raw(&self) -> Self {
        InMemoryStore {
            state: Arc::clone(&self.state),
            appended: Arc::clone(&self.appended),
            upcasters: None,
            keys: self.keys.clone(),
        }
    }

    /// The subject keys and erasure log of this store (shared by clones).
    pub fn key_store(&self) -> &crate::gdpr::MemoryKeyStore {
        &self.keys
    }

    /// The upcasters this handle applies, if any.
    pub fn upcasters(&self) -> Option<&Arc<Upcasters>> {
        self.upcasters.as_ref()
    }

    /// A stored event as a read returns it: the one place where this
    /// backend's reads apply the upcasters.
    fn deliver(&self, event: &RecordedEvent) -> Result<RecordedEvent> {
        match &self.upcasters {
            Some(u) => u.apply_ref(event),
            None => Ok(event.clone()),
        }
    }

    /// Tells the followers that events were stored (after the lock is
    /// released, so a woken follower finds them).
    fn raise_signal(&self) {
        self.appended.send_modify(|n| *n = n.wrapping_add(1));
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock cannot leave a half-applied append
        // (appends validate before mutating), so a poisoned lock is usable.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// What a reader gets of a prepared batch, decoded before anything changes:
/// all or nothing.
fn decode_batch(batch: &[PreparedEvent]) -> Result<Vec<(Payload, Metadata)>> {
    batch
        .iter()
        .map(|e| {
            let data = Payload::from_json(e.data.clone()).map_err(|source| Error::Encode {
                what: format!("payload of {}", e.event_type),
                source,
            })?;
            Ok((data, e.parsed_metadata()?))
        })
        .collect()
}

impl State {
    /// What the store holds under each of the batch's event ids.
    fn stored_of(&self, batch: &[PreparedEvent]) -> Vec<Option<StoredEvent>> {
        batch
            .iter()
            .map(|e| {
                self.ids.get(&e.event_id).map(|&i| {
                    let r = &self.events[i];
                    StoredEvent {
                        stream_id: r.stream_id.clone(),
                        stream_version: r.stream_version,
                        global_position: r.global_position,
                        event_type: r.event_type.clone(),
                        event_version: r.event_version,
                        fingerprint: Some(self.fingerprints[i]),
                        data: None,
                    }
                })
            })
            .collect()
    }

    fn head(&self, stream: &StreamId) -> Option<StreamVersion> {
        self.streams
            .get(stream)
            .map(|v| StreamVersion(v.len() as u64))
    }

    /// Stores a checked batch after the stream's head.
    fn push_batch(
        &mut self,
        stream: &StreamId,
        batch: Vec<PreparedEvent>,
        decoded: Vec<(Payload, Metadata)>,
        now: DateTime<Utc>,
    ) -> AppendResult {
        let head = self.head(stream).map_or(0, |v| v.0);
        let mut positions = Vec::with_capacity(batch.len());
        for (i, (e, (data, metadata))) in batch.into_iter().zip(decoded).enumerate() {
            let idx = self.events.len();
            let position = GlobalPosition::from_seq(idx as u64 + 1);
            positions.push(position);
            self.ids.insert(e.event_id, idx);
            self.streams.entry(stream.clone()).or_default().push(idx);
            self.fingerprints.push(e.fingerprint);
            self.events.push(RecordedEvent {
                event_id: e.event_id,
                stream_id: stream.clone(),
                stream_version: StreamVersion(head + i as u64 + 1),
                global_position: position,
                event_type: e.event_type,
                event_version: e.event_version,
                data,
                metadata,
                recorded_at: now,
                stored_event_version: None,
                stored_event_type: None,
            });
        }
        AppendResult {
            first_version: StreamVersion(head + 1),
            last_version: StreamVersion(head + positions.len() as u64),
            positions,
            deduplicated: false,
        }
    }
}

impl EventStore for InMemoryStore {
    async fn append(
        &self,
        stream: &StreamId,
        expected: ExpectedVersion,
        events: Vec<NewEvent>,
    ) -> Result<AppendResult> {
        METRICS
            .append(async { self.append_unrecorded(stream, expected, events) })
            .await
    }

    fn append_signal(&self) -> Option<crate::AppendSignal> {
        Some(self.appended.subscribe())
    }

    fn read_stream(&self, stream: &StreamId, options: ReadStream) -> EventStream {
        let store = self.clone();
        let stream = stream.clone();
        // Cursor: the next version to look at; None once done.
        let start = match options.direction {
            Direction::Forward => options.from.map_or(1, |v| v.0.max(1)),
            Direction::Backward => options.from.map_or(u64::MAX, |v| v.0),
        };
        let limit = options.limit.unwrap_or(u64::MAX);
        let events = stream::unfold((Some(start), 0u64), move |(cursor, taken)| {
            let store = store.clone();
            let stream = stream.clone();
            let options = options.clone();
            async move {
                let cursor = cursor?;
                if taken >= limit {
                    return None;
                }
                let st = store.lock();
                let idxs = st.streams.get(&stream)?;
                let head = idxs.len() as u64;
                let want = (limit - taken).min(DEFAULT_BATCH_SIZE as u64);
                let mut batch = Vec::new();
                let next = match options.direction {
                    Direction::Forward => {
                        let mut v = cursor;
                        while v <= head && (batch.len() as u64) < want {
                            let e = &st.events[idxs[(v - 1) as usize]];
                            v += 1;
                            if options.admits(e) {
                                batch.push(store.deliver(e));
                            }
                        }
                        (v <= head).then_some(v)
                    }
                    Direction::Backward => {
                        let mut v = cursor.min(head);
                        while v >= 1 && (batch.len() as u64) < want {
                            let e = &st.events[idxs[(v - 1) as usize]];
                            v -= 1;
                            if options.admits(e) {
                                batch.push(store.deliver(e));
                            }
                        }
                        (v >= 1).then_some(v)
                    }
                };
                if batch.is_empty() {
                    return None;
                }
                let n = batch.len() as u64;
                Some((stream::iter(batch), (next, taken + n)))
            }
        })
        .flatten();
        METRICS.count_reads(events)
    }

    fn read_all(&self, options: ReadAll) -> EventStream {
        // Positions are seq = index + 1 on this backend.
        let start = options.after.seq() as usize;
        let limit = options.limit;
        METRICS.count_reads(self.scan(start, limit, move |e| options.admits(e)))
    }

    async fn stream_version(&self, stream: &StreamId) -> Result<Option<StreamVersion>> {
        Ok(self
            .lock()
            .streams
            .get(stream)
            .map(|v| StreamVersion(v.len() as u64)))
    }

    async fn head_position(&self) -> Result<Option<GlobalPosition>> {
        Ok(self.lock().events.last().map(|e| e.global_position))
    }

    async fn read_event(&self, id: EventId) -> Result<Option<RecordedEvent>> {
        let st = self.lock();
        st.ids
            .get(&id)
            .map(|&i| self.deliver(&st.events[i]))
            .transpose()
    }
}

impl crate::checkpoint::CheckpointListing for InMemoryStore {
    async fn list_checkpoints(&self) -> Result<Vec<crate::checkpoint::Checkpoint>> {
        let mut all: Vec<_> = self
            .lock()
            .checkpoints
            .iter()
            .map(|(name, &position)| crate::checkpoint::Checkpoint {
                name: name.clone(),
                position,
            })
            .collect();
        all.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(all)
    }
}

/// One lock over the whole import: heads, lookups, plan and writes see one
/// state, and the events get positions in input order.
impl crate::import::EventImport for InMemoryStore {
    async fn import_events(
        &self,
        events: Vec<crate::import::ImportEvent>,
    ) -> Result<crate::import::ImportReport> {
        let mut st = self.lock();
        let heads = events
            .iter()
            .map(|e| (e.stream_id.clone(), st.head(&e.stream_id)))
            .collect();
        let stored = events
            .iter()
            .filter_map(|e| {
                let &i = st.ids.get(&e.event_id)?;
                Some((e.event_id, st.events[i].clone()))
            })
            .collect();
        let plan = crate::import::plan_import(events, &heads, &stored)?;
        // Decode every run before anything changes: all or nothing.
        let decoded = plan
            .runs
            .iter()
            .map(|r| decode_batch(&r.events))
            .collect::<Result<Vec<_>>>()?;
        let mut positions = Vec::with_capacity(plan.runs.len());
        for (run, decoded) in plan.runs.iter().zip(decoded) {
            let mut assigned = Vec::with_capacity(run.events.len());
            for ((e, d), t) in run.events.iter().zip(decoded).zip(&run.recorded_at) {
                let done = st.push_batch(&run.stream, vec![e.clone()], vec![d], *t);
                assigned.extend(done.positions);
            }
            positions.push(assigned);
        }
        plan.finish("memory", positions)
    }
}

/// One lock over the whole store: the streams need no lock order here.
impl MultiStreamAppend for InMemoryStore {
    async fn append_many(&self, batches: Vec<StreamBatch>) -> Result<Vec<AppendResult>> {
        METRICS
            .append(async { self.append_many_unrecorded(batches) })
            .await
    }
}

impl InMemoryStore {
    /// [`EventStore::append`], before [`METRICS`] records it.
    fn append_unrecorded(
        &self,
        stream: &StreamId,
        expected: ExpectedVersion,
        events: Vec<NewEvent>,
    ) -> Result<AppendResult> {
        let batch = prepare_batch(stream, events)?;
        let decoded = decode_batch(&batch)?;
        let mut st = self.lock();
        // Idempotency first: a retried batch succeeds whatever `expected` says.
        if let Some(original) = check_retry(stream, &batch, &st.stored_of(&batch))? {
            return Ok(original);
        }
        let actual = st.head(stream);
        if !expected.matches(actual) {
            return Err(Error::WrongExpectedVersion {
                stream: stream.clone(),
                expected,
                actual,
            });
        }
        let appended = st.push_batch(stream, batch, decoded, Utc::now());
        drop(st);
        self.raise_signal();
        Ok(appended)
    }

    /// [`MultiStreamAppend::append_many`], before [`METRICS`] records it.
    fn append_many_unrecorded(&self, batches: Vec<StreamBatch>) -> Result<Vec<AppendResult>> {
        let batches = prepare_many(batches)?;
        let decoded = batches
            .iter()
            .map(|b| decode_batch(&b.events))
            .collect::<Result<Vec<_>>>()?;
        let mut st = self.lock();
        let retries = batches
            .iter()
            .map(|b| check_retry(&b.stream, &b.events, &st.stored_of(&b.events)))
            .collect::<Result<Vec<_>>>()?;
        if let Some(originals) = check_retry_many(&batches, retries)? {
            return Ok(originals);
        }
        for b in &batches {
            let actual = st.head(&b.stream);
            if !b.expected.matches(actual) {
                return Err(Error::WrongExpectedVersion {
                    stream: b.stream.clone(),
                    expected: b.expected,
                    actual,
                });
            }
        }
        let now = Utc::now();
        let results = batches
            .into_iter()
            .zip(decoded)
            .map(|(b, d)| st.push_batch(&b.stream, b.events, d, now))
            .collect();
        drop(st);
        self.raise_signal();
        Ok(results)
    }
}

fn key(t: &str, id: &str) -> (String, String) {
    (t.to_owned(), id.to_owned())
}

/// The order of a history: `(schema_version, version)`.
fn rank(s: &Snapshot) -> (u32, StreamVersion) {
    (s.schema_version, s.version)
}

/// The live row: the highest one not rolled back.
fn live_row(rows: &[SnapRow]) -> Option<&SnapRow> {
    rows.iter()
        .filter(|r| r.rolled_back_at.is_none())
        .max_by_key(|r| rank(&r.snap))
}

/// Keeps `keep` rows: the rows not rolled back first (the live one leads),
/// then the rolled-back ones, each newest first.
fn trim(rows: &mut Vec<SnapRow>, keep: u32) -> u64 {
    rows.sort_by(|a, b| {
        a.rolled_back_at
            .is_some()
            .cmp(&b.rolled_back_at.is_some())
            .then(rank(&b.snap).cmp(&rank(&a.snap)))
    });
    let before = rows.len();
    rows.truncate(keep as usize);
    (before - rows.len()) as u64
}

/// Whether a guarded write of `snap` goes in over `rows` (see
/// [`SnapshotStore::save_snapshot`]).
fn admits(rows: &[SnapRow], snap: &Snapshot) -> bool {
    live_row(rows).is_none_or(|live| snap.supersedes(&live.snap))
        && rows
            .iter()
            .all(|r| r.rolled_back_at.is_none() || r.snap.version < snap.version)
}

fn entry(row: &SnapRow, live: bool) -> SnapshotHistoryEntry {
    SnapshotHistoryEntry {
        version: row.snap.version,
        schema_version: row.snap.schema_version,
        created_at: row.snap.created_at,
        live,
        rolled_back_at: row.rolled_back_at,
    }
}

impl State {
    /// The head of the stream of aggregate `(t, id)`, when it exists.
    fn head_of(&self, t: &str, id: &str) -> Option<StreamVersion> {
        let stream = StreamId::new(t, id).ok()?;
        self.streams
            .get(&stream)
            .map(|v| StreamVersion(v.len() as u64))
    }

    fn live(&self, t: &str, id: &str) -> Option<&Snapshot> {
        self.snapshots
            .get(&key(t, id))
            .and_then(|rows| live_row(rows))
            .map(|r| &r.snap)
    }

    /// Stores `snap` as the live row of its aggregate (replacing a row at
    /// the same version) and trims the history.
    fn put_live(&mut self, snap: Snapshot) {
        let keep = self.snapshot_history.0;
        let rows = self
            .snapshots
            .entry(key(&snap.aggregate_type, &snap.aggregate_id))
            .or_default();
        rows.retain(|r| r.snap.version != snap.version);
        rows.push(SnapRow {
            snap,
            rolled_back_at: None,
        });
        trim(rows, keep);
    }

    fn stale(&self, stream: &StreamId, len: usize) -> StaleSnapshot {
        StaleSnapshot::new(
            stream.category().to_owned(),
            stream.id().to_owned(),
            StreamVersion(len as u64),
            self.live(stream.category(), stream.id()).map(|s| s.version),
        )
    }
}

impl SnapshotStore for InMemoryStore {
    async fn load_snapshot(
        &self,
        aggregate_type: &str,
        aggregate_id: &str,
    ) -> Result<Option<Snapshot>> {
        Ok(self.lock().live(aggregate_type, aggregate_id).cloned())
    }

    async fn save_snapshot(&self, snapshot: &Snapshot) -> Result<SnapshotWrite> {
        let mut st = self.lock();
        let k = key(&snapshot.aggregate_type, &snapshot.aggregate_id);
        let head = st.head_of(&snapshot.aggregate_type, &snapshot.aggregate_id);
        if let (Some(head), Some(rows)) = (head, st.snapshots.get_mut(&k)) {
            // Rows beyond the head are invalid (restored events).
            rows.retain(|r| r.snap.version <= head);
        }
        if !st
            .snapshots
            .get(&k)
            .is_none_or(|rows| admits(rows, snapshot))
        {
            return Ok(SnapshotWrite::Superseded);
        }
        st.put_live(snapshot.clone());
        Ok(SnapshotWrite::Written)
    }

    async fn delete_snapshot(&self, aggregate_type: &str, aggregate_id: &str) -> Result<u64> {
        Ok(self
            .lock()
            .snapshots
            .remove(&key(aggregate_type, aggregate_id))
            .map_or(0, |rows| rows.len() as u64))
    }
}

impl crate::SnapshotAdmin for InMemoryStore {
    async fn invalidate_snapshots(&self, aggregate_type: &str, below: Option<u32>) -> Result<u64> {
        let mut st = self.lock();
        let mut removed = 0;
        for ((t, _), rows) in st.snapshots.iter_mut() {
            if t != aggregate_type {
                continue;
            }
            let before = rows.len();
            rows.retain(|r| below.is_some_and(|b| r.snap.schema_version >= b));
            removed += (before - rows.len()) as u64;
        }
        st.snapshots.retain(|_, rows| !rows.is_empty());
        Ok(removed)
    }

    async fn snapshot_coverage(
        &self,
        aggregate_type: Option<&str>,
    ) -> Result<Vec<SnapshotCoverage>> {
        let st = self.lock();
        let mut out: BTreeMap<String, SnapshotCoverage> = BTreeMap::new();
        for s in st.streams.keys() {
            if aggregate_type.is_some_and(|t| t != s.category()) {
                continue;
            }
            let c = out
                .entry(s.category().to_owned())
                .or_insert_with(|| SnapshotCoverage {
                    aggregate_type: s.category().to_owned(),
                    ..Default::default()
                });
            c.aggregates += 1;
            match st.live(s.category(), s.id()) {
                Some(snap) => {
                    c.with_snapshot += 1;
                    *c.by_schema_version.entry(snap.schema_version).or_default() += 1;
                }
                None => c.without_snapshot += 1,
            }
        }
        Ok(out.into_values().collect())
    }

    async fn stale_snapshots(
        &self,
        aggregate_type: Option<&str>,
        min_events: u64,
    ) -> Result<Vec<StaleSnapshot>> {
        let st = self.lock();
        let mut out: Vec<StaleSnapshot> = st
            .streams
            .iter()
            .filter(|(s, _)| aggregate_type.is_none_or(|t| t == s.category()))
            .map(|(s, idxs)| st.stale(s, idxs.len()))
            .filter(|s| s.events_behind > min_events)
            .collect();
        out.sort_by(|a, b| {
            b.events_behind
                .cmp(&a.events_behind)
                .then(a.aggregate_id.cmp(&b.aggregate_id))
        });
        Ok(out)
    }
    async fn snapshot_history_size(&self) -> Result<u32> {
        Ok(self.lock().snapshot_history.0)
    }

    async fn set_snapshot_history_size(&self, keep: u32) -> Result<u64> {
        validate_history_size(keep)?;
        let mut st = self.lock();
        st.snapshot_history = HistorySize(keep);
        Ok(st.snapshots.values_mut().map(|rows| trim(rows, keep)).sum())
    }

    async fn snapshot_history(
        &self,
        aggregate_type: &str,
        aggregate_id: &str,
    ) -> Result<Vec<SnapshotHistoryEntry>> {
        let st = self.lock();
        let Some(rows) = st.snapshots.get(&key(aggregate_type, aggregate_id)) else {
            return Ok(Vec::new());
        };
        let live = live_row(rows).map(|r| r.snap.version);
        let mut out: Vec<SnapshotHistoryEntry> = rows
            .iter()
            .map(|r| {
                entry(
                    r,
                    r.rolled_back_at.is_none() && Some(r.snap.version) == live,
                )
            })
            .collect();
        out.sort_by_key(|e| std::cmp::Reverse((e.schema_version, e.version)));
        Ok(out)
    }

    async fn rollback_snapshot(
        &self,
        aggregate_type: &str,
        aggregate_id: &str,
        to_version: StreamVersion,
    ) -> Result<RollbackReport> {
        let mut st = self.lock();
        let rows = st
            .snapshots
            .get_mut(&key(aggregate_type, aggregate_id))
            .map(|rows| rows.as_mut_slice())
            .unwrap_or_default();
        let Some(target) = rows.iter().find(|r| r.snap.version == to_version) else {
            let mut kept: Vec<StreamVersion> = rows.iter().map(|r| r.snap.version).collect();
            kept.sort_by(|a, b| b.cmp(a));
            return Err(no_such_snapshot(
                aggregate_type,
                aggregate_id,
                to_version,
                &kept,
            ));
        };
        let target_rank = rank(&target.snap);
        let now = Utc::now();
        let mut rolled_back = 0;
        for r in rows.iter_mut() {
            if rank(&r.snap) > target_rank && r.rolled_back_at.is_none() {
                r.rolled_back_at = Some(now);
                rolled_back += 1;
            } else if r.snap.version == to_version {
                r.rolled_back_at = None;
            }
        }
        let live = rows
            .iter()
            .find(|r| r.snap.version == to_version)
            .map(|r| entry(r, true))
            .ok_or_else(|| no_such_snapshot(aggregate_type, aggregate_id, to_version, &[]))?;
        Ok(RollbackReport {
            aggregate_type: aggregate_type.to_owned(),
            aggregate_id: aggregate_id.to_owned(),
            live,
            rolled_back,
        })
    }

    fn list_stale_snapshots(
        &self,
        aggregate_type: Option<&str>,
        min_events: u64,
    ) -> BoxStream<'static, Result<StaleSnapshot>> {
        let store = self.clone();
        let t = aggregate_type.map(str::to_owned);
        pages(
            None,
            move |after: Option<StreamId>| {
                let st = store.lock();
                let lower = after.map_or(Bound::Unbounded, Bound::Excluded);
                st.streams
                    .range((lower, Bound::Unbounded))
                    .filter(|(s, _)| t.as_deref().is_none_or(|t| t == s.category()))
                    .map(|(s, idxs)| (s.clone(), st.stale(s, idxs.len())))
                    .filter(|(_, row)| row.events_behind > min_events)
                    .take(DEFAULT_BATCH_SIZE)
                    .collect()
            },
            |(s, _): &(StreamId, StaleSnapshot)| Some(s.clone()),
        )
        .map(|item| item.map(|(_, row)| row))
        .boxed()
    }

    fn live_snapshots(&self, aggregate_type: &str) -> BoxStream<'static, Result<Snapshot>> {
        let store = self.clone();
        let t = aggregate_type.to_owned();
        pages(
            String::new(),
            move |after: String| {
                let st = store.lock();
                let lower = (t.clone(), after);
                st.snapshots
                    .range((Bound::Excluded(lower), Bound::Unbounded))
                    .take_while(|((tt, _), _)| *tt == t)
                    .filter_map(|(_, rows)| live_row(rows).map(|r| r.snap.clone()))
                    .take(DEFAULT_BATCH_SIZE)
                    .collect()
            },
            |s: &Snapshot| s.aggregate_id.clone(),
        )
    }
}

impl crate::SnapshotStaging for InMemoryStore {
    async fn stage_snapshot(&self, snapshot: &Snapshot) -> Result<()> {
        self.lock().staged.insert(
            key(&snapshot.aggregate_type, &snapshot.aggregate_id),
            snapshot.clone(),
        );
        Ok(())
    }

    async fn load_staged(
        &self,
        aggregate_type: &str,
        aggregate_id: &str,
    ) -> Result<Option<Snapshot>> {
        Ok(self
            .lock()
            .staged
            .get(&key(aggregate_type, aggregate_id))
            .cloned())
    }

    fn staged_snapshots(&self, aggregate_type: &str) -> BoxStream<'static, Result<Snapshot>> {
        let store = self.clone();
        let t = aggregate_type.to_owned();
        pages(
            String::new(),
            move |after: String| {
                let st = store.lock();
                let lower = (t.clone(), after);
                st.staged
                    .range((Bound::Excluded(lower), Bound::Unbounded))
                    .take_while(|((tt, _), _)| *tt == t)
                    .take(DEFAULT_BATCH_SIZE)
                    .map(|(_, s)| s.clone())
                    .collect()
            },
            |s: &Snapshot| s.aggregate_id.clone(),
        )
    }

    async fn promote_staged(&self, aggregate_type: &str) -> Result<PromoteReport> {
        let mut st = self.lock();
        let keys: Vec<_> = st
            .staged
            .keys()
            .filter(|(t, _)| t == aggregate_type)
            .cloned()
            .collect();
        let mut report = PromoteReport::default();
        for k in keys {
            let Some(staged) = st.staged.remove(&k) else {
                continue;
            };
            if st
                .snapshots
                .get(&k)
                .is_none_or(|rows| admits(rows, &staged))
            {
                st.put_live(staged);
                report.promoted += 1;
            } else {
                report.kept_live += 1;
            }
        }
        Ok(report)
    }

    async fn clear_staged(&self, aggregate_type: &str) -> Result<u64> {
        let mut st = self.lock();
        let before = st.staged.len();
        st.staged.retain(|(t, _), _| t != aggregate_type);
        Ok((before - st.staged.len()) as u64)
    }
}

/// A lazy listing a page at a time, like the database backends' keyset
/// pagination: `fetch` returns the page after a cursor (a full page is
/// [`DEFAULT_BATCH_SIZE`] items), `cursor` the cursor after an item.
fn pages<C, T>(
    start: C,
    fetch: impl Fn(C) -> Vec<T> + Send + 'static,
    cursor: impl Fn(&T) -> C + Send + 'static,
) -> BoxStream<'static, Result<T>>
where
    C: Send + 'static,
    T: Send + 'static,
{
    stream::unfold(Some(start), move |after| {
        let page = after.map(&fetch);
        let next = match &page {
            Some(p) if p.len() == DEFAULT_BATCH_SIZE => p.last().map(&cursor),
            _ => None,
        };
        futures::future::ready(page.map(|p| (stream::iter(p.into_iter().map(Ok)), next)))
    })
    .flatten()
    .boxed()
}

impl CheckpointStore for InMemoryStore {
    async fn load_checkpoint(&self, name: &str) -> Result<Option<GlobalPosition>> {
        Ok(self.lock().checkpoints.get(name).copied())
    }

    async fn save_checkpoint(&self, name: &str, position: GlobalPosition) -> Result<()> {
        let mut st = self.lock();
        let cp = st.checkpoints.entry(name.to_owned()).or_insert(position);
        if position > *cp {
            *cp = position;
        }
        Ok(())
    }

    async fn reset_checkpoint(&self, name: &str) -> Result<()> {
        self.lock().checkpoints.remove(name);
        Ok(())
    }
}

impl crate::ProjectionControl for InMemoryStore {
    /// The in-memory store keeps no partition leases (one process runs all
    /// partitions under the projection lock).
    async fn live_partition_workers(&self, _group: &str) -> Result<u32> {
        Ok(0)
    }

    async fn acquire_projection_lock(
        &self,
        checkpoint: &str,
        owner: &str,
        token: &str,
        ttl: std::time::Duration,
    ) -> Result<crate::LockAttempt> {
        let now = Utc::now();
        let mut st = self.lock();
        if let Some(held) = st.locks.get(checkpoint) {
            if held.expires_at > now {
                return Ok(crate::LockAttempt::Held(held.clone()));
            }
        }
        let lock = crate::ProjectionLock {
            checkpoint: checkpoint.to_owned(),
            owner: owner.to_owned(),
            token: token.to_owned(),
            expires_at: now + lease(ttl),
        };
        st.locks.insert(checkpoint.to_owned(), lock.clone());
        Ok(crate::LockAttempt::Acquired(lock))
    }

    async fn renew_projection_lock(
        &self,
        lock: &crate::ProjectionLock,
        ttl: std::time::Duration,
    ) -> Result<Option<crate::ProjectionLock>> {
        let mut st = self.lock();
        match st.locks.get_mut(&lock.checkpoint) {
            Some(held) if held.token == lock.token => {
                held.expires_at = Utc::now() + lease(ttl);
                Ok(Some(held.clone()))
            }
            _ => Ok(None),
        }
    }

    async fn release_projection_lock(&self, lock: &crate::ProjectionLock) -> Result<()> {
        let mut st = self.lock();
        if st
            .locks
            .get(&lock.checkpoint)
            .is_some_and(|held| held.token == lock.token)
        {
            st.locks.remove(&lock.checkpoint);
        }
        Ok(())
    }

    async fn save_checkpoint_fenced(
        &self,
        name: &str,
        position: GlobalPosition,
        fence: &crate::Fence,
    ) -> Result<()> {
        // One mutex: the check and the save are one step.
        let mut st = self.lock();
        check_fence(&st, fence)?;
        let cp = st.checkpoints.entry(name.to_owned()).or_insert(position);
        if position > *cp {
            *cp = position;
        }
        Ok(())
    }

    async fn reset_checkpoint_fenced(&self, name: &str, fence: &crate::Fence) -> Result<()> {
        // One mutex: the check and the delete are one step.
        let mut st = self.lock();
        check_fence(&st, fence)?;
        st.checkpoints.remove(name);
        st.dead_letters
            .retain(|(checkpoint, _), _| checkpoint != name);
        Ok(())
    }

    async fn projection_lock(&self, checkpoint: &str) -> Result<Option<crate::ProjectionLock>> {
        Ok(self.lock().locks.get(checkpoint).cloned())
    }

    async fn park_event(&self, letter: &crate::DeadLetter) -> Result<()> {
        self.lock()
            .dead_letters
            .insert((letter.checkpoint.clone(), letter.position), letter.clone());
        Ok(())
    }

    async fn dead_letters(&self, checkpoint: &str) -> Result<Vec<crate::DeadLetter>> {
        Ok(self
            .lock()
            .dead_letters
            .values()
            .filter(|d| d.checkpoint == checkpoint)
            .cloned()
            .collect())
    }

    async fn drop_dead_letter(&self, checkpoint: &str, event_id: EventId) -> Result<bool> {
        let mut st = self.lock();
        let key = st
            .dead_letters
            .iter()
            .find(|(_, d)| d.checkpoint == checkpoint && d.event_id == event_id)
            .map(|(k, _)| k.clone());
        Ok(key.and_then(|k| st.dead_letters.remove(&k)).is_some())
    }
}

/// A lease of `ttl` as a `chrono` duration (capped at 100 years).
fn lease(ttl: std::time::Duration) -> chrono::Duration {
    chrono::Duration::from_std(ttl).unwrap_or_else(|_| chrono::Duration::days(36_500))
}

impl InMemoryStore {
    /// The events from index `start` on that `admits` keeps, in global
    /// order, at most `limit`, a batch at a time (the lock is held per
    /// batch, never across an await).
    fn scan(
        &self,
        start: usize,
        limit: Option<u64>,
        admits: impl Fn(&RecordedEvent) -> bool + Send + Sync + 'static,
    ) -> EventStream {
        let store = self.clone();
        let limit = limit.unwrap_or(u64::MAX);
        let admits = Arc::new(admits);
        stream::unfold((start, 0u64), move |(cursor, taken)| {
            let store = store.clone();
            let admits = Arc::clone(&admits);
            async move {
                if taken >= limit {
                    return None;
                }
                let st = store.lock();
                let want = (limit - taken).min(DEFAULT_BATCH_SIZE as u64) as usize;
                let mut batch = Vec::new();
                let mut i = cursor;
                while i < st.events.len() && batch.len() < want {
                    let e = &st.events[i];
                    i += 1;
                    if admits(e) {
                        batch.push(store.deliver(e));
                    }
                }
                if batch.is_empty() {
                    return None;
                }
                let n = batch.len() as u64;
                Some((stream::iter(batch), (i, taken + n)))
            }
        })
        .flatten()
        .boxed()
    }
}

impl crate::StreamCatalog for InMemoryStore {
    fn read_correlated(&self, correlation_id: Uuid, limit: Option<u64>) -> EventStream {
        self.scan(0, limit, move |e| {
            e.metadata.correlation_id == Some(correlation_id)
        })
    }

    fn read_caused_by(&self, causation_id: Uuid, limit: Option<u64>) -> EventStream {
        self.scan(0, limit, move |e| {
            e.metadata.causation_id == Some(causation_id)
        })
    }

    fn list_streams(&self, category: &str) -> BoxStream<'static, Result<StreamInfo>> {
        let st = self.lock();
        let infos: Vec<Result<StreamInfo>> = st
            .streams
            .iter()
            .filter(|(s, _)| s.category() == category)
            .map(|(s, v)| {
                Ok(StreamInfo {
                    stream_id: s.clone(),
                    version: StreamVersion(v.len() as u64),
                })
            })
            .collect();
        stream::iter(infos).boxed()
    }

    async fn stats(&self) -> Result<StoreStats> {
        let st = self.lock();
        let mut cats: BTreeMap<String, CategoryStats> = BTreeMap::new();
        for (s, v) in &st.streams {
            let c = cats
                .entry(s.category().to_owned())
                .or_insert_with(|| CategoryStats {
                    category: s.category().to_owned(),
                    streams: 0,
                    events: 0,
                });
            c.streams += 1;
            c.events += v.len() as u64;
        }
        let mut types: BTreeMap<String, u64> = BTreeMap::new();
        for e in &st.events {
            *types.entry(e.event_type.clone()).or_default() += 1;
        }
        Ok(StoreStats {
            streams: st.streams.len() as u64,
            events: st.events.len() as u64,
            categories: cats.into_values().collect(),
            event_types: types
                .into_iter()
                .map(|(event_type, events)| EventTypeStats { event_type, events })
                .collect(),
            first_recorded_at: st.events.iter().map(|e| e.recorded_at).min(),
            last_recorded_at: st.events.iter().map(|e| e.recorded_at).max(),
        })
    }

    async fn largest_streams(&self, limit: usize) -> Result<Vec<StreamInfo>> {
        let st = self.lock();
        let mut infos: Vec<StreamInfo> = st
            .streams
            .iter()
            .map(|(s, v)| StreamInfo {
                stream_id: s.clone(),
                version: StreamVersion(v.len() as u64),
            })
            .collect();
        infos.sort_by(|a, b| {
            b.version
                .cmp(&a.version)
                .then_with(|| a.stream_id.as_str().cmp(b.stream_id.as_str()))
        });
        infos.truncate(limit);
        Ok(infos)
    }

    async fn events_recorded_since(&self, since: DateTime<Utc>) -> Result<u64> {
        let st = self.lock();
        Ok(st.events.iter().filter(|e| e.recorded_at >= since).count() as u64)
    }
}

/// Whether `fence`'s projection lock still carries its token
/// ([`crate::Error::Fenced`] otherwise); partition fences are refused, as
/// the in-memory store keeps no partition leases.
fn check_fence(st: &State, fence: &crate::Fence) -> Result<()> {
    let crate::Fence::Lock { lock, token, .. } = fence else {
        return Err(Error::Config(format!(
            "{}: the in-memory store keeps no partition leases; run all partitions \
             under the projection lock (PartitionedRunner::spawn_local)",
            fence.lease_name()
        )));
    };
    match st.locks.get(lock) {
        Some(held) if &held.token == token => Ok(()),
        Some(held) => Err(fence.fenced(&format!("token {}", held.token))),
        None => Err(fence.fenced("no lock")),
    }
}
