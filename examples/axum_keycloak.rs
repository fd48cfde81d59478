//! Log in with Keycloak on an axum app whose sessions live in Postgres.
//!
//! It shows:
//! - the issuer built from a Keycloak base URL and realm (`{base}/realms/{realm}`);
//!   logout goes through the `end_session_endpoint` found by discovery;
//! - the layers stacked with `ServiceBuilder`: the session layer first, then
//!   the login guard, which reads the session the first one put in the request;
//! - the `Session` extractor in the login handlers and the `User` extractor
//!   behind the guard;
//! - routes `GET /` (a logout button), `GET /auth/login?return_to=/path`,
//!   `GET /auth/callback`, `POST /auth/logout` (same origin only),
//!   `POST /auth/backchannel-logout` (Keycloak ends sessions) and `GET /me`
//!   (a browser is sent to the login and back, an API client gets 401).
//!
//! Keycloak setup (admin console, Keycloak 2x):
//! 1. Create a realm, e.g. `acme`.
//! 2. Clients → Create client: type OpenID Connect, a client ID (`web`);
//!    turn "Client authentication" on (a confidential client) and keep only
//!    "Standard flow" (the authorization code flow).
//! 3. In its settings: Valid redirect URIs `{APP_URL}/auth/callback`, Valid
//!    post logout redirect URIs `{APP_URL}/`.
//! 4. Logout settings: Backchannel logout URL
//!    `{APP_URL}/auth/backchannel-logout`, "Backchannel logout session
//!    required" on (Keycloak must be able to reach `APP_URL`).
//! 5. Advanced → Proof Key for Code Exchange Code Challenge Method: `S256`
//!    (the app always sends PKCE; this makes Keycloak insist on it).
//! 6. Credentials tab: copy the client secret. Users → Add user, and set a
//!    password under Credentials.
//!
//! Environment:
//!
//! | variable | meaning |
//! |---|---|
//! | `KEYCLOAK_URL` | Keycloak's base URL, `https://sso.example.com` (older versions: `…/auth`) |
//! | `KEYCLOAK_REALM` | the realm, `acme` |
//! | `OIDC_CLIENT_ID`, `OIDC_CLIENT_SECRET` | the client of step 2 |
//! | `APP_URL` | this app's public base URL; default `http://{BIND_ADDR}` |
//! | `BIND_ADDR` | default `127.0.0.1:3000` |
//! | `DATABASE_URL` | `postgres://postgres@127.0.0.1:5432/postgres` |
//! | `SESSION_SECRET` | comma-separated cookie signing keys, 32+ bytes each; the first signs |
//! | `TOKEN_KEYS` | comma-separated base64 32-byte keys sealing the tokens; the first seals |
//! | `OIDC_ISSUER` | for testing against a local provider: the issuer to use instead of `{KEYCLOAK_URL}/realms/{KEYCLOAK_REALM}` |
//!
//! Cookies are `Secure`: serve `APP_URL` over https, or use `localhost` /
//! `127.0.0.1`, where browsers accept them over plain http.
//!
//! ```not_rust
//! KEYCLOAK_URL=https://sso.example.com KEYCLOAK_REALM=acme \
//! OIDC_CLIENT_ID=web OIDC_CLIENT_SECRET=… APP_URL=http://127.0.0.1:3000 \
//! DATABASE_URL=postgres://postgres@127.0.0.1:5432/postgres \
//! SESSION_SECRET="$(openssl rand -base64 48)" TOKEN_KEYS="$(openssl rand -base64 32)" \
//! cargo run --example axum_keycloak
//! # open http://127.0.0.1:3000/me; keep both keys fixed to keep sessions across restarts
//!
//! # against the local provider of this repository instead of a Keycloak
//! # (any user name and password; client `demo` / `demo-secret`):
//! (cd tests/idp && npm ci && PORT=4000 IDP_FLAVOR=keycloak node server.js) &
//! OIDC_ISSUER=http://127.0.0.1:4000/realms/test OIDC_CLIENT_ID=demo OIDC_CLIENT_SECRET=demo-secret \
//! DATABASE_URL=postgres://postgres@127.0.0.1:5432/postgres \
//! SESSION_SECRET="$(openssl rand -base64 48)" TOKEN_KEYS="$(openssl rand -base64 32)" \
//! cargo run --example axum_keycloak
//! ```

use std::{env, error::Error, net::SocketAddr};

use axum::{response::Html, routing::get, Json, Router};
use serde_json::{json, Value};
use tower_pg_session::{
    crypto::Keyring,
    oidc::{OidcClient, OidcConfig, RequireLoginLayer, User},
    ConfigError, PgStore, PruneConfig, SessionLayer, SigningKeys,
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
    let issuer = match env::var("OIDC_ISSUER") {
        Ok(issuer) => issuer,
        Err(_) => keycloak_issuer(&required("KEYCLOAK_URL")?, &required("KEYCLOAK_REALM")?),
    };

    let store = PgStore::connect(&required("DATABASE_URL")?).await?;
    let _pruner = store.spawn_pruner(PruneConfig::new())?;
    let config = oidc_config(
        &issuer,
        &required("OIDC_CLIENT_ID")?,
        &required("OIDC_CLIENT_SECRET")?,
        &app_url,
        Keyring::from_base64_list(&required("TOKEN_KEYS")?)?,
    )?;
    let oidc = OidcClient::discover(config, store.clone()).await?;
    let keys = SigningKeys::new(required("SESSION_SECRET")?.split(',').map(str::trim))?;
    let sessions = SessionLayer::new(store, keys);

    let listener = tokio::net::TcpListener::bind(bind).await?;
    tracing::info!(%issuer, "listening on http://{bind}; open {app_url}/me to log in");
    axum::serve(listener, app(oidc, sessions)).await?;
    Ok(())
}

fn required(name: &str) -> Result<String, String> {
    env::var(name)
        .map_err(|_| format!("{name} is not set (see the header of examples/axum_keycloak.rs)"))
}

/// Keycloak's issuer for a realm. (`pub(crate)`: `tests/examples.rs`
/// includes this file as a module.)
pub(crate) fn keycloak_issuer(base: &str, realm: &str) -> String {
    format!("{}/realms/{realm}", base.trim_end_matches('/'))
}

/// A confidential client of `issuer` for the app at `app_url`.
pub(crate) fn oidc_config(
    issuer: &str,
    client_id: &str,
    client_secret: &str,
    app_url: &str,
    token_keys: Keyring,
) -> Result<OidcConfig, ConfigError> {
    // Callback `{app_url}/auth/callback`, post-logout redirect `{app_url}/`:
    // the URIs registered in steps 3 and 4.
    Ok(OidcConfig::new(issuer, client_id, app_url, token_keys)?.with_client_secret(client_secret))
}

/// The routes; the same function serves `main` and the tests.
pub(crate) fn app(oidc: OidcClient, sessions: SessionLayer) -> Router {
    // Only `/me` needs a login: the guard finds the user in the session (or
    // refreshes the access token, or turns the request away).
    let protected = Router::new()
        .route("/me", get(me))
        .route_layer(RequireLoginLayer::new(oidc.clone()));
    Router::new()
        .route("/", get(home))
        .merge(protected)
        // GET /auth/login?return_to=/path, GET /auth/callback,
        // POST /auth/logout, POST /auth/backchannel-logout.
        .merge(oidc.routes())
        // Outside everything that uses the session.
        .layer(sessions)
}

async fn home() -> Html<&'static str> {
    Html(
        "<!doctype html><meta charset=utf-8><title>Keycloak login</title>\
         <p><a href=\"/me\">/me</a> (logs you in first)</p>\
         <form method=post action=\"/auth/logout\"><button>Log out</button></form>",
    )
}

async fn me(user: User) -> Json<Value> {
    let claim = |name: &str| user.claims().get(name).cloned().unwrap_or(Value::Null);
    Json(json!({
        "sub": user.sub(),
        "preferred_username": claim("preferred_username"),
        "name": claim("name"),
        "email": claim("email"),
        // Keycloak sends `groups` with a "Group Membership" mapper on the client.
        "groups": user.groups(),
    }))
}
