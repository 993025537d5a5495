//! Integration tests of the PostgreSQL backend: the shared conformance suite
//! plus the PostgreSQL-specific behaviour (migrations, the transaction-id
//! horizon, error mapping under races, pagination).
//!
//! They need `ANNALS_TEST_POSTGRES_URL` (for example
//! `postgres://postgres@127.0.0.1:5432/test`); without it every test writes
//! a SKIPPED line to stderr (past the harness's capture, so `cargo test`
//! shows it) and passes, unless `ANNALS_REQUIRE_POSTGRES=1` (set by
//! `.ci/run`), which makes it fail. Each test works in its own fresh schema.

mod appends;
mod blue_green;
mod common;
mod conformance;
mod fencing;
mod gdpr;
mod group_commit;
mod many;
mod migrations;
mod model;
mod ordering;
mod pages;
mod pressure;
mod projections;
mod rebuilds;
mod skips;
mod snapshots;
