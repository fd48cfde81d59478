//! Deleting expired rows: in bounded batches, one instance at a time.

use std::{fmt, time::Duration};

use rand::Rng;
use time::OffsetDateTime;
use tokio::{sync::watch, task::JoinHandle};
use tracing::Instrument;

use super::{sql::Table, PgStore, Pooler, StoreError};
use crate::error::ConfigError;

/// How the background pruner runs.
#[derive(Debug, Clone)]
pub struct PruneConfig {
    interval: Duration,
    jitter: f64,
    batch_size: u32,
    busy: f64,
    max_backoff: Duration,
}

impl Default for PruneConfig {
    fn default() -> Self {
        Self::new()
    }
}

impl PruneConfig {
    /// Every 15 minutes ± 10 %, batches of 250 rows, busy a quarter of the
    /// time.
    #[must_use]
    pub fn new() -> Self {
        Self {
            interval: Duration::from_secs(15 * 60),
            jitter: 0.1,
            batch_size: 250,
            busy: 0.25,
            max_backoff: Duration::from_secs(5 * 60),
        }
    }

    /// Time between runs (default 15 min, at least 10 ms). Each wait is spread by the jitter so
    /// that instances started together do not all wake at once.
    ///
    /// ```
    /// # use std::time::Duration;
    /// # use tower_pg_session::PruneConfig;
    /// let config = PruneConfig::new().with_interval(Duration::from_secs(60));
    /// ```
    #[must_use]
    pub fn with_interval(mut self, interval: Duration) -> Self {
        self.interval = interval;
        self
    }

    /// Fraction of the interval by which each wait varies (default 0.1, from 0 to 0.5).
    ///
    /// ```
    /// # use tower_pg_session::PruneConfig;
    /// let config = PruneConfig::new().with_jitter(0.0);
    /// ```
    #[must_use]
    pub fn with_jitter(mut self, jitter: f64) -> Self {
        self.jitter = jitter;
        self
    }

    /// Rows one statement deletes at most (default 250, at least 1), which
    /// bounds how long its row locks are held and how long it keeps a core
    /// from the requests.
    ///
    /// ```
    /// # use tower_pg_session::PruneConfig;
    /// let config = PruneConfig::new().with_batch_size(5_000);
    /// ```
    #[must_use]
    pub fn with_batch_size(mut self, rows: u32) -> Self {
        self.batch_size = rows;
        self
    }

    /// Share of a run's time spent in statements (default 0.25, from 0.01 to
    /// 1): after each batch the run pauses so that it keeps at most this
    /// share of one database backend busy. On a busy machine a quarter keeps
    /// requests' latency close to its usual level; 1 prunes at full speed.
    ///
    /// ```
    /// # use tower_pg_session::PruneConfig;
    /// let config = PruneConfig::new().with_busy_fraction(0.5);
    /// ```
    #[must_use]
    pub fn with_busy_fraction(mut self, fraction: f64) -> Self {
        self.busy = fraction;
        self
    }

    /// Every value in its range (a NaN is in none), checked before a run.
    fn check(&self) -> Result<(), ConfigError> {
        let value = |setting, reason| Err(ConfigError::InvalidValue { setting, reason });
        if self.interval < Duration::from_millis(10) {
            let reason = "must be at least 10 ms";
            return Err(ConfigError::InvalidDuration {
                setting: "with_interval",
                reason,
            });
        }
        if !(0.0..=0.5).contains(&self.jitter) {
            return value("with_jitter", "must be between 0 and 0.5");
        }
        if self.batch_size == 0 {
            return value("with_batch_size", "must be at least 1");
        }
        if !(0.01..=1.0).contains(&self.busy) {
            return value("with_busy_fraction", "must be between 0.01 and 1");
        }
        Ok(())
    }

    /// The pause after a batch that took `took`.
    fn pause_after(&self, took: Duration) -> Duration {
        took.mul_f64((1.0 - self.busy) / self.busy)
            .min(Duration::from_secs(1))
    }

    fn next_wait(&self) -> Duration {
        let spread = self.jitter * rand::thread_rng().gen_range(-1.0..=1.0);
        self.interval.mul_f64(1.0 + spread)
    }
}

/// What one prune run did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum PruneOutcome {
    /// This instance pruned; the count of rows deleted.
    Pruned(u64),
    /// Another instance holds the prune lock; nothing was done.
    Skipped,
}

impl PgStore {
    /// The key of the advisory lock a prune run holds; `pg_locks` shows which
    /// backend prunes this table (`classid`/`objid` are its two halves).
    #[must_use]
    pub fn prune_lock_id(&self) -> i64 {
        self.inner.name.lock_key("prune")
    }

    /// Deletes every expired row, in batches of at most `batch_size` paced as
    /// [`PruneConfig::new`] paces them, unless another instance is pruning the
    /// same table right now.
    ///
    /// # Errors
    /// [`StoreError::Database`] when a statement fails; batches already
    /// committed stay deleted. [`StoreError::Config`] for a batch size of 0.
    pub async fn prune_expired(&self, batch_size: u32) -> Result<PruneOutcome, StoreError> {
        let config = PruneConfig::new().with_batch_size(batch_size);
        self.prune_expired_with(&config, |_| ()).await
    }

    /// Deletes every expired row with the batch size and pacing of `config`,
    /// calling `on_batch` with the rows each committed batch deleted (for a
    /// progress display).
    ///
    /// # Errors
    /// As [`Self::prune_expired`]; [`StoreError::Config`] for a setting of
    /// `config` out of its range.
    pub async fn prune_expired_with(
        &self,
        config: &PruneConfig,
        mut on_batch: impl FnMut(u64) + Send,
    ) -> Result<PruneOutcome, StoreError> {
        config.check()?;
        let inner = &self.inner;
        // The table must be ready (a lazily started store prepares it here).
        self.ready().await?;
        // The lock lives on a connection of its own, detached from the pool:
        // it closes when dropped, so a run that is cancelled midway cannot
        // leave the lock behind on a pooled connection.
        let mut conn = inner.pool.acquire().await?.detach();
        let key = self.prune_lock_id();
        let total = match inner.pooler {
            Pooler::Direct => {
                // A session-level lock; the batches run on its connection.
                let locked: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock($1)")
                    .bind(key)
                    .fetch_one(&mut conn)
                    .await?;
                if !locked {
                    return Ok(PruneOutcome::Skipped);
                }
                let run = self
                    .prune_batches(config, &mut on_batch, Some(&mut conn), None)
                    .await;
                // Release explicitly: a closed connection's backend may
                // outlive the close by a moment, and with it the lock.
                let _ = sqlx::query("SELECT pg_advisory_unlock($1)")
                    .bind(key)
                    .execute(&mut conn)
                    .await;
                run
            }
            Pooler::Transaction => {
                // Nothing session-level survives a transaction pooler: the
                // lock is held by a transaction that stays open for the run
                // (it pins one server connection of the pooler, and holds no
                // snapshot or row lock), and each batch commits in a
                // transaction of its own on another connection.
                let mut holder = sqlx::Connection::begin(&mut conn).await?;
                let locked: bool = sqlx::query_scalar("SELECT pg_try_advisory_xact_lock($1)")
                    .persistent(false)
                    .bind(key)
                    .fetch_one(&mut *holder)
                    .await?;
                if !locked {
                    // Ended cleanly, so that the pooler keeps its server
                    // connection for the next client.
                    let _ = holder.rollback().await;
                    let _ = sqlx::Connection::close(conn).await;
                    return Ok(PruneOutcome::Skipped);
                }
                let run = self
                    .prune_batches(config, &mut on_batch, None, Some(&mut *holder))
                    .await;
                let _ = holder.rollback().await;
                run
            }
        };
        let _ = sqlx::Connection::close(conn).await;
        let total = total?;
        crate::metrics::pruned(total);
        tracing::info!(table = %inner.name.qualified(), deleted = total, "pruned expired sessions");
        Ok(PruneOutcome::Pruned(total))
    }

    /// Runs batches from the first expired row to the last, paced by
    /// `config`, on `conn` or else each in a transaction of its own on the
    /// pool; returns the rows deleted. Before each batch, `lock` (the
    /// transaction holding the prune lock, if apart) is checked to be still
    /// there, which also keeps idle-transaction timeouts from ending it.
    async fn prune_batches(
        &self,
        config: &PruneConfig,
        on_batch: &mut (impl FnMut(u64) + Send),
        mut conn: Option<&mut sqlx::PgConnection>,
        mut lock: Option<&mut sqlx::PgConnection>,
    ) -> Result<u64, StoreError> {
        let mut total = 0u64;
        let mut from = String::from("-infinity");
        let limit = i64::from(config.batch_size);
        loop {
            let started = std::time::Instant::now();
            if let Some(lock) = lock.as_deref_mut() {
                sqlx::query("SELECT 1")
                    .persistent(false)
                    .execute(lock)
                    .await?;
            }
            let step = match conn.as_deref_mut() {
                Some(conn) => self.prune_step(conn, &from, limit).await?,
                None => {
                    let mut own = self.conn().await?;
                    let step = self.prune_step(own.get(), &from, limit).await?;
                    own.done().await?;
                    step
                }
            };
            let Some((deleted, next)) = step else {
                // The rows at the batch's end changed under us (extended or
                // deleted elsewhere); the next run starts afresh.
                return Ok(total);
            };
            total += deleted;
            on_batch(deleted);
            // No next batch: everything expired from `from` on fit in this one.
            let Some(next) = next else {
                return Ok(total);
            };
            from = next;
            // Short batches with pauses between them: requests never wait
            // long behind a batch for a core or a lock.
            tokio::time::sleep(config.pause_after(started.elapsed())).await;
        }
    }

    /// One batch from `from` on: the rows deleted and where the next batch
    /// starts, or `None` when the rows it should delete changed meanwhile.
    async fn prune_step(
        &self,
        conn: &mut sqlx::PgConnection,
        from: &str,
        limit: i64,
    ) -> Result<Option<(u64, Option<String>)>, StoreError> {
        let sql = &self.ready().await?.sql;
        let now = OffsetDateTime::now_utc();
        let (mut deleted, next): (i64, Option<String>) = sqlx::query_as(&sql.prune_batch)
            .persistent(self.persistent())
            .bind(now)
            .bind(limit)
            .bind(from)
            .fetch_one(&mut *conn)
            .await?;
        if let (0, Some(next)) = (deleted, &next) {
            // More than a batch of rows expired at the instant `next`.
            deleted = sqlx::query_scalar(&sql.prune_tied)
                .persistent(self.persistent())
                .bind(now)
                .bind(limit)
                .bind(next)
                .fetch_one(&mut *conn)
                .await?;
            if deleted == 0 {
                return Ok(None);
            }
        }
        Ok(Some((u64::try_from(deleted).unwrap_or(0), next)))
    }

    /// Starts pruning in the background on the current tokio runtime. The task
    /// keeps going after database errors, backing off up to 5 minutes, and ends
    /// when [`Pruner::shutdown`] is called or the [`Pruner`] is dropped.
    ///
    /// # Errors
    /// [`ConfigError`] for a setting of `config` out of its range, naming it.
    pub fn spawn_pruner(&self, config: PruneConfig) -> Result<Pruner, ConfigError> {
        config.check()?;
        let (stop, mut stopped) = watch::channel(false);
        let store = self.clone();
        let task = tokio::spawn(async move {
            let mut backoff = Duration::from_secs(1);
            let mut wait = config.next_wait();
            loop {
                tokio::select! {
                    _ = stopped.changed() => return,
                    () = tokio::time::sleep(wait) => {}
                }
                let run = store
                    .prune_expired_with(&config, |_| ())
                    .instrument(tracing::info_span!("session.prune"));
                let result = tokio::select! {
                    _ = stopped.changed() => return,
                    r = run => r,
                };
                wait = match result {
                    Ok(_) => {
                        backoff = Duration::from_secs(1);
                        config.next_wait()
                    }
                    Err(error) => {
                        tracing::warn!(error = %crate::log_safe::untrusted(&error), retry_in = ?backoff, "session prune failed");
                        store.report(&error);
                        let this = backoff;
                        backoff = (backoff * 2).min(config.max_backoff).min(config.interval);
                        this.min(config.interval)
                    }
                };
            }
        });
        Ok(Pruner {
            stop,
            task: Some(task),
        })
    }
}

/// Handle to the background pruner of [`PgStore::spawn_pruner`].
pub struct Pruner {
    stop: watch::Sender<bool>,
    task: Option<JoinHandle<()>>,
}

impl fmt::Debug for Pruner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pruner")
            .field(
                "running",
                &self.task.as_ref().is_some_and(|t| !t.is_finished()),
            )
            .finish()
    }
}

impl Pruner {
    /// Stops the pruner and waits for it: a batch in flight is abandoned (its
    /// transaction rolls back), committed batches stay deleted.
    pub async fn shutdown(mut self) {
        let _ = self.stop.send(true);
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

impl Drop for Pruner {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
    }
}

/// A batch lost in a crash is simply deleted again by the next run, so no
/// batch waits for its commit to reach the disk: the setting is local to
/// the batch's own transaction (it never outlives it, even on a connection
/// a pooler hands to someone else next).
const NO_SYNC: &str = "WITH no_sync AS MATERIALIZED (\
                         SELECT set_config('synchronous_commit', 'off', true))";

/// One batch. Parameters: $1 now, $2 limit, $3 where to start (the
/// `expire` column's own value as text, exact for both column types).
///
/// Batches walk the expire index in order, each starting where the
/// previous one ended: the index entries of rows already deleted stay
/// until vacuum, and a scan from the start would step over all of them
/// again, batch after batch. A batch deletes the rows before the
/// (limit + 1)-th expired one (at most `limit`) by an index range scan, so
/// each row is visited once; that row's expiry is where the next batch
/// starts, NULL once the rest fit in this batch. A row extended meanwhile
/// fails the re-check on its new version and stays.
pub(super) fn batch_sql(table: &Table<'_>) -> String {
    format!(
        "{NO_SYNC}, next AS MATERIALIZED (\
           SELECT expire FROM {t} WHERE expire >= $3::{column_type} AND expire < {now} \
           AND EXISTS (SELECT FROM no_sync) ORDER BY expire OFFSET $2 LIMIT 1), \
         gone AS (DELETE FROM {t} WHERE expire >= $3::{column_type} \
           AND expire < coalesce((SELECT expire FROM next), {now}) RETURNING 1) \
         SELECT (SELECT count(*) FROM gone), (SELECT expire::text FROM next)",
        t = table.t,
        column_type = table.column_type(),
        now = table.to_col("$1"),
    )
}

/// More than `limit` expired rows share one instant ($3): a batch takes
/// `limit` ($2) of them by physical row id. $1 is now.
pub(super) fn tied_sql(table: &Table<'_>) -> String {
    format!(
        "{NO_SYNC}, gone AS (DELETE FROM {t} WHERE ctid = ANY(ARRAY(\
           SELECT ctid FROM {t} WHERE expire = $3::{column_type} AND expire < {now} \
           AND EXISTS (SELECT FROM no_sync) LIMIT $2)) \
         AND expire = $3::{column_type} AND expire < {now} RETURNING 1) \
         SELECT count(*) FROM gone",
        t = table.t,
        column_type = table.column_type(),
        now = table.to_col("$1"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refused(config: &PruneConfig) -> String {
        config
            .check()
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default()
    }

    #[test]
    fn out_of_range_values_are_refused_not_clamped() {
        assert!(PruneConfig::new().check().is_ok());
        let interval = PruneConfig::new().with_interval(Duration::from_millis(1));
        assert!(refused(&interval).contains("with_interval"));
        assert!(refused(&PruneConfig::new().with_jitter(0.6)).contains("with_jitter"));
        assert!(refused(&PruneConfig::new().with_batch_size(0)).contains("with_batch_size"));
        for busy in [0.0, 1.5, f64::NAN] {
            let config = PruneConfig::new().with_busy_fraction(busy);
            assert!(refused(&config).contains("with_busy_fraction"), "{busy}");
        }
    }
}
