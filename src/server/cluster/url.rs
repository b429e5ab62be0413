//! Where the Redis server is: `redis://[[user]:password@]host[:port][/db]`, and `rediss://`
//! for TLS (feature `tls`).

use std::fmt;
use std::str::FromStr;

/// A Redis server's address and credentials, parsed from a `redis://` or `rediss://` URL.
///
/// ```
/// # #[cfg(feature = "cluster")] {
/// let url: wsloop::server::RedisUrl = "redis://:s%40cret@10.0.0.5:6380/2".parse()?;
/// assert_eq!((url.host(), url.port(), url.db()), ("10.0.0.5", 6380, 2));
/// assert_eq!(url.password(), Some("s@cret"));
/// // The password never shows when the URL is printed.
/// assert_eq!(url.to_string(), "redis://:***@10.0.0.5:6380/2");
/// # }
/// # Ok::<(), wsloop::server::ClusterUrlError>(())
/// ```
#[derive(Clone, PartialEq, Eq)]
pub struct RedisUrl {
    tls: bool,
    host: String,
    port: u16,
    user: Option<String>,
    password: Option<String>,
    db: u32,
}

/// Why a Redis URL was refused.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum ClusterUrlError {
    /// The URL does not start with `redis://` or `rediss://` (the scheme it has, if any).
    Scheme(String),
    /// `rediss://` in a build without the `tls` feature.
    TlsNotBuilt,
    /// No host between `//` (or `@`) and the port or path.
    MissingHost,
    /// An IPv6 address opened with `[` and not closed, or a host with characters no host has.
    BadHost(String),
    /// The port is not a number from 1 to 65535.
    BadPort(String),
    /// The path is not a database number (`/0`, `/1`, ...).
    BadDb(String),
    /// A `%` not followed by two hex digits, or an escape that does not decode to UTF-8, in the
    /// user or password.
    BadEscape,
    /// A query (`?...`) or fragment (`#...`): none is understood.
    Query(String),
}

impl fmt::Display for ClusterUrlError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ClusterUrlError::Scheme(s) => {
                write!(
                    f,
                    "not a Redis URL: '{s}' (expected redis://[[user]:password@]host[:port][/db] or rediss://...)"
                )
            }
            ClusterUrlError::TlsNotBuilt => {
                f.write_str("rediss:// needs TLS, and this build has no TLS (the `tls` feature)")
            }
            ClusterUrlError::MissingHost => f.write_str("the Redis URL has no host"),
            ClusterUrlError::BadHost(h) => write!(f, "the Redis URL's host '{h}' is not a host name or address"),
            ClusterUrlError::BadPort(p) => write!(f, "the Redis URL's port '{p}' is not a number from 1 to 65535"),
            ClusterUrlError::BadDb(d) => write!(f, "the Redis URL's path '/{d}' is not a database number"),
            ClusterUrlError::BadEscape => {
                f.write_str("the Redis URL's user or password has a bad %-escape (% then two hex digits, UTF-8)")
            }
            ClusterUrlError::Query(q) => {
                write!(f, "the Redis URL has a query or fragment '{q}', which is not supported")
            }
        }
    }
}

impl std::error::Error for ClusterUrlError {}

/// The port Redis listens on unless told otherwise.
const DEFAULT_PORT: u16 = 6379;

impl RedisUrl {
    /// Parses a URL (see the type's documentation).
    pub fn parse(url: &str) -> Result<RedisUrl, ClusterUrlError> {
        let (tls, rest) = if let Some(r) = strip_prefix_ignore_case(url, "redis://") {
            (false, r)
        } else if let Some(r) = strip_prefix_ignore_case(url, "rediss://") {
            if !cfg!(feature = "tls") {
                return Err(ClusterUrlError::TlsNotBuilt);
            }
            (true, r)
        } else {
            // Only the scheme: the rest may hold a password.
            let scheme = url.split_once("://").map_or("", |(s, _)| s);
            return Err(ClusterUrlError::Scheme(scheme.chars().take(32).collect()));
        };
        if let Some(i) = rest.find(['?', '#']) {
            return Err(ClusterUrlError::Query(rest[i..].chars().take(64).collect()));
        }
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i + 1..]),
            None => (rest, ""),
        };
        let (userinfo, hostport) = match authority.rfind('@') {
            Some(i) => (Some(&authority[..i]), &authority[i + 1..]),
            None => (None, authority),
        };
        let (user, password) = match userinfo {
            None => (None, None),
            Some(info) => match info.split_once(':') {
                Some((u, p)) => (non_empty(decode(u)?), Some(decode(p)?)),
                // `redis://secret@host`: a lone userinfo is the password, as redis-cli reads it.
                None => (None, Some(decode(info)?)),
            },
        };
        let (host, port) = split_host_port(hostport)?;
        let db = match path {
            "" => 0,
            d => d
                .parse::<u32>()
                .map_err(|_| ClusterUrlError::BadDb(d.chars().take(64).collect()))?,
        };
        Ok(RedisUrl {
            tls,
            host,
            port,
            user,
            password,
            db,
        })
    }

    /// The host: a name, an IPv4 address, or an IPv6 address (without brackets).
    pub fn host(&self) -> &str {
        &self.host
    }

    /// The port (6379 unless given).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The database number (0 unless given); SELECTed after connecting.
    pub fn db(&self) -> u32 {
        self.db
    }

    /// The user for `AUTH user password` (Redis 6 ACLs), if any.
    pub fn user(&self) -> Option<&str> {
        self.user.as_deref()
    }

    /// The password, if any (`AUTH password`, or with the user).
    pub fn password(&self) -> Option<&str> {
        self.password.as_deref()
    }

    /// Whether the connection is made over TLS (`rediss://`).
    pub fn is_tls(&self) -> bool {
        self.tls
    }

    /// `host:port`, with brackets around an IPv6 address (for messages and connecting).
    pub fn authority(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }
}

impl FromStr for RedisUrl {
    type Err = ClusterUrlError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        RedisUrl::parse(s)
    }
}

impl fmt::Display for RedisUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(if self.tls { "rediss://" } else { "redis://" })?;
        match (&self.user, &self.password) {
            (Some(u), Some(_)) => write!(f, "{u}:***@")?,
            (None, Some(_)) => f.write_str(":***@")?,
            (Some(u), None) => write!(f, "{u}@")?,
            (None, None) => {}
        }
        f.write_str(&self.authority())?;
        if self.db != 0 {
            write!(f, "/{}", self.db)?;
        }
        Ok(())
    }
}

impl fmt::Debug for RedisUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "RedisUrl({self})")
    }
}

fn strip_prefix_ignore_case<'a>(s: &'a str, prefix: &str) -> Option<&'a str> {
    let head = s.get(..prefix.len())?;
    head.eq_ignore_ascii_case(prefix).then(|| &s[prefix.len()..])
}

fn non_empty(s: String) -> Option<String> {
    (!s.is_empty()).then_some(s)
}

/// Percent-decodes a user or password.
fn decode(s: &str) -> Result<String, ClusterUrlError> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = b.get(i + 1..i + 3).ok_or(ClusterUrlError::BadEscape)?;
            let hex = std::str::from_utf8(hex).map_err(|_| ClusterUrlError::BadEscape)?;
            if !hex.bytes().all(|c| c.is_ascii_hexdigit()) {
                return Err(ClusterUrlError::BadEscape);
            }
            out.push(u8::from_str_radix(hex, 16).map_err(|_| ClusterUrlError::BadEscape)?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| ClusterUrlError::BadEscape)
}

fn split_host_port(hostport: &str) -> Result<(String, u16), ClusterUrlError> {
    let (host, port) = if let Some(rest) = hostport.strip_prefix('[') {
        let end = rest
            .find(']')
            .ok_or_else(|| ClusterUrlError::BadHost(hostport.to_string()))?;
        let host = &rest[..end];
        if host.parse::<std::net::Ipv6Addr>().is_err() {
            return Err(ClusterUrlError::BadHost(host.to_string()));
        }
        let after = &rest[end + 1..];
        let port = match after.strip_prefix(':') {
            Some(p) => Some(p),
            None if after.is_empty() => None,
            None => return Err(ClusterUrlError::BadHost(hostport.to_string())),
        };
        (host, port)
    } else {
        match hostport.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (hostport, None),
        }
    };
    if host.is_empty() {
        return Err(ClusterUrlError::MissingHost);
    }
    if !hostport.starts_with('[')
        && !host
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'.' | b'-' | b'_'))
    {
        return Err(ClusterUrlError::BadHost(host.chars().take(64).collect()));
    }
    let port = match port {
        None => DEFAULT_PORT,
        Some(p) => match p.parse::<u16>() {
            Ok(n) if n != 0 && p.bytes().all(|c| c.is_ascii_digit()) => n,
            _ => return Err(ClusterUrlError::BadPort(p.chars().take(16).collect())),
        },
    };
    Ok((host.to_string(), port))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(s: &str) -> RedisUrl {
        RedisUrl::parse(s).unwrap_or_else(|e| panic!("{s}: {e}"))
    }

    #[test]
    fn the_parts_of_a_url() {
        let u = ok("redis://127.0.0.1");
        assert_eq!(
            (u.host(), u.port(), u.db(), u.user(), u.password()),
            ("127.0.0.1", 6379, 0, None, None)
        );
        assert!(!u.is_tls());
        let u = ok("redis://localhost:6380/3");
        assert_eq!((u.host(), u.port(), u.db()), ("localhost", 6380, 3));
        let u = ok("redis://alice:p%40ss%3Aw0rd@redis.example:7000/");
        assert_eq!((u.user(), u.password()), (Some("alice"), Some("p@ss:w0rd")));
        assert_eq!((u.host(), u.port(), u.db()), ("redis.example", 7000, 0));
        let u = ok("redis://:secret@h");
        assert_eq!((u.user(), u.password()), (None, Some("secret")));
        let u = ok("redis://secret@h");
        assert_eq!((u.user(), u.password()), (None, Some("secret")));
        let u = ok("redis://[::1]:6390/15");
        assert_eq!((u.host(), u.port(), u.db()), ("::1", 6390, 15));
        assert_eq!(u.authority(), "[::1]:6390");
        let u = ok("REDIS://[fe80::1]");
        assert_eq!((u.host(), u.port()), ("fe80::1", 6379));
        // An '@' in the password, unescaped, still splits at the last one.
        let u = ok("redis://u:a@b@h:1");
        assert_eq!((u.user(), u.password(), u.host()), (Some("u"), Some("a@b"), "h"));
        let u = ok("redis://%E2%9C%93:x@h");
        assert_eq!(u.user(), Some("✓"));
    }

    #[test]
    fn display_hides_the_password() {
        assert_eq!(ok("redis://alice:hunter2@h:1/2").to_string(), "redis://alice:***@h:1/2");
        assert_eq!(ok("redis://:hunter2@h").to_string(), "redis://:***@h:6379");
        assert_eq!(ok("redis://h").to_string(), "redis://h:6379");
        assert_eq!(ok("redis://[::1]").to_string(), "redis://[::1]:6379");
        assert!(!format!("{:?}", ok("redis://a:hunter2@h")).contains("hunter2"));
    }

    #[test]
    fn bad_urls_say_what_is_wrong() {
        let e = |s: &str| RedisUrl::parse(s).unwrap_err();
        assert_eq!(e("http://h"), ClusterUrlError::Scheme("http".into()));
        assert_eq!(e("h:6379"), ClusterUrlError::Scheme("".into()));
        // The password in a mistyped URL does not reach the message.
        assert!(!e("redis:/u:hunter2@h").to_string().contains("hunter2"));
        assert!(!e("http://u:hunter2@h").to_string().contains("hunter2"));
        assert_eq!(e("redis://"), ClusterUrlError::MissingHost);
        assert_eq!(e("redis://:pw@:6379"), ClusterUrlError::MissingHost);
        assert_eq!(e("redis://h:0"), ClusterUrlError::BadPort("0".into()));
        assert_eq!(e("redis://h:65536"), ClusterUrlError::BadPort("65536".into()));
        assert_eq!(e("redis://h:+1"), ClusterUrlError::BadPort("+1".into()));
        assert_eq!(e("redis://h:"), ClusterUrlError::BadPort("".into()));
        assert_eq!(e("redis://h/x"), ClusterUrlError::BadDb("x".into()));
        assert_eq!(e("redis://h/-1"), ClusterUrlError::BadDb("-1".into()));
        assert_eq!(e("redis://h/1/2"), ClusterUrlError::BadDb("1/2".into()));
        assert_eq!(e("redis://a:%zz@h"), ClusterUrlError::BadEscape);
        assert_eq!(e("redis://a:%4@h"), ClusterUrlError::BadEscape);
        assert_eq!(e("redis://a:%ff@h"), ClusterUrlError::BadEscape);
        assert!(matches!(e("redis://[::1"), ClusterUrlError::BadHost(_)));
        assert!(matches!(e("redis://[nope]:1"), ClusterUrlError::BadHost(_)));
        assert!(matches!(e("redis://[::1]x"), ClusterUrlError::BadHost(_)));
        assert!(matches!(e("redis://::1"), ClusterUrlError::BadHost(_)));
        assert!(matches!(e("redis://h o"), ClusterUrlError::BadHost(_)));
        assert!(matches!(e("redis://h?db=1"), ClusterUrlError::Query(_)));
        assert!(e("ftp://x").to_string().contains("not a Redis URL"));
        assert!(e("redis://h:99999").to_string().contains("from 1 to 65535"));
    }

    #[test]
    fn rediss_needs_the_tls_feature() {
        let r = RedisUrl::parse("rediss://:pw@cache.example:6380");
        if cfg!(feature = "tls") {
            let u = r.unwrap();
            assert!(u.is_tls());
            assert_eq!(u.to_string(), "rediss://:***@cache.example:6380");
        } else {
            assert_eq!(r.unwrap_err(), ClusterUrlError::TlsNotBuilt);
        }
    }
}
