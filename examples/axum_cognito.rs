//! Log in with an Amazon Cognito user pool on an axum app whose sessions live
//! in Postgres.
//!
//! It shows:
//! - the issuer of a user pool (`https://cognito-idp.{region}.amazonaws.com/{pool}`)
//!   and the hosted UI's origin set with `OidcConfig::with_cognito_domain`:
//!   Cognito's discovery has no `end_session_endpoint`, logout goes to the
//!   hosted UI's `/logout?client_id=…&logout_uri=…`;
//! - the user's Cognito groups (`cognito:groups`) from `User::groups()`;
//! - the layers stacked with `ServiceBuilder` (the session layer first, then
//!   the login guard), the `Session` extractor in the login handlers and the
//!   `User` extractor behind the guard;
//! - routes `GET /` (a logout button), `GET /auth/login?return_to=/path`,
//!   `GET /auth/callback`, `POST /auth/logout` (same origin only) and
//!   `GET /me`. Cognito has no back-channel logout: a session ends with the
//!   app's logout, or when Cognito refuses to refresh its tokens (revoked, or
//!   the user signed out everywhere with `GlobalSignOut`), which the guard
//!   turns into a logout; it refreshes shortly before the access token
//!   expires, so that happens within the token's lifetime (1 hour by default).
//!
//! Cognito setup (AWS console):
//! 1. Create a user pool (Amazon Cognito → User pools); note its region and
//!    ID (`eu-west-1_AbC123`).
//! 2. Give it a domain (Branding → Domain): a Cognito domain
//!    `https://<prefix>.auth.<region>.amazoncognito.com` or your own; that
//!    origin is `COGNITO_DOMAIN`, where the hosted UI and `/logout` live.
//! 3. Create an app client of type "Traditional web application" (it has a
//!    client secret). Under its login pages: allowed callback URL
//!    `{APP_URL}/auth/callback`, allowed sign-out URL `{APP_URL}/`, grant
//!    type "Authorization code grant", OpenID Connect scopes `openid`,
//!    `email`, `profile`. Keep token revocation on (logout revokes the
//!    refresh token).
//! 4. Copy the app client's ID and secret. Create users; create groups and
//!    add users to them to see `groups` in `/me`.
//!
//! Environment:
//!
//! | variable | meaning |
//! |---|---|
//! | `COGNITO_REGION` | the pool's region, `eu-west-1` |
//! | `COGNITO_USER_POOL_ID` | `eu-west-1_AbC123` |
//! | `COGNITO_DOMAIN` | the hosted UI's origin, `https://acme.auth.eu-west-1.amazoncognito.com` |
//! | `OIDC_CLIENT_ID`, `OIDC_CLIENT_SECRET` | the app client of step 3 |
//! | `APP_URL` | this app's public base URL; default `http://{BIND_ADDR}` |
//! | `BIND_ADDR` | default `127.0.0.1:3000` |
//! | `DATABASE_URL` | `postgres://postgres@127.0.0.1:5432/postgres` |
//! | `SESSION_SECRET` | comma-separated cookie signing keys, 32+ bytes each; the first signs |
//! | `TOKEN_KEYS` | comma-separated base64 32-byte keys sealing the tokens; the first seals |
//! | `OIDC_ISSUER` | for testing against a local provider: the issuer to use instead of the one built from `COGNITO_REGION` and `COGNITO_USER_POOL_ID` |
//!
//! Cognito accepts `http` callback URLs only for `localhost`; cookies are
//! `Secure`, which browsers accept over plain http on `localhost` too.
//!
//! ```not_rust
//! COGNITO_REGION=eu-west-1 COGNITO_USER_POOL_ID=eu-west-1_AbC123 \
//! COGNITO_DOMAIN=https://acme.auth.eu-west-1.amazoncognito.com \
//! OIDC_CLIENT_ID=… OIDC_CLIENT_SECRET=… APP_URL=http://localhost:3000 \
//! DATABASE_URL=postgres://postgres@127.0.0.1:5432/postgres \
//! SESSION_SECRET="$(openssl rand -base64 48)" TOKEN_KEYS="$(openssl rand -base64 32)" \
//! cargo run --example axum_cognito
//! # open http://localhost:3000/me; keep both keys fixed to keep sessions across restarts
//!
//! # against the Cognito-like local provider of this repository (any user
//! # name and password; client `demo` / `demo-secret`; groups admins, users):
//! (cd tests/idp && npm ci && PORT=4000 IDP_FLAVOR=cognito node server.js) &
//! OIDC_ISSUER=http://127.0.0.1:4000/us-east-1_TestPool COGNITO_DOMAIN=http://127.0.0.1:4000 \
//! OIDC_CLIENT_ID=demo OIDC_CLIENT_SECRET=demo-secret \
//! DATABASE_URL=postgres://postgres@127.0.0.1:5432/postgres \
//! SESSION_SECRET="$(openssl rand -base64 48)" TOKEN_KEYS="$(openssl rand -base64 32)" \
//! cargo run --example axum_cognito
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
        Err(_) => cognito_issuer(
            &required("COGNITO_REGION")?,
            &required("COGNITO_USER_POOL_ID")?,
        ),
    };

    let store = PgStore::connect(&required("DATABASE_URL")?).await?;
    let _pruner = store.spawn_pruner(PruneConfig::new())?;
    let config = oidc_config(
        &issuer,
        &required("COGNITO_DOMAIN")?,
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
        .map_err(|_| format!("{name} is not set (see the header of examples/axum_cognito.rs)"))
}

/// The issuer of a user pool. (`pub(crate)`: `tests/examples.rs` includes
/// this file as a module.)
pub(crate) fn cognito_issuer(region: &str, user_pool_id: &str) -> String {
    format!("https://cognito-idp.{region}.amazonaws.com/{user_pool_id}")
}

/// A client (with a secret) of the user pool at `issuer` whose hosted UI is
/// at `domain`, for the app at `app_url`.
pub(crate) fn oidc_config(
    issuer: &str,
    domain: &str,
    client_id: &str,
    client_secret: &str,
    app_url: &str,
    token_keys: Keyring,
) -> Result<OidcConfig, ConfigError> {
    // Callback `{app_url}/auth/callback`, sign-out URL `{app_url}/`: the URLs
    // allowed in step 3.
    OidcConfig::new(issuer, client_id, app_url, token_keys)?
        .with_client_secret(client_secret)
        // Exactly the scopes the app client allows: Cognito refuses others.
        .with_scopes(["openid", "email", "profile"])
        // Logout goes to `{domain}/logout`.
        .with_cognito_domain(domain)
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
        "<!doctype html><meta charset=utf-8><title>Cognito login</title>\
         <p><a href=\"/me\">/me</a> (logs you in first)</p>\
         <form method=post action=\"/auth/logout\"><button>Log out</button></form>",
    )
}

async fn me(user: User) -> Json<Value> {
    let claim = |name: &str| user.claims().get(name).cloned().unwrap_or(Value::Null);
    Json(json!({
        "sub": user.sub(),
        "username": claim("cognito:username"),
        "email": claim("email"),
        "groups": user.groups(),
    }))
}
