//! The server side of the handshake: read a request, decide, answer.
//!
//! [`parse_request`] checks what RFC 6455 §4.2.1 requires of an upgrade and turns anything
//! broken into a [`Reject`] with its HTTP status. A well-formed request becomes a [`Request`]
//! that owns a copy of its head, so the application can look at every header (cookies,
//! `Authorization`, `X-Forwarded-For`) before it gives its [`Answer`].

use alloc::borrow::Cow;
use alloc::boxed::Box;
use alloc::string::String;
use alloc::vec::Vec;

use super::{has_exact_token, has_token, header_values, single_header, write_head, write_response, MAX_HEADERS};

/// A refused request: the HTTP status and a one-line explanation sent as the body.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Reject {
    /// HTTP status code.
    pub status: u16,
    /// What was wrong, in a short sentence.
    pub message: &'static str,
}

impl Reject {
    /// A rejection with `status` and `message`.
    pub const fn new(status: u16, message: &'static str) -> Self {
        Reject { status, message }
    }

    /// Appends the full HTTP answer: status line, headers, and the message as a text body.
    pub fn write(&self, out: &mut Vec<u8>) {
        write_reject(out, self.status, self.message, false);
    }
}

impl core::fmt::Display for Reject {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(
            f,
            "{} {}: {}",
            self.status,
            super::reason_phrase(self.status),
            self.message
        )
    }
}

impl core::error::Error for Reject {}

/// Writes a text/plain refusal, with the headers its status calls for.
fn write_reject(out: &mut Vec<u8>, status: u16, message: &str, head_only: bool) {
    let extra = match status {
        426 => "Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\n",
        405 => "Allow: GET, HEAD\r\n",
        _ => "",
    };
    // The body is the message and a line break.
    write_head(out, status, "text/plain; charset=utf-8", extra, message.len() + 1);
    if !head_only {
        out.extend_from_slice(message.as_bytes());
        out.extend_from_slice(b"\n");
    }
}

/// What to do with a [`Request`].
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Answer {
    /// Upgrade to WebSocket, optionally with one of the subprotocols the client offered.
    Accept {
        /// The chosen subprotocol (must be one the client offered, or it is not sent).
        protocol: Option<String>,
    },
    /// Refuse with an HTTP status and a short text body (e.g. `401`, `403`, `404`).
    Reject {
        /// The status code.
        status: u16,
        /// The body, one line of text.
        body: Cow<'static, str>,
    },
    /// Answer with any HTTP response (a page, a health check) and close.
    Respond {
        /// The status code.
        status: u16,
        /// The `Content-Type` header.
        content_type: Cow<'static, str>,
        /// The body (left out for `HEAD`).
        body: Cow<'static, [u8]>,
    },
}

impl Answer {
    /// Accept without a subprotocol.
    pub const fn accept() -> Answer {
        Answer::Accept { protocol: None }
    }

    /// Refuse with `status` and a one-line `body`.
    pub fn reject(status: u16, body: impl Into<Cow<'static, str>>) -> Answer {
        Answer::Reject {
            status,
            body: body.into(),
        }
    }
}

/// A byte range in the request head.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Span {
    at: u32,
    len: u32,
}

impl Span {
    fn of(head: &[u8], part: &[u8]) -> Span {
        Span {
            at: (part.as_ptr() as usize - head.as_ptr() as usize) as u32,
            len: part.len() as u32,
        }
    }
    fn get<'a>(&self, head: &'a [u8]) -> &'a [u8] {
        &head[self.at as usize..(self.at + self.len) as usize]
    }
}

/// A complete, well-formed HTTP request: an upgrade that passed RFC 6455's checks, or a plain
/// request (no upgrade attempted) that the server may answer with a page.
#[derive(Clone, PartialEq, Eq)]
pub struct Request {
    head: Box<[u8]>,
    method: Span,
    path: Span,
    /// Name and value of every header, in order.
    headers: Box<[(Span, Span)]>,
    /// The `Sec-WebSocket-Key`, for an upgrade.
    key: Option<Span>,
}

impl core::fmt::Debug for Request {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Request")
            .field("method", &self.method())
            .field("path", &self.path())
            .field("upgrade", &self.is_upgrade())
            .finish_non_exhaustive()
    }
}

impl Request {
    fn str(&self, s: Span) -> &str {
        // Method, path and header names were checked to be tokens or visible ASCII by httparse.
        core::str::from_utf8(s.get(&self.head)).unwrap_or("")
    }

    /// The method, e.g. `GET`.
    pub fn method(&self) -> &str {
        self.str(self.method)
    }

    /// The request target with its query, e.g. `/chat?room=1`.
    pub fn path(&self) -> &str {
        self.str(self.path)
    }

    /// The path without the query.
    pub fn path_only(&self) -> &str {
        let p = self.path();
        p.split_once('?').map_or(p, |(a, _)| a)
    }

    /// The query (after `?`), if any.
    pub fn query(&self) -> Option<&str> {
        self.path().split_once('?').map(|(_, q)| q)
    }

    /// The value of query parameter `name` as sent (not percent-decoded).
    pub fn query_param(&self, name: &str) -> Option<&str> {
        self.query()?.split('&').find_map(|kv| match kv.split_once('=') {
            Some((k, v)) if k == name => Some(v),
            None if kv == name => Some(""),
            _ => None,
        })
    }

    /// Every header, in order, as `(name, value)`.
    pub fn headers(&self) -> impl Iterator<Item = (&str, &[u8])> + '_ {
        self.headers.iter().map(move |(n, v)| (self.str(*n), v.get(&self.head)))
    }

    /// The first value of header `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&[u8]> {
        self.headers()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v)
    }

    /// The first value of header `name` as text, if it is UTF-8.
    pub fn header_str(&self, name: &str) -> Option<&str> {
        self.header(name).and_then(|v| core::str::from_utf8(v).ok())
    }

    /// Whether this is a WebSocket upgrade (as opposed to a plain HTTP request).
    pub fn is_upgrade(&self) -> bool {
        self.key.is_some()
    }

    /// The `Origin` header, if sent.
    pub fn origin(&self) -> Option<&str> {
        self.header_str("Origin").map(str::trim)
    }

    /// The subprotocols the client offered, in its order of preference.
    pub fn protocols(&self) -> impl Iterator<Item = &str> + '_ {
        self.headers()
            .filter(|(n, _)| n.eq_ignore_ascii_case("Sec-WebSocket-Protocol"))
            .flat_map(|(_, v)| v.split(|&b| b == b','))
            .filter_map(|t| core::str::from_utf8(t.trim_ascii()).ok())
            .filter(|t| !t.is_empty())
    }

    /// Whether the client offered subprotocol `name` (case-sensitive).
    pub fn offers_protocol(&self, name: &str) -> bool {
        self.headers()
            .filter(|(n, _)| n.eq_ignore_ascii_case("Sec-WebSocket-Protocol"))
            .any(|(_, v)| has_exact_token(v, name))
    }

    /// The values of every `Sec-WebSocket-Extensions` header.
    pub fn extensions(&self) -> impl Iterator<Item = &[u8]> + '_ {
        self.headers()
            .filter(|(n, _)| n.eq_ignore_ascii_case("Sec-WebSocket-Extensions"))
            .map(|(_, v)| v)
    }

    /// The `Sec-WebSocket-Accept` value for this upgrade.
    pub fn accept_key(&self) -> Option<String> {
        self.key.map(|k| super::accept_key(k.get(&self.head)))
    }

    /// Writes the answer to this request. An `Accept` of a request that is not an upgrade, or
    /// one naming a subprotocol the client did not offer, is answered as the RFC requires:
    /// `426` for the first, no `Sec-WebSocket-Protocol` for the second. `extensions` is the
    /// negotiated `Sec-WebSocket-Extensions` value, if any. Returns whether it upgraded.
    pub fn write_answer(&self, answer: &Answer, extensions: Option<&str>, out: &mut Vec<u8>) -> bool {
        let head_only = self.method() == "HEAD";
        match answer {
            Answer::Accept { protocol } => {
                let Some(key) = self.key else {
                    write_reject(
                        out,
                        426,
                        "this is a WebSocket endpoint: send an Upgrade request",
                        head_only,
                    );
                    return false;
                };
                out.extend_from_slice(
                    b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: ",
                );
                out.extend_from_slice(&super::accept_key_bytes(key.get(&self.head)));
                if let Some(p) = protocol.as_deref().filter(|p| self.offers_protocol(p)) {
                    out.extend_from_slice(b"\r\nSec-WebSocket-Protocol: ");
                    out.extend_from_slice(p.as_bytes());
                }
                if let Some(e) = extensions {
                    out.extend_from_slice(b"\r\nSec-WebSocket-Extensions: ");
                    out.extend_from_slice(e.as_bytes());
                }
                out.extend_from_slice(b"\r\n\r\n");
                true
            }
            Answer::Reject { status, body } => {
                write_reject(out, *status, body, head_only);
                false
            }
            Answer::Respond {
                status,
                content_type,
                body,
            } => {
                write_response(out, *status, content_type, "", body, head_only);
                false
            }
        }
    }
}

/// Parses and validates a request head at the start of `buf`.
///
/// Returns `Ok(None)` while the head is incomplete, and otherwise the request with the number
/// of bytes it took (bytes after it belong to the WebSocket stream). A request that attempts
/// an upgrade (any of `Upgrade`, `Connection: upgrade`, `Sec-WebSocket-Key` or
/// `Sec-WebSocket-Version`) must be a complete, valid one, or it is refused: a broken
/// handshake never falls back to a plain request.
pub fn parse_request(buf: &[u8]) -> Result<Option<(Request, usize)>, Reject> {
    // Uninitialised: httparse writes the headers it finds (zeroing 1 KiB per request for nothing).
    let mut headers = [const { core::mem::MaybeUninit::uninit() }; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut []);
    let len = match req.parse_with_uninit_headers(buf, &mut headers) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => {
            return Err(Reject::new(431, "too many request headers"));
        }
        Err(httparse::Error::Version) if names_another_http_version(buf) => {
            return Err(Reject::new(505, "only HTTP/1.1 can be upgraded to WebSocket"));
        }
        Err(_) => return Err(Reject::new(400, "malformed HTTP request")),
    };
    if req.version != Some(1) {
        return Err(Reject::new(505, "a WebSocket handshake needs HTTP/1.1 or later"));
    }
    let method = req.method.unwrap_or("GET");
    let hs = &*req.headers;
    match single_header(hs, "Host") {
        Ok(Some(h)) if !h.trim_ascii().is_empty() => {}
        Ok(_) => return Err(Reject::new(400, "missing Host header")),
        Err(()) => return Err(Reject::new(400, "more than one Host header")),
    }
    let attempts_upgrade = header_values(hs, "Upgrade").next().is_some()
        || header_values(hs, "Connection").any(|v| has_token(v, "upgrade"))
        || header_values(hs, "Sec-WebSocket-Key").next().is_some()
        || header_values(hs, "Sec-WebSocket-Version").next().is_some();
    let key = if attempts_upgrade {
        Some(check_upgrade(method, hs)?)
    } else {
        None
    };
    let head = &buf[..len];
    let request = Request {
        head: Box::from(head),
        method: Span::of(head, method.as_bytes()),
        path: Span::of(head, req.path.unwrap_or("/").as_bytes()),
        headers: hs
            .iter()
            .map(|h| (Span::of(head, h.name.as_bytes()), Span::of(head, h.value)))
            .collect(),
        key: key.map(|k| Span::of(head, k)),
    };
    Ok(Some((request, len)))
}

/// RFC 6455 §4.2.1's checks; returns the key.
fn check_upgrade<'h>(method: &str, hs: &'h [httparse::Header<'h>]) -> Result<&'h [u8], Reject> {
    if method != "GET" {
        return Err(Reject::new(405, "a WebSocket handshake must use GET"));
    }
    let mut upgrades = header_values(hs, "Upgrade").peekable();
    if upgrades.peek().is_none() {
        return Err(Reject::new(400, "missing Upgrade: websocket header"));
    }
    if !upgrades.any(|v| has_token(v, "websocket")) {
        return Err(Reject::new(400, "the Upgrade header must name websocket"));
    }
    if !header_values(hs, "Connection").any(|v| has_token(v, "upgrade")) {
        return Err(Reject::new(400, "the Connection header must include Upgrade"));
    }
    match single_header(hs, "Sec-WebSocket-Version") {
        Ok(Some(v)) if v.trim_ascii() == b"13" => {}
        _ => return Err(Reject::new(426, "only Sec-WebSocket-Version 13 is supported")),
    }
    let key = match single_header(hs, "Sec-WebSocket-Key") {
        Ok(Some(k)) => k.trim_ascii(),
        Ok(None) => return Err(Reject::new(400, "missing Sec-WebSocket-Key header")),
        Err(()) => return Err(Reject::new(400, "more than one Sec-WebSocket-Key header")),
    };
    if !super::is_valid_key(key) {
        return Err(Reject::new(400, "Sec-WebSocket-Key must be base64 of 16 bytes"));
    }
    if single_header(hs, "Origin").is_err() {
        return Err(Reject::new(400, "more than one Origin header"));
    }
    check_no_body(hs)?;
    Ok(key)
}

/// An upgrade carries no body: the bytes after its head are frames. A body announced on it
/// would be read as frames here and as a body by a proxy that reads it otherwise (smuggling).
fn check_no_body(hs: &[httparse::Header<'_>]) -> Result<(), Reject> {
    for h in hs {
        let name = h.name.as_bytes();
        let chunked = name.eq_ignore_ascii_case(b"Transfer-Encoding");
        // `Content-Length: 0` is the one length that announces no body.
        if chunked || name.eq_ignore_ascii_case(b"Content-Length") && h.value != b"0" {
            return Err(Reject::new(
                400,
                if chunked {
                    "a WebSocket upgrade carries no body: Transfer-Encoding is not allowed"
                } else {
                    "a WebSocket upgrade carries no body: Content-Length must be 0"
                },
            ));
        }
    }
    Ok(())
}

/// Whether the request line names an HTTP version httparse does not take (e.g. `HTTP/2.0`), as opposed
/// to not being HTTP at all. httparse failed on the version, so the line so far is method, target
/// and version, one space apart; only `HTTP/` and the digit after it are judged, which httparse
/// must have read to fail there: the verdict does not depend on how much of the head has come.
fn names_another_http_version(buf: &[u8]) -> bool {
    let version = buf.splitn(3, |&b| b == b' ').nth(2).unwrap_or(b"");
    version.len() > 5 && version.starts_with(b"HTTP/") && version[5].is_ascii_digit()
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::format;
    use alloc::string::ToString;

    const GOOD: &str = "GET /chat?room=1&x HTTP/1.1\r\nHost: server.example.com\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nOrigin: http://example.com\r\nSec-WebSocket-Protocol: chat, superchat\r\nSec-WebSocket-Version: 13\r\n\r\n";

    fn parse(req: &str) -> Result<Option<(Request, usize)>, Reject> {
        parse_request(req.as_bytes())
    }

    fn status(req: &str) -> u16 {
        parse(req).unwrap_err().status
    }

    #[test]
    fn accepts_the_rfc_request() {
        let (req, n) = parse(GOOD).unwrap().unwrap();
        assert_eq!(n, GOOD.len());
        assert!(req.is_upgrade());
        assert_eq!(req.method(), "GET");
        assert_eq!(req.path(), "/chat?room=1&x");
        assert_eq!(req.path_only(), "/chat");
        assert_eq!(req.query_param("room"), Some("1"));
        assert_eq!(req.query_param("x"), Some(""));
        assert_eq!(req.query_param("y"), None);
        assert_eq!(req.origin(), Some("http://example.com"));
        assert_eq!(req.header_str("host"), Some("server.example.com"));
        assert_eq!(req.protocols().collect::<Vec<_>>(), ["chat", "superchat"]);
        assert_eq!(req.accept_key().as_deref(), Some("s3pPLMBiTxaQ9kYGzzhZRbK+xOo="));
        let mut out = Vec::new();
        let answer = Answer::Accept {
            protocol: Some("superchat".into()),
        };
        assert!(req.write_answer(&answer, None, &mut out));
        let text = String::from_utf8(out).unwrap();
        assert!(text.starts_with("HTTP/1.1 101 Switching Protocols\r\n"));
        assert!(text.contains("Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n"));
        assert!(text.contains("Sec-WebSocket-Protocol: superchat\r\n"));
        // A subprotocol the client did not offer is not sent.
        let mut out = Vec::new();
        let answer = Answer::Accept {
            protocol: Some("other".into()),
        };
        assert!(req.write_answer(&answer, None, &mut out));
        assert!(!String::from_utf8(out).unwrap().contains("Sec-WebSocket-Protocol"));
    }

    #[test]
    fn incomplete_until_the_blank_line() {
        for cut in 0..GOOD.len() {
            assert_eq!(parse(&GOOD[..cut]), Ok(None), "cut {cut}");
        }
    }

    #[test]
    fn token_lists_and_case() {
        let req = GOOD
            .replace("Upgrade: websocket", "Upgrade: WebSocket")
            .replace("Connection: Upgrade", "Connection: keep-alive, UPGRADE");
        assert!(parse(&req).unwrap().unwrap().0.is_upgrade());
    }

    #[test]
    fn refusals() {
        assert_eq!(status(&GOOD.replace("GET", "POST")), 405);
        assert_eq!(status(&GOOD.replace("HTTP/1.1", "HTTP/1.0")), 505);
        assert_eq!(status(&GOOD.replace("Host: server.example.com\r\n", "")), 400);
        assert_eq!(status(&GOOD.replace("Upgrade: websocket", "Upgrade: h2c")), 400);
        assert_eq!(status(&GOOD.replace("Connection: Upgrade", "Connection: close")), 400);
        assert_eq!(status(&GOOD.replace("Version: 13", "Version: 8")), 426);
        assert_eq!(status(&GOOD.replace("Sec-WebSocket-Version: 13\r\n", "")), 426);
        assert_eq!(status(&GOOD.replace("dGhlIHNhbXBsZSBub25jZQ==", "c2hvcnQ=")), 400);
        assert_eq!(
            status(&GOOD.replace("dGhlIHNhbXBsZSBub25jZQ==", "!!!notbase64!!!")),
            400
        );
        assert_eq!(
            status(&GOOD.replace("Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n", "")),
            400
        );
        assert_eq!(status("garbage\r\n\r\n"), 400);
        assert_eq!(status("this is not http\r\n\r\n"), 400);
        assert_eq!(status(&GOOD.replace("HTTP/1.1", "HTTP/2.0")), 505);
        let many: String = (0..100).map(|i| format!("X-{i}: y\r\n")).collect();
        assert_eq!(status(&GOOD.replace("Origin:", &format!("{many}Origin:"))), 431);
        assert_eq!(
            status(&GOOD.replace("Origin: http://example.com\r\n", "Origin: a\r\nOrigin: b\r\n")),
            400
        );
    }

    #[test]
    fn an_upgrade_with_a_body_is_refused() {
        let te = "a WebSocket upgrade carries no body: Transfer-Encoding is not allowed";
        let cl = "a WebSocket upgrade carries no body: Content-Length must be 0";
        for (header, message) in [
            ("Content-Length: 6", cl),
            ("Content-Length: 00000000000000000000001", cl),
            ("Content-Length: 0, 6", cl),
            ("Content-Length: 0\r\nContent-Length: 6", cl),
            ("Content-Length: -0", cl),
            ("Content-Length: ", cl),
            ("Transfer-Encoding: chunked", te),
            ("Transfer-Encoding: identity", te),
            ("Transfer-Encoding: ", te),
            ("Content-Length: 0\r\nTransfer-Encoding: chunked", te),
            ("Content-Length: 00", cl),
            ("Content-Length: 0, 0", cl),
        ] {
            let req = GOOD.replace("Origin:", &format!("{header}\r\nOrigin:"));
            let e = parse(&req).unwrap_err();
            assert_eq!((e.status, e.message), (400, message), "{header}");
        }
        for header in ["Content-Length: 0", "Content-Length:0", "Content-Length: 0  "] {
            let req = GOOD.replace("Origin:", &format!("{header}\r\nOrigin:"));
            assert!(parse(&req).unwrap().unwrap().0.is_upgrade(), "{header}");
        }
    }

    #[test]
    fn a_handshake_without_the_upgrade_header_is_broken_not_plain() {
        let req = GOOD.replace("Upgrade: websocket\r\n", "");
        let e = parse(&req).unwrap_err();
        assert_eq!((e.status, e.message), (400, "missing Upgrade: websocket header"));
        // Any one of the handshake headers makes it an upgrade attempt.
        let only_key = "GET / HTTP/1.1\r\nHost: x\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n";
        assert_eq!(status(only_key), 400);
        let only_version = "GET / HTTP/1.1\r\nHost: x\r\nSec-WebSocket-Version: 13\r\n\r\n";
        assert_eq!(status(only_version), 400);
    }

    #[test]
    fn plain_requests_are_not_upgrades() {
        for (text, method, path) in [
            ("GET / HTTP/1.1\r\nHost: x\r\n\r\n", "GET", "/"),
            ("HEAD /?x=1 HTTP/1.1\r\nHost: x\r\n\r\n", "HEAD", "/?x=1"),
            ("POST /p HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n", "POST", "/p"),
        ] {
            let (req, n) = parse(text).unwrap().unwrap();
            assert_eq!(n, text.len());
            assert!(!req.is_upgrade());
            assert_eq!((req.method(), req.path()), (method, path));
            let mut out = Vec::new();
            assert!(!req.write_answer(&Answer::accept(), None, &mut out));
            assert!(out.starts_with(b"HTTP/1.1 426 Upgrade Required\r\n"));
        }
    }

    #[test]
    fn answers_say_what_was_wrong() {
        let mut out = Vec::new();
        Reject::new(426, "only Sec-WebSocket-Version 13 is supported").write(&mut out);
        let text = String::from_utf8(out).unwrap();
        assert!(text.starts_with("HTTP/1.1 426 Upgrade Required\r\n"));
        assert!(text.contains("Sec-WebSocket-Version: 13\r\n"));
        assert!(text.ends_with("\r\n\r\nonly Sec-WebSocket-Version 13 is supported\n"));
        let (req, _) = parse(GOOD).unwrap().unwrap();
        let mut out = Vec::new();
        req.write_answer(&Answer::reject(401, "missing token".to_string()), None, &mut out);
        let text = String::from_utf8(out).unwrap();
        assert!(text.starts_with("HTTP/1.1 401 Unauthorized\r\n"));
        assert!(text.ends_with("\r\n\r\nmissing token\n"));
        // HEAD gets the head of the answer only.
        let (head, _) = parse("HEAD / HTTP/1.1\r\nHost: x\r\n\r\n").unwrap().unwrap();
        let mut out = Vec::new();
        let page = Answer::Respond {
            status: 200,
            content_type: "text/html".into(),
            body: b"<p>page</p>".as_slice().into(),
        };
        head.write_answer(&page, None, &mut out);
        let text = String::from_utf8(out).unwrap();
        assert!(text.contains("Content-Length: 11\r\n") && text.ends_with("\r\n\r\n"));
    }
}
