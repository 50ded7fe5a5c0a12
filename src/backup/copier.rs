//! The copier: rayon workers read target clusters through the chain,
//! detect zeros and compress; the calling thread writes the results in
//! cluster order (see `ordered.rs` for the queue between them).
//!
//! Invariants: the output bytes do not depend on the number of threads
//! (clusters are compressed independently with deterministic codecs and
//! written in index order); memory is bounded by the clusters in flight
//! (`IN_FLIGHT_BYTES`), whatever the image size; a cluster that cannot be read or decoded fails
//! the whole backup (never zeros in its place).

use std::cell::RefCell;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use qbackup_formats::codec::{self, CompressionType, Compressor};
use qbackup_formats::image::ImageError;
use qbackup_formats::qcow2::Piece;
use qbackup_formats::{Chain, ClusterIndex, GuestOffset};

use super::ordered::Ordered;
use super::plan::{Action, PlanRange};
use super::target::{Output, Target};
use super::BackupError;

/// How the copier works.
#[derive(Debug, Clone, Copy)]
pub struct CopyParams {
    /// Worker threads.
    pub threads: usize,
    /// Target cluster size in bytes.
    pub cluster_size: u64,
    /// Compress clusters with this codec and level.
    pub compression: Option<(CompressionType, i32)>,
    /// Copy source clusters that are already compressed with the target's
    /// codec and cluster size as they are.
    pub passthrough: bool,
    /// Rate limit in guest bytes per second.
    pub speed: Option<u64>,
}

/// Receives progress, in guest bytes handled.
pub trait Progress: Sync {
    /// `bytes` more guest bytes are done.
    fn advance(&self, bytes: u64);
}

/// Guest bytes between two early-writeback requests.
const WRITEBACK_BYTES: u64 = 32 << 20;

/// Bytes of clusters taken by workers but not yet written, at most.
const IN_FLIGHT_BYTES: u64 = 8 << 20;

thread_local! {
    static COMPRESSOR: RefCell<Option<(CompressionType, i32, Compressor)>> = const { RefCell::new(None) };
}

/// Copies the planned clusters of `chain` into `target`.
pub fn copy(
    chain: &Chain,
    plan: &[PlanRange],
    params: CopyParams,
    mut target: Box<dyn Target>,
    progress: &dyn Progress,
    cancel: &AtomicBool,
) -> Result<std::fs::File, BackupError> {
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(params.threads)
        .build()
        .map_err(|e| BackupError::Config(format!("cannot start worker threads: {e}")))?;
    let in_flight = (IN_FLIGHT_BYTES / params.cluster_size).max(params.threads as u64 * 4) as usize;
    let eligible = passthrough_layers(chain, &params);
    let clusters = plan
        .iter()
        .flat_map(|r| (r.first.0..r.first.0 + r.count).map(move |c| (ClusterIndex(c), r.action)));
    let queue = Ordered::new(clusters, in_flight);

    let written = pool.in_place_scope(|scope| {
        for _ in 0..params.threads {
            scope.spawn(|_| {
                while let Some((seq, (idx, action))) = queue.take() {
                    let result = if cancel.load(Ordering::Relaxed) {
                        Err(BackupError::Interrupted)
                    } else {
                        // A panic must still hand in a result, or the writer
                        // would wait for this cluster forever.
                        std::panic::catch_unwind(AssertUnwindSafe(|| {
                            process(chain, &params, &eligible, idx, action)
                        }))
                        .unwrap_or_else(|_| {
                            Err(BackupError::Internal(format!(
                                "worker failed on cluster {}",
                                idx.0
                            )))
                        })
                        .map(|out| (idx, out))
                    };
                    queue.put(seq, result);
                }
            });
        }
        // The writer: this thread, in cluster order.
        // Whatever happens to the writer, the workers must be released, or
        // the scope would wait for them forever.
        let result = std::panic::catch_unwind(AssertUnwindSafe(|| {
            write_in_order(&queue, target.as_mut(), &params, progress, cancel)
        }))
        .unwrap_or_else(|_| Err(BackupError::Internal("writer failed".into())));
        queue.stop();
        result
    });
    written?;
    target.finish().map_err(BackupError::Write)
}

fn write_in_order(
    queue: &Ordered<impl Iterator, Result<(ClusterIndex, Output), BackupError>>,
    target: &mut dyn Target,
    params: &CopyParams,
    progress: &dyn Progress,
    cancel: &AtomicBool,
) -> Result<(), BackupError> {
    let start = Instant::now();
    let mut done = 0u64;
    let mut flushed_at = 0u64;
    while let Some(result) = queue.next() {
        let (index, out) = result?;
        target.put(index, out).map_err(BackupError::Write)?;
        done += params.cluster_size;
        progress.advance(params.cluster_size);
        if cancel.load(Ordering::Relaxed) {
            return Err(BackupError::Interrupted);
        }
        if done - flushed_at >= WRITEBACK_BYTES {
            super::target::start_writeback(target.file());
            flushed_at = done;
        }
        if let Some(speed) = params.speed {
            let due = Duration::from_secs_f64(done as f64 / speed as f64);
            if let Some(wait) = due.checked_sub(start.elapsed()) {
                std::thread::sleep(wait);
            }
        }
    }
    Ok(())
}

/// Which layers hold compressed clusters that can be copied as they are.
fn passthrough_layers(chain: &Chain, params: &CopyParams) -> Vec<bool> {
    chain
        .layers()
        .iter()
        .map(|l| match (l.as_qcow2(), params.compression) {
            (Some(q), Some((codec, _))) if params.passthrough => {
                q.header().cluster_size() == params.cluster_size
                    && q.header().compression_type == codec
            }
            _ => false,
        })
        .collect()
}

fn process(
    chain: &Chain,
    params: &CopyParams,
    eligible: &[bool],
    index: ClusterIndex,
    action: Action,
) -> Result<Output, BackupError> {
    if action == Action::Zero {
        return Ok(Output::Zero);
    }
    let cs = params.cluster_size;
    let start = index.0 * cs;
    let valid = cs.min(chain.virtual_size() - start) as usize;
    if eligible.iter().any(|&e| e) {
        if let Some(stream) = compressed_as_is(chain, eligible, start, valid as u64, cs)? {
            return Ok(Output::Compressed(stream));
        }
    }
    let mut buf = vec![0u8; cs as usize];
    chain.read(GuestOffset(start), &mut buf[..valid])?;
    if is_zero(&buf) {
        return Ok(Output::Zero);
    }
    let Some((codec, level)) = params.compression else {
        return Ok(Output::Data(buf));
    };
    COMPRESSOR.with(|slot| {
        let mut slot = slot.borrow_mut();
        if !matches!(&*slot, Some((c, l, _)) if *c == codec && *l == level) {
            let c = Compressor::new(codec, level).map_err(BackupError::Compress)?;
            *slot = Some((codec, level, c));
        }
        let (_, _, compressor) = slot.as_mut().expect("just set");
        let mut packed = Vec::new();
        if compressor
            .compress(&buf, &mut packed, buf.len())
            .map_err(BackupError::Compress)?
        {
            packed.shrink_to_fit();
            Ok(Output::Compressed(packed))
        } else {
            Ok(Output::Data(buf))
        }
    })
}

/// The source's stored stream for this cluster when it can be copied as it
/// is; validated by decoding it, so a damaged cluster fails the backup.
fn compressed_as_is(
    chain: &Chain,
    eligible: &[bool],
    start: u64,
    valid: u64,
    cs: u64,
) -> Result<Option<Vec<u8>>, BackupError> {
    let (ext, len) = chain.status(GuestOffset(start), valid)?;
    let depth = ext.depth as usize;
    if !ext.compressed || len != valid || !eligible.get(depth).copied().unwrap_or(false) {
        return Ok(None);
    }
    let layer = &chain.layers()[depth];
    let Some(q) = layer.as_qcow2() else {
        return Ok(None);
    };
    let err = |e| BackupError::Source(ImageError::new(layer.path(), e));
    let (piece, _) = q.locate(GuestOffset(start), valid, true).map_err(err)?;
    let Piece::Compressed(guest, desc) = piece else {
        return Ok(None);
    };
    if guest.0 != start {
        return Ok(None);
    }
    let bytes = q.compressed_bytes(desc).map_err(err)?;
    let mut scratch = vec![0u8; cs as usize + 1];
    // A stream QEMU reads but whose exact end we cannot prove (no end marker
    // at the cluster size, several zstd frames) is decoded and compressed
    // again instead; decoding it validates it.
    let Ok(n) = codec::stream_len(q.header().compression_type, &bytes, &mut scratch) else {
        return Ok(None);
    };
    if n == 0 || n as u64 >= cs {
        return Ok(None);
    }
    let mut bytes = bytes;
    bytes.truncate(n);
    Ok(Some(bytes))
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
    use super::is_zero;

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
