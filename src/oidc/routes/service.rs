use std::{
    fmt,
    task::{Context, Poll},
};

use http::{Request, Response};
use tower_service::Service;

use super::{future::OidcRoutesFuture, respond, Paths};
use crate::oidc::OidcProviders;

/// The service of [`OidcRoutesLayer`](super::OidcRoutesLayer).
#[derive(Clone)]
pub struct OidcRoutes<S> {
    inner: S,
    providers: OidcProviders,
    paths: Paths,
}

impl<S: fmt::Debug> fmt::Debug for OidcRoutes<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OidcRoutes")
            .field("inner", &self.inner)
            .field("providers", &self.providers)
            .field("paths", &self.paths)
            .finish()
    }
}

impl<S> OidcRoutes<S> {
    pub(crate) fn new(inner: S, providers: OidcProviders, paths: Paths) -> Self {
        Self {
            inner,
            providers,
            paths,
        }
    }

    inner_service_accessors!();
}

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for OidcRoutes<S>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>>,
    ReqBody: http_body::Body + Send + 'static,
    ReqBody::Data: Send,
    ReqBody::Error: std::error::Error + Send + Sync + 'static,
    ResBody: From<String> + Default + Send + 'static,
{
    type Response = Response<ResBody>;
    type Error = S::Error;
    type Future = OidcRoutesFuture<S::Future, ResBody>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<ReqBody>) -> Self::Future {
        match self.paths.route(request.uri().path()) {
            Some((route, index)) => OidcRoutesFuture::own(Box::pin(respond(
                self.providers.clone(),
                route,
                index,
                request,
            ))),
            None => OidcRoutesFuture::inner(self.inner.call(request)),
        }
    }
}
