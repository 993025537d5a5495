//! The raw PostgreSQL baseline (filled in once the backend's schema is final).

use crate::workload::{Results, Sizes};

/// Runs W1-W4 in plain SQL in schema `schema`.
pub async fn run(_url: &str, _schema: &str, _sizes: &Sizes) -> anyhow::Result<Results> {
    anyhow::bail!("raw PostgreSQL baseline not written yet")
}

/// Drops a bench schema.
pub async fn drop_schema(url: &str, schema: &str) -> anyhow::Result<()> {
    let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls).await?;
    let h = tokio::spawn(conn);
    client.batch_execute(&format!("DROP SCHEMA IF EXISTS \"{schema}\" CASCADE")).await?;
    drop(client);
    let _ = h.await;
    Ok(())
}
