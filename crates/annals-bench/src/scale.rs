//! `--scale N` (docs/benchmarks.md, "Cost as the store grows"): W1, W2 and
//! W4 on a store of N events against the same workloads on the default
//! store of B (100,000) events, both measured in the same run.
//!
//! Both stores are built the same way, so the only difference is the
//! number of events already in the store: load B or N events in W3's shape
//! (accounts `w3-…` with L events each), written M accounts per atomic
//! `append_many` as W3m writes them (the fastest bulk path the bench
//! measures: one commit per M·L events), then W1 and W2 on their own
//! new accounts, then W4 over everything. Both stores are loaded first;
//! then each workload runs on the small store and on the large one back to
//! back, so that what else the machine does at that moment (a shared
//! machine's load, the page cache) weighs on both alike: measured one store
//! after the other, the ratios swung by a factor of three between runs.
//!
//! Peak resident memory of W4 is measured in-process on Linux: just before
//! W4, writing `5` to `/proc/self/clear_refs` resets the kernel's
//! high-water mark `VmHWM` to the current `VmRSS`; right after W4, `VmHWM`
//! of `/proc/self/status` is the peak of the whole process during W4: the async runtime, the store's threads and
//! connections (SQLite's page caches included) and the replay's own map.
//! Elsewhere, or when the reset is refused, the figures are `null`.

use std::path::Path;
use std::time::Instant;

use annals::{
    encode_event, EventStore, ExpectedVersion, MultiStreamAppend, NewEvent, SnapshotStore,
    StorageSize, StreamBatch, StreamId,
};
use anyhow::{ensure, Context};
use serde_json::{json, Value};

use crate::workload::{self, account_id, owner, pattern_event, Sizes, Throughput, W1, W2};

/// What one store (small or large) measured.
#[derive(Clone, Debug, Default)]
pub struct Side {
    /// Events loaded in W3's shape.
    pub load: Throughput,
    /// The store's own bytes right after the load (`storage_size`).
    pub store_bytes: u64,
    /// W1 after the load.
    pub w1: W1,
    /// W2 after the load.
    pub w2: W2,
    /// W4 over the whole store.
    pub w4: Throughput,
    /// Resident memory just before W4, bytes.
    pub rss_before_w4: Option<u64>,
    /// Peak resident memory during W4, bytes.
    pub w4_peak_rss: Option<u64>,
}

/// Checks `--scale N` against the sizes: N must be a whole number of W3
/// streams and larger than the small store.
pub fn check(n: u64, sz: &Sizes) -> anyhow::Result<()> {
    ensure!(
        sz.bulk_stream_len > 0,
        "--bulk-stream-len must be at least 1"
    );
    ensure!(
        n % sz.bulk_stream_len == 0,
        "--scale {n} is not a multiple of --bulk-stream-len {} (events per account)",
        sz.bulk_stream_len
    );
    ensure!(
        n > sz.bulk_events,
        "--scale {n} must be larger than the small store's --bulk-events {}",
        sz.bulk_events
    );
    Ok(())
}

/// The value of a `kB` field (`VmRSS`, `VmHWM`) of a `/proc/<pid>/status`
/// text, in bytes.
pub fn status_bytes(status: &str, field: &str) -> Option<u64> {
    status.lines().find_map(|l| {
        let rest = l.strip_prefix(field)?.strip_prefix(':')?;
        let mut parts = rest.split_whitespace();
        let kib: u64 = parts.next()?.parse().ok()?;
        (parts.next() == Some("kB")).then_some(kib * 1024)
    })
}

fn own_status(field: &str) -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    status_bytes(&status, field)
}

/// Resets the process's peak resident memory (`VmHWM`) to its current
/// resident memory; false where that is not possible.
fn reset_peak_rss() -> bool {
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}

/// Loads `sz.bulk_events` events in W3's shape (accounts `w3-…` of L
/// events, new streams), M accounts per `append_many`; prints a progress
/// line to standard error every million events.
pub async fn load<S: MultiStreamAppend>(store: &S, sz: &Sizes) -> anyhow::Result<Throughput> {
    let accounts = sz.bulk_events / sz.bulk_stream_len;
    let per = sz.multi_streams.max(1);
    let t = Instant::now();
    let mut events = 0u64;
    let mut first = 1;
    while first <= accounts {
        let last = (first + per - 1).min(accounts);
        let mut batches = Vec::with_capacity((last - first + 1) as usize);
        for i in first..=last {
            let o = owner("w3", i);
            let new: Vec<NewEvent> = (1..=sz.bulk_stream_len)
                .map(|k| {
                    let (t, version, data) = encode_event(&pattern_event(&o, k))?;
                    Ok(NewEvent::new(t, data).with_event_version(version))
                })
                .collect::<annals::Result<_>>()?;
            batches.push(StreamBatch::new(
                StreamId::parse(&format!("Account-{}", account_id(&o)))?,
                ExpectedVersion::NoStream,
                new,
            ));
        }
        let before = events;
        let results = store.append_many(batches).await?;
        ensure!(
            results.len() as u64 == last - first + 1
                && results
                    .iter()
                    .all(|r| r.last_version.get() == sz.bulk_stream_len),
            "load: append_many answered {results:?} for accounts w3-{first:06}..w3-{last:06}"
        );
        events += (last - first + 1) * sz.bulk_stream_len;
        if events / 1_000_000 > before / 1_000_000 {
            let secs = t.elapsed().as_secs_f64();
            eprintln!(
                "scale: loaded {events} of {} events in {secs:.1} s ({:.0} events/s)",
                sz.bulk_events,
                events as f64 / secs.max(1e-9)
            );
        }
        first = last + 1;
    }
    Ok(Throughput {
        events,
        seconds: t.elapsed().as_secs_f64(),
    })
}

/// A loaded store with what its load measured, waiting for the workloads.
pub struct Loaded<S> {
    store: S,
    sizes: Sizes,
    load: Throughput,
    store_bytes: u64,
}

/// Loads `sz.bulk_events` events in W3's shape and reads the store's size.
pub async fn prepare<S, Z, ZFut>(store: S, sz: &Sizes, size: Z) -> anyhow::Result<Loaded<S>>
where
    S: EventStore + SnapshotStore + MultiStreamAppend,
    Z: FnOnce() -> ZFut,
    ZFut: std::future::Future<Output = annals::Result<StorageSize>>,
{
    let load = load(&store, sz).await.context("loading the store")?;
    let store_bytes = size()
        .await
        .context("reading the store's size")?
        .store_bytes;
    Ok(Loaded {
        store,
        sizes: sz.clone(),
        load,
        store_bytes,
    })
}

/// Runs W1, W2 and W4 on both loaded stores, each workload on the small
/// store and then on the large one, back to back, so that whatever else
/// the machine is doing at that moment weighs on both alike.
/// `analyze(i)` runs (untimed) on store `i` (0 small, 1 large) before W1
/// and again before W4.
pub async fn measure<S, F, Fut>(stores: [&Loaded<S>; 2], analyze: F) -> anyhow::Result<[Side; 2]>
where
    S: EventStore + SnapshotStore + MultiStreamAppend,
    F: Fn(usize) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<()>>,
{
    let mut sides: [Side; 2] = Default::default();
    for (i, l) in stores.iter().enumerate() {
        sides[i].load = l.load.clone();
        sides[i].store_bytes = l.store_bytes;
        analyze(i).await?;
    }
    for (i, l) in stores.iter().enumerate() {
        sides[i].w1 = workload::w1(&l.store, &l.sizes).await.context("W1")?;
    }
    for (i, l) in stores.iter().enumerate() {
        sides[i].w2 = workload::w2(&l.store, &l.sizes).await.context("W2")?;
    }
    for (i, l) in stores.iter().enumerate() {
        analyze(i).await?;
        sides[i].rss_before_w4 = own_status("VmRSS");
        let reset = reset_peak_rss();
        sides[i].w4 = workload::w4(&l.store, &l.sizes).await.context("W4")?;
        sides[i].w4_peak_rss = if reset { own_status("VmHWM") } else { None };
    }
    Ok(sides)
}

fn round(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

/// `a / b` rounded to three places; `null` when `b` is not positive.
fn ratio(a: f64, b: f64) -> Value {
    if b > 0.0 && a.is_finite() {
        json!(round(a / b))
    } else {
        Value::Null
    }
}

fn side_json(s: &Side) -> Value {
    json!({
        "events_loaded": s.load.events,
        "load_seconds": round(s.load.seconds),
        "load_events_per_sec": round(s.load.events_per_sec()),
        "store_bytes": s.store_bytes,
        "w1_commands_per_sec": round(s.w1.commands_per_sec()),
        "w1_command_latency": s.w1.latency.to_json(),
        "w2_no_snapshot": s.w2.no_snapshot.to_json(),
        "w2_snapshot": s.w2.snapshot.to_json(),
        "w4_events": s.w4.events,
        "w4_events_per_sec": round(s.w4.events_per_sec()),
        "w4_rss_before_bytes": s.rss_before_w4,
        "w4_peak_rss_bytes": s.w4_peak_rss,
    })
}

/// The `scale` object: ratios are "higher is better, 1.0 = as fast as on
/// the small store": throughput(large) / throughput(small) for W1 and W4,
/// median_ms(small) / median_ms(large) for the W2 loads.
pub fn report(n: u64, small: &Side, large: &Side) -> Value {
    let per_event = if large.load.events > 0 {
        json!(round(large.store_bytes as f64 / large.load.events as f64))
    } else {
        Value::Null
    };
    json!({
        "n": n,
        "small_n": small.load.events,
        "load_events_per_sec": round(large.load.events_per_sec()),
        "db_bytes_per_event": per_event,
        "w1_ratio_to_small": ratio(large.w1.commands_per_sec(), small.w1.commands_per_sec()),
        "w2_replay_ratio_to_small": ratio(small.w2.no_snapshot.median(), large.w2.no_snapshot.median()),
        "w2_snapshot_ratio_to_small": ratio(small.w2.snapshot.median(), large.w2.snapshot.median()),
        "w4_ratio_to_small": ratio(large.w4.events_per_sec(), small.w4.events_per_sec()),
        "w4_peak_rss_bytes_small": small.w4_peak_rss,
        "w4_peak_rss_bytes_large": large.w4_peak_rss,
        "small": side_json(small),
        "large": side_json(large),
    })
}

/// The sizes of the large store: the defaults with N events loaded.
pub fn large_sizes(n: u64, sz: &Sizes) -> Sizes {
    Sizes {
        bulk_events: n,
        ..sz.clone()
    }
}

fn remove_sqlite_files(dir: &Path, id: &str) -> anyhow::Result<()> {
    for suffix in ["", "-wal", "-shm"] {
        let file = dir.join(format!("annals-scale-{id}.db{suffix}"));
        if file.exists() {
            std::fs::remove_file(&file).with_context(|| format!("removing {}", file.display()))?;
        }
    }
    Ok(())
}

/// Both sides on SQLite, each on a new file in `dir` removed afterwards.
pub async fn sqlite(dir: &Path, n: u64, sz: &Sizes) -> anyhow::Result<(Side, Side)> {
    let ids = [0, 1].map(|_| uuid::Uuid::now_v7().simple().to_string());
    let run = async {
        let mut loaded = Vec::with_capacity(2);
        for (id, sizes) in ids.iter().zip([sz.clone(), large_sizes(n, sz)]) {
            let path = dir.join(format!("annals-scale-{id}.db"));
            let store = annals_sqlite::SqliteEventStore::open(&path).await?;
            let size_of = store.clone();
            loaded.push(
                prepare(
                    store,
                    &sizes,
                    || async move { size_of.storage_size().await },
                )
                .await?,
            );
        }
        measure([&loaded[0], &loaded[1]], |_| async { Ok(()) }).await
    };
    let sides = run.await;
    for id in &ids {
        remove_sqlite_files(dir, id)?;
    }
    let [small, large] = sides?;
    Ok((small, large))
}

/// Both sides on PostgreSQL, each in a new schema dropped afterwards.
pub async fn postgres(url: &str, n: u64, sz: &Sizes) -> anyhow::Result<(Side, Side)> {
    let schemas = [0, 1].map(|_| format!("annals_scale_{}", uuid::Uuid::now_v7().simple()));
    let run = async {
        let mut loaded = Vec::with_capacity(2);
        for (schema, sizes) in schemas.iter().zip([sz.clone(), large_sizes(n, sz)]) {
            let store = annals_postgres::PgEventStore::connect_with(
                url,
                annals_postgres::PgOptions {
                    schema: Some(schema.clone()),
                    batch_size: sizes.feed_page as usize,
                    ..Default::default()
                },
            )
            .await?;
            store.migrate().await?;
            let size_of = store.clone();
            loaded.push(
                prepare(
                    store,
                    &sizes,
                    || async move { size_of.storage_size().await },
                )
                .await?,
            );
        }
        // As in the standard run: analyze (untimed) so that the planner
        // sees the loaded table, after the load and before W4.
        measure([&loaded[0], &loaded[1]], |i| {
            crate::raw_pg::analyze(url, &schemas[i])
        })
        .await
    };
    let sides = run.await;
    for schema in &schemas {
        crate::raw_pg::drop_schema(url, schema).await?;
    }
    let [small, large] = sides?;
    Ok((small, large))
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::workload::Latencies;

    fn sizes() -> Sizes {
        Sizes {
            accounts: 1000,
            deposits: 10,
            long_stream: 10_000,
            loads: 20,
            snapshot_interval: 100,
            bulk_events: 100_000,
            bulk_stream_len: 100,
            multi_streams: 10,
            feed_page: 1000,
        }
    }

    fn side(events: u64, load_s: f64, w1_s: f64, w2_ms: u64, w4_s: f64, rss: u64) -> Side {
        Side {
            load: Throughput {
                events,
                seconds: load_s,
            },
            store_bytes: events * 200,
            w1: W1 {
                commands: 10_000,
                seconds: w1_s,
                latency: Latencies(vec![Duration::from_millis(1)]),
                open_per_sec: 1.0,
            },
            w2: W2 {
                setup_seconds: 1.0,
                snapshot_version: 10_000,
                no_snapshot: Latencies(vec![Duration::from_millis(w2_ms); 3]),
                snapshot: Latencies(vec![Duration::from_millis(w2_ms / 10); 3]),
            },
            w4: Throughput {
                events: events + 21_000,
                seconds: w4_s,
            },
            rss_before_w4: Some(rss / 2),
            w4_peak_rss: Some(rss),
        }
    }

    #[test]
    fn scale_must_be_a_whole_number_of_streams_above_the_small_store() {
        let sz = sizes();
        assert!(check(1_000_000, &sz).is_ok());
        let e = check(1_000_050, &sz)
            .expect_err("not whole streams")
            .to_string();
        assert!(e.contains("not a multiple of --bulk-stream-len 100"), "{e}");
        let e = check(100_000, &sz).expect_err("not larger").to_string();
        assert!(e.contains("larger than the small store"), "{e}");
        assert_eq!(large_sizes(1_000_000, &sz).bulk_events, 1_000_000);
        assert_eq!(large_sizes(1_000_000, &sz).accounts, 1000);
    }

    #[test]
    fn status_fields_are_read_in_bytes() {
        let status = "Name:\tannals-bench\nVmHWM:\t  204800 kB\nVmRSS:\t  102400 kB\n";
        assert_eq!(status_bytes(status, "VmRSS"), Some(100 * 1024 * 1024));
        assert_eq!(status_bytes(status, "VmHWM"), Some(200 * 1024 * 1024));
        assert_eq!(status_bytes(status, "VmSwap"), None);
        assert_eq!(status_bytes("VmRSS:\tlots kB\n", "VmRSS"), None);
        // The live process has both fields on Linux.
        if cfg!(target_os = "linux") {
            assert!(own_status("VmRSS").is_some_and(|b| b > 0));
        }
    }

    #[test]
    fn report_gives_large_over_small_higher_is_better() {
        // Large: W1 takes twice as long, W2 loads 4/5 as fast, W4 the same
        // rate over ten times the events.
        let small = side(100_000, 1.0, 10.0, 10, 0.121, 50_000_000);
        let large = side(1_000_000, 8.0, 20.0, 20, 1.021, 60_000_000);
        let r = report(1_000_000, &small, &large);
        assert_eq!(r["n"], 1_000_000);
        assert_eq!(r["small_n"], 100_000);
        assert_eq!(r["load_events_per_sec"], 125_000.0);
        assert_eq!(r["db_bytes_per_event"], 200.0);
        assert_eq!(r["w1_ratio_to_small"], 0.5);
        assert_eq!(r["w2_replay_ratio_to_small"], 0.5);
        assert_eq!(r["w2_snapshot_ratio_to_small"], 0.5);
        assert_eq!(r["w4_ratio_to_small"], 1.0);
        assert_eq!(r["w4_peak_rss_bytes_small"], 50_000_000);
        assert_eq!(r["w4_peak_rss_bytes_large"], 60_000_000);
        assert_eq!(r["large"]["w4_rss_before_bytes"], 30_000_000);
        let unmeasured = Side {
            w4_peak_rss: None,
            ..Side::default()
        };
        let r = report(0, &unmeasured, &unmeasured);
        assert_eq!(r["w1_ratio_to_small"], Value::Null);
        assert_eq!(r["db_bytes_per_event"], Value::Null);
        assert_eq!(r["w4_peak_rss_bytes_large"], Value::Null);
    }
}
