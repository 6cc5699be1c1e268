//! Deterministic sample data for the tests, benchmarks and examples (the
//! proxy itself never uses it): a tiny PRNG and device IDs shaped like real
//! ones. One definition, so a seed means the same IDs everywhere.

pub use crate::util::rng::SplitMix64;

/// UUID-shaped device IDs drawn from a [`SplitMix64`].
pub trait Uuids {
    /// A UUID-v4-shaped string, like many devices' IDs.
    fn uuid(&mut self) -> String;
}

impl Uuids for SplitMix64 {
    fn uuid(&mut self) -> String {
        let (a, b) = (self.next_u64(), self.next_u64());
        format!(
            "{:08x}-{:04x}-4{:03x}-{:04x}-{:012x}",
            a >> 32,
            (a >> 16) & 0xffff,
            a & 0xfff,
            (b >> 48) & 0x3fff | 0x8000,
            b & 0xffff_ffff_ffff
        )
    }
}

/// `n` UUID-shaped device IDs, the same for the same seed.
pub fn uuids(seed: u64, n: usize) -> Vec<String> {
    let mut rng = SplitMix64::new(seed);
    (0..n).map(|_| rng.uuid()).collect()
}

/// `n` varied device IDs for comparing placement with nginx: UUIDs, short
/// and long ones (up to 1,500 bytes), IDs with percent-escapes, `+`, quotes
/// and separators, and non-ASCII UTF-8. Never empty, never a control
/// character, no space at either end: each survives an HTTP header line
/// byte for byte.
pub fn varied_ids(seed: u64, n: usize) -> Vec<String> {
    const ASCII: &[u8] = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.:/=&;,+%\"' !~*()@";
    const WORDS: &[&str] = &[
        "caf\u{e9}",
        "\u{8a2d}\u{5099}",
        "\u{1f4f1}",
        "\u{dc}n\u{ef}c\u{f8}d\u{e9}",
        "\u{434}\u{430}\u{442}\u{447}\u{438}\u{43a}",
        "h\u{e9}%C3%A9",
        "a%20b",
        "x+y",
        "%zz",
        "%",
    ];
    fn ascii(rng: &mut SplitMix64, len: usize) -> String {
        (0..len).map(|_| char::from(ASCII[rng.below(ASCII.len())])).collect()
    }
    let mut rng = SplitMix64::new(seed);
    (0..n)
        .map(|i| {
            let id = match rng.below(100) {
                0..=39 => rng.uuid(),
                40..=54 => {
                    // Percent-escapes, valid or not, which nginx hashes raw.
                    let mut id = String::from("dev");
                    for _ in 0..1 + rng.below(4) {
                        let (byte, len) = (rng.below(256), rng.below(6));
                        id.push_str(&format!("%{byte:02X}{}", ascii(&mut rng, len)));
                    }
                    id
                }
                55..=69 => {
                    let word = WORDS[rng.below(WORDS.len())];
                    format!("{word}-{}", rng.below(100_000))
                }
                70..=79 => {
                    let len = 1 + rng.below(3);
                    ascii(&mut rng, len)
                }
                80..=97 => {
                    let len = 4 + rng.below(40);
                    ascii(&mut rng, len)
                }
                _ => {
                    let len = 200 + rng.below(1300);
                    ascii(&mut rng, len)
                }
            };
            // Servers trim spaces around header values.
            match id.trim() {
                "" => i.to_string(),
                trimmed => trimmed.to_string(),
            }
        })
        .collect()
}
