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
use tokio::time::Instant;

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
    /// When bytes last arrived from either side (or the splice was made):
    /// stamped once per poll that read something, for the idle timeout.
    last_active: Instant,
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
        for (flow, early, counted) in [(&mut up, early_up, &counted_up), (&mut down, early_down, &counted_down)] {
            flow.frames.advance(early);
            flow.pending = early.to_vec();
            flow.bytes = early.len() as u64;
            // Carried by the tunnel like the rest, and in the totals it returns.
            counted.inc_by(early.len() as u64);
        }
        let ending = Ending { registration, ..Ending::default() };
        Splice { client, backend, up, down, ending, counted_up, counted_down, last_active: Instant::now() }
    }

    /// When bytes last arrived from the device or the backend (at first,
    /// when the splice was made).
    pub fn last_active(&self) -> Instant {
        self.last_active
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
        let before = this.up.bytes + this.down.bytes;
        let polled = this.poll_both(cx);
        // One clock read per poll that moved bytes, not one per read.
        if this.up.bytes + this.down.bytes != before {
            this.last_active = Instant::now();
        }
        polled
    }
}

impl<C, B> Splice<C, B>
where
    C: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    fn poll_both(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<(u64, u64)>> {
        let up = self.poll_dir(cx, Dir::Up)?;
        let down = self.poll_dir(cx, Dir::Down)?;
        // The down direction may have moved the ending on (the backend's
        // reply arrived): give the up direction another look.
        let up = if up.is_pending() { self.poll_dir(cx, Dir::Up)? } else { up };
        if up.is_ready() && down.is_ready() {
            Poll::Ready(Ok((self.up.bytes, self.down.bytes)))
        } else {
            Poll::Pending
        }
    }

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

#[cfg(test)]
pub(super) mod tests {
    //! The close protocol on in-memory streams, in paused virtual time: a
    //! test waits only on events, and a guard of [`PATIENCE`] (virtual,
    //! reached only when everything is stuck) turns a hang into a failure.
    //!
    //! The helpers are shared with the session's tests.

    use std::future::Future;
    use std::time::Duration;

    use tokio::io::{duplex, AsyncReadExt, AsyncWriteExt, DuplexStream};

    use super::*;
    use crate::tunnel::wsframe::CLOSE_SERVICE_RESTART;

    pub(crate) const OP_TEXT: u8 = 0x1;
    pub(crate) const OP_BINARY: u8 = 0x2;
    /// The mask the proxy is told to put on its close frame to the backend.
    pub(crate) const PROXY_MASK: [u8; 4] = [0x11, 0x22, 0x33, 0x44];
    /// The mask the test's device puts on its frames.
    const DEVICE_MASK: [u8; 4] = [0xa1, 0xb2, 0xc3, 0xd4];
    /// How long (virtual) a step may stall before the test fails.
    pub(crate) const PATIENCE: Duration = Duration::from_secs(60);

    /// A whole frame (FIN set): unmasked as a server sends it, or masked
    /// with `mask` as a client must send it.
    pub(crate) fn frame(opcode: u8, payload: &[u8], mask: Option<[u8; 4]>) -> Vec<u8> {
        let mut f = super::super::wsframe::tests::header(true, opcode, payload.len(), mask);
        match mask {
            Some(key) => f.extend(payload.iter().enumerate().map(|(i, b)| b ^ key[i % 4])),
            None => f.extend_from_slice(payload),
        }
        f
    }

    /// A frame from the backend.
    pub(crate) fn server_frame(opcode: u8, payload: &[u8]) -> Vec<u8> {
        frame(opcode, payload, None)
    }

    /// A frame from the device.
    pub(crate) fn client_frame(opcode: u8, payload: &[u8]) -> Vec<u8> {
        frame(opcode, payload, Some(DEVICE_MASK))
    }

    /// One frame as read off a stream, unmasked.
    #[derive(Debug, PartialEq, Eq)]
    pub(crate) struct Frame {
        pub(crate) opcode: u8,
        pub(crate) mask: Option<[u8; 4]>,
        pub(crate) payload: Vec<u8>,
    }

    impl Frame {
        /// The code of a close frame.
        pub(crate) fn close_code(&self) -> Option<u16> {
            match self.payload[..] {
                [hi, lo, ..] if self.opcode == OPCODE_CLOSE => Some(u16::from_be_bytes([hi, lo])),
                _ => None,
            }
        }

        /// The reason of a close frame.
        pub(crate) fn close_reason(&self) -> String {
            String::from_utf8_lossy(self.payload.get(2..).unwrap_or_default()).into_owned()
        }
    }

    /// Reads one frame (an `UnexpectedEof` error if the stream ends first).
    pub(crate) async fn read_frame<R: AsyncRead + Unpin>(r: &mut R) -> io::Result<Frame> {
        let mut head = [0u8; 2];
        r.read_exact(&mut head).await?;
        let len = match head[1] & 0x7f {
            126 => u64::from(r.read_u16().await?),
            127 => r.read_u64().await?,
            n => u64::from(n),
        };
        let mask = if head[1] & 0x80 != 0 {
            let mut key = [0u8; 4];
            r.read_exact(&mut key).await?;
            Some(key)
        } else {
            None
        };
        let len = usize::try_from(len).map_err(|_| io::Error::other("frame too long"))?;
        let mut payload = vec![0u8; len];
        r.read_exact(&mut payload).await?;
        if let Some(key) = mask {
            payload.iter_mut().enumerate().for_each(|(i, b)| *b ^= key[i % 4]);
        }
        Ok(Frame { opcode: wsframe::opcode(head[0]), mask, payload })
    }

    /// Reads frames up to and including a close frame: returns the frames
    /// before it, and the close frame.
    pub(crate) async fn read_until_close<R: AsyncRead + Unpin>(r: &mut R) -> io::Result<(Vec<Frame>, Frame)> {
        let mut before = Vec::new();
        loop {
            let frame = read_frame(r).await?;
            if frame.opcode == OPCODE_CLOSE {
                return Ok((before, frame));
            }
            before.push(frame);
        }
    }

    /// Reads exactly `n` bytes.
    pub(crate) async fn read_n<R: AsyncRead + Unpin>(r: &mut R, n: usize) -> io::Result<Vec<u8>> {
        let mut buf = vec![0u8; n];
        r.read_exact(&mut buf).await?;
        Ok(buf)
    }

    /// Reads until the stream ends.
    pub(crate) async fn read_rest<R: AsyncRead + Unpin>(r: &mut R) -> io::Result<Vec<u8>> {
        let mut rest = Vec::new();
        r.read_to_end(&mut rest).await?;
        Ok(rest)
    }

    /// Fails unless `r` has nothing to read right now (neither bytes nor
    /// its end).
    pub(crate) async fn assert_quiet<R: AsyncRead + Unpin>(r: &mut R, what: &str) {
        let mut buf = [0u8; 256];
        // Unconstrained: a spent task budget would read as "nothing yet".
        let polled = tokio::task::unconstrained(std::future::poll_fn(|cx| {
            let mut read = ReadBuf::new(&mut buf);
            Poll::Ready(match Pin::new(&mut *r).poll_read(cx, &mut read) {
                Poll::Pending => None,
                Poll::Ready(result) => Some(result.map(|()| read.filled().to_vec())),
            })
        }))
        .await;
        assert!(polled.is_none(), "{what}: expected nothing yet, got {polled:?}");
    }

    /// `fut`, or a failure after [`PATIENCE`] of virtual time.
    pub(crate) async fn within<T>(what: &str, fut: impl Future<Output = T>) -> T {
        match tokio::time::timeout(PATIENCE, fut).await {
            Ok(out) => out,
            Err(_) => panic!("{what}: still waiting after {PATIENCE:?}"),
        }
    }

    type Pipe = Splice<DuplexStream, DuplexStream>;

    /// A splice between two in-memory streams, and their far ends.
    struct Tunnel {
        /// The device's end of its connection.
        device: DuplexStream,
        /// The backend's end of its connection.
        server: DuplexStream,
        splice: Pipe,
        up: Counter,
        down: Counter,
    }

    fn tunnel(capacity: usize, early_up: &[u8], early_down: &[u8]) -> Tunnel {
        let (client, device) = duplex(capacity);
        let (backend, server) = duplex(capacity);
        let (up, down) = (Counter::default(), Counter::default());
        let splice = Splice::new(client, backend, early_up, early_down, up.clone(), down.clone(), None);
        Tunnel { device, server, splice, up, down }
    }

    /// Runs `step` while driving the splice, which must not end meanwhile.
    async fn drive<T>(splice: &mut Pipe, what: &str, step: impl Future<Output = T>) -> T {
        within(what, async {
            tokio::select! {
                out = step => out,
                end = &mut *splice => panic!("{what}: the splice ended early: {end:?}"),
            }
        })
        .await
    }

    /// Lets the splice do everything it can, until nothing moves.
    async fn settle(splice: &mut Pipe) {
        drive(splice, "settling", tokio::time::sleep(Duration::from_millis(10))).await;
    }

    /// Runs the splice to its end alongside `rest`.
    async fn finish<T>(splice: &mut Pipe, rest: impl Future<Output = T>) -> (io::Result<(u64, u64)>, T) {
        within("the tunnel's end", async { tokio::join!(splice, rest) }).await
    }

    fn close_reply(code: u16) -> Vec<u8> {
        server_frame(OPCODE_CLOSE, &code.to_be_bytes())
    }

    /// The proxy's close frame as the backend must see it: masked with the
    /// mask it was given, 1001 (the proxy leaves on the device's behalf).
    fn assert_proxy_close_to_backend(close: &Frame) {
        assert_eq!(close.opcode, OPCODE_CLOSE, "{close:?}");
        assert_eq!(close.mask, Some(PROXY_MASK), "a client's close frame must be masked");
        assert_eq!(close.close_code(), Some(CLOSE_GOING_AWAY));
    }

    /// The device's end after the proxy's close: the close frame, then EOF.
    /// Then the device closes its side too.
    async fn device_gets_close_then_eof(device: &mut DuplexStream) -> (Vec<Frame>, Frame) {
        let (before, close) = read_until_close(device).await.expect("a close frame for the device");
        let after = read_rest(device).await.expect("the device's stream ends");
        assert!(after.is_empty(), "bytes after the close frame: {after:?}");
        device.shutdown().await.expect("device shuts its side");
        (before, close)
    }

    #[tokio::test(start_paused = true)]
    async fn close_at_a_device_boundary_lets_the_backend_finish() {
        let Tunnel { mut device, mut server, mut splice, up, down } = tunnel(64 * 1024, b"", b"");
        let hello = client_frame(OP_TEXT, b"hello");
        device.write_all(&hello).await.expect("device writes");
        let got = drive(&mut splice, "hello to the backend", read_n(&mut server, hello.len())).await;
        assert_eq!(got.expect("backend reads"), hello);

        splice.begin_close(CLOSE_SERVICE_RESTART, "moved", PROXY_MASK);
        // A second request does not replace the first.
        splice.begin_close(CLOSE_GOING_AWAY, "shutdown", [0; 4]);
        assert!(splice.closing());
        let close = drive(&mut splice, "close to the backend", read_frame(&mut server)).await;
        assert_proxy_close_to_backend(&close.expect("backend reads a frame"));

        // The device keeps talking: dropped. The backend answers something
        // it accepted before the close: delivered.
        let too_late = client_frame(OP_TEXT, b"too late");
        device.write_all(&too_late).await.expect("device writes");
        let answer = server_frame(OP_TEXT, b"answer");
        server.write_all(&answer).await.expect("backend writes");
        let got = drive(&mut splice, "answer to the device", read_n(&mut device, answer.len())).await;
        assert_eq!(got.expect("device reads"), answer);
        assert!(!splice.device_closed(), "the device's close frame must wait for the backend's reply");

        let reply = close_reply(CLOSE_GOING_AWAY);
        server.write_all(&reply).await.expect("backend replies");
        let (copied, ((before, close), backend_rest)) = finish(&mut splice, async {
            tokio::join!(device_gets_close_then_eof(&mut device), async {
                let rest = read_rest(&mut server).await.expect("backend's stream ends");
                server.shutdown().await.expect("backend shuts its side");
                rest
            })
        })
        .await;
        assert!(before.is_empty(), "the backend's close reply is not forwarded: {before:?}");
        assert_eq!(close.mask, None, "a server's frame is not masked");
        assert_eq!(close.close_code(), Some(CLOSE_SERVICE_RESTART));
        assert_eq!(close.close_reason(), "moved");
        assert!(backend_rest.is_empty(), "the device's bytes after the close reached the backend: {backend_rest:?}");
        assert!(splice.device_closed());

        let sent_up = (hello.len() + too_late.len()) as u64;
        let sent_down = (answer.len() + reply.len()) as u64;
        assert_eq!(copied.expect("clean end"), (sent_up, sent_down));
        assert_eq!((up.get(), down.get()), (sent_up, sent_down));
    }

    #[tokio::test(start_paused = true)]
    async fn close_waits_for_the_device_to_finish_its_frame() {
        let Tunnel { mut device, mut server, mut splice, .. } = tunnel(64 * 1024, b"", b"");
        let message = client_frame(OP_BINARY, &[7u8; 40]);
        let (head, tail) = message.split_at(10);
        device.write_all(head).await.expect("device writes");
        let got = drive(&mut splice, "a frame's head to the backend", read_n(&mut server, head.len())).await;
        assert_eq!(got.expect("backend reads"), head);

        splice.begin_close(CLOSE_SERVICE_RESTART, "moved", PROXY_MASK);
        settle(&mut splice).await;
        assert_quiet(&mut server, "backend while the device is mid-frame").await;

        // More of the frame, still not all of it.
        let (more, last) = tail.split_at(5);
        device.write_all(more).await.expect("device writes");
        let got = drive(&mut splice, "more of the frame", read_n(&mut server, more.len())).await;
        assert_eq!(got.expect("backend reads"), more);
        settle(&mut splice).await;
        assert_quiet(&mut server, "backend while the device is still mid-frame").await;

        // The frame's end and a whole frame after it, in one write.
        let mut end_and_next = last.to_vec();
        end_and_next.extend(client_frame(OP_TEXT, b"dropped"));
        device.write_all(&end_and_next).await.expect("device writes");
        let got = drive(&mut splice, "the frame's end", read_n(&mut server, last.len())).await;
        assert_eq!(got.expect("backend reads"), last);
        let close = drive(&mut splice, "close to the backend", read_frame(&mut server)).await;
        assert_proxy_close_to_backend(&close.expect("backend reads a frame"));

        server.write_all(&close_reply(CLOSE_GOING_AWAY)).await.expect("backend replies");
        let (copied, ((_, close), backend_rest)) = finish(&mut splice, async {
            tokio::join!(device_gets_close_then_eof(&mut device), async {
                let rest = read_rest(&mut server).await.expect("backend's stream ends");
                server.shutdown().await.expect("backend shuts its side");
                rest
            })
        })
        .await;
        assert_eq!(close.close_code(), Some(CLOSE_SERVICE_RESTART));
        assert!(backend_rest.is_empty(), "the frame after the close reached the backend: {backend_rest:?}");
        let (sent_up, _) = copied.expect("clean end");
        assert_eq!(sent_up, (message.len() + end_and_next.len() - last.len()) as u64);
    }

    #[tokio::test(start_paused = true)]
    async fn forced_close_waits_for_the_backend_to_finish_its_frame() {
        let Tunnel { mut device, mut server, mut splice, .. } = tunnel(64 * 1024, b"", b"");
        // 300 bytes: a 16-bit length.
        let message = server_frame(OP_BINARY, &[9u8; 300]);
        let (head, tail) = message.split_at(100);
        server.write_all(head).await.expect("backend writes");
        let got = drive(&mut splice, "a frame's head to the device", read_n(&mut device, head.len())).await;
        assert_eq!(got.expect("device reads"), head);

        splice.begin_close(CLOSE_SERVICE_RESTART, "moved", PROXY_MASK);
        let close = drive(&mut splice, "close to the backend", read_frame(&mut server)).await;
        assert_proxy_close_to_backend(&close.expect("backend reads a frame"));
        // The reply is overdue: stop waiting for it.
        splice.force_close();
        settle(&mut splice).await;
        assert_quiet(&mut device, "device while the backend is mid-frame").await;
        assert!(!splice.device_closed());

        // The frame's end, then a frame the device must not get.
        let mut end_and_next = tail.to_vec();
        end_and_next.extend(server_frame(OP_TEXT, b"after the close"));
        server.write_all(&end_and_next).await.expect("backend writes");
        let (copied, (rest_of_frame, (before, close), backend_rest)) = finish(&mut splice, async {
            let rest_of_frame = read_n(&mut device, tail.len()).await.expect("device reads");
            let closed = device_gets_close_then_eof(&mut device).await;
            // The backend never closes; it only sees its stream end.
            let backend_rest = read_rest(&mut server).await.expect("backend's stream ends");
            (rest_of_frame, closed, backend_rest)
        })
        .await;
        assert_eq!(rest_of_frame, tail);
        assert!(before.is_empty(), "frames after the boundary reached the device: {before:?}");
        assert_eq!(close.close_code(), Some(CLOSE_SERVICE_RESTART));
        assert!(backend_rest.is_empty());
        assert_eq!(copied.expect("forced end").1, (message.len() + end_and_next.len() - tail.len()) as u64);
    }

    #[tokio::test(start_paused = true)]
    async fn a_backend_ignoring_the_close_is_cut_off_when_forced() {
        let Tunnel { mut device, mut server, mut splice, .. } = tunnel(64 * 1024, b"", b"");
        splice.begin_close(CLOSE_GOING_AWAY, "proxy shutting down", PROXY_MASK);
        let close = drive(&mut splice, "close to the backend", read_frame(&mut server)).await;
        assert_proxy_close_to_backend(&close.expect("backend reads a frame"));

        // The backend carries on as if nothing happened: still delivered.
        let chatter = server_frame(OP_TEXT, b"still talking");
        server.write_all(&chatter).await.expect("backend writes");
        let got = drive(&mut splice, "chatter to the device", read_n(&mut device, chatter.len())).await;
        assert_eq!(got.expect("device reads"), chatter);
        settle(&mut splice).await;
        assert_quiet(&mut device, "device before the close is forced").await;

        splice.force_close();
        let (copied, ((before, close), backend_rest)) = finish(&mut splice, async {
            let closed = device_gets_close_then_eof(&mut device).await;
            (closed, read_rest(&mut server).await.expect("backend's stream ends"))
        })
        .await;
        assert!(before.is_empty());
        assert_eq!(close.close_code(), Some(CLOSE_GOING_AWAY));
        assert_eq!(close.close_reason(), "proxy shutting down");
        assert!(backend_rest.is_empty());
        // Ended although the backend never replied nor closed.
        assert_eq!(copied.expect("forced end"), (0, chatter.len() as u64));
        drop(server);
    }

    #[tokio::test(start_paused = true)]
    async fn a_device_stuck_mid_frame_gets_no_close_to_the_backend_when_forced() {
        let Tunnel { mut device, mut server, mut splice, .. } = tunnel(64 * 1024, b"", b"");
        let message = client_frame(OP_BINARY, &[1u8; 50]);
        let head = &message[..20];
        device.write_all(head).await.expect("device writes");
        let got = drive(&mut splice, "a frame's head to the backend", read_n(&mut server, head.len())).await;
        assert_eq!(got.expect("backend reads"), head);

        splice.begin_close(CLOSE_SERVICE_RESTART, "moved", PROXY_MASK);
        settle(&mut splice).await;
        assert_quiet(&mut server, "backend while the device is mid-frame").await;
        splice.force_close();
        device.write_all(&message[20..30]).await.expect("device writes");
        let (copied, ((_, close), backend_rest)) = finish(&mut splice, async {
            let closed = device_gets_close_then_eof(&mut device).await;
            (closed, read_rest(&mut server).await.expect("backend's stream ends"))
        })
        .await;
        assert_eq!(close.close_code(), Some(CLOSE_SERVICE_RESTART));
        // A close frame in the middle of the device's frame would corrupt
        // the stream: the backend just sees it end.
        assert!(backend_rest.is_empty(), "after the device's partial frame: {backend_rest:?}");
        assert!(copied.is_ok(), "{copied:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn copies_both_ways_through_small_buffers_and_counts_bytes() {
        let early_up = client_frame(OP_TEXT, b"arrived with the upgrade");
        let early_down = server_frame(OP_TEXT, b"the backend's first words");
        // Buffers far smaller than the frames: every write is partial.
        let Tunnel { device, server, mut splice, up, down } = tunnel(64, &early_up, &early_down);
        let up_frames: Vec<u8> = [client_frame(OP_BINARY, &[3u8; 70_000]), client_frame(OP_TEXT, b"x")].concat();
        let down_frames: Vec<u8> = [server_frame(OP_BINARY, &[4u8; 20_000]), server_frame(OP_BINARY, &[])].concat();

        let (mut device_rx, mut device_tx) = tokio::io::split(device);
        let (mut server_rx, mut server_tx) = tokio::io::split(server);
        let (copied, (at_backend, at_device, (), ())) = finish(&mut splice, async {
            tokio::join!(
                async { read_rest(&mut server_rx).await.expect("backend reads") },
                async { read_rest(&mut device_rx).await.expect("device reads") },
                async {
                    device_tx.write_all(&up_frames).await.expect("device writes");
                    device_tx.shutdown().await.expect("device shuts its side");
                },
                async {
                    server_tx.write_all(&down_frames).await.expect("backend writes");
                    server_tx.shutdown().await.expect("backend shuts its side");
                },
            )
        })
        .await;
        assert_eq!(at_backend, [early_up.clone(), up_frames.clone()].concat());
        assert_eq!(at_device, [early_down.clone(), down_frames.clone()].concat());
        let expected = ((early_up.len() + up_frames.len()) as u64, (early_down.len() + down_frames.len()) as u64);
        assert_eq!(copied.expect("clean end"), expected);
        assert_eq!((up.get(), down.get()), expected);
        assert!(!splice.closing() && !splice.device_closed());
    }
}
