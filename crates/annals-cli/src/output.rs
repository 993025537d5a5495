//! Output: aligned text tables for people, JSON Lines for programs.
//!
//! Tables are written in blocks so that `annals read-all` on a large store
//! never holds more than one block of rows (and `--follow` writes one block
//! per look): a block's column widths are the widest seen so far, so columns
//! only ever grow and the header is printed once. JSON output is one object per line, written as rows arrive.

use std::io::{self, Write};

use annals::RecordedEvent;
use chrono::{DateTime, SecondsFormat, Utc};
use serde::Serialize;

/// Rows buffered before a table block is written.
const BLOCK_ROWS: usize = 1000;

/// A text table with a header row, columns separated by two spaces; the last
/// column is not padded.
pub(crate) struct Table {
    headers: Vec<String>,
    widths: Vec<usize>,
    rows: Vec<Vec<String>>,
    header_written: bool,
    /// Columns that are right-aligned (numbers).
    right: Vec<bool>,
}

impl Table {
    pub(crate) fn new(headers: &[&str]) -> Self {
        Table {
            headers: headers.iter().map(|h| (*h).to_owned()).collect(),
            widths: headers.iter().map(|h| h.chars().count()).collect(),
            rows: Vec::new(),
            header_written: false,
            right: vec![false; headers.len()],
        }
    }

    /// Right-aligns the given columns.
    pub(crate) fn right_align(mut self, columns: &[usize]) -> Self {
        for &c in columns {
            if let Some(r) = self.right.get_mut(c) {
                *r = true;
            }
        }
        self
    }

    /// Adds a row, writing a block when enough are buffered.
    pub(crate) fn push(&mut self, out: &mut dyn Write, row: Vec<String>) -> io::Result<()> {
        self.rows.push(row);
        if self.rows.len() >= BLOCK_ROWS {
            self.flush_block(out)?;
        }
        Ok(())
    }

    /// Writes the buffered rows (and the header, the first time).
    pub(crate) fn finish(mut self, out: &mut dyn Write) -> io::Result<()> {
        self.flush_block(out)
    }

    fn flush_block(&mut self, out: &mut dyn Write) -> io::Result<()> {
        if self.rows.is_empty() {
            return Ok(());
        }
        for row in &self.rows {
            for (w, cell) in self.widths.iter_mut().zip(row) {
                *w = (*w).max(cell.chars().count());
            }
        }
        if !self.header_written {
            let headers = std::mem::take(&mut self.headers);
            self.write_row(out, &headers)?;
            self.header_written = true;
        }
        let rows = std::mem::take(&mut self.rows);
        for row in &rows {
            self.write_row(out, row)?;
        }
        Ok(())
    }

    fn write_row(&self, out: &mut dyn Write, row: &[String]) -> io::Result<()> {
        let mut line = String::new();
        let last = row.len().saturating_sub(1);
        for (i, cell) in row.iter().enumerate() {
            if i > 0 {
                line.push_str("  ");
            }
            let pad = self
                .widths
                .get(i)
                .copied()
                .unwrap_or(0)
                .saturating_sub(cell.chars().count());
            let right = self.right.get(i).copied().unwrap_or(false);
            if right {
                line.extend(std::iter::repeat_n(' ', pad));
            }
            line.push_str(cell);
            if !right && i < last {
                line.extend(std::iter::repeat_n(' ', pad));
            }
        }
        writeln!(out, "{}", line.trim_end())
    }
}

/// Writes one value as a line of JSON.
pub(crate) fn json_line<T: Serialize>(out: &mut dyn Write, value: &T) -> io::Result<()> {
    serde_json::to_writer(&mut *out, value).map_err(io::Error::from)?;
    out.write_all(b"\n")
}

/// Timestamps in tables: RFC 3339, UTC, microseconds (what the stores keep).
pub(crate) fn timestamp(t: &DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Micros, true)
}

/// Prints events as a table or as JSON Lines.
pub(crate) struct EventPrinter {
    json: bool,
    table: Table,
    count: u64,
}

impl EventPrinter {
    pub(crate) fn new(json: bool) -> Self {
        EventPrinter {
            json,
            table: Table::new(&[
                "POSITION",
                "STREAM",
                "VERSION",
                "TYPE",
                "RECORDED_AT",
                "DATA",
                "METADATA",
            ])
            .right_align(&[0, 2]),
            count: 0,
        }
    }

    pub(crate) fn print(&mut self, out: &mut dyn Write, e: &RecordedEvent) -> io::Result<()> {
        self.count += 1;
        if self.json {
            return json_line(out, e);
        }
        // The payload's schema version is shown only when it is not the
        // default, to keep the common case narrow.
        let event_type = match (e.stored_event_version, &e.stored_event_type) {
            // An upcasted event says what it is stored as.
            (Some(stored), Some(stored_type)) => format!(
                "{} (v{}, stored as {stored_type} v{stored})",
                e.event_type, e.event_version
            ),
            (Some(stored), None) => {
                format!("{} (v{}, stored v{stored})", e.event_type, e.event_version)
            }
            (None, _) if e.event_version == 1 => e.event_type.clone(),
            (None, _) => format!("{} (v{})", e.event_type, e.event_version),
        };
        let metadata = e.metadata.to_value();
        let metadata = match metadata.as_object() {
            Some(m) if m.is_empty() => String::new(),
            _ => metadata.to_string(),
        };
        self.table.push(
            out,
            vec![
                e.global_position.to_string(),
                e.stream_id.to_string(),
                e.stream_version.to_string(),
                event_type,
                timestamp(&e.recorded_at),
                // Compact; the stored text as it is if it does not parse.
                e.data
                    .to_value()
                    .map_or_else(|_| e.data.to_string(), |v| v.to_string()),
                metadata,
            ],
        )
    }

    /// Writes what is buffered (the table's rows so far, aligned to the
    /// widest yet) and flushes `out`: a follower shows each event as it
    /// arrives.
    pub(crate) fn flush(&mut self, out: &mut dyn Write) -> io::Result<()> {
        if !self.json {
            self.table.flush_block(out)?;
        }
        out.flush()
    }

    /// Finishes the table; returns how many events were printed.
    pub(crate) fn finish(self, out: &mut dyn Write) -> io::Result<u64> {
        if !self.json {
            self.table.finish(out)?;
        }
        Ok(self.count)
    }
}

/// A remark for the person at the terminal, such as why a listing is empty:
/// `(message)` on stderr, so that stdout stays empty for scripts.
pub(crate) fn note(message: &str) {
    // Nothing sensible is left to do when stderr itself is gone.
    let _ = writeln!(io::stderr(), "({message})");
}

/// Whether an error is (or was caused by) writing to a closed pipe, which
/// counts as success: `annals read-all | head` stopped reading on purpose.
pub(crate) fn is_broken_pipe(err: &anyhow::Error) -> bool {
    err.chain().any(|cause| {
        cause
            .downcast_ref::<io::Error>()
            .is_some_and(|e| e.kind() == io::ErrorKind::BrokenPipe)
    })
}

/// An error message on one line: causes joined with `: `, and any line
/// breaks inside driver messages folded into spaces.
pub(crate) fn one_line(message: &str) -> String {
    message.split_whitespace().collect::<Vec<_>>().join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aligns_columns_and_leaves_the_last_unpadded() {
        let mut out = Vec::new();
        let mut t = Table::new(&["A", "NUM", "LAST"]).right_align(&[1]);
        t.push(&mut out, vec!["xyz".into(), "5".into(), "q".into()])
            .expect("write");
        t.push(
            &mut out,
            vec!["x".into(), "12345".into(), "long value".into()],
        )
        .expect("write");
        t.finish(&mut out).expect("write");
        let text = String::from_utf8(out).expect("utf8");
        assert_eq!(
            text,
            "A      NUM  LAST\nxyz      5  q\nx    12345  long value\n"
        );
    }

    #[test]
    fn empty_table_prints_nothing() {
        let mut out = Vec::new();
        let t = Table::new(&["A"]);
        t.finish(&mut out).expect("write");
        assert!(out.is_empty());
    }

    #[test]
    fn detects_broken_pipes_in_the_chain() {
        let e = anyhow::Error::from(io::Error::from(io::ErrorKind::BrokenPipe)).context("printing");
        assert!(is_broken_pipe(&e));
        assert!(!is_broken_pipe(&anyhow::anyhow!("other")));
    }

    #[test]
    fn folds_messages_onto_one_line() {
        assert_eq!(one_line("a\n  b\tc "), "a b c");
    }
}
