//! Desired state: what a published commit asks the cluster to run.
//!
//! CI (or an evaluation server) publishes, for a successfully built commit, the full
//! list of [`DesiredSpec`]s. The master validates it ([`validate`]), computes its
//! [`intent_hash`] and numbers it as a generation. Pure: no I/O.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// CPU and memory a spec needs, or a worker offers.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Resources {
    /// Thousandths of a CPU (1000 = one vCPU).
    pub cpu_millis: u64,
    /// MiB of memory.
    pub memory_mib: u64,
}

/// What a spec runs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum SpecKind {
    /// A VM that runs until it is replaced.
    Service {
        /// Content hash of the guest image to boot.
        image: String,
        /// How many instances; each is placed on its own worker when possible.
        replicas: u32,
    },
    /// A workflow run that runs to completion through the step runner.
    WorkflowRun {
        /// Path of the workflow file at the commit (e.g. `.github/workflows/ci.yml`).
        workflow: String,
        /// The job to run; `None` when the workflow has exactly one.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        job: Option<String>,
        /// Where workers fetch the publication's commit from (`https://`, `http://`,
        /// `ssh://`, `git://`, `file://` or scp-like `host:path`, see
        /// [`check_repository`]); `None`: the worker's own `--repository`, else its
        /// `--workdir`. Part of the signed intent when set; left out of the canonical
        /// JSON when not, so publications without it keep their intent hash.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        repository: Option<String>,
    },
}

/// One desired spec.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DesiredSpec {
    /// Logical id, unique within a publication (`[A-Za-z0-9._-]`, 1..=128).
    pub id: String,
    /// Content hash of the spec, as the publisher computed it (hex, 16..=128 digits).
    pub hash: String,
    /// What it runs.
    #[serde(flatten)]
    pub kind: SpecKind,
    /// The spec's own labels.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Worker labels required: every `key=value` must be on the worker.
    #[serde(default)]
    pub selector: BTreeMap<String, String>,
    /// Resources one instance needs.
    #[serde(default)]
    pub resources: Resources,
}

impl DesiredSpec {
    /// Instances to place: `replicas` for a service, one for a workflow run.
    pub fn instances(&self) -> u32 {
        match &self.kind {
            SpecKind::Service { replicas, .. } => *replicas,
            SpecKind::WorkflowRun { .. } => 1,
        }
    }
}

/// Why a publication is refused. The master changes nothing when it refuses.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Invalid {
    /// The commit is not a git object id.
    #[error("commit `{0}` is not a 40- or 64-digit hex git object id")]
    Commit(String),
    /// A spec id is malformed.
    #[error("spec id `{0}` must be 1-128 characters of A-Z a-z 0-9 . _ -")]
    Id(String),
    /// Two specs share an id.
    #[error("spec id `{0}` appears more than once")]
    DuplicateId(String),
    /// A spec has no usable content hash.
    #[error("spec `{0}` has no content hash (hex, 16-128 digits)")]
    Hash(String),
    /// A service asks for more than [`MAX_REPLICAS`] replicas.
    #[error("spec `{id}` asks for {replicas} replicas; at most {MAX_REPLICAS} are allowed")]
    TooManyReplicas {
        /// Spec id.
        id: String,
        /// What it asked for.
        replicas: u32,
    },
    /// The publication asks for more than [`MAX_INSTANCES`] instances in all.
    #[error(
        "the publication asks for {total} instances in all; at most {MAX_INSTANCES} are allowed"
    )]
    TooManyInstances {
        /// Instances asked for, summed over every spec.
        total: u64,
    },
    /// A workflow path that could name a file outside the repository.
    #[error("spec `{id}`: workflow path `{path}` {why}; it must be relative to the repository root, like `.github/workflows/ci.yml`")]
    WorkflowPath {
        /// Spec id.
        id: String,
        /// The path as published.
        path: String,
        /// What is wrong with it.
        why: &'static str,
    },
    /// A repository URL workers could not fetch from safely.
    #[error("spec `{id}`: repository `{url}` {why}; give an https://, http://, ssh://, git:// or file:// URL, or host:path")]
    Repository {
        /// Spec id.
        id: String,
        /// The URL as published.
        url: String,
        /// What is wrong with it.
        why: &'static str,
    },
    /// A field is missing or empty.
    #[error("spec `{id}`: {what}")]
    Incomplete {
        /// Spec id.
        id: String,
        /// What is wrong.
        what: String,
    },
}

/// Most replicas one service may ask for. Each replica is an instance the master
/// places and lists in its status and a worker boots as a VM: a thousand VMs of one
/// service is far beyond any fleet udos serves, and the bound keeps one spec from
/// making the master allocate without limit.
pub const MAX_REPLICAS: u32 = 1_000;

/// Most instances (replicas summed over every spec) of one publication. The
/// scheduler's time and memory and the status report grow linearly with it; 100,000 is
/// ten times the scheduling benchmark (10,000 specs on 1,000 workers, tens of ms).
pub const MAX_INSTANCES: u64 = 100_000;

fn is_hex(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b.is_ascii_hexdigit())
}

/// Why a workflow path is refused, if it is. It is joined to the worker's checkout,
/// so it must stay inside: relative (no leading `/`), normalised (no empty, `.` or
/// `..` components) and without NUL. Workers check it again before running.
pub fn check_workflow_path(path: &str) -> Result<(), &'static str> {
    if path.is_empty() {
        return Err("is empty");
    }
    if path.starts_with('/') {
        return Err("is absolute");
    }
    if path.contains('\0') {
        return Err("contains NUL");
    }
    for part in path.split('/') {
        match part {
            "" => return Err("has an empty component"),
            "." => return Err("has a `.` component"),
            ".." => return Err("has a `..` component"),
            _ => {}
        }
    }
    Ok(())
}

/// Longest repository URL a workflow run may name.
pub const MAX_REPOSITORY_LEN: usize = 2048;

/// URL schemes a workflow run's repository may use: git's own transports. Remote
/// helpers (`ext::`, `fd::`, `transport::address`) are refused: `ext::` runs a command.
pub const REPOSITORY_SCHEMES: [&str; 5] = ["https", "http", "ssh", "git", "file"];

/// Why a repository URL is refused, if it is. Workers pass it to `git fetch`, so it
/// must not read as an option (leading `-`), hold whitespace or control characters,
/// or name a remote helper: it is `scheme://...` with a scheme of
/// [`REPOSITORY_SCHEMES`], or scp-like `[user@]host:path`. Workers check it again.
pub fn check_repository(url: &str) -> Result<(), &'static str> {
    if url.is_empty() {
        return Err("is empty");
    }
    if url.len() > MAX_REPOSITORY_LEN {
        return Err("is longer than 2048 bytes");
    }
    if url.chars().any(|c| c.is_control() || c.is_whitespace()) {
        return Err("contains whitespace or a control character");
    }
    if url.starts_with('-') {
        return Err("starts with `-`");
    }
    if let Some((scheme, rest)) = url.split_once("://") {
        if !REPOSITORY_SCHEMES.contains(&scheme) {
            return Err("has an unsupported scheme");
        }
        if rest.is_empty() {
            return Err("names no host or path");
        }
        return Ok(());
    }
    // scp-like: a host before the first `:`, no `/` in it, and not `::` (a helper).
    match url.split_once(':') {
        Some((host, path)) if !host.is_empty() && !host.contains('/') => {
            if path.starts_with(':') {
                Err("names a remote helper (`transport::address`)")
            } else if path.is_empty() {
                Err("names no path")
            } else {
                Ok(())
            }
        }
        _ => Err("is not a URL"),
    }
}

/// Check that a publication is small enough to schedule: no service above
/// [`MAX_REPLICAS`], no more than [`MAX_INSTANCES`] instances in all. Cheap (no
/// allocation), so it can guard anything that expands specs into instances.
pub fn check_size(specs: &[DesiredSpec]) -> Result<(), Invalid> {
    let mut total: u64 = 0;
    for s in specs {
        if let SpecKind::Service { replicas, .. } = &s.kind {
            if *replicas > MAX_REPLICAS {
                return Err(Invalid::TooManyReplicas {
                    id: s.id.clone(),
                    replicas: *replicas,
                });
            }
        }
        total = total.saturating_add(u64::from(s.instances()));
    }
    if total > MAX_INSTANCES {
        return Err(Invalid::TooManyInstances { total });
    }
    Ok(())
}

/// Check a publication: commit id, complete specs, unique ids, hashes present, and
/// its size ([`check_size`]).
/// (Whether selectors can be satisfied depends on the workers: the scheduler reports
/// that, it does not make a publication invalid.)
pub fn validate(commit: &str, specs: &[DesiredSpec]) -> Result<(), Invalid> {
    if !(commit.len() == 40 || commit.len() == 64) || !is_hex(commit) {
        return Err(Invalid::Commit(commit.to_string()));
    }
    let mut seen = BTreeSet::new();
    for s in specs {
        let id_ok = (1..=128).contains(&s.id.len())
            && s.id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-');
        if !id_ok {
            return Err(Invalid::Id(s.id.clone()));
        }
        if !seen.insert(s.id.as_str()) {
            return Err(Invalid::DuplicateId(s.id.clone()));
        }
        if !(16..=128).contains(&s.hash.len()) || !is_hex(&s.hash) {
            return Err(Invalid::Hash(s.id.clone()));
        }
        let incomplete = |what: &str| Invalid::Incomplete {
            id: s.id.clone(),
            what: what.to_string(),
        };
        match &s.kind {
            SpecKind::Service { image, replicas } => {
                if image.is_empty() {
                    return Err(incomplete("a service needs an `image`"));
                }
                if *replicas == 0 {
                    return Err(incomplete("`replicas` must be at least 1"));
                }
                if s.resources.cpu_millis == 0 || s.resources.memory_mib == 0 {
                    return Err(incomplete(
                        "a service needs `resources.cpu_millis` and `resources.memory_mib`",
                    ));
                }
            }
            SpecKind::WorkflowRun {
                workflow,
                repository,
                ..
            } => {
                if workflow.is_empty() {
                    return Err(incomplete("a workflow run needs a `workflow` path"));
                }
                check_workflow_path(workflow).map_err(|why| Invalid::WorkflowPath {
                    id: s.id.clone(),
                    path: workflow.clone(),
                    why,
                })?;
                if let Some(url) = repository {
                    check_repository(url).map_err(|why| Invalid::Repository {
                        id: s.id.clone(),
                        url: url.clone(),
                        why,
                    })?;
                }
            }
        }
    }
    check_size(specs)
}

/// Canonical JSON of the specs: sorted by id, object keys sorted (serde_json's maps
/// are BTreeMap-backed), no insignificant whitespace. Independent of the order the
/// publisher listed them in.
pub fn canonical_specs_json(specs: &[DesiredSpec]) -> String {
    let mut sorted: Vec<&DesiredSpec> = specs.iter().collect();
    sorted.sort_by(|a, b| a.id.cmp(&b.id));
    // to_value goes through serde_json::Map, which is sorted without the
    // `preserve_order` feature: the output is canonical.
    let value = serde_json::to_value(&sorted).unwrap_or(serde_json::Value::Null);
    value.to_string()
}

/// `intent_hash = sha256(commit + canonical JSON of the specs)`, hex.
pub fn intent_hash(commit: &str, specs: &[DesiredSpec]) -> String {
    let mut h = Sha256::new();
    h.update(commit.as_bytes());
    h.update(canonical_specs_json(specs).as_bytes());
    hex::encode(h.finalize())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn svc(id: &str) -> DesiredSpec {
        DesiredSpec {
            id: id.into(),
            hash: "ab".repeat(16),
            kind: SpecKind::Service {
                image: "img".into(),
                replicas: 2,
            },
            labels: BTreeMap::new(),
            selector: BTreeMap::from([("zone".into(), "a".into())]),
            resources: Resources {
                cpu_millis: 500,
                memory_mib: 256,
            },
        }
    }

    const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";

    #[test]
    fn intent_hash_ignores_order_and_sees_every_field() {
        let a = vec![svc("a"), svc("b")];
        let b = vec![svc("b"), svc("a")];
        assert_eq!(intent_hash(COMMIT, &a), intent_hash(COMMIT, &b));
        let mut c = a.clone();
        c[0].resources.memory_mib = 512;
        assert_ne!(intent_hash(COMMIT, &a), intent_hash(COMMIT, &c));
        let other = "1123456789abcdef0123456789abcdef01234567";
        assert_ne!(intent_hash(COMMIT, &a), intent_hash(other, &a));
    }

    /// A publication with every field set, in a fixed order.
    fn golden_publication() -> Vec<DesiredSpec> {
        vec![
            DesiredSpec {
                id: "web".into(),
                hash: "0123456789abcdef0123456789abcdef".into(),
                kind: SpecKind::Service {
                    image: "sha256:00112233445566778899aabbccddeeff".into(),
                    replicas: 3,
                },
                labels: BTreeMap::from([
                    ("team".into(), "infra".into()),
                    ("tier".into(), "front".into()),
                ]),
                selector: BTreeMap::from([("zone".into(), "a".into())]),
                resources: Resources {
                    cpu_millis: 1500,
                    memory_mib: 2048,
                },
            },
            DesiredSpec {
                id: "ci".into(),
                hash: "fedcba9876543210fedcba9876543210".into(),
                kind: SpecKind::WorkflowRun {
                    workflow: ".github/workflows/ci.yml".into(),
                    job: Some("build".into()),
                    repository: None,
                },
                labels: BTreeMap::new(),
                selector: BTreeMap::from([("kvm".into(), "true".into())]),
                resources: Resources::default(),
            },
        ]
    }

    #[test]
    fn intent_hash_is_pinned() {
        // Stored signatures sign this value: a change of serialisation (field names,
        // order, defaults) must not slip through unnoticed. If it must change, it is
        // a new intent format (a new signing prefix), not an edit of this constant.
        let specs = golden_publication();
        assert_eq!(
            canonical_specs_json(&specs),
            GOLDEN_JSON,
            "the canonical JSON changed"
        );
        assert_eq!(intent_hash(COMMIT, &specs), GOLDEN_INTENT);
    }
    const GOLDEN_JSON: &str = r#"[{"hash":"fedcba9876543210fedcba9876543210","id":"ci","job":"build","kind":"workflow_run","labels":{},"resources":{"cpu_millis":0,"memory_mib":0},"selector":{"kvm":"true"},"workflow":".github/workflows/ci.yml"},{"hash":"0123456789abcdef0123456789abcdef","id":"web","image":"sha256:00112233445566778899aabbccddeeff","kind":"service","labels":{"team":"infra","tier":"front"},"replicas":3,"resources":{"cpu_millis":1500,"memory_mib":2048},"selector":{"zone":"a"}}]"#;
    const GOLDEN_INTENT: &str = "47b89321202f2db59e0f9208542f00389eeedc758f189daa5ceea06c9cfca305";

    #[test]
    fn wire_form_is_flat_with_a_kind_tag() {
        let v = serde_json::to_value(svc("a")).unwrap();
        assert_eq!(v["kind"], "service");
        assert_eq!(v["replicas"], 2);
        let back: DesiredSpec = serde_json::from_value(v).unwrap();
        assert_eq!(back, svc("a"));
        let wf: DesiredSpec = serde_json::from_str(
            r#"{"id":"ci","hash":"00112233445566778899","kind":"workflow_run","workflow":"w.yml"}"#,
        )
        .unwrap();
        assert_eq!(wf.instances(), 1);
    }

    #[test]
    fn validation_names_the_problem() {
        assert!(validate(COMMIT, &[svc("a"), svc("b")]).is_ok());
        assert_eq!(validate("xyz", &[]), Err(Invalid::Commit("xyz".into())));
        assert_eq!(
            validate(COMMIT, &[svc("a"), svc("a")]),
            Err(Invalid::DuplicateId("a".into()))
        );
        let mut nohash = svc("a");
        nohash.hash.clear();
        assert_eq!(validate(COMMIT, &[nohash]), Err(Invalid::Hash("a".into())));
        let mut zero = svc("a");
        zero.kind = SpecKind::Service {
            image: "i".into(),
            replicas: 0,
        };
        assert!(matches!(
            validate(COMMIT, &[zero]),
            Err(Invalid::Incomplete { .. })
        ));
        assert_eq!(
            validate(COMMIT, &[svc("bad id")]),
            Err(Invalid::Id("bad id".into()))
        );
    }

    fn run(id: &str, workflow: &str) -> DesiredSpec {
        let mut s = svc(id);
        s.kind = SpecKind::WorkflowRun {
            workflow: workflow.into(),
            job: None,
            repository: None,
        };
        s
    }

    fn from_repo(url: &str) -> DesiredSpec {
        let mut s = run("r", "ci.yml");
        if let SpecKind::WorkflowRun { repository, .. } = &mut s.kind {
            *repository = Some(url.into());
        }
        s
    }

    #[test]
    fn a_repository_is_signed_intent_and_absent_means_the_old_hash() {
        // Without a repository the canonical JSON has no `repository` key at all, so
        // every publication made before the field existed keeps its hash (and its
        // signature); `intent_hash_is_pinned` holds the full golden value.
        let plain = golden_publication();
        assert!(!canonical_specs_json(&plain).contains("repository"));
        let mut with = plain.clone();
        if let SpecKind::WorkflowRun { repository, .. } = &mut with[1].kind {
            *repository = Some("https://example.com/o/r.git".into());
        }
        let json = canonical_specs_json(&with);
        assert!(
            json.contains(r#""repository":"https://example.com/o/r.git""#),
            "{json}"
        );
        assert_ne!(intent_hash(COMMIT, &plain), intent_hash(COMMIT, &with));
        // And it reads back.
        let back: Vec<DesiredSpec> = serde_json::from_str(&json).unwrap();
        let mut sorted = with.clone();
        sorted.sort_by(|a, b| a.id.cmp(&b.id));
        assert_eq!(back, sorted);
    }

    #[test]
    fn repositories_are_git_urls_and_never_options_or_helpers() {
        for ok in [
            "https://github.com/o/r.git",
            "http://127.0.0.1:8080/r",
            "git://127.0.0.1:9418/r.git",
            "ssh://git@host:22/o/r",
            "file:///srv/git/r.git",
            "git@github.com:o/r.git",
            "host:r",
        ] {
            assert_eq!(validate(COMMIT, &[from_repo(ok)]), Ok(()), "{ok}");
        }
        let long = format!("https://h/{}", "a".repeat(MAX_REPOSITORY_LEN));
        for (bad, why) in [
            ("", "is empty"),
            (long.as_str(), "is longer than 2048 bytes"),
            (
                "https://h/r --upload-pack=x",
                "contains whitespace or a control character",
            ),
            (
                "https://h/r
",
                "contains whitespace or a control character",
            ),
            ("--upload-pack=touch%20/tmp/x", "starts with `-`"),
            ("-oProxyCommand=x:y", "starts with `-`"),
            (
                "ext::sh -c touch% /tmp/x",
                "contains whitespace or a control character",
            ),
            ("ext::sh", "names a remote helper (`transport::address`)"),
            ("fd::3", "names a remote helper (`transport::address`)"),
            ("ftp://h/r", "has an unsupported scheme"),
            ("https://", "names no host or path"),
            ("/srv/git/r.git", "is not a URL"),
            ("relative/path", "is not a URL"),
            ("host:", "names no path"),
        ] {
            assert_eq!(
                validate(COMMIT, &[from_repo(bad)]),
                Err(Invalid::Repository {
                    id: "r".into(),
                    url: bad.into(),
                    why
                }),
                "{bad}"
            );
        }
    }

    #[test]
    fn workflow_paths_stay_in_the_repository() {
        for ok in [
            ".github/workflows/ci.yml",
            "ci.yml",
            "a/..b/c..",
            "w/.x.yml",
        ] {
            assert_eq!(validate(COMMIT, &[run("r", ok)]), Ok(()), "{ok}");
        }
        for (bad, why) in [
            ("/etc/passwd", "is absolute"),
            ("../other/ci.yml", "has a `..` component"),
            (".github/../../x.yml", "has a `..` component"),
            ("a/..", "has a `..` component"),
            ("./ci.yml", "has a `.` component"),
            ("a//ci.yml", "has an empty component"),
            ("a/", "has an empty component"),
            ("a\0b", "contains NUL"),
        ] {
            assert_eq!(
                validate(COMMIT, &[run("r", bad)]),
                Err(Invalid::WorkflowPath {
                    id: "r".into(),
                    path: bad.into(),
                    why
                }),
                "{bad}"
            );
        }
    }

    fn replicas(id: &str, n: u32) -> DesiredSpec {
        let mut s = svc(id);
        s.kind = SpecKind::Service {
            image: "i".into(),
            replicas: n,
        };
        s
    }

    #[test]
    fn replicas_and_instances_are_bounded() {
        assert!(validate(COMMIT, &[replicas("a", MAX_REPLICAS)]).is_ok());
        assert_eq!(
            validate(COMMIT, &[replicas("a", u32::MAX)]),
            Err(Invalid::TooManyReplicas {
                id: "a".into(),
                replicas: u32::MAX
            })
        );
        let msg = validate(COMMIT, &[replicas("a", MAX_REPLICAS + 1)])
            .unwrap_err()
            .to_string();
        assert!(
            msg.contains("1001") && msg.contains("at most 1000"),
            "{msg}"
        );
        // Each spec within its bound, the publication above the total.
        let per = u64::from(MAX_REPLICAS);
        let n = MAX_INSTANCES / per + 1;
        let many: Vec<_> = (0..n)
            .map(|i| replicas(&format!("s{i}"), MAX_REPLICAS))
            .collect();
        assert_eq!(
            validate(COMMIT, &many),
            Err(Invalid::TooManyInstances { total: n * per })
        );
        assert!(validate(COMMIT, &many[..(n - 1) as usize]).is_ok());
    }
}
