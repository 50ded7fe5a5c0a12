//! A backing chain: the top image and the images under it, and the
//! questions everything else asks of it.
//!
//! [`Chain::status`] follows `qemu-img map`'s walk: ask each layer from the
//! top; the first that allocates the range answers; a range no layer
//! allocates reads as zeros and reports the depth of the last layer asked,
//! which is also where the walk stops when the range starts past the end of
//! a shorter backing file. [`Chain::read`] returns the bytes the guest sees.
//! The chain only composes layers: what a format stores and how it is
//! decoded is each driver's business ([`Layer`]).
//!
//! Invariants: no image appears twice (loops are refused at open, by
//! canonical name as QEMU does), every layer's data is readable (not
//! encrypted, not marked corrupt). There is no depth limit, as in QEMU:
//! each layer keeps one file open, so the process's open-file limit bounds
//! a chain (reaching it is reported as such), and no walk recurses per
//! layer (a chain of thousands of images cannot overflow a stack).

use std::collections::HashSet;
use std::path::Path;

use crate::codec::CompressionType;
use crate::extent::{Allocation, Extent};
use crate::image::{self, Format, ImageError, ImageErrorKind};
use crate::layer::{Layer, LayerRead};
use crate::open::{resolve_backing, FileOpener, Opener, Role};
use crate::units::{ClusterSize, GuestOffset};

/// Errors from a chain are image errors: they name the file concerned.
pub type ChainError = ImageError;

/// An opened backing chain, top first.
#[derive(Debug)]
pub struct Chain {
    layers: Vec<Box<dyn Layer>>,
    /// The distinct (cluster size, codec) pairs of the layers' compressed
    /// clusters, so pass-through is ruled out without a walk per cluster.
    compressed_formats: Vec<(ClusterSize, CompressionType)>,
}

impl Chain {
    /// Opens the local image `path` and its whole backing chain.
    pub fn open(path: &Path, format: Option<Format>) -> Result<Chain, ChainError> {
        Chain::open_with(&FileOpener, path, format)
    }

    /// Opens `path` and its whole backing chain through `opener`.
    pub fn open_with(
        opener: &dyn Opener,
        path: &Path,
        format: Option<Format>,
    ) -> Result<Chain, ChainError> {
        let top = image::open(opener, path, Role::Image, format)?;
        Chain::with_top(opener, top)
    }

    /// Builds the chain under an opened top image, opening its backing
    /// files through `opener`.
    pub fn with_top(opener: &dyn Opener, top: Box<dyn Layer>) -> Result<Chain, ChainError> {
        let path = &top.path().to_path_buf();
        let mut seen = HashSet::new();
        seen.insert(
            opener
                .canonical(path)
                .map_err(|e| ImageError::new(path, e))?,
        );
        let mut layers = vec![top];
        loop {
            let last = layers.last().expect("non-empty");
            last.check_readable()?;
            let Some(spec) = last.backing() else { break };
            let last_path = last.path().to_path_buf();
            let err = |kind| ImageError::new(&last_path, kind);
            let backing = resolve_backing(&last_path, &spec.name);
            let fmt = match spec.format.as_deref() {
                None => None,
                Some(f) => Some(
                    Format::from_name(f)
                        .ok_or_else(|| err(ImageErrorKind::UnsupportedBackingFormat(f.into())))?,
                ),
            };
            let canon = opener.canonical(&backing).map_err(|source| {
                err(ImageErrorKind::OpenBacking {
                    path: backing.clone(),
                    source,
                })
            })?;
            if !seen.insert(canon) {
                return Err(err(ImageErrorKind::BackingLoop(backing)));
            }
            layers.push(image::open(opener, &backing, Role::Backing, fmt)?);
        }
        let mut compressed_formats = Vec::new();
        for f in layers.iter().filter_map(|l| l.compressed_format()) {
            if !compressed_formats.contains(&f) {
                compressed_formats.push(f);
            }
        }
        Ok(Chain {
            layers,
            compressed_formats,
        })
    }

    /// The images of the chain that QEMU marked corrupt.
    pub fn marked_corrupt(&self) -> Vec<std::path::PathBuf> {
        self.layers
            .iter()
            .filter(|l| l.marked_corrupt())
            .map(|l| l.path().to_path_buf())
            .collect()
    }

    /// Damage found so far in the chain's images that does not change what
    /// the guest reads (see [`Layer::harmless_damage`]): (image, what).
    pub fn harmless_damage(&self) -> Vec<(std::path::PathBuf, String)> {
        self.layers
            .iter()
            .filter_map(|l| l.harmless_damage().map(|d| (l.path().to_path_buf(), d)))
            .collect()
    }

    /// The layers, top first.
    pub fn layers(&self) -> &[Box<dyn Layer>] {
        &self.layers
    }

    /// Every storage the chain reads (images and external data files).
    pub fn files(&self) -> Vec<std::sync::Arc<dyn crate::storage::Storage>> {
        self.layers.iter().flat_map(|l| l.files()).collect()
    }

    /// The state of every file the chain reads, to compare with a later
    /// one (see [`crate::fingerprint`]).
    pub fn fingerprint(&self) -> Result<crate::fingerprint::Fingerprint, ChainError> {
        crate::fingerprint::Fingerprint::of(&self.layers)
    }

    /// The top image.
    pub fn top(&self) -> &dyn Layer {
        self.layers[0].as_ref()
    }

    /// The guest-visible size (the top image's).
    pub fn virtual_size(&self) -> u64 {
        self.layers[0].virtual_size()
    }

    /// What the guest sees over the range starting at `offset`: the answer
    /// and how many bytes (at most `max_len`, > 0) it covers. `offset` must
    /// be below the virtual size.
    pub fn status(&self, offset: GuestOffset, max_len: u64) -> Result<(Extent, u64), ChainError> {
        let mut len = max_len.min(self.virtual_size().saturating_sub(offset.0));
        debug_assert!(len > 0);
        for (depth, layer) in self.layers.iter().enumerate() {
            let (le, n) = layer.status(offset, len)?;
            len = n;
            let depth_u32 = depth as u32;
            if le.allocation != Allocation::Unallocated {
                let compressed = le.allocation == Allocation::Compressed;
                let extent = Extent {
                    present: true,
                    zero: le.allocation == Allocation::Zero || le.data_reads_zero,
                    data: matches!(le.allocation, Allocation::Data | Allocation::Compressed),
                    compressed,
                    depth: depth_u32,
                    host: if compressed { None } else { le.host },
                };
                return Ok((extent, len));
            }
            let ends_here = match self.layers.get(depth + 1) {
                None => true,
                Some(backing) => offset.0 >= backing.virtual_size(),
            };
            if ends_here {
                let extent = Extent {
                    present: false,
                    zero: true,
                    data: false,
                    compressed: false,
                    depth: depth_u32,
                    host: le.host,
                };
                return Ok((extent, len));
            }
            len = len.min(self.layers[depth + 1].virtual_size() - offset.0);
        }
        unreachable!("the last layer always answers")
    }

    /// Reads the guest bytes at `offset` into `buf`. The range must lie
    /// inside the virtual size. Safe to call from many threads at once.
    ///
    /// Each layer fills what it allocates; the pieces it leaves go to the
    /// layer below, through a work list rather than recursion.
    pub fn read(&self, offset: GuestOffset, buf: &mut [u8]) -> Result<(), ChainError> {
        // (depth, start, end): a piece of `buf` to read from that layer down.
        let mut work = vec![(0usize, 0usize, buf.len())];
        while let Some((depth, start, end)) = work.pop() {
            let layer = &self.layers[depth];
            let size = layer.virtual_size();
            let mut pos = start;
            while pos < end {
                let off = offset + pos as u64;
                if off.0 >= size {
                    // A backing file shorter than its overlay reads as zeros.
                    buf[pos..end].fill(0);
                    break;
                }
                let dst = &mut buf[pos..end];
                let asked = dst.len() as u64;
                let answer = layer.read(off, dst)?;
                let (LayerRead::Filled(n) | LayerRead::Unallocated(n)) = answer;
                if n == 0 || n > asked {
                    // Would spin forever or slice out of bounds.
                    return Err(ImageError::new(
                        layer.path(),
                        ImageErrorKind::BrokenRead {
                            format: layer.format(),
                            asked,
                            answered: n,
                        },
                    ));
                }
                let n = n as usize;
                if let LayerRead::Unallocated(_) = answer {
                    if depth + 1 < self.layers.len() {
                        work.push((depth + 1, pos, pos + n));
                    } else {
                        dst[..n].fill(0);
                    }
                }
                pos += n;
            }
        }
        Ok(())
    }

    /// The stored stream of the compressed cluster at `offset` (`len`
    /// guest bytes: a cluster, or less at the end of the disk) when it can
    /// be copied as it is into an image of `cluster_size` and `codec`: the
    /// whole range is one compressed cluster of a layer with that cluster
    /// size and codec, and the driver proved its end.
    pub fn stored_compressed(
        &self,
        offset: GuestOffset,
        len: u64,
        cluster_size: ClusterSize,
        codec: CompressionType,
    ) -> Result<Option<Vec<u8>>, ChainError> {
        let wanted = Some((cluster_size, codec));
        if !self.compressed_formats.contains(&(cluster_size, codec)) {
            return Ok(None);
        }
        let (ext, n) = self.status(offset, len)?;
        let layer = &self.layers[ext.depth as usize];
        if !ext.compressed || n != len || layer.compressed_format() != wanted {
            return Ok(None);
        }
        layer.stored_compressed(offset)
    }
}
