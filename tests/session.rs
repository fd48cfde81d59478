//! The session layer against the real Postgres: statements per request,
//! concurrency, and bad input.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use axum::http::StatusCode;
use common::*;
use serde_json::json;
use tower_pg_session::{SessionLayer, SigningKeys};

async fn setup() -> (Db, Client) {
    let db = Db::new().await;
    let app = app(layer(db.store().await), Gate::default());
    (db, Client::new(app))
}

#[tokio::test]
async fn statements_per_request() {
    let (db, mut c) = setup().await;
    let base = db.statements().await;
    let mut delta = {
        let mut last = base;
        move |now: i64| {
            let d = now - last;
            last = now;
            d
        }
    };

    // Never touches the session: nothing, and no cookie.
    let r = c.get("/untouched").await;
    assert_eq!(r.status, StatusCode::OK);
    assert!(r.set_cookie().is_none());
    assert_eq!(delta(db.statements().await), 0, "untouched request");

    // No cookie, only reads: nothing either.
    let r = c.get("/peek").await;
    assert_eq!(r.body, json!({"count": 0}));
    assert!(r.set_cookie().is_none());
    assert_eq!(delta(db.statements().await), 0, "cookieless read");

    // New session: one INSERT.
    let r = c.get("/counter").await;
    assert_eq!(r.body, json!({"count": 1}));
    let sc = r.set_cookie().unwrap();
    for attr in ["HttpOnly", "SameSite=Lax", "Path=/", "Max-Age=86400"] {
        assert!(sc.contains(attr), "{sc}");
    }
    assert_eq!(delta(db.statements().await), 1, "new session");

    // Read with a valid session: one statement, no write, no cookie.
    let xmin_before: String = xmin(&db).await;
    delta(db.statements().await); // (the fixture's own query above)
    let r = c.get("/peek").await;
    assert_eq!(r.body, json!({"count": 1}));
    assert!(r.set_cookie().is_none(), "fresh session is not re-sent");
    assert_eq!(delta(db.statements().await), 1, "read");
    assert_eq!(
        xmin(&db).await,
        xmin_before,
        "a read before the touch is due writes nothing"
    );
    delta(db.statements().await);

    // Modify: load + one update.
    let r = c.get("/counter").await;
    assert_eq!(r.body, json!({"count": 2}));
    assert_eq!(delta(db.statements().await), 2, "modify");

    // cycle_id: load + one update, new id, data kept.
    let old = c.cookie.clone().unwrap();
    let r = c.post("/cycle").await;
    assert_eq!(r.status, StatusCode::NO_CONTENT);
    assert_eq!(delta(db.statements().await), 2, "cycle");
    assert_ne!(c.cookie.clone().unwrap(), old);
    assert_eq!(c.get("/peek").await.body, json!({"count": 2}));
    delta(db.statements().await);
    // The old id is dead.
    let mut stale = Client {
        cookie: Some(old),
        ..c.clone()
    };
    assert_eq!(stale.get("/peek").await.body, json!({"count": 0}));
    // Requests one at a time have nothing to share: each load was the plain
    // primary-key statement, none the shape made for many keys.
    let shared = db.statements_like("%unnest%").await;
    assert_eq!(shared, 0, "a lone load uses the plain statement");
    db.drop_schema().await;
}

async fn xmin(db: &Db) -> String {
    sqlx::query_scalar(&format!("SELECT xmin::text FROM {}", db.table()))
        .fetch_one(&db.pool)
        .await
        .unwrap()
}

#[tokio::test]
async fn touch_extends_idle_expiry_only_when_due() {
    let (db, mut c) = setup().await;
    c.get("/counter").await;
    // Pretend 3 hours passed: 21 h left of a 24 h timeout, below the 90 % mark.
    sqlx::query(&format!(
        "UPDATE {} SET expire = expire - interval '3 hours'",
        db.table()
    ))
    .execute(&db.pool)
    .await
    .unwrap();
    let before = db.statements().await;
    let r = c.get("/peek").await;
    assert_eq!(r.body, json!({"count": 1}));
    assert_eq!(
        db.statements().await - before,
        2,
        "a lone read, then the touch once it is due"
    );
    let before = db.statements().await;
    assert_eq!(c.get("/peek").await.body, json!({"count": 1}));
    assert_eq!(
        db.statements().await - before,
        1,
        "the touch is not due again"
    );
    let sc = r.set_cookie().expect("extended expiry re-sends the cookie");
    assert!(sc.contains("Max-Age=8640"), "{sc}");
    let left: f64 = sqlx::query_scalar(&format!(
        "SELECT extract(epoch FROM expire - (now() AT TIME ZONE current_setting('log_timezone')))::float8 FROM {}",
        db.table()
    ))
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert!(
        (86_000.0..=86_401.0).contains(&left),
        "expiry extended to 24 h, {left}"
    );
    db.drop_schema().await;
}

#[tokio::test]
async fn fifty_concurrent_writers_keep_every_key() {
    let (db, mut c) = setup().await;
    c.put("/kv/seed", json!(0)).await;
    let mut tasks = Vec::new();
    for i in 0..50 {
        let mut c = c.clone();
        tasks.push(tokio::spawn(async move {
            c.put(&format!("/kv/k{i}"), json!(i)).await.status
        }));
    }
    for t in tasks {
        assert_eq!(t.await.unwrap(), StatusCode::NO_CONTENT);
    }
    let data = c.get("/kv").await.body;
    let data = data.as_object().unwrap();
    for i in 0..50 {
        assert_eq!(data.get(&format!("k{i}")), Some(&json!(i)), "key k{i} lost");
    }
    assert_eq!(data.len(), 51);
    db.drop_schema().await;
}

#[tokio::test]
async fn logout_during_a_slow_request_is_not_undone() {
    let db = Db::new().await;
    let gate = Gate::default();
    let mut c = Client::new(app(layer(db.store().await), gate.clone()));
    c.get("/counter").await;
    let mut slow = c.clone();
    let pending = tokio::spawn(async move { slow.put("/slow/late", json!(null)).await });
    gate.entered.notified().await;
    assert_eq!(c.post("/logout").await.status, StatusCode::NO_CONTENT);
    assert_eq!(db.rows().await, 0);
    gate.release.notify_one();
    let r = pending.await.unwrap();
    assert_eq!(r.status, StatusCode::NO_CONTENT);
    assert!(
        r.set_cookie().unwrap().contains("Max-Age=0"),
        "the ended session's cookie is cleared"
    );
    assert_eq!(
        db.rows().await,
        0,
        "the slow request did not bring the session back"
    );
    db.drop_schema().await;
}

#[tokio::test]
async fn a_concurrent_change_is_merged_not_overwritten() {
    let db = Db::new().await;
    let gate = Gate::default();
    let mut c = Client::new(app(layer(db.store().await), gate.clone()));
    c.put("/kv/a", json!(1)).await;
    let mut slow = c.clone();
    let pending = tokio::spawn(async move { slow.put("/slow/b", json!(null)).await });
    gate.entered.notified().await;
    c.put("/kv/c", json!(3)).await;
    gate.release.notify_one();
    assert_eq!(pending.await.unwrap().status, StatusCode::NO_CONTENT);
    assert_eq!(db.only_sess().await, json!({"a": 1, "c": 3, "b": true}));
    db.drop_schema().await;
}

#[tokio::test]
async fn bad_cookies_get_a_fresh_session_and_leave_the_row_alone() {
    let (db, mut c) = setup().await;
    c.put("/kv/secret", json!("s3cr3t")).await;
    let good = c.cookie.clone().unwrap();
    let stored = db.only_sess().await;
    let (id, tag) = good.rsplit_once('.').unwrap();
    let mut flipped = tag.to_owned().into_bytes();
    flipped[0] = if flipped[0] == b'x' { b'y' } else { b'x' };
    let flipped = String::from_utf8(flipped).unwrap();
    let other_key = SigningKeys::new([KEY_B]).unwrap();
    let _ = other_key;
    let cases = [
        format!("{id}.{flipped}"),                 // tampered tag
        id.to_owned(),                             // no tag
        format!("{id}x.{tag}"),                    // tampered id
        format!("{id}.{tag}{}", "A".repeat(5000)), // oversized
        "%%%garbage%%%".to_owned(),                // malformed
        format!("{id}.{}", "A".repeat(43)),        // wrong key / forged
    ];
    for bad in cases {
        let mut evil = Client {
            cookie: Some(bad.clone()),
            ..c.clone()
        };
        let before = db.statements().await;
        let r = evil.get("/kv").await;
        assert_eq!(r.status, StatusCode::OK, "{bad}");
        assert_eq!(r.body, json!({}), "a bad cookie sees no data: {bad}");
        assert_eq!(db.statements().await, before, "a bad cookie costs no query");
        // Writing through a bad cookie creates a new session; the old row stays.
        let r = evil.put("/kv/x", json!(1)).await;
        assert_eq!(r.status, StatusCode::NO_CONTENT);
        assert_ne!(evil.cookie.as_deref(), Some(good.as_str()));
    }
    let original: serde_json::Value = serde_json::from_str(
        &sqlx::query_scalar::<_, String>(&format!(
            "SELECT sess::text FROM {} WHERE sid = $1",
            db.table()
        ))
        .bind(id)
        .fetch_one(&db.pool)
        .await
        .unwrap(),
    )
    .unwrap();
    assert_eq!(original, stored, "the row the cookie named is untouched");
    assert_eq!(c.get("/kv").await.body, json!({"secret": "s3cr3t"}));
    db.drop_schema().await;
}

#[tokio::test]
async fn signing_keys_rotate_without_logging_anyone_out() {
    let db = Db::new().await;
    let store = db.store().await;
    let old = SessionLayer::builder(store.clone(), SigningKeys::new([KEY_A]).unwrap())
        .with_insecure_http_cookie()
        .build()
        .unwrap();
    let mut c = Client::new(app(old, Gate::default()));
    c.get("/counter").await;
    let signed_with_a = c.cookie.clone().unwrap();

    // Deploy with B first, A still accepted.
    let rotated = SessionLayer::builder(store.clone(), SigningKeys::new([KEY_B, KEY_A]).unwrap())
        .with_insecure_http_cookie()
        .build()
        .unwrap();
    c.app = app(rotated, Gate::default());
    assert_eq!(c.get("/counter").await.body, json!({"count": 2}));
    let signed_with_b = c.cookie.clone().unwrap();
    assert_ne!(
        signed_with_a, signed_with_b,
        "the write re-signs with the new key"
    );

    // Later, A retired: B's cookie still works, A's no longer does.
    let only_b = SessionLayer::builder(store, SigningKeys::new([KEY_B]).unwrap())
        .with_insecure_http_cookie()
        .build()
        .unwrap();
    c.app = app(only_b, Gate::default());
    assert_eq!(c.get("/peek").await.body, json!({"count": 2}));
    c.cookie = Some(signed_with_a);
    assert_eq!(c.get("/peek").await.body, json!({"count": 0}));
    db.drop_schema().await;
}

#[tokio::test]
async fn stored_data_that_is_not_an_object_is_ignored_not_overwritten() {
    let (db, mut c) = setup().await;
    c.get("/counter").await;
    sqlx::query(&format!("UPDATE {} SET sess = '[1,2,3]'", db.table()))
        .execute(&db.pool)
        .await
        .unwrap();
    let r = c.get("/kv").await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.body, json!({}));
    c.put("/kv/x", json!(1)).await;
    let rows: Vec<String> = sqlx::query_scalar(&format!(
        "SELECT sess::text FROM {} ORDER BY sess::text",
        db.table()
    ))
    .fetch_all(&db.pool)
    .await
    .unwrap();
    assert_eq!(rows, vec!["[1,2,3]".to_owned(), r#"{"x":1}"#.to_owned()]);
    db.drop_schema().await;
}

#[tokio::test]
async fn oversized_data_is_refused_and_the_stored_state_kept() {
    let db = Db::new().await;
    let layer = builder(db.store().await)
        .with_max_data_size(1024)
        .build()
        .unwrap();
    let mut c = Client::new(app(layer, Gate::default()));
    c.put("/kv/small", json!("x")).await;
    let r = c.put("/kv/big", json!("y".repeat(2000))).await;
    assert_eq!(r.status, StatusCode::PAYLOAD_TOO_LARGE);
    assert!(
        r.body.as_str().unwrap().contains("over the limit of 1024"),
        "{}",
        r.body
    );
    assert_eq!(db.only_sess().await, json!({"small": "x"}));
    assert_eq!(c.get("/kv").await.body, json!({"small": "x"}));
    db.drop_schema().await;
}

#[tokio::test]
async fn hashed_ids_keep_no_usable_id_at_rest() {
    let db = Db::new().await;
    let layer = builder(db.store().await)
        .with_hashed_ids(true)
        .build()
        .unwrap();
    let mut c = Client::new(app(layer, Gate::default()));
    c.get("/counter").await;
    assert_eq!(c.get("/counter").await.body, json!({"count": 2}));
    let id = c
        .cookie
        .clone()
        .unwrap()
        .rsplit_once('.')
        .unwrap()
        .0
        .to_owned();
    let sid: String = sqlx::query_scalar(&format!("SELECT sid FROM {}", db.table()))
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_ne!(sid, id);
    use sha2::Digest;
    let expected: String = sha2::Sha256::digest(id.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    assert_eq!(sid, expected);
    db.drop_schema().await;
}

#[tokio::test]
async fn idle_and_absolute_timeouts_end_sessions() {
    let db = Db::new().await;
    let layer = builder(db.store().await)
        .with_idle_timeout(Some(Duration::from_secs(3600)))
        .with_absolute_timeout(Some(Duration::from_secs(4 * 3600)))
        .build()
        .unwrap();
    let mut c = Client::new(app(layer, Gate::default()));
    c.get("/counter").await;
    // Idle: the row's expiry passed.
    sqlx::query(&format!(
        "UPDATE {} SET expire = expire - interval '61 minutes'",
        db.table()
    ))
    .execute(&db.pool)
    .await
    .unwrap();
    assert_eq!(
        c.get("/peek").await.body,
        json!({"count": 0}),
        "idle-expired"
    );

    // Absolute: active, but created 3.5 h ago: the touch cannot go past 4 h.
    let mut c = Client::new(c.app.clone());
    c.get("/counter").await;
    sqlx::query(&format!(
        "UPDATE {} SET created_at = now() - interval '210 minutes', expire = expire - interval '20 minutes'",
        db.table()
    ))
    .execute(&db.pool)
    .await
    .unwrap();
    let r = c.get("/counter").await;
    assert_eq!(r.body, json!({"count": 2}));
    let max_age: i64 = r
        .set_cookie()
        .unwrap()
        .split("Max-Age=")
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        (1790..=1800).contains(&max_age),
        "capped at created + 4 h: {max_age}"
    );
    db.drop_schema().await;
}

#[tokio::test]
async fn cookie_attributes_are_secure_by_default() {
    let db = Db::new().await;
    let layer = SessionLayer::builder(db.store().await, SigningKeys::new([KEY_A]).unwrap())
        .with_host_prefix()
        .build()
        .unwrap();
    let mut c = Client::new(app(layer, Gate::default()));
    c.cookie_name = "__Host-session".into();
    let r = c.get("/counter").await;
    let sc = r.set_cookie().unwrap();
    assert!(sc.starts_with("__Host-session="), "{sc}");
    for attr in ["; Path=/", "; HttpOnly", "; Secure", "; SameSite=Lax"] {
        assert!(sc.contains(attr), "{sc}");
    }
    assert!(!sc.contains("Domain"));
    assert_eq!(c.get("/counter").await.body, json!({"count": 2}));
    db.drop_schema().await;
}

#[tokio::test]
async fn take_once_hands_a_value_to_exactly_one_of_twenty_concurrent_requests() {
    let (db, mut c) = setup().await;
    c.put("/kv/ticket", json!("only-once")).await;
    c.put("/kv/other", json!(1)).await;
    let mut tasks = Vec::new();
    for _ in 0..20 {
        let mut c = c.clone();
        tasks.push(tokio::spawn(async move { c.post("/take/ticket").await }));
    }
    let mut winners = 0;
    for t in tasks {
        let r = t.await.unwrap();
        match r.status {
            StatusCode::OK => {
                winners += 1;
                assert_eq!(r.body, json!("only-once"));
            }
            StatusCode::NOT_FOUND => {}
            other => panic!("unexpected {other}"),
        }
    }
    assert_eq!(winners, 1);
    assert_eq!(
        c.post("/take/ticket").await.status,
        StatusCode::NOT_FOUND,
        "a replay after success fails"
    );
    assert_eq!(db.only_sess().await, json!({"other": 1}));
    db.drop_schema().await;
}

#[tokio::test]
async fn reserved_keys_are_refused_before_any_statement_and_nothing_is_stored() {
    let db = Db::new().await;
    let reserving = builder(db.store().await)
        .with_reserved_key("passport")
        .build()
        .unwrap();
    let mut c = Client::new(app(reserving, Gate::default()));
    assert_eq!(c.get("/counter").await.body, json!({"count": 1}));
    let stored = db.only_sess().await;
    let before = db.statements().await;
    let forged = json!({"sub": "admin", "groups": ["admins"], "exp": null});
    for key in [
        "oidc",
        "oidc.login.0123456789abcdef01234567",
        "oidc.login.",
        "passport",
    ] {
        let r = c.put(&format!("/kv/{key}"), forged.clone()).await;
        assert_eq!(r.status, StatusCode::FORBIDDEN, "{key}");
        let r = c.post(&format!("/take/{key}")).await;
        assert_eq!(r.status, StatusCode::FORBIDDEN, "{key}");
    }
    assert_eq!(db.statements().await - before, 0, "refused before loading");
    assert_eq!(db.only_sess().await, stored, "nothing stored");
    // Keys that only look alike are the application's.
    for key in ["oidc2", "oidc.login", "passport.user"] {
        let r = c.put(&format!("/kv/{key}"), json!(1)).await;
        assert_eq!(r.status, StatusCode::NO_CONTENT, "{key}");
    }
    // Without the setting, `passport` is an ordinary key.
    let mut plain = Client::new(app(layer(db.store().await), Gate::default()));
    let r = plain.put("/kv/passport", json!({"user": "pat"})).await;
    assert_eq!(r.status, StatusCode::NO_CONTENT);
    db.drop_schema().await;
}

#[tokio::test]
async fn the_size_limit_counts_escaped_keys_as_stored() {
    let db = Db::new().await;
    let limit = 64 * 1024;
    let mut c = Client::new(app(layer(db.store().await), Gate::default()));
    // Each control character in a key is stored as a six-byte `\u00XX`.
    let stored_len = |db: &Db| {
        let q = format!("SELECT octet_length(sess::text)::int8 FROM {}", db.table());
        let pool = db.pool.clone();
        async move {
            sqlx::query_scalar::<_, i64>(&q)
                .fetch_one(&pool)
                .await
                .unwrap()
        }
    };
    let mut refused = None;
    for i in 0..40 {
        let previous = if i > 0 {
            Some(db.only_sess().await)
        } else {
            None
        };
        let r = c
            .put(&format!("/kv/{i}{}", "%01".repeat(2000)), json!(i))
            .await;
        if r.status == StatusCode::PAYLOAD_TOO_LARGE {
            assert!(
                r.body.as_str().unwrap().contains("over the limit of 65536"),
                "{}",
                r.body
            );
            assert_eq!(
                Some(db.only_sess().await),
                previous,
                "stored session intact"
            );
            refused = Some(i);
            break;
        }
        assert_eq!(r.status, StatusCode::NO_CONTENT);
        assert!(
            stored_len(&db).await <= limit,
            "stored {} bytes",
            stored_len(&db).await
        );
    }
    // 2000 control characters take 12000 bytes: the sixth key is refused.
    assert_eq!(refused, Some(5));
    assert_eq!(c.get("/kv").await.body.as_object().unwrap().len(), 5);
    db.drop_schema().await;
}

#[tokio::test]
async fn a_non_utf8_cookie_beside_the_session_cookie_does_not_hide_it() {
    use axum::{body::Body, http::Request};
    use http_body_util::BodyExt;
    use tower::ServiceExt;
    let (db, mut c) = setup().await;
    c.put("/kv/secret", json!("s3cr3t")).await;
    let good = c.cookie.clone().unwrap();
    let session = format!("session={good}").into_bytes();
    // A sibling subdomain's cookie with Latin-1 bytes, before and after ours,
    // in the same header or in another one.
    let same_header = [b"theme=caf\xe9; ".as_slice(), &session, b"; lang=\xff\xfe"].concat();
    let headers: [&[&[u8]]; 3] = [
        &[&same_header],
        &[b"theme=caf\xe9", &session],
        &[&session, b"\xe9=\xe9"],
    ];
    for cookies in headers {
        let mut req = Request::builder().uri("/kv");
        for value in cookies {
            req = req.header(
                "cookie",
                axum::http::HeaderValue::from_bytes(value).unwrap(),
            );
        }
        let res = c
            .app
            .clone()
            .oneshot(req.body(Body::empty()).unwrap())
            .await
            .unwrap();
        assert_eq!(res.status(), StatusCode::OK);
        assert!(
            res.headers().get("set-cookie").is_none(),
            "kept, not replaced"
        );
        let body = res.into_body().collect().await.unwrap().to_bytes();
        let body: serde_json::Value = serde_json::from_slice(&body).unwrap();
        let shown: Vec<_> = cookies.iter().map(|v| String::from_utf8_lossy(v)).collect();
        assert_eq!(body, json!({"secret": "s3cr3t"}), "{shown:?}");
    }
    db.drop_schema().await;
}

#[tokio::test]
async fn extreme_stored_creation_times_end_or_keep_the_session_without_panic() {
    let db = Db::new().await;
    let layer = builder(db.store().await)
        .with_absolute_timeout(Some(Duration::from_secs(3600)))
        .build()
        .unwrap();
    let mut c = Client::new(app(layer, Gate::default()));
    c.get("/counter").await;
    for created in ["9999-12-31 23:59:59.999999+00", "4713-01-01 00:00:00+00 BC"] {
        sqlx::query(&format!(
            "UPDATE {} SET created_at = $1::timestamptz",
            db.table()
        ))
        .bind(created)
        .execute(&db.pool)
        .await
        .unwrap();
        // Far future: the absolute limit is as far; far past: long over.
        let r = c.get("/counter").await;
        assert_eq!(r.status, StatusCode::OK, "{created}");
    }
    db.drop_schema().await;
}

/// The handle a session reports for itself is the one administrators see
/// for its row (computed in Rust for the one, in SQL for the other), with
/// plain and hashed ids alike, and revoking by it ends that session.
#[tokio::test]
async fn a_sessions_own_handle_is_the_one_administrators_see() {
    use axum::{extract::Path, routing::post, Json, Router};
    use tower_pg_session::Session;

    for hashed in [false, true] {
        let db = Db::new().await;
        let store = db.store().await;
        let app = Router::new()
            .route(
                "/handle/{user}",
                post(|s: Session, Path(user): Path<String>| async move {
                    s.set_user_id(Some(&user)).await?;
                    s.insert("user", &user).await?;
                    s.save().await?;
                    Ok::<_, tower_pg_session::SessionError>(Json(json!(s.handle().await?)))
                }),
            )
            .layer(
                builder(store.clone())
                    .with_hashed_ids(hashed)
                    .build()
                    .unwrap(),
            );
        let mut c = Client::new(app);
        let own = c.post("/handle/ann").await.body;
        let own = own.as_str().expect("a row, so a handle").to_owned();
        let listed = store.admin().user_sessions("ann").await.unwrap();
        assert_eq!(listed.len(), 1);
        assert_eq!(listed[0].handle, own, "hashed ids: {hashed}");
        assert!(store.admin().revoke_session("ann", &own).await.unwrap());
        assert_eq!(db.rows().await, 0);
        db.drop_schema().await;
    }
}

/// Every setting is checked once, at `build`: the same settings fail the same
/// way in any order, the error names the setters, and nothing is clamped.
#[tokio::test]
async fn layer_settings_are_checked_at_build_in_any_order_and_named() {
    let db = Db::new().await;
    let store = db.store().await;
    let keys = || SigningKeys::new([KEY_A]).unwrap();
    let err = |b: tower_pg_session::SessionLayerBuilder| b.build().unwrap_err().to_string();

    let prefix_then_domain = SessionLayer::builder(store.clone(), keys())
        .with_host_prefix()
        .with_domain("example.com")
        .unwrap();
    let domain_then_prefix = SessionLayer::builder(store.clone(), keys())
        .with_domain("example.com")
        .unwrap()
        .with_host_prefix();
    let first = err(prefix_then_domain);
    assert_eq!(first, err(domain_then_prefix));
    assert!(
        first.contains("with_host_prefix and with_domain"),
        "{first}"
    );

    let insecure_then_none = SessionLayer::builder(store.clone(), keys())
        .with_insecure_http_cookie()
        .with_same_site(tower_pg_session::SameSite::None);
    let e = err(insecure_then_none);
    assert!(
        e.contains("with_same_site and with_insecure_http_cookie"),
        "{e}"
    );

    // Both timeouts off, whichever is cleared first.
    let e = err(builder(store.clone())
        .with_absolute_timeout(None)
        .with_idle_timeout(None));
    assert!(
        e.contains("with_idle_timeout and with_absolute_timeout"),
        "{e}"
    );
    // A second timeout given after the first was cleared makes it valid again.
    let absolute_only = builder(store.clone())
        .with_idle_timeout(None)
        .with_absolute_timeout(Some(Duration::from_secs(3600)))
        .build();
    assert!(absolute_only.is_ok());

    // Out-of-range values are refused, not clamped.
    let e = err(builder(store.clone()).with_max_data_size(1));
    assert!(e.contains("with_max_data_size"), "{e}");
    let e = err(builder(store.clone()).with_touch_after(0.7));
    assert!(e.contains("with_touch_after"), "{e}");
    let e = err(builder(store.clone()).with_idle_timeout(Some(Duration::from_millis(10))));
    assert!(e.contains("with_idle_timeout"), "{e}");
    // Text that cannot be a cookie name fails at once.
    assert!(builder(store.clone()).with_cookie_name("bad name").is_err());
    db.drop_schema().await;
}
