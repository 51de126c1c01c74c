//! Login with OAuth 2.0 providers (SPEC §3.2–3.3), sessions and token issuance.
//!
//! - The authorization-code flow uses PKCE S256. The `state` and the verifier are stored in
//!   the database for 10 minutes and consumed on first use, so any instance can finish a login
//!   another instance started, and a state can never be replayed.
//! - Users are found (or created) by `(provider, provider id)`.
//! - Sessions are rows in the database (any instance accepts them); tokens are stateless JWTs.
//! - Redirect targets are limited to the main domain, pod hosts and custom domains.

use std::collections::BTreeMap;
use std::time::Duration;

use oauth2::basic::BasicClient;
use oauth2::{
    AuthType, AuthUrl, AuthorizationCode, ClientId, ClientSecret, CsrfToken, PkceCodeChallenge,
    PkceCodeVerifier, RedirectUrl, TokenResponse, TokenUrl,
};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use url::Url;
use webpods_storage::{OAuthStateRow, SessionRow};

use crate::clock::{iso8601, now_ms};
use crate::error::{Error, ErrorKind, Result};
use crate::model::Caller;
use crate::token::Scope;
use crate::{Engine, require_user};

/// How long a started login may take.
const STATE_TTL_MS: i64 = 10 * 60 * 1000;

/// A provider as written in the configuration file (`[[auth.providers]]`). `github`, `google`
/// and `gitlab` need only `id`, `client_id` and the secret; others give every URL.
#[derive(Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProviderConfig {
    pub id: String,
    pub name: Option<String>,
    pub client_id: String,
    pub client_secret: Option<String>,
    /// Name of an environment variable holding the secret.
    pub client_secret_env: Option<String>,
    pub auth_url: Option<String>,
    pub token_url: Option<String>,
    pub userinfo_url: Option<String>,
    pub scopes: Option<Vec<String>>,
    pub id_field: Option<String>,
    pub email_field: Option<String>,
    pub name_field: Option<String>,
    /// `client_secret_basic` (default) or `client_secret_post`.
    pub token_auth: Option<String>,
}

impl std::fmt::Debug for ProviderConfig {
    /// Like a derived one, without the secret.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProviderConfig")
            .field("id", &self.id)
            .field("name", &self.name)
            .field("client_id", &self.client_id)
            .field("client_secret", &self.client_secret.as_ref().map(|_| "***"))
            .field("client_secret_env", &self.client_secret_env)
            .field("auth_url", &self.auth_url)
            .field("token_url", &self.token_url)
            .field("userinfo_url", &self.userinfo_url)
            .field("scopes", &self.scopes)
            .finish_non_exhaustive()
    }
}

/// A provider ready to use (presets applied, secret resolved).
#[derive(Clone)]
pub struct Provider {
    pub id: String,
    pub name: String,
    client_id: String,
    client_secret: String,
    auth_url: Url,
    token_url: Url,
    userinfo_url: Url,
    scopes: Vec<String>,
    id_field: String,
    email_field: String,
    name_field: String,
    secret_in_body: bool,
}

impl ProviderConfig {
    /// Applies the preset of a known provider id and resolves the secret; every problem is
    /// described in the error.
    pub fn resolve(self, env: impl Fn(&str) -> Option<String>) -> Result<Provider, String> {
        let preset = match self.id.as_str() {
            "github" => Some((
                "https://github.com/login/oauth/authorize",
                "https://github.com/login/oauth/access_token",
                "https://api.github.com/user",
                vec!["read:user", "user:email"],
                ("id", "email", "name"),
            )),
            "google" => Some((
                "https://accounts.google.com/o/oauth2/v2/auth",
                "https://oauth2.googleapis.com/token",
                "https://openidconnect.googleapis.com/v1/userinfo",
                vec!["openid", "email", "profile"],
                ("sub", "email", "name"),
            )),
            "gitlab" => Some((
                "https://gitlab.com/oauth/authorize",
                "https://gitlab.com/oauth/token",
                "https://gitlab.com/api/v4/user",
                vec!["read_user"],
                ("id", "email", "name"),
            )),
            _ => None,
        };
        let id = self.id.clone();
        let url =
            |given: Option<String>, preset: Option<&str>, what: &str| -> Result<Url, String> {
                let raw = given
                    .or_else(|| preset.map(str::to_string))
                    .ok_or_else(|| format!("provider {id}: {what} is required"))?;
                Url::parse(&raw).map_err(|_| format!("provider {id}: {what} {raw:?} is not a URL"))
            };
        let secret = match (self.client_secret, self.client_secret_env) {
            (Some(s), _) => s,
            (None, Some(var)) => env(&var)
                .ok_or_else(|| format!("provider {id}: environment variable {var} is not set"))?,
            (None, None) => return Err(format!("provider {id}: client_secret is required")),
        };
        if !crate::names::is_valid_segment(&id) || id.contains('.') {
            return Err(format!(
                "provider id {id:?} must be letters, digits, '-' or '_'"
            ));
        }
        let secret_in_body = match self.token_auth.as_deref() {
            None | Some("client_secret_basic") => false,
            Some("client_secret_post") => true,
            Some(other) => {
                return Err(format!(
                    "provider {id}: token_auth {other:?} must be client_secret_basic or client_secret_post"
                ));
            }
        };
        let (pa, pt, pu, ps, pf) = match &preset {
            Some((a, t, u, s, f)) => (Some(*a), Some(*t), Some(*u), Some(s.clone()), Some(*f)),
            None => (None, None, None, None, None),
        };
        let fields = pf.unwrap_or(("sub", "email", "name"));
        Ok(Provider {
            name: self.name.unwrap_or_else(|| id.clone()),
            client_id: self.client_id,
            client_secret: secret,
            auth_url: url(self.auth_url, pa, "auth_url")?,
            token_url: url(self.token_url, pt, "token_url")?,
            userinfo_url: url(self.userinfo_url, pu, "userinfo_url")?,
            scopes: self.scopes.unwrap_or_else(|| {
                ps.unwrap_or_else(|| vec!["openid", "email", "profile"])
                    .into_iter()
                    .map(str::to_string)
                    .collect()
            }),
            id_field: self.id_field.unwrap_or_else(|| fields.0.to_string()),
            email_field: self.email_field.unwrap_or_else(|| fields.1.to_string()),
            name_field: self.name_field.unwrap_or_else(|| fields.2.to_string()),
            secret_in_body,
            id,
        })
    }
}

impl std::fmt::Debug for Provider {
    /// Everything but the secret (configuration is logged at debug level).
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Provider")
            .field("id", &self.id)
            .field("name", &self.name)
            .field("client_id", &self.client_id)
            .field("client_secret", &"***")
            .field("auth_url", &self.auth_url.as_str())
            .field("token_url", &self.token_url.as_str())
            .field("userinfo_url", &self.userinfo_url.as_str())
            .field("scopes", &self.scopes)
            .finish_non_exhaustive()
    }
}

/// Login settings, read once from configuration.
#[derive(Debug, Clone)]
pub struct AuthSettings {
    pub providers: Vec<Provider>,
    /// `public_url`: redirect URIs, pod-host URLs and the `Secure` cookie flag derive from it.
    pub public_url: Url,
    pub session_ttl: Duration,
    /// Lifetime of tokens issued at login (`auth.jwt_expiry`; none by default).
    pub jwt_expiry: Option<Duration>,
}

impl Default for AuthSettings {
    fn default() -> Self {
        AuthSettings {
            providers: Vec::new(),
            public_url: Url::parse("http://localhost:3000").unwrap_or_else(|_| unreachable!()),
            session_ttl: Duration::from_secs(30 * 24 * 3600),
            jwt_expiry: None,
        }
    }
}

/// What a finished login produced.
#[derive(Debug, Clone)]
pub struct Login {
    pub token: String,
    pub session_id: String,
    /// Where to send the browser (validated), if the login asked for it.
    pub redirect: Option<String>,
}

/// `GET /auth/whoami`.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct WhoAmI {
    pub user_id: String,
    pub email: Option<String>,
    pub name: Option<String>,
}

/// A session as clients see it. Its `id` is [`public_session_id`], never the secret that the
/// `session` cookie holds: that secret mints tokens (`/auth/authorize`), so showing it to any
/// token would let a narrowed token grow back into a full one.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct SessionInfo {
    pub id: String,
    pub user_id: String,
    pub created_at: String,
    pub expires_at: String,
}

impl From<&SessionRow> for SessionInfo {
    fn from(s: &SessionRow) -> Self {
        SessionInfo {
            id: public_session_id(&s.id),
            user_id: s.user_id.clone(),
            created_at: iso8601(s.created_at),
            expires_at: iso8601(s.expires_at),
        }
    }
}

/// The name a session is listed and revoked by: the first 128 bits of the SHA-256 of its
/// secret, in hex. It identifies the session without granting anything.
pub fn public_session_id(secret: &str) -> String {
    let digest = crate::hash::content_hash(secret.as_bytes());
    let hex = digest.strip_prefix("sha256:").unwrap_or(&digest);
    hex.chars().take(32).collect()
}

/// Session management reads and revokes logins, so it takes a token without pod or scope
/// limits (as the login issued): a narrowed or pod-only token is for data, not the account.
fn require_account_token(caller: &Caller) -> Result<&crate::model::UserCaller> {
    let user = require_user(caller)?;
    if user.pods.is_some() || user.scope != Scope::ALL {
        return Err(Error::new(
            ErrorKind::Forbidden,
            "managing sessions needs a token without pod or scope limits",
        ));
    }
    Ok(user)
}

/// The longest life a token may be asked for: 100 years. Past it, `iat + expiresIn` would
/// leave the range of a JWT `exp` (and wrap around).
pub const MAX_EXPIRES_IN_SECS: i64 = 100 * 366 * 24 * 3600;

/// A token lifetime written `90`, `90s`, `15m`, `12h` or `30d`, in seconds (1 s to 100 years).
pub fn parse_expiry(s: &str) -> Result<i64> {
    let s = s.trim();
    let bad = |why: &str| Error::new(ErrorKind::InvalidInput, format!("expiry {s:?}: {why}"));
    let (num, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: i64 = num
        .parse()
        .map_err(|_| bad("expected a number and s, m, h or d"))?;
    let mult = match unit {
        "" | "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => return Err(bad("the unit must be s, m, h or d")),
    };
    n.checked_mul(mult)
        .filter(|secs| (1..=MAX_EXPIRES_IN_SECS).contains(secs))
        .ok_or_else(|| bad("out of range (1s to 100 years)"))
}

fn random_id() -> String {
    format!(
        "{}{}",
        uuid::Uuid::new_v4().simple(),
        uuid::Uuid::new_v4().simple()
    )
}

/// Whether `target` is a path on the host it is sent from, read as such by every browser: one
/// leading `/`, and no backslash, whitespace or control character anywhere (browsers drop tabs
/// and newlines from URLs and read `\\` as `/`, so `/\t/evil.example` would leave the host).
pub fn is_local_path(target: &str) -> bool {
    target.starts_with('/') && !target[1..].starts_with('/') && !has_unsafe_url_chars(target)
}

/// A backslash, whitespace or a control character: what browsers rewrite or drop in a URL.
fn has_unsafe_url_chars(s: &str) -> bool {
    s.chars()
        .any(|c| c == '\\' || c.is_whitespace() || c.is_control())
}

fn oauth_error(msg: impl Into<String>) -> Error {
    Error::new(ErrorKind::OauthError, msg)
}

impl Engine {
    fn auth(&self) -> &AuthSettings {
        &self.inner.config.auth
    }

    /// Configured providers (empty in local mode).
    pub fn providers(&self) -> &[Provider] {
        &self.auth().providers
    }

    fn provider(&self, id: &str) -> Result<&Provider> {
        self.providers().iter().find(|p| p.id == id).ok_or_else(|| {
            Error::new(
                ErrorKind::InvalidProvider,
                format!("unknown provider {id:?}"),
            )
        })
    }

    /// `{public_url}/auth/{id}/callback`.
    fn redirect_uri(&self, provider: &str) -> Result<RedirectUrl> {
        let base = self.auth().public_url.as_str().trim_end_matches('/');
        RedirectUrl::new(format!("{base}/auth/{provider}/callback"))
            .map_err(|e| Error::Internal(format!("redirect uri: {e}")))
    }

    /// The main domain: `public_url`'s host, in lower case.
    pub(crate) fn main_host(&self) -> String {
        let public = &self.auth().public_url;
        public.host_str().unwrap_or("").to_ascii_lowercase()
    }

    /// The URL of a pod host (`{scheme}://{pod}.{main host}[:port]`).
    pub fn pod_origin(&self, pod: &str) -> String {
        let u = &self.auth().public_url;
        let host = u.host_str().unwrap_or("localhost");
        match u.port() {
            Some(p) => format!("{}://{pod}.{host}:{p}", u.scheme()),
            None => format!("{}://{pod}.{host}", u.scheme()),
        }
    }

    /// `true` when cookies must be `Secure` (public_url is https).
    pub fn secure_cookies(&self) -> bool {
        self.auth().public_url.scheme() == "https"
    }

    /// Whether `target` may be redirected to: a path ([`is_local_path`]), the main domain or a
    /// pod host (with `public_url`'s scheme and port), or a custom domain of a pod — never
    /// anywhere else.
    pub async fn is_allowed_redirect(&self, target: &str) -> bool {
        if target.starts_with('/') {
            return is_local_path(target);
        }
        // The URL parser drops tabs and newlines, as browsers do; refuse them before it does.
        if has_unsafe_url_chars(target) {
            return false;
        }
        let Ok(u) = Url::parse(target) else {
            return false;
        };
        if !matches!(u.scheme(), "http" | "https")
            || !u.username().is_empty()
            || u.password().is_some()
        {
            return false;
        }
        let Some(host) = u.host_str().map(str::to_ascii_lowercase) else {
            return false;
        };
        let public = &self.auth().public_url;
        let main = self.main_host();
        let ours = u.scheme() == public.scheme()
            && u.port_or_known_default() == public.port_or_known_default();
        if host == main {
            return ours;
        }
        if let Some(pod) = host.strip_suffix(&format!(".{main}")) {
            return ours && crate::names::is_valid_pod_name(pod);
        }
        matches!(self.pod_for_domain(&host).await, Ok(Some(_)))
    }

    /// Starts a login: stores state and PKCE verifier, returns the provider's authorize URL.
    pub async fn login_start(&self, provider: &str, redirect: Option<&str>) -> Result<String> {
        let p = self.provider(provider)?;
        if let Some(r) = redirect
            && !self.is_allowed_redirect(r).await
        {
            return Err(Error::new(
                ErrorKind::InvalidInput,
                "redirect target not allowed",
            ));
        }
        let (challenge, verifier) = PkceCodeChallenge::new_random_sha256();
        let client = BasicClient::new(ClientId::new(p.client_id.clone()))
            .set_auth_uri(AuthUrl::from_url(p.auth_url.clone()))
            .set_redirect_uri(self.redirect_uri(&p.id)?);
        let mut req = client
            .authorize_url(CsrfToken::new_random)
            .set_pkce_challenge(challenge);
        for s in &p.scopes {
            req = req.add_scope(oauth2::Scope::new(s.clone()));
        }
        let (url, state) = req.url();
        self.inner
            .store
            .put_oauth_state(&OAuthStateRow {
                state: state.secret().clone(),
                provider: p.id.clone(),
                verifier: verifier.secret().clone(),
                redirect: redirect.map(str::to_string),
                expires_at: now_ms() + STATE_TTL_MS,
            })
            .await?;
        Ok(url.to_string())
    }

    /// Finishes a login: consumes the state, exchanges the code (with the PKCE verifier),
    /// reads userinfo, finds or creates the user, starts a session and issues a token.
    pub async fn login_finish(&self, provider: &str, code: &str, state: &str) -> Result<Login> {
        let p = self.provider(provider)?.clone();
        let invalid_state = || {
            Error::new(
                ErrorKind::InvalidState,
                "unknown, expired or reused login state",
            )
        };
        let saved = self
            .inner
            .store
            .take_oauth_state(state)
            .await?
            .ok_or_else(invalid_state)?;
        if saved.expires_at < now_ms() || saved.provider != p.id {
            return Err(invalid_state());
        }
        let http = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .timeout(Duration::from_secs(15))
            .build()
            .map_err(|e| Error::Internal(format!("http client: {e}")))?;
        let client = BasicClient::new(ClientId::new(p.client_id.clone()))
            .set_client_secret(ClientSecret::new(p.client_secret.clone()))
            .set_token_uri(TokenUrl::from_url(p.token_url.clone()))
            .set_redirect_uri(self.redirect_uri(&p.id)?)
            .set_auth_type(if p.secret_in_body {
                AuthType::RequestBody
            } else {
                AuthType::BasicAuth
            });
        let token = client
            .exchange_code(AuthorizationCode::new(code.to_string()))
            .set_pkce_verifier(PkceCodeVerifier::new(saved.verifier))
            .request_async(&http)
            .await
            .map_err(|e| {
                tracing::warn!(provider = %p.id, error = %e, "code exchange failed");
                oauth_error("the provider refused the login")
            })?;
        let info: Value = http
            .get(p.userinfo_url.clone())
            .bearer_auth(token.access_token().secret())
            .header("accept", "application/json")
            .header("user-agent", "webpods")
            .send()
            .await
            .and_then(reqwest::Response::error_for_status)
            .map_err(|e| {
                tracing::warn!(provider = %p.id, error = %e, "userinfo request failed");
                oauth_error("could not read the user's profile from the provider")
            })?
            .json()
            .await
            .map_err(|_| oauth_error("the provider's profile is not JSON"))?;
        let field = |name: &str| match info.get(name) {
            Some(Value::String(s)) if !s.is_empty() => Some(s.clone()),
            Some(Value::Number(n)) => Some(n.to_string()),
            _ => None,
        };
        let provider_id = field(&p.id_field)
            .ok_or_else(|| oauth_error(format!("the profile has no {:?}", p.id_field)))?;
        let now = now_ms();
        let user = self
            .inner
            .store
            .upsert_identity_user(
                &p.id,
                &provider_id,
                field(&p.email_field).as_deref(),
                field(&p.name_field).as_deref(),
                &uuid::Uuid::new_v4().to_string(),
                now,
            )
            .await?;
        let session = SessionRow {
            id: random_id(),
            user_id: user.id.clone(),
            created_at: now,
            expires_at: now
                + i64::try_from(self.auth().session_ttl.as_millis()).unwrap_or(i64::MAX / 2),
        };
        self.inner.store.create_session(&session).await?;
        let expiry = self
            .auth()
            .jwt_expiry
            .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX / 2));
        let token = self.issue_token(&user.id, None, Scope::ALL, expiry)?;
        Ok(Login {
            token,
            session_id: session.id,
            redirect: saved.redirect,
        })
    }

    /// A live session by id.
    pub async fn session(&self, id: &str) -> Result<Option<SessionInfo>> {
        Ok(self
            .inner
            .store
            .get_session(id, now_ms())
            .await?
            .as_ref()
            .map(SessionInfo::from))
    }

    /// The caller's live sessions.
    pub async fn sessions(&self, caller: &Caller) -> Result<Vec<SessionInfo>> {
        let user = require_account_token(caller)?;
        let rows = self
            .inner
            .store
            .list_sessions(&user.user_id, now_ms())
            .await?;
        Ok(rows.iter().map(SessionInfo::from).collect())
    }

    /// Revokes one of the caller's sessions, named by its [`public_session_id`].
    pub async fn revoke_session(&self, caller: &Caller, id: &str) -> Result<()> {
        let user = require_account_token(caller)?;
        let not_found = || Error::new(ErrorKind::NotFound, "no such session");
        let sessions = self
            .inner
            .store
            .list_sessions(&user.user_id, now_ms())
            .await?;
        let secret = sessions
            .iter()
            .find(|s| public_session_id(&s.id) == id)
            .ok_or_else(not_found)?;
        if self
            .inner
            .store
            .delete_session(&secret.id, &user.user_id)
            .await?
        {
            Ok(())
        } else {
            Err(not_found())
        }
    }

    /// Ends a session (logout); unknown ids are fine.
    pub async fn end_session(&self, id: &str) -> Result<()> {
        if let Some(s) = self.inner.store.get_session(id, now_ms()).await? {
            self.inner.store.delete_session(id, &s.user_id).await?;
        }
        Ok(())
    }

    /// A token limited to one pod for the user of a live session (SSO to pod hosts).
    pub async fn pod_token_for_session(
        &self,
        session_id: &str,
        pod: &str,
    ) -> Result<Option<String>> {
        let Some(s) = self.inner.store.get_session(session_id, now_ms()).await? else {
            return Ok(None);
        };
        self.pod(pod).await?;
        let expiry = self
            .auth()
            .jwt_expiry
            .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX / 2));
        Ok(Some(self.issue_token(
            &s.user_id,
            Some(vec![pod.to_string()]),
            Scope::ALL,
            expiry,
        )?))
    }

    /// A new token for the caller, never wider or longer-lived than the one used.
    pub fn issue_narrower(
        &self,
        caller: &Caller,
        pods: Option<Vec<String>>,
        scope: Option<Scope>,
        expires_in_secs: Option<i64>,
    ) -> Result<String> {
        let user = require_user(caller)?;
        let wider = |m: &str| Error::new(ErrorKind::Forbidden, format!("a new token cannot {m}"));
        let pods = match (&user.pods, pods) {
            (Some(mine), Some(asked)) => {
                if !asked.iter().all(|p| mine.contains(p)) {
                    return Err(wider("reach pods the current token cannot"));
                }
                Some(asked)
            }
            (Some(mine), None) => Some(mine.clone()),
            (None, asked) => asked,
        };
        let scope = scope.unwrap_or(user.scope);
        if (scope.read && !user.scope.read) || (scope.write && !user.scope.write) {
            return Err(wider("have a scope the current token lacks"));
        }
        let now = now_ms() / 1000;
        if expires_in_secs.is_some_and(|e| e <= 0 || e > MAX_EXPIRES_IN_SECS) {
            return Err(Error::new(
                ErrorKind::InvalidInput,
                format!("expiresIn must be between 1 and {MAX_EXPIRES_IN_SECS} seconds"),
            ));
        }
        let expires_in = match (user.expires_at, expires_in_secs) {
            (Some(exp), Some(asked)) if now + asked > exp => {
                return Err(wider("outlive the current token"));
            }
            (Some(exp), None) => Some(exp - now),
            (_, asked) => asked,
        };
        self.issue_token(&user.user_id, pods, scope, expires_in)
    }

    /// `{userId, email, name}` of the caller.
    pub async fn whoami(&self, caller: &Caller) -> Result<WhoAmI> {
        let user = require_user(caller)?;
        let identity = self.inner.store.identity_of(&user.user_id).await?;
        Ok(WhoAmI {
            user_id: user.user_id.clone(),
            email: identity.as_ref().and_then(|i| i.email.clone()),
            name: identity.and_then(|i| i.name),
        })
    }
}

/// The fields of a provider list entry.
pub fn provider_list(engine: &Engine) -> Vec<BTreeMap<&'static str, String>> {
    engine
        .providers()
        .iter()
        .map(|p| {
            BTreeMap::from([
                ("id", p.id.clone()),
                ("name", p.name.clone()),
                ("loginUrl", format!("/auth/{}", p.id)),
            ])
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::ProviderConfig;

    #[test]
    fn debug_output_never_shows_the_client_secret() {
        let config = ProviderConfig {
            id: "github".into(),
            client_id: "id".into(),
            client_secret: Some("very-secret-value".into()),
            ..Default::default()
        };
        assert!(!format!("{config:?}").contains("very-secret-value"));
        let provider = config.resolve(|_| None).expect("preset");
        assert!(!format!("{provider:?}").contains("very-secret-value"));
    }
}
