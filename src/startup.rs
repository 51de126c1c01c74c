//! Building and running the server: config → storage → engine → routers → listener.
//! Tests use the same [`Server`] on `127.0.0.1:0`.

use std::future::Future;
use std::net::SocketAddr;

use anyhow::{Context, bail};
use axum::Router;
use tokio::net::TcpListener;
use webpods_api_rest::{AppState, MainHost, RestConfig};
use webpods_engine::{Engine, Scope, TokenKeys};
use webpods_storage::Store;

use crate::config::Config;

/// Settings key of the generated local-mode secret.
const SECRET_KEY: &str = "jwt_secret";
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

/// Connects to the database and applies migrations.
pub async fn open_store(config: &Config) -> anyhow::Result<Store> {
    let store = Store::connect(&config.database_url, &config.store)
        .await
        .context("connecting to the database")?;
    store.migrate().await.context("applying migrations")?;
    Ok(store)
}

/// The signing secret: configured, or (local mode) generated once and kept in the database.
pub async fn token_keys(config: &Config, store: &Store) -> anyhow::Result<TokenKeys> {
    let secret = match &config.jwt_secret {
        Some(s) => s.clone(),
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

impl Server {
    /// Binds the listener and builds everything; nothing is served until [`Server::run`].
    pub async fn build(config: Config) -> anyhow::Result<Server> {
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
        let store = open_store(&config).await?;
        let keys = token_keys(&config, &store).await?;
        let engine = Engine::new(store.clone(), config.engine.clone(), keys);
        engine
            .listen_for_changes()
            .await
            .context("listening for other instances' changes")?;
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
        let graphql = webpods_api_graphql::router(
            engine.clone(),
            webpods_api_graphql::GraphqlConfig::new(
                MainHost(config.main_host()),
                config.engine.max_record_bytes,
            ),
        );
        let router = webpods_api_rest::app(state.clone(), graphql).layer(
            axum::middleware::from_fn(webpods_api_rest::request_id_layer),
        );
        let listener = TcpListener::bind(config.listen)
            .await
            .with_context(|| format!("binding {}", config.listen))?;
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

    /// Serves until `shutdown` resolves, then drains: `/ready` turns 503, in-flight requests
    /// finish, every queued append is committed, and the pool is closed — within the
    /// configured deadline.
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
        let app = router.into_make_service_with_connect_info::<SocketAddr>();
        let serve = axum::serve(listener, app).with_graceful_shutdown(async move {
            shutdown.await;
            draining.set_ready(false);
            tracing::info!("shutting down: draining requests and pending appends");
        });
        serve.await.context("serving HTTP")?;
        let drain = async {
            engine.shutdown().await;
            store.close().await;
        };
        if tokio::time::timeout(config.shutdown_timeout, drain)
            .await
            .is_err()
        {
            tracing::warn!("shutdown deadline passed before every append was flushed");
        }
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
