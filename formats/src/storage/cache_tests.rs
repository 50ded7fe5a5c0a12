//! Tests of [`super`]: residency bookkeeping, and real files read and
//! written through the wrapper, measured with `mincore`.

use std::fs::File;
use std::io::Write;

use super::*;
use crate::storage::FileStorage;

/// Pages of `path` in `[offset, offset + len)` that are resident.
fn resident_pages(path: &Path, offset: u64, len: u64) -> usize {
    let f = File::open(path).unwrap();
    let page = page_size();
    let pages = len.div_ceil(page) as usize;
    let fd = std::os::fd::AsFd::as_fd(&f);
    let v = mincore(fd, offset, pages * page as usize, pages).expect("mincore");
    v.iter().filter(|b| *b & 1 != 0).count()
}

fn evict(path: &Path) {
    let f = File::open(path).unwrap();
    fadvise(
        std::os::fd::AsFd::as_fd(&f),
        0,
        0,
        libc::POSIX_FADV_DONTNEED,
    )
    .unwrap();
}

fn file_of(len: usize) -> (tempfile::TempDir, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("f");
    let mut f = File::create(&p).unwrap();
    let data: Vec<u8> = (0..len).map(|i| (i * 7 + i / 4096) as u8).collect();
    f.write_all(&data).unwrap();
    f.sync_all().unwrap();
    drop(f);
    evict(&p);
    (dir, p)
}

#[test]
fn busy_pages_are_cut_out_of_runs() {
    let runs = vec![(0, 10), (20, 5)];
    assert_eq!(
        without(runs.clone(), [(3, 5)].into_iter()),
        vec![(0, 3), (5, 5), (20, 5)]
    );
    assert_eq!(without(runs.clone(), [(0, 30)].into_iter()), vec![]);
    assert_eq!(
        without(runs, [(8, 22), (40, 50)].into_iter()),
        vec![(0, 8), (22, 3)]
    );
}

#[test]
fn runs_skip_resident_pages_and_unrecorded_regions() {
    let page = 4096;
    let per_region = (REGION / page) as usize;
    let mut bits = vec![0u64; per_region.div_ceil(64)];
    bits[0] = 0b0110; // pages 1 and 2 were resident
    let mut map = HashMap::new();
    map.insert(0, Resident::Some(bits.into_boxed_slice()));
    map.insert(2, Resident::None);
    map.insert(3, Resident::Few(vec![1, 2].into_boxed_slice()));
    assert_eq!(cold_runs(&map, 0, 6, page), vec![(0, 1), (3, 3)]);
    let r3 = 3 * per_region as u64;
    assert_eq!(
        cold_runs(&map, r3, r3 + 6, page),
        vec![(r3, 1), (r3 + 3, 3)]
    );
    // Region 1 was never looked at: nothing of it is dropped.
    let r1 = per_region as u64;
    assert_eq!(cold_runs(&map, r1, r1 + 4, page), vec![]);
    let r2 = 2 * r1;
    assert_eq!(cold_runs(&map, r2 - 1, r2 + 2, page), vec![(r2, 2)]);
}

/// What a read brings in is gone when it returns (pages past it may
/// be readahead's, for the next read); what was cached before stays,
/// and the bytes read are right either way.
#[test]
fn reads_leave_the_cache_as_found() {
    let len = 8 << 20;
    let (_dir, p) = file_of(len);
    if resident_pages(&p, 0, len as u64) != 0 {
        eprintln!("skipped: the temporary directory's file system keeps every page (tmpfs)");
        return;
    }
    // Someone else caches the second MiB (without readahead, so that
    // nothing else is cached).
    let mut warm = vec![0u8; 1 << 20];
    let other = File::open(&p).unwrap();
    fadvise(
        std::os::fd::AsFd::as_fd(&other),
        0,
        0,
        libc::POSIX_FADV_RANDOM,
    )
    .unwrap();
    std::os::unix::fs::FileExt::read_exact_at(&other, &mut warm, 1 << 20).unwrap();
    let warm_pages = resident_pages(&p, 1 << 20, 1 << 20);
    assert_eq!(warm_pages, (1 << 20) / page_size() as usize);
    let records = Records::default();
    let storage =
        CacheDropping::reading(Arc::new(FileStorage::open_read_only(&p).unwrap()), &records);
    let mut buf = vec![0u8; 3 << 20];
    let n = storage.read_at(&mut buf, HostOffset(0)).unwrap();
    assert_eq!(n, buf.len());
    assert_eq!(&buf[1 << 20..2 << 20], &warm[..]);
    assert_eq!(buf[5], 35);
    // An unaligned read in the middle of a page.
    let mut small = [0u8; 100];
    storage.read_at(&mut small, HostOffset(5000)).unwrap();
    assert_eq!(resident_pages(&p, 0, 3 << 20), warm_pages);
    assert_eq!(resident_pages(&p, 1 << 20, 1 << 20), warm_pages);
    // Keep: the same read leaves its pages cached.
    let kept = FileStorage::open_read_only(&p).unwrap();
    kept.read_at(&mut buf, HostOffset(4 << 20)).unwrap();
    assert!(resident_pages(&p, 4 << 20, 3 << 20) > 0);
}

#[test]
fn a_target_is_dropped_after_each_sync() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("t");
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&p)
        .unwrap();
    let storage = CacheDropping::written(Arc::new(FileStorage::writable(f, &p).unwrap()));
    storage
        .write_at(&vec![0xa5; 4 << 20], HostOffset(0))
        .unwrap();
    assert!(
        resident_pages(&p, 0, 4 << 20) > 0,
        "written pages are cached"
    );
    storage.sync().unwrap();
    assert_eq!(resident_pages(&p, 0, 4 << 20), 0);
    let mut back = vec![0u8; 4096];
    std::os::unix::fs::FileExt::read_exact_at(&File::open(&p).unwrap(), &mut back, 4 << 19)
        .unwrap();
    assert!(back.iter().all(|b| *b == 0xa5));
}
