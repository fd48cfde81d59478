//! Every statement the vault runs, next to the values it binds.

use sqlx::{
    postgres::{PgArguments, PgRow},
    query::Query,
    PgConnection, PgPool, Postgres, Row,
};
use time::OffsetDateTime;

use super::tokens::Connection;
use crate::store::Pooler;

/// A row as read, tokens still sealed.
#[derive(Clone)]
pub(crate) struct Sealed {
    pub(crate) access_token: String,
    pub(crate) refresh_token: Option<String>,
    pub(crate) expires_at: Option<OffsetDateTime>,
    pub(crate) scopes: Vec<String>,
    pub(crate) token_type: String,
    pub(crate) needs_reconsent: bool,
}

const SEALED_COLUMNS: &str =
    "access_token, refresh_token, expires_at, scopes, token_type, needs_reconsent_at IS NOT NULL";

/// What [`connection`] reads, in its order.
const CONNECTION_COLUMNS: &str = "integration, expires_at, scopes, token_type, \
    refresh_token IS NOT NULL, needs_reconsent_at IS NOT NULL, created_at, updated_at, \
    last_used_at, last_refreshed_at";

fn connection(r: &PgRow) -> Result<Connection, sqlx::Error> {
    Ok(Connection {
        integration: r.try_get(0)?,
        expires_at: r.try_get(1)?,
        scopes: r.try_get(2)?,
        token_type: r.try_get(3)?,
        refreshable: r.try_get(4)?,
        needs_reconsent: r.try_get(5)?,
        created_at: r.try_get(6)?,
        updated_at: r.try_get(7)?,
        last_used_at: r.try_get(8)?,
        last_refreshed_at: r.try_get(9)?,
    })
}

fn sealed(row: &PgRow) -> Result<Sealed, sqlx::Error> {
    Ok(Sealed {
        access_token: row.try_get(0)?,
        refresh_token: row.try_get(1)?,
        expires_at: row.try_get(2)?,
        scopes: row.try_get(3)?,
        token_type: row.try_get(4)?,
        needs_reconsent: row.try_get(5)?,
    })
}

/// The values of a write, sealed.
pub(crate) struct Write<'a> {
    pub(crate) access_token: &'a str,
    pub(crate) refresh_token: Option<&'a str>,
    pub(crate) expires_at: Option<OffsetDateTime>,
    pub(crate) scopes: &'a [String],
    pub(crate) token_type: &'a str,
}

/// The client that connected an account, when the audit is on.
#[derive(Debug, Default)]
pub(crate) struct Audit {
    /// An IP address, as text (cast to `inet` in SQL).
    pub(crate) ip: Option<String>,
    pub(crate) user_agent: Option<String>,
}

#[derive(Debug)]
pub(crate) struct Sql {
    table: String,
    /// Behind a transaction pooler every statement is unnamed (a named one
    /// may land on another server connection) and runs in a transaction of
    /// its own (see [`Pooler`]).
    persistent: bool,
    pooler: Pooler,
}

impl Sql {
    pub(crate) fn new(table: String, pooler: Pooler) -> Self {
        Self {
            table,
            persistent: pooler == Pooler::Direct,
            pooler,
        }
    }

    pub(crate) fn pooler(&self) -> Pooler {
        self.pooler
    }

    pub(crate) fn persistent(&self) -> bool {
        self.persistent
    }

    /// `sql`, prepared as this pooler allows.
    fn query<'q>(&self, sql: &'q str) -> Query<'q, Postgres, PgArguments> {
        sqlx::query(sql).persistent(self.persistent)
    }

    /// Runs `query` alone on a connection of `pool` (in a transaction of its
    /// own behind a transaction pooler) and returns its rows.
    async fn rows(
        &self,
        pool: &PgPool,
        query: Query<'_, Postgres, PgArguments>,
    ) -> Result<Vec<PgRow>, sqlx::Error> {
        let mut conn = self.pooler.conn(pool).await?;
        let rows = query.fetch_all(conn.get()).await?;
        conn.done().await?;
        Ok(rows)
    }

    /// Reads the row, and notes the use when the last note is over a minute
    /// old, skipping a row that a refresh holds locked so that reads never
    /// queue behind a provider's answer.
    pub(crate) async fn read(
        &self,
        pool: &PgPool,
        user: &str,
        integration: &str,
    ) -> Result<Option<Sealed>, sqlx::Error> {
        let t = &self.table;
        let sql = format!(
            "WITH used AS (UPDATE {t} SET last_used_at = now() \
               WHERE ctid = (SELECT ctid FROM {t} WHERE user_id = $1 AND integration = $2 \
                 AND (last_used_at IS NULL OR last_used_at < now() - interval '60 seconds') \
                 FOR UPDATE SKIP LOCKED)) \
             SELECT {SEALED_COLUMNS} FROM {t} WHERE user_id = $1 AND integration = $2"
        );
        let rows = self
            .rows(pool, self.query(&sql).bind(user).bind(integration))
            .await?;
        rows.first().map(sealed).transpose()
    }

    /// Reads the row under a lock held until the transaction ends.
    pub(crate) async fn lock(
        &self,
        conn: &mut PgConnection,
        user: &str,
        integration: &str,
    ) -> Result<Option<Sealed>, sqlx::Error> {
        let t = &self.table;
        let row = sqlx::query(&format!(
            "SELECT {SEALED_COLUMNS} FROM {t} WHERE user_id = $1 AND integration = $2 FOR UPDATE"
        ))
        .persistent(self.persistent)
        .bind(user)
        .bind(integration)
        .fetch_optional(conn)
        .await?;
        row.as_ref().map(sealed).transpose()
    }

    /// Inserts or replaces the tokens; a new connection clears the
    /// re-consent mark.
    pub(crate) async fn upsert(
        &self,
        pool: &PgPool,
        user: &str,
        integration: &str,
        w: &Write<'_>,
        audit: Option<&Audit>,
    ) -> Result<(), sqlx::Error> {
        let t = &self.table;
        // A connection with the audit on records its client; any other
        // write leaves what a connection recorded.
        let (columns, values, set) = match audit {
            Some(_) => (
                ", connect_ip, connect_user_agent",
                ", $8::inet, $9",
                ", connect_ip = EXCLUDED.connect_ip, \
                 connect_user_agent = EXCLUDED.connect_user_agent",
            ),
            None => ("", "", ""),
        };
        let sql = format!(
            "INSERT INTO {t} (user_id, integration, access_token, refresh_token, expires_at, \
               scopes, token_type{columns}) VALUES ($1, $2, $3, $4, $5, $6, $7{values}) \
             ON CONFLICT (user_id, integration) DO UPDATE SET \
               access_token = EXCLUDED.access_token, refresh_token = EXCLUDED.refresh_token, \
               expires_at = EXCLUDED.expires_at, scopes = EXCLUDED.scopes, \
               token_type = EXCLUDED.token_type, needs_reconsent_at = NULL, updated_at = now()\
               {set}"
        );
        let mut query = self
            .query(&sql)
            .bind(user)
            .bind(integration)
            .bind(w.access_token)
            .bind(w.refresh_token)
            .bind(w.expires_at)
            .bind(w.scopes)
            .bind(w.token_type);
        if let Some(a) = audit {
            query = query.bind(a.ip.as_deref()).bind(a.user_agent.as_deref());
        }
        self.rows(pool, query).await?;
        Ok(())
    }

    /// Writes refreshed tokens into the locked row.
    pub(crate) async fn refreshed(
        &self,
        conn: &mut PgConnection,
        user: &str,
        integration: &str,
        w: &Write<'_>,
    ) -> Result<(), sqlx::Error> {
        let t = &self.table;
        sqlx::query(&format!(
            "UPDATE {t} SET access_token = $3, refresh_token = $4, expires_at = $5, \
               scopes = CASE WHEN cardinality($6::text[]) > 0 THEN $6 ELSE scopes END, \
               token_type = $7, updated_at = now(), last_refreshed_at = now(), \
               last_used_at = now() \
             WHERE user_id = $1 AND integration = $2"
        ))
        .persistent(self.persistent)
        .bind(user)
        .bind(integration)
        .bind(w.access_token)
        .bind(w.refresh_token)
        .bind(w.expires_at)
        .bind(w.scopes)
        .bind(w.token_type)
        .execute(conn)
        .await?;
        Ok(())
    }

    /// Marks the locked row as needing the user's consent again.
    pub(crate) async fn needs_reconsent(
        &self,
        conn: &mut PgConnection,
        user: &str,
        integration: &str,
    ) -> Result<(), sqlx::Error> {
        let t = &self.table;
        sqlx::query(&format!(
            "UPDATE {t} SET needs_reconsent_at = now(), updated_at = now() \
             WHERE user_id = $1 AND integration = $2"
        ))
        .persistent(self.persistent)
        .bind(user)
        .bind(integration)
        .execute(conn)
        .await?;
        Ok(())
    }

    /// Deletes the row; returns its sealed refresh token (if any) when
    /// there was one.
    pub(crate) async fn remove(
        &self,
        pool: &PgPool,
        user: &str,
        integration: &str,
    ) -> Result<Option<Option<String>>, sqlx::Error> {
        let sql = format!(
            "DELETE FROM {t} WHERE user_id = $1 AND integration = $2 RETURNING refresh_token",
            t = self.table
        );
        let rows = self
            .rows(pool, self.query(&sql).bind(user).bind(integration))
            .await?;
        rows.first().map(|r| r.try_get(0)).transpose()
    }

    /// Deletes every row of `user`; returns each integration and its sealed
    /// refresh token.
    pub(crate) async fn remove_all(
        &self,
        pool: &PgPool,
        user: &str,
    ) -> Result<Vec<(String, Option<String>)>, sqlx::Error> {
        let sql = format!(
            "DELETE FROM {t} WHERE user_id = $1 RETURNING integration, refresh_token",
            t = self.table
        );
        let rows = self.rows(pool, self.query(&sql).bind(user)).await?;
        rows.iter()
            .map(|r| Ok((r.try_get(0)?, r.try_get(1)?)))
            .collect()
    }

    /// Metadata of every connection of `user`; the token columns are not read.
    pub(crate) async fn list(
        &self,
        pool: &PgPool,
        user: &str,
    ) -> Result<Vec<Connection>, sqlx::Error> {
        let sql = format!(
            "SELECT {CONNECTION_COLUMNS} FROM {t} WHERE user_id = $1 ORDER BY integration",
            t = self.table
        );
        let rows = self.rows(pool, self.query(&sql).bind(user)).await?;
        rows.iter().map(connection).collect()
    }

    /// At most `limit` connections of every user, in (user, integration)
    /// order, after `after` (keyset paging: each page is one index range).
    pub(crate) async fn list_all(
        &self,
        pool: &PgPool,
        after: Option<(&str, &str)>,
        limit: i64,
    ) -> Result<Vec<(String, Connection)>, sqlx::Error> {
        let t = &self.table;
        let (user, integration) = after.unwrap_or(("", ""));
        let sql = format!(
            "SELECT {CONNECTION_COLUMNS}, user_id FROM {t} \
             WHERE (user_id, integration) > ($1, $2) \
             ORDER BY user_id, integration LIMIT $3"
        );
        let query = self.query(&sql).bind(user).bind(integration).bind(limit);
        let rows = self.rows(pool, query).await?;
        rows.iter()
            .map(|r| Ok((r.try_get(10)?, connection(r)?)))
            .collect()
    }

    /// Per integration, how many rows and how many of them need the user's
    /// consent again: one pass over the table, for a periodic gauge.
    pub(crate) async fn token_counts(
        &self,
        pool: &PgPool,
    ) -> Result<Vec<(String, i64, i64)>, sqlx::Error> {
        let sql = format!(
            "SELECT integration, count(*), count(*) FILTER (WHERE needs_reconsent_at IS NOT NULL) \
             FROM {t} GROUP BY integration",
            t = self.table
        );
        let rows = self.rows(pool, self.query(&sql)).await?;
        rows.iter()
            .map(|r| Ok((r.try_get(0)?, r.try_get(1)?, r.try_get(2)?)))
            .collect()
    }

    /// Bounds how long a refresh waits for another one's row lock.
    pub(crate) async fn lock_timeout(
        &self,
        conn: &mut PgConnection,
        wait: std::time::Duration,
    ) -> Result<(), sqlx::Error> {
        sqlx::query("SELECT set_config('lock_timeout', $1, true)")
            .persistent(self.persistent)
            .bind(format!("{}ms", wait.as_millis().max(1)))
            .execute(conn)
            .await?;
        Ok(())
    }
}

/// A row to seal again, as read under its lock.
pub(crate) struct ToReseal {
    pub(crate) user: String,
    pub(crate) integration: String,
    pub(crate) access_token: String,
    pub(crate) refresh_token: Option<String>,
}

fn to_reseal(row: &PgRow) -> Result<ToReseal, sqlx::Error> {
    Ok(ToReseal {
        user: row.try_get(0)?,
        integration: row.try_get(1)?,
        access_token: row.try_get(2)?,
        refresh_token: row.try_get(3)?,
    })
}

impl Sql {
    /// How many sealed values each key id seals.
    pub(crate) async fn key_usage(&self, pool: &PgPool) -> Result<Vec<(String, i64)>, sqlx::Error> {
        let t = &self.table;
        let (a, r) = (
            crate::crypto::key_id_sql("access_token"),
            crate::crypto::key_id_sql("refresh_token"),
        );
        let sql = format!(
            "SELECT k, count(*) FROM (\
               SELECT {a} AS k FROM {t} \
               UNION ALL SELECT {r} FROM {t} WHERE refresh_token IS NOT NULL) s \
             GROUP BY k ORDER BY k"
        );
        let rows = self.rows(pool, self.query(&sql)).await?;
        rows.iter()
            .map(|r| Ok((r.try_get(0)?, r.try_get(1)?)))
            .collect()
    }

    /// Rows holding a value sealed under another key than `$1`, after the
    /// (user, integration) `($2, $3)` (both empty: from the start).
    fn stale(&self) -> String {
        format!(
            "{t} WHERE ($2 = '' AND $3 = '' OR (user_id, integration) > ($2, $3)) AND {s}",
            t = self.table,
            s = sealed_elsewhere(),
        )
    }

    /// `sql` over [`Self::stale`] rows with its parameters bound.
    fn stale_query<'q>(
        &self,
        sql: &'q str,
        current: &str,
        after: Option<&(String, String)>,
    ) -> Query<'q, Postgres, PgArguments> {
        let (u, i) = after.cloned().unwrap_or_default();
        self.query(sql).bind(current.to_owned()).bind(u).bind(i)
    }

    /// How many rows hold a value sealed under another key than `current`.
    pub(crate) async fn count_stale(
        &self,
        pool: &PgPool,
        current: &str,
    ) -> Result<i64, sqlx::Error> {
        let sql = format!("SELECT count(*) FROM {}", self.stale());
        let rows = self
            .rows(pool, self.stale_query(&sql, current, None))
            .await?;
        rows.first().map_or(Ok(0), |r| r.try_get(0))
    }

    /// Locks the next `limit` rows after `after` that hold a value sealed
    /// under another key than `current`, in key order, skipping the rows
    /// others hold (a refresh waiting on its provider): a batch never waits.
    pub(crate) async fn lock_stale(
        &self,
        conn: &mut PgConnection,
        current: &str,
        after: Option<&(String, String)>,
        limit: i64,
    ) -> Result<Vec<ToReseal>, sqlx::Error> {
        let sql = format!(
            "SELECT user_id, integration, access_token, refresh_token FROM {} \
             ORDER BY user_id, integration LIMIT $4 FOR UPDATE SKIP LOCKED",
            self.stale()
        );
        let rows = self
            .stale_query(&sql, current, after)
            .bind(limit)
            .fetch_all(conn)
            .await?;
        rows.iter().map(to_reseal).collect()
    }

    /// The rows a batch from `after` up to `upto` (`None`: to the end)
    /// skipped: stale ones not among those it `held`. A plain read.
    pub(crate) async fn skipped(
        &self,
        conn: &mut PgConnection,
        current: &str,
        after: Option<&(String, String)>,
        upto: Option<&(String, String)>,
        held: &[ToReseal],
    ) -> Result<Vec<(String, String)>, sqlx::Error> {
        let (to_u, to_i) = upto.cloned().unzip();
        let users: Vec<&str> = held.iter().map(|r| r.user.as_str()).collect();
        let names: Vec<&str> = held.iter().map(|r| r.integration.as_str()).collect();
        let sql = format!(
            "SELECT user_id, integration FROM {} \
               AND ($4::text IS NULL OR (user_id, integration) <= ($4, $5::text)) \
               AND (user_id, integration) NOT IN \
                 (SELECT * FROM unnest($6::text[], $7::text[])) \
             ORDER BY user_id, integration",
            self.stale()
        );
        let rows = self
            .stale_query(&sql, current, after)
            .bind(to_u)
            .bind(to_i)
            .bind(users)
            .bind(names)
            .fetch_all(conn)
            .await?;
        rows.iter()
            .map(|r| Ok((r.try_get(0)?, r.try_get(1)?)))
            .collect()
    }

    /// Locks one row if it still holds a value sealed under another key
    /// than `current`, waiting for whoever holds it; then reads it as they
    /// left it.
    pub(crate) async fn lock_one_stale(
        &self,
        conn: &mut PgConnection,
        current: &str,
        user: &str,
        integration: &str,
    ) -> Result<Option<ToReseal>, sqlx::Error> {
        let sql = format!(
            "SELECT user_id, integration, access_token, refresh_token FROM {t} \
             WHERE user_id = $2 AND integration = $3 AND {s} FOR UPDATE",
            t = self.table,
            s = sealed_elsewhere(),
        );
        let row = self
            .query(&sql)
            .bind(current)
            .bind(user)
            .bind(integration)
            .fetch_optional(conn)
            .await?;
        row.as_ref().map(to_reseal).transpose()
    }

    /// Writes the values sealed again, one statement for the batch.
    pub(crate) async fn resealed(
        &self,
        conn: &mut PgConnection,
        rows: &[ToReseal],
    ) -> Result<(), sqlx::Error> {
        let t = &self.table;
        let users: Vec<&str> = rows.iter().map(|r| r.user.as_str()).collect();
        let names: Vec<&str> = rows.iter().map(|r| r.integration.as_str()).collect();
        let access: Vec<&str> = rows.iter().map(|r| r.access_token.as_str()).collect();
        let refresh: Vec<Option<&str>> = rows.iter().map(|r| r.refresh_token.as_deref()).collect();
        sqlx::query(&format!(
            "UPDATE {t} AS v SET access_token = n.a, refresh_token = n.r \
             FROM unnest($1::text[], $2::text[], $3::text[], $4::text[]) AS n(u, i, a, r) \
             WHERE v.user_id = n.u AND v.integration = n.i"
        ))
        .persistent(self.persistent)
        .bind(users)
        .bind(names)
        .bind(access)
        .bind(refresh)
        .execute(conn)
        .await?;
        Ok(())
    }
}

/// A row holding a value sealed under another key than `$1`.
fn sealed_elsewhere() -> String {
    format!(
        "({a} <> $1 OR (refresh_token IS NOT NULL AND {r} <> $1))",
        a = crate::crypto::key_id_sql("access_token"),
        r = crate::crypto::key_id_sql("refresh_token"),
    )
}
