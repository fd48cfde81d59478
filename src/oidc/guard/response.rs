//! The answers to a refused request, by who sent it.

use http::{header, HeaderValue, Request, Response, StatusCode};

use super::{Rejection, RejectionKind};

/// Who is asking, which decides how a refusal reads.
#[derive(Debug, Clone)]
pub(crate) enum RequestKind {
    /// A browser navigation: send it to the login, then back here.
    Browser { login: String },
    /// gRPC (also grpc-web): HTTP 200 with `grpc-status: 16`.
    Grpc,
    /// Anything else: 401.
    Api,
}

impl RequestKind {
    /// `login` is the login URL up to its `return_to` parameter (`…?` or
    /// `…?provider=NAME&`).
    pub(crate) fn of<B>(req: &Request<B>, login: &str) -> Self {
        let header_has = |name: header::HeaderName, needle: &str| {
            req.headers()
                .get_all(name)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .any(|v| v.to_ascii_lowercase().contains(needle))
        };
        let is_grpc = req
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("application/grpc"));
        if is_grpc {
            return Self::Grpc;
        }
        let navigation = matches!(*req.method(), http::Method::GET | http::Method::HEAD);
        if navigation && header_has(header::ACCEPT, "text/html") {
            let here = req
                .uri()
                .path_and_query()
                .map_or("/", |p| p.as_str())
                .to_owned();
            let return_to: String =
                openidconnect::url::form_urlencoded::byte_serialize(here.as_bytes()).collect();
            let login = format!("{login}return_to={return_to}");
            return Self::Browser { login };
        }
        Self::Api
    }

    pub(crate) fn reject<B: Default>(&self, rejection: Rejection) -> Response<B> {
        let mut r = Response::new(B::default());
        let kind = rejection.kind();
        if kind == RejectionKind::MissingSessionLayer {
            tracing::error!("{rejection}");
        }
        let failure = match kind {
            RejectionKind::MissingSessionLayer => Some(StatusCode::INTERNAL_SERVER_ERROR),
            RejectionKind::SessionUnavailable | RejectionKind::LoginUnavailable => {
                Some(StatusCode::SERVICE_UNAVAILABLE)
            }
            RejectionKind::ProviderUnavailable => Some(StatusCode::BAD_GATEWAY),
            RejectionKind::NotLoggedIn
            | RejectionKind::LoggedOut
            | RejectionKind::InsufficientAuthentication => None,
        };
        let step_up = rejection.step_up.as_ref();
        let mut status = StatusCode::OK;
        let h = r.headers_mut();
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        if kind == RejectionKind::LoginUnavailable {
            h.insert(header::RETRY_AFTER, HeaderValue::from_static("5"));
        }
        match (self, failure) {
            (Self::Grpc, _) => {
                // gRPC reports errors in trailers-only responses with HTTP 200.
                let code = match kind {
                    RejectionKind::NotLoggedIn
                    | RejectionKind::LoggedOut
                    | RejectionKind::InsufficientAuthentication => "16",
                    _ => "14",
                };
                h.insert(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("application/grpc"),
                );
                h.insert("grpc-status", HeaderValue::from_static(code));
                if let Ok(msg) = HeaderValue::from_str(&rejection.to_string().replace(' ', "%20")) {
                    h.insert("grpc-message", msg);
                }
            }
            (_, Some(failed)) => status = failed,
            (Self::Browser { login }, None) => {
                status = StatusCode::FOUND;
                // A step-up login asks the provider for what the route needs.
                let login = match step_up {
                    Some(need) => format!("{login}{}", need.login_query()),
                    None => login.clone(),
                };
                if let Ok(v) = HeaderValue::from_str(&login) {
                    h.insert(header::LOCATION, v);
                }
            }
            (Self::Api, None) => {
                status = StatusCode::UNAUTHORIZED;
                let challenge = match step_up {
                    Some(need) => format!("Cookie realm=\"session\"{}", need.challenge()),
                    None => "Cookie realm=\"session\"".to_owned(),
                };
                if let Ok(v) = HeaderValue::from_str(&challenge) {
                    h.insert(header::WWW_AUTHENTICATE, v);
                }
            }
        }
        *r.status_mut() = status;
        r.extensions_mut().insert(rejection);
        r
    }
}
