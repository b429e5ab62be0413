//! permessage-deflate in the protocol core, through the public API: negotiation in the
//! handshake of both roles, RSV1 rules, compressed messages whole and cut anywhere, the bounds
//! on inflating, and a client whose server keeps its compression context.

mod common;

use flate2::{Compress, Compression, FlushCompress};
use wsloop::proto::deflate::{Codec, DeflateConfig, CLIENT_OFFER};
use wsloop::proto::frame::{write_compressed_frame, write_frame, FrameHeader, OpCode};
use wsloop::proto::handshake::{ClientRequest, ResponseError};
use wsloop::proto::rand::NoRandom;
use wsloop::proto::{Answer, Connection, Error, Event, Message, State};

use common::events::{cfg, rng, Ev};

const KEY: [u8; 4] = [0x37, 0xfa, 0x21, 0x3d];

/// "Hello" compressed as in RFC 7692 §7.2.3.1.
const HELLO: [u8; 7] = [0xf2, 0x48, 0xcd, 0xc9, 0xc9, 0x07, 0x00];

/// A server connection that answered `offer` (none: no extension header) with `config`;
/// returns the connection and the answer's `Sec-WebSocket-Extensions`, if any.
fn server_with(offer: Option<&str>, config: &DeflateConfig) -> (Connection, Option<String>) {
    let mut req = ClientRequest::new("h", "/");
    req.extensions = offer.map(String::from);
    let mut bytes = Vec::new();
    let _client = Connection::client(&req, 0, &mut rng(), &mut bytes);
    let mut server = Connection::server(0);
    let mut out = Vec::new();
    let (_, ev) = server
        .read(&cfg(1 << 20), 0, &mut bytes, &mut NoRandom, &mut out)
        .unwrap();
    let Some(Event::Request(r)) = ev else {
        panic!("no request")
    };
    assert!(server.accept_deflate(&r, &Answer::accept(), config, 0, &mut out));
    let head = String::from_utf8(out).unwrap();
    let ext = head
        .lines()
        .find_map(|l| l.strip_prefix("Sec-WebSocket-Extensions: "))
        .map(String::from);
    (server, ext)
}

fn deflate_server() -> Connection {
    let (s, ext) = server_with(Some(CLIENT_OFFER), &DeflateConfig::default());
    assert!(ext.is_some());
    s
}

/// A masked client frame with RSV1 when `rsv1`.
fn cf(fin: bool, rsv1: bool, opcode: OpCode, payload: &[u8]) -> Vec<u8> {
    let mut v = Vec::new();
    write_frame(&mut v, fin, opcode, Some(KEY), payload);
    if rsv1 {
        v[0] |= 0x40;
    }
    v
}

/// Raw deflate of `payload` ending in a sync flush, tail removed (RFC 7692 §7.2.1).
fn deflate(payload: &[u8], level: u32) -> Vec<u8> {
    let mut z = Compress::new(Compression::new(level), false);
    sync_flush(&mut z, payload)
}

fn sync_flush(z: &mut Compress, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(payload.len() + 64);
    let start = z.total_in();
    loop {
        out.reserve(1024);
        let done = (z.total_in() - start) as usize;
        z.compress_vec(&payload[done..], &mut out, FlushCompress::Sync).unwrap();
        if (z.total_in() - start) as usize == payload.len() && out.len() < out.capacity() {
            break;
        }
    }
    assert!(out.ends_with(&[0, 0, 0xff, 0xff]));
    out.truncate(out.len() - 4);
    out
}

/// Feeds `bytes` in pieces of `step` bytes with `codec`, collecting events until an error.
fn feed(conn: &mut Connection, codec: &mut Codec, bytes: &[u8], step: usize, max: usize) -> Result<Vec<Ev>, Error> {
    let mut events = Vec::new();
    let mut out = Vec::new();
    for piece in bytes.chunks(step.max(1)) {
        let mut data = piece.to_vec();
        let mut pos = 0;
        while pos < data.len() {
            let (used, ev) = conn.read_with(&cfg(max), 0, &mut data[pos..], codec, &mut rng(), &mut out)?;
            pos += used;
            if let Some(ev) = ev {
                events.push(Ev::from(ev));
            }
        }
    }
    Ok(events)
}

fn text_of(n: usize) -> String {
    let words = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta"];
    let mut s = String::new();
    let mut x = 7u32;
    while s.len() < n {
        x = x.wrapping_mul(1_103_515_245).wrapping_add(12_345);
        s.push_str(words[(x >> 16) as usize % words.len()]);
        s.push(' ');
    }
    s.truncate(n);
    s
}

#[test]
fn the_server_declines_context_takeover_and_records_the_agreement() {
    let (conn, ext) = server_with(
        Some("permessage-deflate; client_max_window_bits"),
        &DeflateConfig::default(),
    );
    assert_eq!(
        ext.as_deref(),
        Some("permessage-deflate; server_no_context_takeover; client_no_context_takeover")
    );
    let a = conn.deflate().expect("agreed");
    assert_eq!(
        (a.send_window_bits, a.recv_window_bits, a.recv_context_takeover),
        (15, 15, false)
    );
    assert!(!conn.is_buffering(), "nothing is allocated for compression");
    // A browser's offer with a smaller server window.
    let (conn, ext) = server_with(
        Some("permessage-deflate; server_max_window_bits=10"),
        &DeflateConfig::default(),
    );
    assert!(ext.unwrap().ends_with("; server_max_window_bits=10"));
    assert_eq!(conn.deflate().unwrap().send_window_bits, 10);
    // No offer, an unknown extension, or compression turned off: no header, nothing agreed.
    for (offer, config) in [
        (None, DeflateConfig::default()),
        (Some("x-webkit-deflate-frame"), DeflateConfig::default()),
        (Some(CLIENT_OFFER), DeflateConfig::disabled()),
    ] {
        let (conn, ext) = server_with(offer, &config);
        assert_eq!((ext, conn.deflate()), (None, None), "{offer:?}");
    }
}

#[test]
fn a_compressed_message_whole_or_cut_anywhere() {
    // RFC 7692 §7.2.3.1 and §7.2.3.2: one frame, then the same split into two frames.
    let mut one = cf(true, true, OpCode::Text, &HELLO);
    let mut two = cf(false, true, OpCode::Text, &HELLO[..3]);
    two.extend(cf(true, false, OpCode::Continuation, &HELLO[3..]));
    let payload = text_of(5000);
    let z = deflate(payload.as_bytes(), 6);
    assert!(z.len() < payload.len() / 2);
    let mut big = cf(false, true, OpCode::Text, &z[..100]);
    big.extend(cf(false, false, OpCode::Continuation, &z[100..101]));
    big.extend(cf(true, false, OpCode::Continuation, &z[101..]));
    for (bytes, want) in [(&one, "Hello"), (&two, "Hello"), (&big, payload.as_str())] {
        for step in [bytes.len(), 1, 2, 7, 64] {
            let mut conn = deflate_server();
            let mut codec = Codec::default();
            let events = feed(&mut conn, &mut codec, bytes, step, 1 << 20).unwrap();
            assert_eq!(events, [Ev::Text(want.to_string())], "step {step}");
            assert!(!conn.is_buffering(), "the compressed copy is freed (step {step})");
            assert_eq!(conn.buffered_bytes(), 0);
        }
    }
    // Without the loop's codec the message is inflated all the same.
    let mut conn = deflate_server();
    let mut out = Vec::new();
    let (_, ev) = conn.read(&cfg(1 << 20), 0, &mut one, &mut rng(), &mut out).unwrap();
    assert_eq!(ev.map(Ev::from), Some(Ev::Text("Hello".into())));
    // While a compressed message is assembled, its compressed bytes are what the connection holds.
    let mut conn = deflate_server();
    let mut codec = Codec::default();
    feed(&mut conn, &mut codec, &big[..big.len() - 10], 1 << 20, 1 << 20).unwrap();
    assert!(conn.is_buffering());
    assert!(
        conn.buffered_bytes() >= z.len() - 20 && conn.buffered_bytes() < payload.len(),
        "{}",
        conn.buffered_bytes()
    );
}

#[test]
fn rsv1_only_where_compression_allows_it() {
    let cases: [(&str, Vec<u8>); 4] = [
        ("on a continuation frame", {
            let mut v = cf(false, true, OpCode::Text, &HELLO[..3]);
            v.extend(cf(true, true, OpCode::Continuation, &HELLO[3..]));
            v
        }),
        ("on a ping", cf(true, true, OpCode::Ping, b"")),
        ("on a close", cf(true, true, OpCode::Close, &[3, 232])),
        ("with RSV2 too", {
            let mut v = cf(true, true, OpCode::Text, &HELLO);
            v[0] |= 0x20;
            v
        }),
    ];
    for (what, bytes) in cases {
        let mut conn = deflate_server();
        let e = feed(&mut conn, &mut Codec::default(), &bytes, 1 << 20, 1 << 20).unwrap_err();
        assert!(matches!(e, Error::Protocol(p) if p.code() == 1002), "{what}: {e:?}");
        assert_eq!(conn.state(), State::Closed);
    }
    // Not negotiated: RSV1 is a reserved bit.
    let (mut conn, _) = server_with(None, &DeflateConfig::default());
    let e = feed(
        &mut conn,
        &mut Codec::default(),
        &cf(true, true, OpCode::Text, &HELLO),
        64,
        1 << 20,
    )
    .unwrap_err();
    assert!(matches!(e, Error::Protocol(p) if p.code() == 1002), "{e:?}");
    // Uncompressed messages stay allowed on a connection that agreed.
    let mut conn = deflate_server();
    let events = feed(
        &mut conn,
        &mut Codec::default(),
        &cf(true, false, OpCode::Binary, b"raw"),
        64,
        1 << 20,
    )
    .unwrap();
    assert_eq!(events, [Ev::Binary(b"raw".to_vec())]);
}

#[test]
fn inflating_stops_at_the_message_limit() {
    // 16 MiB of zeros deflate to about 16 KB: a bomb for a 1 MiB limit, whole or in pieces.
    let bomb = deflate(&vec![0u8; 16 << 20], 9);
    assert!(bomb.len() < 64 << 10, "{}", bomb.len());
    let whole = cf(true, true, OpCode::Binary, &bomb);
    let mut cut = cf(false, true, OpCode::Binary, &bomb[..1000]);
    cut.extend(cf(true, false, OpCode::Continuation, &bomb[1000..]));
    for bytes in [&whole, &cut] {
        let mut conn = deflate_server();
        let e = feed(&mut conn, &mut Codec::default(), bytes, 4096, 1 << 20).unwrap_err();
        assert!(matches!(e, Error::Protocol(p) if p.code() == 1009), "{e:?}");
        assert_eq!((conn.state(), conn.buffered_bytes()), (State::Closed, 0));
    }
    // Exactly the limit passes.
    let exact = cf(true, true, OpCode::Binary, &deflate(&vec![7u8; 1 << 20], 6));
    let events = feed(&mut deflate_server(), &mut Codec::default(), &exact, 1 << 20, 1 << 20).unwrap();
    assert_eq!(events, [Ev::Binary(vec![7u8; 1 << 20])]);
    // Compressed bytes are bounded too: a compressed frame far past the limit is refused at its header.
    let mut conn = deflate_server();
    let huge = cf(true, true, OpCode::Binary, &vec![0u8; 3000]);
    let e = feed(&mut conn, &mut Codec::default(), &huge, 1 << 20, 1000).unwrap_err();
    assert!(matches!(e, Error::Protocol(p) if p.code() == 1009), "{e:?}");
}

#[test]
fn broken_compressed_data_and_text() {
    let mut bad_utf8 = deflate(&[b'a', 0xff, b'b'], 6);
    let cases = [
        ("not deflate", cf(true, true, OpCode::Binary, &[0xff; 20]), 1007),
        (
            "invalid UTF-8 once inflated",
            cf(true, true, OpCode::Text, &bad_utf8),
            1007,
        ),
    ];
    for (what, bytes, code) in cases {
        let mut conn = deflate_server();
        let e = feed(&mut conn, &mut Codec::default(), &bytes, 1 << 20, 1 << 20).unwrap_err();
        assert!(matches!(e, Error::Protocol(p) if p.code() == code), "{what}: {e:?}");
    }
    // The same bytes as binary are fine.
    bad_utf8 = cf(true, true, OpCode::Binary, &bad_utf8);
    let events = feed(&mut deflate_server(), &mut Codec::default(), &bad_utf8, 3, 1 << 20).unwrap();
    assert_eq!(events, [Ev::Binary(vec![b'a', 0xff, b'b'])]);
}

#[test]
fn send_compresses_when_it_pays_and_a_client_reads_it() {
    let mut server = deflate_server();
    let mut codec = Codec::default();
    let mut out = Vec::new();
    let long = text_of(2000);
    server
        .send_with(Message::Text(&long), &mut codec, &mut NoRandom, &mut out)
        .unwrap();
    let (h, n) = FrameHeader::parse(&out).unwrap().unwrap();
    assert!(h.rsv1 && h.fin && h.opcode == OpCode::Text);
    assert!((h.payload_len as usize) < long.len() / 2, "{}", h.payload_len);
    assert_eq!(out.len(), n + h.payload_len as usize);
    // Below the threshold, or incompressible: sent as it is.
    for payload in [
        b"short message".to_vec(),
        (0..200u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
            .collect(),
    ] {
        let mut o = Vec::new();
        server
            .send_with(Message::Binary(&payload), &mut codec, &mut NoRandom, &mut o)
            .unwrap();
        let (h, n) = FrameHeader::parse(&o).unwrap().unwrap();
        assert!(!h.rsv1);
        assert_eq!(&o[n..], &payload[..]);
    }
    assert_eq!(codec.stats().not_smaller, 1);
    // A client that agreed reads it back.
    let mut client = Connection::open(wsloop::proto::Role::Client, 0);
    let e = feed(&mut client, &mut Codec::default(), &out, 1 << 20, 1 << 20).unwrap_err();
    assert!(matches!(e, Error::Protocol(p) if p.code() == 1002), "not agreed: {e:?}");
}

/// A client that offered [`CLIENT_OFFER`] and read `answer`'s extension header.
fn client_with(answer_ext: Option<&str>) -> Result<Connection, Error> {
    let mut req = ClientRequest::new("h", "/");
    req.extensions = Some(CLIENT_OFFER.into());
    let mut to_server = Vec::new();
    let mut client = Connection::client(&req, 0, &mut rng(), &mut to_server);
    let text = String::from_utf8(to_server).unwrap();
    assert!(text.contains(&format!("Sec-WebSocket-Extensions: {CLIENT_OFFER}\r\n")));
    let key = text
        .lines()
        .find_map(|l| l.strip_prefix("Sec-WebSocket-Key: "))
        .unwrap()
        .to_string();
    let accept = wsloop::proto::handshake::accept_key(key.as_bytes());
    let mut answer = format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {accept}\r\n"
    );
    if let Some(e) = answer_ext {
        answer.push_str(&format!("Sec-WebSocket-Extensions: {e}\r\n"));
    }
    answer.push_str("\r\n");
    let mut bytes = answer.into_bytes();
    let mut out = Vec::new();
    let (_, ev) = client.read(&cfg(1 << 20), 0, &mut bytes, &mut rng(), &mut out)?;
    assert!(matches!(ev, Some(Event::Open(_))));
    Ok(client)
}

#[test]
fn the_client_takes_every_valid_answer_and_fails_on_an_invalid_one() {
    for (answer, send, recv, takeover) in [
        (None, 0, 0, false),
        (Some("permessage-deflate"), 15, 15, true),
        (Some("permessage-deflate; server_no_context_takeover"), 15, 15, false),
        (Some("permessage-deflate; client_max_window_bits=9"), 9, 15, true),
        (
            Some("permessage-deflate; client_no_context_takeover; server_max_window_bits=10"),
            15,
            10,
            true,
        ),
        (Some("permessage-deflate; client_max_window_bits=8"), 8, 15, true),
    ] {
        let client = client_with(answer).unwrap();
        let got = client
            .deflate()
            .map(|a| (a.send_window_bits, a.recv_window_bits, a.recv_context_takeover));
        let want = answer.map(|_| (send, recv, takeover));
        assert_eq!(got, want, "{answer:?}");
    }
    for answer in [
        "permessage-deflate; foo",
        "permessage-deflate; server_max_window_bits=16",
        "permessage-deflate, permessage-deflate",
        "x-other",
        "permessage-deflate; client_max_window_bits",
    ] {
        match client_with(Some(answer)) {
            Err(Error::Response(e)) => assert!(matches!(*e, ResponseError::Invalid(_)), "{answer}: {e:?}"),
            other => panic!("{answer}: {other:?}"),
        }
    }
}

#[test]
fn a_client_keeps_the_window_of_a_server_that_keeps_its_context() {
    // The server compresses three messages with one stream: later ones refer to earlier ones.
    let mut z = Compress::new(Compression::new(6), false);
    let first = text_of(3000);
    let second = format!("{first} and again");
    let third = "x".repeat(100);
    let mut bytes = Vec::new();
    let mut wire = 0;
    for m in [&first, &second, &third] {
        let c = sync_flush(&mut z, m.as_bytes());
        wire += c.len();
        write_compressed_frame(&mut bytes, OpCode::Text, None, &c);
    }
    assert!(
        wire < first.len() / 2,
        "the second message is mostly a reference to the first"
    );
    for step in [bytes.len(), 1, 100] {
        let mut client = client_with(Some("permessage-deflate")).unwrap();
        let mut codec = Codec::default();
        let events = feed(&mut client, &mut codec, &bytes, step, 1 << 20).unwrap();
        assert_eq!(
            events,
            [
                Ev::Text(first.clone()),
                Ev::Text(second.clone()),
                Ev::Text(third.clone())
            ],
            "step {step}"
        );
        // The window is this connection's memory now: at most 32 KiB, here what it received.
        let held = client.buffered_bytes();
        assert!(held >= first.len() + second.len() && held < 40 << 10, "{held}");
    }
    // A client whose server drops its context holds nothing between messages.
    let mut client = client_with(Some("permessage-deflate; server_no_context_takeover")).unwrap();
    let events = feed(
        &mut client,
        &mut Codec::default(),
        &{
            let mut b = Vec::new();
            write_compressed_frame(&mut b, OpCode::Text, None, &HELLO);
            b
        },
        3,
        1 << 20,
    )
    .unwrap();
    assert_eq!(events, [Ev::Text("Hello".into())]);
    assert_eq!(client.buffered_bytes(), 0);
}

#[test]
fn an_idle_connection_costs_the_same_with_compression_agreed() {
    let w = std::mem::size_of::<usize>();
    assert!(std::mem::size_of::<Connection>() <= 8 + w);
    let conn = deflate_server();
    assert!(conn.deflate().is_some());
    assert_eq!(conn.buffered_bytes(), 0);
    assert!(!conn.is_buffering());
}
