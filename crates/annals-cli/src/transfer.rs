//! `annals export` and `annals import`: a store as JSON Lines, and back into
//! any store.
//!
//! # The file
//!
//! One JSON object per line, each with one key naming its kind:
//!
//! 1. `{"header": {"format": "annals-export", "version": 2, "source_backend",
//!    "head_position", "exported_at", "categories", "since", "until"}}`;
//! 2. `{"subject_key": {"subject", "master_key_id", "wrapped"}}` per subject
//!    whose data key encrypts an exported event or snapshot: the key as
//!    stored, *wrapped* by the master key (`wrapped` is base64 of nonce and
//!    ciphertext; `master_key_id` a hash naming the master key). Neither a
//!    plaintext data key nor the master key is ever written;
//! 3. `{"erasure": {"subject", "erased_at", "erased_by"}}` per such subject
//!    that was forgotten (its latest erasure record);
//! 4. `{"event": {...}}` per event, in the source's global order, with every
//!    field of a recorded event (its old `global_position` included), personal
//!    fields encrypted as stored;
//! 5. `{"checkpoint": {"name", "position"}}` per checkpoint (only in an
//!    export without filters: a checkpoint of a partial log means nothing);
//! 6. `{"snapshot": {...}}` per live snapshot (not with `--since` or
//!    `--until`; with `--category`, those of the categories), encrypted as
//!    stored;
//! 7. `{"trailer": {"events", "checkpoints", "snapshots", "keys",
//!    "erasures"}}`: the counts, so that a file cut at a line boundary is told
//!    from a whole one.
//!
//! Version 1 files (before keys were exported: no `subject_key` nor
//! `erasure` lines, a trailer without their counts) still import.
//!
//! Export reads `read_all` lazily up to the head position it found when it
//! started, so it holds one page of events at a time; a file is written by a
//! thread of its own (zstd-compressed when its name ends in `.zst`). When the
//! store holds any data key or erasure, the events and snapshots are read
//! twice: first to find their subjects (kept in memory, one string each), so
//! that the keys come before the events in the file.
//!
//! # Import
//!
//! A thread reads and parses the file line by line; the import takes the
//! lines from it through a bounded channel, so neither holds the file.
//! Events are imported [`EventImport::import_events`] a batch at a time
//! (`--batch-size` lines). What is written from a bad file is exactly this:
//! a batch is written once every one of its lines has been read and parsed
//! (the events' last batch once the line after it is read), so a file that
//! is cut or corrupt at line N has its complete batches before the batch
//! holding line N written and nothing after; snapshots likewise; checkpoints
//! only once the trailer was read and its counts agree with the lines. A
//! rerun on the whole file then adds what is missing (the import is
//! idempotent).
//!
//! Keys and erasures are imported before any event, all together in one
//! transaction ([`annals::KeyStore::import_keys`]), once the line after them
//! was read (they are held in memory until then): a key that differs from
//! the one the target holds for the subject is an [`ImportKeyConflict`]
//! naming the subject and the line, and then nothing at all is written. A
//! subject with an erasure and no key in the file was forgotten in the
//! source: its key in the target, if any, is deleted too, so that its
//! personal fields read as `"[erased]"` there as well (the target's
//! projections are not notified: `annals gdpr forget` there does that).
//!
//! Checkpoints are translated: a checkpoint at old position `p` becomes the
//! new position of the last event present after the import (imported now, or
//! already there) whose old position is at most `p`. The map from old to new
//! positions is kept in an anonymous temporary file (32 bytes per event,
//! written a batch at a time on a blocking thread), not in memory, and read
//! once at the end. Before saving them, the import waits until the target's
//! `head_position` (what a `read_all` reader can see) has reached the
//! translated positions: on PostgreSQL that means every transaction that
//! could still commit below them has ended, so a projection resuming there
//! misses nothing.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::io::{BufRead, BufReader, BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use annals::gdpr::{
    encrypted_subjects, subject_hash, ErasureRecord, GdprError, KeyImport, KeyImportReport,
    SubjectKey, WrappedKey,
};
use annals::{
    Checkpoint, CheckpointListing, CheckpointStore, EventImport, EventStore, GlobalPosition,
    ImportConflict, ImportEvent, KeyStore, ReadAll, RecordedEvent, Snapshot, SnapshotAdmin,
    SnapshotStore, SnapshotWrite, StreamId,
};
use anyhow::{anyhow, bail, Context};
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use chrono::{DateTime, Utc};
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

/// The `format` of a header.
pub const FORMAT: &str = "annals-export";
/// The version of the format this build writes.
pub const FORMAT_VERSION: u32 = 2;
/// The oldest version this build reads (version 1 had no keys).
pub const OLDEST_FORMAT_VERSION: u32 = 1;

/// How many bytes of lines export gathers before handing them to the writer.
const CHUNK_BYTES: usize = 256 << 10;

/// The first line of an export.
#[derive(Clone, PartialEq, Debug, Serialize, Deserialize)]
pub struct Header {
    /// Always [`FORMAT`].
    pub format: String,
    /// [`FORMAT_VERSION`] of the writer.
    pub version: u32,
    /// The backend exported from (`sqlite`, `postgres`).
    pub source_backend: String,
    /// The source's head position when the export started: the events
    /// exported are those up to it.
    pub head_position: Option<GlobalPosition>,
    /// When the export started.
    pub exported_at: DateTime<Utc>,
    /// The `--category` filter (empty: all).
    pub categories: Vec<String>,
    /// The `--since` filter.
    pub since: Option<DateTime<Utc>>,
    /// The `--until` filter.
    pub until: Option<DateTime<Utc>>,
}

/// The last line of an export: what came before it.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default, Serialize, Deserialize)]
pub struct Trailer {
    /// Event lines.
    pub events: u64,
    /// Checkpoint lines.
    pub checkpoints: u64,
    /// Snapshot lines.
    pub snapshots: u64,
    /// Subject key lines (absent in version 1).
    #[serde(default)]
    pub keys: u64,
    /// Erasure lines (absent in version 1).
    #[serde(default)]
    pub erasures: u64,
}

/// A subject's data key in an export: wrapped, as stored.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub struct ExportedKey {
    /// The subject.
    pub subject: String,
    /// The id (a hash) of the master key that wrapped it.
    pub master_key_id: String,
    /// Base64 of the nonce and the wrapped key.
    pub wrapped: String,
}

/// A forgotten subject's latest erasure record in an export. The subject is
/// named (its events in the file name it too), so that the target can
/// delete its key as well.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub struct ExportedErasure {
    /// The subject.
    pub subject: String,
    /// When it was forgotten.
    pub erased_at: DateTime<Utc>,
    /// Who asked.
    pub erased_by: String,
}

/// One line of an export.
#[derive(Clone, PartialEq, Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Line {
    /// The first line.
    Header(Header),
    /// One subject's wrapped data key (version 2).
    SubjectKey(ExportedKey),
    /// One forgotten subject's erasure (version 2).
    Erasure(ExportedErasure),
    /// One event, as recorded by the source.
    Event(RecordedEvent),
    /// One checkpoint, at its position in the source.
    Checkpoint(Checkpoint),
    /// One live snapshot.
    Snapshot(Snapshot),
    /// The last line.
    Trailer(Trailer),
}

/// What to export.
#[derive(Clone, PartialEq, Debug, Default)]
pub struct ExportOptions {
    /// Only these categories (empty: all).
    pub categories: Vec<String>,
    /// Only events recorded at or after this instant.
    pub since: Option<DateTime<Utc>>,
    /// Only events recorded at or before this instant.
    pub until: Option<DateTime<Utc>>,
}

/// What an export wrote.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default, Serialize)]
pub struct ExportSummary {
    /// Event lines.
    pub events: u64,
    /// Checkpoint lines.
    pub checkpoints: u64,
    /// Snapshot lines.
    pub snapshots: u64,
    /// Subject key lines.
    pub keys: u64,
    /// Erasure lines.
    pub erasures: u64,
}

/// An imported key differs from the one the target holds for its subject:
/// the two stores encrypted the subject's data with different keys. Nothing
/// of the file was written.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct ImportKeyConflict {
    /// The line of the key in the file.
    pub line: u64,
    /// The subject.
    pub subject: String,
    /// The master key id of the target's key.
    pub stored_key_id: String,
    /// The master key id of the file's key.
    pub imported_key_id: String,
}

impl std::fmt::Display for ImportKeyConflict {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "line {}: the data key of subject {:?} differs from the one the store holds \
             (wrapped by master key {} there, {} in the file); nothing was imported",
            self.line, self.subject, self.stored_key_id, self.imported_key_id
        )
    }
}

impl std::error::Error for ImportKeyConflict {}

/// The aggregate types whose live snapshots an export holds.
async fn snapshot_types<S: SnapshotAdmin>(
    store: &S,
    options: &ExportOptions,
) -> anyhow::Result<Vec<String>> {
    if options.since.is_some() || options.until.is_some() {
        return Ok(Vec::new());
    }
    let coverage = store
        .snapshot_coverage(None)
        .await
        .context("cannot list the aggregate types with snapshots")?;
    Ok(coverage
        .into_iter()
        .filter(|c| {
            c.with_snapshot > 0
                && (options.categories.is_empty() || options.categories.contains(&c.aggregate_type))
        })
        .map(|c| c.aggregate_type)
        .collect())
}

/// The subjects whose keys encrypt the events up to `head` and the
/// snapshots of `types` (the export's first pass).
async fn exported_subjects<S: EventStore + SnapshotAdmin>(
    store: &S,
    read: &ReadAll,
    head: Option<GlobalPosition>,
    types: &[String],
) -> anyhow::Result<BTreeSet<String>> {
    let mut subjects = BTreeSet::new();
    let mut add = |value: &serde_json::Value| {
        for s in encrypted_subjects(value) {
            if !subjects.contains(s) {
                subjects.insert(s.to_owned());
            }
        }
    };
    if let Some(head) = head {
        let mut events = store.read_all(read.clone());
        while let Some(e) = events.next().await {
            let e = e.context("cannot read the events")?;
            if e.global_position > head {
                break;
            }
            if !e.data.as_str().contains("\"$enc\"") {
                continue;
            }
            let value = e.data.to_value().with_context(|| {
                format!(
                    "event {}@{} (position {}) is not JSON",
                    e.stream_id, e.stream_version, e.global_position
                )
            })?;
            add(&value);
        }
    }
    for t in types {
        let mut snapshots = store.live_snapshots(t);
        while let Some(s) = snapshots.next().await {
            let s = s.with_context(|| format!("cannot read the snapshots of {t}"))?;
            add(&s.state);
        }
    }
    Ok(subjects)
}

/// Writes an export of `store` to `out` (see the module docs), calling
/// `progress` with the number of events written so far after each chunk.
/// `out` gets chunks of lines of a few hundred kilobytes.
pub async fn export<S, O>(
    store: &S,
    source_backend: &str,
    options: &ExportOptions,
    out: &mut O,
    progress: &(dyn Fn(u64) + Send + Sync),
) -> anyhow::Result<ExportSummary>
where
    S: EventStore + CheckpointListing + SnapshotAdmin + KeyStore,
    O: ChunkSink,
{
    let head = store.head_position().await?;
    let filtered =
        !options.categories.is_empty() || options.since.is_some() || options.until.is_some();
    let header = Header {
        format: FORMAT.into(),
        version: FORMAT_VERSION,
        source_backend: source_backend.into(),
        head_position: head,
        exported_at: Utc::now(),
        categories: options.categories.clone(),
        since: options.since,
        until: options.until,
    };
    let mut chunk = Vec::with_capacity(CHUNK_BYTES + 4096);
    push_line(&mut chunk, &Line::Header(header))?;
    let mut summary = ExportSummary::default();
    let read = ReadAll {
        categories: options.categories.clone(),
        since: options.since,
        until: options.until,
        ..ReadAll::default()
    };
    let types = snapshot_types(store, options).await?;
    if store
        .holds_keys()
        .await
        .context("cannot read the subject keys")?
    {
        for subject in exported_subjects(store, &read, head, &types).await? {
            let key = store
                .load_key(&subject)
                .await
                .with_context(|| format!("cannot load the data key of subject {subject:?}"))?;
            if let Some(k) = key {
                push_line(
                    &mut chunk,
                    &Line::SubjectKey(ExportedKey {
                        subject: subject.clone(),
                        master_key_id: k.master_key_id,
                        wrapped: B64.encode(&k.wrapped),
                    }),
                )?;
                summary.keys += 1;
            }
            let erasure = store
                .erasure(&subject)
                .await
                .with_context(|| format!("cannot read the erasure of subject {subject:?}"))?;
            if let Some(r) = erasure {
                push_line(
                    &mut chunk,
                    &Line::Erasure(ExportedErasure {
                        subject,
                        erased_at: r.erased_at,
                        erased_by: r.erased_by,
                    }),
                )?;
                summary.erasures += 1;
            }
            if chunk.len() >= CHUNK_BYTES {
                out.put(std::mem::take(&mut chunk)).await?;
            }
        }
    }
    if let Some(head) = head {
        let mut events = store.read_all(read);
        while let Some(e) = events.next().await {
            let e = e.context("cannot read the events")?;
            if e.global_position > head {
                break;
            }
            push_line(&mut chunk, &Line::Event(e))?;
            summary.events += 1;
            if chunk.len() >= CHUNK_BYTES {
                out.put(std::mem::take(&mut chunk)).await?;
                progress(summary.events);
            }
        }
    }
    if !filtered {
        for c in store
            .list_checkpoints()
            .await
            .context("cannot list the checkpoints")?
        {
            push_line(&mut chunk, &Line::Checkpoint(c))?;
            summary.checkpoints += 1;
        }
    }
    for t in &types {
        let mut snapshots = store.live_snapshots(t);
        while let Some(s) = snapshots.next().await {
            let s = s.with_context(|| format!("cannot read the snapshots of {t}"))?;
            push_line(&mut chunk, &Line::Snapshot(s))?;
            summary.snapshots += 1;
            if chunk.len() >= CHUNK_BYTES {
                out.put(std::mem::take(&mut chunk)).await?;
            }
        }
    }
    push_line(
        &mut chunk,
        &Line::Trailer(Trailer {
            events: summary.events,
            checkpoints: summary.checkpoints,
            snapshots: summary.snapshots,
            keys: summary.keys,
            erasures: summary.erasures,
        }),
    )?;
    out.put(chunk).await?;
    progress(summary.events);
    Ok(summary)
}

fn push_line(chunk: &mut Vec<u8>, line: &Line) -> anyhow::Result<()> {
    serde_json::to_writer(&mut *chunk, line).context("cannot encode an export line")?;
    chunk.push(b'\n');
    Ok(())
}

/// Where [`export`] sends its chunks of lines.
pub trait ChunkSink: Send {
    /// Takes the next chunk, whole lines only.
    fn put(
        &mut self,
        chunk: Vec<u8>,
    ) -> impl std::future::Future<Output = anyhow::Result<()>> + Send;
}

/// A [`ChunkSink`] writing straight to a `Write` (standard output, a buffer
/// in memory).
#[derive(Debug)]
pub struct WriteSink<W>(pub W);

impl<W: Write + Send> ChunkSink for WriteSink<W> {
    async fn put(&mut self, chunk: Vec<u8>) -> anyhow::Result<()> {
        self.0.write_all(&chunk)?;
        Ok(())
    }
}

/// A [`ChunkSink`] writing a file on a thread of its own (so that the async
/// runtime never waits for the disk), zstd-compressed when the name ends in
/// `.zst`. [`FileSink::finish`] flushes and reports the first write error.
#[derive(Debug)]
pub struct FileSink {
    chunks: Option<mpsc::Sender<Vec<u8>>>,
    thread: Option<std::thread::JoinHandle<anyhow::Result<()>>>,
}

impl FileSink {
    /// Creates (or truncates) `path` and starts the writer thread.
    pub fn create(path: &Path) -> anyhow::Result<FileSink> {
        let file = std::fs::File::create(path)
            .with_context(|| format!("cannot create {}", path.display()))?;
        let zst = is_zst(path);
        let shown = path.display().to_string();
        let (tx, mut rx) = mpsc::channel::<Vec<u8>>(4);
        let thread = std::thread::Builder::new()
            .name("annals-export-writer".into())
            .spawn(move || -> anyhow::Result<()> {
                let what = || format!("cannot write {shown}");
                let file = BufWriter::new(file);
                let mut out: Box<dyn Write> = if zst {
                    Box::new(
                        zstd::Encoder::new(file, 3)
                            .with_context(what)?
                            .auto_finish(),
                    )
                } else {
                    Box::new(file)
                };
                while let Some(chunk) = rx.blocking_recv() {
                    out.write_all(&chunk).with_context(what)?;
                }
                out.flush().with_context(what)?;
                drop(out);
                Ok(())
            })
            .context("cannot start the export writer thread")?;
        Ok(FileSink {
            chunks: Some(tx),
            thread: Some(thread),
        })
    }

    /// Waits for the writer thread to write and close the file.
    pub async fn finish(mut self) -> anyhow::Result<()> {
        self.chunks = None;
        let Some(thread) = self.thread.take() else {
            return Ok(());
        };
        tokio::task::spawn_blocking(move || thread.join())
            .await
            .context("the export writer thread was lost")?
            .map_err(|_| anyhow!("the export writer thread panicked"))?
    }
}

impl ChunkSink for FileSink {
    async fn put(&mut self, chunk: Vec<u8>) -> anyhow::Result<()> {
        let sent = match &self.chunks {
            Some(tx) => tx.send(chunk).await.is_ok(),
            None => false,
        };
        if sent {
            return Ok(());
        }
        // The thread stopped: its error says why.
        self.chunks = None;
        match self.thread.take() {
            Some(thread) => match tokio::task::spawn_blocking(move || thread.join()).await {
                Ok(Ok(Err(e))) => Err(e),
                _ => bail!("the export writer thread stopped"),
            },
            None => bail!("the export writer thread stopped"),
        }
    }
}

fn is_zst(path: &Path) -> bool {
    path.extension().is_some_and(|e| e == "zst")
}

/// One parsed line, or why the file cannot be read further.
type ParsedLine = Result<(u64, Line), anyhow::Error>;

/// Reads `source` line by line on a thread of its own and sends each parsed
/// line with its number (from 1), at most `capacity` ahead of the receiver.
/// A line that does not end in a newline (the file was cut inside it), that
/// is not JSON of a [`Line`], or a read error, is sent as an error naming
/// `name` and the line, and ends the reading.
pub fn read_lines<R: Read + Send + 'static>(
    source: R,
    name: String,
    capacity: usize,
) -> anyhow::Result<mpsc::Receiver<ParsedLine>> {
    let (tx, rx) = mpsc::channel(capacity.max(1));
    std::thread::Builder::new()
        .name("annals-import-reader".into())
        .spawn(move || {
            let mut reader = BufReader::with_capacity(256 << 10, source);
            let mut buf = Vec::new();
            let mut n = 0u64;
            loop {
                buf.clear();
                n += 1;
                let parsed = match reader.read_until(b'\n', &mut buf) {
                    Ok(0) => return,
                    Ok(_) if buf.last() != Some(&b'\n') => Err(anyhow!(
                        "{name}: line {n} is incomplete: the file ends inside it (truncated)"
                    )),
                    Ok(_) => serde_json::from_slice::<Line>(&buf)
                        .map(|line| (n, line))
                        .map_err(|e| anyhow!("{name}: line {n} is not an export line: {e}")),
                    Err(e) => Err(anyhow!("{name}: cannot read line {n}: {e}")),
                };
                let stop = parsed.is_err();
                if tx.blocking_send(parsed).is_err() || stop {
                    return;
                }
            }
        })
        .context("cannot start the import reader thread")?;
    Ok(rx)
}

/// Opens an export file for [`read_lines`], decompressing a `.zst` file.
pub fn open_export(path: &Path) -> anyhow::Result<Box<dyn Read + Send>> {
    let file =
        std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    Ok(if is_zst(path) {
        Box::new(
            zstd::Decoder::new(file)
                .with_context(|| format!("cannot read {} as zstd", path.display()))?,
        )
    } else {
        Box::new(file)
    })
}

/// How to import.
#[derive(Clone, PartialEq, Debug)]
pub struct ImportOptions {
    /// Events (and snapshots) per write.
    pub batch_size: usize,
    /// How long to wait for the target's head to reach the translated
    /// checkpoints (see the module docs).
    pub horizon_wait: Duration,
}

impl Default for ImportOptions {
    fn default() -> Self {
        ImportOptions {
            batch_size: 500,
            horizon_wait: Duration::from_secs(60),
        }
    }
}

/// What an import did.
#[derive(Clone, PartialEq, Debug, Default)]
pub struct ImportSummary {
    /// The file's header.
    pub header: Option<Header>,
    /// Events written.
    pub imported: u64,
    /// Events already stored identically.
    pub skipped: u64,
    /// Events not written because their stream conflicted.
    pub not_written: u64,
    /// The conflicting streams, each with its first conflicting version.
    pub conflicts: Vec<ImportConflict>,
    /// Checkpoints saved, with their new positions.
    pub checkpoints: Vec<Checkpoint>,
    /// Checkpoints not saved: no event at or before them is in the target.
    pub checkpoints_untranslated: Vec<String>,
    /// Snapshots written as live.
    pub snapshots_written: u64,
    /// Snapshots not written: a newer one is live, or the stream in the
    /// target is behind the snapshot's version.
    pub snapshots_skipped: u64,
    /// Subject key lines and erasure lines read.
    pub key_lines: u64,
    /// What the keys and erasures did in the target.
    pub keys: KeyImportReport,
}

/// Which part of the file the import is in.
#[derive(Clone, Copy, PartialEq, Eq, Debug, PartialOrd, Ord)]
enum Part {
    Keys,
    Events,
    Checkpoints,
    Snapshots,
}

/// Imports the lines of an export (from [`read_lines`]) into `store`; see
/// the module docs for what is written when the file is bad. `progress` is
/// called with the number of events read so far after each batch.
pub async fn import<S>(
    store: &S,
    mut lines: mpsc::Receiver<ParsedLine>,
    options: &ImportOptions,
    progress: &(dyn Fn(u64) + Send + Sync),
) -> anyhow::Result<ImportSummary>
where
    S: EventImport + CheckpointStore + SnapshotStore + KeyStore,
{
    let batch_size = options.batch_size.max(1);
    let mut keys = PendingKeys::default();
    let mut summary = ImportSummary::default();
    let mut map = PositionMap::new()?;
    let mut conflicted: HashSet<StreamId> = HashSet::new();
    let mut events: Vec<(GlobalPosition, ImportEvent)> = Vec::with_capacity(batch_size);
    let mut snapshots: Vec<Snapshot> = Vec::new();
    let mut checkpoints: Vec<Checkpoint> = Vec::new();
    let mut seen = Trailer::default();
    let mut part = Part::Keys;
    let mut last_old: Option<GlobalPosition> = None;
    let mut last_line = 0;
    let trailer = loop {
        let Some(next) = lines.recv().await else {
            bail!(
                "the file ends after line {last_line} without a trailer: it is truncated \
                 (complete batches before it were imported; nothing after)"
            );
        };
        let (n, line) = next?;
        last_line = n;
        let line = match (n, line) {
            (1, Line::Header(h)) => {
                if h.format != FORMAT
                    || !(OLDEST_FORMAT_VERSION..=FORMAT_VERSION).contains(&h.version)
                {
                    bail!(
                        "line 1: format {:?} version {} is not {FORMAT:?} version \
                         {OLDEST_FORMAT_VERSION} to {FORMAT_VERSION}",
                        h.format,
                        h.version
                    );
                }
                summary.header = Some(h);
                continue;
            }
            (1, _) => bail!("line 1 is not an export header"),
            (_, line) => line,
        };
        let kind = match &line {
            Line::SubjectKey(_) | Line::Erasure(_) => Some(Part::Keys),
            Line::Event(_) => Some(Part::Events),
            Line::Checkpoint(_) => Some(Part::Checkpoints),
            Line::Snapshot(_) => Some(Part::Snapshots),
            _ => None,
        };
        if let Some(kind) = kind {
            if kind < part {
                bail!(
                    "line {n}: out of order (keys and erasures, then events, then checkpoints, \
                     then snapshots)"
                );
            }
            if part == Part::Keys && kind > part {
                // Every key is read: they are written before any event.
                keys.import(store, &mut summary).await?;
            }
            if kind > part {
                // The events' last batch is complete once another part starts.
                import_batch(store, &mut events, &mut map, &mut conflicted, &mut summary).await?;
                progress(seen.events);
                part = kind;
            }
        }
        match line {
            Line::SubjectKey(k) => {
                seen.keys += 1;
                keys.key(n, k)?;
            }
            Line::Erasure(r) => {
                seen.erasures += 1;
                keys.erasure(n, r);
            }
            Line::Event(e) => {
                if last_old.is_some_and(|p| e.global_position <= p) {
                    bail!(
                        "line {n}: position {} does not follow {} (not in global order)",
                        e.global_position,
                        last_old.map_or_else(String::new, |p| p.to_string())
                    );
                }
                last_old = Some(e.global_position);
                seen.events += 1;
                if conflicted.contains(&e.stream_id) {
                    summary.not_written += 1;
                    continue;
                }
                events.push((e.global_position, ImportEvent::from(e)));
                if events.len() >= batch_size {
                    import_batch(store, &mut events, &mut map, &mut conflicted, &mut summary)
                        .await?;
                    progress(seen.events);
                }
            }
            Line::Checkpoint(c) => {
                seen.checkpoints += 1;
                checkpoints.push(c);
            }
            Line::Snapshot(s) => {
                seen.snapshots += 1;
                snapshots.push(s);
                if snapshots.len() >= batch_size {
                    import_snapshots(store, &mut snapshots, &mut summary).await?;
                }
            }
            Line::Trailer(t) => break (n, t),
            Line::Header(_) => bail!("line {n}: a second header"),
        }
    };
    let (n, trailer) = trailer;
    if trailer != seen {
        bail!(
            "line {n}: the trailer counts {} events, {} checkpoints, {} snapshots, {} keys, \
             {} erasures, the file holds {}, {}, {}, {}, {}",
            trailer.events,
            trailer.checkpoints,
            trailer.snapshots,
            trailer.keys,
            trailer.erasures,
            seen.events,
            seen.checkpoints,
            seen.snapshots,
            seen.keys,
            seen.erasures
        );
    }
    if let Some(next) = lines.recv().await {
        let (k, _) = next?;
        bail!("line {k}: a line after the trailer");
    }
    // A file of keys alone: they are written once the trailer agrees.
    keys.import(store, &mut summary).await?;
    import_batch(store, &mut events, &mut map, &mut conflicted, &mut summary).await?;
    progress(seen.events);
    import_snapshots(store, &mut snapshots, &mut summary).await?;
    save_checkpoints(store, checkpoints, map, options, &mut summary).await?;
    Ok(summary)
}

/// The keys and erasures of a file, held until its key part ends.
#[derive(Default)]
struct PendingKeys {
    /// Line of each key, by subject.
    lines: HashMap<String, u64>,
    import: KeyImport,
    /// Subjects with an erasure line.
    erased: Vec<String>,
    done: bool,
}

impl PendingKeys {
    fn key(&mut self, n: u64, k: ExportedKey) -> anyhow::Result<()> {
        let wrapped = B64.decode(&k.wrapped).map_err(|e| {
            anyhow!(
                "line {n}: the wrapped data key of subject {:?} is not base64: {e}",
                k.subject
            )
        })?;
        self.lines.entry(k.subject.clone()).or_insert(n);
        self.import.keys.push(SubjectKey {
            subject: k.subject,
            key: WrappedKey {
                master_key_id: k.master_key_id,
                wrapped,
            },
        });
        Ok(())
    }

    fn erasure(&mut self, _n: u64, r: ExportedErasure) {
        self.import.erasures.push(ErasureRecord {
            subject_hash: subject_hash(&r.subject),
            erased_at: r.erased_at,
            erased_by: r.erased_by,
        });
        self.erased.push(r.subject);
    }

    /// Writes them all in one transaction (once): a conflicting key is an
    /// [`ImportKeyConflict`], and nothing is written.
    async fn import<S: KeyStore>(
        &mut self,
        store: &S,
        summary: &mut ImportSummary,
    ) -> anyhow::Result<()> {
        if std::mem::replace(&mut self.done, true) {
            return Ok(());
        }
        summary.key_lines = (self.import.keys.len() + self.erased.len()) as u64;
        if summary.key_lines == 0 {
            return Ok(());
        }
        // Forgotten in the source: no key came with the erasure.
        let mut import = std::mem::take(&mut self.import);
        import.forget = std::mem::take(&mut self.erased)
            .into_iter()
            .filter(|s| !self.lines.contains_key(s))
            .collect();
        import.forget.dedup();
        summary.keys = match store.import_keys(&import).await {
            Ok(report) => report,
            Err(annals::Error::Gdpr(e)) => match *e {
                GdprError::KeyConflict {
                    subject,
                    stored_key_id,
                    imported_key_id,
                } => {
                    return Err(ImportKeyConflict {
                        line: self.lines.get(&subject).copied().unwrap_or_default(),
                        subject,
                        stored_key_id,
                        imported_key_id,
                    }
                    .into())
                }
                other => return Err(annals::Error::Gdpr(Box::new(other)).into()),
            },
            Err(e) => return Err(anyhow::Error::new(e).context("cannot import the subject keys")),
        };
        Ok(())
    }
}

async fn import_batch<S: EventImport>(
    store: &S,
    events: &mut Vec<(GlobalPosition, ImportEvent)>,
    map: &mut PositionMap,
    conflicted: &mut HashSet<StreamId>,
    summary: &mut ImportSummary,
) -> anyhow::Result<()> {
    if events.is_empty() {
        return Ok(());
    }
    let (old, batch): (Vec<GlobalPosition>, Vec<ImportEvent>) = std::mem::take(events)
        .into_iter()
        .filter(|(_, e)| !conflicted.contains(&e.stream_id))
        .unzip();
    let first = batch
        .first()
        .map(|e| (e.stream_id.clone(), e.stream_version));
    let report = store
        .import_events(batch)
        .await
        .with_context(|| match first {
            Some((s, v)) => format!("cannot import the batch starting at {s} version {v}"),
            None => "cannot import a batch".into(),
        })?;
    summary.imported += report.imported;
    summary.skipped += report.skipped;
    summary.not_written += report.positions.iter().filter(|p| p.is_none()).count() as u64;
    for c in report.conflicts {
        conflicted.insert(c.stream.clone());
        summary.conflicts.push(c);
    }
    let pairs: Vec<(GlobalPosition, GlobalPosition)> = old
        .into_iter()
        .zip(report.positions)
        .filter_map(|(o, n)| n.map(|n| (o, n)))
        .collect();
    map.record(pairs).await
}

async fn import_snapshots<S: EventStore + SnapshotStore>(
    store: &S,
    snapshots: &mut Vec<Snapshot>,
    summary: &mut ImportSummary,
) -> anyhow::Result<()> {
    for s in std::mem::take(snapshots) {
        let stream = StreamId::parse(&format!("{}-{}", s.aggregate_type, s.aggregate_id))
            .with_context(|| {
                format!(
                    "snapshot of {} {}: not a stream name",
                    s.aggregate_type, s.aggregate_id
                )
            })?;
        let head = store.stream_version(&stream).await?;
        if head.is_none_or(|h| h < s.version) {
            summary.snapshots_skipped += 1;
            continue;
        }
        match store
            .save_snapshot(&s)
            .await
            .with_context(|| format!("cannot save the snapshot of {stream}"))?
        {
            SnapshotWrite::Written => summary.snapshots_written += 1,
            SnapshotWrite::Superseded => summary.snapshots_skipped += 1,
        }
    }
    Ok(())
}

async fn save_checkpoints<S: EventStore + CheckpointStore>(
    store: &S,
    mut checkpoints: Vec<Checkpoint>,
    map: PositionMap,
    options: &ImportOptions,
    summary: &mut ImportSummary,
) -> anyhow::Result<()> {
    if checkpoints.is_empty() {
        return Ok(());
    }
    checkpoints.sort_by_key(|c| c.position);
    let translated = map.translate(checkpoints).await?;
    let Some(highest) = translated.iter().filter_map(|(_, p)| *p).max() else {
        summary.checkpoints_untranslated = translated.into_iter().map(|(c, _)| c.name).collect();
        return Ok(());
    };
    // Wait until a `read_all` reader of the target can see the highest
    // translated position (see the module docs).
    let deadline = tokio::time::Instant::now() + options.horizon_wait;
    loop {
        if store.head_position().await?.is_some_and(|h| h >= highest) {
            break;
        }
        if tokio::time::Instant::now() >= deadline {
            bail!(
                "checkpoints not saved: the target's readers did not reach position {highest} \
                 within {:?} (a long transaction holds them back); run the import again",
                options.horizon_wait
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for (c, new) in translated {
        match new {
            Some(position) => {
                store
                    .save_checkpoint(&c.name, position)
                    .await
                    .with_context(|| format!("cannot save checkpoint {:?}", c.name))?;
                summary.checkpoints.push(Checkpoint {
                    name: c.name,
                    position,
                });
            }
            None => summary.checkpoints_untranslated.push(c.name),
        }
    }
    summary.checkpoints.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(())
}

/// The old and new position of every event present after each batch, in
/// old-position order, in an anonymous temporary file: 32 bytes per event
/// (four big-endian `u64`s), written and read on blocking threads.
struct PositionMap {
    file: Option<std::fs::File>,
}

impl PositionMap {
    fn new() -> anyhow::Result<Self> {
        let file = tempfile::tempfile().context("cannot create the position map's temp file")?;
        Ok(PositionMap { file: Some(file) })
    }

    async fn record(&mut self, pairs: Vec<(GlobalPosition, GlobalPosition)>) -> anyhow::Result<()> {
        if pairs.is_empty() {
            return Ok(());
        }
        let Some(mut file) = self.file.take() else {
            bail!("the position map's temp file was lost");
        };
        let file = tokio::task::spawn_blocking(move || -> anyhow::Result<std::fs::File> {
            let mut buf = Vec::with_capacity(pairs.len() * 32);
            for (old, new) in pairs {
                for v in [old.commit(), old.seq(), new.commit(), new.seq()] {
                    buf.extend_from_slice(&v.to_be_bytes());
                }
            }
            file.write_all(&buf)
                .context("cannot write the position map")?;
            Ok(file)
        })
        .await
        .context("the position map's writer was lost")??;
        self.file = Some(file);
        Ok(())
    }

    /// Each checkpoint (sorted by position) with the new position of the
    /// last event whose old position is at most the checkpoint's.
    async fn translate(
        mut self,
        checkpoints: Vec<Checkpoint>,
    ) -> anyhow::Result<Vec<(Checkpoint, Option<GlobalPosition>)>> {
        let Some(mut file) = self.file.take() else {
            bail!("the position map's temp file was lost");
        };
        tokio::task::spawn_blocking(move || {
            file.seek(SeekFrom::Start(0))
                .context("cannot read the position map")?;
            let mut reader = BufReader::new(file);
            let mut record = [0u8; 32];
            let mut last: Option<GlobalPosition> = None;
            let mut pending: Option<(GlobalPosition, GlobalPosition)> = None;
            let mut out = Vec::with_capacity(checkpoints.len());
            for c in checkpoints {
                loop {
                    if pending.is_none() {
                        match reader.read_exact(&mut record) {
                            Ok(()) => {
                                let part = |i: usize| {
                                    let mut b = [0u8; 8];
                                    b.copy_from_slice(&record[i * 8..i * 8 + 8]);
                                    u64::from_be_bytes(b)
                                };
                                pending = Some((
                                    GlobalPosition::new(part(0), part(1)),
                                    GlobalPosition::new(part(2), part(3)),
                                ));
                            }
                            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => break,
                            Err(e) => return Err(anyhow!("cannot read the position map: {e}")),
                        }
                    }
                    match pending {
                        Some((old, new)) if old <= c.position => {
                            last = Some(new);
                            pending = None;
                        }
                        _ => break,
                    }
                }
                out.push((c, last));
            }
            Ok(out)
        })
        .await
        .context("the position map's reader was lost")?
    }
}

/// The conflicts of an import, one per line, for stderr or a report.
pub fn describe_conflicts(conflicts: &[ImportConflict]) -> Vec<String> {
    conflicts.iter().map(|c| format!("conflict: {c}")).collect()
}

/// The path of an `--output` option, for messages.
pub(crate) fn shown(path: &Option<PathBuf>) -> String {
    path.as_ref()
        .map_or_else(|| "standard output".into(), |p| p.display().to_string())
}

/// `annals export`.
pub(crate) async fn export_cmd(
    env: crate::commands::Env<'_>,
    args: crate::cli::ExportArgs,
) -> anyhow::Result<crate::Outcome> {
    // A backup holds the events as stored, never upcast: importing it gives
    // back the same history, and the application's upcasters apply to its
    // reads there as here.
    let store = env.open(false).await?.raw();
    let options = ExportOptions {
        categories: args.category,
        since: args.since,
        until: args.until,
    };
    let bar = progress_bar("export");
    let progress = |n: u64| bar.set_position(n);
    let backend = store.backend().name();
    let summary = match &args.output {
        Some(path) => {
            let mut sink = FileSink::create(path)?;
            let written = export(&store, backend, &options, &mut sink, &progress).await;
            let finished = sink.finish().await;
            let summary = written?;
            finished?;
            summary
        }
        None => {
            let mut sink = WriteSink(&mut *env.out);
            export(&store, backend, &options, &mut sink, &progress).await?
        }
    };
    bar.finish_and_clear();
    if args.output.is_some() {
        writeln!(
            env.out,
            "exported {} events, {} checkpoints, {} snapshots, {} subject keys, {} erasures to {}",
            summary.events,
            summary.checkpoints,
            summary.snapshots,
            summary.keys,
            summary.erasures,
            shown(&args.output)
        )?;
    }
    Ok(crate::Outcome::Success)
}

/// `annals import`.
pub(crate) async fn import_cmd(
    env: crate::commands::Env<'_>,
    args: crate::cli::ImportArgs,
) -> anyhow::Result<crate::Outcome> {
    let source = open_export(&args.file)?;
    let store = env.open(true).await?;
    let options = ImportOptions {
        batch_size: args.batch_size,
        ..ImportOptions::default()
    };
    let lines = read_lines(
        source,
        args.file.display().to_string(),
        options.batch_size * 2,
    )?;
    let bar = progress_bar("import");
    let progress = |n: u64| bar.set_position(n);
    let summary = import(&store, lines, &options, &progress)
        .await
        .with_context(|| format!("cannot import {}", args.file.display()))?;
    bar.finish_and_clear();
    let out = env.out;
    for line in describe_conflicts(&summary.conflicts) {
        writeln!(out, "{line}")?;
    }
    for c in &summary.checkpoints {
        writeln!(out, "checkpoint {} -> {}", c.name, c.position)?;
    }
    for name in &summary.checkpoints_untranslated {
        writeln!(
            out,
            "checkpoint {name} not saved: no event at or before it was imported"
        )?;
    }
    writeln!(
        out,
        "imported {} events ({} already present, {} not written: conflicting streams), \
         {} checkpoints, {} snapshots ({} skipped)",
        summary.imported,
        summary.skipped,
        summary.not_written,
        summary.checkpoints.len(),
        summary.snapshots_written,
        summary.snapshots_skipped
    )?;
    if summary.key_lines > 0 {
        let k = &summary.keys;
        writeln!(
            out,
            "imported {} subject keys ({} already present), {} erasures ({} already recorded), \
             {} keys of forgotten subjects deleted",
            k.keys_inserted,
            k.keys_present,
            k.erasures_recorded,
            k.erasures_present,
            k.keys_deleted
        )?;
    }
    if summary.conflicts.is_empty() {
        Ok(crate::Outcome::Success)
    } else {
        Ok(crate::Outcome::CheckFailed(format!(
            "{} streams conflict with the store; nothing was written for them (listed above)",
            summary.conflicts.len()
        )))
    }
}

/// A counter of events (see [`crate::progress::progress_bar`]).
fn progress_bar(prefix: &'static str) -> indicatif::ProgressBar {
    crate::progress::progress_bar("{prefix} {spinner} {pos} events ({per_sec})", prefix)
}
