//! Connecting an account from a logged-in session: the authorization
//! request (RFC 6749 §4.1 with PKCE, RFC 7636) and its callback (RFC 9207
//! `iss`), on the login guard's pending-request machinery
//! ([`crate::oidc::pending`]): a sealed record per request under a reserved
//! session key, taken once, compared in constant time, with an expiry and a
//! cap per browser.

use serde_json::value::RawValue;
use time::OffsetDateTime;
use tracing::Instrument;

use super::{TokenVault, VaultError};
use crate::{
    log_safe::untrusted,
    metrics,
    oidc::{
        pending::{self, Bound, Limits, PendingError},
        record::{self, safe_return_to, Stored, USER_KEY},
        Redirect,
    },
    session::Session,
};

/// An account just connected by [`TokenVault::connect_callback`]: what was
/// stored, never a token.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Connected {
    /// The user it belongs to (the login's subject).
    pub user: String,
    /// The integration's name.
    pub integration: String,
    /// When the access token expires, when the provider said.
    pub expires_at: Option<OffsetDateTime>,
    /// The scopes the provider granted, when it said.
    pub scopes: Vec<String>,
    /// Whether the provider issued a refresh token (without one, the
    /// connection lasts as long as the access token).
    pub refreshable: bool,
}

/// Longest `error` plus `error_description` of a provider kept in an error.
const MAX_PROVIDER_ERROR: usize = 300;

fn pending_error(e: PendingError) -> VaultError {
    let invalid = |detail: &str| VaultError::InvalidCallback {
        detail: detail.to_owned(),
    };
    match e {
        PendingError::Session(e) => VaultError::Session(e),
        PendingError::Unsealable(_) => invalid("the connection could not be recorded"),
        PendingError::Tampered => {
            invalid("the stored connection does not open (edited, moved, or its key retired)")
        }
        PendingError::Unknown => invalid("unknown or already used state"),
        PendingError::Expired => invalid("the connection took too long"),
    }
}

impl TokenVault {
    /// Starts connecting `integration` for the user logged in on `session`:
    /// records a pending connection (state, PKCE verifier, the user, the
    /// integration, `return_to` if it is a local path) and answers with the
    /// redirect to the provider's authorization endpoint. Several may be
    /// pending per browser, each for
    /// [`with_connect_ttl`](super::VaultConfig::with_connect_ttl); past 5 the
    /// oldest is dropped.
    ///
    /// ```no_run
    /// # use tower_pg_session::{vault::TokenVault, Session};
    /// # async fn handler(vault: TokenVault, session: Session) -> Result<(), Box<dyn std::error::Error>> {
    /// let redirect = vault.connect(&session, "mail", Some("/settings")).await?;
    /// // Answer with `redirect.to_response()`; the provider comes back to the
    /// // integration's redirect URI, whose handler calls `connect_callback`.
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    /// [`VaultError::UnknownIntegration`], [`VaultError::NotConnectable`]
    /// without an authorization endpoint or redirect URI,
    /// [`VaultError::NotLoggedIn`], [`VaultError::Session`].
    pub async fn connect(
        &self,
        session: &Session,
        integration: &str,
        return_to: Option<&str>,
    ) -> Result<Redirect, VaultError> {
        let integration = self.integration(integration)?;
        // Refused before anything is written to the session.
        integration.check_connectable()?;
        let user = self.logged_in_user(session).await?;
        let bound = Bound {
            user,
            integration: integration.name().to_owned(),
            ..Bound::default()
        };
        let limits = Limits {
            ttl: self.inner.connect_ttl,
            max_pending: MAX_PENDING,
        };
        let started = pending::CONNECT
            .start(session, &self.inner.keyring, limits, bound, return_to)
            .await
            .map_err(pending_error)?;
        let url = integration.connect_url(started.state.secret(), started.challenge.as_str())?;
        Ok(Redirect::found(url.as_str()))
    }

    /// Completes a connection from the callback's query string: the pending
    /// connection named by `state` is consumed before anything else (so a
    /// callback succeeds once), then the user (still the one who started
    /// it), the issuer (RFC 9207 `iss`, when given) and the code exchange
    /// with the PKCE verifier are checked, and the tokens stored. The
    /// redirect goes to the `return_to` of [`connect`](Self::connect), checked
    /// again, else `/`.
    ///
    /// # Errors
    /// [`VaultError::InvalidCallback`] for a forged, replayed, expired or
    /// malformed callback, [`VaultError::ConsentRefused`] when the provider
    /// answered with `error=`, [`VaultError::NotLoggedIn`], and the errors
    /// of the code exchange ([`VaultError::TokenRequestRejected`],
    /// [`VaultError::InvalidTokenResponse`], [`VaultError::ProviderUnavailable`])
    /// and of [`store`](Self::store). Failures are logged escaped.
    pub async fn connect_callback(
        &self,
        session: &Session,
        query: Option<&str>,
    ) -> Result<(Redirect, Connected), VaultError> {
        let result = self
            .complete_connect(session, query)
            .instrument(tracing::info_span!("vault_connect_callback"))
            .await;
        if let Err(e) = &result {
            // What a provider or a client chose is escaped in the error itself.
            tracing::warn!(error = %e, "connecting an account failed");
        }
        result
    }

    async fn complete_connect(
        &self,
        session: &Session,
        query: Option<&str>,
    ) -> Result<(Redirect, Connected), VaultError> {
        let params =
            pending::callback_params(query).map_err(|detail| VaultError::InvalidCallback {
                detail: untrusted(detail).to_string(),
            })?;
        let get = |k: &str| params.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
        let invalid = |detail: &str| VaultError::InvalidCallback {
            detail: detail.to_owned(),
        };
        let state = get("state").ok_or_else(|| invalid("no state"))?;
        if let Some(error) = get("error") {
            return Err(self
                .refused(session, state, error, get("error_description"))
                .await);
        }
        let pending = pending::CONNECT
            .take(session, &self.inner.keyring, state)
            .await
            .map_err(pending_error)?;
        let user = self.logged_in_user(session).await?;
        if !crate::oidc::constant_eq(&pending.user, &user) {
            return Err(invalid("the connection was started by another user"));
        }
        let integration = self.integration(&pending.integration)?;
        if !integration.accepts_issuer(get("iss")) {
            return Err(VaultError::InvalidCallback {
                detail: format!(
                    "iss {} is not the integration's issuer",
                    untrusted(format!("{:?}", get("iss").unwrap_or_default()))
                ),
            });
        }
        let code = get("code").ok_or_else(|| invalid("no code"))?;
        let tokens = integration
            .exchange(
                &self.inner.http,
                code,
                &pending.pkce,
                self.inner.max_token_bytes,
            )
            .instrument(tracing::info_span!(
                "vault_exchange",
                integration = integration.name()
            ))
            .await
            .inspect_err(|e| metrics::vault_failure(integration.name(), e.reason()))?;
        let name = integration.name().to_owned();
        let connected = Connected {
            user: user.clone(),
            integration: name.clone(),
            expires_at: tokens.expires_at,
            scopes: tokens.scopes.clone(),
            refreshable: tokens.refresh_token.is_some(),
        };
        self.store(&user, &name, tokens).await?;
        tracing::info!(integration = %name, user = %untrusted(&user), "account connected");
        let back = safe_return_to(Some(&pending.return_to));
        Ok((Redirect::found(&back), connected))
    }

    /// The provider's `error=` answer: consumes the pending connection (so
    /// the state cannot be used afterwards) and names it.
    async fn refused(
        &self,
        session: &Session,
        state: &str,
        error: &str,
        description: Option<&str>,
    ) -> VaultError {
        let integration = match pending::CONNECT
            .take(session, &self.inner.keyring, state)
            .await
        {
            Ok(p) => p.integration,
            Err(_) => String::new(),
        };
        let text = match description {
            Some(d) => format!("{error}: {d}"),
            None => error.to_owned(),
        };
        let text: String = text.chars().take(MAX_PROVIDER_ERROR).collect();
        if !integration.is_empty() {
            metrics::vault_failure(&integration, "consent_refused");
        }
        VaultError::ConsentRefused {
            integration,
            error: untrusted(text).to_string(),
        }
    }

    /// The subject of the login record on `session`, when it opens.
    async fn logged_in_user(&self, session: &Session) -> Result<String, VaultError> {
        let raw: Option<Box<RawValue>> =
            session.get(USER_KEY).await.map_err(VaultError::Session)?;
        if raw.is_none() {
            return Err(VaultError::NotLoggedIn);
        }
        let binding = session.binding_key().await.map_err(VaultError::Session)?;
        match record::open_login(&self.inner.login_keys, &binding, raw.as_deref()) {
            Stored::Opened { record, .. } => Ok(record.sub),
            _ => Err(VaultError::NotLoggedIn),
        }
    }
}

/// Pending connections kept per browser; the oldest goes first past it.
const MAX_PENDING: usize = 5;
