//! The response future: runs the inner service, then saves the session.

use std::{
    future::Future,
    pin::Pin,
    sync::Arc,
    task::{ready, Context, Poll},
};

use http::{header::SET_COOKIE, Response, StatusCode};
use pin_project_lite::pin_project;
use time::OffsetDateTime;
use tokio::task::JoinHandle;

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
        abandon: Abandon,
    }
}

/// Tells the session when the response future is dropped before it is
/// done (the client went away): a save it leaves running then never merges
/// its changes over newer data.
struct Abandon(Option<Session>);

impl Drop for Abandon {
    fn drop(&mut self) {
        if let Some(session) = self.0.take() {
            session.abandon();
        }
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
        // The save runs in its own task: once started, it completes even if
        // this future is dropped.
        Saving {
            save: JoinHandle<Outcome>,
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
            abandon: Abandon(Some(session.clone())),
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
                    let (response, session) = match (ready!(future.poll(cx)), session.take()) {
                        (Ok(response), Some(session)) => (response, session),
                        (result, _) => {
                            this.abandon.0 = None;
                            return Poll::Ready(result);
                        }
                    };
                    if let Some(outcome) = session.try_finish_now() {
                        this.abandon.0 = None;
                        return Poll::Ready(Ok(apply(this.config, response, outcome)));
                    }
                    this.state.set(State::Saving {
                        save: session.spawn_finish(),
                        response: Some(response),
                    });
                }
                StateProj::Saving { save, response } => {
                    // A save whose task panicked is reported as unavailable.
                    let outcome = ready!(Pin::new(save).poll(cx)).unwrap_or(Outcome {
                        cookie: CookieAction::Keep,
                        failure: Some(Failure::Unavailable),
                    });
                    this.abandon.0 = None;
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
