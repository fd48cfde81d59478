//! [`SessionLayer`]: configuration and the tower `Layer`.

use std::{fmt, sync::Arc, time::Duration};

use http::StatusCode;
use tower_layer::Layer;

use super::{
    builder::SessionLayerBuilder,
    cookie::{Codec, CookieConfig, ExpressSecrets, SigningKeys},
    expiry::Expiry,
    handle::ClientInfo,
    plan::SavePolicy,
    service::SessionService,
};
use crate::store::{LoadPolicy, PgStore};

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

impl Config {
    /// The defaults of [`SessionLayer::builder`] for cookies of `codec`.
    pub(super) fn new(codec: Codec) -> Self {
        let express = matches!(codec, Codec::Express(_));
        let cookie = CookieConfig::new(codec);
        Self {
            cookie_name: cookie.full_name(),
            cookie,
            idle: Some(DEFAULT_IDLE),
            absolute: None,
            touch_fraction: 0.1,
            max_size: 64 * 1024,
            hashed_ids: false,
            unavailable_status: StatusCode::SERVICE_UNAVAILABLE,
            express,
            record_client: None,
            reserved: Vec::new(),
        }
    }
}

/// Adds a [`Session`](super::Session) to every request and saves it when the
/// response is ready. [`SessionLayer::new`] takes the defaults;
/// [`SessionLayer::builder`] changes them.
///
/// ```
/// # async fn run(store: tower_pg_session::PgStore) -> Result<(), tower_pg_session::ConfigError> {
/// use std::time::Duration;
/// use tower_pg_session::{SessionLayer, SigningKeys};
///
/// let keys = SigningKeys::new([std::env::var("SESSION_SECRET").unwrap_or_default()])?;
/// let layer = SessionLayer::builder(store, keys)
///     .with_cookie_name("app_session")?
///     .with_idle_timeout(Some(Duration::from_secs(8 * 3600)))
///     .with_absolute_timeout(Some(Duration::from_secs(7 * 24 * 3600)))
///     .build()?;
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
    /// Sessions in `store`, cookies signed with `keys`, with the defaults of
    /// [`SessionLayer::builder`].
    pub fn new(store: PgStore, keys: SigningKeys) -> Self {
        Self::builder(store, keys).defaults()
    }

    /// Sessions shared with an Express app, with the defaults of
    /// [`SessionLayer::express_builder`].
    pub fn express(store: PgStore, secrets: ExpressSecrets) -> Self {
        Self::express_builder(store, secrets).defaults()
    }

    /// Sessions in `store`, cookies signed with `keys`. Defaults: cookie
    /// `session` with `HttpOnly; Secure; SameSite=Lax; Path=/`, a persistent
    /// cookie, 24 h idle timeout, no absolute timeout, 64 KiB of data at most,
    /// plain ids at rest (shareable with other applications).
    pub fn builder(store: PgStore, keys: SigningKeys) -> SessionLayerBuilder {
        SessionLayerBuilder::new(store, Codec::Signed(keys))
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
    /// let layer = SessionLayer::express_builder(store, ExpressSecrets::new(["keyboard cat"])?)
    ///     .with_insecure_http_cookie()
    ///     .build()?;
    /// # Ok(()) }
    /// ```
    pub fn express_builder(store: PgStore, secrets: ExpressSecrets) -> SessionLayerBuilder {
        SessionLayerBuilder::new(store, Codec::Express(secrets))
    }

    pub(super) fn from_parts(store: PgStore, config: Config) -> Self {
        Self {
            store,
            config: Arc::new(config),
        }
    }

    /// The store sessions are kept in.
    #[must_use]
    pub fn store(&self) -> &PgStore {
        &self.store
    }
}

impl<S> Layer<S> for SessionLayer {
    type Service = SessionService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        SessionService::new(inner, self.store.clone(), self.config.clone())
    }
}
