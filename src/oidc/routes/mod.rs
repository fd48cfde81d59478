//! The login's own routes, served from the configuration's paths: with axum
//! [`OidcClient::routes`], elsewhere (hyper, tonic, any tower stack)
//! [`OidcRoutesLayer`], which answers those paths and passes every other
//! request to the service it wraps.
//!
//! | route | handler |
//! |---|---|
//! | `GET {login}?return_to=/path` | [`OidcClient::login`] |
//! | `GET {callback}` | [`OidcClient::callback`] |
//! | `POST {logout}` | [`OidcClient::logout`] (same origin only) |
//! | `POST {backchannel}` | [`OidcClient::backchannel_logout`] |
//! | `GET {jwks}` | [`OidcClient::client_jwks`], only with client keys |
//!
//! The paths are [`OidcConfig`](super::OidcConfig)'s (`auth/login`,
//! `auth/callback`, `auth/logout`, `auth/backchannel-logout`, `auth/jwks.json` under the
//! application's URL by default). Another method on one of them answers
//! 405. The session layer must run outside these routes.
//!
//! With several providers ([`OidcProviders`]), the login takes
//! `?provider=NAME` (the default provider without it), each provider has
//! its own callback and back-channel path, and the logout ends the login at
//! the provider it came from.

mod future;
mod layer;
mod service;

use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Limited};

pub use self::{future::OidcRoutesFuture, layer::OidcRoutesLayer, service::OidcRoutes};
use super::{AuthError, LoginOptions, OidcClient, OidcProviders};
use crate::session::Session;

/// A back-channel logout body larger than this is refused (a logout token
/// is a few kilobytes).
const MAX_BODY: usize = 64 * 1024;

/// Which handler a request is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Route {
    Login,
    Callback,
    Logout,
    BackchannelLogout,
    Jwks,
}

impl Route {
    fn method(self) -> Method {
        match self {
            Self::Login | Self::Callback | Self::Jwks => Method::GET,
            Self::Logout | Self::BackchannelLogout => Method::POST,
        }
    }
}

/// The request paths of the routes, as they arrive, each with the index of
/// the provider it belongs to. A login or logout path that several
/// providers share is the first's (the login takes `?provider=NAME`, the
/// logout follows the session's login).
#[derive(Debug, Clone)]
pub(crate) struct Paths(Vec<(String, Route, usize)>);

impl Paths {
    pub(crate) fn new(providers: &OidcProviders) -> Self {
        let mut out: Vec<(String, Route, usize)> = Vec::new();
        for (index, (_, client)) in providers.iter().enumerate() {
            let c = client.config();
            for (path, route) in [
                (&c.login_path, Route::Login),
                (&c.callback_path, Route::Callback),
                (&c.logout_path, Route::Logout),
                (&c.backchannel_logout_path, Route::BackchannelLogout),
                // Only with client keys: the public half of what signs.
                (&c.jwks_path, Route::Jwks),
            ] {
                if route == Route::Jwks && c.client_keys.is_empty() {
                    continue;
                }
                let path = c.path_abs(path);
                if !out.iter().any(|(p, _, _)| *p == path) {
                    out.push((path, route, index));
                }
            }
        }
        Self(out)
    }

    fn route(&self, path: &str) -> Option<(Route, usize)> {
        self.0
            .iter()
            .find(|(p, _, _)| p == path)
            .map(|(_, r, i)| (*r, *i))
    }
}

/// Answers `request`, which is for `route` of the provider at `index`.
async fn respond<ReqBody, ResBody>(
    providers: OidcProviders,
    route: Route,
    index: usize,
    request: Request<ReqBody>,
) -> Response<ResBody>
where
    ReqBody: http_body::Body,
    ReqBody::Error: std::error::Error + Send + Sync + 'static,
    ResBody: From<String> + Default,
{
    let (parts, body) = request.into_parts();
    if parts.method != route.method() && !(route == Route::Login && parts.method == Method::HEAD) {
        return plain(
            StatusCode::METHOD_NOT_ALLOWED,
            route.method().as_str(),
            "method not allowed",
        );
    }
    if route == Route::Jwks {
        return jwks_response(providers.at(index));
    }
    if route == Route::BackchannelLogout {
        let body = match read_body(body).await {
            Ok(body) => body,
            Err(status) => return plain(status, "POST", "unreadable or too large body"),
        };
        let answer = providers.at(index).backchannel_logout(&body).await;
        return answer.map(ResBody::from);
    }
    let Some(session) = parts.extensions.get::<Session>() else {
        tracing::error!("no session: add tower_pg_session::SessionLayer outside the login routes");
        return plain(
            StatusCode::INTERNAL_SERVER_ERROR,
            route.method().as_str(),
            "no session layer",
        );
    };
    let query = parts.uri.query();
    let answer = match route {
        Route::Login => {
            let Some(client) = login_provider(&providers, index, query) else {
                return plain(StatusCode::BAD_REQUEST, "GET", "unknown provider");
            };
            let options = LoginOptions::from_query(query);
            client.login_with(session, &options).await
        }
        Route::Callback => {
            let client = providers.at(index);
            client.callback(session, query).await.map(|(r, _)| r)
        }
        Route::Logout => {
            // At the provider the login came from.
            let client = match providers.of_session(session).await {
                Some(client) => client,
                None => providers.at(index),
            };
            client.logout(session, &parts.headers).await
        }
        Route::BackchannelLogout | Route::Jwks => unreachable!("answered above"),
    };
    answer.map_or_else(
        |e: AuthError| e.response_for(&parts.headers),
        |redirect| redirect.to_response(),
    )
}

/// The provider a login request names (`?provider=NAME`), else the one
/// whose login path it came to; `None` for a name no provider has.
fn login_provider<'a>(
    providers: &'a OidcProviders,
    index: usize,
    query: Option<&str>,
) -> Option<&'a OidcClient> {
    let named = url::form_urlencoded::parse(query.unwrap_or_default().as_bytes())
        .find(|(k, _)| k == "provider")
        .map(|(_, v)| v.into_owned());
    match named {
        Some(name) => providers.index_of(&name).map(|i| providers.at(i)),
        None => Some(providers.at(index)),
    }
}

async fn read_body<B>(body: B) -> Result<Vec<u8>, StatusCode>
where
    B: http_body::Body,
    B::Error: std::error::Error + Send + Sync + 'static,
{
    match Limited::new(body, MAX_BODY).collect().await {
        Ok(collected) => Ok(collected.to_bytes().to_vec()),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => Err(StatusCode::PAYLOAD_TOO_LARGE),
        Err(_) => Err(StatusCode::BAD_REQUEST),
    }
}

/// The client's public keys, cacheable for a few minutes.
fn jwks_response<B: From<String>>(client: &OidcClient) -> Response<B> {
    let body = client.client_jwks().unwrap_or_default().to_string();
    let mut r = Response::new(B::from(body));
    let h = r.headers_mut();
    h.insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static("max-age=300"),
    );
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r
}

fn plain<B: From<String>>(status: StatusCode, allow: &str, text: &str) -> Response<B> {
    let mut r = Response::new(B::from(text.to_owned()));
    *r.status_mut() = status;
    let h = r.headers_mut();
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    if status == StatusCode::METHOD_NOT_ALLOWED {
        if let Ok(v) = HeaderValue::from_str(allow) {
            h.insert(header::ALLOW, v);
        }
    }
    r
}

#[cfg(feature = "axum")]
#[cfg_attr(docsrs, doc(cfg(feature = "axum")))]
impl OidcClient {
    /// The login's routes at the configured paths, for an axum router
    /// ([module docs](crate::oidc::routes) list them). Merge it under the session
    /// layer:
    ///
    /// ```no_run
    /// # use tower_pg_session::{oidc::{OidcClient, RequireLoginLayer}, SessionLayer};
    /// # fn app(oidc: OidcClient, sessions: SessionLayer) -> axum::Router {
    /// axum::Router::new()
    ///     .route("/me", axum::routing::get(|| async { "hello" }))
    ///     .route_layer(RequireLoginLayer::new(oidc.clone()))
    ///     .merge(oidc.routes())
    ///     .layer(sessions)
    /// # }
    /// ```
    pub fn routes<S: Clone + Send + Sync + 'static>(&self) -> axum::Router<S> {
        OidcProviders::from(self.clone()).routes()
    }
}

#[cfg(feature = "axum")]
#[cfg_attr(docsrs, doc(cfg(feature = "axum")))]
impl OidcProviders {
    /// The routes of every provider for an axum router: one login route
    /// (`?provider=NAME`, the default provider without it), each
    /// provider's callback and back-channel logout, one logout route that
    /// ends the login at the provider it came from. Merge it under the
    /// session layer.
    pub fn routes<S: Clone + Send + Sync + 'static>(&self) -> axum::Router<S> {
        use axum::{body::Body, extract::Request, routing};
        let mut router = axum::Router::new();
        for (path, route, index) in Paths::new(self).0 {
            let providers = self.clone();
            let handler = move |request: Request| {
                respond::<Body, Body>(providers.clone(), route, index, request)
            };
            router = router.route(
                &path,
                match route {
                    Route::Login | Route::Callback | Route::Jwks => routing::get(handler),
                    Route::Logout | Route::BackchannelLogout => routing::post(handler),
                },
            );
        }
        router
    }
}
