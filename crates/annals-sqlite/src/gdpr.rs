//! [`annals::KeyStore`] on SQLite: the `subject_keys` and `erasure_log`
//! tables (migration 0009), written on the writer thread.

use annals::gdpr::{
    key_conflict, subject_hash, ErasureRecord, KeyImport, KeyImportReport, WrappedKey,
};
use annals::{KeyStore, Result};
use chrono::{DateTime, Utc};
use rusqlite::OptionalExtension;

use crate::codec::now_micros;
use crate::error::{corrupt, db};
use crate::SqliteEventStore;

impl KeyStore for SqliteEventStore {
    async fn load_key(&self, subject: &str) -> Result<Option<WrappedKey>> {
        let subject = subject.to_owned();
        self.conns()
            .read(move |conn| {
                conn.prepare_cached(
                    "SELECT master_key_id, wrapped_key FROM subject_keys WHERE subject = ?1",
                )
                .and_then(|mut s| {
                    s.query_row([&subject], |r| {
                        Ok(WrappedKey {
                            master_key_id: r.get(0)?,
                            wrapped: r.get(1)?,
                        })
                    })
                    .optional()
                })
                .map_err(db("loading a subject key"))
            })
            .await
    }

    async fn insert_key(&self, subject: &str, key: &WrappedKey) -> Result<WrappedKey> {
        let subject = subject.to_owned();
        let key = key.clone();
        self.conns()
            .write(move |conn| {
                let tx = conn.transaction().map_err(db("storing a subject key"))?;
                tx.prepare_cached(
                    "INSERT INTO subject_keys (subject, master_key_id, wrapped_key, created_at) \
                     VALUES (?1, ?2, ?3, ?4) ON CONFLICT (subject) DO NOTHING",
                )
                .and_then(|mut s| {
                    s.execute(rusqlite::params![
                        subject,
                        key.master_key_id,
                        key.wrapped,
                        now_micros()
                    ])
                })
                .map_err(db("storing a subject key"))?;
                let stored = tx
                    .prepare_cached(
                        "SELECT master_key_id, wrapped_key FROM subject_keys WHERE subject = ?1",
                    )
                    .and_then(|mut s| {
                        s.query_row([&subject], |r| {
                            Ok(WrappedKey {
                                master_key_id: r.get(0)?,
                                wrapped: r.get(1)?,
                            })
                        })
                    })
                    .map_err(db("reading back a subject key"))?;
                tx.commit().map_err(db("storing a subject key"))?;
                Ok(stored)
            })
            .await
    }

    async fn forget_key(&self, subject: &str, record: &ErasureRecord) -> Result<bool> {
        let subject = subject.to_owned();
        let record = record.clone();
        self.conns()
            .write(move |conn| {
                let tx = conn.transaction().map_err(db("forgetting a subject"))?;
                let n = tx
                    .execute("DELETE FROM subject_keys WHERE subject = ?1", [&subject])
                    .map_err(db("deleting a subject key"))?;
                tx.execute(
                    "INSERT INTO erasure_log (subject_hash, erased_at, erased_by) \
                     VALUES (?1, ?2, ?3)",
                    rusqlite::params![
                        record.subject_hash,
                        record.erased_at.timestamp_micros(),
                        record.erased_by
                    ],
                )
                .map_err(db("recording an erasure"))?;
                tx.commit().map_err(db("forgetting a subject"))?;
                Ok(n > 0)
            })
            .await
    }

    async fn erasure(&self, subject: &str) -> Result<Option<ErasureRecord>> {
        let hash = subject_hash(subject);
        self.conns()
            .read(move |conn| {
                let row: Option<(i64, String)> = conn
                    .prepare_cached(
                        "SELECT erased_at, erased_by FROM erasure_log WHERE subject_hash = ?1 \
                         ORDER BY id DESC LIMIT 1",
                    )
                    .and_then(|mut s| {
                        s.query_row([&hash], |r| Ok((r.get(0)?, r.get(1)?)))
                            .optional()
                    })
                    .map_err(db("reading the erasure log"))?;
                row.map(|(at, by)| {
                    let erased_at =
                        DateTime::<Utc>::from_timestamp_micros(at).ok_or_else(|| {
                            corrupt(
                                format!("erasure_log: timestamp {at} out of range"),
                                std::fmt::Error,
                            )
                        })?;
                    Ok(ErasureRecord {
                        subject_hash: hash.clone(),
                        erased_at,
                        erased_by: by,
                    })
                })
                .transpose()
            })
            .await
    }

    async fn import_keys(&self, import: &KeyImport) -> Result<KeyImportReport> {
        let import = import.clone();
        self.conns()
            .write(move |conn| {
                let tx = conn.transaction().map_err(db("importing subject keys"))?;
                let mut report = KeyImportReport::default();
                for k in &import.keys {
                    let stored = tx
                        .prepare_cached(
                            "SELECT master_key_id, wrapped_key FROM subject_keys WHERE subject = ?1",
                        )
                        .and_then(|mut s| {
                            s.query_row([&k.subject], |r| {
                                Ok(WrappedKey {
                                    master_key_id: r.get(0)?,
                                    wrapped: r.get(1)?,
                                })
                            })
                            .optional()
                        })
                        .map_err(db("loading a subject key"))?;
                    match stored {
                        // Dropping the transaction rolls it back: nothing
                        // is written.
                        Some(stored) => match key_conflict(&k.subject, &stored, &k.key) {
                            Some(e) => return Err(e),
                            None => report.keys_present += 1,
                        },
                        None => {
                            tx.prepare_cached(
                                "INSERT INTO subject_keys \
                                 (subject, master_key_id, wrapped_key, created_at) \
                                 VALUES (?1, ?2, ?3, ?4)",
                            )
                            .and_then(|mut s| {
                                s.execute(rusqlite::params![
                                    k.subject,
                                    k.key.master_key_id,
                                    k.key.wrapped,
                                    now_micros()
                                ])
                            })
                            .map_err(db("storing a subject key"))?;
                            report.keys_inserted += 1;
                        }
                    }
                }
                for subject in &import.forget {
                    report.keys_deleted += tx
                        .execute("DELETE FROM subject_keys WHERE subject = ?1", [subject])
                        .map_err(db("deleting a subject key"))?
                        as u64;
                }
                for r in &import.erasures {
                    let at = r.erased_at.timestamp_micros();
                    let present = tx
                        .prepare_cached(
                            "SELECT 1 FROM erasure_log WHERE subject_hash = ?1 \
                             AND erased_at = ?2 AND erased_by = ?3",
                        )
                        .and_then(|mut s| {
                            s.query_row(rusqlite::params![r.subject_hash, at, r.erased_by], |_| {
                                Ok(())
                            })
                            .optional()
                        })
                        .map_err(db("reading the erasure log"))?
                        .is_some();
                    if present {
                        report.erasures_present += 1;
                        continue;
                    }
                    tx.execute(
                        "INSERT INTO erasure_log (subject_hash, erased_at, erased_by) \
                         VALUES (?1, ?2, ?3)",
                        rusqlite::params![r.subject_hash, at, r.erased_by],
                    )
                    .map_err(db("recording an erasure"))?;
                    report.erasures_recorded += 1;
                }
                tx.commit().map_err(db("importing subject keys"))?;
                Ok(report)
            })
            .await
    }

    async fn holds_keys(&self) -> Result<bool> {
        self.conns()
            .read(|conn| {
                conn.query_row(
                    "SELECT EXISTS (SELECT 1 FROM subject_keys) \
                     OR EXISTS (SELECT 1 FROM erasure_log)",
                    [],
                    |r| r.get(0),
                )
                .map_err(db("reading the subject keys"))
            })
            .await
    }
}
