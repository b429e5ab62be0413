//! An echo server in a screen of code: every message comes back to its sender.
//!
//! Run with `cargo run --example echo`, then connect to ws://127.0.0.1:9001/.

use wsloop::prelude::*;

struct Echo;

impl Handler for Echo {
    /// Each connection remembers the path it asked for.
    type State = String;

    fn on_upgrade(
        &mut self,
        _ctx: &mut Ctx<'_, String>,
        up: &mut Upgrade<'_>,
    ) -> Result<String, wsloop::proto::Answer> {
        Ok(up.request().path().to_string())
    }

    fn on_open(&mut self, _ctx: &mut Ctx<'_, String>, conn: &mut Conn<String>) {
        println!("{} connected to {}", conn.peer_addr(), conn.state);
    }

    fn on_message(&mut self, ctx: &mut Ctx<'_, String>, conn: &mut Conn<String>, msg: Message<'_>) {
        let _ = ctx.send(conn.id(), msg);
    }

    fn on_close(&mut self, _ctx: &mut Ctx<'_, String>, conn: &mut Conn<String>, code: u16, _reason: &str) {
        println!("{} left {} ({code})", conn.peer_addr(), conn.state);
    }
}

fn main() -> std::io::Result<()> {
    let mut config = ServerConfig::default();
    config.handle_signals = true; // Ctrl-C closes every peer with 1001, then run() returns
    let server = Server::bind("127.0.0.1:9001", config)?;
    println!("listening on ws://{}/", server.local_addr());
    server.run(Echo)
}
