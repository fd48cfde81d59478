//! Pushed authorization requests (RFC 9126): the authorization request goes
//! to the provider over the back channel, and the browser carries only
//! `client_id` and the `request_uri` it was given, so the request's
//! parameters can be neither read nor altered on the way.

use openidconnect::url::Url;
use serde::Deserialize;

use super::{
    client::{error_chain, Discovered},
    AuthError, AuthErrorKind,
};
use crate::log_safe::untrusted;

/// When logins push their authorization request
/// ([`OidcConfig::with_par`](super::OidcConfig::with_par)).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum Par {
    /// Whenever the provider advertises a
    /// `pushed_authorization_request_endpoint` (the default).
    #[default]
    Auto,
    /// Always; a login fails when the provider has no PAR endpoint.
    Required,
    /// Never; a login fails when the provider advertises
    /// `require_pushed_authorization_requests`.
    Off,
}

/// What discovery says about the provider's PAR support.
#[derive(Debug, Clone, Default)]
pub(crate) struct ParEndpoint {
    url: Option<Url>,
    required: bool,
}

impl ParEndpoint {
    pub(crate) fn new(url: Option<&str>, required: Option<bool>) -> Self {
        Self {
            url: url.and_then(|u| Url::parse(u).ok()),
            required: required.unwrap_or(false),
        }
    }
}

/// The PAR endpoint's answer (RFC 9126 §2.2).
#[derive(Deserialize)]
struct Pushed {
    request_uri: String,
}

/// Its error answer (RFC 6749 §5.2).
#[derive(Deserialize)]
struct Refused {
    error: String,
    #[serde(default)]
    error_description: String,
}

fn unavailable(detail: String) -> AuthError {
    AuthError::new(AuthErrorKind::ProviderUnavailable, detail)
}

impl Discovered {
    /// The authorization URL the browser goes to: `url` as built, or, when
    /// the request is pushed, the authorization endpoint with `client_id`
    /// and `request_uri` only.
    pub(crate) async fn pushed(&self, url: Url) -> Result<Url, AuthError> {
        let (config, par) = (&self.inner.config, &self.inner.par);
        let endpoint = match (config.par, &par.url) {
            (Par::Off, _) if par.required => {
                return Err(unavailable(
                    "the provider requires pushed authorization requests \
                     (require_pushed_authorization_requests) but PAR is off"
                        .to_owned(),
                ))
            }
            (Par::Off, _) | (Par::Auto, None) => return Ok(url),
            (Par::Required, None) => {
                return Err(unavailable(
                    "PAR is required but the provider advertises no \
                     pushed_authorization_request_endpoint"
                        .to_owned(),
                ))
            }
            (_, Some(endpoint)) => endpoint,
        };
        let form: Vec<(String, String)> = url.query_pairs().into_owned().collect();
        let request_uri = self.push(endpoint, &form).await?;
        let mut short = url;
        short
            .query_pairs_mut()
            .clear()
            .append_pair("client_id", &config.client_id)
            .append_pair("request_uri", &request_uri);
        Ok(short)
    }

    /// Posts the authorization request's parameters; returns the `request_uri`.
    async fn push(&self, endpoint: &Url, form: &[(String, String)]) -> Result<String, AuthError> {
        let mut form = form.to_vec();
        let request = self
            .inner
            .auth
            .apply(self.inner.http.post(endpoint.clone()), &mut form);
        let pairs: Vec<(&str, &str)> = form.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        let response = super::with_form(request, &pairs)
            .send()
            .await
            .map_err(|e| {
                unavailable(format!(
                    "pushed authorization request failed: {}",
                    error_chain(&e)
                ))
            })?;
        let status = response.status();
        let body = response.bytes().await.map_err(|e| {
            unavailable(format!(
                "pushed authorization request failed: {}",
                error_chain(&e)
            ))
        })?;
        if status.is_success() {
            let pushed: Pushed = serde_json::from_slice(&body)
                .map_err(|e| unavailable(format!("the PAR endpoint answered nonsense: {e}")))?;
            return Ok(pushed.request_uri);
        }
        let detail = match serde_json::from_slice::<Refused>(&body) {
            Ok(r) => format!("{}: {}", r.error, r.error_description),
            Err(_) => format!("HTTP {status}"),
        };
        tracing::warn!(error = %untrusted(&detail), "pushed authorization request refused");
        Err(AuthError::new(
            AuthErrorKind::ProviderError,
            format!("the provider refused the pushed authorization request: {detail}"),
        ))
    }
}
