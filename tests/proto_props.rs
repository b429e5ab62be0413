//! Property tests of the sans-IO protocol core, through the public API only.

mod common;

use proptest::collection::vec;
use proptest::prelude::*;
use proptest::sample::Index;

use wsloop::proto::frame::{write_frame, FrameHeader, OpCode};
use wsloop::proto::handshake;
use wsloop::proto::mask::apply_mask;
use wsloop::proto::utf8::Utf8Validator;
use wsloop::proto::{Connection, Event, Request, Role, State};

use common::events::{cfg, protocol, read_request, rng, Ev, TOO_LARGE};

/// A message limit above every payload generated here (unless a test picks a smaller one).
const BIG: usize = 1 << 20;

/// What feeding a byte stream to a fresh open connection produced.
#[derive(Debug)]
struct Outcome {
    events: Vec<Ev>,
    /// The error's close code, if `receive` failed.
    error: Option<u16>,
    out: Vec<u8>,
    state: State,
    buffering: bool,
}

/// Feeds `stream` to a fresh open connection of `role`, cut at `cuts` (sorted, in range), one
/// `receive` call per piece. Checks the error contract on the way: after an `Err` the state is
/// `Closed`, and later calls are no-ops.
fn feed(role: Role, stream: &[u8], cuts: &[usize], max_message: usize) -> Outcome {
    feed_conn(Connection::open(role, 0), stream, cuts, max_message)
}

/// [`feed`] for a given connection.
fn feed_conn(mut conn: Connection, stream: &[u8], cuts: &[usize], max_message: usize) -> Outcome {
    let mut out = Vec::new();
    let mut events = Vec::new();
    let mut error = None;
    let mut start = 0;
    for end in cuts.iter().copied().chain([stream.len()]) {
        let mut piece = stream[start..end].to_vec();
        start = end;
        let r = conn
            .receive(
                &cfg(max_message),
                0,
                &mut piece,
                &mut rng(),
                &mut out,
                |e: Event<'_>, _: &mut Vec<u8>| events.push(Ev::from(e)),
            )
            .map_err(protocol);
        match r {
            Ok(()) => {}
            Err(e) => {
                assert!(error.is_none(), "a second error after the connection closed: {e}");
                assert!(matches!(e.code(), 1002 | 1007 | 1009), "unexpected code {e}");
                assert_eq!(conn.state(), State::Closed, "state after an error");
                assert!(!conn.is_buffering(), "parser state kept after an error");
                error = Some(e.code());
            }
        }
        if conn.state() == State::Closed {
            // Nothing more is read or written.
            let (n_events, n_out) = (events.len(), out.len());
            let mut more = stream[start..].to_vec();
            let r = conn
                .receive(
                    &cfg(max_message),
                    0,
                    &mut more,
                    &mut rng(),
                    &mut out,
                    |e: Event<'_>, _: &mut Vec<u8>| events.push(Ev::from(e)),
                )
                .map_err(protocol);
            assert_eq!(r, Ok(()));
            assert_eq!((events.len(), out.len()), (n_events, n_out));
            break;
        }
    }
    Outcome {
        events,
        error,
        out,
        state: conn.state(),
        buffering: conn.is_buffering(),
    }
}

/// Sorted cut points in `0..=len` from proptest indices.
fn cut_points(len: usize, idx: &[Index]) -> Vec<usize> {
    let mut cuts: Vec<usize> = idx.iter().map(|i| i.index(len + 1)).collect();
    cuts.sort_unstable();
    cuts
}

/// A frame read back from `out`: (fin, opcode, masked, unmasked payload).
type Written = (bool, OpCode, bool, Vec<u8>);

fn written_frames(mut bytes: &[u8]) -> Vec<Written> {
    let mut v = Vec::new();
    while !bytes.is_empty() {
        let (h, n) = FrameHeader::parse(bytes)
            .expect("out holds well-formed frames")
            .expect("out holds whole frames");
        let len = h.payload_len as usize;
        let mut payload = bytes[n..n + len].to_vec();
        if let Some(key) = h.mask {
            apply_mask(&mut payload, key, 0);
        }
        v.push((h.fin, h.opcode, h.mask.is_some(), payload));
        bytes = &bytes[n + len..];
    }
    v
}

fn valid_close_code(code: u16) -> bool {
    matches!(code, 1000..=1003 | 1007..=1014 | 3000..=4999)
}

// ---------------------------------------------------------------------------------------------
// A reference decoder: the RFC 6455 receive rules written out plainly over the whole stream.

/// What a receiver must report for `stream` (all of it received, in any number of reads):
/// the events up to the first error or close, and the error's close code.
fn model(role: Role, stream: &[u8], max_message: usize) -> (Vec<Ev>, Option<u16>) {
    let mut events = Vec::new();
    let mut message: Option<(bool, Vec<u8>)> = None; // (is text, bytes so far)
    let mut pos = 0;
    loop {
        let rest = &stream[pos..];
        if rest.len() < 2 {
            return (events, None);
        }
        let (b0, b1) = (rest[0], rest[1]);
        let fin = b0 & 0x80 != 0;
        let op = b0 & 0x0f;
        // Checks that two bytes are enough for.
        if b0 & 0x70 != 0 || !matches!(op, 0 | 1 | 2 | 8 | 9 | 10) {
            return (events, Some(1002));
        }
        let control = op >= 8;
        let len7 = b1 & 0x7f;
        if control && (!fin || len7 > 125) {
            return (events, Some(1002));
        }
        let masked = b1 & 0x80 != 0;
        let ext = match len7 {
            126 => 2,
            127 => 8,
            _ => 0,
        };
        let head = 2 + ext + if masked { 4 } else { 0 };
        if rest.len() < head {
            return (events, None);
        }
        let len = match ext {
            0 => u64::from(len7),
            2 => u64::from(u16::from_be_bytes([rest[2], rest[3]])),
            _ => u64::from_be_bytes(rest[2..10].try_into().unwrap()),
        };
        if len >> 63 != 0 {
            return (events, Some(1002));
        }
        if masked != (role == Role::Server) {
            return (events, Some(1002));
        }
        if !control {
            match (op, &message) {
                (0, None) | (1 | 2, Some(_)) => return (events, Some(1002)),
                _ => {}
            }
            let so_far = message.as_ref().map_or(0, |m| m.1.len() as u64);
            if so_far.saturating_add(len) > max_message as u64 {
                return (events, Some(1009));
            }
        }
        let have = len.min((rest.len() - head) as u64) as usize;
        let complete = have as u64 == len;
        let mut payload = rest[head..head + have].to_vec();
        if masked {
            let key: [u8; 4] = rest[head - 4..head].try_into().unwrap();
            for (i, b) in payload.iter_mut().enumerate() {
                *b ^= key[i % 4];
            }
        }
        if control {
            if !complete {
                return (events, None);
            }
            match op {
                9 => events.push(Ev::Ping(payload)),
                10 => events.push(Ev::Pong(payload)),
                _ => {
                    let ev = match payload.len() {
                        0 => Ev::Close(None, String::new()),
                        1 => return (events, Some(1002)),
                        _ => {
                            let code = u16::from_be_bytes([payload[0], payload[1]]);
                            if !valid_close_code(code) {
                                return (events, Some(1002));
                            }
                            match String::from_utf8(payload[2..].to_vec()) {
                                Ok(reason) => Ev::Close(Some(code), reason),
                                Err(_) => return (events, Some(1007)),
                            }
                        }
                    };
                    events.push(ev);
                    return (events, None);
                }
            }
        } else {
            let (text, mut bytes) = if op == 0 {
                message.take().expect("checked above")
            } else {
                (op == 1, Vec::new())
            };
            bytes.extend_from_slice(&payload);
            if text {
                // Invalid as soon as the bytes so far cannot start valid text; a cut character is
                // only an error at the end of the message.
                match std::str::from_utf8(&bytes) {
                    Ok(_) => {}
                    Err(e) if e.error_len().is_none() && !(complete && fin) => {}
                    Err(_) => return (events, Some(1007)),
                }
            }
            if !complete {
                return (events, None);
            }
            if fin {
                events.push(if text {
                    Ev::Text(String::from_utf8(bytes).unwrap())
                } else {
                    Ev::Binary(bytes)
                });
            } else {
                message = Some((text, bytes));
            }
        }
        pos += head + have;
    }
}

/// What a connection must have written for `events` and `error`, as (opcode, payload) with
/// close frames reduced to their code.
fn expected_out(events: &[Ev], error: Option<u16>) -> Vec<(OpCode, Vec<u8>)> {
    let mut v = Vec::new();
    for e in events {
        match e {
            Ev::Ping(p) => v.push((OpCode::Pong, p.clone())),
            Ev::Close(code, _) => v.push((OpCode::Close, code.map_or(vec![], |c| c.to_be_bytes().to_vec()))),
            _ => {}
        }
    }
    if let Some(code) = error {
        v.push((OpCode::Close, code.to_be_bytes().to_vec()));
    }
    v
}

/// Checks an outcome against the reference decoder. With `local_close`, this end has sent a
/// close frame before anything arrives: then only the peer's close is reported, nothing is
/// answered, and errors send no second close frame.
fn check_against_model(
    role: Role,
    stream: &[u8],
    cuts: &[usize],
    max_message: usize,
    local_close: bool,
) -> Result<(), TestCaseError> {
    let mut conn = Connection::open(role, 0);
    let mut first = Vec::new();
    if local_close {
        conn.close(1000, "", 0, &mut rng(), &mut first).unwrap();
        prop_assert_eq!(conn.state(), State::LocalClosing);
    }
    let got = feed_conn(conn, stream, cuts, max_message);
    let (mut events, error) = model(role, stream, max_message);
    if local_close {
        events.retain(|e| matches!(e, Ev::Close(..)));
    }
    prop_assert_eq!(&got.events, &events);
    prop_assert_eq!(got.error, error);
    let closed = error.is_some() || matches!(events.last(), Some(Ev::Close(..)));
    let open = if local_close { State::LocalClosing } else { State::Open };
    prop_assert_eq!(got.state, if closed { State::Closed } else { open });
    let written = written_frames(&got.out);
    if local_close {
        prop_assert!(written.is_empty(), "wrote {:?} while closing", written);
        return Ok(());
    }
    for w in &written {
        prop_assert!(w.0, "only whole frames are written");
        prop_assert_eq!(w.2, role == Role::Client, "only clients mask");
        if w.1 == OpCode::Close && w.3.len() > 2 {
            prop_assert!(std::str::from_utf8(&w.3[2..]).is_ok());
        }
    }
    let reduced: Vec<(OpCode, Vec<u8>)> = written
        .into_iter()
        .map(|(_, op, _, mut p)| {
            if op == OpCode::Close {
                p.truncate(2);
            }
            (op, p)
        })
        .collect();
    prop_assert_eq!(reduced, expected_out(&events, error));
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Streams of plausible frames, some of them wrong.

/// A frame as sent, possibly breaking rules: any first byte, mask or no mask, any payload.
#[derive(Clone, Debug)]
struct RawFrame {
    b0: u8,
    masked: bool,
    key: [u8; 4],
    payload: Vec<u8>,
}

/// Close frame payloads, valid and not: codes near the edges of the valid ranges, reasons that
/// are sometimes not UTF-8, and lengths 0 and 1.
fn close_payload() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        4 => (
            prop_oneof![
                prop::sample::select(vec![
                    0u16, 999, 1000, 1001, 1002, 1003, 1004, 1005, 1006, 1007, 1011, 1012, 1014, 1015, 1016, 2999,
                    3000, 4999, 5000,
                ]),
                any::<u16>(),
            ],
            prop_oneof![4 => "[a-zé€]{0,8}".prop_map(String::into_bytes), 1 => vec(any::<u8>(), 0..4)],
        )
            .prop_map(|(code, reason)| {
                let mut v = code.to_be_bytes().to_vec();
                v.extend_from_slice(&reason);
                v
            }),
        1 => vec(any::<u8>(), 0..2),
    ]
}

/// Any single frame, often breaking a rule.
fn raw_frame(role: Role) -> impl Strategy<Value = RawFrame> {
    let opcode = prop_oneof![
        12 => prop::sample::select(vec![0u8, 1, 2, 8, 9, 10]),
        1 => 0u8..16,
    ];
    let rsv = prop_oneof![40 => Just(0u8), 1 => 1u8..8];
    let payload = prop_oneof![
        4 => any::<String>().prop_map(String::into_bytes),
        2 => vec(any::<u8>(), 0..24),
        2 => close_payload(),
        1 => vec(any::<u8>(), 120..300),
    ];
    let right_mask = role == Role::Server;
    (
        prop::bool::weighted(0.75),
        rsv,
        opcode,
        prop::bool::weighted(0.97),
        any::<[u8; 4]>(),
        payload,
    )
        .prop_map(move |(fin, rsv, op, mask_ok, key, payload)| RawFrame {
            b0: (u8::from(fin) << 7) | (rsv << 4) | op,
            masked: mask_ok == right_mask,
            key,
            payload,
        })
}

/// A frame that follows the rules (except perhaps in its payload).
fn good_frame(role: Role, fin: bool, op: u8, key: [u8; 4], payload: Vec<u8>) -> RawFrame {
    RawFrame {
        b0: (u8::from(fin) << 7) | op,
        masked: role == Role::Server,
        key,
        payload,
    }
}

/// A whole message as frames: possibly fragmented, possibly with a control frame between two
/// fragments; text payloads are usually valid UTF-8 cut anywhere.
fn message_frames(role: Role) -> impl Strategy<Value = Vec<RawFrame>> {
    let payload = prop_oneof![
        4 => any::<String>().prop_map(|s| (true, s.into_bytes())),
        1 => vec(any::<u8>(), 0..40).prop_map(|b| (true, b)),
        3 => vec(any::<u8>(), 0..40).prop_map(|b| (false, b)),
        1 => vec(any::<u8>(), 120..400).prop_map(|b| (false, b)),
    ];
    let control = (
        prop::sample::select(vec![9u8, 10]),
        vec(any::<u8>(), 0..=125),
        any::<[u8; 4]>(),
    );
    (
        payload,
        vec(any::<Index>(), 0..4),
        any::<[u8; 4]>(),
        proptest::option::of((any::<Index>(), control)),
    )
        .prop_map(move |((text, payload), idx, key, between)| {
            let cuts = cut_points(payload.len(), &idx);
            let bounds: Vec<usize> = std::iter::once(0).chain(cuts).chain([payload.len()]).collect();
            let pieces = bounds.len() - 1;
            let mut frames = Vec::new();
            for i in 0..pieces {
                let op = match (i, text) {
                    (0, true) => 1,
                    (0, false) => 2,
                    _ => 0,
                };
                let part = payload[bounds[i]..bounds[i + 1]].to_vec();
                frames.push(good_frame(role, i + 1 == pieces, op, key, part));
            }
            if let Some((at, (op, p, key))) = between {
                let at = at.index(frames.len());
                frames.insert(at + 1, good_frame(role, true, op, key, p));
            }
            frames
        })
}

/// A stream that is mostly right: messages and control frames, then a few random edits.
fn plausible_stream(role: Role) -> impl Strategy<Value = Vec<RawFrame>> {
    let control = prop_oneof![
        3 => (prop::sample::select(vec![9u8, 10]), vec(any::<u8>(), 0..=125)),
        1 => close_payload().prop_map(|p| (8u8, p)),
    ];
    let unit = prop_oneof![
        6 => message_frames(role),
        2 => (control, any::<[u8; 4]>()).prop_map(move |((op, p), key)| vec![good_frame(role, true, op, key, p)]),
        1 => raw_frame(role).prop_map(|f| vec![f]),
    ];
    let edit = (0u8..6, any::<Index>(), any::<u8>(), raw_frame(role));
    (vec(unit, 0..8), prop_oneof![2 => Just(vec![]), 1 => vec(edit, 1..3)]).prop_map(|(units, edits)| {
        let mut frames: Vec<RawFrame> = units.into_iter().flatten().collect();
        for (kind, at, byte, raw) in edits {
            if frames.is_empty() {
                frames.push(raw);
                continue;
            }
            let i = at.index(frames.len());
            let f = &mut frames[i];
            match kind {
                0 => f.b0 ^= 0x80, // toggle FIN
                1 => f.b0 = byte,
                2 => f.masked = !f.masked,
                3 if !f.payload.is_empty() => {
                    let j = usize::from(byte) % f.payload.len();
                    f.payload[j] ^= byte | 1;
                }
                4 => {
                    frames.remove(i);
                }
                _ => frames.insert(i, raw),
            }
        }
        frames
    })
}

fn encode_raw(frames: &[RawFrame], garbage: &[u8]) -> Vec<u8> {
    let mut v = Vec::new();
    for f in frames {
        let start = v.len();
        write_frame(&mut v, true, OpCode::Binary, f.masked.then_some(f.key), &f.payload);
        v[start] = f.b0;
    }
    v.extend_from_slice(garbage);
    v
}

fn role() -> impl Strategy<Value = Role> {
    prop_oneof![Just(Role::Server), Just(Role::Client)]
}

// ---------------------------------------------------------------------------------------------
// Round trips, by opcode and payload length class.

/// What was sent: one message or control frame.
#[derive(Clone, Debug)]
enum Sent {
    Text(String),
    Binary(Vec<u8>),
    Ping(Vec<u8>),
    Pong(Vec<u8>),
    Close(Option<(u16, String)>),
    /// A message sent as several frames, cut at these byte offsets (text may be cut inside a
    /// character), with a ping between two of the fragments if given.
    Fragmented {
        text: bool,
        payload: Vec<u8>,
        cuts: Vec<usize>,
        ping: Option<(usize, Vec<u8>)>,
    },
}

impl Sent {
    /// The frames on the wire, each masked with its own key derived from `key` when given.
    fn encode(&self, key: Option<[u8; 4]>) -> Vec<u8> {
        let mut out = Vec::new();
        let mut n = 0u8;
        let mut frame = |out: &mut Vec<u8>, fin: bool, op: OpCode, payload: &[u8]| {
            let mask = key.map(|k| [k[0], k[1], k[2] ^ n, k[3].wrapping_add(n)]);
            n = n.wrapping_add(1);
            write_frame(out, fin, op, mask, payload);
        };
        match self {
            Sent::Text(t) => frame(&mut out, true, OpCode::Text, t.as_bytes()),
            Sent::Binary(b) => frame(&mut out, true, OpCode::Binary, b),
            Sent::Ping(p) => frame(&mut out, true, OpCode::Ping, p),
            Sent::Pong(p) => frame(&mut out, true, OpCode::Pong, p),
            Sent::Close(None) => frame(&mut out, true, OpCode::Close, b""),
            Sent::Close(Some((code, reason))) => {
                let mut p = code.to_be_bytes().to_vec();
                p.extend_from_slice(reason.as_bytes());
                frame(&mut out, true, OpCode::Close, &p);
            }
            Sent::Fragmented {
                text,
                payload,
                cuts,
                ping,
            } => {
                let bounds: Vec<usize> = std::iter::once(0)
                    .chain(cuts.iter().copied())
                    .chain([payload.len()])
                    .collect();
                let pieces = bounds.len() - 1;
                for i in 0..pieces {
                    let op = match (i, text) {
                        (0, true) => OpCode::Text,
                        (0, false) => OpCode::Binary,
                        _ => OpCode::Continuation,
                    };
                    frame(&mut out, i + 1 == pieces, op, &payload[bounds[i]..bounds[i + 1]]);
                    if let Some((after, p)) = ping {
                        if *after == i && i + 1 < pieces {
                            frame(&mut out, true, OpCode::Ping, p);
                        }
                    }
                }
            }
        }
        out
    }

    /// The events a receiver reports.
    fn events(&self) -> Vec<Ev> {
        match self {
            Sent::Text(t) => vec![Ev::Text(t.clone())],
            Sent::Binary(b) => vec![Ev::Binary(b.clone())],
            Sent::Ping(p) => vec![Ev::Ping(p.clone())],
            Sent::Pong(p) => vec![Ev::Pong(p.clone())],
            Sent::Close(None) => vec![Ev::Close(None, String::new())],
            Sent::Close(Some((code, reason))) => vec![Ev::Close(Some(*code), reason.clone())],
            Sent::Fragmented {
                text,
                payload,
                cuts,
                ping,
            } => {
                let mut v = Vec::new();
                if let Some((after, p)) = ping {
                    if *after < cuts.len() {
                        v.push(Ev::Ping(p.clone()));
                    }
                }
                v.push(if *text {
                    Ev::Text(String::from_utf8(payload.clone()).unwrap())
                } else {
                    Ev::Binary(payload.clone())
                });
                v
            }
        }
    }

    fn is_close(&self) -> bool {
        matches!(self, Sent::Close(_))
    }
}

/// A tiny deterministic generator, so large payloads come from one seed instead of one proptest
/// value per byte.
struct SplitMix(u64);

impl SplitMix {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
}

fn bytes_from_seed(len: usize, seed: u64) -> Vec<u8> {
    let mut rng = SplitMix(seed);
    let mut v = Vec::with_capacity(len + 8);
    while v.len() < len {
        v.extend_from_slice(&rng.next().to_le_bytes());
    }
    v.truncate(len);
    v
}

/// A string of exactly `len` bytes made of `alphabet`'s characters (padded with ASCII where the
/// next one does not fit).
fn text_from_seed(len: usize, alphabet: &[char], seed: u64) -> String {
    let mut rng = SplitMix(seed);
    let mut s = String::with_capacity(len);
    while s.len() < len {
        let c = alphabet[(rng.next() % alphabet.len() as u64) as usize];
        if s.len() + c.len_utf8() <= len {
            s.push(c);
        } else {
            s.push('a');
        }
    }
    s
}

fn text_of(len: std::ops::RangeInclusive<usize>) -> impl Strategy<Value = String> {
    (len, vec(any::<char>(), 1..12), any::<u64>()).prop_map(|(n, alphabet, seed)| text_from_seed(n, &alphabet, seed))
}

fn bytes_of(len: std::ops::RangeInclusive<usize>) -> impl Strategy<Value = Vec<u8>> {
    (len, any::<u64>()).prop_map(|(n, seed)| bytes_from_seed(n, seed))
}

fn fragmented(len: std::ops::RangeInclusive<usize>) -> impl Strategy<Value = Sent> {
    (
        prop_oneof![
            text_of(len.clone()).prop_map(|t| (true, t.into_bytes())),
            bytes_of(len).prop_map(|b| (false, b)),
        ],
        vec(any::<Index>(), 1..6),
        proptest::option::of((0usize..6, vec(any::<u8>(), 0..=125))),
    )
        .prop_map(|((text, payload), idx, ping)| {
            let cuts = cut_points(payload.len(), &idx);
            Sent::Fragmented {
                text,
                payload,
                cuts,
                ping,
            }
        })
}

/// Data messages (whole and fragmented) with payloads in `len`.
fn data_message(len: std::ops::RangeInclusive<usize>) -> impl Strategy<Value = Sent> {
    prop_oneof![
        text_of(len.clone()).prop_map(Sent::Text),
        bytes_of(len.clone()).prop_map(Sent::Binary),
        fragmented(len),
    ]
}

/// Everything with a payload of at most 125 bytes, control frames included.
fn small_message() -> impl Strategy<Value = Sent> {
    let close = proptest::option::of((
        prop_oneof![1000u16..=1003, 1007u16..=1014, 3000u16..=4999],
        text_of(0..=123),
    ));
    prop_oneof![
        2 => text_of(0..=125).prop_map(Sent::Text),
        1 => vec(any::<char>(), 0..=31).prop_map(|cs| Sent::Text(cs.into_iter().collect())), // <= 124 bytes
        2 => vec(any::<u8>(), 0..=125).prop_map(Sent::Binary),
        1 => vec(any::<u8>(), 0..=125).prop_map(Sent::Ping),
        1 => vec(any::<u8>(), 0..=125).prop_map(Sent::Pong),
        1 => close.prop_map(Sent::Close),
        2 => fragmented(0..=125),
    ]
}

/// Sends `sent` masked to a server or unmasked to a client, and checks the receiver reports
/// exactly what was sent (and answers pings and closes). `cuts_for` gets the length on the wire
/// and returns the single cuts to try (two `receive` calls each) and one set of cuts to apply
/// together.
fn round_trip(
    sent: &Sent,
    masked: bool,
    key: [u8; 4],
    cuts_for: impl Fn(usize) -> (Vec<usize>, Vec<usize>),
) -> Result<(), TestCaseError> {
    let (role, mask) = if masked {
        (Role::Server, Some(key))
    } else {
        (Role::Client, None)
    };
    let wire = sent.encode(mask);
    let (cuts, extra_cuts) = cuts_for(wire.len());
    let want = sent.events();
    let check = |cuts: &[usize]| -> Result<(), TestCaseError> {
        let got = feed(role, &wire, cuts, BIG);
        prop_assert_eq!(got.error, None, "cuts {:?}", cuts);
        prop_assert!(got.events == want, "cuts {:?}: got {:?}", cuts, got.events);
        prop_assert_eq!(got.state, if sent.is_close() { State::Closed } else { State::Open });
        prop_assert!(!got.buffering, "parser state left after a complete message");
        let written = written_frames(&got.out);
        let expect: Vec<(OpCode, Vec<u8>)> = want
            .iter()
            .filter_map(|e| match e {
                Ev::Ping(p) => Some((OpCode::Pong, p.clone())),
                Ev::Close(code, _) => Some((OpCode::Close, code.map_or(vec![], |c| c.to_be_bytes().to_vec()))),
                _ => None,
            })
            .collect();
        let got_out: Vec<(OpCode, Vec<u8>)> = written.iter().map(|w| (w.1, w.3.clone())).collect();
        prop_assert_eq!(got_out, expect);
        prop_assert!(written.iter().all(|w| w.2 == (role == Role::Client)));
        Ok(())
    };
    for k in cuts {
        check(&[k])?;
    }
    if !extra_cuts.is_empty() {
        check(&extra_cuts)?;
    }
    Ok(())
}

/// Every cut of a small frame sequence.
fn every_cut(len: usize) -> Vec<usize> {
    (0..=len).collect()
}

/// Cuts for a large frame sequence: around the first header, at the end, and random ones.
fn some_cuts(len: usize, idx: &[Index]) -> Vec<usize> {
    let mut cuts: Vec<usize> = (0..=15.min(len)).chain(len.saturating_sub(2)..=len).collect();
    cuts.extend(idx.iter().map(|i| i.index(len + 1)));
    cuts.sort_unstable();
    cuts.dedup();
    cuts
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn round_trip_small(sent in small_message(), masked in any::<bool>(), key in any::<[u8; 4]>()) {
        round_trip(&sent, masked, key, |len| (every_cut(len), vec![]))?;
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(4000))]

    #[test]
    fn utf8_validator_agrees_with_std(bytes in utf8ish(), idx in vec(any::<Index>(), 0..6)) {
        let cuts = cut_points(bytes.len(), &idx);
        let mut v = Utf8Validator::new();
        let mut start = 0;
        let mut failed = false;
        for end in cuts.iter().copied().chain([bytes.len()]) {
            let r = v.feed(&bytes[start..end]);
            // Fails exactly when the bytes so far cannot begin any valid text.
            let hopeless = std::str::from_utf8(&bytes[..end]).is_err_and(|e| e.error_len().is_some());
            prop_assert_eq!(r.is_err(), hopeless, "piece {}..{} of {:x?}", start, end, bytes);
            start = end;
            if r.is_err() {
                failed = true;
                break;
            }
        }
        if !failed {
            prop_assert_eq!(v.finish().is_ok(), std::str::from_utf8(&bytes).is_ok(), "{:x?}", bytes);
            // finish resets for the next message.
            prop_assert!(v.feed(b"ok").is_ok() && v.finish().is_ok());
        } else {
            prop_assert!(std::str::from_utf8(&bytes).is_err());
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn round_trip_medium(
        sent in data_message(126..=65535),
        masked in any::<bool>(),
        key in any::<[u8; 4]>(),
        idx in vec(any::<Index>(), 6),
        extra in vec(any::<Index>(), 1..12),
    ) {
        round_trip(&sent, masked, key, |len| (some_cuts(len, &idx), cut_points(len, &extra)))?;
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(16))]

    #[test]
    fn round_trip_large(
        sent in data_message(65536..=200_000),
        masked in any::<bool>(),
        key in any::<[u8; 4]>(),
        idx in vec(any::<Index>(), 3),
        extra in vec(any::<Index>(), 1..12),
    ) {
        round_trip(&sent, masked, key, |len| (some_cuts(len, &idx), cut_points(len, &extra)))?;
    }
}

/// Byte strings that are often valid UTF-8, often almost valid, sometimes noise.
fn utf8ish() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        any::<String>().prop_map(String::into_bytes),
        vec(any::<u8>(), 0..48),
        vec(
            prop::sample::select(vec![
                0x41u8, 0x7f, 0x80, 0xbf, 0xc0, 0xc2, 0xdf, 0xe0, 0xed, 0xef, 0xf0, 0xf4, 0xf5, 0xff, 0x9f, 0xa0
            ]),
            0..16
        ),
        (any::<String>(), any::<Index>(), any::<u8>()).prop_map(|(s, i, b)| {
            let mut v = s.into_bytes();
            if !v.is_empty() {
                let at = i.index(v.len());
                v[at] = b;
            }
            v
        }),
        (any::<String>(), any::<Index>()).prop_map(|(s, i)| {
            // Truncated, possibly inside a character.
            let mut v = s.into_bytes();
            let at = i.index(v.len() + 1);
            v.truncate(at);
            v
        }),
    ]
}

// ---------------------------------------------------------------------------------------------
// Robustness: arbitrary input never panics, and agrees with the reference decoder.

const REQUEST: &str = "GET /chat HTTP/1.1\r\nHost: server.example.com\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nOrigin: http://example.com\r\nSec-WebSocket-Protocol: chat, superchat\r\nSec-WebSocket-Version: 13\r\n\r\n";
const RESPONSE: &str = "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\nSec-WebSocket-Protocol: chat\r\n\r\n";
const KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";

/// Valid heads with bytes changed, cut, or extra header lines: inputs that get past the HTTP parser.
fn head_like(base: &'static str) -> impl Strategy<Value = Vec<u8>> {
    let header = (
        prop::sample::select(vec![
            "Host",
            "Upgrade",
            "Connection",
            "Sec-WebSocket-Key",
            "Sec-WebSocket-Version",
            "Sec-WebSocket-Protocol",
            "Sec-WebSocket-Accept",
            "Sec-WebSocket-Extensions",
            "Origin",
            "X-Other",
        ]),
        prop_oneof![
            "[ -~]{0,30}",
            Just("websocket".to_owned()),
            Just("Upgrade".to_owned()),
            Just("13".to_owned()),
            Just(KEY.to_owned()),
        ],
    );
    prop_oneof![
        (vec(header, 0..6), any::<Index>()).prop_map(move |(hs, at)| {
            let lines: Vec<usize> = base.match_indices("\r\n").map(|(i, _)| i + 2).collect();
            let at = lines[at.index(lines.len())];
            let mut v = base.as_bytes()[..at].to_vec();
            for (name, value) in hs {
                v.extend_from_slice(format!("{name}: {value}\r\n").as_bytes());
            }
            v.extend_from_slice(&base.as_bytes()[at..]);
            v
        }),
        vec((any::<Index>(), any::<u8>()), 1..4).prop_map(move |edits| {
            let mut v = base.as_bytes().to_vec();
            for (i, b) in edits {
                let at = i.index(v.len());
                v[at] = b;
            }
            v
        }),
        vec(any::<u8>(), 0..4096),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn parse_request_never_panics(bytes in vec(any::<u8>(), 0..4096), like in head_like(REQUEST)) {
        for input in [&bytes, &like] {
            if let Ok(Some((req, n))) = handshake::parse_request(input) {
                prop_assert!(n <= input.len());
                // Every accessor works on whatever was accepted.
                let _ = (req.method(), req.path(), req.query(), req.origin(), req.accept_key());
                prop_assert!(req.headers().count() <= handshake::MAX_HEADERS);
                let _ = req.protocols().count() + req.extensions().count();
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn parse_response_never_panics(bytes in vec(any::<u8>(), 0..4096), like in head_like(RESPONSE)) {
        let protocols = ["chat".to_owned()];
        for input in [&bytes, &like] {
            for offered in [&[][..], &protocols[..]] {
                for eof in [false, true] {
                    if let Ok(Some((_, n))) = handshake::parse_response(input, KEY, offered, eof, eof) {
                        prop_assert!(n <= input.len());
                    }
                }
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(1000))]

    #[test]
    fn read_head_does_not_depend_on_cuts(
        like in head_like(REQUEST),
        leftover in vec(any::<u8>(), 0..16),
        idx in vec(any::<Index>(), 0..5),
        max_len in prop_oneof![Just(4096usize), 150usize..260],
    ) {
        let mut data = like.clone();
        data.extend_from_slice(&leftover);
        // What the head is, judged at once on all of it that fits in the limit.
        let whole = handshake::parse_request(&data[..data.len().min(max_len)]);
        let cuts = cut_points(data.len(), &idx);
        let mut conn = Connection::server(0);
        let mut start = 0;
        let mut result = Ok(None);
        let mut consumed = 0;
        for end in cuts.iter().copied().chain([data.len()]) {
            result = read_request(&mut conn, &data[start..end], max_len);
            match &result {
                Ok(None) => consumed = end,
                Ok(Some((_, used))) => {
                    consumed = start + used;
                    break;
                }
                Err(_) => break,
            }
            start = end;
        }
        let finished = !matches!(result, Ok(None));
        match whole {
            Ok(Some((head, n))) => {
                let got: Option<Request> = result.as_ref().ok().and_then(|r| r.as_ref().map(|x| x.0.clone()));
                prop_assert_eq!(got, Some(head), "{:?}", result);
                prop_assert_eq!(consumed, n);
            }
            Ok(None) if data.len() >= max_len => prop_assert_eq!(result, Err(TOO_LARGE)),
            Ok(None) => prop_assert_eq!(result, Ok(None)),
            // The same refusal, however the head was cut.
            Err(rej) => prop_assert_eq!(result, Err(rej)),
        }
        if finished {
            prop_assert!(!conn.is_buffering());
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(1000))]

    #[test]
    fn receive_arbitrary_bytes(
        role in role(),
        bytes in vec(any::<u8>(), 0..4096),
        idx in vec(any::<Index>(), 0..8),
        local_close in prop::bool::weighted(0.2),
    ) {
        // One read, then arbitrary pieces; both agree with the reference decoder.
        check_against_model(role, &bytes, &[], BIG, local_close)?;
        check_against_model(role, &bytes, &cut_points(bytes.len(), &idx), BIG, local_close)?;
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(3000))]

    #[test]
    fn receive_frame_streams(
        (role, frames) in role().prop_flat_map(|r| (Just(r), prop_oneof![
            4 => plausible_stream(r),
            1 => vec(raw_frame(r), 0..12),
        ])),
        garbage in prop_oneof![3 => Just(vec![]), 1 => vec(any::<u8>(), 0..16)],
        idx in vec(any::<Index>(), 0..10),
        max_message in prop_oneof![3 => Just(BIG), 1 => 0usize..300],
        local_close in prop::bool::weighted(0.2),
    ) {
        let stream = encode_raw(&frames, &garbage);
        check_against_model(role, &stream, &[], max_message, local_close)?;
        check_against_model(role, &stream, &cut_points(stream.len(), &idx), max_message, local_close)?;
        // And a byte at a time.
        let every: Vec<usize> = (0..=stream.len()).collect();
        check_against_model(role, &stream, &every, max_message, local_close)?;
    }
}
