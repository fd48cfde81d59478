//! The store and the session layer through a real PgBouncer in transaction
//! mode, with fewer server connections than the store's pool has, so that
//! PgBouncer hands server connections from one client to another between
//! transactions: schema creation, create, load, touch, save, conflicts,
//! shared statements, pruning by one instance at a time, administration.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use axum::http::{header, HeaderName, Request, StatusCode};
use common::{pgbouncer::PgBouncer, *};
use serde_json::json;
use sqlx::postgres::PgPoolOptions;
use tower::ServiceExt;
use tower_pg_session::{
    PgStore, PgStoreConfig, Pooler, PruneConfig, PruneOutcome, SessionLayer, SigningKeys,
};

/// A store on `db`'s schema (created through PgBouncer) on a pool of `size`.
async fn store(bouncer: &PgBouncer, db: &Db, size: u32) -> PgStore {
    let config = db.config().with_pooler(Pooler::Transaction);
    PgStore::new(bouncer.pool(size).await, config)
        .await
        .unwrap_or_else(|e| panic!("{e:?}\n{}", bouncer.log()))
}

#[tokio::test]
async fn four_instances_starting_at_once_make_one_table() {
    let bouncer = PgBouncer::start().await;
    let db = Db::new().await;
    // Concurrently: each start finds no table and creates it.
    tokio::join!(
        store(&bouncer, &db, 2),
        store(&bouncer, &db, 2),
        store(&bouncer, &db, 2),
        store(&bouncer, &db, 2),
    );
    assert_eq!(db.rows().await, 0, "the table exists and is empty");
    let functions = db.functions().await;
    assert!(
        matches!(functions.as_slice(), [f] if f.starts_with("session_save_")),
        "one function for the shared saves: {functions:?}"
    );
    db.drop_schema().await;
}

#[tokio::test]
async fn create_load_touch_save_cycle_and_destroy() {
    let bouncer = PgBouncer::start().await;
    let db = Db::new().await;
    let app = app(layer(store(&bouncer, &db, 8).await), Gate::default());
    let mut c = Client::new(app);
    assert_eq!(c.get("/counter").await.body, json!({"count": 1}));
    assert_eq!(c.get("/counter").await.body, json!({"count": 2}));
    assert_eq!(c.get("/peek").await.body, json!({"count": 2}));

    // Three hours later the touch is due: the read extends the expiry.
    sqlx::query(&format!(
        "UPDATE {} SET expire = expire - interval '3 hours'",
        db.table()
    ))
    .execute(&db.pool)
    .await
    .unwrap();
    let r = c.get("/peek").await;
    assert_eq!(r.body, json!({"count": 2}));
    let sc = r.set_cookie().expect("the touch re-sends the cookie");
    assert!(sc.contains("Max-Age=8640"), "{sc}");

    assert_eq!(
        c.put("/kv/colour", json!("blue")).await.status,
        StatusCode::NO_CONTENT
    );
    let old = c.cookie.clone().unwrap();
    assert_eq!(c.post("/cycle").await.status, StatusCode::NO_CONTENT);
    assert_ne!(c.cookie.clone().unwrap(), old);
    assert_eq!(
        c.get("/kv").await.body,
        json!({"count": 2, "colour": "blue"})
    );
    let mut stale = Client {
        cookie: Some(old),
        ..c.clone()
    };
    assert_eq!(stale.get("/kv").await.body, json!({}), "the old id is dead");
    assert_eq!(c.post("/logout").await.status, StatusCode::NO_CONTENT);
    assert_eq!(db.rows().await, 0);
    db.drop_schema().await;
}

#[tokio::test]
async fn fifty_concurrent_writers_of_one_session_keep_every_key() {
    let bouncer = PgBouncer::start().await;
    let db = Db::new().await;
    let app = app(layer(store(&bouncer, &db, 16).await), Gate::default());
    let mut c = Client::new(app);
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
    let all = db.only_sess().await;
    for i in 0..50 {
        assert_eq!(all[format!("k{i}")], json!(i), "k{i} kept: {all}");
    }
    db.drop_schema().await;
}

/// A lone read is one statement behind the pooler as well: one
/// simple-protocol query, with no BEGIN and COMMIT around it, which reads
/// the row as the prepared statement does (login columns included).
#[tokio::test]
async fn a_lone_read_through_the_pooler_is_one_statement() {
    let bouncer = PgBouncer::start().await;
    let db = Db::new().await;
    let mut c = Client::new(app(layer(store(&bouncer, &db, 4).await), Gate::default()));
    // What PgBouncer counts for the plainest statement of all, as a unit.
    let pool = bouncer.pool(1).await;
    let trips = bouncer.round_trips().await;
    for _ in 0..10 {
        sqlx::Executor::execute(&pool, "SELECT 1").await.unwrap();
    }
    let select_1 = bouncer.round_trips().await - trips;
    assert_eq!(c.get("/counter").await.body, json!({"count": 1}));
    assert_eq!(c.get("/counter").await.body, json!({"count": 2}));
    let (before, trips) = (db.statements().await, bouncer.round_trips().await);
    for _ in 0..10 {
        let r = c.get("/peek").await;
        assert_eq!(r.body, json!({"count": 2}), "{}", bouncer.log());
        assert!(r.set_cookie().is_none(), "a read writes nothing");
    }
    assert_eq!(db.statements().await - before, 10, "one statement per read");
    let reads = bouncer.round_trips().await - trips;
    // A plain pool's SELECT 1 costs two: the query, and the ping sqlx sends
    // as the connection goes back. The store keeps its connection instead.
    assert_eq!(
        reads, 10,
        "one round trip per read ({select_1} for ten SELECT 1 on a plain pool)"
    );
    db.drop_schema().await;
}

/// Increments the counter through `counts` (each checked); the round trips
/// PgBouncer relayed meanwhile.
async fn count_to(bouncer: &PgBouncer, c: &mut Client, counts: std::ops::Range<u64>) -> i64 {
    let trips = bouncer.round_trips().await;
    for n in counts {
        assert_eq!(c.get("/counter").await.body, json!({"count": n}));
    }
    bouncer.round_trips().await - trips
}

#[tokio::test]
async fn writes_through_the_pooler_are_one_round_trip_each() {
    let bouncer = PgBouncer::start().await;
    let db = Db::new().await;
    let app = app(layer(store(&bouncer, &db, 4).await), Gate::default());
    // Warm-up: the table is prepared and the connections made.
    Client::new(app.clone()).get("/counter").await;
    let trips = bouncer.round_trips().await;
    let mut c = Client::new(app.clone());
    assert_eq!(c.get("/counter").await.body, json!({"count": 1}));
    assert_eq!(
        bouncer.round_trips().await - trips,
        1,
        "a new session is its insert"
    );
    let writes = count_to(&bouncer, &mut c, 2..12).await;
    assert_eq!(writes, 20, "a write is its load and its update");
    db.drop_schema().await;
}

#[tokio::test]
async fn hostile_values_written_through_the_pooler_come_back_as_written() {
    let bouncer = PgBouncer::start().await;
    let db = Db::new().await;
    let app = app(layer(store(&bouncer, &db, 4).await), Gate::default());
    let mut c = Client::new(app);
    let hostile = [
        json!("'; DROP TABLE session; --"),
        json!("\\' $1 $$ E'\\x00' \u{0} ünïcødé 🦀"),
        json!({"nested": ["'", "\\", "$2::xid", "NULL"]}),
    ];
    for (i, value) in hostile.iter().enumerate() {
        let r = c.put(&format!("/kv/k{i}"), value.clone()).await;
        assert_eq!(r.status, StatusCode::NO_CONTENT);
    }
    // Logged in under a hostile user id: the id column is written too.
    assert_eq!(
        c.post("/login/o'brien%5C$1").await.status,
        StatusCode::NO_CONTENT
    );
    let body = c.get("/kv").await.body;
    for (i, value) in hostile.iter().enumerate() {
        assert_eq!(body[format!("k{i}")], *value, "{}", bouncer.log());
    }
    assert_eq!(body["user"], json!("o'brien\\$1"));
    assert_eq!(
        db.user_ids().await,
        [Some("o'brien\\$1".to_owned())],
        "one row, the table intact"
    );
    db.drop_schema().await;
}

#[tokio::test]
async fn a_user_id_with_a_nul_is_refused_before_the_pooler_sees_it() {
    let bouncer = PgBouncer::start().await;
    let db = Db::new().await;
    let app = app(layer(store(&bouncer, &db, 4).await), Gate::default());
    a_nul_user_id_is_refused(app, &db).await;
    db.drop_schema().await;
}

#[tokio::test]
async fn a_row_locked_elsewhere_past_the_timeout_gets_a_clean_503_within_the_bound() {
    let bouncer = PgBouncer::start().await;
    let db = Db::new().await;
    let bound = Duration::from_millis(800);
    let config = db.config().with_pooler(Pooler::Transaction);
    let store = PgStore::new(bouncer.pool_waiting(4, bound).await, config)
        .await
        .unwrap();
    let name = bouncer.application_name();
    a_locked_row_is_waited_for_within_the_bound(store, &db, &name, bound).await;
    db.drop_schema().await;
}

/// A store straight on Postgres (no transaction pooler), counted by
/// PgBouncer in session mode, which relays each client's round trips as
/// they are.
async fn counted_store(bouncer: &PgBouncer, db: &Db, size: u32, config: PgStoreConfig) -> PgStore {
    db.store().await;
    let pool = PgPoolOptions::new()
        .max_connections(size)
        .acquire_timeout(Duration::from_secs(5))
        .test_before_acquire(false)
        .connect(&bouncer.url())
        .await
        .unwrap();
    PgStore::new(pool, config).await.unwrap()
}

#[tokio::test]
async fn a_read_is_one_round_trip_and_a_write_two() {
    let bouncer = PgBouncer::start_in_session_mode().await;
    let db = Db::new().await;
    let store = counted_store(&bouncer, &db, 4, db.config()).await;
    let mut c = Client::new(app(layer(store), Gate::default()));
    // The statements are prepared on the connection by the first of each.
    for _ in 0..3 {
        c.get("/counter").await;
        c.get("/peek").await;
    }
    let trips = bouncer.round_trips().await;
    for _ in 0..10 {
        assert_eq!(c.get("/peek").await.body, json!({"count": 3}));
    }
    let reads = bouncer.round_trips().await - trips;
    assert_eq!(reads, 10, "one round trip per read");
    let writes = count_to(&bouncer, &mut c, 4..14).await;
    assert_eq!(writes, 20, "a write is its load and its update");
    db.drop_schema().await;
}

#[tokio::test]
async fn kept_connections_leave_the_rest_of_a_shared_pool_to_the_app() {
    let bouncer = PgBouncer::start_in_session_mode().await;
    let db = Db::new().await;
    let store = counted_store(&bouncer, &db, 4, db.config()).await;
    let pool = store.pool().clone();
    let app = app(layer(store), Gate::default());
    let busy = |n: usize| {
        let app = app.clone();
        async move {
            let tasks: Vec<_> = (0..n)
                .map(|_| {
                    let mut c = Client::new(app.clone());
                    tokio::spawn(async move { c.get("/counter").await.status })
                })
                .collect();
            for t in tasks {
                assert_eq!(t.await.unwrap(), StatusCode::OK);
            }
        }
    };
    busy(32).await;
    // The store keeps at most half the pool: the app's own queries get the
    // other half at once.
    let mut held = Vec::new();
    for _ in 0..2 {
        let conn = tokio::time::timeout(Duration::from_secs(1), pool.acquire()).await;
        held.push(conn.expect("a connection for the app within 1 s").unwrap());
    }
    // Meanwhile the store serves from what it keeps, or what is left.
    busy(8).await;
    drop(held);
    // After a quiet second, the next statement sends what was kept back to
    // the pool (which checks each) and keeps only its own.
    tokio::time::sleep(Duration::from_millis(1_100)).await;
    busy(1).await;
    eventually("all but one connection idle in the pool", || async {
        pool.size() as usize - pool.num_idle() == 1
    })
    .await;
    db.drop_schema().await;
}

#[tokio::test]
async fn with_none_kept_each_connection_goes_back_with_its_ping() {
    let bouncer = PgBouncer::start_in_session_mode().await;
    let db = Db::new().await;
    let config = db.config().with_kept_connections(0);
    // One connection, so that the warm-up prepares every statement on it.
    let store = counted_store(&bouncer, &db, 1, config).await;
    let pool = store.pool().clone();
    let mut c = Client::new(app(layer(store), Gate::default()));
    for _ in 0..3 {
        c.get("/counter").await;
        c.get("/peek").await;
    }
    let trips = bouncer.round_trips().await;
    for _ in 0..10 {
        assert_eq!(c.get("/peek").await.body, json!({"count": 3}));
    }
    eventually("every connection back in the pool", || async {
        pool.size() as usize == pool.num_idle()
    })
    .await;
    let reads = bouncer.round_trips().await - trips;
    assert_eq!(reads, 20, "the read, then sqlx's ping as it goes back");
    db.drop_schema().await;
}

#[tokio::test]
async fn kept_connections_killed_while_idle_cost_no_request() {
    let db = Db::new().await;
    let (name, store) = db.named_store(4).await;
    let app = app(layer(store), Gate::default());
    let mut c = Client::new(app.clone());
    c.put("/kv/me", json!(1)).await;
    // Two requests at once: two connections, both kept afterwards.
    let mut d = Client::new(app.clone());
    let (a, b) = tokio::join!(c.get("/kv"), d.get("/kv"));
    assert_eq!((a.status, b.status), (StatusCode::OK, StatusCode::OK));
    let killed = db.kill_backends(&name).await;
    assert!(
        !killed.is_empty() && killed.iter().all(|k| *k),
        "{killed:?}"
    );
    for _ in 0..3 {
        let r = c.get("/kv").await;
        assert_eq!(r.status, StatusCode::OK);
        assert_eq!(r.body, json!({"me": 1}));
    }
    assert_eq!(
        c.put("/kv/me", json!(2)).await.status,
        StatusCode::NO_CONTENT
    );
    assert_eq!(c.get("/kv").await.body, json!({"me": 2}));
    db.drop_schema().await;
}

/// The text loads leave the expiry check to the store: an expired row is
/// read, then dropped, alone or among others in a shared load.
#[tokio::test]
async fn expired_sessions_read_through_the_pooler_are_not_loaded() {
    let bouncer = PgBouncer::start().await;
    let db = Db::new().await;
    let config = db
        .config()
        .with_pooler(Pooler::Transaction)
        .with_load_concurrency(1)
        .unwrap();
    let store = PgStore::new(bouncer.pool(8).await, config).await.unwrap();
    let app = app(layer(store), Gate::default());
    let mut clients = Vec::new();
    for _ in 0..16 {
        let mut c = Client::new(app.clone());
        assert_eq!(c.get("/counter").await.body, json!({"count": 1}));
        clients.push(c);
    }
    // Every other session expired a second ago.
    sqlx::query(&format!(
        "UPDATE {t} SET expire = now() - interval '1 second' WHERE sid IN \
         (SELECT sid FROM {t} ORDER BY created_at LIMIT 8 OFFSET 0)",
        t = db.table()
    ))
    .execute(&db.pool)
    .await
    .unwrap();
    let expired: Vec<String> = sqlx::query_scalar(&format!(
        "SELECT sid FROM {} WHERE expire < now()",
        db.table()
    ))
    .fetch_all(&db.pool)
    .await
    .unwrap();
    assert_eq!(expired.len(), 8);
    let want = [[0; 8], [1; 8]].concat();
    // One at a time: each a lone load, one statement even when expired
    // (not also the statement that extends rows due).
    let before = db.statements().await;
    let mut seen = Vec::new();
    for c in &mut clients {
        seen.push(c.get("/peek").await.body["count"].as_u64().unwrap());
    }
    assert_eq!(db.statements().await - before, 16, "one statement each");
    seen.sort_unstable();
    assert_eq!(seen, want, "lone loads");
    // All at once: with one slot, the loads queue and share statements.
    let tasks: Vec<_> = clients
        .iter()
        .cloned()
        .map(|mut c| tokio::spawn(async move { c.get("/peek").await.body }))
        .collect();
    let mut seen = Vec::new();
    for t in tasks {
        seen.push(t.await.unwrap()["count"].as_u64().unwrap());
    }
    seen.sort_unstable();
    assert_eq!(seen, want, "shared loads\n{}", bouncer.log());
    db.drop_schema().await;
}

#[tokio::test]
async fn concurrent_requests_share_statements_and_each_gets_its_own_session() {
    let bouncer = PgBouncer::start().await;
    let db = Db::new().await;
    let app = app(layer(store(&bouncer, &db, 16).await), Gate::default());
    let mut clients = Vec::new();
    for _ in 0..64 {
        let mut c = Client::new(app.clone());
        assert_eq!(c.get("/counter").await.body, json!({"count": 1}));
        clients.push(c);
    }
    let before = db.statements().await;
    let rounds = 8;
    for round in 2..2 + rounds {
        let tasks: Vec<_> = clients
            .iter()
            .cloned()
            .map(|mut c| {
                tokio::spawn(async move {
                    let r = c.get("/counter").await;
                    (r.status, r.body, c)
                })
            })
            .collect();
        clients.clear();
        for t in tasks {
            let (status, body, c) = t.await.unwrap();
            assert_eq!(status, StatusCode::OK, "{body}\n{}", bouncer.log());
            assert_eq!(body, json!({"count": round}));
            clients.push(c);
        }
    }
    let requests = 64 * rounds;
    let statements = db.statements().await - before;
    assert!(
        statements < 2 * requests,
        "{statements} statements for {requests} loads and saves: shared"
    );
    db.drop_schema().await;
}

#[tokio::test]
async fn requests_cancelled_at_any_point_leave_no_transaction_open() {
    use rand::Rng;
    let bouncer = PgBouncer::start().await;
    let db = Db::new().await;
    let app = app(layer(store(&bouncer, &db, 8).await), Gate::default());
    // New sessions: their INSERT runs in the request's own future, so a
    // timeout drops it at whatever await point it has reached (BEGIN, the
    // statement, COMMIT).
    for _ in 0..300 {
        let mut c = Client::new(app.clone());
        let after = Duration::from_micros(rand::thread_rng().gen_range(0..4_000));
        let _ = tokio::time::timeout(after, c.get("/counter")).await;
    }
    let open = || async {
        sqlx::query_scalar::<_, i64>(
            "SELECT count(*) FROM pg_stat_activity \
             WHERE application_name = $1 AND state LIKE 'idle in transaction%'",
        )
        .bind(bouncer.application_name())
        .fetch_one(&db.pool)
        .await
        .unwrap()
    };
    eventually("no transaction left open", || async { open().await == 0 }).await;
    // PgBouncer's two server connections are free for everyone.
    let tasks: Vec<_> = (0..20)
        .map(|_| {
            let mut c = Client::new(app.clone());
            tokio::spawn(async move {
                let first = c.get("/counter").await;
                (first.status, c.get("/counter").await.body)
            })
        })
        .collect();
    for t in tasks {
        let (status, body) = tokio::time::timeout(Duration::from_secs(10), t)
            .await
            .expect("no request waits for a server connection held by a cancelled one")
            .unwrap();
        assert_eq!(status, StatusCode::OK);
        assert_eq!(body, json!({"count": 2}));
    }
    db.drop_schema().await;
}

/// Lone reads (one simple-protocol query, no transaction) dropped at any
/// point leave their connection fit for the next request: on a pool of one
/// connection, every later answer is the row's own, and writes still land
/// once each.
#[tokio::test]
async fn lone_reads_cancelled_at_any_point_leave_the_connection_in_step() {
    use rand::Rng;
    let bouncer = PgBouncer::start().await;
    let db = Db::new().await;
    let app = app(layer(store(&bouncer, &db, 1).await), Gate::default());
    let mut c = Client::new(app.clone());
    c.put("/kv/name", json!("ada")).await;
    for _ in 0..200 {
        let mut dropped = c.clone();
        let after = Duration::from_micros(rand::thread_rng().gen_range(0..2_000));
        let _ = tokio::time::timeout(after, dropped.get("/peek")).await;
        // The next read on the one connection gets its own answer.
        let r = c.get("/kv").await;
        assert_eq!(r.status, StatusCode::OK);
        assert_eq!(r.body, json!({"name": "ada"}), "{}", bouncer.log());
    }
    assert_eq!(c.get("/counter").await.body, json!({"count": 1}));
    assert_eq!(c.get("/counter").await.body, json!({"count": 2}));
    assert_eq!(db.only_sess().await["name"], json!("ada"));
    db.drop_schema().await;
}

async fn fill_expired(db: &Db, n: i64) {
    sqlx::query(&format!(
        "INSERT INTO {} (sid, sess, expire) SELECT 'expired' || g, '{{}}', \
         (now() AT TIME ZONE 'UTC') - interval '1 hour' - (g % 1000) * interval '1 millisecond' \
         FROM generate_series(1, $1) g",
        db.table()
    ))
    .bind(n)
    .execute(&db.pool)
    .await
    .unwrap();
}

/// Advisory locks on `key` held by any backend.
async fn holders(db: &Db, key: i64) -> i64 {
    sqlx::query_scalar(
        "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted \
         AND ((classid::int8 << 32) | objid::int8) = $1",
    )
    .bind(key)
    .fetch_one(&db.pool)
    .await
    .unwrap()
}

#[tokio::test]
async fn two_instances_prune_one_at_a_time_and_leave_no_lock_behind() {
    let bouncer = PgBouncer::start().await;
    let db = Db::new().await;
    let (a, b) = (store(&bouncer, &db, 4).await, store(&bouncer, &db, 4).await);
    let key = a.prune_lock_id();
    fill_expired(&db, 3_000).await;
    let config = PruneConfig::new()
        .with_batch_size(50)
        .with_busy_fraction(0.25);
    let run = |s: PgStore| {
        let config = config.clone();
        tokio::spawn(async move { s.prune_expired_with(&config, |_| ()).await })
    };
    let (first, second) = (run(a.clone()), run(b.clone()));
    // While one runs, the lock is held (between its batches too), and by
    // one backend only.
    eventually("a run to take the lock", || async {
        holders(&db, key).await == 1
    })
    .await;
    assert!(!first.is_finished() || !second.is_finished());
    let mut outcomes = vec![
        first.await.unwrap().unwrap(),
        second.await.unwrap().unwrap(),
    ];
    outcomes.sort_by_key(|o| format!("{o:?}"));
    assert_eq!(
        outcomes,
        vec![PruneOutcome::Pruned(3_000), PruneOutcome::Skipped]
    );
    assert_eq!(db.rows().await, 0);
    assert_eq!(holders(&db, key).await, 0, "the lock went with the run");

    // A run cancelled midway leaves no lock either, and the other instance
    // prunes next.
    fill_expired(&db, 3_000).await;
    let slow = PruneConfig::new()
        .with_batch_size(10)
        .with_busy_fraction(0.1);
    let cancelled = tokio::spawn({
        let a = a.clone();
        async move { a.prune_expired_with(&slow, |_| ()).await }
    });
    eventually("the first run to take the lock", || async {
        holders(&db, key).await == 1
    })
    .await;
    assert_eq!(
        b.prune_expired(100).await.unwrap(),
        PruneOutcome::Skipped,
        "one instance at a time"
    );
    cancelled.abort();
    eventually("the lock to go with the cancelled run", || async {
        holders(&db, key).await == 0
    })
    .await;
    assert!(matches!(
        b.prune_expired(100).await.unwrap(),
        PruneOutcome::Pruned(n) if n > 0
    ));
    assert_eq!(db.rows().await, 0);
    db.drop_schema().await;
}

#[tokio::test]
async fn a_prune_that_loses_its_lock_stops() {
    let bouncer = PgBouncer::start().await;
    let db = Db::new().await;
    let store = store(&bouncer, &db, 4).await;
    let key = store.prune_lock_id();
    fill_expired(&db, 2_000).await;
    let slow = PruneConfig::new()
        .with_batch_size(10)
        .with_busy_fraction(0.1);
    let run = tokio::spawn({
        let store = store.clone();
        async move { store.prune_expired_with(&slow, |_| ()).await }
    });
    eventually("the run to take the lock", || async {
        holders(&db, key).await == 1
    })
    .await;
    // An idle-transaction timeout, a failover: the lock's backend goes.
    let ended: bool = sqlx::query_scalar(
        "SELECT pg_terminate_backend(pid) FROM pg_locks WHERE locktype = 'advisory' \
         AND ((classid::int8 << 32) | objid::int8) = $1",
    )
    .bind(key)
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert!(ended);
    let outcome = tokio::time::timeout(Duration::from_secs(10), run)
        .await
        .expect("the run stops at its next batch")
        .unwrap();
    assert!(outcome.is_err(), "{outcome:?}");
    assert!(db.rows().await > 0, "it did not go on without the lock");
    db.drop_schema().await;
}

#[tokio::test]
async fn an_instance_connected_directly_and_one_through_the_pooler_exclude_each_other() {
    let bouncer = PgBouncer::start().await;
    let db = Db::new().await;
    let pooled = store(&bouncer, &db, 2).await;
    fill_expired(&db, 10).await;
    let mut other = db.pool.acquire().await.unwrap();
    sqlx::query("SELECT pg_advisory_lock($1)")
        .bind(pooled.prune_lock_id())
        .execute(&mut *other)
        .await
        .unwrap();
    assert_eq!(
        pooled.prune_expired(5).await.unwrap(),
        PruneOutcome::Skipped
    );
    assert_eq!(db.rows().await, 10);
    sqlx::query("SELECT pg_advisory_unlock($1)")
        .bind(pooled.prune_lock_id())
        .execute(&mut *other)
        .await
        .unwrap();
    assert_eq!(
        pooled.prune_expired(3).await.unwrap(),
        PruneOutcome::Pruned(10)
    );
    db.drop_schema().await;
}

async fn login(app: &axum::Router, user: &str, agent: &str, ip: &str) -> Client {
    let mut c = Client::new(app.clone());
    let req = Request::post(format!("/login/{user}"))
        .header(header::USER_AGENT, agent)
        .header("x-forwarded-for", ip)
        .body(axum::body::Body::empty())
        .unwrap();
    let r = app.clone().oneshot(req).await.unwrap();
    assert_eq!(r.status(), StatusCode::NO_CONTENT);
    let sc = r.headers()[header::SET_COOKIE].to_str().unwrap();
    let value = sc.split(';').next().unwrap().split_once('=').unwrap().1;
    c.cookie = Some(value.to_owned());
    c
}

#[tokio::test]
async fn administration() {
    let bouncer = PgBouncer::start().await;
    let db = Db::new().await;
    let store = store(&bouncer, &db, 4).await;
    let layer = SessionLayer::builder(store.clone(), SigningKeys::new([KEY_A]).unwrap())
        .with_insecure_http_cookie()
        .with_client_info(Some(HeaderName::from_static("x-forwarded-for")))
        .build()
        .unwrap();
    let app = app(layer, Gate::default());
    let mut laptop = login(&app, "alice", "Firefox", "192.0.2.1").await;
    let mut phone = login(&app, "alice", "Safari", "192.0.2.2").await;
    login(&app, "bob", "curl", "192.0.2.3").await;
    let admin = store.admin();
    let list = admin.user_sessions("alice").await.unwrap();
    assert_eq!(list.len(), 2);
    assert_eq!(list[0].user_agent.as_deref(), Some("Firefox"));
    assert_eq!(
        admin.export_user("alice").await.unwrap()["sessions"]
            .as_array()
            .unwrap()
            .len(),
        2
    );
    let keep = list[0].handle.clone();
    assert_eq!(admin.revoke_others("alice", &keep).await.unwrap(), 1);
    assert_eq!(phone.get("/kv").await.body, json!({}));
    assert_eq!(laptop.get("/kv").await.body, json!({"user": "alice"}));
    assert!(admin.revoke_session("alice", &keep).await.unwrap());
    let stats = admin.stats().await.unwrap();
    assert_eq!((stats.active, stats.expired_awaiting_prune), (1, 0));
    assert!(stats.table_bytes > 0);
    assert_eq!(admin.revoke_user("bob").await.unwrap(), 1);
    login(&app, "carol", "x", "192.0.2.4").await;
    assert_eq!(admin.revoke_all().await.unwrap(), 1);
    assert_eq!(db.rows().await, 0);
    db.drop_schema().await;
}

#[tokio::test]
async fn concurrent_new_sessions_share_inserts_and_each_gets_its_own_row() {
    let bouncer = PgBouncer::start().await;
    let db = Db::new().await;
    let app = app(layer(store(&bouncer, &db, 16).await), Gate::default());
    let before = db.statements().await;
    let tasks: Vec<_> = (0..64)
        .map(|_| {
            let mut c = Client::new(app.clone());
            tokio::spawn(async move { (c.get("/counter").await, c) })
        })
        .collect();
    let mut cookies = std::collections::HashSet::new();
    for t in tasks {
        let (r, c) = t.await.unwrap();
        assert_eq!(r.status, StatusCode::OK, "{}\n{}", r.body, bouncer.log());
        assert_eq!(r.body, json!({"count": 1}));
        assert!(cookies.insert(c.cookie.unwrap()), "a session of its own");
    }
    let statements = db.statements().await - before;
    assert_eq!(db.rows().await, 64, "one row per new session");
    assert!(
        statements < 64,
        "{statements} statements for 64 inserts: shared"
    );
    db.drop_schema().await;
}
