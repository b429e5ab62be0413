//! `tt-echo`: tokio + tokio-tungstenite echo server, used only as a
//! throughput reference for wsloop's benchmarks.
//!
//! Usage: `tt-echo ADDR` (e.g. `127.0.0.1:0`). Prints exactly one line,
//! `listening on ADDR`, to stderr with the bound address, then serves until
//! killed. Replies are batched with `feed` and one `flush` per burst of ready
//! messages (see `wsloop_bench_peers::echo`). Everything else is left at
//! tokio-tungstenite's defaults (frames up to 16 MiB, messages up to 64 MiB,
//! 128 KiB write buffer) apart from `TCP_NODELAY` on accepted sockets. The
//! runtime is tokio's multi-thread one, as users run it: one worker per core.

use std::time::Duration;

use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Error;
use wsloop_bench_peers::{echo, listen, log_error};

const BIN: &str = "tt-echo";

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
    let listener = listen(BIN, &listen_arg()).await;
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => {
                tokio::spawn(async move {
                    if let Err(e) = serve(stream).await {
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

async fn serve(stream: TcpStream) -> Result<(), Error> {
    stream.set_nodelay(true)?;
    let mut ws = tokio_tungstenite::accept_async(stream).await?;
    echo(&mut ws).await
}
