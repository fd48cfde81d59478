//! Connections kept by the store between its statements.
//!
//! sqlx gives a connection back to its pool from a task of its own, which
//! first pings the server (a `Sync` and its `ReadyForQuery`): a round trip
//! and a task wake-up per statement, there to catch a connection that a
//! dropped future left mid-statement. The store knows when its statement
//! (and commit) completed, so it keeps such a connection for its next
//! statement instead. Every other way a connection is let go (an error, a
//! future dropped mid-statement) still goes through the pool and its check.
//!
//! Kept connections must neither starve the rest of the application nor
//! escape the pool's upkeep:
//! - at most the configured number is kept (half the pool by default);
//! - one kept longer than [`IDLE`] goes back to the pool rather than serve,
//!   so after a quiet spell the pool's check runs before the next use, and
//!   its idle timeout applies (a task sweeps them back every [`IDLE`]);
//! - one taken from the pool more than [`RECHECK`] ago goes back after its
//!   statement, so the pool's lifetime limit and checks still apply;
//! - after the store found its server demoted (the pool moved to another
//!   host), none taken before is reused;
//! - once the pool is closed (an application shutting down), every kept
//!   connection goes back at once, to be closed with the rest, and none is
//!   kept any more.

use std::{
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex, MutexGuard, Weak,
    },
    time::{Duration, Instant},
};

use sqlx::{pool::PoolConnection, PgPool, Postgres};

/// A kept connection unused this long goes back to the pool.
pub(crate) const IDLE: Duration = Duration::from_secs(1);

/// A connection serves from the store's hands this long at most, then goes
/// back to the pool.
pub(crate) const RECHECK: Duration = Duration::from_secs(10);

/// A connection out of the pool, and when it was taken.
pub(crate) struct Leased {
    pub(crate) conn: PoolConnection<Postgres>,
    pub(crate) taken: Instant,
}

struct Kept {
    leased: Leased,
    since: Instant,
}

impl Kept {
    /// Fit to serve: not idle too long, not out of the pool too long, taken
    /// after the last switch of server.
    fn fit(&self, now: Instant, switched: Option<Instant>) -> bool {
        now.saturating_duration_since(self.since) < IDLE
            && now.saturating_duration_since(self.leased.taken) < RECHECK
            && switched.is_none_or(|at| self.leased.taken >= at)
    }
}

/// The store's kept connections, most recently used on top.
pub(crate) struct Warm {
    kept: Mutex<Vec<Kept>>,
    cap: usize,
    /// The pool they come from: once it is closed, none is kept.
    pool: PgPool,
    /// The sweeper task runs (started by the first connection kept, from
    /// within the runtime).
    sweeping: AtomicBool,
}

impl Warm {
    pub(crate) fn new(cap: usize, pool: PgPool) -> Arc<Self> {
        Arc::new(Self {
            kept: Mutex::new(Vec::with_capacity(cap)),
            cap,
            pool,
            sweeping: AtomicBool::new(false),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Vec<Kept>> {
        // A push or a pop cannot be left half-done by a panic.
        self.kept
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The most recently kept connection fit to serve; unfit ones met on the
    /// way go back to the pool. `switched`: when the pool last moved to
    /// another server.
    pub(crate) fn take(&self, switched: Option<Instant>) -> Option<Leased> {
        if self.cap == 0 {
            return None;
        }
        let now = Instant::now();
        let mut unfit = Vec::new();
        let found = {
            let mut kept = self.lock();
            loop {
                match kept.pop() {
                    Some(k) if k.fit(now, switched) => break Some(k.leased),
                    Some(k) => unfit.push(k),
                    None => break None,
                }
            }
        };
        // Dropped outside the lock: the pool's release spawns a task.
        drop(unfit);
        found
    }

    /// Keeps `leased`, whose statements completed, for the next statement;
    /// or gives it back to the pool when it was out long enough or enough
    /// are kept. The oldest kept connection goes back once idle too long,
    /// so a quiet one at the bottom does not sit there while the top serves.
    pub(crate) fn keep(self: &Arc<Self>, leased: Leased) {
        let now = Instant::now();
        if self.cap == 0 || now.saturating_duration_since(leased.taken) >= RECHECK {
            return;
        }
        if !self.sweeping.swap(true, Ordering::AcqRel) {
            tokio::spawn(sweep(Arc::downgrade(self)));
        }
        let back = {
            let mut kept = self.lock();
            let stale = kept
                .first()
                .is_some_and(|k| now.saturating_duration_since(k.since) >= IDLE);
            let back = stale.then(|| kept.remove(0));
            // Checked under the lock that the sweep empties the list under
            // once the pool is closed: nothing is kept after that.
            if kept.len() < self.cap && !self.pool.is_closed() {
                kept.push(Kept { leased, since: now });
                back.map(|k| k.leased)
            } else {
                Some(leased)
            }
        };
        drop(back);
    }

    /// Gives every kept connection back to the pool, which checks each.
    pub(crate) fn clear(&self) {
        let all = std::mem::take(&mut *self.lock());
        drop(all);
    }
}

/// Every [`IDLE`], gives the connections kept idle that long back to the
/// pool; when the pool is closed, gives every kept connection back at once
/// (the pool closes each). Ends with the store or with the pool.
async fn sweep(warm: Weak<Warm>) {
    let Some(mut closed) = warm.upgrade().map(|w| w.pool.close_event()) else {
        return;
    };
    loop {
        let closing = tokio::time::timeout(IDLE, &mut closed).await.is_ok();
        let Some(warm) = warm.upgrade() else {
            return;
        };
        if closing {
            warm.clear();
            return;
        }
        let now = Instant::now();
        let idle: Vec<Kept> = {
            let mut kept = warm.lock();
            let quiet = kept
                .iter()
                .take_while(|k| now.saturating_duration_since(k.since) >= IDLE)
                .count();
            kept.drain(..quiet).collect()
        };
        drop(idle);
    }
}

impl Drop for Warm {
    fn drop(&mut self) {
        // Outside a runtime the pool cannot take a connection back (its
        // release needs a task): close them instead.
        if tokio::runtime::Handle::try_current().is_err() {
            for k in self.lock().drain(..) {
                drop(k.leased.conn.detach());
            }
        }
    }
}
