//! The bitmap-clearing target: every persistent dirty bitmap of a fuzzed
//! image is cleared on writable in-memory storage (prepare, then commit),
//! and the image is opened again from the bytes it was left with.
//!
//! Asserts, beyond no panic: a clearing that succeeded leaves an image
//! that opens, whose bitmap reads all clean and can be cleared again
//! without freeing anything (its data clusters were freed once); a
//! clearing that was refused wrote nothing.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use qbackup_formats::image::{open_storage, Format};
use qbackup_formats::layer::Layer;
use qbackup_formats::storage::Storage;
use qbackup_formats::units::{GuestOffset, HostOffset};

use crate::MemOpener;

/// Bytes in memory that can be written (never grown past 64 MiB).
#[derive(Debug)]
struct MemRw {
    name: PathBuf,
    data: Mutex<Vec<u8>>,
}

impl Storage for MemRw {
    fn name(&self) -> &Path {
        &self.name
    }

    fn len(&self) -> u64 {
        self.data.lock().expect("lock").len() as u64
    }

    fn read_at(&self, buf: &mut [u8], offset: HostOffset) -> io::Result<usize> {
        let data = self.data.lock().expect("lock");
        let Some(src) = usize::try_from(offset.0).ok().and_then(|s| data.get(s..)) else {
            return Ok(0);
        };
        let n = src.len().min(buf.len());
        buf[..n].copy_from_slice(&src[..n]);
        Ok(n)
    }

    fn writable(&self) -> bool {
        true
    }

    fn write_at(&self, buf: &[u8], offset: HostOffset) -> io::Result<()> {
        let mut data = self.data.lock().expect("lock");
        let end = offset
            .0
            .checked_add(buf.len() as u64)
            .filter(|&e| e <= 64 << 20)
            .ok_or_else(|| io::Error::from_raw_os_error(libc::ENOSPC))? as usize;
        if data.len() < end {
            data.resize(end, 0);
        }
        data[offset.0 as usize..end].copy_from_slice(buf);
        Ok(())
    }

    fn sync(&self) -> io::Result<()> {
        Ok(())
    }
}

fn open(bytes: Vec<u8>) -> Option<(Arc<MemRw>, Box<dyn Layer>)> {
    open_why(bytes).ok()
}

fn open_why(bytes: Vec<u8>) -> Result<(Arc<MemRw>, Box<dyn Layer>), String> {
    let opener = MemOpener {
        data: Arc::from(bytes.as_slice()),
    };
    let storage = Arc::new(MemRw {
        name: PathBuf::from("fuzz.qcow2"),
        data: Mutex::new(bytes),
    });
    let layer =
        open_storage(&opener, storage.clone(), Some(Format::Qcow2)).map_err(|e| e.to_string())?;
    Ok((storage, layer))
}

/// See the module docs.
pub fn exercise_bitmap_clear(data: &[u8]) {
    let Some((storage, layer)) = open(data.to_vec()) else {
        return;
    };
    let Ok(info) = layer.info() else { return };
    let names: Vec<String> = info
        .qcow2
        .map(|q| q.bitmaps.into_iter().map(|b| b.name).collect())
        .unwrap_or_default();
    for name in names.iter().take(4) {
        let before = storage.data.lock().expect("lock").clone();
        let Ok(clear) = layer.prepare_bitmap_clear(name) else {
            assert!(
                *storage.data.lock().expect("lock") == before,
                "a refused clearing wrote something"
            );
            continue;
        };
        if clear.commit().is_err() {
            continue;
        }
        let after = storage.data.lock().expect("lock").clone();
        let (_, again) = open_why(after)
            .unwrap_or_else(|e| panic!("an image whose bitmap was cleared opens again: {e}"));
        let map = again
            .dirty_bitmap(name, true)
            .expect("the cleared bitmap loads");
        let vs = again.virtual_size();
        if vs > 0 {
            let (dirty, n) = map.dirty(GuestOffset(0), vs).expect("query");
            assert!(!dirty && n == vs, "a cleared bitmap reads all clean");
        }
        let freed = again
            .prepare_bitmap_clear(name)
            .expect("a cleared bitmap can be cleared again")
            .commit()
            .expect("clearing again");
        assert_eq!(freed, 0, "its data clusters were freed the first time");
    }
}
