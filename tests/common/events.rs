//! An owned copy of the protocol core's events, for the `proto_*` tests.

use wsloop::proto::{Event, Message};

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
            Event::Message(Message::Text(t)) => Ev::Text(t.to_owned()),
            Event::Message(Message::Binary(b)) => Ev::Binary(b.to_vec()),
            Event::Ping(p) => Ev::Ping(p.to_vec()),
            Event::Pong(p) => Ev::Pong(p.to_vec()),
            Event::Close { code, reason } => Ev::Close(code, reason.to_owned()),
        }
    }
}
