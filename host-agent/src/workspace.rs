//! The workspace layer: the git working tree that holds the workflow, at `/workspace`.
//!
//! Files are those git would show: tracked and untracked-but-not-ignored, as they are
//! on disk now (uncommitted edits included), and the repository itself (`.git`), so
//! `git` works in steps. The layer id is a hash of the paths, modes and contents, so an
//! unchanged tree reuses its layer.

use std::io::Read;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use sha2::{Digest, Sha256};

/// The working tree a workflow belongs to.
#[derive(Debug, Clone)]
pub struct WorkingTree {
    /// Top of the tree (the git top level, else the workflow's directory).
    pub root: PathBuf,
    /// Files relative to `root`, sorted.
    pub files: Vec<PathBuf>,
    /// The repository, when the tree is a git working tree.
    pub git: Option<GitDir>,
}

/// Where a working tree's repository is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GitDir {
    /// `.git` is a directory: copied as it is.
    Plain(PathBuf),
    /// `.git` is a file (a linked worktree or a submodule): the repository is cloned
    /// into the layer at the tree's HEAD.
    Linked {
        /// The commit checked out.
        head: String,
        /// The branch ref, if HEAD is on one.
        branch: Option<String>,
    },
}

/// How long a git query on the working tree may take.
const GIT_LIMIT: std::time::Duration = std::time::Duration::from_secs(120);

/// `.git/index` is git's stat cache: it changes on every `git status` and says nothing
/// about the content, so it is left out of the layer id (but copied).
const GIT_INDEX: &str = "index";

/// Find the working tree of `workflow` and list its files.
pub fn discover(workflow: &Path) -> Result<WorkingTree> {
    let dir = workflow
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let top = crate::proc::run_bounded(
        &duct::cmd!("git", "rev-parse", "--show-toplevel")
            .dir(dir)
            .stdout_capture()
            .stderr_null()
            .unchecked(),
        GIT_LIMIT,
        "git rev-parse",
    );
    let mut git = None;
    let (root, files) = match top {
        Ok(out) if out.status.success() => {
            let root = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
            let listed = crate::proc::read_bounded(
                &duct::cmd!(
                    "git",
                    "ls-files",
                    "-z",
                    "--cached",
                    "--others",
                    "--exclude-standard"
                )
                .dir(&root),
                GIT_LIMIT,
                "git ls-files",
            )
            .with_context(|| format!("listing the files of {}", root.display()))?;
            let files = listed
                .split('\0')
                .filter(|s| !s.is_empty())
                .map(PathBuf::from)
                // A tracked file deleted in the working tree is not in the workspace.
                .filter(|p| root.join(p).symlink_metadata().is_ok())
                .collect();
            git = git_dir(&root)?;
            (root, files)
        }
        _ => {
            // Not a git tree: the workflow's own directory, recursively.
            let root = dir.canonicalize()?;
            let mut files = Vec::new();
            walk(&root, Path::new(""), &mut files)?;
            (root, files)
        }
    };
    let mut files: Vec<PathBuf> = files;
    files.sort();
    files.dedup();
    Ok(WorkingTree { root, files, git })
}

fn git_dir(root: &Path) -> Result<Option<GitDir>> {
    let dot = root.join(".git");
    let md = match dot.symlink_metadata() {
        Ok(md) => md,
        Err(_) => return Ok(None),
    };
    if md.is_dir() {
        return Ok(Some(GitDir::Plain(dot)));
    }
    let read = |args: &[&str]| {
        crate::proc::read_bounded(
            &duct::cmd("git", args).dir(root).unchecked(),
            std::time::Duration::from_secs(60),
            "git",
        )
    };
    let head = read(&["rev-parse", "--verify", "-q", "HEAD"])?;
    if head.is_empty() {
        return Ok(None);
    }
    let branch = Some(read(&["symbolic-ref", "-q", "HEAD"])?).filter(|b| !b.is_empty());
    Ok(Some(GitDir::Linked { head, branch }))
}

/// Every file under `dir` (relative, sorted), not following symlinks.
/// A file under `.git` that git never changes once written: a loose object
/// (`objects/ab/cdef...`) or a pack's file (`objects/pack/pack-*`). git writes such a
/// file under a temporary name and renames it, and removes it rather than rewriting
/// it, so a hard link to it keeps its content whatever git does next.
fn is_immutable_object(rel: &Path) -> bool {
    let parts: Vec<&str> = rel.iter().filter_map(|c| c.to_str()).collect();
    match parts.as_slice() {
        ["objects", "pack", name] => name.starts_with("pack-"),
        ["objects", dir, _] => dir.len() == 2 && dir.bytes().all(|b| b.is_ascii_hexdigit()),
        _ => false,
    }
}

/// Hard-links `src` at `dst`, or copies it where a link cannot be made (another
/// filesystem).
fn link_or_copy(src: &Path, dst: &Path) -> Result<()> {
    if std::fs::hard_link(src, dst).is_ok() {
        return Ok(());
    }
    std::fs::copy(src, dst).with_context(|| format!("copying {}", src.display()))?;
    Ok(())
}

fn walk_all(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    let mut todo = vec![PathBuf::new()];
    while let Some(rel) = todo.pop() {
        let mut entries: Vec<_> = std::fs::read_dir(dir.join(&rel))
            .with_context(|| format!("listing {}", dir.join(&rel).display()))?
            .collect::<std::io::Result<_>>()?;
        entries.sort_by_key(|e| e.file_name());
        for e in entries {
            let r = rel.join(e.file_name());
            if e.file_type()?.is_dir() {
                todo.push(r);
            } else {
                out.push(r);
            }
        }
    }
    out.sort();
    Ok(out)
}

fn walk(root: &Path, rel: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    for e in std::fs::read_dir(root.join(rel))? {
        let e = e?;
        let r = rel.join(e.file_name());
        if e.file_type()?.is_dir() {
            if e.file_name() != ".git" {
                walk(root, &r, out)?;
            }
        } else {
            out.push(r);
        }
    }
    Ok(())
}

impl WorkingTree {
    /// Content id of the tree: paths, modes, symlink targets and file contents.
    pub fn layer_id(&self) -> Result<String> {
        let mut h = Sha256::new();
        h.update(b"udos-workspace-v1\0");
        let mut buf = vec![0u8; 1 << 16];
        for rel in &self.files {
            let p = self.root.join(rel);
            let md = p.symlink_metadata()?;
            h.update(rel.as_os_str().as_encoded_bytes());
            h.update(b"\0");
            h.update(md.mode().to_le_bytes());
            if md.file_type().is_symlink() {
                h.update(std::fs::read_link(&p)?.as_os_str().as_encoded_bytes());
            } else if md.is_file() {
                h.update(md.len().to_le_bytes());
                let mut f = std::fs::File::open(&p)?;
                loop {
                    let n = f.read(&mut buf)?;
                    if n == 0 {
                        break;
                    }
                    h.update(&buf[..n]);
                }
            }
            h.update(b"\0");
        }
        match &self.git {
            None => {}
            Some(GitDir::Linked { head, branch }) => {
                h.update(b"git-linked\0");
                h.update(head.as_bytes());
                h.update(branch.as_deref().unwrap_or("").as_bytes());
            }
            Some(GitDir::Plain(dir)) => {
                h.update(b"git\0");
                for rel in walk_all(dir)? {
                    if rel == Path::new(GIT_INDEX) {
                        continue;
                    }
                    let p = dir.join(&rel);
                    h.update(rel.as_os_str().as_encoded_bytes());
                    h.update(b"\0");
                    let md = p.symlink_metadata()?;
                    if md.file_type().is_symlink() {
                        h.update(std::fs::read_link(&p)?.as_os_str().as_encoded_bytes());
                    } else {
                        let mut f = std::fs::File::open(&p)?;
                        loop {
                            let n = f.read(&mut buf)?;
                            if n == 0 {
                                break;
                            }
                            h.update(&buf[..n]);
                        }
                    }
                    h.update(b"\0");
                }
            }
        }
        Ok(hex::encode(h.finalize()))
    }

    /// Copy the tree into `dest/workspace/` (dest must be empty), the layer's layout.
    pub fn materialize(&self, dest: &Path) -> Result<u64> {
        let ws = dest.join("workspace");
        std::fs::create_dir_all(&ws)?;
        std::fs::set_permissions(&ws, std::fs::Permissions::from_mode(0o755))?;
        let mut n = 0;
        for rel in &self.files {
            if rel
                .components()
                .any(|c| !matches!(c, std::path::Component::Normal(_)))
            {
                bail!("refusing odd path {} in the working tree", rel.display());
            }
            let src = self.root.join(rel);
            let dst = ws.join(rel);
            if let Some(parent) = dst.parent() {
                std::fs::create_dir_all(parent)?;
            }
            let md = src.symlink_metadata()?;
            if md.file_type().is_symlink() {
                std::os::unix::fs::symlink(std::fs::read_link(&src)?, &dst)?;
            } else if md.is_file() {
                std::fs::copy(&src, &dst).with_context(|| format!("copying {}", src.display()))?;
            } else {
                continue;
            }
            n += 1;
        }
        match &self.git {
            None => {}
            Some(GitDir::Plain(dir)) => {
                for rel in walk_all(dir)? {
                    let (src, dst) = (dir.join(&rel), ws.join(".git").join(&rel));
                    if let Some(parent) = dst.parent() {
                        std::fs::create_dir_all(parent)?;
                    }
                    if src.symlink_metadata()?.file_type().is_symlink() {
                        std::os::unix::fs::symlink(std::fs::read_link(&src)?, &dst)?;
                    } else if is_immutable_object(&rel) {
                        link_or_copy(&src, &dst)?;
                    } else {
                        std::fs::copy(&src, &dst)
                            .with_context(|| format!("copying {}", src.display()))?;
                    }
                }
                // Steps and snapshots get the repository, not its credentials.
                let scrubbed = crate::git_scrub::scrub(&ws.join(".git"))
                    .context("taking credentials out of the workspace's .git")?;
                if !scrubbed.is_empty() {
                    tracing::info!(?scrubbed, "credentials left out of the workspace layer");
                }
            }
            Some(GitDir::Linked { head, branch }) => {
                self.clone_linked(&ws, head, branch.as_deref())?
            }
        }
        Ok(n)
    }

    /// A linked worktree's `.git` points outside the tree: clone the repository into
    /// the layer instead and put HEAD and the index where the worktree has them.
    fn clone_linked(&self, ws: &Path, head: &str, branch: Option<&str>) -> Result<()> {
        let limit = std::time::Duration::from_secs(600);
        let git_dir = ws.join(".git");
        let run = |expr: duct::Expression| -> Result<()> {
            crate::proc::run_bounded(&expr.stdout_null().stderr_capture(), limit, "git")?;
            Ok(())
        };
        run(duct::cmd!(
            "git", "clone", "--quiet", "--bare", "--local", &self.root, &git_dir
        ))?;
        let g = |args: &[&str]| {
            let mut a = vec!["--git-dir".to_string(), git_dir.display().to_string()];
            a.extend(args.iter().map(|s| s.to_string()));
            duct::cmd("git", a).dir(ws)
        };
        run(g(&["config", "core.bare", "false"]))?;
        match branch {
            Some(b) => {
                run(g(&["update-ref", b, head]))?;
                run(g(&["symbolic-ref", "HEAD", b]))?;
            }
            None => run(g(&["update-ref", "--no-deref", "HEAD", head]))?,
        }
        run(g(&[
            "--work-tree",
            &ws.display().to_string(),
            "read-tree",
            head,
        ]))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn git_tree_lists_tracked_and_untracked_but_not_ignored() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path();
        duct::cmd!("git", "init", "-q", ".")
            .dir(root)
            .run()
            .unwrap();
        std::fs::create_dir_all(root.join(".github/workflows")).unwrap();
        std::fs::write(root.join(".github/workflows/x.yml"), "jobs: {}").unwrap();
        std::fs::write(root.join("tracked.txt"), "t").unwrap();
        std::fs::write(root.join(".gitignore"), "ignored.txt\n").unwrap();
        std::fs::write(root.join("ignored.txt"), "i").unwrap();
        duct::cmd!("git", "add", "tracked.txt", ".gitignore")
            .dir(root)
            .run()
            .unwrap();
        std::fs::write(root.join("untracked.txt"), "u").unwrap();
        duct::cmd!(
            "git",
            "remote",
            "add",
            "origin",
            "https://dev:s3cr3t@example.com/o/r.git"
        )
        .dir(root)
        .run()
        .unwrap();
        let wt = discover(&root.join(".github/workflows/x.yml")).unwrap();
        let names: Vec<String> = wt.files.iter().map(|p| p.display().to_string()).collect();
        assert_eq!(
            names,
            vec![
                ".github/workflows/x.yml",
                ".gitignore",
                "tracked.txt",
                "untracked.txt"
            ]
        );
        let id1 = wt.layer_id().unwrap();
        std::fs::write(root.join("untracked.txt"), "changed").unwrap();
        assert_ne!(id1, wt.layer_id().unwrap());
        let out = tempfile::tempdir().unwrap();
        assert_eq!(wt.materialize(out.path()).unwrap(), 4);
        assert_eq!(
            std::fs::read_to_string(out.path().join("workspace/tracked.txt")).unwrap(),
            "t"
        );
        // The copy's repository has its remote, not the remote's credentials; the
        // working tree's own is untouched.
        let copied = std::fs::read_to_string(out.path().join("workspace/.git/config")).unwrap();
        assert!(copied.contains("https://example.com/o/r.git"), "{copied}");
        assert!(!copied.contains("s3cr3t"), "{copied}");
        let own = std::fs::read_to_string(root.join(".git/config")).unwrap();
        assert!(own.contains("s3cr3t"));
        // Git's objects are shared with the working tree's repository (hard links),
        // everything else is a copy.
        use std::os::unix::fs::MetadataExt;
        let ino = |p: &Path| std::fs::metadata(p).unwrap().ino();
        let git = root.join(".git");
        let objects: Vec<PathBuf> = walk_all(&git.join("objects"))
            .unwrap()
            .into_iter()
            .map(|r| Path::new("objects").join(r))
            .filter(|r| is_immutable_object(r))
            .collect();
        assert!(!objects.is_empty(), "git add wrote loose objects");
        for r in &objects {
            let copy = out.path().join("workspace/.git").join(r);
            assert_eq!(ino(&copy), ino(&git.join(r)), "{}", r.display());
        }
        let index = out.path().join("workspace/.git/index");
        assert_ne!(ino(&index), ino(&git.join("index")));
    }

    #[test]
    fn only_loose_objects_and_packs_count_as_immutable() {
        for (rel, immutable) in [
            ("objects/ab/cdef0123", true),
            ("objects/pack/pack-1234.pack", true),
            ("objects/pack/pack-1234.idx", true),
            ("objects/info/alternates", false),
            ("objects/info/commit-graph", false),
            ("objects/pack/multi-pack-index", false),
            ("objects/zz/cdef", false),
            ("config", false),
            ("refs/heads/main", false),
        ] {
            assert_eq!(is_immutable_object(Path::new(rel)), immutable, "{rel}");
        }
    }
}
