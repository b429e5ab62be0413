//! The envelope every instance publishes: a fixed 38-byte header, big-endian, then the payload.
//!
//! ```text
//!   0..4   magic b"WSL1"
//!   4      kind: 1 broadcast, 2 publish, 3 send-to-one, 4 heartbeat, 5 leave
//!   5      opcode: 1 text, 2 binary (0 for heartbeat and leave)
//!   6..14  origin instance u64
//!   14..22 seq u64: the origin's count of envelopes on P:all (0 elsewhere)
//!   22..38 except (kinds 1, 2) or target (kind 3) connection, u128; 0 = none
//!   38..   the message (kinds 1-3); heartbeat: open connections u64; leave: nothing
//! ```

use std::fmt;

use crate::proto::frame::OpCode;

/// The first four bytes of every envelope.
pub(crate) const MAGIC: [u8; 4] = *b"WSL1";
/// The header's length.
pub(crate) const HEADER: usize = 38;

/// What an envelope is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Kind {
    /// For every connection (channel P:all).
    Broadcast = 1,
    /// For a topic's subscribers (P:t:topic).
    Publish = 2,
    /// For one connection (P:i:instance).
    SendToOne = 3,
    /// An instance's open connections (P:hb).
    Heartbeat = 4,
    /// An instance stopping (P:hb).
    Leave = 5,
}

/// A decoded envelope; the payload borrows from the received bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Envelope<'a> {
    pub(crate) kind: Kind,
    /// Text or Binary for kinds 1-3; `None` for heartbeat and leave.
    pub(crate) op: Option<OpCode>,
    pub(crate) origin: u64,
    pub(crate) seq: u64,
    /// The connection left out (kinds 1, 2) or aimed at (kind 3); 0 = none.
    pub(crate) conn: u128,
    pub(crate) payload: &'a [u8],
}

impl Envelope<'_> {
    /// A heartbeat's count of open connections.
    pub(crate) fn open(&self) -> u64 {
        match self.payload.try_into() {
            Ok(b) => u64::from_be_bytes(b),
            Err(_) => 0,
        }
    }
}

/// Why an envelope was refused.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct WireError(pub(crate) &'static str);

impl fmt::Display for WireError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.0)
    }
}

/// The header of an envelope.
pub(crate) fn header(kind: Kind, op: Option<OpCode>, origin: u64, seq: u64, conn: u128) -> [u8; HEADER] {
    let mut h = [0u8; HEADER];
    h[..4].copy_from_slice(&MAGIC);
    h[4] = kind as u8;
    h[5] = match op {
        Some(OpCode::Text) => 1,
        Some(OpCode::Binary) => 2,
        _ => 0,
    };
    h[6..14].copy_from_slice(&origin.to_be_bytes());
    h[14..22].copy_from_slice(&seq.to_be_bytes());
    h[22..38].copy_from_slice(&conn.to_be_bytes());
    h
}

/// A whole envelope (tests and heartbeats; messages are written header then payload).
pub(crate) fn encode(kind: Kind, op: Option<OpCode>, origin: u64, seq: u64, conn: u128, payload: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(HEADER + payload.len());
    v.extend_from_slice(&header(kind, op, origin, seq, conn));
    v.extend_from_slice(payload);
    v
}

/// Decodes and checks an envelope: magic, kind, opcode for the kind, payload length for
/// heartbeat and leave, at most `max_message` bytes of message, UTF-8 for text.
pub(crate) fn decode(bytes: &[u8], max_message: usize) -> Result<Envelope<'_>, WireError> {
    if bytes.len() < HEADER {
        return Err(WireError("envelope shorter than its header"));
    }
    if bytes[..4] != MAGIC {
        return Err(WireError("envelope without the WSL1 magic"));
    }
    let kind = match bytes[4] {
        1 => Kind::Broadcast,
        2 => Kind::Publish,
        3 => Kind::SendToOne,
        4 => Kind::Heartbeat,
        5 => Kind::Leave,
        _ => return Err(WireError("envelope of an unknown kind")),
    };
    let message = matches!(kind, Kind::Broadcast | Kind::Publish | Kind::SendToOne);
    let op = match (bytes[5], message) {
        (1, true) => Some(OpCode::Text),
        (2, true) => Some(OpCode::Binary),
        (0, false) => None,
        _ => return Err(WireError("envelope with an opcode wrong for its kind")),
    };
    let word = |r: std::ops::Range<usize>| {
        let mut b = [0u8; 8];
        b.copy_from_slice(&bytes[r]);
        u64::from_be_bytes(b)
    };
    let origin = word(6..14);
    let seq = word(14..22);
    let mut c = [0u8; 16];
    c.copy_from_slice(&bytes[22..38]);
    let conn = u128::from_be_bytes(c);
    let payload = &bytes[HEADER..];
    if origin == 0 {
        return Err(WireError("envelope from instance 0"));
    }
    match kind {
        Kind::Heartbeat if payload.len() != 8 => return Err(WireError("heartbeat not 8 bytes of payload")),
        Kind::Leave if !payload.is_empty() => return Err(WireError("leave notice with a payload")),
        Kind::SendToOne if conn == 0 => return Err(WireError("message for one connection without a target")),
        _ if payload.len() > max_message => return Err(WireError("message over the size limit")),
        _ => {}
    }
    if op == Some(OpCode::Text) && std::str::from_utf8(payload).is_err() {
        return Err(WireError("text message not valid UTF-8"));
    }
    Ok(Envelope {
        kind,
        op,
        origin,
        seq,
        conn,
        payload,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_header_is_laid_out_as_documented() {
        let e = encode(
            Kind::SendToOne,
            Some(OpCode::Binary),
            0x0102030405060708,
            0,
            0xAB << 64 | 7,
            b"\xff\x00",
        );
        assert_eq!(&e[..4], b"WSL1");
        assert_eq!((e[4], e[5]), (3, 2));
        assert_eq!(&e[6..14], &[1, 2, 3, 4, 5, 6, 7, 8]);
        assert_eq!(&e[14..22], &[0; 8]);
        assert_eq!(&e[22..30], &[0, 0, 0, 0, 0, 0, 0, 0xAB]);
        assert_eq!(&e[30..38], &[0, 0, 0, 0, 0, 0, 0, 7]);
        assert_eq!(&e[38..], b"\xff\x00");
        let d = decode(&e, 10).unwrap();
        assert_eq!(
            d,
            Envelope {
                kind: Kind::SendToOne,
                op: Some(OpCode::Binary),
                origin: 0x0102030405060708,
                seq: 0,
                conn: 0xAB << 64 | 7,
                payload: b"\xff\x00"
            }
        );
    }

    #[test]
    fn every_kind_round_trips() {
        let b = encode(Kind::Broadcast, Some(OpCode::Text), 9, 41, 5, "héllo".as_bytes());
        let d = decode(&b, 100).unwrap();
        assert_eq!(
            (d.kind, d.op, d.origin, d.seq, d.conn, d.payload),
            (Kind::Broadcast, Some(OpCode::Text), 9, 41, 5, "héllo".as_bytes())
        );
        let p = encode(Kind::Publish, Some(OpCode::Binary), 9, 0, 0, b"");
        assert_eq!(decode(&p, 100).unwrap().kind, Kind::Publish);
        let h = encode(Kind::Heartbeat, None, 9, 0, 0, &1234u64.to_be_bytes());
        let d = decode(&h, 100).unwrap();
        assert_eq!((d.kind, d.op, d.open()), (Kind::Heartbeat, None, 1234));
        let l = encode(Kind::Leave, None, 9, 0, 0, b"");
        assert_eq!(decode(&l, 100).unwrap().kind, Kind::Leave);
    }

    #[test]
    fn malformed_envelopes_are_refused() {
        let good = encode(Kind::Broadcast, Some(OpCode::Text), 9, 1, 0, b"hi");
        let bad = |f: &dyn Fn(&mut Vec<u8>)| {
            let mut b = good.clone();
            f(&mut b);
            decode(&b, 100).unwrap_err().0
        };
        assert_eq!(bad(&|b| b.truncate(37)), "envelope shorter than its header");
        assert_eq!(bad(&|b| b[3] = b'2'), "envelope without the WSL1 magic");
        assert_eq!(bad(&|b| b[4] = 6), "envelope of an unknown kind");
        assert_eq!(bad(&|b| b[4] = 0), "envelope of an unknown kind");
        assert_eq!(bad(&|b| b[5] = 0), "envelope with an opcode wrong for its kind");
        assert_eq!(bad(&|b| b[5] = 9), "envelope with an opcode wrong for its kind");
        assert_eq!(bad(&|b| b.extend_from_slice(&[0xc3])), "text message not valid UTF-8");
        assert_eq!(bad(&|b| b[6..14].fill(0)), "envelope from instance 0");
        assert_eq!(bad(&|b| b.resize(38 + 101, b'a')), "message over the size limit");
        assert_eq!(bad(&|b| b[4] = 3), "message for one connection without a target");
        assert_eq!(bad(&|b| b[4] = 4), "envelope with an opcode wrong for its kind");
        assert_eq!(
            bad(&|b| {
                b[4] = 4;
                b[5] = 0
            }),
            "heartbeat not 8 bytes of payload"
        );
        assert_eq!(
            bad(&|b| {
                b[4] = 5;
                b[5] = 0
            }),
            "leave notice with a payload"
        );
        // Binary needs no UTF-8.
        let bin = encode(Kind::Broadcast, Some(OpCode::Binary), 9, 1, 0, &[0xc3]);
        assert!(decode(&bin, 100).is_ok());
    }

    proptest::proptest! {
        #[test]
        fn decoding_never_panics(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..80)) {
            let _ = decode(&bytes, 64);
        }
    }
}
