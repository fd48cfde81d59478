//! Session administration: the operations a team needs on day two. Every
//! query is backed by an index (`user_id`, `expire`, `created_at`), not a scan
//! of the table.
//!
//! ```no_run
//! # async fn run(store: tower_pg_session::PgStore) -> Result<(), tower_pg_session::StoreError> {
//! let admin = store.admin();
//! for s in admin.user_sessions("alice").await? {
//!     println!("{} created {:?}, last seen {:?}, from {:?}", s.handle, s.created_at, s.last_seen, s.user_agent);
//! }
//! let revoked = admin.revoke_user("alice").await?;
//! let stats = admin.stats().await?;
//! # Ok(()) }
//! ```

use serde::Serialize;
use sqlx::Row;
use time::OffsetDateTime;

use crate::store::{handle_sql, PgStore, StoreError};

/// Administration of the sessions in a [`PgStore`]; see [`PgStore::admin`].
/// With [`Admin::with_vault`], exports and erasures cover the user's
/// connected accounts in the token vault too.
#[derive(Debug, Clone)]
pub struct Admin {
    store: PgStore,
    #[cfg(feature = "oidc")]
    vault: Option<crate::vault::TokenVault>,
}

/// What an administrator may see of a session: no id, no data, no token.
#[derive(Debug, Clone, Serialize)]
#[non_exhaustive]
pub struct SessionInfo {
    /// An opaque handle (a digest of the id) for [`Admin::revoke_session`];
    /// it does not let anyone use the session.
    pub handle: String,
    /// When the session was created (unknown for rows written by other apps).
    #[serde(with = "time::serde::rfc3339::option")]
    pub created_at: Option<OffsetDateTime>,
    /// When it was last used, to the granularity of the idle-expiry touch.
    #[serde(with = "time::serde::rfc3339::option")]
    pub last_seen: Option<OffsetDateTime>,
    /// When it expires unless used again.
    #[serde(with = "time::serde::rfc3339")]
    pub expires_at: OffsetDateTime,
    /// The `User-Agent` at creation, when recorded (`SessionLayerBuilder::with_client_info`).
    pub user_agent: Option<String>,
    /// The client address at creation, when recorded.
    pub ip: Option<String>,
}

/// Table-wide figures.
#[derive(Debug, Clone, Copy, Serialize)]
#[non_exhaustive]
pub struct Stats {
    /// Sessions that have not expired.
    pub active: i64,
    /// Sessions created in the last 24 hours.
    pub created_last_24h: i64,
    /// Expired rows the pruner has not deleted yet.
    pub expired_awaiting_prune: i64,
    /// Table, indexes and TOAST, in bytes.
    pub table_bytes: i64,
}

impl PgStore {
    /// Session administration on this store.
    #[must_use]
    pub fn admin(&self) -> Admin {
        Admin {
            store: self.clone(),
            #[cfg(feature = "oidc")]
            vault: None,
        }
    }
}

impl Admin {
    fn table(&self) -> String {
        self.store.table_name()
    }

    fn now_sql(&self) -> String {
        self.store.instant_to_column("$1")
    }

    fn expire_sql(&self) -> String {
        self.store.column_to_instant("expire")
    }

    /// Prepares the table (a lazily connected store may not have yet) and
    /// checks it has the optional columns.
    async fn require_extended(&self) -> Result<(), StoreError> {
        self.store.prepared().await?;
        if self.store.has_extended_columns() {
            Ok(())
        } else {
            Err(StoreError::Schema(format!(
                "table {} lacks the user and metadata columns; let the store upgrade it (pg-session init)",
                self.table()
            )))
        }
    }

    /// The live sessions of `user`, oldest first.
    ///
    /// # Errors
    /// [`StoreError::Database`], or [`StoreError::Schema`] on a table without
    /// the `user_id` column.
    pub async fn user_sessions(&self, user: &str) -> Result<Vec<SessionInfo>, StoreError> {
        self.require_extended().await?;
        let sql = format!(
            "SELECT {handle}, created_at, last_seen, {expire}, user_agent, ip \
             FROM {t} WHERE user_id = $2 AND expire > {now} ORDER BY created_at NULLS FIRST",
            t = self.table(),
            handle = handle_sql("sid"),
            expire = self.expire_sql(),
            now = self.now_sql(),
        );
        let mut conn = self.store.conn().await?;
        let rows = sqlx::query(&sql)
            .persistent(self.store.persistent())
            .bind(OffsetDateTime::now_utc())
            .bind(user)
            .fetch_all(conn.get())
            .await?;
        conn.done().await?;
        rows.iter()
            .map(|r| {
                Ok(SessionInfo {
                    handle: r.try_get(0)?,
                    created_at: r.try_get(1)?,
                    last_seen: r.try_get(2)?,
                    expires_at: r.try_get(3)?,
                    user_agent: r.try_get(4)?,
                    ip: r.try_get(5)?,
                })
            })
            .collect()
    }

    /// Ends one session of `user`, named by its [`SessionInfo::handle`].
    /// True when it existed.
    ///
    /// # Errors
    /// As [`Self::user_sessions`].
    pub async fn revoke_session(&self, user: &str, handle: &str) -> Result<bool, StoreError> {
        Ok(self.delete_of_user(user, "=", handle).await? > 0)
    }

    /// Ends every session of `user` (password change, account compromise).
    ///
    /// # Errors
    /// As [`Self::user_sessions`].
    pub async fn revoke_user(&self, user: &str) -> Result<u64, StoreError> {
        self.store.delete_user_sessions(user).await
    }

    /// Ends every session of `user` except the one whose handle is `keep`
    /// ("log out my other devices"). See also [`crate::Session::handle`].
    ///
    /// # Errors
    /// As [`Self::user_sessions`].
    pub async fn revoke_others(&self, user: &str, keep: &str) -> Result<u64, StoreError> {
        self.delete_of_user(user, "<>", keep).await
    }

    /// Deletes the sessions of `user` whose handle compares with `handle`
    /// by `op` (`=` or `<>`); how many.
    async fn delete_of_user(
        &self,
        user: &str,
        op: &'static str,
        handle: &str,
    ) -> Result<u64, StoreError> {
        self.require_extended().await?;
        let sql = format!(
            "DELETE FROM {t} WHERE user_id = $1 AND {h} {op} $2",
            t = self.table(),
            h = handle_sql("sid"),
        );
        let mut conn = self.store.conn().await?;
        let done = sqlx::query(&sql)
            .persistent(self.store.persistent())
            .bind(user)
            .bind(handle)
            .execute(conn.get())
            .await?;
        conn.done().await?;
        Ok(done.rows_affected())
    }

    /// Ends every session (incident response), in batches so that no
    /// statement holds locks on the whole table; returns how many.
    ///
    /// # Errors
    /// [`StoreError::Database`]; batches already committed stay deleted.
    pub async fn revoke_all(&self) -> Result<u64, StoreError> {
        self.store.prepared().await?;
        let sql = format!(
            "DELETE FROM {t} WHERE sid IN (SELECT sid FROM {t} LIMIT 5000 FOR UPDATE SKIP LOCKED)",
            t = self.table()
        );
        let mut total = 0;
        loop {
            let mut conn = self.store.conn().await?;
            let n = sqlx::query(&sql)
                .persistent(self.store.persistent())
                .execute(conn.get())
                .await?
                .rows_affected();
            conn.done().await?;
            total += n;
            if n == 0 {
                tracing::warn!(sessions = total, "revoked every session");
                return Ok(total);
            }
        }
    }

    /// Active, recently created and expired-but-not-pruned counts, and the
    /// table's size.
    ///
    /// # Errors
    /// [`StoreError::Database`].
    pub async fn stats(&self) -> Result<Stats, StoreError> {
        self.store.prepared().await?;
        let t = self.table();
        let now = self.now_sql();
        let created = if self.store.has_extended_columns() {
            "(SELECT count(*) FROM {t} WHERE created_at > $2)".replace("{t}", &t)
        } else {
            "0::int8".to_owned()
        };
        let sql = format!(
            "SELECT (SELECT count(*) FROM {t} WHERE expire > {now}), {created}, \
                    (SELECT count(*) FROM {t} WHERE expire <= {now}), \
                    pg_total_relation_size(to_regclass($3))"
        );
        let now_i = OffsetDateTime::now_utc();
        let mut tx = self.store.begin().await?;
        // Expired rows are often most of the table: a (parallel) heap scan
        // would read all of it where the `expire` index answers the counts.
        let persistent = self.store.persistent();
        sqlx::query("SET LOCAL enable_seqscan = off")
            .persistent(persistent)
            .execute(&mut *tx)
            .await?;
        sqlx::query("SET LOCAL max_parallel_workers_per_gather = 0")
            .persistent(persistent)
            .execute(&mut *tx)
            .await?;
        let row = sqlx::query(&sql)
            .persistent(persistent)
            .bind(now_i)
            .bind(now_i - time::Duration::days(1))
            .bind(&t)
            .fetch_one(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(Stats {
            active: row.try_get(0)?,
            created_last_24h: row.try_get(1)?,
            expired_awaiting_prune: row.try_get(2)?,
            table_bytes: row.try_get(3)?,
        })
    }

    /// Everything kept about `user`'s sessions except secrets, as JSON
    /// (GDPR Art. 15): no ids, no session data, no tokens. With a vault,
    /// `connections` lists their connected accounts: integration, scopes,
    /// expiry and audit times, never a token nor its ciphertext.
    ///
    /// # Errors
    /// As [`Self::user_sessions`].
    pub async fn export_user(&self, user: &str) -> Result<serde_json::Value, StoreError> {
        let sessions = self.user_sessions(user).await?;
        #[cfg_attr(not(feature = "oidc"), allow(unused_mut))]
        let mut export = serde_json::json!({
            "user": user,
            "exported_at": OffsetDateTime::now_utc()
                .format(&time::format_description::well_known::Rfc3339)
                .unwrap_or_default(),
            "sessions": sessions,
        });
        #[cfg(feature = "oidc")]
        if self.vault.is_some() {
            export["connections"] =
                serde_json::to_value(self.user_connections(user).await?).unwrap_or_default();
        }
        Ok(export)
    }

    /// Deletes everything kept about `user` (GDPR Art. 17): all their
    /// sessions, live or expired, and with a vault their connected accounts
    /// (each refresh token revoked at its provider where it can be); returns
    /// how many sessions.
    ///
    /// # Errors
    /// As [`Self::user_sessions`].
    pub async fn erase_user(&self, user: &str) -> Result<u64, StoreError> {
        #[cfg(feature = "oidc")]
        if let Some(vault) = &self.vault {
            match vault.remove_all(user).await {
                // An id the vault refuses is one it holds nothing for.
                Ok(_) | Err(crate::vault::VaultError::InvalidInput { .. }) => {}
                Err(e) => return Err(vault_error(e)),
            }
        }
        self.revoke_user(user).await
    }
}

#[cfg(feature = "oidc")]
impl Admin {
    /// Exports and erasures also cover the user's connected accounts in
    /// `vault`.
    ///
    /// ```no_run
    /// # async fn run(store: tower_pg_session::PgStore, vault: tower_pg_session::vault::TokenVault) -> Result<(), tower_pg_session::StoreError> {
    /// let admin = store.admin().with_vault(&vault);
    /// let export = admin.export_user("alice").await?; // sessions and connections
    /// admin.erase_user("alice").await?;
    /// # Ok(()) }
    /// ```
    #[must_use]
    pub fn with_vault(mut self, vault: &crate::vault::TokenVault) -> Self {
        self.vault = Some(vault.clone());
        self
    }

    /// The accounts `user` connected in the vault (none without one):
    /// metadata only, never a token.
    ///
    /// # Errors
    /// [`StoreError::Database`].
    pub async fn user_connections(
        &self,
        user: &str,
    ) -> Result<Vec<crate::vault::Connection>, StoreError> {
        let Some(vault) = &self.vault else {
            return Ok(Vec::new());
        };
        match vault.list(user).await {
            Ok(list) => Ok(list),
            Err(crate::vault::VaultError::InvalidInput { .. }) => Ok(Vec::new()),
            Err(e) => Err(vault_error(e)),
        }
    }
}

/// The store's view of a vault failure: the vault's operations here fail
/// only in the database, or when their task is cut short.
#[cfg(feature = "oidc")]
fn vault_error(e: crate::vault::VaultError) -> StoreError {
    match e {
        crate::vault::VaultError::Store(e) => e,
        _ => StoreError::Database(sqlx::Error::WorkerCrashed),
    }
}
