//! Integration tests of the `annals` binary: each test runs the built binary
//! against a temporary SQLite file (and, when `ANNALS_TEST_POSTGRES_URL` is
//! set, a fresh PostgreSQL schema), the way an operator would.

mod adopt;
mod append_input;
mod archive;
mod check;
mod demo;
mod errors;
mod events;
mod gdpr;
mod inspection;
mod library;
mod migrate;
mod migrate_merge;
mod postgres;
mod projections;
mod projections_rebuild;
mod scenarios;
mod serve;
mod snapshots;
mod transfer;
mod util;
