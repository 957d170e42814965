//! Credentials out of the workspace layer's copy of `.git`.
//!
//! The workspace layer carries the repository so steps can run git, but a developer's
//! `.git/config` may hold credentials: a token in a remote's URL
//! (`https://user:TOKEN@host/o/r`), an `http.<url>.extraheader` (what
//! `actions/checkout` persists), or a `url.<base>.insteadOf` whose base has one; and
//! `FETCH_HEAD` names the URLs last fetched. The layer goes to every step, third-party
//! actions included, and into the restic repository for good, so the copy keeps the
//! URLs without their user info and drops the headers and those rewrites. The working
//! tree's own `.git` is never touched. Deciding is pure ([`plan`], [`strip_userinfo`],
//! [`scrub_fetch_head`]); [`scrub`] applies it with `git config --file`.

use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result};

/// How long one `git config` on the copy may take.
const GIT_LIMIT: Duration = Duration::from_secs(30);

/// One change to the copy's configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Edit {
    /// Replace every value of `key` with `values` (user info stripped).
    Rewrite { key: String, values: Vec<String> },
    /// Remove every value of `key`.
    Unset { key: String },
    /// Remove the section `section` (`url.<base>`).
    RemoveSection { section: String },
}

/// `url` without the credential in its user info (`https://u:p@h/x` → `https://h/x`);
/// `None` when it holds none. A password (`user:password@`) is one on any scheme; over
/// HTTP(S) the user alone is too (tokens go there: `https://TOKEN@host`). An SSH user
/// (`ssh://git@host/r`, scp-like `git@host:o/r`) is a login name, not a secret, and
/// is kept.
pub fn strip_userinfo(url: &str) -> Option<String> {
    let (scheme, rest) = url.split_once("://")?;
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, path) = rest.split_at(authority_end);
    let (userinfo, host) = authority.rsplit_once('@')?;
    let http = matches!(scheme.to_ascii_lowercase().as_str(), "http" | "https");
    (http || userinfo.contains(':')).then(|| format!("{scheme}://{host}{path}"))
}

/// The edits that take the credentials out of a configuration given as `git config
/// --list` entries (keys as git prints them: section and key lower-cased, the
/// subsection as written).
pub fn plan(entries: &[(String, String)]) -> Vec<Edit> {
    let mut edits: Vec<Edit> = Vec::new();
    let mut seen = std::collections::BTreeSet::new();
    for (key, _) in entries {
        if !seen.insert(key.clone()) {
            continue;
        }
        let values: Vec<&str> = entries
            .iter()
            .filter(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
            .collect();
        let (section, name) = match (key.split_once('.'), key.rsplit_once('.')) {
            (Some((section, _)), Some((_, name))) => (section, name),
            _ => continue,
        };
        let sub = key
            .strip_prefix(&format!("{section}."))
            .and_then(|k| k.strip_suffix(&format!(".{name}")));
        match (section, name) {
            ("remote" | "submodule", "url" | "pushurl")
                if values.iter().any(|v| strip_userinfo(v).is_some()) =>
            {
                edits.push(Edit::Rewrite {
                    key: key.clone(),
                    values: values
                        .iter()
                        .map(|v| strip_userinfo(v).unwrap_or_else(|| v.to_string()))
                        .collect(),
                });
            }
            ("http", "extraheader") => edits.push(Edit::Unset { key: key.clone() }),
            ("url", _) if sub.is_some_and(|s| strip_userinfo(s).is_some()) => {
                let section = format!("url.{}", sub.unwrap_or_default());
                if !edits
                    .iter()
                    .any(|e| matches!(e, Edit::RemoveSection { section: s } if *s == section))
                {
                    edits.push(Edit::RemoveSection { section });
                }
            }
            _ => {}
        }
    }
    edits
}

/// `FETCH_HEAD` with the user info taken out of the URLs it names (the last word of
/// each line's description: `<sha>\t[not-for-merge]\t<what> of <url>`).
pub fn scrub_fetch_head(text: &str) -> String {
    text.split_inclusive('\n')
        .map(|line| {
            let body = line.trim_end_matches('\n');
            match body.rsplit_once(' ') {
                Some((head, url)) => match strip_userinfo(url) {
                    Some(clean) => format!("{head} {clean}{}", &line[body.len()..]),
                    None => line.to_string(),
                },
                None => line.to_string(),
            }
        })
        .collect()
}

/// Takes the credentials out of the copied repository at `git_dir`; returns the keys
/// and sections it changed (for the log).
pub fn scrub(git_dir: &Path) -> Result<Vec<String>> {
    let mut changed = Vec::new();
    let config = git_dir.join("config");
    if config.is_file() {
        let git = |args: &[&str]| {
            let mut a = vec!["config", "--file"];
            let file = config.to_str().context("the config path is not UTF-8")?;
            a.push(file);
            a.extend_from_slice(args);
            crate::proc::run_bounded(
                &duct::cmd("git", a).stdout_capture().stderr_capture(),
                GIT_LIMIT,
                "git config",
            )
        };
        let listed = git(&["--null", "--list"])?;
        let entries: Vec<(String, String)> = String::from_utf8_lossy(&listed.stdout)
            .split('\0')
            .filter(|e| !e.is_empty())
            .map(|e| match e.split_once('\n') {
                Some((k, v)) => (k.to_string(), v.to_string()),
                None => (e.to_string(), String::new()),
            })
            .collect();
        for edit in plan(&entries) {
            match &edit {
                Edit::Rewrite { key, values } => {
                    git(&["--unset-all", key])?;
                    for v in values {
                        git(&["--add", key, v])?;
                    }
                    changed.push(key.clone());
                }
                Edit::Unset { key } => {
                    git(&["--unset-all", key])?;
                    changed.push(key.clone());
                }
                Edit::RemoveSection { section } => {
                    git(&["--remove-section", section])?;
                    changed.push(section.clone());
                }
            }
        }
    }
    let fetch_head = git_dir.join("FETCH_HEAD");
    if let Ok(text) = std::fs::read_to_string(&fetch_head) {
        let clean = scrub_fetch_head(&text);
        if clean != text {
            std::fs::write(&fetch_head, clean)?;
            changed.push("FETCH_HEAD".into());
        }
    }
    Ok(changed)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entries(list: &[(&str, &str)]) -> Vec<(String, String)> {
        list.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn user_info_is_stripped_from_scheme_urls_only() {
        assert_eq!(
            strip_userinfo("https://x-access-token:ghs_abc@github.com/o/r.git").as_deref(),
            Some("https://github.com/o/r.git")
        );
        assert_eq!(
            strip_userinfo("https://tok@host:8443/o/r").as_deref(),
            Some("https://host:8443/o/r")
        );
        // An @ in the path is not user info.
        assert_eq!(strip_userinfo("https://host/o/r@v1"), None);
        assert_eq!(strip_userinfo("https://github.com/o/r.git"), None);
        assert_eq!(strip_userinfo("git@github.com:o/r.git"), None);
        assert_eq!(strip_userinfo("ssh://git@github.com/o/r.git"), None);
        assert_eq!(
            strip_userinfo("ssh://git:pw@host/r").as_deref(),
            Some("ssh://host/r")
        );
        assert_eq!(strip_userinfo("/srv/git/r.git"), None);
    }

    #[test]
    fn credentials_are_planned_out_and_the_rest_is_left() {
        let e = entries(&[
            ("core.bare", "false"),
            ("remote.origin.url", "https://u:secret@github.com/o/r.git"),
            ("remote.origin.fetch", "+refs/heads/*:refs/remotes/origin/*"),
            ("remote.upstream.url", "https://github.com/up/r.git"),
            ("remote.Mirror.pushurl", "https://a@m1/r"),
            ("remote.Mirror.pushurl", "ssh://git@m2/r"),
            (
                "http.https://github.com/.extraheader",
                "AUTHORIZATION: basic abc",
            ),
            (
                "url.https://u:secret@github.com/.insteadof",
                "https://github.com/",
            ),
            ("url.https://u:secret@github.com/.pushinsteadof", "gh:"),
            ("url.https://mirror/.insteadof", "https://github.com/"),
        ]);
        assert_eq!(
            plan(&e),
            [
                Edit::Rewrite {
                    key: "remote.origin.url".into(),
                    values: vec!["https://github.com/o/r.git".into()]
                },
                Edit::Rewrite {
                    key: "remote.Mirror.pushurl".into(),
                    values: vec!["https://m1/r".into(), "ssh://git@m2/r".into()]
                },
                Edit::Unset {
                    key: "http.https://github.com/.extraheader".into()
                },
                Edit::RemoveSection {
                    section: "url.https://u:secret@github.com/".into()
                },
            ]
        );
        assert!(plan(&entries(&[("remote.origin.url", "git@github.com:o/r.git")])).is_empty());
    }

    #[test]
    fn fetch_head_keeps_its_lines_without_credentials() {
        let text = "abc\t\tbranch 'main' of https://u:tok@github.com/o/r\ndef\tnot-for-merge\tbranch 'x' of https://github.com/o/r\n";
        assert_eq!(
            scrub_fetch_head(text),
            "abc\t\tbranch 'main' of https://github.com/o/r\ndef\tnot-for-merge\tbranch 'x' of https://github.com/o/r\n"
        );
    }

    /// With real git: the copy's config loses the credentials and keeps the rest.
    #[test]
    fn scrub_takes_credentials_out_of_a_real_config() {
        let d = tempfile::tempdir().unwrap();
        let git_dir = d.path().join(".git");
        duct::cmd!("git", "init", "-q", "--bare", &git_dir)
            .run()
            .unwrap();
        let cfg = git_dir.join("config");
        let set = |k: &str, v: &str| {
            duct::cmd!("git", "config", "--file", &cfg, "--add", k, v)
                .run()
                .unwrap();
        };
        set("remote.origin.url", "https://u:s3cr3t@example.com/o/r.git");
        set(
            "http.https://example.com/.extraheader",
            "AUTHORIZATION: basic s3cr3t",
        );
        set(
            "url.https://u:s3cr3t@example.com/.insteadOf",
            "https://example.com/",
        );
        set("user.name", "Dev");
        std::fs::write(
            git_dir.join("FETCH_HEAD"),
            "abc\t\tbranch 'main' of https://u:s3cr3t@example.com/o/r\n",
        )
        .unwrap();
        let changed = scrub(&git_dir).unwrap();
        assert_eq!(changed.len(), 4, "{changed:?}");
        let config = std::fs::read_to_string(&cfg).unwrap();
        let fetch = std::fs::read_to_string(git_dir.join("FETCH_HEAD")).unwrap();
        assert!(!config.contains("s3cr3t"), "{config}");
        assert!(!fetch.contains("s3cr3t"), "{fetch}");
        let get = |k: &str| {
            duct::cmd!("git", "config", "--file", &cfg, "--get", k)
                .read()
                .unwrap()
        };
        assert_eq!(get("remote.origin.url"), "https://example.com/o/r.git");
        assert_eq!(get("user.name"), "Dev");
        // Nothing left to do the second time.
        assert!(scrub(&git_dir).unwrap().is_empty());
    }
}
