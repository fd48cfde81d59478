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
