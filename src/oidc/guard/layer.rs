use std::fmt;

use tower_layer::Layer;

use super::RequireLogin;
use crate::oidc::OidcClient;

/// Applies [`RequireLogin`] to a service.
///
/// ```no_run
/// # async fn run(oidc: tower_pg_session::oidc::OidcClient, layer: tower_pg_session::SessionLayer) {
/// use tower::ServiceBuilder;
/// use tower_pg_session::oidc::RequireLoginLayer;
///
/// let stack = ServiceBuilder::new()
///     .layer(layer) // the session layer first
///     .layer(RequireLoginLayer::new(oidc));
/// # }
/// ```
#[derive(Clone)]
#[must_use]
pub struct RequireLoginLayer {
    client: OidcClient,
}

impl fmt::Debug for RequireLoginLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RequireLoginLayer")
            .field("issuer", &self.client.issuer())
            .finish_non_exhaustive()
    }
}

impl RequireLoginLayer {
    /// Requires a user logged in through `client`.
    pub fn new(client: OidcClient) -> Self {
        Self { client }
    }
}

impl<S> Layer<S> for RequireLoginLayer {
    type Service = RequireLogin<S>;

    fn layer(&self, inner: S) -> Self::Service {
        RequireLogin::new(inner, self.client.clone())
    }
}
