//! Idempotent commands: with a command id, a command whose reply was lost
//! and that is retried is applied once, on every backend. Also the
//! [`Command`] trait (commands that await, and own their arguments) and
//! [`EventStore::read_event`], which the repository's check relies on.

use std::sync::atomic::{AtomicU32, Ordering};

use annals::bank::{Account, AccountError, AccountEvent};
use annals::{
    Command, CommandContext, CommandError, Error, EventId, EventStore, Executed, ExpectedVersion,
    NewEvent, ReadAll, ReadStream, RecordedEvent, Repository, SnapshotConfig, SnapshotStore,
    StreamId, StreamVersion,
};
use futures::TryStreamExt;
use serde_json::json;
use tokio::sync::{mpsc, oneshot};
use uuid::Uuid;

use crate::{FaultyStore, LOST_REPLY};

fn account(id: &str) -> StreamId {
    StreamId::new("Account", id).expect("valid stream name")
}

fn v(n: u64) -> StreamVersion {
    StreamVersion(n)
}

async fn events<S: EventStore>(store: &S, id: &str) -> Vec<RecordedEvent> {
    store
        .read_stream_to_vec(&account(id), ReadStream::forward())
        .await
        .expect("read_stream")
}

fn with_command_id() -> CommandContext {
    CommandContext::new().with_command_id(Uuid::now_v7())
}

/// The command failed with the injected lost reply.
#[track_caller]
fn assert_lost_reply(result: Result<Executed<Account>, CommandError<AccountError>>) {
    match result {
        Err(CommandError::Store(Error::Backend {
            backend: "faulty",
            ref message,
            ..
        })) if message == LOST_REPLY => {}
        other => panic!("expected the injected lost reply, got {other:?}"),
    }
}

/// A command with a command id whose append committed but whose reply was
/// lost is applied once when retried: the retry appends nothing and returns
/// the original result, marked as replayed, as often as it is asked.
pub async fn lost_reply_command_applies_once<S: EventStore>(store: S) {
    let faulty = FaultyStore::new(store.clone(), i64::MAX);
    let repo = Repository::<Account, _>::new(faulty.clone());
    repo.execute("lr1", &CommandContext::new(), |a| a.open("ann"))
        .await
        .expect("open");
    let ctx = with_command_id();
    faulty.lose_replies(1);
    assert_lost_reply(repo.execute("lr1", &ctx, |a| a.deposit(100)).await);
    assert_eq!(faulty.replies_to_lose(), 0);
    let stored = events(&store, "lr1").await;
    assert_eq!(stored.len(), 2, "the lost append committed");
    assert_eq!(Some(stored[1].event_id), ctx.event_id(0), "derived id");

    let retry = repo
        .execute("lr1", &ctx, |a| a.deposit(100))
        .await
        .expect("retry");
    assert!(retry.replayed);
    assert_eq!(retry.version, Some(v(2)));
    assert_eq!(retry.state.balance, 100);
    let original = retry.append.clone().expect("the original append");
    assert!(original.deduplicated);
    assert_eq!(
        (original.first_version, original.last_version),
        (v(2), v(2))
    );
    assert_eq!(original.positions, [stored[1].global_position]);
    assert_eq!(events(&store, "lr1").await.len(), 2, "applied once");

    let again = repo
        .execute("lr1", &ctx, |a| a.deposit(100))
        .await
        .expect("third try");
    assert!(again.replayed);
    assert_eq!(again.append, Some(original));
    assert_eq!(repo.load("lr1").await.expect("load").state.balance, 100);

    // `create` too: without the command id its retry would be a conflict
    // (the stream exists); with it, the retry is the original result.
    let create = with_command_id();
    faulty.lose_replies(1);
    assert_lost_reply(repo.create("lr2", &create, |a| a.open("bo")).await);
    let created = repo
        .create("lr2", &create, |a| a.open("bo"))
        .await
        .expect("retried create");
    assert!(created.replayed);
    assert_eq!(created.version, Some(v(1)));
    assert_eq!(created.state.owner, "bo");
    assert_eq!(events(&store, "lr2").await.len(), 1);

    // A command id whose command went through normally is not a replay.
    let fresh = repo
        .execute("lr1", &with_command_id(), |a| a.deposit(1))
        .await
        .expect("deposit");
    assert!(!fresh.replayed);
    assert_eq!(fresh.version, Some(v(3)));
}

/// A command that emits two events.
fn withdraw_in_two(a: &Account) -> Result<Vec<AccountEvent>, AccountError> {
    let mut out = a.withdraw(60)?;
    out.extend(a.withdraw(40)?);
    Ok(out)
}

/// The retry of a lost command after other commands ran on the aggregate
/// still returns the original result: the versions and positions of its
/// events and the state as of its last event, not today's state, although
/// running the command again would now be refused.
pub async fn replay_after_other_commands<S: EventStore + SnapshotStore>(store: S) {
    let faulty = FaultyStore::new(store.clone(), i64::MAX);
    let repo = Repository::<Account, _>::new(faulty.clone())
        .with_snapshots(store.clone(), SnapshotConfig::every(1));
    repo.execute("ro1", &CommandContext::new(), |a| a.open("ann"))
        .await
        .expect("open");
    repo.execute("ro1", &CommandContext::new(), |a| a.deposit(100))
        .await
        .expect("deposit");
    let ctx = with_command_id();
    faulty.lose_replies(1);
    assert_lost_reply(repo.execute("ro1", &ctx, withdraw_in_two).await);
    repo.execute("ro1", &CommandContext::new(), |a| a.deposit(5))
        .await
        .expect("deposit");
    repo.execute("ro1", &with_command_id(), |a| a.deposit(7))
        .await
        .expect("deposit");
    assert!(matches!(
        withdraw_in_two(&repo.load("ro1").await.expect("load").state),
        Err(AccountError::InsufficientFunds { .. })
    ));

    let retry = repo
        .execute("ro1", &ctx, withdraw_in_two)
        .await
        .expect("retry");
    let stored = events(&store, "ro1").await;
    assert_eq!(stored.len(), 6);
    assert!(retry.replayed);
    assert_eq!(retry.version, Some(v(4)));
    assert_eq!(
        retry.state.balance, 0,
        "state as of the command's last event"
    );
    let append = retry.append.expect("the original append");
    assert_eq!((append.first_version, append.last_version), (v(3), v(4)));
    assert_eq!(
        append.positions,
        [stored[2].global_position, stored[3].global_position]
    );
    assert_eq!(
        stored
            .iter()
            .filter(|e| e.event_type == "Withdrew")
            .map(|e| e.event_id)
            .collect::<Vec<_>>(),
        [ctx.event_id(0), ctx.event_id(1)].map(|id| id.expect("derived")),
    );
    let now = repo.load("ro1").await.expect("load");
    assert_eq!((now.state.balance, now.version), (12, Some(v(6))));
}

/// A command id used for another command is [`Error::CommandIdReused`] and
/// writes nothing: on another aggregate (through `execute` and `create`),
/// and when ids derived from it are held by events it did not write.
pub async fn command_id_reused_is_an_error<S: EventStore>(store: S) {
    let repo = Repository::<Account, _>::new(store.clone());
    let ctx = with_command_id();
    let cid = ctx.command_id().expect("command id");
    let opened = repo
        .execute("ru1", &ctx, |a| a.open("ann"))
        .await
        .expect("open");
    assert!(!opened.replayed);
    let reused = |r: Result<Executed<Account>, CommandError<AccountError>>, holder: &str| match r {
        Err(CommandError::Store(Error::CommandIdReused {
            command_id,
            stream,
            reason,
        })) => {
            assert_eq!(command_id, cid);
            assert_eq!(stream, account(holder));
            reason
        }
        other => panic!("expected CommandIdReused, got {other:?}"),
    };
    let reason = reused(repo.execute("ru2", &ctx, |a| a.open("bob")).await, "ru1");
    assert!(reason.contains("Account-ru2"), "{reason}");
    reused(repo.create("ru3", &ctx, |a| a.open("cy")).await, "ru1");
    for id in ["ru2", "ru3"] {
        assert_eq!(store.stream_version(&account(id)).await.expect("v"), None);
    }

    // The second derived id is taken by an event the command did not write.
    let ctx = with_command_id();
    let cid = ctx.command_id().expect("command id");
    let taken = ctx.event_id(1).expect("derived");
    store
        .append(
            &account("ru1"),
            ExpectedVersion::Exact(v(1)),
            vec![NewEvent::new("Deposited", json!({"amount": 1})).with_id(taken)],
        )
        .await
        .expect("foreign event");
    match repo
        .execute("ru1", &ctx, |_: &Account| {
            Ok::<_, AccountError>(vec![
                AccountEvent::Deposited { amount: 10 },
                AccountEvent::Deposited { amount: 20 },
            ])
        })
        .await
    {
        Err(CommandError::Store(Error::CommandIdReused {
            command_id,
            stream,
            reason,
        })) => {
            assert_eq!(command_id, cid);
            assert_eq!(stream, account("ru1"));
            assert!(reason.contains(&taken.to_string()), "{reason}");
        }
        other => panic!("expected CommandIdReused, got {other:?}"),
    }
    assert_eq!(events(&store, "ru1").await.len(), 2, "nothing written");
}

/// Without a command id nothing changes: a retried command is a new command,
/// so a lost reply followed by a retry applies it twice.
pub async fn commands_without_an_id_are_not_deduplicated<S: EventStore>(store: S) {
    let faulty = FaultyStore::new(store.clone(), i64::MAX);
    let repo = Repository::<Account, _>::new(faulty.clone());
    let ctx = CommandContext::new();
    assert_eq!(ctx.event_id(0), None);
    repo.execute("nid", &ctx, |a| a.open("ann"))
        .await
        .expect("open");
    faulty.lose_replies(1);
    assert_lost_reply(repo.execute("nid", &ctx, |a| a.deposit(100)).await);
    let retry = repo
        .execute("nid", &ctx, |a| a.deposit(100))
        .await
        .expect("retry");
    assert!(!retry.replayed);
    assert_eq!(retry.version, Some(v(3)));
    assert_eq!(retry.state.balance, 200);
    let stored = events(&store, "nid").await;
    assert_eq!(stored.len(), 3);
    assert_ne!(stored[1].event_id, stored[2].event_id);
}

/// Concurrent attempts of one command (same id) apply it once: one of them
/// appends, every other returns the same result as a replay.
pub async fn concurrent_attempts_apply_once<S: EventStore>(store: S) {
    let repo = Repository::<Account, _>::new(store.clone());
    repo.execute("ca1", &CommandContext::new(), |a| a.open("ann"))
        .await
        .expect("open");
    let ctx = with_command_id();
    let barrier = std::sync::Arc::new(tokio::sync::Barrier::new(8));
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let (repo, ctx, barrier) = (repo.clone(), ctx.clone(), barrier.clone());
        tasks.push(tokio::spawn(async move {
            barrier.wait().await;
            repo.execute("ca1", &ctx, |a| a.deposit(10)).await
        }));
    }
    let mut applied = 0;
    let mut positions = Vec::new();
    for t in tasks {
        let done = t.await.expect("task").expect("execute");
        applied += usize::from(!done.replayed);
        assert_eq!(done.version, Some(v(2)));
        assert_eq!(done.state.balance, 10);
        positions.push(done.append.expect("append").positions);
    }
    assert_eq!(applied, 1, "exactly one attempt appended");
    assert!(positions.windows(2).all(|p| p[0] == p[1]), "{positions:?}");
    let stored = events(&store, "ca1").await;
    assert_eq!(stored.len(), 2);
    assert_eq!(positions[0], [stored[1].global_position]);
}

/// A directory service answering "is this name taken?" over a channel: the
/// command has to await the answer.
struct Directory {
    requests: mpsc::UnboundedSender<(String, oneshot::Sender<bool>)>,
}

impl Directory {
    async fn is_taken(&self, name: &str) -> bool {
        let (reply, answer) = oneshot::channel();
        if self.requests.send((name.to_owned(), reply)).is_err() {
            return true;
        }
        answer.await.unwrap_or(true)
    }
}

#[derive(Debug)]
enum OpenError {
    NameTaken,
    Account(AccountError),
}

/// Opens an account unless the directory says the owner's name is taken.
struct OpenUnique<'a> {
    owner: String,
    directory: &'a Directory,
}

impl Command<Account> for OpenUnique<'_> {
    type Error = OpenError;

    async fn handle(&self, account: &Account) -> Result<Vec<AccountEvent>, OpenError> {
        if self.directory.is_taken(&self.owner).await {
            return Err(OpenError::NameTaken);
        }
        account.open(&self.owner).map_err(OpenError::Account)
    }
}

/// A command can await a service: the repository's future waits inside the
/// command until the service answers, and the answer decides.
pub async fn async_command_awaits_a_service<S: EventStore>(store: S) {
    let repo = Repository::<Account, _>::new(store.clone());
    let (requests, mut inbox) = mpsc::unbounded_channel::<(String, oneshot::Sender<bool>)>();
    // The directory answers from a task of its own; it knows one name.
    let service = tokio::spawn(async move {
        let mut asked = Vec::new();
        while let Some((name, reply)) = inbox.recv().await {
            let _ = reply.send(name == "bob");
            asked.push(name);
        }
        asked
    });
    let directory = Directory { requests };
    let ctx = CommandContext::new();
    let opening = repo.execute_command(
        "as1",
        &ctx,
        OpenUnique {
            owner: "ann".into(),
            directory: &directory,
        },
    );
    // Callers spawn command futures on a multi-threaded runtime.
    fn assert_send<T: Send>(_: &T) {}
    assert_send(&opening);
    let opened = opening.await.expect("ann is free");
    assert_eq!(opened.state.owner, "ann");
    let refused = repo
        .execute_command(
            "as2",
            &ctx,
            OpenUnique {
                owner: "bob".into(),
                directory: &directory,
            },
        )
        .await;
    assert!(
        matches!(refused, Err(CommandError::Rejected(OpenError::NameTaken))),
        "{refused:?}"
    );
    let again = repo
        .execute_command(
            "as1",
            &ctx,
            OpenUnique {
                owner: "ann".into(),
                directory: &directory,
            },
        )
        .await;
    assert!(
        matches!(
            again,
            Err(CommandError::Rejected(OpenError::Account(
                AccountError::AlreadyOpen
            )))
        ),
        "{again:?}"
    );
    drop(directory);
    assert_eq!(service.await.expect("service"), ["ann", "bob", "ann"]);
    assert_eq!(
        store.stream_version(&account("as2")).await.expect("v"),
        None
    );
}

/// Opens an account for `owner`, a `String` moved into the command once. On
/// its first attempt a rival writes the stream first (the command awaits
/// that append), so the repository's append conflicts and the command runs
/// again on the new state, borrowing `owner` again: no attempt clones it.
/// (`OpenOwned` is not `Clone`, so the repository cannot clone it either.)
struct OpenOwned<'a, S> {
    owner: String,
    rival: &'a S,
    attempts: &'a AtomicU32,
}

impl<S: EventStore> Command<Account> for OpenOwned<'_, S> {
    type Error = AccountError;

    async fn handle(&self, account: &Account) -> Result<Vec<AccountEvent>, AccountError> {
        if self.attempts.fetch_add(1, Ordering::SeqCst) == 0 {
            self.rival
                .append(
                    &StreamId::new("Account", "mo1").expect("stream"),
                    ExpectedVersion::NoStream,
                    vec![NewEvent::new("Deposited", json!({"amount": 5}))],
                )
                .await
                .expect("the rival's append");
        }
        account.open(&self.owner)
    }
}

/// A command owns its arguments and keeps them across conflict retries.
pub async fn command_owns_its_arguments_across_retries<S: EventStore>(store: S) {
    let repo = Repository::<Account, _>::new(store.clone());
    let attempts = AtomicU32::new(0);
    let owner = String::from("ann");
    let command = OpenOwned {
        owner,
        rival: &store,
        attempts: &attempts,
    };
    let done = repo
        .execute_command("mo1", &with_command_id(), command)
        .await
        .expect("open");
    assert_eq!(attempts.load(Ordering::SeqCst), 2);
    assert_eq!(done.attempts, 2);
    assert_eq!(done.version, Some(v(2)));
    assert_eq!((done.state.owner.as_str(), done.state.open), ("ann", true));
    let stored = events(&store, "mo1").await;
    assert_eq!(stored.len(), 2);
    assert_eq!(
        stored[1].data,
        json!({"account": null, "owner": "ann", "email": null})
    );
}

/// `read_event` finds any stored event by id, in any stream, as the stream
/// read returns it, and `None` for an id that is not stored.
pub async fn read_event_by_id<S: EventStore>(store: S) {
    let a = StreamId::parse("Find-a").expect("stream");
    let b = StreamId::parse("Find-b").expect("stream");
    store
        .append(
            &a,
            ExpectedVersion::NoStream,
            vec![
                NewEvent::new("X", json!({"n": 1})),
                NewEvent::new("Y", json!({"n": 2})),
            ],
        )
        .await
        .expect("append");
    store
        .append(
            &b,
            ExpectedVersion::NoStream,
            vec![NewEvent::new("Z", json!([1.5, "z"]))],
        )
        .await
        .expect("append");
    let all: Vec<RecordedEvent> = store
        .read_all(ReadAll::from_start())
        .try_collect()
        .await
        .expect("read_all");
    assert_eq!(all.len(), 3);
    for e in &all {
        let found = store
            .read_event(e.event_id)
            .await
            .expect("read_event")
            .expect("stored");
        assert_eq!(found, *e);
    }
    assert_eq!(
        store.read_event(EventId::new()).await.expect("read_event"),
        None
    );
}
