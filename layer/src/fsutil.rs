//! Small dirfd-relative filesystem helpers shared by seal, unpack and apply.
//!
//! Every helper works relative to an open directory file descriptor and never follows
//! a symlink: directories are opened with `O_NOFOLLOW | O_DIRECTORY`, metadata is read
//! with `AT_SYMLINK_NOFOLLOW`.

use std::ffi::{CStr, CString};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::Path;

use rustix::fs::{
    self, AtFlags, Dir, FileType, Gid, Mode, OFlags, Stat, Timespec, Timestamps, Uid,
};
use rustix::io::Errno;

/// The xattr overlayfs reads (with `userxattr`) to mark an opaque directory.
pub(crate) const OPAQUE_XATTR_USER: &str = "user.overlay.opaque";
/// The xattr overlayfs reads (without `userxattr`) to mark an opaque directory.
pub(crate) const OPAQUE_XATTR_TRUSTED: &str = "trusted.overlay.opaque";

/// Opens the directory at `path` (the caller's own path: symlinks in it are followed).
pub(crate) fn open_dir_path(path: &Path) -> Result<OwnedFd, Errno> {
    fs::open(
        path,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )
}

/// Opens the directory `name` inside `dirfd`, refusing to follow a symlink.
/// A symlink gives `ELOOP`, a non-directory `ENOTDIR`.
pub(crate) fn open_dir_nofollow(dirfd: BorrowedFd<'_>, name: &CStr) -> Result<OwnedFd, Errno> {
    fs::openat(
        dirfd,
        name,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )
}

/// Opens a second descriptor of the directory `dirfd` itself.
pub(crate) fn reopen_dir(dirfd: BorrowedFd<'_>) -> Result<OwnedFd, Errno> {
    fs::openat(
        dirfd,
        c".",
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )
}

/// `lstat` of `name` in `dirfd`; `None` when it does not exist.
pub(crate) fn lstat_at(dirfd: BorrowedFd<'_>, name: &CStr) -> Result<Option<Stat>, Errno> {
    match fs::statat(dirfd, name, AtFlags::SYMLINK_NOFOLLOW) {
        Ok(st) => Ok(Some(st)),
        Err(Errno::NOENT) => Ok(None),
        Err(e) => Err(e),
    }
}

/// The file type of a stat result.
pub(crate) fn file_type(st: &Stat) -> FileType {
    FileType::from_raw_mode(st.st_mode)
}

/// Permission bits (including setuid/setgid/sticky) of a stat result.
pub(crate) fn perm_bits(st: &Stat) -> u32 {
    st.st_mode & 0o7777
}

/// Whether `st` is an overlay whiteout: a character device with device number 0/0.
pub(crate) fn is_whiteout(st: &Stat) -> bool {
    file_type(st) == FileType::CharacterDevice && st.st_rdev == 0
}

/// Whether the open directory `fd` carries `user.overlay.opaque=y` or
/// `trusted.overlay.opaque=y`. Unreadable xattrs count as "not opaque".
pub(crate) fn is_opaque(fd: BorrowedFd<'_>) -> bool {
    [OPAQUE_XATTR_USER, OPAQUE_XATTR_TRUSTED]
        .iter()
        .any(|name| {
            let mut buf = [0u8; 8];
            match fs::fgetxattr(fd, *name, &mut buf) {
                Ok(n) => buf.get(..n) == Some(b"y".as_slice()),
                Err(_) => false,
            }
        })
}

/// Marks the open directory `fd` opaque with `user.overlay.opaque=y`.
pub(crate) fn set_opaque(fd: BorrowedFd<'_>) -> Result<(), Errno> {
    fs::fsetxattr(fd, OPAQUE_XATTR_USER, b"y", fs::XattrFlags::empty())
}

/// Owner ids for `chown`. `u32::MAX` is `-1` to the kernel ("leave unchanged"), so it
/// maps to `None`.
pub(crate) fn owner(uid: u32, gid: u32) -> (Option<Uid>, Option<Gid>) {
    let u = if uid == u32::MAX {
        None
    } else {
        // SAFETY: `Uid::from_raw` is unsafe only because -1 (u32::MAX) has a special
        // meaning to chown; that value is excluded above.
        Some(unsafe { Uid::from_raw(uid) })
    };
    let g = if gid == u32::MAX {
        None
    } else {
        // SAFETY: as above, -1 (u32::MAX) is excluded.
        Some(unsafe { Gid::from_raw(gid) })
    };
    (u, g)
}

/// Timestamps with access and modification time both `secs.nsecs`.
pub(crate) fn timestamps(secs: i64, nsecs: u32) -> Timestamps {
    let nsecs = if nsecs < 1_000_000_000 { nsecs } else { 0 };
    let ts = Timespec {
        tv_sec: secs,
        tv_nsec: nsecs.into(),
    };
    Timestamps {
        last_access: ts,
        last_modification: ts,
    }
}

/// Sets owner, mode and mtime of an open file or directory (owner first: `chown`
/// clears setuid bits, so the mode is set after it).
pub(crate) fn set_fd_meta(
    fd: BorrowedFd<'_>,
    uid: u32,
    gid: u32,
    mode: u32,
    mtime: Option<(i64, u32)>,
) -> Result<(), Errno> {
    let (u, g) = owner(uid, gid);
    fs::fchown(fd, u, g)?;
    fs::fchmod(fd, Mode::from_raw_mode(mode & 0o7777))?;
    if let Some((secs, nsecs)) = mtime {
        fs::futimens(fd, &timestamps(secs, nsecs))?;
    }
    Ok(())
}

/// Sets owner and mtime of `name` in `dirfd` without following it (for symlinks and
/// device nodes).
pub(crate) fn set_link_meta(
    dirfd: BorrowedFd<'_>,
    name: &CStr,
    uid: u32,
    gid: u32,
    mtime: (i64, u32),
) -> Result<(), Errno> {
    let (u, g) = owner(uid, gid);
    fs::chownat(dirfd, name, u, g, AtFlags::SYMLINK_NOFOLLOW)?;
    fs::utimensat(
        dirfd,
        name,
        &timestamps(mtime.0, mtime.1),
        AtFlags::SYMLINK_NOFOLLOW,
    )
}

/// Names in the directory `fd` (without `.` and `..`), sorted bytewise.
pub(crate) fn sorted_names(fd: BorrowedFd<'_>) -> Result<Vec<CString>, Errno> {
    let mut names = Vec::new();
    let dir = Dir::read_from(fd)?;
    for entry in dir {
        let entry = entry?;
        let name = entry.file_name();
        if name == c"." || name == c".." {
            continue;
        }
        names.push(name.to_owned());
    }
    names.sort_unstable_by(|a, b| a.as_bytes().cmp(b.as_bytes()));
    Ok(names)
}

/// Whether the directory `fd` has no entries.
pub(crate) fn dir_is_empty(fd: BorrowedFd<'_>) -> Result<bool, Errno> {
    let dir = Dir::read_from(fd)?;
    for entry in dir {
        let entry = entry?;
        let name = entry.file_name();
        if name != c"." && name != c".." {
            return Ok(false);
        }
    }
    Ok(true)
}

/// Removes `name` from `dirfd`: a file, symlink or device is unlinked, a directory is
/// removed with everything under it. Symlinks are never followed. Returns whether
/// something was there.
pub(crate) fn remove_tree_at(dirfd: BorrowedFd<'_>, name: &CStr) -> Result<bool, Errno> {
    match fs::unlinkat(dirfd, name, AtFlags::empty()) {
        Ok(()) => return Ok(true),
        Err(Errno::NOENT) => return Ok(false),
        Err(Errno::ISDIR) => {}
        Err(e) => return Err(e),
    }
    let fd = open_dir_nofollow(dirfd, name)?;
    remove_children(fd.as_fd())?;
    drop(fd);
    fs::unlinkat(dirfd, name, AtFlags::REMOVEDIR)?;
    Ok(true)
}

/// Removes everything inside the directory `fd`, keeping `fd` itself. Iterative (no
/// recursion), never follows symlinks.
pub(crate) fn remove_children(fd: BorrowedFd<'_>) -> Result<(), Errno> {
    // Each stack element is an open directory and its name in the element below it.
    let mut stack: Vec<(OwnedFd, CString)> = Vec::new();
    loop {
        let current: BorrowedFd<'_> = match stack.last() {
            Some((dir, _)) => dir.as_fd(),
            None => fd,
        };
        let mut descend: Option<(OwnedFd, CString)> = None;
        for entry in Dir::read_from(current)? {
            let entry = entry?;
            let name = entry.file_name();
            if name == c"." || name == c".." {
                continue;
            }
            match fs::unlinkat(current, name, AtFlags::empty()) {
                Ok(()) | Err(Errno::NOENT) => {}
                Err(Errno::ISDIR) => {
                    descend = Some((open_dir_nofollow(current, name)?, name.to_owned()));
                    break;
                }
                Err(e) => return Err(e),
            }
        }
        match descend {
            Some(next) => stack.push(next),
            None => match stack.pop() {
                // `current` is now empty: remove it from its parent.
                Some((dir, name)) => {
                    drop(dir);
                    let parent = match stack.last() {
                        Some((p, _)) => p.as_fd(),
                        None => fd,
                    };
                    fs::unlinkat(parent, &name, AtFlags::REMOVEDIR)?;
                }
                None => return Ok(()),
            },
        }
    }
}
