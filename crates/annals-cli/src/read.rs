//! `annals read` and `annals read-all`: filters and `--follow`.
//!
//! `read-all` hands every filter to the store (`ReadAll`: categories, types,
//! `since` / `until` on `recorded_at`), so the database skips what is not
//! asked for. `read` reads one stream in pages, asks the store for `--until`
//! (`ReadStream::as_of`) and filters `--type` and `--since` here: a stream
//! is one aggregate's history, read in pages anyway.
//!
//! `--follow` has no notification to wait on (SQLite has none across
//! processes, and the stores offer none), so it looks again every
//! `--poll-interval` (at least 10 ms, 500 ms by default): each look is one
//! read from where the last one ended, which returns at once when nothing is
//! new. A follower of the global order never passes an event: it resumes
//! strictly after the last event it printed, or after the head position it
//! read *before* a look that printed nothing past it (every event at or
//! below that head was committed, hence seen by the look), so a filter that
//! matches nothing does not make each look walk the same events again.

use std::time::Duration;

use annals::{
    validate_category, Direction, EventStore, GlobalPosition, ReadAll, ReadStream, RecordedEvent,
    StreamVersion,
};
use anyhow::Context;
use futures::StreamExt;

use crate::cli::{ReadAllArgs, ReadArgs};
use crate::commands::Env;
use crate::keys::Reading;
use crate::output::{note, EventPrinter};
use crate::{AnyStore, Outcome};

pub(crate) async fn read(env: Env<'_>, args: ReadArgs) -> anyhow::Result<Outcome> {
    let filter = StreamFilter {
        event_types: args.event_type,
        since: args.since,
    };
    // The store applies the limit only when nothing is filtered here.
    let store_limit = if filter.is_empty() { args.limit } else { None };
    let options = ReadStream {
        from: args.from,
        direction: if args.backward {
            Direction::Backward
        } else {
            Direction::Forward
        },
        limit: store_limit,
        until_version: None,
        as_of: args.as_of.or(args.until),
    };
    let (store, reading) = env.open_reading(&args.upcast).await?;
    let out = env.out;
    let mut printer = EventPrinter::new(args.json);
    let mut remaining = args.limit;
    // The next version to read when following.
    let mut next = options.from.unwrap_or(StreamVersion(1));
    let mut events = store.read_stream(&args.stream, options);
    loop {
        while let Some(e) = events.next().await {
            if remaining == Some(0) {
                break;
            }
            let e = reading.apply(e?).await?;
            next = StreamVersion(e.stream_version.0 + 1);
            if filter.admits(&e) {
                printer.print(out, &e)?;
                remaining = remaining.map(|n| n - 1);
            }
        }
        if !args.follow.follow || remaining == Some(0) {
            break;
        }
        printer.flush(out)?;
        tokio::time::sleep(args.follow.poll_interval).await;
        events = store.read_stream(&args.stream, ReadStream::forward().from(next));
    }
    if printer.finish(out)? == 0 && !args.json && !args.follow.follow {
        note(&format!("no events in stream {}", args.stream));
    }
    Ok(Outcome::Success)
}

/// What `read` filters in code.
struct StreamFilter {
    event_types: Vec<String>,
    since: Option<chrono::DateTime<chrono::Utc>>,
}

impl StreamFilter {
    fn is_empty(&self) -> bool {
        self.event_types.is_empty() && self.since.is_none()
    }

    fn admits(&self, e: &RecordedEvent) -> bool {
        (self.event_types.is_empty() || self.event_types.contains(&e.event_type))
            && self.since.is_none_or(|t| e.recorded_at >= t)
    }
}

pub(crate) async fn read_all(env: Env<'_>, args: ReadAllArgs) -> anyhow::Result<Outcome> {
    for c in &args.category {
        validate_category(c).context("invalid --category")?;
    }
    let options = ReadAll {
        after: args.from.unwrap_or(GlobalPosition::START),
        limit: args.limit,
        categories: args.category,
        event_types: args.event_type,
        since: args.since,
        until: args.until,
    };
    let (store, reading) = env.open_reading(&args.upcast).await?;
    let out = env.out;
    let mut printer = EventPrinter::new(args.json);
    if args.follow.follow {
        follow_all(
            &store,
            &reading,
            options,
            &mut printer,
            out,
            args.follow.poll_interval,
        )
        .await?;
    } else {
        let mut events = store.read_all(options);
        while let Some(e) = events.next().await {
            let e = reading.apply(e?).await?;
            printer.print(out, &e)?;
        }
    }
    if printer.finish(out)? == 0 && !args.json && !args.follow.follow {
        note("no events");
    }
    Ok(Outcome::Success)
}

/// Prints the events of `options` and then the new ones as they arrive,
/// until `options.limit` events were printed (or for ever).
async fn follow_all(
    store: &AnyStore,
    reading: &Reading,
    mut options: ReadAll,
    printer: &mut EventPrinter,
    out: &mut (dyn std::io::Write + Send),
    poll: Duration,
) -> anyhow::Result<()> {
    loop {
        // Read before the look: everything at or below it is committed and
        // readable, so the look sees every one of those events it admits.
        let head = store.head_position().await?;
        let mut events = store.read_all(options.clone());
        while let Some(e) = events.next().await {
            let e = reading.apply(e?).await?;
            options.after = e.global_position;
            options.limit = options.limit.map(|n| n - 1);
            printer.print(out, &e)?;
        }
        if options.limit == Some(0) {
            return Ok(());
        }
        if let Some(head) = head {
            options.after = options.after.max(head);
        }
        printer.flush(out)?;
        tokio::time::sleep(poll).await;
    }
}
