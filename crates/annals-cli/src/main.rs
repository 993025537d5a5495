//! The `annals` binary: the operations CLI with the demo domain
//! ([`annals::bank::Account`] and its `account_balances` projection)
//! registered. Applications build their own with
//! [`annals_cli::App::register`].
#![forbid(unsafe_code)]

use std::process::ExitCode;

#[tokio::main]
async fn main() -> ExitCode {
    annals_cli::App::with_demo().run(std::env::args_os()).await
}
