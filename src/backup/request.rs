//! What a caller asks a backup to do, before it is checked: a
//! [`BackupRequest`] built with chainable setters, turned by
//! [`BackupRequest::validate`] into the [`BackupConfig`] that
//! [`super::run`] takes.
//!
//! Every rule about which options go together lives here, so that each
//! front end (the CLI, an orchestrator) refuses the same combinations for
//! the same reasons. Invariant: options that do not apply to the request
//! are refused with the reason, never ignored. The rules are checked in a
//! fixed order and the first broken one is reported. Messages describe the
//! conflict in the request's own terms; a front end names its options
//! itself (the CLI maps each [`RequestError`] variant to its usage line).

use std::path::PathBuf;

use qbackup_formats::codec::CompressionType;
use qbackup_formats::open::nbd_uri;
use qbackup_formats::storage::cache::CachePolicy;
use qbackup_formats::{ClusterSize, Format};

use super::policy::{OnSourceError, OnTargetError};
use super::{BackupConfig, SyncMode};

mod error;
pub use error::RequestError;

/// The most worker threads a request may ask for on any machine.
pub const MAX_THREADS: usize = 256;

/// The most worker threads a request may ask for with `cores` cores: four
/// per core (threads beyond the cores only help while others wait for
/// I/O, e.g. on a slow NBD server), at least 8, at most [`MAX_THREADS`].
/// The copier then starts as many of them as fit its memory budget (see
/// `budget.rs`).
pub fn thread_limit(cores: usize) -> usize {
    cores.saturating_mul(4).clamp(8, MAX_THREADS)
}

/// What happens to the source's dirty bitmap (QEMU's `bitmap-mode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BitmapMode {
    /// Clear it once the backup is durable (an image file's default).
    OnSuccess,
    /// Leave it as it is (an NBD export's default: its server owns it).
    Never,
    /// Clear it whatever happens: always refused (a failed backup leaves
    /// no target, so the writes the bitmap recorded would be lost).
    Always,
}

/// How a qcow2 target's clusters are compressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    /// zstd, levels 1 to 19 (default 3).
    Zstd,
    /// zlib (deflate), levels 1 to 9 (default 6).
    Zlib,
    /// Not compressed.
    None,
}

/// An unchecked backup request: the source, the target, and every option
/// with its default (a full backup into a zstd-compressed qcow2 file).
///
/// ```
/// use qbackup::backup::{BackupRequest, RequestError, SyncMode};
///
/// // Tonight's incremental backup by the image's dirty bitmap, which is
/// // cleared once the backup is durable.
/// let cfg = BackupRequest::new("vm.qcow2", "vm-2.qcow2")
///     .sync(SyncMode::Incremental)
///     .backing("vm-1.qcow2".to_string())
///     .bitmap("nightly".to_string())
///     .validate()?;
/// assert!(cfg.clear_bitmap);
/// // An incremental backup needs the previous one.
/// let refused = BackupRequest::new("vm.qcow2", "vm-2.qcow2")
///     .sync(SyncMode::Incremental)
///     .validate();
/// assert_eq!(refused.unwrap_err(), RequestError::IncrementalWithoutBacking);
/// # Ok::<(), RequestError>(())
/// ```
#[derive(Debug, Clone)]
pub struct BackupRequest {
    source: PathBuf,
    target: PathBuf,
    source_format: Option<Format>,
    target_format: Format,
    sync: SyncMode,
    bitmap: Option<String>,
    bitmap_mode: Option<BitmapMode>,
    allow_disabled_bitmap: bool,
    require_bitmap: bool,
    no_manifest: bool,
    allow_corrupt: bool,
    on_source_error: OnSourceError,
    on_target_error: OnTargetError,
    compression: Option<Compression>,
    level: Option<i32>,
    cluster_size: Option<u64>,
    threads: Option<usize>,
    speed: Option<u64>,
    force: bool,
    in_place: bool,
    recompress: bool,
    backing: Option<String>,
    backing_unchecked: bool,
    force_share: bool,
    id: Option<String>,
    cache: CachePolicy,
}

/// Chainable setters, one per field of the same name: each takes the
/// field's type; with `opt`, a `T` or an `Option<T>` (`None`: the default).
macro_rules! setters {
    (opt $($(#[$doc:meta])* $name:ident: $ty:ty;)*) => {$(
        $(#[$doc])*
        #[must_use]
        pub fn $name(mut self, value: impl Into<Option<$ty>>) -> Self {
            self.$name = value.into();
            self
        }
    )*};
    ($($(#[$doc:meta])* $name:ident: $ty:ty;)*) => {$(
        $(#[$doc])*
        #[must_use]
        pub fn $name(mut self, value: $ty) -> Self {
            self.$name = value;
            self
        }
    )*};
}

impl BackupRequest {
    /// A full backup of `source` into a new qcow2 file `target`.
    pub fn new(source: impl Into<PathBuf>, target: impl Into<PathBuf>) -> BackupRequest {
        BackupRequest {
            source: source.into(),
            target: target.into(),
            source_format: None,
            target_format: Format::Qcow2,
            sync: SyncMode::Full,
            bitmap: None,
            bitmap_mode: None,
            allow_disabled_bitmap: false,
            require_bitmap: false,
            no_manifest: false,
            allow_corrupt: false,
            on_source_error: OnSourceError::Report,
            on_target_error: OnTargetError::Report,
            compression: None,
            level: None,
            cluster_size: None,
            threads: None,
            speed: None,
            force: false,
            in_place: false,
            recompress: false,
            backing: None,
            backing_unchecked: false,
            force_share: false,
            id: None,
            cache: CachePolicy::Drop,
        }
    }

    /// The same request for another source and target (a front end that
    /// runs one request per disk builds it once from its options).
    #[must_use]
    pub fn retarget(mut self, source: impl Into<PathBuf>, target: impl Into<PathBuf>) -> Self {
        self.source = source.into();
        self.target = target.into();
        self
    }

    setters! {
        /// The target's format (default qcow2).
        target_format: Format;
        /// Full (default), top or incremental.
        sync: SyncMode;
        /// Incremental: accept a disabled bitmap.
        allow_disabled_bitmap: bool;
        /// Incremental with a bitmap: fail when it cannot be used instead
        /// of falling back to an incremental backup by content.
        require_bitmap: bool;
        /// Write no manifest beside the target.
        no_manifest: bool;
        /// Back up a source QEMU marked corrupt.
        allow_corrupt: bool;
        /// What a failed read of the source does.
        on_source_error: OnSourceError;
        /// What a failed write of the target does.
        on_target_error: OnTargetError;
        /// Replace an existing target.
        force: bool;
        /// Write into an existing block device in place (a restore).
        in_place: bool;
        /// Recompress clusters that could be copied as they are.
        recompress: bool;
        /// Top: record `backing` without opening it.
        backing_unchecked: bool;
        /// The source is read without taking QEMU's image locks (the
        /// caller's opener shares it): its bitmap cannot be cleared.
        force_share: bool;
        /// What the backup does with the page cache (default: drop what
        /// it brought in, see [`CachePolicy`]).
        cache: CachePolicy;
    }

    setters! {
        opt
        /// The source's format (`None`: probe it).
        source_format: Format;
        /// The source's dirty bitmap: what an incremental backup copies; a
        /// full backup clears it (a new cycle).
        bitmap: String;
        /// What happens to `bitmap` (default: on-success for an image
        /// file, never for an NBD export).
        bitmap_mode: BitmapMode;
        /// The codec of a qcow2 target (default zstd).
        compression: Compression;
        /// The codec's level (default: zstd 3, zlib 6).
        level: i32;
        /// The target's cluster size in bytes (default: QEMU's rule).
        cluster_size: u64;
        /// Worker threads (default: one per core).
        threads: usize;
        /// Rate limit in bytes per second.
        speed: u64;
        /// Top: the backing file name to record. Incremental: the
        /// previous backup.
        backing: String;
        /// The backup's identity, for a caller that names files by it
        /// before the backup exists (a backup set): 32 lowercase hex
        /// digits, as [`crate::manifest::new_id`] makes (`None`: a fresh
        /// one).
        id: String;
    }

    /// Checks every rule and returns the configuration to run, with the
    /// defaults filled in; the first broken rule is the error.
    pub fn validate(self) -> Result<BackupConfig, RequestError> {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        self.validate_with_cores(cores)
    }

    /// [`validate`](Self::validate) on a machine with `cores` cores.
    fn validate_with_cores(self, cores: usize) -> Result<BackupConfig, RequestError> {
        let raw = self.target_format == Format::Raw;
        if raw {
            // Options only a qcow2 target uses are refused, not ignored.
            if self.compression.is_some_and(|c| c != Compression::None) || self.level.is_some() {
                return Err(RequestError::RawCompressed);
            }
            if self.recompress {
                return Err(RequestError::RawRecompress);
            }
            if self.sync != SyncMode::Full {
                return Err(RequestError::RawNotFull);
            }
            // Clearing a bitmap starts a cycle whose incrementals are
            // overlays on this backup, which a raw file cannot be.
            if self.bitmap.is_some() {
                return Err(RequestError::RawBitmap);
            }
        }
        if self.in_place && !raw {
            return Err(RequestError::InPlaceNotRaw);
        }
        if self.in_place && self.force {
            return Err(RequestError::InPlaceAndForce);
        }
        let compression = self.checked_compression()?;
        if let Some(c) = self.cluster_size {
            if ClusterSize::new(c).is_none() {
                return Err(RequestError::ClusterSize(c));
            }
        }
        let limit = thread_limit(cores);
        match self.threads {
            Some(0) => return Err(RequestError::NoThreads),
            Some(threads) if threads > limit => {
                return Err(RequestError::TooManyThreads { threads, limit })
            }
            _ => {}
        }
        if self.speed == Some(0) {
            return Err(RequestError::ZeroSpeed);
        }
        if self.backing.is_some() && self.sync == SyncMode::Full {
            return Err(RequestError::BackingWithFull);
        }
        if self.backing_unchecked && (self.sync != SyncMode::Top || self.backing.is_none()) {
            return Err(RequestError::BackingUncheckedMisplaced);
        }
        if let Some(id) = &self.id {
            let hex = |c: char| c.is_ascii_digit() || ('a'..='f').contains(&c);
            if id.len() != 32 || !id.chars().all(hex) {
                return Err(RequestError::BadId(id.clone()));
            }
        }
        let clear_bitmap = self.clear_bitmap()?;
        Ok(BackupConfig {
            threads: self.threads.unwrap_or(cores.min(MAX_THREADS)),
            source: self.source,
            source_format: self.source_format,
            target: self.target,
            target_format: self.target_format,
            sync: self.sync,
            bitmap: self.bitmap,
            clear_bitmap,
            allow_disabled_bitmap: self.allow_disabled_bitmap,
            bitmap_fallback: !self.require_bitmap,
            no_manifest: self.no_manifest,
            allow_corrupt: self.allow_corrupt,
            on_source_error: self.on_source_error,
            on_target_error: self.on_target_error,
            compression,
            cluster_size: self.cluster_size,
            speed: self.speed,
            force: self.force,
            in_place: self.in_place,
            recompress: self.recompress,
            backing: self.backing,
            backing_unchecked: self.backing_unchecked,
            id: self.id,
            cache: self.cache,
        })
    }

    /// The codec and level, checked (`None`: not compressed).
    fn checked_compression(&self) -> Result<Option<(CompressionType, i32)>, RequestError> {
        let (codec, default, min, max) = match self.compression.unwrap_or(Compression::Zstd) {
            Compression::None if self.level.is_some() => {
                return Err(RequestError::LevelWithoutCompression)
            }
            Compression::None => return Ok(None),
            Compression::Zstd => (CompressionType::Zstd, 3, 1, 19),
            Compression::Zlib => (CompressionType::Zlib, 6, 1, 9),
        };
        let level = self.level.unwrap_or(default);
        if !(min..=max).contains(&level) {
            return Err(RequestError::LevelOutOfRange {
                codec,
                level,
                min,
                max,
            });
        }
        Ok(Some((codec, level)))
    }

    /// Checks sync, bitmap, bitmap mode and backing together; returns
    /// whether the bitmap is to be cleared once the backup is durable.
    fn clear_bitmap(&self) -> Result<bool, RequestError> {
        let nbd = nbd_uri(&self.source).is_some();
        let incremental = self.sync == SyncMode::Incremental;
        if self.bitmap.is_none() && self.bitmap_mode.is_some() {
            return Err(RequestError::BitmapModeWithoutBitmap);
        }
        if self.allow_disabled_bitmap && !incremental {
            return Err(RequestError::AllowDisabledBitmapMisplaced);
        }
        if self.require_bitmap && (!incremental || self.bitmap.is_none()) {
            return Err(RequestError::RequireBitmapMisplaced);
        }
        let mode = match self.bitmap_mode {
            Some(BitmapMode::Always) => return Err(RequestError::BitmapModeAlways),
            Some(BitmapMode::OnSuccess) if nbd => return Err(RequestError::NbdBitmapOnSuccess),
            Some(m) => m,
            None if nbd => BitmapMode::Never,
            None => BitmapMode::OnSuccess,
        };
        let bitmap = self.bitmap.is_some();
        match self.sync {
            SyncMode::Incremental if self.backing.is_none() => {
                return Err(RequestError::IncrementalWithoutBacking)
            }
            SyncMode::Top if bitmap => return Err(RequestError::BitmapWithTop),
            SyncMode::Full if bitmap && nbd => return Err(RequestError::NbdFullClears),
            SyncMode::Full if bitmap && mode == BitmapMode::Never => {
                return Err(RequestError::FullKeepsBitmap)
            }
            _ => {}
        }
        let clear = bitmap && mode == BitmapMode::OnSuccess;
        if clear && self.force_share {
            return Err(RequestError::ClearWhileShared);
        }
        Ok(clear)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use qbackup_formats::{Classify, ErrorClass};

    const NBD: &str = "nbd://localhost/disk";

    fn req() -> BackupRequest {
        BackupRequest::new("disk.qcow2", "backup.qcow2")
    }

    fn raw() -> BackupRequest {
        req().target_format(Format::Raw)
    }

    fn inc() -> BackupRequest {
        req()
            .sync(SyncMode::Incremental)
            .backing("prev.qcow2".to_string())
    }

    fn err(r: BackupRequest) -> RequestError {
        r.validate_with_cores(4).expect_err("refused")
    }

    fn ok(r: BackupRequest) -> BackupConfig {
        r.validate_with_cores(4).expect("valid")
    }

    #[test]
    fn defaults() {
        let c = ok(req());
        assert_eq!(c.compression, Some((CompressionType::Zstd, 3)));
        assert_eq!(c.sync, SyncMode::Full);
        assert_eq!(c.target_format, Format::Qcow2);
        assert_eq!(c.threads, 4);
        assert!(!c.clear_bitmap && c.bitmap_fallback && !c.force && !c.in_place);
        assert_eq!(
            ok(req().compression(Compression::Zlib)).compression,
            Some((CompressionType::Zlib, 6))
        );
        assert_eq!(ok(req().compression(Compression::None)).compression, None);
        assert_eq!(ok(raw()).compression, Some((CompressionType::Zstd, 3)));
        assert_eq!(
            ok(raw().compression(Compression::None)).target_format,
            Format::Raw
        );
        assert_eq!(
            req().validate_with_cores(1000).unwrap().threads,
            MAX_THREADS
        );
    }

    #[test]
    fn raw_target_rules() {
        assert_eq!(
            err(raw().compression(Compression::Zlib)),
            RequestError::RawCompressed
        );
        assert_eq!(err(raw().level(3)), RequestError::RawCompressed);
        assert_eq!(err(raw().recompress(true)), RequestError::RawRecompress);
        assert_eq!(err(raw().sync(SyncMode::Top)), RequestError::RawNotFull);
        assert_eq!(err(raw().bitmap("b".to_string())), RequestError::RawBitmap);
        assert_eq!(
            err(raw().sync(SyncMode::Incremental)),
            RequestError::RawNotFull
        );
    }

    #[test]
    fn in_place_rules() {
        assert_eq!(err(req().in_place(true)), RequestError::InPlaceNotRaw);
        assert_eq!(
            err(raw().in_place(true).force(true)),
            RequestError::InPlaceAndForce
        );
        assert!(ok(raw().in_place(true)).in_place);
        assert!(ok(req().force(true)).force);
    }

    #[test]
    fn level_rules() {
        let zstd = |l| req().compression(Compression::Zstd).level(l);
        let zlib = |l| req().compression(Compression::Zlib).level(l);
        assert_eq!(ok(zstd(19)).compression, Some((CompressionType::Zstd, 19)));
        assert_eq!(ok(zlib(1)).compression, Some((CompressionType::Zlib, 1)));
        let range = |codec, level, max| RequestError::LevelOutOfRange {
            codec,
            level,
            min: 1,
            max,
        };
        assert_eq!(err(zstd(20)), range(CompressionType::Zstd, 20, 19));
        assert_eq!(err(zstd(0)), range(CompressionType::Zstd, 0, 19));
        assert_eq!(err(zlib(10)), range(CompressionType::Zlib, 10, 9));
        assert_eq!(err(req().level(-1)), range(CompressionType::Zstd, -1, 19));
        assert_eq!(
            err(req().compression(Compression::None).level(3)),
            RequestError::LevelWithoutCompression
        );
    }

    #[test]
    fn cluster_size_rule() {
        assert_eq!(ok(req().cluster_size(2 << 20)).cluster_size, Some(2 << 20));
        assert_eq!(ok(req().cluster_size(512)).cluster_size, Some(512));
        for bad in [0, 256, 1536, 4 << 20] {
            assert_eq!(err(req().cluster_size(bad)), RequestError::ClusterSize(bad));
        }
    }

    #[test]
    fn thread_rules() {
        assert_eq!(err(req().threads(0)), RequestError::NoThreads);
        assert_eq!(ok(req().threads(16)).threads, 16);
        assert_eq!(
            err(req().threads(17)),
            RequestError::TooManyThreads {
                threads: 17,
                limit: 16
            }
        );
        assert_eq!(thread_limit(1), 8);
        assert_eq!(thread_limit(2), 8);
        assert_eq!(thread_limit(3), 12);
        assert_eq!(thread_limit(64), 256);
        assert_eq!(thread_limit(1000), 256);
        assert_eq!(thread_limit(usize::MAX), 256);
    }

    #[test]
    fn speed_rule() {
        assert_eq!(err(req().speed(0)), RequestError::ZeroSpeed);
        assert_eq!(ok(req().speed(1)).speed, Some(1));
    }

    #[test]
    fn id_rule() {
        let id = "0123456789abcdef0123456789abcdef".to_string();
        assert_eq!(ok(req().id(id.clone())).id, Some(id));
        assert_eq!(ok(req()).id, None);
        for bad in [
            "",
            "0123",
            "0123456789ABCDEF0123456789ABCDEF",
            "../../../../../../../../etc/passw",
        ] {
            assert_eq!(
                err(req().id(bad.to_string())),
                RequestError::BadId(bad.to_string())
            );
        }
    }

    #[test]
    fn backing_rules() {
        assert_eq!(
            err(req().backing("b".to_string())),
            RequestError::BackingWithFull
        );
        assert_eq!(
            err(req().sync(SyncMode::Incremental)),
            RequestError::IncrementalWithoutBacking
        );
        let top = || req().sync(SyncMode::Top);
        assert_eq!(
            err(top().backing_unchecked(true)),
            RequestError::BackingUncheckedMisplaced
        );
        assert_eq!(
            err(inc().backing_unchecked(true)),
            RequestError::BackingUncheckedMisplaced
        );
        assert!(ok(top().backing("b".to_string()).backing_unchecked(true)).backing_unchecked);
        assert_eq!(ok(inc()).backing.as_deref(), Some("prev.qcow2"));
    }

    #[test]
    fn bitmap_option_rules() {
        let b = || "b".to_string();
        assert_eq!(
            err(req().bitmap_mode(BitmapMode::Never)),
            RequestError::BitmapModeWithoutBitmap
        );
        assert_eq!(
            err(req().allow_disabled_bitmap(true)),
            RequestError::AllowDisabledBitmapMisplaced
        );
        assert!(ok(inc().allow_disabled_bitmap(true)).allow_disabled_bitmap);
        assert_eq!(
            err(inc().require_bitmap(true)),
            RequestError::RequireBitmapMisplaced
        );
        assert_eq!(
            err(req().bitmap(b()).require_bitmap(true)),
            RequestError::RequireBitmapMisplaced
        );
        assert!(!ok(inc().bitmap(b()).require_bitmap(true)).bitmap_fallback);
        assert_eq!(
            err(req().bitmap(b()).bitmap_mode(BitmapMode::Always)),
            RequestError::BitmapModeAlways
        );
        let top = req()
            .sync(SyncMode::Top)
            .backing("x".to_string())
            .bitmap(b());
        assert_eq!(err(top), RequestError::BitmapWithTop);
    }

    #[test]
    fn bitmap_clearing() {
        let b = || "b".to_string();
        // A full backup with a bitmap starts a new cycle: it clears it.
        let c = ok(req().bitmap(b()));
        assert!(c.clear_bitmap && c.bitmap.as_deref() == Some("b"));
        assert!(ok(inc().bitmap(b())).clear_bitmap);
        assert!(!ok(inc().bitmap(b()).bitmap_mode(BitmapMode::Never)).clear_bitmap);
        assert_eq!(
            err(req().bitmap(b()).bitmap_mode(BitmapMode::Never)),
            RequestError::FullKeepsBitmap
        );
        assert_eq!(
            err(inc().bitmap(b()).force_share(true)),
            RequestError::ClearWhileShared
        );
        let shared = inc()
            .bitmap(b())
            .force_share(true)
            .bitmap_mode(BitmapMode::Never);
        assert!(!ok(shared).clear_bitmap);
    }

    #[test]
    fn nbd_bitmap_rules() {
        let b = || "b".to_string();
        let nbd = || BackupRequest::new(NBD, "t.qcow2");
        let nbd_inc = || nbd().sync(SyncMode::Incremental).backing("p".to_string());
        // An export's bitmap is never cleared by default: its server owns it.
        assert!(!ok(nbd_inc().bitmap(b())).clear_bitmap);
        assert_eq!(
            err(nbd_inc().bitmap(b()).bitmap_mode(BitmapMode::OnSuccess)),
            RequestError::NbdBitmapOnSuccess
        );
        assert_eq!(err(nbd().bitmap(b())), RequestError::NbdFullClears);
        assert_eq!(
            err(nbd().bitmap(b()).bitmap_mode(BitmapMode::Never)),
            RequestError::NbdFullClears
        );
    }

    #[test]
    fn errors_are_usage_errors() {
        assert_eq!(RequestError::ZeroSpeed.class(), ErrorClass::Usage);
        assert_eq!(RequestError::ZeroSpeed.remedy(), None);
    }
}
