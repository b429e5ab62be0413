//! Command-line parsing shared by the subcommands, and the logger.

use std::time::Duration;

#[cfg(feature = "bench")]
mod bench;
#[cfg(feature = "client")]
mod client;
#[cfg(feature = "server")]
mod serve;

const USAGE: &str = "\
wsloop: a small WebSocket server and client on one poll loop

Usage:
  wsloop [serve] [OPTIONS]     serve WebSocket (default: echo on 127.0.0.1:9001)
  wsloop bench [URL] [OPTIONS] open many connections to an echo server and measure
  wsloop client [URL] [OPTS]   send `how are you?` every 2s and print the replies
  wsloop help                  this text

Run `wsloop serve --help` for the options of a subcommand.
Durations are written like 2s, 500ms, 0.5s, 1m.";

/// What `--deflate` says in a build without the `deflate` feature.
#[cfg(not(feature = "deflate"))]
const NO_DEFLATE: &str = "this build has no permessage-deflate (cargo feature `deflate`)";

/// Runs the CLI; returns the exit code.
pub fn main() -> i32 {
    let mut args: Vec<std::ffi::OsString> = std::env::args_os().skip(1).collect();
    let sub = args.first().and_then(|a| a.to_str()).map(str::to_string);
    let result = match sub.as_deref() {
        #[cfg(feature = "server")]
        Some("serve") => {
            args.remove(0);
            serve::run(args)
        }
        #[cfg(feature = "bench")]
        Some("bench") => {
            args.remove(0);
            bench::run(args)
        }
        #[cfg(feature = "client")]
        Some("client") => {
            args.remove(0);
            client::run(args)
        }
        Some("help") | Some("--help") | Some("-h") => {
            println!("{USAGE}");
            Ok(())
        }
        Some("--version") | Some("-V") => {
            println!("wsloop {}", env!("CARGO_PKG_VERSION"));
            Ok(())
        }
        Some(s) if !s.starts_with('-') => Err(format!("unknown command '{s}' (try: wsloop help)")),
        #[cfg(feature = "server")]
        _ => serve::run(args),
        #[cfg(not(feature = "server"))]
        _ => Err("this build has no server (try: wsloop help)".to_string()),
    };
    match result {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("wsloop: {e}");
            2
        }
    }
}

/// Parses `2s`, `500ms`, `0.5s`, `1m`, `1h`, or `0`/`off` (as zero). Integer arithmetic only:
/// the server-only binary carries no floating-point formatting or parsing.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let bad = || format!("invalid duration '{s}' (use e.g. 2s, 500ms, 0.5s, 1m)");
    let t = s.trim();
    if t == "0" || t.eq_ignore_ascii_case("off") {
        return Ok(Duration::ZERO);
    }
    let split = t.find(|c: char| !(c.is_ascii_digit() || c == '.')).ok_or_else(bad)?;
    let (num, unit) = t.split_at(split);
    let nanos_per_unit: u128 = match unit {
        "ms" => 1_000_000,
        "s" => 1_000_000_000,
        "m" | "min" => 60_000_000_000,
        "h" => 3_600_000_000_000,
        _ => return Err(bad()),
    };
    let (whole, frac) = num.split_once('.').unwrap_or((num, ""));
    if whole.is_empty() && frac.is_empty() || frac.contains('.') || whole.len() > 12 || frac.len() > 9 {
        return Err(bad());
    }
    let whole: u128 = if whole.is_empty() {
        0
    } else {
        whole.parse().map_err(|_| bad())?
    };
    let frac_value: u128 = if frac.is_empty() {
        0
    } else {
        frac.parse().map_err(|_| bad())?
    };
    let scale = 10u128.pow(frac.len() as u32);
    let nanos = whole * nanos_per_unit + frac_value * nanos_per_unit / scale;
    const MAX: u128 = 20 * 86_400 * 1_000_000_000;
    if nanos > MAX {
        return Err(format!("duration '{s}' out of range (at most 20 days)"));
    }
    Ok(Duration::from_nanos(nanos as u64))
}

/// Parses a byte count: `1048576`, `64KiB`, `16MiB`, `1k`, `2M`.
pub fn parse_bytes(s: &str) -> Result<usize, String> {
    let bad = || format!("invalid size '{s}' (use e.g. 65536, 64KiB, 16MiB)");
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: usize = num.parse().map_err(|_| bad())?;
    let mult = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        _ => return Err(bad()),
    };
    n.checked_mul(mult).ok_or_else(bad)
}

/// The value of an option, as a `String`.
pub fn value(p: &mut lexopt::Parser) -> Result<String, String> {
    p.value()
        .map_err(|e| e.to_string())?
        .into_string()
        .map_err(|v| format!("option value is not UTF-8: {v:?}"))
}

/// Turns a lexopt error into our one-line message.
pub fn arg_err(e: lexopt::Error) -> String {
    e.to_string()
}

/// A logger that writes `LEVEL message` lines to stderr.
struct StderrLogger;

impl log::Log for StderrLogger {
    fn enabled(&self, m: &log::Metadata<'_>) -> bool {
        m.level() <= log::max_level()
    }
    fn log(&self, r: &log::Record<'_>) {
        if self.enabled(r.metadata()) {
            use std::io::Write as _;
            let _ = writeln!(std::io::stderr().lock(), "{:<5} {}", r.level(), r.args());
        }
    }
    fn flush(&self) {}
}

/// Installs the stderr logger at `level` (error, warn, info, debug, trace, off).
pub fn init_log(level: &str) -> Result<(), String> {
    let filter: log::LevelFilter = level
        .parse()
        .map_err(|_| format!("invalid log level '{level}' (error, warn, info, debug, trace, off)"))?;
    let _ = log::set_logger(&StderrLogger);
    log::set_max_level(filter);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("2s"), Ok(Duration::from_secs(2)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("0.5s"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("1m"), Ok(Duration::from_secs(60)));
        assert_eq!(parse_duration("off"), Ok(Duration::ZERO));
        assert!(parse_duration("2").is_err());
        assert!(parse_duration("s").is_err());
        assert!(parse_duration("2 weeks").is_err());
        assert!(parse_duration("-1s").is_err());
        assert!(parse_duration("1.2.3s").is_err());
        assert!(parse_duration(".s").is_err());
        assert_eq!(parse_duration(".25s"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("1.5ms"), Ok(Duration::from_micros(1500)));
        assert_eq!(parse_duration("20d").map_err(|_| ()), Err(()));
        assert!(parse_duration("21h").is_ok());
        assert!(parse_duration("481h").unwrap_err().contains("out of range"));
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_bytes("16MiB"), Ok(16 << 20));
        assert_eq!(parse_bytes("64k"), Ok(64 << 10));
        assert_eq!(parse_bytes("125"), Ok(125));
        assert!(parse_bytes("lots").is_err());
    }
}
