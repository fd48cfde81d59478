//! [`PgStore`]: sessions in a Postgres table shaped like connect-pg-simple's.
//!
//! The table is `session(sid varchar PRIMARY KEY, sess json NOT NULL, expire
//! timestamp(6) NOT NULL)` with the index `IDX_session_expire`, so a table that
//! an Express app already uses works unchanged. [`PgStore::new`] creates it when
//! missing and adds three nullable columns that Node ignores (`created_at`,
//! `user_id`, `provider_sid`, each indexed where not null).
//!
//! Each operation the session layer needs is one statement:
//!
//! | operation | statement |
//! |---|---|
//! | load (and extend the idle expiry when it is due) | one `WITH … SELECT … UPDATE … RETURNING` for all the loads waiting at that moment |
//! | create | `INSERT … ON CONFLICT DO NOTHING` |
//! | save | `UPDATE … WHERE sid = $1 AND xmin = $2` (never re-creates a deleted row), for all the saves waiting at that moment |
//! | cycle the id | the same `UPDATE`, setting a new `sid` |
//! | destroy | `DELETE` |
//!
//! A save whose optimistic check fails (another request or instance wrote the
//! row since it was loaded) falls back to `SELECT … FOR UPDATE`, re-applies the
//! request's key-level changes to the fresh data, and writes once more.
//!
//! A statement waits for a row lock at most the pool's acquire timeout (set
//! in the statement itself, local to its transaction), and a transaction
//! starts where a dropped request cannot leave it open.
//!
//! ```no_run
//! # async fn run() -> Result<(), tower_pg_session::StoreError> {
//! use tower_pg_session::{PgStore, PgStoreConfig};
//!
//! let pool = sqlx::PgPool::connect("postgres://postgres@127.0.0.1/postgres").await?;
//! let config = PgStoreConfig::new().with_schema_name("auth")?.with_table_name("web_sessions")?;
//! let store = PgStore::new(pool, config).await?;
//! # Ok(()) }
//! ```

mod batch;
mod connect;
mod pooler;
mod prune;
#[cfg(feature = "oidc")]
mod reseal;
pub(crate) mod schema;
#[cfg(feature = "tower-sessions")]
mod tower_sessions;

use std::fmt;
use std::sync::{Arc, OnceLock};

use sqlx::{PgPool, Row};
use time::OffsetDateTime;

pub(crate) use self::batch::LoadPolicy;
pub use self::connect::{PgConnect, ProviderError, TargetSessionAttrs};
pub use self::pooler::Pooler;
pub use self::prune::{PruneConfig, PruneOutcome, Pruner};
use self::schema::{ExpireType, Ident, Layout, SessType, TableName};
use crate::error::ConfigError;

/// Errors from the store.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The database could not be reached when the store was created.
    #[error("cannot connect to the session database at {host}")]
    Connect {
        /// The hosts tried (`host:port`), each but the last with why it was
        /// not used (the last one's reason is the source); never the password.
        host: String,
        /// What the driver reported.
        #[source]
        source: sqlx::Error,
    },
    /// The database URL could not be parsed; it is not repeated, as it may hold a password.
    #[error("invalid database URL")]
    InvalidUrl,
    /// The database URL has a value this crate does not handle; the message
    /// names the parameter, never the URL.
    #[error("unsupported database URL: {0}")]
    UnsupportedUrl(&'static str),
    /// A store made by [`PgStore::connect_lazy`] has not reached its database
    /// yet (another request is trying right now).
    #[error("the session database has not answered yet")]
    NotReady,
    /// A query failed.
    #[error("session database error")]
    Database(#[from] sqlx::Error),
    /// The table does not exist and creating it was turned off.
    #[error("session table {0} does not exist")]
    MissingTable(String),
    /// The table exists but its columns cannot hold sessions.
    #[error("unusable session table: {0}")]
    Schema(String),
    /// The session data is larger than the configured limit.
    #[error("session data is {size} bytes, over the limit of {limit}")]
    TooLarge {
        /// Serialized size in bytes.
        size: usize,
        /// The configured limit in bytes.
        limit: usize,
    },
    /// A configuration value was rejected.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// A statement that served several requests at once failed; each of
    /// them reports the same error.
    #[error(transparent)]
    Shared(Arc<StoreError>),
}

impl StoreError {
    /// True when the database could not be reached or answered with a
    /// connection-level failure: a retry later may succeed.
    #[must_use]
    pub fn is_unavailable(&self) -> bool {
        match self {
            Self::Connect { .. } | Self::NotReady => true,
            Self::Shared(e) => e.is_unavailable(),
            Self::Database(e) => {
                matches!(
                    e,
                    sqlx::Error::Io(_)
                        | sqlx::Error::PoolTimedOut
                        | sqlx::Error::PoolClosed
                        | sqlx::Error::Tls(_)
                        | sqlx::Error::Protocol(_)
                        | sqlx::Error::WorkerCrashed
                ) || matches!(e, sqlx::Error::Database(d) if d.code().is_some_and(|c| c.starts_with("08") || c.starts_with("57P")))
                    || self.is_read_only()
            }
            _ => false,
        }
    }

    /// The server refused a write as read-only (SQLSTATE 25006): a standby,
    /// or a primary demoted meanwhile.
    pub(crate) fn is_read_only(&self) -> bool {
        self.has_code(|c| c == "25006")
    }

    /// The server refused the credentials (SQLSTATE class 28).
    pub(crate) fn is_auth_failure(&self) -> bool {
        self.has_code(|c| c.starts_with("28"))
    }

    fn has_code(&self, wanted: impl Fn(&str) -> bool) -> bool {
        match self {
            Self::Shared(e) => e.has_code(wanted),
            Self::Database(sqlx::Error::Database(d))
            | Self::Connect {
                source: sqlx::Error::Database(d),
                ..
            } => d.code().is_some_and(|c| wanted(&c)),
            _ => false,
        }
    }
}

impl StoreError {
    /// The connection failed under the statement (not the database refusing
    /// it, nor the pool running dry): another connection may succeed.
    pub(crate) fn is_broken_connection(&self) -> bool {
        matches!(
            self,
            Self::Database(sqlx::Error::Io(_) | sqlx::Error::Protocol(_))
        ) || matches!(self, Self::Database(sqlx::Error::Database(d)) if d.code().is_some_and(|c| c.starts_with("57P")))
    }
}

/// Where and how [`PgStore`] keeps its table.
#[derive(Debug, Clone)]
pub struct PgStoreConfig {
    schema: Option<Ident>,
    table: Ident,
    create_table: bool,
    timestamp_zone: Option<String>,
    load_slots: Option<usize>,
    pooler: Pooler,
}

impl Default for PgStoreConfig {
    fn default() -> Self {
        Self::new()
    }
}

impl PgStoreConfig {
    /// Table `session` in the connection's search path, created when missing.
    pub fn new() -> Self {
        Self {
            schema: None,
            table: Ident::new("session").unwrap_or_else(|_| unreachable!()),
            create_table: true,
            timestamp_zone: None,
            load_slots: None,
            pooler: Pooler::Direct,
        }
    }

    /// Puts the table in this schema (created when missing).
    ///
    /// ```
    /// # use tower_pg_session::PgStoreConfig;
    /// assert!(PgStoreConfig::new().with_schema_name("auth").is_ok());
    /// assert!(PgStoreConfig::new().with_schema_name("x; drop table y").is_err());
    /// ```
    ///
    /// # Errors
    /// [`ConfigError::InvalidIdentifier`] unless the name is 1–63 ASCII letters,
    /// digits or `_`, not starting with a digit.
    pub fn with_schema_name(mut self, name: &str) -> Result<Self, ConfigError> {
        self.schema = Some(Ident::new(name)?);
        Ok(self)
    }

    /// Names the table (default `session`, as connect-pg-simple).
    ///
    /// ```
    /// # use tower_pg_session::PgStoreConfig;
    /// assert!(PgStoreConfig::new().with_table_name("web_sessions").is_ok());
    /// assert!(PgStoreConfig::new().with_table_name("").is_err());
    /// ```
    ///
    /// # Errors
    /// [`ConfigError::InvalidIdentifier`], as for [`Self::with_schema_name`].
    pub fn with_table_name(mut self, name: &str) -> Result<Self, ConfigError> {
        self.table = Ident::new(name)?;
        Ok(self)
    }

    /// Whether [`PgStore::new`] may create or upgrade the table (default
    /// `true`). Turn it off where the application's role has no DDL rights.
    ///
    /// ```
    /// # use tower_pg_session::PgStoreConfig;
    /// let config = PgStoreConfig::new().with_create_table(false);
    /// ```
    pub fn with_create_table(mut self, create: bool) -> Self {
        self.create_table = create;
        self
    }

    /// The zone in which a `timestamp without time zone` `expire` column is
    /// read and written. By default it is the zone a client that sets none
    /// (such as Node's `pg`) gets from the server, detected at start-up.
    ///
    /// ```
    /// # use tower_pg_session::PgStoreConfig;
    /// let config = PgStoreConfig::new().with_timestamp_zone("Europe/Berlin")?;
    /// # Ok::<(), tower_pg_session::ConfigError>(())
    /// ```
    ///
    /// # Errors
    /// [`ConfigError::InvalidTimeZone`] for names with characters no zone has.
    pub fn with_timestamp_zone(mut self, zone: &str) -> Result<Self, ConfigError> {
        schema::check_zone(zone)?;
        self.timestamp_zone = Some(zone.to_owned());
        Ok(self)
    }

    /// How many session load statements may run at once (default: 4, at
    /// most the pool's size).
    ///
    /// A load arriving while none runs is sent at once. One arriving while
    /// one runs waits for it to finish, and the next statement carries every
    /// waiting load: under load, one round trip serves many requests. Only
    /// when the running statements have gone 5 ms without one finishing does
    /// a waiting load open another, up to this number, so that one slow
    /// statement does not hold up every request.
    ///
    /// ```
    /// # use tower_pg_session::PgStoreConfig;
    /// let config = PgStoreConfig::new().with_load_concurrency(2);
    /// ```
    pub fn with_load_concurrency(mut self, loads: usize) -> Self {
        self.load_slots = Some(loads.max(1));
        self
    }

    /// How the pool reaches Postgres (default [`Pooler::Direct`]). Set
    /// [`Pooler::Transaction`] behind a pooler in transaction mode
    /// (PgBouncer `pool_mode = transaction`, RDS Proxy, Supavisor): the store
    /// then sends no named prepared statements, runs each statement in a
    /// transaction of its own, and holds no session-level state (its
    /// advisory locks are transaction-scoped). PgBouncer must also list
    /// `extra_float_digits` in `ignore_startup_parameters`, as sqlx sends it.
    ///
    /// ```
    /// # use tower_pg_session::{PgStoreConfig, Pooler};
    /// let config = PgStoreConfig::new().with_pooler(Pooler::Transaction);
    /// ```
    pub fn with_pooler(mut self, pooler: Pooler) -> Self {
        self.pooler = pooler;
        self
    }
}

/// Load statements that may run at once by default (see
/// [`PgStoreConfig::with_load_concurrency`]).
const DEFAULT_LOAD_SLOTS: usize = 4;

/// Sessions in Postgres. Cheap to clone; clones share the pool.
#[derive(Clone)]
pub struct PgStore {
    inner: Arc<Inner>,
}

struct Inner {
    pool: PgPool,
    name: TableName,
    /// The table's layout and statements, once the database has answered.
    ready: OnceLock<Ready>,
    /// One preparation at a time; others fail fast meanwhile.
    preparing: tokio::sync::Mutex<()>,
    create_table: bool,
    timestamp_zone: Option<String>,
    /// Present when the store made its own pool: follows the writable server.
    router: Option<Arc<connect::Router>>,
    pooler: Pooler,
    loads: batch::Batcher<batch::LoadJob>,
    updates: batch::Batcher<batch::UpdateJob>,
}

/// What preparing the table found, and the statements built from it.
struct Ready {
    layout: Layout,
    sql: Sql,
}

impl Drop for Inner {
    fn drop(&mut self) {
        if let Some(router) = &self.router {
            router.detach();
        }
    }
}

impl fmt::Debug for PgStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PgStore")
            .field("table", &self.inner.name.qualified())
            .field("layout", &self.inner.ready.get().map(|r| &r.layout))
            .finish_non_exhaustive()
    }
}

impl PgStore {
    /// Connects a pool to `url` and prepares the default table.
    ///
    /// # Errors
    /// [`StoreError::Connect`] naming the host when the database cannot be
    /// reached, [`StoreError::InvalidUrl`], or any error of [`Self::new`].
    pub async fn connect(url: &str) -> Result<Self, StoreError> {
        Self::connect_with(url, 10, PgStoreConfig::new()).await
    }

    /// Connects a pool of at most `max_connections` to `url` (one host or
    /// several: see [`PgConnect::from_url`]) and prepares the table described
    /// by `config`. The pool does not ping connections before each use (a
    /// round trip per request).
    ///
    /// # Errors
    /// As [`Self::connect`].
    pub async fn connect_with(
        url: &str,
        max_connections: u32,
        config: PgStoreConfig,
    ) -> Result<Self, StoreError> {
        let connect = PgConnect::from_url(url)?.with_max_connections(max_connections);
        Self::connect_to(connect, config).await
    }

    /// Connects as `connect` says (hosts, TLS, credentials, pool settings),
    /// to the first writable host, and prepares the table.
    ///
    /// # Errors
    /// [`StoreError::Connect`] naming each host tried and why it was not used
    /// (refused, read-only, TLS or credentials), or any error of [`Self::new`].
    pub async fn connect_to(connect: PgConnect, config: PgStoreConfig) -> Result<Self, StoreError> {
        let (pool, router) = connect.lazy_pool();
        let found = router.find().await;
        let store = Self::build(pool, config, Some(Arc::clone(&router)));
        let (index, options) = found?;
        router.use_target(index, options);
        store.ready().await?;
        Ok(store)
    }

    /// A store that starts without its database: nothing is sent until the
    /// first request, and the table is prepared on the first statement that
    /// reaches the database. Until then requests (and [`Self::ping`]) fail as
    /// unavailable ([`StoreError::is_unavailable`]), and keep trying.
    ///
    /// ```no_run
    /// # use tower_pg_session::{store::PgConnect, PgStore, PgStoreConfig};
    /// # fn run() -> Result<(), tower_pg_session::StoreError> {
    /// let store = PgStore::connect_lazy(
    ///     PgConnect::from_url("postgres://app@db-a,db-b/app?sslmode=verify-full")?,
    ///     PgStoreConfig::new(),
    /// );
    /// # Ok(()) }
    /// ```
    pub fn connect_lazy(connect: PgConnect, config: PgStoreConfig) -> Self {
        let (pool, router) = connect.lazy_pool();
        Self::build(pool, config, Some(router))
    }

    /// Prepares the table described by `config` on `pool`: creates it when
    /// missing (unless turned off), adds the optional columns, and detects
    /// whether `sess` is `json` or `jsonb` and `expire` has a time zone.
    ///
    /// Safe to run from many instances at once: DDL is serialised by an
    /// advisory lock and is idempotent.
    ///
    /// # Errors
    /// [`StoreError::Database`] when a query fails, [`StoreError::MissingTable`]
    /// or [`StoreError::Schema`] when the table cannot be used.
    pub async fn new(pool: PgPool, config: PgStoreConfig) -> Result<Self, StoreError> {
        let store = Self::build(pool, config, None);
        store.ready().await?;
        Ok(store)
    }

    fn build(pool: PgPool, config: PgStoreConfig, router: Option<Arc<connect::Router>>) -> Self {
        let name = TableName {
            schema: config.schema,
            table: config.table,
        };
        let slots = config.load_slots.unwrap_or_else(|| {
            DEFAULT_LOAD_SLOTS.min(pool.options().get_max_connections() as usize)
        });
        Self {
            inner: Arc::new(Inner {
                pool,
                name,
                ready: OnceLock::new(),
                preparing: tokio::sync::Mutex::new(()),
                create_table: config.create_table,
                timestamp_zone: config.timestamp_zone,
                router,
                pooler: config.pooler,
                loads: batch::Batcher::new(slots),
                updates: batch::Batcher::new(slots),
            }),
        }
    }

    /// The table's layout and statements, preparing the table on first use.
    async fn ready(&self) -> Result<&Ready, StoreError> {
        if let Some(ready) = self.inner.ready.get() {
            return Ok(ready);
        }
        // A request arriving while another prepares fails fast rather than
        // queueing behind a database that may not answer.
        let Ok(_preparing) = self.inner.preparing.try_lock() else {
            return Err(StoreError::NotReady);
        };
        if let Some(ready) = self.inner.ready.get() {
            return Ok(ready);
        }
        let inner = &self.inner;
        let layout = schema::prepare(
            &inner.pool,
            inner.pooler,
            &inner.name,
            inner.create_table,
            inner.timestamp_zone.as_deref(),
        )
        .await
        .inspect_err(|e| self.report(e))?;
        // A statement waits for a row lock no longer than a request waits
        // for a connection: a row held elsewhere costs that request the
        // unavailable status, not an unbounded wait.
        let lock_wait = inner.pool.options().get_acquire_timeout();
        let sql = Sql::new(&inner.name, &layout, lock_wait);
        tracing::debug!(table = %inner.name.qualified(), ?layout, "session store ready");
        Ok(inner.ready.get_or_init(|| Ready { layout, sql }))
    }

    /// Lets the store react to a failed statement: a broken connection, a
    /// read-only server or refused credentials make it look for the writable
    /// server again (when it made its own pool).
    pub(crate) fn report(&self, error: &StoreError) {
        if let Some(router) = &self.inner.router {
            router.report(error);
        }
    }

    /// The pool the store runs on.
    pub fn pool(&self) -> &PgPool {
        &self.inner.pool
    }

    /// How the pool reaches Postgres.
    pub fn pooler(&self) -> Pooler {
        self.inner.pooler
    }

    /// Whether statements may be prepared once per connection and kept.
    pub(crate) fn persistent(&self) -> bool {
        self.inner.pooler.persistent()
    }

    /// A connection for one statement, in a transaction of its own behind a
    /// transaction pooler.
    pub(crate) async fn conn(&self) -> Result<pooler::Conn, StoreError> {
        Ok(self.inner.pooler.conn(&self.inner.pool).await?)
    }

    /// The quoted, qualified table name, as it appears in the store's SQL.
    pub fn table_name(&self) -> String {
        self.inner.name.qualified()
    }

    /// Checks that the database answers.
    ///
    /// # Errors
    /// [`StoreError::Database`] when it does not.
    pub async fn ping(&self) -> Result<(), StoreError> {
        let answer = match self.ready().await {
            Ok(_) => {
                async {
                    let mut conn = self.conn().await?;
                    sqlx::query("SELECT 1")
                        .persistent(self.persistent())
                        .execute(conn.get())
                        .await?;
                    Ok(conn.done().await?)
                }
                .await
            }
            Err(e) => Err(e),
        };
        answer.inspect_err(|e| self.report(e))
    }

    /// SQL turning the timestamptz parameter `param` into the `expire` column's type.
    /// (Call [`Self::prepared`] first: before, `param` is returned unchanged.)
    pub(crate) fn instant_to_column(&self, param: &str) -> String {
        match self.inner.ready.get() {
            Some(ready) => to_col(&ready.layout.expire, param),
            None => param.to_owned(),
        }
    }

    /// SQL turning `column` (of the `expire` column's type) into a timestamptz.
    pub(crate) fn column_to_instant(&self, column: &str) -> String {
        match self.inner.ready.get() {
            Some(ready) => to_instant(&ready.layout.expire, column),
            None => column.to_owned(),
        }
    }

    /// Whether the table has the optional columns; before the table is
    /// prepared, whether preparing it will add them.
    pub(crate) fn has_extended_columns(&self) -> bool {
        self.inner
            .ready
            .get()
            .map_or(self.inner.create_table, |r| r.layout.extended)
    }

    /// Prepares the table unless done already.
    pub(crate) async fn prepared(&self) -> Result<(), StoreError> {
        self.ready().await.map(|_| ())
    }

    /// Loads the live rows under `keys`, extending the expiry of each in the
    /// same statement when its extension is due.
    async fn load_many(
        &self,
        keys: &[&str],
        at: &LoadParams,
    ) -> Result<Vec<(String, Loaded)>, StoreError> {
        let ready = self.ready().await?;
        let Some((index, keys)) = padded(keys) else {
            return Ok(Vec::new());
        };
        let statements = match at.absolute_secs {
            Some(_) => &ready.sql.load,
            None => &ready.sql.load_idle,
        };
        let Some(sql) = statements.get(index) else {
            return Ok(Vec::new());
        };
        let mut query = sqlx::query(sql)
            .persistent(self.persistent())
            .bind(at.extend_to)
            .bind(at.now)
            .bind(at.touch_before);
        if let Some(secs) = at.absolute_secs {
            query = query.bind(secs);
        }
        for key in keys {
            query = query.bind(*key);
        }
        let mut conn = self.conn().await?;
        let rows = query.fetch_all(conn.get()).await?;
        conn.done().await?;
        rows.iter()
            .map(|r| Ok((r.try_get(7)?, Loaded::from_row(r)?)))
            .collect()
    }

    /// Inserts a new row; `None` when the id is taken.
    pub(crate) async fn insert(
        &self,
        key: &str,
        row: &NewRow<'_>,
        now: OffsetDateTime,
    ) -> Result<Option<String>, StoreError> {
        let ready = self.ready().await?;
        // Safe to repeat: if the first attempt was written after all, the
        // second finds the id taken and the caller picks another (the first
        // row, which no cookie names, expires unused).
        retry_once(|| async {
            let mut q = sqlx::query_scalar(&ready.sql.insert)
                .persistent(self.persistent())
                .bind(key)
                .bind(row.sess)
                .bind(row.expire);
            if ready.layout.extended {
                q = q
                    .bind(now)
                    .bind(row.user_id)
                    .bind(row.provider_sid)
                    .bind(row.user_agent)
                    .bind(row.ip);
            }
            let mut conn = self.conn().await?;
            let inserted = q.fetch_optional(conn.get()).await?;
            conn.done().await?;
            Ok(inserted)
        })
        .await
    }

    /// Writes a row loaded as `version`, optionally under a new key. `None`
    /// when the row changed or went away since.
    pub(crate) async fn update(
        &self,
        key: &str,
        new_key: &str,
        version: &str,
        row: &NewRow<'_>,
        now: OffsetDateTime,
    ) -> Result<Option<String>, StoreError> {
        let ready = self.ready().await?;
        let mut q = sqlx::query_scalar(&ready.sql.update)
            .persistent(self.persistent())
            .bind(key)
            .bind(new_key)
            .bind(row.sess)
            .bind(row.expire)
            .bind(version)
            .bind(now);
        if ready.layout.extended {
            q = q.bind(row.user_id).bind(row.provider_sid);
        }
        let mut conn = self.conn().await?;
        let written = q.fetch_optional(conn.get()).await?;
        conn.done().await?;
        Ok(written)
    }

    /// Writes rows loaded at the given versions under their own keys, in one
    /// statement. Rows locked elsewhere are skipped: their saves conflict.
    /// Returns the keys written, each with its new version.
    async fn update_many(
        &self,
        jobs: &[&batch::UpdateJob],
    ) -> Result<Vec<(String, String)>, StoreError> {
        let ready = self.ready().await?;
        let (Some(first), Some((index, padded))) = (jobs.first(), padded(jobs)) else {
            return Ok(Vec::new());
        };
        let Some(sql) = ready.sql.update_many.get(index) else {
            return Ok(Vec::new());
        };
        let mut q = sqlx::query_as(sql)
            .persistent(self.persistent())
            .bind(first.now);
        // The same row twice (padding) is written once.
        for j in padded {
            q = q.bind(&j.key).bind(&j.sess).bind(j.expire).bind(&j.version);
            if ready.layout.extended {
                q = q.bind(&j.user_id).bind(&j.provider_sid);
            }
        }
        let mut conn = self.conn().await?;
        let written = q.fetch_all(conn.get()).await?;
        conn.done().await?;
        Ok(written)
    }

    /// Locks the live row for the rest of the returned transaction. `None`
    /// when there is no live row: it is then not re-created by anyone holding
    /// this result.
    pub(crate) async fn lock_row(
        &self,
        key: &str,
        now: OffsetDateTime,
    ) -> Result<Option<(Tx, Loaded)>, StoreError> {
        let ready = self.ready().await?;
        let mut tx = self.begin().await?;
        let row = sqlx::query(&ready.sql.select_for_update)
            .persistent(self.persistent())
            .bind(key)
            .bind(now)
            .fetch_optional(&mut *tx)
            .await?;
        match row {
            Some(row) => Ok(Some((tx, Loaded::from_row(&row)?))),
            None => {
                tx.rollback().await?;
                Ok(None)
            }
        }
    }

    /// Starts a transaction on a pooled connection.
    ///
    /// `BEGIN` runs in its own task: sqlx rolls a dropped transaction back
    /// only once `BEGIN` has completed, so a caller dropped while it is in
    /// flight would put the connection back in the pool inside a
    /// transaction (where the next requests' writes would sit uncommitted).
    /// A transaction whose caller is gone is dropped in that task, which
    /// rolls it back.
    pub(crate) async fn begin(&self) -> Result<Tx, StoreError> {
        let pool = self.inner.pool.clone();
        detached(retry_once(move || {
            let pool = pool.clone();
            async move { Ok(pool.begin().await?) }
        }))
        .await
        .ok_or(StoreError::Database(sqlx::Error::WorkerCrashed))?
    }

    /// Writes a row locked by [`Self::lock_row`] (optionally under a new key)
    /// and commits. Once called it completes even if the caller is dropped:
    /// what it writes was computed under the row lock, so it is never stale,
    /// and work done meanwhile (a token refresh) is not lost.
    pub(crate) async fn write_locked(
        &self,
        tx: Tx,
        key: &str,
        new_key: &str,
        row: &NewRow<'_>,
    ) -> Result<String, StoreError> {
        let store = self.clone();
        let (key, new_key) = (key.to_owned(), new_key.to_owned());
        let (sess, expire) = (row.sess.to_owned(), row.expire);
        let user_id = row.user_id.map(str::to_owned);
        let provider_sid = row.provider_sid.map(str::to_owned);
        detached(async move {
            let row = NewRow {
                sess: &sess,
                expire,
                user_id: user_id.as_deref(),
                provider_sid: provider_sid.as_deref(),
                user_agent: None,
                ip: None,
            };
            store.write_and_commit(tx, &key, &new_key, &row).await
        })
        .await
        .ok_or(StoreError::Database(sqlx::Error::WorkerCrashed))?
    }

    async fn write_and_commit(
        &self,
        mut tx: Tx,
        key: &str,
        new_key: &str,
        row: &NewRow<'_>,
    ) -> Result<String, StoreError> {
        let ready = self.ready().await?;
        let mut q = sqlx::query_scalar(&ready.sql.update_locked)
            .persistent(self.persistent())
            .bind(key)
            .bind(new_key)
            .bind(row.sess)
            .bind(row.expire);
        if ready.layout.extended {
            q = q.bind(row.user_id).bind(row.provider_sid);
        }
        let version: String = q.fetch_one(&mut *tx).await?;
        tx.commit().await?;
        Ok(version)
    }

    /// Deletes every session of `user` (the `user_id` column); returns how many.
    ///
    /// # Errors
    /// [`StoreError::Database`] when the statement fails;
    /// [`StoreError::Schema`] when the table lacks the column.
    pub async fn delete_user_sessions(&self, user: &str) -> Result<u64, StoreError> {
        self.delete_by("user_id", user).await
    }

    /// Deletes every session bound to the identity provider's session `sid`
    /// (the `provider_sid` column); returns how many.
    ///
    /// # Errors
    /// As [`Self::delete_user_sessions`].
    pub async fn delete_provider_sessions(&self, sid: &str) -> Result<u64, StoreError> {
        self.delete_by("provider_sid", sid).await
    }

    /// Creates the companion table of [`Self::remember_once`] when missing.
    #[cfg_attr(not(feature = "oidc"), allow(dead_code))]
    pub(crate) async fn ensure_seen_table(&self) -> Result<(), StoreError> {
        let t = self.inner.name.seen_table();
        let mut tx = self.begin().await?;
        sqlx::query("SELECT pg_advisory_xact_lock($1)")
            .persistent(self.persistent())
            .bind(self.inner.name.lock_key("ddl"))
            .execute(&mut *tx)
            .await?;
        sqlx::query(&format!(
            "CREATE TABLE IF NOT EXISTS {t} (key text PRIMARY KEY, expire timestamptz NOT NULL)"
        ))
        .persistent(self.persistent())
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }

    /// Records `key` until `expire`; false when it was recorded before (a
    /// replay). Atomic across instances.
    #[cfg_attr(not(feature = "oidc"), allow(dead_code))]
    pub(crate) async fn remember_once(
        &self,
        key: &str,
        expire: OffsetDateTime,
    ) -> Result<bool, StoreError> {
        let t = self.inner.name.seen_table();
        // An expired entry may be reused; a live one may not.
        let sql = format!(
            "INSERT INTO {t} (key, expire) VALUES ($1, $2) \
             ON CONFLICT (key) DO UPDATE SET expire = EXCLUDED.expire WHERE {t}.expire < now() \
             RETURNING 1"
        );
        let mut conn = self.conn().await?;
        let inserted: Option<i32> = sqlx::query_scalar(&sql)
            .persistent(self.persistent())
            .bind(key)
            .bind(expire)
            .fetch_optional(conn.get())
            .await?;
        conn.done().await?;
        Ok(inserted.is_some())
    }

    async fn delete_by(&self, column: &'static str, value: &str) -> Result<u64, StoreError> {
        let ready = self.ready().await?;
        if !ready.layout.extended {
            return Err(StoreError::Schema(format!(
                "table {} has no {column} column",
                self.inner.name.qualified()
            )));
        }
        let sql = format!(
            "DELETE FROM {} WHERE {column} = $1",
            self.inner.name.qualified()
        );
        let mut conn = self.conn().await?;
        let done = sqlx::query(&sql)
            .persistent(self.persistent())
            .bind(value)
            .execute(conn.get())
            .await?;
        conn.done().await?;
        Ok(done.rows_affected())
    }

    /// Deletes a row; true when one was there.
    pub(crate) async fn delete(&self, key: &str) -> Result<bool, StoreError> {
        let ready = self.ready().await?;
        let done = retry_once(|| async {
            let mut conn = self.conn().await?;
            let done = sqlx::query(&ready.sql.delete)
                .persistent(self.persistent())
                .bind(key)
                .execute(conn.get())
                .await?;
            conn.done().await?;
            Ok(done)
        })
        .await?;
        Ok(done.rows_affected() > 0)
    }
}

/// A transaction holding a session row lock.
pub(crate) type Tx = sqlx::Transaction<'static, sqlx::Postgres>;

/// Runs `op` once more when it failed on a connection that broke under it
/// (one that died while idle in the pool, a server restart): the pool
/// replaces a broken connection, so the second attempt usually succeeds.
/// Only for statements that are safe to repeat.
pub(crate) async fn retry_once<T, F, Fut>(mut op: F) -> Result<T, StoreError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, StoreError>>,
{
    match op().await {
        Err(e) if e.is_broken_connection() => {
            tracing::debug!(error = %e, "retrying on another connection");
            op().await
        }
        done => done,
    }
}

/// Runs `work` in its own task and waits for it: a request future can be
/// dropped at any await point, and work that must finish once started (a
/// save, a commit, a `BEGIN`) runs where that cannot cut it short. `None`
/// when the task panicked.
pub(crate) async fn detached<T: Send + 'static>(
    work: impl std::future::Future<Output = T> + Send + 'static,
) -> Option<T> {
    tokio::spawn(work).await.ok()
}

/// Times for one load: the idle extension is written only when the row
/// expires before `touch_before`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct LoadParams {
    pub(crate) now: OffsetDateTime,
    pub(crate) extend_to: OffsetDateTime,
    pub(crate) touch_before: OffsetDateTime,
    pub(crate) absolute_secs: Option<f64>,
}

/// A live row as loaded.
#[derive(Debug, Clone)]
pub(crate) struct Loaded {
    pub(crate) sess: String,
    pub(crate) expire: OffsetDateTime,
    pub(crate) version: String,
    pub(crate) created_at: Option<OffsetDateTime>,
    pub(crate) user_id: Option<String>,
    pub(crate) provider_sid: Option<String>,
    pub(crate) touched: bool,
}

impl Loaded {
    fn from_row(r: &sqlx::postgres::PgRow) -> Result<Self, StoreError> {
        Ok(Self {
            sess: r.try_get(0)?,
            expire: r.try_get(1)?,
            version: r.try_get(2)?,
            created_at: r.try_get(3)?,
            user_id: r.try_get(4)?,
            provider_sid: r.try_get(5)?,
            touched: r.try_get(6)?,
        })
    }
}

/// The values a save writes.
#[derive(Debug, Clone, Copy)]
pub(crate) struct NewRow<'a> {
    pub(crate) sess: &'a str,
    pub(crate) expire: OffsetDateTime,
    pub(crate) user_id: Option<&'a str>,
    pub(crate) provider_sid: Option<&'a str>,
    /// Recorded at creation when the application opts in.
    pub(crate) user_agent: Option<&'a str>,
    pub(crate) ip: Option<&'a str>,
}

/// The statements, built once from the validated names and detected layout.
#[derive(Debug)]
struct Sql {
    /// Loads of 1, 2, 4, … [`batch::MAX_KEYS`] keys, with an absolute timeout.
    load: Vec<String>,
    /// The same without one.
    load_idle: Vec<String>,
    insert: String,
    update: String,
    /// Updates of 1, 2, 4, … [`batch::MAX_KEYS`] rows (index 0 unused).
    update_many: Vec<String>,
    select_for_update: String,
    update_locked: String,
    delete: String,
    prune_batch: String,
    prune_tied: String,
    /// Unconditional update of a live row (the tower-sessions `save`).
    #[cfg_attr(not(feature = "tower-sessions"), allow(dead_code))]
    save_any: String,
}

impl Sql {
    fn new(name: &TableName, layout: &Layout, lock_wait: std::time::Duration) -> Self {
        let t = name.qualified();
        // Bounds the row lock waits of one statement (or of the rest of its
        // transaction) without a round trip of its own: the setting is made
        // before any row is read, and is local to the transaction.
        let bounded = format!(
            "WITH lock_wait AS MATERIALIZED (\
               SELECT set_config('lock_timeout', '{}', true))",
            lock_wait.as_millis().clamp(1, i32::MAX as u128)
        );
        let bound = "EXISTS (SELECT FROM lock_wait)";
        let to_col = |p: &str| to_col(&layout.expire, p);
        let json = match layout.sess {
            SessType::Json => "json",
            SessType::Jsonb => "jsonb",
        };
        let ext_cols = if layout.extended {
            "created_at, user_id, provider_sid"
        } else {
            "NULL::timestamptz AS created_at, NULL::text AS user_id, NULL::text AS provider_sid"
        };
        // The touch also records when the session was last seen (to the
        // touch's granularity: no extra writes for it).
        let touch_extra = if layout.extended {
            ", last_seen = $2"
        } else {
            ""
        };
        // Parameters: $1 extend to, $2 now, $3 touch rows expiring before,
        // [$4 absolute timeout in seconds], then the keys. The rows are
        // found once by primary key. Only those due are locked and updated,
        // and a row locked elsewhere (a write or a token refresh in progress)
        // is skipped rather than waited for: a load never waits on a row
        // lock, and loads sharing a statement never wait on each other. The
        // UPDATE returns the latest version of a row it touches.
        let load_sql = |keys: usize, absolute: bool| {
            let first = if absolute { 5 } else { 4 };
            let list = (first..first + keys)
                .map(|n| format!("${n}"))
                .collect::<Vec<_>>()
                .join(", ");
            let extend = |of: &str| {
                if absolute {
                    to_col(&format!(
                        "LEAST($1, {of}created_at + $4 * interval '1 second')"
                    ))
                } else {
                    to_col("$1")
                }
            };
            let now = to_col("$2");
            let before = to_col("$3");
            let from_cur = to_instant(&layout.expire, "expire");
            let from_t = to_instant(&layout.expire, "t.expire");
            let t_ext = if layout.extended {
                "t.created_at, t.user_id, t.provider_sid"
            } else {
                ext_cols
            };
            // The table is reached by primary key, then by physical row id
            // (TID scans), and the times are compared only on the
            // materialized rows: no plan can choose the expire index, and no
            // estimate depends on the time parameters, so Postgres keeps one
            // generic plan instead of planning each execution. A row locked
            // by `due` is the version `cur` read (a newer one has another
            // row id and fails the TID check), so the checks made on `cur`
            // hold for it.
            let rows = by_key(
                &t,
                &format!("ctid AS row_id, sid, sess, expire, xmin, {ext_cols}"),
                &list,
            );
            format!(
                "WITH cur AS MATERIALIZED ({rows}), \
                 due AS (\
                   SELECT ctid AS row_id FROM {t} \
                   WHERE ctid = ANY(ARRAY(SELECT row_id FROM cur \
                     WHERE expire > {now} AND expire < {before} AND expire < {extend_cur})) \
                   FOR UPDATE SKIP LOCKED), \
                 touched AS (\
                   UPDATE {t} AS t SET expire = {extend_t}{touch_extra} \
                   WHERE ctid = ANY(ARRAY(SELECT row_id FROM due)) \
                   RETURNING t.sess::text AS sess, {from_t} AS expire, t.xmin::text AS version, \
                   {t_ext}, t.sid) \
                 SELECT sess, expire, version, created_at, user_id, provider_sid, true, sid::text \
                 FROM touched \
                 UNION ALL \
                 SELECT sess::text, {from_cur}, xmin::text, created_at, user_id, provider_sid, \
                 false, sid::text FROM cur \
                 WHERE expire > {now} \
                 AND NOT EXISTS (SELECT 1 FROM touched WHERE touched.sid = cur.sid)",
                extend_cur = extend(""),
                extend_t = extend("t."),
            )
        };
        let load = arities().map(|k| load_sql(k, true)).collect();
        // Without an absolute timeout the cap (and its parameter) goes: the
        // statement that runs on every request stays as small as it can be.
        let load_idle = arities().map(|k| load_sql(k, false)).collect();
        let from_col = to_instant(&layout.expire, "expire");
        let (insert_cols, insert_vals, set_ext, set_ext_locked) = if layout.extended {
            (
                ", created_at, last_seen, user_id, provider_sid, user_agent, ip",
                ", $4, $4, $5, $6, $7, $8",
                ", user_id = $7, provider_sid = $8, last_seen = $6",
                ", user_id = $5, provider_sid = $6",
            )
        } else {
            ("", "", "", "")
        };
        let insert = format!(
            "INSERT INTO {t} (sid, sess, expire{insert_cols}) \
             VALUES ($1, $2::{json}, {expire}{insert_vals}) \
             ON CONFLICT (sid) DO NOTHING RETURNING xmin::text",
            expire = to_col("$3"),
        );
        let update = format!(
            "{bounded} UPDATE {t} SET sid = $2, sess = $3::{json}, expire = {expire}{set_ext} \
             WHERE sid = $1 AND xmin = $5::xid AND expire > {now} AND {bound} \
             RETURNING xmin::text",
            expire = to_col("$4"),
            now = to_col("$6"),
        );
        // $1 now, then per row: key, sess, expire, version[, user_id,
        // provider_sid]. Each row is written only if it is still at the
        // version its request loaded and no one else holds it.
        let update_many_sql = |rows: usize| {
            let per = if layout.extended { 6 } else { 4 };
            let values = (0..rows)
                .map(|r| {
                    let p = |i: usize| format!("${}", 2 + r * per + i);
                    let ext = if layout.extended {
                        format!(", {}::text, {}::text", p(4), p(5))
                    } else {
                        String::new()
                    };
                    format!(
                        "({}::text, {}::text, {}::timestamptz, {}::xid{ext})",
                        p(0),
                        p(1),
                        p(2),
                        p(3)
                    )
                })
                .collect::<Vec<_>>()
                .join(", ");
            let (v_ext, set_ext) = if layout.extended {
                (
                    ", user_id, provider_sid",
                    ", user_id = v.user_id, provider_sid = v.provider_sid, last_seen = $1",
                )
            } else {
                ("", "")
            };
            // As for loads: primary key, then physical row ids, whatever
            // the planner thinks of the table's size or the time.
            let keys = (0..rows)
                .map(|r| format!("${}", 2 + r * per))
                .collect::<Vec<_>>()
                .join(", ");
            let rows = by_key(&t, "ctid AS row_id, expire", &keys);
            format!(
                "WITH v (sid, sess, expire, version{v_ext}) AS (VALUES {values}), \
                 cur AS MATERIALIZED ({rows}), \
                 free AS (\
                   SELECT ctid AS row_id, sid, xmin FROM {t} \
                   WHERE ctid = ANY(ARRAY(SELECT row_id FROM cur WHERE expire > {now})) \
                   FOR UPDATE SKIP LOCKED) \
                 UPDATE {t} AS t SET sess = v.sess::{json}, expire = {expire}{set_ext} \
                 FROM v JOIN free ON free.sid = v.sid AND free.xmin = v.version \
                 WHERE t.ctid = ANY(ARRAY(SELECT row_id FROM free)) AND t.ctid = free.row_id \
                 RETURNING v.sid::text, t.xmin::text",
                now = to_col("$1"),
                expire = to_col("v.expire"),
            )
        };
        let update_many = arities().map(update_many_sql).collect();
        let select_for_update = format!(
            "{bounded} SELECT sess::text, {from_col}, xmin::text, {ext_cols}, false FROM {t} \
             WHERE sid = $1 AND expire > {now} AND {bound} FOR UPDATE",
            now = to_col("$2"),
        );
        let update_locked = format!(
            "UPDATE {t} SET sid = $2, sess = $3::{json}, expire = {expire}{set_ext_locked} \
             WHERE sid = $1 RETURNING xmin::text",
            expire = to_col("$4"),
        );
        let delete = format!("{bounded} DELETE FROM {t} WHERE sid = $1 AND {bound}");
        // Batches walk the expire index in order, each starting where the
        // previous one ended ($3, the column's own value as text, exact for
        // both column types): the index entries of rows already deleted stay
        // until vacuum, and a scan from the start would step over all of them
        // again, batch after batch. A batch deletes the rows before the
        // (limit + 1)-th expired one (at most `limit`) by an index range scan,
        // so each row is visited once; that row's expiry is where the next
        // batch starts, NULL once the rest fit in this batch. A row extended
        // meanwhile fails the re-check on its new version and stays.
        let column_type = match layout.expire {
            ExpireType::WithTimeZone => "timestamptz",
            ExpireType::WithoutTimeZone(_) => "timestamp",
        };
        // A batch lost in a crash is simply deleted again by the next run, so
        // no batch waits for its commit to reach the disk: the setting is
        // local to the batch's own transaction (it never outlives it, even
        // on a connection a pooler hands to someone else next).
        let no_sync = "WITH no_sync AS MATERIALIZED (\
                         SELECT set_config('synchronous_commit', 'off', true))";
        let prune_batch = format!(
            "{no_sync}, next AS MATERIALIZED (\
               SELECT expire FROM {t} WHERE expire >= $3::{column_type} AND expire < {now} \
               AND EXISTS (SELECT FROM no_sync) ORDER BY expire OFFSET $2 LIMIT 1), \
             gone AS (DELETE FROM {t} WHERE expire >= $3::{column_type} \
               AND expire < coalesce((SELECT expire FROM next), {now}) RETURNING 1) \
             SELECT (SELECT count(*) FROM gone), (SELECT expire::text FROM next)",
            now = to_col("$1"),
        );
        // More than `limit` expired rows share one instant ($3): a batch
        // takes `limit` of them by physical row id.
        let prune_tied = format!(
            "{no_sync}, gone AS (DELETE FROM {t} WHERE ctid = ANY(ARRAY(\
               SELECT ctid FROM {t} WHERE expire = $3::{column_type} AND expire < {now} \
               AND EXISTS (SELECT FROM no_sync) LIMIT $2)) \
             AND expire = $3::{column_type} AND expire < {now} RETURNING 1) \
             SELECT count(*) FROM gone",
            now = to_col("$1"),
        );
        let save_any = format!(
            "UPDATE {t} SET sess = $2::{json}, expire = {expire} WHERE sid = $1",
            expire = to_col("$3"),
        );
        Self {
            load,
            load_idle,
            insert,
            update,
            update_many,
            select_for_update,
            update_locked,
            delete,
            prune_batch,
            prune_tied,
            save_any,
        }
    }
}

/// The rows of `t` whose `sid` is one of `keys` (a list of parameters,
/// repeats allowed), `columns` of each: one primary-key lookup per distinct
/// key. Unlike `sid IN (…)`, which Postgres answers with a sequential scan
/// once the list is long and the table small, this plan never depends on
/// the table's size.
fn by_key(t: &str, columns: &str, keys: &str) -> String {
    format!(
        "SELECT r.* FROM (SELECT DISTINCT k FROM unnest(ARRAY[{keys}]::text[]) AS k) AS keys \
         CROSS JOIN LATERAL (SELECT {columns} FROM {t} WHERE sid = keys.k LIMIT 1) AS r"
    )
}

/// The arities shared statements are prepared for: 1, 2, 4, …
/// [`batch::MAX_KEYS`]. One statement per power of two keeps few prepared
/// statements, each with one generic plan (an array parameter would make
/// Postgres plan every execution anew).
fn arities() -> impl Iterator<Item = usize> {
    (0..=batch::MAX_KEYS.trailing_zeros()).map(|p| 1 << p)
}

/// The index in [`arities`] of the statement for `items`, and the items
/// padded to its arity by repeating the last; `None` for no items.
fn padded<T>(items: &[T]) -> Option<(usize, impl Iterator<Item = &T>)> {
    let last = items.last()?;
    let arity = items.len().next_power_of_two();
    let padded = items.iter().chain(std::iter::repeat(last)).take(arity);
    Some((arity.trailing_zeros() as usize, padded))
}

/// Instants travel as timestamptz; a `timestamp` column holds wall-clock time
/// in the zone Node writes it in, so values are converted on the way in…
fn to_col(expire: &ExpireType, param: &str) -> String {
    match expire {
        ExpireType::WithTimeZone => param.to_owned(),
        ExpireType::WithoutTimeZone(zone) => format!("({param} AT TIME ZONE '{zone}')"),
    }
}

/// …and on the way out.
fn to_instant(expire: &ExpireType, column: &str) -> String {
    match expire {
        ExpireType::WithTimeZone => column.to_owned(),
        ExpireType::WithoutTimeZone(zone) => format!("({column} AT TIME ZONE '{zone}')"),
    }
}
