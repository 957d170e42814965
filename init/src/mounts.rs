//! Mounting, and remembering what was mounted so shutdown can undo it in reverse.

use std::fs;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};

use nix::mount::{mount, umount2, MntFlags, MsFlags};

use crate::console::{info, warning};
use crate::error::Error;

/// One mount PID 1 made, by its target as PID 1 currently sees it.
#[derive(Debug)]
struct Entry {
    target: PathBuf,
    /// The step root itself: it cannot be unmounted from inside, only remounted read-only.
    is_root: bool,
}

/// The mounts PID 1 made, in the order it made them.
#[derive(Debug, Default)]
pub struct Mounts {
    stack: Vec<Entry>,
}

/// Creates `dir` (and parents) if missing.
pub fn mkdir_p(dir: &Path, mode: u32) -> Result<(), Error> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(mode)
        .create(dir)
        .map_err(|e| Error::io("mkdir", dir, e))
}

impl Mounts {
    /// `mount(src, target, fstype, flags, data)`, creating `target` if missing.
    pub fn mount(
        &mut self,
        src: &str,
        target: &Path,
        fstype: &str,
        flags: MsFlags,
        data: Option<&str>,
    ) -> Result<(), Error> {
        mkdir_p(target, 0o755)?;
        mount(Some(src), target, Some(fstype), flags, data).map_err(|error| Error::Mount {
            src: src.to_string(),
            target: target.to_path_buf(),
            fstype: fstype.to_string(),
            error,
        })?;
        self.stack.push(Entry {
            target: target.to_path_buf(),
            is_root: false,
        });
        Ok(())
    }

    /// Bind-mounts `src` on `target` read-only (bind, then remount: one call cannot do both).
    pub fn bind_ro(&mut self, src: &Path, target: &Path) -> Result<(), Error> {
        let src_s = src.display().to_string();
        self.mount(
            &src_s,
            target,
            "none",
            MsFlags::MS_BIND | MsFlags::MS_REC,
            None,
        )?;
        let flags = MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY;
        mount(None::<&str>, target, None::<&str>, flags, None::<&str>).map_err(|error| {
            Error::Mount {
                src: src_s,
                target: target.to_path_buf(),
                fstype: "bind,remount,ro".to_string(),
                error,
            }
        })
    }

    /// `MS_MOVE`s the mount at `from` (with everything under it) to `to`.
    pub fn move_mount(&mut self, from: &Path, to: &Path) -> Result<(), Error> {
        mkdir_p(to, 0o755)?;
        mount(Some(from), to, None::<&str>, MsFlags::MS_MOVE, None::<&str>).map_err(|error| {
            Error::MoveMount {
                from: from.to_path_buf(),
                to: to.to_path_buf(),
                error,
            }
        })?;
        self.rebase(from, to);
        Ok(())
    }

    /// Unmounts the mount at `target` now and forgets it.
    pub fn unmount(&mut self, target: &Path) -> Result<(), Error> {
        umount2(target, MntFlags::empty()).map_err(|error| Error::Syscall {
            call: "umount2",
            error,
        })?;
        if let Some(i) = self.stack.iter().rposition(|e| e.target == target) {
            self.stack.remove(i);
        }
        Ok(())
    }

    /// Marks the mount at `target` as the step root (kept, remounted read-only at the end).
    pub fn mark_root(&mut self, target: &Path) {
        for entry in self.stack.iter_mut().filter(|e| e.target == target) {
            entry.is_root = true;
        }
    }

    /// Renames every remembered mount under `from` to live under `to` instead.
    pub fn rebase(&mut self, from: &Path, to: &Path) {
        for entry in &mut self.stack {
            if let Ok(rest) = entry.target.strip_prefix(from) {
                entry.target = if rest.as_os_str().is_empty() {
                    to.to_path_buf()
                } else {
                    to.join(rest)
                };
            }
        }
    }

    /// Unmounts everything in reverse order. The step root is remounted read-only instead,
    /// and only if PID 1 mounted it (never the harness's host root). Failures are logged:
    /// at this point the output is sealed and nothing can be done about them.
    pub fn unmount_all(&mut self) {
        while let Some(entry) = self.stack.pop() {
            if entry.is_root {
                let flags = MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY;
                if let Err(e) = mount(None::<&str>, "/", None::<&str>, flags, None::<&str>) {
                    warning!("remount / read-only: {e}");
                }
                continue;
            }
            if let Err(e) = umount2(&entry.target, MntFlags::empty()) {
                // Busy (a process we could not kill): detach so the filesystem is
                // released once the last user goes.
                match umount2(&entry.target, MntFlags::MNT_DETACH) {
                    Ok(()) => info!("unmount {}: {e}; detached", entry.target.display()),
                    Err(e) => warning!("unmount {}: {e}", entry.target.display()),
                }
            }
        }
    }
}

/// The kernel filesystems every step sees, mounted under `base` (`/` in a VM).
pub fn mount_api_filesystems(mounts: &mut Mounts, base: &Path, harness: bool) -> Result<(), Error> {
    let nosuid_nodev_noexec = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
    let nosuid_nodev = MsFlags::MS_NOSUID | MsFlags::MS_NODEV;
    let at = |p: &str| base.join(p);

    // Already mounted is fine (PID 1 mounts /proc first to read the command line), and
    // mounting sysfs again on itself would fail with EBUSY. The table is read once:
    // each read makes the kernel render it again.
    let table = if harness {
        String::new()
    } else {
        fs::read_to_string("/proc/self/mounts").unwrap_or_default()
    };
    let present = |dir: &str, fstype: &str| is_mount_of(&table, &at(dir), fstype);
    if !present("proc", "proc") {
        mounts.mount("proc", &at("proc"), "proc", nosuid_nodev_noexec, None)?;
    }
    if !present("sys", "sysfs") {
        mounts.mount("sysfs", &at("sys"), "sysfs", nosuid_nodev_noexec, None)?;
    }
    if harness {
        // HARNESS: devtmpfs is the host's single instance; a step must not touch the host's
        // /dev, so it gets a private tmpfs with the basic nodes.
        mounts.mount(
            "tmpfs",
            &at("dev"),
            "tmpfs",
            MsFlags::MS_NOSUID,
            Some("mode=0755"),
        )?;
        make_basic_nodes(&at("dev"));
    } else if !present("dev", "devtmpfs") {
        mounts.mount(
            "devtmpfs",
            &at("dev"),
            "devtmpfs",
            MsFlags::MS_NOSUID,
            Some("mode=0755"),
        )?;
    }
    crate::console::ensure_stdio();
    mounts.mount(
        "devpts",
        &at("dev/pts"),
        "devpts",
        MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
        Some("mode=0620,ptmxmode=0666"),
    )?;
    mounts.mount(
        "tmpfs",
        &at("dev/shm"),
        "tmpfs",
        nosuid_nodev,
        Some("mode=1777"),
    )?;
    for (name, target) in [
        ("fd", "/proc/self/fd"),
        ("stdin", "/proc/self/fd/0"),
        ("stdout", "/proc/self/fd/1"),
        ("stderr", "/proc/self/fd/2"),
    ] {
        // Already there is fine; bash's process substitution needs /dev/fd.
        let _ = std::os::unix::fs::symlink(target, at("dev").join(name));
    }
    mounts.mount(
        "tmpfs",
        &at("run"),
        "tmpfs",
        nosuid_nodev,
        Some("mode=0755"),
    )?;
    if harness {
        // HARNESS: the step root's own /tmp. In a VM the step's /tmp is the overlay's
        // (what a step leaves there carries over, as on a GitHub runner), and PID 1
        // needs none of its own before the switch.
        mounts.mount(
            "tmpfs",
            &at("tmp"),
            "tmpfs",
            nosuid_nodev,
            Some("mode=1777"),
        )?;
    }
    if !harness && !present("sys/fs/cgroup", "cgroup2") {
        // Not fatal: a kernel without cgroup2 can still run a step.
        if let Err(e) = mounts.mount(
            "cgroup2",
            &at("sys/fs/cgroup"),
            "cgroup2",
            nosuid_nodev_noexec,
            None,
        ) {
            warning!("{e}");
        }
    }
    Ok(())
}

/// True when `path` is the root of a mount of type `fstype` in `table` (the text of
/// /proc/self/mounts).
fn is_mount_of(table: &str, path: &Path, fstype: &str) -> bool {
    let target = path.display().to_string();
    table.lines().any(|line| {
        let mut f = line.split_whitespace();
        let (_, t, ty) = (f.next(), f.next(), f.next());
        t == Some(target.as_str()) && ty == Some(fstype)
    })
}

/// HARNESS: the device nodes a step needs, in the private tmpfs /dev.
fn make_basic_nodes(dev: &Path) {
    use nix::sys::stat::{makedev, mknod, Mode, SFlag};
    for (name, major, minor) in [
        ("null", 1, 3),
        ("zero", 1, 5),
        ("full", 1, 7),
        ("random", 1, 8),
        ("urandom", 1, 9),
        ("tty", 5, 0),
    ] {
        let path = dev.join(name);
        if let Err(e) = mknod(
            &path,
            SFlag::S_IFCHR,
            Mode::from_bits_truncate(0o666),
            makedev(major, minor),
        ) {
            warning!("mknod {}: {e}", path.display());
        }
        // mknod is subject to the umask; these must be world-usable.
        let _ = nix::sys::stat::fchmodat(
            None,
            &path,
            Mode::from_bits_truncate(0o666),
            nix::sys::stat::FchmodatFlags::FollowSymlink,
        );
    }
    let _ = std::os::unix::fs::symlink("pts/ptmx", dev.join("ptmx"));
}
