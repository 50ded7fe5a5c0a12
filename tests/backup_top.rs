//! End-to-end tests of `qbackup backup --sync top` (`top_*`): the target
//! holds only what the source's top layer allocates, over the right backing
//! file (recorded relative to the target, or as given with `--backing`), and
//! keeps top-layer zero clusters as zero clusters. qemu-img (`check`,
//! `compare`, `map`, `info`) is the oracle.

mod common;

use std::path::Path;

use common::backup::{standard_qcow2, CODECS};
use common::oracle::{assert_check_clean, assert_identical, extents_in, qemu_img_status, Extent};
use common::qcow2::file_len;
use common::run::assert_no_leftovers;
use common::scratch::Scratch;
use common::{KIB, MIB};

// ---------------------------------------------------------------------------
// Verification of a --sync top backup
// ---------------------------------------------------------------------------

/// Guest clusters (of `cluster` bytes) touched by a depth-0 extent.
fn depth0_clusters(map: &[Extent], cluster: u64) -> Vec<u64> {
    let mut v: Vec<u64> = map
        .iter()
        .filter(|e| e.depth == 0)
        .flat_map(|e| (e.start / cluster)..e.end().div_ceil(cluster))
        .collect();
    v.sort_unstable();
    v.dedup();
    v
}

/// A base with data everywhere it matters and an overlay (`top_opts`) that
/// writes text, zeroes backing data and writes 4 KiB into one cluster.
fn top_fixture(s: &Scratch, dir: &str, top_opts: &str) {
    s.mkdir(dir);
    let base = format!("{dir}/base.qcow2");
    let top = format!("{dir}/top.qcow2");
    s.create(&base, "qcow2", 4 * MIB, "");
    s.io(
        &base,
        "qcow2",
        &["write -P 0x11 0 4M", &s.text_cmd("", MIB, MIB)],
    );
    s.overlay(&top, "base.qcow2", "qcow2", None, top_opts);
    s.io(
        &top,
        "qcow2",
        &[
            &s.text_cmd("", 512 * KIB, 256 * KIB),
            "write -z 2M 128k",
            "write -P 0x22 3080k 4k",
            &s.random_cmd("", 3584 * KIB, 64 * KIB),
        ],
    );
}

/// Verify a `--sync top` target of `top` (names relative to the scratch
/// dir); `backing` is the path the target's backing file must resolve to.
fn verify_top(s: &Scratch, top: &str, target: &str, backing: &Path, compressing: bool) {
    assert_check_clean(s.dir(), target);
    let ti = s.qemu_info(target, "qcow2");
    assert_eq!(ti["backing-filename-format"], "qcow2", "{ti}");
    let full = ti["full-backing-filename"]
        .as_str()
        .expect("full-backing-filename");
    // qemu-img reports it relative to its working directory (the scratch dir).
    assert_eq!(
        std::fs::canonicalize(s.dir().join(full)).ok(),
        std::fs::canonicalize(backing).ok(),
        "target's backing file {full} should be {}: {ti}",
        backing.display()
    );
    assert_identical(s.dir(), top, "qcow2", target, "qcow2");

    let cluster = ti["cluster-size"].as_u64().unwrap();
    let src_map = s.qemu_map(top, "qcow2");
    let tgt_map = s.qemu_map(target, "qcow2");
    assert_eq!(
        depth0_clusters(&tgt_map, cluster),
        depth0_clusters(&src_map, cluster),
        "clusters present in the target's top layer differ from those the source's \
         top layer allocates (cluster {cluster})\nsource: {src_map:?}\ntarget: {tgt_map:?}"
    );
    // Depth-0 extents are whole clusters (except at the end of the disk).
    for e in tgt_map.iter().filter(|e| e.depth == 0) {
        assert_eq!(e.start % cluster, 0, "{e:?}");
    }
    // The zeroed range hides backing data and must stay a zero cluster.
    for e in extents_in(&tgt_map, 2 * MIB, 2 * MIB + 128 * KIB) {
        assert!(
            e.depth == 0 && e.zero && !e.data,
            "zeroed range must be a zero cluster in the target's top layer: {e:?}"
        );
    }
    s.io(
        target,
        "qcow2",
        &["read -P 0 2M 128k", "read -P 0x22 3080k 4k"],
    );
    if compressing {
        assert!(
            tgt_map.iter().any(|e| e.depth == 0 && e.compressed),
            "text in the top layer should be compressed: {tgt_map:?}"
        );
    }
}

// ---------------------------------------------------------------------------
// --sync top
// ---------------------------------------------------------------------------

#[test]
fn top_overlay_same_directory() {
    let s = Scratch::new();
    top_fixture(&s, "d", "cluster_size=64k");
    for codec in CODECS {
        let target = format!("d/top.{codec}.qcow2");
        s.backup(&["--sync", "top", "--compress", codec, "d/top.qcow2", &target])
            .assert_ok();
        verify_top(
            &s,
            "d/top.qcow2",
            &target,
            &s.path("d/base.qcow2"),
            codec != "none",
        );
        let ti = s.qemu_info(&target, "qcow2");
        // Beside its backing file, the recorded name is a plain relative one.
        assert_eq!(ti["backing-filename"], "base.qcow2", "{ti}");
        if codec != "none" {
            assert_eq!(ti["format-specific"]["data"]["compression-type"], codec);
        }
    }
    // Only the top layer's data went in: much smaller than a full backup.
    s.backup(&["--compress", "none", "d/top.qcow2", "d/full.qcow2"])
        .assert_ok();
    let top_len = file_len(&s.path("d/top.none.qcow2"));
    let full_len = file_len(&s.path("d/full.qcow2"));
    assert!(top_len * 2 < full_len, "top {top_len} vs full {full_len}");
}

#[test]
fn top_overlay_smaller_top_clusters_rounded_up() {
    // 32 KiB top clusters, 64 KiB target clusters: a 4 KiB write makes one
    // whole 64 KiB target cluster, read through the chain.
    let s = Scratch::new();
    top_fixture(&s, "d", "cluster_size=32k");
    s.backup(&["--sync", "top", "d/top.qcow2", "d/out.qcow2"])
        .assert_ok();
    verify_top(
        &s,
        "d/top.qcow2",
        "d/out.qcow2",
        &s.path("d/base.qcow2"),
        true,
    );
    let ti = s.qemu_info("d/out.qcow2", "qcow2");
    assert_eq!(ti["cluster-size"].as_u64(), Some(64 * KIB));
}

#[test]
fn top_target_in_other_directories() {
    let s = Scratch::new();
    top_fixture(&s, "src", "cluster_size=64k");
    // A sibling directory, and the parent of the source's directory.
    for target in ["elsewhere/deeper/top.qcow2", "top-in-parent.qcow2"] {
        if let Some(parent) = Path::new(target).parent() {
            if !parent.as_os_str().is_empty() {
                s.mkdir(parent.to_str().unwrap());
            }
        }
        s.backup(&["--sync", "top", "src/top.qcow2", target])
            .assert_ok();
        verify_top(&s, "src/top.qcow2", target, &s.path("src/base.qcow2"), true);
        // And from another working directory, by absolute path.
        let abs = s.p(target);
        let (code, out) = qemu_img_status(
            Path::new("/"),
            &[
                "compare",
                "-f",
                "qcow2",
                "-F",
                "qcow2",
                &s.p("src/top.qcow2"),
                &abs,
            ],
        );
        assert_eq!(code, Some(0), "compare from / failed: {out}");
    }
    let ti = s.qemu_info("top-in-parent.qcow2", "qcow2");
    assert_eq!(ti["backing-filename"], "src/base.qcow2", "{ti}");
}

#[test]
fn top_backing_override() {
    let s = Scratch::new();
    top_fixture(&s, "src", "cluster_size=64k");
    s.mkdir("dst");
    std::fs::copy(s.path("src/base.qcow2"), s.path("dst/renamed-base.qcow2")).unwrap();
    s.backup(&[
        "--sync",
        "top",
        "--backing",
        "renamed-base.qcow2",
        "src/top.qcow2",
        "dst/top.qcow2",
    ])
    .assert_ok();
    let ti = s.qemu_info("dst/top.qcow2", "qcow2");
    assert_eq!(ti["backing-filename"], "renamed-base.qcow2", "{ti}");
    verify_top(
        &s,
        "src/top.qcow2",
        "dst/top.qcow2",
        &s.path("dst/renamed-base.qcow2"),
        true,
    );
    // --backing without --sync top is a usage error.
    s.backup(&["--backing", "x.qcow2", "src/top.qcow2", "dst/full.qcow2"])
        .assert_usage_error(&["--backing"]);
    assert!(!s.path("dst/full.qcow2").exists());
}

#[test]
fn top_three_layer_chain_over_raw_base() {
    // base.raw <- mid.qcow2 <- top.qcow2: the target's backing file is mid,
    // recorded with format qcow2.
    let s = Scratch::new();
    s.create("base.raw", "raw", 2 * MIB, "");
    s.io("base.raw", "raw", &["write -P 0x01 0 2M"]);
    s.overlay("mid.qcow2", "base.raw", "raw", None, "");
    s.io("mid.qcow2", "qcow2", &["write -P 0x02 512k 512k"]);
    s.overlay("top.qcow2", "mid.qcow2", "qcow2", None, "");
    s.io(
        "top.qcow2",
        "qcow2",
        &[
            "write -P 0x03 700k 4k",
            "write -z 1536k 64k",
            &s.text_cmd("", 64 * KIB, 64 * KIB),
        ],
    );
    s.backup(&["--sync", "top", "top.qcow2", "out.qcow2"])
        .assert_ok();
    assert_check_clean(s.dir(), "out.qcow2");
    let ti = s.qemu_info("out.qcow2", "qcow2");
    assert_eq!(ti["backing-filename"], "mid.qcow2", "{ti}");
    assert_eq!(ti["backing-filename-format"], "qcow2", "{ti}");
    assert_identical(s.dir(), "top.qcow2", "qcow2", "out.qcow2", "qcow2");
    let cluster = 64 * KIB;
    assert_eq!(
        depth0_clusters(&s.qemu_map("out.qcow2", "qcow2"), cluster),
        depth0_clusters(&s.qemu_map("top.qcow2", "qcow2"), cluster)
    );

    // A raw base directly below: recorded as raw.
    s.backup(&["--sync", "top", "mid.qcow2", "mid.out.qcow2"])
        .assert_ok();
    let ti = s.qemu_info("mid.out.qcow2", "qcow2");
    assert_eq!(ti["backing-filename"], "base.raw", "{ti}");
    assert_eq!(ti["backing-filename-format"], "raw", "{ti}");
    assert_identical(s.dir(), "mid.qcow2", "qcow2", "mid.out.qcow2", "qcow2");
}

#[test]
fn top_without_backing_file_is_a_full_copy() {
    let s = Scratch::new();
    standard_qcow2(&s, "solo.qcow2", "cluster_size=64k");
    s.backup(&["--sync", "top", "solo.qcow2", "out.qcow2"])
        .assert_ok();
    assert_check_clean(s.dir(), "out.qcow2");
    let ti = s.qemu_info("out.qcow2", "qcow2");
    assert!(ti.get("backing-filename").is_none(), "{ti}");
    assert_identical(s.dir(), "solo.qcow2", "qcow2", "out.qcow2", "qcow2");
}

/// Regression: `--backing` naming a file that does not open from TARGET's
/// directory made an overlay nothing can read (exit 0); `qemu-img create -b`
/// refuses such a name, and so does qbackup now.
#[test]
fn top_backing_name_that_does_not_open_is_refused() {
    let s = Scratch::new();
    s.create("base.qcow2", "qcow2", MIB, "");
    s.overlay("top.qcow2", "base.qcow2", "qcow2", None, "");
    s.io("top.qcow2", "qcow2", &["write -P 0x11 0 64k"]);
    s.backup(&[
        "--sync",
        "top",
        "--backing",
        "/nonexistent/x",
        "top.qcow2",
        "out.qcow2",
    ])
    .assert_clean_failure_mentioning(&["/nonexistent/x"]);
    assert!(!s.path("out.qcow2").exists());
    assert_no_leftovers(s.dir());
    // A name that does resolve from TARGET's directory is recorded as given.
    s.mkdir("sub");
    s.backup(&[
        "--sync",
        "top",
        "--backing",
        "../base.qcow2",
        "top.qcow2",
        "sub/out.qcow2",
    ])
    .assert_ok();
    assert_eq!(
        s.qemu_info("sub/out.qcow2", "qcow2")["backing-filename"],
        "../base.qcow2"
    );
    assert_identical(s.dir(), "top.qcow2", "qcow2", "sub/out.qcow2", "qcow2");
}

/// `--backing NAME` must open from TARGET's directory with the size of the
/// backing file it replaces (the source's, unless the top image was
/// resized); `--backing-unchecked` records any name, as `qemu-img create -u`.
#[test]
fn top_backing_of_another_size_is_refused_unless_unchecked() {
    let s = Scratch::new();
    s.create("base.qcow2", "qcow2", MIB, "");
    s.io("base.qcow2", "qcow2", &["write -P 0x22 0 1M"]);
    s.overlay("top.qcow2", "base.qcow2", "qcow2", None, "");
    s.io("top.qcow2", "qcow2", &["write -P 0x11 64k 64k"]);
    s.create("small.qcow2", "qcow2", 512 * KIB, "");
    s.create("big.qcow2", "qcow2", 2 * MIB, "");
    for wrong in ["small.qcow2", "big.qcow2"] {
        s.backup(&[
            "--sync",
            "top",
            "--backing",
            wrong,
            "top.qcow2",
            "out.qcow2",
        ])
        .assert_clean_failure(&[wrong])
        .assert_clean_failure_mentioning(&["1048576"]);
        assert!(!s.path("out.qcow2").exists());
        assert_no_leftovers(s.dir());
    }
    // Unchecked: a name that does not exist yet is recorded as given, and
    // the overlay reads right once the file is there.
    s.backup(&[
        "--sync",
        "top",
        "--backing",
        "later.qcow2",
        "--backing-unchecked",
        "top.qcow2",
        "out.qcow2",
    ])
    .assert_ok();
    assert_eq!(
        s.qemu_info("out.qcow2", "qcow2")["backing-filename"],
        "later.qcow2"
    );
    std::fs::copy(s.path("base.qcow2"), s.path("later.qcow2")).unwrap();
    assert_check_clean(s.dir(), "out.qcow2");
    assert_identical(s.dir(), "top.qcow2", "qcow2", "out.qcow2", "qcow2");
    // The flag means nothing without --sync top --backing.
    s.backup(&[
        "--sync",
        "top",
        "--backing-unchecked",
        "top.qcow2",
        "x.qcow2",
    ])
    .assert_usage_error(&["--backing-unchecked"]);
}

/// A top image resized beyond its backing file: the size that counts is
/// the backing file's (past its end the guest reads zeros, which a bigger
/// backing file would replace with its data).
#[test]
fn top_backing_size_of_a_resized_overlay() {
    let s = Scratch::new();
    s.create("base.qcow2", "qcow2", MIB, "");
    s.io("base.qcow2", "qcow2", &["write -P 0x22 0 1M"]);
    s.overlay("top.qcow2", "base.qcow2", "qcow2", None, "");
    s.img(&["resize", "-q", "top.qcow2", "2M"]);
    s.io("top.qcow2", "qcow2", &["write -P 0x11 1536k 64k"]);
    s.create("big.qcow2", "qcow2", 2 * MIB, "");
    s.io("big.qcow2", "qcow2", &["write -P 0x33 0 2M"]);
    s.backup(&[
        "--sync",
        "top",
        "--backing",
        "big.qcow2",
        "top.qcow2",
        "bad.qcow2",
    ])
    .assert_clean_failure(&["big.qcow2"]);
    std::fs::copy(s.path("base.qcow2"), s.path("copy.qcow2")).unwrap();
    s.backup(&[
        "--sync",
        "top",
        "--backing",
        "copy.qcow2",
        "top.qcow2",
        "out.qcow2",
    ])
    .assert_ok();
    assert_check_clean(s.dir(), "out.qcow2");
    assert_identical(s.dir(), "top.qcow2", "qcow2", "out.qcow2", "qcow2");
}
