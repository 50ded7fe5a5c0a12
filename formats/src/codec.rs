//! Cluster compression codecs: zlib (raw deflate) and zstd, as qcow2 uses them.
//!
//! Invariants QEMU relies on (qcow2 spec, "Compressed Clusters Descriptor" and
//! the compression-type header field; see also shared/notes/qcow2-interop.md):
//! - zlib clusters are raw deflate streams made with a 4 KiB window
//!   (window bits 12). QEMU inflates with that window, so data deflated with
//!   the usual 32 KiB window is rejected by QEMU even though other readers
//!   accept it. The encoder here always uses 12 window bits.
//! - zstd clusters are exactly one zstd frame. The descriptor's length is
//!   rounded up to 512-byte sectors and usually runs into the next frame, so
//!   the decoder decodes one frame and ignores what follows it.
//! - A decoded cluster must be exactly one cluster long; anything else means
//!   the image is damaged.

use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress, Status};

/// The compression type of a qcow2 image (header byte 104).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CompressionType {
    /// Raw deflate, type 0.
    Zlib,
    /// Zstandard, type 1.
    Zstd,
}

impl CompressionType {
    /// The header's numeric code.
    pub fn code(self) -> u8 {
        match self {
            CompressionType::Zlib => 0,
            CompressionType::Zstd => 1,
        }
    }

    /// The name qemu-img uses ("zlib" or "zstd").
    pub fn name(self) -> &'static str {
        match self {
            CompressionType::Zlib => "zlib",
            CompressionType::Zstd => "zstd",
        }
    }
}

/// Errors from decoding a compressed cluster.
#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    /// The compressed stream is invalid.
    #[error("cannot decompress {codec} cluster: {reason}")]
    Decompress {
        /// Which codec.
        codec: &'static str,
        /// What went wrong.
        reason: String,
    },
    /// Compression failed (only on internal errors).
    #[error("cannot compress {codec} cluster: {reason}")]
    Compress {
        /// Which codec.
        codec: &'static str,
        /// What went wrong.
        reason: String,
    },
}

impl crate::error::Classify for CodecError {
    fn class(&self) -> crate::error::ErrorClass {
        match self {
            CodecError::Decompress { .. } => crate::error::ErrorClass::Corrupt,
            CodecError::Compress { .. } => crate::error::ErrorClass::Internal,
        }
    }
}

fn bad(codec: CompressionType, reason: impl Into<String>) -> CodecError {
    CodecError::Decompress {
        codec: codec.name(),
        reason: reason.into(),
    }
}

/// Decodes one compressed cluster from `input` into all of `out`.
///
/// `input` may hold trailing bytes after the stream (sector padding or the
/// next cluster's frame); they are ignored. Fails unless exactly `out.len()`
/// bytes come out.
pub fn decompress(codec: CompressionType, input: &[u8], out: &mut [u8]) -> Result<(), CodecError> {
    match codec {
        CompressionType::Zlib => inflate_cluster(input, out),
        CompressionType::Zstd => unzstd_cluster(input, out),
    }
}

fn inflate_cluster(input: &[u8], out: &mut [u8]) -> Result<(), CodecError> {
    // QEMU inflates with window bits -12; a stream that needs a larger window
    // is one QEMU cannot read either, so refusing it here is right.
    let mut d = Decompress::new_with_window_bits(false, 12);
    let status = d
        .decompress(input, out, FlushDecompress::Finish)
        .map_err(|e| bad(CompressionType::Zlib, e.to_string()))?;
    let produced = d.total_out() as usize;
    // QEMU accepts a stream that fills the cluster even without its end marker
    // (the sector-rounded length may cut the final block's trailer).
    match status {
        Status::StreamEnd | Status::Ok | Status::BufError if produced == out.len() => Ok(()),
        _ => Err(bad(
            CompressionType::Zlib,
            format!("produced {produced} of {} bytes", out.len()),
        )),
    }
}

fn unzstd_cluster(input: &[u8], out: &mut [u8]) -> Result<(), CodecError> {
    // Usually one frame; like QEMU, keep decoding frames until the cluster
    // is full (bytes after that are padding or the next cluster's frame).
    let err = |code| bad(CompressionType::Zstd, zstd::zstd_safe::get_error_name(code));
    let mut dctx = zstd::zstd_safe::DCtx::create();
    let mut produced = 0;
    let mut rest = input;
    while produced < out.len() {
        let frame_len = zstd::zstd_safe::find_frame_compressed_size(rest).map_err(err)?;
        let n = dctx
            .decompress(&mut out[produced..], &rest[..frame_len.min(rest.len())])
            .map_err(err)?;
        if n == 0 {
            break;
        }
        produced += n;
        rest = &rest[frame_len.min(rest.len())..];
    }
    if produced != out.len() {
        return Err(bad(
            CompressionType::Zstd,
            format!("produced {produced} of {} bytes", out.len()),
        ));
    }
    Ok(())
}

/// Validates one compressed cluster and returns the exact length of its
/// stream within `input` (which may carry sector padding or the next
/// cluster's bytes). `scratch` must be one byte longer than the cluster: a
/// stream that ends exactly at the cluster size proves it has no more output.
pub fn stream_len(
    codec: CompressionType,
    input: &[u8],
    scratch: &mut [u8],
) -> Result<usize, CodecError> {
    let cluster = scratch.len().saturating_sub(1);
    match codec {
        CompressionType::Zlib => {
            let mut d = Decompress::new_with_window_bits(false, 12);
            let status = d
                .decompress(input, scratch, FlushDecompress::Finish)
                .map_err(|e| bad(codec, e.to_string()))?;
            if status != Status::StreamEnd || d.total_out() as usize != cluster {
                return Err(bad(codec, "stream does not end at the cluster size"));
            }
            Ok(d.total_in() as usize)
        }
        CompressionType::Zstd => {
            let frame_len = zstd::zstd_safe::find_frame_compressed_size(input)
                .map_err(|code| bad(codec, zstd::zstd_safe::get_error_name(code)))?;
            unzstd_cluster(
                &input[..frame_len.min(input.len())],
                &mut scratch[..cluster],
            )?;
            Ok(frame_len)
        }
    }
}

/// A reusable compressor for one worker thread.
///
/// Holds the codec state so that compressing many clusters does not allocate
/// a new context for each.
pub struct Compressor {
    inner: CompressorInner,
    zlib_level: Compression,
}

enum CompressorInner {
    Zlib(Box<Compress>),
    Zstd(zstd::zstd_safe::CCtx<'static>),
}

impl Compressor {
    /// A compressor for `codec` at `level` (zlib 1–9, zstd 1–22).
    pub fn new(codec: CompressionType, level: i32) -> Result<Compressor, CodecError> {
        let zlib_level = Compression::new(level.clamp(0, 9) as u32);
        let inner = match codec {
            CompressionType::Zlib => CompressorInner::Zlib(Box::new(
                Compress::new_with_window_bits(zlib_level, false, 12),
            )),
            CompressionType::Zstd => {
                let mut cctx = zstd::zstd_safe::CCtx::create();
                cctx.set_parameter(zstd::zstd_safe::CParameter::CompressionLevel(level))
                    .map_err(|code| CodecError::Compress {
                        codec: "zstd",
                        reason: zstd::zstd_safe::get_error_name(code).to_string(),
                    })?;
                // QEMU finds the frame end itself; the checksum is not needed
                // and costs four bytes a cluster.
                let _ = cctx.set_parameter(zstd::zstd_safe::CParameter::ChecksumFlag(false));
                CompressorInner::Zstd(cctx)
            }
        };
        Ok(Compressor { inner, zlib_level })
    }

    /// Compresses `input` into `out` (cleared first). Returns `false` when
    /// the result would not be smaller than `limit` bytes, in which case the
    /// caller stores the cluster uncompressed.
    pub fn compress(
        &mut self,
        input: &[u8],
        out: &mut Vec<u8>,
        limit: usize,
    ) -> Result<bool, CodecError> {
        out.clear();
        out.reserve(limit);
        match &mut self.inner {
            CompressorInner::Zlib(c) => {
                c.reset();
                // Room for deflate's worst case (stored blocks), so the stream
                // always finishes: zlib-rs cannot be reused after a stream
                // that ran out of output space.
                out.resize(limit + limit / 8 + 64, 0);
                let status = c.compress(input, out, FlushCompress::Finish).map_err(|e| {
                    CodecError::Compress {
                        codec: "zlib",
                        reason: e.to_string(),
                    }
                })?;
                let produced = c.total_out() as usize;
                out.truncate(produced);
                if status != Status::StreamEnd {
                    // Never expected; start from a fresh state to be safe.
                    **c = Compress::new_with_window_bits(self.zlib_level, false, 12);
                    out.clear();
                    return Ok(false);
                }
                Ok(produced < limit)
            }
            CompressorInner::Zstd(cctx) => {
                out.resize(limit, 0);
                match cctx.compress2(out.as_mut_slice(), input) {
                    Ok(n) if n < limit => {
                        out.truncate(n);
                        Ok(true)
                    }
                    // Too large, or "destination buffer too small".
                    _ => {
                        out.clear();
                        Ok(false)
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(len: usize) -> Vec<u8> {
        (0..len).map(|i| ((i / 7) % 251) as u8).collect()
    }

    /// Incompressible bytes from a xorshift generator with state `x`.
    fn noise(x: &mut u64, len: usize) -> Vec<u8> {
        (0..len)
            .map(|_| {
                *x ^= *x << 13;
                *x ^= *x >> 7;
                *x ^= *x << 17;
                *x as u8
            })
            .collect()
    }

    /// Compresses `input`, which must shrink, at level 3.
    fn packed(codec: CompressionType, input: &[u8]) -> Vec<u8> {
        let mut c = Compressor::new(codec, 3).unwrap();
        let mut out = Vec::new();
        assert!(c.compress(input, &mut out, input.len()).unwrap());
        out
    }

    #[test]
    fn round_trip_both_codecs() {
        for codec in [CompressionType::Zlib, CompressionType::Zstd] {
            let input = sample(65536);
            let mut packed = packed(codec, &input);
            assert!(packed.len() < input.len() / 4);
            // Sector padding and a following frame must be ignored.
            packed.extend_from_slice(&[0xAA; 700]);
            let mut out = vec![0u8; input.len()];
            decompress(codec, &packed, &mut out).unwrap();
            assert_eq!(out, input);
        }
    }

    #[test]
    fn incompressible_reports_false() {
        let input = noise(&mut 0x9E3779B97F4A7C15, 4096);
        for codec in [CompressionType::Zlib, CompressionType::Zstd] {
            let mut c = Compressor::new(codec, 3).unwrap();
            let mut packed = Vec::new();
            assert!(!c.compress(&input, &mut packed, input.len()).unwrap());
        }
    }

    /// Regression: zlib-rs panicked when one compressor was reused after
    /// incompressible clusters of 16 KiB or less (output buffer full).
    #[test]
    fn reuse_after_incompressible_small_clusters() {
        let mut x: u64 = 0x1234_5678_9abc_def1;
        let mut c = Compressor::new(CompressionType::Zlib, 6).unwrap();
        let mut packed = Vec::new();
        for size in [512usize, 4096, 16384] {
            for round in 0..64 {
                let input: Vec<u8> = if round % 3 == 2 {
                    sample(size)
                } else {
                    noise(&mut x, size)
                };
                if c.compress(&input, &mut packed, size).unwrap() {
                    let mut out = vec![0u8; size];
                    decompress(CompressionType::Zlib, &packed, &mut out).unwrap();
                    assert_eq!(out, input);
                }
            }
        }
    }

    #[test]
    fn zlib_uses_small_window() {
        // A 32 KiB-window stream with a long back-reference must be refused,
        // as QEMU refuses it.
        let mut input = sample(8192);
        input.extend_from_slice(&sample(8192));
        let mut wide = flate2::Compress::new(Compression::new(6), false);
        let mut packed = vec![0u8; 20000];
        wide.compress(&input, &mut packed, FlushCompress::Finish)
            .unwrap();
        packed.truncate(wide.total_out() as usize);
        // Either refused or correct: never silently wrong.
        let mut out2 = vec![0u8; input.len()];
        if decompress(CompressionType::Zlib, &packed, &mut out2).is_ok() {
            assert_eq!(out2, input);
        }
    }

    #[test]
    fn stream_len_is_exact() {
        for codec in [CompressionType::Zlib, CompressionType::Zstd] {
            let input = sample(65536);
            let mut packed = packed(codec, &input);
            let exact = packed.len();
            packed.extend_from_slice(&[0x5a; 300]);
            let mut scratch = vec![0u8; input.len() + 1];
            assert_eq!(stream_len(codec, &packed, &mut scratch).unwrap(), exact);
            assert!(stream_len(codec, &packed[..exact / 2], &mut scratch).is_err());
        }
    }

    /// Regression: a cluster stored as two zstd frames (QEMU reads it).
    #[test]
    fn zstd_cluster_of_two_frames() {
        let input = sample(65536);
        let mut packed = zstd::bulk::compress(&input[..32768], 3).unwrap();
        packed.extend(zstd::bulk::compress(&input[32768..], 3).unwrap());
        packed.extend_from_slice(&[0u8; 300]);
        let mut out = vec![0u8; input.len()];
        decompress(CompressionType::Zstd, &packed, &mut out).unwrap();
        assert_eq!(out, input);
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        let mut out = vec![0u8; 4096];
        for codec in [CompressionType::Zlib, CompressionType::Zstd] {
            assert!(decompress(codec, &[0xff; 64], &mut out).is_err());
            assert!(decompress(codec, &[], &mut out).is_err());
        }
    }

    #[test]
    fn wrong_length_is_an_error() {
        let input = sample(4096);
        for codec in [CompressionType::Zlib, CompressionType::Zstd] {
            let packed = packed(codec, &input);
            let mut out = vec![0u8; 8192];
            assert!(decompress(codec, &packed, &mut out).is_err());
        }
    }
}
