//! An outgoing connection's stream: plain TCP for `ws://`, TLS for `wss://`. The client and the
//! load generator decide per URL; the server picks its transport once, at bind time.

use std::io::{self, IoSlice};

use mio::net::TcpStream;

#[cfg(feature = "tls")]
use super::tls::TlsStream;
use super::transport::Transport;

/// A server connection's stream: TCP, with a TLS session beside it when the server serves TLS.
#[cfg(feature = "tls")]
pub(crate) use super::tls::ServerStream;
/// A server connection's stream.
#[cfg(not(feature = "tls"))]
pub(crate) type ServerStream = TcpStream;

/// Plain TCP or TLS over TCP.
pub(crate) enum ClientStream {
    Plain(TcpStream),
    #[cfg(feature = "tls")]
    Tls(TlsStream<rustls::client::UnbufferedClientConnection>),
}

/// Calls the same method on whichever stream it is.
macro_rules! each {
    ($self:expr, $s:ident => $e:expr) => {
        match $self {
            ClientStream::Plain($s) => $e,
            #[cfg(feature = "tls")]
            ClientStream::Tls($s) => $e,
        }
    };
}

impl mio::event::Source for ClientStream {
    fn register(&mut self, r: &mio::Registry, t: mio::Token, i: mio::Interest) -> io::Result<()> {
        each!(self, s => s.register(r, t, i))
    }
    fn reregister(&mut self, r: &mio::Registry, t: mio::Token, i: mio::Interest) -> io::Result<()> {
        each!(self, s => s.reregister(r, t, i))
    }
    fn deregister(&mut self, r: &mio::Registry) -> io::Result<()> {
        each!(self, s => s.deregister(r))
    }
}

impl Transport for ClientStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        each!(self, s => Transport::read(s, buf))
    }
    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        each!(self, s => Transport::write_vectored(s, bufs))
    }
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        each!(self, s => Transport::write(s, buf))
    }
    fn shutdown_write(&mut self) -> io::Result<()> {
        each!(self, s => s.shutdown_write())
    }
    fn short_read_drains(&self) -> bool {
        each!(self, s => s.short_read_drains())
    }
    fn tcp(&self) -> &TcpStream {
        each!(self, s => s.tcp())
    }
    fn flush_pending(&mut self) -> io::Result<()> {
        each!(self, s => s.flush_pending())
    }
    fn wants_write(&self) -> bool {
        each!(self, s => s.wants_write())
    }
    fn take_write_ready(&mut self) -> bool {
        each!(self, s => s.take_write_ready())
    }
}
