//! A small axum app whose sessions live in Postgres.
//!
//! ```not_rust
//! cargo run --example demo --features axum
//! curl -c jar -b jar http://127.0.0.1:3000/counter   # {"count":1}
//! curl -c jar -b jar http://127.0.0.1:3000/counter   # {"count":2}, also after a restart
//! ```
//!
//! Routes: `GET /healthz`, `GET /counter`, `GET /peek`, `PUT /kv/{key}` (JSON
//! body), `GET /kv`.
//!
//! Environment:
//!
//! | variable | default |
//! |---|---|
//! | `BIND_ADDR` | `127.0.0.1:3000` |
//! | `DATABASE_URL` | `postgres://postgres@127.0.0.1:5432/postgres`; when nothing answers there and `initdb`/`pg_ctl` are installed, a throwaway cluster in a temporary directory |
//! | `SESSION_SECRET` | comma-separated signing keys (32+ bytes each), the first signs; a random one, with a warning, when unset |
//! | `DB_POOL_SIZE` | `10` |
//! | `PRUNE_INTERVAL_SECS` | `900` (`0` turns pruning off) |
//! | `SESSION_TTL_SECS` | `86400` (idle timeout) |
//! | `COOKIE_SECURE` | on; `0` for plain-http use other than on localhost |

use std::{env, net::SocketAddr, time::Duration};

use axum::{
    extract::{Path, State},
    http::StatusCode,
    routing::{get, put},
    Json, Router,
};
use serde_json::{json, Value};
use tower_pg_session::{
    PgStore, PgStoreConfig, PruneConfig, Session, SessionError, SessionLayer, SigningKeys,
};

mod local_pg {
    //! A throwaway PostgreSQL cluster for machines without a running server.
    use std::{
        net::TcpListener,
        path::{Path, PathBuf},
        process::Command,
    };

    pub(super) struct Cluster {
        dir: PathBuf,
        pg_ctl: PathBuf,
        as_postgres: bool,
        pub(super) url: String,
    }

    fn find(tool: &str) -> Option<PathBuf> {
        let mut dirs: Vec<PathBuf> = std::env::var_os("PATH")
            .map(|p| std::env::split_paths(&p).collect())
            .unwrap_or_default();
        // Debian keeps the server tools off PATH.
        if let Ok(entries) = std::fs::read_dir("/usr/lib/postgresql") {
            let mut versions: Vec<PathBuf> =
                entries.flatten().map(|e| e.path().join("bin")).collect();
            versions.sort();
            dirs.extend(versions.into_iter().rev());
        }
        dirs.into_iter().map(|d| d.join(tool)).find(|p| p.is_file())
    }

    fn run(cmd: &Path, args: &[&str], as_postgres: bool) -> std::io::Result<bool> {
        let mut command = if as_postgres {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(cmd);
            c
        } else {
            Command::new(cmd)
        };
        let status = command
            .args(args)
            .stdout(std::process::Stdio::null())
            .status()?;
        Ok(status.success())
    }

    pub(super) fn start() -> Option<Cluster> {
        let initdb = find("initdb")?;
        let pg_ctl = find("pg_ctl")?;
        // initdb refuses to run as root; use the postgres account when we are root.
        let as_postgres = std::env::var("USER").map(|u| u == "root").unwrap_or(false)
            || Command::new("id")
                .arg("-u")
                .output()
                .map(|o| o.stdout.starts_with(b"0\n"))
                .unwrap_or(false);
        let dir =
            std::env::temp_dir().join(format!("tower-pg-session-demo-{}", std::process::id()));
        std::fs::create_dir_all(&dir).ok()?;
        if as_postgres {
            Command::new("chown")
                .args(["postgres:"])
                .arg(&dir)
                .status()
                .ok()?;
        }
        let port = TcpListener::bind("127.0.0.1:0")
            .ok()?
            .local_addr()
            .ok()?
            .port();
        let data = dir.join("data");
        let data_s = data.to_str()?;
        if !run(
            &initdb,
            &["-D", data_s, "-U", "postgres", "-A", "trust", "--no-sync"],
            as_postgres,
        )
        .ok()?
        {
            return None;
        }
        let opts = format!(
            "-c listen_addresses=127.0.0.1 -p {port} -k {}",
            dir.to_str()?
        );
        let log = dir.join("log");
        if !run(
            &pg_ctl,
            &[
                "-D",
                data_s,
                "-o",
                &opts,
                "-l",
                log.to_str()?,
                "-w",
                "start",
            ],
            as_postgres,
        )
        .ok()?
        {
            return None;
        }
        Some(Cluster {
            url: format!("postgres://postgres@127.0.0.1:{port}/postgres"),
            dir,
            pg_ctl,
            as_postgres,
        })
    }

    impl Drop for Cluster {
        fn drop(&mut self) {
            if let Some(data) = self.dir.join("data").to_str() {
                let _ = run(
                    &self.pg_ctl,
                    &["-D", data, "-m", "fast", "-w", "stop"],
                    self.as_postgres,
                );
            }
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> Result<T, String> {
    match env::var(name) {
        Ok(v) => v.parse().map_err(|_| format!("{name}={v:?} is not valid")),
        Err(_) => Ok(default),
    }
}

#[derive(Clone)]
struct AppState {
    store: PgStore,
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,sqlx=warn".into()),
        )
        .init();

    let bind: SocketAddr = env_or("BIND_ADDR", SocketAddr::from(([127, 0, 0, 1], 3000)))?;
    let pool_size: u32 = env_or("DB_POOL_SIZE", 10)?;
    let prune_secs: u64 = env_or("PRUNE_INTERVAL_SECS", 900)?;
    let ttl_secs: u64 = env_or("SESSION_TTL_SECS", 86_400)?;
    let secure = env::var("COOKIE_SECURE").map(|v| v != "0").unwrap_or(true);

    let explicit_url = env::var("DATABASE_URL").ok();
    let url = explicit_url
        .clone()
        .unwrap_or_else(|| "postgres://postgres@127.0.0.1:5432/postgres".to_owned());
    let mut _cluster = None;
    let store = match PgStore::connect_with(&url, pool_size, PgStoreConfig::new()).await {
        Ok(store) => store,
        Err(e) if explicit_url.is_none() => {
            tracing::warn!(error = %e, "no PostgreSQL at the default address; starting a throwaway cluster");
            let cluster = local_pg::start().ok_or_else(|| {
                format!("{e}; and no initdb/pg_ctl to start a local cluster: set DATABASE_URL")
            })?;
            tracing::info!(url = %cluster.url, "throwaway PostgreSQL cluster started (removed on exit)");
            let store =
                PgStore::connect_with(&cluster.url, pool_size, PgStoreConfig::new()).await?;
            _cluster = Some(cluster);
            store
        }
        Err(e) => return Err(e.into()),
    };

    let keys = match env::var("SESSION_SECRET") {
        Ok(s) => SigningKeys::new(s.split(',').map(str::trim).filter(|k| !k.is_empty()))?,
        Err(_) => {
            tracing::warn!("SESSION_SECRET is not set: using a random key, so sessions end when the demo stops");
            SigningKeys::generate()
        }
    };
    let mut layer = SessionLayer::new(store.clone(), keys)
        .with_idle_timeout(Some(Duration::from_secs(ttl_secs)))?;
    if !secure {
        layer = layer.with_insecure_http_cookie()?;
    }
    let pruner = (prune_secs > 0).then(|| {
        store.spawn_pruner(PruneConfig::new().with_interval(Duration::from_secs(prune_secs)))
    });

    let app = Router::new()
        .route("/healthz", get(healthz))
        .route("/counter", get(counter))
        .route("/peek", get(peek))
        .route("/kv", get(kv_all))
        .route("/kv/{key}", put(kv_put))
        .layer(layer)
        .with_state(AppState { store });

    let listener = tokio::net::TcpListener::bind(bind).await?;
    tracing::info!("demo listening on http://{}", listener.local_addr()?);
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown_signal())
        .await?;
    if let Some(p) = pruner {
        p.shutdown().await;
    }
    Ok(())
}

/// Ctrl-C or SIGTERM: either way the throwaway cluster, if any, is removed.
async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {}
        () = term => {}
    }
    tracing::info!("shutting down");
}

async fn healthz(State(state): State<AppState>) -> (StatusCode, Json<Value>) {
    match state.store.ping().await {
        Ok(()) => (StatusCode::OK, Json(json!({"status": "ok"}))),
        Err(e) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"status": "unavailable", "error": e.to_string()})),
        ),
    }
}

async fn counter(session: Session) -> Result<Json<Value>, SessionError> {
    let count: u64 = session.get("count").await?.unwrap_or(0) + 1;
    session.insert("count", &count).await?;
    Ok(Json(json!({ "count": count })))
}

async fn peek(session: Session) -> Result<Json<Value>, SessionError> {
    let count: u64 = session.get("count").await?.unwrap_or(0);
    Ok(Json(json!({ "count": count })))
}

async fn kv_put(
    session: Session,
    Path(key): Path<String>,
    Json(value): Json<Value>,
) -> Result<StatusCode, SessionError> {
    session.insert(&key, &value).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn kv_all(session: Session) -> Result<Json<Value>, SessionError> {
    Ok(Json(Value::Object(session.to_json().await?)))
}
