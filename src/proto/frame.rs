//! The frame codec (RFC 6455 §5.2): header parsing and frame encoding.

use alloc::vec::Vec;

use super::mask::apply_mask;

/// A frame's opcode.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum OpCode {
    /// A later fragment of a fragmented message.
    Continuation = 0x0,
    /// The first (or only) frame of a text message.
    Text = 0x1,
    /// The first (or only) frame of a binary message.
    Binary = 0x2,
    /// A close frame.
    Close = 0x8,
    /// A ping frame.
    Ping = 0x9,
    /// A pong frame.
    Pong = 0xa,
}

impl OpCode {
    /// The opcode for a 4-bit value, or `None` for the reserved values.
    pub fn from_u8(v: u8) -> Option<OpCode> {
        Some(match v {
            0x0 => OpCode::Continuation,
            0x1 => OpCode::Text,
            0x2 => OpCode::Binary,
            0x8 => OpCode::Close,
            0x9 => OpCode::Ping,
            0xa => OpCode::Pong,
            _ => return None,
        })
    }

    /// Close, ping and pong are control frames: never fragmented, at most 125 bytes.
    pub fn is_control(self) -> bool {
        (self as u8) & 0x8 != 0
    }
}

/// The largest header: 2 bytes, 8 bytes of extended length, 4 bytes of mask key.
pub const MAX_HEADER_LEN: usize = 14;

/// The largest control-frame payload.
pub const MAX_CONTROL_PAYLOAD: usize = 125;

/// A decoded frame header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FrameHeader {
    /// Final fragment of a message.
    pub fin: bool,
    /// RSV1: the message is compressed, where permessage-deflate was negotiated (RFC 7692 §6).
    /// Whether it is allowed is the connection's business.
    pub rsv1: bool,
    /// The opcode.
    pub opcode: OpCode,
    /// The masking key, present on every client-to-server frame.
    pub mask: Option<[u8; 4]>,
    /// Payload length in bytes.
    pub payload_len: u64,
}

/// Why a header was refused. Every variant is a protocol error (close code 1002).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FrameError {
    /// RSV2 or RSV3 set (no extension here defines them), or RSV1 in a build without the
    /// `deflate` feature.
    ReservedBits,
    /// Opcode 0x3–0x7 or 0xB–0xF.
    ReservedOpcode(u8),
    /// A close, ping or pong with FIN clear.
    FragmentedControl,
    /// A close, ping or pong payload over 125 bytes.
    ControlTooLong,
    /// A 64-bit length with its most significant bit set.
    LengthOverflow,
}

impl core::fmt::Display for FrameError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            FrameError::ReservedBits => f.write_str("reserved bits set"),
            FrameError::ReservedOpcode(op) => write!(f, "reserved opcode {op:#x}"),
            FrameError::FragmentedControl => f.write_str("fragmented control frame"),
            FrameError::ControlTooLong => f.write_str("control frame over 125 bytes"),
            FrameError::LengthOverflow => f.write_str("payload length over 2^63"),
        }
    }
}

impl core::error::Error for FrameError {}

impl FrameHeader {
    /// Parses a header from the start of `buf`.
    ///
    /// Returns `Ok(None)` when `buf` is too short to hold the whole header, and otherwise the header
    /// with its length in bytes. Checks everything a header alone can show; whether a mask is
    /// required and how fragments fit together is the connection's business.
    pub fn parse(buf: &[u8]) -> Result<Option<(FrameHeader, usize)>, FrameError> {
        let [b0, b1, ..] = *buf else { return Ok(None) };
        // RSV1 is the connection's to judge where permessage-deflate is built in; RSV2 and RSV3
        // are never defined here.
        let reserved = if cfg!(feature = "deflate") { 0x30 } else { 0x70 };
        if b0 & reserved != 0 {
            return Err(FrameError::ReservedBits);
        }
        let fin = b0 & 0x80 != 0;
        let opcode = OpCode::from_u8(b0 & 0x0f).ok_or(FrameError::ReservedOpcode(b0 & 0x0f))?;
        let len7 = b1 & 0x7f;
        if opcode.is_control() {
            if !fin {
                return Err(FrameError::FragmentedControl);
            }
            if len7 > 125 {
                return Err(FrameError::ControlTooLong);
            }
        }
        let mask_len = if b1 & 0x80 != 0 { 4 } else { 0 };
        let (payload_len, at) = match len7 {
            126 if buf.len() >= 4 + mask_len => (u64::from(u16::from_be_bytes([buf[2], buf[3]])), 4),
            127 if buf.len() >= 10 + mask_len => {
                let mut b = [0u8; 8];
                b.copy_from_slice(&buf[2..10]);
                let len = u64::from_be_bytes(b);
                if len >> 63 != 0 {
                    return Err(FrameError::LengthOverflow);
                }
                (len, 10)
            }
            126 | 127 => return Ok(None),
            n if buf.len() >= 2 + mask_len => (u64::from(n), 2),
            _ => return Ok(None),
        };
        let mask = match buf.get(at..at + mask_len) {
            Some(&[a, b, c, d]) => Some([a, b, c, d]),
            _ => None,
        };
        Ok(Some((
            FrameHeader {
                fin,
                rsv1: b0 & 0x40 != 0,
                opcode,
                mask,
                payload_len,
            },
            at + mask_len,
        )))
    }

    /// Writes the header into `out`, returning its length.
    pub fn encode(&self, out: &mut [u8; MAX_HEADER_LEN]) -> usize {
        out[0] = (if self.fin { 0x80 } else { 0 }) | (if self.rsv1 { 0x40 } else { 0 }) | self.opcode as u8;
        let mask_bit = if self.mask.is_some() { 0x80 } else { 0 };
        let mut n = if self.payload_len < 126 {
            out[1] = mask_bit | self.payload_len as u8;
            2
        } else if self.payload_len <= u64::from(u16::MAX) {
            out[1] = mask_bit | 126;
            out[2..4].copy_from_slice(&(self.payload_len as u16).to_be_bytes());
            4
        } else {
            out[1] = mask_bit | 127;
            out[2..10].copy_from_slice(&self.payload_len.to_be_bytes());
            10
        };
        if let Some(key) = self.mask {
            out[n..n + 4].copy_from_slice(&key);
            n += 4;
        }
        n
    }
}

/// Appends an unmasked frame whose payload is under 126 bytes: two header bytes and the
/// payload (a server's small frame, the common case). Written through the pointer because
/// `push`/`extend_from_slice` stop being inlined once the binary also links rustls: 21 more
/// instructions per echo (`cargo bench --bench instructions`); `small_frames_are_written_whole`
/// tests this path.
#[inline(always)]
pub(crate) fn write_small_frame(out: &mut Vec<u8>, fin: bool, opcode: OpCode, payload: &[u8]) {
    debug_assert!(payload.len() < 126);
    let n = payload.len();
    out.reserve(2 + n);
    let len = out.len();
    // SAFETY: `reserve` made room for at least `2 + n` bytes past `len`; the two header
    // bytes and the `n` payload bytes are written inside that room, `payload` cannot overlap
    // it (it is borrowed while `out` is borrowed mutably), and `set_len` then covers exactly
    // the bytes written, all initialised.
    unsafe {
        let end = out.as_mut_ptr().add(len);
        end.write(u8::from(fin) << 7 | opcode as u8);
        end.add(1).write(n as u8);
        core::ptr::copy_nonoverlapping(payload.as_ptr(), end.add(2), n);
        out.set_len(len + 2 + n);
    }
}

/// Appends one whole frame to `out`: header, then the payload, masked when `mask` is given.
pub fn write_frame(out: &mut Vec<u8>, fin: bool, opcode: OpCode, mask: Option<[u8; 4]>, payload: &[u8]) {
    if mask.is_none() && payload.len() < 126 {
        write_small_frame(out, fin, opcode, payload);
        return;
    }
    let header = FrameHeader {
        fin,
        rsv1: false,
        opcode,
        mask,
        payload_len: payload.len() as u64,
    };
    let mut h = [0u8; MAX_HEADER_LEN];
    let n = header.encode(&mut h);
    out.reserve(n + payload.len());
    out.extend_from_slice(&h[..n]);
    let start = out.len();
    out.extend_from_slice(payload);
    if let Some(key) = mask {
        apply_mask(&mut out[start..], key, 0);
    }
}

/// Appends a whole message whose `payload` is compressed (permessage-deflate): one frame with
/// FIN and RSV1 set.
pub fn write_compressed_frame(out: &mut Vec<u8>, opcode: OpCode, mask: Option<[u8; 4]>, payload: &[u8]) {
    let start = out.len();
    write_frame(out, true, opcode, mask, payload);
    out[start] |= 0x40;
}

/// Close status codes (RFC 6455 §7.4).
pub mod close_code {
    /// Normal closure.
    pub const NORMAL: u16 = 1000;
    /// The endpoint is going away (server shutdown, idle timeout).
    pub const GOING_AWAY: u16 = 1001;
    /// Protocol error.
    pub const PROTOCOL_ERROR: u16 = 1002;
    /// A data type the endpoint cannot accept.
    pub const UNSUPPORTED_DATA: u16 = 1003;
    /// No status code was present (never sent on the wire).
    pub const NO_STATUS: u16 = 1005;
    /// The connection dropped without a close frame (never sent on the wire).
    pub const ABNORMAL: u16 = 1006;
    /// Text that is not valid UTF-8.
    pub const INVALID_PAYLOAD: u16 = 1007;
    /// A message that violates the endpoint's policy (e.g. a slow consumer).
    pub const POLICY_VIOLATION: u16 = 1008;
    /// A message over the size limit.
    pub const MESSAGE_TOO_BIG: u16 = 1009;
    /// The client expected an extension the server did not negotiate.
    pub const MANDATORY_EXTENSION: u16 = 1010;
    /// An unexpected condition in the server.
    pub const INTERNAL_ERROR: u16 = 1011;
    /// The server is overloaded (here: short of memory); try again later.
    pub const TRY_AGAIN_LATER: u16 = 1013;

    /// Whether `code` may appear in a close frame on the wire: RFC 6455's codes, 1012..=1014
    /// from the IANA registry, and 3000..=4999 for libraries and applications.
    pub fn is_valid(code: u16) -> bool {
        matches!(code, 1000..=1003 | 1007..=1014 | 3000..=4999)
    }
}

/// Writes a close frame carrying `code` and `reason` (truncated to fit 125 bytes on a char boundary).
pub fn write_close(out: &mut Vec<u8>, mask: Option<[u8; 4]>, code: Option<u16>, reason: &str) {
    let mut payload = [0u8; MAX_CONTROL_PAYLOAD];
    let n = match code {
        None => 0,
        Some(code) => {
            payload[..2].copy_from_slice(&code.to_be_bytes());
            let mut end = reason.len().min(MAX_CONTROL_PAYLOAD - 2);
            while !reason.is_char_boundary(end) {
                end -= 1;
            }
            payload[2..2 + end].copy_from_slice(&reason.as_bytes()[..end]);
            2 + end
        }
    };
    write_frame(out, true, OpCode::Close, mask, &payload[..n]);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc_5_7_examples() {
        // A single-frame unmasked text message "Hello".
        let (h, n) = FrameHeader::parse(&[0x81, 0x05, 0x48, 0x65]).unwrap().unwrap();
        assert_eq!(
            (h.fin, h.opcode, h.mask, h.payload_len, n),
            (true, OpCode::Text, None, 5, 2)
        );
        // A single-frame masked text message "Hello".
        let mut f = [0x81, 0x85, 0x37, 0xfa, 0x21, 0x3d, 0x7f, 0x9f, 0x4d, 0x51, 0x58];
        let (h, n) = FrameHeader::parse(&f).unwrap().unwrap();
        assert_eq!(h.mask, Some([0x37, 0xfa, 0x21, 0x3d]));
        apply_mask(&mut f[n..], h.mask.unwrap(), 0);
        assert_eq!(&f[n..], b"Hello");
        // A fragmented unmasked text message: "Hel" then "lo".
        let (h, _) = FrameHeader::parse(&[0x01, 0x03, 0x48, 0x65, 0x6c]).unwrap().unwrap();
        assert_eq!((h.fin, h.opcode), (false, OpCode::Text));
        let (h, _) = FrameHeader::parse(&[0x80, 0x02, 0x6c, 0x6f]).unwrap().unwrap();
        assert_eq!((h.fin, h.opcode), (true, OpCode::Continuation));
        // Unmasked ping "Hello" and masked pong "Hello".
        let (h, _) = FrameHeader::parse(&[0x89, 0x05]).unwrap().unwrap();
        assert_eq!(h.opcode, OpCode::Ping);
        let (h, _) = FrameHeader::parse(&[0x8a, 0x85, 0x37, 0xfa, 0x21, 0x3d])
            .unwrap()
            .unwrap();
        assert_eq!((h.opcode, h.payload_len), (OpCode::Pong, 5));
        // 256 bytes binary in a single unmasked frame: 0x82 0x7E 0x0100.
        let (h, n) = FrameHeader::parse(&[0x82, 0x7e, 0x01, 0x00]).unwrap().unwrap();
        assert_eq!((h.payload_len, n), (256, 4));
        // 64 KiB binary in a single unmasked frame: 0x82 0x7F 0x0000000000010000.
        let (h, n) = FrameHeader::parse(&[0x82, 0x7f, 0, 0, 0, 0, 0, 1, 0, 0])
            .unwrap()
            .unwrap();
        assert_eq!((h.payload_len, n), (65536, 10));
    }

    #[test]
    fn encodes_rfc_examples() {
        let mut out = Vec::new();
        write_frame(&mut out, true, OpCode::Text, None, b"Hello");
        assert_eq!(out, [0x81, 0x05, 0x48, 0x65, 0x6c, 0x6c, 0x6f]);
        out.clear();
        write_frame(&mut out, true, OpCode::Text, Some([0x37, 0xfa, 0x21, 0x3d]), b"Hello");
        assert_eq!(out, [0x81, 0x85, 0x37, 0xfa, 0x21, 0x3d, 0x7f, 0x9f, 0x4d, 0x51, 0x58]);
        out.clear();
        write_frame(&mut out, true, OpCode::Binary, None, &[0u8; 256]);
        assert_eq!(&out[..4], &[0x82, 0x7e, 0x01, 0x00]);
        out.clear();
        write_frame(&mut out, true, OpCode::Binary, None, &[0u8; 65536]);
        assert_eq!(&out[..10], &[0x82, 0x7f, 0, 0, 0, 0, 0, 1, 0, 0]);
    }

    #[cfg(not(feature = "deflate"))]
    #[test]
    fn rsv1_is_refused_without_deflate() {
        assert_eq!(FrameHeader::parse(&[0xc1, 0x07]), Err(FrameError::ReservedBits));
    }

    #[cfg(feature = "deflate")]
    #[test]
    fn rsv1_is_read_and_written() {
        // RFC 7692 §7.2.3.1: "Hello" compressed, one frame with RSV1.
        let (h, n) = FrameHeader::parse(&[0xc1, 0x07]).unwrap().unwrap();
        assert_eq!(
            (h.rsv1, h.fin, h.opcode, h.payload_len, n),
            (true, true, OpCode::Text, 7, 2)
        );
        assert!(!FrameHeader::parse(&[0x81, 0x07]).unwrap().unwrap().0.rsv1);
        let mut out = Vec::new();
        write_compressed_frame(
            &mut out,
            OpCode::Text,
            None,
            &[0xf2, 0x48, 0xcd, 0xc9, 0xc9, 0x07, 0x00],
        );
        assert_eq!(out, [0xc1, 0x07, 0xf2, 0x48, 0xcd, 0xc9, 0xc9, 0x07, 0x00]);
        let mut h = [0u8; MAX_HEADER_LEN];
        let header = FrameHeader::parse(&out).unwrap().unwrap().0;
        assert_eq!(header.encode(&mut h), 2);
        assert_eq!(h[..2], [0xc1, 0x07]);
    }

    #[test]
    fn partial_headers_ask_for_more() {
        let full = [0x82, 0xff, 0, 0, 0, 0, 0, 1, 0, 0, 1, 2, 3, 4];
        for cut in 0..full.len() {
            assert_eq!(FrameHeader::parse(&full[..cut]), Ok(None), "cut {cut}");
        }
        assert!(FrameHeader::parse(&full).unwrap().is_some());
    }

    #[test]
    fn rejects_bad_headers() {
        assert_eq!(FrameHeader::parse(&[0xa1, 0]), Err(FrameError::ReservedBits));
        assert_eq!(FrameHeader::parse(&[0x91, 0]), Err(FrameError::ReservedBits));
        assert_eq!(FrameHeader::parse(&[0x83, 0]), Err(FrameError::ReservedOpcode(3)));
        assert_eq!(FrameHeader::parse(&[0x8b, 0]), Err(FrameError::ReservedOpcode(0xb)));
        assert_eq!(FrameHeader::parse(&[0x09, 0]), Err(FrameError::FragmentedControl));
        assert_eq!(FrameHeader::parse(&[0x89, 126]), Err(FrameError::ControlTooLong));
        assert_eq!(
            FrameHeader::parse(&[0x82, 127, 0x80, 0, 0, 0, 0, 0, 0, 0]),
            Err(FrameError::LengthOverflow)
        );
    }

    #[test]
    fn small_frames_are_written_whole() {
        // Appended after what the buffer holds, at every small length, with and without room.
        for n in 0..126usize {
            let payload: Vec<u8> = (0..n).map(|i| i as u8 ^ 0x5a).collect();
            for spare in [0, 1, 200] {
                let mut out = Vec::with_capacity(3 + spare);
                out.extend_from_slice(b"abc");
                write_frame(&mut out, n % 2 == 0, OpCode::Binary, None, &payload);
                assert_eq!(&out[..3], b"abc");
                assert_eq!(out[3], if n % 2 == 0 { 0x82 } else { 0x02 });
                assert_eq!(out[4] as usize, n);
                assert_eq!(&out[5..], &payload[..], "payload of {n} bytes");
            }
        }
    }

    #[test]
    fn close_reason_is_truncated_on_a_char_boundary() {
        let mut out = Vec::new();
        let reason = "é".repeat(100);
        write_close(&mut out, None, Some(1000), &reason);
        let (h, n) = FrameHeader::parse(&out).unwrap().unwrap();
        assert!(h.payload_len <= 125);
        assert!(std::str::from_utf8(&out[n + 2..]).is_ok());
    }
}
