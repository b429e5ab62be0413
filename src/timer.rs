//! One timer queue for every deadline in a loop.
//!
//! Deadlines live in a binary heap keyed by milliseconds since the loop started. An entry names
//! a slot and a generation; the owner re-computes the real deadline when an entry comes due, so
//! activity that pushes a deadline later costs nothing until then (no heap operation per message).

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::time::{Duration, Instant};

/// A monotonic millisecond clock relative to the loop's start.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Clock {
    start: Instant,
}

impl Clock {
    pub(crate) fn new() -> Self {
        Clock { start: Instant::now() }
    }

    /// Milliseconds since the clock started.
    pub(crate) fn now(&self) -> u64 {
        self.start.elapsed().as_millis() as u64
    }
}

/// Milliseconds in `d`, saturating.
pub(crate) fn millis(d: Duration) -> u64 {
    d.as_millis().min(u64::MAX as u128) as u64
}

/// Deadlines: `(when, key, generation)`, soonest first.
#[derive(Debug, Default)]
pub(crate) struct TimerQueue {
    heap: BinaryHeap<Reverse<(u64, usize, u32)>>,
}

impl TimerQueue {
    /// Adds a deadline.
    pub(crate) fn push(&mut self, when: u64, key: usize, gen: u32) {
        self.heap.push(Reverse((when, key, gen)));
    }

    /// The soonest deadline, if any.
    pub(crate) fn next(&self) -> Option<u64> {
        self.heap.peek().map(|Reverse((when, _, _))| *when)
    }

    /// Removes and returns an entry that is due at `now`.
    pub(crate) fn pop_due(&mut self, now: u64) -> Option<(u64, usize, u32)> {
        match self.heap.peek() {
            Some(Reverse((when, _, _))) if *when <= now => {
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

/// The poll timeout that wakes the loop at `deadline` (deadlines are in whole milliseconds of a
/// truncating clock, so a timer may fire up to 1 ms before its exact due time).
pub(crate) fn poll_timeout(now: u64, deadline: Option<u64>) -> Option<Duration> {
    deadline.map(|d| Duration::from_millis(d.saturating_sub(now)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pops_in_deadline_order_only_when_due() {
        let mut q = TimerQueue::default();
        q.push(30, 1, 0);
        q.push(10, 2, 0);
        q.push(20, 3, 7);
        assert_eq!(q.next(), Some(10));
        assert_eq!(q.pop_due(5), None);
        assert_eq!(q.pop_due(25), Some((10, 2, 0)));
        assert_eq!(q.pop_due(25), Some((20, 3, 7)));
        assert_eq!(q.pop_due(25), None);
        assert_eq!(poll_timeout(25, q.next()), Some(Duration::from_millis(5)));
        assert_eq!(poll_timeout(25, None), None);
    }
}
