//! A gRPC service behind the session layer and the login guard, with tonic.
//!
//! It shows:
//! - `Server::builder().layer(SessionLayer).layer(RequireLoginLayer)`: the
//!   session layer reads the session cookie from the call's `cookie`
//!   metadata (an HTTP/2 header, which is what a browser's grpc-web call
//!   carries), then the guard lets only logged-in users through;
//! - a call without a logged-in session ends with `UNAUTHENTICATED` before
//!   reaching any service: the guard answers gRPC requests itself (HTTP 200,
//!   `grpc-status: 16`), no tonic code involved;
//! - where a gRPC handler finds the user: the request's extensions
//!   (`request.extensions().get::<User>()`), here in an interceptor that logs
//!   who calls;
//! - the service is tonic-health's `grpc.health.v1.Health`, so the example
//!   needs no `.proto` file and no `build.rs`.
//!
//! Logging in needs a browser, so the example also serves the login on a
//! second port, with axum: `GET /` (who is logged in), `GET /auth/login`,
//! `GET /auth/callback`, `POST /auth/logout`. Both servers share the
//! database and the signing keys, so the cookie set by the login opens the
//! same session on the gRPC port. Browsers do not scope cookies by port, so
//! a grpc-web front end served from the same host can send it along
//! (`credentials: "include"`; grpc-web also needs a translation, `tonic-web`
//! or a proxy, not shown). Another client copies it from the browser
//! (developer tools → Storage/Application → Cookies) into the `cookie`
//! metadata, as `cargo run --example tonic -- check` does.
//!
//! Provider setup: register a confidential client (authorization code flow)
//! with redirect URI `{APP_URL}/auth/callback` and post-logout redirect URI
//! `{APP_URL}/`; `examples/axum_keycloak.rs` and `examples/axum_cognito.rs`
//! list the steps for Keycloak and Cognito.
//!
//! Environment:
//!
//! | variable | meaning |
//! |---|---|
//! | `OIDC_ISSUER` | the provider's issuer, `https://sso.example.com/realms/acme` |
//! | `OIDC_CLIENT_ID`, `OIDC_CLIENT_SECRET` | the client |
//! | `APP_URL` | the login's public base URL; default `http://{BIND_ADDR}` |
//! | `BIND_ADDR` | the login (HTTP); default `127.0.0.1:3000` |
//! | `GRPC_ADDR` | the gRPC service; default `127.0.0.1:50051` |
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
//! cargo run --example tonic
//!
//! cargo run --example tonic -- check                      # Error: … Unauthenticated …
//! # log in at http://127.0.0.1:3000/auth/login, copy the `session` cookie, then:
//! cargo run --example tonic -- check 'session=<its value>'  # Serving
//! ```

use std::{env, error::Error, future::IntoFuture, net::SocketAddr};

use axum::{routing::get, Router};
use tokio::net::TcpListener;
use tonic::{
    metadata::MetadataValue,
    service::interceptor::InterceptedService,
    transport::{server::TcpIncoming, Channel, Server},
    Request, Status,
};
use tonic_health::pb::{
    health_check_response::ServingStatus, health_client::HealthClient, HealthCheckRequest,
};
use tower_pg_session::{
    crypto::Keyring,
    oidc::{OidcClient, OidcConfig, RequireLoginLayer, User},
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

    let grpc_addr: SocketAddr = env::var("GRPC_ADDR")
        .unwrap_or_else(|_| "127.0.0.1:50051".to_owned())
        .parse()?;
    let mut args = env::args().skip(1);
    if args.next().as_deref() == Some("check") {
        // `check ['session=…']`: one Health/Check call, as a client would.
        let status = check(&format!("http://{grpc_addr}"), args.next().as_deref()).await?;
        println!("{status:?}");
        return Ok(());
    }

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
    // One layer (one store, one set of keys) for both servers.
    let sessions = SessionLayer::new(store, keys);

    let http = TcpListener::bind(bind).await?;
    let grpc = TcpListener::bind(grpc_addr).await?;
    tracing::info!("login on {app_url}/auth/login, gRPC on {grpc_addr}");
    tokio::select! {
        served = axum::serve(http, login_app(oidc.clone(), sessions.clone())).into_future() => served?,
        served = serve_grpc(grpc, sessions, oidc) => served?,
    }
    Ok(())
}

fn required(name: &str) -> Result<String, String> {
    env::var(name).map_err(|_| format!("{name} is not set (see the header of examples/tonic.rs)"))
}

/// The gRPC server; the same function serves `main` and the tests.
/// (`pub(crate)`: `tests/examples.rs` includes this file as a module.)
pub(crate) async fn serve_grpc(
    listener: TcpListener,
    sessions: SessionLayer,
    oidc: OidcClient,
) -> Result<(), tonic::transport::Error> {
    let (_reporter, health) = tonic_health::server::health_reporter();
    Server::builder()
        // First the session: it reads the `cookie` metadata.
        .layer(sessions)
        // Then the guard: no logged-in user, no call (UNAUTHENTICATED). Its
        // token refresh needs the session layer outside it, as here.
        .layer(RequireLoginLayer::new(oidc))
        // An interceptor on the service (a tonic `InterceptorLayer` in the
        // `.layer(..)` chain would not do: its response body has no
        // `Default`, which the guard outside it needs for its own answers).
        .add_service(InterceptedService::new(health, log_caller))
        .serve_with_incoming(TcpIncoming::from(listener))
        .await
}

/// Where a gRPC handler finds the logged-in user: in the extensions.
fn log_caller(request: Request<()>) -> Result<Request<()>, Status> {
    match request.extensions().get::<User>() {
        Some(user) => {
            tracing::info!(sub = user.sub(), "gRPC call");
            Ok(request)
        }
        None => Err(Status::internal(
            "no user: put RequireLoginLayer in front of this service",
        )),
    }
}

/// One `grpc.health.v1.Health/Check` call, with `cookie` (`session=…`) as
/// its `cookie` metadata when given.
pub(crate) async fn check(grpc_url: &str, cookie: Option<&str>) -> Result<ServingStatus, Status> {
    let channel = Channel::from_shared(grpc_url.to_owned())
        .map_err(|e| Status::invalid_argument(e.to_string()))?
        .connect()
        .await
        .map_err(|e| Status::unavailable(e.to_string()))?;
    let mut request = Request::new(HealthCheckRequest {
        service: String::new(), // the server as a whole
    });
    if let Some(cookie) = cookie {
        let value = MetadataValue::try_from(cookie)
            .map_err(|_| Status::invalid_argument("the cookie is not a valid header value"))?;
        request.metadata_mut().insert("cookie", value);
    }
    let response = HealthClient::new(channel).check(request).await?;
    Ok(response.into_inner().status())
}

/// The login, over HTTP; the same function serves `main` and the tests.
pub(crate) fn login_app(oidc: OidcClient, sessions: SessionLayer) -> Router {
    Router::new()
        .route("/", get(home))
        // GET /auth/login, GET /auth/callback, POST /auth/logout,
        // POST /auth/backchannel-logout.
        .merge(oidc.routes())
        .layer(sessions)
}

async fn home(session: Session) -> Result<String, SessionError> {
    Ok(match session.user_id().await? {
        Some(user) => format!(
            "Logged in as {user}. Call the gRPC service with this browser's `session` cookie."
        ),
        None => "Not logged in: GET /auth/login".to_owned(),
    })
}
