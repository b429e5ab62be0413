//! The application's side of the server: [`Handler`], and [`Ctx`], through which it acts.

use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use mio::net::TcpStream;

use super::config::SlowConsumer;
use super::Shared;
use crate::io::engine::Engine;
use crate::proto::frame::write_frame;
use crate::proto::rand::NoRandom;
use crate::proto::{close_code, Answer, Message, Request, State};

/// Identifies one connection for as long as it lives; a later connection never gets the same
/// id (the generation part wraps only after 16 million connections in the same slot).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConnId(u64);

impl ConnId {
    pub(crate) fn new(key: usize, gen: u32) -> Self {
        ConnId((u64::from(gen & 0xFF_FFFF) << 32) | key as u64 & 0xFFFF_FFFF)
    }
    pub(crate) fn key(self) -> usize {
        (self.0 & 0xFFFF_FFFF) as usize
    }
    pub(crate) fn gen(self) -> u32 {
        ((self.0 >> 32) & 0xFF_FFFF) as u32
    }
    /// The id as a number (for logs and maps).
    pub fn as_u64(self) -> u64 {
        self.0
    }
}

impl std::fmt::Display for ConnId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "#{}.{}", self.key(), self.gen())
    }
}

/// A peer address in 18 bytes (an IPv4 address is kept IPv4-mapped); `SocketAddr` takes 32.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) struct PeerAddr {
    ip: [u8; 16],
    port: [u8; 2],
}

impl PeerAddr {
    pub(crate) fn new(a: SocketAddr) -> Self {
        let ip = match a.ip() {
            IpAddr::V4(v4) => v4.to_ipv6_mapped(),
            IpAddr::V6(v6) => v6,
        };
        PeerAddr {
            ip: ip.octets(),
            port: a.port().to_ne_bytes(),
        }
    }

    pub(crate) fn get(&self) -> SocketAddr {
        let v6 = Ipv6Addr::from(self.ip);
        let ip = v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4);
        SocketAddr::new(ip, u16::from_ne_bytes(self.port))
    }
}

/// What the server keeps per connection besides the engine's slot.
pub(crate) struct ConnData<S> {
    pub(crate) addr: PeerAddr,
    /// `on_open` was called and `on_close` not yet.
    pub(crate) opened: bool,
    pub(crate) state: S,
}

pub(crate) type ServerEngine<S> = Engine<TcpStream, ConnData<S>, NoRandom>;

/// The connection a callback is about: its id, its peer's address and its state.
#[derive(Debug)]
pub struct Conn<S> {
    pub(crate) id: ConnId,
    pub(crate) addr: PeerAddr,
    /// The application's state for this connection (see [`Handler::State`]).
    pub state: S,
}

impl<S> Conn<S> {
    /// The connection's id.
    pub fn id(&self) -> ConnId {
        self.id
    }

    /// The peer's address.
    pub fn addr(&self) -> SocketAddr {
        self.addr.get()
    }
}

impl std::fmt::Debug for PeerAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.get())
    }
}

/// An upgrade request on its way to [`Handler::on_upgrade`].
#[derive(Debug)]
pub struct Upgrade<'a> {
    pub(crate) request: &'a Request,
    pub(crate) peer: SocketAddr,
    pub(crate) protocol: Option<String>,
}

impl Upgrade<'_> {
    /// The request: method, path with query, every header.
    pub fn request(&self) -> &Request {
        self.request
    }

    /// The peer's address (the proxy's, behind a proxy: see `X-Forwarded-For`).
    pub fn peer(&self) -> SocketAddr {
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
    /// connection. Use `()` when there is none: a zero-sized state costs nothing.
    type State: Default;

    /// The loop is about to start; no connection is open yet.
    fn on_start(&mut self, ctx: &mut Ctx<'_, Self::State>) {
        let _ = ctx;
    }

    /// A valid WebSocket upgrade request arrived. Return the new connection's state to accept
    /// it, or an [`Answer`] to refuse it (`Answer::reject(401, "…")`). The default accepts with
    /// `Default::default()`.
    fn on_upgrade(&mut self, ctx: &mut Ctx<'_, Self::State>, up: &mut Upgrade<'_>) -> Result<Self::State, Answer> {
        let _ = (ctx, up);
        Ok(Self::State::default())
    }

    /// A handshake completed.
    fn on_open(&mut self, ctx: &mut Ctx<'_, Self::State>, conn: &mut Conn<Self::State>) {
        let _ = (ctx, conn);
    }

    /// A complete message arrived.
    fn on_message(&mut self, ctx: &mut Ctx<'_, Self::State>, conn: &mut Conn<Self::State>, msg: Message<'_>);

    /// The connection ended: `code` is the peer's close code, or `1006` when it vanished
    /// without a close frame, or the code this server sent when it failed the connection.
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
    /// Broadcast messages skipped for slow consumers since start.
    pub dropped: u64,
    /// Connections refused with `503` since start.
    pub refused: u64,
}

/// A broadcast message's frames, each encoded on first need and then shared: the plain frame
/// and, with permessage-deflate, one compressed frame per window size (8..=15 bits).
struct Frames<'m> {
    msg: Message<'m>,
    plain: Option<Arc<Vec<u8>>>,
    #[cfg(feature = "deflate")]
    by_window: [Option<Arc<Vec<u8>>>; 8],
}

impl<'m> Frames<'m> {
    fn new(msg: Message<'m>) -> Self {
        Frames {
            msg,
            plain: None,
            #[cfg(feature = "deflate")]
            by_window: Default::default(),
        }
    }

    fn plain(&mut self) -> &Arc<Vec<u8>> {
        let msg = self.msg;
        self.plain.get_or_insert_with(|| {
            let mut frame = Vec::with_capacity(msg.as_bytes().len() + 10);
            write_frame(&mut frame, true, msg.opcode(), None, msg.as_bytes());
            Arc::new(frame)
        })
    }

    /// The frame for a peer with these permessage-deflate parameters: compressed when that pays
    /// (else the plain one).
    #[cfg(feature = "deflate")]
    fn get(
        &mut self,
        agreed: Option<crate::proto::deflate::Agreed>,
        codec: &mut crate::proto::deflate::Codec,
    ) -> &Arc<Vec<u8>> {
        let Some(a) = agreed else { return self.plain() };
        let i = usize::from(a.send_window_bits.clamp(8, 15) - 8);
        if self.by_window[i].is_none() {
            let msg = self.msg;
            let frame = match codec.compress(&a, msg.as_bytes()) {
                Some(z) => {
                    let mut frame = Vec::with_capacity(z.len() + 10);
                    crate::proto::frame::write_compressed_frame(&mut frame, msg.opcode(), None, z);
                    Arc::new(frame)
                }
                None => Arc::clone(self.plain()),
            };
            self.by_window[i] = Some(frame);
        }
        self.by_window[i].as_ref().expect("filled above")
    }
}

/// What the handler can do from inside the loop.
pub struct Ctx<'a, S> {
    pub(crate) eng: &'a mut ServerEngine<S>,
    pub(crate) shared: &'a mut Shared,
}

impl<'a, S> Ctx<'a, S> {
    fn slot_key(&self, id: ConnId) -> Option<usize> {
        let key = id.key();
        self.eng.is_live(key, id.gen()).then_some(key)
    }

    /// Sends a text message to one connection. Returns false if it is not open.
    pub fn send_text(&mut self, id: ConnId, text: &str) -> bool {
        self.send(id, Message::Text(text))
    }

    /// Sends a message to one connection. Returns false if it is not open.
    pub fn send(&mut self, id: ConnId, msg: Message<'_>) -> bool {
        let ok = self.eng.send_to(id.key(), id.gen(), msg).is_ok();
        self.shared.stats.messages_out += u64::from(ok);
        ok
    }

    /// Sends a ping to one connection (the pong is not reported). Returns false if it is not open.
    pub fn ping(&mut self, id: ConnId) -> bool {
        self.slot_key(id).is_some_and(|key| self.eng.ping(key, b"").is_ok())
    }

    /// Sends a message to every open connection except `except`, encoding the frame once and
    /// sharing its bytes among all queues. Returns how many connections it was queued for.
    ///
    /// With permessage-deflate the message is compressed once per window size its peers agreed
    /// on (one, unless some asked for a smaller window) and those bytes are shared the same way.
    pub fn broadcast(&mut self, msg: Message<'_>, except: Option<ConnId>) -> usize {
        let mut frames = Frames::new(msg);
        let mut sent = 0;
        // Index the slab instead of collecting keys: no allocation per broadcast.
        for key in 0..self.eng.slots.capacity() {
            let Some(slot) = self.eng.slots.get(key) else { continue };
            if slot.is_dead() || slot.conn.state() != State::Open {
                continue;
            }
            if except.is_some_and(|e| e == ConnId::new(key, slot.gen)) {
                continue;
            }
            #[cfg(feature = "deflate")]
            let frame = frames.get(slot.conn.deflate(), &mut self.eng.codec);
            #[cfg(not(feature = "deflate"))]
            let frame = frames.plain();
            if self.queue_shared(key, frame) {
                sent += 1;
            }
        }
        self.shared.stats.messages_out += sent as u64;
        sent
    }

    /// Queues a shared frame for one connection, applying the slow consumer policy.
    fn queue_shared(&mut self, key: usize, frame: &Arc<Vec<u8>>) -> bool {
        // A peer with nothing queued takes any frame (even one above the bound): the bytes are
        // shared, and refusing would fail every peer on one large message.
        let queued = self.eng.queued(key);
        if queued > 0 && queued + frame.len() > self.shared.max_backpressure {
            match self.shared.slow_consumer {
                SlowConsumer::Drop => {
                    self.shared.stats.dropped += 1;
                }
                SlowConsumer::Close => {
                    log::info!("{:?}: slow consumer, closing", self.eng.slots[key].data.addr);
                    self.eng.clear_queue(key);
                    let _ = self.eng.close(key, close_code::POLICY_VIOLATION, "slow consumer");
                }
            }
            return false;
        }
        self.eng.send_shared(key, frame);
        true
    }

    /// Starts closing one connection with `code` and `reason`.
    pub fn close(&mut self, id: ConnId, code: u16, reason: &str) {
        if let Some(key) = self.slot_key(id) {
            let _ = self.eng.close(key, code, reason);
        }
    }

    /// Open connections.
    pub fn len(&self) -> usize {
        self.shared.stats.open
    }

    /// Whether no connection is open.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Every open connection: its id and peer address.
    pub fn peers(&self) -> impl Iterator<Item = (ConnId, SocketAddr)> + '_ {
        self.eng
            .slots
            .iter()
            .filter(|(_, s)| s.data.opened && !s.is_dead())
            .map(|(k, s)| (ConnId::new(k, s.gen), s.data.addr.get()))
    }

    /// The peer address of a connection, if it is still there.
    pub fn peer_addr(&self, id: ConnId) -> Option<SocketAddr> {
        self.slot_key(id).map(|k| self.eng.slots[k].data.addr.get())
    }

    /// The state of another open connection. The connection a callback is about is not
    /// reachable here: its state is in that callback's [`Conn`].
    pub fn state_of(&mut self, id: ConnId) -> Option<&mut S> {
        let key = self.slot_key(id)?;
        let data = &mut self.eng.slots[key].data;
        data.opened.then_some(&mut data.state)
    }

    /// Bytes queued for a connection.
    pub fn queued(&self, id: ConnId) -> usize {
        self.slot_key(id).map_or(0, |k| self.eng.queued(k))
    }

    /// Calls [`Handler::on_timer`] after `after`. Any number of timers may be pending.
    pub fn set_timer(&mut self, after: Duration) -> TimerId {
        self.shared.set_timer(self.eng, after, None)
    }

    /// Calls [`Handler::on_timer`] after `after` for connection `id`, unless it has closed by then.
    pub fn set_conn_timer(&mut self, id: ConnId, after: Duration) -> TimerId {
        self.shared.set_timer(self.eng, after, Some(id))
    }

    /// Cancels a pending timer. Returns whether it was pending.
    pub fn cancel_timer(&mut self, id: TimerId) -> bool {
        self.shared.take_timer(id.0).is_some()
    }

    /// The loop's counters.
    pub fn stats(&self) -> Stats {
        let mut s = self.shared.stats;
        s.bytes_queued = self.eng.slots.iter().map(|(_, s)| s.queued()).sum();
        s
    }

    /// Starts a graceful shutdown once this callback returns: stop accepting, close every peer
    /// with 1001, then return from [`Server::run`](super::Server::run).
    pub fn shutdown(&mut self) {
        self.shared.shutdown_requested = true;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conn_ids_round_trip_on_any_width() {
        let id = ConnId::new(12345, 0xab_cdef);
        assert_eq!((id.key(), id.gen()), (12345, 0xab_cdef));
        assert_eq!(id.to_string(), "#12345.11259375");
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
        let limit = if cfg!(target_pointer_width = "64") { 56 } else { 48 };
        let slot = std::mem::size_of::<S>();
        let entry = std::mem::size_of::<Entry>();
        assert!(slot <= limit, "slot is {slot} bytes");
        assert!(entry <= limit, "slab entry is {entry} bytes");
    }

    #[test]
    fn peer_addresses_are_compact_and_exact() {
        assert_eq!(std::mem::size_of::<PeerAddr>(), 18);
        for a in ["127.0.0.1:9001", "[::1]:443", "[2001:db8::1]:65535", "0.0.0.0:0"] {
            let a: SocketAddr = a.parse().unwrap();
            assert_eq!(PeerAddr::new(a).get(), a);
        }
    }
}
