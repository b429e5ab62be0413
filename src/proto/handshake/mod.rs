//! The opening handshake (RFC 6455 §4), both sides, as pure functions over bytes.
//!
//! - [`request`]: the server reads a [`Request`] and answers it ([`Answer`]).
//! - [`response`]: the client writes its request ([`ClientRequest`]) and checks the
//!   [`Response`].
//!
//! [`Connection`](super::Connection) runs these for you; they are public for tests and for
//! drivers that want to do the handshake themselves.

use alloc::borrow::Cow;
use alloc::string::String;
use alloc::vec::Vec;

mod key;
pub mod request;
pub mod response;

pub use request::{parse_request, Answer, Reject, Request};
pub use response::{parse_response, ClientRequest, ClientRequestError, Response, ResponseError};

/// The GUID that RFC 6455 appends to the key before hashing.
const GUID: &str = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11";

/// Headers read per request or response; more is answered with `431`.
pub const MAX_HEADERS: usize = 64;

/// `Sec-WebSocket-Accept` for a `Sec-WebSocket-Key` (RFC 6455 §4.2.2, step 5.4).
pub fn accept_key(key: &[u8]) -> String {
    ascii_string(&accept_key_bytes(key))
}

/// [`accept_key`] without the allocation.
pub(crate) fn accept_key_bytes(key: &[u8]) -> [u8; 28] {
    let mut out = [0u8; 28];
    key::base64_encode(&key::sha1(key, GUID.as_bytes()), &mut out);
    out
}

/// A `Sec-WebSocket-Key`: 16 random bytes, base64-encoded.
pub fn client_key(nonce: [u8; 16]) -> String {
    let mut out = [0u8; 24];
    key::base64_encode(&nonce, &mut out);
    ascii_string(&out)
}

/// Whether `key` is a well-formed `Sec-WebSocket-Key`: base64 of 16 bytes.
pub(crate) fn is_valid_key(key: &[u8]) -> bool {
    key::is_base64_of_16_bytes(key)
}

/// A `String` of ASCII bytes (base64 output).
fn ascii_string(bytes: &[u8]) -> String {
    bytes.iter().map(|&b| char::from(b)).collect()
}

/// The reason phrase for `status`: the one the IANA HTTP Status Code Registry gives it (with
/// `418 I'm a teapot`, which RFC 9110 keeps unassigned but every client knows), or for a code it
/// does not list, its class: `Informational`, `Success`, `Redirection`, `Client Error`,
/// `Server Error` (and `Unknown` outside 100 to 599).
pub fn reason_phrase(status: u16) -> &'static str {
    match status {
        100 => "Continue",
        101 => "Switching Protocols",
        102 => "Processing",
        103 => "Early Hints",
        200 => "OK",
        201 => "Created",
        202 => "Accepted",
        203 => "Non-Authoritative Information",
        204 => "No Content",
        205 => "Reset Content",
        206 => "Partial Content",
        207 => "Multi-Status",
        208 => "Already Reported",
        226 => "IM Used",
        300 => "Multiple Choices",
        301 => "Moved Permanently",
        302 => "Found",
        303 => "See Other",
        304 => "Not Modified",
        305 => "Use Proxy",
        307 => "Temporary Redirect",
        308 => "Permanent Redirect",
        400 => "Bad Request",
        401 => "Unauthorized",
        402 => "Payment Required",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        406 => "Not Acceptable",
        407 => "Proxy Authentication Required",
        408 => "Request Timeout",
        409 => "Conflict",
        410 => "Gone",
        411 => "Length Required",
        412 => "Precondition Failed",
        413 => "Content Too Large",
        414 => "URI Too Long",
        415 => "Unsupported Media Type",
        416 => "Range Not Satisfiable",
        417 => "Expectation Failed",
        418 => "I'm a teapot",
        421 => "Misdirected Request",
        422 => "Unprocessable Content",
        423 => "Locked",
        424 => "Failed Dependency",
        425 => "Too Early",
        426 => "Upgrade Required",
        428 => "Precondition Required",
        429 => "Too Many Requests",
        431 => "Request Header Fields Too Large",
        451 => "Unavailable For Legal Reasons",
        500 => "Internal Server Error",
        501 => "Not Implemented",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        505 => "HTTP Version Not Supported",
        506 => "Variant Also Negotiates",
        507 => "Insufficient Storage",
        508 => "Loop Detected",
        510 => "Not Extended",
        511 => "Network Authentication Required",
        _ => class_phrase(status),
    }
}

/// The reason phrase of the refusals the protocol core writes by itself (the request checks of
/// [`parse_request`]): a short table, so that a firmware image that never sends another status
/// does not carry [`reason_phrase`]'s.
pub(crate) fn core_reason_phrase(status: u16) -> &'static str {
    match status {
        400 => "Bad Request",
        405 => "Method Not Allowed",
        426 => "Upgrade Required",
        431 => "Request Header Fields Too Large",
        505 => "HTTP Version Not Supported",
        // Not reached: the core refuses with the statuses above.
        500.. => "Server Error",
        _ => "Client Error",
    }
}

/// The phrase of a status's class, for a code the registry does not list.
fn class_phrase(status: u16) -> &'static str {
    match status / 100 {
        1 => "Informational",
        2 => "Success",
        3 => "Redirection",
        4 => "Client Error",
        5 => "Server Error",
        _ => "Unknown",
    }
}

/// Why a response header was refused (see [`Headers::add`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum HeaderError {
    /// The name is not an HTTP token (RFC 9110 §5.6.2): it is empty, or holds a space, a colon,
    /// CR, LF or another separator or control character.
    InvalidName,
    /// The value holds CR, LF, NUL or another control character (only horizontal tab is
    /// allowed): written as is, it would end the header early and let the rest be read as
    /// headers or a body of the peer's choosing.
    InvalidValue,
    /// The protocol writes this header itself: `Connection`, `Content-Length`, `Content-Type`
    /// (see [`Answer::respond`]), `Transfer-Encoding`, `Upgrade`, and the `Sec-WebSocket-Accept`,
    /// `-Protocol` and `-Extensions` of an upgrade (the subprotocol is chosen with
    /// [`Answer::accept_protocol`] or the server's `Upgrade::set_protocol`), and the
    /// `Sec-WebSocket-Version` a `426` names.
    Reserved,
}

impl core::fmt::Display for HeaderError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(match self {
            HeaderError::InvalidName => "a response header name must be an HTTP token",
            HeaderError::InvalidValue => "a response header value may not hold CR, LF or other control characters",
            HeaderError::Reserved => "this response header is written by the protocol itself",
        })
    }
}

impl core::error::Error for HeaderError {}

/// Headers the protocol writes itself, which [`Headers::add`] refuses.
const RESERVED_HEADERS: [&str; 9] = [
    "Connection",
    "Content-Length",
    "Content-Type",
    "Transfer-Encoding",
    "Upgrade",
    "Sec-WebSocket-Accept",
    "Sec-WebSocket-Protocol",
    "Sec-WebSocket-Extensions",
    "Sec-WebSocket-Version",
];

/// Response headers an [`Answer`] carries beside the ones the protocol writes, in the order
/// they were added. Each is checked as it is added, so what is written is always one
/// well-formed header line: a name or value that would break the response is refused with a
/// [`HeaderError`] and never stored.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Headers {
    list: Vec<(Cow<'static, str>, Cow<'static, str>)>,
}

impl Headers {
    /// No headers.
    pub const fn new() -> Self {
        Headers { list: Vec::new() }
    }

    /// Adds header `name: value` (a name may be added more than once, as `Set-Cookie` is).
    /// Refused, and not added: a name that is not an HTTP token, a value with a control
    /// character other than tab (CR and LF above all), and the headers the protocol writes
    /// itself (see [`HeaderError::Reserved`]).
    pub fn add(
        &mut self,
        name: impl Into<Cow<'static, str>>,
        value: impl Into<Cow<'static, str>>,
    ) -> Result<(), HeaderError> {
        let (name, value) = (name.into(), value.into());
        check_header(&name, &value)?;
        self.list.push((name, value));
        Ok(())
    }

    /// Every header as `(name, value)`, in the order added.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> + '_ {
        self.list.iter().map(|(n, v)| (&**n, &**v))
    }

    /// The first value of header `name` (case-insensitive).
    pub fn get(&self, name: &str) -> Option<&str> {
        self.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v)
    }

    /// How many headers there are.
    pub fn len(&self) -> usize {
        self.list.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.list.is_empty()
    }

    /// Appends each header as a line break and `Name: value` (the head's last line break is
    /// its writer's). Inlined: where the headers are known to be none (a firmware's plain
    /// `Answer::accept()`) no code is left.
    #[inline(always)]
    pub(crate) fn write(&self, out: &mut Vec<u8>) {
        for (name, value) in &self.list {
            out.extend_from_slice(b"\r\n");
            out.extend_from_slice(name.as_bytes());
            out.extend_from_slice(b": ");
            out.extend_from_slice(value.as_bytes());
        }
    }
}

/// Whether `value` can be written as a header value as it is: no control character but tab.
pub(crate) fn is_field_value(value: &str) -> bool {
    !value.bytes().any(|b| (b < 0x20 && b != b'\t') || b == 0x7f)
}

/// Checks one response header (see [`Headers::add`]).
pub fn check_header(name: &str, value: &str) -> Result<(), HeaderError> {
    if !is_token(name) {
        return Err(HeaderError::InvalidName);
    }
    if !is_field_value(value) {
        return Err(HeaderError::InvalidValue);
    }
    if RESERVED_HEADERS.iter().any(|r| r.eq_ignore_ascii_case(name)) {
        return Err(HeaderError::Reserved);
    }
    Ok(())
}

/// Appends `n` in decimal (no formatting machinery: this path runs in firmware too).
pub(crate) fn push_decimal(out: &mut Vec<u8>, mut n: usize) {
    let mut digits = [0u8; 20];
    let mut i = digits.len();
    loop {
        i -= 1;
        digits[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[i..]);
}

/// Appends a complete HTTP/1.1 response that closes the connection, with `headers` after the
/// ones it writes itself. With `head_only` (an answer to `HEAD`) the body is left out but its
/// length is still announced.
pub fn write_response(
    out: &mut Vec<u8>,
    status: u16,
    content_type: &str,
    headers: &Headers,
    body: &[u8],
    head_only: bool,
) {
    write_head(out, status, reason_phrase(status), content_type, Some(body.len()), "");
    headers.write(out);
    out.extend_from_slice(END_OF_HEAD);
    if !head_only {
        out.extend_from_slice(body);
    }
}

/// What ends a head after its last header line.
pub(crate) const END_OF_HEAD: &[u8] = b"\r\n\r\n";

/// The status line and headers of a response that closes the connection, up to its last header
/// line, with `extra` (lines the protocol adds, each after a line break) last: the writer adds
/// any more, then [`END_OF_HEAD`]. `body_len` is announced as `Content-Length`, or not at all
/// for a status that has no body (`204`, `304`).
pub(crate) fn write_head(
    out: &mut Vec<u8>,
    status: u16,
    phrase: &str,
    content_type: &str,
    body_len: Option<usize>,
    extra: &str,
) {
    out.extend_from_slice(b"HTTP/1.1 ");
    push_decimal(out, usize::from(status));
    out.extend_from_slice(b" ");
    out.extend_from_slice(phrase.as_bytes());
    out.extend_from_slice(b"\r\nContent-Type: ");
    out.extend_from_slice(content_type.as_bytes());
    if let Some(len) = body_len {
        out.extend_from_slice(b"\r\nContent-Length: ");
        push_decimal(out, len);
    }
    out.extend_from_slice(b"\r\nConnection: close");
    out.extend_from_slice(extra.as_bytes());
}

/// Whether a comma-separated header value holds `token` (case-insensitive).
pub(crate) fn has_token(value: &[u8], token: &str) -> bool {
    value
        .split(|&b| b == b',')
        .any(|t| t.trim_ascii().eq_ignore_ascii_case(token.as_bytes()))
}

/// Whether a comma-separated list holds `token` exactly (subprotocol names are case-sensitive).
pub(crate) fn has_exact_token(value: &[u8], token: &str) -> bool {
    value.split(|&b| b == b',').any(|t| t.trim_ascii() == token.as_bytes())
}

/// Every value of header `name`, in order.
pub(crate) fn header_values<'h>(
    headers: &'h [httparse::Header<'h>],
    name: &'h str,
) -> impl Iterator<Item = &'h [u8]> + 'h {
    headers
        .iter()
        .filter(move |h| h.name.eq_ignore_ascii_case(name))
        .map(|h| h.value)
}

/// The single value of header `name`; `Err` when it is sent more than once.
pub(crate) fn single_header<'h>(headers: &'h [httparse::Header<'h>], name: &'h str) -> Result<Option<&'h [u8]>, ()> {
    let mut it = header_values(headers, name);
    let first = it.next();
    if it.next().is_some() {
        return Err(());
    }
    Ok(first)
}

/// Whether `s` is an HTTP token (header names, subprotocol names).
pub fn is_token(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc_sample_key() {
        assert_eq!(accept_key(b"dGhlIHNhbXBsZSBub25jZQ=="), "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=");
        assert_eq!(client_key(*b"the sample nonce"), "dGhlIHNhbXBsZSBub25jZQ==");
    }

    #[test]
    fn decimal() {
        for n in [0usize, 7, 10, 4096, usize::MAX] {
            let mut v = Vec::new();
            push_decimal(&mut v, n);
            assert_eq!(v, n.to_string().into_bytes());
        }
    }

    #[test]
    fn head_only_response_announces_the_length() {
        let mut out = Vec::new();
        write_response(&mut out, 200, "text/html", &Headers::new(), b"<p>hi</p>", true);
        let text = String::from_utf8(out).unwrap();
        assert!(text.starts_with("HTTP/1.1 200 OK\r\n"));
        assert!(text.contains("Content-Length: 9\r\n"));
        assert!(text.ends_with("\r\n\r\n"));
    }

    #[test]
    fn reason_phrases_follow_the_registry() {
        for (status, phrase) in [
            (100, "Continue"),
            (101, "Switching Protocols"),
            (200, "OK"),
            (206, "Partial Content"),
            (301, "Moved Permanently"),
            (308, "Permanent Redirect"),
            (401, "Unauthorized"),
            (413, "Content Too Large"),
            (418, "I'm a teapot"),
            (422, "Unprocessable Content"),
            (426, "Upgrade Required"),
            (431, "Request Header Fields Too Large"),
            (451, "Unavailable For Legal Reasons"),
            (503, "Service Unavailable"),
            (511, "Network Authentication Required"),
            // Codes the registry does not list are named by their class.
            (199, "Informational"),
            (299, "Success"),
            (306, "Redirection"),
            (499, "Client Error"),
            (599, "Server Error"),
            (0, "Unknown"),
            (600, "Unknown"),
        ] {
            assert_eq!(reason_phrase(status), phrase, "{status}");
        }
        // No status is called "Error", and the core's short table agrees with the full one.
        assert!((0..=u16::MAX).all(|s| reason_phrase(s) != "Error"));
        for s in [400, 405, 426, 431, 505] {
            assert_eq!(core_reason_phrase(s), reason_phrase(s));
        }
    }
}
