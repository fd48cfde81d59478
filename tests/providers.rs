//! Two OpenID providers in one application, each a local provider of its
//! own: logins through either, each completed only at its own callback
//! (mix-up defence), logout and back-channel logout at the right provider,
//! and routes that take one provider's logins only.
#![allow(clippy::unwrap_used)]

mod common;

use axum::{http::StatusCode, routing::get, Json, Router};
use common::{
    idp::{location, Browser, Idp, CLIENT_ID, CLIENT_SECRET},
    Db, KEY_A,
};
use serde_json::{json, Value};
use tower_pg_session::{
    crypto::{EncryptionKey, Keyring},
    oidc::{OidcClient, OidcConfig, OidcProviders, RequireLoginLayer, User},
    SessionLayer, SigningKeys,
};

struct App {
    url: String,
    idp1: Idp,
    idp2: Idp,
    db: Db,
    /// Stops with the test's runtime.
    _server: tokio::task::JoinHandle<()>,
}

/// Provider "1" at the default paths, provider "2" under `/p2/`.
async fn start() -> App {
    let db = Db::new().await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://127.0.0.1:{}", listener.local_addr().unwrap().port());
    let idp1 = Idp::start("keycloak", std::slice::from_ref(&url), 3600).await;
    let idp2 = Idp::start("keycloak", &[format!("{url}/p2")], 3600).await;
    let keys = Keyring::from(EncryptionKey::generate());
    let config1 = OidcConfig::new(&idp1.issuer, CLIENT_ID, &url, keys.clone())
        .unwrap()
        .with_client_secret(CLIENT_SECRET);
    let config2 = OidcConfig::new(&idp2.issuer, CLIENT_ID, &url, keys)
        .unwrap()
        .with_client_secret(CLIENT_SECRET)
        .with_callback_path("p2/auth/callback")
        .with_backchannel_logout_path("p2/auth/backchannel-logout")
        .with_post_logout_redirect(&format!("{url}/p2/"))
        .unwrap();
    let store = db.store().await;
    let one = OidcClient::discover(config1, store.clone()).await.unwrap();
    let two = OidcClient::discover(config2, store.clone()).await.unwrap();
    let providers = OidcProviders::new([("1", one), ("2", two)]).unwrap();
    let whoami = |user: User| async move { Json(json!({"sub": user.sub(), "iss": user.issuer()})) };
    let any = Router::new()
        .route("/me", get(whoami))
        .route_layer(RequireLoginLayer::any(&providers));
    let only_two = Router::new()
        .route("/only2", get(whoami))
        .route_layer(RequireLoginLayer::for_provider(&providers, "2").unwrap());
    let sessions = SessionLayer::builder(store, SigningKeys::new([KEY_A]).unwrap())
        .with_insecure_http_cookie()
        .build()
        .unwrap();
    let app = Router::new()
        .merge(any)
        .merge(only_two)
        .merge(providers.routes())
        .layer(sessions);
    let server = tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    App {
        url,
        idp1,
        idp2,
        db,
        _server: server,
    }
}

async fn me(b: &Browser, url: &str) -> (StatusCode, Value) {
    let r = b.me(url).await;
    (r.status(), r.json().await.unwrap_or(Value::Null))
}

/// Logs in through `provider` ("" for the default); the callback URL the
/// provider sent the browser to.
async fn login(b: &Browser, app: &App, provider: &str, user: &str) -> String {
    let r = b
        .get(&format!("{}/auth/login?provider={provider}", app.url))
        .await;
    assert_eq!(r.status(), StatusCode::FOUND, "provider {provider:?}");
    let callback = b.authorize(&location(&r), user).await;
    let r = b.get(&callback).await;
    assert_eq!(location(&r), "/", "{callback}");
    callback
}

#[tokio::test]
async fn each_provider_logs_in_at_its_own_callback_and_out_at_its_own_end() {
    let app = start().await;
    let b = Browser::new();
    let callback = login(&b, &app, "2", "zoe").await;
    assert!(
        callback.starts_with(&format!("{}/p2/auth/callback?", app.url)),
        "{callback}"
    );
    assert_eq!(
        me(&b, &app.url).await,
        (
            StatusCode::OK,
            json!({"sub": "zoe", "iss": app.idp2.issuer})
        )
    );
    assert_eq!(
        b.api(&format!("{}/only2", app.url)).await.status(),
        StatusCode::OK
    );
    // Logout ends the login at the provider it came from.
    let end = b.logout(&app.url).await;
    assert!(end.starts_with(&app.idp2.base), "{end}");
    assert_eq!(me(&b, &app.url).await.0, StatusCode::UNAUTHORIZED);

    // The default provider, and a route that takes provider 2's logins only.
    let callback = b.start_login(&app.url, "/").await;
    assert!(callback.starts_with(&app.idp1.base), "{callback}");
    login(&b, &app, "1", "amy").await;
    assert_eq!(
        me(&b, &app.url).await,
        (
            StatusCode::OK,
            json!({"sub": "amy", "iss": app.idp1.issuer})
        )
    );
    let r = b.api(&format!("{}/only2", app.url)).await;
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    let r = b.get(&format!("{}/only2", app.url)).await;
    assert_eq!(location(&r), "/auth/login?provider=2&return_to=%2Fonly2");
    let end = b.logout(&app.url).await;
    assert!(end.starts_with(&app.idp1.base), "{end}");

    let r = b.get(&format!("{}/auth/login?provider=3", app.url)).await;
    assert_eq!(r.status(), StatusCode::BAD_REQUEST, "no such provider");
    app.db.drop_schema().await;
}

#[tokio::test]
async fn a_callback_delivered_to_another_providers_path_logs_nobody_in() {
    let app = start().await;
    let b = Browser::new();
    let r = b.get(&format!("{}/auth/login?provider=1", app.url)).await;
    let callback = b.authorize(&location(&r), "zoe").await;
    let query = callback.split_once('?').unwrap().1;
    // Provider 1's code and state at provider 2's callback: refused before
    // any code is sent to provider 2, and the state is spent.
    let r = b
        .api(&format!("{}/p2/auth/callback?{query}", app.url))
        .await;
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"], "issuer_mismatch", "{body}");
    assert!(
        body["error_description"]
            .as_str()
            .unwrap()
            .contains("another provider"),
        "{body}"
    );
    assert_eq!(me(&b, &app.url).await.0, StatusCode::UNAUTHORIZED);
    let r = b.api(&callback).await;
    assert_eq!(
        r.status(),
        StatusCode::BAD_REQUEST,
        "a state is accepted once"
    );
    assert_eq!(me(&b, &app.url).await.0, StatusCode::UNAUTHORIZED);
    app.db.drop_schema().await;
}

#[tokio::test]
async fn a_back_channel_logout_ends_only_its_providers_sessions() {
    let app = start().await;
    let (one, two) = (Browser::new(), Browser::new());
    login(&one, &app, "1", "zoe").await;
    login(&two, &app, "2", "zoe").await;
    // zoe signs out at provider 2 itself: it tells the app's /p2 back channel.
    two.logout_at_provider(&app.idp2.issuer).await;
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    while me(&two, &app.url).await.0 == StatusCode::OK {
        assert!(
            tokio::time::Instant::now() < deadline,
            "provider 2's session still open"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert_eq!(
        me(&one, &app.url).await.0,
        StatusCode::OK,
        "provider 1's login stays"
    );
    app.db.drop_schema().await;
}

#[tokio::test]
async fn conflicting_providers_are_refused_at_construction() {
    let db = Db::new().await;
    let store = db.store().await;
    let keys = Keyring::from(EncryptionKey::generate());
    let client = |issuer: &str, keys: Keyring| {
        OidcClient::lazy(
            OidcConfig::new(issuer, CLIENT_ID, "http://127.0.0.1:1", keys).unwrap(),
            store.clone(),
        )
        .unwrap()
    };
    let a = client("http://127.0.0.1:2/realms/a", keys.clone());
    let b = client("http://127.0.0.1:3/realms/b", keys.clone());
    let err = OidcProviders::new([("a", a.clone()), ("b", b)]).unwrap_err();
    assert!(err.to_string().contains("callback path"), "{err}");
    let other_keys = client(
        "http://127.0.0.1:3/realms/b",
        Keyring::from(EncryptionKey::generate()),
    );
    let err = OidcProviders::new([("a", a.clone()), ("a", other_keys)]).unwrap_err();
    assert!(err.to_string().contains("name"), "{err}");
    assert!(OidcProviders::new(Vec::<(String, OidcClient)>::new()).is_err());
    assert_eq!(OidcProviders::new([("a", a)]).unwrap().iter().count(), 1);
}
