//! How the client authenticates to the provider's token, revocation and PAR
//! endpoints (OpenID Connect Core §9): HTTP Basic, the form body, or a JWT
//! signed with the client secret (RFC 7523).

use base64::{engine::general_purpose::URL_SAFE_NO_PAD, Engine};
use hmac::{Hmac, Mac};
use openidconnect::{core::CoreClientAuthMethod, reqwest::RequestBuilder, AuthType};
use rand::RngCore;
use sha2::Sha256;
use time::OffsetDateTime;

use super::client::urlencode;

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
}

impl ClientAuth {
    /// Its registered name.
    pub fn name(self) -> &'static str {
        match self {
            Self::SecretBasic => "client_secret_basic",
            Self::SecretPost => "client_secret_post",
            Self::SecretJwt => "client_secret_jwt",
        }
    }

    fn advertised(self) -> CoreClientAuthMethod {
        match self {
            Self::SecretBasic => CoreClientAuthMethod::ClientSecretBasic,
            Self::SecretPost => CoreClientAuthMethod::ClientSecretPost,
            Self::SecretJwt => CoreClientAuthMethod::ClientSecretJwt,
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
        configured: Option<ClientAuth>,
        supported: Option<&[CoreClientAuthMethod]>,
        issuer: &str,
    ) -> Result<Self, String> {
        let method = match (configured, secret) {
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
            Some(ClientAuth::SecretJwt) | None => (None, AuthType::RequestBody),
        }
    }

    /// Form parameters a token request adds to what `openidconnect` sends:
    /// a fresh assertion for the JWT method.
    pub(crate) fn extra_params(&self) -> Vec<(&'static str, String)> {
        match (self.method, &self.secret) {
            (Some(ClientAuth::SecretJwt), Some(secret)) => vec![
                ("client_assertion_type", ASSERTION_TYPE.to_owned()),
                ("client_assertion", self.hs256_assertion(secret)),
            ],
            _ => Vec::new(),
        }
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
        let now = OffsetDateTime::now_utc().unix_timestamp();
        let mut jti = [0u8; 16];
        rand::thread_rng().fill_bytes(&mut jti);
        let header = serde_json::json!({"alg": "HS256", "typ": "JWT"});
        let claims = serde_json::json!({
            "iss": self.client_id,
            "sub": self.client_id,
            "aud": self.audience,
            "jti": URL_SAFE_NO_PAD.encode(jti),
            "iat": now,
            "exp": now + ASSERTION_TTL_SECS,
        });
        let input = format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(header.to_string()),
            URL_SAFE_NO_PAD.encode(claims.to_string())
        );
        let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes())
            .unwrap_or_else(|_| unreachable!("HMAC takes keys of any length"));
        mac.update(input.as_bytes());
        format!(
            "{input}.{}",
            URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes())
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
            Authenticator::new("c", Some("s"), None, Some(list), "https://i")
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
        assert!(Authenticator::new("c", None, Some(ClientAuth::SecretJwt), None, "i").is_err());
    }

    #[test]
    fn each_assertion_has_a_fresh_jti_and_the_issuer_as_audience() {
        let a = Authenticator::new(
            "c",
            Some("s"),
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
