//! `tt-tls-echo`: tokio + tokio-tungstenite over tokio-rustls (rustls with the
//! ring provider) echo server, used only as a `wss://` throughput reference
//! for wsloop's benchmarks.
//!
//! Usage: `tt-tls-echo ADDR CERT.pem KEY.pem` (e.g. `127.0.0.1:0`). CERT.pem
//! is the certificate chain, leaf first; KEY.pem its private key (PKCS#8,
//! PKCS#1 RSA or SEC1). Prints exactly one line, `listening on ADDR`, to
//! stderr with the bound address, then serves until killed. The echo loop is
//! `tt-echo`'s (replies batched with `feed`, one `flush` per burst), so a
//! burst also becomes as few TLS records as fit. rustls and tokio-tungstenite
//! are at their defaults (TLS 1.3 and 1.2, no client auth) apart from
//! `TCP_NODELAY`; tokio's multi-thread runtime, one worker per core.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use rustls_pki_types::pem::{self, PemObject};
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::TcpStream;
use tokio_rustls::rustls::{self, ServerConfig};
use tokio_rustls::TlsAcceptor;
use tokio_tungstenite::tungstenite::Error;
use wsloop_bench_peers::{echo, listen, log_error};

const BIN: &str = "tt-tls-echo";

fn args() -> (String, String, String) {
    let mut args = std::env::args().skip(1);
    match (args.next(), args.next(), args.next(), args.next()) {
        (Some(addr), Some(cert), Some(key), None) => (addr, cert, key),
        _ => {
            eprintln!("usage: tt-tls-echo LISTEN_ADDR CERT.pem KEY.pem   (e.g. 127.0.0.1:0)");
            std::process::exit(2);
        }
    }
}

fn tls_config(cert: &str, key: &str) -> Result<ServerConfig, String> {
    let chain = CertificateDer::pem_file_iter(cert)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|e| format!("{cert}: {e}"))?;
    if chain.is_empty() {
        return Err(format!("{cert}: no certificate"));
    }
    let key = PrivateKeyDer::from_pem_file(key).map_err(|e| match e {
        pem::Error::NoItemsFound => format!("{key}: no private key"),
        e => format!("{key}: {e}"),
    })?;
    ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .map_err(|e| format!("certificate and key: {e}"))
}

#[tokio::main]
async fn main() {
    let (addr, cert, key) = args();
    let config = match tls_config(&cert, &key) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{BIN}: {e}");
            std::process::exit(1);
        }
    };
    let acceptor = TlsAcceptor::from(Arc::new(config));
    let listener = listen(BIN, &addr).await;
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => {
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    if let Err(e) = serve(stream, peer, acceptor).await {
                        log_error(BIN, peer, &e);
                    }
                });
            }
            Err(e) => {
                // e.g. EMFILE: back off briefly instead of spinning.
                eprintln!("{BIN}: accept: {e}");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }
}

async fn serve(stream: TcpStream, peer: SocketAddr, acceptor: TlsAcceptor) -> Result<(), Error> {
    stream.set_nodelay(true)?;
    let tls = match acceptor.accept(stream).await {
        Ok(tls) => tls,
        Err(e) => {
            eprintln!("{BIN}: {peer}: TLS handshake: {e}");
            return Ok(());
        }
    };
    let mut ws = tokio_tungstenite::accept_async(tls).await?;
    echo(&mut ws).await
}
