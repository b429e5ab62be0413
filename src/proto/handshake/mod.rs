//! The opening handshake (RFC 6455 §4), both sides, as pure functions over bytes.
//!
//! - [`request`]: the server reads a [`Request`] and answers it ([`Answer`]).
//! - [`response`]: the client writes its request ([`ClientRequest`]) and checks the
//!   [`Response`].
//!
//! [`Connection`](super::Connection) runs these for you; they are public for tests and for
//! drivers that want to do the handshake themselves.

use alloc::string::String;
use alloc::vec::Vec;

mod key;
pub mod request;
pub mod response;

pub use request::{parse_request, Answer, Reject, Request};
pub use response::{parse_response, ClientRequest, Response, ResponseError};

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

/// The reason phrase for the statuses this crate sends.
pub fn reason_phrase(status: u16) -> &'static str {
    match status {
        101 => "Switching Protocols",
        200 => "OK",
        204 => "No Content",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        426 => "Upgrade Required",
        429 => "Too Many Requests",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        503 => "Service Unavailable",
        505 => "HTTP Version Not Supported",
        _ => "Error",
    }
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

/// Appends a complete HTTP/1.1 response that closes the connection. With `head_only` (an
/// answer to `HEAD`) the body is left out but its length is still announced.
pub fn write_response(
    out: &mut Vec<u8>,
    status: u16,
    content_type: &str,
    extra_headers: &str,
    body: &[u8],
    head_only: bool,
) {
    write_head(out, status, content_type, extra_headers, body.len());
    if !head_only {
        out.extend_from_slice(body);
    }
}

/// The status line and headers of [`write_response`], for a body of `body_len` bytes.
pub(crate) fn write_head(out: &mut Vec<u8>, status: u16, content_type: &str, extra_headers: &str, body_len: usize) {
    out.extend_from_slice(b"HTTP/1.1 ");
    push_decimal(out, usize::from(status));
    out.extend_from_slice(b" ");
    out.extend_from_slice(reason_phrase(status).as_bytes());
    out.extend_from_slice(b"\r\nContent-Type: ");
    out.extend_from_slice(content_type.as_bytes());
    out.extend_from_slice(b"\r\nContent-Length: ");
    push_decimal(out, body_len);
    out.extend_from_slice(b"\r\nConnection: close\r\n");
    out.extend_from_slice(extra_headers.as_bytes());
    out.extend_from_slice(b"\r\n");
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
        write_response(&mut out, 200, "text/html", "", b"<p>hi</p>", true);
        let text = String::from_utf8(out).unwrap();
        assert!(text.starts_with("HTTP/1.1 200 OK\r\n"));
        assert!(text.contains("Content-Length: 9\r\n"));
        assert!(text.ends_with("\r\n\r\n"));
    }
}
