//! End-to-end tests of full backups (`qbackup backup`, the default `--sync
//! full`): every image kind round-trips through qemu-img.
//!
//! Images are built at test time with qemu-img and qemu-io in a temporary
//! directory; qemu-img (`check`, `compare`, `map`, `info`) is the oracle for
//! every backup.
//!
//! - Round trips (`full_*`): every image kind the read side supports, each
//!   backed up with zstd, zlib and no compression. The target must pass
//!   `qemu-img check`, compare identical to the source, use the expected
//!   cluster size and compression type, store compressible clusters
//!   compressed and random clusters uncompressed, and leave zero clusters
//!   unallocated.
//! - `raw_target_*`: `-O raw` is identical and sparse.

mod common;

use std::path::Path;

use common::backup::{compressed_source, standard_qcow2, CODECS};
use common::content::{classify, random_bytes, text_bytes, Kind};
use common::oracle::{assert_check_clean, assert_identical, extents_in, guest_bytes, Extent};
use common::qcow2::{file_len, patch, set_len};
use common::run::assert_no_leftovers;
use common::scratch::Scratch;
use common::{test_cases, KIB, MIB};
use serde_json::Value;

// ---------------------------------------------------------------------------
// Verification of a full backup
// ---------------------------------------------------------------------------

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

// ---------------------------------------------------------------------------
// Round trips
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
// Raw target
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
    // A raw target is not compressed: --compress zstd is refused, not
    // ignored; --compress none says what happens anyway.
    s.backup(&["-O", "raw", "--compress", "zstd", "sparse.qcow2", "x.raw"])
        .assert_usage_error(&["raw"]);
    assert!(!s.path("x.raw").exists());
    for (i, compress) in [&[][..], &["--compress", "none"]].into_iter().enumerate() {
        let target = format!("out{i}.raw");
        let args = [&["-O", "raw"], compress, &["sparse.qcow2", &target]].concat();
        s.backup(&args).assert_ok();
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
