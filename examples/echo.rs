//! An echo server in a screen of code: every message comes back to its sender.
//!
//! Run with `cargo run --example echo`, then connect to ws://127.0.0.1:9001/.

use wsloop::server::{Config, Ctx, Handler, Peer};
use wsloop::{Message, Request, Server};

struct Echo;

impl Handler for Echo {
    fn on_open(&mut self, _ctx: &mut Ctx<'_>, peer: Peer, request: &Request) {
        println!("{} connected to {}", peer.addr, request.path);
    }

    fn on_message(&mut self, ctx: &mut Ctx<'_>, peer: Peer, msg: Message<'_>) {
        ctx.send(peer.id, msg);
    }

    fn on_close(&mut self, _ctx: &mut Ctx<'_>, peer: Peer, code: u16, _reason: &str) {
        println!("{} left ({code})", peer.addr);
    }
}

fn main() -> std::io::Result<()> {
    let config = Config {
        handle_signals: true, // Ctrl-C closes every peer with 1001, then run() returns
        ..Config::default()
    };
    let server = Server::bind("127.0.0.1:9001", config)?;
    println!("listening on ws://{}/", server.local_addr());
    server.run(Echo)
}
