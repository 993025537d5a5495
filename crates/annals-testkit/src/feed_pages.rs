//! `read_feed_pages` checked against `read_feed_page`, for the conformance
//! suite and the backends' own tests of their read ahead.

use annals::{EventStore, FeedPage, GlobalPosition, ReadAll};
use futures::StreamExt as _;

/// Reads `store.read_feed_pages(filter, limit)` to its end and checks it
/// against a loop of `read_feed_page`: each page equals the
/// `read_feed_page` from the `scanned_to` before it (the same events, the
/// same `scanned_to`, the same `at_end`), holds at most `limit` events, and
/// together the pages deliver every event `read_all(filter)` returns, once
/// and in order. Returns whether the last page was at the end of the log
/// (the stream may also stop after a full page). Panics naming the filter,
/// the limit and the page otherwise.
pub async fn check_feed_pages<S: EventStore>(store: &S, filter: &ReadAll, limit: usize) -> bool {
    let what = format!("{filter:?}, limit {limit}");
    let shape = |p: &FeedPage| {
        let events: Vec<GlobalPosition> = p.events.iter().map(|e| e.global_position).collect();
        (events, p.scanned_to, p.at_end)
    };
    let mut pages = store.read_feed_pages(filter.clone(), limit);
    let mut after = filter.after;
    let mut delivered = Vec::new();
    let mut last_at_end = false;
    while let Some(page) = pages.next().await {
        let page = page.unwrap_or_else(|e| panic!("{what}: {e}"));
        let mut from = filter.clone();
        from.after = after;
        let one = store
            .read_feed_page(&from, limit)
            .await
            .unwrap_or_else(|e| panic!("{what}: read_feed_page: {e}"));
        assert_eq!(shape(&page), shape(&one), "{what}: the page after {after}");
        assert!(page.events.len() <= limit, "{what}: bounded pages");
        delivered.extend(page.events.iter().map(|e| e.global_position));
        after = page.scanned_to;
        last_at_end = page.at_end;
    }
    if !last_at_end {
        // The stream may stop after a full page; the rest is read on.
        let mut from = filter.clone();
        from.after = after;
        let rest = store
            .read_feed_page(&from, limit)
            .await
            .unwrap_or_else(|e| panic!("{what}: the rest: {e}"));
        assert!(
            rest.events.is_empty() && rest.at_end,
            "{what}: nothing left"
        );
    }
    let mut expected = Vec::new();
    let mut all = store.read_all(filter.clone());
    while let Some(e) = all.next().await {
        expected.push(
            e.unwrap_or_else(|e| panic!("{what}: read_all: {e}"))
                .global_position,
        );
    }
    assert_eq!(delivered, expected, "{what}: every matching event once");
    last_at_end
}

/// [`check_feed_pages`] for every filter and limit, each stream also ending
/// with a page at the end of the log (for a backend whose read ahead never
/// stops after a full page).
pub async fn check_feed_pages_to_the_end<S: EventStore>(
    store: &S,
    filters: &[ReadAll],
    limits: &[usize],
) {
    for filter in filters {
        for &limit in limits {
            let at_end = check_feed_pages(store, filter, limit).await;
            assert!(
                at_end,
                "{filter:?}, limit {limit}: the stream ends at the end"
            );
        }
    }
}
