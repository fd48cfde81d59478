//! The login flow against a real OpenID provider (tests/idp, oidc-provider)
//! configured like Keycloak and like Cognito.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use axum::http::StatusCode;
use common::{idp::*, Db};
use serde_json::{json, Value};
use tower_pg_session::{
    crypto::Keyring,
    oidc::{OidcClient, OidcConfig},
};

async fn session_rows(db: &Db) -> Vec<(String, String, Option<String>, Option<String>)> {
    sqlx::query_as(&format!(
        "SELECT sid, sess::text, user_id, provider_sid FROM {}",
        db.table()
    ))
    .fetch_all(&db.pool)
    .await
    .unwrap()
}

/// The first session row's id and data.
async fn first_session(db: &Db) -> (String, Value) {
    let (sid, sess, _, _) = session_rows(db).await.remove(0);
    (sid, serde_json::from_str(&sess).unwrap())
}

/// A config for an app that is never served, with keys of its own.
fn unserved_config(issuer: &str) -> OidcConfig {
    OidcConfig::new(issuer, CLIENT_ID, "http://127.0.0.1:2", Keyring::generate()).unwrap()
}

/// One app instance on a Keycloak-like provider, with the default config.
async fn keycloak() -> Setup {
    setup("keycloak", 1, 3600, |c| c).await
}

/// A browser logged in as `user` at the first app instance.
async fn logged_in(s: &Setup, user: &str) -> Browser {
    let b = Browser::new();
    b.login(&s.apps[0].url, user, "/").await;
    b
}

#[tokio::test]
async fn keycloak_like_login_me_and_logout() {
    let s = keycloak().await;
    let app = &s.apps[0].url;
    let b = Browser::new();

    // Not logged in: a browser is sent to the login, an API gets 401.
    let r = b.get(&format!("{app}/me?x=1")).await;
    assert_eq!(r.status(), StatusCode::FOUND);
    assert_eq!(location(&r), "/auth/login?return_to=%2Fme%3Fx%3D1");
    let r = b.me(app).await;
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    assert!(r.headers().contains_key("www-authenticate"));

    let auth = b.start_login(app, "/me?x=1").await;
    assert!(auth.starts_with(&s.idp.issuer), "{auth}");
    for param in [
        "code_challenge_method=S256",
        "code_challenge=",
        "nonce=",
        "state=",
        "scope=openid",
    ] {
        assert!(auth.contains(param), "{param} in {auth}");
    }
    let cookie_before: Vec<String> = session_rows(&s.db).await.into_iter().map(|r| r.0).collect();
    assert_eq!(
        cookie_before.len(),
        1,
        "the pending login lives in a session"
    );
    let callback = b.authorize(&auth, "alice").await;
    assert!(
        callback.contains("iss="),
        "RFC 9207 iss on the callback: {callback}"
    );
    let r = b.get(&callback).await;
    assert_eq!(r.status(), StatusCode::FOUND);
    assert_eq!(location(&r), "/me?x=1");

    let rows = session_rows(&s.db).await;
    assert_eq!(rows.len(), 1);
    let (sid, sess, user_id, provider_sid) = &rows[0];
    assert_ne!(sid, &cookie_before[0], "the session id is cycled at login");
    assert_eq!(user_id.as_deref(), Some("alice"));
    assert!(
        provider_sid.is_some(),
        "the provider's sid is kept for back-channel logout"
    );
    let stored: Value = serde_json::from_str(sess).unwrap();
    let record = open_record(&s.token_keys, sid, &stored["oidc"]);
    assert_eq!(record["sub"], "alice");
    // (Not a search for "eyJ": base64 ciphertext holds it now and then.)
    for secret in ["at", "rt", "idt"] {
        let token = record[secret].as_str().unwrap();
        assert!(token.starts_with("eyJ") || token.len() > 20, "{secret}");
        assert!(
            !sess.contains(token),
            "no token in clear text at rest: {sess}"
        );
    }
    assert!(
        !sess.contains("alice"),
        "the identity is sealed with the tokens: {sess}"
    );
    assert!(
        stored
            .as_object()
            .unwrap()
            .keys()
            .all(|k| !k.starts_with("oidc.login.")),
        "the pending login is consumed"
    );

    let r = b.me(app).await;
    assert_eq!(r.status(), StatusCode::OK, "{:?}", r.headers());
    let me: Value = r.json().await.unwrap();
    assert_eq!(me["sub"], "alice");
    assert_eq!(me["claims"]["email"], "alice@example.test");
    assert!(
        me["access_token_expires_at"].as_i64().unwrap()
            > time::OffsetDateTime::now_utc().unix_timestamp()
    );

    // Replaying the callback after success fails and does not log anyone in or out.
    let r = b.api(&callback).await;
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"], "unknown_state");
    assert_eq!(b.me(app).await.status(), StatusCode::OK);

    // Logout from another site: refused, session intact.
    let r = b
        .post_logout(app, &[("origin", "https://evil.example")])
        .await;
    assert_eq!(r.status(), StatusCode::FORBIDDEN);
    let r = b.post_logout(app, &[]).await;
    assert_eq!(
        r.status(),
        StatusCode::FORBIDDEN,
        "no Origin and no Referer"
    );
    assert_eq!(b.me(app).await.status(), StatusCode::OK);

    // Logout from the app's own page (a plain form sends Referer).
    let r = b
        .post_logout(app, &[("referer", &format!("{app}/settings"))])
        .await;
    assert_eq!(r.status(), StatusCode::SEE_OTHER);
    let end = location(&r);
    assert!(
        end.starts_with(&format!("{}/protocol/openid-connect/logout", s.idp.issuer)),
        "{end}"
    );
    for param in [
        "id_token_hint=",
        "post_logout_redirect_uri=",
        "state=",
        "client_id=demo",
    ] {
        assert!(end.contains(param), "{param} in {end}");
    }
    assert!(session_rows(&s.db).await.is_empty(), "the session is gone");
    assert_eq!(b.me(app).await.status(), StatusCode::UNAUTHORIZED);
    s.db.drop_schema().await;
}

#[tokio::test]
async fn twenty_concurrent_replays_of_one_callback_log_in_once() {
    let s = keycloak().await;
    let app = &s.apps[0].url;
    let b = Browser::new();
    let auth = b.start_login(app, "/").await;
    let callback = b.authorize(&auth, "bob").await;
    let mut tasks = Vec::new();
    for _ in 0..20 {
        let (b, callback) = (b.clone(), callback.clone());
        tasks.push(tokio::spawn(async move { b.api(&callback).await.status() }));
    }
    let mut ok = 0;
    for t in tasks {
        match t.await.unwrap() {
            StatusCode::FOUND => ok += 1,
            StatusCode::BAD_REQUEST => {}
            other => panic!("unexpected {other}"),
        }
    }
    assert_eq!(ok, 1, "exactly one callback succeeds");
    assert_eq!(
        s.idp.stats().await["authorization_code"],
        1,
        "the code was exchanged once"
    );
    s.db.drop_schema().await;
}

#[tokio::test]
async fn bad_callbacks_are_400_and_log_no_one_in() {
    let s = setup("keycloak", 1, 3600, |c| {
        c.with_login_ttl(Duration::from_secs(1))
    })
    .await;
    let app = &s.apps[0].url;
    let b = Browser::new();
    let call = |q: String| {
        let b = b.clone();
        let app = app.clone();
        async move {
            let r = b
                .http
                .get(format!("{app}/auth/callback?{q}"))
                .header("accept", "application/json")
                .send()
                .await
                .unwrap();
            let status = r.status();
            let text = r.text().await.unwrap();
            let body: Value =
                serde_json::from_str(&text).unwrap_or_else(|e| panic!("{status}: {e}: {text:?}"));
            (
                status,
                body["error"].as_str().unwrap_or_default().to_owned(),
            )
        }
    };
    assert_eq!(
        call("code=x".into()).await,
        (StatusCode::BAD_REQUEST, "missing_state".into())
    );
    assert_eq!(
        call("code=x&state=forged".into()).await,
        (StatusCode::BAD_REQUEST, "unknown_state".into())
    );
    assert_eq!(
        call("error=access_denied&error_description=user%20said%20no".into()).await,
        (StatusCode::BAD_REQUEST, "provider_error".into())
    );
    assert_eq!(
        call("code=x&code=y&state=z".into()).await,
        (StatusCode::BAD_REQUEST, "malformed_callback".into())
    );

    // A real login in progress, answered with a wrong iss.
    let auth = b.start_login(app, "/").await;
    let callback = b.authorize(&auth, "carol").await;
    let forged = callback.replace(
        &urlencode(&s.idp.issuer),
        &urlencode("https://evil.example/realms/test"),
    );
    assert_ne!(forged, callback);
    let (_, query) = forged.split_once('?').unwrap();
    assert_eq!(
        call(query.to_owned()).await,
        (StatusCode::BAD_REQUEST, "issuer_mismatch".into())
    );

    // Expired: the login took longer than its TTL.
    let auth = b.start_login(app, "/").await;
    let callback = b.authorize(&auth, "carol").await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let (_, query) = callback.split_once('?').unwrap();
    assert_eq!(
        call(query.to_owned()).await,
        (StatusCode::BAD_REQUEST, "expired_state".into())
    );

    // A provider error for a real pending login consumes it.
    let auth = b.start_login(app, "/").await;
    let state = auth
        .split("state=")
        .nth(1)
        .unwrap()
        .split('&')
        .next()
        .unwrap()
        .to_owned();
    assert_eq!(
        call(format!("error=access_denied&state={state}")).await,
        (StatusCode::BAD_REQUEST, "provider_error".into())
    );
    assert_eq!(
        call(format!("code=x&state={state}")).await,
        (StatusCode::BAD_REQUEST, "unknown_state".into())
    );

    // HTML for browsers, never a 500.
    let r = b
        .get(&format!("{app}/auth/callback?state=nope&code=x"))
        .await;
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    assert!(r.text().await.unwrap().contains("<h1>Login failed</h1>"));

    assert_eq!(b.me(app).await.status(), StatusCode::UNAUTHORIZED);
    for (_, sess, user, _) in session_rows(&s.db).await {
        assert!(
            user.is_none() && !sess.contains("\"oidc\":"),
            "no half-logged-in session: {sess}"
        );
    }
    s.db.drop_schema().await;
}

#[tokio::test]
async fn two_tabs_log_in_at_once_and_return_to_stays_local() {
    let s = keycloak().await;
    let app = &s.apps[0].url;
    let b = Browser::new();
    let first = b.start_login(app, "//evil.example/path").await;
    let second = b.start_login(app, "/second?tab=2").await;
    let cb_second = b.authorize(&second, "dave").await;
    let cb_first = b.authorize(&first, "dave").await;
    let r = b.get(&cb_second).await;
    assert_eq!(location(&r), "/second?tab=2");
    let r = b.get(&cb_first).await;
    assert_eq!(
        r.status(),
        StatusCode::FOUND,
        "the other tab's login still completes"
    );
    assert_eq!(
        location(&r),
        "/",
        "a return_to that leaves the site falls back to /"
    );
    assert_eq!(b.me(app).await.status(), StatusCode::OK);
    s.db.drop_schema().await;
}

#[tokio::test]
async fn grpc_requests_get_unauthenticated() {
    let s = keycloak().await;
    let r = reqwest::Client::new()
        .post(format!("{}/me", s.apps[0].url))
        .header("content-type", "application/grpc")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.headers()["grpc-status"], "16");
    s.db.drop_schema().await;
}

/// `f` applied to a sealed record (with the app's keys, as an operator's
/// tool would), re-sealed; a record in the clear is edited as it is.
fn edit_sealed(
    keys: &Keyring,
    session: &str,
    field: &str,
    stored: &Value,
    f: impl FnOnce(&mut Value),
) -> Value {
    let aad = tower_pg_session::crypto::Aad { session, field };
    let Some(sealed) = stored.as_str() else {
        let mut clear = stored.clone();
        f(&mut clear);
        return clear;
    };
    let opened = keys.open(sealed, &aad).expect("the record opens");
    let mut record: Value = serde_json::from_slice(opened.plaintext()).unwrap();
    f(&mut record);
    json!(keys.seal(record.to_string().as_bytes(), &aad))
}

/// The login record of session `sid`, opened.
fn open_record(keys: &Keyring, sid: &str, stored: &Value) -> Value {
    let mut out = Value::Null;
    edit_sealed(keys, sid, "oidc", stored, |r| out = r.clone());
    out
}

/// Applies `f` to the login record of every logged-in session.
async fn edit_records(s: &Setup, f: impl Fn(&mut Value)) {
    for (sid, sess, _, _) in session_rows(&s.db).await {
        let sess: Value = serde_json::from_str(&sess).unwrap();
        if let Some(stored) = sess.get("oidc") {
            let edited = edit_sealed(&s.token_keys, &sid, "oidc", stored, &f);
            write_key(&s.db, &sid, "oidc", &edited).await;
        }
    }
}

async fn force_refresh_due(s: &Setup, secs_left: i64) {
    edit_records(s, |r| r["exp"] = json!(now() + secs_left)).await;
}

#[tokio::test]
async fn two_instances_times_twenty_requests_refresh_once() {
    let s = setup("keycloak", 2, 3600, |c| c).await;
    let b = Browser::new();
    assert_eq!(
        b.login(&s.apps[0].url, "erin", "/").await.status(),
        StatusCode::FOUND
    );
    let before: Value = b.me(&s.apps[0].url).await.json().await.unwrap();
    force_refresh_due(&s, 30).await;
    let mut tasks = Vec::new();
    for i in 0..40 {
        let b = b.clone();
        let app = s.apps[i % 2].url.clone();
        tasks.push(tokio::spawn(async move { b.me(&app).await.status() }));
    }
    for t in tasks {
        assert_eq!(t.await.unwrap(), StatusCode::OK);
    }
    let stats = s.idp.stats().await;
    assert_eq!(
        stats["refresh_token"], 1,
        "one refresh at the provider: {stats}"
    );
    let after: Value = b.me(&s.apps[1].url).await.json().await.unwrap();
    assert!(
        after["access_token_expires_at"].as_i64()
            > Some(time::OffsetDateTime::now_utc().unix_timestamp() + 3000)
    );
    assert_eq!(after["sub"], before["sub"]);

    // Rotation: the refresh token used is spent; the stored one is the new
    // one, so the next refresh works too.
    force_refresh_due(&s, 30).await;
    assert_eq!(b.me(&s.apps[0].url).await.status(), StatusCode::OK);
    assert_eq!(s.idp.stats().await["refresh_token"], 2);
    s.db.drop_schema().await;
}

#[tokio::test]
async fn a_refused_refresh_logs_out_cleanly() {
    let s = keycloak().await;
    let app = &s.apps[0].url;
    let b = logged_in(&s, "frank").await;
    // A refresh token the provider does not know, sealed properly for this session.
    edit_records(&s, |r| r["rt"] = json!("not-a-refresh-token")).await;
    force_refresh_due(&s, 30).await;
    let r = b.get(&format!("{app}/me")).await;
    assert_eq!(r.status(), StatusCode::FOUND, "browser: back to the login");
    assert!(location(&r).starts_with("/auth/login"));
    assert!(session_rows(&s.db).await.is_empty(), "the session ended");
    assert_eq!(
        b.me(app).await.status(),
        StatusCode::UNAUTHORIZED,
        "API: 401, not 500"
    );
    s.db.drop_schema().await;
}

#[tokio::test]
async fn a_refresh_naming_another_subject_logs_out() {
    let s = keycloak().await;
    let b = logged_in(&s, "kim").await;
    // The provider's refreshed ID token is genuine, but for someone else.
    s.idp.rename_account("kim", "mallory").await;
    force_refresh_due(&s, 30).await;
    let r = b.me(&s.apps[0].url).await;
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(s.idp.stats().await["refresh_token"], 1, "it did refresh");
    assert!(
        session_rows(&s.db).await.is_empty(),
        "the session ended rather than change hands"
    );
    s.db.drop_schema().await;
}

#[tokio::test]
async fn a_tampered_token_ciphertext_logs_out_cleanly() {
    let s = keycloak().await;
    let b = logged_in(&s, "grace").await;
    // One character of the sealed record changed (to another one:
    // writing a fixed letter would leave it as it was one time in 64).
    let (sid, sess) = first_session(&s.db).await;
    let mut sealed = sess["oidc"].as_str().unwrap().to_owned();
    let other = if &sealed[29..30] == "A" { "B" } else { "A" };
    sealed.replace_range(29..30, other);
    write_key(&s.db, &sid, "oidc", &json!(sealed)).await;
    let r = b.me(&s.apps[0].url).await;
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    assert!(session_rows(&s.db).await.is_empty());
    s.db.drop_schema().await;
}

#[tokio::test]
async fn cognito_like_groups_refresh_without_rotation_and_hosted_logout() {
    let s = setup("cognito", 1, 3600, |c| c).await;
    let app = &s.apps[0].url;
    let b = Browser::new();
    assert_eq!(b.login(app, "heidi", "/").await.status(), StatusCode::FOUND);
    let me: Value = b.me(app).await.json().await.unwrap();
    assert_eq!(me["groups"], json!(["admins", "users"]));
    assert_eq!(me["claims"]["token_use"], "id");
    for round in 1..=2 {
        force_refresh_due(&s, 30).await;
        assert_eq!(b.me(app).await.status(), StatusCode::OK, "refresh {round}");
        assert_eq!(s.idp.stats().await["refresh_token"], round);
    }
    let to = b.logout(app).await;
    assert!(to.starts_with(&format!("{}/logout?", s.idp.base)), "{to}");
    assert!(
        to.contains("client_id=demo")
            && to.contains(&format!("logout_uri={}", urlencode(&format!("{app}/")))),
        "{to}"
    );
    let r = b.get(&to).await;
    assert_eq!(
        r.status(),
        StatusCode::FOUND,
        "the hosted UI accepts the logout"
    );
    assert_eq!(location(&r), format!("{app}/"));
    s.db.drop_schema().await;
}

fn now() -> i64 {
    time::OffsetDateTime::now_utc().unix_timestamp()
}

async fn post_logout_token(app: &str, token: &str) -> (StatusCode, Value) {
    let r = reqwest::Client::new()
        .post(format!("{app}/auth/backchannel-logout"))
        .form(&[("logout_token", token)])
        .send()
        .await
        .unwrap();
    let status = r.status();
    let text = r.text().await.unwrap();
    (status, serde_json::from_str(&text).unwrap_or(Value::Null))
}

#[tokio::test]
async fn back_channel_logout_from_the_provider_ends_the_session() {
    let s = keycloak().await;
    let app = &s.apps[0].url;
    let b = logged_in(&s, "ivan").await;
    let other = logged_in(&s, "judy").await;
    assert_eq!(session_rows(&s.db).await.len(), 2);

    // The user logs out at the provider (another app, or the account page).
    b.logout_at_provider(&s.idp.issuer).await;

    let rows = session_rows(&s.db).await;
    assert_eq!(rows.len(), 1, "ivan's session is gone, judy's is not");
    assert_eq!(rows[0].2.as_deref(), Some("judy"));
    assert_eq!(b.me(app).await.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(other.me(app).await.status(), StatusCode::OK);

    // The token the provider sent cannot be replayed.
    let delivered = s.apps[0].backchannel.lock().unwrap().clone();
    assert_eq!(delivered.len(), 1);
    let token = delivered[0]
        .strip_prefix("logout_token=")
        .unwrap()
        .to_owned();
    let (status, body) = post_logout_token(app, &token).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(body["error"], "invalid_request");
    assert!(
        body["error_description"]
            .as_str()
            .unwrap()
            .contains("replayed"),
        "{body}"
    );
    s.db.drop_schema().await;
}

#[tokio::test]
async fn forged_logout_tokens_are_refused_and_end_nothing() {
    let s = keycloak().await;
    let app = &s.apps[0].url;
    logged_in(&s, "mallory-victim").await;
    let sid = session_rows(&s.db).await[0].3.clone().unwrap();
    let good = json!({
        "iss": s.idp.issuer, "aud": "demo", "iat": now(), "exp": now() + 120,
        "jti": "jti-1", "sid": sid, "sub": "mallory-victim",
        "events": {"http://schemas.openid.net/event/backchannel-logout": {}},
    });
    let typ = json!({"typ": "logout+jwt"});
    let variant = |f: &dyn Fn(&mut serde_json::Map<String, Value>)| {
        let mut c = good.as_object().unwrap().clone();
        f(&mut c);
        Value::Object(c)
    };
    let cases: Vec<(&str, Value, &str)> = vec![
        (
            "nonce",
            variant(&|c| {
                c.insert("nonce".into(), json!("n"));
                c.insert("jti".into(), json!("j2"));
            }),
            "nonce",
        ),
        (
            "no events",
            variant(&|c| {
                c.remove("events");
                c.insert("jti".into(), json!("j3"));
            }),
            "event",
        ),
        (
            "other audience",
            variant(&|c| {
                c.insert("aud".into(), json!("another-client"));
                c.insert("jti".into(), json!("j4"));
            }),
            "audience",
        ),
        (
            "other issuer",
            variant(&|c| {
                c.insert("iss".into(), json!("https://evil.example"));
                c.insert("jti".into(), json!("j5"));
            }),
            "issuer",
        ),
        (
            "old",
            variant(&|c| {
                c.insert("iat".into(), json!(now() - 3600));
                c.insert("jti".into(), json!("j6"));
            }),
            "iat",
        ),
        (
            "no sid or sub",
            variant(&|c| {
                c.remove("sid");
                c.remove("sub");
                c.insert("jti".into(), json!("j7"));
            }),
            "sid",
        ),
        (
            "no jti",
            variant(&|c| {
                c.remove("jti");
            }),
            "jti",
        ),
    ];
    for (what, claims, expect) in cases {
        let token = s.idp.sign(claims, typ.clone()).await;
        let (status, body) = post_logout_token(app, &token).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{what}");
        assert_eq!(body["error"], "invalid_request", "{what}");
        let why = body["error_description"].as_str().unwrap();
        assert!(why.contains(expect), "{what}: {why}");
        assert_eq!(session_rows(&s.db).await.len(), 1, "{what}: nothing ended");
    }
    // A signature by a key the provider does not have.
    let token = s.idp.sign(good.clone(), json!({"typ": "logout+jwt"})).await;
    let (h, rest) = token.split_once('.').unwrap();
    let (p, sig) = rest.split_once('.').unwrap();
    let mut sig = sig.to_owned();
    sig.replace_range(5..6, if &sig[5..6] == "A" { "B" } else { "A" });
    let (status, _) = post_logout_token(app, &format!("{h}.{p}.{sig}")).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let (status, _) = post_logout_token(app, "not-a-jwt").await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(session_rows(&s.db).await.len(), 1);

    // The genuine article works, once.
    let token = s.idp.sign(good, typ).await;
    assert_eq!(post_logout_token(app, &token).await.0, StatusCode::OK);
    assert!(session_rows(&s.db).await.is_empty());
    assert_eq!(
        post_logout_token(app, &token).await.0,
        StatusCode::BAD_REQUEST
    );
    s.db.drop_schema().await;
}

#[tokio::test]
async fn id_tokens_are_verified_strictly() {
    use base64::{engine::general_purpose::URL_SAFE_NO_PAD, Engine};
    let s = keycloak().await;
    let client = &s.apps[0].client;
    let good = json!({"iss": s.idp.issuer, "aud": "demo", "sub": "u1", "iat": now(), "exp": now() + 300, "nonce": "n1"});
    let claims = client
        .verify_id_token_jwt(&s.idp.sign(good.clone(), json!({})).await, Some("n1"))
        .await
        .unwrap();
    assert_eq!(claims["sub"], "u1");

    let with = |k: &str, v: Value| {
        let mut c = good.clone();
        c[k] = v;
        c
    };
    let signed_cases = [
        ("wrong audience", with("aud", json!("someone-else"))),
        (
            "wrong issuer",
            with("iss", json!("https://evil.example/realms/test")),
        ),
        ("expired", with("exp", json!(now() - 120))),
        ("issued in the future", with("iat", json!(now() + 3600))),
    ];
    for (what, claims) in signed_cases {
        let token = s.idp.sign(claims, json!({})).await;
        let err = client
            .verify_id_token_jwt(&token, Some("n1"))
            .await
            .unwrap_err();
        assert_eq!(
            err.kind(),
            tower_pg_session::oidc::AuthErrorKind::InvalidIdToken,
            "{what}"
        );
    }
    // Within the 60 s clock skew, an expiry just past is still accepted.
    let token = s.idp.sign(with("exp", json!(now() - 20)), json!({})).await;
    assert!(client.verify_id_token_jwt(&token, Some("n1")).await.is_ok());
    // Wrong nonce.
    let token = s.idp.sign(good.clone(), json!({})).await;
    assert!(client
        .verify_id_token_jwt(&token, Some("other"))
        .await
        .is_err());

    // alg none: unsigned.
    let enc = |v: &Value| URL_SAFE_NO_PAD.encode(v.to_string());
    let none = format!(
        "{}.{}.",
        enc(&json!({"alg": "none", "typ": "JWT"})),
        enc(&good)
    );
    assert!(
        client.verify_id_token_jwt(&none, Some("n1")).await.is_err(),
        "alg none"
    );
    // HS256 keyed with the provider's public key (the classic confusion).
    let jwks = get_json(&format!("{}/protocol/openid-connect/certs", s.idp.issuer)).await;
    let public = jwks["keys"][0].to_string();
    let head = enc(&json!({"alg": "HS256", "typ": "JWT", "kid": jwks["keys"][0]["kid"]}));
    // A JWT is its signing input, a dot and the tag, as a signed cookie is.
    let signing_input = format!("{head}.{}", enc(&good));
    let hs = common::signed(&signing_input, &public);
    assert!(
        client.verify_id_token_jwt(&hs, Some("n1")).await.is_err(),
        "HS256 with the public key"
    );
    // HS256 with the client secret: refused unless configured.
    let hs = common::signed(&signing_input, CLIENT_SECRET);
    assert!(
        client.verify_id_token_jwt(&hs, Some("n1")).await.is_err(),
        "HS256 with the client secret"
    );

    // The provider rotates its keys: a token with the new kid is accepted
    // after one refetch of the JWKS.
    s.idp.rotate_keys().await;
    let token = s.idp.sign(good.clone(), json!({})).await;
    assert!(
        client.verify_id_token_jwt(&token, Some("n1")).await.is_ok(),
        "new signing key"
    );
    s.db.drop_schema().await;
}

#[tokio::test]
async fn unknown_key_ids_refetch_the_provider_keys_once_not_per_token() {
    let s = keycloak().await;
    let client = &s.apps[0].client;
    let fetches = || async { s.idp.stats().await["jwks"].as_i64().unwrap() };
    let claims = json!({"iss": s.idp.issuer, "aud": "demo", "sub": "u1", "iat": now(), "exp": now() + 300, "nonce": "n1"});
    let before = fetches().await;
    // Tokens naming a key id the provider never published: each is refused,
    // and a flood of them costs the provider one fetch of its keys, not one
    // each.
    let unknown = s
        .idp
        .sign(claims.clone(), json!({"kid": "never-published"}))
        .await;
    for _ in 0..20 {
        let err = client
            .verify_id_token_jwt(&unknown, Some("n1"))
            .await
            .unwrap_err();
        assert_eq!(
            err.kind(),
            tower_pg_session::oidc::AuthErrorKind::InvalidIdToken
        );
    }
    assert_eq!(fetches().await - before, 1, "20 unknown key ids");
    // Tokens under a known key need no fetch at all.
    let known = s.idp.sign(claims, json!({})).await;
    for _ in 0..5 {
        client
            .verify_id_token_jwt(&known, Some("n1"))
            .await
            .unwrap();
    }
    assert_eq!(fetches().await - before, 1);
    s.db.drop_schema().await;
}

#[tokio::test]
async fn logout_revokes_the_refresh_token() {
    let s = keycloak().await;
    let b = logged_in(&s, "kim").await;
    let (sid, sess) = first_session(&s.db).await;
    let record = open_record(&s.token_keys, &sid, &sess["oidc"]);
    let rt = record["rt"].as_str().unwrap().to_owned();
    b.logout(&s.apps[0].url).await;
    let r = reqwest::Client::new()
        .post(format!("{}/protocol/openid-connect/token", s.idp.issuer))
        .basic_auth(CLIENT_ID, Some(CLIENT_SECRET))
        .form(&[
            ("grant_type", "refresh_token"),
            ("refresh_token", rt.as_str()),
        ])
        .send()
        .await
        .unwrap();
    assert_eq!(
        r.status(),
        StatusCode::BAD_REQUEST,
        "the refresh token no longer works"
    );
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"], "invalid_grant");
    s.db.drop_schema().await;
}

#[tokio::test]
async fn token_keys_rotate_without_logging_anyone_out() {
    use tower_pg_session::crypto::EncryptionKey;
    let s = keycloak().await;
    let b = logged_in(&s, "liam").await;
    let sealed_under = |sess: Value| sess["oidc"].as_str().unwrap()[..8].to_owned();
    let before = sealed_under(first_session(&s.db).await.1);

    // A second instance with a new first key, the old one still accepted.
    let new_key = EncryptionKey::generate();
    let rotated = Keyring::new(vec![new_key, s.token_key.clone()]).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://127.0.0.1:{}", listener.local_addr().unwrap().port());
    let config = OidcConfig::new(&s.idp.issuer, CLIENT_ID, &url, rotated)
        .unwrap()
        .with_client_secret(CLIENT_SECRET);
    let second = App::serve(&s.db, listener, url.clone(), config).await;
    assert_eq!(
        b.me(&url).await.status(),
        StatusCode::OK,
        "old ciphertexts still open"
    );
    let after = sealed_under(first_session(&s.db).await.1);
    assert_ne!(before, after, "re-sealed under the new key on that request");
    assert_eq!(b.me(&url).await.status(), StatusCode::OK);
    drop(second);
    s.db.drop_schema().await;
}

#[tokio::test]
async fn an_unreachable_provider_is_a_clear_error_not_a_panic() {
    let db = Db::new().await;
    let store = db.store().await;
    let config = unserved_config("http://127.0.0.1:1/realms/x");
    let err = OidcClient::discover(config, store).await.unwrap_err();
    assert_eq!(err.status(), StatusCode::BAD_GATEWAY);
    assert!(
        err.to_string()
            .contains("discovery at http://127.0.0.1:1/realms/x failed"),
        "{err}"
    );

    // The provider goes away after start-up: the callback's code exchange
    // gets 502; an expired access token cannot be refreshed: 502, no panic.
    let mut s = keycloak().await;
    let app = s.apps[0].url.clone();
    let b = logged_in(&s, "mia").await;
    let b2 = Browser::new();
    let auth = b2.start_login(&app, "/").await;
    let callback = b2.authorize(&auth, "noah").await;
    drop(std::mem::replace(
        &mut s.idp,
        Idp::start("keycloak", &["http://127.0.0.1:9".into()], 60).await,
    ));
    let r = b2.api(&callback).await;
    assert_eq!(r.status(), StatusCode::BAD_GATEWAY);
    force_refresh_due(&s, -10).await;
    let r = b.me(&app).await;
    assert_eq!(r.status(), StatusCode::BAD_GATEWAY);
    force_refresh_due(&s, 100).await;
    assert_eq!(
        b.me(&app).await.status(),
        StatusCode::OK,
        "a still-valid token carries on"
    );
    s.db.drop_schema().await;
    db.drop_schema().await;
}

#[tokio::test]
async fn pending_logins_are_capped_and_a_bad_code_is_refused() {
    let s = setup("keycloak", 1, 3600, |c| c.with_max_pending_logins(3)).await;
    let app = &s.apps[0].url;
    let b = Browser::new();
    let mut urls = Vec::new();
    for _ in 0..5 {
        urls.push(b.start_login(app, "/").await);
    }
    let sess = first_session(&s.db).await.1;
    let pending = sess
        .as_object()
        .unwrap()
        .keys()
        .filter(|k| k.starts_with("oidc.login."))
        .count();
    assert_eq!(pending, 3, "at most 3 pending logins per browser");
    // The oldest were dropped: their callbacks are unknown now.
    let callback = b.authorize(&urls[0], "olga").await;
    let r = b.api(&callback).await;
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);

    // A genuine state with a code the provider never issued.
    let callback = b.authorize(&urls[4], "olga").await;
    let (head, tail) = callback.split_once("code=").unwrap();
    let rest = tail
        .split_once('&')
        .map(|(_, r)| format!("&{r}"))
        .unwrap_or_default();
    let r = b.api(&format!("{head}code=bogus{rest}")).await;
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"], "invalid_grant", "{body}");
    assert_eq!(b.me(app).await.status(), StatusCode::UNAUTHORIZED);
    s.db.drop_schema().await;
}

#[tokio::test]
async fn a_keycloak_issuer_with_a_trailing_slash_works_and_secrets_stay_out_of_debug() {
    let s = keycloak().await;
    let config = unserved_config(&format!("{}/", s.idp.issuer)).with_client_secret(CLIENT_SECRET);
    let debug = format!("{config:?}");
    assert!(!debug.contains(CLIENT_SECRET), "{debug}");
    let client = OidcClient::discover(config, s.apps[0].store.clone())
        .await
        .unwrap();
    assert_eq!(client.issuer(), s.idp.issuer);
    assert_eq!(
        client.provider(),
        &tower_pg_session::oidc::Provider::Keycloak
    );
    assert!(!format!("{client:?}").contains(CLIENT_SECRET));
    s.db.drop_schema().await;
}

#[tokio::test]
async fn discovery_follows_no_redirects() {
    // A server whose discovery URL redirects to a document that would be
    // valid for it: following the redirect would succeed, so a failure
    // shows the client did not follow it.
    let s = keycloak().await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let me = format!("http://127.0.0.1:{}", listener.local_addr().unwrap().port());
    let mut doc = get_json(&format!(
        "{}/.well-known/openid-configuration",
        s.idp.issuer
    ))
    .await;
    doc["issuer"] = json!(me);
    let redirector = axum::Router::new()
        .route(
            "/.well-known/openid-configuration",
            axum::routing::get(|| async { (StatusCode::FOUND, [("location", "/real")]) }),
        )
        .route(
            "/real",
            axum::routing::get(move || async move { axum::Json(doc) }),
        );
    let server = tokio::spawn(async move { axum::serve(listener, redirector).await });
    let err = OidcClient::discover(unserved_config(&me), s.apps[0].store.clone())
        .await
        .unwrap_err();
    assert_eq!(err.status(), StatusCode::BAD_GATEWAY);
    assert!(err.to_string().contains("302"), "{err}");
    server.abort();
    s.db.drop_schema().await;
}

#[tokio::test]
async fn the_login_is_written_where_passport_looks_when_asked() {
    let s = setup("keycloak", 1, 3600, |c| c.with_express_user_key("passport")).await;
    logged_in(&s, "pat").await;
    let sess = first_session(&s.db).await.1;
    assert_eq!(sess["passport"], json!({"user": "pat"}));
    s.db.drop_schema().await;
}

/// The session of `user`: its id and data.
async fn session_of(db: &Db, user: &str) -> (String, Value) {
    let (sid, sess, _, _) = session_rows(db)
        .await
        .into_iter()
        .find(|r| r.2.as_deref() == Some(user))
        .unwrap_or_else(|| panic!("no session of {user}"));
    (sid, serde_json::from_str(&sess).unwrap())
}

/// Writes `value` under `key` in the stored data of session `sid`, as
/// hostile data written by the app itself (or anyone with the table) would.
async fn write_key(db: &Db, sid: &str, key: &str, value: &Value) {
    sqlx::query(&format!(
        "UPDATE {} SET sess = jsonb_set(sess::jsonb, ARRAY[$2], $3::jsonb)::json WHERE sid = $1",
        db.table()
    ))
    .bind(sid)
    .bind(key)
    .bind(value.to_string())
    .execute(&db.pool)
    .await
    .unwrap();
}

/// The key of the (one) pending login in `sess`.
fn pending_key_of(sess: &Value) -> String {
    sess.as_object()
        .unwrap()
        .keys()
        .find(|k| k.starts_with("oidc.login."))
        .expect("a pending login")
        .clone()
}

/// What a hostile client or app puts where the login record lives: a
/// record naming an admin with no expiry (edited from the real one when it
/// is readable), and arbitrary JSON.
fn forged_records(real: &Value) -> Vec<Value> {
    let mut admin = match real {
        Value::Object(_) => real.clone(),
        sealed => json!({"iss": "x", "nonce": "n", "at": sealed}),
    };
    let o = admin.as_object_mut().unwrap();
    o.insert("sub".into(), json!("admin"));
    o.insert("claims".into(), json!({"sub": "admin"}));
    o.insert("groups".into(), json!(["admins"]));
    o.insert("exp".into(), Value::Null);
    vec![
        admin,
        Value::Null,
        json!(42),
        json!([]),
        json!({}),
        json!({"sub": "admin", "groups": ["admins"]}),
        json!("not sealed"),
    ]
}

/// A pending login sent elsewhere: edited from the real one when it is
/// readable, else a record of that shape.
fn forged_pending(real: &Value, return_to: &str) -> Value {
    let mut forged = match real {
        Value::Object(_) => real.clone(),
        _ => json!({"state": "s", "nonce": "n", "pkce": "p", "exp_ms": i64::MAX, "started_ns": 0}),
    };
    forged["return_to"] = json!(return_to);
    forged
}

/// `/me` answers 401 or the true identity, never another.
async fn me_is(b: &Browser, app: &str, user: &str) -> StatusCode {
    let r = b.me(app).await;
    let status = r.status();
    if status == StatusCode::OK {
        let me: Value = r.json().await.unwrap();
        assert_eq!(me["sub"], user, "{me}");
        assert_eq!(me["claims"]["sub"], user, "{me}");
        assert!(me["groups"].as_array().unwrap().is_empty(), "{me}");
        assert!(me["access_token_expires_at"].is_i64(), "{me}");
    } else {
        assert_eq!(status, StatusCode::UNAUTHORIZED);
    }
    status
}

#[tokio::test]
async fn handlers_cannot_write_the_login_keys_and_forgeries_never_log_anyone_in() {
    let s = keycloak().await;
    let app = &s.apps[0].url;
    let b = logged_in(&s, "alice").await;
    let send = |req: reqwest::RequestBuilder| async move { req.send().await.unwrap().status() };
    let put =
        |key: &str, v: &Value| send(b.http.put(format!("{app}/kv/{}", urlencode(key))).json(v));

    // A pending login whose return_to the client rewrites through the handler.
    let auth = b.start_login(app, "/after").await;
    let sess = first_session(&s.db).await.1;
    let key = pending_key_of(&sess);
    let forged = forged_pending(&sess[&key], "https://evil.example/");
    assert_eq!(put(&key, &forged).await, StatusCode::FORBIDDEN);
    let callback = b.authorize(&auth, "alice").await;
    let r = b.get(&callback).await;
    assert_eq!(r.status(), StatusCode::FOUND);
    assert_eq!(location(&r), "/after", "the return_to the login began with");

    // The logged-in user: every reserved key, every shape of value.
    let before = first_session(&s.db).await.1;
    for forged in forged_records(&before["oidc"]) {
        for key in [
            "oidc",
            "oidc.login.0123456789abcdef01234567",
            "oidc.login.",
            "passport",
        ] {
            assert_eq!(
                put(key, &forged).await,
                StatusCode::FORBIDDEN,
                "{key}: {forged}"
            );
        }
        assert_eq!(me_is(&b, app, "alice").await, StatusCode::OK, "{forged}");
    }
    let delete = send(b.http.delete(format!("{app}/kv/oidc"))).await;
    assert_eq!(delete, StatusCode::FORBIDDEN);
    assert_eq!(
        first_session(&s.db).await.1,
        before,
        "the stored session is intact"
    );

    // The true record still decides: its refresh happens when due.
    force_refresh_due(&s, 30).await;
    assert_eq!(me_is(&b, app, "alice").await, StatusCode::OK);
    assert_eq!(s.idp.stats().await["refresh_token"], 1);
    // An ordinary key still works.
    assert_eq!(put("colour", &json!("red")).await, StatusCode::NO_CONTENT);
    s.db.drop_schema().await;
}

#[tokio::test]
async fn forged_login_data_written_into_the_database_is_never_trusted() {
    let s = keycloak().await;
    let app = &s.apps[0].url;
    let alice = logged_in(&s, "alice").await;
    let bob = logged_in(&s, "bob").await;
    let evil = "https://evil.example/";

    // A pending login rewritten in the table to send the browser elsewhere.
    let auth = alice.start_login(app, "/after").await;
    let (sid, sess) = session_of(&s.db, "alice").await;
    let key = pending_key_of(&sess);
    write_key(&s.db, &sid, &key, &forged_pending(&sess[&key], evil)).await;
    let callback = alice.authorize(&auth, "alice").await;
    let r = alice.api(&callback).await;
    assert_eq!(r.status(), StatusCode::BAD_REQUEST, "{:?}", r.headers());
    assert_eq!(me_is(&alice, app, "alice").await, StatusCode::OK);

    // Sealed with the app's own keys yet naming another origin (a record of
    // an older version, or of a bug): the return_to is checked again.
    let auth = alice.start_login(app, "/after").await;
    let (sid, sess) = session_of(&s.db, "alice").await;
    let key = pending_key_of(&sess);
    let resealed = edit_sealed(&s.token_keys, &key, "oidc.login", &sess[&key], |p| {
        p["return_to"] = json!(evil);
    });
    write_key(&s.db, &sid, &key, &resealed).await;
    let callback = alice.authorize(&auth, "alice").await;
    let r = alice.get(&callback).await;
    assert_eq!(r.status(), StatusCode::FOUND);
    assert_eq!(location(&r), "/");

    // The user's record rewritten: another identity, admin, no expiry. In
    // the clear (as older versions stored it), it is dropped and the rest
    // of the session kept.
    let (sid, sess) = session_of(&s.db, "alice").await;
    let forgeries = forged_records(&sess["oidc"]);
    write_key(&s.db, &sid, "colour", &json!("red")).await;
    write_key(&s.db, &sid, "oidc", &forgeries[0]).await;
    assert_eq!(me_is(&alice, app, "alice").await, StatusCode::UNAUTHORIZED);
    let kept = session_of(&s.db, "alice").await.1;
    assert!(kept.get("oidc").is_none(), "{kept}");
    assert_eq!(kept["colour"], "red");
    for forged in forgeries {
        write_key(&s.db, &sid, "oidc", &forged).await;
        assert_eq!(
            me_is(&alice, app, "alice").await,
            StatusCode::UNAUTHORIZED,
            "{forged}"
        );
    }
    // Another session's genuine record, moved here.
    let carol = logged_in(&s, "carol").await;
    let (sid, _) = session_of(&s.db, "carol").await;
    let bobs = session_of(&s.db, "bob").await.1;
    write_key(&s.db, &sid, "oidc", &bobs["oidc"]).await;
    assert_eq!(me_is(&carol, app, "carol").await, StatusCode::UNAUTHORIZED);

    // Forged keys beside a true record change nothing; its refresh happens.
    let (sid, _) = session_of(&s.db, "bob").await;
    let forged = forged_pending(&Value::Null, evil);
    write_key(&s.db, &sid, "oidc.login.0123456789abcdef01234567", &forged).await;
    write_key(&s.db, &sid, "passport", &json!({"user": "admin"})).await;
    assert_eq!(me_is(&bob, app, "bob").await, StatusCode::OK);
    force_refresh_due(&s, 30).await;
    assert_eq!(me_is(&bob, app, "bob").await, StatusCode::OK);
    assert_eq!(s.idp.stats().await["refresh_token"], 1);
    s.db.drop_schema().await;
}

#[tokio::test]
async fn extreme_stored_token_expiries_never_panic() {
    let s = keycloak().await;
    let app = &s.apps[0].url;
    let b = logged_in(&s, "oscar").await;
    // Sealed with the app's own keys: far future is valid with no refresh,
    // far past is refreshed, out of range does not open; never a panic or a
    // dropped connection.
    for exp in [json!(i64::MAX), json!(i64::MIN), json!(u64::MAX), json!(-1)] {
        edit_records(&s, |r| r["exp"] = exp.clone()).await;
        let status = b.me(app).await.status();
        assert!(
            [StatusCode::OK, StatusCode::UNAUTHORIZED].contains(&status),
            "exp {exp}: {status}"
        );
    }
    s.db.drop_schema().await;
}

#[tokio::test]
async fn logout_tokens_need_exp_and_no_foreign_type() {
    let s = keycloak().await;
    let app = &s.apps[0].url;
    logged_in(&s, "petra").await;
    let sid = session_rows(&s.db).await[0].3.clone().unwrap();
    let claims = |jti: &str, exp: Option<i64>| {
        let mut c = json!({
            "iss": s.idp.issuer, "aud": "demo", "iat": now(), "jti": jti, "sid": sid,
            "events": {"http://schemas.openid.net/event/backchannel-logout": {}},
        });
        if let Some(exp) = exp {
            c["exp"] = json!(exp);
        }
        c
    };
    let cases = [
        (
            "no exp",
            claims("e1", None),
            json!({"typ": "logout+jwt"}),
            "exp",
        ),
        (
            "an access token",
            claims("e2", Some(now() + 60)),
            json!({"typ": "at+jwt"}),
            "typ",
        ),
        (
            "an ID token type",
            claims("e3", Some(now() + 60)),
            json!({"typ": "id_token+jwt"}),
            "typ",
        ),
    ];
    for (what, claims, header, expect) in cases {
        let token = s.idp.sign(claims, header).await;
        let (status, body) = post_logout_token(app, &token).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{what}");
        let why = body["error_description"].as_str().unwrap();
        assert!(why.contains(expect), "{what}: {why}");
        assert_eq!(session_rows(&s.db).await.len(), 1, "{what}: nothing ended");
    }
    // Explicitly typed in any case, or the generic JWT of older providers.
    for (jti, typ) in [
        ("e4", "Logout+JWT"),
        ("e5", "application/logout+jwt"),
        ("e6", "JWT"),
    ] {
        logged_in(&s, "petra").await;
        let sid = session_rows(&s.db).await.last().unwrap().3.clone().unwrap();
        let mut c = claims(jti, Some(now() + 60));
        c["sid"] = json!(sid);
        let token = s.idp.sign(c, json!({ "typ": typ })).await;
        assert_eq!(
            post_logout_token(app, &token).await.0,
            StatusCode::OK,
            "{typ}"
        );
    }
    assert_eq!(
        session_rows(&s.db).await.len(),
        1,
        "the first session remains"
    );
    s.db.drop_schema().await;
}

#[tokio::test]
async fn a_non_ascii_return_to_comes_back_percent_encoded() {
    let s = keycloak().await;
    let app = &s.apps[0].url;
    let b = Browser::new();
    let r = b.login(app, "quinn", "/café/ü?q=日本#é").await;
    assert_eq!(r.status(), StatusCode::FOUND);
    assert_eq!(
        location(&r),
        "/caf%C3%A9/%C3%BC?q=%E6%97%A5%E6%9C%AC#%C3%A9"
    );
    assert_eq!(b.me(app).await.status(), StatusCode::OK);
    s.db.drop_schema().await;
}
