//! Session keys that application code may not write: what the login guard
//! trusts lives there, and a handler that stores client-chosen keys must
//! not be able to replace it.
//!
//! Always reserved, with or without the `oidc` feature (one table may be
//! shared by builds with and without it): [`USER_KEY`] and every key
//! starting with [`PENDING_PREFIX`] or [`CONNECT_PREFIX`]. An application adds its own with
//! [`SessionLayerBuilder::with_reserved_key`](super::SessionLayerBuilder::with_reserved_key),
//! e.g. Passport's `passport` next to an Express app.

/// Session key of the logged-in user (the sealed login record).
pub(crate) const USER_KEY: &str = "oidc";
/// Prefix of the session keys of pending logins.
pub(crate) const PENDING_PREFIX: &str = "oidc.login.";

/// Prefix of the session keys of the token vault's pending account
/// connections.
pub(crate) const CONNECT_PREFIX: &str = "vault.connect.";

/// Whether application code is refused `key`: the crate's own keys, and
/// the `extra` ones the application reserved.
pub(crate) fn is_reserved(key: &str, extra: &[String]) -> bool {
    key == USER_KEY
        || key.starts_with(PENDING_PREFIX)
        || key.starts_with(CONNECT_PREFIX)
        || extra.iter().any(|k| k == key)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_login_keys_and_the_extra_ones_are_reserved() {
        let extra = vec!["passport".to_owned()];
        for key in [
            "oidc",
            "oidc.login.",
            "oidc.login.0a1b",
            "vault.connect.0a",
            "passport",
        ] {
            assert!(is_reserved(key, &extra), "{key}");
        }
        for key in [
            "oidc2",
            "Oidc",
            "oidc.login",
            "vault.connect",
            "passport.user",
            "count",
            "",
        ] {
            assert!(!is_reserved(key, &extra), "{key}");
        }
        assert!(!is_reserved("passport", &[]));
    }
}
