//! Saves of concurrent requests share statements: every save still lands
//! on its own row, a row locked elsewhere holds up only its own request, and
//! a row changed since its load is merged, not overwritten.
#![allow(clippy::unwrap_used)]

mod common;

use std::{collections::HashMap, sync::Arc, time::Duration};

use axum::{
    extract::{Path, State},
    http::StatusCode,
    routing::{get, put},
    Json, Router,
};
use common::{pgbouncer::PgBouncer, *};
use serde_json::{json, Value};
use tokio::sync::{mpsc, Mutex, Notify};
use tower_pg_session::{PgStore, Pooler, Session, SessionError, SessionLayer};

/// Holds each request between its load and its write until the test lets
/// that request go.
#[derive(Clone)]
struct Hold {
    entered: mpsc::UnboundedSender<String>,
    release: Arc<Mutex<HashMap<String, Arc<Notify>>>>,
}

impl Hold {
    async fn gate(&self, name: &str) -> Arc<Notify> {
        self.release
            .lock()
            .await
            .entry(name.to_owned())
            .or_default()
            .clone()
    }
}

fn held_app(store: PgStore) -> (Router, Hold, mpsc::UnboundedReceiver<String>) {
    held_app_with(layer(store))
}

/// As [`held_app`], under `layer`.
fn held_app_with(layer: SessionLayer) -> (Router, Hold, mpsc::UnboundedReceiver<String>) {
    let (entered, rx) = mpsc::unbounded_channel();
    let hold = Hold {
        entered,
        release: Arc::default(),
    };
    let router = Router::new()
        .route(
            "/held/{name}",
            put(
                |State(hold): State<Hold>,
                 s: Session,
                 Path(name): Path<String>,
                 Json(v): Json<Value>| async move {
                    let _ = s.is_empty().await?;
                    let gate = hold.gate(&name).await;
                    hold.entered.send(name.clone()).unwrap();
                    gate.notified().await;
                    s.insert(&name, &v).await?;
                    Ok::<_, SessionError>(StatusCode::NO_CONTENT)
                },
            ),
        )
        .route("/kv", get(get_kv))
        .route("/kv/{key}", put(put_kv))
        .with_state(hold.clone())
        .layer(layer);
    (router, hold, rx)
}

/// Locks the row of the session whose `who` key is `name`, in `tx`.
async fn lock_row(db: &Db, tx: &mut sqlx::PgConnection, name: &str) {
    let n = sqlx::query(&format!(
        "SELECT 1 FROM {} WHERE sess::jsonb->>'who' = $1 FOR UPDATE",
        db.table()
    ))
    .bind(name)
    .execute(tx)
    .await
    .unwrap()
    .rows_affected();
    assert_eq!(n, 1);
}

/// Sessions `blocker`, `a` and `b`, each with a held save of `{name: 1}`
/// under way (loaded, not yet written), and the blocker's row locked in
/// `blocker_tx`.
struct Queued {
    hold: Hold,
    blocker_tx: sqlx::Transaction<'static, sqlx::Postgres>,
    /// The saves of the blocker, a and b.
    saves: [tokio::task::JoinHandle<StatusCode>; 3],
    a: Client,
    b: Client,
}

impl Queued {
    /// Lets the held saves go ([`release`]), each answered 204; a and b.
    async fn land(self) -> (Client, Client) {
        release(&self.hold, self.blocker_tx).await;
        for t in self.saves {
            assert_eq!(t.await.unwrap(), StatusCode::NO_CONTENT);
        }
        (self.a, self.b)
    }
}

async fn three_held_saves(db: &Db) -> Queued {
    three_held_saves_on(db, db.one_slot_store().await).await
}

/// As [`three_held_saves`], on `store` (which runs one statement at a time).
async fn three_held_saves_on(db: &Db, store: PgStore) -> Queued {
    three_held_saves_under(db, layer(store), json!(1)).await
}

/// As [`three_held_saves`], under `layer` (whose store runs one statement
/// at a time).
async fn three_held_saves_under(db: &Db, layer: SessionLayer, value: Value) -> Queued {
    let (app, hold, mut entered) = held_app_with(layer);
    let (blocker, a, b) = (
        session(&app, "blocker").await,
        session(&app, "a").await,
        session(&app, "b").await,
    );
    let mut blocker_tx = db.pool.begin().await.unwrap();
    lock_row(db, &mut blocker_tx, "blocker").await;
    let put = |c: &Client, name: &str| held_put(c, name, value.clone());
    let saves = [put(&blocker, "blocker"), put(&a, "a"), put(&b, "b")];
    for _ in 0..3 {
        entered.recv().await.unwrap();
    }
    Queued {
        hold,
        blocker_tx,
        saves,
        a,
        b,
    }
}

/// Lets the blocker's save take the one slot and wait for its row, then a's
/// and b's save queue behind it, then frees the blocker's row: a and b share
/// the next statement.
async fn release(hold: &Hold, blocker_tx: sqlx::Transaction<'static, sqlx::Postgres>) {
    hold.gate("blocker").await.notify_one();
    tokio::time::sleep(Duration::from_millis(100)).await;
    hold.gate("a").await.notify_one();
    hold.gate("b").await.notify_one();
    tokio::time::sleep(Duration::from_millis(100)).await;
    blocker_tx.commit().await.unwrap();
}

/// Waits until the `count` held requests named `prefix0`, `prefix1`, … have
/// all loaded, then lets them all go at once: their writes start together.
async fn together(
    hold: &Hold,
    entered: &mut mpsc::UnboundedReceiver<String>,
    prefix: &str,
    count: usize,
) {
    for _ in 0..count {
        entered.recv().await.unwrap();
    }
    for i in 0..count {
        hold.gate(&format!("{prefix}{i}")).await.notify_one();
    }
}

/// Sends `c`'s held save of `{name: value}` from a task of its own; its status.
fn held_put(c: &Client, name: &str, value: Value) -> tokio::task::JoinHandle<StatusCode> {
    let (mut c, path) = (c.clone(), format!("/held/{name}"));
    tokio::spawn(async move { c.put(&path, value).await.status })
}

async fn session(app: &Router, name: &str) -> Client {
    let mut c = Client::new(app.clone());
    c.put("/kv/who", json!(name)).await;
    c
}

#[tokio::test]
async fn queued_saves_share_one_statement_and_each_lands_on_its_row() {
    let db = Db::new().await;
    let (app, hold, mut entered) = held_app(db.one_slot_store().await);
    let blocker = session(&app, "blocker").await;
    let mut clients = Vec::new();
    for i in 0..40 {
        clients.push(session(&app, &format!("s{i}")).await);
    }
    // The first save waits for a row lock and holds the one slot meanwhile.
    let mut tx = db.pool.begin().await.unwrap();
    lock_row(&db, &mut tx, "blocker").await;
    let first = held_put(&blocker, "blocker", json!("done"));
    let tasks: Vec<_> = clients
        .iter()
        .enumerate()
        .map(|(i, c)| held_put(c, &format!("s{i}"), json!(i)))
        .collect();
    for _ in 0..41 {
        entered.recv().await.unwrap();
    }
    hold.gate("blocker").await.notify_one();
    eventually("the first save waits for its row", || async {
        sqlx::query_scalar::<_, i64>(
            "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND query LIKE 'UPDATE % AND set_config(%'",
        )
        .fetch_one(&db.pool)
        .await
        .unwrap()
            >= 1
    })
    .await;
    for i in 0..40 {
        hold.gate(&format!("s{i}")).await.notify_one();
    }
    // Every save has queued behind the slot before the lock goes.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let before = db.statements().await;
    tx.commit().await.unwrap();
    assert_eq!(first.await.unwrap(), StatusCode::NO_CONTENT);
    for t in tasks {
        assert_eq!(t.await.unwrap(), StatusCode::NO_CONTENT);
    }
    assert_eq!(
        db.statements().await - before,
        2,
        "the blocked save, then one statement for the 40 queued"
    );
    for (i, c) in clients.iter_mut().enumerate() {
        let data = c.get("/kv").await.body;
        assert_eq!(data, json!({"who": format!("s{i}"), format!("s{i}"): i}));
        // The version each save returned is the row's: the next save of the
        // session goes through without a conflict.
        assert_eq!(
            c.put("/kv/again", json!(true)).await.status,
            StatusCode::NO_CONTENT
        );
    }
    db.drop_schema().await;
}

/// Under light load saves do not queue behind one another: each waits
/// mostly for its commit, which Postgres shares among the commits that
/// arrive together. Four saves of rows locked elsewhere all wait in
/// Postgres at once (none queued in the store), then each lands on its row.
#[tokio::test]
async fn under_light_load_four_saves_start_at_once_and_each_lands() {
    let db = Db::new().await;
    let (app, hold, mut entered) = held_app(db.store().await);
    let mut clients = Vec::new();
    for i in 0..4 {
        clients.push(session(&app, &format!("w{i}")).await);
    }
    let mut tx = db.pool.begin().await.unwrap();
    for i in 0..4 {
        lock_row(&db, &mut tx, &format!("w{i}")).await;
    }
    let saves: Vec<_> = clients
        .iter()
        .enumerate()
        .map(|(i, c)| held_put(c, &format!("w{i}"), json!(i)))
        .collect();
    together(&hold, &mut entered, "w", 4).await;
    db.until_blocked(4).await;
    tx.commit().await.unwrap();
    for t in saves {
        assert_eq!(t.await.unwrap(), StatusCode::NO_CONTENT);
    }
    for (i, c) in clients.iter_mut().enumerate() {
        let who = format!("w{i}");
        assert_eq!(c.get("/kv").await.body, json!({"who": who, who.clone(): i}));
    }
    db.drop_schema().await;
}

#[tokio::test]
async fn a_save_of_a_row_locked_elsewhere_holds_up_only_its_own_request() {
    let db = Db::new().await;
    let Queued {
        hold,
        blocker_tx,
        saves: [first, ta, tb],
        mut a,
        ..
    } = three_held_saves(&db).await;
    // Something else (a token refresh, say) holds a's row.
    let mut tx_a = db.pool.begin().await.unwrap();
    lock_row(&db, &mut tx_a, "a").await;

    release(&hold, blocker_tx).await;
    assert_eq!(first.await.unwrap(), StatusCode::NO_CONTENT);
    let b_status = tokio::time::timeout(Duration::from_secs(5), tb)
        .await
        .expect("b's save does not wait for a's row")
        .unwrap();
    assert_eq!(b_status, StatusCode::NO_CONTENT);
    assert!(!ta.is_finished(), "a's save waits for its row");

    tx_a.commit().await.unwrap();
    assert_eq!(ta.await.unwrap(), StatusCode::NO_CONTENT);
    assert_eq!(a.get("/kv").await.body, json!({"who": "a", "a": 1}));
    db.drop_schema().await;
}

#[tokio::test]
async fn a_shared_save_of_a_row_changed_since_its_load_is_merged() {
    let db = Db::new().await;
    let store = db.one_slot_store().await;
    changed_since_load_is_merged(db, store).await;
}

#[tokio::test]
async fn through_the_pooler_a_shared_save_of_a_row_changed_since_its_load_is_merged() {
    let bouncer = PgBouncer::start().await;
    let db = Db::new().await;
    let store = pooled_one_slot_store(&bouncer, &db).await;
    changed_since_load_is_merged(db, store).await;
}

/// Lets the held saves of the blocker, a and b go on `store` (a's and b's
/// share a statement) and checks that each landed as written, hostile
/// values and all. The calls of the shared save's function made meanwhile,
/// and the shared saves sent as they are.
async fn shared_save_of_a_and_b(db: &Db, store: PgStore) -> (i64, i64) {
    let counts = || async {
        (
            db.statements_like("SELECT sid, version FROM %").await,
            db.statements_like("WITH v (sid%").await,
        )
    };
    let hostile = json!({
        "'; DROP TABLE session; --": "\\' $1 $$ E'\\x00' \u{0} ünïcødé 🦀",
        "nested": ["'", "\\", "$2::xid", "NULL", "{\"a\",\"b\"}", "ARRAY['x']"],
    });
    let queued = three_held_saves_under(db, layer(store), hostile.clone()).await;
    let before = counts().await;
    let (mut a, mut b) = queued.land().await;
    let after = counts().await;
    assert_eq!(a.get("/kv").await.body, json!({"who": "a", "a": hostile}));
    assert_eq!(b.get("/kv").await.body, json!({"who": "b", "b": hostile}));
    assert_eq!(db.rows().await, 3, "the table intact");
    (after.0 - before.0, after.1 - before.1)
}

#[tokio::test]
async fn through_the_pooler_a_shared_save_is_one_call_of_the_tables_function() {
    let bouncer = PgBouncer::start().await;
    let db = Db::new().await;
    let store = pooled_one_slot_store(&bouncer, &db).await;
    assert_eq!(
        shared_save_of_a_and_b(&db, store).await,
        (1, 0),
        "a's and b's saves: one call, planned once per server connection"
    );
    db.drop_schema().await;
}

#[tokio::test]
async fn a_role_that_may_not_create_the_function_shares_saves_all_the_same() {
    let db = Db::new().await;
    db.store().await;
    saves_of_a_role_without_the_function(db).await;
}

#[tokio::test]
async fn a_role_that_may_not_call_the_function_shares_saves_all_the_same() {
    let db = Db::new().await;
    let config = db.config().with_pooler(Pooler::Transaction);
    PgStore::new(db.pool.clone(), config).await.unwrap();
    let functions = db.functions().await;
    assert_eq!(functions.len(), 1, "{functions:?}");
    sqlx::query(&format!(
        "REVOKE EXECUTE ON FUNCTION \"{}\".\"{}\" FROM PUBLIC",
        db.schema, functions[0]
    ))
    .execute(&db.pool)
    .await
    .unwrap();
    saves_of_a_role_without_the_function(db).await;
}

/// A role that may read and write `db`'s table and nothing else runs the
/// shared save of a and b as a query: its store started all the same.
async fn saves_of_a_role_without_the_function(db: Db) {
    let role = format!("r_{}", db.schema);
    let (schema, table) = (&db.schema, db.table());
    sqlx::raw_sql(&format!(
        "CREATE ROLE {role} LOGIN; GRANT USAGE ON SCHEMA {schema} TO {role}; \
         GRANT SELECT, INSERT, UPDATE, DELETE ON {table} TO {role}"
    ))
    .execute(&db.pool)
    .await
    .unwrap();
    let url = database_url().replacen("postgres@", &format!("{role}@"), 1);
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(8)
        .connect(&url)
        .await
        .unwrap();
    let config = db
        .config()
        .with_pooler(Pooler::Transaction)
        .with_load_concurrency(1)
        .unwrap();
    let store = PgStore::new(pool.clone(), config).await.unwrap();
    assert_eq!(
        shared_save_of_a_and_b(&db, store).await,
        (0, 1),
        "no function to call: one shared save as it is"
    );
    pool.close().await;
    let admin = db.pool.clone();
    db.drop_schema().await;
    sqlx::query(&format!("DROP ROLE {role}"))
        .execute(&admin)
        .await
        .unwrap();
}

/// A store through `bouncer` in transaction mode that runs one load or save
/// statement at a time.
async fn pooled_one_slot_store(bouncer: &PgBouncer, db: &Db) -> PgStore {
    let config = db
        .config()
        .with_pooler(Pooler::Transaction)
        .with_load_concurrency(1)
        .unwrap();
    PgStore::new(bouncer.pool(8).await, config).await.unwrap()
}

async fn changed_since_load_is_merged(db: Db, store: PgStore) {
    let queued = three_held_saves_on(&db, store).await;
    // Another instance writes a's session after a's request loaded it.
    let mut other = queued.a.clone();
    assert_eq!(
        other.put("/kv/elsewhere", json!(true)).await.status,
        StatusCode::NO_CONTENT
    );
    let (mut a, mut b) = queued.land().await;
    assert_eq!(
        a.get("/kv").await.body,
        json!({"who": "a", "elsewhere": true, "a": 1}),
        "both changes kept"
    );
    assert_eq!(b.get("/kv").await.body, json!({"who": "b", "b": 1}));
    db.drop_schema().await;
}

#[tokio::test]
async fn a_shared_save_of_a_row_expired_since_its_load_does_not_revive_it() {
    let db = Db::new().await;
    let store = db.one_slot_store().await;
    expired_since_load_is_not_revived(db, store).await;
}

#[tokio::test]
async fn through_the_pooler_a_shared_save_of_a_row_expired_since_its_load_does_not_revive_it() {
    let bouncer = PgBouncer::start().await;
    let db = Db::new().await;
    let store = pooled_one_slot_store(&bouncer, &db).await;
    expired_since_load_is_not_revived(db, store).await;
}

async fn expired_since_load_is_not_revived(db: Db, store: PgStore) {
    let idle = Duration::from_secs(2);
    let layer = builder(store)
        .with_idle_timeout(Some(idle))
        .build()
        .unwrap();
    let queued = three_held_saves_under(&db, layer, json!(1)).await;
    // The sessions expire while their requests are held, loaded.
    tokio::time::sleep(idle + Duration::from_millis(200)).await;
    let before = rows(&db).await;
    let (mut a, mut b) = queued.land().await;
    // Each session ended with its expiry: its row is neither written nor
    // extended, and each starts afresh.
    assert_eq!(rows(&db).await, before);
    assert!(before.iter().all(|(_, live)| !live));
    assert_eq!(a.get("/kv").await.body, json!({}));
    assert_eq!(b.get("/kv").await.body, json!({}));
    db.drop_schema().await;
}

/// Each row's data and whether it is live, in order of data.
async fn rows(db: &Db) -> Vec<(String, bool)> {
    sqlx::query_as(&format!(
        "SELECT sess::text, expire > now() FROM {} ORDER BY sess::text",
        db.table()
    ))
    .fetch_all(&db.pool)
    .await
    .unwrap()
}

#[tokio::test]
async fn a_failed_shared_save_fails_every_request_in_it_and_loses_nothing() {
    let db = Db::new().await;
    let relay = Relay::start().await;
    let store = relay
        .store(&db, db.config().with_load_concurrency(1).unwrap())
        .await;
    let (app, hold, mut entered) = held_app(store);
    let mut clients = Vec::new();
    for i in 0..10 {
        clients.push(session(&app, &format!("s{i}")).await);
    }
    let tasks: Vec<_> = clients
        .iter()
        .enumerate()
        .map(|(i, c)| {
            let mut c = c.clone();
            tokio::spawn(async move { c.put(&format!("/held/s{i}"), json!(i)).await })
        })
        .collect();
    for _ in 0..10 {
        entered.recv().await.unwrap();
    }
    relay.cut();
    for i in 0..10 {
        hold.gate(&format!("s{i}")).await.notify_one();
    }
    assert_all_unavailable(tasks).await;
    relay.restore();
    assert_intact(&mut clients, |i| json!({"who": format!("s{i}")})).await;
    db.drop_schema().await;
}

/// Statements on this test's table that inserted several rows at once.
async fn shared_inserts(db: &Db) -> i64 {
    db.statements_like("INSERT INTO%), (%").await
}

/// As saves, the inserts of new sessions under light load start side by
/// side: four new sessions' inserts into a table held elsewhere all wait in
/// Postgres at once, then each gets a row of its own.
#[tokio::test]
async fn under_light_load_four_new_sessions_insert_at_once_and_each_gets_its_row() {
    let db = Db::new().await;
    let (app, hold, mut entered) = held_app(db.store().await);
    let lock = db.lock_table().await;
    let tasks: Vec<_> = (0..4)
        .map(|i| {
            let mut c = Client::new(app.clone());
            tokio::spawn(async move { (c.put(&format!("/held/n{i}"), json!(i)).await.status, c) })
        })
        .collect();
    together(&hold, &mut entered, "n", 4).await;
    db.until_blocked(4).await;
    lock.commit().await.unwrap();
    for (i, t) in tasks.into_iter().enumerate() {
        let (status, mut c) = t.await.unwrap();
        assert_eq!(status, StatusCode::NO_CONTENT);
        assert_eq!(c.get("/kv").await.body, json!({format!("n{i}"): i}));
    }
    assert_eq!(db.rows().await, 4, "one row per new session");
    db.drop_schema().await;
}

#[tokio::test]
async fn queued_new_sessions_share_one_insert_and_each_gets_its_own_row() {
    let db = Db::new().await;
    let app = common::app(layer(db.one_slot_store().await), Gate::default());
    // A lone new session: the plain insert.
    let mut alone = Client::new(app.clone());
    assert_eq!(alone.get("/counter").await.body, json!({"count": 1}));
    assert_eq!(shared_inserts(&db).await, 0, "a lone insert is not shared");

    // Hold the table so the first insert blocks; 20 more queue behind it.
    let lock = db.lock_table().await;
    let before = db.statements().await;
    let first = tokio::spawn({
        let mut c = Client::new(app.clone());
        async move { (c.get("/counter").await, c) }
    });
    db.until_blocked(1).await;
    let tasks: Vec<_> = (0..20)
        .map(|_| {
            let mut c = Client::new(app.clone());
            tokio::spawn(async move { (c.get("/counter").await, c) })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(50)).await;
    lock.commit().await.unwrap();

    let mut clients = vec![first.await.unwrap()];
    for t in tasks {
        clients.push(t.await.unwrap());
    }
    let mut cookies = std::collections::HashSet::new();
    for (r, c) in &clients {
        assert_eq!(r.status, StatusCode::OK);
        assert_eq!(r.body, json!({"count": 1}));
        assert!(
            cookies.insert(c.cookie.clone().unwrap()),
            "a session of its own"
        );
    }
    assert_eq!(
        db.statements().await - before,
        2,
        "the blocked insert, then one carrying all 20 queued"
    );
    assert_eq!(shared_inserts(&db).await, 1, "the 20 shared one statement");
    assert_eq!(db.rows().await, 22, "one row per new session");
    // Each session is its own row: the next request counts on from it.
    for (_, mut c) in clients {
        assert_eq!(c.get("/counter").await.body, json!({"count": 2}));
    }
    db.drop_schema().await;
}
