//! The values going in and out of the vault: [`Tokens`] to store,
//! [`AccessToken`] from `get`, [`Connection`] from `list`.

use std::fmt;

use time::OffsetDateTime;
use zeroize::Zeroizing;

/// Tokens to keep for a user and integration, as a token response gave
/// them. `Debug` shows no token.
///
/// ```
/// use tower_pg_session::vault::Tokens;
///
/// let tokens = Tokens::new("ya29.access".to_owned())
///     .with_refresh_token("1//refresh".to_owned())
///     .with_expires_in(std::time::Duration::from_secs(3600))
///     .with_scopes(["https://mail.google.com/"]);
/// assert!(!format!("{tokens:?}").contains("ya29"));
/// ```
#[derive(Clone)]
pub struct Tokens {
    pub(crate) access_token: Zeroizing<String>,
    pub(crate) refresh_token: Option<Zeroizing<String>>,
    pub(crate) expires_at: Option<OffsetDateTime>,
    pub(crate) scopes: Vec<String>,
    pub(crate) token_type: String,
}

impl fmt::Debug for Tokens {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tokens")
            .field("access_token", &"[redacted]")
            .field(
                "refresh_token",
                &self.refresh_token.as_ref().map(|_| "[redacted]"),
            )
            .field("expires_at", &self.expires_at)
            .field("scopes", &self.scopes)
            .field("token_type", &self.token_type)
            .finish()
    }
}

impl Tokens {
    /// An access token of type `Bearer` that never expires, without a
    /// refresh token or scopes.
    #[must_use]
    pub fn new(access_token: String) -> Self {
        Self {
            access_token: Zeroizing::new(access_token),
            refresh_token: None,
            expires_at: None,
            scopes: Vec::new(),
            token_type: "Bearer".to_owned(),
        }
    }

    /// The refresh token.
    #[must_use]
    pub fn with_refresh_token(mut self, refresh_token: String) -> Self {
        self.refresh_token = Some(Zeroizing::new(refresh_token));
        self
    }

    /// When the access token expires.
    #[must_use]
    pub fn with_expires_at(mut self, at: OffsetDateTime) -> Self {
        self.expires_at = Some(at);
        self
    }

    /// When the access token expires, from now (a token response's
    /// `expires_in`); an absurd lifetime saturates.
    #[must_use]
    pub fn with_expires_in(self, lifetime: std::time::Duration) -> Self {
        let now = OffsetDateTime::now_utc();
        let at = time::Duration::try_from(lifetime)
            .ok()
            .and_then(|d| now.checked_add(d))
            .unwrap_or(now + time::Duration::days(36_500));
        self.with_expires_at(at)
    }

    /// The granted scopes.
    #[must_use]
    pub fn with_scopes<S: AsRef<str>>(mut self, scopes: impl IntoIterator<Item = S>) -> Self {
        self.scopes = scopes.into_iter().map(|s| s.as_ref().to_owned()).collect();
        self
    }

    /// The token type (default `Bearer`).
    #[must_use]
    pub fn with_token_type(mut self, token_type: &str) -> Self {
        token_type.clone_into(&mut self.token_type);
        self
    }

    /// When the access token expires, if known.
    #[must_use]
    pub fn expires_at(&self) -> Option<OffsetDateTime> {
        self.expires_at
    }

    /// The refresh token, if any.
    pub fn refresh_token(&self) -> Option<&str> {
        self.refresh_token.as_deref().map(String::as_str)
    }
}

/// A valid access token from [`TokenVault::get`](super::TokenVault::get).
/// `Debug` shows no token; the memory is wiped on drop.
pub struct AccessToken {
    pub(crate) secret: Zeroizing<String>,
    pub(crate) expires_at: Option<OffsetDateTime>,
    pub(crate) token_type: String,
    pub(crate) scopes: Vec<String>,
}

impl fmt::Debug for AccessToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AccessToken")
            .field("secret", &"[redacted]")
            .field("expires_at", &self.expires_at)
            .field("token_type", &self.token_type)
            .field("scopes", &self.scopes)
            .finish()
    }
}

impl AccessToken {
    /// The token itself, for an `Authorization` header.
    #[must_use]
    pub fn secret(&self) -> &str {
        &self.secret
    }

    /// When it expires, if known.
    #[must_use]
    pub fn expires_at(&self) -> Option<OffsetDateTime> {
        self.expires_at
    }

    /// Its type, usually `Bearer`.
    #[must_use]
    pub fn token_type(&self) -> &str {
        &self.token_type
    }

    /// The scopes granted with it.
    #[must_use]
    pub fn scopes(&self) -> &[String] {
        &self.scopes
    }
}

/// What [`TokenVault::list`](super::TokenVault::list) tells about one
/// connected integration: metadata only, never a token.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[non_exhaustive]
pub struct Connection {
    /// The integration's name.
    pub integration: String,
    /// When the access token expires, if known.
    #[serde(with = "time::serde::timestamp::option")]
    pub expires_at: Option<OffsetDateTime>,
    /// The granted scopes.
    pub scopes: Vec<String>,
    /// The token type.
    pub token_type: String,
    /// Whether a refresh token is kept.
    pub refreshable: bool,
    /// Whether the user must connect the integration again.
    pub needs_reconsent: bool,
    /// When the user first connected it.
    #[serde(with = "time::serde::timestamp")]
    pub created_at: OffsetDateTime,
    /// When its row was last written.
    #[serde(with = "time::serde::timestamp")]
    pub updated_at: OffsetDateTime,
    /// When `get` last returned its token (updated at most once a minute).
    #[serde(with = "time::serde::timestamp::option")]
    pub last_used_at: Option<OffsetDateTime>,
    /// When it was last refreshed at the provider.
    #[serde(with = "time::serde::timestamp::option")]
    pub last_refreshed_at: Option<OffsetDateTime>,
}
