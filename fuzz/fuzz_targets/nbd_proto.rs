//! NBD wire decoders on their own: byte 0 picks one, the rest is its
//! input. Each must return a value or an error, and what it decodes must
//! keep its documented shape.
#![no_main]

use qbackup_formats::nbd::proto::{self, OptionReplyHeader};

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let Some((&sel, p)) = data.split_first() else {
        return;
    };
    match sel % 8 {
        0 => {
            if let Ok(b) = <&[u8; OptionReplyHeader::SIZE]>::try_from(p) {
                let _ = OptionReplyHeader::decode(b);
            }
        }
        1 => {
            let _ = proto::decode_info(p);
        }
        2 => {
            if let Ok((_, name)) = proto::decode_meta_context(p) {
                assert!(name.len() <= proto::MAX_STRING);
            }
        }
        3 => {
            if p.len() >= 4 {
                let magic = u32::from_be_bytes([p[0], p[1], p[2], p[3]]);
                let _ = proto::decode_reply_header(magic, &p[4..]);
            }
        }
        4 => {
            if p.len() >= 2 {
                let kind = u16::from_be_bytes([p[0], p[1]]);
                if let Ok(e) = proto::decode_error_chunk(kind, &p[2..]) {
                    assert!(e.errno != 0);
                }
            }
        }
        5 => {
            if let Ok((_, size)) = proto::decode_offset_hole(p) {
                assert!(size > 0);
            }
        }
        6 | 7 => {
            if let Ok((_, descs)) = proto::decode_block_status(sel % 8 == 7, p) {
                assert!(!descs.is_empty() && descs.iter().all(|&(n, _)| n > 0));
            }
        }
        _ => unreachable!(),
    }
    let _ = proto::sanitize(p);
});
