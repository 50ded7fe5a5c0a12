//! `qbackup map` and `qbackup info` against qemu-img for backing chains:
//! qcow2 and raw bases, mixed cluster sizes, v2 and extended-L2 overlays,
//! backing files shorter and longer than the overlay, zero clusters and
//! discards that hide backing data, relative and absolute backing names, and
//! probed backing formats.
//!
//! Every image is built at test time with qemu-img / qemu-io, then
//! [`common::check`] compares: `map --output=json` (parsed, must be
//! identical), human `map` (identical text, or a clean refusal where qemu-img
//! refuses compressed clusters) and `info --output=json` (the contract's keys).

mod common;

use common::backup::backup_checked;
use common::compare::{assert_image_matches, check};
use common::map_info::noise;
use common::oracle::{count_extents, extents, qemu_info_json, qemu_map_json};
use common::qcow2::{ext, patch_u32, qcow2_header_extension};
use common::run::qbackup_info_ok;
use common::scratch::Scratch;
use common::MIB;

// ---------------------------------------------------------------------------
// layers
// ---------------------------------------------------------------------------

#[test]
fn chain_three_qcow2_layers() {
    let s = Scratch::new();
    s.create("base.qcow2", "qcow2", 4 * MIB, "");
    s.io(
        "base.qcow2",
        "qcow2",
        &[
            "write -P 1 0 2M",
            "write -c -P 2 3M 128k",
            "write -z 3584k 64k",
        ],
    );
    s.overlay("mid.qcow2", "base.qcow2", "qcow2", None, "");
    s.io(
        "mid.qcow2",
        "qcow2",
        &[
            "write -P 3 64k 64k",
            "write -z 256k 128k",
            "discard 512k 64k",
            "write -P 4 2M 100k",
        ],
    );
    s.overlay("top.qcow2", "mid.qcow2", "qcow2", None, "");
    s.io(
        "top.qcow2",
        "qcow2",
        &[
            "write -P 5 96k 64k",
            "write -z -u 1M 64k",
            "write -c -P 6 3M 64k",
            "write -P 7 4190208 4096",
        ],
    );
    check(&s, "top.qcow2", None);
    check(&s, "mid.qcow2", None);
    let map = qemu_map_json(s.dir(), &s.p("top.qcow2"), None);
    for depth in 0..=2 {
        assert!(
            count_extents(&map, |e| e["depth"] == depth && e["data"] == true) >= 1,
            "expected data at depth {depth}: {map}"
        );
    }
}

#[test]
fn chain_raw_base_mixed_cluster_sizes() {
    let s = Scratch::new();
    s.create("base.raw", "raw", 4 * MIB, "");
    s.io(
        "base.raw",
        "raw",
        &["write -P 1 0 1M", "write -P 2 2M 4k", "write -P 3 3M 1M"],
    );
    s.overlay("mid.qcow2", "base.raw", "raw", None, "cluster_size=4096");
    s.io(
        "mid.qcow2",
        "qcow2",
        &["write -P 4 8k 4k", "write -z 2M 4k", "write -P 5 2560k 12k"],
    );
    s.overlay(
        "top.qcow2",
        "mid.qcow2",
        "qcow2",
        None,
        "cluster_size=65536",
    );
    s.io(
        "top.qcow2",
        "qcow2",
        &["write -P 6 4k 8k", "write -P 7 3M 64k"],
    );
    check(&s, "top.qcow2", None);
    check(&s, "mid.qcow2", None);
}

#[test]
fn qcow2_v2_chain() {
    let s = Scratch::new();
    s.create("base.qcow2", "qcow2", 4 * MIB, "compat=0.10");
    s.io(
        "base.qcow2",
        "qcow2",
        &["write -P 1 0 1M", "write -c -P 2 2M 256k"],
    );
    s.overlay("top.qcow2", "base.qcow2", "qcow2", None, "compat=0.10");
    s.io(
        "top.qcow2",
        "qcow2",
        &["write -P 3 512k 64k", "write -z 64k 64k", "discard 2M 64k"],
    );
    check(&s, "top.qcow2", None);
}

#[test]
fn qcow2_extended_l2_chain() {
    // Unallocated subclusters of the overlay fall through to the backing file.
    let s = Scratch::new();
    s.create("base.qcow2", "qcow2", 4 * MIB, "");
    s.io("base.qcow2", "qcow2", &["write -P 1 0 1M"]);
    s.overlay("top.qcow2", "base.qcow2", "qcow2", None, "extended_l2=on");
    s.io(
        "top.qcow2",
        "qcow2",
        &["write -P 2 4k 4k", "write -z 16k 8k", "write -P 3 1M 4k"],
    );
    check(&s, "top.qcow2", None);
}

#[test]
fn chain_with_compressed_and_zero_over_backing() {
    // Zero clusters and discards in the overlay hide backing data.
    let s = Scratch::new();
    s.create("base.qcow2", "qcow2", 4 * MIB, "compression_type=zstd");
    s.io(
        "base.qcow2",
        "qcow2",
        &["write -c -P 1 0 2M", "write -P 2 2M 2M"],
    );
    s.overlay("top.qcow2", "base.qcow2", "qcow2", None, "");
    s.io(
        "top.qcow2",
        "qcow2",
        &[
            "write -z 0 64k",
            "discard 2M 128k",
            "write -z -u 3M 64k",
            "write -c -P 3 1M 64k",
        ],
    );
    check(&s, "top.qcow2", None);
}

// ---------------------------------------------------------------------------
// backing files of another size
// ---------------------------------------------------------------------------

#[test]
fn chain_raw_base_odd_size_shorter_than_overlay() {
    let s = Scratch::new();
    let mut v = noise((MIB + 3) as usize, 9);
    v[..4096].fill(0);
    s.write_file("base.raw", &v);
    s.overlay("top.qcow2", "base.raw", "raw", Some(4 * MIB), "");
    s.io(
        "top.qcow2",
        "qcow2",
        &["write -P 1 64k 4k", "write -P 2 3M 64k"],
    );
    check(&s, "top.qcow2", None);
}

#[test]
fn chain_backing_shorter_than_overlay() {
    let s = Scratch::new();
    s.create("base.qcow2", "qcow2", 4 * MIB, "");
    s.io("base.qcow2", "qcow2", &["write -P 1 0 4M"]);
    s.overlay("top.qcow2", "base.qcow2", "qcow2", Some(8 * MIB), "");
    s.io(
        "top.qcow2",
        "qcow2",
        &["write -P 2 1M 64k", "write -P 3 5M 64k", "write -z 6M 64k"],
    );
    check(&s, "top.qcow2", None);
    let map = qemu_map_json(s.dir(), &s.p("top.qcow2"), None);
    let last = extents(&map).last().unwrap().clone();
    assert_eq!(
        last["start"].as_u64().unwrap() + last["length"].as_u64().unwrap(),
        8 * MIB
    );
}

#[test]
fn chain_backing_longer_than_overlay() {
    let s = Scratch::new();
    s.create("base.qcow2", "qcow2", 8 * MIB, "");
    s.io("base.qcow2", "qcow2", &["write -P 1 0 8M"]);
    s.overlay("top.qcow2", "base.qcow2", "qcow2", Some(2 * MIB), "");
    s.io("top.qcow2", "qcow2", &["write -P 2 1M 64k"]);
    check(&s, "top.qcow2", None);
}

// ---------------------------------------------------------------------------
// backing file names and formats
// ---------------------------------------------------------------------------

#[test]
fn chain_relative_backing_in_subdirectories() {
    let s = Scratch::new();
    s.mkdir("images/sub");
    s.mkdir("other");
    s.create("other/base.qcow2", "qcow2", 4 * MIB, "");
    s.io("other/base.qcow2", "qcow2", &["write -P 1 0 1M"]);
    // Backing names are relative to the overlay's directory.
    s.overlay("images/mid.qcow2", "../other/base.qcow2", "qcow2", None, "");
    s.io("images/mid.qcow2", "qcow2", &["write -P 2 64k 64k"]);
    s.overlay("images/sub/top.qcow2", "../mid.qcow2", "qcow2", None, "");
    s.io("images/sub/top.qcow2", "qcow2", &["write -P 3 2M 64k"]);
    s.overlay("images/sub/top2.qcow2", "top.qcow2", "qcow2", None, "");
    s.io("images/sub/top2.qcow2", "qcow2", &["write -P 4 3M 64k"]);
    // Give the image from several working directories, relative and absolute:
    // the human map's File column and full-backing-filename depend on it.
    for (cwd, image) in [
        (s.dir().to_path_buf(), "images/sub/top2.qcow2".to_owned()),
        (s.path("other"), "../images/sub/top2.qcow2".to_owned()),
        (s.path("images/sub"), "top2.qcow2".to_owned()),
        (s.path("images"), s.p("images/sub/top2.qcow2")),
    ] {
        assert_image_matches(&cwd, &image, None);
    }
    let info = qbackup_info_ok(s.dir(), "images/sub/top2.qcow2", None);
    assert_eq!(info["backing-filename"], "top.qcow2");
    assert_eq!(info["full-backing-filename"], "images/sub/top.qcow2");
}

#[test]
fn chain_backing_format_probed() {
    // Without the backing-format extension the backing file's format is probed.
    let s = Scratch::new();
    s.create("base.raw", "raw", 4 * MIB, "");
    s.io("base.raw", "raw", &["write -P 1 0 1M"]);
    s.create("base.qcow2", "qcow2", 4 * MIB, "");
    s.io("base.qcow2", "qcow2", &["write -P 2 1M 1M"]);
    for (top, base, fmt) in [
        ("top-raw.qcow2", "base.raw", "raw"),
        ("top-q.qcow2", "base.qcow2", "qcow2"),
    ] {
        let p = s.overlay(top, base, fmt, None, "");
        s.io(top, "qcow2", &["write -P 3 64k 64k"]);
        // Turn the backing-format extension into an unknown (ignored) one.
        patch_u32(
            &p,
            qcow2_header_extension(&p, ext::BACKING_FORMAT),
            0x7777_0001,
        );
        let q = qemu_info_json(s.dir(), &s.p(top), None);
        assert!(q.get("backing-filename-format").is_none(), "test premise");
        check(&s, top, None);
    }
}

#[test]
fn chain_absolute_backing_name() {
    let s = Scratch::new();
    s.mkdir("a");
    s.mkdir("b");
    s.create("a/base.qcow2", "qcow2", 4 * MIB, "");
    s.io("a/base.qcow2", "qcow2", &["write -P 1 0 1M"]);
    s.overlay("b/top.qcow2", &s.p("a/base.qcow2"), "qcow2", None, "");
    s.io("b/top.qcow2", "qcow2", &["write -P 2 512k 64k"]);
    check(&s, "b/top.qcow2", None);
    assert_image_matches(&s.path("b"), "top.qcow2", None);
}

/// Regression: the same file reached by two paths (hard links) is not a
/// loop when its relative backing name resolves differently from each path.
/// `b/mid` → `b/base` → `a/mid` (a hard link of `b/mid`) → `a/base`;
/// qemu-img reads this chain, and so must qbackup (a loop check by inode
/// instead of by canonical name refused it).
#[test]
fn hard_linked_image_twice_in_a_chain_is_not_a_loop() {
    let s = Scratch::new();
    s.mkdir("a");
    s.mkdir("b");
    s.create("a/base.qcow2", "qcow2", MIB, "");
    s.io("a/base.qcow2", "qcow2", &["write -P 0x11 0 64k"]);
    s.img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "base.qcow2",
        "-F",
        "qcow2",
        "a/mid.qcow2",
    ]);
    s.io("a/mid.qcow2", "qcow2", &["write -P 0x22 64k 64k"]);
    std::fs::hard_link(s.path("a/mid.qcow2"), s.path("b/mid.qcow2")).unwrap();
    let a_mid = s.p("a/mid.qcow2");
    s.img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        &a_mid,
        "-F",
        "qcow2",
        "b/base.qcow2",
    ]);
    s.io("b/base.qcow2", "qcow2", &["write -P 0x33 128k 64k"]);
    check(&s, "b/mid.qcow2", None);
    backup_checked(&s, &[], "b/mid.qcow2", "out.qcow2");
}
