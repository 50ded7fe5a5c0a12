//! `qbackup compare` of raw files whose size is not a multiple of 512
//! (issue 19): QEMU reads them sector-rounded, zeros after the end, and
//! qemu-img names the first differing 512-byte block counted from the
//! start of its chunk, which for the part past the file's end is the end
//! itself. Each pair is compared by both tools: same stdout, same status.

mod common;

use common::oracle::qemu_img_status;
use common::run::qbackup_in;
use common::scratch::Scratch;

/// `len` bytes of `fill`, with `fill ^ 0x5a` at each of `flips`.
fn file(s: &Scratch, name: &str, len: usize, fill: u8, flips: &[usize]) {
    let mut bytes = vec![fill; len];
    for &at in flips {
        bytes[at] ^= 0x5a;
    }
    s.write_file(name, &bytes);
}

fn assert_same_as_qemu(s: &Scratch, what: &str) {
    let args = ["compare", "-f", "raw", "-F", "raw", "a", "b"];
    let ours = qbackup_in(s.dir(), &args);
    let (code, text) = qemu_img_status(s.dir(), &args);
    ours.assert_no_panic();
    assert_eq!(
        (ours.code, ours.stdout.as_str()),
        (code, text.as_str()),
        "{what}\n{}",
        ours.describe()
    );
}

#[test]
fn equal_odd_sizes_differing_anywhere() {
    let s = Scratch::new();
    for len in [1000usize, 1500, 513, 4097, 70000] {
        for at in [0usize, 511, 512, 900, 999, 1499, 4096, 69999] {
            if at >= len {
                continue;
            }
            file(&s, "a", len, b'a', &[]);
            file(&s, "b", len, b'a', &[at]);
            assert_same_as_qemu(&s, &format!("{len} bytes, differing at {at}"));
        }
    }
}

#[test]
fn different_odd_sizes() {
    let s = Scratch::new();
    // (length of a, length of b, bytes of b flipped)
    let cases: &[(usize, usize, &[usize])] = &[
        // Equal up to a's end: the difference is b's data past it, which
        // qemu-img reports at a's end (its chunk starts there).
        (1000, 1500, &[]),
        (1500, 1000, &[]),
        (1000, 1024, &[]),
        (1000, 5000, &[]),
        (4097, 9000, &[]),
        // Differences inside the common part: no size warning.
        (1000, 1500, &[100]),
        (1000, 1500, &[700]),
        // Differences in the longer one's tail only.
        (1000, 1500, &[1200]),
        (1000, 1500, &[1499]),
        (1000, 5000, &[4500]),
    ];
    for &(la, lb, flips) in cases {
        file(&s, "a", la, b'a', &[]);
        file(&s, "b", lb, b'a', flips);
        assert_same_as_qemu(
            &s,
            &format!("{la} against {lb} bytes, b flipped at {flips:?}"),
        );
    }
    // Zeros past the shorter end: the same data.
    file(&s, "a", 1000, 0, &[]);
    file(&s, "b", 3000, 0, &[]);
    assert_same_as_qemu(&s, "zeros of 1000 and 3000 bytes");
    file(&s, "b", 3000, 0, &[2999]);
    assert_same_as_qemu(&s, "zeros, then a byte at 2999");
}
