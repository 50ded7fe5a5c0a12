//! The result of a successful `backup`: one human line on stderr, or one
//! JSON object on stdout (`--output=json`). The keys are a stable
//! interface, documented in docs/backup.md ("The result"); add keys, never rename or
//! drop them.

use qbackup::backup::BackupReport;
use serde_json::{json, Value};

use super::size;

/// Guest bytes of stored data per stored byte, or `None` when nothing was
/// stored.
fn ratio(r: &BackupReport) -> Option<f64> {
    let s = &r.stats;
    (s.data_stored_bytes > 0).then(|| s.data_guest_bytes as f64 / s.data_stored_bytes as f64)
}

/// Guest bytes read per second of wall time.
fn throughput(r: &BackupReport) -> f64 {
    let secs = r.elapsed.as_secs_f64();
    if secs > 0.0 {
        r.guest_bytes_read as f64 / secs
    } else {
        0.0
    }
}

/// The JSON result (keys documented in docs/backup.md).
pub fn json(r: &BackupReport) -> Value {
    let s = &r.stats;
    json!({
        "id": r.id,
        "target": r.target.display().to_string(),
        "sync": r.mode.name(),
        "fallback": r.fallback,
        "virtual-size": r.virtual_size,
        "cluster-size": r.cluster_size.bytes(),
        "guest-bytes-read": r.guest_bytes_read,
        "data-guest-bytes": s.data_guest_bytes,
        "bytes-written": s.data_stored_bytes,
        "target-size": r.target_size,
        "compression-ratio": ratio(r).map(|x| (x * 1000.0).round() / 1000.0),
        "clusters": {
            "data": s.data_clusters,
            "compressed": s.compressed_clusters,
            "passed-through": s.passthrough_clusters,
            "zero": s.zero_clusters,
            "unchanged": s.unchanged_clusters,
        },
        "elapsed-seconds": (r.elapsed.as_secs_f64() * 1000.0).round() / 1000.0,
        "bytes-per-second": throughput(r).round() as u64,
        "bitmap-cleared": r.bitmap_cleared.is_some(),
        "manifest": r.manifest.as_ref().map(|p| p.display().to_string()),
        "unreadable-ranges": s
            .unreadable
            .iter()
            .map(|&(start, length)| json!({"start": start, "length": length}))
            .collect::<Vec<_>>(),
    })
}

/// The one-line human summary.
pub fn human(r: &BackupReport) -> String {
    let ratio = ratio(r).map_or("-".to_string(), |x| format!("{x:.2}"));
    let cleared = if r.bitmap_cleared.is_some() {
        ", dirty bitmap cleared"
    } else {
        ""
    };
    format!(
        "qbackup: backup done: read {} of {}, wrote {} (ratio {}), {} clusters passed through, {:.2} s, {}/s{}",
        size::human(r.guest_bytes_read),
        size::human(r.virtual_size),
        size::human(r.stats.data_stored_bytes),
        ratio,
        r.stats.passthrough_clusters,
        r.elapsed.as_secs_f64(),
        size::human(throughput(r) as u64),
        cleared,
    )
}

/// One disk's line of a VM's backup cycle (`--qmp`, `--libvirt`): the
/// disk, what ran, where, why, then the backup's summary.
pub fn disk_line(disk: &str, sync: &str, reason: &str, r: &BackupReport) -> String {
    format!(
        "qbackup: {disk}: {sync} backup {} ({reason}): {}",
        r.target.display(),
        human(r)
            .strip_prefix("qbackup: backup done: ")
            .unwrap_or_default()
    )
}

/// One disk's JSON result in a VM's backup cycle: `head`'s keys (which
/// disk, why) first, then the backup's result keys.
pub fn disk_json(mut head: serde_json::Map<String, Value>, r: &BackupReport) -> Value {
    if let Value::Object(mut rest) = json(r) {
        head.append(&mut rest);
    }
    Value::Object(head)
}
