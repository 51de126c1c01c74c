//! WebPods tokens (SPEC §3.1): HS256 JWTs with `sub`, `iat`, `type: "webpods"`, optional `exp`,
//! `pods` and `scope`. Only HS256 is accepted, so `alg: none` and algorithm switching fail.

use std::collections::HashSet;

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation, decode, encode};
use serde::{Deserialize, Serialize};

use crate::error::{Error, ErrorKind, Result};

const TOKEN_TYPE: &str = "webpods";

/// The claims of a WebPods token.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Claims {
    pub sub: String,
    pub iat: i64,
    #[serde(rename = "type", default)]
    pub token_type: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exp: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pods: Option<Vec<String>>,
    /// `"read"`, `"write"` or `"read write"`; absent = both. Also read from a list
    /// (`["read", "write"]`), as tokens made by other tools may carry it.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "scope_claim"
    )]
    pub scope: Option<String>,
}

/// A `scope` claim as a string, or a list of strings joined by spaces.
fn scope_claim<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Claim {
        One(String),
        Many(Vec<String>),
    }
    Ok(match Option::<Claim>::deserialize(d)? {
        None => None,
        Some(Claim::One(s)) => Some(s),
        Some(Claim::Many(v)) => Some(v.join(" ")),
    })
}

/// What a token allows, parsed from `scope`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Scope {
    pub read: bool,
    pub write: bool,
}

impl Scope {
    pub const ALL: Scope = Scope {
        read: true,
        write: true,
    };

    /// Parses `read`, `write`, `read,write` or `read write`.
    pub fn parse(s: &str) -> Option<Scope> {
        let mut scope = Scope {
            read: false,
            write: false,
        };
        for part in s.split([',', ' ']).filter(|p| !p.is_empty()) {
            match part {
                "read" => scope.read = true,
                "write" => scope.write = true,
                _ => return None,
            }
        }
        (scope.read || scope.write).then_some(scope)
    }

    /// The claim value; `None` for full scope.
    pub fn claim(self) -> Option<String> {
        match (self.read, self.write) {
            (true, true) | (false, false) => None,
            (true, false) => Some("read".to_string()),
            (false, true) => Some("write".to_string()),
        }
    }
}

/// Signs and verifies tokens with one HS256 secret.
#[derive(Clone)]
pub struct TokenKeys {
    encoding: EncodingKey,
    decoding: DecodingKey,
    validation: Validation,
}

impl std::fmt::Debug for TokenKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TokenKeys(..)")
    }
}

impl TokenKeys {
    pub fn new(secret: &[u8]) -> Self {
        let mut validation = Validation::new(Algorithm::HS256);
        validation.required_spec_claims = HashSet::new();
        validation.validate_exp = true;
        // Tokens we sign carry no `nbf`; one that does is honoured (RFC 7519 §4.1.5).
        validation.validate_nbf = true;
        validation.leeway = 0;
        Self {
            encoding: EncodingKey::from_secret(secret),
            decoding: DecodingKey::from_secret(secret),
            validation,
        }
    }

    pub fn sign(&self, claims: &Claims) -> Result<String> {
        encode(&Header::new(Algorithm::HS256), claims, &self.encoding)
            .map_err(|e| Error::Internal(format!("signing a token: {e}")))
    }

    /// Verifies signature, algorithm, expiry and type.
    pub fn verify(&self, token: &str) -> Result<Claims> {
        use jsonwebtoken::errors::ErrorKind as J;
        let data =
            decode::<Claims>(token, &self.decoding, &self.validation).map_err(|e| {
                match e.kind() {
                    J::ExpiredSignature => {
                        Error::new(ErrorKind::TokenExpired, "the token has expired")
                    }
                    _ => Error::new(ErrorKind::InvalidToken, "the token is invalid"),
                }
            })?;
        if data.claims.token_type != TOKEN_TYPE {
            return Err(Error::new(
                ErrorKind::InvalidTokenType,
                "not a WebPods token",
            ));
        }
        Ok(data.claims)
    }
}

/// Claims for a new token of `user_id`.
pub fn new_claims(
    user_id: &str,
    now_secs: i64,
    expires_in_secs: Option<i64>,
    pods: Option<Vec<String>>,
    scope: Scope,
) -> Claims {
    Claims {
        sub: user_id.to_string(),
        iat: now_secs,
        token_type: TOKEN_TYPE.to_string(),
        exp: expires_in_secs.map(|s| now_secs.saturating_add(s)),
        pods,
        scope: scope.claim(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::Engine as _;
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;

    fn keys() -> TokenKeys {
        TokenKeys::new(b"test-secret-test-secret-test-secret")
    }

    #[test]
    fn signs_and_verifies() {
        let k = keys();
        let c = new_claims(
            "u1",
            1_700_000_000,
            None,
            Some(vec!["alice".into()]),
            Scope::ALL,
        );
        let t = k.sign(&c).expect("sign");
        assert_eq!(k.verify(&t).expect("verify"), c);
    }

    #[test]
    fn rejects_other_secret_and_garbage() {
        let t = keys()
            .sign(&new_claims("u1", 1, None, None, Scope::ALL))
            .expect("sign");
        let other = TokenKeys::new(b"another-secret-another-secret-xx");
        assert_eq!(
            other.verify(&t).unwrap_err().kind(),
            ErrorKind::InvalidToken
        );
        assert_eq!(
            keys().verify("not.a.jwt").unwrap_err().kind(),
            ErrorKind::InvalidToken
        );
    }

    #[test]
    fn rejects_a_token_not_yet_valid() {
        let k = keys();
        let claims =
            |nbf: i64| serde_json::json!({"sub": "u1", "iat": 1, "type": "webpods", "nbf": nbf});
        let sign = |c| encode(&Header::new(Algorithm::HS256), &c, &k.encoding).expect("sign");
        let now = crate::clock::now_ms() / 1000;
        assert_eq!(
            k.verify(&sign(claims(now + 3600))).unwrap_err().kind(),
            ErrorKind::InvalidToken
        );
        assert!(k.verify(&sign(claims(now - 10))).is_ok());
    }

    #[test]
    fn a_scope_claim_may_be_a_list() {
        let k = keys();
        let sign = |scope: serde_json::Value| {
            let c = serde_json::json!({"sub": "u1", "iat": 1, "type": "webpods", "scope": scope});
            encode(&Header::new(Algorithm::HS256), &c, &k.encoding).expect("sign")
        };
        let both = k.verify(&sign(serde_json::json!(["read", "write"])));
        assert_eq!(both.expect("list").scope.as_deref(), Some("read write"));
        let read = k.verify(&sign(serde_json::json!("read")));
        assert_eq!(read.expect("string").scope.as_deref(), Some("read"));
        assert!(k.verify(&sign(serde_json::json!(42))).is_err());
    }

    #[test]
    fn rejects_alg_none() {
        let header = URL_SAFE_NO_PAD.encode(br#"{"alg":"none","typ":"JWT"}"#);
        let body = URL_SAFE_NO_PAD.encode(br#"{"sub":"u1","iat":1,"type":"webpods"}"#);
        let t = format!("{header}.{body}.");
        assert_eq!(
            keys().verify(&t).unwrap_err().kind(),
            ErrorKind::InvalidToken
        );
    }

    #[test]
    fn rejects_expired_and_wrong_type() {
        let k = keys();
        let t = k
            .sign(&new_claims("u1", 1000, Some(10), None, Scope::ALL))
            .expect("sign");
        assert_eq!(k.verify(&t).unwrap_err().kind(), ErrorKind::TokenExpired);
        let mut c = new_claims("u1", 1000, None, None, Scope::ALL);
        c.token_type = "refresh".into();
        let t = k.sign(&c).expect("sign");
        assert_eq!(
            k.verify(&t).unwrap_err().kind(),
            ErrorKind::InvalidTokenType
        );
    }

    #[test]
    fn scopes() {
        assert_eq!(
            Scope::parse("read"),
            Some(Scope {
                read: true,
                write: false
            })
        );
        assert_eq!(Scope::parse("read,write"), Some(Scope::ALL));
        assert_eq!(Scope::parse("admin"), None);
        assert_eq!(Scope::ALL.claim(), None);
    }
}
