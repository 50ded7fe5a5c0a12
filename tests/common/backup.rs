//! Fixtures shared by the backup tests (`backup_roundtrip`,
//! `backup_compressed`, `backup_top`, `backup_failures`, the incremental
//! ones): the source images several of them back up, a backup checked
//! against the oracle, incremental runs and the dirty ranges QEMU reports.

use super::oracle::{assert_check_clean, assert_identical};
use super::process::qemu_nbd_with;
use super::run::{run_checked, Run};
use super::scratch::Scratch;
use super::{KIB, MIB};

pub const CODECS: [&str; 3] = ["zstd", "zlib", "none"];

/// The usual mix for a 4 MiB image with clusters up to 64 KiB: text
/// (aligned and unaligned), random data, a pattern in a partial cluster, a
/// zeroed range over data, and empty space.
pub fn standard_content(s: &Scratch) -> Vec<String> {
    vec![
        s.text_cmd("", 0, 768 * KIB),
        s.random_cmd("", MIB, 192 * KIB),
        "write -P 0x5a 1560k 8k".into(),
        s.text_cmd("", 2 * MIB + 512, 100_000),
        s.random_cmd("", 3 * MIB, 64 * KIB),
        "write -z 256k 64k".into(),
    ]
}

/// A qcow2 image with `opts`, filled with the standard content.
pub fn standard_qcow2(s: &Scratch, name: &str, opts: &str) {
    s.create(name, "qcow2", 4 * MIB, opts);
    s.io_all(name, "qcow2", &standard_content(s));
}

/// Back up `src` to `target` (both qcow2, names in the scratch dir) with the
/// options `opts`: it must succeed, and the target must pass `qemu-img check`
/// and compare identical to the source.
pub fn backup_checked(s: &Scratch, opts: &[&str], src: &str, target: &str) {
    s.backup(&[opts, &[src, target]].concat()).assert_ok();
    assert_check_clean(s.dir(), target);
    assert_identical(s.dir(), src, "qcow2", target, "qcow2");
}

/// A source whose clusters were written compressed by qemu (`write -c`),
/// plus plain clusters, zero clusters and a random cluster that qemu stores
/// uncompressed because it does not shrink.
pub fn compressed_source(s: &Scratch, name: &str, ctype: &str) {
    s.create(name, "qcow2", 4 * MIB, &format!("compression_type={ctype}"));
    s.io(
        name,
        "qcow2",
        &[
            &s.text_cmd("-c", 0, 512 * KIB),
            &s.random_cmd("-c", MIB, 128 * KIB),
            "write -c -P 0x44 2M 64k",
            &s.text_cmd("", 2112 * KIB, 100 * KIB),
            "write -z 128k 64k",
            &s.text_cmd("-c", 4 * MIB - 64 * KIB, 64 * KIB),
        ],
    );
    let m = s.qemu_map(name, "qcow2");
    assert!(
        m.iter().any(|e| e.compressed),
        "qemu did not compress: {m:?}"
    );
    let i = s.qemu_info(name, "qcow2");
    assert_eq!(i["format-specific"]["data"]["compression-type"], ctype);
}

/// `qbackup backup --sync incremental --bitmap BITMAP --backing PREV SRC
/// TARGET` (plus `extra` options first) in the scratch dir, not checked.
pub fn backup_incremental(
    s: &Scratch,
    extra: &[&str],
    (bitmap, prev): (&str, &str),
    src: &str,
    target: &str,
) -> Run {
    let args = [
        "--sync",
        "incremental",
        "--bitmap",
        bitmap,
        "--backing",
        prev,
        src,
        target,
    ];
    s.backup(&[extra, &args].concat())
}

/// The dirty ranges (start, length) of `bitmap` in qcow2 `image`, as QEMU
/// reports them: `qemu-nbd -B` exports it, `nbdinfo --map` prints it.
pub fn dirty_ranges(s: &Scratch, image: &str, bitmap: &str) -> Vec<(u64, u64)> {
    let (nbd, uri) = qemu_nbd_with(s, image, &["-r", "-t", "-B", bitmap, "-f", "qcow2"]);
    let out = run_checked(
        std::process::Command::new("nbdinfo")
            .arg(format!("--map=qemu:dirty-bitmap:{bitmap}"))
            .arg(&uri),
    );
    drop(nbd);
    let mut ranges = Vec::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        let (start, len, flags): (u64, u64, u64) = (
            f[0].parse().unwrap(),
            f[1].parse().unwrap(),
            f[2].parse().unwrap(),
        );
        if flags & 1 != 0 {
            ranges.push((start, len));
        }
    }
    ranges
}

/// Guest writes (qemu-io commands) and the ranges (start, length) they
/// should make an incremental backup allocate.
pub type Round = (&'static [&'static str], Vec<(u64, u64)>);

/// The ranges (start, length) the overlay `image` itself allocates, merged.
pub fn own_ranges(s: &Scratch, image: &str) -> Vec<(u64, u64)> {
    let mut v: Vec<(u64, u64)> = Vec::new();
    for e in s.qemu_map(image, "qcow2") {
        if e.depth == 0 && e.present {
            match v.last_mut() {
                Some(last) if last.0 + last.1 == e.start => last.1 += e.length,
                _ => v.push((e.start, e.length)),
            }
        }
    }
    v
}
