//! A metadata check as strict as `qemu-img check` (QEMU's
//! `qcow2_check_refcounts` in block/qcow2-refcount.c), for `verify`: a
//! backup whose metadata QEMU reports as corrupt or leaking is not a good
//! backup even where every guest byte reads back right.
//!
//! Every host cluster's references are counted from the metadata (header,
//! L1 and L2 tables of the active image and of each snapshot, data and
//! compressed clusters, the snapshot table, the refcount table and blocks,
//! the LUKS header, the bitmap directory, tables and data) and compared
//! with the stored refcounts. Also reported, as QEMU reports them: reserved
//! bits in L1, L2, refcount table and bitmap table entries, unaligned
//! tables and clusters, contradictory subcluster bitmaps, the COPIED flag
//! disagreeing with the refcount, and the corrupt bit. References past the
//! end of the file are reported too (QEMU would read zeros there).

use super::bitmap_data;
use super::error::Qcow2Error;
use super::header::{autoclear, incompat};
use super::image::Qcow2Image;
use super::l2::{decode_compressed, COMPRESSED, COPIED, OFFSET_MASK, ZERO};
use super::refcount::RefcountReader;
use super::snapshots;
use super::table;
use crate::units::HostOffset;

/// Reserved bits of an L1 entry (QEMU's `L1E_RESERVED_MASK`).
const L1_RESERVED: u64 = 0x7f00_0000_0000_01ff;
/// Reserved bits of a standard L2 entry (`L2E_STD_RESERVED_MASK`).
const L2_RESERVED: u64 = 0x3f00_0000_0000_01fe;
/// Reserved bits of a refcount table entry (`REFT_RESERVED_MASK`).
const REFTABLE_RESERVED: u64 = 0x1ff;
/// QEMU's limit on an L1 table's entries.
const MAX_L1_ENTRIES: u32 = (32 << 20) / 8;
/// Problems listed in full; the rest are counted.
const MAX_LISTED: usize = 20;

/// What the metadata check found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MetadataReport {
    /// The problems, one line each (at most 20; see `count`).
    pub problems: Vec<String>,
    /// Problems in all.
    pub count: u64,
}

impl MetadataReport {
    /// True when `qemu-img check` would find nothing to report.
    pub fn clean(&self) -> bool {
        self.count == 0
    }

    fn push(&mut self, problem: String) {
        self.count += 1;
        if self.problems.len() < MAX_LISTED {
            self.problems.push(problem);
        }
    }
}

struct Checker<'a> {
    image: &'a Qcow2Image,
    cluster_bits: u32,
    /// References per host cluster of the file (saturating, as QEMU's
    /// 16-bit in-memory counts: 2 bytes a cluster).
    refs: Vec<u16>,
    report: MetadataReport,
}

impl Checker<'_> {
    fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    /// Counts one reference to every host cluster of `[offset, offset+len)`.
    fn inc(&mut self, what: &str, offset: u64, len: u64) {
        if len == 0 {
            return;
        }
        let first = offset >> self.cluster_bits;
        let last = offset.saturating_add(len - 1) >> self.cluster_bits;
        if last >= self.refs.len() as u64 {
            self.report.push(format!(
                "{what} at host offset {offset} lies past the end of the file"
            ));
        }
        let end = (last + 1).min(self.refs.len() as u64);
        for k in first..end {
            let r = &mut self.refs[k as usize];
            *r = r.saturating_add(1);
        }
    }

    fn l1(&mut self, name: &str, offset: HostOffset, size: u32) {
        self.inc(&format!("{name} L1 table"), offset.0, u64::from(size) * 8);
        let l1 = match table::read(
            self.image.storage().as_ref(),
            "L1 table",
            offset,
            size.into(),
        ) {
            Ok(t) => t,
            Err(e) => {
                self.report.push(format!("{name} L1 table: {e}"));
                return;
            }
        };
        let cs = self.cluster_size();
        for (i, &e) in l1.iter().enumerate() {
            if e == 0 {
                continue;
            }
            if e & L1_RESERVED != 0 {
                self.report.push(format!(
                    "{name} L1 table entry {i} has reserved bits set ({e:#018x})"
                ));
            }
            let l2 = e & OFFSET_MASK;
            self.inc("L2 table", l2, cs);
            if l2 % cs != 0 {
                self.report.push(format!(
                    "{name} L1 table entry {i}: L2 table at host offset {l2} is not cluster aligned"
                ));
                continue;
            }
            let mut raw = vec![0u8; cs as usize];
            if let Err(e) = self
                .image
                .storage()
                .read_exact_at("L2 table", &mut raw, HostOffset(l2))
            {
                self.report.push(format!("{name} L2 table: {e}"));
                continue;
            }
            self.l2(&table::decode(&raw), l2);
        }
    }

    fn l2(&mut self, t: &[u64], table_at: u64) {
        let h = self.image.header();
        let (extended, data_file) = (h.extended_l2(), h.has_data_file());
        let step = if extended { 2 } else { 1 };
        let cs = self.cluster_size();
        for i in 0..t.len() / step {
            let entry = t[i * step];
            let bitmap = if extended { t[i * step + 1] } else { 0 };
            let at = format!("L2 table at host offset {table_at}, entry {i}");
            if entry & COMPRESSED != 0 {
                if entry & COPIED != 0 {
                    self.report
                        .push(format!("{at}: COPIED flag set on a compressed cluster"));
                }
                if data_file {
                    self.report.push(format!(
                        "{at}: compressed cluster in an image with an external data file"
                    ));
                    continue;
                }
                if bitmap != 0 {
                    self.report.push(format!(
                        "{at}: compressed cluster with a nonzero subcluster bitmap"
                    ));
                    continue;
                }
                let d = decode_compressed(entry & !COPIED, self.cluster_bits);
                self.inc("compressed cluster", d.offset.0, d.len);
                continue;
            }
            if entry & L2_RESERVED != 0 {
                self.report
                    .push(format!("{at} has reserved bits set ({entry:#018x})"));
            }
            let offset = entry & OFFSET_MASK;
            let zero_flag = entry & ZERO != 0 && !extended;
            let allocated = offset != 0 || (data_file && !zero_flag && entry & COPIED != 0);
            if !allocated {
                if bitmap & 0xffff_ffff != 0 {
                    self.report.push(format!(
                        "{at}: unallocated cluster with a nonzero subcluster allocation bitmap"
                    ));
                }
                continue;
            }
            if (bitmap >> 32) & bitmap != 0 {
                self.report.push(format!(
                    "{at}: subclusters both allocated and zero ({bitmap:#018x})"
                ));
            }
            if offset % cs != 0 {
                self.report.push(format!(
                    "{at}: data cluster at host offset {offset} is not cluster aligned"
                ));
            }
            if !data_file {
                self.inc("data cluster", offset, cs);
            }
        }
    }

    /// QEMU's `check_oflag_copied`: the COPIED flag of every active L1
    /// entry and of every allocated L2 entry says "refcount is exactly 1"
    /// (a second pass over the active tables, so that nothing per cluster
    /// is kept in memory).
    fn copied_flags(&mut self, refcounts: &mut RefcountReader<'_>) {
        let h = self.image.header();
        let (cs, bits, extended) = (self.cluster_size(), self.cluster_bits, h.extended_l2());
        let data_file = h.has_data_file();
        let storage = self.image.storage().clone();
        let file_clusters = self.refs.len() as u64;
        let mut check = |report: &mut MetadataReport, what: &str, entry: u64, offset: u64| {
            if offset % cs != 0 || offset >> bits >= file_clusters {
                return; // reported already
            }
            let Ok(refcount) = refcounts.get(offset >> bits) else {
                return; // reported already
            };
            let flag = entry & COPIED != 0;
            if (refcount == 1) != flag {
                report.push(format!(
                    "{what} at host offset {offset}: COPIED flag {} but refcount {refcount}",
                    if flag { "set" } else { "clear" }
                ));
            }
        };
        for &e in self.image.l1() {
            let l2 = e & OFFSET_MASK;
            if l2 == 0 {
                continue;
            }
            check(&mut self.report, "L2 table", e, l2);
            let mut raw = vec![0u8; cs as usize];
            if l2 % cs != 0
                || storage
                    .read_exact_at("L2 table", &mut raw, HostOffset(l2))
                    .is_err()
            {
                continue;
            }
            let step = if extended { 2 } else { 1 };
            for entry in table::entries(&raw).step_by(step) {
                let offset = entry & OFFSET_MASK;
                if entry & COMPRESSED != 0 || offset == 0 {
                    continue;
                }
                if data_file {
                    // Data file clusters count as refcount 1 (QEMU).
                    if entry & COPIED == 0 {
                        self.report.push(format!(
                            "data cluster at data file offset {offset}: COPIED flag clear but refcount 1"
                        ));
                    }
                    continue;
                }
                check(&mut self.report, "data cluster", entry, offset);
            }
        }
    }

    fn bitmaps(&mut self) {
        let h = self.image.header();
        let Some(ext) = h
            .bitmaps
            .filter(|_| h.autoclear_features & autoclear::BITMAPS != 0)
        else {
            return;
        };
        self.inc(
            "bitmap directory",
            ext.directory_offset.0,
            ext.directory_size,
        );
        let storage = self.image.storage().clone();
        for b in self.image.bitmaps() {
            self.inc(
                "bitmap table",
                b.table_offset.0,
                u64::from(b.table_size) * 8,
            );
            match bitmap_data::read_table(storage.as_ref(), b, h.cluster_bits, h.size & !511) {
                Ok(t) => {
                    for c in bitmap_data::data_clusters(&t) {
                        self.inc("bitmap data", c.0, 1 << h.cluster_bits);
                    }
                }
                Err(e) => self.report.push(format!("dirty bitmap '{}': {e}", b.name)),
            }
        }
    }
}

/// Checks the metadata of `image` as `qemu-img check` does; an error only
/// when the refcount table itself cannot be read.
pub(crate) fn check(image: &Qcow2Image) -> Result<MetadataReport, Qcow2Error> {
    let h = image.header().clone();
    let storage = image.storage().clone();
    let cs = h.cluster_size();
    let mut c = Checker {
        image,
        cluster_bits: h.cluster_bits,
        refs: vec![0; storage.len().div_ceil(cs) as usize],
        report: MetadataReport::default(),
    };
    if h.incompatible_features & incompat::CORRUPT != 0 {
        c.report
            .push("the image is marked corrupt: QEMU found its metadata inconsistent (qemu-img check -r all clears the mark once the metadata is repaired)".to_string());
    }
    c.inc("header", 0, cs);
    c.l1("active", h.l1_table_offset, h.l1_size);
    let snaps = snapshots::read_table(storage.as_ref(), &h)?;
    for (n, s) in snaps.snapshots.iter().enumerate() {
        if s.l1_table_offset.0 % cs != 0 {
            c.report.push(format!(
                "snapshot {n}: L1 table at host offset {} is not cluster aligned",
                s.l1_table_offset
            ));
            continue;
        }
        if s.l1_size > MAX_L1_ENTRIES {
            c.report
                .push(format!("snapshot {n}: L1 table larger than 32 MiB"));
            continue;
        }
        c.l1(&format!("snapshot {n}"), s.l1_table_offset, s.l1_size);
    }
    c.inc("snapshot table", h.snapshots_offset.0, snaps.len);
    c.inc(
        "refcount table",
        h.refcount_table_offset.0,
        u64::from(h.refcount_table_clusters) << h.cluster_bits,
    );
    if let Some((offset, len)) = h.crypto_header {
        c.inc("LUKS header", offset.0, len);
    }
    c.bitmaps();
    let reftable = table::read(
        storage.as_ref(),
        "refcount table",
        h.refcount_table_offset,
        (u64::from(h.refcount_table_clusters) << h.cluster_bits) / 8,
    )?;
    let mut blocks = Vec::new();
    for (i, &e) in reftable.iter().enumerate() {
        if e & REFTABLE_RESERVED != 0 {
            c.report.push(format!(
                "refcount table entry {i} has reserved bits set ({e:#018x})"
            ));
            continue;
        }
        if e % cs != 0 {
            c.report.push(format!(
                "refcount table entry {i}: refcount block at host offset {e} is not cluster aligned"
            ));
            continue;
        }
        if e != 0 {
            c.inc("refcount block", e, cs);
            blocks.push((i, e));
        }
    }
    for (i, e) in blocks {
        if let Some(&r) = c.refs.get((e >> h.cluster_bits) as usize) {
            if r != 1 {
                c.report.push(format!(
                    "refcount block {i} at host offset {e} is referenced {r} times"
                ));
            }
        }
    }
    // Stored refcounts against references; reserved refcount table
    // entries were reported, their blocks are read as QEMU reads them.
    let masked = image.header().refcount_table_offset;
    let mut reader = RefcountReader::new(
        storage.as_ref(),
        masked,
        h.refcount_table_clusters,
        h.cluster_bits,
        h.refcount_order,
    )?;
    for i in 0..c.refs.len() {
        let s = match reader.get(i as u64) {
            Ok(v) => v,
            Err(e) => {
                c.report
                    .push(format!("cannot read the refcount of host cluster {i}: {e}"));
                continue;
            }
        };
        let r = u64::from(c.refs[i]);
        if s < r {
            c.report.push(format!(
                "host cluster {i} (offset {}) has refcount {s} but {r} references",
                (i as u64) << h.cluster_bits
            ));
        } else if s > r {
            c.report.push(format!(
                "host cluster {i} (offset {}) is leaked: refcount {s}, {r} references",
                (i as u64) << h.cluster_bits
            ));
        }
    }
    c.copied_flags(&mut reader);
    Ok(c.report)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::codec::CompressionType;
    use crate::open::FileOpener;
    use crate::qcow2::writer::{ClusterWrite, Qcow2Writer, WriterOptions};
    use crate::storage::memory::MemoryStorage;
    use crate::storage::Storage;
    use crate::units::ClusterIndex;

    const BITS: u32 = 12;
    const CS: usize = 1 << BITS;

    /// A small image from the writer: four data clusters of eight.
    fn image() -> Vec<u8> {
        let storage = Arc::new(MemoryStorage::writable("img", Vec::new()));
        let mut w = Qcow2Writer::new(
            storage.clone(),
            WriterOptions {
                virtual_size: 8 * CS as u64,
                cluster_bits: BITS,
                compression: CompressionType::Zlib,
                backing: None,
            },
        )
        .unwrap();
        for i in [0u64, 2, 3, 6] {
            let data = vec![i as u8 + 1; CS];
            w.write_cluster(ClusterIndex(i), ClusterWrite::Data(&data))
                .unwrap();
        }
        w.finish().unwrap();
        storage.bytes()
    }

    fn be64(b: &[u8], at: usize) -> u64 {
        u64::from_be_bytes(b[at..at + 8].try_into().unwrap())
    }

    fn put64(b: &mut [u8], at: usize, v: u64) {
        b[at..at + 8].copy_from_slice(&v.to_be_bytes());
    }

    fn check_bytes(b: Vec<u8>) -> MetadataReport {
        let storage: Arc<dyn Storage> = Arc::new(MemoryStorage::read_only("img", b));
        Qcow2Image::open(storage, &FileOpener)
            .unwrap()
            .check_metadata()
            .unwrap()
    }

    /// Where the L2 entry of guest cluster `i` is (one L2 table).
    fn l2_entry(b: &[u8], i: usize) -> usize {
        let l1 = be64(b, 40) as usize;
        (be64(b, l1) & OFFSET_MASK) as usize + 8 * i
    }

    fn refcount_block(b: &[u8]) -> usize {
        let rt = be64(b, 48) as usize;
        be64(b, rt) as usize
    }

    fn assert_reports(b: Vec<u8>, words: &str) {
        let r = check_bytes(b);
        assert!(!r.clean(), "nothing reported, expected {words}");
        assert!(
            r.problems.iter().any(|p| p.contains(words)),
            "{words} not in {:?}",
            r.problems
        );
    }

    #[test]
    fn a_written_image_is_clean() {
        let r = check_bytes(image());
        assert!(r.clean(), "{:?}", r.problems);
    }

    #[test]
    fn corrupt_bit() {
        let mut b = image();
        b[79] |= incompat::CORRUPT as u8;
        assert_reports(b, "marked corrupt");
    }

    #[test]
    fn reserved_bits_of_l1_l2_and_refcount_table_entries() {
        let mut b = image();
        let at = l2_entry(&b, 2);
        let v = be64(&b, at) | 1 << 4;
        put64(&mut b, at, v);
        assert_reports(b, "reserved bits");
        let mut b = image();
        let l1 = be64(&b, 40) as usize;
        let v = be64(&b, l1) | 1 << 60;
        put64(&mut b, l1, v);
        assert_reports(b, "reserved bits");
        let mut b = image();
        let rt = be64(&b, 48) as usize;
        let v = be64(&b, rt) | 1;
        put64(&mut b, rt, v);
        assert_reports(b, "reserved bits");
    }

    #[test]
    fn leaks_and_double_references() {
        // A cluster appended with refcount 1 and no reference.
        let mut b = image();
        let index = b.len() / CS;
        b.resize(b.len() + CS, 0);
        let block = refcount_block(&b);
        b[block + 2 * index..block + 2 * index + 2].copy_from_slice(&1u16.to_be_bytes());
        assert_reports(b, "leaked");
        // Guest cluster 7 mapped onto cluster 6's host cluster.
        let mut b = image();
        let e = be64(&b, l2_entry(&b, 6));
        let at = l2_entry(&b, 7);
        put64(&mut b, at, e);
        assert_reports(b, "2 references");
    }

    #[test]
    fn copied_flag_must_match_the_refcount() {
        let mut b = image();
        let at = l2_entry(&b, 0);
        let v = be64(&b, at) & !COPIED;
        put64(&mut b, at, v);
        assert_reports(b, "COPIED flag clear");
    }

    #[test]
    fn references_past_the_end_of_the_file() {
        let mut b = image();
        let at = l2_entry(&b, 5);
        put64(&mut b, at, COPIED | 0x100_0000);
        assert_reports(b, "past the end of the file");
    }
}
