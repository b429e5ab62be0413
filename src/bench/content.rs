//! What the load generator's messages carry: a 16-byte header (sequence number and send time),
//! then a body that is the same for every message of a run.

/// The body of every message, and whether messages are text or binary.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Content {
    /// Binary messages: the header in little-endian binary, then a fixed byte pattern
    /// (the default).
    #[default]
    Binary,
    /// Text messages of JSON objects one after another, like a chat or an event feed sends:
    /// `{"id":…,"type":"message","user":"user17","room":"general","ts":…,"text":"…"},`
    Json,
    /// Text messages of English-like prose drawn from a vocabulary of 64 words.
    Text,
}

impl Content {
    /// Parses `binary`, `json` or `text`.
    pub fn parse(s: &str) -> Option<Content> {
        match s {
            "binary" => Some(Content::Binary),
            "json" => Some(Content::Json),
            "text" => Some(Content::Text),
            _ => None,
        }
    }

    /// The name [`parse`](Self::parse) takes.
    pub fn name(self) -> &'static str {
        match self {
            Content::Binary => "binary",
            Content::Json => "json",
            Content::Text => "text",
        }
    }

    /// Whether messages are sent as text.
    pub fn is_text(self) -> bool {
        self != Content::Binary
    }

    /// A message of `size` bytes (at least the header): header space, then the body. Text
    /// bodies are ASCII. The same for every run.
    pub fn template(self, size: usize) -> Vec<u8> {
        let mut m = vec![b'A'; HEADER.min(size)];
        let mut rng = XorShift(0x9e37_79b9_7f4a_7c15);
        match self {
            Content::Binary => {
                m.fill(0);
                m.extend((HEADER..size).map(|i| (i as u8).wrapping_mul(31).wrapping_add(7)));
            }
            Content::Json => {
                let mut id = 100_000 + rng.below(900_000);
                let mut ts = 1_700_000_000_000 + rng.below(1_000_000);
                while m.len() < size {
                    id += 1 + rng.below(5);
                    ts += rng.below(2_000);
                    let kind = ["message", "message", "message", "typing", "presence"][rng.below(5) as usize];
                    let room = ["general", "random", "dev", "ops"][rng.below(4) as usize];
                    m.extend_from_slice(
                        format!(
                            "{{\"id\":{id},\"type\":\"{kind}\",\"user\":\"user{}\",\"room\":\"{room}\",\"ts\":{ts},\"text\":\"",
                            rng.below(100)
                        )
                        .as_bytes(),
                    );
                    let words = 3 + rng.below(10);
                    sentence(&mut m, &mut rng, words as usize, false);
                    m.extend_from_slice(b"\"},");
                }
            }
            Content::Text => {
                while m.len() < size {
                    let words = 6 + rng.below(14);
                    sentence(&mut m, &mut rng, words as usize, true);
                    m.push(if rng.below(6) == 0 { b'\n' } else { b' ' });
                }
            }
        }
        m.truncate(size);
        m
    }

    /// Writes sequence number `seq` and send time `ts` (nanoseconds) into the header.
    pub(crate) fn write_header(self, m: &mut [u8], seq: u64, ts: u64) {
        if self.is_text() {
            encode48(&mut m[..8], seq);
            encode48(&mut m[8..HEADER], ts);
        } else {
            m[..8].copy_from_slice(&seq.to_le_bytes());
            m[8..HEADER].copy_from_slice(&ts.to_le_bytes());
        }
    }

    /// The sequence number and send time in a header, or `None` if it is not one.
    pub(crate) fn read_header(self, m: &[u8]) -> Option<(u64, u64)> {
        let h = m.get(..HEADER)?;
        if self.is_text() {
            Some((decode48(&h[..8])?, decode48(&h[8..])?))
        } else {
            Some((
                u64::from_le_bytes(h[..8].try_into().ok()?),
                u64::from_le_bytes(h[8..].try_into().ok()?),
            ))
        }
    }
}

const HEADER: usize = super::MESSAGE_HEADER;

const VOCABULARY: [&str; 64] = [
    "the", "of", "and", "a", "to", "in", "is", "you", "that", "it", "he", "was", "for", "on", "are", "as", "with",
    "his", "they", "at", "be", "this", "have", "from", "or", "one", "had", "by", "word", "but", "not", "what", "all",
    "were", "we", "when", "your", "can", "said", "there", "use", "an", "each", "which", "she", "do", "how", "their",
    "if", "will", "up", "other", "about", "out", "many", "then", "them", "these", "so", "some", "her", "would", "make",
    "like",
];

/// `words` words from the vocabulary, capitalised and ending with a full stop if `prose`.
fn sentence(m: &mut Vec<u8>, rng: &mut XorShift, words: usize, prose: bool) {
    for i in 0..words {
        if i > 0 {
            let comma = prose && rng.below(12) == 0;
            m.extend_from_slice(if comma { b", " } else { b" " });
        }
        let w = VOCABULARY[rng.below(64) as usize].as_bytes();
        let start = m.len();
        m.extend_from_slice(w);
        if prose && i == 0 {
            m[start] = m[start].to_ascii_uppercase();
        }
    }
    if prose {
        m.push(b'.');
    }
}

/// A deterministic sequence: the same body on every run and every machine.
struct XorShift(u64);

impl XorShift {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

const DIGITS: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

/// The low 48 bits of `v` as 8 base64 digits, most significant first.
fn encode48(out: &mut [u8], v: u64) {
    for (i, b) in out.iter_mut().enumerate() {
        *b = DIGITS[((v >> (42 - 6 * i)) & 63) as usize];
    }
}

fn decode48(s: &[u8]) -> Option<u64> {
    s.iter().try_fold(0u64, |v, &c| {
        let d = DIGITS.iter().position(|&x| x == c)? as u64;
        Some(v << 6 | d)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn templates_have_the_size_and_kind_asked_for() {
        for c in [Content::Binary, Content::Json, Content::Text] {
            for size in [16, 17, 100, 1024, 65536] {
                let t = c.template(size);
                assert_eq!(t.len(), size, "{c:?}");
                assert_eq!(c.template(size), t, "deterministic");
                if c.is_text() {
                    assert!(t.is_ascii());
                }
            }
            assert_eq!(Content::parse(c.name()), Some(c));
        }
        let json = String::from_utf8(Content::Json.template(300)).unwrap();
        assert!(json[16..].starts_with("{\"id\":"), "{json}");
        let text = String::from_utf8(Content::Text.template(300)).unwrap();
        assert!(text[16..].contains(". "), "{text}");
    }

    #[test]
    fn headers_round_trip() {
        for c in [Content::Binary, Content::Json] {
            let mut m = c.template(40);
            for (seq, ts) in [(0, 0), (1, 2), ((1 << 48) - 1, 123_456_789_012)] {
                c.write_header(&mut m, seq, ts);
                assert_eq!(c.read_header(&m), Some((seq, ts)));
                if c.is_text() {
                    assert!(std::str::from_utf8(&m).is_ok());
                }
            }
        }
        assert_eq!(Content::Text.read_header(b"!AAAAAAAAAAAAAAA"), None);
        assert_eq!(Content::Text.read_header(b"short"), None);
    }
}
