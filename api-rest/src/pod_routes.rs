//! Routes of a pod host (SPEC §4.2–4.3): every path is a stream or `stream/name`.
//!
//! - `GET /{stream…}` lists a stream; `GET /{stream…}/{name}` returns a record's raw content
//!   with the `X-*` chain headers; `?i=N` / `?i=A:B` address records by index.
//! - `POST /{stream…}/{name}` appends; an empty body (or `{}`) creates the stream instead;
//!   `POST /.config/owner` transfers the pod.

use std::collections::BTreeMap;

use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json, Router};
use serde::Deserialize;
use serde::Serialize;
use serde_json::json;
use webpods_engine::names::split_last;
use webpods_engine::{
    AppendRequest, Caller, ErrorKind, ListQuery, NewRecord, Precondition, Record, RecordFormat,
    RecordPage, RecordView, StreamInfo, StreamListQuery, Target,
};

use crate::AppState;
use crate::auth_routes;
use crate::caller::Auth;
use crate::error::ApiError;
use crate::host::PodHost;

/// The stream-listing endpoint of a pod.
const STREAMS_API: &str = ".config/api/streams";

/// Prefix of request headers that carry custom record headers.
const RECORD_HEADER_PREFIX: &str = "x-record-header-";

pub fn router(state: AppState) -> Router {
    Router::new().fallback(handle).with_state(state)
}

/// A pod host's request path without its leading `/`, percent-decoded segment by segment
/// (`%41` is `A`, RFC 3986 §6.2.2.2), so a name is judged by what it says: `bad%20name` is
/// `INVALID_NAME`, as in GraphQL. A segment that decodes to a `/` or to bytes that are not
/// UTF-8 is `INVALID_PATH`, and so is an empty segment (`//a`, `a//b`): the engine judges the
/// path as given. Reads, writes and live tails all take their path from here.
pub fn decoded_path(raw: &str) -> Result<String, ApiError> {
    let raw = raw.strip_prefix('/').unwrap_or(raw);
    // `//x` would otherwise reach the engine as `/x`, whose parent path is the root stream.
    if raw.starts_with('/') {
        return Err(ApiError::new(
            ErrorKind::InvalidPath,
            "the path begins with an empty segment (`//`)",
        ));
    }
    if !raw.contains('%') {
        return Ok(raw.to_string());
    }
    let bad = || {
        ApiError::new(
            ErrorKind::InvalidPath,
            "a percent-escape in the path decodes to no valid segment",
        )
    };
    let mut segments = Vec::new();
    for seg in raw.split('/') {
        let decoded = percent_encoding::percent_decode_str(seg)
            .decode_utf8()
            .map_err(|_| bad())?;
        if decoded.contains('/') {
            return Err(bad());
        }
        segments.push(decoded.into_owned());
    }
    Ok(segments.join("/"))
}

/// Paths under the names the main domain reserves (SPEC §2: `/auth/*`, `/api/*`, `/graphql*`,
/// `/ws`): a pod host answers them 404 (but for its SSO steps), live tails included.
pub(crate) fn reserved_on_pod_host(path: &str) -> bool {
    let first = path.trim_start_matches('/').split('/').next().unwrap_or("");
    matches!(first, "auth" | "api" | "graphql" | "ws")
}

async fn handle(
    State(st): State<AppState>,
    Extension(PodHost(pod)): Extension<PodHost>,
    Auth(caller): Auth,
    req: Request,
) -> Result<Response, ApiError> {
    let query = Query::parse(req.uri().query())?;
    let path = decoded_path(req.uri().path())?;
    // Names the main domain reserves (SPEC §2); a pod host serves only its SSO steps there.
    match (req.method(), path.trim_end_matches('/')) {
        (&Method::GET, "login") => return Ok(auth_routes::pod_login(&st, &pod, req.uri().query())),
        (&Method::GET, "auth/callback") => {
            return auth_routes::pod_callback(&st, &pod, req.uri().query());
        }
        _ if reserved_on_pod_host(&path) => {
            return Err(ApiError::new(
                ErrorKind::NotFound,
                "not served on a pod host",
            ));
        }
        _ => {}
    }
    // Each branch's future is boxed: held inline, they added up (rustc laid them out side by
    // side, 36 kB), and axum boxes and moves this future for every request.
    if path.trim_end_matches('/') == STREAMS_API
        && matches!(*req.method(), Method::GET | Method::HEAD)
    {
        return Box::pin(list_streams(&st, &caller, &pod, req.uri().query())).await;
    }
    match *req.method() {
        Method::GET | Method::HEAD => {
            Box::pin(read(&st, &caller, &pod, &path, &query, req.headers())).await
        }
        Method::POST => Box::pin(write(&st, &caller, &pod, &path, &query, req)).await,
        Method::DELETE => Box::pin(delete(&st, &caller, &pod, &path, &query)).await,
        _ => Ok(crate::error::method_not_allowed("GET, HEAD, POST, DELETE")),
    }
}

/// The query parameters a pod route understands.
#[derive(Debug, Default, Clone)]
struct Query {
    i: Option<String>,
    /// Recursive listings: where the page starts (`path:index`).
    cursor: Option<String>,
    after: Option<i64>,
    before: Option<i64>,
    limit: Option<i64>,
    access: Option<String>,
    unique: bool,
    recursive: bool,
    verify: bool,
    batch: bool,
    purge: bool,
    format: RecordFormat,
}

/// Whether a query holds a parameter that only reads take, never a pod host's live tail (which
/// takes `after` and `afterHash`; recursive tails are `/ws` subscriptions). A query that does
/// not parse is the read's to refuse.
pub(crate) fn has_read_only_parameters(query: Option<&str>) -> bool {
    Query::parse(query).map_or(true, |q| q.pages_a_stream() || q.shapes_records())
}

impl Query {
    /// Parameters that page a list (`after` aside, which tails take too).
    fn pages(&self) -> bool {
        self.cursor.is_some()
            || self.before.is_some()
            || self.limit.is_some()
            || self.unique
            || self.recursive
    }

    /// Parameters that select or page a stream's records (`after` aside).
    fn pages_a_stream(&self) -> bool {
        self.i.is_some() || self.verify || self.pages()
    }

    /// `fields` and `maxContentSize`: how records of a JSON answer are rendered.
    fn shapes_records(&self) -> bool {
        self.format.fields.is_some() || self.format.max_content_size.is_some()
    }

    /// Why the read parameters cannot all be honoured together, if they cannot: each one
    /// given must change the answer, so none is dropped silently.
    fn conflict(&self) -> Option<&'static str> {
        let paging = self.after.is_some() || self.pages();
        let formatting = self.shapes_records();
        if self.verify && (paging || formatting || self.i.is_some()) {
            return Some("verify=true checks the whole stream and takes no other read parameter");
        }
        if self.i.as_deref().is_some_and(|i| !i.contains(':')) && formatting {
            return Some("i=N reads one record raw; fields and maxContentSize shape lists");
        }
        if self.i.is_some() && paging {
            return Some(
                "i= selects records by index; it does not combine with after, before, limit, \
                 unique, recursive or cursor",
            );
        }
        None
    }

    /// Parameters that only a stream takes.
    fn addresses_a_stream(&self) -> bool {
        self.pages_a_stream() || self.after.is_some()
    }

    fn parse(q: Option<&str>) -> Result<Query, ApiError> {
        let mut out = Query::default();
        let index = |v: &str| {
            v.parse::<i64>().map_err(|_| {
                ApiError::new(ErrorKind::InvalidIndex, format!("{v:?} is not an index"))
            })
        };
        let positive = |k: &str, v: &str| {
            v.parse::<i64>().ok().filter(|l| *l > 0).ok_or_else(|| {
                ApiError::new(
                    ErrorKind::InvalidInput,
                    format!("{k} must be a positive integer"),
                )
            })
        };
        let flag = |k: &str, v: &str| match v {
            "true" | "1" | "" => Ok(true),
            "false" | "0" => Ok(false),
            _ => Err(ApiError::new(
                ErrorKind::InvalidInput,
                format!("{k} must be true or false"),
            )),
        };
        for (k, v) in url::form_urlencoded::parse(q.unwrap_or("").as_bytes()) {
            match k.as_ref() {
                "i" => out.i = Some(v.into_owned()),
                "cursor" => out.cursor = Some(v.into_owned()),
                "after" => out.after = Some(index(&v)?),
                "before" => {
                    let k = index(&v)?;
                    if k < 0 {
                        return Err(ApiError::new(
                            ErrorKind::InvalidIndex,
                            "before must be an index (0 or more); the last N records are after=-N",
                        ));
                    }
                    out.before = Some(k);
                }
                "limit" => out.limit = Some(positive("limit", &v)?),
                "access" => out.access = Some(v.into_owned()),
                "unique" => out.unique = flag("unique", &v)?,
                "recursive" => out.recursive = flag("recursive", &v)?,
                "verify" => out.verify = flag("verify", &v)?,
                "batch" => out.batch = flag("batch", &v)?,
                "purge" => out.purge = flag("purge", &v)?,
                "fields" => {
                    let fields: Vec<String> = v
                        .split(',')
                        .map(|f| f.trim().to_string())
                        .filter(|f| !f.is_empty())
                        .collect();
                    if let Some(bad) = fields
                        .iter()
                        .find(|f| !webpods_engine::RECORD_FIELDS.contains(&f.as_str()))
                    {
                        return Err(ApiError::new(
                            ErrorKind::InvalidInput,
                            format!(
                                "unknown field {bad:?} in fields (known: {})",
                                webpods_engine::RECORD_FIELDS.join(", ")
                            ),
                        ));
                    }
                    out.format.fields = Some(fields);
                }
                "maxContentSize" => {
                    let n = positive("maxContentSize", &v)?;
                    out.format.max_content_size = Some(usize::try_from(n).unwrap_or(usize::MAX));
                }
                _ => {}
            }
        }
        Ok(out)
    }

    /// Applies a routing target's own query on top of the request's.
    fn merged_with(&self, target_query: Option<&str>) -> Result<Query, ApiError> {
        let Some(tq) = target_query else {
            return Ok(self.clone());
        };
        let t = Query::parse(Some(tq))?;
        Ok(Query {
            i: t.i.or_else(|| self.i.clone()),
            cursor: t.cursor.or_else(|| self.cursor.clone()),
            after: t.after.or(self.after),
            before: t.before.or(self.before),
            limit: t.limit.or(self.limit),
            unique: t.unique || self.unique,
            recursive: t.recursive || self.recursive,
            verify: t.verify || self.verify,
            format: RecordFormat {
                fields: t.format.fields.or_else(|| self.format.fields.clone()),
                max_content_size: t.format.max_content_size.or(self.format.max_content_size),
            },
            ..self.clone()
        })
    }
}

/// The paginated list body of SPEC §4.3, with records rendered per `fields`/`maxContentSize`.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct PageView<'a> {
    records: Vec<RecordView<'a>>,
    total: i64,
    has_more: bool,
    next_index: Option<i64>,
    /// Recursive listings only (`null` on their last page).
    #[serde(skip_serializing_if = "Option::is_none")]
    next_cursor: Option<Option<String>>,
}

impl<'a> PageView<'a> {
    fn new(page: &'a RecordPage, format: &'a RecordFormat) -> Self {
        PageView {
            records: page
                .records
                .iter()
                .map(|record| RecordView { record, format })
                .collect(),
            total: page.total,
            has_more: page.has_more,
            next_index: page.next_index,
            next_cursor: None,
        }
    }

    /// A recursive listing's page: `nextCursor` is always there.
    fn recursive(page: &'a RecordPage, format: &'a RecordFormat) -> Self {
        PageView {
            next_cursor: Some(page.next_cursor.as_ref().map(ToString::to_string)),
            ..PageView::new(page, format)
        }
    }
}

// ----- reads ------------------------------------------------------------------------------------

async fn read(
    st: &AppState,
    caller: &Caller,
    pod: &str,
    path: &str,
    q: &Query,
    headers: &HeaderMap,
) -> Result<Response, ApiError> {
    let engine = &st.engine;
    let mut path = path.trim_end_matches('/').to_string();
    let mut q = q.clone();
    if let Some(target) = engine.route(pod, &format!("/{path}")).await? {
        let (p, tq) = match target.split_once('?') {
            Some((p, tq)) => (p, Some(tq)),
            None => (target.as_str(), None),
        };
        q = q.merged_with(tq)?;
        path = p.trim_matches('/').to_string();
    }
    match engine.resolve(caller, pod, &path).await? {
        Target::Record { stream, name } => {
            let record = match engine.read_by_name(&stream, &name).await {
                // `?i=`, `?verify`, `?after=`… address a stream: say that the stream is
                // missing, not a record named like its last segment.
                Err(e) if e.kind() == ErrorKind::RecordNotFound && q.addresses_a_stream() => {
                    return Err(ApiError::new(
                        ErrorKind::StreamNotFound,
                        format!("stream {path:?} does not exist"),
                    ));
                }
                other => other?,
            };
            if q.addresses_a_stream() || q.shapes_records() {
                return Err(ApiError::new(
                    ErrorKind::InvalidInput,
                    format!(
                        "{path:?} names a record, read raw; i, after, before, limit, unique, \
                         recursive, verify, fields and maxContentSize apply to streams"
                    ),
                ));
            }
            Ok(raw(&record, headers))
        }
        Target::Stream(stream) => {
            if let Some(conflict) = q.conflict() {
                return Err(ApiError::new(ErrorKind::InvalidInput, conflict));
            }
            if q.verify {
                return Ok(Json(engine.verify(pod, &stream).await?).into_response());
            }
            match q.i.as_deref() {
                Some(i) => match i.split_once(':') {
                    Some((a, b)) => range(st, &stream, a, b, &q.format).await,
                    None => {
                        let idx = i.parse::<i64>().map_err(|_| {
                            ApiError::new(ErrorKind::InvalidIndex, format!("{i:?} is not an index"))
                        })?;
                        Ok(raw(&engine.read_by_index(&stream, idx).await?, headers))
                    }
                },
                None if q.recursive => {
                    // Records of several streams have no common index to page by: refused,
                    // not silently ignored. Pages follow `nextCursor` (`cursor=path:index`).
                    if q.after.is_some() || q.before.is_some() || q.unique {
                        return Err(ApiError::new(
                            ErrorKind::InvalidInput,
                            "recursive=true pages with cursor= (the nextCursor of the previous \
                             page), not after/before/unique",
                        ));
                    }
                    let cursor = q.cursor.as_deref().map(str::parse).transpose()?;
                    let page = engine
                        .list_recursive(caller, pod, &stream, q.limit, cursor.as_ref())
                        .await?;
                    Ok(Json(PageView::recursive(&page, &q.format)).into_response())
                }
                None if q.cursor.is_some() => Err(ApiError::new(
                    ErrorKind::InvalidInput,
                    "cursor= pages recursive=true listings; a stream's own pages use after=K",
                )),
                None => list(st, &stream, &q, headers).await,
            }
        }
    }
}

/// `GET /.config/api/streams[?path=&recursive=&includeRecordCounts=&includeHashes=]`.
async fn list_streams(
    st: &AppState,
    caller: &Caller,
    pod: &str,
    raw_query: Option<&str>,
) -> Result<Response, ApiError> {
    let mut q = StreamListQuery::default();
    let flag = |k: &str, v: &str| match v {
        "true" | "1" | "" => Ok(true),
        "false" | "0" => Ok(false),
        _ => Err(ApiError::new(
            ErrorKind::InvalidInput,
            format!("{k} must be true or false"),
        )),
    };
    for (k, v) in url::form_urlencoded::parse(raw_query.unwrap_or("").as_bytes()) {
        match k.as_ref() {
            "path" => q.path = Some(v.into_owned()),
            "recursive" => q.recursive = Some(flag("recursive", &v)?),
            "includeRecordCounts" => q.include_record_counts = flag("includeRecordCounts", &v)?,
            "includeHashes" => q.include_hashes = flag("includeHashes", &v)?,
            _ => {}
        }
    }
    Ok(Json(st.engine.list_streams(caller, pod, &q).await?).into_response())
}

async fn list(
    st: &AppState,
    stream: &StreamInfo,
    q: &Query,
    headers: &HeaderMap,
) -> Result<Response, ApiError> {
    let page = st
        .engine
        .list(
            stream,
            ListQuery {
                after: q.after,
                before: q.before,
                limit: q.limit,
                unique: q.unique,
            },
        )
        .await?;
    let etag = page.head_hash.as_ref().map(|h| format!("\"{h}\""));
    if let Some(tag) = &etag
        && if_none_match(headers, tag)
    {
        return Ok(not_modified(tag));
    }
    let mut resp = Json(PageView::new(&page, &q.format)).into_response();
    if let Some(tag) = etag.and_then(|t| HeaderValue::from_str(&t).ok()) {
        resp.headers_mut().insert(header::ETAG, tag);
    }
    Ok(resp)
}

async fn range(
    st: &AppState,
    stream: &StreamInfo,
    a: &str,
    b: &str,
    format: &RecordFormat,
) -> Result<Response, ApiError> {
    let parse = |v: &str| {
        v.parse::<i64>()
            .map_err(|_| ApiError::new(ErrorKind::InvalidIndex, format!("{v:?} is not an index")))
    };
    let r = st.engine.read_range(stream, parse(a)?, parse(b)?).await?;
    let records: Vec<RecordView<'_>> = r
        .records
        .iter()
        .map(|record| RecordView { record, format })
        .collect();
    // Serialized straight to bytes: going through `json!` (a `serde_json::Value`) would
    // re-parse each JSON record's content, losing precision and duplicate keys, and fail on
    // content deeper than its recursion limit or numbers beyond `f64`.
    Ok(Json(RangeView {
        records,
        range: IndexRange {
            start: r.start,
            end: r.end,
        },
        total: r.total,
    })
    .into_response())
}

/// The body of `?i=A:B` (SPEC §4.3).
#[derive(Serialize)]
struct RangeView<'a> {
    records: Vec<RecordView<'a>>,
    range: IndexRange,
    total: i64,
}

#[derive(Serialize)]
struct IndexRange {
    start: i64,
    end: i64,
}

fn if_none_match(headers: &HeaderMap, tag: &str) -> bool {
    headers
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| {
            v.split(',')
                .any(|t| t.trim().trim_start_matches("W/") == tag || t.trim() == "*")
        })
}

fn not_modified(tag: &str) -> Response {
    let mut resp = StatusCode::NOT_MODIFIED.into_response();
    if let Ok(v) = HeaderValue::from_str(tag) {
        resp.headers_mut().insert(header::ETAG, v);
    }
    resp
}

/// A record's raw content with the chain headers of SPEC §4.3.
fn raw(record: &Record, req_headers: &HeaderMap) -> Response {
    let r = &record.row;
    let tag = format!("\"{}\"", r.hash);
    if if_none_match(req_headers, &tag) {
        return not_modified(&tag);
    }
    let mut resp = Response::new(Body::from(r.content.clone()));
    let h = resp.headers_mut();
    let mut put = |name: &str, value: &str| {
        if let (Ok(n), Ok(v)) = (HeaderName::try_from(name), HeaderValue::from_str(value)) {
            h.insert(n, v);
        }
    };
    for (k, v) in record.headers() {
        put(&k, &v);
    }
    put("content-type", &r.content_type);
    put("x-index", &r.index.to_string());
    put("x-hash", &r.hash);
    put("x-previous-hash", r.previous_hash.as_deref().unwrap_or(""));
    put("x-content-hash", &r.content_hash);
    put("x-author", &r.author);
    put("x-timestamp", &webpods_engine::clock::iso8601(r.timestamp));
    if r.deleted {
        // A tombstone read by index: its empty body would otherwise look like empty content.
        put("x-deleted", "true");
    }
    put("etag", &tag);
    resp
}

// ----- writes -----------------------------------------------------------------------------------

async fn write(
    st: &AppState,
    caller: &Caller,
    pod: &str,
    path: &str,
    q: &Query,
    req: Request,
) -> Result<Response, ApiError> {
    let (parts, body) = req.into_parts();
    let limit = if q.batch {
        st.config.max_batch_bytes
    } else {
        st.config.max_body_bytes
    };
    let body = read_body(&parts.headers, body, limit).await?;
    let engine = &st.engine;
    if q.batch {
        return batch(
            st,
            caller,
            pod,
            path.trim_end_matches('/'),
            q,
            &parts.headers,
            &body,
        )
        .await;
    }
    match path.trim_end_matches('/') {
        ".config/owner" => return transfer(st, caller, pod, &body).await,
        ".config/routing" => {
            let routes = serde_json::from_slice(&body).map_err(|_| {
                ApiError::new(
                    ErrorKind::InvalidInput,
                    "expected a JSON object {\"/path\": \"target\"}",
                )
            })?;
            engine.set_routing(caller, pod, routes).await?;
            return Ok((StatusCode::CREATED, Json(json!({ "ok": true }))).into_response());
        }
        ".config/domains" => {
            #[derive(Deserialize)]
            struct Domains {
                domains: Vec<String>,
            }
            let d: Domains = serde_json::from_slice(&body).map_err(|_| {
                ApiError::new(ErrorKind::InvalidInput, "expected {\"domains\": [\"…\"]}")
            })?;
            engine.set_domains(caller, pod, d.domains).await?;
            return Ok((StatusCode::CREATED, Json(json!({ "ok": true }))).into_response());
        }
        _ => {}
    }
    if is_empty_object(&body) {
        let info = engine
            .create_stream(caller, pod, path.trim_end_matches('/'), q.access.as_deref())
            .await?;
        return Ok((StatusCode::CREATED, Json(info)).into_response());
    }
    if path.is_empty() || path.ends_with('/') {
        return Err(ApiError::new(
            ErrorKind::MissingName,
            "the URL must end with a record name",
        ));
    }
    let (stream, name) = split_last(path);
    let record = NewRecord {
        name: name.to_string(),
        content_type: content_type(&parts.headers)?,
        headers: record_headers(&parts.headers)?,
        content: body,
        deleted: false,
    };
    let outcome = engine
        .append(
            caller,
            pod,
            stream,
            AppendRequest {
                records: vec![record],
                precondition: precondition(&parts.headers)?,
                idempotency_key: header_str(&parts.headers, "idempotency-key")?.map(str::to_string),
                access: q.access.clone(),
            },
        )
        .await?;
    let Some(receipt) = outcome.receipts.into_iter().next() else {
        return Err(ApiError(webpods_engine::Error::Internal(
            "append returned no receipt".into(),
        )));
    };
    let status = if outcome.replayed {
        StatusCode::OK
    } else {
        StatusCode::CREATED
    };
    let location = format!("/{}?i={}", stream, receipt.index);
    let etag = format!("\"{}\"", receipt.hash);
    let mut resp = (status, Json(&receipt)).into_response();
    let h = resp.headers_mut();
    if let Ok(v) = HeaderValue::from_str(&location) {
        h.insert(header::LOCATION, v);
    }
    if let Ok(v) = HeaderValue::from_str(&etag) {
        h.insert(header::ETAG, v);
    }
    if outcome.replayed {
        h.insert("idempotent-replay", HeaderValue::from_static("true"));
    }
    Ok(resp)
}

/// One record of a batch append (SPEC §4.2).
#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct BatchItem {
    name: String,
    /// The value as sent: a JSON string is text content; any other value is stored as its
    /// own JSON text, byte for byte (re-serializing it rounded big numbers and rewrote `1E2`).
    content: Option<Box<serde_json::value::RawValue>>,
    content_base64: Option<String>,
    content_type: Option<String>,
    headers: Option<BTreeMap<String, String>>,
}

impl BatchItem {
    fn into_record(self, n: usize) -> Result<NewRecord, ApiError> {
        use base64::Engine as _;
        let bad = |m: &str| ApiError::new(ErrorKind::InvalidInput, format!("record {n}: {m}"));
        let (content, default_type) = match (self.content, self.content_base64) {
            (Some(_), Some(_)) => return Err(bad("give content or contentBase64, not both")),
            (None, None) => return Err(bad("content or contentBase64 is required")),
            (Some(raw), None) if raw.get().starts_with('"') => {
                let text: String = serde_json::from_str(raw.get())
                    .map_err(|e| bad(&format!("content is not a valid string: {e}")))?;
                (Bytes::from(text), "text/plain")
            }
            (Some(raw), None) => (
                Bytes::from(String::from(Box::<str>::from(raw))),
                "application/json",
            ),
            (None, Some(b)) => (
                Bytes::from(
                    base64::engine::general_purpose::STANDARD
                        .decode(b)
                        .map_err(|_| bad("contentBase64 is not base64"))?,
                ),
                "application/octet-stream",
            ),
        };
        let content_type = match self.content_type {
            Some(ct) => parse_media_type(&ct)?,
            None => default_type.to_string(),
        };
        Ok(NewRecord {
            name: self.name,
            content,
            content_type,
            headers: self
                .headers
                .unwrap_or_default()
                .into_iter()
                .map(|(k, v)| (k.to_ascii_lowercase(), v))
                .collect(),
            deleted: false,
        })
    }
}

/// `POST /{stream…}?batch=true`: a JSON array or NDJSON, appended atomically.
async fn batch(
    st: &AppState,
    caller: &Caller,
    pod: &str,
    stream: &str,
    q: &Query,
    headers: &HeaderMap,
    body: &[u8],
) -> Result<Response, ApiError> {
    let invalid = |m: String| ApiError::new(ErrorKind::InvalidInput, m);
    let items: Vec<BatchItem> = if body.trim_ascii_start().starts_with(b"[") {
        serde_json::from_slice(body).map_err(|e| invalid(format!("invalid batch JSON: {e}")))?
    } else {
        body.split(|b| *b == b'\n')
            .map(<[u8]>::trim_ascii)
            .filter(|l| !l.is_empty())
            .enumerate()
            .map(|(i, l)| {
                serde_json::from_slice(l)
                    .map_err(|e| invalid(format!("NDJSON line {}: {e}", i + 1)))
            })
            .collect::<Result<_, _>>()?
    };
    let records = items
        .into_iter()
        .enumerate()
        .map(|(i, item)| item.into_record(i))
        .collect::<Result<Vec<_>, _>>()?;
    let outcome = st
        .engine
        .append(
            caller,
            pod,
            stream,
            AppendRequest {
                records,
                precondition: precondition(headers)?,
                idempotency_key: header_str(headers, "idempotency-key")?.map(str::to_string),
                access: q.access.clone(),
            },
        )
        .await?;
    let status = if outcome.replayed {
        StatusCode::OK
    } else {
        StatusCode::CREATED
    };
    let mut resp = (status, Json(&outcome.receipts)).into_response();
    if outcome.replayed {
        resp.headers_mut()
            .insert("idempotent-replay", HeaderValue::from_static("true"));
    }
    Ok(resp)
}

/// `DELETE /` (the pod), `DELETE /{stream…}` or `DELETE /{stream…}/{name}[?purge=true]`.
async fn delete(
    st: &AppState,
    caller: &Caller,
    pod: &str,
    path: &str,
    q: &Query,
) -> Result<Response, ApiError> {
    let engine = &st.engine;
    // `DELETE /` (path `""`) is the pod; `DELETE /stream/` names no record, and must not fall
    // back to the stream (SPEC §4.2: a trailing slash is a missing name).
    if path.ends_with('/') && !path.is_empty() {
        return Err(ApiError::new(
            ErrorKind::MissingName,
            "the URL must end with a record name (DELETE /{stream} removes a stream)",
        ));
    }
    let path = path.trim_end_matches('/');
    if path.is_empty() {
        engine.delete_pod(caller, pod).await?;
        return Ok(StatusCode::NO_CONTENT.into_response());
    }
    match engine.resolve(caller, pod, path).await? {
        Target::Stream(s) => engine.delete_stream(caller, pod, &s.path).await?,
        Target::Record { stream, name } => {
            engine
                .delete_record(caller, pod, &stream.path, &name, q.purge)
                .await?
        }
    }
    Ok(StatusCode::NO_CONTENT.into_response())
}

async fn transfer(
    st: &AppState,
    caller: &Caller,
    pod: &str,
    body: &[u8],
) -> Result<Response, ApiError> {
    #[derive(Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct Transfer {
        user_id: String,
    }
    let t: Transfer = serde_json::from_slice(body)
        .map_err(|_| ApiError::new(ErrorKind::InvalidInput, "expected {\"userId\": …}"))?;
    st.engine.transfer_owner(caller, pod, &t.user_id).await?;
    Ok((StatusCode::CREATED, Json(json!({ "userId": t.user_id }))).into_response())
}

/// Reads the whole body, refusing more than `limit` bytes with 413 `CONTENT_TOO_LARGE`.
async fn read_body(headers: &HeaderMap, body: Body, limit: usize) -> Result<Bytes, ApiError> {
    let too_large = || {
        ApiError::new(
            ErrorKind::ContentTooLarge,
            format!("the body exceeds the limit of {limit} bytes"),
        )
    };
    let declared = header_str(headers, "content-length")?.and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(too_large());
    }
    axum::body::to_bytes(body, limit).await.map_err(|e| {
        let limited = std::error::Error::source(&e)
            .is_some_and(|s| s.is::<http_body_util::LengthLimitError>());
        if limited {
            too_large()
        } else {
            ApiError::new(ErrorKind::InvalidInput, "could not read the request body")
        }
    })
}

fn header_str<'a>(headers: &'a HeaderMap, name: &str) -> Result<Option<&'a str>, ApiError> {
    match headers.get(name) {
        None => Ok(None),
        Some(v) => v.to_str().map(|s| Some(s.trim())).map_err(|_| {
            ApiError::new(
                ErrorKind::InvalidInput,
                format!("header {name} is not text"),
            )
        }),
    }
}

/// `X-Content-Type`, else the media type of `Content-Type`, else `text/plain`.
fn content_type(headers: &HeaderMap) -> Result<String, ApiError> {
    // An empty header gives no type, as if it were absent.
    let given = |name| -> Result<Option<&str>, ApiError> {
        Ok(header_str(headers, name)?.filter(|v| !v.trim().is_empty()))
    };
    let raw = match given("x-content-type")? {
        Some(v) => v,
        None => given("content-type")?.unwrap_or("text/plain"),
    };
    parse_media_type(raw)
}

/// The media type of a content-type value: parameters dropped, lowercased, validated.
fn parse_media_type(raw: &str) -> Result<String, ApiError> {
    let media = raw
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    let tok = |x: &str| {
        !x.is_empty()
            && x.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"!#$&-^_.+".contains(&b))
    };
    let valid = media.len() <= 255 && media.split_once('/').is_some_and(|(t, s)| tok(t) && tok(s));
    if !valid {
        return Err(ApiError::new(
            ErrorKind::InvalidInput,
            format!("invalid content type {raw:?}"),
        ));
    }
    Ok(media)
}

/// An empty body, or a JSON empty object in any spacing (`{}`, `{ }`, `{\n}`): a stream
/// creation (SPEC §4.2). Whitespace alone is content (a record of one space is a record).
fn is_empty_object(body: &[u8]) -> bool {
    match body.trim_ascii() {
        [] => body.is_empty(),
        [b'{', inner @ .., b'}'] => inner.trim_ascii().is_empty(),
        _ => false,
    }
}

/// `X-Record-Header-{name}: value` → `{name (lowercase): value}`.
fn record_headers(headers: &HeaderMap) -> Result<BTreeMap<String, String>, ApiError> {
    let mut out = BTreeMap::new();
    for (k, v) in headers {
        if let Some(name) = k.as_str().strip_prefix(RECORD_HEADER_PREFIX) {
            let v = v.to_str().map_err(|_| {
                ApiError::new(ErrorKind::InvalidInput, format!("header {k} is not text"))
            })?;
            // Repeated lines are one field, combined with ", " (RFC 9110 §5.3), as the raw
            // read replays it: the last line alone would silently lose the others.
            out.entry(name.to_string())
                .and_modify(|all: &mut String| {
                    all.push_str(", ");
                    all.push_str(v);
                })
                .or_insert_with(|| v.to_string());
        }
    }
    Ok(out)
}

/// `If-Match: "<hash>"`, `X-Expected-Index: N` or `If-None-Match: *` — one of them, as in
/// GraphQL: two would each be a condition, and honouring only one would ignore the other.
fn precondition(headers: &HeaderMap) -> Result<Option<Precondition>, ApiError> {
    let given = ["if-match", "x-expected-index", "if-none-match"]
        .iter()
        .filter(|h| headers.contains_key(**h))
        .count();
    if given > 1 {
        return Err(ApiError::new(
            ErrorKind::InvalidInput,
            "give at most one of If-Match, X-Expected-Index and If-None-Match",
        ));
    }
    if let Some(v) = header_str(headers, "if-match")? {
        if v.trim() == "*" {
            return Ok(Some(Precondition::NotEmpty));
        }
        return Ok(Some(Precondition::LastHash(
            v.trim_matches('"').to_string(),
        )));
    }
    if let Some(v) = header_str(headers, "x-expected-index")? {
        let n = v.parse::<i64>().map_err(|_| {
            ApiError::new(
                ErrorKind::InvalidIndex,
                "X-Expected-Index must be an integer",
            )
        })?;
        return Ok(Some(Precondition::NextIndex(n)));
    }
    match header_str(headers, "if-none-match")? {
        Some("*") => Ok(Some(Precondition::Empty)),
        Some(_) => Err(ApiError::new(
            ErrorKind::InvalidInput,
            "on writes, If-None-Match accepts only *",
        )),
        None => Ok(None),
    }
}
