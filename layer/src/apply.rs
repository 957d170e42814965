//! Merge an overlay-form layer directory onto a directory (`udos restore`).
//!
//! The layer directory is what [`crate::unpack::unpack`] produces: whiteouts are 0/0
//! character devices, opaque directories carry `user.overlay.opaque=y` (or
//! `trusted.overlay.opaque=y`). [`apply`] replays it onto a target the way overlayfs
//! would show the layer on top of it.
//!
//! The target is never trusted to be link-free: every component is opened with
//! `O_NOFOLLOW` relative to the target's descriptor; where the layer has a directory
//! and the target has a symlink (or a file), the symlink is replaced by a directory,
//! never followed.

use std::collections::HashMap;
use std::ffi::CString;
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::rc::Rc;

use rustix::fs::{self as rfs, AtFlags, FileType, Mode, OFlags, StatExt};
use rustix::io::Errno;

use crate::fsutil;

/// What [`apply`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ApplyStats {
    /// Regular files copied.
    pub files: u64,
    /// Bytes of file contents copied.
    pub bytes: u64,
    /// Directories created or updated.
    pub dirs: u64,
    /// Symlinks created.
    pub symlinks: u64,
    /// Hardlinks recreated (files that share an inode in the layer share one in the
    /// target).
    pub hardlinks: u64,
    /// Whiteouts applied (whether or not the path existed in the target).
    pub whiteouts: u64,
    /// Opaque directories applied (their target directory emptied first).
    pub opaque_dirs: u64,
    /// Entries skipped: fifos, sockets, device nodes other than whiteouts.
    pub skipped: u64,
}

/// Why [`apply`] failed. The target may be partly updated.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    /// The layer directory could not be opened.
    #[error("cannot open layer directory {path}: {source}")]
    OpenLayer {
        /// The layer directory.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
    /// The target directory could not be opened.
    #[error("cannot open target directory {path}: {source}")]
    OpenTarget {
        /// The target directory.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
    /// Reading the layer failed.
    #[error("cannot {op} {path:?} in the layer: {source}")]
    Layer {
        /// Path relative to the layer directory.
        path: String,
        /// The operation.
        op: &'static str,
        /// The OS error.
        source: io::Error,
    },
    /// Changing the target failed.
    #[error("cannot {op} {path:?} in the target: {source}")]
    Target {
        /// Path relative to the target directory.
        path: String,
        /// The operation.
        op: &'static str,
        /// The OS error.
        source: io::Error,
    },
}

fn layer_err(rel: &[u8], op: &'static str) -> impl FnOnce(Errno) -> ApplyError {
    let path = String::from_utf8_lossy(rel).into_owned();
    move |e| ApplyError::Layer {
        path,
        op,
        source: e.into(),
    }
}

fn target_err(rel: &[u8], op: &'static str) -> impl FnOnce(Errno) -> ApplyError {
    let path = String::from_utf8_lossy(rel).into_owned();
    move |e| ApplyError::Target {
        path,
        op,
        source: e.into(),
    }
}

/// A pending entry: `name` in the layer directory `src` and the target directory `dst`.
struct Item {
    src: Rc<OwnedFd>,
    dst: Rc<OwnedFd>,
    name: CString,
    rel: Vec<u8>,
    comps: Rc<Vec<CString>>,
}

fn push_children(
    stack: &mut Vec<Item>,
    src: OwnedFd,
    dst: OwnedFd,
    rel: &[u8],
    comps: &[CString],
) -> Result<(), ApplyError> {
    let names = fsutil::sorted_names(src.as_fd()).map_err(layer_err(rel, "list"))?;
    let (src, dst) = (Rc::new(src), Rc::new(dst));
    let comps = Rc::new(comps.to_vec());
    for name in names.into_iter().rev() {
        let mut child = rel.to_vec();
        if !child.is_empty() {
            child.push(b'/');
        }
        child.extend_from_slice(name.as_bytes());
        stack.push(Item {
            src: Rc::clone(&src),
            dst: Rc::clone(&dst),
            name,
            rel: child,
            comps: Rc::clone(&comps),
        });
    }
    Ok(())
}

/// A directory whose mode and mtime are set once everything else is applied.
struct DeferredDir {
    comps: Vec<CString>,
    mode: u32,
    mtime: (i64, u32),
    rel: Vec<u8>,
}

/// Walks `comps` from `root`, never following a symlink.
fn open_target_dirs(root: BorrowedFd<'_>, comps: &[CString]) -> Result<OwnedFd, Errno> {
    let mut cur = fsutil::reopen_dir(root)?;
    for comp in comps {
        cur = fsutil::open_dir_nofollow(cur.as_fd(), comp)?;
    }
    Ok(cur)
}

/// Merges the overlay-form layer directory `layer_dir` onto `target`.
///
/// - a 0/0 character device deletes that path in the target (a file, or a whole tree);
/// - a directory with `user.overlay.opaque=y` (or `trusted.overlay.opaque=y`) has its
///   target directory emptied first, then filled from the layer;
/// - directories are created or updated, replacing a file or symlink in their way;
/// - regular files and symlinks replace what is at their path (symlinks are copied as
///   symlinks); files that share an inode in the layer are hardlinked in the target;
/// - mode, uid, gid and mtime are copied (directory modes and mtimes last); the opaque
///   xattr itself is not copied;
/// - fifos, sockets and other device nodes are skipped and counted.
///
/// No symlink in the target is ever followed.
pub fn apply(layer_dir: &Path, target: &Path) -> Result<ApplyStats, ApplyError> {
    let src_root = fsutil::open_dir_path(layer_dir).map_err(|e| ApplyError::OpenLayer {
        path: layer_dir.to_path_buf(),
        source: e.into(),
    })?;
    let dst_root = fsutil::open_dir_path(target).map_err(|e| ApplyError::OpenTarget {
        path: target.to_path_buf(),
        source: e.into(),
    })?;
    let mut stats = ApplyStats::default();
    if fsutil::is_opaque(src_root.as_fd()) {
        fsutil::remove_children(dst_root.as_fd()).map_err(target_err(b".", "empty"))?;
        stats.opaque_dirs += 1;
    }
    let root_copy = fsutil::reopen_dir(dst_root.as_fd()).map_err(target_err(b".", "open"))?;
    let mut stack = Vec::new();
    push_children(&mut stack, src_root, root_copy, b"", &[])?;
    // Inode in the layer -> path components of its first copy in the target.
    let mut copies: HashMap<(u64, u64), Vec<CString>> = HashMap::new();
    // Directories whose mode and mtime are set at the end.
    let mut deferred: Vec<DeferredDir> = Vec::new();
    let mut buf = vec![0u8; 128 * 1024];

    while let Some(item) = stack.pop() {
        let (src, dst, name, rel) = (item.src.as_fd(), item.dst.as_fd(), &item.name, &item.rel);
        let Some(st) = fsutil::lstat_at(src, name).map_err(layer_err(rel, "stat"))? else {
            continue;
        };
        let mut comps = item.comps.as_ref().clone();
        comps.push(name.clone());
        let mtime = (st.mtime(), st.st_mtime_nsec as u32);
        match fsutil::file_type(&st) {
            _ if fsutil::is_whiteout(&st) => {
                fsutil::remove_tree_at(dst, name).map_err(target_err(rel, "delete"))?;
                stats.whiteouts += 1;
            }
            FileType::Directory => {
                let sdir = fsutil::open_dir_nofollow(src, name).map_err(layer_err(rel, "open"))?;
                match fsutil::lstat_at(dst, name).map_err(target_err(rel, "stat"))? {
                    Some(t) if fsutil::file_type(&t) == FileType::Directory => {}
                    Some(_) => {
                        // A file or a symlink where the layer has a directory: replace
                        // it, never follow it.
                        rfs::unlinkat(dst, name.as_c_str(), AtFlags::empty())
                            .map_err(target_err(rel, "replace"))?;
                        rfs::mkdirat(dst, name.as_c_str(), Mode::from_raw_mode(0o700))
                            .map_err(target_err(rel, "create directory"))?;
                    }
                    None => rfs::mkdirat(dst, name.as_c_str(), Mode::from_raw_mode(0o700))
                        .map_err(target_err(rel, "create directory"))?,
                }
                let ddir = fsutil::open_dir_nofollow(dst, name).map_err(target_err(rel, "open"))?;
                if fsutil::is_opaque(sdir.as_fd()) {
                    fsutil::remove_children(ddir.as_fd()).map_err(target_err(rel, "empty"))?;
                    stats.opaque_dirs += 1;
                }
                let (u, g) = fsutil::owner(st.st_uid, st.st_gid);
                rfs::fchown(ddir.as_fd(), u, g).map_err(target_err(rel, "chown"))?;
                deferred.push(DeferredDir {
                    comps: comps.clone(),
                    mode: fsutil::perm_bits(&st),
                    mtime,
                    rel: rel.clone(),
                });
                stats.dirs += 1;
                push_children(&mut stack, sdir, ddir, rel, &comps)?;
            }
            FileType::RegularFile => {
                fsutil::remove_tree_at(dst, name).map_err(target_err(rel, "replace"))?;
                let key = (st.st_dev, st.st_ino);
                if st.st_nlink > 1 {
                    if let Some(first) = copies.get(&key) {
                        if link_copy(dst_root.as_fd(), first, dst, name).is_ok() {
                            stats.hardlinks += 1;
                            continue;
                        }
                    } else {
                        copies.insert(key, comps.clone());
                    }
                }
                let sfd = rfs::openat(
                    src,
                    name.as_c_str(),
                    OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC | OFlags::NOCTTY,
                    Mode::empty(),
                )
                .map_err(layer_err(rel, "open"))?;
                let dfd = rfs::openat(
                    dst,
                    name.as_c_str(),
                    OFlags::WRONLY
                        | OFlags::CREATE
                        | OFlags::EXCL
                        | OFlags::NOFOLLOW
                        | OFlags::CLOEXEC,
                    Mode::from_raw_mode(0o600),
                )
                .map_err(target_err(rel, "create"))?;
                let mut out = File::from(dfd);
                let copied = copy(File::from(sfd), &mut out, &mut buf, rel)?;
                fsutil::set_fd_meta(
                    out.as_fd(),
                    st.st_uid,
                    st.st_gid,
                    fsutil::perm_bits(&st),
                    Some(mtime),
                )
                .map_err(target_err(rel, "set metadata of"))?;
                stats.files += 1;
                stats.bytes += copied;
            }
            FileType::Symlink => {
                let link = rfs::readlinkat(src, name.as_c_str(), Vec::new())
                    .map_err(layer_err(rel, "readlink"))?;
                fsutil::remove_tree_at(dst, name).map_err(target_err(rel, "replace"))?;
                rfs::symlinkat(link.as_c_str(), dst, name.as_c_str())
                    .map_err(target_err(rel, "create symlink"))?;
                fsutil::set_link_meta(dst, name, st.st_uid, st.st_gid, mtime)
                    .map_err(target_err(rel, "set owner and mtime of"))?;
                stats.symlinks += 1;
            }
            _ => stats.skipped += 1,
        }
    }

    for d in deferred {
        let rel = d.rel;
        let dir = open_target_dirs(dst_root.as_fd(), &d.comps).map_err(target_err(&rel, "open"))?;
        rfs::fchmod(dir.as_fd(), Mode::from_raw_mode(d.mode)).map_err(target_err(&rel, "chmod"))?;
        rfs::futimens(dir.as_fd(), &fsutil::timestamps(d.mtime.0, d.mtime.1))
            .map_err(target_err(&rel, "set mtime of"))?;
    }
    Ok(stats)
}

/// Hardlinks the earlier copy at `first` (components from the target root) to `name`
/// in `dst`.
fn link_copy(
    root: BorrowedFd<'_>,
    first: &[CString],
    dst: BorrowedFd<'_>,
    name: &CString,
) -> Result<(), Errno> {
    let Some((fname, parents)) = first.split_last() else {
        return Err(Errno::INVAL);
    };
    let fdir = open_target_dirs(root, parents)?;
    rfs::linkat(
        fdir.as_fd(),
        fname.as_c_str(),
        dst,
        name.as_c_str(),
        AtFlags::empty(),
    )
}

fn copy(mut src: File, out: &mut File, buf: &mut [u8], rel: &[u8]) -> Result<u64, ApplyError> {
    use std::io::{Read, Write};
    let mut total = 0u64;
    loop {
        let n = match src.read(buf) {
            Ok(0) => return Ok(total),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(source) => {
                return Err(ApplyError::Layer {
                    path: String::from_utf8_lossy(rel).into_owned(),
                    op: "read",
                    source,
                })
            }
        };
        out.write_all(buf.get(..n).unwrap_or_default())
            .map_err(|source| ApplyError::Target {
                path: String::from_utf8_lossy(rel).into_owned(),
                op: "write",
                source,
            })?;
        total += n as u64;
    }
}
