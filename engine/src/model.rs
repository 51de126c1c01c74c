//! The engine's public data types: what frontends pass in and get back.

use std::collections::BTreeMap;

use bytes::Bytes;
use serde::Serialize;
use serde::ser::SerializeMap;
use serde_json::value::RawValue;

use crate::clock::iso8601;
use crate::error::{Error, ErrorKind, Result};
use webpods_storage::RecordRow;

/// Who is calling, as established from a token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Caller {
    Anonymous,
    User(UserCaller),
}

/// An authenticated caller and the limits of the token used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserCaller {
    pub user_id: String,
    /// `None` = every pod.
    pub pods: Option<Vec<String>>,
    pub scope: crate::token::Scope,
    /// `exp` of the token (epoch seconds), if it expires.
    pub expires_at: Option<i64>,
}

impl Caller {
    pub fn user_id(&self) -> Option<&str> {
        match self {
            Caller::Anonymous => None,
            Caller::User(u) => Some(&u.user_id),
        }
    }
}

/// A pod as clients see it.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Pod {
    pub name: String,
    pub created_at: String,
}

/// One record to append.
#[derive(Debug, Clone)]
pub struct NewRecord {
    pub name: String,
    pub content: Bytes,
    pub content_type: String,
    /// Custom headers, keys lowercased.
    pub headers: BTreeMap<String, String>,
    pub deleted: bool,
}

/// A condition on the head the append must extend (SPEC §4.2).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Precondition {
    /// `If-Match`: the last record has this hash.
    LastHash(String),
    /// `X-Expected-Index`: the first new record gets this index.
    NextIndex(i64),
    /// `If-None-Match: *`: the stream is empty.
    Empty,
    /// `If-Match: *`: the stream has a record (RFC 9110 §13.1.1: a current representation).
    NotEmpty,
}

/// An append of one or more records (a batch is atomic).
#[derive(Debug, Clone)]
pub struct AppendRequest {
    pub records: Vec<NewRecord>,
    pub precondition: Option<Precondition>,
    pub idempotency_key: Option<String>,
    /// Access of the stream if this append creates it.
    pub access: Option<String>,
}

/// What a committed append returns.
#[derive(Debug, Clone)]
pub struct AppendOutcome {
    pub receipts: Vec<Receipt>,
    /// `true` when an idempotency key matched an earlier append: nothing new was written.
    pub replayed: bool,
}

/// The receipt of one appended record.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Receipt {
    pub index: i64,
    pub name: String,
    pub path: String,
    pub content_type: String,
    pub size: i64,
    pub content_hash: String,
    pub hash: String,
    pub previous_hash: Option<String>,
    pub timestamp: String,
}

impl Receipt {
    pub(crate) fn new(stream_path: &str, r: &RecordRow) -> Self {
        Receipt {
            index: r.index,
            name: r.name.clone(),
            path: record_path(stream_path, &r.name),
            content_type: r.content_type.clone(),
            size: r.size,
            content_hash: r.content_hash.clone(),
            hash: r.hash.clone(),
            previous_hash: r.previous_hash.clone(),
            timestamp: iso8601(r.timestamp),
        }
    }
}

/// `stream/name` (or `name` in the root stream).
pub fn record_path(stream_path: &str, name: &str) -> String {
    if stream_path.is_empty() {
        name.to_string()
    } else {
        format!("{stream_path}/{name}")
    }
}

/// A stored record with the path of its stream.
#[derive(Debug, Clone)]
pub struct Record {
    pub stream_path: String,
    pub row: RecordRow,
}

/// Header names a record can never carry, whatever `server.allowed_record_headers` says:
/// replayed on a raw read they would frame the HTTP response (`content-length`,
/// `transfer-encoding` and the hop-by-hop headers: one record could inject a response into the
/// reader's connection), change how its body is decoded, set cookies on the pod host, or stand
/// for the headers the server itself sends with a record (SPEC §4.3).
pub const RESERVED_RECORD_HEADERS: &[&str] = &[
    "connection",
    "content-encoding",
    "content-length",
    "content-type",
    "etag",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "proxy-connection",
    "set-cookie",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "x-author",
    "x-content-hash",
    "x-deleted",
    "x-hash",
    "x-index",
    "x-previous-hash",
    "x-request-id",
    "x-timestamp",
];

/// Whether `name` (lowercase) may never be a record header (see [`RESERVED_RECORD_HEADERS`]).
pub fn is_reserved_record_header(name: &str) -> bool {
    RESERVED_RECORD_HEADERS.contains(&name) || name.starts_with("x-ratelimit-")
}

/// How a record's content appears in JSON.
pub enum JsonContent<'a> {
    Json(&'a RawValue),
    Text(&'a str),
    Base64(String),
    Purged,
}

impl Record {
    pub fn path(&self) -> String {
        record_path(&self.stream_path, &self.row.name)
    }

    /// The custom headers replayed on raw reads (names never allowed as record headers, which
    /// an older configuration may have let in, are left out).
    pub fn headers(&self) -> BTreeMap<String, String> {
        let mut headers: BTreeMap<String, String> =
            serde_json::from_str(&self.row.headers).unwrap_or_default();
        headers.retain(|name, _| !is_reserved_record_header(name));
        headers
    }

    /// The content as it is embedded in record JSON (SPEC §4.3).
    pub fn json_content(&self) -> JsonContent<'_> {
        use base64::Engine as _;
        if self.row.purged {
            return JsonContent::Purged;
        }
        let bytes = &self.row.content;
        if is_json_type(&self.row.content_type)
            && let Ok(s) = std::str::from_utf8(bytes)
            && let Ok(raw) = serde_json::from_str::<&RawValue>(s)
        {
            return JsonContent::Json(raw);
        }
        if is_text_type(&self.row.content_type)
            && let Ok(s) = std::str::from_utf8(bytes)
        {
            return JsonContent::Text(s);
        }
        JsonContent::Base64(base64::engine::general_purpose::STANDARD.encode(bytes))
    }
}

/// The keys of a record's JSON, as `fields=` names them (`truncated` and `encoding` come with
/// `content`).
pub const RECORD_FIELDS: [&str; 14] = [
    "index",
    "name",
    "path",
    "content",
    "contentType",
    "size",
    "contentHash",
    "hash",
    "previousHash",
    "userId",
    "headers",
    "timestamp",
    "deleted",
    "purged",
];

/// How records are rendered in JSON: `fields=a,b` and `maxContentSize=N` of SPEC §4.3.
#[derive(Debug, Clone, Default)]
pub struct RecordFormat {
    /// Only these keys (all when `None`).
    pub fields: Option<Vec<String>>,
    /// Text content longer than this many bytes is cut (at a character boundary) and the
    /// record gets `"truncated": true`.
    pub max_content_size: Option<usize>,
}

/// A record rendered with a [`RecordFormat`].
pub struct RecordView<'a> {
    pub record: &'a Record,
    pub format: &'a RecordFormat,
}

impl Serialize for Record {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        RecordView {
            record: self,
            format: &RecordFormat::default(),
        }
        .serialize(s)
    }
}

impl Serialize for RecordView<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let (rec, fmt) = (self.record, self.format);
        let r = &rec.row;
        let want = |k: &str| fmt.fields.as_ref().is_none_or(|f| f.iter().any(|x| x == k));
        let mut m = s.serialize_map(None)?;
        macro_rules! field {
            ($k:expr, $v:expr) => {
                if want($k) {
                    m.serialize_entry($k, $v)?;
                }
            };
        }
        field!("index", &r.index);
        field!("name", &r.name);
        field!("path", &rec.path());
        if want("content") {
            match rec.json_content() {
                JsonContent::Json(raw) => m.serialize_entry("content", raw)?,
                JsonContent::Text(t) => match fmt.max_content_size {
                    Some(max) if t.len() > max => {
                        let mut cut = max;
                        while !t.is_char_boundary(cut) {
                            cut -= 1;
                        }
                        m.serialize_entry("content", &t[..cut])?;
                        m.serialize_entry("truncated", &true)?;
                    }
                    _ => m.serialize_entry("content", t)?,
                },
                JsonContent::Base64(b) => {
                    m.serialize_entry("content", &b)?;
                    m.serialize_entry("encoding", "base64")?;
                }
                JsonContent::Purged => m.serialize_entry("content", &())?,
            }
        }
        field!("contentType", &r.content_type);
        field!("size", &r.size);
        field!("contentHash", &r.content_hash);
        field!("hash", &r.hash);
        field!("previousHash", &r.previous_hash);
        field!("userId", &r.author);
        field!("headers", &rec.headers());
        field!("timestamp", &iso8601(r.timestamp));
        field!("deleted", &r.deleted);
        if r.purged {
            field!("purged", &true);
        }
        m.end()
    }
}

/// `application/json` and `*+json`.
pub fn is_json_type(ct: &str) -> bool {
    ct == "application/json" || ct.ends_with("+json")
}

/// Deepest nesting of arrays and objects accepted in JSON content. Listings embed the content
/// in their own JSON three levels down, and common parsers give up at 128 (serde_json) or
/// 256 (jq): content nested deeper would make every page that holds it unreadable.
pub const MAX_JSON_DEPTH: usize = 100;

/// Why JSON content is refused, or `None` when it is accepted: it must be UTF-8 JSON
/// (RFC 8259), nested at most [`MAX_JSON_DEPTH`] deep, with no unpaired surrogate escape
/// (`"\udc00"`: I-JSON, RFC 7493 §2.1), which strict parsers reject.
pub fn json_content_problem(content: &[u8]) -> Option<String> {
    let Ok(text) = std::str::from_utf8(content) else {
        return Some("it is not UTF-8".into());
    };
    if let Err(e) = serde_json::from_str::<serde::de::IgnoredAny>(text) {
        return Some(e.to_string());
    }
    // Valid JSON from here on: a scan of brackets outside strings and of `\u` escapes.
    let b = text.as_bytes();
    let hex = |at: usize| {
        b.get(at..at + 4)
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u16::from_str_radix(h, 16).ok())
    };
    let (mut depth, mut i, mut in_string) = (0usize, 0usize, false);
    while let Some(&c) = b.get(i) {
        i += 1;
        match (in_string, c) {
            (_, b'"') => in_string = !in_string,
            (false, b'[' | b'{') => {
                depth += 1;
                if depth > MAX_JSON_DEPTH {
                    return Some(format!("it is nested deeper than {MAX_JSON_DEPTH} levels"));
                }
            }
            (false, b']' | b'}') => depth = depth.saturating_sub(1),
            (true, b'\\') => {
                if b.get(i) == Some(&b'u') {
                    let unit = hex(i + 1).unwrap_or(0);
                    i += 5;
                    if (0xD800..0xDC00).contains(&unit)
                        && b.get(i..i + 2) == Some(b"\\u")
                        && hex(i + 2).is_some_and(|low| (0xDC00..0xE000).contains(&low))
                    {
                        i += 6;
                    } else if (0xD800..0xE000).contains(&unit) {
                        return Some(format!("it holds an unpaired surrogate (\\u{unit:04x})"));
                    }
                } else {
                    i += 1;
                }
            }
            _ => {}
        }
    }
    None
}

/// Types whose content is shown as a string in JSON.
pub fn is_text_type(ct: &str) -> bool {
    ct.starts_with("text/")
        || ct.ends_with("+xml")
        || matches!(
            ct,
            "application/xml"
                | "application/javascript"
                | "application/x-www-form-urlencoded"
                | "application/yaml"
        )
}

/// A page of records (SPEC §4.3 list form).
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RecordPage {
    pub records: Vec<Record>,
    /// Records in the stream (head index + 1).
    pub total: i64,
    pub has_more: bool,
    /// The index of the first record not returned, when there are more.
    pub next_index: Option<i64>,
    /// Recursive listings: where the next page starts, when there are more.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next_cursor: Option<RecursiveCursor>,
    /// Hash of the stream's head (the list's ETag).
    #[serde(skip)]
    pub head_hash: Option<String>,
}

/// A position in a recursive listing: the stream path and index of a record. Written
/// `path:index` (`blog/posts:41`, `:7` for the root stream); paths hold no `:`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecursiveCursor {
    pub path: String,
    pub index: i64,
}

impl std::fmt::Display for RecursiveCursor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.path, self.index)
    }
}

impl Serialize for RecursiveCursor {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl std::str::FromStr for RecursiveCursor {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        let bad = || {
            Error::new(
                ErrorKind::InvalidInput,
                format!("cursor {s:?} is not <stream path>:<index>, as nextCursor gives it"),
            )
        };
        let (path, index) = s.rsplit_once(':').ok_or_else(bad)?;
        let index = index
            .parse::<i64>()
            .ok()
            .filter(|i| *i >= 0)
            .ok_or_else(bad)?;
        if !path.is_empty() {
            crate::names::check_stream_path(path).map_err(|_| bad())?;
        }
        Ok(RecursiveCursor {
            path: path.to_string(),
            index,
        })
    }
}

/// Records `start..end` of a stream (SPEC §4.3 `i=A:B`).
#[derive(Debug, Clone)]
pub struct RecordSlice {
    pub records: Vec<Record>,
    pub start: i64,
    pub end: i64,
    pub total: i64,
}

/// What a GET on a pod path addresses.
#[derive(Debug, Clone)]
pub enum Target {
    /// The path is a stream.
    Stream(StreamInfo),
    /// The path is `stream/name`.
    Record { stream: StreamInfo, name: String },
}

/// A stream as clients see it.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct StreamInfo {
    #[serde(skip)]
    pub id: i64,
    pub path: String,
    pub access_permission: String,
    #[serde(skip)]
    pub creator_id: String,
    pub created_at: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_content_is_checked_for_depth_and_surrogates() {
        let nested = |n: usize| format!("{}{}", "[".repeat(n), "]".repeat(n));
        assert_eq!(
            json_content_problem(nested(MAX_JSON_DEPTH).as_bytes()),
            None
        );
        let deep = json_content_problem(nested(MAX_JSON_DEPTH + 1).as_bytes());
        assert!(deep.is_some_and(|p| p.contains("deeper")));
        // Brackets inside strings do not count; escaped quotes do not end the string.
        let strings = format!(r#"{{"a":"{}\"{}"}}"#, "[".repeat(500), "{".repeat(500));
        assert_eq!(json_content_problem(strings.as_bytes()), None);
        for ok in [
            r#""\ud83d\ude00""#,
            r#"{"k":"\u00e9\\u\"","l":["\uD83D\uDE00"]}"#,
            r#""\\udc00""#,
            "\"\u{1F600}\"",
        ] {
            assert_eq!(json_content_problem(ok.as_bytes()), None, "{ok}");
        }
        for lone in [
            r#""\udc00""#,
            r#""\ud83d""#,
            r#""\ud83dx""#,
            r#""\ud83d\u0041""#,
            r#"{"a":["\ude00\ud83d"]}"#,
        ] {
            let p = json_content_problem(lone.as_bytes());
            assert!(p.is_some_and(|p| p.contains("surrogate")), "{lone}");
        }
        assert!(json_content_problem(b"{").is_some());
        assert!(json_content_problem(b"\"\xff\"").is_some());
    }

    #[test]
    fn reserved_headers_are_never_replayed() {
        let headers = r#"{"content-length":"0","set-cookie":"a=b","transfer-encoding":"x","x-ratelimit-limit":"1","x-source":"cli"}"#;
        let record = Record {
            stream_path: "s".into(),
            row: RecordRow {
                index: 0,
                name: "r".into(),
                content: b"x".to_vec(),
                content_type: "text/plain".into(),
                headers: headers.into(),
                size: 1,
                author: "u".into(),
                timestamp: 0,
                content_hash: String::new(),
                hash: String::new(),
                previous_hash: None,
                deleted: false,
                purged: false,
            },
        };
        assert_eq!(
            record.headers(),
            BTreeMap::from([("x-source".to_string(), "cli".to_string())])
        );
    }
}
