//! The memory budget of a backup: how many workers run and how large a
//! batch each takes, so that peak RSS stays under [`RSS_BUDGET`] whatever
//! the cluster size and `--threads`.
//!
//! Why: each worker holds its read buffer (one batch), the compressed
//! results of the batches in flight, and a codec context sized for the
//! cluster; measured on the realistic image, about 2.3 MiB per worker with
//! 64 KiB clusters and 8 MiB with 2 MiB clusters. With 256 threads (the
//! `--threads` cap on a 64-core host) that would be 600 MiB to 2 GiB. The
//! rest of the process (the writer's tables and buffer, the source's L2
//! caches) is about 8 MiB plus six clusters.
//!
//! The model is deliberately pessimistic (3 MiB and 10 MiB per worker for
//! the two cases above). Smaller batches come first (they cost only
//! request size on an NBD source); the worker count is cut only when even
//! batches of one cluster (at least 64 KiB) would not fit.
//!
//! Invariant: `base + workers * per_worker(batch) <= RSS_BUDGET` for the
//! plan returned, unless a single worker alone exceeds it (then one
//! worker runs: a backup is never refused for memory).

use qbackup_formats::ClusterSize;

/// Peak RSS a backup plans for, with a margin below the 64 MiB promise.
pub const RSS_BUDGET: u64 = 60 << 20;

/// The largest batch a worker takes (one read per batch).
pub const MAX_BATCH_BYTES: u64 = 1 << 20;

/// The smallest batch, in bytes, when clusters are smaller.
const MIN_BATCH_BYTES: u64 = 64 << 10;

/// How the copier's work is divided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WorkPlan {
    /// Worker threads to start.
    pub workers: usize,
    /// Clusters per batch.
    pub clusters_per_batch: u64,
}

/// Memory outside the workers: the writer's L2 table, refcount block and
/// buffers, the source's L2 caches, the manifest.
fn base(cs: ClusterSize) -> u64 {
    (8 << 20) + 6 * cs.bytes()
}

/// Memory one worker holds with batches of `batch` bytes: its read buffer,
/// the results of about one batch in flight, and a codec context with its
/// output buffer (at least 1 MiB: zstd's tables for small inputs).
fn per_worker(cs: ClusterSize, batch: u64) -> u64 {
    2 * batch + (3 * cs.bytes()).max(1 << 20)
}

/// The plan for `threads` requested workers and clusters of `cs`.
pub fn plan(threads: usize, cs: ClusterSize) -> WorkPlan {
    let threads = threads.max(1);
    let cluster = cs.bytes();
    let for_workers = RSS_BUDGET.saturating_sub(base(cs));
    let fits = |batch: u64| for_workers / per_worker(cs, batch);
    // Halve the batch until every requested worker fits, down to one
    // cluster (or 64 KiB of small clusters).
    let smallest = cluster
        .max(MIN_BATCH_BYTES)
        .min(MAX_BATCH_BYTES.max(cluster));
    let mut batch = MAX_BATCH_BYTES.max(cluster);
    while batch > smallest && fits(batch) < threads as u64 {
        batch = (batch / 2).max(smallest);
    }
    let workers = (fits(batch) as usize).clamp(1, threads);
    WorkPlan {
        workers,
        clusters_per_batch: (batch / cluster).max(1),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cs(bits: u32) -> ClusterSize {
        ClusterSize::from_bits(bits).expect("valid cluster size")
    }

    #[test]
    fn few_threads_keep_full_batches() {
        for bits in [9, 12, 16] {
            let p = plan(2, cs(bits));
            assert_eq!(p.workers, 2);
            assert_eq!(p.clusters_per_batch << bits, MAX_BATCH_BYTES);
        }
        let p = plan(2, cs(21));
        assert_eq!((p.workers, p.clusters_per_batch), (2, 1));
    }

    #[test]
    fn the_budget_holds_for_every_cluster_size_and_thread_count() {
        for bits in 9..=21 {
            for threads in [1, 2, 3, 8, 16, 64, 256, 100_000] {
                let c = cs(bits);
                let p = plan(threads, c);
                let batch = p.clusters_per_batch * c.bytes();
                assert!(p.workers >= 1 && p.workers <= threads);
                assert!(batch >= c.bytes() && batch <= MAX_BATCH_BYTES.max(c.bytes()));
                let total = base(c) + p.workers as u64 * per_worker(c, batch);
                assert!(
                    total <= RSS_BUDGET || p.workers == 1,
                    "{bits} bits, {threads} threads: {p:?} needs {total}"
                );
            }
        }
    }

    #[test]
    fn many_threads_get_smaller_batches_before_fewer_workers() {
        // 64 KiB clusters: 16 workers fit with 1 MiB batches; 32 need
        // smaller ones; 256 are cut.
        assert_eq!(plan(16, cs(16)).clusters_per_batch, 16);
        let p = plan(32, cs(16));
        assert_eq!(p.workers, 32);
        assert!(p.clusters_per_batch < 16);
        let p = plan(256, cs(16));
        assert!(p.workers < 256 && p.workers >= 32, "{p:?}");
        assert_eq!(p.clusters_per_batch, 1);
        // 2 MiB clusters: a handful of workers.
        let p = plan(8, cs(21));
        assert!(p.workers >= 3 && p.workers < 8, "{p:?}");
    }
}
