//! Deterministic test content: random (incompressible) and English-like
//! (compressible) bytes, files of them for qemu-io to write, and the
//! classification of a cluster's bytes that the backup tests expect to see
//! reflected in a target's map.

use super::scratch::Scratch;

impl Scratch {
    /// A text file of `len` bytes (realistic, compressible content) named
    /// `text-LEN.txt`, created on first use; returns its name.
    pub fn text_file(&self, len: u64) -> String {
        let name = format!("text-{len}.txt");
        if !self.path(&name).exists() {
            std::fs::write(self.path(&name), text_bytes(len as usize, 7)).expect("write text");
        }
        name
    }

    /// A file of `len` random bytes named `random-LEN.bin`, created on first use.
    pub fn random_file(&self, len: u64) -> String {
        let name = format!("random-{len}.bin");
        if !self.path(&name).exists() {
            std::fs::write(self.path(&name), random_bytes(len as usize, 99)).expect("write random");
        }
        name
    }

    /// The qemu-io command writing `len` bytes of text at `off` (`-c` for a
    /// compressed write).
    pub fn text_cmd(&self, flags: &str, off: u64, len: u64) -> String {
        format!("write {flags} -s {} {off} {len}", self.text_file(len))
    }

    /// The qemu-io command writing `len` random bytes at `off`.
    pub fn random_cmd(&self, flags: &str, off: u64, len: u64) -> String {
        format!("write {flags} -s {} {off} {len}", self.random_file(len))
    }
}

/// A deterministic xorshift64* generator.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
}

/// `len` random (incompressible) bytes.
pub fn random_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut rng = Rng::new(seed);
    let mut v = Vec::with_capacity(len + 8);
    while v.len() < len {
        v.extend_from_slice(&rng.next_u64().to_le_bytes());
    }
    v.truncate(len);
    v
}

/// `len` bytes of English-like text (compresses about 3:1 with zlib).
pub fn text_bytes(len: usize, seed: u64) -> Vec<u8> {
    const WORDS: &[&str] = &[
        "the",
        "backup",
        "of",
        "a",
        "virtual",
        "machine",
        "disk",
        "image",
        "is",
        "copied",
        "cluster",
        "by",
        "into",
        "compressed",
        "file",
        "and",
        "every",
        "guest",
        "byte",
        "must",
        "read",
        "back",
        "exactly",
        "as",
        "it",
        "was",
        "written",
        "when",
        "storage",
        "fails",
        "operator",
        "restores",
        "from",
        "yesterday",
        "snapshot",
        "kernel",
        "logs",
        "show",
        "that",
        "network",
        "interface",
        "came",
        "up",
        "after",
        "service",
        "started",
        "with",
        "configuration",
        "options",
        "for",
        "database",
        "tables",
        "indexes",
        "were",
        "rebuilt",
        "overnight",
        "without",
        "errors",
        "warnings",
        "users",
        "reported",
        "slow",
        "queries",
    ];
    let mut rng = Rng::new(seed);
    let mut s = Vec::with_capacity(len + 64);
    let mut line = 0usize;
    let mut sentence_start = true;
    while s.len() < len {
        let r = rng.next_u64();
        let w = WORDS[(r % WORDS.len() as u64) as usize];
        if sentence_start {
            let mut cap = w.to_owned();
            cap[..1].make_ascii_uppercase();
            s.extend_from_slice(cap.as_bytes());
            sentence_start = false;
        } else {
            s.extend_from_slice(w.as_bytes());
        }
        line += w.len() + 1;
        match (r >> 32) % 16 {
            0 => {
                s.extend_from_slice(b". ");
                sentence_start = true;
            }
            1 => s.extend_from_slice(b", "),
            2 => {
                s.extend_from_slice(format!(" {} ", (r >> 40) % 10_000).as_bytes());
            }
            _ => s.push(b' '),
        }
        if line > 72 {
            s.push(b'\n');
            line = 0;
        }
    }
    s.truncate(len);
    s
}

/// Order-0 entropy of `buf` in bits per byte.
pub fn entropy(buf: &[u8]) -> f64 {
    if buf.is_empty() {
        return 0.0;
    }
    let mut counts = [0u64; 256];
    for &b in buf {
        counts[b as usize] += 1;
    }
    let n = buf.len() as f64;
    counts
        .iter()
        .filter(|&&c| c > 0)
        .map(|&c| {
            let p = c as f64 / n;
            -p * p.log2()
        })
        .sum()
}

/// How a guest cluster's content must be stored by a compressing backup.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// All zeros: not stored as data.
    Zero,
    /// Clearly compressible (entropy well below 8 bits/byte): compressed.
    Compressible,
    /// Random: stored as an uncompressed data cluster.
    Incompressible,
    /// In between: no expectation beyond "data".
    Other,
}

/// Classify a cluster's guest bytes. Uniformly random bytes fall short of
/// 8 bits/byte of order-0 entropy by about 184/n bits for n bytes, so the
/// thresholds scale with the cluster size.
pub fn classify(buf: &[u8]) -> Kind {
    if buf.iter().all(|&b| b == 0) {
        return Kind::Zero;
    }
    let h = entropy(buf);
    let deficit = 184.0 / buf.len() as f64;
    if h < 7.0 && h < 7.0 - 3.0 * deficit {
        Kind::Compressible
    } else if buf.len() >= 512 && h > 8.0 - 3.0 * deficit {
        Kind::Incompressible
    } else {
        Kind::Other
    }
}
