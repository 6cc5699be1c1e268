//! The access line: one `info` line per proxied request, written when its
//! response body has been passed to the client connection whole, or when
//! it is dropped short (the client went away, the backend broke off), so
//! that it can say how many body bytes went each way.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use hyper::body::{Body, Frame, SizeHint};
use hyper::header::HeaderValue;
use hyper::Method;
use tracing::info;

use crate::http::headers::Client;
use crate::http::{ProxyBody, Upload};
use crate::routing::Backend;

/// How many request body bytes were read from the client.
pub(crate) enum Received {
    /// Known once sent: none, or a body buffered whole.
    Known(u64),
    /// Streamed upstream: counted as it goes.
    Streamed(Arc<Upload>),
}

impl Received {
    fn bytes(&self) -> u64 {
        match self {
            Received::Known(n) => *n,
            Received::Streamed(upload) => upload.read(),
        }
    }
}

/// What the access line says besides the response body's size.
pub(crate) struct AccessLine {
    pub(crate) device: String,
    pub(crate) backend: Arc<Backend>,
    pub(crate) method: Method,
    pub(crate) path: String,
    pub(crate) status: u16,
    /// Until the response's headers came.
    pub(crate) elapsed: Duration,
    pub(crate) client: Arc<Client>,
    pub(crate) request_id: HeaderValue,
    pub(crate) received: Received,
}

impl AccessLine {
    fn write(&self, bytes_out: u64, complete: bool) {
        let request_id = self.request_id.to_str().unwrap_or("-");
        info!(
            device = self.device,
            backend = %self.backend.id,
            method = %self.method,
            path = self.path,
            status = self.status,
            elapsed = ?self.elapsed,
            client = %self.client.ip(),
            bytes_in = self.received.bytes(),
            bytes_out,
            complete,
            request_id = %request_id,
            "proxied"
        );
    }
}

/// The response body to the client; writes its request's access line, if
/// it has one, when it ends or is dropped.
pub(crate) struct LoggedBody {
    inner: ProxyBody,
    sent: u64,
    ended: bool,
    line: Option<Box<AccessLine>>,
}

impl LoggedBody {
    pub(crate) fn new(inner: ProxyBody, line: Option<Box<AccessLine>>) -> LoggedBody {
        LoggedBody { inner, sent: 0, ended: false, line }
    }

    fn finish(&mut self) {
        if let Some(line) = self.line.take() {
            line.write(self.sent, self.ended);
        }
    }
}

impl Body for LoggedBody {
    type Data = Bytes;
    type Error = <ProxyBody as Body>::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = &mut *self;
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    this.sent += data.len() as u64;
                }
                if this.inner.is_end_stream() {
                    this.ended = true;
                    this.finish();
                }
            }
            Poll::Ready(None) => {
                this.ended = true;
                this.finish();
            }
            Poll::Ready(Some(Err(_))) => this.finish(),
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for LoggedBody {
    fn drop(&mut self) {
        if self.line.is_some() {
            // Never polled to the end: an empty body hyper did not need to
            // poll ends here; a longer one was cut short.
            self.ended = self.ended || self.inner.is_end_stream();
            self.finish();
        }
    }
}
