//! The `annals` binary: the operations CLI with the demo domain
//! ([`annals::bank::Account`]) registered. Applications build their own with
//! [`annals_cli::App::register`].
#![forbid(unsafe_code)]

use std::process::ExitCode;

#[tokio::main]
async fn main() -> ExitCode {
    annals_cli::App::new()
        .register::<annals::bank::Account>()
        .run(std::env::args_os())
        .await
}
