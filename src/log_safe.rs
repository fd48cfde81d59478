//! Escaping and bounding of what others chose, before it reaches a log line:
//! a provider's error text, a token's `sub`, a callback parameter, a database
//! error quoting stored data. A newline or an ANSI escape in such a string
//! would otherwise forge log lines or repaint a terminal.

use std::fmt::{self, Display, Write};

/// At most this many characters of an untrusted value are logged; the rest
/// is counted, not written.
pub(crate) const MAX_LOGGED_CHARS: usize = 512;

/// Shows `value` with control, line-separator and bidi-override characters
/// escaped (`\n`, `\u{1b}`), backslashes doubled so escapes cannot be
/// forged, cut after [`MAX_LOGGED_CHARS`] characters.
pub(crate) fn untrusted<T: Display>(value: T) -> Untrusted<T> {
    Untrusted(value)
}

/// See [`untrusted`].
pub(crate) struct Untrusted<T>(T);

impl<T: Display> Display for Untrusted<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut out = Bounded {
            out: f,
            written: 0,
            dropped: 0,
        };
        write!(out, "{}", self.0)?;
        let dropped = out.dropped;
        if dropped > 0 {
            write!(f, "…[{dropped} more bytes]")?;
        }
        Ok(())
    }
}

impl<T: Display> fmt::Debug for Untrusted<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        Display::fmt(self, f)
    }
}

struct Bounded<'a, 'b> {
    out: &'a mut fmt::Formatter<'b>,
    written: usize,
    dropped: usize,
}

impl Write for Bounded<'_, '_> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        for c in s.chars() {
            if self.written >= MAX_LOGGED_CHARS {
                self.dropped += c.len_utf8();
                continue;
            }
            self.written += 1;
            if c == '\\' {
                self.out.write_str("\\\\")?;
            } else if needs_escape(c) {
                write!(self.out, "{}", c.escape_debug())?;
            } else {
                self.out.write_char(c)?;
            }
        }
        Ok(())
    }
}

/// Characters that move the cursor, end a line, or reorder what follows.
fn needs_escape(c: char) -> bool {
    c.is_control()
        || matches!(
            c,
            '\u{2028}' | '\u{2029}' | '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}'
        )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn controls_are_escaped_and_length_bounded() {
        let shown = untrusted("a\nb\r\u{1b}[31mc\\n\u{2028}\u{202e}é").to_string();
        assert_eq!(shown, "a\\nb\\r\\u{1b}[31mc\\\\n\\u{2028}\\u{202e}é");
        let long = "x\n".repeat(10_000);
        let shown = untrusted(&long).to_string();
        assert!(!shown.contains('\n'));
        assert!(shown.ends_with("…[19488 more bytes]"), "{shown}");
        assert!(shown.len() < 2 * MAX_LOGGED_CHARS + 32);
        assert_eq!(untrusted(42).to_string(), "42");
    }
}
