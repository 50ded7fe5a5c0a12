//! Page-cache hygiene: what a backup, verify or compare reads and writes
//! goes through the kernel's page cache, and on a hypervisor every page it
//! leaves there evicts one the VMs' host had cached. [`CachePolicy::Drop`]
//! puts a [`CacheDropping`] wrapper under each local file
//! ([`crate::open::CacheOpener`]) that leaves the cache as it found it:
//!
//! - A file that is read (a source, an image verified or compared): the
//!   first time a read touches a [`REGION`], which of its pages, and of the
//!   next region's, are resident is recorded (`mincore` over a `PROT_READ`
//!   mapping: nothing is faulted in), before any of our reads can bring one
//!   in. The kernel's readahead stays on (it keeps the disk busy while the
//!   codec works) and runs ahead of our reads by a readahead window, far
//!   less than a region: so the pages it brings in were recorded as not
//!   resident. After each read, the pages from the [`FOLIO`] boundary
//!   before it to its end that were not resident then are dropped
//!   (`POSIX_FADV_DONTNEED`); the others, cached by someone else before we
//!   looked, stay. Pages ahead of a read (readahead's) are left for the
//!   read that takes them; when the storage is closed, every page not
//!   resident before is dropped (readahead past our last reads). So what a
//!   read adds is gone soon after it returns, and the last of several
//!   overlapping reads drops after it finishes.
//! - A target: its clean pages are dropped after each successful sync (the
//!   early syncs every 64 MiB and the final ones) and each writeback hint
//!   (every 32 MiB). Only clean pages can be: `DONTNEED` never discards a
//!   dirty page, and a clean page is on disk (memory pressure could evict
//!   it as well; the syncs that make the backup durable do not depend on
//!   it staying cached).
//!
//! Invariants: these are hints. A failed `mmap`, `mincore` or `fadvise`
//! never fails the I/O; it leaves pages cached, as [`CachePolicy::Keep`]
//! does. Residency unknown counts as resident, so we never evict what we
//! did not bring in; in particular Linux (since 5.0) answers `mincore` with
//! "resident" for files the process could not write, so for such a file
//! nothing is dropped. Memory: nothing for a region none of whose pages was
//! resident, 4 bytes per resident page for one that had a few, 1 bit per
//! page (2 KiB) for one that had many: at most 1/32768 of what was cached.

use std::collections::HashMap;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::path::Path;
use std::sync::{Arc, Mutex};

use super::{ChangeStamp, FileExtent, Identity, Storage};
use crate::units::HostOffset;

/// What a command does with the page cache it fills.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum CachePolicy {
    /// Leave the cache as it was found: drop what our reads brought in
    /// and what our writes left once it is durable (see the module docs).
    #[default]
    Drop,
    /// Use the page cache as any program does (readahead on, nothing
    /// dropped): what was read or written stays cached.
    Keep,
}

/// The span whose residency is recorded at once (64 MiB).
pub const REGION: u64 = 64 << 20;

/// The largest page-cache folio readahead makes (2 MiB on x86-64). A
/// `DONTNEED` skips a folio that straddles its range, so a drop after a
/// read starts at such a boundary (dropping only pages that were not
/// resident: never someone else's).
const FOLIO: u64 = 2 << 20;

/// A storage whose page-cache footprint is dropped as it goes (see the
/// module docs).
#[derive(Debug)]
pub struct CacheDropping {
    inner: Arc<dyn Storage>,
    page: u64,
    mode: Mode,
}

#[derive(Debug)]
enum Mode {
    /// Read: which pages were resident before our reads.
    Read(Arc<Residency>),
    /// Written: dropped after each sync.
    Written,
}

/// Which pages of a file were resident before our reads, by region, and
/// the reads running now. One per file, shared by every storage that reads
/// it ([`Records`]): what one storage's reads bring in must not look cached
/// to another's, nor be dropped under another's running read.
#[derive(Debug, Default)]
pub struct Residency(Mutex<State>);

#[derive(Debug, Default)]
struct State {
    regions: HashMap<u64, Resident>,
    /// Byte ranges being read.
    active: Vec<(u64, u64)>,
}

impl Residency {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // No critical section below can panic.
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The [`Residency`] of each file, by identity, for the storages opened by
/// one opener.
#[derive(Debug, Default)]
pub struct Records(Mutex<HashMap<Identity, Arc<Residency>>>);

impl Records {
    /// The record of the file behind `storage` (a new one for storage
    /// without an identity).
    pub fn of(&self, storage: &dyn Storage) -> Arc<Residency> {
        let Some(id) = storage.identity() else {
            return Arc::default();
        };
        let mut map = self.0.lock().unwrap_or_else(|e| e.into_inner());
        Arc::clone(map.entry(id).or_default())
    }
}

/// A region's pages that were resident when it was first touched.
#[derive(Debug)]
enum Resident {
    /// None of them.
    None,
    /// A few: their indexes in the region, sorted (4 bytes each, so a
    /// VM's cache scattered over a large image costs little).
    Few(Box<[u32]>),
    /// Many: one bit per page, set when resident (2 KiB).
    Some(Box<[u64]>),
}

impl Resident {
    /// Whether page `i` of the region was resident.
    fn has(&self, i: usize) -> bool {
        match self {
            Resident::None => false,
            Resident::Few(pages) => pages.binary_search(&(i as u32)).is_ok(),
            Resident::Some(bits) => bits[i / 64] & (1 << (i % 64)) != 0,
        }
    }
}

impl CacheDropping {
    /// Wraps a storage that is read (a source, an image to verify).
    /// `records` holds what is known of the files read so far. Storage
    /// without a page cache (no [`Storage::cache_fd`]) is returned as it is.
    pub fn reading(inner: Arc<dyn Storage>, records: &Records) -> Arc<dyn Storage> {
        if inner.cache_fd().is_none() {
            return inner;
        }
        let record = records.of(inner.as_ref());
        Arc::new(CacheDropping {
            inner,
            page: page_size(),
            mode: Mode::Read(record),
        })
    }

    /// Wraps a target being written: its pages are dropped after each
    /// successful sync.
    pub fn written(inner: Arc<dyn Storage>) -> Arc<dyn Storage> {
        if inner.cache_fd().is_none() {
            return inner;
        }
        Arc::new(CacheDropping {
            inner,
            page: page_size(),
            mode: Mode::Written,
        })
    }

    /// Records the residency of every region `[offset, end)` touches, and
    /// of the region after them, that has none recorded yet: the kernel's
    /// readahead may run ahead of our reads (see the module docs), never by
    /// a region.
    /// The read is then registered as running, until [`Self::drop_read`].
    fn look_before(&self, regions: &Residency, offset: u64, end: u64) {
        let mut state = regions.lock();
        state.active.push((offset, end));
        let Some(fd) = self.inner.cache_fd() else {
            return;
        };
        for region in offset / REGION..=end.div_ceil(REGION) {
            state
                .regions
                .entry(region)
                .or_insert_with(|| resident(fd, region * REGION, self.page));
        }
    }

    /// Drops the pages from the [`FOLIO`] boundary before `offset` to `end`
    /// that were not resident when their region was first touched. Not
    /// further: the pages after `end` may be readahead's, for the next
    /// read; a folio across `end` goes with a later read or on close.
    /// The read is no longer running; pages of other running reads stay.
    fn drop_read(&self, regions: &Residency, offset: u64, end: u64) {
        {
            let mut state = regions.lock();
            if let Some(i) = state.active.iter().position(|r| *r == (offset, end)) {
                state.active.swap_remove(i);
            }
        }
        let start = offset / FOLIO * FOLIO;
        self.drop_cold(regions, start, end);
    }

    /// Drops the pages of `[offset, end)` that were not resident when
    /// their region was first touched, except those of running reads.
    fn drop_cold(&self, regions: &Residency, offset: u64, end: u64) {
        let Some(fd) = self.inner.cache_fd() else {
            return;
        };
        let runs = {
            let state = regions.lock();
            let runs = cold_runs(
                &state.regions,
                offset / self.page,
                end.div_ceil(self.page),
                self.page,
            );
            let busy = state
                .active
                .iter()
                .map(|(s, e)| (s / self.page, e.div_ceil(self.page)));
            without(runs, busy)
        };
        for (first, count) in runs {
            let _ = fadvise(
                fd,
                first * self.page,
                count * self.page,
                libc::POSIX_FADV_DONTNEED,
            );
        }
    }
}

/// `runs` (first page, pages) without the pages of `busy` (first page,
/// end page).
fn without(mut runs: Vec<(u64, u64)>, busy: impl Iterator<Item = (u64, u64)>) -> Vec<(u64, u64)> {
    for (b0, b1) in busy {
        runs = runs
            .into_iter()
            .flat_map(|(s, n)| {
                let e = s + n;
                let before = (s, b0.clamp(s, e) - s);
                let after = (b1.clamp(s, e), e - b1.clamp(s, e));
                [before, after].into_iter().filter(|r| r.1 > 0)
            })
            .collect();
    }
    runs
}

/// Runs `(first page, pages)` of pages in `first..end` that were not
/// resident (a region with nothing recorded counts as resident).
fn cold_runs(map: &HashMap<u64, Resident>, first: u64, end: u64, page: u64) -> Vec<(u64, u64)> {
    let per_region = REGION / page;
    let mut runs: Vec<(u64, u64)> = Vec::new();
    let mut push = |p: u64, n: u64| match runs.last_mut() {
        Some((start, len)) if *start + *len == p => *len += n,
        _ => runs.push((p, n)),
    };
    let mut p = first;
    while p < end {
        let region = p / per_region;
        let stop = end.min((region + 1) * per_region);
        match map.get(&region) {
            Some(Resident::None) => push(p, stop - p),
            Some(resident) => {
                for q in p..stop {
                    if !resident.has((q % per_region) as usize) {
                        push(q, 1);
                    }
                }
            }
            None => {}
        }
        p = stop;
    }
    runs
}

/// Which pages of the region at `offset` are resident; all of them when
/// that cannot be told.
fn resident(fd: BorrowedFd<'_>, offset: u64, page: u64) -> Resident {
    let pages = (REGION / page) as usize;
    let all = || Resident::Some(vec![u64::MAX; pages.div_ceil(64)].into_boxed_slice());
    let Some(vec) = mincore(fd, offset, REGION as usize, pages) else {
        return all();
    };
    let count = vec.iter().filter(|v| *v & 1 != 0).count();
    if count == 0 {
        return Resident::None;
    }
    if count * 32 < pages {
        let few = (0..pages).filter(|i| vec[*i] & 1 != 0).map(|i| i as u32);
        return Resident::Few(few.collect());
    }
    let mut bits = vec![0u64; pages.div_ceil(64)];
    for (i, v) in vec.iter().enumerate() {
        if v & 1 != 0 {
            bits[i / 64] |= 1 << (i % 64);
        }
    }
    Resident::Some(bits.into_boxed_slice())
}

/// `mincore` over a read-only shared mapping of `len` bytes at `offset`:
/// one byte per page, bit 0 set when the page is in the page cache.
fn mincore(fd: BorrowedFd<'_>, offset: u64, len: usize, pages: usize) -> Option<Vec<u8>> {
    let mut vec = vec![0u8; pages];
    // SAFETY: a fresh read-only mapping that this function alone uses and
    // unmaps before returning; mincore writes one byte per page of it into
    // `vec`, which has `pages` = len / page size bytes. The mapping is never
    // dereferenced, so a file shorter than the mapping cannot fault.
    unsafe {
        let addr = libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ,
            libc::MAP_SHARED,
            fd.as_raw_fd(),
            libc::off_t::try_from(offset).ok()?,
        );
        if addr == libc::MAP_FAILED {
            return None;
        }
        let rc = libc::mincore(addr, len, vec.as_mut_ptr());
        libc::munmap(addr, len);
        (rc == 0).then_some(vec)
    }
}

/// Drops the clean cached pages of `storage`'s file (a hint: dirty pages
/// stay, and nothing happens to storage without a page cache). For pages
/// only we can have cached: a new file we wrote and synced, or read back.
pub fn drop_clean(storage: &dyn Storage) {
    if let Some(fd) = storage.cache_fd() {
        let _ = fadvise(fd, 0, 0, libc::POSIX_FADV_DONTNEED);
    }
}

fn fadvise(fd: BorrowedFd<'_>, offset: u64, len: u64, advice: libc::c_int) -> io::Result<()> {
    let (Ok(offset), Ok(len)) = (libc::off_t::try_from(offset), libc::off_t::try_from(len)) else {
        return Err(io::ErrorKind::InvalidInput.into());
    };
    // SAFETY: a plain syscall on a descriptor the caller borrows; no memory
    // is passed.
    match unsafe { libc::posix_fadvise(fd.as_raw_fd(), offset, len, advice) } {
        0 => Ok(()),
        e => Err(io::Error::from_raw_os_error(e)),
    }
}

fn page_size() -> u64 {
    // SAFETY: sysconf only reads a constant of the system.
    match unsafe { libc::sysconf(libc::_SC_PAGESIZE) } {
        n if n > 0 => n as u64,
        _ => 4096,
    }
}

impl Drop for CacheDropping {
    /// Drops what is left of ours in every region read: pages readahead
    /// brought in past our last reads.
    fn drop(&mut self) {
        if let Mode::Read(regions) = &self.mode {
            let mut touched: Vec<u64> = regions.lock().regions.keys().copied().collect();
            touched.sort_unstable();
            for region in touched {
                self.drop_cold(regions, region * REGION, (region + 1) * REGION);
            }
        }
    }
}

impl Storage for CacheDropping {
    fn name(&self) -> &Path {
        self.inner.name()
    }

    fn len(&self) -> u64 {
        self.inner.len()
    }

    fn read_at(&self, buf: &mut [u8], offset: HostOffset) -> io::Result<usize> {
        let Mode::Read(regions) = &self.mode else {
            return self.inner.read_at(buf, offset);
        };
        if buf.is_empty() {
            return self.inner.read_at(buf, offset);
        }
        let end = offset.0.saturating_add(buf.len() as u64);
        self.look_before(regions, offset.0, end);
        let result = self.inner.read_at(buf, offset);
        // Also after a failure: the pages read before it are cached.
        self.drop_read(regions, offset.0, end);
        result
    }

    fn data_or_hole(&self, offset: HostOffset, max_len: u64) -> io::Result<(FileExtent, u64)> {
        self.inner.data_or_hole(offset, max_len)
    }

    fn writable(&self) -> bool {
        self.inner.writable()
    }

    fn write_at(&self, buf: &[u8], offset: HostOffset) -> io::Result<()> {
        self.inner.write_at(buf, offset)
    }

    fn write_zeroes(&self, offset: HostOffset, len: u64) -> io::Result<()> {
        self.inner.write_zeroes(offset, len)
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        self.inner.set_len(len)
    }

    fn sync(&self) -> io::Result<()> {
        self.inner.sync()?;
        if let Mode::Written = self.mode {
            // Durable now, so clean: dropping them loses nothing. Pages
            // written since the sync began are dirty and stay.
            drop_clean(self.inner.as_ref());
        }
        Ok(())
    }

    fn start_writeback(&self) {
        self.inner.start_writeback();
        if let Mode::Written = self.mode {
            // Pages whose writeback finished since the last call are clean
            // (on disk, as after memory pressure evicted them; the final
            // sync still makes them durable): dropping them bounds the
            // target's share between syncs.
            drop_clean(self.inner.as_ref());
        }
    }

    fn context_status(
        &self,
        context: &str,
        offset: HostOffset,
        max_len: u64,
    ) -> io::Result<(u32, u64)> {
        self.inner.context_status(context, offset, max_len)
    }

    fn identity(&self) -> Option<Identity> {
        self.inner.identity()
    }

    fn allocated_size(&self) -> io::Result<Option<u64>> {
        self.inner.allocated_size()
    }

    fn change_stamp(&self) -> Option<ChangeStamp> {
        self.inner.change_stamp()
    }

    fn cache_fd(&self) -> Option<BorrowedFd<'_>> {
        self.inner.cache_fd()
    }
}

#[cfg(test)]
#[path = "cache_tests.rs"]
mod tests;
