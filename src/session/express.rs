//! express-session's `cookie` object, kept in `sess` for an Express app
//! sharing the table (connect-pg-simple reads the expiry from it).

use std::time::Duration;

use time::OffsetDateTime;

use super::{
    cookie::{CookieConfig, SameSite},
    data::Data,
};

/// Writes the `cookie` object of a row expiring at `expire`, as express-session's
/// `Cookie#toJSON` serializes it (field order and formats included).
pub(crate) fn stamp(
    cookie: &CookieConfig,
    max_age: Option<Duration>,
    data: &mut Data,
    expire: OffsetDateTime,
) {
    let max_age_ms = max_age.map_or(0, |d| d.as_millis() as u64);
    let mut json = format!(
        r#"{{"originalMaxAge":{max_age_ms},"expires":"{}","secure":{},"httpOnly":true"#,
        js_date(expire),
        cookie.secure
    );
    if let Some(domain) = &cookie.domain {
        json.push_str(&format!(r#","domain":"{domain}""#));
    }
    json.push_str(&format!(
        r#","path":{},"sameSite":"{}"}}"#,
        serde_json::Value::from(cookie.path.as_str()),
        match cookie.same_site {
            SameSite::Lax => "lax",
            SameSite::Strict => "strict",
            SameSite::None => "none",
        }
    ));
    if let Ok(raw) = serde_json::value::RawValue::from_string(json) {
        data.set("cookie", raw);
    }
}

/// `Date.prototype.toJSON`: `2026-11-23T08:00:00.000Z`.
fn js_date(t: OffsetDateTime) -> String {
    let t = t.to_offset(time::UtcOffset::UTC);
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:03}Z",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second(),
        t.millisecond()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_are_written_as_javascript_does() {
        let t = OffsetDateTime::UNIX_EPOCH + time::Duration::milliseconds(1_795_420_800_123);
        assert_eq!(js_date(t), "2026-11-23T08:00:00.123Z");
    }
}
