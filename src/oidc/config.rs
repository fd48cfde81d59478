//! [`OidcConfig`]: what the relying party needs to know, with safe defaults.

use std::{fmt, time::Duration};

use openidconnect::{core::CoreJwsSigningAlgorithm, url::Url};

use super::step_up::StepUp;
use crate::{crypto::Keyring, error::ConfigError};

/// Provider-specific behaviour. Detected from the issuer unless set.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Provider {
    /// Any certified provider: everything comes from discovery.
    Generic,
    /// Keycloak: issuer `{base}/realms/{realm}` (a trailing slash is
    /// tolerated), logout through `end_session_endpoint`.
    Keycloak,
    /// AWS Cognito: issuer `https://cognito-idp.{region}.amazonaws.com/{pool}`.
    /// Its discovery has no `end_session_endpoint`; logout goes to the hosted
    /// UI's `{domain}/logout?client_id=…&logout_uri=…`. ID tokens must carry
    /// `token_use: id`; `cognito:groups` become [`User::groups`](super::User::groups).
    Cognito {
        /// Hosted-UI origin for logout; default: the origin of the discovered
        /// authorization endpoint.
        domain: Option<Url>,
    },
}

impl Provider {
    /// The preset an issuer URL suggests.
    pub fn detect(issuer: &str) -> Self {
        let Ok(url) = Url::parse(issuer) else {
            return Self::Generic;
        };
        let host = url.host_str().unwrap_or_default();
        let path = url.path().trim_end_matches('/');
        let cognito_pool = path
            .strip_prefix('/')
            .and_then(|p| p.split_once('_'))
            .is_some_and(|(region, pool)| {
                region.split('-').count() == 3
                    && region.ends_with(|c: char| c.is_ascii_digit())
                    && !pool.is_empty()
                    && pool.chars().all(|c| c.is_ascii_alphanumeric())
            });
        if (host.starts_with("cognito-idp.") && host.ends_with(".amazonaws.com")) || cognito_pool {
            Self::Cognito { domain: None }
        } else if path.contains("/realms/") {
            Self::Keycloak
        } else {
            Self::Generic
        }
    }
}

/// The default signature algorithms: RSA PKCS#1, RSA-PSS and ECDSA. `none`
/// and the HMAC family are refused unless allowed with
/// [`OidcConfig::with_insecure_algorithms`].
pub(crate) const DEFAULT_ALGS: [CoreJwsSigningAlgorithm; 9] = [
    CoreJwsSigningAlgorithm::RsaSsaPkcs1V15Sha256,
    CoreJwsSigningAlgorithm::RsaSsaPkcs1V15Sha384,
    CoreJwsSigningAlgorithm::RsaSsaPkcs1V15Sha512,
    CoreJwsSigningAlgorithm::RsaSsaPssSha256,
    CoreJwsSigningAlgorithm::RsaSsaPssSha384,
    CoreJwsSigningAlgorithm::RsaSsaPssSha512,
    CoreJwsSigningAlgorithm::EcdsaP256Sha256,
    CoreJwsSigningAlgorithm::EcdsaP384Sha384,
    CoreJwsSigningAlgorithm::EcdsaP521Sha512,
];

/// Configuration of an [`OidcClient`](super::OidcClient).
///
/// ```
/// use tower_pg_session::{crypto::Keyring, oidc::OidcConfig};
///
/// let keys = Keyring::from_base64_list("AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=")?;
/// let config = OidcConfig::new("https://sso.example.com/realms/acme", "web", "https://app.example.com", keys)?
///     .with_client_secret("s3cret")
///     .with_scopes(["openid", "profile", "email"]);
/// # Ok::<(), tower_pg_session::ConfigError>(())
/// ```
#[derive(Clone)]
pub struct OidcConfig {
    pub(crate) issuer: String,
    pub(crate) client_id: String,
    pub(crate) client_secret: Option<String>,
    pub(crate) app_url: Url,
    pub(crate) login_path: String,
    pub(crate) callback_path: String,
    pub(crate) logout_path: String,
    pub(crate) backchannel_logout_path: String,
    pub(crate) post_logout_redirect: Url,
    pub(crate) scopes: Vec<String>,
    pub(crate) provider: Option<Provider>,
    pub(crate) refresh_before: Duration,
    pub(crate) clock_skew: Duration,
    /// What every login asks for unless it asks for more.
    pub(crate) step_up: StepUp,
    /// Tokens bound to a key pair per login (DPoP).
    pub(crate) dpop: bool,
    pub(crate) login_ttl: Duration,
    pub(crate) max_pending_logins: usize,
    pub(crate) algorithms: Vec<CoreJwsSigningAlgorithm>,
    pub(crate) http_timeout: Duration,
    pub(crate) discovery_retry: Duration,
    pub(crate) keys: Keyring,
    pub(crate) bridge_key: Option<String>,
    pub(crate) userinfo: super::UserinfoMode,
    /// The client's registered `userinfo_signed_response_alg`.
    pub(crate) userinfo_signed_response_alg: Option<CoreJwsSigningAlgorithm>,
    pub(crate) unsigned_id_tokens: bool,
    pub(crate) par: super::Par,
    pub(crate) client_auth: Option<super::ClientAuth>,
    pub(crate) client_keys: Vec<super::ClientKey>,
    pub(crate) jwks_path: String,
}

impl fmt::Debug for OidcConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OidcConfig")
            .field("issuer", &self.issuer)
            .field("client_id", &self.client_id)
            .field(
                "client_secret",
                &self.client_secret.as_ref().map(|_| "[redacted]"),
            )
            .field("app_url", &self.app_url.as_str())
            .field("provider", &self.provider)
            .field("keys", &self.keys)
            .finish_non_exhaustive()
    }
}

fn parse_url(setting: &'static str, value: &str) -> Result<Url, ConfigError> {
    let url = Url::parse(value).map_err(|_| ConfigError::InvalidUrl {
        setting,
        value: value.to_owned(),
    })?;
    if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() {
        return Err(ConfigError::InvalidUrl {
            setting,
            value: value.to_owned(),
        });
    }
    Ok(url)
}

impl OidcConfig {
    /// A client of `issuer` registered as `client_id` for the application at
    /// `app_url` (its public base URL); tokens are sealed with `keys`.
    /// Defaults: scopes `openid profile email`, callback `{app_url}/auth/callback`,
    /// login `{app_url}/auth/login`, post-logout redirect `{app_url}/`, refresh
    /// 5 minutes before expiry, 60 s clock skew, login attempts valid 10
    /// minutes and at most 5 pending per browser, 10 s HTTP timeout.
    ///
    /// # Errors
    /// [`ConfigError::InvalidUrl`] when `issuer` or `app_url` is not an
    /// absolute `http(s)` URL.
    pub fn new(
        issuer: &str,
        client_id: &str,
        app_url: &str,
        keys: Keyring,
    ) -> Result<Self, ConfigError> {
        parse_url("issuer", issuer)?;
        let mut app = parse_url("app_url", app_url)?;
        if !app.path().ends_with('/') {
            let path = format!("{}/", app.path());
            app.set_path(&path);
        }
        let post_logout = app.clone();
        Ok(Self {
            issuer: issuer.to_owned(),
            client_id: client_id.to_owned(),
            client_secret: None,
            app_url: app,
            login_path: "auth/login".to_owned(),
            callback_path: "auth/callback".to_owned(),
            logout_path: "auth/logout".to_owned(),
            backchannel_logout_path: "auth/backchannel-logout".to_owned(),
            post_logout_redirect: post_logout,
            scopes: vec!["openid".into(), "profile".into(), "email".into()],
            provider: None,
            refresh_before: Duration::from_secs(300),
            clock_skew: Duration::from_secs(60),
            step_up: StepUp::default(),
            dpop: false,
            login_ttl: Duration::from_secs(600),
            max_pending_logins: 5,
            algorithms: DEFAULT_ALGS.to_vec(),
            http_timeout: Duration::from_secs(10),
            discovery_retry: Duration::from_secs(5),
            keys,
            bridge_key: None,
            userinfo: super::UserinfoMode::Auto,
            userinfo_signed_response_alg: None,
            unsigned_id_tokens: false,
            par: super::Par::Auto,
            client_auth: None,
            client_keys: Vec::new(),
            jwks_path: "auth/jwks.json".to_owned(),
        })
    }

    /// The client secret (confidential clients; see
    /// [`with_client_auth`](Self::with_client_auth) for how it is used).
    pub fn with_client_secret(mut self, secret: &str) -> Self {
        self.client_secret = Some(secret.to_owned());
        self
    }

    /// The scopes to request; `openid` is always added.
    pub fn with_scopes<I, S>(mut self, scopes: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        let mut list: Vec<String> = scopes.into_iter().map(Into::into).collect();
        if !list.iter().any(|s| s == "openid") {
            list.insert(0, "openid".into());
        }
        self.scopes = list;
        self
    }

    /// When the login and each refresh fetch the userinfo endpoint, whose
    /// claims are merged under the ID token's (default
    /// [`UserinfoMode::Auto`](super::UserinfoMode::Auto): when the ID token
    /// lacks a requested profile claim).
    #[must_use]
    pub fn with_userinfo(mut self, mode: super::UserinfoMode) -> Self {
        self.userinfo = mode;
        self
    }

    /// The algorithm of signed userinfo answers: the client's registered
    /// `userinfo_signed_response_alg`. A signed answer with another one, or
    /// a plain JSON answer, is refused. Unset, the algorithms the provider advertises in
    /// `userinfo_signing_alg_values_supported` (RS, PS, ES only; the ID
    /// token's when it advertises none) are accepted. `none` never is.
    #[must_use]
    pub fn with_userinfo_signed_response_alg(mut self, alg: CoreJwsSigningAlgorithm) -> Self {
        self.userinfo_signed_response_alg =
            Some(alg).filter(|a| *a != CoreJwsSigningAlgorithm::None);
        self
    }

    /// Accepts ID tokens with `alg: none` from the token endpoint, for a
    /// client registered with `id_token_signed_response_alg=none`: they are
    /// trusted only because they come over TLS from the provider. Every
    /// other check still applies, and a token that names a real algorithm
    /// must still carry a valid signature. Off by default.
    #[must_use]
    pub fn with_unsigned_id_tokens(mut self) -> Self {
        self.unsigned_id_tokens = true;
        self
    }

    /// Forces a provider preset instead of detecting it from the issuer.
    pub fn with_provider(mut self, provider: Provider) -> Self {
        self.provider = Some(provider);
        self
    }

    /// Uses the Cognito preset with this hosted-UI origin for logout
    /// (`https://<domain>.auth.<region>.amazoncognito.com` or a custom domain).
    ///
    /// # Errors
    /// [`ConfigError::InvalidUrl`] for a URL that is not absolute `http(s)`.
    pub fn with_cognito_domain(mut self, domain: &str) -> Result<Self, ConfigError> {
        let domain = parse_url("cognito_domain", domain)?;
        self.provider = Some(Provider::Cognito {
            domain: Some(domain),
        });
        Ok(self)
    }

    /// Refreshes the access token when it expires within this (default 5 min).
    pub fn with_refresh_before(mut self, before: Duration) -> Self {
        self.refresh_before = before;
        self
    }

    /// Tolerated clock difference with the provider for `exp`/`iat` (default 60 s, at most 5 min).
    pub fn with_clock_skew(mut self, skew: Duration) -> Self {
        self.clock_skew = skew.min(Duration::from_secs(300));
        self
    }

    // A login started with `LoginOptions` that names its own replaces these.
    step_up_setters!("every login");

    /// Binds the tokens to a key pair of each login (DPoP, RFC 9449; default
    /// off): the key is kept sealed with the login, token requests carry
    /// proofs signed with it, and [`AccessToken::dpop_proof`](super::AccessToken::dpop_proof)
    /// signs the application's calls to resource servers. A stolen token is
    /// then useless without the key. The provider must support DPoP.
    pub fn with_dpop(mut self, on: bool) -> Self {
        self.dpop = on;
        self
    }

    /// How long a started login may take (default 10 min).
    pub fn with_login_ttl(mut self, ttl: Duration) -> Self {
        self.login_ttl = ttl;
        self
    }

    /// Pending logins kept per browser (default 5, at least 1); the oldest
    /// is dropped beyond that.
    pub fn with_max_pending_logins(mut self, n: usize) -> Self {
        self.max_pending_logins = n.max(1);
        self
    }

    /// The path (under `app_url`) of the callback handler (default `auth/callback`).
    pub fn with_callback_path(mut self, path: &str) -> Self {
        self.callback_path = path.trim_start_matches('/').to_owned();
        self
    }

    /// The path (under `app_url`) of the login handler, where the guard sends
    /// browsers (default `auth/login`).
    pub fn with_login_path(mut self, path: &str) -> Self {
        self.login_path = path.trim_start_matches('/').to_owned();
        self
    }

    /// The path (under `app_url`) of the logout handler (default
    /// `auth/logout`), served by [`OidcClient::routes`](super::OidcClient::routes)
    /// and [`OidcRoutesLayer`](super::OidcRoutesLayer).
    pub fn with_logout_path(mut self, path: &str) -> Self {
        self.logout_path = path.trim_start_matches('/').to_owned();
        self
    }

    /// The path (under `app_url`) of the back-channel logout handler
    /// (default `auth/backchannel-logout`), the URL to register at the
    /// provider.
    pub fn with_backchannel_logout_path(mut self, path: &str) -> Self {
        self.backchannel_logout_path = path.trim_start_matches('/').to_owned();
        self
    }

    /// How long a client built with [`OidcClient::lazy`](super::OidcClient::lazy)
    /// waits after a failed discovery before trying again (default 5 s);
    /// meanwhile logins answer 503 at once.
    pub fn with_discovery_retry(mut self, pause: Duration) -> Self {
        self.discovery_retry = pause;
        self
    }

    /// Where the provider sends the browser after logout (default `app_url`).
    ///
    /// # Errors
    /// [`ConfigError::InvalidUrl`] for a URL that is not absolute `http(s)`.
    pub fn with_post_logout_redirect(mut self, url: &str) -> Result<Self, ConfigError> {
        self.post_logout_redirect = parse_url("post_logout_redirect", url)?;
        Ok(self)
    }

    /// Also writes the logged-in subject as `{"user": <sub>}` under this
    /// session key at login, so an Express app sharing the sessions sees the
    /// login the way Passport stores one (`"passport"` → `req.user` after
    /// `deserializeUser`). The guard never reads it back. Reserve it on the
    /// session layer ([`SessionLayer::with_reserved_key`](crate::SessionLayer::with_reserved_key))
    /// so that handlers cannot write it; the guard still does.
    pub fn with_express_user_key(mut self, key: &str) -> Self {
        self.bridge_key = Some(key.to_owned());
        self
    }

    /// When logins push their authorization request to the provider (RFC
    /// 9126) so that the browser carries only `client_id` and a
    /// `request_uri`: by default ([`Par::Auto`](super::Par::Auto)) whenever
    /// the provider advertises a PAR endpoint.
    pub fn with_par(mut self, par: super::Par) -> Self {
        self.par = par;
        self
    }

    /// How the client authenticates at the token, revocation and PAR
    /// endpoints; by default the first of `client_secret_basic`,
    /// `client_secret_post`, `client_secret_jwt` the provider advertises.
    /// Every method needs [`with_client_secret`](Self::with_client_secret).
    pub fn with_client_auth(mut self, auth: super::ClientAuth) -> Self {
        self.client_auth = Some(auth);
        self
    }

    /// Private keys for `private_key_jwt` (which they make the default
    /// method): the first signs; all are published by
    /// [`OidcClient::client_jwks`](super::OidcClient::client_jwks), so a
    /// new key can be registered before it signs and an old one kept while
    /// it retires.
    pub fn with_client_keys<I>(mut self, keys: I) -> Self
    where
        I: IntoIterator<Item = super::ClientKey>,
    {
        self.client_keys = keys.into_iter().collect();
        self
    }

    /// The path (under `app_url`) where the routes serve the public keys of
    /// [`with_client_keys`](Self::with_client_keys) (default
    /// `auth/jwks.json`; not served without keys).
    pub fn with_jwks_path(mut self, path: &str) -> Self {
        self.jwks_path = path.trim_start_matches('/').to_owned();
        self
    }

    /// Timeout of each request to the provider (default 10 s).
    pub fn with_http_timeout(mut self, timeout: Duration) -> Self {
        self.http_timeout = timeout;
        self
    }

    /// Accepts ID tokens signed with these algorithms instead of the default
    /// asymmetric list. Including `HS*` lets the client secret verify tokens,
    /// which only makes sense with providers that sign that way; `none` is
    /// never accepted.
    pub fn with_insecure_algorithms<I>(mut self, algorithms: I) -> Self
    where
        I: IntoIterator<Item = CoreJwsSigningAlgorithm>,
    {
        self.algorithms = algorithms
            .into_iter()
            .filter(|a| *a != CoreJwsSigningAlgorithm::None)
            .collect();
        self
    }

    pub(crate) fn redirect_uri(&self) -> Url {
        self.app_url
            .join(&self.callback_path)
            .unwrap_or_else(|_| self.app_url.clone())
    }

    pub(crate) fn login_path_abs(&self) -> String {
        self.path_abs(&self.login_path)
    }

    /// `path` (relative to `app_url`) as the request path it arrives as.
    pub(crate) fn path_abs(&self, path: &str) -> String {
        format!("{}{}", self.app_url.path(), path)
    }

    /// `scheme://host[:port]` of the application, for `Origin` checks.
    pub(crate) fn app_origin(&self) -> String {
        self.app_url.origin().ascii_serialization()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn detects_presets() {
        assert_eq!(
            Provider::detect("https://sso.example.com/realms/acme"),
            Provider::Keycloak
        );
        assert_eq!(
            Provider::detect("https://sso.example.com/realms/acme/"),
            Provider::Keycloak
        );
        assert_eq!(
            Provider::detect("https://cognito-idp.eu-west-1.amazonaws.com/eu-west-1_AbC123"),
            Provider::Cognito { domain: None }
        );
        assert_eq!(
            Provider::detect("http://127.0.0.1:4000/us-east-1_TestPool"),
            Provider::Cognito { domain: None }
        );
        assert_eq!(
            Provider::detect("https://accounts.google.com"),
            Provider::Generic
        );
    }
}
