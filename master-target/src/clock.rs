//! UTC times as people type and read them: `YYYY-MM-DD HH:MM:SS[.mmm]`
//! (a `T` may replace the space, a trailing `Z` is allowed) for UNIX
//! nanoseconds, proleptic Gregorian, no time zones but UTC.

/// Days since 1970-01-01 of a civil date (H. Hinnant's `days_from_civil`).
fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let m = i64::from(m);
    let mp = if m > 2 { m - 3 } else { m + 9 };
    let doy = (153 * mp + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// Civil (year, month, day) of a day count since 1970-01-01.
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    (
        y,
        u32::try_from(m).unwrap_or(1),
        u32::try_from(d).unwrap_or(1),
    )
}

/// `YYYY-MM-DD HH:MM:SS.mmm` of UNIX nanoseconds.
pub fn utc(ns: u64) -> String {
    let secs = ns / 1_000_000_000;
    let ms = (ns / 1_000_000) % 1000;
    let days = i64::try_from(secs / 86_400).unwrap_or(i64::MAX / 2);
    let rem = secs % 86_400;
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}.{ms:03}",
        rem / 3600,
        (rem / 60) % 60,
        rem % 60
    )
}

/// Parse `YYYY-MM-DD[[ T]HH:MM[:SS[.fraction]]][Z]` (UTC; a date alone
/// is its midnight) into UNIX nanoseconds; `None` if it is not such a time
/// (years 1970 to 9999).
pub fn parse_utc(text: &str) -> Option<u64> {
    let text = text.trim().trim_end_matches('Z');
    let (date, time) = match text.split_once(['T', ' ']) {
        Some((d, t)) => (d, t),
        None => (text, "00:00"),
    };
    let mut date = date.split('-');
    let y: i64 = date.next()?.parse().ok()?;
    let m: u32 = date.next()?.parse().ok()?;
    let d: u32 = date.next()?.parse().ok()?;
    if date.next().is_some()
        || !(1..=12).contains(&m)
        || !(1..=31).contains(&d)
        || !(1970..=9999).contains(&y)
    {
        return None;
    }
    let (hms, frac) = match time.split_once('.') {
        Some((a, b)) => (a, Some(b)),
        None => (time, None),
    };
    let mut hms = hms.split(':');
    let h: u64 = hms.next()?.parse().ok()?;
    let min: u64 = hms.next()?.parse().ok()?;
    let s: u64 = match hms.next() {
        Some(s) => s.parse().ok()?,
        None => 0,
    };
    if hms.next().is_some() || h > 23 || min > 59 || s > 60 {
        return None;
    }
    let nanos = match frac {
        None => 0,
        Some(f) if !f.is_empty() && f.len() <= 9 && f.bytes().all(|b| b.is_ascii_digit()) => {
            let v: u64 = f.parse().ok()?;
            v * 10u64.pow(9 - u32::try_from(f.len()).ok()?)
        }
        Some(_) => return None,
    };
    let days = u64::try_from(days_from_civil(y, m, d)).ok()?;
    let secs = days
        .checked_mul(86_400)?
        .checked_add(h * 3600 + min * 60 + s)?;
    secs.checked_mul(1_000_000_000)?.checked_add(nanos)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_known_dates() {
        assert_eq!(utc(0), "1970-01-01 00:00:00.000");
        // Checked against Python: datetime.fromtimestamp(1795670150.123, utc).
        assert_eq!(utc(1_795_670_150_123_000_000), "2026-11-26 05:15:50.123");
        assert_eq!(utc(951_782_400_000_000_000), "2000-02-29 00:00:00.000");
    }

    #[test]
    fn parses_what_it_prints_and_common_forms() {
        for ns in [0, 1_795_670_150_123_000_000, 951_782_400_000_000_000] {
            assert_eq!(parse_utc(&utc(ns)), Some(ns));
        }
        assert_eq!(
            parse_utc("2026-11-26T05:15:50Z"),
            Some(1_795_670_150_000_000_000)
        );
        assert_eq!(
            parse_utc("2026-11-26 05:15"),
            Some(1_795_670_100_000_000_000)
        );
        assert_eq!(parse_utc("2026-11-26"), Some(1_795_651_200_000_000_000));
        for bad in [
            "latest",
            "2026-13-01 00:00",
            "2026-11-26 25:00",
            "x y",
            "30000000000000000-01-01 00:00",
            "10000-01-01",
            "before-upgrade",
        ] {
            assert_eq!(parse_utc(bad), None, "{bad}");
        }
    }
}
