//! `annals archive` and `annals restore-archive`: moving closed streams out
//! of the hot event table into checksummed files, and back.
//!
//! # The archive directory
//!
//! - `manifest.json`: the category and cut-off, and one entry per archive
//!   file: its name, SHA-256 checksum and size, its streams (event count,
//!   first and last version each), and whether its streams were removed from
//!   the store (`complete`).
//! - `CATEGORY-NNNNNN.jsonl.zst`: one file per batch of streams
//!   (`--streams-per-file`), in the export format (a header, one `event`
//!   line per event, a trailer), zstd-compressed.
//!
//! # Order of the steps, and an interrupted archive
//!
//! For each batch: the file is written and fsynced; it is read back, its
//! checksum computed and its event lines counted; the manifest is rewritten
//! (a temporary file, fsynced, renamed over the old one, the directory
//! fsynced) with the entry marked incomplete; then one transaction removes
//! the batch's events and records a tombstone per stream
//! ([`annals::StreamArchive::archive_streams`]); then the entry is marked
//! complete. A rerun first completes the incomplete entries (after checking
//! their files again), then archives what is left: an archived stream is
//! never selected again, so a rerun adds nothing.
//!
//! # Restoring
//!
//! Each file's checksum is checked first: a missing or changed file is
//! named, and nothing of it is restored. A good file's events are restored
//! in one transaction ([`annals::StreamArchive::restore_streams`]), keeping
//! their ids, versions, metadata and `recorded_at`, at new positions at the
//! end of the global order; the tombstones go. A rerun skips what is
//! already there.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};

use annals::{
    ArchivedStream, EventStore, ImportEvent, ReadStream, StreamArchive, StreamCatalog, StreamId,
    StreamVersion,
};
use anyhow::{anyhow, bail, Context};
use chrono::{DateTime, Utc};
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::transfer::{FileSink, Header, Line, Trailer, FORMAT, FORMAT_VERSION};

/// The `format` of a manifest.
pub const MANIFEST_FORMAT: &str = "annals-archive";
/// The manifest's file name in an archive directory.
pub const MANIFEST: &str = "manifest.json";

/// An archive directory's `manifest.json`.
#[derive(Clone, PartialEq, Debug, Serialize, Deserialize)]
pub struct Manifest {
    /// Always [`MANIFEST_FORMAT`].
    pub format: String,
    /// Version of the manifest format (1).
    pub version: u32,
    /// The archived category.
    pub category: String,
    /// The files, in the order they were written.
    pub files: Vec<ManifestFile>,
}

/// One archive file of a [`Manifest`].
#[derive(Clone, PartialEq, Debug, Serialize, Deserialize)]
pub struct ManifestFile {
    /// Its name in the directory.
    pub file: String,
    /// SHA-256 of its bytes, lowercase hex.
    pub sha256: String,
    /// Its size in bytes.
    pub bytes: u64,
    /// Event lines in it.
    pub events: u64,
    /// The cut-off of the run that wrote it.
    pub before: DateTime<Utc>,
    /// Whether its streams were removed from the store.
    pub complete: bool,
    /// Its streams.
    pub streams: Vec<ManifestStream>,
}

/// One stream of a [`ManifestFile`].
#[derive(Clone, PartialEq, Debug, Serialize, Deserialize)]
pub struct ManifestStream {
    /// The stream.
    pub stream: StreamId,
    /// Its events in the file.
    pub events: u64,
    /// Its first version in the file.
    pub first_version: StreamVersion,
    /// Its last version (its head when archived).
    pub last_version: StreamVersion,
}

/// What an archive run did.
#[derive(Clone, PartialEq, Eq, Debug, Default)]
pub struct ArchiveSummary {
    /// Streams archived by this run.
    pub streams: u64,
    /// Events removed from the store by this run.
    pub events: u64,
    /// Files written by this run.
    pub files: u64,
    /// Streams of incomplete entries of an earlier run completed now.
    pub resumed: u64,
}

fn sha256_hex(bytes: impl AsRef<[u8]>) -> String {
    bytes.as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

/// Reads the manifest of `dir`, `None` when there is none.
pub fn read_manifest(dir: &Path) -> anyhow::Result<Option<Manifest>> {
    let path = dir.join(MANIFEST);
    let text = match std::fs::read(&path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(anyhow!("cannot read {}: {e}", path.display())),
    };
    let manifest: Manifest = serde_json::from_slice(&text)
        .with_context(|| format!("{} is not an archive manifest", path.display()))?;
    if manifest.format != MANIFEST_FORMAT || manifest.version != 1 {
        bail!(
            "{}: format {:?} version {}, expected {MANIFEST_FORMAT:?} version 1",
            path.display(),
            manifest.format,
            manifest.version
        );
    }
    Ok(Some(manifest))
}

/// Writes the manifest durably: a temporary file, fsynced, renamed over the
/// old one, then the directory fsynced.
fn write_manifest(dir: &Path, manifest: &Manifest) -> anyhow::Result<()> {
    let tmp = dir.join(format!("{MANIFEST}.tmp"));
    let path = dir.join(MANIFEST);
    let text = serde_json::to_vec_pretty(manifest).context("cannot encode the manifest")?;
    let mut file =
        std::fs::File::create(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?;
    file.write_all(&text)
        .and_then(|()| file.sync_all())
        .with_context(|| format!("cannot write {}", tmp.display()))?;
    std::fs::rename(&tmp, &path).with_context(|| format!("cannot replace {}", path.display()))?;
    sync_dir(dir)
}

fn sync_dir(dir: &Path) -> anyhow::Result<()> {
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .with_context(|| format!("cannot sync the directory {}", dir.display()))
}

/// A reader that hashes what passes through it.
struct Hashing<R> {
    inner: R,
    hash: Sha256,
    bytes: u64,
}

impl<R: Read> Read for Hashing<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hash.update(&buf[..n]);
        self.bytes += n as u64;
        Ok(n)
    }
}

/// A file's checksum and size, and its decoded lines (`Some` when `parse`).
struct Checked {
    sha256: String,
    bytes: u64,
    events: Vec<annals::RecordedEvent>,
    event_lines: u64,
}

/// Reads an archive file whole: its checksum and size, and its lines, which
/// must be an export (header, events, trailer with the right count).
/// `keep` keeps the events. Runs on a blocking thread.
fn check_file(path: &Path, keep: bool) -> anyhow::Result<Checked> {
    let shown = path.display().to_string();
    let file = std::fs::File::open(path).with_context(|| format!("cannot open {shown}"))?;
    let mut hashing = Hashing {
        inner: file,
        hash: Sha256::new(),
        bytes: 0,
    };
    let mut events = Vec::new();
    let mut event_lines = 0u64;
    {
        let decoder = zstd::Decoder::new(&mut hashing)
            .with_context(|| format!("cannot read {shown} as zstd"))?;
        let mut reader = BufReader::new(decoder);
        let mut buf = Vec::new();
        let mut n = 0u64;
        let mut trailer = None;
        loop {
            buf.clear();
            n += 1;
            let read = reader
                .read_until(b'\n', &mut buf)
                .with_context(|| format!("{shown}: cannot read line {n}"))?;
            if read == 0 {
                break;
            }
            let line: Line = serde_json::from_slice(&buf)
                .with_context(|| format!("{shown}: line {n} is not an archive line"))?;
            match line {
                Line::Event(e) => {
                    event_lines += 1;
                    if keep {
                        events.push(e);
                    }
                }
                Line::Trailer(t) => trailer = Some(t),
                Line::Header(_) if n == 1 => {}
                _ => bail!("{shown}: line {n} is not a header, event or trailer line"),
            }
        }
        match trailer {
            Some(t) if t.events == event_lines => {}
            _ => bail!("{shown}: no trailer counting its {event_lines} events (truncated)"),
        }
    }
    // The decoder may stop before the end of the file: hash the rest.
    std::io::copy(&mut hashing, &mut std::io::sink())
        .with_context(|| format!("cannot read {shown}"))?;
    Ok(Checked {
        sha256: sha256_hex(hashing.hash.finalize()),
        bytes: hashing.bytes,
        events,
        event_lines,
    })
}

async fn check_file_async(path: PathBuf, keep: bool) -> anyhow::Result<Checked> {
    tokio::task::spawn_blocking(move || check_file(&path, keep))
        .await
        .context("the archive file reader was lost")?
}

/// Why an archive file cannot be used: missing, or not what the manifest
/// says.
async fn verify(dir: &Path, entry: &ManifestFile, keep: bool) -> anyhow::Result<Checked> {
    let path = dir.join(&entry.file);
    if !path.exists() {
        bail!("archive file {} is missing", path.display());
    }
    let checked = check_file_async(path.clone(), keep).await;
    let checked = match checked {
        Ok(c) => c,
        Err(e) => bail!(
            "archive file {} does not match the manifest (tampered or damaged): {e:#}",
            path.display()
        ),
    };
    if checked.sha256 != entry.sha256 || checked.bytes != entry.bytes {
        bail!(
            "archive file {} does not match the manifest (tampered or damaged): \
             sha256 {} ({} bytes), the manifest says {} ({} bytes)",
            path.display(),
            checked.sha256,
            checked.bytes,
            entry.sha256,
            entry.bytes
        );
    }
    if checked.event_lines != entry.events {
        bail!(
            "archive file {} holds {} events, the manifest says {}",
            path.display(),
            checked.event_lines,
            entry.events
        );
    }
    Ok(checked)
}

fn tombstones(dir: &Path, entry: &ManifestFile, now: DateTime<Utc>) -> Vec<ArchivedStream> {
    let location = dir.join(&entry.file).display().to_string();
    entry
        .streams
        .iter()
        .map(|s| ArchivedStream {
            stream: s.stream.clone(),
            head: s.last_version,
            location: location.clone(),
            archived_at: now,
        })
        .collect()
}

/// Archives the streams of `category` whose last event was recorded before
/// `before` into `dir` (see the module docs).
pub async fn archive<S>(
    store: &S,
    category: &str,
    before: DateTime<Utc>,
    dir: &Path,
    streams_per_file: usize,
) -> anyhow::Result<ArchiveSummary>
where
    S: StreamArchive + StreamCatalog,
{
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let dir =
        std::fs::canonicalize(dir).with_context(|| format!("cannot resolve {}", dir.display()))?;
    let mut manifest = match read_manifest(&dir)? {
        Some(m) if m.category != category => bail!(
            "{} holds an archive of category {}, not {category}: use another directory",
            dir.display(),
            m.category
        ),
        Some(m) => m,
        None => Manifest {
            format: MANIFEST_FORMAT.into(),
            version: 1,
            category: category.into(),
            files: Vec::new(),
        },
    };
    let mut summary = ArchiveSummary::default();
    // An interrupted run: files written, streams not yet removed.
    for i in 0..manifest.files.len() {
        if manifest.files[i].complete {
            continue;
        }
        verify(&dir, &manifest.files[i], false).await?;
        let stones = tombstones(&dir, &manifest.files[i], Utc::now());
        let n = stones.len() as u64;
        summary.events += store.archive_streams(stones).await.with_context(|| {
            format!(
                "cannot complete the archive of {} (its streams changed since it was written?)",
                manifest.files[i].file
            )
        })?;
        summary.resumed += n;
        manifest.files[i].complete = true;
        write_manifest(&dir, &manifest)?;
    }
    // The closed streams, in name order.
    let mut closed: Vec<(StreamId, StreamVersion)> = Vec::new();
    let mut listed = store.list_streams(category);
    while let Some(info) = listed.next().await {
        let info = info.with_context(|| format!("cannot list the streams of {category}"))?;
        let mut last = store.read_stream(&info.stream_id, ReadStream::backward().limit(1));
        match last.next().await {
            Some(Ok(e)) if e.recorded_at < before => {
                closed.push((info.stream_id, e.stream_version))
            }
            Some(Ok(_)) | None => {}
            Some(Err(annals::Error::StreamArchived { .. })) => {}
            Some(Err(e)) => {
                return Err(e).with_context(|| format!("cannot read {}", info.stream_id))
            }
        }
    }
    for batch in closed.chunks(streams_per_file.max(1)) {
        let name = format!("{category}-{:06}.jsonl.zst", manifest.files.len() + 1);
        let path = dir.join(&name);
        let mut sink = FileSink::create(&path)?;
        let written = write_batch(store, batch, before, &mut sink).await;
        let finished = sink.finish().await;
        let streams = written?;
        finished?;
        let synced = path.clone();
        tokio::task::spawn_blocking(move || {
            std::fs::File::open(&synced).and_then(|f| f.sync_all())
        })
        .await
        .context("the archive file sync was lost")?
        .with_context(|| format!("cannot sync {}", path.display()))?;
        sync_dir(&dir)?;
        let checked = check_file_async(path.clone(), false).await?;
        let events: u64 = streams.iter().map(|s| s.events).sum();
        if checked.event_lines != events {
            bail!(
                "{} holds {} events after writing, {events} were written",
                path.display(),
                checked.event_lines
            );
        }
        let entry = ManifestFile {
            file: name,
            sha256: checked.sha256,
            bytes: checked.bytes,
            events,
            before,
            complete: false,
            streams,
        };
        manifest.files.push(entry.clone());
        write_manifest(&dir, &manifest)?;
        // Checked against the manifest as a rerun or a restore would.
        verify(&dir, &entry, false).await?;
        summary.events += store
            .archive_streams(tombstones(&dir, &entry, Utc::now()))
            .await
            .with_context(|| format!("cannot remove the streams of {}", entry.file))?;
        summary.streams += entry.streams.len() as u64;
        summary.files += 1;
        if let Some(last) = manifest.files.last_mut() {
            last.complete = true;
        }
        write_manifest(&dir, &manifest)?;
    }
    Ok(summary)
}

/// Writes the events of `batch` (each stream up to its head) as an export.
async fn write_batch<S: EventStore>(
    store: &S,
    batch: &[(StreamId, StreamVersion)],
    before: DateTime<Utc>,
    sink: &mut FileSink,
) -> anyhow::Result<Vec<ManifestStream>> {
    use crate::transfer::ChunkSink;
    let header = Header {
        format: FORMAT.into(),
        version: FORMAT_VERSION,
        source_backend: "archive".into(),
        head_position: None,
        exported_at: Utc::now(),
        categories: Vec::new(),
        since: None,
        until: Some(before),
    };
    let mut chunk = Vec::new();
    push(&mut chunk, &Line::Header(header))?;
    let mut streams = Vec::with_capacity(batch.len());
    let mut total = 0u64;
    for (stream, head) in batch {
        let mut events = store.read_stream(stream, ReadStream::forward());
        let mut entry: Option<ManifestStream> = None;
        while let Some(e) = events.next().await {
            let e = e.with_context(|| format!("cannot read {stream}"))?;
            let version = e.stream_version;
            push(&mut chunk, &Line::Event(e))?;
            total += 1;
            match &mut entry {
                Some(s) => {
                    s.events += 1;
                    s.last_version = version;
                }
                None => {
                    entry = Some(ManifestStream {
                        stream: stream.clone(),
                        events: 1,
                        first_version: version,
                        last_version: version,
                    })
                }
            }
            if chunk.len() >= 256 << 10 {
                sink.put(std::mem::take(&mut chunk)).await?;
            }
        }
        match entry {
            Some(s) if s.last_version == *head => streams.push(s),
            _ => bail!("{stream} changed while it was archived (its head was {head}); run again"),
        }
    }
    push(
        &mut chunk,
        &Line::Trailer(Trailer {
            events: total,
            ..Trailer::default()
        }),
    )?;
    sink.put(chunk).await?;
    Ok(streams)
}

fn push(chunk: &mut Vec<u8>, line: &Line) -> anyhow::Result<()> {
    serde_json::to_writer(&mut *chunk, line).context("cannot encode an archive line")?;
    chunk.push(b'\n');
    Ok(())
}

/// What a restore did.
#[derive(Clone, PartialEq, Debug, Default)]
pub struct RestoreSummary {
    /// Files restored.
    pub files: u64,
    /// Events written.
    pub imported: u64,
    /// Events already there, skipped.
    pub skipped: u64,
    /// The files that could not be used, each with why (nothing of them
    /// was restored).
    pub bad_files: Vec<String>,
    /// Streams that conflict with the store (nothing written for them).
    pub conflicts: Vec<annals::ImportConflict>,
}

/// Restores every file of the archive in `dir` (see the module docs).
pub async fn restore<S: StreamArchive>(store: &S, dir: &Path) -> anyhow::Result<RestoreSummary> {
    let Some(manifest) = read_manifest(dir)? else {
        bail!("{} holds no {MANIFEST}", dir.display());
    };
    let mut summary = RestoreSummary::default();
    for entry in &manifest.files {
        let checked = match verify(dir, entry, true).await {
            Ok(c) => c,
            Err(e) => {
                summary.bad_files.push(format!("{e:#}"));
                continue;
            }
        };
        let mut per_stream: BTreeMap<&StreamId, u64> = BTreeMap::new();
        for e in &checked.events {
            *per_stream.entry(&e.stream_id).or_default() += 1;
        }
        let listed: BTreeMap<&StreamId, u64> = entry
            .streams
            .iter()
            .map(|s| (&s.stream, s.events))
            .collect();
        if per_stream != listed {
            summary.bad_files.push(format!(
                "archive file {} does not hold the streams its manifest entry lists",
                dir.join(&entry.file).display()
            ));
            continue;
        }
        let events: Vec<ImportEvent> = checked.events.into_iter().map(ImportEvent::from).collect();
        let report = store
            .restore_streams(events)
            .await
            .with_context(|| format!("cannot restore {}", entry.file))?;
        summary.files += 1;
        summary.imported += report.imported;
        summary.skipped += report.skipped;
        summary.conflicts.extend(report.conflicts);
    }
    Ok(summary)
}

/// `annals archive`.
pub(crate) async fn archive_cmd(
    env: crate::commands::Env<'_>,
    args: crate::cli::ArchiveArgs,
) -> anyhow::Result<crate::Outcome> {
    // Events are archived as stored, never upcast (as `annals export`).
    let store = env.open(false).await?.raw();
    let summary = archive(
        &store,
        &args.category,
        args.before,
        &args.to,
        args.streams_per_file,
    )
    .await?;
    if summary.resumed > 0 {
        writeln!(
            env.out,
            "completed an interrupted archive: {} streams",
            summary.resumed
        )?;
    }
    writeln!(
        env.out,
        "archived {} streams ({} events) of {} to {} in {} files",
        summary.streams,
        summary.events,
        args.category,
        args.to.display(),
        summary.files
    )?;
    Ok(crate::Outcome::Success)
}

/// `annals restore-archive`.
pub(crate) async fn restore_cmd(
    env: crate::commands::Env<'_>,
    args: crate::cli::RestoreArchiveArgs,
) -> anyhow::Result<crate::Outcome> {
    let store = env.open(false).await?.raw();
    let summary = restore(&store, &args.dir).await?;
    for bad in &summary.bad_files {
        writeln!(env.out, "not restored: {bad}")?;
    }
    for line in crate::transfer::describe_conflicts(&summary.conflicts) {
        writeln!(env.out, "{line}")?;
    }
    writeln!(
        env.out,
        "restored {} files: {} events ({} already present)",
        summary.files, summary.imported, summary.skipped
    )?;
    if summary.bad_files.is_empty() && summary.conflicts.is_empty() {
        Ok(crate::Outcome::Success)
    } else {
        Ok(crate::Outcome::CheckFailed(format!(
            "{} archive files not restored, {} streams conflicting (listed above)",
            summary.bad_files.len(),
            summary.conflicts.len()
        )))
    }
}
