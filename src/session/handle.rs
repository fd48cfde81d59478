//! The [`Session`] handle that handlers use.

use std::{
    fmt,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
};

use serde::{de::DeserializeOwned, Serialize};
use serde_json::value::RawValue;
use time::OffsetDateTime;
use tokio::sync::Mutex;

use super::{
    cookie::SessionId,
    data::{self, Data},
    layer::Config,
    locked::{LockedError, SealContext, Write as Update},
    plan::{plan_save, SavePlan, TooLarge},
    reserved, SessionError,
};
use tracing::Instrument;

use crate::{
    log_safe::untrusted,
    metrics,
    store::{
        detached, Loaded, Merge, NewRow, OwnedRow, PgStore, StoreError, WaitBudget, Write, Written,
    },
};

/// The session of the current request, found in the request extensions.
///
/// Nothing is read from the database until a method needs the data, so a
/// request that never looks at its session costs no query. Changes are kept
/// per key and written once, when the response is ready (or at
/// [`Session::save`]); if another request changed the same session meanwhile,
/// this request's changes are re-applied on top of the other's rather than
/// overwriting them.
#[derive(Clone)]
pub struct Session {
    shared: Arc<Shared>,
}

struct Shared {
    store: PgStore,
    config: Arc<Config>,
    incoming: Option<SessionId>,
    client: ClientInfo,
    state: Mutex<State>,
    /// The request was dropped before its response was ready (see
    /// [`Session::abandon`]).
    abandoned: AtomicBool,
    /// Bounds the request's database waits together (load, save, retries,
    /// the conflict path) by the pool's acquire timeout.
    waits: WaitBudget,
}

#[derive(Default)]
pub(super) struct State {
    pub(super) loaded: bool,
    pub(super) row: Option<Row>,
    pub(super) data: Data,
    /// Key-level changes in the order made: `None` removes the key.
    pub(super) changes: Changes,
    pub(super) user_id: Option<String>,
    pub(super) provider_sid: Option<String>,
    pub(super) meta_changed: bool,
    pub(super) cycle: bool,
    /// The id a new or cycled session will get, fixed early when something
    /// must be bound to it before the save (see [`Session::binding_key`]).
    pub(super) next_id: Option<SessionId>,
    pub(super) delete_key: Option<String>,
    pub(super) cookie: CookieAction,
    pub(super) failure: Option<Failure>,
    /// The cookie was signed by a retired key: send it again, signed anew.
    pub(super) resign: bool,
}

/// The stored row this session is bound to.
#[derive(Clone)]
pub(super) struct Row {
    pub(super) id: SessionId,
    pub(super) version: String,
    pub(super) created_at: Option<OffsetDateTime>,
    pub(super) expire: OffsetDateTime,
}

/// What the application opted in to record about the client at creation.
#[derive(Debug, Clone, Default)]
pub(crate) struct ClientInfo {
    pub(crate) user_agent: Option<String>,
    pub(crate) ip: Option<String>,
}

/// Key-level changes: `None` removes the key.
pub(crate) type Changes = Vec<(String, Option<Box<RawValue>>)>;

/// What the response must say to the browser about the cookie.
#[derive(Debug, Clone, Default)]
pub(crate) enum CookieAction {
    #[default]
    Keep,
    Set(SessionId, OffsetDateTime),
    Remove,
}

/// A failure the response must report, whatever the handler returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Failure {
    Unavailable,
    TooLarge,
}

/// What the response future applies once the handler is done.
#[derive(Debug)]
pub(crate) struct Outcome {
    pub(crate) cookie: CookieAction,
    pub(crate) failure: Option<Failure>,
}

impl fmt::Debug for Session {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Session")
            .field("id", &self.shared.incoming.as_ref().map(SessionId::log_id))
            .finish_non_exhaustive()
    }
}

impl Session {
    pub(crate) fn new(
        store: PgStore,
        config: Arc<Config>,
        incoming: Option<SessionId>,
        client: ClientInfo,
    ) -> Self {
        let waits = WaitBudget::new(store.pool().options().get_acquire_timeout());
        Self {
            shared: Arc::new(Shared {
                waits,
                store,
                config,
                incoming,
                client,
                state: Mutex::new(State::default()),
                abandoned: AtomicBool::new(false),
            }),
        }
    }

    /// The value under `key`, if any.
    ///
    /// # Errors
    /// [`SessionError::Store`] when the session cannot be loaded (the response
    /// then becomes 503), [`SessionError::Serde`] when the stored value does
    /// not deserialize into `T`.
    pub async fn get<T: DeserializeOwned>(&self, key: &str) -> Result<Option<T>, SessionError> {
        let mut st = self.shared.state.lock().await;
        self.ensure_loaded(&mut st).await?;
        st.data
            .get(key)
            .map(|raw| serde_json::from_str(raw.get()))
            .transpose()
            .map_err(|source| SessionError::Serde {
                key: key.to_owned(),
                source,
            })
    }

    /// Stores `value` under `key`.
    ///
    /// # Errors
    /// [`SessionError::ReservedKey`] for a key reserved for the login guard
    /// or by [`SessionLayerBuilder::with_reserved_key`](super::SessionLayerBuilder::with_reserved_key),
    /// [`SessionError::TooLarge`] when the data would exceed the size limit
    /// (the session is left as it was either way), [`SessionError::Serde`]
    /// when `value` does not serialize, [`SessionError::Unstorable`] when the
    /// table's `sess` is `jsonb` and `key` or `value` holds a NUL character,
    /// [`SessionError::Store`] when loading fails.
    pub async fn insert<T: Serialize + ?Sized>(
        &self,
        key: &str,
        value: &T,
    ) -> Result<(), SessionError> {
        self.check_writable(key)?;
        self.insert_reserved(key, value).await
    }

    /// [`Session::insert`] for the crate's own use, reserved keys included.
    pub(crate) async fn insert_reserved<T: Serialize + ?Sized>(
        &self,
        key: &str,
        value: &T,
    ) -> Result<(), SessionError> {
        let raw = serde_json::value::to_raw_value(value).map_err(|source| SessionError::Serde {
            key: key.to_owned(),
            source,
        })?;
        self.check_storable(key, &raw).await?;
        let mut st = self.shared.state.lock().await;
        self.ensure_loaded(&mut st).await?;
        let mut next = st.data.clone();
        next.set(key, raw.clone());
        let size = next.encoded_len();
        let limit = self.shared.config.max_size;
        if size > limit {
            return Err(SessionError::TooLarge { size, limit });
        }
        st.data = next;
        st.changes.push((key.to_owned(), Some(raw)));
        Ok(())
    }

    /// Removes `key`, returning its value.
    ///
    /// # Errors
    /// As [`Session::get`], and [`SessionError::ReservedKey`] as
    /// [`Session::insert`].
    pub async fn remove<T: DeserializeOwned>(&self, key: &str) -> Result<Option<T>, SessionError> {
        self.check_writable(key)?;
        self.remove_reserved(key).await
    }

    /// [`Session::remove`] for the crate's own use, reserved keys included.
    pub(crate) async fn remove_reserved<T: DeserializeOwned>(
        &self,
        key: &str,
    ) -> Result<Option<T>, SessionError> {
        let mut st = self.shared.state.lock().await;
        self.ensure_loaded(&mut st).await?;
        let old = st
            .data
            .get(key)
            .map(|raw| serde_json::from_str(raw.get()))
            .transpose()
            .map_err(|source| SessionError::Serde {
                key: key.to_owned(),
                source,
            })?;
        if st.data.remove(key) {
            st.changes.push((key.to_owned(), None));
        }
        Ok(old)
    }

    /// All the data as a JSON object (`{}` for a new session).
    ///
    /// # Errors
    /// As [`Session::get`].
    pub async fn to_json(
        &self,
    ) -> Result<serde_json::Map<String, serde_json::Value>, SessionError> {
        let mut st = self.shared.state.lock().await;
        self.ensure_loaded(&mut st).await?;
        st.data
            .iter()
            .map(|(k, v)| {
                serde_json::from_str(v.get())
                    .map(|v| (k.to_owned(), v))
                    .map_err(|source| SessionError::Serde {
                        key: k.to_owned(),
                        source,
                    })
            })
            .collect()
    }

    /// The opaque handle administrators see for this session
    /// ([`crate::admin::SessionInfo::handle`]), e.g. to keep it in
    /// [`crate::admin::Admin::revoke_others`]; `None` while it has no row.
    ///
    /// # Errors
    /// As [`Session::get`].
    pub async fn handle(&self) -> Result<Option<String>, SessionError> {
        let mut st = self.shared.state.lock().await;
        self.ensure_loaded(&mut st).await?;
        let hashed = self.shared.config.hashed_ids;
        Ok(st
            .row
            .as_ref()
            .map(|row| crate::store::handle(&row.id.storage_key(hashed))))
    }

    /// The user an Express app logged in with Passport: `sess.passport.user`
    /// (Passport's default key), in whatever shape its `serializeUser` chose.
    ///
    /// # Errors
    /// As [`Session::get`].
    pub async fn passport_user<T: DeserializeOwned>(&self) -> Result<Option<T>, SessionError> {
        #[derive(serde::Deserialize)]
        struct Passport<T> {
            user: Option<T>,
        }
        Ok(self
            .get::<Passport<T>>("passport")
            .await?
            .and_then(|p| p.user))
    }

    /// The keys of the session's data, in stored order.
    ///
    /// # Errors
    /// As [`Session::get`].
    pub async fn keys(&self) -> Result<Vec<String>, SessionError> {
        let mut st = self.shared.state.lock().await;
        self.ensure_loaded(&mut st).await?;
        Ok(st.data.iter().map(|(k, _)| k.to_owned()).collect())
    }

    /// True when the session holds no data (new, expired or destroyed).
    ///
    /// # Errors
    /// As [`Session::get`].
    pub async fn is_empty(&self) -> Result<bool, SessionError> {
        let mut st = self.shared.state.lock().await;
        self.ensure_loaded(&mut st).await?;
        Ok(st.data.is_empty())
    }

    /// Gives the session a new id, keeping its data; call it on login so an id
    /// planted before login is worthless after (session fixation). Costs one
    /// statement at save, folded into the data write if there is one.
    /// The OIDC guard's callback does this itself; its login record is
    /// sealed for the session's id, so cycling the id of a session already
    /// logged in through the guard ends that login.
    ///
    /// # Errors
    /// As [`Session::get`].
    pub async fn cycle_id(&self) -> Result<(), SessionError> {
        let mut st = self.shared.state.lock().await;
        self.ensure_loaded(&mut st).await?;
        st.cycle = true;
        Ok(())
    }

    /// Ends the session: its row is deleted and the browser told to drop the
    /// cookie. Data inserted afterwards starts a new session under a new id.
    pub async fn destroy(&self) {
        let mut st = self.shared.state.lock().await;
        let hashed = self.shared.config.hashed_ids;
        let key = match (&st.row, &self.shared.incoming, st.loaded) {
            (Some(row), _, _) => Some(row.id.storage_key(hashed)),
            (None, Some(id), false) => Some(id.storage_key(hashed)),
            _ => None,
        };
        *st = State {
            loaded: true,
            delete_key: key.or(st.delete_key.take()),
            cookie: CookieAction::Remove,
            ..State::default()
        };
    }

    /// The user this session belongs to, kept in the indexed `user_id` column
    /// (so that all of a user's sessions can be found and revoked).
    ///
    /// # Errors
    /// As [`Session::get`].
    pub async fn user_id(&self) -> Result<Option<String>, SessionError> {
        let mut st = self.shared.state.lock().await;
        self.ensure_loaded(&mut st).await?;
        Ok(st.user_id.clone())
    }

    /// Sets or clears the owning user (see [`Session::user_id`]).
    ///
    /// # Errors
    /// As [`Session::get`]; [`SessionError::Unsupported`] when the table lacks
    /// the column and may not be upgraded; [`SessionError::Unstorable`] when
    /// `user` holds a NUL character, which Postgres text cannot store.
    pub async fn set_user_id(&self, user: Option<&str>) -> Result<(), SessionError> {
        storable("the user id", user)?;
        self.set_meta(|st| st.user_id = user.map(str::to_owned))
            .await
    }

    /// Sets or clears the identity provider's session id (the OIDC `sid`
    /// claim), kept in the indexed `provider_sid` column for back-channel logout.
    ///
    /// # Errors
    /// As [`Session::set_user_id`].
    pub async fn set_provider_sid(&self, sid: Option<&str>) -> Result<(), SessionError> {
        storable("the provider session id", sid)?;
        self.set_meta(|st| st.provider_sid = sid.map(str::to_owned))
            .await
    }

    /// Records who logged in on the session (user and provider session), in
    /// the indexed columns that per-user and back-channel logout look up; a
    /// no-op on a table without them.
    #[cfg_attr(not(feature = "oidc"), allow(dead_code))]
    pub(crate) async fn record_identity(
        &self,
        user: &str,
        provider_sid: Option<&str>,
    ) -> Result<(), SessionError> {
        if !self.shared.store.has_extended_columns() {
            return Ok(());
        }
        storable("the user id", Some(user))?;
        storable("the provider session id", provider_sid)?;
        self.set_meta(|st| {
            st.user_id = Some(user.to_owned());
            st.provider_sid = provider_sid.map(str::to_owned);
        })
        .await
    }

    async fn set_meta(&self, f: impl FnOnce(&mut State)) -> Result<(), SessionError> {
        if !self.shared.store.has_extended_columns() {
            return Err(SessionError::Unsupported(
                "the session table has no user_id/provider_sid columns",
            ));
        }
        let mut st = self.shared.state.lock().await;
        self.ensure_loaded(&mut st).await?;
        f(&mut st);
        st.meta_changed = true;
        Ok(())
    }

    /// Writes pending changes now instead of when the response is ready, so
    /// the handler sees a failure itself.
    ///
    /// # Errors
    /// [`SessionError::Store`] when the write fails, [`SessionError::TooLarge`]
    /// when re-applying this request's changes over a concurrent write exceeds
    /// the limit; the stored session is then left as it was.
    pub async fn save(&self) -> Result<(), SessionError> {
        // In its own task, as at the end of the request: once started, a
        // save is not cut short by the client going away.
        let this = self.clone();
        detached(async move {
            let mut st = this.shared.state.lock().await;
            this.save_locked(&mut st).await
        })
        .await
        .unwrap_or_else(|| Err(SessionError::Store(StoreError::task_failed())))
    }

    /// Removes `key` and returns its value, atomically across every request
    /// and instance: of many concurrent callers, exactly one gets the value.
    /// For single-use values such as login state. Written at once (a row
    /// lock, a read, a write), not at the end of the request.
    ///
    /// # Errors
    /// As [`Session::save`], [`SessionError::ReservedKey`] as
    /// [`Session::insert`], and [`SessionError::Serde`] when the value does
    /// not deserialize into `T` (it is consumed all the same).
    pub async fn take_once<T: DeserializeOwned>(
        &self,
        key: &str,
    ) -> Result<Option<T>, SessionError> {
        self.check_writable(key)?;
        self.take_once_reserved(key).await
    }

    /// [`Session::take_once`] for the crate's own use, reserved keys included.
    pub(crate) async fn take_once_reserved<T: DeserializeOwned>(
        &self,
        key: &str,
    ) -> Result<Option<T>, SessionError> {
        let taken = self
            .update_locked(key, |value: Option<Box<RawValue>>, _| {
                let write = match value {
                    Some(_) => Update::Remove,
                    None => Update::Keep,
                };
                std::future::ready(Ok::<_, std::convert::Infallible>((write, value)))
            })
            .await;
        let raw = match taken {
            Ok(Some(raw)) => raw,
            Ok(None) | Err(LockedError::Gone) => return Ok(None),
            Err(LockedError::Session(e)) => return Err(e),
            Err(LockedError::Update(never)) => match never {},
        };
        serde_json::from_str(raw.get())
            .map(Some)
            .map_err(|source| SessionError::Serde {
                key: key.to_owned(),
                source,
            })
    }

    /// Refuses a NUL character in a key or value when the table's `sess` is
    /// `jsonb`, which cannot hold one (a `json` column holds it escaped).
    async fn check_storable(&self, key: &str, raw: &RawValue) -> Result<(), SessionError> {
        if !key.contains('\0') && !data::holds_nul(raw.get()) {
            return Ok(());
        }
        self.shared
            .store
            .prepared()
            .await
            .map_err(SessionError::Store)?;
        if !self.shared.store.data_is_jsonb() {
            return Ok(());
        }
        Err(SessionError::Unstorable {
            what: format!("session value \"{}\"", untrusted(key)),
        })
    }

    /// Refuses the keys application code may not write, before anything is
    /// read or changed.
    fn check_writable(&self, key: &str) -> Result<(), SessionError> {
        if reserved::is_reserved(key, &self.shared.config.reserved) {
            return Err(SessionError::ReservedKey {
                key: key.to_owned(),
            });
        }
        Ok(())
    }

    /// What binds values sealed for this session to it: the storage key its
    /// row will have once this request's changes are saved.
    #[cfg_attr(not(feature = "oidc"), allow(dead_code))]
    pub(crate) async fn seal_context(&self) -> Result<SealContext, SessionError> {
        let mut st = self.shared.state.lock().await;
        self.ensure_loaded(&mut st).await?;
        let hashed = self.shared.config.hashed_ids;
        Ok(SealContext::new(match (&st.row, st.cycle) {
            (Some(row), false) => row.id.storage_key(hashed),
            _ => st
                .next_id
                .get_or_insert_with(SessionId::generate)
                .storage_key(hashed),
        }))
    }

    /// Runs `f` on the freshest stored value of `key` (`None` when absent or
    /// not a `T`) while holding the row lock, so that at most one `f` runs
    /// per session at a time across instances; writes what it returns and
    /// refreshes this handle's view. This request's own pending changes stay
    /// pending. `f` gets the session's [`SealContext`] as stored.
    #[cfg_attr(not(feature = "oidc"), allow(dead_code))]
    pub(crate) async fn update_locked<T, R, E, F, Fut>(
        &self,
        key: &str,
        f: F,
    ) -> Result<R, LockedError<E>>
    where
        T: Serialize + DeserializeOwned,
        F: FnOnce(Option<T>, SealContext) -> Fut,
        Fut: std::future::Future<Output = Result<(Update<T>, R), E>>,
    {
        let mut st = self.shared.state.lock().await;
        self.ensure_loaded(&mut st)
            .await
            .map_err(LockedError::Session)?;
        let Some(row) = st.row.clone() else {
            return Err(LockedError::Gone);
        };
        let storage_key = row.id.storage_key(self.shared.config.hashed_ids);
        let context = SealContext::new(storage_key.clone());
        let locked = self
            .shared
            .store
            .update_locked(
                &storage_key,
                OffsetDateTime::now_utc(),
                &self.shared.waits,
                |fresh| update_key(fresh, key, context, f),
            )
            .await
            .map_err(|e| LockedError::Session(self.fail(&mut st, Failure::Unavailable, e)))?;
        let ((mut data, fresh, value), version) = match locked {
            None => {
                *st = State {
                    loaded: true,
                    cookie: CookieAction::Remove,
                    ..State::default()
                };
                return Err(LockedError::Gone);
            }
            // Not a session's data: left alone.
            Some((None, _)) => return Err(LockedError::Gone),
            Some((Some(Err(e)), _)) => return Err(LockedError::Update(e)),
            Some((Some(Ok(done)), version)) => (done, version),
        };
        // The handle now starts from the stored state; its own pending
        // changes are applied on top, as a save would.
        let pending = st.changes.clone();
        apply_changes(&mut data, &pending);
        st.data = data;
        if !st.meta_changed {
            st.user_id = fresh.user_id;
            st.provider_sid = fresh.provider_sid;
        }
        st.row = Some(Row { version, ..row });
        Ok(value)
    }

    /// What the response needs without any further I/O, when nothing is left
    /// to write; `None` when a save is due.
    pub(crate) fn try_finish_now(&self) -> Option<Outcome> {
        let st = self.shared.state.try_lock().ok()?;
        let pending =
            st.delete_key.is_some() || st.cycle || st.meta_changed || !st.changes.is_empty();
        (!pending).then(|| self.outcome(&st))
    }

    /// Saves what is pending, in a task of its own (a save once started is
    /// not cut short by the client going away), and reports what the
    /// response must carry.
    pub(crate) fn spawn_finish(self) -> tokio::task::JoinHandle<Outcome> {
        tokio::spawn(self.finish())
    }

    /// The request was dropped before its response was ready (the client
    /// went away). A save still running for it lands only if the session is
    /// unchanged since this request loaded it: re-applying its changes over
    /// newer data could undo what a later request wrote and acknowledged.
    pub(crate) fn abandon(&self) {
        self.shared.abandoned.store(true, Ordering::Release);
    }

    /// True once [`Self::abandon`] was called: if the save conflicts, drop
    /// its changes rather than merge them.
    fn abandoned(&self, id: &SessionId) -> bool {
        let gone = self.shared.abandoned.load(Ordering::Acquire);
        if gone {
            tracing::debug!(session = %id.log_id(), "request dropped; its changes are not merged over newer data");
            metrics::failure("abandoned");
        }
        gone
    }

    async fn finish(self) -> Outcome {
        let mut st = self.shared.state.lock().await;
        let span = tracing::debug_span!(
            "session.save",
            session = ?self.shared.incoming.as_ref().map(SessionId::log_id)
        );
        // A failure is recorded in the state and reported in the outcome.
        let _ = self.save_locked(&mut st).instrument(span).await;
        self.outcome(&st)
    }

    /// Marks the incoming cookie for re-signing with the current key.
    pub(crate) fn resign_cookie(&self) {
        if let Ok(mut st) = self.shared.state.try_lock() {
            st.resign = true;
        }
    }

    fn outcome(&self, st: &State) -> Outcome {
        let mut cookie = st.cookie.clone();
        if let (CookieAction::Keep, true, Some(row)) = (&cookie, st.resign, &st.row) {
            cookie = CookieAction::Set(row.id.clone(), row.expire);
        }
        Outcome {
            cookie,
            failure: st.failure,
        }
    }

    async fn ensure_loaded(&self, st: &mut State) -> Result<(), SessionError> {
        if st.loaded {
            return Ok(());
        }
        let Some(id) = &self.shared.incoming else {
            st.loaded = true;
            return Ok(());
        };
        let config = &self.shared.config;
        let span = tracing::debug_span!("session.load", session = %id.log_id());
        let load = self
            .shared
            .store
            .load_shared(id.storage_key(config.hashed_ids), config.load_policy());
        let loaded = self
            .shared
            .waits
            .run(load)
            .instrument(span)
            .await
            .map_err(|e| self.fail(st, Failure::Unavailable, e))?;
        st.loaded = true;
        metrics::load(loaded.is_some());
        let Some(loaded) = loaded else {
            tracing::debug!(session = %id.log_id(), "no live session for cookie");
            return Ok(());
        };
        metrics::touch(loaded.touched);
        let Some(data) = Data::parse(&loaded.sess) else {
            // Written by someone else; leave the row alone and start afresh:
            // a later write creates a new session under a new id.
            tracing::warn!(session = %id.log_id(), "stored session data is not a JSON object; ignoring it");
            metrics::failure("corrupt_data");
            return Ok(());
        };
        st.data = data;
        st.user_id = loaded.user_id;
        st.provider_sid = loaded.provider_sid;
        st.row = Some(Row {
            id: id.clone(),
            version: loaded.version,
            created_at: loaded.created_at,
            expire: loaded.expire,
        });
        if loaded.touched {
            st.cookie = CookieAction::Set(id.clone(), loaded.expire);
        }
        Ok(())
    }

    fn fail(&self, st: &mut State, failure: Failure, error: StoreError) -> SessionError {
        tracing::error!(
            error = %untrusted(&error),
            source = ?std::error::Error::source(&error).map(untrusted),
            "session store failed"
        );
        metrics::failure("store_unavailable");
        self.shared.store.report(&error);
        st.failure = Some(failure);
        SessionError::Store(error)
    }

    async fn save_locked(&self, st: &mut State) -> Result<(), SessionError> {
        let config = &self.shared.config;
        let policy = config.save_policy();
        let now = OffsetDateTime::now_utc();
        // 192 random bits do not collide; the retries are for the impossible case.
        let mut ids_left = 3;
        loop {
            let plan = plan_save(st, &policy, now).map_err(|e| self.too_large(st, e))?;
            match plan {
                SavePlan::Nothing => {
                    st.changes.clear();
                    st.cycle = false;
                    return Ok(());
                }
                SavePlan::Delete { key } => {
                    self.write(st, Write::Delete { key: &key }).await?;
                    st.delete_key = None;
                }
                SavePlan::Insert(w) => {
                    let key = w.id.storage_key(config.hashed_ids);
                    let (user_id, provider_sid) = (st.user_id.clone(), st.provider_sid.clone());
                    let client = &self.shared.client;
                    let row = NewRow {
                        sess: &w.sess,
                        expire: w.expire,
                        user_id: user_id.as_deref(),
                        provider_sid: provider_sid.as_deref(),
                        user_agent: client.user_agent.as_deref(),
                        ip: client.ip.as_deref(),
                    };
                    let written = self
                        .write(
                            st,
                            Write::Insert {
                                key: &key,
                                row,
                                now,
                            },
                        )
                        .await?;
                    if let Written::Inserted(version) = written {
                        metrics::save("insert");
                        st.data = w.data;
                        self.saved(st, w.id, version, Some(now), w.expire);
                        return Ok(());
                    }
                    ids_left -= 1;
                    if ids_left == 0 {
                        let e = StoreError::Schema("could not allocate a unique session id".into());
                        return Err(self.fail(st, Failure::Unavailable, e));
                    }
                    st.next_id = None;
                }
                SavePlan::Update {
                    key,
                    version,
                    created_at,
                    write,
                } => {
                    return self
                        .update(st, &key, &version, created_at, write, now)
                        .await
                }
            }
        }
    }

    /// Executes a write that needs no merge.
    async fn write(&self, st: &mut State, write: Write<'_>) -> Result<Written, SessionError> {
        let written = self
            .shared
            .store
            .save(write, &mut NoMerge, &self.shared.waits)
            .await;
        written.map_err(|e| self.fail(st, Failure::Unavailable, e))
    }

    /// Writes the loaded row; if someone else wrote it since, re-applies this
    /// request's changes to what is there now, under its lock.
    async fn update(
        &self,
        st: &mut State,
        key: &str,
        version: &str,
        created_at: Option<OffsetDateTime>,
        w: super::plan::Written,
        now: OffsetDateTime,
    ) -> Result<(), SessionError> {
        let new_key = w.id.storage_key(self.shared.config.hashed_ids);
        let (user_id, provider_sid) = (st.user_id.clone(), st.provider_sid.clone());
        let row = NewRow {
            sess: &w.sess,
            expire: w.expire,
            user_id: user_id.as_deref(),
            provider_sid: provider_sid.as_deref(),
            user_agent: None,
            ip: None,
        };
        let write = Write::Update {
            key,
            new_key: &new_key,
            version,
            row,
            now,
        };
        let row_id = match &st.row {
            Some(r) => r.id.clone(),
            None => w.id.clone(),
        };
        let mut merge = Remerge {
            session: self,
            st: &mut *st,
            row_id: &row_id,
            now,
            merged: None,
            refused: None,
        };
        let written = self
            .shared
            .store
            .save(write, &mut merge, &self.shared.waits)
            .await;
        let (merged, refused) = (merge.merged, merge.refused);
        match written.map_err(|e| self.fail(st, Failure::Unavailable, e))? {
            Written::Updated(version) => {
                metrics::save("update");
                st.data = w.data;
                self.saved(st, w.id, version, created_at, w.expire);
            }
            Written::Merged(version) => {
                if let Some((data, created_at, expire)) = merged {
                    st.data = data;
                    self.saved(st, w.id, version, created_at, expire);
                }
                tracing::debug!(session = %row_id.log_id(), "re-applied changes after a concurrent write");
                metrics::save("merge");
            }
            Written::Gone => {
                // Destroyed (logout, revocation, prune) while this request ran:
                // its changes are dropped rather than bringing the session back.
                tracing::info!(session = %row_id.log_id(), "session ended during the request; changes dropped");
                metrics::failure("ended_concurrently");
                *st = State {
                    loaded: true,
                    cookie: CookieAction::Remove,
                    ..State::default()
                };
            }
            Written::Declined | Written::Deleted | Written::Inserted(_) | Written::Taken => {
                if let Some(e) = refused {
                    return Err(self.too_large(st, e));
                }
            }
        }
        Ok(())
    }

    /// Records a refusal to write more than the limit.
    fn too_large(&self, st: &mut State, e: TooLarge) -> SessionError {
        metrics::failure("too_large");
        st.failure = Some(Failure::TooLarge);
        SessionError::TooLarge {
            size: e.size,
            limit: e.limit,
        }
    }

    fn saved(
        &self,
        st: &mut State,
        id: SessionId,
        version: String,
        created_at: Option<OffsetDateTime>,
        expire: OffsetDateTime,
    ) {
        st.changes.clear();
        st.cycle = false;
        st.next_id = None;
        st.meta_changed = false;
        // The browser's cookie already says when an unchanged row expires.
        let unchanged = st
            .row
            .as_ref()
            .is_some_and(|r| r.id == id && r.expire == expire);
        if !unchanged {
            st.cookie = CookieAction::Set(id.clone(), expire);
        }
        st.row = Some(Row {
            id,
            version,
            created_at,
            expire,
        });
    }
}

/// Writes that never conflict.
struct NoMerge;

impl Merge for NoMerge {
    fn wanted(&mut self) -> bool {
        false
    }

    fn merge(&mut self, _: Loaded) -> Option<OwnedRow> {
        None
    }
}

/// The conflict path of a save: this request's key-level changes over the
/// row as it is now.
struct Remerge<'a> {
    session: &'a Session,
    st: &'a mut State,
    row_id: &'a SessionId,
    now: OffsetDateTime,
    /// The data, creation time and expiry written.
    merged: Option<(Data, Option<OffsetDateTime>, OffsetDateTime)>,
    refused: Option<TooLarge>,
}

impl Merge for Remerge<'_> {
    fn wanted(&mut self) -> bool {
        metrics::conflict();
        !self.session.abandoned(self.row_id)
    }

    fn merge(&mut self, fresh: Loaded) -> Option<OwnedRow> {
        if self.session.abandoned(self.row_id) {
            return None;
        }
        let policy = self.session.shared.config.save_policy();
        let st = &mut *self.st;
        let mut data = Data::parse(&fresh.sess).unwrap_or_default();
        apply_changes(&mut data, &st.changes);
        if let Err(e) = policy.fits(data.encoded_len()) {
            self.refused = Some(e);
            return None;
        }
        if !st.meta_changed {
            st.user_id = fresh.user_id;
            st.provider_sid = fresh.provider_sid;
        }
        let expire = policy
            .expiry
            .next_expire(self.now, fresh.created_at, fresh.expire);
        policy.stamp(&mut data, expire);
        let sess = data.to_json();
        if let Err(e) = policy.fits(sess.len()) {
            self.refused = Some(e);
            return None;
        }
        self.merged = Some((data, fresh.created_at, expire));
        Some(OwnedRow {
            sess,
            expire,
            user_id: st.user_id.clone(),
            provider_sid: st.provider_sid.clone(),
        })
    }
}

/// Under the row lock: `f` on the stored value of `key`, and the row to
/// write when it sets one. `None` (nothing written) when the row is not a
/// session's data.
#[allow(clippy::type_complexity)]
async fn update_key<T, R, E, F, Fut>(
    fresh: Loaded,
    key: &str,
    context: SealContext,
    f: F,
) -> (Option<OwnedRow>, Option<Result<(Data, Loaded, R), E>>)
where
    T: Serialize + DeserializeOwned,
    F: FnOnce(Option<T>, SealContext) -> Fut,
    Fut: std::future::Future<Output = Result<(Update<T>, R), E>>,
{
    let Some(mut data) = Data::parse(&fresh.sess) else {
        return (None, None);
    };
    let current = data
        .get(key)
        .and_then(|raw| serde_json::from_str(raw.get()).ok());
    let (write, value) = match f(current, context).await {
        Ok(done) => done,
        Err(e) => return (None, Some(Err(e))),
    };
    let changed = match write {
        Update::Keep => false,
        // A value that does not serialize is left unwritten, like `Keep`.
        Update::Set(next) => match serde_json::value::to_raw_value(&next) {
            Ok(raw) => {
                data.set(key, raw);
                true
            }
            Err(_) => false,
        },
        Update::Remove => data.remove(key),
    };
    let row = changed.then(|| OwnedRow {
        sess: data.to_json(),
        expire: fresh.expire,
        user_id: fresh.user_id.clone(),
        provider_sid: fresh.provider_sid.clone(),
    });
    (row, Some(Ok((data, fresh, value))))
}

fn apply_changes(data: &mut Data, changes: &[(String, Option<Box<RawValue>>)]) {
    for (k, v) in changes {
        match v {
            Some(v) => data.set(k, v.clone()),
            None => {
                data.remove(k);
            }
        }
    }
}

/// Refuses text Postgres cannot store (a NUL character) before anything
/// changes.
fn storable(what: &str, value: Option<&str>) -> Result<(), SessionError> {
    match value {
        Some(v) if v.contains('\0') => Err(SessionError::Unstorable {
            what: what.to_owned(),
        }),
        _ => Ok(()),
    }
}
