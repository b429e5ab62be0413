//! `wsloop serve`.

use std::ffi::OsString;
use std::io::Write as _;
use std::time::{Duration, Instant};

use wsloop::proto::Answer;
use wsloop::server::modes::{self, Broadcast, Echo, PageKind, Reply};
use wsloop::server::{Conn, Ctx, Handler, Server, ServerConfig, SlowConsumer, Stats, Timer, Upgrade};
use wsloop::Message;

use super::{arg_err, init_log, parse_bytes, parse_duration, value};

const HELP: &str = "\
Usage: wsloop serve [OPTIONS]

Options:
  --listen ADDR            address to listen on [default: 127.0.0.1:9001]
  --mode MODE              echo | reply | broadcast [default: echo]
  --reply TEXT             the answer in reply mode [default: fine thank you]
  --no-echo-self           broadcast mode: do not send a message back to its sender
  --announce               broadcast mode: tell everyone when a peer joins or leaves
  --no-page                answer a plain `GET /` with 426 instead of the browser page
  --stats DUR              print a stats line on stderr every DUR [default: off]
  --max-connections N      connections held; more get 503 [default: open-file limit - 64]
  --max-message BYTES      largest message; larger gets close 1009 [default: 16MiB]
  --max-backpressure BYTES outbound bytes queued per peer before reading pauses [default: 1MiB]
  --slow-consumer POLICY   close | drop: a full queue on broadcast [default: close]
  --handshake-timeout DUR  time to send the request [default: 10s]
  --idle-timeout DUR       close peers silent this long with 1001 [default: off]
  --ping-interval DUR      ping peers silent this long [default: off]
  --tcp-keepalive DUR      TCP keep-alive probes after this idle time [default: off]
  --origin ORIGIN          allow this Origin (repeatable; default: any)
  --protocol NAME          a subprotocol to accept (repeatable)
  --log LEVEL              error | warn | info | debug | trace | off [default: info]
";

/// Only in builds that have it (the server-only build does not).
#[cfg(feature = "deflate")]
const DEFLATE_HELP: &str = "\
  --deflate, --no-deflate  accept permessage-deflate when offered: no memory per idle
                           connection, CPU per message compressed [default: --deflate]
  --deflate-min-size BYTES send messages shorter than this uncompressed, and longer ones
                           that do not shrink; 0 compresses every message [default: 64]
";
#[cfg(not(feature = "deflate"))]
const DEFLATE_HELP: &str = "";

fn opt_duration(s: &str) -> Result<Option<std::time::Duration>, String> {
    let d = parse_duration(s)?;
    Ok(if d.is_zero() { None } else { Some(d) })
}

/// Parses the options and runs the server until it is stopped.
pub fn run(args: Vec<OsString>) -> Result<(), String> {
    use lexopt::prelude::*;
    let mut cfg = ServerConfig::default();
    cfg.handle_signals = true;
    let mut listen = "127.0.0.1:9001".to_string();
    let mut mode = "echo".to_string();
    let mut reply = "fine thank you".to_string();
    let mut log_level = "info".to_string();
    let mut bcast = Broadcast::default();
    let mut bcast_flags = false;
    let mut serve_page = true;
    let mut stats_every = None;
    let mut p = lexopt::Parser::from_args(args);
    while let Some(arg) = p.next().map_err(arg_err)? {
        match arg {
            Long("listen") => listen = value(&mut p)?,
            Long("mode") => mode = value(&mut p)?,
            Long("reply") => reply = value(&mut p)?,
            Long("no-echo-self") => {
                bcast.echo_self = false;
                bcast_flags = true;
            }
            Long("announce") => {
                bcast.announce = true;
                bcast_flags = true;
            }
            Long("no-page") => serve_page = false,
            Long("stats") => stats_every = opt_duration(&value(&mut p)?)?,
            Long("max-connections") => {
                let v = value(&mut p)?;
                cfg.max_connections = v
                    .parse()
                    .ok()
                    .filter(|n| *n > 0)
                    .ok_or(format!("invalid --max-connections '{v}'"))?;
            }
            Long("max-message") => cfg.max_message = parse_bytes(&value(&mut p)?)?,
            Long("max-backpressure") => cfg.max_backpressure = parse_bytes(&value(&mut p)?)?,
            Long("slow-consumer") => {
                cfg.slow_consumer = match value(&mut p)?.as_str() {
                    "close" => SlowConsumer::Close,
                    "drop" => SlowConsumer::Drop,
                    v => return Err(format!("invalid --slow-consumer '{v}' (close or drop)")),
                }
            }
            Long("handshake-timeout") => cfg.handshake_timeout = parse_duration(&value(&mut p)?)?,
            Long("idle-timeout") => cfg.idle_timeout = opt_duration(&value(&mut p)?)?,
            Long("ping-interval") => cfg.ping_interval = opt_duration(&value(&mut p)?)?,
            Long("tcp-keepalive") => cfg.tcp_keepalive = opt_duration(&value(&mut p)?)?,
            Long("origin") => cfg.origins.push(value(&mut p)?),
            Long("protocol") => cfg.protocols.push(value(&mut p)?),
            #[cfg(feature = "deflate")]
            Long("deflate") => cfg.deflate.enabled = true,
            #[cfg(feature = "deflate")]
            Long("no-deflate") => cfg.deflate.enabled = false,
            #[cfg(feature = "deflate")]
            Long("deflate-min-size") => cfg.deflate.min_size = parse_bytes(&value(&mut p)?)?,
            #[cfg(not(feature = "deflate"))]
            Long("deflate" | "deflate-min-size") => return Err(super::NO_DEFLATE.to_string()),
            #[cfg(not(feature = "deflate"))]
            Long("no-deflate") => {}
            Long("log") => log_level = value(&mut p)?,
            Short('h') | Long("help") => {
                print!("{HELP}{DEFLATE_HELP}");
                return Ok(());
            }
            _ => return Err(arg.unexpected().to_string()),
        }
    }
    let kind = match mode.as_str() {
        "echo" => PageKind::Echo,
        "reply" => PageKind::Reply,
        "broadcast" => PageKind::Chat,
        _ => return Err(format!("invalid --mode '{mode}' (echo, reply or broadcast)")),
    };
    if bcast_flags && kind != PageKind::Chat {
        return Err("--no-echo-self and --announce need --mode broadcast".to_string());
    }
    if serve_page {
        cfg.page = Some(modes::page(kind).into());
    }
    init_log(&log_level)?;
    let server = Server::bind(listen.as_str(), cfg).map_err(|e| format!("cannot listen on {listen}: {e}"))?;
    log::info!("listening on {}", server.local_addr());
    // One copy of the loop for every mode: a virtual call per callback costs nothing next to the
    // system calls around it, and three monomorphised loops would cost tens of KB of binary.
    let handler: Box<dyn Handler<State = ()>> = match kind {
        PageKind::Echo => Box::new(Echo),
        PageKind::Reply => Box::new(Reply(reply)),
        PageKind::Chat => Box::new(bcast),
    };
    server
        .run(WithStats::new(handler, stats_every))
        .map_err(|e| format!("server failed: {e}"))
}

/// Wraps a handler that uses no timer of its own, and prints a stats line on stderr every
/// `every`: open connections, messages in and out per second, bytes queued, messages dropped
/// (in total and since the last line) and the process's resident memory.
struct WithStats<H> {
    inner: H,
    every: Option<Duration>,
    /// When the previous line was printed, and the counters then.
    last: Option<(Instant, Stats)>,
}

impl<H: Handler<State = ()>> WithStats<H> {
    fn new(inner: H, every: Option<Duration>) -> Self {
        WithStats {
            inner,
            every,
            last: None,
        }
    }

    fn tick(&mut self, ctx: &mut Ctx<'_, ()>) {
        let Some(every) = self.every else { return };
        let now = Instant::now();
        let stats = ctx.stats();
        if let Some((then, prev)) = self.last {
            let ms = now.duration_since(then).as_millis().max(1) as u64;
            // Per second with one decimal, in integers (no float formatting in the binary).
            let rate = |a: u64, b: u64| {
                let tenths = a.saturating_sub(b) * 10_000 / ms;
                format!("{}.{}", tenths / 10, tenths % 10)
            };
            let line = format!(
                "stats open={} in={}/s out={}/s queued={}B dropped={} (+{}) rss={}",
                stats.open,
                rate(stats.messages_in, prev.messages_in),
                rate(stats.messages_out, prev.messages_out),
                stats.bytes_queued,
                stats.dropped,
                stats.dropped.saturating_sub(prev.dropped),
                wsloop::sys::read_rss(std::process::id())
                    .map_or_else(|| "?".to_string(), |b| format!("{}KiB", b / 1024)),
            );
            // Not eprintln!: a closed stderr must not bring the server down.
            let _ = writeln!(std::io::stderr().lock(), "{line}");
        }
        self.last = Some((now, stats));
        ctx.set_timer(every);
    }
}

impl<H: Handler<State = ()>> Handler for WithStats<H> {
    type State = ();
    fn on_start(&mut self, ctx: &mut Ctx<'_, ()>) {
        self.tick(ctx);
        self.inner.on_start(ctx);
    }
    fn on_upgrade(&mut self, ctx: &mut Ctx<'_, ()>, up: &mut Upgrade<'_>) -> Result<(), Answer> {
        self.inner.on_upgrade(ctx, up)
    }
    fn on_open(&mut self, ctx: &mut Ctx<'_, ()>, conn: &mut Conn<()>) {
        self.inner.on_open(ctx, conn);
    }
    fn on_message(&mut self, ctx: &mut Ctx<'_, ()>, conn: &mut Conn<()>, msg: Message<'_>) {
        self.inner.on_message(ctx, conn, msg);
    }
    fn on_close(&mut self, ctx: &mut Ctx<'_, ()>, conn: &mut Conn<()>, code: u16, reason: &str) {
        self.inner.on_close(ctx, conn, code, reason);
    }
    fn on_timer(&mut self, ctx: &mut Ctx<'_, ()>, _timer: Timer) {
        self.tick(ctx);
    }
    fn on_wake(&mut self, ctx: &mut Ctx<'_, ()>) {
        self.inner.on_wake(ctx);
    }
}
