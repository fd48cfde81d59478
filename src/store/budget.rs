//! The time one request may spend waiting on the database.
//!
//! Each wait is bounded on its own (a connection by the pool's acquire
//! timeout, a row lock by the same in the statement), but a request makes
//! several: its load, its save, a retry, the conflict path. Sharing one
//! budget between them keeps the whole request within the acquire timeout
//! under a restart or an exhausted pool, not one timeout per wait.

use std::{future::Future, sync::Mutex, time::Duration};

use super::StoreError;

/// What is left of a request's database waiting time.
///
/// Only the waits themselves count: time spent in the handler, or at the
/// identity provider while a row is locked, does not, so a slow handler is
/// never failed for it.
#[derive(Debug)]
pub(crate) struct WaitBudget {
    left: Mutex<Duration>,
}

impl WaitBudget {
    pub(crate) fn new(total: Duration) -> Self {
        Self {
            left: Mutex::new(total),
        }
    }

    fn left(&self) -> Duration {
        *self
            .left
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn spend(&self, spent: Duration) {
        let mut left = self
            .left
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        *left = left.saturating_sub(spent);
    }

    /// Runs `wait` within what is left, and charges the time it took. Out
    /// of time, `wait` is dropped (every store operation bounded so is safe
    /// to drop: a transaction rolls back, a shared statement skips a request
    /// no longer waiting for it) and the request fails as unavailable. A statement already sent may still complete; it writes
    /// whole rows, checked against the version loaded, never stale data.
    pub(crate) async fn run<T>(
        &self,
        wait: impl Future<Output = Result<T, StoreError>>,
    ) -> Result<T, StoreError> {
        let started = tokio::time::Instant::now();
        let answer = tokio::time::timeout(self.left(), wait).await;
        self.spend(started.elapsed());
        answer.unwrap_or(Err(StoreError::TimedOut))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn waits_share_one_budget() {
        let budget = WaitBudget::new(Duration::from_millis(50));
        let first = budget
            .run(async {
                tokio::time::sleep(Duration::from_secs(60)).await;
                Ok::<_, StoreError>(())
            })
            .await;
        assert!(matches!(first, Err(StoreError::TimedOut)), "{first:?}");
        // Spent: a wait that is not ready at once gives up at once…
        let second = budget.run(std::future::pending::<Result<(), _>>()).await;
        assert!(matches!(second, Err(StoreError::TimedOut)), "{second:?}");
        // …and one that is ready still gets its answer.
        assert!(budget.run(async { Ok::<_, StoreError>(()) }).await.is_ok());
    }
}
