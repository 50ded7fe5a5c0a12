//! What the fuzz targets share: an [`Opener`] that serves nothing but the
//! fuzz input's bytes (as the library's in-memory [`MemoryStorage`]), and
//! the walk over an opened image ([`exercise_image`]) that reaches every
//! parser behind the `Layer` seam.
//!
//! Invariants every target asserts (beyond libFuzzer's own: no panic, no
//! hang, no allocation above `-malloc_limit_mb`): errors come back as
//! values, and every answer keeps the `Layer` contract (a status or read
//! covers > 0 bytes and never more than asked).

use std::io;
use std::path::Path;
use std::sync::Arc;

use qbackup_formats::extent::Allocation;
use qbackup_formats::image::{open_storage, Format};
use qbackup_formats::layer::{Layer, LayerRead};
use qbackup_formats::open::{Opener, Role};
use qbackup_formats::storage::memory::MemoryStorage;
use qbackup_formats::storage::{Storage, StorageError};
use qbackup_formats::units::GuestOffset;

/// Serves an external data file from the image's own bytes (so data-file
/// images are walked too) and refuses every other name: a fuzzed image
/// must never make the harness touch the file system.
#[derive(Debug)]
pub struct MemOpener {
    pub(crate) data: Arc<[u8]>,
}

impl Opener for MemOpener {
    fn open(&self, name: &Path, role: Role) -> Result<Arc<dyn Storage>, StorageError> {
        match role {
            Role::DataFile => Ok(Arc::new(MemoryStorage::read_only(name, &self.data[..]))),
            _ => Err(StorageError::Open {
                source: io::Error::new(io::ErrorKind::NotFound, "fuzzing: no other files"),
            }),
        }
    }
}

/// Status calls per walk; bounds a run whatever the virtual size.
const MAX_STATUS_CALLS: usize = 2048;
/// Reads per image and the most bytes one read asks for.
const MAX_READS: usize = 8;
const MAX_READ_LEN: u64 = 64 * 1024;
/// Dirty-bitmap queries per bitmap.
const MAX_DIRTY_CALLS: usize = 512;

/// Opens `data` as a qcow2 image and, if that succeeds, asks it everything
/// a backup asks: info, block status over the whole disk (bounded), reads
/// of the first extents of each kind (decoding compressed clusters), the
/// stored stream of compressed clusters, every persistent dirty bitmap,
/// and a bitmap clearing (which must be refused: the storage is
/// read-only).
pub fn exercise_image(data: &[u8]) {
    let data: Arc<[u8]> = Arc::from(data);
    let opener = MemOpener {
        data: Arc::clone(&data),
    };
    let storage = Arc::new(MemoryStorage::read_only("fuzz.qcow2", &data[..]));
    let Ok(layer) = open_storage(&opener, storage, Some(Format::Qcow2)) else {
        return;
    };
    let info = layer.info();
    let _ = layer.backing();
    let _ = layer.compressed_format();
    if layer.check_readable().is_ok() {
        walk(layer.as_ref());
    }
    let Ok(info) = info else { return };
    for b in info.qcow2.map(|q| q.bitmaps).unwrap_or_default() {
        if let Ok(map) = layer.dirty_bitmap(&b.name, true) {
            let vs = layer.virtual_size();
            let mut off = 0;
            for _ in 0..MAX_DIRTY_CALLS {
                if off >= vs {
                    break;
                }
                let Ok((_, n)) = map.dirty(GuestOffset(off), vs - off) else {
                    break;
                };
                assert!(n > 0 && n <= vs - off, "dirty() answered {n} bytes");
                off += n;
            }
        }
        assert!(
            layer.prepare_bitmap_clear(&b.name).is_err(),
            "clearing a bitmap on read-only storage was accepted"
        );
    }
}

/// Block status over the disk, then reads of the first extent of each kind.
fn walk(layer: &dyn Layer) {
    let vs = layer.virtual_size();
    let mut off = 0;
    let mut to_read: Vec<(u64, Allocation)> = Vec::new();
    for _ in 0..MAX_STATUS_CALLS {
        if off >= vs {
            break;
        }
        let Ok((ext, n)) = layer.status(GuestOffset(off), vs - off) else {
            break;
        };
        assert!(n > 0 && n <= vs - off, "status() answered {n} bytes");
        if to_read.len() < MAX_READS && !to_read.iter().any(|(_, a)| *a == ext.allocation) {
            to_read.push((off, ext.allocation));
        }
        if ext.allocation == Allocation::Compressed {
            let _ = layer.stored_compressed(GuestOffset(off));
        }
        off += n;
    }
    if vs > 0 {
        to_read.push((vs - 1, Allocation::Unallocated));
    }
    for (start, _) in to_read {
        let len = (vs - start).min(MAX_READ_LEN) as usize;
        let mut buf = vec![0u8; len];
        let mut done = 0;
        while done < len {
            match layer.read(GuestOffset(start + done as u64), &mut buf[done..]) {
                Ok(LayerRead::Filled(n)) | Ok(LayerRead::Unallocated(n)) => {
                    assert!(n > 0 && n as usize <= len - done, "read() answered {n}");
                    done += n as usize;
                }
                Err(_) => break,
            }
        }
    }
}

mod clear;
mod nbd;
pub use clear::exercise_bitmap_clear;
pub use nbd::exercise_client;
