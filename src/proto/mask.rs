//! Payload masking (RFC 6455 §5.3): XOR with a 4-byte key, a word at a time.

/// XORs `buf` with `key`, as if `buf` started `offset` bytes into the masked payload.
///
/// Masking is its own inverse, so this both masks and unmasks. `offset` lets a payload that arrives
/// in several reads be unmasked piece by piece.
#[inline]
pub fn apply_mask(buf: &mut [u8], key: [u8; 4], offset: usize) {
    // Rotate the key so that buf[0] lines up with key[offset % 4].
    let o = offset % 4;
    let key_bytes = [key[o], key[(o + 1) % 4], key[(o + 2) % 4], key[(o + 3) % 4]];
    let k = u32::from_ne_bytes(key_bytes);
    let wide = u128::from(k) * 0x0000_0001_0000_0001_0000_0001_0000_0001;
    let mut chunks = buf.chunks_exact_mut(16);
    for chunk in &mut chunks {
        // Sixteen bytes at a time: one vector XOR where the target has 128-bit registers.
        let mut w = [0u8; 16];
        w.copy_from_slice(chunk);
        chunk.copy_from_slice(&(u128::from_ne_bytes(w) ^ wide).to_ne_bytes());
    }
    for (i, b) in chunks.into_remainder().iter_mut().enumerate() {
        *b ^= key_bytes[i % 4];
    }
}

/// Simple byte-at-a-time reference, used by tests to check [`apply_mask`].
#[cfg(test)]
pub(crate) fn apply_mask_slow(buf: &mut [u8], key: [u8; 4], offset: usize) {
    for (i, b) in buf.iter_mut().enumerate() {
        *b ^= key[(i + offset) % 4];
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_reference_for_every_offset_and_length() {
        let key = [0x37, 0xfa, 0x21, 0x3d];
        for offset in 0..8 {
            for len in 0..70 {
                let data: Vec<u8> = (0..len as u8).map(|i| i.wrapping_mul(31)).collect();
                let mut fast = data.clone();
                let mut slow = data.clone();
                apply_mask(&mut fast, key, offset);
                apply_mask_slow(&mut slow, key, offset);
                assert_eq!(fast, slow, "offset {offset} len {len}");
            }
        }
    }

    #[test]
    fn split_unmasking_equals_whole() {
        let key = [1, 2, 3, 4];
        let data: Vec<u8> = (0..=255).collect();
        let mut whole = data.clone();
        apply_mask(&mut whole, key, 0);
        for cut in 0..data.len() {
            let mut parts = data.clone();
            let (a, b) = parts.split_at_mut(cut);
            apply_mask(a, key, 0);
            apply_mask(b, key, cut);
            assert_eq!(parts, whole, "cut at {cut}");
        }
    }
}
