//! The session layer and the login guard on a plain hyper 1 server, without
//! axum.
//!
//! It shows:
//! - a tower stack served by hyper through hyper-util's
//!   `TowerToHyperService`, HTTP/1.1 and HTTP/2 on one port (`auto::Builder`);
//! - `OidcRoutesLayer`, which serves the login's routes (`GET /auth/login`,
//!   `GET /auth/callback`, `POST /auth/logout` (same origin only),
//!   `POST /auth/backchannel-logout`) and passes every other request on;
//! - one `service_fn` handler that takes the `Session` the session layer put
//!   into the request's extensions and dispatches on the path by hand:
//!   `GET /counter` (a count kept in the session) and `GET /me`;
//! - `GET /me` alone behind `RequireLoginLayer`, wrapped around its own
//!   handler, which reads the `User` from the request's extensions. A
//!   browser without a login is sent to `/auth/login` and back, an API
//!   client gets 401.
//!
//! Provider setup: register a confidential client (authorization code flow)
//! at any OpenID provider, with redirect URI `{APP_URL}/auth/callback` and
//! post-logout redirect URI `{APP_URL}/`. `examples/axum_keycloak.rs` and
//! `examples/axum_cognito.rs` list the steps for Keycloak and Cognito.
//!
//! Environment:
//!
//! | variable | meaning |
//! |---|---|
//! | `OIDC_ISSUER` | the provider's issuer, `https://sso.example.com/realms/acme` |
//! | `OIDC_CLIENT_ID`, `OIDC_CLIENT_SECRET` | the client |
//! | `APP_URL` | this app's public base URL; default `http://{BIND_ADDR}` |
//! | `BIND_ADDR` | default `127.0.0.1:3000` |
//! | `DATABASE_URL` | `postgres://postgres@127.0.0.1:5432/postgres` |
//! | `SESSION_SECRET` | comma-separated cookie signing keys, 32+ bytes each; the first signs |
//! | `TOKEN_KEYS` | comma-separated base64 32-byte keys sealing the tokens; the first seals |
//!
//! ```not_rust
//! # with the local provider of this repository (any user name and password):
//! (cd tests/idp && npm ci && PORT=4000 node server.js) &
//! OIDC_ISSUER=http://127.0.0.1:4000/realms/test OIDC_CLIENT_ID=demo OIDC_CLIENT_SECRET=demo-secret \
//! DATABASE_URL=postgres://postgres@127.0.0.1:5432/postgres \
//! SESSION_SECRET="$(openssl rand -base64 48)" TOKEN_KEYS="$(openssl rand -base64 32)" \
//! cargo run --example hyper
//! curl -c jar -b jar http://127.0.0.1:3000/counter   # {"count":1}, then 2, 3…
//! curl -i http://127.0.0.1:3000/me                   # 401
//! # and open http://127.0.0.1:3000/me in a browser to log in
//! ```

use std::{convert::Infallible, env, error::Error, net::SocketAddr};

use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::{
    rt::{TokioExecutor, TokioIo},
    server::conn::auto,
    service::TowerToHyperService,
};
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tower::{service_fn, Layer, Service, ServiceBuilder, ServiceExt};
use tower_pg_session::{
    crypto::Keyring,
    oidc::{OidcClient, OidcConfig, OidcRoutesLayer, RequireLoginLayer, User},
    PgStore, PruneConfig, Session, SessionError, SessionLayer, SigningKeys,
};

#[tokio::main]
async fn main() -> Result<(), Box<dyn Error>> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,sqlx=warn".into()),
        )
        .init();

    let bind: SocketAddr = env::var("BIND_ADDR")
        .unwrap_or_else(|_| "127.0.0.1:3000".to_owned())
        .parse()?;
    let app_url = env::var("APP_URL").unwrap_or_else(|_| format!("http://{bind}"));

    let store = PgStore::connect(&required("DATABASE_URL")?).await?;
    let _pruner = store.spawn_pruner(PruneConfig::new())?;
    let token_keys = Keyring::from_base64_list(&required("TOKEN_KEYS")?)?;
    let config = OidcConfig::new(
        &required("OIDC_ISSUER")?,
        &required("OIDC_CLIENT_ID")?,
        &app_url,
        token_keys,
    )?
    .with_client_secret(&required("OIDC_CLIENT_SECRET")?);
    let oidc = OidcClient::discover(config, store.clone()).await?;
    let keys = SigningKeys::new(required("SESSION_SECRET")?.split(',').map(str::trim))?;
    let sessions = SessionLayer::new(store, keys);

    let listener = TcpListener::bind(bind).await?;
    tracing::info!("listening on http://{bind}");
    serve(listener, app(sessions, oidc)).await?;
    Ok(())
}

fn required(name: &str) -> Result<String, String> {
    env::var(name).map_err(|_| format!("{name} is not set (see the header of examples/hyper.rs)"))
}

/// The tower stack; the same function serves `main` and the tests.
/// (`pub(crate)`: `tests/examples.rs` includes this file as a module.)
pub(crate) fn app(
    sessions: SessionLayer,
    oidc: OidcClient,
) -> impl Service<
    Request<Incoming>,
    Response = Response<Full<Bytes>>,
    Error = Infallible,
    Future: Send + 'static,
> + Clone
       + Send
       + 'static {
    ServiceBuilder::new()
        // Reads the session cookie and puts a `Session` into every request;
        // after the handler, saves what it changed and sets the cookie.
        .layer(sessions)
        // GET /auth/login?return_to=/path, GET /auth/callback,
        // POST /auth/logout, POST /auth/backchannel-logout; every other
        // request goes on to the handler.
        .layer(OidcRoutesLayer::new(oidc.clone()))
        // Our request handler, with the OpenID client its guard checks with.
        .service_fn(move |request| handle(oidc.clone(), request))
}

/// Accepts connections until the listener fails.
pub(crate) async fn serve<S>(listener: TcpListener, service: S) -> std::io::Result<()>
where
    S: Service<Request<Incoming>, Response = Response<Full<Bytes>>, Error = Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    loop {
        let (stream, _) = listener.accept().await?;
        // hyper has a `Service` trait of its own; this adapter calls the
        // tower service (one clone per connection).
        let service = TowerToHyperService::new(service.clone());
        tokio::spawn(async move {
            // HTTP/1.1 or HTTP/2, whichever the client speaks.
            let served = auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), service)
                .await;
            if let Err(e) = served {
                tracing::debug!(error = %e, "connection ended with an error");
            }
        });
    }
}

async fn handle(
    oidc: OidcClient,
    request: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let Some(session) = request.extensions().get::<Session>().cloned() else {
        return Ok(text(
            StatusCode::INTERNAL_SERVER_ERROR,
            "no session: put tower_pg_session::SessionLayer around this service",
        ));
    };
    let response = match (request.method(), request.uri().path()) {
        (&Method::GET, "/counter") => counter(&session).await,
        // Only this route needs a login: the guard wraps its handler alone.
        // (It must run inside the session layer, as here: it reads the session.)
        (&Method::GET, "/me") => {
            RequireLoginLayer::new(oidc)
                .layer(service_fn(me))
                .oneshot(request)
                .await?
        }
        _ => text(StatusCode::NOT_FOUND, "not found"),
    };
    Ok(response)
}

async fn counter(session: &Session) -> Response<Full<Bytes>> {
    let count = async {
        let n: u64 = session.get("count").await?.unwrap_or(0) + 1;
        session.insert("count", &n).await?;
        Ok::<_, SessionError>(n)
    };
    match count.await {
        Ok(n) => json_response(&json!({ "count": n })),
        // When the store failed, the session layer answers 503 instead.
        Err(e) => text(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string()),
    }
}

async fn me(request: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    // The guard put the user there; without one the request never gets here.
    let Some(user) = request.extensions().get::<User>() else {
        return Ok(text(
            StatusCode::INTERNAL_SERVER_ERROR,
            "no user: put RequireLoginLayer around this handler",
        ));
    };
    Ok(json_response(&json!({
        "sub": user.sub(),
        "email": user.claims().get("email"),
        "groups": user.groups(),
    })))
}

fn text(status: StatusCode, body: &str) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::from(body.to_owned()));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

fn json_response(body: &Value) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::from(body.to_string()));
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}
