//! `wsloop bench`.

use std::ffi::OsString;
use std::io::{IsTerminal, Write};
use std::net::{IpAddr, Ipv4Addr};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use wsloop::bench::{self, BenchConfig, BenchError, Load, Phase, Progress, Target};

use super::fleet;
use super::{
    count, dispatch, duration_above_zero, parse_bytes, parse_duration, print_err, print_out, unexpected, value, Asked,
    Error, Outcome, EXIT_FAILURE,
};

/// `wsloop bench --help`.
pub const HELP: &str = concat!(
    "\
Usage: wsloop bench [URL] [OPTIONS]

Opens many WebSocket connections on one poll loop, applies a load, checks what comes
back (by default every echo: length, order, content) and reports connections held,
failures, messages and latency.

Arguments:
  URL                      ws://HOST:PORT/PATH or wss://... [default: ws://127.0.0.1:9001/]

Options:
  -c, --connections N      connections to open and hold [default: 1]; past what one process
                           may open, the run is split over forked processes (the live line
                           then shows their sums and the highest p99)
  --ramp R                 open R connections per second (also R/s) [default: as fast as
                           handshakes complete, 128 at a time]
  --rate R                 open model: R messages per second over all connections (also
                           R/s), each sent when due whatever the server does; latency
                           counts from when a message was due, so a stall shows
  --every DUR              periodic load: each connection sends one message every DUR
  --inflight K             saturating load: each connection keeps K messages in flight
                           (without --rate, --every or --inflight the connections stay
                           idle, and what the server sends is counted, not checked)
  --expect WHAT            echo: every message comes back as sent (checked);
                           reply: one message answers each (timed, not checked);
                           none: send only, count what arrives [default: echo]
  --publishers P           fan-out: P connections publish (with --rate, --every or
                           --inflight K: K at a time whenever their queue drains), every
                           connection receives; reports deliveries, publish-to-receiver
                           latency, missing, duplicated and out-of-order messages
  -H, --header 'NAME: VALUE'
                           an extra request header (repeatable)
  --protocol NAME          a subprotocol to offer (repeatable)
  --origin ORIGIN          the Origin header
  --message TEXT           send this text as every message (in place of --size/--payload;
                           echoes are then checked for content and timed in order)
  --message-file FILE      send this file as every message: text if UTF-8, else binary
  --size BYTES             message size, at least 16 [default: 16]
  --payload KIND           binary | json | text: a byte pattern, JSON objects or prose
                           (json and text are sent as text messages) [default: binary]
",
    deflate_help!(bench),
    "  -d, --duration DUR|off   length of the measured phase; 0 or off measures only the
                           connecting [default: 30s]
  --source-ips RANGE       local addresses to connect from, in turn: 127.0.0.2-127.0.0.254
                           or a comma list [default for a loopback target: that range]
  --connect-timeout DUR    TCP connect plus handshake, per connection [default: 10s]
  --close-timeout DUR      the close phase: every close handshake, all at once [default: 5s]
  --server-pid PID         report this server's RSS and CPU time, summed over the process
                           and its children (the workers of serve --processes)
  --json                   print the summary as one JSON object (with the latency histogram
                           and a timeline of per-second samples)
  --html FILE              also write the run as one self-contained page with charts
                           (see wsloop report to compare runs)
  -q, --quiet              no progress line
  -V, --version            print the version
",
    client_tls_help!(),
    "

Ctrl-C or SIGTERM ends the measured phase early; the report then covers what ran. A second
one exits at once, with status 1 and no report.
Exit status: 0 when every connection was held and every echo came back intact (every
delivery, once and in order, with --publishers), 1 otherwise, 2 bad usage.
"
);

/// What the command line asks for.
struct Parsed {
    cfg: BenchConfig,
    json: bool,
    html: Option<OsString>,
    quiet: bool,
}

/// Parses the options and runs the benchmark.
pub fn run(args: Vec<OsString>) -> Outcome {
    dispatch(parse(args), HELP, bench)
}

fn parse(args: Vec<OsString>) -> Result<Asked<Parsed>, Error> {
    use lexopt::prelude::*;
    let mut url = "ws://127.0.0.1:9001/".to_string();
    let mut connections = 1u64;
    let mut ramp = None;
    let mut every = None;
    let mut inflight = None;
    let mut size = 16usize;
    let mut content = bench::Content::Binary;
    #[cfg(feature = "deflate")]
    let mut deflate = false;
    let mut duration = std::time::Duration::from_secs(30);
    let mut source_ips = None;
    let mut connect_timeout = None;
    let mut close_timeout = None;
    let mut server_pid = None;
    let mut json = false;
    let mut html = None;
    let mut quiet = false;
    let mut rate = None;
    let mut expect = bench::Expect::Echo;
    let mut publishers = 0usize;
    let mut headers = Vec::new();
    let mut protocols = Vec::new();
    let mut message = None;
    let mut p = lexopt::Parser::from_args(args);
    #[cfg(feature = "tls")]
    let mut tls = super::TlsArgs::default();
    while let Some(arg) = p.next()? {
        match arg {
            #[cfg(feature = "tls")]
            Long("ca") => tls.ca = Some(p.value()?),
            #[cfg(feature = "tls")]
            Long("insecure") => tls.insecure = true,
            Value(v) => {
                url = v
                    .into_string()
                    .map_err(|v| Error::usage(format!("URL is not UTF-8: '{}'", v.to_string_lossy())))?
            }
            Long("connections") | Short('c') => connections = count("--connections", &value(&mut p)?)?,
            Long("ramp") => {
                let v = value(&mut p)?;
                ramp = Some(number::<u32>(v.strip_suffix("/s").unwrap_or(&v), "--ramp")?);
            }
            Long("rate") => {
                let v = value(&mut p)?;
                rate = Some(number::<u32>(v.strip_suffix("/s").unwrap_or(&v), "--rate")?);
            }
            Long("expect") => {
                let v = value(&mut p)?;
                expect = bench::Expect::parse(&v)
                    .ok_or(Error::usage(format!("invalid --expect '{v}' (echo, reply or none)")))?;
            }
            Long("publishers") => publishers = number::<usize>(&value(&mut p)?, "--publishers")?,
            Long("header") | Short('H') => {
                let v = value(&mut p)?;
                let (name, val) = v
                    .split_once(':')
                    .filter(|(n, _)| !n.trim().is_empty())
                    .ok_or(Error::usage(format!("invalid --header '{v}' (NAME: VALUE)")))?;
                headers.push((name.trim().to_string(), val.trim().to_string()));
            }
            Long("protocol") => protocols.push(value(&mut p)?),
            Long("origin") => headers.push(("Origin".to_string(), value(&mut p)?)),
            Long("message") => message = Some(bench::FixedMessage::text(&value(&mut p)?)),
            Long("message-file") => {
                let path = p.value()?;
                let bytes = std::fs::read(&path).map_err(|e| {
                    Error::usage(format!("cannot read --message-file '{}': {e}", path.to_string_lossy()))
                })?;
                message = Some(bench::FixedMessage::from_bytes(bytes));
            }
            Long("every") => every = Some(duration_above_zero("--every", &value(&mut p)?)?),
            Long("inflight") => inflight = Some(number::<u32>(&value(&mut p)?, "--inflight")?),
            Long("size") => size = parse_bytes(&value(&mut p)?)?,
            Long("payload") => {
                let v = value(&mut p)?;
                content = bench::Content::parse(&v)
                    .ok_or(Error::usage(format!("invalid --payload '{v}' (binary, json or text)")))?;
            }
            #[cfg(feature = "deflate")]
            Long("deflate") => deflate = true,
            #[cfg(feature = "deflate")]
            Long("no-deflate") => deflate = false,
            #[cfg(not(feature = "deflate"))]
            Long("deflate") => return Err(Error::usage(super::NO_DEFLATE)),
            #[cfg(not(feature = "deflate"))]
            Long("no-deflate") => {}
            Long("duration") | Short('d') => duration = parse_duration(&value(&mut p)?)?,
            Long("source-ips") => source_ips = Some(parse_source_ips(&value(&mut p)?)?),
            Long("connect-timeout") => {
                connect_timeout = Some(duration_above_zero("--connect-timeout", &value(&mut p)?)?)
            }
            Long("close-timeout") => close_timeout = Some(duration_above_zero("--close-timeout", &value(&mut p)?)?),
            Long("server-pid") => server_pid = Some(number::<u32>(&value(&mut p)?, "--server-pid")?),
            Long("json") => json = true,
            Long("html") => html = Some(p.value()?),
            Long("quiet") | Short('q') => quiet = true,
            Short('h') | Long("help") => return Ok(Asked::Help),
            Short('V') | Long("version") => return Ok(Asked::Version),
            _ => return Err(unexpected(arg, "bench")),
        }
    }
    let load = match (every, inflight, rate) {
        (Some(_), Some(_), _) | (Some(_), _, Some(_)) | (_, Some(_), Some(_)) => {
            return Err(Error::usage(
                "--rate, --every and --inflight are different loads: give one",
            ))
        }
        (Some(d), None, None) => Load::Periodic(d),
        (None, Some(0), None) => return Err(Error::usage("--inflight must be at least 1")),
        (None, Some(k), None) => Load::Saturate(k),
        (None, None, Some(0)) => return Err(Error::usage("--rate must be at least 1 message per second")),
        (None, None, Some(r)) => Load::Rate(r),
        (None, None, None) => Load::Idle,
    };
    if publishers > 0 && load == Load::Idle {
        return Err(Error::usage("--publishers needs a load: --rate, --every or --inflight"));
    }
    if expect == bench::Expect::Nothing && matches!(load, Load::Saturate(_)) && publishers == 0 {
        return Err(Error::usage(
            "--inflight sends on each answer: with --expect none use --rate or --every",
        ));
    }
    if ramp == Some(0) {
        return Err(Error::usage("--ramp must be at least 1 connection per second"));
    }
    let target = Target::parse(&url).map_err(|e| Error::usage(e.to_string()))?;
    let mut cfg = BenchConfig::new(target);
    cfg.source_ips = source_ips.unwrap_or_else(|| bench::default_source_ips(&cfg.target.addr));
    cfg.connections = usize::try_from(connections).unwrap_or(usize::MAX);
    cfg.ramp = ramp;
    cfg.load = load;
    cfg.size = size;
    cfg.content = content;
    #[cfg(feature = "deflate")]
    {
        cfg.deflate = deflate;
    }
    cfg.duration = duration;
    cfg.server_pid = server_pid;
    cfg.expect = expect;
    cfg.publishers = publishers;
    cfg.headers = headers;
    cfg.protocols = protocols;
    cfg.message = message;
    if let Some(t) = connect_timeout {
        cfg.connect_timeout = t;
    }
    if let Some(t) = close_timeout {
        cfg.close_timeout = t;
    }
    #[cfg(feature = "tls")]
    {
        cfg.tls = tls.config()?;
    }
    Ok(Asked::Run(Parsed { cfg, json, html, quiet }))
}

fn bench(o: Parsed) -> Outcome {
    let Parsed {
        mut cfg,
        json,
        html,
        quiet,
    } = o;
    let stop = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        // In this order: a second signal finds the flag already set and ends the process.
        signal_hook::flag::register_conditional_shutdown(sig, EXIT_FAILURE, Arc::clone(&stop))
            .and_then(|_| signal_hook::flag::register(sig, Arc::clone(&stop)))
            .map_err(|e| Error::runtime(format!("cannot handle signals: {e}")))?;
    }
    cfg.stop = Some(stop);
    // A page that cannot be written is told before the run, not after it.
    if let Some(file) = &html {
        std::fs::File::create(file)
            .map_err(|e| Error::usage(format!("cannot write {}: {e}", std::path::Path::new(file).display())))?;
    }
    let live = std::io::stderr().is_terminal();
    let mut shown = false;
    let mut on_line = |t: &Progress| {
        if quiet {
            return;
        }
        let line = progress_line(t);
        let mut err = std::io::stderr().lock();
        // On a terminal the line rewrites itself; in a log it is one line a second.
        let _ = if live {
            write!(err, "\r{line}\x1b[K")
        } else {
            writeln!(err, "{line}")
        };
        shown = true;
    };
    let failure = |e| match e {
        BenchError::InvalidConfig(m) => Error::usage(m),
        e => Error::runtime(e.to_string()),
    };
    let parts = bench::split(&cfg).map_err(failure)?;
    let report = if parts.len() == 1 {
        bench::run(&cfg, &mut on_line).map_err(failure)?
    } else {
        fleet::run(&parts, &mut on_line)?
    };
    if shown && live {
        print_err("");
    }
    if let Some(file) = &html {
        let title = format!("wsloop bench: {}", report.url);
        let page = bench::html_page(&title, &[(report.url.as_str(), &report)]);
        std::fs::write(file, page)
            .map_err(|e| Error::runtime(format!("cannot write {}: {e}", std::path::Path::new(file).display())))?;
    }
    if json {
        print_out(&format!("{}\n", report.to_json()))?;
    } else {
        print_out(&report.to_string())?;
    }
    if report.is_clean() {
        Ok(())
    } else if json {
        Err(Error::reported()) // the JSON says so; stderr stays quiet for scripts
    } else {
        Err(Error::runtime(
            "not every connection was held or not every echo came back intact",
        ))
    }
}

fn number<T: std::str::FromStr>(s: &str, flag: &str) -> Result<T, Error> {
    s.trim()
        .parse()
        .map_err(|_| Error::usage(format!("invalid {flag} '{s}'")))
}

fn progress_line(p: &Progress) -> String {
    let phase = match p.phase {
        Phase::Connect => "connect",
        Phase::Measure => "measure",
        Phase::Drain => "drain",
        Phase::Close => "close",
    };
    let p99 = p.p99.map_or("-".to_string(), |d| format!("{}µs", d.as_micros()));
    let procs = if p.processes > 1 {
        format!("  ({} processes)", p.processes)
    } else {
        String::new()
    };
    format!(
        "[{:>4}s {phase:<7}] connected {}/{}  failed {}  {} msgs/s  p99 {p99}{procs}",
        p.elapsed.as_secs(),
        p.open,
        p.target,
        p.failed,
        // Whole messages per second, printed without the float formatting code.
        p.msgs_per_sec.max(0.0).round() as u64
    )
}

/// Parses source addresses: `127.0.0.2`, `127.0.0.2-127.0.0.60` (an IPv4 range, inclusive),
/// or a comma-separated list of either. At most 65,536 addresses.
fn parse_source_ips(s: &str) -> Result<Vec<IpAddr>, Error> {
    const MAX: usize = 1 << 16;
    let mut ips = Vec::new();
    for item in s.split(',').map(str::trim).filter(|i| !i.is_empty()) {
        let bad = || {
            Error::usage(format!(
                "invalid source address '{item}' (use e.g. 127.0.0.2 or 127.0.0.2-127.0.0.60)"
            ))
        };
        if let Some((a, b)) = item.split_once('-') {
            let a: Ipv4Addr = a.trim().parse().map_err(|_| bad())?;
            let b: Ipv4Addr = b.trim().parse().map_err(|_| bad())?;
            let (a, b) = (u32::from(a), u32::from(b));
            if b < a || (b - a) as usize >= MAX - ips.len().min(MAX) {
                return Err(Error::usage(format!(
                    "source range '{item}' is empty or too large (at most {MAX} addresses)"
                )));
            }
            ips.extend((a..=b).map(|n| IpAddr::V4(Ipv4Addr::from(n))));
        } else {
            ips.push(item.parse::<IpAddr>().map_err(|_| bad())?);
        }
        if ips.len() > MAX {
            return Err(Error::usage(format!("too many source addresses (at most {MAX})")));
        }
    }
    if ips.is_empty() {
        return Err(Error::usage(format!("no source address in '{s}'")));
    }
    Ok(ips)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn source_addresses_parse_as_lists_and_ranges() {
        let ips = parse_source_ips("127.0.0.2-127.0.0.60").unwrap();
        assert_eq!(ips.len(), 59);
        assert_eq!(ips[58], "127.0.0.60".parse::<IpAddr>().unwrap());
        assert_eq!(parse_source_ips("127.0.0.2, 127.0.0.9").unwrap().len(), 2);
        assert!(parse_source_ips("127.0.0.9-127.0.0.2").is_err());
        assert!(parse_source_ips("10.0.0.0-10.255.255.255").is_err());
        assert!(parse_source_ips("nope").is_err());
    }
}
