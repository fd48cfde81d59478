//! The guard's future: authorize (boxed: a session read, maybe a refresh),
//! then the inner service's own future, unboxed.

use std::{
    future::Future,
    pin::Pin,
    task::{ready, Context, Poll},
};

use futures_util::future::BoxFuture;
use http::{Request, Response};
use pin_project_lite::pin_project;
use serde_json::{value::RawValue, Value};
use time::OffsetDateTime;
use tower_service::Service;
use tracing::Instrument;

use super::{response::RequestKind, Rejection, RejectionKind};
use crate::{
    crypto::Keyring,
    log_safe::untrusted,
    oidc::{
        record::{self, LoginRecord, Stored, USER_KEY},
        AccessToken, AuthError, AuthErrorKind, OidcClient, User,
    },
    session::{Changes, Data, Exclusive, Session, SessionError},
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
pub(crate) async fn authorize(client: OidcClient, session: Option<Session>) -> Authorized {
    let Some(session) = session else {
        return Err(Rejection::new(RejectionKind::MissingSessionLayer));
    };
    let raw: Option<Box<RawValue>> = match session.get(USER_KEY).await {
        Ok(r) => r,
        Err(e) => return Err(store_failed(&e)),
    };
    if raw.is_none() {
        return Err(not_logged_in(&client).await);
    }
    let binding = match session.binding_key().await {
        Ok(b) => b,
        Err(e) => return Err(store_failed(&e)),
    };
    let config = client.config();
    let (mut record, mut reseal) = match record::open_login(&config.keys, &binding, raw.as_deref())
    {
        Stored::Opened { record, reseal } => (record, reseal),
        Stored::Absent => return Err(not_logged_in(&client).await),
        Stored::Clear => {
            // Nothing this version wrote: an older version's record, or
            // someone else's data. Dropped, never trusted.
            tracing::warn!("login record not sealed (older version or written elsewhere): ignored");
            crate::metrics::failure("login_record_unsealed");
            let _ = session.remove_reserved::<Value>(USER_KEY).await;
            return Err(Rejection::new(RejectionKind::NotLoggedIn));
        }
        Stored::Tampered => {
            crate::metrics::failure("login_record_tampered");
            return Err(log_out(
                &session,
                "login record does not open (tampered, moved from another session, or its key retired)",
            )
            .await);
        }
    };

    if due(record.exp, config.refresh_before) {
        if record.rt.is_none() {
            if expired(record.exp) {
                return Err(log_out(
                    &session,
                    "access token expired and there is no refresh token",
                )
                .await);
            }
        } else {
            // In a task of its own: a refresh the provider has carried out
            // (and, with rotation, retired the old refresh token for) is
            // written even if this request is dropped meanwhile.
            let (locked, client) = (session.clone(), client.clone());
            let result = crate::store::detached(
                async move {
                    locked
                        .exclusive(|data, binding| refresh(client, data, binding))
                        .await
                }
                .instrument(tracing::info_span!("oidc.refresh")),
            )
            .await
            .unwrap_or_else(|| {
                Err(SessionError::Store(crate::StoreError::Database(
                    sqlx::Error::WorkerCrashed,
                )))
            });
            if let Ok(Err(e)) = &result {
                crate::metrics::failure(format!("refresh_{}", e.kind().code()));
            }
            match result {
                Ok(Ok(Exclusive::Done(next))) => (record, reseal) = next,
                Ok(Ok(Exclusive::Gone)) => return Err(Rejection::new(RejectionKind::NotLoggedIn)),
                Ok(Err(e))
                    if matches!(
                        e.kind(),
                        AuthErrorKind::ProviderUnavailable | AuthErrorKind::LoginUnavailable
                    ) =>
                {
                    tracing::warn!(error = %untrusted(&e), "token refresh failed");
                    if expired(record.exp) {
                        return Err(Rejection::new(RejectionKind::ProviderUnavailable));
                    }
                    // Still valid for a while: carry on, retry on a later request.
                }
                Ok(Err(e)) => return Err(log_out(&session, &e.to_string()).await),
                Err(e) => return Err(store_failed(&e)),
            }
        }
    }

    if reseal {
        // Sealed under a key no longer first: sealed again under the current
        // key, under the row lock, so that a refresh written meanwhile is not
        // overwritten with this request's older tokens.
        let keys = config.keys.clone();
        let resealed = session
            .exclusive(|data, binding| std::future::ready(reseal_fresh(&keys, &data, &binding)))
            .await;
        let failed = match resealed {
            Ok(Ok(_)) => None,
            Ok(Err(e)) => Some(e.to_string()),
            Err(e) => Some(e.to_string()),
        };
        if let Some(e) = failed {
            tracing::warn!(error = %untrusted(&e), "re-sealing the login failed");
        }
    }
    let token = AccessToken(record.at.clone());
    Ok((User::from_record(&record), token))
}

/// A request without a login: sent to log in, unless the provider cannot be
/// discovered, in which case a login could not start either.
async fn not_logged_in(client: &OidcClient) -> Rejection {
    match client.discovered().await {
        Ok(_) => Rejection::new(RejectionKind::NotLoggedIn),
        Err(_) => Rejection::new(RejectionKind::LoginUnavailable),
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
    data: &Data,
    binding: &str,
) -> Result<(Changes, ()), serde_json::Error> {
    let Stored::Opened {
        record,
        reseal: true,
    } = record::open_login(keys, binding, data.get(USER_KEY))
    else {
        return Ok((Vec::new(), ()));
    };
    let sealed = record::seal_login(keys, binding, &record)?;
    let raw = serde_json::value::to_raw_value(&sealed)?;
    Ok((vec![(USER_KEY.to_owned(), Some(raw))], ()))
}

type Refreshed = (Changes, (LoginRecord, bool));

/// Under the row lock: refreshes the tokens of the freshest record, unless
/// another request (or instance) did so while this one waited. Yields the
/// record and whether it still needs re-sealing.
async fn refresh(client: OidcClient, data: Data, binding: String) -> Result<Refreshed, AuthError> {
    let config = client.config();
    let keys = &config.keys;
    let (fresh, reseal) = match record::open_login(keys, &binding, data.get(USER_KEY)) {
        Stored::Opened { record, reseal } => (record, reseal),
        Stored::Absent => {
            return Err(AuthError::new(
                AuthErrorKind::TamperedData,
                "login record gone",
            ))
        }
        Stored::Clear | Stored::Tampered => {
            return Err(AuthError::new(
                AuthErrorKind::TamperedData,
                "login record does not open",
            ))
        }
    };
    if !due(fresh.exp, config.refresh_before) {
        return Ok((Vec::new(), (fresh, reseal)));
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
        .refresh(&rt, &fresh.nonce, &fresh.sub)
        .await?;
    let mut next = fresh;
    next.at = tokens.access_token;
    // Providers without rotation (Cognito) send no new refresh token.
    next.rt = Some(tokens.refresh_token.unwrap_or(rt));
    if let Some(idt) = tokens.id_token {
        next.idt = Some(idt);
    }
    if let Some(claims) = tokens.claims {
        next.groups = record::groups_of(&claims);
        next.claims = claims;
    }
    next.exp = tokens.expires_at;
    let unsealable =
        |e: serde_json::Error| AuthError::new(AuthErrorKind::TamperedData, e.to_string());
    let sealed = record::seal_login(keys, &binding, &next).map_err(unsealable)?;
    let raw = serde_json::value::to_raw_value(&sealed).map_err(unsealable)?;
    tracing::info!(sub = %untrusted(&next.sub), "access token refreshed");
    crate::metrics::refresh();
    Ok((vec![(USER_KEY.to_owned(), Some(raw))], (next, false)))
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
