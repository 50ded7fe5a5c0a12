//! A streaming qcow2 v3 writer for backups: guest clusters arrive in
//! increasing order, data is appended once, and every table is written at
//! the end.
//!
//! # Layout
//!
//! ```text
//! cluster 0      header (112 bytes), header extensions, backing file name
//! cluster 1 ..   guest data in call order: normal clusters cluster-aligned,
//!                compressed streams packed byte by byte into "compressed
//!                clusters"; a stream that does not fit the rest of the open
//!                compressed cluster continues into the next host cluster when
//!                that one is free, and otherwise starts a new one. A normal
//!                cluster never forces padding: compressed streams after it
//!                keep filling the open compressed cluster before it (the
//!                way QEMU packs them), so mixed data wastes no space.
//! then           L2 tables (in L1 order), L1 table, refcount blocks,
//!                refcount table, each cluster-aligned
//! ```
//!
//! Cluster 0 is written last, by [`Qcow2Writer::finish`], so a file left
//! behind by a crash or an error has no magic and is never mistaken for an
//! image. The file ends exactly at the end of the refcount table.
//!
//! # Invariants (qcow2 spec, docs/interop/qcow2.rst)
//!
//! - "Header": version 3, `header_length` 112 including the compression type
//!   byte 104; incompatible bit 3 is set iff the codec is zstd (the field
//!   must be non-zero exactly when the bit is set). `refcount_order` is 4
//!   (16-bit refcounts); no extended L2, no lazy refcounts, no dirty bit.
//! - "Header extensions": the backing format extension, then the end marker;
//!   the backing file name follows in the rest of cluster 0 (at most 1023
//!   bytes), which is checked when the writer is created.
//! - "Cluster mapping": L1 and standard L2 entries carry bit 63 (COPIED)
//!   because each table and data cluster has refcount exactly 1; a zero
//!   cluster is bit 0 with no host offset (only needed over a backing file,
//!   otherwise the entry stays 0 and reads as zeros anyway).
//! - "Compressed Clusters Descriptor": with x = 62 - (cluster_bits - 8), bits
//!   0..x-1 hold the byte offset and bits x..61 the number of 512-byte
//!   sectors after the first one; bit 62 is set and bit 63 never is. The
//!   offset must fit in x bits (and below 2^56).
//! - "Host cluster management": every host cluster that a compressed stream
//!   touches gets one reference per stream (QEMU's check counts the
//!   sector-rounded range, which touches the same clusters), normal data,
//!   header and metadata clusters get 1. The refcount blocks and table count
//!   themselves, so their number is found by iterating to a fixed point.
//! - QEMU limits: L1 table <= 32 MiB (bounds the virtual size), refcount
//!   table <= 8 MiB (bounds the file size).
//!
//! Memory use is the L2 tables that have entries, one 16-bit refcount per
//! host cluster written and a write buffer of about 4 MiB; nothing
//! else grows with the image. The output depends only on the options and the
//! sequence of calls.

use std::fs::File;
use std::io;
use std::path::Path;
use std::sync::Arc;

use crate::codec::CompressionType;
use crate::error::{Classify, ErrorClass};
use crate::qcow2::header::{
    encode_extension, ext, incompat, Header, MAX_L1_BYTES, MAX_REFTABLE_BYTES, V3_HEADER_LEN,
};
use crate::qcow2::l2::{self, COPIED, ZERO};
use crate::qcow2::table;
use crate::storage::{FileStorage, Storage, StorageError};
use crate::units::{ClusterIndex, HostOffset};

mod refcount_build;
use refcount_build::{RefcountError, Refcounts};

/// Table entries hold host offsets in bits 9..55, so everything stays below.
const HOST_LIMIT: u64 = 1 << 56;
/// Spec limit on `backing_file_size`.
const MAX_BACKING_NAME: usize = 1023;
/// Appended bytes are collected up to this size before one positioned write.
const BUFFER_BYTES: usize = 4 << 20;

/// The backing file recorded in the image header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackingRef {
    /// The backing file name as QEMU resolves it (relative names are
    /// relative to the image's directory).
    pub name: String,
    /// Its format ("qcow2", "raw"), stored in the backing format extension.
    pub format: String,
}

/// What to create.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WriterOptions {
    /// Virtual disk size in bytes, a multiple of 512 (QEMU counts qcow2
    /// sizes in whole sectors and would drop a partial one).
    pub virtual_size: u64,
    /// log2 of the cluster size, 9 (512 bytes) to 21 (2 MiB).
    pub cluster_bits: u32,
    /// Codec of the compressed clusters the caller will pass.
    pub compression: CompressionType,
    /// Backing file, if the image is an overlay.
    pub backing: Option<BackingRef>,
}

/// The content of one guest cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClusterWrite<'a> {
    /// Exactly one cluster of guest data (the caller zero-pads a final
    /// partial cluster).
    Data(&'a [u8]),
    /// One complete compressed stream of the cluster in the image's codec
    /// (raw deflate with a 4 KiB window, or one zstd frame), at least one and
    /// fewer than cluster-size bytes. It is stored as given, not checked.
    Compressed(&'a [u8]),
    /// The cluster reads as zeros: the zero flag when there is a backing
    /// file, otherwise nothing is stored.
    Zero,
}

/// Why creating or writing an image failed.
#[derive(Debug, thiserror::Error)]
pub enum WriterError {
    /// The cluster size is out of range.
    #[error("cluster_bits {0} is out of range (9 to 21)")]
    ClusterBits(u32),
    /// The virtual size is not a multiple of 512 bytes (QEMU would ignore
    /// the partial sector; `qemu-img create` rounds up instead).
    #[error("virtual size {0} is not a multiple of 512 bytes")]
    UnalignedSize(u64),
    /// The virtual size needs a larger L1 table than QEMU accepts.
    #[error("virtual size {size} is too large for {cluster_size}-byte clusters (at most {max})")]
    VirtualSize {
        /// The requested size.
        size: u64,
        /// The cluster size.
        cluster_size: u64,
        /// The largest size this cluster size allows.
        max: u64,
    },
    /// The backing reference cannot be stored.
    #[error("cannot record backing file {name:?}: {why}")]
    Backing {
        /// The backing file name.
        name: String,
        /// What is wrong.
        why: &'static str,
    },
    /// Querying the output file failed.
    #[error("cannot inspect the output file: {source}")]
    InspectFile {
        /// Why.
        source: StorageError,
    },
    /// The output file is not usable as given.
    #[error("output file is unusable: {why}")]
    OutputFile {
        /// What is wrong.
        why: &'static str,
    },
    /// Cluster indices must strictly increase.
    #[error("cluster {index} written after cluster {previous}")]
    OutOfOrder {
        /// The cluster being written.
        index: ClusterIndex,
        /// The cluster written before it.
        previous: ClusterIndex,
    },
    /// The cluster lies past the virtual size.
    #[error("cluster {index} is beyond the end of the disk ({clusters} clusters)")]
    BeyondEnd {
        /// The cluster being written.
        index: ClusterIndex,
        /// Number of guest clusters.
        clusters: u64,
    },
    /// A data cluster is not exactly one cluster long.
    #[error("data for cluster {index} is {len} bytes, expected {cluster_size}")]
    DataLength {
        /// The cluster being written.
        index: ClusterIndex,
        /// The length given.
        len: usize,
        /// The cluster size.
        cluster_size: u64,
    },
    /// A compressed stream is empty or not smaller than a cluster.
    #[error(
        "compressed stream for cluster {index} is {len} bytes, must be 1 to {cluster_size} - 1"
    )]
    CompressedLength {
        /// The cluster being written.
        index: ClusterIndex,
        /// The length given.
        len: usize,
        /// The cluster size.
        cluster_size: u64,
    },
    /// The image outgrew what qcow2 (or QEMU) can address.
    #[error("image too large: {why}")]
    TooLarge {
        /// Which limit was hit.
        why: &'static str,
    },
    /// A host cluster is shared by more compressed clusters than a 16-bit
    /// refcount can count.
    #[error("refcount of host cluster at {offset} would overflow")]
    RefcountOverflow {
        /// Start of the host cluster.
        offset: HostOffset,
    },
    /// Writing guest data failed.
    #[error("cannot write data at host offset {offset} ({len} bytes): {source}")]
    WriteData {
        /// Where the failed write started.
        offset: HostOffset,
        /// Its length.
        len: usize,
        /// The I/O error.
        source: io::Error,
    },
    /// Writing the tables failed.
    #[error("cannot write metadata at host offset {offset} ({len} bytes): {source}")]
    WriteMetadata {
        /// Where the failed write started.
        offset: HostOffset,
        /// Its length.
        len: usize,
        /// The I/O error.
        source: io::Error,
    },
    /// Writing the header cluster failed.
    #[error("cannot write the image header: {source}")]
    WriteHeader {
        /// The I/O error.
        source: io::Error,
    },
    /// An earlier write failed, so the file's content is unknown.
    #[error("an earlier write failed; the image cannot be completed")]
    Poisoned,
}

impl Classify for WriterError {
    fn class(&self) -> ErrorClass {
        match self {
            WriterError::ClusterBits(_)
            | WriterError::UnalignedSize(_)
            | WriterError::VirtualSize { .. }
            | WriterError::Backing { .. }
            | WriterError::OutputFile { .. } => ErrorClass::Usage,
            WriterError::InspectFile { source } => source.class(),
            WriterError::WriteData { source, .. }
            | WriterError::WriteMetadata { source, .. }
            | WriterError::WriteHeader { source } => ErrorClass::of_io(source),
            WriterError::TooLarge { .. } | WriterError::RefcountOverflow { .. } => {
                ErrorClass::Unsupported
            }
            // Misuse of the API, or a write after a failed one: bugs in
            // the caller.
            WriterError::OutOfOrder { .. }
            | WriterError::BeyondEnd { .. }
            | WriterError::DataLength { .. }
            | WriterError::CompressedLength { .. }
            | WriterError::Poisoned => ErrorClass::Internal,
        }
    }
}

/// One in-memory L2 table and the L1 slot it belongs to.
struct L2Table {
    l1_index: u64,
    entries: Box<[u64]>,
}

/// Which kind of bytes a buffer flush carries, for error reports.
#[derive(Clone, Copy)]
enum Stage {
    Data,
    Metadata,
}

/// Writes one qcow2 image front to back; see the module docs.
pub struct Qcow2Writer {
    storage: Arc<dyn Storage>,
    opts: WriterOptions,
    /// Guest clusters in the virtual disk.
    guest_clusters: u64,
    /// Entries in the L1 table.
    l1_size: u64,
    /// Tables with at least one entry, in increasing `l1_index`.
    l2_tables: Vec<L2Table>,
    /// Refcount of each host cluster, starting at cluster 0.
    refcounts: Refcounts,
    /// Bytes not yet written, which belong at `buf_start`.
    buf: Vec<u8>,
    buf_start: u64,
    /// First host byte not yet allocated; always cluster aligned.
    alloc_end: u64,
    /// The open compressed region: where the next stream may go, and the
    /// (cluster-aligned) end of the clusters reserved for streams.
    compressed: Option<(u64, u64)>,
    last_index: Option<u64>,
    poisoned: bool,
}

impl Qcow2Writer {
    /// Prepares to write an image into `storage`, which must be empty and
    /// writable. Checks the options (cluster size, virtual size against
    /// QEMU's L1 limit, backing name length) before anything is written.
    pub fn new(storage: Arc<dyn Storage>, opts: WriterOptions) -> Result<Self, WriterError> {
        if !(9..=21).contains(&opts.cluster_bits) {
            return Err(WriterError::ClusterBits(opts.cluster_bits));
        }
        if opts.virtual_size % 512 != 0 {
            return Err(WriterError::UnalignedSize(opts.virtual_size));
        }
        let cluster_size = 1u64 << opts.cluster_bits;
        let l2_entries = cluster_size / 8;
        let guest_clusters = opts.virtual_size.div_ceil(cluster_size);
        let l1_size = guest_clusters.div_ceil(l2_entries);
        if l1_size > MAX_L1_BYTES / 8 {
            // Cannot overflow: at most 2^22 * 2^18 * 2^21.
            let max = (MAX_L1_BYTES / 8) * l2_entries * cluster_size;
            return Err(WriterError::VirtualSize {
                size: opts.virtual_size,
                cluster_size,
                max,
            });
        }
        if let Some(b) = &opts.backing {
            check_backing(b, cluster_size)?;
        }
        if !storage.is_empty() {
            return Err(WriterError::OutputFile {
                why: "file is not empty",
            });
        }
        let mut refcounts = Refcounts::default();
        refcounts
            .set_one(0)
            .map_err(|e| refcount_error(e, opts.cluster_bits))?;
        Ok(Qcow2Writer {
            storage,
            opts,
            guest_clusters,
            l1_size,
            l2_tables: Vec::new(),
            // Cluster 0 holds the header.
            refcounts,
            buf: Vec::with_capacity(BUFFER_BYTES + usize_of(cluster_size)?),
            buf_start: cluster_size,
            alloc_end: cluster_size,
            compressed: None,
            last_index: None,
            poisoned: false,
        })
    }

    /// [`Qcow2Writer::new`] on a file the caller created for writing at
    /// `path`; refuses a file in append mode or not open for writing.
    pub fn on_file(file: File, path: &Path, opts: WriterOptions) -> Result<Self, WriterError> {
        let storage = FileStorage::writable(file, path).map_err(|e| match e {
            StorageError::NotWritable { why } => WriterError::OutputFile { why },
            other => WriterError::InspectFile { source: other },
        })?;
        Qcow2Writer::new(Arc::new(storage), opts)
    }

    /// Stores guest cluster `index`. Indices must strictly increase; clusters
    /// never written stay unallocated (they read from the backing file, or
    /// as zeros without one). A rejected call changes nothing; after an I/O
    /// error every later call fails with [`WriterError::Poisoned`].
    pub fn write_cluster(
        &mut self,
        index: ClusterIndex,
        w: ClusterWrite<'_>,
    ) -> Result<(), WriterError> {
        if self.poisoned {
            return Err(WriterError::Poisoned);
        }
        if index.0 >= self.guest_clusters {
            return Err(WriterError::BeyondEnd {
                index,
                clusters: self.guest_clusters,
            });
        }
        if let Some(previous) = self.last_index.filter(|&p| index.0 <= p) {
            return Err(WriterError::OutOfOrder {
                index,
                previous: ClusterIndex(previous),
            });
        }
        let cluster_size = self.cluster_size();
        match w {
            ClusterWrite::Data(data) => {
                if data.len() as u64 != cluster_size {
                    return Err(WriterError::DataLength {
                        index,
                        len: data.len(),
                        cluster_size,
                    });
                }
                let offset = self.alloc_end;
                check_room(offset, cluster_size)?;
                self.set_refcount_one(offset)?;
                self.write_at(offset, data, Stage::Data)?;
                self.alloc_end += cluster_size;
                self.set_l2(index, offset | COPIED);
            }
            ClusterWrite::Compressed(stream) => {
                if stream.is_empty() || stream.len() as u64 >= cluster_size {
                    return Err(WriterError::CompressedLength {
                        index,
                        len: stream.len(),
                        cluster_size,
                    });
                }
                let len = stream.len() as u64;
                let (offset, region_end) = self.place_compressed(len)?;
                let descriptor = compressed_descriptor(self.opts.cluster_bits, offset, len)?;
                check_room(offset, len)?;
                check_room(region_end, 0)?;
                // Every host cluster the stream touches (at most two) gets a
                // reference; `add_ref` changes nothing when it fails.
                let bits = self.opts.cluster_bits;
                let (first, last) = (offset >> bits, (offset + (len - 1)) >> bits);
                self.refcounts
                    .add_ref(first, last)
                    .map_err(|e| refcount_error(e, bits))?;
                // Record the region first: a flush inside `write_at` may
                // close it, and that decision must stick.
                self.compressed = Some((offset + len, region_end));
                self.alloc_end = self.alloc_end.max(region_end);
                self.write_at(offset, stream, Stage::Data)?;
                self.set_l2(index, descriptor);
            }
            ClusterWrite::Zero => {
                if self.opts.backing.is_some() {
                    self.set_l2(index, ZERO);
                }
            }
        }
        self.last_index = Some(index.0);
        Ok(())
    }

    /// Host bytes of the image so far: the reserved header cluster, the
    /// data and its padding. The tables written by [`Self::finish`] come on
    /// top.
    pub fn bytes_written(&self) -> u64 {
        self.alloc_end
    }

    /// Writes the L2 tables, L1 table, refcount blocks and table, then the
    /// header cluster. The caller syncs the storage (and renames the file);
    /// nothing here syncs.
    pub fn finish(mut self) -> Result<(), WriterError> {
        if self.poisoned {
            return Err(WriterError::Poisoned);
        }
        let bits = self.opts.cluster_bits;
        self.compressed = None;

        // L2 tables, then the L1 table pointing at them (COPIED: refcount 1).
        let tables = std::mem::take(&mut self.l2_tables);
        let mut l2_offsets = Vec::with_capacity(tables.len());
        let mut cluster = Vec::with_capacity(usize_of(self.cluster_size())?);
        for table in tables {
            let offset = self.pos();
            cluster.clear();
            table::encode_into(table.entries.iter().copied(), &mut cluster);
            self.append_metadata_cluster(&cluster)?;
            l2_offsets.push((table.l1_index, offset | COPIED));
        }
        // An image without an L1 table (virtual size 0) records offset 0.
        let l1_offset = if self.l1_size == 0 { 0 } else { self.pos() };
        let mut next = l2_offsets.into_iter().peekable();
        self.append_table(
            (0..self.l1_size).map(|i| match next.next_if(|(l1, _)| *l1 == i) {
                Some((_, entry)) => entry,
                None => 0,
            }),
        )?;

        // Refcount blocks, then the table, sized to count themselves.
        let used = self.pos() >> bits;
        let layout = refcount_build::layout(bits, used, MAX_REFTABLE_BYTES)
            .map_err(|why| WriterError::TooLarge { why })?;
        // `layout` checked that this sum does not overflow.
        let end = used + layout.blocks + layout.table_clusters;
        if end > HOST_LIMIT >> bits {
            return Err(WriterError::TooLarge {
                why: "refcount structures beyond 64 PiB",
            });
        }
        for c in used..end {
            self.set_refcount_one(c << bits)?;
        }
        for block in 0..layout.blocks {
            cluster.clear();
            self.refcounts.encode_block(bits, block, &mut cluster);
            self.append_metadata_cluster(&cluster)?;
        }
        let table_offset = self.pos();
        self.append_table((used..used + layout.blocks).map(|c| c << bits))?;
        self.flush(Stage::Metadata)?;

        let header = self.header_cluster(l1_offset, table_offset, layout.table_clusters)?;
        self.storage
            .write_at(&header, HostOffset(0))
            .map_err(|source| WriterError::WriteHeader { source })?;
        Ok(())
    }

    fn cluster_size(&self) -> u64 {
        1 << self.opts.cluster_bits
    }

    /// The host offset the next appended cluster gets.
    fn pos(&self) -> u64 {
        self.alloc_end
    }

    /// Where a compressed stream of `len` bytes goes, and the end of the
    /// compressed region afterwards. Does not change any state.
    fn place_compressed(&self, len: u64) -> Result<(u64, u64), WriterError> {
        match self.compressed {
            Some((cursor, end)) if cursor + len <= end => Ok((cursor, end)),
            // The region ends where free space begins: grow it.
            Some((cursor, end)) if end == self.alloc_end => {
                Ok((cursor, self.align_up(cursor + len)?))
            }
            _ => Ok((self.alloc_end, self.align_up(self.alloc_end + len)?)),
        }
    }

    /// Places `bytes` at host `offset` (at or after the buffer's start),
    /// zero-filling any gap, and flushes when the buffer is full.
    fn write_at(&mut self, offset: u64, bytes: &[u8], stage: Stage) -> Result<(), WriterError> {
        check_room(offset, bytes.len() as u64)?;
        let at = usize_of(offset - self.buf_start)?;
        let end = at + bytes.len();
        if at == self.buf.len() {
            self.buf.extend_from_slice(bytes);
        } else {
            if self.buf.len() < end {
                self.buf.resize(end, 0);
            }
            self.buf[at..end].copy_from_slice(bytes);
        }
        if self.buf.len() >= BUFFER_BYTES {
            self.flush_keeping_open_region(stage)?;
        }
        Ok(())
    }

    /// Writes out the buffer except the open compressed cluster (and what
    /// follows it), which later streams may still fill. When that tail is
    /// large (a long run of normal clusters), the region is closed instead.
    fn flush_keeping_open_region(&mut self, stage: Stage) -> Result<(), WriterError> {
        let buf_end = self.buf_start + self.buf.len() as u64;
        let mask = self.cluster_size() - 1;
        let keep_from = match self.compressed {
            // Bytes before `buf_start` are on disk already.
            Some((cursor, end)) if cursor < end => (cursor & !mask).max(self.buf_start),
            _ => buf_end,
        };
        let max_tail = ((BUFFER_BYTES / 2) as u64).max(4 * self.cluster_size());
        let keep_from = if buf_end - keep_from > max_tail {
            self.compressed = None;
            buf_end
        } else {
            keep_from
        };
        let n = usize_of(keep_from - self.buf_start)?;
        if n == 0 {
            return Ok(());
        }
        let offset = HostOffset(self.buf_start);
        if let Err(source) = self.storage.write_at(&self.buf[..n], offset) {
            self.poisoned = true;
            return Err(match stage {
                Stage::Data => WriterError::WriteData {
                    offset,
                    len: n,
                    source,
                },
                Stage::Metadata => WriterError::WriteMetadata {
                    offset,
                    len: n,
                    source,
                },
            });
        }
        self.buf.drain(..n);
        self.buf_start = keep_from;
        Ok(())
    }

    fn align_up(&self, offset: u64) -> Result<u64, WriterError> {
        let mask = self.cluster_size() - 1;
        offset
            .checked_add(mask)
            .map(|o| o & !mask)
            .ok_or(WriterError::TooLarge {
                why: "host offset overflow",
            })
    }

    fn set_refcount_one(&mut self, offset: u64) -> Result<(), WriterError> {
        let bits = self.opts.cluster_bits;
        self.refcounts
            .set_one(offset >> bits)
            .map_err(|e| refcount_error(e, bits))
    }

    /// Records an L2 entry; the caller guarantees `index` is in range and
    /// larger than any before it, so the table is the last one or new.
    fn set_l2(&mut self, index: ClusterIndex, entry: u64) {
        let l2_bits = self.opts.cluster_bits - 3;
        let l1_index = index.0 >> l2_bits;
        let slot = (index.0 & ((1 << l2_bits) - 1)) as usize;
        if self.l2_tables.last().is_none_or(|t| t.l1_index != l1_index) {
            self.l2_tables.push(L2Table {
                l1_index,
                entries: vec![0; 1 << l2_bits].into_boxed_slice(),
            });
        }
        if let Some(table) = self.l2_tables.last_mut() {
            table.entries[slot] = entry;
        }
    }

    /// Appends one full table cluster with refcount 1.
    fn append_metadata_cluster(&mut self, cluster: &[u8]) -> Result<(), WriterError> {
        let offset = self.alloc_end;
        check_room(offset, cluster.len() as u64)?;
        self.set_refcount_one(offset)?;
        self.write_at(offset, cluster, Stage::Metadata)?;
        self.alloc_end += self.cluster_size();
        Ok(())
    }

    /// Appends a table of big-endian entries as whole clusters, zero-padded,
    /// each with refcount 1.
    fn append_table(&mut self, entries: impl Iterator<Item = u64>) -> Result<(), WriterError> {
        let cluster_size = usize_of(self.cluster_size())?;
        let mut cluster = Vec::with_capacity(cluster_size);
        for entry in entries {
            table::encode_into([entry], &mut cluster);
            if cluster.len() == cluster_size {
                self.append_metadata_cluster(&cluster)?;
                cluster.clear();
            }
        }
        if !cluster.is_empty() {
            cluster.resize(cluster_size, 0);
            self.append_metadata_cluster(&cluster)?;
        }
        Ok(())
    }

    fn flush(&mut self, stage: Stage) -> Result<(), WriterError> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let offset = HostOffset(self.buf_start);
        let len = self.buf.len();
        if let Err(source) = self.storage.write_at(&self.buf, offset) {
            self.poisoned = true;
            return Err(match stage {
                Stage::Data => WriterError::WriteData {
                    offset,
                    len,
                    source,
                },
                Stage::Metadata => WriterError::WriteMetadata {
                    offset,
                    len,
                    source,
                },
            });
        }
        self.buf_start += len as u64;
        self.buf.clear();
        Ok(())
    }

    /// Cluster 0: header, extensions, end marker, backing name, zeros.
    fn header_cluster(
        &self,
        l1: u64,
        reftable: u64,
        reftable_clusters: u64,
    ) -> Result<Vec<u8>, WriterError> {
        let too_large = |why| WriterError::TooLarge { why };
        let mut h = Header {
            version: 3,
            backing_file_offset: 0,
            backing_file_size: 0,
            cluster_bits: self.opts.cluster_bits,
            size: self.opts.virtual_size,
            crypt_method: 0,
            l1_size: u32::try_from(self.l1_size).map_err(|_| too_large("L1 table"))?,
            l1_table_offset: HostOffset(l1),
            refcount_table_offset: HostOffset(reftable),
            refcount_table_clusters: u32::try_from(reftable_clusters)
                .map_err(|_| too_large("refcount table"))?,
            nb_snapshots: 0,
            snapshots_offset: HostOffset(0),
            incompatible_features: match self.opts.compression {
                CompressionType::Zlib => 0,
                CompressionType::Zstd => incompat::COMPRESSION_TYPE,
            },
            compatible_features: 0,
            autoclear_features: 0,
            refcount_order: refcount_build::REFCOUNT_ORDER,
            header_length: V3_HEADER_LEN,
            compression_type: self.opts.compression,
            backing_format: None,
            data_file: None,
            bitmaps: None,
            backing_file: None,
        };
        let mut extensions = Vec::new();
        if let Some(b) = &self.opts.backing {
            extensions = encode_extension(ext::BACKING_FORMAT, b.format.as_bytes());
            h.backing_file_offset = u64::from(V3_HEADER_LEN) + extensions.len() as u64 + 8;
            // Checked by `check_backing`.
            h.backing_file_size = b.name.len() as u32;
        }
        extensions.extend(encode_extension(ext::END, &[]));
        let mut bytes = h.encode_v3();
        bytes.extend_from_slice(&extensions);
        if let Some(b) = &self.opts.backing {
            bytes.extend_from_slice(b.name.as_bytes());
        }
        bytes.resize(usize_of(self.cluster_size())?, 0);
        Ok(bytes)
    }
}

/// Checks that the backing name and format fit in cluster 0 after the
/// header and extensions (spec "Header extensions").
fn check_backing(b: &BackingRef, cluster_size: u64) -> Result<(), WriterError> {
    let bad = |why| WriterError::Backing {
        name: b.name.clone(),
        why,
    };
    if b.name.is_empty() {
        return Err(bad("the name is empty"));
    }
    if b.name.len() > MAX_BACKING_NAME {
        return Err(bad("the name is longer than 1023 bytes"));
    }
    if b.format.is_empty() {
        return Err(bad("the format is empty"));
    }
    if b.name.contains('\0') || b.format.contains('\0') {
        return Err(bad("the name or format contains a NUL byte"));
    }
    // Header, format extension (8 + padded data), end marker (8), name.
    let needed = (b.format.len() as u64)
        .div_ceil(8)
        .checked_mul(8)
        .and_then(|f| f.checked_add(u64::from(V3_HEADER_LEN) + 16 + b.name.len() as u64));
    if needed.is_none_or(|n| n > cluster_size) {
        return Err(bad("the name and format do not fit in the header cluster"));
    }
    Ok(())
}

/// Encodes a compressed cluster descriptor (spec "Compressed Clusters
/// Descriptor") for a stream of `len` bytes at host byte `offset`.
fn compressed_descriptor(cluster_bits: u32, offset: u64, len: u64) -> Result<u64, WriterError> {
    l2::encode_compressed(HostOffset(offset), len, cluster_bits)
        .map_err(|why| WriterError::TooLarge { why })
}

/// Fails unless `len` bytes at `offset` stay below the 2^56 limit of host
/// offsets in table entries.
fn check_room(offset: u64, len: u64) -> Result<(), WriterError> {
    match offset.checked_add(len) {
        Some(end) if end <= HOST_LIMIT => Ok(()),
        _ => Err(WriterError::TooLarge {
            why: "image beyond 64 PiB",
        }),
    }
}

fn refcount_error(e: RefcountError, cluster_bits: u32) -> WriterError {
    match e {
        RefcountError::Overflow(cluster) => WriterError::RefcountOverflow {
            offset: HostOffset(cluster << cluster_bits),
        },
        RefcountError::TooManyClusters => WriterError::TooLarge {
            why: "too many host clusters to count",
        },
    }
}

fn usize_of(n: u64) -> Result<usize, WriterError> {
    usize::try_from(n).map_err(|_| WriterError::TooLarge {
        why: "size exceeds the address space",
    })
}

#[cfg(test)]
mod qemu_tests;
#[cfg(test)]
mod tests;
