//! The demo's contract, driven as users' scripts drive it: the binary of
//! `cargo run --example demo`, its routes and its environment variables.
#![allow(clippy::unwrap_used)]

mod common;

use std::{
    path::PathBuf,
    process::Stdio,
    sync::{Arc, Mutex},
    time::Duration,
};

use axum::http::StatusCode;
use common::idp::{location, Browser};
use serde_json::{json, Value};
use tokio::{
    io::{AsyncBufReadExt, BufReader},
    process::{Child, Command},
};

struct Demo {
    child: Child,
    url: String,
}

impl Drop for Demo {
    fn drop(&mut self) {
        // SIGTERM, so the demo stops the provider it started.
        if let Some(pid) = self.child.id() {
            let _ = std::process::Command::new("kill")
                .arg(pid.to_string())
                .status();
        }
    }
}

async fn start(env: &[(&str, String)]) -> Demo {
    start_with(env, Stdio::null()).await
}

/// As [`start`], with the demo's log (stdout) collected in the returned buffer.
async fn start_logged(env: &[(&str, String)]) -> (Demo, Arc<Mutex<String>>) {
    let log = Arc::new(Mutex::new(String::new()));
    let mut demo = start_with(env, Stdio::piped()).await;
    let stdout = demo.child.stdout.take().unwrap();
    let sink = log.clone();
    tokio::spawn(async move {
        let mut lines = BufReader::new(stdout).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            eprintln!("{line}");
            let mut log = sink.lock().unwrap();
            log.push_str(&line);
            log.push('\n');
        }
    });
    (demo, log)
}

async fn start_with(env: &[(&str, String)], stdout: Stdio) -> Demo {
    // A test that needs to know the address first passes BIND_ADDR itself.
    let port = env
        .iter()
        .find(|(k, _)| *k == "BIND_ADDR")
        .map(|(_, v)| v.rsplit(':').next().unwrap().parse().unwrap())
        .unwrap_or_else(common::cluster::free_port);
    let url = format!("http://127.0.0.1:{port}");
    let mut cmd = Command::new(common::demo_bin::binary());
    cmd.env("BIND_ADDR", format!("127.0.0.1:{port}"))
        .env("PRUNE_INTERVAL_SECS", "0")
        .env("RUST_LOG", "warn")
        .env_remove("OIDC_ISSUER")
        .env_remove("APP_URL")
        .env_remove("EXPRESS_COMPAT")
        .stdout(stdout)
        .stderr(Stdio::inherit())
        .kill_on_drop(true);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let child = cmd.spawn().unwrap();
    let demo = Demo { child, url };
    let http = reqwest::Client::new();
    // The demo may wait up to 30 s for its local provider and 5 s for
    // discovery before it listens; on a loaded machine give it room.
    for _ in 0..900 {
        if let Ok(r) = http.get(format!("{}/healthz", demo.url)).send().await {
            if r.status() == StatusCode::OK {
                return demo;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("the demo did not answer /healthz within 90 s");
}

#[tokio::test]
async fn routes_sessions_and_login_as_documented() {
    let db = common::Db::new().await;
    // The demo's table lives in this test's schema, through the search path.
    let url = db.schema_url().await;
    let demo = start(&[
        ("DATABASE_URL", url),
        ("SESSION_SECRET", common::KEY_A.to_owned()),
        ("COOKIE_SECURE", "0".to_owned()),
    ])
    .await;
    let b = Browser::new();
    let app = &demo.url;
    let json = |r: reqwest::Response| async move { r.json::<Value>().await.unwrap() };
    assert_eq!(
        json(b.api(&format!("{app}/peek")).await).await,
        json!({"count": 0})
    );
    assert_eq!(json(b.api(&format!("{app}/kv")).await).await, json!({}));
    assert_eq!(
        json(b.api(&format!("{app}/counter")).await).await,
        json!({"count": 1})
    );
    assert_eq!(
        json(b.api(&format!("{app}/counter")).await).await,
        json!({"count": 2})
    );
    let r = b
        .http
        .put(format!("{app}/kv/colour"))
        .json(&json!({"r": 1}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NO_CONTENT);
    assert_eq!(
        json(b.api(&format!("{app}/kv")).await).await,
        json!({"count": 2, "colour": {"r": 1}})
    );
    assert_eq!(db.rows().await, 1, "sessions are rows of the demo's table");

    // The login against the provider the demo started itself.
    let r = b.get(&format!("{app}/me")).await;
    assert_eq!(r.status(), StatusCode::FOUND);
    let r = b.login(app, "zoe", "/me").await;
    assert_eq!(location(&r), "/me");
    let me = json(b.api(&format!("{app}/me")).await).await;
    assert_eq!(me["sub"], "zoe");
    assert!(me["access_token_expires_at"].as_i64().is_some());
    assert_eq!(
        json(b.api(&format!("{app}/peek")).await).await,
        json!({"count": 2}),
        "data survives the login's id cycle"
    );
    b.logout(app).await;
    assert_eq!(
        b.api(&format!("{app}/me")).await.status(),
        StatusCode::UNAUTHORIZED
    );
    drop(demo);
    db.drop_schema().await;
}

#[tokio::test]
async fn db_pooler_transaction_serves_and_prunes_through_pgbouncer() {
    let db = common::Db::new().await;
    sqlx::query(&format!("CREATE SCHEMA {}", db.schema))
        .execute(&db.pool)
        .await
        .unwrap();
    let bouncer = common::pgbouncer::PgBouncer::start_with(Some(&db.schema)).await;
    let demo = start(&[
        ("DATABASE_URL", bouncer.url()),
        ("DB_POOLER", "transaction".to_owned()),
        ("DB_POOL_SIZE", "8".to_owned()),
        ("PRUNE_INTERVAL_SECS", "1".to_owned()),
        ("SESSION_SECRET", common::KEY_A.to_owned()),
        ("COOKIE_SECURE", "0".to_owned()),
        // Sessions only: a provider that refuses connections.
        ("OIDC_ISSUER", "http://127.0.0.1:9".to_owned()),
    ])
    .await;
    let app = demo.url.clone();
    let browser = || {
        reqwest::Client::builder()
            .cookie_store(true)
            .build()
            .unwrap()
    };
    let counter = |b: reqwest::Client| {
        let url = format!("{app}/counter");
        async move {
            let r = b.get(url).send().await.unwrap();
            (r.status(), r.json::<Value>().await.unwrap_or(Value::Null))
        }
    };
    let one = browser();
    assert_eq!(
        counter(one.clone()).await,
        (StatusCode::OK, json!({"count": 1}))
    );
    assert_eq!(
        counter(one.clone()).await,
        (StatusCode::OK, json!({"count": 2}))
    );
    // 32 browsers at once, 5 times: PgBouncer's two server connections
    // pass between the demo's eight.
    let browsers: Vec<_> = (0..32).map(|_| browser()).collect();
    for round in 1..=5 {
        let replies = browsers.iter().map(|b| tokio::spawn(counter(b.clone())));
        for r in replies.collect::<Vec<_>>() {
            assert_eq!(
                r.await.unwrap(),
                (StatusCode::OK, json!({"count": round})),
                "{}",
                bouncer.log()
            );
        }
    }
    // The table, named without its schema, got its shared save's function
    // in that schema, and the shared saves called it.
    let functions = db.functions().await;
    assert!(
        matches!(functions.as_slice(), [f] if f.starts_with("session_save_")),
        "{functions:?}"
    );
    let calls = db.statements_like("SELECT sid, version FROM %").await;
    assert!(
        calls > 0,
        "160 saves from 32 browsers at once share statements"
    );
    // The pruner, every second, through the pooler.
    sqlx::query(&format!(
        "INSERT INTO {} (sid, sess, expire) SELECT 'expired' || g, '{{}}', \
         now() AT TIME ZONE 'UTC' - interval '1 day' FROM generate_series(1, 100) g",
        db.table()
    ))
    .execute(&db.pool)
    .await
    .unwrap();
    common::eventually("the pruner to delete the expired rows", || async {
        db.rows().await == 33
    })
    .await;
    drop(demo);
    db.drop_schema().await;
}

#[tokio::test]
async fn express_compat_shares_count_with_a_node_app() {
    use common::express::{Node, Shared, SECRET};
    let db = Shared::new("json", "timestamp(6)").await;
    let node = Node::start(&db, SECRET, "connect.sid").await;
    let url = format!("{}?options=-c%20search_path%3D{}", db.url, db.schema);
    let demo = start(&[
        ("DATABASE_URL", url),
        ("EXPRESS_COMPAT", "1".to_owned()),
        ("SESSION_SECRET", SECRET.to_owned()),
        ("COOKIE_SECURE", "0".to_owned()),
    ])
    .await;
    let b = reqwest::Client::builder()
        .cookie_store(true)
        .build()
        .unwrap();
    let get = |u: String| {
        let b = b.clone();
        async move {
            b.get(u)
                .send()
                .await
                .unwrap()
                .json::<Value>()
                .await
                .unwrap()
        }
    };
    assert_eq!(
        get(format!("{}/counter", node.url)).await,
        json!({"count": 1})
    );
    assert_eq!(
        get(format!("{}/counter", demo.url)).await,
        json!({"count": 2}),
        "req.session.count is the demo's count"
    );
    assert_eq!(
        get(format!("{}/counter", node.url)).await,
        json!({"count": 3})
    );
    assert_eq!(get(format!("{}/peek", demo.url)).await, json!({"count": 3}));
    drop(demo);
    db.drop().await;
}

/// The demo with its own schema on the test database.
async fn start_in(db: &common::Db) -> Demo {
    let url = db.schema_url().await;
    start(&[
        ("DATABASE_URL", url),
        ("SESSION_SECRET", common::KEY_A.to_owned()),
        ("COOKIE_SECURE", "0".to_owned()),
    ])
    .await
}

#[tokio::test]
async fn a_provider_down_at_start_gets_503_with_the_reason_until_it_answers() {
    let db = common::Db::new().await;
    let (port, idp_port) = (common::cluster::free_port(), common::cluster::free_port());
    let app = format!("http://127.0.0.1:{port}");
    let demo = start(&[
        ("DATABASE_URL", db.schema_url().await),
        ("BIND_ADDR", format!("127.0.0.1:{port}")),
        ("APP_URL", app.clone()),
        (
            "OIDC_ISSUER",
            format!("http://127.0.0.1:{idp_port}/realms/test"),
        ),
        ("OIDC_CLIENT_SECRET", common::idp::CLIENT_SECRET.to_owned()),
        ("SESSION_SECRET", common::KEY_A.to_owned()),
        ("COOKIE_SECURE", "0".to_owned()),
        ("INTEGRATION_POLL_SECS", "0".to_owned()),
    ])
    .await;
    let b = Browser::new();
    let r = b.api(&format!("{app}/counter")).await;
    assert_eq!(
        r.status(),
        StatusCode::OK,
        "sessions work without the provider"
    );
    for path in ["/auth/login", "/auth/callback?code=c&state=s", "/me"] {
        let r = b.api(&format!("{app}{path}")).await;
        assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE, "{path}");
        let body: Value = r.json().await.unwrap_or_else(|e| panic!("{path}: {e}"));
        assert_eq!(body["error"], "login_unavailable", "{path}: {body}");
        let why = body["error_description"].as_str().unwrap_or_default();
        assert!(why.contains("unavailable"), "{path}: {body}");
    }
    assert_eq!(
        json!({"count": 1}),
        b.api(&format!("{app}/peek"))
            .await
            .json::<Value>()
            .await
            .unwrap(),
        "the refused requests left the session as it was"
    );

    // The provider comes up: logins work within the retry interval.
    let _idp =
        common::idp::Idp::start_on("keycloak", std::slice::from_ref(&app), 3600, idp_port).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while b.get(&format!("{app}/auth/login")).await.status() != StatusCode::FOUND {
        assert!(
            tokio::time::Instant::now() < deadline,
            "login still refused"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert_eq!(location(&b.login(&app, "zoe", "/me").await), "/me");
    let me: Value = b.api(&format!("{app}/me")).await.json().await.unwrap();
    assert_eq!(me["sub"], "zoe");
    drop(demo);
    db.drop_schema().await;
}

#[tokio::test]
async fn a_second_provider_logs_in_at_login_provider_2() {
    let db = common::Db::new().await;
    let port = common::cluster::free_port();
    let app = format!("http://127.0.0.1:{port}");
    let clients = json!([{
        "client_id": "demo2",
        "client_secret": "demo2-secret",
        "redirect_uris": [format!("{app}/auth/callback/2")],
        "post_logout_redirect_uris": [format!("{app}/")],
    }]);
    let idp2 = common::idp::Idp::start_with("keycloak", &clients, 3600, 0, &[]).await;
    let demo = start(&[
        ("DATABASE_URL", db.schema_url().await),
        ("BIND_ADDR", format!("127.0.0.1:{port}")),
        ("APP_URL", app.clone()),
        ("OIDC2_ISSUER", idp2.issuer.clone()),
        ("OIDC2_CLIENT_ID", "demo2".to_owned()),
        ("OIDC2_CLIENT_SECRET", "demo2-secret".to_owned()),
        ("SESSION_SECRET", common::KEY_A.to_owned()),
        ("COOKIE_SECURE", "0".to_owned()),
        ("INTEGRATION_POLL_SECS", "0".to_owned()),
    ])
    .await;
    let b = Browser::new();
    let r = b
        .get(&format!("{app}/auth/login?provider=2&return_to=/me"))
        .await;
    let auth = location(&r);
    assert!(auth.starts_with(&idp2.base), "{auth}");
    let callback = b.authorize(&auth, "zoe").await;
    assert!(
        callback.starts_with(&format!("{app}/auth/callback/2?")),
        "{callback}"
    );
    assert_eq!(location(&b.get(&callback).await), "/me");
    let me: Value = b.api(&format!("{app}/me")).await.json().await.unwrap();
    assert_eq!(me["sub"], "zoe");
    assert_eq!(me["claims"]["iss"], idp2.issuer.as_str());
    let end = b.logout(&app).await;
    assert!(end.starts_with(&idp2.base), "logout at provider 2: {end}");
    // Provider 1 (the demo's own local provider) is the default.
    let auth = b.start_login(&app, "/").await;
    assert!(!auth.starts_with(&idp2.base), "{auth}");
    drop(demo);
    db.drop_schema().await;
}

/// `PUT {url}/kv/{key}` with `value`: the status and the JSON body.
async fn kv_put(b: &reqwest::Client, url: &str, key: &str, value: &Value) -> (StatusCode, Value) {
    let r = b
        .put(format!("{url}/kv/{key}"))
        .json(value)
        .send()
        .await
        .unwrap();
    let status = r.status();
    (status, r.json().await.unwrap_or(Value::Null))
}

#[tokio::test]
async fn kv_refuses_the_login_keys_and_the_session_stays_intact() {
    let db = common::Db::new().await;
    let demo = start_in(&db).await;
    let b = Browser::new();
    let app = &demo.url;
    assert_eq!(b.login(app, "zoe", "/me").await.status(), StatusCode::FOUND);
    let kv = || async {
        b.api(&format!("{app}/kv"))
            .await
            .json::<Value>()
            .await
            .unwrap()
    };
    let before = kv().await;
    let forged = json!({"sub": "admin", "iss": "x", "claims": {"sub": "admin"},
        "groups": ["admins"], "nonce": "n", "at": before["oidc"], "exp": null});
    for key in [
        "oidc",
        "oidc.login.0123456789abcdef01234567",
        "oidc.login.",
        "vault.connect.0123456789abcdef01234567",
    ] {
        let (status, body) = kv_put(&b.http, app, key, &forged).await;
        assert_eq!(status, StatusCode::FORBIDDEN, "{key}");
        assert_eq!(body["error"], "reserved_key", "{key}: {body}");
    }
    assert_eq!(kv().await, before, "nothing stored");
    let me: Value = b.api(&format!("{app}/me")).await.json().await.unwrap();
    assert_eq!(me["sub"], "zoe");
    let (status, _) = kv_put(&b.http, app, "colour", &json!("red")).await;
    assert_eq!(status, StatusCode::NO_CONTENT, "other keys are the app's");
    drop(demo);
    db.drop_schema().await;
}

#[tokio::test]
async fn express_compat_kv_cannot_set_the_passport_user() {
    use common::express::{Node, Shared, SECRET};
    let db = Shared::new("json", "timestamp(6)").await;
    let node = Node::start(&db, SECRET, "connect.sid").await;
    let url = format!("{}?options=-c%20search_path%3D{}", db.url, db.schema);
    let demo = start(&[
        ("DATABASE_URL", url),
        ("EXPRESS_COMPAT", "1".to_owned()),
        ("SESSION_SECRET", SECRET.to_owned()),
        ("COOKIE_SECURE", "0".to_owned()),
    ])
    .await;
    let b = reqwest::Client::builder()
        .cookie_store(true)
        .build()
        .unwrap();
    let whoami = || async {
        let r = b.get(format!("{}/whoami", node.url)).send().await.unwrap();
        r.json::<Value>().await.unwrap()["user"].clone()
    };
    let admin = json!({"user": "admin"});
    // Anonymous: no session becomes a Passport login.
    let (status, body) = kv_put(&b, &demo.url, "passport", &admin).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert_eq!(body["error"], "reserved_key", "{body}");
    assert_eq!(whoami().await, Value::Null);
    // Logged in on the Node side: the user stays who they are.
    let r = b
        .post(format!("{}/login/pat", node.url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NO_CONTENT);
    let kv = || async {
        let r = b.get(format!("{}/kv", demo.url)).send().await.unwrap();
        r.json::<Value>().await.unwrap()
    };
    let before = kv().await;
    for key in ["passport", "oidc"] {
        let (status, _) = kv_put(&b, &demo.url, key, &admin).await;
        assert_eq!(status, StatusCode::FORBIDDEN, "{key}");
    }
    assert_eq!(whoami().await, json!("pat"));
    assert_eq!(kv().await, before, "nothing stored");
    drop(demo);
    db.drop().await;
}

/// `nsenter` into `pid`'s network namespace and fetch `path` with curl
/// (cookie jar in `jar`); the body.
fn curl_in(pid: u32, jar: &std::path::Path, url: &str) -> Option<String> {
    let out = std::process::Command::new("nsenter")
        .arg(format!("--net=/proc/{pid}/ns/net"))
        .args(["curl", "-sf", "--max-time", "5", "-c"])
        .arg(jar)
        .arg("-b")
        .arg(jar)
        .arg(url)
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The first-run promise of the README: on a machine where no PostgreSQL
/// answers, `cargo run --example demo` starts a throwaway cluster, keeps
/// sessions in it, and removes it on exit. The demo runs in a network
/// namespace of its own, where nothing listens on 5432.
#[tokio::test]
async fn with_no_database_answering_the_demo_runs_on_a_throwaway_cluster() {
    let root = std::process::Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| o.stdout.starts_with(b"0\n"));
    if !root {
        // A network namespace needs root; scripts/test.sh runs as root in CI.
        eprintln!("skipped: needs root for a network namespace");
        return;
    }
    let isolated = std::process::Command::new("unshare")
        .args(["-n", "true"])
        .status()
        .is_ok_and(|s| s.success());
    assert!(isolated, "unshare -n is not permitted here");
    let mut child = Command::new("unshare")
        .args(["-n", "sh", "-c", "ip link set lo up && exec \"$0\""])
        .arg(common::demo_bin::binary())
        .env("BIND_ADDR", "127.0.0.1:3000")
        .env("COOKIE_SECURE", "0")
        .env("PRUNE_INTERVAL_SECS", "0")
        .env("RUST_LOG", "warn")
        .env_remove("DATABASE_URL")
        .env_remove("OIDC_ISSUER")
        .env_remove("APP_URL")
        .env_remove("EXPRESS_COMPAT")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let pid = child.id().unwrap();
    let work = tempfile_dir();
    let jar = work.join("jar");
    let app = "http://127.0.0.1:3000";
    let mut healthy = false;
    for _ in 0..900 {
        if curl_in(pid, &jar, &format!("{app}/healthz")).is_some() {
            healthy = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(healthy, "the demo did not answer /healthz within 90 s");
    let cluster = std::env::temp_dir().join(format!("tower-pg-session-demo-{pid}"));
    assert!(cluster.join("data").is_dir(), "{cluster:?}: no cluster");
    let count = |body: Option<String>| -> Value { serde_json::from_str(&body.unwrap()).unwrap() };
    assert_eq!(
        count(curl_in(pid, &jar, &format!("{app}/counter"))),
        json!({"count": 1})
    );
    assert_eq!(
        count(curl_in(pid, &jar, &format!("{app}/counter"))),
        json!({"count": 2})
    );
    // SIGTERM, as Ctrl-C or a service manager would: the cluster goes too.
    std::process::Command::new("kill")
        .arg(pid.to_string())
        .status()
        .unwrap();
    let status = tokio::time::timeout(Duration::from_secs(30), child.wait())
        .await
        .expect("the demo stops within 30 s of SIGTERM")
        .unwrap();
    assert!(status.success(), "{status}");
    assert!(!cluster.exists(), "{cluster:?} left behind");
    let _ = std::fs::remove_dir_all(&work);
}

/// A fresh directory for this test's files.
fn tempfile_dir() -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "tower-pg-session-test-{}-{}",
        std::process::id(),
        time::OffsetDateTime::now_utc().unix_timestamp_nanos()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[tokio::test]
async fn integrations_connect_check_refresh_and_disconnect_as_documented() {
    use base64::{engine::general_purpose::STANDARD, Engine};

    let db = common::Db::new().await;
    let url = db.schema_url().await;
    let (demo, log) = start_logged(&[
        ("DATABASE_URL", url),
        ("SESSION_SECRET", common::KEY_A.to_owned()),
        ("COOKIE_SECURE", "0".to_owned()),
        ("TOKEN_KEYS", STANDARD.encode(rand::random::<[u8; 32]>())),
        // Shorter than the vault's (and the login's) 5-minute margin: every
        // check refreshes, and so does every request of the login.
        ("ACCESS_TOKEN_TTL", "60".to_owned()),
        ("INTEGRATION_POLL_SECS", "1".to_owned()),
        ("RUST_LOG", "info,sqlx=warn".to_owned()),
        ("NO_COLOR", "1".to_owned()),
    ])
    .await;
    let app = &demo.url;
    let b = Browser::new();
    let json = |r: reqwest::Response| async move {
        let (status, url) = (r.status(), r.url().clone());
        let text = r.text().await.unwrap();
        serde_json::from_str::<Value>(&text)
            .unwrap_or_else(|e| panic!("{url}: {status} {text:?}: {e}"))
    };

    // The vault gets ready after the demo answers /healthz (discovery,
    // then its table); until then its routes answer 503 vault_unavailable.
    common::eventually("the token vault to be ready", || async {
        log.lock().unwrap().contains("token vault ready")
    })
    .await;

    // Not logged in: refused, nothing started.
    let r = b
        .api(&format!(
            "{app}/integrations/mail/connect?return_to=/settings"
        ))
        .await;
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    let body = r.text().await.unwrap();
    assert!(body.contains("not_logged_in"), "{body}");
    assert_eq!(
        b.api(&format!("{app}/integrations")).await.status(),
        StatusCode::UNAUTHORIZED
    );

    let r = b.login(app, "zoe", "/").await;
    assert_eq!(r.status(), StatusCode::FOUND);
    assert_eq!(
        json(b.api(&format!("{app}/integrations")).await).await,
        json!([])
    );
    let r = b.api(&format!("{app}/integrations/mail/check")).await;
    assert_eq!(r.status(), StatusCode::NOT_FOUND);

    // Connect: to the provider and back to return_to.
    let r = b
        .get(&format!(
            "{app}/integrations/mail/connect?return_to=/settings"
        ))
        .await;
    assert_eq!(r.status(), StatusCode::FOUND);
    let auth = location(&r);
    let callback = b.authorize(&auth, "zoe").await;
    assert!(
        callback.starts_with(&format!("{app}/integrations/mail/callback?")),
        "{callback}"
    );
    let r = b
        .http
        .get(&callback)
        .header("user-agent", "Mozilla/5.0 (demo test)")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::FOUND);
    assert_eq!(location(&r), "/settings");
    // The same callback again is refused.
    assert_eq!(b.api(&callback).await.status(), StatusCode::BAD_REQUEST);
    // The connect audit (on by default in the demo) names the client.
    let (ip, agent): (Option<String>, Option<String>) = sqlx::query_as(&format!(
        "SELECT host(connect_ip), connect_user_agent FROM {}.oauth_tokens WHERE user_id = 'zoe'",
        db.schema
    ))
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(ip.as_deref(), Some("127.0.0.1"));
    assert_eq!(agent.as_deref(), Some("Mozilla/5.0 (demo test)"));

    let list = json(b.api(&format!("{app}/integrations")).await).await;
    let entries = list.as_array().unwrap();
    assert_eq!(entries.len(), 1, "{list}");
    let entry = entries[0].as_object().unwrap();
    let mut keys: Vec<&str> = entry.keys().map(String::as_str).collect();
    keys.sort_unstable();
    assert_eq!(
        keys,
        ["expires_at", "integration", "last_refreshed_at", "scopes"]
    );
    assert_eq!(entry["integration"], "mail");
    let first_expiry = entry["expires_at"].as_i64().unwrap();
    assert!(entry["scopes"].is_array());

    // Check: through the vault, refreshed (due with a 60 s lifetime), and
    // the answer carries the expiry only.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let r = b.api(&format!("{app}/integrations/mail/check")).await;
    assert_eq!(r.status(), StatusCode::OK);
    let check = json(r).await;
    let fields: Vec<&String> = check.as_object().unwrap().keys().collect();
    assert_eq!(fields.len(), 2, "only valid and expires_at: {check}");
    assert_eq!(check["valid"], true);
    assert!(
        check["expires_at"].as_i64().unwrap() > first_expiry,
        "{check}"
    );
    let list = json(b.api(&format!("{app}/integrations")).await).await;
    assert!(list[0]["last_refreshed_at"].as_i64().is_some(), "{list}");

    // The background task gets the token of every connected account.
    let mut logged = String::new();
    for _ in 0..100 {
        logged = log.lock().unwrap().clone();
        if logged.contains("connected account checked") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let line = logged
        .lines()
        .find(|l| l.contains("connected account checked"))
        .unwrap_or_else(|| panic!("no background check logged:\n{logged}"));
    assert!(
        line.contains("integration=\"mail\"") || line.contains("integration=mail"),
        "{line}"
    );
    assert!(line.contains("expires_at="), "{line}");

    // Disconnect: refused from another origin, done from the app's own.
    let disconnect = format!("{app}/integrations/mail/disconnect");
    let r = b
        .http
        .post(&disconnect)
        .header("origin", "http://evil.example")
        .header("accept", "application/json")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::FORBIDDEN);
    assert_eq!(
        json(b.api(&format!("{app}/integrations")).await)
            .await
            .as_array()
            .unwrap()
            .len(),
        1
    );
    let r = b
        .http
        .post(&disconnect)
        .header("origin", app.as_str())
        .header("accept", "application/json")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(json(r).await, json!({"removed": true}));
    assert_eq!(
        json(b.api(&format!("{app}/integrations")).await).await,
        json!([])
    );
    assert_eq!(
        b.api(&format!("{app}/integrations/mail/check"))
            .await
            .status(),
        StatusCode::NOT_FOUND
    );
    // The mail grant was revoked at the provider; the login's is another.
    assert_eq!(json(b.api(&format!("{app}/me")).await).await["sub"], "zoe");
    drop(demo);
    db.drop_schema().await;
}

/// `OIDC_CLIENT_KEY` with a P-256 key: the demo signs its client assertions
/// ES256, serves the key's public half at `/auth/jwks.json`, and its logout
/// revokes the refresh token with such an assertion too.
#[tokio::test]
async fn a_p256_client_key_logs_in_with_private_key_jwt() {
    let db = common::Db::new().await;
    let port = common::cluster::free_port();
    let app = format!("http://127.0.0.1:{port}");
    let dir = tempfile_dir();
    let pem = common::keys::ec_pem();
    let file = dir.join("client-key.pem");
    std::fs::write(&file, &pem).unwrap();
    let key = tower_pg_session::oidc::ClientKey::from_pem_auto(&pem).unwrap();
    let registered = common::keys::jwks(&[&key]);
    let env = [
        ("IDP_CLIENT_AUTH", "private_key_jwt"),
        ("IDP_CLIENT_JWKS", registered.as_str()),
    ];
    let idp =
        common::idp::Idp::start_env("keycloak", std::slice::from_ref(&app), 3600, 0, &env).await;
    let demo = start(&[
        ("DATABASE_URL", db.schema_url().await),
        ("BIND_ADDR", format!("127.0.0.1:{port}")),
        ("APP_URL", app.clone()),
        ("OIDC_ISSUER", idp.issuer.clone()),
        ("OIDC_CLIENT_KEY", file.display().to_string()),
        ("SESSION_SECRET", common::KEY_A.to_owned()),
        ("COOKIE_SECURE", "0".to_owned()),
        ("INTEGRATION_POLL_SECS", "0".to_owned()),
    ])
    .await;
    let b = Browser::new();
    assert_eq!(location(&b.login(&app, "zoe", "/me").await), "/me");
    let me: Value = b.api(&format!("{app}/me")).await.json().await.unwrap();
    assert_eq!(me["sub"], "zoe");
    let served: Value = b
        .api(&format!("{app}/auth/jwks.json"))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(served.to_string(), registered);
    b.logout(&app).await;
    let revoked = idp.revocations().await;
    assert_eq!(revoked.len(), 1, "{revoked:?}");
    assert_eq!(
        (&revoked[0]["alg"], &revoked[0]["status"]),
        (&json!("ES256"), &json!(200))
    );
    drop(demo);
    let _ = std::fs::remove_dir_all(&dir);
    db.drop_schema().await;
}
