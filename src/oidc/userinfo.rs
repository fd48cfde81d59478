//! The userinfo endpoint (OpenID Connect Core 1.0, section 5.3): some
//! providers (`LemonLDAP::NG`, for one) put the profile claims only there.
//! Its `sub` must be the ID token's; its claims are merged under the ID
//! token's, which win. A signed answer (`application/jwt`) is verified
//! like an ID token: a key of the provider's set, an algorithm the client
//! expects, its `iss` and `aud`; an encrypted one is refused. A DPoP-bound
//! access token goes with a proof of the login's key.

use std::str::FromStr;

use openidconnect::{core::CoreJwsSigningAlgorithm, reqwest};
use serde_json::{Map, Value};

use super::{
    dpop::{DpopKey, Nonce},
    logout_token, AuthError, AuthErrorKind,
};

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

/// One userinfo request: where, and with which access token.
pub(crate) struct Request<'a> {
    pub(crate) http: &'a reqwest::Client,
    pub(crate) url: &'a str,
    pub(crate) access_token: &'a str,
    /// For a DPoP-bound token: the login's key, and the endpoint's latest
    /// nonce. `None`: a Bearer token.
    pub(crate) dpop: Option<(&'a DpopKey, &'a Nonce)>,
}

/// The userinfo answer: claims in JSON, or a JWT still to verify.
#[derive(Debug)]
pub(crate) enum Answer {
    Claims(Map<String, Value>),
    Signed(String),
}

/// Asks the userinfo endpoint for the user's claims.
pub(crate) async fn fetch(request: &Request<'_>) -> Result<Answer, AuthError> {
    let unavailable = |e: String| AuthError::new(AuthErrorKind::ProviderUnavailable, e);
    let response = send(request).await?;
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
    let body = response
        .bytes()
        .await
        .map_err(|e| unavailable(format!("userinfo: {}", super::error_chain(&e))))?;
    if body.len() > MAX_LEN {
        return Err(invalid("userinfo answer too large"));
    }
    if signed {
        let jwt = std::str::from_utf8(&body).map_err(|_| invalid("malformed signed userinfo"))?;
        return Ok(Answer::Signed(jwt.trim().to_owned()));
    }
    match serde_json::from_slice::<Value>(&body) {
        Ok(Value::Object(info)) => Ok(Answer::Claims(info)),
        _ => Err(invalid("userinfo answer is not a JSON object")),
    }
}

/// Sends the request; a DPoP-bound token goes with a proof, and once more
/// with the endpoint's nonce when it answers `use_dpop_nonce` (RFC 9449,
/// section 9).
async fn send(request: &Request<'_>) -> Result<reqwest::Response, AuthError> {
    let first = send_once(request, None).await?;
    let Some((_, nonce)) = request.dpop else {
        return Ok(first);
    };
    match asks_for_nonce(&first) {
        Some(fresh) => {
            nonce.set(fresh.clone());
            send_once(request, Some(&fresh)).await
        }
        None => Ok(first),
    }
}

async fn send_once(
    request: &Request<'_>,
    fresh_nonce: Option<&str>,
) -> Result<reqwest::Response, AuthError> {
    let mut req = request
        .http
        .get(request.url)
        .header(http::header::ACCEPT, "application/json, application/jwt");
    req = match request.dpop {
        Some((key, nonce)) => {
            let nonce = fresh_nonce.map(str::to_owned).or_else(|| nonce.get());
            let proof = key.proof(
                "GET",
                request.url,
                nonce.as_deref(),
                Some(request.access_token),
            );
            req.header(
                http::header::AUTHORIZATION,
                format!("DPoP {}", request.access_token),
            )
            .header("dpop", proof)
        }
        None => req.bearer_auth(request.access_token),
    };
    req.send().await.map_err(|e| {
        AuthError::new(
            AuthErrorKind::ProviderUnavailable,
            format!("userinfo: {}", super::error_chain(&e)),
        )
    })
}

/// The nonce of a resource server's `use_dpop_nonce` answer: a 401 whose
/// `WWW-Authenticate` names the error, with a `DPoP-Nonce`.
fn asks_for_nonce(response: &reqwest::Response) -> Option<String> {
    let headers = response.headers();
    let challenge = headers.get(http::header::WWW_AUTHENTICATE)?.to_str().ok()?;
    let nonce = headers.get("dpop-nonce")?.to_str().ok()?;
    (response.status() == http::StatusCode::UNAUTHORIZED && challenge.contains("use_dpop_nonce"))
        .then(|| nonce.to_owned())
}

/// What a signed userinfo answer must match (Core 1.0, section 5.3.2).
pub(crate) struct Expect<'a> {
    pub(crate) issuer: &'a str,
    pub(crate) client_id: &'a str,
    /// The algorithms the client expects; never `none`.
    pub(crate) algorithms: &'a [CoreJwsSigningAlgorithm],
}

/// Splits a signed answer and checks its header; the signature is then
/// verified against the provider's keys, and [`check_signed`] checks the
/// claims. An encrypted (JWE) answer is refused.
pub(crate) fn parse_signed<'a>(
    jwt: &'a str,
    expect: &Expect<'_>,
) -> Result<logout_token::Parsed<'a>, AuthError> {
    if jwt.split('.').count() == 5 {
        return Err(invalid("encrypted userinfo responses are not supported"));
    }
    logout_token::parse_jws(jwt, expect.algorithms, None).map_err(|e| {
        AuthError::new(
            AuthErrorKind::InvalidUserinfo,
            format!("signed userinfo: {e}"),
        )
    })
}

/// The claims of a signed answer whose signature is valid: `iss` must be the
/// issuer, and `aud`, when present, must name the client. The JWT's own
/// claims are left out of what is merged.
pub(crate) fn check_signed(
    parsed: &logout_token::Parsed<'_>,
    expect: &Expect<'_>,
) -> Result<Map<String, Value>, AuthError> {
    let mut claims = parsed
        .claims()
        .ok_or_else(|| invalid("signed userinfo: malformed claims"))?;
    if claims.get("iss").and_then(Value::as_str) != Some(expect.issuer) {
        return Err(invalid("signed userinfo: wrong issuer"));
    }
    let aud = claims.get("aud");
    if aud.is_some() && !logout_token::names_audience(aud, expect.client_id) {
        return Err(invalid("signed userinfo: wrong audience"));
    }
    for jwt_claim in ["iss", "aud", "exp", "iat", "nbf", "jti", "azp"] {
        claims.remove(jwt_claim);
    }
    Ok(claims)
}

pub(crate) fn invalid(detail: &str) -> AuthError {
    AuthError::new(AuthErrorKind::InvalidUserinfo, detail)
}

/// Merges `info` under `claims`; `sub` must be present and equal.
pub(crate) fn merge(
    claims: &mut Map<String, Value>,
    info: Map<String, Value>,
) -> Result<(), AuthError> {
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

    const EXPECT: Expect<'static> = Expect {
        issuer: "https://op.example",
        client_id: "demo",
        algorithms: &[CoreJwsSigningAlgorithm::RsaSsaPkcs1V15Sha256],
    };

    /// An unsigned JWT with `header` and `claims` and a fake signature.
    fn jwt(header: &Value, claims: &Value) -> String {
        use base64::{engine::general_purpose::URL_SAFE_NO_PAD as B64, Engine};
        let part = |v: &Value| B64.encode(v.to_string());
        format!("{}.{}.c2ln", part(header), part(claims))
    }

    #[test]
    fn signed_answers_need_the_issuer_the_client_and_an_expected_alg() {
        let rs = json!({"alg": "RS256", "kid": "k"});
        let check = |claims: Value| {
            let token = jwt(&rs, &claims);
            let parsed = parse_signed(&token, &EXPECT).expect("header accepted");
            check_signed(&parsed, &EXPECT).map_err(|e| e.to_string())
        };
        let ok = check(json!({"iss": "https://op.example", "aud": ["x", "demo"], "sub": "a"}))
            .expect("issuer and audience match");
        assert_eq!(ok, map(json!({"sub": "a"})), "the JWT's claims left out");
        assert!(check(json!({"iss": "https://op.example", "sub": "a"})).is_ok());
        let wrong_iss = check(json!({"iss": "https://evil.example", "sub": "a"}));
        assert!(wrong_iss.expect_err("refused").contains("wrong issuer"));
        assert!(check(json!({"sub": "a"}))
            .expect_err("refused")
            .contains("wrong issuer"));
        let wrong_aud = check(json!({"iss": "https://op.example", "aud": "other"}));
        assert!(wrong_aud.expect_err("refused").contains("wrong audience"));
        for header in [json!({"alg": "none"}), json!({"alg": "ES256"})] {
            let token = jwt(&header, &json!({}));
            let refused = parse_signed(&token, &EXPECT).expect_err("alg not expected");
            assert!(refused.to_string().contains("not allowed"), "{header}");
        }
        let jwe = parse_signed("h.k.iv.c.t", &EXPECT).expect_err("encrypted");
        assert!(jwe.to_string().contains("not supported"));
    }

    #[test]
    fn a_resource_servers_nonce_request_is_recognised() {
        let answer = |status: u16, challenge: &str, nonce: Option<&str>| {
            let mut r = http::Response::builder()
                .status(status)
                .header(http::header::WWW_AUTHENTICATE, challenge);
            if let Some(n) = nonce {
                r = r.header("dpop-nonce", n);
            }
            reqwest::Response::from(r.body("").expect("a response"))
        };
        let asks = r#"DPoP error="use_dpop_nonce", error_description="nonce""#;
        assert_eq!(
            asks_for_nonce(&answer(401, asks, Some("n1"))).as_deref(),
            Some("n1")
        );
        assert_eq!(asks_for_nonce(&answer(401, asks, None)), None);
        assert_eq!(
            asks_for_nonce(&answer(401, r#"DPoP error="invalid_token""#, Some("n1"))),
            None
        );
        assert_eq!(asks_for_nonce(&answer(400, asks, Some("n1"))), None);
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
