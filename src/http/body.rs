//! Body types: what the proxy sends to clients and to backends.

use std::error::Error as StdError;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body_util::{Either, Full};
use hyper::body::Incoming;
use tokio::sync::Notify;

/// Response bodies: a backend's streamed body, or a short message of ours.
pub type ProxyBody = Either<Incoming, Full<Bytes>>;

/// Request bodies sent upstream: streamed from the client, or buffered
/// (small bodies, so that a request whose connect failed can be retried).
pub type UpstreamBody = Either<ClientBody, Full<Bytes>>;

/// The client's request body as it streams upstream. Its errors (a client
/// that aborts an upload) are marked as the client's, so they are never
/// blamed on the backend, and it announces when it has been sent in full,
/// which is when the backend's response clock starts.
pub struct ClientBody {
    inner: Incoming,
    sent: Arc<Notify>,
}

impl ClientBody {
    /// Wraps `inner`; `sent` is notified once the body has been read whole.
    pub fn new(inner: Incoming, sent: Arc<Notify>) -> ClientBody {
        ClientBody { inner, sent }
    }
}

/// The client's body failed (it disconnected or broke framing mid-upload).
#[derive(Debug)]
pub struct ClientBodyError(hyper::Error);

impl std::fmt::Display for ClientBodyError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "the client's request body failed: {}", self.0)
    }
}

impl StdError for ClientBodyError {
    fn source(&self) -> Option<&(dyn StdError + 'static)> {
        Some(&self.0)
    }
}

impl hyper::body::Body for ClientBody {
    type Data = Bytes;
    type Error = ClientBodyError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<hyper::body::Frame<Bytes>, ClientBodyError>>> {
        match Pin::new(&mut self.inner).poll_frame(cx) {
            Poll::Ready(None) => {
                self.sent.notify_one();
                Poll::Ready(None)
            }
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(ClientBodyError(e)))),
            Poll::Ready(Some(Ok(frame))) => Poll::Ready(Some(Ok(frame))),
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}
