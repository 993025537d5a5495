//! [`annals::KeyStore`] on PostgreSQL: the `subject_keys` and `erasure_log`
//! tables (migration 0008).

use annals::gdpr::{
    key_conflict, subject_hash, ErasureRecord, KeyImport, KeyImportReport, WrappedKey,
};
use annals::{KeyStore, Result};
use chrono::{DateTime, Utc};

use crate::error::Context;
use crate::PgEventStore;

const LOAD_SQL: &str = "SELECT master_key_id, wrapped_key FROM subject_keys WHERE subject = $1";

fn wrapped(row: &tokio_postgres::Row) -> Result<WrappedKey> {
    Ok(WrappedKey {
        master_key_id: row.try_get(0).context("cannot decode a subject key")?,
        wrapped: row.try_get(1).context("cannot decode a subject key")?,
    })
}

impl KeyStore for PgEventStore {
    async fn load_key(&self, subject: &str) -> Result<Option<WrappedKey>> {
        let client = self.ready_client("load a subject key").await?;
        let row = client
            .query_opt(LOAD_SQL, &[&subject])
            .await
            .context("cannot load a subject key")?;
        row.as_ref().map(wrapped).transpose()
    }

    async fn insert_key(&self, subject: &str, key: &WrappedKey) -> Result<WrappedKey> {
        let client = self.ready_client("store a subject key").await?;
        client
            .execute(
                "INSERT INTO subject_keys (subject, master_key_id, wrapped_key) \
                 VALUES ($1, $2, $3) ON CONFLICT (subject) DO NOTHING",
                &[&subject, &key.master_key_id, &key.wrapped],
            )
            .await
            .context("cannot store a subject key")?;
        let row = client
            .query_one(LOAD_SQL, &[&subject])
            .await
            .context("cannot read back a subject key")?;
        wrapped(&row)
    }

    async fn forget_key(&self, subject: &str, record: &ErasureRecord) -> Result<bool> {
        let client = self.ready_client("forget a subject").await?;
        // One statement: the key goes and the erasure is logged together.
        let row = client
            .query_one(
                "WITH d AS (DELETE FROM subject_keys WHERE subject = $1 RETURNING 1), \
                 i AS (INSERT INTO erasure_log (subject_hash, erased_at, erased_by) \
                       VALUES ($2, $3, $4)) \
                 SELECT count(*) FROM d",
                &[
                    &subject,
                    &record.subject_hash,
                    &record.erased_at,
                    &record.erased_by,
                ],
            )
            .await
            .context("cannot forget a subject")?;
        let n: i64 = row.try_get(0).context("cannot forget a subject")?;
        Ok(n > 0)
    }

    async fn erasure(&self, subject: &str) -> Result<Option<ErasureRecord>> {
        let hash = subject_hash(subject);
        let client = self.ready_client("read the erasure log").await?;
        let row = client
            .query_opt(
                "SELECT erased_at, erased_by FROM erasure_log WHERE subject_hash = $1 \
                 ORDER BY id DESC LIMIT 1",
                &[&hash],
            )
            .await
            .context("cannot read the erasure log")?;
        row.map(|r| {
            let erased_at: DateTime<Utc> = r.try_get(0).context("cannot decode an erasure")?;
            let erased_by: String = r.try_get(1).context("cannot decode an erasure")?;
            Ok(ErasureRecord {
                subject_hash: hash.clone(),
                erased_at,
                erased_by,
            })
        })
        .transpose()
    }

    async fn import_keys(&self, import: &KeyImport) -> Result<KeyImportReport> {
        let mut client = self.ready_client("import subject keys").await?;
        let tx = client
            .transaction()
            .await
            .context("cannot import subject keys")?;
        let mut report = KeyImportReport::default();
        for k in &import.keys {
            // Inserted unless present, then read back: a concurrent writer's
            // key is seen like one stored before.
            let n = tx
                .execute(
                    "INSERT INTO subject_keys (subject, master_key_id, wrapped_key) \
                     VALUES ($1, $2, $3) ON CONFLICT (subject) DO NOTHING",
                    &[&k.subject, &k.key.master_key_id, &k.key.wrapped],
                )
                .await
                .context("cannot store a subject key")?;
            if n == 1 {
                report.keys_inserted += 1;
                continue;
            }
            let row = tx
                .query_one(LOAD_SQL, &[&k.subject])
                .await
                .context("cannot read back a subject key")?;
            // Returning drops the transaction: it rolls back, nothing is
            // written.
            if let Some(e) = key_conflict(&k.subject, &wrapped(&row)?, &k.key) {
                return Err(e);
            }
            report.keys_present += 1;
        }
        for subject in &import.forget {
            report.keys_deleted += tx
                .execute("DELETE FROM subject_keys WHERE subject = $1", &[subject])
                .await
                .context("cannot delete a subject key")?;
        }
        for r in &import.erasures {
            // Microseconds, as stored: the comparison is exact.
            let n = tx
                .execute(
                    "INSERT INTO erasure_log (subject_hash, erased_at, erased_by) \
                     SELECT $1, $2, $3 WHERE NOT EXISTS (SELECT 1 FROM erasure_log \
                       WHERE subject_hash = $1 AND erased_at = $2 AND erased_by = $3)",
                    &[&r.subject_hash, &r.erased_at, &r.erased_by],
                )
                .await
                .context("cannot record an erasure")?;
            if n == 1 {
                report.erasures_recorded += 1;
            } else {
                report.erasures_present += 1;
            }
        }
        tx.commit().await.context("cannot import subject keys")?;
        Ok(report)
    }

    async fn holds_keys(&self) -> Result<bool> {
        let client = self.ready_client("read the subject keys").await?;
        let row = client
            .query_one(
                "SELECT EXISTS (SELECT 1 FROM subject_keys) \
                 OR EXISTS (SELECT 1 FROM erasure_log)",
                &[],
            )
            .await
            .context("cannot read the subject keys")?;
        row.try_get(0).context("cannot read the subject keys")
    }
}
