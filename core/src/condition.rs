//! Does a step run? The host decides what it can without booting a VM.
//!
//! GitHub's rule: a step's `if:` without a status function is implicitly
//! `success() && (...)`. udos evaluates the status functions (`success()`, `failure()`,
//! `always()`, `cancelled()`) and `!`, `&&`, `||`, parentheses over them; every other
//! term (contexts, comparisons, other functions) is *unknown*. A definitely-false
//! condition skips the step without a VM; anything else boots the VM, where act
//! evaluates the full expression against the replayed job state and may still skip.

/// The job's state when a step comes up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct JobState {
    /// A previous step failed (and was not `continue-on-error`).
    pub failed: bool,
}

/// What the host does with a step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Boot the VM: the condition is true, or only act can tell.
    Run,
    /// The condition is false whatever the unknown terms are: skip without a VM.
    Skip,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Tri {
    True,
    False,
    Unknown,
}

impl Tri {
    fn not(self) -> Tri {
        match self {
            Tri::True => Tri::False,
            Tri::False => Tri::True,
            Tri::Unknown => Tri::Unknown,
        }
    }
    fn and(self, o: Tri) -> Tri {
        match (self, o) {
            (Tri::False, _) | (_, Tri::False) => Tri::False,
            (Tri::True, Tri::True) => Tri::True,
            _ => Tri::Unknown,
        }
    }
    fn or(self, o: Tri) -> Tri {
        match (self, o) {
            (Tri::True, _) | (_, Tri::True) => Tri::True,
            (Tri::False, Tri::False) => Tri::False,
            _ => Tri::Unknown,
        }
    }
}

/// Decide whether a step with condition `cond` runs in a job in `state`.
pub fn decide(cond: Option<&str>, state: JobState) -> Decision {
    let expr = cond.map(strip_braces).unwrap_or_default();
    let value = if expr.trim().is_empty() {
        status(state, "success")
    } else {
        let tokens = tokenize(&expr);
        let has_status = tokens.iter().any(|t| {
            matches!(t, Tok::Atom(a) if ["success()", "failure()", "always()", "cancelled()"].contains(&a.as_str()))
        });
        let mut p = Parser {
            tokens: &tokens,
            pos: 0,
            state,
        };
        let v = p.or();
        let v = if p.pos != tokens.len() {
            Tri::Unknown
        } else {
            v
        };
        if has_status {
            v
        } else {
            status(state, "success").and(v)
        }
    };
    if value == Tri::False {
        Decision::Skip
    } else {
        Decision::Run
    }
}

fn strip_braces(s: &str) -> String {
    let t = s.trim();
    match t.strip_prefix("${{").and_then(|r| r.strip_suffix("}}")) {
        Some(inner) => inner.trim().to_string(),
        None => t.to_string(),
    }
}

fn status(state: JobState, f: &str) -> Tri {
    let b = match f {
        "success" => !state.failed,
        "failure" => state.failed,
        "always" => true,
        // udos has no cancellation between steps yet.
        "cancelled" => false,
        _ => return Tri::Unknown,
    };
    if b {
        Tri::True
    } else {
        Tri::False
    }
}

#[derive(Debug, Clone, PartialEq)]
enum Tok {
    Not,
    And,
    Or,
    Open,
    Close,
    Atom(String),
}

/// Splits into `!`, `&&`, `||`, parentheses, and atoms. A call like `contains(a, b)` or
/// a comparison stays one opaque atom; only the four status calls are understood.
fn tokenize(s: &str) -> Vec<Tok> {
    let chars: Vec<char> = s.chars().collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        let next = chars.get(i + 1).copied();
        match c {
            c if c.is_whitespace() => i += 1,
            '!' if next != Some('=') => {
                out.push(Tok::Not);
                i += 1;
            }
            '&' if next == Some('&') => {
                out.push(Tok::And);
                i += 2;
            }
            '|' if next == Some('|') => {
                out.push(Tok::Or);
                i += 2;
            }
            '(' => {
                out.push(Tok::Open);
                i += 1;
            }
            ')' => {
                out.push(Tok::Close);
                i += 1;
            }
            _ => {
                // An atom runs to the next top-level `&&`, `||` or unbalanced `)`;
                // quoted strings and nested parentheses stay inside it.
                let start = i;
                let mut depth = 0i32;
                let mut quote = false;
                while i < chars.len() {
                    let c = chars[i];
                    let next = chars.get(i + 1).copied();
                    if quote {
                        if c == '\'' {
                            quote = false;
                        }
                    } else if c == '\'' {
                        quote = true;
                    } else if c == '(' {
                        depth += 1;
                    } else if c == ')' {
                        if depth == 0 {
                            break;
                        }
                        depth -= 1;
                    } else if depth == 0
                        && ((c == '&' && next == Some('&')) || (c == '|' && next == Some('|')))
                    {
                        break;
                    }
                    i += 1;
                }
                let atom: String = chars[start..i]
                    .iter()
                    .collect::<String>()
                    .trim()
                    .to_string();
                let compact: String = atom.chars().filter(|c| !c.is_whitespace()).collect();
                out.push(Tok::Atom(compact));
            }
        }
    }
    out
}

struct Parser<'a> {
    tokens: &'a [Tok],
    pos: usize,
    state: JobState,
}

impl Parser<'_> {
    fn or(&mut self) -> Tri {
        let mut v = self.and();
        while self.tokens.get(self.pos) == Some(&Tok::Or) {
            self.pos += 1;
            v = v.or(self.and());
        }
        v
    }
    fn and(&mut self) -> Tri {
        let mut v = self.unary();
        while self.tokens.get(self.pos) == Some(&Tok::And) {
            self.pos += 1;
            v = v.and(self.unary());
        }
        v
    }
    fn unary(&mut self) -> Tri {
        match self.tokens.get(self.pos) {
            Some(Tok::Not) => {
                self.pos += 1;
                self.unary().not()
            }
            Some(Tok::Open) => {
                self.pos += 1;
                let v = self.or();
                if self.tokens.get(self.pos) == Some(&Tok::Close) {
                    self.pos += 1;
                    v
                } else {
                    Tri::Unknown
                }
            }
            Some(Tok::Atom(a)) => {
                self.pos += 1;
                match a.strip_suffix("()") {
                    Some(f) if !f.contains('(') => status(self.state, f),
                    _ => match a.as_str() {
                        "true" => Tri::True,
                        "false" => Tri::False,
                        _ => Tri::Unknown,
                    },
                }
            }
            _ => {
                self.pos = self.tokens.len();
                Tri::Unknown
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const OK: JobState = JobState { failed: false };
    const FAILED: JobState = JobState { failed: true };

    #[test]
    fn default_is_success() {
        assert_eq!(decide(None, OK), Decision::Run);
        assert_eq!(decide(None, FAILED), Decision::Skip);
    }

    #[test]
    fn status_functions() {
        for (cond, ok, failed) in [
            ("always()", Decision::Run, Decision::Run),
            ("${{ always() }}", Decision::Run, Decision::Run),
            ("failure()", Decision::Skip, Decision::Run),
            ("success()", Decision::Run, Decision::Skip),
            ("!cancelled()", Decision::Run, Decision::Run),
            ("cancelled()", Decision::Skip, Decision::Skip),
            ("failure() || success()", Decision::Run, Decision::Run),
            ("!(failure())", Decision::Run, Decision::Skip),
            ("false", Decision::Skip, Decision::Skip),
        ] {
            assert_eq!(decide(Some(cond), OK), ok, "{cond} ok");
            assert_eq!(decide(Some(cond), FAILED), failed, "{cond} failed");
        }
    }

    #[test]
    fn unknown_terms_boot_unless_status_decides() {
        // Implicit success(): skipped once the job failed, whatever the comparison says.
        let cmp = "steps.a.outputs.x == 'y'";
        assert_eq!(decide(Some(cmp), OK), Decision::Run);
        assert_eq!(decide(Some(cmp), FAILED), Decision::Skip);
        // always() && unknown: only act can tell.
        let both = "${{ always() && contains(github.ref, 'main') }}";
        assert_eq!(decide(Some(both), FAILED), Decision::Run);
        // failure() && unknown: false when the job is fine.
        assert_eq!(
            decide(Some("failure() && env.X == '1'"), OK),
            Decision::Skip
        );
        // A string containing && inside quotes stays one atom.
        assert_eq!(
            decide(Some("failure() || env.X == 'a && b'"), OK),
            Decision::Run
        );
    }
}
