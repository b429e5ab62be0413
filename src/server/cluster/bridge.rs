//! The bridge thread: two connections to Redis on a poll of their own, fed by the loops
//! through a bounded queue.
//!
//! The loops never wait on Redis: [`Bus::send`] and the topic calls take a mutex for as long as
//! it takes to copy a message into the queue, and wake the bridge. The bridge writes the
//! queue to the publishing connection, reads the subscribed connection at Redis's pace and
//! hands what it reads to the loops (which never block either), sends heartbeats, and
//! reconnects with backoff when Redis goes away.

use std::collections::HashMap;
use std::io;
use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use mio::{Events, Interest, Poll, Token, Waker};

use super::resp::{self, Decoded, Limits, Value};
use super::wire::{self, Kind};
use super::{ClusterConfig, ClusterState, ClusterStats, Inbound, RedisUrl, Target};
use crate::io::budget::Budget;
use crate::io::stream::ClientStream;
use crate::io::transport::Transport;
use crate::proto::frame::OpCode;

const SUB: Token = Token(0);
const PUB: Token = Token(1);
const WAKER: Token = Token(2);

/// The first wait before reconnecting; doubled after each failure up to [`MAX_BACKOFF`].
const MIN_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// Connecting, TLS and the first replies must be done within this.
const SETUP_TIMEOUT: Duration = Duration::from_secs(3);
/// How long `stop` waits for the leave notice to go out.
const LEAVE_WAIT: Duration = Duration::from_millis(200);
/// Free space offered to each read (a TLS read needs room for a whole record twice over).
pub(crate) const READ_SPACE: usize = 64 << 10;
/// Reads per connection per wakeup, so that neither connection starves the other.
const READS_PER_TURN: usize = 16;
/// A buffer grown past this for one large message is given back once empty.
const KEEP_BUFFER: usize = 256 << 10;
/// The most other instances tracked; past it new ones are not counted.
const MAX_PEERS: usize = 65_536;
/// An instance silent for this many heartbeats leaves the counts.
const MISSED_HEARTBEATS: u32 = 3;
/// The longest topic sent or subscribed: a channel name must stay far below the 64 KiB
/// every receiver allows around a message.
pub(crate) const MAX_TOPIC: usize = 16 << 10;
/// The command head of every publish.
const PUBLISH_HEAD: &[u8] = b"*3\r\n$7\r\nPUBLISH\r\n";

/// The bridge's state as the loops see it (`ClusterStats::state`).
const CONNECTING: u8 = 0;
const UP: u8 = 1;
const DOWN: u8 = 2;

/// How `stop` ends the bridge.
const RUN: u8 = 0;
const STOP_LEAVE: u8 = 1;
/// Ends without a leave notice, as a killed process would (tests).
const HALT: u8 = 2;

/// The bus: the loops' side of the bridge thread.
pub(crate) struct Bus {
    shared: Arc<Shared>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

/// What the loops and the bridge share.
struct Shared {
    instance: u64,
    prefix: String,
    max_message: usize,
    queue_limit: usize,
    budget: Arc<Budget>,
    out: Mutex<Out>,
    waker: Waker,
    /// A wakeup is on its way: senders skip the system call.
    woken: AtomicBool,
    stop: AtomicU8,
    state: AtomicU8,
    /// Bytes charged for the queue and the part of it taken but not yet written.
    queued: AtomicUsize,
    remote_open: AtomicUsize,
    instances: AtomicUsize,
    /// The bridge's counters, copied out after each turn.
    counters: Mutex<Counters>,
    last_error: Mutex<Option<String>>,
    /// The largest read buffer the bridge held.
    read_buffer: AtomicUsize,
}

/// The queue towards Redis and the topics, under one mutex.
struct Out {
    /// Whether Redis is up: while not, messages are dropped rather than queued.
    up: bool,
    /// PUBLISH commands waiting for the bridge.
    buf: Vec<u8>,
    /// Messages (not heartbeats) in `buf`.
    msgs: u64,
    /// The last sequence number used on P:all.
    seq: u64,
    dropped_out: u64,
    /// Local subscribers per topic, over all loops.
    topics: HashMap<String, usize>,
    /// Topics to SUBSCRIBE (true) or UNSUBSCRIBE (false), in order.
    changes: Vec<(String, bool)>,
}

/// Counters only the bridge changes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Counters {
    published: u64,
    received: u64,
    dropped_in: u64,
    lost: u64,
    reconnects: u64,
    malformed: u64,
    attempts: u64,
    turns: u64,
}

/// What the bridge knows beyond the stats: for logs and tests.
#[derive(Clone, Debug, Default)]
pub(crate) struct Diagnostics {
    /// Why the last connection failed.
    pub(crate) last_error: Option<String>,
    /// Connection attempts so far.
    pub(crate) attempts: u64,
    /// Envelopes refused as malformed.
    pub(crate) malformed: u64,
    /// The largest read buffer held, in bytes.
    pub(crate) read_buffer: usize,
    /// Times the bridge woke up.
    pub(crate) turns: u64,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Shared {
    fn wake(&self) {
        if !self.woken.swap(true, Ordering::AcqRel) {
            let _ = self.waker.wake();
        }
    }

    /// Appends `PUBLISH channel envelope` to the queue if Redis is up and the queue and the
    /// budget have room for it.
    fn push(&self, out: &mut Out, channel: &[&[u8]], header: &[u8], payload: &[u8]) -> bool {
        if !out.up {
            return false;
        }
        let channel_len: usize = channel.iter().map(|c| c.len()).sum();
        let n = PUBLISH_HEAD.len() + resp::bulk_len(channel_len) + resp::bulk_len(header.len() + payload.len());
        if self.queued.load(Ordering::Acquire).saturating_add(n) > self.queue_limit
            || self.budget.used().saturating_add(n) > self.budget.limit()
        {
            return false;
        }
        out.buf.reserve(n);
        out.buf.extend_from_slice(PUBLISH_HEAD);
        resp::arg(&mut out.buf, channel);
        resp::arg(&mut out.buf, &[header, payload]);
        self.queued.fetch_add(n, Ordering::AcqRel);
        self.budget.add(n);
        true
    }

    /// Gives back the charge for `n` bytes written or thrown away.
    fn release(&self, n: usize) {
        if n > 0 {
            self.queued.fetch_sub(n, Ordering::AcqRel);
            self.budget.sub(n);
        }
    }

    fn channel(&self, suffix: &str) -> String {
        format!("{}:{suffix}", self.prefix)
    }
}

/// An instance id as its channel spells it.
fn hex16(v: u64) -> [u8; 16] {
    let mut out = [0u8; 16];
    for (i, b) in out.iter_mut().enumerate() {
        *b = b"0123456789abcdef"[(v >> (60 - 4 * i) & 0xf) as usize];
    }
    out
}

impl Bus {
    /// Spawns the bridge thread "wsloop-cluster". Fails only if the thread or its poll cannot
    /// be made: an unreachable Redis is logged (warn) and retried with backoff. `instance`
    /// must not be 0.
    pub(crate) fn start(
        cfg: &ClusterConfig,
        instance: u64,
        max_message: usize,
        budget: Arc<Budget>,
        inbound: Arc<dyn Inbound>,
    ) -> io::Result<Arc<Bus>> {
        if instance == 0 {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "cluster instance id 0"));
        }
        let poll = Poll::new()?;
        let waker = Waker::new(poll.registry(), WAKER)?;
        let shared = Arc::new(Shared {
            instance,
            prefix: cfg.prefix.clone(),
            max_message,
            queue_limit: cfg.queue_limit,
            budget,
            out: Mutex::new(Out {
                up: false,
                buf: Vec::new(),
                msgs: 0,
                seq: 0,
                dropped_out: 0,
                topics: HashMap::new(),
                changes: Vec::new(),
            }),
            waker,
            woken: AtomicBool::new(false),
            stop: AtomicU8::new(RUN),
            state: AtomicU8::new(CONNECTING),
            queued: AtomicUsize::new(0),
            remote_open: AtomicUsize::new(0),
            instances: AtomicUsize::new(0),
            counters: Mutex::new(Counters::default()),
            last_error: Mutex::new(None),
            read_buffer: AtomicUsize::new(0),
        });
        let now = Instant::now();
        let bridge = Bridge {
            shared: Arc::clone(&shared),
            inbound,
            url: cfg.url.clone(),
            #[cfg(feature = "tls")]
            tls: cfg.tls.clone(),
            heartbeat: cfg.heartbeat.max(Duration::from_millis(1)),
            poll,
            limits: Limits::for_messages(max_message),
            sub: None,
            publ: None,
            setup_deadline: None,
            reconnect_at: Some(now),
            backoff: MIN_BACKOFF,
            next_heartbeat: now,
            peers: HashMap::new(),
            open_sum: 0,
            ever_up: false,
            outage_logged: false,
            peers_full_logged: false,
            malformed_logged: false,
            last_reply_error_log: None,
            counters: Counters::default(),
            addr_turn: 0,
            all: shared.channel("all"),
            hb: shared.channel("hb"),
            own: format!("{}:i:{}", shared.prefix, String::from_utf8_lossy(&hex16(instance))),
            topic_prefix: shared.channel("t:"),
        };
        let thread = std::thread::Builder::new()
            .name("wsloop-cluster".to_string())
            .spawn(move || bridge.run())?;
        Ok(Arc::new(Bus {
            shared,
            thread: Mutex::new(Some(thread)),
        }))
    }

    /// This instance's id.
    pub(crate) fn instance(&self) -> u64 {
        self.shared.instance
    }

    /// Never blocks. Queues the message for Redis, or drops and counts it (Redis down, queue
    /// full, budget full, over the message limit, a topic longer than [`MAX_TOPIC`]). Returns whether it was queued. A message
    /// for a connection of this instance goes through Redis like any other: local delivery
    /// is the caller's.
    pub(crate) fn send(&self, target: Target<'_>, op: OpCode, payload: &[u8], except: Option<u128>) -> bool {
        let s = &*self.shared;
        let mut out = lock(&s.out);
        let too_long = matches!(target, Target::Topic(t) if t.len() > MAX_TOPIC);
        if too_long || payload.len() > s.max_message || !matches!(op, OpCode::Text | OpCode::Binary) {
            out.dropped_out += 1;
            return false;
        }
        let hex;
        let (kind, conn, channel): (Kind, u128, [&[u8]; 3]) = match target {
            Target::All => (
                Kind::Broadcast,
                except.unwrap_or(0),
                [s.prefix.as_bytes(), b":all", b""],
            ),
            Target::Topic(t) => (
                Kind::Publish,
                except.unwrap_or(0),
                [s.prefix.as_bytes(), b":t:", t.as_bytes()],
            ),
            Target::Conn(c) => {
                hex = hex16((c >> 64) as u64);
                (Kind::SendToOne, c, [s.prefix.as_bytes(), b":i:", &hex])
            }
        };
        let seq = if kind == Kind::Broadcast {
            out.seq.wrapping_add(1)
        } else {
            0
        };
        let header = wire::header(kind, Some(op), s.instance, seq, conn);
        let queued = kind != Kind::SendToOne || conn != 0;
        let queued = queued && s.push(&mut out, &channel, &header, payload);
        if queued {
            out.msgs += 1;
            if kind == Kind::Broadcast {
                out.seq = seq;
            }
        } else {
            out.dropped_out += 1;
        }
        drop(out);
        if queued {
            s.wake();
        }
        queued
    }

    /// A local connection joined `topic`: SUBSCRIBEs to it when it is the process's first.
    /// A topic longer than [`MAX_TOPIC`] stays local.
    pub(crate) fn topic_joined(&self, topic: &str) {
        if topic.len() > MAX_TOPIC {
            return;
        }
        let mut out = lock(&self.shared.out);
        if let Some(n) = out.topics.get_mut(topic) {
            *n += 1;
            return;
        }
        out.topics.insert(topic.to_string(), 1);
        out.changes.push((topic.to_string(), true));
        drop(out);
        self.shared.wake();
    }

    /// A local connection left `topic`: UNSUBSCRIBEs when it was the process's last.
    pub(crate) fn topic_left(&self, topic: &str) {
        let mut out = lock(&self.shared.out);
        let Some(n) = out.topics.get_mut(topic) else {
            return;
        };
        *n -= 1;
        if *n > 0 {
            return;
        }
        out.topics.remove(topic);
        out.changes.push((topic.to_string(), false));
        drop(out);
        self.shared.wake();
    }

    /// Open connections on the other live instances (the last heartbeat of each).
    pub(crate) fn remote_open(&self) -> usize {
        self.shared.remote_open.load(Ordering::Relaxed)
    }

    /// The counters and the state.
    pub(crate) fn stats(&self) -> ClusterStats {
        let s = &*self.shared;
        let c = *lock(&s.counters);
        let dropped_out = lock(&s.out).dropped_out;
        ClusterStats {
            state: match s.state.load(Ordering::Relaxed) {
                UP => ClusterState::Up,
                DOWN => ClusterState::Down,
                _ => ClusterState::Connecting,
            },
            published: c.published,
            received: c.received,
            dropped_out,
            dropped_in: c.dropped_in,
            lost: c.lost,
            reconnects: c.reconnects,
            queued: s.queued.load(Ordering::Relaxed),
            instances: s.instances.load(Ordering::Relaxed),
        }
    }

    /// Why the last connection failed, attempts, malformed envelopes, the read buffer's peak.
    pub(crate) fn diagnostics(&self) -> Diagnostics {
        let s = &*self.shared;
        let c = *lock(&s.counters);
        Diagnostics {
            last_error: lock(&s.last_error).clone(),
            attempts: c.attempts,
            malformed: c.malformed,
            read_buffer: s.read_buffer.load(Ordering::Relaxed),
            turns: c.turns,
        }
    }

    /// Sends a leave notice if it can (waiting at most 200 ms for it to go out), stops and
    /// joins the thread. Later calls do nothing.
    pub(crate) fn stop(&self) {
        self.end(STOP_LEAVE);
    }

    /// Stops like [`Bus::stop`]; whether the thread ended without a panic.
    #[cfg(test)]
    pub(crate) fn stop_cleanly(&self) -> bool {
        self.end(STOP_LEAVE)
    }

    /// Stops without a leave notice, as if the process were killed.
    #[cfg(test)]
    pub(crate) fn halt(&self) -> bool {
        self.end(HALT)
    }

    /// Whether the thread ended without a panic (true when it had ended before).
    fn end(&self, how: u8) -> bool {
        let Some(thread) = lock(&self.thread).take() else {
            return true;
        };
        let s = &*self.shared;
        {
            let mut out = lock(&s.out);
            if how == STOP_LEAVE {
                let header = wire::header(Kind::Leave, None, s.instance, 0, 0);
                s.push(&mut out, &[s.prefix.as_bytes(), b":hb"], &header, &[]);
            }
            out.up = false;
        }
        s.stop.store(how, Ordering::Release);
        let _ = s.waker.wake();
        thread.join().is_ok()
    }
}

impl Drop for Bus {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A read buffer: bytes `start..end` of `data` are received and not yet decoded.
struct RecvBuf {
    data: Vec<u8>,
    start: usize,
    end: usize,
}

impl RecvBuf {
    fn new() -> RecvBuf {
        RecvBuf {
            data: Vec::new(),
            start: 0,
            end: 0,
        }
    }

    /// Room for the next read: at least [`READ_SPACE`] bytes, the buffer at most `max` (or
    /// what it holds plus that room). The decoder refuses any value longer than
    /// `limits.total` before waiting for it, so what is held stays within it, and `max` is
    /// `limits.total + READ_SPACE`.
    fn space(&mut self, max: usize) -> &mut [u8] {
        if self.data.len() - self.end < READ_SPACE {
            if self.start > 0 {
                self.data.copy_within(self.start..self.end, 0);
                self.end -= self.start;
                self.start = 0;
            }
            if self.data.len() - self.end < READ_SPACE {
                let need = self.end + READ_SPACE;
                let grown = self.data.len().saturating_mul(2).min(max).max(need);
                self.data.resize(grown, 0);
            }
        }
        &mut self.data[self.end..]
    }

    /// Everything decoded: back to the start, and a buffer grown for a large message goes.
    fn consumed_all(&mut self) {
        self.start = 0;
        self.end = 0;
        if self.data.len() > KEEP_BUFFER {
            self.data = Vec::new();
        }
    }
}

/// One connection to Redis.
struct Link {
    stream: ClientStream,
    connected: bool,
    rbuf: RecvBuf,
    wbuf: Vec<u8>,
    wpos: usize,
    /// Whether `wbuf` came from the queue (its bytes are charged).
    charged: bool,
    /// Messages in `wbuf` (counted as published once written).
    msgs: u64,
    /// The commands whose replies are still awaited before the link is ready.
    setup: std::collections::VecDeque<&'static str>,
    ready: bool,
    /// More may be waiting to be read (the last turn stopped at its limit).
    more: bool,
}

/// A peer instance, from its envelopes.
struct Peer {
    open: u64,
    last_seen: Instant,
    last_seq: Option<u64>,
}

/// The bridge thread's state.
struct Bridge {
    shared: Arc<Shared>,
    inbound: Arc<dyn Inbound>,
    url: RedisUrl,
    #[cfg(feature = "tls")]
    tls: Option<crate::tls::ClientTls>,
    heartbeat: Duration,
    poll: Poll,
    limits: Limits,
    sub: Option<Link>,
    publ: Option<Link>,
    /// While connecting: when to give up on this attempt.
    setup_deadline: Option<Instant>,
    /// While down: when to try again.
    reconnect_at: Option<Instant>,
    backoff: Duration,
    next_heartbeat: Instant,
    peers: HashMap<u64, Peer>,
    /// The sum of the peers' open connections (wide enough for any heartbeats).
    open_sum: u128,
    ever_up: bool,
    /// The outage was logged (once per outage).
    outage_logged: bool,
    peers_full_logged: bool,
    malformed_logged: bool,
    last_reply_error_log: Option<Instant>,
    counters: Counters,
    addr_turn: usize,
    all: String,
    hb: String,
    own: String,
    topic_prefix: String,
}

/// Why a connection is given up: one line for the log.
type Failure = String;

impl Bridge {
    fn run(mut self) {
        let mut events = Events::with_capacity(16);
        loop {
            let stop = self.shared.stop.load(Ordering::Acquire);
            if stop != RUN {
                if stop == STOP_LEAVE {
                    self.send_leave();
                }
                self.close(None);
                self.publish_counters();
                return;
            }
            let timeout = self.timeout();
            if let Err(e) = self.poll.poll(&mut events, timeout) {
                if e.kind() != io::ErrorKind::Interrupted {
                    log::error!("cluster: poll failed: {e}; the bus stops");
                    self.close(None);
                    self.shared.state.store(DOWN, Ordering::Relaxed);
                    self.publish_counters();
                    return;
                }
            }
            for ev in events.iter() {
                let link = match ev.token() {
                    SUB => self.sub.as_mut(),
                    PUB => self.publ.as_mut(),
                    _ => None,
                };
                if let Some(link) = link {
                    link.more = true;
                }
            }
            self.counters.turns += 1;
            self.shared.woken.store(false, Ordering::Release);
            if let Err(why) = self.turn() {
                self.close(Some(why));
            }
            self.timers();
            self.publish_counters();
        }
    }

    /// One pass over both connections: connect progress, reads, the topic changes, writes.
    fn turn(&mut self) -> Result<(), Failure> {
        if self.sub.is_none() {
            // Topic changes while down are covered by the full subscribe on reconnect.
            lock(&self.shared.out).changes.clear();
            return Ok(());
        }
        for which in [SUB, PUB] {
            self.pump(which)?;
        }
        self.subscriptions();
        for which in [SUB, PUB] {
            self.flush(which)?;
        }
        if self.setup_deadline.is_some()
            && self.sub.as_ref().is_some_and(|l| l.ready)
            && self.publ.as_ref().is_some_and(|l| l.ready)
        {
            self.up();
        }
        Ok(())
    }

    fn link(&mut self, which: Token) -> Option<&mut Link> {
        if which == SUB {
            self.sub.as_mut()
        } else {
            self.publ.as_mut()
        }
    }

    /// Connect progress and reads for one connection.
    fn pump(&mut self, which: Token) -> Result<(), Failure> {
        let Some(link) = self.link(which) else {
            return Ok(());
        };
        if !link.connected {
            match crate::io::connect::finished(link.stream.tcp()) {
                Ok(true) => link.connected = true,
                Ok(false) => return Ok(()),
                Err(e) => return Err(e.to_string()),
            }
        }
        if !link.more {
            return Ok(());
        }
        link.more = false;
        let mut rbuf = std::mem::replace(&mut link.rbuf, RecvBuf::new());
        let r = self.read(which, &mut rbuf);
        if let Some(link) = self.link(which) {
            link.rbuf = rbuf;
        }
        r
    }

    fn read(&mut self, which: Token, rbuf: &mut RecvBuf) -> Result<(), Failure> {
        let max = self.limits.total.saturating_add(READ_SPACE);
        for _ in 0..READS_PER_TURN {
            let Some(link) = self.link(which) else {
                return Ok(());
            };
            let n = match link.stream.read(rbuf.space(max)) {
                Ok(0) => return Err("redis closed the connection".to_string()),
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e.to_string()),
            };
            rbuf.end += n;
            self.shared.read_buffer.fetch_max(rbuf.data.len(), Ordering::Relaxed);
            loop {
                match resp::decode(&rbuf.data[rbuf.start..rbuf.end], &self.limits) {
                    Err(e) => return Err(e.to_string()),
                    Ok(Decoded::Partial) => break,
                    Ok(Decoded::Value(v, used)) => {
                        if which == SUB {
                            self.on_sub_reply(v)?;
                        } else {
                            self.on_pub_reply(v)?;
                        }
                        rbuf.start += used;
                    }
                }
            }
            if rbuf.start == rbuf.end {
                rbuf.consumed_all();
            }
        }
        // Stopped at the limit: come back without waiting for an event.
        if let Some(link) = self.link(which) {
            link.more = true;
        }
        Ok(())
    }

    fn on_pub_reply(&mut self, v: Value<'_>) -> Result<(), Failure> {
        let Some(link) = self.publ.as_mut() else {
            return Ok(());
        };
        if let Some(cmd) = link.setup.pop_front() {
            if let Value::Error(e) = v {
                return Err(format!("redis refused {cmd}: {}", String::from_utf8_lossy(e)));
            }
            link.ready = link.setup.is_empty();
            return Ok(());
        }
        if let Value::Error(e) = v {
            self.reply_error("PUBLISH", e);
        }
        Ok(())
    }

    fn on_sub_reply(&mut self, v: Value<'_>) -> Result<(), Failure> {
        let Some(link) = self.sub.as_mut() else {
            return Ok(());
        };
        match v {
            Value::Error(e) if !link.ready => {
                let cmd = link.setup.pop_front().unwrap_or("SUBSCRIBE");
                Err(format!("redis refused {cmd}: {}", String::from_utf8_lossy(e)))
            }
            Value::Error(e) => {
                self.reply_error("SUBSCRIBE", e);
                Ok(())
            }
            Value::Array(Some(items)) => match items.as_slice() {
                [Value::Bulk(Some(b"message")), Value::Bulk(Some(channel)), Value::Bulk(Some(payload))] => {
                    self.on_message(channel, payload);
                    Ok(())
                }
                [Value::Bulk(Some(b"subscribe")), ..] => {
                    link.setup.clear();
                    link.ready = true;
                    Ok(())
                }
                _ => Ok(()),
            },
            _ => {
                link.setup.pop_front();
                Ok(())
            }
        }
    }

    /// An error reply after setup: logged, at most every 10 seconds.
    fn reply_error(&mut self, cmd: &str, e: &[u8]) {
        let now = Instant::now();
        if self
            .last_reply_error_log
            .is_none_or(|t| now.duration_since(t) >= Duration::from_secs(10))
        {
            self.last_reply_error_log = Some(now);
            log::warn!(
                "cluster: redis {} answered {cmd} with an error: {}",
                self.url.authority(),
                String::from_utf8_lossy(e)
            );
        }
    }

    fn malformed(&mut self, why: &str) {
        self.counters.malformed += 1;
        if !self.malformed_logged {
            self.malformed_logged = true;
            log::warn!("cluster: dropped a malformed message from redis: {why} (logged once)");
        } else {
            log::debug!("cluster: dropped a malformed message from redis: {why}");
        }
    }

    fn on_message(&mut self, channel: &[u8], payload: &[u8]) {
        let env = match wire::decode(payload, self.shared.max_message) {
            Ok(env) => env,
            Err(e) => return self.malformed(e.0),
        };
        if env.origin == self.shared.instance {
            return;
        }
        let now = Instant::now();
        let known = self.peers.len() < MAX_PEERS || self.peers.contains_key(&env.origin);
        if !known && !self.peers_full_logged {
            self.peers_full_logged = true;
            log::warn!("cluster: more than {MAX_PEERS} other instances; the new ones are not counted (logged once)");
        }
        let op = env.op.unwrap_or(OpCode::Binary);
        let except = (env.conn != 0).then_some(env.conn);
        let missed = match env.kind {
            Kind::Heartbeat | Kind::Leave => {
                if env.kind == Kind::Leave {
                    if let Some(p) = self.peers.remove(&env.origin) {
                        self.open_sum -= u128::from(p.open);
                    }
                } else if known {
                    let p = self.peers.entry(env.origin).or_insert(Peer {
                        open: 0,
                        last_seen: now,
                        last_seq: None,
                    });
                    self.open_sum = self.open_sum - u128::from(p.open) + u128::from(env.open());
                    p.open = env.open();
                    p.last_seen = now;
                }
                self.publish_peers();
                return;
            }
            Kind::Broadcast => {
                if channel != self.all.as_bytes() {
                    return self.malformed("a broadcast on another channel");
                }
                if known {
                    let p = self.peers.entry(env.origin).or_insert(Peer {
                        open: 0,
                        last_seen: now,
                        last_seq: None,
                    });
                    if let Some(last) = p.last_seq {
                        if env.seq > last {
                            self.counters.lost = self.counters.lost.saturating_add(env.seq - last - 1);
                        }
                    }
                    p.last_seq = Some(env.seq);
                    p.last_seen = now;
                    self.publish_peers();
                }
                self.inbound.deliver(Target::All, op, env.payload, except)
            }
            Kind::Publish => {
                let topic = channel
                    .strip_prefix(self.topic_prefix.as_bytes())
                    .and_then(|t| std::str::from_utf8(t).ok());
                let Some(topic) = topic else {
                    return self.malformed("a publish on a channel that is not a topic");
                };
                self.touch(env.origin, now);
                self.inbound.deliver(Target::Topic(topic), op, env.payload, except)
            }
            Kind::SendToOne => {
                if (env.conn >> 64) as u64 != self.shared.instance {
                    return self.malformed("a message for a connection of another instance");
                }
                self.touch(env.origin, now);
                self.inbound.deliver(Target::Conn(env.conn), op, env.payload, None)
            }
        };
        self.counters.received += 1;
        self.counters.dropped_in += missed as u64;
    }

    /// Any envelope proves its origin alive.
    fn touch(&mut self, origin: u64, now: Instant) {
        if let Some(p) = self.peers.get_mut(&origin) {
            p.last_seen = now;
        }
    }

    fn publish_peers(&self) {
        self.shared.instances.store(self.peers.len(), Ordering::Relaxed);
        let open = usize::try_from(self.open_sum).unwrap_or(usize::MAX);
        self.shared.remote_open.store(open, Ordering::Relaxed);
    }

    fn publish_counters(&self) {
        let mut c = lock(&self.shared.counters);
        if *c != self.counters {
            *c = self.counters;
        }
    }

    /// SUBSCRIBE / UNSUBSCRIBE for the topics that changed.
    fn subscriptions(&mut self) {
        let changes = std::mem::take(&mut lock(&self.shared.out).changes);
        let Some(link) = self.sub.as_mut() else {
            return;
        };
        for (topic, join) in changes {
            let cmd: &[u8] = if join { b"SUBSCRIBE" } else { b"UNSUBSCRIBE" };
            resp::array_header(&mut link.wbuf, 2);
            resp::arg(&mut link.wbuf, &[cmd]);
            resp::arg(&mut link.wbuf, &[self.topic_prefix.as_bytes(), topic.as_bytes()]);
        }
    }

    /// Writes what one connection has to write; the publisher takes the queue once its
    /// buffer is out.
    fn flush(&mut self, which: Token) -> Result<(), Failure> {
        let shared = &*self.shared;
        let link = if which == SUB {
            self.sub.as_mut()
        } else {
            self.publ.as_mut()
        };
        let Some(link) = link else {
            return Ok(());
        };
        if !link.connected {
            return Ok(());
        }
        link.stream.flush_pending().map_err(|e| e.to_string())?;
        loop {
            if link.wpos == link.wbuf.len() {
                if link.charged {
                    self.counters.published += link.msgs;
                    link.msgs = 0;
                    link.charged = false;
                }
                link.wbuf.clear();
                link.wpos = 0;
                if link.wbuf.capacity() > KEEP_BUFFER {
                    link.wbuf = Vec::new();
                }
                if which != PUB || !link.ready {
                    return Ok(());
                }
                let mut out = lock(&shared.out);
                if out.buf.is_empty() {
                    return Ok(());
                }
                std::mem::swap(&mut out.buf, &mut link.wbuf);
                link.msgs = std::mem::take(&mut out.msgs);
                link.charged = true;
            }
            match link.stream.write(&link.wbuf[link.wpos..]) {
                Ok(0) => return Err("redis stopped taking data".to_string()),
                Ok(n) => {
                    link.wpos += n;
                    if link.charged {
                        shared.release(n);
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e.to_string()),
            }
        }
    }

    /// How long the poll may wait.
    fn timeout(&self) -> Option<Duration> {
        let now = Instant::now();
        if self.sub.as_ref().is_some_and(|l| l.more) || self.publ.as_ref().is_some_and(|l| l.more) {
            return Some(Duration::ZERO);
        }
        let mut next = self.next_heartbeat;
        for t in [self.setup_deadline, self.reconnect_at].into_iter().flatten() {
            next = next.min(t);
        }
        Some(next.saturating_duration_since(now))
    }

    fn timers(&mut self) {
        let now = Instant::now();
        if self.reconnect_at.is_some_and(|t| t <= now) {
            self.reconnect_at = None;
            if let Err(why) = self.connect() {
                self.close(Some(why));
            } else if let Err(why) = self.turn() {
                self.close(Some(why));
            }
        }
        if self.setup_deadline.is_some_and(|t| t <= now) {
            self.close(Some(format!("no answer within {} s", SETUP_TIMEOUT.as_secs())));
        }
        if self.next_heartbeat <= now {
            self.next_heartbeat = now + self.heartbeat;
            self.heartbeat_tick(now);
        }
    }

    /// Sends this instance's heartbeat and forgets the instances silent for too long.
    fn heartbeat_tick(&mut self, now: Instant) {
        let s = &*self.shared;
        let open = self.inbound.local_open() as u64;
        let header = wire::header(Kind::Heartbeat, None, s.instance, 0, 0);
        if s.push(
            &mut lock(&s.out),
            &[s.prefix.as_bytes(), b":hb"],
            &header,
            &open.to_be_bytes(),
        ) {
            s.wake();
        }
        let silent = self.heartbeat * MISSED_HEARTBEATS;
        let before = self.peers.len();
        let mut gone = 0u128;
        self.peers.retain(|_, p| {
            let keep = now.duration_since(p.last_seen) <= silent;
            if !keep {
                gone += u128::from(p.open);
            }
            keep
        });
        if self.peers.len() != before {
            self.open_sum -= gone;
            self.publish_peers();
        }
    }

    /// Starts both connections with their first commands.
    fn connect(&mut self) -> Result<(), Failure> {
        self.counters.attempts += 1;
        let addrs: Vec<SocketAddr> = (self.url.host(), self.url.port())
            .to_socket_addrs()
            .map_err(|e| format!("cannot resolve {}: {e}", self.url.host()))?
            .collect();
        if addrs.is_empty() {
            return Err(format!("{} has no address", self.url.host()));
        }
        let addr = addrs[self.addr_turn % addrs.len()];
        self.addr_turn = self.addr_turn.wrapping_add(1);

        let mut auth = Vec::new();
        let mut setup = std::collections::VecDeque::new();
        match (self.url.user(), self.url.password()) {
            (Some(u), Some(p)) => resp::command(&mut auth, &[b"AUTH", u.as_bytes(), p.as_bytes()]),
            (None, Some(p)) => resp::command(&mut auth, &[b"AUTH", p.as_bytes()]),
            _ => {}
        }
        if !auth.is_empty() {
            setup.push_back("AUTH");
        }
        if self.url.db() != 0 {
            resp::command(&mut auth, &[b"SELECT", self.url.db().to_string().as_bytes()]);
            setup.push_back("SELECT");
        }

        let mut sub_cmds = auth.clone();
        let mut sub_setup = setup.clone();
        {
            let mut out = lock(&self.shared.out);
            out.changes.clear();
            resp::array_header(&mut sub_cmds, 4 + out.topics.len());
            resp::arg(&mut sub_cmds, &[b"SUBSCRIBE"]);
            for ch in [&self.all, &self.hb, &self.own] {
                resp::arg(&mut sub_cmds, &[ch.as_bytes()]);
            }
            for t in out.topics.keys() {
                resp::arg(&mut sub_cmds, &[self.topic_prefix.as_bytes(), t.as_bytes()]);
            }
        }
        sub_setup.push_back("SUBSCRIBE");
        let mut pub_cmds = auth;
        resp::command(&mut pub_cmds, &[b"PING"]);
        setup.push_back("PING");

        let sub = self.open(addr, SUB, sub_cmds, sub_setup)?;
        self.sub = Some(sub);
        let publ = self.open(addr, PUB, pub_cmds, setup)?;
        self.publ = Some(publ);
        self.setup_deadline = Some(Instant::now() + SETUP_TIMEOUT);
        Ok(())
    }

    fn open(
        &mut self,
        addr: SocketAddr,
        token: Token,
        cmds: Vec<u8>,
        setup: std::collections::VecDeque<&'static str>,
    ) -> Result<Link, Failure> {
        let tcp = crate::io::connect::start(addr, None).map_err(|e| e.to_string())?;
        let mut stream = self.wrap(tcp)?;
        self.poll
            .registry()
            .register(&mut stream, token, Interest::READABLE | Interest::WRITABLE)
            .map_err(|e| e.to_string())?;
        Ok(Link {
            stream,
            connected: false,
            rbuf: RecvBuf::new(),
            wbuf: cmds,
            wpos: 0,
            charged: false,
            msgs: 0,
            setup,
            ready: false,
            // Nothing to read before an event says so (the connect's own, first).
            more: false,
        })
    }

    #[cfg(feature = "tls")]
    fn wrap(&mut self, tcp: mio::net::TcpStream) -> Result<ClientStream, Failure> {
        if !self.url.is_tls() {
            return Ok(ClientStream::Plain(tcp));
        }
        if self.tls.is_none() {
            self.tls = Some(crate::tls::ClientTls::system_roots().map_err(|e| e.to_string())?);
        }
        let tls = self.tls.as_ref().expect("set above");
        let session = tls.session(self.url.host()).map_err(|e| e.to_string())?;
        Ok(ClientStream::Tls(crate::io::tls::TlsStream::new(tcp, session)))
    }

    #[cfg(not(feature = "tls"))]
    fn wrap(&mut self, tcp: mio::net::TcpStream) -> Result<ClientStream, Failure> {
        Ok(ClientStream::Plain(tcp))
    }

    /// Both connections are ready: messages may flow.
    fn up(&mut self) {
        self.setup_deadline = None;
        self.backoff = MIN_BACKOFF;
        if self.ever_up {
            self.counters.reconnects += 1;
        }
        self.ever_up = true;
        self.outage_logged = false;
        lock(&self.shared.out).up = true;
        self.shared.state.store(UP, Ordering::Relaxed);
        *lock(&self.shared.last_error) = None;
        log::info!(
            "cluster: connected to redis {} as instance {}",
            self.url.authority(),
            String::from_utf8_lossy(&hex16(self.shared.instance))
        );
        // Let the others count this instance now rather than a heartbeat from now.
        self.next_heartbeat = Instant::now();
    }

    /// Drops both connections and everything queued; with a reason, schedules a retry.
    fn close(&mut self, why: Option<Failure>) {
        for link in [self.sub.take(), self.publ.take()].into_iter().flatten() {
            let mut link = link;
            let _ = self.poll.registry().deregister(&mut link.stream);
            if link.charged {
                self.shared.release(link.wbuf.len() - link.wpos);
                lock(&self.shared.out).dropped_out += link.msgs;
            }
        }
        {
            let mut out = lock(&self.shared.out);
            out.up = false;
            let n = out.buf.len();
            self.shared.release(n);
            out.buf = Vec::new();
            out.dropped_out += std::mem::take(&mut out.msgs);
            out.changes.clear();
        }
        self.setup_deadline = None;
        let Some(why) = why else {
            return;
        };
        self.shared
            .state
            .store(if self.ever_up { DOWN } else { CONNECTING }, Ordering::Relaxed);
        if !self.outage_logged {
            self.outage_logged = true;
            log::warn!(
                "cluster: redis {} unreachable: {why}; serving locally, retrying",
                self.url.authority()
            );
        } else {
            log::debug!("cluster: redis {}: {why}", self.url.authority());
        }
        *lock(&self.shared.last_error) = Some(why);
        self.reconnect_at = Some(Instant::now() + self.backoff);
        self.backoff = (self.backoff * 2).min(MAX_BACKOFF);
    }

    /// Writes the leave notice `stop` queued, waiting at most [`LEAVE_WAIT`].
    fn send_leave(&mut self) {
        if !self.publ.as_ref().is_some_and(|l| l.ready) {
            return;
        }
        // `stop` closed the queue after adding the notice: it is out once the queue is empty.
        let deadline = Instant::now() + LEAVE_WAIT;
        let mut events = Events::with_capacity(4);
        loop {
            if self.flush(PUB).is_err() {
                return;
            }
            let done =
                self.publ.as_ref().is_none_or(|l| l.wpos == l.wbuf.len()) && lock(&self.shared.out).buf.is_empty();
            let left = deadline.saturating_duration_since(Instant::now());
            if done || left.is_zero() {
                return;
            }
            let _ = self.poll.poll(&mut events, Some(left));
        }
    }
}
