//! Code shared by the tokio-tungstenite peers, `tt-echo` and `tt-tls-echo`.

use std::net::SocketAddr;

use futures_util::{FutureExt, SinkExt, StreamExt};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio_tungstenite::tungstenite::{Error, Message};
use tokio_tungstenite::WebSocketStream;

/// Binds `addr`, prints the one line `listening on ADDR` to stderr (the bound address), or
/// exits with status 1.
pub async fn listen(bin: &str, addr: &str) -> TcpListener {
    let listener = match TcpListener::bind(addr).await {
        Ok(l) => l,
        Err(e) => {
            eprintln!("{bin}: cannot bind {addr}: {e}");
            std::process::exit(1);
        }
    };
    match listener.local_addr() {
        Ok(local) => eprintln!("listening on {local}"),
        Err(e) => {
            eprintln!("{bin}: local_addr: {e}");
            std::process::exit(1);
        }
    }
    listener
}

/// Echoes every text and binary message until the connection ends, batching the replies
/// the way tokio-tungstenite is used for throughput.
///
/// `SinkExt::send` is `feed` + `flush`: one write to the socket per message. Here each reply
/// is `feed`-ed (queued in tungstenite's write buffer, which writes out by itself only past
/// its 128 KiB default), and the sink is flushed once no further message is ready without
/// waiting: one write per burst of pipelined messages. This is what `StreamExt::forward`
/// does (tokio-tungstenite's own echo example), without the lock that `split` adds.
///
/// `now_or_never` polls `next()` once and drops it if it is pending; the `Stream` side of
/// `WebSocketStream` is cancel-safe, so no input is lost. Pongs and the close reply that
/// tungstenite queues itself go out with the next flush or read.
pub async fn echo<S>(ws: &mut WebSocketStream<S>) -> Result<(), Error>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    while let Some(msg) = ws.next().await {
        reply(ws, msg?).await?;
        loop {
            match ws.next().now_or_never() {
                Some(Some(msg)) => reply(ws, msg?).await?,
                // Ended: reading past a Close already wrote the queued echoes and the reply.
                Some(None) => return Ok(()),
                None => break,
            }
        }
        ws.flush().await?;
    }
    Ok(())
}

async fn reply<S>(ws: &mut WebSocketStream<S>, msg: Message) -> Result<(), Error>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    match msg {
        Message::Text(_) | Message::Binary(_) => ws.feed(msg).await,
        // Pings are answered and Close is replied to by tungstenite itself.
        Message::Ping(_) | Message::Pong(_) | Message::Close(_) | Message::Frame(_) => Ok(()),
    }
}

/// Logs a connection's error, unless it is a normal end.
pub fn log_error(bin: &str, peer: SocketAddr, e: &Error) {
    match e {
        Error::ConnectionClosed | Error::AlreadyClosed => {}
        _ => eprintln!("{bin}: {peer}: {e}"),
    }
}
