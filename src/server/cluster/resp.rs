//! RESP2, the Redis protocol, as far as the bus needs it: commands out (arrays of bulk
//! strings) and a bounded decoder for replies and pub/sub messages.
//!
//! The decoder reads a value from the start of a byte buffer, borrowing its strings from it,
//! and answers [`Decoded::Partial`] until the whole value is there. Every length is checked
//! against [`Limits`] before anything waits for it, so a server cannot make the reader hold
//! more than one value's worth of bytes.

use std::fmt;

/// The longest line (simple string, error, or a length header) accepted.
pub(crate) const MAX_LINE: usize = 64 << 10;
/// The most elements an array may have (a pub/sub message has 3).
pub(crate) const MAX_ARRAY: usize = 16;
/// How deep arrays may nest (an array of arrays, no deeper).
pub(crate) const MAX_DEPTH: usize = 2;
/// The longest length or integer header: a sign and 19 digits.
const MAX_NUMBER: usize = 20;

/// What the decoder accepts.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Limits {
    /// The longest bulk string.
    pub(crate) bulk: usize,
    /// The most bytes one value may take on the wire, nested elements included.
    pub(crate) total: usize,
}

impl Limits {
    /// The limits for messages of up to `max_message` bytes: a bulk may hold such a message
    /// with up to 64 KiB of envelope and channel name around it.
    pub(crate) fn for_messages(max_message: usize) -> Limits {
        let bulk = max_message.saturating_add(MAX_LINE);
        Limits {
            bulk,
            total: bulk.saturating_add(MAX_LINE),
        }
    }
}

/// One decoded value; strings borrow from the buffer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Value<'a> {
    /// `+OK`
    Simple(&'a [u8]),
    /// `-ERR ...`
    Error(&'a [u8]),
    /// `:42`
    Int(i64),
    /// `$5 hello`, or `$-1` (none).
    Bulk(Option<&'a [u8]>),
    /// `*3 ...`, or `*-1` (none).
    Array(Option<Vec<Value<'a>>>),
}

/// The result of one decoding attempt.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Decoded<'a> {
    /// More bytes are needed; nothing is wrong so far.
    Partial,
    /// A whole value and the bytes it took.
    Value(Value<'a>, usize),
}

/// Why the bytes are not a valid (or acceptable) RESP2 value: one line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct RespError(pub(crate) String);

impl fmt::Display for RespError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for RespError {}

fn err(args: fmt::Arguments<'_>) -> RespError {
    RespError(args.to_string())
}

/// A byte as a reader would want to see it in an error: `'H'`, or `0x00`.
struct Shown(u8);

impl fmt::Display for Shown {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_ascii_graphic() || self.0 == b' ' {
            write!(f, "'{}'", self.0 as char)
        } else {
            write!(f, "0x{:02x}", self.0)
        }
    }
}

/// Decodes one value from the start of `buf`.
pub(crate) fn decode<'a>(buf: &'a [u8], limits: &Limits) -> Result<Decoded<'a>, RespError> {
    let mut p = Parser { buf, pos: 0, limits };
    match p.value(0)? {
        Some(v) => Ok(Decoded::Value(v, p.pos)),
        None => Ok(Decoded::Partial),
    }
}

struct Parser<'a, 'l> {
    buf: &'a [u8],
    pos: usize,
    limits: &'l Limits,
}

impl<'a> Parser<'a, '_> {
    /// A line from `pos` up to CRLF (not included), at most `max` bytes; `None`: not all here.
    fn line(&mut self, max: usize, what: &str) -> Result<Option<&'a [u8]>, RespError> {
        let rest = &self.buf[self.pos..];
        let window = &rest[..rest.len().min(max.saturating_add(2))];
        match window.windows(2).position(|w| w == b"\r\n") {
            Some(n) => {
                self.pos += n + 2;
                self.check_total()?;
                Ok(Some(&rest[..n]))
            }
            None if window.len() >= max.saturating_add(2) => {
                Err(err(format_args!("{what} longer than {max} bytes without CRLF")))
            }
            None => Ok(None),
        }
    }

    /// The bytes taken so far stay within the limit for one value.
    fn check_total(&self) -> Result<(), RespError> {
        if self.pos > self.limits.total {
            return Err(err(format_args!("reply over the limit of {} bytes", self.limits.total)));
        }
        Ok(())
    }

    /// A decimal number line (`:`, `$` and `*` headers).
    fn number(&mut self, what: &str) -> Result<Option<i64>, RespError> {
        let Some(line) = self.line(MAX_NUMBER, what)? else {
            return Ok(None);
        };
        let text = std::str::from_utf8(line).ok();
        match text.and_then(|t| t.parse::<i64>().ok()) {
            Some(n) if !line.starts_with(b"+") => Ok(Some(n)),
            _ => Err(err(format_args!(
                "{what} is not a number: {:?}",
                String::from_utf8_lossy(line)
            ))),
        }
    }

    fn value(&mut self, depth: usize) -> Result<Option<Value<'a>>, RespError> {
        let Some(&first) = self.buf.get(self.pos) else {
            return Ok(None);
        };
        self.pos += 1;
        match first {
            b'+' => Ok(self.line(MAX_LINE, "status line")?.map(Value::Simple)),
            b'-' => Ok(self.line(MAX_LINE, "error line")?.map(Value::Error)),
            b':' => Ok(self.number("integer")?.map(Value::Int)),
            b'$' => {
                let Some(n) = self.number("bulk length")? else {
                    return Ok(None);
                };
                if n == -1 {
                    return Ok(Some(Value::Bulk(None)));
                }
                if n < 0 {
                    return Err(err(format_args!("negative bulk length {n}")));
                }
                let len = usize::try_from(n).ok().filter(|&l| l <= self.limits.bulk);
                let Some(len) = len else {
                    return Err(err(format_args!("bulk length {n} over the limit")));
                };
                // Checked against the whole value's limit before waiting for the bytes.
                let end = self.pos.checked_add(len).and_then(|e| e.checked_add(2));
                let end = match end {
                    Some(e) if e <= self.limits.total => e,
                    _ => return Err(err(format_args!("reply over the limit of {} bytes", self.limits.total))),
                };
                if self.buf.len() < end {
                    return Ok(None);
                }
                if &self.buf[end - 2..end] != b"\r\n" {
                    return Err(err(format_args!("bulk string of {len} bytes not followed by CRLF")));
                }
                let data = &self.buf[self.pos..end - 2];
                self.pos = end;
                Ok(Some(Value::Bulk(Some(data))))
            }
            b'*' => {
                let Some(n) = self.number("array length")? else {
                    return Ok(None);
                };
                if n == -1 {
                    return Ok(Some(Value::Array(None)));
                }
                if n < 0 {
                    return Err(err(format_args!("negative array length {n}")));
                }
                if n > MAX_ARRAY as i64 {
                    return Err(err(format_args!("array of {n} elements over the limit of {MAX_ARRAY}")));
                }
                if depth + 1 > MAX_DEPTH {
                    return Err(err(format_args!("arrays nested deeper than {MAX_DEPTH}")));
                }
                let mut items = Vec::with_capacity(n as usize);
                for _ in 0..n {
                    match self.value(depth + 1)? {
                        Some(v) => items.push(v),
                        None => return Ok(None),
                    }
                }
                Ok(Some(Value::Array(Some(items))))
            }
            other if depth == 0 => Err(err(format_args!(
                "not a Redis server: the reply starts with {}",
                Shown(other)
            ))),
            other => Err(err(format_args!(
                "not RESP: an array element starts with {}",
                Shown(other)
            ))),
        }
    }
}

/// The bytes a bulk string of `n` bytes takes on the wire.
pub(crate) fn bulk_len(n: usize) -> usize {
    1 + digits(n) + 2 + n + 2
}

fn digits(mut n: usize) -> usize {
    let mut d = 1;
    while n >= 10 {
        n /= 10;
        d += 1;
    }
    d
}

/// Appends an array header for a command of `n` arguments.
pub(crate) fn array_header(out: &mut Vec<u8>, n: usize) {
    out.push(b'*');
    push_number(out, n);
    out.extend_from_slice(b"\r\n");
}

/// Appends one bulk-string argument made of `parts` in order.
pub(crate) fn arg(out: &mut Vec<u8>, parts: &[&[u8]]) {
    let len = parts.iter().map(|p| p.len()).sum();
    out.push(b'$');
    push_number(out, len);
    out.extend_from_slice(b"\r\n");
    for p in parts {
        out.extend_from_slice(p);
    }
    out.extend_from_slice(b"\r\n");
}

/// Appends a command: an array of bulk strings.
pub(crate) fn command(out: &mut Vec<u8>, args: &[&[u8]]) {
    array_header(out, args.len());
    for a in args {
        arg(out, &[a]);
    }
}

fn push_number(out: &mut Vec<u8>, n: usize) {
    let mut tmp = [0u8; 20];
    let mut i = tmp.len();
    let mut n = n;
    loop {
        i -= 1;
        tmp[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&tmp[i..]);
}

#[cfg(test)]
mod tests {
    use super::*;

    const L: Limits = Limits {
        bulk: 1000,
        total: 2000,
    };

    fn one(bytes: &[u8]) -> Value<'_> {
        match decode(bytes, &L) {
            Ok(Decoded::Value(v, used)) => {
                assert_eq!(used, bytes.len(), "{:?}", String::from_utf8_lossy(bytes));
                v
            }
            r => panic!("{:?}: {r:?}", String::from_utf8_lossy(bytes)),
        }
    }

    fn error(bytes: &[u8]) -> String {
        match decode(bytes, &L) {
            Err(e) => e.0,
            r => panic!("{:?}: expected an error, got {r:?}", String::from_utf8_lossy(bytes)),
        }
    }

    #[test]
    fn commands_are_arrays_of_bulk_strings() {
        let mut out = Vec::new();
        command(&mut out, &[b"PUBLISH", b"wsloop:all", b""]);
        assert_eq!(out, b"*3\r\n$7\r\nPUBLISH\r\n$10\r\nwsloop:all\r\n$0\r\n\r\n");
        let mut out = Vec::new();
        arg(&mut out, &[b"ab", b"", b"cde"]);
        assert_eq!(out, b"$5\r\nabcde\r\n");
        for n in [0, 9, 10, 99, 100, 12345, usize::MAX / 2] {
            let mut out = Vec::new();
            push_number(&mut out, n);
            assert_eq!(out, n.to_string().as_bytes());
        }
        assert_eq!(bulk_len(10), b"$10\r\n0123456789\r\n".len());
        assert_eq!(bulk_len(0), b"$0\r\n\r\n".len());
    }

    #[test]
    fn every_kind_of_value_decodes() {
        assert_eq!(one(b"+OK\r\n"), Value::Simple(b"OK"));
        assert_eq!(one(b"-ERR wrong\r\n"), Value::Error(b"ERR wrong"));
        assert_eq!(one(b":-42\r\n"), Value::Int(-42));
        assert_eq!(one(b"$5\r\nhe\r\no\r\n"), Value::Bulk(Some(b"he\r\no")));
        assert_eq!(one(b"$0\r\n\r\n"), Value::Bulk(Some(b"")));
        assert_eq!(one(b"$-1\r\n"), Value::Bulk(None));
        assert_eq!(one(b"*-1\r\n"), Value::Array(None));
        assert_eq!(one(b"*0\r\n"), Value::Array(Some(vec![])));
        assert_eq!(
            one(b"*3\r\n$7\r\nmessage\r\n$3\r\nc:1\r\n$2\r\nhi\r\n"),
            Value::Array(Some(vec![
                Value::Bulk(Some(b"message")),
                Value::Bulk(Some(b"c:1")),
                Value::Bulk(Some(b"hi"))
            ]))
        );
        assert_eq!(
            one(b"*2\r\n*1\r\n:1\r\n+x\r\n"),
            Value::Array(Some(vec![Value::Array(Some(vec![Value::Int(1)])), Value::Simple(b"x")]))
        );
    }

    #[test]
    fn a_value_split_at_every_byte_is_partial_until_whole() {
        let msg = b"*3\r\n$7\r\nmessage\r\n$10\r\nwsloop:all\r\n$12\r\nWSL1\x01\x01\0\0\r\n\0\0\r\n";
        let whole = one(msg);
        for cut in 0..msg.len() {
            assert_eq!(decode(&msg[..cut], &L), Ok(Decoded::Partial), "cut at {cut}");
        }
        // Two values back to back: the first is taken, the rest left for the next call.
        let mut two = msg.to_vec();
        two.extend_from_slice(b":7\r\n");
        match decode(&two, &L).unwrap() {
            Decoded::Value(v, used) => {
                assert_eq!((v, used), (whole, msg.len()));
                assert_eq!(decode(&two[used..], &L), Ok(Decoded::Value(Value::Int(7), 4)));
            }
            Decoded::Partial => panic!("partial"),
        }
    }

    #[test]
    fn lengths_past_the_limits_are_refused_before_waiting_for_them() {
        assert_eq!(
            error(b"$9223372036854775807\r\n"),
            "bulk length 9223372036854775807 over the limit"
        );
        assert_eq!(error(b"$9999999999999\r\n"), "bulk length 9999999999999 over the limit");
        assert_eq!(error(b"$1001\r\n"), "bulk length 1001 over the limit");
        assert!(error(b"$99999999999999999999999\r\n").starts_with("bulk length longer than 20 bytes"));
        assert_eq!(error(b"*17\r\n"), "array of 17 elements over the limit of 16");
        assert_eq!(error(b"*1\r\n*1\r\n*1\r\n:1\r\n"), "arrays nested deeper than 2");
        // Two bulks within the bulk limit but together over the total.
        assert_eq!(
            error(
                b"*2\r\n$1000\r\n"
                    .iter()
                    .chain(&[b'x'; 1000])
                    .chain(b"\r\n$1000\r\n")
                    .copied()
                    .collect::<Vec<_>>()
                    .as_slice()
            ),
            "reply over the limit of 2000 bytes"
        );
        // A 1000-byte bulk within the limits is waited for.
        assert_eq!(decode(b"$1000\r\nabc", &L), Ok(Decoded::Partial));
    }

    #[test]
    fn negative_lengths_other_than_none_are_errors() {
        assert_eq!(error(b"$-2\r\n"), "negative bulk length -2");
        assert_eq!(error(b"*-5\r\n"), "negative array length -5");
        assert_eq!(
            error(b"$-9223372036854775808\r\n"),
            "negative bulk length -9223372036854775808"
        );
    }

    #[test]
    fn garbage_is_named() {
        assert_eq!(
            error(b"HTTP/1.1 400 Bad Request\r\n"),
            "not a Redis server: the reply starts with 'H'"
        );
        assert_eq!(error(b"\0\x01"), "not a Redis server: the reply starts with 0x00");
        assert_eq!(error(b"*1\r\n!x\r\n"), "not RESP: an array element starts with '!'");
        assert!(error(b":12a\r\n").starts_with("integer is not a number"));
        assert!(error(b"$+3\r\nabc\r\n").starts_with("bulk length is not a number"));
        assert!(error(b"$ 3\r\nabc\r\n").starts_with("bulk length is not a number"));
        assert_eq!(error(b"$3\r\nabcd\r\n"), "bulk string of 3 bytes not followed by CRLF");
        // A header line never ends: refused after its longest possible length.
        assert!(error(&[b'$'; 40]).starts_with("bulk length longer than 20 bytes"));
        assert_eq!(decode(b"$123", &L), Ok(Decoded::Partial));
    }

    #[test]
    fn a_line_without_end_is_refused_at_its_limit() {
        let limits = Limits::for_messages(1 << 20);
        let mut line = vec![b'+'];
        line.extend(std::iter::repeat_n(b'a', MAX_LINE));
        assert_eq!(decode(&line, &limits), Ok(Decoded::Partial));
        line.extend_from_slice(b"aa");
        assert_eq!(
            decode(&line, &limits).unwrap_err().0,
            format!("status line longer than {MAX_LINE} bytes without CRLF")
        );
    }

    proptest::proptest! {
        #[test]
        fn the_decoder_never_panics(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..256)) {
            let _ = decode(&bytes, &L);
        }

        #[test]
        fn the_decoder_never_panics_on_resp_like_input(
            parts in proptest::collection::vec(
                proptest::prop_oneof![
                    proptest::strategy::Just(b"*".to_vec()), proptest::strategy::Just(b"$".to_vec()),
                    proptest::strategy::Just(b"\r\n".to_vec()), proptest::strategy::Just(b":".to_vec()),
                    proptest::strategy::Just(b"-1".to_vec()), proptest::strategy::Just(b"+".to_vec()),
                    proptest::strategy::Just(b"3".to_vec()), proptest::strategy::Just(b"16".to_vec()),
                    proptest::strategy::Just(b"99999999999999999999".to_vec()),
                    proptest::collection::vec(proptest::prelude::any::<u8>(), 0..4),
                ],
                0..40,
            )
        ) {
            let bytes: Vec<u8> = parts.concat();
            if let Ok(Decoded::Value(_, used)) = decode(&bytes, &L) {
                proptest::prop_assert!(used <= bytes.len());
            }
        }
    }
}
