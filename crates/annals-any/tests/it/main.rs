//! Integration tests of `AnyStore`: the whole conformance suite through its
//! delegation, and URL parsing.

mod conformance;
mod snapshots;
mod urls;
