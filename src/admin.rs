//! The admin API, served on its own listener (loopback by default) so that
//! clients of the proxy can never reach it.
//!
//! - `GET /healthz`: 200 while the process is serving.

use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};

use crate::proxy::{text_response, ProxyBody};
use crate::routing::Router;

/// Answers one admin request.
pub fn handle(req: Request<Incoming>, _router: &Router) -> Response<ProxyBody> {
    match (req.method(), req.uri().path()) {
        (&Method::GET | &Method::HEAD, "/healthz") => text_response(StatusCode::OK, "ok\n"),
        (_, "/healthz") => text_response(StatusCode::METHOD_NOT_ALLOWED, "use GET /healthz\n"),
        (_, path) => text_response(
            StatusCode::NOT_FOUND,
            format!("no admin endpoint {path}; try GET /healthz\n"),
        ),
    }
}
