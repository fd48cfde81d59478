//! How statements reach Postgres: straight, or through a transaction pooler.
//!
//! A pooler in transaction mode (PgBouncer `pool_mode = transaction`, RDS
//! Proxy, Supavisor) lends a server connection for one transaction and hands
//! it to another client at the next `ReadyForQuery` outside one. Two things
//! sqlx does by default break there:
//!
//! - named prepared statements (`sqlx_s_1`, …) live on the server connection
//!   that prepared them, not on the client's, so they collide with or go
//!   missing for the next client;
//! - even unnamed statements are prepared in one round trip (`Parse`,
//!   `Describe`, `Sync`) and executed in the next (`Bind`, `Execute`,
//!   `Sync`): the pooler may hand the server connection around in between.
//!
//! Under [`Pooler::Transaction`] the lone load, and inserts and saves
//! (alone or shared), go as simple-protocol queries: one `Query`
//! message, one statement, its values written in as escaped literals. Such
//! a query runs in a transaction of its own and the pooler keeps it on one
//! server connection: one round trip, as straight on Postgres. Every other
//! statement is unnamed and runs inside an explicit transaction of its own
//! (or the store's own transactions), so its preparation and execution stay
//! on one server connection, and nothing outlives the transaction:
//! advisory locks are transaction-scoped and settings are `SET LOCAL`. The
//! price there is two more round trips (`BEGIN`, `COMMIT`) and a parse per
//! statement.
//!
//! Postgres plans a simple-protocol query at each run. The shared save,
//! whose plan costs more than its writes, is therefore a call of a plpgsql
//! function that holds the statement (see `schema::save_function`): its
//! plan is kept per server connection. (The loads' plans cost little more
//! than a function call: they stay as they are.)

use std::{sync::Arc, time::Instant};

use sqlx::{Executor, PgConnection, PgPool};

use super::warm::{Leased, Warm};

/// How the store's connections reach Postgres; see
/// [`PgStoreConfig::with_pooler`](super::PgStoreConfig::with_pooler).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum Pooler {
    /// Straight to Postgres, or through a pooler in session mode: each
    /// statement is prepared once per connection and reused.
    #[default]
    Direct,
    /// Through a pooler in transaction mode (PgBouncer `pool_mode =
    /// transaction`, RDS Proxy, Supavisor): no named prepared statements,
    /// every statement in a transaction of its own, no session-level state.
    Transaction,
}

impl Pooler {
    /// Whether sqlx may name and cache prepared statements.
    pub(crate) fn persistent(self) -> bool {
        self == Self::Direct
    }

    /// A connection from the pool for one statement (or a few that belong
    /// together), inside a transaction under [`Pooler::Transaction`].
    pub(crate) async fn conn(self, pool: &PgPool) -> Result<Conn<'static>, sqlx::Error> {
        self.conn_from(pool, None, None).await
    }

    /// [`Self::conn`], a kept connection if one of `warm` is fit, and
    /// kept there when done.
    pub(crate) async fn conn_from<'a>(
        self,
        pool: &PgPool,
        warm: Option<&'a Arc<Warm>>,
        switched: Option<Instant>,
    ) -> Result<Conn<'a>, sqlx::Error> {
        let mut conn = Conn::plain(pool, warm, switched).await?;
        if self == Self::Transaction {
            // From here until the commit completes, dropping `conn` closes
            // the connection (see `Drop`).
            conn.open = true;
            conn.get().execute("BEGIN").await?;
        }
        Ok(conn)
    }
}

/// A connection out of the pool, inside a transaction under
/// [`Pooler::Transaction`]. [`Conn::done`] keeps it for the store's next
/// statement; dropped, it goes back to the pool (or is closed, inside its
/// transaction).
pub(crate) struct Conn<'a> {
    /// Taken only by [`Conn::done`], which consumes the `Conn`.
    leased: Option<Leased>,
    warm: Option<&'a Arc<Warm>>,
    /// A transaction may be open: BEGIN was sent and no COMMIT completed.
    open: bool,
}

impl<'a> Conn<'a> {
    /// A connection outside any transaction, whatever the pooler: for one
    /// simple-protocol query.
    pub(crate) async fn plain(
        pool: &PgPool,
        warm: Option<&'a Arc<Warm>>,
        switched: Option<Instant>,
    ) -> Result<Self, sqlx::Error> {
        let leased = match warm.and_then(|w| w.take(switched)) {
            Some(leased) => leased,
            None => Leased {
                conn: pool.acquire().await?,
                taken: Instant::now(),
            },
        };
        Ok(Self {
            leased: Some(leased),
            warm,
            open: false,
        })
    }

    pub(crate) fn get(&mut self) -> &mut PgConnection {
        match &mut self.leased {
            Some(leased) => &mut leased.conn,
            None => unreachable!("a done connection is not used again"),
        }
    }

    /// Commits the transaction, if any, and keeps the connection for the
    /// next statement: whatever ran on it completed.
    pub(crate) async fn done(mut self) -> Result<(), sqlx::Error> {
        if self.open {
            self.get().execute("COMMIT").await?;
            self.open = false;
        }
        if let (Some(leased), Some(warm)) = (self.leased.take(), self.warm) {
            warm.keep(leased);
        }
        Ok(())
    }
}

impl Drop for Conn<'_> {
    /// Dropped inside its transaction (an error, or a request cancelled at
    /// any await point, BEGIN included), the connection is closed rather
    /// than returned to the pool: no later statement runs in that
    /// transaction, and the pooler gets its server connection back at once
    /// (a transaction left open would hold it).
    fn drop(&mut self) {
        if let (true, Some(leased)) = (self.open, &mut self.leased) {
            leased.conn.close_on_drop();
        }
    }
}
