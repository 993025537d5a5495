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
