//! Which backups a retention policy keeps: restic's `forget --keep-*`
//! rules, applied to each disk's backups.
//!
//! - `last N`: the N newest backups.
//! - `hourly/daily/weekly/monthly/yearly N`: for the last N hours (days,
//!   ISO weeks Monday to Sunday, months, years) that have one or more
//!   backups, the newest backup of each.
//! - Periods are calendar periods in **UTC** (restic uses local time; a set
//!   is often shared by hosts in different zones, and UTC has no repeated
//!   or skipped hours). A backup kept by several rules counts once for
//!   each (the rules are ORed, each counts its own periods).
//! - As restic (0.17+): when a calendar rule found fewer periods than it
//!   may keep, the oldest backup is kept additionally ("oldest daily").
//! - An empty policy (every count 0) keeps everything: refused by the
//!   caller, as restic refuses it.

use super::pick::days_from_civil;

/// Counts per rule (0: the rule is not used; `u32::MAX`: unlimited).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Policy {
    /// Newest N.
    pub last: u32,
    /// Newest of each of the last N hours with backups.
    pub hourly: u32,
    /// ... days.
    pub daily: u32,
    /// ... ISO weeks.
    pub weekly: u32,
    /// ... months.
    pub monthly: u32,
    /// ... years.
    pub yearly: u32,
}

impl Policy {
    /// True when no rule is used.
    pub fn is_empty(&self) -> bool {
        *self == Policy::default()
    }
}

/// Civil (year, month, day, hour) of `secs` in UTC.
fn civil(secs: u64) -> (i64, u32, u32, u32) {
    let s = super::layout::utc_stamp(secs);
    (
        s[0..4].parse().unwrap_or(0),
        s[4..6].parse().unwrap_or(0),
        s[6..8].parse().unwrap_or(0),
        s[9..11].parse().unwrap_or(0),
    )
}

/// The ISO 8601 week of `secs`: year * 100 + week.
fn iso_week(secs: u64) -> i64 {
    let days = (secs / 86_400) as i64;
    // 1970-01-01 was a Thursday; Monday is 0.
    let weekday = (days + 3).rem_euclid(7);
    let thursday = days - weekday + 3;
    let (y, _, _, _) = civil(thursday as u64 * 86_400);
    let week = (thursday - days_from_civil(y, 1, 1)) / 7 + 1;
    y * 100 + week
}

/// The rules with their period keys, in restic's order.
const RULES: [&str; 6] = ["last", "hourly", "daily", "weekly", "monthly", "yearly"];

/// The period of backup `nr` (newest first) made at `t` under rule `r`.
fn period(r: usize, nr: usize, t: u64) -> i64 {
    let (y, m, d, h) = civil(t);
    let (m, d, h) = (i64::from(m), i64::from(d), i64::from(h));
    match r {
        0 => nr as i64,
        1 => ((y * 100 + m) * 100 + d) * 100 + h,
        2 => (y * 100 + m) * 100 + d,
        3 => iso_week(t),
        4 => y * 100 + m,
        _ => y,
    }
}

/// For backups made at `times` (any order), whether each is kept and why
/// (the rules that keep it: `daily`, `oldest weekly`, ...).
pub fn apply(times: &[u64], policy: &Policy) -> Vec<Vec<String>> {
    let mut order: Vec<usize> = (0..times.len()).collect();
    // Newest first; equal times by index, newest index first.
    order.sort_by(|&a, &b| (times[b], b).cmp(&(times[a], a)));
    let mut counts = [
        policy.last,
        policy.hourly,
        policy.daily,
        policy.weekly,
        policy.monthly,
        policy.yearly,
    ];
    let mut last_key: [Option<i64>; 6] = [None; 6];
    let mut kept_oldest = [false; 6];
    let mut reasons = vec![Vec::new(); times.len()];
    for (nr, &i) in order.iter().enumerate() {
        for r in 0..6 {
            if counts[r] == 0 {
                continue;
            }
            let key = period(r, nr, times[i]);
            if last_key[r] != Some(key) {
                last_key[r] = Some(key);
                if counts[r] != u32::MAX {
                    counts[r] -= 1;
                }
                reasons[i].push(RULES[r].to_string());
                if nr + 1 == order.len() {
                    kept_oldest[r] = true;
                }
            }
        }
    }
    // Calendar rules that found fewer periods than they may keep keep the
    // oldest backup too.
    if let Some(&oldest) = order.last() {
        for r in 1..6 {
            let used = [
                policy.last,
                policy.hourly,
                policy.daily,
                policy.weekly,
                policy.monthly,
                policy.yearly,
            ][r];
            if used != 0 && counts[r] > 0 && !kept_oldest[r] && used != u32::MAX {
                reasons[oldest].push(format!("oldest {}", RULES[r]));
            }
        }
    }
    reasons
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::set::pick::parse_time;

    fn t(s: &str) -> u64 {
        parse_time(s).unwrap_or_else(|| panic!("{s}"))
    }

    /// The indexes of `times` that `policy` keeps.
    fn kept(times: &[u64], policy: Policy) -> Vec<usize> {
        apply(times, &policy)
            .iter()
            .enumerate()
            .filter(|(_, r)| !r.is_empty())
            .map(|(i, _)| i)
            .collect()
    }

    /// restic's documented example: one backup every Sunday for 12 weeks;
    /// --keep-daily 4 keeps the last four Sundays.
    #[test]
    fn restic_twelve_sundays_keep_daily_4() {
        let sundays = [
            "2019-09-01",
            "2019-09-08",
            "2019-09-15",
            "2019-09-22",
            "2019-09-29",
            "2019-10-06",
            "2019-10-13",
            "2019-10-20",
            "2019-10-27",
            "2019-11-03",
            "2019-11-10",
            "2019-11-17",
        ];
        let times: Vec<u64> = sundays
            .iter()
            .map(|d| t(&format!("{d}T11:00:00Z")))
            .collect();
        let p = Policy {
            daily: 4,
            ..Policy::default()
        };
        assert_eq!(kept(&times, p), vec![8, 9, 10, 11]);
        // Weekly 4 keeps the same ones (one per week); last 2 the newest two.
        let p = Policy {
            weekly: 4,
            ..Policy::default()
        };
        assert_eq!(kept(&times, p), vec![8, 9, 10, 11]);
        let p = Policy {
            last: 2,
            ..Policy::default()
        };
        assert_eq!(kept(&times, p), vec![10, 11]);
    }

    /// restic's documented example, shortened: a backup every day;
    /// --keep-daily 7 --keep-weekly 5 keeps 7 dailies and the weeklies
    /// they do not already hold (each rule counts its own weeks).
    #[test]
    fn restic_daily_and_weekly_overlap() {
        // 2026-01-01 (Thursday) .. 2026-03-31, at 02:00 each day.
        let start = t("2026-01-01T02:00:00Z");
        let times: Vec<u64> = (0..90).map(|d| start + d * 86_400).collect();
        let p = Policy {
            daily: 7,
            weekly: 5,
            ..Policy::default()
        };
        let k = kept(&times, p);
        assert_eq!(k.len(), 10, "{k:?}");
        // The last 7 days (03-25 .. 03-31), then Sundays: 2026-03-31 is a
        // Tuesday, so the 5 weeks are kept by 03-31 and 03-29 (both also
        // dailies), 03-22, 03-15 and 03-08.
        let newest = 89;
        let mut want: Vec<usize> = (newest - 6..=newest).collect();
        for sunday in ["2026-03-22", "2026-03-15", "2026-03-08"] {
            let i = times
                .iter()
                .position(|&x| x == t(&format!("{sunday}T02:00:00Z")))
                .unwrap();
            want.push(i);
        }
        want.sort_unstable();
        assert_eq!(k, want);
        // Monthly 12 over three months: each month's last day, and the
        // oldest backup additionally (fewer months than 12).
        let p = Policy {
            monthly: 12,
            ..Policy::default()
        };
        let r = apply(&times, &p);
        assert_eq!(kept(&times, p), vec![0, 30, 58, 89]);
        assert_eq!(r[0], vec!["oldest monthly".to_string()]);
    }

    #[test]
    fn hours_and_years_are_calendar_periods_in_utc() {
        let times = [
            t("2025-12-31T23:10:00Z"),
            t("2025-12-31T23:50:00Z"),
            t("2026-01-01T00:05:00Z"),
            t("2026-01-01T00:45:00Z"),
            t("2026-01-01T01:15:00Z"),
        ];
        let p = Policy {
            hourly: 2,
            ..Policy::default()
        };
        assert_eq!(kept(&times, p), vec![3, 4]);
        let p = Policy {
            hourly: 3,
            ..Policy::default()
        };
        assert_eq!(kept(&times, p), vec![1, 3, 4]);
        let p = Policy {
            yearly: 1,
            ..Policy::default()
        };
        assert_eq!(kept(&times, p), vec![4]);
        let p = Policy {
            yearly: 5,
            ..Policy::default()
        };
        // Two years with backups, fewer than 5: the oldest too.
        assert_eq!(kept(&times, p), vec![0, 1, 4]);
        let p = Policy {
            yearly: u32::MAX,
            ..Policy::default()
        };
        assert_eq!(kept(&times, p), vec![1, 4]);
    }

    #[test]
    fn iso_weeks_start_on_monday() {
        // 2026-01-01 is a Thursday: ISO week 1 of 2026.
        assert_eq!(iso_week(t("2026-01-01T00:00:00Z")), 202_601);
        // 2027-01-01 is a Friday: still week 53 of 2026.
        assert_eq!(iso_week(t("2027-01-01T00:00:00Z")), 202_653);
        assert_eq!(iso_week(t("2027-01-04T00:00:00Z")), 202_701);
        // Sunday and the Monday after are in different weeks.
        assert_ne!(
            iso_week(t("2026-03-01T23:59:59Z")),
            iso_week(t("2026-03-02T00:00:00Z"))
        );
    }

    #[test]
    fn empty_policies_are_empty() {
        assert!(Policy::default().is_empty());
        assert!(!Policy {
            last: 1,
            ..Policy::default()
        }
        .is_empty());
    }
}
