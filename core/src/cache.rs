//! The step cache's rules: what a step's result depends on (its key), and whether a
//! recorded result still holds for the workspace a step would see now.
//!
//! A step's output is a function of the image it boots, the base, the layers the
//! earlier steps of its leg made, its definition after expression evaluation (which
//! holds its env, its inputs and every value it took from earlier steps or jobs), the
//! names of the secrets it uses, and the workspace files it actually read. The first
//! group is hashed into the key ([`step_key`]); the files it read are recorded with
//! their content ([`ReadEntry`]) and checked against the workspace at lookup
//! ([`reads_hold`]), so a change to a file the step never read does not rerun it.
//! docs/cache.md states the rules and what the cache cannot see.

use std::collections::BTreeSet;

use indexmap::IndexMap;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::engine::leg::{ResolvedBody, ResolvedStep};

/// Format version of the key; bump when what goes into it changes.
const KEY_VERSION: &str = "udos-step-key-v3";

/// Variables whose values change from run to run (or commit to commit) without
/// changing what a step does with its files; they are not part of the key. A step
/// that reads one of them at run time and acts on it must opt out (docs/cache.md).
/// Expressions that use the same values (`${{ github.sha }}`) are substituted into the
/// step's text, so those steps are keyed on them.
pub const VOLATILE_ENV: &[&str] = &[
    "GITHUB_RUN_ID",
    "GITHUB_RUN_NUMBER",
    "GITHUB_RUN_ATTEMPT",
    "GITHUB_SHA",
    "GITHUB_REF",
    "GITHUB_REF_NAME",
    "GITHUB_REF_TYPE",
    "GITHUB_HEAD_REF",
    "GITHUB_BASE_REF",
    "GITHUB_ACTOR",
    "GITHUB_TRIGGERING_ACTOR",
];

/// The step's env (any level) that opts it out of the cache: `UDOS_CACHE: false`.
pub const OPT_OUT_VAR: &str = "UDOS_CACHE";

/// Does the step opt out of the cache?
pub fn opted_out(step: &ResolvedStep) -> bool {
    step.env.get(OPT_OUT_VAR).is_some_and(|v| {
        matches!(
            v.trim().to_ascii_lowercase().as_str(),
            "false" | "0" | "off" | "no"
        )
    })
}

/// What a step's key is made of, besides the step itself.
#[derive(Debug, Clone)]
pub struct KeyInputs<'a> {
    /// Content id of the guest image (kernel + initramfs).
    pub image_id: &'a str,
    /// The base layer's id.
    pub base_id: &'a str,
    /// The layers this leg's earlier steps made, bottom first (not the workspace:
    /// what the step read of it is checked file by file).
    pub layers: &'a [String],
    /// For a local action, the SHA-256 of its `action.yml` as the step would see it
    /// (act reads it itself, outside what the step's own reads record).
    pub action_definition: Option<&'a str>,
    /// The names of the secrets whose values the step was given.
    pub secret_names: &'a [String],
}

/// The step's cache key: 64 hex digits.
pub fn step_key(step: &ResolvedStep, inputs: &KeyInputs<'_>) -> String {
    let mut h = Sha256::new();
    // Every field is length-prefixed so that no two different inputs concatenate alike.
    let mut field = |bytes: &[u8]| {
        h.update((bytes.len() as u64).to_le_bytes());
        h.update(bytes);
    };
    field(KEY_VERSION.as_bytes());
    field(inputs.image_id.as_bytes());
    field(inputs.base_id.as_bytes());
    field(&(inputs.layers.len() as u64).to_le_bytes());
    for l in inputs.layers {
        field(l.as_bytes());
    }
    field(inputs.action_definition.unwrap_or("").as_bytes());
    let mut names = inputs.secret_names.to_vec();
    names.sort();
    for n in &names {
        field(n.as_bytes());
    }
    field(step.event_name.as_bytes());
    field(step.job_id.as_bytes());
    match &step.body {
        ResolvedBody::Run {
            script,
            shell,
            working_directory,
        } => {
            field(b"run");
            field(script.as_bytes());
            field(shell.as_deref().unwrap_or("").as_bytes());
            field(working_directory.as_bytes());
        }
        ResolvedBody::Uses { uses, with } => {
            field(b"uses");
            field(uses.as_bytes());
            field(&canonical(with));
        }
    }
    let env: IndexMap<String, String> = step
        .env
        .iter()
        .filter(|(k, _)| !VOLATILE_ENV.contains(&k.as_str()))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    field(&canonical(&env));
    hex::encode(h.finalize())
}

/// Key-order-independent bytes of a string map.
fn canonical(m: &IndexMap<String, String>) -> Vec<u8> {
    let mut pairs: Vec<(&String, &String)> = m.iter().collect();
    pairs.sort();
    let mut out = Vec::new();
    for (k, v) in pairs {
        out.extend_from_slice(&(k.len() as u64).to_le_bytes());
        out.extend_from_slice(k.as_bytes());
        out.extend_from_slice(&(v.len() as u64).to_le_bytes());
        out.extend_from_slice(v.as_bytes());
    }
    out
}

/// What a path of the workspace was when a step read it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum Seen {
    /// A regular file with this content (SHA-256, hex).
    File {
        /// Content hash.
        sha256: String,
    },
    /// A directory with these entry names (SHA-256 of the sorted names, hex).
    Dir {
        /// Listing hash.
        sha256: String,
    },
    /// A symlink to this target.
    Symlink {
        /// The link's target.
        target: String,
    },
    /// Nothing there (the step created it, or looked for it and found nothing).
    Absent,
}

/// One recorded read: a path relative to the workspace, and what it was.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReadEntry {
    /// Relative to the workspace.
    pub path: String,
    /// What it was.
    pub seen: Seen,
}

/// Does every recorded read still see the same thing? `now` says what a path is in
/// the workspace the step would see now.
pub fn reads_hold(reads: &[ReadEntry], now: impl Fn(&str) -> Seen) -> bool {
    reads.iter().all(|r| now(&r.path) == r.seen)
}

/// The directories a step looked names up in, beside the paths it read: the workspace
/// root (`""`: the step's working directory, where a relative `test -e FILE` looks)
/// and every directory above a path it read. Their listings are recorded with its
/// reads, so a file that later appears where the step looked for it and found nothing
/// (a lookup fanotify cannot report) reruns the step.
pub fn looked_in<'a>(read: impl IntoIterator<Item = &'a str>) -> BTreeSet<String> {
    let mut dirs = BTreeSet::from([String::new()]);
    for path in read {
        let mut rest = path.trim_matches('/');
        while let Some((parent, _)) = rest.rsplit_once('/') {
            dirs.insert(parent.to_string());
            rest = parent;
        }
    }
    dirs
}

/// The hash of a directory listing as [`Seen::Dir`] records it.
pub fn listing_hash<'a>(names: impl IntoIterator<Item = &'a str>) -> String {
    let mut names: Vec<&str> = names.into_iter().collect();
    names.sort_unstable();
    let mut h = Sha256::new();
    for n in names {
        h.update((n.len() as u64).to_le_bytes());
        h.update(n.as_bytes());
    }
    hex::encode(h.finalize())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn step(script: &str, env: &[(&str, &str)]) -> ResolvedStep {
        ResolvedStep {
            number: 1,
            id: None,
            name: "s".into(),
            body: ResolvedBody::Run {
                script: script.into(),
                shell: None,
                working_directory: "/workspace".into(),
            },
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            continue_on_error: false,
            timeout_minutes: None,
            secrets: Default::default(),
            masks: vec![],
            job_id: "build".into(),
            leg_name: "build".into(),
            workflow_name: "ci".into(),
            event_name: "push".into(),
        }
    }

    fn key(s: &ResolvedStep, layers: &[&str], secrets: &[&str]) -> String {
        let layers: Vec<String> = layers.iter().map(|l| l.to_string()).collect();
        let secrets: Vec<String> = secrets.iter().map(|l| l.to_string()).collect();
        step_key(
            s,
            &KeyInputs {
                image_id: "img",
                base_id: "base",
                layers: &layers,
                action_definition: None,
                secret_names: &secrets,
            },
        )
    }

    #[test]
    fn the_key_follows_what_the_step_does_not_the_run_it_is_in() {
        let a = step(
            "make",
            &[("A", "1"), ("GITHUB_RUN_ID", "7"), ("GITHUB_SHA", "abc")],
        );
        let base = key(&a, &["l1"], &["TOKEN"]);
        assert_eq!(base.len(), 64);
        // Another run, another commit: same key.
        let b = step(
            "make",
            &[("GITHUB_SHA", "def"), ("A", "1"), ("GITHUB_RUN_ID", "8")],
        );
        assert_eq!(base, key(&b, &["l1"], &["TOKEN"]));
        // What the step does, its inputs and the layers under it: other keys.
        assert_ne!(
            base,
            key(&step("make all", &[("A", "1")]), &["l1"], &["TOKEN"])
        );
        assert_ne!(base, key(&step("make", &[("A", "2")]), &["l1"], &["TOKEN"]));
        assert_ne!(base, key(&a, &["l2"], &["TOKEN"]));
        assert_ne!(base, key(&a, &["l1"], &["OTHER"]));
        assert_ne!(base, key(&a, &[], &["TOKEN"]));
    }

    #[test]
    fn reads_hold_only_when_every_path_is_as_it_was() {
        let reads = vec![
            ReadEntry {
                path: "src/a.rs".into(),
                seen: Seen::File {
                    sha256: "h1".into(),
                },
            },
            ReadEntry {
                path: "gen".into(),
                seen: Seen::Absent,
            },
        ];
        let same = |p: &str| match p {
            "src/a.rs" => Seen::File {
                sha256: "h1".into(),
            },
            _ => Seen::Absent,
        };
        assert!(reads_hold(&reads, same));
        let changed = |p: &str| match p {
            "src/a.rs" => Seen::File {
                sha256: "h2".into(),
            },
            _ => Seen::Absent,
        };
        assert!(!reads_hold(&reads, changed));
        let appeared = |p: &str| match p {
            "src/a.rs" => Seen::File {
                sha256: "h1".into(),
            },
            _ => Seen::File { sha256: "x".into() },
        };
        assert!(!reads_hold(&reads, appeared));
        assert_eq!(listing_hash(["b", "a"]), listing_hash(["a", "b"]));
        assert_ne!(listing_hash(["a"]), listing_hash(["a", "b"]));
    }

    #[test]
    fn a_step_looked_in_the_root_and_every_directory_above_what_it_read() {
        let dirs = looked_in(["src/core/a.rs", "/src/b.rs", "top.txt", "docs/"]);
        let want: BTreeSet<String> = ["", "src", "src/core"]
            .into_iter()
            .map(String::from)
            .collect();
        assert_eq!(dirs, want);
        assert_eq!(looked_in([]), BTreeSet::from([String::new()]));
    }

    #[test]
    fn a_step_opts_out_with_udos_cache_false() {
        assert!(opted_out(&step("x", &[("UDOS_CACHE", "false")])));
        assert!(!opted_out(&step("x", &[("UDOS_CACHE", "true")])));
        assert!(!opted_out(&step("x", &[])));
    }
}
