//! The bench's plan (`annals-bench`'s `upcast::PLAN`) applied to W4's v1
//! events in a loop, on the system allocator, for counting instructions
//! per event with callgrind:
//! `valgrind --tool=callgrind target/release/examples/plan_upcast_loop 20000`.

include!("common/plan_upcast_loop.rs");
