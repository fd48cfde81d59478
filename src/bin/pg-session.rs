//! `pg-session`: administration of the session table from the command line.
//!
//! ```not_rust
//! DATABASE_URL=postgres://… pg-session init
//! pg-session stats
//! pg-session prune
//! pg-session sessions --user alice
//! pg-session revoke --user alice      # or --all
//! pg-session export --user alice      # JSON, no secrets
//! pg-session --pooler transaction stats   # through PgBouncer in transaction mode
//! TOKEN_KEYS=new,old pg-session keys   # stored tokens per key id (token vault)
//! TOKEN_KEYS=new,old pg-session reseal # seal them all under the first key
//! ```

use std::{process::ExitCode, time::Duration};

use clap::{Args, Parser, Subcommand, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};
use tower_pg_session::{
    store::{PgConnect, PruneOutcome},
    PgStore, PgStoreConfig, Pooler, PruneConfig,
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
    /// How the URL reaches Postgres: `transaction` for a pooler in
    /// transaction mode (PgBouncer, RDS Proxy, Supavisor).
    #[arg(long, global = true, env = "DB_POOLER", value_enum, default_value_t = PoolerArg::Direct)]
    pooler: PoolerArg,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum PoolerArg {
    /// Straight to Postgres, or a pooler in session mode.
    Direct,
    /// A pooler in transaction mode.
    Transaction,
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
    /// How many tokens in the token vault each key id seals.
    #[cfg(feature = "oidc")]
    Keys(VaultArgs),
    /// Seal every token in the token vault again under the first key of
    /// TOKEN_KEYS, in batches, while the app runs; resumable.
    #[cfg(feature = "oidc")]
    Reseal {
        #[command(flatten)]
        vault: VaultArgs,
        /// Rows per transaction.
        #[arg(long, default_value_t = 500)]
        batch: usize,
    },
}

#[cfg(feature = "oidc")]
#[derive(Args)]
struct VaultArgs {
    /// The token keys, comma-separated base64: the first seals, all open.
    #[arg(long, env = "TOKEN_KEYS", hide_env_values = true)]
    token_keys: String,
    /// The token vault's table (in --schema).
    #[arg(long, default_value = "oauth_tokens")]
    vault_table: String,
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
            let mut source = e.source();
            while let Some(s) = source {
                eprint!(": {s}");
                source = s.source();
            }
            eprintln!();
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> Result<(), Box<dyn std::error::Error>> {
    let pooler = match cli.pooler {
        PoolerArg::Direct => Pooler::Direct,
        PoolerArg::Transaction => Pooler::Transaction,
    };
    let mut config = PgStoreConfig::new()
        .with_table_name(&cli.table)?
        .with_pooler(pooler);
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
        #[cfg(feature = "oidc")]
        Command::Keys(v) => vault::keys(&store, cli.schema.as_deref(), &v).await?,
        #[cfg(feature = "oidc")]
        Command::Reseal { vault: v, batch } => {
            vault::reseal(&store, cli.schema.as_deref(), &v, batch).await?;
        }
    }
    Ok(())
}

#[cfg(feature = "oidc")]
mod vault {
    use indicatif::{ProgressBar, ProgressStyle};
    use tower_pg_session::{
        crypto::Keyring,
        vault::{TokenVault, VaultConfig},
        PgStore,
    };

    use super::VaultArgs;

    async fn open(
        store: &PgStore,
        schema: Option<&str>,
        args: &VaultArgs,
    ) -> Result<(TokenVault, Keyring), Box<dyn std::error::Error>> {
        let keys = Keyring::from_base64_list(&args.token_keys)?;
        let mut config = VaultConfig::new().with_table_name(&args.vault_table)?;
        if let Some(schema) = schema {
            config = config.with_schema_name(schema)?;
        }
        Ok((TokenVault::new(store, keys.clone(), config).await?, keys))
    }

    /// One line per key id: how many tokens it seals, and whether the
    /// keyring seals with it, still opens with it, or no longer has it.
    pub(super) async fn keys(
        store: &PgStore,
        schema: Option<&str>,
        args: &VaultArgs,
    ) -> Result<(), Box<dyn std::error::Error>> {
        let (vault, keys) = open(store, schema, args).await?;
        let current = keys.current_key_id().to_string();
        let known: Vec<String> = keys.key_ids().map(|k| k.to_string()).collect();
        println!("{:<10} {:>10}  status", "key id", "tokens");
        let usage = vault.key_usage().await?;
        for u in &usage {
            let status = if u.key_id == current {
                "seals (first key)"
            } else if known.contains(&u.key_id) {
                "opens only: run `pg-session reseal`"
            } else {
                "NOT in TOKEN_KEYS: these tokens do not open"
            };
            println!("{:<10} {:>10}  {status}", u.key_id, u.values);
        }
        for id in known
            .iter()
            .filter(|k| !usage.iter().any(|u| &u.key_id == *k))
        {
            println!("{id:<10} {:>10}  unused: can be removed from TOKEN_KEYS", 0);
        }
        Ok(())
    }

    pub(super) async fn reseal(
        store: &PgStore,
        schema: Option<&str>,
        args: &VaultArgs,
        batch: usize,
    ) -> Result<(), Box<dyn std::error::Error>> {
        let (vault, _) = open(store, schema, args).await?;
        let bar = ProgressBar::new_spinner();
        bar.set_style(
            ProgressStyle::with_template("{spinner} {pos} rows sealed again ({elapsed})")
                .unwrap_or_else(|_| ProgressStyle::default_spinner()),
        );
        let outcome = vault.reseal_with(batch, |n| bar.inc(n)).await?;
        bar.finish_and_clear();
        println!(
            "sealed {} rows under the first key; {} rows did not open and were left as they were",
            outcome.resealed, outcome.unreadable
        );
        Ok(())
    }
}
