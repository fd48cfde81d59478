//! [`SessionLayerBuilder`]: the settings of a [`SessionLayer`], checked once.

use std::time::Duration;

use http::StatusCode;

use super::{
    cookie::{check_cookie_name, check_domain, Codec, SameSite},
    layer::{Config, SessionLayer},
};
use crate::{error::ConfigError, store::PgStore};

/// The settings of a [`SessionLayer`], from [`SessionLayer::builder`] or
/// [`SessionLayer::express_builder`].
///
/// Setters that parse text (a cookie name, a domain) fail at once on text
/// that cannot be one; every other setter takes its value as given.
/// [`build`](Self::build) then checks each value's range and the settings
/// against each other (and against the table the store found), whatever the
/// order they were set in, and its error names the setters involved.
///
/// ```
/// # async fn run(store: tower_pg_session::PgStore) -> Result<(), tower_pg_session::ConfigError> {
/// use std::time::Duration;
/// use tower_pg_session::{SameSite, SessionLayer, SigningKeys};
///
/// let keys = SigningKeys::new([std::env::var("SESSION_SECRET").unwrap_or_default()])?;
/// let layer = SessionLayer::builder(store, keys)
///     .with_cookie_name("app_session")?
///     .with_same_site(SameSite::Strict)
///     .with_idle_timeout(Some(Duration::from_secs(30 * 60)))
///     .build()?;
/// # Ok(()) }
/// ```
#[must_use]
pub struct SessionLayerBuilder {
    store: PgStore,
    config: Config,
}

impl std::fmt::Debug for SessionLayerBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SessionLayerBuilder")
            .field("store", &self.store)
            .field("cookie", &self.config.cookie.full_name())
            .finish_non_exhaustive()
    }
}

impl SessionLayerBuilder {
    pub(super) fn new(store: PgStore, codec: Codec) -> Self {
        Self {
            store,
            config: Config::new(codec),
        }
    }

    /// The layer with the defaults, which pass every check.
    pub(super) fn defaults(self) -> SessionLayer {
        SessionLayer::from_parts(self.store, self.config)
    }

    /// The cookie name (default `session`, `connect.sid` for Express).
    ///
    /// # Errors
    /// [`ConfigError::InvalidCookieName`] for a name that is not a cookie token.
    pub fn with_cookie_name(mut self, name: &str) -> Result<Self, ConfigError> {
        check_cookie_name(name)?;
        self.config.cookie.name = name.to_owned();
        Ok(self)
    }

    /// Prefixes the name with `__Host-`, which browsers accept only with
    /// `Secure`, `Path=/` and no `Domain`: a sibling subdomain cannot then set
    /// or shadow the cookie. [`build`](Self::build) refuses it with a domain
    /// or without `Secure`.
    pub fn with_host_prefix(mut self) -> Self {
        self.config.cookie.host_prefix = true;
        self
    }

    /// Sends the cookie to this domain and its subdomains (default: the host only).
    ///
    /// # Errors
    /// [`ConfigError::InvalidCookieDomain`] for text that is not a domain.
    pub fn with_domain(mut self, domain: &str) -> Result<Self, ConfigError> {
        check_domain(domain)?;
        self.config.cookie.domain = Some(domain.to_owned());
        Ok(self)
    }

    /// The `SameSite` attribute (default `Lax`); `None` needs `Secure`.
    pub fn with_same_site(mut self, same_site: SameSite) -> Self {
        self.config.cookie.same_site = same_site;
        self
    }

    /// Drops the `Secure` flag so the cookie works over plain `http://` (local
    /// development only: the session id then crosses the network in clear).
    pub fn with_insecure_http_cookie(mut self) -> Self {
        self.config.cookie.secure = false;
        self
    }

    /// Whether the cookie carries `Max-Age` (default `true`); without it the
    /// browser forgets the session when it closes.
    pub fn with_persistent_cookie(mut self, persistent: bool) -> Self {
        self.config.cookie.persistent = persistent;
        self
    }

    /// Ends sessions unused for this long (default 24 h; `None` for no idle
    /// limit). From one second to ten years; one of the two timeouts is
    /// required.
    pub fn with_idle_timeout(mut self, idle: Option<Duration>) -> Self {
        self.config.idle = idle;
        self
    }

    /// Ends sessions this long after they were created, however active
    /// (default: no absolute limit). From one second to ten years; needs the
    /// table's `created_at` column.
    pub fn with_absolute_timeout(mut self, absolute: Option<Duration>) -> Self {
        self.config.absolute = absolute;
        self
    }

    /// Share of the idle timeout that must pass before a read rewrites the
    /// row's expiry (default 0.1: a 24 h session is extended at most every
    /// 2.4 h; reads in between cost no write). From 0 to 0.5.
    pub fn with_touch_after(mut self, fraction: f64) -> Self {
        self.config.touch_fraction = fraction;
        self
    }

    /// Largest session data, serialized, in bytes (default 64 KiB; at least 2,
    /// the size of `{}`).
    pub fn with_max_data_size(mut self, bytes: usize) -> Self {
        self.config.max_size = bytes;
        self
    }

    /// Stores only the SHA-256 of each session id, so a copy of the table
    /// gives no one a live session. Not for tables shared with Node, which
    /// looks rows up by the plain id.
    pub fn with_hashed_ids(mut self, hashed: bool) -> Self {
        self.config.hashed_ids = hashed;
        self
    }

    /// Records each new session's `User-Agent`, and the client address from
    /// `ip_header` (e.g. `x-forwarded-for`, whose first entry is used; only
    /// trustworthy behind a proxy that sets it), in the `user_agent` and `ip`
    /// columns, for "your devices" pages and incident response. Off by
    /// default; needs those columns.
    pub fn with_client_info(mut self, ip_header: Option<http::HeaderName>) -> Self {
        self.config.record_client = Some(ip_header);
        self
    }

    /// Status of the response when the session store fails during a request
    /// (default 503).
    pub fn with_unavailable_status(mut self, status: StatusCode) -> Self {
        self.config.unavailable_status = status;
        self
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
    pub fn with_reserved_key(mut self, key: &str) -> Self {
        if !self.config.reserved.iter().any(|k| k == key) {
            self.config.reserved.push(key.to_owned());
        }
        self
    }

    /// The layer, once every setting is in range and none contradicts another.
    ///
    /// # Errors
    /// [`ConfigError::InvalidDuration`] or [`ConfigError::InvalidValue`] for
    /// a value out of range; [`ConfigError::Conflict`], naming the setters,
    /// for settings that cannot go together.
    pub fn build(mut self) -> Result<SessionLayer, ConfigError> {
        self.check_values()?;
        self.check_conflicts()?;
        self.config.cookie_name = self.config.cookie.full_name();
        Ok(SessionLayer::from_parts(self.store, self.config))
    }

    fn check_values(&self) -> Result<(), ConfigError> {
        let c = &self.config;
        check_duration("with_idle_timeout", c.idle)?;
        check_duration("with_absolute_timeout", c.absolute)?;
        if !(0.0..=0.5).contains(&c.touch_fraction) {
            let reason = "must be between 0 and 0.5";
            return Err(invalid("with_touch_after", reason));
        }
        if c.max_size < 2 {
            return Err(invalid("with_max_data_size", "must be at least 2 bytes"));
        }
        Ok(())
    }

    fn check_conflicts(&self) -> Result<(), ConfigError> {
        let c = &self.config;
        c.cookie.validate()?;
        if c.express && c.hashed_ids {
            let reason =
                "hashed ids cannot be shared with Express, which looks rows up by the plain id";
            return Err(ConfigError::conflict(
                &["express_builder", "with_hashed_ids"],
                reason,
            ));
        }
        if c.idle.is_none() && c.absolute.is_none() {
            let reason = "an idle or an absolute timeout is required";
            return Err(ConfigError::conflict(
                &["with_idle_timeout", "with_absolute_timeout"],
                reason,
            ));
        }
        let extended = self.store.has_extended_columns();
        if c.absolute.is_some() && !extended {
            let reason =
                "an absolute timeout needs the created_at column; let the store upgrade the table";
            return Err(ConfigError::conflict(
                &["with_absolute_timeout", "PgStoreConfig::with_create_table"],
                reason,
            ));
        }
        if c.record_client.is_some() && !extended {
            let reason = "recording client details needs the user_agent and ip columns; let the store upgrade the table";
            return Err(ConfigError::conflict(
                &["with_client_info", "PgStoreConfig::with_create_table"],
                reason,
            ));
        }
        Ok(())
    }
}

fn invalid(setting: &'static str, reason: &'static str) -> ConfigError {
    ConfigError::InvalidValue { setting, reason }
}

fn check_duration(setting: &'static str, d: Option<Duration>) -> Result<(), ConfigError> {
    let reason = match d {
        Some(d) if d < Duration::from_secs(1) => "must be at least one second",
        Some(d) if d > Duration::from_secs(10 * 365 * 24 * 3600) => "must be at most ten years",
        _ => return Ok(()),
    };
    Err(ConfigError::InvalidDuration { setting, reason })
}
