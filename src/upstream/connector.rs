//! The one way to open a connection to a backend, for the pool, WebSocket
//! tunnels and health checks alike: TCP within the connect timeout (with
//! TCP_NODELAY and keepalive), TLS for a `tls = true` backend, then the
//! HTTP/1.1 handshake. The caller drives the returned connection as it
//! needs: the pool spawns it, a tunnel spawns it with upgrades, a health
//! check drives it inline so that it ends with the check.

use std::time::Duration;

use hyper::body::Body;
use hyper::client::conn::http1::{self, Connection, SendRequest};
use hyper_util::rt::TokioIo;

use super::error::UpstreamFailure;
use crate::tls::{self, UpstreamStream, UpstreamTls};

/// Where to connect: a backend's address and its TLS settings.
#[derive(Debug, Clone, Copy)]
pub struct Endpoint<'a> {
    /// `host:port`.
    pub address: &'a str,
    /// `Some`: spoken to over TLS.
    pub tls: Option<&'a UpstreamTls>,
}

/// An HTTP/1.1 connection to a backend: the handle requests are sent on,
/// and the connection future the caller must drive.
pub type Handshake<B> = (SendRequest<B>, Connection<TokioIo<UpstreamStream>, B>);

/// Opens backend connections within a connect timeout.
#[derive(Debug, Clone, Copy)]
pub struct Connector {
    connect_timeout: Duration,
}

impl Connector {
    /// A connector whose TCP connect and TLS handshake each get `connect_timeout`.
    pub fn new(connect_timeout: Duration) -> Connector {
        Connector { connect_timeout }
    }

    /// The transport alone: TCP, and TLS where the backend wants it.
    pub async fn stream(&self, to: Endpoint<'_>) -> Result<UpstreamStream, UpstreamFailure> {
        tls::connect(to.address, to.tls, self.connect_timeout).await.map_err(|e| UpstreamFailure::classify(&e, true))
    }

    /// A new HTTP/1.1 connection to `to`.
    pub async fn http1<B>(&self, to: Endpoint<'_>) -> Result<Handshake<B>, UpstreamFailure>
    where
        B: Body + Send + 'static,
        B::Data: Send,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let stream = self.stream(to).await?;
        http1::Builder::new()
            // RFC 9112 §5.2: a proxy may replace obs-fold with spaces rather
            // than fail the response (which would blame a live backend).
            .allow_obsolete_multiline_headers_in_responses(true)
            .handshake(TokioIo::new(stream))
            .await
            .map_err(|e| UpstreamFailure::classify(&e, false))
    }
}
