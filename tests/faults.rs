//! Faults: connections that break under a save, rows locked elsewhere for
//! too long, an exhausted pool, a database server that restarts under load.
//! Requests answer 200 or the unavailable status within the configured
//! bound, the service recovers by itself, and no acknowledged write is lost.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::{Duration, Instant};

use axum::http::StatusCode;
use common::{cluster::Cluster, demo_bin, *};
use serde_json::json;
use sqlx::postgres::PgPoolOptions;
use tower_pg_session::PgStore;

/// A store on its own pool of `size`, which waits `wait` at most for a
/// connection (or a row lock), its connections named for the test.
async fn bounded_store(db: &Db, size: u32, wait: Duration) -> (String, PgStore) {
    db.store().await;
    let name = format!("{}_faults", db.schema);
    let options: sqlx::postgres::PgConnectOptions = database_url().parse().unwrap();
    let pool = PgPoolOptions::new()
        .max_connections(size)
        .acquire_timeout(wait)
        .test_before_acquire(false)
        .connect_with(options.application_name(&name))
        .await
        .unwrap();
    (name, PgStore::new(pool, db.config()).await.unwrap())
}

#[tokio::test]
async fn a_save_on_a_connection_that_died_while_idle_is_retried() {
    let db = Db::new().await;
    let (name, store) = bounded_store(&db, 1, Duration::from_secs(2)).await;
    let gate = Gate::default();
    let mut c = Client::new(app(layer(store), gate.clone()));
    c.put("/kv/me", json!(1)).await;

    // Loaded; the one pooled connection dies before the save.
    let mut slow = c.clone();
    let request = tokio::spawn(async move { slow.put("/slow/later", json!(null)).await });
    gate.entered.notified().await;
    assert_eq!(db.kill_backends(&name).await.len(), 1);
    gate.release.notify_one();
    let r = request.await.unwrap();
    assert_eq!(r.status, StatusCode::NO_CONTENT);
    assert_eq!(c.get("/kv").await.body, json!({"me": 1, "later": true}));
    db.drop_schema().await;
}

#[tokio::test]
async fn a_row_locked_elsewhere_past_the_timeout_gets_a_clean_503_within_the_bound() {
    let db = Db::new().await;
    let bound = Duration::from_millis(800);
    let (name, store) = bounded_store(&db, 2, bound).await;
    a_locked_row_is_waited_for_within_the_bound(store, &db, &name, bound).await;
    db.drop_schema().await;
}

/// A request whose load waited most of the bound for a connection gets only
/// the rest for its save: its database waits together stay within the
/// acquire timeout, instead of one full timeout each.
#[tokio::test]
async fn a_request_waiting_for_its_load_and_its_save_answers_within_one_bound() {
    let db = Db::new().await;
    let bound = Duration::from_millis(1500);
    let (name, store) = bounded_store(&db, 1, bound).await;
    let pool = store.pool().clone();
    let mut c = Client::new(app(layer(store), Gate::default()));
    c.put("/kv/me", json!(1)).await;

    // The save will wait for this row lock; the load does not (it skips
    // locked rows), but first waits for the pool's one connection.
    let tx = db.lock_rows().await;
    let held = pool.acquire().await.unwrap();
    let started = Instant::now();
    let mut client = c.clone();
    let request = tokio::spawn(async move { client.put("/kv/x", json!(2)).await });
    tokio::time::sleep(bound.mul_f64(0.8)).await;
    drop(held);
    let r = tokio::time::timeout(Duration::from_secs(10), request)
        .await
        .expect("the request still waits after 10 s")
        .unwrap();
    let took = started.elapsed();
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(r.set_cookie().is_none(), "cookie left alone");
    // One wait for the load's connection and another for the save's row
    // would take 1.8 bounds.
    assert!(
        took < bound + Duration::from_millis(600),
        "answered after {took:?}"
    );
    // The statement the save had sent gives up on the row by itself.
    until_idle(&db, &name).await;
    release_and_write(&mut c, tx).await;
    db.drop_schema().await;
}

/// An application shutting down closes its pool. The connections the store
/// keeps between statements go back to it at once and are closed with the
/// rest, rather than when the store's sweep next finds them idle (every
/// second): none outlives the close on the server.
#[tokio::test]
async fn closing_the_pool_closes_the_connections_the_store_keeps_at_once() {
    let db = Db::new().await;
    let (name, store) = bounded_store(&db, 4, Duration::from_secs(2)).await;
    let pool = store.pool().clone();
    let mut c = Client::new(app(layer(store), Gate::default()));
    c.put("/kv/me", json!(1)).await;
    assert_eq!(c.get("/kv").await.body, json!({"me": 1}));
    assert!(
        pool.num_idle() < pool.size() as usize,
        "the store keeps a connection: {} idle of {}",
        pool.num_idle(),
        pool.size()
    );

    let started = Instant::now();
    tokio::time::timeout(Duration::from_secs(10), pool.close())
        .await
        .expect("the pool still closing after 10 s");
    // Its server connections end with it (a backend leaves the server's
    // view a moment after its client's goodbye), the kept one included.
    while connections(&db, &name, false).await > 0 {
        let took = started.elapsed();
        assert!(
            took < Duration::from_millis(500),
            "still open after {took:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // A store whose pool is closed answers as one whose database is down.
    assert_eq!(c.get("/kv").await.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(pool.size(), 0, "and keeps nothing");
    assert_eq!(
        db.only_sess().await,
        json!({"me": 1}),
        "the stored session intact"
    );
    db.drop_schema().await;
}

#[tokio::test]
async fn an_exhausted_pool_answers_503_after_the_bound_and_recovers() {
    let db = Db::new().await;
    let bound = Duration::from_millis(500);
    let (_, store) = bounded_store(&db, 2, bound).await;
    let pool = store.pool().clone();
    let mut c = Client::new(app(layer(store), Gate::default()));
    c.put("/kv/me", json!(1)).await;

    // The connection the store kept goes back to the pool after a quiet
    // second; then the pool is all held elsewhere.
    eventually("the kept connection back in the pool", || async {
        pool.num_idle() == pool.size() as usize
    })
    .await;
    let held = (pool.acquire().await.unwrap(), pool.acquire().await.unwrap());
    let tasks: Vec<_> = (0..8)
        .map(|i| {
            let mut c = c.clone();
            tokio::spawn(async move {
                let started = Instant::now();
                let r = c.put(&format!("/kv/k{i}"), json!(i)).await;
                (r.status, started.elapsed())
            })
        })
        .collect();
    for t in tasks {
        let (status, took) = t.await.unwrap();
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert!(took >= bound && took < bound * 3, "answered after {took:?}");
    }
    drop(held);
    assert_eq!(
        c.get("/kv").await.body,
        json!({"me": 1}),
        "recovered, nothing written"
    );
    let tasks: Vec<_> = (0..8)
        .map(|i| {
            let mut c = c.clone();
            tokio::spawn(async move { c.put(&format!("/kv/k{i}"), json!(i)).await.status })
        })
        .collect();
    for t in tasks {
        assert_eq!(t.await.unwrap(), StatusCode::NO_CONTENT);
    }
    assert_eq!(c.get("/kv").await.body.as_object().unwrap().len(), 9);
    db.drop_schema().await;
}

/// What one client of a load saw.
#[derive(Default)]
struct Seen {
    ok: u64,
    unavailable: u64,
    unexpected: Vec<StatusCode>,
    /// Counter values acknowledged with a 200, with when.
    acked: Vec<(Instant, u64)>,
    slowest: Duration,
}

/// One client incrementing its counter, one request after another, until
/// `stop` turns true.
async fn count_until(mut c: Client, stop: tokio::sync::watch::Receiver<bool>) -> (Client, Seen) {
    let mut seen = Seen::default();
    while !*stop.borrow() {
        let started = Instant::now();
        let r = c.get("/counter").await;
        seen.slowest = seen.slowest.max(started.elapsed());
        match r.status {
            StatusCode::OK => {
                seen.ok += 1;
                seen.acked
                    .push((Instant::now(), r.body["count"].as_u64().unwrap()));
            }
            StatusCode::SERVICE_UNAVAILABLE => {
                seen.unavailable += 1;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            other => seen.unexpected.push(other),
        }
    }
    (c, seen)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_restart_and_outage_under_load_lose_no_acknowledged_write() {
    let cluster = Cluster::new(None, &[]);
    let bound = Duration::from_secs(2);
    let pool = PgPoolOptions::new()
        .max_connections(4)
        .acquire_timeout(bound)
        .test_before_acquire(false)
        .connect(&cluster.url("postgres"))
        .await
        .unwrap();
    let store = PgStore::new(pool, tower_pg_session::PgStoreConfig::new())
        .await
        .unwrap();
    let app = app(layer(store), Gate::default());
    let mut clients = Vec::new();
    for _ in 0..6 {
        let mut c = Client::new(app.clone());
        assert_eq!(c.get("/counter").await.body, json!({"count": 1}));
        clients.push(c);
    }
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let runs: Vec<_> = clients
        .into_iter()
        .map(|c| tokio::spawn(count_until(c, stopped.clone())))
        .collect();

    tokio::time::sleep(Duration::from_secs(1)).await;
    let cluster = tokio::task::spawn_blocking(move || {
        cluster.restart_fast();
        cluster
    })
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let cluster = tokio::task::spawn_blocking(move || {
        cluster.stop();
        std::thread::sleep(Duration::from_secs(5));
        cluster.start();
        cluster
    })
    .await
    .unwrap();
    let back = Instant::now();
    tokio::time::sleep(Duration::from_secs(3)).await;
    stop.send_replace(true);

    let mut recovered = Duration::ZERO;
    for (i, run) in runs.into_iter().enumerate() {
        let (mut c, seen) = run.await.unwrap();
        assert!(
            seen.unexpected.is_empty(),
            "client {i}: {:?}",
            seen.unexpected
        );
        assert!(seen.unavailable > 0, "client {i} saw the outage");
        // A request's database waits (its load's connection, its save's)
        // share one acquire timeout.
        assert!(
            seen.slowest < bound + Duration::from_millis(1500),
            "client {i}: a request took {:?}",
            seen.slowest
        );
        let mut last = 1;
        for &(_, n) in &seen.acked {
            assert!(n > last, "client {i}: acknowledged {n} after {last}");
            last = n;
        }
        let first_after = seen
            .acked
            .iter()
            .find(|(at, _)| *at >= back)
            .map(|(at, _)| *at - back)
            .unwrap_or_else(|| panic!("client {i} never recovered"));
        recovered = recovered.max(first_after);
        let stored = c.get("/counter").await.body["count"].as_u64().unwrap();
        assert!(
            stored > last,
            "client {i}: {last} was acknowledged, {stored} stored"
        );
    }
    eprintln!("every client recovered {recovered:?} after the server was back");
    assert!(recovered < Duration::from_secs(3));
    drop(cluster);
}

/// A provider that answers too slowly fails the login callback that needs
/// it with 502 within the HTTP timeout; users whose tokens are still valid
/// carry on while their refresh fails, and the refresh succeeds on a later
/// request once the provider is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_provider_fails_only_what_needs_it_and_the_refresh_is_retried() {
    use common::idp::{setup, Browser};
    // Tokens live 60 s and are due for refresh 2 s after they are issued;
    // each call to the provider gets 1 s.
    let s = setup("keycloak", 1, 60, |c| {
        c.with_refresh_before(Duration::from_secs(58))
            .with_http_timeout(Duration::from_secs(1))
    })
    .await;
    let app = s.apps[0].url.clone();
    let (ann, bob) = (Browser::new(), Browser::new());
    ann.login(&app, "ann", "/me").await;
    bob.login(&app, "bob", "/me").await;
    let cat = Browser::new();
    let auth = cat.start_login(&app, "/").await;
    let callback = cat.authorize(&auth, "cat").await;
    tokio::time::sleep(Duration::from_millis(2500)).await;

    s.idp.set_delay(3000).await;
    let started = Instant::now();
    let r = cat.api(&callback).await;
    assert_eq!(r.status(), StatusCode::BAD_GATEWAY);
    assert!(
        started.elapsed() < Duration::from_millis(2500),
        "{:?}",
        started.elapsed()
    );
    for (who, b) in [("ann", &ann), ("bob", &bob)] {
        let started = Instant::now();
        let r = b.me(&app).await;
        assert_eq!(
            r.status(),
            StatusCode::OK,
            "{who}: the token is still valid"
        );
        assert!(
            started.elapsed() < Duration::from_millis(2500),
            "{who}: {:?}",
            started.elapsed()
        );
    }

    s.idp.set_delay(0).await;
    // The provider finishes what it was asked meanwhile.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let before = s.idp.stats().await["refresh_token"].as_u64().unwrap();
    for (who, b) in [("ann", &ann), ("bob", &bob)] {
        let r = b.me(&app).await;
        assert_eq!(r.status(), StatusCode::OK, "{who}");
        let me: serde_json::Value = r.json().await.unwrap();
        assert_eq!(me["sub"], who);
    }
    let after = s.idp.stats().await["refresh_token"].as_u64().unwrap();
    assert_eq!(after - before, 2, "each refresh retried once, and done");
    s.db.drop_schema().await;
}

/// A request dropped while its token refresh is at the provider: the
/// refresh still lands, so the provider's new tokens are kept (a provider
/// that rotates refresh tokens has already retired the old one) and the next
/// request does not refresh again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refresh_whose_request_is_dropped_still_lands() {
    use common::idp::{setup, Browser};
    // Tokens live 60 s and are due for refresh 2 s after they are issued.
    let s = setup("keycloak", 1, 60, |c| {
        c.with_refresh_before(Duration::from_secs(58))
    })
    .await;
    let app = s.apps[0].url.clone();
    let dan = Browser::new();
    dan.login(&app, "dan", "/me").await;
    tokio::time::sleep(Duration::from_millis(2500)).await;

    s.idp.set_delay_after_reading(1500).await;
    let before = s.idp.stats().await["refresh_token"].as_u64().unwrap();
    let dropped = dan
        .http
        .get(format!("{app}/me"))
        .header("x-test-deadline-ms", "300")
        .send()
        .await
        .unwrap();
    assert_eq!(
        dropped.status(),
        StatusCode::GATEWAY_TIMEOUT,
        "dropped mid-refresh"
    );
    s.idp.set_delay(0).await;
    // The provider carries out the refresh no request waits for any more;
    // its new token is due 2 s later, so the next request must not refresh.
    let deadline = Instant::now() + Duration::from_secs(5);
    while s.idp.stats().await["refresh_token"].as_u64().unwrap() == before {
        assert!(
            Instant::now() < deadline,
            "the provider never saw the refresh"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let r = dan.me(&app).await;
    assert_eq!(r.status(), StatusCode::OK);
    let after = s.idp.stats().await["refresh_token"].as_u64().unwrap();
    assert_eq!(after - before, 1, "the dropped request's refresh was kept");
    s.db.drop_schema().await;
}

/// An instance killed with SIGKILL in the middle of saves of large values:
/// every row another instance reads afterwards is a whole session, holding
/// at least each value acknowledged before the kill.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_instance_leaves_nothing_half_written() {
    let db = Db::new().await;
    let url = db.schema_url().await;
    let (mut victim, survivor) = (demo_bin::demo(&url, 4).await, demo_bin::demo(&url, 4).await);
    let pad = "x".repeat(30_000);
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let runs: Vec<_> = (0..8)
        .map(|_| {
            let (target, pad, stopped) = (victim.url.clone(), pad.clone(), stopped.clone());
            tokio::spawn(async move {
                let http = reqwest::Client::builder()
                    .cookie_store(true)
                    .build()
                    .unwrap();
                let mut acked = 0;
                for n in 1.. {
                    if *stopped.borrow() {
                        break;
                    }
                    let sent = http
                        .put(format!("{target}/kv/blob"))
                        .json(&json!({"n": n, "pad": pad}))
                        .send()
                        .await;
                    match sent {
                        Ok(r) if r.status() == StatusCode::NO_CONTENT => acked = n,
                        _ => break,
                    }
                }
                (http, acked)
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_secs(1)).await;
    victim.child.start_kill().unwrap();
    stop.send_replace(true);
    for run in runs {
        let (http, acked) = run.await.unwrap();
        assert!(acked > 0, "the client saved before the kill");
        let kv: serde_json::Value = http
            .get(format!("{}/kv", survivor.url))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert!(kv["blob"]["n"].as_u64().unwrap() >= acked);
        assert_eq!(kv["blob"]["pad"].as_str().map(str::len), Some(30_000));
    }
    let rows: Vec<serde_json::Value> =
        sqlx::query_scalar(&format!("SELECT sess::jsonb FROM {}", db.table()))
            .fetch_all(&db.pool)
            .await
            .unwrap();
    assert!(rows.len() >= 8);
    for sess in rows {
        assert_eq!(sess["blob"]["pad"].as_str().map(str::len), Some(30_000));
    }
    drop((victim, survivor));
    db.drop_schema().await;
}
