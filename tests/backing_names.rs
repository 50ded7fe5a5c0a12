//! The backing file name a backup records (issue 19): relative to the
//! target's directory whenever both files are on one file system, in a
//! sibling directory too (`../a/full.qcow2`), so that a tree of backups can
//! be moved; absolute across file systems. Checked with qemu-img: the name
//! recorded, and that it resolves (`compare` of the chain with the source).

mod common;

use std::os::unix::fs::MetadataExt;

use common::oracle::{assert_check_clean, assert_identical};
use common::scratch::Scratch;
use common::MIB;

fn disk(s: &Scratch, name: &str) {
    s.create(name, "qcow2", 4 * MIB, "");
    s.io(
        name,
        "qcow2",
        &["write -P 0x11 0 1M", "write -P 0x22 3M 64k"],
    );
}

#[test]
fn incremental_in_a_sibling_directory_names_its_parent_relatively() {
    let s = Scratch::new();
    s.mkdir("a");
    s.mkdir("b/deeper");
    disk(&s, "d.qcow2");
    s.backup(&["d.qcow2", "a/full.qcow2"]).assert_ok();
    s.io("d.qcow2", "qcow2", &["write -P 0x33 2M 64k"]);
    let cases = [
        ("b/inc.qcow2", "a/full.qcow2", "../a/full.qcow2"),
        ("b/deeper/inc.qcow2", "a/full.qcow2", "../../a/full.qcow2"),
        // Below the target's directory, and beside it, as before.
        ("inc-top.qcow2", "a/full.qcow2", "a/full.qcow2"),
        ("a/inc.qcow2", "a/full.qcow2", "full.qcow2"),
        // Named from elsewhere: the canonical path counts.
        ("b/inc2.qcow2", "b/../a/./full.qcow2", "../a/full.qcow2"),
    ];
    for (target, prev, recorded) in cases {
        s.backup(&[
            "--sync",
            "incremental",
            "--backing",
            prev,
            "d.qcow2",
            target,
        ])
        .assert_ok();
        let info = s.qemu_info(target, "qcow2");
        assert_eq!(info["backing-filename"], recorded, "{target}: {info}");
        assert_check_clean(s.dir(), target);
        assert_identical(s.dir(), "d.qcow2", "qcow2", target, "qcow2");
    }
    // The tree moves as a whole: the relative names still resolve.
    std::fs::rename(s.path("a"), s.path("moved-a")).unwrap();
    std::fs::rename(s.path("b"), s.path("moved-b")).unwrap();
    std::fs::create_dir(s.path("tree")).unwrap();
    std::fs::rename(s.path("moved-a"), s.path("tree/a")).unwrap();
    std::fs::rename(s.path("moved-b"), s.path("tree/b")).unwrap();
    assert_identical(s.dir(), "d.qcow2", "qcow2", "tree/b/inc.qcow2", "qcow2");
    assert_identical(
        s.dir(),
        "d.qcow2",
        "qcow2",
        "tree/b/deeper/inc.qcow2",
        "qcow2",
    );
}

#[test]
fn top_overlay_in_a_sibling_directory_names_its_base_relatively() {
    let s = Scratch::new();
    s.mkdir("src");
    s.mkdir("out");
    disk(&s, "src/base.qcow2");
    s.overlay("src/top.qcow2", "base.qcow2", "qcow2", None, "");
    s.io("src/top.qcow2", "qcow2", &["write -P 0x44 1M 64k"]);
    s.backup(&["--sync", "top", "src/top.qcow2", "out/top.qcow2"])
        .assert_ok();
    let info = s.qemu_info("out/top.qcow2", "qcow2");
    assert_eq!(info["backing-filename"], "../src/base.qcow2", "{info}");
    assert_identical(s.dir(), "src/top.qcow2", "qcow2", "out/top.qcow2", "qcow2");
}

#[test]
fn another_file_system_gets_an_absolute_name() {
    let s = Scratch::new();
    // A directory on another file system (a tmpfs), when the machine has one.
    let Ok(other) = tempfile::Builder::new()
        .prefix("qbackup-test-")
        .tempdir_in("/dev/shm")
    else {
        eprintln!("no /dev/shm: the cross-file-system case is not tested here");
        return;
    };
    let dev = |p: &std::path::Path| std::fs::metadata(p).unwrap().dev();
    if dev(other.path()) == dev(s.dir()) {
        eprintln!("/dev/shm is on the scratch directory's file system: not tested here");
        return;
    }
    disk(&s, "d.qcow2");
    let full = other.path().join("full.qcow2");
    let full = full.to_str().unwrap();
    s.backup(&["d.qcow2", full]).assert_ok();
    s.io("d.qcow2", "qcow2", &["write -P 0x33 2M 64k"]);
    s.backup(&[
        "--sync",
        "incremental",
        "--backing",
        full,
        "d.qcow2",
        "inc.qcow2",
    ])
    .assert_ok();
    let info = s.qemu_info("inc.qcow2", "qcow2");
    let canonical = std::fs::canonicalize(full).unwrap();
    assert_eq!(
        info["backing-filename"],
        canonical.to_str().unwrap(),
        "{info}"
    );
    assert_identical(s.dir(), "d.qcow2", "qcow2", "inc.qcow2", "qcow2");
}
