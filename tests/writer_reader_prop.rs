//! Property test: whatever sequence of clusters the qcow2 writer is given,
//! our own reader reads back exactly the guest content that was meant, and
//! the map reports compressed clusters where compressed streams went. qemu-img
//! is the oracle elsewhere; this explores many more layouts than those tests
//! can afford (cluster sizes, codecs, mixes of data, streams and zeros).

use std::fs::OpenOptions;

use proptest::prelude::*;
use qbackup_formats::codec::{CompressionType, Compressor};
use qbackup_formats::qcow2::writer::{ClusterWrite, Qcow2Writer, WriterOptions};
use qbackup_formats::{Chain, ClusterIndex, GuestOffset};

#[derive(Debug, Clone, Copy)]
enum Kind {
    Skip,
    Data(u8),
    Compressed(u8),
    Zero,
}

fn kind() -> impl Strategy<Value = Kind> {
    prop_oneof![
        Just(Kind::Skip),
        any::<u8>().prop_map(Kind::Data),
        any::<u8>().prop_map(Kind::Compressed),
        Just(Kind::Zero),
    ]
}

/// Cluster content: compressible but not trivially (a seeded pattern).
fn content(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| {
            (i as u8)
                .wrapping_mul(seed | 1)
                .wrapping_add((i / 97) as u8)
        })
        .collect()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn written_images_read_back(
        bits in 9u32..=16,
        zstd in any::<bool>(),
        plan in proptest::collection::vec(kind(), 1..48),
        tail in 0u64..8,
    ) {
        let cluster = 1usize << bits;
        let codec = if zstd { CompressionType::Zstd } else { CompressionType::Zlib };
        // The last cluster may be partial (in whole sectors).
        let size = (plan.len() as u64) * cluster as u64 - (tail * 512).min(cluster as u64 - 512);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p.qcow2");
        let file = OpenOptions::new().read(true).write(true).create_new(true).open(&path).unwrap();
        let mut w = Qcow2Writer::on_file(file, &path, WriterOptions {
            virtual_size: size,
            cluster_bits: bits,
            compression: codec,
            backing: None,
        }).unwrap();
        let mut compressor = Compressor::new(codec, 3).unwrap();
        let mut expected = vec![0u8; size as usize];
        let mut compressed = Vec::new();
        for (i, k) in plan.iter().enumerate() {
            let start = i * cluster;
            let end = (start + cluster).min(size as usize);
            match *k {
                Kind::Skip | Kind::Zero => {
                    if matches!(k, Kind::Zero) {
                        w.write_cluster(ClusterIndex(i as u64), ClusterWrite::Zero).unwrap();
                    }
                }
                Kind::Data(seed) => {
                    let mut data = content(seed, cluster);
                    data[end - start..].fill(0);
                    w.write_cluster(ClusterIndex(i as u64), ClusterWrite::Data(&data)).unwrap();
                    expected[start..end].copy_from_slice(&data[..end - start]);
                }
                Kind::Compressed(seed) => {
                    let mut data = content(seed, cluster);
                    data[end - start..].fill(0);
                    let mut packed = Vec::new();
                    if compressor.compress(&data, &mut packed, cluster).unwrap() {
                        w.write_cluster(ClusterIndex(i as u64), ClusterWrite::Compressed(&packed)).unwrap();
                        compressed.push(i);
                    } else {
                        w.write_cluster(ClusterIndex(i as u64), ClusterWrite::Data(&data)).unwrap();
                    }
                    expected[start..end].copy_from_slice(&data[..end - start]);
                }
            }
        }
        w.finish().unwrap();

        let chain = Chain::open(&path, None).unwrap();
        prop_assert_eq!(chain.virtual_size(), size);
        let mut got = vec![0xAAu8; size as usize];
        chain.read(GuestOffset(0), &mut got).unwrap();
        prop_assert!(got == expected, "content differs");
        for i in compressed {
            let (e, _) = chain.status(GuestOffset((i * cluster) as u64), cluster as u64).unwrap();
            prop_assert!(e.compressed && e.data, "cluster {} not compressed in the map", i);
        }
    }
}
