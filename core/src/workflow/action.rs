//! `action.yml`: what a `uses:` action is, read with the `github-actions-models`
//! action model.

use github_actions_models::action::{Action, Runs};

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
}

/// Parses `action.yml` text; `file` names it in errors.
pub fn parse(text: &str, file: &str) -> Result<ActionDef, WorkflowError> {
    let action: Action = serde_yaml_ng::from_str(text).map_err(|e| WorkflowError::Invalid {
        file: file.to_string(),
        at: "action".into(),
        message: format!("not a valid action definition: {e}"),
    })?;
    let kind = match action.runs {
        Runs::Composite(_) => ActionKind::Composite,
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
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_are_told_apart() {
        let composite =
            "name: c\nruns:\n  using: composite\n  steps:\n    - run: echo hi\n      shell: sh\n";
        assert_eq!(parse(composite, "a").unwrap().kind, ActionKind::Composite);
        let node = "name: n\nruns:\n  using: node20\n  main: index.js\n  post: cleanup.js\n";
        assert_eq!(
            parse(node, "a").unwrap().kind,
            ActionKind::Node {
                using: "node20".into(),
                pre: None,
                post: Some("cleanup.js".into())
            }
        );
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
}
