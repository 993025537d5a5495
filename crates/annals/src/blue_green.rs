//! Blue-green rebuilds of SQL read models: a new projection version builds
//! into shadow tables while the old version keeps serving, then one
//! transaction swaps them in.
//!
//! A SQL projection declares the tables it writes (by their live names) and
//! writes through [`TableNames`] ([`crate::BatchContext::tables`]): on a live
//! runner each name maps to itself, during a blue-green rebuild to its
//! shadow name ([`shadow_table`]). The rebuild
//! ([`crate::ProjectionRunner::rebuild_blue_green`]) holds the lock of the
//! new version and drives a [`BlueGreenApplier`], which the backends'
//! transactional appliers implement:
//!
//! 1. [`enter_shadow`](BlueGreenApplier::enter_shadow): create the shadow
//!    tables (dropping the leftovers of an earlier attempt when starting
//!    over); the build checkpoints under [`shadow_checkpoint_name`], never
//!    the live checkpoint.
//! 2. The rebuild, batch by batch, each batch's shadow rows and shadow
//!    checkpoint in one transaction, up to the head. The live tables, the
//!    live checkpoint and the live runner of the old version are untouched:
//!    a failed or cancelled rebuild leaves them as they were, and calling
//!    it again resumes from the shadow checkpoint.
//! 3. [`swap`](BlueGreenApplier::swap), one transaction: each live table
//!    renamed to its [`retired_table`] name, each shadow table renamed to its
//!    live name, the version's checkpoint set to the shadow checkpoint (which
//!    is deleted), its dead letters moved along, and the projection's active
//!    version (table `projection_versions`) set to the new version.
//! 4. [`drop_retired`](BlueGreenApplier::drop_retired): the old tables go.
//!
//! The live runner of the old version reads the active version in each of
//! its batch transactions (a projection that declares tables only); once it
//! is newer than its own version, the batch fails with
//! [`superseded`] and the runner stops, so no batch of the old version
//! lands in the new tables. The runner of the new version then goes on from
//! the checkpoint the swap set, so no event is lost or applied twice.

use std::future::Future;
use std::sync::Arc;

use crate::{BatchApplier, Error, Result};

/// The names of a SQL projection's tables in a batch: live, or shadow
/// during a blue-green rebuild (see the module docs).
///
/// ```
/// use annals::TableNames;
/// let live = TableNames::default();
/// assert_eq!(live.name("balances"), "balances");
/// let shadow = TableNames::shadow(["balances"], 2);
/// assert_eq!(shadow.name("balances"), "balances__bg_v2");
/// assert!(shadow.is_shadow());
/// ```
#[derive(Clone, PartialEq, Eq, Debug, Default)]
pub struct TableNames {
    /// `(live, actual)` pairs; empty: every name is its own.
    map: Arc<Vec<(String, String)>>,
}

impl TableNames {
    /// The shadow names of `tables` for `version`.
    pub fn shadow<I, S>(tables: I, version: u32) -> Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        TableNames {
            map: Arc::new(
                tables
                    .into_iter()
                    .map(|t| (t.as_ref().to_owned(), shadow_table(t.as_ref(), version)))
                    .collect(),
            ),
        }
    }

    /// The name to write `table` (a live name) under in this batch.
    pub fn name<'a>(&'a self, table: &'a str) -> &'a str {
        self.map
            .iter()
            .find(|(live, _)| live == table)
            .map_or(table, |(_, actual)| actual.as_str())
    }

    /// Whether the names are shadow names (a blue-green rebuild).
    pub fn is_shadow(&self) -> bool {
        !self.map.is_empty()
    }
}

/// The shadow name of `table` while `version` builds: `TABLE__bg_vVERSION`.
pub fn shadow_table(table: &str, version: u32) -> String {
    format!("{table}__bg_v{version}")
}

/// The name a live table has between a swap and the drop of the old tables:
/// `TABLE__bg_retired`.
pub fn retired_table(table: &str) -> String {
    format!("{table}__bg_retired")
}

/// The checkpoint a blue-green build of `checkpoint` saves
/// (`name@vN+shadow`); the swap moves it to `checkpoint`.
pub fn shadow_checkpoint_name(checkpoint: &str) -> String {
    format!("{checkpoint}+shadow")
}

/// The error of a live batch of `projection` version `version` once version
/// `active` was swapped in ([`BlueGreenApplier::swap`]): not transient, so
/// the old runner stops instead of writing into the new tables.
pub fn superseded(projection: &str, version: u32, active: u32) -> Error {
    Error::Unsafe(format!(
        "projection {projection} v{version} was superseded by v{active} (a blue-green swap): \
         this runner stops; run v{active}"
    ))
}

/// Quotes an SQL identifier (`"name"`, inner quotes doubled); the same on
/// SQLite and PostgreSQL.
pub fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// An applier whose read model can be rebuilt blue-green (see the module
/// docs): the backends' transactional appliers of projections that declare
/// their tables.
pub trait BlueGreenApplier: BatchApplier {
    /// The projection's version (the one the rebuild builds).
    fn version(&self) -> u32;

    /// The version whose tables are live (`projection_versions`), `None`
    /// when no blue-green swap ever ran for the projection.
    fn active_version(&mut self) -> impl Future<Output = Result<Option<u32>>> + Send;

    /// Switches the applier to the shadow tables and the shadow checkpoint,
    /// creating the tables. With `fresh`, or when the tables were missing,
    /// the shadow tables are dropped and created empty and the shadow
    /// checkpoint is deleted, so the build starts from the first event.
    /// Returns whether an earlier build is resumed (`false`: starting over).
    fn enter_shadow(&mut self, fresh: bool) -> impl Future<Output = Result<bool>> + Send;

    /// The swap, in one transaction (see the module docs); afterwards the
    /// applier writes the live tables under the live checkpoint. Fails,
    /// changing nothing, when a newer version is active already. A swap that
    /// committed but whose reply was lost is recognised when called again.
    fn swap(&mut self) -> impl Future<Output = Result<()>> + Send;

    /// Drops the retired tables of the last swap (none: nothing).
    fn drop_retired(&mut self) -> impl Future<Output = Result<()>> + Send;
}
