//! The engine's one error type. Every frontend maps [`ErrorKind`] to its transport (HTTP status,
//! GraphQL `extensions.code`, WebSocket error frame); the `code` strings are the spec's.

use serde_json::Value;

/// What went wrong, as the client sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    Unauthorized,
    InvalidToken,
    TokenExpired,
    InvalidTokenType,
    PodForbidden,
    Forbidden,
    InvalidInput,
    InvalidName,
    InvalidPath,
    MissingName,
    InvalidIndex,
    InvalidContent,
    ContentTooLarge,
    PodExists,
    PodNotFound,
    StreamExists,
    StreamNotFound,
    RecordNotFound,
    RecordDeleted,
    RecordPurged,
    NameConflict,
    PreconditionFailed,
    UserNotFound,
    NotFound,
    Unavailable,
    Internal,
    DomainTaken,
    InvalidProvider,
    InvalidCallback,
    InvalidState,
    OauthError,
    RateLimitExceeded,
    /// A live tail's `afterHash` does not match the stored record (SPEC §6.1).
    ForkDetected,
    /// A live subscriber fell too far behind to catch up (WebSocket close 4008).
    TooSlow,
    /// An `Idempotency-Key` sent again with a different request (422).
    IdempotencyKeyReused,
}

impl ErrorKind {
    /// The spec's error code, e.g. `POD_NOT_FOUND`.
    pub fn code(self) -> &'static str {
        use ErrorKind::*;
        match self {
            Unauthorized => "UNAUTHORIZED",
            InvalidToken => "INVALID_TOKEN",
            TokenExpired => "TOKEN_EXPIRED",
            InvalidTokenType => "INVALID_TOKEN_TYPE",
            PodForbidden => "POD_FORBIDDEN",
            Forbidden => "FORBIDDEN",
            InvalidInput => "INVALID_INPUT",
            InvalidName => "INVALID_NAME",
            InvalidPath => "INVALID_PATH",
            MissingName => "MISSING_NAME",
            InvalidIndex => "INVALID_INDEX",
            InvalidContent => "INVALID_CONTENT",
            ContentTooLarge => "CONTENT_TOO_LARGE",
            PodExists => "POD_EXISTS",
            PodNotFound => "POD_NOT_FOUND",
            StreamExists => "STREAM_EXISTS",
            StreamNotFound => "STREAM_NOT_FOUND",
            RecordNotFound => "RECORD_NOT_FOUND",
            RecordDeleted => "RECORD_DELETED",
            RecordPurged => "RECORD_PURGED",
            NameConflict => "NAME_CONFLICT",
            PreconditionFailed => "PRECONDITION_FAILED",
            UserNotFound => "USER_NOT_FOUND",
            NotFound => "NOT_FOUND",
            Unavailable => "UNAVAILABLE",
            Internal => "INTERNAL_ERROR",
            DomainTaken => "DOMAIN_TAKEN",
            InvalidProvider => "INVALID_PROVIDER",
            InvalidCallback => "INVALID_CALLBACK",
            InvalidState => "INVALID_STATE",
            OauthError => "OAUTH_ERROR",
            RateLimitExceeded => "RATE_LIMIT_EXCEEDED",
            ForkDetected => "FORK_DETECTED",
            TooSlow => "TOO_SLOW",
            IdempotencyKeyReused => "IDEMPOTENCY_KEY_REUSED",
        }
    }
}

/// An engine failure. Storage errors keep their source for logs; [`Error::public_message`] is
/// what a client may see.
#[derive(Debug, Clone, thiserror::Error)]
pub enum Error {
    /// A refusal the client can act on.
    #[error("{message}")]
    Rejected {
        kind: ErrorKind,
        message: String,
        details: Option<Value>,
    },
    /// The database could not be reached; retrying later may work.
    #[error("storage unavailable: {0}")]
    Unavailable(String),
    /// A failure that is our fault; details go to the log only.
    #[error("internal error: {0}")]
    Internal(String),
}

impl Error {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Error::Rejected {
            kind,
            message: message.into(),
            details: None,
        }
    }

    pub fn with_details(kind: ErrorKind, message: impl Into<String>, details: Value) -> Self {
        Error::Rejected {
            kind,
            message: message.into(),
            details: Some(details),
        }
    }

    pub fn kind(&self) -> ErrorKind {
        match self {
            Error::Rejected { kind, .. } => *kind,
            Error::Unavailable(_) => ErrorKind::Unavailable,
            Error::Internal(_) => ErrorKind::Internal,
        }
    }

    /// The message safe to show a client (never internals).
    pub fn public_message(&self) -> String {
        match self {
            Error::Rejected { message, .. } => message.clone(),
            Error::Unavailable(_) => "the database is unavailable; retry later".to_string(),
            Error::Internal(_) => "internal error".to_string(),
        }
    }

    pub fn details(&self) -> Option<&Value> {
        match self {
            Error::Rejected { details, .. } => details.as_ref(),
            _ => None,
        }
    }
}

impl From<webpods_storage::Error> for Error {
    fn from(e: webpods_storage::Error) -> Self {
        use webpods_storage::ErrorKind as K;
        match e.kind() {
            K::Unavailable => Error::Unavailable(e.to_string()),
            K::NotFound => Error::new(ErrorKind::StreamNotFound, "stream not found"),
            K::Unstorable => Error::new(
                ErrorKind::InvalidInput,
                "text values may not contain NUL characters",
            ),
            K::Internal => Error::Internal(e.to_string()),
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
