//! The backup manifest: what a backup's guest data must read as, per target
//! cluster, so that a backup can be verified without its source and an
//! incremental backup can be taken without a dirty bitmap.
//!
//! It lives beside the backup, as `TARGET.manifest` (see docs/verify.md "Manifests"
//! for why not inside the qcow2: clusters only an unknown header extension
//! refers to are leaks to `qemu-img check`, and `check -r leaks` would free
//! them). Layout:
//! - the magic line `qbackup-manifest 1\n`;
//! - one line of JSON, [`Meta`]: what the backup was made from;
//! - runs of target clusters in guest order, each [`RUN_BYTES`] bytes: the
//!   number of clusters (u64 BE), a kind byte, then CRC32 (u32 BE) and
//!   BLAKE3 (32 bytes) of one cluster's guest bytes (zero for the kinds
//!   without a hash); consecutive equal entries share a run, so a sparse
//!   disk has a small manifest;
//! - optionally (written since issue 19), one more record of that size: the
//!   identity of the image file the manifest is for ([`ImageIdentity`],
//!   kind byte 3), so that an image and another backup's manifest are never
//!   taken for a pair;
//! - the BLAKE3 of everything before it (32 bytes), so a damaged or edited
//!   manifest is told from a damaged backup.
//!
//! A cluster's guest bytes are the whole cluster, the part past the
//! virtual size read as zeros. Invariants: the runs cover exactly
//! `virtual_size.div_ceil(cluster_size)` clusters; writing and reading
//! stream (memory does not grow with the image).

pub mod ancestry;
pub mod builder;
pub mod identity;
pub mod stream;

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

pub use builder::{Gaps, ManifestBuilder};
pub use identity::ImageIdentity;
pub use stream::{ManifestReader, ManifestWriter};

/// The first line of every manifest.
pub const MAGIC: &[u8] = b"qbackup-manifest 1\n";
/// Bytes per run record.
pub const RUN_BYTES: usize = 8 + 1 + 4 + 32;

/// What one target cluster must read as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Entry {
    /// All zeros.
    Zero,
    /// Guest bytes with this CRC32 and BLAKE3.
    Data(Digest),
    /// Not recorded: the backup reads it from a backing file whose
    /// content the manifest does not cover (`--sync top` over an image
    /// without a manifest, or an incremental on a backup without one).
    Unknown,
}

/// CRC32 (cheap, for verify) and BLAKE3 (strong, for change detection) of
/// one cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Digest {
    /// crc32fast's CRC32 (IEEE).
    pub crc32: u32,
    /// BLAKE3-256.
    pub blake3: [u8; 32],
}

impl Digest {
    /// The digest of `data`.
    pub fn of(data: &[u8]) -> Digest {
        Digest {
            crc32: crc32fast::hash(data),
            blake3: *blake3::hash(data).as_bytes(),
        }
    }
}

/// The entry of a cluster holding `data`: [`Entry::Zero`] when it is all
/// zeros (as the copier's zero detection decides).
pub fn entry_of(data: &[u8], is_zero: bool) -> Entry {
    if is_zero {
        Entry::Zero
    } else {
        Entry::Data(Digest::of(data))
    }
}

/// What a backup was made from (the manifest's JSON line).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Meta {
    /// A random identity of this backup (hex, 128 bits), so that two
    /// backups of the same data still have different manifests and a
    /// parent swapped for a twin is told apart.
    pub id: String,
    /// The qbackup version that wrote it.
    pub tool: String,
    /// Seconds since the Unix epoch when the backup finished.
    pub created: u64,
    /// The source as named on the command line.
    pub source: String,
    /// The source's device and inode, when it is a local file.
    pub source_identity: Option<(u64, u64)>,
    /// Guest bytes.
    pub virtual_size: u64,
    /// Bytes per entry (the target's cluster size).
    pub cluster_size: u64,
    /// full, top or incremental.
    pub sync: String,
    /// The dirty bitmap an incremental backup copied, if any.
    pub bitmap: Option<String>,
    /// The backing file the backup names (an overlay), as recorded in it.
    pub backing: Option<String>,
    /// BLAKE3 (hex) of the backing file's manifest, when it has one: the
    /// parent this backup was made on.
    pub backing_manifest: Option<String>,
}

/// A fresh random backup identity (hex).
pub fn new_id() -> std::io::Result<String> {
    use std::io::Read;
    let mut bytes = [0u8; 16];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut bytes)?;
    Ok(hex(&bytes))
}

/// The manifest path of a backup at `target`.
pub fn path_for(target: &Path) -> PathBuf {
    let mut s = target.as_os_str().to_owned();
    s.push(".manifest");
    PathBuf::from(s)
}

/// Errors reading or writing a manifest.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    /// The file could not be read or written.
    #[error("{}: {}", path.display(), qbackup_formats::error::io_text(source))]
    Io {
        /// The manifest.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file is not a regular file (a FIFO, a socket, a device, a
    /// directory): refused at once, as reading it could wait forever.
    #[error("{}: cannot open: not a regular file ({kind})", path.display())]
    NotRegular {
        /// The manifest.
        path: PathBuf,
        /// What it is.
        kind: &'static str,
    },
    /// The file is not a manifest this version can read, or is damaged.
    #[error("{}: not a valid qbackup manifest: {why}", path.display())]
    Invalid {
        /// The manifest.
        path: PathBuf,
        /// What is wrong.
        why: String,
    },
}

impl qbackup_formats::Classify for ManifestError {
    fn class(&self) -> qbackup_formats::ErrorClass {
        match self {
            ManifestError::Io { source, .. } => qbackup_formats::ErrorClass::of_io(source),
            ManifestError::NotRegular { .. } => qbackup_formats::ErrorClass::Unsupported,
            ManifestError::Invalid { .. } => qbackup_formats::ErrorClass::Corrupt,
        }
    }
}

/// Hex of a BLAKE3 digest.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
