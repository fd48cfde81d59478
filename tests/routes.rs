//! The login's routes in one call (`OidcClient::routes`, `OidcRoutesLayer`)
//! and a client that starts before its provider (`OidcClient::lazy`),
//! against the local provider and the real Postgres.
#![allow(clippy::unwrap_used)]

mod common;

use std::{convert::Infallible, time::Duration};

use axum::{routing::get, Router};
use bytes::Bytes;
use common::{cluster::free_port, idp::*, Db, KEY_A};
use http::{header, Request, Response, StatusCode};
use http_body_util::Full;
use hyper_util::{rt::TokioExecutor, server::conn::auto, service::TowerToHyperService};
use serde_json::Value;
use tower::{service_fn, ServiceBuilder};
use tower_pg_session::{
    crypto::{EncryptionKey, Keyring},
    oidc::{OidcClient, OidcConfig, OidcRoutesLayer, RequireLoginLayer, User},
    Session, SessionLayer, SigningKeys,
};

fn sessions(store: tower_pg_session::PgStore) -> SessionLayer {
    SessionLayer::builder(store, SigningKeys::new([KEY_A]).unwrap())
        .with_insecure_http_cookie()
        .build()
        .unwrap()
}

fn config(issuer: &str, app: &str) -> OidcConfig {
    OidcConfig::new(
        issuer,
        CLIENT_ID,
        app,
        Keyring::from(EncryptionKey::generate()),
    )
    .unwrap()
    .with_client_secret(CLIENT_SECRET)
}

/// An axum app: `/me` behind the guard, the login's routes from one call.
fn axum_app(client: &OidcClient, layer: SessionLayer) -> Router {
    let me = Router::new()
        .route(
            "/me",
            get(|user: User| async move { user.sub().to_owned() }),
        )
        .route_layer(RequireLoginLayer::new(client.clone()));
    Router::new()
        .route("/", get(|| async { "home" }))
        .merge(me)
        .merge(client.routes())
        .layer(layer)
}

async fn bind() -> (tokio::net::TcpListener, String) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://127.0.0.1:{}", listener.local_addr().unwrap().port());
    (listener, url)
}

fn spawn_axum(listener: tokio::net::TcpListener, app: Router) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    })
}

/// The app starts while nothing answers at the issuer: logins and the guard
/// answer 503 with the reason (a browser is not sent to a login that cannot
/// start), session routes work, logout still ends the session; once the
/// provider answers, logins work without a restart.
#[tokio::test]
async fn a_lazy_client_starts_before_its_provider_and_logs_in_once_it_answers() {
    let db = Db::new().await;
    let (listener, app) = bind().await;
    let port = free_port();
    let issuer = format!("http://127.0.0.1:{port}/realms/test");
    let client = OidcClient::lazy(
        config(&issuer, &app).with_discovery_retry(Duration::from_millis(200)),
        db.store().await,
    )
    .unwrap();
    assert!(!client.is_discovered());
    let server = spawn_axum(listener, axum_app(&client, sessions(db.store().await)));

    let b = Browser::new();
    assert_eq!(b.get(&format!("{app}/")).await.status(), StatusCode::OK);
    let r = b.api(&format!("{app}/auth/login?return_to=/me")).await;
    assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"], "login_unavailable", "{body}");
    assert!(
        body["error_description"]
            .as_str()
            .unwrap()
            .contains("unavailable"),
        "{body}"
    );
    for accept in ["text/html", "application/json"] {
        let r = b
            .http
            .get(format!("{app}/me"))
            .header(header::ACCEPT, accept)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE, "{accept}");
        assert_eq!(r.headers()[header::RETRY_AFTER], "5");
    }
    // Logout needs no provider to end the app's session.
    let r = b.post_logout(&app, &[("origin", &app)]).await;
    assert_eq!(r.status(), StatusCode::SEE_OTHER);
    assert_eq!(location(&r), format!("{app}/"));

    let idp = Idp::start_on("keycloak", std::slice::from_ref(&app), 3600, port).await;
    assert_eq!(idp.issuer, issuer);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let r = b.login(&app, "late-alice", "/me").await;
    assert_eq!(r.status(), StatusCode::FOUND);
    assert!(client.is_discovered());
    let me = b.me(&app).await;
    assert_eq!(me.status(), StatusCode::OK);
    assert_eq!(me.text().await.unwrap(), "late-alice");
    server.abort();
    db.drop_schema().await;
}

/// While the provider stays down, discovery is tried at most once per
/// pause, however many requests come.
#[tokio::test]
async fn a_lazy_client_asks_a_down_provider_once_per_pause() {
    let db = Db::new().await;
    // A server that counts discovery requests and answers 500.
    let hits = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let (provider, provider_url) = bind().await;
    let counter = hits.clone();
    let provider_app = Router::new().fallback(move || {
        counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        async { StatusCode::INTERNAL_SERVER_ERROR }
    });
    let provider_task = spawn_axum(provider, provider_app);
    let (listener, app) = bind().await;
    let client = OidcClient::lazy(
        config(&format!("{provider_url}/realms/down"), &app)
            .with_discovery_retry(Duration::from_secs(60)),
        db.store().await,
    )
    .unwrap();
    let server = spawn_axum(listener, axum_app(&client, sessions(db.store().await)));
    let b = Browser::new();
    for _ in 0..20 {
        let r = b.api(&format!("{app}/auth/login")).await;
        assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
    }
    assert_eq!(hits.load(std::sync::atomic::Ordering::SeqCst), 1);
    server.abort();
    provider_task.abort();
    db.drop_schema().await;
}

/// Configured paths are the routes; the defaults are then not served;
/// another method answers 405 with `Allow`; an oversized back-channel body
/// is refused unread.
#[tokio::test]
async fn routes_follow_the_configured_paths_and_methods() {
    let db = Db::new().await;
    let (listener, app) = bind().await;
    let idp = Idp::start("keycloak", std::slice::from_ref(&app), 3600).await;
    let client = OidcClient::discover(
        config(&idp.issuer, &app)
            .with_login_path("/signin")
            .with_logout_path("signout")
            .with_backchannel_logout_path("hooks/logout"),
        db.store().await,
    )
    .await
    .unwrap();
    let server = spawn_axum(listener, axum_app(&client, sessions(db.store().await)));
    let b = Browser::new();

    let r = b.get(&format!("{app}/signin?return_to=/me")).await;
    assert_eq!(r.status(), StatusCode::FOUND);
    assert!(location(&r).starts_with(&idp.issuer), "{}", location(&r));
    // A browser sent by the guard goes to the configured login path.
    let r = b.get(&format!("{app}/me")).await;
    assert_eq!(r.status(), StatusCode::FOUND);
    assert_eq!(location(&r), "/signin?return_to=%2Fme");
    assert_eq!(
        b.get(&format!("{app}/auth/login")).await.status(),
        StatusCode::NOT_FOUND
    );
    let r = b.http.get(format!("{app}/signout")).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::METHOD_NOT_ALLOWED);
    let r = b
        .http
        .post(format!("{app}/signout"))
        .header(header::ORIGIN, "https://evil.example")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::FORBIDDEN);
    let r = b
        .http
        .post(format!("{app}/hooks/logout"))
        .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
        .body(vec![b'a'; 200 * 1024])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::PAYLOAD_TOO_LARGE);
    let r = b
        .http
        .post(format!("{app}/hooks/logout"))
        .form(&[("logout_token", "not.a.jwt")])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    server.abort();
    db.drop_schema().await;
}

/// `OidcRoutesLayer` on a plain hyper server: a whole login, `/me` behind
/// the guard, logout; every other request reaches the app's own service.
#[tokio::test]
async fn the_routes_layer_logs_in_on_a_plain_hyper_server() {
    let db = Db::new().await;
    let (listener, app) = bind().await;
    let idp = Idp::start("keycloak", std::slice::from_ref(&app), 3600).await;
    let client = OidcClient::discover(config(&idp.issuer, &app), db.store().await)
        .await
        .unwrap();
    let me = ServiceBuilder::new()
        .layer(RequireLoginLayer::new(client.clone()))
        .service(service_fn(
            |req: Request<hyper::body::Incoming>| async move {
                let user = req.extensions().get::<User>().unwrap().sub().to_owned();
                Ok::<_, Infallible>(Response::new(Full::<Bytes>::from(user)))
            },
        ));
    let inner = service_fn(move |req: Request<hyper::body::Incoming>| {
        let mut me = me.clone();
        async move {
            if req.uri().path() == "/me" {
                return tower::Service::call(&mut me, req).await;
            }
            let session = req.extensions().get::<Session>().unwrap();
            let n: u64 = session.get("n").await.unwrap().unwrap_or(0) + 1;
            session.insert("n", &n).await.unwrap();
            Ok(Response::new(Full::from(n.to_string())))
        }
    });
    let service = ServiceBuilder::new()
        .layer(sessions(db.store().await))
        .layer(OidcRoutesLayer::new(client))
        .service(inner);
    let server = tokio::spawn(async move {
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            let service = TowerToHyperService::new(service.clone());
            tokio::spawn(async move {
                let _ = auto::Builder::new(TokioExecutor::new())
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    let b = Browser::new();
    let r = b.get(&format!("{app}/count")).await;
    assert_eq!(r.text().await.unwrap(), "1");
    assert_eq!(b.me(&app).await.status(), StatusCode::UNAUTHORIZED);
    let r = b.login(&app, "hyper-bob", "/me").await;
    assert_eq!(r.status(), StatusCode::FOUND);
    let me = b.me(&app).await;
    assert_eq!(me.status(), StatusCode::OK);
    assert_eq!(me.text().await.unwrap(), "hyper-bob");
    let r = b.get(&format!("{app}/count")).await;
    assert_eq!(
        r.text().await.unwrap(),
        "2",
        "a new session id after login, data kept"
    );
    b.logout(&app).await;
    assert_eq!(b.me(&app).await.status(), StatusCode::UNAUTHORIZED);
    server.abort();
    db.drop_schema().await;
}
