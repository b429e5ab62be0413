//! One connection's whole life, for either role, without I/O.
//!
//! A [`Connection`] starts in [`State::Connecting`]: a server waits for the upgrade request, a
//! client has written its request and waits for the answer. Received bytes go in through
//! [`read`](Connection::read), which returns how many it used and at most one [`Event`]; call
//! it again with the rest. Everything the connection must send (the handshake answer, pongs,
//! close frames, pings) and every message given to [`send`](Connection::send) is appended to a
//! caller-owned `Vec<u8>`. Time goes in as milliseconds on any monotonic clock the caller
//! likes: [`poll_timeout`](Connection::poll_timeout) says when the connection next needs
//! [`handle_timeout`](Connection::handle_timeout), which runs the handshake, heartbeat, idle and
//! close timeouts.
//!
//! An idle connection is 16 bytes (12 on 32-bit targets). Parser state is allocated only while
//! a handshake head, a frame header, a frame or a fragmented message is split across reads, and
//! freed as soon as it completes: a frame that arrives whole is unmasked in place in the
//! caller's buffer and handed out as a slice of it.
//!
//! With the `deflate` feature, permessage-deflate (RFC 7692) is negotiated here for both roles
//! (`Connection::accept_deflate`, and a client whose request offers `deflate::CLIENT_OFFER`)
//! and applied in the frame path: the agreed parameters take one byte of the connection, and
//! the compressor and decompressor are the loop's, lent to `read_with` and
//! `send_with` as a `deflate::Codec`. A compressed message split across frames or reads is
//! buffered compressed (bounded by [`Config::max_message`]) and inflated once complete.

use alloc::boxed::Box;
use alloc::string::String;
use alloc::vec::Vec;
use core::time::Duration;

use super::frame::{close_code, write_close, write_frame, FrameHeader, OpCode, MAX_CONTROL_PAYLOAD, MAX_HEADER_LEN};
use super::handshake::{self, Answer, ClientRequest, Reject, Request, Response, ResponseError};
use super::mask::apply_mask;
use super::rand::RandomSource;
use super::utf8::Utf8Validator;

use super::deflate::{self, Agreement, Codec, InflateError, InflateWindow};
#[cfg(feature = "deflate")]
use super::deflate::{Agreed, DeflateConfig};

/// The loop's codec, where one was lent (without the `deflate` feature, a zero-sized one that
/// inflates and compresses nothing).
type CodecRef<'a> = Option<&'a mut Codec>;

/// Which end of the connection this is. Clients mask what they send; servers require masks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// Accepted the connection.
    Server,
    /// Opened the connection.
    Client,
}

/// Where the connection is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum State {
    /// The opening handshake is not finished.
    Connecting,
    /// Messages flow both ways.
    Open,
    /// This end sent a close frame and waits for the peer's.
    LocalClosing,
    /// The close handshake is done or the connection failed: nothing more is read or sent;
    /// the transport should be shut down once the pending bytes are written.
    Closed,
}

/// Limits and timeouts of a connection. One `Config` is shared by every connection of a loop;
/// it is passed to each call rather than stored, which keeps an idle connection at 16 bytes.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct Config {
    /// Largest message accepted, in bytes (default 16 MiB); larger gets close `1009`.
    pub max_message: usize,
    /// Largest handshake head: the request a server reads (answered `431` past it) or the
    /// answer a client reads (default 8 KiB).
    pub max_head: usize,
    /// Time from the start of the connection to the end of the opening handshake (default 10 s).
    pub handshake_timeout: Duration,
    /// How long to wait for the peer's close frame after ours, and for the end of the TCP
    /// connection after the close handshake (default 3 s).
    pub close_timeout: Duration,
    /// Send a ping after this much silence from the peer (default: off). A peer that stays
    /// silent for another interval (or [`idle_timeout`](Self::idle_timeout)) is closed.
    pub ping_interval: Option<Duration>,
    /// Close a peer silent this long with `1001` (default: off).
    pub idle_timeout: Option<Duration>,
}

/// Timeouts longer than this are refused by [`Config::check`]: deadlines are kept as 32-bit
/// millisecond offsets.
pub const MAX_TIMEOUT: Duration = Duration::from_secs(20 * 24 * 3600);

impl Default for Config {
    fn default() -> Self {
        Config {
            max_message: 16 << 20,
            max_head: 8 << 10,
            handshake_timeout: Duration::from_secs(10),
            close_timeout: Duration::from_secs(3),
            ping_interval: None,
            idle_timeout: None,
        }
    }
}

impl Config {
    /// Refuses settings that cannot work: zero limits and timeouts, or timeouts over 20 days.
    pub fn check(&self) -> Result<(), ConfigError> {
        if self.max_message == 0 {
            return Err(ConfigError::MessageLimitZero);
        }
        if self.max_head < 256 {
            return Err(ConfigError::HeadLimitTooSmall);
        }
        if self.handshake_timeout.is_zero() || self.close_timeout.is_zero() {
            return Err(ConfigError::HandshakeOrCloseTimeoutZero);
        }
        let all = [
            Some(self.handshake_timeout),
            Some(self.close_timeout),
            self.ping_interval,
            self.idle_timeout,
        ];
        if all.iter().flatten().any(|d| *d > MAX_TIMEOUT) {
            return Err(ConfigError::TimeoutTooLong);
        }
        if all.iter().flatten().any(|d| d.is_zero()) {
            return Err(ConfigError::TimeoutZero);
        }
        Ok(())
    }
}

/// A [`Config`] setting that cannot work, from [`Config::check`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum ConfigError {
    /// `max_message` is zero.
    MessageLimitZero,
    /// `max_head` is under 256 bytes.
    HeadLimitTooSmall,
    /// `handshake_timeout` or `close_timeout` is zero.
    HandshakeOrCloseTimeoutZero,
    /// A timeout is over 20 days.
    TimeoutTooLong,
    /// `ping_interval` or `idle_timeout` is set to zero.
    TimeoutZero,
}

impl ConfigError {
    /// What is wrong, in one sentence.
    pub const fn message(self) -> &'static str {
        match self {
            ConfigError::MessageLimitZero => "the message limit must be at least 1 byte",
            ConfigError::HeadLimitTooSmall => "the handshake head limit must be at least 256 bytes",
            ConfigError::HandshakeOrCloseTimeoutZero => "the handshake and close timeouts must be above zero",
            ConfigError::TimeoutTooLong => "timeouts are limited to 20 days",
            ConfigError::TimeoutZero => "a timeout of zero would fire at once; leave it unset to turn it off",
        }
    }
}

impl core::fmt::Display for ConfigError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(self.message())
    }
}

impl core::error::Error for ConfigError {}

/// A complete data message, as sent or handed to an application.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Message<'a> {
    /// A text message, already checked to be UTF-8.
    Text(&'a str),
    /// A binary message.
    Binary(&'a [u8]),
}

impl<'a> Message<'a> {
    /// The payload bytes.
    pub fn as_bytes(&self) -> &'a [u8] {
        match *self {
            Message::Text(t) => t.as_bytes(),
            Message::Binary(b) => b,
        }
    }

    /// The opcode of a single-frame message of this kind.
    pub fn opcode(&self) -> OpCode {
        match self {
            Message::Text(_) => OpCode::Text,
            Message::Binary(_) => OpCode::Binary,
        }
    }
}

/// A received message: borrowed from the caller's buffer when it arrived in one read, owned
/// when it had to be assembled from several.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Payload<'d> {
    /// Text, in place in the caller's buffer.
    Text(&'d str),
    /// Binary, in place in the caller's buffer.
    Binary(&'d [u8]),
    /// Text assembled across reads or frames.
    OwnedText(String),
    /// Binary assembled across reads or frames.
    OwnedBinary(Vec<u8>),
}

impl Payload<'_> {
    /// The bytes.
    pub fn as_bytes(&self) -> &[u8] {
        self.as_message().as_bytes()
    }

    /// The text, or `""` for a binary payload.
    pub fn as_str(&self) -> &str {
        match self.as_message() {
            Message::Text(t) => t,
            Message::Binary(_) => "",
        }
    }

    /// The message, borrowed.
    pub fn as_message(&self) -> Message<'_> {
        match self {
            Payload::Text(t) => Message::Text(t),
            Payload::Binary(b) => Message::Binary(b),
            Payload::OwnedText(t) => Message::Text(t),
            Payload::OwnedBinary(b) => Message::Binary(b),
        }
    }

    /// Whether it is text.
    pub fn is_text(&self) -> bool {
        matches!(self, Payload::Text(_) | Payload::OwnedText(_))
    }
}

/// Something the peer did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event<'d> {
    /// Server: a complete request. Answer it with [`Connection::accept`] before reading on.
    Request(Box<Request>),
    /// Client: the server accepted the upgrade; the connection is open.
    Open(Box<Response>),
    /// A complete message.
    Message(Payload<'d>),
    /// A ping (its payload, as binary); the pong is already queued.
    Ping(Payload<'d>),
    /// A pong (its payload, as binary).
    Pong(Payload<'d>),
    /// The peer's close frame. When this end had not sent one, the reply is already queued.
    /// The state is now [`State::Closed`].
    Close {
        /// The status code, if the frame had one.
        code: Option<u16>,
        /// The reason (text).
        reason: Payload<'d>,
    },
}

impl Event<'_> {
    /// The event with nothing borrowed (payloads copied out).
    pub fn into_owned(self) -> Event<'static> {
        let own = |p: Payload<'_>| match p {
            Payload::Text(t) => Payload::OwnedText(String::from(t)),
            Payload::Binary(b) => Payload::OwnedBinary(b.to_vec()),
            Payload::OwnedText(t) => Payload::OwnedText(t),
            Payload::OwnedBinary(b) => Payload::OwnedBinary(b),
        };
        match self {
            Event::Request(r) => Event::Request(r),
            Event::Open(r) => Event::Open(r),
            Event::Message(p) => Event::Message(own(p)),
            Event::Ping(p) => Event::Ping(own(p)),
            Event::Pong(p) => Event::Pong(own(p)),
            Event::Close { code, reason } => Event::Close {
                code,
                reason: own(reason),
            },
        }
    }
}

/// Why the connection failed. Whatever the peer should be told is already queued, and the
/// state is [`State::Closed`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Error {
    /// The peer broke the protocol; the close frame carrying the code is queued (when the
    /// connection was open).
    Protocol(ProtocolError),
    /// Server: the request was refused; the HTTP answer is queued.
    Rejected(Reject),
    /// Client: the server's answer did not complete the handshake.
    Response(Box<ResponseError>),
}

impl core::fmt::Display for Error {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Error::Protocol(e) => e.fmt(f),
            Error::Rejected(r) => write!(f, "refused handshake: {r}"),
            Error::Response(e) => e.fmt(f),
        }
    }
}

impl core::error::Error for Error {}

/// A protocol violation by the peer, one variant per reason; [`code`](Self::code) is the close
/// code it is answered with and [`reason`](Self::reason) the close reason sent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
#[repr(u8)]
pub enum ProtocolError {
    /// RSV1, RSV2 or RSV3 set where no agreed extension defines it (1002).
    ReservedBits,
    /// Opcode 0x3–0x7 or 0xB–0xF (1002).
    ReservedOpcode,
    /// A close, ping or pong with FIN clear (1002).
    FragmentedControl,
    /// A close, ping or pong payload over 125 bytes (1002).
    ControlTooLong,
    /// A 64-bit length with its most significant bit set (1002).
    LengthOverflow,
    /// A server received a frame without a mask (1002).
    UnmaskedClientFrame,
    /// A client received a masked frame (1002).
    MaskedServerFrame,
    /// A continuation frame arrived with no fragmented message to continue (1002).
    ContinuationWithoutMessage,
    /// A text or binary frame arrived inside a fragmented message (1002).
    MessageInsideFragmented,
    /// A close frame with a payload of exactly one byte (1002).
    CloseOneByte,
    /// A close code that may not be sent on the wire (1002).
    InvalidCloseCode,
    /// A message over the configured limit, compressed or not (1009).
    MessageTooBig,
    /// A text message that is not UTF-8 (1007).
    InvalidUtf8,
    /// A text message that ends inside a character (1007).
    CutUtf8,
    /// A compressed message that does not inflate (1007).
    InvalidCompressedData,
    /// A close reason that is not UTF-8 (1007).
    CloseReasonNotUtf8,
}

impl ProtocolError {
    /// The close code sent: 1002, 1007 or 1009.
    pub const fn code(self) -> u16 {
        // Variants are declared 1002 first, then 1009, then 1007 (checked by a test).
        match self as u8 {
            0..=10 => 1002,
            11 => 1009,
            _ => 1007,
        }
    }

    /// What the peer did wrong: the close reason sent with [`code`](Self::code).
    pub const fn reason(self) -> &'static str {
        // One table in declaration order: a `match` made one load pair per variant, 200 bytes
        // of `.text` in the firmware image.
        const REASONS: [&str; 16] = [
            "reserved bits set",
            "reserved opcode",
            "fragmented control frame",
            "control frame over 125 bytes",
            "payload length over 2^63",
            "client frame not masked",
            "server frame masked",
            "continuation frame without a message to continue",
            "new message inside a fragmented message",
            "close frame with a 1-byte payload",
            "invalid close code",
            "message too big",
            "invalid UTF-8 in text message",
            "text message ends inside a character",
            "invalid compressed data",
            "close reason is not UTF-8",
        ];
        REASONS[self as usize]
    }
}

impl core::fmt::Display for ProtocolError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "{} ({})", self.reason(), self.code())
    }
}

impl core::error::Error for ProtocolError {}

/// Returned when sending on a connection that is not open.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NotOpen;

impl core::fmt::Display for NotOpen {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str("connection is not open")
    }
}

impl core::error::Error for NotOpen {}

/// What a deadline did, from [`Connection::handle_timeout`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Timeout {
    /// The peer was silent for the ping interval: a ping is queued.
    Ping,
    /// The peer was silent too long: a close frame with `1001` is queued.
    Idle,
    /// The opening handshake did not finish in time: drop the transport.
    Handshake,
    /// The close handshake, or the wait for the end of the stream after it, ran out: drop
    /// the transport.
    Close,
}

/// A frame whose payload is still arriving.
#[derive(Clone, Copy, Debug)]
struct FrameInProgress {
    header: FrameHeader,
    /// Payload bytes already consumed.
    done: u64,
}

/// What a client remembers between its request and the server's answer.
struct ClientPending {
    key: String,
    protocols: Vec<String>,
    extensions_offered: bool,
    /// The request offered [`deflate::CLIENT_OFFER`]: the answer is checked against it.
    #[cfg(feature = "deflate")]
    deflate_offered: bool,
}

/// The client's side of the opening handshake, behind a trait object: only programs that create
/// client connections link it (a server-only build or firmware image does not carry it).
trait AnswerCheck: Send + Sync {
    /// Reads (part of) the server's answer for `conn`, which has taken this check out of its
    /// parser state and gets it back while the answer is incomplete.
    fn read(
        self: Box<Self>,
        conn: &mut Connection,
        max_head: usize,
        now: u64,
        data: &[u8],
    ) -> Result<(usize, Option<Event<'static>>), Error>;
    fn check(&self, buf: &[u8], eof: bool) -> Result<Option<(Response, usize)>, ResponseError>;
    fn heap_bytes(&self) -> usize;
}

impl AnswerCheck for ClientPending {
    fn read(
        self: Box<Self>,
        conn: &mut Connection,
        max_head: usize,
        now: u64,
        data: &[u8],
    ) -> Result<(usize, Option<Event<'static>>), Error> {
        // At the limit, a refusal is reported with as much of its body as came; a head still
        // incomplete there is too large.
        let head = conn.read_head(data, max_head, ResponseError::TooLarge, |b, full| {
            match self.check(b, full) {
                Err(ResponseError::CutShort) => Err(ResponseError::TooLarge),
                r => r,
            }
        });
        match head {
            Ok(None) => {
                conn.partial.get_or_insert_with(Partial::new).client = Some(self);
                Ok((data.len(), None))
            }
            Ok(Some((response, used))) => {
                #[cfg(feature = "deflate")]
                match self.deflate(&response) {
                    Ok(Some(agreed)) => conn.set_deflate(agreed),
                    Ok(None) => {}
                    Err(e) => {
                        conn.set_closed(now);
                        return Err(Error::Response(Box::new(e)));
                    }
                }
                conn.set_state(State::Open, now);
                Ok((used, Some(Event::Open(Box::new(response)))))
            }
            Err(e) => {
                conn.set_closed(now);
                Err(Error::Response(Box::new(e)))
            }
        }
    }
    fn check(&self, buf: &[u8], eof: bool) -> Result<Option<(Response, usize)>, ResponseError> {
        handshake::parse_response(buf, &self.key, &self.protocols, self.extensions_offered, eof)
    }
    fn heap_bytes(&self) -> usize {
        core::mem::size_of::<ClientPending>() + self.key.capacity()
    }
}

impl ClientPending {
    /// What an accepted answer agreed to about permessage-deflate.
    #[cfg(feature = "deflate")]
    fn deflate(&self, response: &Response) -> Result<Option<Agreed>, ResponseError> {
        match (&response.extensions, self.deflate_offered) {
            (Some(e), true) => {
                deflate::negotiate_client(&[e.as_bytes()]).map_err(|e| ResponseError::Invalid(e.message()))
            }
            _ => Ok(None),
        }
    }
}

/// Parser state that exists only while something is split across calls.
struct Partial {
    /// Bytes of a frame header cut by the end of a read.
    head: [u8; MAX_HEADER_LEN],
    head_len: u8,
    frame: Option<FrameInProgress>,
    /// The data message being assembled (Text or Binary), if any.
    message: Option<OpCode>,
    utf8: Utf8Validator,
    /// The message so far (or, while connecting, the handshake head so far).
    buf: Vec<u8>,
    /// Bytes of the current message read but not kept (it arrived after this end's close).
    skipped: u64,
    /// A control frame's payload so far (allocated only while one is split across reads).
    control: Vec<u8>,
    /// Bytes of the frame in progress read since the last activity (see `Connection::read`).
    trickle: u16,
    client: Option<Box<dyn AnswerCheck>>,
    /// The message being assembled had RSV1 set: `buf` holds it compressed.
    compressed: bool,
    /// Client whose server keeps its context: what it received last (kept between messages).
    window: Option<InflateWindow>,
}

impl Partial {
    fn new() -> Box<Partial> {
        Box::new(Partial {
            head: [0; MAX_HEADER_LEN],
            head_len: 0,
            frame: None,
            message: None,
            utf8: Utf8Validator::new(),
            buf: Vec::new(),
            skipped: 0,
            control: Vec::new(),
            trickle: 0,
            client: None,
            compressed: false,
            window: None,
        })
    }

    fn is_empty(&self) -> bool {
        self.head_len == 0
            && self.frame.is_none()
            && self.message.is_none()
            && self.buf.is_empty()
            && self.client.is_none()
            && self.window.is_none()
    }

    /// Whether the message being assembled is compressed.
    fn is_compressed(&self) -> bool {
        deflate::COMPILED && self.compressed && self.message.is_some()
    }

    /// Heap bytes of the inflate window, if any.
    fn window_bytes(&self) -> usize {
        self.window.as_ref().map_or(0, InflateWindow::heap_bytes)
    }
}

// Connection flags.
const CLIENT: u8 = 1;
/// A heartbeat ping is outstanding.
const PINGED: u8 = 2;
/// Server: a request was handed out and awaits its answer.
const AWAITING_ANSWER: u8 = 4;
/// Closing, and this end's close frame is still waiting behind data the peer has not read
/// (see `sending`).
const CLOSE_QUEUED: u8 = 8;
/// permessage-deflate: the peer keeps its LZ77 context between messages.
const PEER_TAKEOVER: u8 = 16;

/// One WebSocket connection's protocol state.
pub struct Connection {
    partial: Option<Box<Partial>>,
    /// The loop clock (low 32 bits, milliseconds) of the last activity or state change.
    since: u32,
    state: State,
    flags: u8,
    /// permessage-deflate, when agreed (one byte; nothing without the `deflate` feature). The
    /// connection stays 16 bytes (12 on 32-bit targets) because the count of a trickled frame
    /// lives in `Partial`.
    deflate: Agreement,
}

impl core::fmt::Debug for Connection {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Connection")
            .field("role", &self.role())
            .field("state", &self.state)
            .field("buffering", &self.partial.is_some())
            .finish()
    }
}

/// The deadline `d` after the clock reading `since`, never early: the clock reads whole
/// milliseconds rounded down, so the wait is rounded up and given one millisecond more.
pub(crate) fn deadline_after(since: u64, d: Duration) -> u64 {
    let ms = d.as_millis().min(u128::from(u64::MAX >> 2)) as u64;
    since.saturating_add(ms + u64::from(d.subsec_nanos() % 1_000_000 != 0) + 1)
}

impl Connection {
    /// A server connection that waits for the upgrade request; the handshake timeout runs
    /// from `now`.
    pub fn server(now: u64) -> Self {
        Connection {
            partial: None,
            since: now as u32,
            state: State::Connecting,
            flags: 0,
            deflate: Agreement::NONE,
        }
    }

    /// A client connection: writes the upgrade request to `out` and waits for the answer.
    /// The handshake timeout runs from `now`.
    pub fn client<R: RandomSource + ?Sized>(request: &ClientRequest, now: u64, rng: &mut R, out: &mut Vec<u8>) -> Self {
        let mut nonce = [0u8; 16];
        rng.fill(&mut nonce);
        let key = handshake::client_key(nonce);
        request.write(&key, out);
        let mut p = Partial::new();
        p.client = Some(Box::new(ClientPending {
            key,
            protocols: request.protocols.clone(),
            extensions_offered: request.extensions.is_some(),
            #[cfg(feature = "deflate")]
            deflate_offered: request.extensions.as_deref() == Some(deflate::CLIENT_OFFER),
        }));
        Connection {
            partial: Some(p),
            since: now as u32,
            state: State::Connecting,
            flags: CLIENT,
            deflate: Agreement::NONE,
        }
    }

    /// A connection that is already open (the handshake was done elsewhere).
    pub fn open(role: Role, now: u64) -> Self {
        Connection {
            partial: None,
            since: now as u32,
            state: State::Open,
            flags: if role == Role::Client { CLIENT } else { 0 },
            deflate: Agreement::NONE,
        }
    }

    /// The current state.
    pub fn state(&self) -> State {
        self.state
    }

    /// The role.
    pub fn role(&self) -> Role {
        if self.flags & CLIENT != 0 {
            Role::Client
        } else {
            Role::Server
        }
    }

    /// Whether messages may be sent.
    pub fn is_open(&self) -> bool {
        self.state == State::Open
    }

    /// Whether parser state is allocated (something is split across reads).
    pub fn is_buffering(&self) -> bool {
        self.partial.is_some()
    }

    /// Heap bytes this connection holds now: its parser state, the message it assembles
    /// (compressed, for a compressed message) and, on a client whose server keeps its
    /// compression context, the inflate window.
    #[inline]
    pub fn buffered_bytes(&self) -> usize {
        self.partial.as_ref().map_or(0, |p| {
            core::mem::size_of::<Partial>()
                + p.buf.capacity()
                + p.control.capacity()
                + p.client.as_ref().map_or(0, |c| c.heap_bytes())
                + p.window_bytes()
        })
    }

    /// The permessage-deflate parameters this connection agreed on, if it did.
    #[cfg(feature = "deflate")]
    pub fn deflate(&self) -> Option<Agreed> {
        self.deflate.agreed(self.flags & PEER_TAKEOVER != 0)
    }

    #[cfg(feature = "deflate")]
    fn set_deflate(&mut self, a: Agreed) {
        self.deflate = Agreement::new(&a);
        if a.recv_context_takeover {
            self.flags |= PEER_TAKEOVER;
        }
    }

    /// RSV1 marks the first frame of a compressed message, once compression is agreed
    /// (RFC 7692 §6); anywhere else it is a reserved bit. Decided, as the other header checks,
    /// as soon as two bytes of the header are in. Without the `deflate` feature
    /// [`FrameHeader::parse`] refuses RSV1 as it does RSV2 and RSV3.
    #[inline]
    fn check_rsv1(&self, head: &[u8]) -> Result<(), ProtocolError> {
        if !deflate::COMPILED {
            return Ok(());
        }
        let [b0, _, ..] = *head else { return Ok(()) };
        let allowed = self.deflate.is_agreed() && matches!(b0 & 0x0f, 0x1 | 0x2);
        if b0 & 0x40 != 0 && !allowed {
            return Err(ProtocolError::ReservedBits);
        }
        Ok(())
    }

    /// Whether a fragmented or split message is being assembled.
    pub fn in_message(&self) -> bool {
        self.partial
            .as_ref()
            .is_some_and(|p| p.message.is_some() || p.frame.is_some())
    }

    fn mask<R: RandomSource + ?Sized>(&self, rng: &mut R) -> Option<[u8; 4]> {
        (self.flags & CLIENT != 0).then(|| rng.mask_key())
    }

    fn set_state(&mut self, state: State, now: u64) {
        self.state = state;
        self.since = now as u32;
        if state == State::Closed {
            self.free_partial();
        }
    }

    /// Tells the connection whether what it wrote is still waiting to go out (`pending`) or
    /// has all been handed to the transport. While closing, a close frame that waits behind
    /// data a slow peer has not read yet gets ten times the close timeout; once everything has
    /// left, the close timeout starts over. Drivers that never call this get the plain close
    /// timeout from the moment the close started.
    pub fn output_pending(&mut self, pending: bool, now: u64) {
        if !matches!(self.state, State::LocalClosing | State::Closed) {
            return;
        }
        if pending {
            self.flags |= CLOSE_QUEUED;
        } else if self.flags & CLOSE_QUEUED != 0 {
            self.flags &= !CLOSE_QUEUED;
            self.since = now as u32;
        }
    }

    /// Frees the parser state. Out of line: its drop code would otherwise sit in the message
    /// path that inlines `read` (measured: 4 instructions more per echoed message).
    #[cold]
    #[inline(never)]
    fn free_partial(&mut self) {
        self.partial = None;
    }

    /// Marks the connection closed without a close handshake (the transport dropped).
    pub fn set_closed(&mut self, now: u64) {
        self.set_state(State::Closed, now);
    }

    /// The peer ended its side of the stream. A client still waiting for the answer gets the
    /// reason it will not come (or the refusal that came with it); otherwise the connection is
    /// simply closed: a peer that vanishes without a close frame is an abnormal closure (1006).
    pub fn read_eof(&mut self, now: u64) -> Option<Error> {
        let mut failure = None;
        if self.state == State::Connecting && self.flags & CLIENT != 0 {
            if let Some(p) = &self.partial {
                if let Some(c) = &p.client {
                    if let Err(e) = c.check(&p.buf, true) {
                        failure = Some(Error::Response(Box::new(e)));
                    }
                }
            }
            failure.get_or_insert_with(|| Error::Response(Box::new(ResponseError::NoAnswer)));
        }
        self.set_closed(now);
        failure
    }

    /// Processes received bytes; returns how many it used and at most one event.
    ///
    /// `data` is unmasked in place, and message events borrow it. Call again with the bytes
    /// after the used ones until all are used; a call that uses nothing and gives no event
    /// means the connection waits for [`accept`](Self::accept). Protocol answers (the pong to a
    /// ping, the reply to a close) are appended to `out` before the event is returned, so
    /// replies the caller writes to the same `out` stay in order with them. On an error the
    /// close frame or HTTP refusal is queued after everything earlier events produced.
    ///
    /// A connection that agreed on permessage-deflate should be read with
    /// `read_with` and the loop's codec; read here, each compressed message
    /// gets a decompressor of its own (7 KB of zlib state and a 32 KiB window, freed after).
    pub fn read<'d, R: RandomSource + ?Sized>(
        &mut self,
        cfg: &Config,
        now: u64,
        data: &'d mut [u8],
        rng: &mut R,
        out: &mut Vec<u8>,
    ) -> Result<(usize, Option<Event<'d>>), Error> {
        self.read_inner(cfg, now, data, None, rng, out)
    }

    /// [`read`](Self::read) with the loop's permessage-deflate codec, which inflates the
    /// compressed messages of every connection that agreed on it (without the `deflate`
    /// feature the codec is a zero-sized placeholder, and this is `read`).
    pub fn read_with<'d, R: RandomSource + ?Sized>(
        &mut self,
        cfg: &Config,
        now: u64,
        data: &'d mut [u8],
        codec: &mut Codec,
        rng: &mut R,
        out: &mut Vec<u8>,
    ) -> Result<(usize, Option<Event<'d>>), Error> {
        self.read_inner(cfg, now, data, Some(codec), rng, out)
    }

    #[inline]
    fn read_inner<'d, R: RandomSource + ?Sized>(
        &mut self,
        cfg: &Config,
        now: u64,
        data: &'d mut [u8],
        codec: CodecRef<'_>,
        rng: &mut R,
        out: &mut Vec<u8>,
    ) -> Result<(usize, Option<Event<'d>>), Error> {
        if self.partial.is_none() && self.state == State::Open {
            if let Some((head, len)) = self.small_message(cfg, data) {
                return self.take_small(now, data, head, len, rng, out, |p| Some(Event::Message(p)));
            }
        }
        let result = match self.state {
            State::Connecting if self.flags & CLIENT != 0 => self.read_response(cfg, now, data),
            State::Connecting => self.read_request(cfg, now, data, out),
            State::Open | State::LocalClosing => {
                let open = self.state == State::Open;
                match self.read_frames(cfg, now, data, codec, rng, out) {
                    Ok((used, ev)) => {
                        // Activity, for the heartbeat and idle timeout, is a frame that
                        // completes or at least 4 KiB of one: a peer that trickles a frame a
                        // byte at a time is idle. Only a frame in progress keeps a count.
                        let trickled = match self.partial.as_deref_mut() {
                            Some(p) if p.frame.is_some() && ev.is_none() => {
                                p.trickle = p.trickle.saturating_add(used.min(usize::from(u16::MAX)) as u16);
                                p.trickle
                            }
                            _ => u16::MAX,
                        };
                        if open && used > 0 && trickled >= 4096 {
                            self.since = now as u32;
                            self.flags &= !PINGED;
                            if let Some(p) = self.partial.as_deref_mut() {
                                p.trickle = 0;
                            }
                        }
                        Ok((used, ev))
                    }
                    Err(e) => Err(Error::Protocol(self.fail(e, now, rng, out))),
                }
            }
            State::Closed => Ok((data.len(), None)),
        };
        if self.partial.as_ref().is_some_and(|p| p.is_empty()) {
            self.free_partial();
        }
        result
    }

    /// The common case, decided on the first two bytes: a whole, final text or binary frame
    /// under 126 bytes, masked as the role requires, with no parser state. Returns the header
    /// and payload lengths; `None` sends everything else down the general path (which handles
    /// these frames too).
    #[inline]
    fn small_message(&self, cfg: &Config, data: &[u8]) -> Option<(usize, usize)> {
        let [b0, b1, ..] = *data else { return None };
        let masked = b1 & 0x80 != 0;
        // FIN and no reserved bits: exactly 0x81 (text) or 0x82 (binary).
        if !(b0 == 0x81 || b0 == 0x82) || masked == (self.flags & CLIENT != 0) {
            return None;
        }
        let len = usize::from(b1 & 0x7f);
        let head = if masked { 6 } else { 2 };
        (len < 126 && len <= cfg.max_message && data.len() >= head + len).then_some((head, len))
    }

    /// [`read`](Self::read) for the usual message only, for a caller that checks for it before
    /// calling `read`, so that the message reaches it without the general parser's result:
    /// a whole, final text or binary frame under 126 bytes on an open connection with no
    /// parser state (see [`small_message`](Self::small_message)). `None` for anything else,
    /// having used nothing.
    #[cfg(any(feature = "server", feature = "client"))]
    #[inline(always)]
    pub(crate) fn read_small<'d, R: RandomSource + ?Sized>(
        &mut self,
        cfg: &Config,
        now: u64,
        data: &'d mut [u8],
        rng: &mut R,
        out: &mut Vec<u8>,
    ) -> Option<Result<(usize, Payload<'d>), Error>> {
        if self.partial.is_some() || self.state != State::Open {
            return None;
        }
        let (head, len) = self.small_message(cfg, data)?;
        Some(self.take_small(now, data, head, len, rng, out, |p| p))
    }

    /// Hands out the frame [`small_message`](Self::small_message) found, its payload as `wrap`
    /// makes it (`read` wraps it into an event inside, rather than mapping the result after:
    /// 96 bytes less of the firmware core's `.text`, tests/firmware.rs).
    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    fn take_small<'d, R: RandomSource + ?Sized, T>(
        &mut self,
        now: u64,
        data: &'d mut [u8],
        head: usize,
        len: usize,
        rng: &mut R,
        out: &mut Vec<u8>,
        wrap: impl FnOnce(Payload<'d>) -> T,
    ) -> Result<(usize, T), Error> {
        let text = data[0] == 0x81;
        let (h, rest) = data.split_at_mut(head);
        let payload = &mut rest[..len];
        if head == 6 {
            apply_mask(payload, [h[2], h[3], h[4], h[5]], 0);
        }
        self.since = now as u32;
        self.flags &= !PINGED;
        let payload: &'d [u8] = payload;
        let p = if text {
            match core::str::from_utf8(payload) {
                Ok(t) => Payload::Text(t),
                Err(e) => {
                    let e = self.fail(utf8_error(e), now, rng, out);
                    return Err(Error::Protocol(e));
                }
            }
        } else {
            Payload::Binary(payload)
        };
        Ok((head + len, wrap(p)))
    }

    /// Feeds all of `data`, handing each event to `on_event` with `out`. A server accepts every
    /// valid upgrade (use [`read`](Self::read) and [`accept`](Self::accept) to decide).
    pub fn receive<R, F>(
        &mut self,
        cfg: &Config,
        now: u64,
        data: &mut [u8],
        rng: &mut R,
        out: &mut Vec<u8>,
        mut on_event: F,
    ) -> Result<(), Error>
    where
        R: RandomSource + ?Sized,
        F: FnMut(Event<'_>, &mut Vec<u8>),
    {
        let mut pos = 0;
        while pos < data.len() {
            let (used, ev) = self.read(cfg, now, &mut data[pos..], rng, out)?;
            pos += used;
            match ev {
                Some(Event::Request(req)) => {
                    on_event(Event::Request(req.clone()), out);
                    self.accept(&req, &Answer::accept(), None, now, out);
                }
                Some(ev) => on_event(ev, out),
                None if used == 0 => break,
                None => {}
            }
        }
        Ok(())
    }

    /// Collects a handshake head that may arrive in pieces. `parse` sees everything received so
    /// far, up to `max_len` bytes, and whether that is all it will see (the limit is reached); on
    /// success this gives its value and how many bytes of `data` the head used. Whole or cut up,
    /// the head is judged on the same bytes, so the verdict does not depend on how it arrived.
    fn read_head<T, E>(
        &mut self,
        data: &[u8],
        max_len: usize,
        too_large: E,
        parse: impl FnOnce(&[u8], bool) -> Result<Option<(T, usize)>, E>,
    ) -> Result<Option<(T, usize)>, E> {
        let spilled = self.partial.as_ref().map_or(0, |p| p.buf.len());
        let took = max_len.saturating_sub(spilled).min(data.len());
        let full = spilled + took >= max_len;
        let result = if spilled == 0 {
            parse(&data[..took], full)
        } else {
            let p = self.partial.as_mut().expect("spilled implies partial");
            p.buf.extend_from_slice(&data[..took]);
            parse(&p.buf, full)
        };
        match result {
            Err(e) => Err(e),
            Ok(Some((value, len))) => {
                if let Some(p) = &mut self.partial {
                    p.buf = Vec::new();
                }
                Ok(Some((value, len.saturating_sub(spilled).min(took))))
            }
            Ok(None) if full => Err(too_large),
            Ok(None) => {
                if spilled == 0 {
                    self.partial
                        .get_or_insert_with(Partial::new)
                        .buf
                        .extend_from_slice(data);
                }
                Ok(None)
            }
        }
    }

    fn read_request<'d>(
        &mut self,
        cfg: &Config,
        now: u64,
        data: &'d mut [u8],
        out: &mut Vec<u8>,
    ) -> Result<(usize, Option<Event<'d>>), Error> {
        if self.flags & AWAITING_ANSWER != 0 {
            return Ok((0, None));
        }
        let too_large = Reject::new(431, "request head too large");
        match self.read_head(data, cfg.max_head, too_large, |b, _| handshake::parse_request(b)) {
            Ok(None) => Ok((data.len(), None)),
            Ok(Some((req, used))) => {
                self.flags |= AWAITING_ANSWER;
                Ok((used, Some(Event::Request(Box::new(req)))))
            }
            Err(r) => {
                r.write_core(out);
                self.set_closed(now);
                Err(Error::Rejected(r))
            }
        }
    }

    /// Answers the request handed out by [`read`](Self::read): upgrades (the connection is then
    /// open) or refuses (the connection is closed once the answer is written). `extensions` is
    /// the negotiated `Sec-WebSocket-Extensions` value, if any. Returns whether it upgraded.
    pub fn accept(
        &mut self,
        request: &Request,
        answer: &Answer,
        extensions: Option<&str>,
        now: u64,
        out: &mut Vec<u8>,
    ) -> bool {
        if self.state != State::Connecting || self.flags & (AWAITING_ANSWER | CLIENT) != AWAITING_ANSWER {
            return false;
        }
        self.flags &= !AWAITING_ANSWER;
        let upgraded = request.write_answer(answer, extensions, out);
        self.set_state(if upgraded { State::Open } else { State::Closed }, now);
        upgraded
    }

    /// [`accept`](Self::accept) with permessage-deflate negotiated per `config`: when the
    /// request offers it and the answer upgrades, the answer carries the agreed
    /// `Sec-WebSocket-Extensions` (always with both `no_context_takeover` parameters, so this
    /// connection holds no compression state) and the connection compresses from then on.
    #[cfg(feature = "deflate")]
    pub fn accept_deflate(
        &mut self,
        request: &Request,
        answer: &Answer,
        config: &DeflateConfig,
        now: u64,
        out: &mut Vec<u8>,
    ) -> bool {
        let accepted = match answer {
            Answer::Accept { .. } if config.enabled => {
                let offers: Vec<&[u8]> = request.extensions().collect();
                deflate::negotiate_server(&offers, config)
            }
            _ => None,
        };
        let upgraded = self.accept(
            request,
            answer,
            accepted.as_ref().map(|a| a.response.as_str()),
            now,
            out,
        );
        if let (true, Some(a)) = (upgraded, accepted) {
            self.set_deflate(a.agreed);
        }
        upgraded
    }

    fn read_response<'d>(
        &mut self,
        cfg: &Config,
        now: u64,
        data: &'d mut [u8],
    ) -> Result<(usize, Option<Event<'d>>), Error> {
        let Some(pending) = self.partial.as_mut().and_then(|p| p.client.take()) else {
            self.set_closed(now);
            return Err(Error::Response(Box::new(ResponseError::Malformed)));
        };
        pending.read(self, cfg.max_head, now, data)
    }

    /// Sends a whole message as one frame.
    pub fn send<R: RandomSource + ?Sized>(
        &mut self,
        msg: Message<'_>,
        rng: &mut R,
        out: &mut Vec<u8>,
    ) -> Result<(), NotOpen> {
        self.send_frame(msg.opcode(), true, msg.as_bytes(), rng, out)
    }

    /// [`send`](Self::send) for the usual reply, written where it is called: a message under
    /// 126 bytes on an open server connection that did not agree on compression. Returns
    /// false, writing nothing, in every other case: send it the general way then.
    #[cfg(any(feature = "server", feature = "client"))]
    #[inline(always)]
    pub(crate) fn send_small(&self, msg: &Message<'_>, out: &mut Vec<u8>) -> bool {
        let payload = msg.as_bytes();
        if self.state != State::Open || self.flags & CLIENT != 0 || self.deflate.is_agreed() || payload.len() >= 126 {
            return false;
        }
        super::frame::write_small_frame(out, true, msg.opcode(), payload);
        true
    }

    /// Starts sending `msg` whole as one frame whose payload the caller writes itself, right
    /// after the header appended to `out`: a large message then goes out from where it lies
    /// instead of being copied behind its header. Returns `Ok(false)`, appending nothing,
    /// where the payload cannot go on the wire as it is (a client masks it; with
    /// permessage-deflate agreed it may be compressed): [`send`](Self::send) it then.
    pub fn send_header(&mut self, msg: &Message<'_>, out: &mut Vec<u8>) -> Result<bool, NotOpen> {
        if self.state != State::Open {
            return Err(NotOpen);
        }
        if self.deflate.is_agreed() {
            return Ok(false);
        }
        if self.flags & CLIENT != 0 {
            return Ok(false);
        }
        let header = FrameHeader {
            fin: true,
            rsv1: false,
            opcode: msg.opcode(),
            mask: None,
            payload_len: msg.as_bytes().len() as u64,
        };
        let mut h = [0u8; MAX_HEADER_LEN];
        let n = header.encode(&mut h);
        out.extend_from_slice(&h[..n]);
        Ok(true)
    }

    /// [`send`](Self::send), compressed with the loop's codec where permessage-deflate was
    /// agreed and it pays (see [`Codec::compress`]). [`send`](Self::send) and
    /// [`send_frame`](Self::send_frame) never compress (RSV1 is per message: uncompressed
    /// messages are always allowed).
    /// Without the `deflate` feature the codec is a zero-sized placeholder, and this is `send`.
    #[inline]
    pub fn send_with<R: RandomSource + ?Sized>(
        &mut self,
        msg: Message<'_>,
        codec: &mut Codec,
        rng: &mut R,
        out: &mut Vec<u8>,
    ) -> Result<(), NotOpen> {
        if self.deflate.is_agreed() {
            return self.send_compressed(msg, codec, rng, out);
        }
        self.send(msg, rng, out)
    }

    /// [`send_with`](Self::send_with) where compression was agreed; kept out of line so that
    /// the path of connections without it stays as short as [`send`](Self::send).
    #[inline(never)]
    fn send_compressed<R: RandomSource + ?Sized>(
        &mut self,
        msg: Message<'_>,
        codec: &mut Codec,
        rng: &mut R,
        out: &mut Vec<u8>,
    ) -> Result<(), NotOpen> {
        if self.state != State::Open {
            return Err(NotOpen);
        }
        if let Some(agreed) = self.deflate.agreed(self.flags & PEER_TAKEOVER != 0) {
            if let Some(z) = codec.compress(&agreed, msg.as_bytes()) {
                super::frame::write_compressed_frame(out, msg.opcode(), self.mask(rng), z);
                return Ok(());
            }
        }
        write_frame(out, true, msg.opcode(), self.mask(rng), msg.as_bytes());
        Ok(())
    }

    /// Sends one frame of a message: the first with `Text` or `Binary`, later ones with
    /// `Continuation`, the last with `fin` set. Control opcodes go through [`ping`](Self::ping),
    /// [`pong`](Self::pong) and [`close`](Self::close).
    pub fn send_frame<R: RandomSource + ?Sized>(
        &mut self,
        opcode: OpCode,
        fin: bool,
        payload: &[u8],
        rng: &mut R,
        out: &mut Vec<u8>,
    ) -> Result<(), NotOpen> {
        if self.state != State::Open || opcode.is_control() {
            return Err(NotOpen);
        }
        write_frame(out, fin, opcode, self.mask(rng), payload);
        Ok(())
    }

    /// Sends a ping (payload truncated to 125 bytes).
    pub fn ping<R: RandomSource + ?Sized>(
        &mut self,
        payload: &[u8],
        rng: &mut R,
        out: &mut Vec<u8>,
    ) -> Result<(), NotOpen> {
        self.control(OpCode::Ping, payload, rng, out)
    }

    /// Sends an unsolicited pong (a heartbeat that expects no answer).
    pub fn pong<R: RandomSource + ?Sized>(
        &mut self,
        payload: &[u8],
        rng: &mut R,
        out: &mut Vec<u8>,
    ) -> Result<(), NotOpen> {
        self.control(OpCode::Pong, payload, rng, out)
    }

    fn control<R: RandomSource + ?Sized>(
        &mut self,
        op: OpCode,
        payload: &[u8],
        rng: &mut R,
        out: &mut Vec<u8>,
    ) -> Result<(), NotOpen> {
        if self.state != State::Open {
            return Err(NotOpen);
        }
        let n = payload.len().min(MAX_CONTROL_PAYLOAD);
        write_frame(out, true, op, self.mask(rng), &payload[..n]);
        Ok(())
    }

    /// Starts the close handshake. `code` must be valid on the wire (see
    /// [`close_code::is_valid`]); an invalid one is sent as 1000. The close timeout runs from
    /// `now`; incoming data messages are dropped until the peer's close frame arrives.
    pub fn close<R: RandomSource + ?Sized>(
        &mut self,
        code: u16,
        reason: &str,
        now: u64,
        rng: &mut R,
        out: &mut Vec<u8>,
    ) -> Result<(), NotOpen> {
        if self.state != State::Open {
            return Err(NotOpen);
        }
        let code = if close_code::is_valid(code) {
            code
        } else {
            close_code::NORMAL
        };
        write_close(out, self.mask(rng), Some(code), reason);
        self.set_state(State::LocalClosing, now);
        // A message being assembled will not be delivered: free it now.
        if let Some(p) = &mut self.partial {
            p.skipped += p.buf.len() as u64;
            p.buf = Vec::new();
        }
        Ok(())
    }

    fn fail<R: RandomSource + ?Sized>(
        &mut self,
        e: ProtocolError,
        now: u64,
        rng: &mut R,
        out: &mut Vec<u8>,
    ) -> ProtocolError {
        if self.state == State::Open {
            write_close(out, self.mask(rng), Some(e.code()), e.reason());
        }
        self.set_closed(now);
        e
    }

    /// When [`handle_timeout`](Self::handle_timeout) is next needed, on the caller's clock
    /// (`now` is any recent reading of it), or `None` while nothing is timed.
    pub fn poll_timeout(&self, cfg: &Config, now: u64) -> Option<u64> {
        if self.state == State::Open && cfg.ping_interval.is_none() && cfg.idle_timeout.is_none() {
            return None; // the common case, checked first: it runs after every read
        }
        let since = now.saturating_sub(u64::from((now as u32).wrapping_sub(self.since)));
        let after = match self.state {
            State::Connecting => cfg.handshake_timeout,
            State::Open => match (cfg.ping_interval, cfg.idle_timeout) {
                (Some(p), _) if self.flags & PINGED == 0 => p,
                (_, Some(idle)) => idle,
                (Some(p), None) => p + p,
                (None, None) => return None,
            },
            // While this end's close frame waits behind a slow reader it may wait ten times as
            // long; once it has left, the peer has the close timeout to finish.
            State::LocalClosing | State::Closed if self.flags & CLOSE_QUEUED != 0 => cfg.close_timeout * 10,
            State::LocalClosing | State::Closed => cfg.close_timeout,
        };
        Some(deadline_after(since, after))
    }

    /// Runs whatever deadline has passed at `now` (nothing when none has). What it queues goes
    /// to `out`.
    pub fn handle_timeout<R: RandomSource + ?Sized>(
        &mut self,
        cfg: &Config,
        now: u64,
        rng: &mut R,
        out: &mut Vec<u8>,
    ) -> Option<Timeout> {
        if self.poll_timeout(cfg, now).is_none_or(|d| d > now) {
            return None;
        }
        match self.state {
            State::Connecting => {
                self.set_closed(now);
                Some(Timeout::Handshake)
            }
            State::Open if cfg.ping_interval.is_some() && self.flags & PINGED == 0 => {
                let _ = self.ping(b"", rng, out);
                self.flags |= PINGED;
                Some(Timeout::Ping)
            }
            State::Open => {
                let _ = self.close(close_code::GOING_AWAY, "idle timeout", now, rng, out);
                Some(Timeout::Idle)
            }
            State::LocalClosing | State::Closed => {
                self.set_closed(now);
                Some(Timeout::Close)
            }
        }
    }

    fn read_frames<'d, R: RandomSource + ?Sized>(
        &mut self,
        cfg: &Config,
        now: u64,
        data: &'d mut [u8],
        mut codec: CodecRef<'_>,
        rng: &mut R,
        out: &mut Vec<u8>,
    ) -> Result<(usize, Option<Event<'d>>), ProtocolError> {
        let total = data.len();
        let mut rest = data;
        loop {
            let pos = total - rest.len();
            if !matches!(self.state, State::Open | State::LocalClosing) {
                // The close handshake ended: whatever follows is not read.
                return Ok((total, None));
            }
            if self.partial.as_ref().is_some_and(|p| p.frame.is_some()) {
                let (took, ev) = self.continue_frame(rest, cfg.max_message, now, codec.as_deref_mut(), rng, out)?;
                rest = &mut core::mem::take(&mut rest)[took..];
                if ev.is_some() {
                    return Ok((total - rest.len(), ev));
                }
                if self.partial.as_ref().is_some_and(|p| p.frame.is_some()) {
                    return Ok((total, None)); // all of `data` went into the unfinished frame
                }
                continue;
            }
            if rest.is_empty() {
                return Ok((pos, None));
            }
            // A header: from the spill if a previous read cut one, else straight from `data`.
            let spilled = self.partial.as_ref().map_or(0, |p| p.head_len as usize);
            let (header, used) = if spilled > 0 {
                let p = self.partial.as_mut().expect("spilled implies partial");
                let take = (MAX_HEADER_LEN - spilled).min(rest.len());
                p.head[spilled..spilled + take].copy_from_slice(&rest[..take]);
                let head = p.head;
                self.check_rsv1(&head[..spilled + take])?;
                let p = self.partial.as_mut().expect("spilled implies partial");
                match FrameHeader::parse(&p.head[..spilled + take]).map_err(frame_error)? {
                    Some((h, n)) => {
                        p.head_len = 0;
                        (h, n - spilled)
                    }
                    None => {
                        p.head_len = (spilled + take) as u8;
                        return Ok((total, None));
                    }
                }
            } else {
                self.check_rsv1(rest)?;
                match FrameHeader::parse(rest).map_err(frame_error)? {
                    Some(x) => x,
                    None => {
                        let p = self.partial.get_or_insert_with(Partial::new);
                        p.head[..rest.len()].copy_from_slice(rest);
                        p.head_len = rest.len() as u8;
                        return Ok((total, None));
                    }
                }
            };
            rest = &mut core::mem::take(&mut rest)[used..];
            self.check_header(&header, cfg.max_message)?;
            let len = header.payload_len;
            let in_message = self.partial.as_ref().is_some_and(|p| p.message.is_some());
            if len <= rest.len() as u64
                && (header.opcode.is_control() || (header.fin && !in_message && header.opcode != OpCode::Continuation))
            {
                // Fast path: the whole frame is here and it is a whole message or a control frame.
                let (payload, after) = core::mem::take(&mut rest).split_at_mut(len as usize);
                rest = after;
                if let Some(key) = header.mask {
                    apply_mask(payload, key, 0);
                }
                let ev = if header.opcode.is_control() {
                    self.on_control(header.opcode, payload, false, now, rng, out)?
                } else if deflate::COMPILED && header.rsv1 {
                    let message = self.inflate(header.opcode, payload, cfg.max_message, codec.as_deref_mut())?;
                    (self.state == State::Open).then_some(Event::Message(message))
                } else {
                    let payload: &'d [u8] = payload;
                    let p = match header.opcode {
                        OpCode::Text => Payload::Text(core::str::from_utf8(payload).map_err(utf8_error)?),
                        _ => Payload::Binary(payload),
                    };
                    (self.state == State::Open).then_some(Event::Message(p))
                };
                if ev.is_some() {
                    return Ok((total - rest.len(), ev));
                }
                continue;
            }
            // Slow path: the frame continues past this read, or belongs to a fragmented message.
            let p = self.partial.get_or_insert_with(Partial::new);
            if matches!(header.opcode, OpCode::Text | OpCode::Binary) {
                p.message = Some(header.opcode);
                p.utf8 = Utf8Validator::new();
                p.buf.clear();
                p.skipped = 0;
                if deflate::COMPILED {
                    p.compressed = header.rsv1;
                }
            }
            if header.opcode.is_control() {
                p.control = Vec::with_capacity(header.payload_len as usize);
            }
            p.frame = Some(FrameInProgress { header, done: 0 });
        }
    }

    /// Rules that depend on role and on what came before.
    fn check_header(&self, h: &FrameHeader, max_message: usize) -> Result<(), ProtocolError> {
        match (self.flags & CLIENT != 0, h.mask.is_some()) {
            (false, false) => return Err(ProtocolError::UnmaskedClientFrame),
            (true, true) => return Err(ProtocolError::MaskedServerFrame),
            _ => {}
        }
        if h.opcode.is_control() {
            return Ok(());
        }
        let Some(p) = self.partial.as_deref() else {
            // Nothing in progress: the common case.
            return match h.opcode {
                OpCode::Continuation => Err(ProtocolError::ContinuationWithoutMessage),
                _ if h.payload_len > wire_limit(max_message, h.rsv1) => Err(ProtocolError::MessageTooBig),
                _ => Ok(()),
            };
        };
        let in_message = p.message;
        match (h.opcode, in_message) {
            (OpCode::Continuation, None) => return Err(ProtocolError::ContinuationWithoutMessage),
            (OpCode::Text | OpCode::Binary, Some(_)) => return Err(ProtocolError::MessageInsideFragmented),
            _ => {}
        }
        let so_far = p.buf.len() as u64 + p.skipped;
        if so_far.saturating_add(h.payload_len) > wire_limit(max_message, p.is_compressed() || h.rsv1) {
            return Err(ProtocolError::MessageTooBig);
        }
        Ok(())
    }

    /// Feeds payload bytes to the frame in progress; returns how many of `data` it took and the
    /// event the frame completed, if any.
    fn continue_frame<R: RandomSource + ?Sized>(
        &mut self,
        data: &mut [u8],
        max_message: usize,
        now: u64,
        codec: CodecRef<'_>,
        rng: &mut R,
        out: &mut Vec<u8>,
    ) -> Result<(usize, Option<Event<'static>>), ProtocolError> {
        let p = self.partial.as_mut().expect("frame in progress implies partial");
        let mut f = p.frame.expect("checked by caller");
        let remaining = f.header.payload_len - f.done;
        let take = remaining.min(data.len() as u64) as usize;
        let chunk = &mut data[..take];
        if let Some(key) = f.header.mask {
            apply_mask(chunk, key, (f.done % 4) as usize);
        }
        f.done += take as u64;
        let complete = f.done == f.header.payload_len;
        p.frame = if complete { None } else { Some(f) };
        if f.header.opcode.is_control() {
            p.control.extend_from_slice(chunk);
            if !complete {
                return Ok((take, None));
            }
            let payload = core::mem::take(&mut p.control);
            let ev = self.on_control(f.header.opcode, &payload, true, now, rng, out)?;
            return Ok((take, ev.map(Event::into_owned)));
        }
        let compressed = p.is_compressed();
        if p.message == Some(OpCode::Text) && !compressed {
            p.utf8.feed(chunk).map_err(|_| ProtocolError::InvalidUtf8)?;
        }
        // After this end's close frame, data is read to find the peer's close but not kept.
        if self.state == State::Open {
            p.buf.extend_from_slice(chunk);
        } else {
            p.skipped += take as u64;
        }
        if !(complete && f.header.fin) {
            return Ok((take, None));
        }
        let kind = p.message.take();
        let buf = core::mem::take(&mut p.buf);
        p.skipped = 0;
        if compressed {
            // Whole: inflate it (checking text after), and free the compressed copy.
            let kind = kind.unwrap_or(OpCode::Binary);
            if self.state != State::Open {
                return Ok((take, None));
            }
            let message = self.inflate(kind, &buf, max_message, codec)?;
            drop(buf);
            return Ok((take, Some(Event::Message(message))));
        }
        if kind == Some(OpCode::Text) {
            p.utf8.finish().map_err(|_| ProtocolError::CutUtf8)?;
        }
        if self.state != State::Open {
            return Ok((take, None));
        }
        let payload = match kind {
            // Already checked piece by piece; this second pass only converts the type.
            Some(OpCode::Text) => Payload::OwnedText(String::from_utf8(buf).map_err(|_| ProtocolError::InvalidUtf8)?),
            _ => Payload::OwnedBinary(buf),
        };
        Ok((take, Some(Event::Message(payload))))
    }

    /// Inflates a whole compressed message (all its frames' payloads) into an owned payload, at
    /// most `max_message` bytes; text is checked once inflated. Without the `deflate` feature
    /// it is never called (RSV1 does not get past the header).
    fn inflate(
        &mut self,
        kind: OpCode,
        message: &[u8],
        max_message: usize,
        codec: CodecRef<'_>,
    ) -> Result<Payload<'static>, ProtocolError> {
        let mut own;
        let codec = match codec {
            Some(c) => c,
            None => {
                own = Codec::default();
                &mut own
            }
        };
        let window = if self.flags & PEER_TAKEOVER != 0 {
            let bits = self.deflate.recv_bits();
            let p = self.partial.get_or_insert_with(Partial::new);
            InflateWindow::kept(&mut p.window, bits)
        } else {
            None
        };
        let mut out = Vec::new();
        codec
            .decompress(window, message, max_message, &mut out)
            .map_err(|e| match e {
                InflateError::TooBig => ProtocolError::MessageTooBig,
                InflateError::Corrupt => ProtocolError::InvalidCompressedData,
            })?;
        Ok(match kind {
            OpCode::Text => Payload::OwnedText(String::from_utf8(out).map_err(|_| ProtocolError::InvalidUtf8)?),
            _ => Payload::OwnedBinary(out),
        })
    }

    /// Handles a whole control frame. `owned` says the payload must be copied out (it lives
    /// in the parser state, not in the caller's buffer).
    fn on_control<'d, R: RandomSource + ?Sized>(
        &mut self,
        op: OpCode,
        payload: &'d [u8],
        owned: bool,
        now: u64,
        rng: &mut R,
        out: &mut Vec<u8>,
    ) -> Result<Option<Event<'d>>, ProtocolError> {
        let bytes = |b: &'d [u8]| {
            if owned {
                Payload::OwnedBinary(b.to_vec())
            } else {
                Payload::Binary(b)
            }
        };
        match op {
            OpCode::Ping if self.state == State::Open => {
                write_frame(out, true, OpCode::Pong, self.mask(rng), payload);
                Ok(Some(Event::Ping(bytes(payload))))
            }
            OpCode::Pong if self.state == State::Open => Ok(Some(Event::Pong(bytes(payload)))),
            OpCode::Ping | OpCode::Pong => Ok(None),
            _ => {
                let (code, reason) = match payload.len() {
                    0 => (None, ""),
                    1 => return Err(ProtocolError::CloseOneByte),
                    _ => {
                        let code = u16::from_be_bytes([payload[0], payload[1]]);
                        if !close_code::is_valid(code) {
                            return Err(ProtocolError::InvalidCloseCode);
                        }
                        let reason =
                            core::str::from_utf8(&payload[2..]).map_err(|_| ProtocolError::CloseReasonNotUtf8)?;
                        (Some(code), reason)
                    }
                };
                if self.state == State::Open {
                    write_close(out, self.mask(rng), code, "");
                }
                self.set_closed(now);
                let reason = if owned {
                    Payload::OwnedText(String::from(reason))
                } else {
                    Payload::Text(reason)
                };
                Ok(Some(Event::Close { code, reason }))
            }
        }
    }
}

/// The most payload bytes a message may take on the wire. A compressed message may exceed
/// `max_message` by what deflate adds to data that does not shrink (5 bytes per stored block of
/// up to 64 KiB, and a few more); the inflated message is held to `max_message`.
fn wire_limit(max_message: usize, compressed: bool) -> u64 {
    let max = max_message as u64;
    if deflate::COMPILED && compressed {
        max + max / 1024 + 64
    } else {
        max
    }
}

/// The close reason for a text frame that arrived whole: the same one the piece-by-piece check
/// gives, so the peer is told the same thing however the bytes were cut.
fn utf8_error(e: core::str::Utf8Error) -> ProtocolError {
    if e.error_len().is_none() {
        ProtocolError::CutUtf8
    } else {
        ProtocolError::InvalidUtf8
    }
}

fn frame_error(e: super::frame::FrameError) -> ProtocolError {
    use super::frame::FrameError;
    match e {
        FrameError::ReservedBits => ProtocolError::ReservedBits,
        FrameError::ReservedOpcode(_) => ProtocolError::ReservedOpcode,
        FrameError::FragmentedControl => ProtocolError::FragmentedControl,
        FrameError::ControlTooLong => ProtocolError::ControlTooLong,
        FrameError::LengthOverflow => ProtocolError::LengthOverflow,
    }
}

#[cfg(test)]
mod tests {
    use super::super::rand::NoRandom;
    use super::*;

    /// A counter standing in for a random source, so tests are deterministic.
    struct Counter(u8);
    impl RandomSource for Counter {
        fn fill(&mut self, dest: &mut [u8]) {
            for b in dest {
                self.0 = self.0.wrapping_add(1);
                *b = self.0;
            }
        }
    }

    #[test]
    fn protocol_errors_carry_their_code_and_a_reason_that_fits_a_close_frame() {
        use ProtocolError::*;
        let all = [
            (ReservedBits, 1002, "reserved bits set"),
            (ReservedOpcode, 1002, "reserved opcode"),
            (FragmentedControl, 1002, "fragmented control frame"),
            (ControlTooLong, 1002, "control frame over 125 bytes"),
            (LengthOverflow, 1002, "payload length over 2^63"),
            (UnmaskedClientFrame, 1002, "client frame not masked"),
            (MaskedServerFrame, 1002, "server frame masked"),
            (
                ContinuationWithoutMessage,
                1002,
                "continuation frame without a message to continue",
            ),
            (MessageInsideFragmented, 1002, "new message inside a fragmented message"),
            (CloseOneByte, 1002, "close frame with a 1-byte payload"),
            (InvalidCloseCode, 1002, "invalid close code"),
            (MessageTooBig, 1009, "message too big"),
            (InvalidUtf8, 1007, "invalid UTF-8 in text message"),
            (CutUtf8, 1007, "text message ends inside a character"),
            (InvalidCompressedData, 1007, "invalid compressed data"),
            (CloseReasonNotUtf8, 1007, "close reason is not UTF-8"),
        ];
        for (e, code, reason) in all {
            assert_eq!(e.code(), code, "{e:?}");
            assert_eq!(e.reason(), reason, "{e:?}");
            // A close frame's payload is at most 125 bytes, two of them the code.
            assert!(!e.reason().is_empty() && e.reason().len() <= 123, "{e:?}");
            assert_eq!(e.to_string(), alloc::format!("{} ({code})", e.reason()));
        }
        let reasons: alloc::collections::BTreeSet<_> = all.iter().map(|(e, _, _)| e.reason()).collect();
        assert_eq!(reasons.len(), all.len(), "one reason per variant");
    }

    #[test]
    fn config_check_names_what_cannot_work() {
        assert_eq!(Config::default().check(), Ok(()));
        type Spoil = fn(&mut Config);
        let cases: [(Spoil, ConfigError); 5] = [
            (|c| c.max_message = 0, ConfigError::MessageLimitZero),
            (|c| c.max_head = 255, ConfigError::HeadLimitTooSmall),
            (
                |c| c.close_timeout = Duration::ZERO,
                ConfigError::HandshakeOrCloseTimeoutZero,
            ),
            (
                |c| c.idle_timeout = Some(MAX_TIMEOUT + Duration::from_secs(1)),
                ConfigError::TimeoutTooLong,
            ),
            (|c| c.ping_interval = Some(Duration::ZERO), ConfigError::TimeoutZero),
        ];
        for (spoil, want) in cases {
            let mut cfg = Config::default();
            spoil(&mut cfg);
            assert_eq!(cfg.check(), Err(want));
            assert_eq!(want.to_string(), want.message());
        }
    }

    #[test]
    fn events_and_results_are_small() {
        // They are returned for every message: large ones cost a copy each time.
        let w = core::mem::size_of::<usize>();
        assert!(core::mem::size_of::<Event<'_>>() <= 5 * w);
        assert!(core::mem::size_of::<Result<(usize, Option<Event<'_>>), Error>>() <= 7 * w);
    }

    #[test]
    fn idle_connection_is_small() {
        // 16 bytes on 64-bit targets, 12 on 32-bit ones: a pointer, a clock reading, two bytes.
        assert!(core::mem::size_of::<Connection>() <= 8 + core::mem::size_of::<usize>());
    }

    #[test]
    fn whole_life_of_a_client_and_a_server_talking() {
        let cfg = Config::default();
        let mut rng = Counter(0);
        let mut to_server = Vec::new();
        let mut client = Connection::client(&ClientRequest::new("h", "/x"), 0, &mut rng, &mut to_server);
        let mut server = Connection::server(0);
        let mut to_client = Vec::new();
        // The request arrives; the server accepts; the answer arrives.
        let (used, ev) = server
            .read(&cfg, 1, &mut to_server, &mut NoRandom, &mut to_client)
            .unwrap();
        let Some(Event::Request(req)) = ev else {
            panic!("no request")
        };
        assert_eq!((used, req.path()), (to_server.len(), "/x"));
        assert_eq!(
            server.read(&cfg, 1, &mut [1, 2], &mut NoRandom, &mut to_client),
            Ok((0, None))
        );
        assert!(server.accept(&req, &Answer::accept(), None, 1, &mut to_client));
        assert_eq!(server.state(), State::Open);
        server.send(Message::Text("hi"), &mut NoRandom, &mut to_client).unwrap();
        let mut bytes = core::mem::take(&mut to_client);
        let (used, ev) = client.read(&cfg, 2, &mut bytes, &mut rng, &mut to_server).unwrap();
        assert!(matches!(ev, Some(Event::Open(_))));
        assert!(!client.is_buffering(), "the handshake state is freed");
        let (_, ev) = client
            .read(&cfg, 2, &mut bytes[used..], &mut rng, &mut to_server)
            .unwrap();
        assert_eq!(ev, Some(Event::Message(Payload::Text("hi"))));
        // The client closes; the server replies; both end Closed.
        to_server.clear();
        client.close(1000, "bye", 3, &mut rng, &mut to_server).unwrap();
        let (_, ev) = server
            .read(&cfg, 4, &mut to_server, &mut NoRandom, &mut to_client)
            .unwrap();
        let Some(Event::Close { code, reason }) = ev else {
            panic!()
        };
        assert_eq!((code, reason.as_str()), (Some(1000), "bye"));
        assert_eq!(server.state(), State::Closed);
        let (_, ev) = client.read(&cfg, 5, &mut to_client, &mut rng, &mut to_server).unwrap();
        assert!(matches!(ev, Some(Event::Close { code: Some(1000), .. })));
        assert_eq!(client.state(), State::Closed);
    }

    #[test]
    fn a_header_sent_alone_is_the_frame_send_writes_up_to_its_payload() {
        let cfg = Config::default();
        let mut rng = Counter(0);
        let mut to_server = Vec::new();
        let mut client = Connection::client(&ClientRequest::new("h", "/x"), 0, &mut rng, &mut to_server);
        let mut server = Connection::server(0);
        let mut head = Vec::new();
        assert_eq!(server.send_header(&Message::Binary(b"x"), &mut head), Err(NotOpen));
        let mut to_client = Vec::new();
        let (_, ev) = server
            .read(&cfg, 1, &mut to_server, &mut NoRandom, &mut to_client)
            .unwrap();
        let Some(Event::Request(req)) = ev else {
            panic!("no request")
        };
        assert!(server.accept(&req, &Answer::accept(), None, 1, &mut to_client));
        let text = "t".repeat(70_000);
        let bin = vec![9u8; 126];
        for msg in [Message::Binary(&[]), Message::Binary(&bin), Message::Text(&text)] {
            let mut whole = Vec::new();
            server.send(msg, &mut NoRandom, &mut whole).unwrap();
            let mut head = b"before".to_vec();
            assert_eq!(server.send_header(&msg, &mut head), Ok(true));
            head.extend_from_slice(msg.as_bytes());
            assert_eq!(&head[..6], b"before", "appended, not overwritten");
            assert!(head[6..] == whole[..], "{} bytes: header differs", msg.as_bytes().len());
        }
        // A client masks its payload: it cannot go out as it lies.
        let mut bytes = core::mem::take(&mut to_client);
        let (_, ev) = client.read(&cfg, 2, &mut bytes, &mut rng, &mut to_server).unwrap();
        assert!(matches!(ev, Some(Event::Open(_))));
        let mut head = Vec::new();
        assert_eq!(client.send_header(&Message::Binary(&bin), &mut head), Ok(false));
        assert!(head.is_empty());
        #[cfg(feature = "deflate")]
        {
            // Compression agreed: the message may be compressed, so `send_with` encodes it.
            server.set_deflate(Agreed {
                send_window_bits: 15,
                recv_window_bits: 15,
                recv_context_takeover: false,
            });
            assert_eq!(server.send_header(&Message::Binary(&bin), &mut head), Ok(false));
            assert!(head.is_empty());
        }
    }

    #[test]
    fn deadlines_are_never_early() {
        assert_eq!(deadline_after(100, Duration::from_millis(5)), 106);
        assert_eq!(deadline_after(100, Duration::from_micros(5_500)), 107);
        assert_eq!(deadline_after(100, Duration::ZERO), 101);
    }

    #[test]
    fn timeouts_run_inside_the_connection() {
        let cfg = Config {
            ping_interval: Some(Duration::from_secs(1)),
            idle_timeout: Some(Duration::from_secs(3)),
            ..Config::default()
        };
        let mut out = Vec::new();
        // Handshake timeout.
        let mut c = Connection::server(0);
        assert_eq!(c.poll_timeout(&cfg, 0), Some(10_001));
        assert_eq!(c.handle_timeout(&cfg, 10_000, &mut NoRandom, &mut out), None);
        assert_eq!(
            c.handle_timeout(&cfg, 10_001, &mut NoRandom, &mut out),
            Some(Timeout::Handshake)
        );
        assert_eq!(c.state(), State::Closed);
        // Ping after silence, activity resets it, idle closes with 1001, close times out.
        let mut c = Connection::open(Role::Server, 0);
        assert_eq!(c.poll_timeout(&cfg, 0), Some(1_001));
        assert_eq!(
            c.handle_timeout(&cfg, 1_001, &mut NoRandom, &mut out),
            Some(Timeout::Ping)
        );
        assert_eq!(out, [0x89, 0x00]);
        assert_eq!(c.poll_timeout(&cfg, 1_001), Some(3_001));
        let mut pong = [0x8a, 0x80, 1, 2, 3, 4];
        c.read(&cfg, 2_000, &mut pong, &mut NoRandom, &mut out).unwrap();
        assert_eq!(
            c.poll_timeout(&cfg, 2_000),
            Some(3_001),
            "activity restarts the ping interval"
        );
        assert_eq!(
            c.handle_timeout(&cfg, 3_001, &mut NoRandom, &mut out),
            Some(Timeout::Ping)
        );
        out.clear();
        assert_eq!(
            c.handle_timeout(&cfg, 5_001, &mut NoRandom, &mut out),
            Some(Timeout::Idle)
        );
        assert_eq!(&out[..4], [0x88, 0x0e, 0x03, 0xe9]);
        assert_eq!(c.state(), State::LocalClosing);
        assert_eq!(c.poll_timeout(&cfg, 5_001), Some(8_002));
        assert_eq!(
            c.handle_timeout(&cfg, 8_002, &mut NoRandom, &mut out),
            Some(Timeout::Close)
        );
        assert_eq!(c.state(), State::Closed);
        // Nothing is timed on an open connection without heartbeat or idle timeout.
        let c = Connection::open(Role::Server, 0);
        assert_eq!(c.poll_timeout(&Config::default(), 0), None);
    }

    #[test]
    fn a_close_frame_stuck_behind_unread_data_waits_longer() {
        let cfg = Config::default(); // close timeout 3 s
        let mut out = Vec::new();
        let mut c = Connection::open(Role::Server, 0);
        c.close(1008, "slow consumer", 1000, &mut NoRandom, &mut out).unwrap();
        assert_eq!(c.poll_timeout(&cfg, 1000), Some(4_001));
        c.output_pending(true, 1000);
        assert_eq!(c.poll_timeout(&cfg, 1000), Some(31_001), "ten times, while it waits");
        c.output_pending(false, 20_000);
        assert_eq!(
            c.poll_timeout(&cfg, 20_000),
            Some(23_001),
            "then the close timeout from now"
        );
        // Open connections are not affected.
        let mut c = Connection::open(Role::Server, 0);
        c.output_pending(true, 5);
        assert_eq!(c.poll_timeout(&cfg, 5), None);
    }

    #[test]
    fn a_frame_trickled_a_byte_at_a_time_is_idle() {
        let cfg = Config {
            idle_timeout: Some(Duration::from_secs(10)),
            ..Config::default()
        };
        let mut out = Vec::new();
        let mut c = Connection::open(Role::Server, 0);
        // The header of a 1 MiB masked binary frame, then a byte every second.
        let mut head = [0x82, 0xff, 0, 0, 0, 0, 0, 0x10, 0, 0, 1, 2, 3, 4];
        c.read(&cfg, 0, &mut head, &mut NoRandom, &mut out).unwrap();
        for t in 1..=9 {
            c.read(&cfg, t * 1000, &mut [7], &mut NoRandom, &mut out).unwrap();
        }
        assert_eq!(c.poll_timeout(&cfg, 9000), Some(10_001), "no byte counted as activity");
        // 4 KiB of it does count.
        c.read(&cfg, 9500, &mut [7; 4096], &mut NoRandom, &mut out).unwrap();
        assert_eq!(c.poll_timeout(&cfg, 9500), Some(19_501));
        // So does a whole frame.
        let mut c = Connection::open(Role::Server, 0);
        let mut ping = [0x89, 0x80, 1, 2, 3, 4];
        c.read(&cfg, 5000, &mut ping, &mut NoRandom, &mut out).unwrap();
        assert_eq!(c.poll_timeout(&cfg, 5000), Some(15_001));
    }

    #[test]
    fn the_clock_may_wrap_32_bits() {
        let cfg = Config::default();
        let start = u64::from(u32::MAX) - 5;
        let c = Connection::server(start);
        assert_eq!(c.poll_timeout(&cfg, start + 100), Some(start + 10_001));
    }

    #[test]
    fn a_client_sees_eof_before_the_answer() {
        let mut rng = Counter(0);
        let mut out = Vec::new();
        let mut c = Connection::client(&ClientRequest::new("h", "/"), 0, &mut rng, &mut out);
        assert_eq!(c.read_eof(1), Some(Error::Response(Box::new(ResponseError::NoAnswer))));
        let mut c = Connection::client(&ClientRequest::new("h", "/"), 0, &mut rng, &mut out);
        let mut refusal = *b"HTTP/1.1 404 Not Found\r\nContent-Length: 5\r\n\r\nno";
        let n = refusal.len();
        assert_eq!(
            c.read(&Config::default(), 1, &mut refusal, &mut rng, &mut out),
            Ok((n, None))
        );
        let Some(Error::Response(e)) = c.read_eof(2) else {
            panic!()
        };
        let ResponseError::Status { code, body, .. } = *e else {
            panic!()
        };
        assert_eq!((code, body.as_str()), (404, "no"));
    }
}
