//! An owned copy of the protocol core's events, for the `proto_*` tests.

use wsloop::proto::{Event, Payload};

/// An owned copy of an [`Event`], so events can be collected and compared after `receive`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Ev {
    Text(String),
    Binary(Vec<u8>),
    Ping(Vec<u8>),
    Pong(Vec<u8>),
    Close(Option<u16>, String),
}

impl From<Event<'_>> for Ev {
    fn from(e: Event<'_>) -> Ev {
        match e {
            Event::Message(Payload::Text(t)) => Ev::Text(t.to_owned()),
            Event::Message(Payload::OwnedText(t)) => Ev::Text(t),
            Event::Message(Payload::Binary(b)) => Ev::Binary(b.to_vec()),
            Event::Message(Payload::OwnedBinary(b)) => Ev::Binary(b),
            Event::Ping(p) => Ev::Ping(p.as_bytes().to_vec()),
            Event::Pong(p) => Ev::Pong(p.as_bytes().to_vec()),
            Event::Close { code, reason } => Ev::Close(code, reason.as_str().to_owned()),
            Event::Request(_) | Event::Open(_) => panic!("a handshake event where frames were expected: {e:?}"),
        }
    }
}

/// A random source for client-role connections in tests.
pub fn rng() -> wsloop::proto::rand::OsSeeded {
    wsloop::proto::rand::OsSeeded::new().expect("OS random source")
}

/// Protocol settings with a message limit of `max_message`.
pub fn cfg(max_message: usize) -> wsloop::proto::Config {
    let mut c = wsloop::proto::Config::default();
    c.max_message = max_message;
    c
}

/// The protocol error inside a connection error.
#[track_caller]
pub fn protocol(e: wsloop::proto::Error) -> wsloop::proto::ProtocolError {
    match e {
        wsloop::proto::Error::Protocol(p) => p,
        other => panic!("not a protocol error: {other:?}"),
    }
}

/// Feeds `data` to a server connection waiting for its request: the request and how many
/// bytes of `data` it used, `None` while incomplete, or the refusal. `max_head` limits it.
pub fn read_request(
    conn: &mut wsloop::proto::Connection,
    data: &[u8],
    max_head: usize,
) -> Result<Option<(wsloop::proto::Request, usize)>, wsloop::proto::Reject> {
    let mut c = wsloop::proto::Config::default();
    c.max_head = max_head;
    let mut data = data.to_vec();
    let mut out = Vec::new();
    match conn.read(&c, 0, &mut data, &mut wsloop::proto::rand::NoRandom, &mut out) {
        Ok((used, Some(Event::Request(req)))) => Ok(Some((*req, used))),
        Ok((_, None)) => Ok(None),
        Ok((_, Some(other))) => panic!("not a request: {other:?}"),
        Err(wsloop::proto::Error::Rejected(r)) => Err(r),
        Err(other) => panic!("not a refusal: {other:?}"),
    }
}

/// The refusal of a head over the limit.
pub const TOO_LARGE: wsloop::proto::Reject = wsloop::proto::Reject::new(431, "request head too large");
