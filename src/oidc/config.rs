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
    #[must_use]
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
    /// The one algorithm ID tokens must be signed with, when the client is
    /// registered for one (`id_token_signed_response_alg`).
    pub(crate) id_token_alg: Option<CoreJwsSigningAlgorithm>,
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

/// The most clock difference with the provider a configuration may allow.
const MAX_CLOCK_SKEW: Duration = Duration::from_secs(300);

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
            id_token_alg: None,
            par: super::Par::Auto,
            client_auth: None,
            client_keys: Vec::new(),
            jwks_path: "auth/jwks.json".to_owned(),
        })
    }

    /// The client secret (confidential clients; see
    /// [`with_client_auth`](Self::with_client_auth) for how it is used).
    #[must_use]
    pub fn with_client_secret(mut self, secret: &str) -> Self {
        self.client_secret = Some(secret.to_owned());
        self
    }

    /// The scopes to request; `openid` is always added.
    #[must_use]
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
        self.userinfo_signed_response_alg = Some(alg);
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

    /// The algorithm the client is registered for at the provider
    /// (`id_token_signed_response_alg`): ID tokens must be signed with it
    /// and no other. The only way to accept `HS256`/`HS384`/`HS512` ID
    /// tokens, verified with the client secret (a symmetric key the client
    /// shares, so meant for providers that sign that way for this client
    /// only); asymmetric ones are verified with the provider's JWKS as
    /// always. `none` is [`with_unsigned_id_tokens`](Self::with_unsigned_id_tokens).
    /// Logout tokens keep the default list. Unset: any of the default
    /// asymmetric algorithms.
    #[must_use]
    pub fn with_id_token_signed_response_alg(mut self, alg: CoreJwsSigningAlgorithm) -> Self {
        if alg == CoreJwsSigningAlgorithm::None {
            self.unsigned_id_tokens = true;
        } else {
            self.id_token_alg = Some(alg);
        }
        self
    }

    /// The algorithms an ID token may be signed with.
    pub(crate) fn id_token_algorithms(&self) -> Vec<CoreJwsSigningAlgorithm> {
        self.id_token_alg
            .clone()
            .map_or_else(|| self.algorithms.clone(), |a| vec![a])
    }

    /// Forces a provider preset instead of detecting it from the issuer.
    #[must_use]
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
    #[must_use]
    pub fn with_refresh_before(mut self, before: Duration) -> Self {
        self.refresh_before = before;
        self
    }

    /// Tolerated clock difference with the provider for `exp`/`iat` (default
    /// 60 s, at most 5 min).
    #[must_use]
    pub fn with_clock_skew(mut self, skew: Duration) -> Self {
        self.clock_skew = skew;
        self
    }

    // A login started with `LoginOptions` that names its own replaces these.
    step_up_setters!("every login");

    /// Binds the tokens to a key pair of each login (DPoP, RFC 9449; default
    /// off): the key is kept sealed with the login, token requests carry
    /// proofs signed with it, and [`AccessToken::dpop_proof`](super::AccessToken::dpop_proof)
    /// signs the application's calls to resource servers. A stolen token is
    /// then useless without the key. The provider must support DPoP.
    #[must_use]
    pub fn with_dpop(mut self, on: bool) -> Self {
        self.dpop = on;
        self
    }

    /// How long a started login may take (default 10 min).
    #[must_use]
    pub fn with_login_ttl(mut self, ttl: Duration) -> Self {
        self.login_ttl = ttl;
        self
    }

    /// Pending logins kept per browser (default 5, at least 1); the oldest
    /// is dropped beyond that.
    #[must_use]
    pub fn with_max_pending_logins(mut self, n: usize) -> Self {
        self.max_pending_logins = n;
        self
    }

    /// The path (under `app_url`) of the callback handler (default `auth/callback`).
    #[must_use]
    pub fn with_callback_path(mut self, path: &str) -> Self {
        self.callback_path = path.trim_start_matches('/').to_owned();
        self
    }

    /// The path (under `app_url`) of the login handler, where the guard sends
    /// browsers (default `auth/login`).
    #[must_use]
    pub fn with_login_path(mut self, path: &str) -> Self {
        self.login_path = path.trim_start_matches('/').to_owned();
        self
    }

    /// The path (under `app_url`) of the logout handler (default
    /// `auth/logout`), served by [`OidcClient::routes`](super::OidcClient::routes)
    /// and [`OidcRoutesLayer`](super::OidcRoutesLayer).
    #[must_use]
    pub fn with_logout_path(mut self, path: &str) -> Self {
        self.logout_path = path.trim_start_matches('/').to_owned();
        self
    }

    /// The path (under `app_url`) of the back-channel logout handler
    /// (default `auth/backchannel-logout`), the URL to register at the
    /// provider.
    #[must_use]
    pub fn with_backchannel_logout_path(mut self, path: &str) -> Self {
        self.backchannel_logout_path = path.trim_start_matches('/').to_owned();
        self
    }

    /// How long a client built with [`OidcClient::lazy`](super::OidcClient::lazy)
    /// waits after a failed discovery before trying again (default 5 s);
    /// meanwhile logins answer 503 at once.
    #[must_use]
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
    /// session layer ([`SessionLayerBuilder::with_reserved_key`](crate::SessionLayerBuilder::with_reserved_key))
    /// so that handlers cannot write it; the guard still does.
    #[must_use]
    pub fn with_express_user_key(mut self, key: &str) -> Self {
        self.bridge_key = Some(key.to_owned());
        self
    }

    /// When logins push their authorization request to the provider (RFC
    /// 9126) so that the browser carries only `client_id` and a
    /// `request_uri`: by default ([`Par::Auto`](super::Par::Auto)) whenever
    /// the provider advertises a PAR endpoint.
    #[must_use]
    pub fn with_par(mut self, par: super::Par) -> Self {
        self.par = par;
        self
    }

    /// How the client authenticates at the token, revocation and PAR
    /// endpoints; by default the first of `client_secret_basic`,
    /// `client_secret_post`, `client_secret_jwt` the provider advertises.
    /// Every method needs [`with_client_secret`](Self::with_client_secret).
    #[must_use]
    pub fn with_client_auth(mut self, auth: super::ClientAuth) -> Self {
        self.client_auth = Some(auth);
        self
    }

    /// Private keys for `private_key_jwt` (which they make the default
    /// method): the first signs; all are published by
    /// [`OidcClient::client_jwks`](super::OidcClient::client_jwks), so a
    /// new key can be registered before it signs and an old one kept while
    /// it retires.
    #[must_use]
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
    #[must_use]
    pub fn with_jwks_path(mut self, path: &str) -> Self {
        self.jwks_path = path.trim_start_matches('/').to_owned();
        self
    }

    /// Timeout of each request to the provider (default 10 s).
    #[must_use]
    pub fn with_http_timeout(mut self, timeout: Duration) -> Self {
        self.http_timeout = timeout;
        self
    }

    /// Accepts ID tokens signed with these algorithms instead of the default
    /// asymmetric list. Including `HS*` lets the client secret verify tokens,
    /// which only makes sense with providers that sign that way; `none` is
    /// never accepted (see [`with_unsigned_id_tokens`](Self::with_unsigned_id_tokens)),
    /// so a list of `none` alone is refused.
    #[must_use]
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

    /// Every value in range and no two settings at odds, whatever the order
    /// they were set in; run when a client is made from the configuration.
    pub(crate) fn check(&self) -> Result<(), ConfigError> {
        self.check_values()?;
        self.check_client_auth()?;
        self.check_paths()
    }

    fn check_values(&self) -> Result<(), ConfigError> {
        let duration = |setting, reason| Err(ConfigError::InvalidDuration { setting, reason });
        let value = |setting, reason| Err(ConfigError::InvalidValue { setting, reason });
        if self.clock_skew > MAX_CLOCK_SKEW {
            return duration("with_clock_skew", "must be at most 5 minutes");
        }
        if self.login_ttl < Duration::from_secs(1) {
            return duration("with_login_ttl", "must be at least one second");
        }
        if self.http_timeout.is_zero() {
            return duration("with_http_timeout", "must be more than zero");
        }
        if self.max_pending_logins == 0 {
            return value("with_max_pending_logins", "must be at least 1");
        }
        if self.userinfo_signed_response_alg == Some(CoreJwsSigningAlgorithm::None) {
            let reason = "none is never accepted; leave it unset for plain JSON answers";
            return value("with_userinfo_signed_response_alg", reason);
        }
        if self.algorithms.is_empty() {
            return value(
                "with_insecure_algorithms",
                "needs an algorithm other than none",
            );
        }
        Ok(())
    }

    fn check_client_auth(&self) -> Result<(), ConfigError> {
        use super::ClientAuth;
        use CoreJwsSigningAlgorithm as Alg;
        let hmac = matches!(
            self.id_token_alg,
            Some(Alg::HmacSha256 | Alg::HmacSha384 | Alg::HmacSha512)
        );
        if hmac && self.client_secret.is_none() {
            let settings = ["with_id_token_signed_response_alg", "with_client_secret"];
            let reason = "HMAC-signed ID tokens need a client secret";
            return Err(ConfigError::conflict(&settings, reason));
        }
        let needs = match self.client_auth {
            Some(ClientAuth::PrivateKeyJwt) if self.client_keys.is_empty() => "with_client_keys",
            Some(ClientAuth::PrivateKeyJwt) | None => return Ok(()),
            Some(_) if self.client_secret.is_none() => "with_client_secret",
            Some(_) => return Ok(()),
        };
        let reason = "the client authentication method needs its credential";
        Err(ConfigError::conflict(&["with_client_auth", needs], reason))
    }

    /// The routes the client serves must not shadow one another.
    fn check_paths(&self) -> Result<(), ConfigError> {
        let mut paths = vec![
            ("with_login_path", &self.login_path),
            ("with_callback_path", &self.callback_path),
            ("with_logout_path", &self.logout_path),
            (
                "with_backchannel_logout_path",
                &self.backchannel_logout_path,
            ),
        ];
        if !self.client_keys.is_empty() {
            paths.push(("with_jwks_path", &self.jwks_path));
        }
        for (i, (first, a)) in paths.iter().enumerate() {
            if let Some((second, _)) = paths[i + 1..].iter().find(|(_, b)| b == a) {
                let reason = "two of the client's routes share a path";
                return Err(ConfigError::conflict(&[first, second], reason));
            }
        }
        Ok(())
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

    fn config() -> OidcConfig {
        let keys = Keyring::from(crate::crypto::EncryptionKey::generate());
        OidcConfig::new(
            "https://sso.example.com/realms/a",
            "web",
            "https://app.example.com",
            keys,
        )
        .unwrap_or_else(|e| panic!("{e}"))
    }

    fn refused(config: &OidcConfig) -> String {
        config
            .check()
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default()
    }

    #[test]
    fn out_of_range_values_are_refused_not_clamped() {
        assert_eq!(config().check().ok(), Some(()));
        let e = refused(&config().with_clock_skew(Duration::from_secs(301)));
        assert!(e.contains("with_clock_skew"), "{e}");
        let e = refused(&config().with_max_pending_logins(0));
        assert!(e.contains("with_max_pending_logins"), "{e}");
        let e = refused(&config().with_insecure_algorithms([CoreJwsSigningAlgorithm::None]));
        assert!(e.contains("with_insecure_algorithms"), "{e}");
        let none = CoreJwsSigningAlgorithm::None;
        let e = refused(&config().with_userinfo_signed_response_alg(none));
        assert!(e.contains("with_userinfo_signed_response_alg"), "{e}");
        let e = refused(&config().with_login_ttl(Duration::ZERO));
        assert!(e.contains("with_login_ttl"), "{e}");
    }

    #[test]
    fn conflicts_name_both_settings_in_either_order() {
        let basic = super::super::ClientAuth::SecretBasic;
        let e = refused(&config().with_client_auth(basic));
        assert!(e.contains("with_client_auth and with_client_secret"), "{e}");
        assert_eq!(
            config()
                .with_client_auth(basic)
                .with_client_secret("s")
                .check()
                .ok(),
            Some(())
        );
        assert_eq!(
            config()
                .with_client_secret("s")
                .with_client_auth(basic)
                .check()
                .ok(),
            Some(())
        );
        let e = refused(&config().with_client_auth(super::super::ClientAuth::PrivateKeyJwt));
        assert!(e.contains("with_client_auth and with_client_keys"), "{e}");

        let a = refused(
            &config()
                .with_logout_path("auth/out")
                .with_callback_path("auth/out"),
        );
        let b = refused(
            &config()
                .with_callback_path("auth/out")
                .with_logout_path("/auth/out"),
        );
        assert_eq!(a, b);
        assert!(a.contains("with_callback_path and with_logout_path"), "{a}");
    }
}
