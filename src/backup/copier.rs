//! The copier: rayon workers read target clusters through the chain,
//! detect zeros and compress; the calling thread writes the results in
//! cluster order (see `ordered.rs` for the queue between them).
//!
//! Workers take batches of consecutive clusters (up to 1 MiB, see
//! `budget.rs`): one read per run of clusters, so a network source answers
//! one request instead of sixteen, then zero detection and compression per
//! cluster. The number of workers and the batch size come from the memory
//! budget (`budget.rs`), so many threads or large clusters cannot take the
//! process past it.
//!
//! Each cluster's manifest entry (CRC32 and BLAKE3 of its guest bytes) is
//! computed by the worker from the bytes it already holds, before
//! compression; a stored compressed stream copied as it is gets decoded for
//! it. With the previous backup's entries (an incremental backup without a
//! bitmap), a cluster whose entry is unchanged is not written: the target
//! reads it from its backing file, the previous backup.
//!
//! While the writer stores clusters, a thread of its own syncs the target
//! every 64 MiB stored (`early_sync.rs`), so the disk's work overlaps the
//! copy instead of waiting for the final sync.
//!
//! Invariants: the output bytes do not depend on the number of threads
//! (clusters are compressed independently with deterministic codecs and
//! written in index order; the batch size only groups reads); memory is
//! bounded by the batches in flight, whatever the image size: at most
//! `max(IN_FLIGHT_BYTES, (workers + 2) batches)` taken but not yet written,
//! and each worker's read buffer and compressor, with the worker count and
//! batch size planned to fit `budget::RSS_BUDGET`; a cluster that cannot be
//! read or decoded fails the whole backup (never zeros in its place).

use std::cell::RefCell;
use std::panic::AssertUnwindSafe;
use std::time::{Duration, Instant};

use qbackup_formats::codec::{self, CompressionType, Compressor};
use qbackup_formats::{ClusterIndex, ClusterSize};

use super::budget;
use super::early_sync::{EarlySync, SYNC_BYTES};
use super::ordered::Ordered;
use super::plan::{Action, PlanError, PlanRange};
use super::target::{Output, Target};
use super::{BackupError, Cancel};
use crate::manifest::{self, Entry, ManifestBuilder, ManifestReader};
use crate::source::Source;

/// How the copier works.
#[derive(Debug, Clone, Copy)]
pub struct CopyParams {
    /// Worker threads.
    pub threads: usize,
    /// Target cluster size.
    pub cluster_size: ClusterSize,
    /// Compress clusters with this codec and level.
    pub compression: Option<(CompressionType, i32)>,
    /// Copy source clusters that are already compressed with the target's
    /// codec and cluster size as they are.
    pub passthrough: bool,
    /// Clusters the source cannot read are written as zeros and reported
    /// instead of failing the backup.
    pub ignore_read_errors: bool,
    /// Rate limit in guest bytes per second.
    pub speed: Option<u64>,
    /// The source's virtual size (the last cluster may be partial).
    pub virtual_size: u64,
}

/// What the copier stored, by kind of cluster, for the backup's report.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CopyStats {
    /// Clusters stored uncompressed.
    pub data_clusters: u64,
    /// Clusters compressed by the copier.
    pub compressed_clusters: u64,
    /// Clusters whose compressed stream the source stores was copied as it
    /// is.
    pub passthrough_clusters: u64,
    /// Clusters stored as zeros (planned so, or read as all zeros).
    pub zero_clusters: u64,
    /// Clusters not stored because the previous backup already holds them
    /// (incremental backups by content): read and found equal to its
    /// manifest's entry, or zero in both without being read.
    pub unchanged_clusters: u64,
    /// Guest bytes of the clusters stored with data (uncompressed,
    /// compressed or passed through), up to the disk's end.
    pub data_guest_bytes: u64,
    /// Bytes the target stored for those clusters (metadata excluded).
    pub data_stored_bytes: u64,
    /// Guest ranges (start, length) the source could not read, written as
    /// zeros because read errors are ignored (`--on-source-error ignore`),
    /// merged, in guest order.
    pub unreadable: Vec<(u64, u64)>,
}

impl CopyStats {
    fn count(&mut self, out: &Output, guest_bytes: u64) {
        let n = match out {
            Output::Zero => {
                self.zero_clusters += 1;
                return;
            }
            Output::Data(_) => &mut self.data_clusters,
            Output::Compressed(_) => &mut self.compressed_clusters,
            Output::Stored(_) => &mut self.passthrough_clusters,
        };
        *n += 1;
        self.data_guest_bytes += guest_bytes;
    }
}

/// Receives progress, in guest bytes handled.
pub trait Progress: Sync {
    /// `bytes` more guest bytes are done.
    fn advance(&self, bytes: u64);
    /// A leftover temporary file of an earlier, killed backup was removed
    /// from TARGET's directory.
    fn removed_leftover(&self, _path: &std::path::Path, _bytes: u64) {}
}

/// Guest bytes between two early-writeback requests.
const WRITEBACK_BYTES: u64 = 32 << 20;

/// Bytes of clusters taken by workers but not yet written, at most.
const IN_FLIGHT_BYTES: u64 = 8 << 20;

/// Consecutive clusters with one action, handled by one worker; with the
/// previous backup's entries for them when unchanged clusters are skipped.
#[derive(Debug, Clone)]
struct Batch {
    first: ClusterIndex,
    count: u64,
    action: Action,
    previous: Option<Vec<Entry>>,
}

/// A cluster done by a worker: what to write (nothing when it is
/// unchanged from the previous backup) and its manifest entry.
#[derive(Debug)]
struct Done {
    out: Option<Output>,
    entry: Entry,
    /// The source could not read it; it is written as zeros.
    unreadable: bool,
}

/// Where the copier records manifest entries, and the previous backup's
/// manifest when unchanged clusters are skipped.
pub struct Recording<'a> {
    /// The new backup's manifest; `None` computes no entries.
    pub builder: Option<&'a mut ManifestBuilder>,
    /// The previous backup's manifest (same cluster size), read in step
    /// with the plan: clusters whose entry equals it are not written.
    pub skip_unchanged: Option<ManifestReader>,
}

thread_local! {
    /// A worker's read buffer (one batch), kept between batches.
    static READ_BUF: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
    static COMPRESSOR: RefCell<Option<(CompressionType, i32, Compressor)>> = const { RefCell::new(None) };
}

/// Copies the planned clusters of `source` into `target` and finishes it
/// (the caller syncs); returns what was stored.
pub fn copy(
    source: &dyn Source,
    plan: impl Iterator<Item = Result<PlanRange, PlanError>> + Send,
    params: CopyParams,
    mut target: Box<dyn Target>,
    recording: Recording<'_>,
    progress: &dyn Progress,
    cancel: &Cancel,
) -> Result<CopyStats, BackupError> {
    let Recording {
        builder,
        skip_unchanged,
    } = recording;
    let shares = budget::plan(params.threads, params.cluster_size);
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(shares.workers)
        .build()
        .map_err(|source| BackupError::StartThreads { source })?;
    let per_batch = shares.clusters_per_batch;
    let batch_bytes = params.cluster_size.bytes_in(per_batch);
    // Every worker busy, plus two finished batches for the writer to take
    // while the oldest one is still being worked on.
    let in_flight = (IN_FLIGHT_BYTES / batch_bytes).max(shares.workers as u64 + 2) as usize;
    let batches = Batches {
        plan,
        per_batch,
        current: None,
        failed: false,
        cancel,
    };
    let hash = builder.is_some();
    let batches = with_previous(batches, skip_unchanged);
    let queue = Ordered::new(batches, in_flight);
    let storage = std::sync::Arc::clone(target.storage());
    let early = EarlySync::default();

    let written = std::thread::scope(|threads| {
        threads.spawn(|| early.run(storage.as_ref()));
        // The scope waits for the syncing thread even when unwinding from
        // a panic: it must be told to stop on every way out.
        let _stop = StopOnDrop(&early);
        let written = pool.in_place_scope(|scope| {
            for _ in 0..shares.workers {
                scope.spawn(|_| work(&queue, source, &params, hash, cancel));
            }
            // The writer: this thread, in cluster order.
            // Whatever happens to the writer, the workers must be released, or
            // the scope would wait for them forever.
            let result = std::panic::catch_unwind(AssertUnwindSafe(|| {
                let out = Sink {
                    target: target.as_mut(),
                    early: &early,
                    builder,
                };
                write_in_order(&queue, out, &params, progress, cancel)
            }))
            .unwrap_or(Err(BackupError::WriterPanicked));
            queue.stop();
            result
        });
        early.stop();
        written
    });
    let stats = written?;
    if let Some(source) = early.take_failure() {
        return Err(BackupError::EarlySync { source });
    }
    target.finish().map_err(BackupError::Write)?;
    Ok(stats)
}

/// Stops the background syncs when dropped.
struct StopOnDrop<'a>(&'a EarlySync);

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        self.0.stop();
    }
}

/// A worker: takes batches until there are none, hands in their results.
fn work(
    queue: &Ordered<impl Iterator<Item = Result<Batch, BackupError>>, BatchResult>,
    source: &dyn Source,
    params: &CopyParams,
    hash: bool,
    cancel: &Cancel,
) {
    while let Some((seq, batch)) = queue.take() {
        let result = match batch {
            Err(e) => Err(e),
            Ok(_) if cancel.is_set() => Err(cancel.error()),
            Ok(batch) => {
                let first = batch.first;
                // A panic must still hand in a result, or the writer would
                // wait for this batch forever.
                std::panic::catch_unwind(AssertUnwindSafe(|| {
                    process_batch(source, params, hash, batch)
                }))
                .unwrap_or(Err(BackupError::WorkerPanicked { index: first }))
                .map(|outs| (first, outs))
            }
        };
        queue.put(seq, result);
    }
}

/// The batches of a plan, in cluster order, made as the workers take them
/// (planning overlaps copying, in memory that does not grow with the disk).
/// The plan runs inside the queue's `take`, outside the workers'
/// `catch_unwind`: an error or a panic in it (a driver bug on a hostile
/// image) becomes an error item and the end of the batches, never a lost
/// range or a hang.
struct Batches<'a, P> {
    plan: P,
    per_batch: u64,
    /// The range being cut into batches, and how many of its clusters are
    /// taken.
    current: Option<(PlanRange, u64)>,
    failed: bool,
    cancel: &'a Cancel,
}

impl<P: Iterator<Item = Result<PlanRange, PlanError>>> Iterator for Batches<'_, P> {
    type Item = Result<Batch, BackupError>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            if self.failed {
                return None;
            }
            if let Some((r, taken)) = self.current.as_mut().filter(|(r, t)| *t < r.count) {
                let count = self.per_batch.min(r.count - *taken);
                let batch = Batch {
                    first: r.first + *taken,
                    count,
                    action: r.action,
                    previous: None,
                };
                *taken += count;
                return Some(Ok(batch));
            }
            let next = std::panic::catch_unwind(AssertUnwindSafe(|| self.plan.next()))
                .unwrap_or(Some(Err(PlanError::Panicked)))?;
            match next {
                Ok(r) => self.current = Some((r, 0)),
                Err(e) => {
                    self.failed = true;
                    return Some(Err(e.into_backup_error(self.cancel)));
                }
            }
        }
    }
}

/// A batch's first cluster and what became of each of its clusters.
type BatchResult = Result<(ClusterIndex, Vec<Done>), BackupError>;

/// Attaches the previous backup's entries to each batch, read in step
/// (the plan is in cluster order). A manifest that cannot be read yields
/// a batch carrying the error's text as no entries: the worker then fails
/// it.
fn with_previous(
    batches: impl Iterator<Item = Result<Batch, BackupError>>,
    previous: Option<ManifestReader>,
) -> impl Iterator<Item = Result<Batch, BackupError>> {
    let mut previous = previous.map(|r| (r, 0u64));
    batches.map(move |b| {
        let mut b = b?;
        if let Some((reader, next)) = previous.as_mut() {
            // Skip the clusters the plan leaves out.
            while *next < b.first.0 {
                let (n, _) = reader
                    .take(b.first.0 - *next)
                    .map_err(BackupError::Manifest)?
                    .ok_or_else(|| short_manifest(reader))?;
                *next += n;
            }
            let mut entries = Vec::with_capacity(b.count as usize);
            while (entries.len() as u64) < b.count {
                let (n, e) = reader
                    .take(b.count - entries.len() as u64)
                    .map_err(BackupError::Manifest)?
                    .ok_or_else(|| short_manifest(reader))?;
                entries.extend(std::iter::repeat_n(e, n as usize));
            }
            *next += b.count;
            b.previous = Some(entries);
        }
        Ok(b)
    })
}

fn short_manifest(reader: &ManifestReader) -> BackupError {
    BackupError::Manifest(manifest::ManifestError::Invalid {
        path: reader.path().to_path_buf(),
        why: "it covers fewer clusters than the disk".into(),
    })
}

/// Where the writer puts what it takes from the queue.
struct Sink<'a> {
    target: &'a mut dyn Target,
    /// Syncs the target in the background as it grows.
    early: &'a EarlySync,
    builder: Option<&'a mut ManifestBuilder>,
}

fn write_in_order(
    queue: &Ordered<impl Iterator, BatchResult>,
    out: Sink<'_>,
    params: &CopyParams,
    progress: &dyn Progress,
    cancel: &Cancel,
) -> Result<CopyStats, BackupError> {
    let start = Instant::now();
    let mut stats = CopyStats::default();
    let size = params.virtual_size;
    let mut done = 0u64;
    let mut flushed_at = 0u64;
    let mut synced_at = 0u64;
    let Sink {
        target,
        early,
        mut builder,
    } = out;
    while let Some(result) = queue.next() {
        let (first, outs) = result?;
        if let Some(source) = early.take_failure() {
            return Err(BackupError::EarlySync { source });
        }
        if stats.data_stored_bytes - synced_at >= SYNC_BYTES {
            early.request();
            synced_at = stats.data_stored_bytes;
        }
        for (index, cluster) in (0..).map(|i| first + i).zip(outs) {
            if cluster.unreadable {
                let start = params.cluster_size.start_of(index).0;
                let len = params.cluster_size.bytes_below(index, size);
                match stats.unreadable.last_mut() {
                    Some(last) if last.0 + last.1 == start => last.1 += len,
                    _ => stats.unreadable.push((start, len)),
                }
            }
            match cluster.out {
                Some(out) => {
                    stats.count(&out, params.cluster_size.bytes_below(index, size));
                    stats.data_stored_bytes +=
                        target.put(index, out).map_err(BackupError::Write)?;
                }
                None => stats.unchanged_clusters += 1,
            }
            if let Some(b) = builder.as_deref_mut() {
                b.put(index.0, cluster.entry)
                    .map_err(BackupError::Manifest)?;
            }
            done += params.cluster_size.bytes();
            progress.advance(params.cluster_size.bytes());
            if cancel.is_set() {
                return Err(cancel.error());
            }
            if done - flushed_at >= WRITEBACK_BYTES {
                target.storage().start_writeback();
                flushed_at = done;
            }
            if let Some(speed) = params.speed {
                let due = Duration::from_secs_f64(done as f64 / speed as f64);
                // One cluster can be worth minutes at a low speed: the
                // sleep wakes up for a stop request.
                if let Some(wait) = due.checked_sub(start.elapsed()) {
                    if !cancel.sleep(wait) {
                        return Err(cancel.error());
                    }
                }
            }
        }
    }
    Ok(stats)
}

/// The outputs of a batch, in cluster order. Clusters that can be copied
/// as stored compressed streams are taken as they are (and decoded for
/// their entry); the others are read in runs (one read per run of
/// consecutive clusters), then zero-detected, hashed and compressed one by
/// one. A cluster whose entry equals the previous backup's is not written.
fn process_batch(
    source: &dyn Source,
    params: &CopyParams,
    hash: bool,
    batch: Batch,
) -> Result<Vec<Done>, BackupError> {
    let entry_of = |data: &[u8], zero: bool| {
        if hash {
            manifest::entry_of(data, zero)
        } else {
            Entry::Unknown
        }
    };
    let n = batch.count as usize;
    let unchanged = |i: usize, entry: &Entry| {
        batch
            .previous
            .as_ref()
            .is_some_and(|prev| prev[i] == *entry)
    };
    if batch.action == Action::Zero {
        return Ok((0..n)
            .map(|i| Done {
                out: (!unchanged(i, &Entry::Zero)).then_some(Output::Zero),
                entry: Entry::Zero,
                unreadable: false,
            })
            .collect());
    }
    let cs = params.cluster_size;
    let size = source.virtual_size();
    let mut outs: Vec<Option<Done>> = (0..n).map(|_| None).collect();
    if let (true, Some((codec, _))) = (params.passthrough, params.compression) {
        let mut plain = Vec::new();
        for (i, out) in outs.iter_mut().enumerate() {
            let index = batch.first + i as u64;
            let valid = cs.bytes_below(index, size);
            let stream = match source.stored_compressed(cs.start_of(index), valid, cs, codec) {
                Ok(Some(stream)) => stream,
                Ok(None) => continue,
                // Read below, cluster by cluster, where the error is handled.
                Err(_) if params.ignore_read_errors => continue,
                Err(source) => return Err(BackupError::ReadCluster { index, source }),
            };
            let entry = if hash {
                plain.resize(cs.usize(), 0);
                codec::decompress(codec, &stream, &mut plain)
                    .map_err(|source| BackupError::Compress { index, source })?;
                entry_of(&plain, is_zero(&plain))
            } else {
                Entry::Unknown
            };
            *out = Some(Done {
                out: (!unchanged(i, &entry)).then_some(Output::Stored(stream)),
                entry,
                unreadable: false,
            });
        }
    }
    READ_BUF.with(|buf| {
        read_runs(
            source,
            params,
            &batch,
            &mut buf.borrow_mut(),
            &mut outs,
            &entry_of,
            &unchanged,
        )
    })?;
    Ok(outs
        .into_iter()
        .map(|o| o.expect("every cluster handled"))
        .collect())
}

/// Reads the clusters of `batch` not handled yet (`None` in `outs`), one
/// read per run, then zero-detects, hashes and compresses them one by one.
/// `buf` is the worker's read buffer, kept between batches: only bytes past
/// the disk's end are zeroed, the rest is overwritten by the read.
fn read_runs(
    source: &dyn Source,
    params: &CopyParams,
    batch: &Batch,
    buf: &mut Vec<u8>,
    outs: &mut [Option<Done>],
    entry_of: &dyn Fn(&[u8], bool) -> Entry,
    unchanged: &dyn Fn(usize, &Entry) -> bool,
) -> Result<(), BackupError> {
    let n = outs.len();
    let cs = params.cluster_size;
    let size = source.virtual_size();
    let mut i = 0;
    while i < n {
        if outs[i].is_some() {
            i += 1;
            continue;
        }
        let run = outs[i..].iter().take_while(|o| o.is_none()).count();
        let first = batch.first + i as u64;
        let start = cs.start_of(first);
        let valid = start
            .until(qbackup_formats::GuestOffset(size))
            .min(cs.bytes_in(run as u64));
        let buf = {
            let len = cs.usize() * run;
            if buf.len() < len {
                buf.resize(len, 0);
            }
            let buf = &mut buf[..len];
            buf[valid as usize..].fill(0);
            buf
        };
        let mut unreadable = vec![false; run];
        if let Err(err) = source.read(start, &mut buf[..valid as usize]) {
            if !params.ignore_read_errors {
                return Err(BackupError::ReadCluster {
                    index: first,
                    source: err,
                });
            }
            // Find the clusters that fail alone; they read as zeros.
            buf.fill(0);
            for (k, chunk) in buf.chunks_exact_mut(cs.usize()).enumerate() {
                let index = first + k as u64;
                let valid = cs.bytes_below(index, size) as usize;
                if source
                    .read(cs.start_of(index), &mut chunk[..valid])
                    .is_err()
                {
                    chunk.fill(0);
                    unreadable[k] = true;
                }
            }
        }
        for (k, cluster) in buf.chunks_exact(cs.usize()).enumerate() {
            let zero = is_zero(cluster);
            let entry = entry_of(cluster, zero);
            outs[i + k] = Some(Done {
                out: if unchanged(i + k, &entry) {
                    None
                } else {
                    Some(finish_cluster(params, first + k as u64, cluster, zero)?)
                },
                entry,
                unreadable: unreadable[k],
            });
        }
        i += run;
    }
    Ok(())
}

/// Compression of one cluster's bytes (`zero`: they are all zeros).
fn finish_cluster(
    params: &CopyParams,
    index: ClusterIndex,
    data: &[u8],
    zero: bool,
) -> Result<Output, BackupError> {
    if zero {
        return Ok(Output::Zero);
    }
    let Some((codec, level)) = params.compression else {
        return Ok(Output::Data(data.to_vec()));
    };
    let compress_err = |source| BackupError::Compress { index, source };
    COMPRESSOR.with(|slot| {
        let mut slot = slot.borrow_mut();
        if !matches!(&*slot, Some((c, l, _)) if *c == codec && *l == level) {
            let c = Compressor::new(codec, level).map_err(compress_err)?;
            *slot = Some((codec, level, c));
        }
        let (_, _, compressor) = slot.as_mut().expect("just set");
        let mut packed = Vec::new();
        if compressor
            .compress(data, &mut packed, data.len())
            .map_err(compress_err)?
        {
            packed.shrink_to_fit();
            Ok(Output::Compressed(packed))
        } else {
            Ok(Output::Data(data.to_vec()))
        }
    })
}

/// True when every byte is zero. Checks 4 KiB blocks with a branch-free
/// inner loop the compiler vectorises, and stops at the first non-zero block.
pub fn is_zero(buf: &[u8]) -> bool {
    buf.chunks(4096).all(|block| {
        let words = block.chunks_exact(16);
        let tail = words.remainder();
        let acc = words.fold(0u128, |a, w| {
            a | u128::from_ne_bytes(w.try_into().expect("16 bytes"))
        });
        acc == 0 && tail.iter().all(|&b| b == 0)
    })
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicBool;
    use std::sync::Arc;

    use qbackup_formats::storage::memory::MemoryStorage;
    use qbackup_formats::storage::Storage;

    use super::*;
    use crate::backup::plan::{testing::Alternating, Planner, SyncMode};
    use crate::backup::target::RawTarget;

    struct NoProgress;

    impl Progress for NoProgress {
        fn advance(&self, _bytes: u64) {}
    }

    /// A panic in the planner, which runs inside the queue where the
    /// workers' `catch_unwind` does not reach, fails the copy with an
    /// internal error: no range is lost, and the background-sync thread
    /// is stopped (it used to keep the scope, and the backup, waiting).
    #[test]
    fn a_planner_panic_fails_the_copy() {
        let src = Alternating {
            size: 8 << 20,
            run: 64 << 10,
            asked: Default::default(),
            panic_at: Some(4 << 20),
        };
        let storage: Arc<dyn Storage> = Arc::new(MemoryStorage::writable("target", Vec::new()));
        let cs = ClusterSize::from_bits(16).unwrap();
        let target = Box::new(RawTarget::new(storage, src.size, cs, false));
        let params = CopyParams {
            threads: 2,
            cluster_size: cs,
            compression: None,
            passthrough: false,
            ignore_read_errors: false,
            speed: None,
            virtual_size: src.size,
        };
        let (tx, rx) = std::sync::mpsc::channel();
        // Not a scoped thread: if the copy hangs, the test still fails.
        std::thread::spawn(move || {
            let (cancel, flag) = (Cancel::new(), AtomicBool::new(false));
            let plan = Planner::new(&src, SyncMode::Incremental, cs, &flag);
            let recording = Recording {
                builder: None,
                skip_unchanged: None,
            };
            let r = copy(&src, plan, params, target, recording, &NoProgress, &cancel);
            let _ = tx.send(r.map(|_| ()));
        });
        let r = rx
            .recv_timeout(Duration::from_secs(30))
            .expect("the copy hung");
        assert!(matches!(r, Err(BackupError::PlannerPanicked)), "{r:?}");
    }

    #[test]
    fn zero_detection() {
        assert!(is_zero(&[0u8; 4096]));
        assert!(is_zero(&[]));
        let mut b = vec![0u8; 4099];
        b[4098] = 1;
        assert!(!is_zero(&b));
        b[4098] = 0;
        b[17] = 1;
        assert!(!is_zero(&b));
    }
}
