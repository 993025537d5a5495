//! Model check of the partition lease protocol (`annals::PartitionedRunner`
//! with `annals-postgres`'s `lease` module and the fenced commit of
//! `PgEventStore::transactional`), with the `stateright` crate.
//!
//! The model is one partition of a projection (partitions are independent:
//! each has its own lease row and checkpoint), `WORKERS` workers and
//! `EVENTS` events of the partition. Its steps are the real protocol's, with
//! the same guards:
//!
//! | model action        | real code |
//! |---------------------|-----------|
//! | `Claim`             | `CLAIM_SQL`: `UPDATE partition_leases SET owner, fence = fence + 1, expires_at WHERE expires_at <= now()`; blocks while a transaction holds the row `FOR SHARE` |
//! | `Load`              | `PartitionJob::run_inner`: `load_checkpoint` after the claim |
//! | `Read`              | the subscription's next batch after the worker's cursor |
//! | `Begin`             | the applier's transaction: `SELECT ... FOR UPDATE` on the checkpoint row, then `check_fence` (`SELECT fence ... FOR SHARE`, refused with `Error::Fenced` when it is not the worker's), then the checkpoint checks (at or past the batch: applied already; elsewhere than its start: `checkpoint_moved`) |
//! | `Commit`            | the handler's rows, `MOVE_SQL`, `COMMIT` |
//! | `Renew`             | `RENEW_SQL`: `... SET expires_at WHERE fence = $held` (no row: the lease is lost, the partition's task is aborted); an `UPDATE`, so it waits for row locks |
//! | `Release`           | fair share: the task finishes its batch, then `RELEASE_SQL` (`WHERE fence = $held`) |
//! | `Expire`            | the database's clock passing `expires_at` (any time: safety must not depend on timing) |
//! | `Pause` / `Resume`  | SIGSTOP / SIGCONT: a paused worker takes no step |
//! | `KillIdleTx`        | `idle_in_transaction_session_timeout` (the lease's length) ending a paused worker's transaction: it rolls back and releases its row locks |
//! | `Crash`             | SIGKILL: the connection closes, its transaction rolls back |
//!
//! Properties: "a fenced worker commits nothing" (every commit is made by
//! the worker whose fencing token the lease row carries at that moment), and
//! "no event of a partition is skipped or applied twice" (the applied events
//! are exactly `0..checkpoint`, in order). A control model without the
//! fence check must violate the first property, which shows the check is
//! what provides it.

use stateright::{Checker, Model, Property};

const WORKERS: usize = 2;
const EVENTS: u8 = 3;
/// Bounds the state space: at most this many claims (fencing tokens).
const MAX_FENCE: u8 = 4;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Phase {
    /// Holds no lease.
    Idle,
    /// Claimed with this token; has not loaded the checkpoint yet.
    Claimed { fence: u8 },
    /// Running the partition from `cursor` (the checkpoint it last saw or
    /// committed).
    Running { fence: u8, cursor: u8 },
    /// Read the batch `after..to`.
    Batch { fence: u8, after: u8, to: u8 },
    /// Inside the batch's transaction, past its checks: holds the
    /// checkpoint row `FOR UPDATE` and the lease row `FOR SHARE`.
    InTx { fence: u8, after: u8, to: u8 },
    /// Gave up (fenced, checkpoint moved, lease lost, or crashed).
    Stopped,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct Worker {
    phase: Phase,
    paused: bool,
    /// Its transaction was ended by the server while it was paused.
    tx_killed: bool,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct State {
    /// The lease row.
    lease_fence: u8,
    lease_expired: bool,
    /// The checkpoint row: events applied.
    checkpoint: u8,
    /// The read model: the events applied, in commit order.
    applied: Vec<u8>,
    /// Whether a commit was made under a fencing token that was no longer
    /// the lease row's.
    fenced_commit: bool,
    workers: Vec<Worker>,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
enum Action {
    Claim(usize),
    Load(usize),
    Read(usize),
    Begin(usize),
    Commit(usize),
    Renew(usize),
    Release(usize),
    Expire,
    Pause(usize),
    Resume(usize),
    KillIdleTx(usize),
    Crash(usize),
}

struct LeaseModel {
    /// Whether `Begin` checks the fence (the real code does; the control
    /// model does not).
    fencing: bool,
}

impl State {
    /// Someone's transaction holds the lease row `FOR SHARE`: an `UPDATE`
    /// of it (claim, renew, release) waits.
    fn lease_row_locked(&self) -> bool {
        self.workers
            .iter()
            .any(|w| matches!(w.phase, Phase::InTx { .. }) && !w.tx_killed)
    }
}

impl Model for LeaseModel {
    type State = State;
    type Action = Action;

    fn init_states(&self) -> Vec<State> {
        vec![State {
            lease_fence: 0,
            lease_expired: true,
            checkpoint: 0,
            applied: Vec::new(),
            fenced_commit: false,
            workers: vec![
                Worker {
                    phase: Phase::Idle,
                    paused: false,
                    tx_killed: false,
                };
                WORKERS
            ],
        }]
    }

    fn actions(&self, s: &State, actions: &mut Vec<Action>) {
        if !s.lease_expired {
            actions.push(Action::Expire);
        }
        let locked = s.lease_row_locked();
        for (i, w) in s.workers.iter().enumerate() {
            if w.phase == Phase::Stopped {
                continue;
            }
            actions.push(Action::Crash(i));
            if w.paused {
                actions.push(Action::Resume(i));
                if matches!(w.phase, Phase::InTx { .. }) && !w.tx_killed {
                    actions.push(Action::KillIdleTx(i));
                }
                continue;
            }
            actions.push(Action::Pause(i));
            match w.phase {
                Phase::Idle => {
                    if s.lease_expired && !locked && s.lease_fence < MAX_FENCE {
                        actions.push(Action::Claim(i));
                    }
                }
                Phase::Claimed { .. } => actions.push(Action::Load(i)),
                Phase::Running { cursor, .. } => {
                    if cursor < EVENTS {
                        actions.push(Action::Read(i));
                    }
                    if !locked {
                        actions.push(Action::Renew(i));
                        actions.push(Action::Release(i));
                    }
                }
                Phase::Batch { .. } => {
                    // The checkpoint row is `FOR UPDATE` in another
                    // worker's open transaction: this one waits.
                    let other_in_tx = s.workers.iter().enumerate().any(|(j, o)| {
                        j != i && matches!(o.phase, Phase::InTx { .. }) && !o.tx_killed
                    });
                    if !other_in_tx {
                        actions.push(Action::Begin(i));
                    }
                    if !locked {
                        actions.push(Action::Renew(i));
                    }
                }
                Phase::InTx { .. } => actions.push(Action::Commit(i)),
                Phase::Stopped => {}
            }
        }
    }

    fn next_state(&self, s: &State, action: Action) -> Option<State> {
        let mut s = s.clone();
        match action {
            Action::Expire => s.lease_expired = true,
            Action::Claim(i) => {
                // WHERE expires_at <= now(): checked in `actions`.
                s.lease_fence += 1;
                s.lease_expired = false;
                s.workers[i].phase = Phase::Claimed {
                    fence: s.lease_fence,
                };
            }
            Action::Load(i) => {
                if let Phase::Claimed { fence } = s.workers[i].phase {
                    s.workers[i].phase = Phase::Running {
                        fence,
                        cursor: s.checkpoint,
                    };
                }
            }
            Action::Read(i) => {
                if let Phase::Running { fence, cursor } = s.workers[i].phase {
                    // One event per batch (the real batches are bounded;
                    // their size does not change the guards).
                    let to = (cursor + 1).min(EVENTS);
                    s.workers[i].phase = Phase::Batch {
                        fence,
                        after: cursor,
                        to,
                    };
                }
            }
            Action::Begin(i) => {
                if let Phase::Batch { fence, after, to } = s.workers[i].phase {
                    if self.fencing && s.lease_fence != fence {
                        // Error::Fenced: rolled back, the partition stops.
                        s.workers[i].phase = Phase::Stopped;
                    } else if s.checkpoint >= to {
                        // Applied already (an earlier attempt committed).
                        s.workers[i].phase = Phase::Running { fence, cursor: to };
                    } else if s.checkpoint != after {
                        // checkpoint_moved: stop rather than apply twice.
                        s.workers[i].phase = Phase::Stopped;
                    } else {
                        s.workers[i].phase = Phase::InTx { fence, after, to };
                    }
                }
            }
            Action::Commit(i) => {
                if let Phase::InTx { fence, after, to } = s.workers[i].phase {
                    if s.workers[i].tx_killed {
                        // The server ended it: COMMIT fails, nothing lands.
                        s.workers[i].tx_killed = false;
                        s.workers[i].phase = Phase::Stopped;
                    } else {
                        if s.lease_fence != fence {
                            s.fenced_commit = true;
                        }
                        s.applied.extend(after..to);
                        s.checkpoint = to;
                        s.workers[i].phase = Phase::Running { fence, cursor: to };
                    }
                }
            }
            Action::Renew(i) => {
                let fence = match s.workers[i].phase {
                    Phase::Running { fence, .. } | Phase::Batch { fence, .. } => fence,
                    _ => return None,
                };
                if s.lease_fence == fence {
                    // WHERE fence = $held (an expired lease nobody claimed
                    // is renewed: nobody else committed meanwhile).
                    s.lease_expired = false;
                } else {
                    // Lost: the partition's task is aborted.
                    s.workers[i].phase = Phase::Idle;
                }
            }
            Action::Release(i) => {
                if let Phase::Running { fence, .. } = s.workers[i].phase {
                    if s.lease_fence == fence {
                        s.lease_expired = true;
                    }
                    s.workers[i].phase = Phase::Idle;
                }
            }
            Action::Pause(i) => s.workers[i].paused = true,
            Action::Resume(i) => s.workers[i].paused = false,
            Action::KillIdleTx(i) => s.workers[i].tx_killed = true,
            Action::Crash(i) => {
                s.workers[i].phase = Phase::Stopped;
                s.workers[i].paused = false;
                s.workers[i].tx_killed = false;
            }
        }
        Some(s)
    }

    fn properties(&self) -> Vec<Property<Self>> {
        vec![
            Property::always("a fenced worker commits nothing", |_, s: &State| {
                !s.fenced_commit
            }),
            Property::always(
                "no event of a partition is skipped or applied twice",
                |_, s: &State| s.applied.iter().copied().eq(0..s.checkpoint),
            ),
            // Not vacuous: the checker reaches every event applied after a
            // takeover.
            Property::sometimes("all events applied after a takeover", |_, s: &State| {
                s.checkpoint == EVENTS && s.lease_fence >= 2
            }),
        ]
    }
}

#[test]
fn the_lease_protocol_keeps_both_safety_properties() {
    let checker = LeaseModel { fencing: true }.checker().spawn_bfs().join();
    checker.assert_properties();
    assert!(checker.unique_state_count() > 1_000, "a real state space");
}

#[test]
fn without_the_fence_check_a_paused_worker_commits_after_takeover() {
    let checker = LeaseModel { fencing: false }.checker().spawn_bfs().join();
    let path = checker
        .discovery("a fenced worker commits nothing")
        .expect("the control model violates the property");
    assert!(
        path.last_state().fenced_commit,
        "a counterexample: {:?}",
        path.into_actions()
    );
    // The checkpoint guard alone still prevents skips and duplicates.
    assert!(checker
        .discovery("no event of a partition is skipped or applied twice")
        .is_none());
}
