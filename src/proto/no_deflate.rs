//! permessage-deflate's place in a build without the `deflate` feature: the same names as the
//! real module's codec, holding nothing, answering "not negotiated" (no agreement, nothing
//! compressed, nothing inflated), so that the core has one `read` and one `send` for both
//! builds and compiles to the same code as if the codec were not there.

/// Whether permessage-deflate is compiled in: never here.
pub(crate) const COMPILED: bool = false;

/// What a connection agreed on: nothing, always.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Agreement;

impl Agreement {
    /// Nothing agreed.
    pub(crate) const NONE: Agreement = Agreement;

    /// Whether compression was agreed: never.
    #[inline(always)]
    pub(crate) fn is_agreed(self) -> bool {
        false
    }

    /// The peer's window bits (unused: nothing is agreed).
    #[inline(always)]
    pub(crate) fn recv_bits(self) -> u8 {
        8
    }

    /// What was agreed: nothing.
    #[inline(always)]
    pub(crate) fn agreed(self, _recv_context_takeover: bool) -> Option<Agreed> {
        None
    }
}

/// The parameters a connection agreed on; with the `deflate` feature a connection may have
/// some (see `Connection::deflate`), here none ever does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Agreed;

/// The codec of a loop, zero-sized: it compresses and inflates nothing.
#[derive(Clone, Copy, Debug, Default)]
pub struct Codec {
    _nothing: (),
}

impl Codec {
    /// Nothing to compress with: the message goes as it is.
    #[inline(always)]
    pub(crate) fn compress(&mut self, _agreed: &Agreed, _payload: &[u8]) -> Option<&[u8]> {
        None
    }

    /// Nothing inflates here: no compressed message can have been agreed (RSV1 is refused
    /// while the header is parsed).
    #[inline(always)]
    pub(crate) fn decompress(
        &mut self,
        _window: Option<&mut InflateWindow>,
        _message: &[u8],
        _max_len: usize,
        _out: &mut alloc::vec::Vec<u8>,
    ) -> Result<(), InflateError> {
        Err(InflateError::Corrupt)
    }

    /// Compressed and inflated so far: nothing.
    pub fn stats(&self) -> CodecStats {
        CodecStats::default()
    }

    /// Large inflate output released since the last call: none.
    #[allow(dead_code)] // only the engine (server and bench builds) asks
    #[inline(always)]
    pub(crate) fn take_released(&mut self) -> usize {
        0
    }
}

pub use super::codec_stats::CodecStats;

/// A peer's window kept between messages: none can exist without the feature (a connection
/// holding `Option<InflateWindow>` holds nothing for it).
#[derive(Clone, Copy, Debug)]
pub(crate) enum InflateWindow {}

impl InflateWindow {
    /// The window kept for the peer: none.
    #[inline(always)]
    pub(crate) fn kept(_slot: &mut Option<InflateWindow>, _window_bits: u8) -> Option<&mut InflateWindow> {
        None
    }

    pub(crate) fn heap_bytes(&self) -> usize {
        match *self {}
    }
}

/// Why a message did not inflate.
#[derive(Clone, Copy, Debug)]
pub(crate) enum InflateError {
    /// Too big (close 1009).
    #[allow(dead_code)] // matched by the core as the real codec's is
    TooBig,
    /// Not DEFLATE data (close 1007).
    Corrupt,
}
