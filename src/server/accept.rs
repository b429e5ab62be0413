//! Accepting and admitting connections: the limits on slots and on connections per address,
//! refusals, running out of descriptors, and giving back what admission took.

use std::fs::File;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;

use mio::net::TcpStream;

#[cfg(feature = "tls")]
use super::handle::Group;
use super::handler::{ConnData, PeerAddr, ServerEngine};
use super::serve::Srv;
use super::{config, peer_log, Handler};
use crate::io::outbox::write_some;
use crate::io::sys::is_resource_error;
#[cfg(feature = "tls")]
use crate::io::{stream::ServerStream, tls::NewSession};
use crate::proto::Reject;

/// The driver timer that resumes accepting after running out of descriptors.
pub(super) const ACCEPT_TIMER: u64 = u64::MAX >> 1;

/// Out of descriptors, waiting clients refused per pause (bounded: a peer reconnecting as fast
/// as it is refused must not hold the loop).
const REFUSE_AT_ONCE: usize = 256;

/// A TLS session for an accepted socket, with the certificate in use now, when the server speaks
/// TLS. (The metrics listener's connections, `admin`, are plain HTTP.)
#[cfg(feature = "tls")]
fn tls_session(group: &Group, admin: bool) -> io::Result<Option<NewSession>> {
    match &group.tls {
        Some(t) if !admin => NewSession::new(&t.config()).map(Some),
        _ => Ok(None),
    }
}

impl<H: Handler> Srv<H> {
    pub(super) fn accept_all(&mut self, eng: &mut ServerEngine<H::State>) {
        if self.accept_paused {
            return;
        }
        loop {
            let Some(listener) = &self.listener else { return };
            let (stream, addr) = match listener.accept() {
                Ok(x) => x,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if is_resource_error(&e) => {
                    if !self.emfile_logged {
                        log::warn!("accept failed: {e}; refusing new connections with 503 until descriptors free up (logged once)");
                        self.emfile_logged = true;
                    }
                    // Out of descriptors: the spare one lets each waiting client in to be told
                    // why and closed at once (one at a time, it would leave the rest hanging in
                    // the backlog), then accepting pauses briefly instead of spinning.
                    if self.spare_fd.take().is_some() {
                        let mut b = Vec::new();
                        Reject::new(503, "too many connections").write(&mut b);
                        for _ in 0..REFUSE_AT_ONCE {
                            let Ok((mut s, a)) = listener.accept() else { break };
                            self.loop_state.stats.refused += 1;
                            peer_log(log::Level::Debug, a, format_args!(": refused, out of descriptors"));
                            let _ = write_some(&mut s, &b);
                        }
                        self.spare_fd = File::open("/dev/null").ok();
                    }
                    self.accept_paused = true;
                    eng.set_timer_at(eng.now + 100, ACCEPT_TIMER);
                    return;
                }
                Err(e) => {
                    log::debug!("accept failed: {e}");
                    continue;
                }
            };
            self.add_connection(eng, stream, addr, false);
        }
    }

    /// Admits an accepted connection; `admin`: from the metrics listener (plain HTTP, only the
    /// built-in routes).
    pub(super) fn add_connection(
        &mut self,
        eng: &mut ServerEngine<H::State>,
        stream: TcpStream,
        addr: SocketAddr,
        admin: bool,
    ) {
        self.loop_state.counters.accepted += 1;
        // Counted over every loop; given back by `give_back`, from `on_removed` or below.
        let slots = self.group().slots.fetch_add(1, Ordering::Relaxed);
        let mut over = slots >= self.cfg.max_connections;
        let mut why = "too many connections";
        if over {
            peer_log(
                log::Level::Debug,
                addr,
                format_args!(": refused, {slots} connections open"),
            );
        } else if let Some(limit) = self.cfg.max_connections_per_ip {
            let counted = self
                .group()
                .per_ip
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .add_below(addr.ip(), limit);
            if !counted {
                over = true;
                why = "too many connections from this address";
                peer_log(
                    log::Level::Debug,
                    addr,
                    format_args!(": refused, {limit} connections from this address"),
                );
            }
        }
        let mut refusal = Vec::new();
        if over {
            self.loop_state.stats.refused += 1;
            Reject::new(503, why).write(&mut refusal);
            if slots >= self.cfg.max_connections + (config::FD_RESERVE as usize / 2) {
                // No room even to linger: write the answer if the kernel takes it, then drop.
                self.give_back(None, false);
                if !self.tls() {
                    let mut s = stream;
                    let _ = write_some(&mut s, &refusal);
                }
                return;
            }
        }
        let _ = stream.set_nodelay(true);
        if let Some(idle) = self.cfg.tcp_keepalive {
            let ka = socket2::TcpKeepalive::new().with_time(idle);
            let _ = socket2::SockRef::from(&stream).set_tcp_keepalive(&ka);
        }
        let mut conn = crate::proto::Connection::server(eng.now);
        if over {
            conn.set_closed(eng.now);
        }
        let peer = PeerAddr::new(addr, &mut self.loop_state.peers);
        let data_counted = !over && self.cfg.max_connections_per_ip.is_some();
        let data = ConnData::new(peer, data_counted);
        #[cfg(feature = "tls")]
        let session = match tls_session(self.group(), admin) {
            Ok(s) => s,
            Err(e) => {
                peer_log(log::Level::Warn, addr, format_args!(": {e}"));
                self.give_back(Some(peer), data_counted);
                return;
            }
        };
        #[cfg(feature = "tls")]
        let stream = ServerStream::plain(stream);
        #[cfg(not(feature = "tls"))]
        let _ = admin; // plain HTTP either way
        match eng.insert(stream, conn, data) {
            Ok(key) => {
                #[cfg(feature = "tls")]
                if let Some(session) = session {
                    eng.streams.start(key, session);
                }
                if over {
                    eng.send_raw(key, &refusal);
                    eng.settle(key);
                }
            }
            Err(e) => {
                self.give_back(Some(peer), data_counted);
                peer_log(log::Level::Warn, addr, format_args!(": register failed: {e}"));
            }
        }
    }

    /// Gives back what admitting a connection took: its slot (counted over every loop for
    /// `max_connections`) and, once it has them, its peer-table entry and its count under the
    /// per-IP limit (`counted`). The one way out for a connection, whether it never reached the
    /// engine or the engine has removed it.
    pub(super) fn give_back(&mut self, peer: Option<PeerAddr>, counted: bool) {
        self.group().slots.fetch_sub(1, Ordering::Relaxed);
        let Some(peer) = peer else { return };
        if counted {
            let ip = peer.get(&self.loop_state.peers).ip();
            self.group().per_ip.lock().unwrap_or_else(|e| e.into_inner()).remove(ip);
        }
        peer.release(&mut self.loop_state.peers);
    }

    /// Whether connections speak TLS.
    fn tls(&self) -> bool {
        #[cfg(feature = "tls")]
        return self.cfg.tls.is_some();
        #[cfg(not(feature = "tls"))]
        false
    }
}
