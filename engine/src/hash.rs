//! The hash chain of SPEC §5.1: `contentHash` over the raw bytes, `hash` over a canonical
//! compact JSON of the record's fields and the previous record's hash.

use std::collections::BTreeMap;
use std::fmt::Write;

use sha2::{Digest, Sha256};

/// The fields covered by a record's `hash`.
#[derive(Debug, Clone, Copy)]
pub struct HashInput<'a> {
    pub pod: &'a str,
    pub stream: &'a str,
    pub index: i64,
    pub name: &'a str,
    pub content_type: &'a str,
    pub content_hash: &'a str,
    /// Keys already lowercased; the map keeps them sorted.
    pub headers: &'a BTreeMap<String, String>,
    pub deleted: bool,
    pub user_id: &'a str,
    pub timestamp: i64,
    pub previous_hash: Option<&'a str>,
}

/// `"sha256:" + hex(SHA-256(bytes))`.
pub fn content_hash(bytes: &[u8]) -> String {
    prefixed(&Sha256::digest(bytes))
}

/// The record hash: SHA-256 of the canonical payload.
pub fn record_hash(input: &HashInput<'_>) -> String {
    prefixed(&Sha256::digest(canonical_payload(input).as_bytes()))
}

/// The exact compact JSON that [`record_hash`] digests.
pub fn canonical_payload(r: &HashInput<'_>) -> String {
    let mut out = String::with_capacity(320);
    out.push_str("{\"pod\":");
    push_json_str(&mut out, r.pod);
    out.push_str(",\"stream\":");
    push_json_str(&mut out, r.stream);
    let _ = write!(out, ",\"index\":{}", r.index);
    out.push_str(",\"name\":");
    push_json_str(&mut out, r.name);
    out.push_str(",\"content_type\":");
    push_json_str(&mut out, r.content_type);
    out.push_str(",\"content_hash\":");
    push_json_str(&mut out, r.content_hash);
    out.push_str(",\"headers\":");
    push_headers_json(&mut out, r.headers);
    let _ = write!(out, ",\"deleted\":{}", r.deleted);
    out.push_str(",\"user_id\":");
    push_json_str(&mut out, r.user_id);
    let _ = write!(out, ",\"timestamp\":{}", r.timestamp);
    out.push_str(",\"previous_hash\":");
    match r.previous_hash {
        Some(h) => push_json_str(&mut out, h),
        None => out.push_str("null"),
    }
    out.push('}');
    out
}

/// Compact JSON object of the headers, keys sorted (also the stored form).
pub fn headers_json(headers: &BTreeMap<String, String>) -> String {
    let mut out = String::new();
    push_headers_json(&mut out, headers);
    out
}

fn push_headers_json(out: &mut String, headers: &BTreeMap<String, String>) {
    out.push('{');
    for (i, (k, v)) in headers.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        push_json_str(out, k);
        out.push(':');
        push_json_str(out, v);
    }
    out.push('}');
}

/// Appends `s` as a JSON string, escaped exactly as serde_json escapes it (`"`, `\\`, the
/// short escapes, other control characters as `\u00xx`; everything else as is), without the
/// intermediate `String` that `serde_json::to_string` allocates for every field of every record.
fn push_json_str(out: &mut String, s: &str) {
    out.push('"');
    let mut start = 0;
    for (i, b) in s.bytes().enumerate() {
        let short = match b {
            b'"' => "\\\"",
            b'\\' => "\\\\",
            b'\n' => "\\n",
            b'\r' => "\\r",
            b'\t' => "\\t",
            0x08 => "\\b",
            0x0c => "\\f",
            0x00..=0x1f => "",
            _ => continue,
        };
        // Every escaped byte is ASCII, so `i` is a char boundary.
        out.push_str(&s[start..i]);
        if short.is_empty() {
            out.push_str("\\u00");
            push_hex(out, b);
        } else {
            out.push_str(short);
        }
        start = i + 1;
    }
    out.push_str(&s[start..]);
    out.push('"');
}

fn prefixed(digest: &[u8]) -> String {
    let mut s = String::with_capacity(7 + 2 * digest.len());
    s.push_str("sha256:");
    // `hex::encode` collects chars one at a time; this was 6% of the server's CPU on batches.
    for &b in digest {
        push_hex(&mut s, b);
    }
    s
}

/// Appends `b` as two lowercase hex digits.
fn push_hex(out: &mut String, b: u8) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    out.push(char::from(HEX[usize::from(b >> 4)]));
    out.push(char::from(HEX[usize::from(b & 0xf)]));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strings_are_escaped_exactly_as_serde_json_escapes_them() {
        let mut cases: Vec<String> = (0u8..0x80)
            .map(|b| format!("a{}b", char::from(b)))
            .collect();
        cases.extend(
            [
                "",
                "plain",
                "quote\" and \\ back",
                "é ü 日本 😀",
                "\u{7f}\u{80}\u{2028}",
                "\n\r\t\u{8}\u{c}",
            ]
            .map(String::from),
        );
        for case in cases {
            let mut ours = String::new();
            push_json_str(&mut ours, &case);
            assert_eq!(ours, serde_json::to_string(&case).unwrap(), "{case:?}");
        }
    }

    const USER: &str = "11111111-2222-3333-4444-555555555555";

    #[allow(clippy::too_many_arguments)]
    fn vector(
        stream: &str,
        index: i64,
        name: &str,
        ct: &str,
        content: &[u8],
        headers: &[(&str, &str)],
        deleted: bool,
        ts: i64,
        prev: Option<&str>,
    ) -> (String, String) {
        let headers: BTreeMap<String, String> = headers
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let ch = content_hash(content);
        let h = record_hash(&HashInput {
            pod: "alice",
            stream,
            index,
            name,
            content_type: ct,
            content_hash: &ch,
            headers: &headers,
            deleted,
            user_id: USER,
            timestamp: ts,
            previous_hash: prev,
        });
        (ch, h)
    }

    const H1: &str = "sha256:494502448cab7ab7eca0a1f0955104e6fb574d9f64d471dd7ebe0728ee627070";
    const H2: &str = "sha256:a3821c21fc3810b6b6776f60b249b2a22e6bcc4e5d087dfa400e54d9c4f771ad";

    #[test]
    fn vector_1_text_record() {
        let (ch, h) = vector(
            "blog/posts",
            0,
            "first",
            "text/plain",
            b"Hello WebPods!",
            &[],
            false,
            1735689600000,
            None,
        );
        assert_eq!(
            ch,
            "sha256:33657333ba761aebad23aff0c121309758ba34f920e077e5d55c5856c65f5973"
        );
        assert_eq!(h, H1);
    }

    #[test]
    fn vector_2_json_record_with_header() {
        let (ch, h) = vector(
            "blog/posts",
            1,
            "config",
            "application/json",
            br#"{"a":1,"b":"x"}"#,
            &[("x-source", "cli")],
            false,
            1735689600001,
            Some(H1),
        );
        assert_eq!(
            ch,
            "sha256:ecf9e98ec0641e23113ff3ce8bdc78d0ddd249886517fd4a7f68cc83d4e65667"
        );
        assert_eq!(h, H2);
    }

    #[test]
    fn vector_3_tombstone() {
        let (ch, h) = vector(
            "blog/posts",
            2,
            "first",
            "text/plain",
            b"",
            &[],
            true,
            1735689600002,
            Some(H2),
        );
        assert_eq!(
            ch,
            "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
        assert_eq!(
            h,
            "sha256:6eb668d9c7a5a66434a1eca04b4d0207cdaccf066be92de2f275604657d1534a"
        );
    }

    #[test]
    fn vector_4_root_stream_utf8() {
        let (ch, h) = vector(
            "",
            0,
            "index.html",
            "text/html",
            "<h1>héllo</h1>".as_bytes(),
            &[],
            false,
            1735689600003,
            None,
        );
        assert_eq!(
            ch,
            "sha256:90aff7dbb0ba24097a6e1d8aeca237ba0b35e882df176ee42d05d14f26235ece"
        );
        assert_eq!(
            h,
            "sha256:414cf1edba9faaf39c4c049bef9e9eabdb1164e2f2cf0aa952d7f7e74690559c"
        );
    }

    #[test]
    fn payload_escapes_strings() {
        let headers = BTreeMap::new();
        let p = canonical_payload(&HashInput {
            pod: "p",
            stream: "a\"b",
            index: 0,
            name: "n",
            content_type: "t",
            content_hash: "c",
            headers: &headers,
            deleted: false,
            user_id: "u",
            timestamp: 1,
            previous_hash: None,
        });
        assert!(p.contains(r#""stream":"a\"b""#), "{p}");
        assert!(p.ends_with(r#""previous_hash":null}"#), "{p}");
    }
}
