//! `qbackup map` and `qbackup info` against qemu-img for raw images: odd
//! sizes, sparse files, an empty file, full preallocation, a large sparse
//! image, probing by content, and a qcow2 file opened with `-f raw`.
//!
//! Every image is built at test time with qemu-img / qemu-io, then
//! [`common::check`] compares: `map --output=json` (parsed, must be
//! identical), human `map` (identical text, or a clean refusal where qemu-img
//! refuses compressed clusters) and `info --output=json` (the contract's keys).

mod common;

use common::compare::check;
use common::map_info::{has, noise};
use common::oracle::qemu_map_json;
use common::qcow2::{patch, set_len};
use common::run::qbackup_info_ok;
use common::scratch::Scratch;
use common::{GIB, MIB};

// ---------------------------------------------------------------------------
// raw
// ---------------------------------------------------------------------------

#[test]
fn raw_1000_bytes() {
    let s = Scratch::new();
    s.write_file("odd.raw", &noise(1000, 1));
    check(&s, "odd.raw", None);
    check(&s, "odd.raw", Some("raw"));
}

#[test]
fn raw_1mib_plus_3_bytes() {
    let s = Scratch::new();
    let mut v = noise((MIB + 3) as usize, 2);
    // A zero run in the middle: still data in a non-sparse file.
    v[4096..65536].fill(0);
    s.write_file("odd.raw", &v);
    check(&s, "odd.raw", None);
    check(&s, "odd.raw", Some("raw"));
}

#[test]
fn raw_sparse_with_holes() {
    let s = Scratch::new();
    s.create("sparse.raw", "raw", 8 * MIB, "");
    s.io(
        "sparse.raw",
        "raw",
        &[
            "write -P 0x11 0 4k",
            "write -P 0x22 64k 4k",
            "write -P 0x33 1M 1M",
            "write -z 1536k 64k",
            "write -P 0 3M 64k",
            "write -P 0x44 8380416 4096",
        ],
    );
    check(&s, "sparse.raw", None);
    check(&s, "sparse.raw", Some("raw"));
    let map = qemu_map_json(s.dir(), &s.p("sparse.raw"), None);
    assert!(
        has(&map, "data", false) >= 2,
        "test image should have holes: {map}"
    );
}

#[test]
fn raw_sparse_unaligned_size() {
    // Sparse file whose size is not a multiple of 512 and whose last bytes are data.
    let s = Scratch::new();
    let p = s.create("tail.raw", "raw", 2 * MIB, "");
    set_len(&p, 2 * MIB + 777);
    patch(&p, 2 * MIB + 700, &noise(77, 3));
    check(&s, "tail.raw", None);
}

#[test]
fn raw_fully_sparse() {
    let s = Scratch::new();
    s.create("hole.raw", "raw", 16 * MIB, "");
    check(&s, "hole.raw", None);
}

#[test]
fn raw_empty() {
    let s = Scratch::new();
    s.write_file("empty.raw", &[]);
    check(&s, "empty.raw", None);
    check(&s, "empty.raw", Some("raw"));
}

#[test]
fn raw_with_qcow2_lookalike_name_is_probed_as_raw() {
    // Probing is by content, never by name.
    let s = Scratch::new();
    s.write_file("not-really.qcow2", &noise(5000, 4));
    check(&s, "not-really.qcow2", None);
    let info = qbackup_info_ok(s.dir(), &s.p("not-really.qcow2"), None);
    assert_eq!(info["format"], "raw");
}

#[test]
fn raw_prealloc_full() {
    let s = Scratch::new();
    s.create("full.raw", "raw", 2 * MIB, "preallocation=full");
    check(&s, "full.raw", None);
}

#[test]
fn raw_large_sparse() {
    let s = Scratch::new();
    s.create("big.raw", "raw", 64 * GIB, "");
    let cmds: Vec<String> = (0..40u64)
        .map(|i| format!("write -P {} {} 4096", i + 1, i * 1637 * MIB))
        .collect();
    s.io_all("big.raw", "raw", &cmds);
    check(&s, "big.raw", None);
}

// ---------------------------------------------------------------------------
// qcow2 opened as raw
// ---------------------------------------------------------------------------

#[test]
fn qcow2_opened_as_raw() {
    // `-f raw` on a qcow2 file maps the file itself.
    let s = Scratch::new();
    s.create("q.qcow2", "qcow2", 4 * MIB, "");
    s.io(
        "q.qcow2",
        "qcow2",
        &["write -P 1 0 64k", "write -c -P 2 1M 64k"],
    );
    check(&s, "q.qcow2", Some("raw"));
    let info = qbackup_info_ok(s.dir(), &s.p("q.qcow2"), Some("raw"));
    assert_eq!(info["format"], "raw");
}
