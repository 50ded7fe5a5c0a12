//! Writing and reading a manifest as a stream of runs (layout in the
//! parent module), so memory stays bounded whatever the disk size.

use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use super::{Digest, Entry, ImageIdentity, ManifestError, Meta, MAGIC, RUN_BYTES};

const KIND_ZERO: u8 = 0;
const KIND_DATA: u8 = 1;
const KIND_UNKNOWN: u8 = 2;
/// The image identity record, after the last run (see [`ImageIdentity`]):
/// the image's length in the count field, the scheme in the CRC32 field,
/// the digest in the BLAKE3 field.
const KIND_IMAGE: u8 = 3;

/// Writes a manifest: entries pushed in cluster order, equal neighbours
/// merged into runs.
pub struct ManifestWriter {
    out: BufWriter<File>,
    path: PathBuf,
    hasher: blake3::Hasher,
    pending: Option<(u64, Entry)>,
    clusters: u64,
    expected: u64,
    image: Option<ImageIdentity>,
}

impl ManifestWriter {
    /// Starts a manifest for `meta` in `file` (named `path` in messages).
    pub fn new(file: File, path: &Path, meta: &Meta) -> Result<Self, ManifestError> {
        let mut w = ManifestWriter {
            out: BufWriter::with_capacity(1 << 16, file),
            path: path.to_path_buf(),
            hasher: blake3::Hasher::new(),
            pending: None,
            clusters: 0,
            expected: meta.virtual_size.div_ceil(meta.cluster_size.max(1)),
            image: None,
        };
        let mut line = serde_json::to_vec(meta).map_err(|e| w.invalid(e.to_string()))?;
        line.push(b'\n');
        w.emit(MAGIC)?;
        w.emit(&line)?;
        Ok(w)
    }

    fn invalid(&self, why: String) -> ManifestError {
        ManifestError::Invalid {
            path: self.path.clone(),
            why,
        }
    }

    fn emit(&mut self, bytes: &[u8]) -> Result<(), ManifestError> {
        self.hasher.update(bytes);
        self.out
            .write_all(bytes)
            .map_err(|source| ManifestError::Io {
                path: self.path.clone(),
                source,
            })
    }

    /// Appends `count` clusters of `entry`.
    pub fn push_run(&mut self, count: u64, entry: Entry) -> Result<(), ManifestError> {
        if count == 0 {
            return Ok(());
        }
        self.clusters += count;
        match &mut self.pending {
            Some((n, e)) if *e == entry => *n += count,
            _ => {
                if let Some((n, e)) = self.pending.replace((count, entry)) {
                    self.write_run(n, e)?;
                }
            }
        }
        Ok(())
    }

    fn write_run(&mut self, count: u64, entry: Entry) -> Result<(), ManifestError> {
        let mut rec = [0u8; RUN_BYTES];
        rec[..8].copy_from_slice(&count.to_be_bytes());
        rec[8] = match entry {
            Entry::Zero => KIND_ZERO,
            Entry::Data(d) => {
                rec[9..13].copy_from_slice(&d.crc32.to_be_bytes());
                rec[13..].copy_from_slice(&d.blake3);
                KIND_DATA
            }
            Entry::Unknown => KIND_UNKNOWN,
        };
        self.emit(&rec)
    }

    /// Records the identity of the image file this manifest is for
    /// (written after the runs by [`ManifestWriter::finish`]).
    pub fn set_image(&mut self, image: ImageIdentity) {
        self.image = Some(image);
    }

    /// Ends the manifest (it must cover every cluster), syncs it, and
    /// returns its BLAKE3 (hex).
    pub fn finish(mut self) -> Result<String, ManifestError> {
        if let Some((n, e)) = self.pending.take() {
            self.write_run(n, e)?;
        }
        if self.clusters != self.expected {
            return Err(self.invalid(format!(
                "{} clusters recorded, {} expected",
                self.clusters, self.expected
            )));
        }
        if let Some(image) = self.image {
            let mut rec = [0u8; RUN_BYTES];
            rec[..8].copy_from_slice(&image.length.to_be_bytes());
            rec[8] = KIND_IMAGE;
            rec[9..13].copy_from_slice(&image.scheme.to_be_bytes());
            rec[13..].copy_from_slice(&image.digest);
            self.emit(&rec)?;
        }
        let digest = *self.hasher.finalize().as_bytes();
        let io = |path: &Path, source| ManifestError::Io {
            path: path.to_path_buf(),
            source,
        };
        self.out.write_all(&digest).map_err(|e| io(&self.path, e))?;
        let file = self
            .out
            .into_inner()
            .map_err(|e| io(&self.path, e.into_error()))?;
        file.sync_all().map_err(|e| io(&self.path, e))?;
        Ok(super::hex(&digest))
    }
}

/// Reads a manifest's runs in order, after checking its own BLAKE3.
pub struct ManifestReader {
    input: BufReader<File>,
    path: PathBuf,
    meta: Meta,
    digest: String,
    image: Option<ImageIdentity>,
    runs_left: u64,
    /// The current run: clusters left in it and its entry.
    current: Option<(u64, Entry)>,
    clusters_left: u64,
}

impl ManifestReader {
    /// Opens the manifest at `path`.
    pub fn open(path: &Path) -> Result<Self, ManifestError> {
        let io = |source| ManifestError::Io {
            path: path.to_path_buf(),
            source,
        };
        let invalid = |why: &str| ManifestError::Invalid {
            path: path.to_path_buf(),
            why: why.to_string(),
        };
        let mut file = open_regular(path)?;
        let len = file.metadata().map_err(io)?.len();
        if len < (MAGIC.len() + 32) as u64 {
            return Err(invalid("too short"));
        }
        // The trailer first: a damaged manifest is reported as such.
        let mut hasher = blake3::Hasher::new();
        let mut body = (&mut file).take(len - 32);
        std::io::copy(&mut body, &mut hasher).map_err(io)?;
        let mut trailer = [0u8; 32];
        file.read_exact(&mut trailer).map_err(io)?;
        if hasher.finalize().as_bytes() != &trailer {
            return Err(invalid("its checksum does not match its contents"));
        }
        file.seek(SeekFrom::Start(0)).map_err(io)?;
        let mut input = BufReader::with_capacity(1 << 16, file);
        let mut magic = vec![0u8; MAGIC.len()];
        input.read_exact(&mut magic).map_err(io)?;
        if magic != MAGIC {
            return Err(invalid("unknown magic or version"));
        }
        let mut line = Vec::new();
        std::io::BufRead::read_until(&mut input, b'\n', &mut line).map_err(io)?;
        let meta: Meta =
            serde_json::from_slice(&line).map_err(|e| invalid(&format!("bad metadata: {e}")))?;
        if meta.cluster_size == 0 {
            return Err(invalid("cluster size 0"));
        }
        let runs_bytes = len - 32 - (MAGIC.len() + line.len()) as u64;
        if runs_bytes % RUN_BYTES as u64 != 0 {
            return Err(invalid("truncated run"));
        }
        let mut records = runs_bytes / RUN_BYTES as u64;
        // The last record may be the image's identity (manifests written
        // before it existed end with a run).
        let mut image = None;
        if records > 0 {
            use std::os::unix::fs::FileExt;
            let mut rec = [0u8; RUN_BYTES];
            input
                .get_ref()
                .read_exact_at(&mut rec, len - 32 - RUN_BYTES as u64)
                .map_err(io)?;
            if rec[8] == KIND_IMAGE {
                records -= 1;
                image = Some(ImageIdentity {
                    length: u64::from_be_bytes(rec[..8].try_into().expect("8 bytes")),
                    scheme: u32::from_be_bytes(rec[9..13].try_into().expect("4 bytes")),
                    digest: rec[13..].try_into().expect("32 bytes"),
                });
            }
        }
        Ok(ManifestReader {
            input,
            path: path.to_path_buf(),
            clusters_left: meta.virtual_size.div_ceil(meta.cluster_size),
            meta,
            digest: super::hex(&trailer),
            image,
            runs_left: records,
            current: None,
        })
    }

    /// What the backup was made from.
    pub fn meta(&self) -> &Meta {
        &self.meta
    }

    /// The manifest's own BLAKE3 (hex), which a child backup records.
    pub fn digest(&self) -> &str {
        &self.digest
    }

    /// The identity of the image file the manifest was written for, when
    /// it records one.
    pub fn image(&self) -> Option<&ImageIdentity> {
        self.image.as_ref()
    }

    /// The manifest's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn invalid(&self, why: &str) -> ManifestError {
        ManifestError::Invalid {
            path: self.path.clone(),
            why: why.to_string(),
        }
    }

    /// The next run: (clusters, entry); `None` after the last cluster.
    pub fn next_run(&mut self) -> Result<Option<(u64, Entry)>, ManifestError> {
        if let Some(run) = self.current.take() {
            return Ok(Some(run));
        }
        if self.runs_left == 0 {
            if self.clusters_left != 0 {
                return Err(self.invalid("runs end before the disk does"));
            }
            return Ok(None);
        }
        let mut rec = [0u8; RUN_BYTES];
        self.input
            .read_exact(&mut rec)
            .map_err(|source| ManifestError::Io {
                path: self.path.clone(),
                source,
            })?;
        self.runs_left -= 1;
        let count = u64::from_be_bytes(rec[..8].try_into().expect("8 bytes"));
        if count == 0 || count > self.clusters_left {
            return Err(self.invalid("a run's length does not fit the disk"));
        }
        self.clusters_left -= count;
        let entry = match rec[8] {
            KIND_ZERO => Entry::Zero,
            KIND_UNKNOWN => Entry::Unknown,
            KIND_DATA => Entry::Data(Digest {
                crc32: u32::from_be_bytes(rec[9..13].try_into().expect("4 bytes")),
                blake3: rec[13..].try_into().expect("32 bytes"),
            }),
            _ => return Err(self.invalid("unknown entry kind")),
        };
        Ok(Some((count, entry)))
    }

    /// Takes up to `max` clusters from the front: (clusters, entry).
    pub fn take(&mut self, max: u64) -> Result<Option<(u64, Entry)>, ManifestError> {
        let Some((n, e)) = self.next_run()? else {
            return Ok(None);
        };
        if n > max {
            self.current = Some((n - max, e));
            return Ok(Some((max, e)));
        }
        Ok(Some((n, e)))
    }
}

/// Opens `path` for reading like an image is opened: without blocking
/// (`O_NONBLOCK`: opening a FIFO waits for a writer otherwise), and refuses
/// anything that is not a regular file at once, from the open file's own
/// metadata (so nothing can be swapped in between). Symbolic links are
/// followed, as for images.
pub fn open_regular(path: &Path) -> Result<File, ManifestError> {
    use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
    let kind_of = |t: std::fs::FileType| {
        if t.is_file() {
            None
        } else if t.is_fifo() {
            Some("a FIFO")
        } else if t.is_socket() {
            Some("a socket")
        } else if t.is_char_device() {
            Some("a character device")
        } else if t.is_block_device() {
            Some("a block device")
        } else if t.is_dir() {
            Some("a directory")
        } else {
            Some("an unsupported file type")
        }
    };
    let refuse = |kind| ManifestError::NotRegular {
        path: path.to_path_buf(),
        kind,
    };
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
        .map_err(|source| {
            // A socket cannot be opened at all (ENXIO): say what it is.
            match std::fs::metadata(path)
                .ok()
                .and_then(|m| kind_of(m.file_type()))
            {
                Some(kind) => refuse(kind),
                None => ManifestError::Io {
                    path: path.to_path_buf(),
                    source,
                },
            }
        })?;
    let meta = file.metadata().map_err(|source| ManifestError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    match kind_of(meta.file_type()) {
        Some(kind) => Err(refuse(kind)),
        None => Ok(file),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(size: u64) -> Meta {
        Meta {
            id: "0".into(),
            tool: "t".into(),
            created: 0,
            source: "s".into(),
            source_identity: None,
            virtual_size: size,
            cluster_size: 512,
            sync: "full".into(),
            bitmap: None,
            backing: None,
            backing_manifest: None,
        }
    }

    #[test]
    fn runs_round_trip_merged_and_split() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("m");
        let d = Entry::Data(Digest::of(b"abc"));
        let mut w =
            ManifestWriter::new(File::create(&p).unwrap(), &p, &meta(10 * 512 - 100)).unwrap();
        w.push_run(3, Entry::Zero).unwrap();
        w.push_run(2, Entry::Zero).unwrap();
        w.push_run(1, d).unwrap();
        w.push_run(4, Entry::Unknown).unwrap();
        let digest = w.finish().unwrap();
        let mut r = ManifestReader::open(&p).unwrap();
        assert_eq!(r.digest(), digest);
        assert_eq!(r.image(), None);
        assert_eq!(r.meta(), &meta(10 * 512 - 100));
        assert_eq!(r.take(2).unwrap(), Some((2, Entry::Zero)));
        assert_eq!(r.take(9).unwrap(), Some((3, Entry::Zero)));
        assert_eq!(r.next_run().unwrap(), Some((1, d)));
        assert_eq!(r.next_run().unwrap(), Some((4, Entry::Unknown)));
        assert_eq!(r.next_run().unwrap(), None);
        // The two pushes of zeros were merged: three records in all.
        let json = serde_json::to_vec(&meta(10 * 512 - 100)).unwrap().len() + 1;
        let len = std::fs::metadata(&p).unwrap().len() as usize;
        assert_eq!(len, MAGIC.len() + json + 3 * RUN_BYTES + 32);
    }

    #[test]
    fn image_identity_follows_the_runs() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("m");
        let image = ImageIdentity {
            length: 123_456,
            scheme: 1,
            digest: [7; 32],
        };
        let d = Entry::Data(Digest::of(b"x"));
        let mut w = ManifestWriter::new(File::create(&p).unwrap(), &p, &meta(3 * 512)).unwrap();
        w.push_run(1, d).unwrap();
        w.push_run(2, Entry::Zero).unwrap();
        w.set_image(image);
        w.finish().unwrap();
        let mut r = ManifestReader::open(&p).unwrap();
        assert_eq!(r.image(), Some(&image));
        assert_eq!(r.next_run().unwrap(), Some((1, d)));
        assert_eq!(r.next_run().unwrap(), Some((2, Entry::Zero)));
        assert_eq!(r.next_run().unwrap(), None);
    }

    #[test]
    fn incomplete_damaged_and_edited_manifests_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("m");
        let mut w = ManifestWriter::new(File::create(&p).unwrap(), &p, &meta(4 * 512)).unwrap();
        w.push_run(3, Entry::Zero).unwrap();
        assert!(w.finish().is_err(), "one cluster missing");
        let mut w = ManifestWriter::new(File::create(&p).unwrap(), &p, &meta(4 * 512)).unwrap();
        w.push_run(4, Entry::Zero).unwrap();
        w.finish().unwrap();
        let good = std::fs::read(&p).unwrap();
        let mut bad = good.clone();
        let at = bad.len() - 40;
        bad[at] ^= 1;
        std::fs::write(&p, &bad).unwrap();
        let err = ManifestReader::open(&p).err().unwrap().to_string();
        assert!(err.contains("checksum does not match"), "{err}");
        std::fs::write(&p, &good[..good.len() - 1]).unwrap();
        assert!(ManifestReader::open(&p).is_err());
    }

    #[test]
    fn fifos_sockets_devices_and_directories_refused_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("f.manifest");
        rustix::fs::mkfifoat(
            rustix::fs::CWD,
            &fifo,
            rustix::fs::Mode::from_raw_mode(0o600),
        )
        .unwrap();
        let sock = dir.path().join("s.manifest");
        let _listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
        let link = dir.path().join("l.manifest");
        std::os::unix::fs::symlink(&fifo, &link).unwrap();
        for (p, kind) in [
            (fifo.as_path(), "a FIFO"),
            (link.as_path(), "a FIFO"),
            (sock.as_path(), "a socket"),
            (Path::new("/dev/zero"), "a character device"),
            (dir.path(), "a directory"),
        ] {
            let err = ManifestReader::open(p).err().expect("refused");
            assert!(
                matches!(&err, ManifestError::NotRegular { kind: k, .. } if *k == kind),
                "{}: {err}",
                p.display()
            );
            assert!(err.to_string().contains(&p.display().to_string()), "{err}");
        }
    }
}
