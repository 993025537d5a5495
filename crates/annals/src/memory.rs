//! An in-memory store: every trait on one `Vec`, for tests and examples.
//!
//! One mutex guards all state; appends take it once, so the global order is
//! the commit order by construction. Reads copy one batch at a time out of the
//! lock, like the database backends do.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};

use chrono::Utc;
use futures::stream::{self, BoxStream, StreamExt};

use crate::event_store::{
    CategoryStats, Direction, EventStream, EventTypeStats, ReadAll, ReadStream, StoreStats,
    StreamInfo, DEFAULT_BATCH_SIZE,
};
use crate::idempotency::{check_retry, prepare_batch, Fingerprint, StoredEvent};
use crate::snapshot::{
    PromoteReport, Snapshot, SnapshotCoverage, SnapshotStore, SnapshotWrite, StaleSnapshot,
};
use crate::{
    AppendResult, CheckpointStore, Error, EventId, EventStore, ExpectedVersion, GlobalPosition,
    NewEvent, Payload, RecordedEvent, Result, StreamId, StreamVersion,
};

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
    snapshots: BTreeMap<(String, String), Snapshot>,
    staged: BTreeMap<(String, String), Snapshot>,
    checkpoints: HashMap<String, GlobalPosition>,
}

/// The in-memory store. Clones share the same data.
#[derive(Clone, Default)]
pub struct InMemoryStore {
    state: Arc<Mutex<State>>,
}

impl InMemoryStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock cannot leave a half-applied append
        // (appends validate before mutating), so a poisoned lock is usable.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl EventStore for InMemoryStore {
    async fn append(
        &self,
        stream: &StreamId,
        expected: ExpectedVersion,
        events: Vec<NewEvent>,
    ) -> Result<AppendResult> {
        let batch = prepare_batch(stream, events)?;
        // Decode what a reader gets before changing anything: all or nothing.
        let mut decoded = Vec::with_capacity(batch.len());
        for e in &batch {
            let data = Payload::from_json(e.data.clone()).map_err(|source| Error::Encode {
                what: format!("payload of {}", e.event_type),
                source,
            })?;
            decoded.push((data, e.parsed_metadata()?));
        }
        let mut st = self.lock();
        // Idempotency first: a retried batch succeeds whatever `expected` says.
        let stored: Vec<Option<StoredEvent>> = batch
            .iter()
            .map(|e| {
                st.ids.get(&e.event_id).map(|&i| {
                    let r = &st.events[i];
                    StoredEvent {
                        stream_id: r.stream_id.clone(),
                        stream_version: r.stream_version,
                        global_position: r.global_position,
                        event_type: r.event_type.clone(),
                        event_version: r.event_version,
                        fingerprint: Some(st.fingerprints[i]),
                        data: None,
                    }
                })
            })
            .collect();
        if let Some(original) = check_retry(stream, &batch, &stored)? {
            return Ok(original);
        }
        let actual = st
            .streams
            .get(stream)
            .map(|v| StreamVersion(v.len() as u64));
        if !expected.matches(actual) {
            return Err(Error::WrongExpectedVersion {
                stream: stream.clone(),
                expected,
                actual,
            });
        }
        let now = Utc::now();
        let head = actual.map_or(0, |v| v.0);
        let mut positions = Vec::with_capacity(batch.len());
        for (i, (e, (data, metadata))) in batch.into_iter().zip(decoded).enumerate() {
            let idx = st.events.len();
            let position = GlobalPosition::from_seq(idx as u64 + 1);
            positions.push(position);
            st.ids.insert(e.event_id, idx);
            st.streams.entry(stream.clone()).or_default().push(idx);
            st.fingerprints.push(e.fingerprint);
            st.events.push(RecordedEvent {
                event_id: e.event_id,
                stream_id: stream.clone(),
                stream_version: StreamVersion(head + i as u64 + 1),
                global_position: position,
                event_type: e.event_type,
                event_version: e.event_version,
                data,
                metadata,
                recorded_at: now,
            });
        }
        Ok(AppendResult {
            first_version: StreamVersion(head + 1),
            last_version: StreamVersion(head + positions.len() as u64),
            positions,
            deduplicated: false,
        })
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
        stream::unfold((Some(start), 0u64), move |(cursor, taken)| {
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
                                batch.push(Ok(e.clone()));
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
                                batch.push(Ok(e.clone()));
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
        .flatten()
        .boxed()
    }

    fn read_all(&self, options: ReadAll) -> EventStream {
        let store = self.clone();
        let limit = options.limit.unwrap_or(u64::MAX);
        // Positions are seq = index + 1 on this backend.
        let start = options.after.seq() as usize;
        stream::unfold((start, 0u64), move |(cursor, taken)| {
            let store = store.clone();
            let options = options.clone();
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
                    if options.admits(e) {
                        batch.push(Ok(e.clone()));
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

    async fn stream_version(&self, stream: &StreamId) -> Result<Option<StreamVersion>> {
        Ok(self
            .lock()
            .streams
            .get(stream)
            .map(|v| StreamVersion(v.len() as u64)))
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

    async fn head_position(&self) -> Result<Option<GlobalPosition>> {
        Ok(self.lock().events.last().map(|e| e.global_position))
    }

    async fn read_event(&self, id: EventId) -> Result<Option<RecordedEvent>> {
        let st = self.lock();
        Ok(st.ids.get(&id).map(|&i| st.events[i].clone()))
    }
}

fn key(t: &str, id: &str) -> (String, String) {
    (t.to_owned(), id.to_owned())
}

impl SnapshotStore for InMemoryStore {
    async fn load_snapshot(
        &self,
        aggregate_type: &str,
        aggregate_id: &str,
    ) -> Result<Option<Snapshot>> {
        Ok(self
            .lock()
            .snapshots
            .get(&key(aggregate_type, aggregate_id))
            .cloned())
    }

    async fn save_snapshot(&self, snapshot: &Snapshot) -> Result<SnapshotWrite> {
        let mut st = self.lock();
        let k = key(&snapshot.aggregate_type, &snapshot.aggregate_id);
        if let Some(live) = st.snapshots.get(&k) {
            if !snapshot.supersedes(live) {
                return Ok(SnapshotWrite::Superseded);
            }
        }
        st.snapshots.insert(k, snapshot.clone());
        Ok(SnapshotWrite::Written)
    }

    async fn delete_snapshot(&self, aggregate_type: &str, aggregate_id: &str) -> Result<u64> {
        Ok(self
            .lock()
            .snapshots
            .remove(&key(aggregate_type, aggregate_id))
            .map_or(0, |_| 1))
    }

    async fn invalidate_snapshots(&self, aggregate_type: &str, below: Option<u32>) -> Result<u64> {
        let mut st = self.lock();
        let before = st.snapshots.len();
        st.snapshots.retain(|(t, _), s| {
            !(t == aggregate_type && below.is_none_or(|b| s.schema_version < b))
        });
        Ok((before - st.snapshots.len()) as u64)
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
            match st.snapshots.get(&key(s.category(), s.id())) {
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
        let mut out = Vec::new();
        for (s, idxs) in &st.streams {
            if aggregate_type.is_some_and(|t| t != s.category()) {
                continue;
            }
            let head = idxs.len() as u64;
            let snap = st
                .snapshots
                .get(&key(s.category(), s.id()))
                .map(|x| x.version);
            let behind = head.saturating_sub(snap.map_or(0, |v| v.0));
            if behind > min_events {
                out.push(StaleSnapshot {
                    aggregate_type: s.category().to_owned(),
                    aggregate_id: s.id().to_owned(),
                    head: StreamVersion(head),
                    snapshot_version: snap,
                    events_behind: behind,
                });
            }
        }
        out.sort_by(|a, b| {
            b.events_behind
                .cmp(&a.events_behind)
                .then(a.aggregate_id.cmp(&b.aggregate_id))
        });
        Ok(out)
    }

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
        let items: Vec<Result<Snapshot>> = self
            .lock()
            .staged
            .iter()
            .filter(|((t, _), _)| t == aggregate_type)
            .map(|(_, s)| Ok(s.clone()))
            .collect();
        stream::iter(items).boxed()
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
            match st.snapshots.get(&k) {
                Some(live) if !staged.supersedes(live) => report.kept_live += 1,
                _ => {
                    st.snapshots.insert(k, staged);
                    report.promoted += 1;
                }
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
