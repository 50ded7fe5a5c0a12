//! Sizes and offsets written the way qemu-img reads them (its
//! `qemu_strtosz`): a decimal or `0x` hex number, an optional fraction
//! before a unit, and an optional unit b, k, M, G, T, P, E (powers of 1024,
//! any case). Values run from 0 to `i64::MAX`, as in qemu-img. Every size
//! option uses this parser. And sizes as the CLI shows them ([`human`]).

/// A byte count as every CLI message shows it: binary units with two
/// decimals ("3.00 MiB"), plain bytes below 1 KiB ("512 B"); the same as
/// the progress bar and the result line.
pub fn human(bytes: u64) -> String {
    indicatif::BinaryBytes(bytes).to_string()
}

/// Parses `s`; `what` names the option for the error message.
pub fn parse_qemu_size(s: &str, what: &str) -> Result<u64, String> {
    let invalid = || format!("invalid {what} '{s}'");
    let t = s.trim_start();
    let (digits_end, radix) = if let Some(hex) = t.strip_prefix("0x").or(t.strip_prefix("0X")) {
        (
            2 + hex
                .find(|c: char| !c.is_ascii_hexdigit())
                .unwrap_or(hex.len()),
            16,
        )
    } else {
        (t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len()), 10)
    };
    let int_text = if radix == 16 {
        &t[2..digits_end]
    } else {
        &t[..digits_end]
    };
    if int_text.is_empty() {
        return Err(invalid());
    }
    let int = u128::from_str_radix(int_text, radix).map_err(|_| invalid())?;
    let mut rest = &t[digits_end..];
    // A fraction only in decimal, and only before a unit other than bytes.
    let mut frac: Option<&str> = None;
    if radix == 10 {
        if let Some(r) = rest.strip_prefix('.') {
            let end = r.find(|c: char| !c.is_ascii_digit()).unwrap_or(r.len());
            frac = Some(&r[..end]);
            rest = &r[end..];
        }
    }
    let shift = match rest {
        "" => 0,
        u if u.len() == 1 => match u.to_ascii_lowercase().as_str() {
            "b" => 0,
            "k" => 10,
            "m" => 20,
            "g" => 30,
            "t" => 40,
            "p" => 50,
            "e" => 60,
            _ => return Err(invalid()),
        },
        _ => return Err(invalid()),
    };
    let mult = 1u128 << shift;
    let mut value = int.checked_mul(mult).ok_or_else(invalid)?;
    if let Some(f) = frac {
        if shift == 0 {
            return Err(invalid());
        }
        // Enough digits for any fraction of 2^60 bytes; more do not count.
        let f = &f[..f.len().min(20)];
        if !f.is_empty() {
            let num: u128 = f.parse().map_err(|_| invalid())?;
            value += num * mult / 10u128.pow(f.len() as u32);
        }
    }
    if value > i64::MAX as u128 {
        return Err(format!(
            "{what} '{s}' is too large: it must be between 0 and {}",
            i64::MAX
        ));
    }
    Ok(value as u64)
}

#[cfg(test)]
mod tests {
    use super::{human, parse_qemu_size};

    #[test]
    fn human_sizes() {
        assert_eq!(human(512), "512 B");
        assert_eq!(human(3 << 20), "3.00 MiB");
        assert_eq!(human(1536), "1.50 KiB");
    }

    fn p(s: &str) -> Option<u64> {
        parse_qemu_size(s, "offset").ok()
    }

    #[test]
    fn like_qemu_strtosz() {
        assert_eq!(p("0"), Some(0));
        assert_eq!(p("700k"), Some(716800));
        assert_eq!(p("1.5K"), Some(1536));
        assert_eq!(p("0.5M"), Some(524288));
        assert_eq!(p("1.0000000001k"), Some(1024));
        assert_eq!(p("0x400"), Some(1024));
        assert_eq!(p(" 5"), Some(5));
        assert_eq!(p("5B"), Some(5));
        assert_eq!(p("1E"), Some(1 << 60));
        assert_eq!(p("9223372036854775807"), Some(i64::MAX as u64));
        for bad in [
            "",
            "1.5",
            "1e3",
            "-1",
            "abc",
            "7.5b",
            "8E",
            "9223372036854775808",
            "5 k",
            "1kk",
        ] {
            assert_eq!(p(bad), None, "{bad:?}");
        }
    }
}
