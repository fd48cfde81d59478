use std::{
    future::Future,
    pin::Pin,
    task::{Context, Poll},
};

use futures_util::future::BoxFuture;
use http::Response;
use pin_project_lite::pin_project;

pin_project! {
    /// Response future of [`OidcRoutes`](super::OidcRoutes): the login's own
    /// answer (boxed), or the wrapped service's future, unboxed.
    pub struct OidcRoutesFuture<F, B> {
        #[pin]
        kind: Kind<F, B>,
    }
}

pin_project! {
    #[project = KindProj]
    enum Kind<F, B> {
        Own { future: BoxFuture<'static, Response<B>> },
        Inner { #[pin] future: F },
    }
}

impl<F, B> std::fmt::Debug for OidcRoutesFuture<F, B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OidcRoutesFuture").finish_non_exhaustive()
    }
}

impl<F, B> OidcRoutesFuture<F, B> {
    pub(crate) fn own(future: BoxFuture<'static, Response<B>>) -> Self {
        Self {
            kind: Kind::Own { future },
        }
    }

    pub(crate) fn inner(future: F) -> Self {
        Self {
            kind: Kind::Inner { future },
        }
    }
}

impl<F, B, E> Future for OidcRoutesFuture<F, B>
where
    F: Future<Output = Result<Response<B>, E>>,
{
    type Output = Result<Response<B>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project().kind.project() {
            KindProj::Own { future } => future.as_mut().poll(cx).map(Ok),
            KindProj::Inner { future } => future.poll(cx),
        }
    }
}
