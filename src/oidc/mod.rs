//! OpenID Connect login: the handlers' side ([`OidcClient::login`],
//! [`OidcClient::callback`], [`OidcClient::logout`],
//! [`OidcClient::backchannel_logout`]) and a guard for protected routes
//! ([`RequireLoginLayer`]), served at the configured paths by
//! [`OidcClient::routes`] or [`OidcRoutesLayer`].
//!
//! Built on the session layer: a login's state, nonce and PKCE verifier are
//! kept in the session (one entry per pending login, so several tabs can log
//! in at once) and consumed under the row lock, so a callback succeeds once.
//! The logged-in user's record (identity, claims, groups, expiry, tokens) and
//! each pending login are sealed whole with AES-256-GCM ([`crate::crypto`]),
//! the record bound to the session and the field it is stored in. Their keys
//! (`oidc`, `oidc.login.*`) are reserved: application code gets
//! [`SessionError::ReservedKey`](crate::SessionError::ReservedKey) instead of
//! writing them, and a record that does not open is never trusted.
//!
//! ```no_run
//! use axum::{routing::get, Router};
//! use tower_pg_session::{crypto::Keyring, oidc::{OidcClient, OidcConfig, RequireLoginLayer, User}, PgStore, SessionLayer, SigningKeys};
//!
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! let store = PgStore::connect("postgres://postgres@127.0.0.1/postgres").await?;
//! let keys = Keyring::from_base64_list(&std::env::var("TOKEN_KEYS")?)?;
//! let config = OidcConfig::new("https://sso.example.com/realms/acme", "web", "https://app.example.com", keys)?
//!     .with_client_secret(&std::env::var("OIDC_CLIENT_SECRET")?);
//! let oidc = OidcClient::discover(config, store.clone()).await?;
//!
//! let app: Router = Router::new()
//!     .route("/me", get(|user: User| async move { user.sub().to_owned() }))
//!     .route_layer(RequireLoginLayer::new(oidc.clone()))
//!     .merge(oidc.routes()) // login, callback, logout, back-channel logout
//!     .layer(SessionLayer::new(store, SigningKeys::new([std::env::var("SESSION_SECRET")?])?));
//! # Ok(()) }
//! ```
//!
//! Without axum, [`OidcRoutesLayer`] serves the same routes in any tower
//! stack (hyper, tonic).

mod client;
mod client_auth;
mod config;
mod dpop;
mod flow;
mod guard;
pub(crate) mod logout_token;
mod par;
pub(crate) mod pending;
mod providers;
pub(crate) mod record;
pub mod routes;
mod step_up;
mod userinfo;

pub(crate) use self::client::{constant_eq, error_chain};
pub(crate) use self::client_auth::Authenticator;

#[cfg(feature = "__fuzz")]
pub(crate) use self::record::safe_return_to;

use std::fmt;

use http::{header, HeaderValue, StatusCode};
use serde::Serialize;
use serde_json::{Map, Value};

use self::record::LoginRecord;
pub use self::{
    client::OidcClient,
    client_auth::{ClientAuth, ClientKey, ClientKeyError, KeyAlg},
    config::{OidcConfig, Provider},
    guard::{Rejection, RejectionKind, RequireLogin, RequireLoginFuture, RequireLoginLayer},
    par::Par,
    providers::OidcProviders,
    routes::{OidcRoutes, OidcRoutesFuture, OidcRoutesLayer},
    step_up::LoginOptions,
    userinfo::{UnknownUserinfoMode, UserinfoMode},
};
/// The signature algorithms of the configuration
/// ([`OidcConfig::with_id_token_signed_response_alg`],
/// [`OidcConfig::with_userinfo_signed_response_alg`],
/// [`OidcConfig::with_insecure_algorithms`]).
pub use openidconnect::core::CoreJwsSigningAlgorithm;
/// The URL type of the configuration ([`Provider::Cognito`]'s domain).
pub use openidconnect::url::Url;

/// What went wrong in a login, logout or back-channel logout. Its
/// [`status`](Self::status) is what the browser should get.
#[derive(Debug, Clone)]
pub struct AuthError {
    kind: AuthErrorKind,
    detail: String,
}

/// The kind of an [`AuthError`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum AuthErrorKind {
    /// The callback has no `state`.
    MissingState,
    /// The `state` names no pending login of this browser, or one already used.
    UnknownState,
    /// The pending login expired.
    ExpiredState,
    /// The callback's `iss` is not the issuer, or is missing where required (RFC 9207).
    IssuerMismatch,
    /// The callback's parameters are malformed (no code, duplicates).
    MalformedCallback,
    /// The provider answered the authorization request with an error.
    ProviderError,
    /// The token endpoint refused the request.
    TokenRequestRejected,
    /// The token endpoint answered `invalid_grant`.
    InvalidGrant,
    /// The ID token failed verification.
    InvalidIdToken,
    /// A back-channel logout token failed verification.
    InvalidLogoutToken,
    /// The userinfo answer names another subject or is malformed.
    InvalidUserinfo,
    /// Stored login data does not decrypt.
    TamperedData,
    /// The provider could not be reached or answered nonsense.
    ProviderUnavailable,
    /// The session store failed.
    SessionUnavailable,
    /// A logout came from another site.
    CrossSiteRequest,
    /// The provider is not discovered yet (a [lazy](OidcClient::lazy)
    /// client whose provider has not answered): try again shortly.
    LoginUnavailable,
    /// The provider did not authenticate the user as the login asked
    /// (`acr_values`, `max_age`): 403.
    InsufficientAuthentication,
    /// The client's settings are out of range or contradict each other
    /// (reported by [`OidcClient::discover`]): 500.
    Misconfigured,
}

impl AuthErrorKind {
    pub(crate) fn code(self) -> &'static str {
        match self {
            Self::MissingState => "missing_state",
            Self::UnknownState => "unknown_state",
            Self::ExpiredState => "expired_state",
            Self::IssuerMismatch => "issuer_mismatch",
            Self::MalformedCallback => "malformed_callback",
            Self::ProviderError => "provider_error",
            Self::TokenRequestRejected => "token_request_rejected",
            Self::InvalidGrant => "invalid_grant",
            Self::InvalidIdToken => "invalid_id_token",
            Self::InvalidLogoutToken => "invalid_logout_token",
            Self::InvalidUserinfo => "invalid_userinfo",
            Self::TamperedData => "tampered_data",
            Self::ProviderUnavailable => "provider_unavailable",
            Self::SessionUnavailable => "session_unavailable",
            Self::CrossSiteRequest => "cross_site_request",
            Self::LoginUnavailable => "login_unavailable",
            Self::InsufficientAuthentication => "insufficient_user_authentication",
            Self::Misconfigured => "misconfigured",
        }
    }
}

impl fmt::Display for AuthError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.kind.code(), self.detail)
    }
}

impl std::error::Error for AuthError {}

impl AuthError {
    pub(crate) fn new(kind: AuthErrorKind, detail: impl Into<String>) -> Self {
        Self {
            kind,
            detail: detail.into(),
        }
    }

    /// What went wrong.
    #[must_use]
    pub fn kind(&self) -> AuthErrorKind {
        self.kind
    }

    /// A human-readable explanation (never a secret).
    #[must_use]
    pub fn detail(&self) -> &str {
        &self.detail
    }

    /// The status the response carries: 400 for a bad or replayed callback,
    /// 403 for a cross-site logout, 502 when the provider is unreachable, 503
    /// when the session store is or the provider is not discovered yet, 500
    /// for a misconfigured client.
    #[must_use]
    pub fn status(&self) -> StatusCode {
        match self.kind {
            AuthErrorKind::CrossSiteRequest | AuthErrorKind::InsufficientAuthentication => {
                StatusCode::FORBIDDEN
            }
            AuthErrorKind::ProviderUnavailable => StatusCode::BAD_GATEWAY,
            AuthErrorKind::Misconfigured => StatusCode::INTERNAL_SERVER_ERROR,
            AuthErrorKind::SessionUnavailable | AuthErrorKind::LoginUnavailable => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            _ => StatusCode::BAD_REQUEST,
        }
    }

    /// The response for a request with these headers: HTML for browsers
    /// (`Accept: text/html`), JSON otherwise.
    pub fn response_for<B: From<String>>(&self, headers: &http::HeaderMap) -> http::Response<B> {
        let html = headers
            .get_all(header::ACCEPT)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .any(|v| v.contains("text/html"));
        self.to_response(html)
    }

    /// A response: JSON `{"error": …, "error_description": …}`, or a small
    /// HTML page when `html` (for browsers).
    pub fn to_response<B: From<String>>(&self, html: bool) -> http::Response<B> {
        let (body, content_type) = if html {
            (
                format!(
                    "<!doctype html><meta charset=utf-8><title>Login failed</title>\
                     <h1>Login failed</h1><p>{}</p><p><a href=\"/\">Back</a></p>",
                    escape_html(&self.detail)
                ),
                "text/html; charset=utf-8",
            )
        } else {
            (
                serde_json::json!({"error": self.kind.code(), "error_description": self.detail})
                    .to_string(),
                "application/json",
            )
        };
        let mut r = http::Response::new(B::from(body));
        *r.status_mut() = self.status();
        r.headers_mut()
            .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
        r.headers_mut()
            .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        r
    }
}

/// `request` with `form` as its `application/x-www-form-urlencoded` body,
/// as token and revocation endpoints take it.
pub(crate) fn with_form(
    request: openidconnect::reqwest::RequestBuilder,
    form: &[(&str, &str)],
) -> openidconnect::reqwest::RequestBuilder {
    let body = openidconnect::url::form_urlencoded::Serializer::new(String::new())
        .extend_pairs(form)
        .finish();
    request
        .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
        .body(body)
}

fn escape_html(s: &str) -> String {
    s.chars()
        .map(|c| match c {
            '<' => "&lt;".to_owned(),
            '>' => "&gt;".to_owned(),
            '&' => "&amp;".to_owned(),
            '"' => "&quot;".to_owned(),
            '\'' => "&#39;".to_owned(),
            c => c.to_string(),
        })
        .collect()
}

/// A redirect answer of the login and logout handlers.
#[derive(Debug, Clone)]
pub struct Redirect {
    status: StatusCode,
    location: String,
}

impl Redirect {
    pub(crate) fn found(location: &str) -> Self {
        Self {
            status: StatusCode::FOUND,
            location: encode_location(location),
        }
    }

    fn see_other(location: &str) -> Self {
        Self {
            status: StatusCode::SEE_OTHER,
            location: encode_location(location),
        }
    }

    /// Where it points.
    #[must_use]
    pub fn location(&self) -> &str {
        &self.location
    }

    /// As an `http` response with an empty body.
    pub fn to_response<B: Default>(&self) -> http::Response<B> {
        let mut r = http::Response::new(B::default());
        *r.status_mut() = self.status;
        if let Ok(v) = HeaderValue::from_str(&self.location) {
            r.headers_mut().insert(header::LOCATION, v);
        }
        r.headers_mut()
            .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        r
    }
}

/// A `Location` value is ASCII: bytes outside it (a `return_to` of
/// `/café`) and any control or space are percent-encoded, the rest
/// (already-encoded `%XX` included) kept.
pub(crate) fn encode_location(location: &str) -> String {
    use std::fmt::Write;
    let mut out = String::with_capacity(location.len());
    for b in location.bytes() {
        if b.is_ascii_graphic() {
            out.push(char::from(b));
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}

/// The logged-in user, put in the request extensions by [`RequireLogin`].
#[derive(Debug, Clone, Serialize)]
pub struct User {
    sub: String,
    issuer: String,
    claims: Map<String, Value>,
    groups: Vec<String>,
    access_token_expires_at: Option<i64>,
}

impl User {
    fn from_record(r: &LoginRecord) -> Self {
        Self {
            sub: r.sub.clone(),
            issuer: r.iss.clone(),
            claims: r.claims.clone(),
            groups: r.groups.clone(),
            access_token_expires_at: r.exp,
        }
    }

    /// The subject: the provider's id of the user.
    #[must_use]
    pub fn sub(&self) -> &str {
        &self.sub
    }

    /// The issuer that vouched for the user.
    #[must_use]
    pub fn issuer(&self) -> &str {
        &self.issuer
    }

    /// All claims of the (latest) ID token.
    #[must_use]
    pub fn claims(&self) -> &Map<String, Value> {
        &self.claims
    }

    /// Groups (`cognito:groups`, or `groups`).
    #[must_use]
    pub fn groups(&self) -> &[String] {
        &self.groups
    }

    /// When the access token expires, in unix seconds.
    #[must_use]
    pub fn access_token_expires_at(&self) -> Option<i64> {
        self.access_token_expires_at
    }
}

/// The user's current access token, for calling APIs on their behalf; put in
/// the request extensions by [`RequireLogin`].
#[derive(Clone)]
pub struct AccessToken {
    token: String,
    /// The key the token is bound to (DPoP), if any.
    dpop: Option<dpop::DpopKey>,
}

impl fmt::Debug for AccessToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("AccessToken([redacted])")
    }
}

impl AccessToken {
    /// The token.
    ///
    /// # Security Warning
    /// Do not log it or send it anywhere but to the APIs it is meant for.
    #[must_use]
    pub fn secret(&self) -> &str {
        &self.token
    }

    pub(crate) fn new(token: String, dpop: Option<dpop::DpopKey>) -> Self {
        Self { token, dpop }
    }

    /// Whether the token is bound to the login's key
    /// ([DPoP](OidcConfig::with_dpop)): a resource server then wants a
    /// [`dpop_proof`](Self::dpop_proof) with it.
    #[must_use]
    pub fn is_dpop(&self) -> bool {
        self.dpop.is_some()
    }

    /// The `Authorization` header value for a call with this token:
    /// `DPoP <token>` for a DPoP-bound token, else `Bearer <token>`.
    #[must_use]
    pub fn authorization(&self) -> String {
        let scheme = if self.is_dpop() { "DPoP" } else { "Bearer" };
        format!("{scheme} {}", self.token)
    }

    /// The `DPoP` header value for a call with this token to `url` by
    /// `method` (RFC 9449: signed with the login's key, bound to this token
    /// by its hash, a fresh `jti`), with the resource server's `nonce` when
    /// it asked for one; `None` for a token that is not DPoP-bound.
    ///
    /// ```no_run
    /// # async fn call(token: tower_pg_session::oidc::AccessToken) -> Result<(), reqwest::Error> {
    /// let url = "https://api.example.com/mail";
    /// let mut request = reqwest::Client::new()
    ///     .get(url)
    ///     .header("authorization", token.authorization());
    /// if let Some(proof) = token.dpop_proof("GET", url, None) {
    ///     request = request.header("dpop", proof);
    /// }
    /// request.send().await?;
    /// # Ok(()) }
    /// ```
    #[must_use]
    pub fn dpop_proof(&self, method: &str, url: &str, nonce: Option<&str>) -> Option<String> {
        let key = self.dpop.as_ref()?;
        Some(key.proof(method, url, nonce, Some(&self.token)))
    }
}

#[cfg(feature = "axum")]
mod axum_impls {
    use axum_core::{
        extract::FromRequestParts,
        response::{IntoResponse, Response},
    };
    use http::{request::Parts, StatusCode};

    use super::{AccessToken, AuthError, Redirect, User};

    #[cfg_attr(docsrs, doc(cfg(feature = "axum")))]
    impl IntoResponse for Redirect {
        fn into_response(self) -> Response {
            self.to_response()
        }
    }

    #[cfg_attr(docsrs, doc(cfg(feature = "axum")))]
    impl IntoResponse for AuthError {
        fn into_response(self) -> Response {
            self.to_response(false)
        }
    }

    const NO_GUARD: &str =
        "no logged-in user: put tower_pg_session::oidc::RequireLoginLayer on this route";

    impl<S: Send + Sync> FromRequestParts<S> for User {
        type Rejection = (StatusCode, &'static str);

        async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
            parts
                .extensions
                .get::<User>()
                .cloned()
                .ok_or((StatusCode::INTERNAL_SERVER_ERROR, NO_GUARD))
        }
    }

    impl<S: Send + Sync> FromRequestParts<S> for AccessToken {
        type Rejection = (StatusCode, &'static str);

        async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
            parts
                .extensions
                .get::<AccessToken>()
                .cloned()
                .ok_or((StatusCode::INTERNAL_SERVER_ERROR, NO_GUARD))
        }
    }
}
