//! The conformance suite every Annals backend runs.
//!
//! One suite, never per-backend copies: each backend's `tests/it/conformance.rs`
//! invokes [`conformance_suite!`] with a factory that returns a fresh, empty
//! store (or `None` to skip, with a visible message, when its server is not
//! configured). The in-memory store runs it from this crate's own tests.
//!
//! # Example
//!
//! ```
//! async fn fresh() -> Option<annals::InMemoryStore> {
//!     Some(annals::InMemoryStore::new())
//! }
//! # tokio::runtime::Runtime::new()?.block_on(async {
//! annals_testkit::suite::append_round_trip(fresh().await.expect("store")).await;
//! # });
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! # Crate features
//!
//! None.
#![forbid(unsafe_code)]
#![deny(missing_docs)]

mod faulty;
pub mod model;
pub mod suite;

pub use faulty::{FaultyStore, LOST_REPLY};

use annals::{CheckpointStore, EventStore, SnapshotStore};

/// Everything a backend under test implements.
pub trait TestStore: EventStore + SnapshotStore + CheckpointStore {}
impl<T: EventStore + SnapshotStore + CheckpointStore> TestStore for T {}

/// Generates one `#[tokio::test]` per conformance test, each calling
/// `$factory().await` for a fresh store (`None` skips the test).
#[macro_export]
macro_rules! conformance_suite {
    ($factory:path) => {
        $crate::conformance_suite!(@tests $factory;
            append_round_trip,
            expected_version_cases,
            conflict_names_actual_version,
            batch_is_atomic,
            idempotent_event_ids,
            duplicate_event_id_is_rejected,
            bad_input_is_rejected,
            metadata_round_trip,
            racing_writers_one_stream,
            global_order_with_concurrent_writers,
            read_stream_options,
            reads_cross_batch_boundaries,
            time_travel,
            read_all_filters,
            stream_listing_and_stats,
            repository_commands,
            repository_retries_on_conflict,
            repository_metadata_flow,
            unknown_event_type_is_reported,
            snapshot_store_guarded_writes,
            snapshot_queries,
            snapshot_staging_and_promote,
            repository_snapshots_every_n,
            snapshot_interval_policy,
            snapshot_schema_bump_is_ignored,
            snapshot_migration_on_load,
            corrupt_snapshot_falls_back,
            snapshot_ahead_of_head_is_ignored,
            snapshots_change_no_result,
            background_snapshots_lose_no_command,
            snapshots_under_concurrent_writers,
            checkpoints,
            prepopulate_snapshots,
            staged_migration_end_to_end,
            interrupted_migration_resumes,
            verify_blocks_bad_promote,
            promote_races_with_live_saves,
            model_scenarios,
            migrate_while_writers_append,
            lost_reply_command_applies_once,
            replay_after_other_commands,
            command_id_reused_is_an_error,
            commands_without_an_id_are_not_deduplicated,
            concurrent_attempts_apply_once,
            async_command_awaits_a_service,
            command_owns_its_arguments_across_retries,
            read_event_by_id,
            numbers_read_back_as_promised,
        );
    };
    (@tests $factory:path; $($name:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn $name() {
                match $factory().await {
                    Some(store) => $crate::suite::$name(store).await,
                    None => eprintln!(
                        "SKIPPED conformance::{}: backend not configured",
                        stringify!($name)
                    ),
                }
            }
        )*
    };
}
