//! Compressed-cluster decoding: byte 0 picks the codec (bit 0) and the
//! cluster size (512 B << bits 1-3, up to 64 KiB); the rest is the stored
//! stream. Decoding must fail cleanly or fill exactly one cluster, and a
//! stream length, when proven, must lie inside the input.
#![no_main]

use qbackup_formats::codec::{decompress, stream_len};
use qbackup_formats::CompressionType;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let Some((&sel, input)) = data.split_first() else {
        return;
    };
    let codec = if sel & 1 == 0 {
        CompressionType::Zlib
    } else {
        CompressionType::Zstd
    };
    let cluster = 512usize << ((sel >> 1) & 7);
    let mut out = vec![0u8; cluster];
    let _ = decompress(codec, input, &mut out);
    let mut scratch = vec![0u8; cluster + 1];
    if let Ok(n) = stream_len(codec, input, &mut scratch) {
        assert!(
            n <= input.len(),
            "stream length {n} past the input's {}",
            input.len()
        );
        // The proven stream alone decodes to the cluster.
        decompress(codec, &input[..n], &mut out).expect("a proven stream decodes");
    }
});
