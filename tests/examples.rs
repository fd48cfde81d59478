//! The examples, run: each test builds the example's app with the functions
//! its `main` calls (the example file is included as a module), serves it on
//! a real socket, and logs in through the local OpenID provider (tests/idp)
//! in the matching flavor with the scripted browser.
#![cfg(all(feature = "axum", feature = "oidc"))]
#![allow(clippy::unwrap_used)]

mod common;

// Their `main`s are not run; what only `main` uses is dead code here.
#[path = "../examples/axum_cognito.rs"]
#[allow(dead_code)]
mod axum_cognito;
#[path = "../examples/axum_keycloak.rs"]
#[allow(dead_code)]
mod axum_keycloak;
#[path = "../examples/hyper.rs"]
#[allow(dead_code)]
mod example_hyper;
#[path = "../examples/tonic.rs"]
#[allow(dead_code)]
mod example_tonic;

use std::sync::Arc;

use axum::http::StatusCode;
use common::{idp::*, Db, KEY_A};
use reqwest::cookie::{CookieStore, Jar};
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus;
use tower_pg_session::{
    crypto::Keyring,
    oidc::{OidcClient, OidcConfig, Provider},
    PgStore, SessionLayer, SigningKeys,
};

/// A listener on a free port of 127.0.0.1 and its base URL (the `APP_URL`).
async fn bind() -> (TcpListener, String) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    (listener, url)
}

/// Serves an example's axum `router` on `listener` in the background.
fn serve(listener: TcpListener, router: axum::Router) {
    tokio::spawn(async move { axum::serve(listener, router).await.unwrap() });
}

/// The examples' session layer: `Secure` cookies (the default), which the
/// scripted browser, like real ones, sends over plain http to 127.0.0.1.
fn sessions(store: PgStore) -> SessionLayer {
    SessionLayer::new(store, SigningKeys::new([KEY_A]).unwrap())
}

/// What every example runs on: a database, a socket for the app (and its
/// URL), a provider of `flavor` that knows the app as its client, a store.
async fn bed(flavor: &str) -> (Db, TcpListener, String, Idp, PgStore) {
    let db = Db::new().await;
    let (listener, app) = bind().await;
    let idp = Idp::start(flavor, std::slice::from_ref(&app), 3600).await;
    let store = db.store().await;
    (db, listener, app, idp, store)
}

/// The setup of the axum_keycloak example's `main`.
async fn keycloak_client(issuer: &str, app: &str, store: PgStore) -> OidcClient {
    let config =
        axum_keycloak::oidc_config(issuer, CLIENT_ID, CLIENT_SECRET, app, Keyring::generate())
            .unwrap();
    OidcClient::discover(config, store).await.unwrap()
}

/// The generic setup of the hyper and tonic examples' `main`.
async fn generic_client(idp: &Idp, app: &str, store: PgStore) -> OidcClient {
    let config = OidcConfig::new(&idp.issuer, CLIENT_ID, app, Keyring::generate())
        .unwrap()
        .with_client_secret(CLIENT_SECRET);
    OidcClient::discover(config, store).await.unwrap()
}

#[tokio::test]
async fn axum_keycloak_logs_in_shows_me_and_logs_out_at_keycloak() {
    let (db, listener, app, idp, store) = bed("keycloak").await;
    // KEYCLOAK_URL and KEYCLOAK_REALM name the local provider's realm.
    let issuer = axum_keycloak::keycloak_issuer(&format!("{}/", idp.base), "test");
    assert_eq!(issuer, idp.issuer);
    let oidc = keycloak_client(&issuer, &app, store.clone()).await;
    assert_eq!(oidc.provider(), &Provider::Keycloak);
    serve(listener, axum_keycloak::app(oidc, sessions(store)));

    let b = Browser::new();
    let r = b.get(&format!("{app}/me")).await;
    assert_eq!(r.status(), StatusCode::FOUND, "a browser goes to the login");
    assert_eq!(location(&r), "/auth/login?return_to=%2Fme");
    let r = b.me(&app).await;
    assert_eq!(
        r.status(),
        StatusCode::UNAUTHORIZED,
        "an API client gets 401"
    );

    let r = b.login(&app, "alice", "/me").await;
    assert_eq!(r.status(), StatusCode::FOUND);
    assert_eq!(location(&r), "/me");
    let r = b.me(&app).await;
    assert_eq!(r.status(), StatusCode::OK);
    let me: Value = r.json().await.unwrap();
    assert_eq!(me["sub"], "alice");
    assert_eq!(me["preferred_username"], "alice");
    assert_eq!(me["email"], "alice@example.test");

    // To Keycloak's end_session_endpoint, which comes back to {APP_URL}/.
    let to = b.logout(&app).await;
    assert!(
        to.starts_with(&format!("{issuer}/protocol/openid-connect/logout?")),
        "{to}"
    );
    assert!(to.contains("id_token_hint="), "{to}");
    assert!(
        to.contains(&format!(
            "post_logout_redirect_uri={}",
            urlencode(&format!("{app}/"))
        )),
        "{to}"
    );
    assert_eq!(b.me(&app).await.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(b.get(&format!("{app}/")).await.status(), StatusCode::OK);
    db.drop_schema().await;
}

#[tokio::test]
async fn axum_keycloak_back_channel_logout_ends_the_session() {
    let (db, listener, app, idp, store) = bed("keycloak").await;
    let oidc = keycloak_client(&idp.issuer, &app, store.clone()).await;
    serve(listener, axum_keycloak::app(oidc, sessions(store)));

    let b = Browser::new();
    assert_eq!(b.login(&app, "ivan", "/").await.status(), StatusCode::FOUND);
    assert_eq!(b.me(&app).await.status(), StatusCode::OK);

    // The user signs out at the provider (its own page), which then posts a
    // logout token to {APP_URL}/auth/backchannel-logout.
    b.logout_at_provider(&idp.issuer).await;
    assert_eq!(
        b.me(&app).await.status(),
        StatusCode::UNAUTHORIZED,
        "the session ended through the back channel"
    );
    assert_eq!(db.rows().await, 0);
    db.drop_schema().await;
}

#[tokio::test]
async fn axum_cognito_logs_in_with_groups_and_logs_out_at_the_hosted_ui() {
    assert_eq!(
        axum_cognito::cognito_issuer("eu-west-1", "eu-west-1_AbC123"),
        "https://cognito-idp.eu-west-1.amazonaws.com/eu-west-1_AbC123"
    );
    let (db, listener, app, idp, store) = bed("cognito").await;
    // OIDC_ISSUER, the override for a local provider; COGNITO_DOMAIN, the
    // provider's origin, where it serves the hosted UI's /logout.
    let config = axum_cognito::oidc_config(
        &idp.issuer,
        &idp.base,
        CLIENT_ID,
        CLIENT_SECRET,
        &app,
        Keyring::generate(),
    )
    .unwrap();
    let oidc = OidcClient::discover(config, store.clone()).await.unwrap();
    assert!(matches!(oidc.provider(), Provider::Cognito { .. }));
    serve(listener, axum_cognito::app(oidc, sessions(store)));

    let b = Browser::new();
    assert_eq!(b.me(&app).await.status(), StatusCode::UNAUTHORIZED);
    let auth = b.start_login(&app, "/me").await;
    assert!(auth.contains("scope=openid+email+profile"), "{auth}");
    let callback = b.authorize(&auth, "heidi").await;
    let r = b.get(&callback).await;
    assert_eq!(r.status(), StatusCode::FOUND);
    assert_eq!(location(&r), "/me");
    let me: Value = b.me(&app).await.json().await.unwrap();
    assert_eq!(me["sub"], "heidi");
    assert_eq!(me["username"], "heidi");
    assert_eq!(me["email"], "heidi@example.test");
    assert_eq!(me["groups"], json!(["admins", "users"]));

    // To the hosted UI's /logout (Cognito has no end_session_endpoint), which
    // accepts it and comes back to {APP_URL}/.
    let to = b.logout(&app).await;
    assert!(to.starts_with(&format!("{}/logout?", idp.base)), "{to}");
    assert!(to.contains(&format!("client_id={CLIENT_ID}")), "{to}");
    assert!(
        to.contains(&format!("logout_uri={}", urlencode(&format!("{app}/")))),
        "{to}"
    );
    let r = b.get(&to).await;
    assert_eq!(r.status(), StatusCode::FOUND);
    assert_eq!(location(&r), format!("{app}/"));
    assert_eq!(b.get(&format!("{app}/")).await.status(), StatusCode::OK);
    assert_eq!(b.me(&app).await.status(), StatusCode::UNAUTHORIZED);
    db.drop_schema().await;
}

#[tokio::test]
async fn hyper_counts_over_a_socket_and_guards_me() {
    let (db, listener, app, idp, store) = bed("keycloak").await;
    let oidc = generic_client(&idp, &app, store.clone()).await;
    let service = example_hyper::app(sessions(store), oidc);
    tokio::spawn(async move { example_hyper::serve(listener, service).await.unwrap() });

    let b = Browser::new();
    for n in 1..=3 {
        let r = b.api(&format!("{app}/counter")).await;
        assert_eq!(r.status(), StatusCode::OK);
        let body: Value = r.json().await.unwrap();
        assert_eq!(body, json!({ "count": n }));
    }

    let r = b.me(&app).await;
    assert_eq!(
        r.status(),
        StatusCode::UNAUTHORIZED,
        "an API request without login"
    );
    assert!(r.headers().contains_key("www-authenticate"));
    let r = b.get(&format!("{app}/me")).await;
    assert_eq!(r.status(), StatusCode::FOUND);
    assert_eq!(location(&r), "/auth/login?return_to=%2Fme");

    // The login through the hand-dispatched routes; return_to is decoded.
    let r = b.login(&app, "alice", "/me").await;
    assert_eq!(r.status(), StatusCode::FOUND);
    assert_eq!(location(&r), "/me");
    let me: Value = b.me(&app).await.json().await.unwrap();
    assert_eq!(me["sub"], "alice");
    assert_eq!(me["email"], "alice@example.test");
    let body: Value = b.api(&format!("{app}/counter")).await.json().await.unwrap();
    assert_eq!(
        body,
        json!({ "count": 4 }),
        "the login kept the session's data"
    );

    let to = b.logout(&app).await;
    assert!(
        to.starts_with(&format!("{}/protocol/openid-connect/logout?", idp.issuer)),
        "{to}"
    );
    assert_eq!(b.me(&app).await.status(), StatusCode::UNAUTHORIZED);
    let r = b.api(&format!("{app}/nowhere")).await;
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    db.drop_schema().await;
}

#[tokio::test]
async fn tonic_refuses_calls_without_a_login_and_serves_a_logged_in_cookie() {
    let (db, http_listener, app, idp, store) = bed("keycloak").await;
    let (grpc_listener, grpc_url) = bind().await;
    let oidc = generic_client(&idp, &app, store.clone()).await;
    let layer = sessions(store);
    let login = example_tonic::login_app(oidc.clone(), layer.clone());
    serve(http_listener, login);
    tokio::spawn(async move {
        example_tonic::serve_grpc(grpc_listener, layer, oidc)
            .await
            .unwrap()
    });

    // A real tonic client (HealthClient), without a session, then with a
    // cookie that is not one.
    let err = example_tonic::check(&grpc_url, None).await.unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");
    let err = example_tonic::check(&grpc_url, Some("session=forged.tag"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");

    // Log in over HTTP with a browser whose cookie jar we can read.
    let jar = Arc::new(Jar::default());
    let b = Browser {
        http: reqwest::Client::builder()
            .cookie_provider(jar.clone())
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .unwrap(),
    };
    assert_eq!(
        b.login(&app, "alice", "/").await.status(),
        StatusCode::FOUND
    );
    let home = b.get(&format!("{app}/")).await.text().await.unwrap();
    assert!(home.starts_with("Logged in as alice"), "{home}");
    // Cookies are not scoped by port: the provider's, also on 127.0.0.1,
    // are in the jar too; take the app's.
    let header = jar.cookies(&app.parse().unwrap()).unwrap();
    let cookie = header
        .to_str()
        .unwrap()
        .split("; ")
        .find(|c| c.starts_with("session="))
        .unwrap()
        .to_owned();

    // The session cookie in the call's metadata, as grpc-web sends it.
    let status = example_tonic::check(&grpc_url, Some(&cookie))
        .await
        .unwrap();
    assert_eq!(status, ServingStatus::Serving);

    // After logout the same cookie opens nothing.
    b.logout(&app).await;
    let err = example_tonic::check(&grpc_url, Some(&cookie))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");
    db.drop_schema().await;
}
