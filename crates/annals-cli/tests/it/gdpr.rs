//! `annals gdpr forget|status`.

use crate::util::Db;

#[test]
fn forget_records_the_erasure_and_status_shows_it() {
    let db = Db::sqlite();
    db.run(&["init"]).ok();
    let before = db.run(&["gdpr", "status", "owner-7"]).ok();
    assert!(
        before
            .stdout
            .contains("no data key and no erasure recorded"),
        "{}",
        before.stdout
    );
    let forgot = db
        .run(&[
            "gdpr",
            "forget",
            "owner-7",
            "--by",
            "dpo",
            "--snapshot",
            "Account-7",
        ])
        .ok();
    assert!(
        forgot.stdout.contains("forgot subject \"owner-7\""),
        "{}",
        forgot.stdout
    );
    assert!(
        forgot.stdout.contains("0 snapshot(s) deleted"),
        "{}",
        forgot.stdout
    );
    let after = db.run(&["gdpr", "status", "owner-7"]).ok();
    assert!(after.stdout.contains("forgotten at"), "{}", after.stdout);
    assert!(after.stdout.contains("by \"dpo\""), "{}", after.stdout);
}

#[test]
fn a_bad_snapshot_name_is_refused() {
    let db = Db::sqlite();
    db.run(&["init"]).ok();
    db.run(&["gdpr", "forget", "s", "--snapshot", "nodash"])
        .fails(2, &["--snapshot", "TYPE-ID"]);
}
