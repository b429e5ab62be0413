//! The server: a thin driver over the IO layer's engine that accepts connections and
//! dispatches their events to a [`Handler`].
//!
//! ```no_run
//! use wsloop::server::{Conn, Ctx, Handler, Server, ServerConfig};
//! use wsloop::Message;
//!
//! struct Echo;
//!
//! impl Handler for Echo {
//!     type State = ();
//!     fn on_message(&mut self, ctx: &mut Ctx<'_, ()>, conn: &mut Conn<()>, msg: Message<'_>) {
//!         ctx.send(conn.id(), msg);
//!     }
//! }
//!
//! Server::bind("127.0.0.1:9001", ServerConfig::default())?.run(Echo)?;
//! # Ok::<(), std::io::Error>(())
//! ```

use std::collections::VecDeque;
use std::fs::File;
use std::io::{self, Read};
use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use mio::net::{TcpListener, TcpStream};
use mio::{Events, Interest, Poll, Token, Waker};

pub mod config;
pub mod handler;
pub mod modes;

pub use config::{default_max_connections, ServerConfig, SlowConsumer};
pub use handler::{Conn, ConnId, Ctx, Handler, Stats, Timer, TimerId, Upgrade};
pub use modes::{Broadcast, Echo, Reply};

use crate::io::engine::{reserved_token, Cause, Driver, Engine};
use crate::io::outbox::write_some;
use crate::io::sys::is_resource_error;
use crate::io::timer::{deadline_after, poll_timeout};
use crate::proto::frame::OpCode;
use crate::proto::rand::NoRandom;
use crate::proto::{close_code, Answer, Event, Message, Reject, Request, State, Timeout};
use handler::{ConnData, PeerAddr, ServerEngine};

const LISTENER: Token = reserved_token(0);
const WAKER: Token = reserved_token(1);
const SIGNALS: Token = reserved_token(2);

/// The driver timer that resumes accepting after running out of descriptors.
const ACCEPT_TIMER: u64 = u64::MAX;

/// A command sent from another thread.
enum Command {
    Broadcast(Vec<u8>, OpCode),
    Send(ConnId, Vec<u8>, OpCode),
    Shutdown,
    Wake,
}

/// The message a command carries (text that is not UTF-8 cannot be sent).
fn message(bytes: &[u8], op: OpCode) -> Option<Message<'_>> {
    match op {
        OpCode::Text => std::str::from_utf8(bytes).ok().map(Message::Text),
        _ => Some(Message::Binary(bytes)),
    }
}

/// Commands waiting for the loop; more are refused so that a producer faster than the loop
/// cannot grow memory without bound.
const MAX_COMMANDS: usize = 1024;

/// Why a [`Handle`] call did not reach the loop.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum HandleError {
    /// 1,024 commands are already waiting; try again once the loop has caught up.
    Busy,
    /// The server has stopped (or never ran): nothing will read the command.
    Stopped,
}

impl std::fmt::Display for HandleError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            HandleError::Busy => "the server has not caught up with earlier commands",
            HandleError::Stopped => "the server has stopped",
        })
    }
}

impl std::error::Error for HandleError {}

struct HandleInner {
    waker: Waker,
    queue: Mutex<VecDeque<Command>>,
    stopped: AtomicBool,
}

/// Lets other threads reach a running server: send, broadcast, wake the handler, or stop it.
///
/// At most 1,024 commands wait at once; past that the calls return [`HandleError::Busy`]
/// until the loop catches up. Once the server has stopped they return [`HandleError::Stopped`].
#[derive(Clone)]
pub struct Handle {
    inner: Arc<HandleInner>,
}

impl std::fmt::Debug for Handle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Handle")
            .field("stopped", &self.is_stopped())
            .finish_non_exhaustive()
    }
}

impl Handle {
    fn send_command(&self, c: Command) -> Result<(), HandleError> {
        {
            let mut q = self.inner.queue.lock().unwrap_or_else(|e| e.into_inner());
            if self.is_stopped() {
                return Err(HandleError::Stopped);
            }
            if q.len() >= MAX_COMMANDS {
                return Err(HandleError::Busy);
            }
            q.push_back(c);
        }
        self.inner.waker.wake().map_err(|_| HandleError::Stopped)
    }

    /// Whether the server has stopped.
    pub fn is_stopped(&self) -> bool {
        self.inner.stopped.load(Ordering::Acquire)
    }

    /// Sends a text message to one connection.
    pub fn send_text(&self, id: ConnId, text: &str) -> Result<(), HandleError> {
        self.send_command(Command::Send(id, text.as_bytes().to_vec(), OpCode::Text))
    }

    /// Sends a binary message to one connection.
    pub fn send_binary(&self, id: ConnId, data: &[u8]) -> Result<(), HandleError> {
        self.send_command(Command::Send(id, data.to_vec(), OpCode::Binary))
    }

    /// Sends a text message to every open connection.
    pub fn broadcast_text(&self, text: &str) -> Result<(), HandleError> {
        self.send_command(Command::Broadcast(text.as_bytes().to_vec(), OpCode::Text))
    }

    /// Sends a binary message to every open connection.
    pub fn broadcast_binary(&self, data: &[u8]) -> Result<(), HandleError> {
        self.send_command(Command::Broadcast(data.to_vec(), OpCode::Binary))
    }

    /// Calls [`Handler::on_wake`] on the loop's thread.
    pub fn wake(&self) -> Result<(), HandleError> {
        self.send_command(Command::Wake)
    }

    /// Starts a graceful shutdown, as SIGTERM would.
    pub fn shutdown(&self) -> Result<(), HandleError> {
        self.send_command(Command::Shutdown)
    }
}

/// The loop's own state that handlers reach through [`Ctx`].
pub(crate) struct Shared {
    pub(crate) stats: Stats,
    pub(crate) max_backpressure: usize,
    pub(crate) slow_consumer: SlowConsumer,
    /// Pending handler timers: generation and the connection each belongs to. A timer's id is
    /// its slab key and generation, so a fired or cancelled id cannot reach a later timer.
    pub(crate) timers: slab::Slab<(u32, Option<ConnId>)>,
    next_timer: u32,
    pub(crate) shutdown_requested: bool,
}

impl Shared {
    pub(crate) fn set_timer<S>(&mut self, eng: &mut ServerEngine<S>, after: Duration, conn: Option<ConnId>) -> TimerId {
        let gen = self.next_timer;
        self.next_timer = self.next_timer.wrapping_add(1);
        let key = self.timers.insert((gen, conn));
        let id = (u64::from(gen) << 32) | key as u64;
        eng.set_timer_at(deadline_after(eng.clock.now(), after), id);
        TimerId(id)
    }

    /// Takes a pending timer out: the connection it belongs to, if it was pending.
    pub(crate) fn take_timer(&mut self, id: u64) -> Option<Option<ConnId>> {
        let key = (id & 0xFFFF_FFFF) as usize;
        let (gen, conn) = *self.timers.get(key)?;
        if u64::from(gen) != id >> 32 {
            return None;
        }
        self.timers.remove(key);
        Some(conn)
    }
}

/// A bound server, ready to [`run`](Server::run). It may be moved to the thread that runs it.
pub struct Server {
    poll: Poll,
    listener: TcpListener,
    local_addr: SocketAddr,
    cfg: ServerConfig,
    handle: Handle,
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
    ///
    /// Fails with [`InvalidInput`](io::ErrorKind::InvalidInput) when the settings cannot work
    /// (see [`ServerConfig::check`]), including a `max_connections` above what the process's
    /// open-file limit allows.
    pub fn bind<A: ToSocketAddrs>(addr: A, cfg: ServerConfig) -> io::Result<Server> {
        cfg.check()
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        let fd_room = default_max_connections();
        if cfg.max_connections > fd_room {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "max_connections {} is above what the open-file limit allows ({fd_room}: the limit less {} for the server's own use)",
                    cfg.max_connections,
                    config::FD_RESERVE
                ),
            ));
        }
        let addr = addr
            .to_socket_addrs()?
            .next()
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "no address to listen on"))?;
        let mut listener = TcpListener::bind(addr)?;
        let local_addr = listener.local_addr()?;
        let poll = Poll::new()?;
        poll.registry().register(&mut listener, LISTENER, Interest::READABLE)?;
        let waker = Waker::new(poll.registry(), WAKER)?;
        Ok(Server {
            poll,
            listener,
            local_addr,
            cfg,
            handle: Handle {
                inner: Arc::new(HandleInner {
                    waker,
                    queue: Mutex::new(VecDeque::new()),
                    stopped: AtomicBool::new(false),
                }),
            },
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
    pub fn run<H: Handler>(self, handler: H) -> io::Result<()> {
        let Server {
            poll,
            listener,
            cfg,
            handle,
            ..
        } = self;
        // However run ends, handles report it, and the signals go back to what they did.
        let _stopped = StopGuard(handle.clone());
        let mut signals = if cfg.handle_signals {
            Some(Signals::install(&poll)?)
        } else {
            None
        };
        let mut eng: ServerEngine<H::State> = Engine::new(poll, cfg.protocol_config(), cfg.max_backpressure, NoRandom);
        #[cfg(feature = "deflate")]
        {
            eng.codec = crate::proto::deflate::Codec::new(&cfg.deflate);
        }
        let mut srv = Srv {
            handler,
            shared: Shared {
                stats: Stats::default(),
                max_backpressure: cfg.max_backpressure,
                slow_consumer: cfg.slow_consumer,
                timers: slab::Slab::new(),
                next_timer: 0,
                shutdown_requested: false,
            },
            listener: Some(listener),
            accept_paused: false,
            emfile_logged: false,
            spare_fd: File::open("/dev/null").ok(),
            shutdown_deadline: None,
            handle,
            cfg,
        };
        let mut events = Events::with_capacity(1024);
        let mut rbuf = vec![0u8; srv.cfg.read_buffer_size];
        eng.tick();
        srv.handler.on_start(&mut Ctx {
            eng: &mut eng,
            shared: &mut srv.shared,
        });
        let mut signals_seen = 0usize;
        loop {
            let now = eng.tick();
            let mut deadline = eng.next_deadline();
            if let Some(d) = srv.shutdown_deadline {
                deadline = Some(deadline.map_or(d, |t| t.min(d)));
            }
            match eng.poll.poll(&mut events, poll_timeout(now, deadline)) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
            eng.tick();
            for ev in events.iter() {
                match ev.token() {
                    LISTENER => srv.accept_all(&mut eng),
                    WAKER => srv.run_commands(&mut eng),
                    SIGNALS => {
                        if let Some(s) = &mut signals {
                            signals_seen += s.drain();
                        }
                        if signals_seen > 1 && srv.shutdown_deadline.is_some() {
                            log::warn!("second signal: stopping now");
                            return Ok(());
                        }
                        log::info!("signal received: shutting down");
                        srv.begin_shutdown(&mut eng);
                    }
                    Token(key) => eng.on_ready(&mut srv, key, ev, &mut rbuf),
                }
            }
            eng.fire_timers(&mut srv);
            eng.reap(&mut srv);
            if std::mem::take(&mut srv.shared.shutdown_requested) {
                srv.begin_shutdown(&mut eng);
                eng.reap(&mut srv);
            }
            if let Some(d) = srv.shutdown_deadline {
                // Done once every peer's close handshake is over and our last bytes are out.
                if eng
                    .slots
                    .iter()
                    .all(|(_, s)| s.conn.state() == State::Closed && s.out.is_none())
                {
                    log::info!("shutdown complete");
                    return Ok(());
                }
                if eng.now >= d {
                    log::info!("shutdown: {} connection(s) did not close in time", eng.slots.len());
                    return Ok(());
                }
            }
        }
    }
}

/// Marks the handle stopped when `run` returns, however it returns.
struct StopGuard(Handle);

impl Drop for StopGuard {
    fn drop(&mut self) {
        let inner = &self.0.inner;
        let mut q = inner.queue.lock().unwrap_or_else(|e| e.into_inner());
        inner.stopped.store(true, Ordering::Release);
        q.clear();
    }
}

/// SIGINT and SIGTERM delivered through a pipe into the poll while a server runs; the default
/// action (terminate) before and after.
struct Signals {
    read: mio::net::UnixStream,
    ids: Vec<signal_hook::SigId>,
}

/// How many servers handle signals now, and the flag that lets the default action through
/// when none does.
static SIGNAL_STATE: Mutex<(usize, Option<Arc<AtomicBool>>)> = Mutex::new((0, None));

impl Signals {
    fn install(poll: &Poll) -> io::Result<Signals> {
        let (read, write) = std::os::unix::net::UnixStream::pair()?;
        read.set_nonblocking(true)?;
        write.set_nonblocking(true)?;
        let mut state = SIGNAL_STATE.lock().unwrap_or_else(|e| e.into_inner());
        if state.1.is_none() {
            // signal-hook keeps its handler installed for good; this action restores the
            // default behaviour whenever no server is running.
            let idle = Arc::new(AtomicBool::new(true));
            for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
                signal_hook::flag::register_conditional_default(sig, Arc::clone(&idle))?;
            }
            state.1 = Some(idle);
        }
        let mut ids = Vec::new();
        for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
            ids.push(signal_hook::low_level::pipe::register(sig, write.try_clone()?)?);
        }
        state.0 += 1;
        if let Some(idle) = &state.1 {
            idle.store(false, Ordering::SeqCst);
        }
        let mut read = mio::net::UnixStream::from_std(read);
        poll.registry().register(&mut read, SIGNALS, Interest::READABLE)?;
        Ok(Signals { read, ids })
    }

    /// Signals received since the last call.
    fn drain(&mut self) -> usize {
        let mut n = 0;
        let mut b = [0u8; 16];
        while let Ok(k) = self.read.read(&mut b) {
            if k == 0 {
                break;
            }
            n += k;
        }
        n
    }
}

impl Drop for Signals {
    fn drop(&mut self) {
        for id in self.ids.drain(..) {
            signal_hook::low_level::unregister(id);
        }
        let mut state = SIGNAL_STATE.lock().unwrap_or_else(|e| e.into_inner());
        state.0 -= 1;
        if state.0 == 0 {
            if let Some(idle) = &state.1 {
                idle.store(true, Ordering::SeqCst);
            }
        }
    }
}

/// The server driver: the handler and everything the loop keeps beside the engine.
struct Srv<H: Handler> {
    handler: H,
    shared: Shared,
    cfg: ServerConfig,
    listener: Option<TcpListener>,
    accept_paused: bool,
    emfile_logged: bool,
    /// A descriptor held in reserve: at the descriptor limit it is closed for a moment so that
    /// a waiting client can be accepted and told `503` instead of hanging in the backlog.
    spare_fd: Option<File>,
    /// Shutdown started; ends at this time at the latest.
    shutdown_deadline: Option<u64>,
    handle: Handle,
}

impl<H: Handler> Srv<H> {
    fn ctx<'a>(&'a mut self, eng: &'a mut ServerEngine<H::State>) -> (&'a mut H, Ctx<'a, H::State>) {
        (
            &mut self.handler,
            Ctx {
                eng,
                shared: &mut self.shared,
            },
        )
    }

    /// Calls the handler about connection `key`, lending it the connection's state.
    fn with_conn<R>(
        &mut self,
        eng: &mut ServerEngine<H::State>,
        key: usize,
        f: impl FnOnce(&mut H, &mut Ctx<'_, H::State>, &mut Conn<H::State>) -> R,
    ) -> R {
        let slot = &mut eng.slots[key];
        let mut conn = Conn {
            id: ConnId::new(key, slot.gen),
            addr: slot.data.addr,
            state: std::mem::take(&mut slot.data.state),
        };
        let (h, mut ctx) = self.ctx(eng);
        let r = f(h, &mut ctx, &mut conn);
        // Slots are removed only at the end of a turn, so this one is still here.
        eng.slots[key].data.state = conn.state;
        r
    }

    fn accept_all(&mut self, eng: &mut ServerEngine<H::State>) {
        if self.accept_paused {
            return;
        }
        loop {
            let Some(listener) = &self.listener else { return };
            let (stream, addr) = match listener.accept() {
                Ok(x) => x,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if is_resource_error(&e) => {
                    if !self.emfile_logged {
                        log::warn!("accept failed: {e}; refusing new connections with 503 until descriptors free up (logged once)");
                        self.emfile_logged = true;
                    }
                    // Out of descriptors: use the spare one to tell the next client why, then
                    // pause accepting briefly instead of spinning on the same error.
                    if self.spare_fd.take().is_some() {
                        if let Ok((mut s, a)) = listener.accept() {
                            self.shared.stats.refused += 1;
                            log::debug!("{a}: refused, out of descriptors");
                            let mut b = Vec::new();
                            Reject::new(503, "too many connections").write(&mut b);
                            let _ = write_some(&mut s, &b);
                        }
                        self.spare_fd = File::open("/dev/null").ok();
                    }
                    self.accept_paused = true;
                    eng.set_timer_at(eng.now + 100, ACCEPT_TIMER);
                    return;
                }
                Err(e) => {
                    log::debug!("accept failed: {e}");
                    continue;
                }
            };
            self.add_connection(eng, stream, addr);
        }
    }

    fn add_connection(&mut self, eng: &mut ServerEngine<H::State>, stream: TcpStream, addr: SocketAddr) {
        let over = eng.slots.len() >= self.cfg.max_connections;
        if over {
            self.shared.stats.refused += 1;
            log::debug!("{addr}: refused, {} connections open", eng.slots.len());
        }
        let mut refusal = Vec::new();
        if over {
            Reject::new(503, "too many connections").write(&mut refusal);
            if eng.slots.len() >= self.cfg.max_connections + (config::FD_RESERVE as usize / 2) {
                // No room even to linger: write the answer if the kernel takes it, then drop.
                let mut s = stream;
                let _ = write_some(&mut s, &refusal);
                return;
            }
        }
        let _ = stream.set_nodelay(true);
        if let Some(idle) = self.cfg.tcp_keepalive {
            let ka = socket2::TcpKeepalive::new().with_time(idle);
            let _ = socket2::SockRef::from(&stream).set_tcp_keepalive(&ka);
        }
        let mut conn = crate::proto::Connection::server(eng.now);
        if over {
            conn.set_closed(eng.now);
        }
        let data = ConnData {
            addr: PeerAddr::new(addr),
            opened: false,
            state: H::State::default(),
        };
        match eng.insert(stream, conn, data) {
            Ok(key) if over => {
                eng.send_raw(key, &refusal);
                eng.settle(key);
            }
            Ok(_) => {}
            Err(e) => log::warn!("{addr}: register failed: {e}"),
        }
    }

    /// Answers a complete request: the page, a refusal, or an upgrade the handler decides on.
    fn on_request(&mut self, eng: &mut ServerEngine<H::State>, key: usize, req: Request) {
        let addr = eng.slots[key].data.addr.get();
        let answer = if !req.is_upgrade() {
            self.plain_answer(&req)
        } else if let Some(origin) = req.origin().filter(|o| !self.origin_allowed(o)) {
            log::info!("{addr}: refused handshake: origin {origin} not allowed");
            Answer::reject(403, "origin not allowed")
        } else {
            let protocol = self.cfg.protocols.iter().find(|p| req.offers_protocol(p)).cloned();
            let mut up = Upgrade {
                request: &req,
                peer: addr,
                protocol,
            };
            let (h, mut ctx) = self.ctx(eng);
            match h.on_upgrade(&mut ctx, &mut up) {
                Ok(state) => {
                    eng.slots[key].data.state = state;
                    Answer::Accept { protocol: up.protocol }
                }
                Err(answer) => answer,
            }
        };
        #[cfg(feature = "deflate")]
        let upgraded = eng.accept_deflate(key, &req, &answer, &self.cfg.deflate);
        #[cfg(not(feature = "deflate"))]
        let upgraded = eng.accept(key, &req, &answer, None);
        if !upgraded {
            if let Answer::Reject { status, body } = &answer {
                log::info!("{addr}: refused handshake: {status} {}", body.trim());
            }
            return;
        }
        let slot = &mut eng.slots[key];
        slot.data.opened = true;
        self.shared.stats.open += 1;
        log::info!("{addr} connected");
        self.with_conn(eng, key, |h, ctx, conn| h.on_open(ctx, conn));
    }

    fn origin_allowed(&self, origin: &str) -> bool {
        self.cfg.origins.is_empty() || self.cfg.origins.iter().any(|a| a.eq_ignore_ascii_case(origin))
    }

    /// A request that is not an upgrade: the page for `GET /` and `HEAD /` when there is one.
    fn plain_answer(&self, req: &Request) -> Answer {
        let readable = matches!(req.method(), "GET" | "HEAD");
        match (&self.cfg.page, readable) {
            (_, false) => Answer::reject(405, "only GET is served here"),
            (Some(page), true) if req.path_only() == "/" => Answer::Respond {
                status: 200,
                content_type: "text/html; charset=utf-8".into(),
                body: match page {
                    std::borrow::Cow::Borrowed(s) => std::borrow::Cow::Borrowed(s.as_bytes()),
                    std::borrow::Cow::Owned(s) => std::borrow::Cow::Owned(s.clone().into_bytes()),
                },
            },
            (Some(_), true) => Answer::reject(404, "not found"),
            (None, true) => Answer::reject(426, "this is a WebSocket endpoint: send an Upgrade request"),
        }
    }

    /// Calls `on_close` once for a connection that was open.
    fn notify_close(&mut self, eng: &mut ServerEngine<H::State>, key: usize, code: u16, reason: &str) {
        let slot = &mut eng.slots[key];
        if !std::mem::take(&mut slot.data.opened) {
            return;
        }
        self.shared.stats.open -= 1;
        log::info!("{:?} disconnected ({code})", slot.data.addr);
        self.with_conn(eng, key, |h, ctx, conn| h.on_close(ctx, conn, code, reason));
    }

    fn run_commands(&mut self, eng: &mut ServerEngine<H::State>) {
        let cmds: Vec<Command> = self
            .handle
            .inner
            .queue
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .drain(..)
            .collect();
        for c in cmds {
            let (h, mut ctx) = self.ctx(eng);
            match c {
                Command::Broadcast(bytes, op) => match message(&bytes, op) {
                    Some(msg) => {
                        ctx.broadcast(msg, None);
                    }
                    None => continue,
                },
                Command::Send(id, bytes, op) => {
                    if let Some(msg) = message(&bytes, op) {
                        ctx.send(id, msg);
                    }
                }
                Command::Shutdown => self.begin_shutdown(eng),
                Command::Wake => h.on_wake(&mut ctx),
            }
        }
    }

    fn begin_shutdown(&mut self, eng: &mut ServerEngine<H::State>) {
        if self.shutdown_deadline.is_some() {
            return;
        }
        self.shutdown_deadline = Some(deadline_after(eng.now, self.cfg.shutdown_timeout));
        if let Some(mut l) = self.listener.take() {
            let _ = eng.poll.registry().deregister(&mut l);
        }
        let keys: Vec<usize> = eng.slots.iter().map(|(k, _)| k).collect();
        for key in keys {
            match eng.slots[key].conn.state() {
                State::Open => {
                    let _ = eng.close(key, close_code::GOING_AWAY, "server shutting down");
                }
                State::Connecting => eng.kill(key, Cause::Dropped),
                _ => {}
            }
        }
    }
}

impl<H: Handler> Driver<TcpStream, ConnData<H::State>, NoRandom> for Srv<H> {
    fn on_event(&mut self, eng: &mut ServerEngine<H::State>, key: usize, ev: Event<'_>) {
        match ev {
            Event::Request(req) => self.on_request(eng, key, *req),
            Event::Message(payload) => {
                self.shared.stats.messages_in += 1;
                let msg = payload.as_message();
                self.with_conn(eng, key, |h, ctx, conn| h.on_message(ctx, conn, msg));
            }
            Event::Close { code, reason } => {
                let code = code.unwrap_or(close_code::NO_STATUS);
                self.notify_close(eng, key, code, reason.as_str());
            }
            Event::Ping(_) | Event::Pong(_) | Event::Open(_) => {}
        }
    }

    fn on_error(&mut self, eng: &mut ServerEngine<H::State>, key: usize, err: &crate::proto::Error) {
        let addr = eng.slots[key].data.addr;
        match err {
            crate::proto::Error::Protocol(e) => {
                log::debug!("{addr:?}: protocol error: {e}");
                self.notify_close(eng, key, e.code, e.reason);
            }
            crate::proto::Error::Rejected(r) => log::info!("{addr:?}: refused handshake: {r}"),
            crate::proto::Error::Response(_) => {}
        }
    }

    fn on_timeout(&mut self, eng: &mut ServerEngine<H::State>, key: usize, t: Timeout) {
        let addr = eng.slots[key].data.addr;
        match t {
            Timeout::Handshake => log::info!("{addr:?}: handshake timeout"),
            Timeout::Idle => log::info!("{addr:?}: idle timeout"),
            Timeout::Close => log::debug!("{addr:?}: close timeout"),
            Timeout::Ping => {}
        }
    }

    fn on_removed(&mut self, eng: &mut ServerEngine<H::State>, key: usize, cause: Cause) {
        let reason = match &cause {
            Cause::Timeout(Timeout::Close) => "close timeout",
            Cause::Io(e) => {
                log::debug!("{:?}: {e}", eng.slots[key].data.addr);
                ""
            }
            _ => "",
        };
        self.notify_close(eng, key, close_code::ABNORMAL, reason);
    }

    fn on_timer(&mut self, eng: &mut ServerEngine<H::State>, id: u64) {
        if id == ACCEPT_TIMER {
            self.accept_paused = false;
            self.accept_all(eng);
            return;
        }
        let Some(conn) = self.shared.take_timer(id) else { return };
        if let Some(c) = conn {
            if !eng.is_live(c.key(), c.gen()) {
                return;
            }
        }
        let (h, mut ctx) = self.ctx(eng);
        h.on_timer(&mut ctx, Timer { id: TimerId(id), conn });
    }
}
