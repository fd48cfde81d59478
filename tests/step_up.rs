//! Step-up authentication against the local provider: a route that needs a
//! second factor or a recent login sends the browser through a login that
//! asks for it, answers API clients 401 with what is needed (RFC 9470), and
//! a provider that authenticates more weakly than asked fails the login
//! without touching the one the session has.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use axum::http::{header, StatusCode};
use common::idp::{absolute, location, setup, setup_env, Browser, Setup};
use serde_json::Value;
use tower_pg_session::oidc::OidcConfig;

fn challenge(r: &reqwest::Response) -> String {
    r.headers()
        .get(header::WWW_AUTHENTICATE)
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_default()
}

/// Follows the app's redirect to its login and on to the provider: the
/// provider's authorization URL.
async fn to_provider(b: &Browser, app: &str, location: &str) -> String {
    let r = b.get(&absolute(app, location)).await;
    assert_eq!(r.status(), StatusCode::FOUND, "{location}");
    common::idp::location(&r)
}

#[tokio::test]
async fn a_route_needing_a_second_factor_sends_the_browser_through_a_stronger_login() {
    let s = setup("keycloak", 1, 3600, |c| c.with_clock_skew(Duration::ZERO)).await;
    let app = &s.apps[0].url;
    let b = Browser::new();
    assert_eq!(location(&b.login(app, "zoe", "/").await), "/");
    assert_eq!(b.me(app).await.status(), StatusCode::OK);

    // An API client learns what is missing.
    let r = b.api(&format!("{app}/stepup/acr2")).await;
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    let www = challenge(&r);
    assert!(
        www.contains("error=\"insufficient_user_authentication\""),
        "{www}"
    );
    assert!(www.contains("acr_values=\"2\""), "{www}");

    // A browser goes through a login that asks the provider for it.
    let r = b.get(&format!("{app}/stepup/acr2")).await;
    assert_eq!(r.status(), StatusCode::FOUND);
    let login = location(&r);
    assert_eq!(login, "/auth/login?return_to=%2Fstepup%2Facr2&acr_values=2");
    let auth = to_provider(&b, app, &login).await;
    let query: Vec<(String, String)> = url::Url::parse(&auth)
        .unwrap()
        .query_pairs()
        .into_owned()
        .collect();
    let param = |k: &str| query.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
    // The provider takes the claims parameter: acr is asked as essential
    // there (acr_values would make it voluntary).
    let claims: Value = serde_json::from_str(&param("claims").unwrap()).unwrap();
    assert_eq!(
        claims["id_token"]["acr"],
        serde_json::json!({"essential": true, "values": ["2"]})
    );
    assert_eq!(param("acr_values"), None);
    // The provider's session is at no level: it asks again, here with a
    // second factor.
    let callback = b
        .authorize_with(&auth, &[("login", "zoe"), ("password", "pw"), ("acr", "2")])
        .await;
    let r = b.get(&callback).await;
    assert_eq!(location(&r), "/stepup/acr2");
    let r = b.api(&format!("{app}/stepup/acr2")).await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.json::<Value>().await.unwrap()["acr"], "2");
}

/// A provider without the `claims` parameter: `acr_values` is a voluntary
/// request, and a login at another level comes back as it is.
async fn setup_without_claims_parameter(tweak: impl Fn(OidcConfig) -> OidcConfig) -> Setup {
    setup_env("keycloak", 1, 3600, &[("IDP_CLAIMS_PARAMETER", "0")], tweak).await
}

#[tokio::test]
async fn a_weaker_authentication_than_asked_fails_the_login_and_keeps_the_old_one() {
    let s = setup_without_claims_parameter(|c| c).await;
    let app = &s.apps[0].url;
    let b = Browser::new();
    let auth = b.start_login(app, "/").await;
    let callback = b
        .authorize_with(&auth, &[("login", "zoe"), ("password", "pw"), ("acr", "1")])
        .await;
    assert_eq!(location(&b.get(&callback).await), "/");
    let before: Value = b.me(app).await.json().await.unwrap();

    // Asked for "2"; the provider answers with its session's "1".
    let auth = to_provider(&b, app, "/auth/login?return_to=/&acr_values=2").await;
    assert!(auth.contains("acr_values=2"), "{auth}");
    let callback = b.authorize(&auth, "zoe").await;
    let r = b.api(&callback).await;
    assert_eq!(r.status(), StatusCode::FORBIDDEN);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"], "insufficient_user_authentication", "{body}");
    // The login the session had is as it was.
    let after: Value = b.me(app).await.json().await.unwrap();
    assert_eq!(after, before);
    assert_eq!(
        b.api(&format!("{app}/stepup/acr2")).await.status(),
        StatusCode::UNAUTHORIZED
    );
}

#[tokio::test]
async fn a_login_too_old_for_a_route_is_renewed_at_the_provider() {
    let s = setup("keycloak", 1, 3600, |c| c.with_clock_skew(Duration::ZERO)).await;
    let app = &s.apps[0].url;
    let b = Browser::new();
    assert_eq!(location(&b.login(app, "zoe", "/").await), "/");
    // This provider sends auth_time only when asked: the route cannot tell
    // the login's age, and asks for a login with max_age.
    let r = b.get(&format!("{app}/stepup/recent")).await;
    let auth = to_provider(&b, app, &location(&r)).await;
    let callback = b.authorize(&auth, "zoe").await;
    assert_eq!(location(&b.get(&callback).await), "/stepup/recent");
    assert_eq!(
        b.api(&format!("{app}/stepup/recent")).await.status(),
        StatusCode::OK
    );
    tokio::time::sleep(Duration::from_millis(3100)).await;
    let r = b.api(&format!("{app}/stepup/recent")).await;
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    assert!(challenge(&r).contains("max_age=2"), "{}", challenge(&r));
    assert_eq!(
        b.me(app).await.status(),
        StatusCode::OK,
        "other routes still pass"
    );

    let r = b.get(&format!("{app}/stepup/recent")).await;
    let login = location(&r);
    assert_eq!(login, "/auth/login?return_to=%2Fstepup%2Frecent&max_age=2");
    let auth = to_provider(&b, app, &login).await;
    assert!(auth.contains("max_age=2"), "{auth}");
    // The provider's login is 3 s old: it asks again (a remembered login
    // would come straight back with the old auth_time and fail).
    let r = b.get(&auth).await;
    assert!(
        location(&r).contains("/interaction/"),
        "the provider asks again"
    );
    let callback = b.authorize(&auth, "zoe").await;
    assert_eq!(location(&b.get(&callback).await), "/stepup/recent");
    assert_eq!(
        b.api(&format!("{app}/stepup/recent")).await.status(),
        StatusCode::OK
    );
}

#[tokio::test]
async fn configured_acr_values_are_asked_at_every_login() {
    let s = setup_without_claims_parameter(|c| c.with_acr_values(["2"])).await;
    let app = &s.apps[0].url;
    let b = Browser::new();
    let auth = b.start_login(app, "/").await;
    assert!(auth.contains("acr_values=2"), "{auth}");
    // A password alone is not enough for this app.
    let callback = b
        .authorize_with(&auth, &[("login", "zoe"), ("password", "pw"), ("acr", "1")])
        .await;
    assert_eq!(b.api(&callback).await.status(), StatusCode::FORBIDDEN);
    assert_eq!(b.me(app).await.status(), StatusCode::UNAUTHORIZED);
}
