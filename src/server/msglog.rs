//! `debug` lines for messages, one per message and connection: the peer, the direction, the
//! opcode, the size and a short preview (the first 32 characters of a text, escaped; the first
//! 16 bytes of a binary message in hex).
//!
//! Whether they are wanted is asked once, when a loop starts: with the level above `debug` a
//! message costs one test of a flag, and nothing is formatted.

use std::fmt::{self, Write as _};
use std::net::SocketAddr;

use crate::proto::frame::OpCode;

/// The log target of the lines about one peer (connects, refusals, closes): each begins with
/// the peer's address and `: ` or ` `.
pub(crate) const PEER_TARGET: &str = "wsloop::server::peer";

/// The log target of the message lines: `ADDR: in|out OPCODE SIZE B PREVIEW`.
pub(crate) const MESSAGE_TARGET: &str = "wsloop::server::message";

/// Characters of a text shown.
const TEXT_PREVIEW: usize = 32;
/// Bytes of a binary message shown.
const BINARY_PREVIEW: usize = 16;

/// Whether message lines are logged at the level set now.
pub(crate) fn wanted() -> bool {
    log::log_enabled!(target: MESSAGE_TARGET, log::Level::Debug)
}

/// Which way a message went.
#[derive(Clone, Copy)]
pub(crate) enum Dir {
    In,
    Out,
}

/// Logs the line of a message with opcode `op` and payload `payload`.
#[cold]
#[inline(never)]
pub(crate) fn message(addr: SocketAddr, dir: Dir, op: OpCode, payload: &[u8]) {
    let dir = match dir {
        Dir::In => "in",
        Dir::Out => "out",
    };
    log::debug!(
        target: MESSAGE_TARGET,
        "{addr}: {dir} {} {} B {}",
        opcode_name(op),
        payload.len(),
        Preview(op, payload)
    );
}

/// Logs the message a whole unmasked frame carries (a broadcast's shared frame).
#[cold]
#[inline(never)]
pub(crate) fn frame(addr: SocketAddr, dir: Dir, frame: &[u8]) {
    if let Ok(Some((head, at))) = crate::proto::frame::FrameHeader::parse(frame) {
        message(addr, dir, head.opcode, frame.get(at..).unwrap_or_default());
    }
}

fn opcode_name(op: OpCode) -> &'static str {
    match op {
        OpCode::Continuation => "continuation",
        OpCode::Text => "text",
        OpCode::Binary => "binary",
        OpCode::Close => "close",
        OpCode::Ping => "ping",
        OpCode::Pong => "pong",
    }
}

/// The start of a payload: a quoted, escaped text, or hex; `...` when there is more.
struct Preview<'a>(OpCode, &'a [u8]);

impl fmt::Display for Preview<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let Preview(op, payload) = *self;
        if op == OpCode::Text {
            // At most 4 bytes a character: a cut inside the last one shows as U+FFFD, never
            // among the characters shown.
            let head = &payload[..payload.len().min(4 * TEXT_PREVIEW)];
            let text = String::from_utf8_lossy(head);
            f.write_char('"')?;
            let mut shown = 0;
            for c in text.chars().take(TEXT_PREVIEW) {
                write!(f, "{}", c.escape_debug())?;
                shown += c.len_utf8();
            }
            f.write_char('"')?;
            if shown < payload.len() {
                f.write_str("...")?;
            }
        } else {
            for b in payload.iter().take(BINARY_PREVIEW) {
                write!(f, "{b:02x}")?;
            }
            if payload.len() > BINARY_PREVIEW {
                f.write_str("...")?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn previews_are_short_escaped_and_marked_when_cut() {
        let p = |op, b: &[u8]| Preview(op, b).to_string();
        assert_eq!(p(OpCode::Text, b"how are you?"), "\"how are you?\"");
        assert_eq!(p(OpCode::Text, b"a\"b\n\tc\\"), r#""a\"b\n\tc\\""#);
        let long = "é".repeat(40);
        assert_eq!(p(OpCode::Text, long.as_bytes()), format!("\"{}\"...", "é".repeat(32)));
        assert_eq!(p(OpCode::Text, b""), "\"\"");
        assert_eq!(p(OpCode::Binary, &[0, 1, 0xab]), "0001ab");
        let bytes: Vec<u8> = (0..20).collect();
        assert_eq!(p(OpCode::Binary, &bytes), "000102030405060708090a0b0c0d0e0f...");
    }
}
