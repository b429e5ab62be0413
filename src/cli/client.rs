//! `wsloop client`: the original note's client, on the library's [`Client`].

use std::collections::VecDeque;
use std::ffi::OsString;
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use std::time::Instant;

use wsloop::client::{Client, ClientConfig, ClientError, ClientEvent};
use wsloop::proto::close_code;

use super::{
    count, dispatch, duration_above_zero, init_log, size_above_zero, unexpected, value, Asked, Error, Outcome, EXIT_OK,
};

/// `wsloop client --help`.
pub const HELP: &str = concat!(
    "\
Usage: wsloop client [URL] [OPTIONS]

Connects to URL (ws:// or wss://) [default: ws://127.0.0.1:9001/] and prints each message
received on stdout, one per line. Logs go to stderr. What it sends:
  - stdin a terminal or nothing (/dev/null): the demo, `how are you?` every 2 seconds;
  - stdin a pipe or a file (`echo hi | wsloop client URL`): its lines, one message each,
    as they come; once the input ends and the replies are in, it closes with 1000;
  - --send or --every: the demo's way, whatever stdin is.

Options:
  -1, --one              send one message (--send TEXT, else the first line of stdin, else
                         `how are you?`), print the first message that comes back, close
                         with 1000
  -b, --binary           binary both ways: stdin taken whole as one binary message (or
                         --send TEXT as binary); binary messages printed exactly as
                         received, nothing added
  --every DUR            time between sends, above 0 [default: 2s]
  --send TEXT            the message sent [default: how are you?]
  --count N              stop after N sends and their replies, then close with 1000
  --stdin                send each line of standard input, as it comes, whatever stdin is
  --ping-every DUR       send a ping every DUR; each pong is logged with its round trip
  --reconnect            when connecting fails or the connection ends, try again
                         (waiting 0.5s, 1s, 2s, ... at most 30s)
  -H, --header 'NAME: VALUE'
                         add a request header (repeatable)
  --protocol NAME        offer a subprotocol (repeatable)
  --origin ORIGIN        send an Origin header, as a browser does
  -v, --verbose          print the request and response heads on stderr
  --connect-timeout DUR  time for the TCP connect and the handshake [default: 10s]
  --max-message BYTES    largest message accepted; larger closes with 1009 [default: 16MiB]
",
    deflate_help!(client),
    "  --log LEVEL            error | warn | info | debug | trace | off [default: info]
  -q, --quiet            only warnings and errors (--log warn)
  -V, --version          print the version
",
    client_tls_help!(),
    "

Replies: when the server sends our messages back (echo, broadcast), those echoes are the
replies and other messages are printed but answer nothing; from a server that never sends
ours back (reply mode), each message answers one send. Replies still missing 5s after the
last send are a failure.

When the connection closes, a line on stderr gives the close code and reason (at --log info
for a normal close; always for an abnormal one). Ctrl-C or SIGTERM closes with 1000 and exits
0 (at once while connecting or waiting to reconnect; a second one exits at once). When stdout
is closed (`| head`) the client closes with 1000 and exits 0.

Exit status:
  0  done: we closed with 1000, or the server closed normally (1000, 1001, or no code)
  1  failed: replies missing, stdin or stdout unusable
  2  bad usage
  3  could not connect: refused, timed out, TLS failed, the server refused the upgrade
  4  the connection closed abnormally: another close code, no close frame (1006), a
     protocol error
"
);

/// Exit status: connecting, the TLS handshake or the upgrade failed.
const EXIT_CONNECT: i32 = 3;
/// Exit status: the connection closed with a code other than a normal one, or without a close.
const EXIT_CLOSED: i32 = 4;

/// How long to wait for the last replies before closing anyway.
const REPLY_WAIT: Duration = Duration::from_secs(5);
/// Reconnect backoff bounds.
const BACKOFF_FIRST: Duration = Duration::from_millis(500);
const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// Unsent bytes above which standard input is not read until they drain.
const INPUT_BACKPRESSURE: usize = 1 << 20;
/// How often a paused input checks whether the queue has drained.
const INPUT_RETRY: Duration = Duration::from_millis(20);
/// Reads of standard input per event, so that a fast producer cannot hold up receiving.
const INPUT_CHUNKS: usize = 64;
/// Sends remembered for matching their echoes.
const MAX_PENDING: usize = 1 << 16;

struct Options {
    url: String,
    every: Duration,
    send: String,
    count: Option<u64>,
    stdin: bool,
    reconnect: bool,
    /// `-1`: one message, one reply.
    one: bool,
    /// `-b`: binary both ways.
    binary: bool,
    ping_every: Option<Duration>,
    /// `--send` or `--every` chose the demo's way of sending.
    periodic_asked: bool,
    cfg: ClientConfig,
}

/// What the client sends.
enum Source {
    /// The original note's demo: `--send` every `--every`.
    Periodic,
    /// Standard input's lines, as they come.
    Lines,
    /// One message, read before connecting (`-1`, `-b`).
    Once(Vec<u8>),
}

/// Sends and replies over the whole run (across reconnects).
#[derive(Default)]
struct Progress {
    sent: u64,
    /// Replies on earlier connections.
    replied_before: u64,
    /// Sends on this connection.
    sent_here: u64,
    /// Fingerprints of this connection's sends that have not come back, oldest first.
    pending: VecDeque<u64>,
    /// Sends on this connection that came back (echo and broadcast servers).
    echoed: u64,
    /// Other messages received on this connection after its first send.
    others: u64,
    /// Sends given up on: no reply came in time, or the connection they were sent on ended.
    unanswered: u64,
    /// Standard output is closed: nobody reads what we print.
    output_gone: bool,
}

/// A message's fingerprint (FNV-1a), to match an echo to its send without keeping a copy.
fn fingerprint(msg: &[u8]) -> u64 {
    msg.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    })
}

impl Progress {
    /// Counts a received message: the echo of one of our sends, or another message.
    fn received(&mut self, msg: &[u8]) {
        let f = fingerprint(msg);
        if let Some(i) = self.pending.iter().position(|&p| p == f) {
            // Earlier sends that did not come back stay unanswered (a server may skip
            // messages for a slow reader); the queue only keeps what may still come.
            self.pending.drain(..=i);
            self.echoed += 1;
        } else if self.sent_here > 0 {
            self.others += 1;
        }
    }

    /// Replies on this connection: the echoes of our sends when the server sends ours back;
    /// from one that never does, one message answers one send.
    fn replied_here(&self) -> u64 {
        if self.echoed > 0 {
            self.echoed
        } else {
            self.others.min(self.sent_here)
        }
    }

    fn replies(&self) -> u64 {
        self.replied_before + self.replied_here()
    }

    fn all_replied(&self) -> bool {
        self.replied_here() >= self.sent_here
    }

    fn sent(&mut self, msg: &[u8]) {
        self.sent += 1;
        self.sent_here += 1;
        if self.pending.len() == MAX_PENDING {
            self.pending.pop_front();
        }
        self.pending.push_back(fingerprint(msg));
    }

    /// Gives up on the replies still missing on this connection and starts counting anew.
    fn new_connection(&mut self) {
        let replied = self.replied_here();
        self.unanswered += self.sent_here - replied;
        self.replied_before += replied;
        self.sent_here = 0;
        self.pending.clear();
        self.echoed = 0;
        self.others = 0;
    }
}

/// How a connection ended without an error.
enum End {
    /// We closed it (our work is done); the server answered with `code`.
    Done { code: u16 },
    /// The server closed it.
    ServerClosed { code: u16, reason: String },
}

/// Whether a close code ends a connection normally.
fn normal_close(code: u16) -> bool {
    matches!(
        code,
        close_code::NORMAL | close_code::GOING_AWAY | close_code::NO_STATUS
    )
}

/// A request header from `-H 'NAME: VALUE'`: NAME a token, VALUE on one line.
fn parse_header(v: &str) -> Result<(String, String), Error> {
    let bad = |why: &str| {
        Error::usage(format!(
            "invalid header '{v}': {why}; write it as -H 'Authorization: Bearer 123'"
        ))
    };
    let (name, value) = v.split_once(':').ok_or_else(|| bad("expected NAME: VALUE"))?;
    let name = name.trim();
    let tchar = |b: u8| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b);
    if name.is_empty() || !name.bytes().all(tchar) {
        return Err(bad("the name must be a token: letters, digits and !#$%&'*+-.^_`|~"));
    }
    if value.bytes().any(|b| b == b'\r' || b == b'\n' || b == 0) {
        return Err(bad("the value holds a line break"));
    }
    Ok((name.to_string(), value.trim().to_string()))
}

/// `-v`: a head on stderr, `> ` before each request line and `< ` before each answer line.
fn print_head(head: &[u8]) {
    let text = String::from_utf8_lossy(head);
    let mark = if text.starts_with("HTTP/") { "< " } else { "> " };
    let mut err = io::stderr().lock();
    for line in text.split("\r\n").filter(|l| !l.is_empty()) {
        let _ = writeln!(err, "{mark}{line}");
    }
}

/// Whether standard input is a pipe or a file: input to send. A terminal, `/dev/null` or a
/// closed stdin is none.
fn stdin_has_input() -> bool {
    let Ok(fd) = io::stdin().as_fd().try_clone_to_owned() else {
        return false;
    };
    File::from(fd)
        .metadata()
        .is_ok_and(|m| m.file_type().is_fifo() || m.is_file())
}

/// Reads standard input whole (`-b`), or its first line (`-1`), before connecting.
fn read_message(whole: bool, max: usize) -> Result<Option<Vec<u8>>, Error> {
    use std::io::BufRead;
    let err = |e: io::Error| Error::runtime(format!("cannot read standard input: {e}"));
    let limit = u64::try_from(max).unwrap_or(u64::MAX).saturating_add(1);
    let mut input = io::stdin().lock().take(limit);
    let mut msg = Vec::new();
    let n = if whole {
        input.read_to_end(&mut msg).map_err(err)?
    } else {
        input.read_until(b'\n', &mut msg).map_err(err)?
    };
    if msg.len() > max {
        return Err(Error::runtime(format!(
            "the message on standard input is longer than {max} bytes (--max-message)"
        )));
    }
    if whole {
        return Ok(Some(msg));
    }
    if n == 0 {
        return Ok(None);
    }
    if msg.last() == Some(&b'\n') {
        msg.pop();
        if msg.last() == Some(&b'\r') {
            msg.pop();
        }
    }
    Ok(Some(msg))
}

/// Parses the options and runs the client until it is done.
pub fn run(args: Vec<OsString>) -> Outcome {
    dispatch(parse(args), HELP, client)
}

fn parse(args: Vec<OsString>) -> Result<Asked<Options>, Error> {
    use lexopt::prelude::*;
    let mut o = Options {
        url: "ws://127.0.0.1:9001/".to_string(),
        every: Duration::from_secs(2),
        send: "how are you?".to_string(),
        count: None,
        stdin: false,
        reconnect: false,
        one: false,
        binary: false,
        ping_every: None,
        periodic_asked: false,
        cfg: ClientConfig::default(),
    };
    let mut log_level = "info".to_string();
    let (mut every_set, mut send_set, mut url_set) = (false, false, false);
    let mut p = lexopt::Parser::from_args(args);
    #[cfg(feature = "tls")]
    let mut tls = super::TlsArgs::default();
    while let Some(arg) = p.next()? {
        match arg {
            #[cfg(feature = "tls")]
            Long("ca") => tls.ca = Some(p.value()?),
            #[cfg(feature = "tls")]
            Long("insecure") => tls.insecure = true,
            Long("every") => {
                o.every = duration_above_zero("--every", &value(&mut p)?)?;
                every_set = true;
            }
            Long("send") => {
                o.send = value(&mut p)?;
                send_set = true;
            }
            Long("count") => o.count = Some(count("--count", &value(&mut p)?)?),
            Short('1') | Long("one") => o.one = true,
            Short('b') | Long("binary") => o.binary = true,
            Short('v') | Long("verbose") => o.cfg.on_head = Some(print_head),
            Long("ping-every") => o.ping_every = Some(duration_above_zero("--ping-every", &value(&mut p)?)?),
            Long("origin") => {
                let origin = value(&mut p)?;
                if origin.bytes().any(|b| b.is_ascii_control()) {
                    return Err(Error::usage(format!(
                        "invalid --origin '{origin}': it holds a control character"
                    )));
                }
                o.cfg.headers.push(("Origin".to_string(), origin));
            }
            Long("stdin") => o.stdin = true,
            Long("reconnect") => o.reconnect = true,
            Long("protocol") => o.cfg.protocols.push(value(&mut p)?),
            Short('H') | Long("header") => o.cfg.headers.push(parse_header(&value(&mut p)?)?),
            Long("connect-timeout") => {
                o.cfg.connect_timeout = duration_above_zero("--connect-timeout", &value(&mut p)?)?
            }
            Long("max-message") => o.cfg.max_message = size_above_zero("--max-message", &value(&mut p)?)?,
            #[cfg(feature = "deflate")]
            Long("deflate") => o.cfg.deflate.enabled = true,
            #[cfg(feature = "deflate")]
            Long("no-deflate") => o.cfg.deflate.enabled = false,
            #[cfg(not(feature = "deflate"))]
            Long("deflate") => return Err(Error::usage(super::NO_DEFLATE)),
            #[cfg(not(feature = "deflate"))]
            Long("no-deflate") => {}
            Long("log") => log_level = value(&mut p)?,
            Short('q') | Long("quiet") => log_level = "warn".to_string(),
            Short('h') | Long("help") => return Ok(Asked::Help),
            Short('V') | Long("version") => return Ok(Asked::Version),
            Value(v) if !url_set => {
                o.url = v
                    .into_string()
                    .map_err(|v| Error::usage(format!("URL is not UTF-8: '{}'", v.to_string_lossy())))?;
                url_set = true;
            }
            _ => return Err(unexpected(arg, "client")),
        }
    }
    if o.stdin && (every_set || send_set) {
        return Err(Error::usage(
            "--stdin sends input lines: it cannot be combined with --every or --send".to_string(),
        ));
    }
    if o.one && (o.stdin || every_set || o.count.is_some() || o.reconnect) {
        return Err(Error::usage(
            "-1 sends one message: it cannot be combined with --stdin, --every, --count or --reconnect".to_string(),
        ));
    }
    o.periodic_asked = every_set || send_set;
    #[cfg(feature = "tls")]
    {
        o.cfg.tls = tls.config()?;
    }
    init_log(&log_level)?;
    Ok(Asked::Run(o))
}

/// What is sent, from the options and what standard input is (see the help).
fn source(o: &Options) -> Result<Source, Error> {
    let max = o.cfg.max_message;
    Ok(if o.stdin {
        Source::Lines
    } else if o.one && o.periodic_asked {
        Source::Once(o.send.as_bytes().to_vec())
    } else if o.one {
        let line = read_message(o.binary, max)?;
        Source::Once(line.unwrap_or_else(|| o.send.as_bytes().to_vec()))
    } else if o.periodic_asked {
        Source::Periodic
    } else if o.binary {
        Source::Once(read_message(true, max)?.unwrap_or_default())
    } else if stdin_has_input() {
        Source::Lines
    } else {
        Source::Periodic
    })
}

/// The advice the command line adds to a TLS failure.
#[cfg(feature = "tls")]
fn tls_advice(e: &ClientError) -> &'static str {
    use wsloop::tls::TlsError;
    match e {
        ClientError::Tls {
            error: TlsError::NotTrusted,
            ..
        } => " (--ca FILE trusts a private CA or a self-signed certificate)",
        ClientError::Tls {
            error: TlsError::NameMismatch { .. },
            ..
        } => " (connect by a name the certificate is for)",
        _ => "",
    }
}

#[cfg(not(feature = "tls"))]
fn tls_advice(_: &ClientError) -> &'static str {
    ""
}

fn client(o: Options) -> Outcome {
    let source = source(&o)?;
    let interrupts = Interrupts::install().map_err(|e| Error::runtime(format!("cannot handle signals: {e}")))?;
    let mut input = if matches!(source, Source::Lines) {
        Some(Input::open()?)
    } else {
        None
    };
    let mut progress = Progress::default();
    let mut backoff = BACKOFF_FIRST;
    loop {
        let ended = match Client::connect(&o.url, o.cfg.clone()) {
            Ok(client) => {
                #[cfg(feature = "deflate")]
                let how = if client.deflate().is_some() {
                    " (permessage-deflate)"
                } else {
                    ""
                };
                #[cfg(not(feature = "deflate"))]
                let how = "";
                log::info!("connected to {}{how}", o.url);
                backoff = BACKOFF_FIRST;
                Session::new(client, &o, &source, input.as_mut(), &mut progress).run(&interrupts)
            }
            Err(e @ (ClientError::InvalidUrl(_) | ClientError::InvalidConfig(_))) => {
                return Err(Error::usage(e.to_string()))
            }
            Err(e) => Err(Error::with_status(EXIT_CONNECT, format!("{e}{}", tls_advice(&e)))),
        };
        if progress.output_gone {
            return Ok(()); // the reader of our output has gone: nothing left to do
        }
        let finished = input.as_ref().is_some_and(|i| i.eof)
            || o.count.is_some_and(|n| progress.sent >= n)
            || matches!(source, Source::Once(_)) && progress.sent > 0;
        let why = match ended {
            Ok(End::Done { .. }) if progress.unanswered > 0 => {
                return Err(Error::runtime(format!(
                    "{} of {} message(s) got no reply (waited {}s after the last)",
                    progress.unanswered,
                    progress.sent,
                    REPLY_WAIT.as_secs()
                )));
            }
            Ok(End::Done { code }) => {
                log::info!("closed: 1000 (the server answered {code})");
                return Ok(());
            }
            Ok(End::ServerClosed { code, reason }) => {
                let what = format!("server closed the connection: {code} {reason}");
                let what = what.trim_end().to_string();
                if !o.reconnect || finished {
                    let short = o.count.is_some_and(|n| progress.replies() < n) || o.one && progress.replies() == 0;
                    return match (normal_close(code), short) {
                        (true, false) => {
                            log::info!("{what}");
                            Ok(())
                        }
                        (true, true) if o.one => Err(Error::runtime(format!("{what} before replying"))),
                        (true, true) => Err(Error::runtime(format!(
                            "{what} after {} of {} replies",
                            progress.replies(),
                            o.count.unwrap_or(0)
                        ))),
                        (false, _) => Err(Error::with_status(EXIT_CLOSED, what)),
                    };
                }
                Error::with_status(EXIT_CLOSED, what)
            }
            Err(e) => e,
        };
        if !o.reconnect || finished {
            return Err(why);
        }
        log::warn!("{why}; reconnecting in {}ms", backoff.as_millis());
        std::thread::sleep(backoff);
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
}

/// SIGINT and SIGTERM. While a connection is open the first one closes it cleanly (1000) and
/// the run ends with exit status 0; a second one, or one while connecting or waiting to
/// reconnect, ends the process at once, with status 0 as well.
struct Interrupts {
    pipe: UnixStream,
    /// While set, a signal ends the process at once.
    hard: Arc<AtomicBool>,
}

/// Re-arms the immediate exit when a session ends, however it ends.
struct Graceful<'a>(&'a Interrupts);

impl Drop for Graceful<'_> {
    fn drop(&mut self) {
        self.0.hard.store(true, Ordering::SeqCst);
    }
}

impl Interrupts {
    fn install() -> io::Result<Interrupts> {
        let (read, write) = UnixStream::pair()?;
        read.set_nonblocking(true)?;
        write.set_nonblocking(true)?;
        let hard = Arc::new(AtomicBool::new(true));
        for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
            signal_hook::flag::register_conditional_shutdown(sig, EXIT_OK, Arc::clone(&hard))?;
            signal_hook::low_level::pipe::register(sig, write.try_clone()?)?;
        }
        Ok(Interrupts { pipe: read, hard })
    }

    fn fd(&self) -> RawFd {
        self.pipe.as_raw_fd()
    }

    /// Signals close `client` gracefully until the returned guard is dropped.
    fn graceful(&self, client: &mut Client) -> Result<Graceful<'_>, Error> {
        self.take();
        client
            .watch(self.fd())
            .map_err(|e| Error::runtime(format!("cannot watch signals: {e}")))?;
        self.hard.store(false, Ordering::SeqCst);
        Ok(Graceful(self))
    }

    /// Empties the pipe; from now on the next signal is a hard one.
    fn take(&self) {
        let mut buf = [0u8; 16];
        while matches!((&self.pipe).read(&mut buf), Ok(n) if n > 0) {}
        self.hard.store(true, Ordering::SeqCst);
    }
}

/// One connection's run.
struct Session<'a> {
    client: Client,
    o: &'a Options,
    source: &'a Source,
    input: Option<&'a mut Input>,
    p: &'a mut Progress,
    /// Everything is sent; the timer is the deadline for the last replies.
    sending_done: bool,
    /// Standard input is not read until the send queue drains.
    input_paused: bool,
    /// We sent our close frame.
    closing: bool,
    /// `--ping-every`: when the next ping goes, and when the last one went.
    next_ping: Option<Instant>,
    ping_sent: Option<Instant>,
}

impl<'a> Session<'a> {
    fn new(
        client: Client,
        o: &'a Options,
        source: &'a Source,
        input: Option<&'a mut Input>,
        p: &'a mut Progress,
    ) -> Self {
        p.new_connection();
        Session {
            client,
            o,
            source,
            input,
            p,
            sending_done: false,
            input_paused: false,
            closing: false,
            next_ping: o.ping_every.map(|every| Instant::now() + every),
            ping_sent: None,
        }
    }

    fn run(mut self, interrupts: &Interrupts) -> Result<End, Error> {
        let _graceful = interrupts.graceful(&mut self.client)?;
        match (self.source, self.input.as_deref()) {
            (Source::Once(msg), _) => {
                self.send(msg)?;
                self.finish_sending()?;
            }
            (_, Some(input)) => {
                if input.pollable {
                    self.client
                        .watch(input.fd())
                        .map_err(|e| Error::runtime(format!("cannot watch standard input: {e}")))?;
                }
                self.read_input()?;
            }
            (_, None) => self.send_next()?,
        }
        loop {
            let timeout = self.next_ping.map(|t| t.saturating_duration_since(Instant::now()));
            let event = self
                .client
                .next_event(timeout)
                .map_err(|e| Error::with_status(EXIT_CLOSED, e.to_string()))?;
            self.ping_if_due();
            match event {
                Some(ClientEvent::Text(text)) => self.received(text.as_bytes(), false)?,
                Some(ClientEvent::Binary(data)) => self.received(&data, true)?,
                Some(ClientEvent::Pong(_)) => {
                    if let Some(sent) = self.ping_sent.take() {
                        let micros = sent.elapsed().as_micros();
                        log::info!("pong in {}.{:03} ms", micros / 1000, micros % 1000);
                    }
                }
                Some(ClientEvent::Timer) if self.sending_done => {
                    // The replies did not all come: give up on them.
                    self.p.new_connection();
                    self.close()?;
                }
                Some(ClientEvent::Timer) if self.input.is_some() => self.read_input()?,
                Some(ClientEvent::Timer) => self.send_next()?,
                Some(ClientEvent::Readable(fd)) if fd == interrupts.fd() => {
                    interrupts.take();
                    log::info!("interrupted: closing");
                    // Stopping was asked for: what had no reply yet is not a failure.
                    self.p.sent_here = self.p.replied_here();
                    self.close()?;
                }
                Some(ClientEvent::Readable(_)) => self.read_input()?,
                Some(ClientEvent::Closed { code, reason }) => {
                    return Ok(if self.closing {
                        End::Done { code }
                    } else {
                        End::ServerClosed { code, reason }
                    })
                }
                Some(_) | None => {}
            }
        }
    }

    /// `--ping-every`: sends a ping when one is due.
    fn ping_if_due(&mut self) {
        let (Some(due), Some(every)) = (self.next_ping, self.o.ping_every) else {
            return;
        };
        let now = Instant::now();
        if now < due {
            return;
        }
        self.next_ping = Some(now + every);
        if self.client.is_open() && !self.closing && self.client.ping(b"wsloop").is_ok() {
            self.ping_sent = Some(now);
        }
    }

    /// Prints a message; closes once every send has its reply (with `-1`: the first message).
    fn received(&mut self, msg: &[u8], binary: bool) -> Result<(), Error> {
        if !self.p.output_gone {
            let mut out = io::stdout().lock();
            // `-b`: a binary message exactly as it came; anything else one per line.
            let newline: &[u8] = if binary && self.o.binary { b"" } else { b"\n" };
            match out
                .write_all(msg)
                .and_then(|()| out.write_all(newline))
                .and_then(|()| out.flush())
            {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::BrokenPipe => {
                    log::debug!("stdout closed: closing");
                    self.p.output_gone = true;
                    return self.close();
                }
                Err(e) => return Err(Error::runtime(format!("cannot write to stdout: {e}"))),
            }
        }
        self.p.received(msg);
        if self.o.one && self.p.sent_here > 0 {
            // Whatever came first answers the one message.
            self.p.echoed = self.p.sent_here;
            return self.close();
        }
        if self.sending_done && self.p.all_replied() {
            self.close()?;
        }
        Ok(())
    }

    fn close(&mut self) -> Result<(), Error> {
        if !self.closing {
            self.closing = true;
            // Fails only when the server is closing too: its close frame then ends the run.
            let _ = self.client.close(close_code::NORMAL, "");
        }
        Ok(())
    }

    fn count_reached(&self) -> bool {
        self.o.count.is_some_and(|n| self.p.sent >= n)
    }

    /// Nothing more will be sent: close now if every reply is in, else after a grace period.
    fn finish_sending(&mut self) -> Result<(), Error> {
        self.sending_done = true;
        if self.p.all_replied() && !self.o.one {
            return self.close();
        }
        self.client.set_timer(REPLY_WAIT);
        Ok(())
    }

    /// Periodic mode: send the message and set the timer for the next one.
    fn send_next(&mut self) -> Result<(), Error> {
        if !self.client.is_open() {
            return Ok(());
        }
        self.send(self.o.send.as_bytes())?;
        if self.count_reached() {
            return self.finish_sending();
        }
        self.client.set_timer(self.o.every);
        Ok(())
    }

    fn send(&mut self, line: &[u8]) -> Result<(), Error> {
        let sent = match std::str::from_utf8(line) {
            Ok(text) if !self.o.binary => self.client.send_text(text),
            _ => self.client.send_binary(line), // `-b`, or not UTF-8: sent as it is, as binary
        };
        match sent {
            Ok(()) => {
                self.p.sent(line);
                Ok(())
            }
            // The server is closing; its close frame ends the run.
            Err(ClientError::NotOpen) => Ok(()),
            Err(e) => Err(Error::runtime(e.to_string())),
        }
    }

    /// `--stdin`: sends the complete lines that are there, pausing while the queue is full.
    fn read_input(&mut self) -> Result<(), Error> {
        let max_line = self.o.cfg.max_message;
        for _ in 0..INPUT_CHUNKS {
            if self.sending_done || self.closing || !self.client.is_open() {
                return Ok(());
            }
            if self.client.queued() > INPUT_BACKPRESSURE {
                self.input_paused = true;
                self.client.set_timer(INPUT_RETRY);
                return Ok(());
            }
            self.input_paused = false;
            let Some(input) = self.input.as_deref_mut() else {
                return Ok(());
            };
            let lines = input.read_lines(max_line)?;
            let (eof, idle) = (input.eof, input.idle);
            for line in &lines {
                if self.count_reached() {
                    break;
                }
                self.send(line)?;
            }
            if self.count_reached() || eof {
                if let Some(input) = self.input.as_deref().filter(|i| i.pollable) {
                    let _ = self.client.unwatch(input.fd());
                }
                return self.finish_sending();
            }
            if idle {
                return Ok(()); // wait for the next readable event
            }
        }
        // Input keeps coming: let received messages through, then read on.
        self.input_paused = true;
        self.client.set_timer(INPUT_RETRY);
        Ok(())
    }
}

/// Standard input, read without a thread and without blocking the loop.
///
/// A pipe or terminal is reopened through `/proc/self/fd/0` with `O_NONBLOCK`: a new open file
/// description, so the shell's terminal is left blocking, and the client's poll watches it.
/// What epoll cannot watch (a regular file, `/dev/null`) never makes a read wait, so it is read
/// as it is, a piece per loop turn. A socket can be neither reopened nor read without waiting,
/// and is refused with a message.
struct Input {
    source: File,
    /// Whether `source` is watched by the poll (otherwise it is always ready).
    pollable: bool,
    /// An unfinished line.
    partial: Vec<u8>,
    /// The input ended.
    eof: bool,
    /// The last read would have blocked.
    idle: bool,
}

impl Input {
    fn open() -> Result<Input, Error> {
        let (source, pollable) = match Self::reopen() {
            Some(file) => (file, true),
            None => {
                let err = |e: io::Error| Error::runtime(format!("cannot read standard input: {e}"));
                let file = File::from(io::stdin().as_fd().try_clone_to_owned().map_err(err)?);
                if file.metadata().map_err(err)?.file_type().is_socket() {
                    return Err(Error::runtime(
                        "standard input is a socket, which --stdin cannot read without \
                                blocking; pipe it in instead (e.g. `... | cat | wsloop client --stdin`)"
                            .to_string(),
                    ));
                }
                (file, false)
            }
        };
        Ok(Input {
            source,
            pollable,
            partial: Vec::new(),
            eof: false,
            idle: false,
        })
    }

    /// Standard input reopened non-blocking, if it is something epoll can watch.
    fn reopen() -> Option<File> {
        let meta = File::from(io::stdin().as_fd().try_clone_to_owned().ok()?)
            .metadata()
            .ok()?;
        if meta.is_file() {
            return None;
        }
        let file = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
            .open("/proc/self/fd/0")
            .ok()?;
        // Character devices such as /dev/null cannot be polled; find out now.
        let probe = mio::Poll::new().ok()?;
        let fd = file.as_raw_fd();
        probe
            .registry()
            .register(&mut mio::unix::SourceFd(&fd), mio::Token(0), mio::Interest::READABLE)
            .ok()?;
        Some(file)
    }

    fn fd(&self) -> RawFd {
        self.source.as_raw_fd()
    }

    /// Reads once; returns the complete lines (without `\n` or `\r\n`). At the end of input an
    /// unfinished last line counts as a line.
    fn read_lines(&mut self, max_line: usize) -> Result<Vec<Vec<u8>>, Error> {
        let mut buf = [0u8; 16 << 10];
        self.idle = false;
        let n = loop {
            match self.source.read(&mut buf) {
                Ok(n) => break n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.idle = true;
                    return Ok(Vec::new());
                }
                Err(e) => return Err(Error::runtime(format!("cannot read standard input: {e}"))),
            }
        };
        let mut lines = Vec::new();
        if n == 0 {
            self.eof = true;
            if !self.partial.is_empty() {
                lines.push(std::mem::take(&mut self.partial));
            }
            return Ok(lines);
        }
        let mut rest = &buf[..n];
        while let Some(i) = rest.iter().position(|&b| b == b'\n') {
            self.partial.extend_from_slice(&rest[..i]);
            let mut line = std::mem::take(&mut self.partial);
            if line.last() == Some(&b'\r') {
                line.pop();
            }
            lines.push(line);
            rest = &rest[i + 1..];
        }
        self.partial.extend_from_slice(rest);
        if self.partial.len() > max_line {
            return Err(Error::runtime(format!("an input line is longer than {max_line} bytes")));
        }
        Ok(lines)
    }
}
