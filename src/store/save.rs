//! The session layer's writes: one method executes a planned write,
//! conflict path included, and one updates a row under its lock. No
//! transaction leaves this module.

use std::future::Future;

use time::OffsetDateTime;

use super::{detached, Loaded, NewRow, PgStore, StoreError, Tx, WaitBudget};

/// A write the session layer planned.
#[derive(Debug)]
pub(crate) enum Write<'a> {
    /// End the session stored under `key`.
    Delete { key: &'a str },
    /// Create a row under `key`, unless the id is taken.
    Insert {
        key: &'a str,
        row: NewRow<'a>,
        now: OffsetDateTime,
    },
    /// Write the row loaded as `version`, under `new_key` (a new id) or its
    /// own `key`.
    Update {
        key: &'a str,
        new_key: &'a str,
        version: &'a str,
        row: NewRow<'a>,
        now: OffsetDateTime,
    },
}

/// What [`PgStore::save`] did.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Written {
    /// The row was deleted (or was not there).
    Deleted,
    /// Created, now at this version.
    Inserted(String),
    /// The id is taken: nothing was written.
    Taken,
    /// Written over the version loaded, now at this version.
    Updated(String),
    /// The row had changed: written under its lock as the merge said.
    Merged(String),
    /// The row had changed and the merge declined: nothing was written.
    Declined,
    /// The row is gone (logout, revocation, prune): nothing was written,
    /// and no row was re-created.
    Gone,
}

/// A row to write, owned (computed under a row lock).
#[derive(Debug, Clone)]
pub(crate) struct OwnedRow {
    pub(crate) sess: String,
    pub(crate) expire: OffsetDateTime,
    pub(crate) user_id: Option<String>,
    pub(crate) provider_sid: Option<String>,
}

impl OwnedRow {
    /// A copy of `row`'s values; what a row records only at creation stays out.
    pub(crate) fn from_new(row: &NewRow<'_>) -> Self {
        Self {
            sess: row.sess.to_owned(),
            expire: row.expire,
            user_id: row.user_id.map(str::to_owned),
            provider_sid: row.provider_sid.map(str::to_owned),
        }
    }

    pub(crate) fn borrowed(&self) -> NewRow<'_> {
        NewRow {
            sess: &self.sess,
            expire: self.expire,
            user_id: self.user_id.as_deref(),
            provider_sid: self.provider_sid.as_deref(),
            user_agent: None,
            ip: None,
        }
    }
}

/// What an update does when the row changed since it was loaded.
pub(crate) trait Merge {
    /// Whether to lock the row and merge at all.
    fn wanted(&mut self) -> bool;
    /// The row to write over `fresh`, read under its lock; `None` leaves it
    /// as it is.
    fn merge(&mut self, fresh: Loaded) -> Option<OwnedRow>;
}

impl PgStore {
    /// Executes `write`. An update of a row changed since it was loaded
    /// locks the row and writes what `merge` makes of the fresh one; a row
    /// gone meanwhile is never re-created. Waits for connections and row
    /// locks come out of `waits`; the write under a lock already held
    /// waits for neither, and is not cut short.
    pub(crate) async fn save(
        &self,
        write: Write<'_>,
        merge: &mut impl Merge,
        waits: &WaitBudget,
    ) -> Result<Written, StoreError> {
        let (key, new_key, version, row, now) = match write {
            Write::Delete { key } => {
                waits.run(self.delete(key)).await?;
                return Ok(Written::Deleted);
            }
            Write::Insert { key, row, now } => {
                return Ok(match waits.run(self.insert_shared(key, &row, now)).await? {
                    Some(version) => Written::Inserted(version),
                    None => Written::Taken,
                });
            }
            Write::Update {
                key,
                new_key,
                version,
                row,
                now,
            } => (key, new_key, version, row, now),
        };
        // A save under the same key may share its statement with others; a
        // new id (login) goes alone.
        let updated = if new_key == key {
            waits
                .run(self.update_shared(key, version, &row, now))
                .await?
        } else {
            waits
                .run(self.update(key, new_key, version, &row, now))
                .await?
        };
        if let Some(version) = updated {
            return Ok(Written::Updated(version));
        }
        if !merge.wanted() {
            return Ok(Written::Declined);
        }
        let Some((tx, fresh)) = waits.run(self.lock_row(key, now)).await? else {
            return Ok(Written::Gone);
        };
        // Dropping `tx` on a refusal rolls back: the row stays as it was.
        let Some(merged) = merge.merge(fresh) else {
            return Ok(Written::Declined);
        };
        let version = self
            .write_locked(tx, key, new_key, &merged.borrowed())
            .await?;
        Ok(Written::Merged(version))
    }

    /// Runs `f` on the live row under `key` while it is locked and writes
    /// the row `f` returns, if any (else leaves it as it is); `None` when
    /// there is no live row. Also returns the row's version after. The wait
    /// for the row comes out of `waits`; `f` (which may call an identity
    /// provider) and the write do not.
    pub(crate) async fn update_locked<T, F, Fut>(
        &self,
        key: &str,
        now: OffsetDateTime,
        waits: &WaitBudget,
        f: F,
    ) -> Result<Option<(T, String)>, StoreError>
    where
        F: FnOnce(Loaded) -> Fut,
        Fut: Future<Output = (Option<OwnedRow>, T)>,
    {
        let Some((tx, fresh)) = waits.run(self.lock_row(key, now)).await? else {
            return Ok(None);
        };
        let version = fresh.version.clone();
        let (row, out) = f(fresh).await;
        let version = match row {
            Some(row) => self.write_locked(tx, key, key, &row.borrowed()).await?,
            None => {
                tx.commit().await?;
                version
            }
        };
        Ok(Some((out, version)))
    }

    /// Locks the live row for the rest of the returned transaction. `None`
    /// when there is no live row: it is then not re-created by anyone holding
    /// this result.
    async fn lock_row(
        &self,
        key: &str,
        now: OffsetDateTime,
    ) -> Result<Option<(Tx, Loaded)>, StoreError> {
        let ready = self.ready().await?;
        let mut tx = self.begin().await?;
        let row = ready
            .sql
            .select_for_update_query(key, now)
            .persistent(self.persistent())
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
    /// and commits. Once called it completes even if the caller is dropped:
    /// what it writes was computed under the row lock, so it is never stale,
    /// and work done meanwhile (a token refresh) is not lost.
    async fn write_locked(
        &self,
        tx: Tx,
        key: &str,
        new_key: &str,
        row: &NewRow<'_>,
    ) -> Result<String, StoreError> {
        let store = self.clone();
        let (key, new_key) = (key.to_owned(), new_key.to_owned());
        let row = OwnedRow::from_new(row);
        detached(async move {
            store
                .write_and_commit(tx, &key, &new_key, &row.borrowed())
                .await
        })
        .await
        .ok_or(StoreError::Database(sqlx::Error::WorkerCrashed))?
    }

    async fn write_and_commit(
        &self,
        mut tx: Tx,
        key: &str,
        new_key: &str,
        row: &NewRow<'_>,
    ) -> Result<String, StoreError> {
        let ready = self.ready().await?;
        let version = ready
            .sql
            .update_locked_query(key, new_key, row)
            .persistent(self.persistent())
            .fetch_one(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(version)
    }
}
