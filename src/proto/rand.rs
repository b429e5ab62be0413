//! Where the core's randomness comes from: masking keys and `Sec-WebSocket-Key` nonces.
//!
//! The core never picks a generator itself. A driver hands it a [`RandomSource`]; with the
//! `std` feature, [`OsSeeded`] is the default: ChaCha12 seeded once from the operating system,
//! as RFC 6455 §5.3 asks ("derived from a strong source of entropy") and cheap per frame
//! (a 4-byte key is a copy out of a 256-byte block buffer).

/// A source of unpredictable bytes.
pub trait RandomSource {
    /// Fills `dest` with random bytes.
    fn fill(&mut self, dest: &mut [u8]);

    /// A fresh masking key.
    fn mask_key(&mut self) -> [u8; 4] {
        let mut k = [0u8; 4];
        self.fill(&mut k);
        k
    }
}

impl<R: RandomSource + ?Sized> RandomSource for &mut R {
    fn fill(&mut self, dest: &mut [u8]) {
        (**self).fill(dest)
    }
    fn mask_key(&mut self) -> [u8; 4] {
        (**self).mask_key()
    }
}

/// For the server role, which never masks: using it to mask is a bug, so it panics.
/// Servers pass it where a source is asked for and never needed.
#[derive(Clone, Copy, Debug, Default)]
pub struct NoRandom;

impl RandomSource for NoRandom {
    fn fill(&mut self, _dest: &mut [u8]) {
        unreachable!("a server connection never asks for random bytes")
    }
}

#[cfg(feature = "std")]
pub use os::OsSeeded;

#[cfg(feature = "std")]
mod os {
    use rand_chacha::rand_core::{RngCore, SeedableRng};
    use rand_chacha::ChaCha12Rng;

    /// ChaCha12 seeded from the operating system's random source.
    pub struct OsSeeded(ChaCha12Rng);

    impl core::fmt::Debug for OsSeeded {
        fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
            f.write_str("OsSeeded")
        }
    }

    impl OsSeeded {
        /// A generator seeded from the OS. Fails only if the OS has no random source.
        pub fn new() -> std::io::Result<OsSeeded> {
            let mut seed = [0u8; 32];
            getrandom::fill(&mut seed).map_err(|e| std::io::Error::other(e.to_string()))?;
            Ok(OsSeeded(ChaCha12Rng::from_seed(seed)))
        }
    }

    impl super::RandomSource for OsSeeded {
        fn fill(&mut self, dest: &mut [u8]) {
            self.0.fill_bytes(dest)
        }
        fn mask_key(&mut self) -> [u8; 4] {
            self.0.next_u32().to_ne_bytes()
        }
    }

    #[cfg(test)]
    mod tests {
        use super::super::RandomSource;
        use super::*;

        #[test]
        fn keys_vary_between_calls_and_generators() {
            let mut a = OsSeeded::new().unwrap();
            let mut b = OsSeeded::new().unwrap();
            let ka: Vec<[u8; 4]> = (0..16).map(|_| a.mask_key()).collect();
            let kb: Vec<[u8; 4]> = (0..16).map(|_| b.mask_key()).collect();
            assert_ne!(ka, kb, "two generators are seeded differently");
            assert!(ka.iter().any(|k| *k != ka[0]), "keys vary");
        }
    }
}
