//! Appends under races that only a server with real concurrency produces,
//! input PostgreSQL cannot store, and paginated reads.

use annals::StreamCatalog;
use annals::{
    Error, EventId, EventStore, ExpectedVersion, GlobalPosition, NewEvent, ReadAll, ReadStream,
    StreamId, StreamVersion,
};
use futures::TryStreamExt;
use serde_json::json;
use uuid::Uuid;

use crate::common::{feed, raw_append, TestDb};

fn sid(s: &str) -> StreamId {
    StreamId::parse(s).expect("stream id")
}

/// A concurrent transaction inserts the same event id into another stream
/// and commits while our insert waits on the unique index: the unique
/// violation becomes `DuplicateEventId` naming the other stream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn racing_duplicate_id_names_the_holder() {
    let Some(db) = TestDb::new("racing_duplicate_id_names_the_holder").await else {
        return;
    };
    let id = Uuid::now_v7();
    let raw = db.raw().await;
    raw.batch_execute("BEGIN").await.expect("begin");
    assert_eq!(raw_append(&raw, "Dup-theirs", id, json!({"a": 1})).await, 0);
    let store = db.store.clone();
    let ours = tokio::spawn(async move {
        store
            .append(
                &sid("Dup-ours"),
                ExpectedVersion::NoStream,
                vec![NewEvent::new("E", json!({"a": 1})).with_id(EventId(id))],
            )
            .await
    });
    // The insert waits on the open transaction's index entry.
    db.wait_for_lock_wait(&[]).await;
    assert!(!ours.is_finished());
    raw.batch_execute("COMMIT").await.expect("commit");
    match ours.await.expect("task") {
        Err(Error::DuplicateEventId { event_id, stream }) => {
            assert_eq!(event_id, EventId(id));
            assert_eq!(stream.as_str(), "Dup-theirs");
        }
        other => panic!("expected DuplicateEventId, got {other:?}"),
    }
    // Nothing of ours was written.
    assert_eq!(
        db.store.stream_version(&sid("Dup-ours")).await.expect("v"),
        None
    );
    db.cleanup().await;
}

/// Same race, but the other transaction rolls back: our append goes through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn racing_duplicate_id_that_rolls_back() {
    let Some(db) = TestDb::new("racing_duplicate_id_that_rolls_back").await else {
        return;
    };
    let id = Uuid::now_v7();
    let raw = db.raw().await;
    raw.batch_execute("BEGIN").await.expect("begin");
    assert_eq!(raw_append(&raw, "Dup-theirs", id, json!({})).await, 0);
    let store = db.store.clone();
    let ours = tokio::spawn(async move {
        store
            .append(
                &sid("Dup-ours"),
                ExpectedVersion::NoStream,
                vec![NewEvent::new("E", json!({})).with_id(EventId(id))],
            )
            .await
    });
    db.wait_for_lock_wait(&[]).await;
    raw.batch_execute("ROLLBACK").await.expect("rollback");
    let done = ours.await.expect("task").expect("append");
    assert_eq!(done.first_version, StreamVersion(1));
    assert!(!done.deduplicated);
    db.cleanup().await;
}

/// A retried request racing with its first attempt (same stream, same ids):
/// the retry waits on the stream lock, then finds the batch and succeeds as
/// a no-op even though its expected version no longer holds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn racing_retry_is_deduplicated() {
    let Some(db) = TestDb::new("racing_retry_is_deduplicated").await else {
        return;
    };
    let id = Uuid::now_v7();
    let raw = db.raw().await;
    raw.batch_execute("BEGIN").await.expect("begin");
    assert_eq!(raw_append(&raw, "Retry-1", id, json!({"x": 1})).await, 0);
    let store = db.store.clone();
    let retry = tokio::spawn(async move {
        store
            .append(
                &sid("Retry-1"),
                ExpectedVersion::NoStream,
                vec![NewEvent::new("E", json!({"x": 1})).with_id(EventId(id))],
            )
            .await
    });
    // The retry waits on the stream lock.
    db.wait_for_lock_wait(&[]).await;
    assert!(!retry.is_finished());
    raw.batch_execute("COMMIT").await.expect("commit");
    let done = retry.await.expect("task").expect("deduplicated");
    assert!(done.deduplicated);
    assert_eq!(done.first_version, StreamVersion(1));
    let stored = feed(&db.store, ReadAll::from_start()).await;
    assert_eq!(stored.len(), 1);
    assert_eq!(done.positions, [stored[0].global_position]);
    db.cleanup().await;
}

#[tokio::test]
async fn payloads_jsonb_cannot_store_are_invalid_events() {
    let Some(db) = TestDb::new("payloads_jsonb_cannot_store_are_invalid_events").await else {
        return;
    };
    let s = sid("Bad-1");
    let nul = NewEvent::new("E", json!({"s": "a\u{0}b"}));
    assert!(matches!(
        db.store.append(&s, ExpectedVersion::Any, vec![nul]).await,
        Err(Error::InvalidEvent { .. })
    ));
    let huge = NewEvent::new("E", json!({})).with_event_version(u32::MAX);
    assert!(matches!(
        db.store.append(&s, ExpectedVersion::Any, vec![huge]).await,
        Err(Error::InvalidEvent { .. })
    ));
    assert_eq!(db.store.stream_version(&s).await.expect("v"), None);
    db.cleanup().await;
}

/// A 100-event batch is one transaction: one commit id, consecutive
/// versions, increasing sequence numbers.
#[tokio::test]
async fn large_batch_is_one_transaction() {
    let Some(db) = TestDb::new("large_batch_is_one_transaction").await else {
        return;
    };
    let s = sid("Big-1");
    let batch: Vec<NewEvent> = (0..100)
        .map(|i| NewEvent::new("E", json!({ "i": i })))
        .collect();
    let ids: Vec<EventId> = batch.iter().map(|e| e.event_id).collect();
    let r = db
        .store
        .append(&s, ExpectedVersion::NoStream, batch)
        .await
        .expect("append");
    assert_eq!((r.first_version.0, r.last_version.0), (1, 100));
    assert_eq!(r.positions.len(), 100);
    assert!(r
        .positions
        .windows(2)
        .all(|p| p[0].commit() == p[1].commit() && p[0].seq() < p[1].seq()));
    let read = db
        .store
        .read_stream_to_vec(&s, ReadStream::forward())
        .await
        .expect("read");
    assert_eq!(read.iter().map(|e| e.event_id).collect::<Vec<_>>(), ids);
    assert_eq!(
        read.iter().map(|e| e.global_position).collect::<Vec<_>>(),
        r.positions
    );
    assert!(read.iter().all(|e| e.recorded_at == read[0].recorded_at));
    db.cleanup().await;
}

/// Every lazy read pages with `batch_size` rows per query.
#[tokio::test]
async fn reads_page_through_small_batches() {
    let Some(db) =
        TestDb::with_options("reads_page_through_small_batches", |o| o.batch_size = 3).await
    else {
        return;
    };
    let store = &db.store;
    for i in 0..7 {
        let batch = (0..i + 1)
            .map(|k| NewEvent::new(if k % 2 == 0 { "A" } else { "B" }, json!({ "k": k })))
            .collect();
        store
            .append(&sid(&format!("Page-{i}")), ExpectedVersion::NoStream, batch)
            .await
            .expect("append");
    }
    store
        .append(
            &sid("Other-1"),
            ExpectedVersion::NoStream,
            vec![NewEvent::new("A", json!({}))],
        )
        .await
        .expect("append");
    let all = feed(store, ReadAll::from_start()).await;
    assert_eq!(all.len(), 29);
    assert!(all
        .windows(2)
        .all(|w| w[0].global_position < w[1].global_position));
    let limited = feed(store, ReadAll::after(all[4].global_position).limit(10)).await;
    assert_eq!(limited, all[5..15].to_vec());
    let pages = feed(store, ReadAll::from_start().categories(["Page", "Page"])).await;
    assert_eq!(pages.len(), 28);
    let typed = feed(
        store,
        ReadAll::from_start()
            .categories(["Page"])
            .event_types(["B"]),
    )
    .await;
    assert!(typed.iter().all(|e| e.event_type == "B"));
    assert_eq!(typed.len(), 12);
    let types_only = feed(store, ReadAll::from_start().event_types(["A"])).await;
    assert_eq!(types_only.len(), 17);
    assert!(types_only
        .windows(2)
        .all(|w| w[0].global_position < w[1].global_position));

    let s = sid("Page-6");
    let fwd = store
        .read_stream_to_vec(&s, ReadStream::forward().from(StreamVersion(2)))
        .await
        .expect("fwd");
    assert_eq!(
        fwd.iter().map(|e| e.stream_version.0).collect::<Vec<_>>(),
        [2, 3, 4, 5, 6, 7]
    );
    let back = store
        .read_stream_to_vec(
            &s,
            ReadStream::backward()
                .until_version(StreamVersion(6))
                .limit(4),
        )
        .await
        .expect("back");
    assert_eq!(
        back.iter().map(|e| e.stream_version.0).collect::<Vec<_>>(),
        [6, 5, 4, 3]
    );
    let listed: Vec<_> = store
        .list_streams("Page")
        .try_collect()
        .await
        .expect("list");
    assert_eq!(listed.len(), 7);
    assert!(listed.windows(2).all(|w| w[0].stream_id < w[1].stream_id));
    assert_eq!(listed[6].version, StreamVersion(7));
    db.cleanup().await;
}

#[tokio::test]
async fn positions_beyond_postgres_are_out_of_range() {
    let Some(db) = TestDb::new("positions_beyond_postgres_are_out_of_range").await else {
        return;
    };
    let far = GlobalPosition::new(u64::MAX, 0);
    let first = db.store.read_all(ReadAll::after(far)).try_next().await;
    assert!(
        matches!(first, Err(Error::PositionOutOfRange { .. })),
        "{first:?}"
    );
    use annals::CheckpointStore;
    assert!(matches!(
        db.store.save_checkpoint("p", far).await,
        Err(Error::PositionOutOfRange { .. })
    ));
    db.store
        .save_checkpoint("p", GlobalPosition::new(7, 9))
        .await
        .expect("save");
    db.store
        .save_checkpoint("p", GlobalPosition::new(6, 100))
        .await
        .expect("save older");
    assert_eq!(
        db.store.load_checkpoint("p").await.expect("load"),
        Some(GlobalPosition::new(7, 9))
    );
    db.cleanup().await;
}
