//! The handlers' side: login, callback, logout and back-channel logout.

use http::{header, HeaderMap, StatusCode};
use openidconnect::{
    core::CoreResponseType, url::Url, AuthenticationFlow, CsrfToken, Nonce, Scope,
};
use serde_json::Value;
use tracing::Instrument;

use super::{
    client::{Discovered, LogoutStyle, OidcClient, Tokens},
    dpop::DpopKey,
    pending::{self, Bound, Limits, PendingError, Started},
    record::{self, groups_of, safe_return_to, LoginRecord, PendingLogin, StoreLoginError, Stored},
    step_up::LoginOptions,
    AuthError, AuthErrorKind, Redirect, User,
};
use crate::{
    log_safe::untrusted,
    session::{Session, SessionError},
};

fn session_error(e: SessionError) -> AuthError {
    match e {
        SessionError::Store(e) => AuthError::new(AuthErrorKind::SessionUnavailable, e.to_string()),
        other => AuthError::new(AuthErrorKind::SessionUnavailable, other.to_string()),
    }
}

/// A record that does not serialize (it always does: strings and JSON).
fn unsealable(e: serde_json::Error) -> AuthError {
    AuthError::new(
        AuthErrorKind::SessionUnavailable,
        format!("the login could not be stored: {e}"),
    )
}

fn pending_error(e: PendingError) -> AuthError {
    match e {
        PendingError::Session(e) => session_error(e),
        PendingError::Unsealable(e) => unsealable(e),
        PendingError::Tampered => AuthError::new(
            AuthErrorKind::TamperedData,
            "the stored login does not open (edited, moved, from an older version, or its key retired)",
        ),
        PendingError::Unknown => {
            AuthError::new(AuthErrorKind::UnknownState, "unknown or already used state")
        }
        PendingError::Expired => {
            AuthError::new(AuthErrorKind::ExpiredState, "the login took too long")
        }
    }
}

/// The parameters of a callback, each at most once.
fn params(query: Option<&str>) -> Result<Vec<(String, String)>, AuthError> {
    pending::callback_params(query)
        .map_err(|detail| AuthError::new(AuthErrorKind::MalformedCallback, detail))
}

impl OidcClient {
    /// Starts a login: records a pending login (state, nonce, PKCE verifier)
    /// in the session, and answers with the redirect to the provider. Several
    /// logins may be pending at once (one per tab), each for
    /// [`with_login_ttl`](super::OidcConfig::with_login_ttl); beyond
    /// [`with_max_pending_logins`](super::OidcConfig::with_max_pending_logins)
    /// the oldest is dropped. `return_to` is kept only if it is a local path.
    ///
    /// # Errors
    /// [`AuthErrorKind::SessionUnavailable`] when the session cannot be read.
    /// [`AuthErrorKind::LoginUnavailable`] (503) while the provider is not
    /// discovered.
    pub async fn login(
        &self,
        session: &Session,
        return_to: Option<&str>,
    ) -> Result<Redirect, AuthError> {
        let mut options = LoginOptions::new();
        options.return_to = return_to.map(str::to_owned);
        self.login_with(session, &options).await
    }

    /// [`Self::login`] asking the provider for more than the configured
    /// defaults: an authentication context class (`acr_values`, with the
    /// `acr` claim requested as essential) or a recent authentication
    /// (`max_age`), which the callback then checks in the ID token.
    ///
    /// # Errors
    /// As [`Self::login`].
    pub async fn login_with(
        &self,
        session: &Session,
        options: &LoginOptions,
    ) -> Result<Redirect, AuthError> {
        self.discovered().await?.login(session, options).await
    }

    /// Completes a login from the callback's query string. The pending login
    /// named by `state` is consumed before anything else (so a callback can
    /// succeed once), then the issuer, the code exchange and the ID token are
    /// checked. On success the session id is cycled and the user stored; the
    /// redirect goes to the page the login started from.
    ///
    /// # Errors
    /// An [`AuthError`] whose kind says what was wrong; none leaves a
    /// half-logged-in session.
    pub async fn callback(
        &self,
        session: &Session,
        query: Option<&str>,
    ) -> Result<(Redirect, User), AuthError> {
        let result = async {
            self.discovered()
                .await?
                .complete_login(session, query)
                .await
        }
        .instrument(tracing::info_span!("oidc.callback"))
        .await;
        if let Err(e) = &result {
            tracing::warn!(error = %untrusted(e), "login failed");
            crate::metrics::failure(format!("login_{}", e.kind().code()));
        }
        result
    }

    /// Ends the session: checks that the request comes from the app's own
    /// origin (`Origin`, else `Referer`), destroys the session, revokes the
    /// refresh token where the provider allows, and redirects to the
    /// provider's logout (RP-initiated logout; Cognito's `/logout`), or to the
    /// post-logout page when the provider has none.
    ///
    /// Before the provider is discovered (a [lazy](Self::lazy) client), the
    /// session still ends, and the browser goes to the post-logout page.
    ///
    /// # Errors
    /// [`AuthErrorKind::CrossSiteRequest`] (403) for a request from elsewhere.
    pub async fn logout(
        &self,
        session: &Session,
        headers: &HeaderMap,
    ) -> Result<Redirect, AuthError> {
        let config = self.config();
        self.check_same_origin(headers)?;
        let record = end_session(config, session).await;
        let target = match self.discovered_now() {
            Some(discovered) => discovered.provider_logout(record.as_ref()).await,
            None => config.post_logout_redirect.to_string(),
        };
        if let Some(r) = &record {
            tracing::info!(sub = %untrusted(&r.sub), "logout");
        }
        crate::metrics::logout("local");
        Ok(Redirect::see_other(&target))
    }

    /// Handles a back-channel logout request (its form-encoded body): verifies
    /// the `logout_token` and deletes every session it names, by the
    /// provider's session id (`sid`) or else by subject. Answers 200, or 400
    /// with the spec's error body; never a redirect.
    pub async fn backchannel_logout(&self, body: &[u8]) -> http::Response<String> {
        let token = openidconnect::url::form_urlencoded::parse(body)
            .find(|(k, _)| k == "logout_token")
            .map(|(_, v)| v.into_owned());
        let result = match token {
            None => Err(AuthError::new(
                AuthErrorKind::InvalidLogoutToken,
                "no logout_token",
            )),
            Some(token) => match self.discovered().await {
                Ok(discovered) => discovered.apply_logout_token(&token).await,
                Err(e) => Err(e),
            },
        };
        backchannel_response(result)
    }
}

impl OidcClient {
    /// Checks that a state-changing request comes from the application's own
    /// pages: its `Origin`, else its `Referer`, is the application's origin
    /// (as [`logout`](Self::logout) does; for other such routes too).
    ///
    /// # Errors
    /// [`AuthErrorKind::CrossSiteRequest`] (403) for a request from elsewhere.
    pub fn check_same_origin(&self, headers: &HeaderMap) -> Result<(), AuthError> {
        check_same_origin(&self.config().app_origin(), headers)
    }
}

/// Refuses a request that comes from another site: `Origin`, else `Referer`,
/// must be the application's.
fn check_same_origin(origin: &str, headers: &HeaderMap) -> Result<(), AuthError> {
    let same_origin = match headers.get(header::ORIGIN).map(|v| v.to_str()) {
        Some(Ok(o)) => o == origin,
        Some(Err(_)) => false,
        None => headers
            .get(header::REFERER)
            .and_then(|v| v.to_str().ok())
            .and_then(|r| Url::parse(r).ok())
            .is_some_and(|r| r.origin().ascii_serialization() == origin),
    };
    if same_origin {
        Ok(())
    } else {
        Err(AuthError::new(
            AuthErrorKind::CrossSiteRequest,
            "logout must come from the application's own pages",
        ))
    }
}

/// Destroys the session; returns its login record when one opens (only such
/// a record names tokens to revoke or hint with).
async fn end_session(config: &super::OidcConfig, session: &Session) -> Option<LoginRecord> {
    let stored = record::load_login(&config.keys, session).await;
    session.destroy().await;
    match stored {
        Ok(Stored::Opened { record, .. }) => Some(record),
        _ => None,
    }
}

/// The answer to a back-channel logout: 200, 400 with the spec's error body,
/// or 503 when the store or the provider's keys are out of reach.
fn backchannel_response(result: Result<u64, AuthError>) -> http::Response<String> {
    let (status, body) = match result {
        Ok(n) => {
            tracing::info!(sessions = n, "back-channel logout");
            crate::metrics::logout("backchannel");
            (StatusCode::OK, String::new())
        }
        Err(e) => {
            tracing::warn!(error = %untrusted(&e), "back-channel logout refused");
            crate::metrics::failure("backchannel_rejected");
            let code = match e.kind() {
                AuthErrorKind::SessionUnavailable | AuthErrorKind::LoginUnavailable => {
                    StatusCode::SERVICE_UNAVAILABLE
                }
                _ => StatusCode::BAD_REQUEST,
            };
            (
                code,
                serde_json::json!({"error": "invalid_request", "error_description": e.detail()})
                    .to_string(),
            )
        }
    };
    let mut response = http::Response::new(body);
    *response.status_mut() = status;
    let h = response.headers_mut();
    h.insert(
        header::CACHE_CONTROL,
        http::HeaderValue::from_static("no-store"),
    );
    if status != StatusCode::OK {
        h.insert(
            header::CONTENT_TYPE,
            http::HeaderValue::from_static("application/json"),
        );
    }
    response
}

impl Discovered {
    /// See [`OidcClient::login`].
    pub(crate) async fn login(
        &self,
        session: &Session,
        options: &LoginOptions,
    ) -> Result<Redirect, AuthError> {
        let config = &self.inner.config;
        let step_up = options.step_up.clone().or(&config.step_up);
        let mut params = step_up.authorization_params(self.inner.claims_parameter);
        let dpop = config.dpop.then(DpopKey::generate);
        if let Some(key) = &dpop {
            // The code is bound to the key too (RFC 9449 §10).
            params.push(("dpop_jkt", key.thumbprint()));
        }
        let nonce = Nonce::new_random();
        let limits = Limits {
            ttl: config.login_ttl,
            max_pending: config.max_pending_logins,
        };
        let Started { state, challenge } = pending::LOGIN
            .start(
                session,
                &config.keys,
                limits,
                Bound {
                    nonce: nonce.secret().clone(),
                    iss: self.inner.issuer.clone(),
                    dpop: dpop.map(|k| k.to_secret().to_string()),
                    step_up,
                    ..Bound::default()
                },
                options.return_to.as_deref(),
            )
            .await
            .map_err(pending_error)?;
        let (state_c, nonce_c) = (state.clone(), nonce.clone());
        let mut request = self
            .inner
            .client
            .authorize_url(
                AuthenticationFlow::<CoreResponseType>::AuthorizationCode,
                move || state_c,
                move || nonce_c,
            )
            .set_pkce_challenge(challenge);
        for scope in config.scopes.iter().filter(|s| *s != "openid") {
            request = request.add_scope(Scope::new(scope.clone()));
        }
        for (name, value) in params {
            request = request.add_extra_param(name, value);
        }
        let (url, _, _) = request.url();
        let url = self.pushed(url).await?;
        Ok(Redirect::found(url.as_str()))
    }

    pub(crate) async fn complete_login(
        &self,
        session: &Session,
        query: Option<&str>,
    ) -> Result<(Redirect, User), AuthError> {
        let params = params(query)?;
        let get = |k: &str| params.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
        if let Some(error) = get("error") {
            if let Some(state) = get("state") {
                pending::LOGIN.discard(session, state).await;
            }
            let description = get("error_description").unwrap_or("");
            return Err(AuthError::new(
                AuthErrorKind::ProviderError,
                format!("the provider answered {error}: {description}"),
            ));
        }
        let state =
            get("state").ok_or_else(|| AuthError::new(AuthErrorKind::MissingState, "no state"))?;
        let mut pending = pending::LOGIN
            .take(session, &self.inner.config.keys, state)
            .await
            .map_err(pending_error)?;
        self.check_issuer(&pending, get("iss"))?;
        let code = get("code")
            .ok_or_else(|| AuthError::new(AuthErrorKind::MalformedCallback, "no code"))?;
        let pkce = std::mem::take(&mut pending.pkce);
        let dpop = pending.dpop.as_deref().and_then(DpopKey::from_secret);
        if pending.dpop.is_some() && dpop.is_none() {
            return Err(AuthError::new(
                AuthErrorKind::TamperedData,
                "the login's DPoP key does not parse",
            ));
        }
        let tokens = self
            .exchange(code.to_owned(), pkce, &pending.nonce, dpop.as_ref())
            .await?;
        self.log_in(session, pending, tokens).await
    }

    /// The callback's issuer: the one the login was started with (several
    /// providers: its code is not for another, the mix-up defence), and
    /// RFC 9207's `iss` when the provider sends it.
    fn check_issuer(&self, pending: &PendingLogin, iss: Option<&str>) -> Result<(), AuthError> {
        let mismatch = |why: String| Err(AuthError::new(AuthErrorKind::IssuerMismatch, why));
        if !pending.iss.is_empty() && pending.iss != self.inner.issuer {
            return mismatch("the login was started with another provider".to_owned());
        }
        match iss {
            Some(iss) if iss != self.inner.issuer => {
                mismatch(format!("iss {iss:?} is not the configured issuer"))
            }
            None if self.inner.iss_param_required => {
                mismatch("the provider sends iss but the callback has none".to_owned())
            }
            _ => Ok(()),
        }
    }

    /// Checks what the login asked for, then stores the user under a new
    /// session id (an id known before login is worthless after it: session
    /// fixation) and sends the browser where the login started.
    async fn log_in(
        &self,
        session: &Session,
        pending: PendingLogin,
        tokens: Tokens,
    ) -> Result<(Redirect, User), AuthError> {
        let config = &self.inner.config;
        let claims = tokens.claims.unwrap_or_default();
        let now = time::OffsetDateTime::now_utc().unix_timestamp();
        pending
            .step_up()
            .check_id_token(&claims, now, config.clock_skew)?;
        let sub = claims
            .get("sub")
            .and_then(Value::as_str)
            .ok_or_else(|| AuthError::new(AuthErrorKind::InvalidIdToken, "no sub"))?
            .to_owned();
        // Stored in text columns, which cannot hold a NUL character.
        let sid = claims.get("sid").and_then(Value::as_str).map(str::to_owned);
        if sub.contains('\0') || sid.as_deref().is_some_and(|s| s.contains('\0')) {
            return Err(AuthError::new(
                AuthErrorKind::InvalidIdToken,
                "sub or sid holds a NUL character",
            ));
        }
        session.cycle_id().await.map_err(session_error)?;
        let record = LoginRecord {
            sub: sub.clone(),
            iss: self.inner.issuer.clone(),
            groups: groups_of(&claims),
            sid,
            claims,
            nonce: pending.nonce,
            at: tokens.access_token,
            rt: tokens.refresh_token,
            idt: tokens.id_token,
            exp: tokens.expires_at,
            dpop: pending.dpop,
        };
        record::store_login(&config.keys, session, &record)
            .await
            .map_err(|e| match e {
                StoreLoginError::Session(e) => session_error(e),
                StoreLoginError::Serialize(e) => unsealable(e),
            })?;
        if let Some(key) = &config.bridge_key {
            session
                .insert_reserved(key, &serde_json::json!({ "user": sub }))
                .await
                .map_err(session_error)?;
        }
        tracing::info!(sub = %untrusted(&sub), "login completed");
        crate::metrics::login();
        // Checked again: what was stored is trusted only as far as it is local.
        Ok((
            Redirect::found(&safe_return_to(Some(&pending.return_to))),
            User::from_record(&record),
        ))
    }

    /// Revokes the login's refresh token where the provider allows, and
    /// returns where the browser goes to end the provider's session.
    async fn provider_logout(&self, record: Option<&LoginRecord>) -> String {
        let config = &self.inner.config;
        let (id_token, refresh) = record.map_or((None, None), |r| (r.idt.as_ref(), r.rt.as_ref()));
        if let Some(rt) = refresh {
            self.revoke(rt).await;
        }
        let after = config.post_logout_redirect.as_str();
        match &self.inner.logout {
            LogoutStyle::EndSession(url) => {
                let mut url = url.clone();
                {
                    let mut q = url.query_pairs_mut();
                    if let Some(hint) = id_token {
                        q.append_pair("id_token_hint", hint);
                    }
                    q.append_pair("client_id", &config.client_id);
                    q.append_pair("post_logout_redirect_uri", after);
                    q.append_pair("state", CsrfToken::new_random().secret());
                }
                url.to_string()
            }
            LogoutStyle::Cognito(url) => {
                let mut url = url.clone();
                url.query_pairs_mut()
                    .append_pair("client_id", &config.client_id)
                    .append_pair("logout_uri", after);
                url.to_string()
            }
            LogoutStyle::None => after.to_owned(),
        }
    }

    async fn apply_logout_token(&self, token: &str) -> Result<u64, AuthError> {
        let claims = self.verify_logout_token(token).await?;
        let store = self.store();
        let unavailable =
            |e: crate::StoreError| AuthError::new(AuthErrorKind::SessionUnavailable, e.to_string());
        match (
            claims.get("sid").and_then(Value::as_str),
            claims.get("sub").and_then(Value::as_str),
        ) {
            (Some(sid), _) => store
                .delete_provider_sessions(sid)
                .await
                .map_err(unavailable),
            (None, Some(sub)) => store.delete_user_sessions(sub).await.map_err(unavailable),
            (None, None) => Ok(0),
        }
    }
}
