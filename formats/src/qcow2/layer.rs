//! The qcow2 driver behind the [`Layer`] seam: reading guest data (normal,
//! zero and compressed clusters), handing out stored compressed clusters for
//! pass-through, and the facts `info` reports.
//!
//! Pass-through invariant: a stream is only handed out when its exact end is
//! proven (zlib: the deflate stream ends exactly at the cluster size; zstd:
//! one frame that decodes to exactly one cluster) and it is shorter than a
//! cluster, so the writer can store it as it is and QEMU reads the same
//! bytes back.

use std::sync::Arc;

use crate::codec::{self, CompressionType};
use crate::extent::LayerExtent;
use crate::format::Format;
use crate::image::error::ImageError;
use crate::layer::{BackingSpec, BitmapClear, DirtyMap, Layer, LayerInfo, LayerRead};
use crate::storage::{Storage, StorageError};
use crate::units::{ClusterSize, GuestOffset, HostOffset};

use super::bitmap_clear;
use super::bitmap_data::DirtyBitmap;
use super::bitmaps::{flags, BitmapError};
use super::error::Qcow2Error;
use super::header::{autoclear, compat, incompat};
use super::image::{Piece, Qcow2Image};

/// One persistent dirty bitmap, as `info` lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BitmapSummary {
    /// Its name.
    pub name: String,
    /// Guest bytes per bit.
    pub granularity: u64,
    /// Left open by a running or crashed QEMU: its bits cannot be trusted.
    pub in_use: bool,
    /// Tracks writes automatically.
    pub auto: bool,
}

/// What `qemu-img info` reports under "Format specific information".
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Qcow2Info {
    /// 2 or 3.
    pub version: u32,
    /// The cluster compression codec.
    pub compression: CompressionType,
    /// Lazy refcounts (v3 only).
    pub lazy_refcounts: bool,
    /// Persistent dirty bitmaps (only when the extension is valid).
    pub bitmaps: Vec<BitmapSummary>,
    /// Refcount width in bits.
    pub refcount_bits: u32,
    /// The corrupt bit.
    pub corrupt: bool,
    /// Extended L2 entries.
    pub extended_l2: bool,
    /// The external data file name, if recorded.
    pub data_file: Option<String>,
    /// With an external data file: whether it is a valid raw image.
    pub data_file_raw: Option<bool>,
    /// The guest data is encrypted.
    pub encrypted: bool,
}

impl Qcow2Info {
    /// The `compat` level qemu-img reports: "0.10" for version 2, "1.1"
    /// for version 3.
    pub fn compat(&self) -> &'static str {
        if self.version == 2 {
            "0.10"
        } else {
            "1.1"
        }
    }
}

impl Qcow2Image {
    fn err(&self, e: impl Into<Qcow2Error>) -> ImageError {
        ImageError::new(self.storage().name(), e.into())
    }
}

/// A persistent bitmap with the image it belongs to, for error messages.
struct Qcow2DirtyMap {
    path: std::path::PathBuf,
    bitmap: DirtyBitmap,
}

impl DirtyMap for Qcow2DirtyMap {
    fn dirty(&self, offset: GuestOffset, max_len: u64) -> Result<(bool, u64), ImageError> {
        self.bitmap
            .dirty(offset.0, max_len)
            .map_err(|e| ImageError::new(&self.path, Qcow2Error::Bitmap(e)))
    }
}

/// A prepared bitmap clearing with the image it belongs to, for messages.
struct Qcow2Clear {
    path: std::path::PathBuf,
    clear: bitmap_clear::Qcow2BitmapClear,
}

impl BitmapClear for Qcow2Clear {
    fn commit(self: Box<Self>) -> Result<u64, ImageError> {
        let path = self.path;
        self.clear
            .commit()
            .map_err(|e| ImageError::new(&path, Qcow2Error::ClearBitmap(e)))
    }
}

impl Layer for Qcow2Image {
    fn format(&self) -> Format {
        Format::Qcow2
    }

    fn storage(&self) -> &Arc<dyn Storage> {
        Qcow2Image::storage(self)
    }

    fn files(&self) -> Vec<Arc<dyn Storage>> {
        let mut v = vec![Arc::clone(Qcow2Image::storage(self))];
        v.extend(self.data_storage().cloned());
        v
    }

    fn virtual_size(&self) -> u64 {
        Qcow2Image::virtual_size(self)
    }

    fn cluster_size(&self) -> Option<ClusterSize> {
        ClusterSize::from_bits(self.header().cluster_bits)
    }

    fn backing(&self) -> Option<BackingSpec> {
        let h = self.header();
        h.backing_file.as_ref().map(|name| BackingSpec {
            name: name.clone(),
            format: h.backing_format.clone(),
        })
    }

    fn check_readable(&self) -> Result<(), ImageError> {
        Qcow2Image::check_readable(self).map_err(|e| self.err(e))
    }

    fn marked_corrupt(&self) -> bool {
        Qcow2Image::marked_corrupt(self)
    }

    fn harmless_damage(&self) -> Option<String> {
        self.refcount_damage()
            .map(|e| format!("damaged refcounts ({e})"))
    }

    fn status(&self, offset: GuestOffset, max_len: u64) -> Result<(LayerExtent, u64), ImageError> {
        Qcow2Image::status(self, offset, max_len).map_err(|e| self.err(e))
    }

    fn read(&self, offset: GuestOffset, buf: &mut [u8]) -> Result<LayerRead, ImageError> {
        let want = (buf.len() as u64).min(self.virtual_size().saturating_sub(offset.0));
        let (piece, n) = self.locate(offset, want, true).map_err(|e| self.err(e))?;
        let dst = &mut buf[..n as usize];
        match piece {
            Piece::Unallocated => return Ok(LayerRead::Unallocated(n)),
            Piece::Zero => dst.fill(0),
            Piece::Data(host) => self.read_data(host, dst).map_err(|e| self.err(e))?,
            Piece::Compressed(start, desc) => {
                let cluster_size = self.header().cluster_size() as usize;
                if start == offset && dst.len() == cluster_size {
                    self.read_compressed(start, desc, dst)
                        .map_err(|e| self.err(e))?;
                } else {
                    let mut tmp = vec![0u8; cluster_size];
                    self.read_compressed(start, desc, &mut tmp)
                        .map_err(|e| self.err(e))?;
                    let from = (offset.0 - start.0) as usize;
                    dst.copy_from_slice(&tmp[from..from + dst.len()]);
                }
            }
        }
        Ok(LayerRead::Filled(n))
    }

    fn compressed_format(&self) -> Option<(ClusterSize, CompressionType)> {
        Some((Layer::cluster_size(self)?, self.header().compression_type))
    }

    fn stored_compressed(&self, cluster: GuestOffset) -> Result<Option<Vec<u8>>, ImageError> {
        let cs = self.header().cluster_size();
        if cluster.0 % cs != 0 || cluster.0 >= self.virtual_size() {
            return Ok(None);
        }
        let (piece, _) = self.locate(cluster, cs, true).map_err(|e| self.err(e))?;
        let Piece::Compressed(start, desc) = piece else {
            return Ok(None);
        };
        if start != cluster {
            return Ok(None);
        }
        let mut bytes = self.compressed_bytes(desc).map_err(|e| self.err(e))?;
        let mut scratch = vec![0u8; cs as usize + 1];
        // A stream QEMU reads but whose exact end cannot be proven (no end
        // marker at the cluster size, several zstd frames) is decoded and
        // compressed again by the caller instead; decoding validates it.
        let Ok(n) = codec::stream_len(self.header().compression_type, &bytes, &mut scratch) else {
            return Ok(None);
        };
        if n == 0 || n as u64 >= cs {
            return Ok(None);
        }
        bytes.truncate(n);
        Ok(Some(bytes))
    }

    fn dirty_bitmap(
        &self,
        name: &str,
        allow_disabled: bool,
    ) -> Result<Box<dyn DirtyMap>, ImageError> {
        let entry = self
            .bitmaps()
            .iter()
            .find(|b| b.name == name)
            .ok_or_else(|| self.err(super::bitmaps::not_found(name, self.bitmaps())))?;
        // An in-use bitmap is refused by the load below, for a clearer
        // reason than "disabled".
        if entry.flags & (flags::AUTO | flags::IN_USE) == 0 && !allow_disabled {
            return Err(self.err(BitmapError::Disabled {
                name: name.to_string(),
            }));
        }
        let bitmap = DirtyBitmap::load(
            Arc::clone(Qcow2Image::storage(self)),
            entry,
            self.header().cluster_bits,
            self.virtual_size(),
        )
        .map_err(|e| self.err(e))?;
        Ok(Box::new(Qcow2DirtyMap {
            path: self.path().to_path_buf(),
            bitmap,
        }))
    }

    fn prepare_bitmap_clear(&self, name: &str) -> Result<Box<dyn BitmapClear>, ImageError> {
        let clear = bitmap_clear::prepare(self, name).map_err(|e| self.err(e))?;
        Ok(Box::new(Qcow2Clear {
            path: self.path().to_path_buf(),
            clear,
        }))
    }

    fn metadata_ranges(&self) -> Vec<(HostOffset, u64)> {
        let h = self.header();
        let file_len = Qcow2Image::storage(self).len();
        let mut v = vec![(HostOffset(0), h.cluster_size().min(file_len))];
        if h.l1_size > 0 {
            v.push((h.l1_table_offset, u64::from(h.l1_size) * 8));
        }
        v
    }

    fn info(&self) -> Result<LayerInfo, ImageError> {
        let h = self.header();
        let actual = Qcow2Image::storage(self)
            .allocated_size()
            .map_err(|source| self.err(StorageError::Stat { source }))?;
        let bitmaps = self
            .bitmaps()
            .iter()
            .map(|b| BitmapSummary {
                in_use: b.flags & flags::IN_USE != 0,
                auto: b.flags & flags::AUTO != 0,
                name: b.name.clone(),
                granularity: b.granularity,
            })
            .collect();
        Ok(LayerInfo {
            format: Format::Qcow2,
            virtual_size: self.virtual_size(),
            cluster_size: Layer::cluster_size(self),
            actual_size: actual,
            backing: self.backing(),
            dirty: h.incompatible_features & incompat::DIRTY != 0,
            qcow2: Some(Qcow2Info {
                version: h.version,
                compression: h.compression_type,
                lazy_refcounts: h.compatible_features & compat::LAZY_REFCOUNTS != 0,
                bitmaps,
                refcount_bits: h.refcount_bits(),
                corrupt: h.incompatible_features & incompat::CORRUPT != 0,
                extended_l2: h.extended_l2(),
                data_file: h.data_file.clone(),
                data_file_raw: h
                    .has_data_file()
                    .then_some(h.autoclear_features & autoclear::DATA_FILE_RAW != 0),
                encrypted: h.crypt_method != 0,
            }),
        })
    }
}
