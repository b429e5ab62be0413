//! `tt-echo`: tokio + tokio-tungstenite echo server, used only as a
//! throughput reference for wsloop's benchmarks.
//!
//! Usage: `tt-echo ADDR` (e.g. `127.0.0.1:0`). Prints exactly one line,
//! `listening on ADDR`, to stderr with the bound address, then serves until
//! killed. Everything is left at tokio-tungstenite's defaults (which accept
//! frames up to 16 MiB and messages up to 64 MiB); the only tuning is
//! `TCP_NODELAY` on accepted sockets.

use std::net::SocketAddr;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::{Error, Message};

fn listen_arg() -> String {
    let mut args = std::env::args().skip(1);
    match (args.next(), args.next()) {
        (Some(addr), None) => addr,
        _ => {
            eprintln!("usage: tt-echo LISTEN_ADDR   (e.g. 127.0.0.1:0)");
            std::process::exit(2);
        }
    }
}

#[tokio::main]
async fn main() {
    let addr = listen_arg();
    let listener = match TcpListener::bind(&addr).await {
        Ok(l) => l,
        Err(e) => {
            eprintln!("tt-echo: cannot bind {addr}: {e}");
            std::process::exit(1);
        }
    };
    match listener.local_addr() {
        Ok(local) => eprintln!("listening on {local}"),
        Err(e) => {
            eprintln!("tt-echo: local_addr: {e}");
            std::process::exit(1);
        }
    }

    loop {
        match listener.accept().await {
            Ok((stream, peer)) => {
                tokio::spawn(async move {
                    if let Err(e) = serve(stream).await {
                        log_error(peer, &e);
                    }
                });
            }
            Err(e) => {
                // e.g. EMFILE: back off briefly instead of spinning.
                eprintln!("tt-echo: accept: {e}");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }
}

async fn serve(stream: TcpStream) -> Result<(), Error> {
    stream.set_nodelay(true)?;
    let mut ws = tokio_tungstenite::accept_async(stream).await?;
    while let Some(msg) = ws.next().await {
        match msg? {
            msg @ (Message::Text(_) | Message::Binary(_)) => ws.send(msg).await?,
            // Pings are answered by tungstenite itself (the pong is flushed
            // on the next read/write). On Close, tungstenite queues the
            // reply; polling the stream again flushes it and then ends it.
            Message::Ping(_) | Message::Pong(_) | Message::Close(_) | Message::Frame(_) => {}
        }
    }
    Ok(())
}

fn log_error(peer: SocketAddr, e: &Error) {
    match e {
        // Normal end of a connection, nothing to report.
        Error::ConnectionClosed | Error::AlreadyClosed => {}
        _ => eprintln!("tt-echo: {peer}: {e}"),
    }
}
