//! The Autobahn server cases over TLS. kosoku speaks `ws://` only, so nginx stands between:
//! kosoku -> `ws://` -> nginx -> `wss://` (nginx as the TLS client, TLS 1.3) ->
//! `wsloop serve --tls-cert --tls-key --mode echo`. Every frame of every case crosses wsloop's
//! TLS transport; nginx relays the upgraded connection's bytes as they come. Groups 1 to 10 (301
//! cases): the compression groups test the same code over plain TCP in tests/autobahn_server.rs,
//! and over TLS would add minutes without reaching anything new in the transport.
//!
//! The server is the binary `WSLOOP_AUTOBAHN_SERVER` names when set, as in
//! tests/autobahn_server.rs.
//!
//! Needs kosoku (a venv under the target directory, as tests/autobahn_server.rs) and nginx;
//! a missing one skips loudly outside CI and fails under `CI=true`.

#[path = "common/certs.rs"]
mod certs;
mod common;

use std::net::SocketAddr;
use std::path::Path;

use common::autobahn::{self, Kosoku, BASE_CASES, DEFLATE_GROUPS, SERVER_ARGS, SERVER_RUN_TIMEOUT};
use common::{require_tool, tail, target_dir, Nginx, NGINX};

/// The configuration: a plain listener proxying WebSocket to `upstream` over TLS.
fn conf(dir: &Path, port: u16, upstream: SocketAddr) -> String {
    let d = dir.display();
    format!(
        "daemon off;
master_process off;
worker_processes 1;
pid {d}/nginx.pid;
error_log {d}/error.log info;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    client_body_temp_path {d}/client_body;
    proxy_temp_path {d}/proxy;
    fastcgi_temp_path {d}/fastcgi;
    uwsgi_temp_path {d}/uwsgi;
    scgi_temp_path {d}/scgi;
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass https://{upstream};
            proxy_ssl_protocols TLSv1.3;
            proxy_ssl_verify off;
            proxy_http_version 1.1;
            proxy_set_header Upgrade $http_upgrade;
            proxy_set_header Connection upgrade;
            proxy_set_header Host $host;
            proxy_read_timeout 1h;
            proxy_send_timeout 1h;
        }}
    }}
}}
"
    )
}

/// nginx in a directory of its own per architecture, as the reports (see `autobahn::report_dir`).
fn start_nginx(upstream: SocketAddr) -> Nginx {
    Nginx::start(&format!("autobahn-tls-{}", std::env::consts::ARCH), |dir, port| {
        conf(dir, port, upstream)
    })
}

#[test]
fn autobahn_server_cases_over_tls() {
    if !require_tool("nginx", Path::new(NGINX).is_file()) {
        return;
    }
    let Some(kosoku) = Kosoku::setup() else {
        return;
    };
    let c = certs::make(&target_dir().join(format!("autobahn-tls-certs-{}", std::process::id())));
    let mut args = SERVER_ARGS.to_vec();
    args.extend([
        "--tls-cert",
        c.cert.to_str().unwrap(),
        "--tls-key",
        c.key.to_str().unwrap(),
    ]);
    let mut server = autobahn::spawn_server(&args);
    let nginx = start_nginx(server.addr);
    let outdir = autobahn::report_dir("server-tls");
    let run = kosoku.run_fuzzingclient(DEFLATE_GROUPS, nginx.addr, &outdir, 4, SERVER_RUN_TIMEOUT);
    println!("autobahn server over TLS: kosoku took {:.1?}", run.elapsed);
    let context = |server: &common::ServerProcess| {
        format!(
            "{}\n--- wsloop stderr (tail) ---\n{}\n--- nginx ---\n{}",
            run.describe(),
            tail(&server.stderr(), 16384),
            nginx.log()
        )
    };
    assert!(
        !run.timed_out,
        "kosoku did not finish within {SERVER_RUN_TIMEOUT:?}\n{}",
        context(&server)
    );
    if let Ok(Some(status)) = server.child_mut().try_wait() {
        panic!("the server exited during the run ({status})\n{}", context(&server));
    }
    let results = autobahn::read_results(&kosoku, &outdir, None)
        .unwrap_or_else(|e| panic!("no Autobahn results: {e}\n{}", context(&server)));
    autobahn::assert_conformance("server over TLS", &outdir, &results, BASE_CASES, &context(&server));
    // The cases really crossed TLS: nginx logged no upstream TLS failure.
    assert!(!nginx.log().contains("SSL_do_handshake() failed"), "{}", nginx.log());
}
