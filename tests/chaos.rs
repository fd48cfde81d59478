//! Faults against the demo binary, measured: `bash scripts/chaos.sh` runs
//! this (it is ignored in the ordinary suite, whose `faults` and `cancel`
//! tests check the same properties in bounded time) and prints a table.
//!
//! Each scenario runs clients, one session each, incrementing their counter
//! one request after another against demo instances on a throwaway cluster,
//! injects its fault, and counts: requests, 200s, the errors the fault
//! explains (503, a request the client gave up, an instance killed),
//! anything else, acknowledged counts lost (a 200 whose count is later
//! missing, or counts going backwards), and the time from the end of the
//! fault until every client had a 200 again.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::{Duration, Instant};

use common::{cluster::Cluster, demo_bin::demo, latency::Latency};
use rand::Rng;
use serde_json::Value;
use tokio::{sync::watch, task::JoinHandle};

/// A request slower than this hangs: the demo's pool waits 5 s at most for
/// a connection (`PgStore::connect_with`), and a request's database waits
/// (its load; its save's connection and row) share that bound.
const HANG: Duration = Duration::from_secs(8);

/// How long the load runs after a fault: longer than a request may wait
/// (the demo's acquire timeout), so that a request queued behind the work
/// the fault left over shows in the recovery time rather than as "never".
const AFTER: Duration = Duration::from_secs(8);

#[derive(Default)]
struct Seen {
    requests: u64,
    ok: u64,
    expected: u64,
    unexpected: Vec<String>,
    acked: Vec<(Instant, u64)>,
    /// The slowest answered request.
    slowest: Duration,
}

/// One client alternating over `urls` until `stop`; while `faulting`, each
/// request given up after a random budget within `budget` (ms), else after
/// [`HANG`].
async fn client(
    urls: Vec<String>,
    budget: Option<(u64, u64)>,
    faulting: watch::Receiver<bool>,
    stop: watch::Receiver<bool>,
) -> (reqwest::Client, Vec<String>, Seen) {
    let http = reqwest::Client::builder()
        .cookie_store(true)
        .build()
        .unwrap();
    let mut seen = Seen::default();
    let mut i = 0;
    while !*stop.borrow() {
        i += 1;
        let url = &urls[i % urls.len()];
        // Giving up is the fault: once it ends, clients wait again.
        let budget = budget.filter(|_| *faulting.borrow());
        let timeout = match budget {
            Some((lo, hi)) => Duration::from_millis(rand::thread_rng().gen_range(lo..hi)),
            None => HANG,
        };
        seen.requests += 1;
        let started = Instant::now();
        let sent = http
            .get(format!("{url}/counter"))
            .timeout(timeout)
            .send()
            .await;
        if sent.is_ok() {
            seen.slowest = seen.slowest.max(started.elapsed());
        }
        match sent {
            Ok(r) if r.status() == 200 => match r.json::<Value>().await {
                Ok(v) => {
                    seen.ok += 1;
                    seen.acked
                        .push((Instant::now(), v["count"].as_u64().unwrap()));
                }
                Err(e) if e.is_timeout() && budget.is_some() => seen.expected += 1,
                Err(e) => seen.unexpected.push(format!("body: {e}")),
            },
            Ok(r) if r.status() == 503 => {
                seen.expected += 1;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Ok(r) => seen.unexpected.push(r.status().to_string()),
            Err(e) if e.is_timeout() && budget.is_some() => seen.expected += 1,
            Err(e) if e.is_timeout() => seen.unexpected.push("hung".into()),
            // The instance killed on purpose (the first of several).
            Err(_) if urls.len() > 1 && url == &urls[0] => seen.expected += 1,
            Err(e) => seen.unexpected.push(e.to_string()),
        }
    }
    (http, urls, seen)
}

struct Row {
    name: &'static str,
    requests: u64,
    ok: u64,
    expected: u64,
    unexpected: usize,
    lost: u64,
    recovery: Option<Duration>,
    slowest: Duration,
}

/// Runs `clients` clients over `urls`, applies `fault` (which returns when
/// the fault ended), lets the load run [`AFTER`] more, and tallies.
async fn scenario<F>(
    name: &'static str,
    clients: usize,
    urls: Vec<String>,
    check: &str,
    budget: Option<(u64, u64)>,
    fault: F,
) -> Row
where
    F: std::future::Future<Output = Instant>,
{
    let (stop, stopped) = watch::channel(false);
    let (faulting, fault_on) = watch::channel(true);
    let runs: Vec<JoinHandle<_>> = (0..clients)
        .map(|_| {
            tokio::spawn(client(
                urls.clone(),
                budget,
                fault_on.clone(),
                stopped.clone(),
            ))
        })
        .collect();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let ended = fault.await;
    faulting.send_replace(false);
    tokio::time::sleep(AFTER).await;
    stop.send_replace(true);
    let mut row = Row {
        name,
        requests: 0,
        ok: 0,
        expected: 0,
        unexpected: 0,
        lost: 0,
        recovery: Some(Duration::ZERO),
        slowest: Duration::ZERO,
    };
    // Dropped requests' saves settle.
    tokio::time::sleep(Duration::from_millis(500)).await;
    for run in runs {
        let (http, _, seen) = run.await.unwrap();
        row.requests += seen.requests;
        row.ok += seen.ok;
        row.expected += seen.expected;
        row.unexpected += seen.unexpected.len();
        row.slowest = row.slowest.max(seen.slowest);
        if !seen.unexpected.is_empty() {
            println!(
                "{name}: {:?}",
                &seen.unexpected[..seen.unexpected.len().min(5)]
            );
        }
        let mut last = 0;
        for &(_, n) in &seen.acked {
            if n <= last {
                row.lost += 1;
            }
            last = last.max(n);
        }
        let stored = http
            .get(format!("{check}/peek"))
            .send()
            .await
            .unwrap()
            .json::<Value>()
            .await
            .unwrap()["count"]
            .as_u64()
            .unwrap();
        row.lost += last.saturating_sub(stored);
        let first = seen.acked.iter().find(|(at, _)| *at >= ended);
        row.recovery = match (row.recovery, first) {
            (Some(r), Some((at, _))) => Some(r.max(*at - ended)),
            _ => None,
        };
    }
    row
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(f).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "minutes long; run by scripts/chaos.sh"]
async fn chaos() {
    let cluster = std::sync::Arc::new(Cluster::new(None, &[]));
    let url = cluster.url("postgres");
    let admin = sqlx::PgPool::connect(&url).await.unwrap();
    let mut rows = Vec::new();

    let a = demo(&url, 10).await;
    let one = vec![a.url.clone()];

    let c = cluster.clone();
    rows.push(
        scenario(
            "restart -m fast",
            16,
            one.clone(),
            &a.url,
            None,
            async move {
                blocking(move || c.restart_fast()).await;
                Instant::now()
            },
        )
        .await,
    );
    let c = cluster.clone();
    rows.push(
        scenario(
            "stop 5 s, start",
            16,
            one.clone(),
            &a.url,
            None,
            async move {
                blocking(move || {
                    c.stop();
                    std::thread::sleep(Duration::from_secs(5));
                    c.start();
                })
                .await;
                Instant::now()
            },
        )
        .await,
    );
    let lock = |n: i64, hold: Duration| {
        let admin = admin.clone();
        async move {
            let mut tx = admin.begin().await.unwrap();
            // The rows of sessions in use (earlier scenarios' are idle).
            sqlx::query("SELECT 1 FROM session ORDER BY last_seen DESC LIMIT $1 FOR UPDATE")
                .bind(n)
                .execute(&mut *tx)
                .await
                .unwrap();
            tokio::time::sleep(hold).await;
            tx.commit().await.unwrap();
            Instant::now()
        }
    };
    rows.push(
        scenario(
            "1 row locked 8 s",
            16,
            one.clone(),
            &a.url,
            None,
            lock(1, Duration::from_secs(8)),
        )
        .await,
    );
    drop(a);

    let small = demo(&url, 2).await;
    let one = vec![small.url.clone()];
    rows.push(
        scenario(
            "pool of 2, 4 rows locked 8 s",
            16,
            one.clone(),
            &small.url,
            None,
            lock(4, Duration::from_secs(8)),
        )
        .await,
    );
    drop(small);

    let proxy = Latency::start(("127.0.0.1".into(), cluster.port), Duration::from_millis(5)).await;
    let far = format!("postgres://postgres@127.0.0.1:{}/postgres", proxy.port);
    let starved = demo(&far, 2).await;
    rows.push(
        scenario(
            "24 clients giving up after 30-150 ms for 10 s, pool 2, +5 ms each way",
            24,
            vec![starved.url.clone()],
            &starved.url,
            Some((30, 150)),
            async {
                tokio::time::sleep(Duration::from_secs(10)).await;
                Instant::now()
            },
        )
        .await,
    );
    let idle_in_tx: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM pg_stat_activity WHERE state LIKE 'idle in transaction%'",
    )
    .fetch_one(&admin)
    .await
    .unwrap();
    drop(starved);
    drop(proxy);

    let (mut a, b) = (demo(&url, 10).await, demo(&url, 10).await);
    let victim = &mut a.child;
    rows.push(
        scenario(
            "kill -9 of 1 of 2 instances",
            16,
            vec![a.url.clone(), b.url.clone()],
            &b.url,
            None,
            async {
                tokio::time::sleep(Duration::from_secs(2)).await;
                victim.start_kill().unwrap();
                Instant::now()
            },
        )
        .await,
    );
    let unreadable: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM session WHERE json_typeof(sess) IS DISTINCT FROM 'object'",
    )
    .fetch_one(&admin)
    .await
    .unwrap();
    drop((a, b));

    println!();
    println!("| scenario | requests | 200 | expected errors | unexpected | acknowledged writes lost | recovery | slowest answer |");
    println!("|---|---:|---:|---:|---:|---:|---:|---:|");
    for r in &rows {
        println!(
            "| {} | {} | {} | {} | {} | {} | {} | {:.2} s |",
            r.name,
            r.requests,
            r.ok,
            r.expected,
            r.unexpected,
            r.lost,
            r.recovery
                .map(|d| format!("{:.2} s", d.as_secs_f64()))
                .unwrap_or_else(|| "never".into()),
            r.slowest.as_secs_f64()
        );
    }
    println!();
    println!("backends idle in a transaction after the dropped requests: {idle_in_tx}");
    println!("rows not readable as a session after the kill: {unreadable}");
    drop(admin);
    let failed = rows
        .iter()
        .any(|r| r.unexpected > 0 || r.lost > 0 || r.recovery.is_none());
    assert!(!failed && idle_in_tx == 0 && unreadable == 0);
}
