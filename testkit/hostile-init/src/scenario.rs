//! The attacks this PID 1 can stage, and how a test names them.
//!
//! A test puts `.udos-hostile` at the root of its git repository: line `k` (1-based,
//! blank lines and `#` comments count as nothing) is the scenario of step `k`.

use std::fmt;

/// One crafted sealed output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scenario {
    /// `adopt <layer id>`: a valid layer stream whose header names another, existing
    /// layer as its id.
    Adopt {
        /// The layer id claimed in the header.
        layer: [u8; 32],
    },
    /// `setuid`: an honest layer holding setuid-root and setgid-root copies of this
    /// binary (run as a non-PID-1 process it prints its euid, see `main`).
    Setuid,
    /// `escape-dotdot <name>`: a member `../../…/tmp/<name>`.
    EscapeDotdot {
        /// File name the escape would create.
        name: String,
    },
    /// `escape-absolute <name>`: a member `/tmp/<name>`.
    EscapeAbsolute {
        /// File name the escape would create.
        name: String,
    },
    /// `escape-symlink <name>`: a symlink `hostile-link -> /tmp`, then a member
    /// `hostile-link/<name>` that would be written through it.
    EscapeSymlink {
        /// File name the escape would create.
        name: String,
    },
    /// `oversized-layer-len`: a header whose `layer_len` runs past the device's end.
    OversizedLayerLen,
    /// `oversized-file`: a member whose header claims a 1 TiB file.
    OversizedFile,
    /// `too-many-entries`: one more member than the host's default `max_entries`.
    TooManyEntries,
}

/// Why `.udos-hostile` could not be used.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ScenarioError {
    /// The file has no line for this step.
    #[error("no scenario for step {step} in .udos-hostile")]
    Missing {
        /// The step number.
        step: usize,
    },
    /// A line could not be parsed.
    #[error("bad scenario line {line:?}: {why}")]
    Bad {
        /// The line.
        line: String,
        /// What is wrong.
        why: &'static str,
    },
}

/// The host's default `UnpackLimits::max_entries`.
pub const HOST_MAX_ENTRIES: u64 = 1_000_000;

/// The scenario for step `step` (1-based) of the file `text`.
pub fn for_step(text: &str, step: usize) -> Result<Scenario, ScenarioError> {
    let line = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .nth(step.wrapping_sub(1))
        .ok_or(ScenarioError::Missing { step })?;
    parse(line)
}

/// Parses one scenario line.
pub fn parse(line: &str) -> Result<Scenario, ScenarioError> {
    let bad = |why| ScenarioError::Bad {
        line: line.to_string(),
        why,
    };
    let mut words = line.split_whitespace();
    let verb = words.next().ok_or_else(|| bad("empty"))?;
    let arg = words.next();
    if words.next().is_some() {
        return Err(bad("too many words"));
    }
    let name = || {
        let n = arg.ok_or_else(|| bad("needs a file name"))?;
        let ok = n
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
        if ok && n.len() <= 64 {
            Ok(n.to_string())
        } else {
            Err(bad("a file name is 1-64 of [A-Za-z0-9_-]"))
        }
    };
    let no_arg = |s: Scenario| match arg {
        None => Ok(s),
        Some(_) => Err(bad("takes no argument")),
    };
    match verb {
        "adopt" => {
            let hex_id = arg.ok_or_else(|| bad("needs a layer id"))?;
            let mut layer = [0u8; 32];
            hex::decode_to_slice(hex_id, &mut layer)
                .map_err(|_| bad("a layer id is 64 hex digits"))?;
            Ok(Scenario::Adopt { layer })
        }
        "setuid" => no_arg(Scenario::Setuid),
        "escape-dotdot" => Ok(Scenario::EscapeDotdot { name: name()? }),
        "escape-absolute" => Ok(Scenario::EscapeAbsolute { name: name()? }),
        "escape-symlink" => Ok(Scenario::EscapeSymlink { name: name()? }),
        "oversized-layer-len" => no_arg(Scenario::OversizedLayerLen),
        "oversized-file" => no_arg(Scenario::OversizedFile),
        "too-many-entries" => no_arg(Scenario::TooManyEntries),
        _ => Err(bad("unknown scenario")),
    }
}

impl fmt::Display for Scenario {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Scenario::Adopt { layer } => write!(f, "adopt {}", hex::encode(layer)),
            Scenario::Setuid => f.write_str("setuid"),
            Scenario::EscapeDotdot { name } => write!(f, "escape-dotdot {name}"),
            Scenario::EscapeAbsolute { name } => write!(f, "escape-absolute {name}"),
            Scenario::EscapeSymlink { name } => write!(f, "escape-symlink {name}"),
            Scenario::OversizedLayerLen => f.write_str("oversized-layer-len"),
            Scenario::OversizedFile => f.write_str("oversized-file"),
            Scenario::TooManyEntries => f.write_str("too-many-entries"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_step_takes_its_own_line_and_lines_round_trip() {
        let id = "ab".repeat(32);
        let text = format!(
            "# staged by a test\nescape-dotdot x1\n\n  adopt {id}\nsetuid\noversized-file\n"
        );
        assert_eq!(
            for_step(&text, 1),
            Ok(Scenario::EscapeDotdot { name: "x1".into() })
        );
        assert_eq!(
            for_step(&text, 2),
            Ok(Scenario::Adopt { layer: [0xab; 32] })
        );
        assert_eq!(for_step(&text, 3), Ok(Scenario::Setuid));
        assert_eq!(for_step(&text, 5), Err(ScenarioError::Missing { step: 5 }));
        assert_eq!(for_step(&text, 0), Err(ScenarioError::Missing { step: 0 }));
        for step in 1..=4 {
            let s = for_step(&text, step).unwrap();
            assert_eq!(parse(&s.to_string()), Ok(s));
        }
    }

    #[test]
    fn bad_lines_are_refused() {
        for line in [
            "adopt 12",
            "adopt",
            "setuid now",
            "escape-dotdot ../x",
            "escape-absolute",
            "fly",
            "oversized-file a b",
        ] {
            assert!(
                matches!(parse(line), Err(ScenarioError::Bad { .. })),
                "{line}"
            );
        }
    }
}
