//! [`Integration`]: one OAuth 2.0 provider the vault refreshes tokens at,
//! and the refresh request itself (RFC 6749 §6).
//!
//! The request is written out here rather than through `openidconnect`'s
//! client: the vault must bound the response body before parsing it, tell
//! `invalid_grant` from every other failure, and accept the variations real
//! providers send (`expires_in` as a string, no `token_type`, no new
//! refresh token).

use std::{fmt, time::Duration};

use openidconnect::{reqwest, url::Url};
use serde::Deserialize;
use serde_json::Value;
use time::OffsetDateTime;

use super::{check_token, error::VaultError, Tokens};
use crate::{
    log_safe::untrusted,
    oidc::{error_chain, Authenticator, ClientKey},
};

/// A token response larger than this is refused unread.
const MAX_RESPONSE_BYTES: usize = 256 * 1024;

/// How the client authenticates at the token endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum ClientAuth {
    /// HTTP Basic with the form-encoded id and secret (`client_secret_basic`).
    #[default]
    Basic,
    /// `client_id` and `client_secret` in the form body (`client_secret_post`).
    Post,
    /// `client_secret_jwt`: a short-lived HS256 assertion keyed with the
    /// secret (RFC 7523), so the secret itself never travels.
    SecretJwt,
    /// `private_key_jwt`: an assertion signed with the first key of
    /// [`Integration::with_client_keys`].
    PrivateKeyJwt,
}

/// One provider tokens are kept for: its name in the vault, its token
/// endpoint and the client's credentials there.
///
/// `Debug` never shows the client secret.
///
/// ```
/// use tower_pg_session::vault::{ClientAuth, Integration};
///
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let mail = Integration::new("mail", "https://oauth2.googleapis.com/token", "my-client-id")?
///     .with_client_secret("my-client-secret")
///     .with_client_auth(ClientAuth::Post);
/// assert_eq!(mail.name(), "mail");
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct Integration {
    name: String,
    token_endpoint: Url,
    client_id: String,
    client_secret: Option<String>,
    client_keys: Vec<ClientKey>,
    auth: ClientAuth,
    revocation_endpoint: Option<Url>,
    /// What connecting an account needs (see [`Integration::connect_url`]).
    authorization_endpoint: Option<Url>,
    redirect_uri: Option<Url>,
    scopes: Vec<String>,
    authorization_params: Vec<(String, String)>,
    issuer: Option<String>,
}

impl fmt::Debug for Integration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Integration")
            .field("name", &self.name)
            .field("token_endpoint", &self.token_endpoint.as_str())
            .field("client_id", &self.client_id)
            .field(
                "client_secret",
                &self.client_secret.as_ref().map(|_| "[redacted]"),
            )
            .field("client_keys", &self.client_keys)
            .field("auth", &self.auth)
            .field(
                "revocation_endpoint",
                &self.revocation_endpoint.as_ref().map(Url::as_str),
            )
            .field(
                "authorization_endpoint",
                &self.authorization_endpoint.as_ref().map(Url::as_str),
            )
            .field("redirect_uri", &self.redirect_uri.as_ref().map(Url::as_str))
            .field("scopes", &self.scopes)
            .field("authorization_params", &self.authorization_params)
            .field("issuer", &self.issuer)
            .finish()
    }
}

impl Integration {
    /// An integration named `name` (1 to 64 characters of `[A-Za-z0-9._-]`)
    /// whose token endpoint is `token_endpoint` (`https`, or `http` on a
    /// loopback address), for the client `client_id`.
    ///
    /// # Errors
    /// [`VaultError::InvalidInput`] for a bad name, URL or client id.
    pub fn new(name: &str, token_endpoint: &str, client_id: &str) -> Result<Self, VaultError> {
        check_name(name)?;
        let token_endpoint = parse_endpoint("token endpoint", token_endpoint)?;
        if client_id.is_empty() {
            return Err(VaultError::InvalidInput {
                what: "client id",
                reason: "empty",
            });
        }
        Ok(Self {
            name: name.to_owned(),
            token_endpoint,
            client_id: client_id.to_owned(),
            client_secret: None,
            client_keys: Vec::new(),
            auth: ClientAuth::default(),
            revocation_endpoint: None,
            authorization_endpoint: None,
            redirect_uri: None,
            scopes: Vec::new(),
            authorization_params: Vec::new(),
            issuer: None,
        })
    }

    /// Google's authorization, token and revocation endpoints, with the
    /// secret sent in the form body as Google documents. Connecting asks for
    /// `access_type=offline` and `prompt=consent`: Google sends a refresh
    /// token only then, and sends no new one on refresh (the vault keeps the
    /// first). Add the scopes of the API with [`add_scope`](Self::add_scope).
    ///
    /// # Errors
    /// [`VaultError::InvalidInput`] for a bad name or client id.
    pub fn google(name: &str, client_id: &str) -> Result<Self, VaultError> {
        Self::new(name, "https://oauth2.googleapis.com/token", client_id)?
            .with_client_auth(ClientAuth::Post)
            .with_revocation_endpoint("https://oauth2.googleapis.com/revoke")?
            .with_authorization_endpoint("https://accounts.google.com/o/oauth2/v2/auth")?
            .add_authorization_param("access_type", "offline")?
            .add_authorization_param("prompt", "consent")
    }

    /// The Microsoft identity platform's v2.0 authorization and token
    /// endpoints for `tenant` (a tenant id or domain, or `common`,
    /// `organizations`, `consumers`), with the secret in the form body and
    /// the `offline_access` scope (without it there is no refresh token). It
    /// has no revocation endpoint.
    ///
    /// # Errors
    /// [`VaultError::InvalidInput`] for a bad name, tenant or client id.
    pub fn microsoft(name: &str, tenant: &str, client_id: &str) -> Result<Self, VaultError> {
        let tenant_ok = !tenant.is_empty()
            && tenant.len() <= 253
            && tenant
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-'));
        if !tenant_ok {
            return Err(VaultError::InvalidInput {
                what: "tenant",
                reason: "only ASCII letters, digits, '.' and '-' are allowed",
            });
        }
        let base = format!("https://login.microsoftonline.com/{tenant}/oauth2/v2.0");
        Self::new(name, &format!("{base}/token"), client_id)?
            .with_client_auth(ClientAuth::Post)
            .with_authorization_endpoint(&format!("{base}/authorize"))?
            .add_scope("offline_access")
    }

    /// An integration whose provider publishes OpenID Connect discovery
    /// metadata at `{issuer}/.well-known/openid-configuration`: its token,
    /// authorization and (when listed) revocation endpoints come from there,
    /// and callbacks that name an issuer (RFC 9207 `iss`) must name this one.
    ///
    /// # Errors
    /// [`VaultError::ProviderUnavailable`] when the document cannot be
    /// fetched, [`VaultError::InvalidTokenResponse`] when it is unusable
    /// (another issuer, no token endpoint), [`VaultError::InvalidInput`] as
    /// for [`new`](Self::new).
    pub async fn discover(name: &str, issuer: &str, client_id: &str) -> Result<Self, VaultError> {
        check_name(name)?;
        let issuer = issuer.trim_end_matches('/');
        let url = parse_endpoint(
            "issuer",
            &format!("{issuer}/.well-known/openid-configuration"),
        )?;
        let failed = |detail: String| VaultError::ProviderUnavailable {
            integration: name.to_owned(),
            detail: untrusted(detail).to_string(),
        };
        let http = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .timeout(Duration::from_secs(10))
            .build()
            .map_err(|e| failed(e.to_string()))?;
        let response = http
            .get(url)
            .send()
            .await
            .map_err(|e| failed(format!("discovery failed: {}", error_chain(&e))))?;
        if !response.status().is_success() {
            return Err(failed(format!(
                "discovery answered HTTP {}",
                response.status()
            )));
        }
        let body = read_bounded(response).await.map_err(failed)?;
        let unusable = |detail: String| VaultError::InvalidTokenResponse {
            integration: name.to_owned(),
            detail: untrusted(detail).to_string(),
        };
        let metadata: Discovery = serde_json::from_slice(&body)
            .map_err(|e| unusable(format!("discovery document: {e}")))?;
        if metadata.issuer.trim_end_matches('/') != issuer {
            return Err(unusable(format!(
                "discovery names issuer {:?}",
                metadata.issuer
            )));
        }
        let mut integration = Self::new(name, &metadata.token_endpoint, client_id)?;
        if let Some(revocation) = metadata.revocation_endpoint {
            integration = integration.with_revocation_endpoint(&revocation)?;
        }
        if let Some(authorization) = metadata.authorization_endpoint {
            integration = integration.with_authorization_endpoint(&authorization)?;
        }
        integration.issuer = Some(metadata.issuer);
        Ok(integration)
    }

    /// The client secret (none by default: a public client).
    #[must_use]
    pub fn with_client_secret(mut self, secret: &str) -> Self {
        self.client_secret = Some(secret.to_owned());
        self
    }

    /// How the client authenticates (default [`ClientAuth::Basic`]; a
    /// client with neither secret nor key is public and sends only its id).
    /// The JWT methods' assertions name the issuer as audience when the
    /// integration has one ([`discover`](Self::discover),
    /// [`with_issuer`](Self::with_issuer)), else the token endpoint.
    #[must_use]
    pub fn with_client_auth(mut self, auth: ClientAuth) -> Self {
        self.auth = auth;
        self
    }

    /// The private keys for [`ClientAuth::PrivateKeyJwt`]: the first signs;
    /// the others are the ones being retired (the application publishes
    /// all of them where the provider reads the client's JWKS).
    #[must_use]
    pub fn with_client_keys<I>(mut self, keys: I) -> Self
    where
        I: IntoIterator<Item = ClientKey>,
    {
        self.client_keys = keys.into_iter().collect();
        self
    }

    /// The provider's token revocation endpoint (RFC 7009): removing a
    /// connection then revokes its refresh token there (none by default).
    ///
    /// # Errors
    /// [`VaultError::InvalidInput`] for a URL that is not `https` (or `http`
    /// on a loopback address).
    pub fn with_revocation_endpoint(mut self, url: &str) -> Result<Self, VaultError> {
        self.revocation_endpoint = Some(parse_endpoint("revocation endpoint", url)?);
        Ok(self)
    }

    /// Where [`TokenVault::connect`](super::TokenVault::connect) sends the
    /// browser to ask for the user's consent (none by default: the
    /// integration only refreshes tokens stored otherwise).
    ///
    /// ```
    /// # use tower_pg_session::vault::Integration;
    /// # fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let crm = Integration::new("crm", "https://crm.example/oauth/token", "id")?
    ///     .with_authorization_endpoint("https://crm.example/oauth/authorize")?
    ///     .with_redirect_uri("https://app.example/integrations/crm/callback")?
    ///     .add_scope("contacts.read")?;
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    /// [`VaultError::InvalidInput`] for a URL that is not `https` (or `http`
    /// on a loopback address).
    pub fn with_authorization_endpoint(mut self, url: &str) -> Result<Self, VaultError> {
        self.authorization_endpoint = Some(parse_endpoint("authorization endpoint", url)?);
        Ok(self)
    }

    /// The application's callback URL registered at the provider, where the
    /// browser comes back with the code (required to connect).
    ///
    /// # Errors
    /// [`VaultError::InvalidInput`] for a URL that is not `https` (or `http`
    /// on a loopback address), or that has a fragment.
    pub fn with_redirect_uri(mut self, url: &str) -> Result<Self, VaultError> {
        let url = parse_endpoint("redirect URI", url)?;
        if url.fragment().is_some() {
            return Err(VaultError::InvalidInput {
                what: "redirect URI",
                reason: "must not have a fragment",
            });
        }
        self.redirect_uri = Some(url);
        Ok(self)
    }

    /// Adds a scope to ask for when connecting (RFC 6749 §3.3: printable
    /// ASCII without spaces, quotes or backslashes). A scope already there
    /// is not added twice.
    ///
    /// # Errors
    /// [`VaultError::InvalidInput`] for an empty or malformed scope.
    pub fn add_scope(mut self, scope: &str) -> Result<Self, VaultError> {
        let ok = !scope.is_empty()
            && scope.len() <= 256
            && scope
                .bytes()
                .all(|b| matches!(b, 0x21 | 0x23..=0x5b | 0x5d..=0x7e));
        if !ok {
            return Err(VaultError::InvalidInput {
                what: "scope",
                reason: "must be 1 to 256 printable ASCII characters without spaces, '\"' or '\\'",
            });
        }
        if !self.scopes.iter().any(|s| s == scope) {
            self.scopes.push(scope.to_owned());
        }
        Ok(self)
    }

    /// Adds a parameter to the authorization request (`access_type`,
    /// `prompt`, `login_hint`, …); one of the same name is replaced.
    ///
    /// # Errors
    /// [`VaultError::InvalidInput`] for a parameter the vault sets itself
    /// (`client_id`, `redirect_uri`, `response_type`, `scope`, `state`,
    /// `code_challenge`, `code_challenge_method`) or an empty name.
    pub fn add_authorization_param(mut self, name: &str, value: &str) -> Result<Self, VaultError> {
        const OWN: [&str; 7] = [
            "client_id",
            "redirect_uri",
            "response_type",
            "scope",
            "state",
            "code_challenge",
            "code_challenge_method",
        ];
        if name.is_empty() || OWN.contains(&name) {
            return Err(VaultError::InvalidInput {
                what: "authorization parameter",
                reason: "empty, or one the vault sets itself",
            });
        }
        self.authorization_params.retain(|(n, _)| n != name);
        self.authorization_params
            .push((name.to_owned(), value.to_owned()));
        Ok(self)
    }

    /// The issuer the provider names in its callbacks (RFC 9207 `iss`); a
    /// callback naming another is refused. Set by [`discover`](Self::discover).
    #[must_use]
    pub fn with_issuer(mut self, issuer: &str) -> Self {
        self.issuer = Some(issuer.to_owned());
        self
    }

    /// The scopes asked for when connecting.
    #[must_use]
    pub fn scopes(&self) -> &[String] {
        &self.scopes
    }

    /// The redirect URI, when connecting is set up.
    pub fn redirect_uri(&self) -> Option<&str> {
        self.redirect_uri.as_ref().map(Url::as_str)
    }

    /// The authorization endpoint, when connecting is set up.
    pub fn authorization_endpoint(&self) -> Option<&str> {
        self.authorization_endpoint.as_ref().map(Url::as_str)
    }

    /// Whether accounts can be connected: an authorization endpoint and a
    /// redirect URI are set.
    pub(crate) fn check_connectable(&self) -> Result<(&Url, &Url), VaultError> {
        match (&self.authorization_endpoint, &self.redirect_uri) {
            (Some(endpoint), Some(redirect)) => Ok((endpoint, redirect)),
            _ => Err(VaultError::NotConnectable {
                integration: self.name.clone(),
            }),
        }
    }

    /// The authorization request URL for `state` and the PKCE `challenge`
    /// (S256).
    pub(crate) fn connect_url(&self, state: &str, challenge: &str) -> Result<Url, VaultError> {
        let (endpoint, redirect) = self.check_connectable()?;
        let mut url = endpoint.clone();
        {
            let mut q = url.query_pairs_mut();
            q.append_pair("response_type", "code")
                .append_pair("client_id", &self.client_id)
                .append_pair("redirect_uri", redirect.as_str())
                .append_pair("state", state)
                .append_pair("code_challenge", challenge)
                .append_pair("code_challenge_method", "S256");
            if !self.scopes.is_empty() {
                q.append_pair("scope", &self.scopes.join(" "));
            }
            for (name, value) in &self.authorization_params {
                q.append_pair(name, value);
            }
        }
        Ok(url)
    }

    /// Whether a callback's `iss` is acceptable: absent, or this
    /// integration's issuer. A plain OAuth 2.0 integration without a
    /// configured issuer has nothing to compare with and ignores it, as
    /// RFC 9207 §2.4 lets clients that do not know the issuer do.
    pub(crate) fn accepts_issuer(&self, iss: Option<&str>) -> bool {
        match (iss, &self.issuer) {
            (Some(iss), Some(issuer)) => iss.trim_end_matches('/') == issuer.trim_end_matches('/'),
            _ => true,
        }
    }

    /// Exchanges an authorization `code` with its PKCE `verifier` at the
    /// token endpoint (RFC 6749 §4.1.3, RFC 7636).
    pub(crate) async fn exchange(
        &self,
        http: &reqwest::Client,
        code: &str,
        verifier: &str,
        max_token: usize,
    ) -> Result<Tokens, VaultError> {
        let redirect = self
            .redirect_uri
            .as_ref()
            .map(Url::as_str)
            .unwrap_or_default();
        let form = vec![
            ("grant_type", "authorization_code"),
            ("code", code),
            ("redirect_uri", redirect),
            ("code_verifier", verifier),
        ];
        match self.token_request(http, form, None, max_token).await {
            // Here it names the code (used, expired, not for this client),
            // not a stored grant.
            Err(VaultError::NeedsReconsent { integration }) => {
                Err(VaultError::TokenRequestRejected {
                    integration,
                    error: "invalid_grant".to_owned(),
                })
            }
            other => other,
        }
    }

    /// The integration's name in the vault.
    #[must_use]
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The token endpoint.
    #[must_use]
    pub fn token_endpoint(&self) -> &str {
        self.token_endpoint.as_str()
    }

    /// Uses `refresh_token` at the token endpoint. A response without a
    /// refresh token keeps `refresh_token` (providers that do not rotate).
    pub(crate) async fn refresh(
        &self,
        http: &reqwest::Client,
        refresh_token: &str,
        max_token: usize,
    ) -> Result<Tokens, VaultError> {
        let form = vec![
            ("grant_type", "refresh_token"),
            ("refresh_token", refresh_token),
        ];
        self.token_request(http, form, Some(refresh_token), max_token)
            .await
    }

    /// One request at the token endpoint, its answer bounded and parsed.
    async fn token_request<'a>(
        &'a self,
        http: &reqwest::Client,
        form: Vec<(&'static str, &'a str)>,
        old_refresh: Option<&str>,
        max_token: usize,
    ) -> Result<Tokens, VaultError> {
        let response = self
            .authenticated(http.post(self.token_endpoint.clone()), &form)?
            .header("accept", "application/json")
            .send()
            .await
            .map_err(|e| self.unavailable(error_chain(&e)))?;
        let status = response.status();
        let body = read_bounded(response)
            .await
            .map_err(|detail| self.classify_read_error(status, detail))?;
        if status.is_success() {
            self.parse_success(&body, old_refresh, max_token)
        } else {
            Err(self.parse_failure(status, &body))
        }
    }

    /// Revokes `refresh_token` where the provider has an endpoint for it;
    /// best effort: a failure is logged, the connection is gone either way.
    pub(crate) async fn revoke(&self, http: &reqwest::Client, refresh_token: &str) {
        let Some(url) = &self.revocation_endpoint else {
            return;
        };
        let form = [
            ("token", refresh_token),
            ("token_type_hint", "refresh_token"),
        ];
        let sent = match self.authenticated(http.post(url.clone()), &form) {
            Ok(request) => request.send().await,
            Err(e) => {
                tracing::warn!(integration = %self.name, error = %e, "refresh token not revoked");
                return;
            }
        };
        match sent {
            Ok(r) if r.status().is_success() => {
                tracing::debug!(integration = %self.name, "refresh token revoked");
            }
            Ok(r) => tracing::warn!(
                integration = %self.name,
                status = %r.status(),
                "refresh token revocation refused"
            ),
            Err(e) => tracing::warn!(
                integration = %self.name,
                error = %untrusted(error_chain(&e)),
                "refresh token revocation failed"
            ),
        }
    }

    /// `request` with `form` as its body and the client's credentials as
    /// configured, by the login's own client authentication.
    fn authenticated(
        &self,
        request: reqwest::RequestBuilder,
        form: &[(&str, &str)],
    ) -> Result<reqwest::RequestBuilder, VaultError> {
        use crate::oidc::ClientAuth as Method;
        let secret = self.client_secret.as_deref();
        let method = match self.auth {
            ClientAuth::Basic if secret.is_some() => Some(Method::SecretBasic),
            ClientAuth::Post if secret.is_some() => Some(Method::SecretPost),
            ClientAuth::Basic | ClientAuth::Post => None,
            ClientAuth::SecretJwt => Some(Method::SecretJwt),
            ClientAuth::PrivateKeyJwt => Some(Method::PrivateKeyJwt),
        };
        let audience = self
            .issuer
            .as_deref()
            .unwrap_or(self.token_endpoint.as_str());
        let auth = Authenticator::new(
            &self.client_id,
            secret,
            &self.client_keys,
            method,
            None,
            audience,
        )
        .map_err(|_| VaultError::InvalidInput {
            what: "client authentication",
            reason: "the method needs a client secret or key the integration lacks",
        })?;
        let mut form: Vec<(String, String)> = form
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        let request = auth.apply(request, &mut form);
        let pairs: Vec<(&str, &str)> = form.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        Ok(crate::oidc::with_form(request, &pairs))
    }

    fn classify_read_error(&self, status: reqwest::StatusCode, detail: String) -> VaultError {
        if status.is_server_error() {
            self.unavailable(format!("HTTP {status}"))
        } else {
            self.invalid(detail)
        }
    }

    fn parse_success(
        &self,
        body: &[u8],
        old_refresh: Option<&str>,
        max_token: usize,
    ) -> Result<Tokens, VaultError> {
        let parsed: TokenResponse = serde_json::from_slice(body)
            .map_err(|e| self.invalid(format!("not a token response: {e}")))?;
        if parsed.access_token.is_empty() {
            return Err(self.invalid("empty access_token".to_owned()));
        }
        if let Some(t) = &parsed.token_type {
            if !t.eq_ignore_ascii_case("bearer") && !t.eq_ignore_ascii_case("dpop") {
                return Err(self.invalid(format!(
                    "unsupported token_type {}",
                    untrusted(format!("{t:?}"))
                )));
            }
        }
        let expires_in = match &parsed.expires_in {
            None | Some(Value::Null) => None,
            Some(Value::Number(n)) => Some(n.as_u64()),
            Some(Value::String(s)) => Some(s.trim().parse::<u64>().ok()),
            Some(_) => Some(None),
        };
        let expires_in = match expires_in {
            Some(None) => {
                return Err(self.invalid("expires_in is not a number of seconds".to_owned()))
            }
            Some(Some(secs)) => Some(secs),
            None => None,
        };
        check_token(&parsed.access_token, max_token).map_err(|e| self.invalid(e.to_string()))?;
        let refresh = parsed
            .refresh_token
            .filter(|t| !t.is_empty())
            .or_else(|| old_refresh.map(str::to_owned));
        let mut tokens = Tokens::new(parsed.access_token);
        if let Some(refresh) = refresh {
            check_token(&refresh, max_token).map_err(|e| self.invalid(e.to_string()))?;
            tokens = tokens.with_refresh_token(refresh);
        }
        if let Some(secs) = expires_in {
            tokens = tokens.with_expires_at(expires_at(secs));
        }
        if let Some(scope) = parsed.scope {
            tokens = tokens.with_scopes(scope.split_whitespace());
        }
        if let Some(t) = parsed.token_type {
            tokens = tokens.with_token_type(&t);
        }
        Ok(tokens)
    }

    fn parse_failure(&self, status: reqwest::StatusCode, body: &[u8]) -> VaultError {
        let error = serde_json::from_slice::<ErrorResponse>(body)
            .ok()
            .map(|e| e.error);
        match error.as_deref() {
            Some("invalid_grant") => VaultError::NeedsReconsent {
                integration: self.name.clone(),
            },
            Some(code) if !status.is_server_error() => VaultError::TokenRequestRejected {
                integration: self.name.clone(),
                error: untrusted(code).to_string(),
            },
            _ if status.is_server_error() || status.as_u16() == 429 => {
                self.unavailable(format!("HTTP {status}"))
            }
            _ => self.invalid(format!("HTTP {status} without an OAuth error")),
        }
    }

    fn unavailable(&self, detail: String) -> VaultError {
        VaultError::ProviderUnavailable {
            integration: self.name.clone(),
            detail: untrusted(detail).to_string(),
        }
    }

    fn invalid(&self, detail: String) -> VaultError {
        VaultError::InvalidTokenResponse {
            integration: self.name.clone(),
            detail: untrusted(detail).to_string(),
        }
    }
}

/// RFC 6749 §5.1, with the fields real providers vary on kept loose.
#[derive(Deserialize)]
struct TokenResponse {
    access_token: String,
    #[serde(default)]
    token_type: Option<String>,
    #[serde(default)]
    expires_in: Option<Value>,
    #[serde(default)]
    refresh_token: Option<String>,
    #[serde(default)]
    scope: Option<String>,
}

/// The discovery fields the vault uses.
#[derive(Deserialize)]
struct Discovery {
    issuer: String,
    token_endpoint: String,
    #[serde(default)]
    revocation_endpoint: Option<String>,
    #[serde(default)]
    authorization_endpoint: Option<String>,
}

/// RFC 6749 §5.2.
#[derive(Deserialize)]
struct ErrorResponse {
    error: String,
}

/// Reads at most [`MAX_RESPONSE_BYTES`] of the body.
async fn read_bounded(mut response: reqwest::Response) -> Result<Vec<u8>, String> {
    let mut body = Vec::new();
    while let Some(chunk) = response
        .chunk()
        .await
        .map_err(|e| format!("reading the response failed: {e}"))?
    {
        if body.len() + chunk.len() > MAX_RESPONSE_BYTES {
            return Err(format!(
                "the response is over the limit of {MAX_RESPONSE_BYTES} bytes"
            ));
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

/// Now plus `secs`, saturating at the largest instant `time` represents.
fn expires_at(secs: u64) -> OffsetDateTime {
    let secs = i64::try_from(secs).unwrap_or(i64::MAX);
    OffsetDateTime::now_utc()
        .checked_add(time::Duration::seconds(secs))
        .unwrap_or_else(|| {
            // Far enough that a refresh is never due; representable everywhere.
            OffsetDateTime::now_utc() + Duration::from_secs(100 * 365 * 24 * 3600)
        })
}

fn parse_endpoint(what: &'static str, url: &str) -> Result<Url, VaultError> {
    let bad = |reason| VaultError::InvalidInput { what, reason };
    let url = Url::parse(url).map_err(|_| bad("not a URL"))?;
    let loopback = matches!(url.host_str(), Some("127.0.0.1" | "localhost" | "[::1]"));
    match url.scheme() {
        "https" => Ok(url),
        "http" if loopback => Ok(url),
        _ => Err(bad("must be https (or http on a loopback address)")),
    }
}

/// Integration names appear in SQL parameters, AAD, metrics labels and log
/// lines: a small alphabet keeps all of them unambiguous.
pub(crate) fn check_name(name: &str) -> Result<(), VaultError> {
    let bad = |reason| VaultError::InvalidInput {
        what: "integration name",
        reason,
    };
    if name.is_empty() || name.len() > 64 {
        return Err(bad("must be 1 to 64 characters"));
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
    {
        return Err(bad(
            "only ASCII letters, digits, '.', '_' and '-' are allowed",
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_endpoints() {
        assert!(check_name("mail").is_ok());
        assert!(check_name("google.drive-2_x").is_ok());
        for bad in ["", "a b", "x\n", "é", &"a".repeat(65)] {
            assert!(check_name(bad).is_err(), "{bad:?}");
        }
        let parse = |url| parse_endpoint("token endpoint", url);
        assert!(parse("https://example.com/token").is_ok());
        assert!(parse("http://127.0.0.1:8080/token").is_ok());
        assert!(parse("http://example.com/token").is_err());
        assert!(parse("nope").is_err());
    }

    #[test]
    fn presets() {
        let google = Integration::google("mail", "id").expect("valid");
        assert_eq!(
            google.token_endpoint(),
            "https://oauth2.googleapis.com/token"
        );
        assert_eq!(google.auth, ClientAuth::Post);
        assert!(google.revocation_endpoint.is_some());
        let google = google
            .with_redirect_uri("https://app.example/cb")
            .expect("valid")
            .add_scope("https://www.googleapis.com/auth/gmail.readonly")
            .expect("valid");
        let url = google.connect_url("st", "ch").expect("connectable");
        assert!(url
            .as_str()
            .starts_with("https://accounts.google.com/o/oauth2/v2/auth?"));
        let q: Vec<(String, String)> = url.query_pairs().into_owned().collect();
        for (k, v) in [
            ("access_type", "offline"),
            ("prompt", "consent"),
            ("state", "st"),
            ("code_challenge_method", "S256"),
            ("redirect_uri", "https://app.example/cb"),
            ("scope", "https://www.googleapis.com/auth/gmail.readonly"),
        ] {
            assert!(
                q.contains(&(k.to_owned(), v.to_owned())),
                "{k}={v} in {url}"
            );
        }
        let ms = Integration::microsoft("outlook", "contoso.onmicrosoft.com", "id").expect("valid");
        assert_eq!(
            ms.token_endpoint(),
            "https://login.microsoftonline.com/contoso.onmicrosoft.com/oauth2/v2.0/token"
        );
        assert_eq!(
            ms.authorization_endpoint(),
            Some("https://login.microsoftonline.com/contoso.onmicrosoft.com/oauth2/v2.0/authorize")
        );
        assert_eq!(ms.scopes(), ["offline_access"]);
        for bad in ["", "a/b", "evil.com#", "x?y"] {
            assert!(
                Integration::microsoft("outlook", bad, "id").is_err(),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn connect_settings_are_checked() {
        let i = Integration::new("crm", "https://crm.example/token", "id").expect("valid");
        assert!(matches!(
            i.connect_url("s", "c"),
            Err(VaultError::NotConnectable { .. })
        ));
        for bad in ["", "a b", "x\"y", "é"] {
            assert!(i.clone().add_scope(bad).is_err(), "{bad:?}");
        }
        for own in ["state", "redirect_uri", "code_challenge", ""] {
            assert!(
                i.clone().add_authorization_param(own, "x").is_err(),
                "{own}"
            );
        }
        assert!(i
            .clone()
            .with_redirect_uri("http://evil.example/cb")
            .is_err());
        assert!(i
            .clone()
            .with_redirect_uri("https://app.example/cb#x")
            .is_err());
        assert!(i.accepts_issuer(None));
        assert!(i.accepts_issuer(Some("https://idp.example")));
        let i = i.with_issuer("https://idp.example");
        assert!(i.accepts_issuer(Some("https://idp.example")));
        assert!(!i.accepts_issuer(Some("https://evil.example")));
    }

    #[test]
    fn secret_is_not_in_debug() {
        let i = Integration::new("mail", "https://example.com/token", "id")
            .expect("valid")
            .with_client_secret("s3cr3t-value");
        assert!(!format!("{i:?}").contains("s3cr3t"));
    }
}
