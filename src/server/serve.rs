//! The serve loop: polls, hands readiness to the engine, runs commands and signals, and drives
//! a shutdown to its end; and the driver that turns the engine's events into handler calls.

use std::collections::VecDeque;
use std::fs::File;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use mio::net::TcpListener;
use mio::{Events, Token};

use super::accept::ACCEPT_TIMER;
use super::handle::{message, Command, Group};
use super::handler::{ConnData, ServerEngine};
use super::metrics::PUBLISH_TIMER;
use super::run::LoopParts;
use super::signals::Signals;
use super::{msglog, ADMIN, LISTENER, SIGNALS, WAKER};
use super::{peer_log, Conn, ConnId, Ctx, Handler, LoopState, ServerConfig, Timer, TimerId, Upgrade};
use crate::io::engine::{Cause, Driver, Engine, SHED_CODE};
use crate::io::stream::ServerStream;
use crate::io::timer::{deadline_after, poll_timeout};
use crate::io::transport::SlotStream;
use crate::proto::rand::NoRandom;
use crate::proto::{close_code, Answer, Event, Headers, Request, State, Timeout};

pub(super) fn serve_loop<H: Handler>(parts: LoopParts, handler: H) -> io::Result<()> {
    let LoopParts {
        lp,
        poll,
        listener,
        admin,
        cfg,
        handle,
    } = parts;
    // Signals reach the first loop, which tells the others.
    let mut signals = if cfg.handle_signals && lp == 0 {
        Some(Signals::install(&poll)?)
    } else {
        None
    };
    let budget = Arc::clone(&handle.group.budget);
    let mut eng: ServerEngine<H::State> =
        Engine::new(poll, cfg.protocol_config(), cfg.max_backpressure, NoRandom, budget);
    #[cfg(feature = "deflate")]
    {
        eng.codec = crate::proto::deflate::Codec::new(&cfg.deflate);
    }
    eng.quantum = crate::io::engine::QUANTUM;
    let mut srv = Srv {
        handler,
        loop_state: LoopState::new(&cfg, lp as u8, handle),
        listener: Some(listener),
        admin,
        drain_until: None,
        accept_paused: false,
        emfile_logged: false,
        spare_fd: File::open("/dev/null").ok(),
        shutdown_deadline: None,
        commands: VecDeque::new(),
        commands_pending: false,
        cfg,
    };
    let mut events = Events::with_capacity(1024);
    let mut rbuf = vec![0u8; srv.cfg.read_buffer_size];
    eng.tick();
    if srv.publishes() {
        srv.publish(&mut eng);
    }
    srv.handler.on_start(&mut Ctx {
        eng: &mut eng,
        loop_state: &mut srv.loop_state,
    });
    let mut signals_seen = 0usize;
    loop {
        let now = eng.tick();
        let mut deadline = eng.next_deadline();
        if let Some(d) = srv.shutdown_deadline {
            // A drain ends before the shutdown does.
            let d = srv.drain_until.unwrap_or(d);
            deadline = Some(deadline.map_or(d, |t| t.min(d)));
        }
        // Connections with input left (their work ran out) go on after a look at what is new.
        let timeout = if eng.has_ready() || srv.commands_pending {
            Some(std::time::Duration::ZERO)
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
        let mut commands_ran = false;
        for ev in events.iter() {
            match ev.token() {
                // A connection's event first: one comparison against the reserved tokens.
                Token(key) if key < ADMIN.0 => eng.on_ready(&mut srv, key, ev, &mut rbuf),
                LISTENER => srv.accept_all(&mut eng),
                ADMIN => srv.accept_admin(&mut eng),
                WAKER => {
                    commands_ran = true;
                    if srv.run_commands(&mut eng) {
                        return Ok(());
                    }
                }
                SIGNALS => {
                    if signals.as_mut().is_some_and(|s| s.take_hangup()) {
                        super::signals::on_hangup(&srv.loop_state.handle);
                    }
                    let seen = signals.as_mut().map_or(0, |s| s.drain());
                    if seen == 0 {
                        continue; // SIGHUP alone: nothing to stop
                    }
                    signals_seen += seen;
                    if signals_seen > 1 && srv.shutdown_deadline.is_some() {
                        log::warn!("second signal: stopping now");
                        srv.loop_state.handle.stop_others(lp, true);
                        return Ok(());
                    }
                    log::info!("signal received: shutting down");
                    srv.shutdown_everywhere(&mut eng);
                }
                Token(key) => eng.on_ready(&mut srv, key, ev, &mut rbuf),
            }
        }
        // Commands left by an earlier turn go on (no wakeup comes for them).
        if srv.commands_pending && !commands_ran && srv.run_commands(&mut eng) {
            return Ok(());
        }
        eng.fire_timers(&mut srv);
        eng.apply_budget(&mut srv);
        eng.reap(&mut srv);
        if std::mem::take(&mut srv.loop_state.shutdown_requested) {
            srv.shutdown_everywhere(&mut eng);
            eng.reap(&mut srv);
        }
        if let Some(d) = srv.shutdown_deadline {
            if srv.drain_until.is_some_and(|d| eng.now >= d) {
                srv.drain_until = None;
                srv.close_peers(&mut eng);
                eng.reap(&mut srv);
            }
            // Done once every peer's close handshake is over and our last bytes are out.
            if eng.slots.iter().all(|(k, s)| {
                s.conn.state() == State::Closed && s.out.is_none() && !s.stream.wants_write(k, &eng.streams)
            }) {
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

/// The server driver: the handler and everything the loop keeps beside the engine.
pub(super) struct Srv<H: Handler> {
    pub(super) handler: H,
    pub(super) loop_state: LoopState,
    pub(super) cfg: ServerConfig,
    pub(super) listener: Option<TcpListener>,
    /// The metrics listener (first loop only), open until the loop returns.
    pub(super) admin: Option<TcpListener>,
    /// Draining until then: not accepting, the peers not closed yet.
    pub(super) drain_until: Option<u64>,
    pub(super) accept_paused: bool,
    pub(super) emfile_logged: bool,
    /// A descriptor held in reserve: at the descriptor limit it is closed for a moment so that
    /// a waiting client can be accepted and told `503` instead of hanging in the backlog.
    pub(super) spare_fd: Option<File>,
    /// Shutdown started; ends at this time at the latest.
    pub(super) shutdown_deadline: Option<u64>,
    /// Commands taken from the inbox and not run yet (kept to reuse its allocation).
    pub(super) commands: VecDeque<Command>,
    /// A turn ran out of work for commands: more wait here or in the inbox.
    pub(super) commands_pending: bool,
}

/// Work one turn gives commands from handles and other loops (and instances): a command costs
/// 1, plus 1 for each connection a broadcast or publish reached. A delivery that is written at
/// once costs a system call (several microseconds on loopback, with the receiver's share), so
/// a turn's share of a flood of broadcasts takes tens of milliseconds of CPU.
const COMMAND_WORK: usize = crate::io::engine::QUANTUM;

impl<H: Handler> Srv<H> {
    fn ctx<'a>(&'a mut self, eng: &'a mut ServerEngine<H::State>) -> (&'a mut H, Ctx<'a, H::State>) {
        (
            &mut self.handler,
            Ctx {
                eng,
                loop_state: &mut self.loop_state,
            },
        )
    }

    pub(super) fn group(&self) -> &Group {
        &self.loop_state.handle.group
    }

    fn addr(&self, eng: &ServerEngine<H::State>, key: usize) -> SocketAddr {
        eng.slots[key].data.addr.get(&self.loop_state.peers)
    }

    /// Calls the handler about connection `key`, lending it the connection's state (none is
    /// called for a connection without one).
    fn with_conn<R>(
        &mut self,
        eng: &mut ServerEngine<H::State>,
        key: usize,
        f: impl FnOnce(&mut H, &mut Ctx<'_, H::State>, &mut Conn<H::State>) -> R,
    ) -> Option<R> {
        let slot = &mut eng.slots[key];
        // Only an upgraded connection has a state, and only such a one gets callbacks.
        let state = slot.data.take_state()?;
        let mut conn = Conn {
            id: ConnId::new(key, slot.gen, self.loop_state.lp, self.loop_state.instance),
            addr: slot.data.addr.get(&self.loop_state.peers),
            state,
        };
        self.loop_state.lent = Some(key);
        let (h, mut ctx) = self.ctx(eng);
        let r = f(h, &mut ctx, &mut conn);
        self.loop_state.lent = None;
        // Slots are removed only at the end of a turn, so this one is still here.
        eng.slots[key].data.put_state(conn.state);
        Some(r)
    }

    /// The `debug` line of a message received (out of the inlined event path).
    #[cold]
    #[inline(never)]
    fn log_received(&self, eng: &ServerEngine<H::State>, key: usize, payload: &crate::proto::Payload<'_>) {
        let msg = payload.as_message();
        msglog::message(self.addr(eng, key), msglog::Dir::In, msg.opcode(), msg.as_bytes());
    }

    /// Answers a complete request: the page, a refusal, or an upgrade the handler decides on.
    fn on_request(&mut self, eng: &mut ServerEngine<H::State>, key: usize, req: Request) {
        let addr = self.addr(eng, key);
        let answer = if let Some(answer) = self.builtin_route(eng, key, &req) {
            answer
        } else if !req.is_upgrade() {
            self.plain_answer(eng, &req, addr)
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
                headers: Headers::new(),
            };
            let (h, mut ctx) = self.ctx(eng);
            match h.on_upgrade(&mut ctx, &mut up) {
                Ok(state) => {
                    eng.slots[key].data.put_state(state);
                    Answer::Accept {
                        protocol: up.protocol,
                        headers: up.headers,
                    }
                }
                Err(answer) => answer,
            }
        };
        #[cfg(feature = "deflate")]
        let upgraded = eng.accept_deflate(key, &req, &answer, &self.cfg.deflate);
        #[cfg(not(feature = "deflate"))]
        let upgraded = eng.accept(key, &req, &answer, None);
        if !upgraded {
            if let Answer::Reject { status, body, .. } = &answer {
                if req.is_upgrade() {
                    self.loop_state.counters.refused(*status);
                }
                peer_log(
                    log::Level::Info,
                    addr,
                    format_args!(": refused handshake: {status} {}", body.trim()),
                );
            }
            return;
        }
        let slot = &mut eng.slots[key];
        slot.data.set_opened(true);
        self.loop_state.stats.open += 1;
        self.loop_state.counters.opened += 1;
        self.group().open.fetch_add(1, Ordering::Relaxed);
        // At debug: a line per connection costs a server under churn about a quarter more CPU
        // (docs/operations.md); the CLI sums them up at info.
        peer_log(log::Level::Debug, addr, format_args!(" connected"));
        self.with_conn(eng, key, |h, ctx, conn| h.on_open(ctx, conn));
    }

    fn origin_allowed(&self, origin: &str) -> bool {
        self.cfg.origins.is_empty() || self.cfg.origins.iter().any(|a| a.eq_ignore_ascii_case(origin))
    }

    /// A request that is not an upgrade: the handler's answer, or the server's own.
    fn plain_answer(&mut self, eng: &mut ServerEngine<H::State>, req: &Request, peer: SocketAddr) -> Answer {
        let (h, mut ctx) = self.ctx(eng);
        h.on_request(&mut ctx, req, peer)
            .or_else(|| self.own_route(eng, req, false))
            .unwrap_or_else(|| self.builtin_answer(req))
    }

    /// The server's own answer to a plain request: the page for `GET /` and `HEAD /` when
    /// there is one.
    fn builtin_answer(&self, req: &Request) -> Answer {
        let readable = matches!(req.method(), "GET" | "HEAD");
        match (&self.cfg.page, readable) {
            (_, false) => Answer::reject(405, "only GET is served here").with_header("Allow", "GET, HEAD"),
            (Some(page), true) if req.path_only() == "/" => Answer::respond(
                200,
                "text/html; charset=utf-8",
                match page {
                    std::borrow::Cow::Borrowed(s) => std::borrow::Cow::Borrowed(s.as_bytes()),
                    std::borrow::Cow::Owned(s) => std::borrow::Cow::Owned(s.clone().into_bytes()),
                },
            ),
            (Some(_), true) => Answer::reject(404, "not found"),
            (None, true) => Answer::reject(426, "this is a WebSocket endpoint: send an Upgrade request"),
        }
    }

    /// Calls `on_close` once for a connection that was open.
    fn notify_close(&mut self, eng: &mut ServerEngine<H::State>, key: usize, code: u16, reason: &str) {
        let slot = &mut eng.slots[key];
        if !slot.data.set_opened(false) {
            return;
        }
        self.loop_state.stats.open -= 1;
        self.loop_state.counters.closed(code);
        self.group().open.fetch_sub(1, Ordering::Relaxed);
        peer_log(
            log::Level::Debug,
            slot.data.addr.get(&self.loop_state.peers),
            format_args!(" disconnected ({})", slot.data.ending(code)),
        );
        self.with_conn(eng, key, |h, ctx, conn| h.on_close(ctx, conn, code, reason));
        // Only an open connection subscribes, so its subscriptions end here.
        let link = &self.loop_state.handle.group.link;
        self.loop_state
            .topics
            .remove_conn(key, &mut |topic| link.topic_left(topic));
    }

    /// Runs the commands in this loop's inbox; returns true when one says to stop at once.
    fn run_commands(&mut self, eng: &mut ServerEngine<H::State>) -> bool {
        let lp = usize::from(self.loop_state.lp);
        // Bounded like a connection's turn: a full inbox of broadcasts to every peer would
        // otherwise hold the loop (accepts, timers, the worker's heartbeat) for seconds. What
        // is left waits here, and the inbox is taken again only once it is done, so the two
        // together stay within twice the inbox's bound.
        let mut work = 0usize;
        while work < COMMAND_WORK {
            if self.commands.is_empty() {
                let inbox = &self.loop_state.handle.group.inboxes[lp];
                let mut q = inbox.queue.lock().unwrap_or_else(|e| e.into_inner());
                std::mem::swap(&mut *q, &mut self.commands);
            }
            let Some(c) = self.commands.pop_front() else {
                self.commands_pending = false;
                return false;
            };
            let (h, mut ctx) = self.ctx(eng);
            work += 1 + match c {
                Command::Frame { frame, topic, except } => match topic {
                    None => ctx.deliver(&frame, except, false),
                    Some(t) => ctx.publish_here(&t, &frame, except),
                },
                Command::Send(id, bytes, op) => {
                    if let Some(msg) = message(&bytes, op) {
                        // A connection closed meanwhile: the message has nobody to go to.
                        let _ = ctx.send(id, msg);
                    }
                    0
                }
                Command::Shutdown => {
                    self.begin_shutdown(eng);
                    0
                }
                Command::Stop => {
                    self.commands.clear();
                    return true;
                }
                Command::Wake => {
                    h.on_wake(&mut ctx);
                    0
                }
            };
        }
        // Out of work for this turn: the loop comes back without waiting for a wakeup (none
        // comes while the inbox is not empty).
        self.commands_pending = true;
        false
    }

    /// Begins a graceful shutdown here and on every other loop.
    fn shutdown_everywhere(&mut self, eng: &mut ServerEngine<H::State>) {
        if self.shutdown_deadline.is_none() {
            self.loop_state
                .handle
                .stop_others(usize::from(self.loop_state.lp), false);
        }
        self.begin_shutdown(eng);
    }

    fn begin_shutdown(&mut self, eng: &mut ServerEngine<H::State>) {
        if self.shutdown_deadline.is_some() {
            return;
        }
        let drain = self.cfg.drain_timeout;
        self.shutdown_deadline = Some(deadline_after(eng.now, drain.saturating_add(self.cfg.shutdown_timeout)));
        self.group().board.draining.store(true, Ordering::Relaxed);
        // Closed, not only deregistered: new connections are refused rather than left waiting.
        if let Some(mut l) = self.listener.take() {
            let _ = eng.poll.registry().deregister(&mut l);
        }
        if !drain.is_zero() {
            if self.loop_state.lp == 0 {
                log::info!("draining: not accepting; peers still open are closed in {drain:?}");
            }
            self.drain_until = Some(deadline_after(eng.now, drain));
            return;
        }
        self.close_peers(eng);
    }

    /// Closes every peer with 1001 (the end of a drain, or a shutdown without one).
    fn close_peers(&mut self, eng: &mut ServerEngine<H::State>) {
        let keys: Vec<usize> = eng.slots.iter().map(|(k, _)| k).collect();
        for key in keys {
            match eng.slots[key].conn.state() {
                State::Open => {
                    super::handler::close_conn(eng, key, close_code::GOING_AWAY, "server shutting down");
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
            // The engine hands messages to `on_message`, whose path is inlined in one place.
            Event::Message(_) => {}
            Event::Close { code, reason } => {
                let code = code.unwrap_or(close_code::NO_STATUS);
                self.notify_close(eng, key, code, reason.as_str());
            }
            Event::Ping(_) | Event::Pong(_) | Event::Open(_) => {}
        }
    }

    #[inline]
    fn on_message(&mut self, eng: &mut ServerEngine<H::State>, key: usize, payload: crate::proto::Payload<'_>) {
        // The test first, on what is at hand, so that the inlined path below is the same as
        // without it.
        if self.loop_state.log_messages {
            self.log_received(eng, key, &payload);
        }
        self.loop_state.stats.messages_in += 1;
        let msg = payload.as_message();
        self.with_conn(eng, key, |h, ctx, conn| h.on_message(ctx, conn, msg));
    }

    fn on_error(&mut self, eng: &mut ServerEngine<H::State>, key: usize, err: &crate::proto::Error) {
        let addr = self.addr(eng, key);
        match err {
            crate::proto::Error::Protocol(e) => {
                peer_log(log::Level::Debug, addr, format_args!(": protocol error: {e}"));
                self.notify_close(eng, key, e.code(), e.reason());
            }
            crate::proto::Error::Rejected(r) => {
                self.loop_state.counters.refused(r.status);
                peer_log(log::Level::Info, addr, format_args!(": refused handshake: {r}"))
            }
            crate::proto::Error::Response(_) => {}
        }
    }

    fn on_timeout(&mut self, eng: &mut ServerEngine<H::State>, key: usize, t: Timeout) {
        let addr = self.addr(eng, key);
        if let Timeout::Idle = t {
            eng.slots[key].data.sent_close = close_code::GOING_AWAY; // sent by the connection
        }
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
        let data = &eng.slots[key].data;
        self.give_back(Some(data.addr), data.counted());
    }

    fn on_shed(&mut self, eng: &mut ServerEngine<H::State>, key: usize) {
        let addr = self.addr(eng, key);
        peer_log(
            log::Level::Warn,
            addr,
            format_args!(": closed with 1013, the server is short of memory"),
        );
        self.loop_state.counters.budget_closes += 1;
        self.notify_close(eng, key, SHED_CODE, "server short of memory");
    }

    fn on_timer(&mut self, eng: &mut ServerEngine<H::State>, id: u64) {
        if id == ACCEPT_TIMER {
            self.accept_paused = false;
            self.accept_all(eng);
            return;
        }
        if id == PUBLISH_TIMER {
            self.publish(eng);
            return;
        }
        let Some(conn) = self.loop_state.take_timer(id) else {
            return;
        };
        // A connection's timers end with it, even while its slot waits for the last bytes; one
        // set for a connection of another loop or instance never finds it here.
        let (lp, instance) = (usize::from(self.loop_state.lp), self.loop_state.instance);
        let gone = |c: ConnId| {
            c.loop_index() != lp
                || c.instance() != instance
                || !eng.is_live(c.key(), c.gen())
                || !eng.slots[c.key()].data.opened()
        };
        if conn.is_some_and(gone) {
            return;
        }
        let (h, mut ctx) = self.ctx(eng);
        h.on_timer(&mut ctx, Timer { id: TimerId(id), conn });
    }
}
