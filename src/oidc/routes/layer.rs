use std::fmt;

use tower_layer::Layer;

use super::{OidcRoutes, Paths};
use crate::oidc::{OidcClient, OidcProviders};

/// Serves the login's routes at the configured paths and passes every other
/// request to the wrapped service; for hyper, tonic or any tower stack (with
/// axum, [`OidcClient::routes`] is the shorter way). See the
/// [module docs](super).
///
/// ```no_run
/// # use tower_pg_session::{oidc::{OidcClient, OidcRoutesLayer}, SessionLayer};
/// # fn stack<S>(oidc: OidcClient, sessions: SessionLayer, app: S) {
/// let service = tower::ServiceBuilder::new()
///     .layer(sessions)
///     .layer(OidcRoutesLayer::new(oidc))
///     .service(app);
/// # }
/// ```
#[derive(Clone)]
pub struct OidcRoutesLayer {
    providers: OidcProviders,
    paths: Paths,
}

impl fmt::Debug for OidcRoutesLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OidcRoutesLayer")
            .field("providers", &self.providers)
            .field("paths", &self.paths)
            .finish()
    }
}

impl OidcRoutesLayer {
    /// The routes of `client`'s configuration.
    #[must_use]
    pub fn new(client: OidcClient) -> Self {
        Self::for_providers(OidcProviders::from(client))
    }

    /// The routes of several providers; see [`OidcProviders::routes`].
    #[must_use]
    pub fn for_providers(providers: OidcProviders) -> Self {
        let paths = Paths::new(&providers);
        Self { providers, paths }
    }
}

impl<S> Layer<S> for OidcRoutesLayer {
    type Service = OidcRoutes<S>;

    fn layer(&self, inner: S) -> Self::Service {
        OidcRoutes::new(inner, self.providers.clone(), self.paths.clone())
    }
}
