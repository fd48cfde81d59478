//! The token vault against the real Postgres, with the local OpenID provider
//! standing in for a connected service ("mail").
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use base64::{engine::general_purpose::URL_SAFE_NO_PAD, Engine};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use time::OffsetDateTime;
use tower_pg_session::{
    crypto::Keyring,
    vault::{Integration, TokenVault, Tokens, VaultConfig, VaultError},
    PgStore,
};

use common::{
    idp::{Browser, Idp, CLIENT_ID, CLIENT_SECRET},
    Db,
};

/// Where the provider sends the browser back to; never visited.
const REDIRECT_BASE: &str = "http://127.0.0.1:9";

struct Setup {
    db: Db,
    idp: Idp,
    store: PgStore,
    keys: Keyring,
    flavor: &'static str,
}

async fn setup(flavor: &'static str) -> Setup {
    let db = Db::new().await;
    let idp = Idp::start(flavor, &[REDIRECT_BASE.to_owned()], 3600).await;
    let store = db.store().await;
    Setup {
        db,
        idp,
        store,
        keys: Keyring::generate(),
        flavor,
    }
}

impl Setup {
    fn token_endpoint(&self) -> String {
        match self.flavor {
            "keycloak" => format!("{}/protocol/openid-connect/token", self.idp.issuer),
            _ => format!("{}/oauth2/token", self.idp.issuer),
        }
    }

    fn revocation_endpoint(&self) -> String {
        match self.flavor {
            "keycloak" => format!("{}/protocol/openid-connect/revoke", self.idp.issuer),
            _ => format!("{}/oauth2/revoke", self.idp.issuer),
        }
    }

    fn config(&self) -> VaultConfig {
        let mail = Integration::new("mail", &self.token_endpoint(), CLIENT_ID)
            .unwrap()
            .with_client_secret(CLIENT_SECRET);
        VaultConfig::new()
            .with_schema_name(&self.db.schema)
            .unwrap()
            .with_integration(mail)
            .with_http_timeout(Duration::from_secs(5))
            // Each test asks the provider again at once after a failure,
            // except the one about outages.
            .with_failure_backoff(Duration::ZERO)
    }

    async fn vault(&self) -> TokenVault {
        TokenVault::new(&self.store, self.keys.clone(), self.config())
            .await
            .unwrap()
    }

    fn table(&self) -> String {
        format!("\"{}\".\"oauth_tokens\"", self.db.schema)
    }

    /// Logs `user` in at the provider with PKCE and exchanges the code, as
    /// an app connecting the account would: the provider's token response.
    async fn connect(&self, user: &str) -> Value {
        let verifier = URL_SAFE_NO_PAD.encode(rand::random::<[u8; 32]>());
        let challenge = URL_SAFE_NO_PAD.encode(Sha256::digest(verifier.as_bytes()));
        let auth = match self.flavor {
            "keycloak" => format!("{}/protocol/openid-connect/auth", self.idp.issuer),
            _ => format!("{}/oauth2/authorize", self.idp.issuer),
        };
        let redirect = format!("{REDIRECT_BASE}/auth/callback");
        let url = format!(
            "{auth}?client_id={CLIENT_ID}&response_type=code&scope=openid&state=s1\
             &redirect_uri={}&code_challenge={challenge}&code_challenge_method=S256",
            common::idp::urlencode(&redirect)
        );
        let callback = Browser::new().authorize(&url, user).await;
        let code = url::Url::parse(&callback)
            .unwrap()
            .query_pairs()
            .find(|(k, _)| k == "code")
            .map(|(_, v)| v.into_owned())
            .expect("the callback carries a code");
        let r = reqwest::Client::new()
            .post(self.token_endpoint())
            .basic_auth(CLIENT_ID, Some(CLIENT_SECRET))
            .form(&[
                ("grant_type", "authorization_code"),
                ("code", code.as_str()),
                ("redirect_uri", redirect.as_str()),
                ("code_verifier", verifier.as_str()),
            ])
            .send()
            .await
            .unwrap();
        assert!(r.status().is_success(), "code exchange: {}", r.status());
        r.json().await.unwrap()
    }

    /// Connects `user` at the provider and stores the tokens under `mail`,
    /// expiring `expires_in` from now; returns the provider's token response.
    async fn connect_and_store(
        &self,
        vault: &TokenVault,
        user: &str,
        expires_in: Duration,
    ) -> Value {
        let connected = self.connect(user).await;
        vault
            .store(user, "mail", Self::tokens(&connected, expires_in))
            .await
            .unwrap();
        connected
    }

    /// The token response as the vault's input, expiring `expires_in` from now.
    fn tokens(response: &Value, expires_in: Duration) -> Tokens {
        Tokens::new(response["access_token"].as_str().unwrap().to_owned())
            .with_refresh_token(response["refresh_token"].as_str().unwrap().to_owned())
            .with_expires_in(expires_in)
            .with_scopes(["openid"])
    }

    /// Makes the stored access token of `user` expire `secs` from now.
    async fn expire_in(&self, user: &str, secs: i64) {
        sqlx::query(&format!(
            "UPDATE {} SET expires_at = now() + make_interval(secs => $2) WHERE user_id = $1",
            self.table()
        ))
        .bind(user)
        .bind(secs as f64)
        .execute(&self.db.pool)
        .await
        .unwrap();
    }

    async fn refreshes(&self) -> i64 {
        self.idp.stats().await["refresh_token"].as_i64().unwrap()
    }

    async fn fault(&self, mode: &str, count: u32, size: usize) {
        let r = reqwest::Client::new()
            .post(format!("{}/__test/token-fault", self.idp.base))
            .json(&json!({"mode": mode, "count": count, "size": size}))
            .send()
            .await
            .unwrap();
        assert!(r.status().is_success());
    }

    async fn column(&self, user: &str, column: &str) -> Option<String> {
        sqlx::query_scalar(&format!(
            "SELECT {column} FROM {} WHERE user_id = $1 AND integration = 'mail'",
            self.table()
        ))
        .bind(user)
        .fetch_one(&self.db.pool)
        .await
        .unwrap()
    }

    /// Uses `refresh_token` at the provider directly: its status and body.
    async fn try_refresh_token(&self, refresh_token: &str) -> (u16, Value) {
        let r = reqwest::Client::new()
            .post(self.token_endpoint())
            .basic_auth(CLIENT_ID, Some(CLIENT_SECRET))
            .form(&[
                ("grant_type", "refresh_token"),
                ("refresh_token", refresh_token),
            ])
            .send()
            .await
            .unwrap();
        (r.status().as_u16(), r.json().await.unwrap_or(Value::Null))
    }
}

const HOUR: Duration = Duration::from_secs(3600);

#[tokio::test]
async fn stores_gets_and_refreshes_with_rotation() {
    let s = setup("keycloak").await;
    let vault = s.vault().await;
    let connected = s.connect("ann").await;
    let first_rt = connected["refresh_token"].as_str().unwrap().to_owned();
    vault
        .store("ann", "mail", Setup::tokens(&connected, HOUR))
        .await
        .unwrap();

    // Not due: the stored token, no provider call.
    let token = vault.get("ann", "mail").await.unwrap();
    assert_eq!(token.secret(), connected["access_token"].as_str().unwrap());
    assert_eq!(s.refreshes().await, 0);
    assert!(!format!("{token:?}").contains(token.secret()));

    // Expiring within 5 minutes: refreshed first.
    s.expire_in("ann", 60).await;
    let refreshed = vault.get("ann", "mail").await.unwrap();
    assert_ne!(refreshed.secret(), token.secret());
    assert_eq!(s.refreshes().await, 1);
    let left = refreshed.expires_at().unwrap() - OffsetDateTime::now_utc();
    assert!(left > time::Duration::minutes(50), "{left}");
    // The provider rotated the refresh token: the first one is dead, and the
    // vault kept the new one, so the next refresh works.
    let (status, body) = s.try_refresh_token(&first_rt).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (400, Some("invalid_grant"))
    );
    // Reusing the old one made the provider revoke the grant: connect anew.
    s.connect_and_store(&vault, "ann", Duration::from_secs(60))
        .await;
    let a = vault.get("ann", "mail").await.unwrap();
    s.expire_in("ann", 60).await;
    let b = vault.get("ann", "mail").await.unwrap();
    assert_ne!(a.secret(), b.secret(), "the rotated refresh token was used");

    // Metadata only in listings; the table holds no token in the clear.
    let list = vault.list("ann").await.unwrap();
    assert_eq!(list.len(), 1);
    assert_eq!(list[0].integration, "mail");
    assert!(list[0].last_refreshed_at.is_some() && list[0].refreshable);
    assert!(!list[0].needs_reconsent);
    let listed = serde_json::to_string(&list).unwrap();
    assert!(!listed.contains(b.secret()), "{listed}");
    let dump: String = sqlx::query_scalar(&format!(
        "SELECT string_agg(t::text, ',') FROM {} t",
        s.table()
    ))
    .fetch_one(&s.db.pool)
    .await
    .unwrap();
    assert!(!dump.contains(b.secret()));

    assert!(vault.remove("ann", "mail").await.unwrap());
    assert!(matches!(
        vault.get("ann", "mail").await,
        Err(VaultError::NotConnected { .. })
    ));
    assert!(vault.list("ann").await.unwrap().is_empty());
    s.db.drop_schema().await;
}

#[tokio::test]
async fn keeps_the_refresh_token_when_the_provider_sends_none() {
    let s = setup("cognito").await;
    let vault = s.vault().await;
    let connected = s
        .connect_and_store(&vault, "bo", Duration::from_secs(60))
        .await;
    let mut seen = vec![connected["access_token"].as_str().unwrap().to_owned()];
    for round in 1..=3 {
        s.expire_in("bo", 60).await;
        let token = vault.get("bo", "mail").await.unwrap();
        assert!(!seen.contains(&token.secret().to_owned()), "round {round}");
        seen.push(token.secret().to_owned());
        assert_eq!(s.refreshes().await, round);
    }
    // The one refresh token still works at the provider.
    let rt = connected["refresh_token"].as_str().unwrap();
    assert_eq!(s.try_refresh_token(rt).await.0, 200);
    s.db.drop_schema().await;
}

#[tokio::test]
async fn invalid_grant_needs_reconsent_and_stops_calling_the_provider() {
    let s = setup("keycloak").await;
    let vault = s.vault().await;
    let connected = s
        .connect_and_store(&vault, "cy", Duration::from_secs(60))
        .await;
    let r = reqwest::Client::new()
        .post(s.revocation_endpoint())
        .basic_auth(CLIENT_ID, Some(CLIENT_SECRET))
        .form(&[("token", connected["refresh_token"].as_str().unwrap())])
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success());

    for _ in 0..3 {
        let err = vault.get("cy", "mail").await.unwrap_err();
        assert!(matches!(err, VaultError::NeedsReconsent { .. }), "{err}");
    }
    assert_eq!(
        s.refreshes().await,
        1,
        "one call at the provider, no retries"
    );
    let list = vault.list("cy").await.unwrap();
    assert!(list[0].needs_reconsent);

    // Connecting again clears the mark.
    let connected = s.connect_and_store(&vault, "cy", HOUR).await;
    assert_eq!(
        vault.get("cy", "mail").await.unwrap().secret(),
        connected["access_token"].as_str().unwrap()
    );
    assert!(!vault.list("cy").await.unwrap()[0].needs_reconsent);
    s.db.drop_schema().await;
}

#[tokio::test]
async fn a_ciphertext_moved_to_another_row_or_field_does_not_open() {
    let s = setup("keycloak").await;
    let vault = s.vault().await;
    for user in ["dee", "eve"] {
        vault
            .store(
                user,
                "mail",
                Tokens::new(format!("access-of-{user}"))
                    .with_refresh_token(format!("refresh-of-{user}"))
                    .with_expires_in(HOUR),
            )
            .await
            .unwrap();
    }
    let t = s.table();
    // Eve's row gets Dee's sealed access token.
    sqlx::query(&format!(
        "UPDATE {t} SET access_token = (SELECT access_token FROM {t} WHERE user_id = 'dee') \
         WHERE user_id = 'eve'"
    ))
    .execute(&s.db.pool)
    .await
    .unwrap();
    let err = vault.get("eve", "mail").await.unwrap_err();
    assert!(matches!(err, VaultError::Unreadable { .. }), "{err}");
    assert!(!err.to_string().contains("access-of"));

    // Dee's refresh token moved into Dee's own access-token field.
    sqlx::query(&format!(
        "UPDATE {t} SET access_token = refresh_token WHERE user_id = 'dee'"
    ))
    .execute(&s.db.pool)
    .await
    .unwrap();
    let err = vault.get("dee", "mail").await.unwrap_err();
    assert!(matches!(err, VaultError::Unreadable { .. }), "{err}");

    // A vault with other keys cannot open anything either.
    let other = TokenVault::new(&s.store, Keyring::generate(), s.config())
        .await
        .unwrap();
    vault
        .store("fay", "mail", Tokens::new("access-of-fay".into()))
        .await
        .unwrap();
    assert!(matches!(
        other.get("fay", "mail").await,
        Err(VaultError::Unreadable { .. })
    ));
    assert_eq!(
        vault.get("fay", "mail").await.unwrap().secret(),
        "access-of-fay"
    );
    assert_eq!(s.refreshes().await, 0);
    s.db.drop_schema().await;
}

#[tokio::test]
async fn two_instances_refresh_a_nearly_expired_token_once() {
    let s = setup("keycloak").await;
    // Two instances, each with a pool and vault of its own.
    let second_db = Db::new().await;
    let second_store = PgStore::new(second_db.pool.clone(), s.db.config())
        .await
        .unwrap();
    let vaults = [
        s.vault().await,
        TokenVault::new(&second_store, s.keys.clone(), s.config())
            .await
            .unwrap(),
    ];
    let connected = s.connect("gus").await;
    vaults[0]
        .store(
            "gus",
            "mail",
            Setup::tokens(&connected, Duration::from_secs(30)),
        )
        .await
        .unwrap();

    let mut tasks = Vec::new();
    for vault in &vaults {
        for _ in 0..20 {
            let vault = vault.clone();
            tasks.push(tokio::spawn(async move {
                vault
                    .get("gus", "mail")
                    .await
                    .map(|t| t.secret().to_owned())
            }));
        }
    }
    let mut secrets = Vec::new();
    for task in tasks {
        secrets.push(task.await.unwrap().unwrap());
    }
    assert_eq!(
        s.refreshes().await,
        1,
        "exactly one refresh at the provider"
    );
    assert!(
        secrets.iter().all(|t| t == &secrets[0]),
        "all got the refreshed token"
    );
    assert_ne!(secrets[0], connected["access_token"].as_str().unwrap());
    s.db.drop_schema().await;
}

#[tokio::test]
async fn a_provider_that_is_down_leaves_the_old_token_in_use_while_valid() {
    let mut s = setup("keycloak").await;
    let vault = s.vault().await;
    let connected = s
        .connect_and_store(&vault, "hal", Duration::from_secs(60))
        .await;
    let sealed_rt = s.column("hal", "refresh_token").await;

    // A 503: the old token, still valid, is used; nothing is lost.
    s.fault("unavailable", 1, 0).await;
    let token = vault.get("hal", "mail").await.unwrap();
    assert_eq!(token.secret(), connected["access_token"].as_str().unwrap());
    assert_eq!(s.column("hal", "refresh_token").await, sealed_rt);

    // Once it has expired, the error says what is wrong.
    s.expire_in("hal", -1).await;
    s.fault("unavailable", 1, 0).await;
    let err = vault.get("hal", "mail").await.unwrap_err();
    assert!(
        matches!(err, VaultError::ProviderUnavailable { .. }),
        "{err}"
    );
    assert!(err.to_string().contains("503"), "{err}");

    // The provider gone altogether (connection refused).
    let idp = std::mem::replace(
        &mut s.idp,
        Idp::start("keycloak", &[REDIRECT_BASE.to_owned()], 3600).await,
    );
    drop(idp);
    let err = vault.get("hal", "mail").await.unwrap_err();
    assert!(
        matches!(err, VaultError::ProviderUnavailable { .. }),
        "{err}"
    );
    assert_eq!(s.column("hal", "refresh_token").await, sealed_rt);
    assert!(!vault.list("hal").await.unwrap()[0].needs_reconsent);
    s.db.drop_schema().await;
}

#[tokio::test]
async fn a_malformed_token_response_is_refused_and_changes_nothing() {
    let s = setup("keycloak").await;
    let vault = s.vault().await;
    let connected = s
        .connect_and_store(&vault, "ida", Duration::from_secs(60))
        .await;
    s.expire_in("ida", -1).await;
    let before = s.column("ida", "access_token").await;
    s.fault("malformed", 1, 0).await;
    let err = vault.get("ida", "mail").await.unwrap_err();
    assert!(
        matches!(err, VaultError::InvalidTokenResponse { .. }),
        "{err}"
    );
    assert_eq!(s.column("ida", "access_token").await, before);
    // The kept refresh token still works once the provider answers properly.
    let token = vault.get("ida", "mail").await.unwrap();
    assert_ne!(token.secret(), connected["access_token"].as_str().unwrap());
    assert_eq!(s.refreshes().await, 1);
    s.db.drop_schema().await;
}

#[tokio::test]
async fn an_oversized_token_is_refused() {
    let s = setup("keycloak").await;
    let vault = s.vault().await;
    let err = vault
        .store("jo", "mail", Tokens::new("x".repeat(16 * 1024 + 1)))
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            VaultError::TokenTooLarge {
                size: 16385,
                limit: 16384
            }
        ),
        "{err}"
    );
    assert!(vault.list("jo").await.unwrap().is_empty());

    s.connect_and_store(&vault, "jo", Duration::from_secs(60))
        .await;
    s.expire_in("jo", -1).await;
    let before = s.column("jo", "access_token").await;
    s.fault("oversized", 1, 20_000).await;
    let err = vault.get("jo", "mail").await.unwrap_err();
    assert!(
        matches!(err, VaultError::InvalidTokenResponse { .. }),
        "{err}"
    );
    assert!(err.to_string().contains("over the limit"), "{err}");
    assert_eq!(s.column("jo", "access_token").await, before);
    s.db.drop_schema().await;
}

#[tokio::test]
async fn bad_input_gets_a_clear_error() {
    let s = setup("keycloak").await;
    let vault = s.vault().await;
    assert!(matches!(
        vault.get("kai", "calendar").await,
        Err(VaultError::UnknownIntegration(_))
    ));
    assert!(matches!(
        vault.get("kai", "mail").await,
        Err(VaultError::NotConnected { .. })
    ));
    assert!(matches!(
        vault.get("", "mail").await,
        Err(VaultError::InvalidInput {
            what: "user id",
            ..
        })
    ));
    // The table is created once, however many vaults start at once.
    let starts = (0..4).map(|_| TokenVault::new(&s.store, s.keys.clone(), s.config()));
    for started in futures_util::future::join_all(starts).await {
        started.unwrap();
    }
    assert_eq!(vault.remove_all("kai").await.unwrap(), 0);
    s.db.drop_schema().await;
}

#[tokio::test]
async fn a_caller_dropped_during_a_refresh_loses_nothing() {
    let s = setup("keycloak").await;
    // A pool whose backends the test can tell from everyone else's.
    let (pool_name, store) = s.db.named_store(4).await;
    let vault = TokenVault::new(&store, s.keys.clone(), s.config())
        .await
        .unwrap();
    let connected = s.connect("lea").await;
    let first = connected["access_token"].as_str().unwrap();
    vault
        .store(
            "lea",
            "mail",
            Setup::tokens(&connected, Duration::from_secs(60)),
        )
        .await
        .unwrap();
    s.fault("slow", 1, 800).await;
    // The caller gives up while the provider is still answering.
    let dropped = tokio::time::timeout(Duration::from_millis(200), vault.get("lea", "mail")).await;
    assert!(dropped.is_err(), "the get was cut short");

    // The refresh finishes anyway: the rotated refresh token is kept, the
    // lock is released, no connection stays inside a transaction.
    common::eventually("the refresh lands", || async {
        s.column("lea", "last_refreshed_at::text").await.is_some()
    })
    .await;
    let token = vault.get("lea", "mail").await.unwrap();
    assert_ne!(token.secret(), first);
    assert_eq!(s.refreshes().await, 1);
    s.expire_in("lea", 60).await;
    let again = vault.get("lea", "mail").await.unwrap();
    assert_ne!(
        again.secret(),
        token.secret(),
        "the rotated refresh token works"
    );
    let in_tx: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM pg_stat_activity \
         WHERE application_name = $1 AND state LIKE 'idle in transaction%'",
    )
    .bind(&pool_name)
    .fetch_one(&s.db.pool)
    .await
    .unwrap();
    assert_eq!(in_tx, 0);
    s.db.drop_schema().await;
}

/// Every log line of this test binary, captured by a global subscriber (the
/// refresh runs on a spawned task, so a thread-local one would miss it).
fn logs() -> &'static std::sync::Arc<std::sync::Mutex<Vec<u8>>> {
    use std::sync::{Arc, Mutex, OnceLock};
    static LOGS: OnceLock<Arc<Mutex<Vec<u8>>>> = OnceLock::new();
    LOGS.get_or_init(|| {
        let buf = Arc::new(Mutex::new(Vec::new()));
        let writer = Capture(buf.clone());
        tracing_subscriber::fmt()
            .with_env_filter("tower_pg_session=trace")
            .with_ansi(false)
            .with_writer(move || writer.clone())
            .init();
        buf
    })
}

#[derive(Clone)]
struct Capture(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for Capture {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test]
async fn logs_carry_no_token_and_escape_what_users_chose() {
    logs();
    let s = setup("keycloak").await;
    let vault = s.vault().await;
    let connected = s
        .connect_and_store(&vault, "mo", Duration::from_secs(60))
        .await;
    let refreshed = vault.get("mo", "mail").await.unwrap();
    assert_eq!(s.refreshes().await, 1);

    // A hostile user id, and a row holding a token sealed for someone else.
    let hostile = "x\n2026-01-01T00:00:00Z  INFO tower_pg_session: forged\u{1b}[2K\r";
    for user in [hostile, "mo2"] {
        vault
            .store(
                user,
                "mail",
                Tokens::new(format!("secret-of-{}", user.len())),
            )
            .await
            .unwrap();
    }
    let t = s.table();
    sqlx::query(&format!(
        "UPDATE {t} SET access_token = (SELECT access_token FROM {t} WHERE user_id = 'mo2') \
         WHERE user_id = $1"
    ))
    .bind(hostile)
    .execute(&s.db.pool)
    .await
    .unwrap();
    assert!(matches!(
        vault.get(hostile, "mail").await,
        Err(VaultError::Unreadable { .. })
    ));

    let text = String::from_utf8(logs().lock().unwrap().clone()).unwrap();
    assert!(text.contains("does not open"), "{text}");
    assert!(text.contains("x\\n2026-01-01"), "escaped user id: {text}");
    for line in text.lines() {
        assert!(!line.contains('\u{1b}') && !line.contains('\r'), "{line:?}");
        assert!(!line.starts_with("2026-01-01"), "forged line: {line:?}");
    }
    for secret in [
        connected["access_token"].as_str().unwrap(),
        connected["refresh_token"].as_str().unwrap(),
        refreshed.secret(),
        "secret-of-",
    ] {
        assert!(!text.contains(secret), "a token was logged");
    }
    s.db.drop_schema().await;
}

#[tokio::test]
async fn refreshes_and_failures_are_counted_by_integration_and_reason() {
    use metrics_util::debugging::{DebugValue, DebuggingRecorder};
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    recorder.install().unwrap();
    let counter = |name: &str, reason: Option<&str>| {
        snapshotter
            .snapshot()
            .into_vec()
            .into_iter()
            .filter(|(k, ..)| {
                let labels: Vec<_> = k.key().labels().collect();
                k.key().name() == name
                    && labels
                        .iter()
                        .any(|l| l.key() == "integration" && l.value() == "metered")
                    && reason.is_none_or(|r| {
                        labels.iter().any(|l| l.key() == "reason" && l.value() == r)
                    })
            })
            .map(|(.., v)| match v {
                DebugValue::Counter(n) => n,
                _ => 0,
            })
            .sum::<u64>()
    };
    let s = setup("keycloak").await;
    let metered = Integration::new("metered", &s.token_endpoint(), CLIENT_ID)
        .unwrap()
        .with_client_secret(CLIENT_SECRET);
    let vault = TokenVault::new(
        &s.store,
        s.keys.clone(),
        s.config().with_integration(metered),
    )
    .await
    .unwrap();
    let connected = s.connect("ned").await;
    vault
        .store(
            "ned",
            "metered",
            Setup::tokens(&connected, Duration::from_secs(60)),
        )
        .await
        .unwrap();
    vault.get("ned", "metered").await.unwrap();
    assert_eq!(counter("tower_pg_session_vault_refreshes_total", None), 1);

    s.expire_in("ned", -1).await;
    s.fault("malformed", 1, 0).await;
    vault.get("ned", "metered").await.unwrap_err();
    let failures = "tower_pg_session_vault_failures_total";
    assert_eq!(counter(failures, Some("invalid_response")), 1);

    s.fault("unavailable", 1, 0).await;
    vault.get("ned", "metered").await.unwrap_err();
    assert_eq!(counter(failures, Some("provider_unavailable")), 1);
    // Each snapshot drains the counters: no refresh since the first one.
    assert_eq!(counter("tower_pg_session_vault_refreshes_total", None), 0);
    s.db.drop_schema().await;
}

#[tokio::test]
async fn reseal_moves_every_token_to_the_first_key_while_gets_go_on() {
    use tower_pg_session::crypto::EncryptionKey;
    let s = setup("keycloak").await;
    let old = || EncryptionKey::from_bytes([7; 32]);
    let new = || EncryptionKey::from_bytes([9; 32]);
    let vault_with = |keys: Vec<EncryptionKey>| {
        TokenVault::new(&s.store, Keyring::new(keys).unwrap(), s.config())
    };
    let before = vault_with(vec![old()]).await.unwrap();
    let users: Vec<String> = (0..30).map(|n| format!("user-{n:02}")).collect();
    for (n, user) in users.iter().enumerate() {
        let mut tokens = Tokens::new(format!("access-{n}")).with_expires_in(HOUR);
        if n % 3 != 0 {
            tokens = tokens.with_refresh_token(format!("refresh-{n}"));
        }
        before.store(user, "mail", tokens).await.unwrap();
    }
    let old_id = Keyring::new(vec![old()])
        .unwrap()
        .current_key_id()
        .to_string();
    let new_id = Keyring::new(vec![new()])
        .unwrap()
        .current_key_id()
        .to_string();
    let usage = before.key_usage().await.unwrap();
    assert_eq!(usage.len(), 1);
    assert_eq!(
        (usage[0].key_id.as_str(), usage[0].values),
        (old_id.as_str(), 50)
    );

    // One row that does not open under any key: counted, left alone.
    let t = s.table();
    sqlx::query(&format!(
        "UPDATE {t} SET access_token = (SELECT access_token FROM {t} WHERE user_id = 'user-01') \
         WHERE user_id = 'user-02'"
    ))
    .execute(&s.db.pool)
    .await
    .unwrap();

    // The app runs with the new key first while the old one is retired.
    let rotated = vault_with(vec![new(), old()]).await.unwrap();
    let reader = rotated.clone();
    let readers = users.clone();
    let gets = tokio::spawn(async move {
        let mut ok = 0;
        for _ in 0..5 {
            for user in readers.iter().filter(|u| *u != "user-02") {
                reader.get(user, "mail").await.unwrap();
                ok += 1;
            }
        }
        ok
    });
    let outcome = rotated.reseal(7).await.unwrap();
    assert_eq!((outcome.resealed, outcome.unreadable), (29, 1));
    assert_eq!(
        gets.await.unwrap(),
        29 * 5,
        "no get failed during the reseal"
    );

    let usage = rotated.key_usage().await.unwrap();
    let count = |id: &str| {
        usage
            .iter()
            .find(|u| u.key_id == id)
            .map_or(0, |u| u.values)
    };
    assert_eq!(count(&new_id), 48);
    assert_eq!(
        count(&old_id),
        2,
        "only the unreadable row's two values: {usage:?}"
    );

    // The old key can go: every readable token opens under the new one alone.
    let after = vault_with(vec![new()]).await.unwrap();
    for (n, user) in users.iter().enumerate().filter(|(n, _)| *n != 2) {
        assert_eq!(
            after.get(user, "mail").await.unwrap().secret(),
            format!("access-{n}")
        );
    }
    assert!(matches!(
        before.get("user-05", "mail").await,
        Err(VaultError::Unreadable { .. })
    ));
    // Resealing again finds nothing more to do.
    let again = rotated.reseal(7).await.unwrap();
    assert_eq!((again.resealed, again.unreadable), (0, 1));
    s.db.drop_schema().await;
}

#[cfg(feature = "cli")]
#[tokio::test]
async fn the_cli_reports_key_usage_and_reseals() {
    use base64::engine::general_purpose::STANDARD;
    let s = setup("keycloak").await;
    let (old, new) = (STANDARD.encode([7u8; 32]), STANDARD.encode([9u8; 32]));
    let cli = |keys: &str, args: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_pg-session"))
            .env("DATABASE_URL", common::database_url())
            .env("TOKEN_KEYS", keys)
            .args(["--schema", s.db.schema.as_str()])
            .args(args)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned()
            + &String::from_utf8_lossy(&out.stderr);
        (out.status.code(), text)
    };
    let id = |key: &str| {
        Keyring::from_base64_list(key)
            .unwrap()
            .current_key_id()
            .to_string()
    };
    let before = TokenVault::new(
        &s.store,
        Keyring::from_base64_list(&old).unwrap(),
        s.config(),
    )
    .await
    .unwrap();
    for n in 0..3 {
        let tokens = Tokens::new(format!("access-{n}")).with_refresh_token(format!("r-{n}"));
        before
            .store(&format!("u{n}"), "mail", tokens)
            .await
            .unwrap();
    }
    let rotated = format!("{new},{old}");
    let (code, out) = cli(&rotated, &["keys"]);
    assert_eq!(code, Some(0), "{out}");
    let line = out.lines().find(|l| l.starts_with(&id(&old))).unwrap();
    assert!(line.contains(" 6 ") && line.contains("reseal"), "{out}");
    // The first key seals nothing yet, and is not to be removed.
    let line = out.lines().find(|l| l.starts_with(&id(&new))).unwrap();
    assert!(
        line.contains("first key") && !line.contains("unused"),
        "{out}"
    );

    let (code, out) = cli(&rotated, &["reseal", "--batch", "2"]);
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("sealed 3 rows"), "{out}");
    // Counted first, then a line per batch (stdout is no terminal here).
    let progress: Vec<&str> = out
        .lines()
        .filter(|l| l.starts_with("vault rows"))
        .collect();
    assert_eq!(
        progress,
        [
            "vault rows: 3 to seal again",
            "vault rows: 2/3",
            "vault rows: 3/3"
        ],
        "{out}"
    );
    let (_, out) = cli(&rotated, &["keys"]);
    let line = out.lines().find(|l| l.starts_with(&id(&new))).unwrap();
    assert!(line.contains(" 6 ") && line.contains("first key"), "{out}");
    assert!(
        out.lines()
            .any(|l| l.starts_with(&id(&old)) && l.contains("unused")),
        "{out}"
    );
    // And the tokens open under the new key alone.
    let after = TokenVault::new(
        &s.store,
        Keyring::from_base64_list(&new).unwrap(),
        s.config(),
    )
    .await
    .unwrap();
    assert_eq!(after.get("u1", "mail").await.unwrap().secret(), "access-1");

    // A bad key list: a clear error, exit status 1.
    let (code, out) = cli("not-a-key", &["keys"]);
    assert_eq!(code, Some(1));
    assert!(out.contains("encryption key"), "{out}");
    s.db.drop_schema().await;
}

#[tokio::test]
async fn an_outage_costs_one_provider_call_not_one_per_get() {
    let s = setup("keycloak").await;
    let config = s.config().with_failure_backoff(Duration::from_secs(10));
    let vault = TokenVault::new(&s.store, s.keys.clone(), config)
        .await
        .unwrap();
    let connected = s.connect("ole").await;
    let old = connected["access_token"].as_str().unwrap().to_owned();
    vault
        .store(
            "ole",
            "mail",
            Setup::tokens(&connected, Duration::from_secs(60)),
        )
        .await
        .unwrap();
    s.fault("unavailable", 1000, 0).await;
    let gets = (0..20).map(|_| {
        let vault = vault.clone();
        tokio::spawn(async move {
            vault
                .get("ole", "mail")
                .await
                .map(|t| t.secret().to_owned())
        })
    });
    for got in futures_util::future::join_all(gets).await {
        assert_eq!(got.unwrap().unwrap(), old, "the old token, still valid");
    }
    let faults = || async { s.idp.stats().await["faults"].as_i64().unwrap_or(0) };
    assert_eq!(
        faults().await,
        1,
        "one call at the provider while it is down"
    );

    // Expired meanwhile: the remembered failure, at once.
    s.expire_in("ole", -1).await;
    let err = vault.get("ole", "mail").await.unwrap_err();
    assert!(
        matches!(err, VaultError::ProviderUnavailable { .. }),
        "{err}"
    );
    assert_eq!(faults().await, 1);

    // Once the pause is over, the provider is asked again.
    let quick = TokenVault::new(
        &s.store,
        s.keys.clone(),
        s.config().with_failure_backoff(Duration::ZERO),
    )
    .await
    .unwrap();
    quick.get("ole", "mail").await.unwrap_err();
    assert_eq!(faults().await, 2);
    s.db.drop_schema().await;
}

#[tokio::test]
async fn remove_revokes_the_refresh_token_at_the_provider() {
    let s = setup("keycloak").await;
    let mail = Integration::new("mail", &s.token_endpoint(), CLIENT_ID)
        .unwrap()
        .with_client_secret(CLIENT_SECRET)
        .with_revocation_endpoint(&s.revocation_endpoint())
        .unwrap();
    let vault = TokenVault::new(&s.store, s.keys.clone(), s.config().with_integration(mail))
        .await
        .unwrap();
    let mut refresh_tokens = Vec::new();
    for user in ["pia", "pia2"] {
        let connected = s.connect(user).await;
        refresh_tokens.push(connected["refresh_token"].as_str().unwrap().to_owned());
        vault
            .store(user, "mail", Setup::tokens(&connected, HOUR))
            .await
            .unwrap();
    }
    assert!(vault.remove("pia", "mail").await.unwrap());
    let (status, body) = s.try_refresh_token(&refresh_tokens[0]).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (400, Some("invalid_grant"))
    );
    assert!(!vault.remove("pia", "mail").await.unwrap(), "already gone");

    assert_eq!(vault.remove_all("pia2").await.unwrap(), 1);
    let (status, _) = s.try_refresh_token(&refresh_tokens[1]).await;
    assert_eq!(status, 400, "erasure revokes too");
    assert!(vault.list("pia2").await.unwrap().is_empty());
    s.db.drop_schema().await;
}

#[tokio::test]
async fn an_oidc_integration_is_found_through_discovery() {
    for flavor in ["keycloak", "cognito"] {
        let s = setup(flavor).await;
        let mail = Integration::discover("mail", &s.idp.issuer, CLIENT_ID)
            .await
            .unwrap()
            .with_client_secret(CLIENT_SECRET);
        assert_eq!(mail.token_endpoint(), s.token_endpoint());
        let vault = TokenVault::new(&s.store, s.keys.clone(), s.config().with_integration(mail))
            .await
            .unwrap();
        let connected = s
            .connect_and_store(&vault, "quin", Duration::from_secs(60))
            .await;
        vault.get("quin", "mail").await.unwrap();
        assert_eq!(s.refreshes().await, 1);
        // Discovery found the revocation endpoint too.
        vault.remove("quin", "mail").await.unwrap();
        let rt = connected["refresh_token"].as_str().unwrap();
        assert_eq!(s.try_refresh_token(rt).await.0, 400, "{flavor}");
        s.db.drop_schema().await;
    }
    let err = Integration::discover("mail", "http://127.0.0.1:9/realms/none", CLIENT_ID)
        .await
        .unwrap_err();
    assert!(
        matches!(err, VaultError::ProviderUnavailable { .. }),
        "{err}"
    );
}

#[tokio::test]
async fn a_get_that_needs_no_refresh_is_one_statement() {
    let s = setup("keycloak").await;
    let vault = s.vault().await;
    vault
        .store(
            "rex",
            "mail",
            Tokens::new("access-rex".into()).with_expires_in(HOUR),
        )
        .await
        .unwrap();
    vault.get("rex", "mail").await.unwrap();
    let before = s.db.statements().await;
    for _ in 0..10 {
        vault.get("rex", "mail").await.unwrap();
    }
    assert_eq!(s.db.statements().await - before, 10);
    s.db.drop_schema().await;
}

#[tokio::test]
async fn plaintext_tokens_are_imported_with_a_dry_run_first() {
    use tower_pg_session::vault::ImportSource;
    let s = setup("keycloak").await;
    let vault = s.vault().await;
    let legacy = format!("\"{}\".\"legacy_tokens\"", s.db.schema);
    use sqlx::Executor;
    s.db.pool
        .execute(&*format!(
            "CREATE TABLE {legacy} (owner text, provider text, access text, refresh text, \
           expiry timestamptz); \
         INSERT INTO {legacy} VALUES \
           ('sam', 'mail', 'plain-access-sam', 'plain-refresh-sam', now() + interval '1 hour'), \
           ('tia', 'mail', 'plain-access-tia', NULL, NULL), \
           ('uma', 'mail', 'plain-access-uma', 'plain-refresh-uma', now() + interval '2 hours'), \
           ('vic', 'fax', 'plain-access-vic', NULL, NULL), \
           ('wes', 'mail', repeat('x', 20000), NULL, NULL)"
        ))
        .await
        .unwrap();
    let source = ImportSource::new(Some(&s.db.schema), "legacy_tokens")
        .unwrap()
        .with_columns(
            "owner",
            "provider",
            "access",
            Some("refresh"),
            Some("expiry"),
        )
        .unwrap();

    let dry = vault.import(&source, true).await.unwrap();
    assert_eq!((dry.read, dry.imported, dry.skipped), (5, 3, 2));
    for user in ["sam", "tia", "uma"] {
        assert!(
            vault.list(user).await.unwrap().is_empty(),
            "a dry run stores nothing"
        );
    }

    let done = vault.import(&source, false).await.unwrap();
    assert_eq!((done.read, done.imported, done.skipped), (5, 3, 2));
    assert_eq!(
        vault.get("sam", "mail").await.unwrap().secret(),
        "plain-access-sam"
    );
    assert_eq!(
        vault.get("tia", "mail").await.unwrap().secret(),
        "plain-access-tia"
    );
    let listed = vault.list("uma").await.unwrap();
    assert!(listed[0].refreshable && listed[0].expires_at.is_some());
    let dump: String = sqlx::query_scalar(&format!(
        "SELECT string_agg(t::text, ',') FROM {} t",
        s.table()
    ))
    .fetch_one(&s.db.pool)
    .await
    .unwrap();
    assert!(!dump.contains("plain-"), "sealed, never in the clear");
    // Running it again is harmless.
    assert_eq!(vault.import(&source, false).await.unwrap().imported, 3);
    assert!(ImportSource::new(None, "x; drop table y").is_err());
    s.db.drop_schema().await;
}

#[tokio::test]
async fn a_row_held_elsewhere_leaves_the_old_token_in_use_while_valid() {
    let s = setup("keycloak").await;
    let config = s.config().with_lock_timeout(Duration::from_millis(300));
    let vault = TokenVault::new(&s.store, s.keys.clone(), config)
        .await
        .unwrap();
    vault
        .store(
            "yul",
            "mail",
            Tokens::new("old-access".into())
                .with_refresh_token("some-refresh".into())
                .with_expires_in(Duration::from_secs(60)),
        )
        .await
        .unwrap();
    let hold = || async {
        let mut tx = s.db.pool.begin().await.unwrap();
        sqlx::query(&format!("SELECT 1 FROM {} FOR UPDATE", s.table()))
            .execute(&mut *tx)
            .await
            .unwrap();
        tx
    };
    // Another instance holds the row (stuck mid-refresh): the token is due
    // but still valid, so it is used rather than an error.
    let held = hold().await;
    assert_eq!(
        vault.get("yul", "mail").await.unwrap().secret(),
        "old-access"
    );
    held.rollback().await.unwrap();

    // Expired: the database's refusal, clearly.
    s.expire_in("yul", -1).await;
    let held = hold().await;
    let err = vault.get("yul", "mail").await.unwrap_err();
    assert!(matches!(err, VaultError::Store(_)), "{err}");
    held.rollback().await.unwrap();
    assert_eq!(s.refreshes().await, 0);
    s.db.drop_schema().await;
}

/// The key id `keys` seals with.
fn key_id(keys: &Keyring) -> String {
    keys.current_key_id().to_string()
}

/// An app instance of `s` at `addr` (port 0: a port of its own), sealing
/// with `keys`.
async fn serve_with(s: &common::idp::Setup, keys: Keyring, addr: &str) -> common::idp::App {
    use tower_pg_session::oidc::OidcConfig;
    // The address of an instance just stopped frees up once its task ends.
    let mut listener = tokio::net::TcpListener::bind(addr).await;
    for _ in 0..50 {
        if listener.is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        listener = tokio::net::TcpListener::bind(addr).await;
    }
    let listener = listener.unwrap();
    let url = format!("http://127.0.0.1:{}", listener.local_addr().unwrap().port());
    let config = OidcConfig::new(&s.idp.issuer, CLIENT_ID, &url, keys)
        .unwrap()
        .with_client_secret(CLIENT_SECRET);
    common::idp::App::serve(&s.db, listener, url, config).await
}

#[tokio::test]
async fn login_records_in_sessions_move_to_the_new_key_while_requests_go_on() {
    use tower_pg_session::crypto::EncryptionKey;
    let mut s = common::idp::setup("keycloak", 1, 3600, |c| c).await;
    let old_app = s.apps[0].url.clone();
    let mut browsers = Vec::new();
    for n in 0..6 {
        let b = Browser::new();
        b.login(&old_app, &format!("user{n}"), "/").await;
        browsers.push(b);
    }
    // A login in progress: its pending record is sealed under the old key too.
    let pending = Browser::new();
    let auth = pending.start_login(&old_app, "/after").await;
    // A record copied into another session does not open there.
    let t = s.db.table();
    let rows: Vec<(String, String)> =
        sqlx::query_as(&format!("SELECT sid, sess::text FROM {t} ORDER BY sid"))
            .fetch_all(&s.db.pool)
            .await
            .unwrap();
    let copied = rows
        .iter()
        .find(|(_, sess)| sess.contains("\"oidc\""))
        .map(|(_, sess)| serde_json::from_str::<Value>(sess).unwrap()["oidc"].clone())
        .unwrap();
    sqlx::query(&format!(
        "INSERT INTO {t} (sid, sess, expire) VALUES ('moved', $1::json, now() + interval '1 hour')"
    ))
    .bind(json!({ "oidc": copied }).to_string())
    .execute(&s.db.pool)
    .await
    .unwrap();

    let store = s.db.store().await;
    let old_id = key_id(&s.token_keys);
    let usage = store.session_key_usage().await.unwrap();
    assert_eq!(usage.len(), 1, "{usage:?}");
    assert_eq!(
        (usage[0].key_id.as_str(), usage[0].values),
        (old_id.as_str(), 8)
    );

    // The app now runs with the new key first; requests keep writing
    // (the guard reseals what it reads, handlers store data) meanwhile.
    let new_key = EncryptionKey::generate();
    let rotated = Keyring::new(vec![new_key.clone(), s.token_key.clone()]).unwrap();
    let app = serve_with(&s, rotated.clone(), "127.0.0.1:0").await;
    let mut tasks = Vec::new();
    for (n, b) in browsers.iter().enumerate() {
        let (b, url) = (b.clone(), app.url.clone());
        tasks.push(tokio::spawn(async move {
            for i in 0..15 {
                let r = b
                    .http
                    .put(format!("{url}/kv/k{i}"))
                    .json(&json!(n * 100 + i))
                    .send()
                    .await
                    .unwrap();
                assert_eq!(r.status(), 204, "write {i} of browser {n}");
                assert_eq!(b.me(&url).await.status(), 200);
            }
        }));
    }
    let mut outcome = tower_pg_session::vault::ResealOutcome::default();
    while !tasks.iter().all(|t| t.is_finished()) {
        let o = store.reseal_sessions(&rotated, 2).await.unwrap();
        outcome.resealed += o.resealed;
        outcome.unreadable = o.unreadable;
    }
    for task in tasks {
        task.await.unwrap();
    }
    let last = store.reseal_sessions(&rotated, 2).await.unwrap();
    assert_eq!(last.unreadable, 1, "the moved record, left as it was");
    assert!(
        outcome.resealed >= 1,
        "at least the pending login: {outcome:?}"
    );

    let usage = store.session_key_usage().await.unwrap();
    let count = |id: &str| {
        usage
            .iter()
            .find(|u| u.key_id == id)
            .map_or(0, |u| u.values)
    };
    assert_eq!(count(&key_id(&rotated)), 7, "{usage:?}");
    assert_eq!(count(&old_id), 1, "only the moved record: {usage:?}");

    // No write was lost to a reseal.
    for (n, b) in browsers.iter().enumerate() {
        let me = b.me(&app.url).await;
        assert_eq!(me.status(), 200);
        let sess: Vec<String> = sqlx::query_scalar(&format!(
            "SELECT sess::text FROM {t} WHERE sess::text LIKE $1"
        ))
        .bind(format!("%\"k14\":{}%", n * 100 + 14))
        .fetch_all(&s.db.pool)
        .await
        .unwrap();
        let data: Value = serde_json::from_str(&sess[0]).unwrap();
        for i in 0..15 {
            assert_eq!(
                data[format!("k{i}")],
                json!(n * 100 + i),
                "browser {n} key {i}"
            );
        }
    }

    // The old key can go: an app with the new key alone keeps everyone
    // logged in, and the login in progress completes there.
    let only_new = Keyring::from(new_key);
    drop(app);
    drop(s.apps.remove(0));
    let app = serve_with(&s, only_new, old_app.trim_start_matches("http://")).await;
    assert_eq!(app.url, old_app);
    for b in &browsers {
        assert_eq!(b.me(&app.url).await.status(), 200);
    }
    let callback = pending.authorize(&auth, "late").await;
    let r = pending.get(&callback).await;
    assert_eq!(r.status().as_u16(), 302);
    assert_eq!(common::idp::location(&r), "/after");
    assert_eq!(pending.me(&app.url).await.status(), 200);
    s.db.drop_schema().await;
}

#[tokio::test]
async fn gauges_count_stored_tokens_per_integration() {
    use metrics_util::debugging::{DebugValue, DebuggingRecorder};
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    // This task's thread only: other tests of this binary may run alongside.
    let _local = metrics::set_default_local_recorder(&recorder);
    // One snapshot holds every gauge (taking one resets what it read).
    let gauges = || {
        snapshotter
            .snapshot()
            .into_vec()
            .into_iter()
            .filter_map(|(k, .., v)| {
                let integration = k
                    .key()
                    .labels()
                    .find(|l| l.key() == "integration")?
                    .value()
                    .to_owned();
                match v {
                    DebugValue::Gauge(g) => Some((
                        format!("{}{{{integration}}}", k.key().name()),
                        g.into_inner(),
                    )),
                    _ => None,
                }
            })
            .collect::<std::collections::HashMap<String, f64>>()
    };
    let s = setup("keycloak").await;
    let crm = Integration::new("crm", &s.token_endpoint(), CLIENT_ID).unwrap();
    let vault = TokenVault::new(&s.store, s.keys.clone(), s.config().with_integration(crm))
        .await
        .unwrap();
    for n in 0..5 {
        vault
            .store(&format!("u{n}"), "mail", Tokens::new(format!("t{n}")))
            .await
            .unwrap();
    }
    sqlx::query(&format!(
        "UPDATE {} SET needs_reconsent_at = now() WHERE user_id IN ('u1', 'u2')",
        s.table()
    ))
    .execute(&s.db.pool)
    .await
    .unwrap();
    let counts = vault.record_gauges().await.unwrap();
    assert_eq!(counts.len(), 2, "{counts:?}");
    assert_eq!(
        (
            counts[1].integration.as_str(),
            counts[1].tokens,
            counts[1].needs_reconsent
        ),
        ("mail", 5, 2)
    );
    let g = gauges();
    assert_eq!(
        g.get("tower_pg_session_vault_tokens{mail}"),
        Some(&5.0),
        "{g:?}"
    );
    assert_eq!(
        g.get("tower_pg_session_vault_needs_reconsent{mail}"),
        Some(&2.0)
    );
    assert_eq!(g.get("tower_pg_session_vault_tokens{crm}"), Some(&0.0));
    vault.remove("u0", "mail").await.unwrap();
    vault.record_gauges().await.unwrap();
    let g = gauges();
    assert_eq!(
        g.get("tower_pg_session_vault_tokens{mail}"),
        Some(&4.0),
        "{g:?}"
    );
    s.db.drop_schema().await;
}

/// The binding the vault seals a token with (its row), as documented next
/// to `row_binding` in src/vault/mod.rs: the seeding below seals in bulk.
fn vault_aad<'a>(binding: &'a str, field: &'a str) -> tower_pg_session::crypto::Aad<'a> {
    tower_pg_session::crypto::Aad {
        session: binding,
        field,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reseal_of_100k_values_under_load_loses_nothing() {
    use std::time::Instant;
    use tower_pg_session::crypto::EncryptionKey;
    const VAULT_ROWS: usize = 50_000;
    const SESSION_ROWS: usize = 50_000;
    let started = Instant::now();
    let s = setup("keycloak").await;
    let (old, new) = (
        EncryptionKey::from_bytes([3; 32]),
        EncryptionKey::from_bytes([4; 32]),
    );
    let old_ring = Keyring::new(vec![old.clone()]).unwrap();
    let rotated = Keyring::new(vec![new.clone(), old]).unwrap();
    let only_new = Keyring::new(vec![new]).unwrap();
    let vault_with = |keys: &Keyring| TokenVault::new(&s.store, keys.clone(), s.config());
    let before = vault_with(&old_ring).await.unwrap();

    // Seed: sealed under the old key in Rust, written by one statement per table.
    let binding = |user: &str| format!("vault:{}:{user}:mail", user.len());
    let users: Vec<String> = (0..VAULT_ROWS).map(|n| format!("seed-{n:06}")).collect();
    let sealed: Vec<String> = users
        .iter()
        .enumerate()
        .map(|(n, u)| {
            old_ring.seal(
                format!("a{n}").as_bytes(),
                &vault_aad(&binding(u), "vault.access_token"),
            )
        })
        .collect();
    sqlx::query(&format!(
        "INSERT INTO {} (user_id, integration, access_token, expires_at) \
         SELECT u, 'mail', a, now() + interval '1 day' FROM unnest($1::text[], $2::text[]) AS x(u, a)",
        s.table()
    ))
    .bind(&users)
    .bind(&sealed)
    .execute(&s.db.pool)
    .await
    .unwrap();
    let sids: Vec<String> = (0..SESSION_ROWS).map(|n| format!("seed-{n:06}")).collect();
    let sess: Vec<String> = sids
        .iter()
        .enumerate()
        .map(|(n, sid)| {
            let record = old_ring.seal(
                format!("{{\"sub\":\"s{n}\"}}").as_bytes(),
                &vault_aad(sid, "oidc"),
            );
            json!({ "oidc": record, "n": n }).to_string()
        })
        .collect();
    sqlx::query(&format!(
        "INSERT INTO {} (sid, sess, expire) \
         SELECT sid, sess::json, now() + interval '1 day' FROM unnest($1::text[], $2::text[]) AS x(sid, sess)",
        s.db.table()
    ))
    .bind(&sids)
    .bind(&sess)
    .execute(&s.db.pool)
    .await
    .unwrap();
    eprintln!("seeded 100,000 sealed values in {:?}", started.elapsed());

    // Live load: users whose tokens the provider rotates on each refresh,
    // browsers whose sessions hold a login record and get written to.
    let mut refreshing = Vec::new();
    for n in 0..3 {
        let user = format!("live-{n}");
        s.connect_and_store(&before, &user, Duration::from_secs(60))
            .await;
        refreshing.push(user);
    }
    let layer = common::layer(s.store.clone());
    let app = common::app(layer, common::Gate::default());
    let mut clients = Vec::new();
    for n in 0..8 {
        let mut c = common::Client::new(app.clone());
        c.put("/kv/start", json!(n)).await;
        clients.push(c);
    }
    // Their login records, sealed under the old key for their rows.
    let live: Vec<String> = sqlx::query_scalar(&format!(
        "SELECT sid FROM {} WHERE sid NOT LIKE 'seed-%'",
        s.db.table()
    ))
    .fetch_all(&s.db.pool)
    .await
    .unwrap();
    assert_eq!(live.len(), 8);
    for sid in &live {
        let record = old_ring.seal(b"{\"sub\":\"live\"}", &vault_aad(sid, "oidc"));
        sqlx::query(&format!(
            "UPDATE {} SET sess = (sess::jsonb || jsonb_build_object('oidc', $2::text))::json WHERE sid = $1",
            s.db.table()
        ))
        .bind(sid)
        .bind(record)
        .execute(&s.db.pool)
        .await
        .unwrap();
    }

    let app_vault = vault_with(&rotated).await.unwrap();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut load = Vec::new();
    for user in refreshing.clone() {
        let (v, stop, db) = (app_vault.clone(), stop.clone(), s.db.pool.clone());
        let t = s.table();
        load.push(tokio::spawn(async move {
            let mut refreshes = 0u32;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                sqlx::query(&format!(
                    "UPDATE {t} SET expires_at = now() + interval '60 seconds' WHERE user_id = $1"
                ))
                .bind(&user)
                .execute(&db)
                .await
                .unwrap();
                v.get(&user, "mail").await.expect("a get during the reseal");
                refreshes += 1;
            }
            refreshes
        }));
    }
    for worker in 0..2usize {
        let (v, stop) = (app_vault.clone(), stop.clone());
        load.push(tokio::spawn(async move {
            let mut gets = 0u32;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let n = (gets as usize * 7919 + worker * 104_729) % VAULT_ROWS;
                let token = v.get(&format!("seed-{n:06}"), "mail").await.expect("a get");
                assert_eq!(token.secret(), format!("a{n}"));
                gets += 1;
            }
            gets
        }));
    }
    let writers: Vec<_> = clients
        .into_iter()
        .map(|mut c| {
            let stop = stop.clone();
            tokio::spawn(async move {
                let mut writes = 0u32;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let r = c.put(&format!("/kv/w{writes}"), json!(writes)).await;
                    assert_eq!(r.status, 204, "a session save during the reseal");
                    writes += 1;
                }
                (c, writes)
            })
        })
        .collect();

    let t0 = Instant::now();
    let vault_outcome = app_vault.reseal(500).await.unwrap();
    let t_vault = t0.elapsed();
    let t1 = Instant::now();
    let session_outcome = s.store.reseal_sessions(&rotated, 500).await.unwrap();
    let t_sessions = t1.elapsed();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut requests = 0;
    for task in load {
        requests += task.await.expect("no request failed");
    }
    let mut clients = Vec::new();
    for task in writers {
        let (c, writes) = task.await.expect("no session save failed");
        requests += writes;
        clients.push((c, writes));
    }
    eprintln!(
        "resealed {} vault rows in {t_vault:?} and {} session rows in {t_sessions:?}, \
         {requests} requests meanwhile",
        vault_outcome.resealed, session_outcome.resealed
    );
    assert_eq!(vault_outcome.unreadable + session_outcome.unreadable, 0);
    assert!(vault_outcome.resealed >= VAULT_ROWS as u64);
    assert!(session_outcome.resealed >= SESSION_ROWS as u64);

    // Nothing is left under the old key.
    let old_id = key_id(&old_ring);
    let vault_usage = app_vault.key_usage().await.unwrap();
    let session_usage = s.store.session_key_usage().await.unwrap();
    assert!(
        vault_usage
            .iter()
            .chain(&session_usage)
            .all(|u| u.key_id != old_id),
        "{vault_usage:?} {session_usage:?}"
    );
    // Every value opens under the new key alone, as what it was.
    let rows: Vec<(String, String)> = sqlx::query_as(&format!(
        "SELECT user_id, access_token FROM {} WHERE user_id LIKE 'seed-%' ORDER BY user_id",
        s.table()
    ))
    .fetch_all(&s.db.pool)
    .await
    .unwrap();
    assert_eq!(rows.len(), VAULT_ROWS);
    for (n, (user, sealed)) in rows.iter().enumerate() {
        let opened = only_new
            .open(sealed, &vault_aad(&binding(user), "vault.access_token"))
            .unwrap();
        assert_eq!(opened.plaintext(), format!("a{n}").as_bytes());
    }
    let rows: Vec<(String, String)> = sqlx::query_as(&format!(
        "SELECT sid, sess::text FROM {} ORDER BY sid",
        s.db.table()
    ))
    .fetch_all(&s.db.pool)
    .await
    .unwrap();
    assert_eq!(rows.len(), SESSION_ROWS + 8);
    for (sid, sess) in &rows {
        let data: Value = serde_json::from_str(sess).unwrap();
        only_new
            .open(data["oidc"].as_str().unwrap(), &vault_aad(sid, "oidc"))
            .unwrap();
    }
    // No concurrent write was lost: every session holds all it was sent,
    // and each rotated refresh token still works.
    for (mut c, writes) in clients {
        let body = c.get("/kv").await.body;
        for w in 0..writes {
            assert_eq!(body[format!("w{w}")], json!(w), "write {w} of {writes}");
        }
    }
    let after = vault_with(&only_new).await.unwrap();
    for user in &refreshing {
        s.expire_in(user, 60).await;
        after
            .get(user, "mail")
            .await
            .expect("the latest refresh token");
    }
    eprintln!("whole test {:?}", started.elapsed());
    s.db.drop_schema().await;
}

#[tokio::test]
async fn a_session_row_held_elsewhere_is_resealed_once_released_and_its_write_kept() {
    use tower_pg_session::crypto::EncryptionKey;
    let db = Db::new().await;
    let store = db.store().await;
    let (old, new) = (
        EncryptionKey::from_bytes([5; 32]),
        EncryptionKey::from_bytes([6; 32]),
    );
    let old_ring = Keyring::new(vec![old.clone()]).unwrap();
    let rotated = Keyring::new(vec![new.clone(), old]).unwrap();
    let t = db.table();
    let seal = |keys: &Keyring, sid: &str| keys.seal(b"{\"sub\":\"x\"}", &vault_aad(sid, "oidc"));
    for n in 0..10 {
        let sid = format!("sid-{n}");
        sqlx::query(&format!(
            "INSERT INTO {t} (sid, sess, expire) VALUES ($1, $2::json, now() + interval '1 hour')"
        ))
        .bind(&sid)
        .bind(json!({ "oidc": seal(&old_ring, &sid), "n": n }).to_string())
        .execute(&db.pool)
        .await
        .unwrap();
    }
    // A request holds one row (as the guard does during a token refresh).
    let mut holder = db.pool.begin().await.unwrap();
    sqlx::query(&format!("SELECT 1 FROM {t} WHERE sid = 'sid-3' FOR UPDATE"))
        .execute(&mut *holder)
        .await
        .unwrap();
    let (st, keys) = (store.clone(), rotated.clone());
    let reseal = tokio::spawn(async move { st.reseal_sessions(&keys, 4).await });
    let old_id = key_id(&old_ring);
    common::eventually("every free row resealed", || async {
        let usage = store.session_key_usage().await.unwrap();
        usage.iter().find(|u| u.key_id == old_id).map(|u| u.values) == Some(1)
    })
    .await;
    assert!(!reseal.is_finished(), "it waits for the held row");
    // The holder writes the row (a new record and data of its own) and commits.
    sqlx::query(&format!(
        "UPDATE {t} SET sess = $1::json WHERE sid = 'sid-3'"
    ))
    .bind(json!({ "oidc": seal(&old_ring, "sid-3"), "n": 3, "refreshed": true }).to_string())
    .execute(&mut *holder)
    .await
    .unwrap();
    holder.commit().await.unwrap();
    let outcome = reseal.await.unwrap().unwrap();
    assert_eq!((outcome.resealed, outcome.unreadable), (10, 0));
    let sess: String =
        sqlx::query_scalar(&format!("SELECT sess::text FROM {t} WHERE sid = 'sid-3'"))
            .fetch_one(&db.pool)
            .await
            .unwrap();
    let data: Value = serde_json::from_str(&sess).unwrap();
    assert_eq!(data["refreshed"], json!(true), "the holder's write is kept");
    Keyring::new(vec![new])
        .unwrap()
        .open(data["oidc"].as_str().unwrap(), &vault_aad("sid-3", "oidc"))
        .expect("resealed after the holder's write");
    db.drop_schema().await;
}

#[tokio::test]
async fn a_vault_row_held_by_a_refresh_is_resealed_once_released_and_the_refresh_kept() {
    use tower_pg_session::crypto::EncryptionKey;
    let s = setup("keycloak").await;
    let (old, new) = (
        EncryptionKey::from_bytes([3; 32]),
        EncryptionKey::from_bytes([4; 32]),
    );
    let old_ring = Keyring::new(vec![old.clone()]).unwrap();
    let before = TokenVault::new(&s.store, old_ring.clone(), s.config())
        .await
        .unwrap();
    for n in 0..10 {
        let tokens = Tokens::new(format!("access-{n}")).with_refresh_token(format!("refresh-{n}"));
        before
            .store(&format!("user-{n}"), "mail", tokens)
            .await
            .unwrap();
    }
    let rotated = TokenVault::new(
        &s.store,
        Keyring::new(vec![new.clone(), old]).unwrap(),
        s.config(),
    )
    .await
    .unwrap();
    assert_eq!(rotated.rows_to_reseal().await.unwrap(), 10);
    // A refresh holds one row, waiting on its provider.
    let t = s.table();
    let mut holder = s.db.pool.begin().await.unwrap();
    sqlx::query(&format!(
        "SELECT 1 FROM {t} WHERE user_id = 'user-3' AND integration = 'mail' FOR UPDATE"
    ))
    .execute(&mut *holder)
    .await
    .unwrap();
    let vault = rotated.clone();
    let reseal = tokio::spawn(async move { vault.reseal(4).await });
    common::eventually("every free row resealed", || async {
        rotated.rows_to_reseal().await.unwrap() == 1
    })
    .await;
    assert!(!reseal.is_finished(), "it comes back for the held row");
    // The refresh ends: an instance still sealing with the old key writes
    // the new tokens, and commits.
    let binding = "vault:6:user-3:mail";
    let seal =
        |token: &str, field: &str| old_ring.seal(token.as_bytes(), &vault_aad(binding, field));
    sqlx::query(&format!(
        "UPDATE {t} SET access_token = $1, refresh_token = $2, last_refreshed_at = now() \
         WHERE user_id = 'user-3' AND integration = 'mail'"
    ))
    .bind(seal("access-3-refreshed", "vault.access_token"))
    .bind(seal("refresh-3-refreshed", "vault.refresh_token"))
    .execute(&mut *holder)
    .await
    .unwrap();
    holder.commit().await.unwrap();
    let outcome = tokio::time::timeout(Duration::from_secs(30), reseal)
        .await
        .expect("the reseal finishes once the row is released")
        .unwrap()
        .unwrap();
    assert_eq!((outcome.resealed, outcome.unreadable), (10, 0));
    assert_eq!(rotated.rows_to_reseal().await.unwrap(), 0);
    // The refresh is kept, and it opens under the new key alone.
    let after = TokenVault::new(&s.store, Keyring::new(vec![new]).unwrap(), s.config())
        .await
        .unwrap();
    assert_eq!(
        after.get("user-3", "mail").await.unwrap().secret(),
        "access-3-refreshed"
    );
    assert_eq!(
        after.get("user-4", "mail").await.unwrap().secret(),
        "access-4"
    );
    s.db.drop_schema().await;
}

#[tokio::test]
async fn import_reseal_and_erasure_log_no_token_material() {
    use tower_pg_session::{crypto::EncryptionKey, vault::ImportSource};
    logs();
    let s = setup("keycloak").await;
    let old = Keyring::new(vec![EncryptionKey::from_bytes([1; 32])]).unwrap();
    let vault = TokenVault::new(&s.store, old.clone(), s.config())
        .await
        .unwrap();
    let legacy = format!("\"{}\".\"plain\"", s.db.schema);
    use sqlx::Executor;
    s.db.pool
        .execute(&*format!(
            "CREATE TABLE {legacy} (user_id text, integration text, access_token text, \
               refresh_token text, expires_at timestamptz); \
             INSERT INTO {legacy} VALUES \
               ('pia', 'mail', 'plain-secret-at-1', 'plain-secret-rt-1', NULL), \
               ('quin', 'fax', 'plain-secret-at-2', NULL, NULL), \
               ('rae', 'mail', 'plain-secret-' || repeat('x', 20000), NULL, NULL)"
        ))
        .await
        .unwrap();
    let source = ImportSource::new(Some(&s.db.schema), "plain").unwrap();
    vault.import(&source, true).await.unwrap();
    assert_eq!(vault.import(&source, false).await.unwrap().imported, 1);
    // A login record in a session, sealed under the old key.
    let record = old.seal(
        b"{\"at\":\"plain-secret-at-3\"}",
        &vault_aad("sid-1", "oidc"),
    );
    sqlx::query(&format!(
        "INSERT INTO {} (sid, sess, expire) VALUES ('sid-1', $1::json, now() + interval '1 hour')",
        s.db.table()
    ))
    .bind(json!({ "oidc": record }).to_string())
    .execute(&s.db.pool)
    .await
    .unwrap();
    let sealed: Vec<String> = sqlx::query_scalar(&format!(
        "SELECT access_token FROM {} UNION ALL SELECT refresh_token FROM {}",
        s.table(),
        s.table()
    ))
    .fetch_all(&s.db.pool)
    .await
    .unwrap();

    let rotated = Keyring::new(vec![
        EncryptionKey::from_bytes([2; 32]),
        EncryptionKey::from_bytes([1; 32]),
    ])
    .unwrap();
    let new_vault = TokenVault::new(&s.store, rotated.clone(), s.config())
        .await
        .unwrap();
    assert_eq!(new_vault.reseal(10).await.unwrap().resealed, 1);
    assert_eq!(
        s.store
            .reseal_sessions(&rotated, 10)
            .await
            .unwrap()
            .resealed,
        1
    );
    s.store
        .admin()
        .with_vault(&new_vault)
        .erase_user("pia")
        .await
        .unwrap();

    let text = String::from_utf8(logs().lock().unwrap().clone()).unwrap();
    for span in [
        "vault_import",
        "vault_reseal",
        "session_reseal",
        "row not imported",
    ] {
        assert!(text.contains(span), "{span} is logged: {text}");
    }
    assert!(!text.contains("plain-secret"), "a token was logged: {text}");
    for value in sealed.iter().chain([&record]) {
        assert!(!text.contains(&value[8..40]), "a ciphertext was logged");
    }
    assert!(!text.contains("sid-1"), "a session id was logged");
    s.db.drop_schema().await;
}

#[tokio::test]
async fn session_reseal_keeps_express_rows_intact_on_connect_pg_simple_tables() {
    use sqlx::Executor;
    use tower_pg_session::{crypto::EncryptionKey, PgStore};
    for (sess_type, expire_type) in [("json", "timestamp(6)"), ("jsonb", "timestamptz")] {
        let db = Db::new().await;
        db.pool
            .execute(&*format!(
                "CREATE SCHEMA {s}; \
                 CREATE TABLE {s}.session (sid varchar NOT NULL COLLATE \"default\", \
                   sess {sess_type} NOT NULL, expire {expire_type} NOT NULL); \
                 ALTER TABLE {s}.session ADD CONSTRAINT session_pkey PRIMARY KEY (sid); \
                 CREATE INDEX \"IDX_session_expire\" ON {s}.session (expire);",
                s = db.schema
            ))
            .await
            .unwrap();
        let store = PgStore::new(db.pool.clone(), db.config().with_create_table(false))
            .await
            .unwrap();
        let old = Keyring::new(vec![EncryptionKey::from_bytes([8; 32])]).unwrap();
        let rotated = Keyring::new(vec![
            EncryptionKey::from_bytes([9; 32]),
            EncryptionKey::from_bytes([8; 32]),
        ])
        .unwrap();
        let cookie = r#"{"originalMaxAge":86400000,"expires":"2030-01-01T00:00:00.000Z","secure":false,"httpOnly":true,"path":"/","sameSite":"lax"}"#;
        for (sid, live) in [("live", true), ("gone", false)] {
            let record = old.seal(b"{}", &vault_aad(sid, "oidc"));
            let sess =
                format!(r#"{{"cookie":{cookie},"oidc":"{record}","passport":{{"user":"ann"}}}}"#);
            let expire = if live {
                "+ interval '1 hour'"
            } else {
                "- interval '1 hour'"
            };
            sqlx::query(&format!(
                "INSERT INTO {} (sid, sess, expire) VALUES ($1, $2::{sess_type}, \
                 (now() AT TIME ZONE current_setting('log_timezone')) {expire})",
                db.table()
            ))
            .bind(sid)
            .bind(&sess)
            .execute(&db.pool)
            .await
            .unwrap();
        }
        let usage = store.session_key_usage().await.unwrap();
        assert_eq!(usage.len(), 1, "live sessions only: {usage:?}");
        assert_eq!(usage[0].values, 1);
        let outcome = store.reseal_sessions(&rotated, 10).await.unwrap();
        assert_eq!(
            (outcome.resealed, outcome.unreadable),
            (1, 0),
            "{sess_type}"
        );
        let usage = store.session_key_usage().await.unwrap();
        assert_eq!(usage[0].key_id, key_id(&rotated), "{sess_type}");

        let read = |sid: &'static str| {
            let db = &db;
            async move {
                let text: String = sqlx::query_scalar(&format!(
                    "SELECT sess::text FROM {} WHERE sid = $1",
                    db.table()
                ))
                .bind(sid)
                .fetch_one(&db.pool)
                .await
                .unwrap();
                text
            }
        };
        let live = read("live").await;
        if sess_type == "json" {
            // Written back as read, but for the one value.
            assert!(
                live.starts_with(&format!(r#"{{"cookie":{cookie},"oidc":""#)),
                "{live}"
            );
            assert!(live.ends_with(r#","passport":{"user":"ann"}}"#), "{live}");
        }
        let data: Value = serde_json::from_str(&live).unwrap();
        assert_eq!(
            data["cookie"],
            serde_json::from_str::<Value>(cookie).unwrap()
        );
        assert_eq!(data["passport"], json!({"user": "ann"}));
        Keyring::new(vec![EncryptionKey::from_bytes([9; 32])])
            .unwrap()
            .open(data["oidc"].as_str().unwrap(), &vault_aad("live", "oidc"))
            .unwrap();
        let gone: Value = serde_json::from_str(&read("gone").await).unwrap();
        assert!(
            gone["oidc"]
                .as_str()
                .unwrap()
                .starts_with(&key_id_b64(&old)),
            "an expired row is left to the pruner"
        );
        db.drop_schema().await;
    }
}

/// The first characters of a value sealed under `keys`' first key (the
/// version byte and the key id, in base64url).
fn key_id_b64(keys: &Keyring) -> String {
    let mut header = vec![1u8];
    header.extend_from_slice(keys.current_key_id().as_bytes());
    header.push(0);
    URL_SAFE_NO_PAD.encode(&header)[..6].to_owned()
}

#[tokio::test]
async fn the_vault_stores_gets_and_refreshes_through_pgbouncer_in_transaction_mode() {
    use tower_pg_session::Pooler;
    let s = setup("keycloak").await;
    let bouncer = common::pgbouncer::PgBouncer::start().await;
    let store = PgStore::new(
        bouncer.pool(4).await,
        s.db.config().with_pooler(Pooler::Transaction),
    )
    .await
    .unwrap();
    let vault = TokenVault::new(&store, s.keys.clone(), s.config())
        .await
        .unwrap_or_else(|e| panic!("{e:?}\n{}", bouncer.log()));
    let connected = s
        .connect_and_store(&vault, "olga", Duration::from_secs(3600))
        .await;
    // Many statements in a row, each on whichever server connection is free.
    for _ in 0..20 {
        assert_eq!(
            vault.get("olga", "mail").await.unwrap().secret(),
            connected["access_token"].as_str().unwrap()
        );
    }
    s.expire_in("olga", 30).await;
    let refreshed = vault.get("olga", "mail").await.unwrap();
    assert_ne!(
        refreshed.secret(),
        connected["access_token"].as_str().unwrap()
    );
    assert_eq!(s.refreshes().await, 1);
    assert_eq!(vault.list("olga").await.unwrap().len(), 1);
    assert_eq!(vault.key_usage().await.unwrap()[0].values, 2);
    assert_eq!(vault.record_gauges().await.unwrap()[0].tokens, 1);
    assert!(vault.remove("olga", "mail").await.unwrap());
    s.db.drop_schema().await;
}
// ------------------------------------------------------------------ connect

mod connecting {
    use axum::{
        extract::{Path, Query, RawQuery, State},
        response::IntoResponse,
        routing::get,
        Router,
    };
    use reqwest::StatusCode;
    use serde::Deserialize;
    use tower_pg_session::{
        oidc::{OidcClient, OidcConfig},
        Session, SessionLayer, SigningKeys,
    };

    use super::*;
    use common::idp::{absolute, location};

    /// An app with the login and the vault's connect routes on a real
    /// socket, the local provider acting as the `mail` integration.
    pub(super) struct App {
        pub(super) s: Setup,
        pub(super) url: String,
        pub(super) vault: TokenVault,
        _server: Server,
    }

    /// The app's server task, stopped with the test.
    struct Server(tokio::task::JoinHandle<()>);

    impl Drop for Server {
        fn drop(&mut self) {
            self.0.abort();
        }
    }

    #[derive(Clone)]
    struct AppState {
        login: OidcClient,
        vault: TokenVault,
    }

    #[derive(Deserialize)]
    struct ReturnTo {
        return_to: Option<String>,
    }

    pub(super) async fn app(tweak: impl FnOnce(Integration) -> Integration) -> App {
        app_with(tweak, |c| c).await
    }

    pub(super) async fn app_with(
        tweak: impl FnOnce(Integration) -> Integration,
        configure: impl FnOnce(VaultConfig) -> VaultConfig,
    ) -> App {
        app_env(&[], |c| c, tweak, configure).await
    }

    /// As [`app_with`], with `env` for the provider and `login` changing the
    /// login's configuration (the same client: its authentication too).
    pub(super) async fn app_env(
        env: &[(&str, &str)],
        login: impl FnOnce(OidcConfig) -> OidcConfig,
        tweak: impl FnOnce(Integration) -> Integration,
        configure: impl FnOnce(VaultConfig) -> VaultConfig,
    ) -> App {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://127.0.0.1:{}", listener.local_addr().unwrap().port());
        let db = Db::new().await;
        let idp = Idp::start_env("keycloak", std::slice::from_ref(&url), 3600, 0, env).await;
        let store = db.store().await;
        let keys = Keyring::generate();
        let s = Setup {
            db,
            idp,
            store,
            keys,
            flavor: "keycloak",
        };
        let login_config = OidcConfig::new(&s.idp.issuer, CLIENT_ID, &url, s.keys.clone())
            .unwrap()
            .with_client_secret(CLIENT_SECRET);
        let login = OidcClient::discover(login(login_config), s.store.clone())
            .await
            .unwrap();
        let mail = Integration::discover("mail", &s.idp.issuer, CLIENT_ID)
            .await
            .unwrap()
            .with_client_secret(CLIENT_SECRET)
            .with_redirect_uri(&format!("{url}/integrations/mail/callback"))
            .unwrap()
            .add_scope("openid")
            .unwrap()
            .add_scope("email")
            .unwrap();
        let config = configure(s.config().with_integration(tweak(mail)));
        let vault = TokenVault::new(&s.store, s.keys.clone(), config)
            .await
            .unwrap();
        let state = AppState {
            login,
            vault: vault.clone(),
        };
        let router = router(state, &s.store);
        let server = tokio::spawn(async move {
            let _ = axum::serve(listener, router).await;
        });
        App {
            s,
            url,
            vault,
            _server: Server(server),
        }
    }

    /// The login's and the vault's connect routes.
    fn router(state: AppState, store: &PgStore) -> Router {
        let layer =
            SessionLayer::builder(store.clone(), SigningKeys::new([common::KEY_A]).unwrap())
                .with_insecure_http_cookie()
                .build()
                .unwrap();
        Router::new()
            .route(
                "/auth/login",
                get(|State(a): State<AppState>, session: Session, Query(q): Query<ReturnTo>| async move {
                    a.login.login(&session, q.return_to.as_deref()).await
                }),
            )
            .route(
                "/auth/callback",
                get(|State(a): State<AppState>, session: Session, RawQuery(q): RawQuery| async move {
                    a.login.callback(&session, q.as_deref()).await.map(|(r, _)| r)
                }),
            )
            .route(
                "/integrations/{name}/connect",
                get(|State(a): State<AppState>, session: Session, Path(name): Path<String>, Query(q): Query<ReturnTo>| async move {
                    a.vault.connect(&session, &name, q.return_to.as_deref()).await
                }),
            )
            .route(
                "/integrations/{name}/callback",
                get(|State(a): State<AppState>, session: Session, headers: axum::http::HeaderMap, RawQuery(q): RawQuery| async move {
                    let peer = "127.0.0.1".parse().ok();
                    match a.vault.connect_callback_audited(&session, q.as_deref(), &headers, peer).await {
                        Ok((redirect, _)) => redirect.into_response(),
                        Err(e) => e.into_response(),
                    }
                }),
            )
            .route(
                "/keys",
                get(|session: Session| async move {
                    axum::Json(session.keys().await.unwrap())
                }),
            )
            .with_state(state)
            .layer(layer)
    }

    impl App {
        /// A browser logged in at the app as `user`.
        pub(super) async fn logged_in(&self, user: &str) -> Browser {
            let browser = Browser::new();
            let r = browser.login(&self.url, user, "/").await;
            assert_eq!(r.status(), StatusCode::FOUND, "login");
            browser
        }

        /// Starts connecting `mail`: the provider URL the app redirects to.
        pub(super) async fn start(&self, browser: &Browser, return_to: &str) -> String {
            let r = browser
                .get(&format!(
                    "{}/integrations/mail/connect?return_to={}",
                    self.url,
                    common::idp::urlencode(return_to)
                ))
                .await;
            assert_eq!(r.status(), StatusCode::FOUND, "connect");
            location(&r)
        }

        /// The callback URL the provider sends the browser back to.
        pub(super) async fn consent(&self, browser: &Browser, user: &str) -> String {
            let auth = self.start(browser, "/settings").await;
            absolute(&auth, &browser.authorize(&auth, user).await)
        }

        pub(super) async fn rows(&self) -> i64 {
            sqlx::query_scalar(&format!("SELECT count(*) FROM {}", self.s.table()))
                .fetch_one(&self.s.db.pool)
                .await
                .unwrap()
        }
    }

    pub(super) fn param(url: &str, name: &str) -> Option<String> {
        url::Url::parse(url)
            .unwrap()
            .query_pairs()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.into_owned())
    }

    pub(super) async fn error_of(r: reqwest::Response) -> (StatusCode, String) {
        let status = r.status();
        let body: Value = r.json().await.unwrap();
        (
            status,
            body["error"].as_str().unwrap_or_default().to_owned(),
        )
    }
}

#[tokio::test]
async fn a_logged_in_user_connects_an_account_once() {
    let app = connecting::app(|i| i).await;
    let browser = app.logged_in("alice").await;
    let auth = app.start(&browser, "/settings?tab=mail").await;
    assert!(auth.starts_with(&app.s.idp.issuer), "{auth}");
    assert_eq!(
        connecting::param(&auth, "code_challenge_method").as_deref(),
        Some("S256")
    );
    assert_eq!(
        connecting::param(&auth, "scope").as_deref(),
        Some("openid email")
    );
    let callback = common::idp::absolute(&auth, &browser.authorize(&auth, "alice").await);
    assert!(callback.starts_with(&format!("{}/integrations/mail/callback?", app.url)));

    let r = browser.get(&callback).await;
    assert_eq!(r.status(), reqwest::StatusCode::FOUND);
    assert_eq!(common::idp::location(&r), "/settings?tab=mail");
    let token = app.vault.get("alice", "mail").await.unwrap();
    assert!(!token.secret().is_empty());
    let listed = app.vault.list("alice").await.unwrap();
    assert_eq!(listed.len(), 1);
    assert!(listed[0].refreshable, "the provider issued a refresh token");
    // The stored access token works at the provider.
    let userinfo: Value = reqwest::Client::new()
        .get(format!(
            "{}/protocol/openid-connect/userinfo",
            app.s.idp.issuer
        ))
        .bearer_auth(token.secret())
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(userinfo["sub"], "alice");

    // The same callback again: refused, the stored token untouched.
    let before = app.s.column("alice", "access_token").await;
    let r = browser.get(&callback).await;
    let (status, error) = connecting::error_of(r).await;
    assert_eq!((status.as_u16(), error.as_str()), (400, "invalid_callback"));
    assert_eq!(app.s.column("alice", "access_token").await, before);
    assert_eq!(app.rows().await, 1);
    app.s.db.drop_schema().await;
}

#[tokio::test]
async fn a_forged_or_foreign_state_stores_nothing() {
    let app = connecting::app(|i| i).await;
    let alice = app.logged_in("alice").await;
    let callback = app.consent(&alice, "alice").await;
    let code = connecting::param(&callback, "code").unwrap();
    for query in [
        format!("state=forged&code={code}"),
        format!("code={code}"),
        "state=x&state=y&code=c".to_owned(),
    ] {
        let r = alice
            .api(&format!("{}/integrations/mail/callback?{query}", app.url))
            .await;
        let (status, error) = connecting::error_of(r).await;
        assert_eq!(
            (status.as_u16(), error.as_str()),
            (400, "invalid_callback"),
            "{query}"
        );
    }
    // Another logged-in browser cannot complete alice's connection.
    let mallory = app.logged_in("mallory").await;
    let (status, _) = connecting::error_of(mallory.api(&callback).await).await;
    assert_eq!(status.as_u16(), 400);
    assert_eq!(app.rows().await, 0);
    // Application code cannot plant a pending connection either: the key is
    // reserved (pinned in the session's unit tests), and what alice's
    // browser holds is the sealed record under it.
    let keys: Vec<String> = alice
        .api(&format!("{}/keys", app.url))
        .await
        .json()
        .await
        .unwrap();
    assert!(
        keys.iter().any(|k| k.starts_with("vault.connect.")),
        "{keys:?}"
    );
    app.s.db.drop_schema().await;
}

#[tokio::test]
async fn return_to_another_origin_ends_on_a_local_path() {
    let app = connecting::app(|i| i).await;
    let browser = app.logged_in("alice").await;
    for evil in [
        "https://evil.example/",
        "//evil.example/x",
        "/\\evil.example",
    ] {
        let auth = app.start(&browser, evil).await;
        let callback = common::idp::absolute(&auth, &browser.authorize(&auth, "alice").await);
        let r = browser.get(&callback).await;
        assert_eq!(r.status(), reqwest::StatusCode::FOUND, "{evil}");
        assert_eq!(common::idp::location(&r), "/", "{evil}");
    }
    app.s.db.drop_schema().await;
}

#[tokio::test]
async fn connecting_needs_a_login() {
    let app = connecting::app(|i| i).await;
    let browser = Browser::new();
    let r = browser
        .api(&format!(
            "{}/integrations/mail/connect?return_to=/x",
            app.url
        ))
        .await;
    let (status, error) = connecting::error_of(r).await;
    assert_eq!((status.as_u16(), error.as_str()), (401, "not_logged_in"));
    let keys: Vec<String> = browser
        .api(&format!("{}/keys", app.url))
        .await
        .json()
        .await
        .unwrap();
    assert!(keys.is_empty(), "nothing pending: {keys:?}");
    // An integration without an authorization set-up cannot be connected.
    let logged_in = app.logged_in("alice").await;
    let r = logged_in
        .api(&format!("{}/integrations/nope/connect", app.url))
        .await;
    assert_eq!(connecting::error_of(r).await.0.as_u16(), 404);
    app.s.db.drop_schema().await;
}

#[tokio::test]
async fn a_provider_error_consumes_the_state_and_is_logged_escaped() {
    logs();
    let app = connecting::app(|i| i).await;
    let browser = app.logged_in("alice").await;
    let callback = app.consent(&browser, "alice").await;
    let state = connecting::param(&callback, "state").unwrap();
    let r = browser
        .api(&format!(
            "{}/integrations/mail/callback?state={}&error=access_denied&error_description={}",
            app.url,
            common::idp::urlencode(&state),
            common::idp::urlencode("no\nFAKE line")
        ))
        .await;
    let (status, error) = connecting::error_of(r).await;
    assert_eq!((status.as_u16(), error.as_str()), (403, "consent_refused"));
    // The state is gone: the real code cannot be used with it any more.
    let (status, _) = connecting::error_of(browser.api(&callback).await).await;
    assert_eq!(status.as_u16(), 400);
    assert_eq!(app.rows().await, 0);
    let text = String::from_utf8(logs().lock().unwrap().clone()).unwrap();
    assert!(text.contains("access_denied: no\\nFAKE line"), "{text}");
    assert!(!text.contains("no\nFAKE"), "{text}");
    app.s.db.drop_schema().await;
}

#[tokio::test]
async fn a_malformed_or_oversized_token_response_stores_nothing() {
    let app = connecting::app(|i| i).await;
    let browser = app.logged_in("alice").await;
    for (mode, size) in [("malformed", 0), ("oversized", 20_000), ("unavailable", 0)] {
        let callback = app.consent(&browser, "alice").await;
        app.s.fault(mode, 1, size).await;
        let (status, error) = connecting::error_of(browser.api(&callback).await).await;
        let expected = match mode {
            "unavailable" => "provider_unavailable",
            _ => "invalid_response",
        };
        assert_eq!((status.as_u16(), error.as_str()), (502, expected), "{mode}");
        assert_eq!(app.rows().await, 0, "{mode}");
    }
    app.s.db.drop_schema().await;
}

#[tokio::test]
async fn a_plain_oauth_integration_connects_with_configured_endpoints() {
    // Endpoints given by hand, no issuer: OAuth 2.0 without discovery (the
    // local provider grants nothing without a scope it knows).
    let app = connecting::app(|found| {
        Integration::new("mail", found.token_endpoint(), CLIENT_ID)
            .unwrap()
            .with_client_secret(CLIENT_SECRET)
            .with_authorization_endpoint(found.authorization_endpoint().unwrap())
            .unwrap()
            .with_redirect_uri(found.redirect_uri().unwrap())
            .unwrap()
            .add_scope("openid")
            .unwrap()
    })
    .await;
    let browser = app.logged_in("bob").await;
    let auth = app.start(&browser, "/").await;
    assert_eq!(connecting::param(&auth, "scope").as_deref(), Some("openid"));
    let callback = common::idp::absolute(&auth, &browser.authorize(&auth, "bob").await);
    let r = browser.get(&callback).await;
    assert_eq!(r.status(), reqwest::StatusCode::FOUND, "{callback}");
    assert!(app.vault.get("bob", "mail").await.is_ok());
    app.s.db.drop_schema().await;
}

#[tokio::test]
async fn list_all_pages_through_every_users_connections() {
    let s = setup("keycloak").await;
    let vault = s.vault().await;
    for user in ["carol", "alice", "bob"] {
        vault
            .store(user, "mail", Tokens::new(format!("token-of-{user}")))
            .await
            .unwrap();
    }
    let first = vault.list_all(None, 2).await.unwrap();
    let users: Vec<&str> = first.iter().map(|(u, _)| u.as_str()).collect();
    assert_eq!(users, ["alice", "bob"]);
    let (last_user, last) = first.last().unwrap();
    let rest = vault
        .list_all(Some((last_user, &last.integration)), 2)
        .await
        .unwrap();
    let users: Vec<&str> = rest.iter().map(|(u, _)| u.as_str()).collect();
    assert_eq!(users, ["carol"]);
    assert_eq!(rest[0].1.integration, "mail");
    s.db.drop_schema().await;
}

#[tokio::test]
async fn the_connect_audit_records_the_client_only_when_on() {
    use tower_pg_session::vault::ClientIp;

    let audit_row = |app: &connecting::App| {
        let (pool, table) = (app.s.db.pool.clone(), app.s.table());
        async move {
            sqlx::query_as::<_, (Option<String>, Option<String>)>(&format!(
                "SELECT host(connect_ip), connect_user_agent FROM {table}"
            ))
            .fetch_one(&pool)
            .await
            .unwrap()
        }
    };
    for on in [false, true] {
        let app = connecting::app_with(
            |i| i,
            |c| {
                if on {
                    c.with_connect_audit(ClientIp::LastForwardedFor)
                } else {
                    c
                }
            },
        )
        .await;
        let browser = app.logged_in("alice").await;
        let callback = app.consent(&browser, "alice").await;
        let r = browser
            .http
            .get(&callback)
            .header("x-forwarded-for", "6.6.6.6, 203.0.113.7")
            .header("user-agent", format!("Mozilla/5.0 {}", "x".repeat(2000)))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), reqwest::StatusCode::FOUND);
        let (ip, ua) = audit_row(&app).await;
        if on {
            assert_eq!(ip.as_deref(), Some("203.0.113.7"));
            let ua = ua.unwrap();
            assert!(
                ua.starts_with("Mozilla/5.0 x") && ua.len() == 512,
                "{}",
                ua.len()
            );
        } else {
            assert_eq!((ip, ua), (None, None));
        }
        // A later store (a refresh, an import) leaves what was recorded.
        app.vault
            .store("alice", "mail", Tokens::new("replaced".to_owned()))
            .await
            .unwrap();
        assert_eq!(audit_row(&app).await.0.is_some(), on);
        app.s.db.drop_schema().await;
    }
}

#[tokio::test]
async fn an_existing_table_gains_the_audit_columns_at_concurrent_start_ups() {
    let s = setup("keycloak").await;
    // The table as the first version created it, with a row.
    let t = s.table();
    sqlx::query(&format!("CREATE SCHEMA IF NOT EXISTS {}", s.db.schema))
        .execute(&s.db.pool)
        .await
        .unwrap();
    sqlx::query(&format!(
        "CREATE TABLE {t} (user_id text NOT NULL, integration text NOT NULL, \
           access_token text NOT NULL, refresh_token text, expires_at timestamptz, \
           scopes text[] NOT NULL DEFAULT '{{}}', token_type text NOT NULL DEFAULT 'Bearer', \
           needs_reconsent_at timestamptz, created_at timestamptz NOT NULL DEFAULT now(), \
           updated_at timestamptz NOT NULL DEFAULT now(), last_used_at timestamptz, \
           last_refreshed_at timestamptz, PRIMARY KEY (user_id, integration))"
    ))
    .execute(&s.db.pool)
    .await
    .unwrap();
    let old = s.vault().await;
    old.store("dora", "mail", Tokens::new("kept-token".to_owned()))
        .await
        .unwrap();
    sqlx::query(&format!(
        "ALTER TABLE {t} DROP COLUMN connect_ip, DROP COLUMN connect_user_agent"
    ))
    .execute(&s.db.pool)
    .await
    .unwrap();

    let starts: Vec<_> = (0..4)
        .map(|_| {
            let (store, keys, config) = (s.store.clone(), s.keys.clone(), s.config());
            tokio::spawn(async move { TokenVault::new(&store, keys, config).await })
        })
        .collect();
    for start in starts {
        start.await.unwrap().unwrap();
    }
    let columns: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM information_schema.columns \
         WHERE table_schema = $1 AND table_name = 'oauth_tokens' \
           AND column_name IN ('connect_ip', 'connect_user_agent')",
    )
    .bind(&s.db.schema)
    .fetch_one(&s.db.pool)
    .await
    .unwrap();
    assert_eq!(columns, 2);
    assert_eq!(
        s.vault().await.get("dora", "mail").await.unwrap().secret(),
        "kept-token"
    );
    s.db.drop_schema().await;
}

#[tokio::test]
async fn an_expired_connection_is_refused_and_stores_nothing() {
    let app = connecting::app_with(|i| i, |c| c.with_connect_ttl(Duration::ZERO)).await;
    let browser = app.logged_in("alice").await;
    let callback = app.consent(&browser, "alice").await;
    let r = browser.api(&callback).await;
    let status = r.status();
    let body: Value = r.json().await.unwrap();
    assert_eq!(status.as_u16(), 400, "{body}");
    assert_eq!(body["error"], "invalid_callback");
    assert!(
        body["error_description"]
            .as_str()
            .unwrap()
            .contains("took too long"),
        "{body}"
    );
    assert_eq!(app.rows().await, 0);
    app.s.db.drop_schema().await;
}

/// The vault authenticates its token and revocation requests with the JWT
/// methods too: the provider, registered for each method, takes the code
/// exchange, a refresh and the revocation at removal only so.
#[tokio::test]
async fn the_vault_authenticates_with_client_secret_jwt_and_private_key_jwt() {
    use tower_pg_session::oidc::{ClientAuth as LoginAuth, KeyAlg, OidcConfig};
    use tower_pg_session::vault::ClientAuth;
    let key = common::keys::key(KeyAlg::Es256);
    let jwks = common::keys::jwks(&[&key]);
    let cases = [
        (
            "client_secret_jwt",
            LoginAuth::SecretJwt,
            ClientAuth::SecretJwt,
            "HS256",
        ),
        (
            "private_key_jwt",
            LoginAuth::PrivateKeyJwt,
            ClientAuth::PrivateKeyJwt,
            "ES256",
        ),
    ];
    for (method, login_auth, vault_auth, alg) in cases {
        let env = [
            ("IDP_CLIENT_AUTH", method),
            ("IDP_CLIENT_JWKS", jwks.as_str()),
        ];
        let k = key.clone();
        let login = |c: OidcConfig| c.with_client_auth(login_auth).with_client_keys([k]);
        let k = key.clone();
        let tweak = |i: Integration| i.with_client_auth(vault_auth).with_client_keys([k]);
        let app = connecting::app_env(&env, login, tweak, |c| c).await;
        let browser = app.logged_in("alice").await;
        let callback = app.consent(&browser, "alice").await;
        assert_eq!(
            browser.get(&callback).await.status(),
            reqwest::StatusCode::FOUND
        );
        let first = app.vault.get("alice", "mail").await.unwrap();
        app.s.expire_in("alice", 30).await;
        let refreshed = app.vault.get("alice", "mail").await.unwrap();
        assert_ne!(refreshed.secret(), first.secret(), "{method}");
        assert_eq!(app.s.refreshes().await, 1, "{method}");
        assert!(app.vault.remove("alice", "mail").await.unwrap());
        let revoked = app.s.idp.revocations().await;
        assert_eq!(revoked.len(), 1, "{method}: {revoked:?}");
        let r = &revoked[0];
        assert_eq!(
            (&r["method"], &r["alg"], &r["status"]),
            (&json!(method), &json!(alg), &json!(200))
        );
        app.s.db.drop_schema().await;
    }
}
