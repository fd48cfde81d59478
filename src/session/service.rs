//! [`SessionService`]: reads the cookie, hands the handler a [`Session`].

use std::{
    sync::Arc,
    task::{Context, Poll},
};

use http::{Request, Response};
use tower_service::Service;

use super::{future::ResponseFuture, layer::Config, Session};
use crate::store::PgStore;

/// The service built by [`SessionLayer`](super::SessionLayer).
#[derive(Clone)]
pub struct SessionService<S> {
    inner: S,
    store: PgStore,
    config: Arc<Config>,
}

impl<S: std::fmt::Debug> std::fmt::Debug for SessionService<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SessionService")
            .field("inner", &self.inner)
            .field("store", &self.store)
            .finish_non_exhaustive()
    }
}

impl<S> SessionService<S> {
    pub(crate) fn new(inner: S, store: PgStore, config: Arc<Config>) -> Self {
        Self {
            inner,
            store,
            config,
        }
    }

    inner_service_accessors!();
}

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for SessionService<S>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>> + Clone,
    ResBody: Default,
{
    type Response = Response<ResBody>;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future, ResBody>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<ReqBody>) -> Self::Future {
        let incoming = self
            .config
            .cookie
            .read(req.headers(), &self.config.cookie_name);
        let client = self.config.client_info(req.headers());
        let (incoming, resign) = match incoming {
            Some((id, stale)) => (Some(id), stale),
            None => (None, false),
        };
        let session = Session::new(self.store.clone(), self.config.clone(), incoming, client);
        if resign {
            session.resign_cookie();
        }
        req.extensions_mut().insert(session.clone());
        // The clone is not necessarily ready; keep the one that is. See
        // https://docs.rs/tower/latest/tower/trait.Service.html#be-careful-when-cloning-inner-services
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        ResponseFuture::new(inner.call(req), session, self.config.clone())
    }
}
