//! The session's data: a JSON object kept as raw values in their original order,
//! so a key this process never touches is written back exactly as it was read
//! (another application may share the row).

use std::fmt;

use serde::de::{self, Deserialize, Deserializer, MapAccess, Visitor};
use serde_json::value::RawValue;

#[derive(Clone, Default)]
pub(crate) struct Data {
    entries: Vec<(String, Box<RawValue>)>,
}

impl fmt::Debug for Data {
    // Values may be secrets; keys are enough to debug with.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_set()
            .entries(self.entries.iter().map(|(k, _)| k))
            .finish()
    }
}

impl Data {
    /// Parses a `sess` column; `None` unless it is a JSON object.
    pub(crate) fn parse(text: &str) -> Option<Self> {
        serde_json::from_str(text).ok()
    }

    pub(crate) fn get(&self, key: &str) -> Option<&RawValue> {
        self.entries
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| &**v)
    }

    pub(crate) fn set(&mut self, key: &str, value: Box<RawValue>) {
        match self.entries.iter_mut().find(|(k, _)| k == key) {
            Some(slot) => slot.1 = value,
            None => self.entries.push((key.to_owned(), value)),
        }
    }

    pub(crate) fn remove(&mut self, key: &str) -> bool {
        let before = self.entries.len();
        self.entries.retain(|(k, _)| k != key);
        before != self.entries.len()
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub(crate) fn iter(&self) -> impl Iterator<Item = (&str, &RawValue)> {
        self.entries.iter().map(|(k, v)| (k.as_str(), &**v))
    }

    /// The serialized form: `{"key":<raw>,…}`.
    pub(crate) fn to_json(&self) -> String {
        let mut out = String::with_capacity(self.encoded_len());
        out.push('{');
        for (i, (k, v)) in self.entries.iter().enumerate() {
            if i > 0 {
                out.push(',');
            }
            out.push_str(&serde_json::to_string(k).unwrap_or_default());
            out.push(':');
            out.push_str(v.get());
        }
        out.push('}');
        out
    }

    /// The exact length of [`Self::to_json`], without building it: keys
    /// count as escaped, since a key of control characters takes six bytes
    /// per character once written.
    pub(crate) fn encoded_len(&self) -> usize {
        2 + self
            .entries
            .iter()
            .map(|(k, v)| escaped_len(k) + 1 + v.get().len())
            .sum::<usize>()
            + self.entries.len().saturating_sub(1)
    }
}

/// Whether serialized JSON holds a NUL character (`\u0000` in a string or
/// key), which a `jsonb` column refuses. `raw` is valid JSON, so every
/// backslash starts an escape; an escaped backslash followed by `u0000` is
/// text, not a NUL.
pub(crate) fn holds_nul(raw: &str) -> bool {
    let mut rest = raw.as_bytes();
    while let Some(at) = rest.iter().position(|&b| b == b'\\') {
        let escape = &rest[at + 1..];
        if escape.starts_with(b"u0000") {
            return true;
        }
        // Past the escaped character: `\\` must not start another escape.
        rest = escape.get(1..).unwrap_or_default();
    }
    false
}

/// The length of `s` as `serde_json` writes it as a string, quotes included:
/// `"` and `\` take two bytes, `\b \f \n \r \t` two, other control
/// characters six (`\u00XX`), everything else its UTF-8 bytes.
fn escaped_len(s: &str) -> usize {
    2 + s
        .bytes()
        .map(|b| match b {
            b'"' | b'\\' | 0x08 | 0x0c | b'\n' | b'\r' | b'\t' => 2,
            0x00..=0x1f => 6,
            _ => 1,
        })
        .sum::<usize>()
}

impl<'de> Deserialize<'de> for Data {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Data;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Data, A::Error> {
                let mut data = Data::default();
                while let Some((k, v)) = map.next_entry::<String, Box<RawValue>>()? {
                    data.set(&k, v);
                }
                Ok(data)
            }
        }
        d.deserialize_map(V).map_err(de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_nul_is_found_in_strings_and_keys_and_not_in_escaped_backslashes() {
        let json = |v: serde_json::Value| serde_json::to_string(&v).expect("serializes");
        assert!(holds_nul(&json(serde_json::json!({"k": ["a\u{0}b"]}))));
        assert!(holds_nul(&json(serde_json::json!({"k\u{0}": 1}))));
        // A backslash, then `u0000`; two backslashes, then `u0000`.
        assert!(!holds_nul(&json(serde_json::json!("\\u0000 \\\\u0000"))));
        assert!(holds_nul(&json(serde_json::json!("\\\u{0}"))));
        assert!(!holds_nul(&json(
            serde_json::json!({"a": "\u{1}", "b": "\\"})
        )));
        assert!(!holds_nul(r#""ends with \\""#));
    }

    #[test]
    fn unknown_values_survive_byte_for_byte() {
        let text = r#"{"cookie":{"originalMaxAge":86400000,"expires":"2030-01-01T00:00:00.000Z"},"passport":{"user": 42 },"flash":{}}"#;
        let mut data = Data::parse(text).expect("object");
        data.set("count", RawValue::from_string("3".into()).expect("raw"));
        assert_eq!(
            data.to_json(),
            r#"{"cookie":{"originalMaxAge":86400000,"expires":"2030-01-01T00:00:00.000Z"},"passport":{"user": 42 },"flash":{},"count":3}"#
        );
        assert_eq!(data.encoded_len(), data.to_json().len());
    }

    #[test]
    fn the_length_counts_keys_as_escaped() {
        let mut data = Data::default();
        for key in [
            "plain",
            "quote\"back\\slash",
            "\u{1}\u{1f}\n\t\r\u{8}\u{c}",
            "é→😀",
            "\u{7f}",
        ] {
            data.set(key, RawValue::from_string("[1, 2]".into()).expect("raw"));
            assert_eq!(data.encoded_len(), data.to_json().len(), "{key:?}");
        }
        assert_eq!(Data::default().encoded_len(), "{}".len());
    }

    #[test]
    fn only_objects_parse() {
        for bad in ["[]", "\"x\"", "1", "null", "{", "not json", ""] {
            assert!(Data::parse(bad).is_none(), "{bad}");
        }
        assert!(Data::parse("{}").expect("empty").is_empty());
    }

    #[test]
    fn set_replaces_and_remove_removes() {
        let mut data = Data::parse(r#"{"a":1,"b":2}"#).expect("object");
        data.set("a", RawValue::from_string("10".into()).expect("raw"));
        assert!(data.remove("b"));
        assert!(!data.remove("b"));
        assert_eq!(data.to_json(), r#"{"a":10}"#);
    }
}

#[cfg(test)]
mod proptests {
    use proptest::prelude::*;

    use super::*;

    proptest! {
        #[test]
        fn the_counted_length_is_the_written_length(
            entries in prop::collection::vec(("\\PC*|[\\x00-\\x1f\"\\\\]*", any::<i64>()), 0..8),
        ) {
            let mut data = Data::default();
            for (k, v) in &entries {
                data.set(k, RawValue::from_string(v.to_string()).expect("raw"));
            }
            let json = data.to_json();
            prop_assert_eq!(data.encoded_len(), json.len());
            let back = Data::parse(&json).expect("parses");
            prop_assert_eq!(back.to_json(), json);
        }
    }
}
