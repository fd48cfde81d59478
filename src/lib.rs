#![doc = include_str!("../README.md")]
#![cfg_attr(docsrs, feature(doc_cfg))]

#[macro_use]
mod macros;

pub mod admin;
#[cfg(feature = "oidc")]
#[cfg_attr(docsrs, doc(cfg(feature = "oidc")))]
pub mod crypto;
pub mod error;
#[cfg(feature = "__fuzz")]
#[doc(hidden)]
pub mod fuzz;
mod hex;
mod log_safe;
pub mod metrics;
#[cfg(feature = "oidc")]
#[cfg_attr(docsrs, doc(cfg(feature = "oidc")))]
pub mod oidc;
pub mod session;
pub mod store;
mod task;
#[cfg(feature = "oidc")]
#[cfg_attr(docsrs, doc(cfg(feature = "oidc")))]
pub mod vault;

pub use crate::{
    error::ConfigError,
    session::{
        ExpressSecrets, SameSite, Session, SessionError, SessionLayer, SessionLayerBuilder,
        SessionService, SigningKeys,
    },
    store::{PgStore, PgStoreConfig, Pooler, PruneConfig, PruneOutcome, Pruner, StoreError},
};
