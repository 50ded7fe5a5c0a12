//! `qbackup info` (and `map`) against qemu-img for the qcow2 features that
//! `info` reports in its format-specific data: refcount widths, lazy
//! refcounts, the dirty bit, external data files and dirty bitmaps.
//!
//! Every image is built at test time with qemu-img / qemu-io, then
//! [`common::check`] compares: `map --output=json` (parsed, must be
//! identical), human `map` (identical text, or a clean refusal where qemu-img
//! refuses compressed clusters) and `info --output=json` (the contract's keys).

mod common;

use common::compare::{assert_image_matches, check};
use common::map_info::MIX;
use common::oracle::qemu_info_json;
use common::qcow2::{ext, hdr, patch_u32, patch_u64, qcow2_header_extension, read_u32, read_u64};
use common::run::qbackup_info_ok;
use common::scratch::Scratch;
use common::{test_cases, MIB};

// ---------------------------------------------------------------------------
// refcounts, lazy refcounts, dirty bit
// ---------------------------------------------------------------------------

fn refcount_case(bits: u32) {
    let s = Scratch::new();
    s.create(
        "r.qcow2",
        "qcow2",
        4 * MIB,
        &format!("refcount_bits={bits}"),
    );
    s.io("r.qcow2", "qcow2", MIX);
    check(&s, "r.qcow2", None);
    let info = qbackup_info_ok(s.dir(), &s.p("r.qcow2"), None);
    assert_eq!(info["format-specific"]["data"]["refcount-bits"], bits);
}

test_cases! { refcount_case =>
    qcow2_refcount_bits_1(1);
    qcow2_refcount_bits_2(2);
    qcow2_refcount_bits_8(8);
    qcow2_refcount_bits_64(64);
}

#[test]
fn qcow2_lazy_refcounts() {
    let s = Scratch::new();
    s.create("lazy.qcow2", "qcow2", 4 * MIB, "lazy_refcounts=on");
    s.io("lazy.qcow2", "qcow2", MIX);
    check(&s, "lazy.qcow2", None);
    let info = qbackup_info_ok(s.dir(), &s.p("lazy.qcow2"), None);
    assert_eq!(info["format-specific"]["data"]["lazy-refcounts"], true);
}

#[test]
fn qcow2_dirty_bit() {
    let s = Scratch::new();
    let p = s.create("dirty.qcow2", "qcow2", 4 * MIB, "lazy_refcounts=on");
    s.io(
        "dirty.qcow2",
        "qcow2",
        &["write -P 1 0 128k", "write -z 1M 64k"],
    );
    let inc = read_u64(&p, hdr::INCOMPATIBLE_FEATURES);
    patch_u64(&p, hdr::INCOMPATIBLE_FEATURES, inc | 1);
    let q = qemu_info_json(s.dir(), &s.p("dirty.qcow2"), None);
    assert_eq!(
        q["dirty-flag"], true,
        "test premise: qemu-img sees the dirty bit"
    );
    check(&s, "dirty.qcow2", None);
    let info = qbackup_info_ok(s.dir(), &s.p("dirty.qcow2"), None);
    assert_eq!(info["dirty-flag"], true);
}

// ---------------------------------------------------------------------------
// external data file
// ---------------------------------------------------------------------------

#[test]
fn qcow2_external_data_file() {
    let s = Scratch::new();
    // qemu-img resolves a relative data file against its cwd: use an absolute path.
    let opts = format!("data_file={}", s.p("data.raw"));
    s.create("ext.qcow2", "qcow2", 4 * MIB, &opts);
    s.io(
        "ext.qcow2",
        "qcow2",
        &[
            "write -P 1 64k 64k",
            "write -z 1M 64k",
            "write -P 2 2M 1M",
            "discard 2M 64k",
        ],
    );
    check(&s, "ext.qcow2", None);
    let info = qbackup_info_ok(s.dir(), &s.p("ext.qcow2"), None);
    assert_eq!(
        info["format-specific"]["data"]["data-file"],
        s.p("data.raw").as_str()
    );
}

#[test]
fn qcow2_external_data_file_raw() {
    let s = Scratch::new();
    let opts = format!("data_file={},data_file_raw=on", s.p("data.raw"));
    s.create("extraw.qcow2", "qcow2", 4 * MIB, &opts);
    s.io(
        "extraw.qcow2",
        "qcow2",
        &["write -P 1 64k 64k", "write -P 2 2M 1M"],
    );
    check(&s, "extraw.qcow2", None);
    let info = qbackup_info_ok(s.dir(), &s.p("extraw.qcow2"), None);
    assert_eq!(info["format-specific"]["data"]["data-file-raw"], true);
}

#[test]
fn qcow2_external_data_file_as_backing() {
    let s = Scratch::new();
    let opts = format!("data_file={}", s.p("data.raw"));
    s.create("ext.qcow2", "qcow2", 4 * MIB, &opts);
    s.io("ext.qcow2", "qcow2", &["write -P 1 0 1M"]);
    s.overlay("top.qcow2", "ext.qcow2", "qcow2", None, "");
    s.io("top.qcow2", "qcow2", &["write -P 2 512k 64k"]);
    check(&s, "top.qcow2", None);
}

#[test]
fn qcow2_external_data_file_relative_name() {
    // A relative data file name, used from the image's own directory (where
    // qemu-img's cwd-relative resolution and the image-relative one agree).
    let s = Scratch::new();
    s.create("rel.qcow2", "qcow2", 4 * MIB, "data_file=data.raw");
    s.io(
        "rel.qcow2",
        "qcow2",
        &["write -P 1 0 64k", "write -P 2 3M 64k"],
    );
    assert_image_matches(s.dir(), "rel.qcow2", None);
    let info = qbackup_info_ok(s.dir(), "rel.qcow2", None);
    assert_eq!(info["format-specific"]["data"]["data-file"], "data.raw");
}

// ---------------------------------------------------------------------------
// bitmaps
// ---------------------------------------------------------------------------

#[test]
fn qcow2_dirty_bitmaps_info() {
    let s = Scratch::new();
    let img = s.p("bm.qcow2");
    s.create("bm.qcow2", "qcow2", 4 * MIB, "");
    s.img(&["bitmap", "--add", &img, "enabled-default"]);
    s.img(&[
        "bitmap",
        "--add",
        "-g",
        "1M",
        "--disable",
        &img,
        "disabled-1m",
    ]);
    s.img(&["bitmap", "--add", "-g", "4096", &img, "enabled-4k"]);
    s.img(&["bitmap", "--add", "-g", "16M", "--disable", &img, "zz"]);
    s.io(
        "bm.qcow2",
        "qcow2",
        &["write -P 1 0 64k", "write -P 2 2M 4k"],
    );
    check(&s, "bm.qcow2", None);
    let info = qbackup_info_ok(s.dir(), &img, None);
    let bms = info["format-specific"]["data"]["bitmaps"]
        .as_array()
        .expect("bitmaps array")
        .clone();
    assert_eq!(bms.len(), 4);
    assert_eq!(bms[1]["granularity"], 1048576);
}

#[test]
fn qcow2_dirty_bitmaps_on_v3_with_chain() {
    let s = Scratch::new();
    s.create("base.qcow2", "qcow2", 4 * MIB, "");
    s.io("base.qcow2", "qcow2", &["write -P 1 0 1M"]);
    let top = s.overlay("top.qcow2", "base.qcow2", "qcow2", None, "");
    s.img(&["bitmap", "--add", "-g", "128k", top.to_str().unwrap(), "b0"]);
    s.io("top.qcow2", "qcow2", &["write -P 2 512k 64k"]);
    check(&s, "top.qcow2", None);
}

#[test]
fn qcow2_bitmap_flags_in_use() {
    // A bitmap left "in use" by a QEMU that did not close the image.
    let s = Scratch::new();
    let p = s.create("inuse.qcow2", "qcow2", 4 * MIB, "");
    s.img(&["bitmap", "--add", &s.p("inuse.qcow2"), "b1"]);
    s.img(&["bitmap", "--add", "--disable", &s.p("inuse.qcow2"), "b2"]);
    // Bitmaps extension: nb_bitmaps u32, reserved u32, directory size u64,
    // directory offset u64.
    let dir = read_u64(&p, qcow2_header_extension(&p, ext::BITMAPS) + 8 + 16);
    // Entry: table offset u64, table size u32, flags u32 (bit 0 in_use, 1 auto).
    let flags = read_u32(&p, dir + 12);
    patch_u32(&p, dir + 12, flags | 1);
    let q = qemu_info_json(s.dir(), &s.p("inuse.qcow2"), None);
    assert_eq!(
        q["format-specific"]["data"]["bitmaps"][0]["flags"],
        serde_json::json!(["in-use", "auto"]),
        "test premise"
    );
    check(&s, "inuse.qcow2", None);
}

#[test]
fn qcow2_bitmaps_invalid_without_autoclear_bit() {
    // Autoclear bit 0 cleared: a writer without bitmap support touched the
    // image, so qemu-img ignores the bitmaps extension.
    let s = Scratch::new();
    let p = s.create("noauto.qcow2", "qcow2", 4 * MIB, "");
    s.img(&["bitmap", "--add", &s.p("noauto.qcow2"), "b1"]);
    s.io("noauto.qcow2", "qcow2", &["write -P 1 0 64k"]);
    patch_u64(&p, hdr::AUTOCLEAR_FEATURES, 0);
    let q = qemu_info_json(s.dir(), &s.p("noauto.qcow2"), None);
    assert!(
        q["format-specific"]["data"].get("bitmaps").is_none(),
        "test premise"
    );
    check(&s, "noauto.qcow2", None);
}
