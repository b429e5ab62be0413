//! What a permessage-deflate codec counts, with the feature or without it (all zero then).

/// Bytes through a [`Codec`](super::deflate::Codec) since it was made (none without the
/// `deflate` feature).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct CodecStats {
    /// Payload bytes of the messages sent compressed, before compression.
    pub compressed_in: u64,
    /// The same messages' bytes on the wire (compressed).
    pub compressed_out: u64,
    /// Compressed bytes received and inflated.
    pub inflated_in: u64,
    /// What they inflated to.
    pub inflated_out: u64,
    /// Messages at or above the size threshold sent uncompressed because compression did not
    /// make them smaller.
    pub not_smaller: u64,
}
