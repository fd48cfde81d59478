#![doc = include_str!("../README.md")]
#![cfg_attr(docsrs, feature(doc_cfg))]

pub mod error;
pub mod session;
pub mod store;

pub use crate::{
    error::ConfigError,
    session::{SameSite, Session, SessionError, SessionLayer, SessionService, SigningKeys},
    store::{PgStore, PgStoreConfig, PruneConfig, PruneOutcome, Pruner, StoreError},
};
