//! A streaming qcow2 v3 writer for backups: guest clusters arrive in
//! increasing order, data is appended once, and each table is written as
//! soon as the clusters it describes are final, so memory does not grow
//! with the image.
//!
//! # Layout
//!
//! ```text
//! cluster 0      header (112 bytes), header extensions, backing file name
//! clusters 1..   the L1 table, at a fixed place; each L1 cluster is written
//!                in place once final, all-zero ones stay holes
//! then           in call order: guest data, normal clusters cluster-aligned
//!                and compressed streams packed byte by byte (see
//!                `appender.rs`); each L2 table once the writes have moved
//!                past its guest range; each refcount block once every host
//!                cluster it counts is final
//! at the end     the last L2 table, the remaining refcount blocks and the
//!                refcount table, each cluster-aligned
//! ```
//!
//! Cluster 0 is written last, by [`Qcow2Writer::finish`], so a file left
//! behind by a crash or an error has no magic and is never mistaken for an
//! image. A caller that syncs before making the file visible (a backup)
//! splits that step: [`Qcow2Writer::finish_unsealed`] writes cluster 0
//! without its first four bytes, and [`Qcow2Writer::seal`] writes the magic
//! once everything else is durable, so even a file synced up to the last
//! moment only ever has the magic when it is complete. The file ends exactly at the end of the refcount table.
//!
//! # Invariants (qcow2 spec, docs/interop/qcow2.rst)
//!
//! - "Header": see `header_cluster.rs`.
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
//!   header and metadata clusters get 1 (`refcount_build.rs`).
//! - QEMU limits: L1 table <= 32 MiB (bounds the virtual size), refcount
//!   table <= 8 MiB (bounds the file size).
//!
//! # Memory
//!
//! One L2 table, one L1 cluster, the refcounts of about one refcount block,
//! one 8-byte refcount table entry per block written (at most 8 MiB) and a
//! write buffer of about 4 MiB: at most ~20 MiB whatever the virtual size,
//! cluster size or allocation pattern. The output depends only on the
//! options and the sequence of calls.

use std::fs::File;
use std::path::Path;
use std::sync::Arc;

use crate::codec::CompressionType;
use crate::qcow2::header::{MAGIC, MAX_L1_BYTES, MAX_REFTABLE_BYTES};
use crate::qcow2::l2::{self, COPIED, ZERO};
use crate::qcow2::table;
use crate::storage::{FileStorage, Storage, StorageError};
use crate::units::{ClusterIndex, HostOffset};

mod appender;
mod error;
mod header_cluster;
mod mapping;
mod refcount_build;
use appender::{Appender, Stage};
pub use error::WriterError;
use mapping::{L2Table, Mapping};
use refcount_build::{RefcountError, Refcounts};

/// Table entries hold host offsets in bits 9..55, so everything stays below.
const HOST_LIMIT: u64 = 1 << 56;

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

/// Writes one qcow2 image front to back; see the module docs.
pub struct Qcow2Writer {
    opts: WriterOptions,
    /// Guest clusters in the virtual disk.
    guest_clusters: u64,
    /// Entries in the L1 table, which starts at cluster 1.
    l1_size: u64,
    /// Host space, packing and the write buffer.
    out: Appender,
    /// The L2 table and L1 cluster being filled.
    mapping: Mapping,
    /// Refcounts of the host clusters whose block is not written yet.
    refcounts: Refcounts,
    /// Reused buffer for encoding one table cluster.
    scratch: Vec<u8>,
    last_index: Option<u64>,
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
            header_cluster::check_backing(b, cluster_size)?;
        }
        if !storage.is_empty() {
            return Err(WriterError::OutputFile {
                why: "file is not empty",
            });
        }
        let bits = opts.cluster_bits;
        // The header cluster, then the L1 table.
        let reserved = 1 + (l1_size * 8).div_ceil(cluster_size);
        let mut refcounts = Refcounts::new(bits, MAX_REFTABLE_BYTES);
        for cluster in 0..reserved {
            refcounts
                .set_one(cluster)
                .map_err(|e| refcount_error(e, bits))?;
        }
        Ok(Qcow2Writer {
            out: Appender::new(storage, bits, reserved << bits)?,
            mapping: Mapping::new(bits),
            refcounts,
            scratch: Vec::with_capacity(usize_of(cluster_size)?),
            opts,
            guest_clusters,
            l1_size,
            last_index: None,
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
    /// as zeros without one). A call rejected for its arguments (order,
    /// range, length) changes nothing; after an I/O error every later call
    /// fails with [`WriterError::Poisoned`].
    pub fn write_cluster(
        &mut self,
        index: ClusterIndex,
        w: ClusterWrite<'_>,
    ) -> Result<(), WriterError> {
        if self.out.poisoned() {
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
            ClusterWrite::Data(data) if data.len() as u64 != cluster_size => {
                return Err(WriterError::DataLength {
                    index,
                    len: data.len(),
                    cluster_size,
                });
            }
            ClusterWrite::Compressed(stream)
                if stream.is_empty() || stream.len() as u64 >= cluster_size =>
            {
                return Err(WriterError::CompressedLength {
                    index,
                    len: stream.len(),
                    cluster_size,
                });
            }
            ClusterWrite::Zero if self.opts.backing.is_none() => {
                // Nothing is stored: the entry stays 0.
                self.last_index = Some(index.0);
                return Ok(());
            }
            _ => {}
        }
        // The writes have moved past the table being filled: it is final.
        if let Some(table) = self.mapping.take_passed(index.0) {
            self.append_l2(table)?;
        }
        let entry = match w {
            ClusterWrite::Data(data) => {
                let offset = self.out.pos();
                check_room(offset, cluster_size)?;
                self.set_refcount_one(offset)?;
                self.out.append_cluster(data, Stage::Data)?;
                offset | COPIED
            }
            ClusterWrite::Compressed(stream) => {
                let len = stream.len() as u64;
                let (offset, region_end) = self.out.place_compressed(len)?;
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
                self.out.put_compressed(offset, region_end, stream)?;
                descriptor
            }
            ClusterWrite::Zero => ZERO,
        };
        self.mapping.set(index.0, entry);
        self.last_index = Some(index.0);
        self.write_final_refcount_blocks()
    }

    /// Host bytes of the image so far: the header and L1 clusters, the data
    /// and its padding, and the tables written so far. The rest of the
    /// tables, written by [`Self::finish`], come on top.
    pub fn bytes_written(&self) -> u64 {
        self.out.pos()
    }

    /// Writes the last L2 table and L1 cluster, the remaining refcount
    /// blocks and the refcount table, then the header cluster. The caller
    /// syncs the storage (and renames the file); nothing here syncs.
    pub fn finish(self) -> Result<(), WriterError> {
        let storage = self.out.storage();
        self.finish_unsealed()?;
        Qcow2Writer::seal(storage.as_ref())
    }

    /// Like [`Self::finish`], but the magic (the header's first four
    /// bytes) stays zero until [`Self::seal`]: until then no reader takes
    /// the file for a qcow2 image.
    pub fn finish_unsealed(mut self) -> Result<(), WriterError> {
        if self.out.poisoned() {
            return Err(WriterError::Poisoned);
        }
        let bits = self.opts.cluster_bits;
        self.out.close_region()?;
        if let Some(table) = self.mapping.take_last() {
            self.append_l2(table)?;
        }
        if let Some(cluster) = self.mapping.take_l1() {
            self.write_l1_cluster(cluster)?;
        }
        self.write_final_refcount_blocks()?;

        // The remaining refcount blocks, then the table, sized to count
        // themselves; their refcounts are set before any is encoded.
        let used = self.out.pos() >> bits;
        let layout = self
            .refcounts
            .finish_layout(used)
            .map_err(|why| WriterError::TooLarge { why })?;
        // `finish_layout` checked that this sum does not overflow.
        let end = used + layout.blocks + layout.table_clusters;
        if end > HOST_LIMIT >> bits {
            return Err(WriterError::TooLarge {
                why: "refcount structures beyond 64 PiB",
            });
        }
        for c in used..end {
            self.set_refcount_one(c << bits)?;
        }
        for _ in 0..layout.blocks {
            let offset = self.out.pos();
            let mut cluster = std::mem::take(&mut self.scratch);
            cluster.clear();
            self.refcounts.encode_next_block(&mut cluster);
            let appended = self.out.append_cluster(&cluster, Stage::Metadata);
            self.scratch = cluster;
            appended?;
            self.refcounts
                .next_block_placed(offset)
                .map_err(|e| refcount_error(e, bits))?;
        }
        let table_offset = self.out.pos();
        let cluster_size = usize_of(self.cluster_size())?;
        let mut cluster = Vec::with_capacity(cluster_size);
        for chunk in self.refcounts.table().chunks(cluster_size / 8) {
            cluster.clear();
            table::encode_into(chunk.iter().copied(), &mut cluster);
            cluster.resize(cluster_size, 0);
            self.out.append_cluster(&cluster, Stage::Metadata)?;
        }
        self.out.flush(Stage::Metadata)?;

        let l1_offset = if self.l1_size == 0 {
            // An image without an L1 table (virtual size 0) records offset 0.
            0
        } else {
            self.cluster_size()
        };
        let mut header = header_cluster::header_cluster(
            &self.opts,
            self.l1_size,
            l1_offset,
            table_offset,
            layout.table_clusters,
        )?;
        header[..4].fill(0);
        self.out.write_header(&header)
    }

    /// Writes the magic into an image [`Self::finish_unsealed`] completed.
    pub fn seal(storage: &dyn Storage) -> Result<(), WriterError> {
        storage
            .write_at(&MAGIC.to_be_bytes(), HostOffset(0))
            .map_err(|source| WriterError::WriteHeader { source })
    }

    fn cluster_size(&self) -> u64 {
        1 << self.opts.cluster_bits
    }

    fn set_refcount_one(&mut self, offset: u64) -> Result<(), WriterError> {
        let bits = self.opts.cluster_bits;
        self.refcounts
            .set_one(offset >> bits)
            .map_err(|e| refcount_error(e, bits))
    }

    /// Appends a metadata cluster (refcount 1) encoded into `scratch`.
    fn append_scratch(&mut self) -> Result<u64, WriterError> {
        let offset = self.out.pos();
        check_room(offset, self.cluster_size())?;
        self.set_refcount_one(offset)?;
        let cluster = std::mem::take(&mut self.scratch);
        let appended = self.out.append_cluster(&cluster, Stage::Metadata);
        self.scratch = cluster;
        appended.map(|()| offset)
    }

    /// Appends a final L2 table and records it in the L1 table.
    fn append_l2(&mut self, table: L2Table) -> Result<(), WriterError> {
        self.scratch.clear();
        table::encode_into(table.entries.iter().copied(), &mut self.scratch);
        let offset = self.append_scratch()?;
        if let Some(cluster) = self.mapping.l2_placed(table.l1_index, offset) {
            self.write_l1_cluster(cluster)?;
        }
        self.write_final_refcount_blocks()
    }

    /// Writes a final L1 cluster in place (the L1 table starts at cluster 1).
    fn write_l1_cluster(&mut self, cluster: mapping::L1Cluster) -> Result<(), WriterError> {
        let offset = (1 + cluster.number) << self.opts.cluster_bits;
        self.out.write_in_place(offset, &cluster.bytes)
    }

    /// Appends every refcount block whose clusters are all final.
    fn write_final_refcount_blocks(&mut self) -> Result<(), WriterError> {
        let bits = self.opts.cluster_bits;
        while self.refcounts.next_block_final(self.out.frontier()) {
            self.scratch.clear();
            self.refcounts.encode_next_block(&mut self.scratch);
            // The block lands beyond the clusters it counts.
            let offset = self.append_scratch()?;
            self.refcounts
                .next_block_placed(offset)
                .map_err(|e| refcount_error(e, bits))?;
        }
        Ok(())
    }
}

/// Encodes a compressed cluster descriptor (spec "Compressed Clusters
/// Descriptor") for a stream of `len` bytes at host byte `offset`.
fn compressed_descriptor(cluster_bits: u32, offset: u64, len: u64) -> Result<u64, WriterError> {
    l2::encode_compressed(HostOffset(offset), len, cluster_bits)
        .map_err(|why| WriterError::TooLarge { why })
}

/// Fails unless `len` bytes at `offset` stay below the 2^56 limit of host
/// offsets in table entries.
pub(super) fn check_room(offset: u64, len: u64) -> Result<(), WriterError> {
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
        RefcountError::TableFull => WriterError::TooLarge {
            why: "refcount table larger than QEMU's 8 MiB limit",
        },
        RefcountError::Written(cluster) => WriterError::RefcountWritten {
            offset: HostOffset(cluster << cluster_bits),
        },
    }
}

pub(super) fn usize_of(n: u64) -> Result<usize, WriterError> {
    usize::try_from(n).map_err(|_| WriterError::TooLarge {
        why: "size exceeds the address space",
    })
}

#[cfg(test)]
mod qemu_tests;
#[cfg(test)]
mod tests;
