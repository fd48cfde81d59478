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
//! The paths are [`OidcConfig`]'s (`auth/login`,
//! `auth/callback`, `auth/logout`, `auth/backchannel-logout`, `auth/jwks.json` under the
//! application's URL by default). Another method on one of them answers
//! 405. The session layer must run outside these routes.

mod future;
mod layer;
mod service;

use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Limited};

pub use self::{future::OidcRoutesFuture, layer::OidcRoutesLayer, service::OidcRoutes};
use super::{AuthError, OidcClient, OidcConfig};
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

/// The request paths of the routes, as they arrive.
#[derive(Debug, Clone)]
pub(crate) struct Paths(Vec<(String, Route)>);

impl Paths {
    pub(crate) fn new(config: &OidcConfig) -> Self {
        let jwks = (!config.client_keys.is_empty())
            .then(|| (config.path_abs(&config.jwks_path), Route::Jwks));
        Self(
            [
                (config.path_abs(&config.login_path), Route::Login),
                (config.path_abs(&config.callback_path), Route::Callback),
                (config.path_abs(&config.logout_path), Route::Logout),
                (
                    config.path_abs(&config.backchannel_logout_path),
                    Route::BackchannelLogout,
                ),
            ]
            .into_iter()
            .chain(jwks)
            .collect(),
        )
    }

    fn route(&self, path: &str) -> Option<Route> {
        self.0.iter().find(|(p, _)| p == path).map(|(_, r)| *r)
    }

    #[cfg(feature = "axum")]
    fn route_of(&self, route: Route) -> bool {
        self.0.iter().any(|(_, r)| *r == route)
    }

    #[cfg(feature = "axum")]
    fn path(&self, route: Route) -> &str {
        self.0
            .iter()
            .find(|(_, r)| *r == route)
            .map_or("/", |(p, _)| p)
    }
}

/// Answers `request`, which is for `route`.
async fn respond<ReqBody, ResBody>(
    client: OidcClient,
    route: Route,
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
        return jwks_response(&client);
    }
    if route == Route::BackchannelLogout {
        let body = match read_body(body).await {
            Ok(body) => body,
            Err(status) => return plain(status, "POST", "unreadable or too large body"),
        };
        let answer = client.backchannel_logout(&body).await;
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
        Route::Login => client.login(session, return_to(query).as_deref()).await,
        Route::Callback => client.callback(session, query).await.map(|(r, _)| r),
        Route::Logout => client.logout(session, &parts.headers).await,
        Route::BackchannelLogout | Route::Jwks => unreachable!("answered above"),
    };
    answer.map_or_else(
        |e: AuthError| e.response_for(&parts.headers),
        |redirect| redirect.to_response(),
    )
}

/// The `return_to` parameter of a login request.
fn return_to(query: Option<&str>) -> Option<String> {
    url::form_urlencoded::parse(query?.as_bytes())
        .find(|(k, _)| k == "return_to")
        .map(|(_, v)| v.into_owned())
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
        use axum::{body::Body, extract::Request, routing};
        let paths = Paths::new(self.config());
        let handler = |route: Route| {
            let client = self.clone();
            move |request: Request| respond::<Body, Body>(client, route, request)
        };
        let router = axum::Router::new()
            .route(
                paths.path(Route::Login),
                routing::get(handler(Route::Login)),
            )
            .route(
                paths.path(Route::Callback),
                routing::get(handler(Route::Callback)),
            )
            .route(
                paths.path(Route::Logout),
                routing::post(handler(Route::Logout)),
            )
            .route(
                paths.path(Route::BackchannelLogout),
                routing::post(handler(Route::BackchannelLogout)),
            );
        if paths.route_of(Route::Jwks) {
            router.route(paths.path(Route::Jwks), routing::get(handler(Route::Jwks)))
        } else {
            router
        }
    }
}
