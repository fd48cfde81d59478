//! Key retirement: which keys still seal stored tokens, and sealing them all
//! again under the keyring's first key.

use super::{sql::ToReseal, TokenVault, VaultError, ACCESS, REFRESH};
use tracing::Instrument;

use crate::store::detached;

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

    /// Seals every stored token again under the keyring's first key, `batch`
    /// rows per transaction. Safe while the application runs: each batch
    /// locks its rows (waiting for a refresh that holds one, then reading
    /// what it wrote), so no concurrent refresh is lost. Resumable: run it
    /// again after an error; [`key_usage`](Self::key_usage) shows what is left.
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
        let mut cursor: Cursor = None;
        loop {
            let this = self.clone();
            let after = cursor.clone();
            let (resealed, unreadable, next) =
                detached(async move { this.reseal_batch(after, batch).await })
                    .await
                    .unwrap_or(Err(VaultError::Interrupted))?;
            outcome.resealed += resealed;
            outcome.unreadable += unreadable;
            progress(resealed + unreadable);
            match next {
                Some(_) => cursor = next,
                None => {
                    tracing::info!(
                        resealed = outcome.resealed,
                        unreadable = outcome.unreadable,
                        "vault tokens sealed under the first key"
                    );
                    return Ok(outcome);
                }
            }
        }
    }

    async fn reseal_batch(
        &self,
        after: Cursor,
        batch: i64,
    ) -> Result<(u64, u64, Cursor), VaultError> {
        let current = self.inner.keyring.current_key_id().to_string();
        let mut tx = self.inner.pool.begin().await?;
        self.inner
            .sql
            .lock_timeout(&mut tx, self.lock_wait())
            .await?;
        let rows = self
            .inner
            .sql
            .lock_stale(&mut tx, &current, after.as_ref(), batch)
            .await?;
        let Some(last) = rows.last().map(|r| (r.user.clone(), r.integration.clone())) else {
            tx.rollback().await?;
            return Ok((0, 0, None));
        };
        let total = rows.len();
        let sealed: Vec<ToReseal> = rows
            .iter()
            .filter_map(|r| self.reseal_row(r).ok())
            .collect();
        if !sealed.is_empty() {
            self.inner.sql.resealed(&mut tx, &sealed).await?;
        }
        tx.commit().await?;
        let done = sealed.len() as u64;
        Ok((done, (total - sealed.len()) as u64, Some(last)))
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
