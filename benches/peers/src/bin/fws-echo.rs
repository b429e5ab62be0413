//! `fws-echo`: tokio + fastwebsockets echo server (HTTP upgrade through
//! fastwebsockets' `upgrade` feature, i.e. hyper), used only as a throughput
//! reference for wsloop's benchmarks.
//!
//! Usage: `fws-echo ADDR` (e.g. `127.0.0.1:0`). Prints exactly one line,
//! `listening on ADDR`, to stderr with the bound address, then serves until
//! killed. Written the way fastwebsockets' docs and echo example use it:
//! messages are reassembled with `FragmentCollector` (an unfragmented frame
//! passes through without a copy) and echoed whole; auto-pong and auto-close
//! are on; payloads over 1 KiB go out with one `writev` of header and payload
//! (no copy). `write_frame` writes each frame straight to the socket: the
//! library keeps no write buffer over a plain TCP stream, and `read_frame` is
//! not cancel-safe, so replies cannot be batched the way `tt-echo` batches
//! them. fastwebsockets' default size limit (64 MiB) is kept, so 16 MiB
//! messages are accepted. The only tuning is `TCP_NODELAY` on accepted
//! sockets; tokio's multi-thread runtime, one worker per core.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::Duration;

use fastwebsockets::upgrade::{self, UpgradeFut};
use fastwebsockets::{FragmentCollector, OpCode, WebSocketError};
use http_body_util::Empty;
use hyper::body::{Bytes, Incoming};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};

fn listen_arg() -> String {
    let mut args = std::env::args().skip(1);
    match (args.next(), args.next()) {
        (Some(addr), None) => addr,
        _ => {
            eprintln!("usage: fws-echo LISTEN_ADDR   (e.g. 127.0.0.1:0)");
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
            eprintln!("fws-echo: cannot bind {addr}: {e}");
            std::process::exit(1);
        }
    };
    match listener.local_addr() {
        Ok(local) => eprintln!("listening on {local}"),
        Err(e) => {
            eprintln!("fws-echo: local_addr: {e}");
            std::process::exit(1);
        }
    }

    loop {
        match listener.accept().await {
            Ok((stream, peer)) => {
                tokio::spawn(serve(stream, peer));
            }
            Err(e) => {
                // e.g. EMFILE: back off briefly instead of spinning.
                eprintln!("fws-echo: accept: {e}");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }
}

async fn serve(stream: TcpStream, peer: SocketAddr) {
    if let Err(e) = stream.set_nodelay(true) {
        eprintln!("fws-echo: {peer}: set_nodelay: {e}");
        return;
    }
    let conn = http1::Builder::new()
        .serve_connection(
            TokioIo::new(stream),
            service_fn(move |req| handle(req, peer)),
        )
        .with_upgrades();
    if let Err(e) = conn.await {
        eprintln!("fws-echo: {peer}: http: {e}");
    }
}

fn plain(status: StatusCode) -> Response<Empty<Bytes>> {
    let mut resp = Response::new(Empty::new());
    *resp.status_mut() = status;
    resp
}

async fn handle(
    mut req: Request<Incoming>,
    peer: SocketAddr,
) -> Result<Response<Empty<Bytes>>, Infallible> {
    if !upgrade::is_upgrade_request(&req) {
        return Ok(plain(StatusCode::BAD_REQUEST));
    }
    let (resp, fut) = match upgrade::upgrade(&mut req) {
        Ok(pair) => pair,
        Err(e) => {
            eprintln!("fws-echo: {peer}: upgrade: {e}");
            return Ok(plain(StatusCode::BAD_REQUEST));
        }
    };
    tokio::spawn(async move {
        if let Err(e) = echo(fut).await {
            match e {
                // Normal end of a connection, nothing to report.
                WebSocketError::ConnectionClosed => {}
                e => eprintln!("fws-echo: {peer}: {e}"),
            }
        }
    });
    Ok(resp)
}

async fn echo(fut: UpgradeFut) -> Result<(), WebSocketError> {
    let mut ws = fut.await?;
    // The defaults, stated: they are what this server relies on.
    ws.set_auto_pong(true);
    ws.set_auto_close(true);
    ws.set_writev(true);
    let mut ws = FragmentCollector::new(ws);
    loop {
        let frame = ws.read_frame().await?;
        match frame.opcode {
            // auto_close has already sent the close reply.
            OpCode::Close => return Ok(()),
            OpCode::Text | OpCode::Binary => ws.write_frame(frame).await?,
            // Pings are answered by auto_pong; pongs are ignored.
            _ => {}
        }
    }
}
