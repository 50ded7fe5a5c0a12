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

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};

use qbackup_formats::extent::Allocation;
use qbackup_formats::{ClusterIndex, ClusterSize, GuestOffset};

use super::{BackupError, Cancel};
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

impl SyncMode {
    /// Its name in manifests and JSON results.
    pub fn name(self) -> &'static str {
        match self {
            SyncMode::Full => "full",
            SyncMode::Top => "top",
            SyncMode::Incremental => "incremental",
            SyncMode::Changed => "incremental-by-content",
        }
    }
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

/// Why planning stopped.
#[derive(Debug)]
pub enum PlanError {
    /// The source could not answer a status question.
    Source(SourceError),
    /// A stop was requested (planning a huge sparse image can take a
    /// while, and Ctrl-C must work meanwhile).
    Cancelled,
    /// A bug: planning panicked (the copier catches it).
    Panicked,
}

impl PlanError {
    /// The backup's error for it.
    pub fn into_backup_error(self, cancel: &Cancel) -> BackupError {
        match self {
            PlanError::Source(e) => BackupError::Source(e),
            PlanError::Cancelled => cancel.error(),
            PlanError::Panicked => BackupError::PlannerPanicked,
        }
    }
}

/// Plans a backup of `source` into clusters of `cluster_size`, lazily:
/// an iterator of ranges in cluster order, each yielded once it can no
/// longer grow. Planning runs ahead of the copier only as far as the copier
/// takes ranges, so memory does not depend on how many ranges the disk has
/// (a hostile allocation pattern of alternating clusters would need
/// gigabytes as a list). After an error it yields nothing more.
pub struct Planner<'a> {
    source: &'a dyn Source,
    mode: SyncMode,
    cluster_size: ClusterSize,
    cancel: &'a AtomicBool,
    size: u64,
    /// Next guest byte to classify.
    pos: u64,
    /// What the cluster under way has seen so far.
    seen: Seen,
    /// The last range, which may still grow.
    open: Option<PlanRange>,
    /// Complete ranges not yet yielded (at most two per step).
    ready: VecDeque<PlanRange>,
    done: bool,
}

impl<'a> Planner<'a> {
    /// A planner over the whole of `source`.
    pub fn new(
        source: &'a dyn Source,
        mode: SyncMode,
        cluster_size: ClusterSize,
        cancel: &'a AtomicBool,
    ) -> Self {
        Planner {
            source,
            mode,
            cluster_size,
            cancel,
            size: source.virtual_size(),
            pos: 0,
            seen: Seen::default(),
            open: None,
            ready: VecDeque::new(),
            done: false,
        }
    }

    fn push(&mut self, first: u64, count: u64, action: Option<Action>) {
        let action = match (self.mode, action) {
            (_, None) | (SyncMode::Full, Some(Action::Zero)) => return,
            (_, Some(a)) => a,
        };
        if count == 0 {
            return;
        }
        if let Some(last) = self.open.as_mut() {
            if last.action == action && last.first.0 + last.count == first {
                last.count += count;
                return;
            }
        }
        let range = PlanRange {
            first: ClusterIndex(first),
            count,
            action,
        };
        if let Some(done) = self.open.replace(range) {
            self.ready.push_back(done);
        }
    }

    /// Classifies the next extent and records the clusters it completes.
    fn step(&mut self) -> Result<(), SourceError> {
        let (size, cs) = (self.size, self.cluster_size);
        let cluster_end = |c: u64| cs.start_of(ClusterIndex(c + 1)).0.min(size);
        let pos = self.pos;
        let (class, len) = classify(self.source, self.mode, GuestOffset(pos), size - pos)?;
        let end = pos + len;
        let c0 = cs.index_of(GuestOffset(pos)).0;
        let c_last = cs.index_of(GuestOffset(end - 1)).0;
        self.seen.add(class);
        if end >= cluster_end(c0) {
            let action = self.seen.action();
            self.push(c0, 1, action);
            self.seen = Seen::default();
        }
        if c_last > c0 {
            let mut alone = Seen::default();
            alone.add(class);
            self.push(c0 + 1, c_last - c0 - 1, alone.action());
            self.seen.add(class);
            if end >= cluster_end(c_last) {
                let action = self.seen.action();
                self.push(c_last, 1, action);
                self.seen = Seen::default();
            }
        }
        self.pos = end;
        Ok(())
    }
}

impl Iterator for Planner<'_> {
    type Item = Result<PlanRange, PlanError>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            if let Some(r) = self.ready.pop_front() {
                return Some(Ok(r));
            }
            if self.done {
                return self.open.take().map(Ok);
            }
            if self.pos >= self.size {
                self.done = true;
                continue;
            }
            let stop = |s: &mut Self, e| {
                s.done = true;
                s.open = None;
                s.ready.clear();
                Some(Err(e))
            };
            if self.cancel.load(Ordering::Relaxed) {
                return stop(self, PlanError::Cancelled);
            }
            if let Err(e) = self.step() {
                return stop(self, PlanError::Source(e));
            }
        }
    }
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

/// A test source for the planner and the copier.
#[cfg(test)]
pub(crate) mod testing {
    use super::*;

    /// A source whose dirty bitmap alternates every `run` bytes (dirty
    /// first) and counts the questions asked.
    pub(crate) struct Alternating {
        pub size: u64,
        pub run: u64,
        pub asked: std::sync::atomic::AtomicU64,
        /// `dirty` panics from this offset on (a driver bug).
        pub panic_at: Option<u64>,
    }

    impl Source for Alternating {
        fn name(&self) -> &std::path::Path {
            std::path::Path::new("alternating")
        }
        fn virtual_size(&self) -> u64 {
            self.size
        }
        fn cluster_size(&self) -> Option<ClusterSize> {
            None
        }
        fn dirty(&self, offset: GuestOffset, max_len: u64) -> Result<(bool, u64), SourceError> {
            self.asked.fetch_add(1, Ordering::Relaxed);
            if self.panic_at.is_some_and(|p| offset.0 >= p) {
                panic!("a planner bug");
            }
            let left = self.run - offset.0 % self.run;
            Ok(((offset.0 / self.run) % 2 == 0, left.min(max_len)))
        }
        /// Every byte is data of the one layer (reading 0x5a).
        fn status(
            &self,
            offset: GuestOffset,
            max_len: u64,
        ) -> Result<(qbackup_formats::Extent, u64), SourceError> {
            let extent = qbackup_formats::Extent {
                present: true,
                zero: false,
                data: true,
                compressed: false,
                depth: 0,
                host: None,
            };
            Ok((extent, max_len.min(self.size - offset.0)))
        }
        fn top_status(
            &self,
            offset: GuestOffset,
            max_len: u64,
        ) -> Result<(qbackup_formats::extent::LayerExtent, u64), SourceError> {
            let extent = qbackup_formats::extent::LayerExtent {
                allocation: qbackup_formats::extent::Allocation::Data,
                host: None,
                data_reads_zero: false,
            };
            Ok((extent, max_len.min(self.size - offset.0)))
        }
        fn read(&self, _: GuestOffset, buf: &mut [u8]) -> Result<(), SourceError> {
            buf.fill(0x5a);
            Ok(())
        }
        /// Nothing is stored compressed.
        fn stored_compressed(
            &self,
            _: GuestOffset,
            _: u64,
            _: ClusterSize,
            _: qbackup_formats::CompressionType,
        ) -> Result<Option<Vec<u8>>, SourceError> {
            Ok(None)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::testing::Alternating;
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

    /// The plan is made as it is taken: a disk of 64 Ti alternating dirty
    /// and clean clusters (2^29 ranges, 12 GiB as a list) yields its first
    /// ranges after a handful of questions, and ranges stay merged and in
    /// order. A stop request ends it with `Cancelled`, then nothing.
    #[test]
    fn planning_is_lazy_and_bounded() {
        let cs = ClusterSize::from_bits(16).unwrap();
        let src = Alternating {
            size: 64 << 40,
            run: 64 << 10,
            asked: Default::default(),
            panic_at: None,
        };
        let cancel = AtomicBool::new(false);
        let mut planner = Planner::new(&src, SyncMode::Incremental, cs, &cancel);
        let first: Vec<PlanRange> = planner.by_ref().take(1000).map(|r| r.unwrap()).collect();
        for (i, r) in first.iter().enumerate() {
            assert_eq!(
                (r.first.0, r.count, r.action),
                (2 * i as u64, 1, Action::Copy)
            );
        }
        assert!(src.asked.load(Ordering::Relaxed) <= 2002);
        // Whole runs merge into one range.
        let src2 = Alternating {
            size: 8 << 20,
            run: 1 << 20,
            asked: Default::default(),
            panic_at: None,
        };
        let all: Vec<PlanRange> = Planner::new(&src2, SyncMode::Incremental, cs, &cancel)
            .map(|r| r.unwrap())
            .collect();
        let spans: Vec<(u64, u64)> = all.iter().map(|r| (r.first.0, r.count)).collect();
        assert_eq!(spans, [(0, 16), (32, 16), (64, 16), (96, 16)]);
        // A stop request.
        cancel.store(true, Ordering::Relaxed);
        assert!(matches!(planner.next(), Some(Err(PlanError::Cancelled))));
        assert!(planner.next().is_none());
    }
}
