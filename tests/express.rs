//! Sessions shared with a real Express app (express-session +
//! connect-pg-simple, tests/express) through one table and one cookie jar,
//! in a database whose server-side TimeZone is not UTC.
#![allow(clippy::unwrap_used)]

mod common;

use common::express::{Node, Shared, SECRET, ZONE};

use std::time::Duration;

use axum::{
    extract::{Path, Query},
    http::StatusCode,
    routing::{get, post, put},
    Json, Router,
};
use serde::Deserialize;
use serde_json::{json, Value};
use sqlx::{postgres::PgPoolOptions, Executor};
use tower_pg_session::{
    ExpressSecrets, PgStore, PgStoreConfig, Session, SessionError, SessionLayer,
};

#[derive(Deserialize)]
struct Ms {
    ms: Option<u64>,
}

/// The Rust side: the same routes as the Express app.
async fn rust(
    db: &Shared,
    secrets: &[&str],
    cookie_name: &str,
) -> (String, tokio::task::JoinHandle<()>) {
    let pool = PgPoolOptions::new()
        .max_connections(8)
        .connect(&db.url)
        .await
        .unwrap();
    let config = PgStoreConfig::new().with_schema_name(&db.schema).unwrap();
    let store = PgStore::new(pool, config).await.unwrap();
    let layer = SessionLayer::express_builder(store, ExpressSecrets::new(secrets).unwrap())
        .with_cookie_name(cookie_name)
        .unwrap()
        .with_insecure_http_cookie()
        .build()
        .unwrap();
    let app = Router::new()
        .route("/counter", get(common::counter))
        .route(
            "/peek",
            get(|s: Session| async move {
                Ok::<_, SessionError>(Json(
                    json!({ "count": s.get::<u64>("count").await?.unwrap_or(0) }),
                ))
            }),
        )
        .route(
            "/kv",
            get(|s: Session| async move {
                let mut all = s.to_json().await?;
                all.remove("cookie");
                Ok::<_, SessionError>(Json(all))
            }),
        )
        .route("/kv/{key}", put(common::put_kv))
        .route(
            "/whoami",
            get(|s: Session| async move {
                Ok::<_, SessionError>(Json(json!({ "user": s.passport_user::<Value>().await? })))
            }),
        )
        .route("/logout", post(common::logout))
        .route(
            "/slow/{key}",
            put(
                |s: Session, Path(k): Path<String>, Query(q): Query<Ms>| async move {
                    s.is_empty().await?;
                    tokio::time::sleep(Duration::from_millis(q.ms.unwrap_or(300))).await;
                    s.insert(&k, &true).await?;
                    Ok::<_, SessionError>(StatusCode::NO_CONTENT)
                },
            ),
        )
        .layer(layer);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://127.0.0.1:{}", listener.local_addr().unwrap().port());
    let server = tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    (url, server)
}

/// One browser for both apps: cookies are per host, not per port.
fn browser() -> reqwest::Client {
    reqwest::Client::builder()
        .cookie_store(true)
        .build()
        .unwrap()
}

async fn fetch(b: &reqwest::Client, url: String) -> Value {
    let r = b.get(url).send().await.unwrap();
    assert!(r.status().is_success(), "{}", r.status());
    r.json().await.unwrap()
}

async fn send_put(b: &reqwest::Client, url: String, v: Value) {
    let r = b.put(url).json(&v).send().await.unwrap();
    assert!(r.status().is_success(), "{}", r.status());
}

async fn send_post(b: &reqwest::Client, url: String) {
    let r = b.post(url).send().await.unwrap();
    assert!(r.status().is_success(), "{}", r.status());
}

#[tokio::test]
async fn both_directions_with_unknown_keys_kept_byte_for_byte() {
    let db = Shared::new("json", "timestamp(6)").await;
    let node = Node::start(&db, SECRET, "connect.sid").await;
    let (rs, _server) = rust(&db, &[SECRET], "connect.sid").await;
    let b = browser();

    // Express creates; Rust reads and modifies; Express sees it.
    assert_eq!(
        fetch(&b, format!("{}/counter", node.url)).await,
        json!({"count": 1})
    );
    assert_eq!(
        fetch(&b, format!("{rs}/counter")).await,
        json!({"count": 2})
    );
    assert_eq!(
        fetch(&b, format!("{}/peek", node.url)).await,
        json!({"count": 2})
    );

    // Passport's user and a flash message with awkward characters survive a Rust save byte for byte.
    send_post(&b, format!("{}/login/alice", node.url)).await;
    send_put(
        &b,
        format!("{}/kv/flash", node.url),
        json!({"msg": "h\u{e9}llo \u{2028} \"q\"", "n": 1.50}),
    )
    .await;
    let before = db.rows().await.remove(0).1;
    assert_eq!(
        fetch(&b, format!("{rs}/whoami")).await,
        json!({"user": "alice"}),
        "the identity bridge"
    );
    assert_eq!(
        fetch(&b, format!("{rs}/counter")).await,
        json!({"count": 1}),
        "regenerate kept no count"
    );
    let after = db.rows().await.remove(0).1;
    for key in ["\"passport\":", "\"flash\":"] {
        let slice = |s: &str| {
            let i = s.find(key).unwrap();
            let rest = &s[i..];
            rest[..rest.find('}').unwrap() + 1].to_owned()
        };
        assert_eq!(slice(&after), slice(&before), "{key} unchanged");
    }
    assert_eq!(
        fetch(&b, format!("{}/whoami", node.url)).await,
        json!({"user": "alice"})
    );

    // Rust creates; Express reads and modifies; Rust sees it.
    let b2 = browser();
    send_put(&b2, format!("{rs}/kv/from_rust"), json!([1, 2, 3])).await;
    let raw = fetch(&b2, format!("{}/raw", node.url)).await;
    assert_eq!(raw["from_rust"], json!([1, 2, 3]));
    assert_eq!(
        raw["cookie"]["originalMaxAge"],
        json!(86_400_000),
        "the cookie object Express needs"
    );
    assert_eq!(
        fetch(&b2, format!("{}/counter", node.url)).await,
        json!({"count": 1})
    );
    assert_eq!(
        fetch(&b2, format!("{rs}/kv")).await,
        json!({"from_rust": [1, 2, 3], "count": 1})
    );
    db.drop().await;
}

#[tokio::test]
async fn expiry_means_the_same_instant_on_both_sides() {
    for (sess, expire) in [("json", "timestamp(6)"), ("jsonb", "timestamptz")] {
        let db = Shared::new(sess, expire).await;
        let node = Node::start(&db, SECRET, "connect.sid").await;
        let (rs, _server) = rust(&db, &[SECRET], "connect.sid").await;
        let b = browser();
        fetch(&b, format!("{rs}/counter")).await;
        // Rust wrote expire and cookie.expires; as Node reads them (its
        // session runs in New York time), they name the same instant.
        let mut conn = db.pool.acquire().await.unwrap();
        // As Node's `pg` connects: the database's own zone (sqlx asks for UTC).
        conn.execute(&*format!("SET TimeZone = '{ZONE}'"))
            .await
            .unwrap();
        let (cookie_expires, column): (String, f64) = sqlx::query_as(&format!(
            "SELECT sess::json->'cookie'->>'expires', extract(epoch FROM expire::timestamptz)::float8 FROM {}.session",
            db.schema
        ))
        .fetch_one(&mut *conn)
        .await
        .unwrap();
        let cookie = time::OffsetDateTime::parse(
            &cookie_expires,
            &time::format_description::well_known::Rfc3339,
        )
        .unwrap();
        assert!(
            (cookie.unix_timestamp() as f64 - column).abs() < 1.0,
            "{sess}/{expire}: {cookie_expires} vs {column}"
        );
        let want = time::OffsetDateTime::now_utc().unix_timestamp() as f64 + 86_400.0;
        assert!(
            (column - want).abs() < 5.0,
            "{sess}/{expire}: a day from now, not hours off"
        );
        // And Node still finds it live.
        assert_eq!(
            fetch(&b, format!("{}/peek", node.url)).await,
            json!({"count": 1}),
            "{sess}/{expire}"
        );
        drop(conn);
        db.drop().await;
    }
}

#[tokio::test]
async fn secrets_rotate_on_both_sides() {
    let db = Shared::new("json", "timestamp(6)").await;
    let old_node = Node::start(&db, "old-secret", "connect.sid").await;
    let b = browser();
    fetch(&b, format!("{}/counter", old_node.url)).await;
    // Both sides deploy [new, old].
    let node = Node::start(&db, "new-secret,old-secret", "connect.sid").await;
    let (rs, _server) = rust(&db, &["new-secret", "old-secret"], "connect.sid").await;
    assert_eq!(
        fetch(&b, format!("{rs}/counter")).await,
        json!({"count": 2}),
        "old signature accepted"
    );
    assert_eq!(
        fetch(&b, format!("{}/counter", node.url)).await,
        json!({"count": 3})
    );
    // Rust re-signed with the new secret: an app with only the new secret accepts it.
    let (rs_new, _s2) = rust(&db, &["new-secret"], "connect.sid").await;
    assert_eq!(
        fetch(&b, format!("{rs_new}/peek")).await,
        json!({"count": 3})
    );
    db.drop().await;
}

#[tokio::test]
async fn logout_on_either_side_ends_the_session_for_both() {
    let db = Shared::new("json", "timestamp(6)").await;
    let node = Node::start(&db, SECRET, "connect.sid").await;
    let (rs, _server) = rust(&db, &[SECRET], "connect.sid").await;
    let b = browser();
    fetch(&b, format!("{rs}/counter")).await;
    // Express destroys while a Rust request is mid-flight: Rust's save does not bring it back.
    let slow = {
        let (b, rs) = (b.clone(), rs.clone());
        tokio::spawn(async move {
            b.put(format!("{rs}/slow/late?ms=400"))
                .send()
                .await
                .unwrap()
                .status()
        })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    let r = b.post(format!("{}/logout", node.url)).send().await.unwrap();
    assert!(r.status().is_success());
    assert_eq!(slow.await.unwrap(), StatusCode::NO_CONTENT);
    assert!(db.rows().await.is_empty(), "not resurrected");

    // Rust destroys; Express sees no session.
    let b = browser();
    fetch(&b, format!("{}/counter", node.url)).await;
    assert_eq!(fetch(&b, format!("{rs}/peek")).await, json!({"count": 1}));
    send_post(&b, format!("{rs}/logout")).await;
    assert_eq!(
        fetch(&b, format!("{}/peek", node.url)).await,
        json!({"count": 0})
    );
    assert!(db.rows().await.is_empty());
    db.drop().await;
}

#[tokio::test]
async fn concurrent_changes_from_both_sides_are_all_kept() {
    let db = Shared::new("json", "timestamp(6)").await;
    let node = Node::start(&db, SECRET, "connect.sid").await;
    let (rs, _server) = rust(&db, &[SECRET], "connect.sid").await;
    let b = browser();
    fetch(&b, format!("{}/counter", node.url)).await;
    // A slow Rust write, while Express writes another key and touches the row.
    let slow = {
        let (b, rs) = (b.clone(), rs.clone());
        tokio::spawn(async move {
            b.put(format!("{rs}/slow/rust_key?ms=500"))
                .send()
                .await
                .unwrap()
                .status()
        })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    send_put(&b, format!("{}/kv/node_key", node.url), json!("n")).await;
    fetch(&b, format!("{}/peek", node.url)).await; // Express touches on every read
    assert_eq!(slow.await.unwrap(), StatusCode::NO_CONTENT);
    let kv = fetch(&b, format!("{}/kv", node.url)).await;
    assert_eq!(kv, json!({"count": 1, "node_key": "n", "rust_key": true}));
    db.drop().await;
}

#[tokio::test]
async fn mismatched_settings_give_a_fresh_session_and_touch_nothing() {
    let db = Shared::new("json", "timestamp(6)").await;
    let node = Node::start(&db, SECRET, "connect.sid").await;
    let b = browser();
    fetch(&b, format!("{}/counter", node.url)).await;
    let before = db.rows().await;

    // Wrong secret.
    let (wrong, _s1) = rust(&db, &["not the secret"], "connect.sid").await;
    assert_eq!(
        fetch(&b, format!("{wrong}/peek")).await,
        json!({"count": 0})
    );
    // Another cookie name.
    let (other, _s2) = rust(&db, &[SECRET], "app.sid").await;
    assert_eq!(
        fetch(&b, format!("{other}/peek")).await,
        json!({"count": 0})
    );
    assert_eq!(db.rows().await, before, "the Express session is untouched");
    // A write through the mismatched app makes its own session; Express's row is intact.
    fetch(&b, format!("{wrong}/counter")).await;
    let after = db.rows().await;
    assert_eq!(after.len(), 2);
    assert!(after.contains(&before[0]), "the Express row is unchanged");
    db.drop().await;
}

#[test]
fn hashed_ids_are_refused_in_express_mode() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let db = Shared::new("json", "timestamp(6)").await;
        let pool = PgPoolOptions::new()
            .max_connections(1)
            .connect(&db.url)
            .await
            .unwrap();
        let store = PgStore::new(
            pool,
            PgStoreConfig::new().with_schema_name(&db.schema).unwrap(),
        )
        .await
        .unwrap();
        let err = SessionLayer::express_builder(store, ExpressSecrets::new([SECRET]).unwrap())
            .with_hashed_ids(true)
            .build()
            .unwrap_err();
        assert!(err.to_string().contains("hashed ids"), "{err}");
        db.drop().await;
    });
}
