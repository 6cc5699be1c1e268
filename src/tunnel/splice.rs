//! Moving a tunnel's bytes both ways, and ending it with close frames.
//!
//! A [`Splice`] joins the device's connection to the backend's. It is
//! readiness-driven: it reads only when a socket has bytes, into a scratch
//! buffer that belongs to the worker thread, and writes them straight on.
//! Only bytes the destination won't take yet are copied into a buffer of the
//! tunnel's own, freed once written. So an idle tunnel holds no buffer at
//! all (an 8 KiB pair per tunnel, as a plain copy loop keeps, would cost
//! more than everything else a tunnel needs).
//!
//! Both directions are followed frame by frame ([`super::wsframe`]), so the
//! proxy can end a tunnel cleanly ([`Splice::begin_close`]):
//!
//! 1. At the next frame boundary of the device's stream, a close frame
//!    (1001) goes to the backend, and the device's later bytes are dropped.
//! 2. Everything the backend sends before its reply still reaches the
//!    device. A message the backend accepted before it saw the close is
//!    therefore delivered, not lost in the proxy.
//! 3. In place of the backend's close reply, the device gets the proxy's
//!    close frame (1012 for a move, 1001 for shutdown), then a FIN.
//!
//! A backend that never answers, or a device stuck mid-frame, is handled
//! by [`Splice::force_close`]: the device's close frame then goes at the
//! next boundary of the backend's stream, whatever the backend sends.

use std::cell::RefCell;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use prometheus_client::metrics::counter::Counter;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::registry::Registration;
use super::wsframe::{self, FrameTracker, CLOSE_GOING_AWAY, OPCODE_CLOSE};

/// Size of each worker thread's scratch buffer.
const SCRATCH: usize = 16 * 1024;
/// Reads per direction in one poll, so a busy tunnel can't starve others.
const READS_PER_POLL: usize = 32;

thread_local! {
    static SCRATCH_BUF: RefCell<Box<[u8]>> = RefCell::new(vec![0; SCRATCH].into_boxed_slice());
}

/// Which way bytes flow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Dir {
    /// Device to backend.
    Up,
    /// Backend to device.
    Down,
}

/// One direction's state.
#[derive(Debug, Default)]
struct Flow {
    /// Bytes read but not yet taken by the destination (usually empty and
    /// unallocated).
    pending: Vec<u8>,
    sent: usize,
    frames: FrameTracker,
    /// The source has ended.
    eof: bool,
    /// Read the source but drop what it sends (after a close frame).
    discard: bool,
    /// The destination has been shut for writing.
    shut: bool,
    /// Written since the last flush.
    dirty: bool,
    bytes: u64,
}

/// How far an ending the proxy started has got.
#[derive(Debug, Default)]
struct Ending {
    /// Asked to end: the device's close code and reason.
    request: Option<(u16, &'static str)>,
    backend_close_sent: bool,
    backend_replied: bool,
    device_close_sent: bool,
    /// Don't wait for the backend or for frame boundaries of the device.
    force: bool,
    mask: [u8; 4],
    /// The tunnel's place in the registry, given up as the ending starts:
    /// from then on the device's HTTP must not follow this tunnel, whose
    /// backend is being told the device has gone.
    registration: Option<Registration>,
}

/// Both directions of one tunnel; resolves with `(bytes up, bytes down)`
/// once both sides have finished.
#[derive(Debug)]
pub struct Splice<C, B> {
    client: C,
    backend: B,
    up: Flow,
    down: Flow,
    ending: Ending,
    counted_up: Counter,
    counted_down: Counter,
}

impl<C, B> Splice<C, B>
where
    C: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    /// `early_up`/`early_down`: bytes that arrived with the upgrade and are
    /// already read (hyper's leftovers); `counted_*`: byte counters;
    /// `registration`: dropped when the proxy starts ending the tunnel.
    pub fn new(
        client: C,
        backend: B,
        early_up: &[u8],
        early_down: &[u8],
        counted_up: Counter,
        counted_down: Counter,
        registration: Option<Registration>,
    ) -> Splice<C, B> {
        let mut up = Flow::default();
        let mut down = Flow::default();
        for (flow, early) in [(&mut up, early_up), (&mut down, early_down)] {
            flow.frames.advance(early);
            flow.pending = early.to_vec();
            flow.bytes = early.len() as u64;
        }
        let ending = Ending { registration, ..Ending::default() };
        Splice { client, backend, up, down, ending, counted_up, counted_down }
    }

    /// Starts a clean ending (see the module doc); `code` and `reason` go
    /// to the device. `mask` masks the close frame sent to the backend.
    pub fn begin_close(&mut self, code: u16, reason: &'static str, mask: [u8; 4]) {
        if self.ending.request.is_none() {
            self.ending.request = Some((code, reason));
            self.ending.mask = mask;
            self.ending.registration = None;
        }
    }

    /// Ends without waiting for the backend: the device's close frame goes
    /// at the next frame boundary of the backend's stream.
    pub fn force_close(&mut self) {
        self.ending.force = true;
    }

    /// Whether an ending has been asked for.
    pub fn closing(&self) -> bool {
        self.ending.request.is_some()
    }

    /// Whether the device has been sent the proxy's close frame.
    pub fn device_closed(&self) -> bool {
        self.ending.device_close_sent
    }
}

impl<C, B> Future for Splice<C, B>
where
    C: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    type Output = io::Result<(u64, u64)>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = &mut *self;
        let up = this.poll_dir(cx, Dir::Up)?;
        let down = this.poll_dir(cx, Dir::Down)?;
        // The down direction may have moved the ending on (the backend's
        // reply arrived): give the up direction another look.
        let up = if up.is_pending() { this.poll_dir(cx, Dir::Up)? } else { up };
        if up.is_ready() && down.is_ready() {
            Poll::Ready(Ok((this.up.bytes, this.down.bytes)))
        } else {
            Poll::Pending
        }
    }
}

impl<C, B> Splice<C, B>
where
    C: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    fn poll_dir(&mut self, cx: &mut Context<'_>, dir: Dir) -> Poll<io::Result<()>> {
        match dir {
            Dir::Up => poll_flow(
                cx,
                &mut self.client,
                &mut self.backend,
                &mut self.up,
                &mut self.ending,
                dir,
                &self.counted_up,
            ),
            Dir::Down => poll_flow(
                cx,
                &mut self.backend,
                &mut self.client,
                &mut self.down,
                &mut self.ending,
                dir,
                &self.counted_down,
            ),
        }
    }
}

impl Ending {
    /// Is a close frame due in `dir` at a boundary where nothing is in flight?
    fn due_when_idle(&self, dir: Dir) -> bool {
        match dir {
            Dir::Up => self.request.is_some() && !self.backend_close_sent,
            Dir::Down => self.request.is_some() && self.force && !self.device_close_sent,
        }
    }

    /// The close frame for `dir`'s destination.
    fn frame(&self, dir: Dir) -> Vec<u8> {
        let (code, reason) = self.request.unwrap_or((CLOSE_GOING_AWAY, ""));
        match dir {
            Dir::Up => wsframe::masked_close_frame(CLOSE_GOING_AWAY, "", self.mask),
            Dir::Down => wsframe::close_frame(code, reason),
        }
    }

    fn sent(&mut self, dir: Dir) {
        match dir {
            Dir::Up => self.backend_close_sent = true,
            Dir::Down => self.device_close_sent = true,
        }
    }

    /// Nothing more will be written to `dir`'s destination.
    fn done_writing(&self, dir: Dir) -> bool {
        match dir {
            Dir::Up => self.backend_replied || self.force,
            Dir::Down => self.device_close_sent,
        }
    }
}

impl Flow {
    /// Takes freshly read `data`: returns how many leading bytes go on, and
    /// whether the close frame follows them (then the rest is dropped).
    fn take(&mut self, data: &[u8], ending: &mut Ending, dir: Dir) -> (usize, bool) {
        if self.discard {
            return (0, false);
        }
        match dir {
            Dir::Up if ending.request.is_some() && !ending.backend_close_sent => {
                if self.frames.at_boundary() {
                    return (0, true);
                }
                let used = self.frames.advance_one(data);
                if self.frames.at_boundary() {
                    return (used, true);
                }
                if ending.force {
                    self.discard = true;
                }
                (used, false)
            }
            Dir::Down if ending.request.is_some() && (ending.backend_close_sent || ending.force) => {
                let mut at = 0;
                while at < data.len() {
                    if self.frames.at_boundary() {
                        let reply = wsframe::opcode(data[at]) == OPCODE_CLOSE;
                        if reply {
                            ending.backend_replied = true;
                        }
                        if reply || ending.force {
                            return (at, true);
                        }
                    }
                    at += self.frames.advance_one(&data[at..]);
                }
                (at, false)
            }
            _ => {
                self.frames.advance(data);
                (data.len(), false)
            }
        }
    }
}

/// Drives one direction as far as it can go without waiting; `Ready` once
/// its source has ended and its destination is shut.
fn poll_flow<R, W>(
    cx: &mut Context<'_>,
    src: &mut R,
    dst: &mut W,
    flow: &mut Flow,
    ending: &mut Ending,
    dir: Dir,
    counter: &Counter,
) -> Poll<io::Result<()>>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    if flow.eof && flow.shut {
        return Poll::Ready(Ok(()));
    }
    let mut reads = 0;
    loop {
        // What the destination didn't take last time goes first.
        while flow.sent < flow.pending.len() {
            match Pin::new(&mut *dst).poll_write(cx, &flow.pending[flow.sent..]) {
                Poll::Ready(Ok(0)) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                Poll::Ready(Ok(n)) => {
                    flow.sent += n;
                    flow.dirty = true;
                }
                Poll::Ready(Err(e)) if flow.shut || flow.discard => return finish_on_error(flow, e),
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => return Poll::Pending,
            }
        }
        if !flow.pending.is_empty() {
            // Free it: an idle tunnel holds no buffer.
            flow.pending = Vec::new();
            flow.sent = 0;
        }

        // A close frame due while nothing is in flight.
        if !flow.discard && flow.frames.at_boundary() && ending.due_when_idle(dir) {
            flow.pending = ending.frame(dir);
            flow.discard = true;
            ending.sent(dir);
            cx.waker().wake_by_ref();
            continue;
        }
        if dir == Dir::Up && ending.force && !flow.discard && ending.request.is_some() {
            flow.discard = true;
        }

        // Shut the destination once nothing more will be written to it.
        if !flow.shut && (flow.eof || (flow.discard && ending.done_writing(dir))) {
            if flow.dirty {
                ready!(Pin::new(&mut *dst).poll_flush(cx)).or_else(ignore_if_gone)?;
                flow.dirty = false;
            }
            ready!(Pin::new(&mut *dst).poll_shutdown(cx)).or_else(ignore_if_gone)?;
            flow.shut = true;
        }
        // Forced: the backend ignored our close, so don't wait for its end
        // either; it is dropped with the tunnel.
        if dir == Dir::Down && flow.shut && ending.force && ending.device_close_sent {
            flow.eof = true;
        }
        if flow.eof {
            return Poll::Ready(Ok(()));
        }

        if reads == READS_PER_POLL {
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        reads += 1;
        let read = SCRATCH_BUF.with(|scratch| {
            let mut scratch = scratch.borrow_mut();
            let mut buf = ReadBuf::new(&mut scratch[..]);
            match Pin::new(&mut *src).poll_read(cx, &mut buf) {
                Poll::Pending => Poll::Pending,
                Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
                Poll::Ready(Ok(())) => {
                    let data = buf.filled();
                    if data.is_empty() {
                        flow.eof = true;
                        return Poll::Ready(Ok(()));
                    }
                    counter.inc_by(data.len() as u64);
                    flow.bytes += data.len() as u64;
                    let (forward, close) = flow.take(data, ending, dir);
                    let written = write_now(cx, dst, &data[..forward])?;
                    if written > 0 {
                        flow.dirty = true;
                    }
                    if written < forward || close {
                        flow.pending = data[written..forward].to_vec();
                        flow.sent = 0;
                    }
                    if close {
                        flow.pending.extend_from_slice(&ending.frame(dir));
                        flow.discard = true;
                        ending.sent(dir);
                        cx.waker().wake_by_ref();
                    }
                    Poll::Ready(Ok(()))
                }
            }
        });
        match read {
            Poll::Ready(Ok(())) => {}
            Poll::Ready(Err(e)) if flow.discard => return finish_on_error(flow, e),
            Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
            Poll::Pending => {
                if flow.dirty {
                    match Pin::new(&mut *dst).poll_flush(cx) {
                        Poll::Ready(Ok(())) => flow.dirty = false,
                        Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                        Poll::Pending => {}
                    }
                }
                return Poll::Pending;
            }
        }
    }
}

/// Writes as much of `data` as `dst` takes without waiting.
fn write_now<W: AsyncWrite + Unpin>(cx: &mut Context<'_>, dst: &mut W, data: &[u8]) -> io::Result<usize> {
    let mut written = 0;
    while written < data.len() {
        match Pin::new(&mut *dst).poll_write(cx, &data[written..]) {
            Poll::Ready(Ok(0)) => return Err(io::ErrorKind::WriteZero.into()),
            Poll::Ready(Ok(n)) => written += n,
            Poll::Ready(Err(e)) => return Err(e),
            Poll::Pending => break,
        }
    }
    Ok(written)
}

/// While a tunnel is ending, a peer that resets instead of closing cleanly
/// has still ended: that direction is done.
fn finish_on_error(flow: &mut Flow, _e: io::Error) -> Poll<io::Result<()>> {
    flow.eof = true;
    flow.shut = true;
    flow.pending = Vec::new();
    flow.sent = 0;
    Poll::Ready(Ok(()))
}

fn ignore_if_gone(e: io::Error) -> io::Result<()> {
    match e.kind() {
        io::ErrorKind::NotConnected | io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset => Ok(()),
        _ => Err(e),
    }
}
