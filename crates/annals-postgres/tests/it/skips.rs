//! Issue 7: a PostgreSQL test that finds no server says so where `cargo
//! test` shows it, and fails when `ANNALS_REQUIRE_POSTGRES=1`.
//!
//! Runs a PostgreSQL test of this binary (a backend-specific one and one of
//! the conformance suite) in a child process without a server configured.
//! Needs no server itself.

use std::process::Command;

use crate::common::{REQUIRE_VAR, URL_VAR};

/// Runs the test `name` of this binary alone, without a server, with
/// `ANNALS_REQUIRE_POSTGRES` set to `require` (or unset).
fn run_alone(name: &str, require: Option<&str>) -> (bool, String) {
    let exe = std::env::current_exe().expect("test binary");
    let mut cmd = Command::new(exe);
    cmd.args([name, "--exact", "--test-threads=1"])
        .env_remove(URL_VAR)
        .env_remove(REQUIRE_VAR);
    if let Some(value) = require {
        cmd.env(REQUIRE_VAR, value);
    }
    let out = cmd.output().expect("run the test binary");
    let text = format!(
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[test]
fn issue7_a_missing_server_is_visible_and_fails_when_required() {
    for (name, skipped) in [
        (
            "appends::large_batch_is_one_transaction",
            "SKIPPED large_batch_is_one_transaction",
        ),
        (
            "conformance::append_round_trip",
            "SKIPPED conformance::append_round_trip",
        ),
    ] {
        let (ok, text) = run_alone(name, None);
        assert!(ok, "{name} should pass, skipped, without a server:\n{text}");
        assert!(text.contains("1 passed"), "{name} did not run:\n{text}");
        // The harness captures `eprintln!` of passing tests: the line is
        // only there when it was written past the capture.
        assert!(
            text.contains(skipped),
            "{name}: no visible SKIPPED line:\n{text}"
        );

        let (ok, text) = run_alone(name, Some("1"));
        assert!(
            !ok,
            "{name} must fail without a server when {REQUIRE_VAR}=1:\n{text}"
        );
        assert!(text.contains(REQUIRE_VAR), "{name}: say why:\n{text}");
    }
}
