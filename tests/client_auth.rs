//! Client authentication at the token, revocation and PAR endpoints against
//! the local provider with the client registered for each method.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use axum::http::StatusCode;
use common::idp::*;
use serde_json::Value;
use tower_pg_session::oidc::{ClientAuth, OidcConfig, Par};

/// An app whose client is registered at the provider with `registered`,
/// `env` more for the provider; every request refreshes the access token.
async fn app(
    registered: &str,
    env: &[(&str, &str)],
    tweak: impl Fn(OidcConfig) -> OidcConfig,
) -> Setup {
    let mut env = env.to_vec();
    env.push(("IDP_CLIENT_AUTH", registered));
    setup_env("keycloak", 1, 3600, &env, move |c: OidcConfig| {
        tweak(c.with_refresh_before(Duration::from_secs(7200)))
    })
    .await
}

/// Logs in, refreshes twice through `/me`, and logs out (revocation).
async fn logs_in_refreshes_and_logs_out(s: &Setup) {
    let app = &s.apps[0].url;
    let b = Browser::new();
    let r = b.login(app, "alice", "/me").await;
    assert_eq!(r.status(), StatusCode::FOUND, "callback");
    for _ in 0..2 {
        let r = b.me(app).await;
        assert_eq!(r.status(), StatusCode::OK);
        let me: Value = r.json().await.unwrap();
        assert_eq!(me["sub"], "alice");
    }
    let stats = s.idp.stats().await;
    assert_eq!(stats["authorization_code"], 1, "{stats}");
    assert_eq!(stats["refresh_token"], 2, "{stats}");
    b.logout(app).await;
}

#[tokio::test]
async fn client_secret_basic_logs_in_and_refreshes() {
    let s = app("client_secret_basic", &[], |c| {
        c.with_client_auth(ClientAuth::SecretBasic)
    })
    .await;
    logs_in_refreshes_and_logs_out(&s).await;
}

#[tokio::test]
async fn client_secret_post_logs_in_and_refreshes() {
    let s = app("client_secret_post", &[], |c| {
        c.with_client_auth(ClientAuth::SecretPost)
    })
    .await;
    logs_in_refreshes_and_logs_out(&s).await;
}

/// Each token request carries a new assertion: the provider refuses a
/// `jti` it has seen, so the second and third requests pass only with
/// fresh ones.
#[tokio::test]
async fn client_secret_jwt_logs_in_and_refreshes_with_a_fresh_jti_each_time() {
    let s = app("client_secret_jwt", &[], |c| {
        c.with_client_auth(ClientAuth::SecretJwt)
    })
    .await;
    logs_in_refreshes_and_logs_out(&s).await;
}

#[tokio::test]
async fn client_secret_jwt_authenticates_the_pushed_request_too() {
    let s = app("client_secret_jwt", &[("IDP_PAR", "required")], |c| {
        c.with_client_auth(ClientAuth::SecretJwt)
            .with_par(Par::Required)
    })
    .await;
    logs_in_refreshes_and_logs_out(&s).await;
}

#[tokio::test]
async fn the_default_method_is_one_the_provider_advertises() {
    let s = app("client_secret_basic", &[], |c| c).await;
    logs_in_refreshes_and_logs_out(&s).await;
}

#[tokio::test]
async fn a_wrong_secret_in_the_assertion_is_refused_clearly() {
    let s = app("client_secret_jwt", &[], |c| {
        c.with_client_secret("not-the-secret")
            .with_client_auth(ClientAuth::SecretJwt)
    })
    .await;
    let app = &s.apps[0].url;
    let b = Browser::new();
    let auth = b.start_login(app, "/me").await;
    let callback = b.authorize(&auth, "alice").await;
    let r = b
        .http
        .get(&callback)
        .header("accept", "application/json")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"], "token_request_rejected", "{body}");
    assert!(
        body["error_description"]
            .as_str()
            .unwrap()
            .contains("invalid_client"),
        "{body}"
    );
    assert_eq!(b.me(app).await.status(), StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn a_method_the_client_is_not_registered_for_is_refused() {
    let s = app("client_secret_jwt", &[], |c| {
        c.with_client_auth(ClientAuth::SecretBasic)
    })
    .await;
    let b = Browser::new();
    let auth = b.start_login(&s.apps[0].url, "/me").await;
    let callback = b.authorize(&auth, "alice").await;
    let r = b
        .http
        .get(&callback)
        .header("accept", "application/json")
        .send()
        .await
        .unwrap();
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"], "token_request_rejected", "{body}");
}
