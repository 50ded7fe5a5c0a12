//! Header extensions (spec "Header extensions"): decoded as QEMU's
//! `qcow2_read_extensions` reads them when it opens an image, so that an
//! extension QEMU refuses is refused here too, and encoded for the writer.
//!
//! The area runs from the end of the fixed header to the backing file name
//! (or the end of the first cluster); each extension is a type, a length
//! and data padded to 8 bytes; type 0 ends the area.

use super::header::{autoclear, ext, BitmapsExtension, Header, HeaderError};
use super::table::{be32, be64};
use crate::units::HostOffset;

/// QEMU keeps the backing format in a 16-byte buffer, NUL included.
const MAX_BACKING_FORMAT_LEN: usize = 15;
/// The crypto header extension: offset and length, 8 bytes each.
const CRYPTO_EXT_LEN: usize = 16;

/// QEMU's `qcow2_read_extensions`: extensions run from the end of the
/// header to the backing file name (or the end of the first cluster);
/// one whose type and length, or whose data, does not fit before that
/// end is "Header extension too large".
pub(super) fn decode(h: &mut Header, first: &[u8]) -> Result<(), HeaderError> {
    let cluster_end = 1u64 << h.cluster_bits;
    // Like QEMU: the extension area ends where the backing file name
    // begins (old v2 images put the name right after the header).
    let ext_end = match h.backing_file_offset {
        0 => cluster_end,
        o => o,
    } as usize;
    // What of the area is in `first` (QEMU reads zeros past the end of a
    // short file; we refuse an extension that needs them).
    let end = ext_end.min(first.len());
    let mut at = h.header_length as usize;
    while at < ext_end {
        let bad = |kind, why| HeaderError::BadExtension {
            kind,
            offset: at as u64,
            why,
        };
        if at + 8 > end {
            if at + 8 > ext_end {
                return Err(bad(0, "extension header runs past the extension area"));
            }
            // Cut by the end of the file: zeros there read as the end.
            if first[at..end].iter().all(|&b| b == 0) {
                return Ok(());
            }
            return Err(bad(0, "runs past the end of the file"));
        }
        let kind = be32(first, at);
        let len = be32(first, at + 4) as usize;
        let data_at = at + 8;
        // QEMU checks the length before the type: an end marker with
        // a length past the area is "Header extension too large" too.
        if len > ext_end - data_at {
            return Err(bad(
                kind,
                if h.backing_file_offset != 0 {
                    "runs into the backing file name"
                } else {
                    "runs past the first cluster"
                },
            ));
        }
        if kind == ext::END {
            return Ok(());
        }
        if len > end - data_at {
            return Err(bad(kind, "runs past the end of the file"));
        }
        let data = &first[data_at..data_at + len];
        match kind {
            ext::BACKING_FORMAT => {
                if len > MAX_BACKING_FORMAT_LEN {
                    return Err(bad(kind, "backing format name longer than 15 bytes"));
                }
                h.backing_format = Some(text(data).map_err(|w| bad(kind, w))?)
            }
            ext::DATA_FILE => h.data_file = Some(text(data).map_err(|w| bad(kind, w))?),
            ext::CRYPTO => {
                if h.crypt_method != 2 {
                    return Err(bad(kind, "crypto header without LUKS encryption"));
                }
                if len != CRYPTO_EXT_LEN {
                    return Err(bad(kind, "crypto header extension must be 16 bytes"));
                }
                let offset = be64(data, 0);
                if offset % cluster_end != 0 {
                    return Err(bad(kind, "LUKS header is not cluster aligned"));
                }
                h.crypto_header = Some((HostOffset(offset), be64(data, 8)));
            }
            ext::BITMAPS => {
                if len != 24 {
                    return Err(bad(kind, "bitmaps extension must be 24 bytes"));
                }
                // Without autoclear bit 0 a program unaware of bitmaps
                // wrote the image: QEMU ignores the extension's content.
                if h.autoclear_features & autoclear::BITMAPS != 0 {
                    if be32(data, 4) != 0 {
                        return Err(bad(kind, "reserved field is not zero"));
                    }
                    h.bitmaps = Some(BitmapsExtension {
                        nb_bitmaps: be32(data, 0),
                        directory_size: be64(data, 8),
                        directory_offset: HostOffset(be64(data, 16)),
                    });
                }
            }
            // Feature names and unknown extensions need no decoding to
            // read the image.
            _ => {}
        }
        at = data_at + len.div_ceil(8) * 8;
    }
    Ok(())
}

/// Encodes one header extension: type, length, data padded to 8 bytes.
pub fn encode_extension(kind: u32, data: &[u8]) -> Vec<u8> {
    let mut b = Vec::with_capacity(8 + data.len().div_ceil(8) * 8);
    b.extend_from_slice(&kind.to_be_bytes());
    b.extend_from_slice(&(data.len() as u32).to_be_bytes());
    b.extend_from_slice(data);
    b.resize(8 + data.len().div_ceil(8) * 8, 0);
    b
}

pub(super) fn text(data: &[u8]) -> Result<String, &'static str> {
    let data = match data.iter().position(|&c| c == 0) {
        Some(n) => &data[..n],
        None => data,
    };
    String::from_utf8(data.to_vec()).map_err(|_| "name is not UTF-8")
}
