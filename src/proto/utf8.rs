//! Incremental UTF-8 validation for text messages that arrive in pieces.
//!
//! A text message may be split over frames and over reads, and a code point may be split with it.
//! [`Utf8Validator`] remembers at most three bytes of an unfinished code point and fails as soon as
//! the bytes seen so far cannot begin valid UTF-8 (RFC 6455 §8.1: fail fast on invalid text).

/// Validation state carried between pieces of one text message. Five bytes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Utf8Validator {
    tail: [u8; 4],
    tail_len: u8,
}

/// The bytes seen so far are not a prefix of any valid UTF-8 text.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct InvalidUtf8;

impl core::fmt::Display for InvalidUtf8 {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str("invalid UTF-8")
    }
}

impl core::error::Error for InvalidUtf8 {}

/// Length of the code point that starts with `lead` (0 for a byte that cannot start one).
fn sequence_len(lead: u8) -> usize {
    match lead {
        0x00..=0x7f => 1,
        0xc2..=0xdf => 2,
        0xe0..=0xef => 3,
        0xf0..=0xf4 => 4,
        _ => 0,
    }
}

impl Utf8Validator {
    /// A validator at the start of a message.
    pub const fn new() -> Self {
        Utf8Validator {
            tail: [0; 4],
            tail_len: 0,
        }
    }

    /// Checks the next piece of the message.
    pub fn feed(&mut self, mut bytes: &[u8]) -> Result<(), InvalidUtf8> {
        if self.tail_len > 0 {
            // Finish the code point that the previous piece left open.
            let have = self.tail_len as usize;
            let need = sequence_len(self.tail[0]);
            let take = (need - have).min(bytes.len());
            self.tail[have..have + take].copy_from_slice(&bytes[..take]);
            let now = have + take;
            match core::str::from_utf8(&self.tail[..now]) {
                Ok(_) => self.tail_len = 0,
                Err(e) if e.error_len().is_none() => {
                    // Still a valid prefix; wait for more.
                    self.tail_len = now as u8;
                    return Ok(());
                }
                Err(_) => return Err(InvalidUtf8),
            }
            bytes = &bytes[take..];
        }
        match core::str::from_utf8(bytes) {
            Ok(_) => Ok(()),
            Err(e) if e.error_len().is_none() => {
                // The piece ends inside a code point that is valid so far.
                let rest = &bytes[e.valid_up_to()..];
                self.tail[..rest.len()].copy_from_slice(rest);
                self.tail_len = rest.len() as u8;
                Ok(())
            }
            Err(_) => Err(InvalidUtf8),
        }
    }

    /// Checks that the message does not end inside a code point.
    pub fn finish(&mut self) -> Result<(), InvalidUtf8> {
        let open = self.tail_len != 0;
        *self = Utf8Validator::new();
        if open {
            Err(InvalidUtf8)
        } else {
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check_split(bytes: &[u8]) -> Result<(), InvalidUtf8> {
        let expected = core::str::from_utf8(bytes).is_ok();
        for cut1 in 0..=bytes.len() {
            for cut2 in cut1..=bytes.len() {
                let mut v = Utf8Validator::new();
                let r = v
                    .feed(&bytes[..cut1])
                    .and_then(|_| v.feed(&bytes[cut1..cut2]))
                    .and_then(|_| v.feed(&bytes[cut2..]))
                    .and_then(|_| v.finish());
                assert_eq!(r.is_ok(), expected, "{bytes:x?} cut {cut1} {cut2}");
            }
        }
        if expected {
            Ok(())
        } else {
            Err(InvalidUtf8)
        }
    }

    #[test]
    fn valid_text_split_anywhere() {
        check_split("κόσμε € 𝄞 hello".as_bytes()).unwrap();
    }

    #[test]
    fn invalid_text_split_anywhere() {
        for bad in [
            &[
                0xce, 0xba, 0xe1, 0xbd, 0xb9, 0xcf, 0x83, 0xce, 0xbc, 0xce, 0xb5, 0xed, 0xa0, 0x80,
            ][..],
            &[0xf4, 0x90, 0x80, 0x80],
            &[0xc0, 0xaf],
            &[0xe0, 0x80, 0xaf],
            &[0xff],
            &[0xf0, 0x9d, 0x84],
        ] {
            check_split(bad).unwrap_err();
        }
    }

    #[test]
    fn fails_on_first_impossible_byte() {
        // U+10FFFF + 1 starts F4 90: invalid as soon as 0x90 arrives, long before the end.
        let mut v = Utf8Validator::new();
        v.feed(b"ok").unwrap();
        v.feed(&[0xf4]).unwrap();
        assert_eq!(v.feed(&[0x90]), Err(InvalidUtf8));
        // A surrogate half fails on its second byte.
        let mut v = Utf8Validator::new();
        v.feed(&[0xed]).unwrap();
        assert_eq!(v.feed(&[0xa0]), Err(InvalidUtf8));
    }

    #[test]
    fn unfinished_code_point_fails_at_finish() {
        let mut v = Utf8Validator::new();
        v.feed(&[0xe2, 0x82]).unwrap();
        assert_eq!(v.finish(), Err(InvalidUtf8));
        // finish resets for the next message
        v.feed(b"fine").unwrap();
        v.finish().unwrap();
    }
}
