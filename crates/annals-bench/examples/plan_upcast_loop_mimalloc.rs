//! `plan_upcast_loop` on the allocator `annals-bench` and the `annals` CLI
//! run on (mimalloc).

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

include!("common/plan_upcast_loop.rs");
