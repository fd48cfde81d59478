//! Client authentication at the token, revocation and PAR endpoints against
//! the local provider with the client registered for each method.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use axum::http::StatusCode;
use common::idp::*;
use serde_json::Value;
use tower_pg_session::oidc::{ClientAuth, ClientKey, KeyAlg, OidcConfig, Par};

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
    let r = Browser::new()
        .api(&format!("{}/auth/jwks.json", s.apps[0].url))
        .await;
    assert_eq!(r.status(), StatusCode::NOT_FOUND, "no keys, no JWKS route");
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

/// A fresh 2048-bit RSA key, PKCS#8 PEM, from openssl.
fn rsa_pem() -> String {
    let out = std::process::Command::new("openssl")
        .args([
            "genpkey",
            "-algorithm",
            "RSA",
            "-pkeyopt",
            "rsa_keygen_bits:2048",
        ])
        .output()
        .expect("openssl runs");
    assert!(out.status.success());
    String::from_utf8(out.stdout).unwrap()
}

fn jwks(keys: &[&ClientKey]) -> String {
    serde_json::json!({"keys": keys.iter().map(|k| k.public_jwk()).collect::<Vec<_>>()}).to_string()
}

#[tokio::test]
async fn private_key_jwt_logs_in_and_refreshes_with_rs256_and_ps256() {
    for alg in [KeyAlg::Rs256, KeyAlg::Ps256] {
        let key = ClientKey::from_pem(&rsa_pem(), alg).unwrap();
        let registered = jwks(&[&key]);
        let s = app(
            "private_key_jwt",
            &[("IDP_CLIENT_JWKS", &registered)],
            |c| c.with_client_keys([key.clone()]),
        )
        .await;
        logs_in_refreshes_and_logs_out(&s).await;
    }
}

/// Two keys: the first signs (the provider knows only it), and the client
/// publishes both.
#[tokio::test]
async fn private_key_jwt_rotation_signs_with_the_first_key_and_publishes_both() {
    let (new, old) = (
        ClientKey::from_pem(&rsa_pem(), KeyAlg::Rs256).unwrap(),
        ClientKey::from_pem(&rsa_pem(), KeyAlg::Rs256).unwrap(),
    );
    let registered = jwks(&[&new]);
    let s = app(
        "private_key_jwt",
        &[("IDP_CLIENT_JWKS", &registered)],
        |c| c.with_client_keys([new.clone(), old.clone()]),
    )
    .await;
    logs_in_refreshes_and_logs_out(&s).await;
    let published = s.apps[0].client.client_jwks().unwrap();
    let kids: Vec<&str> = published["keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k["kid"].as_str().unwrap())
        .collect();
    assert_eq!(
        kids,
        [
            new.public_jwk()["kid"].as_str().unwrap(),
            old.public_jwk()["kid"].as_str().unwrap()
        ]
    );
    assert!(published["keys"][0].get("d").is_none(), "no private part");
    let served: Value = Browser::new()
        .api(&format!("{}/auth/jwks.json", s.apps[0].url))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(served, published, "the routes serve the same set");
}

#[tokio::test]
async fn private_key_jwt_with_a_key_the_provider_does_not_know_is_refused() {
    let known = ClientKey::from_pem(&rsa_pem(), KeyAlg::Rs256).unwrap();
    let wrong = ClientKey::from_pem(&rsa_pem(), KeyAlg::Rs256).unwrap();
    let registered = jwks(&[&known]);
    let s = app(
        "private_key_jwt",
        &[("IDP_CLIENT_JWKS", &registered)],
        |c| c.with_client_keys([wrong.clone()]),
    )
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
}

#[test]
fn a_short_or_malformed_key_is_refused_at_configuration() {
    assert!(ClientKey::from_pem("not a key", KeyAlg::Rs256).is_err());
    let out = std::process::Command::new("openssl")
        .args([
            "genpkey",
            "-algorithm",
            "RSA",
            "-pkeyopt",
            "rsa_keygen_bits:1024",
        ])
        .output()
        .unwrap();
    let short = String::from_utf8(out.stdout).unwrap();
    assert!(ClientKey::from_pem(&short, KeyAlg::Rs256)
        .unwrap_err()
        .to_string()
        .contains("2048"));
}
