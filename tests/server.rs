//! The server against real peers: tungstenite for the happy paths, raw TCP for bad input.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use tungstenite::protocol::frame::coding::CloseCode;
use tungstenite::protocol::CloseFrame;
use tungstenite::Message as TMessage;
use wsloop::proto::frame::{write_frame, FrameHeader, OpCode};

const KEY_REQUEST: &str = "GET /chat HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n";
const MASK: [u8; 4] = [0x11, 0x22, 0x33, 0x44];

fn ws_connect(addr: SocketAddr) -> tungstenite::WebSocket<TcpStream> {
    let stream = TcpStream::connect(addr).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let (ws, resp) = tungstenite::client(format!("ws://{addr}/"), stream).expect("handshake");
    assert_eq!(resp.status(), 101);
    ws
}

/// Sends raw bytes and reads until the server closes (or 5 s pass).
fn raw_exchange(addr: SocketAddr, bytes: &[u8]) -> Vec<u8> {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(bytes).unwrap();
    read_to_close(&mut s)
}

fn read_to_close(s: &mut TcpStream) -> Vec<u8> {
    let mut got = Vec::new();
    let mut buf = [0u8; 65536];
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock || e.kind() == std::io::ErrorKind::TimedOut => break,
            Err(_) => break,
        }
    }
    got
}

fn status_of(response: &[u8]) -> u16 {
    let text = String::from_utf8_lossy(response);
    text.split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status in {text:?}"))
}

fn masked(fin: bool, op: OpCode, payload: &[u8]) -> Vec<u8> {
    let mut v = Vec::new();
    write_frame(&mut v, fin, op, Some(MASK), payload);
    v
}

/// Parses server frames after the 101 head: (opcode, payload) pairs.
fn frames_after_head(bytes: &[u8]) -> Vec<(OpCode, Vec<u8>)> {
    let head_end = bytes.windows(4).position(|w| w == b"\r\n\r\n").expect("no 101 head") + 4;
    assert!(
        bytes.starts_with(b"HTTP/1.1 101"),
        "{:?}",
        String::from_utf8_lossy(bytes)
    );
    let mut rest = &bytes[head_end..];
    let mut out = Vec::new();
    while let Ok(Some((h, n))) = FrameHeader::parse(rest) {
        assert!(h.mask.is_none(), "server frames are never masked");
        let end = n + h.payload_len as usize;
        if rest.len() < end {
            break;
        }
        out.push((h.opcode, rest[n..end].to_vec()));
        rest = &rest[end..];
    }
    out
}

/// The close code of the last frame, which must be a close.
fn close_code_of(frames: &[(OpCode, Vec<u8>)]) -> u16 {
    let (op, payload) = frames.last().expect("no frames");
    assert_eq!(*op, OpCode::Close, "last frame is not a close: {frames:?}");
    u16::from_be_bytes([payload[0], payload[1]])
}

fn upgraded_then(addr: SocketAddr, frames: &[u8]) -> Vec<(OpCode, Vec<u8>)> {
    let mut req = KEY_REQUEST.as_bytes().to_vec();
    req.extend_from_slice(frames);
    frames_after_head(&raw_exchange(addr, &req))
}

fn assert_still_serving(addr: SocketAddr) {
    let mut ws = ws_connect(addr);
    ws.send(TMessage::text("still here")).unwrap();
    assert_eq!(ws.read().unwrap(), TMessage::text("still here"));
    ws.close(None).unwrap();
}

#[test]
fn echoes_text_and_binary_of_every_size() {
    let server = common::spawn_server(&[]);
    let mut ws = ws_connect(server.addr);
    for len in [0usize, 1, 125, 126, 127, 65535, 65536, 65537, 1 << 20, 16 << 20] {
        let data: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
        ws.send(TMessage::binary(data.clone())).unwrap();
        match ws.read().unwrap() {
            TMessage::Binary(b) => assert!(b[..] == data[..], "binary echo of {len} bytes differs"),
            m => panic!("unexpected {m:?}"),
        }
        if len <= 1 << 20 {
            let text: String = (0..len).map(|i| char::from(b'a' + (i % 26) as u8)).collect();
            ws.send(TMessage::text(text.clone())).unwrap();
            assert_eq!(ws.read().unwrap(), TMessage::text(text));
        }
    }
    let utf8 = "κόσμε 𝄞 fine thank you";
    ws.send(TMessage::text(utf8)).unwrap();
    assert_eq!(ws.read().unwrap(), TMessage::text(utf8));
    ws.close(None).unwrap();
}

#[test]
fn message_of_exactly_the_limit_passes_and_one_more_byte_gets_1009() {
    let server = common::spawn_server(&["--max-message", "1000"]);
    let mut ws = ws_connect(server.addr);
    ws.send(TMessage::binary(vec![7u8; 1000])).unwrap();
    assert_eq!(ws.read().unwrap(), TMessage::binary(vec![7u8; 1000]));
    // Fragmented over the limit: 600 + 401.
    let mut frames = masked(false, OpCode::Binary, &[1; 600]);
    frames.extend(masked(true, OpCode::Continuation, &[1; 401]));
    assert_eq!(close_code_of(&upgraded_then(server.addr, &frames)), 1009);
    assert_eq!(
        close_code_of(&upgraded_then(server.addr, &masked(true, OpCode::Text, &[b'a'; 1001]))),
        1009
    );
    assert_still_serving(server.addr);
}

#[test]
fn fragmented_messages_and_interleaved_ping() {
    let server = common::spawn_server(&[]);
    let mut bytes = masked(false, OpCode::Text, "κό".as_bytes());
    bytes.extend(masked(true, OpCode::Ping, b"mid"));
    bytes.extend(masked(false, OpCode::Continuation, &"σμε".as_bytes()[..3])); // cut inside a char
    bytes.extend(masked(true, OpCode::Continuation, &"σμε".as_bytes()[3..]));
    bytes.extend(masked(true, OpCode::Close, &1000u16.to_be_bytes()));
    let frames = upgraded_then(server.addr, &bytes);
    assert_eq!(
        frames,
        vec![
            (OpCode::Pong, b"mid".to_vec()),
            (OpCode::Text, "κόσμε".as_bytes().to_vec()),
            (OpCode::Close, 1000u16.to_be_bytes().to_vec()),
        ]
    );
}

#[test]
fn request_and_frames_split_into_single_bytes() {
    let server = common::spawn_server(&[]);
    let mut s = TcpStream::connect(server.addr).unwrap();
    s.set_nodelay(true).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut all = KEY_REQUEST.as_bytes().to_vec();
    all.extend(masked(true, OpCode::Text, b"slow but fine"));
    all.extend(masked(true, OpCode::Close, &1000u16.to_be_bytes()));
    for b in &all {
        s.write_all(&[*b]).unwrap();
        std::thread::sleep(Duration::from_micros(200));
    }
    let frames = frames_after_head(&read_to_close(&mut s));
    assert_eq!(frames[0], (OpCode::Text, b"slow but fine".to_vec()));
    assert_eq!(close_code_of(&frames), 1000);
}

#[test]
fn ping_pong_and_close_both_ways() {
    let server = common::spawn_server(&[]);
    let mut ws = ws_connect(server.addr);
    ws.send(TMessage::Ping(b"are you there".to_vec().into())).unwrap();
    match ws.read().unwrap() {
        TMessage::Pong(p) => assert_eq!(&p[..], b"are you there"),
        m => panic!("unexpected {m:?}"),
    }
    // Client-initiated close with a code and reason: the server answers with the same code.
    ws.close(Some(CloseFrame {
        code: CloseCode::Library(4000),
        reason: "bye".into(),
    }))
    .unwrap();
    loop {
        match ws.read() {
            Ok(TMessage::Close(Some(f))) => {
                assert_eq!(u16::from(f.code), 4000);
            }
            Ok(m) => panic!("unexpected {m:?}"),
            Err(tungstenite::Error::ConnectionClosed) => break,
            Err(e) => panic!("unclean close: {e}"),
        }
    }
}

#[test]
fn heartbeat_keeps_answering_peers_and_idle_timeout_closes_silent_ones() {
    let server = common::spawn_server(&["--ping-interval", "200ms", "--idle-timeout", "600ms"]);
    // tungstenite answers pings, so it stays connected well past the idle timeout.
    let mut ws = ws_connect(server.addr);
    ws.get_mut().set_read_timeout(Some(Duration::from_millis(100))).unwrap();
    let start = Instant::now();
    let mut pings = 0;
    while start.elapsed() < Duration::from_millis(1500) {
        match ws.read() {
            Ok(TMessage::Ping(_)) => pings += 1,
            Ok(m) => panic!("unexpected {m:?}"),
            Err(tungstenite::Error::Io(e)) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => panic!("answering peer was dropped: {e}"),
        }
    }
    assert!(pings >= 3, "only {pings} heartbeat pings in 1.5 s");
    // A raw peer that never answers gets one ping, then close 1001 after the idle timeout.
    let mut s = TcpStream::connect(server.addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(KEY_REQUEST.as_bytes()).unwrap();
    let start = Instant::now();
    let frames = frames_after_head(&read_to_close(&mut s));
    let waited = start.elapsed();
    assert_eq!(frames[0].0, OpCode::Ping, "{frames:?}");
    assert_eq!(close_code_of(&frames), 1001);
    assert!(waited >= Duration::from_millis(550), "closed too early: {waited:?}");
    assert!(waited < Duration::from_secs(5), "closed too late: {waited:?}");
}

#[test]
fn bad_handshakes_get_their_status() {
    let server = common::spawn_server(&["--origin", "https://good.example"]);
    let good = KEY_REQUEST;
    let cases: Vec<(String, u16)> = vec![
        (good.replace("GET", "POST"), 405),
        (good.replace("HTTP/1.1", "HTTP/1.0"), 505),
        (good.replace("Host: localhost\r\n", ""), 400),
        (good.replace("Upgrade: websocket", "Upgrade: h2c"), 400),
        (good.replace("Connection: Upgrade", "Connection: close"), 400),
        (good.replace("Version: 13", "Version: 8"), 426),
        (good.replace("dGhlIHNhbXBsZSBub25jZQ==", "c2hvcnQ="), 400),
        (good.replace("Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n", ""), 400),
        (
            good.replace("Host:", &format!("X-Big: {}\r\nHost:", "a".repeat(9000))),
            431,
        ),
        (good.replace("Host:", "Origin: https://evil.example\r\nHost:"), 403),
        // An upgrade carries no body: one announced would be frames here, a body to a proxy.
        (good.replace("Host:", "Content-Length: 6\r\nHost:") + "abcdef", 400),
        (
            good.replace("Host:", "Transfer-Encoding: chunked\r\nHost:") + "6\r\nabcdef\r\n",
            400,
        ),
        ("this is not http\r\n\r\n".to_string(), 400),
    ];
    for (req, want) in &cases {
        let resp = raw_exchange(server.addr, req.as_bytes());
        assert_eq!(status_of(&resp), *want, "for request {:?}", &req[..req.len().min(80)]);
        let text = String::from_utf8_lossy(&resp);
        let body = text.split("\r\n\r\n").nth(1).unwrap_or("");
        assert!(!body.trim().is_empty(), "error answers say what was wrong: {text}");
        if *want == 426 {
            assert!(text.contains("Sec-WebSocket-Version: 13\r\n"));
        }
    }
    // The allowed origin and no origin at all both pass.
    let ok = good.replace("Host:", "Origin: https://good.example\r\nHost:");
    assert_eq!(status_of(&raw_exchange(server.addr, ok.as_bytes())), 101);
    let empty_body = good.replace("Host:", "Content-Length: 0\r\nHost:");
    assert_eq!(status_of(&raw_exchange(server.addr, empty_body.as_bytes())), 101);
    // The refusal names the reason.
    let smuggled = good.replace("Host:", "Content-Length: 6\r\nHost:") + "abcdef";
    let text = String::from_utf8(raw_exchange(server.addr, smuggled.as_bytes())).unwrap();
    assert!(
        text.ends_with("a WebSocket upgrade carries no body: Content-Length must be 0\n"),
        "{text}"
    );
    assert_still_serving(server.addr);
}

#[test]
fn bad_frames_get_their_close_code() {
    let server = common::spawn_server(&[]);
    let mut unmasked = Vec::new();
    write_frame(&mut unmasked, true, OpCode::Text, None, b"hi");
    let mut rsv = masked(true, OpCode::Text, b"hi");
    rsv[0] |= 0x40;
    let mut reserved_op = masked(true, OpCode::Text, b"hi");
    reserved_op[0] = 0x83;
    let mut reserved_ctl = masked(true, OpCode::Ping, b"");
    reserved_ctl[0] = 0x8b;
    let mut new_in_frag = masked(false, OpCode::Text, b"a");
    new_in_frag.extend(masked(true, OpCode::Text, b"b"));
    let mut bad_utf8_frag = masked(false, OpCode::Text, b"ok");
    bad_utf8_frag.extend(masked(false, OpCode::Continuation, &[0xf4, 0x90]));
    let cases: Vec<(&str, Vec<u8>, u16)> = vec![
        ("unmasked", unmasked, 1002),
        ("reserved bits", rsv, 1002),
        ("reserved opcode", reserved_op, 1002),
        ("reserved control opcode", reserved_ctl, 1002),
        ("fragmented ping", masked(false, OpCode::Ping, b"x"), 1002),
        ("long ping", masked(true, OpCode::Ping, &[0; 126]), 1002),
        ("continuation first", masked(true, OpCode::Continuation, b"x"), 1002),
        ("new message in fragmented", new_in_frag, 1002),
        ("invalid utf-8", masked(true, OpCode::Text, &[b'a', 0xff]), 1007),
        ("invalid utf-8 in fragment", bad_utf8_frag, 1007),
        (
            "close code 1005",
            masked(true, OpCode::Close, &1005u16.to_be_bytes()),
            1002,
        ),
        (
            "close code 999",
            masked(true, OpCode::Close, &999u16.to_be_bytes()),
            1002,
        ),
        ("close with 1 byte", masked(true, OpCode::Close, &[3]), 1002),
        (
            "close reason not utf-8",
            masked(true, OpCode::Close, &[3, 232, 0xff]),
            1007,
        ),
    ];
    for (name, bytes, code) in cases {
        let frames = upgraded_then(server.addr, &bytes);
        assert_eq!(close_code_of(&frames), code, "{name}");
    }
    // An echo queued before the error still goes out before the close.
    let mut bytes = masked(true, OpCode::Text, b"first");
    bytes.extend(masked(true, OpCode::Text, &[0xff]));
    let frames = upgraded_then(server.addr, &bytes);
    assert_eq!(frames[0], (OpCode::Text, b"first".to_vec()));
    assert_eq!(close_code_of(&frames), 1007);
    assert_still_serving(server.addr);
}

#[test]
fn over_max_connections_gets_503() {
    let server = common::spawn_server(&["--max-connections", "2"]);
    let a = ws_connect(server.addr);
    let b = ws_connect(server.addr);
    let resp = raw_exchange(server.addr, KEY_REQUEST.as_bytes());
    assert_eq!(status_of(&resp), 503);
    drop((a, b));
    // Slots free up once those peers are gone.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let resp = raw_exchange(server.addr, KEY_REQUEST.as_bytes());
        if status_of(&resp) == 101 {
            break;
        }
        assert!(Instant::now() < deadline, "slots never freed");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn handshake_timeout_closes_slow_clients() {
    let server = common::spawn_server(&["--handshake-timeout", "300ms"]);
    let mut s = TcpStream::connect(server.addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n").unwrap(); // never finished
    let start = Instant::now();
    let got = read_to_close(&mut s);
    let waited = start.elapsed();
    assert!(got.is_empty() || status_of(&got) == 408, "{got:?}");
    assert!(
        waited >= Duration::from_millis(250) && waited < Duration::from_secs(3),
        "closed after {waited:?}"
    );
    assert_still_serving(server.addr);
}

fn vm_rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

#[test]
fn a_peer_that_never_reads_cannot_grow_the_server() {
    let server = common::spawn_server(&["--max-backpressure", "256KiB"]);
    let before = vm_rss_kib(server.pid());
    let mut s = TcpStream::connect(server.addr).unwrap();
    s.write_all(KEY_REQUEST.as_bytes()).unwrap();
    s.set_write_timeout(Some(Duration::from_millis(500))).unwrap();
    // Send up to 64 MiB of 64 KiB messages without reading a byte. The server must stop reading
    // (so our writes block) long before it has buffered all of that.
    let frame = masked(true, OpCode::Binary, &[5u8; 65536]);
    let mut sent = 0usize; // bytes of the stream written, in whole and partial frames
    while sent < 64 << 20 {
        match s.write(&frame[sent % frame.len()..]) {
            Ok(n) => sent += n,
            Err(_) => break,
        }
    }
    assert!(sent < 64 << 20, "the server kept reading while its replies piled up");
    let grown = vm_rss_kib(server.pid()).saturating_sub(before);
    assert!(grown < 16 * 1024, "server RSS grew by {grown} KiB");
    // Reading now drains everything, and the connection still works.
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut buf = vec![0u8; 1 << 20];
    let mut got = 0usize;
    let want = sent / frame.len() * (65536 + 4); // every whole frame comes back (header 4 bytes)
    let mut end = None;
    while got < want {
        match s.read(&mut buf) {
            Ok(0) => {
                end = Some("end of stream".to_string());
                break;
            }
            Err(e) => {
                end = Some(e.to_string());
                break;
            }
            Ok(n) => got += n,
        }
    }
    assert!(
        got >= want,
        "got {got} of {want} echoed bytes ({end:?}); server log:\n{}",
        server.stderr()
    );
}

#[test]
fn sigterm_closes_peers_with_1001_and_exits_0() {
    let mut server = common::spawn_server(&[]);
    let mut ws = ws_connect(server.addr);
    ws.send(TMessage::text("hello")).unwrap();
    assert_eq!(ws.read().unwrap(), TMessage::text("hello"));
    let pid = server.pid();
    assert!(std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .unwrap()
        .success());
    let code = match ws.read() {
        Ok(TMessage::Close(Some(f))) => u16::from(f.code),
        Ok(m) => panic!("unexpected {m:?}"),
        Err(e) => panic!("no close frame: {e}"),
    };
    assert_eq!(code, 1001);
    // Answer the close; the server then exits on its own.
    let _ = ws.flush();
    let deadline = Instant::now() + Duration::from_secs(5);
    let status = loop {
        if let Some(st) = server.child_mut().try_wait().unwrap() {
            break st;
        }
        assert!(Instant::now() < deadline, "server did not exit after SIGTERM");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "exit status {status}");
    // The stderr reader thread may lag the exit by a moment.
    assert!(
        server.wait_for_stderr("shutdown complete", Duration::from_secs(2)),
        "{}",
        server.stderr()
    );
}

#[test]
fn bad_flags_and_busy_port_give_one_line_errors() {
    let bin = env!("CARGO_BIN_EXE_wsloop");
    let out = std::process::Command::new(bin)
        .args(["serve", "--mode", "nonsense"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(err.contains("--mode"), "{err}");
    let out = std::process::Command::new(bin)
        .args(["serve", "--idle-timeout", "soon"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("invalid duration"));
    let server = common::spawn_server(&[]);
    let out = std::process::Command::new(bin)
        .args(["serve", "--listen", &server.addr.to_string()])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("cannot listen on"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
}

fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the command name (which may hold spaces) start after the last ')'.
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap() // utime + stime
}

#[test]
fn out_of_descriptors_pauses_accepting_without_spinning() {
    let server = common::spawn_server(&[]);
    let pid = server.pid().to_string();
    // Lower the running server's descriptor limit far below its connection limit.
    let lowered = std::process::Command::new("prlimit")
        .args(["--pid", &pid, "--nofile=32:32"])
        .status();
    if !common::require_tool("prlimit (util-linux)", lowered.is_ok()) {
        return;
    }
    assert!(lowered.unwrap().success());
    let mut held = Vec::new();
    for _ in 0..40 {
        let mut s = TcpStream::connect(server.addr).unwrap(); // the kernel's backlog takes them all
        s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        s.write_all(KEY_REQUEST.as_bytes()).unwrap();
        held.push(s);
    }
    std::thread::sleep(Duration::from_millis(300));
    let before = cpu_ticks(server.pid());
    std::thread::sleep(Duration::from_secs(1));
    let spent = cpu_ticks(server.pid()) - before;
    assert!(
        spent < 20,
        "server burned {spent} ticks in 1 s while out of descriptors"
    );
    let log = server.stderr();
    assert_eq!(log.matches("accept failed").count(), 1, "{log}");
    // Connections it did accept keep working...
    let mut head = [0u8; 129];
    held[0].read_exact(&mut head).unwrap();
    assert!(head.starts_with(b"HTTP/1.1 101"));
    held[0].write_all(&masked(true, OpCode::Text, b"ok")).unwrap();
    let mut echo = [0u8; 4];
    held[0].read_exact(&mut echo).unwrap();
    assert_eq!(&echo, b"\x81\x02ok");
    // ...the ones that found no descriptor were told so (or closed), not left waiting...
    let last = held.last_mut().unwrap();
    let mut got = Vec::new();
    // (Within its 2 s read timeout: the end of the stream, or a reset, is an answer too.)
    let ended = match last.read_to_end(&mut got) {
        Ok(_) => true,
        Err(e) => e.kind() == std::io::ErrorKind::ConnectionReset,
    };
    assert!(
        ended && (got.is_empty() || got.starts_with(b"HTTP/1.1 503")),
        "the last connection: {:?}",
        String::from_utf8_lossy(&got)
    );
    // ...and once descriptors free up, new clients are served.
    held.drain(..20);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let resp = raw_exchange(server.addr, KEY_REQUEST.as_bytes());
        if resp.starts_with(b"HTTP/1.1 101") {
            break;
        }
        assert!(Instant::now() < deadline, "not served after descriptors freed up");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A handler that tries to talk to a peer from inside that peer's `on_close`.
struct ChattyOnClose;

impl wsloop::Handler for ChattyOnClose {
    type State = ();
    fn on_upgrade(
        &mut self,
        _: &mut wsloop::Ctx<'_, ()>,
        _: &mut wsloop::server::Upgrade<'_>,
    ) -> Result<(), wsloop::proto::Answer> {
        Ok(())
    }
    fn on_message(&mut self, ctx: &mut wsloop::Ctx<'_, ()>, conn: &mut wsloop::Conn<()>, msg: wsloop::Message<'_>) {
        ctx.send(conn.id(), msg).unwrap();
    }
    fn on_close(&mut self, ctx: &mut wsloop::Ctx<'_, ()>, conn: &mut wsloop::Conn<()>, _code: u16, _reason: &str) {
        assert!(
            ctx.send_text(conn.id(), "too late") == Err(wsloop::proto::NotOpen),
            "send after close must be refused"
        );
        ctx.broadcast(wsloop::Message::Text("bye"), None);
    }
}

#[test]
fn nothing_follows_the_close_reply() {
    let server = wsloop::Server::bind("127.0.0.1:0", wsloop::ServerConfig::default()).unwrap();
    let addr = server.local_addr();
    let handle = server.handle();
    let thread = std::thread::spawn(move || server.run(ChattyOnClose));
    let mut bytes = masked(true, OpCode::Text, b"hi");
    bytes.extend(masked(true, OpCode::Close, &1000u16.to_be_bytes()));
    let frames = upgraded_then(addr, &bytes);
    assert_eq!(
        frames,
        vec![
            (OpCode::Text, b"hi".to_vec()),
            (OpCode::Close, 1000u16.to_be_bytes().to_vec())
        ]
    );
    handle.shutdown().unwrap();
    thread.join().unwrap().unwrap();
}

/// Shuts the server down from inside a message callback.
struct StopOnMessage;

impl wsloop::Handler for StopOnMessage {
    type State = ();
    fn on_upgrade(
        &mut self,
        _: &mut wsloop::Ctx<'_, ()>,
        _: &mut wsloop::server::Upgrade<'_>,
    ) -> Result<(), wsloop::proto::Answer> {
        Ok(())
    }
    fn on_message(&mut self, ctx: &mut wsloop::Ctx<'_, ()>, conn: &mut wsloop::Conn<()>, msg: wsloop::Message<'_>) {
        ctx.send(conn.id(), msg).unwrap();
        ctx.shutdown();
    }
}

#[test]
fn shutdown_from_inside_a_handler_closes_that_peer_with_1001() {
    let server = wsloop::Server::bind("127.0.0.1:0", wsloop::ServerConfig::default()).unwrap();
    let addr = server.local_addr();
    let thread = std::thread::spawn(move || server.run(StopOnMessage));
    let mut ws = ws_connect(addr);
    ws.send(TMessage::text("stop")).unwrap();
    assert_eq!(ws.read().unwrap(), TMessage::text("stop"));
    match ws.read() {
        Ok(TMessage::Close(Some(f))) => assert_eq!(u16::from(f.code), 1001),
        other => panic!("expected close 1001, got {other:?}"),
    }
    let _ = ws.flush();
    drop(ws);
    thread.join().unwrap().unwrap();
}

/// Sends one compressed binary message on a connection that agreed on permessage-deflate, and
/// returns the close code the server answers with.
fn send_compressed(addr: SocketAddr, compressed: &[u8]) -> u16 {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let offer = KEY_REQUEST.replace(
        "\r\n\r\n",
        "\r\nSec-WebSocket-Extensions: permessage-deflate; client_no_context_takeover\r\n\r\n",
    );
    let mut data = offer.into_bytes();
    let mut frame = Vec::new();
    write_frame(&mut frame, true, OpCode::Binary, Some(MASK), compressed);
    frame[0] |= 0x40; // RSV1: compressed
    data.extend_from_slice(&frame);
    s.write_all(&data).unwrap();
    let got = read_to_close(&mut s);
    let text = String::from_utf8_lossy(&got);
    assert!(text.contains("permessage-deflate"), "compression not agreed: {text}");
    close_code_of(&frames_after_head(&got))
}

#[test]
fn the_memory_of_every_deflate_bomb_is_given_back() {
    // 64 MiB of zeros in about 64 KB: inflating stops at --max-message (16 MiB) with 1009. glibc
    // returned the first bomb's buffer by itself but kept the second's in its heap (the first
    // one raised its threshold for giving large blocks back).
    let server = common::spawn_server(&[]);
    let mut bomb = Vec::new();
    wsloop::proto::deflate::Compressor::new(9).compress(&vec![0u8; 64 << 20], 15, &mut bomb);
    // A compressed message makes the loop's decompressor (a cut one is refused with 1007):
    // what the server holds after it is the baseline.
    assert_eq!(send_compressed(server.addr, &bomb[..100]), 1007);
    let base = vm_rss_kib(server.pid());
    for round in 1..=3 {
        assert_eq!(send_compressed(server.addr, &bomb), 1009, "bomb {round}");
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut rss = vm_rss_kib(server.pid());
        while rss > base + 4096 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
            rss = vm_rss_kib(server.pid());
        }
        eprintln!("after bomb {round}: RSS {rss} KiB (baseline {base} KiB)");
        assert!(
            rss <= base + 4096,
            "after bomb {round}: RSS {rss} KiB, baseline {base} KiB"
        );
    }
    assert_still_serving(server.addr);
}

#[test]
fn a_slow_consumer_is_logged_with_the_close_code_it_was_sent() {
    // The slow peer never reads (a 4 KiB receive buffer), is closed with 1008, and goes away
    // without answering: the log says 1008, not only the 1006 of a vanished peer.
    const SIZE: usize = 64 << 10;
    let server = common::spawn_server(&["--mode", "broadcast", "--log", "debug"]);
    let slow = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    slow.set_recv_buffer_size(4096).unwrap();
    slow.connect(&server.addr.into()).unwrap();
    let mut slow: TcpStream = slow.into();
    slow.write_all(KEY_REQUEST.as_bytes()).unwrap();
    let slow_port = slow.local_addr().unwrap().port();
    assert!(server.wait_for_stderr(&format!(":{slow_port} connected"), Duration::from_secs(5)));
    let mut sender = TcpStream::connect(server.addr).unwrap();
    sender.write_all(KEY_REQUEST.as_bytes()).unwrap();
    // The sender reads its own copies on another thread, so that only the slow peer lags.
    let mut reader = sender.try_clone().unwrap();
    reader.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let drain = std::thread::spawn(move || {
        let mut buf = vec![0u8; 1 << 16];
        while matches!(reader.read(&mut buf), Ok(n) if n > 0) {}
    });
    let deadline = Instant::now() + Duration::from_secs(20);
    while !server.stderr().contains("slow consumer, closing") {
        assert!(Instant::now() < deadline, "never closed: {}", server.stderr());
        sender.write_all(&masked(true, OpCode::Binary, &[7u8; SIZE])).unwrap();
    }
    // It goes away without its close frame (unread bytes make that a reset).
    drop(slow);
    let line = format!(":{slow_port} disconnected (");
    assert!(
        server.wait_for_stderr(&line, Duration::from_secs(10)),
        "{}",
        server.stderr()
    );
    let log = server.stderr();
    let at = log.find(&line).unwrap() + line.len();
    let said = log[at..].split(')').next().unwrap();
    assert_eq!(said, "1008 sent, no close frame back", "{log}");
    drop(sender);
    drain.join().unwrap();
}
