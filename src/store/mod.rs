//! [`PgStore`]: sessions in a Postgres table shaped like connect-pg-simple's.
//!
//! The table is `session(sid varchar PRIMARY KEY, sess json NOT NULL, expire
//! timestamp(6) NOT NULL)` with the index `IDX_session_expire`, so a table that
//! an Express app already uses works unchanged. [`PgStore::new`] creates it when
//! missing and adds three nullable columns that Node ignores (`created_at`,
//! `user_id`, `provider_sid`, each indexed where not null).
//!
//! Each operation the session layer needs is one statement; loads, creates
//! and saves are shared by the requests that need them at the same moment:
//!
//! | operation | statement |
//! |---|---|
//! | load | alone, a `SELECT` by primary key; shared, one `SELECT` for all the loads waiting at that moment |
//! | extend the idle expiry when it is due | one `WITH … SELECT … UPDATE … RETURNING` for the rows due, after their load |
//! | create | `INSERT … ON CONFLICT DO NOTHING`, one for all the inserts waiting at that moment |
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
mod budget;
mod connect;
mod handle;
#[cfg(feature = "oidc")]
pub(crate) mod paged;
mod pooler;
mod prune;
#[cfg(feature = "oidc")]
mod reseal;
mod save;
pub(crate) mod schema;
mod sql;
#[cfg(feature = "tower-sessions")]
mod tower_sessions;
mod warm;

use std::fmt;
use std::sync::{Arc, OnceLock};

use sqlx::{PgPool, Row};
use time::OffsetDateTime;

pub(crate) use self::batch::LoadPolicy;
pub(crate) use self::budget::WaitBudget;
pub use self::connect::{PgConnect, ProviderError, TargetSessionAttrs};
pub(crate) use self::handle::{handle, handle_sql};
pub use self::pooler::Pooler;
pub use self::prune::{PruneConfig, PruneOutcome, Pruner};
pub(crate) use self::save::{Merge, OwnedRow, Write, Written};
use self::schema::{Ident, Layout, SessType, TableName};
use self::sql::{to_col, to_instant, Sql};
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
    /// The request's time for database waits (the pool's acquire timeout,
    /// shared by all of its waits) ran out before the store answered.
    #[error("the session database did not answer in time")]
    TimedOut,
    /// A statement that served several requests at once failed; each of
    /// them reports the same error.
    #[error(transparent)]
    Shared(Arc<StoreError>),
}

impl StoreError {
    /// The error of store work whose task panicked before it finished.
    pub(crate) fn task_failed() -> Self {
        Self::Database(sqlx::Error::WorkerCrashed)
    }

    /// True when the database could not be reached or answered with a
    /// connection-level failure: a retry later may succeed.
    #[must_use]
    pub fn is_unavailable(&self) -> bool {
        match self {
            Self::Connect { .. } | Self::NotReady | Self::TimedOut => true,
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
    kept: Option<usize>,
    pooler: Pooler,
}

impl Default for PgStoreConfig {
    fn default() -> Self {
        Self::new()
    }
}

impl PgStoreConfig {
    /// Table `session` in the connection's search path, created when missing.
    #[must_use]
    pub fn new() -> Self {
        Self {
            schema: None,
            table: Ident::new("session").unwrap_or_else(|_| unreachable!()),
            create_table: true,
            timestamp_zone: None,
            load_slots: None,
            kept: None,
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
    #[must_use]
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
    /// most the pool's size); as many saves, and as many inserts of new
    /// sessions.
    ///
    /// A load arriving while none runs is sent at once, and under light
    /// load a second starts beside it (saves and inserts: up to four, whose
    /// commits then share a WAL flush). Beyond that, and whenever statements
    /// carry several loads each, a load waits for the running statement to
    /// finish, and the next statement carries every waiting load: under
    /// load, one round trip serves many requests. Only when the running
    /// statements have gone 5 ms without one finishing does a waiting load
    /// open another, up to this number, so that one slow statement does not
    /// hold up every request.
    ///
    /// ```
    /// # use tower_pg_session::PgStoreConfig;
    /// let config = PgStoreConfig::new().with_load_concurrency(2)?;
    /// # Ok::<(), tower_pg_session::ConfigError>(())
    /// ```
    ///
    /// # Errors
    /// [`ConfigError::InvalidValue`] for 0.
    pub fn with_load_concurrency(mut self, loads: usize) -> Result<Self, ConfigError> {
        if loads == 0 {
            let reason = "must be at least 1";
            return Err(ConfigError::InvalidValue {
                setting: "with_load_concurrency",
                reason,
            });
        }
        self.load_slots = Some(loads);
        Ok(self)
    }

    /// How many connections the store may keep between its statements
    /// (default: half the pool's size, rounded down; 0 keeps none).
    ///
    /// sqlx gives each connection back to its pool with a round trip (a
    /// ping, in a task of its own). A connection whose statement completed
    /// is instead kept for the store's next statement, and skips that round
    /// trip. A connection kept idle for a second, or out of the pool for
    /// ten, goes back to the pool; the rest of the application always has
    /// the other connections of a shared pool. When the pool is closed
    /// ([`sqlx::Pool::close`], at shutdown), the kept ones go back at once
    /// and are closed with the rest.
    ///
    /// ```
    /// # use tower_pg_session::PgStoreConfig;
    /// let config = PgStoreConfig::new().with_kept_connections(2);
    /// ```
    #[must_use]
    pub fn with_kept_connections(mut self, kept: usize) -> Self {
        self.kept = Some(kept);
        self
    }

    /// How the pool reaches Postgres (default [`Pooler::Direct`]). Set
    /// [`Pooler::Transaction`] behind a pooler in transaction mode
    /// (PgBouncer `pool_mode = transaction`, RDS Proxy, Supavisor): the store
    /// then sends no named prepared statements, runs each statement in a
    /// transaction of its own, and holds no session-level state (its
    /// advisory locks are transaction-scoped). Where it creates its table
    /// ([`Self::with_create_table`]), it also creates a function beside it
    /// for its shared saves, which Postgres then plans once per server
    /// connection rather than at every run. PgBouncer must also list
    /// `extra_float_digits` in `ignore_startup_parameters`, as sqlx sends it.
    ///
    /// ```
    /// # use tower_pg_session::{PgStoreConfig, Pooler};
    /// let config = PgStoreConfig::new().with_pooler(Pooler::Transaction);
    /// ```
    #[must_use]
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
    inserts: batch::Batcher<batch::InsertJob>,
    /// Connections kept between statements.
    warm: Arc<warm::Warm>,
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
        connect.check()?;
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
    /// )?;
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    /// [`ConfigError`] for a setting of `connect` out of its range, naming it.
    pub fn connect_lazy(connect: PgConnect, config: PgStoreConfig) -> Result<Self, ConfigError> {
        connect.check()?;
        let (pool, router) = connect.lazy_pool();
        Ok(Self::build(pool, config, Some(router)))
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
        let max = pool.options().get_max_connections() as usize;
        let slots = config
            .load_slots
            .unwrap_or_else(|| DEFAULT_LOAD_SLOTS.min(max));
        let kept = config.kept.unwrap_or(max / 2);
        let warm = warm::Warm::new(kept, pool.clone());
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
                inserts: batch::Batcher::new(slots),
                warm,
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
        // Behind a transaction pooler only: elsewhere statements are prepared.
        let save_function = if self.text() {
            let (pool, create) = (&inner.pool, inner.create_table);
            schema::save_function(pool, inner.pooler, &inner.name, &layout, create).await
        } else {
            None
        };
        let sql = Sql::new(&inner.name, &layout, lock_wait, save_function.as_deref());
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
    #[must_use]
    pub fn pool(&self) -> &PgPool {
        &self.inner.pool
    }

    /// How the pool reaches Postgres.
    #[must_use]
    pub fn pooler(&self) -> Pooler {
        self.inner.pooler
    }

    /// Whether statements may be prepared once per connection and kept.
    pub(crate) fn persistent(&self) -> bool {
        self.inner.pooler.persistent()
    }

    /// A connection for one statement, in a transaction of its own behind a
    /// transaction pooler.
    pub(crate) async fn conn(&self) -> Result<pooler::Conn<'_>, StoreError> {
        let inner = &self.inner;
        Ok(inner
            .pooler
            .conn_from(&inner.pool, Some(&inner.warm), self.switched())
            .await?)
    }

    /// When the pool last moved to another server: connections taken
    /// before are not reused.
    fn switched(&self) -> Option<std::time::Instant> {
        self.inner.router.as_ref().map(|r| r.switched_at())
    }

    /// After a connection broke: the others idle since (kept, or in the
    /// pool) probably broke with it, as in a server restart. Each is pinged;
    /// the sound ones are kept for the next statements, the broken ones
    /// closed, so that a retry does not meet another broken one.
    async fn check_idle(&self) {
        let inner = &self.inner;
        inner.warm.clear();
        for _ in 0..inner.pool.num_idle() {
            let Some(mut conn) = inner.pool.try_acquire() else {
                return;
            };
            if sqlx::Connection::ping(&mut *conn).await.is_ok() {
                let taken = std::time::Instant::now();
                inner.warm.keep(warm::Leased { conn, taken });
            } else {
                drop(conn.detach());
            }
        }
    }

    /// The quoted, qualified table name, as it appears in the store's SQL.
    #[must_use]
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

    /// Whether `sess` is `jsonb`, which refuses a NUL character; `false`
    /// until the table is prepared.
    pub(crate) fn data_is_jsonb(&self) -> bool {
        self.inner
            .ready
            .get()
            .is_some_and(|r| r.layout.sess == SessType::Jsonb)
    }

    /// Prepares the table unless done already.
    pub(crate) async fn prepared(&self) -> Result<(), StoreError> {
        self.ready().await.map(|_| ())
    }

    /// Loads the live row under `key` with the plain primary-key statement;
    /// when its extension is due (once per share of the idle timeout), the
    /// shared statement then loads it again and extends it.
    async fn load_one(&self, key: &str, at: &LoadParams) -> Result<Option<Loaded>, StoreError> {
        let ready = self.ready().await?;
        let stmt = ready.sql.load_one_stmt(key, at.now, self.text());
        let Some((_, loaded)) = self.live_rows(stmt, at.now).await?.pop() else {
            return Ok(None);
        };
        if !at.touch_due(&loaded) {
            return Ok(Some(loaded));
        }
        let mut rows = self.load_many(&[key], at).await?;
        Ok(rows.pop().map(|(_, row)| row))
    }

    /// The live rows under `keys`, read only, each with its key.
    async fn load_read(
        &self,
        keys: &[&str],
        now: OffsetDateTime,
    ) -> Result<Vec<(String, Loaded)>, StoreError> {
        let ready = self.ready().await?;
        let Some(stmt) = ready.sql.load_read_stmt(keys, now, self.text()) else {
            return Ok(Vec::new());
        };
        self.live_rows(stmt, now)
            .await?
            .into_iter()
            .map(|(r, loaded)| Ok((r.try_get(7)?, loaded)))
            .collect()
    }

    /// Runs a load statement; each row with what it holds, expired ones
    /// dropped: the text statements leave that to the store, so that
    /// Postgres plans them without comparing times.
    async fn live_rows(
        &self,
        stmt: sql::Stmt<'_>,
        now: OffsetDateTime,
    ) -> Result<Vec<(sqlx::postgres::PgRow, Loaded)>, StoreError> {
        let decode = self.decoder();
        let mut live = Vec::new();
        for r in self.rows(stmt).await? {
            let loaded = decode(&r)?;
            if loaded.expire > now {
                live.push((r, loaded));
            }
        }
        Ok(live)
    }

    /// Whether the hot path's statements go as simple-protocol text (see
    /// [`Self::rows`]).
    fn text(&self) -> bool {
        self.inner.pooler == Pooler::Transaction
    }

    /// How a load's rows read: binary columns from a prepared statement,
    /// text from a simple-protocol one (instants as seconds since the epoch).
    fn decoder(&self) -> fn(&sqlx::postgres::PgRow) -> Result<Loaded, StoreError> {
        if self.text() {
            Loaded::from_text_row
        } else {
            Loaded::from_row
        }
    }

    /// Runs a statement of the hot path; its rows. Straight on Postgres it is
    /// prepared once per connection. Behind a transaction pooler it is one
    /// simple-protocol query with its values as literals, which the pooler
    /// keeps on one server connection without a transaction around it: one
    /// round trip where BEGIN, prepare, execute and COMMIT take four.
    async fn rows(&self, stmt: sql::Stmt<'_>) -> Result<Vec<sqlx::postgres::PgRow>, StoreError> {
        let inner = &self.inner;
        let (rows, conn) = if self.text() {
            let sql = stmt.inlined().ok_or_else(|| {
                sqlx::Error::Encode("a NUL byte, which Postgres text cannot hold".into())
            })?;
            let mut conn =
                pooler::Conn::plain(&inner.pool, Some(&inner.warm), self.switched()).await?;
            // Text without arguments goes as a simple Query message.
            let rows = sqlx::Executor::fetch_all(conn.get(), sql.as_str()).await?;
            (rows, conn)
        } else {
            let mut conn = self.conn().await?;
            let q = stmt.prepared().persistent(true);
            (q.fetch_all(conn.get()).await?, conn)
        };
        conn.done().await?;
        Ok(rows)
    }

    /// Loads the live rows under `keys` read only; those due for their
    /// idle extension are then loaded again by the statement that extends
    /// them (a row is due once per share of the idle timeout).
    async fn load_shared_rows(
        &self,
        keys: &[&str],
        at: &LoadParams,
    ) -> Result<Vec<(String, Loaded)>, StoreError> {
        let mut rows = self.load_read(keys, at.now).await?;
        let due: Vec<&str> = rows
            .iter()
            .filter(|(_, row)| at.touch_due(row))
            .map(|(key, _)| key.as_str())
            .collect();
        if due.is_empty() {
            return Ok(rows);
        }
        let mut touched: std::collections::HashMap<String, Loaded> =
            self.load_many(&due, at).await?.into_iter().collect();
        // A due row gone meanwhile (deleted, expired) is gone for its request too.
        rows.retain_mut(|(key, row)| {
            if !at.touch_due(row) {
                return true;
            }
            match touched.remove(key) {
                Some(fresh) => {
                    *row = fresh;
                    true
                }
                None => false,
            }
        });
        Ok(rows)
    }

    /// Loads the live rows under `keys`, extending the expiry of each in the
    /// same statement when its extension is due.
    async fn load_many(
        &self,
        keys: &[&str],
        at: &LoadParams,
    ) -> Result<Vec<(String, Loaded)>, StoreError> {
        let ready = self.ready().await?;
        let Some(query) = ready.sql.load_query(keys, at) else {
            return Ok(Vec::new());
        };
        let query = query.persistent(self.persistent());
        let mut conn = self.conn().await?;
        let rows = query.fetch_all(conn.get()).await?;
        conn.done().await?;
        rows.iter()
            .map(|r| Ok((r.try_get(7)?, Loaded::from_row(r)?)))
            .collect()
    }

    /// Inserts new rows in one statement; answers the key and version of
    /// each inserted (a key taken is left out).
    pub(crate) async fn insert_many(
        &self,
        jobs: &[&batch::InsertJob],
    ) -> Result<Vec<(String, String)>, StoreError> {
        let ready = self.ready().await?;
        let Some(stmt) = ready.sql.insert_many_stmt(jobs) else {
            return Ok(Vec::new());
        };
        key_versions(&self.rows(stmt).await?)
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
        self.retry_once(|| async {
            let rows = self.rows(ready.sql.insert_stmt(key, row, now)).await?;
            first_text(&rows)
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
        let stmt = ready.sql.update_stmt(key, new_key, version, row, now);
        first_text(&self.rows(stmt).await?)
    }

    /// Writes rows loaded at the given versions under their own keys, in one
    /// statement. Rows locked elsewhere are skipped: their saves conflict.
    /// Returns the keys written, each with its new version.
    async fn update_many(
        &self,
        jobs: &[&batch::UpdateJob],
    ) -> Result<Vec<(String, String)>, StoreError> {
        let ready = self.ready().await?;
        let Some(stmt) = ready.sql.update_many_stmt(jobs, self.text()) else {
            return Ok(Vec::new());
        };
        key_versions(&self.rows(stmt).await?)
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
        let store = self.clone();
        detached(async move {
            let pool = &store.inner.pool;
            store.retry_once(|| async { Ok(pool.begin().await?) }).await
        })
        .await
        .ok_or(StoreError::Database(sqlx::Error::WorkerCrashed))?
    }

    /// Runs `op` once more when it failed on a connection that broke under
    /// it (one that died while idle, a server restart), on a sound one:
    /// the other idle connections are checked first. Only for statements
    /// that are safe to repeat.
    pub(crate) async fn retry_once<T, F, Fut>(&self, mut op: F) -> Result<T, StoreError>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<T, StoreError>>,
    {
        match op().await {
            Err(e) if e.is_broken_connection() => {
                tracing::debug!(error = %crate::log_safe::untrusted(&e), "retrying on another connection");
                self.check_idle().await;
                op().await
            }
            done => done,
        }
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

    /// Creates the companion table of single-use keys ([`PgStore::use_once`])
    /// if it is missing: idempotent, safe for concurrent start-ups. The login
    /// guard calls it at discovery.
    ///
    /// # Errors
    /// [`StoreError`] when the database is out of reach or refuses the DDL.
    pub async fn prepare_single_use(&self) -> Result<(), StoreError> {
        let mut tx = self.begin().await?;
        sqlx::query("SELECT pg_advisory_xact_lock($1)")
            .persistent(self.persistent())
            .bind(self.inner.name.lock_key("ddl"))
            .execute(&mut *tx)
            .await?;
        sqlx::query(&schema::seen_ddl(&self.inner.name))
            .persistent(self.persistent())
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(())
    }

    /// Records `key` as used until `expire`: true the first time, false
    /// while an earlier use is recorded and not yet expired (a replay).
    /// Atomic across instances; for single-use values such as the `jti` of
    /// logout tokens or one-time links. Needs [`PgStore::prepare_single_use`]
    /// first.
    ///
    /// ```no_run
    /// # async fn run(store: tower_pg_session::PgStore) -> Result<(), tower_pg_session::StoreError> {
    /// store.prepare_single_use().await?;
    /// let until = time::OffsetDateTime::now_utc() + time::Duration::hours(1);
    /// assert!(store.use_once("link:42", until).await?);
    /// assert!(!store.use_once("link:42", until).await?);
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    /// [`StoreError`] when the database is out of reach.
    pub async fn use_once(&self, key: &str, expire: OffsetDateTime) -> Result<bool, StoreError> {
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
        let done = self
            .retry_once(|| async {
                let mut conn = self.conn().await?;
                let done = ready
                    .sql
                    .delete_query(key)
                    .persistent(self.persistent())
                    .execute(conn.get())
                    .await?;
                conn.done().await?;
                Ok(done)
            })
            .await?;
        Ok(done.rows_affected() > 0)
    }
}

/// A transaction on the store's pool (the admin statistics use one too).
pub(crate) type Tx = sqlx::Transaction<'static, sqlx::Postgres>;

pub(crate) use crate::task::detached;

/// The first column of the first row, as text (a version); `None` for no row.
fn first_text(rows: &[sqlx::postgres::PgRow]) -> Result<Option<String>, StoreError> {
    Ok(rows.first().map(|r| r.try_get(0)).transpose()?)
}

/// Each row's key and version, in text.
fn key_versions(rows: &[sqlx::postgres::PgRow]) -> Result<Vec<(String, String)>, StoreError> {
    rows.iter()
        .map(|r| Ok((r.try_get(0)?, r.try_get(1)?)))
        .collect()
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

impl LoadParams {
    /// Whether a load at these times extends `row`'s expiry: the shared load
    /// statement's test, made on a row read without it.
    fn touch_due(&self, row: &Loaded) -> bool {
        // A stored creation time so far out that the absolute end is past
        // the last instant representable ends nothing.
        let end = self
            .absolute_secs
            .zip(row.created_at)
            .and_then(|(secs, created)| {
                time::Duration::checked_seconds_f64(secs).and_then(|d| created.checked_add(d))
            });
        let cap = end.map_or(self.extend_to, |end| end.min(self.extend_to));
        row.expire < self.touch_before && row.expire < cap
    }
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
    /// The columns of the loads for the simple query protocol: instants as
    /// seconds since the epoch, in decimal. Every column of a simple query
    /// comes as text, so reading one as text needs no type check.
    fn from_text_row(r: &sqlx::postgres::PgRow) -> Result<Self, StoreError> {
        let instant = |i: usize| -> Result<Option<OffsetDateTime>, StoreError> {
            let Some(text) = r.try_get_unchecked::<Option<&str>, _>(i)? else {
                return Ok(None);
            };
            sql::epoch_seconds(text).map(Some).ok_or_else(|| {
                let e = format!("column {i}: {text:?} is not seconds since the epoch");
                StoreError::Database(sqlx::Error::Decode(e.into()))
            })
        };
        let expire = instant(1)?.ok_or_else(|| {
            StoreError::Database(sqlx::Error::Decode("column 1: expire is null".into()))
        })?;
        Ok(Self {
            sess: r.try_get(0)?,
            expire,
            version: r.try_get(2)?,
            created_at: instant(3)?,
            user_id: r.try_get(4)?,
            provider_sid: r.try_get(5)?,
            touched: r.try_get(6)?,
        })
    }

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

/// The index in [`arities`] of the statement for `items`, and the items
/// padded to its arity by repeating the last; `None` for no items.
fn padded<T>(items: &[T]) -> Option<(usize, impl Iterator<Item = &T>)> {
    let last = items.last()?;
    let arity = items.len().next_power_of_two();
    let padded = items.iter().chain(std::iter::repeat(last)).take(arity);
    Some((arity.trailing_zeros() as usize, padded))
}
