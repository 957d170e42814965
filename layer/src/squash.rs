//! Squash a stack of overlay-form layers into one overlay-form layer.
//!
//! A step VM mounts one read-only device per lower layer, and a VM has few device
//! slots; the host keeps the number of lowers bounded by replacing the earlier steps'
//! layers with their squash. Mounted as one lower in their place (above the same base
//! and workspace layers, under the later ones), the squashed layer shows exactly what
//! the stack showed, with overlayfs semantics:
//!
//! - a whiteout removes the path from the squash and is kept, because the layers under
//!   the squash (base, workspace) may still have that path;
//! - an opaque directory replaces the squash's directory with an empty one marked
//!   `user.overlay.opaque=y`, then its children are merged in;
//! - a directory over a whiteout, file or symlink of an earlier layer replaces it and
//!   is marked opaque (overlayfs never merges a directory through a non-directory);
//!   over a directory it merges, taking the upper directory's metadata (the opaque
//!   marker of the squash's directory stays);
//! - a file or symlink replaces whatever the squash has at its path.
//!
//! Regular files are hardlinked from the source layers (they are immutable once
//! made), so files that share an inode in a layer still share it, and every file
//! keeps its mode (setuid/setgid too), owner, mtime and xattrs. Where the kernel
//! refuses the link (`EXDEV`: another filesystem; `EMLINK`; `EPERM`) the file is
//! copied with its mode, owner, mtime and `user.*` xattrs, and copies of one layer
//! inode are hardlinked together. Nothing in the target or the layers is ever followed.
//!
//! Whiteouts that hide nothing are not harmless: overlayfs passes the `readdir` of a
//! directory that only one layer has straight to that layer, so a whiteout in it is
//! listed (and `lstat` of it fails). A stack made by overlayfs never has one; a squash
//! does when, say, one step created `d/w` and a later one deleted it, and the layers
//! under the squash have no `d`. [`prune_whiteouts`] drops those, given the layers
//! that will lie under the squash.

use std::ffi::{CString, OsStr};
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::rc::Rc;

use rustix::fs::{self as rfs, AtFlags, FileType, StatExt};
use rustix::io::Errno;

use crate::apply::{merge, ApplyError, ApplyStats, MergeMode};
use crate::fsutil;

/// What [`squash`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SquashStats {
    /// Layers merged into the target.
    pub layers: u64,
    /// The sum over those layers of what each merge did (`linked` counts files
    /// hardlinked from a layer, `files` those copied).
    pub merged: ApplyStats,
}

/// Why [`squash`] or [`prune_whiteouts`] failed. The target may hold part of the
/// result: discard it.
#[derive(Debug, thiserror::Error)]
pub enum SquashError {
    /// The target could not be created or read.
    #[error("cannot prepare squash target {path}: {source}")]
    Target {
        /// The target directory.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
    /// The target exists and is not empty.
    #[error("squash target {path} is not empty")]
    TargetNotEmpty {
        /// The target directory.
        path: PathBuf,
    },
    /// Reading or changing the squashed layer, or reading a layer under it, failed
    /// (while pruning whiteouts).
    #[error("cannot {op} {path}: {source}")]
    Prune {
        /// The path (in the squashed layer or a layer under it).
        path: PathBuf,
        /// The operation.
        op: &'static str,
        /// The OS error.
        source: io::Error,
    },
    /// Merging one of the layers failed.
    #[error("cannot squash layer {index} ({path}): {source}")]
    Layer {
        /// Its position in `layers` (0 is the bottom).
        index: usize,
        /// The layer directory.
        path: PathBuf,
        /// What failed.
        source: ApplyError,
    },
}

/// Squashes the overlay-form layer directories `layers` (bottom first) into `target`,
/// an empty or not yet existing directory, as one overlay-form layer (rules in the
/// module docs). Mounted as a single lower over the layers that were under `layers`,
/// `target` shows what the stack of `layers` showed, once [`prune_whiteouts`] has
/// dropped the whiteouts that hide nothing there. The layers must not change
/// afterwards: `target` shares their files' inodes.
pub fn squash(layers: &[&Path], target: &Path) -> Result<SquashStats, SquashError> {
    prepare_target(target)?;
    let mut stats = SquashStats::default();
    for (index, layer) in layers.iter().enumerate() {
        let merged =
            merge(layer, target, MergeMode::Squash).map_err(|source| SquashError::Layer {
                index,
                path: layer.to_path_buf(),
                source,
            })?;
        stats.merged += &merged;
        stats.layers += 1;
    }
    Ok(stats)
}

/// Creates `target`, or checks that the existing directory is empty.
fn prepare_target(target: &Path) -> Result<(), SquashError> {
    let err = |source| SquashError::Target {
        path: target.to_path_buf(),
        source,
    };
    match std::fs::create_dir(target) {
        Ok(()) => return Ok(()),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(err(e)),
    }
    if std::fs::read_dir(target).map_err(err)?.next().is_some() {
        return Err(SquashError::TargetNotEmpty {
            path: target.to_path_buf(),
        });
    }
    Ok(())
}

/// Removes the whiteouts of the squashed layer `target` that hide nothing once it lies
/// over `below` (the layers under it, bottom first: base, workspace), so that none is
/// listed by overlayfs (see the module docs). A whiteout at `p` stays when `p` is
/// visible through `below` and no directory above it in `target` is opaque. Directory
/// mtimes are kept. Returns how many whiteouts were removed.
///
/// The result is only right over exactly `below`: a squash pruned over one base must
/// not be reused over another.
pub fn prune_whiteouts(target: &Path, below: &[&Path]) -> Result<u64, SquashError> {
    let root = fsutil::open_dir_path(target).map_err(prune_err(target, Path::new(""), "open"))?;
    let mut todo = Vec::new();
    let mut pruned = prune_dir(
        &Rc::new(root),
        Path::new(""),
        false,
        below,
        target,
        &mut todo,
    )?;
    while let Some(Pending {
        parent,
        name,
        rel,
        hidden,
    }) = todo.pop()
    {
        let dir = fsutil::open_dir_nofollow(parent.as_fd(), &name)
            .map_err(prune_err(target, &rel, "open"))?;
        let hidden = hidden || fsutil::is_opaque(dir.as_fd());
        pruned += prune_dir(&Rc::new(dir), &rel, hidden, below, target, &mut todo)?;
    }
    Ok(pruned)
}

/// A directory of the squashed layer still to visit.
struct Pending {
    parent: Rc<OwnedFd>,
    name: CString,
    /// Its path in the squashed layer.
    rel: PathBuf,
    /// Whether a directory above it is opaque.
    hidden: bool,
}

fn prune_err(target: &Path, rel: &Path, op: &'static str) -> impl FnOnce(Errno) -> SquashError {
    let path = target.join(rel);
    move |e| SquashError::Prune {
        path,
        op,
        source: e.into(),
    }
}

/// Prunes the whiteouts directly in `dir` (at `rel`; `hidden` when it or a directory
/// above it is opaque) and queues its subdirectories on `todo`.
fn prune_dir(
    dir: &Rc<OwnedFd>,
    rel: &Path,
    hidden: bool,
    below: &[&Path],
    target: &Path,
    todo: &mut Vec<Pending>,
) -> Result<u64, SquashError> {
    let st = rfs::fstat(dir.as_fd()).map_err(prune_err(target, rel, "stat"))?;
    let names = fsutil::sorted_names(dir.as_fd()).map_err(prune_err(target, rel, "list"))?;
    let mut pruned = 0;
    for name in names {
        let child = rel.join(OsStr::from_bytes(name.as_bytes()));
        let Some(cst) =
            fsutil::lstat_at(dir.as_fd(), &name).map_err(prune_err(target, &child, "stat"))?
        else {
            continue;
        };
        if fsutil::is_whiteout(&cst) {
            if hidden || !visible_below(below, &child)? {
                rfs::unlinkat(dir.as_fd(), name.as_c_str(), AtFlags::empty())
                    .map_err(prune_err(target, &child, "remove whiteout"))?;
                pruned += 1;
            }
        } else if fsutil::file_type(&cst) == FileType::Directory {
            todo.push(Pending {
                parent: Rc::clone(dir),
                name,
                rel: child,
                hidden,
            });
        }
    }
    if pruned > 0 {
        // Unlinking changed the directory's mtime, which is the layer's metadata.
        let times = fsutil::timestamps(st.mtime(), st.st_mtime_nsec as u32);
        rfs::futimens(dir.as_fd(), &times).map_err(prune_err(target, rel, "set mtime of"))?;
    }
    Ok(pruned)
}

/// Whether the overlay of `below` (bottom first) shows something at `rel`: looked up
/// component by component as overlayfs does, top layer first; a whiteout or a
/// non-directory ends a directory's merge, an opaque directory ends it after itself.
/// Only directories already checked with `lstat` are descended into, so no symlink
/// is followed.
fn visible_below(below: &[&Path], rel: &Path) -> Result<bool, SquashError> {
    // The directories, top first, that make up the merged directory reached so far.
    let mut dirs: Vec<PathBuf> = below.iter().rev().map(|p| p.to_path_buf()).collect();
    let mut comps = rel.components().peekable();
    while let Some(comp) = comps.next() {
        let last = comps.peek().is_none();
        let mut next = Vec::new();
        for dir in &dirs {
            let path = dir.join(comp);
            let md = match std::fs::symlink_metadata(&path) {
                Ok(md) => md,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(source) => {
                    return Err(SquashError::Prune {
                        path,
                        op: "stat",
                        source,
                    })
                }
            };
            if is_whiteout_md(&md) {
                break;
            }
            if !md.is_dir() {
                // A non-directory shows only when nothing above it was a directory.
                if next.is_empty() {
                    return Ok(last);
                }
                break;
            }
            let opaque = is_opaque_path(&path);
            next.push(path);
            if opaque {
                break;
            }
        }
        if next.is_empty() {
            return Ok(false);
        }
        dirs = next;
    }
    Ok(true)
}

fn is_whiteout_md(md: &std::fs::Metadata) -> bool {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    md.file_type().is_char_device() && md.rdev() == 0
}

/// Whether the directory at `path` (not a symlink: checked by the caller) is opaque.
fn is_opaque_path(path: &Path) -> bool {
    [fsutil::OPAQUE_XATTR_USER, fsutil::OPAQUE_XATTR_TRUSTED]
        .iter()
        .any(|name| {
            let mut buf = [0u8; 8];
            matches!(rfs::lgetxattr(path, *name, &mut buf), Ok(1) if buf.first() == Some(&b'y'))
        })
}
