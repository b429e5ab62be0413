//! Command-line parsing shared by the subcommands, and the logger.

use std::time::Duration;

/// `serve`'s TLS options, in its help when the `tls` feature is built.
#[cfg(all(feature = "tls", feature = "server"))]
macro_rules! serve_tls_help {
    () => {
        "  --tls-cert FILE          serve wss:// (and the page over https://): PEM certificate chain
  --tls-key FILE           the PEM private key of --tls-cert
"
    };
}
#[cfg(all(not(feature = "tls"), feature = "server"))]
macro_rules! serve_tls_help {
    () => {
        ""
    };
}

/// `client`'s and `bench`'s TLS options, in their help when the `tls` feature is built.
#[cfg(all(feature = "tls", feature = "client"))]
macro_rules! client_tls_help {
    () => {
        "
TLS options (wss:// URLs):
  --ca FILE              trust only the CA certificates in this PEM file
                         [default: the system's CA bundle]
  --insecure             do not verify the server's certificate (says so on stderr)
"
    };
}
#[cfg(all(not(feature = "tls"), feature = "client"))]
macro_rules! client_tls_help {
    () => {
        ""
    };
}

/// The permessage-deflate options of `serve`, `client` or `bench`, in their help when the
/// `deflate` feature is built.
#[cfg(feature = "deflate")]
macro_rules! deflate_help {
    (serve) => {
        "  --deflate, --no-deflate  accept permessage-deflate when offered: no memory per idle
                           connection, CPU per message compressed [default: --deflate]
  --deflate-min-size BYTES send messages shorter than this uncompressed, and longer ones
                           that do not shrink; 0 compresses every message [default: 64]
"
    };
    (client) => {
        "  --deflate, --no-deflate
                         offer permessage-deflate, as browsers do [default: --deflate]
"
    };
    (bench) => {
        "  --deflate, --no-deflate  offer permessage-deflate; the report shows how many connections
                           agreed and the compression ratio [default: --no-deflate, so that
                           figures measure the server alone unless compression is asked for]
"
    };
}
#[cfg(not(feature = "deflate"))]
macro_rules! deflate_help {
    ($command:ident) => {
        ""
    };
}

/// `serve`'s cluster options, in its help when the `cluster` feature is built.
#[cfg(feature = "cluster")]
macro_rules! cluster_help {
    () => {
        "  --cluster URL            join the instances using this Redis over pub/sub
                           (redis://[USER:PASSWORD@]HOST:PORT[/DB], rediss:// for TLS):
                           broadcasts, topics and peer counts reach every instance, each
                           worker of --processes one [default: off]
  --cluster-prefix NAME    the Redis channels' prefix, the same on every instance of one
                           cluster [default: wsloop]
"
    };
}
#[cfg(all(not(feature = "cluster"), feature = "server"))]
macro_rules! cluster_help {
    () => {
        ""
    };
}

#[cfg(feature = "bench")]
mod bench;
#[cfg(feature = "client")]
mod client;
#[cfg(feature = "bench")]
mod fleet;
mod procs;
#[cfg(feature = "bench")]
mod report;
#[cfg(feature = "server")]
mod serve;
#[cfg(feature = "server")]
mod workers;

const USAGE: &str = "\
wsloop: a small WebSocket server and client on one poll loop

Usage:
  wsloop [serve] [OPTIONS]     serve WebSocket (default: echo on 127.0.0.1:9001)
  wsloop bench [URL] [OPTIONS] open many connections to an echo server and measure
  wsloop client [URL] [OPTS]   send `how are you?` every 2s (or what stdin holds) and
                               print what comes back
  wsloop report FILE.json...   compare or merge `bench --json` runs, as text or a page
  wsloop help [COMMAND]        this text, or a command's options

Durations are written like 2s, 500ms, 0.5s, 1m; sizes like 65536, 64KiB, 16MiB.
Exit status: 0 done (also when stopped by Ctrl-C or SIGTERM), 1 failed, 2 bad usage
(`wsloop client` also: 3 could not connect, 4 the connection closed abnormally).";

/// What `--deflate` says in a build without the `deflate` feature.
#[cfg(not(feature = "deflate"))]
const NO_DEFLATE: &str = "this build has no permessage-deflate (cargo feature `deflate`)";

/// Exit statuses, the same for every command.
pub const EXIT_OK: i32 = 0;
/// The command ran and failed: could not listen or connect, refused, closed abnormally,
/// replies missing, a benchmark that was not clean.
pub const EXIT_FAILURE: i32 = 1;
/// The command line is wrong: an unknown option, a missing or bad value.
pub const EXIT_USAGE: i32 = 2;

/// Why a command did not succeed: the line for standard error (none when it was said
/// already) and the exit status.
#[derive(Debug, PartialEq, Eq)]
pub struct Error {
    status: i32,
    message: Option<String>,
}

impl Error {
    /// A bad command line (exit 2).
    pub fn usage(message: impl Into<String>) -> Error {
        Error::with_status(EXIT_USAGE, message)
    }

    /// The command ran and failed (exit 1).
    pub fn runtime(message: impl Into<String>) -> Error {
        Error::with_status(EXIT_FAILURE, message)
    }

    /// Failed, and has already said why (exit 1).
    #[cfg_attr(not(feature = "bench"), allow(dead_code))]
    pub fn reported() -> Error {
        Error {
            status: EXIT_FAILURE,
            message: None,
        }
    }

    /// Failed with a command's own exit status (`client`'s 3 and 4), and why.
    #[cfg_attr(not(feature = "client"), allow(dead_code))]
    pub fn with_status(status: i32, message: impl Into<String>) -> Error {
        Error {
            status,
            message: Some(message.into()),
        }
    }

    /// The exit status.
    pub fn status(&self) -> i32 {
        self.status
    }

    /// What to say on standard error, if anything is left to say.
    pub fn message(&self) -> Option<&str> {
        self.message.as_deref()
    }
}

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.message().unwrap_or("failed"))
    }
}

impl std::error::Error for Error {}

impl From<lexopt::Error> for Error {
    fn from(e: lexopt::Error) -> Self {
        Error::usage(e.to_string())
    }
}

/// What a command ends with.
pub type Outcome = Result<(), Error>;

/// What a command line asks for.
pub enum Asked<T> {
    /// Run with these settings.
    Run(T),
    /// `--help`.
    Help,
    /// `--version`.
    Version,
}

/// Parses with `parse` (its errors are usage errors) and runs what was asked for.
pub fn dispatch<T>(parsed: Result<Asked<T>, Error>, help: &str, run: impl FnOnce(T) -> Outcome) -> Outcome {
    match parsed? {
        Asked::Run(t) => run(t),
        Asked::Help => print_out(help),
        Asked::Version => version(),
    }
}

/// Writes `text` to standard output. A reader that has gone away (a closed pipe, as with
/// `| head`) is not an error: the output is simply not wanted any more.
pub fn print_out(text: &str) -> Outcome {
    use std::io::Write as _;
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => {
            Err(Error::runtime(format!("cannot write to standard output: {e}")))
        }
        _ => Ok(()),
    }
}

/// Writes a line to standard error; a closed stderr is ignored (there is nowhere left to say so).
pub fn print_err(line: &str) {
    use std::io::Write as _;
    let _ = writeln!(std::io::stderr().lock(), "{line}");
}

/// `wsloop --version`.
pub fn version() -> Outcome {
    print_out(concat!("wsloop ", env!("CARGO_PKG_VERSION"), "\n"))
}

/// Runs the CLI; returns the exit status.
pub fn main() -> i32 {
    let mut args: Vec<std::ffi::OsString> = std::env::args_os().skip(1).collect();
    let sub = args.first().and_then(|a| a.to_str()).map(str::to_string);
    let known = matches!(sub.as_deref(), Some("serve" | "bench" | "client" | "report" | "help"));
    if known {
        args.remove(0);
    }
    let result = match sub.as_deref() {
        Some("help") => help(args.first().and_then(|a| a.to_str())),
        Some("--help") | Some("-h") => help(None),
        Some("--version") | Some("-V") => version(),
        #[cfg(feature = "bench")]
        Some("bench") => bench::run(args),
        #[cfg(feature = "bench")]
        Some("report") => report::run(args),
        #[cfg(feature = "client")]
        Some("client") => client::run(args),
        #[cfg(feature = "server")]
        Some("serve") => serve::run(args),
        Some(s) if known => Err(Error::usage(format!(
            "this build has no `{s}` command (try: wsloop help)"
        ))),
        Some(s) if !s.starts_with('-') => Err(Error::usage(format!("unknown command '{s}' (try: wsloop help)"))),
        #[cfg(feature = "server")]
        _ => serve::run(args),
        #[cfg(not(feature = "server"))]
        _ => Err(Error::usage("this build has no server (try: wsloop help)")),
    };
    match result {
        Ok(()) => EXIT_OK,
        Err(e) => {
            if let Some(why) = e.message() {
                print_err(&format!("wsloop: {why}"));
            }
            e.status()
        }
    }
}

/// `wsloop help [COMMAND]`.
fn help(command: Option<&str>) -> Outcome {
    let text = match command {
        None => return print_out(&format!("{USAGE}\n")),
        #[cfg(feature = "server")]
        Some("serve") => serve::HELP,
        #[cfg(feature = "bench")]
        Some("bench") => bench::HELP,
        #[cfg(feature = "bench")]
        Some("report") => report::HELP,
        #[cfg(feature = "client")]
        Some("client") => client::HELP,
        Some(other) => return Err(Error::usage(format!("unknown command '{other}' (try: wsloop help)"))),
    };
    print_out(text)
}

/// Parses `2s`, `500ms`, `0.5s`, `1m`, `1h` (up to six decimals), or `0`/`off` (as zero).
/// Integer arithmetic only: the server-only binary carries no floating-point formatting or parsing.
pub fn parse_duration(s: &str) -> Result<Duration, Error> {
    let bad = || Error::usage(format!("invalid duration '{s}' (use e.g. 2s, 500ms, 0.5s, 1m)"));
    let t = s.trim();
    if t == "0" || t.eq_ignore_ascii_case("off") {
        return Ok(Duration::ZERO);
    }
    let split = t.find(|c: char| !(c.is_ascii_digit() || c == '.')).ok_or_else(bad)?;
    let (num, unit) = t.split_at(split);
    let per_unit: u64 = match unit {
        "ms" => 1_000_000,
        "s" => 1_000_000_000,
        "m" | "min" => 60_000_000_000,
        "h" => 3_600_000_000_000,
        _ => return Err(bad()),
    };
    let (whole, frac) = num.split_once('.').unwrap_or((num, ""));
    // Six decimals keep `frac * per_unit` within u64 (no 128-bit arithmetic in the binary).
    if whole.is_empty() && frac.is_empty() || frac.len() > 6 {
        return Err(bad());
    }
    let digits = |d: &str| {
        if d.is_empty() {
            Ok(0)
        } else {
            d.parse::<u64>().map_err(|_| bad())
        }
    };
    let (whole, frac_value) = (digits(whole)?, digits(frac)?);
    let frac_nanos = frac_value * per_unit / 10u64.pow(frac.len() as u32);
    const MAX: u64 = 20 * 86_400 * 1_000_000_000;
    match whole.checked_mul(per_unit).map(|w| w + frac_nanos) {
        Some(nanos) if nanos <= MAX => Ok(Duration::from_nanos(nanos)),
        _ => Err(Error::usage(format!("duration '{s}' out of range (at most 20 days)"))),
    }
}

/// A duration that can be turned off: `0` or `off` is `None`.
#[cfg_attr(not(feature = "server"), allow(dead_code))]
pub fn duration_or_off(s: &str) -> Result<Option<Duration>, Error> {
    let d = parse_duration(s)?;
    Ok((!d.is_zero()).then_some(d))
}

/// A duration that cannot be off: zero (or `off`) is refused.
pub fn duration_above_zero(flag: &str, s: &str) -> Result<Duration, Error> {
    let d = parse_duration(s)?;
    if d.is_zero() {
        return Err(Error::usage(format!("{flag} must be above 0 (it cannot be off)")));
    }
    Ok(d)
}

/// A count of at least one.
pub fn count(flag: &str, s: &str) -> Result<u64, Error> {
    match s.trim().parse::<u64>() {
        Ok(n) if n > 0 => Ok(n),
        Ok(_) => Err(Error::usage(format!("{flag} must be at least 1"))),
        Err(_) => Err(Error::usage(format!("invalid {flag} '{s}' (a whole number)"))),
    }
}

/// A size of at least one byte.
pub fn size_above_zero(flag: &str, s: &str) -> Result<usize, Error> {
    match parse_bytes(s)? {
        0 => Err(Error::usage(format!("{flag} must be at least 1 byte"))),
        n => Ok(n),
    }
}

/// Parses a byte count: `1048576`, `64KiB`, `16MiB`, `1k`, `2M`.
pub fn parse_bytes(s: &str) -> Result<usize, Error> {
    let bad = || Error::usage(format!("invalid size '{s}' (use e.g. 65536, 64KiB, 16MiB)"));
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
pub fn value(p: &mut lexopt::Parser) -> Result<String, Error> {
    p.value()
        .map_err(|e| Error::usage(e.to_string()))?
        .into_string()
        .map_err(|v| Error::usage(format!("option value is not UTF-8: '{}'", v.to_string_lossy())))
}

/// The one-line message for an argument `cmd` does not take, pointing to its help.
pub fn unexpected(arg: lexopt::Arg<'_>, cmd: &str) -> Error {
    let what = match arg {
        lexopt::Arg::Long(name) => format!("unknown option '--{name}'"),
        lexopt::Arg::Short(c) => format!("unknown option '-{c}'"),
        lexopt::Arg::Value(v) => format!("unexpected argument '{}'", v.to_string_lossy()),
    };
    Error::usage(format!("{what} (see wsloop {cmd} --help)"))
}

/// `--ca FILE` and `--insecure`, for the client and the load generator on `wss://` URLs.
#[cfg(all(feature = "tls", feature = "client"))]
#[derive(Default)]
pub struct TlsArgs {
    /// `--ca FILE`.
    pub ca: Option<std::ffi::OsString>,
    /// `--insecure`.
    pub insecure: bool,
}

#[cfg(all(feature = "tls", feature = "client"))]
impl TlsArgs {
    /// The client TLS settings the options ask for (`None`: the system's CA bundle).
    pub fn config(&self) -> Result<Option<wsloop::tls::ClientTls>, Error> {
        match (&self.ca, self.insecure) {
            (Some(_), true) => Err(Error::usage("--ca and --insecure exclude each other")),
            (Some(f), false) => wsloop::tls::ClientTls::with_ca_file(f)
                .map(Some)
                .map_err(|e| Error::usage(e.to_string())),
            (None, true) => {
                eprintln!("wsloop: --insecure: the server's certificate is not verified");
                Ok(Some(wsloop::tls::ClientTls::insecure()))
            }
            (None, false) => Ok(None),
        }
    }
}

/// A logger that writes to stderr: `LEVEL message` lines, or one JSON object a line.
struct StderrLogger;

/// `--log-format json`: set once, before the first line.
static LOG_JSON: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

fn log_json() -> bool {
    LOG_JSON.load(std::sync::atomic::Ordering::Relaxed)
}

impl log::Log for StderrLogger {
    fn enabled(&self, m: &log::Metadata<'_>) -> bool {
        m.level() <= log::max_level()
    }
    fn log(&self, r: &log::Record<'_>) {
        if !self.enabled(r.metadata()) {
            return;
        }
        use std::io::Write as _;
        if log_json() {
            let line = json_line(r.level(), r.target(), &r.args().to_string());
            let _ = std::io::stderr().lock().write_all(line.as_bytes());
        } else {
            let _ = writeln!(std::io::stderr().lock(), "{:<5} {}", r.level(), r.args());
        }
    }
    fn flush(&self) {}
}

/// Installs the stderr logger at `level` (error, warn, info, debug, trace, off), text lines.
#[cfg_attr(not(feature = "client"), allow(dead_code))]
pub fn init_log(level: &str) -> Result<(), Error> {
    init_log_as(level, "text")
}

/// Installs the stderr logger at `level`, writing `format`: `text` (`LEVEL message`) or `json`
/// (one object a line: `ts`, `level`, `target`, `pid`, `peer` when the line is about one, `msg`).
pub fn init_log_as(level: &str, format: &str) -> Result<(), Error> {
    let filter: log::LevelFilter = level.parse().map_err(|_| {
        Error::usage(format!(
            "invalid log level '{level}' (error, warn, info, debug, trace, off)"
        ))
    })?;
    let json = match format {
        "text" => false,
        "json" => true,
        _ => return Err(Error::usage(format!("invalid --log-format '{format}' (text or json)"))),
    };
    LOG_JSON.store(json, std::sync::atomic::Ordering::Relaxed);
    let _ = log::set_logger(&StderrLogger);
    log::set_max_level(filter);
    Ok(())
}

/// Writes a line that is not a log record (a `--stats` line) to stderr: as it is, or as a JSON
/// object with the target `wsloop::stats` under `--log-format json`.
#[cfg_attr(not(feature = "server"), allow(dead_code))]
pub fn print_line(target: &str, line: &str) {
    if log_json() {
        use std::io::Write as _;
        let _ = std::io::stderr()
            .lock()
            .write_all(json_line(log::Level::Info, target, line).as_bytes());
    } else {
        print_err(line);
    }
}

/// One JSON log line, newline included. The library's lines about one peer (targets
/// `wsloop::server::peer` and `wsloop::server::message`) begin with its address, which goes to
/// `peer`.
fn json_line(level: log::Level, target: &str, msg: &str) -> String {
    let (peer, msg) = split_peer(target, msg);
    let mut out = String::with_capacity(msg.len() + 128);
    out.push_str("{\"ts\":\"");
    out.push_str(&utc_now());
    out.push_str("\",\"level\":\"");
    out.push_str(&level.as_str().to_ascii_lowercase());
    out.push_str("\",\"target\":");
    json_string(&mut out, target);
    out.push_str(",\"pid\":");
    out.push_str(&std::process::id().to_string());
    if let Some(peer) = peer {
        out.push_str(",\"peer\":");
        json_string(&mut out, peer);
    }
    out.push_str(",\"msg\":");
    json_string(&mut out, msg);
    out.push_str("}\n");
    out
}

/// The peer address a line about one peer begins with (`ADDR: what` or `ADDR what`), and the
/// rest.
fn split_peer<'a>(target: &str, msg: &'a str) -> (Option<&'a str>, &'a str) {
    if !matches!(target, "wsloop::server::peer" | "wsloop::server::message") {
        return (None, msg);
    }
    let token = msg.split(' ').next().unwrap_or_default();
    let addr = token.strip_suffix(':').unwrap_or(token);
    match addr.parse::<std::net::SocketAddr>() {
        Ok(_) => (Some(addr), msg[token.len()..].trim_start()),
        Err(_) => (None, msg),
    }
}

/// `s` as a JSON string: quoted, with quotes, backslashes and control characters escaped.
fn json_string(out: &mut String, s: &str) {
    use std::fmt::Write as _;
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 || c == '\u{7f}' => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

/// The time now in UTC, RFC 3339 with milliseconds: `2026-12-06T10:15:45.123Z`.
fn utc_now() -> String {
    let since = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    utc(since.as_secs(), since.subsec_millis())
}

/// `secs` after 1970 as an RFC 3339 UTC time (the civil calendar from a day count, after
/// Howard Hinnant's `civil_from_days`).
fn utc(secs: u64, millis: u32) -> String {
    let (days, rest) = (secs / 86_400, secs % 86_400);
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{millis:03}Z",
        rest / 3600,
        rest % 3600 / 60,
        rest % 60
    )
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
        assert!(parse_duration("481h").unwrap_err().to_string().contains("out of range"));
    }

    #[test]
    fn zero_and_off() {
        assert_eq!(duration_or_off("off"), Ok(None));
        assert_eq!(duration_or_off("0"), Ok(None));
        assert_eq!(duration_or_off("0s"), Ok(None));
        assert_eq!(duration_or_off("2s"), Ok(Some(Duration::from_secs(2))));
        for zero in ["0", "off", "0ms", "0.0s"] {
            assert_eq!(
                duration_above_zero("--every", zero),
                Err(Error::usage("--every must be above 0 (it cannot be off)"))
            );
        }
        assert_eq!(count("--count", "3"), Ok(3));
        assert_eq!(count("--count", "0"), Err(Error::usage("--count must be at least 1")));
        assert!(count("--count", "-1")
            .unwrap_err()
            .to_string()
            .starts_with("invalid --count '-1'"));
        assert_eq!(
            size_above_zero("--max-message", "0KiB"),
            Err(Error::usage("--max-message must be at least 1 byte"))
        );
        assert_eq!(size_above_zero("--max-message", "1k"), Ok(1024));
    }

    #[test]
    fn json_lines_are_escaped_and_name_the_peer() {
        assert_eq!(utc(0, 0), "1970-01-01T00:00:00.000Z");
        assert_eq!(utc(951_782_400, 5), "2000-02-29T00:00:00.005Z");
        assert_eq!(utc(1_796_552_145, 123), "2026-12-06T10:15:45.123Z");
        let line = json_line(log::Level::Info, "wsloop::server::peer", "[::1]:9001 connected");
        assert!(
            line.ends_with(",\"peer\":\"[::1]:9001\",\"msg\":\"connected\"}\n"),
            "{line}"
        );
        let line = json_line(
            log::Level::Debug,
            "wsloop::server::message",
            "1.2.3.4:5: in text 3 B \"a\\\"\"",
        );
        assert!(line.contains(r#""level":"debug""#), "{line}");
        assert!(
            line.contains(r#""peer":"1.2.3.4:5","msg":"in text 3 B \"a\\\"\""}"#),
            "{line}"
        );
        let line = json_line(log::Level::Warn, "wsloop::cli", "tab\there\u{1}\n");
        assert!(line.contains(r#""msg":"tab\there\u0001\n"}"#), "{line}");
        assert!(!line.contains("peer"), "{line}");
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_bytes("16MiB"), Ok(16 << 20));
        assert_eq!(parse_bytes("64k"), Ok(64 << 10));
        assert_eq!(parse_bytes("125"), Ok(125));
        assert!(parse_bytes("lots").is_err());
    }
}
