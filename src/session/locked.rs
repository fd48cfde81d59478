//! What the login guard and the vault need from a session beyond its keys:
//! the context that binds sealed values to it, and updates of one key under
//! the row lock.

use std::fmt;

#[cfg(feature = "oidc")]
use crate::crypto::Aad;

use super::SessionError;

/// What binds a value sealed for a session to that session's row, so that a
/// sealed value copied into another session does not open there. Opaque: the
/// row's storage key it holds never leaves the session module.
#[derive(Clone)]
#[cfg_attr(not(feature = "oidc"), allow(dead_code))]
pub(crate) struct SealContext(String);

impl SealContext {
    pub(crate) fn new(storage_key: String) -> Self {
        Self(storage_key)
    }

    /// The associated data for the session's `field`.
    #[cfg(feature = "oidc")]
    pub(crate) fn aad<'a>(&'a self, field: &'a str) -> Aad<'a> {
        Aad {
            session: &self.0,
            field,
        }
    }
}

impl fmt::Debug for SealContext {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SealContext([redacted])")
    }
}

/// What an update under the row lock writes under its key.
#[derive(Debug)]
#[cfg_attr(not(feature = "oidc"), allow(dead_code))]
pub(crate) enum Write<T> {
    /// Nothing: the row is left as it is.
    Keep,
    /// This value.
    Set(T),
    /// No value: the key is removed.
    Remove,
}

/// Why an update under the row lock did not complete.
#[derive(Debug)]
pub(crate) enum LockedError<E> {
    /// No live session row (expired, destroyed, or never saved).
    Gone,
    /// The store failed; nothing was written.
    Session(SessionError),
    /// The update itself failed; nothing was written.
    Update(E),
}
