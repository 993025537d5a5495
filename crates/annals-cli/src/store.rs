//! The store a database URL names: [`annals_any`], re-exported so that an
//! ops binary needs only this crate, and the CLI's default URL.

pub use annals_any::{AnyStore, Backend, DatabaseUrl, OpenOptions};

/// The URL used when neither `--database-url` nor `ANNALS_DATABASE_URL` is
/// given: an embedded SQLite file in the current directory.
pub const DEFAULT_DATABASE_URL: &str = "sqlite://annals.db";
