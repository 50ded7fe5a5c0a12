//! Incremental backups from a qcow2 image's own persistent dirty bitmap (no
//! NBD): `backup --sync incremental --bitmap NAME --backing PREV IMG`.
//!
//! The oracle for the dirty set is QEMU itself: `qemu-nbd -B NAME` serves
//! the bitmap as `qemu:dirty-bitmap:NAME`, and `nbdinfo --map` prints it.
//! The overlay must hold exactly the target clusters that touch a dirty
//! range, read back equal to the image (`qemu-img compare`) and be `check`
//! clean; a bitmap left in use by a killed QEMU, or a missing one, is
//! refused in one line.

mod common;

use std::collections::BTreeSet;

use common::backup::{backup_incremental, dirty_ranges};
use common::oracle::{assert_check_clean, assert_identical, qemu_img_status};
use common::qcow2::{
    mark_first_bitmap_in_use, patch_u32, qcow2_header_extension, read_u32, read_u64,
};
use common::run::{assert_no_leftovers, qbackup_in};
use common::scratch::Scratch;
use common::{KIB, MIB};

/// Target clusters (of `cluster` bytes) touched by the dirty extents QEMU
/// reports.
fn dirty_clusters_per_qemu(s: &Scratch, image: &str, bitmap: &str, cluster: u64) -> BTreeSet<u64> {
    dirty_ranges(s, image, bitmap)
        .into_iter()
        .flat_map(|(start, len)| start / cluster..(start + len).div_ceil(cluster))
        .collect()
}

/// Target clusters (of `cluster` bytes) the overlay itself allocates.
fn overlay_clusters(s: &Scratch, image: &str, cluster: u64) -> BTreeSet<u64> {
    let mut set = BTreeSet::new();
    for e in s.qemu_map(image, "qcow2") {
        if e.depth == 0 && e.present {
            set.extend(e.start / cluster..e.end().div_ceil(cluster));
        }
    }
    set
}

/// Bitmap granularity `granularity` against target clusters of `cluster`
/// bytes (both sides of the cluster size, as the backup job handles them).
fn incremental_case(granularity: &str, cluster: u64) {
    let s = Scratch::new();
    s.create("d.qcow2", "qcow2", 32 * MIB, "");
    s.io(
        "d.qcow2",
        "qcow2",
        &["write -P 0x01 0 4M", "write -P 0x02 20M 1M"],
    );
    // The cycle starts at a full backup that clears the bitmap (and records
    // that its generation starts there).
    s.img(&["bitmap", "--add", "-g", granularity, "d.qcow2", "bm0"]);
    s.backup(&["--bitmap", "bm0", "d.qcow2", "full.qcow2"])
        .assert_ok();
    s.io(
        "d.qcow2",
        "qcow2",
        &[
            "write -P 0x07 300k 8k",
            "write -P 0x08 6M 1M",
            "write -z 0 64k",
            "write -P 0x09 31M 512",
            "discard 20M 128k",
        ],
    );
    let want = dirty_clusters_per_qemu(&s, "d.qcow2", "bm0", cluster);
    assert!(!want.is_empty());
    let cs = cluster.to_string();
    backup_incremental(
        &s,
        &["--cluster-size", &cs],
        ("bm0", "full.qcow2"),
        "d.qcow2",
        "inc.qcow2",
    )
    .assert_ok();
    assert_check_clean(s.dir(), "inc.qcow2");
    assert_identical(s.dir(), "d.qcow2", "qcow2", "inc.qcow2", "qcow2");
    assert_eq!(
        overlay_clusters(&s, "inc.qcow2", cluster),
        want,
        "granularity {granularity}, cluster {cluster}"
    );
    // --bitmap-mode on-success (the default) cleared it, cleanly.
    assert!(dirty_clusters_per_qemu(&s, "d.qcow2", "bm0", cluster).is_empty());
    assert_check_clean(s.dir(), "d.qcow2");
}

#[test]
fn bitmap_granularity_below_the_cluster_size() {
    incremental_case("512", 64 * KIB);
    incremental_case("4k", 64 * KIB);
    incremental_case("64k", 2 * MIB);
    incremental_case("512", 2 * MIB);
}

#[test]
fn bitmap_granularity_equal_to_the_cluster_size() {
    incremental_case("64k", 64 * KIB);
    incremental_case("2M", 2 * MIB);
}

#[test]
fn bitmap_granularity_above_the_cluster_size() {
    incremental_case("1M", 64 * KIB);
    incremental_case("2M", 64 * KIB);
}

#[test]
/// With --require-bitmap (without it, these fall back to an incremental
/// by content: tests/verify.rs).
fn missing_and_in_use_bitmaps_are_refused() {
    let s = Scratch::new();
    s.create("d.qcow2", "qcow2", 4 * MIB, "");
    s.backup(&["d.qcow2", "full.qcow2"]).assert_ok();
    s.img(&["bitmap", "--add", "d.qcow2", "bm0"]);
    s.io("d.qcow2", "qcow2", &["write -P 0x07 0 64k"]);
    let inc = |bitmap: &str| {
        backup_incremental(
            &s,
            &["--require-bitmap"],
            (bitmap, "full.qcow2"),
            "d.qcow2",
            "inc.qcow2",
        )
    };
    inc("nope").assert_clean_failure_mentioning(&["no persistent dirty bitmap named 'nope'"]);
    // Mark bm0 in use, as a QEMU killed while it had the image open leaves
    // it: flags are at byte 12 of the first directory entry.
    let img = s.path("d.qcow2");
    mark_first_bitmap_in_use(&img);
    assert!(s
        .qemu_info("d.qcow2", "qcow2")
        .to_string()
        .contains("in-use"));
    inc("bm0").assert_clean_failure_mentioning(&["marked in use"]);
    assert!(!s.path("inc.qcow2").exists());
    assert_no_leftovers(s.dir());
    // A raw image cannot hold one.
    s.img(&["convert", "-O", "raw", "full.qcow2", "d.raw"]);
    backup_incremental(
        &s,
        &["--require-bitmap"],
        ("bm0", "full.qcow2"),
        "d.raw",
        "x.qcow2",
    )
    .assert_clean_failure_mentioning(&["cannot hold a persistent dirty bitmap"]);
}

/// Regression: TARGET may not be PREV (or a file under it): `--force` would
/// replace the previous backup with an overlay on itself. And PREV must
/// have the source's size, or clean clusters past its end would read as
/// zeros.
#[test]
fn previous_backup_that_is_the_target_or_another_size_is_refused() {
    let s = Scratch::new();
    s.create("d.qcow2", "qcow2", 4 * MIB, "");
    s.io("d.qcow2", "qcow2", &["write -P 0x01 0 1M"]);
    s.backup(&["d.qcow2", "full.qcow2"]).assert_ok();
    s.img(&["bitmap", "--add", "d.qcow2", "bm0"]);
    s.io("d.qcow2", "qcow2", &["write -P 0x07 0 64k"]);
    let before = std::fs::read(s.path("full.qcow2")).unwrap();
    backup_incremental(
        &s,
        &["--force"],
        ("bm0", "full.qcow2"),
        "d.qcow2",
        "full.qcow2",
    )
    .assert_clean_failure_mentioning(&["which the source reads", "full.qcow2"]);
    assert_eq!(
        std::fs::read(s.path("full.qcow2")).unwrap(),
        before,
        "PREV untouched"
    );
    s.img(&["convert", "-O", "raw", "full.qcow2", "full.raw"]);
    backup_incremental(&s, &[], ("bm0", "full.raw"), "d.qcow2", "inc.qcow2")
        .assert_clean_failure_mentioning(&["full.raw is a raw image, not a qcow2 backup"]);
    s.create("small.qcow2", "qcow2", 2 * MIB, "");
    backup_incremental(&s, &[], ("bm0", "small.qcow2"), "d.qcow2", "inc.qcow2")
        .assert_clean_failure_mentioning(&["same disk size"]);
    assert!(!s.path("inc.qcow2").exists());
    assert_no_leftovers(s.dir());
}

/// A damaged bitmaps extension: QEMU refuses to open the image for every
/// command, and so do `info`, `map` and `backup`, with the same line.
#[test]
fn damaged_bitmaps_extension_is_refused_alike_by_every_command() {
    let s = Scratch::new();
    s.create("good.qcow2", "qcow2", 4 * MIB, "");
    s.img(&["bitmap", "--add", "good.qcow2", "bm0"]);
    s.io("good.qcow2", "qcow2", &["write -P 0x07 0 64k"]);
    let good = s.path("good.qcow2");
    let ext = qcow2_header_extension(&good, 0x2385_2875);
    let dir = read_u64(&good, ext + 8 + 16);
    let table = read_u64(&good, dir);
    // (image, the 32-bit field damaged, how, what qbackup says)
    type Damage = (&'static str, u64, fn(u32) -> u32, &'static str);
    let cases: [Damage; 3] = [
        // Type byte 2 (granularity and name length kept).
        (
            "type.qcow2",
            dir + 16,
            |v| v & 0x00ff_ffff | 2 << 24,
            "unknown bitmap type",
        ),
        // extra_data_compatible, which QEMU counts as reserved.
        ("flags.qcow2", dir + 12, |v| v | 0b100, "reserved flags"),
        // A reserved bit in the first bitmap table entry.
        ("table.qcow2", table + 4, |v| v | 0b1000, "reserved bits"),
    ];
    for (name, at, damage, says) in cases {
        std::fs::copy(&good, s.path(name)).unwrap();
        let img = s.path(name);
        patch_u32(&img, at, damage(read_u32(&img, at)));
        let (code, _) = qemu_img_status(s.dir(), &["info", name]);
        assert_eq!(code, Some(1), "qemu-img info refuses {name}");
        let (code, _) = qemu_img_status(s.dir(), &["map", "--output=json", name]);
        assert_eq!(code, Some(1), "qemu-img map refuses {name}");
        for args in [
            vec!["info", name],
            vec!["map", "--output=json", name],
            vec!["backup", name, "out.qcow2"],
        ] {
            qbackup_in(s.dir(), &args).assert_clean_failure_mentioning(&[says, name]);
        }
        assert!(!s.path("out.qcow2").exists());
    }
}
