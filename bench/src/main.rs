//! `bench-server`: one contender's routes on 127.0.0.1, plus the seeding and
//! pruning modes the benchmark script needs.
//!
//! ```text
//! bench-server serve --contender NAME [--port 8080] [--pool 10]
//! bench-server seed N --contender NAME [--pool 10]   # prints N cookies, one a line
//! bench-server prune --contender NAME [--delay-ms 0]  # deletes expired rows, prints the times
//! bench-server report results/raw.tsv [chart.svg]    # the markdown report of bench/run.sh (and its chart)
//! ```
//!
//! Contenders: `ceiling` (no session layer), `pg-session` (this crate),
//! `pg-session-pgbouncer` (this crate with `Pooler::Transaction`, through the
//! PgBouncer in transaction mode at `BENCH_PGBOUNCER_URL`), `tower-sessions`,
//! `tower-sessions-noping` (its pool's connection ping on acquire off, as its
//! users can set it) and `tower-sessions-always-save` (tower-sessions +
//! tower-sessions-sqlx-store `PostgresStore`). The database is
//! `BENCH_DATABASE_URL` (default `postgres://postgres@127.0.0.1:5432/tower_pg_session_bench`).
//! Routes, identical for all: `GET /read` (returns `{"count":N}`), `GET /write`
//! (increments `count`), `GET /new` (sets `count` to 0 in a new session).

mod report;

use std::{
    process::ExitCode,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use axum::{
    body::Body,
    http::{header, Request, StatusCode},
    routing::get,
    Json, Router,
};
use futures_util::{stream, StreamExt};
use serde_json::{json, Value};
use tower::ServiceExt;
use tower_pg_session::{PgStore, PgStoreConfig, SessionLayer, SigningKeys};
use tower_sessions::{session_store::ExpiredDeletion, Expiry, SessionManagerLayer};
use tower_sessions_sqlx_store::PostgresStore;

type Error = Box<dyn std::error::Error + Send + Sync>;
type Reply = Result<Json<Value>, StatusCode>;

/// Fixed so that cookies seeded by one process verify in another.
const SIGNING_KEY: &str = "tower-pg-session-bench-signing-key-0123456789";
const IDLE_HOURS: i64 = 24;

#[derive(Clone, Copy, PartialEq)]
enum Contender {
    Ceiling,
    PgSession { pooler: bool },
    TowerSessions { always_save: bool, ping: bool },
}

impl Contender {
    fn parse(name: &str) -> Result<Self, Error> {
        Ok(match name {
            "ceiling" => Self::Ceiling,
            "pg-session" => Self::PgSession { pooler: false },
            "pg-session-pgbouncer" => Self::PgSession { pooler: true },
            "tower-sessions" => Self::TowerSessions {
                always_save: false,
                ping: true,
            },
            "tower-sessions-noping" => Self::TowerSessions {
                always_save: false,
                ping: false,
            },
            "tower-sessions-always-save" => Self::TowerSessions {
                always_save: true,
                ping: true,
            },
            _ => return Err(format!("unknown contender {name:?}").into()),
        })
    }
}

/// A contender's store, kept for the prune mode.
enum Store {
    None,
    Pg(PgStore),
    Tower(PostgresStore),
}

struct Args {
    mode: String,
    seed: usize,
    contender: Contender,
    port: u16,
    pool: u32,
    delay_ms: u64,
    url: String,
}

fn parse_args() -> Result<Args, Error> {
    let mut it = std::env::args().skip(1);
    let mode = it
        .next()
        .ok_or("usage: bench-server serve|seed N|prune --contender NAME")?;
    let mut args = Args {
        seed: if mode == "seed" {
            it.next().ok_or("seed N")?.parse()?
        } else {
            0
        },
        mode,
        contender: Contender::Ceiling,
        port: 8080,
        pool: 10,
        delay_ms: 0,
        url: std::env::var("BENCH_DATABASE_URL")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/tower_pg_session_bench".into()),
    };
    let mut contender = None;
    while let Some(flag) = it.next() {
        let value = it.next().ok_or_else(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--contender" => contender = Some(Contender::parse(&value)?),
            "--port" => args.port = value.parse()?,
            "--pool" => args.pool = value.parse()?,
            "--delay-ms" => args.delay_ms = value.parse()?,
            _ => return Err(format!("unknown flag {flag}").into()),
        }
    }
    args.contender = contender.ok_or("--contender is required")?;
    Ok(args)
}

/// A contender's schema, with `BENCH_SCHEMA_SUFFIX` appended: a second
/// instance of one contender on a table of its own.
fn schema(base: &str) -> String {
    format!(
        "{base}{}",
        std::env::var("BENCH_SCHEMA_SUFFIX").unwrap_or_default()
    )
}

async fn app(args: &Args) -> Result<(Router, Store), Error> {
    match args.contender {
        Contender::Ceiling => Ok((
            Router::new()
                .route("/read", get(|| async { Json(json!({ "count": 0 })) }))
                .route("/write", get(|| async { Json(json!({ "count": 1 })) }))
                .route("/new", get(|| async { Json(json!({ "count": 0 })) })),
            Store::None,
        )),
        Contender::PgSession { pooler } => {
            use tower_pg_session::{Pooler, Session, SessionError};
            let (base, url) = if pooler {
                let url = std::env::var("BENCH_PGBOUNCER_URL")
                    .map_err(|_| "pg-session-pgbouncer needs BENCH_PGBOUNCER_URL")?;
                ("bench_pgb", url)
            } else {
                ("bench_pg", args.url.clone())
            };
            let mut config = PgStoreConfig::new().with_schema_name(&schema(base))?;
            if pooler {
                config = config.with_pooler(Pooler::Transaction);
            }
            // LOAD_CONCURRENCY: loads running at once (the crate's default is 4).
            if let Some(n) = std::env::var("LOAD_CONCURRENCY")
                .ok()
                .and_then(|n| n.parse().ok())
            {
                config = config.with_load_concurrency(n)?;
            }
            // KEPT: connections the store keeps between statements (default:
            // half the pool); 0 returns each to the pool, as other stores do.
            if let Some(n) = std::env::var("KEPT").ok().and_then(|n| n.parse().ok()) {
                config = config.with_kept_connections(n);
            }
            let store = PgStore::connect_with(&url, args.pool, config).await?;
            let layer = SessionLayer::builder(store.clone(), SigningKeys::new([SIGNING_KEY])?)
                .with_insecure_http_cookie()
                .with_idle_timeout(Some(Duration::from_secs(IDLE_HOURS as u64 * 3600)))
                .build()?;
            async fn read(s: Session) -> Result<Json<Value>, SessionError> {
                let n: u64 = s.get("count").await?.unwrap_or(0);
                Ok(Json(json!({ "count": n })))
            }
            async fn write(s: Session) -> Result<Json<Value>, SessionError> {
                let n: u64 = s.get("count").await?.unwrap_or(0) + 1;
                s.insert("count", &n).await?;
                Ok(Json(json!({ "count": n })))
            }
            async fn new(s: Session) -> Result<Json<Value>, SessionError> {
                s.insert("count", &0u64).await?;
                Ok(Json(json!({ "count": 0 })))
            }
            let router = Router::new()
                .route("/read", get(read))
                .route("/write", get(write))
                .route("/new", get(new))
                .layer(layer);
            Ok((router, Store::Pg(store)))
        }
        Contender::TowerSessions { always_save, ping } => {
            use tower_sessions::Session;
            // sqlx pings each connection as it leaves the pool unless told not to.
            let pool = sqlx::postgres::PgPoolOptions::new()
                .max_connections(args.pool)
                .test_before_acquire(ping)
                .connect(&args.url)
                .await?;
            let schema = schema(match (always_save, ping) {
                (true, _) => "bench_ts_always",
                (false, true) => "bench_ts",
                (false, false) => "bench_ts_noping",
            });
            let store = PostgresStore::new(pool).with_schema_name(&schema)?;
            store.migrate().await?;
            let layer = SessionManagerLayer::new(store.clone())
                .with_secure(false)
                .with_expiry(Expiry::OnInactivity(time::Duration::hours(IDLE_HOURS)))
                .with_always_save(always_save);
            let fail = |_| StatusCode::INTERNAL_SERVER_ERROR;
            let read = move |s: Session| async move {
                let n: u64 = s.get("count").await.map_err(fail)?.unwrap_or(0);
                Reply::Ok(Json(json!({ "count": n })))
            };
            let write = move |s: Session| async move {
                let n: u64 = s.get("count").await.map_err(fail)?.unwrap_or(0) + 1;
                s.insert("count", n).await.map_err(fail)?;
                Reply::Ok(Json(json!({ "count": n })))
            };
            let new = move |s: Session| async move {
                s.insert("count", 0u64).await.map_err(fail)?;
                Reply::Ok(Json(json!({ "count": 0 })))
            };
            let router = Router::new()
                .route("/read", get(read))
                .route("/write", get(write))
                .route("/new", get(new))
                .layer(layer);
            Ok((router, Store::Tower(store)))
        }
    }
}

/// Creates `n` sessions through the app's own `/new` route (in process, `pool`
/// at a time) and prints each `Set-Cookie`'s `name=value`, one a line.
async fn seed(router: Router, n: usize, concurrency: usize, ceiling: bool) -> Result<(), Error> {
    let mut out = String::new();
    let mut cookies = stream::iter(0..n)
        .map(|_| {
            let router = router.clone();
            async move {
                let req = Request::get("/new").body(Body::empty())?;
                let res = router.oneshot(req).await?;
                if ceiling {
                    return Ok::<_, Error>("ceiling=1".to_owned());
                }
                let cookie = res
                    .headers()
                    .get(header::SET_COOKIE)
                    .ok_or_else(|| format!("no Set-Cookie ({})", res.status()))?
                    .to_str()?;
                Ok(cookie.split(';').next().unwrap_or_default().to_owned())
            }
        })
        .buffer_unordered(concurrency);
    while let Some(cookie) = cookies.next().await {
        out.push_str(&cookie?);
        out.push('\n');
    }
    print!("{out}");
    Ok(())
}

async fn run(args: Args) -> Result<(), Error> {
    let (router, store) = app(&args).await?;
    match args.mode.as_str() {
        "serve" => {
            let listener = tokio::net::TcpListener::bind(("127.0.0.1", args.port)).await?;
            eprintln!("bench-server: serving on 127.0.0.1:{}", args.port);
            let shutdown = async {
                let mut term =
                    tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                        .expect("SIGTERM handler");
                tokio::select! { _ = term.recv() => {}, _ = tokio::signal::ctrl_c() => {} }
            };
            axum::serve(listener, router)
                .with_graceful_shutdown(shutdown)
                .await?;
        }
        "seed" => {
            let ceiling = args.contender == Contender::Ceiling;
            seed(router, args.seed, args.pool as usize, ceiling).await?;
        }
        "prune" => {
            // Connected first, then waits, so that the load measured around
            // the prune does not include this process's start-up.
            tokio::time::sleep(Duration::from_millis(args.delay_ms)).await;
            let epoch_ms = || {
                SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .map_or(0, |d| d.as_millis())
            };
            let start_ms = epoch_ms();
            let started = Instant::now();
            let deleted = match store {
                Store::Pg(store) => {
                    // PRUNE_BATCH (rows per statement) and PRUNE_BUSY (share of
                    // the time in statements) override the crate's defaults.
                    let env = |name: &str| std::env::var(name).ok();
                    let mut config = tower_pg_session::PruneConfig::new();
                    if let Some(rows) = env("PRUNE_BATCH").and_then(|b| b.parse().ok()) {
                        config = config.with_batch_size(rows);
                    }
                    if let Some(busy) = env("PRUNE_BUSY").and_then(|b| b.parse().ok()) {
                        config = config.with_busy_fraction(busy);
                    }
                    format!("{:?}", store.prune_expired_with(&config, |_| ()).await?)
                }
                Store::Tower(store) => {
                    store.delete_expired().await?;
                    "one DELETE".to_owned()
                }
                Store::None => return Err("the ceiling has nothing to prune".into()),
            };
            let ms = started.elapsed().as_secs_f64() * 1e3;
            println!(
                "prune_ms={ms:.0} start_ms={start_ms} end_ms={} result={deleted:?}",
                epoch_ms()
            );
        }
        other => return Err(format!("unknown mode {other:?}").into()),
    }
    Ok(())
}

#[tokio::main]
async fn main() -> ExitCode {
    let mut argv = std::env::args().skip(1);
    if argv.next().as_deref() == Some("report") {
        let path = argv.next().unwrap_or_else(|| "results/raw.tsv".into());
        let svg = argv.next();
        return match std::fs::read_to_string(&path) {
            Ok(raw) => {
                // The chart beside the report, named relative to it.
                let chart = svg.as_deref().zip(report::chart(&raw));
                let name = chart.as_ref().and_then(|(p, _)| p.rsplit('/').next());
                if let Some((svg, chart)) = &chart {
                    if let Err(e) = std::fs::write(svg, chart) {
                        eprintln!("bench-server: {svg}: {e}");
                        return ExitCode::FAILURE;
                    }
                }
                print!("{}", report::report(&raw, name));
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("bench-server: {path}: {e}");
                ExitCode::FAILURE
            }
        };
    }
    match parse_args() {
        Ok(args) => match run(args).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("bench-server: {e}");
                ExitCode::FAILURE
            }
        },
        Err(e) => {
            eprintln!("bench-server: {e}");
            ExitCode::from(2)
        }
    }
}
