//! A watch on the staged image: did anyone but the writer change it?
//!
//! Why: the temporary file lives in a directory others can write to, and
//! the image format cannot tell a hole punched or a tail cut off by another
//! process from clusters that were never written (`qemu-img check` finds
//! nothing wrong with a qcow2 image whose data clusters were truncated
//! away and the file extended again by the writer). So [`WriteGuard`]
//! wraps the staged file's storage and remembers what was written:
//! - the end of the file the writer made (its writes and resizes);
//! - before each write or resize, the file's real length: shorter than the
//!   writer made it means someone truncated it (the writer's next write
//!   would extend it again, leaving zeros where data was);
//! - the CRC32 of the first [`SAMPLE_BYTES`] of a uniform sample of
//!   writes ([`RESERVOIR`] of them) and of the last [`RECENT`] writes.
//!
//! [`WriteGuard::check`], run just before publishing, compares the file's
//! length with the writer's end and re-reads every sample. It costs a few
//! MiB of reads, whatever the image size. A truncation is always caught
//! when the writer wrote anything after it or when it leaves the file
//! shorter; a truncation the other process itself extended again after the
//! writer's last write is caught when a sample lies in the lost range.
//!
//! Invariant: a sample always describes the bytes last written there (a
//! later write overlapping it drops it).

use std::io;
use std::path::Path;
use std::sync::{Arc, Mutex};

use qbackup_formats::storage::{ChangeStamp, FileExtent, Identity, Storage};
use qbackup_formats::HostOffset;

/// Bytes of each sampled write whose CRC32 is kept.
pub const SAMPLE_BYTES: usize = 64 << 10;
/// Writes sampled uniformly over the whole run.
pub const RESERVOIR: usize = 64;
/// The most recent writes, always kept (the header, the last tables).
pub const RECENT: usize = 8;

/// A range written, and the CRC32 of its bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Sample {
    offset: u64,
    len: u64,
    crc: u32,
}

impl Sample {
    fn overlaps(&self, offset: u64, len: u64) -> bool {
        offset < self.offset + self.len && self.offset < offset + len
    }
}

#[derive(Debug, Default)]
struct State {
    /// The file's length as the writer made it.
    end: u64,
    /// The first shrink seen: (writer's end, the file's length then).
    shrunk: Option<(u64, u64)>,
    reservoir: Vec<Sample>,
    recent: Vec<Sample>,
    writes: u64,
    rng: u64,
}

impl State {
    /// A pseudo-random number (xorshift64*): sampling needs no secrecy.
    fn next_random(&mut self) -> u64 {
        let mut x = self.rng;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.rng = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Notes the file's real length before the writer changes it.
    fn observe(&mut self, stamp: Option<ChangeStamp>) {
        if let Some(s) = stamp {
            if s.len < self.end && self.shrunk.is_none() {
                self.shrunk = Some((self.end, s.len));
            }
        }
    }

    fn record_write(&mut self, buf: &[u8], offset: u64) {
        let len = buf.len() as u64;
        self.end = self.end.max(offset + len);
        self.reservoir.retain(|s| !s.overlaps(offset, len));
        self.recent.retain(|s| !s.overlaps(offset, len));
        let n = buf.len().min(SAMPLE_BYTES);
        let sample = Sample {
            offset,
            len: n as u64,
            crc: crc32fast::hash(&buf[..n]),
        };
        self.writes += 1;
        if self.reservoir.len() < RESERVOIR {
            self.reservoir.push(sample);
        } else {
            let pick = self.next_random() % self.writes;
            if (pick as usize) < RESERVOIR {
                self.reservoir[pick as usize] = sample;
            }
        }
        if self.recent.len() == RECENT {
            self.recent.remove(0);
        }
        self.recent.push(sample);
    }
}

/// The staged image's storage, watched; see the module docs.
#[derive(Debug)]
pub struct WriteGuard {
    inner: Arc<dyn Storage>,
    state: Mutex<State>,
}

impl WriteGuard {
    /// Watches `inner`, a new, empty file.
    pub fn new(inner: Arc<dyn Storage>) -> WriteGuard {
        let seed = inner.identity().map_or(0, |i| i.ino) ^ 0x9e37_79b9_7f4a_7c15;
        WriteGuard {
            state: Mutex::new(State {
                end: inner.len(),
                rng: seed | 1,
                ..State::default()
            }),
            inner,
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Checks that the file holds what was written: its length is the
    /// writer's, it never shrank under the writer, and every sample reads
    /// back as written. The error says what was found.
    pub fn check(&self) -> Result<(), String> {
        let st = self.state();
        if let Some((end, found)) = st.shrunk {
            return Err(format!(
                "it shrank from {end} to {found} bytes while being written"
            ));
        }
        let len = match self.inner.change_stamp() {
            Some(s) => s.len,
            None => return Err("its length cannot be read".to_string()),
        };
        if len != st.end {
            return Err(format!("it is {len} bytes long, {} were written", st.end));
        }
        let mut buf = vec![0u8; SAMPLE_BYTES];
        let mut samples: Vec<Sample> = st.reservoir.iter().chain(&st.recent).copied().collect();
        samples.sort_by_key(|s| s.offset);
        samples.dedup();
        for s in samples {
            let b = &mut buf[..s.len as usize];
            let inner: &dyn Storage = self.inner.as_ref();
            match inner.read_exact_at("written data", b, HostOffset(s.offset)) {
                Ok(()) if crc32fast::hash(b) == s.crc => {}
                Ok(()) => {
                    return Err(format!(
                        "the {} bytes written at offset {} read back differently",
                        s.len, s.offset
                    ))
                }
                Err(e) => {
                    return Err(format!(
                        "the {} bytes written at offset {} cannot be read back: {e}",
                        s.len, s.offset
                    ))
                }
            }
        }
        Ok(())
    }
}

impl Storage for WriteGuard {
    fn name(&self) -> &Path {
        self.inner.name()
    }

    fn len(&self) -> u64 {
        self.inner.len()
    }

    fn read_at(&self, buf: &mut [u8], offset: HostOffset) -> io::Result<usize> {
        self.inner.read_at(buf, offset)
    }

    fn data_or_hole(&self, offset: HostOffset, max_len: u64) -> io::Result<(FileExtent, u64)> {
        self.inner.data_or_hole(offset, max_len)
    }

    fn writable(&self) -> bool {
        self.inner.writable()
    }

    fn write_at(&self, buf: &[u8], offset: HostOffset) -> io::Result<()> {
        let mut st = self.state();
        st.observe(self.inner.change_stamp());
        self.inner.write_at(buf, offset)?;
        st.record_write(buf, offset.0);
        Ok(())
    }

    fn write_zeroes(&self, offset: HostOffset, len: u64) -> io::Result<()> {
        let mut st = self.state();
        st.observe(self.inner.change_stamp());
        self.inner.write_zeroes(offset, len)?;
        st.reservoir.retain(|s| !s.overlaps(offset.0, len));
        st.recent.retain(|s| !s.overlaps(offset.0, len));
        Ok(())
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        let mut st = self.state();
        st.observe(self.inner.change_stamp());
        self.inner.set_len(len)?;
        st.end = len;
        st.reservoir.retain(|s| s.offset + s.len <= len);
        st.recent.retain(|s| s.offset + s.len <= len);
        Ok(())
    }

    fn sync(&self) -> io::Result<()> {
        self.inner.sync()
    }

    fn start_writeback(&self) {
        self.inner.start_writeback()
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

    fn cache_fd(&self) -> Option<std::os::fd::BorrowedFd<'_>> {
        self.inner.cache_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use qbackup_formats::storage::FileStorage;

    fn staged() -> (tempfile::NamedTempFile, Arc<WriteGuard>) {
        let tmp = tempfile::NamedTempFile::new().unwrap();
        let file = tmp.as_file().try_clone().unwrap();
        let inner = FileStorage::writable(file, tmp.path()).unwrap();
        (tmp, Arc::new(WriteGuard::new(Arc::new(inner))))
    }

    fn write_many(g: &WriteGuard, n: u64) {
        for i in 0..n {
            let data = vec![(i % 250) as u8 + 1; 4096];
            g.write_at(&data, HostOffset(i * 4096)).unwrap();
        }
    }

    #[test]
    fn untouched_file_passes() {
        let (_tmp, g) = staged();
        write_many(&g, 500);
        g.write_at(b"head", HostOffset(0)).unwrap();
        g.sync().unwrap();
        g.check().unwrap();
    }

    #[test]
    fn truncation_seen_by_the_next_write() {
        let (tmp, g) = staged();
        write_many(&g, 100);
        std::fs::OpenOptions::new()
            .write(true)
            .open(tmp.path())
            .unwrap()
            .set_len(4096)
            .unwrap();
        // The writer goes on, extending the file again.
        g.write_at(&[9; 4096], HostOffset(100 * 4096)).unwrap();
        let err = g.check().unwrap_err();
        assert!(err.contains("shrank from 409600 to 4096"), "{err}");
    }

    #[test]
    fn truncation_after_the_last_write_and_extension_by_another_process() {
        let (tmp, g) = staged();
        write_many(&g, 1000);
        let other = std::fs::OpenOptions::new()
            .write(true)
            .open(tmp.path())
            .unwrap();
        // Shorter than written.
        other.set_len(500 * 4096).unwrap();
        assert!(g.check().unwrap_err().contains("bytes long"));
        // Extended again to the same length: the samples in the lost half
        // read as zeros.
        other.set_len(1000 * 4096).unwrap();
        let err = g.check().unwrap_err();
        assert!(err.contains("read back differently"), "{err}");
        // Longer than written.
        other.set_len(1001 * 4096).unwrap();
        assert!(g.check().unwrap_err().contains("bytes long"));
    }

    #[test]
    fn samples_follow_rewrites_and_resizes() {
        let (_tmp, g) = staged();
        write_many(&g, 100);
        // Rewritten in place (tables, the header): the new bytes count.
        g.write_at(&[0xee; 8192], HostOffset(4096)).unwrap();
        g.write_at(b"QFI\xfb", HostOffset(0)).unwrap();
        g.check().unwrap();
        g.set_len(50 * 4096).unwrap();
        g.check().unwrap();
        g.set_len(200 * 4096).unwrap();
        g.check().unwrap();
    }
}
