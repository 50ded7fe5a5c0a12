//! The image formats qbackup reads, by the names qemu-img uses. A leaf
//! module: drivers, the chain and the CLI all name formats.

use std::fmt;

/// An image format qbackup reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// A plain disk image.
    Raw,
    /// QEMU copy-on-write v2/v3.
    Qcow2,
}

impl Format {
    /// The name qemu-img uses.
    pub fn name(self) -> &'static str {
        match self {
            Format::Raw => "raw",
            Format::Qcow2 => "qcow2",
        }
    }

    /// Parses a qemu-img format name.
    pub fn from_name(name: &str) -> Option<Format> {
        match name {
            "raw" => Some(Format::Raw),
            "qcow2" => Some(Format::Qcow2),
            _ => None,
        }
    }
}

impl fmt::Display for Format {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}
