//! The session layer: signed cookies, lazy loading, key-level saves.
//!
//! [`SessionLayer`] reads the session cookie of each request, puts a
//! [`Session`] handle into the request extensions, and after the inner service
//! has answered writes whatever the handler changed and sets the cookie.
//!
//! | the request… | statements |
//! |---|---|
//! | never looks at its session, or has no cookie and only reads | 0 |
//! | reads a valid session | 1 (plus 1 when its idle extension is due: written only after a tenth of the timeout) |
//! | changes a valid session | 2: load, then one `UPDATE` checked against the row version |
//! | creates a session | 1 `INSERT … ON CONFLICT DO NOTHING` |
//!
//! ```
//! use http::{Request, Response};
//! use tower::{service_fn, ServiceBuilder, ServiceExt};
//! use tower_pg_session::{Session, SessionLayer};
//!
//! # async fn run(layer: SessionLayer) -> Result<(), Box<dyn std::error::Error>> {
//! let app = ServiceBuilder::new().layer(layer).service(service_fn(|req: Request<String>| async move {
//!     let session = req.extensions().get::<Session>().expect("SessionLayer is installed").clone();
//!     let visits: u64 = session.get("visits").await?.unwrap_or(0) + 1;
//!     session.insert("visits", &visits).await?;
//!     Ok::<_, tower_pg_session::SessionError>(Response::new(format!("visit {visits}")))
//! }));
//! let response = app.oneshot(Request::new(String::new())).await?;
//! assert!(response.headers().contains_key(http::header::SET_COOKIE));
//! # Ok(()) }
//! ```
//!
//! A cookie that is malformed, oversized, or fails verification is treated as
//! absent: the request gets a fresh, empty session and the row the cookie named
//! is not touched.

mod builder;
mod cookie;
pub(crate) mod data;
mod expiry;
mod express;
#[cfg(feature = "axum")]
mod extract;
mod future;
mod handle;
mod layer;
mod locked;
mod plan;
pub(crate) mod reserved;
mod service;

#[cfg(feature = "__fuzz")]
pub(crate) use self::cookie::{Codec, CookieConfig};
#[cfg(feature = "__fuzz")]
pub(crate) use self::data::Data;
#[cfg(feature = "oidc")]
pub(crate) use self::locked::{LockedError, SealContext, Write};
pub use self::{
    builder::SessionLayerBuilder,
    cookie::{ExpressSecrets, SameSite, SigningKeys},
    future::ResponseFuture,
    handle::Session,
    layer::SessionLayer,
    service::SessionService,
};
use crate::store::StoreError;

/// Errors a handler gets from [`Session`].
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SessionError {
    /// The store failed; the response will be replaced by the configured
    /// status (503 by default).
    #[error("session store unavailable")]
    Store(#[source] StoreError),
    /// A value did not (de)serialize.
    #[error("session value {key:?} could not be converted")]
    Serde {
        /// The key.
        key: String,
        /// What serde reported.
        #[source]
        source: serde_json::Error,
    },
    /// The data would exceed the size limit; nothing was changed.
    #[error("session data would be {size} bytes, over the limit of {limit}")]
    TooLarge {
        /// Serialized size the change would produce.
        size: usize,
        /// The configured limit.
        limit: usize,
    },
    /// The operation needs something the store lacks.
    #[error("unsupported: {0}")]
    Unsupported(&'static str),
    /// A value the session table cannot hold, refused before anything was
    /// changed: a NUL character in a user id or provider session id (Postgres
    /// text has none), or in a key or value of a `jsonb` column's data.
    #[error(
        "{what} holds a NUL character, which the session table cannot store; nothing was changed"
    )]
    Unstorable {
        /// What was refused, with its key if it has one (escaped).
        what: String,
    },
    /// Application code tried to write or remove a reserved key: the login
    /// guard's own (`oidc`, `oidc.login.*`) or the vault's (`vault.connect.*`),
    /// always reserved, or one reserved
    /// with [`SessionLayerBuilder::with_reserved_key`](super::SessionLayerBuilder::with_reserved_key). Nothing was changed.
    #[error("session key {key:?} is reserved; nothing was changed")]
    ReservedKey {
        /// The key.
        key: String,
    },
}
