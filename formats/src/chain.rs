//! A backing chain: the top image and the images under it, and the two
//! questions everything else asks of it.
//!
//! [`Chain::status`] follows `qemu-img map`'s walk: ask each layer from the
//! top; the first that allocates the range answers; a range no layer
//! allocates reads as zeros and reports the depth of the last layer asked,
//! which is also where the walk stops when the range starts past the end of
//! a shorter backing file. [`Chain::read`] returns the bytes the guest sees.
//!
//! Invariants: at most [`MAX_DEPTH`] images, no image appears twice (loops
//! are refused at open), every layer's data is readable (not encrypted, not
//! marked corrupt).

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use crate::extent::{Allocation, Extent};
use crate::image::{Format, Image, ImageError, ImageErrorKind};
use crate::qcow2::Piece;
use crate::storage::StorageError;
use crate::units::GuestOffset;

/// The deepest chain qbackup opens.
pub const MAX_DEPTH: usize = 64;

/// Errors from a chain are image errors: they name the file concerned.
pub type ChainError = ImageError;

/// An opened backing chain, top first.
#[derive(Debug)]
pub struct Chain {
    layers: Vec<Image>,
}

/// Resolves a backing file name the way QEMU does: relative names are taken
/// relative to the directory of the overlay that names them.
pub fn resolve_backing(overlay: &Path, name: &str) -> PathBuf {
    let p = Path::new(name);
    if p.is_absolute() {
        return p.to_path_buf();
    }
    match overlay.parent() {
        Some(dir) => dir.join(p),
        None => p.to_path_buf(),
    }
}

impl Chain {
    /// Opens `path` and its whole backing chain for reading data.
    pub fn open(path: &Path, format: Option<Format>) -> Result<Chain, ChainError> {
        let top = Image::open(path, format)?;
        let mut seen = HashSet::new();
        seen.insert(canonical(path)?);
        let mut layers = vec![top];
        loop {
            let last = layers.last().expect("non-empty");
            let last_path = last.path().to_path_buf();
            if let Some(q) = last.as_qcow2() {
                q.check_readable()
                    .map_err(|e| ImageError::new(&last_path, e))?;
            }
            let Some(q) = last.as_qcow2() else { break };
            let Some(name) = q.header().backing_file.clone() else {
                break;
            };
            let backing = resolve_backing(&last_path, &name);
            let fmt = match q.header().backing_format.as_deref() {
                None => None,
                Some(f) => Some(Format::from_name(f).ok_or_else(|| {
                    ImageError::new(
                        &last_path,
                        ImageErrorKind::UnsupportedBackingFormat(f.into()),
                    )
                })?),
            };
            if layers.len() >= MAX_DEPTH {
                return Err(ImageError::new(
                    path,
                    ImageErrorKind::ChainTooDeep(MAX_DEPTH),
                ));
            }
            let canon = std::fs::canonicalize(&backing).map_err(|source| {
                ImageError::new(
                    &last_path,
                    ImageErrorKind::OpenBacking {
                        path: backing.clone(),
                        source: StorageError::Open { source },
                    },
                )
            })?;
            if !seen.insert(canon) {
                return Err(ImageError::new(
                    &last_path,
                    ImageErrorKind::BackingLoop(backing),
                ));
            }
            layers.push(Image::open(&backing, fmt)?);
        }
        Ok(Chain { layers })
    }

    /// The layers, top first.
    pub fn layers(&self) -> &[Image] {
        &self.layers
    }

    /// The top image.
    pub fn top(&self) -> &Image {
        &self.layers[0]
    }

    /// The guest-visible size (the top image's).
    pub fn virtual_size(&self) -> u64 {
        self.layers[0].virtual_size()
    }

    /// What the guest sees over the range starting at `offset`: the answer
    /// and how many bytes (at most `max_len`, > 0) it covers. `offset` must
    /// be below the virtual size.
    pub fn status(&self, offset: GuestOffset, max_len: u64) -> Result<(Extent, u64), ChainError> {
        self.status_from(0, offset, max_len)
    }

    /// Like [`Chain::status`], but starts the walk at layer `depth` (0 = top).
    pub fn status_from(
        &self,
        depth: usize,
        offset: GuestOffset,
        max_len: u64,
    ) -> Result<(Extent, u64), ChainError> {
        let mut len = max_len.min(self.layers[depth].virtual_size().saturating_sub(offset.0));
        debug_assert!(len > 0);
        for (depth, layer) in self.layers.iter().enumerate().skip(depth) {
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
    pub fn read(&self, offset: GuestOffset, buf: &mut [u8]) -> Result<(), ChainError> {
        self.read_from(0, offset, buf)
    }

    /// Like [`Chain::read`], but as seen from layer `depth` downwards.
    pub fn read_from(
        &self,
        depth: usize,
        offset: GuestOffset,
        buf: &mut [u8],
    ) -> Result<(), ChainError> {
        let layer = &self.layers[depth];
        let size = layer.virtual_size();
        let mut pos = 0usize;
        while pos < buf.len() {
            let off = offset.0 + pos as u64;
            if off >= size {
                // A backing file shorter than its overlay reads as zeros.
                buf[pos..].fill(0);
                break;
            }
            let want = ((buf.len() - pos) as u64).min(size - off);
            let q = match layer {
                Image::Raw(r) => {
                    let dst = &mut buf[pos..pos + want as usize];
                    r.read(GuestOffset(off), dst)
                        .map_err(|e| ImageError::new(layer.path(), e))?;
                    pos += want as usize;
                    continue;
                }
                Image::Qcow2(q) => q,
            };
            let err = |e| ImageError::new(layer.path(), e);
            let (piece, n) = q.locate(GuestOffset(off), want, true).map_err(err)?;
            let dst = &mut buf[pos..pos + n as usize];
            match piece {
                Piece::Unallocated if depth + 1 < self.layers.len() => {
                    self.read_from(depth + 1, GuestOffset(off), dst)?;
                }
                Piece::Unallocated | Piece::Zero => dst.fill(0),
                Piece::Data(host) => q.read_data(host, dst).map_err(err)?,
                Piece::Compressed(start, desc) => {
                    let cluster_size = q.header().cluster_size() as usize;
                    if start.0 == off && dst.len() == cluster_size {
                        q.read_compressed(start, desc, dst).map_err(err)?;
                    } else {
                        let mut tmp = vec![0u8; cluster_size];
                        q.read_compressed(start, desc, &mut tmp).map_err(err)?;
                        let from = (off - start.0) as usize;
                        dst.copy_from_slice(&tmp[from..from + dst.len()]);
                    }
                }
            }
            pos += n as usize;
        }
        Ok(())
    }
}

fn canonical(path: &Path) -> Result<PathBuf, ImageError> {
    std::fs::canonicalize(path)
        .map_err(|source| ImageError::new(path, StorageError::Open { source }))
}
