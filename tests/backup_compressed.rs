//! End-to-end tests of the compressed clusters `qbackup backup` writes,
//! beyond the round trips of `backup_roundtrip.rs`.
//!
//! - `qcow2_rs_*`: qcow2-rs, a second reader independent of qemu-img, reads
//!   a zlib backup back byte for byte.
//! - `deterministic_*`: the number of threads does not change the output.
//! - `passthrough_*`: compressed source clusters copied as they are.

mod common;

use std::path::Path;
use std::thread;

use common::backup::{backup_checked, compressed_source, standard_qcow2};
use common::oracle::{assert_identical, guest_bytes};
use common::qcow2::{file_len, read_bytes, Layout};
use common::scratch::Scratch;
use common::{KIB, MIB};

// ---------------------------------------------------------------------------
// qcow2-rs as a second reader
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
// Determinism
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
// Pass-through of compressed clusters
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
