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
//! TOKEN_KEYS=new,old pg-session keys   # sealed values per key id (vault and sessions)
//! TOKEN_KEYS=new,old pg-session reseal # seal them all under the first key
//! TOKEN_KEYS=key pg-session import --from oauth_connections --integration mail --dry-run
//! ```

use std::{process::ExitCode, time::Duration};

use clap::{Args, Parser, Subcommand, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};
use tower_pg_session::{
    admin::Admin,
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
    /// How many sealed values each key id seals, in the token vault and in
    /// live sessions (login records, pending logins and pending account
    /// connections).
    #[cfg(feature = "oidc")]
    Keys(VaultArgs),
    /// Seal every token in the token vault, and every login record and
    /// pending login or account connection in the sessions, again under the
    /// first key of TOKEN_KEYS, in batches, while the app runs; resumable
    /// (run it again after an interruption). Counts the rows first, then
    /// shows a progress bar (a line per batch when stdout is no terminal).
    #[cfg(feature = "oidc")]
    Reseal {
        #[command(flatten)]
        vault: VaultArgs,
        /// Rows per transaction.
        #[arg(long, default_value_t = 500)]
        batch: usize,
    },
    /// Seal and store the tokens an application kept in the clear in a
    /// table of its own (which is left as it is).
    #[cfg(feature = "oidc")]
    Import(ImportArgs),
}

#[cfg(feature = "oidc")]
#[derive(Args)]
struct ImportArgs {
    #[command(flatten)]
    vault: VaultArgs,
    /// The table holding the plaintext tokens.
    #[arg(long)]
    from: String,
    /// Its schema (default: the search path).
    #[arg(long)]
    from_schema: Option<String>,
    /// The integrations the application configures; rows of others are skipped.
    #[arg(long = "integration", required = true)]
    integrations: Vec<String>,
    /// Column of the user id.
    #[arg(long, default_value = "user_id")]
    user_column: String,
    /// Column of the integration name.
    #[arg(long, default_value = "integration")]
    integration_column: String,
    /// Column of the access token.
    #[arg(long, default_value = "access_token")]
    access_column: String,
    /// Column of the refresh token; `-` when there is none.
    #[arg(long, default_value = "refresh_token")]
    refresh_column: String,
    /// Column of the access token's expiry (a timestamp); `-` when there is none.
    #[arg(long, default_value = "expires_at")]
    expires_column: String,
    /// Check and count only; write nothing.
    #[arg(long)]
    dry_run: bool,
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
    /// The token vault's table (in --schema), whose connected accounts are
    /// shown too when it exists.
    #[cfg(feature = "oidc")]
    #[arg(long, default_value = "oauth_tokens")]
    vault_table: String,
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
    let store = open_store(&cli).await?;
    let admin = store.admin();
    #[cfg(feature = "oidc")]
    let admin = match &cli.command {
        Command::Sessions(u) | Command::Export(u) => {
            vault::with_vault(&store, admin, cli.schema.as_deref(), &u.vault_table).await?
        }
        _ => admin,
    };
    match cli.command {
        Command::Init => println!("table {} is ready", store.table_name()),
        Command::Stats => {
            let s = admin.stats().await?;
            println!("active sessions        {}", s.active);
            println!("created in last 24 h   {}", s.created_last_24h);
            println!("expired, not pruned    {}", s.expired_awaiting_prune);
            println!("table size             {} bytes", s.table_bytes);
        }
        Command::Prune { batch, busy } => prune(&store, &admin, batch, busy).await?,
        Command::Sessions(u) => print_sessions(&admin, &u.user).await?,
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
        #[cfg(feature = "oidc")]
        Command::Import(args) => vault::import(&store, cli.schema.as_deref(), &args).await?,
    }
    Ok(())
}

/// The store the command line names. Only `init` may change the schema;
/// every other command needs the table to exist.
async fn open_store(cli: &Cli) -> Result<PgStore, Box<dyn std::error::Error>> {
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
    let init = matches!(cli.command, Command::Init);
    // Hosts, TLS (`sslmode`, `sslrootcert`) and `target_session_attrs` as in libpq.
    let connect = PgConnect::from_url(&cli.database_url)?
        .with_max_connections(2)
        .with_acquire_timeout(Duration::from_secs(5));
    Ok(PgStore::connect_to(connect, config.with_create_table(init)).await?)
}

/// Deletes the expired sessions in batches, with a progress bar.
async fn prune(
    store: &PgStore,
    admin: &Admin,
    batch: u32,
    busy: f64,
) -> Result<(), Box<dyn std::error::Error>> {
    let config = PruneConfig::new()
        .with_batch_size(batch)
        .with_busy_fraction(busy);
    let expired = admin.stats().await?.expired_awaiting_prune;
    let bar = ProgressBar::new(expired.max(0) as u64);
    bar.set_style(
        ProgressStyle::with_template("{bar:40} {pos}/{len} expired sessions deleted ({elapsed})")
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
    Ok(())
}

/// A user's live sessions (and with the vault, connected accounts).
async fn print_sessions(admin: &Admin, user: &str) -> Result<(), Box<dyn std::error::Error>> {
    let list = admin.user_sessions(user).await?;
    println!(
        "{:<17} {:<26} {:<26} {:<26} {:<16} user agent",
        "handle", "created", "last seen", "expires", "ip"
    );
    for s in &list {
        println!(
            "{:<17} {:<26} {:<26} {:<26} {:<16} {}",
            s.handle,
            rfc3339(s.created_at),
            rfc3339(s.last_seen),
            rfc3339(Some(s.expires_at)),
            s.ip.as_deref().unwrap_or("-"),
            s.user_agent.as_deref().unwrap_or("-")
        );
    }
    println!("{} live sessions of {user}", list.len());
    #[cfg(feature = "oidc")]
    vault::print_connections(&admin.user_connections(user).await?);
    Ok(())
}

/// An instant as RFC 3339, `-` for none.
fn rfc3339(t: Option<time::OffsetDateTime>) -> String {
    t.and_then(|t| {
        t.format(&time::format_description::well_known::Rfc3339)
            .ok()
    })
    .unwrap_or_else(|| "-".into())
}

#[cfg(feature = "oidc")]
mod vault {
    use std::io::IsTerminal;

    use indicatif::{ProgressBar, ProgressStyle};
    use tower_pg_session::{
        admin::Admin,
        crypto::Keyring,
        vault::{Connection, ImportSource, Integration, KeyUsage, TokenVault, VaultConfig},
        PgStore,
    };

    use super::{ImportArgs, VaultArgs};

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

    /// One line per key id: how many values it seals in the vault and in
    /// sessions, and whether the keyring seals with it, still opens with
    /// it, or no longer has it.
    pub(super) async fn keys(
        store: &PgStore,
        schema: Option<&str>,
        args: &VaultArgs,
    ) -> Result<(), Box<dyn std::error::Error>> {
        let (vault, keys) = open(store, schema, args).await?;
        let current = keys.current_key_id().to_string();
        let known: Vec<String> = keys.key_ids().map(|k| k.to_string()).collect();
        let in_vault = vault.key_usage().await?;
        let in_sessions = store.session_key_usage().await?;
        let mut ids: Vec<&str> = in_vault
            .iter()
            .chain(&in_sessions)
            .map(|u| u.key_id.as_str())
            .chain(known.iter().map(String::as_str))
            .collect();
        ids.sort_unstable();
        ids.dedup();
        let count = |usage: &[KeyUsage], id: &str| {
            usage
                .iter()
                .find(|u| u.key_id == id)
                .map_or(0, |u| u.values)
        };
        println!(
            "{:<10} {:>10} {:>10}  status",
            "key id", "vault", "sessions"
        );
        for id in ids {
            let (v, s) = (count(&in_vault, id), count(&in_sessions, id));
            let status = if id == current {
                "seals (first key)"
            } else if !known.iter().any(|k| k == id) {
                "NOT in TOKEN_KEYS: these values do not open"
            } else if v + s > 0 {
                "opens only: run `pg-session reseal`"
            } else {
                "unused: can be removed from TOKEN_KEYS"
            };
            println!("{id:<10} {v:>10} {s:>10}  {status}");
        }
        Ok(())
    }

    pub(super) async fn reseal(
        store: &PgStore,
        schema: Option<&str>,
        args: &VaultArgs,
        batch: usize,
    ) -> Result<(), Box<dyn std::error::Error>> {
        let (vault, keys) = open(store, schema, args).await?;
        let mut progress = Progress::new("vault rows", vault.rows_to_reseal().await?);
        let outcome = vault.reseal_with(batch, |n| progress.add(n)).await?;
        progress.finish();
        println!(
            "vault: sealed {} rows under the first key; {} rows did not open and were left as they were",
            outcome.resealed, outcome.unreadable
        );
        let total = store.session_rows_to_reseal(&keys).await?;
        let mut progress = Progress::new("session rows", total);
        let outcome = store
            .reseal_sessions_with(&keys, batch, |n| progress.add(n))
            .await?;
        progress.finish();
        println!(
            "sessions: sealed {} rows under the first key; {} rows did not open and were left as they were",
            outcome.resealed, outcome.unreadable
        );
        Ok(())
    }

    /// `admin` covering the vault's table when it exists. Listing and
    /// exporting read no token, so no key is needed: a throwaway keyring
    /// stands in.
    pub(super) async fn with_vault(
        store: &PgStore,
        admin: Admin,
        schema: Option<&str>,
        table: &str,
    ) -> Result<Admin, Box<dyn std::error::Error>> {
        let mut config = VaultConfig::new().with_table_name(table)?;
        let mut name = format!("\"{table}\"");
        if let Some(schema) = schema {
            config = config.with_schema_name(schema)?;
            name = format!("\"{schema}\".{name}");
        }
        let exists: bool = sqlx::query_scalar("SELECT to_regclass($1) IS NOT NULL")
            .bind(name)
            .fetch_one(store.pool())
            .await?;
        if !exists {
            return Ok(admin);
        }
        let vault = TokenVault::new(store, Keyring::generate(), config).await?;
        Ok(admin.with_vault(&vault))
    }

    pub(super) fn print_connections(list: &[Connection]) {
        if list.is_empty() {
            return;
        }
        println!();
        println!(
            "{:<20} {:<26} {:<26} {:<9} scopes",
            "connected account", "expires", "last used", "status"
        );
        for c in list {
            let status = if c.needs_reconsent { "reconsent" } else { "ok" };
            println!(
                "{:<20} {:<26} {:<26} {:<9} {}",
                c.integration,
                super::rfc3339(c.expires_at),
                super::rfc3339(c.last_used_at),
                status,
                c.scopes.join(" ")
            );
        }
    }

    pub(super) async fn import(
        store: &PgStore,
        schema: Option<&str>,
        args: &ImportArgs,
    ) -> Result<(), Box<dyn std::error::Error>> {
        let keys = Keyring::from_base64_list(&args.vault.token_keys)?;
        let mut config = VaultConfig::new().with_table_name(&args.vault.vault_table)?;
        if let Some(schema) = schema {
            config = config.with_schema_name(schema)?;
        }
        // Only the names matter: importing never calls a provider.
        for name in &args.integrations {
            config = config.with_integration(Integration::new(
                name,
                "http://127.0.0.1/unused",
                "pg-session",
            )?);
        }
        let vault = TokenVault::new(store, keys, config).await?;
        let column = |c: &str| (c != "-").then(|| c.to_owned());
        let (refresh, expires) = (column(&args.refresh_column), column(&args.expires_column));
        let source = ImportSource::new(args.from_schema.as_deref(), &args.from)?.with_columns(
            &args.user_column,
            &args.integration_column,
            &args.access_column,
            refresh.as_deref(),
            expires.as_deref(),
        )?;
        let outcome = vault.import(&source, args.dry_run).await?;
        let verb = if args.dry_run {
            "would import"
        } else {
            "imported"
        };
        println!(
            "read {} rows; {verb} {}; skipped {} (unknown integration, bad user id, empty or oversized token: see the log)",
            outcome.read, outcome.imported, outcome.skipped
        );
        if args.dry_run {
            println!("dry run: nothing was written");
        }
        Ok(())
    }

    /// A progress bar (on stderr) when stdout is a terminal; otherwise a
    /// plain line on stdout per batch, so logs and CI keep a readable trace.
    /// The total is counted first: rows written meanwhile by the
    /// application may make the count end a little off it.
    struct Progress {
        bar: Option<ProgressBar>,
        what: &'static str,
        done: u64,
        total: u64,
    }

    impl Progress {
        fn new(what: &'static str, total: u64) -> Self {
            let bar = std::io::stdout().is_terminal().then(|| {
                let bar = ProgressBar::new(total);
                bar.set_style(
                    ProgressStyle::with_template(&format!(
                        "{{bar:40}} {{pos}}/{{len}} {what} sealed again ({{elapsed}}, eta {{eta}})"
                    ))
                    .unwrap_or_else(|_| ProgressStyle::default_bar()),
                );
                bar
            });
            if bar.is_none() {
                println!("{what}: {total} to seal again");
            }
            Self {
                bar,
                what,
                done: 0,
                total,
            }
        }

        fn add(&mut self, n: u64) {
            self.done += n;
            match &self.bar {
                Some(bar) => bar.inc(n),
                None if n > 0 => println!("{}: {}/{}", self.what, self.done, self.total),
                None => {}
            }
        }

        fn finish(self) {
            if let Some(bar) = self.bar {
                bar.finish_and_clear();
            }
        }
    }
}
