//! The response future: runs the inner service, then saves the session.

use std::{
    future::Future,
    pin::Pin,
    sync::Arc,
    task::{ready, Context, Poll},
};

use futures_util::future::BoxFuture;
use http::{header::SET_COOKIE, Response, StatusCode};
use pin_project_lite::pin_project;
use time::OffsetDateTime;

use super::{
    handle::{CookieAction, Failure, Outcome},
    layer::Config,
    Session,
};

pin_project! {
    /// Response future of [`SessionService`](super::SessionService).
    pub struct ResponseFuture<F, B> {
        #[pin]
        state: State<F, B>,
        config: Arc<Config>,
    }
}

pin_project! {
    #[project = StateProj]
    enum State<F, B> {
        Inner {
            #[pin]
            future: F,
            session: Option<Session>,
        },
        // Boxed: only requests that changed their session get here.
        Saving {
            save: BoxFuture<'static, Outcome>,
            response: Option<Response<B>>,
        },
    }
}

impl<F, B> std::fmt::Debug for ResponseFuture<F, B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResponseFuture").finish_non_exhaustive()
    }
}

impl<F, B> ResponseFuture<F, B> {
    pub(crate) fn new(future: F, session: Session, config: Arc<Config>) -> Self {
        Self {
            state: State::Inner {
                future,
                session: Some(session),
            },
            config,
        }
    }
}

impl<F, B, E> Future for ResponseFuture<F, B>
where
    F: Future<Output = Result<Response<B>, E>>,
    B: Default,
{
    type Output = Result<Response<B>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        loop {
            match this.state.as_mut().project() {
                StateProj::Inner { future, session } => {
                    let response = ready!(future.poll(cx))?;
                    let Some(session) = session.take() else {
                        return Poll::Ready(Ok(response));
                    };
                    if let Some(outcome) = session.try_finish_now() {
                        return Poll::Ready(Ok(apply(this.config, response, outcome)));
                    }
                    this.state.set(State::Saving {
                        save: Box::pin(session.finish()),
                        response: Some(response),
                    });
                }
                StateProj::Saving { save, response } => {
                    let outcome = ready!(save.as_mut().poll(cx));
                    let response = response.take().unwrap_or_default();
                    return Poll::Ready(Ok(apply(this.config, response, outcome)));
                }
            }
        }
    }
}

fn apply<B: Default>(config: &Config, mut response: Response<B>, outcome: Outcome) -> Response<B> {
    if let Some(failure) = outcome.failure {
        // The handler's response may claim a change that was not stored.
        let mut failed = Response::new(B::default());
        *failed.status_mut() = match failure {
            Failure::Unavailable => config.unavailable_status,
            Failure::TooLarge => StatusCode::INTERNAL_SERVER_ERROR,
        };
        return failed;
    }
    let header = match outcome.cookie {
        CookieAction::Keep => return response,
        CookieAction::Set(id, expire) => {
            let max_age = (expire - OffsetDateTime::now_utc())
                .as_seconds_f64()
                .round() as i64;
            config.cookie.set(&config.cookie_name, &id, max_age)
        }
        CookieAction::Remove => config.cookie.remove(&config.cookie_name),
    };
    response.headers_mut().append(SET_COOKIE, header);
    response
}
