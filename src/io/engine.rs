//! Many connections on one poll loop: the part of a loop that is the same for the server
//! (accepted connections) and the load generator (opened connections).
//!
//! Connections live in a slab; a connection's token is its slab key. Removing a connection is
//! deferred to the end of the loop turn ([`Engine::reap`]), so a key is never reused while
//! events of the same `poll` batch may still name it, and a stale event cannot reach a new
//! connection. That holds for any `usize` width: nothing is packed into the token.
//!
//! The engine reads into one buffer shared by every connection, hands the bytes to each
//! connection's sans-IO [`Connection`], and gives the events to a [`Driver`]. Everything a
//! connection answers while its bytes are processed (protocol replies and the driver's own
//! sends to it) collects in one buffer and goes out in one write. Bytes the transport does not
//! take wait in an [`Outbox`] that exists only while they wait; past
//! [`Engine::max_backpressure`] the engine stops reading from that peer until its queue drains.
//!
//! On a server, one wakeup does a bounded amount of work for one connection ([`QUANTUM`]:
//! messages handled, connections a broadcast looked at, bytes read, inflated and compressed).
//! A connection whose work runs out with input left goes to the ready list, with the rest of
//! its last read: epoll is edge-triggered and will not tell again, so the list is what brings it
//! back. Its socket is not read until its turn there; the loop meanwhile polls without waiting,
//! and serves accepts, handshakes, timers and every other connection before it.

use std::io;
use std::sync::Arc;

use mio::{Interest, Poll, Token};
use slab::Slab;

use super::budget::{Budget, SharedFrame, Verdict};
use super::outbox::{self, Outbox};
use super::timer::{Clock, TimerQueue};
use super::transport::{SlotStream, Transport};
use crate::proto::{self, Connection, Event, Message, NotOpen, RandomSource, Role, State, Timeout};

// Slot flags.
/// Registered for WRITABLE.
const WRITE_INTEREST: u16 = 1;
/// Registered without READABLE.
const READ_OFF: u16 = 2;
/// Backpressure: not reading until the queue drains.
const READ_PAUSED: u16 = 4;
/// Our FIN is sent.
const SHUT_WR: u16 = 8;
/// Removed at the end of this turn.
const DEAD: u16 = 16;
/// The peer's FIN arrived; only writing goes on.
const EOF: u16 = 32;
/// The TCP connect is in progress.
const CONNECTING: u16 = 64;
/// The memory budget is short and this connection holds more than its share: not reading.
const MEM_PAUSED: u16 = 128;
/// Its wakeup's work is used up with input left: it is in the ready list, and its socket is not
/// read until its turn there comes.
const READ_MORE: u16 = 256;
/// Any of these: the connection is not read from now.
const NOT_READING: u16 = DEAD | READ_PAUSED | EOF | CONNECTING | MEM_PAUSED | READ_MORE;

/// One connection. Kept small: for the server this is what an idle connection costs.
pub(crate) struct Slot<T, P> {
    pub(crate) stream: T,
    pub(crate) conn: Connection,
    pub(crate) out: Option<Box<Outbox>>,
    /// Distinguishes this connection from earlier ones in the same slot.
    pub(crate) gen: u32,
    /// The deadline queued for this slot (low 32 bits of the clock), 0 for none.
    armed: u32,
    flags: u16,
    /// The driver's per-connection data.
    pub(crate) data: P,
}

impl<T, P> Slot<T, P> {
    /// Unsent: the bytes waiting to be written.
    pub(crate) fn unsent(&self) -> usize {
        self.out.as_ref().map_or(0, |o| o.len())
    }

    /// Backlog: the memory the outbound queue keeps alive (its entries, buffers and shared
    /// frames), what the per-peer bound ([`Engine::max_backpressure`]) counts.
    pub(crate) fn backlog(&self) -> usize {
        self.out.as_ref().map_or(0, |o| o.held())
    }

    /// Charge: the memory this connection holds against the budget (shared frames count by
    /// themselves).
    #[inline]
    fn charge(&self) -> usize {
        self.conn.buffered_bytes() + self.out.as_ref().map_or(0, |o| o.charge())
    }

    /// What the budget weighs when it picks whom to pause and close: the charge and what the
    /// transport holds for the peer (a TLS record received in part, ciphertext not yet sent),
    /// which the transport counts against the budget itself.
    #[inline]
    fn weight(&self, key: usize, streams: &T::Loop) -> usize
    where
        T: SlotStream,
    {
        self.charge() + self.stream.held(key, streams)
    }

    /// Whether the connection is being removed.
    pub(crate) fn is_dead(&self) -> bool {
        self.flags & DEAD != 0
    }
}

/// Why a connection was removed.
#[derive(Debug)]
pub(crate) enum Cause {
    /// The close handshake is over and the stream ended.
    Done,
    /// The peer ended or reset the stream.
    Eof,
    /// Reading or writing failed.
    Io(io::Error),
    /// A deadline ran out (handshake or close).
    Timeout(Timeout),
    /// The driver removed it.
    Dropped,
}

/// What a change to one connection may use, lent by the engine for the call to
/// [`Engine::with_conn`] (never stored: a slot stays as small as it is).
pub(crate) struct Cx<'a, R, L> {
    pub(crate) cfg: &'a proto::Config,
    /// The clock at the start of this turn.
    pub(crate) now: u64,
    pub(crate) rng: &'a mut R,
    /// Where the connection's output goes: written (or queued) when the change is over.
    pub(crate) out: &'a mut Vec<u8>,
    /// The loop's permessage-deflate codec (zero-sized without the `deflate` feature).
    pub(crate) codec: &'a mut proto::deflate::Codec,
    /// What the loop's streams share (see [`SlotStream`]): a stream's IO goes through
    /// `slot.stream.io(key, cx.streams)`.
    pub(crate) streams: &'a mut L,
    /// Set when the change ends the connection: it is removed with this cause.
    pub(crate) end: Option<Cause>,
}

/// A connection the budget could not hold: closed with this code.
pub(crate) const SHED_CODE: u16 = proto::close_code::TRY_AGAIN_LATER;

/// Keys in the timer queue, in one word (a heap entry is 16 bytes): a connection's deadline
/// (its slot key and generation), one of the driver's own (top bit set), or the engine's.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct TimerKey(u64);

const DRIVER_TIMER: u64 = 1 << 63;
/// Give freed memory back to the operating system.
const TRIM_TIMER: u64 = 1 << 62;
/// Look at connections paused for memory.
const STALL_TIMER: u64 = (1 << 62) | 1;

impl TimerKey {
    fn conn(key: usize, gen: u32) -> TimerKey {
        TimerKey((u64::from(gen) << 32) | (key as u64 & 0xFFFF_FFFF))
    }
}

/// What the engine tells a driver.
pub(crate) trait Driver<T: SlotStream, P, R> {
    /// Connection `key` produced an event other than a message (those go to
    /// [`on_message`](Self::on_message)). A server answers [`Event::Request`] with
    /// [`Engine::accept`] before returning.
    fn on_event(&mut self, eng: &mut Engine<T, P, R>, key: usize, ev: Event<'_>);
    /// Connection `key` received a message. The engine calls this from one place for every
    /// message, so that a driver's message path can be inlined there; the default hands it to
    /// [`on_event`](Self::on_event) as [`Event::Message`].
    #[inline]
    fn on_message(&mut self, eng: &mut Engine<T, P, R>, key: usize, payload: proto::Payload<'_>) {
        self.on_event(eng, key, Event::Message(payload));
    }
    /// The protocol core failed the connection (what the peer is told is already queued).
    fn on_error(&mut self, eng: &mut Engine<T, P, R>, key: usize, err: &proto::Error);
    /// A deadline did something (a ping, an idle close; or the end, followed by `on_removed`).
    fn on_timeout(&mut self, eng: &mut Engine<T, P, R>, key: usize, t: Timeout) {
        let _ = (eng, key, t);
    }
    /// A TCP connect completed (connections added with [`Engine::insert_connecting`]).
    fn on_connected(&mut self, eng: &mut Engine<T, P, R>, key: usize) {
        let _ = (eng, key);
    }
    /// The connection is being removed; its slot is still readable.
    fn on_removed(&mut self, eng: &mut Engine<T, P, R>, key: usize, cause: Cause);
    /// A driver timer set with [`Engine::set_timer_at`] came due.
    fn on_timer(&mut self, eng: &mut Engine<T, P, R>, id: u64);
    /// The budget could not hold this open connection: it is being closed with `SHED_CODE`.
    fn on_shed(&mut self, eng: &mut Engine<T, P, R>, key: usize) {
        let _ = (eng, key);
    }
    /// Bytes were read from connection `key`, before the core sees them (the client shows the
    /// handshake answer as it came).
    fn on_read(&mut self, key: usize, data: &[u8]) {
        let _ = (key, data);
    }
    /// The peer ended the stream or reading failed; the connection's state is still what it
    /// was (the engine closes it next), so a driver can tell what the end cut short.
    fn on_hangup(&mut self, eng: &mut Engine<T, P, R>, key: usize) {
        let _ = (eng, key);
    }
}

/// No key: the cork is not in use.
const NONE: usize = usize::MAX;

/// Unsent output buffers larger than this are not kept for reuse.
const KEEP_BUFFER: usize = 64 << 10;

/// Messages this large are written from where their payload lies, behind their header, with
/// one vectored write; smaller ones are copied into the output, where several replies to one
/// read share a single write. At 16 KiB with 8 messages in flight the copy still won (1.08 to
/// 1.16× the echoes per server CPU-second); at 32 KiB the two were even, at 64 KiB the direct
/// write won (docs/performance.md, "Large messages without a copy").
const DIRECT_FROM: usize = 32 << 10;

/// A server connection's work per wakeup, in units: a message handled, a connection a
/// broadcast or publish looked at, 256 bytes read, inflated or compressed (a broadcast to 100
/// peers costs about 100; this many take about half a millisecond). Then the connection waits
/// in the ready list while accepts, handshakes, timers and every other connection get their
/// turn.
pub(crate) const QUANTUM: usize = 8192;

/// The work the ready list gets per loop turn, in quanta, before the loop looks at new events.
const READY_PER_TURN: usize = 4;

/// A connection whose wakeup's work ran out with input left: the bytes of its last read not yet
/// handled (`buf[pos..]`, counted against the budget), and whether its peer's FIN (or an
/// error) has been seen since.
struct Ready {
    key: usize,
    gen: u32,
    buf: Vec<u8>,
    pos: usize,
    hup: bool,
}

/// The connections of one loop and what they share.
pub(crate) struct Engine<T: SlotStream, P, R> {
    pub(crate) poll: Poll,
    pub(crate) slots: Slab<Slot<T, P>>,
    /// What the connections' streams share (a TLS server loop's sessions, by slot): owned
    /// here, so that it lives as long as the slots and each slot's part leaves with it.
    pub(crate) streams: T::Loop,
    pub(crate) cfg: proto::Config,
    pub(crate) clock: Clock,
    /// The clock at the start of this turn.
    pub(crate) now: u64,
    timers: TimerQueue<TimerKey>,
    /// Masks and keys for client connections (servers pass one that is never used).
    pub(crate) rng: R,
    /// The backlog per connection above which reading from it pauses.
    pub(crate) max_backpressure: usize,
    /// The protocol settings time open connections (ping or idle timeout).
    timed_open: bool,
    /// Output for the connection whose bytes are being processed (`corked`).
    cork: Vec<u8>,
    corked: usize,
    /// Frames encoded for other connections.
    scratch: Vec<u8>,
    dead: Vec<(usize, Cause)>,
    next_gen: u32,
    /// What every connection holds, against the limit.
    pub(crate) budget: Arc<Budget>,
    /// Connections not read from until the budget recovers, and since when: in the order they
    /// were paused, so that the ones paused longest are at the front.
    mem_paused: std::collections::VecDeque<(usize, u32, u64)>,
    /// Connections to close for the budget at the end of the turn.
    shed: Vec<(usize, u32)>,
    /// Memory freed since the last trim, and when that was.
    freed: usize,
    last_trim: u64,
    trim_armed: bool,
    stall_armed: bool,
    /// Work done for the connection being served in this wakeup, against `quantum` (units of
    /// [`QUANTUM`]); what the codec had inflated and compressed when it began.
    pub(crate) work: usize,
    codec_mark: u64,
    /// The work one wakeup may do for one connection (`usize::MAX`: no bound, for the load
    /// generator, whose connections are its own).
    pub(crate) quantum: usize,
    /// Connections with input left, in the order their work ran out.
    ready: std::collections::VecDeque<Ready>,
    /// Bytes read from the connections (after TLS), and bytes handed to them to send (frames
    /// and HTTP answers, before TLS): one addition per read and per write, for the metrics.
    pub(crate) bytes_in: u64,
    pub(crate) bytes_out: u64,
    /// permessage-deflate for every connection of the loop: it allocates only once a message
    /// is compressed or inflated, and no connection holds compression state between messages
    /// (zero-sized without the `deflate` feature).
    pub(crate) codec: proto::deflate::Codec,
}

/// [`Connection::read_with`] for all but the usual message, kept out of line: inlined, the
/// general parser's registers and stack would weigh on the usual message's path around it.
#[inline(never)]
fn read_general<'d, R: RandomSource>(
    conn: &mut Connection,
    cfg: &proto::Config,
    now: u64,
    data: &'d mut [u8],
    codec: &mut proto::deflate::Codec,
    rng: &mut R,
    out: &mut Vec<u8>,
) -> Result<(usize, Option<Event<'d>>), proto::Error> {
    conn.read_with(cfg, now, data, codec, rng, out)
}

/// A 32-bit clock reading within ±24 days of `now`, back on the 64-bit clock.
fn expand(now: u64, t: u32) -> u64 {
    (now as i64 + i64::from(t.wrapping_sub(now as u32) as i32)).max(0) as u64
}

/// A token for a driver's own event source (listener, waker, signals): never a slab key.
pub(crate) const fn reserved_token(i: usize) -> Token {
    Token(usize::MAX - i)
}

impl<T: SlotStream, P, R: RandomSource> Engine<T, P, R> {
    pub(crate) fn new(poll: Poll, cfg: proto::Config, max_backpressure: usize, rng: R, budget: Arc<Budget>) -> Self {
        Engine {
            streams: T::new_loop(&budget),
            budget,
            mem_paused: std::collections::VecDeque::new(),
            shed: Vec::new(),
            freed: 0,
            last_trim: 0,
            trim_armed: false,
            stall_armed: false,
            poll,
            timed_open: cfg.ping_interval.is_some() || cfg.idle_timeout.is_some(),
            slots: Slab::new(),
            cfg,
            clock: Clock::new(),
            now: 0,
            timers: TimerQueue::default(),
            rng,
            max_backpressure,
            cork: Vec::new(),
            corked: NONE,
            scratch: Vec::new(),
            dead: Vec::new(),
            next_gen: 1,
            work: 0,
            codec_mark: 0,
            quantum: usize::MAX,
            ready: std::collections::VecDeque::new(),
            bytes_in: 0,
            bytes_out: 0,
            codec: proto::deflate::Codec::default(),
        }
    }

    /// Reads the clock for this turn.
    pub(crate) fn tick(&mut self) -> u64 {
        self.now = self.clock.now();
        self.now
    }

    /// The next deadline of any timer.
    pub(crate) fn next_deadline(&self) -> Option<u64> {
        self.timers.next()
    }

    /// Whether `key` names a live connection of generation `gen`.
    pub(crate) fn is_live(&self, key: usize, gen: u32) -> bool {
        self.slots.get(key).is_some_and(|s| s.gen == gen && !s.is_dead())
    }

    fn add(&mut self, mut stream: T, conn: Connection, data: P, flags: u16) -> io::Result<usize> {
        let gen = self.next_gen;
        // 24 bits: the rest of a `ConnId` names the loop.
        self.next_gen = self.next_gen % 0xFF_FFFF + 1;
        let entry = self.slots.vacant_entry();
        let key = entry.key();
        let interest = if flags & CONNECTING != 0 {
            Interest::READABLE | Interest::WRITABLE
        } else {
            Interest::READABLE
        };
        self.poll.registry().register(&mut stream, Token(key), interest)?;
        entry.insert(Slot {
            stream,
            conn,
            out: None,
            gen,
            armed: 0,
            flags: flags | if flags & CONNECTING != 0 { WRITE_INTEREST } else { 0 },
            data,
        });
        Ok(key)
    }

    /// Adds an accepted connection.
    pub(crate) fn insert(&mut self, stream: T, conn: Connection, data: P) -> io::Result<usize> {
        let key = self.add(stream, conn, data, 0)?;
        self.arm(key);
        Ok(key)
    }

    /// Adds a connection whose TCP connect is in progress; `first` (the upgrade request) is
    /// written once it completes.
    pub(crate) fn insert_connecting(
        &mut self,
        stream: T,
        conn: Connection,
        data: P,
        first: &[u8],
    ) -> io::Result<usize> {
        let key = self.add(stream, conn, data, CONNECTING)?;
        let mut q = Box::<Outbox>::default();
        q.push_slice(first);
        self.slots[key].out = Some(q);
        self.budget.add(self.slots[key].charge());
        self.arm(key);
        Ok(key)
    }

    /// Handles a readiness event for connection `key`. `rbuf` is the loop's read buffer.
    pub(crate) fn on_ready<D: Driver<T, P, R>>(
        &mut self,
        d: &mut D,
        key: usize,
        ev: &mio::event::Event,
        rbuf: &mut [u8],
    ) {
        let Some(slot) = self.slots.get_mut(key) else { return };
        // The usual event, with the slot at hand: bytes to read from a connection that is being
        // read, nothing to write.
        if slot.flags & (DEAD | CONNECTING | READ_MORE | MEM_PAUSED) != 0 || ev.is_writable() {
            return self.on_ready_other(d, key, ev, rbuf);
        }
        let mut before = slot.charge();
        let hup = ev.is_read_closed() || ev.is_error();
        if ev.is_readable() || hup {
            self.begin_work();
            self.on_readable(d, key, hup, rbuf, &mut before);
            if let Some(slot) = self.slots.get_mut(key) {
                if Self::handshake_done(slot, key, &mut self.streams) {
                    self.on_writable(key);
                } else if Self::unchanged(slot, key, before, self.timed_open, &self.streams) {
                    return;
                }
            }
        }
        if Self::unchanged(&self.slots[key], key, before, self.timed_open, &self.streams) {
            return;
        }
        self.changed(key, before);
    }

    /// [`on_ready`](Self::on_ready) for every other event: a connect in progress, something to
    /// write, a connection not being read.
    #[inline(never)]
    fn on_ready_other<D: Driver<T, P, R>>(&mut self, d: &mut D, key: usize, ev: &mio::event::Event, rbuf: &mut [u8]) {
        let slot = &mut self.slots[key];
        if slot.flags & DEAD != 0 {
            return;
        }
        if slot.flags & CONNECTING != 0 {
            match super::connect::finished(slot.stream.tcp()) {
                Ok(true) => {
                    slot.flags &= !CONNECTING;
                    d.on_connected(self, key);
                }
                Ok(false) => return,
                Err(e) => {
                    self.kill(key, Cause::Io(e));
                    return;
                }
            }
        }
        let mut before = self.slots[key].charge();
        if ev.is_writable() {
            self.on_writable(key);
        }
        if ev.is_readable() || ev.is_read_closed() || ev.is_error() {
            let hup = ev.is_read_closed() || ev.is_error();
            let slot = &mut self.slots[key];
            if slot.flags & READ_MORE != 0 {
                // Its turn in the ready list comes; that no later event will tell of the FIN
                // is remembered there.
                if hup {
                    let gen = slot.gen;
                    if let Some(r) = self.ready.iter_mut().find(|r| r.key == key && r.gen == gen) {
                        r.hup = true;
                    }
                }
            } else if hup && slot.flags & MEM_PAUSED != 0 {
                // The peer left while the budget kept us from reading its unfinished message:
                // nothing it sent can be used any more.
                slot.conn.set_closed(self.now);
                self.kill(key, Cause::Eof);
            } else {
                self.begin_work();
                self.on_readable(d, key, hup, rbuf, &mut before);
                self.write_after_handshake(key);
            }
        }
        if Self::unchanged(&self.slots[key], key, before, self.timed_open, &self.streams) {
            return;
        }
        self.changed(key, before);
    }

    /// After a read of connection `key`: a TLS handshake that completed while reading lets
    /// queued data out (plain TCP answers false at once).
    #[inline(always)]
    fn write_after_handshake(&mut self, key: usize) {
        if let Some(slot) = self.slots.get_mut(key) {
            if Self::handshake_done(slot, key, &mut self.streams) {
                self.on_writable(key);
            }
        }
    }

    /// Whether connection `key` (`slot`) has queued data that a TLS handshake completed by its
    /// read now lets out.
    #[inline(always)]
    fn handshake_done(slot: &mut Slot<T, P>, key: usize, streams: &mut T::Loop) -> bool {
        slot.stream.io(key, streams).take_write_ready() && slot.out.is_some() && slot.flags & DEAD == 0
    }

    /// The common case after a read: connection `key` (`slot`), which held `before`, has
    /// nothing to charge and nothing to change (`timed_open` and `streams` are the engine's).
    #[inline]
    fn unchanged(slot: &Slot<T, P>, key: usize, before: usize, timed_open: bool, streams: &T::Loop) -> bool {
        slot.flags == 0
            && slot.out.is_none()
            && !timed_open
            && slot.conn.is_open()
            && slot.charge() == before
            && slot.stream.held(key, streams) == 0
    }

    /// Brings the budget up to date with what connection `key` holds now (it held `before`),
    /// and applies the budget to it: a connection holding more than its share while memory is
    /// short stops being read; past the limit it is closed.
    #[inline]
    fn account(&mut self, key: usize, before: usize) {
        let slot = &self.slots[key];
        let now = slot.charge();
        if now != before {
            self.charge_changed(key, before, now);
        } else if slot.stream.held(key, &self.streams) > 0 {
            // What the transport holds counts by itself, and may have grown.
            self.weigh(key);
        }
    }

    fn charge_changed(&mut self, key: usize, before: usize, now: usize) {
        if now < before {
            self.budget.sub(before - now);
            self.freed += before - now;
            return;
        }
        self.budget.add(now - before);
        self.weigh(key);
    }

    /// Asks the budget about connection `key`, which has grown (see [`Budget::weigh`]).
    fn weigh(&mut self, key: usize) {
        let slot = &self.slots[key];
        if slot.flags & DEAD != 0 {
            return;
        }
        match self.budget.weigh(|| slot.weight(key, &self.streams), self.slots.len()) {
            Verdict::Keep => {}
            Verdict::Pause => self.mem_pause(key),
            Verdict::Shed => self.shed.push((key, slot.gen)),
        }
    }

    /// Closes the connections the budget could not hold (with 1013: the server is short of
    /// memory, try again later), dropping their partial messages and queues, closes those
    /// paused for memory for 5 s while it stays short, and reads from paused ones again once
    /// memory has come back. Runs once per turn, outside handlers.
    #[inline]
    pub(crate) fn apply_budget<D: Driver<T, P, R>>(&mut self, d: &mut D) {
        // Usually nothing to shed or resume: no call for it at every wakeup.
        if self.shed.is_empty() && self.mem_paused.is_empty() {
            self.maybe_trim();
        } else {
            self.apply_budget_now(d);
        }
    }

    /// [`apply_budget`](Self::apply_budget) with connections to shed or paused for memory.
    #[inline(never)]
    fn apply_budget_now<D: Driver<T, P, R>>(&mut self, d: &mut D) {
        while let Some((key, gen)) = self.shed.pop() {
            if !self.is_live(key, gen) {
                continue;
            }
            self.clear_queue(key);
            let failed = self.slots[key].conn.is_open();
            let _ = self.close(key, SHED_CODE, "server short of memory");
            if failed {
                d.on_shed(self, key);
            }
            // A TLS record received in part goes too: what the peer sends from now on is read
            // and dropped (it cannot be decrypted without that record) until it closes or the
            // close times out. One still in its handshake cannot be told why: it goes now.
            self.with_conn(key, |slot, cx| {
                if slot.stream.io(key, cx.streams).discard_input() && !failed {
                    cx.end = Some(Cause::Dropped);
                }
            });
        }
        if !self.mem_paused.is_empty() && self.budget.short() {
            // Memory stays short: a connection paused this long is not going to finish (its
            // peer may be gone behind a closed window, or be stalling on purpose).
            // Only the due ones are looked at, not every paused connection at every wakeup.
            let now = self.now;
            while let Some(&(key, gen, since)) = self.mem_paused.front() {
                if !Budget::stalled(since, now) {
                    break;
                }
                self.mem_paused.pop_front();
                if let Some(slot) = self.slots.get_mut(key).filter(|s| s.gen == gen) {
                    slot.flags &= !MEM_PAUSED;
                    self.shed.push((key, gen));
                }
            }
            if !self.shed.is_empty() {
                return self.apply_budget(d);
            }
            if let Some(&(_, _, first)) = self.mem_paused.front() {
                if !self.stall_armed {
                    self.stall_armed = true;
                    self.timers
                        .push(first + super::budget::MEM_STALL_MS, TimerKey(STALL_TIMER));
                }
            }
        }
        if !self.mem_paused.is_empty() && !self.budget.short() {
            for (key, gen, _) in std::mem::take(&mut self.mem_paused) {
                if let Some(slot) = self.slots.get_mut(key).filter(|s| s.gen == gen) {
                    slot.flags &= !MEM_PAUSED;
                    if slot.flags & (READ_PAUSED | DEAD) == 0 {
                        self.sync_interest(key, true);
                    }
                }
            }
        }
        self.maybe_trim();
    }

    /// Gives freed memory back to the operating system after a burst (at most once a second,
    /// and only when at least 1 MiB was freed): the allocator would otherwise keep it.
    #[inline]
    fn maybe_trim(&mut self) {
        self.freed += T::take_freed(&mut self.streams);
        if self.freed >= 1 << 20 && !self.trim_armed {
            self.trim();
        }
    }

    /// [`maybe_trim`](Self::maybe_trim) once enough was freed: trims now, or arms the timer
    /// for when a second has passed since the last trim.
    #[inline(never)]
    fn trim(&mut self) {
        let next = self.last_trim + 1000;
        if self.now < next {
            self.trim_armed = true;
            self.timers.push(next, TimerKey(TRIM_TIMER));
            return;
        }
        self.freed = 0;
        self.last_trim = self.now;
        if self.slots.len() < self.slots.capacity() / 4 {
            self.slots.shrink_to_fit();
        }
        super::sys::trim_heap();
    }

    fn on_writable(&mut self, key: usize) {
        let slot = &mut self.slots[key];
        let flushed = outbox::flush(&mut slot.stream.io(key, &mut self.streams), &mut slot.out);
        if let Err(e) = flushed {
            self.kill(key, Cause::Io(e));
        }
    }

    /// Reads and processes until the socket is drained. `hup` says the peer's FIN (or an error)
    /// came with this event, so reading must go on until it shows.
    /// `before` is what the connection held when it was last charged: each read is charged
    /// as it goes, so that the budget stops a connection that is reading a lot. Called with the
    /// wakeup's work not used up (the first read needs no look at it).
    fn on_readable<D: Driver<T, P, R>>(
        &mut self,
        d: &mut D,
        key: usize,
        hup: bool,
        rbuf: &mut [u8],
        before: &mut usize,
    ) {
        loop {
            let (cap, over) = self
                .budget
                .read_cap(rbuf.len(), self.slots[key].stream.min_read(key, &self.streams));
            let slot = &mut self.slots[key];
            if slot.flags & NOT_READING != 0 {
                return;
            }
            // The wakeup's work is looked at before each read but the first, at the end of this
            // loop.
            let held = slot.stream.held(key, &self.streams);
            if over && (slot.conn.is_open() && slot.conn.buffered_bytes() > 0 || held > 0) {
                // Past the budget a read could still grow this connection's partial message
                // (doubling its buffer) or the TLS record it is receiving: every connection of
                // a turn doing so would overrun the budget by their sum before any is closed.
                // One holding more than its share is closed, as `weigh` would have.
                let (weight, gen) = (slot.charge() + held, slot.gen);
                if !hup && weight > self.budget.share(self.slots.len()) {
                    self.shed.push((key, gen));
                } else {
                    self.mem_pause_or_drop(key, hup);
                }
                return;
            }
            let mut io = slot.stream.io(key, &mut self.streams);
            let (read, drains) = (io.read(&mut rbuf[..cap]), io.short_read_drains());
            drop(io);
            let n = match read {
                Ok(0) => {
                    self.on_eof(d, key);
                    return;
                }
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    // A reset: nothing more can be written either.
                    d.on_hangup(self, key);
                    let slot = &mut self.slots[key];
                    slot.conn.set_closed(self.now);
                    self.kill(key, Cause::Io(e));
                    return;
                }
            };
            // A read that did not fill the buffer took everything, where the transport says so:
            // skip the read that would only return WouldBlock (one system call per message).
            let drained = n < cap && !hup && drains;
            d.on_read(key, &rbuf[..n]);
            self.work += 1 + n / 256;
            self.bytes_in += n as u64;
            let done = self.process(d, key, &mut rbuf[..n]);
            if done < n {
                // The work ran out in the middle of this read: the rest waits its turn.
                self.defer(key, hup, rbuf[done..n].to_vec(), 0);
                return;
            }
            if drained {
                return; // charged by the caller
            }
            // Reading on: charge this read first, so that the budget can stop a connection
            // that is sending a lot.
            self.account(key, *before);
            *before = self.slots[key].charge();
            // Reading on: not past this peer's queue bound (`settle` resumes it later), nor
            // past the budget.
            let slot = &mut self.slots[key];
            if slot.backlog() > self.max_backpressure {
                slot.flags |= READ_PAUSED;
                return;
            }
            if self.budget.over() && !(hup && slot.conn.buffered_bytes() == 0) {
                self.mem_pause_or_drop(key, hup);
                return;
            }
            if slot.flags & NOT_READING != 0 {
                return;
            }
            if self.spent() >= self.quantum {
                // Everyone else's turn first; this socket is read again from the ready list.
                self.defer(key, hup, Vec::new(), 0);
                return;
            }
        }
    }

    /// Stops reading from `key` until the budget recovers; but a peer that has hung up (`hup`:
    /// this event was its last) in the middle of a message is dropped, as a paused one is when
    /// it hangs up (`on_ready`): no later event would tell that it has gone.
    fn mem_pause_or_drop(&mut self, key: usize, hup: bool) {
        if hup {
            self.slots[key].conn.set_closed(self.now);
            self.kill(key, Cause::Eof);
        } else {
            self.mem_pause(key);
        }
    }

    /// Stops reading from `key` until the budget recovers.
    fn mem_pause(&mut self, key: usize) {
        let slot = &mut self.slots[key];
        if slot.flags & MEM_PAUSED == 0 {
            slot.flags |= MEM_PAUSED;
            self.mem_paused.push_back((key, slot.gen, self.now));
        }
    }

    /// The peer ended its side. What is queued for it still goes out (bounded by the close
    /// timeout); then the connection is removed.
    fn on_eof<D: Driver<T, P, R>>(&mut self, d: &mut D, key: usize) {
        d.on_hangup(self, key);
        let slot = &mut self.slots[key];
        slot.flags |= EOF;
        if let Some(e) = slot.conn.read_eof(self.now) {
            d.on_error(self, key, &e);
        }
        let slot = &mut self.slots[key];
        if slot.out.is_none() && !slot.stream.wants_write(key, &self.streams) {
            if slot.conn.state() == State::Closed && slot.flags & SHUT_WR == 0 {
                // A client ends its side after the server's: over TLS with close_notify.
                slot.flags |= SHUT_WR;
                let _ = slot.stream.io(key, &mut self.streams).shutdown_write();
            }
            let cause = if slot.flags & SHUT_WR != 0 {
                Cause::Done
            } else {
                Cause::Eof
            };
            self.kill(key, cause);
        }
    }

    /// Feeds received bytes to the connection and its events to the driver, until they are
    /// used up or the wakeup's work is (see [`QUANTUM`]). Returns the bytes used.
    pub(crate) fn process<D: Driver<T, P, R>>(&mut self, d: &mut D, key: usize, data: &mut [u8]) -> usize {
        self.corked = key;
        let mut pos = 0;
        while pos < data.len() {
            let slot = &mut self.slots[key];
            if slot.flags & DEAD != 0 {
                break;
            }
            // The usual message is taken without the general parser, and every message reaches
            // the driver from this one place: its path is inlined once, and the usual message
            // is not copied through the parser's result on its way.
            let small = slot
                .conn
                .read_small(&self.cfg, self.now, &mut data[pos..], &mut self.rng, &mut self.cork);
            let (used, payload) = match small {
                Some(Ok(message)) => message,
                Some(Err(e)) => {
                    d.on_error(self, key, &e);
                    pos = data.len();
                    break;
                }
                None => match read_general(
                    &mut slot.conn,
                    &self.cfg,
                    self.now,
                    &mut data[pos..],
                    &mut self.codec,
                    &mut self.rng,
                    &mut self.cork,
                ) {
                    Ok((used, Some(Event::Message(payload)))) => (used, payload),
                    Ok((used, ev)) => {
                        pos += used;
                        match ev {
                            Some(ev) => {
                                d.on_event(self, key, ev);
                                self.work += 1;
                                if pos < data.len() && self.spent() >= self.quantum {
                                    break;
                                }
                            }
                            None if used == 0 => {
                                // Waiting for the driver's answer: the rest is not this wakeup's.
                                pos = data.len();
                                break;
                            }
                            None => {}
                        }
                        continue;
                    }
                    Err(e) => {
                        d.on_error(self, key, &e);
                        pos = data.len();
                        break;
                    }
                },
            };
            pos += used;
            d.on_message(self, key, payload);
            self.work += 1;
            if pos < data.len() && self.spent() >= self.quantum {
                break;
            }
        }
        // Large inflated messages (a bomb's refused output too) are trimmed after, as freed buffers are.
        self.freed = self.freed.saturating_add(self.codec.take_released());
        self.uncork();
        pos
    }

    /// Starts counting a connection's work for this wakeup.
    #[inline]
    fn begin_work(&mut self) {
        self.work = 0;
        let s = self.codec.stats();
        self.codec_mark = s.inflated_out + s.compressed_in;
    }

    /// The work done for the connection being served, with what the codec inflated and
    /// compressed for it.
    #[inline]
    fn spent(&self) -> usize {
        let s = self.codec.stats();
        let coded = (s.inflated_out + s.compressed_in).saturating_sub(self.codec_mark);
        self.work
            .saturating_add(usize::try_from(coded / 256).unwrap_or(usize::MAX))
    }

    /// Puts connection `key` in the ready list with `buf[pos..]` still to handle: it is not
    /// read again until its turn there.
    fn defer(&mut self, key: usize, hup: bool, buf: Vec<u8>, pos: usize) {
        let slot = &mut self.slots[key];
        slot.flags |= READ_MORE;
        self.budget.add(buf.capacity());
        self.ready.push_back(Ready {
            key,
            gen: slot.gen,
            buf,
            pos,
            hup,
        });
    }

    /// Whether connections wait in the ready list (the loop then polls without waiting).
    pub(crate) fn has_ready(&self) -> bool {
        !self.ready.is_empty()
    }

    /// Gives connections in the ready list, in order, their next wakeup's work: first the rest
    /// of their last read, then their socket. It stops after [`READY_PER_TURN`] quanta of work
    /// (one connection at least): one whose single message is a lot of work (a large one
    /// inflated) then holds up one turn, not every turn's events by the number of such peers.
    pub(crate) fn resume<D: Driver<T, P, R>>(&mut self, d: &mut D, rbuf: &mut [u8]) {
        let mut turn = 0usize;
        for _ in 0..self.ready.len() {
            if turn >= READY_PER_TURN.saturating_mul(self.quantum) {
                break;
            }
            let Some(mut r) = self.ready.pop_front() else { break };
            self.budget.sub(r.buf.capacity());
            let key = r.key;
            let Some(slot) = self.slots.get_mut(key).filter(|s| s.gen == r.gen) else {
                continue;
            };
            slot.flags &= !READ_MORE;
            if slot.flags & DEAD != 0 {
                continue;
            }
            let mut before = slot.charge();
            self.begin_work();
            if r.pos < r.buf.len() {
                let done = r.pos + self.process(d, key, &mut r.buf[r.pos..]);
                if done < r.buf.len() && self.slots[key].flags & DEAD == 0 {
                    r.pos = done;
                    turn = turn.saturating_add(self.spent());
                    self.defer(key, r.hup, r.buf, r.pos);
                    self.changed(key, before);
                    continue;
                }
            }
            drop(r.buf);
            let slot = &mut self.slots[key];
            if r.hup && slot.flags & (MEM_PAUSED | DEAD) == MEM_PAUSED {
                // As in `on_ready`: the peer left while the budget kept us from reading.
                slot.conn.set_closed(self.now);
                self.kill(key, Cause::Eof);
            } else if slot.flags & DEAD == 0 {
                if slot.flags & NOT_READING == 0 && self.spent() >= self.quantum {
                    // The rest of its read used up this turn's work: its socket waits for the next
                    // (`on_readable` looks at the work only before its later reads).
                    self.defer(key, r.hup, Vec::new(), 0);
                } else {
                    self.on_readable(d, key, r.hup, rbuf, &mut before);
                }
                self.write_after_handshake(key);
            }
            turn = turn.saturating_add(self.spent());
            self.changed(key, before);
        }
    }

    /// Writes what the corked connection produced, in one go.
    fn uncork(&mut self) {
        self.flush_cork();
        self.corked = NONE;
    }

    /// The connection whose read is being processed, if any.
    pub(crate) fn corked(&self) -> Option<usize> {
        (self.corked != NONE).then_some(self.corked)
    }

    /// Writes what the corked connection produced so far, now (before a broadcast reaches
    /// everyone else, the sender's own copy goes first).
    #[inline]
    pub(crate) fn flush_cork(&mut self) {
        let key = self.corked;
        if self.cork.is_empty() {
            return;
        }
        self.bytes_out += self.cork.len() as u64;
        let slot = &mut self.slots[key];
        if slot.flags & DEAD != 0 {
            self.cork.clear();
            return;
        }
        if slot.out.is_none() {
            // Usually the kernel takes it all in one write.
            if let Ok(n) = slot.stream.io(key, &mut self.streams).write(&self.cork) {
                if n == self.cork.len() {
                    self.cork.clear();
                    return;
                }
                self.cork.drain(..n);
            }
        }
        let sent = outbox::send_vec(
            &mut slot.stream.io(key, &mut self.streams),
            &mut slot.out,
            &mut self.cork,
        );
        if let Err(e) = sent {
            self.kill(key, Cause::Io(e));
        }
        if self.cork.capacity() > KEEP_BUFFER {
            self.cork = Vec::new(); // one large message must not pin memory for good
        }
    }

    /// After any work on a connection: apply backpressure, end a finished connection, keep
    /// the registration and the deadline current.
    pub(crate) fn settle(&mut self, key: usize) {
        let Some(slot) = self.slots.get_mut(key) else { return };
        let idle_stream = !slot.stream.wants_write(key, &self.streams);
        if slot.flags == 0 && slot.out.is_none() && idle_stream && !self.timed_open && slot.conn.is_open() {
            return; // an open connection with nothing queued, nothing paused, nothing timed
        }
        if slot.flags & DEAD != 0 {
            return;
        }
        let backlog = slot.backlog();
        let mut resumed = false;
        if backlog > self.max_backpressure {
            slot.flags |= READ_PAUSED;
        } else if slot.flags & READ_PAUSED != 0 && backlog <= self.max_backpressure / 2 {
            slot.flags &= !READ_PAUSED;
            resumed = slot.flags & MEM_PAUSED == 0;
        }
        slot.conn.output_pending(slot.out.is_some() || !idle_stream, self.now);
        if slot.out.is_none() && idle_stream && slot.flags & CONNECTING == 0 {
            if slot.conn.state() == State::Closed && slot.flags & SHUT_WR == 0 {
                // The server ends the TCP connection first (RFC 6455 §7.1.1); a client waits
                // for it, unless the server has already gone.
                if slot.conn.role() == Role::Server || slot.flags & EOF != 0 {
                    slot.flags |= SHUT_WR;
                    let _ = slot.stream.io(key, &mut self.streams).shutdown_write();
                }
            }
            if slot.flags & EOF != 0 {
                let cause = if slot.conn.state() == State::Closed && slot.flags & SHUT_WR != 0 {
                    Cause::Done
                } else {
                    Cause::Eof
                };
                self.kill(key, cause);
                return;
            }
        }
        self.sync_interest(key, resumed);
        self.arm(key);
    }

    /// Registers for exactly what the slot needs: READABLE unless paused or ended, WRITABLE
    /// while bytes wait (or the connect is in progress).
    fn sync_interest(&mut self, key: usize, resumed: bool) {
        let slot = &mut self.slots[key];
        // A paused connection stays registered for READABLE (its bytes wait in the kernel) so
        // that a peer that leaves is noticed; resuming re-arms the edge so that what arrived
        // meanwhile raises an event.
        let want_read = slot.flags & EOF == 0;
        let want_write =
            slot.out.is_some() || slot.flags & CONNECTING != 0 || slot.stream.wants_write(key, &self.streams);
        let has_write = slot.flags & WRITE_INTEREST != 0;
        let has_read = slot.flags & READ_OFF == 0;
        // mio needs some interest: a slot that wants neither keeps WRITABLE, which is quiet
        // on a socket with nothing queued.
        let write = want_write || !want_read;
        if write == has_write && want_read == has_read && !resumed {
            return;
        }
        let interest = match (want_read, write) {
            (true, true) => Interest::READABLE | Interest::WRITABLE,
            (true, false) => Interest::READABLE,
            (false, _) => Interest::WRITABLE,
        };
        if self
            .poll
            .registry()
            .reregister(&mut slot.stream, Token(key), interest)
            .is_ok()
        {
            slot.flags = (slot.flags & !(WRITE_INTEREST | READ_OFF))
                | if write { WRITE_INTEREST } else { 0 }
                | if want_read { 0 } else { READ_OFF };
        }
    }

    /// Makes sure the slot's deadline is in the timer queue.
    fn arm(&mut self, key: usize) {
        let slot = &mut self.slots[key];
        let Some(when) = slot.conn.poll_timeout(&self.cfg, self.now) else {
            return;
        };
        if slot.armed != 0 && expand(self.now, slot.armed) <= when {
            return; // an earlier entry is queued; it re-arms when it fires
        }
        slot.armed = (when as u32).max(1);
        self.timers.push(when, TimerKey::conn(key, slot.gen));
    }

    /// Sets a driver timer `after` milliseconds of the loop clock from now.
    pub(crate) fn set_timer_at(&mut self, when: u64, id: u64) {
        debug_assert!(id < DRIVER_TIMER);
        self.timers.push(when, TimerKey(DRIVER_TIMER | id));
    }

    /// Runs every deadline that has passed.
    #[inline]
    pub(crate) fn fire_timers<D: Driver<T, P, R>>(&mut self, d: &mut D) {
        // Usually none is due: no call for it at every wakeup.
        if self.timers.next().is_some_and(|when| when <= self.now) {
            self.fire_timers_now(d);
        }
    }

    /// [`fire_timers`](Self::fire_timers) with at least one deadline passed.
    #[inline(never)]
    fn fire_timers_now<D: Driver<T, P, R>>(&mut self, d: &mut D) {
        let heap = self.timers.heap_bytes();
        self.fire_due(d);
        // After a burst of deadlines (thousands of handshakes) the queue gives memory back.
        self.freed += heap.saturating_sub(self.timers.heap_bytes());
    }

    fn fire_due<D: Driver<T, P, R>>(&mut self, d: &mut D) {
        while let Some((when, TimerKey(k))) = self.timers.pop_due(self.now) {
            if k & DRIVER_TIMER != 0 {
                d.on_timer(self, k & !DRIVER_TIMER);
                continue;
            }
            if k == TRIM_TIMER {
                self.trim_armed = false;
                self.maybe_trim();
                continue;
            }
            if k == STALL_TIMER {
                // apply_budget, at the end of this turn, looks at the paused connections.
                self.stall_armed = false;
                continue;
            }
            let (key, gen) = ((k & 0xFFFF_FFFF) as usize, (k >> 32) as u32);
            let Some(slot) = self.slots.get_mut(key) else { continue };
            if slot.gen != gen || slot.armed != (when as u32).max(1) || slot.flags & DEAD != 0 {
                continue; // stale entry
            }
            slot.armed = 0;
            let t = self.with_conn(key, |slot, cx| {
                let t = slot.conn.handle_timeout(cx.cfg, cx.now, cx.rng, cx.out);
                if let Some(t @ (Timeout::Handshake | Timeout::Close)) = t {
                    cx.end = Some(Cause::Timeout(t));
                }
                t
            });
            if let Some(Some(t)) = t {
                d.on_timeout(self, key, t);
            }
        }
    }

    /// Marks a connection for removal at the end of the turn.
    pub(crate) fn kill(&mut self, key: usize, cause: Cause) {
        let slot = &mut self.slots[key];
        if slot.flags & DEAD == 0 {
            slot.flags |= DEAD;
            self.dead.push((key, cause));
        }
    }

    /// Removes the connections marked during this turn, telling the driver first.
    #[inline]
    pub(crate) fn reap<D: Driver<T, P, R>>(&mut self, d: &mut D) {
        // Usually none died this turn: no call for it at every wakeup.
        if !self.dead.is_empty() {
            self.reap_now(d);
        }
    }

    /// [`reap`](Self::reap) with connections to remove.
    #[inline(never)]
    fn reap_now<D: Driver<T, P, R>>(&mut self, d: &mut D) {
        while let Some((key, cause)) = self.dead.pop() {
            d.on_removed(self, key, cause);
            let mut slot = self.slots.remove(key);
            slot.stream.release(key, &mut self.streams);
            let charge = slot.charge();
            self.budget.sub(charge);
            self.freed += charge + std::mem::size_of::<Slot<T, P>>();
            let _ = self.poll.registry().deregister(&mut slot.stream);
        }
        // What went with them (a TLS session and its buffers among it) is counted only now: a
        // loop that has nothing more to do must still trim, or arm the timer that will.
        self.maybe_trim();
    }

    /// Changes connection `key`: the one path by which anything outside its own read changes a
    /// connection. `f` gets the slot and a [`Cx`]; what it writes to `cx.out` goes out after it,
    /// and the budget and the slot's registration and deadline are brought up to date once.
    /// While the connection's own bytes are processed, its output joins the cork and the read's
    /// bracket (`on_ready`, `resume`) accounts for it. `None` if the connection is gone or being
    /// removed.
    #[inline]
    pub(crate) fn with_conn<X>(
        &mut self,
        key: usize,
        f: impl FnOnce(&mut Slot<T, P>, &mut Cx<'_, R, T::Loop>) -> X,
    ) -> Option<X> {
        self.with_conn_of(key, None, f)
    }

    /// [`with_conn`](Self::with_conn) if `key` is still generation `gen` (when given): one
    /// lookup for both.
    #[inline]
    fn with_conn_of<X>(
        &mut self,
        key: usize,
        gen: Option<u32>,
        f: impl FnOnce(&mut Slot<T, P>, &mut Cx<'_, R, T::Loop>) -> X,
    ) -> Option<X> {
        let corked = key == self.corked;
        let slot = self.slots.get_mut(key)?;
        if slot.flags & DEAD != 0 || gen.is_some_and(|g| g != slot.gen) {
            return None;
        }
        // A corked connection's output joins the cork, and the read's bracket accounts for it.
        let before = if corked { 0 } else { slot.charge() };
        let out = if corked {
            &mut self.cork
        } else {
            self.scratch.clear();
            &mut self.scratch
        };
        let mut cx = Cx {
            cfg: &self.cfg,
            now: self.now,
            rng: &mut self.rng,
            out,
            codec: &mut self.codec,
            streams: &mut self.streams,
            end: None,
        };
        let x = f(slot, &mut cx);
        let end = cx.end;
        if !corked || end.is_some() {
            self.finish_change(key, corked, before, end);
        }
        Some(x)
    }

    /// The rest of [`with_conn`](Self::with_conn) (out of line: the reply path, corked, needs
    /// none of it): writes what the change produced, ends the connection if it asked, and
    /// brings the budget and the slot up to date.
    #[inline(never)]
    fn finish_change(&mut self, key: usize, corked: bool, before: usize, end: Option<Cause>) {
        if let Some(cause) = end {
            self.kill(key, cause);
        }
        if corked {
            return;
        }
        if !self.scratch.is_empty() {
            self.bytes_out += self.scratch.len() as u64;
            let slot = &mut self.slots[key];
            let sent = outbox::send_vec(
                &mut slot.stream.io(key, &mut self.streams),
                &mut slot.out,
                &mut self.scratch,
            );
            if let Err(e) = sent {
                self.kill(key, Cause::Io(e));
            }
            if self.scratch.capacity() > KEEP_BUFFER {
                self.scratch = Vec::new();
            }
        }
        self.changed(key, before);
    }

    /// The end of every change to connection `key` (which held `before`): the budget learns
    /// what it holds now, then backpressure, the end of a finished connection, its
    /// registration and its deadline are brought up to date. [`with_conn`](Self::with_conn)
    /// ends with it, and so does a read (`on_ready`, `resume`), which cannot lend the slot
    /// alone because the driver it calls gets the whole engine.
    #[inline]
    fn changed(&mut self, key: usize, before: usize) {
        self.account(key, before);
        self.settle(key);
    }

    /// Answers the request connection `key` handed out (see [`Connection::accept`]).
    #[cfg(not(feature = "deflate"))]
    pub(crate) fn accept(
        &mut self,
        key: usize,
        req: &proto::Request,
        answer: &proto::Answer,
        extensions: Option<&str>,
    ) -> bool {
        self.with_conn(key, |slot, cx| {
            slot.conn.accept(req, answer, extensions, cx.now, cx.out)
        })
        .unwrap_or(false)
    }

    /// Answers the request connection `key` handed out, negotiating permessage-deflate (see
    /// [`Connection::accept_deflate`]).
    #[cfg(feature = "deflate")]
    pub(crate) fn accept_deflate(
        &mut self,
        key: usize,
        req: &proto::Request,
        answer: &proto::Answer,
        config: &proto::deflate::DeflateConfig,
    ) -> bool {
        self.with_conn(key, |slot, cx| {
            slot.conn.accept_deflate(req, answer, config, cx.now, cx.out)
        })
        .unwrap_or(false)
    }

    /// Sends a message on connection `key`.
    pub(crate) fn send(&mut self, key: usize, msg: Message<'_>) -> Result<(), NotOpen> {
        let gen = self.slots[key].gen;
        self.send_to(key, gen, msg)
    }

    /// Sends a message on connection `key` if it is still generation `gen` (one lookup: this
    /// is every reply's path).
    #[inline]
    pub(crate) fn send_to(&mut self, key: usize, gen: u32, msg: Message<'_>) -> Result<(), NotOpen> {
        // The usual reply, a small message to the connection whose read is being processed,
        // joins the cork right here (the read's bracket accounts for it); the rest takes the
        // call.
        if key == self.corked {
            if let Some(slot) = self.slots.get(key) {
                if slot.gen == gen && slot.flags & DEAD == 0 && slot.conn.send_small(&msg, &mut self.cork) {
                    return Ok(());
                }
            }
        }
        self.send_other(key, gen, msg)
    }

    /// [`send_to`](Self::send_to) for all but a small reply to the corked connection.
    #[inline(never)]
    fn send_other(&mut self, key: usize, gen: u32, msg: Message<'_>) -> Result<(), NotOpen> {
        if key != self.corked {
            self.work += 1;
        }
        if msg.as_bytes().len() >= DIRECT_FROM {
            return self.send_large(key, gen, msg);
        }
        self.with_conn_of(key, Some(gen), |slot, cx| {
            slot.conn.send_with(msg, cx.codec, cx.rng, cx.out)
        })
        .unwrap_or(Err(NotOpen))
    }

    /// [`Engine::send_to`] for a large message: what the connection produced so far (on the
    /// corked one, what its read produced), the message's header and its payload go out in
    /// one vectored write, the payload from where it lies; only what the transport leaves is
    /// copied, into the queue. Compressed messages and a client's (masked) take the usual way.
    /// Kept out of line: the path of small replies stays as short as it was.
    #[inline(never)]
    fn send_large(&mut self, key: usize, gen: u32, msg: Message<'_>) -> Result<(), NotOpen> {
        let sent = self.with_conn_of(key, Some(gen), |slot, cx| {
            if !slot.conn.send_header(&msg, cx.out)? {
                return slot.conn.send_with(msg, cx.codec, cx.rng, cx.out).map(|()| 0);
            }
            let payload = msg.as_bytes();
            let written = cx.out.len() + payload.len();
            let parts = outbox::send_parts(&mut slot.stream.io(key, cx.streams), &mut slot.out, cx.out, payload);
            if let Err(e) = parts {
                cx.end = Some(Cause::Io(e));
            }
            cx.out.clear();
            Ok(written)
        });
        let written = sent.unwrap_or(Err(NotOpen))?;
        self.bytes_out += written as u64;
        // Emptied by a direct write (a compressed or masked message may be in it instead).
        if self.cork.is_empty() && self.cork.capacity() > KEEP_BUFFER {
            self.cork = Vec::new();
        }
        Ok(())
    }

    /// Sends a ping on connection `key`.
    pub(crate) fn ping(&mut self, key: usize, payload: &[u8]) -> Result<(), NotOpen> {
        self.with_conn(key, |slot, cx| slot.conn.ping(payload, cx.rng, cx.out))
            .unwrap_or(Err(NotOpen))
    }

    /// Starts the close handshake on connection `key`.
    pub(crate) fn close(&mut self, key: usize, code: u16, reason: &str) -> Result<(), NotOpen> {
        self.with_conn(key, |slot, cx| slot.conn.close(code, reason, cx.now, cx.rng, cx.out))
            .unwrap_or(Err(NotOpen))
    }

    /// Sends bytes as they are (an HTTP answer written by the driver).
    pub(crate) fn send_raw(&mut self, key: usize, bytes: &[u8]) {
        self.with_conn(key, |_, cx| cx.out.extend_from_slice(bytes));
    }

    /// Sends a frame shared with other connections (encoded once for a broadcast).
    pub(crate) fn send_shared(&mut self, key: usize, frame: &Arc<SharedFrame>) {
        let corked = key == self.corked;
        let sent = self.with_conn(key, |slot, cx| {
            if corked {
                // Behind what this connection's read produced so far.
                cx.out.extend_from_slice(frame.bytes());
            } else if let Err(e) = outbox::send_shared(&mut slot.stream.io(key, cx.streams), &mut slot.out, frame) {
                cx.end = Some(Cause::Io(e));
            }
        });
        if sent.is_some() && !corked {
            self.bytes_out += frame.bytes().len() as u64;
        }
    }

    /// A frame to share among connections, counted against the budget until the last one
    /// has sent it.
    pub(crate) fn shared_frame(&self, bytes: Vec<u8>) -> Arc<SharedFrame> {
        SharedFrame::new(bytes, &self.budget)
    }

    /// Drops what is queued for connection `key` except the rest of a frame already partly
    /// written (cutting that short would corrupt the stream).
    pub(crate) fn clear_queue(&mut self, key: usize) {
        self.with_conn(key, |slot, cx| {
            // The cork, while this connection's bytes are processed.
            cx.out.clear();
            if let Some(q) = slot.out.as_mut() {
                q.clear();
                if q.len() == 0 {
                    slot.out = None;
                }
            }
        });
    }

    /// The backlog of connection `key` (see [`Slot::backlog`]), counting what its current read
    /// produced.
    pub(crate) fn backlog(&self, key: usize) -> usize {
        let corked = if key == self.corked { self.cork.len() } else { 0 };
        self.slots.get(key).map_or(0, |s| s.backlog() + corked)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_idle_server_slot_is_small() {
        // What an idle connection costs the engine before the driver's data: a socket, the
        // protocol state, the queue pointer, generation, deadline and flags.
        // A socket is a 4-byte descriptor in release builds (debug builds of mio add a selector
        // id to it), so the layout is measured with an `i32` in its place.
        let size = std::mem::size_of::<Slot<i32, ()>>();
        let limit = if cfg!(target_pointer_width = "64") { 40 } else { 32 };
        assert!(size <= limit, "Slot is {size} bytes");
    }

    /// A driver that only lets connections go.
    struct Quiet;

    impl<T: SlotStream, P, R: RandomSource> Driver<T, P, R> for Quiet {
        fn on_event(&mut self, _: &mut Engine<T, P, R>, _: usize, _: Event<'_>) {}
        fn on_error(&mut self, _: &mut Engine<T, P, R>, _: usize, _: &proto::Error) {}
        fn on_removed(&mut self, _: &mut Engine<T, P, R>, _: usize, _: Cause) {}
        fn on_timer(&mut self, _: &mut Engine<T, P, R>, _: u64) {}
    }

    #[test]
    fn changes_keep_the_budget_exact_and_clearing_a_queue_resumes_reading() {
        use mio::net::TcpStream;
        const BOUND: usize = 1 << 20;
        let budget = Budget::new(1 << 30);
        let mut eng: Engine<TcpStream, (), proto::rand::NoRandom> = Engine::new(
            Poll::new().unwrap(),
            proto::Config::default(),
            BOUND,
            proto::rand::NoRandom,
            Arc::clone(&budget),
        );
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        // The peer never reads: what the kernel does not take waits in the queue.
        let _peer = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (ours, _) = listener.accept().unwrap();
        ours.set_nonblocking(true).unwrap();
        let key = eng
            .insert(TcpStream::from_std(ours), Connection::open(Role::Server, 0), ())
            .unwrap();
        let chunk = [7u8; 4096];
        // Bounded: the kernel's buffers and the bound take far less than 256 MiB.
        for _ in 0..65536 {
            if eng.slots[key].flags & READ_PAUSED != 0 {
                break;
            }
            eng.send_raw(key, &chunk);
            assert_eq!(budget.used(), eng.slots[key].charge(), "every change is counted");
        }
        assert!(eng.slots[key].flags & READ_PAUSED != 0, "past the bound reading pauses");
        assert!(eng.slots[key].backlog() > BOUND);
        eng.clear_queue(key);
        assert_eq!(
            budget.used(),
            eng.slots[key].charge(),
            "the cleared queue is given back"
        );
        assert!(eng.slots[key].backlog() < BOUND / 2, "{}", eng.slots[key].backlog());
        assert_eq!(
            eng.slots[key].flags & READ_PAUSED,
            0,
            "clearing the queue resumes reading"
        );
        eng.kill(key, Cause::Dropped);
        eng.reap(&mut Quiet);
        assert_eq!(budget.used(), 0, "everything given back with the connection");
    }
}
