//! One timer queue for every deadline in a loop, on one clock with one rounding rule.
//!
//! The clock reads whole milliseconds since the loop started, rounded down; a deadline set `d`
//! after a reading is [`deadline_after`](crate::proto::conn::deadline_after) that reading, so
//! timers never fire early. Entries carry a key; the owner checks an entry when it comes due
//! (it may be stale), so activity that moves a deadline later costs nothing until then.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::time::Duration;

pub(crate) use crate::proto::conn::deadline_after;

/// A monotonic millisecond clock relative to the loop's start.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Clock {
    start: Reading,
}

impl Clock {
    pub(crate) fn new() -> Self {
        Clock { start: Reading::now() }
    }

    /// Milliseconds since the clock started, rounded down.
    pub(crate) fn now(&self) -> u64 {
        self.now_ns() / 1_000_000
    }

    /// Nanoseconds since the clock started (for latency measurements, not deadlines).
    pub(crate) fn now_ns(&self) -> u64 {
        Reading::now().ns_since(self.start)
    }
}

/// One reading of the clock `Instant` reads (`CLOCK_MONOTONIC` on Linux), taken directly: a
/// loop reads it twice per wakeup, and `Instant::elapsed` with its `Duration` arithmetic costs
/// several times the reading itself.
#[cfg(any(target_os = "linux", target_os = "android"))]
#[derive(Clone, Copy, Debug)]
struct Reading {
    sec: i64,
    nsec: i64,
}

#[cfg(any(target_os = "linux", target_os = "android"))]
impl Reading {
    // `time_t` and `c_long` are 32 bits on some 32-bit targets: the conversions are not useless there.
    #[allow(clippy::useless_conversion)]
    fn now() -> Reading {
        let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
        // SAFETY: `ts` is a valid, writable timespec; CLOCK_MONOTONIC always exists on Linux
        // (std's `Instant::now` reads it the same way and treats a failure as impossible).
        unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
        Reading {
            sec: i64::from(ts.tv_sec),
            nsec: i64::from(ts.tv_nsec),
        }
    }

    /// Nanoseconds from `start` to this reading (0 if it were earlier, as `Instant` saturates).
    fn ns_since(self, start: Reading) -> u64 {
        let ns = (self.sec - start.sec) * 1_000_000_000 + (self.nsec - start.nsec);
        u64::try_from(ns).unwrap_or(0)
    }
}

/// A reading of `Instant` where the monotonic clock is not read directly.
#[cfg(not(any(target_os = "linux", target_os = "android")))]
#[derive(Clone, Copy, Debug)]
struct Reading(std::time::Instant);

#[cfg(not(any(target_os = "linux", target_os = "android")))]
impl Reading {
    fn now() -> Reading {
        Reading(std::time::Instant::now())
    }

    /// Nanoseconds from `start` to this reading.
    fn ns_since(self, start: Reading) -> u64 {
        self.0.saturating_duration_since(start.0).as_nanos() as u64
    }
}

/// Deadlines with keys, soonest first.
#[derive(Debug)]
pub(crate) struct TimerQueue<K: Ord> {
    heap: BinaryHeap<Reverse<(u64, K)>>,
}

impl<K: Ord> Default for TimerQueue<K> {
    fn default() -> Self {
        TimerQueue {
            heap: BinaryHeap::new(),
        }
    }
}

impl<K: Ord + Copy> TimerQueue<K> {
    /// Adds a deadline.
    pub(crate) fn push(&mut self, when: u64, key: K) {
        self.heap.push(Reverse((when, key)));
    }

    /// Bytes the queue holds.
    pub(crate) fn heap_bytes(&self) -> usize {
        self.heap.capacity() * std::mem::size_of::<Reverse<(u64, K)>>()
    }

    /// The soonest deadline, if any.
    pub(crate) fn next(&self) -> Option<u64> {
        self.heap.peek().map(|Reverse((when, _))| *when)
    }

    /// Removes and returns an entry that is due at `now`.
    pub(crate) fn pop_due(&mut self, now: u64) -> Option<(u64, K)> {
        match self.heap.peek() {
            Some(Reverse((when, _))) if *when <= now => {
                let e = self.heap.pop().map(|Reverse(e)| e);
                // After a burst (thousands of handshakes, each with a deadline), give the memory back.
                if self.heap.capacity() > 1024 && self.heap.len() < self.heap.capacity() / 4 {
                    self.heap.shrink_to(self.heap.len() * 2);
                }
                e
            }
            _ => None,
        }
    }
}

/// The poll timeout that wakes the loop at `deadline` (whole milliseconds: mio rounds a
/// fraction up, so the loop never wakes before the clock reads `deadline`).
pub(crate) fn poll_timeout(now: u64, deadline: Option<u64>) -> Option<Duration> {
    deadline.map(|d| Duration::from_millis(d.saturating_sub(now)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    #[test]
    fn the_clock_reads_the_time_instant_reads() {
        let before = Instant::now();
        let clock = Clock::new();
        std::thread::sleep(Duration::from_millis(5));
        let (ms, ns) = (clock.now(), clock.now_ns());
        let outer = before.elapsed();
        // Started after `before` and read before `outer`: within it, and at least the sleep.
        assert!(ns >= 5_000_000, "{ns} ns");
        assert!(u128::from(ns) <= outer.as_nanos(), "{ns} ns against {outer:?}");
        assert!((5..=ns / 1_000_000).contains(&ms), "{ms} ms, {ns} ns");
    }

    #[test]
    fn pops_in_deadline_order_only_when_due() {
        let mut q = TimerQueue::default();
        q.push(30, 1u32);
        q.push(10, 2);
        q.push(20, 3);
        assert_eq!(q.next(), Some(10));
        assert_eq!(q.pop_due(5), None);
        assert_eq!(q.pop_due(25), Some((10, 2)));
        assert_eq!(q.pop_due(25), Some((20, 3)));
        assert_eq!(q.pop_due(25), None);
        assert_eq!(poll_timeout(25, q.next()), Some(Duration::from_millis(5)));
        assert_eq!(poll_timeout(25, None), None);
    }

    #[test]
    fn a_timer_never_fires_before_its_time() {
        let clock = Clock::new();
        let start = Instant::now();
        let set_at = clock.now();
        let d = Duration::from_millis(3);
        let when = deadline_after(set_at, d);
        while clock.now() < when {
            std::hint::spin_loop();
        }
        assert!(start.elapsed() >= d);
    }
}
