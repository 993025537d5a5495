//! Snapshots that can always be repaired (issue 7, item 4): a snapshot ahead
//! of its stream's head is replaced, writes report what they did, the
//! history size is a setting of the store, rollback makes an older snapshot
//! live and stays rolled back, live snapshots can be verified, and the
//! listings page through any number of aggregates.

use annals::bank::Account;
use annals::{
    CommandContext, Error, EventStore, ExpectedVersion, JobOptions, NewEvent, Progress, Repository,
    Snapshot, SnapshotAdmin, SnapshotConfig, SnapshotJobs, SnapshotSkip, SnapshotStaging,
    SnapshotWrite, StreamCatalog, StreamId, StreamVersion, DEFAULT_BATCH_SIZE,
};
use chrono::Utc;
use futures::TryStreamExt;
use serde_json::json;

fn v(n: u64) -> StreamVersion {
    StreamVersion(n)
}

fn quiet(_: Progress) {}

/// An `Account` snapshot of `id` at `version` whose state is `balance`.
fn account_snap(id: &str, version: u64, schema: u32, balance: i64) -> Snapshot {
    Snapshot {
        aggregate_type: "Account".into(),
        aggregate_id: id.into(),
        version: v(version),
        schema_version: schema,
        state: json!({"owner": id, "balance": balance, "open": true}),
        created_at: Utc::now(),
    }
}

/// Opens account `id` and deposits 1 `deposits` times: head `1 + deposits`.
async fn account<S: EventStore + SnapshotAdmin>(store: &S, id: &str, deposits: usize) {
    let repo = Repository::<Account, _>::new(store.clone());
    let ctx = CommandContext::new();
    repo.execute(id, &ctx, |a| a.open(id)).await.expect("open");
    for _ in 0..deposits {
        repo.execute(id, &ctx, |a| a.deposit(1))
            .await
            .expect("deposit");
    }
}

async fn live_version<S: EventStore + SnapshotAdmin>(store: &S, id: &str) -> Option<StreamVersion> {
    store
        .load_snapshot("Account", id)
        .await
        .expect("load")
        .map(|s| s.version)
}

/// A snapshot ahead of its stream's head (events restored from an older
/// backup) is listed as ahead, and the next policy write, `create` or
/// `prepopulate` replaces it, so loads stop replaying the whole stream.
pub async fn snapshot_ahead_of_head_is_replaced<S: EventStore + SnapshotAdmin>(store: S) {
    let repo = Repository::<Account, _>::new(store.clone())
        .with_snapshots(store.clone(), SnapshotConfig::every(3));
    let ctx = CommandContext::new();
    for id in ["ah1", "ah2", "ah3"] {
        account(&store, id, 1).await; // head 2
        store
            .save_snapshot(&account_snap(id, 50, 1, 999))
            .await
            .expect("save an ahead snapshot");
    }
    let loaded = repo.load("ah1").await.expect("load");
    assert_eq!(
        loaded.report.skipped,
        Some(SnapshotSkip::AheadOfHead {
            snapshot: v(50),
            head: Some(v(2))
        })
    );

    // Listed as ahead, with the whole stream to replay.
    let stale = store
        .stale_snapshots(Some("Account"), 0)
        .await
        .expect("stale");
    let listed: Vec<_> = store
        .list_stale_snapshots(Some("Account"), 0)
        .try_collect()
        .await
        .expect("list stale");
    for rows in [&stale, &listed] {
        let ah1 = rows
            .iter()
            .find(|s| s.aggregate_id == "ah1")
            .expect("ah1 is stale");
        assert!(ah1.ahead, "{ah1:?}");
        assert_eq!(
            (ah1.head, ah1.snapshot_version, ah1.events_behind),
            (v(2), Some(v(50)), 2)
        );
    }

    // The policy's next write replaces it (the guarded write used to keep
    // the higher version for ever).
    repo.execute("ah1", &ctx, |a| a.deposit(1))
        .await
        .expect("deposit");
    let loaded = repo.load("ah1").await.expect("load");
    assert_eq!(loaded.report.snapshot_version, Some(v(3)), "{loaded:?}");
    assert_eq!(loaded.report.events_replayed, 0);
    assert_eq!(loaded.state.balance, 2);
    let history = store
        .snapshot_history("Account", "ah1")
        .await
        .expect("history");
    assert_eq!(
        history.iter().map(|e| e.version).collect::<Vec<_>>(),
        [v(3)],
        "the ahead row is gone"
    );

    // `create` replaces one too.
    let jobs = SnapshotJobs::<Account, _>::new(store.clone());
    let created = jobs.create("ah2").await.expect("create").expect("exists");
    assert_eq!(created.write, SnapshotWrite::Written);
    assert_eq!(
        jobs.blocker(&created.snapshot).await.expect("blocker"),
        None
    );
    assert_eq!(live_version(&store, "ah2").await, Some(v(2)));

    // And so does prepopulate, which finds it through the stale listing.
    let report = jobs
        .prepopulate(JobOptions::default(), &quiet)
        .await
        .expect("prepopulate");
    assert_eq!((report.written, report.superseded), (1, 0), "{report:?}");
    assert_eq!(live_version(&store, "ah3").await, Some(v(2)));
    assert!(store
        .list_stale_snapshots(Some("Account"), 0)
        .try_collect::<Vec<_>>()
        .await
        .expect("list stale")
        .is_empty());
}

/// `create` and `prepopulate` say when the guarded write stored nothing, and
/// which row kept it out.
pub async fn snapshot_writes_report_what_happened<S: EventStore + SnapshotAdmin>(store: S) {
    account(&store, "w1", 2).await; // head 3
    account(&store, "w2", 2).await;
    // Newer code wrote schema version 2 snapshots; this code (schema 1)
    // cannot replace them.
    for id in ["w1", "w2"] {
        store
            .save_snapshot(&account_snap(id, 1, 2, 0))
            .await
            .expect("save");
    }
    let jobs = SnapshotJobs::<Account, _>::new(store.clone());
    let created = jobs.create("w1").await.expect("create").expect("exists");
    assert_eq!(created.write, SnapshotWrite::Superseded);
    assert_eq!(created.snapshot.version, v(3));
    let blocker = jobs
        .blocker(&created.snapshot)
        .await
        .expect("blocker")
        .expect("the blocking row");
    assert_eq!((blocker.version, blocker.schema_version), (v(1), 2));
    assert!(blocker.live);

    let report = jobs
        .prepopulate(JobOptions::default(), &quiet)
        .await
        .expect("prepopulate");
    assert_eq!(
        (
            report.examined,
            report.written,
            report.superseded,
            report.failures.len()
        ),
        (2, 0, 2, 0),
        "{report:?}"
    );
    assert_eq!(report.events_replayed, 6);
}

/// The number of snapshots kept per aggregate is recorded in the store:
/// every write trims to it, and changing it trims at once.
pub async fn snapshot_history_size_is_a_store_setting<S: EventStore + SnapshotAdmin>(store: S) {
    assert_eq!(store.snapshot_history_size().await.expect("size"), 1);
    assert!(matches!(
        store.set_snapshot_history_size(0).await,
        Err(Error::Config(_))
    ));
    assert_eq!(store.set_snapshot_history_size(3).await.expect("set"), 0);
    assert_eq!(store.snapshot_history_size().await.expect("size"), 3);
    account(&store, "k1", 9).await; // head 10
    for version in [2, 4, 6, 8, 10] {
        store
            .save_snapshot(&account_snap("k1", version, 1, version as i64 - 1))
            .await
            .expect("save");
    }
    let history = store
        .snapshot_history("Account", "k1")
        .await
        .expect("history");
    let rows: Vec<(StreamVersion, bool)> = history.iter().map(|e| (e.version, e.live)).collect();
    assert_eq!(rows, [(v(10), true), (v(8), false), (v(6), false)]);
    assert!(history.iter().all(|e| e.rolled_back_at.is_none()));
    // Lowering it trims every aggregate now, the live snapshot kept.
    assert_eq!(store.set_snapshot_history_size(1).await.expect("set"), 2);
    let history = store
        .snapshot_history("Account", "k1")
        .await
        .expect("history");
    assert_eq!(history.len(), 1);
    assert_eq!((history[0].version, history[0].live), (v(10), true));
    assert!(store
        .snapshot_history("Account", "nobody")
        .await
        .expect("history")
        .is_empty());
}

/// Rollback makes an older snapshot live; the newer ones stay, marked rolled
/// back, and a stale or retried write of them does not undo the rollback,
/// while a genuinely newer snapshot becomes live.
pub async fn snapshot_rollback_sticks<S: EventStore + SnapshotAdmin>(store: S) {
    store.set_snapshot_history_size(3).await.expect("set");
    let repo = Repository::<Account, _>::new(store.clone())
        .with_snapshots(store.clone(), SnapshotConfig::every(3));
    let ctx = CommandContext::new();
    repo.execute("rb", &ctx, |a| a.open("rb"))
        .await
        .expect("open");
    for _ in 0..8 {
        repo.execute("rb", &ctx, |a| a.deposit(1))
            .await
            .expect("deposit");
    } // head 9, snapshots at 3, 6, 9
    let kept: Vec<StreamVersion> = store
        .snapshot_history("Account", "rb")
        .await
        .expect("history")
        .iter()
        .map(|e| e.version)
        .collect();
    assert_eq!(kept, [v(9), v(6), v(3)]);

    let err = store
        .rollback_snapshot("Account", "rb", v(5))
        .await
        .expect_err("no snapshot at 5");
    assert!(
        matches!(&err, Error::Snapshot(m) if m.contains("rb") && m.contains("9, 6, 3")),
        "{err}"
    );

    let report = store
        .rollback_snapshot("Account", "rb", v(3))
        .await
        .expect("rollback");
    assert_eq!((report.live.version, report.rolled_back), (v(3), 2));
    assert!(report.live.live);
    let loaded = repo.load("rb").await.expect("load");
    assert_eq!(loaded.report.snapshot_version, Some(v(3)));
    assert_eq!(loaded.report.events_replayed, 6);
    assert_eq!(loaded.state.balance, 8);
    let history = store
        .snapshot_history("Account", "rb")
        .await
        .expect("history");
    let rows: Vec<(StreamVersion, bool, bool)> = history
        .iter()
        .map(|e| (e.version, e.live, e.rolled_back_at.is_some()))
        .collect();
    assert_eq!(
        rows,
        [
            (v(9), false, true),
            (v(6), false, true),
            (v(3), true, false)
        ]
    );

    // A stale or retried write of a rolled-back version is refused.
    let again = repo.load_at_version("rb", v(9)).await.expect("load at");
    let again = annals::make_snapshot(
        &StreamId::new("Account", "rb").expect("id"),
        &again.state,
        v(9),
    )
    .expect("snapshot");
    assert_eq!(
        store.save_snapshot(&again).await.expect("save"),
        SnapshotWrite::Superseded
    );
    let jobs = SnapshotJobs::<Account, _>::new(store.clone());
    let created = jobs.create("rb").await.expect("create").expect("exists");
    assert_eq!(created.write, SnapshotWrite::Superseded);
    let blocker = jobs
        .blocker(&created.snapshot)
        .await
        .expect("blocker")
        .expect("blocked by the rolled-back row");
    assert_eq!(blocker.version, v(9));
    assert!(blocker.rolled_back_at.is_some());
    assert_eq!(live_version(&store, "rb").await, Some(v(3)));

    // Events after the rollback: the policy's snapshot at 12 is newer.
    for _ in 0..3 {
        repo.execute("rb", &ctx, |a| a.deposit(1))
            .await
            .expect("deposit");
    }
    assert_eq!(live_version(&store, "rb").await, Some(v(12)));
    let rows: Vec<(StreamVersion, bool, bool)> = store
        .snapshot_history("Account", "rb")
        .await
        .expect("history")
        .iter()
        .map(|e| (e.version, e.live, e.rolled_back_at.is_some()))
        .collect();
    // Trimmed to 3: the rolled-back rows go first.
    assert_eq!(
        rows,
        [
            (v(12), true, false),
            (v(9), false, true),
            (v(3), false, false)
        ]
    );

    // Rolling back to a rolled-back row makes it live again.
    let forward = store
        .rollback_snapshot("Account", "rb", v(9))
        .await
        .expect("roll forward");
    assert_eq!((forward.live.version, forward.rolled_back), (v(9), 1));
    assert_eq!(live_version(&store, "rb").await, Some(v(9)));
    let loaded = repo.load("rb").await.expect("load");
    assert_eq!(
        (loaded.state.balance, loaded.report.events_replayed),
        (11, 3)
    );
}

/// `verify_live` folds aggregates and compares with their live snapshot:
/// a snapshot that loads but holds the wrong state is found.
pub async fn verify_live_finds_wrong_states<S>(store: S)
where
    S: EventStore + StreamCatalog + SnapshotAdmin + SnapshotStaging,
{
    for i in 0..5 {
        account(&store, &format!("vl{i}"), i + 1).await;
    }
    let jobs = SnapshotJobs::<Account, _>::new(store.clone());
    jobs.prepopulate(JobOptions::default(), &quiet)
        .await
        .expect("prepopulate");
    let clean = jobs.verify_live(None, &quiet).await.expect("verify");
    assert_eq!((clean.live, clean.checked), (5, 5));
    assert!(clean.mismatches.is_empty(), "{:?}", clean.mismatches);

    // A wrong state at the right version: loads use it without complaint.
    store
        .save_snapshot(&account_snap("vl2", 4, 1, 1_000_000))
        .await
        .expect("overwrite");
    let loaded = Repository::<Account, _>::new(store.clone())
        .with_snapshots(store.clone(), SnapshotConfig::every(1000))
        .load("vl2")
        .await
        .expect("load");
    assert_eq!(loaded.report.snapshot_version, Some(v(4)));
    assert_eq!(loaded.state.balance, 1_000_000);
    let report = jobs.verify_live(None, &quiet).await.expect("verify");
    assert_eq!(report.checked, 5);
    assert_eq!(report.mismatches.len(), 1, "{:?}", report.mismatches);
    let m = &report.mismatches[0];
    assert_eq!((m.aggregate_id.as_str(), m.version), ("vl2", v(4)));
    assert!(m.reason.contains("1000000"), "{}", m.reason);

    let sampled = jobs.verify_live(Some(2), &quiet).await.expect("verify");
    assert_eq!((sampled.live, sampled.checked), (5, 2));
    // Staged verification does not look at the live table.
    assert_eq!(jobs.verify(None, &quiet).await.expect("verify").checked, 0);
}

/// Aggregates in the paging test: more than a page of every listing.
const MANY: usize = DEFAULT_BATCH_SIZE + 20;

/// `stale`, `prepopulate`, `migrate` and `verify` page through more
/// aggregates than a page (keyset pagination), each aggregate once.
pub async fn snapshot_listings_page_through_many_aggregates<S>(store: S)
where
    S: EventStore + StreamCatalog + SnapshotAdmin + SnapshotStaging,
{
    let ids: Vec<String> = (0..MANY).map(|i| format!("pg{i:04}")).collect();
    for id in &ids {
        store
            .append(
                &StreamId::new("Account", id).expect("id"),
                ExpectedVersion::NoStream,
                vec![
                    NewEvent::new("Opened", json!({"owner": id})),
                    NewEvent::new("Deposited", json!({"amount": 1})),
                ],
            )
            .await
            .expect("append");
    }
    // Every 50th is up to date, every other one of the rest is one event
    // behind, the others have no snapshot.
    let kind = |i: usize| match i % 50 {
        0 => Some(2),
        k if k % 2 == 0 => Some(1),
        _ => None,
    };
    for (i, id) in ids.iter().enumerate() {
        if let Some(version) = kind(i) {
            store
                .save_snapshot(&account_snap(id, version, 1, version as i64 - 1))
                .await
                .expect("save");
        }
    }
    let up_to_date = (0..MANY).filter(|&i| kind(i) == Some(2)).count();
    let with_snapshot = (0..MANY).filter(|&i| kind(i).is_some()).count();
    let stale: Vec<String> = store
        .list_stale_snapshots(Some("Account"), 0)
        .map_ok(|s| s.aggregate_id)
        .try_collect()
        .await
        .expect("list stale");
    assert_eq!(stale.len(), MANY - up_to_date);
    assert!(stale.len() > DEFAULT_BATCH_SIZE);
    assert!(stale.windows(2).all(|w| w[0] < w[1]), "in id order, once");
    let everything: Vec<String> = store
        .list_stale_snapshots(None, 0)
        .map_ok(|s| s.aggregate_id)
        .try_collect()
        .await
        .expect("list stale");
    assert_eq!(everything, stale);
    let behind_two = store
        .list_stale_snapshots(Some("Account"), 1)
        .try_fold(0usize, |n, s| {
            assert_eq!((s.events_behind, s.snapshot_version), (2, None));
            futures::future::ready(Ok(n + 1))
        })
        .await
        .expect("list stale");
    assert_eq!(behind_two, MANY - with_snapshot);

    let live: Vec<String> = store
        .live_snapshots("Account")
        .map_ok(|s| s.aggregate_id)
        .try_collect()
        .await
        .expect("live");
    assert_eq!(live.len(), with_snapshot);
    assert!(live.windows(2).all(|w| w[0] < w[1]));

    // Migrate stages everything, a rerun skips everything (the staged
    // listing merged with the stream listing across pages).
    let jobs = SnapshotJobs::<Account, _>::new(store.clone());
    let first = jobs
        .migrate(
            JobOptions {
                min_events: 0,
                concurrency: 8,
            },
            &quiet,
        )
        .await
        .expect("migrate");
    assert_eq!((first.examined, first.written), (MANY as u64, MANY as u64));
    let rerun = jobs
        .migrate(JobOptions::default(), &quiet)
        .await
        .expect("rerun");
    assert_eq!(
        (rerun.examined, rerun.skipped, rerun.written),
        (MANY as u64, MANY as u64, 0)
    );
    let verify = jobs.verify(Some(7), &quiet).await.expect("verify");
    assert_eq!((verify.staged, verify.checked), (MANY as u64, 7));
    assert!(verify.mismatches.is_empty(), "{:?}", verify.mismatches);

    // The ones without a snapshot (more than 1 event behind).
    let report = jobs
        .prepopulate(
            JobOptions {
                min_events: 1,
                concurrency: 8,
            },
            &quiet,
        )
        .await
        .expect("prepopulate");
    assert_eq!(report.written, (MANY - with_snapshot) as u64);
    let live = jobs.verify_live(None, &quiet).await.expect("verify live");
    assert_eq!((live.live, live.checked), (MANY as u64, MANY as u64));
    assert!(live.mismatches.is_empty(), "{:?}", live.mismatches);
}
