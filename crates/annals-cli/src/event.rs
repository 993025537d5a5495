//! `annals event ID|POSITION`: one event with its metadata, the events it
//! caused, and the rest of its correlation as a tree.
//!
//! The event is found by id (`EventStore::read_event`) or by position (a
//! `read_all` of one event from just below it). The events it caused and the
//! events of its correlation come from `StreamCatalog::read_caused_by` and
//! `read_correlated`, which read the metadata indexes (SQLite migration 6,
//! PostgreSQL migration 5); at most `--limit` of each are read, so a
//! correlation of millions of events (one id for a whole batch job) costs
//! `--limit` rows.
//!
//! The tree links each event of the correlation to the event its
//! `causation_id` names when that event is in the correlation too (and
//! among those read); the others are roots. It is printed depth first,
//! children in global order, without recursion (a causal chain can be as
//! long as the correlation), and `--json` gives the same order flat, with
//! each event's depth and parent.

use std::collections::HashMap;
use std::io::Write;

use annals::{EventId, EventStore, GlobalPosition, ReadAll, RecordedEvent, StreamCatalog};
use anyhow::Context;
use futures::TryStreamExt;
use serde::Serialize;
use uuid::Uuid;

use crate::cli::{EventArgs, EventRef};
use crate::commands::Env;
use crate::output::{json_line, timestamp, Table};
use crate::{AnyStore, Outcome};

pub(crate) async fn run(env: Env<'_>, args: EventArgs) -> anyhow::Result<Outcome> {
    let (store, reading) = env.open_reading(&args.upcast).await?;
    let Some(event) = find(&store, args.event).await? else {
        return Ok(Outcome::CheckFailed(match args.event {
            EventRef::Id(id) => format!("no event with id {id}"),
            EventRef::Position(p) => format!("no event at position {p}"),
        }));
    };
    let event = reading.apply(event).await?;
    let limit = usize::try_from(args.limit).unwrap_or(usize::MAX);
    let ask = args.limit.saturating_add(1);
    let mut caused: Vec<RecordedEvent> = store
        .read_caused_by(event.event_id.0, Some(ask))
        .and_then(|e| reading.apply(e))
        .try_collect()
        .await
        .context("cannot read the events it caused")?;
    let caused_truncated = caused.len() > limit;
    caused.truncate(limit);
    let correlation = match event.metadata.correlation_id {
        None => None,
        Some(id) => {
            let mut events: Vec<RecordedEvent> = store
                .read_correlated(id, Some(ask))
                .and_then(|e| reading.apply(e))
                .try_collect()
                .await
                .context("cannot read its correlation")?;
            let truncated = events.len() > limit;
            events.truncate(limit);
            Some((id, events, truncated))
        }
    };
    let out = env.out;
    if args.json {
        let correlation = correlation.as_ref().map(|(id, events, truncated)| {
            let tree = tree(events);
            CorrelationView {
                correlation_id: *id,
                truncated: *truncated,
                events: tree
                    .iter()
                    .map(|n| NodeView {
                        depth: n.depth,
                        caused_by: n.parent.map(|p| events[p].event_id),
                        this: events[n.index].event_id == event.event_id,
                        event: &events[n.index],
                    })
                    .collect(),
            }
        });
        let view = EventView {
            event: &event,
            caused: &caused,
            caused_truncated,
            correlation,
        };
        json_line(out, &view)?;
        return Ok(Outcome::Success);
    }
    print_event(out, &event)?;
    writeln!(out)?;
    if caused.is_empty() {
        writeln!(out, "caused: no events")?;
    } else {
        let more = if caused_truncated {
            " (first shown; --limit)"
        } else {
            ""
        };
        writeln!(out, "caused: {} event(s){more}", caused.len())?;
        let mut t =
            Table::new(&["POSITION", "STREAM", "VERSION", "TYPE", "EVENT_ID"]).right_align(&[0, 2]);
        for e in &caused {
            t.push(
                out,
                vec![
                    e.global_position.to_string(),
                    e.stream_id.to_string(),
                    e.stream_version.to_string(),
                    e.event_type.clone(),
                    e.event_id.to_string(),
                ],
            )?;
        }
        t.finish(out)?;
    }
    writeln!(out)?;
    match &correlation {
        None => writeln!(out, "correlation: none (no correlation_id)")?,
        Some((id, events, truncated)) => {
            let more = if *truncated {
                format!(" (the first {}; --limit)", events.len())
            } else {
                String::new()
            };
            writeln!(out, "correlation {id}: {} event(s){more}", events.len())?;
            let mut found = false;
            for node in tree(events) {
                let e = &events[node.index];
                let this = e.event_id == event.event_id;
                found |= this;
                writeln!(
                    out,
                    "{}{}  {}@{}  {}  {}{}",
                    node.prefix,
                    e.global_position,
                    e.stream_id,
                    e.stream_version,
                    e.event_type,
                    e.event_id,
                    if this { "  <- this event" } else { "" }
                )?;
            }
            if !found {
                writeln!(out, "(this event is past the events shown)")?;
            }
        }
    }
    Ok(Outcome::Success)
}

/// The event an `EventRef` names, if stored (and, by position, readable on
/// the global order).
async fn find(store: &AnyStore, event: EventRef) -> anyhow::Result<Option<RecordedEvent>> {
    match event {
        EventRef::Id(id) => store
            .read_event(id)
            .await
            .with_context(|| format!("cannot read event {id}")),
        EventRef::Position(p) => {
            // Sequence numbers start at 1: (c, 0) is no event's position.
            let Some(below) = p.seq().checked_sub(1) else {
                return Ok(None);
            };
            // Nothing lies between (c, s - 1) and (c, s).
            let options = ReadAll::after(GlobalPosition::new(p.commit(), below)).limit(1);
            let first: Option<RecordedEvent> = store
                .read_all(options)
                .try_next()
                .await
                .with_context(|| format!("cannot read the event at position {p}"))?;
            Ok(first.filter(|e| e.global_position == p))
        }
    }
}

fn print_event(out: &mut dyn Write, e: &RecordedEvent) -> anyhow::Result<()> {
    let id = |u: Option<Uuid>| u.map_or("-".to_owned(), |u| u.to_string());
    writeln!(out, "event_id        {}", e.event_id)?;
    writeln!(out, "stream          {}", e.stream_id)?;
    writeln!(out, "version         {}", e.stream_version)?;
    writeln!(out, "position        {}", e.global_position)?;
    writeln!(out, "type            {}", e.event_type)?;
    writeln!(out, "event_version   {}", e.event_version)?;
    if let Some(stored) = e.stored_event_version {
        match &e.stored_event_type {
            Some(t) => writeln!(out, "stored_as       {t} v{stored} (upcasted)")?,
            None => writeln!(out, "stored_as       v{stored} (upcasted)")?,
        }
    }
    writeln!(out, "recorded_at     {}", timestamp(&e.recorded_at))?;
    writeln!(out, "correlation_id  {}", id(e.metadata.correlation_id))?;
    writeln!(out, "causation_id    {}", id(e.metadata.causation_id))?;
    let headers = &e.metadata.headers;
    if headers.is_empty() {
        writeln!(out, "headers         -")?;
    } else {
        writeln!(
            out,
            "headers         {}",
            serde_json::Value::Object(headers.clone())
        )?;
    }
    writeln!(out, "data")?;
    match e.data.to_value() {
        Ok(value) => serde_json::to_writer_pretty(&mut *out, &value)?,
        // The stored text as it is when it does not parse.
        Err(_) => write!(out, "{}", e.data)?,
    }
    writeln!(out)?;
    Ok(())
}

/// The depth to which the tree is drawn with lines; deeper events show
/// their depth as `[N]`.
const MAX_DRAWN_DEPTH: usize = 32;

/// One line of the tree: which event, how deep, under which, and the drawing
/// before it.
struct Node {
    index: usize,
    depth: usize,
    parent: Option<usize>,
    prefix: String,
}

/// The events (in global order) as a causal forest, depth first: an event
/// is the child of the event its `causation_id` names when that one is among
/// `events`, otherwise a root. Iterative, and every event appears once even
/// if corrupt metadata made a cycle (its first member read becomes a root).
fn tree(events: &[RecordedEvent]) -> Vec<Node> {
    let index: HashMap<EventId, usize> = events
        .iter()
        .enumerate()
        .map(|(i, e)| (e.event_id, i))
        .collect();
    let mut children: Vec<Vec<usize>> = vec![Vec::new(); events.len()];
    let mut parent: Vec<Option<usize>> = vec![None; events.len()];
    for (i, e) in events.iter().enumerate() {
        let cause = e
            .metadata
            .causation_id
            .and_then(|c| index.get(&EventId(c)).copied());
        if let Some(p) = cause.filter(|&p| p != i) {
            children[p].push(i);
            parent[i] = Some(p);
        }
    }
    let mut seen = vec![false; events.len()];
    let mut out = Vec::with_capacity(events.len());
    // Roots first (in order), then whatever a cycle kept from them.
    let starts: Vec<usize> = (0..events.len())
        .filter(|&i| parent[i].is_none())
        .chain(0..events.len())
        .collect();
    for start in starts {
        if seen[start] {
            continue;
        }
        // (event, depth, prefix of its line, prefix of its children's lines)
        let mut stack = vec![(start, 0usize, String::new(), String::new())];
        while let Some((i, depth, line, below)) = stack.pop() {
            if seen[i] {
                continue;
            }
            seen[i] = true;
            out.push(Node {
                index: i,
                depth,
                parent: if depth == 0 { None } else { parent[i] },
                prefix: line,
            });
            let kids: Vec<usize> = children[i].iter().copied().filter(|&k| !seen[k]).collect();
            // Pushed last to first, so the first child is drawn first.
            for (n, &k) in kids.iter().enumerate().rev() {
                let (line, next) = if depth + 1 < MAX_DRAWN_DEPTH {
                    let last = n + 1 == kids.len();
                    (
                        format!("{below}{}", if last { "└─ " } else { "├─ " }),
                        format!("{below}{}", if last { "   " } else { "│  " }),
                    )
                } else {
                    // Deeper lines say their depth instead of drawing it,
                    // so a line stays short however long the chain.
                    (format!("{below}[{}] ", depth + 1), below.clone())
                };
                stack.push((k, depth + 1, line, next));
            }
        }
    }
    out
}

/// `annals event --json`.
#[derive(Serialize)]
struct EventView<'a> {
    event: &'a RecordedEvent,
    /// The events whose causation_id is this event's id, in global order.
    caused: &'a [RecordedEvent],
    /// More than `--limit` caused events: the first ones are listed.
    caused_truncated: bool,
    /// `None` when the event has no correlation_id.
    correlation: Option<CorrelationView<'a>>,
}

#[derive(Serialize)]
struct CorrelationView<'a> {
    correlation_id: Uuid,
    /// More than `--limit` events: the first ones (in global order) are in
    /// the tree.
    truncated: bool,
    /// The tree, depth first.
    events: Vec<NodeView<'a>>,
}

#[derive(Serialize)]
struct NodeView<'a> {
    /// 0 for a root.
    depth: usize,
    /// The parent in the tree (the event this one's causation_id names).
    caused_by: Option<EventId>,
    /// Whether this is the event asked for.
    this: bool,
    event: &'a RecordedEvent,
}

#[cfg(test)]
mod tests {
    use super::*;
    use annals::{Metadata, Payload, StreamId, StreamVersion};

    fn event(n: u64, causation: Option<u64>) -> RecordedEvent {
        let id = |n: u64| Uuid::from_u128(u128::from(n));
        RecordedEvent {
            event_id: EventId(id(n)),
            stream_id: StreamId::parse("T-1").expect("stream"),
            stream_version: StreamVersion(n),
            global_position: GlobalPosition::from_seq(n),
            event_type: "E".into(),
            event_version: 1,
            data: Payload::from_value(&serde_json::json!({})).expect("payload"),
            metadata: Metadata {
                causation_id: causation.map(id),
                ..Metadata::default()
            },
            recorded_at: chrono::DateTime::UNIX_EPOCH,
            stored_event_version: None,
            stored_event_type: None,
        }
    }

    fn drawn(events: &[RecordedEvent]) -> Vec<String> {
        tree(events)
            .iter()
            .map(|n| format!("{}{}", n.prefix, events[n.index].global_position))
            .collect()
    }

    #[test]
    fn draws_a_forest_depth_first_in_global_order() {
        // 1 caused 2 and 4; 2 caused 3; 5 has a cause outside the set.
        let events = [
            event(1, None),
            event(2, Some(1)),
            event(3, Some(2)),
            event(4, Some(1)),
            event(5, Some(99)),
        ];
        assert_eq!(drawn(&events), ["1", "├─ 2", "│  └─ 3", "└─ 4", "5"]);
        let depths: Vec<usize> = tree(&events).iter().map(|n| n.depth).collect();
        assert_eq!(depths, [0, 1, 2, 1, 0]);
    }

    #[test]
    fn a_cycle_still_shows_every_event_once() {
        let events = [event(1, Some(2)), event(2, Some(1)), event(3, Some(3))];
        assert_eq!(drawn(&events), ["3", "1", "└─ 2"]);
    }

    #[test]
    fn a_long_chain_needs_no_recursion() {
        let events: Vec<RecordedEvent> = (1..=50_000)
            .map(|n| event(n, (n > 1).then(|| n - 1)))
            .collect();
        let nodes = tree(&events);
        assert_eq!(nodes.len(), 50_000);
        assert_eq!(nodes[49_999].depth, 49_999);
        assert_eq!(nodes[49_999].parent, Some(49_998));
        // Drawn to a depth, then labelled: lines stay short.
        assert!(nodes[49_999].prefix.ends_with("[49999] "));
        assert!(nodes.iter().all(|n| n.prefix.chars().count() < 120));
    }
}
