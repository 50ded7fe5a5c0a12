//! Host space of the streaming writer: allocation at the end of the file,
//! packing of compressed streams, and the write buffer.
//!
//! Clusters are appended at `alloc_end`, which only grows. Compressed
//! streams are packed byte by byte into an open "compressed region": a
//! stream that does not fit the rest of the region continues into the next
//! host cluster when the region ends where free space begins, and
//! otherwise starts a new region. A normal (or metadata) cluster never
//! forces padding: later streams keep filling the open region before it.
//!
//! Bytes are collected in a buffer of about [`BUFFER_BYTES`] and written
//! with one positioned write. A flush keeps the open compressed cluster
//! (and what follows it) in the buffer, since later streams may still fill
//! it; when that tail grows large (tables and normal clusters appended
//! after the open cluster, as on a sparse disk where each tiny stream is
//! followed by an L2 table), the open cluster is *detached*: its bytes move
//! to a buffer of their own, the rest is written, and later streams keep
//! filling it. It is written when its region ends (a stream goes
//! elsewhere, or the region is closed), or when the file has grown
//! [`DETACHED_REACH`] past it (the refcount blocks after it cannot be
//! final while it is open, so this bounds them).
//!
//! Invariants: `buf_start <= alloc_end`, both cluster aligned after a flush;
//! the open region's cursor is in the detached cluster or not below
//! `buf_start`'s cluster; a stream placed in a detached cluster fits in it
//! (a region grows only where free space begins); after a failed write
//! every later write fails ([`WriterError::Poisoned`]).

use std::sync::Arc;

use crate::storage::Storage;
use crate::units::HostOffset;

use super::{check_room, usize_of, WriterError};

/// Appended bytes are collected up to this size before one positioned write.
pub(super) const BUFFER_BYTES: usize = 4 << 20;

/// How far the file may grow past a detached compressed cluster before it
/// is written and its region closed.
const DETACHED_REACH: u64 = 64 << 20;

/// Which kind of bytes a write carries, for error reports.
#[derive(Clone, Copy)]
pub(super) enum Stage {
    Data,
    Metadata,
}

/// See the module docs.
pub(super) struct Appender {
    storage: Arc<dyn Storage>,
    cluster_bits: u32,
    /// Bytes not yet written, which belong at `buf_start`.
    buf: Vec<u8>,
    buf_start: u64,
    /// First host byte not yet allocated; always cluster aligned.
    alloc_end: u64,
    /// The open compressed region: where the next stream may go, and the
    /// (cluster-aligned) end of the clusters reserved for streams.
    compressed: Option<(u64, u64)>,
    /// The open compressed cluster when it was detached from `buf`: its
    /// offset and bytes.
    detached: Option<(u64, Vec<u8>)>,
    poisoned: bool,
}

impl Appender {
    /// Appends from host byte `start` (cluster aligned) on.
    pub fn new(
        storage: Arc<dyn Storage>,
        cluster_bits: u32,
        start: u64,
    ) -> Result<Self, WriterError> {
        Ok(Appender {
            storage,
            cluster_bits,
            buf: Vec::with_capacity(BUFFER_BYTES + usize_of(1 << cluster_bits)?),
            buf_start: start,
            alloc_end: start,
            compressed: None,
            detached: None,
            poisoned: false,
        })
    }

    fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    /// The host offset the next appended cluster gets.
    pub fn pos(&self) -> u64 {
        self.alloc_end
    }

    /// Whether an earlier write failed.
    pub fn poisoned(&self) -> bool {
        self.poisoned
    }

    /// The first host cluster whose refcount a later append may change:
    /// the cluster the open compressed region continues in, else the next
    /// free one.
    pub fn frontier(&self) -> u64 {
        let at = match self.compressed {
            Some((cursor, _)) => cursor.min(self.alloc_end),
            None => self.alloc_end,
        };
        at >> self.cluster_bits
    }

    /// Where a compressed stream of `len` bytes goes, and the end of the
    /// compressed region afterwards. Does not change any state.
    pub fn place_compressed(&self, len: u64) -> Result<(u64, u64), WriterError> {
        match self.compressed {
            Some((cursor, end)) if cursor + len <= end => Ok((cursor, end)),
            // The region ends where free space begins: grow it.
            Some((cursor, end)) if end == self.alloc_end => {
                Ok((cursor, self.align_up(cursor + len)?))
            }
            _ => Ok((self.alloc_end, self.align_up(self.alloc_end + len)?)),
        }
    }

    /// Writes a stream at `offset` as [`Appender::place_compressed`] chose,
    /// with `region_end` the end of the region afterwards.
    pub fn put_compressed(
        &mut self,
        offset: u64,
        region_end: u64,
        stream: &[u8],
    ) -> Result<(), WriterError> {
        // A stream outside the detached cluster starts a new region: the
        // detached one is final.
        if matches!(&self.detached, Some((at, _)) if offset >> self.cluster_bits != at >> self.cluster_bits)
        {
            self.write_detached()?;
        }
        // Record the region first: a flush inside `write_at` may close it,
        // and that decision must stick.
        self.compressed = Some((offset + stream.len() as u64, region_end));
        self.alloc_end = self.alloc_end.max(region_end);
        self.write_at(offset, stream, Stage::Data)
    }

    /// Appends one whole cluster at [`Appender::pos`].
    pub fn append_cluster(&mut self, cluster: &[u8], stage: Stage) -> Result<(), WriterError> {
        debug_assert_eq!(cluster.len() as u64, self.cluster_size());
        let offset = self.alloc_end;
        check_room(offset, cluster.len() as u64)?;
        self.write_at(offset, cluster, stage)?;
        self.alloc_end += self.cluster_size();
        Ok(())
    }

    /// Closes the open compressed region: later streams start a new one.
    pub fn close_region(&mut self) -> Result<(), WriterError> {
        self.compressed = None;
        self.write_detached()
    }

    /// Writes the detached compressed cluster, if any: it is final.
    fn write_detached(&mut self) -> Result<(), WriterError> {
        let Some((offset, bytes)) = self.detached.take() else {
            return Ok(());
        };
        if self.poisoned {
            return Err(WriterError::Poisoned);
        }
        self.storage
            .write_at(&bytes, HostOffset(offset))
            .map_err(|source| {
                self.poisoned = true;
                WriterError::WriteData {
                    offset: HostOffset(offset),
                    len: bytes.len(),
                    source,
                }
            })
    }

    /// Writes `bytes` at `offset`, below the appended area (the L1 table),
    /// directly.
    pub fn write_in_place(&mut self, offset: u64, bytes: &[u8]) -> Result<(), WriterError> {
        if self.poisoned {
            return Err(WriterError::Poisoned);
        }
        debug_assert!(offset + bytes.len() as u64 <= self.buf_start);
        self.storage
            .write_at(bytes, HostOffset(offset))
            .map_err(|source| {
                self.poisoned = true;
                WriterError::WriteMetadata {
                    offset: HostOffset(offset),
                    len: bytes.len(),
                    source,
                }
            })
    }

    /// The storage written to.
    pub fn storage(&self) -> Arc<dyn Storage> {
        Arc::clone(&self.storage)
    }

    /// Writes cluster 0, the header, last of all.
    pub fn write_header(&mut self, header: &[u8]) -> Result<(), WriterError> {
        if self.poisoned {
            return Err(WriterError::Poisoned);
        }
        self.storage
            .write_at(header, HostOffset(0))
            .map_err(|source| {
                self.poisoned = true;
                WriterError::WriteHeader { source }
            })
    }

    /// Places `bytes` at host `offset` (at or after the buffer's start),
    /// zero-filling any gap, and flushes when the buffer is full.
    fn write_at(&mut self, offset: u64, bytes: &[u8], stage: Stage) -> Result<(), WriterError> {
        check_room(offset, bytes.len() as u64)?;
        if let Some((start, cluster)) = &mut self.detached {
            if offset >= *start && offset < *start + cluster.len() as u64 {
                // It fits (see the invariants).
                let at = usize_of(offset - *start)?;
                cluster[at..at + bytes.len()].copy_from_slice(bytes);
                return Ok(());
            }
        }
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
            // An open cluster below `buf_start` is the detached one.
            Some((cursor, end)) if cursor < end && cursor & !mask >= self.buf_start => {
                cursor & !mask
            }
            _ => buf_end,
        };
        let max_tail = ((BUFFER_BYTES / 2) as u64).max(4 * self.cluster_size());
        let keep_from = if buf_end - keep_from > max_tail {
            // Detach the open cluster (it is whole in the buffer: the tail
            // holds more than four clusters); its stale bytes are written
            // below and overwritten when it is final.
            self.write_detached()?;
            let at = usize_of(keep_from - self.buf_start)?;
            let cluster = self.buf[at..at + usize_of(self.cluster_size())?].to_vec();
            self.detached = Some((keep_from, cluster));
            buf_end
        } else {
            keep_from
        };
        if matches!(&self.detached, Some((at, _)) if self.alloc_end - at > DETACHED_REACH) {
            self.compressed = None;
            self.write_detached()?;
        }
        let n = usize_of(keep_from - self.buf_start)?;
        self.write_out(n, stage)?;
        self.buf.drain(..n);
        self.buf_start = keep_from;
        Ok(())
    }

    /// Writes the whole buffer out, and the detached cluster; closes the
    /// compressed region (its bytes are no longer in the buffer).
    pub fn flush(&mut self, stage: Stage) -> Result<(), WriterError> {
        self.compressed = None;
        self.write_detached()?;
        let n = self.buf.len();
        self.write_out(n, stage)?;
        self.buf_start += n as u64;
        self.buf.clear();
        Ok(())
    }

    /// Writes the first `n` buffered bytes; poisons on failure.
    fn write_out(&mut self, n: usize, stage: Stage) -> Result<(), WriterError> {
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
}
