//! Configuration, read once at startup (SPEC §10) into typed structs that are passed down.
//!
//! Sources, highest priority first: the `WEBPODS_*` environment variables, then the optional
//! TOML file (`--config FILE` or `WEBPODS_CONFIG`), then the defaults. Every file key has a
//! variable ([`KEYS`]), so any key can be overridden without editing the file; the one
//! exception is `[[auth.providers]]`, a list of tables. Every problem — unknown sections and
//! keys, wrong types, bad values — is collected and reported at once. `webpods.example.toml`
//! at the repository root documents every key (a test checks it parses with no problem).

use std::collections::HashMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use url::Url;
use webpods_engine::{ActorLimits, EngineConfig};
use webpods_storage::StoreOptions;

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

/// Everything the server needs to start. Its `Debug` output hides the secrets (the JWT secret,
/// the database password, provider client secrets), so it is safe to log.
#[derive(Clone)]
pub struct Config {
    pub listen: SocketAddr,
    pub public_url: Url,
    pub database_url: String,
    /// HS256 secret; when absent, local mode generates one and keeps it in the database.
    pub jwt_secret: Option<String>,
    /// Lifetime of issued tokens (`auth.jwt_expiry`); `None`: tokens do not expire.
    pub jwt_expiry: Option<Duration>,
    /// OAuth providers (`[[auth.providers]]`); none = local mode.
    pub providers: Vec<ProviderConfig>,
    pub log: String,
    pub log_format: LogFormat,
    /// Where local mode writes the `local` user's token (default: next to a SQLite database).
    pub token_file: Option<PathBuf>,
    pub engine: EngineConfig,
    pub store: StoreOptions,
    /// How long to keep retrying an unreachable database at startup before giving up.
    pub connect_retry: Duration,
    /// How long a graceful shutdown may take before the process exits anyway.
    pub shutdown_timeout: Duration,
    /// After a shutdown signal, how long to keep serving with `/ready` at 503 before the
    /// listener closes (so load balancers stop routing here first). Part of the timeout.
    pub drain_delay: Duration,
    /// Largest body of a batch append.
    pub max_batch_bytes: usize,
    /// Most live subscriptions on one `/ws` connection (SPEC §6.2).
    /// WebSocket/SSE live tails.
    pub live: webpods_api_ws::LiveConfig,
    /// The pod also served on the main domain (SPEC §2).
    pub root_pod: Option<String>,
    pub rate_limits: RateLimits,
}

impl fmt::Debug for Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Config")
            .field("listen", &self.listen)
            .field("public_url", &self.public_url.as_str())
            .field("database_url", &redact_password(&self.database_url))
            .field("jwt_secret", &self.jwt_secret.as_ref().map(|_| "***"))
            .field("jwt_expiry", &self.jwt_expiry)
            .field("providers", &self.providers)
            .field("log", &self.log)
            .field("log_format", &self.log_format)
            .field("token_file", &self.token_file)
            .field("engine", &self.engine)
            .field("store", &self.store)
            .field("connect_retry", &self.connect_retry)
            .field("shutdown_timeout", &self.shutdown_timeout)
            .field("drain_delay", &self.drain_delay)
            .field("max_batch_bytes", &self.max_batch_bytes)
            .field("live", &self.live)
            .field("root_pod", &self.root_pod)
            .field("rate_limits", &self.rate_limits)
            .finish()
    }
}

/// A database URL with its password (if any) replaced by `***`.
pub fn redact_password(url: &str) -> String {
    match Url::parse(url) {
        Ok(mut u) if u.password().is_some() => {
            let _ = u.set_password(Some("***"));
            u.to_string()
        }
        _ => url.to_string(),
    }
}

/// Per-caller hourly limits of SPEC §9 (requests per hour and action).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateLimits {
    pub enabled: bool,
    pub read: u64,
    pub write: u64,
    pub pod_create: u64,
    pub stream_create: u64,
}

/// One OAuth 2.0 provider as the file writes it (`[[auth.providers]]`); the engine's type.
pub use webpods_engine::ProviderConfig;

/// Providers whose URLs and fields are built in.
pub const PROVIDER_PRESETS: [&str; 3] = ["github", "google", "gitlab"];

/// The value type of a configuration key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Str,
    Int,
    Bool,
    /// A TOML array of strings, or a comma-separated string (variables).
    List,
    /// A duration: an integer of seconds or a string such as `"90s"` or `"12h"`.
    Duration,
}

/// Every file key `(section, key)` and the variable that overrides it.
pub const KEYS: &[(&str, &str, &str)] = &[
    ("server", "listen", "WEBPODS_LISTEN"),
    ("server", "public_url", "WEBPODS_PUBLIC_URL"),
    ("server", "root_pod", "WEBPODS_ROOT_POD"),
    (
        "server",
        "allowed_record_headers",
        "WEBPODS_ALLOWED_RECORD_HEADERS",
    ),
    (
        "server",
        "shutdown_timeout_secs",
        "WEBPODS_SHUTDOWN_TIMEOUT_SECS",
    ),
    ("server", "drain_delay_secs", "WEBPODS_DRAIN_DELAY_SECS"),
    ("server", "token_file", "WEBPODS_TOKEN_FILE"),
    ("database", "url", "WEBPODS_DATABASE_URL"),
    ("database", "max_connections", "WEBPODS_DB_MAX_CONNECTIONS"),
    (
        "database",
        "acquire_timeout_secs",
        "WEBPODS_DB_ACQUIRE_TIMEOUT_SECS",
    ),
    (
        "database",
        "statement_timeout_secs",
        "WEBPODS_DB_STATEMENT_TIMEOUT_SECS",
    ),
    (
        "database",
        "connect_retry_secs",
        "WEBPODS_DB_CONNECT_RETRY_SECS",
    ),
    ("auth", "jwt_secret", "WEBPODS_JWT_SECRET"),
    ("auth", "jwt_expiry", "WEBPODS_JWT_EXPIRY"),
    ("limits", "max_record_bytes", "WEBPODS_MAX_RECORD_BYTES"),
    ("limits", "max_list_records", "WEBPODS_MAX_LIST_RECORDS"),
    ("limits", "max_batch_bytes", "WEBPODS_MAX_BATCH_BYTES"),
    (
        "limits",
        "max_subscriptions_per_connection",
        "WEBPODS_MAX_SUBSCRIPTIONS_PER_CONNECTION",
    ),
    (
        "limits",
        "max_recursive_streams",
        "WEBPODS_MAX_RECURSIVE_STREAMS",
    ),
    ("live", "max_message_bytes", "WEBPODS_WS_MAX_MESSAGE_BYTES"),
    ("live", "idle_timeout_secs", "WEBPODS_WS_IDLE_TIMEOUT_SECS"),
    (
        "live",
        "send_timeout_secs",
        "WEBPODS_LIVE_SEND_TIMEOUT_SECS",
    ),
    ("live", "max_behind", "WEBPODS_LIVE_MAX_BEHIND"),
    ("actors", "idle_secs", "WEBPODS_ACTOR_IDLE_SECS"),
    ("actors", "max_alive", "WEBPODS_ACTOR_MAX_ALIVE"),
    (
        "actors",
        "max_batch_records",
        "WEBPODS_ACTOR_MAX_BATCH_RECORDS",
    ),
    ("actors", "max_batch_bytes", "WEBPODS_ACTOR_MAX_BATCH_BYTES"),
    ("log", "filter", "WEBPODS_LOG"),
    ("log", "format", "WEBPODS_LOG_FORMAT"),
    ("rate_limits", "enabled", "WEBPODS_RATE_LIMITS"),
    ("rate_limits", "read_per_hour", "WEBPODS_RATE_LIMIT_READ"),
    ("rate_limits", "write_per_hour", "WEBPODS_RATE_LIMIT_WRITE"),
    (
        "rate_limits",
        "pod_create_per_hour",
        "WEBPODS_RATE_LIMIT_POD_CREATE",
    ),
    (
        "rate_limits",
        "stream_create_per_hour",
        "WEBPODS_RATE_LIMIT_STREAM_CREATE",
    ),
];

fn kind_of(var: &str) -> Kind {
    match var {
        "WEBPODS_ALLOWED_RECORD_HEADERS" => Kind::List,
        "WEBPODS_RATE_LIMITS" => Kind::Bool,
        "WEBPODS_JWT_EXPIRY" => Kind::Duration,
        v if v.ends_with("_SECS")
            || v.ends_with("_BYTES")
            || v.ends_with("_RECORDS")
            || v.ends_with("_CONNECTIONS")
            || v.ends_with("_CONNECTION")
            || v.starts_with("WEBPODS_RATE_LIMIT_")
            || v == "WEBPODS_LIVE_MAX_BEHIND"
            || v == "WEBPODS_ACTOR_MAX_ALIVE"
            || v == "WEBPODS_MAX_RECURSIVE_STREAMS" =>
        {
            Kind::Int
        }
        _ => Kind::Str,
    }
}

/// Where a value came from, to name it in error messages.
#[derive(Debug, Clone)]
enum Origin {
    Env,
    File { key: String },
}

/// The file's values by variable name, plus what only the file can hold.
#[derive(Debug, Default)]
struct FileValues {
    path: Option<PathBuf>,
    values: HashMap<&'static str, String>,
    providers: Vec<ProviderConfig>,
}

impl FileValues {
    /// Parses a TOML document, recording every problem in `errors`.
    fn parse(text: &str, path: &Path, errors: &mut Vec<String>) -> FileValues {
        let file = path.display();
        let mut out = FileValues {
            path: Some(path.to_path_buf()),
            ..FileValues::default()
        };
        let table: toml::Table = match toml::from_str(text) {
            Ok(t) => t,
            Err(e) => {
                errors.push(format!("{file}: {}", e.to_string().trim_end()));
                return out;
            }
        };
        for (section, value) in table {
            let toml::Value::Table(entries) = value else {
                errors.push(format!(
                    "{file}: `{section}` must be a [section], found a {}",
                    value.type_str()
                ));
                continue;
            };
            if !KEYS.iter().any(|(s, _, _)| *s == section) {
                errors.push(format!("{file}: unknown section [{section}]"));
                continue;
            }
            for (key, v) in entries {
                if section == "auth" && key == "providers" {
                    out.providers = parse_providers(v, &file.to_string(), errors);
                    continue;
                }
                let Some(&(_, _, var)) = KEYS.iter().find(|(s, k, _)| *s == section && *k == key)
                else {
                    errors.push(format!("{file}: unknown key `{key}` in [{section}]"));
                    continue;
                };
                match as_string(kind_of(var), v) {
                    Ok(s) => {
                        out.values.insert(var, s);
                    }
                    Err(expected) => {
                        errors.push(format!("{file}: {section}.{key}: expected {expected}"));
                    }
                }
            }
        }
        out
    }
}

/// A file value in the textual form the variables use.
fn as_string(kind: Kind, v: toml::Value) -> Result<String, &'static str> {
    use toml::Value as V;
    match (kind, v) {
        (Kind::Str, V::String(s)) => Ok(s),
        (Kind::Str, _) => Err("a string"),
        (Kind::Int, V::Integer(i)) => Ok(i.to_string()),
        (Kind::Int, _) => Err("an integer"),
        (Kind::Bool, V::Boolean(b)) => Ok(if b { "on" } else { "off" }.to_string()),
        (Kind::Bool, _) => Err("true or false"),
        (Kind::Duration, V::Integer(i)) => Ok(i.to_string()),
        (Kind::Duration, V::String(s)) => Ok(s),
        (Kind::Duration, _) => Err("seconds or a string such as \"12h\""),
        (Kind::List, V::Array(items)) => items
            .into_iter()
            .map(|i| match i {
                V::String(s) if !s.contains(',') => Ok(s),
                _ => Err("an array of names"),
            })
            .collect::<Result<Vec<_>, _>>()
            .map(|v| v.join(",")),
        (Kind::List, _) => Err("an array of names"),
    }
}

fn parse_providers(v: toml::Value, file: &str, errors: &mut Vec<String>) -> Vec<ProviderConfig> {
    let toml::Value::Array(items) = v else {
        errors.push(format!(
            "{file}: auth.providers must be written as [[auth.providers]] tables"
        ));
        return Vec::new();
    };
    let mut out = Vec::new();
    for (i, item) in items.into_iter().enumerate() {
        match item.try_into::<ProviderConfig>() {
            Ok(p) => out.push(p),
            Err(e) => errors.push(format!(
                "{file}: [[auth.providers]] #{}: {}",
                i + 1,
                e.to_string().trim_end()
            )),
        }
    }
    out
}

impl Config {
    /// Reads the process environment and, if given, the TOML file (`--config`/`WEBPODS_CONFIG`).
    pub fn load(file: Option<&Path>) -> Result<Config, Vec<String>> {
        Self::load_with(file, |k| std::env::var(k).ok())
    }

    /// Reads the process environment only.
    pub fn from_env() -> Result<Config, Vec<String>> {
        Self::load(None)
    }

    /// Reads configuration through `get` (the environment, or a map in tests).
    pub fn from_lookup(get: impl Fn(&str) -> Option<String>) -> Result<Config, Vec<String>> {
        Self::build(&FileValues::default(), &get, Vec::new())
    }

    /// The file at `file` (if any) overridden by the variables `get` finds.
    pub fn load_with(
        file: Option<&Path>,
        get: impl Fn(&str) -> Option<String>,
    ) -> Result<Config, Vec<String>> {
        let mut errors = Vec::new();
        let values = match file {
            None => FileValues::default(),
            Some(path) => match std::fs::read_to_string(path) {
                Ok(text) => FileValues::parse(&text, path, &mut errors),
                Err(e) => {
                    errors.push(format!("{}: cannot read: {e}", path.display()));
                    FileValues::default()
                }
            },
        };
        Self::build(&values, &get, errors)
    }

    /// Parses a TOML document as if it were the file `name` (tests and examples).
    pub fn from_toml_str(
        text: &str,
        name: &str,
        get: impl Fn(&str) -> Option<String>,
    ) -> Result<Config, Vec<String>> {
        let mut errors = Vec::new();
        let values = FileValues::parse(text, Path::new(name), &mut errors);
        Self::build(&values, &get, errors)
    }

    fn build(
        file: &FileValues,
        env: &dyn Fn(&str) -> Option<String>,
        mut errors: Vec<String>,
    ) -> Result<Config, Vec<String>> {
        let lookup = |k: &str| -> Option<(String, Origin)> {
            if let Some(v) = env(k).filter(|v| !v.trim().is_empty()) {
                return Some((v, Origin::Env));
            }
            let v = file.values.get(k)?;
            let key = KEYS
                .iter()
                .find(|(_, _, var)| *var == k)
                .map(|(s, key, _)| format!("{s}.{key}"))
                .unwrap_or_default();
            Some((v.clone(), Origin::File { key }))
        };
        let file_name = file
            .path
            .as_ref()
            .map(|p| p.display().to_string())
            .unwrap_or_default();
        // How a problem names its key: the variable, or the file key and the variable.
        let name = |k: &str, origin: &Origin| match origin {
            Origin::Env => k.to_string(),
            Origin::File { key } => format!("{file_name}: {key} ({k})"),
        };
        let var = |k: &str| lookup(k).map(|(v, _)| v);
        // A bad number is recorded and replaced by 0; any recorded error aborts below.
        let parse = |k: &str, default: u64, errors: &mut Vec<String>| -> u64 {
            match lookup(k) {
                None => default,
                Some((v, origin)) => v.trim().parse::<u64>().unwrap_or_else(|_| {
                    errors.push(format!(
                        "{}: expected a non-negative integer, got {v:?}",
                        name(k, &origin)
                    ));
                    0
                }),
            }
        };
        let (listen, origin) =
            lookup("WEBPODS_LISTEN").unwrap_or_else(|| ("127.0.0.1:3000".to_string(), Origin::Env));
        // An IP address and port, or a host name that resolves (`localhost:3000`; IPv4 first).
        let listen = listen
            .parse::<SocketAddr>()
            .ok()
            .or_else(|| {
                std::net::ToSocketAddrs::to_socket_addrs(listen.as_str())
                    .ok()?
                    .min_by_key(SocketAddr::is_ipv6)
            })
            .or_else(|| {
                errors.push(format!(
                    "{}: {listen:?} is not an address like 127.0.0.1:3000 or localhost:3000",
                    name("WEBPODS_LISTEN", &origin)
                ));
                None
            });
        // Unset, the public URL is the listen port on `localhost`, so the printed URL and the
        // absolute links point where the server listens (port 0 has no port yet: 3000).
        let (public, origin) = lookup("WEBPODS_PUBLIC_URL").unwrap_or_else(|| {
            let port = listen.map_or(0, |l| l.port());
            let port = if port == 0 { 3000 } else { port };
            (format!("http://localhost:{port}"), Origin::Env)
        });
        let public_url = match Url::parse(&public) {
            Ok(u) if u.host_str().is_some() && matches!(u.scheme(), "http" | "https") => Some(u),
            _ => {
                errors.push(format!(
                    "{}: {public:?} is not an http(s) URL",
                    name("WEBPODS_PUBLIC_URL", &origin)
                ));
                None
            }
        };
        let (database_url, origin) = lookup("WEBPODS_DATABASE_URL")
            .unwrap_or_else(|| ("sqlite://./webpods.db".to_string(), Origin::Env));
        if !(database_url.starts_with("sqlite:")
            || database_url.starts_with("postgres://")
            || database_url.starts_with("postgresql://"))
        {
            errors.push(format!(
                "{}: expected postgres://… or sqlite://path",
                name("WEBPODS_DATABASE_URL", &origin)
            ));
        }
        let log_format = match lookup("WEBPODS_LOG_FORMAT") {
            None => LogFormat::Text,
            Some((v, origin)) => match v.trim() {
                "text" => LogFormat::Text,
                "json" => LogFormat::Json,
                other => {
                    errors.push(format!(
                        "{}: expected text or json, got {other:?}",
                        name("WEBPODS_LOG_FORMAT", &origin)
                    ));
                    LogFormat::Text
                }
            },
        };
        let rate_limits_on = match lookup("WEBPODS_RATE_LIMITS") {
            None => true,
            Some((v, origin)) => match v.trim() {
                "on" | "true" => true,
                "off" | "false" => false,
                other => {
                    errors.push(format!(
                        "{}: expected on or off, got {other:?}",
                        name("WEBPODS_RATE_LIMITS", &origin)
                    ));
                    true
                }
            },
        };
        let jwt_expiry = match lookup("WEBPODS_JWT_EXPIRY") {
            None => None,
            Some((v, origin)) => match parse_duration(&v) {
                Some(d) => Some(d),
                None => {
                    errors.push(format!(
                        "{}: expected a duration like 3600, 90s, 30m, 12h or 7d, got {v:?}",
                        name("WEBPODS_JWT_EXPIRY", &origin)
                    ));
                    None
                }
            },
        };
        // A limit of 0 would refuse every request it applies to: a typo, not a setting.
        // A number with a floor: `unit` names it in the message.
        let parse_at_least =
            |k: &str, default: u64, min: u64, unit: &str, errors: &mut Vec<String>| -> u64 {
                let reported = errors.len();
                let v = parse(k, default, errors);
                // Below with no error recorded: it was given so (a bad number is reported
                // already, and replaced by 0).
                if v < min && errors.len() == reported {
                    let origin = lookup(k).map_or(Origin::Env, |(_, o)| o);
                    errors.push(format!(
                        "{}: must be at least {min}{unit}",
                        name(k, &origin)
                    ));
                }
                v
            };
        let parse_limit = |k: &str, default: u64, errors: &mut Vec<String>| -> u64 {
            parse_at_least(k, default, 1, "", errors)
        };
        let max_record_bytes =
            parse_limit("WEBPODS_MAX_RECORD_BYTES", 10 * 1024 * 1024, &mut errors);
        let max_list = parse_limit("WEBPODS_MAX_LIST_RECORDS", 1000, &mut errors);
        let max_batch = parse_limit("WEBPODS_MAX_BATCH_BYTES", 64 * 1024 * 1024, &mut errors);
        let max_subs = parse_limit("WEBPODS_MAX_SUBSCRIPTIONS_PER_CONNECTION", 100, &mut errors);
        let max_recursive = parse_limit("WEBPODS_MAX_RECURSIVE_STREAMS", 256, &mut errors);
        let ws_message = parse_limit("WEBPODS_WS_MAX_MESSAGE_BYTES", 65_536, &mut errors);
        // Pings go out every third of it: below 2 s the check could not keep its word.
        let ws_idle = parse_at_least(
            "WEBPODS_WS_IDLE_TIMEOUT_SECS",
            60,
            2,
            " seconds",
            &mut errors,
        );
        let live_send = parse("WEBPODS_LIVE_SEND_TIMEOUT_SECS", 10, &mut errors);
        let live_behind = parse("WEBPODS_LIVE_MAX_BEHIND", 100_000, &mut errors);
        let idle = parse("WEBPODS_ACTOR_IDLE_SECS", 30, &mut errors);
        let max_actors = parse_limit("WEBPODS_ACTOR_MAX_ALIVE", 10_000, &mut errors);
        let batch_records = parse_limit("WEBPODS_ACTOR_MAX_BATCH_RECORDS", 4096, &mut errors);
        let batch_bytes = parse_limit(
            "WEBPODS_ACTOR_MAX_BATCH_BYTES",
            16 * 1024 * 1024,
            &mut errors,
        );
        let pool = parse_limit("WEBPODS_DB_MAX_CONNECTIONS", 16, &mut errors);
        let acquire = parse("WEBPODS_DB_ACQUIRE_TIMEOUT_SECS", 5, &mut errors);
        let statement = parse("WEBPODS_DB_STATEMENT_TIMEOUT_SECS", 30, &mut errors);
        let retry = parse("WEBPODS_DB_CONNECT_RETRY_SECS", 30, &mut errors);
        let shutdown = parse("WEBPODS_SHUTDOWN_TIMEOUT_SECS", 30, &mut errors);
        let drain_delay = parse("WEBPODS_DRAIN_DELAY_SECS", 0, &mut errors);
        if drain_delay >= shutdown && drain_delay > 0 {
            errors.push(format!(
                "WEBPODS_DRAIN_DELAY_SECS ({drain_delay}) must be shorter than \
                 WEBPODS_SHUTDOWN_TIMEOUT_SECS ({shutdown}), which includes it"
            ));
        }
        let rate = |k: &str, default: u64, errors: &mut Vec<String>| parse(k, default, errors);
        let rate_limits = RateLimits {
            enabled: rate_limits_on,
            read: rate("WEBPODS_RATE_LIMIT_READ", 10_000, &mut errors),
            write: rate("WEBPODS_RATE_LIMIT_WRITE", 1_000, &mut errors),
            pod_create: rate("WEBPODS_RATE_LIMIT_POD_CREATE", 10, &mut errors),
            stream_create: rate("WEBPODS_RATE_LIMIT_STREAM_CREATE", 100, &mut errors),
        };
        let log = var("WEBPODS_LOG").unwrap_or_else(|| "info".into());
        if let Err(e) = tracing_subscriber::EnvFilter::try_new(&log) {
            errors.push(format!(
                "WEBPODS_LOG (log.filter): {log:?} is not a log filter: {e}"
            ));
        }
        let allowed_record_headers: Vec<String> = var("WEBPODS_ALLOWED_RECORD_HEADERS")
            .map(|v| {
                v.split(',')
                    .map(|h| h.trim().to_ascii_lowercase())
                    .filter(|h| !h.is_empty())
                    .collect()
            })
            .unwrap_or_default();
        for h in &allowed_record_headers {
            if axum::http::HeaderName::from_bytes(h.as_bytes()).is_err() {
                errors.push(format!(
                    "WEBPODS_ALLOWED_RECORD_HEADERS (server.allowed_record_headers): {h:?} is \
                     not a header name (letters, digits and !#$%&'*+-.^_`|~ only)"
                ));
            } else if webpods_engine::is_reserved_record_header(h) {
                errors.push(format!(
                    "WEBPODS_ALLOWED_RECORD_HEADERS (server.allowed_record_headers): {h:?} cannot \
                     be a record header: it frames the response, sets cookies or is one the \
                     server sends itself"
                ));
            }
        }
        let token_file = var("WEBPODS_TOKEN_FILE")
            .map(PathBuf::from)
            .or_else(|| sqlite_path(&database_url).map(|p| p.with_extension("token")));
        let providers = resolve_providers(&file.providers, env, &file_name, &mut errors);
        // The engine's form: presets applied (secrets were resolved just above).
        // Skipped when anything is wrong already: the checks above said it better.
        let checked: &[ProviderConfig] = if errors.is_empty() { &providers } else { &[] };
        let login_providers: Vec<webpods_engine::Provider> = checked
            .iter()
            .filter_map(|p| {
                p.clone()
                    .resolve(|_| None)
                    .map_err(|e| errors.push(format!("{file_name}: {e}")))
                    .ok()
            })
            .collect();
        let jwt_secret = var("WEBPODS_JWT_SECRET");
        if let Some(pod) = var("WEBPODS_ROOT_POD")
            && !webpods_engine::names::is_valid_pod_name(&pod)
        {
            errors.push(format!(
                "WEBPODS_ROOT_POD (server.root_pod): {pod:?} is not a pod name (2–63 of a-z, \
                 0-9 and -, starting and ending with a letter or digit)"
            ));
        }
        if !providers.is_empty() && jwt_secret.is_none() {
            errors.push(
                "auth.jwt_secret (WEBPODS_JWT_SECRET) is required when login providers are \
                 configured"
                    .to_string(),
            );
        }
        if !errors.is_empty() {
            return Err(errors);
        }
        let (Some(listen), Some(public_url)) = (listen, public_url) else {
            return Err(vec!["invalid configuration".to_string()]);
        };
        let size = |v: u64| usize::try_from(v).unwrap_or(usize::MAX);
        Ok(Config {
            listen,
            public_url: public_url.clone(),
            database_url,
            jwt_secret,
            jwt_expiry,
            providers,
            log,
            log_format,
            token_file,
            engine: EngineConfig {
                actors: ActorLimits {
                    max_batch_records: size(batch_records.max(1)),
                    max_batch_bytes: size(batch_bytes.max(1)),
                    idle_timeout: Duration::from_secs(idle.max(1)),
                    max_alive: size(max_actors.max(1)),
                },
                max_record_bytes: size(max_record_bytes),
                max_list_records: i64::try_from(max_list.max(1)).unwrap_or(1000),
                allowed_record_headers,
                cache_ttl: Duration::from_secs(5),
                auth: webpods_engine::AuthSettings {
                    providers: login_providers,
                    public_url: public_url.clone(),
                    jwt_expiry,
                    ..Default::default()
                },
                rate_limits: webpods_engine::RateLimits {
                    enabled: rate_limits.enabled,
                    read: rate_limits.read,
                    write: rate_limits.write,
                    pod_create: rate_limits.pod_create,
                    stream_create: rate_limits.stream_create,
                    ..Default::default()
                },
                live: webpods_engine::LiveLimits {
                    max_behind: i64::try_from(live_behind).unwrap_or(i64::MAX),
                    max_recursive_streams: size(max_recursive.max(1)),
                    ..Default::default()
                },
            },
            store: StoreOptions {
                max_connections: u32::try_from(pool.max(1)).unwrap_or(16),
                acquire_timeout: Duration::from_secs(acquire.max(1)),
                statement_timeout: (statement > 0).then(|| Duration::from_secs(statement)),
            },
            connect_retry: Duration::from_secs(retry),
            shutdown_timeout: Duration::from_secs(shutdown),
            drain_delay: Duration::from_secs(drain_delay),
            max_batch_bytes: size(max_batch),
            live: {
                let d = webpods_api_ws::LiveConfig::default();
                let idle_timeout = Duration::from_secs(ws_idle);
                webpods_api_ws::LiveConfig {
                    max_subscriptions_per_connection: size(max_subs.max(1)),
                    max_message_bytes: size(ws_message.max(256)),
                    ping_interval: (idle_timeout / 3).min(d.ping_interval),
                    idle_timeout,
                    send_timeout: Duration::from_secs(live_send.max(1)),
                    ..d
                }
            },
            root_pod: var("WEBPODS_ROOT_POD"),
            rate_limits,
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

/// `WEBPODS_*` variables set in the environment that configure nothing (most likely typos),
/// for a warning at startup. `WEBPODS_CONFIG` and the test suite's `WEBPODS_TEST_*` are known.
pub fn unknown_variables(vars: impl Iterator<Item = String>) -> Vec<String> {
    let mut unknown: Vec<String> = vars
        .filter(|k| k.starts_with("WEBPODS_"))
        .filter(|k| k != "WEBPODS_CONFIG" && !k.starts_with("WEBPODS_TEST_"))
        .filter(|k| !KEYS.iter().any(|(_, _, var)| var == k))
        .collect();
    unknown.sort();
    unknown
}

/// Checks the providers and resolves `client_secret_env`.
fn resolve_providers(
    providers: &[ProviderConfig],
    env: &dyn Fn(&str) -> Option<String>,
    file: &str,
    errors: &mut Vec<String>,
) -> Vec<ProviderConfig> {
    let mut out: Vec<ProviderConfig> = Vec::new();
    for p in providers {
        let what = format!("{file}: [[auth.providers]] {:?}", p.id);
        let mut p = p.clone();
        let id_ok = !p.id.is_empty()
            && p.id.len() <= 64
            && p.id
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_');
        if !id_ok {
            errors.push(format!("{what}: id must be 1-64 of a-z, 0-9, '-' and '_'"));
        }
        if out.iter().any(|o| o.id == p.id) {
            errors.push(format!("{what}: id used twice"));
        }
        if let Some(var) = &p.client_secret_env {
            match env(var) {
                Some(s) if !s.is_empty() => p.client_secret = Some(s),
                _ => errors.push(format!("{what}: client_secret_env {var} is not set")),
            }
        }
        if p.client_secret.is_none() && p.client_secret_env.is_none() {
            errors.push(format!("{what}: needs client_secret or client_secret_env"));
        }
        if !PROVIDER_PRESETS.contains(&p.id.as_str()) {
            for (field, v) in [
                ("auth_url", &p.auth_url),
                ("token_url", &p.token_url),
                ("userinfo_url", &p.userinfo_url),
            ] {
                if v.is_none() {
                    errors.push(format!("{what}: {field} is required (not a preset)"));
                }
            }
        }
        for (field, v) in [
            ("auth_url", &p.auth_url),
            ("token_url", &p.token_url),
            ("userinfo_url", &p.userinfo_url),
        ] {
            if let Some(u) = v
                && !Url::parse(u).is_ok_and(|u| matches!(u.scheme(), "http" | "https"))
            {
                errors.push(format!("{what}: {field} {u:?} is not an http(s) URL"));
            }
        }
        if let Some(a) = &p.token_auth
            && !matches!(a.as_str(), "client_secret_basic" | "client_secret_post")
        {
            errors.push(format!(
                "{what}: token_auth must be client_secret_basic or client_secret_post"
            ));
        }
        out.push(p);
    }
    out
}

/// `3600`, `90s`, `30m`, `12h`, `7d` → a duration.
fn parse_duration(s: &str) -> Option<Duration> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num.parse().ok()?;
    let mult = match unit {
        "" | "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => return None,
    };
    Some(Duration::from_secs(n.checked_mul(mult)?))
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
    use super::*;

    fn env(vars: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> + use<> {
        let map: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k| map.get(k).cloned()
    }

    fn with(vars: &[(&str, &str)]) -> Result<Config, Vec<String>> {
        Config::from_lookup(env(vars))
    }

    #[test]
    fn defaults_are_the_specs() {
        let c = with(&[]).expect("defaults");
        assert_eq!(c.listen.to_string(), "127.0.0.1:3000");
        assert_eq!(c.main_host(), "localhost");
        assert_eq!(c.database_url, "sqlite://./webpods.db");
        assert_eq!(c.token_file, Some(PathBuf::from("./webpods.token")));
        assert_eq!(c.engine.max_record_bytes, 10 * 1024 * 1024);
        assert_eq!(c.engine.max_list_records, 1000);
        assert_eq!(c.live.max_subscriptions_per_connection, 100);
        assert_eq!(c.engine.live.max_recursive_streams, 256);
        assert!(c.rate_limits.enabled);
        assert_eq!(c.rate_limits.write, 1000);
        assert_eq!(c.store.statement_timeout, Some(Duration::from_secs(30)));
        assert!(c.providers.is_empty());
    }

    #[test]
    fn the_default_public_url_follows_the_listen_port() {
        let c = with(&[("WEBPODS_LISTEN", "127.0.0.1:18080")]).expect("config");
        assert_eq!(c.public_url.as_str(), "http://localhost:18080/");
        let c = with(&[("WEBPODS_LISTEN", "127.0.0.1:0")]).expect("config");
        assert_eq!(c.public_url.as_str(), "http://localhost:3000/");
        let c = with(&[
            ("WEBPODS_LISTEN", "127.0.0.1:18080"),
            ("WEBPODS_PUBLIC_URL", "https://pods.example.com"),
        ])
        .expect("config");
        assert_eq!(c.public_url.as_str(), "https://pods.example.com/");
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

    #[test]
    fn values_that_would_break_every_request_are_refused() {
        for (key, value, says) in [
            ("WEBPODS_MAX_RECORD_BYTES", "0", "must be at least 1"),
            ("WEBPODS_MAX_LIST_RECORDS", "0", "must be at least 1"),
            ("WEBPODS_DB_MAX_CONNECTIONS", "0", "must be at least 1"),
            ("WEBPODS_ROOT_POD", "Bad_Name", "is not a pod name"),
            (
                "WEBPODS_ALLOWED_RECORD_HEADERS",
                "x-ok, x a",
                "is not a header name",
            ),
        ] {
            let errs = with(&[(key, value)]).unwrap_err();
            assert_eq!(errs.len(), 1, "{key}: {errs:?}");
            assert!(
                errs[0].contains(key) && errs[0].contains(says),
                "{key}: {errs:?}"
            );
        }
        assert!(
            with(&[
                ("WEBPODS_MAX_LIST_RECORDS", "1"),
                ("WEBPODS_ROOT_POD", "www")
            ])
            .is_ok()
        );
    }

    #[test]
    fn the_file_is_read_and_variables_override_it() {
        let text = r#"
            [server]
            listen = "127.0.0.1:4000"
            public_url = "https://pods.example.com"
            allowed_record_headers = ["X-Source", "x-trace"]
            [database]
            url = "postgres://db/webpods"
            max_connections = 32
            statement_timeout_secs = 0
            [limits]
            max_record_bytes = 1024
            [rate_limits]
            enabled = false
        "#;
        let c = Config::from_toml_str(
            text,
            "webpods.toml",
            env(&[("WEBPODS_LISTEN", "127.0.0.1:5000")]),
        )
        .expect("config");
        assert_eq!(c.listen.to_string(), "127.0.0.1:5000", "the variable wins");
        assert_eq!(c.main_host(), "pods.example.com");
        assert_eq!(c.engine.allowed_record_headers, ["x-source", "x-trace"]);
        assert_eq!(c.database_url, "postgres://db/webpods");
        assert_eq!(c.store.max_connections, 32);
        assert_eq!(c.store.statement_timeout, None);
        assert_eq!(c.engine.max_record_bytes, 1024);
        assert!(!c.rate_limits.enabled);
        assert_eq!(c.token_file, None);
    }

    #[test]
    fn every_file_problem_is_reported_at_once() {
        let text = r#"
            colour = "blue"
            [server]
            listen = 3000
            lisen = "typo"
            [databse]
            url = "x"
            [limits]
            max_record_bytes = "ten"
            [log]
            format = "xml"
        "#;
        let errs =
            Config::from_toml_str(text, "webpods.toml", env(&[("WEBPODS_PUBLIC_URL", "nope")]))
                .unwrap_err();
        let all = errs.join("\n");
        for needle in [
            "`colour` must be a [section]",
            "server.listen: expected a string",
            "unknown key `lisen` in [server]",
            "unknown section [databse]",
            "limits.max_record_bytes: expected an integer",
            "webpods.toml: log.format (WEBPODS_LOG_FORMAT): expected text or json",
            "WEBPODS_PUBLIC_URL: \"nope\"",
        ] {
            assert!(all.contains(needle), "missing {needle:?} in:\n{all}");
        }
        assert_eq!(errs.len(), 7, "{all}");
    }

    #[test]
    fn unknown_variables_are_found() {
        let vars = [
            "WEBPODS_LISTEN",
            "WEBPODS_LSTEN",
            "WEBPODS_CONFIG",
            "WEBPODS_TEST_X",
            "PATH",
        ];
        assert_eq!(
            unknown_variables(vars.iter().map(|s| s.to_string())),
            ["WEBPODS_LSTEN"]
        );
    }

    #[test]
    fn debug_output_hides_secrets() {
        let c = with(&[
            ("WEBPODS_JWT_SECRET", "jwt-secret-value"),
            ("WEBPODS_DATABASE_URL", "postgres://u:db-password@h/db"),
        ])
        .expect("config");
        let shown = format!("{c:?}");
        assert!(!shown.contains("jwt-secret-value"), "{shown}");
        assert!(!shown.contains("db-password"), "{shown}");
        assert!(shown.contains("postgres://u:***@h/db"), "{shown}");
    }

    #[test]
    fn a_host_name_listen_address_resolves() {
        let c = with(&[("WEBPODS_LISTEN", "localhost:3312")]).expect("localhost resolves");
        assert!(c.listen.ip().is_loopback(), "{}", c.listen);
        assert_eq!(c.listen.port(), 3312);
        let errs = with(&[("WEBPODS_LISTEN", "localhost")]).unwrap_err();
        assert!(errs[0].contains("is not an address"), "{errs:?}");
    }

    #[test]
    fn a_websocket_idle_timeout_under_2_s_is_refused() {
        for bad in ["0", "1"] {
            let errs = with(&[("WEBPODS_WS_IDLE_TIMEOUT_SECS", bad)]).unwrap_err();
            assert!(errs[0].contains("must be at least 2 seconds"), "{errs:?}");
        }
        let c = with(&[("WEBPODS_WS_IDLE_TIMEOUT_SECS", "3")]).expect("config");
        assert_eq!(c.live.idle_timeout, Duration::from_secs(3));
    }

    #[test]
    fn a_bad_log_filter_is_refused() {
        let errs = with(&[("WEBPODS_LOG", "garbage===")]).unwrap_err();
        assert!(errs[0].starts_with("WEBPODS_LOG (log.filter)"), "{errs:?}");
        assert!(with(&[("WEBPODS_LOG", "info,sqlx=warn,webpods=trace")]).is_ok());
    }

    #[test]
    fn framing_headers_cannot_be_record_headers() {
        let errs = with(&[(
            "WEBPODS_ALLOWED_RECORD_HEADERS",
            "x-source, Content-Length,transfer-encoding,set-cookie,x-ratelimit-limit",
        )])
        .unwrap_err();
        let all = errs.join("\n");
        for h in [
            "content-length",
            "transfer-encoding",
            "set-cookie",
            "x-ratelimit-limit",
        ] {
            assert!(all.contains(&format!("{h:?} cannot")), "{all}");
        }
        assert_eq!(errs.len(), 4, "{all}");
    }

    #[test]
    fn a_toml_syntax_error_is_reported_with_its_place() {
        let errs = Config::from_toml_str("[server\nlisten = 1", "w.toml", env(&[])).unwrap_err();
        assert_eq!(errs.len(), 1);
        assert!(errs[0].starts_with("w.toml: "), "{errs:?}");
    }

    #[test]
    fn providers_are_checked_and_secrets_resolved() {
        let text = r#"
            [auth]
            jwt_secret = "s3cret-s3cret-s3cret"
            jwt_expiry = 43200
            [[auth.providers]]
            id = "github"
            client_id = "abc"
            client_secret_env = "GH_SECRET"
            [[auth.providers]]
            id = "corp"
            client_id = "webpods"
            client_secret = "x"
            auth_url = "https://idp.example/auth"
        "#;
        let errs = Config::from_toml_str(text, "f.toml", env(&[])).unwrap_err();
        let all = errs.join("\n");
        assert!(
            all.contains("client_secret_env GH_SECRET is not set"),
            "{all}"
        );
        assert!(all.contains("token_url is required"), "{all}");
        assert!(all.contains("userinfo_url is required"), "{all}");
        assert_eq!(errs.len(), 3, "{all}");

        let ok = text.replace(
            "auth_url = \"https://idp.example/auth\"",
            "auth_url = \"https://idp.example/auth\"\ntoken_url = \"https://idp.example/token\"\n\
             userinfo_url = \"https://idp.example/me\"",
        );
        let c = Config::from_toml_str(&ok, "f.toml", env(&[("GH_SECRET", "from-env")]))
            .expect("config");
        assert_eq!(c.providers.len(), 2);
        assert_eq!(c.providers[0].client_secret.as_deref(), Some("from-env"));
        assert_eq!(c.jwt_expiry, Some(Duration::from_secs(12 * 3600)));
        assert!(!format!("{:?}", c.providers[0]).contains("from-env"));
    }

    #[test]
    fn the_documented_example_is_valid_and_every_key_is_in_it() {
        let text = include_str!("../webpods.example.toml");
        let c = Config::from_toml_str(text, "webpods.example.toml", env(&[]))
            .unwrap_or_else(|e| panic!("{e:?}"));
        assert_eq!(c.listen.to_string(), "127.0.0.1:3000");
        // Every key appears in the example, commented out or not.
        for (section, key, var) in KEYS {
            assert!(
                text.contains(&format!("[{section}]")) && text.contains(&format!("{key} =")),
                "{section}.{key} is not documented in webpods.example.toml"
            );
            assert!(
                text.contains(var),
                "{var} is not named in webpods.example.toml"
            );
        }
    }
}
