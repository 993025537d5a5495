//! The aggregate registry: domain types made reachable by name at run time.
//!
//! The CLI does not know an application's aggregates at compile time, yet
//! `annals aggregate TYPE ID` must fold `TYPE`'s events with `TYPE`'s own
//! `apply`. An application builds its ops binary with
//! [`App::register`](crate::App::register), which stores a [`Registered<A>`]
//! behind the object-safe [`AggregateOps`] trait. The trait returns boxed
//! futures (one allocation per command, irrelevant here) so it can live in a
//! map keyed by [`Aggregate::TYPE`].
//!
//! The snapshot jobs ([`SnapshotJobs`]) are reached the same way. Their
//! progress callback is a borrowed `&(dyn Fn(Progress) + Send + Sync)`, as in
//! the core: it lives as long as the boxed future, so a caller keeps its
//! progress bar on its own stack and needs no `Arc`.

use std::fmt;
use std::marker::PhantomData;
use std::sync::Arc;

use annals::{
    Aggregate, CreatedSnapshot, JobOptions, JobReport, LiveVerifyReport, LoadReport, Loaded,
    Progress, PromoteReport, RecordedEvent, Repository, Result, SnapshotConfig,
    SnapshotHistoryEntry, SnapshotJobs, SnapshotMode, SnapshotPolicy, SnapshotSkip, SnapshotWrite,
    StreamId, StreamVersion, VerifyReport,
};
use chrono::{DateTime, Utc};
use futures::future::BoxFuture;
use futures::FutureExt;
use serde::Serialize;
use serde_json::Value;

use crate::AnyStore;

/// What [`AggregateOps::load`] should do.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LoadRequest {
    /// Time travel: the state as of this stream version, by full replay
    /// (snapshots are then not used).
    pub at_version: Option<StreamVersion>,
    /// Time travel: the state at this instant, folded from the events
    /// recorded at or before it ([`Repository::load_as_of`]; snapshots are
    /// then not used). With `at_version` too, `at_version` wins.
    pub as_of: Option<DateTime<Utc>>,
    /// Ignore snapshots and fold the whole stream.
    pub no_snapshot: bool,
}

/// A loaded aggregate, type-erased: its state as JSON plus how it was loaded.
/// This is the object `annals aggregate --json` prints.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct AggregateView {
    /// The aggregate type (the stream category).
    pub aggregate_type: String,
    /// The aggregate id.
    pub aggregate_id: String,
    /// The stream, `<type>-<id>`.
    pub stream_id: StreamId,
    /// The stream version the state reflects (`None`: no events).
    pub version: Option<StreamVersion>,
    /// The state, serialized by the aggregate's `Serialize`.
    pub state: Value,
    /// Whether a snapshot was the starting point.
    pub snapshot_used: bool,
    /// The version of the snapshot used.
    pub snapshot_version: Option<StreamVersion>,
    /// Whether that snapshot was migrated from an older schema version.
    pub snapshot_migrated: bool,
    /// Why no snapshot was used, when none was.
    pub snapshot_skipped: Option<String>,
    /// Events folded (after the snapshot, or from the start).
    pub events_replayed: u64,
}

impl AggregateView {
    fn new<A: Aggregate>(stream: StreamId, loaded: Loaded<A>) -> Result<Self> {
        let state =
            serde_json::to_value(&loaded.state).map_err(|source| annals::Error::Encode {
                what: format!("{} state", A::TYPE),
                source,
            })?;
        let LoadReport {
            snapshot_version,
            snapshot_migrated,
            events_replayed,
            skipped,
        } = loaded.report;
        Ok(AggregateView {
            aggregate_type: A::TYPE.to_owned(),
            aggregate_id: stream.id().to_owned(),
            stream_id: stream,
            version: loaded.version,
            state,
            snapshot_used: snapshot_version.is_some(),
            snapshot_version,
            snapshot_migrated,
            snapshot_skipped: skipped.as_ref().map(describe_skip),
            events_replayed,
        })
    }
}

/// A sentence for why a load passed over a snapshot.
pub(crate) fn describe_skip(skip: &SnapshotSkip) -> String {
    match skip {
        SnapshotSkip::Disabled => "snapshots not used for this load".into(),
        SnapshotSkip::Missing => "no snapshot stored".into(),
        SnapshotSkip::SchemaVersion { found, expected } => format!(
            "snapshot has schema version {found}, the aggregate needs {expected} and no migration leads there"
        ),
        SnapshotSkip::Undecodable(e) => format!("snapshot state does not decode: {e}"),
        SnapshotSkip::AheadOfHead { snapshot, head } => match head {
            Some(h) => format!("snapshot at version {snapshot} is ahead of the stream head {h}"),
            None => format!("snapshot at version {snapshot} but the stream does not exist"),
        },
        SnapshotSkip::StoreError(e) => format!("snapshot store failed: {e}"),
    }
}

/// The store the operations of a registered aggregate type work on: the
/// open store wrapped so that events and snapshots are decrypted with the
/// master key, and snapshots of accounts encrypted (see `annals::gdpr`).
/// [`ops_store`] builds one.
pub type OpsStore = annals::GdprStore<AnyStore, AnyStore>;

/// `store` wrapped for [`AggregateOps`], with the master key of
/// `provider`: snapshots of the demo's `Account` are encrypted with the
/// account's key. Events are decrypted after `store`'s own upcasters.
pub fn ops_store(store: &AnyStore, provider: Arc<dyn annals::gdpr::KeyProvider>) -> OpsStore {
    let crypto = annals::gdpr::Crypto::new::<annals::bank::AccountEvent>(store.raw(), provider);
    annals::GdprStore::new(store.clone(), crypto).with_snapshot_subject(
        <annals::bank::Account as Aggregate>::TYPE,
        annals::gdpr::SnapshotSubject::AggregateId,
    )
}

/// What [`AggregateOps::create_snapshot`] did: the snapshot built and whether
/// the guarded write stored it, and, when it did not, the history row that
/// kept it out.
pub type CreateOutcome = (CreatedSnapshot, Option<SnapshotHistoryEntry>);

/// The operations the CLI runs on an aggregate type known only by name.
///
/// Implemented by [`Registered<A>`] for every [`Aggregate`]; implement it by
/// hand only to wrap or fake one.
pub trait AggregateOps: Send + Sync + 'static {
    /// The type name ([`Aggregate::TYPE`]), which is the stream category.
    fn aggregate_type(&self) -> &'static str;

    /// The current snapshot schema version ([`Aggregate::SCHEMA_VERSION`]).
    fn schema_version(&self) -> u32;

    /// Loads aggregate `id` through an [`annals::Repository`] (with the
    /// store's snapshots unless `request.no_snapshot` or a time travel).
    fn load<'a>(
        &'a self,
        store: &'a OpsStore,
        id: &'a str,
        request: LoadRequest,
    ) -> BoxFuture<'a, Result<AggregateView>>;

    /// Takes a snapshot of aggregate `id` now, from a fresh load
    /// ([`annals::Repository::snapshot`]): the snapshot built and whether the
    /// guarded write stored it. `None` when the stream does not exist.
    fn take_snapshot<'a>(
        &'a self,
        store: &'a OpsStore,
        id: &'a str,
    ) -> BoxFuture<'a, Result<Option<CreatedSnapshot>>>;

    /// [`SnapshotJobs::create`]: builds the state of `id` at its head
    /// (catching up from a usable live snapshot) and saves it as the live
    /// snapshot, saying whether the guarded write stored it and, when it
    /// did not, which history row kept it out ([`SnapshotJobs::blocker`]).
    /// `None` when the stream does not exist.
    fn create_snapshot<'a>(
        &'a self,
        store: &'a OpsStore,
        id: &'a str,
    ) -> BoxFuture<'a, Result<Option<CreateOutcome>>>;

    /// [`SnapshotJobs::prepopulate`]: live snapshots for the aggregates more
    /// than `options.min_events` past their snapshot (or with one ahead of their
    /// head), in aggregate-id order.
    /// Aggregates that fail are listed in the report; the rest go on.
    fn prepopulate<'a>(
        &'a self,
        store: &'a OpsStore,
        options: JobOptions,
        progress: &'a (dyn Fn(Progress) + Send + Sync),
    ) -> BoxFuture<'a, Result<JobReport>>;

    /// [`SnapshotJobs::migrate`]: snapshots at the current schema version
    /// for every aggregate of the type, into the staging table. Resumable.
    fn migrate<'a>(
        &'a self,
        store: &'a OpsStore,
        options: JobOptions,
        progress: &'a (dyn Fn(Progress) + Send + Sync),
    ) -> BoxFuture<'a, Result<JobReport>>;

    /// [`SnapshotJobs::verify`]: folds `sample` staged aggregates (`None`:
    /// all) from scratch and compares with the staged state.
    fn verify<'a>(
        &'a self,
        store: &'a OpsStore,
        sample: Option<usize>,
        progress: &'a (dyn Fn(Progress) + Send + Sync),
    ) -> BoxFuture<'a, Result<VerifyReport>>;

    /// [`SnapshotJobs::verify_live`]: folds `sample` aggregates (`None`:
    /// all) up to their live snapshot's version and compares with its state.
    fn verify_live<'a>(
        &'a self,
        store: &'a OpsStore,
        sample: Option<usize>,
        progress: &'a (dyn Fn(Progress) + Send + Sync),
    ) -> BoxFuture<'a, Result<LiveVerifyReport>>;

    /// [`SnapshotJobs::promote`]: verifies (unless `force`; a mismatch is
    /// [`annals::Error::Snapshot`]) and moves the staged snapshots into the
    /// live table in one transaction.
    fn promote<'a>(
        &'a self,
        store: &'a OpsStore,
        force: bool,
        verify_sample: Option<usize>,
    ) -> BoxFuture<'a, Result<PromoteReport>>;

    /// Decodes a recorded event of this type's stream with the type's event
    /// enum ([`annals::decode_event`]), to check it (`annals check`):
    /// [`annals::Error::UnknownEventType`] for a type the enum does not
    /// know, [`annals::Error::Decode`] for a payload that does not fit.
    fn check_event(&self, event: &RecordedEvent) -> Result<()>;
}

/// The [`AggregateOps`] of aggregate type `A`.
pub struct Registered<A>(PhantomData<fn() -> A>);

impl<A> Registered<A> {
    /// The operations of `A`.
    pub fn new() -> Self {
        Registered(PhantomData)
    }
}

impl<A> Default for Registered<A> {
    fn default() -> Self {
        Self::new()
    }
}

impl<A: Aggregate> fmt::Debug for Registered<A> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Registered<{}>", A::TYPE)
    }
}

impl<A: Aggregate> Registered<A> {
    /// A repository over `store` whose snapshots are read but only written
    /// when asked: the CLI inspects, it does not change the cache behind the
    /// operator's back.
    fn repository(store: &OpsStore) -> Repository<A, OpsStore, OpsStore> {
        Repository::new(store.clone()).with_snapshots(
            store.clone(),
            SnapshotConfig {
                policy: SnapshotPolicy::Manual,
                mode: SnapshotMode::Sync,
            },
        )
    }

    fn jobs(store: &OpsStore) -> SnapshotJobs<A, OpsStore> {
        SnapshotJobs::new(store.clone())
    }
}

impl<A: Aggregate> AggregateOps for Registered<A> {
    fn aggregate_type(&self) -> &'static str {
        A::TYPE
    }

    fn schema_version(&self) -> u32 {
        A::SCHEMA_VERSION
    }

    fn load<'a>(
        &'a self,
        store: &'a OpsStore,
        id: &'a str,
        request: LoadRequest,
    ) -> BoxFuture<'a, Result<AggregateView>> {
        async move { load_view(Self::repository(store), id, request).await }.boxed()
    }

    fn take_snapshot<'a>(
        &'a self,
        store: &'a OpsStore,
        id: &'a str,
    ) -> BoxFuture<'a, Result<Option<CreatedSnapshot>>> {
        async move { Self::repository(store).snapshot(id).await }.boxed()
    }

    fn create_snapshot<'a>(
        &'a self,
        store: &'a OpsStore,
        id: &'a str,
    ) -> BoxFuture<'a, Result<Option<CreateOutcome>>> {
        async move {
            let jobs = Self::jobs(store);
            let Some(created) = jobs.create(id).await? else {
                return Ok(None);
            };
            let blocker = match created.write {
                SnapshotWrite::Written => None,
                SnapshotWrite::Superseded => jobs.blocker(&created.snapshot).await?,
            };
            Ok(Some((created, blocker)))
        }
        .boxed()
    }

    fn prepopulate<'a>(
        &'a self,
        store: &'a OpsStore,
        options: JobOptions,
        progress: &'a (dyn Fn(Progress) + Send + Sync),
    ) -> BoxFuture<'a, Result<JobReport>> {
        async move { Self::jobs(store).prepopulate(options, progress).await }.boxed()
    }

    fn migrate<'a>(
        &'a self,
        store: &'a OpsStore,
        options: JobOptions,
        progress: &'a (dyn Fn(Progress) + Send + Sync),
    ) -> BoxFuture<'a, Result<JobReport>> {
        async move { Self::jobs(store).migrate(options, progress).await }.boxed()
    }

    fn verify<'a>(
        &'a self,
        store: &'a OpsStore,
        sample: Option<usize>,
        progress: &'a (dyn Fn(Progress) + Send + Sync),
    ) -> BoxFuture<'a, Result<VerifyReport>> {
        async move { Self::jobs(store).verify(sample, progress).await }.boxed()
    }

    fn verify_live<'a>(
        &'a self,
        store: &'a OpsStore,
        sample: Option<usize>,
        progress: &'a (dyn Fn(Progress) + Send + Sync),
    ) -> BoxFuture<'a, Result<LiveVerifyReport>> {
        async move { Self::jobs(store).verify_live(sample, progress).await }.boxed()
    }

    fn promote<'a>(
        &'a self,
        store: &'a OpsStore,
        force: bool,
        verify_sample: Option<usize>,
    ) -> BoxFuture<'a, Result<PromoteReport>> {
        async move { Self::jobs(store).promote(force, verify_sample).await }.boxed()
    }
    fn check_event(&self, event: &RecordedEvent) -> Result<()> {
        annals::decode_event::<A::Event>(event).map(drop)
    }
}

/// Loads `id` as `request` asks, into a view.
async fn load_view<A: Aggregate, S: annals::EventStore, N: annals::SnapshotStore>(
    repo: Repository<A, S, N>,
    id: &str,
    request: LoadRequest,
) -> Result<AggregateView> {
    let stream = StreamId::new(A::TYPE, id)?;
    let loaded = match (request.at_version, request.as_of, request.no_snapshot) {
        (Some(v), _, _) => repo.load_at_version(id, v).await?,
        (None, Some(t), _) => repo.load_as_of(id, t).await?,
        (None, None, true) => repo.load_without_snapshot(id).await?,
        (None, None, false) => repo.load(id).await?,
    };
    AggregateView::new(stream, loaded)
}
