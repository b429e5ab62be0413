//! Bind and run: the [`Server`], its listeners, and the threads its loops run on.

use std::collections::VecDeque;
use std::io;
use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, AtomicUsize};
use std::sync::{Arc, Mutex};

use mio::net::TcpListener;
use mio::{Interest, Poll, Waker};

use super::handle::{Group, Handle, Inbox};
use super::serve::serve_loop;
use super::{config, default_max_connections, ipcount, Handler, ServerConfig, ADMIN, LISTENER, WAKER};
use crate::io::budget::Budget;

/// A bound server, ready to [`run`](Server::run). It may be moved to the thread that runs it.
pub struct Server {
    /// Each loop's poll and listener (one listener per loop on the same port).
    loops: Vec<(Poll, TcpListener)>,
    local_addr: SocketAddr,
    /// The metrics listener ([`ServerConfig::metrics_listen`]), served by the first loop.
    admin: Option<TcpListener>,
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
        let admin = match cfg.metrics_listen {
            // Connections are told apart by the port they came to.
            Some(a) if a.port() == addr.port() => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    "the metrics listener needs a port of its own",
                ))
            }
            Some(a) => {
                let mut l = if cfg.reuse_port {
                    bind_shared(a)?
                } else {
                    TcpListener::bind(a)?
                };
                loops[0].0.registry().register(&mut l, ADMIN, Interest::READABLE)?;
                Some(l)
            }
            None => None,
        };
        let group = Group {
            inboxes: inboxes.into_boxed_slice(),
            budget: Budget::new(cfg.max_memory),
            slots: AtomicUsize::new(0),
            open: AtomicUsize::new(0),
            per_ip: Mutex::new(ipcount::IpCounts::new()),
            link: super::cluster_link::ClusterLink::default(),
            board: super::metrics::Board::new(
                cfg.threads,
                cfg.metrics_board,
                cfg.metrics || cfg.metrics_listen.is_some(),
            ),
            #[cfg(feature = "tls")]
            tls: cfg.tls.clone().map(super::tls_reload::CurrentTls::new),
        };
        Ok(Server {
            loops,
            local_addr: addr,
            admin,
            cfg,
            stop: StopGuard(Handle { group: Arc::new(group) }, None),
        })
    }

    /// The address the server listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The address of the metrics listener ([`ServerConfig::metrics_listen`]), if there is one.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.admin.as_ref().and_then(|l| l.local_addr().ok())
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
            mut loops,
            cfg,
            stop,
            admin,
            ..
        } = self;
        stop.0.group.link.start(&cfg, &stop.0.group)?;
        let (poll, listener) = loops.pop().expect("one loop");
        let handle = stop.0.clone();
        let result = run_loop(
            LoopParts {
                lp: 0,
                poll,
                listener,
                admin,
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
    /// alone. What crosses loops: [`Ctx::broadcast`](super::Ctx::broadcast) and
    /// [`Ctx::publish`](super::Ctx::publish) (the frame is encoded once and handed to the
    /// others' queues), the memory budget, `max_connections` and the per-IP limit (counted over
    /// every loop), and shutdown. [`Ctx::len`](super::Ctx::len),
    /// [`Ctx::peers`](super::Ctx::peers), [`Ctx::stats`](super::Ctx::stats) and timers are the
    /// loop's own.
    #[inline(never)]
    pub fn run_threads<H, F>(self, mut make: F) -> io::Result<()>
    where
        H: Handler + Send,
        F: FnMut(usize) -> H,
    {
        let Server {
            loops,
            cfg,
            stop,
            admin,
            ..
        } = self;
        let mut admin = admin;
        stop.0.group.link.start(&cfg, &stop.0.group)?;
        let handle = stop.0.clone();
        let mut loops: Vec<_> = loops
            .into_iter()
            .enumerate()
            .map(|(lp, (poll, listener))| {
                let parts = LoopParts {
                    lp,
                    poll,
                    listener,
                    admin: admin.take(),
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
pub(super) struct LoopParts {
    pub(super) lp: usize,
    pub(super) poll: Poll,
    pub(super) listener: TcpListener,
    /// The metrics listener, on the first loop.
    pub(super) admin: Option<TcpListener>,
    pub(super) cfg: ServerConfig,
    pub(super) handle: Handle,
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

impl Drop for StopGuard {
    fn drop(&mut self) {
        match self.1 {
            Some(lp) => self.0.mark_stopped(lp),
            None => {
                (0..self.0.group.inboxes.len()).for_each(|lp| self.0.mark_stopped(lp));
                // The loops are done: nothing more to send, and the others should know.
                self.0.group.link.stop();
            }
        }
    }
}
