//! The fencing of a blue-green rebuild's own steps, checked the same way on
//! every backend whose transactional applier rebuilds blue-green.

use std::fmt::Debug;
use std::time::Duration;

use annals::{
    BatchApplier, BatchContext, BlueGreenApplier, EventStore, Fence, GlobalPosition, LockAttempt,
    ProjectionControl, ReadAll, RecordedEvent, TableNames,
};
use futures::TryStreamExt;

/// How long the check waits for a lease to expire.
const PATIENCE: Duration = Duration::from_secs(60);

/// A blue-green rebuild paused past its lock's lease, whose lock another
/// rebuild of the same version took over, can neither swap nor start its
/// shadow over: both fail with [`annals::Error::Fenced`] naming the new
/// token and change nothing.
///
/// `make` builds a fresh applier of the version to rebuild (whose live
/// checkpoint is free, with events in the store); `read_model` returns what
/// the projection's live and shadow tables hold. Rebuild A takes the lock
/// with a short lease, enters the shadow and applies every event; rebuild B
/// takes the lock over once that lease has expired (polled against the
/// store's clock, with a deadline), starts the shadow over and applies the
/// first four events. Then A's swap and A's `enter_shadow(true)` must be
/// refused, the read model must be as B left it, no version may have been
/// swapped in, and the shadow checkpoint must be B's.
pub async fn check_blue_green_steps_are_fenced<S, A, T>(
    store: &S,
    make: impl Fn() -> A,
    read_model: impl AsyncFn() -> T,
) where
    S: EventStore + ProjectionControl,
    A: BatchApplier + BlueGreenApplier,
    T: PartialEq + Debug,
{
    let events: Vec<RecordedEvent> = store
        .read_all(ReadAll::from_start())
        .try_collect()
        .await
        .expect("read_all");
    assert!(events.len() >= 4, "the check needs at least four events");
    let mut a = make();
    let cp = a.checkpoint();
    let ttl = Duration::from_millis(200);
    let LockAttempt::Acquired(lock) = store
        .acquire_projection_lock(&cp, "a", "token-a", ttl)
        .await
        .expect("lock")
    else {
        panic!("the lock of {cp} is held")
    };
    let active_before = a.active_version().await.expect("active version");
    // Rebuild A builds the shadow up to the head under its lock.
    a.set_fence(Some(Fence::Lock {
        lock: cp.clone(),
        token: lock.token.clone(),
        ttl,
    }));
    assert!(!a.enter_shadow(true).await.expect("A enters the shadow"));
    a.apply(&events, &shadow_batch(&a, &events))
        .await
        .expect("A's shadow build");
    // A pauses past its lease; rebuild B takes the lock and starts over.
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the lease never expired"
        );
        match store
            .acquire_projection_lock(&cp, "b", "token-b", PATIENCE)
            .await
            .expect("lock")
        {
            LockAttempt::Acquired(_) => break,
            LockAttempt::Held(_) => tokio::task::yield_now().await,
        }
    }
    let mut b = make();
    b.set_fence(Some(Fence::Lock {
        lock: cp.clone(),
        token: "token-b".into(),
        ttl: PATIENCE,
    }));
    assert!(!b.enter_shadow(true).await.expect("B enters the shadow"));
    let first = &events[..4];
    let b_batch = shadow_batch(&b, first);
    b.apply(first, &b_batch).await.expect("B's first batch");
    let before = read_model().await;
    // A wakes up: neither its swap nor a fresh start of its shadow goes in.
    for (step, attempt) in [
        ("swap", a.swap().await),
        ("enter_shadow", a.enter_shadow(true).await.map(drop)),
    ] {
        match attempt {
            Err(annals::Error::Fenced { lease, detail }) => {
                assert_eq!(lease, cp, "{step}");
                assert!(detail.contains("token-b"), "{step}: {detail}");
            }
            other => panic!("{step}: expected Fenced, got {other:?}"),
        }
    }
    assert_eq!(
        read_model().await,
        before,
        "a fenced step changed the read model"
    );
    assert_eq!(
        b.active_version().await.expect("active version"),
        active_before,
        "no version was swapped in"
    );
    assert_eq!(
        store
            .load_checkpoint(&b.checkpoint())
            .await
            .expect("checkpoint"),
        Some(b_batch.position),
        "B's shadow checkpoint"
    );
}

/// The context of a rebuild's first shadow batch of `events`.
fn shadow_batch<A: BatchApplier>(applier: &A, events: &[RecordedEvent]) -> BatchContext {
    BatchContext {
        checkpoint: applier.checkpoint(),
        after: GlobalPosition::START,
        position: events.last().expect("events").global_position,
        replaying: true,
        attempt: 1,
        tables: TableNames::default(),
    }
}
