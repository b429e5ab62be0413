//! Non-blocking connect, one way for every driver.

use std::io;
use std::net::{IpAddr, SocketAddr};

use mio::net::TcpStream;
use socket2::{Domain, Protocol, Socket, Type};

/// Starts a non-blocking connect to `addr`, from `src` if given (port chosen by the kernel),
/// with `TCP_NODELAY` set. The connection is usable once [`finished`] says so.
pub(crate) fn start(addr: SocketAddr, src: Option<IpAddr>) -> io::Result<TcpStream> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_nonblocking(true)?;
    socket.set_tcp_nodelay(true)?;
    if let Some(ip) = src {
        socket.bind(&SocketAddr::new(ip, 0).into())?;
    }
    match socket.connect(&addr.into()) {
        Ok(()) => {}
        Err(e) if in_progress(&e) => {}
        Err(e) => return Err(e),
    }
    Ok(TcpStream::from_std(socket.into()))
}

fn in_progress(e: &io::Error) -> bool {
    e.raw_os_error() == Some(libc::EINPROGRESS) || e.kind() == io::ErrorKind::WouldBlock
}

/// After a writable (or error) event on a connecting socket: `Ok(true)` once connected,
/// `Ok(false)` while still in progress, or why it failed (mio's recipe: a pending socket error,
/// else whether the peer address is known yet).
pub(crate) fn finished(stream: &TcpStream) -> io::Result<bool> {
    if let Some(e) = stream.take_error()? {
        return Err(e);
    }
    match stream.peer_addr() {
        Ok(_) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::NotConnected || in_progress(&e) => Ok(false),
        Err(e) => Err(e),
    }
}
