//! The userinfo endpoint (OpenID Connect Core 1.0, section 5.3): some
//! providers (`LemonLDAP::NG`, for one) put the profile claims only there.
//! Its `sub` must be the ID token's; its claims are merged under the ID
//! token's, which win.

use std::str::FromStr;

use openidconnect::reqwest;
use serde_json::{Map, Value};

use super::{AuthError, AuthErrorKind};

/// When the login asks the userinfo endpoint for the user's claims.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum UserinfoMode {
    /// When the ID token lacks a claim of a requested `profile` or `email`
    /// scope (`name`, `email`).
    #[default]
    Auto,
    /// At every login and every refresh.
    On,
    /// Never.
    Off,
}

/// An unknown [`UserinfoMode`] name.
#[derive(Debug, thiserror::Error)]
#[error("userinfo mode must be auto, on or off, not {0:?}")]
pub struct UnknownUserinfoMode(String);

impl FromStr for UserinfoMode {
    type Err = UnknownUserinfoMode;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "auto" | "" => Ok(Self::Auto),
            "on" => Ok(Self::On),
            "off" => Ok(Self::Off),
            _ => Err(UnknownUserinfoMode(s.to_owned())),
        }
    }
}

impl UserinfoMode {
    /// Whether to fetch userinfo for an ID token with `claims`, given the
    /// requested `scopes`.
    pub(crate) fn wants(self, scopes: &[String], claims: &Map<String, Value>) -> bool {
        let lacks = |scope: &str, claim: &str| {
            scopes.iter().any(|s| s == scope) && !claims.contains_key(claim)
        };
        match self {
            Self::On => true,
            Self::Off => false,
            Self::Auto => lacks("profile", "name") || lacks("email", "email"),
        }
    }
}

/// The largest userinfo answer read: a real one is a few hundred bytes.
const MAX_LEN: usize = 64 * 1024;

/// Asks `url` for the user's claims with `access_token`, and merges them
/// into `claims` (the ID token's), which win. A different `sub` is refused.
pub(crate) async fn fetch_and_merge(
    http: &reqwest::Client,
    url: &str,
    access_token: &str,
    claims: &mut Map<String, Value>,
) -> Result<(), AuthError> {
    let unavailable = |e: String| AuthError::new(AuthErrorKind::ProviderUnavailable, e);
    let response = http
        .get(url)
        .bearer_auth(access_token)
        .header(http::header::ACCEPT, "application/json")
        .send()
        .await
        .map_err(|e| unavailable(format!("userinfo: {}", super::error_chain(&e))))?;
    if !response.status().is_success() {
        return Err(unavailable(format!(
            "userinfo answered {}",
            response.status()
        )));
    }
    let signed = response
        .headers()
        .get(http::header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/jwt"));
    if signed {
        // Signed userinfo needs a per-client registration; refuse rather
        // than trust claims nobody verified.
        return Err(invalid("signed userinfo responses are not accepted"));
    }
    let body = response
        .bytes()
        .await
        .map_err(|e| unavailable(format!("userinfo: {}", super::error_chain(&e))))?;
    if body.len() > MAX_LEN {
        return Err(invalid("userinfo answer too large"));
    }
    let Ok(Value::Object(info)) = serde_json::from_slice::<Value>(&body) else {
        return Err(invalid("userinfo answer is not a JSON object"));
    };
    merge(claims, info)
}

fn invalid(detail: &str) -> AuthError {
    AuthError::new(AuthErrorKind::InvalidUserinfo, detail)
}

/// Merges `info` under `claims`; `sub` must be present and equal.
fn merge(claims: &mut Map<String, Value>, info: Map<String, Value>) -> Result<(), AuthError> {
    match (claims.get("sub"), info.get("sub")) {
        (Some(a), Some(b)) if a == b => {}
        _ => return Err(invalid("userinfo names another subject")),
    }
    for (k, v) in info {
        claims.entry(k).or_insert(v);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn map(v: Value) -> Map<String, Value> {
        v.as_object().expect("an object").clone()
    }

    #[test]
    fn id_token_claims_win_and_a_different_sub_is_refused() {
        let mut c = map(json!({"sub": "a", "name": "From ID token"}));
        merge(
            &mut c,
            map(json!({"sub": "a", "name": "x", "email": "a@e"})),
        )
        .expect("same subject");
        assert_eq!(c["name"], "From ID token");
        assert_eq!(c["email"], "a@e");
        let mut c = map(json!({"sub": "a"}));
        assert!(merge(&mut c, map(json!({"sub": "b", "email": "b@e"}))).is_err());
        assert!(merge(&mut c, map(json!({"email": "b@e"}))).is_err());
        assert!(!c.contains_key("email"), "nothing merged");
    }

    #[test]
    fn auto_fetches_only_for_missing_requested_claims() {
        let scopes = ["openid".to_owned(), "profile".into(), "email".into()];
        let full = map(json!({"sub": "a", "name": "A", "email": "a@e"}));
        let bare = map(json!({"sub": "a"}));
        assert!(!UserinfoMode::Auto.wants(&scopes, &full));
        assert!(UserinfoMode::Auto.wants(&scopes, &bare));
        assert!(!UserinfoMode::Auto.wants(&scopes[..1], &bare));
        assert!(UserinfoMode::On.wants(&scopes, &full));
        assert!(!UserinfoMode::Off.wants(&scopes, &bare));
        assert_eq!("ON".parse::<UserinfoMode>().ok(), Some(UserinfoMode::On));
        assert!("sometimes".parse::<UserinfoMode>().is_err());
    }
}
