//! A small axum app whose sessions live in Postgres, with an OpenID Connect
//! login on top of them.
//!
//! It shows:
//! - sessions: a counter and a key-value store kept per browser, surviving
//!   restarts;
//! - a login through an OpenID provider (`/auth/login` → provider →
//!   `/auth/callback`), with the tokens sealed in the session; `/me` behind
//!   `RequireLoginLayer` (a browser is sent to the login and back, an API
//!   client gets 401); `POST /auth/logout` (same-origin only) ends the session
//!   and the provider's; `POST /auth/backchannel-logout` lets the provider end
//!   sessions;
//! - without `OIDC_ISSUER`, a local provider started from this repository
//!   (`tests/idp`, Node.js >= 20.19; `npm ci` there on first run); it stops
//!   with the demo;
//! - a provider that is down at start: the session routes work, `/auth/*`
//!   and `/me` answer 503 with the reason, and discovery is retried every 5 s;
//! - the token vault: a logged-in user connects a mail account
//!   (`/integrations/mail/connect` → provider → `/integrations/mail/callback`;
//!   the local provider stands in for the mail service), its tokens are kept
//!   sealed in Postgres and refreshed when due; a background task gets every
//!   connected account's token every `INTEGRATION_POLL_SECS` and logs its
//!   expiry (never a token).
//!
//! ```not_rust
//! cargo run --example demo
//! curl -c jar -b jar http://127.0.0.1:3000/counter   # {"count":1}
//! curl -c jar -b jar http://127.0.0.1:3000/counter   # {"count":2}, also after a restart
//! # login: open http://127.0.0.1:3000/me in a browser; with the local
//! # provider, any user name and any password
//! ```
//!
//! Routes: `GET /` (links and a logout button), `GET /healthz`,
//! `GET /counter`, `GET /peek`, `PUT /kv/{key}` (JSON body; 403
//! `{"error": "reserved_key"}` and nothing stored for the login's keys
//! `oidc` and `oidc.login.*`, the vault's `vault.connect.*`, and with `EXPRESS_COMPAT=1` Passport's
//! `passport`), `GET /kv`,
//! `GET /auth/login?return_to=/path` (also `&acr_values=…&max_age=…`: a
//! login that asks for more, as step-up routes send browsers to), `GET /auth/callback`,
//! `POST /auth/logout`, `POST /auth/backchannel-logout`, `GET /me`
//! (`{"sub", "claims", "access_token_expires_at"}`),
//! `GET /integrations/mail/connect?return_to=/path` (logged-in only, else
//! 401; redirects to the provider), `GET /integrations/mail/callback`
//! (redirects to `return_to`; a forged, replayed or expired one answers 400,
//! a refusal at the provider 403), `GET /integrations` (the logged-in user's
//! `[{"integration", "expires_at", "scopes", "last_refreshed_at"}]`, times in
//! unix seconds), `GET /integrations/mail/check` (gets the token through the
//! vault, refreshing it when due: `{"valid": true, "expires_at": <unix s>}`,
//! never the token; 404 when not connected, 409 when the user must connect
//! again, 502 when the provider fails), `POST /integrations/mail/disconnect`
//! (same-origin only, as logout, else 403; `{"removed": bool}`, and the
//! refresh token is revoked at the provider). `oidc`, `oidc.login.*` and
//! `vault.connect.*` are reserved session keys.
//!
//! Environment:
//!
//! | variable | default |
//! |---|---|
//! | `BIND_ADDR` | `127.0.0.1:3000` |
//! | `DATABASE_URL` | `postgres://postgres@127.0.0.1:5432/postgres`; when nothing answers there and `initdb`/`pg_ctl` are installed, a throwaway cluster in a temporary directory. Several hosts (`postgres://u@a:5432,b:5432/db`, or libpq's `host=a,b …`): the writable one is used, and found again after a failover. TLS: `sslmode=require`, `verify-ca` or `verify-full`, `sslrootcert=ca.pem`. A given URL need not answer at start: `/healthz` answers 503 until it does, and the table is created then |
//! | `SESSION_SECRET` | comma-separated signing keys (32+ bytes each; with `EXPRESS_COMPAT=1`, express-session's secrets, any length), the first signs; a random one, with a warning, when unset |
//! | `EXPRESS_COMPAT` | `1`: share sessions with an Express app (express-session + connect-pg-simple): cookie `connect.sid` in express-session's format, plain ids, the connect-pg-simple table; `count` is the `req.session.count` of the Node side |
//! | `SESSION_COOKIE_NAME` | `session` (`connect.sid` with `EXPRESS_COMPAT=1`) |
//! | `DB_POOL_SIZE` | `10` |
//! | `DB_ACQUIRE_TIMEOUT_SECS` | `5`: how long a request waits for a database connection before answering 503 |
//! | `DB_MAX_LIFETIME_SECS` / `DB_IDLE_TIMEOUT_SECS` | `1800` / `600`: connections older / idle longer are closed (`0`: never) |
//! | `DB_PASSWORD_FILE` | none; a file holding the database password, read again for each new connection (rotated credentials) |
//! | `DB_POOLER` | `direct`; `transaction` when `DATABASE_URL` points at a pooler in transaction mode (PgBouncer `pool_mode = transaction`, RDS Proxy, Supavisor): no named prepared statements, no session-level state |
//! | `PRUNE_INTERVAL_SECS` | `900` (`0` turns pruning off) |
//! | `SESSION_TTL_SECS` | `86400` (idle timeout) |
//! | `COOKIE_SECURE` | on; `0` for plain-http use other than on localhost |
//! | `APP_URL` | public base URL: `http://{BIND_ADDR}` (`http://127.0.0.1:3000`); the redirect URI is `{APP_URL}/auth/callback` |
//! | `OIDC_ISSUER` | the provider's issuer URL; unset: start the local provider of `tests/idp` (needs `node`; without it the demo runs with login answering 503) |
//! | `OIDC_CLIENT_ID` | `demo` |
//! | `OIDC_CLIENT_SECRET` | none (a public client); `demo-secret` with the local provider |
//! | `TOKEN_KEYS` | comma-separated base64 32-byte keys sealing the tokens (`openssl rand -base64 32`), the first seals; a random one, with a warning, when unset |
//! | `OIDC_REFRESH_BEFORE` | `300`: seconds before expiry at which the access token is refreshed |
//! | `OIDC_USERINFO` | `auto`: the login (and each refresh) also asks the userinfo endpoint when the ID token lacks a requested profile claim; `on`: always; `off`: never |
//! | `OIDC_USERINFO_SIGNED_ALG` | none: a signed userinfo answer may use any algorithm the provider advertises (never `none`); `RS256`, `ES256`, …: the client's registered `userinfo_signed_response_alg`, the only one accepted |
//! | `OIDC_DPOP` | `0`; `1`: tokens bound to a key pair of each login (DPoP, RFC 9449), the key sealed in the session; the provider must support DPoP |
//! | `OIDC_ACR_VALUES` | none; space-separated authentication context classes every login asks for (e.g. Keycloak's `2`: a second factor); the ID token's `acr` must be one of them |
//! | `OIDC_MAX_AGE` | none; seconds: every login must be at most this old at the provider (`max_age`, checked against `auth_time`) |
//! | `OIDC_PROVIDER` | `keycloak`, `cognito` or `generic`; detected from the issuer when unset. With the local provider, `cognito` starts its Cognito flavor |
//! | `INTEGRATION_ISSUER` | the issuer of the `mail` integration's provider (OpenID discovery); unset: the local provider with its client `demo-mail` (secret `demo-mail-secret`), or with `OIDC_ISSUER` the login's provider and client. The client must allow the redirect URI `{APP_URL}/integrations/mail/callback` |
//! | `INTEGRATION_CLIENT_ID` / `INTEGRATION_CLIENT_SECRET` | the client at `INTEGRATION_ISSUER` (the id is required with it) |
//! | `INTEGRATION_AUDIT` | `peer`: each connection records the client's address (the socket's peer) and `User-Agent` at connect; `forwarded`: the last `X-Forwarded-For` address (behind one trusted proxy); `off` |
//! | `INTEGRATION_POLL_SECS` | `5`: how often the background task gets every connected account's token (`0`: off) |
//! | `OIDC2_ISSUER` / `OIDC2_CLIENT_ID` / `OIDC2_CLIENT_SECRET` | none; a second provider (Keycloak for staff, Cognito for customers, say): login at `/auth/login?provider=2`; its client must allow the redirect URI `{APP_URL}/auth/callback/2` (back-channel logout: `{APP_URL}/auth/backchannel-logout/2`). `/me` takes a login from either; logout ends it at its own provider |
//! | `OIDC_CLIENT_AUTH` | how the client authenticates at the provider: `client_secret_basic`, `client_secret_post`, `client_secret_jwt` (each needs `OIDC_CLIENT_SECRET`) or `private_key_jwt` (needs `OIDC_CLIENT_KEY`); unset: `private_key_jwt` with a key, else the first secret method the provider advertises |
//! | `OIDC_CLIENT_KEY` | none; a PKCS#8 PEM file of an RSA private key (2048+ bits, RS256) or a P-256 one (ES256) for `private_key_jwt`; its public JWKS is served at `/auth/jwks.json` |
//! | `OIDC_PAR` | `auto`: push the authorization request (RFC 9126) when the provider advertises a PAR endpoint; `on`: always (login fails without one); `off`: never |
//! | `COGNITO_DOMAIN` | Cognito's hosted-UI origin for logout (`https://x.auth.eu-west-1.amazoncognito.com`); default: the origin of the authorization endpoint |
//!
//! The local provider also reads `IDP_PAR` (`off`, `on`, `required`) and
//! `IDP_CLIENT_AUTH` (the clients' registered method; see
//! tests/idp/README.md), and `ACCESS_TOKEN_TTL` (seconds, default 3600):
//! `ACCESS_TOKEN_TTL=60 OIDC_REFRESH_BEFORE=30` shows refreshes (the
//! vault refreshes a connected account 5 minutes before expiry, so with
//! `ACCESS_TOKEN_TTL` under 300 every check refreshes).

use std::{env, net::SocketAddr, str::FromStr, sync::Arc, time::Duration};

use axum::{
    body::Body,
    extract::{ConnectInfo, Path, Query, RawQuery, Request, State},
    http::{header, HeaderMap, StatusCode},
    middleware::{self, Next},
    response::{Html, IntoResponse, Response},
    routing::{get, post, put},
    Json, Router,
};
use openidconnect::url::{Host, Url};
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::sync::RwLock;
use tower_pg_session::{
    crypto::{EncryptionKey, Keyring},
    oidc::{
        AuthError, ClientAuth, ClientKey, CoreJwsSigningAlgorithm, OidcClient, OidcConfig,
        OidcProviders, Par, Provider, Rejection, RejectionKind, RequireLoginLayer, User,
        UserinfoMode,
    },
    store::PgConnect,
    vault::{ClientIp, Integration, TokenVault, VaultConfig, VaultError},
    ExpressSecrets, PgStore, PgStoreConfig, Pooler, PruneConfig, Session, SessionError,
    SessionLayer, SigningKeys,
};

mod local_pg {
    //! A throwaway PostgreSQL cluster for machines without a running server.
    use std::{
        net::TcpListener,
        path::{Path, PathBuf},
        process::Command,
    };

    pub(super) struct Cluster {
        dir: PathBuf,
        pg_ctl: PathBuf,
        as_postgres: bool,
        pub(super) url: String,
    }

    fn find(tool: &str) -> Option<PathBuf> {
        let mut dirs: Vec<PathBuf> = std::env::var_os("PATH")
            .map(|p| std::env::split_paths(&p).collect())
            .unwrap_or_default();
        // Debian keeps the server tools off PATH.
        if let Ok(entries) = std::fs::read_dir("/usr/lib/postgresql") {
            let mut versions: Vec<PathBuf> =
                entries.flatten().map(|e| e.path().join("bin")).collect();
            versions.sort();
            dirs.extend(versions.into_iter().rev());
        }
        dirs.into_iter().map(|d| d.join(tool)).find(|p| p.is_file())
    }

    fn run(cmd: &Path, args: &[&str], as_postgres: bool) -> std::io::Result<bool> {
        let mut command = if as_postgres {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(cmd);
            c
        } else {
            Command::new(cmd)
        };
        let status = command
            .args(args)
            .stdout(std::process::Stdio::null())
            .status()?;
        Ok(status.success())
    }

    pub(super) fn start() -> Option<Cluster> {
        let initdb = find("initdb")?;
        let pg_ctl = find("pg_ctl")?;
        // initdb refuses to run as root; use the postgres account when we are root.
        let as_postgres = std::env::var("USER").map(|u| u == "root").unwrap_or(false)
            || Command::new("id")
                .arg("-u")
                .output()
                .map(|o| o.stdout.starts_with(b"0\n"))
                .unwrap_or(false);
        let dir =
            std::env::temp_dir().join(format!("tower-pg-session-demo-{}", std::process::id()));
        std::fs::create_dir_all(&dir).ok()?;
        if as_postgres {
            Command::new("chown")
                .args(["postgres:"])
                .arg(&dir)
                .status()
                .ok()?;
        }
        let port = TcpListener::bind("127.0.0.1:0")
            .ok()?
            .local_addr()
            .ok()?
            .port();
        let data = dir.join("data");
        let data_s = data.to_str()?;
        if !run(
            &initdb,
            &["-D", data_s, "-U", "postgres", "-A", "trust", "--no-sync"],
            as_postgres,
        )
        .ok()?
        {
            return None;
        }
        let opts = format!(
            "-c listen_addresses=127.0.0.1 -p {port} -k {}",
            dir.to_str()?
        );
        let log = dir.join("log");
        if !run(
            &pg_ctl,
            &[
                "-D",
                data_s,
                "-o",
                &opts,
                "-l",
                log.to_str()?,
                "-w",
                "start",
            ],
            as_postgres,
        )
        .ok()?
        {
            return None;
        }
        Some(Cluster {
            url: format!("postgres://postgres@127.0.0.1:{port}/postgres"),
            dir,
            pg_ctl,
            as_postgres,
        })
    }

    impl Drop for Cluster {
        fn drop(&mut self) {
            if let Some(data) = self.dir.join("data").to_str() {
                let _ = run(
                    &self.pg_ctl,
                    &["-D", data, "-m", "fast", "-w", "stop"],
                    self.as_postgres,
                );
            }
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

mod local_idp {
    //! The OpenID provider of `tests/idp`, run with `node` for the demo.
    use std::{path::PathBuf, process::Stdio, time::Duration};

    use tokio::{
        io::{AsyncBufReadExt, BufReader},
        process::{Child, ChildStdin, Command},
    };

    pub(super) struct Idp {
        pub(super) issuer: String,
        child: Child,
        /// The provider exits when this pipe closes: when the demo stops, or dies.
        stdin: Option<ChildStdin>,
    }

    /// Installs (`npm ci`, once) and starts the provider, and waits for the
    /// line that names its issuer.
    pub(super) async fn start(flavor: &str, clients: &str) -> Result<Idp, String> {
        let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/idp");
        match Command::new("node").arg("--version").output().await {
            Ok(out) if out.status.success() => {}
            Ok(out) => return Err(format!("`node --version` failed ({})", out.status)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err("Node.js (`node`) is not installed".to_owned())
            }
            Err(e) => return Err(format!("cannot run `node`: {e}")),
        }
        if !dir.join("node_modules").is_dir() {
            tracing::info!(dir = %dir.display(), "the local OpenID provider is not installed yet: running `npm ci` (once)");
            let status = Command::new("npm")
                .arg("ci")
                .current_dir(&dir)
                .stdin(Stdio::null())
                .status()
                .await
                .map_err(|e| format!("cannot run `npm ci` in {}: {e}", dir.display()))?;
            if !status.success() {
                return Err(format!("`npm ci` in {} failed ({status})", dir.display()));
            }
        }
        let mut child = Command::new("node")
            .arg("server.js")
            .current_dir(&dir)
            .env("IDP_FLAVOR", flavor)
            .env("IDP_CLIENTS", clients)
            // An ephemeral port: a PORT meant for something else must not leak in.
            .env_remove("PORT")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| format!("cannot start `node server.js`: {e}"))?;
        let stdin = child.stdin.take();
        let stdout = child
            .stdout
            .take()
            .ok_or("the provider's stdout is not piped")?;
        let mut lines = BufReader::new(stdout).lines();
        let line = match tokio::time::timeout(Duration::from_secs(30), lines.next_line()).await {
            Ok(Ok(Some(line))) => line,
            Ok(Ok(None)) => {
                return Err(
                    "the local OpenID provider exited before it was ready (its log is above; \
                     after a change to tests/idp/package-lock.json, run `npm ci` there)"
                        .to_owned(),
                )
            }
            Ok(Err(e)) => return Err(format!("reading the local OpenID provider's output: {e}")),
            Err(_) => return Err("the local OpenID provider did not start within 30 s".to_owned()),
        };
        let issuer = serde_json::from_str::<serde_json::Value>(&line)
            .ok()
            .and_then(|v| v["issuer"].as_str().map(str::to_owned))
            .ok_or_else(|| {
                format!("unexpected first line from the local OpenID provider: {line:?}")
            })?;
        // Nothing else is expected on stdout; keep reading so that a stray
        // write cannot fail on a closed pipe.
        tokio::spawn(async move {
            while let Ok(Some(line)) = lines.next_line().await {
                tracing::info!(target: "idp", "{line}");
            }
        });
        Ok(Idp {
            issuer,
            child,
            stdin,
        })
    }

    impl Idp {
        /// Closes its stdin (it exits on EOF), and kills it if it lingers.
        pub(super) async fn stop(mut self) {
            drop(self.stdin.take());
            let status = match tokio::time::timeout(Duration::from_secs(2), self.child.wait()).await
            {
                Ok(status) => status,
                Err(_) => {
                    let _ = self.child.kill().await;
                    self.child.wait().await
                }
            };
            match status {
                Ok(status) => tracing::info!(%status, "local OpenID provider stopped"),
                Err(e) => {
                    tracing::warn!(error = %e, "waiting for the local OpenID provider failed")
                }
            }
        }
    }
}

fn env_opt<T: FromStr>(name: &str) -> Result<Option<T>, String> {
    match env::var(name) {
        Ok(v) => v
            .parse()
            .map(Some)
            .map_err(|_| format!("{name}={v:?} is not valid")),
        Err(_) => Ok(None),
    }
}

fn env_or<T: FromStr>(name: &str, default: T) -> Result<T, String> {
    Ok(env_opt(name)?.unwrap_or(default))
}

/// A variable of the login's configuration; set but empty counts as unset.
fn env_str(name: &str) -> Option<String> {
    env::var(name)
        .ok()
        .map(|v| v.trim().to_owned())
        .filter(|v| !v.is_empty())
}

/// How often the vault's setup is retried while its provider or the
/// database does not answer (the login's discovery retries on its own).
const RETRY: Duration = Duration::from_secs(5);

/// 503 with `error` and why.
fn unavailable(error: &str, why: &str) -> Response {
    (
        StatusCode::SERVICE_UNAVAILABLE,
        [(header::CACHE_CONTROL, "no-store")],
        Json(json!({"error": error, "error_description": why})),
    )
        .into_response()
}

/// The token vault once its integration is found and its table ready;
/// until then, why there is none.
#[derive(Clone)]
struct Vault(Arc<RwLock<Result<TokenVault, String>>>);

impl Vault {
    async fn get(&self) -> Result<TokenVault, Response> {
        match &*self.0.read().await {
            Ok(vault) => Ok(vault.clone()),
            Err(why) => Err(unavailable("vault_unavailable", why)),
        }
    }
}

/// The mail service's client at the local provider (id, secret).
const LOCAL_MAIL_CLIENT: (&str, &str) = ("demo-mail", "demo-mail-secret");

/// Where the `mail` integration lives and the client there.
struct MailSettings {
    issuer: String,
    client_id: String,
    client_secret: Option<String>,
    redirect_uri: String,
    /// Where the client's address at connect comes from; `None`: not recorded.
    audit: Option<ClientIp>,
}

/// Finds the `mail` integration through discovery and prepares the vault's
/// table, retrying until both work (the provider or the database may not
/// answer yet).
async fn vault_until_ready(vault: Vault, settings: MailSettings, store: PgStore, keys: Keyring) {
    let build = || async {
        let mut mail = Integration::discover("mail", &settings.issuer, &settings.client_id)
            .await?
            .with_redirect_uri(&settings.redirect_uri)?
            .add_scope("openid")?
            .add_scope("email")?;
        if let Some(secret) = &settings.client_secret {
            mail = mail.with_client_secret(secret);
        }
        TokenVault::new(
            &store,
            keys.clone(),
            match &settings.audit {
                Some(ip) => VaultConfig::new()
                    .with_integration(mail)
                    .with_connect_audit(ip.clone()),
                None => VaultConfig::new().with_integration(mail),
            },
        )
        .await
    };
    loop {
        match build().await {
            Ok(ready) => {
                tracing::info!(issuer = %settings.issuer, "token vault ready: integration mail");
                *vault.0.write().await = Ok(ready);
                return;
            }
            Err(e) => {
                tracing::warn!(error = %e, retry_secs = RETRY.as_secs(), "token vault not ready");
                *vault.0.write().await = Err(format!("the token vault is not ready: {e}"));
            }
        }
        tokio::time::sleep(RETRY).await;
    }
}

/// Every `every`, gets the token of every connected account through the
/// vault (refreshing those due) and logs its expiry, never the token; at
/// most [`POLL_MAX`] accounts a round.
async fn poll_connections(vault: Vault, every: Duration) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Ok(vault) = vault.get().await else {
            continue;
        };
        let mut after: Option<(String, String)> = None;
        let mut seen = 0;
        while seen < POLL_MAX {
            let key = after.as_ref().map(|(u, i)| (u.as_str(), i.as_str()));
            let page = match vault.list_all(key, POLL_PAGE).await {
                Ok(page) => page,
                Err(e) => {
                    tracing::warn!(error = %e, "listing connected accounts failed");
                    break;
                }
            };
            for (user, connection) in &page {
                let integration = connection.integration.as_str();
                match vault.get(user, integration).await {
                    Ok(token) => tracing::info!(
                        user = ?user,
                        integration,
                        expires_at = token.expires_at().map(|t| t.unix_timestamp()),
                        "connected account checked"
                    ),
                    Err(e) => {
                        tracing::warn!(user = ?user, integration, error = %e, "connected account unusable")
                    }
                }
            }
            seen += page.len();
            match page.last() {
                Some((user, c)) if page.len() == POLL_PAGE => {
                    after = Some((user.clone(), c.integration.clone()));
                }
                _ => break,
            }
        }
    }
}

/// Accounts the background poll looks at per page, and per round.
const POLL_PAGE: usize = 100;
const POLL_MAX: usize = 10_000;

#[derive(Clone)]
struct AppState {
    store: PgStore,
    /// The login, or why it is off.
    login: Result<OidcProviders, String>,
    vault: Vault,
}

/// The environment, read and checked before anything starts.
struct Settings {
    bind: SocketAddr,
    store_config: PgStoreConfig,
    prune_secs: u64,
    ttl_secs: u64,
    secure: bool,
    token_keys: Keyring,
    provider_name: Option<String>,
    cognito_domain: Option<Url>,
    refresh_before: Option<u64>,
    client_id: String,
    client_secret: Option<String>,
    poll_secs: u64,
}

impl Settings {
    fn from_env() -> Result<Self, Box<dyn std::error::Error>> {
        let store_config = match env_str("DB_POOLER").as_deref() {
            None | Some("direct" | "session") => PgStoreConfig::new(),
            Some("transaction") => PgStoreConfig::new().with_pooler(Pooler::Transaction),
            Some(other) => {
                return Err(
                    format!("DB_POOLER={other:?}: expected \"direct\" or \"transaction\"").into(),
                )
            }
        };
        let provider_name = env_str("OIDC_PROVIDER").map(|p| p.to_ascii_lowercase());
        if let Some(p) = provider_name.as_deref() {
            if !matches!(p, "keycloak" | "cognito" | "generic") {
                return Err(
                    format!("OIDC_PROVIDER={p:?}: use keycloak, cognito or generic").into(),
                );
            }
        }
        Ok(Self {
            bind: env_or("BIND_ADDR", SocketAddr::from(([127, 0, 0, 1], 3000)))?,
            store_config,
            prune_secs: env_or("PRUNE_INTERVAL_SECS", 900)?,
            ttl_secs: env_or("SESSION_TTL_SECS", 86_400)?,
            secure: env::var("COOKIE_SECURE").map(|v| v != "0").unwrap_or(true),
            token_keys: token_keys()?,
            provider_name,
            cognito_domain: env_str("COGNITO_DOMAIN")
                .map(|d| Url::parse(&d).map_err(|e| format!("COGNITO_DOMAIN={d:?}: {e}")))
                .transpose()?,
            refresh_before: env_opt("OIDC_REFRESH_BEFORE")?,
            client_id: env_str("OIDC_CLIENT_ID").unwrap_or_else(|| "demo".to_owned()),
            client_secret: env_str("OIDC_CLIENT_SECRET"),
            poll_secs: env_or("INTEGRATION_POLL_SECS", 5)?,
        })
    }
}

/// `TOKEN_KEYS`, or a random key (with a warning).
fn token_keys() -> Result<Keyring, Box<dyn std::error::Error>> {
    match env_str("TOKEN_KEYS") {
        Some(list) => Ok(Keyring::from_base64_list(&list).map_err(|e| format!("TOKEN_KEYS: {e}"))?),
        None => {
            tracing::warn!(
                "TOKEN_KEYS is not set: using a random key, so logins end when the demo stops"
            );
            Ok(Keyring::new(vec![EncryptionKey::generate()])?)
        }
    }
}

/// `APP_URL`, or the address the demo listens on.
fn app_url(
    listener: &tokio::net::TcpListener,
) -> Result<(String, Url), Box<dyn std::error::Error>> {
    let app_url = match env_str("APP_URL") {
        Some(url) => url.trim_end_matches('/').to_owned(),
        None => format!("http://{}", listener.local_addr()?),
    };
    let app = Url::parse(&app_url)
        .ok()
        .filter(|u| matches!(u.scheme(), "http" | "https") && u.host().is_some())
        .ok_or_else(|| format!("APP_URL={app_url:?} is not an absolute http(s) URL"))?;
    Ok((app_url, app))
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,sqlx=warn".into()),
        )
        .init();
    let mut settings = Settings::from_env()?;
    let listener = tokio::net::TcpListener::bind(settings.bind).await?;
    let (app_url, app) = app_url(&listener)?;

    let (store, _cluster) = start_database(settings.store_config.clone()).await?;
    let layer = session_layer(&store, &settings, &app, &app_url)?;
    let pruner = (settings.prune_secs > 0)
        .then(|| {
            let every = Duration::from_secs(settings.prune_secs);
            store.spawn_pruner(PruneConfig::new().with_interval(every))
        })
        .transpose()?;
    let (issuer, idp) = start_provider(&mut settings, &app_url).await;
    let (vault, vault_tasks) = start_vault(&settings, &issuer, idp.is_some(), &app_url, &store)?;
    let login = match issuer {
        Ok(issuer) => Ok(login_providers(&settings, &issuer, &app_url, &store)?),
        Err(why) => Err(why),
    };

    let app = router(AppState {
        store,
        login,
        vault,
    })
    .layer(layer);
    tracing::info!("demo listening on http://{}", listener.local_addr()?);
    if idp.is_some() {
        tracing::info!("to log in, open {app_url}/me in a browser and log in with any user name and any password");
    }
    // The peer's address, for the connect audit.
    axum::serve(
        listener,
        app.into_make_service_with_connect_info::<SocketAddr>(),
    )
    .with_graceful_shutdown(shutdown_signal())
    .await?;
    for task in vault_tasks {
        task.abort();
    }
    if let Some(idp) = idp {
        idp.stop().await;
    }
    if let Some(p) = pruner {
        p.shutdown().await;
    }
    Ok(())
}

/// The store on `DATABASE_URL`; without it, on the default address, or on
/// a throwaway cluster (returned: removed when dropped) when nothing answers
/// there.
async fn start_database(
    config: PgStoreConfig,
) -> Result<(PgStore, Option<local_pg::Cluster>), Box<dyn std::error::Error>> {
    if let Ok(url) = env::var("DATABASE_URL") {
        // The given database may not answer yet: start anyway (`/healthz`
        // answers 503 until it does) and prepare the table on first contact.
        return Ok((PgStore::connect_lazy(connect_options(&url)?, config)?, None));
    }
    let url = "postgres://postgres@127.0.0.1:5432/postgres";
    match PgStore::connect_to(connect_options(url)?, config.clone()).await {
        Ok(store) => Ok((store, None)),
        Err(e) => {
            tracing::warn!(error = %e, "no PostgreSQL at the default address; starting a throwaway cluster");
            let cluster = local_pg::start().ok_or_else(|| {
                format!("{e}; and no initdb/pg_ctl to start a local cluster: set DATABASE_URL")
            })?;
            tracing::info!(url = %cluster.url, "throwaway PostgreSQL cluster started (removed on exit)");
            let store = PgStore::connect_to(connect_options(&cluster.url)?, config).await?;
            Ok((store, Some(cluster)))
        }
    }
}

/// The session layer: signed cookies of this demo, or express-session's
/// next to an Express app (`EXPRESS_COMPAT=1`).
fn session_layer(
    store: &PgStore,
    settings: &Settings,
    app: &Url,
    app_url: &str,
) -> Result<SessionLayer, Box<dyn std::error::Error>> {
    let secrets: Option<Vec<String>> = env::var("SESSION_SECRET").ok().map(|s| {
        s.split(',')
            .map(str::trim)
            .filter(|k| !k.is_empty())
            .map(str::to_owned)
            .collect()
    });
    if secrets.is_none() {
        tracing::warn!(
            "SESSION_SECRET is not set: using a random key, so sessions end when the demo stops"
        );
    }
    let mut layer = if env::var("EXPRESS_COMPAT").is_ok_and(|v| v == "1") {
        let secrets = match secrets {
            Some(s) => ExpressSecrets::new(s)?,
            None => ExpressSecrets::new([SigningKeys::generate_secret()])?,
        };
        tracing::info!(
            "EXPRESS_COMPAT=1: sharing sessions with express-session + connect-pg-simple"
        );
        // Passport's login is what the Node side trusts: not writable here.
        SessionLayer::express_builder(store.clone(), secrets).with_reserved_key("passport")
    } else {
        let keys = match secrets {
            Some(s) => SigningKeys::new(s)?,
            None => SigningKeys::generate(),
        };
        SessionLayer::builder(store.clone(), keys)
    };
    if let Some(name) = env_str("SESSION_COOKIE_NAME") {
        layer = layer.with_cookie_name(&name)?;
    }
    layer = layer.with_idle_timeout(Some(Duration::from_secs(settings.ttl_secs)));
    if !settings.secure {
        layer = layer.with_insecure_http_cookie();
    } else if app.scheme() == "http" && !is_loopback(app) {
        tracing::warn!(%app_url, "browsers send Secure cookies over plain http only to localhost: set COOKIE_SECURE=0 (or serve over https) or logins will not stick");
    }
    Ok(layer.build()?)
}

/// The provider's issuer: `OIDC_ISSUER`, or the local provider of
/// `tests/idp`, started here with the login's client and the mail
/// service's; `Err` says why login is off.
async fn start_provider(
    settings: &mut Settings,
    app_url: &str,
) -> (Result<String, String>, Option<local_idp::Idp>) {
    if let Some(issuer) = env_str("OIDC_ISSUER") {
        return (Ok(issuer), None);
    }
    let secret = settings
        .client_secret
        .get_or_insert_with(|| "demo-secret".to_owned())
        .clone();
    // The mail service has a client of its own, so that disconnecting mail
    // (which revokes its grant) does not end the login.
    let clients = json!([{
        "client_id": settings.client_id,
        "client_secret": secret,
        "redirect_uris": [format!("{app_url}/auth/callback")],
        "post_logout_redirect_uris": [format!("{app_url}/")],
        "backchannel_logout_uri": format!("{app_url}/auth/backchannel-logout"),
        "backchannel_logout_session_required": true,
    }, {
        "client_id": LOCAL_MAIL_CLIENT.0,
        "client_secret": LOCAL_MAIL_CLIENT.1,
        "redirect_uris": [format!("{app_url}/integrations/mail/callback")],
    }]);
    let flavor = match settings.provider_name.as_deref() {
        Some("cognito") => "cognito",
        _ => "keycloak",
    };
    tracing::info!(
        flavor,
        "OIDC_ISSUER is not set: starting the local OpenID provider (tests/idp)"
    );
    match local_idp::start(flavor, &clients.to_string()).await {
        Ok(started) => {
            tracing::info!(issuer = %started.issuer, client_id = %settings.client_id, "local OpenID provider started (stops with the demo)");
            (Ok(started.issuer.clone()), Some(started))
        }
        Err(e) => {
            tracing::warn!("{e}: running without login (/auth/* and /me answer 503); set OIDC_ISSUER to use another provider");
            (
                Err(format!(
                    "login is off: {e}; install Node.js or set OIDC_ISSUER"
                )),
                None,
            )
        }
    }
}

/// What the login asks of the provider and of its tokens: userinfo,
/// authentication level and age, DPoP.
fn login_options(mut config: OidcConfig) -> Result<OidcConfig, Box<dyn std::error::Error>> {
    config = config.with_userinfo(env_or("OIDC_USERINFO", UserinfoMode::Auto)?);
    if let Some(alg) = env_str("OIDC_USERINFO_SIGNED_ALG") {
        let parsed = serde_json::from_value::<CoreJwsSigningAlgorithm>(json!(alg))
            .ok()
            .filter(|a| *a != CoreJwsSigningAlgorithm::None)
            .ok_or_else(|| {
                format!(
                    "OIDC_USERINFO_SIGNED_ALG={alg:?}: use a JWS algorithm such as RS256 or ES256"
                )
            })?;
        config = config.with_userinfo_signed_response_alg(parsed);
    }
    if let Some(values) = env_str("OIDC_ACR_VALUES") {
        config = config.with_acr_values(values.split_whitespace());
    }
    if let Some(secs) = env_opt::<u64>("OIDC_MAX_AGE")? {
        config = config.with_max_age(Duration::from_secs(secs));
    }
    match env_str("OIDC_DPOP").as_deref() {
        None | Some("0") => Ok(config),
        Some("1") => Ok(config.with_dpop(true)),
        Some(other) => Err(format!("OIDC_DPOP={other:?}: use 0 or 1").into()),
    }
}

/// The login's client, discovering its provider on first use: while the
/// provider is down, `/auth/*` and `/me` answer 503 with the reason and
/// discovery is tried again every 5 s.
fn login_client(
    settings: &Settings,
    issuer: &str,
    app_url: &str,
    store: &PgStore,
) -> Result<OidcClient, Box<dyn std::error::Error>> {
    let mut config = OidcConfig::new(
        issuer,
        &settings.client_id,
        app_url,
        settings.token_keys.clone(),
    )?;
    if let Some(secret) = &settings.client_secret {
        config = config.with_client_secret(secret);
    }
    if let Some(secs) = settings.refresh_before {
        config = config.with_refresh_before(Duration::from_secs(secs));
    }
    let config = login_options(config)?;
    let provider = match settings.provider_name.as_deref() {
        Some("keycloak") => Provider::Keycloak,
        Some("cognito") => Provider::Cognito { domain: None },
        Some(_) => Provider::Generic,
        None => Provider::detect(issuer),
    };
    let provider = match provider {
        Provider::Cognito { .. } => Provider::Cognito {
            domain: settings.cognito_domain.clone(),
        },
        other => {
            if settings.cognito_domain.is_some() {
                tracing::warn!(provider = ?other, "COGNITO_DOMAIN is ignored: the provider is not Cognito");
            }
            other
        }
    };
    let par = match env_str("OIDC_PAR")
        .map(|p| p.to_ascii_lowercase())
        .as_deref()
    {
        None | Some("auto") => Par::Auto,
        Some("on") => Par::Required,
        Some("off") => Par::Off,
        Some(p) => return Err(format!("OIDC_PAR={p:?}: use auto, on or off").into()),
    };
    let config = client_auth(config)?
        .with_provider(provider)
        .with_par(par)
        .with_discovery_retry(RETRY);
    Ok(OidcClient::lazy(config, store.clone())?)
}

/// `OIDC_CLIENT_AUTH` and `OIDC_CLIENT_KEY`: how the client authenticates.
fn client_auth(config: OidcConfig) -> Result<OidcConfig, Box<dyn std::error::Error>> {
    let config = match env_str("OIDC_CLIENT_AUTH").as_deref() {
        None => config,
        Some("client_secret_basic") => config.with_client_auth(ClientAuth::SecretBasic),
        Some("client_secret_post") => config.with_client_auth(ClientAuth::SecretPost),
        Some("client_secret_jwt") => config.with_client_auth(ClientAuth::SecretJwt),
        Some("private_key_jwt") => config.with_client_auth(ClientAuth::PrivateKeyJwt),
        Some(m) => {
            return Err(format!(
                "OIDC_CLIENT_AUTH={m:?}: use client_secret_basic, client_secret_post, client_secret_jwt or private_key_jwt"
            )
            .into())
        }
    };
    let config = match env_str("OIDC_CLIENT_KEY") {
        None => config,
        Some(file) => {
            let pem = std::fs::read_to_string(&file)
                .map_err(|e| format!("OIDC_CLIENT_KEY={file:?}: {e}"))?;
            let key = ClientKey::from_pem_auto(&pem)
                .map_err(|e| format!("OIDC_CLIENT_KEY={file:?}: {e}"))?;
            config.with_client_keys([key])
        }
    };
    Ok(config)
}

/// The login's provider, named `1`, and with `OIDC2_ISSUER` a second one,
/// named `2` (`/auth/login?provider=2`, callback `/auth/callback/2`,
/// back-channel logout `/auth/backchannel-logout/2`).
fn login_providers(
    settings: &Settings,
    issuer: &str,
    app_url: &str,
    store: &PgStore,
) -> Result<OidcProviders, Box<dyn std::error::Error>> {
    let first = login_client(settings, issuer, app_url, store)?;
    let Some(issuer2) = env_str("OIDC2_ISSUER") else {
        return Ok(OidcProviders::new([("1", first)])?);
    };
    let client_id =
        env_str("OIDC2_CLIENT_ID").ok_or("OIDC2_ISSUER is set: set OIDC2_CLIENT_ID too")?;
    let mut config = OidcConfig::new(&issuer2, &client_id, app_url, settings.token_keys.clone())?
        .with_callback_path("auth/callback/2")
        .with_backchannel_logout_path("auth/backchannel-logout/2")
        .with_discovery_retry(RETRY);
    if let Some(secret) = env_str("OIDC2_CLIENT_SECRET") {
        config = config.with_client_secret(&secret);
    }
    let second = OidcClient::lazy(config, store.clone())?;
    tracing::info!(issuer = %issuer2, "a second provider: /auth/login?provider=2");
    Ok(OidcProviders::new([("1", first), ("2", second)])?)
}

/// A background task, stopped when the demo stops.
type Task = tokio::task::JoinHandle<()>;

/// The token vault with its `mail` integration (the login's provider and
/// client unless `INTEGRATION_ISSUER` and its client are given), set up in
/// the background, and the task that polls connected accounts.
fn start_vault(
    settings: &Settings,
    issuer: &Result<String, String>,
    local_idp: bool,
    app_url: &str,
    store: &PgStore,
) -> Result<(Vault, Vec<Task>), Box<dyn std::error::Error>> {
    let redirect_uri = format!("{app_url}/integrations/mail/callback");
    let audit = match env_str("INTEGRATION_AUDIT").as_deref() {
        None | Some("peer") => Some(ClientIp::Peer),
        Some("forwarded") => Some(ClientIp::LastForwardedFor),
        Some("off") => None,
        Some(other) => {
            return Err(format!("INTEGRATION_AUDIT={other:?}: use peer, forwarded or off").into())
        }
    };
    let mail = match env_str("INTEGRATION_ISSUER") {
        Some(issuer) => Some(MailSettings {
            issuer,
            client_id: env_str("INTEGRATION_CLIENT_ID")
                .ok_or("INTEGRATION_ISSUER is set: set INTEGRATION_CLIENT_ID too")?,
            client_secret: env_str("INTEGRATION_CLIENT_SECRET"),
            redirect_uri,
            audit,
        }),
        None => issuer.as_ref().ok().map(|issuer| {
            let (client_id, client_secret) = if local_idp {
                (
                    LOCAL_MAIL_CLIENT.0.to_owned(),
                    Some(LOCAL_MAIL_CLIENT.1.to_owned()),
                )
            } else {
                (settings.client_id.clone(), settings.client_secret.clone())
            };
            MailSettings {
                issuer: issuer.clone(),
                client_id,
                client_secret,
                redirect_uri,
                audit,
            }
        }),
    };
    let Some(mail) = mail else {
        let why = "no integration provider: set INTEGRATION_ISSUER".to_owned();
        return Ok((Vault(Arc::new(RwLock::new(Err(why)))), Vec::new()));
    };
    let vault = Vault(Arc::new(RwLock::new(Err(
        "the token vault is not ready yet".to_owned(),
    ))));
    let keys = settings.token_keys.clone();
    let mut tasks = vec![tokio::spawn(vault_until_ready(
        vault.clone(),
        mail,
        store.clone(),
        keys,
    ))];
    if settings.poll_secs > 0 {
        let every = Duration::from_secs(settings.poll_secs);
        tasks.push(tokio::spawn(poll_connections(vault.clone(), every)));
    }
    Ok((vault, tasks))
}

/// The demo's routes; `/me` and the integrations' pages need a login.
fn router(state: AppState) -> Router {
    let protected = Router::new()
        .route("/me", get(me))
        .route("/integrations", get(integrations))
        .route("/integrations/{name}/check", get(integration_check))
        .route(
            "/integrations/{name}/disconnect",
            post(integration_disconnect),
        );
    let (login_routes, protected) = match &state.login {
        Ok(providers) => (
            providers.routes(),
            protected
                .route_layer(RequireLoginLayer::any(providers))
                .route_layer(middleware::map_response(explain_unavailable)),
        ),
        Err(why) => {
            let off = login_off(why.clone());
            (
                Router::new()
                    .route("/auth/login", get(off.clone()))
                    .route("/auth/callback", get(off.clone()))
                    .route("/auth/logout", post(off.clone()))
                    .route("/auth/backchannel-logout", post(off.clone())),
                protected.route_layer(middleware::from_fn(move |_: Request, _: Next| off())),
            )
        }
    };
    Router::new()
        .route("/", get(index))
        .route("/healthz", get(healthz))
        .route("/counter", get(counter))
        .route("/peek", get(peek))
        .route("/kv", get(kv_all))
        .route("/kv/{key}", put(kv_put))
        .route("/integrations/{name}/connect", get(integration_connect))
        .route("/integrations/{name}/callback", get(integration_callback))
        .merge(login_routes)
        .merge(protected)
        .with_state(state)
}

/// The guard answers 503 with an empty body while the provider is not
/// discovered; the demo's API clients get the reason in JSON, as from
/// `/auth/*`.
async fn explain_unavailable(response: Response) -> Response {
    match response.extensions().get::<Rejection>() {
        Some(r) if r.kind() == RejectionKind::LoginUnavailable => {
            let mut explained = unavailable("login_unavailable", &r.to_string());
            explained.headers_mut().extend(
                response
                    .headers()
                    .get(header::RETRY_AFTER)
                    .map(|v| (header::RETRY_AFTER, v.clone())),
            );
            explained
        }
        _ => response,
    }
}

/// With login off: the 503 that `/auth/*` and `/me` answer, with why.
fn login_off(
    why: String,
) -> impl Fn() -> std::future::Ready<Response> + Clone + Send + Sync + 'static {
    move || std::future::ready(unavailable("login_unavailable", &why))
}

/// The database URL (one host or several, TLS parameters) with the pool
/// settings and the password file of the environment.
fn connect_options(url: &str) -> Result<PgConnect, Box<dyn std::error::Error>> {
    let secs = |name: &str, default: u64| -> Result<Option<Duration>, String> {
        let secs: u64 = env_or(name, default)?;
        Ok((secs > 0).then(|| Duration::from_secs(secs)))
    };
    let mut connect = PgConnect::from_url(url)?
        .with_max_connections(env_or("DB_POOL_SIZE", 10)?)
        .with_max_lifetime(secs("DB_MAX_LIFETIME_SECS", 1800)?)
        .with_idle_timeout(secs("DB_IDLE_TIMEOUT_SECS", 600)?);
    if let Some(acquire) = env_opt::<f64>("DB_ACQUIRE_TIMEOUT_SECS")? {
        connect = connect.with_acquire_timeout(Duration::from_secs_f64(acquire.max(0.01)));
    }
    if let Some(file) = env_str("DB_PASSWORD_FILE") {
        // Read for each new connection: a rotated password (Vault agent, a
        // Kubernetes secret) is picked up without a restart.
        connect = connect.with_password_provider(move || {
            let file = file.clone();
            async move {
                tokio::fs::read_to_string(&file)
                    .await
                    .map(|p| p.trim_end_matches(['\r', '\n']).to_owned())
            }
        });
    }
    Ok(connect)
}

fn is_loopback(url: &Url) -> bool {
    match url.host() {
        Some(Host::Domain(d)) => d == "localhost" || d.ends_with(".localhost"),
        Some(Host::Ipv4(ip)) => ip.is_loopback(),
        Some(Host::Ipv6(ip)) => ip.is_loopback(),
        None => false,
    }
}

/// Ctrl-C or SIGTERM: either way the throwaway cluster, if any, is removed.
async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {}
        () = term => {}
    }
    tracing::info!("shutting down");
}

async fn index() -> Html<&'static str> {
    Html(
        "<!doctype html><meta charset=utf-8><title>tower-pg-session demo</title>\
         <h1>tower-pg-session demo</h1>\
         <p><a href=\"/me\">/me</a> (logs you in first) · <a href=\"/counter\">/counter</a> · \
         <a href=\"/kv\">/kv</a></p>\
         <form method=post action=\"/auth/logout\"><button>Log out</button></form>",
    )
}

async fn healthz(State(state): State<AppState>) -> (StatusCode, Json<Value>) {
    match state.store.ping().await {
        Ok(()) => (StatusCode::OK, Json(json!({"status": "ok"}))),
        Err(e) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"status": "unavailable", "error": e.to_string()})),
        ),
    }
}

async fn counter(session: Session) -> Result<Json<Value>, SessionError> {
    let count: u64 = session.get("count").await?.unwrap_or(0) + 1;
    session.insert("count", &count).await?;
    Ok(Json(json!({ "count": count })))
}

async fn peek(session: Session) -> Result<Json<Value>, SessionError> {
    let count: u64 = session.get("count").await?.unwrap_or(0);
    Ok(Json(json!({ "count": count })))
}

/// Stores any JSON under any key but the reserved ones (the login's, and
/// Passport's next to Express): 403 and nothing stored for those.
async fn kv_put(session: Session, Path(key): Path<String>, Json(value): Json<Value>) -> Response {
    match session.insert(&key, &value).await {
        Ok(()) => StatusCode::NO_CONTENT.into_response(),
        Err(SessionError::ReservedKey { key }) => (
            StatusCode::FORBIDDEN,
            Json(json!({
                "error": "reserved_key",
                "error_description": format!("the key {key:?} is reserved for the login"),
            })),
        )
            .into_response(),
        Err(e) => e.into_response(),
    }
}

async fn kv_all(session: Session) -> Result<Json<Value>, SessionError> {
    Ok(Json(Value::Object(session.to_json().await?)))
}

fn wants_html(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| v.to_ascii_lowercase().contains("text/html"))
}

/// An error page for browsers, JSON for the rest.
fn auth_error(e: &AuthError, headers: &HeaderMap) -> Response {
    tracing::warn!(error = %e, "login or logout refused");
    e.to_response::<Body>(wants_html(headers))
}

#[derive(Deserialize)]
struct LoginParams {
    return_to: Option<String>,
}

async fn me(user: User) -> Json<Value> {
    Json(json!({
        "sub": user.sub(),
        "claims": user.claims(),
        "access_token_expires_at": user.access_token_expires_at(),
    }))
}

/// Starts connecting an account (logged-in users only): to the provider.
async fn integration_connect(
    State(state): State<AppState>,
    session: Session,
    Path(name): Path<String>,
    Query(params): Query<LoginParams>,
) -> Result<Response, Response> {
    let vault = state.vault.get().await?;
    match vault
        .connect(&session, &name, params.return_to.as_deref())
        .await
    {
        Ok(redirect) => Ok(redirect.into_response()),
        Err(e) => Err(vault_error(e)),
    }
}

/// The provider's answer: the tokens are stored, the browser sent back.
async fn integration_callback(
    State(state): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    session: Session,
    RawQuery(query): RawQuery,
) -> Result<Response, Response> {
    let vault = state.vault.get().await?;
    let connected = vault
        .connect_callback_audited(&session, query.as_deref(), &headers, Some(peer.ip()))
        .await;
    match connected {
        Ok((redirect, connected)) => {
            tracing::info!(integration = %connected.integration, "account connected");
            Ok(redirect.into_response())
        }
        Err(e) => Err(vault_error(e)),
    }
}

/// The logged-in user's connected accounts: metadata, never a token.
async fn integrations(State(state): State<AppState>, user: User) -> Result<Response, Response> {
    let vault = state.vault.get().await?;
    let list = vault.list(user.sub()).await.map_err(vault_error)?;
    let list: Vec<Value> = list
        .iter()
        .map(|c| {
            json!({
                "integration": c.integration,
                "expires_at": c.expires_at.map(|t| t.unix_timestamp()),
                "scopes": c.scopes,
                "last_refreshed_at": c.last_refreshed_at.map(|t| t.unix_timestamp()),
            })
        })
        .collect();
    Ok(Json(list).into_response())
}

/// Gets the token through the vault (refreshed when due) and says whether
/// it is valid and until when; the token itself never leaves the server.
async fn integration_check(
    State(state): State<AppState>,
    user: User,
    Path(name): Path<String>,
) -> Result<Response, Response> {
    let vault = state.vault.get().await?;
    let token = vault.get(user.sub(), &name).await.map_err(vault_error)?;
    Ok(Json(json!({
        "valid": true,
        "expires_at": token.expires_at().map(|t| t.unix_timestamp()),
    }))
    .into_response())
}

/// Forgets (and revokes) the account: same-origin requests only, as logout.
async fn integration_disconnect(
    State(state): State<AppState>,
    headers: HeaderMap,
    user: User,
    Path(name): Path<String>,
) -> Result<Response, Response> {
    let providers = state
        .login
        .as_ref()
        .map_err(|why| unavailable("login_unavailable", why))?;
    providers
        .default_provider()
        .check_same_origin(&headers)
        .map_err(|e| auth_error(&e, &headers))?;
    let vault = state.vault.get().await?;
    let removed = vault.remove(user.sub(), &name).await.map_err(vault_error)?;
    Ok(Json(json!({ "removed": removed })).into_response())
}

fn vault_error(e: VaultError) -> Response {
    tracing::warn!(error = %e, "integration request refused");
    e.into_response()
}
