//! qemu-img options people reach for, against qemu-img on backing chains:
//! `info --backing-chain` (JSON: one object per image, the contract's keys;
//! human: one block per image) and `map --start-offset/--max-length` (JSON
//! and human output identical to qemu-img's, ranges inside, across and past
//! the disk, unaligned, qemu-img's size syntax).

mod common;

use std::path::Path;

use common::compare::{map_diff, project_info};
use common::oracle::{qemu_img_in, qemu_img_status};
use common::run::{qbackup_in, Run};
use common::scratch::Scratch;
use common::MIB;
use serde_json::Value;

/// base.raw (3 MiB) <- mid.qcow2 (4 KiB clusters) <- top.qcow2 (4 MiB,
/// 64 KiB clusters), in `dir/`, with data, zeros and discards in each.
fn chain(s: &Scratch) {
    s.mkdir("dir");
    s.create("dir/base.raw", "raw", 3 * MIB, "");
    s.io(
        "dir/base.raw",
        "raw",
        &["write -P 1 0 1M", "write -P 2 2M 300k"],
    );
    s.overlay(
        "dir/mid.qcow2",
        "base.raw",
        "raw",
        Some(4 * MIB),
        "cluster_size=4096",
    );
    s.io(
        "dir/mid.qcow2",
        "qcow2",
        &[
            "write -P 3 100k 20k",
            "write -z 512k 64k",
            "write -P 4 3M 128k",
        ],
    );
    s.overlay("dir/top.qcow2", "mid.qcow2", "qcow2", None, "");
    s.io(
        "dir/top.qcow2",
        "qcow2",
        &[
            "write -P 5 64k 64k",
            "discard 2M 64k",
            "write -P 6 4032k 64k",
        ],
    );
}

fn run_both(dir: &Path, args: &[&str]) -> (String, Run) {
    let expected = qemu_img_in(dir, args);
    let run = qbackup_in(dir, args);
    run.assert_ok();
    (expected, run)
}

#[test]
fn info_backing_chain_matches_qemu_img() {
    let s = Scratch::new();
    chain(&s);
    // Relative to the working directory and absolute: the names of the
    // images below follow the top's.
    for (cwd, top) in [
        (s.path("dir"), "top.qcow2".to_string()),
        (s.dir().to_path_buf(), s.p("dir/top.qcow2")),
    ] {
        let args = ["info", "--backing-chain", "--output=json", top.as_str()];
        let (expected, run) = run_both(&cwd, &args);
        let expected: Value = serde_json::from_str(&expected).unwrap();
        let actual = run.json();
        let (e, a) = (expected.as_array().unwrap(), actual.as_array().unwrap());
        assert_eq!(e.len(), 3, "{expected}");
        assert_eq!(a.len(), e.len(), "{}", run.describe());
        for (x, y) in e.iter().zip(a) {
            assert_eq!(
                project_info(x),
                project_info(y),
                "qemu-img {x}\nqbackup {y}"
            );
            assert_eq!(x["filename"], y["filename"]);
        }
        // Human: one block per image, in the same order, blank-line separated.
        let (expected, run) = run_both(&cwd, &["info", "--backing-chain", top.as_str()]);
        let images = |t: &str| -> Vec<String> {
            t.lines()
                .filter(|l| l.starts_with("image: "))
                .map(String::from)
                .collect()
        };
        assert_eq!(images(&expected), images(&run.stdout), "{}", run.stdout);
        assert_eq!(run.stdout.split("\n\n").count(), 3, "{}", run.stdout);
        // Each block is what plain `info` prints for that image.
        for (block, name) in run
            .stdout
            .split("\n\n")
            .zip(["top.qcow2", "mid.qcow2", "base.raw"])
        {
            let img = block
                .lines()
                .next()
                .unwrap()
                .strip_prefix("image: ")
                .unwrap();
            assert!(img.ends_with(name), "{block}");
            let one = qbackup_in(&cwd, &["info", img]);
            assert_eq!(one.assert_ok().stdout.trim_end(), block.trim_end());
        }
    }
    // Without --backing-chain: one object, as before.
    let one = qbackup_in(&s.path("dir"), &["info", "--output=json", "top.qcow2"])
        .assert_ok()
        .json();
    assert!(one.is_object());
}

#[test]
fn info_backing_chain_with_a_missing_backing_file_fails_cleanly() {
    let s = Scratch::new();
    s.overlay_unchecked("top.qcow2", "gone.qcow2", "qcow2", MIB);
    let (code, _) = qemu_img_status(s.dir(), &["info", "--backing-chain", "top.qcow2"]);
    assert_eq!(code, Some(1));
    qbackup_in(s.dir(), &["info", "--backing-chain", "top.qcow2"])
        .assert_clean_failure(&["gone.qcow2"]);
    // Plain info does not open the backing file.
    qbackup_in(s.dir(), &["info", "top.qcow2"]).assert_ok();
}

#[test]
fn map_ranges_match_qemu_img() {
    let s = Scratch::new();
    chain(&s);
    let cwd = s.path("dir");
    let ranges: &[&[&str]] = &[
        &["--start-offset=700k", "--max-length=3000k"],
        &["--start-offset=0", "--max-length=1"],
        &["--start-offset=100001", "--max-length=77777"],
        &["--start-offset=2M"],
        &["--max-length=65536"],
        &["--max-length=0"],
        &["--start-offset=4M"],
        &["--start-offset=5M", "--max-length=1M"],
        &["--start-offset=3.5M", "--max-length=10G"],
        &["-s", "0x19000", "-l", "1.5k"],
        &["--start-offset", "4194303"],
    ];
    for r in ranges {
        for output in ["--output=json", "--output=human"] {
            let args = [&["map", output], *r, &["top.qcow2"]].concat();
            let (expected, run) = run_both(&cwd, &args);
            if output.ends_with("json") {
                let e: Value = serde_json::from_str(&expected).unwrap();
                if let Some(d) = map_diff(&e, &run.json()) {
                    panic!("{args:?} differs from qemu-img:\n{d}");
                }
            } else {
                assert_eq!(run.stdout, expected, "{args:?}");
            }
        }
    }
}

#[test]
fn map_range_values_out_of_range_are_usage_errors() {
    let s = Scratch::new();
    s.create("a.qcow2", "qcow2", MIB, "");
    for bad in [
        &["--start-offset=-1"][..],
        &["--max-length=-1"],
        &["--start-offset=9223372036854775808"],
        &["--start-offset=1.5"],
        &["--max-length=abc"],
    ] {
        let args = [&["map"], bad, &["a.qcow2"]].concat();
        let (code, _) = qemu_img_status(s.dir(), &args);
        assert_eq!(code, Some(1), "qemu-img refuses {bad:?} too");
        qbackup_in(s.dir(), &args).assert_usage_error(&["offset", "length"]);
    }
}
