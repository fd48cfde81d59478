//! Fixtures shared by the integration tests: a private schema per test on the
//! real Postgres, statement counts from pg_stat_statements, and an axum app
//! with a cookie jar.
#![allow(dead_code, unreachable_pub, missing_docs, clippy::unwrap_used)]

pub mod cluster;
pub mod demo_bin;
pub mod express;
pub mod idp;
pub mod keys;
pub mod latency;
pub mod pgbouncer;

use std::{sync::Arc, time::Duration};

use axum::{
    body::Body,
    extract::{Path, State},
    http::{header, HeaderMap, Request, Response, StatusCode},
    routing::{get, post, put},
    Json, Router,
};
use http_body_util::BodyExt;
use serde_json::{json, Value};
use sqlx::{postgres::PgPoolOptions, PgPool};
use tokio::sync::Notify;
use tower::ServiceExt;
use tower_pg_session::{
    PgStore, PgStoreConfig, Session, SessionError, SessionLayer, SessionLayerBuilder, SigningKeys,
};

pub const KEY_A: &str = "test-key-A-0123456789abcdef0123456789";
pub const KEY_B: &str = "test-key-B-0123456789abcdef0123456789";

pub fn database_url() -> String {
    std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned())
}

/// A schema of its own for one test, so tests run in parallel.
pub struct Db {
    pub pool: PgPool,
    pub schema: String,
}

impl Db {
    pub async fn new() -> Self {
        Self::with_pool_size(8).await
    }

    pub async fn with_pool_size(size: u32) -> Self {
        let pool = PgPoolOptions::new()
            .max_connections(size)
            .connect(&database_url())
            .await
            .expect("the test database answers (run the tests through scripts/test.sh)");
        let schema = format!("t_{}", random_suffix());
        Self { pool, schema }
    }

    pub fn config(&self) -> PgStoreConfig {
        PgStoreConfig::new().with_schema_name(&self.schema).unwrap()
    }

    /// Creates the schema; the database URL whose search path is that
    /// schema (for a binary that takes only a URL, as the demo does).
    pub async fn schema_url(&self) -> String {
        sqlx::query(&format!("CREATE SCHEMA IF NOT EXISTS {}", self.schema))
            .execute(&self.pool)
            .await
            .unwrap();
        format!(
            "{}?options=-c%20search_path%3D{}",
            database_url(),
            self.schema
        )
    }

    pub async fn store(&self) -> PgStore {
        PgStore::new(self.pool.clone(), self.config())
            .await
            .unwrap()
    }

    /// A store that runs one load or save statement at a time, so that
    /// those arriving while it runs queue and share the next one.
    pub async fn one_slot_store(&self) -> PgStore {
        PgStore::new(
            self.pool.clone(),
            self.config().with_load_concurrency(1).unwrap(),
        )
        .await
        .unwrap()
    }

    /// Holds this test's table in a transaction, so statements on it block
    /// until the transaction ends.
    pub async fn lock_table(&self) -> sqlx::Transaction<'static, sqlx::Postgres> {
        let mut tx = self.pool.begin().await.unwrap();
        sqlx::query(&format!(
            "LOCK TABLE {} IN ACCESS EXCLUSIVE MODE",
            self.table()
        ))
        .execute(&mut *tx)
        .await
        .unwrap();
        tx
    }

    /// A transaction holding every row of the table (`FOR UPDATE`): writes
    /// of those rows wait for it, reads do not.
    pub async fn lock_rows(&self) -> sqlx::Transaction<'static, sqlx::Postgres> {
        let mut tx = self.pool.begin().await.unwrap();
        sqlx::query(&format!("SELECT 1 FROM {} FOR UPDATE", self.table()))
            .execute(&mut *tx)
            .await
            .unwrap();
        tx
    }

    pub fn table(&self) -> String {
        format!("\"{}\".\"session\"", self.schema)
    }

    /// The functions in this test's schema.
    pub async fn functions(&self) -> Vec<String> {
        sqlx::query_scalar(
            "SELECT p.proname::text FROM pg_proc p \
             JOIN pg_namespace n ON n.oid = p.pronamespace WHERE n.nspname = $1",
        )
        .bind(&self.schema)
        .fetch_all(&self.pool)
        .await
        .unwrap()
    }

    /// Statements run so far on this test's schema, by any connection.
    pub async fn statements(&self) -> i64 {
        self.statements_like("%").await
    }

    /// As [`Self::statements`], those whose text is `LIKE` `pattern`.
    pub async fn statements_like(&self, pattern: &str) -> i64 {
        sqlx::query_scalar(
            "SELECT COALESCE(sum(calls), 0)::int8 FROM pg_stat_statements \
             WHERE query LIKE $1 AND query LIKE $2",
        )
        .bind(format!("%\"{}\"%", self.schema))
        .bind(pattern)
        .fetch_one(&self.pool)
        .await
        .expect("pg_stat_statements is loaded (scripts/test.sh enables it)")
    }

    /// Waits until `count` statements on this test's schema wait for a lock.
    pub async fn until_blocked(&self, count: i64) {
        let pattern = format!("%\"{}\"%", self.schema);
        eventually("statements blocked on a lock", || {
            let (pool, pattern) = (self.pool.clone(), pattern.clone());
            async move {
                let n: i64 = sqlx::query_scalar(
                    "SELECT count(*) FROM pg_stat_activity \
                     WHERE wait_event_type = 'Lock' AND query LIKE $1",
                )
                .bind(pattern)
                .fetch_one(&pool)
                .await
                .unwrap();
                n == count
            }
        })
        .await;
    }

    pub async fn rows(&self) -> i64 {
        sqlx::query_scalar(&format!("SELECT count(*) FROM {}", self.table()))
            .fetch_one(&self.pool)
            .await
            .unwrap()
    }

    /// Who owns each session, as the `user_id` column holds it.
    pub async fn user_ids(&self) -> Vec<Option<String>> {
        sqlx::query_scalar(&format!("SELECT user_id FROM {}", self.table()))
            .fetch_all(&self.pool)
            .await
            .unwrap()
    }

    pub async fn only_sess(&self) -> Value {
        let all: Vec<String> =
            sqlx::query_scalar(&format!("SELECT sess::text FROM {}", self.table()))
                .fetch_all(&self.pool)
                .await
                .unwrap();
        assert_eq!(all.len(), 1, "exactly one session row expected");
        serde_json::from_str(&all[0]).unwrap()
    }

    /// Terminates every backend of the pool named `name` (its
    /// `application_name`); whether each went.
    pub async fn kill_backends(&self, name: &str) -> Vec<bool> {
        sqlx::query_scalar(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = $1",
        )
        .bind(name)
        .fetch_all(&self.pool)
        .await
        .unwrap()
    }

    /// A store on its own pool of at most `size` connections, which carry the
    /// returned name as their application name, so a test can find (and kill)
    /// their backends.
    pub async fn named_store(&self, size: u32) -> (String, PgStore) {
        self.store().await;
        let name = format!("{}_pool", self.schema);
        let options: sqlx::postgres::PgConnectOptions = database_url().parse().unwrap();
        let pool = PgPoolOptions::new()
            .max_connections(size)
            .test_before_acquire(false)
            .connect_with(options.application_name(&name))
            .await
            .unwrap();
        let store = PgStore::new(pool, self.config()).await.unwrap();
        (name, store)
    }

    /// Sequential and index scans of this test's table so far, with those of
    /// `store`, whose pool must hold one connection, published first.
    pub async fn scans(&self, store: &PgStore) -> (i64, i64) {
        sqlx::query("SELECT pg_stat_force_next_flush()")
            .execute(store.pool())
            .await
            .unwrap();
        sqlx::query("SELECT 1").execute(store.pool()).await.unwrap();
        // This connection's own pending counts (the set-up's scans) too: a
        // backend reports at most once a second unless told to.
        let mut conn = self.pool.acquire().await.unwrap();
        sqlx::query("SELECT pg_stat_force_next_flush()")
            .execute(&mut *conn)
            .await
            .unwrap();
        sqlx::query("SELECT pg_stat_clear_snapshot()")
            .execute(&mut *conn)
            .await
            .unwrap();
        sqlx::query_as(
            "SELECT COALESCE(seq_scan, 0)::int8, COALESCE(idx_scan, 0)::int8 FROM pg_stat_user_tables \
             WHERE schemaname = $1 AND relname = 'session'",
        )
        .bind(&self.schema)
        .fetch_one(&mut *conn)
        .await
        .unwrap()
    }

    /// Backends whose application name is `name`.
    pub async fn backends_named(&self, name: &str) -> i64 {
        sqlx::query_scalar("SELECT count(*) FROM pg_stat_activity WHERE application_name = $1")
            .bind(name)
            .fetch_one(&self.pool)
            .await
            .unwrap()
    }

    pub async fn drop_schema(self) {
        let _ = sqlx::query(&format!(
            "DROP SCHEMA IF EXISTS \"{}\" CASCADE",
            self.schema
        ))
        .execute(&self.pool)
        .await;
    }
}

pub fn random_suffix() -> String {
    use rand::Rng;
    let mut rng = rand::thread_rng();
    (0..10)
        .map(|_| (b'a' + rng.gen_range(0..26)) as char)
        .collect()
}

/// The tests' layer settings (an http cookie), to change further.
pub fn builder(store: PgStore) -> SessionLayerBuilder {
    SessionLayer::builder(store, SigningKeys::new([KEY_A]).unwrap()).with_insecure_http_cookie()
}

pub fn layer(store: PgStore) -> SessionLayer {
    builder(store).build().unwrap()
}

/// Lets a test hold a request inside its handler.
#[derive(Clone, Default)]
pub struct Gate {
    pub entered: Arc<Notify>,
    pub release: Arc<Notify>,
}

/// `GET /counter`: counts the session's requests.
pub async fn counter(s: Session) -> Result<Json<Value>, SessionError> {
    let n: u64 = s.get("count").await?.unwrap_or(0) + 1;
    s.insert("count", &n).await?;
    Ok(Json(json!({ "count": n })))
}

/// `GET /kv`: the whole session.
pub async fn get_kv(s: Session) -> Result<Json<serde_json::Map<String, Value>>, SessionError> {
    Ok(Json(s.to_json().await?))
}

/// `PUT /kv/{key}`: sets one key.
pub async fn put_kv(
    s: Session,
    Path(key): Path<String>,
    Json(v): Json<Value>,
) -> Result<StatusCode, SessionError> {
    s.insert(&key, &v).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// `POST /logout`: ends the session.
pub async fn logout(s: Session) -> StatusCode {
    s.destroy().await;
    StatusCode::NO_CONTENT
}

/// The demo's routes plus a few for tests.
pub fn app(layer: SessionLayer, gate: Gate) -> Router {
    Router::new()
        .route("/untouched", get(|| async { "ok" }))
        .route("/counter", get(counter))
        .route(
            "/peek",
            get(|s: Session| async move {
                let n: u64 = s.get("count").await?.unwrap_or(0);
                Ok::<_, SessionError>(Json(json!({ "count": n })))
            }),
        )
        .route("/kv/{key}", put(put_kv))
        .route("/kv", get(get_kv))
        .route(
            "/cycle",
            post(|s: Session| async move {
                s.cycle_id().await?;
                Ok::<_, SessionError>(StatusCode::NO_CONTENT)
            }),
        )
        .route(
            "/login/{user}",
            post(|s: Session, Path(user): Path<String>| async move {
                s.cycle_id().await?;
                s.set_user_id(Some(&user)).await?;
                s.insert("user", &user).await?;
                Ok::<_, SessionError>(StatusCode::NO_CONTENT)
            }),
        )
        .route(
            "/take/{key}",
            post(|s: Session, Path(key): Path<String>| async move {
                match s.take_once::<Value>(&key).await? {
                    Some(v) => Ok::<_, SessionError>((StatusCode::OK, Json(v))),
                    None => Ok((StatusCode::NOT_FOUND, Json(Value::Null))),
                }
            }),
        )
        .route("/logout", post(logout))
        .route(
            "/slow/{key}",
            put(
                |State(gate): State<Gate>, s: Session, Path(key): Path<String>| async move {
                    // Load first, then wait, then write: the window in which
                    // other requests change or end the session.
                    let _ = s.is_empty().await?;
                    gate.entered.notify_one();
                    gate.release.notified().await;
                    s.insert(&key, &true).await?;
                    Ok::<_, SessionError>(StatusCode::NO_CONTENT)
                },
            ),
        )
        .with_state(gate)
        .layer(layer)
}

/// One browser: an app and the session cookie it holds.
#[derive(Clone)]
pub struct Client {
    pub app: Router,
    pub cookie: Option<String>,
    pub cookie_name: String,
}

pub struct Reply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Value,
}

impl Reply {
    pub fn set_cookie(&self) -> Option<&str> {
        self.headers
            .get(header::SET_COOKIE)
            .map(|v| v.to_str().unwrap())
    }
}

impl Client {
    pub fn new(app: Router) -> Self {
        Self {
            app,
            cookie: None,
            cookie_name: "session".into(),
        }
    }

    pub async fn send(&mut self, method: &str, path: &str, body: Option<Value>) -> Reply {
        let mut req = Request::builder().method(method).uri(path);
        if let Some(c) = &self.cookie {
            req = req.header(header::COOKIE, format!("{}={c}", self.cookie_name));
        }
        let req = match body {
            Some(b) => req
                .header(header::CONTENT_TYPE, "application/json")
                .body(Body::from(b.to_string())),
            None => req.body(Body::empty()),
        }
        .unwrap();
        let res: Response<Body> = self.app.clone().oneshot(req).await.unwrap();
        let (parts, body) = res.into_parts();
        if let Some(sc) = parts.headers.get(header::SET_COOKIE) {
            let sc = sc.to_str().unwrap();
            let value = sc.split(';').next().unwrap().split_once('=').unwrap().1;
            self.cookie = (!sc.contains("Max-Age=0")).then(|| value.to_owned());
        }
        let bytes = body.collect().await.unwrap().to_bytes();
        let body = serde_json::from_slice(&bytes)
            .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()));
        Reply {
            status: parts.status,
            headers: parts.headers,
            body,
        }
    }

    pub async fn get(&mut self, path: &str) -> Reply {
        self.send("GET", path, None).await
    }

    pub async fn post(&mut self, path: &str) -> Reply {
        self.send("POST", path, None).await
    }

    pub async fn put(&mut self, path: &str, v: Value) -> Reply {
        self.send("PUT", path, Some(v)).await
    }

    /// GETs `path` until it answers 200 (the database is back), for 5 s at
    /// most; its body, or `None` when it never did.
    pub async fn get_when_up(&mut self, path: &str) -> Option<Value> {
        for _ in 0..50 {
            let r = self.get(path).await;
            if r.status == StatusCode::OK {
                return Some(r.body);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        None
    }
}

pub async fn eventually<F, Fut>(what: &str, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    for _ in 0..200 {
        if f().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("timed out waiting for {what}");
}

/// Awaits every request of `tasks`, made while the database was cut: each
/// answers 503 and leaves the cookie alone.
pub async fn assert_all_unavailable(tasks: Vec<tokio::task::JoinHandle<Reply>>) {
    for t in tasks {
        let r = t.await.unwrap();
        assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE);
        assert!(r.set_cookie().is_none(), "no cookie change on failure");
    }
}

/// Once the database is back, each client's session `i` holds `expected(i)`.
pub async fn assert_intact(clients: &mut [Client], expected: impl Fn(usize) -> Value) {
    for (i, c) in clients.iter_mut().enumerate() {
        assert_eq!(
            c.get_when_up("/kv").await,
            Some(expected(i)),
            "session {i} intact"
        );
    }
}

/// A cookie value for `id` signed with `key`, as the layer writes it.
pub fn signed(id: &str, key: &str) -> String {
    use base64::Engine;
    use hmac::Mac;
    let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(key.as_bytes()).unwrap();
    mac.update(id.as_bytes());
    let tag = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes());
    format!("{id}.{tag}")
}

/// A TCP relay to the test database that a test can cut and restore, to see
/// what requests do while the database is unreachable.
pub struct Relay {
    pub port: u16,
    up: tokio::sync::watch::Sender<bool>,
}

impl Relay {
    pub async fn start() -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let (up, _) = tokio::sync::watch::channel(true);
        let state = up.clone();
        tokio::spawn(async move {
            loop {
                let Ok((mut client, _)) = listener.accept().await else {
                    return;
                };
                let mut down = state.subscribe();
                if !*down.borrow() {
                    continue; // refused: dropped at once
                }
                tokio::spawn(async move {
                    let Ok(mut server) = tokio::net::TcpStream::connect("127.0.0.1:5432").await
                    else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
                        _ = down.wait_for(|up| !*up) => {}
                    }
                });
            }
        });
        Self { port, up }
    }

    /// A store on `db`'s table (created directly first) that reaches the
    /// database through this relay, on a pool of 4 that gives up after 2 s.
    pub async fn store(&self, db: &Db, config: PgStoreConfig) -> PgStore {
        db.store().await;
        let pool = PgPoolOptions::new()
            .max_connections(4)
            .acquire_timeout(Duration::from_secs(2))
            .connect(&self.url())
            .await
            .unwrap();
        PgStore::new(pool, config).await.unwrap()
    }

    pub fn url(&self) -> String {
        let base = database_url();
        let (_, rest) = base.split_once("@").unwrap();
        let (_, db) = rest.split_once('/').unwrap();
        format!("postgres://postgres@127.0.0.1:{}/{db}", self.port)
    }

    pub fn cut(&self) {
        self.up.send_replace(false);
    }

    pub fn restore(&self) {
        self.up.send_replace(true);
    }
}

/// Logs in as alice, then as a user id with a NUL character (which Postgres
/// text cannot hold): refused with 400, and alice's session and row intact.
pub async fn a_nul_user_id_is_refused(app: Router, db: &Db) {
    let mut c = Client::new(app);
    assert_eq!(c.post("/login/alice").await.status, StatusCode::NO_CONTENT);
    let r = c.post("/login/a%00b").await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST, "{:?}", r.body);
    assert_eq!(c.get("/kv").await.body["user"], json!("alice"));
    assert_eq!(db.user_ids().await, [Some("alice".to_owned())]);
}

/// Server connections named `name`: every one, or (`busy`) those not idle.
pub async fn connections(db: &Db, name: &str, busy: bool) -> i64 {
    sqlx::query_scalar(
        "SELECT count(*) FROM pg_stat_activity \
         WHERE application_name = $1 AND (NOT $2 OR state <> 'idle')",
    )
    .bind(name)
    .bind(busy)
    .fetch_one(&db.pool)
    .await
    .unwrap()
}

/// `store`'s pool waits `bound` at most; its connections are named `name`.
/// While a transaction elsewhere holds the session's row, a save, a logout
/// and a take each answer 503 within the bound, leave the cookie alone and
/// no connection waiting or in a transaction; once the row is free, nothing
/// was written and writes go through again.
pub async fn a_locked_row_is_waited_for_within_the_bound(
    store: PgStore,
    db: &Db,
    name: &str,
    bound: Duration,
) {
    let mut c = Client::new(app(layer(store), Gate::default()));
    c.put("/kv/me", json!(1)).await;

    let tx = db.lock_rows().await;
    for (method, path) in [("PUT", "/kv/x"), ("POST", "/logout"), ("POST", "/take/me")] {
        let started = std::time::Instant::now();
        let r = tokio::time::timeout(
            Duration::from_secs(10),
            c.send(method, path, Some(json!(2))),
        )
        .await
        .unwrap_or_else(|_| panic!("{method} {path} still waits for the row after 10 s"));
        let took = started.elapsed();
        assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE, "{method} {path}");
        assert!(
            r.set_cookie().is_none(),
            "{method} {path}: cookie left alone"
        );
        assert!(
            took < bound + Duration::from_millis(700),
            "{method} {path} took {took:?}"
        );
        // (A failed transaction's rollback reaches the server just after.)
        until_idle(db, name).await;
    }
    release_and_write(&mut c, tx).await;
}

/// Waits until no backend named `name` is running, waiting or inside a
/// transaction.
pub async fn until_idle(db: &Db, name: &str) {
    eventually("no connection left waiting or in a transaction", || async {
        connections(db, name, true).await == 0
    })
    .await;
}

/// Commits `tx`, which held the row of `c`'s session (`{"me": 1}`): nothing
/// was written meanwhile, and a write now goes through.
pub async fn release_and_write(c: &mut Client, tx: sqlx::Transaction<'static, sqlx::Postgres>) {
    tx.commit().await.unwrap();
    assert_eq!(c.get("/kv").await.body, json!({"me": 1}), "nothing written");
    assert_eq!(
        c.put("/kv/x", json!(2)).await.status,
        StatusCode::NO_CONTENT
    );
    assert_eq!(c.get("/kv").await.body, json!({"me": 1, "x": 2}));
}
