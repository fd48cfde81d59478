//! [`RequireLoginLayer`]: lets only logged-in users through, refreshing their
//! access token before it expires.
//!
//! Install it inside the session layer (the session layer must run first):
//! `ServiceBuilder::new().layer(session_layer).layer(RequireLoginLayer::new(oidc))`,
//! or with axum, `route_layer(RequireLoginLayer::new(oidc))` on the protected
//! routes and `layer(session_layer)` on the router.
//!
//! A request without a logged-in user is answered according to what sent it:
//! a browser navigation (`Accept: text/html`) gets 302 to the login with
//! `return_to`, a gRPC call (`content-type: application/grpc…`) gets HTTP 200
//! with `grpc-status: 16` (UNAUTHENTICATED), anything else 401 with
//! `WWW-Authenticate`. The typed [`Rejection`] is put in the response
//! extensions.
//!
//! Refresh happens under the session's row lock, so one refresh runs per
//! session across all instances: with rotating refresh tokens, concurrent
//! requests do not spend the same refresh token twice. `invalid_grant`, a
//! tampered ciphertext or an ID token that fails checks log the session out.

mod future;
mod layer;
mod response;
mod service;

use std::fmt;

use super::step_up::StepUp;

pub use self::{future::RequireLoginFuture, layer::RequireLoginLayer, service::RequireLogin};

/// Why a request was refused.
#[derive(Debug, Clone)]
pub struct Rejection {
    kind: RejectionKind,
    /// Why, when more is known than the kind says (never secret: the
    /// provider's discovery error).
    detail: Option<String>,
    /// What a login must have to pass (`InsufficientAuthentication`).
    step_up: Option<StepUp>,
}

/// The kind of a [`Rejection`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum RejectionKind {
    /// No logged-in user in the session.
    NotLoggedIn,
    /// The login ended now: refresh refused (`invalid_grant`), tokens that do
    /// not decrypt, or an expired token with nothing to refresh it.
    LoggedOut,
    /// The access token is expired and the provider could not be reached to refresh it.
    ProviderUnavailable,
    /// The session store failed.
    SessionUnavailable,
    /// No session layer runs before the guard.
    MissingSessionLayer,
    /// No login, and none can start: the provider is not discovered yet
    /// (a [lazy](crate::oidc::OidcClient::lazy) client). 503 with `Retry-After`.
    LoginUnavailable,
    /// Logged in, but not at the authentication context class or as recently
    /// as the route requires (step-up authentication): a browser is sent
    /// through a login that asks for it, an API client gets 401 with
    /// `error="insufficient_user_authentication"`.
    InsufficientAuthentication,
}

impl Rejection {
    pub(crate) fn new(kind: RejectionKind) -> Self {
        Self {
            kind,
            detail: None,
            step_up: None,
        }
    }

    pub(crate) fn insufficient(step_up: StepUp, why: String) -> Self {
        Self {
            kind: RejectionKind::InsufficientAuthentication,
            detail: Some(why),
            step_up: Some(step_up),
        }
    }

    pub(crate) fn with_detail(mut self, detail: impl Into<String>) -> Self {
        self.detail = Some(detail.into());
        self
    }

    /// What happened.
    #[must_use]
    pub fn kind(&self) -> RejectionKind {
        self.kind
    }
}

impl fmt::Display for Rejection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(detail) = &self.detail {
            return f.write_str(detail);
        }
        f.write_str(match self.kind {
            RejectionKind::NotLoggedIn => "not logged in",
            RejectionKind::LoggedOut => "logged out",
            RejectionKind::ProviderUnavailable => "identity provider unavailable",
            RejectionKind::SessionUnavailable => "session store unavailable",
            RejectionKind::LoginUnavailable => "the OpenID provider is unavailable",
            RejectionKind::InsufficientAuthentication => "stronger authentication required",
            RejectionKind::MissingSessionLayer => {
                "no session: add tower_pg_session::SessionLayer before RequireLoginLayer"
            }
        })
    }
}

impl std::error::Error for Rejection {}
