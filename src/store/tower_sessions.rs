//! [`PgStore`] as a `tower_sessions::SessionStore`, for tower-sessions and
//! axum-login users. Rows share the table and its guarantees: creation is one
//! atomic insert, a save never re-creates a row deleted meanwhile.

use async_trait::async_trait;
use time::OffsetDateTime;
use tower_sessions_core::{
    session::{Id, Record},
    session_store::{self, ExpiredDeletion, SessionStore},
};

use super::{LoadPolicy, NewRow, PgStore, StoreError};

#[cfg_attr(docsrs, doc(cfg(feature = "tower-sessions")))]
impl From<StoreError> for session_store::Error {
    fn from(e: StoreError) -> Self {
        session_store::Error::Backend(e.to_string())
    }
}

/// `t` to the microsecond, the precision Postgres keeps: `create` stores
/// its record so, so that the record `load` returns equals it.
fn to_micros(t: OffsetDateTime) -> OffsetDateTime {
    let nanos = t.nanosecond();
    t.replace_nanosecond(nanos - nanos % 1_000).unwrap_or(t)
}

fn encode(record: &Record) -> session_store::Result<String> {
    serde_json::to_string(&record.data).map_err(|e| session_store::Error::Encode(e.to_string()))
}

#[cfg_attr(docsrs, doc(cfg(feature = "tower-sessions")))]
#[async_trait]
impl SessionStore for PgStore {
    async fn create(&self, record: &mut Record) -> session_store::Result<()> {
        let sess = encode(record)?;
        let now = OffsetDateTime::now_utc();
        record.expiry_date = to_micros(record.expiry_date);
        let row = NewRow {
            sess: &sess,
            expire: record.expiry_date,
            user_id: None,
            provider_sid: None,
            user_agent: None,
            ip: None,
        };
        loop {
            if self
                .insert(&record.id.to_string(), &row, now)
                .await?
                .is_some()
            {
                return Ok(());
            }
            // Taken: pick another id, as the trait asks of stores.
            record.id = Id::default();
        }
    }

    async fn save(&self, record: &Record) -> session_store::Result<()> {
        let sess = encode(record)?;
        let ready = self.ready().await?;
        let mut conn = self.conn().await?;
        sqlx::query(&ready.sql.save_any)
            .persistent(self.persistent())
            .bind(record.id.to_string())
            .bind(&sess)
            .bind(to_micros(record.expiry_date))
            .execute(conn.get())
            .await
            .map_err(StoreError::from)?;
        conn.done().await.map_err(StoreError::from)?;
        Ok(())
    }

    async fn load(&self, id: &Id) -> session_store::Result<Option<Record>> {
        // tower-sessions extends expiry through `save`; never touch here.
        let Some(row) = self
            .load_shared(id.to_string(), LoadPolicy::READ_ONLY)
            .await?
        else {
            return Ok(None);
        };
        let data = serde_json::from_str(&row.sess)
            .map_err(|e| session_store::Error::Decode(e.to_string()))?;
        Ok(Some(Record {
            id: *id,
            data,
            expiry_date: row.expire,
        }))
    }

    async fn delete(&self, id: &Id) -> session_store::Result<()> {
        PgStore::delete(self, &id.to_string()).await?;
        Ok(())
    }
}

#[cfg_attr(docsrs, doc(cfg(feature = "tower-sessions")))]
#[async_trait]
impl ExpiredDeletion for PgStore {
    async fn delete_expired(&self) -> session_store::Result<()> {
        self.prune_expired_with(&super::PruneConfig::new(), |_| ())
            .await?;
        Ok(())
    }
}
