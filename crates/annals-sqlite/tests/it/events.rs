//! Event reads and writes beyond the shared suite: paging at small batch
//! sizes, rows that do not decode, SQL-side filters.

use annals::StreamCatalog;
use annals::{EventStore, ExpectedVersion, GlobalPosition, ReadAll, ReadStream, StreamVersion};
use annals_sqlite::SqliteOptions;
use futures::{StreamExt, TryStreamExt};

use crate::{ev, fresh_store, fresh_store_with, raw, sid};

fn small_batches() -> SqliteOptions {
    SqliteOptions {
        batch_size: 3,
        ..SqliteOptions::default()
    }
}

#[tokio::test]
async fn pages_meet_exactly_at_batch_boundaries() {
    let store = fresh_store_with(small_batches()).await;
    let s = sid("Order-1");
    for i in 0..9 {
        store
            .append(&s, ExpectedVersion::Any, vec![ev("A", i)])
            .await
            .expect("append");
    }
    store
        .append(&sid("Other-1"), ExpectedVersion::Any, vec![ev("B", 0)])
        .await
        .expect("append");

    let versions = |events: Vec<annals::RecordedEvent>| -> Vec<u64> {
        events.iter().map(|e| e.stream_version.get()).collect()
    };
    let read = |o: ReadStream| store.read_stream_to_vec(&s, o);
    assert_eq!(
        versions(read(ReadStream::forward()).await.expect("read")),
        (1..=9).collect::<Vec<_>>()
    );
    assert_eq!(
        versions(read(ReadStream::backward()).await.expect("read")),
        (1..=9).rev().collect::<Vec<_>>()
    );
    assert_eq!(
        versions(
            read(ReadStream::forward().from(StreamVersion(2)).limit(6))
                .await
                .expect("read")
        ),
        (2..=7).collect::<Vec<_>>()
    );
    assert_eq!(
        versions(
            read(ReadStream::backward().from(StreamVersion(8)).limit(4))
                .await
                .expect("read")
        ),
        vec![8, 7, 6, 5]
    );
    assert_eq!(
        versions(
            read(ReadStream::backward().until_version(StreamVersion(4)))
                .await
                .expect("read")
        ),
        vec![4, 3, 2, 1]
    );
    assert_eq!(
        versions(
            read(
                ReadStream::forward()
                    .from(StreamVersion(3))
                    .until_version(StreamVersion(6))
            )
            .await
            .expect("read")
        ),
        vec![3, 4, 5, 6]
    );
    assert!(read(ReadStream::forward().limit(0))
        .await
        .expect("read")
        .is_empty());
    assert!(read(ReadStream::forward().from(StreamVersion(10)))
        .await
        .expect("read")
        .is_empty());

    let all: Vec<_> = store
        .read_all(ReadAll::from_start())
        .try_collect()
        .await
        .expect("read all");
    assert_eq!(all.len(), 10);
    let after_third: Vec<_> = store
        .read_all(ReadAll::after(all[2].global_position).limit(6))
        .try_collect()
        .await
        .expect("read all");
    assert_eq!(after_third, all[3..9]);
    let only_b: Vec<_> = store
        .read_all(ReadAll::from_start().event_types(["B"]))
        .try_collect()
        .await
        .expect("read all");
    assert_eq!(only_b.len(), 1);

    let listed: Vec<_> = {
        for i in 2..=7 {
            store
                .append(
                    &sid(&format!("Order-{i}")),
                    ExpectedVersion::Any,
                    vec![ev("A", i)],
                )
                .await
                .expect("append");
        }
        store
            .list_streams("Order")
            .try_collect()
            .await
            .expect("list")
    };
    let names: Vec<_> = listed.iter().map(|i| i.stream_id.to_string()).collect();
    assert_eq!(
        names,
        (1..=7).map(|i| format!("Order-{i}")).collect::<Vec<_>>()
    );
    assert_eq!(listed[0].version, StreamVersion(9));
}

#[tokio::test]
async fn undecodable_rows_are_errors_naming_the_position() {
    let store = fresh_store().await;
    let ok = store
        .append(&sid("Order-1"), ExpectedVersion::Any, vec![ev("A", 1)])
        .await
        .expect("append");
    let conn = raw(&store);
    let insert = |stream: &str, data: &str, metadata: &str| {
        conn.execute(
            "INSERT INTO events (event_id, stream_id, category, stream_version, event_type, \
             event_version, data, metadata, recorded_at) VALUES (randomblob(16), ?1, 'Order', 1, \
             'A', 1, ?2, ?3, 0)",
            [stream, data, metadata],
        )
        .expect("insert a bad row");
        conn.last_insert_rowid()
    };
    let bad_json = insert("Order-2", "{not json", "{}");
    let bad_stream = insert("nodash", "{}", "{}");
    let bad_metadata = insert("Order-3", "{}", "[1]");

    let mut all = store.read_all(ReadAll::from_start());
    let first = all.next().await.expect("an item").expect("a good row");
    assert_eq!(first.global_position, ok.positions[0]);
    let err = all.next().await.expect("an item").expect_err("bad json");
    assert!(
        err.to_string().contains(&format!("position {bad_json}")),
        "{err}"
    );
    assert!(all.next().await.is_none(), "a read ends at its first error");
    // The feed's pages (read in windows of positions) end the same way.
    let mut pages = store.read_feed_pages(ReadAll::from_start(), 10);
    let err = pages.next().await.expect("an item").expect_err("bad json");
    assert!(
        err.to_string().contains(&format!("position {bad_json}")),
        "{err}"
    );
    assert!(
        pages.next().await.is_none(),
        "the pages end at their first error"
    );
    for position in [bad_json, bad_stream, bad_metadata] {
        let err = store
            .read_all(ReadAll::after(GlobalPosition::from_seq(
                position as u64 - 1,
            )))
            .next()
            .await
            .expect("an item")
            .expect_err("undecodable");
        assert!(
            matches!(
                err,
                annals::Error::Backend {
                    backend: "sqlite",
                    ..
                }
            ),
            "{err:?}"
        );
        assert!(
            err.to_string().contains(&format!("position {position}")),
            "{err}"
        );
    }
    let err = store
        .read_stream_to_vec(&sid("Order-2"), ReadStream::forward())
        .await
        .expect_err("undecodable");
    assert!(
        err.to_string().contains(&format!("position {bad_json}")),
        "{err}"
    );
}

/// Issue 11: a page's text is checked as UTF-8 once, after its rows are
/// read. A row whose text is not UTF-8 (SQLite stores what it is given) is
/// still an error naming its position and column, after every good row
/// before it in the same page, and the rows of a long page (whose buffers
/// are sized once it has a few dozen rows) all arrive intact.
#[tokio::test]
async fn issue_11_text_that_is_not_utf8_names_its_position_after_the_good_rows() {
    let store = fresh_store().await;
    let s = sid("Order-1");
    let events: Vec<_> = (1..=100).map(|i| ev("A", i)).collect();
    store
        .append(&s, ExpectedVersion::NoStream, events)
        .await
        .expect("append");
    let conn = raw(&store);
    let insert = |stream: &str, event_type_hex: &str, data_hex: &str| {
        conn.execute(
            &format!(
                "INSERT INTO events (event_id, stream_id, category, stream_version, event_type, \
                 event_version, data, metadata, recorded_at) VALUES (randomblob(16), ?1, \
                 'Order', 1, CAST(X'{event_type_hex}' AS TEXT), 1, CAST(X'{data_hex}' AS TEXT), \
                 '{{}}', 0)"
            ),
            [stream],
        )
        .expect("insert a bad row");
        conn.last_insert_rowid()
    };
    // `"\xff"` as data; then a bad event type.
    let bad_data = insert("Order-2", "41", "22ff22");
    let bad_type = insert("Order-3", "41ff", "7b7d");

    let read: Vec<_> = store.read_all(ReadAll::from_start()).collect().await;
    assert_eq!(read.len(), 101, "the good rows, then one error");
    for (i, event) in read[..100].iter().enumerate() {
        let event = event.as_ref().expect("a good row");
        assert_eq!(event.stream_version, StreamVersion(i as u64 + 1));
        assert_eq!(event.data, serde_json::json!({"n": i + 1}));
    }
    let err = read[100].as_ref().expect_err("not UTF-8");
    assert!(
        matches!(
            err,
            annals::Error::Backend {
                backend: "sqlite",
                ..
            }
        ),
        "{err:?}"
    );
    let message = err.to_string();
    assert!(
        message.contains(&format!("position {bad_data}")),
        "{message}"
    );
    assert!(message.contains("data is not valid UTF-8"), "{message}");
    let err = store
        .read_all(ReadAll::after(GlobalPosition::from_seq(
            bad_type as u64 - 1,
        )))
        .next()
        .await
        .expect("an item")
        .expect_err("not UTF-8");
    let message = err.to_string();
    assert!(
        message.contains(&format!("position {bad_type}")),
        "{message}"
    );
    assert!(
        message.contains("event_type is not valid UTF-8"),
        "{message}"
    );
}

#[tokio::test]
async fn positions_from_another_store_are_refused() {
    let store = fresh_store().await;
    let item = store
        .read_all(ReadAll::after(GlobalPosition::new(7, 1)))
        .next()
        .await
        .expect("an item");
    assert!(
        matches!(item, Err(annals::Error::PositionOutOfRange { .. })),
        "{item:?}"
    );
}

#[tokio::test]
async fn a_failed_append_leaves_no_trace() {
    let store = fresh_store().await;
    let s = sid("Order-1");
    let stored = store
        .append(&s, ExpectedVersion::Any, vec![ev("A", 1)])
        .await
        .expect("append");
    let reused = store
        .read_stream_to_vec(&s, ReadStream::forward())
        .await
        .expect("read")[0]
        .event_id;
    // Two new events, then a reused id: the insert fails on the third row.
    let err = store
        .append(
            &sid("Order-2"),
            ExpectedVersion::Any,
            vec![ev("A", 1), ev("A", 2), ev("A", 3).with_id(reused)],
        )
        .await
        .expect_err("reused id");
    assert!(
        matches!(err, annals::Error::DuplicateEventId { ref stream, event_id } if *stream == s && event_id == reused),
        "{err:?}"
    );
    assert_eq!(
        store.stream_version(&sid("Order-2")).await.expect("head"),
        None
    );
    let next = store
        .append(&sid("Order-3"), ExpectedVersion::Any, vec![ev("A", 1)])
        .await
        .expect("append");
    assert_eq!(
        next.positions[0].seq(),
        stored.positions[0].seq() + 1,
        "no position was consumed"
    );
}

#[tokio::test]
async fn reads_use_the_indexes() {
    let store = fresh_store().await;
    let conn = raw(&store);
    let plan = |sql: &str| -> String {
        let mut s = conn
            .prepare(&format!("EXPLAIN QUERY PLAN {sql}"))
            .expect("plan");
        let rows: Vec<String> = s
            .query_map([], |r| r.get::<_, String>(3))
            .expect("query")
            .collect::<rusqlite::Result<_>>()
            .expect("rows");
        rows.join("; ")
    };
    let stream = plan(
        "SELECT * FROM events WHERE stream_id = 'a' AND stream_version BETWEEN 1 AND 9 \
         AND recorded_at <= 5 ORDER BY stream_version LIMIT 10",
    );
    assert!(
        stream.contains("USING INDEX sqlite_autoindex_events"),
        "{stream}"
    );
    assert!(!stream.contains("TEMP B-TREE"), "{stream}");
    let category = plan(
        "SELECT * FROM events WHERE position > 5 AND category IN ('a') ORDER BY position LIMIT 10",
    );
    assert!(category.contains("events_category_position"), "{category}");
    assert!(!category.contains("TEMP B-TREE"), "{category}");
}

#[tokio::test]
async fn a_retry_with_any_expected_version_is_deduplicated() {
    // `Any` matches, so the append reaches the inserts; the stored id fails
    // the unique index, the transaction rolls back and the retry is
    // recognised from what is stored.
    let store = fresh_store().await;
    let s = sid("Order-1");
    let batch = vec![ev("A", 1), ev("B", 2)];
    let first = store
        .append(&s, ExpectedVersion::Any, batch.clone())
        .await
        .expect("append");
    store
        .append(&s, ExpectedVersion::Any, vec![ev("C", 3)])
        .await
        .expect("append");
    let retry = store
        .append(&s, ExpectedVersion::Any, batch.clone())
        .await
        .expect("retry");
    assert!(retry.deduplicated);
    assert_eq!(retry.positions, first.positions);
    assert_eq!(
        (retry.first_version, retry.last_version),
        (StreamVersion(1), StreamVersion(2))
    );
    assert_eq!(
        store.stream_version(&s).await.expect("head"),
        Some(StreamVersion(3))
    );

    // The same ids in another order are not the same batch.
    let swapped = vec![batch[1].clone(), batch[0].clone()];
    let err = store
        .append(&s, ExpectedVersion::Any, swapped)
        .await
        .expect_err("reordered");
    assert!(
        matches!(err, annals::Error::DuplicateEventId { .. }),
        "{err:?}"
    );
    // Same id, other payload.
    let changed = vec![batch[0].clone().with_event_version(2), batch[1].clone()];
    let err = store
        .append(&s, ExpectedVersion::Any, changed)
        .await
        .expect_err("changed");
    assert!(
        matches!(err, annals::Error::DuplicateEventId { .. }),
        "{err:?}"
    );
}

/// Issue 7: pages are bounded in bytes as well as rows. Events of 1 MiB
/// fill a page long before `batch_size` rows; every one of them still comes,
/// once and in order, forward, backward and in the global feed.
#[tokio::test]
async fn large_events_come_in_several_pages_all_delivered_in_order() {
    let store = fresh_store().await;
    let s = sid("Blob-1");
    let n = 12u64;
    for i in 0..n {
        let data = serde_json::json!({"i": i, "blob": "x".repeat(1 << 20)});
        store
            .append(
                &s,
                ExpectedVersion::Any,
                vec![annals::NewEvent::new("Blob", data), ev("Small", i as i64)],
            )
            .await
            .expect("append");
    }
    let index = |e: &annals::RecordedEvent| {
        let v = e.data.to_value().expect("payload parses");
        v.get("i")
            .or(v.get("n"))
            .and_then(|i| i.as_u64())
            .expect("i")
    };
    let forward: Vec<_> = store
        .read_stream(&s, ReadStream::forward())
        .try_collect()
        .await
        .expect("read forward");
    assert_eq!(forward.len() as u64, 2 * n);
    assert!(forward
        .iter()
        .enumerate()
        .all(|(k, e)| e.stream_version == StreamVersion(k as u64 + 1) && index(e) == k as u64 / 2));
    assert!(forward
        .iter()
        .step_by(2)
        .all(|e| e.data.as_str().len() > 1 << 20));

    let backward: Vec<_> = store
        .read_stream(&s, ReadStream::backward())
        .try_collect()
        .await
        .expect("read backward");
    let versions: Vec<u64> = backward.iter().map(|e| e.stream_version.get()).collect();
    assert_eq!(versions, (1..=2 * n).rev().collect::<Vec<_>>());

    let feed: Vec<_> = store
        .read_all(ReadAll::from_start().event_types(["Blob"]))
        .try_collect()
        .await
        .expect("read_all");
    let order: Vec<u64> = feed.iter().map(index).collect();
    assert_eq!(order, (0..n).collect::<Vec<_>>());
    assert!(feed
        .windows(2)
        .all(|w| w[0].global_position < w[1].global_position));

    // The feed's pages: a window of positions whose rows reach the byte
    // budget is read on from its last row before the windows after it.
    let filters = [
        ReadAll::from_start(),
        ReadAll::from_start().event_types(["Blob"]),
    ];
    annals_testkit::check_feed_pages_to_the_end(&store, &filters, &[7]).await;
}

/// Issue 11 (a faster read path): events read at their current version
/// carry a slice of their page's buffer instead of a copy of their payload;
/// an event an upcaster changes gets text of its own, and both read right.
#[tokio::test]
async fn issue_11_current_events_share_their_page_and_upcast_ones_do_not() {
    use std::sync::Arc;

    let upcasters = annals::Upcasters::builder()
        .step(annals::Step::new("A", 1, |mut v: serde_json::Value| {
            v["m"] = serde_json::json!(1);
            Ok::<_, std::convert::Infallible>(v)
        }))
        .build(&[("A", 2), ("B", 1)])
        .expect("upcasters");
    let plain = fresh_store().await;
    let store = plain.clone().with_upcasters(Arc::new(upcasters));
    let s = sid("Order-1");
    store
        .append(&s, ExpectedVersion::NoStream, vec![ev("A", 1), ev("B", 2)])
        .await
        .expect("append");

    let events: Vec<annals::RecordedEvent> = store
        .read_all(ReadAll::after(GlobalPosition::START))
        .try_collect()
        .await
        .expect("read");
    assert_eq!(events.len(), 2);
    let (a, b) = (&events[0], &events[1]);
    assert_eq!((a.event_type.as_str(), a.event_version), ("A", 2));
    assert_eq!(a.stored_event_version, Some(1));
    assert_eq!(a.data, serde_json::json!({"n": 1, "m": 1}));
    assert!(!a.data.is_shared(), "an upcast payload is its own text");
    assert_eq!((b.event_type.as_str(), b.event_version), ("B", 1));
    assert_eq!(b.stored_event_version, None);
    assert_eq!(b.data, serde_json::json!({"n": 2}));
    assert!(
        b.data.is_shared(),
        "a current payload is a slice of its page"
    );
    // The same events through a stream read and without upcasters.
    let stream = store
        .read_stream_to_vec(&s, ReadStream::forward())
        .await
        .expect("read");
    assert_eq!(stream, events);
    let stored = plain
        .read_stream_to_vec(&s, ReadStream::forward())
        .await
        .expect("read");
    assert_eq!(stored[0].data, serde_json::json!({"n": 1}));
    assert_eq!(stored[0].event_version, 1);
    assert!(stored.iter().all(|e| e.data.is_shared()));
    // A shared payload serializes as the JSON it holds, and detaches.
    let line = serde_json::to_string(&stored[1]).expect("serialize");
    let back: annals::RecordedEvent = serde_json::from_str(&line).expect("deserialize");
    assert_eq!(back, stored[1]);
    let owned = stored[1].data.clone().into_owned();
    assert!(!owned.is_shared());
    assert_eq!(owned.as_str(), stored[1].data.as_str());
}

/// The positions, `scanned_to` and `at_end` of a feed page.
fn page_shape(p: &annals::FeedPage) -> (Vec<GlobalPosition>, GlobalPosition, bool) {
    let events = p.events.iter().map(|e| e.global_position).collect();
    (events, p.scanned_to, p.at_end)
}

/// With round trips of 2 rows, `read_feed_pages` cuts its round trips
/// (windows of positions; one chain of round trips under a time filter)
/// into pages of 1, 3 and 5 events (pages spanning round trips, round trips
/// cut at page ends), filtered and not, and each page is the one
/// `read_feed_page` returns from the `scanned_to` before it.
#[tokio::test]
async fn feed_pages_cut_one_chain_of_round_trips_into_pages() {
    let store = fresh_store_with(SqliteOptions {
        batch_size: 2,
        ..SqliteOptions::default()
    })
    .await;
    for i in 0..11 {
        let (stream, kind) = if i % 3 == 0 {
            ("Chain-1", "Rare")
        } else {
            ("Other-1", "Common")
        };
        store
            .append(&sid(stream), ExpectedVersion::Any, vec![ev(kind, i)])
            .await
            .expect("append");
    }
    let filters = [
        ReadAll::from_start(),
        ReadAll::after(GlobalPosition::from_seq(4)),
        ReadAll::from_start().event_types(["Rare"]),
        ReadAll::from_start().categories(["Other"]),
        // Time filters: read as one chain of round trips (not windows).
        ReadAll::from_start().since(chrono::DateTime::<chrono::Utc>::UNIX_EPOCH),
        ReadAll::from_start()
            .event_types(["Rare"])
            .until(chrono::Utc::now() + chrono::Duration::days(1)),
    ];
    annals_testkit::check_feed_pages_to_the_end(&store, &filters, &[1, 3, 5]).await;
}

/// A filtered feed is read in windows of positions that widen where the
/// filter matches few events (up to 64 batches) and narrow again where it
/// matches most: a dense stretch inside a wide window fills its batch of
/// rows and is read on from there. Pages still equal `read_feed_page`'s
/// from the `scanned_to` before them, and every matching event comes once.
#[tokio::test]
async fn feed_windows_widen_for_rare_events_and_read_on_through_dense_stretches() {
    let store = fresh_store_with(SqliteOptions {
        batch_size: 2,
        ..SqliteOptions::default()
    })
    .await;
    // Rare (1 in 25), then 40 in a row, then rare again.
    let rare = |i: i64| (100..140).contains(&i) || i % 25 == 0;
    for i in 0..400 {
        let (stream, kind) = if rare(i) {
            ("Rare-1", "Rare")
        } else {
            ("Noise-1", "Noise")
        };
        store
            .append(&sid(stream), ExpectedVersion::Any, vec![ev(kind, i)])
            .await
            .expect("append");
    }
    let filters = [
        ReadAll::from_start().event_types(["Rare"]),
        ReadAll::from_start().categories(["Rare"]),
        ReadAll::after(GlobalPosition::from_seq(90)).categories(["Rare"]),
        ReadAll::from_start().categories(["Noise"]),
    ];
    annals_testkit::check_feed_pages_to_the_end(&store, &filters, &[1, 3, 7, 1000]).await;
}

/// The round trip of the next page is sent as soon as the one before it
/// arrives, before the caller asks for that page: with one reader, a job
/// queued on it after the first page is taken runs after the second page's
/// round trip, so an event appended once that job has run is not in the
/// second page (a loop of `read_feed_page` would read it there).
#[tokio::test]
async fn feed_pages_read_the_next_round_trip_before_the_caller_asks() {
    let store = fresh_store_with(SqliteOptions {
        batch_size: 3,
        readers: 1,
        ..SqliteOptions::default()
    })
    .await;
    let mut positions = Vec::new();
    for i in 0..4 {
        let r = store
            .append(&sid("Ahead-1"), ExpectedVersion::Any, vec![ev("E", i)])
            .await
            .expect("append");
        positions.extend(r.positions);
    }
    let mut pages = store.read_feed_pages(ReadAll::from_start(), 3);
    let first = pages.next().await.expect("a page").expect("first page");
    assert_eq!(
        page_shape(&first),
        (positions[..3].to_vec(), positions[2], false)
    );
    // Queued behind the second page's round trip on the only reader.
    store
        .test_hook_reader_job(|_| ())
        .await
        .expect("reader job");
    let late = store
        .append(&sid("Ahead-1"), ExpectedVersion::Any, vec![ev("E", 4)])
        .await
        .expect("append");
    let second = pages.next().await.expect("a page").expect("second page");
    assert_eq!(
        page_shape(&second),
        (vec![positions[3]], positions[3], true),
        "the second page was read before the late append"
    );
    assert!(pages.next().await.is_none(), "the stream ends at the end");
    let rest = store
        .read_feed_page(&ReadAll::after(second.scanned_to), 3)
        .await
        .expect("rest");
    assert_eq!(
        page_shape(&rest),
        (late.positions.clone(), late.positions[0], true)
    );
}
