//! Why a [`BackupRequest`](super::BackupRequest) was refused: one variant
//! per rule of `validate`, each worded in the request's terms (a front end
//! maps the variant to its own words, naming its options). All are usage
//! errors: the request alone shows them, no file was looked at.

use qbackup_formats::codec::CompressionType;
use qbackup_formats::{Classify, ErrorClass};

use super::MAX_THREADS;

/// A combination of options that cannot work, one variant per rule.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    /// A compression or level was asked for a raw target.
    #[error("a raw target cannot be compressed (compression and level apply to qcow2 targets)")]
    RawCompressed,
    /// Recompression was asked for a raw target.
    #[error("recompression applies to qcow2 targets only")]
    RawRecompress,
    /// Sync top or incremental with a raw target.
    #[error(
        "sync top and incremental need a qcow2 target: a raw file cannot refer to a backing file"
    )]
    RawNotFull,
    /// A dirty bitmap with a raw target (a full backup that clears it
    /// would start a cycle no incremental can continue).
    #[error("a raw backup cannot start a cycle of incremental backups (they are qcow2 overlays on it), so it does not clear a dirty bitmap")]
    RawBitmap,
    /// Writing in place into a device with a qcow2 target.
    #[error(
        "writing in place restores raw bytes onto a block device: the target format must be raw"
    )]
    InPlaceNotRaw,
    /// Writing in place and replacing the target at once.
    #[error("writing in place and replacing the target exclude each other")]
    InPlaceAndForce,
    /// A compression level outside the codec's range.
    #[error("the level for {} must be {min} to {max}, not {level}", .codec.name())]
    LevelOutOfRange {
        /// The codec.
        codec: CompressionType,
        /// The level asked for.
        level: i32,
        /// Its lowest level.
        min: i32,
        /// Its highest level.
        max: i32,
    },
    /// A level without a codec.
    #[error("a compression level needs compression zstd or zlib")]
    LevelWithoutCompression,
    /// A cluster size that is not one.
    #[error("cluster size {0} must be a power of two from 512 to 2M")]
    ClusterSize(u64),
    /// Zero worker threads.
    #[error("the number of threads must be at least 1")]
    NoThreads,
    /// More threads than the machine's limit.
    #[error("{threads} threads is above the limit of {limit} (4 per core, at least 8, at most {MAX_THREADS}): more threads only add memory")]
    TooManyThreads {
        /// Threads asked for.
        threads: usize,
        /// [`thread_limit`] of this machine.
        limit: usize,
    },
    /// A rate limit of 0 bytes per second.
    #[error("the speed limit must be positive")]
    ZeroSpeed,
    /// A backup identity that is not 32 lowercase hex digits.
    #[error("a backup identity must be 32 lowercase hex digits, not {0:?}")]
    BadId(String),
    /// A backing file with sync full.
    #[error("a backing file only applies to sync top and incremental")]
    BackingWithFull,
    /// Unchecked backing outside sync top with a backing name.
    #[error("an unchecked backing file only applies to sync top with a backing file name")]
    BackingUncheckedMisplaced,
    /// A bitmap mode without a bitmap.
    #[error("a bitmap mode needs a bitmap name")]
    BitmapModeWithoutBitmap,
    /// Accepting a disabled bitmap outside sync incremental.
    #[error("accepting a disabled bitmap only applies to sync incremental")]
    AllowDisabledBitmapMisplaced,
    /// Requiring the bitmap outside sync incremental with a bitmap.
    #[error("requiring the bitmap only applies to sync incremental with a bitmap name")]
    RequireBitmapMisplaced,
    /// Bitmap mode always.
    #[error("bitmap mode always is refused: a failed backup leaves no target, so clearing the bitmap anyway would lose the writes it recorded; use on-success")]
    BitmapModeAlways,
    /// Bitmap mode on-success with an NBD source.
    #[error("bitmap mode on-success: an NBD export's bitmap belongs to its server; after the backup, clear or merge it over QMP (block-dirty-bitmap-clear, block-dirty-bitmap-merge), and use bitmap mode never")]
    NbdBitmapOnSuccess,
    /// Sync incremental without the previous backup.
    #[error("sync incremental needs a backing file (the previous backup)")]
    IncrementalWithoutBacking,
    /// A bitmap with sync top.
    #[error("a bitmap applies to sync incremental (copy what it marks) and sync full (clear it: a new cycle)")]
    BitmapWithTop,
    /// Sync full with an NBD export's bitmap (it would be cleared).
    #[error("sync full with a bitmap clears the bitmap, but an NBD export's bitmap belongs to its server: clear it over QMP (block-dirty-bitmap-clear)")]
    NbdFullClears,
    /// Sync full with a bitmap left as it is: nothing to do with it.
    #[error("sync full with a bitmap only clears the bitmap; with bitmap mode never it would do nothing")]
    FullKeepsBitmap,
    /// Clearing the bitmap of a source read without its locks.
    #[error("a source read shared (without its locks) cannot have its bitmap cleared: that needs the image to itself (stop what holds it, or use bitmap mode never)")]
    ClearWhileShared,
}

impl Classify for RequestError {
    fn class(&self) -> ErrorClass {
        ErrorClass::Usage
    }
}
