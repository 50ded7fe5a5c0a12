//! Bytes in memory as a [`Storage`]: the one in-memory storage that unit
//! tests, the fuzz targets and the power-cut tests share, so that each of
//! them tests the code above the seam rather than its own copy of a buffer.
//!
//! Invariants:
//! - Reads behave like a file's: they stop at the end (0 past it), never
//!   pad with zeros; the bounds checks callers rely on stay in
//!   `dyn Storage`'s helpers.
//! - Read-only unless made [`MemoryStorage::writable`]; a writable one grows
//!   on a write past its end (the gap reads as zeros), up to an optional
//!   [`MemoryStorage::max_len`] beyond which writes fail with ENOSPC (a
//!   fuzzed image cannot make a test allocate without bound).
//! - An optional power cut ([`MemoryStorage::power_cut_after`]) models a
//!   disk that loses power between two writes: every write before the cut
//!   is kept whole (a test checks what is left with the bytes it can read
//!   back), the write at the cut is lost or torn, and everything after it
//!   fails, syncs included.
//! - It is part of the library (not `cfg(test)`) so that integration tests
//!   and the fuzz crate can use it.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::RwLock;

use super::{read_only, Storage};
use crate::units::HostOffset;

/// The write counter's value once power is lost.
const POWER_LOST: usize = usize::MAX;

/// A storage holding its bytes in memory. All calls take `&self`, as for
/// every storage, so it can be shared by threads behind an `Arc`.
#[derive(Debug)]
pub struct MemoryStorage {
    name: PathBuf,
    data: RwLock<Vec<u8>>,
    writable: bool,
    max_len: u64,
    power: Option<PowerCut>,
}

/// When the power goes: after `writes_left` complete writes.
#[derive(Debug)]
struct PowerCut {
    /// Writes that still complete; [`POWER_LOST`] once the power is gone.
    writes_left: AtomicUsize,
    /// Whether the write at the cut stores its first half (whole 512-byte
    /// sectors, as a disk tears) instead of nothing.
    torn: bool,
}

impl MemoryStorage {
    /// Read-only storage named `name` (for messages) holding `bytes`.
    pub fn read_only(name: impl Into<PathBuf>, bytes: impl Into<Vec<u8>>) -> MemoryStorage {
        MemoryStorage {
            name: name.into(),
            data: RwLock::new(bytes.into()),
            writable: false,
            max_len: u64::MAX,
            power: None,
        }
    }

    /// Writable storage named `name` starting with `bytes` (empty for a
    /// new target); syncs succeed (memory is as durable as it gets).
    pub fn writable(name: impl Into<PathBuf>, bytes: impl Into<Vec<u8>>) -> MemoryStorage {
        MemoryStorage {
            writable: true,
            ..MemoryStorage::read_only(name, bytes)
        }
    }

    /// Refuses, with ENOSPC, a write or a length that would make the
    /// storage longer than `max_len` bytes (a full disk).
    pub fn max_len(mut self, max_len: u64) -> MemoryStorage {
        self.max_len = max_len;
        self
    }

    /// Loses power after `writes` complete writes: the next write stores
    /// nothing, or its first half in whole 512-byte sectors when `torn`,
    /// and fails with EIO; every later write, length change and sync fails
    /// with EIO too. Reads keep working: they show what a test would find
    /// on the disk after the power comes back.
    pub fn power_cut_after(mut self, writes: usize, torn: bool) -> MemoryStorage {
        self.power = Some(PowerCut {
            writes_left: AtomicUsize::new(writes),
            torn,
        });
        self
    }

    /// Whether a power cut has happened.
    pub fn power_lost(&self) -> bool {
        self.power
            .as_ref()
            .is_some_and(|p| p.writes_left.load(Ordering::SeqCst) == POWER_LOST)
    }

    /// A copy of the bytes it holds now.
    pub fn bytes(&self) -> Vec<u8> {
        self.data.read().expect("memory storage lock").clone()
    }

    /// The bytes it holds.
    pub fn into_bytes(self) -> Vec<u8> {
        self.data.into_inner().expect("memory storage lock")
    }

    /// Refuses a write while read-only or after a power cut.
    fn check_writable(&self) -> io::Result<()> {
        if !self.writable {
            return Err(read_only());
        }
        if self.power_lost() {
            return Err(eio());
        }
        Ok(())
    }

    /// The end of `len` bytes at `offset`, if it is within `max_len` (and
    /// addressable in memory); ENOSPC otherwise.
    fn end_within_limit(&self, offset: u64, len: u64) -> io::Result<usize> {
        offset
            .checked_add(len)
            .filter(|&end| end <= self.max_len)
            .and_then(|end| usize::try_from(end).ok())
            .ok_or_else(|| io::Error::from_raw_os_error(libc::ENOSPC))
    }

    /// Stores `buf` at `offset`, growing the storage with zeros as needed.
    fn store(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        let end = self.end_within_limit(offset, buf.len() as u64)?;
        let mut data = self.data.write().expect("memory storage lock");
        if data.len() < end {
            data.resize(end, 0);
        }
        data[end - buf.len()..end].copy_from_slice(buf);
        Ok(())
    }
}

fn eio() -> io::Error {
    io::Error::from_raw_os_error(libc::EIO)
}

impl Storage for MemoryStorage {
    fn name(&self) -> &Path {
        &self.name
    }

    fn len(&self) -> u64 {
        self.data.read().expect("memory storage lock").len() as u64
    }

    fn read_at(&self, buf: &mut [u8], offset: HostOffset) -> io::Result<usize> {
        let data = self.data.read().expect("memory storage lock");
        let Some(src) = usize::try_from(offset.0).ok().and_then(|s| data.get(s..)) else {
            return Ok(0);
        };
        let n = src.len().min(buf.len());
        buf[..n].copy_from_slice(&src[..n]);
        Ok(n)
    }

    fn writable(&self) -> bool {
        self.writable
    }

    fn write_at(&self, buf: &[u8], offset: HostOffset) -> io::Result<()> {
        self.check_writable()?;
        if let Some(power) = &self.power {
            let before = power
                .writes_left
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |left| match left {
                    POWER_LOST => None,
                    0 => Some(POWER_LOST),
                    n => Some(n - 1),
                })
                .map_err(|_| eio())?;
            if before == 0 {
                let half = (buf.len() / 2) & !511;
                if power.torn && half > 0 {
                    self.store(&buf[..half], offset.0)?;
                }
                return Err(eio());
            }
        }
        self.store(buf, offset.0)
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        self.check_writable()?;
        let len = self.end_within_limit(len, 0)?;
        self.data
            .write()
            .expect("memory storage lock")
            .resize(len, 0);
        Ok(())
    }

    fn sync(&self) -> io::Result<()> {
        self.check_writable()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::storage::StorageError;

    fn read_all(s: &MemoryStorage) -> Vec<u8> {
        let mut buf = vec![0u8; s.len() as usize];
        let dyn_s: &dyn Storage = s;
        dyn_s
            .read_exact_at("test", &mut buf, HostOffset(0))
            .unwrap();
        buf
    }

    #[test]
    fn reads_stop_at_the_end_and_past_it_read_nothing() {
        let s = MemoryStorage::read_only("m", b"hello".to_vec());
        assert_eq!(s.name(), Path::new("m"));
        assert_eq!(s.len(), 5);
        let mut buf = [0xffu8; 8];
        assert_eq!(s.read_at(&mut buf, HostOffset(3)).unwrap(), 2);
        assert_eq!(&buf[..3], b"lo\xff", "nothing padded past the end");
        assert_eq!(s.read_at(&mut buf, HostOffset(5)).unwrap(), 0);
        assert_eq!(s.read_at(&mut buf, HostOffset(u64::MAX)).unwrap(), 0);
        // The bounds-checked helper reports a read past the end.
        let dyn_s: &dyn Storage = &s;
        assert!(matches!(
            dyn_s.read_exact_at("table", &mut buf, HostOffset(0)),
            Err(StorageError::PastEof { .. })
        ));
    }

    #[test]
    fn read_only_storage_refuses_every_change() {
        let s = MemoryStorage::read_only("m", vec![1u8; 4]);
        assert!(!s.writable());
        let kind = |r: io::Result<()>| r.unwrap_err().kind();
        assert_eq!(
            kind(s.write_at(b"x", HostOffset(0))),
            io::ErrorKind::PermissionDenied
        );
        assert_eq!(kind(s.set_len(0)), io::ErrorKind::PermissionDenied);
        assert_eq!(kind(s.sync()), io::ErrorKind::PermissionDenied);
        assert_eq!(s.into_bytes(), vec![1u8; 4]);
    }

    #[test]
    fn writes_grow_the_storage_and_the_gap_reads_as_zeros() {
        let s = MemoryStorage::writable("m", Vec::new());
        assert!(s.writable() && s.is_empty());
        s.write_at(b"ab", HostOffset(3)).unwrap();
        s.write_at(b"Z", HostOffset(0)).unwrap();
        assert_eq!(read_all(&s), b"Z\0\0ab");
        s.write_zeroes(HostOffset(3), 1).unwrap();
        assert_eq!(s.bytes(), b"Z\0\0\0b");
        s.set_len(2).unwrap();
        assert_eq!(s.bytes(), b"Z\0");
        s.set_len(4).unwrap();
        assert_eq!(s.bytes(), b"Z\0\0\0");
        s.sync().unwrap();
    }

    #[test]
    fn a_write_past_max_len_is_a_full_disk_and_changes_nothing() {
        let s = MemoryStorage::writable("m", vec![7u8; 4]).max_len(8);
        s.write_at(b"1234", HostOffset(4)).unwrap();
        let enospc = |r: io::Result<()>| r.unwrap_err().raw_os_error();
        assert_eq!(enospc(s.write_at(b"x", HostOffset(8))), Some(libc::ENOSPC));
        assert_eq!(
            enospc(s.write_at(b"x", HostOffset(u64::MAX))),
            Some(libc::ENOSPC)
        );
        assert_eq!(enospc(s.set_len(9)), Some(libc::ENOSPC));
        assert_eq!(s.bytes(), b"\x07\x07\x07\x071234");
    }

    #[test]
    fn a_power_cut_keeps_earlier_writes_loses_the_next_and_fails_the_rest() {
        let s = MemoryStorage::writable("m", vec![0u8; 4]).power_cut_after(2, false);
        s.write_at(b"a", HostOffset(0)).unwrap();
        s.sync().unwrap();
        s.write_at(b"b", HostOffset(1)).unwrap();
        assert!(!s.power_lost());
        let eio = |r: io::Result<()>| r.unwrap_err().raw_os_error();
        assert_eq!(eio(s.write_at(b"c", HostOffset(2))), Some(libc::EIO));
        assert!(s.power_lost());
        assert_eq!(eio(s.write_at(b"d", HostOffset(3))), Some(libc::EIO));
        assert_eq!(eio(s.sync()), Some(libc::EIO));
        assert_eq!(eio(s.set_len(0)), Some(libc::EIO));
        assert_eq!(s.bytes(), b"ab\0\0", "reads show what survived");
    }

    #[test]
    fn a_torn_write_keeps_whole_sectors_of_its_first_half() {
        let s = MemoryStorage::writable("m", vec![0u8; 2048]).power_cut_after(0, true);
        assert!(s.write_at(&[9u8; 2048], HostOffset(0)).is_err());
        let b = s.bytes();
        assert!(b[..1024].iter().all(|&x| x == 9) && b[1024..].iter().all(|&x| x == 0));
        // A write shorter than two sectors has no whole sector in its half.
        let s = MemoryStorage::writable("m", vec![0u8; 1000]).power_cut_after(0, true);
        assert!(s.write_at(&[9u8; 1000], HostOffset(0)).is_err());
        assert_eq!(s.bytes(), vec![0u8; 1000]);
    }

    #[test]
    fn threads_share_one_storage() {
        let s = Arc::new(MemoryStorage::writable("m", Vec::new()));
        let handles: Vec<_> = (0..4u8)
            .map(|i| {
                let s = Arc::clone(&s);
                std::thread::spawn(move || s.write_at(&[i; 16], HostOffset(u64::from(i) * 16)))
            })
            .collect();
        for h in handles {
            h.join().unwrap().unwrap();
        }
        let b = s.bytes();
        assert_eq!(b.len(), 64);
        assert!((0..4u8).all(|i| b[i as usize * 16..][..16].iter().all(|&x| x == i)));
    }
}
