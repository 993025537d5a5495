//! `annals gdpr forget|status`: crypto-shredding from the command line (see
//! `annals::gdpr`).

use annals::gdpr::{subject_hash, ErasureRecord};
use annals::{KeyStore, SnapshotStore};
use anyhow::Context as _;
use clap::{Args, Subcommand};

use crate::commands::Env;
use crate::Outcome;

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
            let record = ErasureRecord {
                subject_hash: subject_hash(&args.subject),
                erased_at: chrono::Utc::now(),
                erased_by: args.by.clone(),
            };
            let had = store.forget_key(&args.subject, &record).await?;
            let mut deleted = 0;
            for (t, id) in &aggregates {
                deleted += store.delete_snapshot(t, id).await?;
            }
            writeln!(
                env.out,
                "forgot subject {:?}: data key {}, {deleted} snapshot(s) deleted, erasure \
                 recorded at {} by {:?}",
                args.subject,
                if had { "deleted" } else { "absent" },
                record.erased_at.to_rfc3339(),
                record.erased_by
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
