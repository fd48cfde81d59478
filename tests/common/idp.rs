//! The local OpenID provider (tests/idp, oidc-provider) and an app that logs
//! in through it, served on real sockets so the provider can call back.

use std::{
    path::PathBuf,
    process::Stdio,
    sync::{Arc, Mutex},
};

use axum::{
    extract::{Path, State},
    http::{header, StatusCode},
    response::{IntoResponse, Response},
    routing::get,
    Json, Router,
};
use serde_json::{json, Value};
use tokio::{
    io::{AsyncBufReadExt, BufReader},
    process::{Child, ChildStdin, Command},
};
use tower_pg_session::{
    crypto::{EncryptionKey, Keyring},
    oidc::{AccessToken, OidcClient, OidcConfig, RequireLoginLayer, User},
    PgStore, Session, SessionLayer, SigningKeys,
};

use super::{Db, KEY_A};

pub const CLIENT_ID: &str = "demo";
pub const CLIENT_SECRET: &str = "demo-secret";

/// The provider process; it exits when this is dropped (stdin closes, and
/// the child is killed).
pub struct Idp {
    _child: Child,
    _stdin: ChildStdin,
    pub issuer: String,
    pub base: String,
    http: reqwest::Client,
}

fn idp_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/idp")
}

impl Idp {
    /// Starts the provider in `flavor` ("keycloak" or "cognito") with one
    /// client registered for the app at `app_url`.
    pub async fn start(flavor: &str, app_urls: &[String], access_ttl: u64) -> Self {
        Self::start_on(flavor, app_urls, access_ttl, 0).await
    }

    /// As [`Self::start`], listening on `port` (0: any free one).
    pub async fn start_on(flavor: &str, app_urls: &[String], access_ttl: u64, port: u16) -> Self {
        Self::start_env(flavor, app_urls, access_ttl, port, &[]).await
    }

    /// As [`Self::start_on`], with extra environment for the provider
    /// (`IDP_PAR`, …).
    pub async fn start_env(
        flavor: &str,
        app_urls: &[String],
        access_ttl: u64,
        port: u16,
        env: &[(&str, &str)],
    ) -> Self {
        assert!(
            idp_dir().join("node_modules").exists(),
            "tests/idp/node_modules is missing: run the tests through scripts/test.sh (it runs npm ci)"
        );
        let clients = json!([{
            "client_id": CLIENT_ID,
            "client_secret": CLIENT_SECRET,
            // The login's callback, and the vault's for connecting the `mail` account.
            "redirect_uris": app_urls
                .iter()
                .flat_map(|u| [format!("{u}/auth/callback"), format!("{u}/integrations/mail/callback")])
                .collect::<Vec<_>>(),
            "post_logout_redirect_uris": app_urls.iter().map(|u| format!("{u}/")).collect::<Vec<_>>(),
            "backchannel_logout_uri": format!("{}/auth/backchannel-logout", app_urls[0]),
            "backchannel_logout_session_required": true,
            "grant_types": ["authorization_code", "refresh_token"],
            "response_types": ["code"],
        }]);
        Self::start_with(flavor, &clients, access_ttl, port, env).await
    }

    /// A provider with these clients (oidc-provider client metadata) and
    /// extra environment.
    pub async fn start_with(
        flavor: &str,
        clients: &Value,
        access_ttl: u64,
        port: u16,
        env: &[(&str, &str)],
    ) -> Self {
        let mut child = Command::new("node")
            .arg(idp_dir().join("server.js"))
            .env("IDP_FLAVOR", flavor)
            .env("IDP_CLIENTS", clients.to_string())
            .env("ACCESS_TOKEN_TTL", access_ttl.to_string())
            .env("PORT", port.to_string())
            .env("IDP_MAX_SECONDS", "600")
            .envs(env.iter().copied())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .expect("node runs");
        let stdin = child.stdin.take().unwrap();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let line = tokio::time::timeout(std::time::Duration::from_secs(30), lines.next_line())
            .await
            .expect("the provider starts within 30 s")
            .unwrap()
            .expect("the provider prints its issuer");
        let info: Value = serde_json::from_str(&line).unwrap();
        let port = info["port"].as_u64().unwrap();
        Self {
            _child: child,
            _stdin: stdin,
            issuer: info["issuer"].as_str().unwrap().to_owned(),
            base: format!("http://127.0.0.1:{port}"),
            http: reqwest::Client::new(),
        }
    }

    /// Token-endpoint requests so far, by grant type.
    pub async fn stats(&self) -> Value {
        get_json(&format!("{}/__test/stats", self.base)).await
    }

    /// From now on the provider answers everything `ms` late (0: at once);
    /// a client gone by then has had nothing done for it.
    pub async fn set_delay(&self, ms: u64) {
        self.delay(ms, false).await;
    }

    /// As [`Self::set_delay`], but the provider reads each form first and
    /// carries it out even when its client has gone by the answer.
    pub async fn set_delay_after_reading(&self, ms: u64) {
        self.delay(ms, true).await;
    }

    async fn delay(&self, ms: u64, read_first: bool) {
        let r = self
            .http
            .post(format!("{}/__test/delay", self.base))
            .json(&json!({ "ms": ms, "read_first": read_first }))
            .send()
            .await
            .unwrap();
        assert!(r.status().is_success());
    }

    pub async fn rotate_keys(&self) {
        let r = self
            .http
            .post(format!("{}/__test/rotate-keys", self.base))
            .send()
            .await
            .unwrap();
        assert!(r.status().is_success());
    }

    /// From now on, tokens issued for `account` (refreshes of its grants
    /// too) name `sub` as their subject.
    pub async fn rename_account(&self, account: &str, sub: &str) {
        let r = self
            .http
            .post(format!("{}/__test/rename-account", self.base))
            .json(&json!({"account": account, "sub": sub}))
            .send()
            .await
            .unwrap();
        assert!(r.status().is_success());
    }

    /// The provider's next token response is altered as `mode` names (see
    /// tests/idp/README.md: invalid-iss, missing-sub, kid-absent, ...).
    pub async fn misbehave(&self, mode: &str) {
        self.misbehave_times(mode, 1).await;
    }

    /// As [`Self::misbehave`], for the next `count` answers.
    pub async fn misbehave_times(&self, mode: &str, count: u32) {
        let r = self
            .http
            .post(format!("{}/__test/misbehave", self.base))
            .json(&json!({ "mode": mode, "count": count }))
            .send()
            .await
            .unwrap();
        assert!(r.status().is_success(), "mode {mode}");
    }

    /// The revocation requests so far: the client authentication each
    /// carried (`method`, an assertion's `alg` and `kid`), the method the
    /// client is registered for, the provider's `status`.
    pub async fn revocations(&self) -> Vec<Value> {
        let list = get_json(&format!("{}/__test/revocations", self.base)).await;
        list.as_array().expect("a list").clone()
    }

    /// A JWT with `claims`, signed by the provider's current key.
    pub async fn sign(&self, claims: Value, header: Value) -> String {
        let r: Value = self
            .http
            .post(format!("{}/__test/sign", self.base))
            .json(&json!({"claims": claims, "header": header}))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        r["jwt"].as_str().expect("signed").to_owned()
    }
}

/// One instance of the app: the demo's routes, on a real socket.
pub struct App {
    pub url: String,
    pub client: OidcClient,
    pub store: PgStore,
    pub backchannel: Arc<Mutex<Vec<String>>>,
    server: tokio::task::JoinHandle<()>,
}

impl App {
    /// The demo's routes with `config`, on `listener` (whose base URL is `url`).
    pub async fn serve(
        db: &Db,
        listener: tokio::net::TcpListener,
        url: String,
        config: OidcConfig,
    ) -> Self {
        let store = db.store().await;
        let client = OidcClient::discover(config, store.clone()).await.unwrap();
        // Passport's key reserved, as next to Express: the guard still writes it.
        let layer = SessionLayer::builder(store.clone(), SigningKeys::new([KEY_A]).unwrap())
            .with_insecure_http_cookie()
            .with_reserved_key("passport")
            .build()
            .unwrap();
        let backchannel = Arc::new(Mutex::new(Vec::new()));
        let app = router(client.clone(), layer, backchannel.clone());
        let server = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Self {
            url,
            client,
            store,
            backchannel,
            server,
        }
    }
}

impl Drop for App {
    fn drop(&mut self) {
        self.server.abort();
    }
}

/// Keeps what the provider delivers to the back-channel logout route.
async fn record_backchannel(
    State(delivered): State<Arc<Mutex<Vec<String>>>>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    if request.uri().path() != "/auth/backchannel-logout" {
        return next.run(request).await;
    }
    let (parts, body) = request.into_parts();
    let body = axum::body::to_bytes(body, 1 << 20)
        .await
        .unwrap_or_default();
    delivered
        .lock()
        .unwrap()
        .push(String::from_utf8_lossy(&body).into_owned());
    next.run(axum::extract::Request::from_parts(parts, body.into()))
        .await
}

/// Calls the provider's userinfo endpoint with the user's access token, as
/// an application calls a resource server: with a DPoP proof when the token
/// is bound, once more with the server's nonce when it asks for one.
async fn call_userinfo(
    State(issuer): State<String>,
    token: AccessToken,
) -> Result<Json<Value>, (StatusCode, String)> {
    let failed = |e: reqwest::Error| (StatusCode::BAD_GATEWAY, e.to_string());
    let url = userinfo_url(&issuer).await.map_err(failed)?;
    let http = reqwest::Client::new();
    let mut nonce: Option<String> = None;
    for _ in 0..2 {
        let mut request = http
            .get(&url)
            .header("authorization", token.authorization());
        if let Some(proof) = token.dpop_proof("GET", &url, nonce.as_deref()) {
            request = request.header("dpop", proof);
        }
        let response = request.send().await.map_err(failed)?;
        let asked = response
            .headers()
            .get("dpop-nonce")
            .and_then(|v| v.to_str().ok());
        if response.status() == StatusCode::UNAUTHORIZED && asked.is_some() && nonce.is_none() {
            nonce = asked.map(str::to_owned);
            continue;
        }
        let status = response.status();
        let body: Value = response.json().await.unwrap_or(Value::Null);
        if !status.is_success() {
            return Err((status, body.to_string()));
        }
        return Ok(Json(json!({"dpop": token.is_dpop(), "userinfo": body})));
    }
    Err((
        StatusCode::BAD_GATEWAY,
        "the nonce was not accepted".to_owned(),
    ))
}

/// The provider's userinfo endpoint, from its discovery document.
async fn userinfo_url(issuer: &str) -> Result<String, reqwest::Error> {
    let discovery: Value = reqwest::get(format!("{issuer}/.well-known/openid-configuration"))
        .await?
        .json()
        .await?;
    Ok(discovery["userinfo_endpoint"]
        .as_str()
        .unwrap_or_default()
        .to_owned())
}

/// Presents the user's access token to userinfo as a plain Bearer token,
/// without a proof: what a thief of a DPoP-bound token would try. Answers
/// the provider's status.
async fn call_userinfo_as_bearer(State(issuer): State<String>, token: AccessToken) -> StatusCode {
    let Ok(url) = userinfo_url(&issuer).await else {
        return StatusCode::BAD_GATEWAY;
    };
    let bearer = token.authorization().replacen("DPoP ", "Bearer ", 1);
    let sent = reqwest::Client::new()
        .get(url)
        .header("authorization", bearer)
        .send()
        .await;
    sent.map_or(StatusCode::BAD_GATEWAY, |r| r.status())
}

pub fn router(
    client: OidcClient,
    layer: SessionLayer,
    backchannel: Arc<Mutex<Vec<String>>>,
) -> Router {
    let protected = Router::new()
        .route(
            "/me",
            get(|user: User| async move {
                Json(json!({
                    "sub": user.sub(),
                    "claims": user.claims(),
                    "groups": user.groups(),
                    "access_token_expires_at": user.access_token_expires_at(),
                }))
            }),
        )
        .route(
            "/api/userinfo",
            get(call_userinfo).with_state(client.issuer().to_owned()),
        )
        .route(
            "/api/userinfo-as-bearer",
            get(call_userinfo_as_bearer).with_state(client.issuer().to_owned()),
        )
        .route_layer(RequireLoginLayer::new(client.clone()));
    // Step-up: a second factor ("2"), or a login at most 2 s old.
    let acr = |user: User| async move { Json(json!({"acr": user.claims().get("acr")})) };
    let second_factor = Router::new()
        .route("/stepup/acr2", get(acr))
        .route_layer(RequireLoginLayer::new(client.clone()).with_acr_values(["2"]));
    let recent = Router::new().route("/stepup/recent", get(acr)).route_layer(
        RequireLoginLayer::new(client.clone()).with_max_auth_age(std::time::Duration::from_secs(2)),
    );
    Router::new()
        .merge(protected)
        .merge(second_factor)
        .merge(recent)
        // The login's routes as users wire them: one call.
        .merge(client.routes())
        .route("/", get(|| async { "home" }))
        // An ordinary handler that stores what the client sends, as apps do.
        .route(
            "/kv/{key}",
            axum::routing::put(
                |session: Session, Path(key): Path<String>, Json(value): Json<Value>| async move {
                    session
                        .insert(&key, &value)
                        .await
                        .map(|()| StatusCode::NO_CONTENT)
                },
            )
            .delete(|session: Session, Path(key): Path<String>| async move {
                session
                    .remove::<Value>(&key)
                    .await
                    .map(|_| StatusCode::NO_CONTENT)
            }),
        )
        .layer(layer)
        .layer(axum::middleware::from_fn_with_state(
            backchannel,
            record_backchannel,
        ))
        .layer(axum::middleware::from_fn(deadline))
}

/// `x-test-deadline-ms: N` drops the request after N ms wherever it is, as a
/// timeout layer or a client that hangs up does; the answer is then 504.
async fn deadline(request: axum::extract::Request, next: axum::middleware::Next) -> Response {
    let ms = request
        .headers()
        .get("x-test-deadline-ms")
        .and_then(|v| v.to_str().ok()?.parse().ok());
    match ms {
        Some(ms) => tokio::time::timeout(std::time::Duration::from_millis(ms), next.run(request))
            .await
            .unwrap_or_else(|_| StatusCode::GATEWAY_TIMEOUT.into_response()),
        None => next.run(request).await,
    }
}

pub struct Setup {
    pub db: Db,
    pub idp: Idp,
    pub token_key: EncryptionKey,
    pub token_keys: Keyring,
    pub apps: Vec<App>,
}

/// `instances` app instances sharing one database, one provider.
pub async fn setup(
    flavor: &str,
    instances: usize,
    access_ttl: u64,
    tweak: impl Fn(OidcConfig) -> OidcConfig,
) -> Setup {
    setup_env(flavor, instances, access_ttl, &[], tweak).await
}

/// As [`setup`], with extra environment for the provider.
pub async fn setup_env(
    flavor: &str,
    instances: usize,
    access_ttl: u64,
    env: &[(&str, &str)],
    tweak: impl Fn(OidcConfig) -> OidcConfig,
) -> Setup {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_test_writer()
        .try_init();
    let db = Db::new().await;
    let mut listeners = Vec::new();
    let mut urls = Vec::new();
    for _ in 0..instances {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        urls.push(format!(
            "http://127.0.0.1:{}",
            l.local_addr().unwrap().port()
        ));
        listeners.push(l);
    }
    let idp = Idp::start_env(flavor, &urls, access_ttl, 0, env).await;
    let token_key = EncryptionKey::generate();
    let token_keys = Keyring::from(token_key.clone());
    let mut apps = Vec::new();
    for (listener, url) in listeners.into_iter().zip(urls) {
        let config = base_config(&idp, &url, &token_keys);
        apps.push(App::serve(&db, listener, url, tweak(config)).await);
    }
    Setup {
        db,
        idp,
        token_key,
        token_keys,
        apps,
    }
}

/// The configuration of an app at `url` logging in through `idp`, before
/// a test's changes.
pub fn base_config(idp: &Idp, url: &str, token_keys: &Keyring) -> OidcConfig {
    OidcConfig::new(&idp.issuer, CLIENT_ID, url, token_keys.clone())
        .unwrap()
        .with_client_secret(CLIENT_SECRET)
}

/// A browser: one cookie jar for the app and the provider, redirects by hand.
#[derive(Clone)]
pub struct Browser {
    pub http: reqwest::Client,
}

impl Default for Browser {
    fn default() -> Self {
        Self::new()
    }
}

pub fn location(r: &reqwest::Response) -> String {
    r.headers()
        .get(header::LOCATION)
        .unwrap_or_else(|| panic!("a redirect, got {}", r.status()))
        .to_str()
        .unwrap()
        .to_owned()
}

impl Browser {
    pub fn new() -> Self {
        Self {
            http: reqwest::Client::builder()
                .cookie_store(true)
                .redirect(reqwest::redirect::Policy::none())
                .build()
                .unwrap(),
        }
    }

    pub async fn get(&self, url: &str) -> reqwest::Response {
        self.http
            .get(url)
            .header(header::ACCEPT, "text/html")
            .send()
            .await
            .unwrap()
    }

    pub async fn api(&self, url: &str) -> reqwest::Response {
        self.http
            .get(url)
            .header(header::ACCEPT, "application/json")
            .send()
            .await
            .unwrap()
    }

    /// Starts a login at the app; returns the provider URL it redirects to.
    pub async fn start_login(&self, app: &str, return_to: &str) -> String {
        let r = self
            .get(&format!(
                "{app}/auth/login?return_to={}",
                urlencode(return_to)
            ))
            .await;
        assert_eq!(r.status(), StatusCode::FOUND);
        location(&r)
    }

    /// Logs in at the provider as `user`; returns the callback URL the
    /// provider sends the browser to (not yet visited).
    pub async fn authorize(&self, auth_url: &str, user: &str) -> String {
        self.authorize_with(auth_url, &[("login", user), ("password", "pw")])
            .await
    }

    /// As [`Self::authorize`], posting `form` to the provider's login page
    /// (e.g. with `("acr", "2")`: a second factor).
    pub async fn authorize_with(&self, auth_url: &str, form: &[(&str, &str)]) -> String {
        let r = self.get(auth_url).await;
        assert_eq!(r.status().as_u16(), 303, "authorization request");
        let interaction = absolute(auth_url, &location(&r));
        if !interaction.contains("/interaction/") {
            return interaction; // the provider remembered the login: a callback
        }
        let r = self
            .http
            .post(&interaction)
            .form(form)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 303, "login form");
        let resume = absolute(auth_url, &location(&r));
        let r = self.get(&resume).await;
        assert_eq!(r.status().as_u16(), 303, "resume");
        absolute(auth_url, &location(&r))
    }

    /// `GET {app}/me` as an API client.
    pub async fn me(&self, app: &str) -> reqwest::Response {
        self.api(&format!("{app}/me")).await
    }

    /// `POST {app}/auth/logout` with `headers` (Origin, Referer).
    pub async fn post_logout(&self, app: &str, headers: &[(&str, &str)]) -> reqwest::Response {
        let mut req = self.http.post(format!("{app}/auth/logout"));
        for (name, value) in headers {
            req = req.header(*name, *value);
        }
        req.send().await.unwrap()
    }

    /// Logout from the app's own page: 303; returns where it sends the browser.
    pub async fn logout(&self, app: &str) -> String {
        let r = self.post_logout(app, &[("origin", app)]).await;
        assert_eq!(r.status(), StatusCode::SEE_OTHER);
        location(&r)
    }

    /// Signs out on the Keycloak-like provider's own page, which then posts
    /// a logout token to the app's back channel.
    pub async fn logout_at_provider(&self, issuer: &str) {
        let page = format!("{issuer}/protocol/openid-connect/logout?client_id={CLIENT_ID}");
        self.confirm_logout(issuer, &page).await;
    }

    /// Opens the provider's logout page at `page` and confirms it, as its
    /// form does; returns the provider's 303.
    pub async fn confirm_logout(&self, issuer: &str, page: &str) -> reqwest::Response {
        let page = self.get(page).await.text().await.unwrap();
        let xsrf = page
            .split("name=\"xsrf\" value=\"")
            .nth(1)
            .unwrap()
            .split('"')
            .next()
            .unwrap();
        let r = self
            .http
            .post(format!("{issuer}/protocol/openid-connect/logout/confirm"))
            .form(&[("xsrf", xsrf), ("logout", "yes")])
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 303);
        r
    }

    /// The whole login; returns the app's answer to the callback.
    pub async fn login(&self, app: &str, user: &str, return_to: &str) -> reqwest::Response {
        let auth = self.start_login(app, return_to).await;
        let callback = self.authorize(&auth, user).await;
        self.get(&callback).await
    }
}

/// The JSON document at `url`.
pub async fn get_json(url: &str) -> Value {
    reqwest::get(url).await.unwrap().json().await.unwrap()
}

pub fn urlencode(s: &str) -> String {
    url_escape(s)
}

fn url_escape(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

pub fn absolute(base: &str, location: &str) -> String {
    if location.starts_with("http://") || location.starts_with("https://") {
        return location.to_owned();
    }
    let origin: String = base.splitn(4, '/').take(3).collect::<Vec<_>>().join("/");
    if location.starts_with('/') {
        format!("{origin}{location}")
    } else {
        let dir = &base[..base.rfind('/').unwrap() + 1];
        format!("{dir}{location}")
    }
}
