//! What the fuzz targets share: the input layout, a deterministic random source, and a driver
//! that feeds a [`Connection`] a byte stream in pieces and records everything it does.
//!
//! Each target's input is a 12-byte [`Plan`] followed by the bytes the peer sends, so a
//! corpus file is mostly wire bytes (see `fuzz/make_seeds.py`).
//!
//! The driver checks, on every call: `read` never uses more than it is given and always makes
//! progress; an error leaves the connection closed with nothing buffered, queues exactly the
//! close frame or HTTP refusal it reports, and nothing is read or written after it; a refusal
//! is a 4xx/5xx; message events come only while open; a handshake answer written by
//! `accept` passes the client's own check; a deadline fires exactly when `poll_timeout` says
//! it is due, and does what its kind says. [`check_split`] then compares a run with the
//! stream cut into pieces (with time passing between them) against a run with the stream
//! whole: same events, same output bytes, same state, same error.

use arbitrary::{Arbitrary, Unstructured};
use core::time::Duration;

use wsloop::proto::frame::{FrameHeader, OpCode};
use wsloop::proto::handshake::{self, accept_key, parse_response};
use wsloop::proto::mask::apply_mask;
use wsloop::proto::rand::RandomSource;
use wsloop::proto::{
    Answer, ClientRequest, Config, Connection, Error, Event, Payload, Request, Response, ResponseError, Role, State,
    Timeout,
};

/// The first 12 bytes of every input: how to run the stream that follows.
#[derive(Arbitrary, Clone, Copy, Debug, Default)]
pub struct Plan {
    /// Bit 0: client role. Bit 1: the stream starts with a valid handshake head (the
    /// `connection_split` target). Bit 2: this end closes before reading. Bit 3: the peer
    /// ends the stream after the last byte (`read_eof`). Bit 4: the clock starts just below
    /// 2^32 (deadlines are 32-bit offsets). Bit 5: long pauses between pieces. Bits 6-7: how
    /// `max_message` is read (see [`Plan::config`]).
    pub flags: u8,
    /// The message limit (see [`Plan::config`]).
    pub max_message: u16,
    /// The handshake head limit: 256 + this modulo 8192 (0: the default, 8 KiB).
    pub max_head: u16,
    /// How many cuts (modulo 33).
    pub cuts: u8,
    /// Where the cuts fall and how much time passes between pieces.
    pub seed: u32,
    /// Server: how the request is answered. Client: what the request offers.
    pub answer: u8,
    /// Low nibble: ping interval in quarter seconds; high nibble: idle timeout in half
    /// seconds (0: off).
    pub timers: u8,
}

/// An input: the plan, then the stream.
#[derive(Debug)]
pub struct Input<'a> {
    /// How to run it.
    pub plan: Plan,
    /// What the peer sends.
    pub stream: &'a [u8],
}

impl<'a> Arbitrary<'a> for Input<'a> {
    fn arbitrary(u: &mut Unstructured<'a>) -> arbitrary::Result<Self> {
        let plan = Plan::arbitrary(u)?;
        let stream = u.bytes(u.len())?;
        Ok(Input { plan, stream })
    }

    fn arbitrary_take_rest(mut u: Unstructured<'a>) -> arbitrary::Result<Self> {
        Self::arbitrary(&mut u)
    }
}

impl Plan {
    /// The role the bytes are fed to.
    pub fn role(&self) -> Role {
        if self.flags & 1 != 0 {
            Role::Client
        } else {
            Role::Server
        }
    }

    /// The connection settings: `max_message` from 1 byte up (bits 6-7 of `flags`: 0 the
    /// 16 MiB default, 1 the value as is, 2 at most 130 bytes, 3 in 256-byte steps).
    pub fn config(&self) -> Config {
        let v = usize::from(self.max_message);
        let mut cfg = Config::default();
        cfg.max_message = match self.flags >> 6 {
            0 => 16 << 20,
            1 => v.max(1),
            2 => v % 130 + 1,
            _ => (v + 1) << 8,
        };
        if self.max_head != 0 {
            cfg.max_head = 256 + usize::from(self.max_head % 8192);
        }
        let ping = u64::from(self.timers & 0x0f) * 250;
        let idle = u64::from(self.timers >> 4) * 500;
        cfg.ping_interval = (ping > 0).then(|| Duration::from_millis(ping));
        cfg.idle_timeout = (idle > 0).then(|| Duration::from_millis(idle));
        assert_eq!(cfg.check(), Ok(()));
        cfg
    }

    /// The clock reading the connection starts at.
    pub fn start_time(&self) -> u64 {
        if self.flags & 0x10 != 0 {
            u64::from(u32::MAX) - 3_000
        } else {
            1_000
        }
    }

    /// The pieces to cut a stream of `len` bytes into: where each ends and when it arrives.
    pub fn pieces(&self, len: usize) -> Vec<Piece> {
        let mut rng = XorShift(u64::from(self.seed) << 1 | 1);
        let mut ends: Vec<usize> = (0..self.cuts % 33)
            .map(|_| (rng.next_u64() % (len as u64 + 1)) as usize)
            .collect();
        ends.push(len);
        ends.sort_unstable();
        let step = if self.flags & 0x20 != 0 { 4_000 } else { 20 };
        let mut now = self.start_time();
        ends.into_iter()
            .map(|end| {
                now += rng.next_u64() % (step + 1);
                Piece { end, now }
            })
            .collect()
    }

    /// The client's request: bit 0 of `answer` offers two subprotocols, bit 1 an extension.
    pub fn client_request(&self) -> ClientRequest {
        let mut req = ClientRequest::new("server.example.com", "/chat");
        if self.answer & 1 != 0 {
            req.protocols = vec!["chat".into(), "superchat".into()];
        }
        if self.answer & 2 != 0 {
            req.extensions = Some("permessage-deflate".into());
        }
        req
    }

    /// The server's answer to `req`, and the extension it agrees to.
    pub fn answer_for(&self, req: &Request) -> (Answer, Option<&'static str>) {
        let a = self.answer;
        let answer = match a % 6 {
            0 => Answer::accept(),
            1 => match req.protocols().next() {
                Some(p) => Answer::accept_protocol(p),
                None => Answer::accept(),
            }
            .with_header("Set-Cookie", "id=1; HttpOnly"),
            2 => Answer::accept_protocol("chat"),
            3 => Answer::reject(400 + u16::from(a) % 200, "no").with_header("Retry-After", "1"),
            4 => Answer::respond(200, "text/plain", b"ok".as_slice()),
            _ => Answer::accept_protocol("not-offered"),
        };
        let ext = (a & 0x80 != 0 && req.extensions().next().is_some()).then_some("permessage-deflate");
        (answer, ext)
    }
}

/// A small xorshift generator for cut points and pauses.
pub struct XorShift(pub u64);

impl XorShift {
    /// The next value.
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// A counter standing in for a random source, so two runs mask alike: bytes 1, 2, 3, ...
/// A client's first 16 bytes are its nonce, so its key is always [`CLIENT_KEY`].
#[derive(Default)]
pub struct Counter(u8);

impl RandomSource for Counter {
    fn fill(&mut self, dest: &mut [u8]) {
        for b in dest {
            self.0 = self.0.wrapping_add(1);
            *b = self.0;
        }
    }
}

/// The `Sec-WebSocket-Key` of a client that draws its nonce from a fresh [`Counter`].
pub const CLIENT_KEY: &str = "AQIDBAUGBwgJCgsMDQ4PEA==";

/// A valid upgrade request (RFC 6455 §1.3, without the optional headers).
pub const REQUEST: &[u8] = b"GET /chat HTTP/1.1\r\nHost: server.example.com\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n";

/// A valid answer to a client whose key is [`CLIENT_KEY`].
pub fn response_101() -> Vec<u8> {
    format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {}\r\n\r\n",
        accept_key(CLIENT_KEY.as_bytes())
    )
    .into_bytes()
}

/// An owned copy of what happened, in order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Ev {
    /// A request, and whether `accept` upgraded.
    Request(Box<Request>, bool),
    /// The client's handshake completed.
    Open(Box<Response>),
    /// A text message.
    Text(String),
    /// A binary message.
    Binary(Vec<u8>),
    /// A ping's payload.
    Ping(Vec<u8>),
    /// A pong's payload.
    Pong(Vec<u8>),
    /// The peer's close frame.
    Close(Option<u16>, String),
    /// A deadline fired.
    Timeout(Timeout),
}

/// How a stream is fed: where each piece ends and the clock when it arrives.
#[derive(Clone, Copy, Debug)]
pub struct Piece {
    /// End of the piece in the stream (exclusive).
    pub end: usize,
    /// The clock when it arrives.
    pub now: u64,
}

/// Everything a run produced.
#[derive(Debug, PartialEq, Eq)]
pub struct Outcome {
    /// Events and fired deadlines, in order.
    pub events: Vec<Ev>,
    /// Every byte the connection queued.
    pub out: Vec<u8>,
    /// The state at the end.
    pub state: State,
    /// The error `read` returned, if any.
    pub error: Option<Error>,
    /// What `read_eof` returned, when the plan ends the stream.
    pub eof: Option<Option<Error>>,
    /// Parser state held at the end.
    pub buffering: bool,
    /// A message half-received at the end.
    pub in_message: bool,
}

/// Feeds `stream` to a fresh connection as `pieces`; with `ticks`, runs the deadlines before
/// each piece. `connecting` starts with the opening handshake rather than open.
pub fn run(plan: &Plan, connecting: bool, stream: &[u8], pieces: &[Piece], ticks: bool) -> Outcome {
    let cfg = plan.config();
    let start = plan.start_time();
    let mut rng = Counter::default();
    let mut out = Vec::new();
    let client_req = plan.client_request();
    let mut conn = match (plan.role(), connecting) {
        (Role::Server, true) => Connection::server(start),
        (Role::Client, true) => Connection::client(&client_req, start, &mut rng, &mut out),
        (role, false) => Connection::open(role, start),
    };
    if plan.flags & 4 != 0 {
        let r = conn.close(1000, "bye", start, &mut rng, &mut out);
        assert_eq!(r.is_ok(), !connecting);
    }
    let mut events = Vec::new();
    let mut error = None;
    let mut from = 0;
    let mut now = start;
    'pieces: for p in pieces {
        assert!(p.now >= now && p.end >= from);
        now = p.now;
        if ticks {
            if let Some(t) = tick(&mut conn, &cfg, now, &mut rng, &mut out) {
                events.push(Ev::Timeout(t));
            }
        }
        let mut piece = stream[from..p.end].to_vec();
        let piece_start = from;
        from = p.end;
        let mut pos = 0;
        while pos < piece.len() {
            let was = conn.state();
            let before = out.len();
            let avail = piece.len() - pos;
            match conn.read(&cfg, now, &mut piece[pos..], &mut rng, &mut out) {
                Ok((used, ev)) => {
                    assert!(used <= avail, "used {used} of {avail}");
                    assert!(used > 0 || ev.is_some(), "read made no progress");
                    pos += used;
                    let Some(ev) = ev else { continue };
                    let ev = match ev {
                        Event::Request(req) => {
                            assert_eq!((plan.role(), was), (Role::Server, State::Connecting));
                            check_request(&req);
                            let (answer, ext) = plan.answer_for(&req);
                            let before = out.len();
                            let up = conn.accept(&req, &answer, ext, now, &mut out);
                            check_answer(&req, &answer, ext, up, &out[before..]);
                            assert_eq!(conn.state(), if up { State::Open } else { State::Closed });
                            Ev::Request(req, up)
                        }
                        Event::Open(resp) => {
                            assert_eq!((plan.role(), was), (Role::Client, State::Connecting));
                            assert_eq!(conn.state(), State::Open);
                            assert!(!conn.is_buffering(), "handshake state kept after the answer");
                            if let Some(p) = &resp.protocol {
                                assert!(client_req.protocols.contains(p), "unoffered protocol {p}");
                            }
                            assert!(resp.extensions.is_none() || client_req.extensions.is_some());
                            Ev::Open(resp)
                        }
                        Event::Close { code, reason } => {
                            assert_eq!(conn.state(), State::Closed);
                            assert!(code.is_none_or(wsloop::proto::close_code::is_valid));
                            Ev::Close(code, owned(reason).0)
                        }
                        other => {
                            assert_eq!((was, conn.state()), (State::Open, State::Open), "{other:?}");
                            match other {
                                Event::Message(p) => match owned(p) {
                                    (t, None) => Ev::Text(t),
                                    (_, Some(b)) => Ev::Binary(b),
                                },
                                Event::Ping(p) => Ev::Ping(p.as_bytes().to_vec()),
                                Event::Pong(p) => Ev::Pong(p.as_bytes().to_vec()),
                                _ => unreachable!(),
                            }
                        }
                    };
                    events.push(ev);
                }
                Err(e) => {
                    check_error(plan.role(), was, &e, &conn, &out[before..]);
                    error = Some(e);
                    // Nothing more is read or written.
                    let mut rest = stream[piece_start + pos..].to_vec();
                    let n = out.len();
                    let len = rest.len();
                    let r = conn.read(&cfg, now, &mut rest, &mut rng, &mut out);
                    assert_eq!(r, Ok((len, None)));
                    assert_eq!(out.len(), n);
                    break 'pieces;
                }
            }
        }
    }
    let eof = (plan.flags & 8 != 0).then(|| {
        let n = out.len();
        let was = conn.state();
        let e = conn.read_eof(now);
        assert_eq!(out.len(), n, "read_eof writes nothing");
        assert_eq!(conn.state(), State::Closed);
        assert!(!conn.is_buffering());
        if e.is_some() {
            assert_eq!((plan.role(), was), (Role::Client, State::Connecting));
        }
        e
    });
    Outcome {
        events,
        out,
        state: conn.state(),
        error,
        eof,
        buffering: conn.is_buffering(),
        in_message: conn.in_message(),
    }
}

/// Runs `stream` whole and cut as the plan says, checks both, and compares them unless a
/// deadline fired in the cut run (the whole run has no time between pieces to fire one).
pub fn check_split(plan: &Plan, connecting: bool, stream: &[u8]) -> Outcome {
    let whole = run(
        plan,
        connecting,
        stream,
        &[Piece {
            end: stream.len(),
            now: plan.start_time(),
        }],
        false,
    );
    let cut = run(plan, connecting, stream, &plan.pieces(stream.len()), true);
    if !cut.events.iter().any(|e| matches!(e, Ev::Timeout(_))) {
        assert_eq!(whole, cut, "whole and cut runs differ");
    }
    whole
}

/// Text (and `None`) or binary (`Some`), owned.
fn owned(p: Payload<'_>) -> (String, Option<Vec<u8>>) {
    match p {
        Payload::Text(t) => (t.to_owned(), None),
        Payload::OwnedText(t) => (t, None),
        Payload::Binary(b) => (String::new(), Some(b.to_vec())),
        Payload::OwnedBinary(b) => (String::new(), Some(b)),
    }
}

/// Runs whatever deadline is due at `now`, and checks it did what its kind says.
fn tick(conn: &mut Connection, cfg: &Config, now: u64, rng: &mut Counter, out: &mut Vec<u8>) -> Option<Timeout> {
    let due = conn.poll_timeout(cfg, now);
    let was = conn.state();
    let before = out.len();
    let fired = conn.handle_timeout(cfg, now, rng, out);
    assert_eq!(fired.is_some(), due.is_some_and(|d| d <= now), "due {due:?} at {now}");
    let written = &out[before..];
    match fired {
        None => assert!(written.is_empty()),
        Some(Timeout::Handshake) => {
            assert_eq!((was, conn.state()), (State::Connecting, State::Closed));
            assert!(written.is_empty());
        }
        Some(Timeout::Ping) => {
            assert_eq!((was, conn.state()), (State::Open, State::Open));
            let (h, _) = only_frame(written);
            assert_eq!((h.opcode, h.payload_len), (OpCode::Ping, 0));
        }
        Some(Timeout::Idle) => {
            assert_eq!((was, conn.state()), (State::Open, State::LocalClosing));
            let (h, payload) = only_frame(written);
            assert_eq!(h.opcode, OpCode::Close);
            assert_eq!(payload[..2], 1001u16.to_be_bytes());
        }
        Some(Timeout::Close) => {
            assert!(matches!(was, State::LocalClosing | State::Closed));
            assert_eq!(conn.state(), State::Closed);
            assert!(written.is_empty());
        }
    }
    fired
}

/// The one whole frame in `bytes`, unmasked.
fn only_frame(bytes: &[u8]) -> (FrameHeader, Vec<u8>) {
    let (h, n) = FrameHeader::parse(bytes).expect("valid header").expect("whole header");
    let mut payload = bytes[n..].to_vec();
    assert_eq!(payload.len() as u64, h.payload_len, "exactly one frame");
    if let Some(key) = h.mask {
        apply_mask(&mut payload, key, 0);
    }
    (h, payload)
}

/// A failed `read`: closed, nothing buffered, and exactly the answer the error reports queued.
fn check_error(role: Role, was: State, e: &Error, conn: &Connection, written: &[u8]) {
    assert_eq!(conn.state(), State::Closed, "{e}");
    assert!(!conn.is_buffering(), "parser state kept after {e}");
    match e {
        Error::Protocol(p) => {
            assert!(matches!(p.code(), 1002 | 1007 | 1009), "{p}");
            if was == State::Open {
                let (h, payload) = only_frame(written);
                assert_eq!(h.mask.is_some(), role == Role::Client);
                assert_eq!(h.opcode, OpCode::Close);
                assert_eq!(payload[..2], p.code().to_be_bytes());
                assert_eq!(&payload[2..], p.reason().as_bytes());
            } else {
                assert_eq!(was, State::LocalClosing);
                assert!(written.is_empty());
            }
        }
        Error::Rejected(r) => {
            assert_eq!((role, was), (Role::Server, State::Connecting));
            assert!((400..600).contains(&r.status), "{r}");
            assert_refusal(written, r.status);
        }
        Error::Response(_) => {
            assert_eq!((role, was), (Role::Client, State::Connecting));
            assert!(written.is_empty());
        }
    }
}

/// `bytes` is one complete HTTP answer with status `code` (not an upgrade).
fn assert_refusal(bytes: &[u8], code: u16) {
    match parse_response(bytes, CLIENT_KEY, &[], false, true) {
        Err(ResponseError::Status { code: c, .. }) => assert_eq!(c, code),
        other => panic!("not a {code} answer: {other:?}"),
    }
}

/// Every accessor of a parsed request, and what parsing promised about it.
pub fn check_request(req: &Request) {
    let method = req.method();
    assert!(!method.is_empty());
    let path = req.path();
    assert!(path.starts_with(req.path_only()));
    if let Some(q) = req.query() {
        assert!(path.ends_with(q));
        let _ = req.query_param("room");
        let _ = req.query_param("");
    }
    assert!(req.headers().count() <= handshake::MAX_HEADERS);
    assert!(req.header("host").is_some_and(|h| !h.trim_ascii().is_empty()));
    let _ = req.header_str("Host");
    let _ = req.origin();
    let protocols: Vec<&str> = req.protocols().collect();
    for p in &protocols {
        assert!(!p.is_empty());
    }
    let _ = req.offers_protocol("chat");
    let _ = req.extensions().count();
    assert_eq!(req.accept_key().is_some(), req.is_upgrade());
    if req.is_upgrade() {
        assert_eq!(method, "GET");
        let key = req.header("Sec-WebSocket-Key").expect("an upgrade has a key");
        assert_eq!(req.accept_key(), Some(accept_key(key.trim_ascii())));
    }
    let _ = format!("{req:?}");
}

/// What `accept` wrote: an upgrade our own client accepts, or a complete HTTP refusal.
fn check_answer(req: &Request, answer: &Answer, ext: Option<&str>, up: bool, written: &[u8]) {
    if !up {
        let status = match answer {
            Answer::Accept { .. } => {
                assert!(!req.is_upgrade(), "an upgrade accepted without upgrading");
                426
            }
            Answer::Reject { status, .. } | Answer::Respond { status, .. } => *status,
            _ => unreachable!(),
        };
        assert_refusal(written, status);
        return;
    }
    let Answer::Accept { protocol, .. } = answer else {
        panic!("upgraded on {answer:?}")
    };
    let key = req.header("Sec-WebSocket-Key").expect("an upgrade has a key");
    let key = core::str::from_utf8(key.trim_ascii()).expect("base64 key");
    let offered: Vec<String> = req.protocols().map(String::from).collect();
    match parse_response(written, key, &offered, ext.is_some(), false) {
        Ok(Some((resp, n))) => {
            assert_eq!(n, written.len(), "the answer is one head");
            let chosen = protocol.as_deref().filter(|p| req.offers_protocol(p));
            assert_eq!(resp.protocol.as_deref(), chosen);
            assert_eq!(resp.extensions.as_deref(), ext);
        }
        other => panic!(
            "our client refuses our server's answer {other:?}: {:?}",
            String::from_utf8_lossy(written)
        ),
    }
}

impl Plan {
    /// The same plan for a server.
    pub fn with_role_server(mut self) -> Plan {
        self.flags &= !1;
        self
    }

    /// The same plan for a client.
    pub fn with_role_client(mut self) -> Plan {
        self.flags |= 1;
        self
    }
}
