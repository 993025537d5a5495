use annals::{
    EventId, GlobalPosition, Metadata, Payload, Plan, RecordedEvent, StreamId, StreamVersion,
};
use serde_json::json;

/// The bench's plan (`crates/annals-bench/src/upcast.rs`).
const PLAN: &str = include_str!("../../src/bench-plan.toml");

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let n: u64 = match std::env::args().nth(1) {
        Some(n) => n.parse()?,
        None => 10_000,
    };
    let upcasters = Plan::parse("bench-plan.toml", PLAN)?.build_without_types()?;
    let stream = StreamId::parse("Account-1")?;
    let mut events = Vec::with_capacity(n as usize);
    for k in 1..=n {
        // The stream pattern: Opened, then nine deposits to a withdrawal.
        let (event_type, data) = if k % 50 == 1 {
            ("Opened", json!({ "name": "owner-1" }))
        } else if (k - 1) % 10 == 0 {
            ("Withdrawn", json!({ "amount": "0.50" }))
        } else {
            ("Deposited", json!({ "amount": "1.00" }))
        };
        events.push(RecordedEvent {
            event_id: EventId::new(),
            stream_id: stream.clone(),
            stream_version: StreamVersion(k),
            global_position: GlobalPosition::from_seq(k),
            event_type: event_type.to_owned(),
            event_version: 1,
            data: Payload::from_value(&data)?,
            metadata: Metadata::default(),
            recorded_at: chrono::Utc::now(),
            stored_event_version: None,
            stored_event_type: None,
        });
    }
    let mut check = 0u64;
    if std::env::args().nth(2).as_deref() == Some("--no-upcast") {
        println!("{n} events made");
        return Ok(());
    }
    for e in events {
        let e = upcasters.apply(e)?;
        check += e.event_version as u64;
    }
    println!("{n} events upcast, versions sum {check}");
    Ok(())
}
