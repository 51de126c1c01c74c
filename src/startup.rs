//! Building and running the server: config → storage → engine → routers → listener.
//! Tests use the same [`Server`] on `127.0.0.1:0`.

use std::future::{Future, IntoFuture};
use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context, bail};
use axum::Router;
use axum::serve::ListenerExt;
use tokio::net::TcpListener;
use tokio::sync::{oneshot, watch};
use tokio::time::Instant;
use webpods_api_rest::{AppState, MainHost, RestConfig};
use webpods_api_ws::LiveState;
use webpods_engine::{CLOSE_GRACE, Engine, Scope, TokenKeys};
use webpods_storage::Store;

use crate::config::Config;

/// Settings key of the generated local-mode secret.
const SECRET_KEY: &str = "jwt_secret";
/// Below this, an HS256 secret can be guessed.
const MIN_SECRET_BYTES: usize = 32;
/// The user local mode creates.
pub const LOCAL_USER: &str = "local";

/// A server bound to its listener, ready to run.
pub struct Server {
    listener: TcpListener,
    router: Router,
    state: AppState,
    engine: Engine,
    store: Store,
    config: Config,
    /// The `local` user's token when running in local mode.
    pub local_token: Option<String>,
}

/// Connects to the database and applies migrations. An unreachable database is retried with
/// exponential backoff (each attempt logged) for up to `database.connect_retry_secs`, so that
/// a server and its database can start in any order; other errors fail at once.
pub async fn open_store(config: &Config) -> anyhow::Result<Store> {
    let give_up = Instant::now() + config.connect_retry;
    let mut backoff = Duration::from_millis(200);
    let mut attempt = 1u32;
    let store = loop {
        let e = match Store::connect(&config.database_url, &config.store).await {
            Ok(store) => break store,
            Err(e) => e,
        };
        // The last wait ends at the deadline, where one more attempt is made: giving up as
        // soon as the next full backoff step would pass it stopped up to 5 s early.
        let left = give_up.saturating_duration_since(Instant::now());
        if e.kind() != webpods_storage::ErrorKind::Unavailable || left.is_zero() {
            return Err(e)
                .with_context(|| format!("connecting to the database (attempt {attempt})"));
        }
        let delay = backoff.min(left);
        tracing::warn!(
            attempt,
            error = %e,
            retry_in_ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX),
            "database unreachable; retrying"
        );
        tokio::time::sleep(delay).await;
        backoff = (backoff * 2).min(Duration::from_secs(5));
        attempt += 1;
    };
    store.migrate().await.context("applying migrations")?;
    Ok(store)
}

/// The signing secret: configured, or (local mode) generated once and kept in the database.
pub async fn token_keys(config: &Config, store: &Store) -> anyhow::Result<TokenKeys> {
    let secret = match &config.jwt_secret {
        Some(s) => {
            if s.len() < MIN_SECRET_BYTES {
                // Refusing would break configurations that work; the operator must hear it.
                tracing::warn!(
                    bytes = s.len(),
                    "auth.jwt_secret is shorter than {MIN_SECRET_BYTES} bytes: tokens signed \
                     with it can be forged by guessing it (use e.g. `openssl rand -hex 32`)"
                );
            }
            s.clone()
        }
        None => {
            let fresh = format!(
                "{}{}",
                uuid::Uuid::new_v4().simple(),
                uuid::Uuid::new_v4().simple()
            );
            store.put_setting_if_absent(SECRET_KEY, &fresh).await?
        }
    };
    Ok(TokenKeys::new(secret.as_bytes()))
}

/// The checks that need nothing but the configuration, made before anything is bound or
/// opened.
pub fn preflight(config: &Config) -> anyhow::Result<()> {
    let local_mode = config.engine.auth.providers.is_empty();
    if local_mode && !config.listen.ip().is_loopback() {
        bail!(
            "local mode (no login provider configured) only listens on a loopback address, \
             not {}",
            config.listen
        );
    }
    if !local_mode && config.jwt_secret.is_none() {
        bail!("WEBPODS_JWT_SECRET is required when login providers are configured");
    }
    Ok(())
}

/// Binds the listen address (first, so that a port in use fails before anything else).
pub fn bind(config: &Config) -> anyhow::Result<std::net::TcpListener> {
    let listener = std::net::TcpListener::bind(config.listen)
        .with_context(|| format!("binding {}", config.listen))?;
    listener.set_nonblocking(true)?;
    Ok(listener)
}

/// Answers on `listener` with [`webpods_api_rest::starting_router`] until the returned sender
/// is dropped or fired (then finishes the requests it took and stops); the listener itself
/// stays open for the real server.
pub fn serve_while_starting(
    listener: &std::net::TcpListener,
) -> anyhow::Result<(oneshot::Sender<()>, tokio::task::JoinHandle<()>)> {
    let early = TcpListener::from_std(listener.try_clone()?)?;
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        let serve = axum::serve(early, webpods_api_rest::starting_router()).with_graceful_shutdown(
            async move {
                let _ = stopped.await;
            },
        );
        if let Err(e) = serve.await {
            tracing::warn!(error = %e, "serving while starting");
        }
    });
    Ok((stop, task))
}

impl Server {
    /// Binds `config.listen` and builds everything (the database connected, migrations
    /// applied); nothing is served until [`Server::run`].
    pub async fn build(config: Config) -> anyhow::Result<Server> {
        preflight(&config)?;
        let listener = bind(&config)?;
        Server::build_on(config, listener).await
    }

    /// [`Server::build`] on a listener bound already (after [`preflight`]).
    pub async fn build_on(
        config: Config,
        listener: std::net::TcpListener,
    ) -> anyhow::Result<Server> {
        let local_mode = config.engine.auth.providers.is_empty();
        let store = open_store(&config).await?;
        let keys = token_keys(&config, &store).await?;
        let engine = Engine::new(store.clone(), config.engine.clone(), keys);
        // Other instances' notices: live tails and cache invalidations (PostgreSQL).
        engine.start_live();
        let local_token = if local_mode {
            let user = engine.ensure_local_user(LOCAL_USER).await?;
            let token = engine.issue_token(&user, None, Scope::ALL, None)?;
            if let Some(path) = &config.token_file {
                write_token_file(path, &token)?;
            }
            Some(token)
        } else {
            None
        };
        let state = AppState::new(
            engine.clone(),
            RestConfig {
                main_host: MainHost(config.main_host()),
                max_body_bytes: config.engine.max_record_bytes,
                max_batch_bytes: config.max_batch_bytes,
                root_pod: config.root_pod.clone(),
            },
        );
        let live = LiveState::new(engine.clone(), config.live.clone());
        engine.start_live();
        let graphql = webpods_api_graphql::router(
            engine.clone(),
            webpods_api_graphql::GraphqlConfig {
                max_subscriptions_per_connection: config.live.max_subscriptions_per_connection,
                ..webpods_api_graphql::GraphqlConfig::new(config.engine.max_record_bytes)
            },
        );
        let router = webpods_api_rest::app_with_live(
            state.clone(),
            graphql.merge(webpods_api_ws::main_router(live.clone())),
            Some(webpods_api_ws::pod_router(live.clone())),
        )
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            webpods_api_rest::request_id_layer,
        ));
        let listener = TcpListener::from_std(listener)?;
        Ok(Server {
            listener,
            router,
            state,
            engine,
            store,
            config,
            local_token,
        })
    }

    /// The engine this server runs (tests use it to create users and inspect actors).
    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    pub fn local_addr(&self) -> anyhow::Result<SocketAddr> {
        Ok(self.listener.local_addr()?)
    }

    /// Serves until `shutdown` resolves, then drains (DESIGN §8): `/ready` turns 503, (after
    /// the optional `server.drain_delay_secs`, still serving) the listener stops accepting,
    /// [`Engine::draining`] watchers are told, in-flight requests finish (every append they
    /// queued is committed and answered), live tails deliver what was committed and close
    /// (WebSocket close 1001; SSE responses end), the stream actors stop, and the pool is
    /// closed. `server.shutdown_timeout_secs`, counted
    /// from the signal, bounds all of it; past it the remaining connections are dropped and
    /// `run` fails (the process exits non-zero). Whatever happens, nothing acknowledged is lost:
    /// a receipt is only ever sent after its commit.
    pub async fn run(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<()> {
        let Server {
            listener,
            router,
            state,
            engine,
            store,
            config,
            ..
        } = self;
        state.set_ready(true);
        let draining = state.clone();
        let draining_engine = engine.clone();
        let grace = config.shutdown_timeout;
        let delay = config.drain_delay;
        let (deadline_tx, mut deadline_rx) = watch::channel(None::<Instant>);
        let tails = engine.clone();
        let in_flight = state.in_flight.clone();
        let handlers = state.in_flight.clone();
        let (tails_closed_tx, tails_closed_rx) = oneshot::channel::<Instant>();
        let app = router.into_make_service_with_connect_info::<SocketAddr>();
        // Without TCP_NODELAY, a response written in two segments waits for the client's
        // delayed ACK (~40 ms on Linux): every request would take that long.
        let listener = listener.tap_io(|tcp| {
            if let Err(e) = tcp.set_nodelay(true) {
                tracing::debug!(error = %e, "could not set TCP_NODELAY");
            }
        });
        let serve = axum::serve(listener, app).with_graceful_shutdown(async move {
            shutdown.await;
            draining.set_ready(false);
            let _ = deadline_tx.send(Some(Instant::now() + grace));
            if !delay.is_zero() {
                // Keep serving while load balancers notice `/ready` is 503.
                tracing::info!(
                    delay_secs = delay.as_secs(),
                    "shutdown signal: /ready is 503; still serving during the drain delay"
                );
                tokio::time::sleep(delay).await;
            }
            draining_engine.start_draining();
            // Tails are endless responses: they must end for the drain to finish. They end
            // once every in-flight request was answered, so that each record acknowledged
            // before the shutdown reaches them first (SPEC §10: flush, then close tails).
            tokio::spawn(async move {
                // A request that never finishes must not keep the tails open to the deadline.
                let _ = tokio::time::timeout(grace / 2, in_flight.until_idle()).await;
                tails.close_live();
                let _ = tails_closed_tx.send(Instant::now());
            });
            tracing::info!(
                timeout_secs = grace.as_secs(),
                "shutting down: draining requests and pending appends"
            );
        });
        let deadline_passed = async {
            let deadline = loop {
                if let Some(d) = *deadline_rx.borrow_and_update() {
                    break d;
                }
                if deadline_rx.changed().await.is_err() {
                    // The server stopped without a signal; `serve` below finishes.
                    std::future::pending::<()>().await;
                }
            };
            tokio::time::sleep_until(deadline).await;
        };
        // Once the tails were told to close, an SSE response whose client stopped reading can
        // hold its connection open (its bytes wait in the socket): after the grace such
        // connections are left behind, like WebSocket tails, once no handler runs.
        let tails_left = async {
            match tails_closed_rx.await {
                Ok(at) => {
                    tokio::time::sleep_until(at + CLOSE_GRACE).await;
                    handlers.until_idle().await;
                }
                Err(_) => std::future::pending::<()>().await,
            }
        };
        let http_drained = tokio::select! {
            served = serve.into_future() => {
                served.context("serving HTTP")?;
                true
            }
            () = tails_left => {
                tracing::info!("dropping live-tail connections that did not close in time");
                true
            }
            () = deadline_passed => false,
        };
        let deadline = (*deadline_rx.borrow()).unwrap_or_else(|| Instant::now() + grace);
        let drain = async {
            engine.shutdown().await;
            // WebSocket tails close within the grace; a client that does not read is dropped.
            if tokio::time::timeout(CLOSE_GRACE, engine.live_connections_closed())
                .await
                .is_err()
            {
                tracing::info!(
                    sockets = engine.live_connections(),
                    "dropping WebSocket connections that did not close in time"
                );
            }
            store.close().await;
        };
        let flushed = tokio::time::timeout_at(deadline, drain).await.is_ok();
        if !http_drained || !flushed {
            bail!(
                "the shutdown deadline ({}s) passed before {}",
                grace.as_secs(),
                if http_drained {
                    "every queued append was flushed"
                } else {
                    "every in-flight request finished"
                }
            );
        }
        tracing::info!("shutdown complete");
        Ok(())
    }
}

fn write_token_file(path: &std::path::Path, token: &str) -> anyhow::Result<()> {
    std::fs::write(path, format!("{token}\n"))
        .with_context(|| format!("writing the local token to {}", path.display()))?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    }
    Ok(())
}

/// Resolves on SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = term => {},
    }
}
