//! Engine errors as GraphQL errors: `extensions.code` is [`ErrorKind::code`], `message` is the
//! engine's public message (internals are logged, never sent), `extensions.details` carries the
//! engine's details (e.g. the current head of a failed precondition). Errors raised by
//! async-graphql itself (parse, validation, limits) get codes too, see [`add_codes`].

use async_graphql::{ErrorExtensionValues, Response, ServerError};
use webpods_engine::{Error, ErrorKind};

/// Codes of errors that are not engine errors.
pub(crate) const QUERY_TOO_DEEP: &str = "QUERY_TOO_DEEP";
pub(crate) const QUERY_TOO_COMPLEX: &str = "QUERY_TOO_COMPLEX";
pub(crate) const VALIDATION_FAILED: &str = "GRAPHQL_VALIDATION_FAILED";

/// Converts an engine error (the only way engine errors reach a client).
pub(crate) fn gql(e: Error) -> async_graphql::Error {
    match &e {
        Error::Internal(detail) => tracing::error!(error = %detail, "internal error"),
        Error::Unavailable(detail) => tracing::warn!(error = %detail, "database unavailable"),
        Error::Rejected { .. } => {}
    }
    let details = e
        .details()
        .and_then(|d| async_graphql::Value::from_json(d.clone()).ok());
    let code = e.kind().code();
    let mut err = async_graphql::Error::new(e.public_message());
    let mut ext = ErrorExtensionValues::default();
    ext.set("code", code);
    if let Some(d) = details {
        ext.set("details", d);
    }
    err.extensions = Some(ext);
    err
}

/// An error of the GraphQL layer itself, with a code.
pub(crate) fn coded(code: &str, message: impl Into<String>) -> async_graphql::Error {
    let mut err = async_graphql::Error::new(message);
    let mut ext = ErrorExtensionValues::default();
    ext.set("code", code);
    err.extensions = Some(ext);
    err
}

/// `INVALID_INPUT` with a message.
pub(crate) fn invalid(message: impl Into<String>) -> async_graphql::Error {
    coded(ErrorKind::InvalidInput.code(), message)
}

/// `Result<T, engine::Error>` → `async_graphql::Result<T>`.
pub(crate) trait OrGql<T> {
    fn gql(self) -> async_graphql::Result<T>;
}

impl<T> OrGql<T> for Result<T, Error> {
    fn gql(self) -> async_graphql::Result<T> {
        self.map_err(gql)
    }
}

/// Gives every error of a response a code: the depth and complexity limits get their own,
/// other request-level errors (parse, validation, variables) `GRAPHQL_VALIDATION_FAILED`, and
/// uncoded resolver errors (argument coercion) `INVALID_INPUT`.
pub(crate) fn add_codes(mut resp: Response) -> Response {
    for e in &mut resp.errors {
        code_error(e);
    }
    resp
}

fn code_error(e: &mut ServerError) {
    if e.extensions
        .as_ref()
        .is_some_and(|x| x.get("code").is_some())
    {
        return;
    }
    let code = if e.message.starts_with("Query is nested too deep") {
        e.message = format!(
            "{} Split the query or select fewer nested levels.",
            e.message
        );
        QUERY_TOO_DEEP
    } else if e.message.starts_with("Query is too complex") {
        e.message = format!(
            "{} Ask for fewer fields or smaller pages (first/last).",
            e.message
        );
        QUERY_TOO_COMPLEX
    } else if e.path.is_empty() {
        VALIDATION_FAILED
    } else {
        ErrorKind::InvalidInput.code()
    };
    e.extensions
        .get_or_insert_with(ErrorExtensionValues::default)
        .set("code", code);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn code_of(e: &ServerError) -> Option<String> {
        e.extensions
            .as_ref()
            .and_then(|x| x.get("code"))
            .map(|v| v.to_string().trim_matches('"').to_string())
    }

    #[test]
    fn engine_errors_keep_their_code_and_hide_internals() {
        let e = gql(Error::Internal("db password is hunter2".into()));
        assert_eq!(e.message, "internal error");
        let e = e.into_server_error(Default::default());
        assert_eq!(code_of(&e).as_deref(), Some("INTERNAL_ERROR"));
        let e =
            gql(Error::new(ErrorKind::PodNotFound, "no pod")).into_server_error(Default::default());
        assert_eq!(code_of(&e).as_deref(), Some("POD_NOT_FOUND"));
    }

    #[test]
    fn library_errors_get_codes() {
        let resp = Response::from_errors(vec![
            ServerError::new("Query is nested too deep.", None),
            ServerError::new("Query is too complex.", None),
            ServerError::new("Unknown field \"x\"", None),
        ]);
        let codes: Vec<_> = add_codes(resp).errors.iter().filter_map(code_of).collect();
        assert_eq!(
            codes,
            [QUERY_TOO_DEEP, QUERY_TOO_COMPLEX, VALIDATION_FAILED]
        );
    }
}
