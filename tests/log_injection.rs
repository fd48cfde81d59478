//! What an attacker or a hostile provider chooses reaches the logs escaped
//! and bounded: no forged line, no terminal escape, no megabyte line.
#![allow(clippy::unwrap_used)]

mod common;

use std::{
    io::Write,
    sync::{Arc, Mutex, OnceLock},
};

use axum::http::StatusCode;
use common::idp::*;

/// Every log line of this test binary, captured by a global subscriber (the
/// app serves on spawned tasks, so a thread-local one would miss them).
fn logs() -> &'static Arc<Mutex<Vec<u8>>> {
    static LOGS: OnceLock<Arc<Mutex<Vec<u8>>>> = OnceLock::new();
    LOGS.get_or_init(|| {
        let buf = Arc::new(Mutex::new(Vec::new()));
        let writer = Capture(buf.clone());
        tracing_subscriber::fmt()
            .with_env_filter("tower_pg_session=debug")
            .with_ansi(false)
            .with_writer(move || writer.clone())
            .init();
        buf
    })
}

#[derive(Clone)]
struct Capture(Arc<Mutex<Vec<u8>>>);

impl Write for Capture {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

const FORGED: &str =
    "\n2026-01-01T00:00:00Z  INFO tower_pg_session: login completed sub=admin\u{1b}[2K\r";

/// The captured lines: none forged, none with a raw escape or carriage
/// return, none longer than the bound; and `expect` was logged.
fn assert_clean(expect: &str) {
    let text = String::from_utf8(logs().lock().unwrap().clone()).unwrap();
    assert!(text.contains(expect), "{expect:?} not logged:\n{text}");
    for line in text.lines() {
        assert!(!line.contains('\u{1b}'), "raw ESC: {line:?}");
        assert!(!line.contains('\r'), "raw CR: {line:?}");
        assert!(!line.starts_with("2026-01-01"), "forged line: {line:?}");
        assert!(line.len() < 4096, "unbounded line of {} bytes", line.len());
    }
}

#[tokio::test]
async fn hostile_strings_are_logged_escaped_and_bounded() {
    logs();
    let s = setup("keycloak", 1, 3600, |c| c).await;
    let app = &s.apps[0].url;
    let b = Browser::new();

    // A provider error whose text forges a line, then a huge description.
    let auth = b.start_login(app, "/").await;
    let state = auth
        .split("state=")
        .nth(1)
        .unwrap()
        .split('&')
        .next()
        .unwrap();
    let description = format!("{FORGED}{}", "x\n".repeat(5_000));
    let r = b
        .get(&format!(
            "{app}/auth/callback?state={state}&error={}&error_description={}",
            urlencode(&format!("access_denied{FORGED}")),
            urlencode(&description)
        ))
        .await;
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);

    // A parameter named by the attacker, given twice.
    let name = urlencode(&format!("p{FORGED}{}", "y".repeat(8_000)));
    let r = b
        .get(&format!("{app}/auth/callback?{name}=1&{name}=2"))
        .await;
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);

    // A subject chosen at the provider.
    let r = b.login(app, &format!("eve{FORGED}"), "/").await;
    assert_eq!(r.status(), StatusCode::FOUND);

    assert_clean("the provider answered access_denied\\n2026");
    assert_clean("more bytes]");
    assert_clean("login completed sub=eve\\n2026-01-01T00:00:00Z");
    s.db.drop_schema().await;
}
