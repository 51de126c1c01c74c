//! Configuration, read once at startup from the `WEBPODS_*` environment variables (SPEC §10)
//! into typed structs that are passed down. Every problem is reported at once.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use url::Url;
use webpods_engine::{ActorLimits, EngineConfig, RateLimits};
use webpods_storage::StoreOptions;

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

/// Everything the server needs to start.
#[derive(Debug, Clone)]
pub struct Config {
    pub listen: SocketAddr,
    pub public_url: Url,
    pub database_url: String,
    /// HS256 secret; when absent, local mode generates one and keeps it in the database.
    pub jwt_secret: Option<String>,
    pub log: String,
    pub log_format: LogFormat,
    /// Where local mode writes the `local` user's token (default: next to a SQLite database).
    pub token_file: Option<PathBuf>,
    pub engine: EngineConfig,
    pub store: StoreOptions,
    /// How long a graceful shutdown may take before the process exits anyway.
    pub shutdown_timeout: Duration,
    /// Largest body of a batch append.
    pub max_batch_bytes: usize,
    /// The pod also served on the main domain (SPEC §2).
    pub root_pod: Option<String>,
}

impl Config {
    /// Reads the process environment.
    pub fn from_env() -> Result<Config, Vec<String>> {
        Self::from_lookup(|k| std::env::var(k).ok())
    }

    /// Reads configuration through `get` (the environment, or a map in tests).
    pub fn from_lookup(get: impl Fn(&str) -> Option<String>) -> Result<Config, Vec<String>> {
        let mut errors = Vec::new();
        let var = |k: &str| get(k).filter(|v| !v.trim().is_empty());
        // A bad number is recorded and replaced by 0; any recorded error aborts below.
        let parse = |k: &str, default: &str, errors: &mut Vec<String>| -> u64 {
            let v = var(k).unwrap_or_else(|| default.to_string());
            v.trim().parse::<u64>().unwrap_or_else(|_| {
                errors.push(format!("{k}: expected a non-negative integer, got {v:?}"));
                0
            })
        };
        let listen = var("WEBPODS_LISTEN").unwrap_or_else(|| "127.0.0.1:3000".into());
        let listen = listen
            .parse::<SocketAddr>()
            .map_err(|_| {
                errors.push(format!(
                    "WEBPODS_LISTEN: {listen:?} is not an address like 127.0.0.1:3000"
                ))
            })
            .ok();
        let public = var("WEBPODS_PUBLIC_URL").unwrap_or_else(|| "http://localhost:3000".into());
        let public_url = match Url::parse(&public) {
            Ok(u) if u.host_str().is_some() && matches!(u.scheme(), "http" | "https") => Some(u),
            _ => {
                errors.push(format!(
                    "WEBPODS_PUBLIC_URL: {public:?} is not an http(s) URL"
                ));
                None
            }
        };
        let database_url =
            var("WEBPODS_DATABASE_URL").unwrap_or_else(|| "sqlite://./webpods.db".into());
        if !(database_url.starts_with("sqlite:")
            || database_url.starts_with("postgres://")
            || database_url.starts_with("postgresql://"))
        {
            errors.push("WEBPODS_DATABASE_URL: expected postgres://… or sqlite://path".to_string());
        }
        let log_format = match var("WEBPODS_LOG_FORMAT").as_deref() {
            None | Some("text") => LogFormat::Text,
            Some("json") => LogFormat::Json,
            Some(other) => {
                errors.push(format!(
                    "WEBPODS_LOG_FORMAT: expected text or json, got {other:?}"
                ));
                LogFormat::Text
            }
        };
        let max_record_bytes = parse("WEBPODS_MAX_RECORD_BYTES", "10485760", &mut errors);
        let max_list = parse("WEBPODS_MAX_LIST_RECORDS", "1000", &mut errors);
        let idle = parse("WEBPODS_ACTOR_IDLE_SECS", "30", &mut errors);
        let pool = parse("WEBPODS_DB_MAX_CONNECTIONS", "16", &mut errors);
        let shutdown = parse("WEBPODS_SHUTDOWN_TIMEOUT_SECS", "30", &mut errors);
        let max_batch = parse("WEBPODS_MAX_BATCH_BYTES", "67108864", &mut errors);
        let rate_defaults = RateLimits::default();
        let rate_limits = RateLimits {
            enabled: match var("WEBPODS_RATE_LIMITS").as_deref() {
                None | Some("on") => true,
                Some("off") => false,
                Some(other) => {
                    errors.push(format!(
                        "WEBPODS_RATE_LIMITS: expected on or off, got {other:?}"
                    ));
                    true
                }
            },
            read: parse(
                "WEBPODS_RATE_LIMIT_READ",
                &rate_defaults.read.to_string(),
                &mut errors,
            ),
            write: parse(
                "WEBPODS_RATE_LIMIT_WRITE",
                &rate_defaults.write.to_string(),
                &mut errors,
            ),
            pod_create: parse(
                "WEBPODS_RATE_LIMIT_POD_CREATE",
                &rate_defaults.pod_create.to_string(),
                &mut errors,
            ),
            stream_create: parse(
                "WEBPODS_RATE_LIMIT_STREAM_CREATE",
                &rate_defaults.stream_create.to_string(),
                &mut errors,
            ),
            ..rate_defaults
        };
        let allowed_record_headers = var("WEBPODS_ALLOWED_RECORD_HEADERS")
            .map(|v| {
                v.split(',')
                    .map(|h| h.trim().to_ascii_lowercase())
                    .filter(|h| !h.is_empty())
                    .collect()
            })
            .unwrap_or_default();
        let token_file = var("WEBPODS_TOKEN_FILE")
            .map(PathBuf::from)
            .or_else(|| sqlite_path(&database_url).map(|p| p.with_extension("token")));
        if !errors.is_empty() {
            return Err(errors);
        }
        let (Some(listen), Some(public_url)) = (listen, public_url) else {
            return Err(vec!["invalid configuration".to_string()]);
        };
        let max_record_bytes = usize::try_from(max_record_bytes).unwrap_or(usize::MAX);
        Ok(Config {
            listen,
            public_url: public_url.clone(),
            database_url,
            jwt_secret: var("WEBPODS_JWT_SECRET"),
            log: var("WEBPODS_LOG").unwrap_or_else(|| "info".into()),
            log_format,
            token_file,
            engine: EngineConfig {
                actors: ActorLimits {
                    max_batch_records: 4096,
                    max_batch_bytes: 16 * 1024 * 1024,
                    idle_timeout: Duration::from_secs(idle.max(1)),
                },
                max_record_bytes,
                max_list_records: i64::try_from(max_list.max(1)).unwrap_or(1000),
                allowed_record_headers,
                cache_ttl: Duration::from_secs(5),
                auth: webpods_engine::AuthSettings {
                    public_url: public_url.clone(),
                    ..Default::default()
                },
                rate_limits,
            },
            store: StoreOptions {
                max_connections: u32::try_from(pool.max(1)).unwrap_or(16),
                acquire_timeout: Duration::from_secs(5),
            },
            shutdown_timeout: Duration::from_secs(shutdown),
            max_batch_bytes: usize::try_from(max_batch).unwrap_or(usize::MAX),
            root_pod: var("WEBPODS_ROOT_POD"),
        })
    }

    /// The main domain: the host of `public_url`.
    pub fn main_host(&self) -> String {
        self.public_url
            .host_str()
            .unwrap_or("localhost")
            .trim_matches(['[', ']'])
            .to_ascii_lowercase()
    }
}

/// The file of a `sqlite://path` URL.
fn sqlite_path(url: &str) -> Option<PathBuf> {
    let rest = url
        .strip_prefix("sqlite://")
        .or_else(|| url.strip_prefix("sqlite:"))?;
    let path = rest.split('?').next().unwrap_or(rest);
    (!path.is_empty() && path != ":memory:").then(|| PathBuf::from(path))
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    fn with(vars: &[(&str, &str)]) -> Result<Config, Vec<String>> {
        let map: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Config::from_lookup(|k| map.get(k).cloned())
    }

    #[test]
    fn defaults_are_the_specs() {
        let c = with(&[]).expect("defaults");
        assert_eq!(c.listen.to_string(), "127.0.0.1:3000");
        assert_eq!(c.main_host(), "localhost");
        assert_eq!(c.database_url, "sqlite://./webpods.db");
        assert_eq!(c.token_file, Some(PathBuf::from("./webpods.token")));
        assert_eq!(c.engine.max_record_bytes, 10 * 1024 * 1024);
    }

    #[test]
    fn reports_every_problem_at_once() {
        let errs = with(&[
            ("WEBPODS_LISTEN", "nope"),
            ("WEBPODS_PUBLIC_URL", "ftp://x"),
            ("WEBPODS_MAX_RECORD_BYTES", "-1"),
        ])
        .unwrap_err();
        assert_eq!(errs.len(), 3, "{errs:?}");
    }
}
