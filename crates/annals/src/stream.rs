//! Stream names.
//!
//! A stream is named `<Category>-<id>`, the KurrentDB / message-db convention:
//! the category is the text before the first `-` and is the aggregate type, so
//! categories never contain `-`; the id may. Names are validated once, here,
//! so every backend stores only names that parse back to the same parts.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// Longest stream name accepted, in bytes.
pub const MAX_STREAM_NAME_LEN: usize = 255;

/// A validated stream name `<Category>-<id>`.
///
/// The name is shared, not copied, by clones: every event read from one
/// stream carries the same name, and a read clones it once per event.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct StreamId {
    name: std::sync::Arc<str>,
    split: usize,
}

impl StreamId {
    /// Builds `<category>-<id>` from its parts, validating both.
    pub fn new(category: &str, id: &str) -> Result<Self> {
        Self::parse(&format!("{category}-{id}"))
    }

    /// Parses and validates a full stream name.
    pub fn parse(name: &str) -> Result<Self> {
        let invalid = |reason| Error::InvalidStreamId {
            stream: name.to_owned(),
            reason,
        };
        if name.is_empty() {
            return Err(invalid("empty name"));
        }
        if name.len() > MAX_STREAM_NAME_LEN {
            return Err(invalid("longer than 255 bytes"));
        }
        if has_control_char(name) {
            return Err(invalid("contains a control character"));
        }
        let Some(split) = name.find('-') else {
            return Err(invalid("missing '-' between category and id"));
        };
        if split == 0 {
            return Err(invalid("empty category"));
        }
        if split + 1 == name.len() {
            return Err(invalid("empty id"));
        }
        Ok(StreamId {
            name: name.into(),
            split,
        })
    }

    /// The whole name.
    pub fn as_str(&self) -> &str {
        &self.name
    }

    /// The category (aggregate type): the text before the first `-`.
    pub fn category(&self) -> &str {
        &self.name[..self.split]
    }

    /// The id: the text after the first `-`.
    pub fn id(&self) -> &str {
        &self.name[self.split + 1..]
    }
}

/// Whether `name` holds a control character (`char::is_control`: U+0000 to
/// U+001F and U+007F to U+009F), by a scan of its bytes rather than of its
/// decoded chars (a read validates every stream name it meets). In UTF-8
/// the C0 controls and DEL are single bytes below 0x20 or 0x7F, and the C1
/// controls are 0xC2 followed by 0x80 to 0x9F; no other character's
/// encoding contains those byte values in those places.
fn has_control_char(name: &str) -> bool {
    let bytes = name.as_bytes();
    bytes.iter().enumerate().any(|(i, &b)| {
        b < 0x20
            || b == 0x7F
            || (b == 0xC2 && bytes.get(i + 1).is_some_and(|n| (0x80..=0x9F).contains(n)))
    })
}

impl fmt::Display for StreamId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.name)
    }
}

impl fmt::Debug for StreamId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "StreamId({:?})", self.name)
    }
}

impl FromStr for StreamId {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        Self::parse(s)
    }
}

impl TryFrom<String> for StreamId {
    type Error = Error;
    fn try_from(s: String) -> Result<Self> {
        Self::parse(&s)
    }
}

impl From<StreamId> for String {
    fn from(s: StreamId) -> String {
        s.name.as_ref().to_owned()
    }
}

/// Validates a category name (an aggregate type): non-empty, no `-`, no control
/// characters, at most 255 bytes.
pub fn validate_category(category: &str) -> Result<()> {
    let invalid = |reason| Error::InvalidStreamId {
        stream: category.to_owned(),
        reason,
    };
    if category.is_empty() {
        return Err(invalid("empty category"));
    }
    if category.contains('-') {
        return Err(invalid("a category may not contain '-'"));
    }
    if category.len() > MAX_STREAM_NAME_LEN || category.chars().any(char::is_control) {
        return Err(invalid("category too long or contains a control character"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_byte_scan_finds_exactly_the_control_chars() {
        // Every char of the first three planes' interesting ranges, alone
        // and between other text.
        let chars = (0u32..0x3000)
            .chain(0xFFF0..0x10100)
            .chain([0x1F600, 0x10FFFF])
            .filter_map(char::from_u32);
        for c in chars {
            for text in [c.to_string(), format!("Cat-a{c}b"), format!("é{c}\u{85}x")] {
                assert_eq!(
                    has_control_char(&text),
                    text.chars().any(char::is_control),
                    "{text:?}"
                );
            }
        }
    }

    #[test]
    fn splits_at_first_dash() {
        let s = StreamId::parse("Account-a-b").expect("valid");
        assert_eq!(s.category(), "Account");
        assert_eq!(s.id(), "a-b");
        assert_eq!(StreamId::new("Account", "a-b").expect("valid"), s);
    }

    #[test]
    fn rejects_bad_names() {
        for bad in ["", "Account", "-x", "Account-", "Acc\nount-1"] {
            assert!(
                matches!(StreamId::parse(bad), Err(Error::InvalidStreamId { .. })),
                "{bad:?}"
            );
        }
        let long = format!("A-{}", "x".repeat(300));
        assert!(StreamId::parse(&long).is_err());
    }
}
