//! Opening by URL: schemes, errors, the backends' schema.

use annals_any::{AnyStore, Backend, DatabaseUrl, OpenOptions};

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Runtime::new().expect("runtime")
}

#[test]
fn urls_parse_and_errors_name_the_scheme() {
    runtime().block_on(async {
        let err = AnyStore::open("mongodb://h/db")
            .await
            .expect_err("unsupported");
        assert!(err.to_string().contains("\"mongodb\""), "{err}");
    });
    let url: DatabaseUrl = "postgresql://u:pw@h/db".parse().expect("valid");
    assert_eq!(url.backend(), Backend::Postgres);
    assert!(!format!("{url} {url:?}").contains("pw@"));
    for backend in [Backend::Sqlite, Backend::Postgres] {
        assert!(backend.schema_sql().to_uppercase().contains("CREATE TABLE"));
    }
}

#[test]
fn must_exist_refuses_a_missing_file_and_creates_nothing() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("missing.db");
    let url: DatabaseUrl = format!("sqlite://{}", path.display())
        .parse()
        .expect("valid");
    let options = OpenOptions {
        must_exist: true,
        ..OpenOptions::default()
    };
    runtime().block_on(async {
        let err = AnyStore::open_with(&url, &options)
            .await
            .expect_err("missing file");
        assert!(err.to_string().contains("does not exist"), "{err}");
        assert!(!path.exists(), "a refused open must not create the file");
        let store = AnyStore::open_with(&url, &OpenOptions::default())
            .await
            .expect("created");
        assert_eq!(store.backend(), Backend::Sqlite);
        drop(store);
        AnyStore::open_with(&url, &options)
            .await
            .expect("exists now");
    });
}
