//! Choosing a backup of a set by disk and point in time (`restore --at`):
//! an id (its first hex digits, at least 4, unambiguous) or a time (the
//! newest backup made at or before it; UTC, `2026-12-02T16:30:00Z`,
//! `2026-12-02 16:30`, `2026-12-02`, or a file name's `20261202T163000Z`);
//! default the newest. A damaged chosen backup is refused with its damage.

use super::catalog::Catalog;
use super::SetError;

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's
/// days-from-civil).
pub fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let m = i64::from(m);
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// A UTC time as seconds since the epoch: `YYYY-MM-DD[(T| )HH:MM[:SS]][Z]`
/// or `YYYYMMDDTHHMMSSZ`. A date alone means its end (23:59:59), so "at
/// 2026-12-02" is the last backup of that day.
pub fn parse_time(s: &str) -> Option<u64> {
    let s = s.trim().trim_end_matches('Z');
    let digits: String = s.chars().filter(char::is_ascii_digit).collect();
    let compact = !s.contains('-');
    if compact && !(s.len() == 15 && s.as_bytes()[8] == b'T') {
        return None;
    }
    if !compact {
        // Every separator where it belongs.
        let ok = s.chars().enumerate().all(|(i, c)| match i {
            4 | 7 => c == '-',
            10 => c == 'T' || c == ' ',
            13 | 16 => c == ':',
            _ => c.is_ascii_digit(),
        });
        if !ok || ![10, 16, 19].contains(&s.len()) {
            return None;
        }
    }
    let n = |a: usize, b: usize| digits.get(a..b).and_then(|x| x.parse::<u32>().ok());
    let (y, mo, d) = (n(0, 4)?, n(4, 6)?, n(6, 8)?);
    let date_only = digits.len() == 8;
    let (h, mi, se) = if date_only {
        (23, 59, 59)
    } else {
        (n(8, 10)?, n(10, 12)?, n(12, 14).unwrap_or(0))
    };
    if !(1..=12).contains(&mo) || !(1..=31).contains(&d) || h > 23 || mi > 59 || se > 60 {
        return None;
    }
    let days = days_from_civil(i64::from(y), mo, d);
    let secs = days * 86_400 + i64::from(h * 3600 + mi * 60 + se);
    u64::try_from(secs).ok()
}

/// The disk to use: `disk`, or the set's only one.
pub fn disk<'a>(cat: &'a Catalog, disk: Option<&'a str>) -> Result<String, SetError> {
    let disks = cat.disks();
    match disk {
        Some(d) => {
            let d = super::layout::component(d);
            if disks.contains(&d) {
                Ok(d)
            } else {
                Err(SetError::NotFound {
                    set: cat.set.clone(),
                    why: format!("no disk named {d} (disks: {})", disks.join(", ")),
                })
            }
        }
        None => match disks.as_slice() {
            [one] => Ok(one.clone()),
            [] => Err(SetError::NotFound {
                set: cat.set.clone(),
                why: "the set has no backups".into(),
            }),
            _ => Err(SetError::NotFound {
                set: cat.set.clone(),
                why: format!(
                    "the set has several disks ({}): name one with --disk",
                    disks.join(", ")
                ),
            }),
        },
    }
}

/// The backup of `disk` that `at` names (`None`: the newest), intact.
pub fn backup(cat: &Catalog, disk: &str, at: Option<&str>) -> Result<usize, SetError> {
    let mine: Vec<usize> = cat
        .of_disk(disk)
        .filter(|(_, b)| b.meta.is_some())
        .map(|(i, _)| i)
        .collect();
    let not_found = |why: String| SetError::NotFound {
        set: cat.set.clone(),
        why,
    };
    let chosen = match at {
        None => *mine
            .iter()
            .max_by_key(|&&i| cat.backups[i].created())
            .ok_or_else(|| not_found(format!("disk {disk} has no backups")))?,
        Some(at) => {
            let is_id = at.len() >= 4 && at.chars().all(|c| c.is_ascii_hexdigit());
            if is_id && parse_time(at).is_none() {
                let at = at.to_ascii_lowercase();
                // Backups whose manifest does not read are matched by the
                // id in their file name, to be refused with their damage.
                let hits: Vec<usize> = cat
                    .of_disk(disk)
                    .filter(|(_, b)| {
                        b.id.starts_with(&at) || (b.meta.is_none() && at.starts_with(&b.id))
                    })
                    .map(|(i, _)| i)
                    .collect();
                match hits.as_slice() {
                    [one] => *one,
                    [] => return Err(not_found(format!("disk {disk} has no backup with id {at}"))),
                    _ => {
                        return Err(not_found(format!(
                            "id {at} is ambiguous ({} backups): give more digits",
                            hits.len()
                        )))
                    }
                }
            } else {
                let t = parse_time(at).ok_or_else(|| {
                    not_found(format!(
                        "--at {at}: neither a backup id nor a UTC time (2026-12-02T16:30:00Z)"
                    ))
                })?;
                *mine
                    .iter()
                    .filter(|&&i| cat.backups[i].created() <= t)
                    .max_by_key(|&&i| cat.backups[i].created())
                    .ok_or_else(|| {
                        not_found(format!("disk {disk} has no backup made at or before {at}"))
                    })?
            }
        }
    };
    let b = &cat.backups[chosen];
    if !b.intact() {
        return Err(SetError::Damaged {
            set: cat.set.clone(),
            why: format!(
                "backup {} cannot be restored: {}",
                b.id,
                b.problems.join("; ")
            ),
        });
    }
    Ok(chosen)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::set::layout::utc_stamp;

    #[test]
    fn times_parse_as_utc() {
        let t = parse_time("2026-12-02T16:20:00Z").unwrap();
        assert_eq!(utc_stamp(t), "20261202T162000Z");
        assert_eq!(parse_time("20261202T162000Z"), Some(t));
        assert_eq!(parse_time("2026-12-02 16:20"), Some(t));
        assert_eq!(
            utc_stamp(parse_time("2026-12-02").unwrap()),
            "20261202T235959Z"
        );
        assert_eq!(parse_time("1970-01-01T00:00:00Z"), Some(0));
        assert_eq!(parse_time("2000-02-29"), Some(951_868_799));
        for bad in [
            "deadbeef",
            "2026-13-01",
            "2026-12-02T25:00",
            "2026/12/02",
            "",
        ] {
            assert_eq!(parse_time(bad), None, "{bad}");
        }
    }

    #[test]
    fn days_round_trip_with_stamps() {
        for days in [0i64, 1, 59, 365, 10_957, 20_789, 47_482] {
            let s = utc_stamp(days as u64 * 86_400);
            let (y, m, d) = (
                s[0..4].parse().unwrap(),
                s[4..6].parse().unwrap(),
                s[6..8].parse().unwrap(),
            );
            assert_eq!(days_from_civil(y, m, d), days, "{s}");
        }
    }
}
