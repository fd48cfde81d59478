//! [`OidcClient`]: discovery, code exchange, refresh, revocation, and the
//! verification of ID and logout tokens.

use std::{
    fmt,
    sync::Arc,
    time::{Duration, Instant},
};

use base64::{engine::general_purpose::URL_SAFE_NO_PAD, Engine};
use openidconnect::{
    core::{
        CoreAuthDisplay, CoreClaimName, CoreClaimType, CoreClient, CoreClientAuthMethod,
        CoreErrorResponseType, CoreGrantType, CoreIdToken, CoreIdTokenVerifier, CoreJsonWebKey,
        CoreJsonWebKeySet, CoreJweContentEncryptionAlgorithm, CoreJweKeyManagementAlgorithm,
        CoreJwsSigningAlgorithm, CoreResponseMode, CoreResponseType, CoreSubjectIdentifierType,
        CoreTokenResponse,
    },
    reqwest,
    url::Url,
    AdditionalProviderMetadata, ClientId, ClientSecret, EndpointMaybeSet, EndpointNotSet,
    EndpointSet, IssuerUrl, Nonce, OAuth2TokenResponse, ProviderMetadata, RedirectUrl,
    RefreshToken, RequestTokenError, TokenResponse,
};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use time::OffsetDateTime;
use tokio::sync::RwLock;

use super::{
    config::{OidcConfig, Provider},
    dpop::{self, DpopKey},
    logout_token, userinfo, AuthError, AuthErrorKind,
};
use crate::{log_safe::untrusted, store::PgStore};

/// Discovery fields `openidconnect` does not model.
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
pub(crate) struct ExtraMetadata {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    end_session_endpoint: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    revocation_endpoint: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    authorization_response_iss_parameter_supported: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pushed_authorization_request_endpoint: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    require_pushed_authorization_requests: Option<bool>,
}
impl AdditionalProviderMetadata for ExtraMetadata {}

type Metadata = ProviderMetadata<
    ExtraMetadata,
    CoreAuthDisplay,
    CoreClientAuthMethod,
    CoreClaimName,
    CoreClaimType,
    CoreGrantType,
    CoreJweContentEncryptionAlgorithm,
    CoreJweKeyManagementAlgorithm,
    CoreJsonWebKey,
    CoreResponseMode,
    CoreResponseType,
    CoreSubjectIdentifierType,
>;

/// The discovered client: authorization endpoint set, token and userinfo
/// endpoints as discovery found them.
pub(crate) type DiscoveredClient = CoreClient<
    EndpointSet,
    EndpointNotSet,
    EndpointNotSet,
    EndpointNotSet,
    EndpointMaybeSet,
    EndpointMaybeSet,
>;

/// Where a provider asks the browser to go to end its session.
#[derive(Debug, Clone)]
pub(crate) enum LogoutStyle {
    EndSession(Url),
    Cognito(Url),
    None,
}

/// A relying party of one OpenID provider. Cheap to clone.
///
/// Built by [`discover`](Self::discover) (discovery now, an error when the
/// provider is down) or [`lazy`](Self::lazy) (discovery on first use, so an
/// application starts while its provider is down; until discovery works,
/// logins and the guard answer 503 and discovery is tried again at most
/// every [`with_discovery_retry`](super::OidcConfig::with_discovery_retry)).
#[derive(Clone)]
pub struct OidcClient {
    shared: Arc<Shared>,
}

/// What is known without the provider, and the discovered client once there.
struct Shared {
    config: OidcConfig,
    store: PgStore,
    issuer: String,
    provider: Provider,
    discovered: tokio::sync::OnceCell<Discovered>,
    /// The last failed discovery, answered again until a retry is due.
    failed: std::sync::Mutex<Option<(Instant, AuthError)>>,
}

/// The client once its provider is discovered: what the flows run on.
#[derive(Clone)]
pub(crate) struct Discovered {
    pub(crate) inner: Arc<Inner>,
}

pub(crate) struct Inner {
    pub(crate) config: OidcConfig,
    pub(crate) client: DiscoveredClient,
    pub(crate) http: reqwest::Client,
    pub(crate) issuer: String,
    pub(crate) provider: Provider,
    pub(crate) logout: LogoutStyle,
    pub(crate) revocation: Option<Url>,
    pub(crate) iss_param_required: bool,
    /// The provider takes the `claims` request parameter.
    pub(crate) claims_parameter: bool,
    /// The token endpoint's latest DPoP nonce.
    pub(crate) dpop_nonce: dpop::Nonce,
    pub(crate) par: super::par::ParEndpoint,
    pub(crate) auth: super::client_auth::Authenticator,
    pub(crate) store: PgStore,
    userinfo: Option<String>,
    /// The userinfo endpoint's latest DPoP nonce.
    userinfo_dpop_nonce: dpop::Nonce,
    /// The algorithms a signed userinfo answer may use.
    userinfo_algs: Vec<CoreJwsSigningAlgorithm>,
    jwks_uri: openidconnect::JsonWebKeySetUrl,
    jwks: RwLock<(Arc<CoreJsonWebKeySet>, Option<Instant>)>,
}

impl fmt::Debug for OidcClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OidcClient")
            .field("issuer", &self.shared.issuer)
            .field("provider", &self.shared.provider)
            .field("config", &self.shared.config)
            .field("discovered", &self.shared.discovered.initialized())
            .finish_non_exhaustive()
    }
}

/// A minimum pause between JWKS fetches caused by unknown key ids, so a
/// stream of forged tokens cannot make us hammer the provider.
const JWKS_REFETCH_MIN: Duration = Duration::from_secs(10);

/// What a successful code exchange or refresh yields, verified.
#[derive(Debug)]
pub(crate) struct Tokens {
    pub(crate) access_token: String,
    pub(crate) refresh_token: Option<String>,
    pub(crate) id_token: Option<String>,
    pub(crate) expires_at: Option<i64>,
    pub(crate) claims: Option<Map<String, Value>>,
}

/// How a refreshed ID token's nonce is checked.
pub(crate) enum NonceCheck<'a> {
    /// Login: the nonce must be present and equal.
    Required(&'a str),
    /// Refresh: absent is fine; present must equal.
    IfPresent(&'a str),
    /// Not checked (tokens that came by another channel).
    Ignore,
}

impl OidcClient {
    /// Discovers the provider at the configured issuer and prepares the
    /// client. Sessions are kept in (and back-channel logouts applied to)
    /// `store`.
    ///
    /// # Errors
    /// [`AuthError`] of kind [`AuthErrorKind::ProviderUnavailable`] when
    /// discovery fails or the provider's metadata is unusable (its message
    /// says why), [`AuthErrorKind::SessionUnavailable`] when the store cannot
    /// create its companion table, [`AuthErrorKind::Misconfigured`] for the
    /// errors of [`OidcClient::lazy`].
    pub async fn discover(config: OidcConfig, store: PgStore) -> Result<Self, AuthError> {
        let client = Self::lazy(config, store)
            .map_err(|e| AuthError::new(AuthErrorKind::Misconfigured, e.to_string()))?;
        client
            .shared
            .discovered
            .get_or_try_init(|| discover(&client.shared))
            .await?;
        Ok(client)
    }

    /// A client that discovers its provider on first use, and again after a
    /// failure once [`with_discovery_retry`](super::OidcConfig::with_discovery_retry)
    /// has passed: the application starts while the provider is down, and
    /// its logins and guarded routes answer 503
    /// ([`AuthErrorKind::LoginUnavailable`]) until discovery works.
    ///
    /// # Errors
    /// [`ConfigError`](crate::ConfigError) when a setting of `config` is out
    /// of range or contradicts another (the error names the setters).
    pub fn lazy(config: OidcConfig, store: PgStore) -> Result<Self, crate::ConfigError> {
        config.check()?;
        let provider = config
            .provider
            .clone()
            .unwrap_or_else(|| Provider::detect(&config.issuer));
        let issuer = match provider {
            // Keycloak's issuer never ends with a slash; users' copies often do.
            Provider::Keycloak => config.issuer.trim_end_matches('/').to_owned(),
            _ => config.issuer.clone(),
        };
        Ok(Self {
            shared: Arc::new(Shared {
                config,
                store,
                issuer,
                provider,
                discovered: tokio::sync::OnceCell::new(),
                failed: std::sync::Mutex::new(None),
            }),
        })
    }

    /// Whether discovery has succeeded.
    #[must_use]
    pub fn is_discovered(&self) -> bool {
        self.shared.discovered.initialized()
    }

    /// The discovered client: discovery runs once, shared by concurrent
    /// callers; after a failure the same error is answered until a retry is
    /// due, so an outage costs the provider one request per pause.
    pub(crate) async fn discovered(&self) -> Result<&Discovered, AuthError> {
        if let Some(d) = self.shared.discovered.get() {
            return Ok(d);
        }
        let retry = self.shared.config.discovery_retry;
        if let Some((at, e)) = &*self.failed() {
            if at.elapsed() < retry {
                return Err(e.clone());
            }
        }
        let result = self
            .shared
            .discovered
            .get_or_try_init(|| discover(&self.shared))
            .await;
        match result {
            Ok(d) => Ok(d),
            Err(e) => {
                tracing::warn!(error = %untrusted(&e), retry_secs = retry.as_secs(), "OpenID discovery failed: logins answer 503 until it works");
                let unavailable = AuthError::new(
                    AuthErrorKind::LoginUnavailable,
                    format!(
                        "the OpenID provider is unavailable, retrying every {} s: {}",
                        retry.as_secs(),
                        e.detail()
                    ),
                );
                *self.failed() = Some((Instant::now(), unavailable.clone()));
                Err(if e.kind() == AuthErrorKind::ProviderUnavailable {
                    unavailable
                } else {
                    e
                })
            }
        }
    }

    /// The discovered client, if discovery has already succeeded.
    pub(crate) fn discovered_now(&self) -> Option<&Discovered> {
        self.shared.discovered.get()
    }

    fn failed(&self) -> std::sync::MutexGuard<'_, Option<(Instant, AuthError)>> {
        self.shared
            .failed
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The issuer, as the provider names itself.
    #[must_use]
    pub fn issuer(&self) -> &str {
        &self.shared.issuer
    }

    /// The provider preset in use.
    #[must_use]
    pub fn provider(&self) -> &Provider {
        &self.shared.provider
    }

    /// The configuration.
    #[must_use]
    pub fn config(&self) -> &OidcConfig {
        &self.shared.config
    }

    /// The public JWKS of the keys of
    /// [`with_client_keys`](super::OidcConfig::with_client_keys), the one
    /// to register at the provider (`jwks` or `jwks_uri`); `None` without keys.
    #[must_use]
    pub fn client_jwks(&self) -> Option<Value> {
        let keys = &self.shared.config.client_keys;
        (!keys.is_empty()).then(|| super::client_auth::jwks(keys))
    }

    /// Verifies an ID token given as a compact JWT, as the callback does:
    /// signature with a pinned algorithm list (refetching the provider's keys
    /// once for an unknown key id), `iss`, `aud`/`azp`, `exp`/`iat` within the
    /// clock skew, and the nonce when one is given. Returns its claims.
    ///
    /// # Errors
    /// [`AuthErrorKind::InvalidIdToken`] saying which check failed,
    /// [`AuthErrorKind::LoginUnavailable`] before discovery works.
    pub async fn verify_id_token_jwt(
        &self,
        jwt: &str,
        nonce: Option<&str>,
    ) -> Result<Map<String, Value>, AuthError> {
        self.discovered()
            .await?
            .verify_id_token_jwt(jwt, nonce)
            .await
    }
}

/// Sends a token request with the client's authentication, and a DPoP
/// proof (and the nonce retry) when the login has a key. A macro: the code and refresh requests are types of
/// their own with the same `request_async`.
macro_rules! send_token_request {
    ($discovered:expr, $request:expr, $dpop:expr) => {{
        // The client's authentication, when it goes in the form.
        let request = $discovered
            .inner
            .auth
            .extra_params()
            .into_iter()
            .fold($request, |r, (k, v)| r.add_extra_param(k, v));
        match $dpop {
            Some(key) => {
                let client = dpop::DpopClient {
                    http: &$discovered.inner.http,
                    key,
                    nonce: &$discovered.inner.dpop_nonce,
                };
                request.request_async(&client).await
            }
            None => request.request_async(&$discovered.inner.http).await,
        }
    }};
}

/// An access token that names its DPoP key must name the login's.
fn check_binding(response: &CoreTokenResponse, dpop: Option<&DpopKey>) -> Result<(), AuthError> {
    match dpop {
        Some(key) if !key.binds(response.access_token().secret()) => Err(AuthError::new(
            AuthErrorKind::TokenRequestRejected,
            "the access token is bound to another DPoP key",
        )),
        _ => Ok(()),
    }
}

impl Discovered {
    pub(crate) fn store(&self) -> &PgStore {
        &self.inner.store
    }

    fn verifier(&self, jwks: CoreJsonWebKeySet) -> CoreIdTokenVerifier<'static> {
        let c = &self.inner.config;
        let issuer = IssuerUrl::new(self.inner.issuer.clone())
            .unwrap_or_else(|_| unreachable!("validated at discovery"));
        let id = ClientId::new(c.client_id.clone());
        let verifier = match &c.client_secret {
            Some(secret) => CoreIdTokenVerifier::new_confidential_client(
                id,
                ClientSecret::new(secret.clone()),
                issuer,
                jwks,
            ),
            None => CoreIdTokenVerifier::new_public_client(id, issuer, jwks),
        };
        let skew = chrono::Duration::from_std(c.clock_skew).unwrap_or_default();
        verifier
            .set_allowed_algs(c.id_token_algorithms())
            // `exp` is compared with this clock: running it `skew` behind
            // accepts tokens up to `skew` past their expiry.
            .set_time_fn(move || chrono::Utc::now() - skew)
            .set_issue_time_verifier_fn(move |iat| {
                if iat > chrono::Utc::now() + skew {
                    Err("issued in the future".to_owned())
                } else {
                    Ok(())
                }
            })
    }

    /// The current key set; with `refetch`, a fresh one unless one was
    /// fetched for an unknown key too recently.
    async fn jwks(&self, refetch: bool) -> Arc<CoreJsonWebKeySet> {
        if refetch {
            let mut guard = self.inner.jwks.write().await;
            let due = guard.1.is_none_or(|t| t.elapsed() >= JWKS_REFETCH_MIN);
            if due {
                guard.1 = Some(Instant::now());
                match CoreJsonWebKeySet::fetch_async(&self.inner.jwks_uri, &self.inner.http).await {
                    Ok(set) => {
                        tracing::info!(
                            keys = set.keys().len(),
                            "refreshed the provider's signing keys"
                        );
                        guard.0 = Arc::new(set);
                    }
                    Err(e) => {
                        tracing::warn!(error = %untrusted(error_chain(&e)), "refreshing the provider's signing keys failed");
                    }
                }
            }
            return guard.0.clone();
        }
        self.inner.jwks.read().await.0.clone()
    }

    /// See [`OidcClient::verify_id_token_jwt`].
    pub(crate) async fn verify_id_token_jwt(
        &self,
        jwt: &str,
        nonce: Option<&str>,
    ) -> Result<Map<String, Value>, AuthError> {
        let token: CoreIdToken = jwt.parse().map_err(|e: serde_json::Error| {
            AuthError::new(
                AuthErrorKind::InvalidIdToken,
                format!("malformed ID token: {e}"),
            )
        })?;
        let check = nonce.map_or(NonceCheck::Ignore, NonceCheck::Required);
        self.verify_id_token(&token, check).await
    }

    /// Verifies an ID token: signature (refetching keys once for an unknown
    /// key id), `iss`, `aud`/`azp`, `exp`/`iat` within the skew, nonce, and
    /// the provider's extra rules. Returns all its claims.
    pub(crate) async fn verify_id_token(
        &self,
        token: &CoreIdToken,
        nonce: NonceCheck<'_>,
    ) -> Result<Map<String, Value>, AuthError> {
        let mut refetch = false;
        loop {
            let jwks = self.jwks(refetch).await;
            let mut verifier = self.verifier((*jwks).clone());
            if self.inner.config.unsigned_id_tokens && is_unsigned(&token.to_string()) {
                // Opted in for this client: the token came straight from the
                // token endpoint over TLS (Core 1.0, 3.1.3.7), and only a
                // token that says `alg: none` skips the signature.
                verifier = verifier.insecure_disable_signature_check();
            }
            let result = match &nonce {
                NonceCheck::Required(n) => {
                    let n = Nonce::new((*n).to_owned());
                    token.claims(&verifier, &n).map(|_| ())
                }
                NonceCheck::IfPresent(n) => token
                    .claims(&verifier, |got: Option<&Nonce>| match got {
                        None => Ok(()),
                        Some(got) if constant_eq(got.secret(), n) => Ok(()),
                        Some(_) => Err("nonce mismatch".to_owned()),
                    })
                    .map(|_| ()),
                NonceCheck::Ignore => token
                    .claims(&verifier, |_: Option<&Nonce>| Ok(()))
                    .map(|_| ()),
            };
            match result {
                Ok(()) => break,
                Err(openidconnect::ClaimsVerificationError::SignatureVerification(
                    openidconnect::SignatureVerificationError::NoMatchingKey,
                )) if !refetch => refetch = true,
                Err(e) => {
                    return Err(AuthError::new(
                        AuthErrorKind::InvalidIdToken,
                        format!("ID token rejected: {}", error_chain(&e)),
                    ))
                }
            }
        }
        let claims = payload_claims(&token.to_string())?;
        if matches!(self.inner.provider, Provider::Cognito { .. })
            && claims.get("token_use").and_then(Value::as_str) != Some("id")
        {
            return Err(AuthError::new(
                AuthErrorKind::InvalidIdToken,
                "ID token rejected: token_use is not \"id\"",
            ));
        }
        Ok(claims)
    }

    fn token_error<RE: std::error::Error + 'static>(
        e: RequestTokenError<RE, openidconnect::StandardErrorResponse<CoreErrorResponseType>>,
        what: &str,
    ) -> AuthError {
        match e {
            RequestTokenError::ServerResponse(resp) => {
                let kind = if *resp.error() == CoreErrorResponseType::InvalidGrant {
                    AuthErrorKind::InvalidGrant
                } else {
                    AuthErrorKind::TokenRequestRejected
                };
                AuthError::new(
                    kind,
                    format!("{what} rejected by the provider: {}", resp.error()),
                )
            }
            // The ID token is decoded with the response, so a token missing
            // a required claim (`sub`, `iat`, ...) fails here: it is the
            // token that is bad, not the provider that is down.
            RequestTokenError::Parse(parse, body) if id_token_is_the_fault(&body) => {
                AuthError::new(
                    AuthErrorKind::InvalidIdToken,
                    format!("{what}: ID token rejected: {}", parse.inner()),
                )
            }
            other => AuthError::new(
                AuthErrorKind::ProviderUnavailable,
                format!("{what} failed: {}", error_chain(&other)),
            ),
        }
    }

    /// Exchanges an authorization code (with its PKCE verifier, and a DPoP
    /// proof when the login has a key) and verifies the ID token against
    /// `nonce`.
    pub(crate) async fn exchange(
        &self,
        code: String,
        pkce_verifier: String,
        nonce: &str,
        dpop: Option<&DpopKey>,
    ) -> Result<Tokens, AuthError> {
        let request = self
            .inner
            .client
            .exchange_code(openidconnect::AuthorizationCode::new(code))
            .map_err(|e| AuthError::new(AuthErrorKind::ProviderUnavailable, e.to_string()))?
            .set_pkce_verifier(openidconnect::PkceCodeVerifier::new(pkce_verifier));
        let response: CoreTokenResponse = send_token_request!(self, request, dpop)
            .map_err(|e| Self::token_error(e, "code exchange"))?;
        check_binding(&response, dpop)?;
        let id_token = response.id_token().ok_or_else(|| {
            AuthError::new(
                AuthErrorKind::InvalidIdToken,
                "the token response has no ID token",
            )
        })?;
        let mut claims = self
            .verify_id_token(id_token, NonceCheck::Required(nonce))
            .await?;
        self.add_userinfo(&response, &mut claims, dpop).await?;
        Ok(Self::tokens(&response, Some(claims)))
    }

    /// Uses a refresh token. A refreshed ID token, when present, must pass
    /// the same checks, keep `sub`, and carry the login's nonce if any.
    pub(crate) async fn refresh(
        &self,
        refresh_token: &str,
        nonce: &str,
        sub: &str,
        dpop: Option<&DpopKey>,
    ) -> Result<Tokens, AuthError> {
        let rt = RefreshToken::new(refresh_token.to_owned());
        let request = self
            .inner
            .client
            .exchange_refresh_token(&rt)
            .map_err(|e| AuthError::new(AuthErrorKind::ProviderUnavailable, e.to_string()))?;
        let response: CoreTokenResponse = send_token_request!(self, request, dpop)
            .map_err(|e| Self::token_error(e, "token refresh"))?;
        check_binding(&response, dpop)?;
        let claims = match response.id_token() {
            Some(t) => {
                let claims = self
                    .verify_id_token(t, NonceCheck::IfPresent(nonce))
                    .await?;
                if claims.get("sub").and_then(Value::as_str) != Some(sub) {
                    return Err(AuthError::new(
                        AuthErrorKind::InvalidIdToken,
                        "refreshed ID token names another subject",
                    ));
                }
                let mut claims = claims;
                self.add_userinfo(&response, &mut claims, dpop).await?;
                Some(claims)
            }
            None => None,
        };
        Ok(Self::tokens(&response, claims))
    }

    /// Merges the userinfo endpoint's claims under `claims` when the
    /// configured [`UserinfoMode`](super::UserinfoMode) asks for them.
    /// A DPoP-bound access token (`token_type` `DPoP`) goes with a proof
    /// of `dpop`.
    async fn add_userinfo(
        &self,
        response: &CoreTokenResponse,
        claims: &mut Map<String, Value>,
        dpop: Option<&DpopKey>,
    ) -> Result<(), AuthError> {
        let config = &self.inner.config;
        let Some(url) = &self.inner.userinfo else {
            return Ok(());
        };
        if !config.userinfo.wants(&config.scopes, claims) {
            return Ok(());
        }
        let bound = response.token_type().as_ref().eq_ignore_ascii_case("dpop");
        let request = userinfo::Request {
            http: &self.inner.http,
            url,
            access_token: response.access_token().secret(),
            dpop: dpop
                .filter(|_| bound)
                .map(|key| (key, &self.inner.userinfo_dpop_nonce)),
        };
        let info = match userinfo::fetch(&request).await? {
            // Registered for signed answers: a plain one is not what the
            // provider was told to send.
            userinfo::Answer::Claims(_) if config.userinfo_signed_response_alg.is_some() => {
                return Err(userinfo::invalid(
                    "userinfo answer is not signed as registered",
                ))
            }
            userinfo::Answer::Claims(info) => info,
            userinfo::Answer::Signed(jwt) => self.verify_signed_userinfo(&jwt).await?,
        };
        userinfo::merge(claims, info)
    }

    /// A signed userinfo answer's claims, once its header, signature
    /// (refetching keys once for an unknown key id) and claims pass.
    async fn verify_signed_userinfo(&self, jwt: &str) -> Result<Map<String, Value>, AuthError> {
        let expect = userinfo::Expect {
            issuer: &self.inner.issuer,
            client_id: &self.inner.config.client_id,
            algorithms: &self.inner.userinfo_algs,
        };
        let parsed = userinfo::parse_signed(jwt, &expect)?;
        if !self.signature_valid(&parsed).await {
            return Err(userinfo::invalid("signed userinfo: bad signature"));
        }
        userinfo::check_signed(&parsed, &expect)
    }

    /// Whether a JWS verifies under the provider's keys; an unknown key id
    /// fetches the key set again, once.
    async fn signature_valid(&self, parsed: &logout_token::Parsed<'_>) -> bool {
        let mut refetch = false;
        loop {
            match parsed.verify(&*self.jwks(refetch).await) {
                logout_token::Signature::Valid => return true,
                logout_token::Signature::NoKey if !refetch => refetch = true,
                _ => return false,
            }
        }
    }

    fn tokens(response: &CoreTokenResponse, claims: Option<Map<String, Value>>) -> Tokens {
        Tokens {
            access_token: response.access_token().secret().clone(),
            refresh_token: response.refresh_token().map(|t| t.secret().clone()),
            id_token: response.id_token().map(ToString::to_string),
            expires_at: response
                .expires_in()
                .map(|d| expires_at(OffsetDateTime::now_utc().unix_timestamp(), d)),
            claims,
        }
    }

    /// Revokes a refresh token (RFC 7009), where the provider has an endpoint.
    pub(crate) async fn revoke(&self, refresh_token: &str) {
        let Some(url) = &self.inner.revocation else {
            return;
        };
        let mut form = vec![
            ("token".to_owned(), refresh_token.to_owned()),
            ("token_type_hint".to_owned(), "refresh_token".to_owned()),
        ];
        let req = self
            .inner
            .auth
            .apply(self.inner.http.post(url.clone()), &mut form);
        let form: Vec<(&str, &str)> = form.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        let sent = super::with_form(req, &form).send().await;
        match sent {
            Ok(r) if r.status().is_success() => tracing::debug!("refresh token revoked"),
            Ok(r) => tracing::warn!(status = %r.status(), "refresh token revocation refused"),
            Err(e) => tracing::warn!(error = %untrusted(&e), "refresh token revocation failed"),
        }
    }

    /// The algorithms logout tokens may come signed with: those of
    /// ID tokens by default, and the algorithm the client is registered for
    /// (the provider signs its logout tokens that way too), HMAC included.
    fn logout_algorithms(&self) -> Vec<CoreJwsSigningAlgorithm> {
        let config = &self.inner.config;
        let mut algorithms = config.algorithms.clone();
        if let Some(alg) = &config.id_token_alg {
            if !algorithms.contains(alg) {
                algorithms.push(alg.clone());
            }
        }
        algorithms
    }

    /// Verifies a back-channel logout token (OpenID Back-Channel Logout 1.0,
    /// section 2.6) and returns its claims.
    pub(crate) async fn verify_logout_token(
        &self,
        token: &str,
    ) -> Result<Map<String, Value>, AuthError> {
        let bad = |why: &str| AuthError::new(AuthErrorKind::InvalidLogoutToken, why.to_owned());
        let parsed = logout_token::parse(token, &self.logout_algorithms()).map_err(bad)?;
        let valid = match (&self.inner.config.client_secret, parsed.is_hmac()) {
            (Some(secret), true) => parsed.verify_hmac(secret),
            (None, true) => false,
            (_, false) => self.signature_valid(&parsed).await,
        };
        if !valid {
            return Err(bad("bad signature"));
        }
        let expect = logout_token::Expect {
            issuer: &self.inner.issuer,
            client_id: &self.inner.config.client_id,
            skew: i64::try_from(self.inner.config.clock_skew.as_secs()).unwrap_or(i64::MAX),
            now: OffsetDateTime::now_utc().unix_timestamp(),
        };
        let checked = parsed.check(&expect).map_err(bad)?;
        let fresh = self
            .inner
            .store
            .use_once(
                &format!("logout-jti:{}:{}", self.inner.issuer, checked.jti),
                checked.keep_until,
            )
            .await
            .map_err(|e| AuthError::new(AuthErrorKind::SessionUnavailable, e.to_string()))?;
        if !fresh {
            return Err(bad("replayed (jti seen before)"));
        }
        Ok(checked.claims)
    }
}

/// The HTTP client for the provider. Following redirects would let a
/// hostile metadata document point requests anywhere (SSRF); timeouts keep
/// a stalled provider from stalling every login.
fn http_client(config: &OidcConfig) -> Result<reqwest::Client, AuthError> {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .connect_timeout(config.http_timeout.min(Duration::from_secs(5)))
        .timeout(config.http_timeout)
        .build()
        .map_err(|e| AuthError::new(AuthErrorKind::ProviderUnavailable, e.to_string()))
}

/// How the provider ends its own session: Cognito's hosted UI `/logout`,
/// else the `end_session_endpoint` when there is one.
fn logout_style(provider: &Provider, metadata: &Metadata) -> Result<LogoutStyle, AuthError> {
    Ok(match provider {
        Provider::Cognito { domain } => {
            let origin = metadata.authorization_endpoint().url().origin();
            let base = match domain {
                Some(d) => d.clone(),
                None => Url::parse(&origin.ascii_serialization()).map_err(|e| {
                    AuthError::new(AuthErrorKind::ProviderUnavailable, e.to_string())
                })?,
            };
            LogoutStyle::Cognito(base.join("logout").unwrap_or(base))
        }
        _ => match metadata
            .additional_metadata()
            .end_session_endpoint
            .as_deref()
            .map(Url::parse)
        {
            Some(Ok(url)) => LogoutStyle::EndSession(url),
            _ => LogoutStyle::None,
        },
    })
}

/// Discovery: the provider's metadata, the client built from it, and the
/// store's companion table.
async fn discover(shared: &Shared) -> Result<Discovered, AuthError> {
    let (config, store) = (shared.config.clone(), shared.store.clone());
    let (issuer, provider) = (shared.issuer.clone(), shared.provider.clone());
    let http = http_client(&config)?;
    let issuer_url = IssuerUrl::new(issuer.clone())
        .map_err(|e| AuthError::new(AuthErrorKind::ProviderUnavailable, e.to_string()))?;
    let metadata = Metadata::discover_async(issuer_url, &http)
        .await
        .map_err(|e| {
            AuthError::new(
                AuthErrorKind::ProviderUnavailable,
                format!("discovery at {issuer} failed: {}", error_chain(&e)),
            )
        })?;
    let extra = metadata.additional_metadata().clone();
    let logout = logout_style(&provider, &metadata)?;
    let revocation = extra
        .revocation_endpoint
        .as_deref()
        .and_then(|u| Url::parse(u).ok());
    let claims_parameter = metadata.claims_parameter_supported().unwrap_or(false);
    let jwks = metadata.jwks().clone();
    let jwks_uri = metadata.jwks_uri().clone();
    let userinfo = metadata.userinfo_endpoint().map(|u| u.url().to_string());
    let userinfo_algs = userinfo_algs(&config, &metadata);
    let redirect = RedirectUrl::from_url(config.redirect_uri());
    let auth = super::client_auth::Authenticator::new(
        &config.client_id,
        config.client_secret.as_deref(),
        &config.client_keys,
        config.client_auth,
        metadata
            .token_endpoint_auth_methods_supported()
            .map(Vec::as_slice),
        &issuer,
    )
    .map_err(|e| AuthError::new(AuthErrorKind::ProviderUnavailable, e))?;
    let (secret, auth_type) = auth.for_token_client();
    let client = CoreClient::from_provider_metadata(
        metadata,
        ClientId::new(config.client_id.clone()),
        secret.map(ClientSecret::new),
    )
    .set_auth_type(auth_type)
    .set_redirect_uri(redirect);
    store
        .prepare_single_use()
        .await
        .map_err(|e| AuthError::new(AuthErrorKind::SessionUnavailable, e.to_string()))?;
    tracing::info!(%issuer, ?provider, "OpenID provider discovered");
    Ok(Discovered {
        inner: Arc::new(Inner {
            iss_param_required: extra
                .authorization_response_iss_parameter_supported
                .unwrap_or(false),
            claims_parameter,
            dpop_nonce: dpop::Nonce::default(),
            par: super::par::ParEndpoint::new(
                extra.pushed_authorization_request_endpoint.as_deref(),
                extra.require_pushed_authorization_requests,
            ),
            auth,
            config,
            client,
            http,
            issuer,
            provider,
            logout,
            revocation,
            store,
            userinfo,
            userinfo_dpop_nonce: dpop::Nonce::default(),
            userinfo_algs,
            jwks_uri,
            jwks: RwLock::new((Arc::new(jwks), None)),
        }),
    })
}

/// The algorithms a signed userinfo answer may use: the one the client
/// registered, else those the provider advertises, else the ID token's;
/// never `none`, and never HMAC unless the client asked for it.
fn userinfo_algs(config: &OidcConfig, metadata: &Metadata) -> Vec<CoreJwsSigningAlgorithm> {
    if let Some(alg) = &config.userinfo_signed_response_alg {
        return vec![alg.clone()];
    }
    match metadata.userinfo_signing_alg_values_supported() {
        Some(advertised) => advertised
            .iter()
            .filter(|a| super::config::DEFAULT_ALGS.contains(a))
            .cloned()
            .collect(),
        None => config.algorithms.clone(),
    }
}

/// Whether a JWT is unsigned: `alg` `none` and an empty signature.
fn is_unsigned(jwt: &str) -> bool {
    let mut parts = jwt.split('.');
    let header = parts.next().and_then(decode_json::<Value>);
    let alg = header
        .as_ref()
        .and_then(|h| h.get("alg"))
        .and_then(Value::as_str);
    alg == Some("none") && parts.nth(1) == Some("")
}

/// Whether a token response that failed to parse parses without its ID
/// token: then the ID token is what is malformed.
fn id_token_is_the_fault(body: &[u8]) -> bool {
    let Ok(Value::Object(mut response)) = serde_json::from_slice::<Value>(body) else {
        return false;
    };
    response.remove("id_token").is_some()
        && serde_json::from_value::<CoreTokenResponse>(Value::Object(response)).is_ok()
}

/// When a token that lives `expires_in` from `now` (unix seconds) expires;
/// a provider's absurd lifetime saturates rather than wrapping.
fn expires_at(now: i64, expires_in: Duration) -> i64 {
    now.saturating_add(i64::try_from(expires_in.as_secs()).unwrap_or(i64::MAX))
}

fn decode_json<T: serde::de::DeserializeOwned>(part: &str) -> Option<T> {
    let bytes = URL_SAFE_NO_PAD.decode(part.trim_end_matches('=')).ok()?;
    serde_json::from_slice(&bytes).ok()
}

fn payload_claims(jwt: &str) -> Result<Map<String, Value>, AuthError> {
    jwt.split('.')
        .nth(1)
        .and_then(decode_json)
        .ok_or_else(|| AuthError::new(AuthErrorKind::InvalidIdToken, "malformed ID token payload"))
}

/// Percent-encodes for a form or for HTTP Basic credentials (RFC 6749 §2.3.1).
pub(crate) fn urlencode(s: &str) -> String {
    openidconnect::url::form_urlencoded::byte_serialize(s.as_bytes()).collect()
}

pub(crate) fn constant_eq(a: &str, b: &str) -> bool {
    use subtle::ConstantTimeEq;
    a.len() == b.len() && bool::from(a.as_bytes().ct_eq(b.as_bytes()))
}

pub(crate) fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        out.push_str(": ");
        out.push_str(&c.to_string());
        cur = c.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn absurd_token_lifetimes_saturate() {
        assert_eq!(expires_at(1_000, Duration::from_secs(60)), 1_060);
        assert_eq!(expires_at(1_000, Duration::MAX), i64::MAX);
        assert_eq!(
            expires_at(1_000, Duration::from_secs(i64::MAX as u64)),
            i64::MAX
        );
        assert_eq!(expires_at(i64::MAX, Duration::from_secs(1)), i64::MAX);
    }
}
