//! Property test: a damaged qcow2 image may be refused, but reading it never
//! panics, never hangs and never needs unbounded memory. Starts from a small
//! valid image (normal, zero and compressed clusters, 4 KiB clusters so that
//! the header, L1, L2 and refcount structures are all in the first few
//! clusters) and overwrites random bytes, biased towards the metadata.

use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;
use std::path::Path;

use proptest::prelude::*;
use qbackup_formats::codec::{CompressionType, Compressor};
use qbackup_formats::qcow2::writer::{ClusterWrite, Qcow2Writer, WriterOptions};
use qbackup_formats::{Chain, ClusterIndex, GuestOffset};

const BITS: u32 = 12;
const CLUSTERS: u64 = 48;

fn base_image(path: &Path, codec: CompressionType) -> Vec<u8> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(path)
        .unwrap();
    let cs = 1usize << BITS;
    let mut w = Qcow2Writer::on_file(
        file,
        path,
        WriterOptions {
            virtual_size: CLUSTERS << BITS,
            cluster_bits: BITS,
            compression: codec,
            backing: None,
        },
    )
    .unwrap();
    let mut c = Compressor::new(codec, 3).unwrap();
    for i in 0..CLUSTERS {
        let data: Vec<u8> = (0..cs).map(|j| ((j / 13) as u64 * (i + 1)) as u8).collect();
        match i % 4 {
            0 => w
                .write_cluster(ClusterIndex(i), ClusterWrite::Data(&data))
                .unwrap(),
            1 => {
                let mut packed = Vec::new();
                assert!(c.compress(&data, &mut packed, cs).unwrap());
                w.write_cluster(ClusterIndex(i), ClusterWrite::Compressed(&packed))
                    .unwrap();
            }
            2 => w
                .write_cluster(ClusterIndex(i), ClusterWrite::Zero)
                .unwrap(),
            _ => {}
        }
    }
    w.finish().unwrap();
    std::fs::read(path).unwrap()
}

/// Opens, maps and reads the whole image; errors are fine, panics are not.
fn exercise(path: &Path) {
    let Ok(chain) = Chain::open(path, None) else {
        return;
    };
    let size = chain.virtual_size().min(64 << 20);
    let mut pos = 0;
    let mut steps = 0;
    while pos < size {
        match chain.status(GuestOffset(pos), size - pos) {
            Ok((_, len)) => {
                assert!(len > 0, "status made no progress at {pos}");
                pos += len;
            }
            Err(_) => break,
        }
        steps += 1;
        assert!(steps < 1 << 20, "status loop does not end");
    }
    let mut buf = vec![0u8; 1 << BITS];
    let mut off = 0;
    while off + (1 << BITS) <= size {
        let _ = chain.read(GuestOffset(off), &mut buf);
        off += 1 << BITS;
    }
}

fn mutation() -> impl Strategy<Value = (u64, u8)> {
    // Three quarters of the writes hit the first 256 bytes of a cluster
    // (headers, table entries), the rest anywhere.
    (any::<u64>(), any::<u8>(), 0u8..4).prop_map(|(at, b, kind)| {
        let at = if kind < 3 {
            (at % 64) * (1 << BITS) / 16 + at % 256
        } else {
            at
        };
        (at, b)
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 300, ..ProptestConfig::default() })]

    #[test]
    fn damaged_images_never_panic(
        zstd in any::<bool>(),
        edits in proptest::collection::vec(mutation(), 1..6),
    ) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("h.qcow2");
        let codec = if zstd { CompressionType::Zstd } else { CompressionType::Zlib };
        let bytes = base_image(&path, codec);
        let file = OpenOptions::new().write(true).open(&path).unwrap();
        for (at, b) in edits {
            let at = at % bytes.len() as u64;
            file.write_all_at(&[b], at).unwrap();
        }
        drop(file);
        exercise(&path);
    }
}
