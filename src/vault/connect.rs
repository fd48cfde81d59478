//! Connecting an account from a logged-in session: the authorization
//! request (RFC 6749 §4.1 with PKCE, RFC 7636) and its callback (RFC 9207
//! `iss`), on the login guard's pending-request machinery
//! ([`crate::oidc::pending`]): a sealed record per request under a reserved
//! session key, taken once, compared in constant time, with an expiry and a
//! cap per browser.

use std::net::IpAddr;

use http::{header, HeaderMap, HeaderName};
use time::OffsetDateTime;
use tracing::Instrument;

use super::{sql::Audit, TokenVault, VaultError};
use crate::{
    log_safe::untrusted,
    metrics,
    oidc::{
        pending::{self, Bound, Limits, PendingError},
        record::{self, safe_return_to, Stored},
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

/// Where the connect audit ([`VaultConfig::with_connect_audit`](super::VaultConfig::with_connect_audit))
/// takes the client's IP address from.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ClientIp {
    /// The socket's peer: the client itself when nothing stands between.
    Peer,
    /// The last address of `X-Forwarded-For`: the one a single trusted
    /// reverse proxy appended (the earlier ones are the client's to choose).
    LastForwardedFor,
    /// The value of a header a trusted proxy sets to the client's address
    /// alone (`X-Real-IP`, `Fly-Client-IP`, …).
    Header(HeaderName),
}

/// Longest `User-Agent` kept, in bytes.
const MAX_USER_AGENT: usize = 512;

impl ClientIp {
    /// The client's address from this source, if it names one.
    fn pick(&self, headers: &HeaderMap, peer: Option<IpAddr>) -> Option<IpAddr> {
        let text = |name: &HeaderName| headers.get(name).and_then(|v| v.to_str().ok());
        match self {
            Self::Peer => peer,
            Self::LastForwardedFor => text(&HeaderName::from_static("x-forwarded-for"))?
                .rsplit(',')
                .next()?
                .trim()
                .parse()
                .ok(),
            Self::Header(name) => text(name)?.trim().parse().ok(),
        }
    }
}

/// What the audit records about the client of a request.
fn audit_of(source: &ClientIp, headers: &HeaderMap, peer: Option<IpAddr>) -> Audit {
    let user_agent = headers
        .get(header::USER_AGENT)
        .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
        .map(|ua| {
            let mut end = ua.len().min(MAX_USER_AGENT);
            while !ua.is_char_boundary(end) {
                end -= 1;
            }
            ua[..end].to_owned()
        });
    Audit {
        ip: source.pick(headers, peer).map(|ip| ip.to_string()),
        user_agent,
    }
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
        self.connect_callback_audited(session, query, &HeaderMap::new(), None)
            .await
    }

    /// [`connect_callback`](Self::connect_callback) that also records the
    /// client (IP address and `User-Agent`) from the request's `headers` and
    /// the socket's `peer` address, when the audit is on
    /// ([`VaultConfig::with_connect_audit`](super::VaultConfig::with_connect_audit)).
    ///
    /// # Errors
    /// As [`connect_callback`](Self::connect_callback).
    pub async fn connect_callback_audited(
        &self,
        session: &Session,
        query: Option<&str>,
        headers: &HeaderMap,
        peer: Option<IpAddr>,
    ) -> Result<(Redirect, Connected), VaultError> {
        let audit = self
            .inner
            .connect_audit
            .as_ref()
            .map(|source| audit_of(source, headers, peer));
        let result = self
            .complete_connect(session, query, audit.as_ref())
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
        audit: Option<&Audit>,
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
        self.store_with(&user, &name, tokens, audit).await?;
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
        match record::load_login(&self.inner.login_keys, session)
            .await
            .map_err(VaultError::Session)?
        {
            Stored::Opened { record, .. } => Ok(record.sub),
            _ => Err(VaultError::NotLoggedIn),
        }
    }
}

/// Pending connections kept per browser; the oldest goes first past it.
const MAX_PENDING: usize = 5;

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                HeaderName::from_bytes(k.as_bytes()).expect("name"),
                http::HeaderValue::from_bytes(v.as_bytes()).expect("value"),
            );
        }
        h
    }

    #[test]
    fn the_client_ip_comes_from_the_configured_source_only() {
        let peer: Option<IpAddr> = "10.0.0.1".parse().ok();
        let h = headers(&[
            ("x-forwarded-for", "6.6.6.6, 203.0.113.7"),
            ("x-real-ip", " 2001:db8::1 "),
        ]);
        let ip = |source: ClientIp, h: &HeaderMap| source.pick(h, peer).map(|i| i.to_string());
        assert_eq!(ip(ClientIp::Peer, &h).as_deref(), Some("10.0.0.1"));
        assert_eq!(
            ip(ClientIp::LastForwardedFor, &h).as_deref(),
            Some("203.0.113.7")
        );
        let real = ClientIp::Header(HeaderName::from_static("x-real-ip"));
        assert_eq!(ip(real.clone(), &h).as_deref(), Some("2001:db8::1"));
        // Garbage or nothing: no address rather than a wrong one.
        let bad = headers(&[("x-forwarded-for", "1.2.3.4, evil"), ("x-real-ip", "x")]);
        assert_eq!(ip(ClientIp::LastForwardedFor, &bad), None);
        assert_eq!(ip(real, &bad), None);
        assert_eq!(ip(ClientIp::LastForwardedFor, &HeaderMap::new()), None);
    }

    #[test]
    fn the_user_agent_is_bounded() {
        let long = "é".repeat(400);
        let audit = audit_of(&ClientIp::Peer, &headers(&[("user-agent", &long)]), None);
        let ua = audit.user_agent.expect("kept");
        assert!(ua.len() <= MAX_USER_AGENT && ua.starts_with('é'));
        assert_eq!(audit.ip, None);
    }
}
