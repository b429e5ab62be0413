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
use std::net::{IpAddr, SocketAddr, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use mio::net::{TcpListener, TcpStream};
use mio::{Events, Interest, Poll, Token, Waker};

pub mod config;
pub mod handler;
mod ipcount;
pub mod modes;
mod topics;

pub use config::{default_max_connections, default_max_memory, ServerConfig, SlowConsumer};
pub use handler::{Conn, ConnId, Ctx, Handler, Stats, Timer, TimerId, Upgrade};
pub use modes::{Broadcast, Echo, Reply};

use crate::io::budget::{Budget, SharedFrame};
use crate::io::engine::{reserved_token, Cause, Driver, Engine, SHED_CODE};
use crate::io::outbox::write_some;
use crate::io::stream::ServerStream;
use crate::io::sys::is_resource_error;
use crate::io::timer::{deadline_after, poll_timeout};
use crate::io::transport::Transport;
use crate::proto::frame::{write_frame, OpCode};
use crate::proto::rand::NoRandom;
use crate::proto::{close_code, Answer, Event, Message, Reject, Request, State, Timeout};
use handler::{ConnData, PeerAddr, ServerEngine};

const LISTENER: Token = reserved_token(0);
const WAKER: Token = reserved_token(1);
const SIGNALS: Token = reserved_token(2);

/// Logs a line about one peer: `ADDR` then `what`. One function for every such line keeps the
/// binary small (each `log!` call site costs its own formatting and metadata).
#[inline(never)]
pub(crate) fn peer_log(level: log::Level, addr: SocketAddr, what: std::fmt::Arguments<'_>) {
    if level <= log::max_level() {
        log::log!(level, "{addr}{what}");
    }
}

/// The driver timer that resumes accepting after running out of descriptors.
const ACCEPT_TIMER: u64 = u64::MAX >> 1;

/// Out of descriptors, waiting clients refused per pause (bounded: a peer reconnecting as fast
/// as it is refused must not hold the loop).
const REFUSE_AT_ONCE: usize = 256;

/// A command for one loop, from a [`Handle`] or from another loop of the same server.
enum Command {
    /// A frame encoded once, for every open connection (or the subscribers of `topic`) but
    /// `except`.
    Frame {
        frame: Arc<SharedFrame>,
        topic: Option<Arc<str>>,
        except: Option<ConnId>,
    },
    Send(ConnId, Vec<u8>, OpCode),
    Shutdown,
    /// Stop at once (a second signal).
    Stop,
    Wake,
}

/// The message a command carries (text that is not UTF-8 cannot be sent).
fn message(bytes: &[u8], op: OpCode) -> Option<Message<'_>> {
    match op {
        OpCode::Text => std::str::from_utf8(bytes).ok().map(Message::Text),
        _ => Some(Message::Binary(bytes)),
    }
}

/// Commands from handles waiting for a loop; more are refused so that a producer faster than
/// the loop cannot grow memory without bound.
const MAX_COMMANDS: usize = 1024;

/// Broadcasts and publishes from other loops waiting for a loop; past this a loop misses them
/// (counted as dropped): it has fallen far behind the others.
const MAX_LOOP_COMMANDS: usize = 16 * 1024;

/// Loops one server can run: a [`ConnId`] names its loop in 8 bits.
pub const MAX_THREADS: usize = 256;

/// Why a [`Handle`] call did not reach the loop.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum HandleError {
    /// 1,024 commands are already waiting (on one of the loops); try again once it has caught
    /// up. Nothing was queued.
    Busy,
    /// The server has stopped, or was dropped without running: nothing will read the command.
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

/// One loop's inbox: commands from handles and from the other loops.
struct Inbox {
    waker: Waker,
    queue: Mutex<VecDeque<Command>>,
    stopped: AtomicBool,
}

/// What the loops of one server share. Touched when a connection comes or goes and when a
/// command crosses loops, never for a message that stays within its loop.
struct Group {
    inboxes: Box<[Inbox]>,
    /// The memory budget, shared by every loop.
    budget: Arc<Budget>,
    /// Slots in use on every loop, for `max_connections`.
    slots: AtomicUsize,
    /// Open WebSocket connections on every loop.
    open: AtomicUsize,
    /// Open connections per peer IP, kept only with a per-IP limit.
    per_ip: Mutex<ipcount::IpCounts>,
}

/// Lets other threads reach a running server: send to one connection, publish to a topic,
/// broadcast, wake the handler, or stop it. With several loops
/// ([`ServerConfig::threads`]), a send goes to the loop that owns the connection, and a
/// broadcast, publish, wake or shutdown to every loop (a message is encoded once, here).
///
/// At most 1,024 commands wait at once per loop; past that the calls return
/// [`HandleError::Busy`] until the loop catches up. Once the server has stopped they return
/// [`HandleError::Stopped`].
#[derive(Clone)]
pub struct Handle {
    group: Arc<Group>,
}

impl std::fmt::Debug for Handle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Handle")
            .field("loops", &self.group.inboxes.len())
            .field("stopped", &self.is_stopped())
            .finish_non_exhaustive()
    }
}

impl Handle {
    /// Queues `c` for loop `lp` if fewer than `bound` commands wait there, and wakes the loop
    /// if its queue was empty (a loop takes its whole queue on each wake).
    fn push(&self, lp: usize, c: Command, bound: usize) -> Result<(), HandleError> {
        let inbox = &self.group.inboxes[lp];
        let first = {
            let mut q = inbox.queue.lock().unwrap_or_else(|e| e.into_inner());
            if inbox.stopped.load(Ordering::Acquire) {
                return Err(HandleError::Stopped);
            }
            if q.len() >= bound {
                return Err(HandleError::Busy);
            }
            q.push_back(c);
            q.len() == 1
        };
        if first {
            inbox.waker.wake().map_err(|_| HandleError::Stopped)?;
        }
        Ok(())
    }

    /// Queues a command for every running loop, or for none when one of them is full.
    fn push_all(&self, c: impl Fn() -> Command) -> Result<(), HandleError> {
        let inboxes = &self.group.inboxes;
        // Every queue locked, in loop order (a loop holds only its own lock, never waiting for
        // another while it does), so that the command reaches all loops or none.
        let mut queues: Vec<_> = inboxes
            .iter()
            .map(|i| i.queue.lock().unwrap_or_else(|e| e.into_inner()))
            .collect();
        let live = |lp: usize| !inboxes[lp].stopped.load(Ordering::Acquire);
        if !(0..inboxes.len()).any(live) {
            return Err(HandleError::Stopped);
        }
        if (0..inboxes.len()).any(|lp| live(lp) && queues[lp].len() >= MAX_COMMANDS) {
            return Err(HandleError::Busy);
        }
        let mut wake = Vec::new();
        for (lp, q) in queues.iter_mut().enumerate().filter(|(lp, _)| live(*lp)) {
            q.push_back(c());
            if q.len() == 1 {
                wake.push(lp);
            }
        }
        drop(queues);
        for lp in wake {
            let _ = inboxes[lp].waker.wake();
        }
        Ok(())
    }

    /// A message encoded once as a frame, shared by every loop's queues.
    fn frame(&self, data: &[u8], op: OpCode) -> Arc<SharedFrame> {
        let mut frame = Vec::with_capacity(data.len() + 10);
        write_frame(&mut frame, true, op, None, data);
        SharedFrame::new(frame, &self.group.budget)
    }

    /// Hands a frame broadcast or published on loop `from` to the other loops; returns how many
    /// loops missed it because they had fallen [`MAX_LOOP_COMMANDS`] behind.
    fn forward(&self, from: usize, frame: &Arc<SharedFrame>, topic: Option<&str>, except: Option<ConnId>) -> usize {
        let loops = self.group.inboxes.len();
        if loops == 1 {
            return 0;
        }
        let topic: Option<Arc<str>> = topic.map(Arc::from);
        (0..loops)
            .filter(|&lp| lp != from)
            .filter(|&lp| {
                let c = Command::Frame {
                    frame: Arc::clone(frame),
                    topic: topic.clone(),
                    except,
                };
                self.push(lp, c, MAX_LOOP_COMMANDS) == Err(HandleError::Busy)
            })
            .count()
    }

    /// Tells every other loop to begin a graceful shutdown (`now`: to stop at once).
    fn stop_others(&self, from: usize, now: bool) {
        for lp in (0..self.group.inboxes.len()).filter(|&lp| lp != from) {
            let c = if now { Command::Stop } else { Command::Shutdown };
            let _ = self.push(lp, c, usize::MAX);
        }
    }

    /// Marks loop `lp` stopped and drops what waits for it.
    fn mark_stopped(&self, lp: usize) {
        let inbox = &self.group.inboxes[lp];
        let mut q = inbox.queue.lock().unwrap_or_else(|e| e.into_inner());
        inbox.stopped.store(true, Ordering::Release);
        q.clear();
    }

    /// Whether the server has stopped (every loop has).
    pub fn is_stopped(&self) -> bool {
        self.group.inboxes.iter().all(|i| i.stopped.load(Ordering::Acquire))
    }

    /// Sends a message to the connection `id` on the loop that owns it. An id that no longer
    /// names an open connection, or never named one of this server's, is ignored there.
    fn send(&self, id: ConnId, data: &[u8], op: OpCode) -> Result<(), HandleError> {
        if id.lp() >= self.group.inboxes.len() {
            return Ok(());
        }
        self.push(id.lp(), Command::Send(id, data.to_vec(), op), MAX_COMMANDS)
    }

    /// Sends a text message to one connection.
    pub fn send_text(&self, id: ConnId, text: &str) -> Result<(), HandleError> {
        self.send(id, text.as_bytes(), OpCode::Text)
    }

    /// Sends a binary message to one connection.
    pub fn send_binary(&self, id: ConnId, data: &[u8]) -> Result<(), HandleError> {
        self.send(id, data, OpCode::Binary)
    }

    fn broadcast(&self, data: &[u8], op: OpCode, topic: Option<&str>) -> Result<(), HandleError> {
        let frame = self.frame(data, op);
        let topic: Option<Arc<str>> = topic.map(Arc::from);
        self.push_all(|| Command::Frame {
            frame: Arc::clone(&frame),
            topic: topic.clone(),
            except: None,
        })
    }

    /// Sends a text message to every open connection.
    pub fn broadcast_text(&self, text: &str) -> Result<(), HandleError> {
        self.broadcast(text.as_bytes(), OpCode::Text, None)
    }

    /// Sends a binary message to every open connection.
    pub fn broadcast_binary(&self, data: &[u8]) -> Result<(), HandleError> {
        self.broadcast(data, OpCode::Binary, None)
    }

    /// Sends a text message to every connection subscribed to `topic` (see [`Ctx::subscribe`]).
    pub fn publish_text(&self, topic: &str, text: &str) -> Result<(), HandleError> {
        self.broadcast(text.as_bytes(), OpCode::Text, Some(topic))
    }

    /// Sends a binary message to every connection subscribed to `topic`.
    pub fn publish_binary(&self, topic: &str, data: &[u8]) -> Result<(), HandleError> {
        self.broadcast(data, OpCode::Binary, Some(topic))
    }

    /// Calls [`Handler::on_wake`] on every loop's thread.
    pub fn wake(&self) -> Result<(), HandleError> {
        self.push_all(|| Command::Wake)
    }

    /// Starts a graceful shutdown, as SIGTERM would.
    pub fn shutdown(&self) -> Result<(), HandleError> {
        self.push_all(|| Command::Shutdown)
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
    /// Peer addresses too long for a slot.
    pub(crate) peers: handler::PeerTable,
    pub(crate) topics: topics::Topics,
    /// The slot whose state a callback holds in its `Conn` (`usize::MAX`: none).
    pub(crate) lent: usize,
    /// This loop's index among the server's loops.
    pub(crate) lp: u8,
    /// The server's handle: the other loops' inboxes, the budget and the shared counts.
    pub(crate) handle: Handle,
    /// A loop fell behind and missed a broadcast; logged once until one reaches every loop.
    behind_logged: bool,
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

    /// Hands a broadcast or publish made here to the other loops.
    pub(crate) fn forward(&mut self, frame: &Arc<SharedFrame>, topic: Option<&str>, except: Option<ConnId>) {
        let missed = self.handle.forward(usize::from(self.lp), frame, topic, except);
        if missed > 0 {
            self.stats.dropped += missed as u64;
            if !std::mem::replace(&mut self.behind_logged, true) {
                log::warn!("{missed} loop(s) fell {MAX_LOOP_COMMANDS} broadcasts behind and missed one (logged once)");
            }
        } else {
            self.behind_logged = false;
        }
    }

    /// Open connections on every loop.
    pub(crate) fn open_everywhere(&self) -> usize {
        self.handle.group.open.load(Ordering::Relaxed)
    }
}

/// A bound server, ready to [`run`](Server::run). It may be moved to the thread that runs it.
pub struct Server {
    /// Each loop's poll and listener (one listener per loop on the same port).
    loops: Vec<(Poll, TcpListener)>,
    local_addr: SocketAddr,
    cfg: ServerConfig,
    /// Marks the handles stopped when the server is dropped without running, or `run` returns.
    stop: StopGuard,
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server")
            .field("local_addr", &self.local_addr)
            .field("loops", &self.loops.len())
            .finish_non_exhaustive()
    }
}

impl Server {
    /// Binds a listening socket, one per loop with [`ServerConfig::threads`] above 1 (all on
    /// the same port, with `SO_REUSEPORT`). Port 0 picks a free port; see
    /// [`local_addr`](Self::local_addr).
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
        let mut addr = addr
            .to_socket_addrs()?
            .next()
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "no address to listen on"))?;
        let mut loops = Vec::with_capacity(cfg.threads);
        let mut inboxes = Vec::with_capacity(cfg.threads);
        for _ in 0..cfg.threads {
            let mut listener = if cfg.threads > 1 || cfg.reuse_port {
                bind_shared(addr)?
            } else {
                TcpListener::bind(addr)?
            };
            // Port 0: the other loops listen on the port the first one got.
            addr = listener.local_addr()?;
            let poll = Poll::new()?;
            poll.registry().register(&mut listener, LISTENER, Interest::READABLE)?;
            inboxes.push(Inbox {
                waker: Waker::new(poll.registry(), WAKER)?,
                queue: Mutex::new(VecDeque::new()),
                stopped: AtomicBool::new(false),
            });
            loops.push((poll, listener));
        }
        let group = Group {
            inboxes: inboxes.into_boxed_slice(),
            budget: Budget::new(cfg.max_memory),
            slots: AtomicUsize::new(0),
            open: AtomicUsize::new(0),
            per_ip: Mutex::new(ipcount::IpCounts::new()),
        };
        Ok(Server {
            loops,
            local_addr: addr,
            cfg,
            stop: StopGuard(Handle { group: Arc::new(group) }, None),
        })
    }

    /// The address the server listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Whether the server speaks TLS ([`ServerConfig::tls`]).
    #[cfg(feature = "tls")]
    pub fn is_tls(&self) -> bool {
        self.cfg.tls.is_some()
    }

    /// A handle for other threads.
    pub fn handle(&self) -> Handle {
        self.stop.0.clone()
    }

    /// Runs the loop on this thread until a shutdown completes.
    ///
    /// With [`ServerConfig::threads`] above 1 this fails with
    /// [`InvalidInput`](io::ErrorKind::InvalidInput): each loop needs its own handler, which
    /// [`run_threads`](Self::run_threads) makes.
    pub fn run<H: Handler>(self, handler: H) -> io::Result<()> {
        if self.loops.len() > 1 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "ServerConfig::threads is above 1: run_threads gives each loop its own handler",
            ));
        }
        let Server {
            mut loops, cfg, stop, ..
        } = self;
        let (poll, listener) = loops.pop().expect("one loop");
        let handle = stop.0.clone();
        let result = run_loop(
            LoopParts {
                lp: 0,
                poll,
                listener,
                cfg,
                handle,
            },
            handler,
        );
        drop(stop);
        result
    }

    /// Runs one loop per [`ServerConfig::threads`], each with the handler `make(i)` returns for
    /// its index `i` (loop 0 runs on this thread), until every loop's shutdown completes.
    ///
    /// The loops share nothing on a message's way: each accepts on its own listener (the
    /// kernel spreads new connections by a hash of their addresses) and serves its connections
    /// alone. What crosses loops: [`Ctx::broadcast`] and [`Ctx::publish`] (the frame is encoded
    /// once and handed to the others' queues), the memory budget, `max_connections` and the
    /// per-IP limit (counted over every loop), and shutdown. [`Ctx::len`], [`Ctx::peers`],
    /// [`Ctx::stats`] and timers are the loop's own.
    #[inline(never)]
    pub fn run_threads<H, F>(self, mut make: F) -> io::Result<()>
    where
        H: Handler + Send,
        F: FnMut(usize) -> H,
    {
        let Server { loops, cfg, stop, .. } = self;
        let handle = stop.0.clone();
        let mut loops: Vec<_> = loops
            .into_iter()
            .enumerate()
            .map(|(lp, (poll, listener))| {
                let parts = LoopParts {
                    lp,
                    poll,
                    listener,
                    cfg: cfg.clone(),
                    handle: handle.clone(),
                };
                (parts, make(lp))
            })
            .collect();
        let (first, handler) = loops.remove(0);
        let result = std::thread::scope(|scope| {
            let mut threads = Vec::new();
            for (parts, handler) in loops {
                match std::thread::Builder::new().spawn_scoped(scope, move || run_loop(parts, handler)) {
                    Ok(t) => threads.push(t),
                    Err(e) => {
                        // The loops already started must end before the scope can.
                        handle.stop_others(0, true);
                        return Err(e);
                    }
                }
            }
            let mut result = run_loop(first, handler);
            for t in threads {
                let r = t.join().unwrap_or_else(|panic| std::panic::resume_unwind(panic));
                if result.is_ok() {
                    result = r;
                }
            }
            result
        });
        drop(stop);
        result
    }
}

/// One loop: accepts on its listener and serves its connections until its shutdown completes.
/// Never inlined: the first loop and the others share one copy.
#[inline(never)]
fn run_loop<H: Handler>(parts: LoopParts, handler: H) -> io::Result<()> {
    let (lp, handle) = (parts.lp, parts.handle.clone());
    let _stopped = StopGuard::one(&handle, lp);
    let result = serve_loop(parts, handler);
    if result.is_err() {
        // One loop failed: the server stops.
        handle.stop_others(lp, false);
    }
    result
}

/// What one loop is given: its index, its poll and listener, the settings, the server's handle.
struct LoopParts {
    lp: usize,
    poll: Poll,
    listener: TcpListener,
    cfg: ServerConfig,
    handle: Handle,
}

fn serve_loop<H: Handler>(parts: LoopParts, handler: H) -> io::Result<()> {
    let LoopParts {
        lp,
        poll,
        listener,
        cfg,
        handle,
    } = parts;
    // Signals reach the first loop, which tells the others.
    let mut signals = if cfg.handle_signals && lp == 0 {
        Some(Signals::install(&poll)?)
    } else {
        None
    };
    // Dropped after the engine: the connections' TLS sessions live as long as the loop.
    let budget = Arc::clone(&handle.group.budget);
    #[cfg(feature = "tls")]
    let _tls = cfg.tls.is_some().then(|| crate::io::tls::ServingTls::start(&budget));
    let mut eng: ServerEngine<H::State> =
        Engine::new(poll, cfg.protocol_config(), cfg.max_backpressure, NoRandom, budget);
    #[cfg(feature = "deflate")]
    {
        eng.codec = crate::proto::deflate::Codec::new(&cfg.deflate);
    }
    eng.quantum = crate::io::engine::QUANTUM;
    let mut srv = Srv {
        handler,
        shared: Shared {
            stats: Stats::default(),
            max_backpressure: cfg.max_backpressure,
            slow_consumer: cfg.slow_consumer,
            timers: slab::Slab::new(),
            next_timer: 0,
            shutdown_requested: false,
            peers: handler::PeerTable::new(),
            topics: topics::Topics::default(),
            lent: usize::MAX,
            lp: lp as u8,
            handle,
            behind_logged: false,
        },
        listener: Some(listener),
        accept_paused: false,
        emfile_logged: false,
        spare_fd: File::open("/dev/null").ok(),
        shutdown_deadline: None,
        commands: VecDeque::new(),
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
        // Connections with input left (their work ran out) go on after a look at what is new.
        let timeout = if eng.has_ready() {
            Some(Duration::ZERO)
        } else {
            poll_timeout(now, deadline)
        };
        match eng.poll.poll(&mut events, timeout) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
        eng.tick();
        eng.resume(&mut srv, &mut rbuf);
        for ev in events.iter() {
            match ev.token() {
                LISTENER => srv.accept_all(&mut eng),
                WAKER => {
                    if srv.run_commands(&mut eng) {
                        return Ok(());
                    }
                }
                SIGNALS => {
                    if let Some(s) = &mut signals {
                        signals_seen += s.drain();
                    }
                    if signals_seen > 1 && srv.shutdown_deadline.is_some() {
                        log::warn!("second signal: stopping now");
                        srv.shared.handle.stop_others(lp, true);
                        return Ok(());
                    }
                    log::info!("signal received: shutting down");
                    srv.shutdown_everywhere(&mut eng);
                }
                Token(key) => eng.on_ready(&mut srv, key, ev, &mut rbuf),
            }
        }
        eng.fire_timers(&mut srv);
        eng.apply_budget(&mut srv);
        eng.reap(&mut srv);
        if std::mem::take(&mut srv.shared.shutdown_requested) {
            srv.shutdown_everywhere(&mut eng);
            eng.reap(&mut srv);
        }
        if let Some(d) = srv.shutdown_deadline {
            // Done once every peer's close handshake is over and our last bytes are out.
            if eng
                .slots
                .iter()
                .all(|(_, s)| s.conn.state() == State::Closed && s.out.is_none() && !s.stream.wants_write())
            {
                if lp == 0 {
                    log::info!("shutdown complete");
                }
                return Ok(());
            }
            if eng.now >= d {
                log::info!("shutdown: {} connection(s) did not close in time", eng.slots.len());
                return Ok(());
            }
        }
    }
}

/// A listener with `SO_REUSEPORT`, otherwise as `TcpListener::bind` makes it (`SO_REUSEADDR`,
/// a backlog of 1,024).
fn bind_shared(addr: SocketAddr) -> io::Result<TcpListener> {
    let s = socket2::Socket::new(socket2::Domain::for_address(addr), socket2::Type::STREAM, None)?;
    s.set_reuse_address(true)?;
    s.set_reuse_port(true)?;
    s.set_nonblocking(true)?;
    s.bind(&addr.into())?;
    s.listen(1024)?;
    Ok(TcpListener::from_std(s.into()))
}

/// Marks loops stopped when dropped: one loop when its `run_loop` returns (however it
/// returns), or every loop when the server ends or is dropped without running.
struct StopGuard(Handle, Option<usize>);

impl StopGuard {
    fn one(handle: &Handle, lp: usize) -> StopGuard {
        StopGuard(handle.clone(), Some(lp))
    }
}
/// The stream for an accepted socket: TLS when the server has a TLS configuration.
fn server_stream(tcp: TcpStream, cfg: &ServerConfig) -> io::Result<ServerStream> {
    #[cfg(feature = "tls")]
    return match &cfg.tls {
        Some(t) => ServerStream::tls(tcp, &t.config),
        None => Ok(ServerStream::plain(tcp)),
    };
    #[cfg(not(feature = "tls"))]
    {
        let _ = cfg;
        Ok(tcp)
    }
}

impl Drop for StopGuard {
    fn drop(&mut self) {
        match self.1 {
            Some(lp) => self.0.mark_stopped(lp),
            None => (0..self.0.group.inboxes.len()).for_each(|lp| self.0.mark_stopped(lp)),
        }
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
    /// Commands taken from the inbox (kept to reuse its allocation).
    commands: VecDeque<Command>,
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

    fn group(&self) -> &Group {
        &self.shared.handle.group
    }

    /// One connection fewer from `ip` (with a per-IP limit).
    fn uncount(&mut self, ip: IpAddr) {
        if self.cfg.max_connections_per_ip.is_some() {
            self.group().per_ip.lock().unwrap_or_else(|e| e.into_inner()).remove(ip);
        }
    }

    fn addr(&self, eng: &ServerEngine<H::State>, key: usize) -> SocketAddr {
        eng.slots[key].data.addr.get(&self.shared.peers)
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
            id: ConnId::new(key, slot.gen, self.shared.lp),
            addr: slot.data.addr.get(&self.shared.peers),
            state: std::mem::take(&mut slot.data.state),
        };
        self.shared.lent = key;
        let (h, mut ctx) = self.ctx(eng);
        let r = f(h, &mut ctx, &mut conn);
        self.shared.lent = usize::MAX;
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
                    // Out of descriptors: the spare one lets each waiting client in to be told
                    // why and closed at once (one at a time, it would leave the rest hanging in
                    // the backlog), then accepting pauses briefly instead of spinning.
                    if self.spare_fd.take().is_some() {
                        let mut b = Vec::new();
                        Reject::new(503, "too many connections").write(&mut b);
                        for _ in 0..REFUSE_AT_ONCE {
                            let Ok((mut s, a)) = listener.accept() else { break };
                            self.shared.stats.refused += 1;
                            peer_log(log::Level::Debug, a, format_args!(": refused, out of descriptors"));
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
        // Counted over every loop; given back in `on_removed`, or below if never inserted.
        let slots = self.group().slots.fetch_add(1, Ordering::Relaxed);
        let mut over = slots >= self.cfg.max_connections;
        let mut why = "too many connections";
        if over {
            peer_log(
                log::Level::Debug,
                addr,
                format_args!(": refused, {slots} connections open"),
            );
        } else if let Some(limit) = self.cfg.max_connections_per_ip {
            let counted = self
                .group()
                .per_ip
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .add_below(addr.ip(), limit);
            if !counted {
                over = true;
                why = "too many connections from this address";
                peer_log(
                    log::Level::Debug,
                    addr,
                    format_args!(": refused, {limit} connections from this address"),
                );
            }
        }
        let mut refusal = Vec::new();
        if over {
            self.shared.stats.refused += 1;
            Reject::new(503, why).write(&mut refusal);
            if slots >= self.cfg.max_connections + (config::FD_RESERVE as usize / 2) {
                // No room even to linger: write the answer if the kernel takes it, then drop.
                self.group().slots.fetch_sub(1, Ordering::Relaxed);
                if !self.tls() {
                    let mut s = stream;
                    let _ = write_some(&mut s, &refusal);
                }
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
        let peer = PeerAddr::new(addr, &mut self.shared.peers);
        let data_counted = !over && self.cfg.max_connections_per_ip.is_some();
        let data = ConnData {
            addr: peer,
            opened: false,
            counted: data_counted,
            state: H::State::default(),
        };
        let stream = match server_stream(stream, &self.cfg) {
            Ok(s) => s,
            Err(e) => {
                peer_log(log::Level::Warn, addr, format_args!(": {e}"));
                peer.release(&mut self.shared.peers);
                self.group().slots.fetch_sub(1, Ordering::Relaxed);
                if data_counted {
                    self.uncount(addr.ip());
                }
                return;
            }
        };
        match eng.insert(stream, conn, data) {
            Ok(key) if over => {
                eng.send_raw(key, &refusal);
                eng.settle(key);
            }
            Ok(_) => {}
            Err(e) => {
                peer.release(&mut self.shared.peers);
                self.group().slots.fetch_sub(1, Ordering::Relaxed);
                if data_counted {
                    self.uncount(addr.ip());
                }
                peer_log(log::Level::Warn, addr, format_args!(": register failed: {e}"));
            }
        }
    }

    /// Answers a complete request: the page, a refusal, or an upgrade the handler decides on.
    fn on_request(&mut self, eng: &mut ServerEngine<H::State>, key: usize, req: Request) {
        let addr = self.addr(eng, key);
        let answer = if !req.is_upgrade() {
            self.plain_answer(&req)
        } else if let Some(origin) = req.origin().filter(|o| !self.origin_allowed(o)) {
            peer_log(
                log::Level::Info,
                addr,
                format_args!(": refused handshake: origin {origin} not allowed"),
            );
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
                peer_log(
                    log::Level::Info,
                    addr,
                    format_args!(": refused handshake: {status} {}", body.trim()),
                );
            }
            return;
        }
        let slot = &mut eng.slots[key];
        slot.data.opened = true;
        self.shared.stats.open += 1;
        self.group().open.fetch_add(1, Ordering::Relaxed);
        peer_log(log::Level::Info, addr, format_args!(" connected"));
        self.with_conn(eng, key, |h, ctx, conn| h.on_open(ctx, conn));
    }

    /// Whether connections speak TLS.
    fn tls(&self) -> bool {
        #[cfg(feature = "tls")]
        return self.cfg.tls.is_some();
        #[cfg(not(feature = "tls"))]
        false
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
        self.group().open.fetch_sub(1, Ordering::Relaxed);
        peer_log(
            log::Level::Info,
            slot.data.addr.get(&self.shared.peers),
            format_args!(" disconnected ({code})"),
        );
        self.with_conn(eng, key, |h, ctx, conn| h.on_close(ctx, conn, code, reason));
        // Only an open connection subscribes, so its subscriptions end here.
        self.shared.topics.remove_conn(key);
    }

    /// Runs the commands in this loop's inbox; returns true when one says to stop at once.
    fn run_commands(&mut self, eng: &mut ServerEngine<H::State>) -> bool {
        let lp = usize::from(self.shared.lp);
        {
            let inbox = &self.shared.handle.group.inboxes[lp];
            let mut q = inbox.queue.lock().unwrap_or_else(|e| e.into_inner());
            std::mem::swap(&mut *q, &mut self.commands);
        }
        while let Some(c) = self.commands.pop_front() {
            let (h, mut ctx) = self.ctx(eng);
            match c {
                Command::Frame { frame, topic, except } => {
                    match topic {
                        None => ctx.deliver(&frame, except, false),
                        Some(t) => ctx.publish_here(&t, &frame, except),
                    };
                }
                Command::Send(id, bytes, op) => {
                    if let Some(msg) = message(&bytes, op) {
                        ctx.send(id, msg);
                    }
                }
                Command::Shutdown => self.begin_shutdown(eng),
                Command::Stop => {
                    self.commands.clear();
                    return true;
                }
                Command::Wake => h.on_wake(&mut ctx),
            }
        }
        false
    }

    /// Begins a graceful shutdown here and on every other loop.
    fn shutdown_everywhere(&mut self, eng: &mut ServerEngine<H::State>) {
        if self.shutdown_deadline.is_none() {
            self.shared.handle.stop_others(usize::from(self.shared.lp), false);
        }
        self.begin_shutdown(eng);
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

impl<H: Handler> Driver<ServerStream, ConnData<H::State>, NoRandom> for Srv<H> {
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
        let addr = self.addr(eng, key);
        match err {
            crate::proto::Error::Protocol(e) => {
                peer_log(log::Level::Debug, addr, format_args!(": protocol error: {e}"));
                self.notify_close(eng, key, e.code, e.reason);
            }
            crate::proto::Error::Rejected(r) => {
                peer_log(log::Level::Info, addr, format_args!(": refused handshake: {r}"))
            }
            crate::proto::Error::Response(_) => {}
        }
    }

    fn on_timeout(&mut self, eng: &mut ServerEngine<H::State>, key: usize, t: Timeout) {
        let addr = self.addr(eng, key);
        match t {
            Timeout::Handshake => peer_log(log::Level::Info, addr, format_args!(": handshake timeout")),
            Timeout::Idle => peer_log(log::Level::Info, addr, format_args!(": idle timeout")),
            Timeout::Close => peer_log(log::Level::Debug, addr, format_args!(": close timeout")),
            Timeout::Ping => {}
        }
    }

    fn on_removed(&mut self, eng: &mut ServerEngine<H::State>, key: usize, cause: Cause) {
        let reason = match &cause {
            Cause::Timeout(Timeout::Close) => "close timeout",
            Cause::Io(e) => {
                peer_log(log::Level::Debug, self.addr(eng, key), format_args!(": {e}"));
                ""
            }
            _ => "",
        };
        self.notify_close(eng, key, close_code::ABNORMAL, reason);
        self.group().slots.fetch_sub(1, Ordering::Relaxed);
        let data = &eng.slots[key].data;
        if data.counted {
            self.uncount(data.addr.get(&self.shared.peers).ip());
        }
        data.addr.release(&mut self.shared.peers);
    }

    fn on_shed(&mut self, eng: &mut ServerEngine<H::State>, key: usize) {
        let addr = self.addr(eng, key);
        peer_log(
            log::Level::Warn,
            addr,
            format_args!(": closed with 1013, the server is short of memory"),
        );
        self.notify_close(eng, key, SHED_CODE, "server short of memory");
    }

    fn on_timer(&mut self, eng: &mut ServerEngine<H::State>, id: u64) {
        if id == ACCEPT_TIMER {
            self.accept_paused = false;
            self.accept_all(eng);
            return;
        }
        let Some(conn) = self.shared.take_timer(id) else { return };
        // A connection's timers end with it, even while its slot waits for the last bytes.
        if conn.is_some_and(|c| !eng.is_live(c.key(), c.gen()) || !eng.slots[c.key()].data.opened) {
            return;
        }
        let (h, mut ctx) = self.ctx(eng);
        h.on_timer(&mut ctx, Timer { id: TimerId(id), conn });
    }
}
