//! A JSON syntax check without building anything: what
//! [`crate::Payload::from_shared_json`] runs on each payload a backend reads.
//!
//! [`is_json`] accepts the texts `serde_json::from_str::<&RawValue>` accepts
//! (one value between optional whitespace; strings without control
//! characters and with valid escapes, `\u` followed by four hex digits;
//! numbers in the JSON grammar) in one pass over the bytes with no
//! recursion and no allocation, except those nested deeper than
//! [`MAX_NESTING`] levels of arrays and objects, which it leaves to
//! serde_json. It only answers yes or no: the caller sends a text it does
//! not accept through serde_json, which accepts it or explains why not. It
//! exists because every event of a replay pays this check (issue 11).

/// The deepest nesting of arrays and objects [`is_json`] follows (one bit
/// each in a `u128`); deeper texts are left to serde_json.
pub(crate) const MAX_NESTING: u32 = 127;

/// Whether `text` is one JSON value, optionally surrounded by whitespace.
pub(crate) fn is_json(text: &str) -> bool {
    let b = text.as_bytes();
    let mut i = 0usize;
    // One bit per open container, innermost lowest: set for an object.
    let mut objects: u128 = 0;
    let mut depth: u32 = 0;
    'value: loop {
        // A value is expected at `i` (after optional whitespace).
        i = skip_ws(b, i);
        let Some(&c) = b.get(i) else { return false };
        i = match c {
            b'{' | b'[' => {
                if depth == MAX_NESTING {
                    return false;
                }
                depth += 1;
                let object = c == b'{';
                objects = (objects << 1) | u128::from(object);
                i = skip_ws(b, i + 1);
                match b.get(i) {
                    Some(b'}') if object => i + 1,
                    Some(b']') if !object => i + 1,
                    _ if object => match key(b, i) {
                        Some(after) => {
                            i = after;
                            continue 'value;
                        }
                        None => return false,
                    },
                    _ => continue 'value,
                }
            }
            b'"' => match string(b, i) {
                Some(after) => after,
                None => return false,
            },
            b't' if b.get(i..i + 4) == Some(b"true") => i + 4,
            b'f' if b.get(i..i + 5) == Some(b"false") => i + 5,
            b'n' if b.get(i..i + 4) == Some(b"null") => i + 4,
            b'-' | b'0'..=b'9' => match number(b, i) {
                Some(after) => after,
                None => return false,
            },
            _ => return false,
        };
        if c == b'{' || c == b'[' {
            // An empty container: closed above.
            depth -= 1;
            objects >>= 1;
        }
        // After a complete value: close containers, or go on to the next
        // element.
        loop {
            i = skip_ws(b, i);
            if depth == 0 {
                return i == b.len();
            }
            let object = objects & 1 == 1;
            match b.get(i) {
                Some(b',') => {
                    if object {
                        match key(b, skip_ws(b, i + 1)) {
                            Some(after) => i = after,
                            None => return false,
                        }
                    } else {
                        i += 1;
                    }
                    continue 'value;
                }
                Some(b'}') if object => {}
                Some(b']') if !object => {}
                _ => return false,
            }
            depth -= 1;
            objects >>= 1;
            i += 1;
        }
    }
}

#[inline]
fn skip_ws(b: &[u8], mut i: usize) -> usize {
    while let Some(b' ' | b'\t' | b'\n' | b'\r') = b.get(i) {
        i += 1;
    }
    i
}

/// An object key at `i` and its colon; the index after the colon.
#[inline]
fn key(b: &[u8], i: usize) -> Option<usize> {
    if b.get(i) != Some(&b'"') {
        return None;
    }
    let i = skip_ws(b, string(b, i)?);
    (b.get(i) == Some(&b':')).then_some(i + 1)
}

/// A string whose opening quote is at `i`; the index after its closing
/// quote.
#[inline]
fn string(b: &[u8], i: usize) -> Option<usize> {
    let mut i = i + 1;
    loop {
        // The text is UTF-8 already: only quotes, backslashes and control
        // characters matter.
        let c = *b.get(i)?;
        i += 1;
        if c == b'"' {
            return Some(i);
        }
        if c == b'\\' {
            match *b.get(i)? {
                b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't' => i += 1,
                b'u' => {
                    if !b.get(i + 1..i + 5)?.iter().all(u8::is_ascii_hexdigit) {
                        return None;
                    }
                    i += 5;
                }
                _ => return None,
            }
        } else if c < 0x20 {
            return None;
        }
    }
}

#[inline]
fn digits(b: &[u8], mut i: usize) -> usize {
    while let Some(b'0'..=b'9') = b.get(i) {
        i += 1;
    }
    i
}

/// A number starting at `i` (a `-` or a digit); the index after it.
#[inline]
fn number(b: &[u8], mut i: usize) -> Option<usize> {
    if b.get(i) == Some(&b'-') {
        i += 1;
    }
    match b.get(i)? {
        b'0' => {
            i += 1;
            if let Some(b'0'..=b'9') = b.get(i) {
                return None;
            }
        }
        b'1'..=b'9' => i = digits(b, i + 1),
        _ => return None,
    }
    if b.get(i) == Some(&b'.') {
        let end = digits(b, i + 1);
        if end == i + 1 {
            return None;
        }
        i = end;
    }
    if let Some(b'e' | b'E') = b.get(i) {
        i += 1;
        if let Some(b'+' | b'-') = b.get(i) {
            i += 1;
        }
        let end = digits(b, i);
        if end == i {
            return None;
        }
        i = end;
    }
    Some(i)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn serde_accepts(text: &str) -> bool {
        serde_json::from_str::<&serde_json::value::RawValue>(text).is_ok()
    }

    /// Every case nested at most `MAX_NESTING` deep gets the same verdict
    /// from the check and from serde_json; deeper ones are left to
    /// serde_json (which reads raw values of any depth).
    #[test]
    fn agrees_with_serde_json() {
        let deep = |n: usize, open: &str, close: &str, inner: &str| {
            format!("{}{inner}{}", open.repeat(n), close.repeat(n))
        };
        let mut cases: Vec<String> = [
            "",
            " ",
            "{}",
            "[]",
            " {} ",
            "\t[ ]\n",
            "{",
            "}",
            "[",
            "]",
            "[}",
            "{]",
            "{}}",
            "[]]",
            "{} {}",
            "1 2",
            "null",
            "nul",
            "nulll",
            "true",
            "tru",
            "false",
            "falsE",
            "0",
            "-0",
            "00",
            "-",
            "01",
            "-01",
            "1.",
            "1.5",
            ".5",
            "1e",
            "1e5",
            "1E+5",
            "1e-5",
            "1e+",
            "-1.5e3",
            "1.5.3",
            "0x10",
            "+1",
            "NaN",
            "Infinity",
            "123456789012345678901234567890",
            "\"\"",
            "\"abc\"",
            "\"a",
            "\"\\\"\"",
            "\"\\\\\"",
            "\"\\/\"",
            "\"\\b\\f\\n\\r\\t\"",
            "\"\\x\"",
            "\"\\u0041\"",
            "\"\\u00g1\"",
            "\"\\u004\"",
            "\"\\ud800\"",
            "\"\\udc00\\ud800\"",
            "\"\\u\"",
            "\"\\",
            "\"é ✓ 𝄞\"",
            "\"a\u{1}b\"",
            "\"a\u{7f}b\"",
            "\"tab\there\"",
            "{\"a\":1}",
            "{\"a\" : 1 , \"b\" : [1, 2, {\"c\": null}]}",
            "{\"a\":1,}",
            "[1,]",
            "[,1]",
            "{,}",
            "{\"a\"}",
            "{\"a\":}",
            "{\"a\" 1}",
            "{1:2}",
            "{\"a\":1 \"b\":2}",
            "[1 2]",
            "[1,,2]",
            "[\"a\",{\"b\":[true,false,null]}]",
            "{\"a\":{\"b\":{}}}",
            "{\"amount\":100}",
            "{\"account\":null,\"owner\":\"w1-000001\",\"email\":null}",
            "[-]",
            "[-a]",
            "[1e]",
            "[1.e1]",
            "[0.0e-0]",
            "\u{feff}{}",
            "{}\u{0}",
            "\u{a0}1",
            "[1]x",
            "tRue",
            "[true false]",
            "{\"a\":1}{",
            "\"\u{2028}\"",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        for n in [1, 2, 126, 127, 128, 129, 200] {
            cases.push(deep(n, "[", "]", ""));
            cases.push(deep(n, "[", "]", "1"));
            cases.push(deep(n, "{\"a\":", "}", "1"));
            cases.push(format!("{}{{}}{}", "[".repeat(n - 1), "]".repeat(n - 1)));
        }
        for case in &cases {
            let depth = case.bytes().filter(|c| matches!(c, b'[' | b'{')).count();
            if depth > MAX_NESTING as usize {
                assert!(!is_json(case), "{case:?}");
            } else {
                assert_eq!(is_json(case), serde_accepts(case), "{case:?}");
            }
        }
        // Every prefix of some valid texts.
        for full in [
            "{\"a\" : [1, -2.5e+3, \"x\\u00e9y\", {\"b\": [true, false, null]}], \"c\": {}}",
            "[[[\"\\n\"]]]",
        ] {
            for end in 0..=full.len() {
                let Some(prefix) = full.get(..end) else {
                    continue;
                };
                assert_eq!(is_json(prefix), serde_accepts(prefix), "{prefix:?}");
            }
        }
    }
}
