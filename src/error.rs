//! Configuration errors, reported before any request or SQL runs.

/// A configuration value was rejected.
///
/// Every variant carries the offending input (secrets excepted) so the message
/// points at the exact setting to fix.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// A schema or table name is empty, too long, or has characters outside
    /// `[A-Za-z0-9_]` (a leading digit is also refused).
    #[error("invalid SQL identifier {name:?}: {reason}")]
    InvalidIdentifier {
        /// The rejected name.
        name: String,
        /// Why it was rejected.
        reason: &'static str,
    },
    /// A time zone name has characters no IANA zone name has.
    #[error("invalid time zone name {0:?}")]
    InvalidTimeZone(String),
    /// A cookie signing key is shorter than the minimum.
    #[error("cookie signing key {index} is {len} bytes; at least {min} are required")]
    KeyTooShort {
        /// Position of the key in the list (0 signs).
        index: usize,
        /// Its length in bytes.
        len: usize,
        /// The minimum length in bytes.
        min: usize,
    },
    /// No cookie signing key was given.
    #[error("at least one cookie signing key is required")]
    NoKeys,
    /// A cookie name is empty or has characters a cookie name may not have.
    #[error("invalid cookie name {0:?}")]
    InvalidCookieName(String),
    /// A cookie domain has characters a domain may not have.
    #[error("invalid cookie domain {0:?}")]
    InvalidCookieDomain(String),
    /// Settings contradict each other (or the table the store found).
    #[error("conflicting settings {}: {reason}", .settings.join(" and "))]
    Conflict {
        /// The settings involved, by the name of their setter.
        settings: Vec<&'static str>,
        /// Why they cannot go together.
        reason: &'static str,
    },
    /// A setting's value is out of its range.
    #[error("invalid value for {setting}: {reason}")]
    InvalidValue {
        /// Which setting, by the name of its setter.
        setting: &'static str,
        /// The range it must be in.
        reason: &'static str,
    },
    /// A URL setting does not parse or has the wrong form.
    #[error("invalid URL for {setting}: {value:?}")]
    InvalidUrl {
        /// Which setting.
        setting: &'static str,
        /// The rejected value.
        value: String,
    },
    /// Token encryption keys were rejected.
    #[cfg(feature = "oidc")]
    #[error("invalid token encryption keys")]
    #[cfg_attr(docsrs, doc(cfg(feature = "oidc")))]
    TokenKeys(#[from] crate::crypto::KeyError),
    /// A duration setting is out of range.
    #[error("invalid duration for {setting}: {reason}")]
    InvalidDuration {
        /// Which setting.
        setting: &'static str,
        /// Why it was rejected.
        reason: &'static str,
    },
}

impl ConfigError {
    /// `settings` contradict each other, because of `reason`.
    pub(crate) fn conflict(settings: &[&'static str], reason: &'static str) -> Self {
        Self::Conflict {
            settings: settings.to_vec(),
            reason,
        }
    }
}
