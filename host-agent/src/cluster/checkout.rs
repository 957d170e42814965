//! A workflow run's own checkout of its published commit.
//!
//! Signed intent names a commit; what runs must be that commit's files, not whatever
//! the worker's `--workdir` holds. For every run the agent fetches the commit into a
//! cache repository (bare, one per source, `<agent>/git/<id>.git`), adds a detached
//! worktree at it (`<agent>/checkouts/<name>`), checks that the worktree's `HEAD` is
//! the commit, and removes the worktree when the run ends, on every path
//! ([`Checkout`]'s `Drop`).
//!
//! The source is, in order: the spec's `repository` (part of the signed intent), the
//! agent's `--repository`, the agent's `--workdir` (a local repository to fetch from).
//! Every git call is bounded ([`crate::proc::run_bounded`]), never prompts, and may
//! use only git's own transports (`https`, `http`, `ssh`, `git`, `file`): a URL is
//! checked with [`udos_core::desired::check_repository`] first, and git is told to
//! refuse every other protocol (`ext::` would run a command).

use std::fmt;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use sha2::{Digest, Sha256};

/// Longest a fetch may take.
const FETCH_LIMIT: Duration = Duration::from_secs(600);
/// Longest any other git call may take.
const GIT_LIMIT: Duration = Duration::from_secs(120);
/// Longest git error text kept in a message.
const DETAIL_MAX: usize = 600;

/// Where a run's commit is fetched from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// A URL: the spec's `repository` or the agent's `--repository`.
    Url(String),
    /// A local repository: the agent's `--workdir`.
    Local(PathBuf),
}

impl Source {
    /// The spec's repository, else the agent's `--repository`, else its `--workdir`.
    pub fn pick(spec: Option<&str>, agent: Option<&str>, workdir: &Path) -> Source {
        match spec.or(agent) {
            Some(url) => Source::Url(url.to_string()),
            None => Source::Local(workdir.to_path_buf()),
        }
    }

    /// The argument `git fetch` gets.
    fn git_arg(&self) -> String {
        match self {
            Source::Url(u) => u.clone(),
            Source::Local(p) => p.display().to_string(),
        }
    }
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Source::Url(u) => write!(f, "{u}"),
            Source::Local(p) => write!(f, "{} (the agent's --workdir)", p.display()),
        }
    }
}

/// Why a run has no checkout of its commit. Nothing ran.
#[derive(Debug, thiserror::Error)]
pub enum CheckoutError {
    /// The repository URL is not one the agent fetches from.
    #[error("refusing the repository `{url}`: it {why}")]
    BadRepository {
        /// The URL.
        url: String,
        /// What is wrong with it.
        why: &'static str,
    },
    /// The commit is not a full git object id.
    #[error("commit `{0}` is not a 40- or 64-digit hex git object id")]
    BadCommit(String),
    /// The source does not have the commit (or could not be reached).
    #[error("cannot fetch commit {commit} from {from}: {detail}")]
    NotFound {
        /// The published commit.
        commit: String,
        /// Where it was fetched from.
        from: String,
        /// What git said.
        detail: String,
    },
    /// The worktree is not at the published commit.
    #[error("the checkout is at {head}, not at the published commit {commit}")]
    Mismatch {
        /// The published commit.
        commit: String,
        /// What the worktree's `HEAD` is.
        head: String,
    },
    /// A local git or file operation failed.
    #[error("{what}: {detail}")]
    Local {
        /// What was being done.
        what: String,
        /// Why it failed.
        detail: String,
    },
}

fn local(what: impl Into<String>, detail: impl fmt::Display) -> CheckoutError {
    CheckoutError::Local {
        what: what.into(),
        detail: detail.to_string(),
    }
}

/// Runs git with the agent's rules: bounded, no prompt, git's own transports only,
/// no `GIT_DIR`-style variables from the agent's environment. The error is git's
/// (shortened) stderr.
fn git(dir: &Path, args: &[&str], limit: Duration) -> Result<String, String> {
    let mut full: Vec<&str> = vec!["-c", "protocol.allow=never"];
    for p in udos_core::desired::REPOSITORY_SCHEMES {
        full.push("-c");
        full.push(match p {
            "https" => "protocol.https.allow=always",
            "http" => "protocol.http.allow=always",
            "ssh" => "protocol.ssh.allow=always",
            "git" => "protocol.git.allow=always",
            _ => "protocol.file.allow=always",
        });
    }
    full.extend_from_slice(args);
    let expr = duct::cmd("git", full)
        .dir(dir)
        .env("GIT_TERMINAL_PROMPT", "0")
        .env_remove("GIT_DIR")
        .env_remove("GIT_WORK_TREE")
        .env_remove("GIT_INDEX_FILE")
        .env_remove("GIT_OBJECT_DIRECTORY")
        .env_remove("GIT_ALTERNATE_OBJECT_DIRECTORIES")
        .stdin_null()
        .stdout_capture()
        .stderr_capture()
        .unchecked();
    let out = crate::proc::run_bounded(&expr, limit, "git").map_err(|e| format!("{e:#}"))?;
    if out.status.success() {
        return Ok(String::from_utf8_lossy(&out.stdout).trim().to_string());
    }
    let err = String::from_utf8_lossy(&out.stderr);
    let err = err.trim();
    let err = if err.is_empty() {
        format!("git {} exited with {}", args.join(" "), out.status)
    } else {
        err.lines().collect::<Vec<_>>().join("; ")
    };
    Err(err.chars().take(DETAIL_MAX).collect())
}

/// A private directory (0700): it holds what the agent fetched and runs.
fn private_dir(path: &Path) -> Result<(), CheckoutError> {
    std::fs::create_dir_all(path).map_err(|e| local(format!("creating {}", path.display()), e))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o700))
        .map_err(|e| local(format!("locking down {}", path.display()), e))
}

/// The published commit, as git prints object ids (lower case), or why it is not one.
fn normalize_commit(commit: &str) -> Result<String, CheckoutError> {
    let ok = matches!(commit.len(), 40 | 64) && commit.bytes().all(|b| b.is_ascii_hexdigit());
    if !ok {
        return Err(CheckoutError::BadCommit(commit.to_string()));
    }
    Ok(commit.to_ascii_lowercase())
}

struct Inner {
    /// `<agent>/git`: one bare cache repository per source.
    caches: PathBuf,
    /// `<agent>/checkouts`: one worktree per run.
    checkouts: PathBuf,
    /// Git operations on the caches, one at a time: concurrent fetches and worktree
    /// changes would race on the caches' refs and worktree lists.
    lock: Mutex<()>,
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, ()> {
        self.lock.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Makes and removes per-run checkouts (see the module docs). Cheap to clone.
#[derive(Clone)]
pub struct Checkouts {
    inner: Arc<Inner>,
}

/// One run's worktree at its published commit; removed when dropped.
pub struct Checkout {
    inner: Arc<Inner>,
    cache: PathBuf,
    path: PathBuf,
    commit: String,
}

impl Checkout {
    /// The worktree: the repository's top at the commit.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The commit checked out (verified).
    pub fn commit(&self) -> &str {
        &self.commit
    }
}

impl Drop for Checkout {
    fn drop(&mut self) {
        let _g = self.inner.lock();
        remove_worktree(&self.cache, &self.path);
    }
}

/// Remove a worktree and git's record of it, whatever state it is in.
fn remove_worktree(cache: &Path, path: &Path) {
    let p = path.display().to_string();
    if git(
        cache,
        &["worktree", "remove", "--force", "--force", &p],
        GIT_LIMIT,
    )
    .is_err()
    {
        let _ = std::fs::remove_dir_all(path);
        let _ = git(cache, &["worktree", "prune"], GIT_LIMIT);
    }
}

/// Whether the cache has `commit` as a commit object.
fn has_commit(cache: &Path, commit: &str) -> bool {
    git(
        cache,
        &["cat-file", "-e", &format!("{commit}^{{commit}}")],
        GIT_LIMIT,
    )
    .is_ok()
}

/// `HEAD` of the worktree at `path`, checked against `commit`.
pub fn verify_head(path: &Path, commit: &str) -> Result<(), CheckoutError> {
    let head = git(path, &["rev-parse", "--verify", "HEAD"], GIT_LIMIT)
        .map_err(|e| local(format!("reading HEAD of {}", path.display()), e))?;
    if !head.eq_ignore_ascii_case(commit) {
        return Err(CheckoutError::Mismatch {
            commit: commit.to_string(),
            head,
        });
    }
    Ok(())
}

impl Checkouts {
    /// Checkouts under the agent's directory. Worktrees an earlier agent left (it
    /// crashed mid-run) are removed.
    pub fn new(agent_dir: &Path) -> Result<Checkouts, CheckoutError> {
        let inner = Inner {
            caches: agent_dir.join("git"),
            checkouts: agent_dir.join("checkouts"),
            lock: Mutex::new(()),
        };
        private_dir(&inner.caches)?;
        private_dir(&inner.checkouts)?;
        if let Ok(rd) = std::fs::read_dir(&inner.checkouts) {
            for e in rd.flatten() {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
        if let Ok(rd) = std::fs::read_dir(&inner.caches) {
            for e in rd.flatten() {
                let _ = git(&e.path(), &["worktree", "prune"], GIT_LIMIT);
            }
        }
        Ok(Checkouts {
            inner: Arc::new(inner),
        })
    }

    /// Where the worktrees are.
    pub fn dir(&self) -> &Path {
        &self.inner.checkouts
    }

    /// Fetch `commit` from `source`, check it out into a new worktree named `name`
    /// (a file name), and verify it.
    pub fn checkout(
        &self,
        source: &Source,
        commit: &str,
        name: &str,
    ) -> Result<Checkout, CheckoutError> {
        let commit = normalize_commit(commit)?;
        if let Source::Url(url) = source {
            udos_core::desired::check_repository(url).map_err(|why| {
                CheckoutError::BadRepository {
                    url: url.clone(),
                    why,
                }
            })?;
        }
        let _g = self.inner.lock();
        let cache = self.cache(source)?;
        fetch(&cache, source, &commit)?;
        let path = self.inner.checkouts.join(name);
        if path.exists() {
            remove_worktree(&cache, &path);
        }
        let p = path.display().to_string();
        let added = git(
            &cache,
            &["worktree", "add", "--detach", "--quiet", &p, &commit],
            GIT_LIMIT,
        );
        if let Err(e) = added {
            remove_worktree(&cache, &path);
            return Err(local(format!("checking out {commit}"), e));
        }
        let checkout = Checkout {
            inner: self.inner.clone(),
            cache,
            path,
            commit,
        };
        // A failed check drops (removes) the checkout, after this lock is released.
        drop(_g);
        verify_head(&checkout.path, &checkout.commit)?;
        Ok(checkout)
    }

    /// The cache repository of `source`, made when missing (atomically: a crash
    /// leaves no half-made cache).
    fn cache(&self, source: &Source) -> Result<PathBuf, CheckoutError> {
        let id = hex::encode(&Sha256::digest(source.git_arg().as_bytes())[..12]);
        let cache = self.inner.caches.join(format!("{id}.git"));
        if cache.is_dir() {
            return Ok(cache);
        }
        let tmp = self
            .inner
            .caches
            .join(format!(".{id}.tmp-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&tmp);
        let t = tmp.display().to_string();
        let made = git(
            &self.inner.caches,
            &["init", "--quiet", "--bare", &t],
            GIT_LIMIT,
        )
        // Objects are fetched by id, never referenced: no automatic gc may prune them
        // while a run is being checked out.
        .and_then(|_| git(&tmp, &["config", "gc.auto", "0"], GIT_LIMIT));
        if let Err(e) = made {
            let _ = std::fs::remove_dir_all(&tmp);
            return Err(local("making the git cache", e));
        }
        std::fs::rename(&tmp, &cache).map_err(|e| local("making the git cache", e))?;
        Ok(cache)
    }
}

/// Get `commit` into `cache`: nothing to do when it is there; else fetch it by id
/// (servers allow that for commits their refs reach), else fetch every branch and tag
/// (servers that only serve advertised refs) and look again.
fn fetch(cache: &Path, source: &Source, commit: &str) -> Result<(), CheckoutError> {
    if has_commit(cache, commit) {
        return Ok(());
    }
    let from = source.git_arg();
    let by_id = git(
        cache,
        &[
            "fetch",
            "--quiet",
            "--no-tags",
            "--no-write-fetch-head",
            "--",
            &from,
            commit,
        ],
        FETCH_LIMIT,
    );
    if has_commit(cache, commit) {
        return Ok(());
    }
    let all = git(
        cache,
        &[
            "fetch",
            "--quiet",
            "--no-tags",
            "--no-write-fetch-head",
            "--",
            &from,
            "+refs/heads/*:refs/udos/heads/*",
            "+refs/tags/*:refs/udos/tags/*",
        ],
        FETCH_LIMIT,
    );
    if has_commit(cache, commit) {
        return Ok(());
    }
    let detail = match (by_id, all) {
        (_, Err(e)) => e,
        (Err(e), Ok(_)) => format!("no branch or tag reaches it ({e})"),
        (Ok(_), Ok(_)) => "no branch or tag reaches it".to_string(),
    };
    Err(CheckoutError::NotFound {
        commit: commit.to_string(),
        from: source.to_string(),
        detail,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::process::CommandExt as _;
    use std::process::Command;

    /// Run git in `dir` as a test user would; panics on failure.
    fn sh_git(dir: &Path, args: &[&str]) -> String {
        let out = Command::new("git")
            .args(args)
            .current_dir(dir)
            .env("GIT_AUTHOR_NAME", "t")
            .env("GIT_AUTHOR_EMAIL", "t@example.invalid")
            .env("GIT_COMMITTER_NAME", "t")
            .env("GIT_COMMITTER_EMAIL", "t@example.invalid")
            .output()
            .expect("run git");
        assert!(
            out.status.success(),
            "git {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    /// A repository with two commits of `msg.txt` ("A", then "B"); returns their ids.
    fn two_commits(dir: &Path) -> (String, String) {
        sh_git(dir, &["init", "-q", "."]);
        std::fs::write(dir.join("msg.txt"), "A\n").unwrap();
        sh_git(dir, &["add", "-A"]);
        sh_git(dir, &["commit", "-q", "-m", "A"]);
        let a = sh_git(dir, &["rev-parse", "HEAD"]);
        std::fs::write(dir.join("msg.txt"), "B\n").unwrap();
        sh_git(dir, &["commit", "-q", "-am", "B"]);
        let b = sh_git(dir, &["rev-parse", "HEAD"]);
        (a, b)
    }

    fn entries(dir: &Path) -> usize {
        std::fs::read_dir(dir).map(|d| d.count()).unwrap_or(0)
    }

    #[test]
    fn the_source_is_the_spec_then_the_agent_then_the_workdir() {
        let wd = Path::new("/w");
        assert_eq!(
            Source::pick(Some("https://a/r"), Some("https://b/r"), wd),
            Source::Url("https://a/r".into())
        );
        assert_eq!(
            Source::pick(None, Some("https://b/r"), wd),
            Source::Url("https://b/r".into())
        );
        assert_eq!(Source::pick(None, None, wd), Source::Local(wd.into()));
    }

    #[test]
    fn each_run_gets_its_own_commit_and_leaves_nothing_behind() {
        let repo = tempfile::tempdir().unwrap();
        let (a, b) = two_commits(repo.path());
        // The workdir's own state is not what runs: an uncommitted edit.
        std::fs::write(repo.path().join("msg.txt"), "edited\n").unwrap();
        let agent = tempfile::tempdir().unwrap();
        let co = Checkouts::new(agent.path()).unwrap();
        let src = Source::Local(repo.path().to_path_buf());
        let ca = co.checkout(&src, &a, "run-1").unwrap();
        let cb = co.checkout(&src, &b.to_ascii_uppercase(), "run-2").unwrap();
        assert_eq!(ca.commit(), a);
        assert_eq!(cb.commit(), b, "normalised to git's lower case");
        let read = |c: &Checkout| std::fs::read_to_string(c.path().join("msg.txt")).unwrap();
        assert_eq!((read(&ca), read(&cb)), ("A\n".into(), "B\n".into()));
        assert_eq!(sh_git(ca.path(), &["status", "--porcelain"]), "", "clean");
        let mode = std::fs::metadata(co.dir()).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o700);
        let (pa, pb) = (ca.path().to_path_buf(), cb.path().to_path_buf());
        drop(ca);
        assert!(!pa.exists() && pb.exists());
        drop(cb);
        assert!(!pb.exists());
        assert_eq!(entries(co.dir()), 0);
        // git forgot the worktrees too.
        let cache = std::fs::read_dir(agent.path().join("git"))
            .unwrap()
            .next()
            .unwrap()
            .unwrap()
            .path();
        let list = sh_git(&cache, &["worktree", "list", "--porcelain"]);
        assert_eq!(list.matches("worktree ").count(), 1, "{list}");
        // A second run of a cached commit needs no source any more.
        let gone = tempfile::tempdir().unwrap();
        std::fs::rename(repo.path().join(".git"), gone.path().join("moved")).unwrap();
        let again = co.checkout(&src, &a, "run-3").unwrap();
        assert_eq!(read(&again), "A\n");
    }

    #[test]
    fn a_commit_the_source_does_not_have_is_refused_and_nothing_is_left() {
        let repo = tempfile::tempdir().unwrap();
        two_commits(repo.path());
        let agent = tempfile::tempdir().unwrap();
        let co = Checkouts::new(agent.path()).unwrap();
        let src = Source::Local(repo.path().to_path_buf());
        let missing = "0123456789abcdef0123456789abcdef01234567";
        let e = co.checkout(&src, missing, "run-1").err().unwrap();
        assert!(matches!(e, CheckoutError::NotFound { .. }), "{e:?}");
        let msg = e.to_string();
        assert!(
            msg.contains(missing) && msg.contains(&repo.path().display().to_string()),
            "{msg}"
        );
        assert_eq!(entries(co.dir()), 0);
        for bad in ["abc", "zz23456789abcdef0123456789abcdef01234567"] {
            let e = co.checkout(&src, bad, "run-2").err().unwrap();
            assert!(matches!(e, CheckoutError::BadCommit(_)), "{e:?}");
        }
        // A source that is not a repository at all.
        let empty = tempfile::tempdir().unwrap();
        let src = Source::Local(empty.path().to_path_buf());
        let e = co.checkout(&src, missing, "run-3").err().unwrap();
        assert!(matches!(e, CheckoutError::NotFound { .. }), "{e:?}");
        assert_eq!(entries(co.dir()), 0);
    }

    #[test]
    fn urls_that_are_options_or_helpers_never_reach_git() {
        let agent = tempfile::tempdir().unwrap();
        let co = Checkouts::new(agent.path()).unwrap();
        let marker = agent.path().join("pwned");
        let commit = "0123456789abcdef0123456789abcdef01234567";
        for url in [
            format!("ext::sh -c touch% {}", marker.display()),
            "ext::sh".to_string(),
            format!("--upload-pack=touch {}", marker.display()),
        ] {
            let e = co
                .checkout(&Source::Url(url.clone()), commit, "r")
                .err()
                .unwrap();
            assert!(matches!(e, CheckoutError::BadRepository { .. }), "{url}");
        }
        // Even past the URL check, git itself refuses helpers (defence in depth).
        let e = git(
            agent.path(),
            &[
                "ls-remote",
                "--",
                &format!("ext::touch {}", marker.display()),
            ],
            GIT_LIMIT,
        )
        .unwrap_err();
        assert!(e.contains("not allowed") || e.contains("unable"), "{e}");
        assert!(!marker.exists());
        assert_eq!(entries(&agent.path().join("git")), 0, "no cache was made");
    }

    #[test]
    fn a_worktree_at_another_commit_fails_verification() {
        let repo = tempfile::tempdir().unwrap();
        let (a, b) = two_commits(repo.path());
        sh_git(repo.path(), &["checkout", "-q", "--detach", &a]);
        verify_head(repo.path(), &a).unwrap();
        let e = verify_head(repo.path(), &b).unwrap_err();
        assert!(
            matches!(&e, CheckoutError::Mismatch { commit, head } if *commit == b && *head == a),
            "{e:?}"
        );
    }

    #[test]
    fn worktrees_of_a_crashed_agent_are_removed_at_start() {
        let repo = tempfile::tempdir().unwrap();
        let (a, _) = two_commits(repo.path());
        let agent = tempfile::tempdir().unwrap();
        let co = Checkouts::new(agent.path()).unwrap();
        let src = Source::Local(repo.path().to_path_buf());
        let c = co.checkout(&src, &a, "run-1").unwrap();
        let path = c.path().to_path_buf();
        std::mem::forget(c); // the agent died mid-run
        assert!(path.exists());
        let co = Checkouts::new(agent.path()).unwrap();
        assert!(!path.exists());
        // The name can be used again at once.
        let c = co.checkout(&src, &a, "run-1").unwrap();
        assert_eq!(
            std::fs::read_to_string(c.path().join("msg.txt")).unwrap(),
            "A\n"
        );
    }

    /// `git daemon` serving `base` on a free loopback port; killed when dropped.
    struct Daemon(std::process::Child, u16);

    impl Drop for Daemon {
        fn drop(&mut self) {
            kill_group(&mut self.0);
        }
    }

    /// `git daemon` is `git` running `git-daemon`, which forks per connection: kill
    /// the whole process group, not just `git`.
    fn kill_group(child: &mut std::process::Child) {
        // SAFETY: kill(2) on the process group of a child this test started and has
        // not reaped (its pid is the group id: `process_group(0)`).
        unsafe {
            libc::kill(-(child.id() as libc::pid_t), libc::SIGKILL);
        }
        let _ = child.wait();
    }

    fn daemon(base: &Path) -> Daemon {
        for _ in 0..20 {
            let port = std::net::TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
                .port();
            let mut child = Command::new("git")
                .arg("daemon")
                .arg("--listen=127.0.0.1")
                .arg(format!("--port={port}"))
                .arg(format!("--base-path={}", base.display()))
                .arg("--export-all")
                .arg("--reuseaddr")
                .arg(base)
                .stderr(std::process::Stdio::null())
                .process_group(0)
                .spawn()
                .expect("git daemon");
            for _ in 0..100 {
                if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                    return Daemon(child, port);
                }
                if let Ok(Some(_)) = child.try_wait() {
                    break; // the port was taken meanwhile: another one
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            kill_group(&mut child);
        }
        panic!("git daemon did not start");
    }

    #[test]
    fn commits_are_fetched_from_a_git_server() {
        let base = tempfile::tempdir().unwrap();
        let work = base.path().join("work");
        std::fs::create_dir(&work).unwrap();
        let (a, b) = two_commits(&work);
        sh_git(base.path(), &["clone", "-q", "--bare", "work", "r.git"]);
        let d = daemon(base.path());
        let url = format!("git://127.0.0.1:{}/r.git", d.1);
        let agent = tempfile::tempdir().unwrap();
        let co = Checkouts::new(agent.path()).unwrap();
        let src = Source::Url(url.clone());
        for (commit, want) in [(&b, "B\n"), (&a, "A\n")] {
            let c = co.checkout(&src, commit, "run").unwrap();
            assert_eq!(
                std::fs::read_to_string(c.path().join("msg.txt")).unwrap(),
                want
            );
        }
        let e = co
            .checkout(&src, &"ab".repeat(20), "run")
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains(&"ab".repeat(20)) && e.contains(&url), "{e}");
        assert_eq!(entries(co.dir()), 0);
    }
}
