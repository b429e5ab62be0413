//! The application's side of the server: [`Handler`], and [`Ctx`], through which it acts.

use std::borrow::Cow;
use std::mem::MaybeUninit;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use super::config::SlowConsumer;
use super::topics::{Joined, Left};
use super::LoopState;
use crate::io::budget::SharedFrame;
use crate::io::engine::Engine;
use crate::io::stream::ServerStream;
use crate::proto::frame::write_frame;
use crate::proto::rand::NoRandom;
use crate::proto::{close_code, Answer, HeaderError, Headers, Message, NotOpen, Request, State};

/// Identifies one connection for as long as it lives, the loop that owns it (with
/// [`ServerConfig::threads`](super::ServerConfig::threads) above 1) and, with a cluster
/// ([`ServerConfig::cluster`](super::ServerConfig::cluster)), the instance that owns it; a later
/// connection never gets the same id (the generation part wraps only after 16 million
/// connections in the same slot, and each run of a clustered server picks a new random
/// instance id).
///
/// 128 bits: the instance (64; 0 without a cluster), then the loop (8), the slot's generation
/// (24) and the slot (32). [`as_u128`](Self::as_u128) and [`from_u128`](Self::from_u128) carry
/// it through other systems (a database, another instance's messages).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConnId {
    // Two halves rather than one `u128`: 8-byte alignment everywhere (a `u128` is aligned to
    // 16 on x86-64), so the structures holding ids do not grow padding.
    instance: u64,
    local: u64,
}

impl ConnId {
    /// Bits of the local part: the loop (8), the slot's generation (24), the slot (32).
    pub(crate) fn new(key: usize, gen: u32, lp: u8, instance: u64) -> Self {
        ConnId {
            instance,
            local: (u64::from(lp) << 56) | (u64::from(gen & 0xFF_FFFF) << 32) | key as u64 & 0xFFFF_FFFF,
        }
    }
    /// The index of the loop that owns the connection.
    pub fn loop_index(self) -> usize {
        (self.local >> 56) as usize
    }
    pub(crate) fn key(self) -> usize {
        (self.local & 0xFFFF_FFFF) as usize
    }
    pub(crate) fn gen(self) -> u32 {
        ((self.local >> 32) & 0xFF_FFFF) as u32
    }
    /// The instance that owns the connection: the random id a clustered server picked when it
    /// started running, or 0 without a cluster.
    pub fn instance(self) -> u64 {
        self.instance
    }
    /// The part of the id local to its instance (loop, generation, slot): unique among the
    /// connections of one server, but not across the instances of a cluster (use
    /// [`as_u128`](Self::as_u128) there).
    pub fn as_u64(self) -> u64 {
        self.local
    }
    /// The whole id as a number: the instance in the high 64 bits, [`as_u64`](Self::as_u64)
    /// in the low 64.
    pub fn as_u128(self) -> u128 {
        (u128::from(self.instance) << 64) | u128::from(self.local)
    }
    /// The id of `instance` whose local part is `local`.
    pub(crate) fn from_parts(instance: u64, local: u64) -> Self {
        ConnId { instance, local }
    }
    /// The id [`as_u128`](Self::as_u128) gave. Any number makes an id; one that never named a
    /// connection of the server it is used with is ignored there, as a closed one is.
    pub fn from_u128(id: u128) -> Self {
        ConnId {
            instance: (id >> 64) as u64,
            local: id as u64,
        }
    }
}

impl std::fmt::Display for ConnId {
    /// `#SLOT.GEN`, `#LOOP:SLOT.GEN` on loops other than 0, and `@INSTANCE` (16 hex digits)
    /// after it with a cluster.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.loop_index() {
            0 => write!(f, "#{}.{}", self.key(), self.gen())?,
            lp => write!(f, "#{lp}:{}.{}", self.key(), self.gen())?,
        }
        match self.instance {
            0 => Ok(()),
            i => write!(f, "@{i:016x}"),
        }
    }
}

/// A peer address in 6 bytes: an IPv4 address (IPv4-mapped IPv6 addresses too) and its port,
/// or, with port 0 (never a TCP peer's port), the index of a full address in the loop's
/// [`PeerTable`]. `SocketAddr` takes 32 bytes: this keeps an idle connection's slot at 48.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) struct PeerAddr {
    ip: [u8; 4],
    port: [u8; 2],
}

/// Addresses that do not fit a [`PeerAddr`] (IPv6 peers), kept only while they are connected.
pub(crate) type PeerTable = slab::Slab<SocketAddr>;

impl PeerAddr {
    pub(crate) fn new(a: SocketAddr, table: &mut PeerTable) -> Self {
        let v4 = match a.ip() {
            IpAddr::V4(v4) => Some(v4),
            IpAddr::V6(v6) => v6.to_ipv4_mapped(),
        };
        match v4 {
            Some(v4) if a.port() != 0 => PeerAddr {
                ip: v4.octets(),
                port: a.port().to_ne_bytes(),
            },
            _ => PeerAddr {
                ip: (table.insert(a) as u32).to_ne_bytes(),
                port: [0; 2],
            },
        }
    }

    fn index(&self) -> Option<usize> {
        (self.port == [0; 2]).then(|| u32::from_ne_bytes(self.ip) as usize)
    }

    pub(crate) fn get(&self, table: &PeerTable) -> SocketAddr {
        match self.index() {
            Some(i) => table.get(i).copied().unwrap_or(SocketAddr::from(([0u16; 8], 0))),
            None => SocketAddr::new(IpAddr::V4(Ipv4Addr::from(self.ip)), u16::from_ne_bytes(self.port)),
        }
    }

    /// Gives back the table entry, if the address has one (when its connection is removed).
    pub(crate) fn release(&self, table: &mut PeerTable) {
        if let Some(i) = self.index() {
            table.try_remove(i);
        }
    }
}

/// What the server keeps per connection besides the engine's slot.
pub(crate) struct ConnData<S> {
    pub(crate) addr: PeerAddr,
    /// [`OPENED`], [`COUNTED`] and [`HAS_STATE`].
    flags: u8,
    /// The close code this server sent, 0 before it sends one (see [`Ending`]).
    pub(crate) sent_close: u16,
    /// The application's state, from the upgrade that built it (see [`HAS_STATE`]): no
    /// placeholder is needed before it, so `Handler::State` need not be `Default`, and no tag
    /// beside it, so a connection costs what its state does.
    state: MaybeUninit<S>,
}

/// `on_open` was called and `on_close` not yet.
const OPENED: u8 = 1;
/// Counted in the per-IP limit.
const COUNTED: u8 = 2;
/// `state` holds a value (from `on_upgrade`; taken out while a callback borrows it).
const HAS_STATE: u8 = 4;

impl<S> ConnData<S> {
    /// A connection accepted from `addr`, with no state yet.
    pub(crate) fn new(addr: PeerAddr, counted: bool) -> Self {
        ConnData {
            addr,
            flags: if counted { COUNTED } else { 0 },
            sent_close: 0,
            state: MaybeUninit::uninit(),
        }
    }

    /// `on_open` was called and `on_close` not yet.
    pub(crate) fn opened(&self) -> bool {
        self.flags & OPENED != 0
    }

    /// Marks the connection open or no longer open; returns whether it was.
    pub(crate) fn set_opened(&mut self, opened: bool) -> bool {
        let was = self.opened();
        self.flags = if opened {
            self.flags | OPENED
        } else {
            self.flags & !OPENED
        };
        was
    }

    /// Counted in the per-IP limit.
    pub(crate) fn counted(&self) -> bool {
        self.flags & COUNTED != 0
    }

    /// The state, if the connection has one.
    pub(crate) fn state_mut(&mut self) -> Option<&mut S> {
        if self.flags & HAS_STATE == 0 {
            return None;
        }
        // SAFETY: HAS_STATE is set only while `state` holds a value (see `put_state`).
        Some(unsafe { self.state.assume_init_mut() })
    }

    /// Takes the state out, leaving none.
    pub(crate) fn take_state(&mut self) -> Option<S> {
        if self.flags & HAS_STATE == 0 {
            return None;
        }
        self.flags &= !HAS_STATE;
        // SAFETY: the flag said `state` holds a value; it is cleared first, so the value is
        // read out once and never dropped here again.
        Some(unsafe { self.state.assume_init_read() })
    }

    /// Stores the state, dropping any it had.
    pub(crate) fn put_state(&mut self, state: S) {
        drop(self.take_state());
        self.state.write(state);
        self.flags |= HAS_STATE;
    }

    /// How the connection ended, for the log, when `on_close` gets `code`.
    pub(crate) fn ending(&self, code: u16) -> Ending {
        Ending {
            code,
            sent: self.sent_close,
        }
    }
}

impl<S> Drop for ConnData<S> {
    fn drop(&mut self) {
        drop(self.take_state());
    }
}

pub(crate) type ServerEngine<S> = Engine<ServerStream, ConnData<S>, NoRandom>;

/// Starts closing connection `key` with `code`, remembering the code sent for the log.
pub(crate) fn close_conn<S>(eng: &mut ServerEngine<S>, key: usize, code: u16, reason: &str) {
    if eng.close(key, code, reason).is_ok() {
        // The connection sends an invalid code as 1000.
        let sent = if close_code::is_valid(code) {
            code
        } else {
            close_code::NORMAL
        };
        eng.slots[key].data.sent_close = sent;
    }
}

/// How a connection ended, for the log: the close code `on_close` gets, or, when this server
/// sent a close frame and none came back (`1006`), the code it sent: a slow consumer closed
/// with `1008` that never answers reads `1008 sent, no close frame back`.
pub(crate) struct Ending {
    /// The code given to `on_close`.
    pub(crate) code: u16,
    /// [`ConnData::sent_close`].
    pub(crate) sent: u16,
}

impl std::fmt::Display for Ending {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.code == close_code::ABNORMAL && self.sent != 0 {
            write!(f, "{} sent, no close frame back", self.sent)
        } else {
            write!(f, "{}", self.code)
        }
    }
}

/// The connection a callback is about: its id, its peer's address and its state.
#[derive(Debug)]
pub struct Conn<S> {
    pub(crate) id: ConnId,
    pub(crate) addr: SocketAddr,
    /// The application's state for this connection (see [`Handler::State`]).
    pub state: S,
}

impl<S> Conn<S> {
    /// The connection's id.
    pub fn id(&self) -> ConnId {
        self.id
    }

    /// The peer's address (the proxy's, behind a proxy).
    pub fn peer_addr(&self) -> SocketAddr {
        self.addr
    }
}

/// An upgrade request on its way to [`Handler::on_upgrade`], and what the `101` that accepts
/// it will say beside the handshake: the subprotocol and any headers.
#[derive(Debug)]
pub struct Upgrade<'a> {
    pub(crate) request: &'a Request,
    pub(crate) peer: SocketAddr,
    pub(crate) protocol: Option<String>,
    pub(crate) headers: Headers,
}

impl<'a> Upgrade<'a> {
    /// The request: method, path with query, every header. It outlives the borrow of `self`,
    /// so it can be read while [`set_protocol`](Self::set_protocol) is called.
    pub fn request(&self) -> &'a Request {
        self.request
    }

    /// The peer's address (the proxy's, behind a proxy: see `X-Forwarded-For`).
    pub fn peer_addr(&self) -> SocketAddr {
        self.peer
    }

    /// The subprotocol that will be answered: by default the first of
    /// [`ServerConfig::protocols`](super::ServerConfig::protocols) the client offered.
    pub fn protocol(&self) -> Option<&str> {
        self.protocol.as_deref()
    }

    /// Chooses the subprotocol to answer (it must be one the client offered, else none is
    /// sent), or none.
    pub fn set_protocol(&mut self, protocol: Option<&str>) {
        self.protocol = protocol.filter(|p| self.request.offers_protocol(p)).map(String::from);
    }

    /// Adds header `name: value` to the `101` that accepts the upgrade (a `Set-Cookie`, a
    /// header the chosen subprotocol defines). It is sent only if the upgrade is accepted; a
    /// refusal carries the headers of its own [`Answer`].
    ///
    /// A name that is not an HTTP token, a value with CR, LF or another control character, and
    /// the headers the handshake writes itself are refused with the reason and not sent (see
    /// [`Headers::add`](crate::proto::Headers::add)).
    pub fn add_header(
        &mut self,
        name: impl Into<Cow<'static, str>>,
        value: impl Into<Cow<'static, str>>,
    ) -> Result<(), HeaderError> {
        self.headers.add(name, value)
    }

    /// The headers added so far for the `101`.
    pub fn headers(&self) -> &Headers {
        &self.headers
    }
}

/// A timer set with [`Ctx::set_timer`] or [`Ctx::set_conn_timer`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct TimerId(pub(crate) u64);

/// A timer that came due.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timer {
    /// Which timer.
    pub id: TimerId,
    /// The connection it was set for, if any (still open: timers of closed connections are
    /// dropped).
    pub conn: Option<ConnId>,
}

/// The application's side of the server. Every method runs on the loop's thread; a slow method
/// stalls every connection.
pub trait Handler {
    /// Per-connection state, owned by the server and handed to every callback about that
    /// connection. [`on_upgrade`](Self::on_upgrade) builds it when it accepts: it need not be
    /// `Default`, and it can hold what the upgrade request told (a user, a room). Use `()`
    /// when there is none: a zero-sized state costs nothing.
    type State;

    /// The loop is about to start; no connection is open yet.
    fn on_start(&mut self, ctx: &mut Ctx<'_, Self::State>) {
        let _ = ctx;
    }

    /// A valid WebSocket upgrade request arrived. Return the new connection's state to accept
    /// it (`Ok(())` for a handler without state), or an [`Answer`] to refuse it:
    /// `Answer::reject(401, "…").with_header("WWW-Authenticate", "Bearer")`. The `101` that
    /// accepts carries the subprotocol and headers set on `up`
    /// ([`Upgrade::set_protocol`], [`Upgrade::add_header`]).
    fn on_upgrade(&mut self, ctx: &mut Ctx<'_, Self::State>, up: &mut Upgrade<'_>) -> Result<Self::State, Answer>;

    /// A plain HTTP request arrived (one that does not attempt an upgrade: see
    /// [`Request::is_upgrade`]) from `peer`. Return an [`Answer`] to answer it
    /// (`Answer::respond(200, "application/json", body)`, a refusal, with any headers), or
    /// `None` to let the server answer as it does by itself: the page of
    /// [`ServerConfig::page`](super::ServerConfig::page) at `/` for `GET` and `HEAD` (`404`
    /// elsewhere) when there is one, `405` for another method, and `426` (send an upgrade)
    /// without a page. The default returns `None`.
    ///
    /// Only the head is read: a request body is not, and the connection closes once the
    /// answer is written (`HEAD` gets the answer's head without its body).
    fn on_request(&mut self, ctx: &mut Ctx<'_, Self::State>, req: &Request, peer: SocketAddr) -> Option<Answer> {
        let _ = (ctx, req, peer);
        None
    }

    /// A handshake completed.
    fn on_open(&mut self, ctx: &mut Ctx<'_, Self::State>, conn: &mut Conn<Self::State>) {
        let _ = (ctx, conn);
    }

    /// A complete message arrived.
    fn on_message(&mut self, ctx: &mut Ctx<'_, Self::State>, conn: &mut Conn<Self::State>, msg: Message<'_>);

    /// The connection ended: `code` is the peer's close code (`1005` when its close frame had
    /// none), or `1006` when it vanished without a close frame (also when it never answered a
    /// close this server started, as a slow consumer sent `1008` may not; `reason` is then
    /// `close timeout` if it ran out; the log names the code sent), or the code this server
    /// sent when it failed the connection. Its subscriptions and timers end right after this call.
    fn on_close(&mut self, ctx: &mut Ctx<'_, Self::State>, conn: &mut Conn<Self::State>, code: u16, reason: &str) {
        let _ = (ctx, conn, code, reason);
    }

    /// A timer came due.
    fn on_timer(&mut self, ctx: &mut Ctx<'_, Self::State>, timer: Timer) {
        let _ = (ctx, timer);
    }

    /// [`Handle::wake`](super::Handle::wake) was called from another thread.
    fn on_wake(&mut self, ctx: &mut Ctx<'_, Self::State>) {
        let _ = ctx;
    }
}

/// A boxed handler is a handler, so one loop can serve a handler chosen at run time.
impl<H: Handler + ?Sized> Handler for Box<H> {
    type State = H::State;
    fn on_start(&mut self, ctx: &mut Ctx<'_, Self::State>) {
        (**self).on_start(ctx)
    }
    fn on_upgrade(&mut self, ctx: &mut Ctx<'_, Self::State>, up: &mut Upgrade<'_>) -> Result<Self::State, Answer> {
        (**self).on_upgrade(ctx, up)
    }
    fn on_request(&mut self, ctx: &mut Ctx<'_, Self::State>, req: &Request, peer: SocketAddr) -> Option<Answer> {
        (**self).on_request(ctx, req, peer)
    }
    fn on_open(&mut self, ctx: &mut Ctx<'_, Self::State>, conn: &mut Conn<Self::State>) {
        (**self).on_open(ctx, conn)
    }
    fn on_message(&mut self, ctx: &mut Ctx<'_, Self::State>, conn: &mut Conn<Self::State>, msg: Message<'_>) {
        (**self).on_message(ctx, conn, msg)
    }
    fn on_close(&mut self, ctx: &mut Ctx<'_, Self::State>, conn: &mut Conn<Self::State>, code: u16, reason: &str) {
        (**self).on_close(ctx, conn, code, reason)
    }
    fn on_timer(&mut self, ctx: &mut Ctx<'_, Self::State>, timer: Timer) {
        (**self).on_timer(ctx, timer)
    }
    fn on_wake(&mut self, ctx: &mut Ctx<'_, Self::State>) {
        (**self).on_wake(ctx)
    }
}

/// Counters kept by the loop.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Stats {
    /// Open WebSocket connections.
    pub open: usize,
    /// Messages received since start.
    pub messages_in: u64,
    /// Messages sent since start (a broadcast counts once per peer).
    pub messages_out: u64,
    /// Bytes waiting in outbound queues now.
    pub bytes_queued: usize,
    /// Memory counted against the budget now (see
    /// [`ServerConfig::max_memory`](super::ServerConfig::max_memory)).
    pub memory: usize,
    /// The budget.
    pub memory_limit: usize,
    /// Broadcast messages skipped for slow consumers since start.
    pub dropped: u64,
    /// Connections refused with `503` since start.
    pub refused: u64,
}

/// The frame to queue for a peer that agreed to `agreed`: the message compressed for its window
/// when that pays (made once per window size, by the first loop that needs it, and shared by
/// every loop), else `frame` itself.
#[cfg(feature = "deflate")]
fn compressed_for<'f>(
    frame: &'f Arc<SharedFrame>,
    agreed: Option<crate::proto::deflate::Agreed>,
    codec: &mut crate::proto::deflate::Codec,
) -> &'f Arc<SharedFrame> {
    let Some(a) = agreed else { return frame };
    let window = usize::from(a.send_window_bits.clamp(8, 15) - 8);
    frame.variant(window, |plain| {
        let (head, at) = crate::proto::frame::FrameHeader::parse(plain).ok()??;
        let z = codec.compress(&a, &plain[at..])?;
        let mut compressed = Vec::with_capacity(z.len() + 10);
        crate::proto::frame::write_compressed_frame(&mut compressed, head.opcode, None, z);
        Some(compressed)
    })
}

/// What the handler can do from inside the loop.
pub struct Ctx<'a, S> {
    pub(crate) eng: &'a mut ServerEngine<S>,
    pub(crate) loop_state: &'a mut LoopState,
}

impl<'a, S> Ctx<'a, S> {
    fn addr_of(&self, key: usize) -> SocketAddr {
        self.eng.slots[key].data.addr.get(&self.loop_state.peers)
    }

    /// A message encoded once as an unmasked frame, to be shared by many queues (and counted
    /// once against the memory budget).
    fn shared_frame(&self, msg: Message<'_>) -> Arc<SharedFrame> {
        let mut frame = Vec::with_capacity(msg.as_bytes().len() + 10);
        write_frame(&mut frame, true, msg.opcode(), None, msg.as_bytes());
        self.eng.shared_frame(frame)
    }

    /// Whether `id` names a connection of this loop (open or not).
    #[inline]
    fn is_here(&self, id: ConnId) -> bool {
        id.loop_index() == usize::from(self.loop_state.lp) && id.instance() == self.loop_state.instance
    }

    /// The slot of `id` if it is live on this loop (an id of another loop is not).
    fn slot_key(&self, id: ConnId) -> Option<usize> {
        let key = id.key();
        (self.is_here(id) && self.eng.is_live(key, id.gen())).then_some(key)
    }

    /// Sends a text message to one connection, as [`send`](Self::send) does.
    pub fn send_text(&mut self, id: ConnId, text: &str) -> Result<(), NotOpen> {
        self.send(id, Message::Text(text))
    }

    /// Sends a binary message to one connection, as [`send`](Self::send) does.
    pub fn send_binary(&mut self, id: ConnId, data: &[u8]) -> Result<(), NotOpen> {
        self.send(id, Message::Binary(data))
    }

    /// Sends a message to one connection of this loop. Fails with [`NotOpen`] if it is not
    /// open here (a connection of another loop is reached through [`handle`](Self::handle)).
    ///
    /// With a cluster, a connection of another instance is reached through Redis: the message
    /// is queued for it, and this fails when it was not (Redis is down or the queue to it is
    /// full; whether that connection is open is known only there).
    #[inline(always)]
    pub fn send(&mut self, id: ConnId, msg: Message<'_>) -> Result<(), NotOpen> {
        // One test for the usual case: `fast_loop` matches no id when message lines are wanted.
        let sent = if id.loop_index() == self.loop_state.fast_loop && id.instance() == self.loop_state.instance {
            self.send_here(id, msg)
        } else {
            self.send_slow(id, msg)
        };
        if sent {
            Ok(())
        } else {
            Err(NotOpen)
        }
    }

    /// Queues `msg` for `id`, a connection of this loop, if it is still open.
    #[inline(always)]
    fn send_here(&mut self, id: ConnId, msg: Message<'_>) -> bool {
        let ok = self.eng.send_to(id.key(), id.gen(), msg).is_ok();
        self.loop_state.stats.messages_out += u64::from(ok);
        ok
    }

    /// [`send`](Self::send) for all but the usual case (out of the inlined path): another
    /// instance, another loop, or a message to log.
    #[inline(never)]
    fn send_slow(&mut self, id: ConnId, msg: Message<'_>) -> bool {
        if id.instance() != self.loop_state.instance {
            return self.send_elsewhere(id, msg);
        }
        if id.loop_index() != usize::from(self.loop_state.lp) {
            return false;
        }
        let ok = self.send_here(id, msg);
        if ok && self.loop_state.log_messages {
            let addr = self.addr_of(id.key());
            super::msglog::message(addr, super::msglog::Dir::Out, msg.opcode(), msg.as_bytes());
        }
        ok
    }

    /// A message for a connection of another instance, through the cluster.
    #[inline(never)]
    fn send_elsewhere(&mut self, id: ConnId, msg: Message<'_>) -> bool {
        // Instance 0 is a server without a cluster: no instance listens for it.
        id.instance() != 0
            && self
                .loop_state
                .handle
                .group
                .link
                .send_to(id, msg.opcode(), msg.as_bytes())
    }

    /// Sends a ping to one connection (the pong is not reported). Fails with [`NotOpen`] if it
    /// is not open here.
    pub fn ping(&mut self, id: ConnId) -> Result<(), NotOpen> {
        let key = self.slot_key(id).ok_or(NotOpen)?;
        self.eng.ping(key, b"")
    }

    /// Sends a message to every open connection except `except`, encoding the frame once and
    /// sharing its bytes among all queues, on every loop. Returns how many connections of this
    /// loop it was queued for (the other loops queue it for theirs).
    ///
    /// With permessage-deflate the message is compressed once per window size its peers agreed
    /// on (one, unless some asked for a smaller window), by the first loop that needs it, and
    /// those bytes are shared the same way.
    ///
    /// With a cluster the message also goes to every other instance through Redis (queued for
    /// the bus, never waited for: this server's peers get it at once, Redis up or down).
    pub fn broadcast(&mut self, msg: Message<'_>, except: Option<ConnId>) -> usize {
        let frame = self.shared_frame(msg);
        self.loop_state
            .handle
            .group
            .link
            .broadcast(msg.opcode(), msg.as_bytes(), except);
        self.deliver(&frame, except, true)
    }

    /// Queues a shared frame for every open connection of this loop but `except`; `forward`
    /// hands it to the other loops too.
    pub(crate) fn deliver(&mut self, frame: &Arc<SharedFrame>, except: Option<ConnId>, forward: bool) -> usize {
        let mut sent = 0;
        let (lp, instance) = (self.loop_state.lp, self.loop_state.instance);
        let recipient = |slot: &crate::io::engine::Slot<ServerStream, ConnData<S>>, key: usize| {
            !slot.is_dead()
                && slot.conn.state() == State::Open
                && except != Some(ConnId::new(key, slot.gen, lp, instance))
        };
        // The connection whose message this usually is gets its copy first: its round trip
        // should not wait for everyone else's.
        let first = self.eng.corked();
        if let Some(key) = first.filter(|&k| recipient(&self.eng.slots[k], k)) {
            if self.queue_shared(key, frame) {
                sent += 1;
            }
            self.eng.flush_cork();
        }
        // The other loops work on it while this one does.
        if forward {
            self.loop_state.forward(frame, None, except);
        }
        // Index the slab instead of collecting keys: no allocation per broadcast.
        for key in 0..self.eng.slots.capacity() {
            let Some(slot) = self.eng.slots.get(key) else { continue };
            if Some(key) == first || !recipient(slot, key) {
                continue;
            }
            if self.queue_shared(key, frame) {
                sent += 1;
            }
        }
        self.loop_state.stats.messages_out += sent as u64;
        // Each connection looked at is work for the sender's wakeup (see `io::engine::QUANTUM`).
        self.eng.work += self.eng.slots.len();
        sent
    }

    /// Subscribes connection `id` to `topic` (any string; a topic exists while it has
    /// subscribers). Returns false if the connection is not open (from `on_open` until
    /// `on_close`) or was already subscribed. A connection's subscriptions end right after its
    /// `on_close`.
    ///
    /// With a cluster, the server listens to the topic on Redis while any of its loops has a
    /// subscriber to it, so that a publish on another instance reaches them.
    pub fn subscribe(&mut self, id: ConnId, topic: &str) -> bool {
        let open = self.slot_key(id).is_some_and(|k| self.eng.slots[k].data.opened());
        if !open {
            return false;
        }
        match self.loop_state.topics.subscribe(id, topic) {
            Joined::Already => false,
            Joined::Member => true,
            Joined::First => {
                self.loop_state.handle.group.link.topic_joined(topic);
                true
            }
        }
    }

    /// Unsubscribes connection `id` from `topic`. Returns whether it was subscribed.
    pub fn unsubscribe(&mut self, id: ConnId, topic: &str) -> bool {
        if !self.is_here(id) {
            return false;
        }
        match self.loop_state.topics.unsubscribe(id, topic) {
            Left::NotMember => false,
            Left::Member => true,
            Left::Last => {
                self.loop_state.handle.group.link.topic_left(topic);
                true
            }
        }
    }

    /// How many connections of this loop are subscribed to `topic`.
    pub fn subscribers(&self, topic: &str) -> usize {
        self.loop_state.topics.count(topic)
    }

    /// Sends a message to every open connection subscribed to `topic` except `except`, on every
    /// loop, as [`broadcast`](Self::broadcast) does: the frame is encoded once and its bytes
    /// shared, and full queues meet the [`SlowConsumer`] policy. The cost is O(subscribers of
    /// `topic`). Returns how many connections of this loop it was queued for.
    ///
    /// With a cluster the message also goes to the topic's subscribers on every other
    /// instance, through Redis (queued, never waited for, as with [`broadcast`](Self::broadcast)).
    pub fn publish(&mut self, topic: &str, msg: Message<'_>, except: Option<ConnId>) -> usize {
        let link = &self.loop_state.handle.group.link;
        link.publish(topic, msg.opcode(), msg.as_bytes(), except);
        let alone = self.loop_state.handle.group.inboxes.len() == 1;
        if alone && self.loop_state.topics.find(topic).is_none() {
            return 0;
        }
        let frame = self.shared_frame(msg);
        self.loop_state.forward(&frame, Some(topic), except);
        self.publish_here(topic, &frame, except)
    }

    /// Queues a shared frame for this loop's subscribers of `topic` but `except`.
    pub(crate) fn publish_here(&mut self, topic: &str, frame: &Arc<SharedFrame>, except: Option<ConnId>) -> usize {
        let Some(t) = self.loop_state.topics.find(topic) else {
            return 0;
        };
        let mut sent = 0;
        let mut i = 0;
        // By index: a slow consumer closed on the way stays subscribed until the turn ends.
        while let Some(id) = self.loop_state.topics.subscriber(t, i, self.loop_state.instance) {
            i += 1;
            if except == Some(id) {
                continue;
            }
            let key = id.key();
            let open = self
                .eng
                .slots
                .get(key)
                .is_some_and(|s| s.gen == id.gen() && !s.is_dead() && s.conn.state() == State::Open);
            if open && self.queue_shared(key, frame) {
                sent += 1;
            }
        }
        self.loop_state.stats.messages_out += sent as u64;
        self.eng.work += i;
        sent
    }

    /// Queues a shared frame for one connection, applying the slow consumer policy.
    fn queue_shared(&mut self, key: usize, frame: &Arc<SharedFrame>) -> bool {
        let plain = frame;
        #[cfg(feature = "deflate")]
        let frame = compressed_for(frame, self.eng.slots[key].conn.deflate(), &mut self.eng.codec);
        // A peer with nothing queued takes any frame (even one above the bound): the bytes are
        // shared, and refusing would fail every peer on one large message.
        let queued = self.eng.backlog(key);
        if queued > 0 && queued + frame.bytes().len() > self.loop_state.max_backpressure {
            match self.loop_state.slow_consumer {
                SlowConsumer::Drop => {
                    self.loop_state.stats.dropped += 1;
                }
                SlowConsumer::Close => {
                    super::peer_log(
                        log::Level::Info,
                        self.addr_of(key),
                        format_args!(": slow consumer, closing"),
                    );
                    self.eng.clear_queue(key);
                    close_conn(self.eng, key, close_code::POLICY_VIOLATION, "slow consumer");
                    self.loop_state.counters.slow_closes += 1;
                }
            }
            return false;
        }
        self.eng.send_shared(key, frame);
        if self.loop_state.log_messages {
            super::msglog::frame(self.addr_of(key), super::msglog::Dir::Out, plain.bytes());
        }
        true
    }

    /// Starts closing one connection with `code` and `reason`.
    pub fn close(&mut self, id: ConnId, code: u16, reason: &str) {
        if let Some(key) = self.slot_key(id) {
            close_conn(self.eng, key, code, reason);
        }
    }

    /// Open connections on this loop.
    pub fn len(&self) -> usize {
        self.loop_state.stats.open
    }

    /// Open connections on every loop of the server (the same as [`len`](Self::len) with one
    /// loop), and with a cluster on every other live instance too, as their last heartbeats
    /// told (an instance that stopped without a word leaves the count after three missed
    /// heartbeats).
    pub fn len_everywhere(&self) -> usize {
        self.loop_state.open_everywhere() + self.loop_state.handle.group.link.remote_open()
    }

    /// This server's instance id: random and non-zero with a cluster
    /// ([`ServerConfig::cluster`](super::ServerConfig::cluster)), 0 without. Every
    /// [`ConnId`] of this server carries it.
    pub fn instance(&self) -> u64 {
        self.loop_state.instance
    }

    /// The cluster's counters, when the server runs with one.
    #[cfg(feature = "cluster")]
    pub fn cluster_stats(&self) -> Option<super::cluster::ClusterStats> {
        self.loop_state.handle.group.link.stats()
    }

    /// This loop's index (0 to [`ServerConfig::threads`](super::ServerConfig::threads) - 1).
    pub fn loop_index(&self) -> usize {
        usize::from(self.loop_state.lp)
    }

    /// The server's [`Handle`](super::Handle): to reach a connection of another loop, or to
    /// give to another thread.
    pub fn handle(&self) -> super::Handle {
        self.loop_state.handle.clone()
    }

    /// Whether no connection is open.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Every open connection of this loop: its id and peer address.
    pub fn peers(&self) -> impl Iterator<Item = (ConnId, SocketAddr)> + '_ {
        let (lp, instance) = (self.loop_state.lp, self.loop_state.instance);
        self.eng
            .slots
            .iter()
            .filter(|(_, s)| s.data.opened() && !s.is_dead())
            .map(move |(k, s)| {
                (
                    ConnId::new(k, s.gen, lp, instance),
                    s.data.addr.get(&self.loop_state.peers),
                )
            })
    }

    /// The peer address of a connection, if it is still there.
    pub fn peer_addr(&self, id: ConnId) -> Option<SocketAddr> {
        self.slot_key(id).map(|k| self.addr_of(k))
    }

    /// The state of another open connection. The connection a callback is about is not
    /// reachable here: its state is in that callback's [`Conn`].
    pub fn state_of(&mut self, id: ConnId) -> Option<&mut S> {
        let key = self.slot_key(id).filter(|k| Some(*k) != self.loop_state.lent)?;
        let data = &mut self.eng.slots[key].data;
        if data.opened() {
            data.state_mut()
        } else {
            None
        }
    }

    /// Bytes queued for a connection.
    pub fn queued(&self, id: ConnId) -> usize {
        self.slot_key(id).map_or(0, |k| self.eng.backlog(k))
    }

    /// Calls [`Handler::on_timer`] after `after`. Any number of timers may be pending.
    pub fn set_timer(&mut self, after: Duration) -> TimerId {
        self.loop_state.set_timer(self.eng, after, None)
    }

    /// Calls [`Handler::on_timer`] after `after` for connection `id` of this loop, unless it has
    /// closed by then (a timer set for another loop's or instance's connection never fires).
    pub fn set_conn_timer(&mut self, id: ConnId, after: Duration) -> TimerId {
        self.loop_state.set_timer(self.eng, after, Some(id))
    }

    /// Cancels a pending timer. Returns whether it was pending.
    pub fn cancel_timer(&mut self, id: TimerId) -> bool {
        self.loop_state.take_timer(id.0).is_some()
    }

    /// The loop's counters (memory: the whole server's, shared by its loops).
    pub fn stats(&self) -> Stats {
        let mut s = self.loop_state.stats;
        s.bytes_queued = self.eng.slots.iter().map(|(_, s)| s.unsent()).sum();
        s.memory = self.eng.budget.used();
        s.memory_limit = self.eng.budget.limit();
        s
    }

    /// Starts a graceful shutdown of every loop once this callback returns: stop accepting,
    /// drain for [`ServerConfig::drain_timeout`](super::ServerConfig::drain_timeout) (none by
    /// default), close every peer left with 1001, then return from
    /// [`Server::run`](super::Server::run).
    pub fn shutdown(&mut self) {
        self.loop_state.shutdown_requested = true;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conn_ids_round_trip_on_any_width() {
        let id = ConnId::new(12345, 0xab_cdef, 0, 0);
        assert_eq!((id.key(), id.gen(), id.loop_index()), (12345, 0xab_cdef, 0));
        assert_eq!(id.to_string(), "#12345.11259375");
        let id = ConnId::new(u32::MAX as usize, 0xFF_FFFF, 255, u64::MAX);
        assert_eq!(
            (id.key(), id.gen(), id.loop_index(), id.instance()),
            (u32::MAX as usize, 0xFF_FFFF, 255, u64::MAX)
        );
        assert_eq!(ConnId::new(7, 3, 2, 0).to_string(), "#2:7.3");
        assert_eq!(ConnId::new(7, 3, 2, 0xab).to_string(), "#2:7.3@00000000000000ab");
        // The instance is the high half of the number, the local part the low half.
        let id = ConnId::new(7, 3, 2, 0x0123_4567_89ab_cdef);
        assert_eq!(id.as_u128() >> 64, 0x0123_4567_89ab_cdef);
        assert_eq!(id.as_u128() as u64, id.as_u64());
        assert_eq!(ConnId::from_u128(id.as_u128()), id);
        assert_eq!(ConnId::from_u128(u128::MAX).as_u128(), u128::MAX);
        // Ids of one instance order as their numbers do.
        let (a, b) = (ConnId::new(9, 1, 0, 5), ConnId::new(1, 1, 1, 5));
        assert_eq!(a < b, a.as_u128() < b.as_u128());
        assert_eq!(std::mem::align_of::<ConnId>(), std::mem::align_of::<u64>());
    }

    #[test]
    fn an_idle_connection_is_one_small_slot() {
        // The server's whole per-connection cost in user space: the engine's slot with the
        // peer address and a zero-sized state (a descriptor measured as an `i32`; see the
        // engine's test), and the slab's entry around it.
        type S = crate::io::engine::Slot<i32, ConnData<()>>;
        // slab's own entry type has this shape; the tag must fit in the slot's spare bytes.
        #[allow(dead_code)]
        enum Entry {
            Vacant(usize),
            Occupied(S),
        }
        let limit = if cfg!(target_pointer_width = "64") { 48 } else { 40 };
        let slot = std::mem::size_of::<S>();
        let entry = std::mem::size_of::<Entry>();
        assert!(slot <= limit, "slot is {slot} bytes");
        assert!(entry <= limit, "slab entry is {entry} bytes");
    }

    #[test]
    fn a_connections_state_is_dropped_once() {
        use std::rc::Rc;
        // Each clone of the Rc is one state alive: the count says how many were not dropped.
        let alive = Rc::new(());
        let addr = PeerAddr::new("127.0.0.1:9".parse().unwrap(), &mut PeerTable::new());
        let mut data = ConnData::new(addr, true);
        assert!(data.counted() && !data.opened());
        assert!(data.state_mut().is_none() && data.take_state().is_none());
        data.put_state(Rc::clone(&alive));
        data.put_state(Rc::clone(&alive)); // replaces (and drops) the first
        assert_eq!(Rc::strong_count(&alive), 2);
        let lent = data.take_state().expect("a state");
        assert!(data.take_state().is_none(), "taken once");
        data.put_state(lent);
        assert!(data.state_mut().is_some());
        assert!(!data.set_opened(true) && data.set_opened(false));
        drop(data);
        assert_eq!(Rc::strong_count(&alive), 1, "the slot's state is dropped with it");
        // Without a state (a plain request, a refused upgrade) nothing is dropped.
        drop(ConnData::<Rc<()>>::new(addr, false));
        assert_eq!(Rc::strong_count(&alive), 1);
    }

    #[test]
    fn peer_addresses_are_compact_and_exact() {
        assert_eq!(std::mem::size_of::<PeerAddr>(), 6);
        let mut table = PeerTable::new();
        for a in [
            "127.0.0.1:9001",
            "[::1]:443",
            "[2001:db8::1]:65535",
            "0.0.0.0:0",
            "[fe80::1%2]:80",
        ] {
            let a: SocketAddr = a.parse().unwrap();
            let p = PeerAddr::new(a, &mut table);
            assert_eq!(p.get(&table), a);
            p.release(&mut table);
        }
        assert!(table.is_empty(), "every long address is given back");
        // An IPv4-mapped address (a dual-stack listener's IPv4 peer) stays compact.
        let mapped: SocketAddr = "[::ffff:10.0.0.1]:5000".parse().unwrap();
        let p = PeerAddr::new(mapped, &mut table);
        assert_eq!(p.get(&table), "10.0.0.1:5000".parse::<SocketAddr>().unwrap());
        assert!(table.is_empty());
    }
}
