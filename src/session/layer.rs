//! [`SessionLayer`]: configuration and the tower `Layer`.

use std::{fmt, sync::Arc, time::Duration};

use http::StatusCode;
use tower_layer::Layer;

use super::{
    cookie::{
        check_cookie_name, check_domain, Codec, CookieConfig, ExpressSecrets, SameSite, SigningKeys,
    },
    expiry::Expiry,
    handle::ClientInfo,
    plan::SavePolicy,
    service::SessionService,
};
use crate::{
    error::ConfigError,
    store::{LoadPolicy, PgStore},
};

/// Everything the service and the handles share, fixed at construction.
#[derive(Clone)]
pub(crate) struct Config {
    pub(crate) cookie: CookieConfig,
    pub(crate) cookie_name: String,
    pub(crate) idle: Option<Duration>,
    pub(crate) absolute: Option<Duration>,
    pub(crate) touch_fraction: f64,
    pub(crate) max_size: usize,
    pub(crate) hashed_ids: bool,
    pub(crate) unavailable_status: StatusCode,
    /// Keep express-session's `cookie` object in `sess` (Node needs it).
    pub(crate) express: bool,
    /// Record the user agent (and the client address from this header) at creation.
    pub(crate) record_client: Option<Option<http::HeaderName>>,
    /// Keys application code may not write, beyond the crate's own.
    pub(crate) reserved: Vec<String>,
}

impl Config {
    /// The client details to record, when the application opted in.
    pub(crate) fn client_info(&self, headers: &http::HeaderMap) -> ClientInfo {
        let Some(ip_header) = &self.record_client else {
            return ClientInfo::default();
        };
        let text = |name: &http::HeaderName, max: usize| {
            headers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(|v| v.chars().take(max).collect::<String>())
        };
        ClientInfo {
            user_agent: text(&http::header::USER_AGENT, 512),
            // The first hop of X-Forwarded-For is the client, as the proxy saw it.
            ip: ip_header
                .as_ref()
                .and_then(|h| text(h, 256))
                .and_then(|v| v.split(',').next().map(|s| s.trim().to_owned())),
        }
    }

    /// When rows expire, from this layer's timeouts.
    pub(crate) fn expiry(&self) -> Expiry {
        Expiry {
            idle: self.idle,
            absolute: self.absolute,
            touch_fraction: self.touch_fraction,
        }
    }

    /// How loads extend the idle expiry.
    pub(crate) fn load_policy(&self) -> LoadPolicy {
        self.expiry().load_policy()
    }

    /// What shapes this layer's saves.
    pub(crate) fn save_policy(&self) -> SavePolicy<'_> {
        SavePolicy {
            expiry: self.expiry(),
            max_size: self.max_size,
            hashed_ids: self.hashed_ids,
            express: self.express.then_some(&self.cookie),
        }
    }
}

pub(super) const DEFAULT_IDLE: Duration = Duration::from_secs(24 * 60 * 60);

/// Adds a [`Session`](super::Session) to every request and saves it when the
/// response is ready.
///
/// ```
/// # async fn run(store: tower_pg_session::PgStore) -> Result<(), tower_pg_session::ConfigError> {
/// use std::time::Duration;
/// use tower_pg_session::{SessionLayer, SigningKeys};
///
/// let keys = SigningKeys::new([std::env::var("SESSION_SECRET").unwrap_or_default()])?;
/// let layer = SessionLayer::new(store, keys)
///     .with_cookie_name("app_session")?
///     .with_idle_timeout(Some(Duration::from_secs(8 * 3600)))?
///     .with_absolute_timeout(Some(Duration::from_secs(7 * 24 * 3600)))?;
/// # Ok(()) }
/// ```
#[derive(Clone)]
#[must_use]
pub struct SessionLayer {
    store: PgStore,
    config: Arc<Config>,
}

impl fmt::Debug for SessionLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let c = &self.config;
        f.debug_struct("SessionLayer")
            .field("store", &self.store)
            .field("cookie", &c.cookie_name)
            .field("idle", &c.idle)
            .field("absolute", &c.absolute)
            .field("hashed_ids", &c.hashed_ids)
            .finish_non_exhaustive()
    }
}

impl SessionLayer {
    /// Sessions in `store`, cookies signed with `keys`. Defaults: cookie
    /// `session` with `HttpOnly; Secure; SameSite=Lax; Path=/`, a persistent
    /// cookie, 24 h idle timeout, no absolute timeout, 64 KiB of data at most,
    /// plain ids at rest (shareable with other applications).
    pub fn new(store: PgStore, keys: SigningKeys) -> Self {
        Self::with_codec(store, Codec::Signed(keys))
    }

    /// Sessions shared with an Express app (express-session +
    /// connect-pg-simple) on the same table: the cookie is express-session's
    /// (`connect.sid`, `s:<sid>.<signature>` under `secrets`), ids are stored
    /// in plain text, and `sess` always carries express-session's `cookie`
    /// object, kept consistent with `expire`. See the README section "Next to
    /// an Express app" for the settings both sides must agree on.
    ///
    /// ```
    /// # async fn run(store: tower_pg_session::PgStore) -> Result<(), tower_pg_session::ConfigError> {
    /// use tower_pg_session::{ExpressSecrets, SessionLayer};
    /// let layer = SessionLayer::express(store, ExpressSecrets::new(["keyboard cat"])?)
    ///     .with_insecure_http_cookie()?;
    /// # Ok(()) }
    /// ```
    pub fn express(store: PgStore, secrets: ExpressSecrets) -> Self {
        let mut layer = Self::with_codec(store, Codec::Express(secrets));
        Arc::make_mut(&mut layer.config).express = true;
        layer
    }

    fn with_codec(store: PgStore, codec: Codec) -> Self {
        let cookie = CookieConfig::new(codec);
        Self {
            store,
            config: Arc::new(Config {
                cookie_name: cookie.full_name(),
                cookie,
                idle: Some(DEFAULT_IDLE),
                absolute: None,
                touch_fraction: 0.1,
                max_size: 64 * 1024,
                hashed_ids: false,
                unavailable_status: StatusCode::SERVICE_UNAVAILABLE,
                express: false,
                record_client: None,
                reserved: Vec::new(),
            }),
        }
    }

    fn edit(mut self, f: impl FnOnce(&mut Config)) -> Result<Self, ConfigError> {
        let config = Arc::make_mut(&mut self.config);
        f(config);
        config.cookie_name = config.cookie.full_name();
        config.cookie.validate()?;
        if config.express && config.hashed_ids {
            return Err(ConfigError::Conflict(
                "hashed ids cannot be shared with Express, which looks rows up by the plain id",
            ));
        }
        if config.idle.is_none() && config.absolute.is_none() {
            return Err(ConfigError::Conflict(
                "an idle or an absolute timeout is required",
            ));
        }
        if config.absolute.is_some() && !self.store.has_extended_columns() {
            return Err(ConfigError::Conflict(
                "an absolute timeout needs the created_at column; let the store upgrade the table",
            ));
        }
        Ok(self)
    }

    /// The cookie name (default `session`).
    ///
    /// ```
    /// # async fn run(layer: tower_pg_session::SessionLayer) {
    /// assert!(layer.clone().with_cookie_name("sid").is_ok());
    /// assert!(layer.with_cookie_name("bad name").is_err());
    /// # }
    /// ```
    ///
    /// # Errors
    /// [`ConfigError::InvalidCookieName`] for a name that is not a cookie token.
    pub fn with_cookie_name(self, name: &str) -> Result<Self, ConfigError> {
        check_cookie_name(name)?;
        self.edit(|c| c.cookie.name = name.to_owned())
    }

    /// Prefixes the name with `__Host-`, which browsers accept only with
    /// `Secure`, `Path=/` and no `Domain`: a sibling subdomain cannot then set
    /// or shadow the cookie.
    ///
    /// ```
    /// # async fn run(layer: tower_pg_session::SessionLayer) -> Result<(), tower_pg_session::ConfigError> {
    /// let layer = layer.with_host_prefix()?;
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    /// [`ConfigError::Conflict`] when a domain is set or `Secure` is off.
    pub fn with_host_prefix(self) -> Result<Self, ConfigError> {
        self.edit(|c| c.cookie.host_prefix = true)
    }

    /// Sends the cookie to this domain and its subdomains (default: the host only).
    ///
    /// ```
    /// # async fn run(layer: tower_pg_session::SessionLayer) -> Result<(), tower_pg_session::ConfigError> {
    /// let layer = layer.with_domain("example.com")?;
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    /// [`ConfigError::InvalidCookieDomain`], or [`ConfigError::Conflict`] with
    /// the `__Host-` prefix.
    pub fn with_domain(self, domain: &str) -> Result<Self, ConfigError> {
        check_domain(domain)?;
        self.edit(|c| c.cookie.domain = Some(domain.to_owned()))
    }

    /// The `SameSite` attribute (default `Lax`).
    ///
    /// ```
    /// # async fn run(layer: tower_pg_session::SessionLayer) -> Result<(), tower_pg_session::ConfigError> {
    /// let layer = layer.with_same_site(tower_pg_session::SameSite::Strict)?;
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    /// [`ConfigError::Conflict`] for `None` without `Secure`.
    pub fn with_same_site(self, same_site: SameSite) -> Result<Self, ConfigError> {
        self.edit(|c| c.cookie.same_site = same_site)
    }

    /// Drops the `Secure` flag so the cookie works over plain `http://` (local
    /// development only: the session id then crosses the network in clear).
    ///
    /// ```
    /// # async fn run(layer: tower_pg_session::SessionLayer) -> Result<(), tower_pg_session::ConfigError> {
    /// let layer = layer.with_insecure_http_cookie()?;
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    /// [`ConfigError::Conflict`] with the `__Host-` prefix or `SameSite=None`.
    pub fn with_insecure_http_cookie(self) -> Result<Self, ConfigError> {
        self.edit(|c| c.cookie.secure = false)
    }

    /// Whether the cookie carries `Max-Age` (default `true`); without it the
    /// browser forgets the session when it closes.
    ///
    /// ```
    /// # async fn run(layer: tower_pg_session::SessionLayer) -> Result<(), tower_pg_session::ConfigError> {
    /// let layer = layer.with_persistent_cookie(false)?;
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    /// Never in practice; returns `Result` like every cookie setting.
    pub fn with_persistent_cookie(self, persistent: bool) -> Result<Self, ConfigError> {
        self.edit(|c| c.cookie.persistent = persistent)
    }

    /// Ends sessions unused for this long (default 24 h; `None` for no idle limit).
    ///
    /// ```
    /// # use std::time::Duration;
    /// # async fn run(layer: tower_pg_session::SessionLayer) -> Result<(), tower_pg_session::ConfigError> {
    /// let layer = layer.with_idle_timeout(Some(Duration::from_secs(30 * 60)))?;
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    /// [`ConfigError::InvalidDuration`] under one second, or
    /// [`ConfigError::Conflict`] when neither timeout remains.
    pub fn with_idle_timeout(self, idle: Option<Duration>) -> Result<Self, ConfigError> {
        check_duration("idle timeout", idle)?;
        self.edit(|c| c.idle = idle)
    }

    /// Ends sessions this long after they were created, however active
    /// (default: no absolute limit).
    ///
    /// ```
    /// # use std::time::Duration;
    /// # async fn run(layer: tower_pg_session::SessionLayer) -> Result<(), tower_pg_session::ConfigError> {
    /// let layer = layer.with_absolute_timeout(Some(Duration::from_secs(12 * 3600)))?;
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    /// As [`Self::with_idle_timeout`], and [`ConfigError::Conflict`] when the
    /// table lacks the `created_at` column.
    pub fn with_absolute_timeout(self, absolute: Option<Duration>) -> Result<Self, ConfigError> {
        check_duration("absolute timeout", absolute)?;
        self.edit(|c| c.absolute = absolute)
    }

    /// Share of the idle timeout that must pass before a read rewrites the
    /// row's expiry (default 0.1: a 24 h session is extended at most every
    /// 2.4 h; reads in between cost no write).
    ///
    /// ```
    /// # async fn run(layer: tower_pg_session::SessionLayer) -> Result<(), tower_pg_session::ConfigError> {
    /// let layer = layer.with_touch_after(0.25)?;
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    /// [`ConfigError::InvalidDuration`] outside 0 to 0.5.
    pub fn with_touch_after(self, fraction: f64) -> Result<Self, ConfigError> {
        if !(0.0..=0.5).contains(&fraction) {
            return Err(ConfigError::InvalidDuration {
                setting: "touch fraction",
                reason: "must be between 0 and 0.5",
            });
        }
        self.edit(|c| c.touch_fraction = fraction)
    }

    /// Largest session data, serialized, in bytes (default 64 KiB).
    ///
    /// ```
    /// # async fn run(layer: tower_pg_session::SessionLayer) -> Result<(), tower_pg_session::ConfigError> {
    /// let layer = layer.with_max_data_size(16 * 1024)?;
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    /// Never in practice; returns `Result` like every other setting.
    pub fn with_max_data_size(self, bytes: usize) -> Result<Self, ConfigError> {
        self.edit(|c| c.max_size = bytes.max(2))
    }

    /// Stores only the SHA-256 of each session id, so a copy of the table
    /// gives no one a live session. Not for tables shared with Node, which
    /// looks rows up by the plain id.
    ///
    /// ```
    /// # async fn run(layer: tower_pg_session::SessionLayer) -> Result<(), tower_pg_session::ConfigError> {
    /// let layer = layer.with_hashed_ids(true)?;
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    /// Never in practice; returns `Result` like every other setting.
    pub fn with_hashed_ids(self, hashed: bool) -> Result<Self, ConfigError> {
        self.edit(|c| c.hashed_ids = hashed)
    }

    /// Records each new session's `User-Agent`, and the client address from
    /// `ip_header` (e.g. `x-forwarded-for`, whose first entry is used; only
    /// trustworthy behind a proxy that sets it), in the `user_agent` and `ip`
    /// columns, for "your devices" pages and incident response. Off by default.
    ///
    /// ```
    /// # async fn run(layer: tower_pg_session::SessionLayer) -> Result<(), tower_pg_session::ConfigError> {
    /// let layer = layer.with_client_info(Some(http::HeaderName::from_static("x-forwarded-for")))?;
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    /// [`ConfigError::Conflict`] when the table lacks the columns.
    pub fn with_client_info(
        self,
        ip_header: Option<http::HeaderName>,
    ) -> Result<Self, ConfigError> {
        if !self.store.has_extended_columns() {
            return Err(ConfigError::Conflict(
                "recording client details needs the user_agent and ip columns; let the store upgrade the table",
            ));
        }
        self.edit(|c| c.record_client = Some(ip_header))
    }

    /// Status of the response when the session store fails during a request
    /// (default 503).
    ///
    /// ```
    /// # async fn run(layer: tower_pg_session::SessionLayer) -> Result<(), tower_pg_session::ConfigError> {
    /// let layer = layer.with_unavailable_status(http::StatusCode::INTERNAL_SERVER_ERROR)?;
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    /// Never in practice; returns `Result` like every other setting.
    pub fn with_unavailable_status(self, status: http::StatusCode) -> Result<Self, ConfigError> {
        self.edit(|c| c.unavailable_status = status)
    }

    /// Reserves `key`: [`Session::insert`](super::Session::insert),
    /// [`remove`](super::Session::remove) and
    /// [`take_once`](super::Session::take_once) on it then fail with
    /// [`SessionError::ReservedKey`](super::SessionError::ReservedKey)
    /// instead of writing, so that a handler storing client-chosen keys
    /// cannot set it. Reading stays allowed. For keys another part trusts,
    /// such as Passport's `passport` next to an Express app (and the key of
    /// `OidcConfig::with_express_user_key`, which the guard still writes).
    /// The guard's own keys (`oidc`, `oidc.login.*`) and the vault's pending
    /// connections (`vault.connect.*`) are always reserved.
    ///
    /// ```
    /// # async fn run(layer: tower_pg_session::SessionLayer) -> Result<(), tower_pg_session::ConfigError> {
    /// let layer = layer.with_reserved_key("passport")?;
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    /// Never in practice; returns `Result` like every other setting.
    pub fn with_reserved_key(self, key: &str) -> Result<Self, ConfigError> {
        self.edit(|c| {
            if !c.reserved.iter().any(|k| k == key) {
                c.reserved.push(key.to_owned());
            }
        })
    }

    /// The store sessions are kept in.
    pub fn store(&self) -> &PgStore {
        &self.store
    }
}

fn check_duration(setting: &'static str, d: Option<Duration>) -> Result<(), ConfigError> {
    match d {
        Some(d) if d < Duration::from_secs(1) => Err(ConfigError::InvalidDuration {
            setting,
            reason: "must be at least one second",
        }),
        Some(d) if d > Duration::from_secs(10 * 365 * 24 * 3600) => {
            Err(ConfigError::InvalidDuration {
                setting,
                reason: "must be at most ten years",
            })
        }
        _ => Ok(()),
    }
}

impl<S> Layer<S> for SessionLayer {
    type Service = SessionService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        SessionService::new(inner, self.store.clone(), self.config.clone())
    }
}
