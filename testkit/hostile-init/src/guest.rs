//! The little a PID 1 needs before it can write the output device: the kernel
//! filesystems, the virtio and erofs modules (modules in Debian's cloud kernel), the
//! disks by virtio serial, and the scenario from the lowers.

use std::collections::HashMap;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::thread::sleep;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::kmod::{finit_module, ModuleInitFlags};
use nix::mount::{mount, MsFlags};

/// Why the guest could not get as far as writing its output.
#[derive(Debug, thiserror::Error)]
pub enum GuestError {
    /// A file operation failed.
    #[error("cannot {op} {path}: {source}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// On what.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
    /// A system call failed.
    #[error("{call} {what}: {errno}")]
    Sys {
        /// The call.
        call: &'static str,
        /// On what.
        what: String,
        /// The error.
        errno: Errno,
    },
    /// Something the host should have given is missing.
    #[error("{0}")]
    Missing(String),
}

fn io_err(op: &'static str, path: &Path) -> impl FnOnce(io::Error) -> GuestError {
    let path = path.to_path_buf();
    move |source| GuestError::Io { op, path, source }
}

/// `/proc`, `/sys` and `/dev` (devtmpfs, for the disks' nodes).
pub fn mount_api_filesystems() -> Result<(), GuestError> {
    for (fs_type, target) in [("proc", "/proc"), ("sysfs", "/sys"), ("devtmpfs", "/dev")] {
        mount(
            Some(fs_type),
            target,
            Some(fs_type),
            MsFlags::MS_NOSUID,
            None::<&str>,
        )
        .or_else(|e| if e == Errno::EBUSY { Ok(()) } else { Err(e) })
        .map_err(|errno| GuestError::Sys {
            call: "mount",
            what: target.to_string(),
            errno,
        })?;
    }
    Ok(())
}

/// The `udos.*` keys this init reads.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Cmdline {
    /// `udos.mode`.
    pub mode: Option<String>,
    /// `udos.output`: the output device's serial.
    pub output: Option<String>,
    /// `udos.lowers`: serials of the lowers, bottom first.
    pub lowers: Vec<String>,
}

impl Cmdline {
    /// Parses a kernel command line; other keys are ignored.
    pub fn parse(text: &str) -> Cmdline {
        let mut cfg = Cmdline::default();
        for word in text.split_whitespace() {
            match word.split_once('=') {
                Some(("udos.mode", v)) => cfg.mode = Some(v.to_string()),
                Some(("udos.output", v)) => cfg.output = Some(v.to_string()),
                Some(("udos.lowers", v)) => {
                    cfg.lowers = v
                        .split(',')
                        .filter(|s| !s.is_empty())
                        .map(String::from)
                        .collect()
                }
                _ => {}
            }
        }
        cfg
    }
}

/// Module name as the kernel knows it: file stem without `.ko*`, `-` folded to `_`.
fn module_name(path: &str) -> String {
    let base = path.rsplit('/').next().unwrap_or(path);
    base.split(".ko").next().unwrap_or(base).replace('-', "_")
}

/// Loads the modules the image lists in `/udos/modules` (already in load order,
/// dependencies first), finding their files through `modules.dep`.
pub fn load_modules() -> Result<Vec<String>, GuestError> {
    let release_path = Path::new("/proc/sys/kernel/osrelease");
    let release = fs::read_to_string(release_path).map_err(io_err("read", release_path))?;
    let dir = Path::new("/lib/modules").join(release.trim());
    let list_path = Path::new("/udos/modules");
    let list = match fs::read_to_string(list_path) {
        Ok(list) => list,
        // A kernel with everything built in has no list.
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io_err("read", list_path)(e)),
    };
    let dep_path = dir.join("modules.dep");
    let dep = fs::read_to_string(&dep_path).map_err(io_err("read", &dep_path))?;
    let files: HashMap<String, &str> = dep
        .lines()
        .filter_map(|l| l.split_once(':'))
        .map(|(file, _)| (module_name(file.trim()), file.trim()))
        .collect();
    let mut loaded = Vec::new();
    for name in list.lines().map(str::trim).filter(|l| !l.is_empty()) {
        let name = module_name(name);
        let rel = files
            .get(&name)
            .ok_or_else(|| GuestError::Missing(format!("module {name} is not in modules.dep")))?;
        let path = dir.join(rel);
        let file = fs::File::open(&path).map_err(io_err("open", &path))?;
        // MODULE_INIT_COMPRESSED_FILE: the kernel decompresses `.ko.xz`/`.ko.zst` itself.
        let flags = match path.extension().is_some_and(|e| e != "ko") {
            true => ModuleInitFlags::from_bits_retain(4),
            false => ModuleInitFlags::empty(),
        };
        match finit_module(&file, c"", flags) {
            Ok(()) => loaded.push(name),
            Err(Errno::EEXIST) => {}
            Err(errno) => {
                return Err(GuestError::Sys {
                    call: "finit_module",
                    what: path.display().to_string(),
                    errno,
                })
            }
        }
    }
    Ok(loaded)
}

/// The `/dev/vdX` whose virtio serial is `serial`, waiting up to 10 s for it.
pub fn device_by_serial(serial: &str) -> Result<PathBuf, GuestError> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        for entry in fs::read_dir("/sys/block").into_iter().flatten().flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let found = fs::read_to_string(entry.path().join("serial")).unwrap_or_default();
            let node = Path::new("/dev").join(&name);
            if name.starts_with("vd") && found.trim() == serial && node.exists() {
                return Ok(node);
            }
        }
        if Instant::now() >= deadline {
            return Err(GuestError::Missing(format!("no disk with serial {serial}")));
        }
        sleep(Duration::from_millis(20));
    }
}

/// The scenario file and the step number: every lower is mounted read-only; the
/// topmost `workspace/.udos-hostile` and `.udos/context.json` (the control layer)
/// win, as they would in the step's root.
pub fn read_scenario(lowers: &[String]) -> Result<(String, usize), GuestError> {
    let mut text = None;
    let mut step = None;
    for (i, serial) in lowers.iter().enumerate().rev() {
        let dev = device_by_serial(serial)?;
        let at = PathBuf::from(format!("/mnt/l{i}"));
        fs::create_dir_all(&at).map_err(io_err("create", &at))?;
        mount(
            Some(&dev),
            &at,
            Some("erofs"),
            MsFlags::MS_RDONLY,
            None::<&str>,
        )
        .map_err(|errno| GuestError::Sys {
            call: "mount erofs",
            what: dev.display().to_string(),
            errno,
        })?;
        if text.is_none() {
            text = fs::read_to_string(at.join("workspace/.udos-hostile")).ok();
        }
        if step.is_none() {
            step = fs::read(at.join(".udos/context.json"))
                .ok()
                .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
                .and_then(|v| v["step"].as_u64())
                .and_then(|n| usize::try_from(n).ok());
        }
    }
    let text = text.ok_or_else(|| {
        GuestError::Missing("no workspace/.udos-hostile in any lower".to_string())
    })?;
    let step =
        step.ok_or_else(|| GuestError::Missing("no .udos/context.json in any lower".to_string()))?;
    Ok((text, step))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_keys_it_needs_from_the_command_line() {
        let c = Cmdline::parse(
            "console=ttyS0 udos.mode=step udos.lowers=udos-l0,udos-l1,udos-l2 udos.upper=u udos.output=udos-out",
        );
        assert_eq!(c.mode.as_deref(), Some("step"));
        assert_eq!(c.output.as_deref(), Some("udos-out"));
        assert_eq!(c.lowers, ["udos-l0", "udos-l1", "udos-l2"]);
        assert_eq!(Cmdline::parse("quiet"), Cmdline::default());
    }

    #[test]
    fn module_names_fold_like_the_kernel() {
        assert_eq!(
            module_name("kernel/drivers/block/virtio_blk.ko"),
            "virtio_blk"
        );
        assert_eq!(module_name("virtio-mmio"), "virtio_mmio");
        assert_eq!(module_name("kernel/fs/erofs/erofs.ko.xz"), "erofs");
    }
}
