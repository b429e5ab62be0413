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

use super::{has_exact_token, has_token, header_values, single_header, write_head, HeaderError, Headers, MAX_HEADERS};
use super::{reason_phrase, END_OF_HEAD};

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
        write_reject(out, self.status, reason_phrase(self.status), self.message, false);
    }

    /// [`write`](Self::write) for the refusals of [`parse_request`], whose statuses the short
    /// table of the protocol core names.
    pub(crate) fn write_core(&self, out: &mut Vec<u8>) {
        let phrase = super::core_reason_phrase(self.status);
        write_reject(out, self.status, phrase, self.message, false);
    }
}

impl core::fmt::Display for Reject {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "{} {}: {}", self.status, reason_phrase(self.status), self.message)
    }
}

impl core::error::Error for Reject {}

/// The lines a `426` adds: the protocol to upgrade to, and its version (RFC 6455 §4.4).
const UPGRADE_REQUIRED: &str = "\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13";

/// The type of a refusal's body: its message and a line break.
const TEXT_PLAIN: &str = "text/plain; charset=utf-8";

/// Writes one of the protocol's own text/plain refusals, with the headers its status calls for.
fn write_reject(out: &mut Vec<u8>, status: u16, phrase: &str, message: &str, head_only: bool) {
    let extra = match status {
        426 => UPGRADE_REQUIRED,
        // An upgrade must be a GET.
        405 => "\r\nAllow: GET, HEAD",
        _ => "",
    };
    write_head(out, status, phrase, TEXT_PLAIN, Some(message.len() + 1), extra);
    out.extend_from_slice(END_OF_HEAD);
    write_text_body(out, message, head_only);
}

/// Writes an [`Answer::Reject`]: text/plain, with its headers (a `405` names the methods
/// allowed in the `Allow` header its application adds).
fn write_answer_reject(out: &mut Vec<u8>, status: u16, message: &str, headers: &Headers, head_only: bool) {
    let extra = if status == 426 { UPGRADE_REQUIRED } else { "" };
    write_head(
        out,
        status,
        reason_phrase(status),
        TEXT_PLAIN,
        Some(message.len() + 1),
        extra,
    );
    headers.write(out);
    out.extend_from_slice(END_OF_HEAD);
    write_text_body(out, message, head_only);
}

/// The message of a refusal and a line break, unless the request was a `HEAD`.
fn write_text_body(out: &mut Vec<u8>, message: &str, head_only: bool) {
    if !head_only {
        out.extend_from_slice(message.as_bytes());
        out.extend_from_slice(b"\n");
    }
}

/// What to do with a [`Request`]: upgrade it, refuse it, or answer it with a response.
///
/// Build one with [`accept`](Self::accept), [`accept_protocol`](Self::accept_protocol),
/// [`reject`](Self::reject) or [`respond`](Self::respond), and add headers with
/// [`with_header`](Self::with_header):
///
/// ```
/// use wsloop::proto::Answer;
///
/// let answer = Answer::reject(401, "a token is needed").with_header("WWW-Authenticate", "Bearer realm=\"chat\"");
/// assert_eq!(answer.status(), 401);
/// assert_eq!(answer.headers().get("www-authenticate"), Some("Bearer realm=\"chat\""));
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Answer {
    /// Upgrade to WebSocket (`101`), optionally with one of the subprotocols the client offered.
    #[non_exhaustive]
    Accept {
        /// The chosen subprotocol (must be one the client offered, or it is not sent).
        protocol: Option<String>,
        /// Headers sent with the `101` (e.g. `Set-Cookie`).
        headers: Headers,
    },
    /// Refuse with an HTTP status and a short text body (e.g. `401`, `403`, `404`).
    #[non_exhaustive]
    Reject {
        /// The status code, 200 to 599 (another is answered `500`).
        status: u16,
        /// The body, one line of text.
        body: Cow<'static, str>,
        /// Headers sent with the refusal (e.g. `WWW-Authenticate` on a `401`, `Retry-After`
        /// on a `503`).
        headers: Headers,
    },
    /// Answer with any HTTP response (a page, a health check) and close.
    #[non_exhaustive]
    Respond {
        /// The status code, 200 to 599 (another is answered `500`).
        status: u16,
        /// The `Content-Type` header (one with a control character is answered `500`).
        content_type: Cow<'static, str>,
        /// The body (left out for `HEAD`, and for `204` and `304`, which have none).
        body: Cow<'static, [u8]>,
        /// Headers sent with the response.
        headers: Headers,
    },
}

impl Answer {
    /// Accept without a subprotocol.
    pub const fn accept() -> Answer {
        Answer::Accept {
            protocol: None,
            headers: Headers::new(),
        }
    }

    /// Accept with subprotocol `protocol` (sent only if the client offered it).
    pub fn accept_protocol(protocol: impl Into<String>) -> Answer {
        Answer::Accept {
            protocol: Some(protocol.into()),
            headers: Headers::new(),
        }
    }

    /// Refuse with `status` and a one-line `body`, sent as `text/plain`.
    pub fn reject(status: u16, body: impl Into<Cow<'static, str>>) -> Answer {
        Answer::Reject {
            status,
            body: body.into(),
            headers: Headers::new(),
        }
    }

    /// Answer with `status`, a body and its `Content-Type`, e.g.
    /// `Answer::respond(200, "application/json", r#"{"ok":true}"#.as_bytes())`.
    pub fn respond(
        status: u16,
        content_type: impl Into<Cow<'static, str>>,
        body: impl Into<Cow<'static, [u8]>>,
    ) -> Answer {
        Answer::Respond {
            status,
            content_type: content_type.into(),
            body: body.into(),
            headers: Headers::new(),
        }
    }

    /// This answer with header `name: value` added (see [`Headers::add`]).
    ///
    /// A header that would break the response (a name that is not a token, a value with CR or
    /// LF) or that the protocol writes itself is never sent: the answer becomes a `500`
    /// refusal whose body names the error (use [`try_with_header`](Self::try_with_header) to
    /// handle it yourself).
    pub fn with_header(self, name: impl Into<Cow<'static, str>>, value: impl Into<Cow<'static, str>>) -> Answer {
        self.try_with_header(name, value).unwrap_or_else(|e| {
            Answer::reject(
                500,
                match e {
                    HeaderError::InvalidName => "invalid response header: the name is not an HTTP token",
                    HeaderError::InvalidValue => {
                        "invalid response header: the value holds CR, LF or another control character"
                    }
                    HeaderError::Reserved => "invalid response header: the protocol writes this one itself",
                },
            )
        })
    }

    /// This answer with header `name: value` added, or the reason it cannot be (see
    /// [`Headers::add`]).
    pub fn try_with_header(
        mut self,
        name: impl Into<Cow<'static, str>>,
        value: impl Into<Cow<'static, str>>,
    ) -> Result<Answer, HeaderError> {
        self.headers_mut().add(name, value)?;
        Ok(self)
    }

    /// The status it answers with: `101` for an upgrade.
    pub fn status(&self) -> u16 {
        match self {
            Answer::Accept { .. } => 101,
            Answer::Reject { status, .. } | Answer::Respond { status, .. } => *status,
        }
    }

    /// Its headers (besides the ones the protocol writes).
    pub fn headers(&self) -> &Headers {
        match self {
            Answer::Accept { headers, .. } | Answer::Reject { headers, .. } | Answer::Respond { headers, .. } => {
                headers
            }
        }
    }

    /// Its headers, to add to.
    pub fn headers_mut(&mut self) -> &mut Headers {
        match self {
            Answer::Accept { headers, .. } | Answer::Reject { headers, .. } | Answer::Respond { headers, .. } => {
                headers
            }
        }
    }
}

/// A status an [`Answer::Reject`] or [`Answer::Respond`] can have: a final one (not `1xx`,
/// which would announce a protocol switch or an interim answer that never comes).
fn is_final_status(status: u16) -> bool {
    (200..=599).contains(&status)
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
    /// `426` for the first, no `Sec-WebSocket-Protocol` for the second. A `Reject` or `Respond`
    /// with a status outside 200 to 599 is answered `500`. `HEAD` gets the head of the answer
    /// without its body. `extensions` is the negotiated `Sec-WebSocket-Extensions` value, if
    /// any. Returns whether it upgraded.
    pub fn write_answer(&self, answer: &Answer, extensions: Option<&str>, out: &mut Vec<u8>) -> bool {
        let head_only = self.method() == "HEAD";
        match answer {
            Answer::Accept { protocol, headers } => {
                let Some(key) = self.key else {
                    write_reject(
                        out,
                        426,
                        "Upgrade Required",
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
                headers.write(out);
                out.extend_from_slice(END_OF_HEAD);
                true
            }
            Answer::Reject { status, body, headers } if is_final_status(*status) => {
                write_answer_reject(out, *status, body, headers, head_only);
                false
            }
            Answer::Respond {
                status,
                content_type,
                body,
                headers,
            } if is_final_status(*status) && super::is_field_value(content_type) => {
                // 204 and 304 have no body (and a 204 must not announce a length: RFC 9110 §8.6).
                let bodiless = matches!(status, 204 | 304);
                let len = (!bodiless).then_some(body.len());
                write_head(out, *status, reason_phrase(*status), content_type, len, "");
                headers.write(out);
                out.extend_from_slice(END_OF_HEAD);
                if !head_only && !bodiless {
                    out.extend_from_slice(body);
                }
                false
            }
            _ => {
                let message = "the server chose an invalid response status or content type";
                write_answer_reject(out, 500, message, &Headers::new(), head_only);
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
        let answer = Answer::accept_protocol("superchat");
        assert!(req.write_answer(&answer, None, &mut out));
        let text = String::from_utf8(out).unwrap();
        assert!(text.starts_with("HTTP/1.1 101 Switching Protocols\r\n"));
        assert!(text.contains("Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n"));
        assert!(text.contains("Sec-WebSocket-Protocol: superchat\r\n"));
        // A subprotocol the client did not offer is not sent.
        let mut out = Vec::new();
        let answer = Answer::accept_protocol("other");
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
        let page = Answer::respond(200, "text/html", b"<p>page</p>".as_slice());
        head.write_answer(&page, None, &mut out);
        let text = String::from_utf8(out).unwrap();
        assert!(text.contains("Content-Length: 11\r\n") && text.ends_with("\r\n\r\n"));
    }

    /// The written answer to `req` as text, and whether it upgraded.
    fn answer_text(req: &str, answer: &Answer) -> (String, bool) {
        let (req, _) = parse(req).unwrap().unwrap();
        let mut out = Vec::new();
        let up = req.write_answer(answer, None, &mut out);
        (String::from_utf8(out).unwrap(), up)
    }

    #[test]
    fn answers_carry_their_headers() {
        // On the 101, after the handshake's own headers.
        let accept = Answer::accept_protocol("chat")
            .with_header("Set-Cookie", "id=42; HttpOnly")
            .with_header("Set-Cookie", "theme=dark");
        let (text, up) = answer_text(GOOD, &accept);
        assert!(up);
        assert!(text.ends_with(
            "Sec-WebSocket-Protocol: chat\r\nSet-Cookie: id=42; HttpOnly\r\nSet-Cookie: theme=dark\r\n\r\n"
        ));
        // A client reads it as a valid upgrade.
        let key = "dGhlIHNhbXBsZSBub25jZQ==";
        let offered = ["chat".to_string()];
        let (resp, n) = super::super::parse_response(text.as_bytes(), key, &offered, false, false)
            .unwrap()
            .unwrap();
        assert_eq!((n, resp.protocol.as_deref()), (text.len(), Some("chat")));
        // On refusals.
        let unauthorized =
            Answer::reject(401, "a token is needed").with_header("WWW-Authenticate", "Basic realm=\"x\"");
        let (text, up) = answer_text(GOOD, &unauthorized);
        assert!(!up);
        assert!(text.starts_with("HTTP/1.1 401 Unauthorized\r\n"));
        assert!(text.contains("\r\nConnection: close\r\nWWW-Authenticate: Basic realm=\"x\"\r\n\r\n"));
        assert!(text.ends_with("\r\n\r\na token is needed\n"));
        let busy = Answer::reject(503, "try again soon").with_header("Retry-After", "30");
        let (text, _) = answer_text(GOOD, &busy);
        assert!(text.starts_with("HTTP/1.1 503 Service Unavailable\r\n"));
        assert!(text.contains("\r\nRetry-After: 30\r\n\r\n"));
        // An answer's 405 names what its application allows, not the protocol's GET.
        let post_only = Answer::reject(405, "POST only").with_header("Allow", "POST");
        let (text, _) = answer_text("GET /p HTTP/1.1\r\nHost: x\r\n\r\n", &post_only);
        assert!(text.contains("\r\nAllow: POST\r\n") && !text.contains("GET, HEAD"));
        // On a response, and HEAD gets the same head without the body.
        let page = Answer::respond(200, "application/json", br#"{"ok":true}"#.as_slice())
            .with_header("Cache-Control", "no-store");
        let (text, _) = answer_text("GET /health HTTP/1.1\r\nHost: x\r\n\r\n", &page);
        assert!(text.starts_with("HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 11\r\n"));
        assert!(text.ends_with("Cache-Control: no-store\r\n\r\n{\"ok\":true}"));
        let (head, _) = answer_text("HEAD /health HTTP/1.1\r\nHost: x\r\n\r\n", &page);
        assert_eq!(head, text.strip_suffix("{\"ok\":true}").unwrap());
    }

    #[test]
    fn a_broken_header_is_never_written() {
        let mut h = Headers::new();
        for (name, value, err) in [
            ("X-A", "a\r\nSet-Cookie: evil=1", HeaderError::InvalidValue),
            ("X-A", "a\nb", HeaderError::InvalidValue),
            ("X-A", "a\rb", HeaderError::InvalidValue),
            ("X-A", "a\0b", HeaderError::InvalidValue),
            ("X-A", "a\x7fb", HeaderError::InvalidValue),
            ("X-A\r\nX-B", "1", HeaderError::InvalidName),
            ("X A", "1", HeaderError::InvalidName),
            ("X-A:", "1", HeaderError::InvalidName),
            ("", "1", HeaderError::InvalidName),
            ("content-length", "5", HeaderError::Reserved),
            ("Connection", "keep-alive", HeaderError::Reserved),
            ("Sec-WebSocket-Accept", "x", HeaderError::Reserved),
            ("Transfer-Encoding", "chunked", HeaderError::Reserved),
        ] {
            assert_eq!(h.add(name, value), Err(err), "{name:?}: {value:?}");
        }
        assert!(h.is_empty(), "nothing refused is kept");
        assert_eq!(h.add("X-A", "tab\tand UTF-8: é"), Ok(()));
        assert_eq!(h.get("x-a"), Some("tab\tand UTF-8: é"));
        // The builder refuses the whole answer with a 500 rather than send it without the header.
        let answer = Answer::accept().with_header("Set-Cookie", "a\r\n\r\n<script>");
        assert_eq!(answer.status(), 500);
        let (text, up) = answer_text(GOOD, &answer);
        assert!(!up);
        assert!(text.starts_with("HTTP/1.1 500 Internal Server Error\r\n"));
        assert!(!text.contains("<script>"));
        assert!(text.ends_with("invalid response header: the value holds CR, LF or another control character\n"));
        assert_eq!(
            Answer::reject(401, "x").try_with_header("WWW-Authenticate", "a\nb"),
            Err(HeaderError::InvalidValue)
        );
        // A content type is a header value too, and a status must be a final one.
        let (text, _) = answer_text(GOOD, &Answer::respond(200, "text/html\r\nX-Evil: 1", b"x".as_slice()));
        assert!(text.starts_with("HTTP/1.1 500 ") && !text.contains("X-Evil"));
        for status in [0, 101, 199, 600, 999] {
            let (text, up) = answer_text(GOOD, &Answer::reject(status, "x"));
            assert!(
                !up && text.starts_with("HTTP/1.1 500 Internal Server Error\r\n"),
                "{status}"
            );
        }
    }

    #[test]
    fn statuses_without_a_body() {
        let (text, _) = answer_text(
            "GET / HTTP/1.1\r\nHost: x\r\n\r\n",
            &Answer::respond(204, "text/plain", b"ignored".as_slice()),
        );
        assert_eq!(
            text,
            "HTTP/1.1 204 No Content\r\nContent-Type: text/plain\r\nConnection: close\r\n\r\n"
        );
        let moved = Answer::respond(302, "text/plain", b"see /new".as_slice()).with_header("Location", "/new");
        let (text, _) = answer_text("GET / HTTP/1.1\r\nHost: x\r\n\r\n", &moved);
        assert!(text.starts_with("HTTP/1.1 302 Found\r\n") && text.contains("\r\nLocation: /new\r\n"));
    }

    #[test]
    fn every_status_has_its_phrase() {
        let (text, _) = answer_text(GOOD, &Answer::reject(418, "short and stout"));
        assert!(text.starts_with("HTTP/1.1 418 I'm a teapot\r\n"));
        let mut out = Vec::new();
        Reject::new(429, "slow down").write(&mut out);
        assert!(out.starts_with(b"HTTP/1.1 429 Too Many Requests\r\n"));
        assert_eq!(
            Reject::new(451, "x").to_string(),
            "451 Unavailable For Legal Reasons: x"
        );
    }
}
