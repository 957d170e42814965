//! Merge an overlay-form layer directory onto a directory: onto a root (`udos restore`,
//! [`apply`]) or onto another overlay-form layer ([`crate::squash`]).
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
use std::ops::AddAssign;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::rc::Rc;

use rustix::fs::{self as rfs, AtFlags, FileType, Mode, OFlags, Stat, StatExt};
use rustix::io::Errno;

use crate::fsutil;

/// What [`apply`] (or one layer of a [`crate::squash`]) did.
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
    /// Regular files hardlinked from the layer itself instead of copied (squash only).
    pub linked: u64,
    /// Whiteouts applied (whether or not the path existed in the target; a squash
    /// also writes them into the target).
    pub whiteouts: u64,
    /// Opaque directories applied (their target directory emptied first; a squash
    /// also marks it opaque).
    pub opaque_dirs: u64,
    /// Entries skipped: fifos, sockets, device nodes other than whiteouts.
    pub skipped: u64,
}

impl AddAssign<&ApplyStats> for ApplyStats {
    fn add_assign(&mut self, o: &ApplyStats) {
        self.files += o.files;
        self.bytes += o.bytes;
        self.dirs += o.dirs;
        self.symlinks += o.symlinks;
        self.hardlinks += o.hardlinks;
        self.linked += o.linked;
        self.whiteouts += o.whiteouts;
        self.opaque_dirs += o.opaque_dirs;
        self.skipped += o.skipped;
    }
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

impl Item {
    /// Path components of this entry from the target root.
    fn comps_with_name(&self) -> Vec<CString> {
        let mut comps = self.comps.as_ref().clone();
        comps.push(self.name.clone());
        comps
    }
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

/// What a merge makes of its target.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum MergeMode {
    /// The target is a whole root (`udos restore`): whiteouts delete, opaque
    /// directories are emptied, the overlay markers themselves are consumed, and files
    /// are copied (the restored root will be written to; the layer must not be).
    Restore,
    /// The target is itself an overlay-form layer that will lie over other layers
    /// ([`crate::squash`]): whiteouts and opaque markers are kept for the layers below
    /// it, `user.*` xattrs are carried, and regular files are hardlinked from the
    /// layer (copied when that is refused, e.g. `EXDEV`).
    Squash,
}

/// The state of one merge of a layer onto a target.
struct Merger {
    mode: MergeMode,
    dst_root: OwnedFd,
    stats: ApplyStats,
    /// Inode in the layer -> path components of its first copy in the target.
    copies: HashMap<(u64, u64), Vec<CString>>,
    /// Directories whose mode and mtime are set at the end.
    deferred: Vec<DeferredDir>,
    buf: Vec<u8>,
}

/// Merges the overlay-form layer directory `layer_dir` onto `target` (see [`apply`] and
/// [`MergeMode`]).
pub(crate) fn merge(
    layer_dir: &Path,
    target: &Path,
    mode: MergeMode,
) -> Result<ApplyStats, ApplyError> {
    let src_root = fsutil::open_dir_path(layer_dir).map_err(|e| ApplyError::OpenLayer {
        path: layer_dir.to_path_buf(),
        source: e.into(),
    })?;
    let dst_root = fsutil::open_dir_path(target).map_err(|e| ApplyError::OpenTarget {
        path: target.to_path_buf(),
        source: e.into(),
    })?;
    let root_copy = fsutil::reopen_dir(dst_root.as_fd()).map_err(target_err(b".", "open"))?;
    let mut m = Merger {
        mode,
        dst_root,
        stats: ApplyStats::default(),
        copies: HashMap::new(),
        deferred: Vec::new(),
        buf: vec![0u8; 128 * 1024],
    };
    if fsutil::is_opaque(src_root.as_fd()) {
        m.make_opaque(root_copy.as_fd(), b".")?;
    }
    let mut stack = Vec::new();
    push_children(&mut stack, src_root, root_copy, b"", &[])?;
    while let Some(item) = stack.pop() {
        m.entry(&item, &mut stack)?;
    }
    m.finish_dirs()?;
    Ok(m.stats)
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
    merge(layer_dir, target, MergeMode::Restore)
}

impl Merger {
    /// Merges one layer entry (pushing a directory's children onto `stack`).
    fn entry(&mut self, item: &Item, stack: &mut Vec<Item>) -> Result<(), ApplyError> {
        let Some(st) =
            fsutil::lstat_at(item.src.as_fd(), &item.name).map_err(layer_err(&item.rel, "stat"))?
        else {
            return Ok(());
        };
        if fsutil::is_whiteout(&st) {
            return self.whiteout(item, &st);
        }
        match fsutil::file_type(&st) {
            FileType::Directory => self.directory(item, &st, stack),
            FileType::RegularFile => self.regular(item, &st),
            FileType::Symlink => self.symlink(item, &st),
            _ => {
                self.stats.skipped += 1;
                Ok(())
            }
        }
    }

    /// Empties the target directory `dir`; a squash also marks it opaque, so that the
    /// layers under the squashed one stay hidden there.
    fn make_opaque(&mut self, dir: BorrowedFd<'_>, rel: &[u8]) -> Result<(), ApplyError> {
        fsutil::remove_children(dir).map_err(target_err(rel, "empty"))?;
        if self.mode == MergeMode::Squash {
            fsutil::set_opaque(dir).map_err(target_err(rel, "mark opaque"))?;
        }
        self.stats.opaque_dirs += 1;
        Ok(())
    }

    fn whiteout(&mut self, item: &Item, st: &Stat) -> Result<(), ApplyError> {
        let (dst, name, rel) = (item.dst.as_fd(), &item.name, &item.rel);
        fsutil::remove_tree_at(dst, name).map_err(target_err(rel, "delete"))?;
        if self.mode == MergeMode::Squash {
            // The layers under the squashed one may have this path: keep hiding it.
            make_whiteout(dst, name, st).map_err(target_err(rel, "create whiteout"))?;
        }
        self.stats.whiteouts += 1;
        Ok(())
    }

    fn directory(
        &mut self,
        item: &Item,
        st: &Stat,
        stack: &mut Vec<Item>,
    ) -> Result<(), ApplyError> {
        let (src, dst, name, rel) = (item.src.as_fd(), item.dst.as_fd(), &item.name, &item.rel);
        let sdir = fsutil::open_dir_nofollow(src, name).map_err(layer_err(rel, "open"))?;
        let replaced = ensure_dir(dst, name, rel)?;
        let ddir = fsutil::open_dir_nofollow(dst, name).map_err(target_err(rel, "open"))?;
        if fsutil::is_opaque(sdir.as_fd()) {
            self.make_opaque(ddir.as_fd(), rel)?;
        } else if replaced && self.mode == MergeMode::Squash {
            // A whiteout, file or symlink in an earlier squashed layer hid whatever the
            // layers below have here (overlayfs stops at a non-directory): still hide it.
            fsutil::set_opaque(ddir.as_fd()).map_err(target_err(rel, "mark opaque"))?;
        }
        if self.mode == MergeMode::Squash {
            replace_user_xattrs(sdir.as_fd(), ddir.as_fd())
                .map_err(target_err(rel, "copy the xattrs of"))?;
        }
        let (u, g) = fsutil::owner(st.st_uid, st.st_gid);
        rfs::fchown(ddir.as_fd(), u, g).map_err(target_err(rel, "chown"))?;
        let comps = item.comps_with_name();
        self.deferred.push(DeferredDir {
            comps: comps.clone(),
            mode: fsutil::perm_bits(st),
            mtime: (st.mtime(), st.st_mtime_nsec as u32),
            rel: rel.clone(),
        });
        self.stats.dirs += 1;
        push_children(stack, sdir, ddir, rel, &comps)
    }

    fn regular(&mut self, item: &Item, st: &Stat) -> Result<(), ApplyError> {
        let (src, dst, name, rel) = (item.src.as_fd(), item.dst.as_fd(), &item.name, &item.rel);
        fsutil::remove_tree_at(dst, name).map_err(target_err(rel, "replace"))?;
        if self.mode == MergeMode::Squash && link_from_layer(src, dst, name, rel)? {
            self.stats.linked += 1;
            return Ok(());
        }
        if st.st_nlink > 1 && self.link_earlier_copy(item, st) {
            self.stats.hardlinks += 1;
            return Ok(());
        }
        self.copy_file(item, st)
    }

    /// Hardlinks `item` to the target's copy of the same layer inode, if one was made
    /// earlier in this merge (the first copy is recorded, and `false` returned).
    fn link_earlier_copy(&mut self, item: &Item, st: &Stat) -> bool {
        let key = (st.st_dev, st.st_ino);
        match self.copies.get(&key) {
            Some(first) => {
                link_copy(self.dst_root.as_fd(), first, item.dst.as_fd(), &item.name).is_ok()
            }
            None => {
                self.copies.insert(key, item.comps_with_name());
                false
            }
        }
    }

    fn copy_file(&mut self, item: &Item, st: &Stat) -> Result<(), ApplyError> {
        let (src, dst, name, rel) = (item.src.as_fd(), item.dst.as_fd(), &item.name, &item.rel);
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
            OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::from_raw_mode(0o600),
        )
        .map_err(target_err(rel, "create"))?;
        if self.mode == MergeMode::Squash {
            replace_user_xattrs(sfd.as_fd(), dfd.as_fd())
                .map_err(target_err(rel, "copy the xattrs of"))?;
        }
        let mut out = File::from(dfd);
        let copied = copy(File::from(sfd), &mut out, &mut self.buf, rel)?;
        let mtime = (st.mtime(), st.st_mtime_nsec as u32);
        fsutil::set_fd_meta(
            out.as_fd(),
            st.st_uid,
            st.st_gid,
            fsutil::perm_bits(st),
            Some(mtime),
        )
        .map_err(target_err(rel, "set metadata of"))?;
        self.stats.files += 1;
        self.stats.bytes += copied;
        Ok(())
    }

    fn symlink(&mut self, item: &Item, st: &Stat) -> Result<(), ApplyError> {
        let (src, dst, name, rel) = (item.src.as_fd(), item.dst.as_fd(), &item.name, &item.rel);
        let link = rfs::readlinkat(src, name.as_c_str(), Vec::new())
            .map_err(layer_err(rel, "readlink"))?;
        fsutil::remove_tree_at(dst, name).map_err(target_err(rel, "replace"))?;
        rfs::symlinkat(link.as_c_str(), dst, name.as_c_str())
            .map_err(target_err(rel, "create symlink"))?;
        let mtime = (st.mtime(), st.st_mtime_nsec as u32);
        fsutil::set_link_meta(dst, name, st.st_uid, st.st_gid, mtime)
            .map_err(target_err(rel, "set owner and mtime of"))?;
        self.stats.symlinks += 1;
        Ok(())
    }

    /// Sets the deferred mode and mtime of every directory: creating entries in a
    /// directory changes its mtime, and a read-only mode could block them.
    fn finish_dirs(&mut self) -> Result<(), ApplyError> {
        for d in std::mem::take(&mut self.deferred) {
            let rel = d.rel;
            let dir = open_target_dirs(self.dst_root.as_fd(), &d.comps)
                .map_err(target_err(&rel, "open"))?;
            rfs::fchmod(dir.as_fd(), Mode::from_raw_mode(d.mode))
                .map_err(target_err(&rel, "chmod"))?;
            rfs::futimens(dir.as_fd(), &fsutil::timestamps(d.mtime.0, d.mtime.1))
                .map_err(target_err(&rel, "set mtime of"))?;
        }
        Ok(())
    }
}

/// Makes `name` in `dst` a directory, replacing (never following) a non-directory.
/// Returns whether something that was not a directory was there.
fn ensure_dir(dst: BorrowedFd<'_>, name: &CString, rel: &[u8]) -> Result<bool, ApplyError> {
    let existing = fsutil::lstat_at(dst, name).map_err(target_err(rel, "stat"))?;
    match &existing {
        Some(t) if fsutil::file_type(t) == FileType::Directory => return Ok(false),
        Some(_) => rfs::unlinkat(dst, name.as_c_str(), AtFlags::empty())
            .map_err(target_err(rel, "replace"))?,
        None => {}
    }
    rfs::mkdirat(dst, name.as_c_str(), Mode::from_raw_mode(0o700))
        .map_err(target_err(rel, "create directory"))?;
    Ok(existing.is_some())
}

/// Creates a whiteout (0/0 character device) `name` in `dst` with the mode, owner and
/// mtime of the layer's whiteout `st`.
fn make_whiteout(dst: BorrowedFd<'_>, name: &CString, st: &Stat) -> Result<(), Errno> {
    let mode = Mode::from_raw_mode(fsutil::perm_bits(st));
    rfs::mknodat(dst, name.as_c_str(), FileType::CharacterDevice, mode, 0)?;
    // mknod's mode went through the umask.
    rfs::chmodat(dst, name.as_c_str(), mode, AtFlags::empty())?;
    let mtime = (st.mtime(), st.st_mtime_nsec as u32);
    fsutil::set_link_meta(dst, name, st.st_uid, st.st_gid, mtime)
}

/// Hardlinks the layer's regular file `name` in `src` to `name` in `dst`. `Ok(false)`
/// when the kernel refuses a link there (another filesystem, too many links, a
/// filesystem without hardlinks): the caller copies instead.
fn link_from_layer(
    src: BorrowedFd<'_>,
    dst: BorrowedFd<'_>,
    name: &CString,
    rel: &[u8],
) -> Result<bool, ApplyError> {
    match rfs::linkat(src, name.as_c_str(), dst, name.as_c_str(), AtFlags::empty()) {
        Ok(()) => Ok(true),
        Err(Errno::XDEV | Errno::MLINK | Errno::PERM) => Ok(false),
        Err(e) => Err(target_err(rel, "hardlink from the layer")(e)),
    }
}

/// Whether a squash carries the xattr `name`: `user.*`, but not overlayfs's own
/// `user.overlay.*` (the opaque marker is decided by the merge; `redirect`, `origin`,
/// `metacopy` are not interpreted, see docs/layer-format.md).
fn carried_xattr(name: &[u8]) -> bool {
    name.starts_with(b"user.") && !name.starts_with(b"user.overlay.")
}

/// Names of the xattrs of `fd`. A filesystem without xattrs has none.
fn xattr_names(fd: BorrowedFd<'_>) -> Result<Vec<CString>, Errno> {
    let size = match rfs::flistxattr(fd, &mut []) {
        Ok(n) => n,
        Err(Errno::NOTSUP) => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let mut list = vec![0u8; size];
    let n = rfs::flistxattr(fd, &mut list)?;
    Ok(list
        .get(..n)
        .unwrap_or_default()
        .split(|b| *b == 0)
        .filter(|name| !name.is_empty())
        .filter_map(|name| CString::new(name).ok())
        .collect())
}

/// Gives `dst` exactly the carried xattrs of `src` (see [`carried_xattr`]): a merged
/// directory takes the metadata of the upper one.
fn replace_user_xattrs(src: BorrowedFd<'_>, dst: BorrowedFd<'_>) -> Result<(), Errno> {
    for name in xattr_names(dst)? {
        if carried_xattr(name.as_bytes()) {
            rfs::fremovexattr(dst, name.as_c_str())?;
        }
    }
    for name in xattr_names(src)? {
        if !carried_xattr(name.as_bytes()) {
            continue;
        }
        let size = rfs::fgetxattr(src, name.as_c_str(), &mut [])?;
        let mut value = vec![0u8; size];
        let n = rfs::fgetxattr(src, name.as_c_str(), &mut value)?;
        let value = value.get(..n).unwrap_or_default();
        rfs::fsetxattr(dst, name.as_c_str(), value, rfs::XattrFlags::empty())?;
    }
    Ok(())
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
