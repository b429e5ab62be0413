//! SIGINT and SIGTERM for a running server, and SIGHUP (reload the certificate).

use std::io::{self, Read};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use mio::{Interest, Poll};

use super::SIGNALS;

/// SIGINT and SIGTERM delivered through a pipe into the poll while a server runs; the default
/// action (terminate) before and after. SIGHUP through a pipe of its own (it does not stop the
/// server), registered under the same token.
pub(super) struct Signals {
    read: mio::net::UnixStream,
    hangup: mio::net::UnixStream,
    ids: Vec<signal_hook::SigId>,
}

/// How many servers handle signals now, and the flag that lets the default action through
/// when none does.
static SIGNAL_STATE: Mutex<(usize, Option<Arc<AtomicBool>>)> = Mutex::new((0, None));

impl Signals {
    pub(super) fn install(poll: &Poll) -> io::Result<Signals> {
        let (read, write) = std::os::unix::net::UnixStream::pair()?;
        read.set_nonblocking(true)?;
        write.set_nonblocking(true)?;
        let mut state = SIGNAL_STATE.lock().unwrap_or_else(|e| e.into_inner());
        if state.1.is_none() {
            // signal-hook keeps its handler installed for good; this action restores the
            // default behaviour whenever no server is running.
            let idle = Arc::new(AtomicBool::new(true));
            for sig in [
                signal_hook::consts::SIGINT,
                signal_hook::consts::SIGTERM,
                signal_hook::consts::SIGHUP,
            ] {
                signal_hook::flag::register_conditional_default(sig, Arc::clone(&idle))?;
            }
            state.1 = Some(idle);
        }
        let mut ids = Vec::new();
        for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
            ids.push(signal_hook::low_level::pipe::register(sig, write.try_clone()?)?);
        }
        let (hangup, hangup_write) = std::os::unix::net::UnixStream::pair()?;
        hangup.set_nonblocking(true)?;
        hangup_write.set_nonblocking(true)?;
        ids.push(signal_hook::low_level::pipe::register(
            signal_hook::consts::SIGHUP,
            hangup_write,
        )?);
        state.0 += 1;
        if let Some(idle) = &state.1 {
            idle.store(false, Ordering::SeqCst);
        }
        let mut read = mio::net::UnixStream::from_std(read);
        poll.registry().register(&mut read, SIGNALS, Interest::READABLE)?;
        let mut hangup = mio::net::UnixStream::from_std(hangup);
        poll.registry().register(&mut hangup, SIGNALS, Interest::READABLE)?;
        Ok(Signals { read, hangup, ids })
    }

    /// Signals received since the last call.
    pub(super) fn drain(&mut self) -> usize {
        read_all(&mut self.read)
    }

    /// Whether SIGHUP came since the last call (several count as one: one reload does).
    pub(super) fn take_hangup(&mut self) -> bool {
        read_all(&mut self.hangup) > 0
    }
}

/// Bytes read from a signal pipe until it is empty.
fn read_all(pipe: &mut mio::net::UnixStream) -> usize {
    let mut n = 0;
    let mut b = [0u8; 16];
    while let Ok(k) = pipe.read(&mut b) {
        if k == 0 {
            break;
        }
        n += k;
    }
    n
}

/// SIGHUP: reloads the certificate files of a TLS server (see
/// [`Handle::reload_tls`](super::Handle::reload_tls)); says there is nothing to reload otherwise.
pub(super) fn on_hangup(handle: &super::Handle) {
    #[cfg(feature = "tls")]
    super::tls_reload::reload_on_signal(handle);
    #[cfg(not(feature = "tls"))]
    {
        let _ = handle;
        log::info!("SIGHUP: this server has no TLS: no certificate to reload");
    }
}

impl Drop for Signals {
    fn drop(&mut self) {
        for id in self.ids.drain(..) {
            signal_hook::low_level::unregister(id);
        }
        let mut state = SIGNAL_STATE.lock().unwrap_or_else(|e| e.into_inner());
        state.0 -= 1;
        if state.0 == 0 {
            if let Some(idle) = &state.1 {
                idle.store(true, Ordering::SeqCst);
            }
        }
    }
}
