//! `webpods` — serve, migrate, or issue a token (SPEC §10).

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use webpods::config::Config;
use webpods::startup::{self, Server};
use webpods_engine::{Engine, Scope};

/// glibc's allocator spent a fifth of the server's CPU under load (malloc, free and
/// consolidation, measured with `perf`); mimalloc's per-thread free lists avoid most of it.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "webpods",
    version,
    about = "An append-only, hash-chained log service"
)]
struct Cli {
    /// Configuration file (TOML; see webpods.example.toml). Variables override its keys.
    #[arg(long, global = true, env = "WEBPODS_CONFIG", value_name = "FILE")]
    config: Option<std::path::PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the server (the default).
    Serve,
    /// Apply database migrations and exit.
    Migrate,
    /// Token operations.
    Token {
        #[command(subcommand)]
        command: TokenCommand,
    },
}

#[derive(Subcommand)]
enum TokenCommand {
    /// Print a token for a local user (created if missing).
    Issue {
        user: String,
        /// Limit the token to these pods (comma-separated).
        #[arg(long, value_delimiter = ',')]
        pods: Option<Vec<String>>,
        /// read, write or read,write.
        #[arg(long)]
        scope: Option<String>,
        /// Lifetime, e.g. 30m, 1h, 7d.
        #[arg(long)]
        expires: Option<String>,
    },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let config = match Config::load(cli.config.as_deref()) {
        Ok(c) => c,
        Err(errors) => {
            for e in &errors {
                eprintln!("config error: {e}");
            }
            bail!("{} configuration problem(s)", errors.len());
        }
    };
    webpods::telemetry::init(&config.log, config.log_format);
    for var in webpods::config::unknown_variables(
        std::env::vars_os().filter_map(|(k, _)| k.into_string().ok()),
    ) {
        tracing::warn!(variable = %var, "ignoring an unknown WEBPODS_* variable (a typo?)");
    }
    match cli.command.unwrap_or(Command::Serve) {
        Command::Serve => serve(config).await,
        Command::Migrate => {
            startup::open_store(&config).await?;
            eprintln!("migrations applied");
            Ok(())
        }
        Command::Token {
            command:
                TokenCommand::Issue {
                    user,
                    pods,
                    scope,
                    expires,
                },
        } => {
            let scope = match scope.as_deref() {
                None => Scope::ALL,
                Some(s) => Scope::parse(s).context("--scope must be read, write or read,write")?,
            };
            let expires = expires.as_deref().map(parse_duration).transpose()?;
            let store = startup::open_store(&config).await?;
            let keys = startup::token_keys(&config, &store).await?;
            let engine = Engine::new(store.clone(), config.engine.clone(), keys);
            let user_id = engine.ensure_local_user(&user).await?;
            println!("{}", engine.issue_token(&user_id, pods, scope, expires)?);
            store.close().await;
            Ok(())
        }
    }
}

async fn serve(config: Config) -> anyhow::Result<()> {
    let public_url = config.public_url.clone();
    let token_file = config.token_file.clone();
    // Bound first: a port in use fails at once, and while the database connects and migrations
    // run, probes get /live 200 and /ready 503 instead of a refused connection.
    startup::preflight(&config)?;
    let listener = startup::bind(&config)?;
    let (starting, early) = startup::serve_while_starting(&listener)?;
    tracing::info!(
        address = %listener.local_addr()?,
        "bound; /ready answers 503 until the database is connected and migrated"
    );
    // A signal while the database is awaited stops the start: nothing is in flight yet.
    let mut signal = Box::pin(startup::shutdown_signal());
    let built = tokio::select! {
        built = Server::build_on(config, listener) => built,
        () = &mut signal => {
            tracing::info!("shutdown signal while starting: exiting");
            drop(starting);
            let _ = tokio::time::timeout(std::time::Duration::from_secs(5), early).await;
            return Ok(());
        }
    };
    drop(starting);
    // The requests it took finish (a probe is quick); a client that hangs is not waited for.
    let _ = tokio::time::timeout(std::time::Duration::from_secs(5), early).await;
    let server = built?;
    let addr = server.local_addr()?;
    println!("webpods listening on http://{addr} (public URL {public_url})");
    if let Some(token) = &server.local_token {
        println!(
            "local mode: token of user `{}`:\n{token}",
            startup::LOCAL_USER
        );
        if let Some(f) = token_file {
            println!("(also written to {})", f.display());
        }
    }
    server.run(signal).await
}

/// `90`, `90s`, `30m`, `1h`, `7d` → seconds.
fn parse_duration(s: &str) -> anyhow::Result<i64> {
    Ok(webpods_engine::parse_expiry(s)?)
}
