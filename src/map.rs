//! `qbackup map`: the allocation map of an image, entry for entry what
//! `qemu-img map` prints.
//!
//! Entries come from [`Source::status`] and are merged like qemu-img merges
//! them: neighbours join when every field matches, they come from the same
//! file, and (when they have host offsets) the offsets are contiguous. The
//! result does not depend on how the drivers split their answers.

use std::io::Write;
use std::path::Path;
use std::sync::Arc;

use qbackup_formats::{Classify, ErrorClass, GuestOffset};

use crate::source::{Source, SourceError};

/// One line of the map.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MapEntry {
    /// First guest byte.
    pub start: u64,
    /// Length in bytes.
    pub length: u64,
    /// Layer the answer came from (0 = top).
    pub depth: u32,
    /// Allocated in some layer.
    pub present: bool,
    /// Reads as zeros.
    pub zero: bool,
    /// Backed by stored data.
    pub data: bool,
    /// Stored compressed.
    pub compressed: bool,
    /// Host offset of `start`, when known.
    pub offset: Option<u64>,
    /// The file `offset` refers to.
    pub file: Option<Arc<Path>>,
}

impl MapEntry {
    fn mergeable(&self, next: &MapEntry) -> bool {
        self.zero == next.zero
            && self.data == next.data
            && self.compressed == next.compressed
            && self.depth == next.depth
            && self.present == next.present
            && self.file == next.file
            && match (self.offset, next.offset) {
                (None, None) => true,
                (Some(a), Some(b)) => a.checked_add(self.length) == Some(b),
                _ => false,
            }
    }

    /// The entry as qemu-img's JSON object, in its field order.
    pub fn to_json(&self) -> String {
        let mut s = format!(
            "{{ \"start\": {}, \"length\": {}, \"depth\": {}, \"present\": {}, \"zero\": {}, \"data\": {}, \"compressed\": {}",
            self.start, self.length, self.depth, self.present, self.zero, self.data, self.compressed
        );
        if let Some(o) = self.offset {
            s.push_str(&format!(", \"offset\": {o}"));
        }
        s.push('}');
        s
    }
}

/// The part of the disk a map covers: qemu-img map's `--start-offset` and
/// `--max-length`. The map covers `start..min(start + max_length, size)`;
/// an empty range (a start at or past the end) prints one empty entry at
/// `start`, as qemu-img does.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MapRange {
    /// First guest byte.
    pub start: u64,
    /// At most this many bytes; `None` for up to the end.
    pub max_length: Option<u64>,
}

impl MapRange {
    /// The whole disk.
    pub const ALL: MapRange = MapRange {
        start: 0,
        max_length: None,
    };

    /// The end of the range on a disk of `size` bytes.
    fn end(self, size: u64) -> u64 {
        self.max_length
            .map_or(size, |l| self.start.saturating_add(l).min(size))
    }
}

/// Walks `range` of the source and calls `emit` with each merged entry in
/// order.
pub fn walk<E>(
    source: &dyn Source,
    range: MapRange,
    mut emit: impl FnMut(&MapEntry) -> Result<(), E>,
) -> Result<(), E>
where
    E: From<SourceError>,
{
    let size = range.end(source.virtual_size());
    if range.start >= size {
        // qemu-img prints its initial, empty entry for an empty range.
        return emit(&MapEntry {
            start: range.start,
            length: 0,
            depth: 0,
            present: false,
            zero: false,
            data: false,
            compressed: false,
            offset: None,
            file: None,
        });
    }
    let mut curr: Option<MapEntry> = None;
    let mut pos = range.start;
    while pos < size {
        let (ext, len) = source.status(GuestOffset(pos), size - pos)?;
        let next = MapEntry {
            start: pos,
            length: len,
            depth: ext.depth,
            present: ext.present,
            zero: ext.zero,
            data: ext.data,
            compressed: ext.compressed,
            offset: ext.host.as_ref().map(|h| h.offset.0),
            file: ext.host.map(|h| h.file.0),
        };
        pos += len;
        match &mut curr {
            Some(c) if c.mergeable(&next) => c.length += next.length,
            _ => {
                if let Some(done) = curr.replace(next) {
                    emit(&done)?;
                }
            }
        }
    }
    if let Some(done) = curr {
        emit(&done)?;
    }
    Ok(())
}

/// Errors of the map command.
#[derive(Debug, thiserror::Error)]
pub enum MapError {
    /// The image could not be read.
    #[error(transparent)]
    Image(#[from] SourceError),
    /// Writing the output failed.
    #[error("cannot write output: {}", qbackup_formats::error::io_text(.0))]
    Output(#[from] std::io::Error),
    /// The human format cannot show a range without a host offset.
    #[error("{}: contains external, encrypted or compressed clusters, which the human map cannot show", .0.display())]
    NoHostOffset(std::path::PathBuf),
}

impl Classify for MapError {
    fn class(&self) -> ErrorClass {
        match self {
            MapError::Image(e) => e.class(),
            MapError::Output(e) => ErrorClass::of_io(e),
            MapError::NoHostOffset(_) => ErrorClass::Unsupported,
        }
    }

    fn remedy(&self) -> Option<qbackup_formats::Remedy> {
        match self {
            MapError::Image(e) => e.remedy(),
            MapError::Output(_) => None,
            MapError::NoHostOffset(_) => Some(qbackup_formats::Remedy::JsonOutput),
        }
    }
}

/// Writes the map as qemu-img's JSON array.
pub fn write_json(
    source: &dyn Source,
    range: MapRange,
    out: &mut impl Write,
) -> Result<(), MapError> {
    let mut first = true;
    out.write_all(b"[")?;
    walk(source, range, |e: &MapEntry| -> Result<(), MapError> {
        if !first {
            out.write_all(b",\n")?;
        }
        first = false;
        out.write_all(e.to_json().as_bytes())?;
        Ok(())
    })?;
    out.write_all(b"]\n")?;
    Ok(())
}

/// qemu-img prints hex with `%#-16x`: "0" for zero, "0x…" otherwise.
fn hex(v: u64) -> String {
    if v == 0 {
        "0".into()
    } else {
        format!("{v:#x}")
    }
}

/// Writes the map as qemu-img's human table (data ranges only).
pub fn write_human(
    source: &dyn Source,
    range: MapRange,
    out: &mut impl Write,
) -> Result<(), MapError> {
    writeln!(
        out,
        "{:<16}{:<16}{:<16}File",
        "Offset", "Length", "Mapped to"
    )?;
    let top = source.name().to_path_buf();
    walk(source, range, |e: &MapEntry| -> Result<(), MapError> {
        if e.data && e.offset.is_none() {
            return Err(MapError::NoHostOffset(top.clone()));
        }
        if e.data && !e.zero {
            let file = e
                .file
                .as_ref()
                .map(|f| f.display().to_string())
                .unwrap_or_default();
            writeln!(
                out,
                "{:<16}{:<16}{:<16}{}",
                hex(e.start),
                hex(e.length),
                hex(e.offset.unwrap_or(0)),
                file
            )?;
        }
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(start: u64, length: u64, offset: Option<u64>) -> MapEntry {
        MapEntry {
            start,
            length,
            depth: 0,
            present: true,
            zero: false,
            data: true,
            compressed: false,
            offset,
            file: offset.map(|_| Arc::from(Path::new("a"))),
        }
    }

    #[test]
    fn merges_only_contiguous_offsets() {
        let a = entry(0, 4096, Some(65536));
        assert!(a.mergeable(&entry(4096, 4096, Some(69632))));
        assert!(!a.mergeable(&entry(4096, 4096, Some(131072))));
        assert!(!a.mergeable(&entry(4096, 4096, None)));
        let mut z = entry(4096, 10, None);
        z.zero = true;
        assert!(!entry(0, 4096, None).mergeable(&z));
    }

    #[test]
    fn json_matches_qemu_layout() {
        assert_eq!(
            entry(0, 65536, Some(327680)).to_json(),
            "{ \"start\": 0, \"length\": 65536, \"depth\": 0, \"present\": true, \"zero\": false, \"data\": true, \"compressed\": false, \"offset\": 327680}"
        );
        assert_eq!(hex(0), "0");
        assert_eq!(hex(0x3e8), "0x3e8");
    }
}
