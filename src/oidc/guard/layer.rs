use std::{fmt, sync::Arc, time::Duration};

use tower_layer::Layer;

use super::RequireLogin;
use crate::oidc::{step_up::StepUp, OidcClient, OidcProviders};

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
    providers: OidcProviders,
    step_up: Arc<StepUp>,
    /// The login URL up to `return_to`.
    login: Arc<str>,
}

impl fmt::Debug for RequireLoginLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RequireLoginLayer")
            .field("providers", &self.providers)
            .field("step_up", &self.step_up)
            .finish_non_exhaustive()
    }
}

impl RequireLoginLayer {
    /// Requires a user logged in through `client`.
    pub fn new(client: OidcClient) -> Self {
        Self::any(&OidcProviders::from(client))
    }

    /// Requires a user logged in through any of `providers`; each login's
    /// tokens are refreshed at the provider that issued them, and a browser
    /// without a login goes to the default provider's login.
    pub fn any(providers: &OidcProviders) -> Self {
        let login = format!(
            "{}?",
            providers.default_provider().config().login_path_abs()
        );
        Self {
            providers: providers.clone(),
            step_up: Arc::default(),
            login: login.into(),
        }
    }

    /// Requires a user logged in through the provider named `name` of
    /// `providers` (routes for customers only, say); a browser without such
    /// a login goes to the login with `?provider=NAME`. `None` when no
    /// provider has that name.
    #[must_use]
    pub fn for_provider(providers: &OidcProviders, name: &str) -> Option<Self> {
        let client = providers.get(name)?.clone();
        let encoded: String = url::form_urlencoded::byte_serialize(name.as_bytes()).collect();
        let login = format!("{}?provider={encoded}&", client.config().login_path_abs());
        Some(Self {
            providers: OidcProviders::from(client),
            step_up: Arc::default(),
            login: login.into(),
        })
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
        Arc::make_mut(&mut self.step_up).set_acr_values(values);
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
        RequireLogin::new(
            inner,
            self.providers.clone(),
            self.step_up.clone(),
            self.login.clone(),
        )
    }
}
