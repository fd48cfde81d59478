//! The demo binary (`cargo build --example demo`; scripts/test.sh builds
//! it), started on a free port of 127.0.0.1 against a given database,
//! without an OpenID provider; killed when dropped.

use std::{path::PathBuf, process::Stdio, time::Duration};

use tokio::process::{Child, Command};

pub struct Demo {
    pub child: Child,
    pub url: String,
}

/// The demo's binary, built beforehand with every feature.
pub fn binary() -> PathBuf {
    let dir = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target"));
    let bin = dir.join("debug/examples/demo");
    assert!(
        bin.exists(),
        "build the demo first: cargo build --all-features --example demo (scripts/test.sh does)"
    );
    bin
}

pub async fn demo(db: &str, pool: u32) -> Demo {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let child = Command::new(binary())
        .env("BIND_ADDR", format!("127.0.0.1:{port}"))
        .env("DATABASE_URL", db)
        .env("DB_POOL_SIZE", pool.to_string())
        .env("SESSION_SECRET", super::KEY_A)
        .env("COOKIE_SECURE", "0")
        .env("PRUNE_INTERVAL_SECS", "0")
        // No provider: login is not what these scenarios exercise.
        .env("OIDC_ISSUER", "http://127.0.0.1:9")
        .env("RUST_LOG", "off")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let url = format!("http://127.0.0.1:{port}");
    let http = reqwest::Client::new();
    for _ in 0..300 {
        if let Ok(r) = http.get(format!("{url}/healthz")).send().await {
            if r.status().is_success() {
                return Demo { child, url };
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("the demo did not start");
}
