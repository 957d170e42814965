//! Errors as the user reads them.

/// The error and its causes on one line, `a: b: c`, leaving out a cause whose text the
/// line already holds (many library errors print their source in their own message,
/// and anyhow's `{:#}` would say it twice).
pub fn describe(e: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if out.contains(&text) {
            continue;
        }
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(&text);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("cannot unpack: {0}")]
    struct Outer(#[source] std::io::Error);

    #[test]
    fn a_cause_already_in_the_message_is_said_once() {
        let e = anyhow::Error::new(Outer(std::io::Error::other("disk full")))
            .context("storing the layer");
        assert_eq!(
            format!("{e:#}"),
            "storing the layer: cannot unpack: disk full: disk full"
        );
        assert_eq!(describe(&e), "storing the layer: cannot unpack: disk full");
    }
}
