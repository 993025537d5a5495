//! Reactors (process managers): a projection whose handler runs commands
//! through a repository with `CommandContext::reacting_to(event, step)`, so
//! a command is applied once however often its event is delivered; and a
//! runner with a maximum rate delivers every event once.

use std::time::Duration;

use annals::bank::Account;
use annals::{
    checkpoint_name, reaction_command_id, BatchContext, CommandContext, EventStore,
    ExpectedVersion, HandlerError, Projection, ProjectionControl, ProjectionRunner, ReadAll,
    RecordedEvent, Repository,
};

use super::{ev, n_of, read_all_vec, sid};

const PATIENCE: Duration = Duration::from_secs(30);

/// On each `Placed { n }` of an `Order` stream, credits `n` to the account
/// `Account-credit` through the repository, as a reaction to the event.
struct Credits<S> {
    repo: Repository<Account, S>,
}

impl<S: EventStore> Projection for Credits<S> {
    fn name(&self) -> &str {
        "credits"
    }
    fn filter(&self) -> annals::ProjectionFilter {
        annals::ProjectionFilter::all().categories(["Order"])
    }
    async fn handle(
        &mut self,
        events: &[RecordedEvent],
        _ctx: &BatchContext,
    ) -> Result<(), HandlerError> {
        for e in events {
            let n = n_of(&e.data).ok_or("no n")?;
            let ctx = CommandContext::reacting_to(e, "credit");
            self.repo
                .execute("credit", &ctx, |a: &Account| a.deposit(n))
                .await
                .map_err(|e| -> HandlerError { e.to_string().into() })?;
        }
        Ok(())
    }
}

/// A reactor's commands are applied once when its events are delivered
/// again: the projection runs to the head, its checkpoint is reset (as
/// after a lost checkpoint, or a replay), and it runs again; the account
/// got one deposit per order, each caused by its order event and carrying
/// the command id derived from it.
pub async fn reactor_commands_apply_once_when_events_are_redelivered<
    S: EventStore + ProjectionControl,
>(
    store: S,
) {
    let repo = Repository::<Account, S>::new(store.clone());
    repo.execute("credit", &CommandContext::new(), |a: &Account| {
        a.open("reactor")
    })
    .await
    .expect("open the account");
    let mut sum = 0;
    for i in 1..=30 {
        store
            .append(
                &sid(&format!("Order-{}", i % 3)),
                ExpectedVersion::Any,
                vec![ev("Placed", i)],
            )
            .await
            .expect("append an order");
        sum += i;
    }
    let head = store.head_position().await.expect("head").expect("events");
    for delivery in 0..2 {
        if delivery > 0 {
            store
                .reset_checkpoint(&checkpoint_name("credits", 1))
                .await
                .expect("reset: every event is delivered again");
        }
        let handle = ProjectionRunner::at_least_once(
            store.clone(),
            Credits {
                repo: Repository::new(store.clone()),
            },
        )
        .spawn();
        handle.wait_for(head, PATIENCE).await.expect("caught up");
        handle.stop().await.expect("stop");
    }
    let account = repo.load("credit").await.expect("load");
    assert_eq!(account.state.balance, sum, "each credit applied once");
    let credits = read_all_vec(&store, ReadAll::from_start().categories(["Account"])).await;
    let orders = read_all_vec(&store, ReadAll::from_start().categories(["Order"])).await;
    assert_eq!(
        credits.len(),
        1 + orders.len(),
        "Opened plus one deposit per order"
    );
    for (credit, order) in credits[1..].iter().zip(&orders) {
        assert_eq!(credit.metadata.causation_id, Some(order.event_id.0));
        let ctx = CommandContext::reacting_to(order, "credit");
        assert_eq!(
            ctx.command_id(),
            Some(reaction_command_id(order.event_id, "credit"))
        );
        assert_eq!(ctx.event_id(0), Some(credit.event_id));
    }
}

/// A runner with a maximum rate still delivers every event once, in order
/// (the rate limiter's arithmetic is tested against an injected clock in
/// the core).
pub async fn rate_limited_projection_delivers_every_event<S: EventStore + ProjectionControl>(
    store: S,
) {
    #[derive(Default)]
    struct Seen(Vec<annals::GlobalPosition>);
    impl Projection for Seen {
        fn name(&self) -> &str {
            "rated"
        }
        async fn handle(
            &mut self,
            events: &[RecordedEvent],
            _ctx: &BatchContext,
        ) -> Result<(), HandlerError> {
            self.0.extend(events.iter().map(|e| e.global_position));
            Ok(())
        }
    }
    for i in 0..120 {
        store
            .append(&sid("Rated-1"), ExpectedVersion::Any, vec![ev("E", i)])
            .await
            .expect("append");
    }
    let head = store.head_position().await.expect("head").expect("events");
    // A burst of 10,000 events: no real waiting in the test.
    let handle = ProjectionRunner::at_least_once(store.clone(), Seen::default())
        .max_rate(10_000.0)
        .spawn();
    handle.wait_for(head, PATIENCE).await.expect("caught up");
    let seen = handle.stop().await.expect("stop");
    let all: Vec<_> = read_all_vec(&store, ReadAll::from_start())
        .await
        .iter()
        .map(|e| e.global_position)
        .collect();
    assert_eq!(seen.projection().0, all);
}
