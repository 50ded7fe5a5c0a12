//! Reading one qcow2 image: open and validate, answer "what is at this
//! range?" as runs, and read guest data.
//!
//! Invariants after [`Qcow2Image::open`]: the header is valid (see
//! `header.rs`), the L1 table lies inside the file and is loaded, the
//! snapshot table and the bitmap directory pass QEMU's open-time checks,
//! and the external data file (if any) is open. [`Qcow2Image::check_metadata`]
//! goes further, as `qemu-img check` does (see `check.rs`). L2 tables are read lazily into a
//! bounded cache shared by all threads; every table and cluster is checked to
//! lie inside its file before use, so a damaged image fails loudly instead of
//! reading zeros.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use crate::codec;
use crate::extent::{Allocation, HostFile, HostLocation, LayerExtent};
use crate::open::{resolve_data_file, Opener, Role};
use crate::storage::{FileExtent, Storage, StorageError};
use crate::units::{GuestOffset, HostOffset};

use super::bitmap_data;
use super::bitmaps::{self, BitmapEntry};
use super::error::Qcow2Error;
use super::header::{autoclear, incompat, Header};
use super::l2::{self, CompressedDescriptor, EntryFormat, MappingError, SubclusterKind};
use super::refcount::{RefcountError, RefcountReader};
use super::snapshots;
use super::table;

/// Bytes of L2 tables the cache may hold (per image: each layer of a chain
/// has its own). Readers go through the disk in guest order (the planner,
/// and the copier's few batches in flight), so a few tables suffice; at
/// least [`L2_CACHE_MIN_TABLES`] are kept, which with 2 MiB clusters is
/// 8 MiB.
const L2_CACHE_BYTES: usize = 8 << 20;
/// Tables the cache holds whatever their size.
const L2_CACHE_MIN_TABLES: usize = 4;

/// A read-only qcow2 image.
pub struct Qcow2Image {
    storage: Arc<dyn Storage>,
    data: Option<Arc<dyn Storage>>,
    data_host_file: HostFile,
    header: Header,
    fmt: EntryFormat,
    l1: Vec<u64>,
    l2_cache: Mutex<HashMap<u64, Arc<[u64]>>>,
    l2_cache_max: usize,
    prealloc: Mutex<Option<bool>>,
    /// Why the refcounts could not be read, when the preallocation
    /// heuristic found them damaged.
    refcount_damage: Mutex<Option<String>>,
    bitmaps: Vec<BitmapEntry>,
}

/// One run of a layer as the read path needs it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Piece {
    /// Look in the backing file.
    Unallocated,
    /// Reads as zeros.
    Zero,
    /// Stored at this host offset of the data storage.
    Data(HostOffset),
    /// One compressed cluster starting at this guest offset.
    Compressed(GuestOffset, CompressedDescriptor),
}

/// The L2 table (if allocated) of one L1 index.
type TableSlot = Option<(u64, Option<Arc<[u64]>>)>;

/// A run with the host offset of its first byte, where it has one.
struct Run {
    piece: Piece,
    host: Option<HostOffset>,
    len: u64,
}

fn host_of(kind: SubclusterKind) -> Option<HostOffset> {
    match kind {
        SubclusterKind::UnallocatedAlloc(h)
        | SubclusterKind::ZeroAlloc(h)
        | SubclusterKind::Normal(h) => Some(h),
        _ => None,
    }
}

impl std::fmt::Debug for Qcow2Image {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Qcow2Image")
            .field("path", &self.storage.name())
            .finish()
    }
}

/// The bitmap directory of an image, with the table of every bitmap not in
/// use validated, as QEMU checks them when it opens an image: an image
/// whose bitmaps extension is damaged is refused by every command alike.
/// Ignored (empty) when autoclear bit 0 is clear.
fn load_bitmap_directory(
    storage: &dyn Storage,
    header: &Header,
) -> Result<Vec<BitmapEntry>, Qcow2Error> {
    let Some(ext) = header
        .bitmaps
        .as_ref()
        .filter(|_| header.autoclear_features & autoclear::BITMAPS != 0)
    else {
        return Ok(Vec::new());
    };
    let entries = bitmaps::read_directory(storage, ext, header.cluster_bits)?;
    for e in entries
        .iter()
        .filter(|e| e.flags & bitmaps::flags::IN_USE == 0)
    {
        bitmap_data::read_table(storage, e, header.cluster_bits, header.size & !511)?;
    }
    Ok(entries)
}

impl Qcow2Image {
    /// Opens and validates `storage` as a qcow2 image; an external data
    /// file is opened through `opener`.
    pub fn open(storage: Arc<dyn Storage>, opener: &dyn Opener) -> Result<Qcow2Image, Qcow2Error> {
        let mut probe = vec![0u8; storage.len().min(112) as usize];
        storage.read_exact_at("header", &mut probe, HostOffset(0))?;
        let bits = if probe.len() >= 24 {
            table::be32(&probe, 20)
        } else {
            16
        };
        let first_len = if (9..=21).contains(&bits) {
            storage.len().min(1 << bits)
        } else {
            probe.len() as u64
        };
        let mut first = vec![0u8; first_len as usize];
        storage.read_exact_at("header", &mut first, HostOffset(0))?;
        let header = Header::decode(&first, storage.len())?;
        let l1 = table::read(
            storage.as_ref(),
            "L1 table",
            header.l1_table_offset,
            header.l1_size.into(),
        )?;
        let data = if header.has_data_file() {
            let name = header
                .data_file
                .as_deref()
                .ok_or(Qcow2Error::MissingDataFileName)?;
            let path = resolve_data_file(name);
            Some(
                opener
                    .open(&path, Role::DataFile)
                    .map_err(|source| Qcow2Error::OpenDataFile { path, source })?,
            )
        } else {
            None
        };
        let image_file = HostFile(Arc::from(storage.name()));
        // Host offsets refer to the data file when there is one.
        let data_host_file = data
            .as_ref()
            .map(|d| HostFile(Arc::from(d.name())))
            .unwrap_or_else(|| image_file.clone());
        let fmt = EntryFormat {
            cluster_bits: header.cluster_bits,
            extended: header.extended_l2(),
            data_file: header.has_data_file(),
            v3: header.version >= 3,
        };
        // As QEMU: the snapshot table is read (and refused) at open.
        snapshots::read_table(storage.as_ref(), &header)?;
        let bitmaps = load_bitmap_directory(storage.as_ref(), &header)?;
        let l2_cache_max = (L2_CACHE_BYTES >> header.cluster_bits).max(L2_CACHE_MIN_TABLES);
        Ok(Qcow2Image {
            bitmaps,
            storage,
            data,
            data_host_file,
            header,
            fmt,
            l1,
            l2_cache: Mutex::new(HashMap::new()),
            l2_cache_max,
            prealloc: Mutex::new(None),
            refcount_damage: Mutex::new(None),
        })
    }

    /// Checks the image's metadata as `qemu-img check` does (see
    /// `check.rs`): references against refcounts, reserved bits, the
    /// COPIED flag, the corrupt bit. Fails only when the refcount table or
    /// the snapshot table cannot be read.
    pub fn check_metadata(&self) -> Result<super::MetadataReport, Qcow2Error> {
        super::check::check(self)
    }

    /// The L1 table's entries.
    pub(crate) fn l1(&self) -> &[u64] {
        &self.l1
    }

    /// The decoded header.
    pub(crate) fn header(&self) -> &Header {
        &self.header
    }

    /// The image file.
    pub(crate) fn storage(&self) -> &Arc<dyn Storage> {
        &self.storage
    }

    /// The external data file, if the image has one.
    pub(crate) fn data_storage(&self) -> Option<&Arc<dyn Storage>> {
        self.data.as_ref()
    }

    /// Virtual disk size. QEMU counts whole 512-byte sectors and drops a
    /// partial last sector; so do we, so that both see the same disk.
    pub fn virtual_size(&self) -> u64 {
        self.header.size & !511
    }

    /// Refuses images whose data cannot be read (encrypted). An image
    /// marked corrupt is read, as QEMU reads it read-only; callers decide
    /// (see `Layer::marked_corrupt`).
    pub(crate) fn check_readable(&self) -> Result<(), Qcow2Error> {
        if self.header.crypt_method != 0 {
            return Err(Qcow2Error::Encrypted);
        }
        Ok(())
    }

    /// QEMU set the corrupt bit: it found the metadata inconsistent.
    pub(crate) fn marked_corrupt(&self) -> bool {
        self.header.incompatible_features & incompat::CORRUPT != 0
    }

    /// The bitmap directory, validated when the image was opened (empty
    /// when the extension is absent or autoclear bit 0 is clear).
    pub(crate) fn bitmaps(&self) -> &[BitmapEntry] {
        &self.bitmaps
    }

    fn data_storage_or_image(&self) -> &dyn Storage {
        self.data.as_ref().unwrap_or(&self.storage).as_ref()
    }

    fn l2_table(&self, l1_index: u64) -> Result<Option<Arc<[u64]>>, Qcow2Error> {
        let Some(&entry) = self.l1.get(l1_index as usize) else {
            return Ok(None);
        };
        let offset = entry & l2::OFFSET_MASK;
        if offset == 0 {
            return Ok(None);
        }
        if offset & (self.header.cluster_size() - 1) != 0 {
            return Err(MappingError::UnalignedL2 {
                guest: GuestOffset(l1_index * self.header.l2_coverage()),
                host: HostOffset(offset),
            }
            .into());
        }
        if let Some(t) = self.l2_cache.lock().expect("l2 cache lock").get(&offset) {
            return Ok(Some(t.clone()));
        }
        let mut raw = vec![0u8; self.header.cluster_size() as usize];
        self.storage
            .read_exact_at("L2 table", &mut raw, HostOffset(offset))?;
        let table: Arc<[u64]> = table::entries(&raw).collect();
        let mut cache = self.l2_cache.lock().expect("l2 cache lock");
        if cache.len() >= self.l2_cache_max {
            cache.clear();
        }
        cache.insert(offset, table.clone());
        Ok(Some(table))
    }

    /// Classifies the unit (subcluster, cluster, or unallocated L2 range)
    /// containing `pos`; returns its kind, the host offset of `pos` where the
    /// kind has one, and the unit's end (guest byte).
    /// `table` caches the L2 table of the previous call in a scan, so runs
    /// within one table cost no cache lookups.
    fn unit_at(
        &self,
        pos: u64,
        table: &mut TableSlot,
    ) -> Result<(SubclusterKind, u64), Qcow2Error> {
        let h = &self.header;
        let coverage = h.l2_coverage();
        let l1_index = pos / coverage;
        if table.as_ref().map(|t| t.0) != Some(l1_index) {
            *table = Some((l1_index, self.l2_table(l1_index)?));
        }
        let Some(table) = table.as_ref().and_then(|t| t.1.as_deref()) else {
            return Ok((SubclusterKind::Unallocated, (l1_index + 1) * coverage));
        };
        let cluster_size = h.cluster_size();
        let cluster_start = pos & !(cluster_size - 1);
        let l2_index = ((pos % coverage) >> h.cluster_bits) as usize;
        let guest = GuestOffset(cluster_start);
        if self.fmt.extended {
            let entry = table[2 * l2_index];
            let bitmap = table[2 * l2_index + 1];
            let sc_size = cluster_size / u64::from(l2::SUBCLUSTERS);
            let sc = ((pos - cluster_start) / sc_size) as u32;
            let kind = l2::classify(self.fmt, guest, entry, bitmap, sc)?;
            if matches!(kind, SubclusterKind::Compressed(_)) {
                return Ok((kind, cluster_start + cluster_size));
            }
            Ok((kind, cluster_start + sc_size * (u64::from(sc) + 1)))
        } else {
            let kind = l2::classify(self.fmt, guest, table[l2_index], 0, 0)?;
            Ok((kind, cluster_start + cluster_size))
        }
    }

    /// Finds the run starting at `offset` (at most `max_len` bytes, clamped
    /// to the virtual size) in which every byte has the same kind and host
    /// offsets are contiguous. Compressed runs are cut at the first cluster
    /// when `split_compressed` is set, so the read path sees one descriptor.
    pub(crate) fn locate(
        &self,
        offset: GuestOffset,
        max_len: u64,
        split_compressed: bool,
    ) -> Result<(Piece, u64), Qcow2Error> {
        let run = self.run_at(offset, max_len, split_compressed)?;
        Ok((run.piece, run.len))
    }

    fn run_at(
        &self,
        offset: GuestOffset,
        max_len: u64,
        split_compressed: bool,
    ) -> Result<Run, Qcow2Error> {
        let end = offset.0.saturating_add(max_len).min(self.virtual_size());
        debug_assert!(offset.0 < end);
        let cluster_mask = self.header.cluster_size() - 1;
        let mut table = None;
        let (first, mut unit_end) = self.unit_at(offset.0, &mut table)?;
        let piece = match first {
            SubclusterKind::Unallocated | SubclusterKind::UnallocatedAlloc(_) => Piece::Unallocated,
            SubclusterKind::ZeroPlain | SubclusterKind::ZeroAlloc(_) => Piece::Zero,
            SubclusterKind::Normal(h) => Piece::Data(HostOffset(h.0 + (offset.0 & cluster_mask))),
            SubclusterKind::Compressed(d) => {
                Piece::Compressed(GuestOffset(offset.0 & !cluster_mask), d)
            }
        };
        let first_host = host_of(first).map(|h| HostOffset(h.0 + (offset.0 & cluster_mask)));
        if !(split_compressed && matches!(piece, Piece::Compressed(..))) {
            while unit_end < end {
                let (kind, next_end) = self.unit_at(unit_end, &mut table)?;
                if std::mem::discriminant(&kind) != std::mem::discriminant(&first) {
                    break;
                }
                if let (Some(h0), Some(h)) = (first_host, host_of(kind)) {
                    if h.0 + (unit_end & cluster_mask) != h0.0 + (unit_end - offset.0) {
                        break;
                    }
                }
                unit_end = next_end;
            }
        }
        let len = unit_end.min(end) - offset.0;
        if let Piece::Data(host) = piece {
            self.data_storage_or_image()
                .check_range("data cluster", host, len)?;
        }
        Ok(Run {
            piece,
            host: first_host,
            len,
        })
    }

    /// What this layer alone says about the range at `offset`.
    pub(crate) fn status(
        &self,
        offset: GuestOffset,
        max_len: u64,
    ) -> Result<(LayerExtent, u64), Qcow2Error> {
        let Run {
            piece,
            host,
            mut len,
        } = self.run_at(offset, max_len, false)?;
        let host = host.map(|offset| HostLocation {
            file: self.data_host_file.clone(),
            offset,
        });
        let mut zero = false;
        let allocation = match piece {
            Piece::Unallocated => Allocation::Unallocated,
            Piece::Zero => Allocation::Zero,
            Piece::Compressed(..) => Allocation::Compressed,
            Piece::Data(h) => {
                if self.metadata_preallocated()? {
                    // Like QEMU: data clusters of a preallocated image are
                    // refined by the host file's holes, which read as zeros.
                    let (e, n) = self.data_storage_or_image().extent_at(h, len)?;
                    zero = e != FileExtent::Data;
                    len = n.min(len);
                }
                Allocation::Data
            }
        };
        Ok((
            LayerExtent {
                allocation,
                host,
                data_reads_zero: zero,
            },
            len,
        ))
    }

    /// QEMU's heuristic for "preallocation=metadata": far more clusters have
    /// a refcount than the file has blocks on disk.
    fn metadata_preallocated(&self) -> Result<bool, Qcow2Error> {
        let mut cached = self.prealloc.lock().expect("prealloc lock");
        if let Some(v) = *cached {
            return Ok(v);
        }
        let h = &self.header;
        let cluster_size = h.cluster_size();
        let allocated = self
            .storage
            .allocated_size()
            .map_err(|source| StorageError::Stat { source })?;
        // Without an allocation count (not a file) nothing looks preallocated.
        let Some(allocated) = allocated else {
            *cached = Some(false);
            return Ok(false);
        };
        let real_clusters = allocated / cluster_size;
        let threshold = (real_clusters * 10 / 9).max(real_clusters + 2);
        // Past what the refcount table covers every refcount is 0, so a
        // huge sparse file cannot make this scan long.
        let covered = (u64::from(h.refcount_table_clusters) << h.cluster_bits) / 8
            * ((cluster_size * 8) >> h.refcount_order);
        let end_cluster = self.storage.len().div_ceil(cluster_size).min(covered);
        let scan = || -> Result<bool, RefcountError> {
            let mut refcounts = RefcountReader::new(
                self.storage.as_ref(),
                h.refcount_table_offset,
                h.refcount_table_clusters,
                h.cluster_bits,
                h.refcount_order,
            )?;
            let mut count = 0u64;
            let mut i = 0u64;
            while i < end_cluster && count < threshold {
                count += u64::from(refcounts.get(i)? != 0);
                i += 1;
            }
            Ok(count >= threshold)
        };
        // Refcounts never change what a reader sees: like QEMU, damaged
        // ones only mean "not preallocated" (and are reported).
        let result = scan().unwrap_or_else(|e| {
            *self.refcount_damage.lock().expect("damage lock") = Some(e.to_string());
            false
        });
        *cached = Some(result);
        Ok(result)
    }

    /// Why the refcounts could not be read, if reading found them damaged.
    pub(crate) fn refcount_damage(&self) -> Option<String> {
        self.refcount_damage.lock().expect("damage lock").clone()
    }

    /// Reads one compressed cluster into `out` (exactly one cluster long).
    pub(crate) fn read_compressed(
        &self,
        guest: GuestOffset,
        desc: CompressedDescriptor,
        out: &mut [u8],
    ) -> Result<(), Qcow2Error> {
        let buf = self.compressed_bytes(desc)?;
        codec::decompress(self.header.compression_type, &buf, out)
            .map_err(|source| Qcow2Error::Decompress { guest, source })
    }

    /// The stored bytes of a compressed cluster: from its offset to the end
    /// of its last sector, cut at the end of the file (QEMU pads reads past
    /// EOF with zeros; the stream itself must end inside the file).
    pub(crate) fn compressed_bytes(
        &self,
        desc: CompressedDescriptor,
    ) -> Result<Vec<u8>, Qcow2Error> {
        let avail = self.storage.len().saturating_sub(desc.offset.0);
        if avail == 0 {
            self.storage
                .check_range("compressed cluster", desc.offset, desc.len)?;
        }
        let mut buf = vec![0u8; desc.len.min(avail) as usize];
        self.storage
            .read_exact_at("compressed cluster", &mut buf, desc.offset)?;
        Ok(buf)
    }

    /// Reads `buf.len()` bytes of stored data at `host` (a `Piece::Data`).
    pub(crate) fn read_data(&self, host: HostOffset, buf: &mut [u8]) -> Result<(), Qcow2Error> {
        Ok(self
            .data_storage_or_image()
            .read_exact_at("data cluster", buf, host)?)
    }
}
