//! The guard's future: authorize (boxed: a session read, maybe a refresh),
//! then the inner service's own future, unboxed.

use std::{
    future::Future,
    pin::Pin,
    sync::Arc,
    task::{ready, Context, Poll},
};

use futures_util::future::BoxFuture;
use http::{Request, Response};
use pin_project_lite::pin_project;
use serde_json::Value;
use time::OffsetDateTime;
use tower_service::Service;
use tracing::Instrument;

use super::{response::RequestKind, Rejection, RejectionKind};
use crate::{
    crypto::Keyring,
    log_safe::untrusted,
    oidc::{
        dpop::DpopKey,
        record::{self, LoginRecord, Stored, USER_KEY},
        step_up::StepUp,
        AccessToken, AuthError, AuthErrorKind, OidcClient, OidcProviders, User,
    },
    session::{LockedError, SealContext, Session, SessionError, Write},
};

type Authorized = Result<(User, AccessToken), Rejection>;

pin_project! {
    /// Response future of [`RequireLogin`](super::RequireLogin).
    pub struct RequireLoginFuture<S, ReqBody>
    where
        S: Service<Request<ReqBody>>,
    {
        #[pin]
        state: State<S, ReqBody>,
    }
}

pin_project! {
    #[project = StateProj]
    enum State<S, ReqBody>
    where
        S: Service<Request<ReqBody>>,
    {
        Authorize {
            authorize: BoxFuture<'static, Authorized>,
            inner: Option<S>,
            request: Option<Request<ReqBody>>,
            kind: RequestKind,
        },
        Inner {
            #[pin]
            future: S::Future,
        },
    }
}

impl<S: Service<Request<B>>, B> std::fmt::Debug for RequireLoginFuture<S, B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RequireLoginFuture").finish_non_exhaustive()
    }
}

impl<S, ReqBody> RequireLoginFuture<S, ReqBody>
where
    S: Service<Request<ReqBody>>,
{
    pub(crate) fn new(
        authorize: BoxFuture<'static, Authorized>,
        inner: S,
        request: Request<ReqBody>,
        kind: RequestKind,
    ) -> Self {
        Self {
            state: State::Authorize {
                authorize,
                inner: Some(inner),
                request: Some(request),
                kind,
            },
        }
    }
}

impl<S, ReqBody, ResBody> Future for RequireLoginFuture<S, ReqBody>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>>,
    ResBody: Default,
{
    type Output = Result<Response<ResBody>, S::Error>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        loop {
            match this.state.as_mut().project() {
                StateProj::Authorize {
                    authorize,
                    inner,
                    request,
                    kind,
                } => {
                    let result = ready!(authorize.as_mut().poll(cx));
                    let (Some(mut inner), Some(mut request)) = (inner.take(), request.take())
                    else {
                        unreachable!("polled after completion")
                    };
                    match result {
                        Ok((user, token)) => {
                            request.extensions_mut().insert(user);
                            request.extensions_mut().insert(token);
                            let future = inner.call(request);
                            this.state.set(State::Inner { future });
                        }
                        Err(rejection) => return Poll::Ready(Ok(kind.reject(rejection))),
                    }
                }
                StateProj::Inner { future } => return future.poll(cx),
            }
        }
    }
}

fn due(exp: Option<i64>, before: std::time::Duration) -> bool {
    let now = OffsetDateTime::now_utc().unix_timestamp();
    let before = i64::try_from(before.as_secs()).unwrap_or(i64::MAX);
    exp.is_some_and(|e| e.saturating_sub(before) <= now)
}

fn expired(exp: Option<i64>) -> bool {
    exp.is_some_and(|e| e <= OffsetDateTime::now_utc().unix_timestamp())
}

fn store_failed(e: &SessionError) -> Rejection {
    match e {
        SessionError::Store(_) => Rejection::new(RejectionKind::SessionUnavailable),
        _ => Rejection::new(RejectionKind::LoggedOut),
    }
}

/// Reads the user from the session, refreshing the tokens when due.
pub(crate) async fn authorize(
    providers: OidcProviders,
    session: Option<Session>,
    step_up: Arc<StepUp>,
) -> Authorized {
    let Some(session) = session else {
        return Err(Rejection::new(RejectionKind::MissingSessionLayer));
    };
    let (mut record, mut reseal) = open(providers.default_provider(), &session).await?;
    // A login of a provider these routes do not take is no login here.
    let Some(client) = providers.by_issuer(&record.iss) else {
        return Err(Rejection::new(RejectionKind::NotLoggedIn));
    };
    let config = client.config();
    if due(record.exp, config.refresh_before) {
        (record, reseal) = refresh_due(client, &session, record, reseal).await?;
    }
    if reseal {
        reseal_login(&config.keys, &session).await;
    }
    let now = OffsetDateTime::now_utc().unix_timestamp();
    if let Some(why) = step_up.unmet(&record.claims, now, config.clock_skew) {
        tracing::info!(reason = %untrusted(&why), "stronger or more recent authentication needed");
        return Err(Rejection::insufficient((*step_up).clone(), why));
    }
    let token = AccessToken::new(record.at.clone(), dpop_key(&record).ok().flatten());
    Ok((User::from_record(&record), token))
}

/// The session's login record, and whether it needs re-sealing; a record
/// that does not open ends the login.
async fn open(client: &OidcClient, session: &Session) -> Result<(LoginRecord, bool), Rejection> {
    let stored = record::load_login(&client.config().keys, session)
        .await
        .map_err(|e| store_failed(&e))?;
    match stored {
        Stored::Opened { record, reseal } => Ok((record, reseal)),
        Stored::Absent => Err(not_logged_in(client).await),
        Stored::Clear => {
            // Nothing this version wrote: an older version's record, or
            // someone else's data. Dropped, never trusted.
            tracing::warn!("login record not sealed (older version or written elsewhere): ignored");
            crate::metrics::failure("login_record_unsealed");
            let _ = session.remove_reserved::<Value>(USER_KEY).await;
            Err(Rejection::new(RejectionKind::NotLoggedIn))
        }
        Stored::Tampered => {
            crate::metrics::failure("login_record_tampered");
            Err(log_out(
                session,
                "login record does not open (tampered, moved from another session, or its key retired)",
            )
            .await)
        }
    }
}

/// The login with its tokens refreshed, or as it is while the provider is
/// out of reach and the access token still valid.
async fn refresh_due(
    client: &OidcClient,
    session: &Session,
    record: LoginRecord,
    reseal: bool,
) -> Result<(LoginRecord, bool), Rejection> {
    if record.rt.is_none() {
        if expired(record.exp) {
            let why = "access token expired and there is no refresh token";
            return Err(log_out(session, why).await);
        }
        return Ok((record, reseal));
    }
    // In a task of its own: a refresh the provider has carried out (and,
    // with rotation, retired the old refresh token for) is written even if
    // this request is dropped meanwhile.
    let (locked, owned) = (session.clone(), client.clone());
    let result = crate::task::detached(
        async move {
            locked
                .update_locked(USER_KEY, |stored, context| refresh(owned, stored, context))
                .await
        }
        .instrument(tracing::info_span!("oidc.refresh")),
    )
    .await;
    // The refresh task panicked: nothing was written.
    let Some(result) = result else {
        return Err(Rejection::new(RejectionKind::SessionUnavailable));
    };
    match result {
        Ok(next) => Ok(next),
        Err(LockedError::Gone) => Err(Rejection::new(RejectionKind::NotLoggedIn)),
        Err(LockedError::Session(e)) => Err(store_failed(&e)),
        Err(LockedError::Update(e)) => {
            crate::metrics::failure(format!("refresh_{}", e.kind().code()));
            let unreachable = matches!(
                e.kind(),
                AuthErrorKind::ProviderUnavailable | AuthErrorKind::LoginUnavailable
            );
            if !unreachable {
                return Err(log_out(session, &e.to_string()).await);
            }
            tracing::warn!(error = %untrusted(&e), "token refresh failed");
            if expired(record.exp) {
                return Err(Rejection::new(RejectionKind::ProviderUnavailable));
            }
            // Still valid for a while: carry on, retry on a later request.
            Ok((record, reseal))
        }
    }
}

/// Seals the login again under the current key, under the row lock, so
/// that a refresh written meanwhile is not overwritten with this request's
/// older tokens. A failure is logged: the next request tries again.
async fn reseal_login(keys: &Keyring, session: &Session) {
    let resealed = session
        .update_locked(USER_KEY, |stored, context| {
            std::future::ready(reseal_fresh(keys, stored, &context))
        })
        .await;
    let failed = match resealed {
        Ok(()) | Err(LockedError::Gone) => return,
        Err(LockedError::Update(e)) => e.to_string(),
        Err(LockedError::Session(e)) => e.to_string(),
    };
    tracing::warn!(error = %untrusted(&failed), "re-sealing the login failed");
}

/// A request without a login: sent to log in, unless the provider cannot be
/// discovered, in which case a login could not start either.
async fn not_logged_in(client: &OidcClient) -> Rejection {
    match client.discovered().await {
        Ok(_) => Rejection::new(RejectionKind::NotLoggedIn),
        Err(e) => Rejection::new(RejectionKind::LoginUnavailable).with_detail(e.detail()),
    }
}

/// Ends the login now: the session is destroyed.
async fn log_out(session: &Session, why: &str) -> Rejection {
    tracing::warn!(reason = %untrusted(why), "ending the login");
    session.destroy().await;
    Rejection::new(RejectionKind::LoggedOut)
}

/// Under the row lock: the freshest record sealed again under the current
/// key, unless another request did so meanwhile or it no longer opens (the
/// next request deals with that).
fn reseal_fresh(
    keys: &Keyring,
    stored: Option<String>,
    context: &SealContext,
) -> Result<(Write<String>, ()), serde_json::Error> {
    let Stored::Opened {
        record,
        reseal: true,
    } = open_stored(keys, stored, context)
    else {
        return Ok((Write::Keep, ()));
    };
    Ok((Write::Set(record::seal_login(keys, context, &record)?), ()))
}

/// The login record under the row lock, as the session stores it (a sealed
/// string; anything else does not open).
fn open_stored(
    keys: &Keyring,
    stored: Option<String>,
    context: &SealContext,
) -> Stored<LoginRecord> {
    let raw = stored.and_then(|s| serde_json::value::to_raw_value(&s).ok());
    record::open_login(keys, context, raw.as_deref())
}

/// The login's DPoP key, if it has one; a key that does not parse is
/// tampered data.
fn dpop_key(record: &LoginRecord) -> Result<Option<DpopKey>, AuthError> {
    match record.dpop.as_deref() {
        None => Ok(None),
        Some(secret) => DpopKey::from_secret(secret).map(Some).ok_or_else(|| {
            AuthError::new(
                AuthErrorKind::TamperedData,
                "the login's DPoP key does not parse",
            )
        }),
    }
}

/// Under the row lock: refreshes the tokens of the freshest record, unless
/// another request (or instance) did so while this one waited. Yields the
/// record and whether it still needs re-sealing.
async fn refresh(
    client: OidcClient,
    stored: Option<String>,
    context: SealContext,
) -> Result<(Write<String>, (LoginRecord, bool)), AuthError> {
    let config = client.config();
    let keys = &config.keys;
    let (fresh, reseal) = match open_stored(keys, stored, &context) {
        Stored::Opened { record, reseal } => (record, reseal),
        Stored::Absent | Stored::Clear | Stored::Tampered => {
            return Err(AuthError::new(
                AuthErrorKind::TamperedData,
                "login record gone or does not open",
            ))
        }
    };
    if !due(fresh.exp, config.refresh_before) {
        return Ok((Write::Keep, (fresh, reseal)));
    }
    let Some(rt) = fresh.rt.clone() else {
        return Err(AuthError::new(
            AuthErrorKind::TamperedData,
            "login record without a refresh token",
        ));
    };
    let tokens = client
        .discovered()
        .await?
        .refresh(&rt, &fresh.nonce, &fresh.sub, dpop_key(&fresh)?.as_ref())
        .await?;
    let next = fresh.refreshed(tokens);
    let sealed = record::seal_login(keys, &context, &next)
        .map_err(|e| AuthError::new(AuthErrorKind::TamperedData, e.to_string()))?;
    tracing::info!(sub = %untrusted(&next.sub), "access token refreshed");
    crate::metrics::refresh();
    Ok((Write::Set(sealed), (next, false)))
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::{due, expired};

    #[test]
    fn extreme_expiries_do_not_overflow() {
        for exp in [i64::MIN, i64::MIN + 1, -1, 0] {
            assert!(due(Some(exp), Duration::MAX));
            assert!(due(Some(exp), Duration::ZERO));
            assert!(expired(Some(exp)));
        }
        assert!(!due(Some(i64::MAX), Duration::from_secs(300)));
        assert!(due(Some(i64::MAX), Duration::MAX));
        assert!(!expired(Some(i64::MAX)));
        assert!(!due(None, Duration::MAX));
    }
}
