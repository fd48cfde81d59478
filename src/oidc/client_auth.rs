//! How the client authenticates to the provider's token, revocation and PAR
//! endpoints (OpenID Connect Core §9): HTTP Basic, the form body, or a JWT
//! signed with the client secret or the client's private key (RFC 7523).

use base64::{engine::general_purpose::URL_SAFE_NO_PAD, Engine};
use hmac::{Hmac, Mac};
use openidconnect::{core::CoreClientAuthMethod, reqwest::RequestBuilder, AuthType};
use rand::RngCore;
use sha2::Sha256;
use time::OffsetDateTime;

use super::client::urlencode;
use rsa::{
    pkcs8::DecodePrivateKey,
    signature::{RandomizedSigner, SignatureEncoding},
    traits::PublicKeyParts,
    RsaPrivateKey,
};

/// A client authentication method
/// ([`OidcConfig::with_client_auth`](super::OidcConfig::with_client_auth)).
/// Unset, it is chosen from the provider's
/// `token_endpoint_auth_methods_supported`: `client_secret_basic`, else
/// `client_secret_post`, else `client_secret_jwt`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ClientAuth {
    /// `client_secret_basic`: the secret in an HTTP Basic header.
    SecretBasic,
    /// `client_secret_post`: the secret in the form body.
    SecretPost,
    /// `client_secret_jwt`: a short-lived HS256 assertion keyed with the
    /// secret, so the secret itself never travels.
    SecretJwt,
    /// `private_key_jwt`: an assertion signed with the first key of
    /// [`OidcConfig::with_client_keys`](super::OidcConfig::with_client_keys).
    PrivateKeyJwt,
}

/// How a [`ClientKey`] signs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum KeyAlg {
    /// RSASSA-PKCS1-v1_5 with SHA-256.
    Rs256,
    /// RSASSA-PSS with SHA-256.
    Ps256,
    /// ECDSA with P-256 and SHA-256.
    Es256,
}

impl KeyAlg {
    fn name(self) -> &'static str {
        match self {
            Self::Rs256 => "RS256",
            Self::Ps256 => "PS256",
            Self::Es256 => "ES256",
        }
    }
}

/// A private key for `private_key_jwt`, read from configuration.
#[derive(Clone)]
pub struct ClientKey {
    key: Material,
    alg: KeyAlg,
    kid: String,
}

/// The private key itself; both kinds zeroize on drop.
#[derive(Clone)]
enum Material {
    Rsa(Box<RsaPrivateKey>),
    P256(p256::ecdsa::SigningKey),
}

impl std::fmt::Debug for ClientKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientKey")
            .field("alg", &self.alg)
            .field("kid", &self.kid)
            .finish_non_exhaustive()
    }
}

/// A key that cannot be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientKeyError {
    /// Not a PKCS#8 PEM RSA private key.
    #[error("not a PKCS#8 PEM RSA private key: {0}")]
    Pem(String),
    /// Not a PKCS#8 PEM P-256 private key (for [`KeyAlg::Es256`]).
    #[error("not a PKCS#8 PEM P-256 private key: {0}")]
    EcPem(String),
    /// An RSA key shorter than 2048 bits.
    #[error("RSA keys need at least 2048 bits, this one has {0}")]
    TooShort(usize),
}

impl ClientKey {
    /// A PKCS#8 PEM private key (`-----BEGIN PRIVATE KEY-----`) that signs
    /// with `alg`: RSA for [`KeyAlg::Rs256`] and [`KeyAlg::Ps256`], P-256
    /// for [`KeyAlg::Es256`]. Its key id is its RFC 7638 thumbprint.
    ///
    /// # Errors
    /// [`ClientKeyError`] for anything else, or an RSA key under 2048 bits.
    pub fn from_pem(pem: &str, alg: KeyAlg) -> Result<Self, ClientKeyError> {
        let key = match alg {
            KeyAlg::Rs256 | KeyAlg::Ps256 => Material::Rsa(Box::new(rsa_from_pem(pem)?)),
            KeyAlg::Es256 => {
                use p256::pkcs8::DecodePrivateKey as _;
                Material::P256(
                    p256::ecdsa::SigningKey::from_pkcs8_pem(pem)
                        .map_err(|e| ClientKeyError::EcPem(e.to_string()))?,
                )
            }
        };
        let thumb = key.public_members().to_string();
        let kid = URL_SAFE_NO_PAD.encode(<Sha256 as sha2::Digest>::digest(thumb.as_bytes()));
        Ok(Self { key, alg, kid })
    }

    /// As [`Self::from_pem`], the algorithm from the key: RS256 for an RSA
    /// key, ES256 for a P-256 one.
    ///
    /// # Errors
    /// [`ClientKeyError`] when it is neither (the RSA parser's message), or
    /// an RSA key under 2048 bits.
    pub fn from_pem_auto(pem: &str) -> Result<Self, ClientKeyError> {
        match Self::from_pem(pem, KeyAlg::Es256) {
            Ok(key) => Ok(key),
            Err(_) => Self::from_pem(pem, KeyAlg::Rs256),
        }
    }

    /// The public half as a JWK.
    #[must_use]
    pub fn public_jwk(&self) -> serde_json::Value {
        let mut jwk = self.key.public_members();
        jwk["use"] = "sig".into();
        jwk["alg"] = self.alg.name().into();
        jwk["kid"] = self.kid.clone().into();
        jwk
    }

    fn sign(&self, input: &[u8]) -> Vec<u8> {
        let mut rng = rand::thread_rng();
        match (&self.key, self.alg) {
            (Material::Rsa(key), KeyAlg::Ps256) => {
                rsa::pss::BlindedSigningKey::<Sha256>::new(RsaPrivateKey::clone(key))
                    .sign_with_rng(&mut rng, input)
                    .to_vec()
            }
            (Material::Rsa(key), _) => {
                rsa::pkcs1v15::SigningKey::<Sha256>::new(RsaPrivateKey::clone(key))
                    .sign_with_rng(&mut rng, input)
                    .to_vec()
            }
            // JWS wants the fixed-size r || s form (RFC 7518 §3.4), not DER.
            (Material::P256(key), _) => {
                use p256::ecdsa::signature::Signer as _;
                let signature: p256::ecdsa::Signature = key.sign(input);
                signature.to_bytes().to_vec()
            }
        }
    }
}

fn rsa_from_pem(pem: &str) -> Result<RsaPrivateKey, ClientKeyError> {
    let key = RsaPrivateKey::from_pkcs8_pem(pem).map_err(|e| ClientKeyError::Pem(e.to_string()))?;
    let bits = key.size() * 8;
    if bits < 2048 {
        return Err(ClientKeyError::TooShort(bits));
    }
    Ok(key)
}

impl Material {
    /// The public key's required members, in RFC 7638's order (the
    /// thumbprint's input).
    fn public_members(&self) -> serde_json::Value {
        match self {
            Self::Rsa(key) => {
                let (n, e) = public_parts(key);
                serde_json::json!({"e": e, "kty": "RSA", "n": n})
            }
            Self::P256(key) => super::dpop::ec_public_jwk(key),
        }
    }
}

fn public_parts(key: &RsaPrivateKey) -> (String, String) {
    (
        URL_SAFE_NO_PAD.encode(key.n().to_bytes_be()),
        URL_SAFE_NO_PAD.encode(key.e().to_bytes_be()),
    )
}

/// The public JWKS of `keys`, all of them (the retiring ones too, so that a
/// provider caching the set keeps accepting what they signed).
pub(crate) fn jwks(keys: &[ClientKey]) -> serde_json::Value {
    serde_json::json!({"keys": keys.iter().map(ClientKey::public_jwk).collect::<Vec<_>>()})
}

impl ClientAuth {
    /// Its registered name.
    #[must_use]
    pub fn name(self) -> &'static str {
        match self {
            Self::SecretBasic => "client_secret_basic",
            Self::SecretPost => "client_secret_post",
            Self::SecretJwt => "client_secret_jwt",
            Self::PrivateKeyJwt => "private_key_jwt",
        }
    }

    fn advertised(self) -> CoreClientAuthMethod {
        match self {
            Self::SecretBasic => CoreClientAuthMethod::ClientSecretBasic,
            Self::SecretPost => CoreClientAuthMethod::ClientSecretPost,
            Self::SecretJwt => CoreClientAuthMethod::ClientSecretJwt,
            Self::PrivateKeyJwt => CoreClientAuthMethod::PrivateKeyJwt,
        }
    }
}

/// How long an assertion is valid: long enough for one request.
const ASSERTION_TTL_SECS: i64 = 60;
const ASSERTION_TYPE: &str = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";

/// The client's credentials and the method it uses; applies them to requests.
#[derive(Clone)]
pub(crate) struct Authenticator {
    client_id: String,
    secret: Option<String>,
    keys: Vec<ClientKey>,
    method: Option<ClientAuth>,
    /// The assertion's `aud`: the issuer (draft-ietf-oauth-rfc7523bis
    /// replaces the token endpoint with the issuer identifier).
    audience: String,
}

impl Authenticator {
    /// The method in use: the configured one, else the first the provider
    /// advertises (Basic when it advertises none, RFC 8414's default); none
    /// for a public client.
    ///
    /// # Errors
    /// A message when a method is configured without a client secret.
    pub(crate) fn new(
        client_id: &str,
        secret: Option<&str>,
        keys: &[ClientKey],
        configured: Option<ClientAuth>,
        supported: Option<&[CoreClientAuthMethod]>,
        issuer: &str,
    ) -> Result<Self, String> {
        let method = match (configured, secret) {
            (Some(ClientAuth::PrivateKeyJwt) | None, _) if !keys.is_empty() => {
                Some(ClientAuth::PrivateKeyJwt)
            }
            (Some(ClientAuth::PrivateKeyJwt), _) => {
                return Err("private_key_jwt needs a client key".to_owned());
            }
            (Some(m), None) => {
                return Err(format!("{} needs a client secret", m.name()));
            }
            (Some(m), Some(_)) => Some(m),
            (None, None) => None,
            (None, Some(_)) => Some(match supported {
                None => ClientAuth::SecretBasic,
                Some(list) => [
                    ClientAuth::SecretBasic,
                    ClientAuth::SecretPost,
                    ClientAuth::SecretJwt,
                ]
                .into_iter()
                .find(|m| list.contains(&m.advertised()))
                .unwrap_or(ClientAuth::SecretBasic),
            }),
        };
        Ok(Self {
            client_id: client_id.to_owned(),
            secret: secret.map(str::to_owned),
            keys: keys.to_vec(),
            method,
            audience: issuer.to_owned(),
        })
    }

    /// The secret `openidconnect` sends itself (Basic or body), and how.
    pub(crate) fn for_token_client(&self) -> (Option<String>, AuthType) {
        match self.method {
            Some(ClientAuth::SecretBasic) => (self.secret.clone(), AuthType::BasicAuth),
            Some(ClientAuth::SecretPost) => (self.secret.clone(), AuthType::RequestBody),
            // The body names the client; the assertion proves it.
            Some(ClientAuth::SecretJwt | ClientAuth::PrivateKeyJwt) | None => {
                (None, AuthType::RequestBody)
            }
        }
    }

    /// Form parameters a token request adds to what `openidconnect` sends:
    /// a fresh assertion for the JWT method.
    pub(crate) fn extra_params(&self) -> Vec<(&'static str, String)> {
        let assertion = match (self.method, &self.secret, self.keys.first()) {
            (Some(ClientAuth::SecretJwt), Some(secret), _) => self.hs256_assertion(secret),
            (Some(ClientAuth::PrivateKeyJwt), _, Some(key)) => self.signed_assertion(key),
            _ => return Vec::new(),
        };
        vec![
            ("client_assertion_type", ASSERTION_TYPE.to_owned()),
            ("client_assertion", assertion),
        ]
    }

    /// Authenticates a form POST built by hand (revocation, PAR): `form`
    /// gains what the method puts in the body.
    pub(crate) fn apply(
        &self,
        request: RequestBuilder,
        form: &mut Vec<(String, String)>,
    ) -> RequestBuilder {
        let mut set = |k: &str, v: String| {
            form.retain(|(n, _)| n != k);
            form.push((k.to_owned(), v));
        };
        set("client_id", self.client_id.clone());
        match (self.method, &self.secret) {
            (Some(ClientAuth::SecretBasic), Some(secret)) => {
                return request.basic_auth(urlencode(&self.client_id), Some(urlencode(secret)));
            }
            (Some(ClientAuth::SecretPost), Some(secret)) => set("client_secret", secret.clone()),
            _ => {
                for (k, v) in self.extra_params() {
                    set(k, v);
                }
            }
        }
        request
    }

    /// An RFC 7523 client assertion: `iss` = `sub` = the client, `aud` the
    /// issuer, a `jti` fresh for each assertion so the provider can refuse
    /// replays.
    fn hs256_assertion(&self, secret: &str) -> String {
        let input = self.signing_input(serde_json::json!({"alg": "HS256", "typ": "JWT"}));
        let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes())
            .unwrap_or_else(|_| unreachable!("HMAC takes keys of any length"));
        mac.update(input.as_bytes());
        format!(
            "{input}.{}",
            URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes())
        )
    }

    /// As [`Self::hs256_assertion`], signed with the client's private key.
    fn signed_assertion(&self, key: &ClientKey) -> String {
        let input = self.signing_input(
            serde_json::json!({"alg": key.alg.name(), "typ": "JWT", "kid": key.kid}),
        );
        let signature = key.sign(input.as_bytes());
        format!("{input}.{}", URL_SAFE_NO_PAD.encode(signature))
    }

    /// `header.claims` of an assertion, base64url-encoded.
    fn signing_input(&self, header: serde_json::Value) -> String {
        let now = OffsetDateTime::now_utc().unix_timestamp();
        let mut jti = [0u8; 16];
        rand::thread_rng().fill_bytes(&mut jti);
        let claims = serde_json::json!({
            "iss": self.client_id,
            "sub": self.client_id,
            "aud": self.audience,
            "jti": URL_SAFE_NO_PAD.encode(jti),
            "iat": now,
            "exp": now + ASSERTION_TTL_SECS,
        });
        format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(header.to_string()),
            URL_SAFE_NO_PAD.encode(claims.to_string())
        )
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn claims(jwt: &str) -> serde_json::Value {
        let part = jwt.split('.').nth(1).unwrap();
        serde_json::from_slice(&URL_SAFE_NO_PAD.decode(part).unwrap()).unwrap()
    }

    #[test]
    fn chooses_the_first_advertised_secret_method() {
        let pick = |list: &[CoreClientAuthMethod]| {
            Authenticator::new("c", Some("s"), &[], None, Some(list), "https://i")
                .unwrap()
                .method
        };
        assert_eq!(
            pick(&[
                CoreClientAuthMethod::ClientSecretJwt,
                CoreClientAuthMethod::ClientSecretPost
            ]),
            Some(ClientAuth::SecretPost)
        );
        assert_eq!(
            pick(&[CoreClientAuthMethod::ClientSecretJwt]),
            Some(ClientAuth::SecretJwt)
        );
        assert!(
            Authenticator::new("c", None, &[], Some(ClientAuth::SecretJwt), None, "i").is_err()
        );
    }

    #[test]
    fn each_assertion_has_a_fresh_jti_and_the_issuer_as_audience() {
        let a = Authenticator::new(
            "c",
            Some("s"),
            &[],
            Some(ClientAuth::SecretJwt),
            None,
            "https://i",
        )
        .unwrap();
        let (one, two) = (a.hs256_assertion("s"), a.hs256_assertion("s"));
        assert_ne!(claims(&one)["jti"], claims(&two)["jti"]);
        assert_eq!(claims(&one)["aud"], "https://i");
        assert_eq!(claims(&one)["iss"], "c");
    }
}
