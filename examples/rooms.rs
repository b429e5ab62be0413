//! Chat rooms behind a token: the upgrade decision, per-connection state and topics.
//!
//! ```text
//! cargo run --release --example rooms -- --listen 127.0.0.1:9002 --token SECRET
//! ```
//!
//! Clients connect to `ws://HOST/rooms/NAME` with `Authorization: Bearer SECRET`; browsers,
//! which cannot set headers on a WebSocket, add `?token=SECRET` instead. `&name=NICK` (letters,
//! digits, `-`, `_`; at most 32) names the member, who is otherwise called by their address. A
//! missing or wrong token gets `401`, another path `404`.
//!
//! A text message reaches everyone else in the same room as `NICK: TEXT` (binary messages go
//! as they are), and no one in other rooms. Joins and leaves are announced to the room:
//! `* NICK joined NAME (N here)`, which the joining member gets too, and `* NICK left NAME
//! (N here)`.

use std::process::ExitCode;

use wsloop::prelude::*;

/// What the server keeps for each member: set in `on_upgrade`, used by every callback.
#[derive(Default)]
struct Member {
    room: String,
    name: String,
}

struct Rooms {
    token: String,
}

/// A room or member name: 1 to 32 letters, digits, `-` or `_`.
fn valid_name(s: &str) -> bool {
    (1..=32).contains(&s.len()) && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// Compares without stopping at the first difference, so the time taken does not tell how
/// much of a guess was right.
fn same_secret(a: &str, b: &str) -> bool {
    a.len() == b.len() && a.bytes().zip(b.bytes()).fold(0, |acc, (x, y)| acc | (x ^ y)) == 0
}

impl Handler for Rooms {
    type State = Member;

    fn on_upgrade(&mut self, _ctx: &mut Ctx<'_, Member>, up: &mut Upgrade<'_>) -> Result<Member, Answer> {
        let req = up.request();
        let room = req.path_only().strip_prefix("/rooms/").filter(|r| valid_name(r));
        let Some(room) = room else {
            return Err(Answer::reject(
                404,
                "rooms are at /rooms/NAME (letters, digits, - and _)",
            ));
        };
        let bearer = req.header_str("authorization").and_then(|v| v.strip_prefix("Bearer "));
        let token = bearer.or_else(|| req.query_param("token"));
        if !token.is_some_and(|t| same_secret(t.trim(), &self.token)) {
            let challenge = "Bearer realm=\"rooms\"";
            return Err(Answer::reject(401, "missing or wrong token").with_header("WWW-Authenticate", challenge));
        }
        let name = match req.query_param("name") {
            Some(n) if valid_name(n) => n.to_string(),
            Some(_) => return Err(Answer::reject(400, "a name is 1 to 32 letters, digits, - or _")),
            None => up.peer_addr().to_string(),
        };
        Ok(Member {
            room: room.to_string(),
            name,
        })
    }

    fn on_open(&mut self, ctx: &mut Ctx<'_, Member>, conn: &mut Conn<Member>) {
        let m = &conn.state;
        ctx.subscribe(conn.id(), &m.room);
        let line = format!("* {} joined {} ({} here)", m.name, m.room, ctx.subscribers(&m.room));
        ctx.publish(&m.room, Message::Text(&line), None);
    }

    fn on_message(&mut self, ctx: &mut Ctx<'_, Member>, conn: &mut Conn<Member>, msg: Message<'_>) {
        let m = &conn.state;
        match msg {
            Message::Text(text) => {
                let line = format!("{}: {text}", m.name);
                ctx.publish(&m.room, Message::Text(&line), Some(conn.id()));
            }
            Message::Binary(_) => {
                ctx.publish(&m.room, msg, Some(conn.id()));
            }
        }
    }

    fn on_close(&mut self, ctx: &mut Ctx<'_, Member>, conn: &mut Conn<Member>, _code: u16, _reason: &str) {
        let m = &conn.state;
        ctx.unsubscribe(conn.id(), &m.room);
        let line = format!("* {} left {} ({} here)", m.name, m.room, ctx.subscribers(&m.room));
        ctx.publish(&m.room, Message::Text(&line), None);
    }
}

const USAGE: &str = "usage: rooms --token SECRET [--listen ADDR (default 127.0.0.1:9002)]";

fn main() -> ExitCode {
    run(std::env::args().skip(1))
}

/// The whole program but for where the arguments come from (tests/rooms.rs runs it).
fn run(mut args: impl Iterator<Item = String>) -> ExitCode {
    let mut listen = "127.0.0.1:9002".to_string();
    let mut token = None;
    while let Some(arg) = args.next() {
        match (arg.as_str(), args.next()) {
            ("--listen", Some(v)) => listen = v,
            ("--token", Some(v)) if !v.is_empty() => token = Some(v),
            _ => {
                eprintln!("{USAGE}");
                return ExitCode::from(2);
            }
        }
    }
    let Some(token) = token else {
        eprintln!("{USAGE}");
        return ExitCode::from(2);
    };
    let mut cfg = ServerConfig::default();
    cfg.handle_signals = true; // Ctrl-C closes every member with 1001
    let server = match Server::bind(listen.as_str(), cfg) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("rooms: cannot listen on {listen}: {e}");
            return ExitCode::FAILURE;
        }
    };
    // The tests wait for this line to learn the port when `--listen` ends in `:0`.
    eprintln!("rooms: listening on {}", server.local_addr());
    match server.run(Rooms { token }) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("rooms: {e}");
            ExitCode::FAILURE
        }
    }
}
