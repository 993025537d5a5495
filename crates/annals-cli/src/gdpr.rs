//! `annals gdpr forget|status`: crypto-shredding from the command line (see
//! `annals::gdpr`).

use annals::gdpr::{ErasureHandler, ErasureNotice};
use annals::{GdprStore, KeyStore};
use anyhow::Context as _;
use clap::{Args, Subcommand};

use crate::commands::Env;
use crate::{Outcome, ProjectionOps, ReadModelDb};

/// A registered projection as an [`ErasureHandler`]: the notice goes to
/// [`ProjectionOps::on_erasure`] on the store's database.
struct ProjectionErasure<'a> {
    ops: &'a dyn ProjectionOps,
    db: &'a ReadModelDb,
}

impl ErasureHandler for ProjectionErasure<'_> {
    fn on_erasure<'a>(
        &'a self,
        notice: &'a ErasureNotice,
    ) -> futures::future::BoxFuture<'a, annals::Result<()>> {
        self.ops.on_erasure(self.db, notice)
    }
}

/// `annals gdpr ..`.
#[derive(Subcommand, Debug)]
pub(crate) enum GdprCommand {
    /// Forget a subject: delete its data key (its personal fields then read
    /// as "[erased]"), delete the snapshots named by --snapshot, and record
    /// the erasure (a hash of the subject, when, by whom).
    Forget(ForgetArgs),
    /// Whether a subject has a data key and when it was forgotten.
    Status(StatusArgs),
}

#[derive(Args, Debug)]
pub(crate) struct ForgetArgs {
    /// The subject id (the value of the events' subject field).
    subject: String,
    /// Who asks (recorded in the erasure log).
    #[arg(long, default_value = "annals-cli")]
    by: String,
    /// A snapshot to delete, as TYPE-ID (an aggregate holding the subject's
    /// personal data); repeatable.
    #[arg(long, value_name = "TYPE-ID")]
    snapshot: Vec<String>,
}

#[derive(Args, Debug)]
pub(crate) struct StatusArgs {
    /// The subject id.
    subject: String,
}

pub(crate) async fn dispatch(env: Env<'_>, command: GdprCommand) -> anyhow::Result<Outcome> {
    let store = env.open(false).await?;
    match command {
        GdprCommand::Forget(args) => {
            let mut aggregates = Vec::new();
            for s in &args.snapshot {
                let (t, id) = s
                    .split_once('-')
                    .with_context(|| format!("--snapshot {s:?}: expected TYPE-ID"))?;
                aggregates.push((t.to_owned(), id.to_owned()));
            }
            let keys = env.key_source()?;
            // Forgetting needs no master key: it deletes the data key.
            let crypto = keys.crypto(&store);
            let db = crate::projections_cmd::read_model_db(&env, store.clone());
            let projections: Vec<ProjectionErasure<'_>> = env
                .app
                .projections()
                .map(|ops| ProjectionErasure { ops, db: &db })
                .collect();
            let handlers: Vec<&dyn ErasureHandler> = projections
                .iter()
                .map(|p| p as &dyn ErasureHandler)
                .collect();
            let named: Vec<(&str, &str)> = aggregates
                .iter()
                .map(|(t, id)| (t.as_str(), id.as_str()))
                .collect();
            let g = GdprStore::new(store.raw(), crypto.clone());
            let forgotten = g
                .forget(&args.subject, &args.by, Some(&store), &named, &handlers)
                .await?;
            // The demo's accounts: the account is the subject of its snapshots.
            let deleted = forgotten.snapshots_deleted
                + annals::bank::personal_snapshots(store.raw(), crypto)
                    .forget_snapshots(&args.subject)
                    .await?;
            writeln!(
                env.out,
                "forgot subject {:?}: data key {}, {deleted} snapshot(s) deleted, {} projection(s) \
                 notified, erasure recorded at {} by {:?}",
                args.subject,
                if forgotten.key_deleted {
                    "deleted"
                } else {
                    "absent"
                },
                projections.len(),
                forgotten.record.erased_at.to_rfc3339(),
                forgotten.record.erased_by
            )?;
        }
        GdprCommand::Status(args) => {
            let key = store.load_key(&args.subject).await?;
            let erasure = store.erasure(&args.subject).await?;
            match (key, erasure) {
                (Some(k), _) => writeln!(
                    env.out,
                    "subject {:?}: data key present (wrapped by master key {})",
                    args.subject, k.master_key_id
                )?,
                (None, Some(r)) => writeln!(
                    env.out,
                    "subject {:?}: forgotten at {} by {:?}",
                    args.subject,
                    r.erased_at.to_rfc3339(),
                    r.erased_by
                )?,
                (None, None) => writeln!(
                    env.out,
                    "subject {:?}: no data key and no erasure recorded",
                    args.subject
                )?,
            }
        }
    }
    Ok(Outcome::Success)
}
