//! Issue 19: `verify` OK means QEMU can restore the backup, and the reader
//! refuses what QEMU refuses when it opens a qcow2.
//!
//! - A generated mutation test: every byte of the used part of the header
//!   cluster of a few real backups (full with data and compressed clusters
//!   from a source with a dirty bitmap, a `--sync top` backup with a
//!   backing file, and a backup QEMU took internal snapshots of) is overwritten with a deterministic sample of values
//!   (each bit flipped, 0x00, 0xff). Whenever `qemu-img info` refuses the
//!   image, `verify`, `map`, `info`, `compare` and `backup` refuse it too (one line,
//!   no panic); whenever `verify` says OK, `qemu-img compare` against the
//!   original says identical and `qemu-img check` is clean. The source's
//!   bitmaps extension is mutated too (the reader alone: no manifest).
//! - Regression tests for the four bytes of the issue by name, and for the
//!   metadata errors `qemu-img check` reports (the corrupt bit, reserved
//!   bits in L1/L2/refcount table entries, leaked clusters). The metadata
//!   flip property is in `qemu_parity_prop.rs`.

mod common;

use std::fs;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use common::parity::{
    backups, copy, qbackup, qbackup_refuses, qemu_opens, run, splitmix, verify_ok_is_restorable,
    CLUSTER, NOISE,
};
use common::qcow2::{patch, patch_u32, patch_u64, patch_u8, read_u64, Layout};

/// End of the used part of the header cluster: the header, its
/// extensions up to the end marker, and the backing file name.
fn used_end(path: &Path) -> u64 {
    let f = fs::File::open(path).unwrap();
    let mut b = vec![0u8; CLUSTER as usize];
    f.read_exact_at(&mut b, 0).unwrap();
    let be32 = |at: usize| u32::from_be_bytes(b[at..at + 4].try_into().unwrap()) as usize;
    let mut at = be32(100);
    while at + 8 <= b.len() {
        let (kind, len) = (be32(at), be32(at + 4));
        at += 8;
        if kind == 0 {
            break;
        }
        at += len.div_ceil(8) * 8;
    }
    let name_end = u64::from_be_bytes(b[8..16].try_into().unwrap()) + be32(16) as u64;
    (at as u64).max(name_end)
}

/// The bytes named in issue 19, mutated with every value of the sample.
const NAMED: [u64; 4] = [8, 48, 61, 116];

/// The (offset, value) mutations for a backup: a deterministic sample of
/// {each bit flipped, 0x00, 0xff} per byte (all of them for the named
/// bytes, two for the fixed header and for extensions and the backing
/// name, one for an eighth of the rest of the first 512 bytes).
fn mutations(path: &Path, seed: u64) -> Vec<(u64, u8)> {
    let end = used_end(path).max(512);
    let used = used_end(path);
    let f = fs::File::open(path).unwrap();
    let mut b = vec![0u8; end as usize];
    f.read_exact_at(&mut b, 0).unwrap();
    let mut out = Vec::new();
    for at in 0..end {
        let orig = b[at as usize];
        let mut values: Vec<u8> = (0..8).map(|k| orig ^ (1 << k)).collect();
        values.extend([0x00, 0xff]);
        values.retain(|&v| v != orig);
        values.dedup();
        let take = if NAMED.contains(&at) {
            values.len()
        } else if at < used {
            2
        } else if splitmix(seed ^ at) % 8 == 0 {
            // Past the end marker: ignored by QEMU and by us alike.
            1
        } else {
            0
        };
        let mut r = splitmix(seed ^ at.wrapping_mul(0x1000_0001));
        for _ in 0..take.min(values.len()) {
            let i = (r % values.len() as u64) as usize;
            out.push((at, values.swap_remove(i)));
            r = splitmix(r);
        }
    }
    out
}

/// Four values of every byte of the bitmaps extension (type, length and
/// data) of `path`.
fn bitmap_extension_mutations(path: &Path) -> Vec<(u64, u8)> {
    let at = common::qcow2::qcow2_header_extension(path, common::qcow2::ext::BITMAPS);
    let b = common::qcow2::read_bytes(path, at, 32);
    let mut out = Vec::new();
    for (i, &orig) in b.iter().enumerate() {
        // The low and the high bit flipped, 0x00 and 0xff.
        let mut values = vec![orig ^ 1, orig ^ 0x80, 0x00, 0xff];
        values.retain(|&v| v != orig);
        values.dedup();
        out.extend(values.into_iter().map(|v| (at + i as u64, v)));
    }
    out
}

#[derive(Default)]
struct Counts {
    trials: AtomicU64,
    qemu_refused: AtomicU64,
    we_refused: AtomicU64,
    verify_ok_identical: AtomicU64,
    misses: Mutex<Vec<String>>,
}

#[test]
fn header_mutations_qemu_refuses_are_refused_and_verify_ok_is_restorable() {
    let t = backups();
    let d = t.path();
    let counts = Counts::default();
    let started = std::time::Instant::now();
    // The source has no manifest (nothing to verify) but a bitmaps
    // extension: its mutations check the reader alone.
    for (n, backup) in ["full.qcow2", "top.qcow2", "snap.qcow2", "src.qcow2"]
        .into_iter()
        .enumerate()
    {
        let list = if backup == "src.qcow2" {
            bitmap_extension_mutations(&d.join(backup))
        } else {
            mutations(&d.join(backup), 19 + n as u64)
        };
        let workers = 2;
        std::thread::scope(|s| {
            for w in 0..workers {
                let list = &list;
                let counts = &counts;
                s.spawn(move || {
                    let name = format!("m{w}-{backup}");
                    let path = copy(d, backup, &name);
                    let file = fs::OpenOptions::new().write(true).open(&path).unwrap();
                    let orig = fs::read(d.join(backup)).unwrap();
                    for &(at, v) in list.iter().skip(w).step_by(workers) {
                        file.write_all_at(&[v], at).unwrap();
                        counts.trials.fetch_add(1, Ordering::Relaxed);
                        let what = format!("{backup} byte {at} = {v:#04x}");
                        if !qemu_opens(d, &name) {
                            counts.qemu_refused.fetch_add(1, Ordering::Relaxed);
                            match qbackup_refuses(d, &name, backup) {
                                None => {
                                    counts.we_refused.fetch_add(1, Ordering::Relaxed);
                                }
                                Some(why) => counts
                                    .misses
                                    .lock()
                                    .unwrap()
                                    .push(format!("{what}: QEMU refuses, {why}")),
                            }
                        } else if d.join(format!("{backup}.manifest")).exists() {
                            let (verified, miss) = verify_ok_is_restorable(d, &name, backup);
                            match miss {
                                Some(why) => {
                                    counts.misses.lock().unwrap().push(format!("{what}: {why}"))
                                }
                                None if verified => {
                                    counts.verify_ok_identical.fetch_add(1, Ordering::Relaxed);
                                }
                                None => {
                                    counts.we_refused.fetch_add(1, Ordering::Relaxed);
                                }
                            }
                        }
                        file.write_all_at(&orig[at as usize..at as usize + 1], at)
                            .unwrap();
                    }
                });
            }
        });
    }
    let misses = counts.misses.into_inner().unwrap();
    println!(
        "header mutations: {} trials, QEMU refused {}, we refused {}, verify OK and identical {}, misses {} ({:.1} s)",
        counts.trials.load(Ordering::Relaxed),
        counts.qemu_refused.load(Ordering::Relaxed),
        counts.we_refused.load(Ordering::Relaxed),
        counts.verify_ok_identical.load(Ordering::Relaxed),
        misses.len(),
        started.elapsed().as_secs_f64()
    );
    assert!(
        misses.is_empty(),
        "{} misses:\n{}",
        misses.len(),
        misses
            .iter()
            .take(40)
            .cloned()
            .collect::<Vec<_>>()
            .join("\n")
    );
    assert!(counts.qemu_refused.load(Ordering::Relaxed) > 0);
    // Every mutation QEMU still opens is caught too: the manifest records
    // the image's identity (its header cluster always among the bytes it
    // covers), so a changed header never verifies, whatever it reads.
    assert_eq!(counts.verify_ok_identical.load(Ordering::Relaxed), 0);
}

/// One damaged copy of `backup`: QEMU refuses it, and so does every
/// qbackup command, naming the file.
fn assert_refused_like_qemu(backup: &str, mutate: impl Fn(&Path)) {
    let t = backups();
    let d = t.path();
    let path = copy(d, backup, "bad.qcow2");
    mutate(&path);
    assert!(!qemu_opens(d, "bad.qcow2"), "QEMU opens the damaged image");
    if let Some(why) = qbackup_refuses(d, "bad.qcow2", backup) {
        panic!("{why}");
    }
}

/// Regression (issue 19, byte 116): an extension length running past the
/// header cluster ("Header extension too large").
#[test]
fn byte_116_extension_length_past_the_cluster_is_refused() {
    assert_refused_like_qemu("full.qcow2", |p| patch_u8(p, 116, 0xff));
    assert_refused_like_qemu("top.qcow2", |p| patch_u8(p, 117, 0x01));
}

/// Regression (issue 19, byte 8): a backing file offset past the cluster,
/// or one that cuts the extension area inside an extension.
#[test]
fn byte_8_backing_file_offset_past_the_cluster_or_overlapping_is_refused() {
    assert_refused_like_qemu("top.qcow2", |p| patch_u8(p, 8, 0x01));
    assert_refused_like_qemu("top.qcow2", |p| patch_u64(p, 8, 116));
    assert_refused_like_qemu("top.qcow2", |p| patch_u64(p, 8, CLUSTER + 8));
}

/// Regression (issue 19, byte 61): a snapshot count QEMU refuses (too
/// many snapshots, or a table it cannot read).
#[test]
fn byte_61_snapshot_count_is_refused() {
    assert_refused_like_qemu("full.qcow2", |p| patch_u8(p, 61, 0xff));
    assert_refused_like_qemu("full.qcow2", |p| patch_u8(p, 60, 0x01));
    // The table's offset is checked even without snapshots.
    assert_refused_like_qemu("full.qcow2", |p| patch_u8(p, 71, 0x08));
}

/// Regression (issue 19, byte 48): the refcount table offset's high
/// (reserved) and low (unaligned) bits.
#[test]
fn byte_48_refcount_table_offset_is_refused() {
    assert_refused_like_qemu("full.qcow2", |p| patch_u8(p, 48, 0x80));
    assert_refused_like_qemu("full.qcow2", |p| patch_u8(p, 55, 0x01));
    assert_refused_like_qemu("full.qcow2", |p| patch_u32(p, 56, 0));
}

/// `verify` of a damaged copy: exit 1, the problem named on stdout, and
/// `qemu-img check` agrees that something is wrong.
fn assert_verify_damaged(backup: &str, mutate: impl Fn(&Path), problem: &str, check_fails: bool) {
    let t = backups();
    let d = t.path();
    let path = copy(d, backup, "bad.qcow2");
    mutate(&path);
    let v = qbackup(d, &["verify", "bad.qcow2"]);
    let out = String::from_utf8_lossy(&v.stdout);
    assert_eq!(
        v.status.code(),
        Some(1),
        "{out}{}",
        String::from_utf8_lossy(&v.stderr)
    );
    assert!(out.contains(problem), "{out}");
    if check_fails {
        let c = run(d, "qemu-img", &["check", "-f", "qcow2", "bad.qcow2"]);
        assert!(!c.status.success(), "qemu-img check finds nothing");
    }
}

/// Regression (issue 19): a backup with the corrupt bit set is damaged.
#[test]
fn corrupt_bit_is_damaged() {
    assert_verify_damaged(
        "full.qcow2",
        |p| {
            let b = common::qcow2::read_bytes(p, 79, 1)[0];
            patch_u8(p, 79, b | 0x02)
        },
        "marked corrupt",
        false,
    );
}

/// Regression (issue 19): reserved bits of L2 entries, which `qemu-img
/// check` reports, make the backup damaged (the data still reads).
#[test]
fn l2_reserved_bits_are_damaged() {
    for bit in [1u32, 8, 56, 61] {
        assert_verify_damaged(
            "full.qcow2",
            |p| {
                let l = Layout::read(p);
                let at = l.l2_entry_pos(p, NOISE).expect("the noise is allocated");
                let e = read_u64(p, at);
                patch_u64(p, at, e | 1u64 << bit);
            },
            "reserved bits",
            true,
        );
    }
}

/// Reserved bits of L1 and refcount table entries, and a leaked cluster.
#[test]
fn l1_and_refcount_table_reserved_bits_and_leaks_are_damaged() {
    assert_verify_damaged(
        "full.qcow2",
        |p| {
            let l = Layout::read(p);
            let at = l.l1_entry_pos(0);
            patch_u64(p, at, read_u64(p, at) | 1 << 58);
        },
        "reserved bits",
        true,
    );
    assert_verify_damaged(
        "full.qcow2",
        |p| {
            let rt = read_u64(p, 48);
            patch_u64(p, rt, read_u64(p, rt) | 1);
        },
        "reserved bits",
        true,
    );
    // A cluster appended with refcount 1 but no reference: a leak.
    assert_verify_damaged(
        "full.qcow2",
        |p| {
            let len = fs::metadata(p).unwrap().len();
            patch(p, len, &vec![0u8; CLUSTER as usize]);
            let rt = read_u64(p, 48);
            let block = read_u64(p, rt) & !0x1ff;
            let index = len / CLUSTER;
            patch(p, block + 2 * index, &1u16.to_be_bytes());
        },
        "leaked",
        true,
    );
}
