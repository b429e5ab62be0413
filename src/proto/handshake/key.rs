//! The handshake's key arithmetic: SHA-1 (FIPS 180-4) and base64 (RFC 4648, standard alphabet,
//! padded), only as far as `Sec-WebSocket-Key` and `Sec-WebSocket-Accept` need them.
//!
//! RFC 6455 uses SHA-1 as a checksum that proves the server read the key, not for security, and
//! hashes one 60-byte input per connection. So both are written for size: the 80 rounds are one
//! loop, where general-purpose crates unroll them (about 3 KB of Cortex-M code for a hash run once
//! per handshake; this is a quarter of that, for about 2,000 more instructions per handshake).
//! Tests check both against the standard vectors and against the `sha1_smol` and `base64` crates.

const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

/// SHA-1 of `a` followed by `b`.
pub(crate) fn sha1(a: &[u8], b: &[u8]) -> [u8; 20] {
    let mut h = Sha1 {
        state: [0x6745_2301, 0xefcd_ab89, 0x98ba_dcfe, 0x1032_5476, 0xc3d2_e1f0],
        block: [0; 64],
        filled: 0,
    };
    let len = a.len() + b.len();
    h.update(a);
    h.update(b);
    // Padding: 0x80, zeros up to 56 mod 64, then the length in bits.
    h.update(&[0x80]);
    h.update(&[0; 64][..55usize.wrapping_sub(len) % 64]);
    h.update(&(len as u64).wrapping_mul(8).to_be_bytes());
    core::array::from_fn(|i| (h.state[i / 4] >> (24 - 8 * (i % 4))) as u8)
}

/// A hash in progress.
struct Sha1 {
    state: [u32; 5],
    block: [u8; 64],
    /// Bytes of `block` filled.
    filled: usize,
}

impl Sha1 {
    fn update(&mut self, mut data: &[u8]) {
        while !data.is_empty() {
            let take = (64 - self.filled).min(data.len());
            self.block[self.filled..self.filled + take].copy_from_slice(&data[..take]);
            self.filled += take;
            data = &data[take..];
            if self.filled == 64 {
                compress(&mut self.state, &self.block);
                self.filled = 0;
            }
        }
    }
}

/// One 64-byte block into the state (FIPS 180-4 §6.1.2).
fn compress(state: &mut [u32; 5], block: &[u8; 64]) {
    let mut w = [0u32; 80];
    for (w, b) in w.iter_mut().zip(block.chunks_exact(4)) {
        *w = u32::from_be_bytes([b[0], b[1], b[2], b[3]]);
    }
    for t in 16..80 {
        w[t] = (w[t - 3] ^ w[t - 8] ^ w[t - 14] ^ w[t - 16]).rotate_left(1);
    }
    let [mut a, mut b, mut c, mut d, mut e] = *state;
    for (t, w) in w.iter().enumerate() {
        let (f, k) = if t < 20 {
            ((b & c) | (!b & d), 0x5a82_7999)
        } else if t < 40 {
            (b ^ c ^ d, 0x6ed9_eba1)
        } else if t < 60 {
            ((b & c) | (b & d) | (c & d), 0x8f1b_bcdc)
        } else {
            (b ^ c ^ d, 0xca62_c1d6)
        };
        let temp = a
            .rotate_left(5)
            .wrapping_add(f)
            .wrapping_add(e)
            .wrapping_add(k)
            .wrapping_add(*w);
        e = d;
        d = c;
        c = b.rotate_left(30);
        b = a;
        a = temp;
    }
    for (s, v) in state.iter_mut().zip([a, b, c, d, e]) {
        *s = s.wrapping_add(v);
    }
}

/// Base64 of `bytes` into `out`, which must hold exactly `bytes.len().div_ceil(3) * 4` bytes.
pub(crate) fn base64_encode(bytes: &[u8], out: &mut [u8]) {
    for (chunk, quad) in bytes.chunks(3).zip(out.chunks_exact_mut(4)) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, &b)| n | u32::from(b) << (16 - 8 * i));
        for (i, o) in quad.iter_mut().enumerate() {
            *o = if i <= chunk.len() {
                ALPHABET[(n >> (18 - 6 * i) & 63) as usize]
            } else {
                b'='
            };
        }
    }
}

/// The value of base64 character `c`, if it is one.
fn sextet(c: u8) -> Option<u8> {
    match c {
        b'A'..=b'Z' => Some(c - b'A'),
        b'a'..=b'z' => Some(c - b'a' + 26),
        b'0'..=b'9' => Some(c - b'0' + 52),
        b'+' => Some(62),
        b'/' => Some(63),
        _ => None,
    }
}

/// Whether `key` is the canonical padded base64 of 16 bytes, as RFC 6455 §4.2.1 asks of a
/// `Sec-WebSocket-Key`: 22 characters, the last carrying 2 bits and 4 zero bits, then `==`.
pub(crate) fn is_base64_of_16_bytes(key: &[u8]) -> bool {
    let [body @ .., last, b'=', b'='] = key else {
        return false;
    };
    body.len() == 21 && body.iter().all(|&c| sextet(c).is_some()) && sextet(*last).is_some_and(|v| v & 0x0f == 0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::string::String;
    use alloc::vec;
    use base64::Engine as _;
    use proptest::prelude::*;

    fn hex(d: [u8; 20]) -> String {
        d.iter().map(|b| alloc::format!("{b:02x}")).collect()
    }

    fn b64(bytes: &[u8]) -> String {
        let mut out = vec![0; bytes.len().div_ceil(3) * 4];
        base64_encode(bytes, &mut out);
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn sha1_standard_vectors() {
        // FIPS 180-2 appendix A and the usual extra vectors.
        assert_eq!(hex(sha1(b"abc", b"")), "a9993e364706816aba3e25717850c26c9cd0d89d");
        assert_eq!(hex(sha1(b"", b"")), "da39a3ee5e6b4b0d3255bfef95601890afd80709");
        assert_eq!(
            hex(sha1(b"abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq", b"")),
            "84983e441c3bd26ebaae4aa1f95129e5e54670f1"
        );
        let million = vec![b'a'; 1_000_000];
        assert_eq!(
            hex(sha1(&million[..1], &million[1..])),
            "34aa973cd4c4daa4f61eeb2bdbad27316534016f"
        );
        // Split anywhere, the same.
        assert_eq!(sha1(b"ab", b"c"), sha1(b"", b"abc"));
    }

    #[test]
    fn base64_standard_vectors() {
        // RFC 4648 §10.
        for (raw, enc) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ] {
            assert_eq!(b64(raw.as_bytes()), enc);
        }
    }

    #[test]
    fn key_checks() {
        assert!(is_base64_of_16_bytes(b"dGhlIHNhbXBsZSBub25jZQ=="));
        for bad in [
            &b""[..],
            b"==",
            b"dGhlIHNhbXBsZSBub25jZQ=",
            b"dGhlIHNhbXBsZSBub25jZQ",
            b"dGhlIHNhbXBsZSBub25jZR==",  // trailing bits set
            b"dGhlIHNhbXBsZSBub25j.Q==",  // not base64
            b"dGhlIHNhbXBsZSBub25jZQ===", // too long
            b"c2hvcnQ=",
            b"AAAAAAAAAAAAAAAAAAAAAAAA", // 18 bytes, no padding
        ] {
            assert!(!is_base64_of_16_bytes(bad), "{}", String::from_utf8_lossy(bad));
        }
    }

    proptest! {
        #[test]
        fn sha1_matches_sha1_smol(a in proptest::collection::vec(any::<u8>(), 0..300), b in proptest::collection::vec(any::<u8>(), 0..100)) {
            let mut reference = sha1_smol::Sha1::new();
            reference.update(&a);
            reference.update(&b);
            prop_assert_eq!(sha1(&a, &b), reference.digest().bytes());
        }

        #[test]
        fn base64_matches_the_base64_crate(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            prop_assert_eq!(b64(&bytes), base64::engine::general_purpose::STANDARD.encode(&bytes));
        }

        #[test]
        fn key_check_matches_the_base64_crate(
            key in prop_oneof!["[A-Za-z0-9+/]{21}[AQgwBR.]==", "[A-Za-z0-9+/]{19,23}[A-Za-z0-9+/=.]{0,3}"]
        ) {
            let mut buf = [0u8; 32];
            let decodes_to_16 = matches!(
                base64::engine::general_purpose::STANDARD.decode_slice(key.as_bytes(), &mut buf),
                Ok(16)
            );
            prop_assert_eq!(is_base64_of_16_bytes(key.as_bytes()), decodes_to_16);
        }

        #[test]
        fn every_16_byte_value_is_a_key(bytes in any::<[u8; 16]>()) {
            prop_assert!(is_base64_of_16_bytes(b64(&bytes).as_bytes()));
        }
    }
}
