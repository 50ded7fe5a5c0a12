//! Wire encoding and decoding against hand-built bytes.

use super::*;

#[test]
fn option_encoding() {
    let b = encode_option(OPT_STRUCTURED_REPLY, &[]);
    assert_eq!(b, b"IHAVEOPT\0\0\0\x08\0\0\0\0");
    let go = go_data("ab", &[INFO_BLOCK_SIZE]);
    assert_eq!(go, [0, 0, 0, 2, b'a', b'b', 0, 1, 0, 3]);
    let meta = meta_context_data("", &["base:allocation".to_string()]);
    let mut want = vec![0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 15];
    want.extend_from_slice(b"base:allocation");
    assert_eq!(meta, want);
}

#[test]
fn option_reply_header() {
    let mut b = [0u8; 20];
    b[..8].copy_from_slice(&REP_MAGIC.to_be_bytes());
    b[8..12].copy_from_slice(&OPT_GO.to_be_bytes());
    b[12..16].copy_from_slice(&REP_ERR_UNKNOWN.to_be_bytes());
    b[16..20].copy_from_slice(&7u32.to_be_bytes());
    let h = OptionReplyHeader::decode(&b).unwrap();
    assert_eq!(
        h,
        OptionReplyHeader {
            option: OPT_GO,
            reply: REP_ERR_UNKNOWN,
            len: 7
        }
    );
    b[0] = 1;
    assert!(matches!(
        OptionReplyHeader::decode(&b),
        Err(NbdError::Protocol { .. })
    ));
}

#[test]
fn infos() {
    let export = [0, 0, 0, 0, 0, 0, 0, 0x10, 0, 0, 0x01, 0x03];
    assert_eq!(
        decode_info(&export).unwrap(),
        Info::Export {
            size: 1 << 20,
            flags: 0x103
        }
    );
    let bs = [0, 3, 0, 0, 2, 0, 0, 0, 0x10, 0, 0x02, 0, 0, 0];
    assert_eq!(
        decode_info(&bs).unwrap(),
        Info::BlockSize {
            min: 512,
            preferred: 4096,
            max: 32 << 20
        }
    );
    assert_eq!(decode_info(&[0, 1, b'x']).unwrap(), Info::Other(1));
    assert!(decode_info(&export[..11]).is_err());
    assert!(decode_info(&[0]).is_err());
    assert!(check_block_sizes(1, 4096, 32 << 20).is_ok());
    assert!(check_block_sizes(512, 4096, u32::MAX).is_ok());
    assert!(check_block_sizes(3, 4096, 32 << 20).is_err());
    assert!(check_block_sizes(512, 256, 32 << 20).is_err());
    assert!(check_block_sizes(512, 4096, 1000).is_err());
    assert!(check_block_sizes(1 << 17, 1 << 17, 1 << 20).is_err());
}

#[test]
fn meta_context() {
    let mut p = vec![0, 0, 0, 9];
    p.extend_from_slice(b"base:allocation");
    assert_eq!(
        decode_meta_context(&p).unwrap(),
        (9, "base:allocation".to_string())
    );
    assert!(decode_meta_context(&p[..4]).is_err());
    assert!(decode_meta_context(&[0, 0, 0, 1, 0xff]).is_err());
}

#[test]
fn requests() {
    let r = Request {
        flags: CMD_FLAG_REQ_ONE,
        command: CMD_BLOCK_STATUS,
        cookie: 0x0102_0304_0506_0708,
        offset: 0x1000,
        len: 0x200,
    };
    let compact = r.encode(false).unwrap();
    assert_eq!(
        compact,
        [
            0x25, 0x60, 0x95, 0x13, 0, 8, 0, 7, 1, 2, 3, 4, 5, 6, 7, 8, 0, 0, 0, 0, 0, 0, 0x10, 0,
            0, 0, 2, 0
        ]
    );
    let ext = r.encode(true).unwrap();
    assert_eq!(ext.len(), 32);
    assert_eq!(&ext[..4], &[0x21, 0xe4, 0x1c, 0x71]);
    assert_eq!(&ext[24..], &[0, 0, 0, 0, 0, 0, 2, 0]);
    let big = Request { len: 1 << 32, ..r };
    assert!(big.encode(false).is_err());
    assert!(big.encode(true).is_ok());
}

#[test]
fn reply_headers() {
    let simple = [0, 0, 0, 5, 0, 0, 0, 0, 0, 0, 0, 42];
    assert_eq!(reply_rest_len(SIMPLE_REPLY_MAGIC), Some(12));
    assert_eq!(
        decode_reply_header(SIMPLE_REPLY_MAGIC, &simple).unwrap(),
        ReplyHeader::Simple {
            error: 5,
            cookie: 42
        }
    );
    let structured = [0, 1, 0, 2, 0, 0, 0, 0, 0, 0, 0, 7, 0, 0, 0, 12];
    let h = decode_reply_header(STRUCTURED_REPLY_MAGIC, &structured).unwrap();
    assert_eq!(
        h,
        ReplyHeader::Chunk(ChunkHeader {
            flags: REPLY_FLAG_DONE,
            kind: REPLY_TYPE_OFFSET_HOLE,
            cookie: 7,
            offset: None,
            len: 12
        })
    );
    let mut ext = vec![0, 0, 0, 6, 0, 0, 0, 0, 0, 0, 0, 9];
    ext.extend_from_slice(&4096u64.to_be_bytes());
    ext.extend_from_slice(&24u64.to_be_bytes());
    match decode_reply_header(EXTENDED_REPLY_MAGIC, &ext).unwrap() {
        ReplyHeader::Chunk(c) => {
            assert!(!c.done());
            assert_eq!(c.kind, REPLY_TYPE_BLOCK_STATUS_EXT);
            assert_eq!(c.offset, Some(4096));
            assert_eq!(c.len, 24);
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(reply_rest_len(0xdead_beef), None);
    assert!(decode_reply_header(0xdead_beef, &[]).is_err());
}

#[test]
fn error_chunks() {
    let mut p = vec![0, 0, 0, 5, 0, 3];
    p.extend_from_slice(b"bad");
    let e = decode_error_chunk(REPLY_TYPE_ERROR, &p).unwrap();
    assert_eq!(
        e,
        ErrorChunk {
            errno: 5,
            message: "bad".into(),
            offset: None
        }
    );
    let mut po = p.clone();
    po.extend_from_slice(&512u64.to_be_bytes());
    let e = decode_error_chunk(REPLY_TYPE_ERROR_OFFSET, &po).unwrap();
    assert_eq!(e.offset, Some(512));
    // Message longer than the payload.
    assert!(decode_error_chunk(REPLY_TYPE_ERROR, &[0, 0, 0, 5, 0, 9, b'x']).is_err());
    // ERROR_OFFSET without its offset.
    assert!(decode_error_chunk(REPLY_TYPE_ERROR_OFFSET, &p).is_err());
    // Error value 0.
    assert!(decode_error_chunk(REPLY_TYPE_ERROR, &[0, 0, 0, 0, 0, 0]).is_err());
    // Unknown error type: extra fields allowed.
    let e = decode_error_chunk(0x8063, &[0, 0, 0, 22, 0, 0, 1, 2]).unwrap();
    assert_eq!(e.errno, EINVAL);
    // Control characters do not reach messages.
    let e = decode_error_chunk(REPLY_TYPE_ERROR, &[0, 0, 0, 5, 0, 3, b'a', b'\n', b'b']).unwrap();
    assert_eq!(e.message, "a b");
}

#[test]
fn holes_and_data() {
    let mut p = 8192u64.to_be_bytes().to_vec();
    p.extend_from_slice(&4096u32.to_be_bytes());
    assert_eq!(decode_offset_hole(&p).unwrap(), (8192, 4096));
    assert!(decode_offset_hole(&p[..11]).is_err());
    p[8..].copy_from_slice(&[0; 4]);
    assert!(decode_offset_hole(&p).is_err());
    assert_eq!(decode_data_offset(&[0, 0, 0, 0, 0, 0, 1, 0]), 256);
}

#[test]
fn block_status() {
    let p = [
        0, 0, 0, 1, 0, 0, 0x10, 0, 0, 0, 0, 3, 0, 0, 0x20, 0, 0, 0, 0, 0,
    ];
    assert_eq!(
        decode_block_status(false, &p).unwrap(),
        (1, vec![(4096, 3), (8192, 0)])
    );
    assert!(decode_block_status(false, &p[..4]).is_err());
    assert!(decode_block_status(false, &p[..10]).is_err());
    let zero = [0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 3];
    assert!(decode_block_status(false, &zero).is_err());

    let mut e = vec![0, 0, 0, 2, 0, 0, 0, 1];
    e.extend_from_slice(&(5u64 << 32).to_be_bytes());
    e.extend_from_slice(&1u64.to_be_bytes());
    assert_eq!(
        decode_block_status(true, &e).unwrap(),
        (2, vec![(5 << 32, 1)])
    );
    e[7] = 2;
    assert!(decode_block_status(true, &e).is_err());
}

#[test]
fn names() {
    assert_eq!(opt_name(OPT_GO), "NBD_OPT_GO");
    assert_eq!(rep_name(REP_ERR_POLICY), "NBD_REP_ERR_POLICY");
    assert_eq!(rep_name(0x8000_0063), "option reply type 0x80000063");
    assert_eq!(errno_name(9999), "error 9999");
    assert_eq!(sanitize(b"\xff ok \x07"), "\u{fffd} ok");
}
