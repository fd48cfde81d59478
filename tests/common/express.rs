//! The Express app of tests/express (express-session + connect-pg-simple)
//! and a database whose server-side TimeZone is not UTC, for the tests of
//! sessions shared with Node.

use std::{path::PathBuf, process::Stdio, time::Duration};

use serde_json::Value;
use sqlx::{postgres::PgPoolOptions, Executor, PgPool};
use tokio::{
    io::{AsyncBufReadExt, BufReader},
    process::{Child, ChildStdin, Command},
};

pub const SECRET: &str = "keyboard cat";

/// The database the Express tests share; Node's `pg` sessions there run in New York time.
pub const DB: &str = "express_ny";
pub const ZONE: &str = "America/New_York";

pub async fn database() -> String {
    let base = super::database_url();
    let admin = PgPoolOptions::new()
        .max_connections(1)
        .connect(&base)
        .await
        .unwrap();
    let mut conn = admin.acquire().await.unwrap();
    // Serialise creation across test processes.
    sqlx::query("SELECT pg_advisory_lock(424242)")
        .execute(&mut *conn)
        .await
        .unwrap();
    let exists: bool =
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)")
            .bind(DB)
            .fetch_one(&mut *conn)
            .await
            .unwrap();
    if !exists {
        conn.execute(&*format!("CREATE DATABASE {DB}"))
            .await
            .unwrap();
    }
    conn.execute(&*format!("ALTER DATABASE {DB} SET timezone TO '{ZONE}'"))
        .await
        .unwrap();
    sqlx::query("SELECT pg_advisory_unlock(424242)")
        .execute(&mut *conn)
        .await
        .unwrap();
    let (head, _) = base.rsplit_once('/').unwrap();
    format!("{head}/{DB}")
}

pub struct Shared {
    pub url: String,
    pub pool: PgPool,
    pub schema: String,
}

impl Shared {
    pub async fn new(sess: &str, expire: &str) -> Self {
        let url = database().await;
        let pool = PgPoolOptions::new()
            .max_connections(4)
            .connect(&url)
            .await
            .unwrap();
        let schema = format!("t_{}", super::random_suffix());
        // connect-pg-simple's own table.sql.
        pool.execute(&*format!(
            "CREATE SCHEMA {schema}; \
             CREATE TABLE {schema}.session (sid varchar NOT NULL COLLATE \"default\", sess {sess} NOT NULL, expire {expire} NOT NULL); \
             ALTER TABLE {schema}.session ADD CONSTRAINT session_pkey PRIMARY KEY (sid); \
             CREATE INDEX \"IDX_session_expire\" ON {schema}.session (expire);"
        ))
        .await
        .unwrap();
        Self { url, pool, schema }
    }

    pub async fn rows(&self) -> Vec<(String, String)> {
        sqlx::query_as(&format!(
            "SELECT sid, sess::text FROM {}.session ORDER BY sid",
            self.schema
        ))
        .fetch_all(&self.pool)
        .await
        .unwrap()
    }

    pub async fn drop(self) {
        let _ = self
            .pool
            .execute(&*format!("DROP SCHEMA {} CASCADE", self.schema))
            .await;
    }
}

/// The Express app, stopped when dropped.
pub struct Node {
    _child: Child,
    _stdin: ChildStdin,
    pub url: String,
}

impl Node {
    pub async fn start(db: &Shared, secrets: &str, cookie_name: &str) -> Self {
        let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/express");
        assert!(
            dir.join("node_modules").exists(),
            "run the tests through scripts/test.sh (npm ci)"
        );
        let mut child = Command::new("node")
            .arg(dir.join("app.js"))
            .env("DATABASE_URL", &db.url)
            .env("PG_SCHEMA", &db.schema)
            .env("SESSION_SECRET", secrets)
            .env("SESSION_COOKIE_NAME", cookie_name)
            .env("SESSION_TTL_SECS", "86400")
            .env("MAX_SECONDS", "300")
            .env_remove("PORT")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let stdin = child.stdin.take().unwrap();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let line = tokio::time::timeout(Duration::from_secs(30), lines.next_line())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        let port = serde_json::from_str::<Value>(&line).unwrap()["port"]
            .as_u64()
            .unwrap();
        Self {
            _child: child,
            _stdin: stdin,
            url: format!("http://127.0.0.1:{port}"),
        }
    }
}
