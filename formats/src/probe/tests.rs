//! Unit tests of the probe with hand-built bytes.
use super::*;

/// `probe` of a file whose whole content is `bytes`, named `name`.
fn probe_file(bytes: &[u8], name: &str) -> Probed {
    let head = &bytes[..bytes.len().min(HEAD_BYTES)];
    let tail = &bytes[bytes.len().saturating_sub(TAIL_BYTES)..];
    probe(head, tail, Some(OsStr::new(name)))
}

/// `probe` of a file whose whole content is `bytes`, with no name.
fn probe_bytes(bytes: &[u8]) -> Probed {
    let head = &bytes[..bytes.len().min(HEAD_BYTES)];
    let tail = &bytes[bytes.len().saturating_sub(TAIL_BYTES)..];
    probe(head, tail, None)
}

fn foreign(name: &'static str) -> Probed {
    Probed::Foreign(name)
}

/// `len` zero bytes with `parts` written at their offsets.
fn image(len: usize, parts: &[(usize, &[u8])]) -> Vec<u8> {
    let mut v = vec![0u8; len];
    for (at, bytes) in parts {
        v[*at..*at + bytes.len()].copy_from_slice(bytes);
    }
    v
}

/// A deterministic byte generator (xorshift64*).
fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut s = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            s ^= s >> 12;
            s ^= s << 25;
            s ^= s >> 27;
            (s.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 56) as u8
        })
        .collect()
}

fn qcow_header(version: u32) -> Vec<u8> {
    let mut h = image(104, &[(0, b"QFI\xfb")]);
    h[4..8].copy_from_slice(&version.to_be_bytes());
    h
}

fn parallels_header(magic: &[u8], version: u32) -> Vec<u8> {
    image(1024, &[(0, magic), (16, &version.to_le_bytes())])
}

fn bochs_header(magic: &[u8], kind: &[u8], subtype: &[u8], version: u32) -> Vec<u8> {
    image(
        1536,
        &[
            (0, magic),
            (32, kind),
            (48, subtype),
            (64, &version.to_le_bytes()),
            (68, &512u32.to_le_bytes()),
        ],
    )
}

fn luks_header(version: u16) -> Vec<u8> {
    image(4096, &[(0, b"LUKS\xba\xbe"), (6, &version.to_be_bytes())])
}

fn vdi_header(signature_at: usize) -> Vec<u8> {
    image(
        1024,
        &[
            (0, b"<<< QEMU VM Virtual Disk Image >>>\n"),
            (signature_at, &0xbeda_107fu32.to_le_bytes()),
        ],
    )
}

/// A file ending in a UDIF trailer with the given fields.
fn udif(len: usize, magic: &[u8], version: u32, size: u32) -> Vec<u8> {
    let t = len - 512;
    image(
        len,
        &[
            (t, magic),
            (t + 4, &version.to_be_bytes()),
            (t + 8, &size.to_be_bytes()),
        ],
    )
}

const CLOOP_HEADER: &[u8] = b"#!/bin/sh\n#V2.0 Format\n\
    modprobe cloop file=$0 && mount -r -t iso9660 /dev/cloop $1\nexit $?\n";

// -----------------------------------------------------------------
// qcow and qcow2
// -----------------------------------------------------------------

#[test]
fn qcow2_versions_2_and_3() {
    assert_eq!(probe_bytes(&qcow_header(2)), Probed::Qcow2);
    assert_eq!(probe_bytes(&qcow_header(3)), Probed::Qcow2);
}

#[test]
fn qcow2_magic_with_bad_versions_is_left_to_the_qcow2_driver() {
    for v in [0, 4, 0xffff, 0xffff_ffff] {
        assert_eq!(probe_bytes(&qcow_header(v)), Probed::Qcow2, "version {v}");
    }
}

#[test]
fn qcow_version_1() {
    assert_eq!(probe_bytes(&qcow_header(1)), foreign("qcow"));
    // The version check is big-endian.
    let mut h = qcow_header(0);
    h[4..8].copy_from_slice(&1u32.to_le_bytes());
    assert_eq!(probe_bytes(&h), Probed::Qcow2);
}

#[test]
fn truncated_qcow2_is_still_qcow2() {
    for len in 4..104 {
        assert_eq!(probe_bytes(&qcow_header(3)[..len]), Probed::Qcow2, "{len}");
    }
    // Cut inside the version of a qcow v1 header: the bytes past the end
    // read as zeros, so the version is no longer 1.
    assert_eq!(probe_bytes(&qcow_header(1)[..7]), Probed::Qcow2);
    assert_eq!(probe_bytes(&qcow_header(1)[..8]), foreign("qcow"));
}

#[test]
fn qcow2_magic_near_misses_are_raw() {
    for magic in [b"QFI\xfa", b"QFJ\xfb", b"qfi\xfb", b"\xfbIFQ"] {
        let mut h = qcow_header(3);
        h[..4].copy_from_slice(magic);
        assert_eq!(probe_bytes(&h), Probed::Raw, "{magic:?}");
    }
    assert_eq!(probe_bytes(b"QFI"), Probed::Raw);
    // The magic must be at offset 0.
    assert_eq!(
        probe_bytes(&image(512, &[(1, b"QFI\xfb\0\0\0\x03")])),
        Probed::Raw
    );
}

// -----------------------------------------------------------------
// VMDK
// -----------------------------------------------------------------

#[test]
fn vmdk_binary_magics() {
    assert_eq!(
        probe_bytes(&image(512, &[(0, b"KDMV\x01\0\0\0")])),
        foreign("vmdk")
    );
    assert_eq!(
        probe_bytes(&image(512, &[(0, b"COWD\x01\0\0\0")])),
        foreign("vmdk")
    );
    // Even truncated to the magic alone.
    assert_eq!(probe_bytes(b"KDMV"), foreign("vmdk"));
    // Byte order matters: these are the little-endian readings.
    assert_eq!(probe_bytes(&image(512, &[(0, b"VMDK")])), Probed::Raw);
    assert_eq!(probe_bytes(&image(512, &[(0, b"DWOC")])), Probed::Raw);
}

/// What `qemu-img create -f vmdk -o subformat=twoGbMaxExtentSparse` writes.
const DESCRIPTOR: &str = "# Disk DescriptorFile\nversion=1\nCID=52c05a2e\n\
    parentCID=ffffffff\ncreateType=\"twoGbMaxExtentSparse\"\n\n\
    # Extent description\nRW 8192 SPARSE \"d-s001.vmdk\"\n";

#[test]
fn vmdk_descriptor_text() {
    assert_eq!(probe_bytes(DESCRIPTOR.as_bytes()), foreign("vmdk"));
    for v in ["1", "2", "3"] {
        let lf = format!("version={v}\nCID=1\n");
        assert_eq!(probe_bytes(lf.as_bytes()), foreign("vmdk"), "{lf:?}");
        let crlf = format!("# Disk DescriptorFile\r\nversion={v}\r\n");
        assert_eq!(probe_bytes(crlf.as_bytes()), foreign("vmdk"), "{crlf:?}");
    }
}

#[test]
fn vmdk_descriptor_comments_and_blank_lines_before_version() {
    let text = "# one\n#two\n    \n \r\n#\nversion=2\n";
    assert_eq!(probe_bytes(text.as_bytes()), foreign("vmdk"));
    // A comment may contain anything, up to its newline.
    let text = "# \x01\x02 Ω \r stuff\nversion=3\n";
    assert_eq!(probe_bytes(text.as_bytes()), foreign("vmdk"));
    // The version line alone, ending exactly at the end of the file.
    assert_eq!(probe_bytes(b"version=1\n"), foreign("vmdk"));
}

#[test]
fn vmdk_descriptor_near_misses_are_raw() {
    for text in [
        "version=4\n",
        "version=0\n",
        "Version=1\n",
        "version = 1\n",
        "version=1 \n",
        "version=1",
        "version=1\r",
        "version=12\n",
        // An empty line (no spaces) stops the search.
        "\nversion=1\n",
        "\r\nversion=1\n",
        // So does a tab, or text after spaces.
        "\tversion=1\n",
        "  version=1\n",
        // Other text first.
        "CID=1\nversion=1\n",
        "createType=\"monolithicFlat\"\nversion=1\n",
        // A comment that never ends.
        "# Disk DescriptorFile",
        // Spaces then end of file.
        "   ",
        " \r",
    ] {
        assert_eq!(probe_bytes(text.as_bytes()), Probed::Raw, "{text:?}");
    }
}

#[test]
fn vmdk_descriptor_is_judged_on_the_first_512_bytes_only() {
    // QEMU sees 512 bytes: a version line that starts later is not seen.
    let mut text = format!("#{}\n", "x".repeat(510));
    assert_eq!(text.len(), 512);
    text.push_str("version=1\n");
    assert_eq!(probe_bytes(text.as_bytes()), Probed::Raw);
    // One byte less of comment and the line starts at 511: only
    // "v" is in the window.
    let text = format!("#{}\nversion=1\n", "x".repeat(509));
    assert_eq!(probe_bytes(text.as_bytes()), Probed::Raw);
    // A version line that fits entirely within 512 bytes counts.
    let text = format!("#{}\nversion=1\n", "x".repeat(499));
    assert_eq!(text.len(), 511);
    assert_eq!(probe_bytes(text.as_bytes()), foreign("vmdk"));
    // The head passed in may be longer than HEAD_BYTES: the rest is
    // ignored.
    let mut long = format!("#{}\n", "x".repeat(510)).into_bytes();
    long.extend_from_slice(b"version=1\n");
    assert_eq!(probe(&long, &[], None), Probed::Raw);
}

// -----------------------------------------------------------------
// VHDX, VPC, QED, VDI
// -----------------------------------------------------------------

#[test]
fn vhdx() {
    let h = image(1024, &[(0, b"vhdxfile"), (8, "QEMU".as_bytes())]);
    assert_eq!(probe_bytes(&h), foreign("vhdx"));
    assert_eq!(probe_bytes(&image(512, &[(0, b"vhdxfilf")])), Probed::Raw);
    assert_eq!(probe_bytes(&image(512, &[(0, b"VHDXFILE")])), Probed::Raw);
    assert_eq!(probe_bytes(b"vhdxfil"), Probed::Raw);
}

#[test]
fn vpc_dynamic() {
    let h = image(1024, &[(0, b"conectix\0\0\0\x02")]);
    assert_eq!(probe_bytes(&h), foreign("vpc"));
    assert_eq!(probe_bytes(&image(512, &[(0, b"conectiX")])), Probed::Raw);
    assert_eq!(probe_bytes(b"conecti"), Probed::Raw);
}

#[test]
fn vpc_fixed_footer_only_at_the_end_is_raw_as_in_qemu() {
    let mut v = vec![0u8; 4096];
    v[4096 - 512..4096 - 504].copy_from_slice(b"conectix");
    assert_eq!(probe_bytes(&v), Probed::Raw);
    assert_eq!(probe_file(&v, "disk.vhd"), Probed::Raw);
}

#[test]
fn qed() {
    let h = image(4096, &[(0, b"QED\0"), (4, &65536u32.to_le_bytes())]);
    assert_eq!(probe_bytes(&h), foreign("qed"));
    assert_eq!(probe_bytes(&image(512, &[(0, b"QED\x01")])), Probed::Raw);
    assert_eq!(probe_bytes(&image(512, &[(0, b"\0DEQ")])), Probed::Raw);
    // Three bytes of magic; the fourth (NUL) is past the end, as zero.
    assert_eq!(probe_bytes(b"QED"), foreign("qed"));
}

#[test]
fn vdi() {
    assert_eq!(probe_bytes(&vdi_header(0x40)), foreign("vdi"));
    // The text field is free-form: the signature alone decides.
    assert_eq!(
        probe_bytes(&image(512, &[(0x40, &0xbeda_107fu32.to_le_bytes())])),
        foreign("vdi")
    );
    // Signature at the wrong offset, or big-endian: raw.
    for at in [0x3c, 0x3f, 0x41, 0x44, 0] {
        assert_eq!(probe_bytes(&vdi_header(at)), Probed::Raw, "at {at:#x}");
    }
    let be = image(512, &[(0x40, &0xbeda_107fu32.to_be_bytes())]);
    assert_eq!(probe_bytes(&be), Probed::Raw);
    // A short file padded with zeros still has the signature.
    assert_eq!(probe_bytes(&vdi_header(0x40)[..0x44]), foreign("vdi"));
    assert_eq!(probe_bytes(&vdi_header(0x40)[..0x43]), Probed::Raw);
}

// -----------------------------------------------------------------
// Parallels, Bochs, LUKS
// -----------------------------------------------------------------

#[test]
fn parallels_both_magics_version_2() {
    assert_eq!(
        probe_bytes(&parallels_header(b"WithoutFreeSpace", 2)),
        foreign("parallels")
    );
    assert_eq!(
        probe_bytes(&parallels_header(b"WithouFreSpacExt", 2)),
        foreign("parallels")
    );
}

#[test]
fn parallels_near_misses_are_raw() {
    for v in [0, 1, 3, 0x0200_0000] {
        assert_eq!(
            probe_bytes(&parallels_header(b"WithoutFreeSpace", v)),
            Probed::Raw,
            "{v}"
        );
    }
    for m in [
        b"WithoutFreeSpacE",
        b"WithouFreSpacEx\0",
        b"withoutfreespace",
    ] {
        assert_eq!(probe_bytes(&parallels_header(m, 2)), Probed::Raw, "{m:?}");
    }
    // Magic alone, the version cut off (reads as zero).
    assert_eq!(probe_bytes(b"WithoutFreeSpace"), Probed::Raw);
    assert_eq!(probe_bytes(b"WithoutFreeSpace\x02"), foreign("parallels"));
}

const BOCHS: &[u8] = b"Bochs Virtual HD Image";

#[test]
fn bochs_growing_redolog_v1_and_v2() {
    for v in [0x0001_0000, 0x0002_0000] {
        let h = bochs_header(BOCHS, b"Redolog", b"Growing", v);
        assert_eq!(probe_bytes(&h), foreign("bochs"), "version {v:#x}");
    }
}

#[test]
fn bochs_near_misses_are_raw() {
    /// Magic, type, subtype, version.
    type Case<'a> = (&'a [u8], &'a [u8], &'a [u8], u32);
    let v2 = 0x0002_0000;
    let cases: [Case; 8] = [
        (BOCHS, b"Redolog", b"Undoable", v2),
        (BOCHS, b"Redolog", b"Volatile", v2),
        (BOCHS, b"Redolog", b"Growing", 0x0003_0000),
        (BOCHS, b"Redolog", b"Growing", 0x0000_0002),
        (BOCHS, b"redolog", b"Growing", v2),
        (b"Bochs Virtual HD Imag", b"Redolog", b"Growing", v2),
        // Not NUL-terminated where the string ends.
        (b"Bochs Virtual HD Images", b"Redolog", b"Growing", v2),
        (BOCHS, b"Redologs", b"Growing", v2),
    ];
    for (magic, kind, subtype, version) in cases {
        let h = bochs_header(magic, kind, subtype, version);
        assert_eq!(
            probe_bytes(&h),
            Probed::Raw,
            "{:?} {:?} {:?} {version:#x}",
            String::from_utf8_lossy(magic),
            String::from_utf8_lossy(kind),
            String::from_utf8_lossy(subtype)
        );
    }
    // A 32-byte magic field with no NUL at all.
    let mut h = bochs_header(BOCHS, b"Redolog", b"Growing", v2);
    h[22..32].fill(b'!');
    assert_eq!(probe_bytes(&h), Probed::Raw);
}

#[test]
fn luks() {
    assert_eq!(probe_bytes(&luks_header(1)), foreign("luks"));
    assert_eq!(probe_bytes(&luks_header(2)), foreign("luks"));
    for v in [0u16, 3, 0x0100, 0xffff] {
        assert_eq!(probe_bytes(&luks_header(v)), Probed::Raw, "version {v:#x}");
    }
    let mut h = luks_header(1);
    h[5] = 0xbf;
    assert_eq!(probe_bytes(&h), Probed::Raw);
    // The version cut off reads as zero.
    assert_eq!(probe_bytes(b"LUKS\xba\xbe"), Probed::Raw);
}

// -----------------------------------------------------------------
// cloop, DMG
// -----------------------------------------------------------------

#[test]
fn cloop() {
    let h = image(1024, &[(0, CLOOP_HEADER), (128, &65536u32.to_be_bytes())]);
    assert_eq!(probe_bytes(&h), foreign("cloop"));
    // Every byte of the script matters.
    let n = CLOOP_V2_HEADER.len();
    assert_eq!(probe_bytes(&h[..n]), foreign("cloop"));
    assert_eq!(probe_bytes(&h[..n - 1]), Probed::Raw);
    let mut v1 = h.clone();
    v1[13] = b'1'; // "#V2.0" -> "#V1.0"
    assert_eq!(probe_bytes(&v1), Probed::Raw);
    assert_eq!(probe_bytes(b"#!/bin/sh\necho hello\n"), Probed::Raw);
}

#[test]
fn dmg_by_name() {
    let body = noise_free_body();
    assert_eq!(probe_file(&body, "disk.dmg"), foreign("dmg"));
    assert_eq!(probe_file(&body, "/some/dir/x.dmg"), foreign("dmg"));
    assert_eq!(probe_file(&body, "a.dmg"), foreign("dmg"));
    // QEMU wants more than the suffix, and it is case-sensitive.
    for name in [
        ".dmg",
        "dmg",
        "disk.DMG",
        "disk.dmg.raw",
        "disk.dmgx",
        "disk_dmg",
    ] {
        assert_eq!(probe_file(&body, name), Probed::Raw, "{name}");
    }
    // An empty file is raw whatever its name.
    assert_eq!(probe_file(&[], "disk.dmg"), Probed::Raw);
}

/// 2 KiB of zeros with a text line: raw content.
fn noise_free_body() -> Vec<u8> {
    image(2048, &[(0, b"hello, world\n")])
}

#[cfg(unix)]
#[test]
fn dmg_by_non_utf8_name() {
    use std::os::unix::ffi::OsStrExt;
    let name = OsStr::from_bytes(b"\xff\xfe.dmg");
    assert_eq!(probe(b"x", b"x", Some(name)), foreign("dmg"));
    let name = OsStr::from_bytes(b"\xff\xfe.raw");
    assert_eq!(probe(b"x", b"x", Some(name)), Probed::Raw);
}

#[test]
fn content_beats_the_dmg_name() {
    assert_eq!(probe_file(&qcow_header(3), "disk.dmg"), Probed::Qcow2);
    assert_eq!(probe_file(&qcow_header(1), "disk.dmg"), foreign("qcow"));
    assert_eq!(
        probe_file(DESCRIPTOR.as_bytes(), "disk.dmg"),
        foreign("vmdk")
    );
    assert_eq!(probe_file(&vdi_header(0x40), "disk.dmg"), foreign("vdi"));
}

#[test]
fn dmg_by_udif_trailer() {
    for len in [512, 513, 4096, 19479] {
        let v = udif(len, b"koly", 4, 512);
        assert_eq!(probe_bytes(&v), foreign("dmg"), "len {len}");
        assert_eq!(probe_file(&v, "image.raw"), foreign("dmg"), "len {len}");
    }
}

#[test]
fn udif_near_misses_are_raw() {
    for (magic, version, size) in [
        (b"koly", 3, 512),
        (b"koly", 4, 511),
        (b"Koly", 4, 512),
        (b"ylok", 4, 512),
    ] {
        let v = udif(4096, magic, version, size);
        assert_eq!(probe_bytes(&v), Probed::Raw, "{magic:?} {version} {size}");
    }
    // Little-endian fields.
    let mut v = udif(4096, b"koly", 0, 0);
    v[4096 - 508..4096 - 504].copy_from_slice(&4u32.to_le_bytes());
    v[4096 - 504..4096 - 500].copy_from_slice(&512u32.to_le_bytes());
    assert_eq!(probe_bytes(&v), Probed::Raw);
    // The trailer must be the last 512 bytes: one byte more after it.
    let mut v = udif(4096, b"koly", 4, 512);
    v.push(0);
    assert_eq!(probe_bytes(&v), Probed::Raw);
    // A tail shorter than 512 bytes cannot hold a trailer.
    let v = udif(4096, b"koly", 4, 512);
    assert_eq!(probe(&v[..512], &v[4096 - 511..], None), Probed::Raw);
}

// -----------------------------------------------------------------
// Raw
// -----------------------------------------------------------------

#[test]
fn empty_input_is_raw() {
    assert_eq!(probe(&[], &[], None), Probed::Raw);
    assert_eq!(probe(&[], &[], Some(OsStr::new(""))), Probed::Raw);
}

#[test]
fn zeros_are_raw() {
    for len in [1, 4, 511, 512, 513, 4096] {
        assert_eq!(probe_bytes(&vec![0u8; len]), Probed::Raw, "{len}");
    }
}

#[test]
fn random_bytes_are_raw() {
    for seed in 0..2000 {
        let v = noise(4096, seed);
        assert_eq!(probe_bytes(&v), Probed::Raw, "seed {seed}");
        assert_eq!(probe_file(&v, "disk.img"), Probed::Raw, "seed {seed}");
    }
}

#[test]
fn mbr_boot_sector_is_raw() {
    // A GRUB-like MBR: a jump, code, one partition entry, 0x55aa.
    let mut mbr = image(
        1 << 20,
        &[
            (
                0,
                b"\xeb\x63\x90\x10\x8e\xd0\xbc\x00\xb0\xb8\x00\x00\x8e\xd8\x8e\xc0",
            ),
            (0x180, b"GRUB \0Geom\0Hard Disk\0Read\0 Error\r\n"),
            (
                446,
                b"\x80\x20\x21\x00\x83\xfe\xff\xff\x00\x08\x00\x00\x00\xf8\x0f\x00",
            ),
            (510, b"\x55\xaa"),
        ],
    );
    assert_eq!(probe_bytes(&mbr), Probed::Raw);
    assert_eq!(probe_bytes(&mbr[..512]), Probed::Raw);
    // A GPT disk: protective MBR, "EFI PART" at 512 and at the end.
    mbr[512..520].copy_from_slice(b"EFI PART");
    let end = mbr.len() - 512;
    mbr[end..end + 8].copy_from_slice(b"EFI PART");
    assert_eq!(probe_bytes(&mbr), Probed::Raw);
}

#[test]
fn text_files_are_raw() {
    for text in [
        "hello\n",
        "#!/bin/sh\necho hi\n",
        "# a comment\nsomething else\n",
        "<?xml version=\"1.0\"?>\n<plist/>\n",
        "version: 1\n",
        " leading space then text\n",
    ] {
        assert_eq!(probe_bytes(text.as_bytes()), Probed::Raw, "{text:?}");
    }
}

#[test]
fn short_inputs_never_panic() {
    let headers: Vec<Vec<u8>> = vec![
        qcow_header(1),
        qcow_header(3),
        DESCRIPTOR.as_bytes().to_vec(),
        image(512, &[(0, b"KDMV")]),
        image(512, &[(0, b"vhdxfile")]),
        image(512, &[(0, b"conectix")]),
        image(512, &[(0, b"QED\0")]),
        vdi_header(0x40),
        parallels_header(b"WithoutFreeSpace", 2),
        bochs_header(BOCHS, b"Redolog", b"Growing", 0x0002_0000),
        luks_header(1),
        image(512, &[(0, CLOOP_HEADER)]),
        udif(1024, b"koly", 4, 512),
        noise(1024, 7),
    ];
    for h in &headers {
        for cut in 0..=h.len().min(HEAD_BYTES + 8) {
            let part = &h[..cut];
            // Head and tail of every length, and mismatched ones.
            let _ = probe(part, part, None);
            let _ = probe(part, &[], Some(OsStr::new("x.dmg")));
            let _ = probe(&[], part, None);
            let _ = probe(part, &h[h.len() - cut..], Some(OsStr::new("")));
            let _ = probe_bytes(part);
        }
    }
}

#[test]
fn head_longer_than_head_bytes_is_accepted() {
    let mut v = vdi_header(0x40);
    v.extend_from_slice(&[0xaa; 8192]);
    assert_eq!(probe(&v, &v[v.len() - 512..], None), foreign("vdi"));
}
