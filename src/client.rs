//! The client: one connection on its own mio poll loop, on the same sans-IO core as the server.
//!
//! [`Client::connect`] parses a `ws://` URL, resolves the host, connects without blocking,
//! performs the opening handshake and returns an open client. The program then sends with
//! [`send_text`](Client::send_text) and friends and takes what happened from
//! [`next_event`](Client::next_event), which waits in `poll` for the socket, a watched descriptor
//! or the next deadline (the program's timer, the close timeout, the caller's timeout), whichever
//! comes first. Nothing sleeps, spins or runs on another thread.
//!
//! ```no_run
//! use std::time::Duration;
//! use wsloop::client::{Client, ClientConfig, ClientEvent};
//!
//! let mut client = Client::connect("ws://127.0.0.1:9001/", ClientConfig::default())?;
//! client.send_text("how are you?")?;
//! client.set_timer(Duration::from_secs(2));
//! loop {
//!     match client.next_event(None)? {
//!         Some(ClientEvent::Text(text)) => println!("{text}"),
//!         Some(ClientEvent::Timer) => {
//!             client.send_text("how are you?")?;
//!             client.set_timer(Duration::from_secs(2));
//!         }
//!         Some(ClientEvent::Closed { code, reason }) => {
//!             println!("closed: {code} {reason}");
//!             break;
//!         }
//!         _ => {}
//!     }
//! }
//! # Ok::<(), wsloop::client::ClientError>(())
//! ```
//!
//! Pings are answered, fragments reassembled, text checked to be UTF-8 and every frame masked
//! with a fresh key by [`Connection`], exactly as on the server. What the client adds is the
//! transport: the TCP connection, the handshake exchange, unsent bytes, and the close timeout.
//!
//! Not supported: TLS (`wss://`), proxies, redirects, extensions (permessage-deflate).

use std::collections::VecDeque;
use std::io::{self, Read};
use std::net::{Ipv6Addr, Shutdown, SocketAddr, ToSocketAddrs};
use std::os::fd::RawFd;
use std::time::Duration;

use mio::net::TcpStream;
use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token};

use crate::outbox::{write_some, Outbox};
use crate::proto::frame::{write_frame, OpCode};
use crate::proto::handshake::{self, ResponseError};
use crate::proto::mask::new_mask_key;
use crate::proto::{close_code, Connection, Event, HeadError, Message, ProtocolError, Role, State};
use crate::timer::{millis, poll_timeout, Clock, TimerQueue};

/// Client settings. Every limit has a default; see each field.
#[derive(Clone, Debug)]
pub struct ClientConfig {
    /// Time allowed for the TCP connect and the opening handshake together (default 10 s).
    /// Resolving a host name comes before and is bounded by the system resolver only.
    pub connect_timeout: Duration,
    /// Largest message accepted, in bytes (default 16 MiB); a larger one closes with `1009`.
    pub max_message: usize,
    /// How long to wait for the server's close frame after ours, and for the server to end the
    /// TCP connection after the close handshake (default 3 s).
    pub close_timeout: Duration,
    /// Unsent bytes above which the client stops reading from the server until they drain
    /// (default 1 MiB). Sending never blocks: see [`Client::buffered_amount`].
    pub max_backpressure: usize,
    /// Size of the read buffer (default 64 KiB).
    pub read_buffer_size: usize,
    /// Subprotocols to offer, in order of preference (default none).
    pub protocols: Vec<String>,
    /// Extra request headers, e.g. `("Origin", "http://localhost")` (default none).
    pub headers: Vec<(String, String)>,
}

impl Default for ClientConfig {
    fn default() -> Self {
        ClientConfig {
            connect_timeout: Duration::from_secs(10),
            max_message: 16 << 20,
            close_timeout: Duration::from_secs(3),
            max_backpressure: 1 << 20,
            read_buffer_size: 64 << 10,
            protocols: Vec::new(),
            headers: Vec::new(),
        }
    }
}

/// Something that happened on the connection, in the order it happened.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ClientEvent {
    /// A text message.
    Text(String),
    /// A binary message.
    Binary(Vec<u8>),
    /// A pong (the answer to [`Client::ping`], or an unsolicited heartbeat).
    Pong(Vec<u8>),
    /// The timer set with [`Client::set_timer`] came due.
    Timer,
    /// A descriptor registered with [`Client::watch`] became readable.
    Readable(RawFd),
    /// The close handshake is complete and the connection is over. `code` is the server's close
    /// code (`1005` when its close frame had none). The last event.
    Closed {
        /// The server's close code.
        code: u16,
        /// The server's reason text.
        reason: String,
    },
}

/// Why connecting failed or the connection ended badly.
#[derive(Debug)]
#[non_exhaustive]
pub enum ClientError {
    /// The URL is not one this client can use.
    InvalidUrl {
        /// The URL as given.
        url: String,
        /// What is wrong with it.
        why: &'static str,
    },
    /// A configured subprotocol or header cannot be sent.
    InvalidConfig(String),
    /// The host name did not resolve.
    Resolve {
        /// The host name.
        host: String,
        /// The resolver's error.
        error: io::Error,
    },
    /// Nothing listens at the address.
    Refused(SocketAddr),
    /// The TCP connect failed for another reason.
    Connect {
        /// The address tried.
        addr: SocketAddr,
        /// The error.
        error: io::Error,
    },
    /// The TCP connect or the handshake did not finish within the connect timeout.
    Timeout {
        /// The address tried.
        addr: SocketAddr,
        /// The timeout.
        after: Duration,
        /// The TCP connection was made and the handshake answer is what did not come.
        handshake: bool,
    },
    /// The server answered the handshake with something other than an accepted upgrade.
    Handshake(ResponseError),
    /// The handshake answer was cut short or too long.
    HandshakeFailed(&'static str),
    /// The server broke the protocol; this client sent a close frame with the error's code.
    Protocol(ProtocolError),
    /// The connection ended without a close handshake (close code 1006).
    Abnormal(String),
    /// The connection is closing or closed: nothing more can be sent.
    NotOpen,
    /// Another I/O error.
    Io(io::Error),
}

impl std::fmt::Display for ClientError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ClientError::InvalidUrl { url, why } => write!(f, "cannot use URL '{url}': {why}"),
            ClientError::InvalidConfig(why) => write!(f, "invalid client setting: {why}"),
            ClientError::Resolve { host, error } => write!(f, "cannot resolve host '{host}': {error}"),
            ClientError::Refused(addr) => write!(f, "connection refused to {addr}"),
            ClientError::Connect { addr, error } => write!(f, "cannot connect to {addr}: {error}"),
            ClientError::Timeout {
                addr,
                after,
                handshake: false,
            } => write!(f, "timed out connecting to {addr} after {after:?}"),
            ClientError::Timeout { addr, after, .. } => {
                write!(f, "no handshake answer from {addr} within {after:?}")
            }
            ClientError::Handshake(e) => write!(f, "{e}"),
            ClientError::HandshakeFailed(why) => write!(f, "handshake failed: {why}"),
            ClientError::Protocol(e) => {
                write!(f, "protocol error by the server: {} (closed with {})", e.reason, e.code)
            }
            ClientError::Abnormal(why) => write!(f, "connection closed abnormally (1006): {why}"),
            ClientError::NotOpen => f.write_str("the connection is not open"),
            ClientError::Io(e) => write!(f, "I/O error: {e}"),
        }
    }
}

impl std::error::Error for ClientError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            ClientError::Resolve { error, .. } | ClientError::Connect { error, .. } | ClientError::Io(error) => {
                Some(error)
            }
            ClientError::Handshake(e) => Some(e),
            ClientError::Protocol(e) => Some(e),
            _ => None,
        }
    }
}

impl From<io::Error> for ClientError {
    fn from(e: io::Error) -> Self {
        ClientError::Io(e)
    }
}

/// Where a `ws://` URL points: the one URL parser, shared by the client and the load generator.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct WsUrl {
    /// Host name or address, without IPv6 brackets.
    pub(crate) host: String,
    pub(crate) port: u16,
    /// Path and query, starting with `/`.
    pub(crate) resource: String,
}

impl WsUrl {
    /// Parses `ws://host[:port][/path][?query]`; IPv6 addresses go in brackets.
    pub(crate) fn parse(url: &str) -> Result<WsUrl, ClientError> {
        let bad = |why| ClientError::InvalidUrl {
            url: url.to_string(),
            why,
        };
        let (scheme, rest) = url.split_once("://").ok_or(bad("it must start with ws://"))?;
        if scheme.eq_ignore_ascii_case("wss") {
            return Err(bad("TLS (wss://) is not supported; use ws://"));
        }
        if !scheme.eq_ignore_ascii_case("ws") {
            return Err(bad("only ws:// URLs are supported"));
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
            if addr.parse::<Ipv6Addr>().is_err() {
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
        })
    }

    /// The `Host` header value: the port is left out when it is the default.
    pub(crate) fn host_header(&self) -> String {
        let host = if self.host.contains(':') {
            format!("[{}]", self.host)
        } else {
            self.host.clone()
        };
        if self.port == 80 {
            host
        } else {
            format!("{host}:{}", self.port)
        }
    }
}

/// Refuses subprotocols and headers that would break the request head.
fn check_request_parts(cfg: &ClientConfig) -> Result<(), ClientError> {
    fn is_token(s: &str) -> bool {
        !s.is_empty()
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
    }
    if let Some(p) = cfg.protocols.iter().find(|p| !is_token(p)) {
        return Err(ClientError::InvalidConfig(format!("invalid subprotocol name '{p}'")));
    }
    for (name, value) in &cfg.headers {
        if !is_token(name) || value.bytes().any(|b| b == b'\r' || b == b'\n' || b == 0) {
            return Err(ClientError::InvalidConfig(format!("invalid header '{name}: {value}'")));
        }
    }
    Ok(())
}

/// The connection's socket.
const SOCKET: Token = Token(0);
/// Watched descriptors use tokens from here up (token = base + fd).
const FD_BASE: usize = 16;
/// Timer heap keys.
const USER_TIMER: usize = 0;
const CLOSE_TIMER: usize = 1;
/// Largest handshake answer head.
const MAX_RESPONSE_HEAD: usize = 16 << 10;
/// A send buffer up to this size is kept for the next send.
const SCRATCH_KEEP: usize = 64 << 10;

/// The socket and what waits to be written to it.
#[derive(Debug)]
struct Wire {
    stream: TcpStream,
    out: Outbox,
    /// Registered for WRITABLE (only while `out` holds bytes).
    write_interest: bool,
    /// A read or write failed; nothing more is written.
    error: Option<io::Error>,
}

impl Wire {
    /// Writes what the kernel takes now; returns the bytes it did not take.
    fn write_now(&mut self, bytes: &[u8]) -> usize {
        if self.error.is_some() {
            return 0;
        }
        if self.out.len() > 0 {
            return 0;
        }
        match write_some(&mut self.stream, bytes) {
            Ok(n) => n,
            Err(e) => {
                self.error = Some(e);
                bytes.len()
            }
        }
    }

    /// Sends a copy of `bytes` (queuing what the kernel does not take).
    fn send(&mut self, bytes: &[u8]) {
        let n = self.write_now(bytes);
        if n < bytes.len() && self.error.is_none() {
            self.out.push_slice(&bytes[n..]);
        }
    }

    /// Sends `bytes`, moving them into the queue if the kernel does not take them all.
    /// Gives the buffer back when everything went out.
    fn send_vec(&mut self, bytes: Vec<u8>) -> Option<Vec<u8>> {
        let n = self.write_now(&bytes);
        if n < bytes.len() && self.error.is_none() {
            self.out.push_vec(bytes, n);
            return None;
        }
        Some(bytes)
    }

    /// Writes queued bytes after a writable event.
    fn flush(&mut self) {
        if self.error.is_some() || self.out.len() == 0 {
            return;
        }
        if let Err(e) = self.out.write_to(&mut self.stream) {
            self.error = Some(e);
            self.out.clear();
        }
    }

    /// Registers for WRITABLE exactly while bytes wait.
    fn sync_interest(&mut self, registry: &mio::Registry) -> io::Result<()> {
        let want = self.out.len() > 0;
        if want != self.write_interest {
            let interest = if want {
                Interest::READABLE | Interest::WRITABLE
            } else {
                Interest::READABLE
            };
            registry.reregister(&mut self.stream, SOCKET, interest)?;
            self.write_interest = want;
        }
        Ok(())
    }
}

/// An open WebSocket connection to a server. See the [module docs](self).
///
/// Sending never blocks: bytes the kernel does not take at once wait in a queue that
/// [`next_event`](Self::next_event) writes out. Call `next_event` until it returns
/// [`ClientEvent::Closed`] or an error; dropping a client ends the TCP connection at once
/// (the server sees `1006`).
pub struct Client {
    poll: Poll,
    events: Events,
    wire: Wire,
    peer: SocketAddr,
    conn: Connection,
    cfg: ClientConfig,
    protocol: Option<String>,
    rbuf: Vec<u8>,
    scratch: Vec<u8>,
    /// The socket may have unread bytes (readiness is edge-triggered).
    want_read: bool,
    /// The server ended its side of the TCP connection.
    read_closed: bool,
    /// Protocol output (pongs, close frames) from the last read, handed to the socket (up to
    /// `held_sent`) only as the events before it are handed out: the program's answers to those
    /// events then go out where they would have gone had it answered at once (an echo before the
    /// close frame that a later protocol error caused).
    held: Vec<u8>,
    held_sent: usize,
    /// Received events not yet handed out, each with its position in `held`.
    pending: VecDeque<(ClientEvent, usize)>,
    /// The last event handed out arrived while the connection was open and the program has not
    /// closed it since: answers to it may still be sent even if the server has closed since.
    reply_ok: bool,
    /// The program called [`close`](Self::close).
    user_closed: bool,
    clock: Clock,
    timers: TimerQueue,
    /// The program's timer: deadline and generation.
    user_timer: Option<(u64, u32)>,
    timer_gen: u32,
    /// When the close handshake (or the wait for the server's FIN) gives up.
    close_deadline: Option<u64>,
    /// The server's close frame.
    peer_close: Option<(u16, String)>,
    /// The protocol error this client closed for.
    failure: Option<ProtocolError>,
    /// The last event or error was handed out.
    finished: bool,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("peer", &self.peer)
            .field("state", &self.conn.state())
            .field("buffered", &self.wire.out.len())
            .finish_non_exhaustive()
    }
}

impl Client {
    /// Connects to `url` (`ws://host[:port][/path][?query]`) and completes the opening handshake.
    ///
    /// Blocks until the handshake is done or [`connect_timeout`](ClientConfig::connect_timeout)
    /// passes. A host name is resolved now; its addresses are tried in turn until one accepts.
    pub fn connect(url: &str, cfg: ClientConfig) -> Result<Client, ClientError> {
        let target = WsUrl::parse(url)?;
        check_request_parts(&cfg)?;
        let addrs: Vec<SocketAddr> = (target.host.as_str(), target.port)
            .to_socket_addrs()
            .map_err(|error| ClientError::Resolve {
                host: target.host.clone(),
                error,
            })?
            .collect();
        let clock = Clock::new();
        let deadline = millis(cfg.connect_timeout);
        let mut poll = Poll::new()?;
        let mut events = Events::with_capacity(64);
        let mut last_error = None;
        let mut connected = None;
        for addr in addrs {
            match connect_tcp(&mut poll, &mut events, &clock, deadline, addr, cfg.connect_timeout) {
                Ok(stream) => {
                    connected = Some((stream, addr));
                    break;
                }
                Err(e @ ClientError::Timeout { .. }) => return Err(e),
                Err(e) => last_error = Some(e),
            }
        }
        let Some((stream, peer)) = connected else {
            return Err(last_error.unwrap_or_else(|| ClientError::Resolve {
                host: target.host.clone(),
                error: io::Error::new(io::ErrorKind::NotFound, "no addresses"),
            }));
        };
        let _ = stream.set_nodelay(true);
        let mut client = Client {
            poll,
            events,
            wire: Wire {
                stream,
                out: Outbox::default(),
                write_interest: true,
                error: None,
            },
            peer,
            conn: Connection::new(Role::Client),
            rbuf: vec![0; cfg.read_buffer_size.max(256)],
            cfg,
            protocol: None,
            scratch: Vec::new(),
            want_read: true,
            read_closed: false,
            held: Vec::new(),
            held_sent: 0,
            pending: VecDeque::new(),
            reply_ok: false,
            user_closed: false,
            clock,
            timers: TimerQueue::default(),
            user_timer: None,
            timer_gen: 0,
            close_deadline: None,
            peer_close: None,
            failure: None,
            finished: false,
        };
        client.handshake(&target, deadline)?;
        Ok(client)
    }

    /// Sends the upgrade request and reads the answer; leftover bytes are the first frames.
    fn handshake(&mut self, target: &WsUrl, deadline: u64) -> Result<(), ClientError> {
        let key = handshake::new_client_key()?;
        let mut request = Vec::new();
        handshake::write_request(
            &mut request,
            &target.host_header(),
            &target.resource,
            &key,
            &self.cfg.protocols,
            &self.cfg.headers,
        );
        self.wire.send(&request);
        let timeout = ClientError::Timeout {
            addr: self.peer,
            after: self.cfg.connect_timeout,
            handshake: true,
        };
        let failed = |e: io::Error| match e.kind() {
            io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe => {
                ClientError::HandshakeFailed("the server reset the connection")
            }
            _ => ClientError::Io(e),
        };
        let mut got_any = false;
        loop {
            if let Some(e) = self.wire.error.take() {
                return Err(failed(e));
            }
            if self.want_read {
                let n = self.read_socket();
                if let Some(e) = self.wire.error.take() {
                    return Err(failed(e));
                }
                if self.read_closed {
                    return Err(ClientError::HandshakeFailed(if got_any {
                        "the server closed the connection in the middle of its answer"
                    } else {
                        "the server closed the connection without answering"
                    }));
                }
                if n == 0 {
                    continue; // would block: wait below
                }
                got_any = true;
                let protocols = &self.cfg.protocols;
                let head = self.conn.read_head(&self.rbuf[..n], MAX_RESPONSE_HEAD, |b| {
                    handshake::parse_response(b, &key, protocols)
                });
                match head {
                    Ok(None) => continue,
                    Ok(Some((response, used))) => {
                        self.conn.set_open();
                        self.protocol = response.protocol;
                        log::debug!("{}: handshake done", self.peer);
                        if used < n {
                            self.receive(used, n);
                        }
                        return Ok(());
                    }
                    Err(HeadError::TooLarge) => {
                        return Err(ClientError::HandshakeFailed("the answer head is over 16 KiB"))
                    }
                    Err(HeadError::Invalid(e)) => return Err(ClientError::Handshake(e)),
                }
            }
            let now = self.clock.now();
            if now >= deadline {
                return Err(timeout);
            }
            self.wait(poll_timeout(now, Some(deadline)))?;
        }
    }

    /// Reads once into the read buffer; returns the byte count (0 when nothing is there now or
    /// the read side ended, see `read_closed`).
    fn read_socket(&mut self) -> usize {
        loop {
            match self.wire.stream.read(&mut self.rbuf) {
                Ok(0) => {
                    self.read_closed = true;
                    self.want_read = false;
                    return 0;
                }
                Ok(n) => return n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.want_read = false;
                    return 0;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    self.read_closed = true;
                    self.want_read = false;
                    self.wire.error.get_or_insert(e);
                    return 0;
                }
            }
        }
    }

    /// Feeds `rbuf[from..to]` to the protocol core and queues the events.
    fn receive(&mut self, from: usize, to: usize) {
        debug_assert!(self.pending.is_empty() && self.held.is_empty());
        let Client {
            conn,
            rbuf,
            held,
            pending,
            cfg,
            peer_close,
            ..
        } = self;
        let result = conn.receive(&mut rbuf[from..to], cfg.max_message, held, &mut |ev, out| {
            let at = out.len();
            match ev {
                Event::Message(Message::Text(t)) => pending.push_back((ClientEvent::Text(t.to_owned()), at)),
                Event::Message(Message::Binary(b)) => pending.push_back((ClientEvent::Binary(b.to_vec()), at)),
                Event::Pong(p) => pending.push_back((ClientEvent::Pong(p.to_vec()), at)),
                Event::Ping(_) => {} // the pong is already in `out`
                Event::Close { code, reason } => {
                    *peer_close = Some((code.unwrap_or(close_code::NO_STATUS), reason.to_owned()));
                }
            }
        });
        if let Err(e) = result {
            log::debug!("{}: protocol error: {e}", self.peer);
            self.failure = Some(e);
        }
        if self.conn.state() != State::Open {
            self.start_close_timer();
        }
    }

    /// Hands `held[held_sent..upto]` to the socket.
    fn release(&mut self, upto: usize) {
        if upto > self.held_sent {
            self.wire.send(&self.held[self.held_sent..upto]);
            self.held_sent = upto;
        }
        if self.held_sent >= self.held.len() && self.pending.is_empty() {
            self.held.clear();
            self.held_sent = 0;
        }
    }

    /// The loop-clock deadline `d` from now, never early: the clock reads whole milliseconds
    /// rounded down, so a non-zero wait is rounded up and given one millisecond more.
    fn after(&self, d: Duration) -> u64 {
        if d.is_zero() {
            return self.clock.now();
        }
        let ms = millis(d).saturating_add(u64::from(d.subsec_nanos() % 1_000_000 != 0));
        self.clock.now().saturating_add(ms).saturating_add(1)
    }

    fn start_close_timer(&mut self) {
        if self.close_deadline.is_none() {
            let when = self.after(self.cfg.close_timeout);
            self.close_deadline = Some(when);
            self.timers.push(when, CLOSE_TIMER, 0);
        }
    }

    /// Waits for readiness (at most `timeout`) and handles what the socket reports.
    fn wait(&mut self, timeout: Option<Duration>) -> Result<(), ClientError> {
        match self.poll.poll(&mut self.events, timeout) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => return Ok(()),
            Err(e) => return Err(e.into()),
        }
        for ev in self.events.iter() {
            match ev.token() {
                SOCKET => {
                    if ev.is_writable() {
                        self.wire.flush();
                    }
                    if ev.is_readable() || ev.is_read_closed() || ev.is_error() {
                        self.want_read = true;
                    }
                }
                Token(t) => {
                    if let Some(fd) = t.checked_sub(FD_BASE).and_then(|f| RawFd::try_from(f).ok()) {
                        let at = self.held.len();
                        self.pending.push_back((ClientEvent::Readable(fd), at));
                    }
                }
            }
        }
        self.wire.sync_interest(self.poll.registry())?;
        Ok(())
    }

    /// Waits for the next event, at most `timeout` (`None`: until something happens).
    ///
    /// Returns `Ok(None)` when the timeout passed with nothing to report. While waiting it writes
    /// queued bytes, answers pings, and keeps the close handshake going. The last event is
    /// [`ClientEvent::Closed`] (or an error); after it, this returns [`ClientError::NotOpen`].
    ///
    /// Messages received before the server closed (or broke the protocol) are still handed out,
    /// and may still be answered: the close frame goes out after those answers.
    pub fn next_event(&mut self, timeout: Option<Duration>) -> Result<Option<ClientEvent>, ClientError> {
        if self.finished {
            return Err(ClientError::NotOpen);
        }
        let until = timeout.map(|t| self.after(t));
        // Once the caller's time is up: one more look at the socket (so queued bytes still go
        // out when the caller only ever passes a zero timeout), then `None`.
        let (mut did_read, mut waited) = (false, false);
        loop {
            // Events already received come first, each after the protocol bytes that preceded it.
            if let Some((ev, at)) = self.pending.pop_front() {
                self.release(at);
                self.reply_ok = !self.user_closed && !matches!(ev, ClientEvent::Readable(_));
                self.wire.sync_interest(self.poll.registry())?;
                return Ok(Some(ev));
            }
            self.release(self.held.len());
            self.reply_ok = false;
            self.wire.sync_interest(self.poll.registry())?;

            let now = self.clock.now();
            while let Some((when, key, gen)) = self.timers.pop_due(now) {
                if key == USER_TIMER && self.user_timer == Some((when, gen)) {
                    self.user_timer = None;
                    return Ok(Some(ClientEvent::Timer));
                }
            }
            if let Some(end) = self.outcome(now) {
                self.finished = true;
                let _ = self.poll.registry().deregister(&mut self.wire.stream);
                let _ = self.wire.stream.shutdown(Shutdown::Both);
                return end.map(Some);
            }
            let expired = until.is_some_and(|u| now >= u);
            if self.want_read && self.wire.out.len() <= self.cfg.max_backpressure && !(expired && did_read) {
                let n = self.read_socket();
                if n > 0 {
                    self.receive(0, n);
                }
                did_read = true;
                continue;
            }
            if expired && waited {
                return Ok(None);
            }
            let mut deadline = self.timers.next();
            if let Some(until) = until {
                deadline = Some(deadline.map_or(until, |d| d.min(until)));
            }
            self.wait(poll_timeout(now, deadline))?;
            waited = true;
        }
    }

    /// How the connection ended, once it has.
    fn outcome(&mut self, now: u64) -> Option<Result<ClientEvent, ClientError>> {
        let transport_down = self.read_closed || self.wire.error.is_some();
        let timed_out = self.close_deadline.is_some_and(|d| now >= d);
        match self.conn.state() {
            State::Connecting | State::Open if !transport_down => None,
            State::Connecting | State::Open => Some(Err(ClientError::Abnormal(self.drop_reason()))),
            State::LocalClosing if transport_down => Some(Err(ClientError::Abnormal(match &self.wire.error {
                Some(e) => format!("connection error before the server answered the close: {e}"),
                None => "the server ended the connection without answering the close".to_string(),
            }))),
            State::LocalClosing if timed_out => Some(Err(ClientError::Abnormal(format!(
                "the server did not answer the close within {:?}",
                self.cfg.close_timeout
            )))),
            State::LocalClosing => None,
            State::Closed => {
                // The server closes the TCP connection first (RFC 6455 §7.1.1); wait for it
                // once our last bytes are out, but not beyond the close timeout.
                let flushed = self.wire.out.len() == 0 || self.wire.error.is_some();
                if !(timed_out || self.wire.error.is_some() || (self.read_closed && flushed)) {
                    return None;
                }
                if let Some(e) = self.failure.take() {
                    return Some(Err(ClientError::Protocol(e)));
                }
                Some(match self.peer_close.take() {
                    Some((code, reason)) => Ok(ClientEvent::Closed { code, reason }),
                    None => Err(ClientError::Abnormal(
                        "the connection ended without a close handshake".into(),
                    )),
                })
            }
        }
    }

    /// Why the TCP connection is gone, for an abnormal close.
    fn drop_reason(&self) -> String {
        match &self.wire.error {
            Some(e) => format!("connection error: {e}"),
            None if self.conn.is_buffering() => "the server dropped the connection mid-message".to_string(),
            None => "the server closed the TCP connection without a close frame".to_string(),
        }
    }

    /// Sends a text message.
    pub fn send_text(&mut self, text: &str) -> Result<(), ClientError> {
        self.send(Message::Text(text))
    }

    /// Sends a binary message.
    pub fn send_binary(&mut self, data: &[u8]) -> Result<(), ClientError> {
        self.send(Message::Binary(data))
    }

    /// Sends a message as one frame.
    pub fn send(&mut self, msg: Message<'_>) -> Result<(), ClientError> {
        self.send_frame(msg.opcode(), true, msg.as_bytes())
    }

    /// Sends one frame of a fragmented message: the first with [`OpCode::Text`] or
    /// [`OpCode::Binary`], the others with [`OpCode::Continuation`], the last with `fin` set.
    pub fn send_frame(&mut self, opcode: OpCode, fin: bool, payload: &[u8]) -> Result<(), ClientError> {
        if self.finished || opcode.is_control() {
            return Err(ClientError::NotOpen);
        }
        let mut buf = std::mem::take(&mut self.scratch);
        buf.clear();
        if self.conn.state() == State::Open {
            self.conn
                .send_frame(opcode, fin, payload, &mut buf)
                .map_err(|_| ClientError::NotOpen)?;
        } else if self.reply_ok {
            // An answer to a message that arrived before the server's close (or its protocol
            // error): it goes out ahead of our close frame, as if sent the moment it arrived.
            write_frame(&mut buf, fin, opcode, Some(new_mask_key()), payload);
        } else {
            self.scratch = buf;
            return Err(ClientError::NotOpen);
        }
        if let Some(back) = self.wire.send_vec(buf) {
            if back.capacity() <= SCRATCH_KEEP {
                self.scratch = back;
            }
        }
        self.wire.sync_interest(self.poll.registry())?;
        Ok(())
    }

    /// Sends a ping (payload truncated to 125 bytes); the answer arrives as [`ClientEvent::Pong`].
    pub fn ping(&mut self, payload: &[u8]) -> Result<(), ClientError> {
        self.control(|conn, out| conn.ping(payload, out))
    }

    /// Starts the close handshake with `code` (an invalid code is sent as 1000) and `reason`
    /// (truncated to 123 bytes). Keep calling [`next_event`](Self::next_event) until
    /// [`ClientEvent::Closed`]; messages that arrive meanwhile are dropped.
    pub fn close(&mut self, code: u16, reason: &str) -> Result<(), ClientError> {
        self.control(|conn, out| conn.close(code, reason, out))?;
        self.user_closed = true;
        self.reply_ok = false;
        self.start_close_timer();
        Ok(())
    }

    fn control(
        &mut self,
        f: impl FnOnce(&mut Connection, &mut Vec<u8>) -> Result<(), crate::proto::NotOpen>,
    ) -> Result<(), ClientError> {
        if self.finished {
            return Err(ClientError::NotOpen);
        }
        let mut buf = std::mem::take(&mut self.scratch);
        buf.clear();
        let result = f(&mut self.conn, &mut buf).map_err(|_| ClientError::NotOpen);
        self.wire.send(&buf);
        self.scratch = buf;
        self.wire.sync_interest(self.poll.registry())?;
        result
    }

    /// Makes [`next_event`](Self::next_event) return [`ClientEvent::Timer`] after `after`,
    /// replacing any earlier timer. For periodic work, set it again when it fires.
    pub fn set_timer(&mut self, after: Duration) {
        let when = self.after(after);
        self.timer_gen = self.timer_gen.wrapping_add(1);
        self.user_timer = Some((when, self.timer_gen));
        self.timers.push(when, USER_TIMER, self.timer_gen);
    }

    /// Makes [`next_event`](Self::next_event) also return [`ClientEvent::Readable`] when `fd`
    /// becomes readable (a pipe, a terminal, a socket; not a regular file, which epoll refuses).
    ///
    /// Readiness is edge-triggered: read from `fd` until it would block, or no new event comes.
    /// The caller keeps `fd` open while it is watched.
    pub fn watch(&mut self, fd: RawFd) -> io::Result<()> {
        let fd_index = usize::try_from(fd).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        self.poll
            .registry()
            .register(&mut SourceFd(&fd), Token(FD_BASE + fd_index), Interest::READABLE)
    }

    /// Stops watching `fd`.
    pub fn unwatch(&mut self, fd: RawFd) -> io::Result<()> {
        self.poll.registry().deregister(&mut SourceFd(&fd))
    }

    /// Whether messages can be sent (the handshake is done and no close has started).
    pub fn is_open(&self) -> bool {
        !self.finished && self.conn.state() == State::Open
    }

    /// Bytes sent but not yet taken by the kernel.
    pub fn buffered_amount(&self) -> usize {
        self.wire.out.len()
    }

    /// The subprotocol the server chose, if any.
    pub fn protocol(&self) -> Option<&str> {
        self.protocol.as_deref()
    }

    /// The server's address.
    pub fn peer_addr(&self) -> SocketAddr {
        self.peer
    }

    /// This end's address.
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.wire.stream.local_addr()
    }
}

/// Non-blocking connect to one address, waiting (at most until `deadline`) for it to finish.
fn connect_tcp(
    poll: &mut Poll,
    events: &mut Events,
    clock: &Clock,
    deadline: u64,
    addr: SocketAddr,
    timeout: Duration,
) -> Result<TcpStream, ClientError> {
    let failed = |error: io::Error| {
        if error.kind() == io::ErrorKind::ConnectionRefused {
            ClientError::Refused(addr)
        } else {
            ClientError::Connect { addr, error }
        }
    };
    let mut stream = TcpStream::connect(addr).map_err(failed)?;
    poll.registry()
        .register(&mut stream, SOCKET, Interest::READABLE | Interest::WRITABLE)?;
    loop {
        // mio's recipe: after a writable event, an error or a peer address says how it went.
        if let Some(e) = stream.take_error()? {
            let _ = poll.registry().deregister(&mut stream);
            return Err(failed(e));
        }
        match stream.peer_addr() {
            Ok(_) => return Ok(stream),
            Err(e) if e.kind() == io::ErrorKind::NotConnected || e.raw_os_error() == Some(libc::EINPROGRESS) => {}
            Err(e) => {
                let _ = poll.registry().deregister(&mut stream);
                return Err(failed(e));
            }
        }
        let now = clock.now();
        if now >= deadline {
            let _ = poll.registry().deregister(&mut stream);
            return Err(ClientError::Timeout {
                addr,
                after: timeout,
                handshake: false,
            });
        }
        match poll.poll(events, poll_timeout(now, Some(deadline))) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
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
    }

    #[test]
    fn refuses_bad_urls() {
        assert!(why("wss://example.com/").contains("TLS (wss://) is not supported"));
        assert!(why("http://example.com/").contains("only ws://"));
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

    #[test]
    fn refuses_header_injection() {
        let cfg = ClientConfig {
            headers: vec![("X-A".into(), "1\r\nX-B: 2".into())],
            ..ClientConfig::default()
        };
        assert!(check_request_parts(&cfg).is_err());
        let cfg = ClientConfig {
            protocols: vec!["chat, evil".into()],
            ..ClientConfig::default()
        };
        assert!(check_request_parts(&cfg).is_err());
        let cfg = ClientConfig {
            protocols: vec!["chat".into()],
            headers: vec![("Origin".into(), "http://localhost".into())],
            ..ClientConfig::default()
        };
        assert!(check_request_parts(&cfg).is_ok());
    }
}
