//! Wall-clock schedules: the shift (days and hours in a named time zone) outside which
//! the camera never looks, and the local times of scheduled scans.
//!
//! Time zones come from the tz database bundled into the binary (jiff), so nothing is
//! read from disk and a schedule behaves the same on every device.

use jiff::civil::{Date, Weekday};
use jiff::tz::TimeZone;
use jiff::Timestamp;

use crate::Millis;

/// 2025-01-01T00:00:00Z: any real "now" of this firmware is later.
pub const CLOCK_SET_AFTER: Millis = 1_735_689_600_000;

const DAY_NAMES: [&str; 7] = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"];

/// Parses `"HH:MM"` (00:00 to 24:00) into minutes of the day.
pub fn parse_clock(text: &str) -> Result<u16, String> {
    let bad = || format!("'{text}' is not a time of day: write \"HH:MM\", e.g. \"08:30\"");
    let (h, m) = text.trim().split_once(':').ok_or_else(bad)?;
    let (h, m): (u16, u16) = (h.parse().map_err(|_| bad())?, m.parse().map_err(|_| bad())?);
    if m >= 60 || h > 24 || (h == 24 && m != 0) || text.trim().len() != 5 {
        return Err(bad());
    }
    Ok(h * 60 + m)
}

fn weekday_index(w: Weekday) -> usize {
    w.to_monday_zero_offset() as usize
}

/// When work happens: the only time the camera may look.
#[derive(Clone, Debug, PartialEq)]
pub struct Shift {
    tz: TimeZone,
    tz_name: String,
    /// Monday first.
    days: [bool; 7],
    /// Minutes of the local day, `start < end <= 1440`.
    start: u16,
    end: u16,
}

impl Shift {
    /// Validates a shift. Errors name the field (`timezone`, `days`, `start`, `end`).
    pub fn new(
        timezone: &str,
        days: &[String],
        start: &str,
        end: &str,
    ) -> Result<Shift, Vec<(&'static str, String)>> {
        let mut errors = Vec::new();
        let tz = TimeZone::get(timezone).unwrap_or_else(|_| {
            errors.push((
                "timezone",
                format!("'{timezone}' is not a time zone name such as \"Europe/Berlin\" or \"UTC\""),
            ));
            TimeZone::UTC
        });
        let mut set = [false; 7];
        for d in days {
            match DAY_NAMES.iter().position(|n| n.eq_ignore_ascii_case(d)) {
                Some(i) => set[i] = true,
                None => {
                    errors.push(("days", format!("'{d}' is not one of mon, tue, wed, thu, fri, sat, sun")))
                }
            }
        }
        let start = parse_clock(start).unwrap_or_else(|e| {
            errors.push(("start", e));
            0
        });
        let end = parse_clock(end).unwrap_or_else(|e| {
            errors.push(("end", e));
            1440
        });
        if start >= end {
            errors.push((
                "end",
                "must be later than start (a shift across midnight is two shifts: not supported)".into(),
            ));
        }
        if errors.is_empty() {
            Ok(Shift { tz, tz_name: timezone.to_string(), days: set, start, end })
        } else {
            Err(errors)
        }
    }

    /// Every day, all day, in UTC.
    pub fn always() -> Shift {
        Shift { tz: TimeZone::UTC, tz_name: "UTC".into(), days: [true; 7], start: 0, end: 1440 }
    }

    pub fn timezone(&self) -> &str {
        &self.tz_name
    }

    /// (weekday Monday = 0, minute of the local day) at `unix_ms`.
    fn local(&self, unix_ms: Millis) -> Option<(usize, u16, Date)> {
        let ts = Timestamp::from_millisecond(i64::try_from(unix_ms).ok()?).ok()?;
        let dt = self.tz.to_datetime(ts);
        Some((weekday_index(dt.weekday()), dt.hour() as u16 * 60 + dt.minute() as u16, dt.date()))
    }

    /// Whether `unix_ms` lies within the shift. A clock before 2025 has not been set (a
    /// Pi has no battery clock and boots in the past until NTP answers): nothing is in
    /// the shift then, so the camera stays closed rather than look at the wrong hour.
    pub fn contains(&self, unix_ms: Millis) -> bool {
        unix_ms >= CLOCK_SET_AFTER
            && self
                .local(unix_ms)
                .is_some_and(|(wd, min, _)| self.days[wd] && self.start <= min && min < self.end)
    }

    /// The first moment after `unix_ms` at which the local clock shows `minute` on a
    /// shift day, within the next eight days.
    pub fn next_local(&self, unix_ms: Millis, minute: u16) -> Option<Millis> {
        let (_, _, today) = self.local(unix_ms)?;
        for offset in 0..8 {
            let date = today.checked_add(jiff::Span::new().days(offset)).ok()?;
            if !self.days[weekday_index(date.weekday())] {
                continue;
            }
            let dt = date.at((minute / 60) as i8, (minute % 60) as i8, 0, 0);
            // A local time skipped by a DST change resolves to the later instant.
            let ts = self.tz.to_ambiguous_timestamp(dt).compatible().ok()?;
            let ms = u64::try_from(ts.as_millisecond()).ok()?;
            if ms > unix_ms {
                return Some(ms);
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn days(d: &[&str]) -> Vec<String> {
        d.iter().map(|s| s.to_string()).collect()
    }

    // 2026-11-23 is a Monday. 08:00 UTC that day:
    const MON_0800_UTC: Millis = 1_795_420_800_000;

    #[test]
    fn clock_times() {
        assert_eq!(parse_clock("08:30"), Ok(510));
        assert_eq!(parse_clock("24:00"), Ok(1440));
        for bad in ["8:30", "24:01", "12:60", "noon", "12-30"] {
            assert!(parse_clock(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn shift_in_a_named_zone() {
        // Berlin is UTC+1 in November: 09:00-17:00 local is 08:00-16:00 UTC.
        let s = Shift::new("Europe/Berlin", &days(&["mon", "tue", "wed", "thu", "fri"]), "09:00", "17:00")
            .unwrap();
        assert!(!s.contains(MON_0800_UTC - 60_000), "07:59 UTC = 08:59 Berlin");
        assert!(s.contains(MON_0800_UTC));
        assert!(s.contains(MON_0800_UTC + 8 * 3_600_000 - 60_000));
        assert!(!s.contains(MON_0800_UTC + 8 * 3_600_000), "17:00 Berlin is the end");
        assert!(!s.contains(MON_0800_UTC + 5 * 86_400_000), "Saturday");
        assert!(!Shift::always().contains(1000), "an unset clock (1970) is never in the shift");
        assert!(Shift::always().contains(CLOCK_SET_AFTER));
    }

    #[test]
    fn bad_shifts_name_their_field() {
        let e = Shift::new("Mars/Olympus", &days(&["mon", "funday"]), "18:00", "09:00").unwrap_err();
        let fields: Vec<&str> = e.iter().map(|(f, _)| *f).collect();
        assert_eq!(fields, vec!["timezone", "days", "end"]);
    }

    #[test]
    fn next_local_time_skips_days_off() {
        let s = Shift::new("UTC", &days(&["mon", "wed"]), "08:00", "18:00").unwrap();
        // From Monday 08:00: the next 10:30 is the same Monday.
        assert_eq!(s.next_local(MON_0800_UTC, 630), Some(MON_0800_UTC + 150 * 60_000));
        // From Monday 11:00: Tuesday is off, so Wednesday 10:30.
        let mon_11 = MON_0800_UTC + 3 * 3_600_000;
        assert_eq!(s.next_local(mon_11, 630), Some(MON_0800_UTC + 2 * 86_400_000 + 150 * 60_000));
    }
}
