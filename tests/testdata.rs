//! The committed images in testdata/ (made by testdata/make-testdata.sh):
//! `qbackup map` and `info` on them must match qemu-img, run from the repo
//! root with relative paths as a user would type them.

mod common;

use std::path::Path;
use std::process::Command;

use common::compare::assert_image_matches;
use common::oracle::{count_extents, qemu_img_status, qemu_map_json};
use common::qcow2::file_len;
use common::run::{qbackup_info_ok, run_checked};
use common::scratch::Scratch;
use common::MIB;

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

const IMAGES: &[&str] = &[
    "testdata/mixed.qcow2",
    "testdata/chain/base.qcow2",
    "testdata/chain/top.qcow2",
    "testdata/small.raw",
];

#[test]
fn committed_images_exist_and_are_small() {
    for img in IMAGES {
        let p = repo().join(img);
        let len = file_len(&p);
        assert!(
            len > 0 && len < MIB,
            "{img}: {len} bytes, expected (0, 1 MiB)"
        );
    }
}

#[test]
fn mixed_qcow2() {
    let img = "testdata/mixed.qcow2";
    assert_image_matches(repo(), img, None);
    let map = qemu_map_json(repo(), img, None);
    assert!(count_extents(&map, |e| e["compressed"] == true) >= 1);
    assert!(count_extents(&map, |e| e["present"] == true && e["zero"] == true) >= 1);
}

#[test]
fn chain_from_repo_root() {
    assert_image_matches(repo(), "testdata/chain/top.qcow2", None);
    assert_image_matches(repo(), "testdata/chain/base.qcow2", None);
    let info = qbackup_info_ok(repo(), "testdata/chain/top.qcow2", None);
    assert_eq!(info["backing-filename"], "base.qcow2");
    assert_eq!(info["full-backing-filename"], "testdata/chain/base.qcow2");
}

#[test]
fn chain_from_its_own_directory() {
    assert_image_matches(&repo().join("testdata/chain"), "top.qcow2", None);
}

#[test]
fn chain_from_absolute_path() {
    let top = repo().join("testdata/chain/top.qcow2");
    assert_image_matches(Path::new("/"), top.to_str().unwrap(), None);
}

#[test]
fn small_raw() {
    assert_image_matches(repo(), "testdata/small.raw", None);
    assert_image_matches(repo(), "testdata/small.raw", Some("raw"));
}

/// The script still produces what is committed. Compressed clusters are
/// written in parallel and holes in the host files vary (a git checkout fills
/// them), so layouts differ: compare guest-visible content only.
#[test]
fn make_testdata_script_reproduces_committed_content() {
    let s = Scratch::new();
    run_checked(
        Command::new("bash")
            .arg(repo().join("testdata/make-testdata.sh"))
            .arg(s.dir()),
    );
    for img in IMAGES {
        let fresh = s.p(img.strip_prefix("testdata/").unwrap());
        let (code, out) = qemu_img_status(repo(), &["compare", img, &fresh]);
        assert_eq!(
            code,
            Some(0),
            "{img} differs from what make-testdata.sh makes: {out}"
        );
    }
}
