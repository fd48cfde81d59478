//! Where users deploy: TLS to the database, a list of hosts that follows a
//! failover, an app that starts before its database, and passwords that
//! change while it runs. Each test runs its own throwaway clusters on free
//! ports (never the shared server) and removes them, even on failure.
#![allow(clippy::unwrap_used)]

mod common;

use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use axum::http::StatusCode;
use common::cluster::{free_port, give_to_postgres, work_dir, Cluster};
use serde_json::Value;
use tower_pg_session::{store::PgConnect, PgStore, PgStoreConfig};

/// A directory removed on drop.
struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The error and its sources on one line, as `pg-session` prints them.
fn chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .stdin(Stdio::null())
        .output()
        .expect("openssl is installed (scripts/test.sh installs it)");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A CA, a server certificate it signed for `127.0.0.1` only, and an
/// unrelated CA.
fn certificates() -> TempDir {
    let dir = TempDir(work_dir("tls"));
    let d = &dir.0;
    let ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1"];
    let req = |out_key: &str, out: &str, cn: &str, x509: bool| {
        let subj = format!("/CN={cn}");
        let mut args = vec!["req", "-nodes", "-days", "2", "-subj", &subj];
        args.extend(ec);
        args.extend(["-keyout", out_key, "-out", out]);
        if x509 {
            args.insert(1, "-x509");
        }
        openssl(d, &args);
    };
    req("ca.key", "ca.crt", "Test CA", true);
    req("other.key", "other.crt", "Other CA", true);
    req("server.key", "server.csr", "127.0.0.1", false);
    std::fs::write(
        d.join("ext"),
        "subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\n\
         keyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n",
    )
    .unwrap();
    openssl(
        d,
        &[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "2",
            "-out",
            "server.crt",
            "-extfile",
            "ext",
        ],
    );
    let key = d.join("server.key");
    give_to_postgres(d);
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    dir
}

/// The demo on a free port with `env`; answers on `url`.
struct Demo {
    child: tokio::process::Child,
    url: String,
}

impl Demo {
    fn start(env: &[(&str, String)]) -> Self {
        let port = free_port();
        let mut cmd = tokio::process::Command::new(common::demo_bin::binary());
        cmd.env("BIND_ADDR", format!("127.0.0.1:{port}"))
            .env("PRUNE_INTERVAL_SECS", "0")
            .env("COOKIE_SECURE", "0")
            .env("RUST_LOG", "warn")
            // No login needed here: a provider that cannot be reached.
            .env("OIDC_ISSUER", "http://127.0.0.1:9/")
            .env_remove("APP_URL")
            .env_remove("EXPRESS_COMPAT")
            .env_remove("DB_PASSWORD_FILE")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .kill_on_drop(true);
        for (k, v) in env {
            cmd.env(k, v);
        }
        Self {
            child: cmd.spawn().unwrap(),
            url: format!("http://127.0.0.1:{port}"),
        }
    }

    /// The status of `GET path`, once the demo listens (30 s at most).
    async fn status(&self, http: &reqwest::Client, path: &str) -> StatusCode {
        for _ in 0..300 {
            if let Ok(r) = http.get(format!("{}{path}", self.url)).send().await {
                return r.status();
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("the demo did not listen within 30 s");
    }

    async fn wait_healthy(&self, http: &reqwest::Client, within: Duration) -> bool {
        let until = Instant::now() + within;
        while Instant::now() < until {
            if self.status(http, "/healthz").await == StatusCode::OK {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        false
    }
}

impl Drop for Demo {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
    }
}

fn cookie_client() -> reqwest::Client {
    reqwest::Client::builder()
        .cookie_store(true)
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap()
}

async fn count(http: &reqwest::Client, url: &str) -> (StatusCode, Option<u64>) {
    match http.get(format!("{url}/counter")).send().await {
        Ok(r) => {
            let status = r.status();
            let body: Option<Value> = r.json().await.ok();
            (status, body.and_then(|b| b["count"].as_u64()))
        }
        Err(e) => panic!("the demo stopped answering: {e}"),
    }
}

#[tokio::test]
async fn tls_verify_full_needs_the_right_ca_and_host_name() {
    let certs = certificates();
    let d = certs.0.to_str().unwrap().to_owned();
    let cluster = Cluster::new(
        // Only TLS connections are accepted over TCP.
        Some("local all all trust\nhostssl all all 127.0.0.1/32 trust\nhostssl all all ::1/128 trust\n"),
        &[
            "ssl=on",
            &format!("ssl_cert_file={d}/server.crt"),
            &format!("ssl_key_file={d}/server.key"),
        ],
    );
    let url = |host: &str, params: &str| {
        format!(
            "postgres://postgres@{host}:{}/postgres?{params}",
            cluster.port
        )
    };
    let connect = |url: String| async move {
        PgStore::connect_with(&url, 2, PgStoreConfig::new())
            .await
            .map_err(|e| chain(&e))
    };

    let right = format!("sslmode=verify-full&sslrootcert={d}/ca.crt");
    let store = connect(url("127.0.0.1", &right)).await.unwrap();
    store.ping().await.unwrap();
    drop(store);
    let verify_ca = connect(url(
        "localhost",
        &format!("sslmode=verify-ca&sslrootcert={d}/ca.crt"),
    ))
    .await;
    if cfg!(feature = "native-tls") {
        verify_ca.expect("verify-ca checks the CA, not the name");
    } else {
        // sqlx 0.8's rustls verifier misses rustls 0.23.24's name error, so
        // verify-ca checks the name too (documented in the README).
        let err = verify_ca.expect_err("rustls under sqlx 0.8 checks the name");
        assert!(err.contains("not valid for name"), "{err}");
    }
    connect(url("127.0.0.1", "sslmode=require"))
        .await
        .expect("require encrypts without checking");

    let err = connect(url(
        "127.0.0.1",
        &format!("sslmode=verify-full&sslrootcert={d}/other.crt"),
    ))
    .await
    .expect_err("a certificate from another CA is refused");
    assert!(
        err.to_lowercase().contains("issuer"),
        "names the reason: {err}"
    );
    let err = connect(url(
        "localhost",
        &format!("sslmode=verify-full&sslrootcert={d}/ca.crt"),
    ))
    .await
    .expect_err("a certificate for another name is refused");
    assert!(
        err.to_lowercase().contains("name"),
        "names the reason: {err}"
    );
    let err = connect(url("127.0.0.1", "sslmode=disable"))
        .await
        .expect_err("the server takes TLS connections only");
    assert!(
        err.contains("no encryption") || err.contains("pg_hba.conf"),
        "{err}"
    );

    // The command-line tool takes the same URLs.
    let cli = |url: String| {
        Command::new(env!("CARGO_BIN_EXE_pg-session"))
            .env("DATABASE_URL", url)
            .arg("init")
            .output()
            .unwrap()
    };
    let out = cli(url("127.0.0.1", &right));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = cli(url(
        "127.0.0.1",
        &format!("sslmode=verify-full&sslrootcert={d}/other.crt"),
    ));
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr).to_lowercase();
    assert!(err.contains("issuer") && err.contains("127.0.0.1"), "{err}");

    // And the demo.
    let demo = Demo::start(&[("DATABASE_URL", url("127.0.0.1", &right))]);
    let http = cookie_client();
    assert!(demo.wait_healthy(&http, Duration::from_secs(20)).await);
    assert_eq!(count(&http, &demo.url).await, (StatusCode::OK, Some(1)));
    assert_eq!(count(&http, &demo.url).await, (StatusCode::OK, Some(2)));
}

/// The app starts while nothing answers at its database's address; once a
/// server starts there, it creates the table and serves, without a restart.
#[tokio::test]
async fn the_demo_starts_before_its_database_and_serves_once_it_answers() {
    let dir = TempDir(work_dir("late"));
    let data = dir.0.join("data");
    common::cluster::initdb(&data);
    let port = free_port();
    let demo = Demo::start(&[
        (
            "DATABASE_URL",
            format!("postgres://postgres@127.0.0.1:{port}/postgres"),
        ),
        ("DB_ACQUIRE_TIMEOUT_SECS", "1".to_owned()),
    ]);
    let http = cookie_client();
    assert_eq!(
        demo.status(&http, "/healthz").await,
        StatusCode::SERVICE_UNAVAILABLE,
        "up, and honest that the database is not"
    );
    assert_eq!(
        count(&http, &demo.url).await.0,
        StatusCode::SERVICE_UNAVAILABLE
    );

    let opts = format!(
        "-c listen_addresses=127.0.0.1 -p {port} -k {}",
        dir.0.display()
    );
    let log = dir.0.join("log");
    let (ok, out) = common::cluster::pg_tool(
        "pg_ctl",
        &[
            "-D",
            data.to_str().unwrap(),
            "-o",
            &opts,
            "-l",
            log.to_str().unwrap(),
            "-w",
            "start",
        ],
    );
    assert!(ok, "{out}");
    let stop = StopOnDrop(data.clone());
    assert!(
        demo.wait_healthy(&http, Duration::from_secs(10)).await,
        "healthy within 10 s of the database starting"
    );
    assert_eq!(count(&http, &demo.url).await, (StatusCode::OK, Some(1)));
    assert_eq!(count(&http, &demo.url).await, (StatusCode::OK, Some(2)));
    let (_, rows) = common::cluster::pg_tool(
        "psql",
        &[
            "-h",
            "127.0.0.1",
            "-p",
            &port.to_string(),
            "-U",
            "postgres",
            "-qAtX",
            "-c",
            "SELECT count(*) FROM session",
        ],
    );
    assert_eq!(rows.trim(), "1", "the table was created on first contact");
    drop(demo);
    drop(stop);
}

struct StopOnDrop(PathBuf);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        let _ = common::cluster::pg_tool(
            "pg_ctl",
            &[
                "-D",
                self.0.to_str().unwrap(),
                "-m",
                "immediate",
                "-w",
                "stop",
            ],
        );
    }
}

/// The password provider runs for new connections: after the password
/// changes (and the provider with it), requests recover by themselves. The
/// connection that meets the new password unannounced fails its request
/// (503), and the provider is asked again at once.
#[tokio::test]
async fn a_changed_password_is_used_for_new_connections_without_restart() {
    let statuses = rotate_password(None).await;
    assert!(statuses.len() <= 2, "{statuses:?}");
}

/// With a refresh more frequent than the rotation, the new password is
/// there before a connection needs it: not one request fails.
#[tokio::test]
async fn credentials_refreshed_in_the_background_are_ready_before_they_are_needed() {
    let statuses = rotate_password(Some(Duration::from_secs(1))).await;
    assert_eq!(statuses, [StatusCode::OK]);
}

/// Changes the password of the store's role while requests run; the
/// statuses of the requests until the first 200 after that.
async fn rotate_password(refresh: Option<Duration>) -> Vec<StatusCode> {
    let cluster = Cluster::new(
        Some(
            "local all all trust\nhost all postgres 127.0.0.1/32 trust\n\
             host all app 127.0.0.1/32 scram-sha-256\n",
        ),
        &[],
    );
    let admin = sqlx::PgPool::connect(&cluster.url("postgres"))
        .await
        .unwrap();
    sqlx::query("CREATE ROLE app LOGIN PASSWORD 'first-secret'")
        .execute(&admin)
        .await
        .unwrap();
    sqlx::query("CREATE DATABASE app OWNER app")
        .execute(&admin)
        .await
        .unwrap();
    let password = Arc::new(Mutex::new("first-secret".to_owned()));
    let calls = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let (p, c) = (password.clone(), calls.clone());
    let mut connect =
        PgConnect::from_url(&format!("postgres://app@127.0.0.1:{}/app", cluster.port))
            .unwrap()
            .with_max_connections(2)
            .with_acquire_timeout(Duration::from_secs(2))
            .with_idle_timeout(Some(Duration::from_millis(500)))
            .with_password_provider(move || {
                c.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let current = p.lock().unwrap().clone();
                async move { Ok::<_, std::io::Error>(current) }
            });
    if let Some(every) = refresh {
        connect = connect.with_credentials_refresh(every);
    }
    let store = PgStore::connect_to(connect, PgStoreConfig::new())
        .await
        .unwrap();
    let pool = store.pool().clone();
    let mut client = common::Client::new(common::app(common::layer(store), Default::default()));
    assert_eq!(client.get("/counter").await.body["count"], 1);

    // Rotation: the server and the provider change; the open connections
    // keep working until the pool retires them (idle timeout), quietly: the
    // next connection meets the new password unannounced.
    let before = calls.load(std::sync::atomic::Ordering::SeqCst);
    sqlx::query("ALTER ROLE app PASSWORD 'second-secret'")
        .execute(&admin)
        .await
        .unwrap();
    *password.lock().unwrap() = "second-secret".to_owned();
    assert_eq!(
        client.get("/counter").await.body["count"],
        2,
        "open connections stay"
    );
    common::eventually("the pool to close its idle connections", || {
        let pool = pool.clone();
        async move { pool.size() == 0 }
    })
    .await;
    if let Some(every) = refresh {
        tokio::time::sleep(every + Duration::from_millis(500)).await;
    }

    let started = Instant::now();
    let mut statuses = Vec::new();
    let body = loop {
        let r = client.get("/counter").await;
        statuses.push(r.status);
        if r.status == StatusCode::OK {
            break r.body;
        }
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "not back within 5 s: {statuses:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(body["count"], 3, "the session survived the rotation");
    eprintln!("answers after the rotation: {statuses:?}");
    assert!(
        statuses
            .iter()
            .all(|s| matches!(*s, StatusCode::OK | StatusCode::SERVICE_UNAVAILABLE)),
        "{statuses:?}"
    );
    assert!(
        calls.load(std::sync::atomic::Ordering::SeqCst) > before,
        "the provider was asked again"
    );
    // The old password is refused now: the new one is what serves.
    for _ in 0..5 {
        assert_eq!(client.get("/counter").await.status, StatusCode::OK);
    }
    admin.close().await;
    statuses
}

/// A primary with a synchronous standby, the demo given both (standby
/// first), clients writing; then the primary stops and the standby is
/// promoted. Every answer is 200 or 503, writes resume within seconds on
/// the new primary without a restart, and no acknowledged write is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failover_to_a_promoted_standby_loses_no_acknowledged_write() {
    let primary = Cluster::new(
        None,
        &["synchronous_standby_names=standby", "wal_level=replica"],
    );
    let standby = primary.standby();
    // Commits wait for the standby: what makes "acknowledged" mean "on both".
    let old = sqlx::PgPool::connect(&primary.url("postgres"))
        .await
        .unwrap();
    common::eventually("the standby to replicate synchronously", || {
        let old = old.clone();
        async move {
            sqlx::query_scalar::<_, String>("SELECT sync_state FROM pg_stat_replication")
                .fetch_optional(&old)
                .await
                .unwrap()
                .is_some_and(|s| s == "sync")
        }
    })
    .await;
    old.close().await;
    let demo = Demo::start(&[
        (
            "DATABASE_URL",
            format!(
                "postgres://postgres@127.0.0.1:{},127.0.0.1:{}/postgres?target_session_attrs=read-write",
                standby.port, primary.port
            ),
        ),
        ("DB_ACQUIRE_TIMEOUT_SECS", "1".to_owned()),
        ("DB_POOL_SIZE", "4".to_owned()),
    ]);
    let http = cookie_client();
    assert!(
        demo.wait_healthy(&http, Duration::from_secs(20)).await,
        "uses the primary, not the standby listed first"
    );

    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut clients = Vec::new();
    for _ in 0..6 {
        let (url, stop) = (demo.url.clone(), stop.clone());
        clients.push(tokio::spawn(async move {
            let http = cookie_client();
            let mut seen = Vec::new();
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                seen.push((Instant::now(), count(&http, &url).await));
            }
            seen
        }));
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    // Stopped and promoted off the runtime: the clients keep sending.
    let failover = Instant::now();
    // (The standby, declared last, stops before the primary removes their directory.)
    let (_primary, standby) = tokio::task::spawn_blocking(move || {
        primary.stop();
        standby.promote();
        (primary, standby)
    })
    .await
    .unwrap();
    let promoted = Instant::now();
    eprintln!(
        "primary stopped and standby promoted in {:?}",
        promoted - failover
    );
    tokio::time::sleep(Duration::from_secs(6)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);

    let mut last_counts = Vec::new();
    // The longest time a client went without a 200: the outage it saw.
    let mut outage = Duration::ZERO;
    let (mut ok, mut unavailable) = (0, 0);
    for c in clients {
        let seen = c.await.unwrap();
        let mut last = 0;
        let mut last_ok_at = None::<Instant>;
        let mut ok_on_new_primary = false;
        for (at, (status, n)) in &seen {
            assert!(
                matches!(*status, StatusCode::OK | StatusCode::SERVICE_UNAVAILABLE),
                "only 200 or 503: {status}"
            );
            if *status != StatusCode::OK {
                unavailable += 1;
                continue;
            }
            ok += 1;
            let n = n.unwrap();
            assert!(n > last, "an acknowledged write was lost: {n} after {last}");
            last = n;
            if let Some(previous) = last_ok_at {
                outage = outage.max(at.duration_since(previous));
            }
            last_ok_at = Some(*at);
            ok_on_new_primary |= *at > promoted;
        }
        assert!(ok_on_new_primary, "writes resumed on the new primary");
        last_counts.push(last);
    }
    eprintln!("longest wait for a 200: {outage:?}; {ok} × 200, {unavailable} × 503");
    assert!(outage < Duration::from_secs(5), "no 200 for {outage:?}");

    // Every session holds at least what its client was told.
    let new_primary = sqlx::PgPool::connect(&standby.url("postgres"))
        .await
        .unwrap();
    let mut stored: Vec<i64> = sqlx::query_scalar("SELECT (sess->>'count')::int8 FROM session")
        .fetch_all(&new_primary)
        .await
        .unwrap();
    stored.sort_unstable();
    last_counts.sort_unstable();
    assert_eq!(stored.len(), last_counts.len());
    for (s, l) in stored.iter().zip(&last_counts) {
        assert!(
            *s >= *l as i64,
            "stored {stored:?}, acknowledged {last_counts:?}"
        );
    }
    new_primary.close().await;
    drop(demo);
}

/// Two servers trade roles under the store's open connections (the writable
/// one turns read-only, the other writable, as a demotion and a promotion
/// do): requests get 503 for a moment, then 200 from the new primary, and
/// not one connection to the demoted server stays in use.
#[tokio::test]
async fn connections_to_a_demoted_server_are_dropped_not_reused() {
    let a = Cluster::new(None, &[]);
    let b = Cluster::new(None, &[]);
    // The table exists on both, as replication would have it.
    drop(PgStore::connect(&b.url("postgres")).await.unwrap());
    let admin_a = sqlx::PgPool::connect(&a.url("postgres")).await.unwrap();
    let admin_b = sqlx::PgPool::connect(&b.url("postgres")).await.unwrap();
    let read_only = |pool: &sqlx::PgPool, on: bool| {
        let pool = pool.clone();
        async move {
            let set = if on {
                "ALTER SYSTEM SET default_transaction_read_only = on"
            } else {
                "ALTER SYSTEM RESET default_transaction_read_only"
            };
            sqlx::query(set).execute(&pool).await.unwrap();
            sqlx::query("SELECT pg_reload_conf()")
                .execute(&pool)
                .await
                .unwrap();
        }
    };
    read_only(&admin_b, true).await;

    // The read-only server listed first is passed over.
    let connect = PgConnect::from_url(&format!(
        "postgres://postgres@127.0.0.1:{},127.0.0.1:{}/postgres?application_name=flip",
        b.port, a.port
    ))
    .unwrap()
    .with_max_connections(4)
    .with_acquire_timeout(Duration::from_secs(1));
    let store = PgStore::connect_to(connect, PgStoreConfig::new())
        .await
        .unwrap();
    let app = common::app(common::layer(store), Default::default());
    let mut clients: Vec<_> = (0..8).map(|_| common::Client::new(app.clone())).collect();
    let warm = clients.iter_mut().map(|c| c.get("/counter"));
    for r in futures_util::future::join_all(warm).await {
        assert_eq!(r.status, StatusCode::OK);
    }
    let on = |pool: &sqlx::PgPool| {
        let pool = pool.clone();
        async move {
            sqlx::query_scalar::<_, i64>(
                "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'flip'",
            )
            .fetch_one(&pool)
            .await
            .unwrap()
        }
    };
    assert!(on(&admin_a).await > 0);

    read_only(&admin_a, true).await;
    read_only(&admin_b, false).await;
    tokio::time::sleep(Duration::from_millis(200)).await;

    let started = Instant::now();
    let runs = clients.iter_mut().map(|c| async move {
        let mut statuses = Vec::new();
        let mut oks = 0;
        while oks < 5 {
            let r = c.get("/counter").await;
            statuses.push(r.status);
            if r.status == StatusCode::OK {
                oks += 1;
            } else {
                assert!(
                    started.elapsed() < Duration::from_secs(5),
                    "no 200 within 5 s: {statuses:?}"
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        statuses
    });
    let all: Vec<StatusCode> = futures_util::future::join_all(runs)
        .await
        .into_iter()
        .flatten()
        .collect();
    assert!(
        all.iter()
            .all(|s| matches!(*s, StatusCode::OK | StatusCode::SERVICE_UNAVAILABLE)),
        "{all:?}"
    );
    eprintln!(
        "back after {:?}; {} × 503",
        started.elapsed(),
        all.iter()
            .filter(|s| **s == StatusCode::SERVICE_UNAVAILABLE)
            .count()
    );
    assert!(on(&admin_b).await > 0, "serving from the new primary");
    common::eventually("no connection left on the demoted server", || {
        let admin_a = admin_a.clone();
        async move { on(&admin_a).await == 0 }
    })
    .await;
    admin_a.close().await;
    admin_b.close().await;
}
