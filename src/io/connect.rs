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
        bind_source(&socket, ip)?;
    }
    match socket.connect(&addr.into()) {
        Ok(()) => {}
        Err(e) if in_progress(&e) => {}
        Err(e) => return Err(e),
    }
    Ok(TcpStream::from_std(socket.into()))
}

/// Binds the socket to a source address, leaving the port to `connect`
/// (`IP_BIND_ADDRESS_NO_PORT`): `bind` alone would pick a port that no socket on the same
/// port holds, whatever its address, and take it before `connect`; `connect` only needs the
/// whole four-tuple unused.
fn bind_source(socket: &Socket, ip: IpAddr) -> io::Result<()> {
    let one: libc::c_int = 1;
    // SAFETY: setsockopt reads `size_of::<c_int>()` bytes from a live local, on a descriptor
    // that `socket` owns; a kernel without the option answers with an error, ignored (the
    // port is then chosen at bind, as before).
    unsafe {
        libc::setsockopt(
            std::os::fd::AsRawFd::as_raw_fd(socket),
            libc::IPPROTO_IP,
            libc::IP_BIND_ADDRESS_NO_PORT,
            (&one as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        );
    }
    socket.bind(&SocketAddr::new(ip, 0).into())
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_source_port_is_chosen_at_connect_not_at_bind() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let socket = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
        let src: IpAddr = "127.0.0.3".parse().unwrap();
        bind_source(&socket, src).unwrap();
        let bound = socket.local_addr().unwrap().as_socket().unwrap();
        assert_eq!((bound.ip(), bound.port()), (src, 0), "no port taken at bind");
        socket.connect(&listener.local_addr().unwrap().into()).unwrap();
        let connected = socket.local_addr().unwrap().as_socket().unwrap();
        assert_eq!(connected.ip(), src);
        assert_ne!(connected.port(), 0);
        let (_, peer) = listener.accept().unwrap();
        assert_eq!(peer, connected);
    }
}
