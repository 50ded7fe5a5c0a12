//! `qbackup map` and `qbackup info` against qemu-img for single qcow2 images,
//! one test per kind: v2 and v3, cluster sizes 512 B–2 MiB, zero, discarded
//! and compressed clusters, extended L2, preallocation, large sparse images,
//! odd and zero virtual sizes, resized and converted images, internal
//! snapshots.
//!
//! Every image is built at test time with qemu-img / qemu-io, then
//! [`common::check`] compares: `map --output=json` (parsed, must be
//! identical), human `map` (identical text, or a clean refusal where qemu-img
//! refuses compressed clusters) and `info --output=json` (the contract's keys).

mod common;

use common::compare::check;
use common::map_info::{has, noise, MIX};
use common::oracle::{count_extents, extents, qemu_info_json, qemu_map_human, qemu_map_json};
use common::qcow2::file_len;
use common::run::{qbackup_in, qbackup_info_ok, qbackup_map_human};
use common::scratch::Scratch;
use common::{test_cases, GIB, KIB, MIB};

// ---------------------------------------------------------------------------
// qcow2 basics
// ---------------------------------------------------------------------------

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

// ---------------------------------------------------------------------------
// cluster sizes
// ---------------------------------------------------------------------------

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

// ---------------------------------------------------------------------------
// zero, discarded and compressed clusters
// ---------------------------------------------------------------------------

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

// ---------------------------------------------------------------------------
// preallocation
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

// ---------------------------------------------------------------------------
// sizes, snapshots, resized and converted images
// ---------------------------------------------------------------------------

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
fn qcow2_zero_virtual_size() {
    let s = Scratch::new();
    s.create("zero.qcow2", "qcow2", 0, "");
    check(&s, "zero.qcow2", None);
}
