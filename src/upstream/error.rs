//! Why a backend gave no response, and what follows from it: the client's
//! answer, whether the request may go to the next candidate, and whether
//! it counts against the backend's health.

use std::error::Error as StdError;
use std::io;
use std::time::Duration;

use hyper::{Method, Response, StatusCode};
use tracing::{debug, info, warn};

use crate::config::Observe;
use crate::http::{text_response, ClientBodyError, ProxyBody};
use crate::routing::Backend;
use crate::tls::is_tls_error;
use crate::util::throttle::Throttle;

/// Why a backend gave no response.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpstreamFailure {
    /// The backend refused the connection.
    Refused,
    /// The backend could not be reached (no route, DNS, reset while connecting).
    Unreachable,
    /// The backend did not accept the connection within `connect_timeout`.
    ConnectTimeout,
    /// The backend did not answer within `response_timeout`.
    Timeout,
    /// Connected, but the backend closed or broke the connection.
    Broken,
    /// A pooled keep-alive connection closed (or was reset) with the
    /// request sent and no whole response head back: most likely the
    /// backend closed it as idle while the request was on its way (a race
    /// every keep-alive proxy has). An idempotent request is sent again on
    /// a new connection to the same backend, uncounted; as the final
    /// answer it counts like [`UpstreamFailure::Broken`].
    Stale,
    /// The backend address can't form a request URI.
    BadAddress,
    /// The client's request body failed mid-upload: not the backend's fault.
    ClientAborted,
    /// The client's request body stalled past `server.client_body_timeout`.
    ClientStalled,
    /// The client's request body passed `server.client_max_body_size`.
    ClientTooLarge,
    /// The TLS handshake with the backend failed (its certificate is not
    /// trusted or not for its name, or it doesn't speak TLS).
    Tls,
    /// `max` connections (`upstream.max_connections`) were busy and none
    /// came free within `waited` (`upstream.queue_timeout`). Nothing
    /// reached the backend, which is only busy, not failing.
    QueueTimeout {
        /// `upstream.max_connections`.
        max: usize,
        /// `upstream.queue_timeout`.
        waited: Duration,
    },
}

/// A short reason, for logs (the health warning names the last one).
impl std::fmt::Display for UpstreamFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            UpstreamFailure::Refused => f.write_str("connection refused"),
            UpstreamFailure::Unreachable => f.write_str("unreachable"),
            UpstreamFailure::ConnectTimeout => f.write_str("connect timed out"),
            UpstreamFailure::Timeout => f.write_str("no response in time"),
            UpstreamFailure::Broken => f.write_str("connection closed without a response"),
            UpstreamFailure::Stale => f.write_str("reused connection closed without a response"),
            UpstreamFailure::BadAddress => f.write_str("unusable address"),
            UpstreamFailure::ClientAborted => f.write_str("the client aborted its request body"),
            UpstreamFailure::ClientStalled => f.write_str("the client's request body stalled"),
            UpstreamFailure::ClientTooLarge => f.write_str("the client's request body was too large"),
            UpstreamFailure::Tls => f.write_str("TLS handshake failed"),
            UpstreamFailure::QueueTimeout { max, waited } => {
                write!(f, "all {max} connections busy for {waited:?}")
            }
        }
    }
}

impl UpstreamFailure {
    /// The connection was never made, so nothing reached the backend.
    pub fn is_connect(self) -> bool {
        matches!(
            self,
            UpstreamFailure::Refused
                | UpstreamFailure::Unreachable
                | UpstreamFailure::ConnectTimeout
                | UpstreamFailure::Tls
        )
    }

    /// Whether a request that failed this way may be sent again, to the
    /// next candidate: always when nothing reached the backend (the
    /// connection was never made); for an idempotent method also when the
    /// connection broke before any answer, as nginx's `proxy_next_upstream`
    /// does. The one retry rule, for plain requests and upgrades alike
    /// ([`UpstreamFailure::Stale`] is retried on a new connection to the
    /// same backend first, as nginx does for a cached connection).
    pub fn retryable(self, method: &Method) -> bool {
        self.is_connect()
            || (matches!(self, UpstreamFailure::Broken | UpstreamFailure::Stale) && method.is_idempotent())
    }

    /// Whether this failure counts against the backend's health under
    /// `health.observe`: failures to connect always; a response timeout or
    /// a connection closed without an answer only with `"responses"`, since
    /// a client can cause those (the client aborting its upload never counts).
    pub fn counts_against_backend(self, observe: Observe) -> bool {
        self.is_connect()
            || (observe == Observe::Responses
                && matches!(self, UpstreamFailure::Timeout | UpstreamFailure::Broken | UpstreamFailure::Stale))
    }

    /// The `kind` label of `sticky_proxy_upstream_errors_total`; `None`
    /// for the client's own failures and for a queue timeout (counted in
    /// `sticky_proxy_limits_total`), never counted against a backend.
    pub fn metric_kind(self) -> Option<&'static str> {
        match self {
            UpstreamFailure::Refused
            | UpstreamFailure::Unreachable
            | UpstreamFailure::BadAddress
            | UpstreamFailure::Tls => Some("connect"),
            UpstreamFailure::ConnectTimeout | UpstreamFailure::Timeout => Some("timeout"),
            UpstreamFailure::Broken | UpstreamFailure::Stale => Some("reset"),
            UpstreamFailure::ClientAborted
            | UpstreamFailure::ClientStalled
            | UpstreamFailure::ClientTooLarge
            | UpstreamFailure::QueueTimeout { .. } => None,
        }
    }

    /// What `err` (from connecting, or from the exchange) says went wrong.
    pub fn classify(err: &(dyn StdError + 'static), during_connect: bool) -> UpstreamFailure {
        let mut source: Option<&(dyn StdError + 'static)> = Some(err);
        while let Some(e) = source {
            if let Some(body) = e.downcast_ref::<ClientBodyError>() {
                return match body {
                    ClientBodyError::Failed(_) => UpstreamFailure::ClientAborted,
                    ClientBodyError::Stalled(_) => UpstreamFailure::ClientStalled,
                    ClientBodyError::TooLarge(_) => UpstreamFailure::ClientTooLarge,
                };
            }
            if let Some(io) = e.downcast_ref::<io::Error>() {
                if is_tls_error(io) {
                    return UpstreamFailure::Tls;
                }
                match io.kind() {
                    io::ErrorKind::TimedOut if during_connect => return UpstreamFailure::ConnectTimeout,
                    io::ErrorKind::TimedOut => return UpstreamFailure::Timeout,
                    io::ErrorKind::ConnectionRefused => return UpstreamFailure::Refused,
                    _ => {}
                }
            }
            source = e.source();
        }
        if during_connect {
            UpstreamFailure::Unreachable
        } else {
            UpstreamFailure::Broken
        }
    }

    /// The client's answer: 502 or 504 (400 for a client that aborted its
    /// upload, 503 for a queue timeout) with the reason in plain text;
    /// logged as a warning.
    pub fn response(self, backend: &Backend) -> Response<ProxyBody> {
        let (id, addr) = (&backend.id, &backend.address);
        let (status, reason) = match self {
            UpstreamFailure::Refused => {
                (StatusCode::BAD_GATEWAY, format!("backend {id} ({addr}) refused the connection"))
            }
            UpstreamFailure::Unreachable => (StatusCode::BAD_GATEWAY, format!("backend {id} ({addr}) is unreachable")),
            UpstreamFailure::ConnectTimeout => {
                (StatusCode::GATEWAY_TIMEOUT, format!("backend {id} ({addr}) did not accept the connection in time"))
            }
            UpstreamFailure::Timeout => {
                (StatusCode::GATEWAY_TIMEOUT, format!("backend {id} ({addr}) did not answer in time"))
            }
            UpstreamFailure::Broken | UpstreamFailure::Stale => (
                StatusCode::BAD_GATEWAY,
                format!("backend {id} ({addr}) closed the connection without a valid response"),
            ),
            UpstreamFailure::BadAddress => {
                (StatusCode::BAD_GATEWAY, format!("backend {id} has an unusable address {addr:?}"))
            }
            UpstreamFailure::ClientAborted => (
                StatusCode::BAD_REQUEST,
                "the request body did not arrive whole; nothing was blamed on the backend".into(),
            ),
            UpstreamFailure::ClientStalled => (
                StatusCode::REQUEST_TIMEOUT,
                "the request body stalled for longer than server.client_body_timeout".into(),
            ),
            UpstreamFailure::ClientTooLarge => {
                (StatusCode::PAYLOAD_TOO_LARGE, "the request body is larger than server.client_max_body_size".into())
            }
            UpstreamFailure::Tls => {
                (StatusCode::BAD_GATEWAY, format!("backend {id} ({addr}): the TLS handshake failed"))
            }
            UpstreamFailure::QueueTimeout { max, waited } => (
                StatusCode::SERVICE_UNAVAILABLE,
                format!(
                    "backend {id} has upstream.max_connections = {max} connections busy; \
                     no connection came free within upstream.queue_timeout ({waited:?})"
                ),
            ),
        };
        match self {
            UpstreamFailure::ClientAborted | UpstreamFailure::ClientStalled | UpstreamFailure::ClientTooLarge => {
                // The client's doing: not worth a warning, which a client
                // could then write at will. Its connection is closed, the
                // body unread.
                debug!(backend = %id, status = status.as_u16(), "{reason}");
                let mut response = text_response(status, reason + "\n");
                response
                    .headers_mut()
                    .insert(hyper::header::CONNECTION, hyper::header::HeaderValue::from_static("close"));
                response
            }
            // Load, not a fault (and clients holding slow requests could
            // write it at will): counted in sticky_proxy_limits_total.
            UpstreamFailure::QueueTimeout { .. } => {
                info!(backend = %id, status = status.as_u16(), "{reason}");
                text_response(status, reason + "\n")
            }
            _ => {
                // One line a second: a failing backend fails every request.
                static THROTTLE: Throttle = Throttle::new();
                if let Some(suppressed) = THROTTLE.allow() {
                    warn!(backend = %id, address = %addr, status = status.as_u16(), suppressed, "{reason}");
                }
                text_response(status, reason + "\n")
            }
        }
    }
}
