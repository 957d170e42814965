//! What the repository says about the run: commit, ref, name, who, and what a push
//! changed; and the event payload when the user gives none.

use std::path::{Path, PathBuf};
use std::time::Duration;

use indexmap::IndexMap;
use udos_core::engine::contexts::RunFacts;
use udos_core::event::EventFacts;
use udos_core::value::{Object, Value};

const GIT_LIMIT: Duration = Duration::from_secs(60);

/// Facts read from git (empty strings where git has no answer).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RepoInfo {
    /// The working tree's top (the workflow's directory when it is not a git tree).
    pub root: PathBuf,
    /// HEAD's commit.
    pub sha: String,
    /// `refs/heads/<branch>`, or empty when HEAD is detached.
    pub git_ref: String,
    /// `owner/name`, from the `origin` remote, else `local/<directory name>`.
    pub repository: String,
    /// `https://<host>` of the origin, else `https://github.com`.
    pub server_url: String,
    /// `git config user.name`, else `$USER`, else `udos`.
    pub actor: String,
}

fn git(root: &Path, args: &[&str]) -> Option<String> {
    let expr = duct::cmd("git", args).dir(root).unchecked();
    let out =
        crate::proc::run_bounded(&expr.stdout_capture().stderr_null(), GIT_LIMIT, "git").ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// git's exit code for `args` in `root` (`None` when it could not run or was stopped).
fn git_code(root: &Path, args: &[&str]) -> Option<i32> {
    let expr = duct::cmd("git", args).dir(root).unchecked();
    let out = crate::proc::run_bounded(&expr.stdout_null().stderr_null(), GIT_LIMIT, "git").ok()?;
    out.status.code()
}

/// HEAD's commit (`None`: not a git tree, or no commit yet).
pub fn head(root: &Path) -> Option<String> {
    git(root, &["rev-parse", "--verify", "-q", "HEAD"])
}

/// The tags pointing at HEAD of the tree at `root`, sorted (`None`: git cannot tell).
pub fn head_tags(root: &Path) -> Option<Vec<String>> {
    let out = git(root, &["tag", "--points-at", "HEAD"])?;
    let mut tags: Vec<String> = out.lines().map(str::to_string).collect();
    tags.retain(|t| !t.is_empty());
    tags.sort();
    Some(tags)
}

/// Whether the working tree at `root` is HEAD's commit: nothing changed, staged or
/// untracked (ignored files aside). `None`: git cannot tell.
pub fn is_clean(root: &Path) -> Option<bool> {
    git(root, &["status", "--porcelain", "--untracked-files=normal"]).map(|o| o.is_empty())
}

/// Whether commit `ancestor` is `descendant` or one of its ancestors (`None`: git
/// cannot tell, e.g. a commit it does not have).
pub fn is_ancestor(root: &Path, ancestor: &str, descendant: &str) -> Option<bool> {
    match git_code(root, &["merge-base", "--is-ancestor", ancestor, descendant])? {
        0 => Some(true),
        1 => Some(false),
        _ => None,
    }
}

/// Whether the tag `tag` still names `commit` in the repository at `root` (`None`: git
/// cannot tell, e.g. the repository is gone).
pub fn tag_names(root: &Path, tag: &str, commit: &str) -> Option<bool> {
    if !root.is_dir() {
        return None;
    }
    let r = format!("refs/tags/{tag}^{{commit}}");
    match git_code(root, &["rev-parse", "-q", "--verify", &r])? {
        0 => Some(git(root, &["rev-parse", "-q", "--verify", &r]).as_deref() == Some(commit)),
        1 => Some(false),
        _ => None,
    }
}

/// Reads the facts of the tree at `root`.
pub fn inspect(root: &Path) -> RepoInfo {
    // Four independent queries at once: each is a process start, on every run.
    let [sha, git_ref, origin, user] = std::thread::scope(|s| {
        [
            &["rev-parse", "--verify", "-q", "HEAD"][..],
            &["symbolic-ref", "-q", "HEAD"],
            &["remote", "get-url", "origin"],
            &["config", "user.name"],
        ]
        .map(|args| s.spawn(move || git(root, args)))
        .map(|h| h.join().ok().flatten())
    });
    let sha = sha.unwrap_or_default();
    let git_ref = git_ref.unwrap_or_default();
    let origin = origin.unwrap_or_default();
    let (server_url, repository) = parse_remote(&origin).unwrap_or_else(|| {
        let dir = root
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "repository".into());
        ("https://github.com".to_string(), format!("local/{dir}"))
    });
    let actor = user
        .filter(|s| !s.is_empty())
        .or_else(|| std::env::var("USER").ok())
        .unwrap_or_else(|| "udos".into());
    RepoInfo {
        root: root.to_path_buf(),
        sha,
        git_ref,
        repository,
        server_url,
        actor,
    }
}

/// `git@github.com:o/r.git`, `https://github.com/o/r(.git)`, `ssh://git@host/o/r` →
/// (`https://host`, `o/r`).
pub fn parse_remote(url: &str) -> Option<(String, String)> {
    let url = url.trim().trim_end_matches('/').trim_end_matches(".git");
    let (host, path) = if let Some(rest) = url.split_once("://").map(|(_, r)| r) {
        let rest = rest.rsplit_once('@').map(|(_, r)| r).unwrap_or(rest);
        rest.split_once('/')?
    } else if let Some((userhost, path)) = url.split_once(':') {
        (
            userhost
                .rsplit_once('@')
                .map(|(_, h)| h)
                .unwrap_or(userhost),
            path,
        )
    } else {
        return None;
    };
    let host = host.split(':').next()?;
    let parts: Vec<&str> = path.split('/').filter(|p| !p.is_empty()).collect();
    if parts.len() < 2 || host.is_empty() {
        return None;
    }
    let repo = format!("{}/{}", parts[parts.len() - 2], parts[parts.len() - 1]);
    Some((format!("https://{host}"), repo))
}

/// Paths a push changed: `before..after` of the payload when both are commits git
/// knows, else HEAD's own change (`HEAD^..HEAD`, or every file of a root commit).
/// `None` when git cannot tell.
pub fn changed_paths(root: &Path, payload: &Value, sha: &str) -> Option<Vec<String>> {
    let get = |k: &str| payload.get(k).and_then(Value::as_str).map(str::to_string);
    let known = |c: &str| {
        !c.is_empty()
            && !c.chars().all(|ch| ch == '0')
            && git(root, &["cat-file", "-e", &format!("{c}^{{commit}}")]).is_some()
    };
    let out = match (get("before"), get("after")) {
        (Some(b), Some(a)) if known(&b) && known(&a) => git(root, &["diff", "--name-only", &b, &a]),
        _ if sha.is_empty() => None,
        _ => git(
            root,
            &[
                "diff-tree",
                "--no-commit-id",
                "--name-only",
                "-r",
                "--root",
                sha,
            ],
        ),
    }?;
    Some(out.lines().map(str::to_string).collect())
}

/// The payload GitHub would send when the user gives none: enough for the usual
/// fields (`ref`, `before`/`after`, `head_commit`, `repository`, `inputs`, ...).
pub fn default_payload(event: &str, info: &RepoInfo, inputs: &IndexMap<String, Value>) -> Value {
    let s = |v: &str| Value::str(v);
    let mut repo = Object::new();
    let (owner, name) = info
        .repository
        .split_once('/')
        .unwrap_or(("local", info.repository.as_str()));
    repo.insert("full_name", s(&info.repository));
    repo.insert("name", s(name));
    let mut o = Object::new();
    o.insert("login", s(owner));
    o.insert("name", s(owner));
    repo.insert("owner", Value::Object(o));
    repo.insert("default_branch", s(branch(&info.git_ref).unwrap_or("main")));
    let mut sender = Object::new();
    sender.insert("login", s(&info.actor));
    let mut p = Object::new();
    p.insert("repository", Value::Object(repo));
    p.insert("sender", Value::Object(sender));
    match event {
        "push" => {
            p.insert("ref", s(&info.git_ref));
            p.insert("before", s(&"0".repeat(40)));
            p.insert("after", s(&info.sha));
            let mut head = Object::new();
            head.insert("id", s(&info.sha));
            p.insert("head_commit", Value::Object(head));
        }
        "workflow_dispatch" => {
            p.insert("ref", s(&info.git_ref));
            p.insert(
                "inputs",
                Value::Object(
                    inputs
                        .iter()
                        .map(|(k, v)| (k.clone(), Value::str(v.to_string())))
                        .collect(),
                ),
            );
        }
        "pull_request" | "pull_request_target" => {
            let b = branch(&info.git_ref).unwrap_or("main");
            let mut pr = Object::new();
            let mut head = Object::new();
            head.insert("ref", s(b));
            head.insert("sha", s(&info.sha));
            let mut base = Object::new();
            base.insert("ref", s(b));
            pr.insert("head", Value::Object(head));
            pr.insert("base", Value::Object(base));
            pr.insert("number", Value::Number(1.0));
            p.insert("pull_request", Value::Object(pr));
            p.insert("number", Value::Number(1.0));
            p.insert("action", s("opened"));
        }
        _ => {}
    }
    Value::Object(p)
}

fn branch(git_ref: &str) -> Option<&str> {
    git_ref.strip_prefix("refs/heads/")
}

/// The run's facts: the repository's, with the event payload's `ref`/pull request
/// fields taking precedence where it has them.
pub fn run_facts(info: &RepoInfo, event: &str, payload: &Value, run_id: i64) -> RunFacts {
    let get = |path: &[&str]| {
        let mut v = Some(payload);
        for p in path {
            v = v.and_then(|x| x.get(p));
        }
        v.and_then(Value::as_str).map(str::to_string)
    };
    let pr = event.starts_with("pull_request");
    let git_ref = if pr {
        get(&["pull_request", "number"])
            .or_else(|| payload.get("number").map(|n| n.to_string()))
            .map(|n| format!("refs/pull/{n}/merge"))
            .unwrap_or_else(|| info.git_ref.clone())
    } else {
        get(&["ref"]).unwrap_or_else(|| info.git_ref.clone())
    };
    RunFacts {
        event_name: event.to_string(),
        event: payload.clone(),
        sha: get(&["after"])
            .filter(|_| event == "push")
            .unwrap_or_else(|| info.sha.clone()),
        git_ref,
        head_ref: if pr {
            get(&["pull_request", "head", "ref"]).unwrap_or_default()
        } else {
            String::new()
        },
        base_ref: if pr {
            get(&["pull_request", "base", "ref"]).unwrap_or_default()
        } else {
            String::new()
        },
        repository: info.repository.clone(),
        actor: get(&["sender", "login"]).unwrap_or_else(|| info.actor.clone()),
        server_url: info.server_url.clone(),
        run_id: run_id.to_string(),
        run_number: run_id.to_string(),
        run_attempt: "1".into(),
    }
}

/// What the trigger filters look at.
pub fn event_facts(facts: &RunFacts, changed: Option<Vec<String>>) -> EventFacts {
    let activity = facts
        .event
        .get("action")
        .and_then(Value::as_str)
        .map(str::to_string);
    EventFacts {
        name: facts.event_name.clone(),
        git_ref: (!facts.git_ref.is_empty()).then(|| facts.git_ref.clone()),
        base_ref: (!facts.base_ref.is_empty()).then(|| facts.base_ref.clone()),
        changed_paths: changed,
        activity,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remotes_name_the_server_and_repository() {
        for (url, server, repo) in [
            (
                "git@github.com:octo/hello.git",
                "https://github.com",
                "octo/hello",
            ),
            (
                "https://github.com/octo/hello",
                "https://github.com",
                "octo/hello",
            ),
            (
                "https://user:tok@ghe.example:8443/org/proj.git/",
                "https://ghe.example",
                "org/proj",
            ),
            (
                "ssh://git@gitlab.example/group/sub/proj",
                "https://gitlab.example",
                "sub/proj",
            ),
        ] {
            assert_eq!(
                parse_remote(url),
                Some((server.to_string(), repo.to_string())),
                "{url}"
            );
        }
        assert_eq!(parse_remote("/srv/repo.git"), None);
        assert_eq!(parse_remote(""), None);
    }

    #[test]
    fn a_git_tree_gives_its_commit_branch_and_changes() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path();
        let g = |args: &[&str]| {
            assert!(std::process::Command::new("git")
                .args(args)
                .current_dir(root)
                .env("GIT_AUTHOR_NAME", "t")
                .env("GIT_AUTHOR_EMAIL", "t@e.invalid")
                .env("GIT_COMMITTER_NAME", "t")
                .env("GIT_COMMITTER_EMAIL", "t@e.invalid")
                .status()
                .unwrap()
                .success())
        };
        g(&["init", "-q", "-b", "trunk", "."]);
        std::fs::write(root.join("a"), "1").unwrap();
        g(&["add", "a"]);
        g(&["commit", "-q", "-m", "one"]);
        std::fs::write(root.join("b"), "2").unwrap();
        g(&["add", "b"]);
        g(&["commit", "-q", "-m", "two"]);
        g(&["remote", "add", "origin", "git@github.com:octo/hello.git"]);
        let info = inspect(root);
        assert_eq!(info.git_ref, "refs/heads/trunk");
        assert_eq!(info.sha.len(), 40);
        assert_eq!(info.repository, "octo/hello");
        let payload = default_payload("push", &info, &IndexMap::new());
        assert_eq!(
            changed_paths(root, &payload, &info.sha),
            Some(vec!["b".to_string()])
        );
        let facts = run_facts(&info, "push", &payload, 3);
        assert_eq!(facts.git_ref, "refs/heads/trunk");
        assert_eq!(facts.ref_name(), "trunk");
        assert_eq!(facts.run_id, "3");
        // A payload naming a tag push wins over the branch.
        let tag = Value::from_json_str(r#"{"ref": "refs/tags/v1"}"#).unwrap();
        assert_eq!(run_facts(&info, "push", &tag, 3).ref_type(), "tag");

        // Tags, cleanliness and ancestry, as the tag squash reads them.
        let first = git(root, &["rev-parse", "HEAD^"]).unwrap();
        assert_eq!(head_tags(root), Some(vec![]));
        g(&["tag", "v2"]);
        g(&["tag", "-a", "-m", "annotated", "v1"]);
        assert_eq!(head_tags(root), Some(vec!["v1".into(), "v2".into()]));
        assert_eq!(is_clean(root), Some(true));
        std::fs::write(root.join("c"), "3").unwrap();
        assert_eq!(is_clean(root), Some(false));
        assert_eq!(is_ancestor(root, &first, &info.sha), Some(true));
        assert_eq!(is_ancestor(root, &info.sha, &first), Some(false));
        assert_eq!(is_ancestor(root, &"1".repeat(40), &first), None);
        assert_eq!(tag_names(root, "v1", &info.sha), Some(true));
        assert_eq!(tag_names(root, "v1", &first), Some(false));
        assert_eq!(tag_names(root, "gone", &info.sha), Some(false));
        assert_eq!(tag_names(&root.join("nowhere"), "v1", &info.sha), None);
    }
}
