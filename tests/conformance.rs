//! The relying-party behaviour the OpenID Foundation's certification plans
//! test, one test per test module (named after it), each a real login
//! through the local provider made to misbehave the way the module does.
//! The README maps every module of the plans to its test here.
#![allow(clippy::unwrap_used)]

mod common;

use axum::http::StatusCode;
use common::idp::*;
use serde_json::Value;
use tower_pg_session::oidc::{
    AuthErrorKind, CoreJwsSigningAlgorithm, OidcClient, OidcConfig, UserinfoMode,
};

/// One app instance on a Keycloak-like provider, with the default config.
async fn provider() -> Setup {
    setup("keycloak", 1, 3600, |c| c).await
}

/// The users the session table holds logged in.
async fn logged_in_users(s: &Setup) -> Vec<String> {
    s.db.user_ids().await.into_iter().flatten().collect()
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
    assert_rejected_by(provider().await, mode, error).await;
}

/// As [`assert_rejected`], with the provider and app of `s`.
async fn assert_rejected_by(s: Setup, mode: &str, error: &str) {
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

/// Bob's login, its ID token's signature spoilt by the provider, fails.
async fn assert_bad_signature_refused(s: &Setup) {
    assert_id_token_refused(s, "bob", Some("invalid-sig")).await;
}

/// `user`'s login, its token response altered as `mode` names (if any),
/// fails with `invalid_id_token` and leaves them logged out.
async fn assert_id_token_refused(s: &Setup, user: &str, mode: Option<&str>) {
    let (b, callback) = authorized(s, user).await;
    if let Some(mode) = mode {
        s.idp.misbehave(mode).await;
    }
    let (status, error) = visit(&b, &callback).await;
    assert_eq!(
        (status, error.as_str()),
        (StatusCode::BAD_REQUEST, "invalid_id_token")
    );
    assert_eq!(
        b.me(&s.apps[0].url).await.status(),
        StatusCode::UNAUTHORIZED
    );
}

/// A client registered for unsigned ID tokens, and opted in, accepts one;
/// a token with a bad signature is still refused.
#[tokio::test]
async fn oidcc_client_test_idtoken_sig_none_opted_in() {
    let s = setup("keycloak", 1, 3600, |c| c.with_unsigned_id_tokens()).await;
    let (b, status, error) = login_misbehaving(&s, "sig-none").await;
    assert_accepted(&s, &b, status, &error).await;
    assert_bad_signature_refused(&s).await;
    s.db.drop_schema().await;
}

/// An app whose client the provider signs ID tokens for with `alg`
/// (`id_token_signed_response_alg`), configured by `tweak`.
async fn signing_with(alg: &str, tweak: impl Fn(OidcConfig) -> OidcConfig) -> Setup {
    setup_env("keycloak", 1, 3600, &[("IDP_ID_TOKEN_ALG", alg)], tweak).await
}

/// A login whose ID token is well signed succeeds, one whose signature is
/// spoilt fails.
async fn assert_good_signature_only(s: &Setup) {
    let (b, callback) = authorized(s, "alice").await;
    let (status, error) = visit(&b, &callback).await;
    assert_accepted(s, &b, status, &error).await;
    assert_bad_signature_refused(s).await;
}

/// The client is registered for HS256 ID tokens (keyed with its secret) and
/// configured to expect exactly that.
#[tokio::test]
async fn oidcc_client_test_invalid_sig_hs256() {
    let s = signing_with("HS256", |c| {
        c.with_id_token_signed_response_alg(CoreJwsSigningAlgorithm::HmacSha256)
    })
    .await;
    assert_good_signature_only(&s).await;
    // HMAC needs the secret: a client without one refuses to start.
    let url = &s.apps[0].url;
    let public = OidcConfig::new(&s.idp.issuer, CLIENT_ID, url, s.token_keys.clone())
        .unwrap()
        .with_id_token_signed_response_alg(CoreJwsSigningAlgorithm::HmacSha256);
    let e = OidcClient::discover(public, s.apps[0].store.clone())
        .await
        .unwrap_err();
    assert_eq!(e.kind(), AuthErrorKind::Misconfigured, "{e}");
    assert!(e.detail().contains("need a client secret"), "{e}");
    s.db.drop_schema().await;
}

/// A client registered for HS256 ID tokens gets its back-channel logout
/// tokens signed the same way, keyed with its secret: the provider's logout
/// ends the session.
#[tokio::test]
async fn an_hs256_client_accepts_the_providers_hs256_logout_tokens() {
    let s = signing_with("HS256", |c| {
        c.with_id_token_signed_response_alg(CoreJwsSigningAlgorithm::HmacSha256)
    })
    .await;
    let (b, callback) = authorized(&s, "alice").await;
    let (status, error) = visit(&b, &callback).await;
    assert_accepted(&s, &b, status, &error).await;
    b.logout_at_provider(&s.idp.issuer).await;
    let delivered = s.apps[0].backchannel.lock().unwrap().clone();
    assert_eq!(delivered.len(), 1, "the provider sent one logout token");
    let token = delivered[0].strip_prefix("logout_token=").unwrap();
    let header = token.split('.').next().unwrap();
    let header: Value = serde_json::from_slice(
        &base64::Engine::decode(&base64::engine::general_purpose::URL_SAFE_NO_PAD, header).unwrap(),
    )
    .unwrap();
    assert_eq!(header["alg"], "HS256", "{header}");
    assert_eq!(
        b.me(&s.apps[0].url).await.status(),
        StatusCode::UNAUTHORIZED
    );
    assert!(logged_in_users(&s).await.is_empty());
    s.db.drop_schema().await;
}

/// Without that setting, even a well-signed HS256 ID token is refused: the
/// client secret is no signing key by default.
#[tokio::test]
async fn hs256_id_tokens_are_refused_unless_expected() {
    let s = signing_with("HS256", |c| c).await;
    assert_id_token_refused(&s, "alice", None).await;
    assert!(logged_in_users(&s).await.is_empty());
    s.db.drop_schema().await;
}

/// ES256 ID tokens, verified with the provider's published EC key; pinned
/// to ES256, so an RS256 token would fail this test.
#[tokio::test]
async fn oidcc_client_test_invalid_sig_es256() {
    let s = signing_with("ES256", |c| {
        c.with_id_token_signed_response_alg(CoreJwsSigningAlgorithm::EcdsaP256Sha256)
    })
    .await;
    assert_good_signature_only(&s).await;
    s.db.drop_schema().await;
}

/// The same provider signing RS256 while the client expects ES256: refused.
#[tokio::test]
async fn an_id_token_in_another_alg_than_registered_is_refused() {
    let s = setup("keycloak", 1, 3600, |c| {
        c.with_id_token_signed_response_alg(CoreJwsSigningAlgorithm::EcdsaP256Sha256)
    })
    .await;
    assert_id_token_refused(&s, "alice", None).await;
    s.db.drop_schema().await;
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
    assert_invalid_id_token(&s, &b, status, &error).await;
    s.db.drop_schema().await;
}

/// The login failed as an invalid ID token, and left no one logged in.
async fn assert_invalid_id_token(s: &Setup, b: &Browser, status: StatusCode, error: &str) {
    assert_eq!(
        (status, error),
        (StatusCode::BAD_REQUEST, "invalid_id_token")
    );
    assert_eq!(
        b.me(&s.apps[0].url).await.status(),
        StatusCode::UNAUTHORIZED
    );
    assert!(logged_in_users(s).await.is_empty());
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

/// The provider rotates its keys as the token request arrives: the ID token
/// is signed with a key the client has never seen, and the login succeeds
/// after exactly one more fetch of the provider's JWKS.
#[tokio::test]
async fn oidcc_client_test_signing_key_rotated_just_before_signing() {
    let s = provider().await;
    let (b, callback) = authorized(&s, "alice").await;
    let fetched = s.idp.stats().await["jwks"].as_u64().unwrap();
    s.idp.misbehave("rotate-before-signing").await;
    let (status, error) = visit(&b, &callback).await;
    let stats = s.idp.stats().await;
    assert_eq!(stats["misbehaved"], 1, "rotated");
    assert_accepted(&s, &b, status, &error).await;
    assert_eq!(stats["jwks"].as_u64().unwrap(), fetched + 1, "one re-fetch");
    s.db.drop_schema().await;
}

/// The discovery document names another issuer than the configured one:
/// the client refuses to start, saying which issuer it got, and one that
/// discovers lazily refuses logins the same way.
#[tokio::test]
async fn oidcc_client_test_discovery_issuer_mismatch() {
    let s = provider().await;
    s.idp.misbehave_times("discovery-issuer-mismatch", 2).await;
    let config = || base_config(&s.idp, &s.apps[0].url, &s.token_keys);
    let store = s.apps[0].store.clone();
    let e = OidcClient::discover(config(), store.clone())
        .await
        .unwrap_err();
    assert_eq!(e.kind(), AuthErrorKind::ProviderUnavailable, "{e}");
    let other = format!("{}-other", s.idp.issuer);
    assert!(
        e.detail()
            .contains(&format!("unexpected issuer URI `{other}`")),
        "{e}"
    );
    let lazy = OidcClient::lazy(config(), store).unwrap();
    let e = lazy.verify_id_token_jwt("a.b.c", None).await.unwrap_err();
    assert_eq!(e.kind(), AuthErrorKind::LoginUnavailable, "{e}");
    assert!(e.detail().contains(&other), "{e}");
    assert!(!lazy.is_discovered());
    assert_eq!(s.idp.stats().await["misbehaved"], 2);
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

// ------------------------------------------------------ back-channel logout

fn now() -> i64 {
    time::OffsetDateTime::now_utc().unix_timestamp()
}

const LOGOUT_EVENT: &str = "http://schemas.openid.net/event/backchannel-logout";

/// A logged-in user, the provider's session id for them, and a valid
/// logout token's claims for that session.
async fn logged_in_for_logout(s: &Setup) -> (Browser, Value) {
    let b = Browser::new();
    assert!(b
        .login(&s.apps[0].url, "alice", "/")
        .await
        .status()
        .is_redirection());
    let sid: String = sqlx::query_scalar(&format!("SELECT provider_sid FROM {}", s.db.table()))
        .fetch_one(&s.db.pool)
        .await
        .unwrap();
    let claims = serde_json::json!({
        "iss": s.idp.issuer, "aud": CLIENT_ID, "iat": now(), "exp": now() + 120,
        "jti": format!("jti-{}", now()), "sid": sid, "sub": "alice",
        "events": {LOGOUT_EVENT: {}},
    });
    (b, claims)
}

async fn post_logout_token(s: &Setup, token: &str) -> StatusCode {
    reqwest::Client::new()
        .post(format!("{}/auth/backchannel-logout", s.apps[0].url))
        .form(&[("logout_token", token)])
        .send()
        .await
        .unwrap()
        .status()
}

/// A logout token altered by `alter` is refused with 400 and ends nothing.
async fn assert_logout_refused(alter: impl FnOnce(&mut Value), sign: Sign) {
    let s = provider().await;
    let (b, mut claims) = logged_in_for_logout(&s).await;
    alter(&mut claims);
    let token = match sign {
        Sign::Provider => {
            let header = serde_json::json!({"typ": "logout+jwt"});
            s.idp.sign(claims, header).await
        }
        Sign::None => unsigned(&claims),
        Sign::Hs256 => hs256(&claims, CLIENT_SECRET),
    };
    assert_eq!(post_logout_token(&s, &token).await, StatusCode::BAD_REQUEST);
    assert_eq!(
        b.me(&s.apps[0].url).await.status(),
        StatusCode::OK,
        "still logged in"
    );
    s.db.drop_schema().await;
}

enum Sign {
    Provider,
    None,
    Hs256,
}

fn b64(v: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v)
}

fn unsigned(claims: &Value) -> String {
    let header = serde_json::json!({"alg": "none", "typ": "logout+jwt"});
    format!(
        "{}.{}.",
        b64(header.to_string().as_bytes()),
        b64(claims.to_string().as_bytes())
    )
}

fn hs256(claims: &Value, secret: &str) -> String {
    use hmac::Mac;
    let header = serde_json::json!({"alg": "HS256", "typ": "logout+jwt"});
    let input = format!(
        "{}.{}",
        b64(header.to_string().as_bytes()),
        b64(claims.to_string().as_bytes())
    );
    let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(secret.as_bytes()).unwrap();
    mac.update(input.as_bytes());
    format!("{input}.{}", b64(&mac.finalize().into_bytes()))
}

#[tokio::test]
async fn oidcc_client_test_rp_backchannel_rpinitlogout() {
    let s = provider().await;
    let (b, claims) = logged_in_for_logout(&s).await;
    let token = s
        .idp
        .sign(claims, serde_json::json!({"typ": "logout+jwt"}))
        .await;
    assert_eq!(post_logout_token(&s, &token).await, StatusCode::OK);
    assert_eq!(
        b.me(&s.apps[0].url).await.status(),
        StatusCode::UNAUTHORIZED
    );
    assert!(logged_in_users(&s).await.is_empty());
    s.db.drop_schema().await;
}

#[tokio::test]
async fn oidcc_client_test_rp_backchannel_rpinitlogout_alg_none() {
    assert_logout_refused(|_| {}, Sign::None).await;
}

#[tokio::test]
async fn oidcc_client_test_rp_backchannel_rpinitlogout_no_event() {
    assert_logout_refused(
        |c| drop(c.as_object_mut().unwrap().remove("events")),
        Sign::Provider,
    )
    .await;
}

#[tokio::test]
async fn oidcc_client_test_rp_backchannel_rpinitlogout_with_nonce() {
    assert_logout_refused(|c| c["nonce"] = "n".into(), Sign::Provider).await;
}

/// HMAC with the client secret: a key the provider never signs with.
#[tokio::test]
async fn oidcc_client_test_rp_backchannel_rpinitlogout_wrong_alg() {
    assert_logout_refused(|_| {}, Sign::Hs256).await;
}

#[tokio::test]
async fn oidcc_client_test_rp_backchannel_rpinitlogout_wrong_aud() {
    assert_logout_refused(|c| c["aud"] = "some-other-client".into(), Sign::Provider).await;
}

#[tokio::test]
async fn oidcc_client_test_rp_backchannel_rpinitlogout_wrong_event() {
    assert_logout_refused(
        |c| c["events"] = serde_json::json!({"http://schemas.openid.net/event/other": {}}),
        Sign::Provider,
    )
    .await;
}

#[tokio::test]
async fn oidcc_client_test_rp_backchannel_rpinitlogout_wrong_iss() {
    assert_logout_refused(
        |c| c["iss"] = "https://attacker.invalid/".into(),
        Sign::Provider,
    )
    .await;
}

// ------------------------------------------------------------ refresh token

/// Makes every stored login's access token due for refresh, as the clock
/// would: the record is opened with the app's keys, edited and re-sealed.
async fn refresh_due(s: &Setup) {
    let rows: Vec<(String, Value)> = sqlx::query_as(&format!(
        "SELECT sid, sess::jsonb FROM {} WHERE user_id IS NOT NULL",
        s.db.table()
    ))
    .fetch_all(&s.db.pool)
    .await
    .unwrap();
    for (sid, sess) in rows {
        let aad = tower_pg_session::crypto::Aad {
            session: &sid,
            field: "oidc",
        };
        let sealed = sess["oidc"].as_str().expect("a sealed login record");
        let opened = s.token_keys.open(sealed, &aad).unwrap();
        let mut record: Value = serde_json::from_slice(opened.plaintext()).unwrap();
        record["exp"] = (now() + 30).into();
        let resealed = s.token_keys.seal(record.to_string().as_bytes(), &aad);
        sqlx::query(&format!(
            "UPDATE {} SET sess = jsonb_set(sess::jsonb, '{{oidc}}', to_jsonb($2::text))::json WHERE sid = $1",
            s.db.table()
        ))
        .bind(&sid)
        .bind(resealed)
        .execute(&s.db.pool)
        .await
        .unwrap();
    }
}

/// Logs in, makes the provider's refresh answer misbehave as `mode` (if
/// any), and asks the app for the user: its answer after the refresh.
async fn refreshed(s: &Setup, mode: Option<&str>) -> (Browser, StatusCode) {
    let b = Browser::new();
    assert!(b
        .login(&s.apps[0].url, "alice", "/")
        .await
        .status()
        .is_redirection());
    if let Some(mode) = mode {
        s.idp.misbehave(mode).await;
    }
    refresh_due(s).await;
    let status = b.me(&s.apps[0].url).await.status();
    assert_eq!(s.idp.stats().await["refresh_token"], 1, "it did refresh");
    (b, status)
}

#[tokio::test]
async fn oidcc_client_test_refresh_token() {
    let s = provider().await;
    let (b, status) = refreshed(&s, None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(b.me(&s.apps[0].url).await.status(), StatusCode::OK);
    s.db.drop_schema().await;
}

/// A refreshed ID token from another issuer ends the session.
#[tokio::test]
async fn oidcc_client_test_refresh_token_invalid_issuer() {
    let s = provider().await;
    let (_, status) = refreshed(&s, Some("invalid-iss")).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert!(logged_in_users(&s).await.is_empty());
    s.db.drop_schema().await;
}

/// A subject the session table cannot hold (a NUL character) is refused
/// as an invalid ID token before anything is stored.
#[tokio::test]
async fn a_sub_with_a_nul_character_is_an_invalid_id_token() {
    let s = provider().await;
    let (b, callback) = authorized(&s, "alice").await;
    s.idp.rename_account("alice", "alice\u{0}admin").await;
    let (status, error) = visit(&b, &callback).await;
    assert_invalid_id_token(&s, &b, status, &error).await;
    s.db.drop_schema().await;
}

/// A refreshed ID token naming someone else ends the session.
#[tokio::test]
async fn oidcc_client_test_refresh_token_invalid_sub() {
    let s = provider().await;
    let b = Browser::new();
    assert!(b
        .login(&s.apps[0].url, "alice", "/")
        .await
        .status()
        .is_redirection());
    s.idp.rename_account("alice", "alice-renamed").await;
    refresh_due(&s).await;
    assert_eq!(
        b.me(&s.apps[0].url).await.status(),
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(s.idp.stats().await["refresh_token"], 1, "it did refresh");
    assert!(logged_in_users(&s).await.is_empty());
    s.db.drop_schema().await;
}

// ------------------------------------------------------ RP-initiated logout

/// The app ends its session, then sends the browser to the provider's end
/// session endpoint with the ID token as hint; the provider ends its own
/// and sends the browser back to the registered post-logout URI with the
/// state the app sent.
#[tokio::test]
async fn oidcc_client_test_rp_init_logout() {
    let s = provider().await;
    let app = &s.apps[0].url;
    let b = Browser::new();
    assert!(b.login(app, "alice", "/").await.status().is_redirection());
    let end = b.logout(app).await;
    assert!(
        logged_in_users(&s).await.is_empty(),
        "the app's session ended first"
    );
    let end = url::Url::parse(&end).unwrap();
    let param = |name: &str| {
        end.query_pairs()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.into_owned())
            .unwrap_or_else(|| panic!("{name} in {end}"))
    };
    let (state, after) = (param("state"), param("post_logout_redirect_uri"));
    assert_eq!(param("id_token_hint").split('.').count(), 3);

    let r = b.confirm_logout(&s.idp.issuer, end.as_str()).await;
    let back = url::Url::parse(&location(&r)).unwrap();
    assert!(back.as_str().starts_with(&after), "{back}");
    assert!(back.query_pairs().any(|(k, v)| k == "state" && v == state));
    // The provider's session is gone too: a new login asks for the password.
    let auth = b.start_login(app, "/").await;
    let r = b.get(&auth).await;
    assert!(
        location(&r).contains("/interaction/"),
        "asked to log in again"
    );
    assert_eq!(b.me(app).await.status(), StatusCode::UNAUTHORIZED);
    s.db.drop_schema().await;
}

// ----------------------------------------------------------------- userinfo

async fn with_userinfo(mode: UserinfoMode) -> Setup {
    setup("keycloak", 1, 3600, move |c| c.with_userinfo(mode)).await
}

async fn claims_of(s: &Setup, b: &Browser) -> Value {
    let me: Value = b.me(&s.apps[0].url).await.json().await.unwrap();
    me["claims"].clone()
}

#[tokio::test]
async fn oidcc_client_test_userinfo_invalid_sub() {
    let s = with_userinfo(UserinfoMode::On).await;
    let (b, callback) = authorized(&s, "alice").await;
    s.idp.misbehave("userinfo-invalid-sub").await;
    let (status, error) = visit(&b, &callback).await;
    assert_eq!(
        (status, error.as_str()),
        (StatusCode::BAD_REQUEST, "invalid_userinfo")
    );
    assert_eq!(s.idp.stats().await["misbehaved"], 1);
    assert_eq!(
        b.me(&s.apps[0].url).await.status(),
        StatusCode::UNAUTHORIZED
    );
    assert!(logged_in_users(&s).await.is_empty());
    s.db.drop_schema().await;
}

/// The ID token lacks the profile and email claims; by default the login
/// then takes them from userinfo.
#[tokio::test]
async fn oidcc_client_test_scope_userinfo_claims() {
    let s = provider().await;
    let (b, status, error) = login_misbehaving(&s, "no-profile-claims").await;
    assert_accepted(&s, &b, status, &error).await;
    let claims = claims_of(&s, &b).await;
    assert_eq!(claims["name"], "Alice", "{claims}");
    assert_eq!(claims["email"], "alice@example.test", "{claims}");
    s.db.drop_schema().await;
}

/// With userinfo off, the app gets only what the ID token says.
#[tokio::test]
async fn userinfo_off_keeps_to_the_id_token() {
    let s = with_userinfo(UserinfoMode::Off).await;
    let (b, status, error) = login_misbehaving(&s, "no-profile-claims").await;
    assert_accepted(&s, &b, status, &error).await;
    let claims = claims_of(&s, &b).await;
    assert!(claims.get("email").is_none(), "{claims}");
    s.db.drop_schema().await;
}

/// A refresh asks userinfo again; another subject there ends the session.
#[tokio::test]
async fn userinfo_naming_another_subject_at_refresh_logs_out() {
    let s = with_userinfo(UserinfoMode::On).await;
    let b = Browser::new();
    assert!(b
        .login(&s.apps[0].url, "alice", "/")
        .await
        .status()
        .is_redirection());
    s.idp.misbehave("userinfo-invalid-sub").await;
    refresh_due(&s).await;
    assert_eq!(
        b.me(&s.apps[0].url).await.status(),
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(s.idp.stats().await["misbehaved"], 1);
    assert!(logged_in_users(&s).await.is_empty());
    s.db.drop_schema().await;
}

// ---------------------------------------------------------- signed userinfo

/// A provider that signs userinfo answers (`userinfo_signed_response_alg`
/// RS256 registered for the client), userinfo fetched at every login.
async fn with_signed_userinfo(tweak: impl Fn(OidcConfig) -> OidcConfig) -> Setup {
    setup_env(
        "keycloak",
        1,
        3600,
        &[("IDP_USERINFO_SIGNED_ALG", "RS256")],
        move |c| tweak(c.with_userinfo(UserinfoMode::On)),
    )
    .await
}

/// The claims of a signed userinfo answer reach the app.
#[tokio::test]
async fn oidcc_client_test_userinfo_signed() {
    let s = with_signed_userinfo(|c| c).await;
    // The ID token lacks the profile claims: they can only come from
    // userinfo.
    let (b, status, error) = login_misbehaving(&s, "no-profile-claims").await;
    assert_accepted(&s, &b, status, &error).await;
    let claims = claims_of(&s, &b).await;
    assert_eq!(claims["name"], "Alice", "{claims}");
    assert_eq!(claims["email"], "alice@example.test", "{claims}");
    // The JWT's own claims stay the ID token's.
    assert_eq!(claims["aud"], CLIENT_ID, "{claims}");
    s.db.drop_schema().await;
}

/// A signed userinfo answer the client must not trust, altered as `mode`
/// names, fails the login.
async fn assert_signed_userinfo_rejected(mode: &str, tweak: impl Fn(OidcConfig) -> OidcConfig) {
    assert_rejected_by(with_signed_userinfo(tweak).await, mode, "invalid_userinfo").await;
}

#[tokio::test]
async fn signed_userinfo_with_a_bad_signature_is_refused() {
    assert_signed_userinfo_rejected("userinfo-invalid-sig", |c| c).await;
}

#[tokio::test]
async fn signed_userinfo_from_another_issuer_is_refused() {
    assert_signed_userinfo_rejected("userinfo-invalid-iss", |c| c).await;
}

#[tokio::test]
async fn signed_userinfo_for_another_client_is_refused() {
    assert_signed_userinfo_rejected("userinfo-invalid-aud", |c| c).await;
}

#[tokio::test]
async fn unsigned_userinfo_jwt_is_refused() {
    assert_signed_userinfo_rejected("userinfo-sig-none", |c| c).await;
}

#[tokio::test]
async fn encrypted_userinfo_is_refused_as_not_supported() {
    assert_signed_userinfo_rejected("userinfo-jwe", |c| c).await;
}

/// The client registered ES256; an RS256 answer, though validly signed, is
/// not what it expects.
#[tokio::test]
async fn signed_userinfo_with_another_algorithm_than_registered_is_refused() {
    assert_signed_userinfo_rejected("no-profile-claims", |c| {
        c.with_userinfo_signed_response_alg(CoreJwsSigningAlgorithm::EcdsaP256Sha256)
    })
    .await;
}

/// A client registered for signed userinfo refuses a plain JSON answer.
#[tokio::test]
async fn plain_userinfo_for_a_client_registered_for_signed_is_refused() {
    let s = setup("keycloak", 1, 3600, |c| {
        c.with_userinfo(UserinfoMode::On)
            .with_userinfo_signed_response_alg(CoreJwsSigningAlgorithm::RsaSsaPkcs1V15Sha256)
    })
    .await;
    assert_rejected_by(s, "no-profile-claims", "invalid_userinfo").await;
}
