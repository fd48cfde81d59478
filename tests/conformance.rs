//! The relying-party behaviour the OpenID Foundation's certification plans
//! test, one test per test module (named after it), each a real login
//! through the local provider made to misbehave the way the module does.
//! The README maps every module of the plans to its test here.
#![allow(clippy::unwrap_used)]

mod common;

use axum::http::StatusCode;
use common::idp::*;
use serde_json::Value;

/// One app instance on a Keycloak-like provider, with the default config.
async fn provider() -> Setup {
    setup("keycloak", 1, 3600, |c| c).await
}

/// The users the session table holds logged in.
async fn logged_in_users(s: &Setup) -> Vec<String> {
    sqlx::query_scalar::<_, Option<String>>(&format!("SELECT user_id FROM {}", s.db.table()))
        .fetch_all(&s.db.pool)
        .await
        .unwrap()
        .into_iter()
        .flatten()
        .collect()
}

/// Logs `user` in up to the provider's redirect back; returns the browser
/// and the callback URL it is sent to.
async fn authorized(s: &Setup, user: &str) -> (Browser, String) {
    let b = Browser::new();
    let auth = b.start_login(&s.apps[0].url, "/").await;
    let callback = b.authorize(&auth, user).await;
    (b, callback)
}

/// Visits the callback as an API client: the status and the error code.
async fn visit(b: &Browser, callback: &str) -> (StatusCode, String) {
    let r = b
        .http
        .get(callback)
        .header("accept", "application/json")
        .send()
        .await
        .unwrap();
    let status = r.status();
    let body: Value = r.json().await.unwrap_or(Value::Null);
    (
        status,
        body["error"].as_str().unwrap_or_default().to_owned(),
    )
}

/// A login whose token response the provider alters as `mode` names.
async fn login_misbehaving(s: &Setup, mode: &str) -> (Browser, StatusCode, String) {
    let (b, callback) = authorized(s, "alice").await;
    s.idp.misbehave(mode).await;
    let (status, error) = visit(&b, &callback).await;
    assert_eq!(s.idp.stats().await["misbehaved"], 1, "{mode} applied");
    (b, status, error)
}

/// The login must fail with `error`, and leave no one logged in.
async fn assert_rejected(mode: &str, error: &str) {
    let s = provider().await;
    let (b, status, got) = login_misbehaving(&s, mode).await;
    assert_eq!(
        (status, got.as_str()),
        (StatusCode::BAD_REQUEST, error),
        "{mode}"
    );
    assert_eq!(
        b.me(&s.apps[0].url).await.status(),
        StatusCode::UNAUTHORIZED
    );
    assert!(
        logged_in_users(&s).await.is_empty(),
        "no session for {mode}"
    );
    s.db.drop_schema().await;
}

/// The login must succeed, and the app know the user.
async fn assert_accepted(s: &Setup, b: &Browser, status: StatusCode, error: &str) {
    assert!(status.is_redirection(), "{status} {error}");
    let me = b.me(&s.apps[0].url).await;
    assert_eq!(me.status(), StatusCode::OK);
    assert_eq!(logged_in_users(s).await.len(), 1);
}

#[tokio::test]
async fn oidcc_client_test() {
    let s = provider().await;
    let (b, callback) = authorized(&s, "alice").await;
    let (status, error) = visit(&b, &callback).await;
    assert_accepted(&s, &b, status, &error).await;
    s.db.drop_schema().await;
}

#[tokio::test]
async fn oidcc_client_test_invalid_iss() {
    assert_rejected("invalid-iss", "invalid_id_token").await;
}

#[tokio::test]
async fn oidcc_client_test_missing_sub() {
    assert_rejected("missing-sub", "invalid_id_token").await;
}

#[tokio::test]
async fn oidcc_client_test_invalid_aud() {
    assert_rejected("invalid-aud", "invalid_id_token").await;
}

#[tokio::test]
async fn oidcc_client_test_missing_aud() {
    assert_rejected("missing-aud", "invalid_id_token").await;
}

#[tokio::test]
async fn oidcc_client_test_missing_iat() {
    assert_rejected("missing-iat", "invalid_id_token").await;
}

#[tokio::test]
async fn oidcc_client_test_invalid_sig_rs256() {
    assert_rejected("invalid-sig", "invalid_id_token").await;
}

#[tokio::test]
async fn oidcc_client_test_nonce_invalid() {
    assert_rejected("nonce-invalid", "invalid_id_token").await;
}

/// Without a per-client opt-in an unsigned ID token is refused.
#[tokio::test]
async fn oidcc_client_test_idtoken_sig_none() {
    assert_rejected("sig-none", "invalid_id_token").await;
}

/// The provider's JWKS holds one RS256 key: a token without `kid` is
/// verified with it.
#[tokio::test]
async fn oidcc_client_test_kid_absent_single_jwks() {
    let s = provider().await;
    let (b, status, error) = login_misbehaving(&s, "kid-absent").await;
    assert_accepted(&s, &b, status, &error).await;
    s.db.drop_schema().await;
}

/// Two RS256 keys and no `kid`: the module allows rejecting or trying each
/// key; which key signed is ambiguous, so the token is refused.
#[tokio::test]
async fn oidcc_client_test_kid_absent_multiple_jwks() {
    let s = provider().await;
    s.idp.rotate_keys().await;
    let (b, status, error) = login_misbehaving(&s, "kid-absent").await;
    assert_eq!(
        (status, error.as_str()),
        (StatusCode::BAD_REQUEST, "invalid_id_token")
    );
    assert_eq!(
        b.me(&s.apps[0].url).await.status(),
        StatusCode::UNAUTHORIZED
    );
    assert!(logged_in_users(&s).await.is_empty());
    s.db.drop_schema().await;
}

#[tokio::test]
async fn oidcc_client_test_signing_key_rotation() {
    let s = provider().await;
    let first = Browser::new();
    assert!(first
        .login(&s.apps[0].url, "alice", "/")
        .await
        .status()
        .is_redirection());
    // The provider now signs with a key the client has not fetched yet.
    s.idp.rotate_keys().await;
    let (b, callback) = authorized(&s, "bob").await;
    let (status, error) = visit(&b, &callback).await;
    assert!(status.is_redirection(), "{status} {error}");
    assert_eq!(b.me(&s.apps[0].url).await.status(), StatusCode::OK);
    assert_eq!(first.me(&s.apps[0].url).await.status(), StatusCode::OK);
    s.db.drop_schema().await;
}

/// `expires_in` is optional (RFC 6749 §5.1): the login succeeds.
#[tokio::test]
async fn token_response_without_expires_in() {
    let s = provider().await;
    let (b, status, error) = login_misbehaving(&s, "no-expires-in").await;
    assert_accepted(&s, &b, status, &error).await;
    s.db.drop_schema().await;
}

/// `token_type` is case-insensitive (RFC 6749 §5.1).
#[tokio::test]
async fn token_type_in_any_letter_case() {
    let s = provider().await;
    let (b, status, error) = login_misbehaving(&s, "token-type-case").await;
    assert_accepted(&s, &b, status, &error).await;
    s.db.drop_schema().await;
}

/// The provider advertises RFC 9207: a response without `iss` is refused.
#[tokio::test]
async fn fapi2_client_test_missing_iss_in_authorization_response() {
    let s = provider().await;
    let (b, callback) = authorized(&s, "alice").await;
    assert!(callback.contains("iss="));
    let stripped: String = {
        let (base, query) = callback.split_once('?').unwrap();
        let kept: Vec<&str> = query
            .split('&')
            .filter(|p| !p.starts_with("iss="))
            .collect();
        format!("{base}?{}", kept.join("&"))
    };
    let (status, error) = visit(&b, &stripped).await;
    assert_eq!(
        (status, error.as_str()),
        (StatusCode::BAD_REQUEST, "issuer_mismatch")
    );
    assert!(logged_in_users(&s).await.is_empty());
    s.db.drop_schema().await;
}

#[tokio::test]
async fn fapi2_client_test_invalid_iss_in_authorization_response() {
    let s = provider().await;
    let (b, callback) = authorized(&s, "alice").await;
    let forged = callback
        .split('&')
        .map(|p| {
            if p.starts_with("iss=") {
                "iss=https%3A%2F%2Fattacker.invalid%2F"
            } else {
                p
            }
        })
        .collect::<Vec<_>>()
        .join("&");
    assert_ne!(forged, callback);
    let (status, error) = visit(&b, &forged).await;
    assert_eq!(
        (status, error.as_str()),
        (StatusCode::BAD_REQUEST, "issuer_mismatch")
    );
    assert!(logged_in_users(&s).await.is_empty());
    s.db.drop_schema().await;
}
