//! A store with only the required cores (`EventStore`, `SnapshotStore`,
//! `CheckpointStore`, and `ProjectionControl`, the projection locks and
//! dead letters a projection runner needs), as a backend on a replicated log
//! would offer: it runs the groups of those traits, and the snapshot jobs it can support
//! (`create`) are available on it. That this compiles is the check that those
//! groups and jobs ask for nothing more.

use annals::bank::Account;
use annals::{
    AppendResult, CheckpointStore, CommandContext, EventId, EventStore, EventStream,
    ExpectedVersion, GlobalPosition, InMemoryStore, NewEvent, ReadAll, ReadStream, RecordedEvent,
    Repository, Result, Snapshot, SnapshotJobs, SnapshotStore, SnapshotWrite, StreamId,
    StreamVersion,
};

/// The in-memory store seen through the three core traits only.
#[derive(Clone, Default)]
struct CoreOnly(InMemoryStore);

impl EventStore for CoreOnly {
    async fn append(
        &self,
        stream: &StreamId,
        expected: ExpectedVersion,
        events: Vec<NewEvent>,
    ) -> Result<AppendResult> {
        self.0.append(stream, expected, events).await
    }
    fn read_stream(&self, stream: &StreamId, options: ReadStream) -> EventStream {
        self.0.read_stream(stream, options)
    }
    fn read_all(&self, options: ReadAll) -> EventStream {
        self.0.read_all(options)
    }
    async fn stream_version(&self, stream: &StreamId) -> Result<Option<StreamVersion>> {
        self.0.stream_version(stream).await
    }
    async fn head_position(&self) -> Result<Option<GlobalPosition>> {
        self.0.head_position().await
    }
    async fn read_event(&self, id: EventId) -> Result<Option<RecordedEvent>> {
        self.0.read_event(id).await
    }
}

impl SnapshotStore for CoreOnly {
    async fn load_snapshot(&self, t: &str, id: &str) -> Result<Option<Snapshot>> {
        self.0.load_snapshot(t, id).await
    }
    async fn save_snapshot(&self, snapshot: &Snapshot) -> Result<SnapshotWrite> {
        self.0.save_snapshot(snapshot).await
    }
    async fn delete_snapshot(&self, t: &str, id: &str) -> Result<u64> {
        self.0.delete_snapshot(t, id).await
    }
}

impl CheckpointStore for CoreOnly {
    async fn load_checkpoint(&self, name: &str) -> Result<Option<GlobalPosition>> {
        self.0.load_checkpoint(name).await
    }
    async fn save_checkpoint(&self, name: &str, position: GlobalPosition) -> Result<()> {
        self.0.save_checkpoint(name, position).await
    }
    async fn reset_checkpoint(&self, name: &str) -> Result<()> {
        self.0.reset_checkpoint(name).await
    }
}

impl annals::ProjectionControl for CoreOnly {
    async fn live_partition_workers(&self, group: &str) -> Result<u32> {
        self.0.live_partition_workers(group).await
    }
    async fn acquire_projection_lock(
        &self,
        checkpoint: &str,
        owner: &str,
        token: &str,
        ttl: std::time::Duration,
    ) -> Result<annals::LockAttempt> {
        self.0
            .acquire_projection_lock(checkpoint, owner, token, ttl)
            .await
    }
    async fn renew_projection_lock(
        &self,
        lock: &annals::ProjectionLock,
        ttl: std::time::Duration,
    ) -> Result<Option<annals::ProjectionLock>> {
        self.0.renew_projection_lock(lock, ttl).await
    }
    async fn release_projection_lock(&self, lock: &annals::ProjectionLock) -> Result<()> {
        self.0.release_projection_lock(lock).await
    }
    async fn save_checkpoint_fenced(
        &self,
        name: &str,
        position: GlobalPosition,
        fence: &annals::Fence,
    ) -> Result<()> {
        self.0.save_checkpoint_fenced(name, position, fence).await
    }
    async fn reset_checkpoint_fenced(&self, name: &str, fence: &annals::Fence) -> Result<()> {
        self.0.reset_checkpoint_fenced(name, fence).await
    }
    async fn projection_lock(&self, checkpoint: &str) -> Result<Option<annals::ProjectionLock>> {
        self.0.projection_lock(checkpoint).await
    }
    async fn park_event(&self, letter: &annals::DeadLetter) -> Result<()> {
        self.0.park_event(letter).await
    }
    async fn dead_letters(&self, checkpoint: &str) -> Result<Vec<annals::DeadLetter>> {
        self.0.dead_letters(checkpoint).await
    }
    async fn drop_dead_letter(&self, checkpoint: &str, event_id: annals::EventId) -> Result<bool> {
        self.0.drop_dead_letter(checkpoint, event_id).await
    }
}

async fn fresh() -> Option<CoreOnly> {
    Some(CoreOnly::default())
}

annals_testkit::conformance_suite!(fresh; event_store, snapshot_store, checkpoints, projections, model);

#[tokio::test]
async fn create_works_on_a_cache_only_store() {
    let store = CoreOnly::default();
    let repo = Repository::<Account, _>::new(store.clone());
    let ctx = CommandContext::new();
    repo.execute("c1", &ctx, |a| a.open("cy"))
        .await
        .expect("open");
    repo.execute("c1", &ctx, |a| a.deposit(7))
        .await
        .expect("deposit");
    let jobs = SnapshotJobs::<Account, _>::new(store.clone());
    let created = jobs
        .create("c1")
        .await
        .expect("create")
        .expect("has events");
    assert_eq!(created.write, annals::SnapshotWrite::Written);
    let snap = created.snapshot;
    assert_eq!(snap.version, StreamVersion(2));
    let live = store
        .load_snapshot("Account", "c1")
        .await
        .expect("load")
        .expect("stored");
    assert_eq!(live.version, StreamVersion(2));
    assert_eq!(live.state["balance"], 7);
    assert!(jobs.create("nobody").await.expect("create").is_none());
}
