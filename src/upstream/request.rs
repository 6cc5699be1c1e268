//! The request a backend receives, built one way for plain requests and
//! WebSocket upgrades alike.

use hyper::header::{self, HeaderValue};
use hyper::http::request::Parts;
use hyper::Request;

use super::error::UpstreamFailure;
use crate::http::headers::origin_form;

/// The upstream request for a backend at `address`, from the client's
/// (cleaned) parts: origin-form, as HTTP/1.1 sends it to a server; `Host`
/// is the client's, or the backend's address for a client that sent none
/// (HTTP/1.0). An address that can't be a `Host` is a `BadAddress`.
pub fn upstream_request<B>(parts: &Parts, address: &str, body: B) -> Result<Request<B>, UpstreamFailure> {
    let mut request = Request::new(body);
    *request.method_mut() = parts.method.clone();
    *request.uri_mut() = origin_form(&parts.uri);
    *request.headers_mut() = parts.headers.clone();
    if !request.headers().contains_key(header::HOST) {
        let host = HeaderValue::from_str(address).map_err(|_| UpstreamFailure::BadAddress)?;
        request.headers_mut().insert(header::HOST, host);
    }
    Ok(request)
}
