//! Certificate reload: the TLS settings that new handshakes take, swapped while the server
//! runs ([`Handle::reload_tls`], SIGHUP). Connections already accepted keep the settings they
//! started with: each session holds its own reference to them.

use std::sync::{Arc, Mutex};

use super::handle::Handle;
use crate::tls::ServerTls;

/// The TLS settings for new handshakes, shared by every loop of one server.
pub(super) struct CurrentTls(Mutex<ServerTls>);

impl CurrentTls {
    pub(super) fn new(tls: ServerTls) -> CurrentTls {
        CurrentTls(Mutex::new(tls))
    }

    /// The settings now (a lock held for a reference count: nothing next to a handshake).
    pub(super) fn get(&self) -> ServerTls {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// The rustls configuration for a connection accepted now.
    pub(super) fn config(&self) -> Arc<rustls::ServerConfig> {
        Arc::clone(&self.0.lock().unwrap_or_else(|e| e.into_inner()).config)
    }

    pub(super) fn set(&self, tls: ServerTls) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = tls;
    }
}

/// SIGHUP: reads the certificate and key files again and swaps them in for new handshakes. A
/// file that does not give a usable pair is refused, and the settings in use are kept.
pub(super) fn reload_on_signal(handle: &Handle) {
    let Some(current) = &handle.group.tls else {
        log::info!("SIGHUP: this server has no TLS: no certificate to reload");
        return;
    };
    let tls = current.get();
    let Some((cert, key)) = tls.files() else {
        log::warn!("SIGHUP: the certificate was not read from files: nothing to reload");
        return;
    };
    match tls.reload() {
        Ok(new) => {
            current.set(new);
            log::info!(
                "SIGHUP: certificate reloaded from {} and {}: new handshakes use it, open connections stay",
                cert.display(),
                key.display()
            );
        }
        Err(e) => log::error!("SIGHUP: certificate reload refused, the old one stays in use: {e}"),
    }
}
