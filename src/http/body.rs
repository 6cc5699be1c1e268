//! Body types: what the proxy sends to clients and to backends.

use std::error::Error as StdError;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{Either, Full};
use hyper::body::Incoming;
use tokio::sync::Notify;
use tokio::time::{Instant, Sleep};

/// Response bodies: a backend's streamed body, or a short message of ours.
pub type ProxyBody = Either<Incoming, Full<Bytes>>;

/// Request bodies sent upstream: streamed from the client, or buffered
/// (small bodies, so that a request whose connect failed can be retried).
pub type UpstreamBody = Either<ClientBody, Full<Bytes>>;

/// The client's request body as it streams upstream. Its errors (a client
/// that aborts an upload, stalls past `server.client_body_timeout`, or
/// sends more than `server.client_max_body_size`) are marked as the
/// client's, so they are never blamed on the backend, and it announces when
/// it has been sent in full, which is when the backend's response clock
/// starts.
pub struct ClientBody {
    inner: Incoming,
    upload: Option<Arc<Upload>>,
    limits: BodyLimits,
    read: u64,
    /// Armed while waiting for the next frame.
    stall: Option<Pin<Box<Sleep>>>,
    stall_armed: bool,
}

/// What a request body may take.
#[derive(Debug, Clone, Copy)]
pub struct BodyLimits {
    /// `server.client_max_body_size`: `None` for no limit.
    pub max_size: Option<u64>,
    /// `server.client_body_timeout`: the longest wait for the next bytes.
    pub stall_timeout: Duration,
}

/// A streamed request body's progress, shared with those who wait on it
/// (the response clock) and count it (the access line).
#[derive(Debug, Default)]
pub struct Upload {
    /// Notified once the body has been read whole.
    pub done: Notify,
    read: AtomicU64,
}

impl Upload {
    /// Body bytes read from the client so far.
    pub fn read(&self) -> u64 {
        self.read.load(Ordering::Relaxed)
    }
}

impl ClientBody {
    /// Wraps `inner`; `upload`, if any, counts the bytes read and is
    /// notified once the body has been read whole.
    pub fn new(inner: Incoming, upload: Option<Arc<Upload>>, limits: BodyLimits) -> ClientBody {
        ClientBody { inner, upload, limits, read: 0, stall: None, stall_armed: false }
    }
}

/// Why the client's body failed; never the backend's fault.
#[derive(Debug)]
pub enum ClientBodyError {
    /// It disconnected or broke framing mid-upload.
    Failed(hyper::Error),
    /// No bytes came for `server.client_body_timeout`.
    Stalled(Duration),
    /// It passed `server.client_max_body_size`.
    TooLarge(u64),
}

impl std::fmt::Display for ClientBodyError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ClientBodyError::Failed(e) => write!(f, "the client's request body failed: {e}"),
            ClientBodyError::Stalled(after) => {
                write!(f, "the client's request body stalled for {after:?} (server.client_body_timeout)")
            }
            ClientBodyError::TooLarge(max) => {
                write!(f, "the client's request body passed {max} bytes (server.client_max_body_size)")
            }
        }
    }
}

impl StdError for ClientBodyError {
    fn source(&self) -> Option<&(dyn StdError + 'static)> {
        match self {
            ClientBodyError::Failed(e) => Some(e),
            _ => None,
        }
    }
}

impl hyper::body::Body for ClientBody {
    type Data = Bytes;
    type Error = ClientBodyError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<hyper::body::Frame<Bytes>, ClientBodyError>>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(None) => {
                this.stall_armed = false;
                if let Some(upload) = &this.upload {
                    upload.done.notify_one();
                }
                Poll::Ready(None)
            }
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(ClientBodyError::Failed(e)))),
            Poll::Ready(Some(Ok(frame))) => {
                this.stall_armed = false;
                if let Some(data) = frame.data_ref() {
                    this.read += data.len() as u64;
                    if let Some(upload) = &this.upload {
                        upload.read.store(this.read, Ordering::Relaxed);
                    }
                    if let Some(max) = this.limits.max_size.filter(|max| this.read > *max) {
                        return Poll::Ready(Some(Err(ClientBodyError::TooLarge(max))));
                    }
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Pending => {
                let deadline = Instant::now() + this.limits.stall_timeout;
                let stall = match &mut this.stall {
                    Some(stall) => {
                        if !this.stall_armed {
                            stall.as_mut().reset(deadline);
                        }
                        stall
                    }
                    None => this.stall.insert(Box::pin(tokio::time::sleep_until(deadline))),
                };
                this.stall_armed = true;
                match stall.as_mut().poll(cx) {
                    Poll::Ready(()) => Poll::Ready(Some(Err(ClientBodyError::Stalled(this.limits.stall_timeout)))),
                    Poll::Pending => Poll::Pending,
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}
