//! Back-channel logout tokens (OpenID Connect Back-Channel Logout 1.0,
//! section 2.6), the checks that need no I/O: the compact JWS is split and
//! its header checked, the signature verified against a key set, the claims
//! checked against the issuer, the client and the clock. Fetching keys and
//! remembering `jti` stay with the client.

use base64::{engine::general_purpose::URL_SAFE_NO_PAD, Engine};
use openidconnect::{
    core::{CoreJsonWebKey, CoreJsonWebKeySet, CoreJwsSigningAlgorithm},
    JsonWebKey,
};
use serde_json::{Map, Value};
use time::OffsetDateTime;

/// Longer tokens are refused before anything is decoded: a real one is a
/// few hundred bytes, and decoding allocates in proportion.
pub(crate) const MAX_TOKEN_LEN: usize = 16 * 1024;

/// Logout tokens older than this are refused (their `jti` is remembered for
/// as long, so a replay is caught either way).
pub(crate) const MAX_AGE_SECS: i64 = 600;

/// A logout token split and its header checked; the signature not yet.
#[derive(Debug)]
pub(crate) struct Parsed<'a> {
    alg: CoreJwsSigningAlgorithm,
    kid: Option<String>,
    /// `header.payload`, what the signature covers.
    message: &'a [u8],
    payload: &'a str,
    signature: Vec<u8>,
}

/// The outcome of the signature check.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Signature {
    Valid,
    /// No key of the set has the token's key id: the set may be stale.
    NoKey,
    Invalid,
}

/// What the claims must match.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Expect<'a> {
    pub(crate) issuer: &'a str,
    pub(crate) client_id: &'a str,
    /// Tolerated clock difference, seconds.
    pub(crate) skew: i64,
    /// Unix seconds.
    pub(crate) now: i64,
}

/// Claims that passed every check, and until when their `jti` is remembered.
#[derive(Debug)]
pub(crate) struct Checked {
    pub(crate) claims: Map<String, Value>,
    pub(crate) jti: String,
    pub(crate) keep_until: OffsetDateTime,
}

/// Splits `token` and checks its header: three parts, a `typ` (when
/// present) of a logout token, an allowed algorithm, a decodable signature.
pub(crate) fn parse<'a>(
    token: &'a str,
    algorithms: &[CoreJwsSigningAlgorithm],
) -> Result<Parsed<'a>, &'static str> {
    // Explicit typing (section 2.4): a token typed as anything else (an
    // access token, a security event) is not a logout token. The generic
    // `JWT` of providers that predate the recommendation is accepted.
    parse_jws(token, algorithms, Some(&["logout+jwt", "jwt"]))
}

/// Splits a compact JWS and checks its header: three parts, a `typ` (when
/// present and `typs` given) among `typs`, an allowed algorithm, a decodable
/// signature. Signed userinfo answers are checked with it too.
pub(crate) fn parse_jws<'a>(
    token: &'a str,
    algorithms: &[CoreJwsSigningAlgorithm],
    typs: Option<&[&str]>,
) -> Result<Parsed<'a>, &'static str> {
    if token.len() > MAX_TOKEN_LEN {
        return Err("too long");
    }
    let mut parts = token.split('.');
    let (Some(h), Some(payload), Some(sig), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err("not a signed JWT");
    };
    let header: Map<String, Value> = decode_json(h).ok_or("malformed header")?;
    if let (Some(typ), Some(typs)) = (header.get("typ"), typs) {
        let typ = typ.as_str().unwrap_or_default().to_ascii_lowercase();
        let typ = typ.strip_prefix("application/").unwrap_or(&typ);
        if !typs.contains(&typ) {
            return Err("typ is not logout+jwt");
        }
    }
    let alg: CoreJwsSigningAlgorithm =
        serde_json::from_value(header.get("alg").cloned().unwrap_or_default())
            .map_err(|_| "unknown signature algorithm")?;
    if !algorithms.contains(&alg) {
        return Err("signature algorithm not allowed");
    }
    let signature = URL_SAFE_NO_PAD
        .decode(sig)
        .map_err(|_| "malformed signature")?;
    Ok(Parsed {
        alg,
        kid: header.get("kid").and_then(Value::as_str).map(str::to_owned),
        message: &token.as_bytes()[..h.len() + 1 + payload.len()],
        payload,
        signature,
    })
}

impl Parsed<'_> {
    /// Whether it is keyed with a shared secret (HMAC) rather than signed
    /// with one of the provider's keys.
    pub(crate) fn is_hmac(&self) -> bool {
        use CoreJwsSigningAlgorithm as Alg;
        matches!(
            self.alg,
            Alg::HmacSha256 | Alg::HmacSha384 | Alg::HmacSha512
        )
    }

    /// Verifies an HMAC keyed with `secret` (the client secret).
    pub(crate) fn verify_hmac(&self, secret: &str) -> bool {
        CoreJsonWebKey::new_symmetric(secret.as_bytes().to_vec())
            .verify_signature(&self.alg, self.message, &self.signature)
            .is_ok()
    }

    /// Verifies the signature with the keys of `jwks` that match its key id.
    pub(crate) fn verify(&self, jwks: &CoreJsonWebKeySet) -> Signature {
        let kid = self.kid.as_deref();
        let mut candidates = jwks
            .keys()
            .iter()
            .filter(|k| kid.is_none() || k.key_id().map(|id| id.as_str()) == kid)
            .peekable();
        if candidates.peek().is_none() {
            return Signature::NoKey;
        }
        let valid = |k: &CoreJsonWebKey| {
            k.verify_signature(&self.alg, self.message, &self.signature)
                .is_ok()
        };
        if candidates.any(valid) {
            Signature::Valid
        } else {
            Signature::Invalid
        }
    }

    /// The payload's claims, checked (call only once the signature is valid).
    pub(crate) fn check(&self, expect: &Expect<'_>) -> Result<Checked, &'static str> {
        check_claims(self.claims().ok_or("malformed claims")?, expect)
    }

    /// The payload's claims, unchecked; `None` when not a JSON object.
    pub(crate) fn claims(&self) -> Option<Map<String, Value>> {
        decode_json(self.payload)
    }
}

/// The claims checks of section 2.6, with `exp` required as section 2.4 says.
pub(crate) fn check_claims(
    claims: Map<String, Value>,
    expect: &Expect<'_>,
) -> Result<Checked, &'static str> {
    if claims.get("iss").and_then(Value::as_str) != Some(expect.issuer) {
        return Err("wrong issuer");
    }
    if !names_audience(claims.get("aud"), expect.client_id) {
        return Err("wrong audience");
    }
    let (now, skew) = (expect.now, expect.skew);
    let iat = claims.get("iat").and_then(Value::as_i64).ok_or("no iat")?;
    if iat > now.saturating_add(skew) || iat < now.saturating_sub(MAX_AGE_SECS).saturating_sub(skew)
    {
        return Err("iat out of range");
    }
    let exp = claims.get("exp").and_then(Value::as_i64).ok_or("no exp")?;
    if exp < now.saturating_sub(skew) {
        return Err("expired");
    }
    let event_ok = claims
        .get("events")
        .and_then(Value::as_object)
        .and_then(|e| e.get("http://schemas.openid.net/event/backchannel-logout"))
        .is_some_and(Value::is_object);
    if !event_ok {
        return Err("no back-channel logout event");
    }
    if claims.contains_key("nonce") {
        return Err("a logout token must not carry a nonce");
    }
    let has = |k: &str| {
        claims
            .get(k)
            .and_then(Value::as_str)
            .is_some_and(|s| !s.is_empty())
    };
    if !has("sid") && !has("sub") {
        return Err("neither sid nor sub");
    }
    let jti = claims
        .get("jti")
        .and_then(Value::as_str)
        .ok_or("no jti")?
        .to_owned();
    let keep_until = iat
        .saturating_add(MAX_AGE_SECS)
        .saturating_add(skew.saturating_mul(2));
    let keep_until = OffsetDateTime::from_unix_timestamp(keep_until)
        .unwrap_or_else(|_| OffsetDateTime::now_utc());
    Ok(Checked {
        claims,
        jti,
        keep_until,
    })
}

/// Whether an `aud` claim (a string or a list) names `client_id`.
pub(crate) fn names_audience(aud: Option<&Value>, client_id: &str) -> bool {
    match aud {
        Some(Value::String(a)) => a == client_id,
        Some(Value::Array(list)) => list.iter().any(|a| a.as_str() == Some(client_id)),
        _ => false,
    }
}

fn decode_json<T: serde::de::DeserializeOwned>(part: &str) -> Option<T> {
    let bytes = URL_SAFE_NO_PAD.decode(part.trim_end_matches('=')).ok()?;
    serde_json::from_slice(&bytes).ok()
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    const EXPECT: Expect<'static> = Expect {
        issuer: "https://idp.example",
        client_id: "demo",
        skew: 60,
        now: 1_800_000_000,
    };

    fn claims(patch: Value) -> Map<String, Value> {
        let mut c = json!({
            "iss": "https://idp.example", "aud": "demo", "iat": 1_800_000_000_i64,
            "exp": 1_800_000_120_i64, "jti": "j", "sid": "s",
            "events": {"http://schemas.openid.net/event/backchannel-logout": {}},
        });
        for (k, v) in patch.as_object().expect("object") {
            match v {
                Value::Null => c.as_object_mut().expect("object").remove(k),
                v => c
                    .as_object_mut()
                    .expect("object")
                    .insert(k.clone(), v.clone()),
            };
        }
        c.as_object().expect("object").clone()
    }

    #[test]
    fn extreme_times_are_refused_without_overflow() {
        assert!(check_claims(claims(json!({})), &EXPECT).is_ok());
        for (patch, why) in [
            (json!({"iat": i64::MIN}), "iat out of range"),
            (json!({"iat": i64::MAX}), "iat out of range"),
            (json!({"exp": i64::MIN}), "expired"),
            (json!({"exp": null}), "no exp"),
            (json!({"exp": 1.5e300}), "no exp"),
        ] {
            let got = check_claims(claims(patch.clone()), &EXPECT).map(|_| ());
            assert_eq!(got, Err(why), "{patch}");
        }
        let far = Expect {
            now: i64::MAX,
            skew: i64::MAX,
            ..EXPECT
        };
        let _ = check_claims(claims(json!({"iat": i64::MAX, "exp": i64::MAX})), &far);
    }

    #[test]
    fn oversized_tokens_are_refused_before_decoding() {
        let algs = [CoreJwsSigningAlgorithm::RsaSsaPkcs1V15Sha256];
        let huge = format!("{}.{}.{}", "a".repeat(MAX_TOKEN_LEN), "b", "c");
        assert_eq!(parse(&huge, &algs).map(|_| ()), Err("too long"));
        assert_eq!(parse("a.b", &algs).map(|_| ()), Err("not a signed JWT"));
    }
}
