//! Projection checkpoints: where a named subscriber has got to in the global
//! order.

use std::future::Future;

use crate::{GlobalPosition, Result};

/// Durable checkpoints for named subscribers.
pub trait CheckpointStore: Clone + Send + Sync + 'static {
    /// The last position processed by `name` (`None`: never ran).
    fn load_checkpoint(
        &self,
        name: &str,
    ) -> impl Future<Output = Result<Option<GlobalPosition>>> + Send;

    /// Records `position` as processed by `name`. Durable when `Ok`. A
    /// checkpoint never moves backwards: saving an older position than the
    /// stored one keeps the stored one (use [`CheckpointStore::reset_checkpoint`]
    /// for a rebuild).
    fn save_checkpoint(
        &self,
        name: &str,
        position: GlobalPosition,
    ) -> impl Future<Output = Result<()>> + Send;

    /// Deletes the checkpoint of `name` so that it starts from the beginning.
    fn reset_checkpoint(&self, name: &str) -> impl Future<Output = Result<()>> + Send;
}

/// A named checkpoint and its position.
#[derive(Clone, PartialEq, Eq, Debug, serde::Serialize, serde::Deserialize)]
pub struct Checkpoint {
    /// The subscriber's name.
    pub name: String,
    /// Where it has got to.
    pub position: GlobalPosition,
}

/// Listing every checkpoint of a [`CheckpointStore`] (what `annals export`
/// copies).
///
/// Optional: a store whose checkpoints live in a key-value map it cannot
/// scan leaves it out.
pub trait CheckpointListing: CheckpointStore {
    /// Every checkpoint, ordered by name. There is one per subscriber (a
    /// handful), so they come as one `Vec`.
    fn list_checkpoints(&self) -> impl Future<Output = Result<Vec<Checkpoint>>> + Send;
}
