//! SHIM until the master branch lands (it brings the real sanitiser).
use std::borrow::Cow;
/// Control characters made visible.
pub fn sanitize_for_terminal(s: &str) -> Cow<'_, str> {
    if s.chars().any(|c| c.is_control() && c != '\n' && c != '\t') {
        Cow::Owned(
            s.chars()
                .map(|c| {
                    if c.is_control() && c != '\n' && c != '\t' {
                        format!("\\x{:02x}", c as u32)
                    } else {
                        c.to_string()
                    }
                })
                .collect(),
        )
    } else {
        Cow::Borrowed(s)
    }
}
