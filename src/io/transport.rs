//! The transport seam: what the IO layer needs from a byte stream. Plain TCP is the first
//! implementation; a TLS session over TCP is the second.

use std::io::{self, IoSlice, Read, Write};
use std::net::Shutdown;

use mio::net::TcpStream;

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
}

impl Transport for TcpStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        Read::read(self, buf)
    }
    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        Write::write_vectored(self, bufs)
    }
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        Write::write(self, buf)
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
