//! Actions of other repositories (`uses: owner/repo[/path]@ref`), resolved and pinned
//! on the host before a run's first VM (docs/actions.md).
//!
//! Each `uses:` is resolved once per run: its ref to a commit (`git ls-remote`
//! `<actions-url>/<owner>/<repo>`), the tree at that commit fetched into the action
//! store (`<state>/actions/<owner>/<repo>/<sha>/`, one copy per commit, never fetched
//! again), and its `action.yml` read to know its kind. Composite actions bring the
//! actions they use in turn, resolved the same way up to [`MAX_DEPTH`].
//! `--local-repository owner/repo@ref=PATH` takes PATH's tree instead, stored by the
//! SHA-256 of its content. The step's VM gets the trees in its control layer, and act
//! reads them there (`--local-repository` lines in `/.actrc`), so steps need no
//! network for them.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::path::{Path, PathBuf};
use std::time::Duration;

use sha2::{Digest, Sha256};
use udos_core::workflow::action::{self, ActionDef, PinnedAction, RemoteUses, UsesError};
use udos_core::workflow::WorkflowError;

/// Where actions come from unless `--actions-url` says otherwise.
pub const DEFAULT_ACTIONS_URL: &str = "https://github.com";
/// Composite actions nest at most this deep (GitHub's limit).
pub const MAX_DEPTH: usize = 10;
/// The longest one git call (listing refs, fetching a commit) may take.
pub const GIT_LIMIT: Duration = Duration::from_secs(600);
/// The store's directory of trees `--local-repository` named (not an owner: owners
/// never start with `.`).
const LOCAL_DIR: &str = ".local";
/// Where fetches and copies are made before they are renamed into place.
const STAGING_DIR: &str = ".staging";

/// Why an action cannot be had. Each names the `uses:` and, for fetches, the URL.
#[derive(Debug, thiserror::Error)]
pub enum ActionError {
    /// The `uses:` is not one udos can fetch.
    #[error(transparent)]
    Uses(#[from] UsesError),
    /// `--local-repository` is malformed or names no directory.
    #[error("--local-repository {flag}: {why}")]
    LocalFlag {
        /// The flag's value.
        flag: String,
        /// What is wrong.
        why: String,
    },
    /// The repository's refs could not be listed, and no earlier run pinned the ref.
    #[error("`uses: {uses}`: cannot read the repository {url}: {why}")]
    Unreachable {
        /// As written.
        uses: String,
        /// The repository's URL.
        url: String,
        /// git's words.
        why: String,
    },
    /// The repository has no such branch or tag.
    #[error("`uses: {uses}`: {url} has no branch or tag `{git_ref}` ({known})")]
    NoSuchRef {
        /// As written.
        uses: String,
        /// The repository's URL.
        url: String,
        /// The ref.
        git_ref: String,
        /// Some refs it has.
        known: String,
    },
    /// Fetching the commit failed.
    #[error("`uses: {uses}`: cannot fetch {what} from {url}: {why}")]
    Fetch {
        /// As written.
        uses: String,
        /// The repository's URL.
        url: String,
        /// The ref or commit.
        what: String,
        /// git's words.
        why: String,
    },
    /// No `action.yml` where the `uses:` points.
    #[error("`uses: {uses}`: no action.yml or action.yaml in {place}")]
    NoDefinition {
        /// As written.
        uses: String,
        /// Where udos looked.
        place: String,
    },
    /// The `action.yml` is not valid.
    #[error("`uses: {uses}`: {source}")]
    Definition {
        /// As written.
        uses: String,
        /// Why.
        source: WorkflowError,
    },
    /// Composite actions use each other deeper than [`MAX_DEPTH`].
    #[error("`uses: {uses}`: composite actions nest deeper than {MAX_DEPTH} levels")]
    TooDeep {
        /// The action at the limit.
        uses: String,
    },
    /// The action store could not be written or read.
    #[error("{what}: {source}")]
    Io {
        /// What udos was doing.
        what: String,
        /// Why it failed.
        source: std::io::Error,
    },
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> ActionError {
    let what = what.into();
    move |source| ActionError::Io { what, source }
}

/// `--local-repository owner/repo@ref=PATH`: the action `owner/repo` at `ref` is
/// PATH's tree (act's flag; a URL before `owner/repo` is accepted and ignored).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalRepository {
    /// `owner/repo`.
    pub slug: String,
    /// The ref, as `uses:` writes it.
    pub git_ref: String,
    /// The directory.
    pub dir: PathBuf,
}

impl std::str::FromStr for LocalRepository {
    type Err = ActionError;

    fn from_str(flag: &str) -> Result<Self, Self::Err> {
        let bad = |why: &str| ActionError::LocalFlag {
            flag: flag.to_string(),
            why: why.to_string(),
        };
        let (what, dir) = flag
            .split_once('=')
            .ok_or_else(|| bad("expected OWNER/REPO@REF=PATH"))?;
        // `https://github.com/owner/repo@ref` matches as `owner/repo@ref` (act's rule).
        let what = match what.split_once("://") {
            Some((_, rest)) => rest.split_once('/').map(|(_, r)| r).unwrap_or(""),
            None => what,
        };
        let at = RemoteUses::parse(what).map_err(|e| bad(&e.why))?;
        if !at.path.is_empty() {
            return Err(bad(
                "name the repository (OWNER/REPO@REF), not a path in it",
            ));
        }
        let dir = PathBuf::from(dir);
        if !dir.is_dir() {
            return Err(bad(&format!("{} is not a directory", dir.display())));
        }
        Ok(LocalRepository {
            slug: at.slug(),
            git_ref: at.git_ref,
            dir,
        })
    }
}

/// The action store: `<state>/actions/<owner>/<repo>/<sha>/` per fetched commit (its
/// tree, without `.git`), `<owner>/<repo>/pins.json` (the commit each ref resolved to
/// last, per URL), and `.local/<sha256>/` per `--local-repository` tree.
#[derive(Debug, Clone)]
pub struct ActionStore {
    root: PathBuf,
}

/// `pins.json`: URL → ref → commit.
type Pins = BTreeMap<String, BTreeMap<String, String>>;

impl ActionStore {
    /// The store of the state directory `state_root`.
    pub fn new(state_root: &Path) -> ActionStore {
        ActionStore {
            root: state_root.join("actions"),
        }
    }

    /// Its directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    fn repo_dir(&self, at: &RemoteUses) -> PathBuf {
        self.root.join(&at.owner).join(&at.repo)
    }

    fn commit_dir(&self, at: &RemoteUses, sha: &str) -> PathBuf {
        self.repo_dir(at).join(sha)
    }

    /// Where the tree of `action`'s repository is on the host.
    pub fn tree(&self, action: &PinnedAction) -> PathBuf {
        match action.local {
            Some(_) => self.root.join(LOCAL_DIR).join(&action.pin),
            None => self.commit_dir(&action.at, &action.pin),
        }
    }

    /// The key (path under the store) of the tree a run report records for an
    /// action: `owner/repo/<commit>`, or `.local/<sha256>` for a `--local-repository`
    /// tree. `None` when the record names no tree the store could hold.
    pub fn tree_key(uses: &str, sha: &str, local: bool) -> Option<String> {
        if !is_tree_name(sha) {
            return None;
        }
        if local {
            return Some(format!("{LOCAL_DIR}/{sha}"));
        }
        let at = RemoteUses::parse(uses).ok()?;
        Some(format!("{}/{}/{sha}", at.owner, at.repo))
    }

    /// Where the tree `key` ([`ActionStore::tree_key`]) is.
    pub fn key_path(&self, key: &str) -> PathBuf {
        self.root.join(key)
    }

    /// The keys of every tree in the store.
    pub fn stored_trees(&self) -> BTreeSet<String> {
        let mut keys: BTreeSet<String> = dir_names(&self.root.join(LOCAL_DIR))
            .into_iter()
            .filter(|n| is_tree_name(n))
            .map(|n| format!("{LOCAL_DIR}/{n}"))
            .collect();
        for (owner, repo) in self.repos() {
            let dir = self.root.join(&owner).join(&repo);
            keys.extend(
                dir_names(&dir)
                    .into_iter()
                    .filter(|n| is_tree_name(n))
                    .map(|sha| format!("{owner}/{repo}/{sha}")),
            );
        }
        keys
    }

    /// The keys of the trees the refs are pinned to now (what the next run of each
    /// ref would take offline).
    pub fn pinned_trees(&self) -> BTreeSet<String> {
        let mut keys = BTreeSet::new();
        for (owner, repo) in self.repos() {
            let at = RemoteUses {
                owner: owner.clone(),
                repo: repo.clone(),
                path: String::new(),
                git_ref: String::new(),
            };
            for sha in self.pins(&at).values().flat_map(|refs| refs.values()) {
                if is_tree_name(sha) {
                    keys.insert(format!("{owner}/{repo}/{sha}"));
                }
            }
        }
        keys
    }

    /// The store's scratch directory (what a stopped fetch left behind).
    pub fn staging_dir(&self) -> PathBuf {
        self.root.join(STAGING_DIR)
    }

    /// `(owner, repo)` of every repository directory in the store.
    fn repos(&self) -> Vec<(String, String)> {
        dir_names(&self.root)
            .into_iter()
            .filter(|o| !o.starts_with('.'))
            .flat_map(|owner| {
                dir_names(&self.root.join(&owner))
                    .into_iter()
                    .map(move |repo| (owner.clone(), repo))
            })
            .collect()
    }

    /// A private scratch directory inside the store, removed when dropped.
    fn staging(&self) -> Result<tempfile::TempDir, ActionError> {
        let dir = self.root.join(STAGING_DIR);
        std::fs::create_dir_all(&dir).map_err(io(format!("creating {}", dir.display())))?;
        tempfile::Builder::new()
            .prefix("a-")
            .tempdir_in(&dir)
            .map_err(io(format!("creating a directory in {}", dir.display())))
    }

    /// Moves `tree` to `dest` unless another run put it there first (same content:
    /// both are named by it).
    fn adopt(tree: &Path, dest: &Path) -> Result<(), ActionError> {
        if dest.exists() {
            return Ok(());
        }
        if let Some(parent) = dest.parent() {
            std::fs::create_dir_all(parent)
                .map_err(io(format!("creating {}", parent.display())))?;
        }
        match std::fs::rename(tree, dest) {
            Ok(()) => Ok(()),
            Err(_) if dest.exists() => Ok(()),
            Err(e) => Err(io(format!("storing {}", dest.display()))(e)),
        }
    }

    fn pins(&self, at: &RemoteUses) -> Pins {
        std::fs::read(self.repo_dir(at).join("pins.json"))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default()
    }

    fn record_pin(&self, at: &RemoteUses, url: &str, sha: &str) -> Result<(), ActionError> {
        let mut pins = self.pins(at);
        pins.entry(url.to_string())
            .or_default()
            .insert(at.git_ref.clone(), sha.to_string());
        let dir = self.repo_dir(at);
        std::fs::create_dir_all(&dir).map_err(io(format!("creating {}", dir.display())))?;
        let tmp = tempfile::NamedTempFile::new_in(&dir)
            .map_err(io(format!("writing in {}", dir.display())))?;
        let text = serde_json::to_vec_pretty(&pins).unwrap_or_default();
        std::fs::write(tmp.path(), text).map_err(io("writing pins.json"))?;
        tmp.persist(dir.join("pins.json"))
            .map_err(|e| io("writing pins.json")(e.error))?;
        Ok(())
    }

    /// Stores a copy of `dir` (without `.git`) under the SHA-256 of its tree, which it
    /// returns: what runs is what was copied, whatever happens to `dir` later.
    fn put_local(&self, dir: &Path) -> Result<String, ActionError> {
        let staging = self.staging()?;
        let tree = staging.path().join("tree");
        copy_tree(dir, &tree, Copy::Bytes, &[".git"])?;
        let mut hash = Sha256::new();
        udos_layer::seal::write_layer_tar(&tree, &mut hash, &Default::default()).map_err(|e| {
            ActionError::Io {
                what: format!("hashing the tree of {}", dir.display()),
                source: std::io::Error::other(e.to_string()),
            }
        })?;
        let id = hex::encode(hash.finalize());
        Self::adopt(&tree, &self.root.join(LOCAL_DIR).join(&id))?;
        Ok(id)
    }
}

/// How [`copy_tree`] makes the files.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Copy {
    /// Hard links where the file system allows, else copies: for trees nobody
    /// changes (the store's).
    Link,
    /// Copies.
    Bytes,
}

/// Copies the tree `src` to `dst` (which must not exist): directories, regular files
/// (with their modes) and symbolic links (as links, never followed). Other file types
/// are left out, and so are the entries directly under `src` named in `skip`.
pub fn copy_tree(src: &Path, dst: &Path, how: Copy, skip: &[&str]) -> Result<(), ActionError> {
    use std::os::unix::fs::PermissionsExt;
    let what = || format!("copying {} to {}", src.display(), dst.display());
    let meta = std::fs::symlink_metadata(src).map_err(io(what()))?;
    std::fs::create_dir(dst).map_err(io(what()))?;
    let mut todo = vec![(src.to_path_buf(), dst.to_path_buf(), meta, true)];
    // Directory modes are set last: a read-only directory must be filled first.
    let mut dirs = Vec::new();
    while let Some((from, to, meta, top)) = todo.pop() {
        for entry in std::fs::read_dir(&from).map_err(io(what()))? {
            let entry = entry.map_err(io(what()))?;
            let name = entry.file_name();
            if top && skip.iter().any(|s| name == *s) {
                continue;
            }
            let (f, t) = (entry.path(), to.join(&name));
            let m = std::fs::symlink_metadata(&f).map_err(io(what()))?;
            let ft = m.file_type();
            if ft.is_dir() {
                std::fs::create_dir(&t).map_err(io(what()))?;
                todo.push((f, t, m, false));
            } else if ft.is_symlink() {
                let target = std::fs::read_link(&f).map_err(io(what()))?;
                std::os::unix::fs::symlink(target, &t).map_err(io(what()))?;
            } else if ft.is_file() {
                let linked = how == Copy::Link && std::fs::hard_link(&f, &t).is_ok();
                if !linked {
                    std::fs::copy(&f, &t).map_err(io(what()))?;
                }
            }
        }
        dirs.push((to, meta.permissions().mode()));
    }
    for (d, mode) in dirs {
        std::fs::set_permissions(&d, std::fs::Permissions::from_mode(mode)).map_err(io(what()))?;
    }
    Ok(())
}

/// Does the root `tree` have node (`/usr/bin/node`, `/usr/local/bin/node` or
/// `/bin/node`, a file or a link)? What JavaScript actions run with.
pub fn tree_has_node(tree: &Path) -> bool {
    ["usr/bin/node", "usr/local/bin/node", "bin/node"]
        .iter()
        .any(|p| std::fs::symlink_metadata(tree.join(p)).is_ok())
}

/// Runs git with `args` (in `dir` when given), bounded by [`GIT_LIMIT`], never asking
/// for a password: its stdout, or its last lines of stderr as the error.
fn git(args: &[&str], dir: Option<&Path>) -> Result<String, String> {
    let mut expr = duct::cmd("git", args)
        .env("GIT_TERMINAL_PROMPT", "0")
        .stdin_null()
        .stdout_capture()
        .stderr_capture()
        .unchecked();
    if let Some(d) = dir {
        expr = expr.dir(d);
    }
    let out = crate::proc::run_bounded(&expr, GIT_LIMIT, "git")
        .map_err(|e| crate::errors::describe(&e))?;
    if out.status.success() {
        return Ok(String::from_utf8_lossy(&out.stdout).into_owned());
    }
    let err = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
    let tail = lines[lines.len().saturating_sub(3)..].join("; ");
    Err(if tail.is_empty() {
        format!(
            "git {} failed ({})",
            args.first().unwrap_or(&""),
            out.status
        )
    } else {
        tail
    })
}

/// The commit `git_ref` names among `refs` (`git ls-remote` lines): a tag (peeled to
/// its commit) before a branch, as git's own lookup order has it; a full ref name
/// (`refs/heads/x`) as itself.
fn find_ref<'a>(refs: &'a [(String, String)], git_ref: &str) -> Option<(&'a str, &'a str)> {
    let wanted = [
        format!("refs/tags/{git_ref}^{{}}"),
        format!("refs/tags/{git_ref}"),
        format!("refs/heads/{git_ref}"),
        git_ref.to_string(),
    ];
    wanted.iter().find_map(|w| {
        refs.iter()
            .find(|(name, _)| name == w)
            .map(|(name, sha)| (name.trim_end_matches("^{}"), sha.as_str()))
    })
}

fn parse_ls_remote(text: &str) -> Vec<(String, String)> {
    text.lines()
        .filter_map(|l| {
            let (sha, name) = l.split_once('\t')?;
            Some((name.trim().to_string(), sha.trim().to_string()))
        })
        .collect()
}

/// Resolves and pins the actions of one run. Each `owner/repo@ref` is resolved once;
/// each repository's refs are listed once.
pub struct Resolver {
    store: ActionStore,
    url: String,
    local: Vec<LocalRepository>,
    pinned: BTreeMap<(String, String), (String, Option<String>)>,
    listed: BTreeMap<String, Result<Vec<(String, String)>, String>>,
    /// What the user should know (a pin reused because the server could not be
    /// reached, node versions, `pre:`/`post:`).
    pub notices: Vec<String>,
    /// The commits fetched by this resolver (`owner/repo@sha`): none when the store
    /// had them all.
    pub fetched: Vec<String>,
}

impl Resolver {
    /// A resolver fetching from `url` (`https://github.com`, a mirror, GitHub
    /// Enterprise) into `store`, with `local` mappings (`--local-repository`).
    pub fn new(store: ActionStore, url: &str, local: Vec<LocalRepository>) -> Resolver {
        Resolver {
            store,
            url: url.trim_end_matches('/').to_string(),
            local,
            pinned: BTreeMap::new(),
            listed: BTreeMap::new(),
            notices: Vec::new(),
            fetched: Vec::new(),
        }
    }

    /// The store.
    pub fn store(&self) -> &ActionStore {
        &self.store
    }

    fn repo_url(&self, at: &RemoteUses) -> String {
        format!("{}/{}/{}", self.url, at.owner, at.repo)
    }

    /// `uses` (`owner/repo[/path]@ref`), pinned: its tree stored, its `action.yml`
    /// read.
    pub fn resolve(&mut self, uses: &str) -> Result<PinnedAction, ActionError> {
        let at = RemoteUses::parse(uses)?;
        let key = (at.slug(), at.git_ref.clone());
        let (pin, local) = match self.pinned.get(&key) {
            Some(p) => p.clone(),
            None => {
                let p = self.pin(uses, &at)?;
                self.pinned.insert(key, p.clone());
                p
            }
        };
        let tree = match local {
            Some(_) => self.store.root.join(LOCAL_DIR).join(&pin),
            None => self.store.commit_dir(&at, &pin),
        };
        let def = read_definition(uses, &tree, &at.path)?;
        if let action::ActionKind::Node { using, pre, post } = &def.kind {
            self.note_node(uses, using, pre.is_some(), post.is_some());
        }
        Ok(PinnedAction {
            uses: uses.to_string(),
            at,
            pin,
            local,
            def,
        })
    }

    fn note_node(&mut self, uses: &str, using: &str, pre: bool, post: bool) {
        let mut notes = vec![format!(
            "`{uses}` declares `{using}`: udos runs it with the node of the job's base, whatever its version"
        )];
        if pre {
            notes.push(format!("`{uses}` has a `pre:` script: act runs it just before the action, in the step's VM (GitHub runs it when the job starts)"));
        }
        if post {
            notes.push(format!("`{uses}` has a `post:` script: act runs it when the step ends, in the step's VM (GitHub runs it when the job ends)"));
        }
        for n in notes {
            if !self.notices.contains(&n) {
                self.notices.push(n);
            }
        }
    }

    /// `uses` and every action its composite actions use in turn (breadth first, each
    /// once), pinned. Local (`./`) and Docker (`docker://`) references are left to
    /// the checks that follow; a self-repository reference (`$/`) too.
    pub fn closure(&mut self, roots: &[String]) -> Result<Vec<PinnedAction>, ActionError> {
        let mut out: Vec<PinnedAction> = Vec::new();
        let mut seen = BTreeSet::new();
        let mut todo: VecDeque<(String, usize)> = roots.iter().map(|r| (r.clone(), 0)).collect();
        while let Some((uses, depth)) = todo.pop_front() {
            let u = uses.trim();
            if u.starts_with("./") || u.starts_with("$/") || u.starts_with("docker://") {
                continue;
            }
            if !seen.insert(u.to_string()) {
                continue;
            }
            if depth > MAX_DEPTH {
                return Err(ActionError::TooDeep { uses: uses.clone() });
            }
            let a = self.resolve(u)?;
            todo.extend(a.def.uses.iter().map(|n| (n.clone(), depth + 1)));
            out.push(a);
        }
        Ok(out)
    }

    /// The commit (or local tree) `at` stands for, stored.
    fn pin(
        &mut self,
        uses: &str,
        at: &RemoteUses,
    ) -> Result<(String, Option<String>), ActionError> {
        let mapped = self
            .local
            .iter()
            .find(|l| l.slug.eq_ignore_ascii_case(&at.slug()) && l.git_ref == at.git_ref)
            .cloned();
        if let Some(l) = mapped {
            let id = self.store.put_local(&l.dir)?;
            return Ok((id, Some(l.dir.display().to_string())));
        }
        if at.ref_is_sha() {
            let sha = at.git_ref.to_ascii_lowercase();
            if !self.store.commit_dir(at, &sha).is_dir() {
                self.fetch(uses, at, &sha)?;
            }
            return Ok((sha, None));
        }
        let (name, sha) = match self.remote_ref(uses, at)? {
            Some(found) => found,
            None => return self.pinned_before(uses, at).map(|sha| (sha, None)),
        };
        let sha = if self.store.commit_dir(at, &sha).is_dir() {
            sha
        } else {
            // The ref may have moved since it was listed: what was fetched counts.
            self.fetch(uses, at, &name)?
        };
        self.store.record_pin(at, &self.url, &sha)?;
        Ok((sha, None))
    }

    /// The ref's full name and commit on the server; `None` when the server cannot be
    /// reached (the caller falls back to an earlier pin).
    fn remote_ref(
        &mut self,
        uses: &str,
        at: &RemoteUses,
    ) -> Result<Option<(String, String)>, ActionError> {
        let url = self.repo_url(at);
        let listed = self
            .listed
            .entry(at.slug())
            .or_insert_with(|| git(&["ls-remote", "--", &url], None).map(|t| parse_ls_remote(&t)));
        let refs = match listed {
            Ok(refs) => refs,
            Err(_) => return Ok(None),
        };
        match find_ref(refs, &at.git_ref) {
            Some((name, sha)) => Ok(Some((name.to_string(), sha.to_string()))),
            None => {
                let mut known: Vec<&str> = refs
                    .iter()
                    .filter_map(|(n, _)| {
                        n.strip_prefix("refs/tags/")
                            .or_else(|| n.strip_prefix("refs/heads/"))
                    })
                    .filter(|n| !n.ends_with("^{}"))
                    .collect();
                known.truncate(10);
                Err(ActionError::NoSuchRef {
                    uses: uses.to_string(),
                    url,
                    git_ref: at.git_ref.clone(),
                    known: if known.is_empty() {
                        "it has none".into()
                    } else {
                        format!("it has: {}", known.join(", "))
                    },
                })
            }
        }
    }

    /// The server could not be reached: the commit an earlier run pinned the ref to,
    /// if it is still stored (with a notice), else the error.
    fn pinned_before(&mut self, uses: &str, at: &RemoteUses) -> Result<String, ActionError> {
        let url = self.repo_url(at);
        let why = match self.listed.get(&at.slug()) {
            Some(Err(why)) => why.clone(),
            _ => "it did not answer".to_string(),
        };
        let pinned = self
            .store
            .pins(at)
            .get(&self.url)
            .and_then(|refs| refs.get(&at.git_ref))
            .filter(|sha| self.store.commit_dir(at, sha).is_dir())
            .cloned();
        match pinned {
            Some(sha) => {
                self.notices.push(format!(
                    "`{uses}`: {url} could not be reached ({why}): using {sha}, which an earlier run pinned `{}` to",
                    at.git_ref
                ));
                Ok(sha)
            }
            None => Err(ActionError::Unreachable {
                uses: uses.to_string(),
                url,
                why,
            }),
        }
    }

    /// Fetches `want` (a full ref name or a commit) into the store; returns the
    /// commit. A shallow fetch of just that commit; a server that refuses to hand out
    /// a commit by its name gets a full fetch, and the commit is looked for in it.
    fn fetch(&mut self, uses: &str, at: &RemoteUses, want: &str) -> Result<String, ActionError> {
        let url = self.repo_url(at);
        eprintln!("udos: fetching `{uses}` ({want}) from {url}");
        let fail = |why: String| ActionError::Fetch {
            uses: uses.to_string(),
            url: url.clone(),
            what: want.to_string(),
            why,
        };
        let staging = self.store.staging()?;
        let repo = staging.path().join("tree");
        let repo_s = repo.to_string_lossy().to_string();
        git(&["init", "-q", &repo_s], None).map_err(&fail)?;
        let in_repo = Some(repo.as_path());
        let shallow = git(
            &["fetch", "-q", "--no-tags", "--depth", "1", "--", &url, want],
            in_repo,
        );
        let commit = if shallow.is_ok() && !at.ref_is_sha() {
            "FETCH_HEAD".to_string()
        } else {
            if let Err(why) = shallow {
                if !at.ref_is_sha() {
                    return Err(fail(why));
                }
                git(
                    &[
                        "fetch",
                        "-q",
                        "--no-tags",
                        "--",
                        &url,
                        "+refs/heads/*:refs/udos/heads/*",
                        "+refs/tags/*:refs/udos/tags/*",
                    ],
                    in_repo,
                )
                .map_err(&fail)?;
            }
            want.to_string()
        };
        let sha = git(
            &[
                "rev-parse",
                "--verify",
                "-q",
                &format!("{commit}^{{commit}}"),
            ],
            in_repo,
        )
        .map_err(|_| fail(format!("{want} is not a commit of the repository")))?
        .trim()
        .to_string();
        git(
            &[
                "-c",
                "advice.detachedHead=false",
                "-c",
                "core.autocrlf=false",
                "checkout",
                "-q",
                "--detach",
                &sha,
            ],
            in_repo,
        )
        .map_err(&fail)?;
        std::fs::remove_dir_all(repo.join(".git"))
            .map_err(io("removing .git of a fetched action"))?;
        ActionStore::adopt(&repo, &self.store.commit_dir(at, &sha))?;
        self.fetched.push(format!("{}@{sha}", at.slug()));
        Ok(sha)
    }
}

/// Reads and parses the `action.yml` (or `.yaml`) at `path` in `tree`, which must not
/// lead out of the tree.
fn read_definition(uses: &str, tree: &Path, path: &str) -> Result<ActionDef, ActionError> {
    let missing = || ActionError::NoDefinition {
        uses: uses.to_string(),
        place: if path.is_empty() {
            "the repository's top".to_string()
        } else {
            format!("`{path}` of the repository")
        },
    };
    let root = tree.canonicalize().map_err(|_| missing())?;
    for name in ["action.yml", "action.yaml"] {
        let Ok(file) = tree.join(path).join(name).canonicalize() else {
            continue;
        };
        if !file.starts_with(&root) || !file.is_file() {
            continue;
        }
        let text =
            std::fs::read_to_string(&file).map_err(io(format!("reading {}", file.display())))?;
        return action::parse(&text, &format!("{uses}: {name}")).map_err(|source| {
            ActionError::Definition {
                uses: uses.to_string(),
                source,
            }
        });
    }
    Err(missing())
}

/// The step cache key of a step that uses `actions`: `key` with their pins, so a ref
/// that moves (also one a composite action names) makes a new key.
pub fn key_with(key: &str, actions: &[PinnedAction]) -> String {
    if actions.is_empty() || key.is_empty() {
        return key.to_string();
    }
    let mut h = Sha256::new();
    h.update(b"udos-step-key-actions-v1\0");
    h.update(key.as_bytes());
    for a in actions {
        h.update(b"\0");
        h.update(a.uses.as_bytes());
        h.update(b"=");
        h.update(a.pin.as_bytes());
    }
    hex::encode(h.finalize())
}

/// What the step's control layer holds for `actions`: each repository tree (on the
/// host) and where it goes (relative to the control layer's root), each once.
pub fn control_trees(store: &ActionStore, actions: &[PinnedAction]) -> Vec<(PathBuf, PathBuf)> {
    let mut out: Vec<(PathBuf, PathBuf)> = Vec::new();
    for a in actions {
        let guest = udos_core::engine::synth::action_dir(a);
        let rel = PathBuf::from(guest.trim_start_matches('/'));
        if !out.iter().any(|(_, r)| r == &rel) {
            out.push((store.tree(a), rel));
        }
    }
    out
}

/// A commit (SHA-1 or SHA-256, hex) or a tree's SHA-256: the name of a stored tree.
fn is_tree_name(s: &str) -> bool {
    matches!(s.len(), 40 | 64) && s.bytes().all(|b| b.is_ascii_hexdigit())
}

/// The names of the directories in `dir` (none when it cannot be read).
fn dir_names(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_store_lists_its_trees_and_the_trees_refs_are_pinned_to() {
        let d = tempfile::tempdir().unwrap();
        let store = ActionStore::new(d.path());
        let (c1, c2, local) = ("1".repeat(40), "2".repeat(40), "3".repeat(64));
        let at = RemoteUses::parse("octo/tools@v1").unwrap();
        for dir in [
            store.commit_dir(&at, &c1),
            store.commit_dir(&at, &c2),
            store.root().join(LOCAL_DIR).join(&local),
            store.staging_dir().join("a-x"),
            store.repo_dir(&at).join("not-a-commit"),
        ] {
            std::fs::create_dir_all(dir).unwrap();
        }
        store.record_pin(&at, DEFAULT_ACTIONS_URL, &c2).unwrap();
        assert_eq!(
            store.stored_trees(),
            [
                format!(".local/{local}"),
                format!("octo/tools/{c1}"),
                format!("octo/tools/{c2}"),
            ]
            .into()
        );
        assert_eq!(store.pinned_trees(), [format!("octo/tools/{c2}")].into());
        let key = ActionStore::tree_key("octo/tools/sub@v1", &c1, false).unwrap();
        assert_eq!(store.key_path(&key), store.commit_dir(&at, &c1));
        assert_eq!(ActionStore::tree_key("./local", &c1, false), None);
        assert_eq!(ActionStore::tree_key("octo/tools@v1", "..", false), None);
    }

    #[test]
    fn refs_resolve_tags_first_then_branches() {
        let refs = parse_ls_remote(
            "aaa\tHEAD\nbbb\trefs/heads/main\nccc\trefs/heads/v1\nddd\trefs/tags/v1\neee\trefs/tags/v1^{}\nfff\trefs/tags/light\n",
        );
        // An annotated tag is its commit; a tag wins over a branch of the same name.
        assert_eq!(find_ref(&refs, "v1"), Some(("refs/tags/v1", "eee")));
        assert_eq!(find_ref(&refs, "light"), Some(("refs/tags/light", "fff")));
        assert_eq!(find_ref(&refs, "main"), Some(("refs/heads/main", "bbb")));
        assert_eq!(
            find_ref(&refs, "refs/heads/v1"),
            Some(("refs/heads/v1", "ccc"))
        );
        assert_eq!(find_ref(&refs, "nope"), None);
    }

    #[test]
    fn local_repository_flags_name_a_repository_and_a_directory() {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path().display().to_string();
        let l: LocalRepository = format!("octo/tools@v1={dir}").parse().unwrap();
        assert_eq!(
            (l.slug.as_str(), l.git_ref.as_str(), l.dir.as_path()),
            ("octo/tools", "v1", d.path())
        );
        let l: LocalRepository = format!("https://github.com/octo/tools@main={dir}")
            .parse()
            .unwrap();
        assert_eq!(
            (l.slug.as_str(), l.git_ref.as_str()),
            ("octo/tools", "main")
        );
        for (bad, why) in [
            ("octo/tools@v1".to_string(), "OWNER/REPO@REF=PATH"),
            (format!("octo/tools/sub@v1={dir}"), "not a path in it"),
            (format!("octo@v1={dir}"), "too short"),
            ("octo/tools@v1=/no/such/dir".to_string(), "not a directory"),
        ] {
            let e = bad.parse::<LocalRepository>().unwrap_err().to_string();
            assert!(e.contains(&bad) && e.contains(why), "{bad}: {e}");
        }
    }

    #[test]
    fn copies_keep_modes_and_links_and_leave_out_what_is_skipped() {
        use std::os::unix::fs::PermissionsExt;
        let d = tempfile::tempdir().unwrap();
        let src = d.path().join("src");
        std::fs::create_dir_all(src.join("bin")).unwrap();
        std::fs::create_dir_all(src.join(".git")).unwrap();
        std::fs::write(src.join("bin/run"), "#!/bin/sh\n").unwrap();
        std::fs::set_permissions(src.join("bin/run"), std::fs::Permissions::from_mode(0o755))
            .unwrap();
        std::os::unix::fs::symlink("bin/run", src.join("run")).unwrap();
        std::fs::write(src.join(".git/HEAD"), "x").unwrap();
        for how in [Copy::Bytes, Copy::Link] {
            let dst = d.path().join(format!("{how:?}"));
            copy_tree(&src, &dst, how, &[".git"]).unwrap();
            let mode = std::fs::metadata(dst.join("bin/run"))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o755);
            assert_eq!(
                std::fs::read_link(dst.join("run")).unwrap(),
                Path::new("bin/run")
            );
            assert!(!dst.join(".git").exists());
        }
        // A copy is not the original: changing one leaves the other.
        std::fs::write(d.path().join("Bytes/bin/run"), "changed").unwrap();
        assert_eq!(
            std::fs::read_to_string(src.join("bin/run")).unwrap(),
            "#!/bin/sh\n"
        );
    }

    #[test]
    fn a_local_tree_is_stored_by_its_content() {
        let d = tempfile::tempdir().unwrap();
        let store = ActionStore::new(&d.path().join("state"));
        let src = d.path().join("action");
        std::fs::create_dir_all(&src).unwrap();
        std::fs::write(
            src.join("action.yml"),
            "runs: {using: composite, steps: []}\n",
        )
        .unwrap();
        let a = store.put_local(&src).unwrap();
        assert_eq!(a.len(), 64);
        assert_eq!(store.put_local(&src).unwrap(), a, "same tree, same id");
        assert!(store
            .root()
            .join(LOCAL_DIR)
            .join(&a)
            .join("action.yml")
            .is_file());
        std::fs::write(
            src.join("action.yml"),
            "runs: {using: composite, steps: [{run: x, shell: sh}]}\n",
        )
        .unwrap();
        assert_ne!(
            store.put_local(&src).unwrap(),
            a,
            "another tree, another id"
        );
        // Nothing is left in the staging area.
        let staged = std::fs::read_dir(store.root().join(STAGING_DIR))
            .unwrap()
            .count();
        assert_eq!(staged, 0);
    }

    #[test]
    fn a_definition_outside_the_tree_is_not_read() {
        let d = tempfile::tempdir().unwrap();
        let tree = d.path().join("tree");
        std::fs::create_dir_all(&tree).unwrap();
        std::fs::create_dir_all(d.path().join("outside")).unwrap();
        std::fs::write(
            d.path().join("outside/action.yml"),
            "runs: {using: composite, steps: []}\n",
        )
        .unwrap();
        std::os::unix::fs::symlink("../outside", tree.join("escape")).unwrap();
        let e = read_definition("o/r/escape@v1", &tree, "escape")
            .unwrap_err()
            .to_string();
        assert!(e.contains("no action.yml") && e.contains("`escape`"), "{e}");
        std::fs::write(tree.join("action.yml"), "name: x\n").unwrap();
        let e = read_definition("o/r@v1", &tree, "")
            .unwrap_err()
            .to_string();
        assert!(e.contains("o/r@v1") && e.contains("runs"), "{e}");
    }

    #[test]
    fn node_is_found_as_a_file_or_a_link() {
        let d = tempfile::tempdir().unwrap();
        assert!(!tree_has_node(d.path()));
        std::fs::create_dir_all(d.path().join("usr/bin")).unwrap();
        // Debian's node is a link to nodejs; the link need not resolve on the host.
        std::os::unix::fs::symlink("nodejs", d.path().join("usr/bin/node")).unwrap();
        assert!(tree_has_node(d.path()));
    }

    #[test]
    fn the_cache_key_follows_the_pins() {
        let def = ActionDef {
            name: None,
            kind: action::ActionKind::Composite,
            uses: vec![],
        };
        let a = |pin: &str| PinnedAction {
            uses: "o/r@v1".into(),
            at: RemoteUses::parse("o/r@v1").unwrap(),
            pin: pin.into(),
            local: None,
            def: def.clone(),
        };
        assert_eq!(key_with("k", &[]), "k");
        assert_ne!(key_with("k", &[a("1")]), "k");
        assert_ne!(key_with("k", &[a("1")]), key_with("k", &[a("2")]));
        assert_eq!(key_with("k", &[a("1")]), key_with("k", &[a("1")]));
    }
}
