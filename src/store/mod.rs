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
//! | load (and extend the idle expiry when it is due) | one `WITH … UPDATE … RETURNING` + `SELECT` |
//! | create | `INSERT … ON CONFLICT DO NOTHING` |
//! | save | `UPDATE … WHERE sid = $1 AND xmin = $2` (never re-creates a deleted row) |
//! | cycle the id | the same `UPDATE`, setting a new `sid` |
//! | destroy | `DELETE` |
//!
//! A save whose optimistic check fails (another request or instance wrote the
//! row since it was loaded) falls back to `SELECT … FOR UPDATE`, re-applies the
//! request's key-level changes to the fresh data, and writes once more.
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

mod prune;
mod schema;
#[cfg(feature = "tower-sessions")]
mod tower_sessions;

use std::{fmt, str::FromStr, sync::Arc};

use sqlx::{
    postgres::{PgConnectOptions, PgPoolOptions},
    PgPool, Row,
};
use time::OffsetDateTime;

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
        /// Host (and port) from the URL; never the password.
        host: String,
        /// What the driver reported.
        #[source]
        source: sqlx::Error,
    },
    /// The database URL could not be parsed; it is not repeated, as it may hold a password.
    #[error("invalid database URL")]
    InvalidUrl,
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
}

impl StoreError {
    /// True when the database could not be reached or answered with a
    /// connection-level failure: a retry later may succeed.
    #[must_use]
    pub fn is_unavailable(&self) -> bool {
        match self {
            Self::Connect { .. } => true,
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
            }
            _ => false,
        }
    }
}

/// Where and how [`PgStore`] keeps its table.
#[derive(Debug, Clone)]
pub struct PgStoreConfig {
    schema: Option<Ident>,
    table: Ident,
    create_table: bool,
    timestamp_zone: Option<String>,
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
}

/// Sessions in Postgres. Cheap to clone; clones share the pool.
#[derive(Clone)]
pub struct PgStore {
    inner: Arc<Inner>,
}

struct Inner {
    pool: PgPool,
    name: TableName,
    layout: Layout,
    sql: Sql,
}

impl fmt::Debug for PgStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PgStore")
            .field("table", &self.inner.name.qualified())
            .field("layout", &self.inner.layout)
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

    /// Connects a pool of at most `max_connections` to `url` and prepares the
    /// table described by `config`. The pool does not ping connections before
    /// each use (a round trip per request); pass your own pool to
    /// [`Self::new`] for other settings.
    ///
    /// # Errors
    /// As [`Self::connect`].
    pub async fn connect_with(
        url: &str,
        max_connections: u32,
        config: PgStoreConfig,
    ) -> Result<Self, StoreError> {
        let options = PgConnectOptions::from_str(url).map_err(|_| StoreError::InvalidUrl)?;
        let host = format!("{}:{}", options.get_host(), options.get_port());
        let pool = PgPoolOptions::new()
            .max_connections(max_connections)
            .acquire_timeout(std::time::Duration::from_secs(5))
            // No ping before each use: it is a round trip per request. A
            // connection that died meanwhile fails its one query (that
            // request gets the unavailable status) and is replaced.
            .test_before_acquire(false)
            .connect_with(options)
            .await
            .map_err(|source| StoreError::Connect { host, source })?;
        Self::new(pool, config).await
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
        let name = TableName {
            schema: config.schema,
            table: config.table,
        };
        let layout = schema::prepare(
            &pool,
            &name,
            config.create_table,
            config.timestamp_zone.as_deref(),
        )
        .await?;
        let sql = Sql::new(&name, &layout);
        tracing::debug!(table = %name.qualified(), ?layout, "session store ready");
        Ok(Self {
            inner: Arc::new(Inner {
                pool,
                name,
                layout,
                sql,
            }),
        })
    }

    /// The pool the store runs on.
    pub fn pool(&self) -> &PgPool {
        &self.inner.pool
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
        sqlx::query("SELECT 1").execute(&self.inner.pool).await?;
        Ok(())
    }

    /// SQL turning the timestamptz parameter `param` into the `expire` column's type.
    pub(crate) fn instant_to_column(&self, param: &str) -> String {
        to_col(&self.inner.layout.expire, param)
    }

    /// SQL turning `column` (of the `expire` column's type) into a timestamptz.
    pub(crate) fn column_to_instant(&self, column: &str) -> String {
        to_instant(&self.inner.layout.expire, column)
    }

    pub(crate) fn has_extended_columns(&self) -> bool {
        self.inner.layout.extended
    }

    /// Loads a live row, extending its expiry in the same statement when the
    /// extension is due.
    pub(crate) async fn load(
        &self,
        key: &str,
        at: &LoadParams,
    ) -> Result<Option<Loaded>, StoreError> {
        let query = match at.absolute_secs {
            Some(secs) => sqlx::query(&self.inner.sql.load)
                .bind(key)
                .bind(at.extend_to)
                .bind(at.now)
                .bind(secs)
                .bind(at.touch_before),
            None => sqlx::query(&self.inner.sql.load_idle)
                .bind(key)
                .bind(at.extend_to)
                .bind(at.now)
                .bind(at.touch_before),
        };
        let row = query.fetch_optional(&self.inner.pool).await?;
        row.map(|r| Loaded::from_row(&r)).transpose()
    }

    /// Inserts a new row; `None` when the id is taken.
    pub(crate) async fn insert(
        &self,
        key: &str,
        row: &NewRow<'_>,
        now: OffsetDateTime,
    ) -> Result<Option<String>, StoreError> {
        let mut q = sqlx::query_scalar(&self.inner.sql.insert)
            .bind(key)
            .bind(row.sess)
            .bind(row.expire);
        if self.inner.layout.extended {
            q = q
                .bind(now)
                .bind(row.user_id)
                .bind(row.provider_sid)
                .bind(row.user_agent)
                .bind(row.ip);
        }
        Ok(q.fetch_optional(&self.inner.pool).await?)
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
        let mut q = sqlx::query_scalar(&self.inner.sql.update)
            .bind(key)
            .bind(new_key)
            .bind(row.sess)
            .bind(row.expire)
            .bind(version)
            .bind(now);
        if self.inner.layout.extended {
            q = q.bind(row.user_id).bind(row.provider_sid);
        }
        Ok(q.fetch_optional(&self.inner.pool).await?)
    }

    /// Locks the live row for the rest of the returned transaction. `None`
    /// when there is no live row: it is then not re-created by anyone holding
    /// this result.
    pub(crate) async fn lock_row(
        &self,
        key: &str,
        now: OffsetDateTime,
    ) -> Result<Option<(Tx, Loaded)>, StoreError> {
        let mut tx = self.inner.pool.begin().await?;
        let row = sqlx::query(&self.inner.sql.select_for_update)
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

    /// Writes a row locked by [`Self::lock_row`] (optionally under a new key)
    /// and commits.
    pub(crate) async fn write_locked(
        &self,
        mut tx: Tx,
        key: &str,
        new_key: &str,
        row: &NewRow<'_>,
    ) -> Result<String, StoreError> {
        let mut q = sqlx::query_scalar(&self.inner.sql.update_locked)
            .bind(key)
            .bind(new_key)
            .bind(row.sess)
            .bind(row.expire);
        if self.inner.layout.extended {
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
        let mut tx = self.inner.pool.begin().await?;
        sqlx::query("SELECT pg_advisory_xact_lock($1)")
            .bind(self.inner.name.lock_key("ddl"))
            .execute(&mut *tx)
            .await?;
        sqlx::query(&format!(
            "CREATE TABLE IF NOT EXISTS {t} (key text PRIMARY KEY, expire timestamptz NOT NULL)"
        ))
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
        let inserted: Option<i32> = sqlx::query_scalar(&format!(
            "INSERT INTO {t} (key, expire) VALUES ($1, $2) \
             ON CONFLICT (key) DO UPDATE SET expire = EXCLUDED.expire WHERE {t}.expire < now() \
             RETURNING 1"
        ))
        .bind(key)
        .bind(expire)
        .fetch_optional(&self.inner.pool)
        .await?;
        Ok(inserted.is_some())
    }

    async fn delete_by(&self, column: &'static str, value: &str) -> Result<u64, StoreError> {
        if !self.inner.layout.extended {
            return Err(StoreError::Schema(format!(
                "table {} has no {column} column",
                self.inner.name.qualified()
            )));
        }
        let sql = format!(
            "DELETE FROM {} WHERE {column} = $1",
            self.inner.name.qualified()
        );
        Ok(sqlx::query(&sql)
            .bind(value)
            .execute(&self.inner.pool)
            .await?
            .rows_affected())
    }

    /// Deletes a row; true when one was there.
    pub(crate) async fn delete(&self, key: &str) -> Result<bool, StoreError> {
        let done = sqlx::query(&self.inner.sql.delete)
            .bind(key)
            .execute(&self.inner.pool)
            .await?;
        Ok(done.rows_affected() > 0)
    }
}

/// A transaction holding a session row lock.
pub(crate) type Tx = sqlx::Transaction<'static, sqlx::Postgres>;

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
    load: String,
    load_idle: String,
    insert: String,
    update: String,
    select_for_update: String,
    update_locked: String,
    delete: String,
    prune_batch: String,
    /// Unconditional update of a live row (the tower-sessions `save`).
    #[cfg_attr(not(feature = "tower-sessions"), allow(dead_code))]
    save_any: String,
}

impl Sql {
    fn new(name: &TableName, layout: &Layout) -> Self {
        let t = name.qualified();
        let to_col = |p: &str| to_col(&layout.expire, p);
        let from_col = to_instant(&layout.expire, "expire");
        let json = match layout.sess {
            SessType::Json => "json",
            SessType::Jsonb => "jsonb",
        };
        let (ext_cols, extend_expr) = if layout.extended {
            (
                "created_at, user_id, provider_sid",
                to_col("LEAST($2, created_at + $4 * interval '1 second')"),
            )
        } else {
            (
                "NULL::timestamptz AS created_at, NULL::text AS user_id, NULL::text AS provider_sid",
                to_col("$2"),
            )
        };
        // The touch also records when the session was last seen (to the
        // touch's granularity: no extra writes for it).
        let touch_extra = if layout.extended {
            ", last_seen = $3"
        } else {
            ""
        };
        let load_sql = |extend: &str, before: &str| {
            format!(
                "WITH touched AS (\
                   UPDATE {t} SET expire = {extend}{touch_extra} \
                   WHERE sid = $1 AND expire > {now} AND expire < {before} AND expire < {extend} \
                   RETURNING sess::text AS sess, {from_col} AS expire, xmin::text AS version, {ext_cols}) \
                 SELECT sess, expire, version, created_at, user_id, provider_sid, true FROM touched \
                 UNION ALL \
                 SELECT sess::text, {from_col}, xmin::text, {ext_cols}, false FROM {t} \
                 WHERE sid = $1 AND expire > {now} AND NOT EXISTS (SELECT 1 FROM touched)",
                now = to_col("$3"),
                before = to_col(before),
            )
        };
        let load = load_sql(&extend_expr, "$5");
        // Without an absolute timeout the cap (and its parameter) goes: the
        // statement that runs on every request stays as small as it can be.
        let load_idle = load_sql(&to_col("$2"), "$4");
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
            "UPDATE {t} SET sid = $2, sess = $3::{json}, expire = {expire}{set_ext} \
             WHERE sid = $1 AND xmin = $5::xid AND expire > {now} RETURNING xmin::text",
            expire = to_col("$4"),
            now = to_col("$6"),
        );
        let select_for_update = format!(
            "SELECT sess::text, {from_col}, xmin::text, {ext_cols}, false FROM {t} \
             WHERE sid = $1 AND expire > {now} FOR UPDATE",
            now = to_col("$2"),
        );
        let update_locked = format!(
            "UPDATE {t} SET sid = $2, sess = $3::{json}, expire = {expire}{set_ext_locked} \
             WHERE sid = $1 RETURNING xmin::text",
            expire = to_col("$4"),
        );
        let delete = format!("DELETE FROM {t} WHERE sid = $1");
        // Batches by physical row id: the expire index finds the rows, a TID
        // scan deletes them, each row is written once. A row extended since
        // it was picked has moved (new ctid) or fails the re-check: it stays.
        let prune_batch = format!(
            "DELETE FROM {t} WHERE ctid = ANY(ARRAY(\
               SELECT ctid FROM {t} WHERE expire < {now} LIMIT $2)) \
             AND expire < {now}",
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
            select_for_update,
            update_locked,
            delete,
            prune_batch,
            save_any,
        }
    }
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
