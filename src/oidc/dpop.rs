//! DPoP (RFC 9449): tokens bound to a key pair of the login, so that a
//! stolen access or refresh token is useless without the key.
//!
//! Each login gets a P-256 key pair of its own, kept sealed with the login
//! (in the pending login, then in the login record; never in clear at
//! rest). The authorization request carries the key's thumbprint
//! (`dpop_jkt`), every token request (code and refresh) a proof signed with
//! it; a provider that answers `use_dpop_nonce` gets the request again once
//! with its nonce. An access token that names its key (`cnf.jkt`) must name
//! this one. [`AccessToken::dpop_proof`](super::AccessToken::dpop_proof)
//! makes the proofs for the application's own calls to resource servers.

use std::{
    fmt,
    sync::Mutex,
    time::{SystemTime, UNIX_EPOCH},
};

use base64::{engine::general_purpose::URL_SAFE_NO_PAD as B64, Engine};
use p256::ecdsa::{signature::Signer, Signature, SigningKey};
use rand::RngCore;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

/// A login's DPoP key pair. `Debug` shows the thumbprint only.
#[derive(Clone)]
pub(crate) struct DpopKey {
    key: SigningKey,
}

impl fmt::Debug for DpopKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DpopKey")
            .field("jkt", &self.thumbprint())
            .finish_non_exhaustive()
    }
}

impl DpopKey {
    /// A fresh key pair.
    pub(crate) fn generate() -> Self {
        loop {
            let mut bytes = Zeroizing::new([0u8; 32]);
            rand::rngs::OsRng.fill_bytes(&mut *bytes);
            // Out of range for P-256 with probability ~2^-32: draw again.
            if let Ok(key) = SigningKey::from_slice(&*bytes) {
                return Self { key };
            }
        }
    }

    /// The private key as kept, sealed, with the login.
    pub(crate) fn to_secret(&self) -> Zeroizing<String> {
        Zeroizing::new(B64.encode(self.key.to_bytes()))
    }

    /// The key kept with a login; `None` when it does not parse.
    pub(crate) fn from_secret(secret: &str) -> Option<Self> {
        let bytes = Zeroizing::new(B64.decode(secret).ok()?);
        SigningKey::from_slice(&bytes).ok().map(|key| Self { key })
    }

    /// The public key as a JWK (members in RFC 7638's order).
    fn jwk(&self) -> Value {
        ec_public_jwk(&self.key)
    }

    /// The JWK thumbprint (RFC 7638): the `dpop_jkt` and `cnf.jkt` of tokens
    /// bound to this key.
    pub(crate) fn thumbprint(&self) -> String {
        // serde_json writes object members sorted: the canonical form.
        B64.encode(Sha256::digest(self.jwk().to_string().as_bytes()))
    }

    /// A proof for one request: `method` to `url` (its query and fragment
    /// are left out), with the server's `nonce` and, for a resource server,
    /// the hash of the `access_token` it carries.
    pub(crate) fn proof(
        &self,
        method: &str,
        url: &str,
        nonce: Option<&str>,
        access_token: Option<&str>,
    ) -> String {
        let header = json!({"typ": "dpop+jwt", "alg": "ES256", "jwk": self.jwk()});
        let mut jti = [0u8; 16];
        rand::rngs::OsRng.fill_bytes(&mut jti);
        let iat = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let htu = url.split(['?', '#']).next().unwrap_or(url);
        let mut claims = json!({"jti": B64.encode(jti), "htm": method, "htu": htu, "iat": iat});
        if let Some(nonce) = nonce {
            claims["nonce"] = json!(nonce);
        }
        if let Some(at) = access_token {
            claims["ath"] = json!(B64.encode(Sha256::digest(at.as_bytes())));
        }
        let input = format!(
            "{}.{}",
            B64.encode(header.to_string()),
            B64.encode(claims.to_string())
        );
        let signature: Signature = self.key.sign(input.as_bytes());
        format!("{input}.{}", B64.encode(signature.to_bytes()))
    }

    /// Whether an access token may be used with this key: one that names a
    /// key (a JWT with `cnf.jkt`) must name this one; an opaque token or one
    /// without `cnf` says nothing, and the provider checks the binding.
    pub(crate) fn binds(&self, access_token: &str) -> bool {
        let mut parts = access_token.split('.');
        let (Some(_), Some(payload), Some(_), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return true;
        };
        let Some(claims) = B64
            .decode(payload)
            .ok()
            .and_then(|p| serde_json::from_slice::<Value>(&p).ok())
        else {
            return true;
        };
        match claims.pointer("/cnf/jkt").and_then(Value::as_str) {
            Some(jkt) => super::constant_eq(jkt, &self.thumbprint()),
            None => true,
        }
    }
}

/// The latest nonce a server gave, shared by the attempts of one request.
#[derive(Default)]
pub(crate) struct Nonce(Mutex<Option<String>>);

impl Nonce {
    pub(crate) fn get(&self) -> Option<String> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    pub(crate) fn set(&self, nonce: String) {
        *self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(nonce);
    }
}

/// The public half of a P-256 key as a JWK, only the members RFC 7638's
/// thumbprint takes.
pub(crate) fn ec_public_jwk(key: &SigningKey) -> Value {
    let point = key.verifying_key().to_sec1_point(false);
    json!({
        "crv": "P-256",
        "kty": "EC",
        "x": B64.encode(point.x().map(AsRef::<[u8]>::as_ref).unwrap_or_default()),
        "y": B64.encode(point.y().map(AsRef::<[u8]>::as_ref).unwrap_or_default()),
    })
}

/// An HTTP client for token requests that signs each with the login's key.
pub(crate) struct DpopClient<'a> {
    pub(crate) http: &'a openidconnect::reqwest::Client,
    pub(crate) key: &'a DpopKey,
    /// The provider's latest nonce, kept across requests: one
    /// `use_dpop_nonce` round trip per nonce, not per request.
    pub(crate) nonce: &'a Nonce,
}

type Sent = Result<
    openidconnect::HttpResponse,
    openidconnect::HttpClientError<openidconnect::reqwest::Error>,
>;

impl<'c> openidconnect::AsyncHttpClient<'c> for DpopClient<'_> {
    type Error = openidconnect::HttpClientError<openidconnect::reqwest::Error>;
    type Future = std::pin::Pin<Box<dyn std::future::Future<Output = Sent> + Send + Sync + 'c>>;

    fn call(&'c self, request: openidconnect::HttpRequest) -> Self::Future {
        Box::pin(send(self.http, self.key, self.nonce, request))
    }
}

/// Sends a token request with a DPoP proof; when the provider answers
/// `use_dpop_nonce` with a `DPoP-Nonce`, once more with that nonce.
pub(crate) async fn send(
    http: &openidconnect::reqwest::Client,
    key: &DpopKey,
    nonce: &Nonce,
    request: openidconnect::HttpRequest,
) -> Result<
    openidconnect::HttpResponse,
    openidconnect::HttpClientError<openidconnect::reqwest::Error>,
> {
    let mut response = send_once(http, key, nonce.get().as_deref(), request.clone()).await?;
    if let Some(fresh) = asks_for_nonce(&response) {
        nonce.set(fresh.clone());
        response = send_once(http, key, Some(&fresh), request).await?;
    }
    Ok(response)
}

async fn send_once(
    http: &openidconnect::reqwest::Client,
    key: &DpopKey,
    nonce: Option<&str>,
    mut request: openidconnect::HttpRequest,
) -> Result<
    openidconnect::HttpResponse,
    openidconnect::HttpClientError<openidconnect::reqwest::Error>,
> {
    let proof = key.proof(
        request.method().as_str(),
        &request.uri().to_string(),
        nonce,
        None,
    );
    if let Ok(value) = http::HeaderValue::from_str(&proof) {
        request.headers_mut().insert("dpop", value);
    }
    let request = openidconnect::reqwest::Request::try_from(request)
        .map_err(|e| openidconnect::HttpClientError::Reqwest(Box::new(e)))?;
    let response = http
        .execute(request)
        .await
        .map_err(|e| openidconnect::HttpClientError::Reqwest(Box::new(e)))?;
    let mut out = http::Response::builder().status(response.status());
    for (name, value) in response.headers() {
        out = out.header(name, value);
    }
    let body = response
        .bytes()
        .await
        .map_err(|e| openidconnect::HttpClientError::Reqwest(Box::new(e)))?;
    out.body(body.to_vec())
        .map_err(openidconnect::HttpClientError::Http)
}

/// The nonce of a `use_dpop_nonce` answer.
fn asks_for_nonce(response: &openidconnect::HttpResponse) -> Option<String> {
    let nonce = response.headers().get("dpop-nonce")?.to_str().ok()?;
    let body: Value = serde_json::from_slice(response.body()).ok()?;
    (body["error"] == "use_dpop_nonce").then(|| nonce.to_owned())
}

#[cfg(test)]
mod tests {
    use p256::ecdsa::signature::Verifier;

    use super::*;

    /// A JWT part, decoded.
    fn part(p: &str) -> Value {
        serde_json::from_slice(&B64.decode(p).expect("base64url")).expect("JSON")
    }

    #[test]
    fn a_proof_verifies_under_its_jwk_and_names_the_request() {
        let key = DpopKey::generate();
        let proof = key.proof(
            "POST",
            "https://op.example/token?x=1#f",
            Some("n1"),
            Some("at"),
        );
        let parts: Vec<&str> = proof.split('.').collect();
        let header: Value = part(parts[0]);
        let claims: Value = part(parts[1]);
        assert_eq!(header["typ"], "dpop+jwt");
        assert_eq!(claims["htu"], "https://op.example/token");
        assert_eq!(claims["htm"], "POST");
        assert_eq!(claims["nonce"], "n1");
        assert_eq!(claims["ath"], B64.encode(Sha256::digest(b"at")));
        // The key in the header is the one that signed (the provider checks
        // the same against its own JWK parser in the integration tests).
        assert_eq!(header["jwk"], key.jwk());
        let verifying = key.key.verifying_key();
        let signature =
            Signature::from_slice(&B64.decode(parts[2]).expect("base64url")).expect("a signature");
        let input = format!("{}.{}", parts[0], parts[1]);
        assert!(verifying.verify(input.as_bytes(), &signature).is_ok());
        // A fresh jti each time.
        let again = key.proof("POST", "https://op.example/token", None, None);
        let jti = |p: &str| part(p.split('.').nth(1).expect("a payload"))["jti"].clone();
        assert_ne!(jti(&proof), jti(&again));
    }

    #[test]
    fn the_key_survives_its_secret_form_and_binds_only_its_tokens() {
        let key = DpopKey::generate();
        let back = DpopKey::from_secret(&key.to_secret()).expect("as built");
        assert_eq!(key.thumbprint(), back.thumbprint());
        assert!(DpopKey::from_secret("not a key").is_none());
        let token = |jkt: &str| {
            format!(
                "e30.{}.sig",
                B64.encode(json!({"cnf": {"jkt": jkt}}).to_string())
            )
        };
        assert!(key.binds(&token(&key.thumbprint())));
        assert!(!key.binds(&token(&DpopKey::generate().thumbprint())));
        assert!(key.binds("opaque-token"));
        assert!(!format!("{key:?}").contains(key.to_secret().as_str()));
    }
}
