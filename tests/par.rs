//! Pushed authorization requests (RFC 9126) against the local provider with
//! PAR off, advertised, and required.
#![allow(clippy::unwrap_used)]

mod common;

use axum::http::StatusCode;
use common::idp::*;
use serde_json::Value;
use tower_pg_session::oidc::{OidcConfig, Par, Url};

/// The query parameters' names of a URL, sorted.
fn param_names(url: &str) -> Vec<String> {
    let mut names: Vec<String> = Url::parse(url)
        .unwrap()
        .query_pairs()
        .map(|(k, _)| k.into_owned())
        .collect();
    names.sort();
    names
}

/// A login through the pushed request at `auth` ends logged in as alice.
async fn completes_login(s: &Setup, b: &Browser, auth: &str) {
    let callback = b.authorize(auth, "alice").await;
    let r = b.get(&callback).await;
    assert_eq!(r.status(), StatusCode::FOUND, "callback");
    assert_eq!(location(&r), "/me");
    let me: Value = b.me(&s.apps[0].url).await.json().await.unwrap();
    assert_eq!(me["sub"], "alice");
}

async fn par_setup(idp_par: &str, par: Par) -> Setup {
    setup_env(
        "keycloak",
        1,
        3600,
        &[("IDP_PAR", idp_par)],
        move |c: OidcConfig| c.with_par(par),
    )
    .await
}

#[tokio::test]
async fn par_required_provider_gets_only_client_id_and_request_uri() {
    let s = par_setup("required", Par::Required).await;
    let b = Browser::new();
    let auth = b.start_login(&s.apps[0].url, "/me").await;
    assert!(auth.starts_with(&s.idp.issuer), "{auth}");
    assert_eq!(param_names(&auth), ["client_id", "request_uri"], "{auth}");
    assert!(
        auth.contains("request_uri=urn%3Aietf%3Aparams%3Aoauth%3Arequest_uri%3A"),
        "{auth}"
    );
    completes_login(&s, &b, &auth).await;
}

#[tokio::test]
async fn par_auto_pushes_when_the_provider_advertises_it() {
    let s = par_setup("on", Par::Auto).await;
    let b = Browser::new();
    let auth = b.start_login(&s.apps[0].url, "/me").await;
    assert_eq!(param_names(&auth), ["client_id", "request_uri"], "{auth}");
    completes_login(&s, &b, &auth).await;
}

#[tokio::test]
async fn par_auto_sends_the_plain_request_when_not_advertised() {
    let s = par_setup("off", Par::Auto).await;
    let b = Browser::new();
    let auth = b.start_login(&s.apps[0].url, "/me").await;
    let names = param_names(&auth);
    for name in ["code_challenge", "nonce", "redirect_uri", "scope", "state"] {
        assert!(names.iter().any(|n| n == name), "{name} in {auth}");
    }
    completes_login(&s, &b, &auth).await;
}

#[tokio::test]
async fn par_off_is_refused_by_a_par_required_provider() {
    let s = par_setup("required", Par::Off).await;
    let b = Browser::new();
    let r = b.api(&format!("{}/auth/login", s.apps[0].url)).await;
    assert_eq!(r.status(), StatusCode::BAD_GATEWAY);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"], "provider_unavailable");
    let detail = body["error_description"].as_str().unwrap();
    assert!(
        detail.contains("require_pushed_authorization_requests") && detail.contains("PAR is off"),
        "{detail}"
    );
    // The provider itself refuses a plain authorization request.
    let plain = format!(
        "{}/protocol/openid-connect/auth?client_id={CLIENT_ID}&response_type=code&scope=openid\
         &redirect_uri={}&state=s&code_challenge=E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM\
         &code_challenge_method=S256",
        s.idp.issuer,
        urlencode(&format!("{}/auth/callback", s.apps[0].url)),
    );
    let r = b.get(&plain).await;
    let refused = match r.status().as_u16() {
        303 => location(&r).contains("error=invalid_request"),
        code => code >= 400,
    };
    assert!(refused, "a plain request is refused: {}", r.status());
}

#[tokio::test]
async fn par_required_without_a_par_endpoint_fails_clearly() {
    let s = par_setup("off", Par::Required).await;
    let b = Browser::new();
    let r = b.api(&format!("{}/auth/login", s.apps[0].url)).await;
    assert_eq!(r.status(), StatusCode::BAD_GATEWAY);
    let body: Value = r.json().await.unwrap();
    assert!(
        body["error_description"]
            .as_str()
            .unwrap()
            .contains("no pushed_authorization_request_endpoint"),
        "{body}"
    );
}
