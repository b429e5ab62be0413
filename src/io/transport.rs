//! The transport seam: what the IO layer needs from a byte stream. Plain TCP is the first
//! implementation; a TLS session over TCP is the second.

use std::io::{self, IoSlice};
#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
use std::io::{Read, Write};
use std::net::Shutdown;
use std::sync::Arc;

use mio::net::TcpStream;

use super::budget::Budget;

/// A non-blocking byte stream registered with the loop's poll.
pub(crate) trait Transport: mio::event::Source {
    /// Reads received bytes into `buf`; `Ok(0)` is the end of the stream.
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize>;
    /// Writes some of `bufs`, in order.
    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize>;
    /// Writes some of `buf`.
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.write_vectored(&[IoSlice::new(buf)])
    }
    /// Ends the sending side once everything given is out.
    fn shutdown_write(&mut self) -> io::Result<()>;
    /// Whether a read shorter than the buffer proves the stream is drained for now. True for
    /// a plain socket on epoll (see [`crate::io::engine`]); a transport that decodes records
    /// may hold more than it returns.
    fn short_read_drains(&self) -> bool;
    /// The TCP socket underneath (addresses, options, connect progress).
    fn tcp(&self) -> &TcpStream;
    /// Writes bytes the transport holds itself (TLS records the socket did not take, a
    /// handshake flight); called when the socket becomes writable, before any queued data.
    fn flush_pending(&mut self) -> io::Result<()> {
        Ok(())
    }
    /// Whether the transport holds bytes of its own to write (keep WRITABLE registered, do not
    /// end the stream yet).
    fn wants_write(&self) -> bool {
        false
    }
    /// Whether writing, refused until now by the transport (a TLS handshake in progress),
    /// became possible since the last call: queued data must be written now, as no writable
    /// event will come for it.
    fn take_write_ready(&mut self) -> bool {
        false
    }
    /// Memory the transport holds for this peer and the peer can fill (a TLS record received in
    /// part, ciphertext the socket did not take): what the memory budget weighs beside the
    /// connection's own buffers when it picks whom to pause and close.
    fn held(&self) -> usize {
        0
    }
    /// The smallest buffer a read can work with (a TLS record must fit, decrypted beside its
    /// ciphertext), however short the memory budget runs.
    fn min_read(&self) -> usize {
        0
    }
    /// Drops received bytes the transport holds and reads nothing more: the end of the input.
    /// Returns whether it held any (a TLS record received in part, which no later read can
    /// make sense of without). Called when the budget closes the connection.
    fn discard_input(&mut self) -> bool {
        false
    }
}

/// A stream as an engine slot keeps it, beside what the streams of one loop share (a server
/// loop's TLS sessions, by slot). The engine joins the two for each call ([`SlotStream::io`]),
/// so a slot holds no more than its socket, and whatever the loop keeps for a slot goes with
/// it ([`SlotStream::release`]).
pub(crate) trait SlotStream: mio::event::Source + Sized {
    /// What the streams of one loop share; owned by the engine.
    type Loop;
    /// The stream joined with what the loop keeps for it: what reads and writes.
    type Io<'a>: Transport
    where
        Self: 'a;
    /// The loop's share, for an engine whose connections count against `budget`.
    fn new_loop(budget: &Arc<Budget>) -> Self::Loop;
    /// The stream of slot `key`, joined with what `lp` keeps for it.
    fn io<'a>(&'a mut self, key: usize, lp: &'a mut Self::Loop) -> Self::Io<'a>;
    /// The TCP socket underneath (addresses, options, connect progress).
    fn tcp(&self) -> &TcpStream;
    /// [`Transport::held`], for slot `key`.
    fn held(&self, key: usize, lp: &Self::Loop) -> usize;
    /// [`Transport::wants_write`], for slot `key`.
    fn wants_write(&self, key: usize, lp: &Self::Loop) -> bool;
    /// [`Transport::min_read`], for slot `key`.
    fn min_read(&self, key: usize, lp: &Self::Loop) -> usize;
    /// Gives back what `lp` keeps for slot `key`, which is being removed.
    fn release(&mut self, _key: usize, _lp: &mut Self::Loop) {}
    /// Memory the loop's streams have freed since the last call (TLS sessions and their
    /// buffers, which the engine does not see go): part of what decides when the heap is
    /// trimmed.
    fn take_freed(_lp: &mut Self::Loop) -> usize {
        0
    }
}

/// A transport that keeps everything it needs itself, as a slot's stream.
pub(crate) struct Direct<'a, T>(&'a mut T);

impl<T: Transport> SlotStream for T {
    type Loop = ();
    type Io<'a>
        = Direct<'a, T>
    where
        T: 'a;
    fn new_loop(_: &Arc<Budget>) {}
    #[inline]
    fn io<'a>(&'a mut self, _: usize, _: &'a mut ()) -> Direct<'a, T> {
        Direct(self)
    }
    fn tcp(&self) -> &TcpStream {
        Transport::tcp(self)
    }
    #[inline]
    fn held(&self, _: usize, _: &()) -> usize {
        Transport::held(self)
    }
    #[inline]
    fn wants_write(&self, _: usize, _: &()) -> bool {
        Transport::wants_write(self)
    }
    fn min_read(&self, _: usize, _: &()) -> usize {
        Transport::min_read(self)
    }
}

impl<T: Transport> mio::event::Source for Direct<'_, T> {
    fn register(&mut self, r: &mio::Registry, t: mio::Token, i: mio::Interest) -> io::Result<()> {
        self.0.register(r, t, i)
    }
    fn reregister(&mut self, r: &mio::Registry, t: mio::Token, i: mio::Interest) -> io::Result<()> {
        self.0.reregister(r, t, i)
    }
    fn deregister(&mut self, r: &mio::Registry) -> io::Result<()> {
        self.0.deregister(r)
    }
}

impl<T: Transport> Transport for Direct<'_, T> {
    #[inline]
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.0.read(buf)
    }
    #[inline]
    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        self.0.write_vectored(bufs)
    }
    #[inline]
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.write(buf)
    }
    fn shutdown_write(&mut self) -> io::Result<()> {
        self.0.shutdown_write()
    }
    #[inline]
    fn short_read_drains(&self) -> bool {
        self.0.short_read_drains()
    }
    fn tcp(&self) -> &TcpStream {
        self.0.tcp()
    }
    #[inline]
    fn flush_pending(&mut self) -> io::Result<()> {
        self.0.flush_pending()
    }
    #[inline]
    fn wants_write(&self) -> bool {
        self.0.wants_write()
    }
    #[inline]
    fn take_write_ready(&mut self) -> bool {
        self.0.take_write_ready()
    }
    #[inline]
    fn held(&self) -> usize {
        self.0.held()
    }
    fn min_read(&self) -> usize {
        self.0.min_read()
    }
    fn discard_input(&mut self) -> bool {
        self.0.discard_input()
    }
}

impl Transport for TcpStream {
    #[inline]
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        tcp_read(self, buf)
    }
    #[inline]
    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        tcp_write_vectored(self, bufs)
    }
    #[inline]
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        tcp_write(self, buf)
    }
    fn shutdown_write(&mut self) -> io::Result<()> {
        self.shutdown(Shutdown::Write)
    }
    fn short_read_drains(&self) -> bool {
        // Edge-triggered epoll reports bytes that arrive after a read as a new event, so a read
        // that did not fill the buffer has taken everything there was. Other backends (kqueue
        // through mio is edge-triggered too, but its EOF and error reporting differs) get the
        // extra read that returns WouldBlock.
        cfg!(any(target_os = "linux", target_os = "android"))
    }
    fn tcp(&self) -> &TcpStream {
        self
    }
}

// The socket calls of the hot path. glibc's `recv`, `send` and `writev` are thread cancellation
// points: once a process has a second thread (`serve --threads 2`), every call enables and
// disables asynchronous cancellation around the system call, about 50 instructions each way
// (`WSLOOP_BENCH_SERVE_ARGS="--threads 2" cargo bench --bench instructions`: 761 instructions per
// echo against 582 for one thread, 102 of them in `__pthread_{en,dis}able_asynccancel`). No
// loop is ever cancelled, so on glibc the system calls are made directly; elsewhere through std.
// On x86-64 they are made with the `syscall` instruction itself rather than through glibc's
// `syscall()`, which moves all six arguments and sets `errno` (about 20 instructions a call,
// twice per echoed message).

/// A system call with six arguments, made directly; a negative result is `-errno`.
///
/// # Safety
/// As for the system call `nr` with these arguments: pointers among them must be valid for
/// what the call reads and writes.
#[cfg(all(target_os = "linux", target_env = "gnu", target_arch = "x86_64"))]
#[inline(always)]
unsafe fn syscall6(nr: libc::c_long, a: [usize; 6]) -> isize {
    let ret: isize;
    // SAFETY: the x86-64 Linux system call convention: the number in rax, the arguments in rdi,
    // rsi, rdx, r10, r8 and r9, the result in rax; the kernel clobbers rcx and r11 and nothing
    // else, and does not use the user stack. Memory is not declared untouched (the call may
    // write to what the arguments point to); the caller vouches for the pointers.
    unsafe {
        core::arch::asm!(
            "syscall",
            inlateout("rax") nr as isize => ret,
            in("rdi") a[0],
            in("rsi") a[1],
            in("rdx") a[2],
            in("r10") a[3],
            in("r8") a[4],
            in("r9") a[5],
            lateout("rcx") _,
            lateout("r11") _,
            options(nostack),
        );
    }
    ret
}

/// [`syscall6`] through glibc where the instruction is not written here.
///
/// # Safety
/// As for the system call `nr` with these arguments.
#[cfg(all(target_os = "linux", target_env = "gnu", not(target_arch = "x86_64")))]
#[inline(always)]
unsafe fn syscall6(nr: libc::c_long, a: [usize; 6]) -> isize {
    // SAFETY: the caller's promise for the call; glibc's `syscall` passes the arguments on.
    let n = unsafe { libc::syscall(nr, a[0], a[1], a[2], a[3], a[4], a[5]) };
    if n < 0 {
        -(io::Error::last_os_error().raw_os_error().unwrap_or(libc::EIO) as isize)
    } else {
        n as isize
    }
}

/// Reads from a non-blocking TCP socket, as `recv(fd, buf, len, 0)`.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[inline]
pub(crate) fn tcp_read(s: &TcpStream, buf: &mut [u8]) -> io::Result<usize> {
    use std::os::fd::AsRawFd;
    // SAFETY: `buf` is valid for writes of `buf.len()` bytes for the whole call, the descriptor
    // is owned by `s` and open, and null address pointers ask for no source address (`recv`).
    let n = unsafe {
        syscall6(
            libc::SYS_recvfrom,
            [s.as_raw_fd() as usize, buf.as_mut_ptr() as usize, buf.len(), 0, 0, 0],
        )
    };
    result(n)
}

/// Writes to a non-blocking TCP socket, as std does: `send(fd, buf, len, MSG_NOSIGNAL)`.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[inline]
pub(crate) fn tcp_write(s: &TcpStream, buf: &[u8]) -> io::Result<usize> {
    use std::os::fd::AsRawFd;
    // SAFETY: `buf` is valid for reads of `buf.len()` bytes for the whole call, the descriptor
    // is owned by `s` and open, and a null address is what `send` passes.
    let n = unsafe {
        syscall6(
            libc::SYS_sendto,
            [
                s.as_raw_fd() as usize,
                buf.as_ptr() as usize,
                buf.len(),
                libc::MSG_NOSIGNAL as usize,
                0,
                0,
            ],
        )
    };
    result(n)
}

/// Writes some of `bufs` to a non-blocking TCP socket, as std does: `writev`.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[inline]
pub(crate) fn tcp_write_vectored(s: &TcpStream, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
    use std::os::fd::AsRawFd;
    // Past IOV_MAX the kernel refuses the call (EINVAL); std caps the count the same way.
    let count = bufs.len().min(1024);
    // SAFETY: `IoSlice` is guaranteed ABI-compatible with `iovec` on Unix; the `count`
    // entries and the bytes they point to stay borrowed for the whole call; the descriptor is
    // owned by `s` and open.
    let n = unsafe {
        syscall6(
            libc::SYS_writev,
            [s.as_raw_fd() as usize, bufs.as_ptr() as usize, count, 0, 0, 0],
        )
    };
    result(n)
}

/// A system call's result: the count, or the error `-n` names.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[inline]
fn result(n: isize) -> io::Result<usize> {
    if n < 0 {
        Err(os_error(n))
    } else {
        Ok(n as usize)
    }
}

/// The error a system call's negative result names (out of line: building it is not on the
/// path of a call that succeeds).
#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[cold]
#[inline(never)]
fn os_error(n: isize) -> io::Error {
    io::Error::from_raw_os_error(n.wrapping_neg() as i32)
}

/// Reads from a non-blocking TCP socket.
#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
#[inline]
pub(crate) fn tcp_read(mut s: &TcpStream, buf: &mut [u8]) -> io::Result<usize> {
    Read::read(&mut s, buf)
}

/// Writes to a non-blocking TCP socket.
#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
#[inline]
pub(crate) fn tcp_write(mut s: &TcpStream, buf: &[u8]) -> io::Result<usize> {
    Write::write(&mut s, buf)
}

/// Writes some of `bufs` to a non-blocking TCP socket.
#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
#[inline]
pub(crate) fn tcp_write_vectored(mut s: &TcpStream, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
    Write::write_vectored(&mut s, bufs)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    #[test]
    fn socket_calls_move_bytes_and_report_errors() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let mut peer = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (ours, _) = listener.accept().unwrap();
        ours.set_nonblocking(true).unwrap();
        let ours = TcpStream::from_std(ours);

        // Nothing to read yet: WouldBlock, not 0.
        let mut buf = [0u8; 64];
        assert_eq!(tcp_read(&ours, &mut buf).unwrap_err().kind(), io::ErrorKind::WouldBlock);

        assert_eq!(tcp_write(&ours, b"one ").unwrap(), 4);
        let parts = [IoSlice::new(b"two "), IoSlice::new(b""), IoSlice::new(b"three")];
        assert_eq!(tcp_write_vectored(&ours, &parts).unwrap(), 9);
        let mut got = [0u8; 13];
        peer.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"one two three");

        peer.write_all(b"back").unwrap();
        let start = std::time::Instant::now();
        let n = loop {
            match tcp_read(&ours, &mut buf) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock && start.elapsed().as_secs() < 5 => {
                    std::thread::yield_now()
                }
                r => break r.unwrap(),
            }
        };
        assert_eq!(&buf[..n], b"back");

        // The peer's end: 0, the end of the stream.
        drop(peer);
        let start = std::time::Instant::now();
        loop {
            match tcp_read(&ours, &mut buf) {
                Ok(0) => break,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock && start.elapsed().as_secs() < 5 => {
                    std::thread::yield_now()
                }
                r => panic!("expected the end of the stream, got {r:?}"),
            }
        }
        // Writing to a closed peer is an error, not a signal that kills the process.
        let start = std::time::Instant::now();
        let err = loop {
            match tcp_write(&ours, &[0u8; 1024]) {
                Ok(_) if start.elapsed().as_secs() < 5 => std::thread::yield_now(),
                Ok(_) => panic!("writes to a closed peer kept succeeding"),
                Err(e) => break e,
            }
        };
        assert!(
            matches!(err.kind(), io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset),
            "{err:?}"
        );
    }
}
