//! The shared conformance suite, run against PostgreSQL.

annals_testkit::conformance_suite!(crate::common::fresh_store);
