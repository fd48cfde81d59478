//! The counters a user can export, recorded through the `metrics` facade.
#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use std::collections::HashMap;

use metrics_util::{
    debugging::{DebugValue, DebuggingRecorder, Snapshotter},
    CompositeKey,
};
use serde_json::json;

/// All counters, by name and labels (`name{label=value}`), from one snapshot.
fn counters(snapshotter: &Snapshotter) -> HashMap<String, u64> {
    snapshotter
        .snapshot()
        .into_vec()
        .into_iter()
        .filter_map(|(k, _, _, v): (CompositeKey, _, _, _)| {
            let labels: Vec<String> = k
                .key()
                .labels()
                .map(|l| format!("{}={}", l.key(), l.value()))
                .collect();
            let name = format!("{}{{{}}}", k.key().name(), labels.join(","));
            match v {
                DebugValue::Counter(n) => Some((name, n)),
                _ => None,
            }
        })
        .collect()
}

#[tokio::test]
async fn loads_saves_touches_conflicts_failures_are_counted() {
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    recorder.install().unwrap();
    let db = Db::new().await;
    let mut c = Client::new(app(layer(db.store().await), Gate::default()));
    c.get("/counter").await; // insert
    c.get("/peek").await; // load, touch not due
    c.get("/counter").await; // load + update
    let mut evil = Client {
        cookie: Some("forged.AAAA".into()),
        ..c.clone()
    };
    evil.get("/peek").await; // bad cookie
                             // Five concurrent writes to one session: some meet a concurrent write and merge.
    let mut tasks = Vec::new();
    for i in 0..5 {
        let mut c = c.clone();
        tasks.push(tokio::spawn(async move {
            c.put(&format!("/kv/k{i}"), json!(i)).await
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let m = counters(&snapshotter);
    let get = |k: &str| m.get(k).copied().unwrap_or(0);
    assert_eq!(get("tower_pg_session_saves_total{kind=insert}"), 1, "{m:?}");
    let (updates, merges) = (
        get("tower_pg_session_saves_total{kind=update}"),
        get("tower_pg_session_saves_total{kind=merge}"),
    );
    assert_eq!(updates + merges, 6, "{m:?}");
    assert_eq!(
        get("tower_pg_session_conflicts_retried_total{}"),
        merges,
        "{m:?}"
    );
    assert_eq!(
        get("tower_pg_session_loads_total{result=found}"),
        7,
        "{m:?}"
    );
    assert_eq!(
        get("tower_pg_session_touches_total{written=false}"),
        7,
        "{m:?}"
    );
    assert_eq!(
        get("tower_pg_session_failures_total{reason=bad_cookie}"),
        1,
        "{m:?}"
    );
    db.drop_schema().await;
}
