//! Format probing as qemu-img does it, so that an image in a format qbackup
//! does not read is refused by name instead of being copied as raw bytes.
//!
//! # Why
//!
//! Without `-f`, QEMU reads the start of a file and asks every format driver
//! how sure it is that the file is one of its images; the highest score wins,
//! and raw, which scores 1, is the fallback (`bdrv_probe_all` and
//! `find_image_format` in QEMU's `block.c`). qbackup reads only qcow2 and raw.
//! If it looked for the qcow2 magic alone, a VMDK, VHDX or VDI file would be
//! "backed up" as a raw disk: a copy of the container, never what the guest
//! sees. [`probe`] answers the question QEMU answers, so the tool can refuse
//! such a file and name its format.
//!
//! # What is checked (each probe as strict as QEMU's)
//!
//! | Result | Evidence | QEMU source |
//! |---|---|---|
//! | [`Probed::Qcow2`] | `QFI\xfb` at 0, version other than 1 | `block/qcow2.c` |
//! | `qcow` | `QFI\xfb` at 0, big-endian version 1 at 4 | `block/qcow.c` |
//! | `vmdk` | `KDMV` or `COWD` at 0, or a descriptor text file (below) | `block/vmdk.c` |
//! | `vhdx` | `vhdxfile` at 0 | `block/vhdx.c` |
//! | `vpc` | `conectix` at 0 | `block/vpc.c` |
//! | `vdi` | little-endian `0xbeda107f` at 0x40 | `block/vdi.c` |
//! | `qed` | `QED\0` at 0 | `block/qed.c` |
//! | `parallels` | `WithoutFreeSpace` or `WithouFreSpacExt` at 0, little-endian version 2 at 16 | `block/parallels.c` |
//! | `bochs` | NUL-terminated `Bochs Virtual HD Image` at 0, `Redolog` at 32, `Growing` at 48, little-endian version 0x10000 or 0x20000 at 64 | `block/bochs.c` |
//! | `luks` | `LUKS\xba\xbe` at 0, big-endian version at 6 | `block/crypto.c`, `crypto/block-luks.c` |
//! | `cloop` | the cloop V2.0 shell-script header at 0 (weak: QEMU scores it 2) | `block/cloop.c` |
//! | `dmg` | a name ending in `.dmg` (weak: QEMU scores it 2), or a UDIF `koly` trailer | `block/dmg.c` |
//!
//! A VMDK descriptor is a text file: QEMU skips `#` comment lines and lines
//! made only of spaces (optionally ending in `\r`), and the first other line
//! must be exactly `version=1`, `version=2` or `version=3` ending in `\n` or
//! `\r\n`. Anything else (an empty line, a tab, any other text) stops the
//! search, so a raw disk that merely starts with text stays raw.
//!
//! # Invariants
//!
//! - Pure: no I/O and no printing; the caller reads the bytes.
//! - Never panics, whatever the lengths of `head` and `tail`.
//! - QEMU probes a buffer of exactly 512 bytes ([`HEAD_BYTES`],
//!   `BLOCK_PROBE_BUF_SIZE`), and the block layer reads zeros past the end
//!   of a short file. `probe` does the same: a shorter `head` is padded with
//!   zeros and bytes past [`HEAD_BYTES`] are ignored. So, as in QEMU, a
//!   descriptor whose `version=` line starts after byte 512 is not a VMDK.
//! - An empty file is raw, whatever its name (QEMU does not probe it).
//! - Any version of the qcow2 magic except 1 is [`Probed::Qcow2`]: the qcow2
//!   driver then reports a bad version or a truncated header with the file
//!   name. (QEMU itself would call version 0 raw; refusing is safer than
//!   copying a damaged qcow2 as raw bytes.)
//! - Content evidence beats the file name: a qcow2 or VMDK named `x.dmg` is
//!   what its bytes say, as in QEMU, where those probes score 100 and the
//!   name only 2.
//!
//! # Where qbackup goes further than QEMU
//!
//! - DMG: QEMU's probe looks only at the name. A file whose last 512 bytes
//!   are a UDIF trailer (`koly`, version 4, header size 512, big-endian) is
//!   refused as `dmg` whatever its name; `qemu-img` would read such a file
//!   as raw when it does not end in `.dmg`.
//! - LUKS: QEMU's probe accepts only LUKS version 1 (it cannot open LUKS2,
//!   and calls a LUKS2 file raw). Version 2 is refused as `luks` too, so an
//!   encrypted volume is never copied without `-f raw`.
//!
//! Where QEMU is lax, so is this module: a fixed-size VHD has its `conectix`
//! footer only at the end of the file, which QEMU's probe does not look at,
//! so it is raw here as it is for `qemu-img`.

use std::ffi::OsStr;

/// What the first bytes of a file say it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Probed {
    /// qcow2 magic with version 2 or 3 (or any version other than 1: the
    /// qcow2 driver reports bad versions itself).
    Qcow2,
    /// A format QEMU knows and qbackup does not read; the name is qemu-img's
    /// format name ("vmdk", "vhdx", "vpc", "vdi", "qed", "parallels",
    /// "bochs", "cloop", "dmg", "luks", "qcow").
    Foreign(&'static str),
    /// Nothing recognised: raw, as in QEMU.
    Raw,
}

/// Bytes of the file's start that [`probe`] needs: QEMU's probe buffer
/// (`BLOCK_PROBE_BUF_SIZE` in QEMU's block layer) is 512 bytes, and so is the
/// largest header a probe looks into (VDI's and Bochs's).
pub const HEAD_BYTES: usize = 512;

/// Bytes at the end of the file that [`probe`] looks at (DMG's "koly" trailer
/// is the last 512 bytes).
pub const TAIL_BYTES: usize = 512;

/// Classifies a file from `head` (its first min(len, [`HEAD_BYTES`]) bytes),
/// `tail` (its last min(len, [`TAIL_BYTES`]) bytes, may overlap head for
/// small files) and its name (for DMG, which QEMU recognises by the `.dmg`
/// suffix; also accept the koly trailer).
///
/// `file_name` may be a bare name or a whole path: only its suffix matters.
/// Bytes of `head` past [`HEAD_BYTES`] are ignored, as QEMU ignores them.
pub fn probe(head: &[u8], tail: &[u8], file_name: Option<&OsStr>) -> Probed {
    if head.is_empty() {
        // QEMU opens an empty file as raw without probing it.
        return Probed::Raw;
    }
    // QEMU's view: exactly HEAD_BYTES bytes, zeros past the end of the file.
    let mut buf = [0u8; HEAD_BYTES];
    let n = head.len().min(HEAD_BYTES);
    buf[..n].copy_from_slice(&head[..n]);
    let buf = &buf;

    // Probes that score 100 in QEMU. Their magics exclude one another.
    if buf.starts_with(&QCOW_MAGIC) {
        return if be32(buf, 4) == 1 {
            Probed::Foreign("qcow")
        } else {
            Probed::Qcow2
        };
    }
    if buf.starts_with(VMDK4_MAGIC) || buf.starts_with(VMDK3_MAGIC) {
        return Probed::Foreign("vmdk");
    }
    if buf.starts_with(VHDX_SIGNATURE) {
        return Probed::Foreign("vhdx");
    }
    if buf.starts_with(VPC_COOKIE) {
        return Probed::Foreign("vpc");
    }
    if buf.starts_with(QED_MAGIC) {
        return Probed::Foreign("qed");
    }
    if is_parallels(buf) {
        return Probed::Foreign("parallels");
    }
    if is_bochs(buf) {
        return Probed::Foreign("bochs");
    }
    if is_luks(buf) {
        return Probed::Foreign("luks");
    }
    if le32(buf, VDI_SIGNATURE_AT) == VDI_SIGNATURE {
        return Probed::Foreign("vdi");
    }
    if is_vmdk_descriptor(buf) {
        return Probed::Foreign("vmdk");
    }

    // Weak evidence: QEMU scores these 2, just above raw.
    if buf.starts_with(CLOOP_V2_HEADER) {
        return Probed::Foreign("cloop");
    }
    if has_dmg_suffix(file_name) || is_udif_trailer(tail) {
        return Probed::Foreign("dmg");
    }
    Probed::Raw
}

/// qcow and qcow2: `QFI\xfb`.
const QCOW_MAGIC: [u8; 4] = crate::qcow2::header::MAGIC.to_be_bytes();
/// VMDK sparse extent (version 4 and later).
const VMDK4_MAGIC: &[u8] = b"KDMV";
/// VMDK3 (ESX "COWD") sparse extent.
const VMDK3_MAGIC: &[u8] = b"COWD";
/// VHDX file type identifier.
const VHDX_SIGNATURE: &[u8] = b"vhdxfile";
/// VHD (Virtual PC) footer cookie; dynamic images have a copy at offset 0.
const VPC_COOKIE: &[u8] = b"conectix";
/// QED: the little-endian u32 `'Q' | 'E' << 8 | 'D' << 16`.
const QED_MAGIC: &[u8] = b"QED\0";
/// Where VDI keeps its signature: after a 64-byte text field.
const VDI_SIGNATURE_AT: usize = 0x40;
const VDI_SIGNATURE: u32 = 0xbeda_107f;
/// The two Parallels magics: the original and the "extended" one.
const PARALLELS_MAGICS: [&[u8; 16]; 2] = [b"WithoutFreeSpace", b"WithouFreSpacExt"];
const PARALLELS_VERSION: u32 = 2;
/// LUKS: six magic bytes, then a big-endian u16 version.
const LUKS_MAGIC: &[u8] = b"LUKS\xba\xbe";
/// cloop V2.0 images start with this shell script.
const CLOOP_V2_HEADER: &[u8] = b"#!/bin/sh\n#V2.0 Format\n\
    modprobe cloop file=$0 && mount -r -t iso9660 /dev/cloop $1\n";
/// UDIF (DMG) trailer: magic, version, size of the trailer.
const UDIF_MAGIC: &[u8] = b"koly";
const UDIF_VERSION: u32 = 4;
const UDIF_TRAILER_SIZE: u32 = 512;

/// Big-endian u32 at `at`; zero where `buf` is too short.
fn be32(buf: &[u8], at: usize) -> u32 {
    word(buf, at).map_or(0, u32::from_be_bytes)
}

/// Little-endian u32 at `at`; zero where `buf` is too short.
fn le32(buf: &[u8], at: usize) -> u32 {
    word(buf, at).map_or(0, u32::from_le_bytes)
}

fn word(buf: &[u8], at: usize) -> Option<[u8; 4]> {
    buf.get(at..at.checked_add(4)?)?.try_into().ok()
}

/// `field` holds exactly the C string `s`: its bytes, then a NUL, inside the
/// field (what QEMU's `strcmp` on a fixed-size header field accepts).
fn c_string_is(field: &[u8], s: &[u8]) -> bool {
    field.len() > s.len() && field.starts_with(s) && field[s.len()] == 0
}

fn is_parallels(buf: &[u8; HEAD_BYTES]) -> bool {
    PARALLELS_MAGICS.iter().any(|m| buf.starts_with(*m)) && le32(buf, 16) == PARALLELS_VERSION
}

/// Bochs: a growing redolog, header version 1 or 2.
fn is_bochs(buf: &[u8; HEAD_BYTES]) -> bool {
    c_string_is(&buf[0..32], b"Bochs Virtual HD Image")
        && c_string_is(&buf[32..48], b"Redolog")
        && c_string_is(&buf[48..64], b"Growing")
        && matches!(le32(buf, 64), 0x0001_0000 | 0x0002_0000)
}

fn is_luks(buf: &[u8; HEAD_BYTES]) -> bool {
    buf.starts_with(LUKS_MAGIC) && matches!(u16::from_be_bytes([buf[6], buf[7]]), 1 | 2)
}

/// A VMDK descriptor file: after `#` comment lines and blank lines made of
/// spaces, the first line is `version=N` with N in 1..=3.
fn is_vmdk_descriptor(buf: &[u8; HEAD_BYTES]) -> bool {
    let end = buf.len();
    let mut p = 0;
    while p < end {
        match buf[p] {
            b'#' => {
                // A comment runs to the end of its line.
                while p < end && buf[p] != b'\n' {
                    p += 1;
                }
                p += 1;
            }
            b' ' => {
                // Spaces, an optional CR, then the newline: a blank line.
                // Anything else on a line that starts with a space is not a
                // descriptor.
                while p < end && buf[p] == b' ' {
                    p += 1;
                }
                if p < end && buf[p] == b'\r' {
                    p += 1;
                }
                if p >= end || buf[p] != b'\n' {
                    return false;
                }
                p += 1;
            }
            _ => {
                let line = &buf[p..];
                return [b"1", b"2", b"3"].iter().any(|v| {
                    let rest = line.strip_prefix(b"version=".as_slice());
                    let rest = rest.and_then(|r| r.strip_prefix(v.as_slice()));
                    rest.is_some_and(|r| r.starts_with(b"\n") || r.starts_with(b"\r\n"))
                });
            }
        }
    }
    false
}

/// QEMU's DMG probe: the name (or path) is longer than the suffix and ends
/// in `.dmg`, case-sensitively.
fn has_dmg_suffix(file_name: Option<&OsStr>) -> bool {
    file_name.is_some_and(|n| {
        let n = n.as_encoded_bytes();
        n.len() > 4 && n.ends_with(b".dmg")
    })
}

/// The last 512 bytes are a UDIF trailer.
fn is_udif_trailer(tail: &[u8]) -> bool {
    tail.len() == TAIL_BYTES
        && tail.starts_with(UDIF_MAGIC)
        && be32(tail, 4) == UDIF_VERSION
        && be32(tail, 8) == UDIF_TRAILER_SIZE
}

#[cfg(test)]
mod tests;
