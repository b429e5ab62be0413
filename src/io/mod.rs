//! The one IO layer under every driver: the transport seam, outbound queues with
//! write-or-queue, interest updates, non-blocking connect, one token scheme, one timer queue,
//! and the engine that runs many connections on one poll loop. The server, the client and the
//! load generator are thin drivers over it.

// Each driver uses part of this layer; builds with only some drivers leave the rest unused.
#![cfg_attr(not(all(feature = "server", feature = "bench")), allow(dead_code, unused_imports))]

pub(crate) mod budget;
pub(crate) mod connect;
#[cfg(any(feature = "server", feature = "client"))]
pub(crate) mod engine;
pub(crate) mod outbox;
pub(crate) mod stream;
pub(crate) mod sys;
pub(crate) mod timer;
#[cfg(feature = "tls")]
pub(crate) mod tls;
pub(crate) mod transport;

/// A socket error in plain words ("connection refused", "timed out"): what a report or an error
/// message shows, without the OS error number or the type's Debug text. A TLS failure carried
/// inside says itself.
pub(crate) fn describe(e: &std::io::Error) -> String {
    use std::io::ErrorKind as K;
    let words = match e.kind() {
        K::ConnectionRefused => "connection refused",
        K::ConnectionReset => "connection reset by the peer",
        K::ConnectionAborted => "connection aborted",
        K::TimedOut => "timed out",
        K::BrokenPipe => "the peer closed the connection",
        K::AddrNotAvailable => "no local address or port available",
        K::AddrInUse => "address in use",
        K::NotConnected => "not connected",
        K::HostUnreachable => "host unreachable",
        K::NetworkUnreachable => "network unreachable",
        K::NetworkDown => "network down",
        K::PermissionDenied => "permission denied",
        K::OutOfMemory => "out of memory",
        _ => {
            let text = e.to_string();
            // "Too many open files (os error 24)": the words without the number.
            return match text.find(" (os error ") {
                Some(i) => text[..i].to_ascii_lowercase(),
                None => text,
            };
        }
    };
    words.to_string()
}
