//! Deployment behind nginx: nginx on a loopback port with the standard WebSocket proxy settings
//! (the snippet in docs/cli.md) in front of `wsloop serve`; an echo and the browser page pass
//! end to end. Everything nginx writes (pid, logs, temp files) stays under the target directory.

mod common;

use std::fs;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::thread;
use std::time::{Duration, Instant};

use common::{require_tool, spawn_server, tail, Nginx, Tcp, NGINX};
use tungstenite::protocol::frame::coding::CloseCode;
use tungstenite::protocol::CloseFrame;
use tungstenite::Message as WsMessage;

const WAIT: Duration = Duration::from_secs(10);

/// The proxy part of the configuration, as docs/cli.md shows it (`UPSTREAM` is filled in).
const PROXY_SNIPPET: &str = "
    map $http_upgrade $connection_upgrade {
        default upgrade;
        ''      close;
    }
    server {
        listen 127.0.0.1:LISTEN_PORT;
        location / {
            proxy_pass http://UPSTREAM;
            proxy_http_version 1.1;
            proxy_set_header Upgrade $http_upgrade;
            proxy_set_header Connection $connection_upgrade;
            proxy_set_header Host $host;
            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
            proxy_read_timeout 1h;
            proxy_send_timeout 1h;
        }
    }
";

fn conf(dir: &Path, port: u16, upstream: SocketAddr) -> String {
    let d = dir.display();
    let proxy = PROXY_SNIPPET
        .replace("LISTEN_PORT", &port.to_string())
        .replace("UPSTREAM", &upstream.to_string());
    format!(
        "daemon off;
master_process off;
worker_processes 1;
pid {d}/nginx.pid;
error_log {d}/error.log info;
events {{
    worker_connections 256;
}}
http {{
    access_log {d}/access.log;
    client_body_temp_path {d}/client_body;
    proxy_temp_path {d}/proxy;
    fastcgi_temp_path {d}/fastcgi;
    uwsgi_temp_path {d}/uwsgi;
    scgi_temp_path {d}/scgi;
{proxy}}}
"
    )
}

/// Starts nginx with the configuration of docs/cli.md in front of `upstream`.
fn start_nginx(name: &str, upstream: SocketAddr) -> Nginx {
    Nginx::start(name, |dir, port| conf(dir, port, upstream))
}

fn have_nginx() -> bool {
    require_tool("nginx", Path::new(NGINX).is_file())
}

#[test]
fn echo_through_nginx() {
    if !have_nginx() {
        return;
    }
    let server = spawn_server(&["--mode", "echo", "--log", "debug"]);
    let nginx = start_nginx("echo", server.addr);
    let context = || format!("--- nginx ---\n{}\n--- wsloop ---\n{}", nginx.log(), server.stderr());

    let stream = TcpStream::connect(nginx.addr).expect("connect to nginx");
    stream.set_read_timeout(Some(WAIT)).unwrap();
    let (mut ws, response) = tungstenite::client(format!("ws://{}/", nginx.addr), Tcp(stream))
        .unwrap_or_else(|e| panic!("handshake through nginx: {e}\n{}", context()));
    assert_eq!(response.status(), 101);

    ws.send(WsMessage::text("through the proxy")).unwrap();
    assert_eq!(
        ws.read().unwrap(),
        WsMessage::text("through the proxy"),
        "{}",
        context()
    );
    let big: Vec<u8> = (0..(256 << 10)).map(|i| (i % 251) as u8).collect();
    ws.send(WsMessage::binary(big.clone())).unwrap();
    assert_eq!(ws.read().unwrap(), WsMessage::binary(big), "{}", context());
    ws.close(Some(CloseFrame {
        code: CloseCode::Normal,
        reason: "done".into(),
    }))
    .unwrap();
    loop {
        match ws.read() {
            Ok(_) => {}
            Err(tungstenite::Error::ConnectionClosed) => break,
            Err(e) => panic!("closing through nginx: {e}\n{}", context()),
        }
    }
    assert!(
        server.wait_for_stderr("disconnected (1000)", WAIT),
        "the close reached wsloop with 1000\n{}",
        context()
    );
    // The upgrade really went through nginx: its access log has the 101.
    let deadline = Instant::now() + WAIT;
    while !fs::read_to_string(nginx.dir.join("access.log")).is_ok_and(|l| l.contains("\"GET / HTTP/1.1\" 101")) {
        assert!(Instant::now() < deadline, "no 101 in nginx's access log\n{}", context());
        thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn page_through_nginx() {
    if !have_nginx() {
        return;
    }
    let server = spawn_server(&["--mode", "broadcast"]);
    let nginx = start_nginx("page", server.addr);
    let mut s = TcpStream::connect(nginx.addr).expect("connect to nginx");
    s.set_read_timeout(Some(WAIT)).unwrap();
    write!(s, "GET / HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n", nginx.addr).unwrap();
    let mut body = String::new();
    s.read_to_string(&mut body).expect("read the page");
    assert!(
        body.starts_with("HTTP/1.1 200"),
        "{}\n{}",
        tail(&body, 2048),
        nginx.log()
    );
    assert!(body.contains("location.host"), "the page came through");
}
