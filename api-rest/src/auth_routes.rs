//! Login, sessions and tokens over HTTP (SPEC §3): the `/auth/*` routes and `/login` of the
//! main domain, `POST /api/tokens`, and the pod host's `/login` and `/auth/callback` (SSO).
//! Cookies: `session` (server-side session id), `token` (main domain), `pod_token` (pod host);
//! all HttpOnly, SameSite=Lax, Secure when `public_url` is https.

use axum::extract::{FromRequestParts, Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{Value, json};
use webpods_engine::{ErrorKind, Scope, provider_list};

use crate::AppState;
use crate::caller::Auth;
use crate::error::ApiError;
use crate::host::cookie;

const SESSION_COOKIE: &str = "session";

pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/auth/providers", get(providers))
        .route("/auth/whoami", get(whoami))
        .route("/auth/session", get(current_session))
        .route("/auth/sessions", get(sessions))
        .route("/auth/sessions/{id}", delete(revoke_session))
        .route("/auth/logout", post(logout))
        .route("/auth/authorize", get(authorize))
        .route("/auth/success", get(success))
        .route("/auth/{provider}", get(login_start))
        .route("/auth/{provider}/callback", get(login_callback))
        .route("/login", get(login_page))
        .route("/api/tokens", post(issue_token))
        .with_state(state)
}

fn set_cookie(resp: &mut Response, st: &AppState, name: &str, value: &str, max_age: Option<u64>) {
    let mut c = format!("{name}={value}; Path=/; HttpOnly; SameSite=Lax");
    if let Some(age) = max_age {
        c.push_str(&format!("; Max-Age={age}"));
    }
    if st.engine.secure_cookies() {
        c.push_str("; Secure");
    }
    if let Ok(v) = HeaderValue::from_str(&c) {
        resp.headers_mut().append(header::SET_COOKIE, v);
    }
}

/// Defines `$name<T>`: the axum extractor `$inner<T>` whose refusal is a 400 `INVALID_INPUT`
/// in the error envelope, not axum's plain-text answer.
macro_rules! enveloped_extractor {
    ($(#[$doc:meta])* $name:ident wraps $inner:ident) => {
        $(#[$doc])*
        struct $name<T>(T);

        impl<T, S> FromRequestParts<S> for $name<T>
        where
            T: serde::de::DeserializeOwned + Send,
            S: Send + Sync,
        {
            type Rejection = ApiError;

            async fn from_request_parts(
                parts: &mut axum::http::request::Parts,
                state: &S,
            ) -> Result<Self, Self::Rejection> {
                match $inner::<T>::from_request_parts(parts, state).await {
                    Ok($inner(v)) => Ok($name(v)),
                    Err(e) => Err(ApiError::new(ErrorKind::InvalidInput, e.body_text())),
                }
            }
        }
    };
}

enveloped_extractor!(
    /// Query parameters (refused: a repeated or malformed parameter).
    ApiQuery wraps Query
);
enveloped_extractor!(
    /// Path segments (refused: a segment that is not UTF-8 once decoded).
    ApiPath wraps Path
);

/// A `302 Found` to `location` (SPEC §3.2 names 302 for the login redirect; the other steps of
/// the flow answer the same way).
fn found(location: &str) -> Response {
    match HeaderValue::try_from(location) {
        Ok(v) => (StatusCode::FOUND, [(header::LOCATION, v)]).into_response(),
        Err(_) => ApiError::new(
            ErrorKind::Internal,
            "the redirect target is not a valid header",
        )
        .into_response(),
    }
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
        .replace('\'', "&#39;")
}

fn enc(s: &str) -> String {
    url::form_urlencoded::byte_serialize(s.as_bytes()).collect()
}

async fn providers(State(st): State<AppState>) -> Json<Value> {
    Json(json!({ "providers": provider_list(&st.engine) }))
}

async fn whoami(State(st): State<AppState>, Auth(caller): Auth) -> Result<Response, ApiError> {
    Ok(Json(st.engine.whoami(&caller).await?).into_response())
}

async fn current_session(
    State(st): State<AppState>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let none = || ApiError::new(ErrorKind::Unauthorized, "no live session");
    let id = cookie(&headers, SESSION_COOKIE).ok_or_else(none)?;
    let s = st.engine.session(&id).await?.ok_or_else(none)?;
    Ok(Json(s).into_response())
}

async fn sessions(State(st): State<AppState>, Auth(caller): Auth) -> Result<Response, ApiError> {
    Ok(Json(st.engine.sessions(&caller).await?).into_response())
}

async fn revoke_session(
    State(st): State<AppState>,
    Auth(caller): Auth,
    ApiPath(id): ApiPath<String>,
) -> Result<Response, ApiError> {
    st.engine.revoke_session(&caller, &id).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

async fn logout(State(st): State<AppState>, headers: HeaderMap) -> Result<Response, ApiError> {
    if let Some(id) = cookie(&headers, SESSION_COOKIE) {
        st.engine.end_session(&id).await?;
    }
    let mut resp = Json(json!({ "ok": true })).into_response();
    set_cookie(&mut resp, &st, SESSION_COOKIE, "", Some(0));
    set_cookie(&mut resp, &st, "token", "", Some(0));
    Ok(resp)
}

#[derive(Deserialize)]
struct RedirectQuery {
    redirect: Option<String>,
}

async fn login_start(
    State(st): State<AppState>,
    ApiPath(provider): ApiPath<String>,
    ApiQuery(q): ApiQuery<RedirectQuery>,
) -> Result<Response, ApiError> {
    let url = st
        .engine
        .login_start(&provider, q.redirect.as_deref())
        .await?;
    Ok(found(&url))
}

#[derive(Deserialize)]
struct CallbackQuery {
    code: Option<String>,
    state: Option<String>,
    error: Option<String>,
}

async fn login_callback(
    State(st): State<AppState>,
    ApiPath(provider): ApiPath<String>,
    ApiQuery(q): ApiQuery<CallbackQuery>,
) -> Result<Response, ApiError> {
    if let Some(err) = q.error {
        // The provider refused (e.g. the user denied access). Consume the state if any.
        if let Some(state) = &q.state {
            let _ = st.engine.login_finish(&provider, "", state).await;
        }
        return Err(ApiError::new(
            ErrorKind::OauthError,
            format!(
                "the provider refused the login ({})",
                err.chars().take(64).collect::<String>()
            ),
        ));
    }
    let (Some(code), Some(state)) = (q.code, q.state) else {
        return Err(ApiError::new(
            ErrorKind::InvalidCallback,
            "code and state are required",
        ));
    };
    let login = st.engine.login_finish(&provider, &code, &state).await?;
    let target = match login.redirect {
        Some(r) if st.engine.is_allowed_redirect(&r).await => r,
        _ => "/auth/success".to_string(),
    };
    let mut resp = found(&target);
    let ttl = st.engine.config().auth.session_ttl.as_secs();
    set_cookie(&mut resp, &st, SESSION_COOKIE, &login.session_id, Some(ttl));
    set_cookie(&mut resp, &st, "token", &login.token, None);
    Ok(resp)
}

#[derive(Deserialize)]
struct AuthorizeQuery {
    pod: Option<String>,
    redirect: Option<String>,
}

/// SSO step 1 (main domain): with a live session, hand a pod-limited token to the pod host.
async fn authorize(
    State(st): State<AppState>,
    headers: HeaderMap,
    ApiQuery(q): ApiQuery<AuthorizeQuery>,
) -> Result<Response, ApiError> {
    let pod = q
        .pod
        .ok_or_else(|| ApiError::new(ErrorKind::InvalidInput, "pod is required"))?;
    let redirect = q.redirect.unwrap_or_else(|| "/".to_string());
    if !webpods_engine::is_local_path(&redirect) {
        return Err(ApiError::new(
            ErrorKind::InvalidInput,
            "redirect must be a path on the pod",
        ));
    }
    if let Some(sid) = cookie(&headers, SESSION_COOKIE)
        && let Some(token) = st.engine.pod_token_for_session(&sid, &pod).await?
    {
        let url = format!(
            "{}/auth/callback?token={}&redirect={}",
            st.engine.pod_origin(&pod),
            enc(&token),
            enc(&redirect)
        );
        return Ok(found(&url));
    }
    let back = format!(
        "/auth/authorize?pod={}&redirect={}",
        enc(&pod),
        enc(&redirect)
    );
    match st.engine.providers() {
        [] => Err(ApiError::new(
            ErrorKind::InvalidProvider,
            "no login provider is configured",
        )),
        [only] => Ok(found(&format!("/auth/{}?redirect={}", only.id, enc(&back)))),
        _ => Ok(found(&format!("/login?redirect={}", enc(&back)))),
    }
}

/// The page shown after a login without a redirect: the token, with a copy button.
/// It shows a secret: never cached, never sent on as a referrer.
async fn success(State(st): State<AppState>, headers: HeaderMap) -> Response {
    let mut resp = success_page(&st, &headers);
    let h = resp.headers_mut();
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert("referrer-policy", HeaderValue::from_static("no-referrer"));
    resp
}

fn success_page(st: &AppState, headers: &HeaderMap) -> Response {
    let token = cookie(headers, "token").filter(|t| st.engine.authenticate(Some(t)).is_ok());
    let Some(token) = token else {
        return Html(page(
            "Not logged in",
            "<p>No valid token: <a href=\"/login\">log in</a>.</p>",
        ))
        .into_response();
    };
    let body = format!(
        "<p>You are logged in. Your WebPods token:</p>\
         <textarea id=\"t\" readonly rows=\"5\" cols=\"80\">{}</textarea>\
         <p><button onclick=\"navigator.clipboard.writeText(document.getElementById('t').value)\">Copy</button></p>\
         <p>Use it as <code>Authorization: Bearer &lt;token&gt;</code>.</p>",
        escape(&token)
    );
    Html(page("Logged in", &body)).into_response()
}

async fn login_page(State(st): State<AppState>, ApiQuery(q): ApiQuery<RedirectQuery>) -> Response {
    let suffix = q
        .redirect
        .map(|r| format!("?redirect={}", enc(&r)))
        .unwrap_or_default();
    let items: String = st
        .engine
        .providers()
        .iter()
        .map(|p| {
            format!(
                "<li><a href=\"/auth/{}{}\">Log in with {}</a></li>",
                escape(&p.id),
                escape(&suffix),
                escape(&p.name)
            )
        })
        .collect();
    let body = if items.is_empty() {
        "<p>No login provider is configured: this server runs in local mode \
         (use the token it printed at startup).</p>"
            .to_string()
    } else {
        format!("<ul>{items}</ul>")
    };
    Html(page("Log in to WebPods", &body)).into_response()
}

fn page(title: &str, body: &str) -> String {
    format!(
        "<!doctype html><html><head><meta charset=\"utf-8\"><title>{t}</title></head>\
         <body><h1>{t}</h1>{body}</body></html>",
        t = escape(title)
    )
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct TokenRequest {
    pods: Option<Vec<String>>,
    scope: Option<Value>,
    /// Seconds, or a duration such as `"12h"` (as `webpods token issue --expires`).
    expires_in: Option<Value>,
}

async fn issue_token(
    State(st): State<AppState>,
    Auth(caller): Auth,
    body: axum::body::Bytes,
) -> Result<Response, ApiError> {
    let req: TokenRequest = if body.trim_ascii().is_empty() {
        TokenRequest {
            pods: None,
            scope: None,
            expires_in: None,
        }
    } else {
        serde_json::from_slice(&body).map_err(|e| {
            ApiError::new(
                ErrorKind::InvalidInput,
                format!("expected {{pods?, scope?, expiresIn?}}: {e}"),
            )
        })?
    };
    let expires_in = match &req.expires_in {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(webpods_engine::parse_expiry(s)?),
        Some(v) => Some(v.as_i64().ok_or_else(|| {
            ApiError::new(
                ErrorKind::InvalidInput,
                "expiresIn: seconds (an integer) or a duration such as \"12h\"",
            )
        })?),
    };
    let scope = match &req.scope {
        None => None,
        Some(Value::String(s)) => Some(s.clone()),
        Some(Value::Array(a)) => Some(
            a.iter()
                .map(|v| v.as_str().unwrap_or("?"))
                .collect::<Vec<_>>()
                .join(","),
        ),
        Some(_) => Some("?".to_string()),
    }
    .map(|s| {
        Scope::parse(&s).ok_or_else(|| {
            ApiError::new(ErrorKind::InvalidInput, "scope must be read and/or write")
        })
    })
    .transpose()?;
    let token = st
        .engine
        .issue_narrower(&caller, req.pods, scope, expires_in)?;
    Ok((StatusCode::CREATED, Json(json!({ "token": token }))).into_response())
}

// ----- pod host -----------------------------------------------------------------------------

/// `GET {pod}/login` → the main domain's SSO authorize step.
pub fn pod_login(st: &AppState, pod: &str, query: Option<&str>) -> Response {
    let redirect = url::form_urlencoded::parse(query.unwrap_or("").as_bytes())
        .find(|(k, _)| k == "redirect")
        .map(|(_, v)| v.into_owned())
        .filter(|r| webpods_engine::is_local_path(r))
        .unwrap_or_else(|| "/".to_string());
    let main = st
        .engine
        .config()
        .auth
        .public_url
        .as_str()
        .trim_end_matches('/')
        .to_string();
    found(&format!(
        "{main}/auth/authorize?pod={}&redirect={}",
        enc(pod),
        enc(&redirect)
    ))
    .into_response()
}

/// `GET {pod}/auth/callback?token&redirect`: stores a pod-limited token as `pod_token`.
pub fn pod_callback(st: &AppState, pod: &str, query: Option<&str>) -> Result<Response, ApiError> {
    let mut token = None;
    let mut redirect = "/".to_string();
    for (k, v) in url::form_urlencoded::parse(query.unwrap_or("").as_bytes()) {
        match k.as_ref() {
            "token" => token = Some(v.into_owned()),
            "redirect" if webpods_engine::is_local_path(&v) => redirect = v.into_owned(),
            _ => {}
        }
    }
    let token =
        token.ok_or_else(|| ApiError::new(ErrorKind::InvalidCallback, "token is required"))?;
    match st.engine.authenticate(Some(&token))? {
        webpods_engine::Caller::User(u)
            if u.pods.as_ref().is_some_and(|p| p.len() == 1 && p[0] == pod) => {}
        _ => {
            return Err(ApiError::new(
                ErrorKind::PodForbidden,
                "the token is not limited to this pod",
            ));
        }
    }
    let mut resp = found(&redirect);
    set_cookie(&mut resp, st, "pod_token", &token, None);
    Ok(resp)
}
