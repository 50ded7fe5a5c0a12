//! Raw file access for damaging images on purpose and looking inside them:
//! byte patching and reading, qcow2 header field offsets, the L1/L2 walk and
//! header extensions (docs/interop/qcow2.txt).

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::Path;

// ---------------------------------------------------------------------------
// Bytes in files
// ---------------------------------------------------------------------------

/// Overwrite `bytes` at `offset` in an existing file.
pub fn patch(path: &Path, offset: u64, bytes: &[u8]) {
    OpenOptions::new()
        .write(true)
        .open(path)
        .unwrap_or_else(|e| panic!("open {} for patching: {e}", path.display()))
        .write_all_at(bytes, offset)
        .expect("patch write");
}

pub fn patch_u8(path: &Path, offset: u64, v: u8) {
    patch(path, offset, &[v]);
}

pub fn patch_u32(path: &Path, offset: u64, v: u32) {
    patch(path, offset, &v.to_be_bytes());
}

pub fn patch_u64(path: &Path, offset: u64, v: u64) {
    patch(path, offset, &v.to_be_bytes());
}

/// `len` bytes at `offset` (all of them, or a panic).
pub fn read_bytes(path: &Path, offset: u64, len: usize) -> Vec<u8> {
    let f = File::open(path).unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    let mut v = vec![0; len];
    f.read_exact_at(&mut v, offset).expect("read");
    v
}

/// Big-endian u32 at `offset`.
pub fn read_u32(path: &Path, offset: u64) -> u32 {
    be32(&read_bytes(path, offset, 4), 0)
}

/// Big-endian u64 at `offset`.
pub fn read_u64(path: &Path, offset: u64) -> u64 {
    be64(&read_bytes(path, offset, 8), 0)
}

fn be32(b: &[u8], at: u64) -> u32 {
    let at = at as usize;
    u32::from_be_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

fn be64(b: &[u8], at: u64) -> u64 {
    let at = at as usize;
    u64::from_be_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

pub fn file_len(path: &Path) -> u64 {
    std::fs::metadata(path).expect("stat").len()
}

pub fn set_len(path: &Path, len: u64) {
    OpenOptions::new()
        .write(true)
        .open(path)
        .expect("open for truncate")
        .set_len(len)
        .expect("truncate");
}

// ---------------------------------------------------------------------------
// qcow2 layout
// ---------------------------------------------------------------------------

/// qcow2 header field offsets.
pub mod hdr {
    pub const MAGIC: u64 = 0;
    pub const VERSION: u64 = 4;
    pub const BACKING_FILE_OFFSET: u64 = 8;
    pub const BACKING_FILE_SIZE: u64 = 16;
    pub const CLUSTER_BITS: u64 = 20;
    pub const SIZE: u64 = 24;
    pub const CRYPT_METHOD: u64 = 32;
    pub const L1_SIZE: u64 = 36;
    pub const L1_TABLE_OFFSET: u64 = 40;
    pub const REFCOUNT_TABLE_OFFSET: u64 = 48;
    pub const INCOMPATIBLE_FEATURES: u64 = 72;
    pub const COMPATIBLE_FEATURES: u64 = 80;
    pub const AUTOCLEAR_FEATURES: u64 = 88;
    pub const REFCOUNT_ORDER: u64 = 96;
    pub const HEADER_LENGTH: u64 = 100;
    pub const COMPRESSION_TYPE: u64 = 104;
}

/// Header extension types.
pub mod ext {
    pub const BACKING_FORMAT: u32 = 0xe279_2aca;
    pub const BITMAPS: u32 = 0x2385_2875;
}

/// Host offset bits of an L1 or standard L2 entry.
pub const ENTRY_OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
/// "COPIED" flag (refcount exactly one) of L1/L2 entries.
pub const OFLAG_COPIED: u64 = 1 << 63;
/// Compressed-cluster flag of L2 entries.
pub const OFLAG_COMPRESSED: u64 = 1 << 62;
/// Incompatible feature bit 4: extended L2 entries.
const INCOMPAT_EXTENDED_L2: u64 = 1 << 4;

/// The parts of a qcow2 header needed to walk L1/L2, read from a valid image.
#[derive(Debug, Clone, Copy)]
pub struct Layout {
    pub cluster_bits: u32,
    pub l1_size: u32,
    pub l1_offset: u64,
    pub extended_l2: bool,
}

impl Layout {
    pub fn read(path: &Path) -> Layout {
        let h = read_bytes(path, 0, 104);
        assert_eq!(&h[..4], b"QFI\xfb", "{} is not qcow2", path.display());
        let version = be32(&h, hdr::VERSION);
        let incompatible = if version >= 3 {
            be64(&h, hdr::INCOMPATIBLE_FEATURES)
        } else {
            0
        };
        Layout {
            cluster_bits: be32(&h, hdr::CLUSTER_BITS),
            l1_size: be32(&h, hdr::L1_SIZE),
            l1_offset: be64(&h, hdr::L1_TABLE_OFFSET),
            extended_l2: incompatible & INCOMPAT_EXTENDED_L2 != 0,
        }
    }

    pub fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    fn entry_bytes(&self) -> u64 {
        if self.extended_l2 {
            16
        } else {
            8
        }
    }

    /// File offset of L1 entry `i`.
    pub fn l1_entry_pos(&self, i: u64) -> u64 {
        self.l1_offset + 8 * i
    }

    /// Host offset of the L2 table that L1 entry `i` points to, or `None`
    /// when it is unallocated.
    pub fn l2_table(&self, path: &Path, i: u64) -> Option<u64> {
        let off = read_u64(path, self.l1_entry_pos(i)) & ENTRY_OFFSET_MASK;
        (off != 0).then_some(off)
    }

    /// File offset of the L2 entry that maps guest offset `guest`, or `None`
    /// when its L2 table is not allocated.
    pub fn l2_entry_pos(&self, path: &Path, guest: u64) -> Option<u64> {
        let l2_entries = self.cluster_size() / self.entry_bytes();
        let cluster = guest >> self.cluster_bits;
        let l1_index = cluster / l2_entries;
        assert!(l1_index < u64::from(self.l1_size), "guest offset past L1");
        let l2_offset = self.l2_table(path, l1_index)?;
        Some(l2_offset + (cluster % l2_entries) * self.entry_bytes())
    }

    /// The (first 64 bits of the) L2 entry for guest offset `guest` (0 if none).
    pub fn l2_entry(&self, path: &Path, guest: u64) -> u64 {
        match self.l2_entry_pos(path, guest) {
            Some(pos) => read_u64(path, pos),
            None => 0,
        }
    }

    /// For a compressed L2 entry: (host offset, bytes from it to the end of
    /// the last 512-byte sector the descriptor covers).
    pub fn compressed_span(&self, entry: u64) -> Option<(u64, u64)> {
        if entry & OFLAG_COMPRESSED == 0 {
            return None;
        }
        let x = 62 - (self.cluster_bits - 8);
        let host = entry & ((1u64 << x) - 1);
        let extra_sectors = (entry >> x) & ((1u64 << (62 - x)) - 1);
        let end = (host & !511) + (extra_sectors + 1) * 512;
        Some((host, end - host))
    }
}

/// File offset of the header extension of type `ext` (of its type field),
/// found by walking the extensions that follow the header. Panics when the
/// end marker comes first.
pub fn qcow2_header_extension(path: &Path, ext: u32) -> u64 {
    let mut off = u64::from(read_u32(path, hdr::HEADER_LENGTH));
    loop {
        let (t, len) = (read_u32(path, off), u64::from(read_u32(path, off + 4)));
        assert_ne!(t, 0, "no header extension {ext:#x} in {}", path.display());
        if t == ext {
            return off;
        }
        off += 8 + len.div_ceil(8) * 8;
    }
}

/// Sets the in_use flag of the first bitmap directory entry of `img`, as a
/// QEMU killed while it had the image open leaves it (flags are at byte 12
/// of the entry).
pub fn mark_first_bitmap_in_use(img: &Path) {
    let ext = qcow2_header_extension(img, 0x2385_2875);
    let dir = read_u64(img, ext + 8 + 16);
    let flags = read_u32(img, dir + 12);
    patch_u32(img, dir + 12, flags | 1);
}
