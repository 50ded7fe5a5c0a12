//! Clearing a persistent dirty bitmap in place (spec "Bitmaps extension",
//! "Bitmap table", "Host cluster management"), once a backup made from it
//! is durable: the start of the next incremental cycle, QEMU's
//! `bitmap-mode=on-success`.
//!
//! Everything is checked by [`prepare`] before anything is written, and
//! nothing is written if a check fails: the image was opened for update
//! (QEMU's write locks held, so no VM or tool has it open), it is neither
//! marked corrupt nor dirty (with lazy refcounts a dirty image's refcounts
//! may be stale), the bitmap exists and is not in use, its table is valid,
//! each of its data clusters appears once and has refcount exactly 1, and
//! nothing that will be written (the table, the refcount blocks) or freed
//! (the data clusters) overlaps other metadata: the header cluster, the L1
//! and L2 tables, the refcount table and blocks, the snapshot table, the
//! bitmap directory, other bitmaps' tables and data (QEMU's overlap checks
//! before metadata writes; an inconsistent image must not be damaged
//! further).
//!
//! [`Qcow2BitmapClear::commit`] writes in this order, syncing after each
//! step, so that a crash at any instant leaves an image QEMU opens with no
//! dirty bit lost that the backup does not hold:
//! 1. The bitmap table is overwritten in place with all-zero entries ("no
//!    data cluster, all bits clear"). A crash inside this write leaves each
//!    entry either old or cleared, every one valid; the bits cleared are
//!    covered by the durable backup, the others stay set (the next
//!    incremental copies a little more).
//! 2. The old data clusters, now unreferenced, get refcount 0, one refcount
//!    block at a time. A crash before this completes leaves them leaked:
//!    `qemu-img check` reports leaks, not corruption, QEMU opens and writes
//!    the image, and `qemu-img check -r leaks` reclaims them.
//!
//! Never the other way round: a refcount freed while the table still points
//! at the cluster would let QEMU reuse a cluster the bitmap reads.
//!
//! The directory entry is not touched: the bitmap keeps its name,
//! granularity, flags and table (the table's size depends only on the
//! virtual size), so QEMU goes on tracking writes into it. Freed clusters
//! stay in the file as holes QEMU reuses, as QEMU leaves them.

use std::collections::BTreeMap;
use std::sync::Arc;

use super::bitmap_data::{data_clusters, read_table};
use super::bitmaps::{flags, BitmapError};
use super::error::{ClearError, Qcow2Error};
use super::header::incompat;
use super::image::Qcow2Image;
use super::refcount::{self, RefcountReader, RefcountSlot};
use crate::storage::Storage;
use crate::units::HostOffset;

/// A validated clearing of one bitmap, written by
/// [`Qcow2BitmapClear::commit`].
#[derive(Debug)]
pub struct Qcow2BitmapClear {
    storage: Arc<dyn Storage>,
    name: String,
    table_offset: HostOffset,
    table_len: usize,
    cluster_bits: u32,
    refcount_order: u32,
    /// The old data clusters' refcount entries (index, the cluster), by
    /// refcount block.
    freed: BTreeMap<HostOffset, Vec<(usize, HostOffset)>>,
}

/// Checks that bitmap `name` of `image` can be cleared (see the module
/// docs) and returns what [`Qcow2BitmapClear::commit`] will write.
pub fn prepare(image: &Qcow2Image, name: &str) -> Result<Qcow2BitmapClear, Qcow2Error> {
    let storage = image.storage();
    let h = image.header();
    let named = |f: fn(String) -> ClearError| Qcow2Error::from(f(name.to_string()));
    if !storage.writable() {
        return Err(named(|name| ClearError::ReadOnly { name }));
    }
    if h.incompatible_features & incompat::CORRUPT != 0 {
        return Err(named(|name| ClearError::MarkedCorrupt { name }));
    }
    if h.incompatible_features & incompat::DIRTY != 0 {
        return Err(named(|name| ClearError::Dirty { name }));
    }
    let entry = image
        .bitmaps()
        .iter()
        .find(|b| b.name == name)
        .ok_or_else(|| super::bitmaps::not_found(name, image.bitmaps()))?;
    if entry.flags & flags::IN_USE != 0 {
        return Err(BitmapError::InUse {
            name: name.to_string(),
        }
        .into());
    }
    let table = read_table(
        storage.as_ref(),
        entry,
        h.cluster_bits,
        image.virtual_size(),
    )?;
    let mut refcounts = RefcountReader::new(
        storage.as_ref(),
        h.refcount_table_offset,
        h.refcount_table_clusters,
        h.cluster_bits,
        h.refcount_order,
    )
    .map_err(ClearError::from)?;
    let mut freed: BTreeMap<HostOffset, Vec<(usize, HostOffset)>> = BTreeMap::new();
    for offset in data_clusters(&table) {
        let cluster = offset.0 >> h.cluster_bits;
        let count = refcounts.get(cluster).map_err(ClearError::from)?;
        // Exactly 1 also rules out a cluster listed twice: the second
        // sighting is caught below.
        let slot = match refcounts.slot(cluster).map_err(ClearError::from)? {
            Some(slot) if count == 1 => slot,
            _ => {
                return Err(ClearError::Refcount {
                    name: name.to_string(),
                    offset,
                    refcount: count,
                }
                .into())
            }
        };
        let RefcountSlot { block, index } = slot;
        let entries = freed.entry(block).or_default();
        if entries.iter().any(|&(i, _)| i == index) {
            return Err(ClearError::Refcount {
                name: name.to_string(),
                offset,
                refcount: 1,
            }
            .into());
        }
        entries.push((index, offset));
    }
    check_overlaps(image, name, entry, &table, &freed, &refcounts)?;
    Ok(Qcow2BitmapClear {
        storage: Arc::clone(storage),
        name: name.to_string(),
        table_offset: entry.table_offset,
        table_len: table.len(),
        cluster_bits: h.cluster_bits,
        refcount_order: h.refcount_order,
        freed,
    })
}

/// Host byte ranges of the image's metadata, by what they are.
fn metadata(
    image: &Qcow2Image,
    cleared: &str,
    refcounts: &RefcountReader<'_>,
) -> Vec<(&'static str, u64, u64)> {
    let h = image.header();
    let cs = 1u64 << h.cluster_bits;
    let mut m = vec![
        ("header cluster", 0, cs),
        ("L1 table", h.l1_table_offset.0, u64::from(h.l1_size) * 8),
        (
            "refcount table",
            h.refcount_table_offset.0,
            u64::from(h.refcount_table_clusters) << h.cluster_bits,
        ),
    ];
    if h.nb_snapshots > 0 {
        // Its length is not in the header: at least its first cluster.
        m.push(("snapshot table", h.snapshots_offset.0, cs));
    }
    if let Some(ext) = &h.bitmaps {
        m.push((
            "bitmap directory",
            ext.directory_offset.0,
            ext.directory_size,
        ));
    }
    m.extend(
        refcounts
            .block_offsets()
            .map(|b| ("refcount block", b.0, cs)),
    );
    m.extend(
        image
            .l1()
            .iter()
            .map(|e| e & 0x00ff_ffff_ffff_fe00)
            .filter(|&o| o != 0)
            .map(|o| ("L2 table", o, cs)),
    );
    for b in image.bitmaps().iter().filter(|b| b.name != cleared) {
        m.push((
            "other bitmap's table",
            b.table_offset.0,
            u64::from(b.table_size) * 8,
        ));
        if b.flags & flags::IN_USE == 0 {
            if let Ok(t) = read_table(
                image.storage().as_ref(),
                b,
                h.cluster_bits,
                image.virtual_size(),
            ) {
                m.extend(data_clusters(&t).map(|o| ("other bitmap's data", o.0, cs)));
            }
        }
    }
    m
}

/// Fails when the table to be zeroed, a refcount block to be written, or
/// a data cluster to be freed overlaps other metadata (see the module docs).
fn check_overlaps(
    image: &Qcow2Image,
    name: &str,
    entry: &super::bitmaps::BitmapEntry,
    table: &[u64],
    freed: &BTreeMap<HostOffset, Vec<(usize, HostOffset)>>,
    refcounts: &RefcountReader<'_>,
) -> Result<(), Qcow2Error> {
    let cs = 1u64 << image.header().cluster_bits;
    let meta = metadata(image, name, refcounts);
    let overlap = |what: &'static str, at: u64, len: u64, skip: &[&str]| {
        for &(other, start, mlen) in &meta {
            if skip.contains(&other) {
                continue;
            }
            if at < start.saturating_add(mlen) && start < at.saturating_add(len) {
                return Err(Qcow2Error::from(ClearError::Overlap {
                    name: name.to_string(),
                    what,
                    offset: HostOffset(at),
                    other,
                }));
            }
        }
        Ok(())
    };
    let table_len = table.len() as u64 * 8;
    overlap("bitmap table", entry.table_offset.0, table_len, &[])?;
    for o in data_clusters(table) {
        overlap("data cluster", o.0, cs, &[])?;
        if o.0 < entry.table_offset.0 + table_len && entry.table_offset.0 < o.0 + cs {
            return Err(Qcow2Error::from(ClearError::Overlap {
                name: name.to_string(),
                what: "data cluster",
                offset: o,
                other: "bitmap table",
            }));
        }
    }
    for &block in freed.keys() {
        // A refcount block may be (and is) a refcount block.
        overlap("refcount block", block.0, cs, &["refcount block"])?;
    }
    Ok(())
}

impl Qcow2BitmapClear {
    /// Clears the bitmap in the order the module docs give; returns how
    /// many data clusters were freed.
    pub fn commit(self) -> Result<u64, ClearError> {
        let fail = |step, source| ClearError::Write {
            name: self.name.clone(),
            step,
            source,
        };
        let zeros = vec![0u8; self.table_len * 8];
        self.storage
            .write_at(&zeros, self.table_offset)
            .map_err(|e| fail("writing the cleared bitmap table", e))?;
        self.storage
            .sync()
            .map_err(|e| fail("syncing the cleared bitmap table", e))?;
        let mut block = vec![0u8; 1usize << self.cluster_bits];
        let mut freed = 0u64;
        for (&at, entries) in &self.freed {
            self.storage
                .read_exact_at("refcount block", &mut block, at)
                .map_err(ClearError::from)?;
            for &(i, cluster) in entries {
                // Re-checked: nothing may have changed since prepare (the
                // write locks are held), but a refcount is never taken
                // below what something else holds.
                let now = refcount::entry(&block, self.refcount_order, i);
                if now != 1 {
                    return Err(ClearError::Refcount {
                        name: self.name.clone(),
                        offset: cluster,
                        refcount: now,
                    });
                }
                refcount::set_entry(&mut block, self.refcount_order, i, 0);
                freed += 1;
            }
            self.storage
                .write_at(&block, at)
                .map_err(|e| fail("writing a refcount block", e))?;
        }
        self.storage
            .sync()
            .map_err(|e| fail("syncing the refcount blocks", e))?;
        Ok(freed)
    }
}
