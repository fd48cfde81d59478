//! Key retirement: which keys still seal stored tokens, and sealing them all
//! again under the keyring's first key.

use super::{sql::ToReseal, TokenVault, VaultError, ACCESS, REFRESH};
use tracing::Instrument;

use crate::store::{
    detached,
    paged::{in_batches, Step},
};

/// How many stored values one key id seals.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[non_exhaustive]
pub struct KeyUsage {
    /// The key id, as [`KeyId`](crate::crypto::KeyId) displays it (8 hex
    /// digits), or `"malformed"` for values that are no sealed envelope.
    pub key_id: String,
    /// Access and refresh tokens sealed under it.
    pub values: u64,
}

impl KeyUsage {
    pub(crate) fn new(key_id: String, values: u64) -> Self {
        Self { key_id, values }
    }
}

/// What [`TokenVault::reseal`] (and
/// [`PgStore::reseal_sessions`](crate::PgStore::reseal_sessions)) did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ResealOutcome {
    /// Rows whose sealed values are now sealed under the first key.
    pub resealed: u64,
    /// Rows in which a value did not open; it is left as it was (and is
    /// logged).
    pub unreadable: u64,
}

/// The next batch starts after this (user, integration).
type Cursor = Option<(String, String)>;

impl TokenVault {
    /// How many stored tokens each key id seals, so an operator knows when
    /// an old key can leave the keyring (when it seals none).
    ///
    /// # Errors
    /// [`VaultError::Store`].
    pub async fn key_usage(&self) -> Result<Vec<KeyUsage>, VaultError> {
        let rows = self.inner.sql.key_usage(&self.inner.pool).await?;
        Ok(rows
            .into_iter()
            .map(|(key_id, n)| KeyUsage::new(key_id, u64::try_from(n).unwrap_or(0)))
            .collect())
    }

    /// How many rows hold a token sealed under another key than the
    /// keyring's first: what [`reseal`](Self::reseal) goes through (rows
    /// that do not open included), e.g. a progress bar's total.
    ///
    /// # Errors
    /// [`VaultError::Store`].
    pub async fn rows_to_reseal(&self) -> Result<u64, VaultError> {
        let current = self.inner.keyring.current_key_id().to_string();
        let n = self
            .inner
            .sql
            .count_stale(&self.inner.pool, &current)
            .await?;
        Ok(u64::try_from(n).unwrap_or(0))
    }

    /// Seals every stored token again under the keyring's first key, `batch`
    /// rows per transaction. Safe while the application runs: a batch locks
    /// only rows no refresh holds (`FOR UPDATE SKIP LOCKED`), so it never
    /// waits on a provider; once the free rows are done, the rows skipped
    /// are taken one at a time, each waiting (at most the
    /// [lock timeout](super::VaultConfig::with_lock_timeout)) for its
    /// refresh and then resealing what that refresh wrote, so no refresh
    /// is lost and no row is left behind. Resumable: run it again after an
    /// error; [`key_usage`](Self::key_usage) shows what is left.
    ///
    /// # Errors
    /// [`VaultError::Store`]; what earlier batches resealed stays resealed.
    pub async fn reseal(&self, batch: usize) -> Result<ResealOutcome, VaultError> {
        self.reseal_with(batch, |_| {}).await
    }

    /// [`reseal`](Self::reseal), calling `progress` with the number of rows
    /// each batch handled (resealed or found unreadable), e.g. for a
    /// progress bar.
    ///
    /// # Errors
    /// As [`reseal`](Self::reseal).
    pub async fn reseal_with(
        &self,
        batch: usize,
        mut progress: impl FnMut(u64),
    ) -> Result<ResealOutcome, VaultError> {
        let span = tracing::info_span!("vault_reseal", batch);
        let batch = i64::try_from(batch.max(1)).unwrap_or(i64::MAX);
        self.reseal_batches(batch, &mut progress)
            .instrument(span)
            .await
    }

    async fn reseal_batches(
        &self,
        batch: i64,
        progress: &mut impl FnMut(u64),
    ) -> Result<ResealOutcome, VaultError> {
        let mut outcome = ResealOutcome::default();
        // Rows a refresh held are taken once the free ones are done, so one
        // slow provider does not hold up the rest.
        let mut busy = Vec::new();
        let step = |after: Cursor| {
            let this = self.clone();
            async move {
                detached(async move { this.reseal_batch(after, batch).await })
                    .await
                    .unwrap_or(Err(VaultError::Interrupted))
            }
        };
        let fold = |(done, skipped): (ResealOutcome, Vec<(String, String)>)| {
            outcome.resealed += done.resealed;
            outcome.unreadable += done.unreadable;
            busy.extend(skipped);
        };
        in_batches(None, step, fold, progress).await?;
        for (user, integration) in busy {
            let this = self.clone();
            let done = detached(async move { this.reseal_busy(&user, &integration).await })
                .await
                .unwrap_or(Err(VaultError::Interrupted))?;
            outcome.resealed += done.resealed;
            outcome.unreadable += done.unreadable;
            progress(done.resealed + done.unreadable);
        }
        tracing::info!(
            resealed = outcome.resealed,
            unreadable = outcome.unreadable,
            "vault tokens sealed under the first key"
        );
        Ok(outcome)
    }

    /// One batch of the free rows after `after`: what it resealed, the rows
    /// it skipped because a refresh held them, and where the next starts.
    async fn reseal_batch(
        &self,
        after: Cursor,
        batch: i64,
    ) -> Result<Step<(ResealOutcome, Vec<(String, String)>), Cursor>, VaultError> {
        let sql = &self.inner.sql;
        let current = self.inner.keyring.current_key_id().to_string();
        let mut tx = self.inner.pool.begin().await?;
        let rows = sql
            .lock_stale(&mut tx, &current, after.as_ref(), batch)
            .await?;
        let full = i64::try_from(rows.len()).unwrap_or(i64::MAX) >= batch;
        let upto = rows
            .last()
            .filter(|_| full)
            .map(|r| (r.user.clone(), r.integration.clone()));
        let skipped = sql
            .skipped(&mut tx, &current, after.as_ref(), upto.as_ref(), &rows)
            .await?;
        let done = self.write_resealed(&mut tx, &rows).await?;
        tx.commit().await?;
        Ok(Step {
            done: (done, skipped),
            rows: rows.len() as u64,
            next: upto.map(Some),
        })
    }

    /// A row a batch skipped, alone: waits (at most the lock timeout) for
    /// the refresh that holds it, then reseals what it wrote.
    async fn reseal_busy(
        &self,
        user: &str,
        integration: &str,
    ) -> Result<ResealOutcome, VaultError> {
        let sql = &self.inner.sql;
        let current = self.inner.keyring.current_key_id().to_string();
        let mut tx = self.inner.pool.begin().await?;
        sql.lock_timeout(&mut tx, self.lock_wait()).await?;
        // Gone, or sealed under the first key by its holder: nothing to do.
        let rows: Vec<ToReseal> = sql
            .lock_one_stale(&mut tx, &current, user, integration)
            .await?
            .into_iter()
            .collect();
        let done = self.write_resealed(&mut tx, &rows).await?;
        tx.commit().await?;
        Ok(done)
    }

    /// Writes the locked `rows` sealed under the first key; those that do
    /// not open are left as they are, and counted.
    async fn write_resealed(
        &self,
        conn: &mut sqlx::PgConnection,
        rows: &[ToReseal],
    ) -> Result<ResealOutcome, VaultError> {
        let sealed: Vec<ToReseal> = rows
            .iter()
            .filter_map(|r| self.reseal_row(r).ok())
            .collect();
        if !sealed.is_empty() {
            self.inner.sql.resealed(conn, &sealed).await?;
        }
        Ok(ResealOutcome {
            resealed: sealed.len() as u64,
            unreadable: (rows.len() - sealed.len()) as u64,
        })
    }

    /// The row's tokens sealed under the first key, or why not.
    fn reseal_row(&self, row: &ToReseal) -> Result<ToReseal, VaultError> {
        let (user, name) = (&row.user, &row.integration);
        let access = self.open(user, name, ACCESS, &row.access_token)?;
        let refresh = match &row.refresh_token {
            Some(rt) => Some(self.open(user, name, REFRESH, rt)?),
            None => None,
        };
        Ok(ToReseal {
            user: user.clone(),
            integration: name.clone(),
            access_token: self.seal(user, name, ACCESS, &access),
            refresh_token: refresh.map(|rt| self.seal(user, name, REFRESH, &rt)),
        })
    }
}
