//! Client authentication at the token, revocation and PAR endpoints against
//! the local provider with the client registered for each method.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use axum::http::StatusCode;
use common::{idp::*, keys::*};
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

/// Logs in, refreshes twice through `/me`, and logs out; the logout's
/// revocation of the refresh token carried `method`, and the provider took
/// it. Returns the revocation as the provider saw it.
async fn logs_in_refreshes_and_logs_out(s: &Setup, method: &str) -> Value {
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
    assert!(s.idp.revocations().await.is_empty());
    b.logout(app).await;
    let revoked = s.idp.revocations().await;
    assert_eq!(revoked.len(), 1, "{revoked:?}");
    let r = &revoked[0];
    assert_eq!(r["method"], method, "{r}");
    assert_eq!(
        (&r["status"], &r["registered"]),
        (&200.into(), &r["method"]),
        "{r}"
    );
    assert_eq!(r["token_type_hint"], "refresh_token", "{r}");
    r.clone()
}

#[tokio::test]
async fn client_secret_basic_logs_in_and_refreshes() {
    let s = app("client_secret_basic", &[], |c| {
        c.with_client_auth(ClientAuth::SecretBasic)
    })
    .await;
    logs_in_refreshes_and_logs_out(&s, "client_secret_basic").await;
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
    logs_in_refreshes_and_logs_out(&s, "client_secret_post").await;
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
    logs_in_refreshes_and_logs_out(&s, "client_secret_jwt").await;
}

#[tokio::test]
async fn client_secret_jwt_authenticates_the_pushed_request_too() {
    let s = app("client_secret_jwt", &[("IDP_PAR", "required")], |c| {
        c.with_client_auth(ClientAuth::SecretJwt)
            .with_par(Par::Required)
    })
    .await;
    logs_in_refreshes_and_logs_out(&s, "client_secret_jwt").await;
}

#[tokio::test]
async fn the_default_method_is_one_the_provider_advertises() {
    let s = app("client_secret_basic", &[], |c| c).await;
    logs_in_refreshes_and_logs_out(&s, "client_secret_basic").await;
}

/// A login whose token request the provider refuses as `invalid_client`:
/// the callback answers 400 `token_request_rejected`, naming it.
async fn refused_as_invalid_client(s: &Setup) -> Browser {
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
    b
}

#[tokio::test]
async fn a_wrong_secret_in_the_assertion_is_refused_clearly() {
    let s = app("client_secret_jwt", &[], |c| {
        c.with_client_secret("not-the-secret")
            .with_client_auth(ClientAuth::SecretJwt)
    })
    .await;
    let b = refused_as_invalid_client(&s).await;
    assert_eq!(
        b.me(&s.apps[0].url).await.status(),
        StatusCode::UNAUTHORIZED
    );
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

fn kid(key: &ClientKey) -> Value {
    key.public_jwk()["kid"].clone()
}

/// Each algorithm: every token request and the revocation carry an
/// assertion signed with the key, which the provider verifies with the
/// registered public JWK.
#[tokio::test]
async fn private_key_jwt_logs_in_and_refreshes_with_rs256_ps256_and_es256() {
    for (alg, name) in [
        (KeyAlg::Rs256, "RS256"),
        (KeyAlg::Ps256, "PS256"),
        (KeyAlg::Es256, "ES256"),
    ] {
        let key = key(alg);
        let registered = jwks(&[&key]);
        let s = app(
            "private_key_jwt",
            &[("IDP_CLIENT_JWKS", &registered)],
            |c| c.with_client_keys([key.clone()]),
        )
        .await;
        let revoked = logs_in_refreshes_and_logs_out(&s, "private_key_jwt").await;
        assert_eq!(
            (&revoked["alg"], &revoked["kid"]),
            (&name.into(), &kid(&key))
        );
    }
}

/// A rotation from `old` to `new`: the provider has both public keys (it
/// fetched the client's JWKS during the rotation), the first configured key
/// signs, and the client publishes both.
async fn rotation(new: ClientKey, old: ClientKey) {
    let registered = jwks(&[&new, &old]);
    let s = app(
        "private_key_jwt",
        &[("IDP_CLIENT_JWKS", &registered)],
        |c| c.with_client_keys([new.clone(), old.clone()]),
    )
    .await;
    let revoked = logs_in_refreshes_and_logs_out(&s, "private_key_jwt").await;
    assert_eq!(revoked["kid"], kid(&new), "the new key signs");
    let published = s.apps[0].client.client_jwks().unwrap();
    let kids: Vec<&Value> = published["keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| &k["kid"])
        .collect();
    assert_eq!(kids, [&kid(&new), &kid(&old)]);
    assert_eq!(
        published.to_string(),
        registered,
        "what the provider was given"
    );
    for k in published["keys"].as_array().unwrap() {
        assert!(k.get("d").is_none(), "no private part: {k}");
    }
    let served: Value = Browser::new()
        .api(&format!("{}/auth/jwks.json", s.apps[0].url))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(served, published, "the routes serve the same set");
}

#[tokio::test]
async fn private_key_jwt_rotation_signs_with_the_first_key_and_publishes_both() {
    rotation(key(KeyAlg::Rs256), key(KeyAlg::Rs256)).await;
}

/// From an RSA key to a P-256 one: the EC key signs ES256, both are served.
#[tokio::test]
async fn private_key_jwt_rotation_from_rs256_to_es256() {
    rotation(key(KeyAlg::Es256), key(KeyAlg::Rs256)).await;
}

#[tokio::test]
async fn private_key_jwt_with_a_key_the_provider_does_not_know_is_refused() {
    let known = key(KeyAlg::Es256);
    let wrong = key(KeyAlg::Es256);
    let registered = jwks(&[&known]);
    let s = app(
        "private_key_jwt",
        &[("IDP_CLIENT_JWKS", &registered)],
        |c| c.with_client_keys([wrong.clone()]),
    )
    .await;
    refused_as_invalid_client(&s).await;
}

#[test]
fn a_short_or_malformed_key_is_refused_at_configuration() {
    assert!(ClientKey::from_pem("not a key", KeyAlg::Rs256).is_err());
    let short = genpkey(&["-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:1024"]);
    assert!(ClientKey::from_pem(&short, KeyAlg::Rs256)
        .unwrap_err()
        .to_string()
        .contains("2048"));
    let p384 = genpkey(&["-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-384"]);
    assert!(ClientKey::from_pem(&p384, KeyAlg::Es256)
        .unwrap_err()
        .to_string()
        .contains("P-256"));
    assert!(ClientKey::from_pem(&rsa_pem(), KeyAlg::Es256).is_err());
    assert!(ClientKey::from_pem(&ec_pem(), KeyAlg::Rs256).is_err());
}

/// The demo's `OIDC_CLIENT_KEY`: the algorithm follows the key.
#[test]
fn the_algorithm_can_follow_the_key() {
    let ec = ClientKey::from_pem_auto(&ec_pem()).unwrap().public_jwk();
    assert_eq!(
        (&ec["alg"], &ec["kty"], &ec["crv"]),
        (&"ES256".into(), &"EC".into(), &"P-256".into())
    );
    assert!(ec.get("d").is_none());
    let rsa = ClientKey::from_pem_auto(&rsa_pem()).unwrap().public_jwk();
    assert_eq!((&rsa["alg"], &rsa["kty"]), (&"RS256".into(), &"RSA".into()));
    assert!(ClientKey::from_pem_auto("not a key").is_err());
}
