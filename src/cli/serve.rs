//! `wsloop serve`.

use std::ffi::OsString;

use wsloop::server::{Config, Echo, Reply, SlowConsumer};
use wsloop::Server;

use super::{arg_err, init_log, parse_bytes, parse_duration, value};

const HELP: &str = "\
Usage: wsloop serve [OPTIONS]

Options:
  --listen ADDR            address to listen on [default: 127.0.0.1:9001]
  --mode MODE              echo | reply [default: echo]
  --reply TEXT             the answer in reply mode [default: fine thank you]
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

fn opt_duration(s: &str) -> Result<Option<std::time::Duration>, String> {
    let d = parse_duration(s)?;
    Ok(if d.is_zero() { None } else { Some(d) })
}

/// Parses the options and runs the server until it is stopped.
pub fn run(args: Vec<OsString>) -> Result<(), String> {
    use lexopt::prelude::*;
    let mut cfg = Config {
        handle_signals: true,
        ..Config::default()
    };
    let mut listen = "127.0.0.1:9001".to_string();
    let mut mode = "echo".to_string();
    let mut reply = "fine thank you".to_string();
    let mut log_level = "info".to_string();
    let mut p = lexopt::Parser::from_args(args);
    while let Some(arg) = p.next().map_err(arg_err)? {
        match arg {
            Long("listen") => listen = value(&mut p)?,
            Long("mode") => mode = value(&mut p)?,
            Long("reply") => reply = value(&mut p)?,
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
            Long("origin") => cfg.policy.origins.push(value(&mut p)?),
            Long("protocol") => cfg.policy.protocols.push(value(&mut p)?),
            Long("log") => log_level = value(&mut p)?,
            Short('h') | Long("help") => {
                print!("{HELP}");
                return Ok(());
            }
            _ => return Err(arg.unexpected().to_string()),
        }
    }
    if !matches!(mode.as_str(), "echo" | "reply") {
        return Err(format!("invalid --mode '{mode}' (echo or reply)"));
    }
    init_log(&log_level)?;
    let server = Server::bind(listen.as_str(), cfg).map_err(|e| format!("cannot listen on {listen}: {e}"))?;
    log::info!("listening on {}", server.local_addr());
    let result = match mode.as_str() {
        "echo" => server.run(Echo),
        "reply" => server.run(Reply(reply)),
        _ => unreachable!("mode checked above"),
    };
    result.map_err(|e| format!("server failed: {e}"))
}
