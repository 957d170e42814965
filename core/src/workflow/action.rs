//! `action.yml`: what a `uses:` action is, read with the `github-actions-models`
//! action model; and actions from other repositories (`owner/repo[/path]@ref`) as the
//! host pins them before a run (docs/actions.md).

use github_actions_models::action::{Action, Runs, StepBody};
use github_actions_models::common::Uses;

use super::WorkflowError;

/// How an action runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ActionKind {
    /// `runs.using: composite`: steps act runs inside the step's VM.
    Composite,
    /// `runs.using: node12|16|20|24`.
    Node {
        /// The `using:` value.
        using: String,
        /// `pre:` script, if any.
        pre: Option<String>,
        /// `post:` script, if any.
        post: Option<String>,
    },
    /// `runs.using: docker`.
    Docker,
}

/// The parts of an action definition udos needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ActionDef {
    /// `name:`.
    pub name: Option<String>,
    /// How it runs.
    pub kind: ActionKind,
    /// The `uses:` of a composite action's steps, as written (trimmed): the actions it
    /// needs in turn. Empty for other kinds.
    pub uses: Vec<String>,
}

/// Parses `action.yml` text; `file` names it in errors.
pub fn parse(text: &str, file: &str) -> Result<ActionDef, WorkflowError> {
    let action: Action = serde_yaml_ng::from_str(text).map_err(|e| WorkflowError::Invalid {
        file: file.to_string(),
        at: "action".into(),
        message: format!("not a valid action definition: {e}"),
    })?;
    let mut uses = Vec::new();
    let kind = match action.runs {
        Runs::Composite(c) => {
            uses = c
                .steps
                .iter()
                .filter_map(|step| match &step.body {
                    StepBody::Uses { uses, .. } => Some(uses.raw().trim().to_string()),
                    StepBody::Run { .. } => None,
                })
                .collect();
            ActionKind::Composite
        }
        Runs::Docker(_) => ActionKind::Docker,
        Runs::JavaScript(js) => ActionKind::Node {
            using: js.using,
            pre: js.pre,
            post: js.post,
        },
    };
    Ok(ActionDef {
        name: action.name,
        kind,
        uses,
    })
}

/// Where an action of another repository lives: `owner/repo[/path]@ref`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoteUses {
    /// `owner`.
    pub owner: String,
    /// `repo`.
    pub repo: String,
    /// The directory of `action.yml` in the repository; empty for its top.
    pub path: String,
    /// What follows `@`: a branch, a tag or a commit SHA.
    pub git_ref: String,
}

/// Why a `uses:` cannot name an action of another repository that udos can fetch.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`uses: {uses}`: {why}")]
pub struct UsesError {
    /// As written.
    pub uses: String,
    /// What is wrong with it.
    pub why: String,
}

/// A name that is safe as one path component: GitHub's owner and repository names.
fn plain_name(s: &str) -> bool {
    !s.is_empty()
        && s != "."
        && s != ".."
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

impl RemoteUses {
    /// Parses `owner/repo[/path]@ref`. Refused: local (`./`) and Docker (`docker://`)
    /// references, and names that could not be a directory of the action store or an
    /// argument of act (`..`, whitespace, `$`, `=`).
    pub fn parse(raw: &str) -> Result<RemoteUses, UsesError> {
        let err = |why: &str| UsesError {
            uses: raw.to_string(),
            why: why.to_string(),
        };
        let r = match Uses::parse(raw) {
            Ok(Uses::Repository(r)) => r,
            Ok(_) => return Err(err("not an action of another repository")),
            Err(e) => return Err(err(&e.to_string())),
        };
        // An owner never starts with `.` (GitHub's rule), which leaves such names to
        // udos's own directories in the action store.
        if !plain_name(r.owner()) || r.owner().starts_with('.') || !plain_name(r.repo()) {
            return Err(err(
                "the owner and repository may hold only letters, digits, `-`, `_` and `.` (the owner does not start with `.`)",
            ));
        }
        let path = r.subpath().unwrap_or("").trim_matches('/');
        if path
            .split('/')
            .any(|c| c == "." || c == ".." || (c.is_empty() && !path.is_empty()))
        {
            return Err(err(
                "the path in the repository may not hold `.`, `..` or `//`",
            ));
        }
        let git_ref = r.git_ref();
        if git_ref.is_empty()
            || git_ref
                .chars()
                .any(|c| c.is_whitespace() || c.is_control() || matches!(c, '$' | '=' | '\\'))
        {
            return Err(err(
                "the ref may not be empty or hold whitespace, `$`, `=` or `\\`",
            ));
        }
        Ok(RemoteUses {
            owner: r.owner().to_string(),
            repo: r.repo().to_string(),
            path: path.to_string(),
            git_ref: git_ref.to_string(),
        })
    }

    /// `owner/repo`.
    pub fn slug(&self) -> String {
        format!("{}/{}", self.owner, self.repo)
    }

    /// Is the ref a full commit SHA (SHA-1 or SHA-256 object name)?
    pub fn ref_is_sha(&self) -> bool {
        matches!(self.git_ref.len(), 40 | 64) && self.git_ref.bytes().all(|b| b.is_ascii_hexdigit())
    }
}

/// An action of another repository as the host pinned it before the run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PinnedAction {
    /// `owner/repo[/path]@ref` as written.
    pub uses: String,
    /// Its parts.
    pub at: RemoteUses,
    /// The commit the ref resolved to; for a directory `--local-repository` maps the
    /// action to, the SHA-256 of that directory's tree as udos stored it.
    pub pin: String,
    /// The directory `--local-repository` mapped it to, if it did.
    pub local: Option<String>,
    /// What its `action.yml` says.
    pub def: ActionDef,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_are_told_apart() {
        let composite = "name: c\nruns:\n  using: composite\n  steps:\n    - run: echo hi\n      shell: sh\n    - uses: o/r/p@v2\n    - uses: ./local\n";
        let c = parse(composite, "a").unwrap();
        assert_eq!(c.kind, ActionKind::Composite);
        assert_eq!(c.uses, ["o/r/p@v2", "./local"]);
        let node = "name: n\nruns:\n  using: node20\n  main: index.js\n  post: cleanup.js\n";
        assert_eq!(
            parse(node, "a").unwrap().kind,
            ActionKind::Node {
                using: "node20".into(),
                pre: None,
                post: Some("cleanup.js".into())
            }
        );
        assert!(parse(node, "a").unwrap().uses.is_empty());
        let docker = "name: d\nruns:\n  using: docker\n  image: Dockerfile\n";
        assert_eq!(parse(docker, "a").unwrap().kind, ActionKind::Docker);
        let err = parse("name: x\n", "dir/action.yml")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("dir/action.yml") && err.contains("runs"),
            "{err}"
        );
    }

    #[test]
    fn remote_uses_are_split_and_checked() {
        let u = RemoteUses::parse("octo/tools/sub/dir@v1.2").unwrap();
        assert_eq!(
            (u.slug().as_str(), u.path.as_str(), u.git_ref.as_str()),
            ("octo/tools", "sub/dir", "v1.2")
        );
        assert!(!u.ref_is_sha());
        let sha = "0123456789abcdef0123456789abcdef01234567";
        let u = RemoteUses::parse(&format!("o/r@{sha}")).unwrap();
        assert!(u.ref_is_sha() && u.path.is_empty());
        for (bad, why) in [
            ("./local", "not an action of another repository"),
            ("docker://alpine", "not an action of another repository"),
            ("o/r", "missing `@"),
            ("o/r/../x@v1", "may not hold `.`"),
            ("o/../x@v1", "letters, digits"),
            ("o/r/a//b@v1", "may not hold `.`"),
            ("o/r@$HOME", "may not be empty or hold"),
            ("o/r@a=b", "may not be empty or hold"),
            ("o/r x@v1", "letters, digits"),
            ("../r@v1", "letters, digits"),
            (".staging/r@v1", "letters, digits"),
        ] {
            let e = RemoteUses::parse(bad).unwrap_err().to_string();
            assert!(e.contains(bad) && e.contains(why), "{bad}: {e}");
        }
    }
}
