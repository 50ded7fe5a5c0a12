//! Checks and fixtures shared by the backup tests (`backup_roundtrip`,
//! `backup_compressed`, `backup_top`, `backup_failures`): the verdicts of
//! `qemu-img check` and `compare` on a target, and the source images several
//! of them back up.

use std::path::Path;

use serde_json::Value;

use super::oracle::qemu_img_status;
use super::process::qemu_nbd_with;
use super::run::{run_checked, Run};
use super::scratch::Scratch;
use super::{KIB, MIB};

pub const CODECS: [&str; 3] = ["zstd", "zlib", "none"];

/// `qemu-img check` of a qcow2 target: exit 0, no errors, no leaks.
pub fn assert_check_clean(dir: &Path, target: &str) {
    let (code, out) = qemu_img_status(dir, &["check", "--output=json", "-f", "qcow2", target]);
    assert_eq!(code, Some(0), "qemu-img check {target} failed:\n{out}");
    let v: Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("check JSON: {e}\n{out}"));
    for key in [
        "check-errors",
        "leaks",
        "corruptions",
        "leaks-fixed",
        "corruptions-fixed",
    ] {
        let n = v.get(key).and_then(Value::as_u64).unwrap_or(0);
        assert_eq!(n, 0, "qemu-img check {target}: {key} = {n}\n{out}");
    }
}

/// `qemu-img compare` (not strict): the guest sees identical bytes.
pub fn assert_identical(dir: &Path, a: &str, a_fmt: &str, b: &str, b_fmt: &str) {
    let (code, out) = qemu_img_status(dir, &["compare", "-f", a_fmt, "-F", b_fmt, a, b]);
    assert_eq!(
        code,
        Some(0),
        "qemu-img compare -f {a_fmt} -F {b_fmt} {a} {b} (in {}) says they differ:\n{out}",
        dir.display()
    );
}

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

/// `qemu-img compare -U` of two qcow2 images (for images a running VM or
/// server holds): exit code and output.
pub fn compare_force_share(dir: &Path, a: &str, b: &str) -> (Option<i32>, String) {
    qemu_img_status(dir, &["compare", "-U", "-f", "qcow2", "-F", "qcow2", a, b])
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
