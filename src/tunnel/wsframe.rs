//! Just enough of the WebSocket framing (RFC 6455 §5.2) for a tunnel to
//! know where frames begin and end, and to write close frames of its own.
//!
//! The tunnel never decodes payloads or extensions: it reads each frame's
//! header to learn the payload length, then counts bytes past it. That is
//! what lets the proxy end a tunnel with a close frame placed between two
//! frames (control frames may sit between the fragments of a message, §5.4)
//! instead of in the middle of one, which the device would see as a
//! protocol error.

/// Opcode of a close frame.
pub const OPCODE_CLOSE: u8 = 0x8;

/// Close code sent to a device whose tunnel is moved to another backend
/// (1012, "service restart": reconnect and you will be served).
pub const CLOSE_SERVICE_RESTART: u16 = 1012;
/// Close code for "going away" (the proxy is shutting down, or it leaves
/// the backend on the device's behalf).
pub const CLOSE_GOING_AWAY: u16 = 1001;

/// Follows the frames of one direction of a WebSocket stream.
#[derive(Debug, Default, Clone)]
pub struct FrameTracker {
    /// Header bytes seen so far of the frame being read (0: at a boundary,
    /// unless `remaining` payload bytes are still to come).
    header: [u8; 14],
    have: u8,
    /// Payload bytes of the current frame not yet seen.
    remaining: u64,
}

impl FrameTracker {
    /// True between frames: the next byte starts a new frame.
    pub fn at_boundary(&self) -> bool {
        self.have == 0 && self.remaining == 0
    }

    /// Consumes bytes up to the end of the current frame (or all of `data`
    /// if it ends first) and returns how many it took. At a boundary it
    /// takes the whole next frame if `data` holds it.
    pub fn advance_one(&mut self, data: &[u8]) -> usize {
        let mut used = 0;
        // The header, which may arrive split across reads.
        if self.remaining == 0 {
            while used < data.len() {
                self.header[usize::from(self.have)] = data[used];
                self.have += 1;
                used += 1;
                if let Some(len) = self.payload_len() {
                    self.have = 0;
                    self.remaining = len;
                    break;
                }
            }
            if self.have != 0 || used == 0 {
                return used;
            }
        }
        let take = usize::try_from(self.remaining).map_or(data.len() - used, |r| r.min(data.len() - used));
        self.remaining -= take as u64;
        used + take
    }

    /// Consumes all of `data`.
    pub fn advance(&mut self, mut data: &[u8]) {
        while !data.is_empty() {
            let used = self.advance_one(data);
            data = &data[used..];
        }
    }

    /// The payload length once the header is complete.
    fn payload_len(&self) -> Option<u64> {
        let have = usize::from(self.have);
        if have < 2 {
            return None;
        }
        let masked = self.header[1] & 0x80 != 0;
        let (ext, len7) = match self.header[1] & 0x7f {
            126 => (2, None),
            127 => (8, None),
            n => (0, Some(u64::from(n))),
        };
        let need = 2 + ext + if masked { 4 } else { 0 };
        if have < need {
            return None;
        }
        Some(match len7 {
            Some(n) => n,
            None if ext == 2 => u64::from(u16::from_be_bytes([self.header[2], self.header[3]])),
            None => {
                let mut bytes = [0u8; 8];
                bytes.copy_from_slice(&self.header[2..10]);
                u64::from_be_bytes(bytes)
            }
        })
    }
}

/// The opcode of a frame whose first byte is `first`.
pub fn opcode(first: u8) -> u8 {
    first & 0x0f
}

/// An unmasked close frame, as a server sends it to a client.
pub fn close_frame(code: u16, reason: &str) -> Vec<u8> {
    let payload = close_payload(code, reason);
    let mut frame = Vec::with_capacity(2 + payload.len());
    frame.push(0x80 | OPCODE_CLOSE);
    frame.push(payload.len() as u8);
    frame.extend_from_slice(&payload);
    frame
}

/// A masked close frame, as a client must send it to a server (§5.3).
pub fn masked_close_frame(code: u16, reason: &str, mask: [u8; 4]) -> Vec<u8> {
    let payload = close_payload(code, reason);
    let mut frame = Vec::with_capacity(6 + payload.len());
    frame.push(0x80 | OPCODE_CLOSE);
    frame.push(0x80 | payload.len() as u8);
    frame.extend_from_slice(&mask);
    frame.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    frame
}

/// Code and reason, the reason cut (on a character boundary) to fit a
/// control frame's 125 bytes.
fn close_payload(code: u16, reason: &str) -> Vec<u8> {
    let mut end = reason.len().min(123);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    let mut payload = code.to_be_bytes().to_vec();
    payload.extend_from_slice(&reason.as_bytes()[..end]);
    payload
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A frame's header for the tests: FIN bit, opcode, length, and the
    /// masking key if there is one (the payload is the caller's).
    pub(crate) fn header(fin: bool, opcode: u8, payload_len: usize, mask: Option<[u8; 4]>) -> Vec<u8> {
        let mut f = vec![if fin { 0x80 } else { 0 } | opcode];
        let m = if mask.is_some() { 0x80 } else { 0 };
        match payload_len {
            n if n < 126 => f.push(m | n as u8),
            n if n <= 0xffff => {
                f.push(m | 126);
                f.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                f.push(m | 127);
                f.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        if let Some(key) = mask {
            f.extend_from_slice(&key);
        }
        f
    }

    fn frame(fin: bool, opcode: u8, payload_len: usize, mask: bool) -> Vec<u8> {
        let mut f = header(fin, opcode, payload_len, mask.then_some([1, 2, 3, 4]));
        f.extend(std::iter::repeat_n(7u8, payload_len));
        f
    }

    #[test]
    fn finds_boundaries_whatever_the_read_sizes() {
        let mut stream = Vec::new();
        let mut ends = Vec::new();
        for (fin, op, len, mask) in [
            (false, 2, 70_000, false),
            (false, 0, 300, true),
            (true, 0, 0, false),
            (true, 9, 5, false),
            (true, 1, 125, true),
        ] {
            stream.extend(frame(fin, op, len, mask));
            ends.push(stream.len());
        }
        for chunk in [1, 2, 3, 7, 100, 4096, stream.len()] {
            let mut t = FrameTracker::default();
            let mut seen = Vec::new();
            let mut pos = 0;
            for piece in stream.chunks(chunk) {
                let mut rest = piece;
                while !rest.is_empty() {
                    let used = t.advance_one(rest);
                    pos += used;
                    rest = &rest[used..];
                    if t.at_boundary() {
                        seen.push(pos);
                    }
                }
            }
            assert_eq!(seen, ends, "chunk size {chunk}");
        }
    }

    #[test]
    fn close_frames_are_well_formed() {
        let f = close_frame(1012, "rebalance");
        assert_eq!(&f[..4], &[0x88, 11, 0x03, 0xf4]);
        assert_eq!(&f[4..], b"rebalance");
        let m = masked_close_frame(1001, "bye", [9, 8, 7, 6]);
        assert_eq!(&m[..2], &[0x88, 0x85]);
        let unmasked: Vec<u8> = m[6..].iter().enumerate().map(|(i, b)| b ^ [9, 8, 7, 6][i % 4]).collect();
        assert_eq!(unmasked, [0x03, 0xe9, b'b', b'y', b'e']);
        let long = "é".repeat(100);
        assert!(close_frame(1000, &long).len() <= 127);
        let mut t = FrameTracker::default();
        t.advance(&m);
        assert!(t.at_boundary());
    }
}
