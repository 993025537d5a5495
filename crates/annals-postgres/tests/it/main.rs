//! Integration tests of the PostgreSQL backend: the shared conformance suite
//! plus the PostgreSQL-specific behaviour (migrations, the transaction-id
//! horizon, error mapping under races, pagination).
//!
//! They need `ANNALS_TEST_POSTGRES_URL` (for example
//! `postgres://postgres@127.0.0.1:5432/test`); without it every test prints
//! a SKIPPED line and passes. Each test works in its own fresh schema.

mod appends;
mod common;
mod conformance;
mod migrations;
mod model;
mod ordering;
mod snapshots;
