//! Unit tests of the header decoder (`header.rs`) and its extensions.

use super::*;

/// A minimal valid v3 header for a 1 MiB image with 64 KiB clusters.
pub(crate) fn fixture() -> Vec<u8> {
    let h = Header {
        version: 3,
        backing_file_offset: 0,
        backing_file_size: 0,
        cluster_bits: 16,
        size: 1 << 20,
        crypt_method: 0,
        l1_size: 1,
        l1_table_offset: HostOffset(0x30000),
        refcount_table_offset: HostOffset(0x10000),
        refcount_table_clusters: 1,
        nb_snapshots: 0,
        snapshots_offset: HostOffset(0),
        incompatible_features: 0,
        compatible_features: 0,
        autoclear_features: 0,
        refcount_order: 4,
        header_length: V3_HEADER_LEN,
        compression_type: CompressionType::Zlib,
        backing_format: None,
        data_file: None,
        bitmaps: None,
        backing_file: None,
        crypto_header: None,
    };
    let mut b = h.encode_v3();
    b.resize(65536, 0);
    b
}

fn put32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_be_bytes());
}

#[test]
fn decodes_round_trip() {
    let b = fixture();
    let h = Header::decode(&b, b.len() as u64).unwrap();
    assert_eq!(h.cluster_size(), 65536);
    assert_eq!(h.encode_v3(), b[..112].to_vec());
}

#[test]
fn rejects_bad_fields() {
    let cases: Vec<(usize, u32, &str)> = vec![
        (0, 0x1234, "magic"),
        (4, 4, "version"),
        (20, 8, "cluster_bits"),
        (20, 22, "cluster_bits"),
        (36, 0, "l1_size"),
        (96, 7, "refcount_order"),
        (100, 50, "header_length"),
        (32, 9, "crypt_method"),
    ];
    for (at, v, what) in cases {
        let mut b = fixture();
        put32(&mut b, at, v);
        assert!(Header::decode(&b, b.len() as u64).is_err(), "{what}");
    }
    let mut b = fixture();
    b[72 + 7] = 0x80; // unknown incompatible bit 7
    assert!(matches!(
        Header::decode(&b, b.len() as u64),
        Err(HeaderError::UnknownFeatures(0x80))
    ));
    let mut b = fixture();
    b[47] = 1; // unaligned L1 offset
    assert!(Header::decode(&b, b.len() as u64).is_err());
}

#[test]
fn decodes_extensions_and_backing() {
    let mut b = fixture();
    let mut ext_area = encode_extension(ext::BACKING_FORMAT, b"raw");
    ext_area.extend(encode_extension(ext::DATA_FILE, b"/data.img"));
    ext_area.extend(encode_extension(ext::END, b""));
    b[112..112 + ext_area.len()].copy_from_slice(&ext_area);
    let name = b"base.qcow2";
    b[512..512 + name.len()].copy_from_slice(name);
    b[8..16].copy_from_slice(&512u64.to_be_bytes());
    put32(&mut b, 16, name.len() as u32);
    let h = Header::decode(&b, b.len() as u64).unwrap();
    assert_eq!(h.backing_format.as_deref(), Some("raw"));
    assert_eq!(h.data_file.as_deref(), Some("/data.img"));
    assert_eq!(h.backing_file.as_deref(), Some("base.qcow2"));
}

/// Regression: an old v2 image with its backing name right after the
/// header (no extensions) must not have the name parsed as extensions.
#[test]
fn v2_backing_name_right_after_header() {
    let mut b = fixture();
    put32(&mut b, 4, 2);
    b[72..112].fill(0);
    let name = b"base-image.qcow2";
    b[72..72 + name.len()].copy_from_slice(name);
    b[8..16].copy_from_slice(&72u64.to_be_bytes());
    put32(&mut b, 16, name.len() as u32);
    let h = Header::decode(&b, b.len() as u64).unwrap();
    assert_eq!(h.backing_file.as_deref(), Some("base-image.qcow2"));
}

#[test]
fn rejects_extension_past_cluster() {
    let mut b = fixture();
    put32(&mut b, 112, ext::BACKING_FORMAT);
    put32(&mut b, 116, 70000);
    assert!(matches!(
        Header::decode(&b, b.len() as u64),
        Err(HeaderError::BadExtension { .. })
    ));
}

#[test]
fn truncated_file() {
    let b = fixture();
    assert!(Header::decode(&b[..50], 50).is_err());
}

/// Regression: a file cut inside a header extension (or its backing
/// name) is reported as running past the end of the file, not past the
/// first cluster.
#[test]
fn cut_file_names_the_end_of_the_file() {
    let mut b = fixture();
    // The feature name table (a backing format name this long is
    // refused whole, as QEMU refuses it).
    put32(&mut b, 112, 0x6803_f857);
    put32(&mut b, 116, 64);
    let cut = &b[..140];
    let err = Header::decode(cut, cut.len() as u64)
        .unwrap_err()
        .to_string();
    assert!(err.contains("past the end of the file"), "{err}");
    assert!(
        Header::decode(&b, b.len() as u64).is_ok(),
        "the whole cluster holds the extension"
    );
    let mut b = fixture();
    b[8..16].copy_from_slice(&512u64.to_be_bytes());
    put32(&mut b, 16, 10);
    let cut = &b[..515];
    let err = Header::decode(cut, cut.len() as u64)
        .unwrap_err()
        .to_string();
    assert!(err.contains("runs past the end of the file"), "{err}");
}

/// Regression: a backing name made of NUL bytes is no backing file, as
/// QEMU reads it (it used to name the image's own directory).
#[test]
fn nul_backing_name_is_no_backing_file() {
    let mut b = fixture();
    b[8..16].copy_from_slice(&512u64.to_be_bytes());
    put32(&mut b, 16, 8);
    let h = Header::decode(&b, b.len() as u64).unwrap();
    assert_eq!(h.backing_file, None);
}

fn put64(b: &mut [u8], at: usize, v: u64) {
    b[at..at + 8].copy_from_slice(&v.to_be_bytes());
}

fn why(b: &[u8]) -> String {
    match Header::decode(b, b.len() as u64) {
        Ok(_) => "accepted".into(),
        Err(e) => e.to_string(),
    }
}

/// QEMU's `qcow2_validate_table` for the refcount, snapshot and L1
/// tables, and "Image does not contain a reference count table".
#[test]
fn tables_are_validated_like_qemu() {
    let cases: Vec<(usize, u64, bool, &str)> = vec![
        // (field offset, value, 64-bit field, expected words)
        (56, 0, false, "no refcount table"),
        (48, 1 << 63, true, "refcount_table_offset"),
        (48, 0x10200, true, "not cluster aligned"),
        (56, 129, false, "larger than 8 MiB"),
        (60, 65537, false, "more than 65536 snapshots"),
        (64, 0x200, true, "snapshots_offset"),
        (36, (4 << 20) + 1, false, "larger than 32 MiB"),
    ];
    for (at, v, wide, words) in cases {
        let mut b = fixture();
        if wide {
            put64(&mut b, at, v);
        } else {
            put32(&mut b, at, v as u32);
        }
        let got = why(&b);
        assert!(got.contains(words), "field {at} = {v:#x}: {got}");
    }
    // Checked without snapshots too, as QEMU does.
    let mut b = fixture();
    put64(&mut b, 64, 0x10);
    assert!(why(&b).contains("snapshots_offset"));
    let mut b = fixture();
    put32(&mut b, 36, 8192);
    put64(&mut b, 40, (i64::MAX as u64) & !0xffff);
    assert!(why(&b).contains("largest file offset"), "{}", why(&b));
    let mut b = fixture();
    put32(&mut b, 60, 1);
    put64(&mut b, 64, (i64::MAX as u64) & !0xffff);
    assert_eq!(why(&b), "accepted", "one entry fits below i64::MAX");
    put32(&mut b, 60, 1639);
    put64(&mut b, 64, (i64::MAX as u64) & !0xffff);
    assert!(why(&b).contains("largest file offset"), "{}", why(&b));
    // 65536 snapshots at an aligned offset pass the header checks.
    let mut b = fixture();
    put32(&mut b, 60, 65536);
    put64(&mut b, 64, 0x20000);
    assert_eq!(why(&b), "accepted");
}

/// "Invalid backing file offset", and an extension area cut by the name.
#[test]
fn backing_file_offset_bounds_the_extension_area() {
    let mut b = fixture();
    put64(&mut b, 8, 65537);
    assert!(why(&b).contains("past the first cluster"), "{}", why(&b));
    // The name starts inside the first extension's type and length.
    let mut b = fixture();
    put32(&mut b, 112, ext::BACKING_FORMAT);
    put32(&mut b, 116, 5);
    b[120..125].copy_from_slice(b"qcow2");
    put64(&mut b, 8, 116);
    put32(&mut b, 16, 4);
    assert!(why(&b).contains("extension area"), "{}", why(&b));
    // ... or inside its data.
    put64(&mut b, 8, 122);
    assert!(why(&b).contains("backing file name"), "{}", why(&b));
    // Right after it: fine.
    put64(&mut b, 8, 128);
    assert_eq!(why(&b), "accepted");
}

/// QEMU checks an extension's length before its type: an end marker with
/// a length past the area is refused.
#[test]
fn end_marker_length_is_checked() {
    let mut b = fixture();
    put32(&mut b, 116, 0x0100_0000);
    assert!(why(&b).contains("past the first cluster"), "{}", why(&b));
    put32(&mut b, 116, 64);
    assert_eq!(why(&b), "accepted");
}

#[test]
fn backing_format_longer_than_qemus_buffer_is_refused() {
    let mut b = fixture();
    put32(&mut b, 112, ext::BACKING_FORMAT);
    put32(&mut b, 116, 16);
    b[120..136].copy_from_slice(b"qcow2qcow2qcow2q");
    assert!(why(&b).contains("longer than 15"), "{}", why(&b));
    put32(&mut b, 116, 15);
    assert_eq!(why(&b), "accepted");
}

#[test]
fn crypto_header_extension_is_checked_like_qemu() {
    let crypto = |b: &mut Vec<u8>, len: u32, offset: u64| {
        put32(b, 112, ext::CRYPTO);
        put32(b, 116, len);
        put64(b, 120, offset);
        put64(b, 128, 4096);
    };
    let mut b = fixture();
    crypto(&mut b, 16, 0x20000);
    assert!(why(&b).contains("without LUKS"), "{}", why(&b));
    put32(&mut b, 32, 2);
    let h = Header::decode(&b, b.len() as u64).unwrap();
    assert_eq!(h.crypto_header, Some((HostOffset(0x20000), 4096)));
    crypto(&mut b, 24, 0x20000);
    assert!(why(&b).contains("16 bytes"), "{}", why(&b));
    crypto(&mut b, 16, 0x20200);
    assert!(why(&b).contains("not cluster aligned"), "{}", why(&b));
    // LUKS without the extension ("Missing CRYPTO header").
    let mut b = fixture();
    put32(&mut b, 32, 2);
    assert!(why(&b).contains("crypto header"), "{}", why(&b));
}

#[test]
fn data_file_raw_needs_a_data_file() {
    let mut b = fixture();
    b[95] = 2;
    assert!(why(&b).contains("data-file-raw"), "{}", why(&b));
}

/// Without autoclear bit 0 QEMU ignores the bitmaps extension's content
/// (after checking its length).
#[test]
fn bitmaps_extension_ignored_without_its_autoclear_bit() {
    let mut b = fixture();
    put32(&mut b, 112, ext::BITMAPS);
    put32(&mut b, 116, 24);
    put32(&mut b, 124, 7); // reserved field
    let h = Header::decode(&b, b.len() as u64).unwrap();
    assert_eq!(h.bitmaps, None);
    b[95] = 1;
    assert!(why(&b).contains("reserved field"), "{}", why(&b));
    b[95] = 0;
    put32(&mut b, 116, 16);
    assert!(why(&b).contains("24 bytes"), "{}", why(&b));
}
