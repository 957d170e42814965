//! The workspace layer: the git working tree that holds the workflow, at `/workspace`.
//!
//! Files are those git would show: tracked and untracked-but-not-ignored, as they are
//! on disk now (uncommitted edits included). `.git` itself is left out. The layer id is
//! a hash of the paths, modes and contents, so an unchanged tree reuses its layer.

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
}

/// Find the working tree of `workflow` and list its files.
pub fn discover(workflow: &Path) -> Result<WorkingTree> {
    let dir = workflow
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let top = duct::cmd!("git", "rev-parse", "--show-toplevel")
        .dir(dir)
        .stdout_capture()
        .stderr_null()
        .unchecked()
        .run();
    let (root, files) = match top {
        Ok(out) if out.status.success() => {
            let root = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
            let listed = duct::cmd!(
                "git",
                "ls-files",
                "-z",
                "--cached",
                "--others",
                "--exclude-standard"
            )
            .dir(&root)
            .stdout_capture()
            .read()
            .with_context(|| format!("listing the files of {}", root.display()))?;
            let files = listed
                .split('\0')
                .filter(|s| !s.is_empty())
                .map(PathBuf::from)
                // A tracked file deleted in the working tree is not in the workspace.
                .filter(|p| root.join(p).symlink_metadata().is_ok())
                .collect();
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
    Ok(WorkingTree { root, files })
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
        Ok(n)
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
    }
}
