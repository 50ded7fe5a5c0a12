//! Fixtures shared by the `map` and `info` tests (`map_raw`, `map_qcow2`,
//! `map_chains`, `info`): test content, a count of map extents, and the usual
//! mix of qemu-io writes.

use serde_json::Value;

use super::oracle::count_extents;

/// A deterministic, incompressible-looking byte pattern (xorshift).
pub fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

/// How many extents of a parsed map have `key` equal to `val`.
pub fn has(map: &Value, key: &str, val: bool) -> usize {
    count_extents(map, |e| e[key] == val)
}

/// The usual mix: data, zero, unmapped zero, discard, compressed, unaligned.
pub const MIX: &[&str] = &[
    "write -P 0x11 0 64k",
    "write -P 0x12 100k 3000",
    "write -z 192k 64k",
    "write -P 0x13 320k 128k",
    "discard 384k 64k",
    "write -c -P 0x14 512k 128k",
    "write -P 0x15 1M 4k",
    "write -z -u 1M 4k",
    "write -P 0x16 2M 8k",
    "write -z -u 2M 64k",
    "write -P 0x17 3M 1",
    "write -P 0x18 4194303 1",
];
