//! The workload definition (ids, stream pattern, sizes, result shapes) and
//! the Annals side of it, generic over any backend.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use annals::bank::{Account, AccountEvent};
use annals::{
    decode_event, CommandContext, EventStore, GlobalPosition, Repository, SnapshotConfig,
    SnapshotStore, Subscription, SubscriptionOptions,
};
use anyhow::{bail, ensure};
use serde_json::{json, Value};
use uuid::Uuid;

pub use crate::shapes::{fold_balance, pattern_event};

/// Workload sizes (the defaults of `docs/benchmarks.md`).
#[derive(clap::Args, Clone, Debug)]
pub struct Sizes {
    /// W1 accounts.
    #[arg(long, default_value_t = 1000)]
    pub accounts: u64,
    /// W1 deposit rounds.
    #[arg(long, default_value_t = 10)]
    pub deposits: u64,
    /// W2 stream length.
    #[arg(long, default_value_t = 10_000)]
    pub long_stream: u64,
    /// W2 timed loads.
    #[arg(long, default_value_t = 20)]
    pub loads: usize,
    /// W2 save size and snapshot interval.
    #[arg(long, default_value_t = 100)]
    pub snapshot_interval: u64,
    /// W3 events.
    #[arg(long, default_value_t = 100_000)]
    pub bulk_events: u64,
    /// W3 events per stream (and per commit).
    #[arg(long, default_value_t = 100)]
    pub bulk_stream_len: u64,
    /// W3m streams per atomic write (`append_many`).
    #[arg(long, default_value_t = 10)]
    pub multi_streams: u64,
    /// W4 page size.
    #[arg(long, default_value_t = 1000)]
    pub feed_page: u64,
}

impl Sizes {
    /// The `sizes` object of the result line.
    pub fn to_json(&self) -> Value {
        json!({
            "accounts": self.accounts, "deposits": self.deposits, "long_stream": self.long_stream,
            "loads": self.loads, "snapshot_interval": self.snapshot_interval,
            "bulk_events": self.bulk_events, "bulk_stream_len": self.bulk_stream_len,
            "multi_streams": self.multi_streams, "feed_page": self.feed_page,
        })
    }

    /// Expected totals after W1-W3: (events, accounts, sum of balances).
    pub fn expected_totals(&self) -> (u64, u64, i64) {
        let streams = self.bulk_events / self.bulk_stream_len;
        let events =
            self.accounts * (1 + self.deposits) + self.long_stream + streams * self.bulk_stream_len;
        let accounts = self.accounts + 1 + streams;
        let sum = (self.accounts * self.deposits * 100) as i64
            + pattern_balance(self.long_stream)
            + streams as i64 * pattern_balance(self.bulk_stream_len);
        (events, accounts, sum)
    }
}

/// Owner of account `i` of workload `w`.
pub fn owner(w: &str, i: u64) -> String {
    format!("{w}-{i:06}")
}

/// The aggregate id of an owner: UUIDv5(NAMESPACE_URL, "peers-bench:" + owner).
pub fn account_id(owner: &str) -> String {
    Uuid::new_v5(
        &Uuid::NAMESPACE_URL,
        format!("peers-bench:{owner}").as_bytes(),
    )
    .to_string()
}

/// Balance after a pattern stream of length `len`.
pub fn pattern_balance(len: u64) -> i64 {
    let n = len.saturating_sub(1) as i64;
    100 * (n - n / 10) - 50 * (n / 10)
}

/// Latency samples.
#[derive(Clone, Debug, Default)]
pub struct Latencies(pub Vec<Duration>);

impl Latencies {
    fn sorted_ms(&self) -> Vec<f64> {
        let mut v: Vec<f64> = self.0.iter().map(|d| d.as_secs_f64() * 1000.0).collect();
        v.sort_by(|a, b| a.total_cmp(b));
        v
    }
    fn pct(v: &[f64], p: f64) -> f64 {
        if v.is_empty() {
            return 0.0;
        }
        let i = ((v.len() as f64 - 1.0) * p).round() as usize;
        v[i.min(v.len() - 1)]
    }
    /// Median in ms.
    pub fn median(&self) -> f64 {
        Self::pct(&self.sorted_ms(), 0.5)
    }
    /// Summary object.
    pub fn to_json(&self) -> Value {
        let v = self.sorted_ms();
        let r = |x: f64| (x * 10_000.0).round() / 10_000.0;
        json!({
            "median_ms": r(Self::pct(&v, 0.5)), "min_ms": r(v.first().copied().unwrap_or(0.0)),
            "p90_ms": r(Self::pct(&v, 0.9)), "p99_ms": r(Self::pct(&v, 0.99)),
            "max_ms": r(v.last().copied().unwrap_or(0.0)), "n": v.len(),
        })
    }
}

/// W1 figures.
#[derive(Clone, Debug, Default)]
pub struct W1 {
    /// Commands run.
    pub commands: u64,
    /// Deposit phase duration.
    pub seconds: f64,
    /// Per-command latencies.
    pub latency: Latencies,
    /// Open phase throughput.
    pub open_per_sec: f64,
}

impl W1 {
    /// Headline throughput.
    pub fn commands_per_sec(&self) -> f64 {
        self.commands as f64 / self.seconds.max(1e-9)
    }
}

/// W2 figures.
#[derive(Clone, Debug, Default)]
pub struct W2 {
    /// Setup duration.
    pub setup_seconds: f64,
    /// Newest snapshot's version.
    pub snapshot_version: u64,
    /// Full replay loads.
    pub no_snapshot: Latencies,
    /// Snapshot loads.
    pub snapshot: Latencies,
}

/// W3 / W4 figures.
#[derive(Clone, Debug, Default)]
pub struct Throughput {
    /// Events.
    pub events: u64,
    /// Duration.
    pub seconds: f64,
}

impl Throughput {
    /// Events per second.
    pub fn events_per_sec(&self) -> f64 {
        self.events as f64 / self.seconds.max(1e-9)
    }
}

/// All figures of one run.
#[derive(Clone, Debug, Default)]
pub struct Results {
    /// W1.
    pub w1: W1,
    /// W2.
    pub w2: W2,
    /// W3.
    pub w3: Throughput,
    /// W3 events per commit.
    pub w3_per_commit: u64,
    /// W4.
    pub w4: Throughput,
    /// W4 page.
    pub w4_page: u64,
    /// W5 (concurrent commands, on a store of its own); `None` when skipped.
    pub w5: Option<crate::w5::W5>,
    /// Export and import rates (on the main store after W4); `None` when
    /// skipped.
    pub transfer: Option<crate::transfer::Transfer>,
    /// W4 through upcasters (on a v1 copy of W4's data set); `None` when
    /// skipped.
    pub upcast: Option<crate::upcast::UpcastCost>,
    /// The `account_balances` rebuild and the append-to-handled delay;
    /// `None` when skipped.
    pub projection: Option<crate::projection::ProjectionFigures>,
    /// W1 with personal-data encryption; `None` when skipped.
    pub gdpr: Option<crate::gdpr::GdprCost>,
}

fn round(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

impl Results {
    /// `w1` object.
    pub fn w1_json(&self) -> Value {
        json!({
            "commands_per_sec": round(self.w1.commands_per_sec()), "commands": self.w1.commands,
            "seconds": round(self.w1.seconds), "command_latency": self.w1.latency.to_json(),
            "open_per_sec": round(self.w1.open_per_sec),
        })
    }
    /// `w2` object.
    pub fn w2_json(&self) -> Value {
        json!({
            "setup_seconds": round(self.w2.setup_seconds), "snapshot_version": self.w2.snapshot_version,
            "no_snapshot": self.w2.no_snapshot.to_json(), "snapshot": self.w2.snapshot.to_json(),
        })
    }
    /// `w3` object.
    pub fn w3_json(&self) -> Value {
        json!({
            "events_per_sec": round(self.w3.events_per_sec()), "events": self.w3.events,
            "seconds": round(self.w3.seconds), "events_per_commit": self.w3_per_commit,
        })
    }
    /// `w4` object.
    pub fn w4_json(&self) -> Value {
        json!({
            "events_per_sec": round(self.w4.events_per_sec()), "events": self.w4.events,
            "seconds": round(self.w4.seconds), "page": self.w4_page,
        })
    }
}

/// Machine facts for the result line.
pub fn machine() -> Value {
    let nproc = std::thread::available_parallelism().map_or(0, |n| n.get());
    let mem_gib = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| {
                    l.split_whitespace()
                        .nth(1)
                        .and_then(|k| k.parse::<f64>().ok())
                })
        })
        .map_or(0.0, |kib| (kib / 1024.0 / 1024.0 * 10.0).round() / 10.0);
    json!({ "nproc": nproc, "mem_gib": mem_gib, "os": std::env::consts::OS, "arch": std::env::consts::ARCH })
}

/// Runs W1-W4 through the public Annals API on `store`. `before_replay`
/// runs (untimed) between W3 and W4.
pub async fn run<S, F, Fut>(store: S, sz: &Sizes, before_replay: F) -> anyhow::Result<Results>
where
    S: EventStore + SnapshotStore,
    F: FnOnce() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<()>>,
{
    let w1 = w1(&store, sz).await?;
    let w2 = w2(&store, sz).await?;
    let w3 = w3(&store, sz).await?;
    before_replay().await?;
    let w4 = w4(&store, sz).await?;
    Ok(Results {
        w1,
        w2,
        w3,
        w3_per_commit: sz.bulk_stream_len,
        w4,
        w4_page: sz.feed_page,
        w5: None,
        transfer: None,
        upcast: None,
        projection: None,
        gdpr: None,
    })
}

/// W1: no snapshots, no cache; every command loads from the store.
pub async fn w1<S: EventStore>(store: &S, sz: &Sizes) -> anyhow::Result<W1> {
    let ctx = CommandContext::new();
    let repo = Repository::<Account, _>::new(store.clone());
    let ids: Vec<(String, String)> = (1..=sz.accounts)
        .map(|i| {
            let o = owner("w1", i);
            (account_id(&o), o)
        })
        .collect();
    let t = Instant::now();
    for (id, o) in &ids {
        repo.create(id, &ctx, |a| a.open(o)).await?;
    }
    let open_per_sec = sz.accounts as f64 / t.elapsed().as_secs_f64().max(1e-9);
    let mut lat = Vec::with_capacity((sz.accounts * sz.deposits) as usize);
    let t = Instant::now();
    for _ in 0..sz.deposits {
        for (id, _) in &ids {
            let c = Instant::now();
            repo.execute(id, &ctx, |a| a.deposit(100)).await?;
            lat.push(c.elapsed());
        }
    }
    Ok(W1 {
        commands: sz.accounts * sz.deposits,
        seconds: t.elapsed().as_secs_f64(),
        latency: Latencies(lat),
        open_per_sec,
    })
}

/// W2: one long stream written in saves of I events, snapshot every I;
/// timed loads with and without the snapshot.
pub async fn w2<S: EventStore + SnapshotStore>(store: &S, sz: &Sizes) -> anyhow::Result<W2> {
    let ctx = CommandContext::new();
    let mut res = W2::default();
    let o = owner("w2", 1);
    let id = account_id(&o);
    let snap_repo = Repository::<Account, _>::new(store.clone())
        .with_snapshots(store.clone(), SnapshotConfig::every(sz.snapshot_interval));
    let t = Instant::now();
    let mut k = 1;
    while k <= sz.long_stream {
        let end = (k + sz.snapshot_interval - 1).min(sz.long_stream);
        let batch: Vec<AccountEvent> = (k..=end).map(|j| pattern_event(&o, j)).collect();
        if k == 1 {
            snap_repo
                .create(&id, &ctx, |_| Ok::<_, std::convert::Infallible>(batch))
                .await?;
        } else {
            snap_repo
                .execute(&id, &ctx, move |_| {
                    Ok::<_, std::convert::Infallible>(batch.clone())
                })
                .await?;
        }
        k = end + 1;
    }
    res.setup_seconds = t.elapsed().as_secs_f64();
    let want = pattern_balance(sz.long_stream);
    let mut no_snap = Vec::new();
    for i in 0..=sz.loads {
        let c = Instant::now();
        let l = snap_repo.load_without_snapshot(&id).await?;
        let d = c.elapsed();
        ensure!(
            l.version.map(|v| v.get()) == Some(sz.long_stream) && l.state.balance == want,
            "W2 full replay returned a wrong state"
        );
        if i > 0 {
            no_snap.push(d);
        }
    }
    let mut with_snap = Vec::new();
    for i in 0..=sz.loads {
        let c = Instant::now();
        let l = snap_repo.load(&id).await?;
        let d = c.elapsed();
        ensure!(
            l.version.map(|v| v.get()) == Some(sz.long_stream) && l.state.balance == want,
            "W2 snapshot load returned a wrong state"
        );
        if l.report.snapshot_version.is_none() {
            bail!("W2 snapshot load did not use a snapshot: {:?}", l.report);
        }
        res.snapshot_version = l.report.snapshot_version.map_or(0, |v| v.get());
        if i > 0 {
            with_snap.push(d);
        }
    }
    res.no_snapshot = Latencies(no_snap);
    res.snapshot = Latencies(with_snap);
    Ok(res)
}

/// W3: one atomic append of L events per account (accounts `w3-…`), B/L
/// accounts.
pub async fn w3<S: EventStore>(store: &S, sz: &Sizes) -> anyhow::Result<Throughput> {
    let ctx = CommandContext::new();
    let repo = Repository::<Account, _>::new(store.clone());
    let streams = sz.bulk_events / sz.bulk_stream_len;
    let t = Instant::now();
    for i in 1..=streams {
        let o = owner("w3", i);
        let batch: Vec<AccountEvent> = (1..=sz.bulk_stream_len)
            .map(|k| pattern_event(&o, k))
            .collect();
        repo.create(&account_id(&o), &ctx, |_| {
            Ok::<_, std::convert::Infallible>(batch)
        })
        .await?;
    }
    Ok(Throughput {
        events: streams * sz.bulk_stream_len,
        seconds: t.elapsed().as_secs_f64(),
    })
}

/// W4: the whole feed through a catch-up [`Subscription`] in pages of
/// `feed_page` events, each after the last position of the one before (the
/// subscription reads up to two pages ahead while this one is folded),
/// decoded into typed events, folded into a map of account to balance, then
/// verified against the sizes.
pub async fn w4<S: EventStore>(store: &S, sz: &Sizes) -> anyhow::Result<Throughput> {
    let t = Instant::now();
    let mut balances: HashMap<String, i64> = HashMap::new();
    let mut events = 0u64;
    if let Some(head) = store.head_position().await? {
        let options = SubscriptionOptions::default().batch_size(sz.feed_page as usize);
        let mut feed = Subscription::new(store.clone(), GlobalPosition::START, options);
        loop {
            let batch = feed.next_batch().await?;
            events += batch.events.len() as u64;
            for e in &batch.events {
                let b = balances.entry(e.stream_id.id().to_owned()).or_default();
                let ev: AccountEvent = decode_event(e)?;
                fold_balance(b, &ev);
            }
            if batch.position >= head {
                break;
            }
        }
    }
    let w4 = Throughput {
        events,
        seconds: t.elapsed().as_secs_f64(),
    };
    verify(sz, events, balances.len() as u64, balances.values().sum())?;
    Ok(w4)
}

/// Checks the W4 totals against the sizes.
pub fn verify(sz: &Sizes, events: u64, accounts: u64, sum: i64) -> anyhow::Result<()> {
    let (e, a, s) = sz.expected_totals();
    ensure!((events, accounts, sum) == (e, a, s), "W4 verification failed: got events={events} accounts={accounts} sum={sum}, expected {e} {a} {s}");
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Small sizes for the unit tests of the bench's own code.
    pub(crate) fn small() -> Sizes {
        Sizes {
            accounts: 5,
            deposits: 2,
            long_stream: 30,
            loads: 1,
            snapshot_interval: 10,
            bulk_events: 40,
            bulk_stream_len: 20,
            multi_streams: 2,
            feed_page: 7,
        }
    }

    #[test]
    fn ids_and_pattern_match_the_workload() {
        assert_eq!(
            account_id("w1-000001"),
            "e7911dac-bd58-5359-86cc-f0ea51c73b85"
        );
        assert_eq!(pattern_balance(100), 8_550);
        assert_eq!(pattern_balance(10_000), 850_050);
        let sz = Sizes {
            accounts: 1000,
            deposits: 10,
            long_stream: 10_000,
            loads: 20,
            snapshot_interval: 100,
            bulk_events: 100_000,
            bulk_stream_len: 100,
            multi_streams: 10,
            feed_page: 1000,
        };
        assert_eq!(sz.expected_totals(), (121_000, 2_001, 10_400_050));
    }
}
