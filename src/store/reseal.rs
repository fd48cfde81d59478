//! Key retirement in session rows: which keys still seal the login guard's
//! values (the login record under `oidc`, pending logins under
//! `oidc.login.*` and the token vault's pending account connections under
//! `vault.connect.*`), and sealing them all again under the keyring's first
//! key.
//!
//! Safe while the application runs. A batch locks only rows no one else
//! holds (`FOR UPDATE SKIP LOCKED`), so a request never queues behind a
//! batch that itself waits; once the free rows are done, the rows skipped
//! are taken one at a time, each waiting for its holder as a request would,
//! so none is left behind and none holds up the rest. Each write changes the row's version: a request that loaded the
//! row before saves through the conflict path, which re-applies its own
//! changes to the resealed data, so neither write is lost.

use std::time::Duration;

use sqlx::Row;
use time::OffsetDateTime;
use tracing::Instrument;

use super::{
    detached,
    paged::{in_batches, Step},
    schema::SessType,
    to_col, PgStore, StoreError, Tx,
};
use crate::{
    crypto::{key_id_sql, Keyring},
    oidc::record::{reseal_entry, Resealed},
    session::{
        data::Data,
        reserved::{CONNECT_PREFIX, PENDING_PREFIX, USER_KEY},
    },
    vault::{KeyUsage, ResealOutcome},
};

/// How long a busy row is waited for: longer than a token refresh holding
/// it can take (the guard's HTTP timeout) means it is stuck.
const BUSY_WAIT: Duration = Duration::from_secs(30);

/// The statements, for this table's layout.
struct ResealSql {
    usage: String,
    count: String,
    lock_batch: String,
    skipped: String,
    lock_one: String,
    write: String,
}

/// `$1` now, `$2` the login record's key, `$3` the pending requests'
/// prefixes (logins and account connections).
fn sealed_entries(t: &str, now: &str) -> String {
    format!(
        "{t} AS t CROSS JOIN LATERAL jsonb_each(CASE WHEN jsonb_typeof(t.sess::jsonb) = 'object' \
           THEN t.sess::jsonb ELSE '{{}}'::jsonb END) AS e \
         WHERE t.expire > {now} AND (e.key = $2 OR e.key ^@ ANY($3::text[])) \
           AND jsonb_typeof(e.value) = 'string'"
    )
}

impl ResealSql {
    fn new(store: &PgStore, sess: SessType, expire: &super::schema::ExpireType) -> Self {
        let t = store.inner.name.qualified();
        let now = to_col(expire, "$1");
        let kid = key_id_sql("(e.value #>> '{}')");
        // Parameters from $4 on: the current key id, then per statement.
        let stale = format!(
            "EXISTS (SELECT FROM jsonb_each(CASE WHEN jsonb_typeof(t.sess::jsonb) = 'object' \
               THEN t.sess::jsonb ELSE '{{}}'::jsonb END) AS e \
             WHERE (e.key = $2 OR e.key ^@ ANY($3::text[])) AND jsonb_typeof(e.value) = 'string' \
               AND {kid} <> $4)"
        );
        let json = match sess {
            SessType::Json => "json",
            SessType::Jsonb => "jsonb",
        };
        Self {
            usage: format!(
                "SELECT k, count(*) FROM (SELECT {kid} AS k FROM {entries}) s GROUP BY k ORDER BY k",
                entries = sealed_entries(&t, &now)
            ),
            count: format!("SELECT count(*) FROM {t} AS t WHERE t.expire > {now} AND {stale}"),
            // $5 after this sid, $6 at most this many rows.
            lock_batch: format!(
                "SELECT t.sid::text, t.sess::text FROM {t} AS t \
                 WHERE t.sid > $5 AND t.expire > {now} AND {stale} \
                 ORDER BY t.sid LIMIT $6 FOR UPDATE SKIP LOCKED"
            ),
            // $5 after this sid, $6 up to this one (NULL: no bound), $7 the
            // rows the batch holds. A plain read: what the batch skipped.
            skipped: format!(
                "SELECT t.sid::text FROM {t} AS t \
                 WHERE t.sid > $5 AND ($6::text IS NULL OR t.sid <= $6) \
                   AND NOT (t.sid = ANY($7::text[])) AND t.expire > {now} AND {stale} \
                 ORDER BY t.sid"
            ),
            // $5 the row.
            lock_one: format!(
                "SELECT t.sid::text, t.sess::text FROM {t} AS t \
                 WHERE t.sid = $5 AND t.expire > {now} AND {stale} FOR UPDATE"
            ),
            write: format!(
                "UPDATE {t} AS t SET sess = n.sess::{json} \
                 FROM unnest($1::text[], $2::text[]) AS n(sid, sess) WHERE t.sid = n.sid"
            ),
        }
    }
}

/// The session keys of pending requests, whose values are sealed too.
const PENDING: [&str; 2] = [PENDING_PREFIX, CONNECT_PREFIX];

/// A locked row and what resealing it gave.
struct Done {
    sid: String,
    sess: Option<String>,
    unreadable: bool,
}

impl PgStore {
    /// `sql` with the parameters every statement over the guard's sealed
    /// values starts with: $1 now, $2 the login record's key, $3 the
    /// pending values' prefixes.
    fn sealed_values<'q>(
        &self,
        sql: &'q str,
        now: OffsetDateTime,
    ) -> sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments> {
        sqlx::query(sql)
            .persistent(self.persistent())
            .bind(now)
            .bind(USER_KEY)
            .bind(PENDING.to_vec())
    }

    /// How many of the login guard's sealed values in live sessions each key
    /// id seals (`"malformed"` for values that are no sealed envelope), so
    /// an operator knows when an old key can leave the keyring: when it
    /// seals none here and in the token vault
    /// ([`TokenVault::key_usage`](crate::vault::TokenVault::key_usage)).
    /// One scan of the table.
    ///
    /// # Errors
    /// [`StoreError::Database`].
    pub async fn session_key_usage(&self) -> Result<Vec<KeyUsage>, StoreError> {
        let sql = self.reseal_sql().await?;
        let mut conn = self.conn().await?;
        let rows = self
            .sealed_values(&sql.usage, OffsetDateTime::now_utc())
            .fetch_all(conn.get())
            .await?;
        conn.done().await?;
        rows.iter()
            .map(|r| {
                Ok(KeyUsage::new(
                    r.try_get(0)?,
                    u64::try_from(r.try_get::<i64, _>(1)?).unwrap_or(0),
                ))
            })
            .collect()
    }

    /// How many live sessions hold a login value sealed under another key
    /// than the first of `keys`: what
    /// [`reseal_sessions`](Self::reseal_sessions) goes through (rows whose
    /// value opens under no key included), e.g. a progress bar's total.
    ///
    /// # Errors
    /// [`StoreError::Database`].
    pub async fn session_rows_to_reseal(&self, keys: &Keyring) -> Result<u64, StoreError> {
        let sql = self.reseal_sql().await?;
        let mut conn = self.conn().await?;
        let row = self
            .sealed_values(&sql.count, OffsetDateTime::now_utc())
            .bind(keys.current_key_id().to_string())
            .fetch_one(conn.get())
            .await?;
        conn.done().await?;
        Ok(u64::try_from(row.try_get::<i64, _>(0)?).unwrap_or(0))
    }

    /// Seals the login guard's values in every live session again under the
    /// first key of `keys` (the keyring the guard runs with), `batch` rows
    /// per transaction; values that do not open are left as they are and
    /// their rows counted. Safe while the application runs: a batch locks
    /// only rows no one else holds, and the rows skipped are taken one at a
    /// time at the end, each waiting for its holder; a request that loaded a row before
    /// saves through the conflict path, which re-applies its own changes to
    /// the resealed data. Resumable: run it again after an error, and
    /// [`session_key_usage`](Self::session_key_usage) shows what is left.
    /// Run it once every instance seals with the new first key.
    ///
    /// # Errors
    /// [`StoreError::Database`]; what earlier batches resealed stays resealed.
    pub async fn reseal_sessions(
        &self,
        keys: &Keyring,
        batch: usize,
    ) -> Result<ResealOutcome, StoreError> {
        self.reseal_sessions_with(keys, batch, |_| {}).await
    }

    /// [`reseal_sessions`](Self::reseal_sessions), calling `progress` with
    /// the number of rows each step handled, e.g. for a progress bar.
    ///
    /// # Errors
    /// As [`reseal_sessions`](Self::reseal_sessions).
    pub async fn reseal_sessions_with(
        &self,
        keys: &Keyring,
        batch: usize,
        mut progress: impl FnMut(u64),
    ) -> Result<ResealOutcome, StoreError> {
        let span = tracing::info_span!("session_reseal", batch);
        let limit = i64::try_from(batch.max(1)).unwrap_or(i64::MAX);
        async {
            let outcome = self.reseal_all(keys, limit, &mut progress).await?;
            if outcome.unreadable > 0 {
                // Counted, not named: a session's key is a credential.
                tracing::warn!(
                    rows = outcome.unreadable,
                    "session rows hold a login value that opens under no key of the keyring; left as they were"
                );
            }
            tracing::info!(
                resealed = outcome.resealed,
                unreadable = outcome.unreadable,
                "session login records sealed under the first key"
            );
            Ok(outcome)
        }
        .instrument(span)
        .await
    }

    async fn reseal_all(
        &self,
        keys: &Keyring,
        limit: i64,
        progress: &mut impl FnMut(u64),
    ) -> Result<ResealOutcome, StoreError> {
        let mut outcome = ResealOutcome::default();
        // Rows others held are taken once the free ones are done, so one
        // busy row does not hold up the rest.
        let mut busy = Vec::new();
        let step = |after: String| {
            let (this, keys) = (self.clone(), keys.clone());
            async move {
                detached(async move { this.reseal_batch(&keys, &after, limit).await })
                    .await
                    .ok_or(StoreError::Database(sqlx::Error::WorkerCrashed))?
            }
        };
        let fold = |(rows, skipped): (Vec<Done>, Vec<String>)| {
            outcome.add(&rows);
            busy.extend(skipped);
        };
        in_batches(String::new(), step, fold, progress).await?;
        for sid in busy {
            let (this, keys_) = (self.clone(), keys.clone());
            let row = detached(async move { this.reseal_busy(&keys_, &sid).await })
                .await
                .ok_or(StoreError::Database(sqlx::Error::WorkerCrashed))??;
            outcome.add(&row);
            progress(row.len() as u64);
        }
        Ok(outcome)
    }

    /// One batch of free rows after `after`: the rows resealed (or found
    /// unreadable), the rows it skipped because others held them, and where
    /// the next batch starts (`None` when this one reached the end).
    async fn reseal_batch(
        &self,
        keys: &Keyring,
        after: &str,
        limit: i64,
    ) -> Result<Step<(Vec<Done>, Vec<String>), String>, StoreError> {
        let sql = self.reseal_sql().await?;
        let current = keys.current_key_id().to_string();
        let now = OffsetDateTime::now_utc();
        let mut tx = self.begin().await?;
        let locked = self
            .sealed_values(&sql.lock_batch, now)
            .bind(&current)
            .bind(after)
            .bind(limit)
            .fetch_all(&mut *tx)
            .await?;
        let full = i64::try_from(locked.len()).unwrap_or(i64::MAX) >= limit;
        let rows = locked
            .iter()
            .map(|r| Ok(reseal_row(keys, r.try_get(0)?, &r.try_get::<String, _>(1)?)))
            .collect::<Result<Vec<_>, StoreError>>()?;
        let held: Vec<&str> = rows.iter().map(|r| r.sid.as_str()).collect();
        let last = full.then(|| held.last().map(|s| (*s).to_owned())).flatten();
        let skipped = self
            .sealed_values(&sql.skipped, now)
            .bind(&current)
            .bind(after)
            .bind(last.as_deref())
            .bind(&held)
            .fetch_all(&mut *tx)
            .await?
            .iter()
            .map(|r| r.try_get(0))
            .collect::<Result<Vec<String>, _>>()?;
        self.write_resealed(tx, &sql.write, &rows).await?;
        Ok(Step {
            rows: rows.len() as u64,
            done: (rows, skipped),
            next: last,
        })
    }

    /// A row a batch skipped, alone: waits for whoever holds it.
    async fn reseal_busy(&self, keys: &Keyring, sid: &str) -> Result<Vec<Done>, StoreError> {
        let sql = self.reseal_sql().await?;
        let mut tx = self.begin().await?;
        sqlx::query("SELECT set_config('lock_timeout', $1, true)")
            .persistent(self.persistent())
            .bind(format!("{}ms", BUSY_WAIT.as_millis()))
            .execute(&mut *tx)
            .await?;
        let row = self
            .sealed_values(&sql.lock_one, OffsetDateTime::now_utc())
            .bind(keys.current_key_id().to_string())
            .bind(sid)
            .fetch_optional(&mut *tx)
            .await?;
        // Gone, expired or resealed by its holder meanwhile: nothing to do.
        let rows = match row {
            Some(r) => vec![reseal_row(keys, r.try_get(0)?, &r.try_get::<String, _>(1)?)],
            None => Vec::new(),
        };
        self.write_resealed(tx, &sql.write, &rows).await?;
        Ok(rows)
    }

    async fn write_resealed(&self, mut tx: Tx, sql: &str, rows: &[Done]) -> Result<(), StoreError> {
        let (sids, sess): (Vec<&str>, Vec<&str>) = rows
            .iter()
            .filter_map(|r| Some((r.sid.as_str(), r.sess.as_deref()?)))
            .unzip();
        if !sids.is_empty() {
            sqlx::query(sql)
                .persistent(self.persistent())
                .bind(&sids)
                .bind(&sess)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    async fn reseal_sql(&self) -> Result<ResealSql, StoreError> {
        let ready = self.ready().await?;
        Ok(ResealSql::new(
            self,
            ready.layout.sess,
            &ready.layout.expire,
        ))
    }
}

/// The row's data with the guard's values sealed again (`None`: nothing to
/// write), and whether one did not open.
fn reseal_row(keys: &Keyring, sid: String, sess: &str) -> Done {
    let Some(mut data) = Data::parse(sess) else {
        return Done {
            sid,
            sess: None,
            unreadable: false,
        };
    };
    let mut unreadable = false;
    let mut changed = Vec::new();
    for (key, value) in data.iter() {
        match reseal_entry(keys, &sid, key, value) {
            Resealed::Sealed(again) => changed.push((key.to_owned(), again)),
            Resealed::Unreadable => unreadable = true,
            Resealed::NotSealed | Resealed::Current => {}
        }
    }
    let written = !changed.is_empty();
    for (key, value) in changed {
        data.set(&key, value);
    }
    Done {
        sid,
        sess: written.then(|| data.to_json()),
        unreadable,
    }
}

impl ResealOutcome {
    fn add(&mut self, rows: &[Done]) {
        for row in rows {
            if row.unreadable {
                self.unreadable += 1;
            } else if row.sess.is_some() {
                self.resealed += 1;
            }
        }
    }
}
