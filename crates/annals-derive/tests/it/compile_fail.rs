//! Each file under `tests/ui` must fail to compile with the message checked
//! in beside it (`TRYBUILD=overwrite` rewrites them after a deliberate change
//! of wording or of compiler).

#[test]
fn refused_enums_fail_with_a_reason() {
    let t = trybuild::TestCases::new();
    t.compile_fail("tests/ui/*.rs");
}
