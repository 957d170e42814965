//! The `github` and `runner` contexts, and the `GITHUB_*` variables steps see, built
//! from what the host found out about the repository and the event.

use indexmap::IndexMap;

use crate::value::{Object, Value};

/// Where the workspace is inside every step's root.
pub const WORKSPACE: &str = "/workspace";
/// Where the event payload is inside every step's root (the control layer).
pub const EVENT_PATH: &str = "/.udos/event.json";

/// What the host knows about the run: repository, event, numbering.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RunFacts {
    /// `push`, `pull_request`, `workflow_dispatch`, ...
    pub event_name: String,
    /// The event payload (an object).
    pub event: Value,
    /// The commit.
    pub sha: String,
    /// `refs/heads/main`, `refs/tags/v1`, `refs/pull/1/merge`; empty when unknown.
    pub git_ref: String,
    /// Pull requests: the head branch.
    pub head_ref: String,
    /// Pull requests: the base branch.
    pub base_ref: String,
    /// `owner/name`.
    pub repository: String,
    /// Who triggered the run.
    pub actor: String,
    /// `https://github.com` unless the origin says otherwise.
    pub server_url: String,
    /// The run's number (udos's run id).
    pub run_id: String,
    /// Same as `run_id` for local runs.
    pub run_number: String,
    /// `1`, or more for a rerun.
    pub run_attempt: String,
}

impl RunFacts {
    /// `main` for `refs/heads/main`, `v1` for `refs/tags/v1`.
    pub fn ref_name(&self) -> &str {
        self.git_ref
            .strip_prefix("refs/heads/")
            .or_else(|| self.git_ref.strip_prefix("refs/tags/"))
            .unwrap_or(&self.git_ref)
    }

    /// `branch` or `tag` (empty when neither).
    pub fn ref_type(&self) -> &str {
        if self.git_ref.starts_with("refs/tags/") {
            "tag"
        } else if self.git_ref.starts_with("refs/heads/") {
            "branch"
        } else {
            ""
        }
    }

    /// The repository's owner (the part before `/`).
    pub fn owner(&self) -> &str {
        self.repository.split('/').next().unwrap_or_default()
    }

    fn api_url(&self) -> String {
        if self.server_url.trim_end_matches('/') == "https://github.com" {
            "https://api.github.com".to_string()
        } else {
            format!("{}/api/v3", self.server_url.trim_end_matches('/'))
        }
    }
}

fn s(v: impl Into<String>) -> Value {
    Value::String(v.into())
}

/// The `github` context of a job of `workflow`.
pub fn github(facts: &RunFacts, workflow: &str, job: &str) -> Value {
    let mut o = Object::new();
    for (k, v) in [
        ("action", ""),
        ("action_path", ""),
        ("action_ref", ""),
        ("action_repository", ""),
        ("actor", facts.actor.as_str()),
        ("base_ref", facts.base_ref.as_str()),
        ("event_name", facts.event_name.as_str()),
        ("event_path", EVENT_PATH),
        ("head_ref", facts.head_ref.as_str()),
        ("job", job),
        ("ref", facts.git_ref.as_str()),
        ("ref_name", facts.ref_name()),
        ("ref_type", facts.ref_type()),
        ("repository", facts.repository.as_str()),
        ("repository_owner", facts.owner()),
        ("retention_days", "90"),
        ("run_attempt", facts.run_attempt.as_str()),
        ("run_id", facts.run_id.as_str()),
        ("run_number", facts.run_number.as_str()),
        ("server_url", facts.server_url.as_str()),
        ("sha", facts.sha.as_str()),
        ("token", ""),
        ("triggering_actor", facts.actor.as_str()),
        ("workflow", workflow),
        ("workspace", WORKSPACE),
    ] {
        o.insert(k, s(v));
    }
    o.insert("ref_protected", Value::Bool(false));
    o.insert("api_url", s(facts.api_url()));
    o.insert(
        "graphql_url",
        s(format!(
            "{}/graphql",
            facts.api_url().trim_end_matches("/v3")
        )),
    );
    o.insert("event", facts.event.clone());
    Value::Object(o)
}

/// The `runner` context.
pub fn runner() -> Value {
    let mut o = Object::new();
    for (k, v) in [
        ("name", "udos"),
        ("os", "Linux"),
        ("arch", "X64"),
        ("environment", "self-hosted"),
        ("temp", "/tmp"),
        ("tool_cache", "/opt/hostedtoolcache"),
        ("debug", ""),
    ] {
        o.insert(k, s(v));
    }
    Value::Object(o)
}

/// The `GITHUB_*`, `RUNNER_*` and `CI` variables of a step, so that a step sees the
/// same values as its expressions (act would otherwise compute its own).
pub fn github_env(facts: &RunFacts, workflow: &str, job: &str) -> IndexMap<String, String> {
    let mut env = IndexMap::new();
    for (k, v) in [
        ("CI", "true"),
        ("GITHUB_ACTIONS", "true"),
        ("GITHUB_ACTOR", facts.actor.as_str()),
        ("GITHUB_BASE_REF", facts.base_ref.as_str()),
        ("GITHUB_EVENT_NAME", facts.event_name.as_str()),
        ("GITHUB_HEAD_REF", facts.head_ref.as_str()),
        ("GITHUB_JOB", job),
        ("GITHUB_REF", facts.git_ref.as_str()),
        ("GITHUB_REF_NAME", facts.ref_name()),
        ("GITHUB_REF_TYPE", facts.ref_type()),
        ("GITHUB_REPOSITORY", facts.repository.as_str()),
        ("GITHUB_REPOSITORY_OWNER", facts.owner()),
        ("GITHUB_RUN_ATTEMPT", facts.run_attempt.as_str()),
        ("GITHUB_RUN_ID", facts.run_id.as_str()),
        ("GITHUB_RUN_NUMBER", facts.run_number.as_str()),
        ("GITHUB_SERVER_URL", facts.server_url.as_str()),
        ("GITHUB_SHA", facts.sha.as_str()),
        ("GITHUB_TRIGGERING_ACTOR", facts.actor.as_str()),
        ("GITHUB_WORKFLOW", workflow),
        ("GITHUB_WORKSPACE", WORKSPACE),
        ("RUNNER_ARCH", "X64"),
        ("RUNNER_NAME", "udos"),
        ("RUNNER_OS", "Linux"),
    ] {
        env.insert(k.to_string(), v.to_string());
    }
    env.insert("GITHUB_API_URL".into(), facts.api_url());
    env
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts() -> RunFacts {
        RunFacts {
            event_name: "push".into(),
            event: Value::from_json_str(r#"{"ref": "refs/tags/v1", "after": "abc"}"#).unwrap(),
            sha: "abc".into(),
            git_ref: "refs/tags/v1".into(),
            repository: "octo/hello".into(),
            actor: "me".into(),
            server_url: "https://github.com".into(),
            run_id: "7".into(),
            run_number: "7".into(),
            run_attempt: "1".into(),
            ..RunFacts::default()
        }
    }

    #[test]
    fn github_context_derives_names_from_the_ref_and_repository() {
        let g = github(&facts(), "ci", "build");
        for (k, v) in [
            ("ref_name", "v1"),
            ("ref_type", "tag"),
            ("repository_owner", "octo"),
            ("workspace", WORKSPACE),
            ("job", "build"),
            ("api_url", "https://api.github.com"),
        ] {
            assert_eq!(g.get(k), Some(&Value::str(v)), "{k}");
        }
        assert_eq!(
            g.get("event").and_then(|e| e.get("after")),
            Some(&Value::str("abc"))
        );
        let env = github_env(&facts(), "ci", "build");
        assert_eq!(env["GITHUB_REF_NAME"], "v1");
        assert_eq!(env["GITHUB_WORKSPACE"], WORKSPACE);
    }

    #[test]
    fn enterprise_servers_get_their_own_api_url() {
        let f = RunFacts {
            server_url: "https://ghe.example/".into(),
            ..facts()
        };
        assert_eq!(f.api_url(), "https://ghe.example/api/v3");
    }
}
