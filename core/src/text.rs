//! Text from outside — workers' heartbeats, enrollment labels, the master's answers,
//! guests' error records — made safe to print on a terminal.

use std::borrow::Cow;
use std::fmt::Write as _;

/// Whether a terminal could act on `c` instead of showing it: control characters
/// (C0, DEL, and C1, which some terminals read as CSI and friends) and the
/// bidirectional marks, overrides and isolates, which reorder what is shown.
fn needs_escape(c: char) -> bool {
    c.is_control()
        || matches!(
            c,
            '\u{061c}' | '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}'
        )
}

/// `s` with everything a terminal could act on written as a visible escape: `\n`,
/// `\r` and `\t` by name, other ASCII controls as `\x1b`, the rest as `\u{9b}`.
/// Borrowed when nothing needs escaping. The result is one line.
pub fn sanitize_for_terminal(s: &str) -> Cow<'_, str> {
    if !s.chars().any(needs_escape) {
        return Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 16);
    for c in s.chars() {
        match c {
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if c.is_ascii_control() => {
                let _ = write!(out, "\\x{:02x}", u32::from(c));
            }
            c if needs_escape(c) => {
                let _ = write!(out, "\\u{{{:x}}}", u32::from(c));
            }
            c => out.push(c),
        }
    }
    Cow::Owned(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn controls_become_visible_escapes() {
        assert!(matches!(
            sanitize_for_terminal("web@0 running, zone=a é ✓"),
            Cow::Borrowed(_)
        ));
        assert_eq!(
            sanitize_for_terminal("\x1b]0;owned\x07\x1b[2J"),
            "\\x1b]0;owned\\x07\\x1b[2J"
        );
        assert_eq!(
            sanitize_for_terminal("a\nb\r\tc\0\x7f"),
            "a\\nb\\r\\tc\\x00\\x7f"
        );
        assert_eq!(sanitize_for_terminal("\u{9b}31m"), "\\u{9b}31m");
        assert_eq!(sanitize_for_terminal("abc\u{202e}fed"), "abc\\u{202e}fed");
        let every: String = (0u32..0x300).filter_map(char::from_u32).collect();
        let clean = sanitize_for_terminal(&every);
        assert!(!clean.chars().any(needs_escape), "{clean:?}");
    }
}
