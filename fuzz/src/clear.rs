//! The bitmap-clearing target: every persistent dirty bitmap of a fuzzed
//! image is cleared on writable in-memory storage (prepare, then commit),
//! and the image is opened again from the bytes it was left with.
//!
//! Asserts, beyond no panic: a clearing that succeeded leaves an image
//! that opens, whose bitmap reads all clean and can be cleared again
//! without freeing anything (its data clusters were freed once); a
//! clearing that was refused wrote nothing.

use std::sync::Arc;

use qbackup_formats::image::{open_storage, Format};
use qbackup_formats::layer::Layer;
use qbackup_formats::storage::memory::MemoryStorage;
use qbackup_formats::units::GuestOffset;

use crate::MemOpener;

/// A fuzzed image never makes the harness hold more than this.
const MAX_LEN: u64 = 64 << 20;

fn open(bytes: Vec<u8>) -> Option<(Arc<MemoryStorage>, Box<dyn Layer>)> {
    open_why(bytes).ok()
}

fn open_why(bytes: Vec<u8>) -> Result<(Arc<MemoryStorage>, Box<dyn Layer>), String> {
    let opener = MemOpener {
        data: Arc::from(bytes.as_slice()),
    };
    let storage = Arc::new(MemoryStorage::writable("fuzz.qcow2", bytes).max_len(MAX_LEN));
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
        let before = storage.bytes();
        let Ok(clear) = layer.prepare_bitmap_clear(name) else {
            assert!(
                storage.bytes() == before,
                "a refused clearing wrote something"
            );
            continue;
        };
        if clear.commit().is_err() {
            continue;
        }
        let after = storage.bytes();
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
