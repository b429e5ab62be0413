//! `ws://` URLs: the one parser, shared by the client and the load generator.

/// A URL this crate cannot use, and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UrlError {
    /// The URL as given.
    pub url: String,
    /// What is wrong with it.
    pub why: &'static str,
}

impl std::fmt::Display for UrlError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "cannot use URL '{}': {}", self.url, self.why)
    }
}

impl std::error::Error for UrlError {}

/// Where a `ws://` URL points: the one URL parser, shared by the client and the load generator.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct WsUrl {
    /// Host name or address, without IPv6 brackets.
    pub(crate) host: String,
    pub(crate) port: u16,
    /// Path and query, starting with `/`.
    pub(crate) resource: String,
    /// A `wss://` URL: TLS over TCP.
    pub(crate) tls: bool,
}

impl WsUrl {
    /// Parses `ws[s]://host[:port][/path][?query]`; IPv6 addresses go in brackets.
    pub(crate) fn parse(url: &str) -> Result<WsUrl, UrlError> {
        let bad = |why| UrlError {
            url: url.to_string(),
            why,
        };
        let (scheme, rest) = url.split_once("://").ok_or(bad("it must start with ws://"))?;
        let tls = scheme.eq_ignore_ascii_case("wss");
        if tls && !cfg!(feature = "tls") {
            return Err(bad(
                "TLS (wss://) is not supported by this build (feature tls); use ws://",
            ));
        }
        if !tls && !scheme.eq_ignore_ascii_case("ws") {
            return Err(bad("only ws:// and wss:// URLs are supported"));
        }
        if rest.contains('#') {
            return Err(bad("a WebSocket URL cannot have a #fragment"));
        }
        let split = rest.find(['/', '?']).unwrap_or(rest.len());
        let (authority, resource) = rest.split_at(split);
        if authority.contains('@') {
            return Err(bad("user names and passwords in the URL are not supported"));
        }
        let (host, port) = if let Some(bracketed) = authority.strip_prefix('[') {
            let (addr, after) = bracketed.split_once(']').ok_or(bad("unclosed [ in the host"))?;
            if addr.parse::<std::net::Ipv6Addr>().is_err() {
                return Err(bad("invalid IPv6 address in brackets"));
            }
            let port = match after {
                "" => None,
                p => Some(p.strip_prefix(':').ok_or(bad("unexpected text after ]"))?),
            };
            (addr, port)
        } else {
            match authority.rsplit_once(':') {
                Some((h, p)) => (h, Some(p)),
                None => (authority, None),
            }
        };
        if host.is_empty() {
            return Err(bad("no host"));
        }
        let host_ok = host.bytes().all(|b| b.is_ascii_alphanumeric() || b"-._:".contains(&b));
        if !host_ok || (host.contains(':') && !authority.starts_with('[')) {
            return Err(bad("invalid host (IPv6 addresses go in brackets: ws://[::1]:9001/)"));
        }
        let port = match port {
            None if tls => 443,
            None => 80,
            Some(p) => match p.parse::<u16>() {
                Ok(n) if n > 0 && p.bytes().all(|b| b.is_ascii_digit()) => n,
                _ => return Err(bad("invalid port (1 to 65535)")),
            },
        };
        if !resource.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(bad(
                "the path must be printable ASCII without spaces (percent-encode the rest)",
            ));
        }
        let resource = match resource.chars().next() {
            None => "/".to_string(),
            Some('?') => format!("/{resource}"),
            Some(_) => resource.to_string(),
        };
        Ok(WsUrl {
            host: host.to_string(),
            port,
            resource,
            tls,
        })
    }

    /// The `Host` header value: the port is left out when it is the default.
    pub(crate) fn host_header(&self) -> String {
        let host = if self.host.contains(':') {
            format!("[{}]", self.host)
        } else {
            self.host.clone()
        };
        if self.port == if self.tls { 443 } else { 80 } {
            host
        } else {
            format!("{host}:{}", self.port)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target(url: &str) -> WsUrl {
        WsUrl::parse(url).unwrap_or_else(|e| panic!("{url}: {e}"))
    }

    fn why(url: &str) -> String {
        WsUrl::parse(url).unwrap_err().to_string()
    }

    #[test]
    fn parses_urls() {
        let t = target("ws://127.0.0.1:9001/");
        assert_eq!((t.host.as_str(), t.port, t.resource.as_str()), ("127.0.0.1", 9001, "/"));
        assert_eq!(t.host_header(), "127.0.0.1:9001");
        let t = target("ws://example.com");
        assert_eq!((t.host.as_str(), t.port, t.resource.as_str()), ("example.com", 80, "/"));
        assert_eq!(t.host_header(), "example.com");
        let t = target("WS://[::1]:8080/chat?room=1&x=%20");
        assert_eq!(
            (t.host.as_str(), t.port, t.resource.as_str()),
            ("::1", 8080, "/chat?room=1&x=%20")
        );
        assert_eq!(t.host_header(), "[::1]:8080");
        let t = target("ws://[::1]");
        assert_eq!((t.port, t.host_header().as_str()), (80, "[::1]"));
        let t = target("ws://h:1?q");
        assert_eq!(t.resource, "/?q");
        assert!(!t.tls);
        if cfg!(feature = "tls") {
            let t = target("WSS://example.com/x");
            assert_eq!((t.port, t.tls, t.host_header().as_str()), (443, true, "example.com"));
            assert_eq!(target("wss://h:80/").host_header(), "h:80");
        }
    }

    #[test]
    fn refuses_bad_urls() {
        if !cfg!(feature = "tls") {
            assert!(why("wss://example.com/").contains("TLS (wss://) is not supported"));
        }
        assert!(why("http://example.com/").contains("only ws:// and wss://"));
        assert!(why("example.com:9001").contains("must start with ws://"));
        assert!(why("ws://h/#frag").contains("fragment"));
        assert!(why("ws://u:p@h/").contains("user names"));
        assert!(why("ws://:9001/").contains("no host"));
        assert!(why("ws://::1/").contains("brackets"));
        assert!(why("ws://[::1/").contains("unclosed"));
        assert!(why("ws://[nope]/").contains("IPv6"));
        assert!(why("ws://[::1]x/").contains("after ]"));
        for port in ["0", "65536", "", "+1", "x"] {
            assert!(why(&format!("ws://h:{port}/")).contains("port"), "{port}");
        }
        assert!(why("ws://h/a b").contains("printable"));
        assert!(why("ws://h/é").contains("printable"));
        assert!(why("ws://h\r\nX: y/").contains("invalid host"));
    }
}
