use std::{fmt, sync::Arc, time::Duration};

use tower_layer::Layer;

use super::RequireLogin;
use crate::oidc::{step_up::StepUp, OidcClient};

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
    step_up: Arc<StepUp>,
}

impl fmt::Debug for RequireLoginLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RequireLoginLayer")
            .field("issuer", &self.client.issuer())
            .field("step_up", &self.step_up)
            .finish_non_exhaustive()
    }
}

impl RequireLoginLayer {
    /// Requires a user logged in through `client`.
    pub fn new(client: OidcClient) -> Self {
        Self {
            client,
            step_up: Arc::default(),
        }
    }

    /// Also requires a login at one of these authentication context classes
    /// (its ID token's `acr`; step-up authentication, RFC 9470). A browser
    /// with a weaker login is sent through a new login that asks for them;
    /// an API client gets 401 with `WWW-Authenticate: …
    /// error="insufficient_user_authentication", acr_values="…"`.
    ///
    /// ```no_run
    /// # fn run(oidc: tower_pg_session::oidc::OidcClient) {
    /// use std::time::Duration;
    /// use tower_pg_session::oidc::RequireLoginLayer;
    ///
    /// // Payments: a second factor, entered in the last 5 minutes.
    /// let payments = RequireLoginLayer::new(oidc)
    ///     .with_acr_values(["urn:example:mfa"])
    ///     .with_max_auth_age(Duration::from_secs(300));
    /// # }
    /// ```
    pub fn with_acr_values<I, S>(mut self, values: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        Arc::make_mut(&mut self.step_up).acr_values = values.into_iter().map(Into::into).collect();
        self
    }

    /// Also requires that the user authenticated at the provider at most
    /// `age` ago (the ID token's `auth_time`); otherwise as
    /// [`Self::with_acr_values`], with `max_age`.
    pub fn with_max_auth_age(mut self, age: Duration) -> Self {
        Arc::make_mut(&mut self.step_up).max_age = Some(age);
        self
    }
}

impl<S> Layer<S> for RequireLoginLayer {
    type Service = RequireLogin<S>;

    fn layer(&self, inner: S) -> Self::Service {
        RequireLogin::new(inner, self.client.clone(), self.step_up.clone())
    }
}
