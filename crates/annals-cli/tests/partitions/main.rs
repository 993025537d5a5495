//! Partitioned projection workers as separate `annals` processes sharing
//! partitions through PostgreSQL leases (SIGKILL, SIGSTOP, rebalancing).
//!
//! A test binary of its own: cargo runs test binaries one after the other,
//! so these multi-process tests, which wait for leases to expire and for
//! every partition to reach the head of the global order, do not share the
//! machine or the cluster with the other CLI tests (some of which hold a
//! long transaction open on purpose, which holds back the horizon of every
//! reader of the global order on the cluster).

#[allow(dead_code, unused_imports, unused_macros)]
#[path = "../it/util.rs"]
mod util;
mod workers;
