//! [`TokenVault`]: the OAuth 2.0 tokens of the services your users connect
//! (mail, calendars, CRMs), per user and integration, sealed in Postgres and
//! refreshed once, from requests and background jobs alike.
//!
//! - **One table**, `oauth_tokens` by default, created when missing (safe for
//!   many instances starting at once), keyed by `(user_id, integration)`:
//!   the sealed access and refresh tokens, expiry, scopes, token type, a
//!   re-consent mark, and audit columns (`created_at`, `updated_at`,
//!   `last_used_at`, `last_refreshed_at`; with
//!   [`VaultConfig::with_connect_audit`], `connect_ip` and
//!   `connect_user_agent` of the client that connected the account). Columns
//!   later versions add are added to an existing table at start-up, nullable.
//! - **Connecting** an account from a logged-in session:
//!   [`TokenVault::connect`] and [`TokenVault::connect_callback`].
//! - **Sealed** with the crate's [`Keyring`]: each token is bound to its user,
//!   integration and field, so a value copied to another row or column does
//!   not open ([`VaultError::Unreadable`]; the vault fails closed and logs it).
//! - **Refreshed before use**: [`TokenVault::get`] refreshes when the access
//!   token expires within [`VaultConfig::with_refresh_before`] (5 minutes by
//!   default). One refresh at a time per user and integration, across every
//!   instance and job: the refresh holds the row lock (`SELECT … FOR UPDATE`),
//!   reads the row again, and uses a token another one refreshed meanwhile.
//!   It runs in a task of its own, so a dropped caller never leaves a
//!   transaction open on a pooled connection nor loses a rotated refresh
//!   token.
//! - **Failures are typed**: `invalid_grant` marks the connection as needing
//!   the user's consent again ([`VaultError::NeedsReconsent`]) and later calls
//!   fail fast without calling the provider; a provider that is down yields
//!   the old access token while it is still valid, and
//!   [`VaultError::ProviderUnavailable`] after.
//!
//! ```no_run
//! use tower_pg_session::{crypto::Keyring, vault::{Integration, Tokens, TokenVault, VaultConfig}, PgStore};
//!
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! let store = PgStore::connect("postgres://postgres@127.0.0.1/postgres").await?;
//! let keys = Keyring::from_base64_list(&std::env::var("TOKEN_KEYS")?)?;
//! let mail = Integration::new("mail", "https://oauth2.googleapis.com/token", "client-id")?
//!     .with_client_secret(&std::env::var("MAIL_CLIENT_SECRET")?);
//! let vault = TokenVault::new(&store, keys, VaultConfig::new().with_integration(mail)).await?;
//!
//! // After the user connected the account (a code exchange):
//! let tokens = Tokens::new("ya29.access".into())
//!     .with_refresh_token("1//refresh".into())
//!     .with_expires_in(std::time::Duration::from_secs(3600));
//! vault.store("user-42", "mail", tokens).await?;
//!
//! // Later, in a request or a background job with only the user's id:
//! let token = vault.get("user-42", "mail").await?;
//! let _header = format!("Bearer {}", token.secret());
//! # Ok(()) }
//! ```

mod connect;
mod error;
mod gauges;
mod import;
mod integration;
mod reseal;
pub(crate) mod schema;
mod sql;
mod tokens;

use std::{
    collections::HashMap,
    fmt,
    sync::{Arc, Mutex, PoisonError},
    time::{Duration, Instant},
};

use openidconnect::reqwest;
use time::OffsetDateTime;
use tracing::Instrument;

pub use self::{
    connect::{ClientIp, Connected},
    error::VaultError,
    gauges::TokenCount,
    import::{ImportOutcome, ImportSource},
    integration::{ClientAuth, Integration},
    reseal::{KeyUsage, ResealOutcome},
    tokens::{AccessToken, Connection, Tokens},
};
use self::{
    integration::check_name,
    sql::{Audit, Sealed, Sql, Write},
};
use crate::{
    crypto::{Aad, Keyring},
    error::ConfigError,
    log_safe::untrusted,
    metrics,
    store::{detached, PgStore, StoreError},
};

/// Field names bound into each sealed value's associated data.
const ACCESS: &str = "vault.access_token";
const REFRESH: &str = "vault.refresh_token";
/// User ids longer than this are refused.
const MAX_USER_ID: usize = 512;

/// Held while one task of this process refreshes a (user, integration).
type RefreshLock = Arc<tokio::sync::Mutex<()>>;

/// How a [`TokenVault`] is set up: its table, integrations and limits.
#[derive(Debug, Clone)]
pub struct VaultConfig {
    schema: Option<String>,
    table: String,
    integrations: Vec<Integration>,
    refresh_before: Duration,
    http_timeout: Duration,
    max_token_bytes: usize,
    failure_backoff: Duration,
    lock_timeout: Option<Duration>,
    login_keys: Option<Keyring>,
    connect_ttl: Duration,
    connect_audit: Option<ClientIp>,
}

impl Default for VaultConfig {
    fn default() -> Self {
        Self::new()
    }
}

impl VaultConfig {
    /// Table `oauth_tokens` in the search path, no integrations, refresh 5
    /// minutes before expiry, 10 s per token request, tokens up to 16 KiB.
    #[must_use]
    pub fn new() -> Self {
        Self {
            schema: None,
            table: schema::DEFAULT_TABLE.to_owned(),
            integrations: Vec::new(),
            refresh_before: Duration::from_secs(300),
            http_timeout: Duration::from_secs(10),
            max_token_bytes: 16 * 1024,
            failure_backoff: Duration::from_secs(10),
            lock_timeout: None,
            login_keys: None,
            connect_ttl: Duration::from_secs(600),
            connect_audit: None,
        }
    }

    /// The schema of the table (created when missing).
    ///
    /// # Errors
    /// [`ConfigError::InvalidIdentifier`] for a name SQL cannot take as is.
    pub fn with_schema_name(mut self, name: &str) -> Result<Self, ConfigError> {
        schema::table_name(Some(name), &self.table)?;
        self.schema = Some(name.to_owned());
        Ok(self)
    }

    /// The table's name (default `oauth_tokens`).
    ///
    /// # Errors
    /// [`ConfigError::InvalidIdentifier`] for a name SQL cannot take as is.
    pub fn with_table_name(mut self, name: &str) -> Result<Self, ConfigError> {
        schema::table_name(None, name)?;
        name.clone_into(&mut self.table);
        Ok(self)
    }

    /// Adds an integration; one of the same name is replaced.
    #[must_use]
    pub fn with_integration(mut self, integration: Integration) -> Self {
        self.integrations.retain(|i| i.name() != integration.name());
        self.integrations.push(integration);
        self
    }

    /// Refresh when the access token expires within this (default 5 min).
    #[must_use]
    pub fn with_refresh_before(mut self, margin: Duration) -> Self {
        self.refresh_before = margin;
        self
    }

    /// The longest a token request may take (default 10 s).
    #[must_use]
    pub fn with_http_timeout(mut self, timeout: Duration) -> Self {
        self.http_timeout = timeout;
        self
    }

    /// After a refresh failed (provider down, refused, unusable answer),
    /// how long this process leaves the provider alone for that user and
    /// integration (default 10 s): meanwhile `get` returns the old token
    /// while it is valid, or the same error, without calling the provider.
    #[must_use]
    pub fn with_failure_backoff(mut self, pause: Duration) -> Self {
        self.failure_backoff = pause;
        self
    }

    /// How long a refresh waits for the row while another instance or job
    /// refreshes it (default: twice the HTTP timeout plus 5 s). After that
    /// the still-valid old token is used, or the error returned.
    #[must_use]
    pub fn with_lock_timeout(mut self, wait: Duration) -> Self {
        self.lock_timeout = Some(wait);
        self
    }

    /// The keyring of the login guard ([`OidcConfig`](crate::oidc::OidcConfig)),
    /// which [`TokenVault::connect`] opens the session's login record with
    /// to learn the user (default: the vault's own keyring, when the login
    /// and the vault share their keys).
    #[must_use]
    pub fn with_login_keyring(mut self, keys: Keyring) -> Self {
        self.login_keys = Some(keys);
        self
    }

    /// How long a started connection may take until its callback (default
    /// 10 minutes).
    #[must_use]
    pub fn with_connect_ttl(mut self, ttl: Duration) -> Self {
        self.connect_ttl = ttl;
        self
    }

    /// Records who connected an account: the client's IP address, taken
    /// from `ip`, and its `User-Agent` (at most 512 bytes), in the nullable
    /// columns `connect_ip` and `connect_user_agent`, written by
    /// [`TokenVault::connect_callback_audited`]. Off by default: these are
    /// personal data; turn the audit on where your privacy notice covers it.
    ///
    /// ```
    /// use tower_pg_session::vault::{ClientIp, VaultConfig};
    ///
    /// // Behind one reverse proxy that appends the client to X-Forwarded-For:
    /// let config = VaultConfig::new()
    ///     .with_connect_audit(ClientIp::LastForwardedFor);
    /// ```
    #[must_use]
    pub fn with_connect_audit(mut self, ip: ClientIp) -> Self {
        self.connect_audit = Some(ip);
        self
    }

    /// The longest token accepted, in bytes (default 16 KiB).
    #[must_use]
    pub fn with_max_token_bytes(mut self, limit: usize) -> Self {
        self.max_token_bytes = limit;
        self
    }
}

/// Sealed OAuth tokens per user and integration. Cheap to clone; clones
/// share the pool, the HTTP client and the in-process refresh locks. See the
/// [module docs](self).
#[derive(Clone)]
pub struct TokenVault {
    inner: Arc<Inner>,
}

struct Inner {
    pool: sqlx::PgPool,
    sql: Sql,
    keyring: Keyring,
    integrations: HashMap<String, Integration>,
    http: reqwest::Client,
    refresh_before: time::Duration,
    lock_timeout: Duration,
    max_token_bytes: usize,
    /// Refreshes waiting in this process queue here rather than each
    /// holding a pooled connection while waiting for the row lock.
    local: Mutex<HashMap<(String, String), RefreshLock>>,
    failure_backoff: Duration,
    /// Opens the session's login record (the user who connects).
    login_keys: Keyring,
    connect_ttl: Duration,
    connect_audit: Option<ClientIp>,
    /// The last failed refresh per (user, integration), while it is recent.
    failures: Mutex<HashMap<(String, String), Failure>>,
}

/// A refresh that failed recently, remembered so that an outage costs one
/// call at the provider per pause, not one per `get`.
struct Failure {
    at: Instant,
    error: VaultError,
}

impl fmt::Debug for TokenVault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TokenVault")
            .field("sql", &self.inner.sql)
            .field("keyring", &self.inner.keyring)
            .field("integrations", &self.inner.integrations.values())
            .finish_non_exhaustive()
    }
}

impl TokenVault {
    /// A vault on `store`'s pool, sealing with `keyring`; creates its table
    /// when missing.
    ///
    /// # Errors
    /// [`VaultError::Store`] when the table cannot be created or the
    /// configuration names an invalid table, [`VaultError::ProviderUnavailable`]
    /// when no HTTP client can be built.
    pub async fn new(
        store: &PgStore,
        keyring: Keyring,
        config: VaultConfig,
    ) -> Result<Self, VaultError> {
        let name = schema::table_name(config.schema.as_deref(), &config.table)
            .map_err(StoreError::from)?;
        let pool = store.pool().clone();
        schema::prepare(&pool, &name, store.pooler()).await?;
        // No redirects (a token endpoint never needs one, and following them
        // would send the refresh token elsewhere); a stalled provider costs
        // at most the timeout.
        let http = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .connect_timeout(config.http_timeout.min(Duration::from_secs(5)))
            .timeout(config.http_timeout)
            .build()
            .map_err(|e| VaultError::ProviderUnavailable {
                integration: String::new(),
                detail: e.to_string(),
            })?;
        let login_keys = config.login_keys.unwrap_or_else(|| keyring.clone());
        Ok(Self {
            inner: Arc::new(Inner {
                pool,
                sql: Sql::new(name.qualified(), store.pooler()),
                keyring,
                integrations: config
                    .integrations
                    .into_iter()
                    .map(|i| (i.name().to_owned(), i))
                    .collect(),
                http,
                refresh_before: time::Duration::try_from(config.refresh_before)
                    .unwrap_or(time::Duration::MAX),
                lock_timeout: config
                    .lock_timeout
                    .unwrap_or(config.http_timeout.saturating_mul(2) + Duration::from_secs(5)),
                max_token_bytes: config.max_token_bytes,
                local: Mutex::new(HashMap::new()),
                failure_backoff: config.failure_backoff,
                login_keys,
                connect_ttl: config.connect_ttl,
                connect_audit: config.connect_audit,
                failures: Mutex::new(HashMap::new()),
            }),
        })
    }

    /// Keeps `tokens` for `user` and `integration`, replacing what was there
    /// (and clearing a re-consent mark).
    ///
    /// # Errors
    /// [`VaultError::UnknownIntegration`], [`VaultError::InvalidInput`] for
    /// an unusable user id, [`VaultError::TokenTooLarge`], [`VaultError::Store`].
    pub async fn store(
        &self,
        user: &str,
        integration: &str,
        tokens: Tokens,
    ) -> Result<(), VaultError> {
        self.store_with(user, integration, tokens, None).await
    }

    /// [`store`](Self::store), recording the connecting client when given.
    async fn store_with(
        &self,
        user: &str,
        integration: &str,
        tokens: Tokens,
        audit: Option<&Audit>,
    ) -> Result<(), VaultError> {
        let integration = self.integration(integration)?.name();
        check_user(user)?;
        let limit = self.inner.max_token_bytes;
        check_token(&tokens.access_token, limit)?;
        if let Some(rt) = &tokens.refresh_token {
            check_token(rt, limit)?;
        }
        let access = self.seal(user, integration, ACCESS, &tokens.access_token);
        let refresh = tokens
            .refresh_token
            .as_ref()
            .map(|rt| self.seal(user, integration, REFRESH, rt));
        let write = Write {
            access_token: &access,
            refresh_token: refresh.as_deref(),
            expires_at: tokens.expires_at,
            scopes: &tokens.scopes,
            token_type: &tokens.token_type,
        };
        self.inner
            .sql
            .upsert(&self.inner.pool, user, integration, &write, audit)
            .instrument(tracing::debug_span!("vault_store", integration))
            .await?;
        Ok(())
    }

    /// A valid access token for `user` at `integration`, refreshed first
    /// when it expires within the configured margin.
    ///
    /// # Errors
    /// [`VaultError::NotConnected`], [`VaultError::NeedsReconsent`] (at once,
    /// without calling the provider, once a refresh was refused),
    /// [`VaultError::ProviderUnavailable`], [`VaultError::TokenRequestRejected`]
    /// or [`VaultError::InvalidTokenResponse`] when a due refresh failed and
    /// the old token has expired, [`VaultError::Unreadable`] when a stored
    /// token does not open, [`VaultError::Store`].
    pub async fn get(&self, user: &str, integration: &str) -> Result<AccessToken, VaultError> {
        let integration = self.integration(integration)?.name().to_owned();
        check_user(user)?;
        let span = tracing::debug_span!("vault_get", integration = %integration);
        async {
            let row = self
                .inner
                .sql
                .read(&self.inner.pool, user, &integration)
                .await?
                .ok_or_else(|| VaultError::NotConnected {
                    integration: integration.clone(),
                })?;
            if row.needs_reconsent {
                return Err(VaultError::NeedsReconsent { integration });
            }
            if !self.due(&row) {
                return self.open_row(user, &integration, &row);
            }
            let (this, owner, name) = (self.clone(), user.to_owned(), integration.clone());
            let refreshed = detached(
                async move { this.refresh_locked(&owner, &name).await }
                    .instrument(tracing::Span::current()),
            )
            .await
            .unwrap_or(Err(VaultError::Interrupted));
            match refreshed {
                // The database (a row held elsewhere, no connection) or the
                // task failed, not the provider: the token read before is
                // as good as ever while it is valid.
                Err(e @ (VaultError::Store(_) | VaultError::Interrupted)) => {
                    tracing::warn!(integration = %integration, error = %e, "token refresh could not run");
                    still_valid(self.open_row(user, &integration, &row)?, e)
                }
                other => other,
            }
        }
        .instrument(span)
        .await
    }

    /// Forgets `user`'s tokens for `integration`, and revokes the refresh
    /// token at the provider when the integration has a revocation
    /// endpoint; `true` when there were any.
    ///
    /// # Errors
    /// [`VaultError::Store`], [`VaultError::InvalidInput`].
    pub async fn remove(&self, user: &str, integration: &str) -> Result<bool, VaultError> {
        check_user(user)?;
        check_name(integration)?;
        let (this, user, name) = (self.clone(), user.to_owned(), integration.to_owned());
        // Once deleted, the revocation must still happen if the caller goes.
        detached(async move {
            let Some(sealed) = this
                .inner
                .sql
                .remove(&this.inner.pool, &user, &name)
                .await?
            else {
                return Ok(false);
            };
            this.revoke(&user, &name, sealed.as_deref()).await;
            Ok(true)
        })
        .await
        .unwrap_or(Err(VaultError::Interrupted))
    }

    /// Forgets every token of `user` (erasure), revoking refresh tokens as
    /// [`remove`](Self::remove) does; returns how many integrations were
    /// connected.
    ///
    /// # Errors
    /// [`VaultError::Store`], [`VaultError::InvalidInput`].
    pub async fn remove_all(&self, user: &str) -> Result<u64, VaultError> {
        check_user(user)?;
        let (this, user) = (self.clone(), user.to_owned());
        detached(async move {
            let removed = this.inner.sql.remove_all(&this.inner.pool, &user).await?;
            for (name, sealed) in &removed {
                this.revoke(&user, name, sealed.as_deref()).await;
            }
            Ok(removed.len() as u64)
        })
        .await
        .unwrap_or(Err(VaultError::Interrupted))
    }

    /// Revokes a removed connection's refresh token where possible.
    async fn revoke(&self, user: &str, name: &str, sealed: Option<&str>) {
        let (Some(sealed), Ok(integration)) = (sealed, self.integration(name)) else {
            return;
        };
        if let Ok(rt) = self.open(user, name, REFRESH, sealed) {
            integration.revoke(&self.inner.http, &rt).await;
        }
    }

    /// What `user` has connected: metadata only, never a token.
    ///
    /// # Errors
    /// [`VaultError::Store`], [`VaultError::InvalidInput`].
    pub async fn list(&self, user: &str) -> Result<Vec<Connection>, VaultError> {
        check_user(user)?;
        Ok(self.inner.sql.list(&self.inner.pool, user).await?)
    }

    /// Every user's connections, a page at a time, for background jobs:
    /// at most `limit` (1 to 1000) `(user, connection)` pairs after the
    /// `(user, integration)` of the last one of the page before (`None`
    /// for the first page); fewer than `limit` means the last page.
    ///
    /// ```no_run
    /// # async fn job(vault: tower_pg_session::vault::TokenVault) -> Result<(), Box<dyn std::error::Error>> {
    /// let mut after: Option<(String, String)> = None;
    /// loop {
    ///     let key = after.as_ref().map(|(u, i)| (u.as_str(), i.as_str()));
    ///     let page = vault.list_all(key, 100).await?;
    ///     for (user, connection) in &page {
    ///         let _token = vault.get(user, &connection.integration).await;
    ///     }
    ///     match page.last() {
    ///         Some((user, c)) if page.len() == 100 => after = Some((user.clone(), c.integration.clone())),
    ///         _ => break,
    ///     }
    /// }
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    /// [`VaultError::Store`].
    pub async fn list_all(
        &self,
        after: Option<(&str, &str)>,
        limit: usize,
    ) -> Result<Vec<(String, Connection)>, VaultError> {
        let limit = limit.clamp(1, 1000) as i64;
        Ok(self
            .inner
            .sql
            .list_all(&self.inner.pool, after, limit)
            .await?)
    }

    fn integration(&self, name: &str) -> Result<&Integration, VaultError> {
        self.inner
            .integrations
            .get(name)
            .ok_or_else(|| VaultError::UnknownIntegration(untrusted(name).to_string()))
    }

    /// Whether the access token expires within the margin.
    fn due(&self, row: &Sealed) -> bool {
        row.expires_at.is_some_and(|at| {
            OffsetDateTime::now_utc().saturating_add(self.inner.refresh_before) >= at
        })
    }

    /// Runs in a task of its own (see [`detached`]): the row lock, the
    /// provider's answer and the write either all happen or none is kept.
    async fn refresh_locked(&self, user: &str, name: &str) -> Result<AccessToken, VaultError> {
        let local = self.local_lock(user, name);
        let _queued = local.lock().await;
        let mut tx = self.inner.pool.begin().await?;
        self.inner
            .sql
            .lock_timeout(&mut tx, self.lock_wait())
            .await?;
        let row = self
            .inner
            .sql
            .lock(&mut tx, user, name)
            .await?
            .ok_or_else(|| VaultError::NotConnected {
                integration: name.to_owned(),
            })?;
        if row.needs_reconsent {
            return Err(VaultError::NeedsReconsent {
                integration: name.to_owned(),
            });
        }
        let old = self.open_row(user, name, &row)?;
        if !self.due(&row) {
            // Another instance or job refreshed while this one waited.
            tx.rollback().await?;
            return Ok(old);
        }
        if let Some(error) = self.recent_failure(user, name) {
            tx.rollback().await?;
            return still_valid(old, error);
        }
        let Some(sealed_rt) = &row.refresh_token else {
            tx.rollback().await?;
            return still_valid(
                old,
                VaultError::NeedsReconsent {
                    integration: name.to_owned(),
                },
            );
        };
        let rt = self.open(user, name, REFRESH, sealed_rt)?;
        let integration = self.integration(name)?;
        let answer = integration
            .refresh(&self.inner.http, &rt, self.inner.max_token_bytes)
            .instrument(tracing::info_span!("vault_refresh", integration = name))
            .await;
        match answer {
            Ok(fresh) => {
                let token = self
                    .write_refreshed(&mut tx, user, name, &row, fresh)
                    .await?;
                tx.commit().await?;
                self.forget_failure(user, name);
                metrics::vault_refresh(name);
                tracing::debug!(integration = name, "access token refreshed");
                Ok(token)
            }
            Err(e @ VaultError::NeedsReconsent { .. }) => {
                self.inner.sql.needs_reconsent(&mut tx, user, name).await?;
                tx.commit().await?;
                metrics::vault_failure(name, e.reason());
                tracing::warn!(
                    integration = name,
                    user = %untrusted(user),
                    "the provider refused the refresh token; the user must connect again"
                );
                Err(e)
            }
            Err(e) => {
                tx.rollback().await?;
                metrics::vault_failure(name, e.reason());
                tracing::warn!(integration = name, error = %e, "token refresh failed");
                self.remember_failure(user, name, &e);
                still_valid(old, e)
            }
        }
    }

    async fn write_refreshed(
        &self,
        conn: &mut sqlx::PgConnection,
        user: &str,
        name: &str,
        row: &Sealed,
        fresh: Tokens,
    ) -> Result<AccessToken, VaultError> {
        let access = self.seal(user, name, ACCESS, &fresh.access_token);
        let refresh = fresh
            .refresh_token
            .as_ref()
            .map(|rt| self.seal(user, name, REFRESH, rt));
        let write = Write {
            access_token: &access,
            refresh_token: refresh.as_deref(),
            expires_at: fresh.expires_at,
            scopes: &fresh.scopes,
            token_type: &fresh.token_type,
        };
        self.inner.sql.refreshed(conn, user, name, &write).await?;
        let scopes = if fresh.scopes.is_empty() {
            row.scopes.clone()
        } else {
            fresh.scopes
        };
        Ok(AccessToken {
            secret: fresh.access_token,
            expires_at: fresh.expires_at,
            token_type: fresh.token_type,
            scopes,
        })
    }

    /// How long to wait for a row another refresh holds: longer than a
    /// refresh at the provider can take means the holder is stuck, so give
    /// up rather than pile up.
    fn lock_wait(&self) -> Duration {
        self.inner.lock_timeout
    }

    /// The error of a refresh of this (user, integration) that failed less
    /// than the backoff ago, rebuilt (the original stays for the next caller).
    fn recent_failure(&self, user: &str, name: &str) -> Option<VaultError> {
        let failures = self
            .inner
            .failures
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let failure = failures.get(&(user.to_owned(), name.to_owned()))?;
        if failure.at.elapsed() >= self.inner.failure_backoff {
            return None;
        }
        let integration = name.to_owned();
        Some(match &failure.error {
            VaultError::TokenRequestRejected { error, .. } => VaultError::TokenRequestRejected {
                integration,
                error: error.clone(),
            },
            VaultError::InvalidTokenResponse { detail, .. } => VaultError::InvalidTokenResponse {
                integration,
                detail: detail.clone(),
            },
            other => VaultError::ProviderUnavailable {
                integration,
                detail: format!(
                    "a refresh failed {} s ago: {other}",
                    failure.at.elapsed().as_secs()
                ),
            },
        })
    }

    fn remember_failure(&self, user: &str, name: &str, error: &VaultError) {
        let error = match error {
            VaultError::TokenRequestRejected { integration, error } => {
                VaultError::TokenRequestRejected {
                    integration: integration.clone(),
                    error: error.clone(),
                }
            }
            VaultError::InvalidTokenResponse {
                integration,
                detail,
            } => VaultError::InvalidTokenResponse {
                integration: integration.clone(),
                detail: detail.clone(),
            },
            VaultError::ProviderUnavailable {
                integration,
                detail,
            } => VaultError::ProviderUnavailable {
                integration: integration.clone(),
                detail: detail.clone(),
            },
            // Not the provider's doing: nothing to pause for.
            _ => return,
        };
        let mut failures = self
            .inner
            .failures
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let backoff = self.inner.failure_backoff;
        failures.retain(|_, f| f.at.elapsed() < backoff);
        failures.insert(
            (user.to_owned(), name.to_owned()),
            Failure {
                at: Instant::now(),
                error,
            },
        );
    }

    fn forget_failure(&self, user: &str, name: &str) {
        self.inner
            .failures
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&(user.to_owned(), name.to_owned()));
    }

    fn local_lock(&self, user: &str, name: &str) -> RefreshLock {
        let mut map = self
            .inner
            .local
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        // Entries nobody holds any more are dropped, so the map only ever
        // holds the refreshes in flight.
        map.retain(|_, lock| Arc::strong_count(lock) > 1);
        Arc::clone(map.entry((user.to_owned(), name.to_owned())).or_default())
    }

    fn open_row(&self, user: &str, name: &str, row: &Sealed) -> Result<AccessToken, VaultError> {
        Ok(AccessToken {
            secret: self.open(user, name, ACCESS, &row.access_token)?,
            expires_at: row.expires_at,
            token_type: row.token_type.clone(),
            scopes: row.scopes.clone(),
        })
    }

    fn seal(&self, user: &str, integration: &str, field: &str, token: &str) -> String {
        let row = row_binding(user, integration);
        self.inner.keyring.seal(
            token.as_bytes(),
            &Aad {
                session: &row,
                field,
            },
        )
    }

    /// Opens a stored token; one that does not open is never used.
    fn open(
        &self,
        user: &str,
        integration: &str,
        field: &str,
        sealed: &str,
    ) -> Result<zeroize::Zeroizing<String>, VaultError> {
        let row = row_binding(user, integration);
        let unreadable = || {
            metrics::vault_failure(integration, "unreadable");
            VaultError::Unreadable {
                integration: integration.to_owned(),
            }
        };
        let aad = Aad {
            session: &row,
            field,
        };
        let opened = self.inner.keyring.open(sealed, &aad).map_err(|e| {
            tracing::error!(
                integration,
                field,
                user = %untrusted(user),
                reason = e.reason(),
                "a stored token does not open; not using it"
            );
            unreadable()
        })?;
        let bytes = opened.into_plaintext();
        match std::str::from_utf8(&bytes) {
            Ok(s) => Ok(zeroize::Zeroizing::new(s.to_owned())),
            Err(_) => Err(unreadable()),
        }
    }
}

/// The old token when it is still valid (logged), else `error`.
fn still_valid(old: AccessToken, error: VaultError) -> Result<AccessToken, VaultError> {
    match old.expires_at {
        Some(at) if at > OffsetDateTime::now_utc() => {
            tracing::info!("using the current access token until it expires");
            Ok(old)
        }
        _ => Err(error),
    }
}

/// What a sealed token is bound to besides its field: the user's id is
/// length-prefixed so that no (user, integration) pair encodes like another.
fn row_binding(user: &str, integration: &str) -> String {
    format!("vault:{}:{user}:{integration}", user.len())
}

fn check_user(user: &str) -> Result<(), VaultError> {
    let bad = |reason| VaultError::InvalidInput {
        what: "user id",
        reason,
    };
    if user.is_empty() || user.len() > MAX_USER_ID {
        return Err(bad("must be 1 to 512 bytes"));
    }
    if user.contains('\0') {
        return Err(bad("must not contain NUL"));
    }
    Ok(())
}

pub(crate) fn check_token(token: &str, limit: usize) -> Result<(), VaultError> {
    if token.len() > limit {
        return Err(VaultError::TokenTooLarge {
            size: token.len(),
            limit,
        });
    }
    if token.is_empty() {
        return Err(VaultError::InvalidInput {
            what: "token",
            reason: "empty",
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn row_bindings_are_unambiguous() {
        assert_ne!(row_binding("a:1", "b"), row_binding("a", "1:b"));
        assert_ne!(row_binding("ab", "c"), row_binding("a", "bc"));
    }

    #[test]
    fn user_ids_and_tokens_are_checked() {
        assert!(check_user("user-42").is_ok());
        assert!(check_user("").is_err());
        assert!(check_user("a\0b").is_err());
        assert!(check_user(&"x".repeat(513)).is_err());
        assert!(check_token("t", 1).is_ok());
        assert!(matches!(
            check_token("tt", 1),
            Err(VaultError::TokenTooLarge { size: 2, limit: 1 })
        ));
    }
}
