//! The loop's own state that handlers reach through [`Ctx`](super::Ctx).

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use super::handle::{Handle, MAX_LOOP_COMMANDS};
use super::handler::{self, ServerEngine};
use super::{topics, ConnId, ServerConfig, SlowConsumer, Stats, TimerId};
use crate::io::budget::SharedFrame;
use crate::io::timer::deadline_after;

/// The loop's own state that handlers reach through [`Ctx`].
pub(crate) struct LoopState {
    pub(crate) stats: Stats,
    /// The loop's other counters, for the metrics.
    pub(crate) counters: super::metrics::Counters,
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
    /// The slot whose state a callback holds in its `Conn`, if any.
    pub(crate) lent: Option<usize>,
    /// This loop's index among the server's loops.
    pub(crate) lp: u8,
    /// The server's instance id (0 without a cluster), in every [`ConnId`] it makes.
    pub(crate) instance: u64,
    /// The server's handle: the other loops' inboxes, the budget and the shared counts.
    pub(crate) handle: Handle,
    /// A loop fell behind and missed a broadcast; logged once until one reaches every loop.
    behind_logged: bool,
    /// Message lines (`debug`) wanted: asked once at the start, so that a message costs one
    /// test when they are not.
    pub(crate) log_messages: bool,
    /// The loop index [`Ctx::send`](super::Ctx::send) takes its inlined path for: [`lp`](Self::lp),
    /// or one no id holds (a loop index is 8 bits) when message lines are wanted, so that one
    /// compare sends those messages to the path that logs them.
    pub(crate) fast_loop: usize,
}

impl LoopState {
    /// The state of loop `lp`, before it has accepted anything.
    pub(super) fn new(cfg: &ServerConfig, lp: u8, handle: Handle) -> LoopState {
        let log_messages = super::msglog::wanted();
        LoopState {
            stats: Stats::default(),
            counters: super::metrics::Counters::default(),
            max_backpressure: cfg.max_backpressure,
            slow_consumer: cfg.slow_consumer,
            timers: slab::Slab::new(),
            next_timer: 0,
            shutdown_requested: false,
            peers: handler::PeerTable::new(),
            topics: topics::Topics::default(),
            lent: None,
            lp,
            instance: handle.group.link.instance(),
            handle,
            behind_logged: false,
            log_messages,
            fast_loop: if log_messages { usize::MAX } else { usize::from(lp) },
        }
    }

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
