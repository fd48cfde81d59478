use std::{
    fmt,
    sync::Arc,
    task::{Context, Poll},
};

use http::{Request, Response};
use tower_service::Service;

use super::{future::RequireLoginFuture, response::RequestKind, RequireLoginLayer};
use crate::{
    oidc::{step_up::StepUp, OidcClient, OidcProviders},
    session::Session,
};

/// Lets only logged-in users reach the inner service; see the
/// [`oidc` module docs](crate::oidc).
#[derive(Clone)]
pub struct RequireLogin<S> {
    inner: S,
    providers: OidcProviders,
    step_up: Arc<StepUp>,
    /// The login URL up to `return_to`.
    login: Arc<str>,
}

impl<S: fmt::Debug> fmt::Debug for RequireLogin<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RequireLogin")
            .field("inner", &self.inner)
            .field("providers", &self.providers)
            .finish()
    }
}

impl<S> RequireLogin<S> {
    pub(crate) fn new(
        inner: S,
        providers: OidcProviders,
        step_up: Arc<StepUp>,
        login: Arc<str>,
    ) -> Self {
        Self {
            inner,
            providers,
            step_up,
            login,
        }
    }

    /// A layer that wraps services in this guard.
    pub fn layer(client: OidcClient) -> RequireLoginLayer {
        RequireLoginLayer::new(client)
    }

    inner_service_accessors!();
}

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for RequireLogin<S>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>> + Clone,
    ResBody: Default,
{
    type Response = Response<ResBody>;
    type Error = S::Error;
    type Future = RequireLoginFuture<S, ReqBody>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<ReqBody>) -> Self::Future {
        let session = req.extensions().get::<Session>().cloned();
        let kind = RequestKind::of(&req, &self.login);
        let authorize = Box::pin(super::future::authorize(
            self.providers.clone(),
            session,
            self.step_up.clone(),
        ));
        // The clone is not necessarily ready; keep the one that is. See
        // https://docs.rs/tower/latest/tower/trait.Service.html#be-careful-when-cloning-inner-services
        let clone = self.inner.clone();
        let inner = std::mem::replace(&mut self.inner, clone);
        RequireLoginFuture::new(authorize, inner, req, kind)
    }
}
