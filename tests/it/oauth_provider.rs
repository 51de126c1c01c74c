//! An OAuth 2.0 provider on loopback for the login tests: `/authorize` (consents at once for
//! the user named by `login_hint`), `/token` (checks client credentials, the redirect URI and
//! the PKCE S256 verifier; codes are single-use), `/userinfo`.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::{Form, Json, Router};
use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use serde_json::json;
use sha2::{Digest, Sha256};

pub const CLIENT_ID: &str = "webpods-test";
pub const CLIENT_SECRET: &str = "provider-secret";

#[derive(Clone)]
struct Grant {
    challenge: String,
    redirect_uri: String,
    user: String,
}

#[derive(Clone, Default)]
struct ProviderState {
    codes: Arc<Mutex<HashMap<String, Grant>>>,
    tokens: Arc<Mutex<HashMap<String, String>>>,
}

pub struct FakeProvider {
    pub base: String,
}

impl FakeProvider {
    pub async fn start() -> FakeProvider {
        let state = ProviderState::default();
        let app = Router::new()
            .route("/authorize", get(authorize))
            .route("/token", post(token))
            .route("/userinfo", get(userinfo))
            .with_state(state);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr: SocketAddr = listener.local_addr().expect("addr");
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        FakeProvider {
            base: format!("http://{addr}"),
        }
    }

    /// The provider as WebPods' configuration describes it.
    pub fn config(&self, id: &str) -> webpods_engine::ProviderConfig {
        webpods_engine::ProviderConfig {
            id: id.to_string(),
            name: Some("Test IdP".to_string()),
            client_id: CLIENT_ID.to_string(),
            client_secret: Some(CLIENT_SECRET.to_string()),
            auth_url: Some(format!("{}/authorize", self.base)),
            token_url: Some(format!("{}/token", self.base)),
            userinfo_url: Some(format!("{}/userinfo", self.base)),
            ..Default::default()
        }
    }
}

async fn authorize(
    State(st): State<ProviderState>,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    let ok = q.get("response_type").map(String::as_str) == Some("code")
        && q.get("client_id").map(String::as_str) == Some(CLIENT_ID)
        && q.get("code_challenge_method").map(String::as_str) == Some("S256");
    let (Some(redirect), Some(state), Some(challenge)) = (
        q.get("redirect_uri"),
        q.get("state"),
        q.get("code_challenge"),
    ) else {
        return (StatusCode::BAD_REQUEST, "missing parameters").into_response();
    };
    if !ok {
        return (StatusCode::BAD_REQUEST, "bad request").into_response();
    }
    let code = uuid::Uuid::new_v4().simple().to_string();
    let user = q
        .get("login_hint")
        .cloned()
        .unwrap_or_else(|| "alice".to_string());
    st.codes.lock().expect("lock").insert(
        code.clone(),
        Grant {
            challenge: challenge.clone(),
            redirect_uri: redirect.clone(),
            user,
        },
    );
    Redirect::to(&format!("{redirect}?code={code}&state={state}")).into_response()
}

async fn token(
    State(st): State<ProviderState>,
    headers: HeaderMap,
    Form(f): Form<HashMap<String, String>>,
) -> Response {
    let expected = format!(
        "Basic {}",
        STANDARD.encode(format!("{CLIENT_ID}:{CLIENT_SECRET}"))
    );
    if headers.get("authorization").and_then(|v| v.to_str().ok()) != Some(expected.as_str()) {
        return (
            StatusCode::UNAUTHORIZED,
            Json(json!({ "error": "invalid_client" })),
        )
            .into_response();
    }
    let grant = f
        .get("code")
        .and_then(|c| st.codes.lock().expect("lock").remove(c));
    let Some(grant) = grant else {
        return (
            StatusCode::BAD_REQUEST,
            Json(json!({ "error": "invalid_grant" })),
        )
            .into_response();
    };
    let verifier = f.get("code_verifier").cloned().unwrap_or_default();
    let challenge = URL_SAFE_NO_PAD.encode(Sha256::digest(verifier.as_bytes()));
    if challenge != grant.challenge || f.get("redirect_uri") != Some(&grant.redirect_uri) {
        return (
            StatusCode::BAD_REQUEST,
            Json(json!({ "error": "invalid_grant" })),
        )
            .into_response();
    }
    let access = format!("at-{}", uuid::Uuid::new_v4().simple());
    st.tokens
        .lock()
        .expect("lock")
        .insert(access.clone(), grant.user);
    Json(json!({ "access_token": access, "token_type": "bearer", "expires_in": 3600 }))
        .into_response()
}

async fn userinfo(State(st): State<ProviderState>, headers: HeaderMap) -> Response {
    let token = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    match st.tokens.lock().expect("lock").get(token) {
        Some(user) => Json(json!({
            "sub": format!("{user}-id"),
            "email": format!("{user}@example.com"),
            "name": user.to_uppercase(),
        }))
        .into_response(),
        None => StatusCode::UNAUTHORIZED.into_response(),
    }
}
