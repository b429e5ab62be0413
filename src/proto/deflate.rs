//! permessage-deflate (RFC 7692): negotiation for both roles, and a codec that one event loop
//! shares between all its connections.
//!
//! # Zero bytes at rest
//!
//! The server accepts an offer with `server_no_context_takeover` and `client_no_context_takeover`,
//! which RFC 7692 lets it add to any offer it accepts (§7.1.1.1, §7.1.1.2). Every message is then
//! a DEFLATE stream of its own, so one [`Compressor`] and one [`Decompressor`] per loop serve every
//! connection, and an idle connection holds no compression state. The client compresses each
//! message on its own too (always allowed, and promised by [`CLIENT_OFFER`]); only a client whose
//! server keeps its context needs state per connection, an [`InflateWindow`]: the last
//! 2^`server_max_window_bits` bytes it received, at most 32 KiB, growing with what it receives.
//!
//! The core buffers the compressed frames of one message per connection and hands the whole
//! message to [`Decompressor::decompress`], since a shared decompressor cannot wait between reads.
//!
//! # Implementation
//!
//! flate2 over C zlib, linked statically. miniz_oxide cannot compress with a window below 15 bits
//! (zlib rejected its output at 9..=14), so it cannot honour `server_max_window_bits` or
//! `client_max_window_bits`. zlib-rs can, and compresses 64 KiB messages 2 to 3 times faster at
//! level 6, but it added 93 KB to a stripped binary against 49 KB, and takes 380 KB per compressor
//! and 47.5 KB per decompressor against 268 KB and 7.3 KB (+ 32 KiB on first use) for C zlib.
//!
//! zlib does not compress raw DEFLATE with a 256-byte window (`deflateInit2` rejects 8 bits for
//! raw streams, and flate2 takes 9..=15), so the server declines an offer that demands it, and a
//! client told to use it sends uncompressed messages ([`Agreed::should_compress`]). Inflating
//! needs no such care: a 32 KiB window decodes a stream made with any smaller one.

use std::fmt;

use flate2::{Decompress, FlushDecompress, Status};

#[cfg(test)]
use flate2::{Compress, Compression, FlushCompress};

/// The extension's name in `Sec-WebSocket-Extensions`.
pub const EXTENSION: &str = "permessage-deflate";

/// The client's `Sec-WebSocket-Extensions` value.
///
/// `client_max_window_bits` lets the server cap the client's window (RFC 7692 §7.1.2.2).
/// `client_no_context_takeover` is a hint that the client compresses every message on its own
/// (§7.1.1.2), which it always does; some servers (Autobahn's 13.2, 13.5 and 13.6) accept only
/// offers that carry it.
pub const CLIENT_OFFER: &str = "permessage-deflate; client_no_context_takeover; client_max_window_bits";

/// The smallest window zlib compresses raw DEFLATE with, in bits.
pub const MIN_WINDOW_BITS: u8 = 9;

/// The largest window RFC 7692 allows, in bits (32 KiB).
pub const MAX_WINDOW_BITS: u8 = 15;

/// Messages shorter than this are sent uncompressed by default: compact JSON messages grew under
/// deflate below it (48 bytes came out as 49.7 on average), broke even at it (63.9) and shrank
/// from 72 bytes on (70.2).
pub const DEFAULT_MIN_SIZE: usize = 64;

/// The default zlib level. Against level 6, level 1 compressed 64 KiB of text 4 to 6 times
/// faster for output 15 to 23 % larger, and 1 KiB JSON messages 25 % faster for output 4 to 7 %
/// larger; one loop compresses for all its connections.
pub const DEFAULT_LEVEL: u32 = 1;

/// What a sync flush ends with; removed by the sender and appended by the receiver (§7.2.1).
const TAIL: [u8; 4] = [0x00, 0x00, 0xff, 0xff];

/// The window of the shared decompressor: it decodes a peer's stream of any window size.
const WINDOW: usize = 1 << MAX_WINDOW_BITS;

// ---------------------------------------------------------------------------------------------
// Negotiation
// ---------------------------------------------------------------------------------------------

/// The parameters one connection agreed on, from this endpoint's side.
///
/// This endpoint compresses every message on its own whatever was agreed, so only the peer's
/// context takeover matters.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Agreed {
    /// The largest window this endpoint may compress with, in bits (8..=15). 8 only on a client
    /// whose server asked for it; zlib cannot, so such a client sends uncompressed messages.
    pub send_window_bits: u8,
    /// The largest window the peer compresses with, in bits (8..=15).
    pub recv_window_bits: u8,
    /// The peer keeps its LZ77 window from one message to the next: decompress with
    /// [`Decompressor::decompress_with_context`] and an [`InflateWindow`] for this connection.
    /// Never true on the server.
    pub recv_context_takeover: bool,
}

/// Whether permessage-deflate is compiled in (without the feature, the core's placeholder
/// answers `false`).
pub(crate) const COMPILED: bool = true;

/// What a connection agreed on, in one byte: this end's window bits in the low nibble, the
/// peer's in the high one (each 8..=15); 0 when nothing was agreed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Agreement(u8);

impl Agreement {
    /// Nothing agreed.
    pub(crate) const NONE: Agreement = Agreement(0);

    /// The byte for `a`.
    pub(crate) fn new(a: &Agreed) -> Self {
        let bits = |b: u8| b.clamp(8, MAX_WINDOW_BITS);
        Agreement(bits(a.send_window_bits) | bits(a.recv_window_bits) << 4)
    }

    /// Whether compression was agreed.
    #[inline(always)]
    pub(crate) fn is_agreed(self) -> bool {
        self.0 != 0
    }

    /// The peer's window bits.
    pub(crate) fn recv_bits(self) -> u8 {
        self.0 >> 4
    }

    /// What was agreed, if anything; whether the peer keeps its context is kept elsewhere.
    pub(crate) fn agreed(self, recv_context_takeover: bool) -> Option<Agreed> {
        self.is_agreed().then_some(Agreed {
            send_window_bits: self.0 & 0x0f,
            recv_window_bits: self.0 >> 4,
            recv_context_takeover,
        })
    }
}

impl Agreed {
    /// Whether a message of `len` bytes should be sent compressed: at least `min_size` bytes
    /// (e.g. [`DEFAULT_MIN_SIZE`]) and a window zlib can compress with.
    pub fn should_compress(&self, len: usize, min_size: usize) -> bool {
        self.send_window_bits >= MIN_WINDOW_BITS && len >= min_size
    }
}

/// permessage-deflate settings of one endpoint (server, client or load generator).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct DeflateConfig {
    /// Server: accept permessage-deflate when offered. Client: offer it ([`CLIENT_OFFER`]).
    pub enabled: bool,
    /// Server: the largest window it compresses with, in bits (9..=15; clamped). Below 15 it is
    /// announced with `server_max_window_bits`: each compressor then takes less memory
    /// (about 12 KB at 9 bits against 268 KB at 15).
    pub max_window_bits: u8,
    /// Messages shorter than this are sent uncompressed (default [`DEFAULT_MIN_SIZE`]), and so
    /// are longer ones that compression would not make smaller. 0 compresses every message,
    /// even when that makes it larger: some peers expect it (kosoku's Autobahn runner fails
    /// on an uncompressed message where compression was agreed, although RFC 7692 §6 allows
    /// one).
    pub min_size: usize,
    /// The zlib level, 0..=9 (default [`DEFAULT_LEVEL`]).
    pub level: u32,
}

impl Default for DeflateConfig {
    fn default() -> Self {
        DeflateConfig {
            enabled: true,
            max_window_bits: MAX_WINDOW_BITS,
            min_size: DEFAULT_MIN_SIZE,
            level: DEFAULT_LEVEL,
        }
    }
}

impl DeflateConfig {
    /// Compression turned off: a server declines every offer, a client offers nothing.
    pub fn disabled() -> Self {
        DeflateConfig {
            enabled: false,
            ..DeflateConfig::default()
        }
    }
}

/// An offer the server accepted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Accepted {
    /// The agreed parameters, from the server's side.
    pub agreed: Agreed,
    /// The `Sec-WebSocket-Extensions` value to answer with.
    pub response: String,
}

/// The server's choice: the first acceptable `permessage-deflate` offer in the values of every
/// `Sec-WebSocket-Extensions` request header, in order, or `None` to go without compression.
///
/// An offer with an unknown, repeated or invalid parameter, a malformed element, or a demand
/// zlib cannot meet (`server_max_window_bits=8`) is declined (RFC 7692 §7: "MUST decline") and the
/// next one considered; nothing here fails the handshake.
pub fn negotiate_server(headers: &[&[u8]], config: &DeflateConfig) -> Option<Accepted> {
    if !config.enabled {
        return None;
    }
    let max = config.max_window_bits.clamp(MIN_WINDOW_BITS, MAX_WINDOW_BITS);
    let offers = headers.iter().flat_map(|h| elements(h)).filter_map(Result::ok);
    for offer in offers.filter(|e| e.name == EXTENSION.as_bytes()) {
        let Ok(params) = Params::parse(&offer.params, Side::Offer) else {
            continue;
        };
        if params.server_max_window_bits == Some(8) {
            continue; // the server "doesn't support the offered configuration" (§7)
        }
        let send_window_bits = params.server_max_window_bits.unwrap_or(MAX_WINDOW_BITS).min(max);
        // Both context takeovers declined: §7.1.1.1 and §7.1.1.2 let a server add these
        // parameters whether or not the offer had them.
        let mut response = String::from("permessage-deflate; server_no_context_takeover; client_no_context_takeover");
        // §7.1.2.1: an offer with server_max_window_bits is accepted by answering it with the same
        // or a smaller value; the server may also announce one the offer did not ask for.
        if params.server_max_window_bits.is_some() || send_window_bits < MAX_WINDOW_BITS {
            response.push_str("; server_max_window_bits=");
            response.push_str(&send_window_bits.to_string());
        }
        // client_max_window_bits is never answered: the shared decompressor takes any window.
        let recv_window_bits = params.client_max_window_bits.flatten().unwrap_or(MAX_WINDOW_BITS);
        let agreed = Agreed {
            send_window_bits,
            recv_window_bits,
            recv_context_takeover: false,
        };
        return Some(Accepted { agreed, response });
    }
    None
}

/// Why the client must fail the handshake over the server's `Sec-WebSocket-Extensions`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NegotiationError(&'static str);

impl NegotiationError {
    /// What was wrong, in a short sentence.
    pub fn message(&self) -> &'static str {
        self.0
    }
}

impl fmt::Display for NegotiationError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.0)
    }
}

impl std::error::Error for NegotiationError {}

/// The client's check of the server's answer to [`CLIENT_OFFER`]: the values of every
/// `Sec-WebSocket-Extensions` response header. `Ok(None)`: the server declined compression.
///
/// RFC 7692 §7: the client fails the connection if the answer has an extension that was not
/// offered, permessage-deflate more than once, a parameter not defined for a response, a
/// repeated parameter or an invalid value.
pub fn negotiate_client(headers: &[&[u8]]) -> Result<Option<Agreed>, NegotiationError> {
    check_response(headers, CLIENT_OFFER.contains("client_max_window_bits"))
}

fn check_response(headers: &[&[u8]], offered_client_bits: bool) -> Result<Option<Agreed>, NegotiationError> {
    let mut agreed = None;
    for element in headers.iter().flat_map(|h| elements(h)) {
        let element = element.map_err(|()| NegotiationError("malformed Sec-WebSocket-Extensions from the server"))?;
        if element.name != EXTENSION.as_bytes() {
            return Err(NegotiationError("server chose an extension that was not offered"));
        }
        if agreed.is_some() {
            return Err(NegotiationError("server accepted permessage-deflate more than once"));
        }
        let params = Params::parse(&element.params, Side::Response).map_err(NegotiationError)?;
        if params.client_max_window_bits.is_some() && !offered_client_bits {
            // §7.1.2.2: only an answer to an offer that had it may carry it.
            return Err(NegotiationError(
                "server sent client_max_window_bits, which was not offered",
            ));
        }
        agreed = Some(Agreed {
            send_window_bits: params.client_max_window_bits.flatten().unwrap_or(MAX_WINDOW_BITS),
            recv_window_bits: params.server_max_window_bits.unwrap_or(MAX_WINDOW_BITS),
            recv_context_takeover: !params.server_no_context_takeover,
        });
    }
    Ok(agreed)
}

/// Whether parameters come from a client's offer or a server's answer.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Side {
    Offer,
    Response,
}

/// The permessage-deflate parameters of one offer or answer (RFC 7692 §7.1).
#[derive(Default)]
struct Params {
    server_no_context_takeover: bool,
    client_no_context_takeover: bool,
    server_max_window_bits: Option<u8>,
    /// `Some(None)`: present without a value, which only an offer may do.
    client_max_window_bits: Option<Option<u8>>,
}

impl Params {
    fn parse(params: &[Param<'_>], side: Side) -> Result<Params, &'static str> {
        let mut p = Params::default();
        for param in params {
            let value = param.value.as_deref();
            match param.name {
                b"server_no_context_takeover" | b"client_no_context_takeover" => {
                    let flag = if param.name[0] == b's' {
                        &mut p.server_no_context_takeover
                    } else {
                        &mut p.client_no_context_takeover
                    };
                    if *flag {
                        return Err("repeated permessage-deflate parameter");
                    }
                    if value.is_some() {
                        return Err("a no_context_takeover parameter takes no value");
                    }
                    *flag = true;
                }
                b"server_max_window_bits" => {
                    if p.server_max_window_bits.is_some() {
                        return Err("repeated permessage-deflate parameter");
                    }
                    p.server_max_window_bits = Some(window_bits(value.ok_or("server_max_window_bits needs a value")?)?);
                }
                b"client_max_window_bits" => {
                    if p.client_max_window_bits.is_some() {
                        return Err("repeated permessage-deflate parameter");
                    }
                    p.client_max_window_bits = Some(match value {
                        Some(v) => Some(window_bits(v)?),
                        None if side == Side::Offer => None,
                        None => return Err("client_max_window_bits needs a value in an answer"),
                    });
                }
                _ => return Err("unknown permessage-deflate parameter"),
            }
        }
        Ok(p)
    }
}

/// A window size: a decimal integer 8..=15 without leading zeroes (RFC 7692 §7.1.2.1).
fn window_bits(value: &[u8]) -> Result<u8, &'static str> {
    match *value {
        [d @ b'8'..=b'9'] => Ok(d - b'0'),
        [b'1', d @ b'0'..=b'5'] => Ok(10 + d - b'0'),
        _ => Err("window bits must be 8 to 15"),
    }
}

/// One extension in a `Sec-WebSocket-Extensions` list.
struct Element<'a> {
    name: &'a [u8],
    params: Vec<Param<'a>>,
}

/// One `name[=value]` parameter; a quoted value is unescaped.
struct Param<'a> {
    name: &'a [u8],
    value: Option<Vec<u8>>,
}

/// The elements of one header value in order, `Err` for one that breaks the grammar of RFC 6455
/// §9.1. Empty list elements are skipped, as HTTP lists allow them (RFC 9110 §5.6.1).
fn elements(value: &[u8]) -> impl Iterator<Item = Result<Element<'_>, ()>> {
    split_unquoted(value, b',')
        .into_iter()
        .filter(|s| !trim(s).is_empty())
        .map(parse_element)
}

fn parse_element(s: &[u8]) -> Result<Element<'_>, ()> {
    let mut parts = split_unquoted(s, b';').into_iter();
    let name = trim(parts.next().unwrap_or_default());
    if !is_token(name) {
        return Err(());
    }
    let mut params = Vec::new();
    for part in parts {
        let (name, value) = match part.iter().position(|&b| b == b'=') {
            None => (trim(part), None),
            Some(i) => (trim(&part[..i]), Some(param_value(trim(&part[i + 1..]))?)),
        };
        if !is_token(name) {
            return Err(());
        }
        params.push(Param { name, value });
    }
    Ok(Element { name, params })
}

/// A token, or a quoted string that is a token once unescaped (RFC 6455 §9.1).
fn param_value(v: &[u8]) -> Result<Vec<u8>, ()> {
    let value = match v {
        [b'"', inner @ .., b'"'] => {
            let mut out = Vec::with_capacity(inner.len());
            let mut bytes = inner.iter();
            while let Some(&b) = bytes.next() {
                match b {
                    b'\\' => out.push(*bytes.next().ok_or(())?),
                    b'"' => return Err(()),
                    _ => out.push(b),
                }
            }
            out
        }
        _ => v.to_vec(),
    };
    if is_token(&value) {
        Ok(value)
    } else {
        Err(())
    }
}

/// Splits at `sep` outside quoted strings; an unterminated quote runs to the end (and fails later).
fn split_unquoted(s: &[u8], sep: u8) -> Vec<&[u8]> {
    let mut parts = Vec::new();
    let (mut start, mut quoted, mut escaped) = (0, false, false);
    for (i, &b) in s.iter().enumerate() {
        if escaped {
            escaped = false;
        } else if quoted {
            match b {
                b'\\' => escaped = true,
                b'"' => quoted = false,
                _ => {}
            }
        } else if b == b'"' {
            quoted = true;
        } else if b == sep {
            parts.push(&s[start..i]);
            start = i + 1;
        }
    }
    parts.push(&s[start..]);
    parts
}

fn trim(s: &[u8]) -> &[u8] {
    let ows = |b: &u8| *b == b' ' || *b == b'\t';
    let start = s.iter().position(|b| !ows(b)).unwrap_or(s.len());
    let end = s.iter().rposition(|b| !ows(b)).map_or(start, |i| i + 1);
    &s[start..end]
}

/// RFC 9110 §5.6.2 token.
fn is_token(s: &[u8]) -> bool {
    !s.is_empty()
        && s.iter()
            .all(|&b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

// ---------------------------------------------------------------------------------------------
// Codec
// ---------------------------------------------------------------------------------------------

/// The compressor of one loop, shared by every connection: each message is compressed on its
/// own, with the window its peer allows.
///
/// One zlib stream per window size in use, made on first use and kept: making one cost about as
/// much as compressing a 1 KiB message, and most loops see one or two sizes. Each costs about
/// 12 KB (9 bits) to 268 KB (15 bits): its hash table is sized to its window.
pub struct Compressor {
    level: u8,
    /// Index: window bits − 9.
    by_window: [Option<Deflater>; (MAX_WINDOW_BITS - MIN_WINDOW_BITS + 1) as usize],
}

impl Default for Compressor {
    fn default() -> Self {
        Compressor::new(DEFAULT_LEVEL)
    }
}

impl Compressor {
    /// A compressor at zlib `level` (0..=9; above 9 is 9). Allocates nothing until used.
    pub fn new(level: u32) -> Self {
        Compressor {
            level: level.min(9) as u8,
            by_window: Default::default(),
        }
    }

    /// Appends `payload` compressed as one message with a window of at most `window_bits`: raw
    /// DEFLATE ending in a sync flush without its `00 00 ff ff` (RFC 7692 §7.2.1).
    ///
    /// Below 9 bits, where zlib cannot compress, the payload goes into stored blocks (no
    /// back-references, valid under any window); [`Agreed::should_compress`] avoids that case.
    pub fn compress(&mut self, payload: &[u8], window_bits: u8, out: &mut Vec<u8>) {
        if window_bits < MIN_WINDOW_BITS {
            stored_blocks(payload, out);
            return;
        }
        let bits = window_bits.min(MAX_WINDOW_BITS);
        let level = self.level;
        let z = self.by_window[usize::from(bits - MIN_WINDOW_BITS)].get_or_insert_with(|| Deflater::new(level, bits));
        let start = out.len();
        out.reserve(payload.len() / 2 + 64);
        z.sync_flush(payload, out);
        z.reset();
        debug_assert!(out[start..].ends_with(&TAIL));
        out.truncate(out.len() - TAIL.len());
    }
}

/// A zlib raw-DEFLATE compressor whose hash table is sized to its window.
///
/// flate2 makes every compressor with zlib's default `memLevel` 8: a 32 Ki-entry hash table that
/// zlib sweeps each time its window slides, which with a 512-byte window (9 bits) is every 250
/// bytes of input. Compressing took 8 times the CPU at 9 bits as at 15 (Autobahn's cases 13.3,
/// 13.5 and 13.7 against 13.4), 90 % of it in that sweep. Here `memLevel` follows the window
/// (bits − 6, at most 8): at 15 bits it is zlib's default and the output is the same; at 9
/// bits the table has 1 Ki entries, and the stream takes about 12 KB instead of 139 KB
/// (zlib.h: 2^(windowBits+2) + 2^(memLevel+9) bytes, plus its 5.9 KB state).
struct Deflater {
    /// Boxed: zlib's state points back at its stream, which therefore must not move.
    strm: Box<z::z_stream>,
}

use libz_sys as z;

/// Largest input or output handed to zlib in one call (its counts are 32-bit).
const ZLIB_CHUNK: usize = 1 << 30;

extern "C" {
    fn calloc(n: usize, size: usize) -> *mut core::ffi::c_void;
    fn free(p: *mut core::ffi::c_void);
}

/// zlib's allocator: the C library's, as zlib's own default would be.
unsafe extern "C" fn zalloc(_: z::voidpf, items: z::uInt, size: z::uInt) -> z::voidpf {
    // SAFETY: calloc takes any counts and returns null when it cannot allocate, which zlib
    // handles (Z_MEM_ERROR).
    unsafe { calloc(items as usize, size as usize) }
}

/// Frees what [`zalloc`] allocated.
unsafe extern "C" fn zfree(_: z::voidpf, p: z::voidpf) {
    // SAFETY: zlib frees only pointers its zalloc returned, once each.
    unsafe { free(p) }
}

impl Deflater {
    /// A raw stream with a window of `bits` (9..=15) at `level` (0..=9).
    fn new(level: u8, bits: u8) -> Deflater {
        let mem_level = (bits - 6).min(8);
        let mut strm = Box::new(z::z_stream {
            next_in: core::ptr::null_mut(),
            avail_in: 0,
            total_in: 0,
            next_out: core::ptr::null_mut(),
            avail_out: 0,
            total_out: 0,
            msg: core::ptr::null_mut(),
            state: core::ptr::null_mut(),
            zalloc,
            zfree,
            opaque: core::ptr::null_mut(),
            data_type: 0,
            adler: 0,
            reserved: 0,
        });
        // SAFETY: `strm` is a fully initialised stream at a fixed heap address; the version and
        // size are those of the zlib linked in. Negative window bits ask for raw DEFLATE.
        let rc = unsafe {
            z::deflateInit2_(
                &mut *strm,
                i32::from(level),
                z::Z_DEFLATED,
                -i32::from(bits),
                i32::from(mem_level),
                z::Z_DEFAULT_STRATEGY,
                z::zlibVersion(),
                core::mem::size_of::<z::z_stream>() as i32,
            )
        };
        // Fails only on bad parameters (not made here) or when memory runs out, where
        // allocation fails elsewhere too.
        assert_eq!(rc, z::Z_OK, "deflateInit2 failed");
        Deflater { strm }
    }

    /// Appends `input` compressed, ending with a sync flush (`00 00 ff ff`).
    fn sync_flush(&mut self, input: &[u8], out: &mut Vec<u8>) {
        let mut input = input;
        loop {
            out.reserve(64);
            let take = input.len().min(ZLIB_CHUNK);
            let spare = out.spare_capacity_mut();
            let room = spare.len().min(ZLIB_CHUNK);
            let s = &mut *self.strm;
            s.next_in = input.as_ptr().cast_mut();
            s.avail_in = take as z::uInt;
            s.next_out = spare.as_mut_ptr().cast();
            s.avail_out = room as z::uInt;
            // SAFETY: the stream was initialised by `new`; `next_in` points at `take` readable
            // bytes (zlib only reads them) and `next_out` at `room` writable ones, both alive
            // for the call.
            let rc = unsafe {
                z::deflate(
                    s,
                    if take == input.len() {
                        z::Z_SYNC_FLUSH
                    } else {
                        z::Z_NO_FLUSH
                    },
                )
            };
            // zlib fails only on a broken stream, which this one never is; Z_BUF_ERROR says
            // only that no progress was possible this call.
            assert!(rc == z::Z_OK || rc == z::Z_BUF_ERROR, "deflate on a valid stream");
            let written = room - s.avail_out as usize;
            let read = take - s.avail_in as usize;
            s.next_in = core::ptr::null_mut();
            s.next_out = core::ptr::null_mut();
            // SAFETY: zlib initialised the first `written` bytes of the spare capacity.
            unsafe { out.set_len(out.len() + written) };
            input = &input[read..];
            // The flush is complete once zlib has taken all input and had room to spare.
            if input.is_empty() && written < room {
                break;
            }
        }
    }

    /// Starts a new stream (no context kept between messages).
    fn reset(&mut self) {
        // SAFETY: the stream was initialised by `new`.
        unsafe { z::deflateReset(&mut *self.strm) };
    }
}

impl Drop for Deflater {
    fn drop(&mut self) {
        // SAFETY: the stream was initialised by `new` and is ended once, here.
        unsafe { z::deflateEnd(&mut *self.strm) };
    }
}

/// Stored blocks, then the first byte of the empty block a sync flush ends with.
fn stored_blocks(payload: &[u8], out: &mut Vec<u8>) {
    for chunk in payload.chunks(usize::from(u16::MAX)) {
        let len = chunk.len() as u16;
        out.push(0x00); // BFINAL 0, BTYPE 00, padding
        out.extend_from_slice(&len.to_le_bytes());
        out.extend_from_slice(&(!len).to_le_bytes());
        out.extend_from_slice(chunk);
    }
    out.push(0x00);
}

/// Why a compressed message could not be inflated.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InflateError {
    /// The message would inflate past `max_len` (close `1009`).
    TooBig,
    /// Not valid DEFLATE data (close `1007`).
    Corrupt,
}

impl fmt::Display for InflateError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            InflateError::TooBig => "compressed message inflates past the size limit",
            InflateError::Corrupt => "compressed message is not valid DEFLATE data",
        })
    }
}

impl std::error::Error for InflateError {}

/// The decompressor of one loop, shared by every connection: it holds nothing between messages.
///
/// 7.3 KB of zlib state, plus its 32 KiB window from the first message on.
pub struct Decompressor {
    z: Decompress,
    /// How much the last call grew its output buffer (given back already on error).
    grown: usize,
}

impl Default for Decompressor {
    fn default() -> Self {
        Decompressor::new()
    }
}

/// The first output room for a message, before it doubles.
const FIRST_ROOM: usize = 1024;

impl Decompressor {
    /// A decompressor that takes any window size.
    pub fn new() -> Self {
        Decompressor {
            z: Decompress::new_with_window_bits(false, MAX_WINDOW_BITS),
            grown: 0,
        }
    }

    /// Inflates one whole message (the payloads of all its frames, concatenated) from a peer that
    /// does not keep its context, appending it to `out`.
    ///
    /// Stops with [`InflateError::TooBig`] once the output would pass `max_len`; `out` grows with
    /// the output, by doubling, and never beyond `max_len + 1` bytes. On error `out` is left as it
    /// was, its capacity too (a bomb must not leave a buffer of `max_len` behind).
    pub fn decompress(&mut self, message: &[u8], max_len: usize, out: &mut Vec<u8>) -> Result<(), InflateError> {
        self.inflate(&[], message, max_len, out)
    }

    /// [`decompress`](Self::decompress) for a peer that keeps its context: `window` holds what
    /// this connection received last and is brought up to date.
    pub fn decompress_with_context(
        &mut self,
        window: &mut InflateWindow,
        message: &[u8],
        max_len: usize,
        out: &mut Vec<u8>,
    ) -> Result<(), InflateError> {
        let start = out.len();
        self.inflate(&window.data, message, max_len, out)?;
        window.push(&out[start..]);
        Ok(())
    }

    fn inflate(&mut self, dict: &[u8], message: &[u8], max_len: usize, out: &mut Vec<u8>) -> Result<(), InflateError> {
        let (start, capacity) = (out.len(), out.capacity());
        let result = self.run(dict, message, max_len, out, start);
        self.z.reset(false);
        self.grown = out.capacity().saturating_sub(capacity);
        match result {
            Ok(end) => {
                out.truncate(end);
                Ok(())
            }
            Err(e) => {
                out.truncate(start);
                out.shrink_to(capacity);
                Err(e)
            }
        }
    }

    /// Inflates into `out[start..]`, returning where the output ends; `out` is zero-padded past it.
    fn run(
        &mut self,
        dict: &[u8],
        message: &[u8],
        max_len: usize,
        out: &mut Vec<u8>,
        start: usize,
    ) -> Result<usize, InflateError> {
        if message.is_empty() {
            return Ok(start); // an empty payload is an empty message
        }
        if !dict.is_empty() {
            self.z.set_dictionary(dict).map_err(|_| InflateError::Corrupt)?;
        }
        // One byte past the limit is room enough to tell "too big".
        let limit = start.saturating_add(max_len).saturating_add(1);
        let mut filled = start;
        let mut parts = [message, &TAIL[..]];
        let mut i = 0;
        // Each restart copies up to 32 KiB of window: bounded so that tiny final blocks cannot
        // make a short message cost gigabytes of copying.
        let mut restarts_left = 8 + message.len() / 1024;
        while i < parts.len() {
            if filled == out.len() {
                let room = (filled - start).max(FIRST_ROOM);
                let end = filled.saturating_add(room).min(limit);
                out.reserve_exact(end - out.len());
                out.resize(end, 0);
            }
            let (in_before, out_before) = (self.z.total_in(), self.z.total_out());
            let status = self
                .z
                .decompress(parts[i], &mut out[filled..], FlushDecompress::None)
                .map_err(|_| InflateError::Corrupt)?;
            let used = (self.z.total_in() - in_before) as usize;
            let made = (self.z.total_out() - out_before) as usize;
            parts[i] = &parts[i][used..];
            filled += made;
            if filled - start > max_len {
                return Err(InflateError::TooBig);
            }
            if status == Status::StreamEnd {
                // A block with BFINAL set ends zlib's stream, but more blocks may follow in the
                // message (RFC 7692 §7.2.3.4): go on as a new stream over the same window.
                if restarts_left == 0 {
                    return Err(InflateError::Corrupt);
                }
                restarts_left -= 1;
                self.restart(dict, &out[start..filled])?;
            } else if parts[i].is_empty() && filled < out.len() {
                i += 1; // all taken, nothing held back
            } else if used == 0 && made == 0 && filled < out.len() {
                return Err(InflateError::Corrupt); // no progress with input and room: never loop
            }
        }
        Ok(filled)
    }

    /// A fresh stream whose window is the last 32 KiB of `dict` followed by `made`.
    fn restart(&mut self, dict: &[u8], made: &[u8]) -> Result<(), InflateError> {
        self.z.reset(false);
        let window = if made.len() >= WINDOW || dict.is_empty() {
            made[made.len().saturating_sub(WINDOW)..].to_vec()
        } else {
            let mut w = dict[dict.len().saturating_sub(WINDOW - made.len())..].to_vec();
            w.extend_from_slice(made);
            w
        };
        if !window.is_empty() {
            self.z.set_dictionary(&window).map_err(|_| InflateError::Corrupt)?;
        }
        Ok(())
    }
}

/// The LZ77 window of one connection whose peer keeps its context between messages (a client
/// whose server did not answer `server_no_context_takeover`): the last 2^bits bytes received.
///
/// Empty until the first message, then as big as what was received, up to 2^bits bytes
/// (32 KiB at 15 bits), plus the `Vec` itself.
#[derive(Clone, Debug)]
pub struct InflateWindow {
    size: usize,
    data: Vec<u8>,
}

impl InflateWindow {
    /// The window for a peer compressing with at most `window_bits` (8..=15; clamped).
    pub fn new(window_bits: u8) -> Self {
        InflateWindow {
            size: 1 << window_bits.clamp(8, MAX_WINDOW_BITS),
            data: Vec::new(),
        }
    }

    /// The window kept in `slot` for a peer compressing with at most `window_bits`, made on
    /// first use.
    pub(crate) fn kept(slot: &mut Option<InflateWindow>, window_bits: u8) -> Option<&mut InflateWindow> {
        Some(slot.get_or_insert_with(|| InflateWindow::new(window_bits)))
    }

    /// Heap bytes held now.
    pub fn heap_bytes(&self) -> usize {
        self.data.capacity()
    }

    fn push(&mut self, made: &[u8]) {
        let made = &made[made.len().saturating_sub(self.size)..];
        let excess = (self.data.len() + made.len()).saturating_sub(self.size);
        self.data.drain(..excess);
        let need = self.data.len() + made.len();
        if need > self.data.capacity() {
            // Doubling, but never past the window.
            let target = need.max(self.data.capacity() * 2).min(self.size);
            self.data.reserve_exact(target - self.data.len());
        }
        self.data.extend_from_slice(made);
    }
}

/// Unsent compressed payloads larger than this are not kept for reuse.
const KEEP_BUFFER: usize = 64 << 10;

/// Inflate output from this size on is counted by [`Codec::take_released`]: smaller blocks are
/// reused by the allocator, larger ones may be kept by it.
const LARGE_OUTPUT: usize = 128 << 10;

/// What the connections of one loop share for permessage-deflate: one [`Compressor`], one
/// [`Decompressor`] (made on the first compressed message received), a buffer for compressed
/// payloads, and byte counts.
///
/// It allocates nothing until a message is compressed or inflated. Pass it to
/// [`Connection::read_with`](super::Connection::read_with) and
/// [`Connection::send_with`](super::Connection::send_with).
pub struct Codec {
    compressor: Compressor,
    decompressor: Option<Decompressor>,
    min_size: usize,
    buf: Vec<u8>,
    stats: CodecStats,
    /// See [`Codec::take_released`].
    released: usize,
}

pub use super::codec_stats::CodecStats;

impl Default for Codec {
    fn default() -> Self {
        Codec::new(&DeflateConfig::default())
    }
}

impl Codec {
    /// A codec with `config`'s level and size threshold.
    pub fn new(config: &DeflateConfig) -> Self {
        Codec {
            compressor: Compressor::new(config.level),
            decompressor: None,
            min_size: config.min_size,
            buf: Vec::new(),
            stats: CodecStats::default(),
            released: 0,
        }
    }

    /// Bytes compressed and inflated so far.
    pub fn stats(&self) -> CodecStats {
        self.stats
    }

    /// Heap bytes of large inflate output (128 KiB or more for a message) since the last call,
    /// whether the message was handed out or refused (a bomb stopped at the limit): freed once
    /// the message is dropped, but glibc keeps such blocks in its heap once an earlier one has
    /// raised its threshold for giving them back. The server's loop counts them among the
    /// memory it trims after (`malloc_trim`).
    pub fn take_released(&mut self) -> usize {
        core::mem::take(&mut self.released)
    }

    /// The payload to send with RSV1 set for a peer that agreed to `agreed`, or `None` to send
    /// `payload` as it is: below the size threshold, on a window zlib cannot compress with, or
    /// when compression would not make it smaller. A threshold of 0 compresses every message,
    /// even when that makes it larger.
    pub fn compress(&mut self, agreed: &Agreed, payload: &[u8]) -> Option<&[u8]> {
        if !agreed.should_compress(payload.len(), self.min_size) {
            return None;
        }
        if self.buf.capacity() > KEEP_BUFFER {
            self.buf = Vec::new(); // one large message must not pin memory for good
        }
        self.buf.clear();
        self.compressor
            .compress(payload, agreed.send_window_bits, &mut self.buf);
        if self.buf.len() >= payload.len() && self.min_size > 0 {
            self.stats.not_smaller += 1;
            return None;
        }
        self.stats.compressed_in += payload.len() as u64;
        self.stats.compressed_out += self.buf.len() as u64;
        Some(&self.buf)
    }

    /// Inflates one whole message into `out` (see [`Decompressor::decompress`]); `window` is the
    /// connection's [`InflateWindow`] when its peer keeps its context.
    pub fn decompress(
        &mut self,
        window: Option<&mut InflateWindow>,
        message: &[u8],
        max_len: usize,
        out: &mut Vec<u8>,
    ) -> Result<(), InflateError> {
        let before = out.len();
        let d = self.decompressor.get_or_insert_with(Decompressor::new);
        let result = match window {
            Some(w) => d.decompress_with_context(w, message, max_len, out),
            None => d.decompress(message, max_len, out),
        };
        if d.grown >= LARGE_OUTPUT {
            self.released = self.released.saturating_add(d.grown);
        }
        result?;
        self.stats.inflated_in += message.len() as u64;
        self.stats.inflated_out += (out.len() - before) as u64;
        Ok(())
    }
}

impl fmt::Debug for Codec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Codec")
            .field("min_size", &self.min_size)
            .field("stats", &self.stats)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FULL: &str = "permessage-deflate; server_no_context_takeover; client_no_context_takeover";

    fn server(offers: &[&str]) -> Option<Accepted> {
        let headers: Vec<&[u8]> = offers.iter().map(|o| o.as_bytes()).collect();
        negotiate_server(&headers, &DeflateConfig::default())
    }

    fn answer(offers: &[&str]) -> Option<String> {
        server(offers).map(|a| a.response)
    }

    fn client(answers: &[&str]) -> Result<Option<Agreed>, NegotiationError> {
        let headers: Vec<&[u8]> = answers.iter().map(|a| a.as_bytes()).collect();
        negotiate_client(&headers)
    }

    fn agreed(send_window_bits: u8, recv_window_bits: u8, recv_context_takeover: bool) -> Agreed {
        Agreed {
            send_window_bits,
            recv_window_bits,
            recv_context_takeover,
        }
    }

    #[test]
    fn server_answers_the_autobahn_offers() {
        // The offers kosoku's 12.x and 13.x cases send, verbatim.
        let base = "permessage-deflate; client_no_context_takeover; client_max_window_bits";
        let cases = [
            (base.to_string(), FULL.to_string(), 15),
            (format!("{base}; server_no_context_takeover"), FULL.to_string(), 15),
            (format!("{base}; server_max_window_bits=9"), format!("{FULL}; server_max_window_bits=9"), 9),
            (format!("{base}; server_max_window_bits=15"), format!("{FULL}; server_max_window_bits=15"), 15),
            (
                format!("{base}; server_no_context_takeover; server_max_window_bits=9"),
                format!("{FULL}; server_max_window_bits=9"),
                9,
            ),
            (
                format!("{base}; server_no_context_takeover; server_max_window_bits=15"),
                format!("{FULL}; server_max_window_bits=15"),
                15,
            ),
            (
                format!("{base}; server_no_context_takeover; server_max_window_bits=9, {base}; server_no_context_takeover, {base}"),
                format!("{FULL}; server_max_window_bits=9"),
                9,
            ),
        ];
        for (offer, response, bits) in cases {
            let accepted = server(&[&offer]).unwrap_or_else(|| panic!("declined {offer}"));
            assert_eq!(accepted.response, response, "{offer}");
            assert_eq!(accepted.agreed, agreed(bits, 15, false), "{offer}");
        }
    }

    #[test]
    fn server_answers_the_rfc_examples() {
        // RFC 7692 §7.1.3 (offers) and §5.2 (a fallback after a first choice).
        assert_eq!(answer(&["permessage-deflate"]).as_deref(), Some(FULL));
        assert_eq!(
            answer(&["permessage-deflate; client_max_window_bits"]).as_deref(),
            Some(FULL)
        );
        let fallback = "permessage-deflate; client_max_window_bits; server_max_window_bits=10, \
                        permessage-deflate; client_max_window_bits";
        let accepted = server(&[fallback]).unwrap();
        assert_eq!(accepted.response, format!("{FULL}; server_max_window_bits=10"));
        assert_eq!(accepted.agreed, agreed(10, 15, false));
        let hinted = server(&["permessage-deflate; client_max_window_bits=10"]).unwrap();
        assert_eq!(hinted.response, FULL, "client_max_window_bits is never answered");
        assert_eq!(hinted.agreed, agreed(15, 10, false));
    }

    #[test]
    fn server_takes_the_first_acceptable_offer_across_headers() {
        assert_eq!(
            answer(&["x-webkit-deflate-frame", "foo; bar=1, permessage-deflate"]).as_deref(),
            Some(FULL)
        );
        assert_eq!(
            answer(&[", ,permessage-deflate ,"]).as_deref(),
            Some(FULL),
            "empty list elements"
        );
        let after_bad = ["permessage-deflate; server_max_window_bits=8, permessage-deflate; server_max_window_bits=12"];
        assert_eq!(answer(&after_bad), Some(format!("{FULL}; server_max_window_bits=12")));
        let bad_then_good = [
            "permessage-deflate; mux",
            "permessage-deflate; server_max_window_bits=11",
        ];
        assert_eq!(
            answer(&bad_then_good),
            Some(format!("{FULL}; server_max_window_bits=11"))
        );
        // A comma inside quotes does not split; that element is malformed and skipped.
        assert_eq!(answer(&[r#"foo; a="x,y", permessage-deflate"#]).as_deref(), Some(FULL));
        assert_eq!(answer(&[]), None);
        assert_eq!(answer(&[""]), None);
        assert_eq!(answer(&["x-webkit-deflate-frame"]), None);
    }

    #[test]
    fn server_reads_quoted_values_and_whitespace() {
        let ten = Some(format!("{FULL}; server_max_window_bits=10"));
        assert_eq!(answer(&[r#"permessage-deflate; server_max_window_bits="10""#]), ten);
        assert_eq!(answer(&[r#"permessage-deflate; server_max_window_bits="1\0""#]), ten);
        assert_eq!(answer(&["permessage-deflate ;\tserver_max_window_bits = 10 "]), ten);
        let hinted = server(&[r#"permessage-deflate; client_max_window_bits="9""#]).unwrap();
        assert_eq!(hinted.agreed.recv_window_bits, 9);
    }

    #[test]
    fn server_declines_invalid_offers() {
        for offer in [
            "permessage-deflate; foo",
            "permessage-deflate; foo=1",
            "permessage-deflate; server_no_context_takeover; server_no_context_takeover",
            "permessage-deflate; client_no_context_takeover; client_no_context_takeover",
            "permessage-deflate; client_max_window_bits; client_max_window_bits=10",
            "permessage-deflate; server_max_window_bits=10; server_max_window_bits=10",
            "permessage-deflate; server_max_window_bits",
            "permessage-deflate; server_max_window_bits=",
            "permessage-deflate; server_max_window_bits=7",
            "permessage-deflate; server_max_window_bits=16",
            "permessage-deflate; server_max_window_bits=08",
            "permessage-deflate; server_max_window_bits=010",
            "permessage-deflate; server_max_window_bits=1a",
            "permessage-deflate; server_max_window_bits=-9",
            "permessage-deflate; server_max_window_bits=8", // zlib cannot compress with 256 bytes
            "permessage-deflate; client_max_window_bits=16",
            "permessage-deflate; client_max_window_bits=7",
            "permessage-deflate; server_no_context_takeover=1",
            r#"permessage-deflate; client_no_context_takeover="""#,
            r#"permessage-deflate; server_max_window_bits="1 0""#,
            r#"permessage-deflate; server_max_window_bits="10"#,
            r#"permessage-deflate; server_max_window_bits="10"x"#,
            "permessage-deflate;",
            "permessage-deflate; =10",
            "permessage-deflate; a b",
            "permessage deflate",
            "Permessage-Deflate",
        ] {
            assert_eq!(answer(&[offer]), None, "{offer}");
        }
    }

    #[test]
    fn server_config() {
        let offer: &[&[u8]] = &[b"permessage-deflate"];
        assert_eq!(
            negotiate_server(
                offer,
                &DeflateConfig {
                    enabled: false,
                    ..DeflateConfig::default()
                }
            ),
            None
        );
        let small = DeflateConfig {
            enabled: true,
            max_window_bits: 10,
            ..DeflateConfig::default()
        };
        let accepted = negotiate_server(offer, &small).unwrap();
        assert_eq!(accepted.response, format!("{FULL}; server_max_window_bits=10"));
        assert_eq!(accepted.agreed.send_window_bits, 10);
        let asked: &[&[u8]] = &[b"permessage-deflate; server_max_window_bits=12"];
        assert_eq!(negotiate_server(asked, &small).unwrap().agreed.send_window_bits, 10);
        let asked: &[&[u8]] = &[b"permessage-deflate; server_max_window_bits=9"];
        assert_eq!(negotiate_server(asked, &small).unwrap().agreed.send_window_bits, 9);
        let clamped = DeflateConfig {
            enabled: true,
            max_window_bits: 3,
            ..DeflateConfig::default()
        };
        assert_eq!(negotiate_server(offer, &clamped).unwrap().agreed.send_window_bits, 9);
    }

    #[test]
    fn server_response_passes_the_client_check() {
        for offer in [CLIENT_OFFER, "permessage-deflate; server_max_window_bits=9"] {
            let accepted = server(&[offer]).unwrap();
            let seen = client(&[&accepted.response]).unwrap().unwrap();
            assert_eq!(seen.recv_window_bits, accepted.agreed.send_window_bits);
            assert!(!seen.recv_context_takeover);
        }
    }

    #[test]
    fn client_accepts_every_valid_answer() {
        assert_eq!(client(&[]), Ok(None));
        assert_eq!(client(&[""]), Ok(None));
        // What kosoku's fuzzing server answers CLIENT_OFFER in 12.x and 13.1 to 13.7.
        assert_eq!(client(&["permessage-deflate"]), Ok(Some(agreed(15, 15, true))));
        assert_eq!(
            client(&["permessage-deflate; client_no_context_takeover"]),
            Ok(Some(agreed(15, 15, true)))
        );
        assert_eq!(
            client(&["permessage-deflate; client_max_window_bits=9"]),
            Ok(Some(agreed(9, 15, true)))
        );
        assert_eq!(
            client(&["permessage-deflate; client_max_window_bits=15"]),
            Ok(Some(agreed(15, 15, true)))
        );
        let both = "permessage-deflate; client_no_context_takeover; client_max_window_bits=9";
        assert_eq!(client(&[both]), Ok(Some(agreed(9, 15, true))));
        // Others the RFC allows.
        assert_eq!(client(&[FULL]), Ok(Some(agreed(15, 15, false))));
        assert_eq!(
            client(&["permessage-deflate; server_no_context_takeover"]),
            Ok(Some(agreed(15, 15, false)))
        );
        assert_eq!(
            client(&["permessage-deflate; server_max_window_bits=10"]),
            Ok(Some(agreed(15, 10, true)))
        );
        assert_eq!(
            client(&["permessage-deflate; server_max_window_bits=8"]),
            Ok(Some(agreed(15, 8, true)))
        );
        assert_eq!(
            client(&[r#"permessage-deflate; client_max_window_bits="12""#]),
            Ok(Some(agreed(12, 15, true)))
        );
        let all = "permessage-deflate;server_max_window_bits=11;client_max_window_bits=10;\
                   client_no_context_takeover;server_no_context_takeover";
        assert_eq!(client(&[all]), Ok(Some(agreed(10, 11, false))));
        let eight = client(&["permessage-deflate; client_max_window_bits=8"])
            .unwrap()
            .unwrap();
        assert_eq!(eight.send_window_bits, 8);
        assert!(
            !eight.should_compress(1 << 20, DEFAULT_MIN_SIZE),
            "zlib cannot compress with 8 bits"
        );
    }

    #[test]
    fn client_rejects_invalid_answers() {
        for (answers, why) in [
            (&["permessage-deflate, permessage-deflate"][..], "more than once"),
            (&["permessage-deflate", "permessage-deflate"][..], "more than once"),
            (&["x-webkit-deflate-frame"][..], "not offered"),
            (&["permessage-deflate", "foo"][..], "not offered"),
            (&["permessage-deflate; client_max_window_bits"][..], "needs a value"),
            (&["permessage-deflate; server_max_window_bits"][..], "needs a value"),
            (&["permessage-deflate; server_max_window_bits=16"][..], "8 to 15"),
            (&["permessage-deflate; server_max_window_bits=7"][..], "8 to 15"),
            (&["permessage-deflate; client_max_window_bits=08"][..], "8 to 15"),
            (&["permessage-deflate; client_max_window_bits=1"][..], "8 to 15"),
            (
                &["permessage-deflate; server_no_context_takeover; server_no_context_takeover"][..],
                "repeated",
            ),
            (
                &["permessage-deflate; client_max_window_bits=9; client_max_window_bits=9"][..],
                "repeated",
            ),
            (
                &["permessage-deflate; server_max_window_bits=9; server_max_window_bits=10"][..],
                "repeated",
            ),
            (&["permessage-deflate; mux"][..], "unknown"),
            (&["permessage-deflate; server_no_context_takeover=yes"][..], "no value"),
            (&["permessage-deflate; =10"][..], "malformed"),
            (&[r#"permessage-deflate; client_max_window_bits="9"#][..], "malformed"),
            (&["permessage-deflate; ;"][..], "malformed"),
        ] {
            let err = client(answers).expect_err(answers[0]);
            assert!(err.message().contains(why), "{answers:?}: {err}");
        }
        let not_offered = check_response(&[b"permessage-deflate; client_max_window_bits=10"], false);
        assert!(not_offered.unwrap_err().message().contains("not offered"));
        assert_eq!(
            check_response(&[b"permessage-deflate"], false),
            Ok(Some(agreed(15, 15, true)))
        );
    }

    #[test]
    fn threshold() {
        let a = agreed(15, 15, false);
        assert!(!a.should_compress(DEFAULT_MIN_SIZE - 1, DEFAULT_MIN_SIZE));
        assert!(a.should_compress(DEFAULT_MIN_SIZE, DEFAULT_MIN_SIZE));
        assert!(a.should_compress(0, 0));
        assert!(!a.should_compress(1000, 1001));
    }

    // --- codec ---

    /// xorshift: deterministic data without a dependency.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }

        fn bytes(&mut self, n: usize) -> Vec<u8> {
            (0..n).map(|_| self.next() as u8).collect()
        }

        /// Text with repeats near and far, so that a too-large window would be used if allowed.
        fn text(&mut self, n: usize) -> Vec<u8> {
            const WORDS: [&str; 12] = [
                "the",
                "window",
                "deflate",
                "message",
                "server",
                "of",
                "a",
                "connection",
                "zlib",
                "is",
                "and",
                "frame",
            ];
            let mut s = Vec::with_capacity(n + 16);
            while s.len() < n {
                s.extend_from_slice(WORDS[(self.next() % 12) as usize].as_bytes());
                s.push(if self.next() % 9 == 0 { b'\n' } else { b' ' });
                if self.next() % 50 == 0 && s.len() > 2000 {
                    // A far repeat: bytes from 1000..2000 back, beyond small windows.
                    let from = s.len() - 1000 - (self.next() % 1000) as usize;
                    let copy = s[from..from + 40].to_vec();
                    s.extend_from_slice(&copy);
                }
            }
            s.truncate(n);
            s
        }

        fn json(&mut self, n: usize) -> Vec<u8> {
            let mut s = format!(
                "{{\"type\":\"message\",\"id\":{},\"user\":\"u{}\",\"text\":\"",
                self.next() % 100_000,
                self.next() % 50
            )
            .into_bytes();
            s.extend_from_slice(&self.text(n.saturating_sub(s.len() + 2)));
            s.extend_from_slice(b"\"}");
            s
        }
    }

    fn messages() -> Vec<Vec<u8>> {
        let mut rng = Rng(0x2545_f491_4f6c_dd1d);
        vec![
            b"Hello".to_vec(),
            Vec::new(),
            rng.json(100),
            rng.json(1024),
            rng.text(70_000),
            rng.bytes(5000),
            vec![b'a'; 100_000],
        ]
    }

    fn compressed(bits: u8, payload: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        Compressor::default().compress(payload, bits, &mut out);
        out
    }

    fn inflated(message: &[u8]) -> Result<Vec<u8>, InflateError> {
        let mut out = Vec::new();
        Decompressor::new().decompress(message, 1 << 24, &mut out).map(|()| out)
    }

    /// Inflates with a `bits` window one output byte at a time, so that zlib checks every
    /// distance against the window alone (within one call it also accepts the call's output).
    fn inflate_strictly(bits: u8, message: &[u8]) -> Result<Vec<u8>, ()> {
        let mut z = Decompress::new_with_window_bits(false, bits);
        let mut input = [message, &TAIL].concat();
        let mut out = Vec::new();
        let mut byte = [0u8];
        loop {
            let (i, o) = (z.total_in(), z.total_out());
            z.decompress(&input, &mut byte, FlushDecompress::None).map_err(|_| ())?;
            input.drain(..(z.total_in() - i) as usize);
            if z.total_out() > o {
                out.push(byte[0]);
            } else if input.is_empty() {
                return Ok(out);
            }
        }
    }

    #[test]
    fn rfc_7692_examples() {
        let hello = [0xf2, 0x48, 0xcd, 0xc9, 0xc9, 0x07, 0x00];
        // §7.2.3.1: "Hello" compressed, at every window size.
        for bits in MIN_WINDOW_BITS..=MAX_WINDOW_BITS {
            assert_eq!(compressed(bits, b"Hello"), hello, "{bits} bits");
        }
        assert_eq!(inflated(&hello).unwrap(), b"Hello");
        // §7.2.3.3: no compression; §7.2.3.4: BFINAL set; §7.2.3.5: two blocks.
        assert_eq!(
            inflated(&[0x00, 0x05, 0x00, 0xfa, 0xff, b'H', b'e', b'l', b'l', b'o', 0x00]).unwrap(),
            b"Hello"
        );
        assert_eq!(
            inflated(&[0xf3, 0x48, 0xcd, 0xc9, 0xc9, 0x07, 0x00, 0x00]).unwrap(),
            b"Hello"
        );
        let two = [
            0xf2, 0x48, 0x05, 0x00, 0x00, 0x00, 0xff, 0xff, 0xca, 0xc9, 0xc9, 0x07, 0x00,
        ];
        assert_eq!(inflated(&two).unwrap(), b"Hello");
        // §7.2.3.2: the second "Hello" refers to the first through the shared window.
        let mut d = Decompressor::new();
        let mut window = InflateWindow::new(15);
        let mut out = Vec::new();
        d.decompress_with_context(&mut window, &hello, 100, &mut out).unwrap();
        d.decompress_with_context(&mut window, &[0xf2, 0x00, 0x11, 0x00, 0x00], 100, &mut out)
            .unwrap();
        assert_eq!(out, b"HelloHello");
        // Without the window the reference is out of range.
        assert_eq!(inflated(&[0xf2, 0x00, 0x11, 0x00, 0x00]), Err(InflateError::Corrupt));
    }

    #[test]
    fn empty_message() {
        // §7.2.3.6: an empty sync-flushed block is the single octet 0x00.
        for bits in [8, 9, 15] {
            assert_eq!(compressed(bits, b""), [0x00], "{bits} bits");
        }
        assert_eq!(inflated(&[0x00]).unwrap(), b"");
        assert_eq!(inflated(&[]).unwrap(), b"");
    }

    #[test]
    fn a_final_block_followed_by_more_blocks() {
        // "Hello" with BFINAL set, then " world" as a new stream that refers back to "Hello".
        let mut z = Compress::new_with_window_bits(Compression::default(), false, 15);
        let mut first = Vec::with_capacity(64);
        z.compress_vec(b"Hello", &mut first, FlushCompress::Finish).unwrap();
        let mut second = Vec::with_capacity(64);
        let mut z = Compress::new_with_window_bits(Compression::default(), false, 15);
        z.set_dictionary(b"Hello").unwrap();
        z.compress_vec(b" world, Hello", &mut second, FlushCompress::Sync)
            .unwrap();
        second.truncate(second.len() - 4);
        assert_eq!(inflated(&[first, second].concat()).unwrap(), b"Hello world, Hello");
        // Thousands of empty final blocks: stopped, not copied over and over.
        let empty_final = [0x03, 0x00];
        let many: Vec<u8> = [&b"\x0a\xc9\xc8\x04\x00\x00\x00\xff\xff"[..], &empty_final.repeat(5000)].concat();
        assert_eq!(inflated(&many), Err(InflateError::Corrupt));
    }

    #[test]
    fn round_trip_per_message_at_every_window() {
        let mut c = Compressor::default();
        let mut d = Decompressor::new();
        for bits in MIN_WINDOW_BITS..=MAX_WINDOW_BITS {
            for m in messages() {
                let mut z = Vec::new();
                c.compress(&m, bits, &mut z);
                assert!(!z.ends_with(&TAIL) || m.is_empty(), "tail removed");
                assert_eq!(
                    inflate_strictly(bits, &z).as_deref(),
                    Ok(&m[..]),
                    "{bits} bits, {} bytes",
                    m.len()
                );
                let mut out = b"kept".to_vec();
                d.decompress(&z, m.len(), &mut out).unwrap();
                assert_eq!(&out[..4], b"kept");
                assert_eq!(&out[4..], &m[..], "{bits} bits, {} bytes", m.len());
            }
        }
        // One zlib stream per window size used, no more.
        assert!(c.by_window.iter().all(Option::is_some));
        let mut one = Compressor::default();
        one.compress(b"x", 12, &mut Vec::new());
        one.compress(b"y", 12, &mut Vec::new());
        assert_eq!(one.by_window.iter().filter(|z| z.is_some()).count(), 1);
    }

    #[test]
    fn at_fifteen_bits_the_output_is_flate2s() {
        // The hash table follows the window below 15 bits only: at 15 the stream is zlib's
        // default one, byte for byte.
        let mut c = Compressor::default();
        for m in messages() {
            let mut ours = Vec::new();
            c.compress(&m, 15, &mut ours);
            let mut z = Compress::new_with_window_bits(Compression::new(DEFAULT_LEVEL), false, 15);
            let mut theirs = Vec::with_capacity(m.len() * 2 + 64);
            z.compress_vec(&m, &mut theirs, FlushCompress::Sync).unwrap();
            theirs.truncate(theirs.len() - TAIL.len());
            assert_eq!(ours, theirs, "{} bytes", m.len());
        }
    }

    #[test]
    fn a_smaller_window_compresses_less_and_stays_in_it() {
        let text = Rng(7).text(60_000);
        let (small, large) = (compressed(9, &text), compressed(15, &text));
        assert!(small.len() > large.len(), "{} vs {}", small.len(), large.len());
        // The 15-bit stream reaches beyond 512 bytes: a strict 9-bit inflater refuses it.
        assert_eq!(inflate_strictly(9, &large), Err(()));
        assert_eq!(inflate_strictly(9, &small).unwrap(), text);
    }

    #[test]
    fn round_trip_with_context_takeover_at_every_window() {
        for bits in MIN_WINDOW_BITS..=MAX_WINDOW_BITS {
            // A peer that keeps its context: one zlib stream, flushed after each message.
            let mut peer = Compress::new_with_window_bits(Compression::default(), false, bits);
            let mut d = Decompressor::new();
            let mut window = InflateWindow::new(bits);
            assert_eq!(window.heap_bytes(), 0);
            for m in messages().iter().chain(messages().iter()) {
                let mut z = Vec::with_capacity(m.len() * 2 + 64);
                peer.compress_vec(m, &mut z, FlushCompress::Sync).unwrap();
                // A second flush with no input in between emits nothing: an empty payload.
                if z.ends_with(&TAIL) {
                    z.truncate(z.len() - 4);
                }
                let mut out = Vec::new();
                d.decompress_with_context(&mut window, &z, m.len(), &mut out).unwrap();
                assert_eq!(out, *m, "{bits} bits");
                assert!(window.heap_bytes() <= 1 << bits, "{} > 2^{bits}", window.heap_bytes());
            }
            assert_eq!(window.heap_bytes(), 1 << bits);
        }
        let mut small = InflateWindow::new(15);
        small.push(b"abc");
        assert_eq!(small.data, b"abc");
        small.push(&[b'x'; 40_000]);
        assert_eq!(small.data.len(), 1 << 15);
    }

    #[test]
    fn python_zlib_interoperates() {
        // Python's zlib inflates ours with the same window, one byte out at a time (so every
        // distance is checked against the window), and compresses for us: each message alone,
        // and all messages as one stream with context takeover.
        const SCRIPT: &str = r#"
import sys, zlib
ctx = {}
for line in sys.stdin:
    bits, plain, ours = line.split(",")
    bits, plain, ours = int(bits), bytes.fromhex(plain), bytes.fromhex(ours)
    d = zlib.decompressobj(-bits)
    got, rest = b"", ours + b"\x00\x00\xff\xff"
    while True:
        chunk = d.decompress(rest, 1)
        rest = d.unconsumed_tail
        got += chunk
        if not chunk and not rest:
            break
    alone = zlib.compressobj(9, zlib.DEFLATED, -bits)
    one = alone.compress(plain) + alone.flush(zlib.Z_SYNC_FLUSH)
    keep = ctx.setdefault(bits, zlib.compressobj(9, zlib.DEFLATED, -bits))
    kept = keep.compress(plain) + keep.flush(zlib.Z_SYNC_FLUSH)
    print("ok" if got == plain else "bad", one[:-4].hex(), kept[:-4].hex())
"#;
        use std::fmt::Write as _;
        use std::io::Write as _;
        let mut input = String::new();
        let mut expected = Vec::new();
        for bits in MIN_WINDOW_BITS..=MAX_WINDOW_BITS {
            for m in messages() {
                let hex = |b: &[u8]| {
                    b.iter().fold(String::new(), |mut s, x| {
                        let _ = write!(s, "{x:02x}");
                        s
                    })
                };
                let _ = writeln!(input, "{bits},{},{}", hex(&m), hex(&compressed(bits, &m)));
                expected.push((bits, m));
            }
        }
        let mut child = std::process::Command::new("python3")
            .args(["-c", SCRIPT])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("python3 runs");
        let mut stdin = child.stdin.take().unwrap();
        let writer = std::thread::spawn(move || stdin.write_all(input.as_bytes()));
        let output = child.wait_with_output().unwrap();
        writer.join().unwrap().unwrap();
        assert!(output.status.success());
        let unhex = |s: &str| {
            (0..s.len())
                .step_by(2)
                .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
                .collect::<Vec<u8>>()
        };
        let lines: Vec<&str> = std::str::from_utf8(&output.stdout).unwrap().lines().collect();
        assert_eq!(lines.len(), expected.len());
        let mut d = Decompressor::new();
        let mut windows: Vec<InflateWindow> = (0..=MAX_WINDOW_BITS).map(InflateWindow::new).collect();
        for (line, (bits, m)) in lines.iter().zip(&expected) {
            let fields: Vec<&str> = line.split(' ').collect();
            assert_eq!(fields[0], "ok", "Python refused ours at {bits} bits, {} bytes", m.len());
            let mut out = Vec::new();
            d.decompress(&unhex(fields[1]), m.len(), &mut out).unwrap();
            assert_eq!(out, *m, "Python's at {bits} bits");
            out.clear();
            d.decompress_with_context(&mut windows[usize::from(*bits)], &unhex(fields[2]), m.len(), &mut out)
                .unwrap();
            assert_eq!(out, *m, "Python's stream at {bits} bits");
        }
    }

    #[test]
    fn incompressible_payload() {
        let noise = Rng(99).bytes(1 << 16);
        let z = compressed(15, &noise);
        // Stored blocks: a few bytes per block over the payload.
        assert!(z.len() <= noise.len() + 64, "{} for {}", z.len(), noise.len());
        assert_eq!(inflated(&z).unwrap(), noise);
    }

    #[test]
    fn stored_blocks_below_nine_bits() {
        let mut rng = Rng(3);
        for m in [Vec::new(), rng.text(10), rng.text(70_000)] {
            let z = compressed(8, &m);
            assert_eq!(z.len(), m.len() + 5 * m.len().div_ceil(0xffff) + 1);
            assert_eq!(inflate_strictly(9, &z).unwrap(), m);
        }
    }

    #[test]
    fn decompression_bomb_stops_at_max_len() {
        let zeros = vec![0u8; 16 << 20];
        let mut bomb = Vec::new();
        Compressor::new(9).compress(&zeros, 15, &mut bomb);
        assert!(bomb.len() < 32 << 10, "{} bytes", bomb.len());
        let max = 1 << 20;
        let mut d = Decompressor::new();
        let mut out = b"earlier".to_vec();
        assert_eq!(d.decompress(&bomb, max, &mut out), Err(InflateError::TooBig));
        assert_eq!(out, b"earlier", "left as it was");
        // Output room never passed the limit + 1 byte (plus what `out` already held).
        assert!(out.capacity() <= 7 + max + 1, "capacity {}", out.capacity());
        // Exactly at the limit is fine, one byte over is not.
        let exact = compressed(15, &zeros[..max]);
        let mut out = Vec::new();
        d.decompress(&exact, max, &mut out).unwrap();
        assert_eq!(out.len(), max);
        let mut out = Vec::new();
        assert_eq!(d.decompress(&exact, max - 1, &mut out), Err(InflateError::TooBig));
        assert!(out.capacity() <= max);
        // Also with context takeover; the window is left as it was.
        let mut window = InflateWindow::new(15);
        let mut out = Vec::new();
        assert_eq!(
            d.decompress_with_context(&mut window, &bomb, max, &mut out),
            Err(InflateError::TooBig)
        );
        assert_eq!(window.heap_bytes(), 0);
        // The decompressor is still good.
        assert_eq!(inflated(&compressed(15, b"after")).unwrap(), b"after");
    }

    #[test]
    fn every_bomb_gives_its_buffer_back() {
        // Two bombs in a row into one reused buffer, then a message that fits: after each bomb
        // the buffer is back to its idle size, and the output made is counted for trimming.
        let mut bomb = Vec::new();
        Compressor::new(9).compress(&vec![0u8; 64 << 20], 15, &mut bomb);
        let max = 16 << 20;
        let mut codec = Codec::default();
        let mut out = Vec::new();
        for round in 1..=2 {
            assert_eq!(codec.decompress(None, &bomb, max, &mut out), Err(InflateError::TooBig));
            assert_eq!((out.len(), out.capacity()), (0, 0), "bomb {round}");
            let released = codec.take_released();
            assert!(released > max, "bomb {round}: {released} bytes counted");
            assert_eq!(codec.take_released(), 0, "counted once");
        }
        // With context takeover too, into a buffer that already held something.
        let mut window = InflateWindow::new(15);
        let mut out = Vec::with_capacity(100);
        out.extend_from_slice(b"earlier");
        for round in 1..=2 {
            let r = codec.decompress(Some(&mut window), &bomb, max, &mut out);
            assert_eq!(r, Err(InflateError::TooBig));
            assert_eq!((&out[..], out.capacity()), (&b"earlier"[..], 100), "bomb {round}");
            assert!(codec.take_released() > max - 100, "bomb {round}");
        }
        // Small output is not counted; large output handed out is (the caller frees it).
        let mut out = Vec::new();
        codec
            .decompress(None, &compressed(15, b"small"), max, &mut out)
            .unwrap();
        assert_eq!(codec.take_released(), 0);
        let big = vec![1u8; 1 << 20];
        let mut out = Vec::new();
        codec.decompress(None, &compressed(15, &big), max, &mut out).unwrap();
        assert_eq!(out, big);
        assert!(codec.take_released() >= big.len());
    }

    #[test]
    fn output_room_grows_with_output_not_with_the_limit() {
        let mut out = Vec::new();
        Decompressor::new()
            .decompress(&compressed(15, b"small"), usize::MAX, &mut out)
            .unwrap();
        assert_eq!(out, b"small");
        assert!(out.capacity() <= FIRST_ROOM, "capacity {}", out.capacity());
        let m = Rng(5).text(100_000);
        let mut out = Vec::new();
        Decompressor::new()
            .decompress(&compressed(15, &m), usize::MAX, &mut out)
            .unwrap();
        assert_eq!(out, m);
        assert!(out.capacity() < 2 * m.len(), "capacity {}", out.capacity());
    }

    #[test]
    fn corrupt_input() {
        let mut d = Decompressor::new();
        let good = compressed(15, b"Hello, Hello, Hello");
        for bad in [&[0xff; 16][..], &[0x07, 0x00], &[0x00, 0x05, 0x00, 0x00, 0x00, b'H']] {
            let mut out = b"x".to_vec();
            assert_eq!(
                d.decompress(bad, 1 << 20, &mut out),
                Err(InflateError::Corrupt),
                "{bad:02x?}"
            );
            assert_eq!(out, b"x");
            // Nothing carries over to the next message.
            let mut out = Vec::new();
            d.decompress(&good, 1 << 20, &mut out).unwrap();
            assert_eq!(out, b"Hello, Hello, Hello");
        }
    }

    #[test]
    fn one_codec_serves_interleaved_connections() {
        let mut c = Compressor::default();
        let mut d = Decompressor::new();
        let mut rng = Rng(11);
        let peers: Vec<(u8, Vec<u8>)> = (0..20)
            .map(|i| (9 + i % 7, rng.json(200 + 97 * usize::from(i))))
            .collect();
        let wire: Vec<Vec<u8>> = peers
            .iter()
            .map(|(bits, m)| {
                let mut z = Vec::new();
                c.compress(m, *bits, &mut z);
                z
            })
            .collect();
        for ((_, m), z) in peers.iter().zip(&wire).rev() {
            let mut out = Vec::new();
            d.decompress(z, m.len(), &mut out).unwrap();
            assert_eq!(out, *m);
        }
    }
}
