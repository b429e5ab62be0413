//! The opening handshake (RFC 6455 §4): request validation and answers for the server, request
//! building and answer checking for the client. Pure functions over bytes.

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;

/// The GUID that RFC 6455 appends to the key before hashing.
const GUID: &str = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11";

/// Headers read per request or response; more is answered with `431`.
pub const MAX_HEADERS: usize = 64;

/// `Sec-WebSocket-Accept` for a `Sec-WebSocket-Key` (RFC 6455 §4.2.2, step 5.4).
pub fn accept_key(key: &[u8]) -> String {
    let mut sha = sha1_smol::Sha1::new();
    sha.update(key);
    sha.update(GUID.as_bytes());
    B64.encode(sha.digest().bytes())
}

/// A fresh `Sec-WebSocket-Key`: 16 bytes from the OS random source, base64-encoded.
pub fn new_client_key() -> std::io::Result<String> {
    let mut nonce = [0u8; 16];
    super::mask::os_random(&mut nonce)?;
    Ok(B64.encode(nonce))
}

/// What the server accepts beyond the RFC's checks.
#[derive(Clone, Debug, Default)]
pub struct HandshakePolicy {
    /// Allowed `Origin` values; empty allows any. A request without `Origin` (not a browser) is
    /// always allowed: the check exists to stop cross-site pages, which always send one.
    pub origins: Vec<String>,
    /// Subprotocols the server speaks, in order of preference.
    pub protocols: Vec<String>,
}

/// A valid WebSocket upgrade request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Request {
    /// The request target, e.g. `/chat?room=1`.
    pub path: String,
    /// The `Sec-WebSocket-Accept` value to answer with.
    pub accept: String,
    /// The subprotocol chosen from the client's offer, if any.
    pub protocol: Option<String>,
    /// The `Origin` header, if sent.
    pub origin: Option<String>,
}

/// What a complete request head turned out to be.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RequestHead {
    /// A valid upgrade.
    Upgrade(Request),
    /// A plain `GET` with no `Upgrade` header; the server may serve a page or answer `426`.
    Plain {
        /// The request target.
        path: String,
    },
}

/// A refused request: the HTTP status and a one-line explanation sent as the body.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Reject {
    /// HTTP status code.
    pub status: u16,
    /// What was wrong, in a short sentence.
    pub message: &'static str,
}

impl Reject {
    const fn new(status: u16, message: &'static str) -> Self {
        Reject { status, message }
    }

    /// Appends the full HTTP answer: status line, headers, and the message as a text body.
    pub fn write(&self, out: &mut Vec<u8>) {
        let extra = match self.status {
            426 => "Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\n",
            405 => "Allow: GET\r\n",
            _ => "",
        };
        let mut body = String::with_capacity(self.message.len() + 1);
        body.push_str(self.message);
        body.push('\n');
        write_response(out, self.status, "text/plain; charset=utf-8", extra, body.as_bytes());
    }
}

impl std::fmt::Display for Reject {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}: {}", self.status, reason_phrase(self.status), self.message)
    }
}

/// The reason phrase for the statuses this crate sends.
pub fn reason_phrase(status: u16) -> &'static str {
    match status {
        101 => "Switching Protocols",
        200 => "OK",
        400 => "Bad Request",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        426 => "Upgrade Required",
        431 => "Request Header Fields Too Large",
        503 => "Service Unavailable",
        505 => "HTTP Version Not Supported",
        _ => "Error",
    }
}

/// Appends a complete HTTP/1.1 response that closes the connection.
pub fn write_response(out: &mut Vec<u8>, status: u16, content_type: &str, extra_headers: &str, body: &[u8]) {
    use std::io::Write as _;
    let _ = write!(
        out,
        "HTTP/1.1 {status} {}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n{extra_headers}\r\n",
        reason_phrase(status),
        body.len()
    );
    out.extend_from_slice(body);
}

/// Appends the `101 Switching Protocols` answer for an accepted request.
pub fn write_accept(out: &mut Vec<u8>, req: &Request) {
    out.extend_from_slice(
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: ",
    );
    out.extend_from_slice(req.accept.as_bytes());
    if let Some(p) = &req.protocol {
        out.extend_from_slice(b"\r\nSec-WebSocket-Protocol: ");
        out.extend_from_slice(p.as_bytes());
    }
    out.extend_from_slice(b"\r\n\r\n");
}

/// Whether a comma-separated header value holds `token` (case-insensitive).
fn has_token(value: &[u8], token: &str) -> bool {
    value
        .split(|&b| b == b',')
        .any(|t| t.trim_ascii().eq_ignore_ascii_case(token.as_bytes()))
}

/// Every value of header `name`, in order.
fn header_values<'h>(headers: &'h [httparse::Header<'h>], name: &'h str) -> impl Iterator<Item = &'h [u8]> + 'h {
    headers
        .iter()
        .filter(move |h| h.name.eq_ignore_ascii_case(name))
        .map(|h| h.value)
}

/// The single value of header `name`; `Err` when it is sent more than once.
fn single_header<'h>(headers: &'h [httparse::Header<'h>], name: &'h str) -> Result<Option<&'h [u8]>, ()> {
    let mut it = header_values(headers, name);
    let first = it.next();
    if it.next().is_some() {
        return Err(());
    }
    Ok(first)
}

/// Parses and validates a request head at the start of `buf`.
///
/// Returns `Ok(None)` while the head is incomplete, and otherwise what it is with the number of
/// bytes it took (bytes after it belong to the WebSocket stream).
pub fn parse_request(buf: &[u8], policy: &HandshakePolicy) -> Result<Option<(RequestHead, usize)>, Reject> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let len = match req.parse(buf) {
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
    if req.method != Some("GET") {
        return Err(Reject::new(405, "a WebSocket handshake must use GET"));
    }
    if req.version != Some(1) {
        return Err(Reject::new(505, "a WebSocket handshake needs HTTP/1.1 or later"));
    }
    let headers = req.headers;
    let path = req.path.unwrap_or("/").to_string();
    match single_header(headers, "Host") {
        Ok(Some(h)) if !h.trim_ascii().is_empty() => {}
        Ok(_) => return Err(Reject::new(400, "missing Host header")),
        Err(()) => return Err(Reject::new(400, "more than one Host header")),
    }
    let mut upgrades = header_values(headers, "Upgrade").peekable();
    if upgrades.peek().is_none() {
        return Ok(Some((RequestHead::Plain { path }, len)));
    }
    if !upgrades.any(|v| has_token(v, "websocket")) {
        return Err(Reject::new(400, "the Upgrade header must name websocket"));
    }
    if !header_values(headers, "Connection").any(|v| has_token(v, "upgrade")) {
        return Err(Reject::new(400, "the Connection header must include Upgrade"));
    }
    match single_header(headers, "Sec-WebSocket-Version") {
        Ok(Some(v)) if v.trim_ascii() == b"13" => {}
        _ => return Err(Reject::new(426, "only Sec-WebSocket-Version 13 is supported")),
    }
    let key = match single_header(headers, "Sec-WebSocket-Key") {
        Ok(Some(k)) => k.trim_ascii(),
        Ok(None) => return Err(Reject::new(400, "missing Sec-WebSocket-Key header")),
        Err(()) => return Err(Reject::new(400, "more than one Sec-WebSocket-Key header")),
    };
    let mut nonce = [0u8; 18];
    match B64.decode_slice(key, &mut nonce) {
        Ok(16) => {}
        _ => {
            return Err(Reject::new(400, "Sec-WebSocket-Key must be base64 of 16 bytes"));
        }
    }
    let origin = match single_header(headers, "Origin") {
        Ok(o) => o.map(|o| String::from_utf8_lossy(o.trim_ascii()).into_owned()),
        Err(()) => return Err(Reject::new(400, "more than one Origin header")),
    };
    if let Some(o) = &origin {
        if !policy.origins.is_empty() && !policy.origins.iter().any(|a| a.eq_ignore_ascii_case(o)) {
            return Err(Reject::new(403, "origin not allowed"));
        }
    }
    let protocol = policy
        .protocols
        .iter()
        .find(|p| header_values(headers, "Sec-WebSocket-Protocol").any(|v| has_exact_token(v, p)))
        .cloned();
    Ok(Some((
        RequestHead::Upgrade(Request {
            path,
            accept: accept_key(key),
            protocol,
            origin,
        }),
        len,
    )))
}

/// Whether the request line ends in an HTTP version other than 1.x (e.g. `HTTP/2.0`), as opposed
/// to not being HTTP at all.
fn names_another_http_version(buf: &[u8]) -> bool {
    let line = buf.split(|&b| b == b'\n').next().unwrap_or(buf).trim_ascii();
    let version = line.rsplit(|&b| b == b' ').next().unwrap_or(b"");
    version.len() > 5 && version[..5].eq_ignore_ascii_case(b"HTTP/") && version[5].is_ascii_digit()
}

/// Whether a comma-separated list holds `token` exactly (subprotocol names are case-sensitive).
fn has_exact_token(value: &[u8], token: &str) -> bool {
    value.split(|&b| b == b',').any(|t| t.trim_ascii() == token.as_bytes())
}

/// Appends a client's upgrade request.
pub fn write_request(
    out: &mut Vec<u8>,
    host: &str,
    path: &str,
    key: &str,
    protocols: &[String],
    extra_headers: &[(String, String)],
) {
    use std::io::Write as _;
    let _ = write!(
        out,
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
    );
    if !protocols.is_empty() {
        let _ = write!(out, "Sec-WebSocket-Protocol: {}\r\n", protocols.join(", "));
    }
    for (name, value) in extra_headers {
        let _ = write!(out, "{name}: {value}\r\n");
    }
    out.extend_from_slice(b"\r\n");
}

/// Why a client handshake failed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ResponseError {
    /// The answer is not HTTP.
    Malformed,
    /// The server answered with a status other than 101.
    Status {
        /// The status code.
        code: u16,
        /// The reason phrase as sent.
        reason: String,
    },
    /// A 101 answer whose headers do not complete a WebSocket handshake.
    Invalid(&'static str),
}

impl std::fmt::Display for ResponseError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ResponseError::Malformed => f.write_str("server answered with something that is not HTTP"),
            ResponseError::Status { code, reason } => {
                write!(f, "server answered {code} {reason}: not a WebSocket endpoint")
            }
            ResponseError::Invalid(why) => write!(f, "invalid handshake answer: {why}"),
        }
    }
}

impl std::error::Error for ResponseError {}

/// A server's accepted handshake.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Response {
    /// The subprotocol the server chose, if any.
    pub protocol: Option<String>,
}

/// Parses and checks a server's answer to a request sent with `key` and `protocols`.
///
/// Returns `Ok(None)` while incomplete, and otherwise the accepted handshake with the number of
/// bytes the head took.
pub fn parse_response(buf: &[u8], key: &str, protocols: &[String]) -> Result<Option<(Response, usize)>, ResponseError> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut res = httparse::Response::new(&mut headers);
    let len = match res.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(_) => return Err(ResponseError::Malformed),
    };
    let code = res.code.unwrap_or(0);
    if code != 101 {
        return Err(ResponseError::Status {
            code,
            reason: res.reason.unwrap_or("").to_string(),
        });
    }
    let headers = res.headers;
    if !header_values(headers, "Upgrade").any(|v| has_token(v, "websocket")) {
        return Err(ResponseError::Invalid("Upgrade header is not websocket"));
    }
    if !header_values(headers, "Connection").any(|v| has_token(v, "upgrade")) {
        return Err(ResponseError::Invalid("Connection header lacks Upgrade"));
    }
    match single_header(headers, "Sec-WebSocket-Accept") {
        Ok(Some(a)) if a.trim_ascii() == accept_key(key.as_bytes()).as_bytes() => {}
        Ok(Some(_)) => return Err(ResponseError::Invalid("wrong Sec-WebSocket-Accept")),
        _ => return Err(ResponseError::Invalid("missing Sec-WebSocket-Accept")),
    }
    if header_values(headers, "Sec-WebSocket-Extensions").next().is_some() {
        return Err(ResponseError::Invalid("server chose an extension that was not offered"));
    }
    let protocol = match single_header(headers, "Sec-WebSocket-Protocol") {
        Ok(None) => None,
        Ok(Some(p)) => {
            let p = String::from_utf8_lossy(p.trim_ascii()).into_owned();
            if !protocols.contains(&p) {
                return Err(ResponseError::Invalid(
                    "server chose a subprotocol that was not offered",
                ));
            }
            Some(p)
        }
        Err(()) => return Err(ResponseError::Invalid("more than one Sec-WebSocket-Protocol")),
    };
    Ok(Some((Response { protocol }, len)))
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = "GET /chat HTTP/1.1\r\nHost: server.example.com\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nOrigin: http://example.com\r\nSec-WebSocket-Protocol: chat, superchat\r\nSec-WebSocket-Version: 13\r\n\r\n";

    fn parse(req: &str) -> Result<Option<(RequestHead, usize)>, Reject> {
        parse_request(req.as_bytes(), &HandshakePolicy::default())
    }

    fn status(req: &str) -> u16 {
        parse(req).unwrap_err().status
    }

    #[test]
    fn rfc_sample_key() {
        assert_eq!(accept_key(b"dGhlIHNhbXBsZSBub25jZQ=="), "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=");
    }

    #[test]
    fn accepts_the_rfc_request() {
        let policy = HandshakePolicy {
            origins: vec![],
            protocols: vec!["superchat".into(), "chat".into()],
        };
        let (head, n) = parse_request(GOOD.as_bytes(), &policy).unwrap().unwrap();
        assert_eq!(n, GOOD.len());
        let RequestHead::Upgrade(req) = head else {
            panic!("not an upgrade")
        };
        assert_eq!(req.accept, "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=");
        assert_eq!(req.protocol.as_deref(), Some("superchat"));
        assert_eq!(req.path, "/chat");
        let mut out = Vec::new();
        write_accept(&mut out, &req);
        let text = String::from_utf8(out).unwrap();
        assert!(text.starts_with("HTTP/1.1 101 Switching Protocols\r\n"));
        assert!(text.contains("Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n"));
        assert!(text.contains("Sec-WebSocket-Protocol: superchat\r\n"));
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
        assert!(matches!(parse(&req), Ok(Some((RequestHead::Upgrade(_), _)))));
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
        let policy = HandshakePolicy {
            origins: vec!["https://good.example".into()],
            protocols: vec![],
        };
        assert_eq!(parse_request(GOOD.as_bytes(), &policy).unwrap_err().status, 403);
    }

    #[test]
    fn plain_get_is_not_an_upgrade() {
        let req = "GET / HTTP/1.1\r\nHost: x\r\n\r\n";
        assert_eq!(
            parse(req),
            Ok(Some((RequestHead::Plain { path: "/".into() }, req.len())))
        );
    }

    #[test]
    fn reject_bodies_say_what_was_wrong() {
        let mut out = Vec::new();
        Reject::new(426, "only Sec-WebSocket-Version 13 is supported").write(&mut out);
        let text = String::from_utf8(out).unwrap();
        assert!(text.starts_with("HTTP/1.1 426 Upgrade Required\r\n"));
        assert!(text.contains("Sec-WebSocket-Version: 13\r\n"));
        assert!(text.ends_with("\r\n\r\nonly Sec-WebSocket-Version 13 is supported\n"));
    }

    #[test]
    fn client_side_round_trip() {
        let key = new_client_key().unwrap();
        let mut req = Vec::new();
        write_request(
            &mut req,
            "h:1",
            "/p?q",
            &key,
            &["chat".into()],
            &[("X-A".into(), "b".into())],
        );
        let policy = HandshakePolicy {
            origins: vec![],
            protocols: vec!["chat".into()],
        };
        let (head, _) = parse_request(&req, &policy).unwrap().unwrap();
        let RequestHead::Upgrade(r) = head else { panic!() };
        let mut res = Vec::new();
        write_accept(&mut res, &r);
        let (resp, n) = parse_response(&res, &key, &["chat".into()]).unwrap().unwrap();
        assert_eq!(n, res.len());
        assert_eq!(resp.protocol.as_deref(), Some("chat"));
        // A wrong accept value is refused.
        let bad = String::from_utf8(res.clone())
            .unwrap()
            .replace(&r.accept, "AAAAAAAAAAAAAAAAAAAAAAAAAAA=");
        assert_eq!(
            parse_response(bad.as_bytes(), &key, &[]),
            Err(ResponseError::Invalid("wrong Sec-WebSocket-Accept"))
        );
        let e = parse_response(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n", &key, &[]).unwrap_err();
        assert_eq!(e.to_string(), "server answered 200 OK: not a WebSocket endpoint");
    }
}
