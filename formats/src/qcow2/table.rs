//! Big-endian fields and tables, in one place (qcow2 spec: "All numbers in
//! qcow2 are stored in Big Endian byte order").
//!
//! The header, L1/L2 tables, the refcount table and the bitmap directory are
//! all decoded and encoded through these helpers, so the byte order and the
//! "a table is whole clusters of 64-bit entries" rule are written once.
//! Field helpers panic only on a caller's out-of-range index, which callers
//! prevent by checking lengths first.

use crate::storage::{Storage, StorageError};
use crate::units::HostOffset;

/// The big-endian u16 at `at`.
pub fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

/// The big-endian u32 at `at`.
pub fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

/// The big-endian u64 at `at`.
pub fn be64(b: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

/// The 64-bit entries of a table (a trailing partial entry is ignored).
pub fn entries(raw: &[u8]) -> impl Iterator<Item = u64> + '_ {
    raw.chunks_exact(8)
        .map(|c| u64::from_be_bytes(c.try_into().expect("8 bytes")))
}

/// Decodes a table of 64-bit entries (a trailing partial entry is ignored).
pub fn decode(raw: &[u8]) -> Vec<u64> {
    entries(raw).collect()
}

/// Appends `entries` to `out`, big-endian.
pub fn encode_into(entries: impl IntoIterator<Item = u64>, out: &mut Vec<u8>) {
    for e in entries {
        out.extend_from_slice(&e.to_be_bytes());
    }
}

/// Reads a table of `entries` 64-bit entries at `offset`; the whole table
/// must lie inside the storage.
pub fn read(
    storage: &dyn Storage,
    what: &'static str,
    offset: HostOffset,
    entries: u64,
) -> Result<Vec<u64>, StorageError> {
    let len = entries.saturating_mul(8);
    storage.check_range(what, offset, len)?;
    let mut raw = vec![0u8; len as usize];
    storage.read_exact_at(what, &mut raw, offset)?;
    Ok(decode(&raw))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let entries = [0u64, 1, 0x8000_0000_0003_0000, u64::MAX];
        let mut raw = Vec::new();
        encode_into(entries, &mut raw);
        assert_eq!(raw.len(), 32);
        assert_eq!(&raw[16..24], &[0x80, 0, 0, 0, 0, 3, 0, 0]);
        assert_eq!(decode(&raw), entries);
        assert_eq!(be16(&raw, 22), 0);
        assert_eq!(be32(&raw, 16), 0x8000_0000);
        assert_eq!(be64(&raw, 8), 1);
    }
}
