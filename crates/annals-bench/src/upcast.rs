//! The cost of upcasting on read (`docs/benchmarks.md`, "Upcasting and
//! encryption"): W4's data set stored as an older version of the
//! application wrote it, every event two steps behind the current version,
//! replayed as W4 through a chain of Rust upcasters and through the
//! equivalent plan file, each as a ratio to W4 without upcasters on the
//! main store, measured just before them.

use std::sync::Arc;

use annals::{BoxError, EventStore, ExpectedVersion, NewEvent, Plan, Step, StreamId, Upcasters};
use serde_json::{json, Value};

use crate::workload::{account_id, owner, Sizes, Throughput};

/// The plan equivalent to [`rust_chain`], as an operator would write it.
pub const PLAN: &str = include_str!("bench-plan.toml");

/// A decimal string in major units (`"1.00"`) as integer minor units.
fn minor_units(v: &Value) -> Result<Value, BoxError> {
    let s = v.as_str().ok_or("amount is not a string")?;
    let (major, minor) = s.split_once('.').unwrap_or((s, ""));
    let minor = format!("{minor:0<2}");
    if minor.len() > 2 {
        return Err(format!("amount {s} has more than two decimals").into());
    }
    let cents = major.parse::<i64>()? * 100 + minor.parse::<i64>()?;
    Ok(json!(cents))
}

/// Two steps on every stored type: `Opened` v1 `{name}` → v2 `{holder}` →
/// v3 `{owner}`; `Deposited` v1 `{amount: "1.00"}` → v2 `{amount_minor}` →
/// v3 `{amount}`; `Withdrawn` v1 → `Withdrew` v2 `{amount_minor}` → v3
/// `{amount}`. The end of each chain is `AccountEvent`'s shape.
pub fn rust_chain() -> anyhow::Result<Upcasters> {
    Ok(Upcasters::builder()
        .step(Step::new("Opened", 1, |v: Value| {
            Ok::<_, BoxError>(json!({ "holder": v["name"] }))
        }))
        .step(Step::new("Opened", 2, |v: Value| {
            Ok::<_, BoxError>(json!({ "owner": v["holder"] }))
        }))
        .step(Step::new("Deposited", 1, |v: Value| {
            Ok::<_, BoxError>(json!({ "amount_minor": minor_units(&v["amount"])? }))
        }))
        .step(Step::new("Deposited", 2, |v: Value| {
            Ok::<_, BoxError>(json!({ "amount": v["amount_minor"] }))
        }))
        .step(
            Step::new("Withdrawn", 1, |v: Value| {
                Ok::<_, BoxError>(json!({ "amount_minor": minor_units(&v["amount"])? }))
            })
            .rename_to("Withdrew"),
        )
        .step(Step::new("Withdrew", 2, |v: Value| {
            Ok::<_, BoxError>(json!({ "amount": v["amount_minor"] }))
        }))
        .build_without_types()?)
}

/// The plan, compiled.
pub fn plan_chain() -> anyhow::Result<Upcasters> {
    Ok(Plan::parse("bench-plan.toml", PLAN)?.build_without_types()?)
}

/// Event `k` (1-based) of the stream pattern as stored at v1.
fn v1_pattern_event(owner: &str, k: u64) -> NewEvent {
    let (event_type, data) = if k == 1 {
        ("Opened", json!({ "name": owner }))
    } else if (k - 1) % 10 == 0 {
        ("Withdrawn", json!({ "amount": "0.50" }))
    } else {
        ("Deposited", json!({ "amount": "1.00" }))
    };
    NewEvent::new(event_type, data).with_event_version(1)
}

fn stream(owner: &str) -> anyhow::Result<StreamId> {
    Ok(StreamId::parse(&format!("Account-{}", account_id(owner)))?)
}

/// Writes W4's data set (untimed) as v1 events: W1's accounts (opened, then
/// D deposits of 100), W2's long stream and W3's streams in the stream
/// pattern, one append per stream (W2's in saves of I events).
pub async fn load_v1<S: EventStore>(store: &S, sz: &Sizes) -> anyhow::Result<u64> {
    let mut written = 0;
    for i in 1..=sz.accounts {
        let o = owner("w1", i);
        let mut events = vec![NewEvent::new("Opened", json!({ "name": o })).with_event_version(1)];
        for _ in 0..sz.deposits {
            events.push(
                NewEvent::new("Deposited", json!({ "amount": "1.00" })).with_event_version(1),
            );
        }
        written += events.len() as u64;
        store
            .append(&stream(&o)?, ExpectedVersion::NoStream, events)
            .await?;
    }
    let o = owner("w2", 1);
    let long = stream(&o)?;
    let mut k = 1;
    while k <= sz.long_stream {
        let end = (k + sz.snapshot_interval - 1).min(sz.long_stream);
        let events: Vec<NewEvent> = (k..=end).map(|j| v1_pattern_event(&o, j)).collect();
        written += events.len() as u64;
        store.append(&long, ExpectedVersion::Any, events).await?;
        k = end + 1;
    }
    for i in 1..=sz.bulk_events / sz.bulk_stream_len {
        let o = owner("w3", i);
        let events: Vec<NewEvent> = (1..=sz.bulk_stream_len)
            .map(|k| v1_pattern_event(&o, k))
            .collect();
        written += events.len() as u64;
        store
            .append(&stream(&o)?, ExpectedVersion::NoStream, events)
            .await?;
    }
    Ok(written)
}

/// Rounds of each run in [`run`]: a W4 pass is about 0.1 s, and one pass
/// of each, minutes apart from nothing, moved the ratios by a factor of two
/// between runs on this machine; the medians of interleaved rounds do not.
pub const ROUNDS: usize = 5;

/// What the upcasting runs measured: the median round of each.
#[derive(Clone, Debug, Default)]
pub struct UpcastCost {
    /// W4 on the main store without upcasters.
    pub plain: Throughput,
    /// W4 on the v1 store through the Rust chain.
    pub rust: Throughput,
    /// W4 on the v1 store through the plan.
    pub plan: Throughput,
}

/// Measures W4 on `main` (no upcasters), then on `v1` (loaded with
/// [`load_v1`]) through [`rust_chain`] and through [`plan_chain`], in
/// [`ROUNDS`] rounds of the three, and keeps each one's median round;
/// `with` gives a handle of `v1` that reads through the upcasters. Each
/// pass is verified as W4 is.
pub async fn run<S, V>(
    main: &S,
    v1: &V,
    with: impl Fn(&V, Arc<Upcasters>) -> V,
    sz: &Sizes,
) -> anyhow::Result<UpcastCost>
where
    S: EventStore,
    V: EventStore,
{
    let rust_store = with(v1, Arc::new(rust_chain()?));
    let plan_store = with(v1, Arc::new(plan_chain()?));
    let (mut plain, mut rust, mut plan) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..ROUNDS {
        plain.push(crate::workload::w4(main, sz).await?);
        rust.push(crate::workload::w4(&rust_store, sz).await?);
        plan.push(crate::workload::w4(&plan_store, sz).await?);
    }
    Ok(UpcastCost {
        plain: median(plain),
        rust: median(rust),
        plan: median(plan),
    })
}

/// The median of `runs` by rate (the upper one of an even count).
fn median(mut runs: Vec<Throughput>) -> Throughput {
    runs.sort_by(|a, b| a.events_per_sec().total_cmp(&b.events_per_sec()));
    runs.get(runs.len() / 2).cloned().unwrap_or_default()
}

fn round(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

fn ratio(a: f64, b: f64) -> Value {
    if b > 0.0 {
        json!(round(a / b))
    } else {
        Value::Null
    }
}

impl UpcastCost {
    /// The `upcast` object of the result line.
    pub fn to_json(&self) -> Value {
        let plain = self.plain.events_per_sec();
        json!({
            "steps_per_event": 2,
            "events": self.plain.events,
            "rounds": ROUNDS,
            "w4_plain_events_per_sec": round(plain),
            "w4_rust_events_per_sec": round(self.rust.events_per_sec()),
            "w4_plan_events_per_sec": round(self.plan.events_per_sec()),
            "rust_ratio_to_w4": ratio(self.rust.events_per_sec(), plain),
            "plan_ratio_to_w4": ratio(self.plan.events_per_sec(), plain),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The chain and the plan turn every v1 event into the same current
    /// payload, which decodes as `AccountEvent`.
    #[tokio::test]
    async fn the_chain_and_the_plan_agree_and_decode() {
        let store = annals::InMemoryStore::new();
        let sz = crate::workload::tests::small();
        let written = load_v1(&store, &sz).await.expect("load");
        assert_eq!(written, sz.expected_totals().0);
        for ups in [rust_chain().expect("chain"), plan_chain().expect("plan")] {
            let w4 = crate::workload::w4(&store.clone().with_upcasters(Arc::new(ups)), &sz)
                .await
                .expect("W4 through the upcasters verifies");
            assert_eq!(w4.events, written);
        }
        assert_eq!(minor_units(&json!("12.5")).expect("ok"), json!(1250));
        assert!(minor_units(&json!("1.234")).is_err());
    }
}
