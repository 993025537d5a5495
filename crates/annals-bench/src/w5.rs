//! W5: concurrent commands. T tasks run W1's command (load the account by
//! full replay, `deposit(100)`, save the one event with the loaded version
//! as the expected version) until a fixed total of commands is done, in
//! three cases: (a) T = 8 and T = 64 on accounts of their own, (b) T = 64 on
//! a few hot accounts, where commands conflict and retry.
//!
//! W5 runs last (after W4 and W3m) on a fresh store of its own (so W1-W4
//! and W4's data set are unchanged), and the raw baselines
//! (`raw_sqlite::w5`, `raw_pg::w5`) run the same cases, in the same run,
//! with the same retry schedule.

use std::path::Path;
use std::time::{Duration, Instant};

use annals::bank::Account;
use annals::{CommandContext, EventStore, Repository, RetryPolicy};
use anyhow::{ensure, Context};
use serde_json::{json, Value};
use uuid::Uuid;

use crate::workload::{account_id, owner, Latencies, Results};

/// Commands each account of the distinct-account cases receives, as in W1
/// with its defaults (10 deposits per account): streams stay short, so a
/// command costs what a W1 command costs.
pub const COMMANDS_PER_DISTINCT_ACCOUNT: u64 = 10;

/// The retry schedule of both sides: the library's default delays (2 ms,
/// doubling, at most 200 ms, with jitter), with enough attempts that no
/// command of the hot case gives up (a command that did would end the run).
/// The delays grow with each retry while newcomers start at 2 ms, so an
/// unlucky command of the hot case can lose many times in a row (up to 44
/// attempts were seen on a loaded machine), which is why this is far above
/// the library's 8.
pub const RETRY: RetryPolicy = RetryPolicy {
    max_attempts: 100,
    base_delay: Duration::from_millis(2),
    max_delay: Duration::from_millis(200),
};

/// W5 options.
#[derive(clap::Args, Clone, Debug)]
pub struct W5Args {
    /// Skip W5 (concurrent commands).
    #[arg(long)]
    pub no_w5: bool,
    /// W5 commands per case (all tasks together).
    #[arg(long, default_value_t = 8000)]
    pub w5_commands: u64,
    /// W5 case (b): number of hot accounts shared by the 64 tasks.
    #[arg(long, default_value_t = 16)]
    pub w5_hot_accounts: u64,
    /// PostgreSQL: group commit on at most K connections at once
    /// (`PgOptions::group_commit`), for W1-W5 of the Annals store.
    #[arg(long, value_name = "K", value_parser = clap::value_parser!(u64).range(1..))]
    pub pg_group_commit: Option<u64>,
    /// PostgreSQL: the pool size of W5's Annals store (default: the largest
    /// number of tasks, 64).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    pub w5_pg_pool: Option<u64>,
    /// W5 on Annals: a follower tails `read_all` during each case and
    /// reports, per event, the delay from its `recorded_at` (set inside the
    /// appending transaction) to its delivery (`append_visible`).
    #[arg(long)]
    pub w5_follow: bool,
}

impl W5Args {
    /// The three cases, in the order they run.
    pub fn cases(&self) -> [Case; 3] {
        [
            Case {
                key: "a8",
                tasks: 8,
                hot_accounts: None,
            },
            Case {
                key: "a64",
                tasks: 64,
                hot_accounts: None,
            },
            Case {
                key: "b64",
                tasks: 64,
                hot_accounts: Some(self.w5_hot_accounts.max(1)),
            },
        ]
    }

    /// The plans of the three cases.
    pub fn plans(&self) -> Vec<Plan> {
        self.cases()
            .into_iter()
            .map(|c| Plan::new(c, self.w5_commands))
            .collect()
    }

    /// The largest number of tasks of any case (the PostgreSQL pool size).
    pub fn max_tasks(&self) -> u64 {
        self.cases().iter().map(|c| c.tasks).max().unwrap_or(1)
    }
}

/// One W5 case.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Case {
    /// Its key in the result line (`a8`, `a64`, `b64`).
    pub key: &'static str,
    /// Concurrent tasks (threads on the raw SQLite side).
    pub tasks: u64,
    /// `Some(h)`: every task works on the same `h` accounts; `None`: every
    /// task has accounts of its own.
    pub hot_accounts: Option<u64>,
}

/// Which command of which task goes to which account.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Plan {
    /// The case.
    pub case: Case,
    /// Commands of all tasks together.
    pub commands: u64,
    /// Accounts per task in the distinct case (unused when hot).
    per_task: u64,
}

impl Plan {
    /// The plan of `case` for `commands` commands in all.
    pub fn new(case: Case, commands: u64) -> Self {
        let tasks = case.tasks.max(1);
        let most = commands.div_ceil(tasks);
        Plan {
            case: Case { tasks, ..case },
            commands,
            per_task: most.div_ceil(COMMANDS_PER_DISTINCT_ACCOUNT).max(1),
        }
    }

    /// Accounts the case uses (numbered 0..accounts).
    pub fn accounts(&self) -> u64 {
        match self.case.hot_accounts {
            Some(h) => h,
            None => self.case.tasks * self.per_task,
        }
    }

    /// Commands task `task` runs: the total split as evenly as it goes.
    pub fn commands_of(&self, task: u64) -> u64 {
        let t = self.case.tasks;
        self.commands / t + u64::from(task < self.commands % t)
    }

    /// The account of command `k` (0-based) of task `task`. Distinct: task
    /// `t` owns accounts `t*m .. t*m + m` and takes them in turn. Hot: task
    /// `t` starts at account `t mod h` and moves one on with each command,
    /// so `T/h` tasks are on every hot account at any moment.
    pub fn account_of(&self, task: u64, k: u64) -> u64 {
        match self.case.hot_accounts {
            Some(h) => (task + k) % h,
            None => task * self.per_task + k % self.per_task,
        }
    }

    /// Owner name of account `index` (`w5a8-000001`, ...).
    pub fn owner(&self, index: u64) -> String {
        owner(&format!("w5{}", self.case.key), index + 1)
    }

    /// Aggregate ids of the case's accounts, by index.
    pub fn account_ids(&self) -> Vec<String> {
        (0..self.accounts())
            .map(|i| account_id(&self.owner(i)))
            .collect()
    }
}

/// The delay before retry `retry` (0-based) after a conflict: the schedule
/// of [`RETRY`], with the library's jitter (a half to the whole delay).
pub fn backoff(retry: u32) -> Duration {
    let exp = RETRY
        .base_delay
        .saturating_mul(1u32 << retry.min(16))
        .min(RETRY.max_delay);
    let jitter = (Uuid::now_v7().as_u128() as u64 % 1000) as f64 / 1000.0;
    exp.mul_f64(0.5 + jitter / 2.0)
}

/// What one task measured: per command, its latency (from the first load
/// to the successful commit, retries included) and the attempts it took.
#[derive(Clone, Debug, Default)]
pub struct TaskOutcome {
    /// Latency of each command.
    pub latencies: Vec<Duration>,
    /// Attempts of each command (1 = no conflict).
    pub attempts: Vec<u32>,
}

/// The figures of one case.
#[derive(Clone, Debug, Default)]
pub struct CaseResult {
    /// Tasks.
    pub tasks: u64,
    /// Accounts.
    pub accounts: u64,
    /// Commands run (all succeeded).
    pub commands: u64,
    /// Wall clock from the first command to the last commit.
    pub seconds: f64,
    /// Per-command latencies.
    pub latency: Latencies,
    /// Conflicting attempts (each one retried).
    pub conflicts: u64,
    /// Commands that needed at least one retry.
    pub retried_commands: u64,
    /// Most attempts one command took.
    pub max_attempts: u32,
    /// With `--w5-follow`: per event, `recorded_at` to delivery by a
    /// `read_all` follower.
    pub visible: Option<Latencies>,
}

impl CaseResult {
    /// Merges the tasks' outcomes.
    pub fn from_tasks(plan: &Plan, seconds: f64, tasks: Vec<TaskOutcome>) -> Self {
        let mut r = CaseResult {
            tasks: plan.case.tasks,
            accounts: plan.accounts(),
            seconds,
            ..Default::default()
        };
        for t in tasks {
            for a in t.attempts {
                r.commands += 1;
                r.conflicts += u64::from(a.saturating_sub(1));
                r.retried_commands += u64::from(a > 1);
                r.max_attempts = r.max_attempts.max(a);
            }
            r.latency.0.extend(t.latencies);
        }
        r
    }

    /// Throughput.
    pub fn commands_per_sec(&self) -> f64 {
        self.commands as f64 / self.seconds.max(1e-9)
    }

    /// The case's object in the result line.
    pub fn to_json(&self) -> Value {
        let mut v = json!({
            "commands_per_sec": round(self.commands_per_sec()), "tasks": self.tasks,
            "accounts": self.accounts, "commands": self.commands, "seconds": round(self.seconds),
            "command_latency": self.latency.to_json(), "conflicts": self.conflicts,
            "retried_commands": self.retried_commands, "max_attempts": self.max_attempts,
        });
        if let Some(visible) = &self.visible {
            v["append_visible"] = visible.to_json();
        }
        v
    }
}

/// W5 figures: the cases by key, and the whole W5 time (setup included).
#[derive(Clone, Debug, Default)]
pub struct W5 {
    /// Commands per case.
    pub commands: u64,
    /// Hot accounts of case (b).
    pub hot_accounts: u64,
    /// The cases, in run order.
    pub cases: Vec<(&'static str, CaseResult)>,
    /// Everything W5 took on this side, setup and verification included.
    pub total_seconds: f64,
}

impl W5 {
    fn new(args: &W5Args) -> Self {
        W5 {
            commands: args.w5_commands,
            hot_accounts: args.w5_hot_accounts.max(1),
            ..Default::default()
        }
    }

    fn case(&self, key: &str) -> Option<&CaseResult> {
        self.cases.iter().find(|(k, _)| *k == key).map(|(_, c)| c)
    }

    /// The `w5` object of the result line.
    pub fn to_json(&self) -> Value {
        let mut v = json!({
            "commands_per_case": self.commands, "hot_accounts": self.hot_accounts,
            "total_seconds": round(self.total_seconds),
        });
        for (k, c) in &self.cases {
            v[*k] = c.to_json();
        }
        v
    }
}

fn round(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

/// Adds `w5`, `raw.w5` and `ratio_to_raw.w5_*` to a result line (nothing
/// when W5 did not run).
pub fn add_to_line(line: &mut Value, annals: &Results, raw: Option<&Results>) {
    let Some(a) = &annals.w5 else { return };
    line["w5"] = a.to_json();
    let Some(r) = raw.and_then(|r| r.w5.as_ref()) else {
        return;
    };
    if line.get("raw").is_some() {
        line["raw"]["w5"] = r.to_json();
    }
    if line.get("ratio_to_raw").is_some() {
        for (k, c) in &a.cases {
            let ratio = match r.case(k) {
                Some(rc) if rc.commands_per_sec() > 0.0 => {
                    json!(round(c.commands_per_sec() / rc.commands_per_sec()))
                }
                _ => Value::Null,
            };
            line["ratio_to_raw"][format!("w5_{k}")] = ratio;
        }
    }
}

/// Runs W5 on an Annals store (any backend): per case, opens the accounts
/// (untimed, by the case's tasks), runs the commands on `tasks` tokio
/// tasks, then checks every balance.
pub async fn run_annals<S>(store: S, args: &W5Args) -> anyhow::Result<W5>
where
    S: EventStore + Clone + Send + Sync + 'static,
{
    let started = Instant::now();
    let repo = Repository::<Account, _>::new(store).with_retry(RETRY);
    let mut w5 = W5::new(args);
    for plan in args.plans() {
        let ids = std::sync::Arc::new(plan.account_ids());
        // Setup: task t opens accounts t, t+T, ...
        let mut opens = Vec::new();
        for t in 0..plan.case.tasks {
            let (repo, ids) = (repo.clone(), ids.clone());
            opens.push(tokio::spawn(async move {
                let ctx = CommandContext::new();
                let mut i = t;
                while i < plan.accounts() {
                    let o = plan.owner(i);
                    repo.create(&ids[i as usize], &ctx, |a| a.open(&o))
                        .await
                        .with_context(|| format!("W5 {}: opening {o}", plan.case.key))?;
                    i += plan.case.tasks;
                }
                anyhow::Ok(())
            }));
        }
        for h in opens {
            h.await??;
        }

        let follower = if args.w5_follow {
            let store = repo.store().clone();
            let start = store.head_position().await?;
            Some(tokio::spawn(follow(store, start, plan.commands)))
        } else {
            None
        };
        let t0 = Instant::now();
        let mut tasks = Vec::new();
        for t in 0..plan.case.tasks {
            let (repo, ids) = (repo.clone(), ids.clone());
            tasks.push(tokio::spawn(async move {
                let ctx = CommandContext::new();
                let n = plan.commands_of(t);
                let mut out = TaskOutcome {
                    latencies: Vec::with_capacity(n as usize),
                    attempts: Vec::with_capacity(n as usize),
                };
                for k in 0..n {
                    let id = &ids[plan.account_of(t, k) as usize];
                    let c = Instant::now();
                    let done = repo
                        .execute(id, &ctx, |a| a.deposit(100))
                        .await
                        .with_context(|| format!("W5 {}: deposit on {id}", plan.case.key))?;
                    out.latencies.push(c.elapsed());
                    out.attempts.push(done.attempts);
                }
                anyhow::Ok(out)
            }));
        }
        let mut outcomes = Vec::with_capacity(tasks.len());
        for h in tasks {
            outcomes.push(h.await??);
        }
        let seconds = t0.elapsed().as_secs_f64();
        let visible = match follower {
            Some(f) => Some(f.await??),
            None => None,
        };

        let mut sum = 0i64;
        for id in ids.iter() {
            sum += repo.load(id).await?.state.balance;
        }
        ensure!(
            sum == plan.commands as i64 * 100,
            "W5 {}: balances sum to {sum}, expected {}",
            plan.case.key,
            plan.commands * 100
        );
        let mut result = CaseResult::from_tasks(&plan, seconds, outcomes);
        result.visible = visible;
        w5.cases.push((plan.case.key, result));
    }
    w5.total_seconds = started.elapsed().as_secs_f64();
    Ok(w5)
}

/// Tails `read_all` after `start` until `n` events arrived; per event, the
/// time from its `recorded_at` to its delivery.
async fn follow<S: EventStore>(
    store: S,
    start: Option<annals::GlobalPosition>,
    n: u64,
) -> anyhow::Result<Latencies> {
    use futures::TryStreamExt;
    let mut after = start;
    let mut delays = Latencies(Vec::with_capacity(n as usize));
    let mut signal = store.append_signal();
    while (delays.0.len() as u64) < n {
        let options = match after {
            Some(p) => annals::ReadAll::after(p),
            None => annals::ReadAll::from_start(),
        };
        let page: Vec<_> = store.read_all(options.limit(1000)).try_collect().await?;
        let now = chrono::Utc::now();
        for e in &page {
            let d = (now - e.recorded_at).to_std().unwrap_or_default();
            delays.0.push(d);
            after = Some(e.global_position);
        }
        if page.is_empty() {
            match signal.as_mut() {
                Some(s) => {
                    // A lost wake-up costs at most the timeout.
                    let _ = tokio::time::timeout(Duration::from_millis(5), s.changed()).await;
                }
                None => tokio::time::sleep(Duration::from_millis(1)).await,
            }
        }
    }
    Ok(delays)
}

/// W5 on SQLite: Annals on a fresh file, then (unless `no_raw`) the raw
/// baseline on another fresh file, both in `dir` (default: a temporary
/// directory).
pub async fn run_sqlite(
    dir: Option<&Path>,
    args: &W5Args,
    no_raw: bool,
) -> anyhow::Result<(W5, Option<W5>)> {
    let tmp = tempfile::tempdir()?;
    let dir = dir.unwrap_or(tmp.path()).to_path_buf();
    std::fs::create_dir_all(&dir)?;
    let id = Uuid::now_v7().simple().to_string();
    let store =
        annals_sqlite::SqliteEventStore::open(dir.join(format!("annals-w5-{id}.db"))).await?;
    let annals = run_annals(store, args).await?;
    let raw = if no_raw {
        None
    } else {
        let path = dir.join(format!("raw-w5-{id}.db"));
        let args = args.clone();
        Some(tokio::task::spawn_blocking(move || crate::raw_sqlite::w5::run(&path, &args)).await??)
    };
    Ok((annals, raw))
}

/// W5 on PostgreSQL: Annals in a fresh schema with a pool of as many
/// connections as the largest case has tasks, then (unless `no_raw`) the
/// raw baseline in another fresh schema. Both schemas are dropped.
pub async fn run_postgres(
    url: &str,
    args: &W5Args,
    no_raw: bool,
) -> anyhow::Result<(W5, Option<W5>)> {
    let id = Uuid::now_v7().simple().to_string();
    let schema = format!("annals_bench_w5_{id}");
    let annals = async {
        let store = annals_postgres::PgEventStore::connect_with(
            url,
            annals_postgres::PgOptions {
                schema: Some(schema.clone()),
                pool_size: args.w5_pg_pool.unwrap_or(args.max_tasks()) as usize,
                group_commit: args.pg_group_commit.map(|k| k as usize),
                ..Default::default()
            },
        )
        .await?;
        store.migrate().await?;
        run_annals(store, args).await
    }
    .await;
    crate::raw_pg::drop_schema(url, &schema).await?;
    let annals = annals?;
    let raw = if no_raw {
        None
    } else {
        let raw_schema = format!("raw_bench_w5_{id}");
        let r = crate::raw_pg::w5::run(url, &raw_schema, args).await;
        crate::raw_pg::drop_schema(url, &raw_schema).await?;
        Some(r?)
    };
    Ok((annals, raw))
}

#[cfg(test)]
mod tests {
    use std::collections::{HashMap, HashSet};

    use super::*;

    fn args(commands: u64, hot: u64) -> W5Args {
        W5Args {
            no_w5: false,
            w5_commands: commands,
            w5_hot_accounts: hot,
            pg_group_commit: None,
            w5_pg_pool: None,
            w5_follow: false,
        }
    }

    #[test]
    fn every_command_is_planned_once_and_tasks_split_evenly() {
        for plan in args(8000, 16)
            .plans()
            .into_iter()
            .chain(args(1001, 5).plans())
        {
            let per_task: Vec<u64> = (0..plan.case.tasks).map(|t| plan.commands_of(t)).collect();
            assert_eq!(per_task.iter().sum::<u64>(), plan.commands, "{plan:?}");
            let lo = per_task.iter().min().copied().unwrap_or_default();
            let hi = per_task.iter().max().copied().unwrap_or_default();
            assert!(hi - lo <= 1, "{plan:?}: {per_task:?}");
            for t in 0..plan.case.tasks {
                for k in 0..plan.commands_of(t) {
                    assert!(
                        plan.account_of(t, k) < plan.accounts(),
                        "{plan:?} t={t} k={k}"
                    );
                }
            }
        }
    }

    #[test]
    fn distinct_cases_never_share_an_account_and_keep_streams_short() {
        for plan in &args(8000, 16).plans()[..2] {
            let mut owner_of: HashMap<u64, u64> = HashMap::new();
            let mut per_account: HashMap<u64, u64> = HashMap::new();
            for t in 0..plan.case.tasks {
                for k in 0..plan.commands_of(t) {
                    let a = plan.account_of(t, k);
                    assert_eq!(*owner_of.entry(a).or_insert(t), t, "account {a} shared");
                    *per_account.entry(a).or_default() += 1;
                }
            }
            assert!(
                per_account
                    .values()
                    .all(|&n| n <= COMMANDS_PER_DISTINCT_ACCOUNT),
                "{plan:?}"
            );
        }
        let [a8, a64, _] = args(8000, 16).plans()[..] else {
            panic!("three cases")
        };
        assert_eq!((a8.accounts(), a64.accounts()), (800, 832));
    }

    #[test]
    fn hot_case_spreads_tasks_evenly_over_the_hot_accounts() {
        let plan = args(8000, 16).plans()[2];
        assert_eq!((plan.case.tasks, plan.accounts()), (64, 16));
        // At every step k, each hot account has exactly 64 / 16 = 4 tasks.
        for k in 0..plan.commands_of(63) {
            let mut on: HashMap<u64, u64> = HashMap::new();
            for t in 0..64 {
                *on.entry(plan.account_of(t, k)).or_default() += 1;
            }
            assert_eq!(on.len(), 16);
            assert!(on.values().all(|&n| n == 4), "k={k}: {on:?}");
        }
        // Every task visits every hot account, and the total is even.
        let mut per_account: HashMap<u64, u64> = HashMap::new();
        for t in 0..64 {
            let seen: HashSet<u64> = (0..plan.commands_of(t))
                .map(|k| plan.account_of(t, k))
                .collect();
            assert_eq!(seen.len(), 16);
            for k in 0..plan.commands_of(t) {
                *per_account.entry(plan.account_of(t, k)).or_default() += 1;
            }
        }
        assert!(per_account.values().all(|&n| n == 500), "{per_account:?}");
    }

    #[test]
    fn owners_and_ids_are_per_case() {
        let plans = args(80, 4).plans();
        assert_eq!(plans[0].owner(0), "w5a8-000001");
        assert_eq!(plans[2].owner(3), "w5b64-000004");
        assert_eq!(plans[2].account_ids().len(), 4);
        assert_eq!(plans[2].account_ids()[3], account_id("w5b64-000004"));
    }

    #[test]
    fn backoff_follows_the_library_schedule_with_jitter() {
        // The documented promise: the library's default delays, more attempts.
        let library = RetryPolicy::default();
        assert_eq!(
            (RETRY.base_delay, RETRY.max_delay),
            (library.base_delay, library.max_delay)
        );
        assert!(RETRY.max_attempts > library.max_attempts);
        for _ in 0..100 {
            let d = backoff(0);
            assert!(
                d >= Duration::from_millis(1) && d <= Duration::from_millis(2),
                "{d:?}"
            );
            let d = backoff(3);
            assert!(
                d >= Duration::from_millis(8) && d <= Duration::from_millis(16),
                "{d:?}"
            );
            let d = backoff(20);
            assert!(
                d >= Duration::from_millis(100) && d <= Duration::from_millis(200),
                "{d:?}"
            );
        }
    }

    #[test]
    fn case_result_counts_conflicts_retries_and_latency() {
        let plan = args(5, 4).plans()[2];
        let ms = Duration::from_millis;
        let tasks = vec![
            TaskOutcome {
                latencies: vec![ms(1), ms(3)],
                attempts: vec![1, 3],
            },
            TaskOutcome {
                latencies: vec![ms(2), ms(4), ms(100)],
                attempts: vec![2, 1, 1],
            },
        ];
        let r = CaseResult::from_tasks(&plan, 0.5, tasks);
        assert_eq!(
            (r.commands, r.conflicts, r.retried_commands, r.max_attempts),
            (5, 3, 2, 3)
        );
        assert_eq!(r.commands_per_sec(), 10.0);
        assert_eq!(r.latency.median(), 3.0);
        let j = r.to_json();
        assert_eq!(j["command_latency"]["p99_ms"], 100.0);
        assert_eq!(
            (j["tasks"].as_u64(), j["accounts"].as_u64()),
            (Some(64), Some(4))
        );
    }

    #[test]
    fn result_line_gets_w5_and_its_ratios() {
        let plans = args(10, 2).plans();
        let mk = |secs: f64| W5 {
            commands: 10,
            hot_accounts: 2,
            cases: plans
                .iter()
                .map(|p| {
                    let out = TaskOutcome {
                        latencies: vec![Duration::from_millis(1); 10],
                        attempts: vec![1; 10],
                    };
                    (p.case.key, CaseResult::from_tasks(p, secs, vec![out]))
                })
                .collect(),
            total_seconds: 1.0,
        };
        let annals = Results {
            w5: Some(mk(1.0)),
            ..Default::default()
        };
        let raw = Results {
            w5: Some(mk(2.0)),
            ..Default::default()
        };
        let mut line = json!({ "raw": {}, "ratio_to_raw": {} });
        add_to_line(&mut line, &annals, Some(&raw));
        assert_eq!(line["w5"]["a8"]["commands_per_sec"], 10.0);
        assert_eq!(line["raw"]["w5"]["b64"]["commands_per_sec"], 5.0);
        for k in ["w5_a8", "w5_a64", "w5_b64"] {
            assert_eq!(line["ratio_to_raw"][k], 2.0, "{k}");
        }
        let mut bare = json!({});
        add_to_line(&mut bare, &Results::default(), None);
        assert!(bare.get("w5").is_none());
    }
}
