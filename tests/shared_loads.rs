//! Loads of concurrent requests share statements: each request still gets
//! exactly its own session, its touch, and its error.
#![allow(clippy::unwrap_used)]

mod common;

use axum::{http::StatusCode, Router};
use common::*;
use serde_json::json;

/// Brings the expiry of the rows `filter` selects (a WHERE clause; empty for
/// all) 20 hours closer, so they are due for the idle extension.
async fn make_due(db: &Db, filter: &str) {
    sqlx::query(&format!(
        "UPDATE {} SET expire = expire - interval '20 hours' {filter}",
        db.table()
    ))
    .execute(&db.pool)
    .await
    .unwrap();
}

/// `n` sessions of `app`, session `i` holding `{"me": i}`.
async fn clients(app: &Router, n: usize) -> Vec<Client> {
    let mut clients = Vec::new();
    for i in 0..n {
        let mut c = Client::new(app.clone());
        c.put("/kv/me", json!(i)).await;
        clients.push(c);
    }
    clients
}

/// Two sessions of `app`, holding `{"me": "a"}` and `{"me": "b"}`.
async fn a_and_b(app: &Router) -> (Client, Client) {
    let (mut a, mut b) = (Client::new(app.clone()), Client::new(app.clone()));
    a.put("/kv/me", json!("a")).await;
    b.put("/kv/me", json!("b")).await;
    (a, b)
}

#[tokio::test]
async fn queued_loads_share_one_statement_and_each_gets_its_own_session() {
    let db = Db::new().await;
    let app = app(layer(db.one_slot_store().await), Gate::default());
    let mut clients = Vec::new();
    for i in 0..40 {
        let mut c = Client::new(app.clone());
        assert_eq!(
            c.put("/kv/me", json!(i)).await.status,
            StatusCode::NO_CONTENT
        );
        clients.push(c);
    }
    // Even sessions are due for the idle extension (idle 24 h, due after
    // 10 %): their rows expire in 4 h instead of 24 h.
    make_due(&db, "WHERE (sess::jsonb->>'me')::int % 2 = 0").await;
    // A second tab of session 7, and a cookie whose row does not exist.
    clients.push(clients[7].clone());
    let mut unknown = Client::new(app.clone());
    unknown.cookie = Some(signed("AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA", KEY_A));
    clients.push(unknown);

    // Hold the table so the first load blocks in its statement.
    let lock = db.lock_table().await;
    let before = db.statements().await;
    let mut first = clients[0].clone();
    let first = tokio::spawn(async move { first.get("/kv").await });
    db.until_blocked(1).await;
    let tasks: Vec<_> = clients[1..]
        .iter()
        .cloned()
        .map(|mut c| tokio::spawn(async move { c.get("/kv").await }))
        .collect();
    // Let every request reach its load, then drop the one whose statement
    // runs (alone, in its own request): the others carry on without it.
    tokio::task::yield_now().await;
    first.abort();
    lock.commit().await.unwrap();

    let mut replies = Vec::new();
    for t in tasks {
        replies.push(t.await.unwrap());
    }
    for (i, r) in replies.iter().enumerate().take(39).map(|(i, r)| (i + 1, r)) {
        assert_eq!(r.status, StatusCode::OK, "session {i}");
        assert_eq!(r.body, json!({"me": i}), "session {i} got its own data");
        assert_eq!(
            r.set_cookie().is_some(),
            i % 2 == 0,
            "session {i}: the cookie is re-sent exactly when the expiry was extended"
        );
    }
    assert_eq!(
        replies[39].body,
        json!({"me": 7}),
        "second tab of session 7"
    );
    assert_eq!(replies[40].body, json!({}), "unknown id: empty session");
    assert!(replies[40].set_cookie().is_none());
    let statements = db.statements().await - before;
    assert!(
        statements <= 3,
        "the dropped lone load (if it completed), one statement reading all 41 queued loads, \
         one extending the rows due: {statements}"
    );
    let shared = db.statements_like("%unnest%").await;
    assert_eq!(
        shared, 2,
        "the 41 queued loads shared one read, and the 19 due one extension"
    );

    // Extended rows now expire in about 24 h, the others were not written.
    let extended: i64 = sqlx::query_scalar(&format!(
        "SELECT count(*) FROM {} WHERE expire > localtimestamp + interval '23 hours'",
        db.table()
    ))
    .fetch_one(&db.pool)
    .await
    .unwrap();
    // (Session 0's request was dropped before its load answered: its row
    // was not extended.)
    assert_eq!(extended, 39, "19 extended now, 20 never due");

    // The slot was given back: a later load runs at once.
    assert_eq!(clients[3].get("/kv").await.body, json!({"me": 3}));
    db.drop_schema().await;
}

#[tokio::test]
async fn a_failed_shared_load_fails_every_request_in_it_and_loses_nothing() {
    let db = Db::new().await;
    let relay = Relay::start().await;
    let store = relay
        .store(&db, db.config().with_load_concurrency(1).unwrap())
        .await;
    let app = app(layer(store), Gate::default());
    let mut clients = clients(&app, 20).await;

    relay.cut();
    let tasks: Vec<_> = clients
        .iter()
        .cloned()
        .map(|mut c| tokio::spawn(async move { c.get("/kv").await }))
        .collect();
    assert_all_unavailable(tasks).await;
    relay.restore();
    assert_intact(&mut clients, |i| json!({"me": i})).await;
    db.drop_schema().await;
}

#[tokio::test]
async fn a_load_skips_the_touch_of_a_locked_row_instead_of_waiting() {
    let db = Db::new().await;
    let app = app(layer(db.one_slot_store().await), Gate::default());
    let (mut a, b) = a_and_b(&app).await;
    // Both are due for the idle extension.
    make_due(&db, "").await;
    // Another request (a token refresh, say) holds a's row.
    let mut holder = db.pool.begin().await.unwrap();
    sqlx::query(&format!(
        "SELECT 1 FROM {} WHERE sess::jsonb->>'me' = 'a' FOR UPDATE",
        db.table()
    ))
    .execute(&mut *holder)
    .await
    .unwrap();

    let both = async {
        let (mut a2, mut b2) = (a.clone(), b.clone());
        tokio::join!(a2.get("/kv"), b2.get("/kv"))
    };
    let (ra, rb) = tokio::time::timeout(std::time::Duration::from_secs(5), both)
        .await
        .expect("loads answer while another transaction holds a row");
    assert_eq!(ra.body, json!({"me": "a"}));
    assert!(ra.set_cookie().is_none(), "the locked row is not touched");
    assert_eq!(rb.body, json!({"me": "b"}));
    assert!(rb.set_cookie().is_some(), "the free row is touched");

    holder.commit().await.unwrap();
    assert!(
        a.get("/kv").await.set_cookie().is_some(),
        "touched once the row is free"
    );
    db.drop_schema().await;
}

#[tokio::test]
async fn a_load_on_a_connection_that_died_while_idle_is_retried() {
    let db = Db::new().await;
    let (name, store) = db.named_store(1).await;
    let mut c = Client::new(app(layer(store), Gate::default()));
    c.put("/kv/me", json!(1)).await;

    let killed = db.kill_backends(&name).await;
    assert_eq!(killed, [true], "the pool's one connection is gone");

    let r = c.get("/kv").await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.body, json!({"me": 1}));
    db.drop_schema().await;
}

#[tokio::test]
async fn a_stalled_load_statement_lets_the_next_load_open_another() {
    let db = Db::new().await;
    let app = app(layer(db.store().await), Gate::default());
    let (mut a, mut b) = a_and_b(&app).await;
    let mut c = Client::new(app.clone());
    c.put("/kv/me", json!("c")).await;

    let lock = db.lock_table().await;
    let first = tokio::spawn(async move { a.get("/kv").await });
    db.until_blocked(1).await;
    // A second statement starts beside the first at once.
    let second = tokio::spawn(async move { b.get("/kv").await });
    db.until_blocked(2).await;
    // The running statements have made no progress for longer than the
    // stall limit: this load does not queue behind them but runs beside.
    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    let third = tokio::spawn(async move { c.get("/kv").await });
    db.until_blocked(3).await;
    lock.commit().await.unwrap();
    assert_eq!(first.await.unwrap().body, json!({"me": "a"}));
    assert_eq!(second.await.unwrap().body, json!({"me": "b"}));
    assert_eq!(third.await.unwrap().body, json!({"me": "c"}));
    db.drop_schema().await;
}

#[tokio::test]
async fn shared_statements_leave_no_reference_to_the_store_behind() {
    let db = Db::new().await;
    let (name, store) = db.named_store(4).await;
    let app = app(layer(store), Gate::default());
    let clients = clients(&app, 20).await;
    let tasks: Vec<_> = clients
        .into_iter()
        .map(|mut c| tokio::spawn(async move { c.put("/kv/again", json!(true)).await.status }))
        .collect();
    for t in tasks {
        assert_eq!(t.await.unwrap(), StatusCode::NO_CONTENT);
    }
    // The last handle on the store goes with the app: its pool closes.
    drop(app);
    eventually("the store's connections to close", || async {
        db.backends_named(&name).await == 0
    })
    .await;
    db.drop_schema().await;
}

#[tokio::test]
async fn a_long_shared_load_on_a_small_table_looks_up_keys_never_scans() {
    let db = Db::new().await;
    // One connection: its scans are the store's, and loads queue for it.
    let (_, store) = db.named_store(1).await;
    // 2,000 sessions: small enough that Postgres would answer a long
    // `sid IN (…)` list with a sequential scan of the whole table.
    sqlx::query(&format!(
        "INSERT INTO {} (sid, sess, expire) SELECT lpad(g::text, 32, '0'), \
         json_build_object('me', g), localtimestamp + interval '1 day' \
         FROM generate_series(1, 2000) g",
        db.table()
    ))
    .execute(&db.pool)
    .await
    .unwrap();
    sqlx::query(&format!("ANALYZE {}", db.table()))
        .execute(&db.pool)
        .await
        .unwrap();
    let app = app(layer(store.clone()), Gate::default());
    let client = |i: usize| {
        let mut c = Client::new(app.clone());
        c.cookie = Some(signed(&format!("{i:032}"), KEY_A));
        c
    };
    let (seq0, idx0) = db.scans(&store).await;
    let lock = db.lock_table().await;
    let mut first = client(1);
    let first = tokio::spawn(async move { first.get("/kv").await });
    db.until_blocked(1).await;
    let tasks: Vec<_> = (2..=64)
        .map(|i| {
            let mut c = client(i * 31);
            tokio::spawn(async move { (i * 31, c.get("/kv").await) })
        })
        .collect();
    tokio::task::yield_now().await;
    lock.commit().await.unwrap();
    assert_eq!(first.await.unwrap().body, json!({"me": 1}));
    for t in tasks {
        let (i, r) = t.await.unwrap();
        assert_eq!(r.body, json!({"me": i}), "session {i}");
    }
    let (seq1, idx1) = db.scans(&store).await;
    assert_eq!(seq1 - seq0, 0, "no sequential scan of the table");
    assert!(idx1 - idx0 >= 64, "one lookup per key: {}", idx1 - idx0);
    db.drop_schema().await;
}
