//! Ready-made handlers and the built-in browser page.
//!
//! - [`Echo`]: every message goes back to its sender.
//! - [`Reply`]: every message is answered with the same text, as in the original note.
//! - [`Broadcast`]: a chat room; every message goes to every open connection.
//! - [`page`]: a small self-contained HTML page (no external assets) for
//!   [`ServerConfig::page`](super::ServerConfig::page): it connects back to the host that served
//!   it, shows the connection state and a message log, has an input box, and reconnects with
//!   backoff.

use std::net::SocketAddr;
use std::sync::OnceLock;
use std::time::Duration;

use super::{Conn, Ctx, Handler, Timer, TimerId, Upgrade};
use crate::proto::{Answer, Message};

/// A handler that echoes every message back: the default mode.
#[derive(Clone, Copy, Debug, Default)]
pub struct Echo;

impl Handler for Echo {
    type State = ();
    fn on_upgrade(&mut self, _ctx: &mut Ctx<'_, ()>, _up: &mut Upgrade<'_>) -> Result<(), Answer> {
        Ok(())
    }
    fn on_message(&mut self, ctx: &mut Ctx<'_, ()>, conn: &mut Conn<()>, msg: Message<'_>) {
        // The peer is the one that just spoke: it can be gone only if closing, and then
        // nobody waits for the echo.
        let _ = ctx.send(conn.id(), msg);
    }
}

/// A handler that answers every message with the same text, as the original note's server did.
#[derive(Clone, Debug)]
pub struct Reply(pub String);

impl Handler for Reply {
    type State = ();
    fn on_upgrade(&mut self, _ctx: &mut Ctx<'_, ()>, _up: &mut Upgrade<'_>) -> Result<(), Answer> {
        Ok(())
    }
    fn on_message(&mut self, ctx: &mut Ctx<'_, ()>, conn: &mut Conn<()>, _msg: Message<'_>) {
        let _ = ctx.send_text(conn.id(), &self.0);
    }
}

/// A handler that sends every message from any client to every open connection: a chat room.
///
/// Each message is encoded once and its bytes shared by every peer's queue (see
/// [`Ctx::broadcast`]); peers whose queue is full meet the server's
/// [`SlowConsumer`](super::SlowConsumer) policy. With a cluster
/// ([`ServerConfig::cluster`](super::ServerConfig::cluster)) the room spans every instance:
/// messages and announcements reach their peers too, and the online count includes them.
///
/// With [`announce`](Self::announce), joins and leaves are told in one line per
/// [`ANNOUNCE_EVERY`]: a join costs a counter, not a message to everyone, so a crowd arriving
/// at once cannot swamp the loop. A lone event reads `* 127.0.0.1:50312 joined (3 online)`;
/// several read `* 12 joined, 3 left (2009 online)`.
#[derive(Clone, Debug)]
pub struct Broadcast {
    /// Send a message back to its sender too (default: true).
    pub echo_self: bool,
    /// Tell everyone when peers join or leave (default: false).
    pub announce: bool,
    pending: Pending,
}

/// How often joins and leaves are announced, at most.
pub const ANNOUNCE_EVERY: Duration = Duration::from_millis(200);

/// Joins and leaves not yet announced.
#[derive(Clone, Debug, Default)]
struct Pending {
    joined: u32,
    left: u32,
    /// The one event, while there is only one: joined or left, and who.
    only: Option<(bool, SocketAddr)>,
    /// The timer that will announce them.
    timer: Option<TimerId>,
}

impl Default for Broadcast {
    fn default() -> Self {
        Broadcast::new(true, false)
    }
}

impl Broadcast {
    /// A chat room; `echo_self` sends each message back to its sender too, `announce` tells
    /// everyone about joins and leaves.
    pub fn new(echo_self: bool, announce: bool) -> Self {
        Broadcast {
            echo_self,
            announce,
            pending: Pending::default(),
        }
    }

    fn note(&mut self, ctx: &mut Ctx<'_, ()>, joined: bool, who: SocketAddr) {
        let p = &mut self.pending;
        let first = p.joined + p.left == 0;
        if joined {
            p.joined += 1;
        } else {
            p.left += 1;
        }
        p.only = if first { Some((joined, who)) } else { None };
        if p.timer.is_none() {
            p.timer = Some(ctx.set_timer(ANNOUNCE_EVERY));
        }
    }

    /// Announces what is pending, when `timer` is the announcement's; returns whether it was.
    pub fn on_announce_timer(&mut self, ctx: &mut Ctx<'_, ()>, timer: Timer) -> bool {
        if self.pending.timer != Some(timer.id) {
            return false;
        }
        let p = std::mem::take(&mut self.pending);
        let online = ctx.len_everywhere();
        let line = match p.only {
            Some((true, who)) => format!("* {who} joined ({online} online)"),
            Some((false, who)) => format!("* {who} left ({online} online)"),
            None => format!("* {} joined, {} left ({online} online)", p.joined, p.left),
        };
        ctx.broadcast(Message::Text(&line), None);
        true
    }
}

impl Handler for Broadcast {
    type State = ();

    fn on_upgrade(&mut self, _ctx: &mut Ctx<'_, ()>, _up: &mut Upgrade<'_>) -> Result<(), Answer> {
        Ok(())
    }

    fn on_open(&mut self, ctx: &mut Ctx<'_, ()>, conn: &mut Conn<()>) {
        if self.announce {
            self.note(ctx, true, conn.peer_addr());
        }
    }

    fn on_message(&mut self, ctx: &mut Ctx<'_, ()>, conn: &mut Conn<()>, msg: Message<'_>) {
        let except = if self.echo_self { None } else { Some(conn.id()) };
        ctx.broadcast(msg, except);
    }

    fn on_close(&mut self, ctx: &mut Ctx<'_, ()>, conn: &mut Conn<()>, _code: u16, _reason: &str) {
        // The leaving peer has sent or received its close frame: the announcement, a broadcast
        // to open connections, skips it.
        if self.announce {
            self.note(ctx, false, conn.peer_addr());
        }
    }

    fn on_timer(&mut self, ctx: &mut Ctx<'_, ()>, timer: Timer) {
        self.on_announce_timer(ctx, timer);
    }
}

/// Which flavour of the built-in page to serve; they differ only in title and hint.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PageKind {
    /// An echo console: what you send comes back.
    Echo,
    /// A console for a server that answers every message with the same text.
    Reply,
    /// A chat room: messages go to everyone connected.
    Chat,
}

/// The page's source; `{{MODE}}`, `{{TITLE}}` and `{{HINT}}` are filled in by [`page`].
const TEMPLATE: &str = include_str!("page.html");

/// The built-in page for `kind`, ready for [`ServerConfig::page`](super::ServerConfig::page).
/// It is under 8 KiB, loads nothing from elsewhere, and derives its WebSocket URL from
/// `location.host`, so it works behind a reverse proxy too.
pub fn page(kind: PageKind) -> &'static str {
    static PAGES: [OnceLock<String>; 3] = [OnceLock::new(), OnceLock::new(), OnceLock::new()];
    let (i, mode, title, hint) = match kind {
        PageKind::Echo => (0, "echo", "echo console", "every message comes back to you"),
        PageKind::Reply => (1, "reply", "reply console", "every message gets the same answer"),
        PageKind::Chat => (2, "broadcast", "chat", "every message goes to everyone connected"),
    };
    PAGES[i].get_or_init(|| {
        fill(
            TEMPLATE,
            &[("{{MODE}}", mode), ("{{TITLE}}", title), ("{{HINT}}", hint)],
        )
    })
}

/// Replaces each placeholder with its value in one pass (a character scan: smaller code than
/// substring search).
fn fill(template: &str, vars: &[(&str, &str)]) -> String {
    let mut out = String::with_capacity(template.len() + 64);
    let mut rest = template;
    while let Some(i) = rest.find('{') {
        out.push_str(&rest[..i]);
        rest = &rest[i..];
        match vars.iter().find(|(k, _)| rest.starts_with(k)) {
            Some((k, v)) => {
                out.push_str(v);
                rest = &rest[k.len()..];
            }
            None => {
                out.push('{');
                rest = &rest[1..];
            }
        }
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pages_are_small_and_self_contained() {
        for kind in [PageKind::Echo, PageKind::Reply, PageKind::Chat] {
            let p = page(kind);
            assert!(p.len() < 8 * 1024, "{kind:?} page is {} bytes", p.len());
            assert!(!p.contains("{{"), "unfilled placeholder in {kind:?} page");
            for external in ["http://", "https://", "src=", "@import", "url("] {
                assert!(
                    !p.contains(external),
                    "{kind:?} page refers to something external: {external}"
                );
            }
            for (i, _) in p.match_indices("href=") {
                assert!(
                    p[i..].starts_with("href=\"data:"),
                    "{kind:?} page links out: {}",
                    &p[i..i + 40]
                );
            }
            assert!(p.contains("location.host"));
        }
        assert!(page(PageKind::Chat).contains("data-mode=\"broadcast\""));
        assert!(std::ptr::eq(page(PageKind::Echo), page(PageKind::Echo)));
    }
}
