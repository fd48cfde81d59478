//! `pg-session`: administration of the session table from the command line.
//!
//! ```not_rust
//! DATABASE_URL=postgres://… pg-session init
//! pg-session stats
//! pg-session prune
//! pg-session sessions --user alice
//! pg-session revoke --user alice      # or --all
//! pg-session export --user alice      # JSON, no secrets
//! ```

use std::{process::ExitCode, time::Duration};

use clap::{Args, Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use tower_pg_session::{
    store::{PgConnect, PruneOutcome},
    PgStore, PgStoreConfig, PruneConfig, StoreError,
};

/// Administration of tower-pg-session's session table.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    /// Database URL: `postgres://user@host[:port][,host2[:port]…]/db?sslmode=verify-full&sslrootcert=ca.pem`
    /// (or libpq's `host=a,b dbname=db …`); with several hosts, the writable one is used.
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    database_url: String,
    /// Schema of the table (default: the search path).
    #[arg(long, global = true)]
    schema: Option<String>,
    /// Table name.
    #[arg(long, global = true, default_value = "session")]
    table: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Create the table, or upgrade an existing one (idempotent).
    Init,
    /// Active, recent and expired session counts, and the table's size.
    Stats,
    /// Delete expired sessions in batches.
    Prune {
        /// Rows per statement.
        #[arg(long, default_value_t = 250)]
        batch: u32,
        /// Share of the time spent in statements, between 0.01 and 1 (1: no
        /// pause between batches).
        #[arg(long, default_value_t = 0.25)]
        busy: f64,
    },
    /// List a user's sessions.
    Sessions(UserArg),
    /// End sessions: a user's, or every one.
    Revoke(RevokeArgs),
    /// A user's session metadata as JSON (no ids, data or tokens).
    Export(UserArg),
}

#[derive(Args)]
struct UserArg {
    /// The user id (the `user_id` column; the OIDC subject).
    #[arg(long)]
    user: String,
}

#[derive(Args)]
#[group(required = true, multiple = false)]
struct RevokeArgs {
    /// End every session of this user.
    #[arg(long)]
    user: Option<String>,
    /// End every session of every user.
    #[arg(long)]
    all: bool,
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    match run(cli).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprint!("error: {e}");
            let mut source = std::error::Error::source(&e);
            while let Some(s) = source {
                eprint!(": {s}");
                source = s.source();
            }
            eprintln!();
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> Result<(), StoreError> {
    let mut config = PgStoreConfig::new().with_table_name(&cli.table)?;
    if let Some(schema) = &cli.schema {
        config = config.with_schema_name(schema)?;
    }
    // Only `init` may change the schema; every other command needs the table.
    let init = matches!(cli.command, Command::Init);
    // Hosts, TLS (`sslmode`, `sslrootcert`) and `target_session_attrs` as in libpq.
    let connect = PgConnect::from_url(&cli.database_url)?
        .with_max_connections(2)
        .with_acquire_timeout(Duration::from_secs(5));
    let store = PgStore::connect_to(connect, config.with_create_table(init)).await?;
    let admin = store.admin();
    match cli.command {
        Command::Init => println!("table {} is ready", store.table_name()),
        Command::Stats => {
            let s = admin.stats().await?;
            println!("active sessions        {}", s.active);
            println!("created in last 24 h   {}", s.created_last_24h);
            println!("expired, not pruned    {}", s.expired_awaiting_prune);
            println!("table size             {} bytes", s.table_bytes);
        }
        Command::Prune { batch, busy } => {
            let config = PruneConfig::new()
                .with_batch_size(batch)
                .with_busy_fraction(busy);
            let expired = admin.stats().await?.expired_awaiting_prune;
            let bar = ProgressBar::new(expired.max(0) as u64);
            bar.set_style(
                ProgressStyle::with_template(
                    "{bar:40} {pos}/{len} expired sessions deleted ({elapsed})",
                )
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
            );
            match store.prune_expired_with(&config, |n| bar.inc(n)).await? {
                PruneOutcome::Skipped => {
                    bar.abandon();
                    println!("another instance is pruning right now; nothing done");
                }
                outcome => {
                    bar.finish_and_clear();
                    let total = match outcome {
                        PruneOutcome::Pruned(n) => n,
                        _ => bar.position(),
                    };
                    println!("deleted {total} expired sessions");
                }
            }
        }
        Command::Sessions(u) => {
            let list = admin.user_sessions(&u.user).await?;
            println!(
                "{:<17} {:<26} {:<26} {:<26} {:<16} user agent",
                "handle", "created", "last seen", "expires", "ip"
            );
            let fmt = |t: Option<time::OffsetDateTime>| {
                t.and_then(|t| {
                    t.format(&time::format_description::well_known::Rfc3339)
                        .ok()
                })
                .unwrap_or_else(|| "-".into())
            };
            for s in &list {
                println!(
                    "{:<17} {:<26} {:<26} {:<26} {:<16} {}",
                    s.handle,
                    fmt(s.created_at),
                    fmt(s.last_seen),
                    fmt(Some(s.expires_at)),
                    s.ip.as_deref().unwrap_or("-"),
                    s.user_agent.as_deref().unwrap_or("-")
                );
            }
            println!("{} live sessions of {}", list.len(), u.user);
        }
        Command::Revoke(r) => {
            let n = match (r.user, r.all) {
                (Some(user), _) => admin.revoke_user(&user).await?,
                (None, _) => admin.revoke_all().await?,
            };
            println!("revoked {n} sessions");
        }
        Command::Export(u) => {
            let json = admin.export_user(&u.user).await?;
            println!(
                "{}",
                serde_json::to_string_pretty(&json).unwrap_or_default()
            );
        }
    }
    Ok(())
}
