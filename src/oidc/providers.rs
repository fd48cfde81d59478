//! Several OpenID providers in one application (Keycloak for staff, Cognito
//! for customers): each with its own callback and back-channel logout path,
//! one login route that takes `?provider=NAME`, one logout route that ends
//! the login at the provider it came from.
//!
//! Mix-up defence: a pending login remembers the provider it was started
//! with, and only that provider's callback completes it (besides RFC 9207's
//! `iss`, checked where the provider sends it). The login record knows its
//! issuer: [`RequireLoginLayer::new`](super::RequireLoginLayer::new) lets
//! through logins of its own provider only,
//! [`RequireLoginLayer::any`](super::RequireLoginLayer::any) those of any of
//! the providers, each refreshed at the provider that issued it.

use std::{collections::HashSet, fmt, sync::Arc};

use super::{
    record::{self, Stored},
    OidcClient,
};
use crate::{error::ConfigError, session::Session};

/// Named OpenID clients served together; the first is the default. Cheap to
/// clone.
///
/// ```no_run
/// # use tower_pg_session::oidc::{OidcClient, OidcProviders, RequireLoginLayer};
/// # fn app(staff: OidcClient, customers: OidcClient, sessions: tower_pg_session::SessionLayer)
/// # -> Result<axum::Router, tower_pg_session::ConfigError> {
/// // Each client with its own callback path, e.g.
/// // OidcConfig::with_callback_path("auth/callback/customers").
/// let providers = OidcProviders::new([("staff", staff), ("customers", customers)])?;
/// Ok(axum::Router::new()
///     .route("/me", axum::routing::get(|| async { "hello" }))
///     .route_layer(RequireLoginLayer::any(&providers))
///     // GET /auth/login?provider=customers, each callback, one logout
///     .merge(providers.routes())
///     .layer(sessions))
/// # }
/// ```
#[derive(Clone)]
pub struct OidcProviders {
    clients: Arc<[(String, OidcClient)]>,
}

impl fmt::Debug for OidcProviders {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map()
            .entries(self.clients.iter().map(|(n, c)| (n, c.issuer())))
            .finish()
    }
}

impl From<OidcClient> for OidcProviders {
    /// One provider, named `default`.
    fn from(client: OidcClient) -> Self {
        Self {
            clients: Arc::new([("default".to_owned(), client)]),
        }
    }
}

impl OidcProviders {
    /// The providers, by name; the first is the default.
    ///
    /// # Errors
    /// [`ConfigError::Conflict`] when there is none, or two share a name, an
    /// issuer, a callback path or a back-channel logout path, or their token
    /// keyrings differ (the session's login record is opened with one).
    pub fn new<I, N>(providers: I) -> Result<Self, ConfigError>
    where
        I: IntoIterator<Item = (N, OidcClient)>,
        N: Into<String>,
    {
        let clients: Vec<(String, OidcClient)> =
            providers.into_iter().map(|(n, c)| (n.into(), c)).collect();
        let Some((_, first)) = clients.first() else {
            let reason = "OidcProviders needs at least one provider";
            return Err(ConfigError::conflict(&["OidcProviders::new"], reason));
        };
        let unique = |what: &dyn Fn(&OidcClient, &str) -> String,
                      setting: &'static str,
                      reason: &'static str| {
            let mut seen = HashSet::new();
            if clients.iter().all(|(n, c)| seen.insert(what(c, n))) {
                Ok(())
            } else {
                Err(ConfigError::conflict(
                    &["OidcProviders::new", setting],
                    reason,
                ))
            }
        };
        unique(&|_, n| n.to_owned(), "name", "two providers share a name")?;
        unique(
            &|c, _| c.issuer().to_owned(),
            "OidcConfig::new",
            "two providers share an issuer",
        )?;
        unique(
            &|c, _| c.config().path_abs(&c.config().callback_path),
            "OidcConfig::with_callback_path",
            "two providers share a callback path",
        )?;
        unique(
            &|c, _| c.config().path_abs(&c.config().backchannel_logout_path),
            "OidcConfig::with_backchannel_logout_path",
            "two providers share a back-channel logout path",
        )?;
        let keys: Vec<_> = first.config().keys.key_ids().collect();
        if clients
            .iter()
            .any(|(_, c)| !c.config().keys.key_ids().eq(keys.iter().copied()))
        {
            let reason = "providers must share one token keyring (OidcConfig's keys)";
            return Err(ConfigError::conflict(
                &["OidcProviders::new", "OidcConfig::new"],
                reason,
            ));
        }
        Ok(Self {
            clients: clients.into(),
        })
    }

    /// The provider named `name`.
    #[must_use]
    pub fn get(&self, name: &str) -> Option<&OidcClient> {
        self.clients.iter().find(|(n, _)| n == name).map(|(_, c)| c)
    }

    /// The default provider (the first).
    #[must_use]
    pub fn default_provider(&self) -> &OidcClient {
        &self.clients[0].1
    }

    /// The providers in order, with their names.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &OidcClient)> {
        self.clients.iter().map(|(n, c)| (n.as_str(), c))
    }

    /// The provider whose issuer is `issuer`.
    pub(crate) fn by_issuer(&self, issuer: &str) -> Option<&OidcClient> {
        self.iter().map(|(_, c)| c).find(|c| c.issuer() == issuer)
    }

    /// The index of the provider named `name`.
    pub(crate) fn index_of(&self, name: &str) -> Option<usize> {
        self.clients.iter().position(|(n, _)| n == name)
    }

    pub(crate) fn at(&self, index: usize) -> &OidcClient {
        &self.clients[index].1
    }

    /// The provider the session's login came from; `None` without a login
    /// that opens.
    pub(crate) async fn of_session(&self, session: &Session) -> Option<&OidcClient> {
        let keys = &self.default_provider().config().keys;
        match record::load_login(keys, session).await {
            Ok(Stored::Opened { record, .. }) => self.by_issuer(&record.iss),
            _ => None,
        }
    }
}
