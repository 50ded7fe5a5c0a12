//! End-to-end tests of `qbackup backup`.
//!
//! Images are built at test time with qemu-img and qemu-io in a temporary
//! directory; qemu-img (`check`, `compare`, `map`, `info`) is the oracle for
//! every backup, and qcow2-rs is a second, independent reader.
//!
//! - Round trips (`full_*`): every image kind the read side supports, each
//!   backed up with zstd, zlib and no compression. The target must pass
//!   `qemu-img check`, compare identical to the source, use the expected
//!   cluster size and compression type, store compressible clusters
//!   compressed and random clusters uncompressed, and leave zero clusters
//!   unallocated.
//! - `raw_target_*`: `-O raw` is identical and sparse.
//! - `top_*`: `--sync top` writes only what the top layer allocates, over the
//!   right backing file, and keeps top-layer zero clusters as zero clusters.
//! - `qcow2_rs_*`: qcow2-rs reads a zlib backup back byte for byte.
//! - `deterministic_*`: the number of threads does not change the output.
//! - `passthrough_*`: compressed source clusters copied as they are.
//! - `fail_*`, `sigkill_*`, `sigterm_*`, `speed_*`: failures leave nothing
//!   at TARGET and report one line; the rate limit is honoured.

mod common;

use std::path::Path;
use std::process::Command;
use std::thread;
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

const CODECS: [&str; 3] = ["zstd", "zlib", "none"];

// ---------------------------------------------------------------------------
// Verification of a full backup
// ---------------------------------------------------------------------------

/// `qemu-img check` of a qcow2 target: exit 0, no errors, no leaks.
fn assert_check_clean(dir: &Path, target: &str) {
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
fn assert_identical(dir: &Path, a: &str, a_fmt: &str, b: &str, b_fmt: &str) {
    let (code, out) = qemu_img_status(dir, &["compare", "-f", a_fmt, "-F", b_fmt, a, b]);
    assert_eq!(
        code,
        Some(0),
        "qemu-img compare -f {a_fmt} -F {b_fmt} {a} {b} (in {}) says they differ:\n{out}",
        dir.display()
    );
}

/// The cluster size a backup uses by default: 64 KiB, or the source's top
/// layer's when larger.
fn default_cluster_size(src_info: &Value) -> u64 {
    src_info
        .get("cluster-size")
        .and_then(Value::as_u64)
        .unwrap_or(0)
        .max(64 * KIB)
}

/// What the content of each target cluster must look like, decided from the
/// guest bytes (read by qemu-img), never from qbackup.
struct Expectation {
    cluster: u64,
    kinds: Vec<Kind>,
}

impl Expectation {
    fn new(guest: &[u8], cluster: u64) -> Self {
        let kinds: Vec<Kind> = guest.chunks(cluster as usize).map(classify).collect();
        Expectation { cluster, kinds }
    }

    fn count(&self, k: Kind) -> usize {
        self.kinds.iter().filter(|&&x| x == k).count()
    }
}

/// Check a target's map against the expectation: zero clusters are not
/// stored as data, compressible ones are compressed (when compressing),
/// random ones are stored as plain data, everything else is data.
fn assert_map_matches(target: &str, map: &[Extent], exp: &Expectation, compressing: bool) {
    for (i, &kind) in exp.kinds.iter().enumerate() {
        let start = i as u64 * exp.cluster;
        let end = start + exp.cluster;
        let ext = extents_in(map, start, end);
        assert!(
            !ext.is_empty(),
            "{target}: no map extent covers cluster at {start}"
        );
        let ok = |f: &dyn Fn(&Extent) -> bool| ext.iter().all(|e| f(e));
        let (good, what) = match kind {
            Kind::Zero => (ok(&|e| !e.data && e.zero), "a zero (unallocated) cluster"),
            Kind::Compressible if compressing => (
                ok(&|e| e.data && e.present && e.compressed),
                "a compressed data cluster",
            ),
            Kind::Compressible | Kind::Incompressible => (
                ok(&|e| e.data && e.present && !e.compressed),
                "an uncompressed data cluster",
            ),
            Kind::Other => (ok(&|e| e.data && e.present), "a data cluster"),
        };
        assert!(
            good,
            "{target}: guest cluster at {start} ({kind:?} content) should be {what}, map says {ext:?}"
        );
    }
    if !compressing {
        assert!(
            map.iter().all(|e| !e.compressed),
            "{target}: --compress none produced compressed clusters: {map:?}"
        );
    }
}

/// Back up `src` (format `fmt`) with every codec and verify each target.
/// `src` is a name in the scratch directory. Returns the targets' names.
fn roundtrip(s: &Scratch, src: &str, fmt: &str) -> Vec<String> {
    roundtrip_with(s, src, fmt, None)
}

/// [`roundtrip`] with an explicit `--cluster-size` (in bytes).
fn roundtrip_with(s: &Scratch, src: &str, fmt: &str, cluster_size: Option<u64>) -> Vec<String> {
    let src_info = s.qemu_info(src, fmt);
    let size = src_info["virtual-size"].as_u64().expect("virtual-size");
    let cluster = cluster_size.unwrap_or_else(|| default_cluster_size(&src_info));
    let cluster_arg = cluster.to_string();
    let guest = guest_bytes(s.dir(), src, fmt);
    assert_eq!(guest.len() as u64, size);
    let exp = Expectation::new(&guest, cluster);
    // The image builders always write both kinds of content; without them
    // the compression checks below would prove nothing.
    assert!(
        exp.count(Kind::Compressible) > 0 && exp.count(Kind::Incompressible) > 0,
        "test image {src} lacks compressible or random clusters: {:?}",
        exp.kinds
    );

    let mut targets = Vec::new();
    for codec in CODECS {
        let target = format!("{src}.{codec}.{cluster}.backup.qcow2");
        let mut args = vec!["-f", fmt, "--compress", codec];
        if cluster_size.is_some() {
            args.extend(["--cluster-size", &cluster_arg]);
        }
        args.extend([src, &target]);
        s.backup(&args).assert_ok();
        assert_no_leftovers(s.dir());
        assert_check_clean(s.dir(), &target);
        assert_identical(s.dir(), src, fmt, &target, "qcow2");

        let ti = s.qemu_info(&target, "qcow2");
        assert_eq!(ti["format"], "qcow2", "{target}: {ti}");
        assert_eq!(ti["virtual-size"].as_u64(), Some(size), "{target}: {ti}");
        assert_eq!(ti["cluster-size"].as_u64(), Some(cluster), "{target}: {ti}");
        assert!(
            ti.get("backing-filename").is_none(),
            "a full backup must not have a backing file: {ti}"
        );
        if codec != "none" {
            assert_eq!(
                ti["format-specific"]["data"]["compression-type"], codec,
                "{target}: {ti}"
            );
        }
        let m = s.qemu_map(&target, "qcow2");
        assert_map_matches(&target, &m, &exp, codec != "none");
        targets.push(target);
    }
    targets
}

/// The usual mix for a 4 MiB image with clusters up to 64 KiB: text
/// (aligned and unaligned), random data, a pattern in a partial cluster, a
/// zeroed range over data, and empty space.
fn standard_content(s: &Scratch) -> Vec<String> {
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
fn standard_qcow2(s: &Scratch, name: &str, opts: &str) {
    s.create(name, "qcow2", 4 * MIB, opts);
    s.io_all(name, "qcow2", &standard_content(s));
}

/// Back up `src` to `target` (both qcow2, names in the scratch dir) with the
/// options `opts`: it must succeed, and the target must pass `qemu-img check`
/// and compare identical to the source.
fn backup_checked(s: &Scratch, opts: &[&str], src: &str, target: &str) {
    s.backup(&[opts, &[src, target]].concat()).assert_ok();
    assert_check_clean(s.dir(), target);
    assert_identical(s.dir(), src, "qcow2", target, "qcow2");
}

// ---------------------------------------------------------------------------
// 1. Round trips
// ---------------------------------------------------------------------------

#[test]
fn full_raw_odd_size_sparse() {
    let s = Scratch::new();
    let size = MIB + 1000;
    let p = s.write_file("disk.raw", &[]);
    set_len(&p, size);
    patch(&p, 0, &text_bytes(300 * 1024, 1));
    patch(&p, 512 * KIB, &random_bytes(128 * 1024, 2));
    // Data in the odd tail, up to the last byte.
    patch(&p, size - 3000, &[0x77u8; 3000]);
    let targets = roundtrip(&s, "disk.raw", "raw");
    // qemu-img rounds a raw image's size up to 512 bytes; so must we.
    let ti = s.qemu_info(&targets[0], "qcow2");
    assert_eq!(ti["virtual-size"].as_u64(), Some(size.div_ceil(512) * 512));
}

/// A qcow2 image `name` made with `opts` and the standard content, backed up
/// with every codec.
fn standard_roundtrip(name: &str, opts: &str) {
    let s = Scratch::new();
    standard_qcow2(&s, name, opts);
    roundtrip(&s, name, "qcow2");
}

test_cases! { standard_roundtrip =>
    full_qcow2_v2("v2.qcow2", "compat=0.10");
    full_qcow2_v3_cluster_4k("c4k.qcow2", "cluster_size=4k");
    full_preallocation_metadata("pm.qcow2", "preallocation=metadata");
    full_preallocation_falloc("pf.qcow2", "preallocation=falloc");
    full_refcount_bits_1("r1.qcow2", "refcount_bits=1");
    full_refcount_bits_64("r64.qcow2", "refcount_bits=64");
}

#[test]
fn full_qcow2_v3_cluster_512() {
    let s = Scratch::new();
    standard_qcow2(&s, "c512.qcow2", "compat=1.1,cluster_size=512");
    // Odd, sector-aligned writes that straddle many tiny clusters.
    s.io("c512.qcow2", "qcow2", &[&s.text_cmd("", 1536, 70_000)]);
    roundtrip(&s, "c512.qcow2", "qcow2");
}

#[test]
fn full_qcow2_v3_cluster_64k_zero_clusters_and_discards() {
    let s = Scratch::new();
    standard_qcow2(&s, "z.qcow2", "cluster_size=64k");
    s.io(
        "z.qcow2",
        "qcow2",
        &[
            // Zero clusters over data and over nothing; discards of whole
            // clusters and of part of one (which leaves data in place).
            "write -z 384k 128k",
            "write -z 3584k 64k",
            "discard 640k 64k",
            "discard 1088k 64k",
            "discard 2052k 4k",
            &s.text_cmd("", 3712 * KIB, 64 * KIB),
            "write -z 3712k 4k",
        ],
    );
    let m = s.qemu_map("z.qcow2", "qcow2");
    assert!(
        m.iter().any(|e| e.zero && e.present && !e.data),
        "test image should have zero clusters: {m:?}"
    );
    roundtrip(&s, "z.qcow2", "qcow2");
}

#[test]
fn full_qcow2_v3_cluster_2m() {
    let s = Scratch::new();
    s.create("big.qcow2", "qcow2", 9 * MIB, "cluster_size=2M");
    s.io(
        "big.qcow2",
        "qcow2",
        &[
            &s.text_cmd("", 0, 2 * MIB),
            &s.random_cmd("", 2 * MIB, 2 * MIB),
            "write -P 0x33 4M 4k",
            &s.text_cmd("", 8 * MIB + 4096, 5000),
        ],
    );
    // 2M clusters: the backup uses the source's (larger) cluster size.
    roundtrip(&s, "big.qcow2", "qcow2");
}

/// A source whose clusters were written compressed by qemu (`write -c`),
/// plus plain clusters, zero clusters and a random cluster that qemu stores
/// uncompressed because it does not shrink.
fn compressed_source(s: &Scratch, name: &str, ctype: &str) {
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

#[test]
fn full_small_target_clusters() {
    // Target clusters smaller than the source's (and than the 64 KiB
    // default), random data included.
    let s = Scratch::new();
    standard_qcow2(&s, "src.qcow2", "cluster_size=64k");
    for cluster in [512, 4 * KIB, 16 * KIB] {
        roundtrip_with(&s, "src.qcow2", "qcow2", Some(cluster));
    }
}

/// A [`compressed_source`] with compression type `ctype`, backed up with
/// every codec.
fn compressed_roundtrip(name: &str, ctype: &str) {
    let s = Scratch::new();
    compressed_source(&s, name, ctype);
    roundtrip(&s, name, "qcow2");
}

test_cases! { compressed_roundtrip =>
    full_compressed_zlib_source("cz.qcow2", "zlib");
    full_compressed_zstd_source("cs.qcow2", "zstd");
}

#[test]
fn full_compressed_source_made_by_convert() {
    let s = Scratch::new();
    standard_qcow2(&s, "plain.qcow2", "cluster_size=64k");
    s.img(&[
        "convert",
        "-c",
        "-O",
        "qcow2",
        "-o",
        "compression_type=zstd",
        "plain.qcow2",
        "conv.qcow2",
    ]);
    roundtrip(&s, "conv.qcow2", "qcow2");
}

#[test]
fn full_extended_l2_subclusters() {
    let s = Scratch::new();
    s.create(
        "el2.qcow2",
        "qcow2",
        4 * MIB,
        "extended_l2=on,cluster_size=64k",
    );
    s.io(
        "el2.qcow2",
        "qcow2",
        &[
            // Subclusters are 2 KiB: single subclusters, runs, and zeroed
            // and discarded subclusters inside allocated clusters.
            &s.text_cmd("", 8 * KIB, 4 * KIB),
            &s.text_cmd("", 66 * KIB, 6 * KIB),
            &s.random_cmd("", MIB, 128 * KIB),
            &s.text_cmd("", 2 * MIB, 512 * KIB),
            "write -z 2052k 2k",
            "discard 2112k 4k",
            "write -P 0x21 3074k 2k",
            "write -z 3200k 64k",
        ],
    );
    let i = s.qemu_info("el2.qcow2", "qcow2");
    assert_eq!(i["format-specific"]["data"]["extended-l2"], true);
    roundtrip(&s, "el2.qcow2", "qcow2");
}

#[test]
fn full_external_data_file() {
    let s = Scratch::new();
    for (name, raw) in [("ext.qcow2", "off"), ("extraw.qcow2", "on")] {
        let data = s.p(&format!("{name}.data"));
        standard_qcow2(&s, name, &format!("data_file={data},data_file_raw={raw}"));
        let i = s.qemu_info(name, "qcow2");
        assert_eq!(i["format-specific"]["data"]["data-file"], data.as_str());
        roundtrip(&s, name, "qcow2");
    }
}

#[test]
fn full_chain_three_layers() {
    let s = Scratch::new();
    // Different cluster sizes in every layer; each layer overwrites part of
    // the one below, including zeroing backing data.
    s.create("base.qcow2", "qcow2", 4 * MIB, "cluster_size=4k");
    s.io(
        "base.qcow2",
        "qcow2",
        &[
            &s.text_cmd("", 0, 2 * MIB),
            &s.random_cmd("", 2 * MIB, 256 * KIB),
            "write -P 0x10 3M 1M",
        ],
    );
    s.overlay("mid.qcow2", "base.qcow2", "qcow2", None, "cluster_size=32k");
    s.io(
        "mid.qcow2",
        "qcow2",
        &[
            "write -P 0x33 512k 256k",
            "write -z 1M 128k",
            "write -z 3M 64k",
        ],
    );
    s.overlay("top.qcow2", "mid.qcow2", "qcow2", None, "cluster_size=64k");
    s.io(
        "top.qcow2",
        "qcow2",
        &[
            &s.text_cmd("", 1536 * KIB + 4 * KIB, 8 * KIB),
            &s.random_cmd("", 3 * MIB + 128 * KIB, 128 * KIB),
            "write -z 1792k 64k",
        ],
    );
    roundtrip(&s, "top.qcow2", "qcow2");
}

/// A 4 MiB raw base of text and random data under a qcow2 overlay
/// `over.qcow2` made with `opts` and written by `cmds`, backed up with every
/// codec.
fn raw_base_overlay_roundtrip(s: &Scratch, opts: &str, cmds: &[&str]) {
    s.create("base.raw", "raw", 4 * MIB, "");
    s.io(
        "base.raw",
        "raw",
        &[
            &s.text_cmd("", 0, MIB),
            &s.random_cmd("", 2 * MIB, 256 * KIB),
        ],
    );
    s.overlay("over.qcow2", "base.raw", "raw", None, opts);
    s.io("over.qcow2", "qcow2", cmds);
    roundtrip(s, "over.qcow2", "qcow2");
}

#[test]
fn full_chain_raw_base_qcow2_overlay_larger_clusters() {
    // 128 KiB clusters in the overlay: the backup uses them too.
    let s = Scratch::new();
    raw_base_overlay_roundtrip(
        &s,
        "cluster_size=128k",
        &[
            "write -P 0x61 132k 4k",
            "write -z 512k 128k",
            &s.text_cmd("", 3 * MIB, 300 * KIB),
        ],
    );
}

#[test]
fn full_chain_raw_base_qcow2_overlay_smaller_clusters() {
    let s = Scratch::new();
    raw_base_overlay_roundtrip(
        &s,
        "cluster_size=16k",
        &[
            "write -P 0x61 132k 4k",
            "write -z 512k 48k",
            "write -z 2112k 16k",
        ],
    );
}

#[test]
fn full_chain_backing_shorter_than_overlay() {
    let s = Scratch::new();
    s.create("base.qcow2", "qcow2", MIB, "");
    s.io(
        "base.qcow2",
        "qcow2",
        &[&s.text_cmd("", 0, MIB - 4 * KIB), "write -P 0x99 1020k 4k"],
    );
    s.overlay("over.qcow2", "base.qcow2", "qcow2", Some(3584 * KIB), "");
    s.io(
        "over.qcow2",
        "qcow2",
        &[
            // Straddles the end of the backing file.
            &s.text_cmd("", 960 * KIB, 200 * KIB),
            &s.random_cmd("", 2 * MIB, 128 * KIB),
        ],
    );
    roundtrip(&s, "over.qcow2", "qcow2");
}

// ---------------------------------------------------------------------------
// 2. Raw target
// ---------------------------------------------------------------------------

/// Bytes the filesystem has allocated for `path`.
fn allocated_bytes(path: &Path) -> u64 {
    std::os::unix::fs::MetadataExt::blocks(&std::fs::metadata(path).expect("stat")) * 512
}

#[test]
fn raw_target_identical_and_sparse() {
    let s = Scratch::new();
    s.create("sparse.qcow2", "qcow2", 64 * MIB, "");
    s.io(
        "sparse.qcow2",
        "qcow2",
        &[
            &s.text_cmd("", 0, 512 * KIB),
            &s.random_cmd("", 20 * MIB, 256 * KIB),
            &s.text_cmd("-c", 40 * MIB, 128 * KIB),
            "write -P 0x01 65532k 4k",
            "write -z 128k 64k",
        ],
    );
    for (i, compress) in ["zstd", "none"].into_iter().enumerate() {
        let target = format!("out{i}.raw");
        // --compress is meaningless for raw and must not matter.
        s.backup(&["-O", "raw", "--compress", compress, "sparse.qcow2", &target])
            .assert_ok();
        assert_identical(s.dir(), "sparse.qcow2", "qcow2", &target, "raw");
        let len = file_len(&s.path(&target));
        assert_eq!(len, 64 * MIB, "raw target has the virtual size");
        let allocated = allocated_bytes(&s.path(&target));
        // About 1 MiB of data; allow for filesystem granularity.
        assert!(
            allocated <= 4 * MIB,
            "raw target is not sparse: {allocated} bytes allocated for {len} bytes"
        );
        assert_eq!(s.qemu_info(&target, "raw")["format"], "raw");
        assert_no_leftovers(s.dir());
    }
}

#[test]
fn raw_target_from_raw_odd_size_and_chain() {
    let s = Scratch::new();
    let size = MIB + 1000;
    let p = s.write_file("odd.raw", &[]);
    set_len(&p, size);
    patch(&p, size - 5000, &text_bytes(5000, 3));
    s.backup(&["-f", "raw", "-O", "raw", "odd.raw", "odd.out.raw"])
        .assert_ok();
    assert_identical(s.dir(), "odd.raw", "raw", "odd.out.raw", "raw");
    let expected = s.qemu_info("odd.raw", "raw")["virtual-size"]
        .as_u64()
        .unwrap();
    assert_eq!(file_len(&s.path("odd.out.raw")), expected);

    // A chain flattened to raw.
    s.create("base.qcow2", "qcow2", 8 * MIB, "");
    s.io("base.qcow2", "qcow2", &[&s.text_cmd("", 0, MIB)]);
    s.overlay("top.qcow2", "base.qcow2", "qcow2", None, "");
    s.io(
        "top.qcow2",
        "qcow2",
        &["write -z 64k 64k", "write -P 7 6M 4k"],
    );
    s.backup(&["-O", "raw", "top.qcow2", "flat.raw"])
        .assert_ok();
    assert_identical(s.dir(), "top.qcow2", "qcow2", "flat.raw", "raw");
    assert!(allocated_bytes(&s.path("flat.raw")) <= 3 * MIB);
}

// ---------------------------------------------------------------------------
// 3. --sync top
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
        .assert_clean_failure_mentioning(&["--backing"]);
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

// ---------------------------------------------------------------------------
// 4. qcow2-rs as a second reader
// ---------------------------------------------------------------------------

/// Drive a future to completion without a runtime. qcow2-rs's synchronous
/// I/O backend never returns `Pending` for real I/O, so polling in a loop
/// with a no-op waker suffices.
fn block_on<F: std::future::Future>(fut: F) -> F::Output {
    use std::task::{Context, Poll, Waker};
    let mut fut = std::pin::pin!(fut);
    let mut cx = Context::from_waker(Waker::noop());
    for _ in 0..100_000 {
        if let Poll::Ready(v) = fut.as_mut().poll(&mut cx) {
            return v;
        }
        thread::yield_now();
    }
    panic!("qcow2-rs future did not complete without a runtime");
}

fn qcow2_rs_read_all(path: &Path, size: usize) -> Vec<u8> {
    use qcow2_rs::dev::Qcow2DevParams;
    let params = Qcow2DevParams::new(9, None, None, true, false);
    let dev = qcow2_rs::utils::qcow2_setup_dev_sync(path, &params)
        .unwrap_or_else(|e| panic!("qcow2-rs cannot open {}: {e:?}", path.display()));
    block_on(dev.qcow2_prep_io()).expect("qcow2-rs prep_io");
    let mut out = Vec::with_capacity(size);
    let chunk = 256 * 1024;
    let mut buf = qcow2_rs::helpers::Qcow2IoBuf::<u8>::new(chunk);
    let mut off = 0;
    while off < size {
        let n = chunk.min(size - off);
        buf.zero_buf();
        block_on(dev.read_at(&mut buf[..n], off as u64))
            .unwrap_or_else(|e| panic!("qcow2-rs read at {off}: {e:?}"));
        out.extend_from_slice(&buf[..n]);
        off += n;
    }
    out
}

#[test]
fn qcow2_rs_reads_zlib_backup() {
    let s = Scratch::new();
    standard_qcow2(&s, "src.qcow2", "cluster_size=64k");
    s.io("src.qcow2", "qcow2", &["write -c -P 0x3c 3136k 64k"]);
    let expected = guest_bytes(s.dir(), "src.qcow2", "qcow2");
    for cluster in ["64k", "32k"] {
        let target = format!("out-{cluster}.qcow2");
        s.backup(&[
            "--compress",
            "zlib",
            "--cluster-size",
            cluster,
            "src.qcow2",
            &target,
        ])
        .assert_ok();
        assert!(s.qemu_map(&target, "qcow2").iter().any(|e| e.compressed));
        let got = qcow2_rs_read_all(&s.path(&target), expected.len());
        assert_eq!(got.len(), expected.len());
        if let Some(i) = (0..got.len()).find(|&i| got[i] != expected[i]) {
            panic!("qcow2-rs reads {target} differently from the source at byte {i}");
        }
    }
}

// ---------------------------------------------------------------------------
// 5. Determinism
// ---------------------------------------------------------------------------

#[test]
fn deterministic_across_thread_counts() {
    let s = Scratch::new();
    standard_qcow2(&s, "src.qcow2", "cluster_size=64k");
    s.io(
        "src.qcow2",
        "qcow2",
        &[&s.text_cmd("", 3 * MIB + 128 * KIB, 512 * KIB)],
    );
    for codec in ["zstd", "zlib"] {
        let mut outputs = Vec::new();
        for threads in ["1", "4"] {
            let target = format!("{codec}-{threads}.qcow2");
            s.backup(&[
                "--compress",
                codec,
                "--threads",
                threads,
                "--cluster-size",
                "64k",
                "src.qcow2",
                &target,
            ])
            .assert_ok();
            outputs.push(std::fs::read(s.path(&target)).unwrap());
        }
        assert!(
            outputs[0] == outputs[1],
            "{codec}: --threads 1 and --threads 4 give different files ({} vs {} bytes)",
            outputs[0].len(),
            outputs[1].len()
        );
        assert_identical(
            s.dir(),
            "src.qcow2",
            "qcow2",
            &format!("{codec}-4.qcow2"),
            "qcow2",
        );
    }
}

// ---------------------------------------------------------------------------
// 6. Pass-through of compressed clusters
// ---------------------------------------------------------------------------

/// For every guest cluster compressed in both images: does the target's
/// compressed stream start with the same bytes as the source's?
/// Returns (clusters compared, clusters whose stream prefix is equal).
fn compare_streams(
    src: &Path,
    tgt: &Path,
    size: u64,
    only: &dyn Fn(u64) -> bool,
) -> (usize, usize) {
    let (ls, lt) = (Layout::read(src), Layout::read(tgt));
    assert_eq!(ls.cluster_size(), lt.cluster_size());
    let (mut compared, mut equal) = (0, 0);
    let mut guest = 0;
    while guest < size {
        if !only(guest) {
            guest += ls.cluster_size();
            continue;
        }
        let es = ls.l2_entry(src, guest);
        let et = lt.l2_entry(tgt, guest);
        if let (Some((hs, ns)), Some((ht, nt))) = (ls.compressed_span(es), lt.compressed_span(et)) {
            // Streams of text clusters are several KiB long, so a 256-byte
            // prefix lies inside one stream.
            let n = ns.min(nt).min(256) as usize;
            compared += 1;
            if read_bytes(src, hs, n) == read_bytes(tgt, ht, n) {
                equal += 1;
            }
        }
        guest += ls.cluster_size();
    }
    (compared, equal)
}

#[test]
fn passthrough_zstd_and_recompress() {
    let s = Scratch::new();
    s.create("plain.qcow2", "qcow2", 4 * MIB, "");
    s.io(
        "plain.qcow2",
        "qcow2",
        &[
            &s.text_cmd("", 0, 2 * MIB),
            &s.text_cmd("", 3 * MIB, 512 * KIB),
        ],
    );
    s.img(&[
        "convert",
        "-c",
        "-O",
        "qcow2",
        "-o",
        "compression_type=zstd",
        "plain.qcow2",
        "src.qcow2",
    ]);
    let size = 4 * MIB;
    let src_clusters = s
        .qemu_map("src.qcow2", "qcow2")
        .iter()
        .filter(|e| e.compressed)
        .map(|e| e.length / (64 * KIB))
        .sum::<u64>();
    assert_eq!(
        src_clusters, 40,
        "source should have 40 compressed clusters"
    );

    // Default level: pass-through and recompressed are both identical.
    let run = |target: &str, extra: &[&str]| {
        backup_checked(
            &s,
            &[&["--compress", "zstd"], extra].concat(),
            "src.qcow2",
            target,
        );
        let ti = s.qemu_info(target, "qcow2");
        assert_eq!(ti["format-specific"]["data"]["compression-type"], "zstd");
        file_len(&s.path(target))
    };
    let pass = run("pass.qcow2", &[]);
    let re = run("re.qcow2", &["--recompress"]);
    assert!(
        pass <= re,
        "pass-through ({pass} bytes) larger than recompressed ({re} bytes)"
    );

    // At level 19 the two differ: pass-through keeps qemu's level-3
    // streams byte for byte, --recompress makes new (smaller) ones.
    let pass19 = run("pass19.qcow2", &["--level", "19"]);
    let re19 = run("re19.qcow2", &["--level", "19", "--recompress"]);
    let (n, eq) = compare_streams(&s.path("src.qcow2"), &s.path("pass19.qcow2"), size, &|_| {
        true
    });
    assert_eq!(
        n, 40,
        "every compressed source cluster is compressed in the target"
    );
    assert_eq!(
        eq, n,
        "pass-through should copy the source's zstd streams as they are"
    );
    let (n, eq) = compare_streams(&s.path("src.qcow2"), &s.path("re19.qcow2"), size, &|_| true);
    assert_eq!(n, 40);
    assert!(eq < n, "--recompress --level 19 should produce new streams");
    assert!(
        re19 < pass19,
        "level 19 recompressed {re19} vs pass-through {pass19}"
    );
}

#[test]
fn passthrough_zlib_only_with_matching_cluster_size() {
    let s = Scratch::new();
    compressed_source(&s, "src.qcow2", "zlib");
    backup_checked(
        &s,
        &["--compress", "zlib", "--level", "1"],
        "src.qcow2",
        "pass.qcow2",
    );
    // The text clusters written with `write -c` (the pattern cluster's
    // stream is too short for a 256-byte prefix).
    let text = |g: u64| !(512 * KIB..4 * MIB - 64 * KIB).contains(&g);
    let (n, eq) = compare_streams(&s.path("src.qcow2"), &s.path("pass.qcow2"), 4 * MIB, &text);
    // 8 text clusters, less the one zeroed at 128k, plus the last cluster.
    assert_eq!(n, 8, "compressed text clusters in both images");
    assert_eq!(
        eq, n,
        "pass-through should copy qemu's zlib streams as they are"
    );
    // A different cluster size cannot pass streams through; still identical.
    backup_checked(
        &s,
        &["--compress", "zlib", "--cluster-size", "128k"],
        "src.qcow2",
        "c128.qcow2",
    );
}

// ---------------------------------------------------------------------------
// 7. Failure paths
// ---------------------------------------------------------------------------

fn small_source(s: &Scratch, name: &str) {
    s.create(name, "qcow2", 2 * MIB, "");
    s.io(
        name,
        "qcow2",
        &[&s.text_cmd("", 0, 256 * KIB), "write -P 0x42 1M 64k"],
    );
}

#[test]
fn fail_target_directory_missing() {
    let s = Scratch::new();
    small_source(&s, "src.qcow2");
    let target = s.p("no-such-dir/out.qcow2");
    s.backup(&["src.qcow2", &target])
        .assert_clean_failure_mentioning(&["no-such-dir/out.qcow2"]);
    assert!(!s.path("no-such-dir").exists());
    assert_no_leftovers(s.dir());
}

#[test]
fn fail_existing_target_without_force_then_force_replaces() {
    let s = Scratch::new();
    small_source(&s, "src.qcow2");
    let old = b"precious bytes that must survive".to_vec();
    std::fs::write(s.path("out.qcow2"), &old).unwrap();
    for args in [
        vec!["src.qcow2", "out.qcow2"],
        vec!["-O", "raw", "src.qcow2", "out.qcow2"],
    ] {
        s.backup(&args)
            .assert_clean_failure_mentioning(&["exists", "--force"]);
        assert_eq!(
            std::fs::read(s.path("out.qcow2")).unwrap(),
            old,
            "target changed"
        );
        assert_no_leftovers(s.dir());
    }
    backup_checked(&s, &["--force"], "src.qcow2", "out.qcow2");
    assert_no_leftovers(s.dir());
}

#[test]
fn fail_target_is_the_source() {
    let s = Scratch::new();
    small_source(&s, "src.qcow2");
    let before = std::fs::read(s.path("src.qcow2")).unwrap();
    s.backup(&["--force", "src.qcow2", "src.qcow2"])
        .assert_clean_failure_mentioning(&["src.qcow2"]);
    assert_eq!(std::fs::read(s.path("src.qcow2")).unwrap(), before);
    assert_no_leftovers(s.dir());
}

/// Run a backup that must fail on a damaged source: exit 1, one line that
/// mentions one of `words`, nothing at the target, no temporary file.
/// Each entry of `runs` is one set of extra options, space-separated.
fn assert_backup_fails(s: &Scratch, src: &str, runs: &[&str], words: &[&str]) {
    s.mkdir("out");
    for (i, extra) in runs.iter().enumerate() {
        let target = format!("out/{i}.img");
        let mut args: Vec<&str> = extra.split_whitespace().collect();
        args.extend([src, &target]);
        s.backup(&args).assert_clean_failure_mentioning(words);
        assert!(
            !s.path(&target).exists(),
            "{target} exists after a failed backup"
        );
        assert_no_leftovers(&s.path("out"));
    }
}

#[test]
fn fail_l2_entry_past_end_of_file() {
    let s = Scratch::new();
    s.create("bad.qcow2", "qcow2", 4 * MIB, "");
    s.io(
        "bad.qcow2",
        "qcow2",
        &["write -P 0x42 0 1M", "write -P 0x43 2M 64k"],
    );
    let path = s.path("bad.qcow2");
    let layout = Layout::read(&path);
    let pos = layout.l2_entry_pos(&path, 2 * MIB).expect("L2 table");
    let entry = read_u64(&path, pos);
    assert_ne!(entry & ENTRY_OFFSET_MASK, 0, "cluster should be allocated");
    // Keep the flags, point the cluster 1 GiB past the end of the file.
    let len = file_len(&path);
    let far = (len + 1024 * MIB).div_ceil(64 * KIB) * 64 * KIB;
    let patched = (entry & !ENTRY_OFFSET_MASK) | far;
    patch_u64(&path, pos, patched);
    assert_eq!(layout.l2_entry(&path, 2 * MIB), patched);
    assert_backup_fails(
        &s,
        "bad.qcow2",
        &["--compress zstd", "--compress none", "-O raw"],
        &["end of", "past", "beyond", "outside", "eof", "truncated"],
    );
}

fn corrupt_compressed(s: &Scratch, name: &str, ctype: &str) {
    s.create(name, "qcow2", 2 * MIB, &format!("compression_type={ctype}"));
    s.io(
        name,
        "qcow2",
        &[
            &s.text_cmd("-c", 0, 256 * KIB),
            &s.text_cmd("-c", MIB, 64 * KIB),
        ],
    );
    let path = s.path(name);
    let layout = Layout::read(&path);
    let entry = layout.l2_entry(&path, MIB);
    let (host, span) = layout.compressed_span(entry).expect("compressed cluster");
    assert!(span > 600, "stream span {span}");
    // Garbage inside the stream: for zlib, 0xff as the first byte is a
    // reserved block type; for zstd, 0xff after the magic number sets the
    // reserved bit of the frame header descriptor.
    let at = if ctype == "zlib" { host } else { host + 4 };
    patch(&path, at, &[0xff; 200]);
    let (code, _) = qemu_img_status(s.dir(), &["convert", "-O", "raw", name, "check.raw"]);
    assert_ne!(code, Some(0), "qemu-img should fail to read {name} too");
}

#[test]
fn fail_corrupt_compressed_cluster_zlib() {
    let s = Scratch::new();
    corrupt_compressed(&s, "bad.qcow2", "zlib");
    let words = [
        "compress", "inflate", "deflate", "zlib", "corrupt", "invalid", "decode",
    ];
    // Recompressed, uncompressed, raw, and passed through as it is.
    assert_backup_fails(
        &s,
        "bad.qcow2",
        &[
            "--compress zstd",
            "--compress none",
            "-O raw",
            "--compress zlib",
        ],
        &words,
    );
}

#[test]
fn fail_corrupt_compressed_cluster_zstd() {
    let s = Scratch::new();
    corrupt_compressed(&s, "bad.qcow2", "zstd");
    let words = ["compress", "zstd", "corrupt", "invalid", "decode", "frame"];
    assert_backup_fails(
        &s,
        "bad.qcow2",
        &[
            "--compress zstd",
            "--compress zstd --recompress",
            "--compress zlib",
            "-O raw",
        ],
        &words,
    );
}

#[test]
fn fail_sync_top_with_raw_target() {
    let s = Scratch::new();
    small_source(&s, "base.qcow2");
    s.overlay("top.qcow2", "base.qcow2", "qcow2", None, "");
    s.backup(&["--sync", "top", "-O", "raw", "top.qcow2", "out.raw"])
        .assert_clean_failure_mentioning(&["raw", "top"]);
    assert!(!s.path("out.raw").exists());
    assert_no_leftovers(s.dir());
}

/// A 64 MiB image of non-zero data, slow to back up at `--speed 10M`.
fn large_source(s: &Scratch) {
    s.create("large.qcow2", "qcow2", 64 * MIB, "");
    s.io("large.qcow2", "qcow2", &["write -P 0x5c 0 64M"]);
}

/// Start a slow backup into `out/`, wait until its temporary file exists and
/// a little more, and return the child.
fn start_slow_backup(s: &Scratch) -> (std::process::Child, String, Instant) {
    s.mkdir("out");
    let started = Instant::now();
    let (mut child, cmdline) = spawn_qbackup(
        s.dir(),
        &["backup", "--speed", "10M", "large.qcow2", "out/large.qcow2"],
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    while leftovers(&s.path("out")).is_empty() {
        assert!(
            Instant::now() < deadline,
            "no temporary file appeared in out/"
        );
        thread::sleep(Duration::from_millis(10));
    }
    thread::sleep(Duration::from_millis(700));
    assert!(
        child.try_wait().expect("try_wait").is_none(),
        "the backup finished before it could be interrupted"
    );
    (child, cmdline, started)
}

#[test]
fn sigkill_leaves_nothing_at_target() {
    let s = Scratch::new();
    large_source(&s);
    let (mut child, _cmdline, _) = start_slow_backup(&s);
    child.kill().expect("SIGKILL");
    let status = child.wait().expect("wait");
    assert!(!status.success());
    assert!(
        !s.path("out/large.qcow2").exists(),
        "a killed backup must leave nothing at TARGET"
    );
}

#[test]
fn sigterm_cleans_up() {
    let s = Scratch::new();
    large_source(&s);
    let (child, cmdline, started) = start_slow_backup(&s);
    let pid = child.id().to_string();
    let st = Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .expect("kill");
    assert!(st.success());
    let signalled = Instant::now();
    let run = wait_qbackup(child, cmdline, started, Duration::from_secs(30));
    // Unhindered, the backup would take 6.4 s; cancellation is checked at
    // least once per 4 MiB batch (0.4 s at this speed).
    assert!(
        signalled.elapsed() < Duration::from_secs(3),
        "SIGTERM did not stop the backup promptly\n{}",
        run.describe()
    );
    run.assert_clean_failure_mentioning(&["interrupt", "signal", "terminat", "cancel"]);
    assert!(!s.path("out/large.qcow2").exists(), "{}", run.describe());
    assert_no_leftovers(&s.path("out"));
}

#[test]
fn speed_limit_lower_bound() {
    let s = Scratch::new();
    s.create("src.qcow2", "qcow2", 8 * MIB, "");
    s.io("src.qcow2", "qcow2", &["write -P 0x17 0 4M"]);
    let run = s.backup(&["--speed", "2M", "src.qcow2", "out.qcow2"]);
    run.assert_ok();
    assert!(
        run.elapsed >= Duration::from_millis(1500),
        "4 MiB at --speed 2M took only {:?}",
        run.elapsed
    );
    assert_identical(s.dir(), "src.qcow2", "qcow2", "out.qcow2", "qcow2");
    // Without a limit the same backup is fast (the bound above is the limit's doing).
    let run = s.backup(&["src.qcow2", "fast.qcow2"]);
    run.assert_ok();
    assert!(
        run.elapsed < Duration::from_millis(1500),
        "{:?}",
        run.elapsed
    );
}
