//! `wsloop bench`.

use std::ffi::OsString;
use std::io::{IsTerminal, Write};

use wsloop::bench::{self, BenchConfig, Load, Phase, Progress, Target};

use super::{arg_err, parse_bytes, parse_duration, value};

const HELP: &str = "\
Usage: wsloop bench [URL] [OPTIONS]

Opens many WebSocket connections to an echo server on one poll loop, applies a load,
checks every echo (length, order, content) and reports connections held, failures,
messages and round-trip latency.

Arguments:
  URL                      ws://HOST:PORT/PATH [default: ws://127.0.0.1:9001/]

Options:
  --connections N          connections to open and hold [default: 1]
  --ramp R                 open R connections per second (also R/s) [default: as fast as
                           handshakes complete, 128 at a time]
  --every DUR              periodic load: each connection sends one message every DUR
  --inflight K             saturating load: each connection keeps K messages in flight
                           (without --every or --inflight the connections stay idle)
  --size BYTES             message size, at least 16 [default: 16]
  --payload KIND           binary | json | text: a byte pattern, JSON objects or prose
                           (json and text are sent as text messages) [default: binary]
  --deflate, --no-deflate  offer permessage-deflate; the report shows how many connections
                           agreed and the compression ratio [default: --no-deflate, so that
                           figures measure the server alone unless compression is asked for]
  --duration DUR           length of the measured phase [default: 30s]
  --source-ips RANGE       local addresses to connect from, in turn: 127.0.0.2-127.0.0.60
                           or a comma list [default for a loopback target: that range]
  --connect-timeout DUR    TCP connect plus handshake, per connection [default: 10s]
  --server-pid PID         report this server process's RSS and CPU time
  --json                   print the summary as one JSON object
  --quiet                  no progress line
Exit status: 0 when every connection was held and every echo came back intact, 1 otherwise.
";

/// Parses the options and runs the benchmark.
pub fn run(args: Vec<OsString>) -> Result<(), String> {
    use lexopt::prelude::*;
    let mut url = "ws://127.0.0.1:9001/".to_string();
    let mut connections = 1usize;
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
    let mut server_pid = None;
    let mut json = false;
    let mut quiet = false;
    let mut p = lexopt::Parser::from_args(args);
    while let Some(arg) = p.next().map_err(arg_err)? {
        match arg {
            Value(v) => url = v.into_string().map_err(|v| format!("URL is not UTF-8: {v:?}"))?,
            Long("connections") | Short('c') => connections = number(&value(&mut p)?, "--connections")?,
            Long("ramp") => {
                let v = value(&mut p)?;
                let n = v.strip_suffix("/s").unwrap_or(&v);
                ramp = Some(number::<u32>(n, "--ramp")?);
            }
            Long("every") => every = Some(parse_duration(&value(&mut p)?)?),
            Long("inflight") => inflight = Some(number::<u32>(&value(&mut p)?, "--inflight")?),
            Long("size") => size = parse_bytes(&value(&mut p)?)?,
            Long("payload") => {
                let v = value(&mut p)?;
                content = bench::Content::parse(&v).ok_or(format!("invalid --payload '{v}' (binary, json or text)"))?;
            }
            #[cfg(feature = "deflate")]
            Long("deflate") => deflate = true,
            #[cfg(feature = "deflate")]
            Long("no-deflate") => deflate = false,
            #[cfg(not(feature = "deflate"))]
            Long("deflate") => return Err(super::NO_DEFLATE.to_string()),
            #[cfg(not(feature = "deflate"))]
            Long("no-deflate") => {}
            Long("duration") | Short('d') => duration = parse_duration(&value(&mut p)?)?,
            Long("source-ips") => {
                source_ips = Some(bench::parse_source_ips(&value(&mut p)?).map_err(|e| e.to_string())?)
            }
            Long("connect-timeout") => connect_timeout = Some(parse_duration(&value(&mut p)?)?),
            Long("server-pid") => server_pid = Some(number::<u32>(&value(&mut p)?, "--server-pid")?),
            Long("json") => json = true,
            Long("quiet") | Short('q') => quiet = true,
            Short('h') | Long("help") => {
                print!("{HELP}");
                return Ok(());
            }
            _ => return Err(arg.unexpected().to_string()),
        }
    }
    let load = match (every, inflight) {
        (Some(_), Some(_)) => return Err("--every and --inflight are two different loads: give one".into()),
        (Some(d), None) => Load::Periodic(d),
        (None, Some(k)) => Load::Saturate(k),
        (None, None) => Load::Idle,
    };
    let target = Target::parse(&url).map_err(|e| e.to_string())?;
    let mut cfg = BenchConfig::new(target);
    cfg.source_ips = source_ips.unwrap_or_else(|| bench::default_source_ips(&cfg.target.addr));
    cfg.connections = connections;
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
    if let Some(t) = connect_timeout {
        cfg.connect_timeout = t;
    }
    let live = std::io::stderr().is_terminal();
    let mut shown = false;
    let mut on_progress = |p: &Progress| {
        if quiet {
            return;
        }
        let line = progress_line(p);
        let mut err = std::io::stderr().lock();
        // On a terminal the line rewrites itself; in a log it is one line a second.
        let _ = if live {
            write!(err, "\r{line}\x1b[K")
        } else {
            writeln!(err, "{line}")
        };
        shown = true;
    };
    let report = bench::run(&cfg, &mut on_progress).map_err(|e| e.to_string())?;
    if shown && live {
        eprintln!();
    }
    if json {
        println!("{}", report.to_json());
    } else {
        print!("{report}");
    }
    if report.is_clean() {
        Ok(())
    } else {
        if !json {
            eprintln!("wsloop bench: not every connection was held or not every echo came back intact");
        }
        std::process::exit(1);
    }
}

fn number<T: std::str::FromStr>(s: &str, flag: &str) -> Result<T, String> {
    s.trim().parse().map_err(|_| format!("invalid {flag} '{s}'"))
}

fn progress_line(p: &Progress) -> String {
    let phase = match p.phase {
        Phase::Connect => "connect",
        Phase::Measure => "measure",
        Phase::Drain => "drain",
        Phase::Close => "close",
    };
    let p99 = p
        .p99
        .map_or("-".to_string(), |d| format!("{:.0}µs", d.as_nanos() as f64 / 1e3));
    format!(
        "[{:>4}s {phase:<7}] connected {}/{}  failed {}  {:.0} msgs/s  p99 {p99}",
        p.elapsed.as_secs(),
        p.open,
        p.target,
        p.failed,
        p.msgs_per_sec
    )
}
