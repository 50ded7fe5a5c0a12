//! `qbackup compare A B`: do two images (or exports) hold the same guest
//! data? Answers like `qemu-img compare`: identical, or the first differing
//! guest offset; a size difference is fine when the longer image's tail
//! reads as zeros, unless strict.
//!
//! Fast on sparse images: block status is compared before bytes, so ranges
//! both sides report as zeros are never read; the rest is read and compared
//! in 1 MiB pieces on all cores, and the first mismatch in offset order is
//! reported, whatever the thread count.
//!
//! The offset reported is qemu-img's: it compares chunk by chunk (a chunk
//! starts wherever either side's block status changes) and names the
//! first differing 512-byte block counted from the chunk's start. A raw
//! file of an odd size (QEMU reads it as sector-rounded, zeros after its
//! end) has a chunk starting at its end, so a difference there is reported
//! at that byte, not at the sector. A size difference is only warned about
//! once the common part compared equal, as qemu-img does.
//!
//! Strict mode refuses a size difference and any range where the two sides
//! disagree on allocation (present), zero or data. (`qemu-img compare -s`
//! compares QEMU's internal block-status words, which also differ where
//! only the lengths of runs differ; those are not visible to a tool.)

use rayon::prelude::*;

use qbackup_formats::GuestOffset;

use crate::source::{Source, SourceError};

/// Guest bytes one worker compares at a time.
const PIECE: u64 = 1 << 20;

/// qemu-img reports the first differing 512-byte block of a chunk, not the
/// byte.
const SECTOR: u64 = 512;

/// What a comparison found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The same guest data (`sizes_differ`: the longer tail reads as zeros).
    Identical {
        /// The virtual sizes differ.
        sizes_differ: bool,
    },
    /// The first guest offset where the bytes differ (as qemu-img names
    /// it: see the module docs).
    ContentMismatch {
        /// The offset.
        offset: u64,
        /// The virtual sizes differ and the mismatch lies past the shorter
        /// image's end (only then does qemu-img warn about the sizes).
        sizes_differ: bool,
    },
    /// Strict mode: the virtual sizes differ.
    SizeMismatch,
    /// Strict mode: allocation, zero or data flags differ at this offset.
    StatusMismatch {
        /// The offset.
        offset: u64,
    },
}

/// Compares `a` and `b`; see the module docs.
pub fn compare(a: &dyn Source, b: &dyn Source, strict: bool) -> Result<Outcome, SourceError> {
    let (sa, sb) = (a.virtual_size(), b.virtual_size());
    let sizes_differ = sa != sb;
    if strict && sizes_differ {
        return Ok(Outcome::SizeMismatch);
    }
    let common = sa.min(sb);
    // Ranges that need reading, from the block status of both sides.
    let mut ranges: Vec<(u64, u64)> = Vec::new();
    let mut pos = 0u64;
    while pos < common {
        let (ea, la) = a.status(GuestOffset(pos), common - pos)?;
        let (eb, lb) = b.status(GuestOffset(pos), common - pos)?;
        let chunk = la.min(lb);
        if strict && (ea.present, ea.zero, ea.data) != (eb.present, eb.zero, eb.data) {
            return Ok(Outcome::StatusMismatch { offset: pos });
        }
        if !(ea.zero && eb.zero) {
            push_range(&mut ranges, pos, chunk);
        }
        pos += chunk;
    }
    if let Some(offset) = first_difference(&ranges, |off, len| {
        let mut x = vec![0u8; len];
        let mut y = vec![0u8; len];
        a.read(GuestOffset(off), &mut x)?;
        b.read(GuestOffset(off), &mut y)?;
        Ok(x.iter().zip(&y).position(|(p, q)| p != q))
    })? {
        return Ok(Outcome::ContentMismatch {
            offset,
            sizes_differ: false,
        });
    }
    // The longer side's tail must read as zeros.
    let longer = if sa > sb { a } else { b };
    let mut tail = Vec::new();
    let mut pos = common;
    while pos < longer.virtual_size() {
        let (e, len) = longer.status(GuestOffset(pos), longer.virtual_size() - pos)?;
        if !e.zero {
            push_range(&mut tail, pos, len);
        }
        pos += len;
    }
    let nonzero = first_difference(&tail, |off, len| {
        let mut x = vec![0u8; len];
        longer.read(GuestOffset(off), &mut x)?;
        Ok(x.iter().position(|&v| v != 0))
    })?;
    Ok(match nonzero {
        Some(offset) => Outcome::ContentMismatch {
            offset,
            sizes_differ,
        },
        None => Outcome::Identical { sizes_differ },
    })
}

/// Appends a chunk to the ranges to read, merged with the previous range
/// when adjacent and in the same 512-byte phase (so that every range
/// starts in the phase of qemu-img's chunk: see [`first_difference`]).
fn push_range(ranges: &mut Vec<(u64, u64)>, start: u64, len: u64) {
    match ranges.last_mut() {
        Some((s, l)) if *s + *l == start && *s % SECTOR == start % SECTOR => *l += len,
        _ => ranges.push((start, len)),
    }
}

/// The first offset, in order, where `check(offset, len)` finds a
/// difference (it returns the index inside the piece), checking pieces of
/// the ranges in parallel; reported as qemu-img does, as the start of the
/// differing 512-byte block counted from the range's start (pieces are
/// [`PIECE`] apart, a multiple of 512, so counting from the piece is the
/// same).
fn first_difference(
    ranges: &[(u64, u64)],
    check: impl Fn(u64, usize) -> Result<Option<usize>, SourceError> + Sync,
) -> Result<Option<u64>, SourceError> {
    let pieces: Vec<(u64, usize)> = ranges
        .iter()
        .flat_map(|&(start, len)| {
            (0..len.div_ceil(PIECE)).map(move |i| {
                let off = start + i * PIECE;
                (off, PIECE.min(start + len - off) as usize)
            })
        })
        .collect();
    pieces
        .par_iter()
        .map(|&(off, len)| check(off, len).map(|d| d.map(|i| off + i as u64 / SECTOR * SECTOR)))
        .find_map_first(|r| match r {
            Ok(None) => None,
            other => Some(other),
        })
        .unwrap_or(Ok(None))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_merge_when_adjacent() {
        let mut r = Vec::new();
        push_range(&mut r, 0, 1024);
        push_range(&mut r, 1024, 512);
        push_range(&mut r, 2048, 1);
        assert_eq!(r, vec![(0, 1536), (2048, 1)]);
        // A chunk in another 512-byte phase starts a range of its own.
        let mut r = Vec::new();
        push_range(&mut r, 0, 1000);
        push_range(&mut r, 1000, 24);
        push_range(&mut r, 1024, 512);
        assert_eq!(r, vec![(0, 1000), (1000, 24), (1024, 512)]);
    }

    #[test]
    fn first_difference_is_in_offset_order() {
        let ranges = [(0, 5 * PIECE)];
        // Every piece from the second on differs at byte 7.
        let found = first_difference(&ranges, |off, _| Ok((off >= PIECE).then_some(7))).unwrap();
        assert_eq!(found, Some(PIECE));
        let found = first_difference(&ranges, |off, _| Ok((off >= PIECE).then_some(700))).unwrap();
        assert_eq!(found, Some(PIECE + 512));
        // Counted from an odd range start, as qemu-img counts from its chunk.
        let found = first_difference(&[(1000, 24)], |_, _| Ok(Some(3))).unwrap();
        assert_eq!(found, Some(1000));
        assert_eq!(first_difference(&ranges, |_, _| Ok(None)).unwrap(), None);
    }
}
