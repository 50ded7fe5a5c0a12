//! Building a backup's manifest while the copier writes clusters in order:
//! the copier hands in the entries of the clusters it copied, and the
//! builder fills the clusters in between with what the backup reads there
//! instead (see [`Gaps`]).

use super::{Entry, ManifestError, ManifestReader, ManifestWriter};

/// What the backup reads where the copier wrote nothing.
pub enum Gaps {
    /// Zeros: a full backup leaves clusters that read as zeros unallocated.
    Zero,
    /// The backing file, whose content no manifest covers (`--sync top`,
    /// or an incremental on a backup without a manifest).
    Unknown,
    /// The backing file, a backup with this manifest (an incremental on
    /// it): its entries, streamed in step.
    Previous(Box<ManifestReader>),
}

/// Streams entries into a [`ManifestWriter`] in cluster order.
pub struct ManifestBuilder {
    writer: ManifestWriter,
    gaps: Gaps,
    next: u64,
    clusters: u64,
}

impl ManifestBuilder {
    /// A builder for a disk of `clusters` target clusters.
    pub fn new(writer: ManifestWriter, gaps: Gaps, clusters: u64) -> Self {
        ManifestBuilder {
            writer,
            gaps,
            next: 0,
            clusters,
        }
    }

    /// Records cluster `index` (at or after every index given before).
    pub fn put(&mut self, index: u64, entry: Entry) -> Result<(), ManifestError> {
        self.fill_to(index)?;
        // The previous backup's entry for this cluster is replaced.
        if let Gaps::Previous(prev) = &mut self.gaps {
            prev.take(1)?;
        }
        self.writer.push_run(1, entry)?;
        self.next = index + 1;
        Ok(())
    }

    fn fill_to(&mut self, index: u64) -> Result<(), ManifestError> {
        while self.next < index {
            let want = index - self.next;
            let (n, entry) = match &mut self.gaps {
                Gaps::Zero => (want, Entry::Zero),
                Gaps::Unknown => (want, Entry::Unknown),
                Gaps::Previous(prev) => match prev.take(want)? {
                    Some(run) => run,
                    None => {
                        return Err(ManifestError::Invalid {
                            path: prev.path().to_path_buf(),
                            why: "it covers fewer clusters than the backup".into(),
                        })
                    }
                },
            };
            self.writer.push_run(n, entry)?;
            self.next += n;
        }
        Ok(())
    }

    /// Records the identity of the finished image file the manifest is for
    /// (once it is complete: sealed and synced).
    pub fn set_image(&mut self, image: super::ImageIdentity) {
        self.writer.set_image(image);
    }

    /// Fills the rest of the disk and writes the manifest out; returns its
    /// BLAKE3 (hex).
    pub fn finish(mut self) -> Result<String, ManifestError> {
        self.fill_to(self.clusters)?;
        self.writer.finish()
    }
}
