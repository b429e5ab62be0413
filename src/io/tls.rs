//! The second transport: TLS over TCP with rustls's unbuffered API.
//!
//! No buffer lives with an idle connection. Received records are decrypted out of the loop's
//! shared read buffer (its upper half holds ciphertext, its lower half takes the plaintext) and
//! outgoing records are encrypted into one scratch buffer per thread. A connection keeps only
//! its session state and, while they exist, the unfinished record it received and the
//! ciphertext the socket did not take.

use std::cell::RefCell;
use std::io::{self, IoSlice, Read, Write};
use std::net::Shutdown;
use std::sync::Arc;

use mio::net::TcpStream;
use rustls::client::UnbufferedClientConnection;
use rustls::server::UnbufferedServerConnection;
use rustls::unbuffered::{
    ConnectionState, EncodeError, EncryptError, InsufficientSizeError, UnbufferedStatus, WriteTraffic,
};

use super::budget::Budget;
use super::transport::{tcp_read, tcp_write, tcp_write_vectored, SlotStream, Transport};

/// One side of a TLS session, as the stream drives it.
pub(crate) trait Side {
    /// rustls's per-side connection data.
    type Data;
    /// The client side (a server answers a plain HTTP request before failing).
    const IS_CLIENT: bool;
    /// Feeds received ciphertext to the session.
    fn process<'c, 'i>(&'c mut self, incoming: &'i mut [u8]) -> UnbufferedStatus<'c, 'i, Self::Data>;
}

impl Side for UnbufferedServerConnection {
    type Data = rustls::server::ServerConnectionData;
    const IS_CLIENT: bool = false;
    fn process<'c, 'i>(&'c mut self, incoming: &'i mut [u8]) -> UnbufferedStatus<'c, 'i, Self::Data> {
        self.process_tls_records(incoming)
    }
}

impl Side for UnbufferedClientConnection {
    type Data = rustls::client::ClientConnectionData;
    const IS_CLIENT: bool = true;
    fn process<'c, 'i>(&'c mut self, incoming: &'i mut [u8]) -> UnbufferedStatus<'c, 'i, Self::Data> {
        self.process_tls_records(incoming)
    }
}

// Session flags.
/// Application data may be sent.
const HANDSHAKE_DONE: u16 = 1;
/// The handshake completed since the last `take_write_ready`.
const WRITE_READY: u16 = 2;
/// The last socket read took everything the socket had.
const DRAINED: u16 = 4;
/// Our FIN goes out once the pending ciphertext is written.
const FIN_PENDING: u16 = 8;
/// The peer sent close_notify or ended the TCP stream.
const PEER_CLOSED: u16 = 16;
/// The session failed; nothing more is read or written.
const FAILED: u16 = 32;
/// Our close_notify is queued.
const CLOSE_SENT: u16 = 64;
/// Some bytes were received (a plain HTTP request is answered only as the first bytes).
const SEEN_BYTES: u16 = 128;
/// Received bytes are read and dropped: the budget closed the connection while a record was
/// arriving, and nothing after that record can be decrypted.
const DISCARDING: u16 = 256;

/// What a TLS connection keeps between events.
struct Session<S> {
    conn: S,
    /// Ciphertext received that is not yet a whole record (empty, unallocated, when idle).
    pending_in: Vec<u8>,
    /// Ciphertext the socket did not take (empty, unallocated, when idle).
    pending_out: Vec<u8>,
    /// What of the two buffers is counted against the server's memory budget (server
    /// sessions; a client's stays 0).
    charged: usize,
    flags: u16,
}

/// A TLS session over a non-blocking TCP socket (the client's and the load generator's).
pub(crate) struct TlsStream<S> {
    tcp: TcpStream,
    s: Box<Session<S>>,
}

/// A socket and its session, wherever the session is kept: the transport's logic.
pub(crate) struct Tls<'a, S> {
    tcp: &'a mut TcpStream,
    s: &'a mut Session<S>,
}

/// A TLS failure inside an `io::Error`, so that drivers can tell it from a socket error.
#[derive(Debug)]
pub(crate) struct TlsFailure(pub(crate) rustls::Error);

impl std::fmt::Display for TlsFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        crate::tls::TlsError::from(&self.0).fmt(f)
    }
}

impl std::error::Error for TlsFailure {}

fn invalid(why: &'static str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, why)
}

/// Plaintext encrypted per write call at most (the rest waits in the caller's queue).
const WRITE_BUDGET: usize = 64 << 10;
/// What rustls adds to a record at most (header, nonce, tag, content type, padding margin).
const RECORD_OVERHEAD: usize = 64;
/// The smallest read buffer a TLS read works with: the longest record rustls accepts (16 KiB of
/// plaintext, 2 KiB of expansion, the header) beside its plaintext, with room to spare.
const MIN_READ: usize = 40 << 10;
/// The scratch buffer is given back when a large write grew it past this.
const KEEP_SCRATCH: usize = 256 << 10;

thread_local! {
    /// Ciphertext on its way to a socket: one buffer for every connection of a loop.
    static SCRATCH: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// The answer to a plain HTTP request on a TLS port.
const PLAIN_ON_TLS: &[u8] = b"HTTP/1.1 400 Bad Request\r\nConnection: close\r\nContent-Type: text/plain\r\nContent-Length: 52\r\n\r\nThis port speaks TLS: use https:// or wss:// here.\r\n";

/// Writes `out` to the socket as far as it goes; what is written leaves `out`, and an emptied
/// buffer gives its memory back.
fn write_pending(tcp: &mut TcpStream, out: &mut Vec<u8>) -> io::Result<()> {
    let mut done = 0;
    while done < out.len() {
        match Write::write(tcp, &out[done..]) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
            Err(e) => return Err(e),
        }
    }
    if done == out.len() {
        *out = Vec::new();
    } else {
        out.drain(..done);
    }
    Ok(())
}

/// Reads and drops what the socket has, until it has nothing more (`WouldBlock`) or it ends
/// (`Ok(0)`): the peer's bytes leave the kernel, so that closing the socket later sends a FIN
/// rather than a reset.
fn discard(tcp: &mut TcpStream, buf: &mut [u8]) -> io::Result<usize> {
    loop {
        match Read::read(tcp, buf) {
            Ok(0) => return Ok(0),
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

/// Appends what an `EncodeTlsData` state holds (a handshake message or an alert) to `out`.
fn encode<D>(e: &mut rustls::unbuffered::EncodeTlsData<'_, D>, out: &mut Vec<u8>) {
    let start = out.len();
    let mut need = 512;
    loop {
        out.resize(start + need, 0);
        match e.encode(&mut out[start..]) {
            Ok(n) => {
                out.truncate(start + n);
                return;
            }
            Err(EncodeError::InsufficientSize(InsufficientSizeError { required_size })) => need = required_size,
            Err(_) => {
                out.truncate(start);
                return;
            }
        }
    }
}

impl<S> Session<S> {
    fn new(conn: S) -> Self {
        Session {
            conn,
            pending_in: Vec::new(),
            pending_out: Vec::new(),
            charged: 0,
            flags: 0,
        }
    }

    /// What the buffers a peer can fill hold: up to a record received in part (rustls refuses
    /// longer ones) and the ciphertext of one write the socket did not take.
    fn held(&self) -> usize {
        self.pending_in.capacity() + self.pending_out.capacity()
    }
}

impl<S: Side> TlsStream<S> {
    /// Wraps a connected socket with a new session.
    pub(crate) fn new(tcp: TcpStream, conn: S) -> Self {
        TlsStream {
            tcp,
            s: Box::new(Session::new(conn)),
        }
    }

    fn tls(&mut self) -> Tls<'_, S> {
        Tls {
            tcp: &mut self.tcp,
            s: &mut self.s,
        }
    }
}

impl<S: Side> Tls<'_, S> {
    /// Marks the session failed, sends the alert rustls queued for the peer (best effort), and
    /// returns the error. `rest` is the received ciphertext not yet discarded: rustls may still
    /// refer to it.
    fn fail(&mut self, err: rustls::Error, rest: &mut [u8]) -> io::Error {
        let s = &mut *self.s;
        s.flags |= FAILED;
        if let Ok(ConnectionState::EncodeTlsData(mut e)) = s.conn.process(rest).state {
            encode(&mut e, &mut s.pending_out);
        }
        let _ = write_pending(self.tcp, &mut s.pending_out);
        io::Error::new(io::ErrorKind::InvalidData, TlsFailure(err))
    }

    /// Runs the session over received ciphertext `inc`: handshake messages are answered,
    /// application data goes to `plain`. Returns the bytes of `inc` used up and the plaintext
    /// length. Stops when the session needs more input or may send application data.
    fn pump(&mut self, inc: &mut [u8], plain: &mut [u8]) -> io::Result<(usize, usize)> {
        let (mut off, mut pl) = (0, 0);
        loop {
            let s = &mut *self.s;
            let UnbufferedStatus { mut discard, state } = s.conn.process(&mut inc[off..]);
            let (mut stop, mut failed) = (false, None);
            match state {
                Ok(ConnectionState::ReadTraffic(mut r)) => {
                    while let Some(rec) = r.next_record() {
                        let rec = match rec {
                            Ok(rec) => rec,
                            Err(e) => {
                                failed = Some(e);
                                break;
                            }
                        };
                        let n = rec.payload.len();
                        // Plaintext is shorter than the ciphertext it came in, and `plain` is
                        // at least as long as `inc`: it always fits.
                        let Some(dst) = plain.get_mut(pl..pl + n) else {
                            return Err(invalid("TLS plaintext larger than the read buffer"));
                        };
                        dst.copy_from_slice(rec.payload);
                        pl += n;
                        discard += rec.discard;
                    }
                }
                Ok(ConnectionState::EncodeTlsData(mut e)) => encode(&mut e, &mut s.pending_out),
                Ok(ConnectionState::TransmitTlsData(t)) => {
                    write_pending(self.tcp, &mut s.pending_out)?;
                    t.done();
                }
                Ok(ConnectionState::WriteTraffic(_)) => {
                    if s.flags & HANDSHAKE_DONE == 0 {
                        s.flags |= HANDSHAKE_DONE | WRITE_READY;
                    }
                    stop = true;
                }
                Ok(ConnectionState::PeerClosed | ConnectionState::Closed) => {
                    s.flags |= PEER_CLOSED;
                    stop = true;
                }
                // BlockedHandshake (more input needed), or early data, which is not enabled.
                Ok(_) => stop = true,
                Err(e) => failed = Some(e),
            }
            off += discard;
            if let Some(e) = failed {
                return Err(self.fail(e, &mut inc[off..]));
            }
            if stop {
                return Ok((off, pl));
            }
        }
    }

    /// Drives the session over the unfinished record it holds (no new input): starts a
    /// client's handshake, answers what is pending.
    fn advance(&mut self) -> io::Result<()> {
        let mut inc = std::mem::take(&mut self.s.pending_in);
        let r = self.pump(&mut inc, &mut []);
        if let Ok((used, _)) = r {
            inc.drain(..used);
        }
        self.s.pending_in = inc;
        r.map(|_| ())
    }

    /// Calls `f` with the session's writer once nothing else must go first. `Ok(None)`: the
    /// session cannot send application data yet.
    fn with_writer<R>(
        &mut self,
        f: impl FnOnce(&mut WriteTraffic<'_, S::Data>) -> io::Result<R>,
    ) -> io::Result<Option<R>> {
        let mut f = Some(f);
        loop {
            let s = &mut *self.s;
            let UnbufferedStatus { discard, state } = s.conn.process(&mut s.pending_in);
            let result = match state {
                Ok(ConnectionState::WriteTraffic(mut w)) => f.take().map(|f| f(&mut w)),
                Ok(ConnectionState::EncodeTlsData(mut e)) => {
                    encode(&mut e, &mut s.pending_out);
                    None
                }
                Ok(ConnectionState::TransmitTlsData(t)) => {
                    write_pending(self.tcp, &mut s.pending_out)?;
                    t.done();
                    None
                }
                Ok(ConnectionState::PeerClosed) => None,
                Ok(ConnectionState::Closed) => return Err(io::ErrorKind::BrokenPipe.into()),
                Ok(_) => return Ok(None),
                Err(e) => {
                    s.pending_in.drain(..discard);
                    let mut rest = std::mem::take(&mut s.pending_in);
                    return Err(self.fail(e, &mut rest));
                }
            };
            s.pending_in.drain(..discard);
            if let Some(r) = result {
                return r.map(Some);
            }
        }
    }

    /// Encrypts what `bufs` hold (up to [`WRITE_BUDGET`]) into `out`; returns the plaintext
    /// taken and the ciphertext length.
    fn encrypt(
        w: &mut WriteTraffic<'_, S::Data>,
        bufs: &[IoSlice<'_>],
        out: &mut Vec<u8>,
    ) -> io::Result<(usize, usize)> {
        let (mut taken, mut used) = (0, 0);
        for b in bufs {
            let mut b: &[u8] = b;
            while !b.is_empty() && taken < WRITE_BUDGET {
                let chunk = &b[..b.len().min(WRITE_BUDGET - taken)];
                let need = used + chunk.len() + (chunk.len() / 16384 + 1) * RECORD_OVERHEAD;
                if out.len() < need {
                    out.resize(need, 0);
                }
                match w.encrypt(chunk, &mut out[used..]) {
                    Ok(n) => used += n,
                    Err(EncryptError::InsufficientSize(InsufficientSizeError { required_size })) => {
                        out.resize(used + required_size, 0);
                        continue;
                    }
                    Err(e) => return Err(io::Error::other(e.to_string())),
                }
                taken += chunk.len();
                b = &b[chunk.len()..];
            }
        }
        Ok((taken, used))
    }
}

impl<S: Side> mio::event::Source for TlsStream<S> {
    fn register(&mut self, r: &mio::Registry, t: mio::Token, i: mio::Interest) -> io::Result<()> {
        self.tcp.register(r, t, i)
    }
    fn reregister(&mut self, r: &mio::Registry, t: mio::Token, i: mio::Interest) -> io::Result<()> {
        self.tcp.reregister(r, t, i)
    }
    fn deregister(&mut self, r: &mio::Registry) -> io::Result<()> {
        self.tcp.deregister(r)
    }
}

impl<S: Side> Tls<'_, S> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            let flags = self.s.flags;
            if flags & FAILED != 0 {
                return Err(io::ErrorKind::BrokenPipe.into());
            }
            if flags & PEER_CLOSED != 0 {
                return Ok(0);
            }
            if flags & DISCARDING != 0 {
                return discard(self.tcp, buf);
            }
            // Ciphertext goes to the upper half, plaintext to the lower half.
            let (plain, inc) = buf.split_at_mut(buf.len() / 2);
            let kept = self.s.pending_in.len();
            if kept >= inc.len() {
                return Err(invalid("TLS record larger than the read buffer"));
            }
            let (n, eof) = match Read::read(&mut self.tcp, &mut inc[kept..]) {
                Ok(0) => (0, true),
                Ok(n) => (n, false),
                Err(e) => return Err(e),
            };
            inc[..kept].copy_from_slice(&self.s.pending_in);
            let end = kept + n;
            if flags & (SEEN_BYTES | HANDSHAKE_DONE) == 0 && n > 0 {
                self.s.flags |= SEEN_BYTES;
                // A TLS record starts with a content type (20 to 24); a letter is an HTTP
                // method: tell the browser or tool in its own language, then close.
                if inc[0].is_ascii_uppercase() && !S::IS_CLIENT {
                    let _ = Write::write(&mut self.tcp, PLAIN_ON_TLS);
                    self.s.flags |= FAILED;
                    return Err(invalid("plain HTTP request on the TLS port"));
                }
            }
            let drained = !eof && end < inc.len();
            if eof {
                self.s.flags |= PEER_CLOSED;
            }
            let (used, pl) = self.pump(&mut inc[..end], plain)?;
            let rest = &inc[used..end];
            if rest.is_empty() {
                self.s.pending_in = Vec::new();
            } else {
                self.s.pending_in.clear();
                self.s.pending_in.extend_from_slice(rest);
            }
            if drained {
                self.s.flags |= DRAINED;
            } else {
                self.s.flags &= !DRAINED;
            }
            if pl > 0 {
                return Ok(pl);
            }
            if self.s.flags & PEER_CLOSED != 0 {
                return Ok(0);
            }
            if drained {
                return Err(io::ErrorKind::WouldBlock.into());
            }
        }
    }

    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        if self.s.flags & FAILED != 0 {
            return Err(io::ErrorKind::BrokenPipe.into());
        }
        if !self.s.pending_out.is_empty() {
            write_pending(self.tcp, &mut self.s.pending_out)?;
            if !self.s.pending_out.is_empty() {
                return Err(io::ErrorKind::WouldBlock.into());
            }
        }
        if self.s.flags & HANDSHAKE_DONE == 0 {
            self.advance()?;
            if self.s.flags & HANDSHAKE_DONE == 0 {
                return Err(io::ErrorKind::WouldBlock.into());
            }
        }
        SCRATCH.with_borrow_mut(|out| {
            let r = self.with_writer(|w| Self::encrypt(w, bufs, out));
            let (taken, used) = match r? {
                Some(x) => x,
                None => return Err(io::ErrorKind::WouldBlock.into()),
            };
            // Everything taken is sent or kept: what the socket refuses waits here.
            let mut done = 0;
            while done < used {
                match Write::write(&mut self.tcp, &out[done..used]) {
                    Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                    Ok(k) => done += k,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) => return Err(e),
                }
            }
            self.s.pending_out.extend_from_slice(&out[done..used]);
            if out.len() > KEEP_SCRATCH {
                *out = Vec::new();
            }
            Ok(taken)
        })
    }

    fn shutdown_write(&mut self) -> io::Result<()> {
        if self.s.flags & (HANDSHAKE_DONE | FAILED | CLOSE_SENT) == HANDSHAKE_DONE {
            self.s.flags |= CLOSE_SENT;
            let mut alert = [0u8; 64];
            if let Some(n) = self.with_writer(|w| Ok(w.queue_close_notify(&mut alert).unwrap_or(0)))? {
                self.s.pending_out.extend_from_slice(&alert[..n]);
            }
        }
        write_pending(self.tcp, &mut self.s.pending_out)?;
        if self.s.pending_out.is_empty() {
            self.tcp.shutdown(Shutdown::Write)
        } else {
            self.s.flags |= FIN_PENDING;
            Ok(())
        }
    }

    fn flush_pending(&mut self) -> io::Result<()> {
        if self.s.pending_out.is_empty() {
            return Ok(());
        }
        write_pending(self.tcp, &mut self.s.pending_out)?;
        if self.s.pending_out.is_empty() && self.s.flags & FIN_PENDING != 0 {
            self.s.flags &= !FIN_PENDING;
            self.tcp.shutdown(Shutdown::Write)?;
        }
        Ok(())
    }

    fn take_write_ready(&mut self) -> bool {
        let ready = self.s.flags & WRITE_READY != 0;
        self.s.flags &= !WRITE_READY;
        ready
    }

    /// Drops the record received in part, and from now on everything received (what follows
    /// it cannot be decrypted without it); writing goes on. Returns whether a record was
    /// arriving.
    fn discard_input(&mut self) -> bool {
        let held = !self.s.pending_in.is_empty();
        if held {
            self.s.pending_in = Vec::new();
            self.s.flags |= DISCARDING;
        }
        held
    }
}

impl<S: Side> Transport for TlsStream<S> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.tls().read(buf)
    }
    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        self.tls().write_vectored(bufs)
    }
    fn shutdown_write(&mut self) -> io::Result<()> {
        self.tls().shutdown_write()
    }
    fn short_read_drains(&self) -> bool {
        self.s.flags & DRAINED != 0
    }
    fn flush_pending(&mut self) -> io::Result<()> {
        self.tls().flush_pending()
    }
    fn wants_write(&self) -> bool {
        !self.s.pending_out.is_empty()
    }
    fn take_write_ready(&mut self) -> bool {
        self.tls().take_write_ready()
    }
    fn tcp(&self) -> &TcpStream {
        &self.tcp
    }
    fn held(&self) -> usize {
        self.s.held()
    }
    fn min_read(&self) -> usize {
        MIN_READ
    }
    fn discard_input(&mut self) -> bool {
        self.tls().discard_input()
    }
}

/// A server connection's stream: its TCP socket. A TLS connection's session is kept by the
/// loop ([`LoopTls`]) under the connection's slot, and joined with the socket for each call
/// ([`ServerIo`]): a TLS connection's slot stays as small as a plain one, and the server loop
/// is compiled once for both kinds (a second copy of it changes how the plain path is
/// optimised: ~120 more instructions per echo, `cargo bench --bench instructions`).
pub(crate) struct ServerStream(TcpStream);

type ServerSession = Session<UnbufferedServerConnection>;

/// A server-side TLS session not yet given to a loop ([`LoopTls::start`]).
pub(crate) struct NewSession(Box<ServerSession>);

impl NewSession {
    /// A session that will answer a client's handshake with `config`.
    pub(crate) fn new(config: &Arc<rustls::ServerConfig>) -> io::Result<NewSession> {
        let conn = UnbufferedServerConnection::new(Arc::clone(config)).map_err(io::Error::other)?;
        Ok(NewSession(Box::new(Session::new(conn))))
    }
}

/// What a server session costs besides its buffers: the box, and rustls's own allocations
/// after a handshake (certificate-free state, keys, the transcript's remains; under 4 KiB in
/// tests/tls_memory.rs), taken here as 2 KiB. Only the trim's trigger uses it.
const SESSION_FOOTPRINT: usize = std::mem::size_of::<ServerSession>() + (2 << 10);

/// The TLS side of a server loop: the sessions of its TLS connections, by slot, and the memory
/// budget their buffers count against. The loop's engine owns it, so a session lives no
/// longer than the loop, and leaves with its slot ([`SlotStream::release`]).
pub(crate) struct LoopTls {
    /// By slot key; `None` for a plain connection (the metrics listener's) or a free slot.
    sessions: Vec<Option<Box<ServerSession>>>,
    tally: Tally,
}

/// What a loop's sessions are counted in.
pub(crate) struct Tally {
    budget: Arc<Budget>,
    /// Memory the sessions freed since the loop last asked (a trim's trigger).
    freed: usize,
    /// Handshakes completed, and sessions failed (for the metrics).
    handshakes: u64,
    failures: u64,
}

impl Tally {
    /// Counts what a call on session `s` changed: its buffers against the budget, and a
    /// handshake completed or a failure (`before`: its flags before the call).
    fn note(&mut self, s: &mut ServerSession, before: u16) {
        let held = s.held();
        if held != s.charged {
            if held < s.charged {
                self.freed += s.charged - held;
            }
            self.budget.add(held);
            self.budget.sub(s.charged);
            s.charged = held;
        }
        let changed = s.flags & !before;
        if changed & (HANDSHAKE_DONE | FAILED) != 0 {
            self.handshakes += u64::from(changed & HANDSHAKE_DONE != 0);
            self.failures += u64::from(changed & FAILED != 0);
        }
    }
}

impl LoopTls {
    fn new(budget: &Arc<Budget>) -> LoopTls {
        LoopTls {
            sessions: Vec::new(),
            tally: Tally {
                budget: Arc::clone(budget),
                freed: 0,
                handshakes: 0,
                failures: 0,
            },
        }
    }

    /// TLS handshakes this loop completed, and sessions that failed.
    pub(crate) fn counts(&self) -> (u64, u64) {
        (self.tally.handshakes, self.tally.failures)
    }

    /// Makes the connection in slot `key` a TLS one, with `session`.
    pub(crate) fn start(&mut self, key: usize, session: NewSession) {
        if self.sessions.len() <= key {
            self.sessions.resize_with(key + 1, || None);
        }
        // A slot's session leaves with it: there is none to replace.
        debug_assert!(self.sessions[key].is_none(), "slot {key} still has a session");
        if let Some(old) = self.sessions[key].replace(session.0) {
            self.drop_session(old);
        }
    }

    fn session(&self, key: usize) -> Option<&ServerSession> {
        self.sessions.get(key)?.as_deref()
    }

    /// Gives back what a session's buffers were counted for, and counts it freed.
    fn drop_session(&mut self, mut s: Box<ServerSession>) {
        s.pending_in = Vec::new();
        s.pending_out = Vec::new();
        let flags = s.flags;
        self.tally.note(&mut s, flags);
        self.tally.freed += SESSION_FOOTPRINT;
    }
}

impl Drop for LoopTls {
    fn drop(&mut self) {
        for s in std::mem::take(&mut self.sessions).into_iter().flatten() {
            self.drop_session(s);
        }
    }
}

impl ServerStream {
    /// A connection's socket; its session, if it speaks TLS, goes to the loop
    /// ([`LoopTls::start`]).
    pub(crate) fn plain(tcp: TcpStream) -> ServerStream {
        ServerStream(tcp)
    }
}

impl mio::event::Source for ServerStream {
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

impl SlotStream for ServerStream {
    type Loop = LoopTls;
    type Io<'a> = ServerIo<'a>;
    fn new_loop(budget: &Arc<Budget>) -> LoopTls {
        LoopTls::new(budget)
    }
    #[inline]
    fn io<'a>(&'a mut self, key: usize, lp: &'a mut LoopTls) -> ServerIo<'a> {
        let LoopTls { sessions, tally } = lp;
        match sessions.get_mut(key) {
            Some(Some(s)) => ServerIo::Tls {
                tls: Tls { tcp: &mut self.0, s },
                tally,
            },
            _ => ServerIo::Plain(&mut self.0),
        }
    }
    fn tcp(&self) -> &TcpStream {
        &self.0
    }
    #[inline]
    fn held(&self, key: usize, lp: &LoopTls) -> usize {
        lp.session(key).map_or(0, |s| s.held())
    }
    #[inline]
    fn wants_write(&self, key: usize, lp: &LoopTls) -> bool {
        lp.session(key).is_some_and(|s| !s.pending_out.is_empty())
    }
    fn min_read(&self, key: usize, lp: &LoopTls) -> usize {
        if lp.session(key).is_some() {
            MIN_READ
        } else {
            0
        }
    }
    fn release(&mut self, key: usize, lp: &mut LoopTls) {
        if let Some(s) = lp.sessions.get_mut(key).and_then(Option::take) {
            lp.drop_session(s);
        }
    }
    fn take_freed(lp: &mut LoopTls) -> usize {
        // The table gives back what a burst of connections grew it to, as the slab does.
        while lp.sessions.last().is_some_and(Option::is_none) {
            lp.sessions.pop();
        }
        if lp.sessions.len() < lp.sessions.capacity() / 4 {
            lp.sessions.shrink_to_fit();
        }
        std::mem::take(&mut lp.tally.freed)
    }
}

/// A server connection's socket joined with its TLS session, if it has one: what the engine
/// reads and writes for one call. What a call changed in a session (its buffers, a handshake
/// completed, a failure) is counted after it.
pub(crate) enum ServerIo<'a> {
    /// A plain TCP connection.
    Plain(&'a mut TcpStream),
    /// A TLS connection.
    Tls {
        tls: Tls<'a, UnbufferedServerConnection>,
        tally: &'a mut Tally,
    },
}

impl ServerIo<'_> {
    fn socket(&mut self) -> &mut TcpStream {
        match self {
            ServerIo::Plain(tcp) => tcp,
            ServerIo::Tls { tls, .. } => tls.tcp,
        }
    }

    /// Runs `f` on the TLS session, if there is one, and counts what it changed.
    fn with_tls<R>(&mut self, f: impl FnOnce(&mut Tls<'_, UnbufferedServerConnection>) -> R) -> Option<R> {
        let ServerIo::Tls { tls, tally } = self else {
            return None;
        };
        let before = tls.s.flags;
        let r = f(tls);
        tally.note(tls.s, before);
        Some(r)
    }
}

impl mio::event::Source for ServerIo<'_> {
    fn register(&mut self, r: &mio::Registry, t: mio::Token, i: mio::Interest) -> io::Result<()> {
        self.socket().register(r, t, i)
    }
    fn reregister(&mut self, r: &mio::Registry, t: mio::Token, i: mio::Interest) -> io::Result<()> {
        self.socket().reregister(r, t, i)
    }
    fn deregister(&mut self, r: &mio::Registry) -> io::Result<()> {
        self.socket().deregister(r)
    }
}

// Each method tests the variant inline and leaves the TLS path out of line, so that the plain
// path stays what it is for a `TcpStream`.
impl ServerIo<'_> {
    #[inline(never)]
    fn read_tls(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.with_tls(|t| t.read(buf))
            .unwrap_or(Err(io::ErrorKind::Unsupported.into()))
    }
    #[inline(never)]
    fn write_tls(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        self.with_tls(|t| t.write_vectored(bufs))
            .unwrap_or(Err(io::ErrorKind::Unsupported.into()))
    }
}

impl Transport for ServerIo<'_> {
    #[inline]
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            ServerIo::Plain(tcp) => tcp_read(tcp, buf),
            ServerIo::Tls { .. } => self.read_tls(buf),
        }
    }
    #[inline]
    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        match self {
            ServerIo::Plain(tcp) => tcp_write_vectored(tcp, bufs),
            ServerIo::Tls { .. } => self.write_tls(bufs),
        }
    }
    #[inline]
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            ServerIo::Plain(tcp) => tcp_write(tcp, buf),
            ServerIo::Tls { .. } => self.write_tls(&[IoSlice::new(buf)]),
        }
    }
    fn shutdown_write(&mut self) -> io::Result<()> {
        match self {
            ServerIo::Plain(tcp) => tcp.shutdown(Shutdown::Write),
            ServerIo::Tls { .. } => self.with_tls(|t| t.shutdown_write()).unwrap_or(Ok(())),
        }
    }
    #[inline]
    fn short_read_drains(&self) -> bool {
        match self {
            ServerIo::Plain(tcp) => tcp.short_read_drains(),
            ServerIo::Tls { tls, .. } => tls.s.flags & DRAINED != 0,
        }
    }
    fn tcp(&self) -> &TcpStream {
        match self {
            ServerIo::Plain(tcp) => tcp,
            ServerIo::Tls { tls, .. } => tls.tcp,
        }
    }
    #[inline]
    fn flush_pending(&mut self) -> io::Result<()> {
        match self {
            ServerIo::Plain(_) => Ok(()),
            ServerIo::Tls { .. } => self.with_tls(|t| t.flush_pending()).unwrap_or(Ok(())),
        }
    }
    #[inline]
    fn wants_write(&self) -> bool {
        match self {
            ServerIo::Plain(_) => false,
            ServerIo::Tls { tls, .. } => !tls.s.pending_out.is_empty(),
        }
    }
    #[inline]
    fn take_write_ready(&mut self) -> bool {
        match self {
            ServerIo::Plain(_) => false,
            ServerIo::Tls { .. } => self.with_tls(|t| t.take_write_ready()).unwrap_or(false),
        }
    }
    #[inline]
    fn held(&self) -> usize {
        match self {
            ServerIo::Plain(_) => 0,
            ServerIo::Tls { tls, .. } => tls.s.held(),
        }
    }
    fn min_read(&self) -> usize {
        match self {
            ServerIo::Plain(_) => 0,
            ServerIo::Tls { .. } => MIN_READ,
        }
    }
    fn discard_input(&mut self) -> bool {
        self.with_tls(|t| t.discard_input()).unwrap_or(false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn server_config() -> Arc<rustls::ServerConfig> {
        let key = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
        let tls =
            crate::tls::ServerTls::from_pem(key.cert.pem().as_bytes(), key.signing_key.serialize_pem().as_bytes())
                .unwrap();
        tls.config
    }

    /// A TLS connection in slot `key` of `lp`, and its peer.
    fn accepted(lp: &mut LoopTls, key: usize) -> (ServerStream, std::net::TcpStream) {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let peer = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (tcp, _) = listener.accept().unwrap();
        tcp.set_nonblocking(true).unwrap();
        lp.start(key, NewSession::new(&server_config()).unwrap());
        (ServerStream::plain(TcpStream::from_std(tcp)), peer)
    }

    /// Sends a handshake record announcing 1,000 bytes, of which 300 come, and reads until the
    /// session holds them.
    fn hold_a_partial_record(stream: &mut ServerStream, key: usize, lp: &mut LoopTls, peer: &mut std::net::TcpStream) {
        let mut part = vec![22, 3, 1, (1000u16 >> 8) as u8, 1000u16 as u8];
        part.extend_from_slice(&[1; 300]);
        std::io::Write::write_all(peer, &part).unwrap();
        let mut buf = vec![0u8; 64 << 10];
        let start = std::time::Instant::now();
        while stream.held(key, lp) == 0 && start.elapsed().as_secs() < 5 {
            match stream.io(key, lp).read(&mut buf) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => std::thread::yield_now(),
                r => panic!("a record in part is neither data nor an error: {r:?}"),
            }
        }
        assert!(stream.held(key, lp) >= part.len(), "the record's bytes are held");
    }

    #[test]
    fn a_record_received_in_part_counts_against_the_budget_until_the_connection_goes() {
        let budget = Budget::new(1 << 20);
        let mut lp = ServerStream::new_loop(&budget);
        let key = 3;
        let (mut stream, mut peer) = accepted(&mut lp, key);
        assert_eq!(budget.used(), 0, "an idle session holds nothing");
        assert_eq!(stream.min_read(key, &lp), MIN_READ);

        hold_a_partial_record(&mut stream, key, &mut lp, &mut peer);
        let held = budget.used();
        assert!(held >= 305, "{held} bytes counted for 305 held");
        assert_eq!(held, stream.held(key, &lp));

        stream.release(key, &mut lp);
        drop(stream);
        assert_eq!(budget.used(), 0, "given back with the connection");
        assert!(lp.session(key).is_none(), "the session left with its slot");
        assert!(ServerStream::take_freed(&mut lp) >= held + SESSION_FOOTPRINT);
        assert_eq!(ServerStream::take_freed(&mut lp), 0, "counted once");
        assert_eq!(
            lp.sessions.capacity(),
            0,
            "the table is given back with its last session"
        );
    }

    #[test]
    fn the_sessions_go_with_their_loop() {
        let budget = Budget::new(1 << 20);
        let mut lp = ServerStream::new_loop(&budget);
        let (mut stream, mut peer) = accepted(&mut lp, 0);
        hold_a_partial_record(&mut stream, 0, &mut lp, &mut peer);
        assert!(budget.used() > 0);
        drop(lp);
        assert_eq!(budget.used(), 0, "a loop that ends gives back what its sessions held");
    }

    #[test]
    fn a_plain_connection_on_a_tls_loop_has_no_session() {
        let budget = Budget::new(1 << 20);
        let mut lp = ServerStream::new_loop(&budget);
        let (_tls, _peer) = accepted(&mut lp, 1);
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let mut peer = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (tcp, _) = listener.accept().unwrap();
        tcp.set_nonblocking(true).unwrap();
        let mut plain = ServerStream::plain(TcpStream::from_std(tcp));
        // Slot 0 (below the TLS one) and slot 7 (past every session) are plain.
        for key in [0, 7] {
            assert!(matches!(plain.io(key, &mut lp), ServerIo::Plain(_)));
            assert_eq!(plain.min_read(key, &lp), 0);
        }
        std::io::Write::write_all(&mut peer, b"GET /").unwrap();
        let mut buf = [0u8; 16];
        let start = std::time::Instant::now();
        let n = loop {
            match plain.io(0, &mut lp).read(&mut buf) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock && start.elapsed().as_secs() < 5 => {
                    std::thread::yield_now()
                }
                r => break r.unwrap(),
            }
        };
        assert_eq!(&buf[..n], b"GET /", "read as it came, not as TLS");
    }

    #[test]
    fn a_server_stream_is_a_bare_socket() {
        // The session lives beside the slot: a TLS connection's slot is a plain one's size.
        assert_eq!(std::mem::size_of::<ServerStream>(), std::mem::size_of::<TcpStream>());
    }
}
