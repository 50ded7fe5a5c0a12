//! `qbackup compare` against `qemu-img compare` on the same pairs: the same
//! stdout and exit status (0 identical, 1 different, 2 error), including
//! the first differing offset, size mismatches with zero and non-zero
//! tails, strict sizes, compressed backups, chains against flat copies and
//! NBD exports against files. Strict block-status mismatches are checked
//! against qbackup's documented rule (allocation, zero and data flags),
//! since qemu-img compares internal status words.

mod common;

use common::oracle::qemu_img_status;
use common::process::qemu_nbd_with;
use common::run::{qbackup_in, Run};
use common::scratch::Scratch;
use common::MIB;

/// Both tools on the same arguments: same stdout, same exit status.
fn assert_same_as_qemu(s: &Scratch, args: &[&str]) -> Run {
    let ours = qbackup_in(s.dir(), &[&["compare"], args].concat());
    let (code, text) = qemu_img_status(s.dir(), &[&["compare"], args].concat());
    ours.assert_no_panic();
    assert_eq!(
        ours.code,
        code,
        "exit status\n{}\nqemu-img: {text}",
        ours.describe()
    );
    if code != Some(2) {
        assert_eq!(ours.stdout, text, "stdout\n{}", ours.describe());
    }
    ours
}

fn base(s: &Scratch, name: &str, size: u64) {
    s.create(name, "qcow2", size, "");
    s.io(
        name,
        "qcow2",
        &["write -P 0x01 0 1M", "write -P 0x02 3M 64k"],
    );
}

#[test]
fn identical_and_one_byte_apart() {
    let s = Scratch::new();
    base(&s, "a.qcow2", 4 * MIB);
    base(&s, "b.qcow2", 4 * MIB);
    assert_same_as_qemu(&s, &["a.qcow2", "b.qcow2"]).assert_ok();
    s.io("b.qcow2", "qcow2", &["write -P 0x09 700k 1"]);
    assert_same_as_qemu(&s, &["a.qcow2", "b.qcow2"]);
    // An unaligned difference: qemu-img names its 512-byte sector.
    base(&s, "u.qcow2", 4 * MIB);
    s.io("u.qcow2", "qcow2", &["write -P 0x09 300001 1"]);
    assert_same_as_qemu(&s, &["a.qcow2", "u.qcow2"]);
    // A zero cluster against unallocated space is the same data.
    base(&s, "c.qcow2", 4 * MIB);
    s.io("c.qcow2", "qcow2", &["write -z 2M 64k"]);
    assert_same_as_qemu(&s, &["a.qcow2", "c.qcow2"]).assert_ok();
}

#[test]
fn size_mismatch_with_zero_and_non_zero_tails() {
    let s = Scratch::new();
    base(&s, "a.qcow2", 4 * MIB);
    base(&s, "long.qcow2", 5 * MIB);
    assert_same_as_qemu(&s, &["a.qcow2", "long.qcow2"]).assert_ok();
    assert_same_as_qemu(&s, &["long.qcow2", "a.qcow2"]).assert_ok();
    assert_same_as_qemu(&s, &["-s", "a.qcow2", "long.qcow2"]);
    s.io("long.qcow2", "qcow2", &["write -P 0x09 4200k 512"]);
    assert_same_as_qemu(&s, &["a.qcow2", "long.qcow2"]);
    s.io("long.qcow2", "qcow2", &["write -P 0x08 4194305 1"]);
    assert_same_as_qemu(&s, &["a.qcow2", "long.qcow2"]);
}

#[test]
fn backups_chains_and_exports() {
    let s = Scratch::new();
    base(&s, "base.qcow2", 8 * MIB);
    s.overlay("top.qcow2", "base.qcow2", "qcow2", None, "");
    s.io("top.qcow2", "qcow2", &[&s.text_cmd("", 5 * MIB, MIB)]);
    s.backup(&["top.qcow2", "full.qcow2"]).assert_ok();
    s.backup(&["-O", "raw", "top.qcow2", "full.raw"])
        .assert_ok();
    assert_same_as_qemu(&s, &["top.qcow2", "full.qcow2"]).assert_ok();
    assert_same_as_qemu(&s, &["-f", "qcow2", "-F", "raw", "full.qcow2", "full.raw"]).assert_ok();
    s.io("full.qcow2", "qcow2", &["write -P 0x77 6M 4k"]);
    assert_same_as_qemu(&s, &["top.qcow2", "full.qcow2"]);
    // An NBD export of the chain against the file.
    let (_nbd, uri) = qemu_nbd_with(&s, "top.qcow2", &["-r", "-t", "-f", "qcow2"]);
    assert_same_as_qemu(&s, &[uri.as_str(), "full.raw"]).assert_ok();
}

#[test]
fn strict_status_and_errors() {
    let s = Scratch::new();
    base(&s, "a.qcow2", 4 * MIB);
    base(&s, "b.qcow2", 4 * MIB);
    qbackup_in(s.dir(), &["compare", "-s", "a.qcow2", "b.qcow2"]).assert_ok();
    s.io("b.qcow2", "qcow2", &["write -z 2M 64k"]);
    let run = qbackup_in(s.dir(), &["compare", "-s", "a.qcow2", "b.qcow2"]);
    assert_eq!(run.code, Some(1), "{}", run.describe());
    assert_eq!(
        run.stdout,
        "Strict mode: Offset 2097152 block status mismatch!\n"
    );
    let run = qbackup_in(s.dir(), &["compare", "-q", "a.qcow2", "b.qcow2"]);
    assert_eq!((run.code, run.stdout.as_str()), (Some(0), ""), "-q");
    // Errors: exit 2 and the one-line contract.
    for args in [
        ["compare", "a.qcow2", "missing.qcow2"],
        ["compare", "missing.qcow2", "a.qcow2"],
    ] {
        let run = qbackup_in(s.dir(), &args);
        assert_eq!(run.code, Some(2), "{}", run.describe());
        let line = run.stderr.trim_end();
        assert!(
            line.starts_with("qbackup: ") && !line.contains('\n') && line.contains("missing.qcow2"),
            "{}",
            run.describe()
        );
    }
}
