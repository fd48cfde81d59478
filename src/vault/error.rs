//! [`VaultError`]: everything the vault can report.

use crate::store::StoreError;

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
            Self::Store(_) => "store",
            Self::Interrupted => "interrupted",
        }
    }
}
