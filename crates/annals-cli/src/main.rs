//! The `annals` binary: the operations CLI with the demo domain
//! ([`annals::bank::Account`] and its `account_balances` projection)
//! registered. Applications build their own with
//! [`annals_cli::App::register`].
#![forbid(unsafe_code)]

use std::process::ExitCode;

/// The process's allocator: mimalloc, whose small allocations cost fewer
/// instructions than the system's (jaq, which runs `--plan` files, allocates
/// on every step of a filter).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> ExitCode {
    annals_cli::App::with_demo().run(std::env::args_os()).await
}
