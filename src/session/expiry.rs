//! When a session row expires: the idle and absolute timeouts, and when an
//! extension is due (so that most reads and writes leave `expire` alone).

use std::time::Duration;

use time::OffsetDateTime;

use super::layer::DEFAULT_IDLE;
use crate::store::LoadPolicy;

/// A layer's timeouts.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Expiry {
    /// Extend the row by this much on use (`None`: never).
    pub(crate) idle: Option<Duration>,
    /// End the session this long after its creation, whatever its use.
    pub(crate) absolute: Option<Duration>,
    /// The share of the idle timeout that must pass before an extension is
    /// written.
    pub(crate) touch_fraction: f64,
}

impl Expiry {
    /// How loads extend the idle expiry.
    pub(crate) fn load_policy(&self) -> LoadPolicy {
        LoadPolicy {
            idle: self.idle,
            absolute: self.absolute,
            touch_fraction: self.touch_fraction,
        }
    }

    /// The lifetime a cookie announces (express-session's `originalMaxAge`).
    pub(crate) fn max_age(&self) -> Option<Duration> {
        self.idle.or(self.absolute)
    }

    /// The expiry of an existing row written now: unchanged until the idle
    /// extension is due (as for reads), so most writes leave `expire` alone.
    pub(crate) fn next_expire(
        &self,
        now: OffsetDateTime,
        created: Option<OffsetDateTime>,
        current: OffsetDateTime,
    ) -> OffsetDateTime {
        let fresh = self.expire_at(now, created);
        match self.idle {
            Some(idle) if current >= now + idle.mul_f64(1.0 - self.touch_fraction) => {
                current.min(fresh)
            }
            _ => fresh,
        }
    }

    /// The expiry a row written now gets.
    pub(crate) fn expire_at(
        &self,
        now: OffsetDateTime,
        created: Option<OffsetDateTime>,
    ) -> OffsetDateTime {
        let idle = self.idle.map(|d| now + d);
        // `created` is stored data: its sum saturates rather than panics.
        let absolute = self.absolute.map(|d| later(created.unwrap_or(now), d));
        match (idle, absolute) {
            (Some(a), Some(b)) => a.min(b),
            (Some(a), None) => a,
            (None, Some(b)) => b,
            (None, None) => now + DEFAULT_IDLE,
        }
    }
}

/// `t + d`, saturating at the last day `time` represents (Postgres keeps it
/// as is), so a far-future stored time cannot panic.
fn later(t: OffsetDateTime, d: Duration) -> OffsetDateTime {
    time::Duration::try_from(d)
        .ok()
        .and_then(|d| t.checked_add(d))
        .unwrap_or_else(|| time::Date::MAX.midnight().assume_utc())
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOUR: Duration = Duration::from_secs(3600);

    fn expiry(idle: Option<Duration>, absolute: Option<Duration>) -> Expiry {
        Expiry {
            idle,
            absolute,
            touch_fraction: 0.1,
        }
    }

    #[test]
    fn a_write_keeps_expire_until_the_extension_is_due() {
        let now = OffsetDateTime::UNIX_EPOCH + time::Duration::days(20_000);
        let e = expiry(Some(10 * HOUR), None);
        let recent = now + HOUR.mul_f64(9.5);
        assert_eq!(e.next_expire(now, None, recent), recent);
        let due = now + 8 * HOUR;
        assert_eq!(e.next_expire(now, None, due), now + 10 * HOUR);
    }

    #[test]
    fn the_absolute_timeout_caps_the_idle_one() {
        let now = OffsetDateTime::UNIX_EPOCH + time::Duration::days(20_000);
        let created = now - 23 * HOUR;
        let e = expiry(Some(10 * HOUR), Some(24 * HOUR));
        assert_eq!(e.expire_at(now, Some(created)), now + HOUR);
        assert_eq!(expiry(None, None).expire_at(now, None), now + DEFAULT_IDLE);
    }

    #[test]
    fn a_far_future_creation_time_saturates() {
        let e = expiry(None, Some(48 * HOUR));
        let end = time::Date::MAX.midnight().assume_utc();
        assert_eq!(e.expire_at(end, Some(end)), end);
    }
}
