//! The per-connection protocol state machine, shared by server and client.
//!
//! [`Connection`] never touches a socket. Received bytes go in through [`Connection::receive`]
//! and come out as [`Event`]s; protocol answers (pong, the close reply) and everything sent with
//! [`Connection::send`] are appended to a caller-owned `Vec<u8>` of bytes to write.
//!
//! An idle connection is 16 bytes. Parser state is heap-allocated only while a frame header, a
//! frame or a fragmented message is split across calls, and freed as soon as it completes:
//! a frame that arrives whole is unmasked in place in the caller's buffer and handed out as a slice.

use super::frame::{close_code, write_close, write_frame, FrameHeader, OpCode, MAX_CONTROL_PAYLOAD, MAX_HEADER_LEN};
use super::mask::{apply_mask, new_mask_key};
use super::utf8::Utf8Validator;

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

/// A complete data message.
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

/// Something the peer did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Event<'a> {
    /// A complete message.
    Message(Message<'a>),
    /// A ping; the pong is already queued.
    Ping(&'a [u8]),
    /// A pong.
    Pong(&'a [u8]),
    /// The peer's close frame. When this end had not sent one, the reply is already queued.
    /// The state is now [`State::Closed`].
    Close {
        /// The status code, if the frame had one.
        code: Option<u16>,
        /// The reason text.
        reason: &'a str,
    },
}

/// Why the connection failed. The close frame carrying `code` is already queued (when the
/// connection was still open), and the state is [`State::Closed`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProtocolError {
    /// The close code sent: 1002, 1007 or 1009.
    pub code: u16,
    /// What the peer did wrong.
    pub reason: &'static str,
}

impl std::fmt::Display for ProtocolError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({})", self.reason, self.code)
    }
}

impl std::error::Error for ProtocolError {}

/// Returned when sending on a connection that is not open.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NotOpen;

impl std::fmt::Display for NotOpen {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("connection is not open")
    }
}

impl std::error::Error for NotOpen {}

/// A request or response head that did not fit in the configured limit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HeadError<E> {
    /// The head grew past the limit without ending.
    TooLarge,
    /// The parser refused it.
    Invalid(E),
}

/// A frame whose payload is still arriving.
#[derive(Clone, Copy, Debug)]
struct FrameInProgress {
    header: FrameHeader,
    /// Payload bytes already consumed.
    done: u64,
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
    /// A control frame's payload so far.
    control: [u8; MAX_CONTROL_PAYLOAD],
    control_len: u8,
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
            control: [0; MAX_CONTROL_PAYLOAD],
            control_len: 0,
        })
    }

    fn is_empty(&self) -> bool {
        self.head_len == 0 && self.frame.is_none() && self.message.is_none() && self.buf.is_empty()
    }
}

/// One WebSocket connection's protocol state.
pub struct Connection {
    role: Role,
    state: State,
    partial: Option<Box<Partial>>,
}

impl std::fmt::Debug for Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connection")
            .field("role", &self.role)
            .field("state", &self.state)
            .field("buffering", &self.partial.is_some())
            .finish()
    }
}

const fn err(code: u16, reason: &'static str) -> ProtocolError {
    ProtocolError { code, reason }
}

impl Connection {
    /// A connection whose opening handshake is still to be done.
    pub fn new(role: Role) -> Self {
        Connection {
            role,
            state: State::Connecting,
            partial: None,
        }
    }

    /// A connection that is already open (the handshake was done elsewhere).
    pub fn new_open(role: Role) -> Self {
        Connection {
            role,
            state: State::Open,
            partial: None,
        }
    }

    /// The current state.
    pub fn state(&self) -> State {
        self.state
    }

    /// The role.
    pub fn role(&self) -> Role {
        self.role
    }

    /// Whether parser state is allocated (a frame or message is split across reads).
    pub fn is_buffering(&self) -> bool {
        self.partial.is_some()
    }

    /// Marks the handshake as done.
    pub fn set_open(&mut self) {
        if self.state == State::Connecting {
            self.state = State::Open;
        }
    }

    /// Marks the connection closed without a close handshake (e.g. the transport dropped).
    pub fn set_closed(&mut self) {
        self.state = State::Closed;
        self.partial = None;
    }

    fn mask(&self) -> Option<[u8; 4]> {
        match self.role {
            Role::Client => Some(new_mask_key()),
            Role::Server => None,
        }
    }

    /// Collects a handshake head (HTTP request or response) that may arrive in pieces.
    ///
    /// `parse` sees everything received so far and returns `Ok(None)` while the head is
    /// incomplete, or what it parsed with the length of the head. On success this returns that
    /// value and how many bytes of `data` the head used: the rest of `data` is WebSocket stream.
    /// The head is copied aside only when it does not arrive in one piece.
    pub fn read_head<T, E>(
        &mut self,
        data: &[u8],
        max_len: usize,
        parse: impl FnOnce(&[u8]) -> Result<Option<(T, usize)>, E>,
    ) -> Result<Option<(T, usize)>, HeadError<E>> {
        let spilled = self.partial.as_ref().map_or(0, |p| p.buf.len());
        let result = if spilled == 0 {
            parse(data)
        } else {
            let p = self.partial.as_mut().expect("spilled implies partial");
            let room = max_len.saturating_sub(p.buf.len()).min(data.len());
            p.buf.extend_from_slice(&data[..room]);
            parse(&p.buf)
        };
        match result {
            Err(e) => {
                self.partial = None;
                Err(HeadError::Invalid(e))
            }
            Ok(Some((value, len))) => {
                self.partial = None;
                if len > max_len {
                    // Only possible when the head came whole: a cut-up one is never read past max_len.
                    return Err(HeadError::TooLarge);
                }
                Ok(Some((value, len.saturating_sub(spilled).min(data.len()))))
            }
            Ok(None) => {
                let total = spilled + data.len();
                if total >= max_len {
                    self.partial = None;
                    return Err(HeadError::TooLarge);
                }
                if spilled == 0 {
                    let mut p = Partial::new();
                    p.buf.extend_from_slice(data);
                    self.partial = Some(p);
                }
                Ok(None)
            }
        }
    }

    /// Sends a whole message as one frame.
    pub fn send(&mut self, msg: Message<'_>, out: &mut Vec<u8>) -> Result<(), NotOpen> {
        self.send_frame(msg.opcode(), true, msg.as_bytes(), out)
    }

    /// Sends one frame of a message: the first with `Text` or `Binary`, later ones with
    /// `Continuation`, the last with `fin` set. Control opcodes go through [`ping`](Self::ping),
    /// [`pong`](Self::pong) and [`close`](Self::close).
    pub fn send_frame(&mut self, opcode: OpCode, fin: bool, payload: &[u8], out: &mut Vec<u8>) -> Result<(), NotOpen> {
        if self.state != State::Open || opcode.is_control() {
            return Err(NotOpen);
        }
        write_frame(out, fin, opcode, self.mask(), payload);
        Ok(())
    }

    /// Sends a ping (payload truncated to 125 bytes).
    pub fn ping(&mut self, payload: &[u8], out: &mut Vec<u8>) -> Result<(), NotOpen> {
        self.control(OpCode::Ping, payload, out)
    }

    /// Sends an unsolicited pong (a heartbeat that expects no answer).
    pub fn pong(&mut self, payload: &[u8], out: &mut Vec<u8>) -> Result<(), NotOpen> {
        self.control(OpCode::Pong, payload, out)
    }

    fn control(&mut self, op: OpCode, payload: &[u8], out: &mut Vec<u8>) -> Result<(), NotOpen> {
        if self.state != State::Open {
            return Err(NotOpen);
        }
        let n = payload.len().min(MAX_CONTROL_PAYLOAD);
        write_frame(out, true, op, self.mask(), &payload[..n]);
        Ok(())
    }

    /// Starts the close handshake. `code` must be valid on the wire (see
    /// [`close_code::is_valid`]); an invalid one is sent as 1000. Afterwards incoming data
    /// messages are dropped until the peer's close frame arrives.
    pub fn close(&mut self, code: u16, reason: &str, out: &mut Vec<u8>) -> Result<(), NotOpen> {
        if self.state != State::Open {
            return Err(NotOpen);
        }
        let code = if close_code::is_valid(code) {
            code
        } else {
            close_code::NORMAL
        };
        write_close(out, self.mask(), Some(code), reason);
        self.state = State::LocalClosing;
        Ok(())
    }

    fn fail(&mut self, e: ProtocolError, out: &mut Vec<u8>) -> ProtocolError {
        if self.state == State::Open {
            write_close(out, self.mask(), Some(e.code), e.reason);
        }
        self.set_closed();
        e
    }

    /// Processes received bytes.
    ///
    /// `data` is unmasked in place. `on_event` is called for each event with `out`, so replies it
    /// writes stay in order with the protocol's own answers. On a protocol error the close frame
    /// is queued after everything the earlier events produced, and the error is returned.
    pub fn receive<F>(
        &mut self,
        data: &mut [u8],
        max_message: usize,
        out: &mut Vec<u8>,
        on_event: &mut F,
    ) -> Result<(), ProtocolError>
    where
        F: FnMut(Event<'_>, &mut Vec<u8>),
    {
        let result = self.receive_inner(data, max_message, out, on_event);
        if let Err(e) = result {
            return Err(self.fail(e, out));
        }
        if self.partial.as_ref().is_some_and(|p| p.is_empty()) {
            self.partial = None;
        }
        Ok(())
    }

    fn receive_inner<F>(
        &mut self,
        data: &mut [u8],
        max_message: usize,
        out: &mut Vec<u8>,
        on_event: &mut F,
    ) -> Result<(), ProtocolError>
    where
        F: FnMut(Event<'_>, &mut Vec<u8>),
    {
        let mut pos = 0;
        loop {
            if !matches!(self.state, State::Open | State::LocalClosing) {
                return Ok(());
            }
            if self.partial.as_ref().is_some_and(|p| p.frame.is_some()) {
                pos += self.continue_frame(&mut data[pos..], out, on_event)?;
                if self.partial.as_ref().is_some_and(|p| p.frame.is_some()) {
                    return Ok(()); // all of `data` went into the unfinished frame
                }
                continue;
            }
            if pos == data.len() {
                return Ok(());
            }
            // A header: from the spill if a previous read cut one, else straight from `data`.
            let spilled = self.partial.as_ref().map_or(0, |p| p.head_len as usize);
            let (header, used) = if spilled > 0 {
                let p = self.partial.as_mut().expect("spilled implies partial");
                let take = (MAX_HEADER_LEN - spilled).min(data.len() - pos);
                p.head[spilled..spilled + take].copy_from_slice(&data[pos..pos + take]);
                match FrameHeader::parse(&p.head[..spilled + take]).map_err(frame_error)? {
                    Some((h, n)) => {
                        p.head_len = 0;
                        (h, n - spilled)
                    }
                    None => {
                        p.head_len = (spilled + take) as u8;
                        return Ok(());
                    }
                }
            } else {
                match FrameHeader::parse(&data[pos..]).map_err(frame_error)? {
                    Some(x) => x,
                    None => {
                        let p = self.partial.get_or_insert_with(Partial::new);
                        let rest = &data[pos..];
                        p.head[..rest.len()].copy_from_slice(rest);
                        p.head_len = rest.len() as u8;
                        return Ok(());
                    }
                }
            };
            pos += used;
            self.check_header(&header, max_message)?;
            let len = header.payload_len;
            let avail = (data.len() - pos) as u64;
            let in_message = self.partial.as_ref().is_some_and(|p| p.message.is_some());
            if len <= avail
                && (header.opcode.is_control() || (header.fin && !in_message && header.opcode != OpCode::Continuation))
            {
                // Fast path: the whole frame is here and it is a whole message or a control frame.
                let payload = &mut data[pos..pos + len as usize];
                pos += len as usize;
                if let Some(key) = header.mask {
                    apply_mask(payload, key, 0);
                }
                if header.opcode.is_control() {
                    self.on_control(header.opcode, payload, out, on_event)?;
                } else {
                    let msg = match header.opcode {
                        OpCode::Text => Message::Text(
                            std::str::from_utf8(payload).map_err(|_| err(1007, "invalid UTF-8 in text message"))?,
                        ),
                        _ => Message::Binary(payload),
                    };
                    if self.state == State::Open {
                        on_event(Event::Message(msg), out);
                    }
                }
                continue;
            }
            // Slow path: the frame continues past this read, or belongs to a fragmented message.
            let p = self.partial.get_or_insert_with(Partial::new);
            if matches!(header.opcode, OpCode::Text | OpCode::Binary) {
                p.message = Some(header.opcode);
                p.utf8 = Utf8Validator::new();
                p.buf.clear();
            }
            if header.opcode.is_control() {
                p.control_len = 0;
            }
            p.frame = Some(FrameInProgress { header, done: 0 });
        }
    }

    /// Rules that depend on role and on what came before.
    fn check_header(&self, h: &FrameHeader, max_message: usize) -> Result<(), ProtocolError> {
        match (self.role, h.mask.is_some()) {
            (Role::Server, false) => return Err(err(1002, "client frame not masked")),
            (Role::Client, true) => return Err(err(1002, "server frame masked")),
            _ => {}
        }
        if h.opcode.is_control() {
            return Ok(());
        }
        let in_message = self.partial.as_ref().and_then(|p| p.message);
        match (h.opcode, in_message) {
            (OpCode::Continuation, None) => return Err(err(1002, "continuation frame without a message to continue")),
            (OpCode::Text | OpCode::Binary, Some(_)) => {
                return Err(err(1002, "new message inside a fragmented message"))
            }
            _ => {}
        }
        let so_far = self.partial.as_ref().map_or(0, |p| p.buf.len() as u64);
        if so_far.saturating_add(h.payload_len) > max_message as u64 {
            return Err(err(1009, "message too big"));
        }
        Ok(())
    }

    /// Feeds payload bytes to the frame in progress; returns how many of `data` it took.
    fn continue_frame<F>(
        &mut self,
        data: &mut [u8],
        out: &mut Vec<u8>,
        on_event: &mut F,
    ) -> Result<usize, ProtocolError>
    where
        F: FnMut(Event<'_>, &mut Vec<u8>),
    {
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
            let at = p.control_len as usize;
            p.control[at..at + take].copy_from_slice(chunk);
            p.control_len += take as u8;
            if complete {
                let mut payload = p.control;
                let n = p.control_len as usize;
                p.control_len = 0;
                self.on_control(f.header.opcode, &mut payload[..n], out, on_event)?;
            }
            return Ok(take);
        }
        if p.message == Some(OpCode::Text) {
            p.utf8
                .feed(chunk)
                .map_err(|_| err(1007, "invalid UTF-8 in text message"))?;
        }
        p.buf.extend_from_slice(chunk);
        if complete && f.header.fin {
            let kind = p.message.take();
            if kind == Some(OpCode::Text) {
                p.utf8
                    .finish()
                    .map_err(|_| err(1007, "text message ends inside a character"))?;
            }
            let buf = std::mem::take(&mut p.buf);
            if self.state == State::Open {
                let msg = match kind {
                    // Already checked piece by piece; this second pass only converts the type.
                    Some(OpCode::Text) => Message::Text(
                        std::str::from_utf8(&buf).map_err(|_| err(1007, "invalid UTF-8 in text message"))?,
                    ),
                    _ => Message::Binary(&buf),
                };
                on_event(Event::Message(msg), out);
            }
        }
        Ok(take)
    }

    fn on_control<F>(
        &mut self,
        op: OpCode,
        payload: &mut [u8],
        out: &mut Vec<u8>,
        on_event: &mut F,
    ) -> Result<(), ProtocolError>
    where
        F: FnMut(Event<'_>, &mut Vec<u8>),
    {
        match op {
            OpCode::Ping => {
                if self.state == State::Open {
                    write_frame(out, true, OpCode::Pong, self.mask(), payload);
                    on_event(Event::Ping(payload), out);
                }
            }
            OpCode::Pong => {
                if self.state == State::Open {
                    on_event(Event::Pong(payload), out);
                }
            }
            _ => {
                let (code, reason) = match payload.len() {
                    0 => (None, ""),
                    1 => return Err(err(1002, "close frame with a 1-byte payload")),
                    _ => {
                        let code = u16::from_be_bytes([payload[0], payload[1]]);
                        if !close_code::is_valid(code) {
                            return Err(err(1002, "invalid close code"));
                        }
                        let reason =
                            std::str::from_utf8(&payload[2..]).map_err(|_| err(1007, "close reason is not UTF-8"))?;
                        (Some(code), reason)
                    }
                };
                if self.state == State::Open {
                    write_close(out, self.mask(), code, "");
                }
                self.set_closed();
                on_event(Event::Close { code, reason }, out);
            }
        }
        Ok(())
    }
}

fn frame_error(e: super::frame::FrameError) -> ProtocolError {
    use super::frame::FrameError::*;
    err(
        1002,
        match e {
            ReservedBits => "reserved bits set",
            ReservedOpcode(_) => "reserved opcode",
            FragmentedControl => "fragmented control frame",
            ControlTooLong => "control frame over 125 bytes",
            LengthOverflow => "payload length over 2^63",
        },
    )
}
