//! Export and import rates (`docs/benchmarks.md`, "Export and import"): the
//! main store after W4 exported with `annals_cli::transfer::export` into
//! memory (JSON Lines, uncompressed; the disk is not measured), then
//! imported with `annals_cli::transfer::import` into a fresh store of the
//! same backend, in batches of `--transfer-batch` events. Reported in
//! events/s and as ratios to W4's read rate in the same run.

use std::time::Instant;

use annals::{CheckpointListing, CheckpointStore, EventImport, SnapshotAdmin, SnapshotStore};
use annals_cli::transfer::{export, import, read_lines, ExportOptions, ImportOptions, WriteSink};
use serde_json::{json, Value};

use crate::workload::Throughput;

/// What one export and import measured.
#[derive(Clone, Debug, Default)]
pub struct Transfer {
    /// The export.
    pub export: Throughput,
    /// The import.
    pub import: Throughput,
    /// Size of the export, bytes.
    pub bytes: u64,
    /// Events per import batch.
    pub batch: usize,
}

/// Exports `source` and imports it into `target` (empty).
pub async fn run<S, T>(
    source: &S,
    target: &T,
    backend: &str,
    batch: usize,
) -> anyhow::Result<Transfer>
where
    S: annals::EventStore + CheckpointListing + SnapshotAdmin + annals::KeyStore,
    T: EventImport + CheckpointStore + SnapshotStore + annals::KeyStore,
{
    let mut sink = WriteSink(Vec::new());
    let t = Instant::now();
    let exported = export(
        source,
        backend,
        &ExportOptions::default(),
        &mut sink,
        &|_| {},
    )
    .await?;
    let export_time = t.elapsed().as_secs_f64();
    let bytes = sink.0.len() as u64;
    let options = ImportOptions {
        batch_size: batch,
        ..ImportOptions::default()
    };
    let t = Instant::now();
    let lines = read_lines(std::io::Cursor::new(sink.0), "export".into(), batch * 2)?;
    let imported = import(target, lines, &options, &|_| {}).await?;
    let import_time = t.elapsed().as_secs_f64();
    anyhow::ensure!(
        imported.imported == exported.events && imported.conflicts.is_empty(),
        "imported {} of {} events ({} conflicts)",
        imported.imported,
        exported.events,
        imported.conflicts.len()
    );
    Ok(Transfer {
        export: Throughput {
            events: exported.events,
            seconds: export_time,
        },
        import: Throughput {
            events: imported.imported,
            seconds: import_time,
        },
        bytes,
        batch,
    })
}

fn round(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

fn ratio(a: f64, b: f64) -> Value {
    if b > 0.0 {
        json!(round(a / b))
    } else {
        Value::Null
    }
}

impl Transfer {
    /// The `transfer` object of the result line: rates, and ratios to W4's
    /// Annals read rate and (when the baseline ran) to the raw SQL W4.
    pub fn to_json(&self, w4: &Throughput, raw_w4: Option<&Throughput>) -> Value {
        let (e, i) = (self.export.events_per_sec(), self.import.events_per_sec());
        let mut v = json!({
            "events": self.export.events,
            "bytes": self.bytes,
            "import_batch": self.batch,
            "export_events_per_sec": round(e),
            "export_seconds": round(self.export.seconds),
            "import_events_per_sec": round(i),
            "import_seconds": round(self.import.seconds),
            "export_ratio_to_w4": ratio(e, w4.events_per_sec()),
            "import_ratio_to_w4": ratio(i, w4.events_per_sec()),
        });
        if let Some(raw) = raw_w4 {
            v["export_ratio_to_raw_w4"] = ratio(e, raw.events_per_sec());
            v["import_ratio_to_raw_w4"] = ratio(i, raw.events_per_sec());
        }
        v
    }
}
