//! `qbackup map` and `qbackup info` against qemu-img, one test per kind of
//! image. Every image is built at test time with qemu-img / qemu-io, then
//! [`common::check`] compares: `map --output=json` (parsed, must be identical),
//! human `map` (identical text, or a clean refusal where qemu-img refuses
//! compressed clusters) and `info --output=json` (the contract's keys).

mod common;

use common::*;
use serde_json::Value;

/// A deterministic, incompressible-looking byte pattern (xorshift).
fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

fn has(map: &Value, key: &str, val: bool) -> usize {
    count_extents(map, |e| e[key] == val)
}

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

// ---------------------------------------------------------------------------
// qcow2 basics
// ---------------------------------------------------------------------------

/// The usual mix: data, zero, unmapped zero, discard, compressed, unaligned.
const MIX: &[&str] = &[
    "write -P 0x11 0 64k",
    "write -P 0x12 100k 3000",
    "write -z 192k 64k",
    "write -P 0x13 320k 128k",
    "discard 384k 64k",
    "write -c -P 0x14 512k 128k",
    "write -P 0x15 1M 4k",
    "write -z -u 1M 4k",
    "write -P 0x16 2M 8k",
    "write -z -u 2M 64k",
    "write -P 0x17 3M 1",
    "write -P 0x18 4194303 1",
];

#[test]
fn qcow2_v3_mixed() {
    let s = Scratch::new();
    s.create("v3.qcow2", "qcow2", 4 * MIB, "");
    s.io("v3.qcow2", "qcow2", MIX);
    check(&s, "v3.qcow2", None);
    check(&s, "v3.qcow2", Some("qcow2"));
    let map = qemu_map_json(s.dir(), &s.p("v3.qcow2"), None);
    assert!(
        has(&map, "compressed", true) >= 1,
        "no compressed cluster: {map}"
    );
    assert!(
        count_extents(&map, |e| e["present"] == true && e["zero"] == true) >= 1,
        "no zero cluster: {map}"
    );
    // `--output human` is the default.
    let a = qbackup_in(s.dir(), &["map", "--output", "human", &s.p("v3.qcow2")]);
    let b = qbackup_map_human(s.dir(), &s.p("v3.qcow2"), None);
    assert_eq!(
        (a.code, &a.stdout, &a.stderr),
        (b.code, &b.stdout, &b.stderr)
    );
}

#[test]
fn qcow2_v3_without_compressed_human_map() {
    let s = Scratch::new();
    s.create("plain.qcow2", "qcow2", 8 * MIB, "");
    s.io(
        "plain.qcow2",
        "qcow2",
        &[
            "write -P 1 0 64k",
            "write -P 2 64k 64k",
            "write -P 3 256k 192k",
            "write -z 1M 128k",
            "write -P 4 7M 1M",
        ],
    );
    check(&s, "plain.qcow2", None);
    assert!(
        qemu_map_human(s.dir(), &s.p("plain.qcow2"), None).is_ok(),
        "qemu-img should print a human map here"
    );
}

#[test]
fn qcow2_v2_compat_0_10() {
    let s = Scratch::new();
    s.create("v2.qcow2", "qcow2", 4 * MIB, "compat=0.10");
    s.io("v2.qcow2", "qcow2", MIX);
    check(&s, "v2.qcow2", None);
    let info = qemu_info_json(s.dir(), &s.p("v2.qcow2"), None);
    assert_eq!(info["format-specific"]["data"]["compat"], "0.10");
}

#[test]
fn qcow2_v2_chain() {
    let s = Scratch::new();
    s.create("base.qcow2", "qcow2", 4 * MIB, "compat=0.10");
    s.io(
        "base.qcow2",
        "qcow2",
        &["write -P 1 0 1M", "write -c -P 2 2M 256k"],
    );
    s.overlay("top.qcow2", "base.qcow2", "qcow2", None, "compat=0.10");
    s.io(
        "top.qcow2",
        "qcow2",
        &["write -P 3 512k 64k", "write -z 64k 64k", "discard 2M 64k"],
    );
    check(&s, "top.qcow2", None);
}

fn cluster_size_case(cluster: u64) {
    let s = Scratch::new();
    let size = (4 * MIB).max(cluster * 12);
    s.create("c.qcow2", "qcow2", size, &format!("cluster_size={cluster}"));
    let c = cluster;
    let cmds = [
        format!("write -P 1 0 {c}"),
        format!("write -P 2 {} {}", c + 17, c),
        format!("write -z {} {}", 4 * c, c),
        format!("write -c -P 3 {} {}", 6 * c, 2 * c),
        format!("write -P 4 {} 512", 10 * c),
        format!("discard {} {}", 10 * c, c),
        format!("write -P 5 {} {}", size - c, c),
    ];
    s.io_all("c.qcow2", "qcow2", &cmds);
    check(&s, "c.qcow2", None);
    let info = qbackup_info_ok(s.dir(), &s.p("c.qcow2"), None);
    assert_eq!(info["cluster-size"], c);
}

test_cases! { cluster_size_case =>
    qcow2_cluster_512(512);
    qcow2_cluster_4096(4096);
    qcow2_cluster_65536(65536);
    qcow2_cluster_2m(2 * MIB);
}

#[test]
fn qcow2_cluster_512_many_l2_tables() {
    // 512-byte clusters: one L2 table covers only 32 KiB.
    let s = Scratch::new();
    s.create("small.qcow2", "qcow2", 4 * MIB, "cluster_size=512");
    let cmds: Vec<String> = (0..64u64)
        .map(|i| format!("write -P {} {} 1024", i + 1, i * 64 * KIB + i * 512))
        .collect();
    s.io_all("small.qcow2", "qcow2", &cmds);
    check(&s, "small.qcow2", None);
}

#[test]
fn qcow2_zero_clusters() {
    let s = Scratch::new();
    s.create("z.qcow2", "qcow2", 4 * MIB, "");
    s.io(
        "z.qcow2",
        "qcow2",
        &[
            "write -P 1 0 256k",
            "write -z 64k 64k",     // allocated -> zero, keeps the allocation
            "write -z -u 128k 64k", // allocated -> zero, unmapped
            "write -z 1M 192k",     // unallocated -> zero
            "write -z 2M 4k",       // partial cluster
            "write -P 0 3M 64k",    // explicit zero bytes are data
        ],
    );
    check(&s, "z.qcow2", None);
}

#[test]
fn qcow2_discards() {
    let s = Scratch::new();
    s.create("d.qcow2", "qcow2", 4 * MIB, "");
    s.io(
        "d.qcow2",
        "qcow2",
        &[
            "write -P 1 0 2M",
            "discard 64k 64k",
            "discard 256k 200k",
            "discard 1M 4k",
            "discard 1536k 512k",
            "write -P 2 1600k 64k",
        ],
    );
    check(&s, "d.qcow2", None);
}

#[test]
fn qcow2_compressed_zlib() {
    let s = Scratch::new();
    s.create("zlib.qcow2", "qcow2", 4 * MIB, "");
    s.io(
        "zlib.qcow2",
        "qcow2",
        &[
            "write -c -P 0x21 0 64k",
            "write -c -P 0x22 64k 64k",
            "write -c -P 0x23 192k 256k",
            "write -P 0x24 448k 64k",
            "write -c -P 0x25 1M 64k",
            "write -z 1M 64k",
        ],
    );
    let p = s.path("tail.bin");
    std::fs::write(&p, noise(64 * 1024, 7)).unwrap();
    // Incompressible data written with -c is stored as a normal cluster.
    s.io(
        "zlib.qcow2",
        "qcow2",
        &[&format!("write -c -s {} 2M 64k", p.display())],
    );
    check(&s, "zlib.qcow2", None);
    let map = qemu_map_json(s.dir(), &s.p("zlib.qcow2"), None);
    assert!(has(&map, "compressed", true) >= 2, "{map}");
}

#[test]
fn qcow2_compressed_zstd() {
    let s = Scratch::new();
    s.create("zstd.qcow2", "qcow2", 4 * MIB, "compression_type=zstd");
    s.io(
        "zstd.qcow2",
        "qcow2",
        &[
            "write -c -P 0x31 0 64k",
            "write -c -P 0x32 64k 192k",
            "write -P 0x33 256k 64k",
            "write -c -P 0x34 3M 1M",
        ],
    );
    check(&s, "zstd.qcow2", None);
    let info = qbackup_info_ok(s.dir(), &s.p("zstd.qcow2"), None);
    assert_eq!(info["format-specific"]["data"]["compression-type"], "zstd");
}

#[test]
fn qcow2_compressed_zstd_4k_clusters() {
    // Small clusters: compressed data of neighbouring clusters share host clusters.
    let s = Scratch::new();
    s.create(
        "zstd4k.qcow2",
        "qcow2",
        4 * MIB,
        "compression_type=zstd,cluster_size=4096",
    );
    s.io(
        "zstd4k.qcow2",
        "qcow2",
        &["write -c -P 0x41 0 256k", "write -P 1 8k 4k"],
    );
    check(&s, "zstd4k.qcow2", None);
}

// ---------------------------------------------------------------------------
// extended L2
// ---------------------------------------------------------------------------

fn extended_l2_case(cluster: u64) {
    let s = Scratch::new();
    s.create(
        "x.qcow2",
        "qcow2",
        4 * MIB,
        &format!("extended_l2=on,cluster_size={cluster}"),
    );
    let sub = cluster / 32;
    let c = cluster;
    let cmds = [
        // Single subclusters inside a fresh cluster.
        format!("write -P 1 {} 4k", sub * 2),
        format!("write -P 2 {} 4k", sub * 8),
        // A zero subcluster in an allocated cluster.
        format!("write -z {} {}", sub * 12, sub),
        // A whole cluster of data, then zero subclusters inside it.
        format!("write -P 3 {c} {c}"),
        format!("write -z {} {}", c + 4 * sub, 2 * sub),
        // Zero subclusters in an unallocated cluster.
        format!("write -z {} {}", 3 * c, 3 * sub),
        // Compressed cluster.
        format!("write -c -P 4 {} {c}", 5 * c),
        // Discarded subclusters of a data cluster.
        format!("write -P 5 {} {c}", 7 * c),
        format!("discard {} {}", 7 * c + 8 * sub, 8 * sub),
        // Last: one subcluster in a fresh cluster, so the file ends inside that
        // host cluster (valid: the rest of the cluster is unallocated).
        format!("write -P 6 {} 4k", 9 * c + 16 * sub),
    ];
    s.io_all("x.qcow2", "qcow2", &cmds);
    check(&s, "x.qcow2", None);
    let map = qemu_map_json(s.dir(), &s.p("x.qcow2"), None);
    assert!(
        count_extents(&map, |e| e["present"] == false && e.get("offset").is_some()) >= 1,
        "expected unallocated subclusters with an offset: {map}"
    );
    let info = qbackup_info_ok(s.dir(), &s.p("x.qcow2"), None);
    assert_eq!(info["format-specific"]["data"]["extended-l2"], true);
}

test_cases! { extended_l2_case =>
    qcow2_extended_l2_64k(64 * KIB);
    qcow2_extended_l2_128k(128 * KIB);
}

#[test]
fn qcow2_extended_l2_file_ends_inside_cluster() {
    // qemu writes only the subcluster: the host cluster runs past EOF.
    let s = Scratch::new();
    let p = s.create("x.qcow2", "qcow2", 4 * MIB, "extended_l2=on");
    s.io("x.qcow2", "qcow2", &["write -P 1 4k 4k"]);
    let map = qemu_map_json(s.dir(), &s.p("x.qcow2"), None);
    let data_off = extents(&map)
        .iter()
        .find(|e| e["data"] == true)
        .and_then(|e| e["offset"].as_u64())
        .expect("a data extent");
    assert!(
        file_len(&p) < data_off - 4096 + 64 * KIB,
        "test premise: file should end inside the data cluster"
    );
    check(&s, "x.qcow2", None);
}

#[test]
fn qcow2_extended_l2_chain() {
    // Unallocated subclusters of the overlay fall through to the backing file.
    let s = Scratch::new();
    s.create("base.qcow2", "qcow2", 4 * MIB, "");
    s.io("base.qcow2", "qcow2", &["write -P 1 0 1M"]);
    s.overlay("top.qcow2", "base.qcow2", "qcow2", None, "extended_l2=on");
    s.io(
        "top.qcow2",
        "qcow2",
        &["write -P 2 4k 4k", "write -z 16k 8k", "write -P 3 1M 4k"],
    );
    check(&s, "top.qcow2", None);
}

// ---------------------------------------------------------------------------
// preallocation, refcounts, lazy refcounts, dirty bit
// ---------------------------------------------------------------------------

fn prealloc_case(mode: &str) {
    let s = Scratch::new();
    s.create(
        "pre.qcow2",
        "qcow2",
        4 * MIB,
        &format!("preallocation={mode}"),
    );
    s.io(
        "pre.qcow2",
        "qcow2",
        &["write -P 1 64k 64k", "write -z 1M 64k"],
    );
    check(&s, "pre.qcow2", None);
}

test_cases! { prealloc_case =>
    qcow2_prealloc_metadata("metadata");
    qcow2_prealloc_falloc("falloc");
    qcow2_prealloc_full("full");
}

#[test]
fn raw_prealloc_full() {
    let s = Scratch::new();
    s.create("full.raw", "raw", 2 * MIB, "preallocation=full");
    check(&s, "full.raw", None);
}

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
// backing chains
// ---------------------------------------------------------------------------

#[test]
fn chain_three_qcow2_layers() {
    let s = Scratch::new();
    s.create("base.qcow2", "qcow2", 4 * MIB, "");
    s.io(
        "base.qcow2",
        "qcow2",
        &[
            "write -P 1 0 2M",
            "write -c -P 2 3M 128k",
            "write -z 3584k 64k",
        ],
    );
    s.overlay("mid.qcow2", "base.qcow2", "qcow2", None, "");
    s.io(
        "mid.qcow2",
        "qcow2",
        &[
            "write -P 3 64k 64k",
            "write -z 256k 128k",
            "discard 512k 64k",
            "write -P 4 2M 100k",
        ],
    );
    s.overlay("top.qcow2", "mid.qcow2", "qcow2", None, "");
    s.io(
        "top.qcow2",
        "qcow2",
        &[
            "write -P 5 96k 64k",
            "write -z -u 1M 64k",
            "write -c -P 6 3M 64k",
            "write -P 7 4190208 4096",
        ],
    );
    check(&s, "top.qcow2", None);
    check(&s, "mid.qcow2", None);
    let map = qemu_map_json(s.dir(), &s.p("top.qcow2"), None);
    for depth in 0..=2 {
        assert!(
            count_extents(&map, |e| e["depth"] == depth && e["data"] == true) >= 1,
            "expected data at depth {depth}: {map}"
        );
    }
}

#[test]
fn chain_raw_base_mixed_cluster_sizes() {
    let s = Scratch::new();
    s.create("base.raw", "raw", 4 * MIB, "");
    s.io(
        "base.raw",
        "raw",
        &["write -P 1 0 1M", "write -P 2 2M 4k", "write -P 3 3M 1M"],
    );
    s.overlay("mid.qcow2", "base.raw", "raw", None, "cluster_size=4096");
    s.io(
        "mid.qcow2",
        "qcow2",
        &["write -P 4 8k 4k", "write -z 2M 4k", "write -P 5 2560k 12k"],
    );
    s.overlay(
        "top.qcow2",
        "mid.qcow2",
        "qcow2",
        None,
        "cluster_size=65536",
    );
    s.io(
        "top.qcow2",
        "qcow2",
        &["write -P 6 4k 8k", "write -P 7 3M 64k"],
    );
    check(&s, "top.qcow2", None);
    check(&s, "mid.qcow2", None);
}

#[test]
fn chain_raw_base_odd_size_shorter_than_overlay() {
    let s = Scratch::new();
    let mut v = noise((MIB + 3) as usize, 9);
    v[..4096].fill(0);
    s.write_file("base.raw", &v);
    s.overlay("top.qcow2", "base.raw", "raw", Some(4 * MIB), "");
    s.io(
        "top.qcow2",
        "qcow2",
        &["write -P 1 64k 4k", "write -P 2 3M 64k"],
    );
    check(&s, "top.qcow2", None);
}

#[test]
fn chain_backing_shorter_than_overlay() {
    let s = Scratch::new();
    s.create("base.qcow2", "qcow2", 4 * MIB, "");
    s.io("base.qcow2", "qcow2", &["write -P 1 0 4M"]);
    s.overlay("top.qcow2", "base.qcow2", "qcow2", Some(8 * MIB), "");
    s.io(
        "top.qcow2",
        "qcow2",
        &["write -P 2 1M 64k", "write -P 3 5M 64k", "write -z 6M 64k"],
    );
    check(&s, "top.qcow2", None);
    let map = qemu_map_json(s.dir(), &s.p("top.qcow2"), None);
    let last = extents(&map).last().unwrap().clone();
    assert_eq!(
        last["start"].as_u64().unwrap() + last["length"].as_u64().unwrap(),
        8 * MIB
    );
}

#[test]
fn chain_backing_longer_than_overlay() {
    let s = Scratch::new();
    s.create("base.qcow2", "qcow2", 8 * MIB, "");
    s.io("base.qcow2", "qcow2", &["write -P 1 0 8M"]);
    s.overlay("top.qcow2", "base.qcow2", "qcow2", Some(2 * MIB), "");
    s.io("top.qcow2", "qcow2", &["write -P 2 1M 64k"]);
    check(&s, "top.qcow2", None);
}

#[test]
fn chain_relative_backing_in_subdirectories() {
    let s = Scratch::new();
    s.mkdir("images/sub");
    s.mkdir("other");
    s.create("other/base.qcow2", "qcow2", 4 * MIB, "");
    s.io("other/base.qcow2", "qcow2", &["write -P 1 0 1M"]);
    // Backing names are relative to the overlay's directory.
    s.overlay("images/mid.qcow2", "../other/base.qcow2", "qcow2", None, "");
    s.io("images/mid.qcow2", "qcow2", &["write -P 2 64k 64k"]);
    s.overlay("images/sub/top.qcow2", "../mid.qcow2", "qcow2", None, "");
    s.io("images/sub/top.qcow2", "qcow2", &["write -P 3 2M 64k"]);
    s.overlay("images/sub/top2.qcow2", "top.qcow2", "qcow2", None, "");
    s.io("images/sub/top2.qcow2", "qcow2", &["write -P 4 3M 64k"]);
    // Give the image from several working directories, relative and absolute:
    // the human map's File column and full-backing-filename depend on it.
    for (cwd, image) in [
        (s.dir().to_path_buf(), "images/sub/top2.qcow2".to_owned()),
        (s.path("other"), "../images/sub/top2.qcow2".to_owned()),
        (s.path("images/sub"), "top2.qcow2".to_owned()),
        (s.path("images"), s.p("images/sub/top2.qcow2")),
    ] {
        assert_image_matches(&cwd, &image, None);
    }
    let info = qbackup_info_ok(s.dir(), "images/sub/top2.qcow2", None);
    assert_eq!(info["backing-filename"], "top.qcow2");
    assert_eq!(info["full-backing-filename"], "images/sub/top.qcow2");
}

#[test]
fn chain_with_compressed_and_zero_over_backing() {
    // Zero clusters and discards in the overlay hide backing data.
    let s = Scratch::new();
    s.create("base.qcow2", "qcow2", 4 * MIB, "compression_type=zstd");
    s.io(
        "base.qcow2",
        "qcow2",
        &["write -c -P 1 0 2M", "write -P 2 2M 2M"],
    );
    s.overlay("top.qcow2", "base.qcow2", "qcow2", None, "");
    s.io(
        "top.qcow2",
        "qcow2",
        &[
            "write -z 0 64k",
            "discard 2M 128k",
            "write -z -u 3M 64k",
            "write -c -P 3 1M 64k",
        ],
    );
    check(&s, "top.qcow2", None);
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

// ---------------------------------------------------------------------------
// large sparse images
// ---------------------------------------------------------------------------

#[test]
fn qcow2_large_sparse_64g() {
    // 64 GiB virtual, 64 KiB clusters: one L2 table per 512 MiB, ~100 of them used.
    let s = Scratch::new();
    s.create("big.qcow2", "qcow2", 64 * GIB, "");
    let mut cmds: Vec<String> = (0..100u64)
        .map(|i| {
            let off = i * (655 * MIB) + i * 4097 % (60 * KIB);
            format!("write -P {} {} 4096", i % 250 + 1, off)
        })
        .collect();
    // Across an L2 boundary, across 4 GiB, and at the very end.
    cmds.push(format!("write -P 0x71 {} 128k", 512 * MIB - 64 * KIB));
    cmds.push(format!("write -c -P 0x72 {} 128k", 4 * GIB - 64 * KIB));
    cmds.push(format!("write -z {} 64k", 8 * GIB));
    cmds.push(format!("write -P 0x73 {} 4096", 64 * GIB - 4096));
    s.io_all("big.qcow2", "qcow2", &cmds);
    check(&s, "big.qcow2", None);
}

#[test]
fn qcow2_large_sparse_64g_4k_clusters() {
    // 4 KiB clusters: one L2 table per 2 MiB, an L1 of 32768 entries, ~300 L2 tables.
    let s = Scratch::new();
    s.create("big4k.qcow2", "qcow2", 64 * GIB, "cluster_size=4096");
    let cmds: Vec<String> = (0..300u64)
        .map(|i| {
            let off = i * (218 * MIB + 4096 * 7) + (i % 5) * 512;
            format!("write -P {} {} {}", i % 250 + 1, off, 4096 * (1 + i % 3))
        })
        .collect();
    s.io_all("big4k.qcow2", "qcow2", &cmds);
    check(&s, "big4k.qcow2", None);
    let map = qemu_map_json(s.dir(), &s.p("big4k.qcow2"), None);
    assert!(
        has(&map, "data", true) >= 300,
        "expected >= 300 data extents"
    );
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

#[test]
fn qcow2_with_internal_snapshot() {
    // Clusters shared with a snapshot lose the COPIED flag; writes after the
    // snapshot copy on write. Only the active layer is mapped.
    let s = Scratch::new();
    s.create("snap.qcow2", "qcow2", 4 * MIB, "");
    s.io(
        "snap.qcow2",
        "qcow2",
        &["write -P 1 0 256k", "write -c -P 2 1M 64k"],
    );
    s.img(&["snapshot", "-c", "s1", &s.p("snap.qcow2")]);
    s.io(
        "snap.qcow2",
        "qcow2",
        &[
            "write -P 3 64k 64k",
            "discard 128k 64k",
            "write -P 4 2M 64k",
        ],
    );
    s.img(&["snapshot", "-c", "s2", &s.p("snap.qcow2")]);
    s.io("snap.qcow2", "qcow2", &["write -z 0 64k"]);
    check(&s, "snap.qcow2", None);
}

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

#[test]
fn qcow2_virtual_size_not_cluster_multiple() {
    let s = Scratch::new();
    s.create("odd.qcow2", "qcow2", 4 * MIB + 512, "");
    s.io(
        "odd.qcow2",
        "qcow2",
        &["write -P 1 4194304 512", "write -P 2 4128768 4096"],
    );
    check(&s, "odd.qcow2", None);
    // qemu-img rounds 1000 up to 1024.
    s.create("tiny.qcow2", "qcow2", 1000, "cluster_size=4096");
    s.io("tiny.qcow2", "qcow2", &["write -P 3 512 512"]);
    check(&s, "tiny.qcow2", None);
}

#[test]
fn qcow2_resized() {
    let s = Scratch::new();
    s.create("grow.qcow2", "qcow2", 4 * MIB, "cluster_size=4096");
    s.io("grow.qcow2", "qcow2", &["write -P 1 0 1M"]);
    // 4 KiB clusters: growing to 1 GiB reallocates the L1 table.
    s.img(&["resize", "-q", &s.p("grow.qcow2"), "1G"]);
    s.io("grow.qcow2", "qcow2", &["write -P 2 900M 64k"]);
    check(&s, "grow.qcow2", None);
    s.create("shrink.qcow2", "qcow2", 8 * MIB, "");
    s.io("shrink.qcow2", "qcow2", &["write -P 1 0 8M"]);
    s.img(&["resize", "-q", "--shrink", &s.p("shrink.qcow2"), "3M"]);
    check(&s, "shrink.qcow2", None);
}

#[test]
fn qcow2_from_convert() {
    let s = Scratch::new();
    let mut v = noise((3 * MIB) as usize, 11);
    v[MIB as usize..2 * MIB as usize].fill(0x55);
    v[2 * MIB as usize..].fill(0);
    s.write_file("src.raw", &v);
    for (name, opts) in [
        ("conv.qcow2", vec![]),
        ("convc.qcow2", vec!["-c"]),
        ("convz.qcow2", vec!["-c", "-o", "compression_type=zstd"]),
    ] {
        let mut args = vec!["convert", "-q", "-f", "raw", "-O", "qcow2"];
        args.extend(opts);
        args.extend(["src.raw", name]);
        s.img(&args);
        check(&s, name, None);
    }
}

#[test]
fn qcow2_prealloc_metadata_extended_l2() {
    let s = Scratch::new();
    s.create(
        "prex.qcow2",
        "qcow2",
        4 * MIB,
        "preallocation=metadata,extended_l2=on",
    );
    s.io(
        "prex.qcow2",
        "qcow2",
        &["write -P 1 4k 4k", "write -z 1M 64k"],
    );
    check(&s, "prex.qcow2", None);
}

#[test]
fn chain_backing_format_probed() {
    // Without the backing-format extension the backing file's format is probed.
    let s = Scratch::new();
    s.create("base.raw", "raw", 4 * MIB, "");
    s.io("base.raw", "raw", &["write -P 1 0 1M"]);
    s.create("base.qcow2", "qcow2", 4 * MIB, "");
    s.io("base.qcow2", "qcow2", &["write -P 2 1M 1M"]);
    for (top, base, fmt) in [
        ("top-raw.qcow2", "base.raw", "raw"),
        ("top-q.qcow2", "base.qcow2", "qcow2"),
    ] {
        let p = s.overlay(top, base, fmt, None, "");
        s.io(top, "qcow2", &["write -P 3 64k 64k"]);
        // Turn the backing-format extension into an unknown (ignored) one.
        patch_u32(
            &p,
            qcow2_header_extension(&p, ext::BACKING_FORMAT),
            0x7777_0001,
        );
        let q = qemu_info_json(s.dir(), &s.p(top), None);
        assert!(q.get("backing-filename-format").is_none(), "test premise");
        check(&s, top, None);
    }
}

#[test]
fn chain_absolute_backing_name() {
    let s = Scratch::new();
    s.mkdir("a");
    s.mkdir("b");
    s.create("a/base.qcow2", "qcow2", 4 * MIB, "");
    s.io("a/base.qcow2", "qcow2", &["write -P 1 0 1M"]);
    s.overlay("b/top.qcow2", &s.p("a/base.qcow2"), "qcow2", None, "");
    s.io("b/top.qcow2", "qcow2", &["write -P 2 512k 64k"]);
    check(&s, "b/top.qcow2", None);
    assert_image_matches(&s.path("b"), "top.qcow2", None);
}

#[test]
fn qcow2_zero_virtual_size() {
    let s = Scratch::new();
    s.create("zero.qcow2", "qcow2", 0, "");
    check(&s, "zero.qcow2", None);
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
