//! The frame codec: `FrameHeader::parse` on arbitrary bytes, and valid headers built from them
//! round-tripping through `encode`; plus masking and UTF-8 checking done in pieces agreeing
//! with doing them at once.
#![no_main]

use arbitrary::{Arbitrary, Unstructured};
use libfuzzer_sys::fuzz_target;
use wsloop::proto::frame::{write_frame, FrameHeader, OpCode, MAX_HEADER_LEN};
use wsloop::proto::mask::apply_mask;
use wsloop::proto::utf8::Utf8Validator;

/// A header that is valid by construction.
#[derive(Arbitrary, Debug)]
struct Valid {
    fin: bool,
    opcode: u8,
    mask: Option<[u8; 4]>,
    len: u64,
    /// Which length encoding: 7-bit, 16-bit or 64-bit.
    width: u8,
}

impl Valid {
    fn header(&self) -> FrameHeader {
        const OPS: [OpCode; 6] = [
            OpCode::Continuation,
            OpCode::Text,
            OpCode::Binary,
            OpCode::Close,
            OpCode::Ping,
            OpCode::Pong,
        ];
        let opcode = OPS[usize::from(self.opcode) % OPS.len()];
        let payload_len = if opcode.is_control() {
            self.len % 126
        } else {
            match self.width % 3 {
                0 => self.len % 126,
                1 => 126 + self.len % (65_536 - 126),
                _ => 65_536 + self.len % ((1 << 63) - 65_536),
            }
        };
        FrameHeader {
            fin: self.fin || opcode.is_control(),
            // Built without the `deflate` feature, the parser refuses RSV1.
            rsv1: false,
            opcode,
            mask: self.mask,
            payload_len,
        }
    }
}

fn check_parse(data: &[u8]) {
    match FrameHeader::parse(data) {
        Ok(Some((h, n))) => {
            let ext = match data[1] & 0x7f {
                126 => 2,
                127 => 8,
                _ => 0,
            };
            assert_eq!(n, 2 + ext + if h.mask.is_some() { 4 } else { 0 });
            assert!(n <= data.len());
            assert!(!h.opcode.is_control() || (h.fin && h.payload_len <= 125));
            assert_eq!(h.payload_len >> 63, 0);
            // Encoded again it parses the same, in the same bytes when the length used its
            // shortest form.
            let mut buf = [0u8; MAX_HEADER_LEN];
            let m = h.encode(&mut buf);
            assert_eq!(FrameHeader::parse(&buf[..m]), Ok(Some((h, m))));
            assert!(m <= n);
            if m == n {
                assert_eq!(buf[..m], data[..n]);
            }
            for k in 0..n {
                assert_eq!(FrameHeader::parse(&data[..k]), Ok(None), "prefix of {k}");
            }
        }
        Ok(None) => assert!(data.len() < MAX_HEADER_LEN),
        Err(e) => {
            // Decided on what came so far: a prefix is incomplete or refused the same way.
            for k in 0..data.len().min(MAX_HEADER_LEN) {
                match FrameHeader::parse(&data[..k]) {
                    Ok(None) => {}
                    Err(e2) => assert_eq!(e2, e),
                    Ok(Some(h)) => panic!("prefix of {k} parsed as {h:?}, whole refused {e:?}"),
                }
            }
        }
    }
}

fuzz_target!(|data: &[u8]| {
    check_parse(data);
    let mut u = Unstructured::new(data);
    let Ok(valid) = Valid::arbitrary(&mut u) else { return };
    let h = valid.header();
    let mut buf = [0u8; MAX_HEADER_LEN];
    let m = h.encode(&mut buf);
    assert_eq!(FrameHeader::parse(&buf[..m]), Ok(Some((h, m))));
    for k in 0..m {
        assert_eq!(FrameHeader::parse(&buf[..k]), Ok(None), "prefix of {k} of {h:?}");
    }
    check_parse(&buf[..m]);
    // A whole frame of what is left: parses back to its payload.
    let payload = u.take_rest();
    let cut = if payload.is_empty() {
        0
    } else {
        usize::from(valid.width) % payload.len()
    };
    let opcode = if h.opcode.is_control() {
        OpCode::Binary
    } else {
        h.opcode
    };
    let mut frame = Vec::new();
    write_frame(&mut frame, h.fin, opcode, h.mask, payload);
    let (got, n) = FrameHeader::parse(&frame).unwrap().unwrap();
    assert_eq!(
        (got.fin, got.opcode, got.mask, got.payload_len),
        (h.fin, opcode, h.mask, payload.len() as u64)
    );
    let body = &mut frame[n..];
    // Unmasking in two pieces equals unmasking at once.
    if let Some(key) = h.mask {
        let (a, b) = body.split_at_mut(cut);
        apply_mask(a, key, 0);
        apply_mask(b, key, cut);
    }
    assert_eq!(&frame[n..], payload);
    // UTF-8 checked in two pieces agrees with the standard library.
    let mut v = Utf8Validator::new();
    let pieces = v
        .feed(&payload[..cut])
        .and_then(|()| v.feed(&payload[cut..]))
        .and_then(|()| v.finish());
    assert_eq!(pieces.is_ok(), core::str::from_utf8(payload).is_ok());
});
