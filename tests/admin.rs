//! Session administration: what it shows and does, and that each query is an
//! index lookup on a 100,000-row table.
#![allow(clippy::unwrap_used)]

mod common;

use axum::http::{header, HeaderName, Request};
use common::*;
use serde_json::json;
use sqlx::{postgres::PgPoolOptions, Executor};
use tower::ServiceExt;
use tower_pg_session::{PgStore, SessionLayer, SigningKeys};

async fn login(app: &axum::Router, user: &str, agent: &str, ip: &str) -> Client {
    let mut c = Client::new(app.clone());
    let req = Request::post(format!("/login/{user}"))
        .header(header::USER_AGENT, agent)
        .header("x-forwarded-for", format!("{ip}, 10.0.0.1"))
        .body(axum::body::Body::empty())
        .unwrap();
    let r = app.clone().oneshot(req).await.unwrap();
    let sc = r.headers()[header::SET_COOKIE].to_str().unwrap();
    c.cookie = Some(
        sc.split(';')
            .next()
            .unwrap()
            .split_once('=')
            .unwrap()
            .1
            .to_owned(),
    );
    c
}

#[tokio::test]
async fn list_revoke_export_erase() {
    let db = Db::new().await;
    let store = db.store().await;
    let layer = SessionLayer::builder(store.clone(), SigningKeys::new([KEY_A]).unwrap())
        .with_insecure_http_cookie()
        .with_client_info(Some(HeaderName::from_static("x-forwarded-for")))
        .build()
        .unwrap();
    let app = app(layer, Gate::default());
    let mut laptop = login(&app, "alice", "Firefox", "192.0.2.1").await;
    let mut phone = login(&app, "alice", "Safari", "192.0.2.2").await;
    let mut bob = login(&app, "bob", "curl", "192.0.2.3").await;
    let admin = store.admin();

    let list = admin.user_sessions("alice").await.unwrap();
    assert_eq!(list.len(), 2);
    assert_eq!(list[0].user_agent.as_deref(), Some("Firefox"));
    assert_eq!(
        list[0].ip.as_deref(),
        Some("192.0.2.1"),
        "the first X-Forwarded-For hop"
    );
    assert!(list
        .iter()
        .all(|s| s.created_at.is_some() && s.last_seen.is_some()));
    let export = admin.export_user("alice").await.unwrap();
    let text = export.to_string();
    assert_eq!(export["sessions"].as_array().unwrap().len(), 2);
    let laptop_id = laptop.cookie.clone().unwrap();
    let laptop_id = laptop_id.split('.').next().unwrap();
    assert!(
        !text.contains(laptop_id) && !text.contains("\"user\":\"alice\",\"sess"),
        "no ids or data: {text}"
    );

    // "Log out my other devices", from the laptop.
    let keep = list[0].handle.clone();
    assert_eq!(admin.revoke_others("alice", &keep).await.unwrap(), 1);
    assert_eq!(
        phone.get("/kv").await.body,
        json!({}),
        "the phone is logged out"
    );
    assert_eq!(laptop.get("/kv").await.body, json!({"user": "alice"}));
    assert!(admin.revoke_session("alice", &keep).await.unwrap());
    assert!(!admin.revoke_session("alice", &keep).await.unwrap());
    assert_eq!(laptop.get("/kv").await.body, json!({}));

    let stats = admin.stats().await.unwrap();
    assert_eq!(
        (
            stats.active,
            stats.created_last_24h,
            stats.expired_awaiting_prune
        ),
        (1, 1, 0)
    );
    assert!(stats.table_bytes > 0);
    assert_eq!(admin.erase_user("bob").await.unwrap(), 1);
    assert_eq!(bob.get("/kv").await.body, json!({}));
    login(&app, "carol", "x", "192.0.2.4").await;
    login(&app, "dave", "x", "192.0.2.5").await;
    assert_eq!(admin.revoke_all().await.unwrap(), 2);
    assert_eq!(db.rows().await, 0);
    db.drop_schema().await;
}

#[tokio::test]
async fn every_admin_query_is_an_index_lookup_on_100k_rows() {
    let db = Db::new().await;
    db.store().await;
    sqlx::query(&format!(
        "INSERT INTO {} (sid, sess, expire, created_at, last_seen, user_id) \
         SELECT 'sid' || g, '{{}}', \
                (now() AT TIME ZONE current_setting('log_timezone')) + CASE WHEN g % 10 = 0 THEN interval '1 day' ELSE interval '-1 day' END, \
                now() - (g % 72) * interval '1 hour', now(), 'user' || (g % 1000) \
         FROM generate_series(1, 100000) g",
        db.table()
    ))
    .execute(&db.pool)
    .await
    .unwrap();
    db.pool
        .execute(&*format!("VACUUM ANALYZE {}", db.table()))
        .await
        .unwrap();
    let pool = PgPoolOptions::new()
        .max_connections(1)
        .connect(&database_url())
        .await
        .unwrap();
    let store = PgStore::new(pool, db.config()).await.unwrap();
    // The set-up's own scans (index builds, the fill) reach the counters when
    // their backends next report, up to a second later: wait until they are
    // all in, so that each operation below is charged only its own scans.
    let mut settled = db.scans(&store).await;
    for _ in 0..10 {
        tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
        let now = db.scans(&store).await;
        if now == settled {
            break;
        }
        settled = now;
    }
    let admin = store.admin();
    let user = "user10"; // rows 10, 1010, …: all live (g % 10 = 0)
    type Op<'a> = std::pin::Pin<Box<dyn std::future::Future<Output = ()> + 'a>>;
    let ops: Vec<(&str, Op<'_>)> = vec![
        (
            "user_sessions",
            Box::pin(async { assert_eq!(admin.user_sessions(user).await.unwrap().len(), 100) }),
        ),
        (
            "export_user",
            Box::pin(async {
                admin.export_user(user).await.unwrap();
            }),
        ),
        (
            "stats",
            Box::pin(async {
                let s = admin.stats().await.unwrap();
                assert_eq!((s.active, s.expired_awaiting_prune), (10_000, 90_000));
            }),
        ),
        (
            "revoke_session",
            Box::pin(async {
                assert!(!admin
                    .revoke_session(user, "0000000000000000")
                    .await
                    .unwrap())
            }),
        ),
        (
            "revoke_others",
            Box::pin(async {
                assert_eq!(
                    admin
                        .revoke_others("user11", "0000000000000000")
                        .await
                        .unwrap(),
                    100
                )
            }),
        ),
        (
            "revoke_user",
            Box::pin(async { assert_eq!(admin.revoke_user(user).await.unwrap(), 100) }),
        ),
        (
            "erase_user",
            Box::pin(async { assert_eq!(admin.erase_user("user12").await.unwrap(), 100) }),
        ),
        (
            "delete_provider_sessions",
            Box::pin(async {
                assert_eq!(store.delete_provider_sessions("none").await.unwrap(), 0)
            }),
        ),
    ];
    for (name, op) in ops {
        let (seq0, idx0) = db.scans(&store).await;
        op.await;
        let (seq1, idx1) = db.scans(&store).await;
        assert_eq!(seq1 - seq0, 0, "{name} scanned the table");
        assert!(idx1 > idx0, "{name} used no index");
    }
    db.drop_schema().await;
}

#[cfg(feature = "oidc")]
#[tokio::test]
async fn export_and_erasure_cover_the_token_vault() {
    use tower_pg_session::{
        crypto::Keyring,
        vault::{Integration, TokenVault, Tokens, VaultConfig},
    };
    let db = Db::new().await;
    let store = db.store().await;
    let layer = SessionLayer::builder(store.clone(), SigningKeys::new([KEY_A]).unwrap())
        .with_insecure_http_cookie()
        .build()
        .unwrap();
    let app = app(layer, Gate::default());
    let mut erin = login(&app, "erin", "Firefox", "192.0.2.7").await;
    login(&app, "finn", "curl", "192.0.2.8").await;
    let integration = |name| Integration::new(name, "http://127.0.0.1:9/token", "app").unwrap();
    let vault = TokenVault::new(
        &store,
        Keyring::generate(),
        VaultConfig::new()
            .with_schema_name(&db.schema)
            .unwrap()
            .with_integration(integration("mail"))
            .with_integration(integration("crm")),
    )
    .await
    .unwrap();
    for (user, name) in [("erin", "mail"), ("erin", "crm"), ("finn", "mail")] {
        let tokens = Tokens::new(format!("at-{user}-{name}"))
            .with_refresh_token(format!("rt-{user}-{name}"))
            .with_expires_in(std::time::Duration::from_secs(3600))
            .with_scopes(["mail.read"]);
        vault.store(user, name, tokens).await.unwrap();
    }
    let vault_table = format!("\"{}\".\"oauth_tokens\"", db.schema);
    let sealed: Vec<String> = sqlx::query_scalar(&format!(
        "SELECT access_token FROM {vault_table} WHERE user_id = 'erin'"
    ))
    .fetch_all(&db.pool)
    .await
    .unwrap();

    // Without the vault, nothing changes for the app.
    let plain = store.admin().export_user("erin").await.unwrap();
    assert!(plain.get("connections").is_none(), "{plain}");

    let admin = store.admin().with_vault(&vault);
    let export = admin.export_user("erin").await.unwrap();
    let connections = export["connections"].as_array().unwrap();
    let names: Vec<&str> = connections
        .iter()
        .map(|c| c["integration"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["crm", "mail"]);
    assert_eq!(connections[0]["scopes"], json!(["mail.read"]));
    for field in ["expires_at", "created_at", "updated_at", "needs_reconsent"] {
        assert!(!connections[1][field].is_null(), "{field}: {export}");
    }
    let text = export.to_string();
    assert!(
        !text.contains("at-erin") && !text.contains("rt-erin"),
        "{text}"
    );
    for ciphertext in &sealed {
        assert!(!text.contains(&ciphertext[..24]), "no ciphertext: {text}");
    }
    assert_eq!(admin.user_connections("erin").await.unwrap().len(), 2);

    assert_eq!(admin.erase_user("erin").await.unwrap(), 1);
    let left: i64 = sqlx::query_scalar(&format!(
        "SELECT (SELECT count(*) FROM {vault_table} WHERE user_id = 'erin' \
           OR access_token = ANY($1) OR refresh_token IS NOT NULL AND user_id <> 'finn') \
         + (SELECT count(*) FROM {t} WHERE user_id = 'erin' OR sess::text LIKE '%erin%')",
        t = db.table()
    ))
    .bind(&sealed)
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(left, 0, "nothing of erin is left in either table");
    assert_eq!(erin.get("/kv").await.body, json!({}), "logged out");
    assert_eq!(admin.user_connections("finn").await.unwrap().len(), 1);
    assert_eq!(
        vault.get("finn", "mail").await.unwrap().secret(),
        "at-finn-mail",
        "other users keep theirs"
    );
    // Ids the vault refuses hold nothing: not an error.
    assert_eq!(admin.erase_user("").await.unwrap(), 0);
    db.drop_schema().await;
}
