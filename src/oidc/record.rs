//! What the guard keeps in the session: pending logins and the logged-in
//! user with sealed tokens.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

use crate::crypto::{Aad, Keyring};

/// Session key of the logged-in user.
pub(crate) const USER_KEY: &str = "oidc";
/// Prefix of the session keys of pending logins.
pub(crate) const PENDING_PREFIX: &str = "oidc.login.";

/// The session key of the login started with `state`: a digest, so that the
/// lookup leaks nothing about the state; the state itself is then compared in
/// constant time.
pub(crate) fn pending_key(state: &str) -> String {
    let digest = Sha256::digest(state.as_bytes());
    let hex: String = digest[..12].iter().map(|b| format!("{b:02x}")).collect();
    format!("{PENDING_PREFIX}{hex}")
}

/// A login between the redirect to the provider and the callback.
#[derive(Serialize, Deserialize)]
pub(crate) struct PendingLogin {
    pub(crate) state: String,
    pub(crate) nonce: String,
    /// The PKCE verifier, sealed.
    pub(crate) pkce: String,
    pub(crate) return_to: String,
    /// Unix milliseconds after which the callback is refused.
    pub(crate) exp_ms: i64,
    /// When it started, unix nanoseconds: the oldest goes first past the cap.
    #[serde(default)]
    pub(crate) started_ns: i64,
}

/// The logged-in user as stored: claims in clear, tokens sealed.
#[derive(Clone, Serialize, Deserialize)]
pub(crate) struct LoginRecord {
    pub(crate) sub: String,
    pub(crate) iss: String,
    pub(crate) claims: Map<String, Value>,
    #[serde(default)]
    pub(crate) groups: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) sid: Option<String>,
    /// The login's nonce: a refreshed ID token that carries one must match it.
    pub(crate) nonce: String,
    /// Access token, sealed.
    pub(crate) at: String,
    /// Refresh token, sealed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) rt: Option<String>,
    /// ID token, sealed (the `id_token_hint` of logout).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) idt: Option<String>,
    /// Access token expiry, unix seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) exp: Option<i64>,
}

pub(crate) const FIELD_ACCESS: &str = "access_token";
pub(crate) const FIELD_REFRESH: &str = "refresh_token";
pub(crate) const FIELD_ID: &str = "id_token";
pub(crate) const FIELD_PKCE: &str = "pkce_verifier";

pub(crate) fn seal(keys: &Keyring, binding: &str, field: &str, value: &str) -> String {
    keys.seal(
        value.as_bytes(),
        &Aad {
            session: binding,
            field,
        },
    )
}

/// Opens a sealed value; `None` when it does not open (tampered, moved to
/// another session or field, or sealed under a retired key). Also says
/// whether it should be re-sealed under the current key.
pub(crate) fn open(
    keys: &Keyring,
    binding: &str,
    field: &str,
    sealed: &str,
) -> Option<(String, bool)> {
    let opened = keys
        .open(
            sealed,
            &Aad {
                session: binding,
                field,
            },
        )
        .ok()?;
    let reseal = opened.needs_reseal();
    let text = String::from_utf8(opened.plaintext().to_vec()).ok()?;
    Some((text, reseal))
}

/// Groups from `cognito:groups` (Cognito) or `groups` (Keycloak with a group mapper, others).
pub(crate) fn groups_of(claims: &Map<String, Value>) -> Vec<String> {
    ["cognito:groups", "groups"]
        .iter()
        .find_map(|k| claims.get(*k).and_then(Value::as_array))
        .map(|a| {
            a.iter()
                .filter_map(|v| v.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

/// Keeps only same-origin relative paths: `/a/b?c` stays; `//evil`,
/// `/\evil`, absolute URLs, `javascript:` and anything with control
/// characters become `/`.
pub(crate) fn safe_return_to(raw: Option<&str>) -> String {
    let Some(raw) = raw else {
        return "/".to_owned();
    };
    let ok = raw.starts_with('/')
        && !raw.starts_with("//")
        && !raw.starts_with("/\\")
        && !raw.contains('\\')
        && !raw.chars().any(|c| c.is_control() || c.is_whitespace())
        && raw.len() <= 2048;
    if ok {
        raw.to_owned()
    } else {
        "/".to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn return_to_keeps_only_local_paths() {
        for (given, kept) in [
            (Some("/app/page?x=1#y"), "/app/page?x=1#y"),
            (Some("//evil.example"), "/"),
            (Some("/\\evil.example"), "/"),
            (Some("https://evil.example/"), "/"),
            (Some("javascript:alert(1)"), "/"),
            (Some("/ok\r\nSet-Cookie: x"), "/"),
            (Some("/a\\b"), "/"),
            (Some(""), "/"),
            (None, "/"),
        ] {
            assert_eq!(safe_return_to(given), kept, "{given:?}");
        }
    }

    #[test]
    fn pending_keys_hide_the_state() {
        let k = pending_key("some-state");
        assert!(k.starts_with(PENDING_PREFIX));
        assert!(!k.contains("some-state"));
        assert_ne!(k, pending_key("other-state"));
    }
}
