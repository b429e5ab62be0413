//! The server: one mio poll loop, connections in a slab, a [`Handler`] for the application.
//!
//! The loop accepts, reads and writes until `WouldBlock` (readiness is edge-triggered), hands
//! received bytes to the sans-IO [`Connection`], and calls the handler
//! with complete messages. One read buffer serves every connection; a connection owns memory only
//! while a frame is split across reads or bytes wait to be written.

use std::collections::VecDeque;
use std::io::{self, Read};
use std::net::{Shutdown, SocketAddr, ToSocketAddrs};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use mio::net::{TcpListener, TcpStream};
use mio::{Events, Interest, Poll, Token, Waker};
use slab::Slab;

use crate::outbox::{write_some, Outbox};
use crate::proto::frame::{write_frame, OpCode};
use crate::proto::handshake::{self, HandshakePolicy, Reject, Request, RequestHead};
use crate::proto::{close_code, Connection, Event, HeadError, Message, Role, State};
use crate::timer::{millis, poll_timeout, Clock, TimerQueue};

/// What to do with a peer whose outbound queue is full when a broadcast arrives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SlowConsumer {
    /// Close it with 1008 and free its queue (the default).
    Close,
    /// Skip this message for that peer and count it as dropped.
    Drop,
}

/// Server settings. Every limit has a default suited to a small machine; see each field.
#[derive(Clone, Debug)]
pub struct Config {
    /// Open connections allowed; above it a new connection gets `503`.
    /// Default: the process's open-file limit less 64 descriptors.
    pub max_connections: usize,
    /// Largest message accepted, in bytes (default 16 MiB); larger gets close `1009`.
    pub max_message: usize,
    /// Largest handshake request head (default 8 KiB); larger gets `431`.
    pub max_request_head: usize,
    /// Outbound bytes queued per connection before the server stops reading from it
    /// (default 1 MiB). Broadcasts apply [`slow_consumer`](Self::slow_consumer) at this bound.
    pub max_backpressure: usize,
    /// What a broadcast does to a peer whose queue is full (default [`SlowConsumer::Close`]).
    pub slow_consumer: SlowConsumer,
    /// Time allowed to send a complete handshake request (default 10 s).
    pub handshake_timeout: Duration,
    /// Send a ping after this much silence from the peer (default: off).
    pub ping_interval: Option<Duration>,
    /// Close a peer silent for this long with `1001` (default: off, as in the original design:
    /// no timeout but ours).
    pub idle_timeout: Option<Duration>,
    /// How long to wait for the peer's close frame, and for its FIN after ours (default 3 s).
    pub close_timeout: Duration,
    /// How long a shutdown waits for peers to answer the close (default 3 s).
    pub shutdown_timeout: Duration,
    /// Size of the one read buffer shared by all connections (default 256 KiB). A frame that
    /// fits in one read is unmasked in place; a larger one is assembled per connection, which
    /// costs copies and allocations (64 KiB made every 64 KiB message take that path). Pages
    /// of the buffer that no read has reached are not resident.
    pub read_buffer_size: usize,
    /// TCP keep-alive probes after this much idle time (default: off).
    pub tcp_keepalive: Option<Duration>,
    /// Allowed origins and subprotocols.
    pub policy: HandshakePolicy,
    /// An HTML page served for a plain `GET /` (default: none; a plain request gets `426`).
    pub page: Option<&'static str>,
    /// Stop gracefully on SIGINT and SIGTERM (default: off; the CLI turns it on).
    pub handle_signals: bool,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            max_connections: default_max_connections(),
            max_message: 16 << 20,
            max_request_head: 8 << 10,
            max_backpressure: 1 << 20,
            slow_consumer: SlowConsumer::Close,
            handshake_timeout: Duration::from_secs(10),
            ping_interval: None,
            idle_timeout: None,
            close_timeout: Duration::from_secs(3),
            shutdown_timeout: Duration::from_secs(3),
            read_buffer_size: 256 << 10,
            tcp_keepalive: None,
            policy: HandshakePolicy::default(),
            page: None,
            handle_signals: false,
        }
    }
}

/// Descriptors kept free for the listener, the poll, logging and the like.
const FD_RESERVE: u64 = 64;

/// The open-file limit less a reserve: how many connections the process can hold.
pub fn default_max_connections() -> usize {
    let (soft, _) = rlimit::Resource::NOFILE.get().unwrap_or((1024, 1024));
    soft.saturating_sub(FD_RESERVE).max(1).min(usize::MAX as u64) as usize
}

/// Identifies one connection for as long as it lives; never reused by a later connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConnId(u64);

impl ConnId {
    fn new(key: usize, gen: u32) -> Self {
        ConnId((u64::from(gen) << 32) | key as u64)
    }
    fn key(self) -> usize {
        (self.0 & 0xffff_ffff) as usize
    }
    fn gen(self) -> u32 {
        (self.0 >> 32) as u32
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

/// A connection as the handler sees it: its id and the peer's address.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Peer {
    /// The connection's id.
    pub id: ConnId,
    /// The remote address.
    pub addr: SocketAddr,
}

/// The application's side of the server. Every method runs on the loop's thread; a slow method
/// stalls every connection.
pub trait Handler {
    /// A handshake completed.
    fn on_open(&mut self, ctx: &mut Ctx<'_>, peer: Peer, request: &Request) {
        let _ = (ctx, peer, request);
    }
    /// A complete message arrived.
    fn on_message(&mut self, ctx: &mut Ctx<'_>, peer: Peer, msg: Message<'_>);
    /// The connection ended: `code` is the peer's close code, or `1006` when it vanished
    /// without a close frame, or the code this server sent when it failed the connection.
    fn on_close(&mut self, ctx: &mut Ctx<'_>, peer: Peer, code: u16, reason: &str) {
        let _ = (ctx, peer, code, reason);
    }
    /// A timer set with [`Ctx::set_timer`] came due.
    fn on_timer(&mut self, ctx: &mut Ctx<'_>) {
        let _ = ctx;
    }
    /// [`Handle::wake`] was called from another thread.
    fn on_wake(&mut self, ctx: &mut Ctx<'_>) {
        let _ = ctx;
    }
}

/// A boxed handler is a handler, so one loop can serve a handler chosen at run time.
impl<H: Handler + ?Sized> Handler for Box<H> {
    fn on_open(&mut self, ctx: &mut Ctx<'_>, peer: Peer, request: &Request) {
        (**self).on_open(ctx, peer, request)
    }
    fn on_message(&mut self, ctx: &mut Ctx<'_>, peer: Peer, msg: Message<'_>) {
        (**self).on_message(ctx, peer, msg)
    }
    fn on_close(&mut self, ctx: &mut Ctx<'_>, peer: Peer, code: u16, reason: &str) {
        (**self).on_close(ctx, peer, code, reason)
    }
    fn on_timer(&mut self, ctx: &mut Ctx<'_>) {
        (**self).on_timer(ctx)
    }
    fn on_wake(&mut self, ctx: &mut Ctx<'_>) {
        (**self).on_wake(ctx)
    }
}

/// Counters kept by the loop.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
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

// Slot flags.
const WRITE_INTEREST: u8 = 1; // registered for WRITABLE
const READ_PAUSED: u8 = 2; // backpressure: not registered for READABLE
const PINGED: u8 = 4; // a heartbeat ping is outstanding
const OPENED: u8 = 8; // on_open was called and on_close not yet
const SHUT_WR: u8 = 16; // our FIN is sent
const DEAD: u8 = 32; // to be removed at the end of this wakeup
const READ_UNREGISTERED: u8 = 64; // registered without READABLE

/// One socket. Kept small: this is what an idle connection costs.
struct Slot {
    stream: TcpStream,
    conn: Connection,
    out: Option<Box<Outbox>>,
    addr: SocketAddr,
    gen: u32,
    /// Milliseconds (low 32 bits of the loop clock) of the last activity or state change.
    since: u32,
    /// The deadline queued for this slot (low 32 bits), or 0 for none.
    queued: u32,
    flags: u8,
}

impl Slot {
    fn queued_len(&self) -> usize {
        self.out.as_ref().map_or(0, |o| o.len())
    }
}

/// Unsent remainders at least this large move into the queue instead of being copied.
const MOVE_ABOVE: usize = 64 << 10;

const LISTENER: Token = Token(usize::MAX);
const WAKER: Token = Token(usize::MAX - 1);
const SIGNALS: Token = Token(usize::MAX - 2);
/// The heap key for the handler's timer and the accept pause (never a slab key).
const TIMER_KEY: usize = usize::MAX;
const ACCEPT_KEY: usize = usize::MAX - 1;

/// A command sent from another thread.
enum Command {
    Broadcast(Vec<u8>, OpCode),
    Shutdown,
    Wake,
}

/// Commands waiting for the loop; more are refused so that a producer faster than the loop
/// cannot grow memory without bound.
const MAX_COMMANDS: usize = 1024;

/// Lets other threads reach a running server: broadcast, wake the handler, or stop it.
///
/// At most 1,024 commands wait at once; past that the calls return
/// [`WouldBlock`](io::ErrorKind::WouldBlock) until the loop catches up.
#[derive(Clone)]
pub struct Handle {
    waker: Arc<Waker>,
    queue: Arc<Mutex<VecDeque<Command>>>,
}

impl std::fmt::Debug for Handle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Handle").finish_non_exhaustive()
    }
}

impl Handle {
    fn send(&self, c: Command) -> io::Result<()> {
        {
            let mut q = self.queue.lock().unwrap_or_else(|e| e.into_inner());
            if q.len() >= MAX_COMMANDS {
                return Err(io::Error::new(
                    io::ErrorKind::WouldBlock,
                    "the server has not caught up with earlier commands",
                ));
            }
            q.push_back(c);
        }
        self.waker.wake()
    }

    /// Sends a text message to every open connection.
    pub fn broadcast_text(&self, text: &str) -> io::Result<()> {
        self.send(Command::Broadcast(text.as_bytes().to_vec(), OpCode::Text))
    }

    /// Sends a binary message to every open connection.
    pub fn broadcast_binary(&self, data: &[u8]) -> io::Result<()> {
        self.send(Command::Broadcast(data.to_vec(), OpCode::Binary))
    }

    /// Calls [`Handler::on_wake`] on the loop's thread.
    pub fn wake(&self) -> io::Result<()> {
        self.send(Command::Wake)
    }

    /// Starts a graceful shutdown, as SIGTERM would.
    pub fn shutdown(&self) -> io::Result<()> {
        self.send(Command::Shutdown)
    }
}

/// Everything but the handler, so the handler can borrow it through [`Ctx`].
struct Core {
    poll: Poll,
    listener: Option<TcpListener>,
    slots: Slab<Slot>,
    cfg: Config,
    clock: Clock,
    now: u64,
    timers: TimerQueue,
    next_gen: u32,
    /// The handler's timer, if set.
    user_timer: Option<u64>,
    /// Accepting resumes at this time after running out of descriptors.
    accept_paused: Option<u64>,
    emfile_logged: bool,
    /// A handler asked for a shutdown; it starts at the end of this wakeup.
    shutdown_requested: bool,
    /// Shutdown started; ends at this time at the latest.
    shutdown_deadline: Option<u64>,
    commands: Arc<Mutex<VecDeque<Command>>>,
    /// Slots to remove once the current wakeup's work is done.
    dead: Vec<usize>,
    /// Slots this server started closing from inside a handler call, with the close code:
    /// `on_close` is called for them once that call returns.
    failed: Vec<(usize, u16)>,
    /// The current connection's close request, made from inside its own message callback.
    close_current: Option<(u16, String)>,
    /// Scratch for frames sent to other connections.
    tmp: Vec<u8>,
    stats: Stats,
}

/// What the handler can do from inside the loop.
pub struct Ctx<'a> {
    core: &'a mut Core,
    /// The connection whose bytes are being processed, and its pending output.
    current: Option<(usize, &'a mut Vec<u8>)>,
}

impl Ctx<'_> {
    /// Sends a text message to one connection. Returns false if it is not open.
    pub fn send_text(&mut self, id: ConnId, text: &str) -> bool {
        self.send(id, Message::Text(text))
    }

    /// Sends a message to one connection. Returns false if it is not open.
    pub fn send(&mut self, id: ConnId, msg: Message<'_>) -> bool {
        let key = id.key();
        if let Some((cur, out)) = &mut self.current {
            if *cur == key && self.core.slots.get(key).is_some_and(|s| s.gen == id.gen()) {
                if !self.core.current_may_send(key) {
                    return false;
                }
                write_frame(out, true, msg.opcode(), None, msg.as_bytes());
                self.core.stats.messages_out += 1;
                return true;
            }
        }
        self.core.send_other(id, msg)
    }

    /// Sends a message to every open connection except `except`, encoding the frame once and
    /// sharing its bytes among all queues. Returns how many connections it was queued for.
    pub fn broadcast(&mut self, msg: Message<'_>, except: Option<ConnId>) -> usize {
        let mut frame = Vec::with_capacity(msg.as_bytes().len() + 10);
        write_frame(&mut frame, true, msg.opcode(), None, msg.as_bytes());
        let frame = Arc::new(frame);
        let current = self.current.as_ref().map(|(k, _)| *k);
        let mut sent = 0;
        // Index the slab instead of collecting keys: no allocation per broadcast.
        for key in 0..self.core.slots.capacity() {
            let Some(slot) = self.core.slots.get(key) else { continue };
            if except.is_some_and(|e| e.key() == key && e.gen() == slot.gen) {
                continue;
            }
            if Some(key) == current {
                if self.core.current_may_send(key) {
                    if let Some((_, out)) = &mut self.current {
                        out.extend_from_slice(&frame);
                        sent += 1;
                    }
                }
                continue;
            }
            if slot.conn.state() != State::Open || slot.flags & DEAD != 0 {
                continue;
            }
            if self.core.queue_shared(key, &frame) {
                sent += 1;
            }
        }
        self.core.stats.messages_out += sent as u64;
        sent
    }

    /// Starts closing one connection with `code` and `reason`.
    pub fn close(&mut self, id: ConnId, code: u16, reason: &str) {
        if let Some((cur, _)) = &self.current {
            if *cur == id.key() && self.core.slots.get(id.key()).is_some_and(|s| s.gen == id.gen()) {
                self.core
                    .close_current
                    .get_or_insert_with(|| (code, reason.to_string()));
                return;
            }
        }
        self.core.close_other(id, code, reason);
    }

    /// Open connections.
    pub fn len(&self) -> usize {
        self.core.stats.open
    }

    /// Whether no connection is open.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Every open connection.
    pub fn peers(&self) -> impl Iterator<Item = Peer> + '_ {
        self.core
            .slots
            .iter()
            .filter(|(_, s)| s.flags & OPENED != 0)
            .map(|(k, s)| Peer {
                id: ConnId::new(k, s.gen),
                addr: s.addr,
            })
    }

    /// The peer address of a connection, if it is still there.
    pub fn peer_addr(&self, id: ConnId) -> Option<SocketAddr> {
        self.core
            .slots
            .get(id.key())
            .filter(|s| s.gen == id.gen())
            .map(|s| s.addr)
    }

    /// Calls [`Handler::on_timer`] after `after` (replacing any earlier timer).
    pub fn set_timer(&mut self, after: Duration) {
        let when = self.core.now + millis(after);
        self.core.user_timer = Some(when);
        self.core.timers.push(when, TIMER_KEY, 0);
    }

    /// The loop's counters.
    pub fn stats(&self) -> Stats {
        let mut s = self.core.stats;
        s.bytes_queued = self.core.slots.iter().map(|(_, s)| s.queued_len()).sum();
        s
    }

    /// Starts a graceful shutdown: stop accepting, close every peer with 1001, then return from
    /// [`Server::run`].
    pub fn shutdown(&mut self) {
        // Applied once the handler returns: the connection being processed is mid-update.
        self.core.shutdown_requested = true;
    }
}

/// A bound server, ready to [`run`](Server::run). It may be moved to the thread that runs it.
pub struct Server {
    core: Core,
    local_addr: SocketAddr,
    handle: Handle,
    signals: Option<mio::net::UnixStream>,
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server")
            .field("local_addr", &self.local_addr)
            .finish_non_exhaustive()
    }
}

impl Server {
    /// Binds a listening socket. Port 0 picks a free port; see [`local_addr`](Self::local_addr).
    pub fn bind<A: ToSocketAddrs>(addr: A, cfg: Config) -> io::Result<Server> {
        let addr = addr
            .to_socket_addrs()?
            .next()
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "no address to listen on"))?;
        let mut listener = TcpListener::bind(addr)?;
        let local_addr = listener.local_addr()?;
        let poll = Poll::new()?;
        poll.registry().register(&mut listener, LISTENER, Interest::READABLE)?;
        let waker = Arc::new(Waker::new(poll.registry(), WAKER)?);
        let commands = Arc::new(Mutex::new(VecDeque::new()));
        let signals = if cfg.handle_signals {
            let (read, write) = std::os::unix::net::UnixStream::pair()?;
            read.set_nonblocking(true)?;
            write.set_nonblocking(true)?;
            for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
                signal_hook::low_level::pipe::register(sig, write.try_clone()?)?;
            }
            let mut read = mio::net::UnixStream::from_std(read);
            poll.registry().register(&mut read, SIGNALS, Interest::READABLE)?;
            Some(read)
        } else {
            None
        };
        let clock = Clock::new();
        Ok(Server {
            core: Core {
                poll,
                listener: Some(listener),
                slots: Slab::new(),
                clock,
                now: 0,
                timers: TimerQueue::default(),
                next_gen: 1,
                user_timer: None,
                accept_paused: None,
                emfile_logged: false,
                shutdown_requested: false,
                shutdown_deadline: None,
                commands: commands.clone(),
                dead: Vec::new(),
                failed: Vec::new(),
                close_current: None,
                tmp: Vec::new(),
                stats: Stats::default(),
                cfg,
            },
            local_addr,
            handle: Handle { waker, queue: commands },
            signals,
        })
    }

    /// The address the server listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// A handle for other threads.
    pub fn handle(&self) -> Handle {
        self.handle.clone()
    }

    /// Runs the loop until a shutdown completes.
    pub fn run<H: Handler>(mut self, handler: H) -> io::Result<()> {
        let mut handler = handler;
        let mut events = Events::with_capacity(1024);
        let mut rbuf = vec![0u8; self.core.cfg.read_buffer_size.max(64)];
        let mut out = Vec::new();
        let mut signals_seen = 0u32;
        loop {
            let core = &mut self.core;
            core.now = core.clock.now();
            let mut deadline = core.timers.next();
            if let Some(d) = core.shutdown_deadline {
                deadline = Some(deadline.map_or(d, |t| t.min(d)));
            }
            match core.poll.poll(&mut events, poll_timeout(core.now, deadline)) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
            core.now = core.clock.now();
            for ev in events.iter() {
                match ev.token() {
                    LISTENER => core.accept_all(),
                    WAKER => core.run_commands(&mut handler, &mut out),
                    SIGNALS => {
                        if let Some(s) = &mut self.signals {
                            let mut b = [0u8; 16];
                            while let Ok(n) = s.read(&mut b) {
                                if n == 0 {
                                    break;
                                }
                                signals_seen += n as u32;
                            }
                        }
                        if signals_seen > 1 && core.shutdown_deadline.is_some() {
                            log::warn!("second signal: stopping now");
                            return Ok(());
                        }
                        log::info!("signal received: shutting down");
                        core.begin_shutdown();
                    }
                    Token(t) => {
                        let id = ConnId(t as u64);
                        if core.slots.get(id.key()).is_none_or(|s| s.gen != id.gen()) {
                            continue; // a stale event for a slot since reused
                        }
                        if ev.is_writable() {
                            core.on_writable(&mut handler, id.key());
                        }
                        if ev.is_readable() || ev.is_read_closed() || ev.is_error() {
                            let hup = ev.is_read_closed() || ev.is_error();
                            core.on_readable(&mut handler, id.key(), hup, &mut rbuf, &mut out);
                        }
                    }
                }
            }
            core.fire_timers(&mut handler, &mut out);
            core.reap(&mut handler);
            if std::mem::take(&mut core.shutdown_requested) {
                core.begin_shutdown();
            }
            if let Some(d) = core.shutdown_deadline {
                // Done once every peer's close handshake is over and our last bytes are out.
                if core.slots.iter().all(|(_, s)| s.flags & SHUT_WR != 0) {
                    log::info!("shutdown complete");
                    return Ok(());
                }
                if core.now >= d {
                    log::info!("shutdown: {} connection(s) did not close in time", core.slots.len());
                    return Ok(());
                }
            }
        }
    }
}

impl Core {
    /// Whether the connection being processed may still get data frames: it is open (not past
    /// its close, when `on_close` runs) and the handler has not asked to close it.
    fn current_may_send(&self, key: usize) -> bool {
        self.close_current.is_none() && self.slots[key].flags & OPENED != 0
    }

    fn now32(&self) -> u32 {
        self.now as u32
    }

    fn ctx<'a>(&'a mut self, current: Option<(usize, &'a mut Vec<u8>)>) -> Ctx<'a> {
        Ctx { core: self, current }
    }

    fn peer(&self, key: usize) -> Peer {
        let s = &self.slots[key];
        Peer {
            id: ConnId::new(key, s.gen),
            addr: s.addr,
        }
    }

    fn accept_all(&mut self) {
        if self.accept_paused.is_some() {
            return;
        }
        loop {
            let Some(listener) = &self.listener else { return };
            let (stream, addr) = match listener.accept() {
                Ok(x) => x,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if is_resource_error(&e) => {
                    // Out of descriptors or memory: keep serving, retry in a moment.
                    if !self.emfile_logged {
                        log::warn!("accept failed: {e}; pausing accepts for 100 ms (logged once)");
                        self.emfile_logged = true;
                    }
                    let when = self.now + 100;
                    self.accept_paused = Some(when);
                    self.timers.push(when, ACCEPT_KEY, 0);
                    return;
                }
                Err(e) => {
                    log::debug!("accept failed: {e}");
                    continue;
                }
            };
            self.add_connection(stream, addr);
        }
    }

    fn add_connection(&mut self, stream: TcpStream, addr: SocketAddr) {
        let over = self.slots.len() >= self.cfg.max_connections;
        if over {
            self.stats.refused += 1;
            log::debug!("{addr}: refused, {} connections open", self.slots.len());
            if self.slots.len() >= self.cfg.max_connections + (FD_RESERVE as usize / 2) {
                // No room even to say why: write the answer if the kernel takes it, then drop.
                let mut b = Vec::new();
                Reject {
                    status: 503,
                    message: "too many connections",
                }
                .write(&mut b);
                let mut s = stream;
                let _ = write_some(&mut s, &b);
                return;
            }
        }
        let _ = stream.set_nodelay(true);
        if let Some(idle) = self.cfg.tcp_keepalive {
            let ka = socket2::TcpKeepalive::new().with_time(idle);
            let _ = socket2::SockRef::from(&stream).set_tcp_keepalive(&ka);
        }
        let gen = self.next_gen;
        self.next_gen = self.next_gen.wrapping_add(1).max(1);
        let entry = self.slots.vacant_entry();
        let key = entry.key();
        let mut slot = Slot {
            stream,
            conn: Connection::new(Role::Server),
            out: None,
            addr,
            gen,
            since: self.now as u32,
            queued: 0,
            flags: 0,
        };
        let token = Token(ConnId::new(key, gen).0 as usize);
        if let Err(e) = self
            .poll
            .registry()
            .register(&mut slot.stream, token, Interest::READABLE)
        {
            log::warn!("{addr}: register failed: {e}");
            return;
        }
        entry.insert(slot);
        if over {
            let mut b = Vec::new();
            Reject {
                status: 503,
                message: "too many connections",
            }
            .write(&mut b);
            self.reject(key, b);
            return;
        }
        self.arm(key);
    }

    /// Answers a refused handshake and lingers until the peer closes or the close timeout.
    fn reject(&mut self, key: usize, response: Vec<u8>) {
        let slot = &mut self.slots[key];
        slot.conn.set_closed();
        slot.since = self.now as u32;
        let mut response = response;
        self.queue_bytes(key, &mut response);
        self.arm(key);
    }

    /// Reads and processes until the socket is drained. `hup` says the peer's FIN came with
    /// this readiness event, so reading must go on until end of file.
    fn on_readable<H: Handler>(&mut self, h: &mut H, key: usize, hup: bool, rbuf: &mut [u8], out: &mut Vec<u8>) {
        loop {
            let Some(slot) = self.slots.get_mut(key) else { return };
            if slot.flags & (READ_PAUSED | DEAD) != 0 {
                return;
            }
            let n = match slot.stream.read(rbuf) {
                Ok(0) => {
                    self.on_eof(h, key);
                    return;
                }
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    log::debug!("{}: read error: {e}", slot.addr);
                    self.on_eof(h, key);
                    return;
                }
            };
            out.clear();
            self.process(h, key, &mut rbuf[..n], out);
            if !out.is_empty() {
                self.queue_bytes(key, out);
                if out.capacity() > MOVE_ABOVE {
                    *out = Vec::new(); // one large message must not pin memory for good
                }
            }
            self.after_receive(key);
            if n < rbuf.len() && !hup {
                // A short read took everything the kernel had. Readiness is edge-triggered, so
                // bytes arriving from now on raise a new event: skip the read that would only
                // return WouldBlock (one syscall less per message on request/response traffic).
                return;
            }
        }
    }

    /// The peer closed its side (or the socket failed).
    fn on_eof<H: Handler>(&mut self, h: &mut H, key: usize) {
        let slot = &mut self.slots[key];
        if slot.conn.state() != State::Closed {
            slot.conn.set_closed();
        }
        self.notify_close(h, key, close_code::ABNORMAL, "");
        self.kill(key);
    }

    fn process<H: Handler>(&mut self, h: &mut H, key: usize, data: &mut [u8], out: &mut Vec<u8>) {
        match self.slots[key].conn.state() {
            State::Connecting => self.handshake(h, key, data, out),
            State::Open | State::LocalClosing => {
                if self.slots[key].conn.state() == State::Open {
                    let now = self.now32();
                    let slot = &mut self.slots[key];
                    slot.since = now;
                    slot.flags &= !PINGED;
                }
                self.frames(h, key, data, out)
            }
            State::Closed => {} // lingering: discard
        }
    }

    fn handshake<H: Handler>(&mut self, h: &mut H, key: usize, data: &mut [u8], out: &mut Vec<u8>) {
        let policy = &self.cfg.policy;
        let slot = &mut self.slots[key];
        let head = slot
            .conn
            .read_head(data, self.cfg.max_request_head, |b| handshake::parse_request(b, policy));
        let rejection = match head {
            Ok(None) => return,
            Ok(Some((RequestHead::Upgrade(req), used))) => {
                handshake::write_accept(out, &req);
                slot.conn.set_open();
                slot.since = self.now as u32;
                slot.flags |= OPENED;
                self.stats.open += 1;
                let peer = self.peer(key);
                log::info!("{} connected", peer.addr);
                h.on_open(&mut self.ctx(Some((key, out))), peer, &req);
                if let Some((code, reason)) = self.close_current.take() {
                    let _ = self.slots[key].conn.close(code, &reason, out);
                    return;
                }
                if used < data.len() {
                    self.frames(h, key, &mut data[used..], out);
                }
                return;
            }
            Ok(Some((RequestHead::Plain { path }, _))) => match (self.cfg.page, path.as_str()) {
                (Some(page), "/") => {
                    handshake::write_response(out, 200, "text/html; charset=utf-8", "", page.as_bytes());
                    None
                }
                (Some(_), _) => Some(Reject {
                    status: 404,
                    message: "not found",
                }),
                (None, _) => Some(Reject {
                    status: 426,
                    message: "this is a WebSocket endpoint: send an Upgrade request",
                }),
            },
            Err(HeadError::TooLarge) => Some(Reject {
                status: 431,
                message: "request head too large",
            }),
            Err(HeadError::Invalid(r)) => Some(r),
        };
        if let Some(r) = rejection {
            log::info!("{}: refused handshake: {r}", self.slots[key].addr);
            r.write(out);
        }
        let slot = &mut self.slots[key];
        slot.conn.set_closed();
        slot.since = self.now as u32;
    }

    fn frames<H: Handler>(&mut self, h: &mut H, key: usize, data: &mut [u8], out: &mut Vec<u8>) {
        let peer = self.peer(key);
        let max = self.cfg.max_message;
        // Move the protocol state out so the handler may borrow every other slot.
        let mut conn = std::mem::replace(&mut self.slots[key].conn, Connection::new(Role::Server));
        let before = conn.state();
        self.close_current = None;
        let result = conn.receive(data, max, out, &mut |ev, out| match ev {
            Event::Message(msg) => {
                self.stats.messages_in += 1;
                if self.close_current.is_none() {
                    log::debug!("{}: {} byte message", peer.addr, msg.as_bytes().len());
                    h.on_message(&mut self.ctx(Some((key, out))), peer, msg);
                }
            }
            Event::Close { code, reason } => {
                let code = code.unwrap_or(close_code::NO_STATUS);
                if self.slots[key].flags & OPENED != 0 {
                    self.slots[key].flags &= !OPENED;
                    self.stats.open -= 1;
                    log::info!("{} disconnected ({code})", peer.addr);
                    h.on_close(&mut self.ctx(Some((key, out))), peer, code, reason);
                }
            }
            Event::Ping(_) | Event::Pong(_) => {}
        });
        if let Some((code, reason)) = self.close_current.take() {
            let _ = conn.close(code, &reason, out);
        }
        let changed = conn.state() != before;
        self.slots[key].conn = conn;
        if let Err(e) = result {
            log::debug!("{}: protocol error: {e}", peer.addr);
            self.notify_close(h, key, e.code, e.reason);
        }
        if changed {
            // Entered closing or closed: the close timeout starts now.
            self.slots[key].since = self.now as u32;
        }
    }

    /// Calls `on_close` once for a connection that was open.
    fn notify_close<H: Handler>(&mut self, h: &mut H, key: usize, code: u16, reason: &str) {
        let slot = &mut self.slots[key];
        if slot.flags & OPENED == 0 {
            return;
        }
        slot.flags &= !OPENED;
        self.stats.open -= 1;
        let peer = self.peer(key);
        log::info!("{} disconnected ({code})", peer.addr);
        h.on_close(&mut self.ctx(None), peer, code, reason);
    }

    /// After a read: pause reading when the queue is over its bound, shut down a closed
    /// connection whose bytes are all out, and keep the slot's deadline current.
    fn after_receive(&mut self, key: usize) {
        let Some(slot) = self.slots.get_mut(key) else { return };
        if slot.flags & DEAD != 0 {
            return;
        }
        if slot.queued_len() > self.cfg.max_backpressure && slot.flags & READ_PAUSED == 0 {
            slot.flags |= READ_PAUSED;
            self.update_interest(key);
        }
        self.maybe_shutdown(key);
        self.arm(key);
    }

    fn on_writable<H: Handler>(&mut self, h: &mut H, key: usize) {
        let slot = &mut self.slots[key];
        let Some(out) = slot.out.as_mut() else { return };
        match out.write_to(&mut slot.stream) {
            Ok(true) => slot.out = None, // drained: give the memory back
            Ok(false) => {}
            Err(e) => {
                log::debug!("{}: write error: {e}", slot.addr);
                self.on_eof(h, key);
                return;
            }
        }
        let slot = &mut self.slots[key];
        if slot.flags & READ_PAUSED != 0 && slot.queued_len() <= self.cfg.max_backpressure / 2 {
            slot.flags &= !READ_PAUSED;
        }
        self.update_interest(key);
        self.maybe_shutdown(key);
    }

    /// Registers for exactly what the slot needs: READABLE unless paused, WRITABLE while bytes wait.
    fn update_interest(&mut self, key: usize) {
        let slot = &mut self.slots[key];
        let want_write = slot.out.is_some() || slot.flags & READ_PAUSED != 0;
        let want_read = slot.flags & READ_PAUSED == 0;
        let has_write = slot.flags & WRITE_INTEREST != 0;
        let registered_read = slot.flags & READ_UNREGISTERED == 0;
        if want_write == has_write && want_read == registered_read {
            return;
        }
        let interest = match (want_read, want_write) {
            (true, true) => Interest::READABLE | Interest::WRITABLE,
            (true, false) => Interest::READABLE,
            (false, _) => Interest::WRITABLE,
        };
        let token = Token(ConnId::new(key, slot.gen).0 as usize);
        if let Err(e) = self.poll.registry().reregister(&mut slot.stream, token, interest) {
            log::debug!("{}: reregister failed: {e}", slot.addr);
        }
        slot.flags = (slot.flags & !(WRITE_INTEREST | READ_UNREGISTERED))
            | if want_write || !want_read { WRITE_INTEREST } else { 0 }
            | if want_read { 0 } else { READ_UNREGISTERED };
    }

    /// A closed connection whose bytes are all written sends its FIN.
    fn maybe_shutdown(&mut self, key: usize) {
        let slot = &mut self.slots[key];
        if slot.conn.state() == State::Closed && slot.out.is_none() && slot.flags & SHUT_WR == 0 {
            slot.flags |= SHUT_WR;
            let _ = slot.stream.shutdown(Shutdown::Write);
            // Keep reading until the peer's FIN (or the close timeout) so that our last bytes
            // are not destroyed by a reset.
            if slot.flags & READ_PAUSED != 0 {
                slot.flags &= !READ_PAUSED;
                self.update_interest(key);
            }
        }
    }

    /// Writes `bytes` now if nothing is queued, and queues what the kernel did not take.
    /// Leaves `bytes` empty; its allocation is kept for reuse unless a large remainder moved
    /// into the queue (which saves copying it).
    fn queue_bytes(&mut self, key: usize, bytes: &mut Vec<u8>) {
        let slot = &mut self.slots[key];
        let mut skip = 0;
        if slot.out.is_none() {
            match write_some(&mut slot.stream, bytes) {
                Ok(n) => skip = n,
                Err(e) => {
                    log::debug!("{}: write error: {e}", slot.addr);
                    bytes.clear();
                    self.mark_dead(key);
                    return;
                }
            }
            if skip == bytes.len() {
                bytes.clear();
                return;
            }
        }
        let outbox = slot.out.get_or_insert_with(Default::default);
        if bytes.len() - skip >= MOVE_ABOVE {
            outbox.push_vec(std::mem::take(bytes), skip);
        } else {
            outbox.push_slice(&bytes[skip..]);
            bytes.clear();
        }
        self.update_interest(key);
    }

    /// Queues a shared frame for a connection other than the current one, applying the slow
    /// consumer policy. Returns whether it was queued.
    fn queue_shared(&mut self, key: usize, frame: &Arc<Vec<u8>>) -> bool {
        let slot = &mut self.slots[key];
        // A peer with nothing queued takes any frame (even one above the bound): the bytes are
        // shared, and refusing would fail every peer on one large message.
        let queued = slot.queued_len();
        if queued > 0 && queued + frame.len() > self.cfg.max_backpressure {
            match self.cfg.slow_consumer {
                SlowConsumer::Drop => {
                    self.stats.dropped += 1;
                    return false;
                }
                SlowConsumer::Close => {
                    log::info!("{}: slow consumer, closing", slot.addr);
                    if let Some(o) = slot.out.as_mut() {
                        o.clear();
                    }
                    self.tmp.clear();
                    let _ = slot
                        .conn
                        .close(close_code::POLICY_VIOLATION, "slow consumer", &mut self.tmp);
                    slot.since = self.now as u32;
                    let mut b = std::mem::take(&mut self.tmp);
                    if let Some(o) = slot.out.as_mut() {
                        o.push_slice(&b);
                        b.clear();
                    } else {
                        self.queue_bytes(key, &mut b);
                    }
                    self.tmp = b;
                    self.arm(key);
                    self.failed.push((key, close_code::POLICY_VIOLATION));
                    return false;
                }
            }
        }
        let mut skip = 0;
        if slot.out.is_none() {
            match write_some(&mut slot.stream, frame) {
                Ok(n) if n == frame.len() => return true,
                Ok(n) => skip = n,
                Err(e) => {
                    log::debug!("{}: write error: {e}", slot.addr);
                    self.mark_dead(key);
                    return false;
                }
            }
        }
        slot.out
            .get_or_insert_with(Default::default)
            .push_shared(frame.clone(), skip);
        self.update_interest(key);
        true
    }

    fn send_other(&mut self, id: ConnId, msg: Message<'_>) -> bool {
        let key = id.key();
        let Some(slot) = self
            .slots
            .get_mut(key)
            .filter(|s| s.gen == id.gen() && s.flags & DEAD == 0)
        else {
            return false;
        };
        self.tmp.clear();
        if slot.conn.send(msg, &mut self.tmp).is_err() {
            return false;
        }
        self.stats.messages_out += 1;
        let mut b = std::mem::take(&mut self.tmp);
        self.queue_bytes(key, &mut b);
        self.tmp = b;
        if let Some(slot) = self.slots.get_mut(key) {
            if slot.queued_len() > self.cfg.max_backpressure && slot.flags & READ_PAUSED == 0 {
                slot.flags |= READ_PAUSED;
                self.update_interest(key);
            }
        }
        true
    }

    fn close_other(&mut self, id: ConnId, code: u16, reason: &str) {
        let key = id.key();
        let Some(slot) = self
            .slots
            .get_mut(key)
            .filter(|s| s.gen == id.gen() && s.flags & DEAD == 0)
        else {
            return;
        };
        self.tmp.clear();
        if slot.conn.close(code, reason, &mut self.tmp).is_ok() {
            slot.since = self.now as u32;
            let mut b = std::mem::take(&mut self.tmp);
            self.queue_bytes(key, &mut b);
            self.tmp = b;
            self.arm(key);
        }
    }

    fn mark_dead(&mut self, key: usize) {
        let slot = &mut self.slots[key];
        if slot.flags & DEAD == 0 {
            slot.flags |= DEAD;
            self.dead.push(key);
        }
    }

    /// Removes a slot now (outside any handler callback).
    fn kill(&mut self, key: usize) {
        let mut slot = self.slots.remove(key);
        let _ = self.poll.registry().deregister(&mut slot.stream);
    }

    /// Removes the slots whose writes failed during this wakeup.
    fn reap<H: Handler>(&mut self, h: &mut H) {
        // Connections this server gave up on while a handler was running hear about it now.
        while let Some((key, code)) = self.failed.pop() {
            if self.slots.contains(key) {
                self.notify_close(h, key, code, "slow consumer");
            }
        }
        while let Some(key) = self.dead.pop() {
            if self.slots.get(key).is_some_and(|s| s.flags & DEAD != 0) {
                self.notify_close(h, key, close_code::ABNORMAL, "");
                self.kill(key);
            }
        }
    }

    /// The slot's next deadline on the loop clock, if it has one.
    fn deadline(&self, slot: &Slot) -> Option<u64> {
        let since = self.expand(slot.since);
        let after = match slot.conn.state() {
            State::Connecting => Some(self.cfg.handshake_timeout),
            State::Open => match (self.cfg.ping_interval, self.cfg.idle_timeout) {
                (Some(p), _) if slot.flags & PINGED == 0 => Some(p),
                (_, Some(idle)) => Some(idle),
                (Some(p), None) => Some(p + p),
                (None, None) => None,
            },
            State::LocalClosing | State::Closed => Some(self.cfg.close_timeout),
        };
        after.map(|d| since + millis(d))
    }

    /// Makes sure the slot's deadline is in the queue.
    fn arm(&mut self, key: usize) {
        let Some(slot) = self.slots.get(key) else { return };
        let Some(when) = self.deadline(slot) else { return };
        if slot.queued != 0 && self.expand(slot.queued) <= when {
            return; // an earlier entry is queued; it re-arms when it fires
        }
        let gen = slot.gen;
        self.slots[key].queued = (when as u32).max(1);
        self.timers.push(when, key, gen);
    }

    /// A 32-bit clock reading within ±24 days of now, back on the 64-bit clock.
    fn expand(&self, t: u32) -> u64 {
        (self.now as i64 + i64::from(t.wrapping_sub(self.now32()) as i32)).max(0) as u64
    }

    fn fire_timers<H: Handler>(&mut self, h: &mut H, out: &mut Vec<u8>) {
        while let Some((when, key, gen)) = self.timers.pop_due(self.now) {
            match key {
                TIMER_KEY => {
                    if self.user_timer == Some(when) {
                        self.user_timer = None;
                        h.on_timer(&mut self.ctx(None));
                    }
                }
                ACCEPT_KEY => {
                    self.accept_paused = None;
                    self.accept_all();
                }
                _ => {
                    let Some(slot) = self.slots.get_mut(key) else { continue };
                    if slot.gen != gen || slot.queued != (when as u32).max(1) {
                        continue; // stale entry
                    }
                    slot.queued = 0;
                    self.on_deadline(h, key, out);
                }
            }
        }
    }

    fn on_deadline<H: Handler>(&mut self, h: &mut H, key: usize, out: &mut Vec<u8>) {
        let slot = &self.slots[key];
        if slot.flags & DEAD != 0 {
            return;
        }
        match self.deadline(slot) {
            None => return,
            Some(when) if when > self.now => {
                self.arm(key);
                return;
            }
            Some(_) => {}
        }
        let slot = &mut self.slots[key];
        match slot.conn.state() {
            State::Connecting => {
                log::info!("{}: handshake timeout", slot.addr);
                self.kill(key);
            }
            State::Open => {
                out.clear();
                if self.cfg.ping_interval.is_some() && slot.flags & PINGED == 0 {
                    let _ = slot.conn.ping(b"", out);
                    slot.flags |= PINGED;
                } else {
                    log::info!("{}: idle timeout", slot.addr);
                    let _ = slot.conn.close(close_code::GOING_AWAY, "idle timeout", out);
                    slot.since = self.now as u32;
                }
                self.queue_bytes(key, out);
                self.arm(key);
            }
            State::LocalClosing | State::Closed => {
                log::debug!("{}: close timeout", slot.addr);
                self.notify_close(h, key, close_code::ABNORMAL, "close timeout");
                self.kill(key);
            }
        }
    }

    fn run_commands<H: Handler>(&mut self, h: &mut H, _out: &mut Vec<u8>) {
        let cmds: Vec<Command> = self
            .commands
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .drain(..)
            .collect();
        for c in cmds {
            match c {
                Command::Broadcast(bytes, op) => {
                    let msg = match op {
                        OpCode::Text => match std::str::from_utf8(&bytes) {
                            Ok(t) => Message::Text(t),
                            Err(_) => continue,
                        },
                        _ => Message::Binary(&bytes),
                    };
                    self.ctx(None).broadcast(msg, None);
                }
                Command::Shutdown => self.begin_shutdown(),
                Command::Wake => h.on_wake(&mut self.ctx(None)),
            }
        }
        self.reap(h);
    }

    fn begin_shutdown(&mut self) {
        if self.shutdown_deadline.is_some() {
            return;
        }
        self.shutdown_deadline = Some(self.now + millis(self.cfg.shutdown_timeout));
        if let Some(mut l) = self.listener.take() {
            let _ = self.poll.registry().deregister(&mut l);
        }
        let keys: Vec<usize> = self.slots.iter().map(|(k, _)| k).collect();
        for key in keys {
            let slot = &self.slots[key];
            match slot.conn.state() {
                State::Open => {
                    let id = ConnId::new(key, slot.gen);
                    self.close_other(id, close_code::GOING_AWAY, "server shutting down");
                }
                State::Connecting => self.kill(key),
                _ => {}
            }
        }
    }
}

fn is_resource_error(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
    )
}

/// A handler that echoes every message back: the default mode.
#[derive(Clone, Copy, Debug, Default)]
pub struct Echo;

impl Handler for Echo {
    fn on_message(&mut self, ctx: &mut Ctx<'_>, peer: Peer, msg: Message<'_>) {
        ctx.send(peer.id, msg);
    }
}

/// A handler that answers every message with the same text, as the original note's server did.
#[derive(Clone, Debug)]
pub struct Reply(pub String);

impl Handler for Reply {
    fn on_message(&mut self, ctx: &mut Ctx<'_>, peer: Peer, _msg: Message<'_>) {
        ctx.send_text(peer.id, &self.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_can_move_to_its_thread() {
        fn is_send<T: Send>() {}
        is_send::<Server>();
        is_send::<Handle>();
    }

    #[test]
    fn idle_slot_is_small() {
        // What an idle connection costs in user space. Debug builds of mio add a selector id to
        // every socket; release builds do not.
        let socket_extra = std::mem::size_of::<TcpStream>() - 4;
        let size = std::mem::size_of::<Slot>() - socket_extra;
        assert!(size <= 80, "Slot is {size} bytes");
    }

    #[test]
    fn conn_ids_round_trip() {
        let id = ConnId::new(12345, 0xdead_beef);
        assert_eq!((id.key(), id.gen()), (12345, 0xdead_beef));
    }
}
