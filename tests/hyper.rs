//! The session layer on a plain hyper 1 server (no axum): other body types,
//! a real socket.
#![allow(clippy::unwrap_used)]

mod common;

use std::convert::Infallible;

use bytes::Bytes;
use common::*;
use http::{header, Request, Response, StatusCode};
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper_util::{
    client::legacy::Client as HttpClient,
    rt::{TokioExecutor, TokioIo},
    server::conn::auto,
    service::TowerToHyperService,
};
use tower::{service_fn, ServiceBuilder};
use tower_pg_session::Session;

async fn handler(req: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    let session = req.extensions().get::<Session>().cloned().unwrap();
    let n: u64 = match session.get("n").await {
        Ok(n) => n.unwrap_or(0) + 1,
        Err(_) => {
            let mut r = Response::new(Full::from("store down"));
            *r.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
            return Ok(r);
        }
    };
    session.insert("n", &n).await.unwrap();
    Ok(Response::new(Full::from(n.to_string())))
}

#[tokio::test]
async fn counts_through_a_real_hyper_server() {
    let db = Db::new().await;
    let service = ServiceBuilder::new()
        .layer(layer(db.store().await))
        .service(service_fn(handler));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(async move {
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            let service = TowerToHyperService::new(service.clone());
            tokio::spawn(async move {
                let _ = auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });

    let client = HttpClient::builder(TokioExecutor::new()).build_http::<Empty<Bytes>>();
    let mut cookie: Option<String> = None;
    for expected in 1..=3 {
        let mut req = Request::get(format!("http://{addr}/"))
            .body(Empty::new())
            .unwrap();
        if let Some(c) = &cookie {
            req.headers_mut().insert(header::COOKIE, c.parse().unwrap());
        }
        let res = client.request(req).await.unwrap();
        assert_eq!(res.status(), StatusCode::OK);
        if let Some(sc) = res.headers().get(header::SET_COOKIE) {
            cookie = Some(sc.to_str().unwrap().split(';').next().unwrap().to_owned());
        }
        let body = res.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(body, expected.to_string());
    }
    server.abort();
    db.drop_schema().await;
}
