//! UTC dates from Unix time: the one civil-date algorithm and the formats built on it.
//!
//! Pure and dependency-free (the lowest layer): no clock is read here, the caller passes
//! the time.

use std::time::{SystemTime, UNIX_EPOCH};

/// (year, month 1-12, day 1-31) of a day count since 1970-01-01, proleptic Gregorian.
/// Howard Hinnant's days-to-civil algorithm; exact for every `i64` day count the callers use.
pub fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

/// Signed seconds since the epoch (negative before 1970).
fn unix_secs(t: SystemTime) -> i64 {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => d.as_secs() as i64,
        Err(e) => -(e.duration().as_secs() as i64),
    }
}

/// `YYYY-MM-DD HH:MM:SS UTC` of signed Unix seconds.
pub fn utc_datetime_secs(secs: i64) -> String {
    let (y, m, d) = civil_from_days(secs.div_euclid(86_400));
    let rem = secs.rem_euclid(86_400);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02} UTC",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// `YYYY-MM-DD HH:MM:SS UTC` (times before 1970 are shown as they are).
pub fn utc_datetime(t: SystemTime) -> String {
    utc_datetime_secs(unix_secs(t))
}

/// RFC 3339 `2026-11-22T12:00:00Z`; times before 1970 are shown as the epoch.
pub fn rfc3339(t: SystemTime) -> String {
    let secs = unix_secs(t).max(0);
    let (y, m, d) = civil_from_days(secs / 86_400);
    let rem = secs % 86_400;
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn civil_dates() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(-1), (1969, 12, 31));
        assert_eq!(civil_from_days(11_016), (2000, 2, 29)); // leap day of a 400-year
        assert_eq!(civil_from_days(11_017), (2000, 3, 1));
        assert_eq!(civil_from_days(47_540), (2100, 2, 28)); // 2100 is not a leap year
        assert_eq!(civil_from_days(47_541), (2100, 3, 1));
        assert_eq!(civil_from_days(20_779), (2026, 11, 22));
        assert_eq!(civil_from_days(-719_468), (0, 3, 1));
    }

    #[test]
    fn civil_dates_are_consecutive() {
        // Every day from 1900 to 2200 follows the previous one.
        let mut prev = civil_from_days(-25_567);
        assert_eq!(prev, (1900, 1, 1));
        for days in -25_566..84_000 {
            let (y, m, d) = civil_from_days(days);
            let (py, pm, pd) = prev;
            let next_day = (y, m, d) == (py, pm, pd + 1);
            let next_month = (y, m, d) == (py, pm + 1, 1) && pd >= 28;
            let next_year = (y, m, d) == (py + 1, 1, 1) && (pm, pd) == (12, 31);
            assert!(
                next_day || next_month || next_year,
                "{prev:?} -> {y}-{m}-{d}"
            );
            prev = (y, m, d);
        }
    }

    #[test]
    fn formats() {
        assert_eq!(utc_datetime(UNIX_EPOCH), "1970-01-01 00:00:00 UTC");
        let t = UNIX_EPOCH + Duration::from_secs(951_782_400 + 3_723);
        assert_eq!(utc_datetime(t), "2000-02-29 01:02:03 UTC");
        assert_eq!(
            utc_datetime(UNIX_EPOCH - Duration::from_secs(1)),
            "1969-12-31 23:59:59 UTC"
        );
        assert_eq!(rfc3339(t), "2000-02-29T01:02:03Z");
        assert_eq!(
            rfc3339(UNIX_EPOCH + Duration::from_secs(1_795_350_896)),
            "2026-11-22T12:34:56Z"
        );
        assert_eq!(
            rfc3339(UNIX_EPOCH - Duration::from_secs(5)),
            "1970-01-01T00:00:00Z"
        );
    }
}
