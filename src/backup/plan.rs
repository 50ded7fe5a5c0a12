//! The planner: turns a sync mode into the target clusters to copy or to
//! mark as zeros, as ranges, from block status (never by reading data).
//!
//! - `full`: a target cluster is copied when any of its bytes is stored data
//!   anywhere in the chain; clusters that read as zeros are left
//!   unallocated (the target has no backing file).
//! - `incremental`: the clusters the source's dirty bitmap marks (any dirty
//!   byte makes its whole target cluster dirty), read through the source;
//!   the rest stays unallocated and reads from the previous backup, the
//!   target's backing file. A dirty cluster that now reads as zeros becomes
//!   a zero cluster (the copier's zero detection), hiding the old data.
//! - `changed` (an incremental backup without a dirty bitmap): every
//!   cluster, as `full` plans it but with the clusters that read as zeros
//!   kept as zero actions; the copier then skips each cluster whose content
//!   the previous backup's manifest already records.
//! - `top`: only what the top layer allocates. A cluster the top layer
//!   allocates only partly is copied whole, read through the chain; a
//!   cluster that is entirely a top-layer zero range stays a zero cluster,
//!   because it hides backing data.

use std::sync::atomic::{AtomicBool, Ordering};

use qbackup_formats::extent::Allocation;
use qbackup_formats::{ClusterIndex, ClusterSize, GuestOffset};

use crate::source::{Source, SourceError};

/// Which clusters a backup copies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SyncMode {
    /// Everything the guest sees.
    Full,
    /// Only what the top layer of the chain allocates.
    Top,
    /// Only what the source's dirty bitmap marks.
    Incremental,
    /// An incremental backup by content: every cluster, compared with the
    /// previous backup's manifest.
    Changed,
}

/// What happens to a run of target clusters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Read through the chain and store.
    Copy,
    /// Store as a zero cluster.
    Zero,
}

/// A run of target clusters with one action. Clusters in no range stay
/// unallocated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PlanRange {
    /// First cluster.
    pub first: ClusterIndex,
    /// Number of clusters.
    pub count: u64,
    /// What to do with them.
    pub action: Action,
}

/// What a byte range is, for planning.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Class {
    /// Stored data (full mode) or top-layer data (top mode).
    Data,
    /// Reads as zeros (full), or a top-layer zero range (top).
    Zero,
    /// Not allocated in the top layer (top mode only).
    Below,
}

#[derive(Debug, Default, Clone, Copy)]
struct Seen {
    data: bool,
    zero: bool,
    below: bool,
}

impl Seen {
    fn add(&mut self, c: Class) {
        match c {
            Class::Data => self.data = true,
            Class::Zero => self.zero = true,
            Class::Below => self.below = true,
        }
    }

    fn action(self) -> Option<Action> {
        if self.data || (self.zero && self.below) {
            Some(Action::Copy)
        } else if self.zero && !self.below {
            // In full mode zero classes never reach here with a backing
            // file to hide; the caller maps Zero to "skip" for full mode.
            Some(Action::Zero)
        } else {
            None
        }
    }
}

/// Plans a backup of `source` into clusters of `cluster_size`.
/// Returns `None` when `cancel` becomes true on the way (planning a huge
/// sparse image can take a while, and Ctrl-C must work meanwhile).
pub fn plan(
    source: &dyn Source,
    mode: SyncMode,
    cluster_size: ClusterSize,
    cancel: &AtomicBool,
) -> Result<Option<Vec<PlanRange>>, SourceError> {
    let size = source.virtual_size();
    let mut out: Vec<PlanRange> = Vec::new();
    let mut push = |first: u64, count: u64, action: Option<Action>| {
        let action = match (mode, action) {
            (_, None) | (SyncMode::Full, Some(Action::Zero)) => return,
            (_, Some(a)) => a,
        };
        if count == 0 {
            return;
        }
        if let Some(last) = out.last_mut() {
            if last.action == action && last.first.0 + last.count == first {
                last.count += count;
                return;
            }
        }
        out.push(PlanRange {
            first: ClusterIndex(first),
            count,
            action,
        });
    };
    let cluster_end = |c: u64| cluster_size.start_of(ClusterIndex(c + 1)).0.min(size);
    let mut seen = Seen::default();
    let mut pos = 0u64;
    while pos < size {
        if cancel.load(Ordering::Relaxed) {
            return Ok(None);
        }
        let (class, len) = classify(source, mode, GuestOffset(pos), size - pos)?;
        let end = pos + len;
        let c0 = cluster_size.index_of(GuestOffset(pos)).0;
        let c_last = cluster_size.index_of(GuestOffset(end - 1)).0;
        seen.add(class);
        if end >= cluster_end(c0) {
            push(c0, 1, seen.action());
            seen = Seen::default();
        }
        if c_last > c0 {
            let mut alone = Seen::default();
            alone.add(class);
            push(c0 + 1, c_last - c0 - 1, alone.action());
            seen.add(class);
            if end >= cluster_end(c_last) {
                push(c_last, 1, seen.action());
                seen = Seen::default();
            }
        }
        pos = end;
    }
    Ok(Some(out))
}

fn classify(
    source: &dyn Source,
    mode: SyncMode,
    pos: GuestOffset,
    max: u64,
) -> Result<(Class, u64), SourceError> {
    match mode {
        SyncMode::Full | SyncMode::Changed => {
            let (e, len) = source.status(pos, max)?;
            Ok((
                if e.data && !e.zero {
                    Class::Data
                } else {
                    Class::Zero
                },
                len,
            ))
        }
        SyncMode::Incremental => {
            let (dirty, len) = source.dirty(pos, max)?;
            Ok((if dirty { Class::Data } else { Class::Below }, len))
        }
        SyncMode::Top => {
            let (e, len) = source.top_status(pos, max)?;
            let class = match e.allocation {
                Allocation::Unallocated => Class::Below,
                Allocation::Zero => Class::Zero,
                Allocation::Data if e.data_reads_zero => Class::Zero,
                Allocation::Data | Allocation::Compressed => Class::Data,
            };
            Ok((class, len))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seen_actions() {
        let s = |d, z, b| {
            Seen {
                data: d,
                zero: z,
                below: b,
            }
            .action()
        };
        assert_eq!(s(true, false, false), Some(Action::Copy));
        assert_eq!(s(false, true, false), Some(Action::Zero));
        assert_eq!(s(false, true, true), Some(Action::Copy));
        assert_eq!(s(false, false, true), None);
        assert_eq!(s(false, false, false), None);
    }
}
