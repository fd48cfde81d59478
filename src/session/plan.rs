//! What a save writes, decided from the request's state alone: no I/O, so
//! every case is a unit test. The store executes the plan
//! ([`PgStore::save`](crate::store::PgStore)), conflict path included.

use time::OffsetDateTime;

use super::{
    cookie::{CookieConfig, SessionId},
    data::Data,
    expiry::Expiry,
    express,
    handle::State,
};

/// What shapes a save, fixed per layer.
#[derive(Clone, Copy)]
pub(crate) struct SavePolicy<'a> {
    pub(crate) expiry: Expiry,
    pub(crate) max_size: usize,
    pub(crate) hashed_ids: bool,
    /// Express mode: `sess` carries express-session's cookie object.
    pub(crate) express: Option<&'a CookieConfig>,
}

impl SavePolicy<'_> {
    /// Stamps `data` for a row expiring at `expire` (Express mode only).
    pub(crate) fn stamp(&self, data: &mut Data, expire: OffsetDateTime) {
        if let Some(cookie) = self.express {
            express::stamp(cookie, self.expiry.max_age(), data, expire);
        }
    }

    /// Refuses more than the limit: `size` is the exact length of the
    /// `sess` text to be written (or of the data before it is stamped).
    pub(crate) fn fits(&self, size: usize) -> Result<(), TooLarge> {
        if size <= self.max_size {
            Ok(())
        } else {
            Err(TooLarge {
                size,
                limit: self.max_size,
            })
        }
    }
}

/// The data would exceed the size limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct TooLarge {
    pub(crate) size: usize,
    pub(crate) limit: usize,
}

/// The next write of a save. A destroyed session that got new data is two
/// plans: the delete, then (planned again once it is done) the insert.
#[derive(Debug)]
pub(crate) enum SavePlan {
    /// Nothing to write; pending flags, if any, can be dropped.
    Nothing,
    /// End the session stored under `key`.
    Delete { key: String },
    /// Create a row for `id`.
    Insert(Written),
    /// Write the loaded row (stored under `key`, at `version`) as `id`: the
    /// same id, or a new one when it is cycled.
    Update {
        key: String,
        version: String,
        created_at: Option<OffsetDateTime>,
        write: Written,
    },
}

/// The row a plan writes.
#[derive(Debug)]
pub(crate) struct Written {
    pub(crate) id: SessionId,
    /// The data as stored (stamped in Express mode).
    pub(crate) data: Data,
    pub(crate) sess: String,
    pub(crate) expire: OffsetDateTime,
}

/// Plans the next write of a save of `st` at `now`.
pub(crate) fn plan_save(
    st: &State,
    policy: &SavePolicy<'_>,
    now: OffsetDateTime,
) -> Result<SavePlan, TooLarge> {
    if let Some(key) = &st.delete_key {
        return Ok(SavePlan::Delete { key: key.clone() });
    }
    if st.changes.is_empty() && !st.cycle && !st.meta_changed {
        return Ok(SavePlan::Nothing);
    }
    policy.fits(st.data.encoded_len())?;
    let Some(row) = &st.row else {
        if st.data.is_empty() && !st.meta_changed {
            return Ok(SavePlan::Nothing);
        }
        let id = st.next_id.clone().unwrap_or_else(SessionId::generate);
        let expire = policy.expiry.expire_at(now, None);
        return Ok(SavePlan::Insert(stamped(st, policy, id, expire)?));
    };
    let id = match (st.cycle, &st.next_id) {
        (false, _) => row.id.clone(),
        (true, Some(next)) => next.clone(),
        (true, None) => SessionId::generate(),
    };
    // Keep `expire` unless its extension is due: an update that changes
    // no indexed column can be a HOT update (no index writes).
    let expire = policy.expiry.next_expire(now, row.created_at, row.expire);
    Ok(SavePlan::Update {
        key: row.id.storage_key(policy.hashed_ids),
        version: row.version.clone(),
        created_at: row.created_at,
        write: stamped(st, policy, id, expire)?,
    })
}

fn stamped(
    st: &State,
    policy: &SavePolicy<'_>,
    id: SessionId,
    expire: OffsetDateTime,
) -> Result<Written, TooLarge> {
    let mut data = st.data.clone();
    policy.stamp(&mut data, expire);
    let sess = data.to_json();
    policy.fits(sess.len())?;
    Ok(Written {
        id,
        data,
        sess,
        expire,
    })
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use serde_json::value::to_raw_value;

    use super::*;
    use crate::session::handle::Row;

    const HOUR: Duration = Duration::from_secs(3600);

    fn now() -> OffsetDateTime {
        OffsetDateTime::UNIX_EPOCH + time::Duration::days(20_000)
    }

    fn policy(max_size: usize) -> SavePolicy<'static> {
        SavePolicy {
            expiry: Expiry {
                idle: Some(10 * HOUR),
                absolute: None,
                touch_fraction: 0.1,
            },
            max_size,
            hashed_ids: false,
            express: None,
        }
    }

    fn loaded(expire: OffsetDateTime) -> State {
        State {
            loaded: true,
            row: Some(Row {
                id: SessionId::generate(),
                version: "7".into(),
                created_at: None,
                expire,
            }),
            ..State::default()
        }
    }

    fn set(st: &mut State, key: &str, value: &str) {
        let raw = to_raw_value(value).unwrap_or_else(|_| unreachable!());
        st.data.set(key, raw.clone());
        st.changes.push((key.to_owned(), Some(raw)));
    }

    #[test]
    fn nothing_pending_writes_nothing() {
        let st = loaded(now() + HOUR);
        assert!(matches!(
            plan_save(&st, &policy(1000), now()),
            Ok(SavePlan::Nothing)
        ));
        let new = State::default();
        assert!(matches!(
            plan_save(&new, &policy(1000), now()),
            Ok(SavePlan::Nothing)
        ));
    }

    #[test]
    fn a_new_session_with_data_is_inserted_under_its_fixed_id() {
        let mut st = State::default();
        set(&mut st, "a", "b");
        let id = SessionId::generate();
        st.next_id = Some(id.clone());
        let Ok(SavePlan::Insert(w)) = plan_save(&st, &policy(1000), now()) else {
            panic!("not an insert");
        };
        assert_eq!(w.id, id);
        assert_eq!(w.sess, r#"{"a":"b"}"#);
        assert_eq!(w.expire, now() + 10 * HOUR);
    }

    #[test]
    fn a_new_session_left_empty_is_not_written() {
        let mut st = State::default();
        set(&mut st, "a", "b");
        st.data.remove("a");
        st.changes.push(("a".into(), None));
        assert!(matches!(
            plan_save(&st, &policy(1000), now()),
            Ok(SavePlan::Nothing)
        ));
    }

    #[test]
    fn an_update_keeps_expire_until_the_extension_is_due() {
        let recent = now() + HOUR.mul_f64(9.5);
        let mut st = loaded(recent);
        set(&mut st, "a", "b");
        let Ok(SavePlan::Update {
            key,
            version,
            write,
            ..
        }) = plan_save(&st, &policy(1000), now())
        else {
            panic!("not an update");
        };
        let row = st.row.as_ref().map(|r| r.id.clone());
        assert_eq!(Some(write.id.clone()), row);
        assert_eq!(Some(key), row.map(|id| id.storage_key(false)));
        assert_eq!(version, "7");
        assert_eq!(write.expire, recent);
    }

    #[test]
    fn a_cycled_session_is_written_under_the_new_id() {
        let mut st = loaded(now() + HOUR);
        st.cycle = true;
        let next = SessionId::generate();
        st.next_id = Some(next.clone());
        let Ok(SavePlan::Update { key, write, .. }) = plan_save(&st, &policy(1000), now()) else {
            panic!("not an update");
        };
        assert_eq!(write.id, next);
        assert_ne!(key, next.storage_key(false));
        assert_eq!(write.expire, now() + 10 * HOUR, "the extension was due");
    }

    #[test]
    fn a_destroyed_session_is_deleted_first() {
        let mut st = State {
            delete_key: Some("old".into()),
            ..State::default()
        };
        set(&mut st, "a", "b");
        assert!(matches!(
            plan_save(&st, &policy(1000), now()),
            Ok(SavePlan::Delete { key }) if key == "old"
        ));
    }

    #[test]
    fn data_over_the_limit_is_refused() {
        let mut st = loaded(now() + HOUR);
        set(&mut st, "a", "0123456789");
        assert_eq!(
            plan_save(&st, &policy(10), now()).err(),
            Some(TooLarge {
                size: st.data.encoded_len(),
                limit: 10
            })
        );
    }
}
