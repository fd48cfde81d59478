//! [`VaultError`]: everything the vault can report.

use http::StatusCode;

use crate::{session::SessionError, store::StoreError};

/// Why a vault operation failed. Messages never contain token material;
/// text a provider chose is shown escaped and bounded.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum VaultError {
    /// No integration of that name was configured.
    #[error("no integration named {0:?} is configured")]
    UnknownIntegration(String),
    /// An integration name, a user id or a token given to the vault is
    /// unusable (empty, too long, or with characters the vault refuses).
    #[error("invalid {what}: {reason}")]
    InvalidInput {
        /// Which input: `"user id"`, `"integration name"`, `"scope"`, …
        what: &'static str,
        /// Why it was refused.
        reason: &'static str,
    },
    /// The user has not connected this integration (or removed it).
    #[error("{integration} is not connected for this user")]
    NotConnected {
        /// The integration's name.
        integration: String,
    },
    /// The provider refused the refresh token (`invalid_grant`: revoked,
    /// expired, or the user withdrew consent), or the access token expired
    /// and there is no refresh token. The user must connect the integration
    /// again; until then every `get` fails with this error at once, without
    /// calling the provider.
    #[error("{integration} needs the user to connect it again")]
    NeedsReconsent {
        /// The integration's name.
        integration: String,
    },
    /// The token endpoint could not be reached, timed out, or answered with
    /// a server error. The stored tokens are unchanged; a later call may
    /// succeed. (While the old access token is still valid, `get` returns it
    /// instead of this error.)
    #[error("the token endpoint of {integration} is unavailable: {detail}")]
    ProviderUnavailable {
        /// The integration's name.
        integration: String,
        /// What failed (escaped, bounded).
        detail: String,
    },
    /// The token endpoint refused the request with an OAuth error other
    /// than `invalid_grant` (e.g. `invalid_client`: check the client id and
    /// secret). The stored tokens are unchanged.
    #[error("the token endpoint of {integration} refused the refresh: {error}")]
    TokenRequestRejected {
        /// The integration's name.
        integration: String,
        /// The OAuth error code (escaped, bounded).
        error: String,
    },
    /// The token endpoint answered with something that is not a usable
    /// token response (not JSON, no access token, a token over the size
    /// limit, a body over its limit). The stored tokens are unchanged.
    #[error("the token endpoint of {integration} sent an unusable response: {detail}")]
    InvalidTokenResponse {
        /// The integration's name.
        integration: String,
        /// What was wrong with it.
        detail: String,
    },
    /// A token is longer than the vault accepts.
    #[error("a token of {size} bytes is over the limit of {limit}")]
    TokenTooLarge {
        /// Its length in bytes.
        size: usize,
        /// The limit in bytes.
        limit: usize,
    },
    /// A stored token did not open: it was sealed for another user,
    /// integration or field (copied between rows), altered, or sealed under
    /// a key no longer in the keyring. Fails closed; the row is left as it
    /// is for an operator to inspect.
    #[error("a stored token of {integration} could not be opened")]
    Unreadable {
        /// The integration's name.
        integration: String,
    },
    /// Connecting an account needs a logged-in session (the guard's login
    /// record), and this one has none, or one that does not open.
    #[error("connecting an account needs a logged-in user")]
    NotLoggedIn,
    /// The integration has no authorization endpoint or no redirect URI, so
    /// accounts cannot be connected through it.
    #[error("{integration} has no authorization endpoint or redirect URI")]
    NotConnectable {
        /// The integration's name.
        integration: String,
    },
    /// A connection's callback is unusable: no or unknown `state` (forged,
    /// from another browser, or already used), an expired one, a record
    /// that does not open, another issuer's `iss`, no `code`, a parameter
    /// given twice. Nothing was stored.
    #[error("invalid connection callback: {detail}")]
    InvalidCallback {
        /// What was wrong (escaped, bounded).
        detail: String,
    },
    /// The provider answered the authorization request with an error (the
    /// user declined, the client is not allowed that scope). The pending
    /// connection is consumed; nothing was stored.
    #[error("{integration} answered the connection with {error}")]
    ConsentRefused {
        /// The integration's name.
        integration: String,
        /// The provider's `error` and `error_description` (escaped, bounded).
        error: String,
    },
    /// The session could not be read or written.
    #[error("the session is unavailable")]
    Session(#[source] SessionError),
    /// The database failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The task that refreshed the token ended without an answer (it
    /// panicked, or the runtime is shutting down). Nothing was written.
    #[error("the token refresh was interrupted")]
    Interrupted,
}

impl From<sqlx::Error> for VaultError {
    fn from(e: sqlx::Error) -> Self {
        Self::Store(StoreError::Database(e))
    }
}

impl VaultError {
    /// A short, stable label for metrics and logs.
    pub(crate) fn reason(&self) -> &'static str {
        match self {
            Self::UnknownIntegration(_) => "unknown_integration",
            Self::InvalidInput { .. } => "invalid_input",
            Self::NotConnected { .. } => "not_connected",
            Self::NeedsReconsent { .. } => "needs_reconsent",
            Self::ProviderUnavailable { .. } => "provider_unavailable",
            Self::TokenRequestRejected { .. } => "rejected",
            Self::InvalidTokenResponse { .. } => "invalid_response",
            Self::TokenTooLarge { .. } => "too_large",
            Self::Unreadable { .. } => "unreadable",
            Self::NotLoggedIn => "not_logged_in",
            Self::NotConnectable { .. } => "not_connectable",
            Self::InvalidCallback { .. } => "invalid_callback",
            Self::ConsentRefused { .. } => "consent_refused",
            Self::Session(_) => "session",
            Self::Store(_) => "store",
            Self::Interrupted => "interrupted",
        }
    }

    /// The HTTP status an answer to this error carries: 400 for bad input
    /// and callbacks, 401 without a login, 403 when the provider refused
    /// consent, 404 for an integration that is unknown or not connected,
    /// 409 when the user must connect again, 413 for a token over the
    /// limit, 502 for a provider that failed, 500 for configuration and
    /// unreadable data, 503 when the database or the session store failed.
    #[must_use]
    pub fn status(&self) -> StatusCode {
        match self {
            Self::InvalidInput { .. } | Self::InvalidCallback { .. } => StatusCode::BAD_REQUEST,
            Self::NotLoggedIn => StatusCode::UNAUTHORIZED,
            Self::ConsentRefused { .. } => StatusCode::FORBIDDEN,
            Self::UnknownIntegration(_) | Self::NotConnected { .. } => StatusCode::NOT_FOUND,
            Self::NeedsReconsent { .. } => StatusCode::CONFLICT,
            Self::TokenTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            Self::ProviderUnavailable { .. }
            | Self::TokenRequestRejected { .. }
            | Self::InvalidTokenResponse { .. } => StatusCode::BAD_GATEWAY,
            Self::NotConnectable { .. } | Self::Unreadable { .. } => {
                StatusCode::INTERNAL_SERVER_ERROR
            }
            Self::Store(_) | Self::Session(_) | Self::Interrupted => {
                StatusCode::SERVICE_UNAVAILABLE
            }
        }
    }

    /// A short, stable code for a JSON answer (`{"error": …}`).
    #[must_use]
    pub fn code(&self) -> &'static str {
        self.reason()
    }

    /// The answer to a request that failed with this error:
    /// [`status`](Self::status) and JSON `{"error", "error_description"}`
    /// (never token material).
    pub fn to_response<B: From<String>>(&self) -> http::Response<B> {
        let body = serde_json::json!({
            "error": self.code(),
            "error_description": self.to_string(),
        });
        let mut r = http::Response::new(B::from(body.to_string()));
        *r.status_mut() = self.status();
        let headers = r.headers_mut();
        headers.insert(
            http::header::CONTENT_TYPE,
            http::HeaderValue::from_static("application/json"),
        );
        headers.insert(
            http::header::CACHE_CONTROL,
            http::HeaderValue::from_static("no-store"),
        );
        r
    }
}

#[cfg(feature = "axum")]
impl axum_core::response::IntoResponse for VaultError {
    fn into_response(self) -> axum_core::response::Response {
        self.to_response()
    }
}
