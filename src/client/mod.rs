//! The client: one outgoing connection with a pull API, a thin driver over the engine the
//! server and the load generator run, with one slot.
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

use crate::io::budget::Budget;
use crate::io::describe;
use crate::io::engine::{reserved_token, Cause, Driver, Engine};
use crate::io::stream::ClientStream;
use crate::io::timer::{deadline_after, poll_timeout, Clock};
use crate::io::transport::Transport;
use crate::proto::frame::OpCode;
use crate::proto::handshake::{ClientRequest, ResponseError};
use crate::proto::rand::OsSeeded;
use crate::proto::{self, close_code, Connection, Event, Message, Payload, ProtocolError, State};

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
    /// (default 1 MiB). Sending never blocks: see [`Client::queued`].
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

/// Watched descriptors use tokens from the top down (`reserved_token(FD_BASE + fd)`): never a
/// slab key.
const FD_BASE: usize = 16;

/// The client's engine: one slot, no per-connection data of the driver's.
type ClientEngine = Engine<ClientStream, (), OsSeeded>;

/// What the engine tells the client, kept until the program asks for it.
struct Inbox {
    peer: SocketAddr,
    connect_timeout: Duration,
    close_timeout: Duration,
    /// Events not yet handed out, in order.
    events: VecDeque<ClientEvent>,
    /// How the opening handshake ended: the chosen subprotocol, or why it failed.
    opening: Option<Result<Option<String>, ClientError>>,
    opened: bool,
    /// How the connection ended, handed out after the events before it.
    end: Option<Result<ClientEvent, ClientError>>,
    /// The state and whether a message was in progress when the stream ended (the engine
    /// closes the core right after).
    hangup: Option<(State, bool)>,
    /// The server's close frame.
    peer_close: Option<(u16, String)>,
    /// The protocol error this client closed for.
    failure: Option<ProtocolError>,
    /// The program's timer: its generation.
    user_timer: Option<u64>,
    /// The answer head as it came, for `on_head`, while the handshake runs.
    head: Vec<u8>,
    on_head: Option<fn(&[u8])>,
    max_head: usize,
    #[cfg(feature = "deflate")]
    agreed: Option<proto::deflate::Agreed>,
}

impl Inbox {
    /// Shows the answer head (up to its blank line) to `on_head`.
    fn show_head(&self) {
        if let Some(show) = self.on_head {
            let end = self
                .head
                .windows(4)
                .position(|w| w == b"\r\n\r\n")
                .map_or(self.head.len(), |i| i + 4);
            show(&self.head[..end]);
        }
    }

    /// Why the opening handshake failed, from how the connection was removed.
    fn failed_opening(&self, cause: Cause) -> ClientError {
        match cause {
            Cause::Timeout(_) => ClientError::Timeout {
                addr: self.peer,
                after: self.connect_timeout,
                handshake: true,
            },
            Cause::Io(e) => {
                #[cfg(feature = "tls")]
                if let Some(failure) = e.get_ref().and_then(|i| i.downcast_ref::<crate::io::tls::TlsFailure>()) {
                    return ClientError::Tls {
                        addr: self.peer,
                        error: crate::tls::TlsError::from(&failure.0),
                    };
                }
                match e.kind() {
                    io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe => {
                        ClientError::Handshake(ResponseError::NoAnswer)
                    }
                    _ => ClientError::Io(e),
                }
            }
            Cause::Done | Cause::Eof | Cause::Dropped => ClientError::Handshake(ResponseError::NoAnswer),
        }
    }

    /// How an open connection ended: `state` and `in_message` are the core's when the
    /// transport went (or now).
    fn ending(&mut self, state: State, in_message: bool, cause: &Cause) -> Result<ClientEvent, ClientError> {
        let io_error = match cause {
            Cause::Io(e) => Some(e),
            _ => None,
        };
        match state {
            State::Connecting | State::Open => Err(ClientError::Abnormal(match io_error {
                Some(e) => format!("connection error: {}", describe(e)),
                None if in_message => "the server dropped the connection mid-message".to_string(),
                None => "the server closed the TCP connection without a close frame".to_string(),
            })),
            State::LocalClosing => Err(ClientError::Abnormal(match io_error {
                Some(e) => format!("connection error before the server answered the close: {}", describe(e)),
                None => "the server ended the connection without answering the close".to_string(),
            })),
            State::Closed => {
                // The server closes the TCP connection first (RFC 6455 §7.1.1); the engine
                // waited for it once our last bytes were out, but not beyond the close timeout.
                if let Some(e) = self.failure.take() {
                    return Err(ClientError::Protocol(e));
                }
                match self.peer_close.take() {
                    Some((code, reason)) => Ok(ClientEvent::Closed { code, reason }),
                    None => Err(ClientError::Abnormal(format!(
                        "the server did not answer the close within {:?}",
                        self.close_timeout
                    ))),
                }
            }
        }
    }
}

impl Driver<ClientStream, (), OsSeeded> for Inbox {
    fn on_event(&mut self, eng: &mut ClientEngine, key: usize, ev: Event<'_>) {
        let ev = match ev {
            Event::Open(response) => {
                self.show_head();
                self.head = Vec::new();
                self.opened = true;
                #[cfg(feature = "deflate")]
                {
                    self.agreed = eng.slots[key].conn.deflate();
                }
                log::debug!("{}: handshake done", self.peer);
                self.opening = Some(Ok(response.protocol));
                return;
            }
            Event::Message(Payload::Text(t)) => ClientEvent::Text(t.to_owned()),
            Event::Message(Payload::OwnedText(t)) => ClientEvent::Text(t),
            Event::Message(Payload::Binary(b)) => ClientEvent::Binary(b.to_vec()),
            Event::Message(Payload::OwnedBinary(b)) => ClientEvent::Binary(b),
            Event::Pong(p) => ClientEvent::Pong(p.as_bytes().to_vec()),
            Event::Close { code, reason } => {
                self.peer_close = Some((code.unwrap_or(close_code::NO_STATUS), reason.as_str().to_owned()));
                return;
            }
            Event::Ping(_) | Event::Request(_) => return,
        };
        let _ = (eng, key);
        self.events.push_back(ev);
    }

    fn on_error(&mut self, _eng: &mut ClientEngine, _key: usize, err: &proto::Error) {
        if self.opened {
            if let proto::Error::Protocol(p) = err {
                log::debug!("{}: protocol error: {p}", self.peer);
                self.failure = Some(*p);
            }
            return;
        }
        if self.opening.is_none() {
            self.opening = Some(Err(match err {
                proto::Error::Response(e) => {
                    self.show_head();
                    ClientError::Handshake((**e).clone())
                }
                e => ClientError::Abnormal(e.to_string()),
            }));
        }
    }

    fn on_read(&mut self, _key: usize, data: &[u8]) {
        if !self.opened && self.on_head.is_some() && self.head.len() <= self.max_head {
            self.head.extend_from_slice(data);
        }
    }

    fn on_hangup(&mut self, eng: &mut ClientEngine, key: usize) {
        let conn = &eng.slots[key].conn;
        self.hangup.get_or_insert((conn.state(), conn.in_message()));
    }

    fn on_removed(&mut self, eng: &mut ClientEngine, key: usize, cause: Cause) {
        let slot = &mut eng.slots[key];
        if !matches!(cause, Cause::Io(_)) {
            // Over TLS the stream ends with close_notify, so the server can tell this end
            // from a cut connection (a plain socket sends its FIN).
            let _ = slot.stream.shutdown_write();
        }
        let _ = slot.stream.tcp().shutdown(std::net::Shutdown::Both);
        if !self.opened {
            if self.opening.is_none() {
                self.opening = Some(Err(self.failed_opening(cause)));
            }
            return;
        }
        let (state, in_message) = self
            .hangup
            .unwrap_or_else(|| (slot.conn.state(), slot.conn.in_message()));
        self.end = Some(self.ending(state, in_message, &cause));
    }

    fn on_timer(&mut self, _eng: &mut ClientEngine, id: u64) {
        if self.user_timer == Some(id) {
            self.user_timer = None;
            self.events.push_back(ClientEvent::Timer);
        }
    }
}

/// An open WebSocket connection to a server. See the [module docs](self).
///
/// Sending never blocks: bytes the kernel does not take at once wait in a queue that
/// [`next_event`](Self::next_event) writes out. Call `next_event` until it returns
/// [`ClientEvent::Closed`] or an error; dropping a client ends the TCP connection at once
/// (the server sees `1006`).
pub struct Client {
    /// The engine, with the connection in slot `key` until it is removed.
    eng: ClientEngine,
    key: usize,
    inbox: Inbox,
    events: Events,
    rbuf: Vec<u8>,
    local: SocketAddr,
    protocol: Option<String>,
    timer_gen: u64,
    /// Watched descriptors that became readable, not yet reported.
    readable: VecDeque<RawFd>,
    /// The last event or error was handed out.
    finished: bool,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("peer", &self.inbox.peer)
            .field("state", &self.slot().map_or(State::Closed, |s| s.conn.state()))
            .field("queued", &self.queued())
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
        let addrs: Vec<SocketAddr> = (target.host.as_str(), target.port)
            .to_socket_addrs()
            .map_err(|error| ClientError::Resolve {
                host: target.host.clone(),
                error,
            })?
            .collect();
        let mut eng: ClientEngine = Engine::new(
            Poll::new()?,
            proto_cfg,
            cfg.max_backpressure,
            OsSeeded::new()?,
            Budget::unlimited(),
        );
        // One event per step: what the program answers to a message goes out before anything
        // the core writes for later bytes.
        eng.quantum = 1;
        #[cfg(feature = "deflate")]
        {
            eng.codec = proto::deflate::Codec::new(&cfg.deflate);
        }
        let mut first = Vec::new();
        // The handshake timeout runs from here: it covers the TCP connect too.
        let now = eng.tick();
        let conn = Connection::client(&request, now, &mut eng.rng, &mut first);
        let deadline = deadline_after(now, cfg.connect_timeout);
        let mut events = Events::with_capacity(64);
        let mut last_error = None;
        let mut connected = None;
        for addr in addrs {
            match connect_tcp(
                &mut eng.poll,
                &mut events,
                &eng.clock,
                deadline,
                addr,
                cfg.connect_timeout,
            ) {
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
        let local = stream.local_addr()?;
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
        // Connected already: the engine finds that at the first event and writes the request.
        let key = eng.insert_connecting(stream, conn, (), &first)?;
        if let Some(show) = cfg.on_head {
            show(&first);
        }
        let mut client = Client {
            eng,
            key,
            inbox: Inbox {
                peer,
                connect_timeout: cfg.connect_timeout,
                close_timeout: cfg.close_timeout,
                events: VecDeque::new(),
                opening: None,
                opened: false,
                end: None,
                hangup: None,
                peer_close: None,
                failure: None,
                user_timer: None,
                head: Vec::new(),
                on_head: cfg.on_head,
                max_head: cfg.max_response_head,
                #[cfg(feature = "deflate")]
                agreed: None,
            },
            events,
            // TLS needs room for a whole record (up to 18 KiB) in the upper half.
            rbuf: vec![0; cfg.read_buffer_size.max(if target.tls { 64 << 10 } else { 256 })],
            local,
            protocol: None,
            timer_gen: 0,
            readable: VecDeque::new(),
            finished: false,
        };
        client.protocol = client.handshake()?;
        Ok(client)
    }

    /// Runs the engine until the server's answer is in; leftover bytes are the first frames.
    fn handshake(&mut self) -> Result<Option<String>, ClientError> {
        loop {
            if let Some(opening) = self.inbox.opening.take() {
                return opening;
            }
            self.step(None)?;
        }
    }

    /// The connection's slot, until the engine removes it.
    fn slot(&self) -> Option<&crate::io::engine::Slot<ClientStream, ()>> {
        self.eng.slots.get(self.key).filter(|s| !s.is_dead())
    }

    /// One turn of the engine: the rest of the last read if the core stopped in it and due
    /// deadlines; if they had nothing to tell, a wait in `poll` (at most until `until`) and what
    /// it reports. Returns whether it waited.
    fn step(&mut self, until: Option<u64>) -> Result<bool, ClientError> {
        let now = self.eng.tick();
        if self.eng.has_ready() {
            self.eng.resume(&mut self.inbox, &mut self.rbuf);
        }
        // Deadlines between reads too: a server that never stops sending does not hold them up.
        self.eng.fire_timers(&mut self.inbox);
        self.eng.reap(&mut self.inbox);
        let news = !self.inbox.events.is_empty() || self.inbox.end.is_some() || self.inbox.opening.is_some();
        if news || self.eng.has_ready() {
            return Ok(false);
        }
        let deadline = match (self.eng.next_deadline(), until) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        match self.eng.poll.poll(&mut self.events, poll_timeout(now, deadline)) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => return Ok(true),
            Err(e) => return Err(e.into()),
        }
        self.eng.tick();
        for ev in self.events.iter() {
            let token = ev.token().0;
            if token == self.key {
                self.eng.on_ready(&mut self.inbox, token, ev, &mut self.rbuf);
            } else if let Some(fd) = (usize::MAX - token)
                .checked_sub(FD_BASE)
                .and_then(|f| RawFd::try_from(f).ok())
            {
                if !self.readable.contains(&fd) {
                    self.readable.push_back(fd);
                }
            }
        }
        self.eng.reap(&mut self.inbox);
        Ok(true)
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
        let until = timeout.map(|t| deadline_after(self.eng.clock.now(), t));
        // Once the caller's time is up: one more look at the socket (so queued bytes still go
        // out when the caller only ever passes a zero timeout), then `None`.
        let mut waited = false;
        loop {
            // Bytes already received come first, one event at a time.
            if let Some(ev) = self.inbox.events.pop_front() {
                return Ok(Some(ev));
            }
            if self.eng.has_ready() {
                self.step(until)?;
                continue;
            }
            if let Some(fd) = self.readable.pop_front() {
                return Ok(Some(ClientEvent::Readable(fd)));
            }
            if let Some(end) = self.inbox.end.take() {
                self.finished = true;
                return end.map(Some);
            }
            let expired = until.is_some_and(|u| self.eng.clock.now() >= u);
            if expired && waited {
                return Ok(None);
            }
            waited |= self.step(if expired { Some(0) } else { until })?;
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

    /// The connection's slot key, while messages can still be handed to it.
    fn live(&mut self) -> Result<usize, ClientError> {
        if self.finished || self.slot().is_none() {
            return Err(ClientError::NotOpen);
        }
        self.eng.tick();
        Ok(self.key)
    }

    /// Sends a message as one frame (compressed where permessage-deflate was agreed and it
    /// pays).
    pub fn send(&mut self, msg: Message<'_>) -> Result<(), ClientError> {
        let key = self.live()?;
        self.eng.send(key, msg).map_err(|_| ClientError::NotOpen)
    }

    /// Sends one frame of a fragmented message: the first with [`OpCode::Text`] or
    /// [`OpCode::Binary`], the others with [`OpCode::Continuation`], the last with `fin` set.
    pub fn send_frame(&mut self, opcode: OpCode, fin: bool, payload: &[u8]) -> Result<(), ClientError> {
        let key = self.live()?;
        let mut frame = Vec::new();
        self.eng.slots[key]
            .conn
            .send_frame(opcode, fin, payload, &mut self.eng.rng, &mut frame)
            .map_err(|_| ClientError::NotOpen)?;
        self.eng.send_raw(key, &frame);
        Ok(())
    }

    /// Sends a ping (payload truncated to 125 bytes); the answer arrives as [`ClientEvent::Pong`].
    pub fn ping(&mut self, payload: &[u8]) -> Result<(), ClientError> {
        let key = self.live()?;
        self.eng.ping(key, payload).map_err(|_| ClientError::NotOpen)
    }

    /// Starts the close handshake with `code` (an invalid code is sent as 1000) and `reason`
    /// (truncated to 123 bytes). Keep calling [`next_event`](Self::next_event) until
    /// [`ClientEvent::Closed`]; messages that arrive meanwhile are dropped.
    pub fn close(&mut self, code: u16, reason: &str) -> Result<(), ClientError> {
        let key = self.live()?;
        self.eng.close(key, code, reason).map_err(|_| ClientError::NotOpen)
    }

    /// Makes [`next_event`](Self::next_event) return [`ClientEvent::Timer`] after `after`,
    /// replacing any earlier timer. For periodic work, set it again when it fires.
    pub fn set_timer(&mut self, after: Duration) {
        let when = deadline_after(self.eng.clock.now(), after);
        // Generations stay below the engine's driver-timer bit.
        self.timer_gen = (self.timer_gen + 1) & 0xFFFF_FFFF;
        self.inbox.user_timer = Some(self.timer_gen);
        self.eng.set_timer_at(when, self.timer_gen);
    }

    /// Makes [`next_event`](Self::next_event) also return [`ClientEvent::Readable`] when `fd`
    /// becomes readable (a pipe, a terminal, a socket; not a regular file, which epoll refuses).
    ///
    /// Readiness is edge-triggered: read from `fd` until it would block, or no new event comes.
    /// The caller keeps `fd` open while it is watched.
    pub fn watch(&mut self, fd: RawFd) -> io::Result<()> {
        let fd_index = usize::try_from(fd).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        let token = reserved_token(FD_BASE.saturating_add(fd_index));
        self.eng
            .poll
            .registry()
            .register(&mut SourceFd(&fd), token, Interest::READABLE)
    }

    /// Stops watching `fd`.
    pub fn unwatch(&mut self, fd: RawFd) -> io::Result<()> {
        self.eng.poll.registry().deregister(&mut SourceFd(&fd))
    }

    /// Whether messages can be sent (the handshake is done and no close has started).
    pub fn is_open(&self) -> bool {
        !self.finished && self.slot().is_some_and(|s| s.conn.state() == State::Open)
    }

    /// Bytes sent but not yet taken by the kernel.
    pub fn queued(&self) -> usize {
        self.slot().map_or(0, |s| s.unsent())
    }

    /// The subprotocol the server chose, if any.
    pub fn protocol(&self) -> Option<&str> {
        self.protocol.as_deref()
    }

    /// The permessage-deflate parameters agreed with the server, if it accepted the offer.
    #[cfg(feature = "deflate")]
    pub fn deflate(&self) -> Option<proto::deflate::Agreed> {
        self.inbox.agreed
    }

    /// Bytes this client compressed and inflated so far.
    #[cfg(feature = "deflate")]
    pub fn deflate_stats(&self) -> proto::deflate::CodecStats {
        self.eng.codec.stats()
    }

    /// The server's address.
    pub fn peer_addr(&self) -> SocketAddr {
        self.inbox.peer
    }

    /// This end's address.
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        Ok(self.local)
    }
}

/// Non-blocking connect to one address, waiting (at most until `deadline`) for it to finish.
/// The stream comes back unregistered.
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
        .register(&mut stream, CONNECT, Interest::READABLE | Interest::WRITABLE)?;
    let result = loop {
        match crate::io::connect::finished(&stream) {
            Ok(true) => break Ok(()),
            Ok(false) => {}
            Err(e) => break Err(failed(e)),
        }
        let now = clock.now();
        if now >= deadline {
            break Err(ClientError::Timeout {
                addr,
                after: timeout,
                handshake: false,
            });
        }
        match poll.poll(events, poll_timeout(now, Some(deadline))) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => break Err(e.into()),
        }
    };
    let _ = poll.registry().deregister(&mut stream);
    result.map(|()| stream)
}

/// The socket's token while it connects (the engine registers it again under its slot key).
const CONNECT: Token = reserved_token(0);
