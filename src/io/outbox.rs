//! Bytes waiting for a socket to become writable.
//!
//! A connection has an [`Outbox`] only while the kernel would not take everything at once;
//! the common case writes straight to the socket and allocates nothing. Broadcast frames are
//! queued as shared, reference-counted bytes: one copy however many peers wait for them.
//!
//! The queue counts what it really holds, not just the bytes it will send: its own entries,
//! the capacity of the buffers it owns, and the frames it shares (see [`Outbox::held`] and
//! [`Outbox::charge`]).

use std::collections::VecDeque;
use std::io::{self, IoSlice};
use std::sync::Arc;

use super::budget::SharedFrame;
use super::transport::Transport;

/// One queued piece.
#[derive(Debug)]
pub(crate) enum Chunk {
    /// Bytes for this connection only.
    Owned(Vec<u8>),
    /// Bytes shared with other connections (a broadcast frame).
    Shared(Arc<SharedFrame>),
}

impl Chunk {
    fn bytes(&self) -> &[u8] {
        match self {
            Chunk::Owned(v) => v,
            Chunk::Shared(r) => r.bytes(),
        }
    }
}

/// A queue of unsent bytes.
#[derive(Debug, Default)]
pub(crate) struct Outbox {
    chunks: VecDeque<Chunk>,
    /// Bytes of the front chunk already written.
    front_written: usize,
    /// Unsent bytes in total.
    len: usize,
    /// Capacity of the owned buffers.
    owned: usize,
    /// Length of the shared frames queued.
    shared: usize,
}

/// Owned pieces smaller than this are merged into the previous owned piece.
const MERGE_BELOW: usize = 4096;

/// Shared frames this small are copied rather than referenced: an entry and a reference
/// would cost more than the bytes.
pub(crate) const COPY_BELOW: usize = 64;

impl Outbox {
    /// Unsent bytes.
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// Memory this queue holds for its connection alone: itself, its entries and its owned
    /// buffers (shared frames count once, against the budget, by themselves).
    pub(crate) fn charge(&self) -> usize {
        std::mem::size_of::<Outbox>() + self.chunks.capacity() * std::mem::size_of::<Chunk>() + self.owned
    }

    /// Memory this queue keeps alive, shared frames included in full: what the per-peer
    /// bound counts.
    pub(crate) fn held(&self) -> usize {
        self.charge() + self.shared
    }

    fn push_owned(&mut self, v: Vec<u8>) {
        self.owned += v.capacity();
        self.chunks.push_back(Chunk::Owned(v));
    }

    fn pop_front(&mut self) {
        match self.chunks.pop_front() {
            Some(Chunk::Owned(v)) => self.owned -= v.capacity(),
            Some(Chunk::Shared(f)) => self.shared -= f.bytes().len(),
            None => {}
        }
    }

    /// Queues a copy of `bytes`.
    pub(crate) fn push_slice(&mut self, bytes: &[u8]) {
        if bytes.is_empty() {
            return;
        }
        self.len += bytes.len();
        if let Some(Chunk::Owned(last)) = self.chunks.back_mut() {
            if bytes.len() < MERGE_BELOW || last.len() < MERGE_BELOW {
                let before = last.capacity();
                last.extend_from_slice(bytes);
                self.owned += last.capacity() - before;
                return;
            }
        }
        self.push_owned(bytes.to_vec());
    }

    /// Queues `bytes[skip..]`, taking ownership (no copy of a large buffer).
    /// `skip` may be non-zero only while the queue is empty.
    pub(crate) fn push_vec(&mut self, bytes: Vec<u8>, skip: usize) {
        if skip >= bytes.len() {
            return;
        }
        if bytes.len() - skip < MERGE_BELOW || (skip > 0 && !self.chunks.is_empty()) {
            self.push_slice(&bytes[skip..]);
            return;
        }
        if self.chunks.is_empty() {
            self.front_written = skip;
        }
        self.len += bytes.len() - skip;
        self.push_owned(bytes);
    }

    /// Queues shared bytes, `skip` of which were already written. A tiny frame is copied.
    pub(crate) fn push_shared(&mut self, frame: &Arc<SharedFrame>, skip: usize) {
        let bytes = frame.bytes();
        if skip >= bytes.len() {
            return;
        }
        if bytes.len() < COPY_BELOW {
            if self.chunks.is_empty() {
                self.push_slice(&bytes[skip..]);
            } else {
                self.push_slice(bytes);
            }
            return;
        }
        if self.chunks.is_empty() {
            self.front_written = skip;
        } else {
            debug_assert_eq!(skip, 0);
        }
        self.len += bytes.len() - skip;
        self.shared += bytes.len();
        self.chunks.push_back(Chunk::Shared(Arc::clone(frame)));
    }

    /// Drops everything queued except the rest of a frame already partly written: cutting
    /// that one short would corrupt the stream, and whatever is queued next with it.
    pub(crate) fn clear(&mut self) {
        let keep = usize::from(self.front_written > 0).min(self.chunks.len());
        while self.chunks.len() > keep {
            match self.chunks.pop_back() {
                Some(Chunk::Owned(v)) => self.owned -= v.capacity(),
                Some(Chunk::Shared(f)) => self.shared -= f.bytes().len(),
                None => {}
            }
        }
        self.chunks.shrink_to_fit();
        self.len = self.chunks.front().map_or(0, |c| c.bytes().len() - self.front_written);
        if keep == 0 {
            self.front_written = 0;
        }
    }

    /// Writes as much as `w` takes. Returns `Ok(true)` when the queue is empty.
    pub(crate) fn write_to<W: Transport + ?Sized>(&mut self, w: &mut W) -> io::Result<bool> {
        while self.len > 0 {
            let mut slices = [IoSlice::new(&[]); 16];
            let mut n = 0;
            for (i, c) in self.chunks.iter().take(slices.len()).enumerate() {
                let b = c.bytes();
                slices[i] = IoSlice::new(if i == 0 { &b[self.front_written..] } else { b });
                n += 1;
            }
            let written = match w.write_vectored(&slices[..n]) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(k) => k,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
                Err(e) => return Err(e),
            };
            self.advance(written);
        }
        Ok(true)
    }

    fn advance(&mut self, mut n: usize) {
        self.len -= n;
        while n > 0 {
            let front = self.chunks.front().expect("advance within len").bytes().len() - self.front_written;
            if n < front {
                self.front_written += n;
                return;
            }
            n -= front;
            self.pop_front();
            self.front_written = 0;
        }
    }
}

/// One write's outcome for the loops below: `Some(k)` bytes taken (0 after an interrupted
/// call, which is tried again), `None` once the transport takes no more for now.
#[inline(always)]
fn taken(r: io::Result<usize>) -> io::Result<Option<usize>> {
    match r {
        Ok(0) => Err(io::ErrorKind::WriteZero.into()),
        Ok(k) => Ok(Some(k)),
        Err(e) if e.kind() == io::ErrorKind::Interrupted => Ok(Some(0)),
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(None),
        Err(e) => Err(e),
    }
}

/// Writes `bytes` until the transport stops taking them; returns how many went out.
pub(crate) fn write_some<W: Transport + ?Sized>(w: &mut W, bytes: &[u8]) -> io::Result<usize> {
    let mut done = 0;
    while done < bytes.len() {
        match taken(w.write(&bytes[done..]))? {
            Some(k) => done += k,
            None => break,
        }
    }
    Ok(done)
}

/// Writes `head` then `body` with vectored writes until the transport stops taking them;
/// returns how many bytes of the two went out.
fn write_two<W: Transport + ?Sized>(w: &mut W, head: &[u8], body: &[u8]) -> io::Result<usize> {
    let total = head.len() + body.len();
    let mut done = 0;
    while done < total {
        let r = if done < head.len() {
            w.write_vectored(&[IoSlice::new(&head[done..]), IoSlice::new(body)])
        } else {
            w.write(&body[done - head.len()..])
        };
        match taken(r)? {
            Some(k) => done += k,
            None => break,
        }
    }
    Ok(done)
}

/// Like [`send_slice`] for `head` followed by `body`, written together with one vectored write
/// from where they lie: a large payload behind its header is not copied unless the transport
/// leaves some of it, and then only what it left is queued.
pub(crate) fn send_parts<T: Transport + ?Sized>(
    t: &mut T,
    out: &mut Option<Box<Outbox>>,
    head: &[u8],
    body: &[u8],
) -> io::Result<()> {
    let skip = match out {
        Some(_) => 0,
        None => write_two(t, head, body)?,
    };
    if skip < head.len() + body.len() {
        let queue = out.get_or_insert_with(Default::default);
        if skip < head.len() {
            queue.push_slice(&head[skip..]);
            queue.push_slice(body);
        } else {
            queue.push_slice(&body[skip - head.len()..]);
        }
    }
    Ok(())
}

/// Unsent remainders at least this large move into the queue instead of being copied.
const MOVE_ABOVE: usize = 64 << 10;

/// Write-or-queue: a connection's transport and the queue that exists only while bytes wait.
/// Every function writes straight to the transport when nothing is queued (no allocation in the
/// common case) and queues what the transport did not take.
#[cfg(test)]
pub(crate) fn send_slice<T: Transport + ?Sized>(
    t: &mut T,
    out: &mut Option<Box<Outbox>>,
    bytes: &[u8],
) -> io::Result<()> {
    let skip = match out {
        Some(_) => 0,
        None => write_some(t, bytes)?,
    };
    if skip < bytes.len() {
        out.get_or_insert_with(Default::default).push_slice(&bytes[skip..]);
    }
    Ok(())
}

/// Like `send_slice`, but a large remainder moves into the queue without a copy. `bytes` is
/// left empty, its allocation kept for reuse unless it moved.
pub(crate) fn send_vec<T: Transport + ?Sized>(
    t: &mut T,
    out: &mut Option<Box<Outbox>>,
    bytes: &mut Vec<u8>,
) -> io::Result<()> {
    let skip = match out {
        Some(_) => 0,
        None => match write_some(t, bytes) {
            Ok(n) => n,
            Err(e) => {
                bytes.clear();
                return Err(e);
            }
        },
    };
    if skip == bytes.len() {
        bytes.clear();
        return Ok(());
    }
    let queue = out.get_or_insert_with(Default::default);
    if bytes.len() - skip >= MOVE_ABOVE {
        queue.push_vec(std::mem::take(bytes), skip);
    } else {
        queue.push_slice(&bytes[skip..]);
        bytes.clear();
    }
    Ok(())
}

/// Sends bytes shared with other connections (a broadcast frame).
pub(crate) fn send_shared<T: Transport + ?Sized>(
    t: &mut T,
    out: &mut Option<Box<Outbox>>,
    frame: &Arc<SharedFrame>,
) -> io::Result<()> {
    let skip = match out {
        Some(_) => 0,
        None => write_some(t, frame.bytes())?,
    };
    if skip < frame.bytes().len() {
        out.get_or_insert_with(Default::default).push_shared(frame, skip);
    }
    Ok(())
}

/// Writes queued bytes after a writable event (the transport's own first); frees the queue
/// once it is empty.
pub(crate) fn flush<T: Transport + ?Sized>(t: &mut T, out: &mut Option<Box<Outbox>>) -> io::Result<()> {
    t.flush_pending()?;
    if let Some(q) = out {
        if q.write_to(t)? {
            *out = None;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A writer that takes at most `cap` bytes per call and then blocks once.
    struct Trickle {
        got: Vec<u8>,
        cap: usize,
        block_next: bool,
    }

    impl mio::event::Source for Trickle {
        fn register(&mut self, _: &mio::Registry, _: mio::Token, _: mio::Interest) -> io::Result<()> {
            Ok(())
        }
        fn reregister(&mut self, _: &mio::Registry, _: mio::Token, _: mio::Interest) -> io::Result<()> {
            Ok(())
        }
        fn deregister(&mut self, _: &mio::Registry) -> io::Result<()> {
            Ok(())
        }
    }

    impl Transport for Trickle {
        fn read(&mut self, _: &mut [u8]) -> io::Result<usize> {
            Ok(0)
        }
        fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
            if self.block_next {
                self.block_next = false;
                return Err(io::ErrorKind::WouldBlock.into());
            }
            self.block_next = true;
            let mut n = 0;
            for b in bufs {
                let take = b.len().min(self.cap - n);
                self.got.extend_from_slice(&b[..take]);
                n += take;
            }
            Ok(n)
        }
        fn shutdown_write(&mut self) -> io::Result<()> {
            Ok(())
        }
        fn short_read_drains(&self) -> bool {
            true
        }
        fn tcp(&self) -> &mio::net::TcpStream {
            unreachable!("not a socket")
        }
    }

    use super::super::budget::Budget;

    fn frame(bytes: Vec<u8>) -> Arc<SharedFrame> {
        SharedFrame::new(bytes, &Budget::unlimited())
    }

    #[test]
    fn keeps_order_across_owned_and_shared() {
        let mut o = Outbox::default();
        let big: Vec<u8> = (0..100u8).collect();
        let shared = frame(big.clone());
        o.push_vec(vec![9; 10_000], 2);
        o.push_shared(&shared, 0);
        o.push_slice(b"tail");
        assert_eq!(o.len(), 9_998 + 100 + 4);
        let mut w = Trickle {
            got: Vec::new(),
            cap: 777,
            block_next: false,
        };
        let mut rounds = 0;
        while !o.write_to(&mut w).unwrap() {
            rounds += 1;
            assert!(rounds < 1000);
        }
        let mut want = vec![9; 9_998];
        want.extend_from_slice(&big);
        want.extend_from_slice(b"tail");
        assert_eq!(w.got, want);
        assert_eq!(o.len(), 0);
        assert_eq!(Arc::strong_count(&shared), 1, "sent shared bytes are released");
        assert_eq!((o.owned, o.shared), (0, 0), "nothing is counted once sent");
    }

    #[test]
    fn write_or_queue_allocates_only_when_the_transport_stalls() {
        let mut t = Trickle {
            got: Vec::new(),
            cap: 1 << 20,
            block_next: false,
        };
        let mut out = None;
        send_slice(&mut t, &mut out, b"whole").unwrap();
        assert!(out.is_none(), "written at once: no queue");
        // The next write blocks: everything is queued, in order, and flushed later.
        let mut big = vec![5u8; 100_000];
        send_vec(&mut t, &mut out, &mut big).unwrap();
        assert!(big.is_empty());
        send_slice(&mut t, &mut out, b"tail").unwrap();
        assert_eq!(out.as_ref().map(|o| o.len()), Some(100_004));
        while out.is_some() {
            flush(&mut t, &mut out).unwrap();
        }
        assert_eq!(t.got.len(), 5 + 100_004);
        assert_eq!(&t.got[t.got.len() - 4..], b"tail");
    }

    #[test]
    fn header_and_payload_go_out_together_and_only_the_rest_is_queued() {
        let payload: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
        // The transport takes part of the header and of the payload, then blocks.
        let mut t = Trickle {
            got: Vec::new(),
            cap: 30_000,
            block_next: false,
        };
        let mut out = None;
        send_parts(&mut t, &mut out, b"HEAD", &payload).unwrap();
        assert_eq!(t.got.len(), 30_000, "one vectored write took both parts");
        let queue = out.as_ref().expect("the rest is queued");
        assert_eq!(queue.len(), 4 + 100_000 - 30_000);
        assert!(queue.held() >= queue.len(), "the queued copy is counted");
        send_parts(&mut t, &mut out, b"next", b"!").unwrap();
        for _ in 0..100 {
            if out.is_none() {
                break;
            }
            flush(&mut t, &mut out).unwrap();
        }
        assert!(out.is_none());
        let mut want = b"HEAD".to_vec();
        want.extend_from_slice(&payload);
        want.extend_from_slice(b"next!");
        assert!(t.got == want, "bytes out of order or lost");

        // Cut inside the header: the rest of it, then the whole payload, are queued.
        let mut t = Trickle {
            got: Vec::new(),
            cap: 2,
            block_next: false,
        };
        let mut out = None;
        send_parts(&mut t, &mut out, b"HEAD", b"payload").unwrap();
        assert_eq!(out.as_ref().map(|o| o.len()), Some(2 + 7));
        while out.is_some() {
            flush(&mut t, &mut out).unwrap();
        }
        assert_eq!(t.got, b"HEADpayload");

        // Taken whole: nothing allocated.
        let mut t = Trickle {
            got: Vec::new(),
            cap: 1 << 20,
            block_next: false,
        };
        let mut out = None;
        send_parts(&mut t, &mut out, b"HEAD", &payload).unwrap();
        assert!(out.is_none());
        assert_eq!(t.got.len(), 4 + payload.len());
    }

    #[test]
    fn clear_keeps_a_partly_written_frame() {
        let shared = frame(vec![7u8; 5000]);
        let mut o = Outbox::default();
        o.push_shared(&shared, 1000);
        o.push_shared(&shared, 0);
        o.clear();
        assert_eq!(o.len(), 4000, "the rest of the started frame stays");
        o.push_slice(b"close");
        let mut w = Trickle {
            got: Vec::new(),
            cap: 1 << 20,
            block_next: false,
        };
        while !o.write_to(&mut w).unwrap() {}
        assert_eq!(w.got.len(), 4005);
        assert_eq!(&w.got[4000..], b"close");

        let mut o = Outbox::default();
        o.push_shared(&shared, 0);
        o.push_shared(&shared, 0);
        o.clear();
        assert_eq!(o.len(), 0, "nothing started: everything goes");
        assert_eq!((o.owned, o.shared), (0, 0));
    }

    #[test]
    fn tiny_shared_frames_are_copied_and_everything_held_is_counted() {
        let mut o = Outbox::default();
        let empty_text = frame(vec![0x81, 0]);
        for _ in 0..10_000 {
            o.push_shared(&empty_text, 0);
        }
        assert_eq!(Arc::strong_count(&empty_text), 1, "no reference per tiny frame");
        assert_eq!(o.len(), 20_000);
        // What it holds is its bytes plus a few buffers, not an entry per frame.
        assert!(o.held() < 20_000 * 2 + 4096, "{}", o.held());
        assert!(o.held() >= 20_000);
        let big = frame(vec![1; 1000]);
        let before = o.held();
        o.push_shared(&big, 0);
        assert!(o.held() >= before + 1000, "a shared frame counts in full for its peer");
        assert_eq!(o.charge() + o.shared, o.held());
    }
}
