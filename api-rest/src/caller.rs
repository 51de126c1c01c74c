//! The `Auth` extractor: the request's token turned into an engine [`Caller`].

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use webpods_engine::Caller;

use crate::AppState;
use crate::error::ApiError;
use crate::host::{PodHost, token_of};

/// The authenticated (or anonymous) caller. A bad token is refused, never ignored.
pub struct Auth(pub Caller);

impl FromRequestParts<AppState> for Auth {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let pod_host = parts.extensions.get::<PodHost>().is_some();
        let token = token_of(&parts.headers, pod_host);
        Ok(Auth(state.engine.authenticate(token.as_deref())?))
    }
}
