//! Entry points for the `cargo fuzz` targets in `fuzz/`, behind the
//! `__fuzz` feature: not part of the API, no stability promise. Each takes
//! the fuzzer's input, runs one parser or checker with fixed keys, and
//! panics only when an invariant the crate relies on is broken.

use http::{header, HeaderMap, HeaderValue};
use openidconnect::core::{CoreJsonWebKeySet, CoreJwsSigningAlgorithm};

use crate::{
    crypto::{Aad, EncryptionKey, Keyring},
    oidc::{encode_location, logout_token, safe_return_to},
    session::{Codec, CookieConfig, Data, ExpressSecrets, SigningKeys},
};

/// The session cookie of a `Cookie` header in the crate's own format,
/// verified under a fixed key: a cookie this input could carry is never
/// accepted unless signed with it.
pub fn cookie_signed(header: &[u8]) {
    let keys = SigningKeys::new(["fuzz-signing-key-0123456789abcdef"]).expect("a long key");
    read(&CookieConfig::new(Codec::Signed(keys)), header);
}

/// The same for express-session's `s:<sid>.<signature>` format.
pub fn cookie_express(header: &[u8]) {
    let secrets = ExpressSecrets::new(["fuzz secret, not the test one"]).expect("a secret");
    read(&CookieConfig::new(Codec::Express(secrets)), header);
}

fn read(config: &CookieConfig, header: &[u8]) {
    let Ok(value) = HeaderValue::from_bytes(header) else {
        return;
    };
    let mut headers = HeaderMap::new();
    headers.append(header::COOKIE, value);
    if let Some((id, _)) = config.read(&headers, &config.name) {
        // An id this input got verified is one the key signed: it cannot
        // be forged, so the fuzzer never gets here without a real signature.
        panic!("a forged cookie verified: {id:?}");
    }
}

/// A sealed token envelope opened under a fixed key: the input as text, and
/// as the decoded envelope (so the fuzzer reaches past base64).
pub fn sealed(input: &[u8]) {
    use base64::{engine::general_purpose::URL_SAFE_NO_PAD, Engine};
    let keys = Keyring::from(EncryptionKey::from_bytes([7; 32]));
    let aad = Aad {
        session: "fuzz-session",
        field: "access_token",
    };
    if let Ok(text) = std::str::from_utf8(input) {
        let _ = keys.open(text, &aad);
    }
    let _ = keys.open(&URL_SAFE_NO_PAD.encode(input), &aad);
}

/// `return_to` as kept at login and sent back in `Location`: a local path
/// (no other origin, no control characters) that makes a valid header.
pub fn return_to(raw: &str) {
    let kept = safe_return_to(Some(raw));
    assert!(kept.starts_with('/'), "{kept:?}");
    assert!(!kept.starts_with("//") && !kept.contains('\\'), "{kept:?}");
    assert!(!kept.chars().any(char::is_control), "{kept:?}");
    let location = encode_location(&kept);
    assert!(location.is_ascii(), "{location:?}");
    assert!(HeaderValue::from_str(&location).is_ok(), "{location:?}");
}

/// A back-channel logout token: split and header-checked, its signature
/// verified against a fixed RSA key, and its claims checked whatever the
/// signature (so the fuzzer reaches the claims checks without forging).
pub fn logout_token(token: &str) {
    let jwks: CoreJsonWebKeySet =
        serde_json::from_str(FUZZ_JWKS).expect("the fixed key set parses");
    let algorithms = [CoreJwsSigningAlgorithm::RsaSsaPkcs1V15Sha256];
    let Ok(parsed) = logout_token::parse(token, &algorithms) else {
        return;
    };
    assert_ne!(
        parsed.verify(&jwks),
        logout_token::Signature::Valid,
        "a signature by a key no one has verified"
    );
    let expect = logout_token::Expect {
        issuer: "https://idp.example",
        client_id: "demo",
        skew: 60,
        now: 1_800_000_000,
    };
    let _ = parsed.check(&expect);
}

/// A `sess` column: whatever parses re-serializes to exactly the length
/// the size limit counts, and parses back to the same keys.
pub fn session_data(text: &str) {
    let Some(data) = Data::parse(text) else {
        return;
    };
    let json = data.to_json();
    assert_eq!(data.encoded_len(), json.len(), "{json}");
    let again = Data::parse(&json).expect("what was written parses");
    assert!(data.iter().map(|(k, _)| k).eq(again.iter().map(|(k, _)| k)));
}

/// The public half of a 2048-bit RSA key whose private half was thrown away.
const FUZZ_JWKS: &str = concat!(
    r#"{"keys":[{"kty":"RSA","kid":"fuzz","alg":"RS256","use":"sig","e":"AQAB","n":""#,
    "tWMVq7SiI8513KOp3-yA7bkk02aybdb3qb61tdTLEJ_0uOIVFpOCMbwOhLWeh899",
    "sUsNDohFoe24GXeVqoGoqfQcjKOS0UY9mH6_pvaSV09Z1j0D9b8z7nsPqzfq6Dd_",
    "FI0bLIigqFOlbt8xrwxTYc4p6ch02V6G7mv8gt4EoWRG_A2ftgA26s4mS864waru",
    "yIbHs9UdfDMnNFmQeeK5AmEf1BUreLoQtyLIFGUForOl6iJaTC-w_Y4rOi_iSA5K",
    "35RS3X5MH1NPf_0maSJjWQWe2PucI_mFqeoLGIdKqZvWm54y3CKC1uNWEEDDzCtI",
    "QMH1jApdXujzWsv3ijCMJw",
    r#""}]}"#
);
