//! Table names, DDL and column-type detection: everything that shapes SQL text
//! lives here, so user input reaches SQL only after [`Ident::new`] accepted it.

use std::{fmt, time::Duration};

use sqlx::PgPool;

use super::{sql::Table, Pooler, StoreError};
use crate::error::ConfigError;

/// Postgres truncates identifiers at 63 bytes (NAMEDATALEN - 1); refusing longer
/// names avoids two configured names silently meaning the same table.
const MAX_IDENT: usize = 63;

/// A validated SQL identifier, safe to interpolate once quoted.
#[derive(Clone, PartialEq, Eq)]
pub(crate) struct Ident(String);

impl Ident {
    pub(crate) fn new(name: &str) -> Result<Self, ConfigError> {
        let reject = |reason| ConfigError::InvalidIdentifier {
            name: name.to_owned(),
            reason,
        };
        if name.is_empty() {
            return Err(reject("empty"));
        }
        if name.len() > MAX_IDENT {
            return Err(reject("longer than 63 bytes"));
        }
        if name.as_bytes()[0].is_ascii_digit() {
            return Err(reject("starts with a digit"));
        }
        if !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
            return Err(reject("only ASCII letters, digits and '_' are allowed"));
        }
        Ok(Self(name.to_owned()))
    }

    pub(crate) fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Ident {
    /// Always quoted: names keep their case, as connect-pg-simple's do.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "\"{}\"", self.0)
    }
}

impl fmt::Debug for Ident {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// How the `sess` column is typed in an existing table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum SessType {
    Json,
    Jsonb,
}

/// How the `expire` column is typed in an existing table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum ExpireType {
    /// `timestamptz`: an instant, no conversion needed.
    WithTimeZone,
    /// `timestamp`: wall-clock time in the zone Node's `pg` sessions use (the
    /// server's default zone); sqlx sessions run in UTC, so every value is
    /// converted through this zone in SQL.
    WithoutTimeZone(String),
}

/// What start-up found in the database.
#[derive(Debug, Clone)]
pub(crate) struct Layout {
    pub(crate) sess: SessType,
    pub(crate) expire: ExpireType,
    /// `created_at`, `last_seen`, `user_id`, `provider_sid`, `user_agent` and `ip` exist.
    pub(crate) extended: bool,
}

/// The fully qualified, quoted table name and the names derived from it.
#[derive(Debug, Clone)]
pub(crate) struct TableName {
    pub(crate) schema: Option<Ident>,
    pub(crate) table: Ident,
}

impl TableName {
    /// The schema's creation, when the name has one.
    pub(crate) fn schema_ddl(&self) -> Option<String> {
        let schema = self.schema.as_ref()?;
        Some(format!("CREATE SCHEMA IF NOT EXISTS {schema}"))
    }

    pub(crate) fn qualified(&self) -> String {
        match &self.schema {
            Some(s) => format!("{s}.{}", self.table),
            None => self.table.to_string(),
        }
    }

    /// The companion table that remembers single-use values (logout token ids).
    #[cfg_attr(not(feature = "oidc"), allow(dead_code))]
    pub(crate) fn seen_table(&self) -> String {
        let mut name = format!("{}_seen", self.table.as_str());
        name.truncate(MAX_IDENT);
        match &self.schema {
            Some(s) => format!("{s}.{}", Ident(name)),
            None => Ident(name).to_string(),
        }
    }

    fn index(&self, what: &str) -> Ident {
        // connect-pg-simple names its index "IDX_session_expire"; derived names keep
        // that pattern and are shortened (not rejected) to the identifier limit.
        let mut name = format!("IDX_{}_{}", self.table.as_str(), what);
        name.truncate(MAX_IDENT);
        Ident(name)
    }

    /// The qualified name of this table's function for `what`, defined by
    /// `definition`: the table's name, shortened to the identifier limit,
    /// then `what` and 48 bits of the definition's digest.
    pub(crate) fn function(&self, what: &str, definition: &str) -> String {
        use sha2::{Digest, Sha256};
        let digest = Sha256::digest(definition.as_bytes());
        let suffix = format!("_{what}_{}", crate::hex::encode(&digest[..6]));
        let mut table = self.table.as_str().to_owned();
        table.truncate(MAX_IDENT.saturating_sub(suffix.len()));
        let function = Ident(table + &suffix);
        match &self.schema {
            Some(s) => format!("{s}.{function}"),
            None => function.to_string(),
        }
    }

    /// A stable 64-bit key for advisory locks scoped to this table.
    pub(crate) fn lock_key(&self, purpose: &str) -> i64 {
        use sha2::{Digest, Sha256};
        let digest = Sha256::new()
            .chain_update(b"tower-pg-session\0")
            .chain_update(purpose.as_bytes())
            .chain_update(b"\0")
            .chain_update(self.qualified().as_bytes())
            .finalize();
        let mut eight = [0u8; 8];
        eight.copy_from_slice(&digest[..8]);
        i64::from_be_bytes(eight)
    }
}

/// Validates a time zone name before it is written into SQL as a literal.
pub(crate) fn check_zone(zone: &str) -> Result<(), ConfigError> {
    let ok = !zone.is_empty()
        && zone.len() <= 64
        && zone
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'/' | b'_' | b'+' | b'-' | b':'));
    if ok {
        Ok(())
    } else {
        Err(ConfigError::InvalidTimeZone(zone.to_owned()))
    }
}

/// Creates the table, its index and the optional columns when missing, then
/// reports the layout. Serialised by an advisory lock so that many instances
/// starting at once against an empty database neither fail nor race.
pub(crate) async fn prepare(
    pool: &PgPool,
    pooler: Pooler,
    name: &TableName,
    create: bool,
    zone_override: Option<&str>,
) -> Result<Layout, StoreError> {
    let mut columns = columns_of(pool, pooler, name).await?;
    let wanted = columns.is_empty() || !has_extended(&columns);
    if create && wanted {
        let mut tx = pool.begin().await?;
        sqlx::query("SELECT pg_advisory_xact_lock($1)")
            .persistent(pooler.persistent())
            .bind(name.lock_key("ddl"))
            .execute(&mut *tx)
            .await?;
        for statement in ddl(name) {
            sqlx::query(&statement)
                .persistent(pooler.persistent())
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        columns = columns_of(pool, pooler, name).await?;
    }
    if columns.is_empty() {
        return Err(StoreError::MissingTable(name.qualified()));
    }
    let find = |col: &str| {
        columns
            .iter()
            .find(|(n, _)| n == col)
            .map(|(_, t)| t.as_str())
    };
    let sess = match find("sess") {
        Some("json") => SessType::Json,
        Some("jsonb") => SessType::Jsonb,
        other => return Err(bad_column(name, "sess", other)),
    };
    if !matches!(find("sid"), Some(t) if t.starts_with("character varying") || t == "text") {
        return Err(bad_column(name, "sid", find("sid")));
    }
    let expire = match find("expire") {
        Some(t) if t.starts_with("timestamp") && t.ends_with("without time zone") => {
            let zone = match zone_override {
                Some(z) => z.to_owned(),
                None => server_zone(pool, pooler).await?,
            };
            check_zone(&zone).map_err(|_| {
                StoreError::Schema(format!("server time zone {zone:?} cannot be used"))
            })?;
            ExpireType::WithoutTimeZone(zone)
        }
        Some(t) if t.starts_with("timestamp") && t.ends_with("with time zone") => {
            ExpireType::WithTimeZone
        }
        other => return Err(bad_column(name, "expire", other)),
    };
    Ok(Layout {
        sess,
        expire,
        extended: has_extended(&columns),
    })
}

/// Behind a transaction pooler: the shared save's function
/// ([`Table::save_function`]), created if missing when the store creates
/// its table. `None` where it is not there and cannot be made (a role
/// without `CREATE` on the schema, say), with a warning: the shared save
/// then goes as a query that Postgres plans at each run.
pub(crate) async fn save_function(
    pool: &PgPool,
    pooler: Pooler,
    name: &TableName,
    layout: &Layout,
    create: bool,
) -> Option<String> {
    match install_save_function(pool, pooler, name, layout, create).await {
        Ok(Some(function)) => Some(function),
        Ok(None) => {
            tracing::warn!(
                table = %name.qualified(),
                "the shared save's function is missing and the store creates no schema \
                 objects: shared saves are planned at each run"
            );
            None
        }
        Err(e) => {
            tracing::warn!(
                table = %name.qualified(),
                error = %crate::log_safe::untrusted(&e),
                "the shared save's function could not be made: shared saves are planned at \
                 each run"
            );
            None
        }
    }
}

async fn install_save_function(
    pool: &PgPool,
    pooler: Pooler,
    name: &TableName,
    layout: &Layout,
    create: bool,
) -> Result<Option<String>, StoreError> {
    // In a transaction the store's connection closes if dropped inside it.
    let mut conn = pooler.conn(pool).await?;
    let qualified = in_its_schema(conn.get(), name).await?;
    let function = Table::new(&qualified, layout, Duration::ZERO).save_function(&qualified);
    let mut found = function_exists(conn.get(), &function.name).await?;
    if !found && create {
        // Under the table's DDL lock: instances starting at once make it once.
        sqlx::query("SELECT pg_advisory_xact_lock($1)")
            .persistent(false)
            .bind(name.lock_key("ddl"))
            .execute(conn.get())
            .await?;
        if !function_exists(conn.get(), &function.name).await? {
            sqlx::query(&function.ddl)
                .persistent(false)
                .execute(conn.get())
                .await?;
        }
        found = true;
    }
    conn.done().await?;
    Ok(found.then_some(function.name))
}

/// Whether the function `name` exists and the store's role may call it
/// (one it may not call exists all the same: creating it fails).
async fn function_exists(conn: &mut sqlx::PgConnection, name: &str) -> Result<bool, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT coalesce(has_function_privilege(to_regproc($1)::oid, 'EXECUTE'), false)",
    )
    .persistent(false)
    .bind(name)
    .fetch_one(conn)
    .await
}

/// `name` with the schema its table is in: the function pins its search
/// path, so it names the table in full.
async fn in_its_schema(
    conn: &mut sqlx::PgConnection,
    name: &TableName,
) -> Result<TableName, StoreError> {
    if name.schema.is_some() {
        return Ok(name.clone());
    }
    let schema: Option<String> = sqlx::query_scalar(
        "SELECT n.nspname::text FROM pg_class c \
         JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.oid = to_regclass($1)",
    )
    .persistent(false)
    .bind(name.qualified())
    .fetch_optional(conn)
    .await?;
    let Some(schema) = schema else {
        return Err(StoreError::MissingTable(name.qualified()));
    };
    let schema = Ident::new(&schema).map_err(|_| {
        StoreError::Schema(format!(
            "the schema of {} has a name this crate does not write into SQL",
            name.qualified()
        ))
    })?;
    Ok(TableName {
        schema: Some(schema),
        table: name.table.clone(),
    })
}

fn bad_column(name: &TableName, col: &str, found: Option<&str>) -> StoreError {
    StoreError::Schema(format!(
        "table {} has no usable column {col:?} (found type {})",
        name.qualified(),
        found.unwrap_or("none")
    ))
}

fn has_extended(columns: &[(String, String)]) -> bool {
    [
        "created_at",
        "last_seen",
        "user_id",
        "provider_sid",
        "user_agent",
        "ip",
    ]
    .iter()
    .all(|c| columns.iter().any(|(n, _)| n == c))
}

async fn columns_of(
    pool: &PgPool,
    pooler: Pooler,
    name: &TableName,
) -> Result<Vec<(String, String)>, StoreError> {
    let mut conn = pooler.conn(pool).await?;
    let columns = sqlx::query_as(
        "SELECT a.attname::text, format_type(a.atttypid, a.atttypmod) \
         FROM pg_attribute a \
         WHERE a.attrelid = to_regclass($1) AND a.attnum > 0 AND NOT a.attisdropped",
    )
    .persistent(pooler.persistent())
    .bind(name.qualified())
    .fetch_all(conn.get())
    .await?;
    conn.done().await?;
    Ok(columns)
}

/// The idempotent DDL of the companion table in which the login records
/// one-time values (the `jti` of back-channel logout tokens) until they
/// expire, so that a replay is refused across instances.
#[cfg_attr(not(feature = "oidc"), allow(dead_code))]
pub(crate) fn seen_ddl(name: &TableName) -> String {
    format!(
        "CREATE TABLE IF NOT EXISTS {} (key text PRIMARY KEY, expire timestamptz NOT NULL)",
        name.seen_table()
    )
}

/// The idempotent DDL: the connect-pg-simple table, plus nullable columns that
/// Node ignores and that make per-user and per-provider-session lookups an
/// index scan.
fn ddl(name: &TableName) -> Vec<String> {
    let t = name.qualified();
    let mut out: Vec<String> = name.schema_ddl().into_iter().collect();
    out.push(format!(
        "CREATE TABLE IF NOT EXISTS {t} (\
           sid varchar NOT NULL COLLATE \"default\" PRIMARY KEY, \
           sess json NOT NULL, \
           expire timestamp(6) NOT NULL)"
    ));
    out.push(format!(
        "CREATE INDEX IF NOT EXISTS {} ON {t} (expire)",
        name.index("expire")
    ));
    out.push(format!(
        "ALTER TABLE {t} \
           ADD COLUMN IF NOT EXISTS created_at timestamptz, \
           ADD COLUMN IF NOT EXISTS last_seen timestamptz, \
           ADD COLUMN IF NOT EXISTS user_agent text, \
           ADD COLUMN IF NOT EXISTS ip text, \
           ADD COLUMN IF NOT EXISTS user_id text, \
           ADD COLUMN IF NOT EXISTS provider_sid text"
    ));
    out.push(format!(
        "CREATE INDEX IF NOT EXISTS {} ON {t} (user_id) WHERE user_id IS NOT NULL",
        name.index("user_id")
    ));
    out.push(format!(
        "CREATE INDEX IF NOT EXISTS {} ON {t} (provider_sid) WHERE provider_sid IS NOT NULL",
        name.index("provider_sid")
    ));
    out.push(format!(
        "CREATE INDEX IF NOT EXISTS {} ON {t} (created_at) WHERE created_at IS NOT NULL",
        name.index("created_at")
    ));
    out
}

/// The zone a client that sets none (Node's `pg`) runs in: the most specific of
/// `ALTER ROLE … IN DATABASE`, `ALTER ROLE`, `ALTER DATABASE` and the
/// configuration files. sqlx itself always asks for UTC, so `SHOW TimeZone`
/// cannot tell.
async fn server_zone(pool: &PgPool, pooler: Pooler) -> Result<String, StoreError> {
    let mut conn = pooler.conn(pool).await?;
    let per_role_or_db: Option<String> = sqlx::query_scalar(
        "SELECT substring(cfg FROM '^[Tt][Ii][Mm][Ee][Zz][Oo][Nn][Ee]=(.*)$') \
         FROM pg_db_role_setting s, unnest(s.setconfig) AS cfg \
         WHERE s.setdatabase IN (0, (SELECT oid FROM pg_database WHERE datname = current_database())) \
           AND s.setrole IN (0, (SELECT oid FROM pg_roles WHERE rolname = current_user)) \
           AND cfg ILIKE 'timezone=%' \
         ORDER BY (s.setrole <> 0) DESC, (s.setdatabase <> 0) DESC LIMIT 1",
    )
    .persistent(pooler.persistent())
    .fetch_optional(conn.get())
    .await?
    .flatten();
    conn.done().await?;
    if let Some(zone) = per_role_or_db {
        return Ok(zone.trim_matches('\'').to_owned());
    }
    // pg_file_settings needs pg_read_all_settings; without it, log_timezone is
    // what initdb wrote next to timezone and no client can change it.
    // Refused without the privilege: the transaction it ran in (if any)
    // rolls back as the connection is dropped.
    let mut conn = pooler.conn(pool).await?;
    let from_file: Result<Option<String>, sqlx::Error> = sqlx::query_scalar(
        "SELECT setting FROM pg_file_settings \
         WHERE lower(name) = 'timezone' AND applied ORDER BY seqno DESC LIMIT 1",
    )
    .persistent(pooler.persistent())
    .fetch_optional(conn.get())
    .await;
    if let Ok(Some(zone)) = from_file {
        conn.done().await?;
        return Ok(zone);
    }
    drop(conn);
    let mut conn = pooler.conn(pool).await?;
    let zone = sqlx::query_scalar("SELECT current_setting('log_timezone')")
        .persistent(pooler.persistent())
        .fetch_one(conn.get())
        .await?;
    conn.done().await?;
    Ok(zone)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identifiers() {
        for good in ["session", "Session_2", "_x", &"a".repeat(63)] {
            assert!(Ident::new(good).is_ok(), "{good}");
        }
        for bad in [
            "",
            "x; drop table y",
            "a\"b",
            "1abc",
            "sp ace",
            "é",
            &"a".repeat(64),
        ] {
            let err = Ident::new(bad).expect_err(bad);
            assert!(err.to_string().contains(&format!("{bad:?}")), "{err}");
        }
    }

    #[test]
    fn index_names_follow_connect_pg_simple() {
        let name = TableName {
            schema: None,
            table: Ident::new("session").expect("valid"),
        };
        assert_eq!(name.index("expire").as_str(), "IDX_session_expire");
        assert_eq!(name.qualified(), "\"session\"");
    }

    #[test]
    fn zones() {
        assert!(check_zone("Europe/Berlin").is_ok());
        assert!(check_zone("Etc/GMT+5").is_ok());
        assert!(check_zone("UTC'; drop").is_err());
    }
}
