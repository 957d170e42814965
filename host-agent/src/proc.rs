//! External programs with a bound: every call udos makes to git, restic or mkfs has a
//! time limit, after which the program (with its process group) is killed and the
//! call fails saying so. The waiting and killing live in `udos_images::bounded`,
//! shared with the image builder.

use std::process::Output;
use std::time::Duration;

use anyhow::Result;

pub use udos_images::bounded::{RunError, TERM_GRACE};

/// Runs `expr` (stdout/stderr as the expression says) and waits at most `limit`.
/// `what` names the program in errors. A non-zero exit is not an error here unless
/// the expression is checked (duct's default). The error is a [`RunError`] (callers
/// may downcast it, e.g. to tell a missing program from a failing one).
pub fn run_bounded(expr: &duct::Expression, limit: Duration, what: &str) -> Result<Output> {
    Ok(udos_images::bounded::run_bounded(expr, limit, what)?)
}

/// [`run_bounded`] with stdout captured and returned as text (trimmed), stderr captured.
pub fn read_bounded(expr: &duct::Expression, limit: Duration, what: &str) -> Result<String> {
    let out = run_bounded(&expr.stdout_capture().stderr_capture(), limit, what)?;
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_program_past_its_bound_is_killed_and_named() {
        let t = std::time::Instant::now();
        let err = run_bounded(
            &duct::cmd!("sleep", "30"),
            Duration::from_millis(300),
            "sleep",
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("sleep did not finish within"), "{err}");
        assert!(t.elapsed() < Duration::from_secs(10));
        assert_eq!(
            read_bounded(&duct::cmd!("echo", "hi"), Duration::from_secs(10), "echo").unwrap(),
            "hi"
        );
        assert!(run_bounded(&duct::cmd!("false"), Duration::from_secs(10), "false").is_err());
    }
}
