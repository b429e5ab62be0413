//! The client side of the handshake: write the request, check the answer.

use alloc::string::String;
use alloc::vec::Vec;

use super::{accept_key, has_token, header_values, single_header, MAX_HEADERS};

/// What a client's upgrade request carries besides the key.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ClientRequest {
    /// The `Host` header value, e.g. `example.com:9001`.
    pub host: String,
    /// The request target, e.g. `/chat?room=1`.
    pub resource: String,
    /// Subprotocols to offer, in order of preference.
    pub protocols: Vec<String>,
    /// Extra headers, e.g. `("Origin", "http://localhost")`.
    pub headers: Vec<(String, String)>,
    /// A `Sec-WebSocket-Extensions` offer, if any.
    pub extensions: Option<String>,
}

/// A part of a [`ClientRequest`] that would break the request head, from
/// [`ClientRequest::check`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum ClientRequestError {
    /// The host or path is not printable ASCII, or the path does not start with `/`.
    HostOrPath,
    /// A subprotocol name is not an HTTP token.
    Subprotocol,
    /// A header name is not a token, or its value holds a line break or a NUL.
    Header,
}

impl ClientRequestError {
    /// What is wrong, in one sentence.
    pub const fn message(self) -> &'static str {
        match self {
            ClientRequestError::HostOrPath => "the host and path must be printable ASCII, the path starting with /",
            ClientRequestError::Subprotocol => "a subprotocol name is not a token",
            ClientRequestError::Header => "a header name is not a token or its value holds a line break",
        }
    }
}

impl core::fmt::Display for ClientRequestError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(self.message())
    }
}

impl core::error::Error for ClientRequestError {}

impl ClientRequest {
    /// A request for `resource` on `host` with nothing extra.
    pub fn new(host: impl Into<String>, resource: impl Into<String>) -> ClientRequest {
        ClientRequest {
            host: host.into(),
            resource: resource.into(),
            ..ClientRequest::default()
        }
    }

    /// Checks that every part can be sent without breaking the request head.
    pub fn check(&self) -> Result<(), ClientRequestError> {
        let printable = |s: &str| s.bytes().all(|b| b.is_ascii_graphic());
        if !printable(&self.host) || !printable(&self.resource) || !self.resource.starts_with('/') {
            return Err(ClientRequestError::HostOrPath);
        }
        if !self.protocols.iter().all(|p| super::is_token(p)) {
            return Err(ClientRequestError::Subprotocol);
        }
        for (name, value) in &self.headers {
            if !super::is_token(name) || value.bytes().any(|b| b == b'\r' || b == b'\n' || b == 0) {
                return Err(ClientRequestError::Header);
            }
        }
        Ok(())
    }

    /// Appends the upgrade request carrying `key`.
    pub fn write(&self, key: &str, out: &mut Vec<u8>) {
        fn line(out: &mut Vec<u8>, parts: &[&str]) {
            for p in parts {
                out.extend_from_slice(p.as_bytes());
            }
            out.extend_from_slice(b"\r\n");
        }
        line(out, &["GET ", &self.resource, " HTTP/1.1"]);
        line(out, &["Host: ", &self.host]);
        line(out, &["Upgrade: websocket"]);
        line(out, &["Connection: Upgrade"]);
        line(out, &["Sec-WebSocket-Key: ", key]);
        line(out, &["Sec-WebSocket-Version: 13"]);
        if let Some((first, rest)) = self.protocols.split_first() {
            out.extend_from_slice(b"Sec-WebSocket-Protocol: ");
            out.extend_from_slice(first.as_bytes());
            for p in rest {
                out.extend_from_slice(b", ");
                out.extend_from_slice(p.as_bytes());
            }
            out.extend_from_slice(b"\r\n");
        }
        if let Some(e) = &self.extensions {
            line(out, &["Sec-WebSocket-Extensions: ", e]);
        }
        for (name, value) in &self.headers {
            line(out, &[name, ": ", value]);
        }
        out.extend_from_slice(b"\r\n");
    }
}

/// Why a client handshake failed.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum ResponseError {
    /// The answer is not HTTP.
    Malformed,
    /// The server answered with a status other than 101.
    Status {
        /// The status code.
        code: u16,
        /// The reason phrase as sent.
        reason: String,
        /// The start of the body, as text (the server's explanation, if it gave one).
        body: String,
    },
    /// A 101 answer whose headers do not complete a WebSocket handshake.
    Invalid(&'static str),
    /// The answer head grew past the limit.
    TooLarge,
    /// The server closed the connection without answering.
    NoAnswer,
    /// The server closed the connection in the middle of its answer.
    CutShort,
}

impl core::fmt::Display for ResponseError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            ResponseError::Malformed => f.write_str("server answered with something that is not HTTP"),
            ResponseError::Status { code, reason, body } => {
                let reason = match reason.trim() {
                    "" => status_reason(*code),
                    r => r,
                };
                write!(f, "server refused the upgrade: {code} {reason}")?;
                match body.trim() {
                    "" => Ok(()),
                    body => write!(f, ": {body}"),
                }
            }
            ResponseError::Invalid(why) => write!(f, "invalid handshake answer: {why}"),
            ResponseError::TooLarge => f.write_str("the handshake answer head is too large"),
            ResponseError::NoAnswer => f.write_str("the server closed the connection without answering"),
            ResponseError::CutShort => f.write_str("the server closed the connection in the middle of its answer"),
        }
    }
}

impl core::error::Error for ResponseError {}

/// The usual reason phrase of the statuses a refused upgrade comes with, for an answer that
/// gave none.
fn status_reason(code: u16) -> &'static str {
    match code {
        200 => "OK",
        301 => "Moved Permanently",
        302 => "Found",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        426 => "Upgrade Required",
        429 => "Too Many Requests",
        500 => "Internal Server Error",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        _ => "",
    }
}

/// A server's accepted handshake.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Response {
    /// The subprotocol the server chose, if any.
    pub protocol: Option<String>,
    /// The `Sec-WebSocket-Extensions` the server agreed to, if any.
    pub extensions: Option<String>,
}

/// Body bytes of a refusal kept for the error message.
const MAX_BODY_SHOWN: usize = 200;

/// Parses and checks a server's answer to a request sent with `key`, offering `protocols` and
/// (with `extensions_offered`) an extension.
///
/// Returns `Ok(None)` while incomplete, and otherwise the accepted handshake with the number of
/// bytes the head took. A refusal waits for its body (by `Content-Length`) unless `eof` says
/// nothing more will come.
pub fn parse_response(
    buf: &[u8],
    key: &str,
    protocols: &[String],
    extensions_offered: bool,
    eof: bool,
) -> Result<Option<(Response, usize)>, ResponseError> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut res = httparse::Response::new(&mut headers);
    let len = match res.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) if eof && buf.is_empty() => return Err(ResponseError::NoAnswer),
        Ok(httparse::Status::Partial) if eof => return Err(ResponseError::CutShort),
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(_) => return Err(ResponseError::Malformed),
    };
    let code = res.code.unwrap_or(0);
    let headers = &*res.headers;
    if code != 101 {
        let want = single_header(headers, "Content-Length")
            .ok()
            .flatten()
            .and_then(|v| core::str::from_utf8(v).ok())
            .and_then(|v| v.trim().parse::<usize>().ok())
            .unwrap_or(0)
            .min(MAX_BODY_SHOWN);
        let body = &buf[len..];
        if body.len() < want && !eof {
            return Ok(None);
        }
        let body = &body[..body.len().min(want)];
        return Err(ResponseError::Status {
            code,
            reason: String::from(res.reason.unwrap_or("")),
            body: String::from_utf8_lossy(body).into_owned(),
        });
    }
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
    // Several headers make one list (RFC 9110 §5.3): joined, the offer's owner checks it whole.
    let mut extensions: Option<String> = None;
    for v in header_values(headers, "Sec-WebSocket-Extensions") {
        if !extensions_offered {
            return Err(ResponseError::Invalid("server chose an extension that was not offered"));
        }
        let v = String::from_utf8_lossy(v.trim_ascii());
        match &mut extensions {
            Some(e) => {
                e.push_str(", ");
                e.push_str(&v);
            }
            None => extensions = Some(v.into_owned()),
        }
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
    Ok(Some((Response { protocol, extensions }, len)))
}

#[cfg(test)]
mod tests {
    use super::super::client_key;
    use super::super::request::{parse_request, Answer};
    use super::*;
    use alloc::string::ToString;
    use alloc::vec;

    #[test]
    fn round_trip_with_our_server_side() {
        let key = client_key([7; 16]);
        let mut req = ClientRequest::new("h:1", "/p?q");
        req.protocols = vec!["chat".into(), "v2".into()];
        req.headers = vec![("X-A".into(), "b".into())];
        req.check().unwrap();
        let mut bytes = Vec::new();
        req.write(&key, &mut bytes);
        let text = String::from_utf8(bytes.clone()).unwrap();
        assert!(text.contains("Sec-WebSocket-Protocol: chat, v2\r\nX-A: b\r\n\r\n"));
        let (parsed, _) = parse_request(&bytes).unwrap().unwrap();
        assert_eq!(parsed.path(), "/p?q");
        let mut res = Vec::new();
        let answer = Answer::accept_protocol("chat");
        assert!(parsed.write_answer(&answer, None, &mut res));
        let offered = ["chat".to_string(), "v2".to_string()];
        let (resp, n) = parse_response(&res, &key, &offered, false, false).unwrap().unwrap();
        assert_eq!(n, res.len());
        assert_eq!(resp.protocol.as_deref(), Some("chat"));
        // A wrong accept value is refused.
        let accept = parsed.accept_key().unwrap();
        let bad = String::from_utf8(res.clone())
            .unwrap()
            .replace(&accept, "AAAAAAAAAAAAAAAAAAAAAAAAAAA=");
        assert_eq!(
            parse_response(bad.as_bytes(), &key, &[], false, false),
            Err(ResponseError::Invalid("wrong Sec-WebSocket-Accept"))
        );
        // An extension that was not offered is refused.
        let mut res = Vec::new();
        parsed.write_answer(&Answer::accept(), Some("permessage-deflate"), &mut res);
        assert_eq!(
            parse_response(&res, &key, &[], false, false),
            Err(ResponseError::Invalid("server chose an extension that was not offered"))
        );
        let (resp, _) = parse_response(&res, &key, &[], true, false).unwrap().unwrap();
        assert_eq!(resp.extensions.as_deref(), Some("permessage-deflate"));
        // Several headers are one list, joined for the offer's owner to check.
        let text = String::from_utf8(res).unwrap();
        let twice = text.replace(
            "Sec-WebSocket-Extensions: permessage-deflate\r\n",
            "Sec-WebSocket-Extensions: permessage-deflate\r\nSec-WebSocket-Extensions: x-other; a=1\r\n",
        );
        assert_ne!(twice, text);
        let (resp, _) = parse_response(twice.as_bytes(), &key, &[], true, false)
            .unwrap()
            .unwrap();
        assert_eq!(resp.extensions.as_deref(), Some("permessage-deflate, x-other; a=1"));
    }

    #[test]
    fn refusals_carry_the_servers_reason() {
        let res = b"HTTP/1.1 403 Forbidden\r\nContent-Length: 19\r\n\r\norigin not allowed\n";
        for cut in 0..res.len() {
            assert_eq!(
                parse_response(&res[..cut], "k", &[], false, false),
                Ok(None),
                "cut {cut}"
            );
        }
        let e = parse_response(res, "k", &[], false, false).unwrap_err();
        assert_eq!(
            e.to_string(),
            "server refused the upgrade: 403 Forbidden: origin not allowed"
        );
        let e = parse_response(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n", "k", &[], false, false).unwrap_err();
        assert_eq!(e.to_string(), "server refused the upgrade: 200 OK");
        // At end of stream, what came is what is shown.
        let e = parse_response(&res[..res.len() - 8], "k", &[], false, true).unwrap_err();
        assert_eq!(e.to_string(), "server refused the upgrade: 403 Forbidden: origin not");
        assert_eq!(parse_response(b"", "k", &[], false, true), Err(ResponseError::NoAnswer));
        assert_eq!(
            parse_response(b"HTTP/1.1 1", "k", &[], false, true),
            Err(ResponseError::CutShort)
        );
    }

    #[test]
    fn bad_request_parts_are_refused() {
        let mut r = ClientRequest::new("h", "/");
        r.headers = vec![("X-A".into(), "1\r\nX-B: 2".into())];
        assert_eq!(r.check(), Err(ClientRequestError::Header));
        let mut r = ClientRequest::new("h", "/");
        r.protocols = vec!["chat, evil".into()];
        assert_eq!(r.check(), Err(ClientRequestError::Subprotocol));
        assert_eq!(
            ClientRequest::new("h", "/a b").check(),
            Err(ClientRequestError::HostOrPath)
        );
        assert!(ClientRequest::new("h", "/ok?x=%20").check().is_ok());
    }
}
