//! DPoP (RFC 9449) against the local provider with DPoP required and
//! nonces demanded: logins, refreshes and the application's own calls to a
//! resource server all carry proofs of the login's key, which is kept
//! sealed in the session.
#![allow(clippy::unwrap_used)]

mod common;

use axum::http::StatusCode;
use common::idp::{location, setup_env, Browser, Setup};
use serde_json::Value;
use tower_pg_session::oidc::{OidcConfig, UserinfoMode};

/// The provider requires DPoP-bound tokens and a DPoP nonce on every token
/// request.
async fn setup_dpop_required(access_ttl: u64, tweak: impl Fn(OidcConfig) -> OidcConfig) -> Setup {
    setup_env(
        "keycloak",
        1,
        access_ttl,
        &[("IDP_DPOP", "required")],
        tweak,
    )
    .await
}

#[tokio::test]
async fn dpop_logins_refresh_and_call_apis_with_the_logins_own_key() {
    // Access tokens of 60 s, refreshed 5 min before expiry: the first
    // request after the login refreshes.
    let s = setup_dpop_required(60, |c| c.with_dpop(true)).await;
    let app = &s.apps[0].url;
    let b = Browser::new();
    assert_eq!(location(&b.login(app, "zoe", "/").await), "/");
    assert_eq!(b.me(app).await.status(), StatusCode::OK);
    let grants = s.idp.stats().await;
    // One refresh; the nonce learnt at the code exchange is used again, so
    // only the first token request is answered use_dpop_nonce.
    assert_eq!(grants["refresh_token"], 1, "{grants}");
    assert_eq!(grants["failed"]["refresh_token"], 0, "{grants}");
    assert_eq!(grants["failed"]["authorization_code"], 1, "{grants}");

    // The app's own call to a resource server (the provider's userinfo),
    // with a proof for the bound token and the server's nonce.
    let r = b.api(&format!("{app}/api/userinfo")).await;
    assert_eq!(r.status(), StatusCode::OK);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["dpop"], true);
    assert_eq!(body["userinfo"]["sub"], "zoe");

    // The key is in the session only sealed: nothing of it in clear.
    let sess: String = sqlx::query_scalar(&format!("SELECT sess::text FROM {}", s.db.table()))
        .fetch_one(&s.db.pool)
        .await
        .unwrap();
    assert!(!sess.contains("dpop") && !sess.contains("\"d\""), "{sess}");
}

#[tokio::test]
async fn a_provider_requiring_dpop_refuses_a_login_without_it_cleanly() {
    let s = setup_dpop_required(3600, |c| c).await;
    let app = &s.apps[0].url;
    let b = Browser::new();
    let auth = b.start_login(app, "/").await;
    let callback = b.authorize(&auth, "zoe").await;
    let r = b.api(&callback).await;
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    let body: Value = r.json().await.unwrap();
    // The provider's own word: the code is not for a client without a key.
    assert_eq!(body["error"], "invalid_grant", "{body}");
    assert!(body["error_description"]
        .as_str()
        .unwrap()
        .contains("rejected by the provider"));
    assert_eq!(b.me(app).await.status(), StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn the_authorization_request_binds_the_code_to_the_key() {
    let s = setup_dpop_required(3600, |c| c.with_dpop(true)).await;
    let app = &s.apps[0].url;
    let b = Browser::new();
    let auth = b.start_login(app, "/").await;
    let jkt = url::Url::parse(&auth)
        .unwrap()
        .query_pairs()
        .find(|(k, _)| k == "dpop_jkt")
        .map(|(_, v)| v.into_owned());
    assert_eq!(
        jkt.map(|j| j.len()),
        Some(43),
        "a SHA-256 thumbprint, base64url"
    );
    // Each login has a key of its own.
    let again = b.start_login(app, "/").await;
    assert_ne!(
        auth.split("dpop_jkt=").nth(1),
        again.split("dpop_jkt=").nth(1)
    );
}

/// Userinfo with DPoP-bound tokens: the provider takes them only with a
/// proof of the login's key (and its nonce), at the login and at refresh.
#[tokio::test]
async fn dpop_logins_fetch_userinfo_with_a_proof_at_login_and_refresh() {
    let s = setup_dpop_required(60, |c| c.with_dpop(true).with_userinfo(UserinfoMode::On)).await;
    let app = &s.apps[0].url;
    let b = Browser::new();
    let auth = b.start_login(app, "/").await;
    let callback = b.authorize(&auth, "zoe").await;
    // The ID token lacks name and email: the app can know them only from
    // userinfo.
    s.idp.misbehave("no-profile-claims").await;
    let r = b.api(&callback).await;
    let status = r.status();
    assert!(
        status.is_redirection(),
        "{status} {}",
        r.text().await.unwrap()
    );
    let me: Value = b.me(app).await.json().await.unwrap();
    assert_eq!(me["claims"]["email"], "zoe@example.test", "{me}");
    assert_eq!(me["claims"]["name"], "Zoe", "{me}");
    let stats = s.idp.stats().await;
    // The login's and the refresh's (the first request after the login
    // refreshes): two answered, one more refused for its missing nonce.
    assert_eq!(stats["refresh_token"], 1, "{stats}");
    assert_eq!(stats["userinfo"], 3, "{stats}");
    assert_eq!(stats["failed"]["userinfo"], 1, "{stats}");
    s.db.drop_schema().await;
}

/// Without a proof the provider refuses a DPoP-bound token at userinfo,
/// which is why the login must send one.
#[tokio::test]
async fn the_provider_refuses_a_dpop_bound_token_used_as_bearer_at_userinfo() {
    let s = setup_dpop_required(3600, |c| c.with_dpop(true)).await;
    let app = &s.apps[0].url;
    let b = Browser::new();
    assert_eq!(location(&b.login(app, "zoe", "/").await), "/");
    let r = b.api(&format!("{app}/api/userinfo-as-bearer")).await;
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    let stats = s.idp.stats().await;
    assert_eq!(stats["failed"]["userinfo"], 1, "{stats}");
    // With its proof, the same token is accepted.
    assert_eq!(
        b.api(&format!("{app}/api/userinfo")).await.status(),
        StatusCode::OK
    );
    s.db.drop_schema().await;
}
