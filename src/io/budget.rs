//! The memory budget: every byte a server buffers for its peers, counted where it is
//! allocated and given back where it is freed (no scans of connections).
//!
//! What counts: each connection's parser state and partial message
//! ([`Connection::buffered_bytes`](crate::proto::Connection::buffered_bytes)), its outbound
//! queue with the queue's own entries and the capacity of what it owns, and each shared frame
//! (a broadcast or publish) once, with its allocation, until the last queue lets go of it;
//! and a TLS connection's buffers for a record received in part and ciphertext the socket did
//! not take (counted where they change, in `io::tls`; weighed with the connection's own when
//! the engine picks whom to pause and close); and the part of a read a connection's turn
//! ended before (it waits in the engine's ready list).
//! What does not count, and makes the constant above the budget: the loop's read buffer, the
//! one message being handed to the handler and the reply being built for it (both at most
//! the message limit), the slab of idle connection slots, and the allocator's own overhead.
//!
//! Four words for memory, one each, in all of `io`:
//! - *unsent*: the bytes waiting to be written to a peer;
//! - *backlog*: the memory a peer's outbound queue keeps alive, what the per-peer bound counts;
//! - *charge*: what one connection holds against the budget;
//! - *used*: what the budget holds, every loop's connections and shared frames together.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

/// A limit and what is used of it, shared by a server's loops and its shared frames.
#[derive(Debug)]
pub(crate) struct Budget {
    limit: usize,
    used: AtomicUsize,
}

impl Budget {
    pub(crate) fn new(limit: usize) -> Arc<Budget> {
        Arc::new(Budget {
            limit,
            used: AtomicUsize::new(0),
        })
    }

    /// A budget that never limits (clients and the load generator).
    pub(crate) fn unlimited() -> Arc<Budget> {
        Budget::new(usize::MAX)
    }

    pub(crate) fn limit(&self) -> usize {
        self.limit
    }

    /// What the budget holds now.
    pub(crate) fn used(&self) -> usize {
        self.used.load(Ordering::Relaxed)
    }

    pub(crate) fn add(&self, n: usize) {
        self.used.fetch_add(n, Ordering::Relaxed);
    }

    pub(crate) fn sub(&self, n: usize) {
        self.used.fetch_sub(n, Ordering::Relaxed);
    }

    /// Above this, the largest holders stop being read from.
    pub(crate) fn soft(&self) -> usize {
        self.limit / 4 * 3
    }

    /// Below this, paused connections are read from again.
    pub(crate) fn low(&self) -> usize {
        self.limit / 2
    }

    /// Whether more is used than the limit allows.
    #[inline]
    pub(crate) fn over(&self) -> bool {
        self.used() > self.limit
    }

    /// Whether memory is still short for connections paused for it (not yet below
    /// [`low`](Self::low)).
    pub(crate) fn short(&self) -> bool {
        self.used() >= self.low()
    }

    /// A fair share of the memory while it is short, among `conns` connections: what lets every
    /// connection hold the same (never under 1 KiB).
    pub(crate) fn share(&self, conns: usize) -> usize {
        (self.soft() / conns.max(1)).max(1024)
    }

    /// What to do with a connection that weighs `weight()` (what it and its transport hold;
    /// asked only while memory is short) among `conns`, now that it holds more: holding more
    /// than its share while memory is short, it stops being read; past the limit it is closed.
    #[inline]
    pub(crate) fn weigh(&self, weight: impl FnOnce() -> usize, conns: usize) -> Verdict {
        let used = self.used();
        if used <= self.soft() || weight() <= self.share(conns) {
            Verdict::Keep
        } else if used > self.limit {
            Verdict::Shed
        } else {
            Verdict::Pause
        }
    }

    /// How much one read of a buffer of `len` bytes may take: all of it, but less and less as
    /// memory runs short (never under `min` or 256 bytes, so that small messages still flow),
    /// which bounds how far the connections read in one turn can overshoot; and whether the
    /// budget is overrun already.
    #[inline]
    pub(crate) fn read_cap(&self, len: usize, min: usize) -> (usize, bool) {
        let used = self.used();
        if used <= self.soft() {
            return (len, false);
        }
        (
            (self.limit.saturating_sub(used) / 8).clamp(min.max(256).min(len), len),
            used > self.limit,
        )
    }

    /// Whether a connection paused for memory since `since` (ms) has waited too long at `now`:
    /// while memory stays short it is not going to finish (its peer may be gone behind a
    /// closed window, or be stalling on purpose), and is closed.
    pub(crate) fn stalled(since: u64, now: u64) -> bool {
        now.saturating_sub(since) >= MEM_STALL_MS
    }
}

/// A connection paused this long for memory, while memory stays short, is closed.
pub(crate) const MEM_STALL_MS: u64 = 5000;

/// What the budget decides for a connection that has grown.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// Nothing: memory is not short, or it holds no more than its share.
    Keep,
    /// Stop reading from it until memory comes back.
    Pause,
    /// Close it (1013, try again later) at the end of the turn.
    Shed,
}

/// A frame encoded once and queued for many connections. Its bytes count against the budget
/// once, from its creation until the last queue holding it drops it.
pub(crate) struct SharedFrame {
    bytes: Box<[u8]>,
    budget: Arc<Budget>,
    /// The same message compressed (permessage-deflate), by window bits - 8: made by the first
    /// loop that needs it and shared from then on; `None` inside when this frame serves. The
    /// table itself is allocated (and counted) only when a peer has agreed to compression.
    #[cfg(feature = "deflate")]
    compressed: std::sync::OnceLock<Box<Compressed>>,
}

/// A shared frame's compressed variants, one per window size (8..=15 bits).
#[cfg(feature = "deflate")]
type Compressed = [std::sync::OnceLock<Option<Arc<SharedFrame>>>; 8];

impl SharedFrame {
    pub(crate) fn new(bytes: Vec<u8>, budget: &Arc<Budget>) -> Arc<SharedFrame> {
        let frame = SharedFrame {
            bytes: bytes.into_boxed_slice(),
            budget: Arc::clone(budget),
            #[cfg(feature = "deflate")]
            compressed: Default::default(),
        };
        budget.add(frame.charge());
        Arc::new(frame)
    }

    /// What the frame holds: its bytes and its reference-counted allocation.
    fn charge(&self) -> usize {
        self.bytes.len() + std::mem::size_of::<SharedFrame>() + 2 * std::mem::size_of::<usize>()
    }

    pub(crate) fn bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// The compressed frame for window `window` (bits - 8), made from this frame's bytes by
    /// `compress` the first time any loop asks, counted against the budget like this one; this
    /// frame itself when `compress` gave none (compression would not pay).
    #[cfg(feature = "deflate")]
    pub(crate) fn variant(
        self: &Arc<Self>,
        window: usize,
        compress: impl FnOnce(&[u8]) -> Option<Vec<u8>>,
    ) -> &Arc<SharedFrame> {
        let table = self.compressed.get_or_init(|| {
            self.budget.add(std::mem::size_of::<Compressed>());
            Box::default()
        });
        table[window]
            .get_or_init(|| compress(&self.bytes).map(|z| SharedFrame::new(z, &self.budget)))
            .as_ref()
            .unwrap_or(self)
    }
}

impl Drop for SharedFrame {
    fn drop(&mut self) {
        self.budget.sub(self.charge());
        #[cfg(feature = "deflate")]
        if self.compressed.get().is_some() {
            self.budget.sub(std::mem::size_of::<Compressed>());
        }
    }
}

impl std::fmt::Debug for SharedFrame {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SharedFrame({} bytes)", self.bytes.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_thresholds_are_three_quarters_and_half_the_limit() {
        let b = Budget::new(1000);
        assert_eq!((b.soft(), b.low()), (750, 500));
        b.add(499);
        assert!(!b.short() && !b.over());
        b.add(1);
        assert!(b.short() && !b.over(), "at the low mark paused connections stay paused");
        b.add(500);
        assert!(!b.over(), "the limit itself is not over it");
        b.add(1);
        assert!(b.over());
        b.sub(1001);
        assert_eq!(b.used(), 0);
    }

    #[test]
    fn a_share_divides_the_soft_mark_but_never_under_one_kib() {
        let b = Budget::new(4 << 20);
        assert_eq!(b.share(0), 3 << 20, "no connections count as one");
        assert_eq!(b.share(3), 1 << 20);
        assert_eq!(b.share(1 << 20), 1024);
    }

    #[test]
    fn weighing_keeps_pauses_and_sheds() {
        let b = Budget::new(1 << 20); // soft 768 KiB; share among 4: 192 KiB
        let share = b.share(4);
        b.add(700 << 10);
        assert_eq!(b.weigh(|| share + 1, 4), Verdict::Keep, "memory is not short");
        b.add(100 << 10);
        assert_eq!(b.weigh(|| share, 4), Verdict::Keep, "no more than its share");
        assert_eq!(
            b.weigh(|| share + 1, 4),
            Verdict::Pause,
            "more than its share while short"
        );
        b.add(300 << 10);
        assert_eq!(b.weigh(|| share + 1, 4), Verdict::Shed, "past the limit");
        assert_eq!(
            b.weigh(|| share, 4),
            Verdict::Keep,
            "past the limit, but within its share"
        );
    }

    #[test]
    fn reads_shrink_as_memory_runs_short() {
        let b = Budget::new(1 << 20);
        assert_eq!(b.read_cap(65536, 0), (65536, false), "plenty: the whole buffer");
        b.add(800 << 10);
        assert_eq!(
            b.read_cap(65536, 0),
            ((224 << 10) / 8, false),
            "an eighth of what is left"
        );
        b.add(220 << 10);
        assert_eq!(b.read_cap(65536, 0), (512, false));
        b.add(4 << 10);
        assert_eq!(b.read_cap(65536, 0), (256, false), "at the limit: 256 bytes still flow");
        assert_eq!(
            b.read_cap(65536, 16 << 10),
            (16 << 10, false),
            "the transport's minimum"
        );
        assert_eq!(b.read_cap(100, 16 << 10), (100, false), "never past the buffer");
        b.add(1);
        assert_eq!(b.read_cap(65536, 0), (256, true), "overrun");
    }

    #[test]
    fn a_connection_paused_five_seconds_has_stalled() {
        assert!(!Budget::stalled(1000, 1000 + MEM_STALL_MS - 1));
        assert!(Budget::stalled(1000, 1000 + MEM_STALL_MS));
        assert!(
            !Budget::stalled(9000, 1000),
            "a clock read before the pause is no stall"
        );
    }

    #[test]
    fn a_shared_frame_counts_once_until_the_last_holder_drops_it() {
        let budget = Budget::new(1 << 20);
        let frame = SharedFrame::new(vec![0; 1000], &budget);
        let charged = budget.used();
        assert!((1000..1100).contains(&charged), "{charged}");
        let copies: Vec<_> = (0..100).map(|_| Arc::clone(&frame)).collect();
        assert_eq!(budget.used(), charged, "sharing costs nothing more");
        drop(frame);
        assert_eq!(budget.used(), charged);
        drop(copies);
        assert_eq!(budget.used(), 0);
    }

    #[cfg(feature = "deflate")]
    #[test]
    fn a_compressed_variant_is_made_once_shared_and_counted() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        let budget = Budget::new(1 << 20);
        let frame = SharedFrame::new(vec![7; 1000], &budget);
        let plain = budget.used();
        let made = AtomicUsize::new(0);
        let compress = |bytes: &[u8]| {
            made.fetch_add(1, Ordering::Relaxed);
            Some(bytes[..100].to_vec())
        };
        // Two loops asking for the same window at once get the same bytes, compressed once.
        let (a, b) = std::thread::scope(|s| {
            let a = s.spawn(|| Arc::clone(frame.variant(7, compress)));
            let b = s.spawn(|| Arc::clone(frame.variant(7, compress)));
            (a.join().unwrap(), b.join().unwrap())
        });
        assert_eq!(made.load(Ordering::Relaxed), 1);
        assert!(Arc::ptr_eq(&a, &b) && a.bytes().len() == 100);
        // Another window is another variant; one that does not pay is the frame itself.
        assert!(!Arc::ptr_eq(frame.variant(6, compress), &a));
        assert!(Arc::ptr_eq(frame.variant(5, |_| None), &frame));
        assert_eq!(made.load(Ordering::Relaxed), 2);
        assert!(budget.used() > plain + 200, "the variants count: {}", budget.used());
        drop((a, b));
        drop(frame);
        assert_eq!(budget.used(), 0, "everything given back with the last holder");
    }
}
