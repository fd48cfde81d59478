//! PgStore against the real Postgres: schema, column types, time zones,
//! pruning, faults, and the tower-sessions adapter.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use axum::http::StatusCode;
use common::*;
use serde_json::json;
use sqlx::{postgres::PgPoolOptions, Executor};
use tower_pg_session::{
    store::PruneOutcome, PgStore, PgStoreConfig, PruneConfig, SessionLayer, SigningKeys, StoreError,
};

async fn columns(db: &Db) -> Vec<(String, String)> {
    sqlx::query_as(
        "SELECT a.attname::text, format_type(a.atttypid, a.atttypmod) FROM pg_attribute a \
         WHERE a.attrelid = to_regclass($1) AND a.attnum > 0 AND NOT a.attisdropped ORDER BY a.attnum",
    )
    .bind(db.table())
    .fetch_all(&db.pool)
    .await
    .unwrap()
}

#[tokio::test]
async fn creates_the_connect_pg_simple_table_once() {
    let db = Db::new().await;
    db.store().await;
    db.store().await; // idempotent
    let cols = columns(&db).await;
    let expect = [
        ("sid", "character varying"),
        ("sess", "json"),
        ("expire", "timestamp(6) without time zone"),
        ("created_at", "timestamp with time zone"),
        ("last_seen", "timestamp with time zone"),
        ("user_agent", "text"),
        ("ip", "text"),
        ("user_id", "text"),
        ("provider_sid", "text"),
    ];
    assert_eq!(
        cols,
        expect
            .iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect::<Vec<_>>()
    );
    let indexes: Vec<String> = sqlx::query_scalar(
        "SELECT indexname::text FROM pg_indexes WHERE schemaname = $1 ORDER BY indexname",
    )
    .bind(&db.schema)
    .fetch_all(&db.pool)
    .await
    .unwrap();
    assert_eq!(
        indexes,
        [
            "IDX_session_created_at",
            "IDX_session_expire",
            "IDX_session_provider_sid",
            "IDX_session_user_id",
            "session_pkey"
        ]
    );
    db.drop_schema().await;
}

#[tokio::test]
async fn a_single_use_key_is_accepted_once_across_instances_until_it_expires() {
    let db = Db::new().await;
    let (a, b) = (db.store().await, db.store().await);
    // Two instances preparing at once make one table.
    let (x, y) = tokio::join!(a.prepare_single_use(), b.prepare_single_use());
    x.unwrap();
    y.unwrap();
    let later = time::OffsetDateTime::now_utc() + time::Duration::hours(1);
    let firsts = futures_util::future::join_all(
        (0..8).map(|i| if i % 2 == 0 { &a } else { &b }.use_once("link:42", later)),
    )
    .await;
    assert_eq!(firsts.iter().filter(|r| *r.as_ref().unwrap()).count(), 1);
    // An expired use frees the key again; another key is independent.
    let past = time::OffsetDateTime::now_utc() - time::Duration::seconds(1);
    assert!(a.use_once("old", past).await.unwrap());
    assert!(b.use_once("old", later).await.unwrap());
    assert!(!a.use_once("old", later).await.unwrap());
    assert!(a.use_once("link:43", later).await.unwrap());
    db.drop_schema().await;
}

#[tokio::test]
async fn eight_instances_starting_at_once_make_one_table() {
    let db = Db::with_pool_size(16).await;
    let mut starts = Vec::new();
    for _ in 0..8 {
        let (pool, config) = (db.pool.clone(), db.config());
        starts.push(tokio::spawn(async move {
            PgStore::new(pool, config).await.map(|_| ())
        }));
    }
    for s in starts {
        s.await.unwrap().unwrap();
    }
    let tables: i64 = sqlx::query_scalar("SELECT count(*) FROM pg_tables WHERE schemaname = $1")
        .bind(&db.schema)
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(tables, 1);
    db.drop_schema().await;
}

#[tokio::test]
async fn bad_names_are_refused_before_any_sql() {
    for bad in ["x; drop table y", "", &"a".repeat(64), "Robert'); --"] {
        let err = PgStoreConfig::new().with_table_name(bad).unwrap_err();
        assert!(err.to_string().contains(&format!("{bad:?}")), "{err}");
        let err = PgStoreConfig::new().with_schema_name(bad).unwrap_err();
        assert!(err.to_string().contains(&format!("{bad:?}")), "{err}");
    }
}

#[tokio::test]
async fn a_table_of_the_wrong_shape_is_a_clear_error() {
    let db = Db::new().await;
    db.pool
        .execute(&*format!(
            "CREATE SCHEMA {s}; CREATE TABLE {s}.session (sid int PRIMARY KEY, sess text, expire date)",
            s = db.schema
        ))
        .await
        .unwrap();
    let err = PgStore::new(db.pool.clone(), db.config().with_create_table(false))
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::Schema(_)), "{err}");
    assert!(err.to_string().contains("sess"), "{err}");
    let missing = Db::new().await;
    let err = PgStore::new(
        missing.pool.clone(),
        missing.config().with_create_table(false),
    )
    .await
    .unwrap_err();
    assert!(matches!(err, StoreError::MissingTable(_)), "{err}");
    db.drop_schema().await;
}

/// connect-pg-simple's own DDL, with the column types varied.
async fn node_table(db: &Db, sess: &str, expire: &str) {
    db.pool
        .execute(&*format!(
            "CREATE SCHEMA {s}; \
             CREATE TABLE {s}.session (sid varchar NOT NULL COLLATE \"default\", sess {sess} NOT NULL, expire {expire} NOT NULL); \
             ALTER TABLE {s}.session ADD CONSTRAINT session_pkey PRIMARY KEY (sid); \
             CREATE INDEX \"IDX_session_expire\" ON {s}.session (expire);",
            s = db.schema
        ))
        .await
        .unwrap();
}

/// What connect-pg-simple runs, from a connection in `zone` (Node's `pg` uses
/// the server's zone; sqlx uses UTC). Node sends `sess` untyped, so Postgres
/// takes the column's type; sqlx types it `text`, hence the cast.
async fn node_set(db: &Db, zone: &str, sid: &str, sess: &str, expires_in_secs: i64) {
    let sess_type: String = sqlx::query_scalar(
        "SELECT format_type(atttypid, atttypmod) FROM pg_attribute WHERE attrelid = to_regclass($1) AND attname = 'sess'",
    )
    .bind(db.table())
    .fetch_one(&db.pool)
    .await
    .unwrap();
    let mut conn = db.pool.acquire().await.unwrap();
    conn.execute(&*format!("SET TimeZone = '{zone}'"))
        .await
        .unwrap();
    sqlx::query(&format!(
        "INSERT INTO {t} (sess, expire, sid) SELECT $1::{sess_type}, to_timestamp($2), $3 \
         ON CONFLICT (sid) DO UPDATE SET sess = $1::{sess_type}, expire = to_timestamp($2) RETURNING sid",
        t = db.table()
    ))
    .bind(sess)
    .bind((time::OffsetDateTime::now_utc().unix_timestamp() + expires_in_secs) as f64)
    .bind(sid)
    .fetch_one(&mut *conn)
    .await
    .unwrap();
    conn.execute("RESET TimeZone").await.unwrap();
}

/// What connect-pg-simple's `get` sees, from a connection in `zone`.
async fn node_get(db: &Db, zone: &str, sid: &str) -> Option<(String, i64)> {
    let mut conn = db.pool.acquire().await.unwrap();
    conn.execute(&*format!("SET TimeZone = '{zone}'"))
        .await
        .unwrap();
    let row: Option<(String, f64)> = sqlx::query_as(&format!(
        "SELECT sess::text, extract(epoch FROM expire::timestamptz)::float8 FROM {t} \
         WHERE sid = $1 AND to_timestamp($2) <= expire",
        t = db.table()
    ))
    .bind(sid)
    .bind(time::OffsetDateTime::now_utc().unix_timestamp() as f64)
    .fetch_optional(&mut *conn)
    .await
    .unwrap();
    conn.execute("RESET TimeZone").await.unwrap();
    row.map(|(s, e)| (s, e as i64))
}

#[tokio::test]
async fn existing_tables_of_every_column_type_share_instants_with_node() {
    const ZONE: &str = "America/New_York";
    for (sess, expire) in [
        ("json", "timestamp(6)"),
        ("jsonb", "timestamp(6)"),
        ("json", "timestamptz"),
        ("jsonb", "timestamptz"),
    ] {
        let db = Db::new().await;
        node_table(&db, sess, expire).await;
        let config = db.config().with_timestamp_zone(ZONE).unwrap();
        let store = PgStore::new(db.pool.clone(), config).await.unwrap();
        let layer = SessionLayer::builder(store, SigningKeys::new([KEY_A]).unwrap())
            .with_insecure_http_cookie()
            .build()
            .unwrap();
        let app = app(layer, Gate::default());

        // Node wrote a row that expires in 30 minutes: live for Rust, however
        // many hours New York is behind UTC.
        let sid = "nodeSessionId_0123456789abcdefgh";
        node_set(
            &db,
            ZONE,
            sid,
            r#"{"cookie":{"originalMaxAge":null},"count":41}"#,
            1800,
        )
        .await;
        let mut c = Client::new(app.clone());
        c.cookie = Some(signed(sid, KEY_A));
        assert_eq!(
            c.get("/peek").await.body,
            json!({"count": 41}),
            "{sess}/{expire}"
        );

        // Rust extends it by a day; Node sees that same instant.
        let r = c.get("/counter").await;
        assert_eq!(r.body, json!({"count": 42}));
        let (stored, node_expire) = node_get(&db, ZONE, sid).await.expect("live for Node");
        let stored: serde_json::Value = serde_json::from_str(&stored).unwrap();
        assert_eq!(stored["count"], json!(42));
        assert_eq!(
            stored["cookie"],
            json!({"originalMaxAge": null}),
            "unknown keys kept"
        );
        let want = time::OffsetDateTime::now_utc().unix_timestamp() + 86_400;
        assert!(
            (node_expire - want).abs() <= 2,
            "{sess}/{expire}: node sees {node_expire}, want {want}"
        );

        // A row Node considers expired a minute ago is not loaded.
        let old = "nodeExpiredId_0123456789abcdefgh";
        node_set(&db, ZONE, old, r#"{"count":7}"#, -60).await;
        let mut c = Client::new(app);
        c.cookie = Some(signed(old, KEY_A));
        assert_eq!(
            c.get("/peek").await.body,
            json!({"count": 0}),
            "{sess}/{expire}"
        );
        db.drop_schema().await;
    }
}

#[tokio::test]
async fn the_zone_node_uses_is_detected() {
    let db = Db::new().await;
    let role = format!("r_{}", db.schema);
    db.pool
        .execute(&*format!(
            "CREATE ROLE {role} LOGIN SUPERUSER; ALTER ROLE {role} SET timezone = 'Asia/Tokyo'"
        ))
        .await
        .unwrap();
    node_table(&db, "json", "timestamp(6)").await;
    let url = database_url().replacen("postgres@", &format!("{role}@"), 1);
    let pool = PgPoolOptions::new()
        .max_connections(2)
        .connect(&url)
        .await
        .unwrap();
    let store = PgStore::new(pool.clone(), db.config()).await.unwrap();
    assert!(format!("{store:?}").contains("Asia/Tokyo"), "{store:?}");
    pool.close().await;
    db.pool
        .execute(&*format!("DROP ROLE {role}"))
        .await
        .unwrap();
    db.drop_schema().await;
}

#[tokio::test]
async fn an_existing_node_table_is_upgraded_and_node_still_writes_to_it() {
    let db = Db::new().await;
    node_table(&db, "json", "timestamp(6)").await;
    node_set(
        &db,
        "UTC",
        "beforeUpgrade_0123456789abcdefgh",
        r#"{"a":1}"#,
        600,
    )
    .await;
    db.store().await;
    assert_eq!(columns(&db).await.len(), 9);
    node_set(
        &db,
        "UTC",
        "afterUpgrade_0123456789abcdefghi",
        r#"{"b":2}"#,
        600,
    )
    .await;
    assert_eq!(db.rows().await, 2);
    db.drop_schema().await;
}

#[tokio::test]
async fn expired_rows_are_never_returned_nor_revived() {
    let db = Db::new().await;
    let store = db.store().await;
    let mut c = Client::new(app(layer(store), Gate::default()));
    c.put("/kv/a", json!(1)).await;
    sqlx::query(&format!(
        "UPDATE {} SET expire = expire - interval '25 hours'",
        db.table()
    ))
    .execute(&db.pool)
    .await
    .unwrap();
    let old_cookie = c.cookie.clone();
    assert_eq!(c.get("/kv").await.body, json!({}));
    c.put("/kv/b", json!(2)).await;
    assert_ne!(
        c.cookie, old_cookie,
        "a write after expiry starts a new session"
    );
    let live: i64 = sqlx::query_scalar(&format!(
        "SELECT count(*) FROM {} WHERE sess::text LIKE '%\"a\"%'",
        db.table()
    ))
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(live, 1, "the expired row is left for the pruner, unchanged");
    db.drop_schema().await;
}

/// `n` expired rows, each with its own expiry, in no physical order (as
/// rows that were touched and updated end up).
async fn fill_expired(db: &Db, n: i64) {
    sqlx::query(&format!(
        "INSERT INTO {} (sid, sess, expire) SELECT 'expired' || g, '{{\"n\":1}}', \
         (now() AT TIME ZONE 'UTC') - interval '1 hour' - ((g * 7919) % $1) * interval '1 millisecond' \
         FROM generate_series(1, $1) g",
        db.table()
    ))
    .bind(n)
    .execute(&db.pool)
    .await
    .unwrap();
}

#[tokio::test]
async fn pruning_200k_rows_goes_in_batches_while_requests_continue() {
    let db = Db::new().await;
    let store = db.store().await;
    fill_expired(&db, 200_000).await;
    let mut users = Vec::new();
    let app = app(layer(store.clone()), Gate::default());
    for i in 0..20 {
        let mut c = Client::new(app.clone());
        c.put("/kv/user", json!(i)).await;
        users.push(c);
    }
    let prune = tokio::spawn({
        let store = store.clone();
        async move { store.prune_expired(5_000).await }
    });
    let mut served = 0;
    while !prune.is_finished() {
        for (i, c) in users.iter_mut().enumerate() {
            let r = c.get("/kv").await;
            assert_eq!(r.status, StatusCode::OK);
            assert_eq!(r.body, json!({"user": i}));
            served += 1;
        }
    }
    assert_eq!(prune.await.unwrap().unwrap(), PruneOutcome::Pruned(200_000));
    assert!(served > 0);
    assert_eq!(db.rows().await, 20, "live sessions untouched");
    let (calls, _) = prune_statement_stats(&db).await;
    assert!(
        calls >= 40,
        "200,000 rows in batches of at most 5,000 take at least 40 statements, took {calls}"
    );
    db.drop_schema().await;
}

/// Calls of the prune's statements, and the shared buffers they touched.
async fn prune_statement_stats(db: &Db) -> (i64, i64) {
    sqlx::query_as(
        "SELECT sum(calls)::int8, sum(shared_blks_hit + shared_blks_read)::int8 \
         FROM pg_stat_statements WHERE query LIKE $1 \
         AND query LIKE 'WITH no_sync AS %DELETE FROM%'",
    )
    .bind(format!("%\"{}\"%", db.schema))
    .fetch_one(&db.pool)
    .await
    .unwrap()
}

#[tokio::test]
async fn a_prune_beside_a_long_transaction_reads_each_expired_row_once() {
    let db = Db::new().await;
    let store = db.store().await;
    fill_expired(&db, 50_000).await;
    // An open snapshot (a report, a backup) keeps deleted rows visible to it,
    // so their index entries cannot be marked dead: a batch that scanned the
    // index from its start would visit every row deleted before it again.
    let mut report = db.pool.begin().await.unwrap();
    sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
        .execute(&mut *report)
        .await
        .unwrap();
    let before: i64 = sqlx::query_scalar(&format!("SELECT count(*) FROM {}", db.table()))
        .fetch_one(&mut *report)
        .await
        .unwrap();
    assert_eq!(
        store.prune_expired(500).await.unwrap(),
        PruneOutcome::Pruned(50_000)
    );
    let (calls, buffers) = prune_statement_stats(&db).await;
    assert!(calls >= 100, "batches of 500: {calls} statements");
    let per_row = buffers as f64 / 50_000.0;
    assert!(
        per_row < 20.0,
        "the prune touched {per_row:.1} buffers per deleted row ({buffers} in all)"
    );
    let still: i64 = sqlx::query_scalar(&format!("SELECT count(*) FROM {}", db.table()))
        .fetch_one(&mut *report)
        .await
        .unwrap();
    assert_eq!(still, before, "the open snapshot still sees every row");
    report.rollback().await.unwrap();
    assert_eq!(db.rows().await, 0);
    db.drop_schema().await;
}

/// Prunes with `batch` rows a statement at full speed; the rows each batch
/// deleted.
async fn prune_batches(store: &PgStore, batch: u32) -> Vec<u64> {
    let config = PruneConfig::new()
        .with_batch_size(batch)
        .with_busy_fraction(1.0);
    let mut batches = Vec::new();
    let outcome = store
        .prune_expired_with(&config, |n| batches.push(n))
        .await
        .unwrap();
    assert_eq!(
        outcome,
        PruneOutcome::Pruned(batches.iter().sum()),
        "{batches:?}"
    );
    batches
}

#[tokio::test]
async fn rows_expired_at_one_instant_are_pruned_in_bounded_batches() {
    let db = Db::new().await;
    let store = db.store().await;
    // 300 rows with their own expiries, then 1,200 expired at one instant
    // (an import, a clock step), then 300 more, and 5 live sessions.
    sqlx::query(&format!(
        "INSERT INTO {} (sid, sess, expire) SELECT 'x' || g, '{{}}', \
         CASE WHEN g <= 300 THEN timestamp '2020-01-01' + g * interval '1 second' \
              WHEN g <= 1500 THEN timestamp '2020-01-02' \
              WHEN g <= 1800 THEN timestamp '2020-01-03' + g * interval '1 second' \
              ELSE (now() AT TIME ZONE 'UTC') + interval '1 day' END \
         FROM generate_series(1, 1805) g",
        db.table()
    ))
    .execute(&db.pool)
    .await
    .unwrap();
    let batches = prune_batches(&store, 500).await;
    assert_eq!(batches.iter().sum::<u64>(), 1_800, "{batches:?}");
    assert!(
        batches.iter().all(|&n| n <= 500),
        "no statement deletes more than a batch: {batches:?}"
    );
    assert_eq!(db.rows().await, 5, "the live sessions stay");
    // A batch larger than the tie deletes it in one range, ties and all.
    sqlx::query(&format!(
        "INSERT INTO {} (sid, sess, expire) SELECT 'y' || g, '{{}}', timestamp '2020-01-02' \
         FROM generate_series(1, 700) g",
        db.table()
    ))
    .execute(&db.pool)
    .await
    .unwrap();
    assert_eq!(prune_batches(&store, 1_000).await, vec![700]);
    assert_eq!(db.rows().await, 5);
    db.drop_schema().await;
}

#[tokio::test]
async fn each_prune_batch_deletes_exactly_the_batch_size_until_the_last() {
    let db = Db::new().await;
    let store = db.store().await;
    fill_expired(&db, 10_250).await;
    let batches = prune_batches(&store, 1_000).await;
    let mut expect = vec![1_000; 10];
    expect.push(250);
    assert_eq!(batches, expect);
    assert_eq!(db.rows().await, 0);
    db.drop_schema().await;
}

#[tokio::test]
async fn only_one_instance_prunes_at_a_time() {
    let db = Db::new().await;
    let store = db.store().await;
    fill_expired(&db, 10).await;
    let mut other = db.pool.acquire().await.unwrap();
    sqlx::query("SELECT pg_advisory_lock($1)")
        .bind(store.prune_lock_id())
        .execute(&mut *other)
        .await
        .unwrap();
    assert_eq!(
        store.prune_expired(5_000).await.unwrap(),
        PruneOutcome::Skipped
    );
    assert_eq!(db.rows().await, 10);
    sqlx::query("SELECT pg_advisory_unlock($1)")
        .bind(store.prune_lock_id())
        .execute(&mut *other)
        .await
        .unwrap();
    assert_eq!(
        store.prune_expired(3).await.unwrap(),
        PruneOutcome::Pruned(10)
    );
    db.drop_schema().await;
}

#[tokio::test]
async fn the_pruner_survives_database_errors_and_stops_on_shutdown() {
    let db = Db::new().await;
    let store = db.store().await;
    // Make every prune fail: the table is away.
    db.pool
        .execute(&*format!("ALTER TABLE {} RENAME TO away", db.table()))
        .await
        .unwrap();
    let pruner = store
        .spawn_pruner(
            PruneConfig::new()
                .with_interval(Duration::from_millis(50))
                .with_jitter(0.0),
        )
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    db.pool
        .execute(&*format!(
            "ALTER TABLE \"{}\".away RENAME TO session",
            db.schema
        ))
        .await
        .unwrap();
    fill_expired(&db, 100).await;
    eventually("the pruner to recover and prune", || async {
        db.rows().await == 0
    })
    .await;
    tokio::time::timeout(Duration::from_secs(5), pruner.shutdown())
        .await
        .expect("shutdown is prompt");
    db.drop_schema().await;
}

#[tokio::test]
async fn an_unreachable_database_names_the_host_and_hides_the_password() {
    let err = PgStore::connect("postgres://app:hunter2@127.0.0.1:1/db")
        .await
        .unwrap_err();
    let shown = format!("{err} / {err:?} / {:?}", std::error::Error::source(&err));
    assert!(err.to_string().contains("127.0.0.1:1"), "{shown}");
    assert!(!shown.contains("hunter2"), "{shown}");
    let err = PgStore::connect("not a url with a s3cret")
        .await
        .unwrap_err();
    assert!(!format!("{err} {err:?}").contains("s3cret"));
}

#[tokio::test]
async fn requests_get_503_while_the_database_is_away_and_recover_after() {
    let db = Db::new().await;
    let relay = Relay::start().await;
    let store = relay.store(&db, db.config()).await;
    let mut c = Client::new(app(layer(store), Gate::default()));
    assert_eq!(c.get("/counter").await.body, json!({"count": 1}));
    let cookie = c.cookie.clone();

    relay.cut();
    for path in ["/counter", "/peek"] {
        let r = c.get(path).await;
        assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE, "{path}");
        assert!(
            r.set_cookie().is_none(),
            "{path}: no cookie change on failure"
        );
    }
    // Requests that need no database keep working.
    assert_eq!(c.get("/untouched").await.status, StatusCode::OK);

    relay.restore();
    c.cookie = cookie;
    let body = c.get_when_up("/counter").await;
    assert!(body.is_some(), "the service recovers by itself");
    assert_eq!(
        body,
        Some(json!({"count": 2})),
        "nothing was lost or double-counted"
    );
    db.drop_schema().await;
}

#[cfg(feature = "tower-sessions")]
mod tower_sessions_adapter {
    use super::*;
    use std::collections::HashMap;
    use tower_sessions_core::{
        session::{Id, Record},
        ExpiredDeletion, SessionStore,
    };

    #[tokio::test]
    async fn create_load_save_delete() {
        let db = Db::new().await;
        let store = db.store().await;
        let expiry = time::OffsetDateTime::now_utc() + time::Duration::hours(1);
        let mut record = Record {
            id: Id::default(),
            data: HashMap::from([("k".to_owned(), json!("v"))]),
            expiry_date: expiry,
        };
        store.create(&mut record).await.unwrap();
        let loaded = store.load(&record.id).await.unwrap().unwrap();
        assert_eq!(loaded.data, record.data);
        assert_eq!(loaded.expiry_date.unix_timestamp(), expiry.unix_timestamp());

        record.data.insert("k2".into(), json!(2));
        store.save(&record).await.unwrap();
        assert_eq!(store.load(&record.id).await.unwrap().unwrap().data.len(), 2);

        store.delete(&record.id).await.unwrap();
        store.save(&record).await.unwrap();
        assert!(
            store.load(&record.id).await.unwrap().is_none(),
            "save does not revive a deleted session"
        );

        fill_expired(&db, 5).await;
        store.delete_expired().await.unwrap();
        assert_eq!(db.rows().await, 0);
        db.drop_schema().await;
    }
    /// As tower-sessions' own store tests check a store: what `create`
    /// leaves in the record is exactly what `load` returns, after a `save`
    /// too, whatever the sub-microsecond part of the expiry.
    #[tokio::test]
    async fn a_loaded_record_equals_the_one_stored() {
        let db = Db::new().await;
        let store = db.store().await;
        for nanos in [0, 1, 499, 500, 999, 123_456_789] {
            let expiry = time::OffsetDateTime::now_utc()
                .replace_nanosecond(nanos)
                .unwrap()
                + time::Duration::minutes(30);
            let mut record = Record {
                id: Id::default(),
                data: HashMap::from([("nanos".to_owned(), json!(nanos))]),
                expiry_date: expiry,
            };
            store.create(&mut record).await.unwrap();
            assert_eq!(store.load(&record.id).await.unwrap(), Some(record.clone()));
            assert!((record.expiry_date - expiry).abs() < time::Duration::microseconds(1));

            record.data.insert("saved".into(), json!(true));
            store.save(&record).await.unwrap();
            assert_eq!(store.load(&record.id).await.unwrap(), Some(record));
        }
        db.drop_schema().await;
    }
}

#[tokio::test]
async fn a_user_id_the_table_cannot_hold_is_refused_and_the_session_is_intact() {
    let db = Db::new().await;
    a_nul_user_id_is_refused(app(layer(db.store().await), Gate::default()), &db).await;
    db.drop_schema().await;
}

#[tokio::test]
async fn data_a_jsonb_column_cannot_hold_is_refused_and_the_session_is_intact() {
    let db = Db::new().await;
    node_table(&db, "jsonb", "timestamptz").await;
    let mut c = Client::new(app(layer(db.store().await), Gate::default()));
    assert_eq!(
        c.put("/kv/a", json!("kept")).await.status,
        StatusCode::NO_CONTENT
    );
    // jsonb has no NUL character (`\u0000`); a backslash before `u0000` is
    // only text.
    let r = c.put("/kv/b", json!({"deep": ["x\u{0}y"]})).await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST, "{:?}", r.body);
    let r = c.put("/kv/c", json!("\\u0000 \\\\u0000")).await;
    assert_eq!(r.status, StatusCode::NO_CONTENT, "{:?}", r.body);
    let r = c.put("/kv/x%00", json!(1)).await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST, "{:?}", r.body);
    let kv = c.get("/kv").await.body;
    assert_eq!(kv["a"], json!("kept"));
    assert_eq!(kv["c"], json!("\\u0000 \\\\u0000"));
    assert_eq!(kv.get("b"), None);
    let stored: serde_json::Value =
        sqlx::query_scalar(&format!("SELECT sess::json FROM {}", db.table()))
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!(stored["a"], json!("kept"));
    db.drop_schema().await;
}
