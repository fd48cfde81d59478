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
use time::OffsetDateTime;
use tower_service::Service;
use tracing::Instrument;

use super::{response::RequestKind, Rejection, RejectionKind};
use crate::{
    log_safe::untrusted,
    oidc::{
        record::{self, LoginRecord, FIELD_ACCESS, FIELD_ID, FIELD_REFRESH, USER_KEY},
        AccessToken, AuthErrorKind, OidcClient, User,
    },
    session::{Exclusive, Session, SessionError},
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
    let logged_out = |why: &str| {
        tracing::warn!(reason = %untrusted(why), "ending the login");
        Rejection::new(RejectionKind::LoggedOut)
    };
    let record: Option<LoginRecord> = match session.get(USER_KEY).await {
        Ok(r) => r,
        Err(SessionError::Serde { .. }) => {
            session.destroy().await;
            return Err(logged_out("unreadable login record"));
        }
        Err(e) => return Err(store_failed(&e)),
    };
    let Some(mut record) = record else {
        return Err(Rejection::new(RejectionKind::NotLoggedIn));
    };
    let config = client.config();
    let keys = &config.keys;

    if due(record.exp, config.refresh_before) {
        if record.rt.is_none() {
            if expired(record.exp) {
                session.destroy().await;
                return Err(logged_out(
                    "access token expired and there is no refresh token",
                ));
            }
        } else {
            let c = client.clone();
            let result = session
                .exclusive(|data, binding| async move {
                    let fresh: Option<LoginRecord> = data
                        .get(USER_KEY)
                        .and_then(|raw| serde_json::from_str(raw.get()).ok());
                    let Some(fresh) = fresh else {
                        return Err(crate::oidc::AuthError::new(
                            AuthErrorKind::TamperedData,
                            "login record gone",
                        ));
                    };
                    // Someone (this instance or another) refreshed while we waited.
                    if !due(fresh.exp, c.config().refresh_before) {
                        return Ok((Vec::new(), fresh));
                    }
                    let keys = &c.config().keys;
                    let (rt, _) = fresh
                        .rt
                        .as_deref()
                        .and_then(|t| record::open(keys, &binding, FIELD_REFRESH, t))
                        .ok_or_else(|| {
                            crate::oidc::AuthError::new(
                                AuthErrorKind::TamperedData,
                                "refresh token does not decrypt",
                            )
                        })?;
                    let tokens = c.refresh(&rt, &fresh.nonce, &fresh.sub).await?;
                    let mut next = fresh.clone();
                    next.at = record::seal(keys, &binding, FIELD_ACCESS, &tokens.access_token);
                    // Providers without rotation (Cognito) send no new refresh token.
                    let rt = tokens.refresh_token.unwrap_or(rt);
                    next.rt = Some(record::seal(keys, &binding, FIELD_REFRESH, &rt));
                    if let Some(idt) = &tokens.id_token {
                        next.idt = Some(record::seal(keys, &binding, FIELD_ID, idt));
                    }
                    if let Some(claims) = tokens.claims {
                        next.groups = record::groups_of(&claims);
                        next.claims = claims;
                    }
                    next.exp = tokens.expires_at;
                    let raw = serde_json::value::to_raw_value(&next).map_err(|e| {
                        crate::oidc::AuthError::new(AuthErrorKind::TamperedData, e.to_string())
                    })?;
                    tracing::info!(sub = %untrusted(&next.sub), "access token refreshed");
                    crate::metrics::refresh();
                    Ok((vec![(USER_KEY.to_owned(), Some(raw))], next))
                })
                .instrument(tracing::info_span!("oidc.refresh"))
                .await;
            if let Ok(Err(e)) = &result {
                crate::metrics::failure(format!("refresh_{}", e.kind().code()));
            }
            match result {
                Ok(Ok(Exclusive::Done(next))) => record = next,
                Ok(Ok(Exclusive::Gone)) => return Err(Rejection::new(RejectionKind::NotLoggedIn)),
                Ok(Err(e)) if e.kind() == AuthErrorKind::ProviderUnavailable => {
                    tracing::warn!(error = %untrusted(&e), "token refresh failed");
                    if expired(record.exp) {
                        return Err(Rejection::new(RejectionKind::ProviderUnavailable));
                    }
                    // Still valid for a while: carry on, retry on a later request.
                }
                Ok(Err(e)) => {
                    session.destroy().await;
                    return Err(logged_out(&e.to_string()));
                }
                Err(e) => return Err(store_failed(&e)),
            }
        }
    }

    let binding = match session.binding_key().await {
        Ok(b) => b,
        Err(e) => return Err(store_failed(&e)),
    };
    let Some((access, reseal)) = record::open(keys, &binding, FIELD_ACCESS, &record.at) else {
        session.destroy().await;
        return Err(logged_out(
            "access token does not decrypt (tampered, moved, or its key retired)",
        ));
    };
    if reseal {
        // Sealed under a key no longer first: re-seal everything under the
        // current key with this request's save.
        let mut next = record.clone();
        next.at = record::seal(keys, &binding, FIELD_ACCESS, &access);
        for (field, slot) in [(FIELD_REFRESH, &mut next.rt), (FIELD_ID, &mut next.idt)] {
            if let Some(sealed) = slot.as_deref() {
                if let Some((plain, _)) = record::open(keys, &binding, field, sealed) {
                    *slot = Some(record::seal(keys, &binding, field, &plain));
                }
            }
        }
        if let Err(e) = session.insert(USER_KEY, &next).await {
            tracing::warn!(error = %untrusted(&e), "re-sealing tokens failed");
        }
        record = next;
    }
    Ok((User::from_record(&record), AccessToken(access)))
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
