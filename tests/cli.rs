//! The `pg-session` command-line tool against the real Postgres.
#![allow(clippy::unwrap_used)]

mod common;

use std::process::Command;

use common::*;

fn pg_session(url: &str, args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_pg-session"))
        .env("DATABASE_URL", url)
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test]
async fn init_stats_sessions_export_prune_revoke() {
    let db = Db::new().await;
    let url = database_url();
    let s = db.schema.clone();
    let run = |args: &[&str]| {
        let mut all = vec!["--schema", s.as_str()];
        all.extend_from_slice(args);
        pg_session(&url, &all)
    };

    // Before init: a clear error, nothing created.
    let (code, _, err) = run(&["stats"]);
    assert_eq!(code, 1);
    assert!(err.contains("does not exist"), "{err}");

    let (code, out, _) = run(&["init"]);
    assert_eq!(code, 0);
    assert!(out.contains("is ready"), "{out}");
    assert_eq!(run(&["init"]).0, 0, "idempotent");

    use sqlx::Executor;
    db.pool.execute(&*format!(
        "INSERT INTO {t} (sid, sess, expire, created_at, user_id, user_agent) \
         SELECT 'live' || g, '{{\"secret\":\"s3cr3t\"}}', (now() AT TIME ZONE current_setting('log_timezone')) + interval '1 hour', now(), 'alice', 'Firefox' FROM generate_series(1, 3) g; \
         INSERT INTO {t} (sid, sess, expire) SELECT 'old' || g, '{{}}', (now() AT TIME ZONE current_setting('log_timezone')) - interval '1 hour' FROM generate_series(1, 12000) g",
        t = db.table()
    ))
    .await
    .unwrap();

    let (code, out, _) = run(&["stats"]);
    assert_eq!(code, 0);
    assert!(out.contains("active sessions        3"), "{out}");
    assert!(out.contains("expired, not pruned    12000"), "{out}");

    let (code, out, _) = run(&["sessions", "--user", "alice"]);
    assert_eq!(code, 0);
    assert!(
        out.contains("3 live sessions of alice") && out.contains("Firefox"),
        "{out}"
    );
    assert!(!out.contains("live1"), "no ids: {out}");

    let (code, out, _) = run(&["export", "--user", "alice"]);
    assert_eq!(code, 0);
    let json: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(json["sessions"].as_array().unwrap().len(), 3);
    assert!(
        !out.contains("s3cr3t") && !out.contains("live1"),
        "no data or ids: {out}"
    );

    let (code, out, _) = run(&["prune", "--batch", "5000"]);
    assert_eq!(code, 0);
    assert!(out.contains("deleted 12000 expired sessions"), "{out}");

    let (code, out, _) = run(&["revoke", "--user", "alice"]);
    assert_eq!((code, out.trim()), (0, "revoked 3 sessions"));
    assert_eq!(db.rows().await, 0);
    let (code, out, _) = run(&["revoke", "--all"]);
    assert_eq!((code, out.trim()), (0, "revoked 0 sessions"));
    db.drop_schema().await;
}

#[test]
fn clear_errors() {
    // Unreachable database: names the host, hides the password.
    let (code, _, err) = pg_session("postgres://admin:hunter2@127.0.0.1:1/db", &["stats"]);
    assert_eq!(code, 1);
    assert!(
        err.contains("cannot connect to the session database at 127.0.0.1:1"),
        "{err}"
    );
    assert!(!err.contains("hunter2"), "{err}");
    // Bad arguments: clap's usage error.
    let (code, _, err) = pg_session(&database_url(), &["revoke"]);
    assert_eq!(code, 2);
    assert!(err.contains("--user") && err.contains("--all"), "{err}");
    let (code, _, err) = pg_session(&database_url(), &["revoke", "--user", "a", "--all"]);
    assert_eq!(code, 2, "{err}");
    let (code, _, err) = pg_session(&database_url(), &["--table", "x; drop table y", "stats"]);
    assert_eq!(code, 1);
    assert!(err.contains("invalid SQL identifier"), "{err}");
}

#[tokio::test]
async fn through_pgbouncer_in_transaction_mode() {
    let bouncer = pgbouncer::PgBouncer::start().await;
    let db = Db::new().await;
    let s = db.schema.clone();
    let run = |args: &[&str]| {
        let mut all = vec!["--schema", s.as_str(), "--pooler", "transaction"];
        all.extend_from_slice(args);
        pg_session(&bouncer.url(), &all)
    };
    let (code, out, err) = run(&["init"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("is ready"), "{out}");
    let functions = db.functions().await;
    assert!(
        matches!(functions.as_slice(), [f] if f.starts_with("session_save_")),
        "init makes the shared save's function too: {functions:?}"
    );
    use sqlx::Executor;
    db.pool
        .execute(&*format!(
            "INSERT INTO {t} (sid, sess, expire) SELECT 'old' || g, '{{}}', \
             (now() AT TIME ZONE current_setting('log_timezone')) - interval '1 hour' \
             FROM generate_series(1, 500) g",
            t = db.table()
        ))
        .await
        .unwrap();
    let (code, out, err) = run(&["stats"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("expired, not pruned    500"), "{out}");
    let (code, _, err) = run(&["prune", "--batch", "100", "--busy", "1"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(db.rows().await, 0);
    db.drop_schema().await;
}

/// `pg-session` in the test's schema with `TOKEN_KEYS`.
#[cfg(feature = "oidc")]
fn with_keys(db: &Db, keys: &str, args: &[&str]) -> (i32, String, String) {
    with_keys_at(&database_url(), db, keys, args)
}

/// [`with_keys`] through the database URL `url`.
#[cfg(feature = "oidc")]
fn with_keys_at(url: &str, db: &Db, keys: &str, args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_pg-session"))
        .env("DATABASE_URL", url)
        .env("TOKEN_KEYS", keys)
        .args(["--schema", db.schema.as_str()])
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[cfg(feature = "oidc")]
#[tokio::test]
async fn import_reads_a_plaintext_table_with_a_dry_run_first() {
    use base64::{engine::general_purpose::STANDARD, Engine};
    use sqlx::Executor;
    use tower_pg_session::{
        crypto::Keyring,
        vault::{Integration, TokenVault, VaultConfig},
    };
    let db = Db::new().await;
    let store = db.store().await;
    let legacy = format!("\"{}\".\"app_tokens\"", db.schema);
    db.pool
        .execute(&*format!(
            "CREATE TABLE {legacy} (owner text, service text, at text, expiry timestamptz); \
             INSERT INTO {legacy} VALUES \
               ('ann', 'mail', 'clear-access-ann', now() + interval '1 hour'), \
               ('ben', 'mail', 'clear-access-ben', NULL), \
               ('cy', 'crm', 'clear-access-cy', NULL), \
               ('', 'mail', 'clear-access-nobody', NULL)"
        ))
        .await
        .unwrap();
    let key = STANDARD.encode([5u8; 32]);
    let import_from = |from: &str, access: &str, extra: &[&str]| {
        let mut args = vec![
            "import",
            "--from",
            from,
            "--from-schema",
            db.schema.as_str(),
            "--integration",
            "mail",
            "--user-column",
            "owner",
            "--integration-column",
            "service",
            "--access-column",
            access,
            "--refresh-column",
            "-",
            "--expires-column",
            "expiry",
        ];
        args.extend_from_slice(extra);
        with_keys(&db, &key, &args)
    };
    let import = |extra: &[&str]| import_from("app_tokens", "at", extra);
    let vault_rows = || async {
        let n: Option<i64> = sqlx::query_scalar(&format!(
            "SELECT (SELECT count(*) FROM \"{}\".\"oauth_tokens\") WHERE to_regclass($1) IS NOT NULL",
            db.schema
        ))
        .bind(format!("\"{}\".\"oauth_tokens\"", db.schema))
        .fetch_optional(&db.pool)
        .await
        .unwrap()
        .flatten();
        n.unwrap_or(0)
    };

    let (code, out, err) = import(&["--dry-run"]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("read 4 rows; would import 2; skipped 2"),
        "{out}"
    );
    assert!(out.contains("nothing was written"), "{out}");
    assert_eq!(vault_rows().await, 0, "a dry run writes nothing");
    assert!(!err.contains("clear-access"), "no token in the log: {err}");

    let (code, out, err) = import(&[]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("read 4 rows; imported 2; skipped 2"), "{out}");
    assert_eq!(vault_rows().await, 2);
    let dump: String = sqlx::query_scalar(&format!(
        "SELECT string_agg(t::text, ',') FROM \"{}\".\"oauth_tokens\" t",
        db.schema
    ))
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert!(!dump.contains("clear-access"), "sealed: {dump}");
    let vault = TokenVault::new(
        &store,
        Keyring::from_base64_list(&key).unwrap(),
        VaultConfig::new()
            .with_schema_name(&db.schema)
            .unwrap()
            .with_integration(Integration::new("mail", "http://127.0.0.1:9/token", "app").unwrap()),
    )
    .await
    .unwrap();
    assert_eq!(
        vault.get("ann", "mail").await.unwrap().secret(),
        "clear-access-ann"
    );
    assert!(vault.list("ann").await.unwrap()[0].expires_at.is_some());

    // A column that is not there: a clear error, nothing more written.
    let (code, _, err) = import_from("app_tokens", "nope", &[]);
    assert_eq!(code, 1);
    assert!(err.contains("nope"), "{err}");
    let (code, _, err) = import_from("x; drop table y", "at", &[]);
    assert_eq!(code, 1);
    assert!(err.contains("invalid SQL identifier"), "{err}");
    assert_eq!(vault_rows().await, 2);
    db.drop_schema().await;
}

#[cfg(feature = "oidc")]
#[tokio::test]
async fn keys_and_reseal_cover_the_login_records_in_sessions() {
    keys_and_reseal(None).await;
}

#[cfg(feature = "oidc")]
#[tokio::test]
async fn keys_and_reseal_through_pgbouncer_in_transaction_mode() {
    let bouncer = pgbouncer::PgBouncer::start().await;
    keys_and_reseal(Some(&bouncer.url())).await;
}

/// `keys` and `reseal` over login records sealed under an old key, straight
/// to Postgres or through a pooler in transaction mode at `pooler`.
#[cfg(feature = "oidc")]
async fn keys_and_reseal(pooler: Option<&str>) {
    use base64::{engine::general_purpose::STANDARD, Engine};
    use tower_pg_session::crypto::{Aad, Keyring};
    let db = Db::new().await;
    let with_keys = |db: &Db, keys: &str, args: &[&str]| match pooler {
        Some(url) => {
            let mut all = vec!["--pooler", "transaction"];
            all.extend_from_slice(args);
            with_keys_at(url, db, keys, &all)
        }
        None => with_keys(db, keys, args),
    };
    db.store().await;
    let (old, new) = (STANDARD.encode([7u8; 32]), STANDARD.encode([9u8; 32]));
    let id = |k: &str| {
        Keyring::from_base64_list(k)
            .unwrap()
            .current_key_id()
            .to_string()
    };
    let old_ring = Keyring::from_base64_list(&old).unwrap();
    // Login records as the guard seals them: bound to the row's key.
    for n in 0..4 {
        let sid = format!("sid-{n}");
        let sealed = old_ring.seal(
            b"{\"sub\":\"x\"}",
            &Aad {
                session: &sid,
                field: "oidc",
            },
        );
        sqlx::query(&format!(
            "INSERT INTO {} (sid, sess, expire) VALUES ($1, $2::json, now() + interval '1 hour')",
            db.table()
        ))
        .bind(&sid)
        .bind(serde_json::json!({"oidc": sealed, "cart": n}).to_string())
        .execute(&db.pool)
        .await
        .unwrap();
    }
    // A pending login and a pending account connection, each sealed for
    // its own session key, in the first row.
    let pending = |key: &str, field: &str, ring: &Keyring| {
        ring.seal(
            b"{\"state\":\"s\"}",
            &Aad {
                session: key,
                field,
            },
        )
    };
    sqlx::query(&format!(
        "UPDATE {} SET sess = (sess::jsonb || $1::jsonb)::json WHERE sid = 'sid-0'",
        db.table()
    ))
    .bind(
        serde_json::json!({
            "oidc.login.0a0b": pending("oidc.login.0a0b", "oidc.login", &old_ring),
            "vault.connect.0c0d": pending("vault.connect.0c0d", "vault.connect", &old_ring),
        })
        .to_string(),
    )
    .execute(&db.pool)
    .await
    .unwrap();
    let rotated = format!("{new},{old}");
    let line = |out: &str, k: &str| {
        out.lines()
            .find(|l| l.starts_with(&id(k)))
            .unwrap_or_default()
            .split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" ")
    };
    let (code, out, err) = with_keys(&db, &rotated, &["keys"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(line(&out, &old), format!("{} 0 6", id(&old)), "{out}");
    assert!(out.contains("run `pg-session reseal`"), "{out}");

    let (code, out, err) = with_keys(&db, &rotated, &["reseal", "--batch", "3"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("sessions: sealed 4 rows"), "{out}");
    // Not a terminal: the count first, then a plain line per batch.
    let lines: Vec<&str> = out.lines().collect();
    let from = lines
        .iter()
        .position(|l| *l == "session rows: 4 to seal again")
        .unwrap_or_else(|| panic!("{out}"));
    assert_eq!(
        lines[from + 1..from + 3],
        ["session rows: 3/4", "session rows: 4/4"],
        "{out}"
    );
    assert!(lines.contains(&"vault rows: 0 to seal again"), "{out}");
    let (_, out, _) = with_keys(&db, &rotated, &["keys"]);
    assert_eq!(line(&out, &new), format!("{} 0 6", id(&new)), "{out}");
    assert_eq!(line(&out, &old), format!("{} 0 0", id(&old)), "{out}");
    assert!(out.contains("unused: can be removed"), "{out}");
    // The pending requests open under the new key alone.
    let first: serde_json::Value = sqlx::query_scalar(&format!(
        "SELECT sess::jsonb FROM {} WHERE sid = 'sid-0'",
        db.table()
    ))
    .fetch_one(&db.pool)
    .await
    .unwrap();
    let new_ring = Keyring::from_base64_list(&new).unwrap();
    for (key, field) in [
        ("oidc.login.0a0b", "oidc.login"),
        ("vault.connect.0c0d", "vault.connect"),
    ] {
        let aad = Aad {
            session: key,
            field,
        };
        new_ring
            .open(first[key].as_str().unwrap(), &aad)
            .unwrap_or_else(|e| panic!("{key}: {e}"));
    }
    let carts: Vec<String> = sqlx::query_scalar(&format!(
        "SELECT sess::json->>'cart' FROM {} ORDER BY sid",
        db.table()
    ))
    .fetch_all(&db.pool)
    .await
    .unwrap();
    assert_eq!(carts, ["0", "1", "2", "3"], "the other keys are kept");
    db.drop_schema().await;
}

#[cfg(feature = "oidc")]
#[tokio::test]
async fn sessions_and_export_show_connected_accounts() {
    use sqlx::Executor;
    use tower_pg_session::{
        crypto::Keyring,
        vault::{Integration, TokenVault, Tokens, VaultConfig},
    };
    let db = Db::new().await;
    let store = db.store().await;
    db.pool
        .execute(&*format!(
            "INSERT INTO {t} (sid, sess, expire, created_at, user_id) VALUES \
             ('s1', '{{}}', (now() AT TIME ZONE current_setting('log_timezone')) + interval '1 hour', now(), 'gus')",
            t = db.table()
        ))
        .await
        .unwrap();
    let run = |args: &[&str]| with_keys(&db, "", args);
    // No vault table: as before, and none is created.
    let (code, out, err) = run(&["sessions", "--user", "gus"]);
    assert_eq!(code, 0, "{err}");
    assert!(!out.contains("connected account"), "{out}");
    let (_, out, _) = run(&["export", "--user", "gus"]);
    assert!(!out.contains("connections"), "{out}");
    let created: bool = sqlx::query_scalar("SELECT to_regclass($1) IS NOT NULL")
        .bind(format!("\"{}\".\"oauth_tokens\"", db.schema))
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert!(!created);

    let vault = TokenVault::new(
        &store,
        Keyring::generate(),
        VaultConfig::new()
            .with_schema_name(&db.schema)
            .unwrap()
            .with_integration(Integration::new("mail", "http://127.0.0.1:9/t", "app").unwrap()),
    )
    .await
    .unwrap();
    let tokens = Tokens::new("at-gus".into())
        .with_refresh_token("rt-gus".into())
        .with_scopes(["inbox"]);
    vault.store("gus", "mail", tokens).await.unwrap();
    let (code, out, err) = run(&["sessions", "--user", "gus"]);
    assert_eq!(code, 0, "{err}");
    let line = out.lines().find(|l| l.starts_with("mail ")).unwrap();
    assert!(line.contains("inbox") && line.contains("ok"), "{out}");
    let (code, out, err) = run(&["export", "--user", "gus"]);
    assert_eq!(code, 0, "{err}");
    let json: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(json["connections"][0]["integration"], "mail");
    assert!(!out.contains("at-gus") && !out.contains("rt-gus"), "{out}");
    db.drop_schema().await;
}

/// The demo on `port` against the database URL `db`, logging in and
/// connecting `mail` at `idp`, sealing with `token_keys`.
#[cfg(feature = "oidc")]
async fn demo_at(port: u16, db: &str, idp: &idp::Idp, token_keys: &str) -> tokio::process::Child {
    let child = tokio::process::Command::new(demo_bin::binary())
        .env("BIND_ADDR", format!("127.0.0.1:{port}"))
        .env("APP_URL", format!("http://127.0.0.1:{port}"))
        .env("DATABASE_URL", db)
        .env("SESSION_SECRET", KEY_A)
        .env("COOKIE_SECURE", "0")
        .env("PRUNE_INTERVAL_SECS", "0")
        .env("INTEGRATION_POLL_SECS", "0")
        .env("TOKEN_KEYS", token_keys)
        .env("OIDC_ISSUER", &idp.issuer)
        .env("OIDC_CLIENT_SECRET", idp::CLIENT_SECRET)
        .env("INTEGRATION_ISSUER", &idp.issuer)
        .env("INTEGRATION_CLIENT_ID", idp::CLIENT_ID)
        .env("INTEGRATION_CLIENT_SECRET", idp::CLIENT_SECRET)
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let http = reqwest::Client::new();
    for _ in 0..600 {
        if let Ok(r) = http
            .get(format!("http://127.0.0.1:{port}/healthz"))
            .send()
            .await
        {
            if r.status().is_success() {
                return child;
            }
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    panic!("the demo did not start");
}

#[cfg(feature = "oidc")]
#[tokio::test]
async fn an_operator_retires_a_token_key_under_the_demo_and_its_users_notice_nothing() {
    use base64::{engine::general_purpose::STANDARD, Engine};
    use tower_pg_session::crypto::Keyring;
    let db = Db::new().await;
    let url = db.schema_url().await;
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let app = format!("http://127.0.0.1:{port}");
    let idp = idp::Idp::start("keycloak", std::slice::from_ref(&app), 3600).await;
    let (old, new) = (STANDARD.encode([21u8; 32]), STANDARD.encode([22u8; 32]));
    let id = |k: &str| {
        Keyring::from_base64_list(k)
            .unwrap()
            .current_key_id()
            .to_string()
    };
    // `keys`: (vault, sessions) values under `k`.
    let counts = |out: &str, k: &str| -> (u64, u64) {
        let line = out
            .lines()
            .find(|l| l.starts_with(&id(k)))
            .unwrap_or_else(|| panic!("no line for {}: {out}", id(k)));
        let f: Vec<&str> = line.split_whitespace().collect();
        (f[1].parse().unwrap(), f[2].parse().unwrap())
    };

    // The user logs in and connects mail while the demo seals with the old key.
    let mut demo = demo_at(port, &url, &idp, &old).await;
    let b = idp::Browser::new();
    let r = b.login(&app, "zoe", "/").await;
    assert_eq!(r.status().as_u16(), 302);
    let r = b
        .get(&format!(
            "{app}/integrations/mail/connect?return_to=/settings"
        ))
        .await;
    let callback = b.authorize(&idp::location(&r), "zoe").await;
    assert_eq!(b.get(&callback).await.status().as_u16(), 302);
    let check = |b: &idp::Browser| {
        let app = app.clone();
        let b = b.http.clone();
        async move {
            let r = b
                .get(format!("{app}/integrations/mail/check"))
                .header("accept", "application/json")
                .send()
                .await
                .unwrap();
            (r.status().as_u16(), r.text().await.unwrap())
        }
    };
    assert_eq!(check(&b).await.0, 200);
    demo.kill().await.unwrap();

    let (code, out, err) = with_keys_at(&url, &db, &old, &["keys"]);
    assert_eq!(code, 0, "{err}");
    let (vault, sessions) = counts(&out, &old);
    assert!(vault > 0 && sessions > 0, "{out}");

    // The new key first, the old one still opening; reseal while it runs.
    let rotated = format!("{new},{old}");
    let mut demo = demo_at(port, &url, &idp, &rotated).await;
    let (code, out, err) = with_keys_at(&url, &db, &rotated, &["reseal"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("vault: sealed 1 rows"), "{out}");
    assert!(out.contains("sessions: sealed 1 rows"), "{out}");
    let (code, out, err) = with_keys_at(&url, &db, &rotated, &["keys"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(counts(&out, &old), (0, 0), "{out}");
    assert_eq!(counts(&out, &new), (vault, sessions), "{out}");
    assert!(out.contains("unused: can be removed"), "{out}");
    demo.kill().await.unwrap();

    // The old key is gone: the user is still logged in, mail still works.
    let mut demo = demo_at(port, &url, &idp, &new).await;
    let me = b.me(&app).await;
    assert_eq!(me.status().as_u16(), 200);
    let me: serde_json::Value = me.json().await.unwrap();
    assert_eq!(me["sub"], "zoe");
    let (status, body) = check(&b).await;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("\"valid\":true"), "{body}");
    demo.kill().await.unwrap();
    db.drop_schema().await;
}
