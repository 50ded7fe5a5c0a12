//! Issue 19: `verify` OK means QEMU can restore the backup, and the reader
//! refuses what QEMU refuses when it opens a qcow2.
//!
//! - A generated mutation test: every byte of the used part of the header
//!   cluster of a few real backups (full with data and compressed clusters
//!   from a source with a dirty bitmap, and a `--sync top` backup with a
//!   backing file) is overwritten with a deterministic sample of values
//!   (each bit flipped, 0x00, 0xff). Whenever `qemu-img info` refuses the
//!   image, `verify`, `map`, `info` and `compare` refuse it too (one line,
//!   no panic); whenever `verify` says OK, `qemu-img compare` against the
//!   original says identical and `qemu-img check` is clean.
//! - Regression tests for the four bytes of the issue by name, and for the
//!   metadata errors `qemu-img check` reports (the corrupt bit, reserved
//!   bits in L1/L2/refcount table entries, leaked clusters).

mod common;

use std::fs;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use common::qcow2::{patch, patch_u32, patch_u64, patch_u8, read_u64, Layout};

const CLUSTER: u64 = 65536;
/// Guest offset of the incompressible cluster (a plain data cluster).
const NOISE: u64 = 2560 << 10;

fn run(dir: &Path, prog: &str, args: &[&str]) -> Output {
    Command::new("timeout")
        .arg("60")
        .arg(prog)
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {prog}: {e}"))
}

fn qbackup(dir: &Path, args: &[&str]) -> Output {
    run(dir, env!("CARGO_BIN_EXE_qbackup"), args)
}

fn ok(dir: &Path, prog: &str, args: &[&str]) {
    let out = run(dir, prog, args);
    assert!(
        out.status.success(),
        "{prog} {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The backups the tests mutate, in one directory: `full.qcow2` (data and
/// compressed clusters; its source has a dirty bitmap) and `top.qcow2` (a
/// `--sync top` backup whose backing file is `full.qcow2`), with manifests.
fn backups() -> tempfile::TempDir {
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    ok(
        d,
        "qemu-img",
        &["create", "-q", "-f", "qcow2", "src.qcow2", "4M"],
    );
    // Incompressible data: stored as a plain data cluster in the backup.
    let noise: Vec<u8> = (0..CLUSTER).map(|i| (splitmix(i) >> 7) as u8).collect();
    fs::write(d.join("noise.bin"), noise).unwrap();
    ok(
        d,
        "qemu-io",
        &[
            "-f",
            "qcow2",
            "-c",
            "write -P 0x11 0 1M",
            "-c",
            "write -c -P 0x22 1M 512k",
            "-c",
            "write -z 1536k 64k",
            "-c",
            "write -s noise.bin 2560k 64k",
            "src.qcow2",
        ],
    );
    ok(d, "qemu-img", &["bitmap", "--add", "src.qcow2", "nightly"]);
    ok(
        d,
        "qemu-io",
        &["-f", "qcow2", "-c", "write -P 0x33 2M 64k", "src.qcow2"],
    );
    ok(
        d,
        env!("CARGO_BIN_EXE_qbackup"),
        &["backup", "src.qcow2", "full.qcow2"],
    );
    ok(
        d,
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "src.qcow2",
            "-F",
            "qcow2",
            "over.qcow2",
        ],
    );
    ok(
        d,
        "qemu-io",
        &["-f", "qcow2", "-c", "write -P 0x44 3M 64k", "over.qcow2"],
    );
    ok(
        d,
        env!("CARGO_BIN_EXE_qbackup"),
        &[
            "backup",
            "--sync",
            "top",
            "--backing",
            "full.qcow2",
            "over.qcow2",
            "top.qcow2",
        ],
    );
    // A backup QEMU took internal snapshots of (its clusters shared, so
    // refcounts of 2 and cleared COPIED flags), manifest alike.
    copy(d, "full.qcow2", "snap.qcow2");
    ok(d, "qemu-img", &["snapshot", "-c", "s1", "snap.qcow2"]);
    ok(d, "qemu-img", &["snapshot", "-c", "second", "snap.qcow2"]);
    for b in ["full.qcow2", "top.qcow2", "snap.qcow2"] {
        let v = qbackup(d, &["verify", b]);
        assert!(v.status.success(), "fresh {b} does not verify");
    }
    t
}

/// A working copy of `backup` named `name` (with its manifest) beside it,
/// so that a relative backing name resolves alike.
fn copy(dir: &Path, backup: &str, name: &str) -> PathBuf {
    fs::copy(dir.join(backup), dir.join(name)).unwrap();
    let manifest = dir.join(format!("{backup}.manifest"));
    if manifest.exists() {
        fs::copy(manifest, dir.join(format!("{name}.manifest"))).unwrap();
    }
    dir.join(name)
}

fn one_line(out: &Output) -> bool {
    let err = String::from_utf8_lossy(&out.stderr);
    err.trim().lines().count() == 1 && !err.contains("panicked")
}

/// Whether `qemu-img info` opens the image as qcow2.
fn qemu_opens(dir: &Path, name: &str) -> bool {
    run(dir, "qemu-img", &["info", "-f", "qcow2", name])
        .status
        .success()
}

/// What qbackup does with a damaged image: `None` when every command
/// refuses it properly, else what went wrong.
fn qbackup_refuses(dir: &Path, name: &str, original: &str) -> Option<String> {
    let v = qbackup(dir, &["verify", name]);
    let no_manifest = !dir.join(format!("{name}.manifest")).exists();
    match v.status.code() {
        Some(1) => {}
        Some(2) if one_line(&v) => {}
        _ if no_manifest => {}
        c => {
            return Some(format!(
                "verify exit {c:?}: {}{}",
                String::from_utf8_lossy(&v.stdout),
                String::from_utf8_lossy(&v.stderr)
            ))
        }
    }
    for args in [
        vec!["map", "-f", "qcow2", name],
        vec!["info", "-f", "qcow2", name],
        vec!["compare", "-f", "qcow2", "-F", "qcow2", name, original],
    ] {
        let out = qbackup(dir, &args);
        if out.status.success() || out.status.code() == Some(101) || !one_line(&out) {
            return Some(format!(
                "{} exit {:?}: {}",
                args[0],
                out.status.code(),
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        let err = String::from_utf8_lossy(&out.stderr);
        if !err.contains(name) {
            return Some(format!("{} does not name the file: {err}", args[0]));
        }
    }
    None
}

/// `verify` OK implies QEMU restores exactly the original: `None` when it
/// holds (or verify does not say OK).
fn verify_ok_is_restorable(dir: &Path, name: &str, original: &str) -> (bool, Option<String>) {
    let v = qbackup(dir, &["verify", name]);
    if v.status.code() == Some(101) || String::from_utf8_lossy(&v.stderr).contains("panicked") {
        return (false, Some("verify panicked".into()));
    }
    if !v.status.success() {
        return (false, None);
    }
    let cmp = run(
        dir,
        "qemu-img",
        &["compare", "-f", "qcow2", "-F", "qcow2", name, original],
    );
    if !cmp.status.success() {
        return (
            true,
            Some(format!(
                "verify OK but qemu-img compare: {}{}",
                String::from_utf8_lossy(&cmp.stdout),
                String::from_utf8_lossy(&cmp.stderr)
            )),
        );
    }
    let check = run(dir, "qemu-img", &["check", "-f", "qcow2", name]);
    if !check.status.success() {
        return (
            true,
            Some(format!(
                "verify OK but qemu-img check: {}",
                String::from_utf8_lossy(&check.stdout)
            )),
        );
    }
    (true, None)
}

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

fn splitmix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// The bytes named in issue 19, mutated with every value of the sample.
const NAMED: [u64; 4] = [8, 48, 61, 116];

/// The (offset, value) mutations for a backup: a deterministic sample of
/// {each bit flipped, 0x00, 0xff} per byte (all of them for the named
/// bytes, two for the fixed header and for extensions and the backing
/// name, one for a third of the rest of the first 512 bytes).
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
        } else if at < 112 {
            2
        } else if at < used {
            2
        } else if splitmix(seed ^ at) % 3 == 0 {
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

/// Every sampled value of every byte of the bitmaps extension (type,
/// length and data) of `path`.
fn bitmap_extension_mutations(path: &Path) -> Vec<(u64, u8)> {
    let at = common::qcow2::qcow2_header_extension(path, common::qcow2::ext::BITMAPS);
    let b = common::qcow2::read_bytes(path, at, 32);
    let mut out = Vec::new();
    for (i, &orig) in b.iter().enumerate() {
        let mut values: Vec<u8> = (0..8).map(|k| orig ^ (1 << k)).collect();
        values.extend([0x00, 0xff]);
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
                        } else if backup != "src.qcow2" {
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
    assert!(counts.verify_ok_identical.load(Ordering::Relaxed) > 0);
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

/// The metadata of `backup`: (file offset, bytes in use) of its L1 table,
/// L2 tables, snapshot table and snapshot L1 tables, refcount table and
/// blocks (a flip may land anywhere in the cluster from there).
fn metadata_regions(path: &Path) -> Vec<(u64, u64)> {
    let l = Layout::read(path);
    let cs = l.cluster_size();
    let mut out = vec![(l.l1_offset, u64::from(l.l1_size) * 8)];
    for i in 0..u64::from(l.l1_size) {
        if let Some(t) = l.l2_table(path, i) {
            let size = read_u64(path, 24);
            out.push((t, (size / cs).min(cs / 8) * 8));
        }
    }
    // The snapshot table and each snapshot's L1 table.
    let mut at = read_u64(path, 64);
    for _ in 0..common::qcow2::read_u32(path, 60) {
        at = at.div_ceil(8) * 8;
        let h = common::qcow2::read_bytes(path, at, 40);
        let be = |r: std::ops::Range<usize>| h[r].iter().fold(0u64, |a, &b| a << 8 | u64::from(b));
        let len = 40 + be(36..40) + be(12..14) + be(14..16);
        out.push((at, len));
        out.push((be(0..8), be(8..12) * 8));
        at += len;
    }
    let rt = read_u64(path, 48);
    let clusters = u64::from(common::qcow2::read_u32(path, 56));
    out.push((rt, 8));
    for i in 0..clusters * cs / 8 {
        let e = read_u64(path, rt + 8 * i) & !0x1ff;
        if e != 0 {
            let file_clusters = fs::metadata(path).unwrap().len().div_ceil(cs);
            out.push((e, 2 * file_clusters));
        }
    }
    out
}

/// One byte change: which backup, which region, where in it (in the used
/// part or anywhere in the cluster), and the bits to flip.
type Flip = (usize, usize, u32, bool, u8);

/// Property (issue 19): random byte flips in the metadata clusters of a
/// backup (L1, L2, snapshot table, refcount table and blocks): whenever `verify` says OK,
/// `qemu-img compare` against the original says identical and `qemu-img
/// check` is clean. Bounded cases, fixed seed.
#[test]
fn metadata_flips_verify_ok_implies_check_clean_and_identical() {
    use proptest::prelude::*;
    use proptest::test_runner::{Config, TestRng, TestRunner};

    let t = backups();
    let d = t.path();
    let names = ["full.qcow2", "top.qcow2", "snap.qcow2"];
    let regions: Vec<Vec<(u64, u64)>> =
        names.iter().map(|n| metadata_regions(&d.join(n))).collect();
    let originals: Vec<Vec<u8>> = names.iter().map(|n| fs::read(d.join(n)).unwrap()).collect();
    for n in names {
        copy(d, n, &format!("p-{n}"));
    }
    let config = Config {
        cases: 256,
        failure_persistence: None,
        ..Config::default()
    };
    let rng = TestRng::deterministic_rng(config.rng_algorithm);
    let mut runner = TestRunner::new_with_rng(config, rng);
    let flips = prop::collection::vec(
        (
            0..names.len(),
            any::<usize>(),
            any::<u32>(),
            any::<bool>(),
            1..=255u8,
        ),
        1..4,
    );
    let stats = Mutex::new((0u64, 0u64, [0u64; 3]));
    let result = runner.run(&flips, |flips: Vec<Flip>| {
        let b = flips[0].0;
        let name = format!("p-{}", names[b]);
        let path = d.join(&name);
        let mut image = originals[b].clone();
        for &(_, r, off, used, mask) in &flips {
            let (start, in_use) = regions[b][r % regions[b].len()];
            let span = if used && in_use > 0 { in_use } else { CLUSTER };
            let span = span.min(image.len() as u64 - start);
            let at = (start + u64::from(off) % span) as usize;
            image[at] ^= mask;
        }
        fs::write(&path, &image).unwrap();
        let (verified, miss) = verify_ok_is_restorable(d, &name, names[b]);
        let mut s = stats.lock().unwrap();
        s.0 += 1;
        s.1 += u64::from(verified);
        s.2[b] += 1;
        drop(s);
        prop_assert!(
            miss.is_none(),
            "{flips:?} on {}: {}",
            names[b],
            miss.unwrap()
        );
        Ok(())
    });
    let (cases, ok, per) = *stats.lock().unwrap();
    println!(
        "metadata flips: {cases} cases ({per:?} per backup), verify OK (identical, check clean) {ok}, damaged {}",
        cases - ok
    );
    if let Err(e) = result {
        panic!("{e}");
    }
}
