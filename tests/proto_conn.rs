//! Byte-level tests of the sans-IO `Connection` state machine, through the public API only.

mod common;

use wsloop::proto::frame::{write_frame, FrameHeader, OpCode};
use wsloop::proto::handshake::ClientRequest;
use wsloop::proto::mask::apply_mask;
use wsloop::proto::{Answer, Connection, Event, Message, NotOpen, ProtocolError, RandomSource, Request, Role, State};

use common::events::{cfg, protocol, read_request, rng, Ev, TOO_LARGE};

/// The masking key of the RFC 6455 §5.7 examples, used for every client→server frame here.
const KEY: [u8; 4] = [0x37, 0xfa, 0x21, 0x3d];

/// A message limit far above anything these tests send (unless a test says otherwise).
const BIG: usize = 1 << 20;

fn text(s: &str) -> Ev {
    Ev::Text(s.to_owned())
}

/// An open connection plus everything it produced.
struct Peer {
    conn: Connection,
    out: Vec<u8>,
    events: Vec<Ev>,
    max_message: usize,
}

impl Peer {
    fn new(role: Role) -> Peer {
        Peer {
            conn: Connection::open(role, 0),
            out: Vec::new(),
            events: Vec::new(),
            max_message: BIG,
        }
    }

    fn server() -> Peer {
        Peer::new(Role::Server)
    }

    fn client() -> Peer {
        Peer::new(Role::Client)
    }

    /// Feeds `bytes` in one `receive` call.
    fn feed(&mut self, bytes: &[u8]) -> Result<(), ProtocolError> {
        let mut data = bytes.to_vec();
        let events = &mut self.events;
        self.conn
            .receive(
                &cfg(self.max_message),
                0,
                &mut data,
                &mut rng(),
                &mut self.out,
                |e: Event<'_>, _: &mut Vec<u8>| events.push(e.into()),
            )
            .map_err(protocol)
    }

    /// Feeds `bytes` one byte per `receive` call, stopping at the first error.
    fn feed_bytewise(&mut self, bytes: &[u8]) -> Result<(), ProtocolError> {
        for b in bytes {
            self.feed(std::slice::from_ref(b))?;
        }
        Ok(())
    }

    /// The frames written so far, unmasked.
    fn written(&self) -> Vec<Frame> {
        frames(&self.out)
    }

    /// Asserts that `result` is a protocol error with `code`, that the connection is closed and
    /// that the last frame written is a close frame carrying `code`.
    #[track_caller]
    fn assert_failed(&self, result: Result<(), ProtocolError>, code: u16) {
        let e = result.expect_err("expected a protocol error");
        assert_eq!(e.code(), code, "error {e}");
        assert_eq!(self.conn.state(), State::Closed);
        assert!(!self.conn.is_buffering());
        let frames = self.written();
        let last = frames.last().expect("a close frame was written");
        assert_eq!(last.opcode, OpCode::Close);
        assert_eq!(last.close_code(), Some(code), "close frame {last:?}");
        assert!(std::str::from_utf8(&last.payload[2..]).is_ok());
        assert_eq!(
            last.masked,
            self.conn.role() == Role::Client,
            "only clients mask their frames"
        );
    }
}

/// A frame read back from `out`.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Frame {
    fin: bool,
    opcode: OpCode,
    masked: bool,
    /// Unmasked.
    payload: Vec<u8>,
}

impl Frame {
    fn close_code(&self) -> Option<u16> {
        (self.payload.len() >= 2).then(|| u16::from_be_bytes([self.payload[0], self.payload[1]]))
    }
}

/// Splits `bytes` into frames; panics if they are not a whole number of well-formed frames.
fn frames(mut bytes: &[u8]) -> Vec<Frame> {
    let mut v = Vec::new();
    while !bytes.is_empty() {
        let (h, n) = FrameHeader::parse(bytes)
            .expect("well-formed header")
            .expect("whole header");
        let len = h.payload_len as usize;
        let mut payload = bytes[n..n + len].to_vec();
        if let Some(key) = h.mask {
            apply_mask(&mut payload, key, 0);
        }
        v.push(Frame {
            fin: h.fin,
            opcode: h.opcode,
            masked: h.mask.is_some(),
            payload,
        });
        bytes = &bytes[n + len..];
    }
    v
}

/// A client→server frame, masked with [`KEY`].
fn cf(fin: bool, opcode: OpCode, payload: &[u8]) -> Vec<u8> {
    let mut v = Vec::new();
    write_frame(&mut v, fin, opcode, Some(KEY), payload);
    v
}

/// A server→client frame, unmasked.
fn sf(fin: bool, opcode: OpCode, payload: &[u8]) -> Vec<u8> {
    let mut v = Vec::new();
    write_frame(&mut v, fin, opcode, None, payload);
    v
}

/// A close frame payload: code then reason bytes.
fn close_payload(code: u16, reason: &[u8]) -> Vec<u8> {
    let mut v = code.to_be_bytes().to_vec();
    v.extend_from_slice(reason);
    v
}

fn concat(parts: &[&[u8]]) -> Vec<u8> {
    parts.concat()
}

// ---------------------------------------------------------------------------------------------
// Server role: the normal flow.

#[test]
fn rfc_masked_hello() {
    let mut p = Peer::server();
    p.feed(&[0x81, 0x85, 0x37, 0xfa, 0x21, 0x3d, 0x7f, 0x9f, 0x4d, 0x51, 0x58])
        .unwrap();
    assert_eq!(p.events, [text("Hello")]);
    assert!(p.out.is_empty());
    assert_eq!(p.conn.state(), State::Open);
    assert!(!p.conn.is_buffering());
    // write_frame produces exactly the RFC bytes.
    assert_eq!(
        cf(true, OpCode::Text, b"Hello"),
        [0x81, 0x85, 0x37, 0xfa, 0x21, 0x3d, 0x7f, 0x9f, 0x4d, 0x51, 0x58]
    );
}

#[test]
fn rfc_masked_hello_split_everywhere() {
    let bytes = [0x81, 0x85, 0x37, 0xfa, 0x21, 0x3d, 0x7f, 0x9f, 0x4d, 0x51, 0x58];
    for cut in 0..=bytes.len() {
        let mut p = Peer::server();
        p.feed(&bytes[..cut]).unwrap();
        assert_eq!(p.events.is_empty(), cut < bytes.len(), "cut {cut}");
        p.feed(&bytes[cut..]).unwrap();
        assert_eq!(p.events, [text("Hello")], "cut {cut}");
        assert!(!p.conn.is_buffering(), "cut {cut}");
    }
    let mut p = Peer::server();
    p.feed_bytewise(&bytes).unwrap();
    assert_eq!(p.events, [text("Hello")]);
}

#[test]
fn rfc_fragmented_hello() {
    // RFC 6455 §5.7: "Hel" (FIN clear, text) then "lo" (FIN set, continuation), here masked.
    let first = cf(false, OpCode::Text, b"Hel");
    let second = cf(true, OpCode::Continuation, b"lo");
    assert_eq!(first[0], 0x01);
    assert_eq!(second[0], 0x80);

    // In one read.
    let mut p = Peer::server();
    p.feed(&concat(&[&first, &second])).unwrap();
    assert_eq!(p.events, [text("Hello")]);
    assert!(p.out.is_empty());
    assert!(!p.conn.is_buffering());

    // One frame per read.
    let mut p = Peer::server();
    p.feed(&first).unwrap();
    assert!(p.events.is_empty());
    p.feed(&second).unwrap();
    assert_eq!(p.events, [text("Hello")]);

    // A byte per read.
    let mut p = Peer::server();
    p.feed_bytewise(&concat(&[&first, &second])).unwrap();
    assert_eq!(p.events, [text("Hello")]);
    assert!(!p.conn.is_buffering());
}

#[test]
fn fragmented_binary_with_empty_fragments() {
    let bytes = concat(&[
        &cf(false, OpCode::Binary, b""),
        &cf(false, OpCode::Continuation, &[1, 2, 3]),
        &cf(false, OpCode::Continuation, b""),
        &cf(true, OpCode::Continuation, &[4]),
    ]);
    let mut p = Peer::server();
    p.feed(&bytes).unwrap();
    assert_eq!(p.events, [Ev::Binary(vec![1, 2, 3, 4])]);
    let mut p = Peer::server();
    p.feed_bytewise(&bytes).unwrap();
    assert_eq!(p.events, [Ev::Binary(vec![1, 2, 3, 4])]);
}

#[test]
fn empty_messages() {
    let mut p = Peer::server();
    p.feed(&concat(&[&cf(true, OpCode::Text, b""), &cf(true, OpCode::Binary, b"")]))
        .unwrap();
    assert_eq!(p.events, [text(""), Ev::Binary(vec![])]);
    let mut p = Peer::server();
    p.feed(&concat(&[
        &cf(false, OpCode::Text, b""),
        &cf(true, OpCode::Continuation, b""),
    ]))
    .unwrap();
    assert_eq!(p.events, [text("")]);
}

#[test]
fn several_messages_in_one_read() {
    let bytes = concat(&[
        &cf(true, OpCode::Text, b"one"),
        &cf(true, OpCode::Binary, &[0xff, 0]),
        &cf(true, OpCode::Text, "třetí".as_bytes()),
    ]);
    let mut p = Peer::server();
    p.feed(&bytes).unwrap();
    let want = [text("one"), Ev::Binary(vec![0xff, 0]), text("třetí")];
    assert_eq!(p.events, want);
    let mut p = Peer::server();
    p.feed_bytewise(&bytes).unwrap();
    assert_eq!(p.events, want);
}

#[test]
fn ping_is_answered_with_the_same_payload() {
    let mut p = Peer::server();
    p.feed(&cf(true, OpCode::Ping, b"Hello")).unwrap();
    assert_eq!(p.events, [Ev::Ping(b"Hello".to_vec())]);
    // RFC 6455 §5.7: an unmasked pong "Hello".
    assert_eq!(p.out, [0x8a, 0x05, 0x48, 0x65, 0x6c, 0x6c, 0x6f]);
    assert_eq!(p.conn.state(), State::Open);

    // Empty and maximum-size payloads, and a ping that arrives a byte at a time.
    for payload in [vec![], vec![7u8; 125]] {
        let mut p = Peer::server();
        p.feed_bytewise(&cf(true, OpCode::Ping, &payload)).unwrap();
        assert_eq!(p.events, [Ev::Ping(payload.clone())]);
        assert_eq!(p.out, sf(true, OpCode::Pong, &payload));
        assert!(!p.conn.is_buffering());
    }
}

#[test]
fn pong_is_queued_before_the_callback_runs() {
    // The callback sees the pong already in `out`, so a reply it writes comes after it.
    let mut conn = Connection::open(Role::Server, 0);
    let mut out = Vec::new();
    let mut data = cf(true, OpCode::Ping, b"p");
    let mut seen = None;
    conn.receive(
        &cfg(BIG),
        0,
        &mut data,
        &mut rng(),
        &mut out,
        |e: Event<'_>, out: &mut Vec<u8>| {
            seen = Some((Ev::from(e), out.clone()));
            write_frame(out, true, OpCode::Text, None, b"after");
        },
    )
    .unwrap();
    let (ev, out_then) = seen.unwrap();
    assert_eq!(ev, Ev::Ping(b"p".to_vec()));
    assert_eq!(out_then, sf(true, OpCode::Pong, b"p"));
    assert_eq!(
        out,
        concat(&[&sf(true, OpCode::Pong, b"p"), &sf(true, OpCode::Text, b"after")])
    );
}

#[test]
fn unsolicited_pong_writes_nothing() {
    let mut p = Peer::server();
    p.feed(&cf(true, OpCode::Pong, b"beat")).unwrap();
    assert_eq!(p.events, [Ev::Pong(b"beat".to_vec())]);
    assert!(p.out.is_empty());
    assert_eq!(p.conn.state(), State::Open);
}

#[test]
fn control_frames_inside_a_fragmented_message() {
    let bytes = concat(&[
        &cf(false, OpCode::Text, b"Hel"),
        &cf(true, OpCode::Ping, b"1"),
        &cf(false, OpCode::Continuation, b""),
        &cf(true, OpCode::Pong, b"2"),
        &cf(true, OpCode::Ping, b""),
        &cf(true, OpCode::Continuation, b"lo"),
        &cf(true, OpCode::Text, b"next"),
    ]);
    let want = [
        Ev::Ping(b"1".to_vec()),
        Ev::Pong(b"2".to_vec()),
        Ev::Ping(vec![]),
        text("Hello"),
        text("next"),
    ];
    let want_out = concat(&[&sf(true, OpCode::Pong, b"1"), &sf(true, OpCode::Pong, b"")]);

    let mut p = Peer::server();
    p.feed(&bytes).unwrap();
    assert_eq!(p.events, want);
    assert_eq!(p.out, want_out);

    let mut p = Peer::server();
    p.feed_bytewise(&bytes).unwrap();
    assert_eq!(p.events, want);
    assert_eq!(p.out, want_out);
    assert!(!p.conn.is_buffering());
}

#[test]
fn control_frame_split_inside_a_fragmented_text_split_inside_a_character() {
    // "€" is e2 82 ac: the first fragment ends inside it, and a ping arrives before the rest.
    let euro = "€".as_bytes();
    let bytes = concat(&[
        &cf(false, OpCode::Text, &euro[..1]),
        &cf(true, OpCode::Ping, b"ping payload"),
        &cf(true, OpCode::Continuation, &euro[1..]),
    ]);
    for cut in 0..=bytes.len() {
        let mut p = Peer::server();
        p.feed(&bytes[..cut]).unwrap();
        p.feed(&bytes[cut..]).unwrap();
        assert_eq!(p.events, [Ev::Ping(b"ping payload".to_vec()), text("€")], "cut {cut}");
    }
}

#[test]
fn close_with_code_and_reason() {
    let mut p = Peer::server();
    p.feed(&cf(true, OpCode::Close, &close_payload(1000, b"bye"))).unwrap();
    assert_eq!(p.events, [Ev::Close(Some(1000), "bye".into())]);
    assert_eq!(p.conn.state(), State::Closed);
    let written = p.written();
    assert_eq!(written.len(), 1);
    assert_eq!(written[0].opcode, OpCode::Close);
    assert!(!written[0].masked);
    assert_eq!(written[0].close_code(), Some(1000));

    // Nothing more is read or sent.
    let before = p.out.len();
    p.feed(&concat(&[
        &cf(true, OpCode::Text, b"late"),
        &cf(true, OpCode::Ping, b""),
    ]))
    .unwrap();
    assert_eq!(p.events.len(), 1);
    assert_eq!(p.out.len(), before);
    assert_eq!(p.conn.send(Message::Text("x"), &mut rng(), &mut p.out), Err(NotOpen));
    assert_eq!(p.conn.ping(b"", &mut rng(), &mut p.out), Err(NotOpen));
    assert_eq!(p.conn.close(1000, "", 0, &mut rng(), &mut p.out), Err(NotOpen));
    assert_eq!(p.out.len(), before);
}

#[test]
fn close_is_answered_with_the_same_code() {
    let mut p = Peer::server();
    p.feed(&cf(true, OpCode::Close, &close_payload(4001, "§ reason".as_bytes())))
        .unwrap();
    assert_eq!(p.events, [Ev::Close(Some(4001), "§ reason".into())]);
    assert_eq!(p.written()[0].close_code(), Some(4001));
}

#[test]
fn empty_close_gets_an_empty_close() {
    let mut p = Peer::server();
    p.feed(&cf(true, OpCode::Close, b"")).unwrap();
    assert_eq!(p.events, [Ev::Close(None, String::new())]);
    assert_eq!(p.out, [0x88, 0x00]);
    assert_eq!(p.conn.state(), State::Closed);
}

#[test]
fn close_inside_a_fragmented_message() {
    let mut p = Peer::server();
    p.feed(&concat(&[
        &cf(false, OpCode::Text, b"unfinished"),
        &cf(true, OpCode::Close, b""),
    ]))
    .unwrap();
    assert_eq!(p.events, [Ev::Close(None, String::new())]);
    assert_eq!(p.conn.state(), State::Closed);
    assert!(!p.conn.is_buffering(), "the half message is freed");
}

#[test]
fn close_split_across_reads() {
    let bytes = cf(true, OpCode::Close, &close_payload(1001, b"going"));
    let mut p = Peer::server();
    p.feed_bytewise(&bytes).unwrap();
    assert_eq!(p.events, [Ev::Close(Some(1001), "going".into())]);
    assert_eq!(p.written()[0].close_code(), Some(1001));
    assert!(!p.conn.is_buffering());
}

// ---------------------------------------------------------------------------------------------
// Protocol errors: the error code, and a close frame with it at the end of `out`.

/// Feeds `bytes` to a fresh server in one read, then a byte at a time, and checks both fail
/// with `code`.
#[track_caller]
fn server_rejects(bytes: &[u8], code: u16) {
    let mut p = Peer::server();
    let r = p.feed(bytes);
    p.assert_failed(r, code);
    let mut p = Peer::server();
    let r = p.feed_bytewise(bytes);
    p.assert_failed(r, code);
}

#[test]
fn unmasked_client_frame() {
    server_rejects(&sf(true, OpCode::Text, b"Hello"), 1002);
    server_rejects(&sf(true, OpCode::Ping, b""), 1002);
    // Also when it is not the first frame.
    server_rejects(
        &concat(&[&cf(false, OpCode::Text, b"a"), &sf(true, OpCode::Continuation, b"b")]),
        1002,
    );
}

#[test]
fn reserved_bits() {
    for rsv in [0x40u8, 0x20, 0x10, 0x70] {
        let mut f = cf(true, OpCode::Text, b"Hello");
        f[0] |= rsv;
        server_rejects(&f, 1002);
        let mut f = cf(true, OpCode::Ping, b"");
        f[0] |= rsv;
        server_rejects(&f, 1002);
    }
}

#[test]
fn reserved_opcodes() {
    for op in (3u8..=7).chain(0xb..=0xf) {
        for fin in [0x80u8, 0] {
            let mut f = cf(true, OpCode::Binary, b"xyz");
            f[0] = fin | op;
            server_rejects(&f, 1002);
        }
    }
}

#[test]
fn fragmented_control_frames() {
    for op in [OpCode::Ping, OpCode::Pong, OpCode::Close] {
        server_rejects(&cf(false, op, b""), 1002);
        server_rejects(&cf(false, op, b"ab"), 1002);
    }
}

#[test]
fn control_frame_over_125_bytes() {
    // 126 bytes needs the 16-bit length form, which control frames may not use.
    let ping = cf(true, OpCode::Ping, &[0u8; 126]);
    assert_eq!(&ping[..4], &[0x89, 0xfe, 0x00, 0x7e]);
    server_rejects(&ping, 1002);
    // Refused on the header, before the payload arrives.
    let mut p = Peer::server();
    let r = p.feed(&ping[..2]);
    p.assert_failed(r, 1002);
    server_rejects(&cf(true, OpCode::Pong, &[0u8; 200]), 1002);
    server_rejects(&cf(true, OpCode::Close, &[b'a'; 126]), 1002);
}

#[test]
fn continuation_without_a_message() {
    server_rejects(&cf(true, OpCode::Continuation, b"lo"), 1002);
    server_rejects(&cf(false, OpCode::Continuation, b"lo"), 1002);
    // After a message has completed, too.
    server_rejects(
        &concat(&[
            &cf(false, OpCode::Text, b"a"),
            &cf(true, OpCode::Continuation, b"b"),
            &cf(true, OpCode::Continuation, b"c"),
        ]),
        1002,
    );
}

#[test]
fn new_message_inside_a_fragmented_message() {
    for op in [OpCode::Text, OpCode::Binary] {
        for fin in [true, false] {
            server_rejects(&concat(&[&cf(false, OpCode::Text, b"Hel"), &cf(fin, op, b"lo")]), 1002);
            server_rejects(
                &concat(&[&cf(false, OpCode::Binary, b"Hel"), &cf(fin, op, b"lo")]),
                1002,
            );
        }
    }
}

#[test]
fn invalid_utf8_in_a_single_frame() {
    server_rejects(&cf(true, OpCode::Text, &[0xff]), 1007);
    server_rejects(&cf(true, OpCode::Text, b"Hello\xed\xa0\x80world"), 1007); // a surrogate
    server_rejects(&cf(true, OpCode::Text, b"\xc0\xaf"), 1007); // overlong
    server_rejects(&cf(true, OpCode::Text, b"ends inside \xe2\x82"), 1007); // truncated
                                                                            // Binary is not checked.
    let mut p = Peer::server();
    p.feed(&cf(true, OpCode::Binary, &[0xff])).unwrap();
    assert_eq!(p.events, [Ev::Binary(vec![0xff])]);
}

#[test]
fn invalid_utf8_in_fragments() {
    server_rejects(
        &concat(&[
            &cf(false, OpCode::Text, "κό".as_bytes()),
            &cf(true, OpCode::Continuation, &[0xff]),
        ]),
        1007,
    );
    // A character split across fragments whose second half is wrong.
    server_rejects(
        &concat(&[
            &cf(false, OpCode::Text, &[0xe2]),
            &cf(true, OpCode::Continuation, &[0x82, 0x28]),
        ]),
        1007,
    );
    // The message ends inside a character.
    server_rejects(
        &concat(&[
            &cf(false, OpCode::Text, b"ok"),
            &cf(true, OpCode::Continuation, &[0xe2, 0x82]),
        ]),
        1007,
    );
    // ... even when every fragment is valid on its own except for the split.
    server_rejects(
        &concat(&[
            &cf(false, OpCode::Text, b"\xf0\x9f"),
            &cf(true, OpCode::Continuation, b""),
        ]),
        1007,
    );
}

#[test]
fn invalid_utf8_is_refused_as_soon_as_it_arrives() {
    // A non-final fragment holding an invalid byte fails on that fragment.
    let mut p = Peer::server();
    let r = p.feed(&cf(false, OpCode::Text, b"abc\xff"));
    p.assert_failed(r, 1007);

    // The invalid byte is in the second of three fragments: fails before the third is sent.
    let mut p = Peer::server();
    p.feed(&cf(false, OpCode::Text, b"\xf4")).unwrap();
    let r = p.feed(&cf(false, OpCode::Continuation, b"\x90\x80\x80")); // over U+10FFFF
    p.assert_failed(r, 1007);

    // Within a single frame: header and the first bytes of a long payload are enough.
    let mut payload = b"fine\xed\xa0".to_vec();
    payload.extend_from_slice(&[b'a'; 200]);
    let frame = cf(true, OpCode::Text, &payload);
    let head_len = 2 + 2 + 4;
    let mut p = Peer::server();
    p.feed(&frame[..head_len + 4]).unwrap(); // "fine"
    p.feed(&frame[head_len + 4..head_len + 5]).unwrap(); // 0xed: still a valid prefix
    let r = p.feed(&frame[head_len + 5..head_len + 6]); // 0xa0: a surrogate, never valid
    p.assert_failed(r, 1007);
}

#[test]
fn utf8_split_inside_a_character_across_reads() {
    // Valid: "€" and "𝄞" cut at every byte, inside one frame.
    let payload = "a€b𝄞c".as_bytes();
    let frame = cf(true, OpCode::Text, payload);
    for cut in 0..=frame.len() {
        let mut p = Peer::server();
        p.feed(&frame[..cut]).unwrap();
        p.feed(&frame[cut..]).unwrap();
        assert_eq!(p.events, [text("a€b𝄞c")], "cut {cut}");
    }
    // Invalid: e2 82 then 28 (not a continuation byte), cut between 82 and 28.
    let frame = cf(true, OpCode::Text, b"x\xe2\x82\x28y");
    let cut = frame.len() - 2;
    let mut p = Peer::server();
    p.feed(&frame[..cut]).unwrap();
    let r = p.feed(&frame[cut..]);
    p.assert_failed(r, 1007);
    // The same bytes cut at every position fail too.
    for cut in 0..=frame.len() {
        let mut p = Peer::server();
        let r = p.feed(&frame[..cut]).and_then(|_| p.feed(&frame[cut..]));
        p.assert_failed(r, 1007);
    }
}

#[test]
fn a_bad_text_frame_gets_the_same_close_frame_however_it_is_cut() {
    // Found by the connection_split fuzz target: a text frame ending inside a character was
    // refused "invalid UTF-8" when it came whole, "ends inside a character" when cut.
    let long_cut = [&[b'a'; 130][..], b"\xe2\x82"].concat();
    let payloads: [&[u8]; 5] = [
        b"ab\xe2\x82",
        b"\xf0\x9f\x98",
        b"ok\xc3\x28",
        b"\xed\xa0\x80",
        &long_cut,
    ];
    for payload in payloads {
        for role in [Role::Server, Role::Client] {
            let frame = match role {
                Role::Server => cf(true, OpCode::Text, payload),
                Role::Client => sf(true, OpCode::Text, payload),
            };
            let mut whole = Peer::new(role);
            let want = whole.feed(&frame);
            whole.assert_failed(want, 1007);
            for cut in 1..frame.len() {
                let mut p = Peer::new(role);
                let r = p.feed(&frame[..cut]).and_then(|_| p.feed(&frame[cut..]));
                assert_eq!(r, want, "{role:?} {payload:x?} cut {cut}");
                assert_eq!(p.written(), whole.written(), "{role:?} {payload:x?} cut {cut}");
            }
        }
    }
}

#[test]
fn close_with_a_one_byte_payload() {
    server_rejects(&cf(true, OpCode::Close, &[0x03]), 1002);
}

/// Close codes that may appear on the wire (RFC 6455 §7.4.1, §7.4.2, and 1012..=1014 from the
/// IANA WebSocket Close Code registry).
fn valid_close_code(code: u16) -> bool {
    matches!(code, 1000..=1003 | 1007..=1014 | 3000..=4999)
}

#[test]
fn invalid_close_codes() {
    // 1012..=1014 are registered with IANA after RFC 6455 (1013, "try again later", is what
    // this server sends when it is short of memory): valid. Every other code in 1000..=2999
    // that nobody defined is refused.
    for code in [0, 1, 999, 1004, 1005, 1006, 1015, 1016, 1100, 2000, 2999, 5000, 65535] {
        server_rejects(&cf(true, OpCode::Close, &close_payload(code, b"")), 1002);
        server_rejects(&cf(true, OpCode::Close, &close_payload(code, b"reason")), 1002);
    }
}

#[test]
fn valid_close_codes() {
    for code in [
        1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013, 1014, 3000, 3999, 4000, 4999,
    ] {
        let mut p = Peer::server();
        p.feed(&cf(true, OpCode::Close, &close_payload(code, b"r"))).unwrap();
        assert_eq!(p.events, [Ev::Close(Some(code), "r".into())]);
        assert_eq!(p.conn.state(), State::Closed);
        assert_eq!(p.written()[0].close_code(), Some(code));
    }
}

#[test]
fn every_close_code() {
    for code in 0..=u16::MAX {
        let mut p = Peer::server();
        let r = p.feed(&cf(true, OpCode::Close, &close_payload(code, b"")));
        if valid_close_code(code) {
            assert_eq!(r, Ok(()), "code {code}");
            assert_eq!(p.events, [Ev::Close(Some(code), String::new())], "code {code}");
        } else {
            assert_eq!(r.map_err(|e| e.code()), Err(1002), "code {code}");
            assert!(p.events.is_empty());
        }
        assert_eq!(p.conn.state(), State::Closed);
        assert_eq!(p.written().len(), 1);
    }
}

#[test]
fn close_reason_must_be_utf8() {
    server_rejects(&cf(true, OpCode::Close, &close_payload(1000, b"\xff")), 1007);
    server_rejects(&cf(true, OpCode::Close, &close_payload(1000, b"ok\xe2\x82")), 1007);
    server_rejects(&cf(true, OpCode::Close, &close_payload(1000, b"\xed\xa0\x80")), 1007);
}

#[test]
fn message_over_max_message() {
    const MAX: usize = 1000;
    let exact = vec![b'x'; MAX];
    let over = vec![b'x'; MAX + 1];
    for op in [OpCode::Text, OpCode::Binary] {
        // Exactly the limit passes, in one frame...
        let mut p = Peer::server();
        p.max_message = MAX;
        p.feed(&cf(true, op, &exact)).unwrap();
        assert_eq!(p.events.len(), 1);
        // ...and in fragments.
        let mut p = Peer::server();
        p.max_message = MAX;
        p.feed(&concat(&[
            &cf(false, op, &exact[..400]),
            &cf(true, OpCode::Ping, b""),
            &cf(false, OpCode::Continuation, &exact[400..999]),
            &cf(true, OpCode::Continuation, &exact[999..]),
        ]))
        .unwrap();
        assert_eq!(p.events.len(), 2);
        assert_eq!(
            p.events[1],
            if op == OpCode::Text {
                text(&"x".repeat(MAX))
            } else {
                Ev::Binary(exact.clone())
            }
        );

        // One byte more fails, in one frame...
        let mut p = Peer::server();
        p.max_message = MAX;
        let r = p.feed(&cf(true, op, &over));
        p.assert_failed(r, 1009);
        // ...as soon as the header shows it...
        let mut p = Peer::server();
        p.max_message = MAX;
        let r = p.feed(&cf(true, op, &over)[..8]);
        p.assert_failed(r, 1009);
        // ...and in fragments, on the fragment that goes over.
        let mut p = Peer::server();
        p.max_message = MAX;
        p.feed(&cf(false, op, &over[..600])).unwrap();
        let r = p.feed(&cf(false, OpCode::Continuation, &over[600..]));
        p.assert_failed(r, 1009);
        let mut p = Peer::server();
        p.max_message = MAX;
        p.feed(&concat(&[
            &cf(false, op, &exact),
            &cf(false, OpCode::Continuation, b""),
        ]))
        .unwrap();
        let r = p.feed(&cf(true, OpCode::Continuation, b"!"));
        p.assert_failed(r, 1009);
    }
    // Control frames do not count against the limit.
    let mut p = Peer::server();
    p.max_message = 0;
    p.feed(&cf(true, OpCode::Ping, b"12345")).unwrap();
    p.feed(&cf(true, OpCode::Text, b"")).unwrap();
    assert_eq!(p.events, [Ev::Ping(b"12345".to_vec()), text("")]);
}

#[test]
fn huge_declared_length_is_refused_without_waiting() {
    // A 64-bit length near 2^63 and one with the top bit set.
    let mut p = Peer::server();
    let r = p.feed(&[0x82, 0xff, 0x7f, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 1, 2, 3, 4]);
    p.assert_failed(r, 1009);
    let mut p = Peer::server();
    let r = p.feed(&[0x82, 0xff, 0x80, 0, 0, 0, 0, 0, 0, 0, 1, 2, 3, 4]);
    p.assert_failed(r, 1002);
}

#[test]
fn echo_from_the_callback_comes_before_the_close_frame() {
    let mut conn = Connection::open(Role::Server, 0);
    let mut out = Vec::new();
    let mut data = concat(&[
        &cf(true, OpCode::Text, b"one"),
        &cf(true, OpCode::Ping, b"p"),
        &cf(true, OpCode::Binary, b"two"),
        &sf(true, OpCode::Text, b"unmasked"),
        &cf(true, OpCode::Text, b"never seen"),
    ]);
    let mut echo = |e: Event<'_>, out: &mut Vec<u8>| {
        if let Event::Message(m) = e {
            let m = m.as_message();
            write_frame(out, true, m.opcode(), None, m.as_bytes());
        }
    };
    let e = conn
        .receive(&cfg(BIG), 0, &mut data, &mut rng(), &mut out, &mut echo)
        .unwrap_err();
    assert_eq!(protocol(e).code(), 1002);
    let written = frames(&out);
    let kinds: Vec<(OpCode, Vec<u8>)> = written.iter().map(|f| (f.opcode, f.payload.clone())).collect();
    assert_eq!(
        kinds[..3],
        [
            (OpCode::Text, b"one".to_vec()),
            (OpCode::Pong, b"p".to_vec()),
            (OpCode::Binary, b"two".to_vec()),
        ]
    );
    assert_eq!(written.len(), 4);
    assert_eq!(written[3].opcode, OpCode::Close);
    assert_eq!(written[3].close_code(), Some(1002));
    assert_eq!(conn.state(), State::Closed);
}

#[test]
fn echo_of_a_fragmented_message_comes_before_a_1007() {
    let mut conn = Connection::open(Role::Server, 0);
    let mut out = Vec::new();
    let mut data = concat(&[
        &cf(false, OpCode::Text, b"ab"),
        &cf(true, OpCode::Continuation, b"c"),
        &cf(false, OpCode::Text, b"d\xff"),
    ]);
    let mut echo = |e: Event<'_>, out: &mut Vec<u8>| {
        if let Event::Message(m) = e {
            let m = m.as_message();
            write_frame(out, true, m.opcode(), None, m.as_bytes());
        }
    };
    assert_eq!(
        protocol(
            conn.receive(&cfg(BIG), 0, &mut data, &mut rng(), &mut out, &mut echo)
                .unwrap_err()
        )
        .code(),
        1007
    );
    let written = frames(&out);
    assert_eq!(written.len(), 2);
    assert_eq!(
        (written[0].opcode, &written[0].payload[..]),
        (OpCode::Text, &b"abc"[..])
    );
    assert_eq!(written[1].close_code(), Some(1007));
}

#[test]
fn after_an_error_nothing_more_happens() {
    let mut p = Peer::server();
    let r = p.feed(&sf(true, OpCode::Text, b"x"));
    p.assert_failed(r, 1002);
    let before = p.out.clone();
    p.feed(&cf(true, OpCode::Ping, b"x")).unwrap();
    p.feed(&[0xff; 20]).unwrap();
    assert_eq!(p.out, before);
    assert!(p.events.is_empty());
    assert_eq!(p.conn.state(), State::Closed);
}

// ---------------------------------------------------------------------------------------------
// Client role.

#[test]
fn client_accepts_unmasked_frames() {
    let mut p = Peer::client();
    p.feed(&[0x81, 0x05, 0x48, 0x65, 0x6c, 0x6c, 0x6f]).unwrap(); // RFC 6455 §5.7
    p.feed(&[0x01, 0x03, 0x48, 0x65, 0x6c]).unwrap();
    p.feed(&[0x80, 0x02, 0x6c, 0x6f]).unwrap();
    let mut big = vec![0x82, 0x7e, 0x01, 0x00];
    big.extend_from_slice(&[9; 256]);
    p.feed(&big).unwrap();
    assert_eq!(p.events, [text("Hello"), text("Hello"), Ev::Binary(vec![9; 256])]);
    assert!(p.out.is_empty());
}

#[test]
fn client_refuses_masked_frames() {
    for bytes in [cf(true, OpCode::Text, b"Hello"), cf(true, OpCode::Ping, b"")] {
        let mut p = Peer::client();
        let r = p.feed(&bytes);
        p.assert_failed(r, 1002); // also checks that the client's close frame is masked
        let mut p = Peer::client();
        let r = p.feed_bytewise(&bytes);
        p.assert_failed(r, 1002);
    }
}

#[test]
fn client_answers_ping_and_close_masked() {
    let mut p = Peer::client();
    p.feed(&sf(true, OpCode::Ping, b"Hello")).unwrap();
    p.feed(&sf(true, OpCode::Close, &close_payload(1001, b""))).unwrap();
    assert_eq!(
        p.events,
        [Ev::Ping(b"Hello".to_vec()), Ev::Close(Some(1001), String::new())]
    );
    let written = p.written();
    assert_eq!(written.len(), 2);
    assert!(written.iter().all(|f| f.masked));
    assert_eq!(
        (written[0].opcode, &written[0].payload[..]),
        (OpCode::Pong, &b"Hello"[..])
    );
    assert_eq!(written[1].close_code(), Some(1001));
}

/// Parses one frame from `bytes`, returning its header, unmasked payload and total length.
fn parse_one(bytes: &[u8]) -> (FrameHeader, Vec<u8>, usize) {
    let (h, n) = FrameHeader::parse(bytes).unwrap().unwrap();
    let len = h.payload_len as usize;
    let mut payload = bytes[n..n + len].to_vec();
    if let Some(key) = h.mask {
        apply_mask(&mut payload, key, 0);
    }
    (h, payload, n + len)
}

#[test]
fn client_sends_masked_frames_with_fresh_keys() {
    let mut conn = Connection::open(Role::Client, 0);
    let mut out = Vec::new();
    let long = "ünïcødé ".repeat(40);
    conn.send(Message::Text(&long), &mut rng(), &mut out).unwrap();
    let first_len = out.len();
    conn.send(Message::Binary(&[1, 2, 3, 4, 5]), &mut rng(), &mut out)
        .unwrap();

    let (h1, p1, n1) = parse_one(&out);
    assert_eq!(n1, first_len);
    assert!(h1.fin);
    assert_eq!(h1.opcode, OpCode::Text);
    assert_eq!(p1, long.as_bytes());
    let (h2, p2, n2) = parse_one(&out[n1..]);
    assert_eq!(n1 + n2, out.len());
    assert_eq!(h2.opcode, OpCode::Binary);
    assert_eq!(p2, [1, 2, 3, 4, 5]);
    let (k1, k2) = (h1.mask.expect("client frames are masked"), h2.mask.expect("masked"));
    // Fresh random keys: equal with probability 2^-32.
    assert_ne!(k1, k2, "each frame gets its own masking key");
    // The payload on the wire is not the plain text (the key is never all zeros in practice).
    assert_ne!(&out[n1 - long.len()..n1], long.as_bytes());

    // A server can read them back.
    let mut server = Peer::server();
    server.feed(&out).unwrap();
    assert_eq!(server.events, [Ev::Text(long.clone()), Ev::Binary(vec![1, 2, 3, 4, 5])]);

    // Fragmented sends, pings and closes are masked too.
    let mut out = Vec::new();
    conn.send_frame(OpCode::Text, false, b"Hel", &mut rng(), &mut out)
        .unwrap();
    conn.send_frame(OpCode::Continuation, true, b"lo", &mut rng(), &mut out)
        .unwrap();
    conn.ping(b"p", &mut rng(), &mut out).unwrap();
    conn.close(1000, "done", 0, &mut rng(), &mut out).unwrap();
    let written = frames(&out);
    assert!(written.iter().all(|f| f.masked));
    let mut server = Peer::server();
    server.feed(&out).unwrap();
    assert_eq!(
        server.events,
        [
            text("Hello"),
            Ev::Ping(b"p".to_vec()),
            Ev::Close(Some(1000), "done".into())
        ]
    );
}

#[test]
fn server_sends_unmasked_frames() {
    let mut conn = Connection::open(Role::Server, 0);
    let mut out = Vec::new();
    conn.send(Message::Text("Hello"), &mut rng(), &mut out).unwrap();
    assert_eq!(out, [0x81, 0x05, 0x48, 0x65, 0x6c, 0x6c, 0x6f]);
    out.clear();
    conn.send(Message::Binary(&[0; 256]), &mut rng(), &mut out).unwrap();
    assert_eq!(&out[..4], &[0x82, 0x7e, 0x01, 0x00]);
    assert_eq!(out.len(), 4 + 256);
    out.clear();
    // Control opcodes cannot go through send_frame; ping payloads are cut to 125 bytes.
    assert_eq!(
        conn.send_frame(OpCode::Ping, true, b"", &mut rng(), &mut out),
        Err(NotOpen)
    );
    conn.ping(&[1; 300], &mut rng(), &mut out).unwrap();
    let (h, p, _) = parse_one(&out);
    assert_eq!((h.opcode, h.mask, p.len()), (OpCode::Ping, None, 125));
}

#[test]
fn sending_before_the_handshake_fails() {
    let mut request = Vec::new();
    let mut conn = Connection::client(&ClientRequest::new("h", "/"), 0, &mut rng(), &mut request);
    let mut out = Vec::new();
    assert_eq!(conn.state(), State::Connecting);
    assert_eq!(conn.send(Message::Text("x"), &mut rng(), &mut out), Err(NotOpen));
    assert_eq!(conn.close(1000, "", 0, &mut rng(), &mut out), Err(NotOpen));
    assert!(out.is_empty());
    let conn = Connection::open(Role::Client, 0);
    assert_eq!(conn.state(), State::Open);
}

// ---------------------------------------------------------------------------------------------
// Closing from this end.

#[test]
fn local_close_then_peer_close() {
    let mut p = Peer::server();
    p.conn.close(1001, "shutting down", 0, &mut rng(), &mut p.out).unwrap();
    assert_eq!(p.conn.state(), State::LocalClosing);
    let written = p.written();
    assert_eq!(written.len(), 1);
    assert_eq!(written[0].close_code(), Some(1001));
    assert_eq!(&written[0].payload[2..], b"shutting down");

    // Sending is over.
    assert_eq!(p.conn.send(Message::Text("x"), &mut rng(), &mut p.out), Err(NotOpen));
    assert_eq!(p.conn.close(1000, "", 0, &mut rng(), &mut p.out), Err(NotOpen));

    // Data messages, whole or fragmented, are dropped.
    p.feed(&concat(&[
        &cf(true, OpCode::Text, b"dropped"),
        &cf(false, OpCode::Binary, b"also"),
        &cf(true, OpCode::Continuation, b" dropped"),
    ]))
    .unwrap();
    assert!(p.events.is_empty());
    assert_eq!(p.conn.state(), State::LocalClosing);

    // The peer's close completes the handshake; no second close frame is written.
    let before = p.out.clone();
    p.feed(&cf(true, OpCode::Close, &close_payload(1001, b""))).unwrap();
    assert_eq!(p.events, [Ev::Close(Some(1001), String::new())]);
    assert_eq!(p.conn.state(), State::Closed);
    assert_eq!(p.out, before);
}

#[test]
fn local_close_with_an_invalid_code_sends_1000() {
    for code in [0, 1005, 1006, 1015, 2000, 5000] {
        let mut p = Peer::server();
        p.conn.close(code, "", 0, &mut rng(), &mut p.out).unwrap();
        assert_eq!(p.written()[0].close_code(), Some(1000), "code {code}");
    }
}

#[test]
fn local_close_then_protocol_error_writes_no_second_close() {
    let mut p = Peer::server();
    p.conn.close(1000, "", 0, &mut rng(), &mut p.out).unwrap();
    let before = p.out.clone();
    let e = p.feed(&sf(true, OpCode::Text, b"unmasked")).unwrap_err();
    assert_eq!(e.code(), 1002);
    assert_eq!(p.conn.state(), State::Closed);
    assert_eq!(p.out, before);
}

#[test]
fn local_close_split_peer_close() {
    let mut p = Peer::client();
    p.conn.close(1000, "bye", 0, &mut rng(), &mut p.out).unwrap();
    let before = p.out.clone();
    p.feed_bytewise(&concat(&[
        &sf(true, OpCode::Text, b"late"),
        &sf(true, OpCode::Close, &close_payload(1000, b"ok")),
    ]))
    .unwrap();
    assert_eq!(p.events, [Ev::Close(Some(1000), "ok".into())]);
    assert_eq!(p.conn.state(), State::Closed);
    assert_eq!(p.out, before);
}

// ---------------------------------------------------------------------------------------------
// Memory: parser state exists only while something is split across reads.

#[test]
fn buffering_only_while_split() {
    let mut p = Peer::server();
    assert!(!p.conn.is_buffering());

    // Whole frames, several per read.
    p.feed(&concat(&[&cf(true, OpCode::Text, b"a"), &cf(true, OpCode::Ping, b"b")]))
        .unwrap();
    assert!(!p.conn.is_buffering());

    // A header cut after one byte.
    let frame = cf(true, OpCode::Binary, &[5; 300]);
    p.feed(&frame[..1]).unwrap();
    assert!(p.conn.is_buffering());
    // Header complete, payload partial.
    p.feed(&frame[1..20]).unwrap();
    assert!(p.conn.is_buffering());
    p.feed(&frame[20..]).unwrap();
    assert!(!p.conn.is_buffering());

    // A frame cut exactly after its header.
    let frame = cf(true, OpCode::Text, b"exact");
    p.feed(&frame[..6]).unwrap();
    assert!(p.conn.is_buffering());
    p.feed(&frame[6..]).unwrap();
    assert!(!p.conn.is_buffering());

    // A control frame cut in its payload.
    let frame = cf(true, OpCode::Ping, b"12345");
    p.feed(&frame[..8]).unwrap();
    assert!(p.conn.is_buffering());
    p.feed(&frame[8..]).unwrap();
    assert!(!p.conn.is_buffering());

    // A whole frame followed by the start of the next.
    let two = concat(&[&cf(true, OpCode::Text, b"x"), &cf(true, OpCode::Text, b"y")]);
    p.feed(&two[..9]).unwrap();
    assert!(p.conn.is_buffering());
    p.feed(&two[9..]).unwrap();
    assert!(!p.conn.is_buffering());

    // A fragmented message is held until its last fragment.
    p.feed(&cf(false, OpCode::Text, b"frag")).unwrap();
    assert!(p.conn.is_buffering());
    p.feed(&cf(true, OpCode::Continuation, b"ment")).unwrap();
    assert!(!p.conn.is_buffering());

    assert_eq!(
        p.events,
        [
            text("a"),
            Ev::Ping(b"b".to_vec()),
            Ev::Binary(vec![5; 300]),
            text("exact"),
            Ev::Ping(b"12345".to_vec()),
            text("x"),
            text("y"),
            text("fragment"),
        ]
    );
}

#[test]
fn buffering_ends_at_every_cut() {
    let bytes = concat(&[
        &cf(true, OpCode::Text, "κόσμε".as_bytes()),
        &cf(true, OpCode::Binary, &[1; 130]),
        &cf(true, OpCode::Pong, b"pp"),
    ]);
    for cut in 0..=bytes.len() {
        let mut p = Peer::server();
        p.feed(&bytes[..cut]).unwrap();
        p.feed(&bytes[cut..]).unwrap();
        assert!(!p.conn.is_buffering(), "cut {cut}");
        assert_eq!(p.events.len(), 3, "cut {cut}");
    }
}

#[test]
fn connection_is_small() {
    assert!(
        std::mem::size_of::<Connection>() <= 16,
        "{}",
        std::mem::size_of::<Connection>()
    );
}

// ---------------------------------------------------------------------------------------------
// The opening handshake head.

const REQUEST: &str = "GET /chat HTTP/1.1\r\nHost: server.example.com\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nOrigin: http://example.com\r\nSec-WebSocket-Version: 13\r\n\r\n";

fn assert_upgrade(req: &Request) {
    assert!(req.is_upgrade());
    assert_eq!(req.path(), "/chat");
    assert_eq!(req.accept_key().as_deref(), Some("s3pPLMBiTxaQ9kYGzzhZRbK+xOo="));
}

#[test]
fn read_head_in_one_piece() {
    let mut conn = Connection::server(0);
    let (head, used) = read_request(&mut conn, REQUEST.as_bytes(), 4096).unwrap().unwrap();
    assert_upgrade(&head);
    assert_eq!(used, REQUEST.len());
    assert!(!conn.is_buffering());

    // Bytes after the head are WebSocket stream and are not counted.
    let mut data = REQUEST.as_bytes().to_vec();
    let frame = cf(true, OpCode::Text, b"Hello");
    data.extend_from_slice(&frame);
    let mut conn = Connection::server(0);
    let (head, used) = read_request(&mut conn, &data, 4096).unwrap().unwrap();
    assert_upgrade(&head);
    assert_eq!(used, REQUEST.len());
    assert_eq!(&data[used..], &frame[..]);
    assert!(!conn.is_buffering());

    // The rest goes to the opened connection.
    let mut out = Vec::new();
    assert!(conn.accept(&head, &Answer::accept(), None, 0, &mut out));
    assert!(out.starts_with(b"HTTP/1.1 101 "));
    let mut p = Peer {
        conn,
        out: Vec::new(),
        events: Vec::new(),
        max_message: BIG,
    };
    p.feed(&data[used..]).unwrap();
    assert_eq!(p.events, [text("Hello")]);
}

#[test]
fn read_head_in_two_pieces() {
    let frame = cf(true, OpCode::Binary, &[1, 2, 3]);
    let data = concat(&[REQUEST.as_bytes(), &frame]);
    for cut in 1..REQUEST.len() {
        let mut conn = Connection::server(0);
        assert_eq!(read_request(&mut conn, &data[..cut], 4096), Ok(None), "cut {cut}");
        assert!(conn.is_buffering());
        let second = &data[cut..];
        let (head, used) = read_request(&mut conn, second, 4096).unwrap().unwrap();
        assert_upgrade(&head);
        assert_eq!(used, REQUEST.len() - cut, "cut {cut}");
        assert_eq!(&second[used..], &frame[..], "cut {cut}");
        assert!(!conn.is_buffering());
    }
}

#[test]
fn read_head_in_three_pieces() {
    let leftover = b"\x82\x80rest";
    let data = concat(&[REQUEST.as_bytes(), leftover]);
    let n = REQUEST.len();
    for a in 1..n {
        for b in (a + 1)..n {
            let mut conn = Connection::server(0);
            assert_eq!(read_request(&mut conn, &data[..a], 4096), Ok(None));
            assert_eq!(read_request(&mut conn, &data[a..b], 4096), Ok(None));
            let third = &data[b..];
            let (head, used) = read_request(&mut conn, third, 4096).unwrap().unwrap();
            assert_upgrade(&head);
            assert_eq!(used, n - b, "cuts {a} {b}");
            assert_eq!(&third[used..], leftover, "cuts {a} {b}");
            assert!(!conn.is_buffering());
        }
    }
}

/// A random source that gives the RFC's sample nonce, so the key is the RFC's.
struct SampleNonce;

impl RandomSource for SampleNonce {
    fn fill(&mut self, dest: &mut [u8]) {
        for (d, s) in dest.iter_mut().zip(b"the sample nonce".iter().cycle()) {
            *d = *s;
        }
    }
}

#[test]
fn read_head_response_on_the_client() {
    let response = "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n";
    let frame = sf(true, OpCode::Text, b"hi");
    let data = concat(&[response.as_bytes(), &frame]);
    let cfg = wsloop::proto::Config::default();
    for cut in 0..response.len() {
        let mut req = Vec::new();
        let mut conn = Connection::client(&ClientRequest::new("h", "/"), 0, &mut SampleNonce, &mut req);
        assert!(String::from_utf8(req)
            .unwrap()
            .contains("Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"));
        let mut out = Vec::new();
        let mut first = data[..cut].to_vec();
        assert_eq!(
            conn.read(&cfg, 0, &mut first, &mut SampleNonce, &mut out),
            Ok((cut, None)),
            "cut {cut}"
        );
        let mut rest = data[cut..].to_vec();
        let (used, ev) = conn.read(&cfg, 0, &mut rest, &mut SampleNonce, &mut out).unwrap();
        match ev {
            Some(Event::Open(resp)) => assert_eq!(resp.protocol, None),
            other => panic!("cut {cut}: {other:?}"),
        }
        assert_eq!(&rest[used..], &frame[..], "cut {cut}");
        assert!(!conn.is_buffering(), "cut {cut}");
    }
}

#[test]
fn read_head_over_the_limit() {
    let max = 64;
    assert!(REQUEST.len() > max);
    // In one piece with no end in sight.
    let mut conn = Connection::server(0);
    assert_eq!(read_request(&mut conn, &REQUEST.as_bytes()[..max], max), Err(TOO_LARGE));
    assert!(!conn.is_buffering());
    // Growing past the limit over several reads.
    let mut conn = Connection::server(0);
    assert_eq!(read_request(&mut conn, &REQUEST.as_bytes()[..30], max), Ok(None));
    assert_eq!(read_request(&mut conn, &REQUEST.as_bytes()[30..60], max), Ok(None));
    assert_eq!(read_request(&mut conn, &REQUEST.as_bytes()[60..], max), Err(TOO_LARGE));
    assert!(!conn.is_buffering());
    // An endless stream of header bytes.
    let mut conn = Connection::server(0);
    assert_eq!(read_request(&mut conn, b"GET / HTTP/1.1\r\n", 4096), Ok(None));
    let mut r = Ok(None);
    let filler = format!("X-Filler: {}\r\n", "a".repeat(200)); // few headers, many bytes
    for _ in 0..200 {
        r = read_request(&mut conn, filler.as_bytes(), 4096);
        if r.is_err() {
            break;
        }
    }
    assert_eq!(r.map(|_| ()), Err(TOO_LARGE));
}

#[test]
fn read_head_limit_does_not_depend_on_how_the_head_arrives() {
    // A complete head one byte over the limit is refused whether it comes whole or cut up;
    // one exactly at the limit is accepted either way.
    let n = REQUEST.len();
    for (max, ok) in [(n - 1, false), (n, true), (n + 1, true)] {
        let mut conn = Connection::server(0);
        let whole = read_request(&mut conn, REQUEST.as_bytes(), max);
        assert_eq!(whole.is_ok(), ok, "whole, max {max}: {whole:?}");
        for cut in 1..n {
            let mut conn = Connection::server(0);
            let r = read_request(&mut conn, &REQUEST.as_bytes()[..cut], max)
                .and_then(|_| read_request(&mut conn, &REQUEST.as_bytes()[cut..], max));
            assert_eq!(r.is_ok(), ok, "cut {cut}, max {max}: {r:?}");
            if !ok {
                assert_eq!(r.map(|_| ()), Err(TOO_LARGE));
            }
        }
    }
}

#[test]
fn read_head_invalid_request() {
    let mut conn = Connection::server(0);
    assert_eq!(read_request(&mut conn, b"GET / HTTP/1.1\r\n", 4096), Ok(None));
    let r = read_request(&mut conn, b"Host x\r\n\r\n", 4096);
    assert_eq!(r.map(|_| ()).unwrap_err().status, 400);
    assert!(!conn.is_buffering());
    let mut conn = Connection::server(0);
    let bad = REQUEST.replace("GET", "PUT");
    assert_eq!(
        read_request(&mut conn, bad.as_bytes(), 4096)
            .map(|_| ())
            .unwrap_err()
            .status,
        405
    );
}

/// Feeds `data` to a fresh server in two reads, cut at `cut`: the request, `None`, or the refusal.
fn read_request_cut(data: &[u8], cut: usize, max: usize) -> Result<Option<Request>, wsloop::proto::Reject> {
    let mut conn = Connection::server(0);
    let first = read_request(&mut conn, &data[..cut], max)?;
    if let Some((req, _)) = first {
        return Ok(Some(req));
    }
    let r = read_request(&mut conn, &data[cut..], max).map(|r| r.map(|(req, _)| req));
    assert!(r == Ok(None) || !conn.is_buffering());
    r
}

#[test]
fn a_refusal_does_not_depend_on_how_the_request_arrives() {
    // Found by the server_handshake fuzz target. (1) A broken version was judged on the last
    // word of the request line so far: 505 while the line was cut after it, 400 once a later
    // word had come. (2) A complete head over the limit was checked when it came whole (400 for
    // a repeated key) but refused as too large when it came cut up.
    let broken_version = "GET /chat HTTP/1.x y\r\nHost: h\r\n\r\n";
    let repeated_key = REQUEST.replace("Origin:", "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nOrigin:");
    for (data, max, want) in [
        (broken_version, 4096, 505),
        (repeated_key.as_str(), 4096, 400),
        (repeated_key.as_str(), repeated_key.len() - 1, 431),
        (repeated_key.as_str(), repeated_key.len() - 30, 431),
    ] {
        let whole = read_request_cut(data.as_bytes(), data.len(), max);
        assert_eq!(whole.as_ref().map_err(|r| r.status), Err(want), "{data:?} max {max}");
        for cut in 0..data.len() {
            assert_eq!(
                read_request_cut(data.as_bytes(), cut, max),
                whole,
                "{data:?} max {max} cut {cut}"
            );
        }
    }
}

#[test]
fn a_refused_client_sees_the_same_answer_however_it_arrives() {
    // A refusal whose body runs past the head limit is reported with the body that fits,
    // whole or cut up (it used to be reported in full when whole, as too large when cut).
    let head = "HTTP/1.1 403 Forbidden\r\nContent-Length: 40\r\n\r\n";
    let data = format!("{head}{}", "no entry for you, go away, nothing here!");
    let mut cfg = wsloop::proto::Config::default();
    cfg.max_head = head.len() + 10;
    let run = |cut: usize| {
        let mut out = Vec::new();
        let mut conn = Connection::client(&ClientRequest::new("h", "/"), 0, &mut rng(), &mut out);
        let mut result = Ok((0, None));
        for piece in [&data.as_bytes()[..cut], &data.as_bytes()[cut..]] {
            let mut piece = piece.to_vec();
            result = conn
                .read(&cfg, 0, &mut piece, &mut rng(), &mut out)
                .map(|(n, ev)| (n, ev.map(Event::into_owned)));
            if result.is_err() {
                break;
            }
        }
        assert_eq!(conn.state(), State::Closed, "cut {cut}");
        result.unwrap_err()
    };
    let whole = run(data.len());
    let wsloop::proto::Error::Response(e) = &whole else {
        panic!("{whole:?}")
    };
    let wsloop::proto::ResponseError::Status { code, body, .. } = &**e else {
        panic!("{e:?}")
    };
    assert_eq!((*code, body.as_str()), (403, "no entry f"));
    for cut in 0..data.len() {
        assert_eq!(run(cut), whole, "cut {cut}");
    }
}

#[test]
fn an_upgrade_with_a_body_is_refused_however_it_arrives() {
    // The bytes after an upgrade's head are frames; a body announced on it would be read as
    // frames here and as a body by a proxy that reads it otherwise (request smuggling).
    // "abcdef" is a body of 6, and also a chunk a chunked reader would wait on.
    for (header, named) in [
        ("Content-Length: 6", "Content-Length must be 0"),
        ("Transfer-Encoding: chunked", "Transfer-Encoding is not allowed"),
    ] {
        let data = REQUEST.replace("Origin:", &format!("{header}\r\nOrigin:")) + "abcdef";
        for cut in 1..=data.len() {
            let r = read_request_cut(data.as_bytes(), cut, 4096).map(|_| ());
            let e = r.unwrap_err();
            assert_eq!(e.status, 400, "{header} cut {cut}");
            assert!(e.message.contains(named), "{header} cut {cut}: {}", e.message);
        }
        // The answer says why.
        let mut out = Vec::new();
        read_request_cut(data.as_bytes(), data.len(), 4096)
            .unwrap_err()
            .write(&mut out);
        let text = String::from_utf8(out).unwrap();
        assert!(text.starts_with("HTTP/1.1 400 Bad Request\r\n"), "{text}");
        assert!(
            text.ends_with(&format!("a WebSocket upgrade carries no body: {named}\n")),
            "{text}"
        );
    }
    // An empty body is announced as 0 and is fine: the frame after the head is read as one.
    let data = REQUEST.replace("Origin:", "Content-Length: 0\r\nOrigin:");
    let frame = cf(true, OpCode::Text, b"Hello");
    let data = concat(&[data.as_bytes(), &frame]);
    let mut conn = Connection::server(0);
    let (head, used) = read_request(&mut conn, &data, 4096).unwrap().unwrap();
    assert_upgrade(&head);
    assert_eq!(&data[used..], &frame[..]);
}
