//! The bitmap directory (spec "Bitmaps extension", "Bitmap directory").
//!
//! Entries are variable length: a 24-byte fixed part, extra data, the name,
//! then padding to 8 bytes. The directory is only meaningful when autoclear
//! bit 0 is set; otherwise a writer unaware of bitmaps has touched the image
//! and QEMU ignores the extension, and so do we.
//!
//! The checks are QEMU's (block/qcow2-bitmap.c), because QEMU refuses to
//! open an image whose directory fails them, and `info`, `map` and `backup`
//! must agree with it and with each other: the directory is cluster aligned
//! and its entries fill it exactly; each entry is a dirty-tracking bitmap
//! with granularity 2^9..2^31, no reserved flag (QEMU counts
//! extra_data_compatible among them), no extra data, a non-empty name unique
//! in the directory, and a non-empty, cluster-aligned bitmap table.

use crate::error::{Classify, ErrorClass, Remedy};
use crate::storage::{Storage, StorageError};
use crate::units::HostOffset;

use super::header::BitmapsExtension;
use super::table::{be16, be32, be64};

/// QEMU's limits (block/qcow2.h).
const MAX_BITMAPS: u32 = 65535;
const MAX_DIRECTORY_BYTES: u64 = 1024 * (24 + 1023 + 64 + 7) + 8 * 1024 * 1024;

/// Bitmap entry flags.
pub mod flags {
    /// The bitmap was open for writing and not stored cleanly.
    pub const IN_USE: u32 = 1 << 0;
    /// The bitmap tracks writes automatically.
    pub const AUTO: u32 = 1 << 1;
    /// Flags QEMU does not accept (it treats extra_data_compatible, bit 2,
    /// as reserved because it defines no extra data).
    pub const RESERVED: u32 = !(IN_USE | AUTO);
}

/// Errors in the bitmap directory.
#[derive(Debug, thiserror::Error)]
pub enum BitmapError {
    /// The directory could not be read.
    #[error("cannot read bitmap directory: {0}")]
    Read(#[from] StorageError),
    /// The bitmap was left in use: QEMU did not store it cleanly.
    #[error("dirty bitmap '{name}' is marked in use (a QEMU has the image open, or was killed and did not store it): its bits cannot be trusted; once no QEMU runs, replace it (qemu-img bitmap --remove, then --add) and take a full backup")]
    InUse {
        /// The bitmap.
        name: String,
    },
    /// The bitmap does not track writes (`qemu-img bitmap --disable`), so
    /// it misses every write since it was disabled.
    #[error("dirty bitmap '{name}' is disabled: it does not record writes made since it was disabled, so an incremental backup from it could miss data (enable it with qemu-img bitmap --enable, or allow it explicitly if it was disabled on purpose at a backup point)")]
    Disabled {
        /// The bitmap.
        name: String,
    },
    /// No bitmap has the name asked for.
    #[error(
        "no persistent dirty bitmap named '{name}' in the image ({})",
        existing_text(existing)
    )]
    NotFound {
        /// The name asked for.
        name: String,
        /// The names the image has (a typo is then plain to see).
        existing: Vec<String>,
    },
    /// The directory or a bitmap table is malformed.
    #[error("invalid bitmap directory at offset {offset}: {why}")]
    Invalid {
        /// Where the bad entry starts.
        offset: HostOffset,
        /// What is wrong.
        why: &'static str,
    },
}

/// "it has 'a', 'b'" or "it has none".
fn existing_text(names: &[String]) -> String {
    if names.is_empty() {
        return "it has none".to_string();
    }
    let quoted: Vec<String> = names.iter().map(|n| format!("'{n}'")).collect();
    format!("it has {}", quoted.join(", "))
}

/// The error for a bitmap `name` missing from the directory `entries`.
pub fn not_found(name: &str, entries: &[BitmapEntry]) -> BitmapError {
    BitmapError::NotFound {
        name: name.to_string(),
        existing: entries.iter().map(|e| e.name.clone()).collect(),
    }
}

impl Classify for BitmapError {
    fn class(&self) -> ErrorClass {
        match self {
            BitmapError::Read(e) => e.class(),
            BitmapError::Invalid { .. } | BitmapError::InUse { .. } => ErrorClass::Corrupt,
            BitmapError::NotFound { .. } | BitmapError::Disabled { .. } => ErrorClass::Usage,
        }
    }

    fn remedy(&self) -> Option<Remedy> {
        match self {
            BitmapError::Read(e) => e.remedy(),
            BitmapError::Disabled { .. } => Some(Remedy::AllowDisabledBitmap),
            _ => None,
        }
    }
}

impl BitmapError {
    /// True when the bitmap asked for cannot be used (missing, left in use,
    /// disabled, or its directory is invalid) while the image itself may
    /// read fine; false when reading failed.
    pub fn is_unusable(&self) -> bool {
        !matches!(self, BitmapError::Read(_))
    }
}

/// One bitmap directory entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BitmapEntry {
    /// The bitmap's name.
    pub name: String,
    /// Bytes of guest data per bit.
    pub granularity: u64,
    /// Raw flags (see [`flags`]).
    pub flags: u32,
    /// Where the bitmap table is.
    pub table_offset: HostOffset,
    /// Bitmap table entries.
    pub table_size: u32,
}

/// Reads and validates the bitmap directory of an image with
/// `cluster_bits` (see the module docs for the checks).
pub fn read_directory(
    storage: &dyn Storage,
    ext: &BitmapsExtension,
    cluster_bits: u32,
) -> Result<Vec<BitmapEntry>, BitmapError> {
    let invalid = |offset, why| BitmapError::Invalid { offset, why };
    let base = ext.directory_offset;
    let cluster_mask = (1u64 << cluster_bits) - 1;
    if ext.nb_bitmaps == 0 || ext.nb_bitmaps > MAX_BITMAPS {
        return Err(invalid(base, "bitmap count out of range"));
    }
    if ext.directory_size > MAX_DIRECTORY_BYTES || ext.directory_size < 24 {
        return Err(invalid(base, "directory size out of range"));
    }
    if base.0 & cluster_mask != 0 {
        return Err(invalid(base, "directory is not cluster aligned"));
    }
    let mut dir = vec![0u8; ext.directory_size as usize];
    storage.read_exact_at("bitmap directory", &mut dir, base)?;
    let mut out: Vec<BitmapEntry> = Vec::new();
    let mut at = 0usize;
    for _ in 0..ext.nb_bitmaps {
        let here = HostOffset(base.0 + at as u64);
        let fixed = dir
            .get(at..at + 24)
            .ok_or(invalid(here, "entry runs past the directory"))?;
        let table_offset = be64(fixed, 0);
        let table_size = be32(fixed, 8);
        let flag_bits = be32(fixed, 12);
        let kind = fixed[16];
        let granularity_bits = fixed[17];
        let name_size = usize::from(be16(fixed, 18));
        let extra = be32(fixed, 20) as usize;
        if kind != 1 {
            return Err(invalid(here, "unknown bitmap type"));
        }
        if !(9..=31).contains(&granularity_bits) {
            return Err(invalid(here, "granularity out of range"));
        }
        if flag_bits & flags::RESERVED != 0 {
            return Err(invalid(here, "reserved flags set"));
        }
        if extra != 0 {
            return Err(invalid(here, "extra data (which QEMU does not support)"));
        }
        if name_size == 0 || name_size > 1023 {
            return Err(invalid(here, "name length out of range"));
        }
        if table_size == 0 || table_offset == 0 || table_offset & cluster_mask != 0 {
            return Err(invalid(here, "bitmap table missing or not cluster aligned"));
        }
        let name_at = at + 24;
        let name = dir
            .get(name_at..name_at + name_size)
            .ok_or(invalid(here, "entry runs past the directory"))?;
        let name =
            String::from_utf8(name.to_vec()).map_err(|_| invalid(here, "name is not UTF-8"))?;
        if out.iter().any(|e| e.name == name) {
            return Err(invalid(here, "two bitmaps have the same name"));
        }
        out.push(BitmapEntry {
            name,
            granularity: 1u64 << granularity_bits,
            flags: flag_bits,
            table_offset: HostOffset(table_offset),
            table_size,
        });
        at = (name_at + name_size).div_ceil(8) * 8;
    }
    if at as u64 != ext.directory_size {
        return Err(invalid(base, "entries do not fill the directory exactly"));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::memory::MemoryStorage;

    const CLUSTER_BITS: u32 = 16;
    const DIR_AT: u64 = 1 << CLUSTER_BITS;

    /// One directory entry: table at 128 KiB, one table entry.
    fn entry(name: &str, flag_bits: u32, kind: u8, granularity_bits: u8, extra: u32) -> Vec<u8> {
        let mut e = Vec::new();
        e.extend_from_slice(&(2u64 << CLUSTER_BITS).to_be_bytes());
        e.extend_from_slice(&1u32.to_be_bytes());
        e.extend_from_slice(&flag_bits.to_be_bytes());
        e.push(kind);
        e.push(granularity_bits);
        e.extend_from_slice(&(name.len() as u16).to_be_bytes());
        e.extend_from_slice(&extra.to_be_bytes());
        e.extend(std::iter::repeat_n(0u8, extra as usize));
        e.extend_from_slice(name.as_bytes());
        e.resize(e.len().div_ceil(8) * 8, 0);
        e
    }

    /// Reads a directory made of `entries`, placed at `at`, claiming
    /// `nb` bitmaps and `size` bytes (the real ones when `None`).
    fn read(
        entries: &[Vec<u8>],
        at: u64,
        nb: Option<u32>,
        size: Option<u64>,
    ) -> Result<Vec<BitmapEntry>, BitmapError> {
        let bytes: Vec<u8> = entries.concat();
        let mut file = vec![0u8; 3 << CLUSTER_BITS];
        file[at as usize..at as usize + bytes.len()].copy_from_slice(&bytes);
        let storage = MemoryStorage::read_only("img", file);
        let ext = BitmapsExtension {
            nb_bitmaps: nb.unwrap_or(entries.len() as u32),
            directory_size: size.unwrap_or(bytes.len() as u64),
            directory_offset: HostOffset(at),
        };
        read_directory(&storage, &ext, CLUSTER_BITS)
    }

    fn why(r: Result<Vec<BitmapEntry>, BitmapError>) -> &'static str {
        match r {
            Err(BitmapError::Invalid { why, .. }) => why,
            other => panic!("expected an invalid directory, got {other:?}"),
        }
    }

    #[test]
    fn a_valid_directory_lists_its_bitmaps() {
        let got = read(
            &[
                entry("a", flags::AUTO, 1, 16, 0),
                entry("longer-name", flags::IN_USE, 1, 9, 0),
            ],
            DIR_AT,
            None,
            None,
        )
        .unwrap();
        assert_eq!(got.len(), 2);
        assert_eq!(got[0].name, "a");
        assert_eq!(got[0].granularity, 64 << 10);
        assert_eq!(got[0].flags, flags::AUTO);
        assert_eq!(got[0].table_offset, HostOffset(2 << CLUSTER_BITS));
        assert_eq!(got[1].name, "longer-name");
        assert_eq!(got[1].granularity, 512);
    }

    #[test]
    fn every_cross_check_qemu_makes_is_made() {
        let ok = || entry("a", 0, 1, 16, 0);
        assert_eq!(
            why(read(&[entry("a", 0, 2, 16, 0)], DIR_AT, None, None)),
            "unknown bitmap type"
        );
        assert_eq!(
            why(read(&[entry("a", 0, 1, 8, 0)], DIR_AT, None, None)),
            "granularity out of range"
        );
        assert_eq!(
            why(read(&[entry("a", 1 << 2, 1, 16, 0)], DIR_AT, None, None)),
            "reserved flags set"
        );
        assert!(why(read(&[entry("a", 0, 1, 16, 8)], DIR_AT, None, None)).contains("extra data"));
        assert_eq!(
            why(read(&[ok(), ok()], DIR_AT, None, None)),
            "two bitmaps have the same name"
        );
        assert_eq!(
            why(read(&[ok()], DIR_AT + 512, None, None)),
            "directory is not cluster aligned"
        );
        assert_eq!(
            why(read(&[ok()], DIR_AT, None, Some(40))),
            "entries do not fill the directory exactly"
        );
        assert_eq!(
            why(read(&[ok()], DIR_AT, Some(2), None)),
            "entry runs past the directory"
        );
        assert_eq!(
            why(read(&[ok()], DIR_AT, Some(0), None)),
            "bitmap count out of range"
        );
        let mut no_table = ok();
        no_table[..8].copy_from_slice(&0u64.to_be_bytes());
        assert!(why(read(&[no_table], DIR_AT, None, None)).contains("bitmap table"));
        let mut unaligned = ok();
        unaligned[..8].copy_from_slice(&((2u64 << CLUSTER_BITS) + 512).to_be_bytes());
        assert!(why(read(&[unaligned], DIR_AT, None, None)).contains("bitmap table"));
    }
}
