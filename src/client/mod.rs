//! The client: one outgoing connection with a pull API, a thin driver over the same core and
//! IO layer as the server.
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
//! Received bytes are handed to the protocol core one event at a time, as the program asks
//! for them: an answer the program sends to a message goes out before anything the core
//! writes for later bytes (the reply to a close frame that followed, or the close frame of a
//! protocol error), exactly as if it had been sent the moment the message arrived.
//!
//! `wss://` URLs need the `tls` feature; [`ClientConfig::tls`] says whom to trust.
//!
//! With the `deflate` feature the client offers permessage-deflate
//! (`proto::deflate::CLIENT_OFFER`) and accepts every valid answer, over `ws://` and `wss://`;
//! see `ClientConfig::deflate`.
//!
//! Not supported: proxies, redirects, extensions other than permessage-deflate.

use std::collections::VecDeque;
use std::io;
use std::net::{SocketAddr, ToSocketAddrs};
use std::os::fd::RawFd;
use std::time::Duration;

use mio::net::TcpStream;
use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token};

mod url;

pub use url::UrlError;
pub(crate) use url::WsUrl;

use crate::io::describe;
use crate::io::outbox::{self, Outbox};
use crate::io::stream::ClientStream;
use crate::io::timer::{deadline_after, poll_timeout, Clock, TimerQueue};
use crate::io::transport::Transport;
use crate::proto::frame::OpCode;
use crate::proto::handshake::{ClientRequest, ResponseError};
use crate::proto::rand::OsSeeded;
use crate::proto::{self, close_code, Connection, Event, Message, Payload, ProtocolError, State, Timeout};

/// Client settings. Every limit has a default; see each field.
///
/// ```
/// let mut cfg = wsloop::ClientConfig::default();
/// cfg.protocols.push("chat".into());
/// ```
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct ClientConfig {
    /// Time allowed for the TCP connect and the opening handshake together (default 10 s).
    /// Resolving a host name comes before and is bounded by the system resolver only.
    pub connect_timeout: Duration,
    /// Largest message accepted, in bytes (default 16 MiB); a larger one closes with `1009`.
    pub max_message: usize,
    /// Largest handshake answer head (default 8 KiB).
    pub max_response_head: usize,
    /// How long to wait for the server's close frame after ours, and for the server to end the
    /// TCP connection after the close handshake (default 3 s).
    pub close_timeout: Duration,
    /// Unsent bytes above which the client stops reading from the server until they drain
    /// (default 1 MiB). Sending never blocks: see [`Client::buffered_amount`].
    pub max_backpressure: usize,
    /// Size of the read buffer (default 64 KiB; at least 64 KiB for `wss://`).
    pub read_buffer_size: usize,
    /// Subprotocols to offer, in order of preference (default none).
    pub protocols: Vec<String>,
    /// Extra request headers, e.g. `("Origin", "http://localhost")` (default none).
    pub headers: Vec<(String, String)>,
    /// Called with the request head as it is sent, and with the server's answer head as it
    /// arrives (a refusal's too), for tracing: `wsloop client -v` prints them (default none).
    pub on_head: Option<fn(&[u8])>,
    /// Whom to trust on `wss://` URLs (default none: the system's CA bundle, read when a
    /// `wss://` connection is made).
    #[cfg(feature = "tls")]
    pub tls: Option<crate::tls::ClientTls>,
    /// permessage-deflate (default: offered; messages of 64 bytes and more compressed at zlib
    /// level 1). The client compresses every message on its own and says so in its offer
    /// (`client_no_context_takeover`). A server that keeps its own context costs this client an
    /// inflate window of up to 32 KiB, as big as what it has received.
    #[cfg(feature = "deflate")]
    pub deflate: proto::deflate::DeflateConfig,
}

impl Default for ClientConfig {
    fn default() -> Self {
        ClientConfig {
            connect_timeout: Duration::from_secs(10),
            max_message: 16 << 20,
            max_response_head: 8 << 10,
            close_timeout: Duration::from_secs(3),
            max_backpressure: 1 << 20,
            read_buffer_size: 64 << 10,
            protocols: Vec::new(),
            headers: Vec::new(),
            on_head: None,
            #[cfg(feature = "tls")]
            tls: None,
            #[cfg(feature = "deflate")]
            deflate: proto::deflate::DeflateConfig::default(),
        }
    }
}

impl ClientConfig {
    /// The settings of the connection's protocol core.
    pub(crate) fn protocol_config(&self) -> proto::Config {
        proto::Config {
            max_message: self.max_message,
            max_head: self.max_response_head,
            handshake_timeout: self.connect_timeout,
            close_timeout: self.close_timeout,
            ..proto::Config::default()
        }
    }

    /// The request for `url`.
    pub(crate) fn request(&self, url: &WsUrl) -> ClientRequest {
        let mut r = ClientRequest::new(url.host_header(), url.resource.clone());
        r.protocols = self.protocols.clone();
        r.headers = self.headers.clone();
        #[cfg(feature = "deflate")]
        if self.deflate.enabled {
            r.extensions = Some(proto::deflate::CLIENT_OFFER.into());
        }
        r
    }
}

/// Something that happened on the connection, in the order it happened.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
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
    InvalidUrl(UrlError),
    /// A configured subprotocol or header cannot be sent.
    InvalidConfig(&'static str),
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
    /// The server's answer did not complete the handshake (its status and reason, when it
    /// refused).
    Handshake(ResponseError),
    /// The server broke the protocol; this client sent a close frame with the error's code.
    Protocol(ProtocolError),
    /// The connection ended without a close handshake (close code 1006).
    Abnormal(String),
    /// The connection is closing or closed: nothing more can be sent.
    NotOpen,
    /// The TLS settings could not be made (no system CA bundle found, an unreadable file).
    #[cfg(feature = "tls")]
    TlsConfig(crate::tls::TlsConfigError),
    /// The TLS handshake failed: an untrusted certificate, a name that does not match, a
    /// server that does not speak TLS. Match on `error` to tell them apart.
    #[cfg(feature = "tls")]
    Tls {
        /// The server's address.
        addr: SocketAddr,
        /// Why.
        error: crate::tls::TlsError,
    },
    /// Another I/O error.
    Io(io::Error),
}

impl std::fmt::Display for ClientError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ClientError::InvalidUrl(e) => e.fmt(f),
            ClientError::InvalidConfig(why) => write!(f, "invalid client setting: {why}"),
            ClientError::Resolve { host, error } => write!(f, "cannot resolve host '{host}': {}", describe(error)),
            ClientError::Refused(addr) => write!(f, "connection refused to {addr}"),
            ClientError::Connect { addr, error } => write!(f, "cannot connect to {addr}: {}", describe(error)),
            ClientError::Timeout {
                addr,
                after,
                handshake: false,
            } => write!(f, "timed out connecting to {addr} after {after:?}"),
            ClientError::Timeout { addr, after, .. } => {
                write!(f, "no handshake answer from {addr} within {after:?}")
            }
            ClientError::Handshake(
                e @ (ResponseError::NoAnswer | ResponseError::CutShort | ResponseError::TooLarge),
            ) => write!(f, "handshake failed: {e}"),
            ClientError::Handshake(e) => e.fmt(f),
            ClientError::Protocol(e) => {
                write!(
                    f,
                    "protocol error by the server: {} (closed with {})",
                    e.reason(),
                    e.code()
                )
            }
            ClientError::Abnormal(why) => write!(f, "connection closed abnormally (1006): {why}"),
            ClientError::NotOpen => f.write_str("the connection is not open"),
            #[cfg(feature = "tls")]
            ClientError::TlsConfig(e) => e.fmt(f),
            #[cfg(feature = "tls")]
            ClientError::Tls { addr, error } => write!(f, "TLS handshake with {addr} failed: {error}"),
            ClientError::Io(e) => write!(f, "I/O error: {}", describe(e)),
        }
    }
}

impl std::error::Error for ClientError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            ClientError::Resolve { error, .. } | ClientError::Connect { error, .. } | ClientError::Io(error) => {
                Some(error)
            }
            ClientError::InvalidUrl(e) => Some(e),
            ClientError::Handshake(e) => Some(e),
            #[cfg(feature = "tls")]
            ClientError::Tls { error, .. } => Some(error),
            #[cfg(feature = "tls")]
            ClientError::TlsConfig(e) => Some(e),
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

impl From<UrlError> for ClientError {
    fn from(e: UrlError) -> Self {
        ClientError::InvalidUrl(e)
    }
}

/// The connection's socket.
const SOCKET: Token = Token(0);
/// Watched descriptors use tokens from here up (token = base + fd).
const FD_BASE: usize = 16;

/// An open WebSocket connection to a server. See the [module docs](self).
///
/// Sending never blocks: bytes the kernel does not take at once wait in a queue that
/// [`next_event`](Self::next_event) writes out. Call `next_event` until it returns
/// [`ClientEvent::Closed`] or an error; dropping a client ends the TCP connection at once
/// (the server sees `1006`).
pub struct Client {
    poll: Poll,
    events: Events,
    stream: ClientStream,
    out: Option<Box<Outbox>>,
    write_interest: bool,
    peer: SocketAddr,
    conn: Connection,
    cfg: ClientConfig,
    proto_cfg: proto::Config,
    rng: OsSeeded,
    protocol: Option<String>,
    /// Received bytes; `rbuf[rpos..rlen]` are not yet handed to the core.
    rbuf: Vec<u8>,
    rpos: usize,
    rlen: usize,
    scratch: Vec<u8>,
    /// The socket may have unread bytes (readiness is edge-triggered).
    want_read: bool,
    /// The last readiness event reported the end of the stream or an error: read until it
    /// shows, whatever the size of the reads.
    hup: bool,
    /// The server ended its side of the TCP connection.
    read_closed: bool,
    /// A read or write failed.
    io_error: Option<io::Error>,
    clock: Clock,
    timers: TimerQueue<u32>,
    /// The program's timer: deadline and generation.
    user_timer: Option<(u64, u32)>,
    timer_gen: u32,
    /// The server's close frame.
    peer_close: Option<(u16, String)>,
    /// The protocol error this client closed for.
    failure: Option<ProtocolError>,
    /// Watched descriptors that became readable, not yet reported.
    readable: VecDeque<RawFd>,
    /// The last event or error was handed out.
    finished: bool,
    /// permessage-deflate: made once, allocating only when a message is compressed or inflated
    /// (zero-sized without the `deflate` feature).
    codec: proto::deflate::Codec,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("peer", &self.peer)
            .field("state", &self.conn.state())
            .field("buffered", &self.buffered_amount())
            .finish_non_exhaustive()
    }
}

impl Client {
    /// Connects to `url` (`ws[s]://host[:port][/path][?query]`) and completes the opening
    /// handshake (after the TLS handshake, for `wss://`).
    ///
    /// Blocks until the handshake is done or [`connect_timeout`](ClientConfig::connect_timeout)
    /// passes. A host name is resolved now; its addresses are tried in turn until one accepts.
    pub fn connect(url: &str, cfg: ClientConfig) -> Result<Client, ClientError> {
        let target = WsUrl::parse(url)?;
        #[cfg(feature = "tls")]
        let tls = match (&cfg.tls, target.tls) {
            (_, false) => None,
            (Some(t), true) => Some(t.clone()),
            (None, true) => Some(crate::tls::ClientTls::system_roots().map_err(ClientError::TlsConfig)?),
        };
        let request = cfg.request(&target);
        request.check().map_err(|e| ClientError::InvalidConfig(e.message()))?;
        let proto_cfg = cfg.protocol_config();
        proto_cfg.check().map_err(|e| ClientError::InvalidConfig(e.message()))?;
        #[cfg(feature = "deflate")]
        let cfg_deflate = cfg.deflate;
        let addrs: Vec<SocketAddr> = (target.host.as_str(), target.port)
            .to_socket_addrs()
            .map_err(|error| ClientError::Resolve {
                host: target.host.clone(),
                error,
            })?
            .collect();
        let clock = Clock::new();
        let mut rng = OsSeeded::new()?;
        let mut first = Vec::new();
        // The handshake timeout runs from here: it covers the TCP connect too.
        let conn = Connection::client(&request, clock.now(), &mut rng, &mut first);
        let deadline = deadline_after(clock.now(), cfg.connect_timeout);
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
        #[cfg(feature = "tls")]
        let stream = match tls {
            Some(tls) => {
                let session = tls
                    .session(&target.host)
                    .map_err(|error| ClientError::Tls { addr: peer, error })?;
                ClientStream::Tls(crate::io::tls::TlsStream::new(stream, session))
            }
            None => ClientStream::Plain(stream),
        };
        #[cfg(not(feature = "tls"))]
        let stream = ClientStream::Plain(stream);
        let mut client = Client {
            poll,
            events,
            stream,
            out: None,
            write_interest: true,
            peer,
            conn,
            // TLS needs room for a whole record (up to 18 KiB) in the upper half.
            rbuf: vec![0; cfg.read_buffer_size.max(if target.tls { 64 << 10 } else { 256 })],
            rpos: 0,
            rlen: 0,
            cfg,
            proto_cfg,
            rng,
            protocol: None,
            scratch: Vec::new(),
            want_read: true,
            hup: false,
            read_closed: false,
            io_error: None,
            clock,
            timers: TimerQueue::default(),
            user_timer: None,
            timer_gen: 0,
            peer_close: None,
            failure: None,
            readable: VecDeque::new(),
            finished: false,
            codec: Default::default(),
        };
        #[cfg(feature = "deflate")]
        {
            client.codec = proto::deflate::Codec::new(&cfg_deflate);
        }
        client.send_bytes(&first);
        if let Some(show) = client.cfg.on_head {
            show(&first);
        }
        client.handshake()?;
        Ok(client)
    }

    /// Reads the answer; leftover bytes are the first frames.
    fn handshake(&mut self) -> Result<(), ClientError> {
        // The answer head as it came, for `on_head`.
        let mut head = Vec::new();
        let on_head = self.cfg.on_head;
        let show = |head: &[u8]| {
            if let Some(show) = on_head {
                let end = head
                    .windows(4)
                    .position(|w| w == b"\r\n\r\n")
                    .map_or(head.len(), |i| i + 4);
                show(&head[..end]);
            }
        };
        loop {
            if let Some(e) = self.io_error.take() {
                #[cfg(feature = "tls")]
                if let Some(failure) = e.get_ref().and_then(|i| i.downcast_ref::<crate::io::tls::TlsFailure>()) {
                    return Err(ClientError::Tls {
                        addr: self.peer,
                        error: crate::tls::TlsError::from(&failure.0),
                    });
                }
                return Err(match e.kind() {
                    io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe => {
                        ClientError::Handshake(ResponseError::NoAnswer)
                    }
                    _ => ClientError::Io(e),
                });
            }
            if self.rpos < self.rlen {
                let now = self.clock.now();
                let data = &mut self.rbuf[self.rpos..self.rlen];
                self.scratch.clear();
                let read = self
                    .conn
                    .read(&self.proto_cfg, now, data, &mut self.rng, &mut self.scratch);
                match read {
                    Ok((used, ev)) => {
                        let opened = match ev {
                            Some(Event::Open(response)) => Some(response.protocol),
                            _ => None,
                        };
                        if self.cfg.on_head.is_some() && head.len() <= self.cfg.max_response_head {
                            head.extend_from_slice(&self.rbuf[self.rpos..self.rpos + used]);
                        }
                        self.rpos += used;
                        if let Some(protocol) = opened {
                            show(&head);
                            self.protocol = protocol;
                            log::debug!("{}: handshake done", self.peer);
                            return Ok(());
                        }
                    }
                    Err(proto::Error::Response(e)) => {
                        if self.cfg.on_head.is_some() && head.len() <= self.cfg.max_response_head {
                            head.extend_from_slice(&self.rbuf[self.rpos..self.rlen]);
                        }
                        show(&head);
                        return Err(ClientError::Handshake(*e));
                    }
                    Err(e) => return Err(ClientError::Abnormal(e.to_string())),
                }
                continue;
            }
            if self.read_closed {
                return Err(match self.conn.read_eof(self.clock.now()) {
                    Some(proto::Error::Response(e)) => {
                        show(&head);
                        ClientError::Handshake(*e)
                    }
                    _ => ClientError::Handshake(ResponseError::NoAnswer),
                });
            }
            if self.want_read {
                self.read_socket();
                continue;
            }
            let now = self.clock.now();
            if self
                .conn
                .handle_timeout(&self.proto_cfg, now, &mut self.rng, &mut self.scratch)
                .is_some()
            {
                return Err(ClientError::Timeout {
                    addr: self.peer,
                    after: self.cfg.connect_timeout,
                    handshake: true,
                });
            }
            let deadline = self.conn.poll_timeout(&self.proto_cfg, now);
            self.wait(poll_timeout(now, deadline))?;
        }
    }

    /// Reads once into the read buffer (only when everything read before has been handed out).
    fn read_socket(&mut self) {
        self.rpos = 0;
        self.rlen = 0;
        loop {
            match self.stream.read(&mut self.rbuf) {
                Ok(0) => {
                    self.read_closed = true;
                    self.want_read = false;
                }
                Ok(n) => {
                    self.rlen = n;
                    if n < self.rbuf.len() && !self.hup && self.stream.short_read_drains() {
                        self.want_read = false;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => self.want_read = false,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    self.read_closed = true;
                    self.want_read = false;
                    self.io_error.get_or_insert(e);
                }
            }
            // A TLS handshake that completed while reading lets the queued request out.
            if self.stream.take_write_ready() && self.out.is_some() {
                if let Err(e) = outbox::flush(&mut self.stream, &mut self.out) {
                    self.io_error.get_or_insert(e);
                    self.out = None;
                }
            }
            return;
        }
    }

    /// Writes `bytes` now, or queues what the kernel does not take.
    fn send_bytes(&mut self, bytes: &[u8]) {
        if self.io_error.is_some() || bytes.is_empty() {
            return;
        }
        if let Err(e) = outbox::send_slice(&mut self.stream, &mut self.out, bytes) {
            self.io_error = Some(e);
        }
    }

    /// Sends what the core produced into `scratch`.
    fn send_scratch(&mut self) {
        if self.scratch.is_empty() || self.io_error.is_some() {
            self.scratch.clear();
            return;
        }
        let mut buf = std::mem::take(&mut self.scratch);
        if let Err(e) = outbox::send_vec(&mut self.stream, &mut self.out, &mut buf) {
            self.io_error = Some(e);
        }
        buf.clear();
        if buf.capacity() <= 64 << 10 {
            self.scratch = buf;
        }
    }

    /// Registers for WRITABLE exactly while bytes wait.
    fn sync_interest(&mut self) -> io::Result<()> {
        let want = self.out.is_some() || self.stream.wants_write();
        if want != self.write_interest {
            let interest = if want {
                Interest::READABLE | Interest::WRITABLE
            } else {
                Interest::READABLE
            };
            self.poll.registry().reregister(&mut self.stream, SOCKET, interest)?;
            self.write_interest = want;
        }
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
        let until = timeout.map(|t| deadline_after(self.clock.now(), t));
        // Once the caller's time is up: one more look at the socket (so queued bytes still go
        // out when the caller only ever passes a zero timeout), then `None`.
        let (mut did_read, mut waited) = (false, false);
        loop {
            // Bytes already received come first, one event at a time.
            if self.rpos < self.rlen {
                if let Some(ev) = self.receive() {
                    self.sync_interest()?;
                    return Ok(Some(ev));
                }
                continue;
            }
            if let Some(fd) = self.readable.pop_front() {
                return Ok(Some(ClientEvent::Readable(fd)));
            }
            let now = self.clock.now();
            while let Some((when, gen)) = self.timers.pop_due(now) {
                if self.user_timer == Some((when, gen)) {
                    self.user_timer = None;
                    return Ok(Some(ClientEvent::Timer));
                }
            }
            self.scratch.clear();
            let t = self
                .conn
                .handle_timeout(&self.proto_cfg, now, &mut self.rng, &mut self.scratch);
            self.send_scratch();
            if let Some(end) = self.outcome(t) {
                self.finished = true;
                let _ = self.poll.registry().deregister(&mut self.stream);
                if self.io_error.is_none() {
                    // Over TLS the stream ends with close_notify, so the server can tell this
                    // end from a cut connection (a plain socket sends its FIN).
                    let _ = self.stream.shutdown_write();
                }
                let _ = self.stream.tcp().shutdown(std::net::Shutdown::Both);
                return end.map(Some);
            }
            let expired = until.is_some_and(|u| now >= u);
            let backpressured = self.buffered_amount() > self.cfg.max_backpressure;
            if self.want_read && !backpressured && !(expired && did_read) {
                self.read_socket();
                did_read = true;
                continue;
            }
            self.sync_interest()?;
            if expired && waited {
                return Ok(None);
            }
            let mut deadline = self.timers.next();
            for d in [self.conn.poll_timeout(&self.proto_cfg, now), until]
                .into_iter()
                .flatten()
            {
                deadline = Some(deadline.map_or(d, |t| t.min(d)));
            }
            self.wait(poll_timeout(now, deadline))?;
            waited = true;
        }
    }

    /// Hands the next received bytes to the core; returns the event they completed, if any.
    fn receive(&mut self) -> Option<ClientEvent> {
        let now = self.clock.now();
        self.scratch.clear();
        let data = &mut self.rbuf[self.rpos..self.rlen];
        let result = self.conn.read_with(
            &self.proto_cfg,
            now,
            data,
            &mut self.codec,
            &mut self.rng,
            &mut self.scratch,
        );
        let ev = match result {
            Ok((used, ev)) => {
                self.rpos += used;
                if used == 0 && ev.is_none() {
                    self.rpos = self.rlen;
                }
                match ev {
                    Some(Event::Message(Payload::Text(t))) => Some(ClientEvent::Text(t.to_owned())),
                    Some(Event::Message(Payload::OwnedText(t))) => Some(ClientEvent::Text(t)),
                    Some(Event::Message(Payload::Binary(b))) => Some(ClientEvent::Binary(b.to_vec())),
                    Some(Event::Message(Payload::OwnedBinary(b))) => Some(ClientEvent::Binary(b)),
                    Some(Event::Pong(p)) => Some(ClientEvent::Pong(p.as_bytes().to_vec())),
                    Some(Event::Close { code, reason }) => {
                        self.peer_close = Some((code.unwrap_or(close_code::NO_STATUS), reason.as_str().to_owned()));
                        None
                    }
                    Some(Event::Ping(_) | Event::Open(_) | Event::Request(_)) | None => None,
                }
            }
            Err(e) => {
                self.rpos = self.rlen;
                if let proto::Error::Protocol(p) = e {
                    log::debug!("{}: protocol error: {p}", self.peer);
                    self.failure = Some(p);
                }
                None
            }
        };
        self.send_scratch();
        ev
    }

    /// How the connection ended, once it has.
    fn outcome(&mut self, timeout: Option<Timeout>) -> Option<Result<ClientEvent, ClientError>> {
        let transport_down = self.read_closed || self.io_error.is_some();
        let flushed = (self.out.is_none() && !self.stream.wants_write()) || self.io_error.is_some();
        match self.conn.state() {
            State::Connecting | State::Open if !transport_down => None,
            State::Connecting | State::Open => Some(Err(ClientError::Abnormal(self.drop_reason()))),
            State::LocalClosing if transport_down => Some(Err(ClientError::Abnormal(match &self.io_error {
                Some(e) => format!("connection error before the server answered the close: {}", describe(e)),
                None => "the server ended the connection without answering the close".to_string(),
            }))),
            State::LocalClosing => None,
            State::Closed if timeout.is_none() && !(transport_down && flushed) => None,
            State::Closed if self.peer_close.is_none() && self.failure.is_none() => {
                // The close timeout ran out while waiting for the server's close frame.
                Some(Err(ClientError::Abnormal(format!(
                    "the server did not answer the close within {:?}",
                    self.cfg.close_timeout
                ))))
            }
            State::Closed => {
                // The server closes the TCP connection first (RFC 6455 §7.1.1); we waited for
                // it once our last bytes were out, but not beyond the close timeout.
                if let Some(e) = self.failure.take() {
                    return Some(Err(ClientError::Protocol(e)));
                }
                self.peer_close
                    .take()
                    .map(|(code, reason)| Ok(ClientEvent::Closed { code, reason }))
            }
        }
    }

    /// Why the TCP connection is gone, for an abnormal close.
    fn drop_reason(&self) -> String {
        match &self.io_error {
            Some(e) => format!("connection error: {}", describe(e)),
            None if self.conn.in_message() => "the server dropped the connection mid-message".to_string(),
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

    /// Sends a message as one frame (compressed where permessage-deflate was agreed and it
    /// pays).
    pub fn send(&mut self, msg: Message<'_>) -> Result<(), ClientError> {
        if self.finished {
            return Err(ClientError::NotOpen);
        }
        self.scratch.clear();
        self.conn
            .send_with(msg, &mut self.codec, &mut self.rng, &mut self.scratch)
            .map_err(|_| ClientError::NotOpen)?;
        self.send_scratch();
        self.sync_interest()?;
        Ok(())
    }

    /// Sends one frame of a fragmented message: the first with [`OpCode::Text`] or
    /// [`OpCode::Binary`], the others with [`OpCode::Continuation`], the last with `fin` set.
    pub fn send_frame(&mut self, opcode: OpCode, fin: bool, payload: &[u8]) -> Result<(), ClientError> {
        if self.finished {
            return Err(ClientError::NotOpen);
        }
        self.scratch.clear();
        self.conn
            .send_frame(opcode, fin, payload, &mut self.rng, &mut self.scratch)
            .map_err(|_| ClientError::NotOpen)?;
        self.send_scratch();
        self.sync_interest()?;
        Ok(())
    }

    /// Sends a ping (payload truncated to 125 bytes); the answer arrives as [`ClientEvent::Pong`].
    pub fn ping(&mut self, payload: &[u8]) -> Result<(), ClientError> {
        if self.finished {
            return Err(ClientError::NotOpen);
        }
        self.scratch.clear();
        self.conn
            .ping(payload, &mut self.rng, &mut self.scratch)
            .map_err(|_| ClientError::NotOpen)?;
        self.send_scratch();
        self.sync_interest()?;
        Ok(())
    }

    /// Starts the close handshake with `code` (an invalid code is sent as 1000) and `reason`
    /// (truncated to 123 bytes). Keep calling [`next_event`](Self::next_event) until
    /// [`ClientEvent::Closed`]; messages that arrive meanwhile are dropped.
    pub fn close(&mut self, code: u16, reason: &str) -> Result<(), ClientError> {
        if self.finished {
            return Err(ClientError::NotOpen);
        }
        self.scratch.clear();
        let now = self.clock.now();
        self.conn
            .close(code, reason, now, &mut self.rng, &mut self.scratch)
            .map_err(|_| ClientError::NotOpen)?;
        self.send_scratch();
        self.sync_interest()?;
        Ok(())
    }

    /// Makes [`next_event`](Self::next_event) return [`ClientEvent::Timer`] after `after`,
    /// replacing any earlier timer. For periodic work, set it again when it fires.
    pub fn set_timer(&mut self, after: Duration) {
        let when = deadline_after(self.clock.now(), after);
        self.timer_gen = self.timer_gen.wrapping_add(1);
        self.user_timer = Some((when, self.timer_gen));
        self.timers.push(when, self.timer_gen);
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
        self.out.as_ref().map_or(0, |o| o.len())
    }

    /// The subprotocol the server chose, if any.
    pub fn protocol(&self) -> Option<&str> {
        self.protocol.as_deref()
    }

    /// The permessage-deflate parameters agreed with the server, if it accepted the offer.
    #[cfg(feature = "deflate")]
    pub fn deflate(&self) -> Option<proto::deflate::Agreed> {
        self.conn.deflate()
    }

    /// Bytes this client compressed and inflated so far.
    #[cfg(feature = "deflate")]
    pub fn deflate_stats(&self) -> proto::deflate::CodecStats {
        self.codec.stats()
    }

    /// The server's address.
    pub fn peer_addr(&self) -> SocketAddr {
        self.peer
    }

    /// This end's address.
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.stream.tcp().local_addr()
    }

    /// Waits for readiness (at most `timeout`) and handles what the socket reports.
    fn wait(&mut self, timeout: Option<Duration>) -> Result<(), ClientError> {
        match self.poll.poll(&mut self.events, timeout) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => return Ok(()),
            Err(e) => return Err(e.into()),
        }
        let mut writable = false;
        for ev in self.events.iter() {
            match ev.token() {
                SOCKET => {
                    writable |= ev.is_writable();
                    if ev.is_readable() || ev.is_read_closed() || ev.is_error() {
                        self.want_read = true;
                        self.hup |= ev.is_read_closed() || ev.is_error();
                    }
                }
                Token(t) => {
                    if let Some(fd) = t.checked_sub(FD_BASE).and_then(|f| RawFd::try_from(f).ok()) {
                        if !self.readable.contains(&fd) {
                            self.readable.push_back(fd);
                        }
                    }
                }
            }
        }
        if writable && self.io_error.is_none() {
            if let Err(e) = outbox::flush(&mut self.stream, &mut self.out) {
                self.io_error = Some(e);
                self.out = None;
            }
        }
        self.sync_interest()?;
        Ok(())
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
    let mut stream = crate::io::connect::start(addr, None).map_err(failed)?;
    poll.registry()
        .register(&mut stream, SOCKET, Interest::READABLE | Interest::WRITABLE)?;
    loop {
        match crate::io::connect::finished(&stream) {
            Ok(true) => return Ok(stream),
            Ok(false) => {}
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
