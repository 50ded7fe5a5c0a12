//! The codec limit for `benches/compare.sh`: the non-zero clusters of a raw
//! disk image compressed in memory, one stream per cluster, by the codec,
//! level and number of threads qbackup uses, with no I/O and no ordering.
//! A backup cannot be faster than this on the same machine; the bench
//! prints qbackup's time over it.
//!
//! Usage: `codec_limit RAW CODEC LEVEL THREADS [CLUSTER_SIZE]` (codec zstd
//! or zlib, cluster size in bytes, default 65536). Loads the clusters
//! first (not timed), then prints one line: wall seconds, CPU seconds
//! (user + system, this process, compression only), stored bytes (a
//! cluster that does not shrink counts whole, as qbackup stores it) and
//! the number of clusters.

use std::io::Read;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use qbackup::backup::copier::is_zero;
use qbackup_formats::codec::{CompressionType, Compressor};

fn cpu_seconds() -> f64 {
    // SAFETY: getrusage fills in the plain-data struct.
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut u) };
    let t = |v: libc::timeval| v.tv_sec as f64 + v.tv_usec as f64 / 1e6;
    t(u.ru_utime) + t(u.ru_stime)
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() < 5 {
        eprintln!("usage: codec_limit RAW zstd|zlib LEVEL THREADS [CLUSTER_SIZE]");
        std::process::exit(2);
    }
    let codec = match args[2].as_str() {
        "zstd" => CompressionType::Zstd,
        "zlib" => CompressionType::Zlib,
        other => panic!("unknown codec {other}"),
    };
    let level: i32 = args[3].parse().expect("level");
    let threads: usize = args[4].parse().expect("threads");
    let cluster: usize = args
        .get(5)
        .map_or(65536, |s| s.parse().expect("cluster size"));

    let mut file = std::fs::File::open(&args[1]).expect("open image");
    let mut clusters = Vec::new();
    let mut buf = vec![0u8; cluster];
    loop {
        let mut got = 0;
        while got < cluster {
            match file.read(&mut buf[got..]).expect("read image") {
                0 => break,
                n => got += n,
            }
        }
        if got == 0 {
            break;
        }
        buf[got..].fill(0);
        if !is_zero(&buf) {
            clusters.push(buf.clone());
        }
        if got < cluster {
            break;
        }
    }

    let next = AtomicUsize::new(0);
    let stored = AtomicUsize::new(0);
    let (cpu0, start) = (cpu_seconds(), Instant::now());
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| {
                let mut c = Compressor::new(codec, level).expect("compressor");
                let mut out = Vec::new();
                let mut total = 0;
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(data) = clusters.get(i) else { break };
                    total += match c.compress(data, &mut out, cluster).expect("compress") {
                        true => out.len(),
                        false => cluster,
                    };
                }
                stored.fetch_add(total, Ordering::Relaxed);
            });
        }
    });
    let wall = start.elapsed().as_secs_f64();
    let cpu = cpu_seconds() - cpu0;
    println!(
        "{wall:.3} {cpu:.3} {} {}",
        stored.load(Ordering::Relaxed),
        clusters.len()
    );
}
