//! A tunnel's two streams as one type: hyper's upgrade wrapping taken off
//! where it can be, so a plain TCP tunnel is spliced on the socket itself.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use hyper::upgrade::Upgraded;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use crate::tls::UpstreamStream;

/// One side of a tunnel: the plain TCP stream when the upgraded connection
/// is one, the backend connection (TCP or TLS) of a tunnel's backend side
/// (hyper's wrapping taken off), any other upgraded stream as is.
pub(crate) enum Io {
    Tcp(TcpStream),
    Backend(Box<UpstreamStream>),
    Upgraded(TokioIo<Upgraded>),
}

impl Io {
    /// The stream and the bytes hyper had already read past the upgrade.
    pub(crate) fn from_upgraded(upgraded: Upgraded) -> (Io, Bytes) {
        let upgraded = match upgraded.downcast::<TokioIo<TcpStream>>() {
            Ok(parts) => return (Io::Tcp(parts.io.into_inner()), parts.read_buf),
            Err(upgraded) => upgraded,
        };
        match upgraded.downcast::<TokioIo<UpstreamStream>>() {
            Ok(parts) => match parts.io.into_inner() {
                UpstreamStream::Plain(tcp) => (Io::Tcp(tcp), parts.read_buf),
                tls => (Io::Backend(Box::new(tls)), parts.read_buf),
            },
            Err(upgraded) => (Io::Upgraded(TokioIo::new(upgraded)), Bytes::new()),
        }
    }
}

impl AsyncRead for Io {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Io::Tcp(io) => Pin::new(io).poll_read(cx, buf),
            Io::Backend(io) => Pin::new(io.as_mut()).poll_read(cx, buf),
            Io::Upgraded(io) => Pin::new(io).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Io {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Io::Tcp(io) => Pin::new(io).poll_write(cx, data),
            Io::Backend(io) => Pin::new(io.as_mut()).poll_write(cx, data),
            Io::Upgraded(io) => Pin::new(io).poll_write(cx, data),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Io::Tcp(io) => Pin::new(io).poll_flush(cx),
            Io::Backend(io) => Pin::new(io.as_mut()).poll_flush(cx),
            Io::Upgraded(io) => Pin::new(io).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Io::Tcp(io) => Pin::new(io).poll_shutdown(cx),
            Io::Backend(io) => Pin::new(io.as_mut()).poll_shutdown(cx),
            Io::Upgraded(io) => Pin::new(io).poll_shutdown(cx),
        }
    }
}
