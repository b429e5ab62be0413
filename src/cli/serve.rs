//! `wsloop serve`.

use std::ffi::OsString;
use std::time::{Duration, Instant};

use wsloop::proto::Answer;
use wsloop::server::modes::{self, Broadcast, PageKind};
use wsloop::server::{
    Conn, Ctx, Handler, Server, ServerConfig, SlowConsumer, Stats, Timer, TimerId, Upgrade, MAX_THREADS,
};
use wsloop::Message;

use super::workers::{self, Worker};
use super::{
    count, dispatch, duration_above_zero, duration_or_off, init_log_as, parse_bytes, print_line, size_above_zero,
    unexpected, value, Asked, Error, Outcome,
};

/// `wsloop serve --help`.
pub const HELP: &str = concat!(
    "\
Usage: wsloop serve [OPTIONS]

Options:
  --listen ADDR            address to listen on [default: 127.0.0.1:9001]
  --mode MODE              echo | reply | broadcast [default: echo]
  --reply TEXT             the answer in reply mode [default: fine thank you]
  --no-echo-self           broadcast mode: do not send a message back to its sender
  --announce               broadcast mode: tell everyone when a peer joins or leaves
  --no-page                answer a plain `GET /` with 426 instead of the browser page
  --stats DUR|off          print a stats line on stderr every DUR (one per thread)
                           [default: off]
  --threads N|auto         event loops, one per thread, sharing the port (SO_REUSEPORT);
                           auto: one per core. Broadcasts reach every loop [default: 1]
  --processes N            N worker processes on one port (SO_REUSEPORT), each with
                           --threads loops, restarted when they die or hang; broadcasts
                           and peer counts stay within each process unless --cluster joins
                           them, limits always do [default: this one]
  --max-connections N      connections held; more get 503 [default: open-file limit - 64].
                           With --processes P it is a limit per worker, not a total: each
                           holds the share N/P plus room for the kernel's uneven spread,
                           share + 5*sqrt(share) + 16 (100 over 4: 66 each, up to 264 in all)
  --max-connections-per-ip N
                           connections from one address; more get 503 [default: no limit]
  --max-memory BYTES       memory for buffered data; past 3/4 of it the largest holders
                           stop being read, past it they are closed with 1013
                           [default: 1/4 of physical memory, 16MiB..1GiB]
  --max-message BYTES      largest message; larger gets close 1009 [default: 16MiB]
  --max-backpressure BYTES outbound bytes queued per peer before reading pauses [default: 1MiB]
  --slow-consumer POLICY   close | drop: a full queue on broadcast [default: close]
  --handshake-timeout DUR  time to send the request, above 0 [default: 10s]
  --idle-timeout DUR|off   close peers silent this long with 1001 [default: off]
  --ping-interval DUR|off  ping peers silent this long [default: off]
  --tcp-keepalive DUR|off  TCP keep-alive probes after this idle time [default: off]
  --origin ORIGIN          allow this Origin (repeatable; default: any)
  --protocol NAME          a subprotocol to accept (repeatable)
  --metrics                answer GET /metrics (Prometheus text format) on the main
                           listener; GET /health is always answered [default: off]
  --metrics-listen ADDR    serve GET /metrics and GET /health on a separate plain-HTTP
                           listener at IP:PORT, so that metrics need not be public
  --drain-timeout DUR      on SIGTERM, first stop accepting (health 503) and give peers
                           DUR to leave before closing the rest with 1001 [default: 0]
",
    deflate_help!(serve),
    serve_tls_help!(),
    cluster_help!(),
    "  --log LEVEL              error | warn | info | debug | trace | off [default: info];
                           info sums up connections opened and closed every 10s, debug
                           adds a line per connection and per message: in/out, opcode,
                           size and a preview (32 characters of text, 16 bytes in hex)
  --log-format FORMAT      text | json: one JSON object a line (ts, level, target, pid,
                           peer, msg), --stats lines too [default: text]
  -q, --quiet              only warnings and errors (--log warn)
  -V, --version            print the version

Ctrl-C or SIGTERM stops accepting (GET /health turns 503), waits --drain-timeout for peers
to leave, closes the rest with 1001 and exits 0 once they have closed (at most 3s more); a
second one exits at once. SIGHUP reads --tls-cert and --tls-key again: new handshakes use the
new certificate, open connections stay; a bad file is refused (logged) and the old certificate
kept. With --processes the parent passes SIGTERM and SIGHUP to every worker.
Exit status: 0 done, 1 failed (e.g. the address is in use), 2 bad usage.
"
);

/// Parses the options and runs the server until it is stopped.
pub fn run(args: Vec<OsString>) -> Outcome {
    dispatch(parse(args), HELP, serve)
}

/// What the command line asks for.
struct Parsed {
    cfg: ServerConfig,
    addr: std::net::SocketAddr,
    mode: Mode,
    stats_every: Option<Duration>,
    /// `--processes`, and the `--max-connections` given (shared out over the workers).
    processes: Option<usize>,
    max_given: Option<usize>,
}

/// Parses and checks the command line.
fn parse(args: Vec<OsString>) -> Result<Asked<Parsed>, Error> {
    use lexopt::prelude::*;
    let mut cfg = ServerConfig::default();
    cfg.handle_signals = true;
    let mut listen = "127.0.0.1:9001".to_string();
    let mut mode = "echo".to_string();
    let mut reply = "fine thank you".to_string();
    let mut log_level = "info".to_string();
    let mut log_format = "text".to_string();
    let mut bcast = Broadcast::new(true, false);
    let mut bcast_flags = false;
    let mut serve_page = true;
    let mut stats_every = None;
    let (mut processes, mut max_given) = (None, None);
    let (mut tls_cert, mut tls_key): (Option<OsString>, Option<OsString>) = (None, None);
    let (mut cluster, mut cluster_prefix): (Option<String>, Option<String>) = (None, None);
    let mut p = lexopt::Parser::from_args(args);
    while let Some(arg) = p.next()? {
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
            Long("stats") => stats_every = duration_or_off(&value(&mut p)?)?,
            Long("threads") => cfg.threads = threads(&value(&mut p)?)?,
            Long("max-connections") => {
                let n = count("--max-connections", &value(&mut p)?)?;
                cfg.max_connections = usize::try_from(n).unwrap_or(usize::MAX);
                max_given = Some(cfg.max_connections);
            }
            Long("processes") => {
                let v = value(&mut p)?;
                processes = Some(
                    v.parse()
                        .ok()
                        .filter(|n| (1..=workers::MAX_PROCESSES).contains(n))
                        .ok_or(Error::usage(format!(
                            "invalid --processes '{v}' (1 to {})",
                            workers::MAX_PROCESSES
                        )))?,
                );
            }
            Long("max-connections-per-ip") => {
                let n = count("--max-connections-per-ip", &value(&mut p)?)?;
                cfg.max_connections_per_ip = Some(u32::try_from(n).unwrap_or(u32::MAX));
            }
            Long("max-memory") => {
                cfg.max_memory = parse_bytes(&value(&mut p)?)?;
                if cfg.max_memory < 1 << 20 {
                    return Err(Error::usage("--max-memory must be at least 1MiB"));
                }
            }
            Long("max-message") => cfg.max_message = size_above_zero("--max-message", &value(&mut p)?)?,
            Long("max-backpressure") => cfg.max_backpressure = size_above_zero("--max-backpressure", &value(&mut p)?)?,
            Long("slow-consumer") => {
                cfg.slow_consumer = match value(&mut p)?.as_str() {
                    "close" => SlowConsumer::Close,
                    "drop" => SlowConsumer::Drop,
                    v => return Err(Error::usage(format!("invalid --slow-consumer '{v}' (close or drop)"))),
                }
            }
            Long("handshake-timeout") => {
                cfg.handshake_timeout = duration_above_zero("--handshake-timeout", &value(&mut p)?)?
            }
            Long("idle-timeout") => cfg.idle_timeout = duration_or_off(&value(&mut p)?)?,
            Long("ping-interval") => cfg.ping_interval = duration_or_off(&value(&mut p)?)?,
            Long("tcp-keepalive") => cfg.tcp_keepalive = duration_or_off(&value(&mut p)?)?,
            Long("origin") => cfg.origins.push(value(&mut p)?),
            Long("protocol") => cfg.protocols.push(value(&mut p)?),
            Long("metrics") => cfg.metrics = true,
            Long("metrics-listen") => {
                let v = value(&mut p)?;
                let a = v.parse().map_err(|_| {
                    Error::usage(format!(
                        "invalid --metrics-listen '{v}' (use IP:PORT, e.g. 127.0.0.1:9100)"
                    ))
                })?;
                cfg.metrics_listen = Some(a);
            }
            Long("drain-timeout") => cfg.drain_timeout = super::parse_duration(&value(&mut p)?)?,
            #[cfg(feature = "deflate")]
            Long("deflate") => cfg.deflate.enabled = true,
            #[cfg(feature = "deflate")]
            Long("no-deflate") => cfg.deflate.enabled = false,
            #[cfg(feature = "deflate")]
            Long("deflate-min-size") => cfg.deflate.min_size = parse_bytes(&value(&mut p)?)?,
            #[cfg(not(feature = "deflate"))]
            Long("deflate" | "deflate-min-size") => return Err(Error::usage(super::NO_DEFLATE)),
            #[cfg(not(feature = "deflate"))]
            Long("no-deflate") => {}
            Long("cluster") => cluster = Some(value(&mut p)?),
            Long("cluster-prefix") => cluster_prefix = Some(value(&mut p)?),
            Long("log") => log_level = value(&mut p)?,
            Long("log-format") => log_format = value(&mut p)?,
            Short('q') | Long("quiet") => log_level = "warn".to_string(),
            Long("tls-cert") if cfg!(feature = "tls") => tls_cert = Some(p.value()?),
            Long("tls-key") if cfg!(feature = "tls") => tls_key = Some(p.value()?),
            Short('h') | Long("help") => return Ok(Asked::Help),
            Short('V') | Long("version") => return Ok(Asked::Version),
            _ => return Err(unexpected(arg, "serve")),
        }
    }
    let kind = match mode.as_str() {
        "echo" => PageKind::Echo,
        "reply" => PageKind::Reply,
        "broadcast" => PageKind::Chat,
        _ => {
            return Err(Error::usage(format!(
                "invalid --mode '{mode}' (echo, reply or broadcast)"
            )))
        }
    };
    if bcast_flags && kind != PageKind::Chat {
        return Err(Error::usage(
            "--no-echo-self and --announce need --mode broadcast".to_string(),
        ));
    }
    if serve_page {
        cfg.page = Some(modes::page(kind).into());
    }
    match (tls_cert, tls_key) {
        (None, None) => {}
        #[cfg(feature = "tls")]
        (Some(cert), Some(key)) => {
            cfg.tls = Some(wsloop::tls::ServerTls::from_pem_files(cert, key).map_err(|e| Error::usage(e.to_string()))?);
        }
        (Some(_), None) => return Err(Error::usage("--tls-cert needs --tls-key")),
        _ => return Err(Error::usage("--tls-key needs --tls-cert")),
    }
    cluster_config(&mut cfg, cluster, cluster_prefix)?;
    init_log_as(&log_level, &log_format)?;
    // An address, not a host name: a listening address is an interface's, and parsing it here
    // keeps the resolver out of the binary.
    let addr: std::net::SocketAddr = listen.parse().map_err(|_| {
        Error::usage(format!(
            "invalid --listen '{listen}' (use IP:PORT, e.g. 127.0.0.1:9001 or [::1]:9001)"
        ))
    })?;
    let mode = match kind {
        PageKind::Echo => Mode::Echo,
        PageKind::Reply => Mode::Reply(reply),
        PageKind::Chat => Mode::Broadcast(bcast),
    };
    Ok(Asked::Run(Parsed {
        cfg,
        addr,
        mode,
        stats_every,
        processes,
        max_given,
    }))
}

/// `--cluster URL` and `--cluster-prefix NAME` into the settings.
#[cfg(feature = "cluster")]
fn cluster_config(cfg: &mut ServerConfig, url: Option<String>, prefix: Option<String>) -> Result<(), Error> {
    let Some(url) = url else {
        return match prefix {
            Some(_) => Err(Error::usage("--cluster-prefix needs --cluster")),
            None => Ok(()),
        };
    };
    // The URL is not repeated: it may hold a password.
    let mut cluster =
        wsloop::server::ClusterConfig::new(&url).map_err(|e| Error::usage(format!("invalid --cluster: {e}")))?;
    if let Some(prefix) = prefix {
        let fits = |b: u8| b.is_ascii_alphanumeric() || b"-_.:".contains(&b);
        if prefix.is_empty() || prefix.len() > 64 || !prefix.bytes().all(fits) {
            return Err(Error::usage(format!(
                "invalid --cluster-prefix '{prefix}' (1 to 64 letters, digits, '-', '_', '.' or ':')"
            )));
        }
        cluster.prefix = prefix;
    }
    cfg.cluster = Some(cluster);
    Ok(())
}

/// `--cluster` in a build without the `cluster` feature.
#[cfg(not(feature = "cluster"))]
fn cluster_config(_: &mut ServerConfig, url: Option<String>, prefix: Option<String>) -> Result<(), Error> {
    match url.or(prefix) {
        Some(_) => Err(Error::usage("this build has no cluster (cargo feature `cluster`)")),
        None => Ok(()),
    }
}

/// `--threads`: a count, or `auto` for one loop per core.
fn threads(v: &str) -> Result<usize, Error> {
    if v == "auto" {
        return Ok(wsloop::sys::cores().min(MAX_THREADS));
    }
    v.parse()
        .ok()
        .filter(|n| (1..=MAX_THREADS).contains(n))
        .ok_or_else(|| Error::usage(format!("invalid --threads '{v}' (1 to {MAX_THREADS}, or auto)")))
}

fn serve(mut o: Parsed) -> Outcome {
    let threads = o.cfg.threads;
    let mut worker = None;
    if let Some(n) = o.processes {
        // Workers inherit the raised limit: each holds as many connections as it allows.
        let _ = rlimit::increase_nofile_limit(u64::MAX);
        o.cfg.max_connections = workers::per_worker(o.max_given, n, wsloop::server::default_max_connections())?;
        o.cfg.reuse_port = true;
        // Made before the workers fork: each publishes its metrics there for the others.
        let board = wsloop::server::MetricsBoard::new(n)
            .map_err(|e| Error::runtime(format!("cannot share metrics between workers: {e}")))?;
        let stop_timeout = o.cfg.drain_timeout.saturating_add(o.cfg.shutdown_timeout);
        match workers::supervise(o.addr, n, threads, stop_timeout, o.cfg.max_connections, board)? {
            None => return Ok(()),
            Some(w) => {
                o.addr = w.addr;
                o.cfg.metrics_board = Some(board.for_worker(w.index));
                fresh_certificate(&mut o.cfg);
                worker = Some(w);
            }
        }
    }
    let server = Server::bind(o.addr, o.cfg).map_err(|e| {
        let what = format!("cannot listen on {}: {e}", o.addr);
        // Settings the machine cannot honour are usage errors; a busy address is not.
        if e.kind() == std::io::ErrorKind::InvalidInput {
            Error::usage(what)
        } else {
            Error::runtime(what)
        }
    })?;
    // With workers the parent says where they listen.
    let tag = match &worker {
        Some(w) => format!(" w{}", w.index),
        None => {
            match threads {
                1 => log::info!("listening on {}", server.local_addr()),
                n => log::info!("listening on {} with {n} threads", server.local_addr()),
            }
            String::new()
        }
    };
    if let Some(a) = server
        .metrics_addr()
        .filter(|_| worker.as_ref().is_none_or(|w| w.index == 1))
    {
        log::info!("metrics and health on http://{a}/metrics and /health");
    }
    if tls_on(&server) {
        log::info!("TLS: wss:// and https://");
    }
    // Taken before loop 0 takes the worker.
    let heartbeats: Vec<_> = (0..threads)
        .map(|lp| worker.as_ref().and_then(|w| w.heartbeat(lp)))
        .collect();
    server
        .run_threads(|lp| Cli {
            mode: o.mode.clone(),
            every: o.stats_every,
            stats_timer: None,
            heartbeat: heartbeats.get(lp).copied().flatten(),
            heartbeat_timer: None,
            last: None,
            tag: if threads > 1 {
                format!("{tag} t{lp}")
            } else {
                tag.clone()
            },
            // Loop 0 tells the parent once it serves.
            worker: worker.take(),
            summary: Summary::default(),
        })
        .map_err(|e| Error::runtime(format!("server failed: {e}")))
}

/// In a worker: the certificate files read again, so that a worker started after a SIGHUP
/// (restarted after a crash) serves what the others reloaded, not what the parent read at
/// start. A bad file keeps that one, as a reload would.
#[cfg(feature = "tls")]
fn fresh_certificate(cfg: &mut ServerConfig) {
    let Some(tls) = &cfg.tls else { return };
    match tls.reload() {
        Ok(new) => cfg.tls = Some(new),
        Err(e) => log::error!("certificate files not read again, serving the one read at start: {e}"),
    }
}

#[cfg(not(feature = "tls"))]
fn fresh_certificate(_: &mut ServerConfig) {}

/// Whether the server speaks TLS.
fn tls_on(server: &Server) -> bool {
    #[cfg(feature = "tls")]
    return server.is_tls();
    #[cfg(not(feature = "tls"))]
    {
        let _ = server;
        false
    }
}

/// How long connections opened and closed are summed up before their `info` line.
const SUMMARY_EVERY: Duration = Duration::from_secs(10);

/// What the server does with messages.
#[derive(Clone)]
enum Mode {
    Echo,
    Reply(String),
    Broadcast(Broadcast),
}

/// The command line's handler: one type for every mode (one copy of the loop in the binary),
/// printing a stats line on stderr every `every`: open connections, messages in and out per
/// second, bytes queued, messages dropped (in total and since the last line), memory counted
/// against the budget, and the process's resident memory.
struct Cli {
    mode: Mode,
    every: Option<Duration>,
    stats_timer: Option<TimerId>,
    /// In a worker: this loop's heartbeat to the parent, beaten from a timer of the loop's own
    /// (so a loop stuck in a callback misses it).
    heartbeat: Option<workers::Heartbeat>,
    heartbeat_timer: Option<TimerId>,
    /// When the previous line was printed, and the counters then.
    last: Option<(Instant, Stats)>,
    /// ` wN` in worker N's stats lines, ` tN` in loop N's with several threads.
    tag: String,
    /// Set in a worker's first loop until it runs.
    worker: Option<Worker>,
    /// Connections opened and closed since the last summary line, and whether such lines are
    /// logged (`info`); the timer is set only by a connection coming or going, so an idle
    /// server still never wakes.
    summary: Summary,
}

/// The `info` line that sums up connections (each one's own lines are at `debug`).
#[derive(Default)]
struct Summary {
    on: bool,
    opened: u64,
    closed: u64,
    timer: Option<TimerId>,
}

impl Cli {
    /// A connection opened (`+1`) or closed: counted, and the summary's timer set if it is not.
    fn count(&mut self, ctx: &mut Ctx<'_, ()>, opened: bool) {
        let s = &mut self.summary;
        if !s.on {
            return;
        }
        if opened {
            s.opened += 1;
        } else {
            s.closed += 1;
        }
        if s.timer.is_none() {
            s.timer = Some(ctx.set_timer(SUMMARY_EVERY));
        }
    }

    /// `connections: 19000 open; 19000 opened and 0 closed in the last 10 s`.
    fn summarize(&mut self, ctx: &mut Ctx<'_, ()>) {
        let s = &mut self.summary;
        s.timer = None;
        log::info!(
            "connections{}: {} open; {} opened and {} closed in the last {} s",
            self.tag,
            ctx.len(),
            std::mem::take(&mut s.opened),
            std::mem::take(&mut s.closed),
            SUMMARY_EVERY.as_secs()
        );
    }

    fn beat(&mut self, ctx: &mut Ctx<'_, ()>) {
        if let Some(h) = self.heartbeat {
            h.beat();
            self.heartbeat_timer = Some(ctx.set_timer(workers::HEARTBEAT));
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
                "stats{} open={} in={}/s out={}/s queued={}B dropped={} (+{}) mem={}KiB/{}KiB rss={}{}",
                self.tag,
                stats.open,
                rate(stats.messages_in, prev.messages_in),
                rate(stats.messages_out, prev.messages_out),
                stats.bytes_queued,
                stats.dropped,
                stats.dropped.saturating_sub(prev.dropped),
                stats.memory / 1024,
                stats.memory_limit / 1024,
                wsloop::sys::read_rss(std::process::id())
                    .map_or_else(|| "?".to_string(), |b| format!("{}KiB", b / 1024)),
                cluster_stats(ctx),
            );
            // Not eprintln!: a closed stderr must not bring the server down.
            print_line("wsloop::stats", &line);
        }
        self.last = Some((now, stats));
        self.stats_timer = Some(ctx.set_timer(every));
    }
}

/// The cluster's part of the stats line, on loop 0 (the bus is the process's): its state,
/// other instances, envelopes published, received, dropped (not sent / missed by a full loop)
/// and lost (gaps in other instances' broadcasts).
#[cfg(feature = "cluster")]
fn cluster_stats(ctx: &Ctx<'_, ()>) -> String {
    use wsloop::server::ClusterState;
    let Some(c) = ctx.cluster_stats().filter(|_| ctx.loop_index() == 0) else {
        return String::new();
    };
    let state = match c.state {
        ClusterState::Up => "up",
        ClusterState::Down => "down",
        _ => "connecting",
    };
    format!(
        " cluster={state} instances={} published={} received={} dropped={}/{} lost={}",
        c.instances, c.published, c.received, c.dropped_out, c.dropped_in, c.lost
    )
}

#[cfg(not(feature = "cluster"))]
fn cluster_stats(_: &Ctx<'_, ()>) -> String {
    String::new()
}

impl Handler for Cli {
    type State = ();

    fn on_upgrade(&mut self, _ctx: &mut Ctx<'_, ()>, _up: &mut Upgrade<'_>) -> Result<(), Answer> {
        Ok(())
    }

    fn on_start(&mut self, ctx: &mut Ctx<'_, ()>) {
        if let Some(w) = self.worker.take() {
            w.serving();
        }
        self.summary.on = log::log_enabled!(log::Level::Info);
        self.beat(ctx);
        self.tick(ctx);
    }

    fn on_open(&mut self, ctx: &mut Ctx<'_, ()>, conn: &mut Conn<()>) {
        self.count(ctx, true);
        if let Mode::Broadcast(b) = &mut self.mode {
            b.on_open(ctx, conn);
        }
    }

    fn on_message(&mut self, ctx: &mut Ctx<'_, ()>, conn: &mut Conn<()>, msg: Message<'_>) {
        match &mut self.mode {
            Mode::Echo => {
                let _ = ctx.send(conn.id(), msg);
            }
            Mode::Reply(text) => {
                let _ = ctx.send_text(conn.id(), text);
            }
            Mode::Broadcast(b) => b.on_message(ctx, conn, msg),
        }
    }

    fn on_close(&mut self, ctx: &mut Ctx<'_, ()>, conn: &mut Conn<()>, code: u16, reason: &str) {
        self.count(ctx, false);
        if let Mode::Broadcast(b) = &mut self.mode {
            b.on_close(ctx, conn, code, reason);
        }
    }

    fn on_timer(&mut self, ctx: &mut Ctx<'_, ()>, timer: Timer) {
        if Some(timer.id) == self.heartbeat_timer {
            self.beat(ctx);
        } else if Some(timer.id) == self.stats_timer {
            self.tick(ctx);
        } else if Some(timer.id) == self.summary.timer {
            self.summarize(ctx);
        } else if let Mode::Broadcast(b) = &mut self.mode {
            b.on_announce_timer(ctx, timer);
        }
    }
}
