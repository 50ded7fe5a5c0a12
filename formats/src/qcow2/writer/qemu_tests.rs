//! Writes qcow2 images with `Qcow2Writer` and lets QEMU judge them:
//! `qemu-img check` (no errors, no leaks), `qemu-img compare` against the
//! expected guest content, `qemu-img map` (compressed and zero clusters where
//! they were written) and `qemu-img info` (compression type, backing file).
//!
//! The tests are skipped, with a message, when qemu-img is not installed.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use crate::codec::{CompressionType, Compressor};
use crate::qcow2::writer::{BackingRef, ClusterWrite, Qcow2Writer, WriterOptions};
use crate::units::ClusterIndex;

/// Byte every cluster of the backing file holds.
const BASE_PATTERN: u8 = 0x55;

/// What a test writes into one guest cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Plan {
    /// Not written at all.
    Skip,
    /// Incompressible data, stored as a normal cluster.
    Data,
    /// Compressible data, stored compressed.
    Compressed,
    /// Zeros.
    Zero,
}

fn qemu_available() -> bool {
    let found = Command::new("qemu-img").arg("--version").output().is_ok()
        && Command::new("qemu-io").arg("--version").output().is_ok();
    if !found {
        eprintln!("qemu-img/qemu-io not found: skipping qcow2 writer interop test");
    }
    found
}

fn run(cmd: &mut Command) -> Output {
    cmd.output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"))
}

fn text(out: &Output) -> String {
    format!(
        "status {}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// A small deterministic generator (xorshift64).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// Guest content of a cluster: random bytes for `Data`; for `Compressed`,
/// letter runs whose length limit varies per cluster, so the streams have
/// different lengths and often cross host cluster boundaries.
fn content(plan: Plan, index: u64, cluster_size: usize) -> Vec<u8> {
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15 ^ (index + 1).wrapping_mul(0x2545_F491_4F6C_DD1D));
    match plan {
        Plan::Data => (0..cluster_size).map(|_| rng.next() as u8).collect(),
        Plan::Compressed => {
            // Runs of 1 to `run` letters from a small alphabet: compresses
            // to a varying fraction, and quickly even in debug builds.
            let run = [2u64, 4, 8, 16, 32][(index % 5) as usize];
            let mut out = Vec::with_capacity(cluster_size);
            while out.len() < cluster_size {
                let r = rng.next();
                let len = (1 + (r >> 8) % run) as usize;
                out.extend(std::iter::repeat_n(b'a' + (r % 8) as u8, len));
            }
            out.truncate(cluster_size);
            out
        }
        Plan::Skip | Plan::Zero => vec![0; cluster_size],
    }
}

/// A pseudo-random mix of every kind, fixed by `seed`.
fn mixed_plan(clusters: u64, seed: u64) -> Vec<Plan> {
    let mut rng = Rng(seed | 1);
    (0..clusters)
        .map(|_| match rng.next() % 8 {
            0 | 1 => Plan::Skip,
            2 | 3 => Plan::Data,
            4..=6 => Plan::Compressed,
            _ => Plan::Zero,
        })
        .collect()
}

struct Case<'a> {
    dir: &'a Path,
    cluster_bits: u32,
    virtual_size: u64,
    codec: CompressionType,
    backing: bool,
    plan: Vec<Plan>,
}

/// Writes the image and the raw file with the content it must read as.
/// Returns the image path, the expected raw path and how many compressed
/// streams crossed a host cluster boundary.
fn write_case(case: &Case) -> (PathBuf, PathBuf, usize) {
    let cluster_size = 1usize << case.cluster_bits;
    let image = case.dir.join("out.qcow2");
    let expected = case.dir.join("expected.raw");
    let backing = case.backing.then(|| {
        let base = case.dir.join("base.qcow2");
        let size = case.virtual_size.to_string();
        let out = run(Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2"])
            .arg(&base)
            .arg(&size));
        assert!(out.status.success(), "{}", text(&out));
        let cmd = format!("write -P {BASE_PATTERN:#x} 0 {size}");
        let out = run(Command::new("qemu-io")
            .args(["-f", "qcow2", "-c", &cmd])
            .arg(&base));
        assert!(out.status.success(), "{}", text(&out));
        BackingRef {
            name: "base.qcow2".into(),
            format: "qcow2".into(),
        }
    });
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&image)
        .unwrap();
    let mut writer = Qcow2Writer::on_file(
        file,
        &image,
        WriterOptions {
            virtual_size: case.virtual_size,
            cluster_bits: case.cluster_bits,
            compression: case.codec,
            backing,
        },
    )
    .unwrap();
    let mut compressor = Compressor::new(case.codec, 1).unwrap();
    let mut packed = Vec::new();
    let mut raw = File::create(&expected).unwrap();
    // (guest cluster, stream length, a normal cluster came just before)
    let mut streams: Vec<(u64, u64, bool)> = Vec::new();
    let mut after_data = false;
    for (i, &plan) in case.plan.iter().enumerate() {
        let index = i as u64;
        let data = content(plan, index, cluster_size);
        match plan {
            Plan::Skip => {}
            Plan::Data => {
                writer
                    .write_cluster(ClusterIndex(index), ClusterWrite::Data(&data))
                    .unwrap();
                after_data = true;
            }
            Plan::Compressed => {
                assert!(compressor
                    .compress(&data, &mut packed, cluster_size)
                    .unwrap());
                writer
                    .write_cluster(ClusterIndex(index), ClusterWrite::Compressed(&packed))
                    .unwrap();
                streams.push((index, packed.len() as u64, after_data));
                after_data = false;
            }
            Plan::Zero => writer
                .write_cluster(ClusterIndex(index), ClusterWrite::Zero)
                .unwrap(),
        }
        let shown = if plan == Plan::Skip && case.backing {
            vec![BASE_PATTERN; cluster_size]
        } else {
            data
        };
        let start = index * cluster_size as u64;
        let len = (case.virtual_size - start).min(cluster_size as u64) as usize;
        raw.write_all(&shown[..len]).unwrap();
    }
    raw.set_len(case.virtual_size).unwrap();
    writer.finish().unwrap();
    let len = std::fs::metadata(&image).unwrap().len();
    assert_eq!(
        len % cluster_size as u64,
        0,
        "file ends with a whole cluster"
    );
    let crossings = check_packing(&image, case.cluster_bits, &streams);
    (image, expected, crossings)
}

/// Reads the compressed descriptors back and checks the packing rule: each
/// stream follows the previous one byte for byte, unless it did not fit the
/// rest of that cluster and a normal cluster or a table (an L2 table or a
/// refcount block written as soon as it was final) has taken the host
/// cluster after the compressed region, in which case it starts a fresh
/// cluster. Returns how many streams cross a host cluster boundary.
fn check_packing(image: &Path, cluster_bits: u32, streams: &[(u64, u64, bool)]) -> usize {
    use crate::open::{FileOpener, Opener, Role};
    use crate::qcow2::image::{Piece, Qcow2Image};
    use crate::GuestOffset;
    let storage = FileOpener.open(image, Role::Image).unwrap();
    let q = Qcow2Image::open(storage, &FileOpener).unwrap();
    let cluster = 1u64 << cluster_bits;
    let tables = table_clusters(image, cluster_bits);
    let mut prev_end: Option<u64> = None;
    let mut crossings = 0;
    // A normal cluster was placed since the current compressed region began.
    let mut data_in_region = false;
    for &(index, len, after_data) in streams {
        data_in_region |= after_data;
        let (piece, _) = q
            .locate(GuestOffset(index << cluster_bits), cluster, true)
            .unwrap();
        let Piece::Compressed(_, desc) = piece else {
            panic!("cluster {index} is not compressed: {piece:?}");
        };
        let at = desc.offset.0;
        if let Some(end) = prev_end {
            let room = end.div_ceil(cluster) * cluster - end;
            if at != end {
                let taken = data_in_region || tables.contains(&end.div_ceil(cluster));
                assert!(
                    taken && len > room && at % cluster == 0,
                    "stream of cluster {index} at {at:#x} leaves a gap after {end:#x}"
                );
                data_in_region = false;
            }
        }
        if at >> cluster_bits != (at + len - 1) >> cluster_bits {
            crossings += 1;
        }
        prev_end = Some(at + len);
    }
    crossings
}

/// Host cluster numbers of the L2 tables and refcount blocks of `image`,
/// read from its L1 and refcount tables.
fn table_clusters(image: &Path, cluster_bits: u32) -> std::collections::HashSet<u64> {
    let bytes = std::fs::read(image).unwrap();
    let be64 =
        |at: u64| u64::from_be_bytes(bytes[at as usize..at as usize + 8].try_into().unwrap());
    let be32 = |at: usize| u32::from_be_bytes(bytes[at..at + 4].try_into().unwrap());
    let (l1, l1_size) = (be64(40), u64::from(be32(36)));
    let (reftable, reftable_clusters) = (be64(48), u64::from(be32(56)));
    let offsets = (0..l1_size)
        .map(|i| be64(l1 + 8 * i) & 0x00ff_ffff_ffff_fe00)
        .chain((0..reftable_clusters << cluster_bits >> 3).map(|i| be64(reftable + 8 * i)));
    offsets
        .filter(|&o| o != 0)
        .map(|o| o >> cluster_bits)
        .collect()
}

/// One extent of `qemu-img map --output=json`.
#[derive(Debug)]
struct MapEntry {
    start: u64,
    length: u64,
    depth: u64,
    zero: bool,
    data: bool,
    compressed: bool,
    offset: Option<u64>,
}

fn field<'a>(line: &'a str, name: &str) -> Option<&'a str> {
    let key = format!("\"{name}\": ");
    let at = line.find(&key)? + key.len();
    let rest = &line[at..];
    let end = rest.find([',', '}']).unwrap_or(rest.len());
    Some(rest[..end].trim())
}

fn qemu_map(image: &Path) -> Vec<MapEntry> {
    let out = run(Command::new("qemu-img")
        .args(["map", "--output=json", "-f", "qcow2"])
        .arg(image));
    assert!(out.status.success(), "{}", text(&out));
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .filter(|l| l.contains("\"start\""))
        .map(|l| {
            let num = |n| {
                field(l, n)
                    .unwrap_or_else(|| panic!("no {n} in {l}"))
                    .parse::<u64>()
                    .unwrap()
            };
            let flag = |n| field(l, n).unwrap_or_else(|| panic!("no {n} in {l}")) == "true";
            MapEntry {
                start: num("start"),
                length: num("length"),
                depth: num("depth"),
                zero: flag("zero"),
                data: flag("data"),
                compressed: flag("compressed"),
                offset: field(l, "offset").map(|o| o.parse().unwrap()),
            }
        })
        .collect()
}

/// Runs all QEMU checks on a written case.
fn verify(case: &Case, image: &Path, expected: &Path) {
    let cluster_size = 1u64 << case.cluster_bits;
    let out = run(Command::new("qemu-img")
        .args(["check", "-f", "qcow2"])
        .arg(image));
    assert!(out.status.success(), "qemu-img check: {}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("No errors were found on the image."),
        "{}",
        text(&out)
    );

    let out = run(Command::new("qemu-img")
        .args(["compare", "-f", "raw", "-F", "qcow2"])
        .arg(expected)
        .arg(image));
    assert!(out.status.success(), "qemu-img compare: {}", text(&out));

    let out = run(Command::new("qemu-img")
        .args(["info", "--output=json", "-f", "qcow2"])
        .arg(image));
    assert!(out.status.success(), "{}", text(&out));
    let info = String::from_utf8_lossy(&out.stdout);
    let codec = format!("\"compression-type\": \"{}\"", case.codec.name());
    assert!(info.contains(&codec), "{info}");
    assert!(
        info.contains(&format!("\"virtual-size\": {},", case.virtual_size)),
        "{info}"
    );
    assert!(
        info.contains(&format!("\"cluster-size\": {cluster_size},")),
        "{info}"
    );
    assert_eq!(
        case.backing,
        info.contains("\"backing-filename\": \"base.qcow2\""),
        "{info}"
    );
    assert_eq!(
        case.backing,
        info.contains("\"backing-filename-format\": \"qcow2\""),
        "{info}"
    );

    let map = qemu_map(image);
    for (i, &plan) in case.plan.iter().enumerate() {
        let start = i as u64 * cluster_size;
        // Extents are sorted and contiguous: take the last one starting at
        // or before the cluster.
        let e = map[..map.partition_point(|e| e.start <= start)]
            .last()
            .filter(|e| start < e.start + e.length)
            .unwrap_or_else(|| panic!("cluster {i} missing from map {map:?}"));
        let ctx = format!("cluster {i} planned {plan:?}: {e:?}");
        match plan {
            Plan::Data => {
                assert!(e.data && !e.zero && !e.compressed && e.depth == 0, "{ctx}");
                let offset = e.offset.expect("data has an offset") + (start - e.start);
                assert_eq!(offset % cluster_size, 0, "{ctx}");
            }
            Plan::Compressed => {
                assert!(
                    e.data && e.compressed && e.depth == 0 && e.offset.is_none(),
                    "{ctx}"
                )
            }
            Plan::Zero if case.backing => {
                assert!(
                    e.zero && !e.data && e.depth == 0 && e.offset.is_none(),
                    "{ctx}"
                )
            }
            Plan::Skip if case.backing => assert!(e.depth == 1 && e.data, "{ctx}"),
            Plan::Zero | Plan::Skip => assert!(e.zero && !e.data, "{ctx}"),
        }
    }
}

/// Writes `plan`, checks that some compressed stream crossed a host cluster
/// boundary, and runs all QEMU checks.
fn run_case(
    cluster_bits: u32,
    virtual_size: u64,
    codec: CompressionType,
    backing: bool,
    plan: Vec<Plan>,
) {
    if !qemu_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let case = Case {
        dir: dir.path(),
        cluster_bits,
        virtual_size,
        codec,
        backing,
        plan,
    };
    let (image, expected, crossings) = write_case(&case);
    assert!(crossings > 0, "no compressed stream crossed a host cluster");
    verify(&case, &image, &expected);
}

/// [`mixed_plan`] over the whole disk.
fn mixed(cluster_bits: u32, virtual_size: u64, seed: u64) -> Vec<Plan> {
    mixed_plan(virtual_size.div_ceil(1 << cluster_bits), seed)
}

#[test]
fn clusters_512_zstd_many_l2_tables() {
    // 64 entries per L2 table: 10 tables, some of them never allocated.
    let size = 300 * 1024 + 512;
    let mut plan = mixed(9, size, 1);
    plan[64..192].fill(Plan::Skip);
    run_case(9, size, CompressionType::Zstd, false, plan);
}

#[test]
fn clusters_512_zlib_backing() {
    run_case(
        9,
        200 * 1024,
        CompressionType::Zlib,
        true,
        mixed(9, 200 * 1024, 2),
    );
}

#[test]
fn clusters_4k_zlib_backing() {
    let size = (3 << 20) + 1024;
    run_case(12, size, CompressionType::Zlib, true, mixed(12, size, 3));
}

#[test]
fn clusters_4k_zstd() {
    run_case(
        12,
        2 << 20,
        CompressionType::Zstd,
        false,
        mixed(12, 2 << 20, 4),
    );
}

#[test]
fn clusters_64k_zlib_partial_last_cluster() {
    let size = (4 << 20) + 4096;
    let mut plan = mixed(16, size, 5);
    *plan.last_mut().unwrap() = Plan::Compressed;
    run_case(16, size, CompressionType::Zlib, false, plan);
}

#[test]
fn clusters_64k_zstd_backing() {
    run_case(
        16,
        8 << 20,
        CompressionType::Zstd,
        true,
        mixed(16, 8 << 20, 6),
    );
}

/// Every kind once, after `n` consecutive compressed clusters (enough to
/// cross a 2 MiB host cluster boundary).
fn plan_2m(n: usize) -> Vec<Plan> {
    use Plan::*;
    let mut plan = vec![Compressed; n];
    plan.extend([Data, Zero, Skip, Compressed]);
    plan
}

#[test]
fn clusters_2m_zstd_backing() {
    run_case(21, 20 << 20, CompressionType::Zstd, true, plan_2m(6));
}

#[test]
fn clusters_2m_zlib() {
    run_case(
        21,
        (12 << 20) + 512,
        CompressionType::Zlib,
        false,
        plan_2m(2),
    );
}

#[test]
fn only_compressed_512_and_64k() {
    // Back-to-back streams only, so nearly every host cluster is shared.
    for (bits, size) in [(9u32, 64 * 1024u64), (16, 2 << 20)] {
        for codec in [CompressionType::Zlib, CompressionType::Zstd] {
            let plan = vec![Plan::Compressed; (size >> bits) as usize];
            run_case(bits, size, codec, false, plan);
        }
    }
}
#[test]
fn empty_images() {
    // Nothing written, zero-size, and only zero clusters over a backing file.
    let cases: [(u32, u64, bool, Vec<Plan>); 3] = [
        (16, 1 << 20, false, vec![]),
        (16, 0, false, vec![]),
        (12, 64 * 1024, true, vec![Plan::Zero; 16]),
    ];
    for (bits, size, backing, plan) in cases {
        if !qemu_available() {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let case = Case {
            dir: dir.path(),
            cluster_bits: bits,
            virtual_size: size,
            codec: CompressionType::Zlib,
            backing,
            plan,
        };
        let (image, expected, _) = write_case(&case);
        verify(&case, &image, &expected);
    }
}

#[test]
fn clusters_512_multi_cluster_l1_and_refcount_table() {
    // 12 MiB in 512-byte clusters: the L1 table takes 6 clusters and over
    // 16384 host clusters need more than 64 refcount blocks, so the refcount
    // table takes 2 clusters.
    let size = 12u64 << 20;
    let plan = (0..size >> 9)
        .map(|i| {
            if i % 4 == 0 {
                Plan::Compressed
            } else {
                Plan::Data
            }
        })
        .collect();
    if !qemu_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let case = Case {
        dir: dir.path(),
        cluster_bits: 9,
        virtual_size: size,
        codec: CompressionType::Zstd,
        backing: false,
        plan,
    };
    let (image, expected, _) = write_case(&case);
    let header = std::fs::read(&image).unwrap();
    let be32 = |at: usize| u32::from_be_bytes(header[at..at + 4].try_into().unwrap());
    assert_eq!(be32(36), 384, "l1_size");
    assert_eq!(be32(56), 2, "refcount_table_clusters");
    verify(&case, &image, &expected);
}

#[test]
fn other_cluster_sizes() {
    for (bits, codec) in [
        (10, CompressionType::Zlib),
        (14, CompressionType::Zstd),
        (18, CompressionType::Zstd),
    ] {
        let size = 64 << bits;
        let mut plan = mixed(bits, size, u64::from(bits));
        // A run of compressed clusters always packs streams across host
        // cluster boundaries.
        plan[48..].fill(Plan::Compressed);
        run_case(bits, size, codec, bits == 14, plan);
    }
}

/// Single compressed clusters each followed by 2.5 MiB of data clusters:
/// the writer detaches the open compressed cluster from its buffer while
/// the data piles up behind it, and the next streams go back into it
/// (`appender.rs`); a run of compressed clusters at the end crosses host
/// cluster boundaries. QEMU must read it all back.
#[test]
fn detached_compressed_clusters_64k() {
    use Plan::*;
    let mut plan = Vec::new();
    for _ in 0..12 {
        plan.push(Compressed);
        plan.extend(std::iter::repeat_n(Data, 38));
        plan.extend([Zero, Skip]);
    }
    plan.extend(std::iter::repeat_n(Compressed, 10));
    let size = (plan.len() as u64) << 16;
    for codec in [CompressionType::Zlib, CompressionType::Zstd] {
        run_case(16, size, codec, false, plan.clone());
    }
}
