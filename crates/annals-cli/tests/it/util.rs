//! Running the binary and reading what it printed.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use serde_json::Value;
use tempfile::TempDir;

/// The fields every event object of `--json` output has (the model's).
pub const EVENT_FIELDS: &[&str] = &[
    "event_id",
    "stream_id",
    "stream_version",
    "global_position",
    "event_type",
    "event_version",
    "data",
    "metadata",
    "recorded_at",
];

/// Declares each scenario (a `fn name(db: &Db)` of the calling module) once
/// per backend: `sqlite::name` on a new SQLite file and `postgres::name` on
/// a fresh PostgreSQL schema (skipped with a message, or failed under
/// `ANNALS_REQUIRE_POSTGRES=1`, when no server is configured: see
/// [`Db::postgres`]).
macro_rules! per_backend {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[test]
                fn $name() {
                    super::$name(&crate::util::Db::sqlite());
                }
            )*
        }
        mod postgres {
            $(
                #[test]
                fn $name() {
                    let Some(db) = crate::util::Db::postgres() else { return };
                    super::$name(&db);
                }
            )*
        }
    };
}
pub(crate) use per_backend;

/// The outcome of one run of the binary.
#[derive(Debug)]
pub struct Run {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    fn from_output(args: &[String], out: Output) -> Self {
        let run = Run {
            code: out.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        };
        eprintln!(
            "$ annals {}\n-> {}\n{}",
            args.join(" "),
            run.code,
            run.stderr
        );
        run
    }

    /// Asserts exit status 0 and returns self.
    #[track_caller]
    pub fn ok(self) -> Self {
        assert_eq!(self.code, 0, "expected success: {self:#?}");
        self
    }

    /// Asserts the exit status and that stderr is exactly one line starting
    /// with `error:` that contains every one of `needles`.
    #[track_caller]
    pub fn fails(self, code: i32, needles: &[&str]) -> Self {
        assert_eq!(self.code, code, "expected status {code}: {self:#?}");
        let lines: Vec<&str> = self
            .stderr
            .lines()
            .filter(|l| !l.trim().is_empty())
            .collect();
        assert_eq!(lines.len(), 1, "expected one line on stderr: {self:#?}");
        assert!(lines[0].starts_with("error: "), "{self:#?}");
        for n in needles {
            assert!(
                lines[0].contains(n),
                "stderr should mention {n:?}: {:?}",
                lines[0]
            );
        }
        assert!(self.stdout.is_empty(), "nothing on stdout: {self:#?}");
        self
    }

    /// Stdout parsed as JSON Lines.
    #[track_caller]
    pub fn json_lines(&self) -> Vec<Value> {
        self.stdout
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l:?}")))
            .collect()
    }

    /// Stdout as exactly one JSON object.
    #[track_caller]
    pub fn json(&self) -> Value {
        let mut lines = self.json_lines();
        assert_eq!(lines.len(), 1, "one JSON line expected: {}", self.stdout);
        lines.remove(0)
    }
}

/// The binary, with no configuration inherited from the environment.
pub fn command(dir: &Path) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_annals"));
    cmd.current_dir(dir)
        .env_remove("ANNALS_DATABASE_URL")
        .env_remove("ANNALS_PG_SCHEMA")
        .env_remove("ANNALS_MASTER_KEY")
        .env_remove("ANNALS_KEY_FILE")
        .env_remove("RUST_LOG")
        .stdin(Stdio::null());
    cmd
}

/// Runs the binary in `dir` with exactly `args`.
pub fn annals_in(dir: &Path, args: &[&str]) -> Run {
    let out = command(dir).args(args).output().expect("run annals");
    Run::from_output(
        &args.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>(),
        out,
    )
}

/// A database the tests run commands against: a temporary SQLite file, or
/// a fresh PostgreSQL schema.
pub struct Db {
    pub dir: TempDir,
    pub url: String,
    pub pg_schema: Option<String>,
}

impl Db {
    /// A new SQLite file (not created until a command opens it).
    pub fn sqlite() -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let url = format!("sqlite://{}", dir.path().join("test.db").display());
        Db {
            dir,
            url,
            pg_schema: None,
        }
    }

    /// A fresh schema in the test PostgreSQL database, or `None` when
    /// `ANNALS_TEST_POSTGRES_URL` is unset: then a SKIPPED line naming the
    /// test goes straight to the process's stderr (the harness captures
    /// `eprintln!` and shows it only for failing tests), and with
    /// `ANNALS_REQUIRE_POSTGRES=1` (set by `.ci/run`) the test fails instead.
    pub fn postgres() -> Option<Self> {
        let url = match std::env::var("ANNALS_TEST_POSTGRES_URL") {
            Ok(url) if !url.trim().is_empty() => url,
            _ => {
                let test = std::thread::current()
                    .name()
                    .unwrap_or("a PostgreSQL test")
                    .to_owned();
                assert!(
                    std::env::var("ANNALS_REQUIRE_POSTGRES").as_deref() != Ok("1"),
                    "{test}: ANNALS_REQUIRE_POSTGRES=1 but ANNALS_TEST_POSTGRES_URL is not set: \
                     the PostgreSQL CLI tests must run"
                );
                let _ = std::io::Write::write_all(
                    &mut std::io::stderr(),
                    format!(
                        "SKIPPED {test}: set ANNALS_TEST_POSTGRES_URL (for example \
                         postgres://postgres@127.0.0.1:5432/test) to run the PostgreSQL CLI tests\n"
                    )
                    .as_bytes(),
                );
                return None;
            }
        };
        let schema = format!("annals_cli_{}", uuid::Uuid::now_v7().simple());
        Some(Db {
            dir: tempfile::tempdir().expect("temp dir"),
            url,
            pg_schema: Some(schema),
        })
    }

    pub fn is_postgres(&self) -> bool {
        self.pg_schema.is_some()
    }

    /// The master key file the commands use (`annals demo` creates it):
    /// beside the SQLite file, or `--key-file` in the test's directory for
    /// PostgreSQL.
    pub fn key_file(&self) -> PathBuf {
        self.dir.path().join("test.db.key")
    }

    /// The SQLite file (meaningless for PostgreSQL).
    pub fn sqlite_path(&self) -> PathBuf {
        self.dir.path().join("test.db")
    }

    fn full_args(&self, args: &[&str]) -> Vec<String> {
        // PostgreSQL has no default key file: the test's is in its dir.
        let key_file = self.pg_schema.as_ref().map(|_| self.key_file());
        self.args_with_key_file(args, key_file.as_deref())
    }

    /// `args` against this database, with `--key-file key_file` if given
    /// (and nothing else naming a key file).
    fn args_with_key_file(&self, args: &[&str], key_file: Option<&Path>) -> Vec<String> {
        let mut all: Vec<String> = args.iter().map(|s| (*s).to_owned()).collect();
        all.push("--database-url".into());
        all.push(self.url.clone());
        if let Some(schema) = &self.pg_schema {
            all.push("--pg-schema".into());
            all.push(schema.clone());
        }
        if let Some(file) = key_file {
            all.push("--key-file".into());
            all.push(file.display().to_string());
        }
        all
    }

    /// A command against this database that names no key file but
    /// `key_file` (the default is the SQLite file's, on PostgreSQL none).
    pub fn command_with_key_file(&self, args: &[&str], key_file: Option<&Path>) -> Command {
        let mut cmd = command(self.dir.path());
        cmd.args(self.args_with_key_file(args, key_file));
        cmd
    }

    /// Runs [`Db::command_with_key_file`], with `envs` set.
    pub fn run_with_key_file(
        &self,
        args: &[&str],
        key_file: Option<&Path>,
        envs: &[(&str, &Path)],
    ) -> Run {
        let all = self.args_with_key_file(args, key_file);
        let out = command(self.dir.path())
            .args(&all)
            .envs(envs.iter().map(|(k, v)| (*k, *v)))
            .output()
            .expect("run annals");
        Run::from_output(&all, out)
    }

    /// Runs the binary against this database.
    pub fn run(&self, args: &[&str]) -> Run {
        let all = self.full_args(args);
        let out = command(self.dir.path())
            .args(&all)
            .output()
            .expect("run annals");
        Run::from_output(&all, out)
    }

    /// A command against this database, to run by hand.
    pub fn command(&self, args: &[&str]) -> Command {
        let mut cmd = command(self.dir.path());
        cmd.args(self.full_args(args));
        cmd
    }

    /// Runs one SQL statement straight on the database, behind the CLI's
    /// back (to tamper with a row no command can reach); returns the rows
    /// it changed.
    pub fn execute_sql(&self, sql: &str) -> u64 {
        let Some(schema) = &self.pg_schema else {
            let conn = rusqlite::Connection::open(self.sqlite_path()).expect("open SQLite");
            conn.busy_timeout(std::time::Duration::from_secs(10))
                .expect("busy timeout");
            return conn.execute(sql, []).expect("SQL runs") as u64;
        };
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let set_path = format!("SET search_path TO \"{schema}\"");
        rt.block_on(async {
            let (client, connection) = tokio_postgres::connect(&self.url, tokio_postgres::NoTls)
                .await
                .expect("connect");
            let conn = tokio::spawn(connection);
            client.batch_execute(&set_path).await.expect("search_path");
            let n = client.execute(sql, &[]).await.expect("SQL runs");
            drop(client);
            let _ = conn.await;
            n
        })
    }

    /// A store handle on this database in the test's process, on `rt`
    /// (to run a projection runner or park an event as an application
    /// would, behind the CLI's back).
    pub fn open_store(&self, rt: &tokio::runtime::Runtime) -> annals_cli::AnyStore {
        let url: annals_cli::DatabaseUrl = self.url.parse().expect("URL");
        let options = annals_cli::OpenOptions {
            pg_schema: self.pg_schema.clone(),
            must_exist: true,
            ..annals_cli::OpenOptions::default()
        };
        rt.block_on(annals_cli::AnyStore::open_with(&url, &options))
            .expect("open the store")
    }

    /// Every event in the store, via `read-all --json`.
    pub fn all_events(&self) -> Vec<Value> {
        self.run(&["read-all", "--json"]).ok().json_lines()
    }
}

/// Each PostgreSQL test has its own schema; drop it afterwards so the test
/// database does not fill up with them.
impl Drop for Db {
    fn drop(&mut self) {
        let Some(schema) = &self.pg_schema else {
            return;
        };
        let Ok(rt) = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        else {
            return;
        };
        let url = self.url.clone();
        let sql = format!("DROP SCHEMA IF EXISTS \"{schema}\" CASCADE");
        rt.block_on(async move {
            let Ok((client, connection)) =
                tokio_postgres::connect(&url, tokio_postgres::NoTls).await
            else {
                eprintln!("could not connect to drop test schema");
                return;
            };
            let conn = tokio::spawn(connection);
            if let Err(e) = client.batch_execute(&sql).await {
                eprintln!("could not drop test schema: {e}");
            }
            drop(client);
            let _ = conn.await;
        });
    }
}

/// Asserts that a JSON event object has every model field.
#[track_caller]
pub fn assert_event_fields(event: &Value) {
    let obj = event.as_object().expect("an event is a JSON object");
    for f in EVENT_FIELDS {
        assert!(obj.contains_key(*f), "missing field {f}: {event}");
    }
}
