//! Codec micro-benchmarks: frame header parsing, unmasking, UTF-8 validation, the handshake.
//!
//! `cargo bench --bench micro` (add `-- --quick` for a fast pass, or a name filter such as
//! `unmask`).

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use wsloop::proto::frame::{write_frame, FrameHeader, OpCode};
use wsloop::proto::handshake::{accept_key, parse_request};
use wsloop::proto::mask::apply_mask;
use wsloop::proto::rand::NoRandom;
use wsloop::proto::utf8::Utf8Validator;
use wsloop::proto::{Connection, Event, Role};

const REQUEST: &[u8] = b"GET /chat HTTP/1.1\r\nHost: server.example.com\r\nUpgrade: websocket\r\n\
Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nOrigin: http://example.com\r\n\
Sec-WebSocket-Version: 13\r\nUser-Agent: Mozilla/5.0 (X11; Linux x86_64) wsloop-bench\r\n\r\n";

fn frame_header(c: &mut Criterion) {
    let mut g = c.benchmark_group("frame_header_parse");
    let mask = Some([1, 2, 3, 4]);
    for (name, masked, len) in [
        ("server_16B", None, 16usize),
        ("client_16B", mask, 16),
        ("client_1KiB", mask, 1024),
        ("client_64KiB", mask, 65536),
    ] {
        let mut buf = Vec::new();
        write_frame(&mut buf, true, OpCode::Binary, masked, &vec![0u8; len]);
        g.bench_function(name, |b| b.iter(|| FrameHeader::parse(black_box(&buf))));
    }
    g.finish();
}

fn unmask(c: &mut Criterion) {
    let mut g = c.benchmark_group("unmask");
    for len in [16usize, 1024, 65536] {
        let mut buf: Vec<u8> = (0..len).map(|i| i as u8).collect();
        g.throughput(Throughput::Bytes(len as u64));
        g.bench_with_input(BenchmarkId::from_parameter(len), &len, |b, _| {
            b.iter(|| apply_mask(black_box(&mut buf), [0x37, 0xfa, 0x21, 0x3d], 0))
        });
    }
    g.finish();
}

fn utf8(c: &mut Criterion) {
    let mut g = c.benchmark_group("utf8_validate");
    let ascii: Vec<u8> = b"The quick brown fox jumps over the lazy dog. "
        .iter()
        .copied()
        .cycle()
        .take(65536)
        .collect();
    let mixed: Vec<u8> = "κόσμε — 世界 — héllo — 🎉 "
        .as_bytes()
        .iter()
        .copied()
        .cycle()
        .take(65536)
        .collect();
    // Cut at a character boundary so the whole buffer is valid.
    let mixed = &mixed[..std::str::from_utf8(&mixed).map_or_else(|e| e.valid_up_to(), |s| s.len())];
    for (name, data) in [("ascii_64KiB", &ascii[..]), ("mixed_64KiB", mixed)] {
        g.throughput(Throughput::Bytes(data.len() as u64));
        g.bench_function(name, |b| {
            b.iter(|| {
                let mut v = Utf8Validator::new();
                v.feed(black_box(data)).and_then(|()| v.finish())
            })
        });
        // The same text arriving in 1,400-byte pieces (one TCP segment each).
        g.bench_function(format!("{name}_in_1400B_pieces"), |b| {
            b.iter(|| {
                let mut v = Utf8Validator::new();
                for piece in black_box(data).chunks(1400) {
                    v.feed(piece)?;
                }
                v.finish()
            })
        });
    }
    g.finish();
}

fn handshake(c: &mut Criterion) {
    c.bench_function("handshake_parse_request", |b| {
        b.iter(|| parse_request(black_box(REQUEST)))
    });
    c.bench_function("handshake_accept_key", |b| {
        b.iter(|| accept_key(black_box(b"dGhlIHNhbXBsZSBub25jZQ==")))
    });
}

/// One whole masked 16-byte message through the server's connection state machine.
fn receive(c: &mut Criterion) {
    let mut frame = Vec::new();
    write_frame(&mut frame, true, OpCode::Binary, Some([9, 8, 7, 6]), &[b'x'; 16]);
    let mut conn = Connection::open(Role::Server, 0);
    let cfg = wsloop::proto::Config::default();
    let mut out = Vec::new();
    let mut buf = frame.clone();
    c.bench_function("receive_16B_message", |b| {
        b.iter(|| {
            buf.copy_from_slice(&frame);
            match conn.read(&cfg, 0, black_box(&mut buf), &mut NoRandom, &mut out) {
                Ok((_, Some(Event::Message(m)))) => m.as_message().as_bytes().len(),
                _ => 0,
            }
        })
    });
}

criterion_group!(benches, frame_header, unmask, utf8, handshake, receive);
criterion_main!(benches);
