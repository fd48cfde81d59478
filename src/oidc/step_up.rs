//! Step-up authentication: logins at a given assurance level (`acr`) or
//! recent enough (`auth_time`), asked of the provider, checked in the ID
//! token, and required per route by
//! [`RequireLoginLayer`](super::RequireLoginLayer) (RFC 9470).
//!
//! A route that needs more than the login has sends a browser through a new
//! login that asks for it (`acr_values` with the `acr` claim requested as
//! essential, so that the provider authenticates again rather than repeat
//! the old level; `max_age`), and answers an API client 401 with
//! `WWW-Authenticate: … error="insufficient_user_authentication"` and what
//! it needs.

use std::{fmt::Write as _, time::Duration};

use serde_json::{Map, Value};

use super::{AuthError, AuthErrorKind};

/// What a login asks of the provider beyond the configured defaults:
/// [`OidcClient::login_with`](super::OidcClient::login_with).
///
/// ```
/// use std::time::Duration;
/// use tower_pg_session::oidc::LoginOptions;
///
/// let options = LoginOptions::new()
///     .with_return_to("/payments")
///     .with_acr_values(["urn:example:mfa"])
///     .with_max_age(Duration::from_secs(300));
/// # let _ = options;
/// ```
#[derive(Debug, Clone, Default)]
pub struct LoginOptions {
    pub(crate) return_to: Option<String>,
    pub(crate) step_up: StepUp,
}

impl LoginOptions {
    /// A login with the configured defaults that returns to `/`.
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    /// Where the browser goes after the login; kept only if it is a local path.
    #[must_use]
    pub fn with_return_to(mut self, path: &str) -> Self {
        self.return_to = Some(path.to_owned());
        self
    }

    step_up_setters!("this login");

    /// Parsed from a login request's query: `return_to`, `acr_values`
    /// (space-separated) and `max_age` (seconds; a bad number is ignored).
    pub(crate) fn from_query(query: Option<&str>) -> Self {
        let mut options = Self::new();
        for (k, v) in url::form_urlencoded::parse(query.unwrap_or_default().as_bytes()) {
            match &*k {
                "return_to" => options.return_to = Some(v.into_owned()),
                "acr_values" => {
                    options.step_up.acr_values = v.split_whitespace().map(str::to_owned).collect();
                }
                "max_age" => options.step_up.max_age = v.parse().ok().map(Duration::from_secs),
                _ => {}
            }
        }
        options
    }
}

/// An authentication requirement: any of `acr_values` (none: any level),
/// and an authentication at most `max_age` old (none: any age).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct StepUp {
    pub(crate) acr_values: Vec<String>,
    pub(crate) max_age: Option<Duration>,
}

impl StepUp {
    pub(crate) fn set_acr_values<I, S>(&mut self, values: I)
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.acr_values = values.into_iter().map(Into::into).collect();
    }

    /// This requirement, with `defaults` where it sets nothing.
    pub(crate) fn or(mut self, defaults: &Self) -> Self {
        if self.acr_values.is_empty() {
            self.acr_values.clone_from(&defaults.acr_values);
        }
        self.max_age = self.max_age.or(defaults.max_age);
        self
    }

    /// Why an ID token's `claims` (as of `now`, unix seconds, with `skew`
    /// allowed) fall short of this requirement; `None` when they meet it.
    pub(crate) fn unmet(
        &self,
        claims: &Map<String, Value>,
        now: i64,
        skew: Duration,
    ) -> Option<String> {
        if !self.acr_values.is_empty() {
            let acr = claims.get("acr").and_then(Value::as_str);
            if !acr.is_some_and(|a| self.acr_values.iter().any(|v| v == a)) {
                return Some(format!(
                    "authentication context {} is not one of {}",
                    acr.map_or_else(|| "(none)".to_owned(), |a| format!("{a:?}")),
                    self.acr_values.join(" ")
                ));
            }
        }
        let max_age = self.max_age?;
        let Some(auth_time) = claims.get("auth_time").and_then(Value::as_i64) else {
            return Some("the ID token has no auth_time".to_owned());
        };
        let allowed = secs(max_age).saturating_add(secs(skew));
        (now.saturating_sub(auth_time) > allowed).then(|| {
            format!(
                "authenticated {} s ago, more than {} s",
                now.saturating_sub(auth_time),
                max_age.as_secs()
            )
        })
    }

    /// At the callback: the ID token meets what the login asked for.
    pub(crate) fn check_id_token(
        &self,
        claims: &Map<String, Value>,
        now: i64,
        skew: Duration,
    ) -> Result<(), AuthError> {
        match self.unmet(claims, now, skew) {
            None => Ok(()),
            Some(why) => Err(AuthError::new(
                AuthErrorKind::InsufficientAuthentication,
                format!("the provider did not authenticate as asked: {why}"),
            )),
        }
    }

    /// The login URL's parameters that ask for this requirement, each
    /// starting with `&`.
    pub(crate) fn login_query(&self) -> String {
        let mut query = url::form_urlencoded::Serializer::new(String::new());
        if !self.acr_values.is_empty() {
            query.append_pair("acr_values", &self.acr_values.join(" "));
        }
        if let Some(age) = self.max_age {
            query.append_pair("max_age", &age.as_secs().to_string());
        }
        let query = query.finish();
        if query.is_empty() {
            query
        } else {
            format!("&{query}")
        }
    }

    /// The authorization request's parameters: the `acr` claim requested
    /// as essential where the provider takes the `claims` parameter (so that
    /// a provider whose session is weaker asks again; `acr_values` would
    /// make it a voluntary claim), `acr_values` elsewhere; and `max_age`.
    pub(crate) fn authorization_params(
        &self,
        claims_parameter: bool,
    ) -> Vec<(&'static str, String)> {
        let mut out = Vec::new();
        if !self.acr_values.is_empty() && claims_parameter {
            let claims = serde_json::json!({
                "id_token": { "acr": { "essential": true, "values": self.acr_values } }
            });
            out.push(("claims", claims.to_string()));
        } else if !self.acr_values.is_empty() {
            out.push(("acr_values", self.acr_values.join(" ")));
        }
        if let Some(age) = self.max_age {
            out.push(("max_age", age.as_secs().to_string()));
        }
        out
    }

    /// The parameters of a `WWW-Authenticate` challenge for it (RFC 9470).
    pub(crate) fn challenge(&self) -> String {
        let mut out = String::from(", error=\"insufficient_user_authentication\"");
        if !self.acr_values.is_empty() {
            // Authentication context class references are URIs or tokens:
            // no quote or backslash to escape in practice; drop any.
            let values: String = self
                .acr_values
                .join(" ")
                .chars()
                .filter(|c| !matches!(c, '"' | '\\') && !c.is_control())
                .collect();
            let _ = write!(out, ", acr_values=\"{values}\"");
        }
        if let Some(age) = self.max_age {
            let _ = write!(out, ", max_age={}", age.as_secs());
        }
        out
    }
}

fn secs(d: Duration) -> i64 {
    i64::try_from(d.as_secs()).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn claims(v: Value) -> Map<String, Value> {
        v.as_object().cloned().unwrap_or_default()
    }

    #[test]
    fn acr_must_be_one_of_the_values_and_auth_time_recent_enough() {
        let skew = Duration::from_secs(60);
        let need = StepUp {
            acr_values: vec!["mfa".into(), "hwk".into()],
            max_age: Some(Duration::from_secs(300)),
        };
        let now = 10_000;
        assert_eq!(
            need.unmet(
                &claims(json!({"acr": "mfa", "auth_time": now - 100})),
                now,
                skew
            ),
            None
        );
        assert!(need
            .unmet(&claims(json!({"acr": "pwd", "auth_time": now})), now, skew)
            .is_some());
        assert!(need
            .unmet(&claims(json!({"auth_time": now})), now, skew)
            .is_some());
        assert!(need
            .unmet(&claims(json!({"acr": "hwk"})), now, skew)
            .is_some());
        // 300 s and the skew pass; a second more does not.
        assert_eq!(
            need.unmet(
                &claims(json!({"acr": "hwk", "auth_time": now - 360})),
                now,
                skew
            ),
            None
        );
        assert!(need
            .unmet(
                &claims(json!({"acr": "hwk", "auth_time": now - 361})),
                now,
                skew
            )
            .is_some());
        assert_eq!(StepUp::default().unmet(&Map::new(), now, skew), None);
    }

    #[test]
    fn the_query_of_a_login_round_trips() {
        let options =
            LoginOptions::from_query(Some("return_to=%2Fpay&acr_values=mfa+hwk&max_age=60"));
        assert_eq!(options.return_to.as_deref(), Some("/pay"));
        assert_eq!(options.step_up.acr_values, ["mfa", "hwk"]);
        assert_eq!(options.step_up.max_age, Some(Duration::from_secs(60)));
        assert_eq!(
            options.step_up.login_query(),
            "&acr_values=mfa+hwk&max_age=60"
        );
        let bad = LoginOptions::from_query(Some("max_age=-1"));
        assert_eq!(bad.step_up.max_age, None);
    }

    #[test]
    fn the_challenge_names_what_is_needed_and_cannot_be_broken_out_of() {
        let need = StepUp {
            acr_values: vec!["a\"b".into(), "c".into()],
            max_age: Some(Duration::from_secs(5)),
        };
        assert_eq!(
            need.challenge(),
            ", error=\"insufficient_user_authentication\", acr_values=\"ab c\", max_age=5"
        );
    }
}
