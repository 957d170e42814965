//! Job mode (`udos.mode=job`, docs/job-mode.md): the host's channel, a virtio-console
//! port found by name, and the step's control files, written into the root for one
//! step and removed after it so they never reach the job's layer.

use std::fs::{self, File, OpenOptions};
use std::os::fd::AsFd;
use std::os::unix::fs::PermissionsExt;
use std::path::{Component, Path, PathBuf};
use std::time::{Duration, Instant};

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use udos_layer::job::{self, ControlFile, FrameError, GuestMessage, JobMessage};

use crate::error::Error;

/// How long PID 1 waits for the host to connect to the channel.
pub const HOST_CONNECT_TIMEOUT: Duration = Duration::from_secs(120);

/// The port named `name` under `sys_ports` (`/sys/class/virtio-ports`), as its node
/// under `dev`, if present right now.
pub fn lookup_port(sys_ports: &Path, dev: &Path, name: &str) -> Option<PathBuf> {
    for entry in fs::read_dir(sys_ports).ok()?.flatten() {
        let Ok(found) = fs::read_to_string(entry.path().join("name")) else {
            continue;
        };
        if found.trim() == name {
            let node = dev.join(entry.file_name());
            return node.exists().then_some(node);
        }
    }
    None
}

/// The channel to the host.
pub struct Channel {
    port: File,
}

impl Channel {
    /// Waits up to `timeout` for the port named `name`, opens it, and waits for the
    /// host to connect (until then the port reports `POLLHUP`, and what the guest
    /// wrote would be dropped).
    pub fn open(name: &str, timeout: Duration) -> Result<Channel, Error> {
        let started = Instant::now();
        let node = loop {
            if let Some(node) = lookup_port(
                Path::new("/sys/class/virtio-ports"),
                Path::new("/dev"),
                name,
            ) {
                break node;
            }
            if started.elapsed() >= timeout {
                return Err(Error::DeviceNotFound {
                    role: "job channel",
                    serial: name.to_string(),
                });
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        let port = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&node)
            .map_err(|e| Error::io("open", &node, e))?;
        let channel = Channel { port };
        channel.wait_for_host(HOST_CONNECT_TIMEOUT)?;
        Ok(channel)
    }

    fn wait_for_host(&self, timeout: Duration) -> Result<(), Error> {
        let started = Instant::now();
        loop {
            let mut fds = [PollFd::new(self.port.as_fd(), PollFlags::POLLIN)];
            let hup = match poll(&mut fds, PollTimeout::from(100u16)) {
                Ok(_) => fds[0]
                    .revents()
                    .is_some_and(|r| r.contains(PollFlags::POLLHUP)),
                Err(nix::errno::Errno::EINTR) => true,
                Err(error) => {
                    return Err(Error::Syscall {
                        call: "poll",
                        error,
                    })
                }
            };
            if !hup {
                return Ok(());
            }
            if started.elapsed() >= timeout {
                return Err(Error::Channel(format!(
                    "the host did not connect within {timeout:?}"
                )));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Sends one message to the host.
    pub fn send(&mut self, message: &GuestMessage) -> Result<(), Error> {
        job::send(&mut self.port, message).map_err(channel_error)
    }

    /// The host's next message; `None` when the host closed the channel.
    pub fn recv(&mut self) -> Result<Option<JobMessage>, Error> {
        job::recv(&mut self.port, job::MAX_FRAME).map_err(channel_error)
    }
}

fn channel_error(e: FrameError) -> Error {
    Error::Channel(e.to_string())
}

/// `path` (absolute, from the host) as a path inside `root`: no `..`, no root-only
/// or empty path. What the host sends is not trusted to stay inside the root.
fn inside(root: &Path, path: &str) -> Result<PathBuf, Error> {
    let rel = Path::new(path);
    let mut out = root.to_path_buf();
    let mut parts = 0;
    for c in rel.components() {
        match c {
            Component::RootDir => {}
            Component::Normal(p) => {
                out.push(p);
                parts += 1;
            }
            _ => {
                return Err(Error::Channel(format!(
                    "control file path {path:?} refused"
                )))
            }
        }
    }
    if !path.starts_with('/') || parts == 0 {
        return Err(Error::Channel(format!(
            "control file path {path:?} refused"
        )));
    }
    Ok(out)
}

/// The top-level entries of the root the control files live under (`/.actrc`,
/// `/.udos`): what [`remove_control_files`] removes.
pub fn top_levels(files: &[ControlFile]) -> Vec<String> {
    let mut tops: Vec<String> = Vec::new();
    for f in files {
        let first = f
            .path()
            .trim_start_matches('/')
            .split('/')
            .next()
            .unwrap_or_default()
            .to_string();
        if !first.is_empty() && first != ".." && first != "." && !tops.contains(&first) {
            tops.push(first);
        }
    }
    tops
}

/// Writes the step's control files into `root`, creating parent directories. A file
/// already there is replaced (a link is never followed).
pub fn write_control_files(root: &Path, files: &[ControlFile]) -> Result<(), Error> {
    for f in files {
        let dest = inside(root, f.path())?;
        if let Some(parent) = dest.parent() {
            fs::create_dir_all(parent).map_err(|e| Error::io("mkdir", parent, e))?;
        }
        match fs::symlink_metadata(&dest) {
            Ok(m) if m.is_dir() => fs::remove_dir_all(&dest),
            Ok(_) => fs::remove_file(&dest),
            Err(_) => Ok(()),
        }
        .map_err(|e| Error::io("remove", &dest, e))?;
        match f {
            ControlFile::File { mode, data, .. } => {
                fs::write(&dest, data).map_err(|e| Error::io("write", &dest, e))?;
                fs::set_permissions(&dest, fs::Permissions::from_mode(mode & 0o7777))
                    .map_err(|e| Error::io("chmod", &dest, e))?;
            }
            ControlFile::Symlink { target, .. } => {
                std::os::unix::fs::symlink(target, &dest)
                    .map_err(|e| Error::io("symlink", &dest, e))?;
            }
        }
    }
    Ok(())
}

/// Removes what [`write_control_files`] wrote (by top-level entry) and `extra` (act's
/// home), so that the next step starts as in its own VM and the job's layer holds
/// only what the steps wrote.
pub fn remove_control_files(root: &Path, files: &[ControlFile], extra: &[&str]) -> Vec<Error> {
    let mut errors = Vec::new();
    let tops = top_levels(files);
    for top in tops.iter().map(String::as_str).chain(extra.iter().copied()) {
        let path = root.join(top.trim_start_matches('/'));
        let result = match fs::symlink_metadata(&path) {
            Ok(m) if m.is_dir() => fs::remove_dir_all(&path),
            Ok(_) => fs::remove_file(&path),
            Err(_) => Ok(()),
        };
        if let Err(e) = result {
            errors.push(Error::io("remove", &path, e));
        }
    }
    errors
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(path: &str, data: &[u8], mode: u32) -> ControlFile {
        ControlFile::File {
            path: path.into(),
            mode,
            data: data.to_vec(),
        }
    }

    #[test]
    fn control_files_are_written_then_removed() {
        let root = tempfile::tempdir().unwrap();
        fs::write(root.path().join("keep"), b"k").unwrap();
        let files = vec![
            file("/.actrc", b"-W /.udos/step.yml\n", 0o644),
            file("/.udos/step.yml", b"on: push\n", 0o644),
            file("/.udos/actions/a/run.sh", b"#!/bin/sh\n", 0o755),
            ControlFile::Symlink {
                path: "/.udos/actions/a/link".into(),
                target: "run.sh".into(),
            },
        ];
        write_control_files(root.path(), &files).unwrap();
        assert_eq!(
            fs::read(root.path().join(".actrc")).unwrap(),
            b"-W /.udos/step.yml\n"
        );
        let mode = fs::metadata(root.path().join(".udos/actions/a/run.sh"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o755);
        assert_eq!(
            fs::read_link(root.path().join(".udos/actions/a/link")).unwrap(),
            Path::new("run.sh")
        );
        // A second step's files replace the first's.
        write_control_files(root.path(), &files[..1]).unwrap();

        fs::create_dir_all(root.path().join("run/udos/home/x")).unwrap();
        let errors = remove_control_files(root.path(), &files, &["/run/udos/home"]);
        assert!(errors.is_empty(), "{errors:?}");
        assert!(!root.path().join(".actrc").exists());
        assert!(!root.path().join(".udos").exists());
        assert!(!root.path().join("run/udos/home").exists());
        assert!(root.path().join("keep").exists());
    }

    #[test]
    fn paths_outside_the_root_are_refused() {
        let root = tempfile::tempdir().unwrap();
        for bad in ["/../escape", "relative", "/", "/a/../../b", ""] {
            let err = write_control_files(root.path(), &[file(bad, b"x", 0o644)]).unwrap_err();
            assert!(err.to_string().contains("refused"), "{bad}: {err}");
        }
        assert_eq!(
            top_levels(&[
                file("/.actrc", b"", 0),
                file("/.udos/a", b"", 0),
                file("/.udos/b", b"", 0)
            ]),
            vec![".actrc".to_string(), ".udos".to_string()]
        );
    }

    #[test]
    fn ports_are_found_by_name() {
        let dir = tempfile::tempdir().unwrap();
        let sys = dir.path().join("sys");
        let dev = dir.path().join("dev");
        for (port, name) in [("vport0p0", "other"), ("vport0p1", "udos.ctl")] {
            fs::create_dir_all(sys.join(port)).unwrap();
            fs::write(sys.join(port).join("name"), format!("{name}\n")).unwrap();
        }
        fs::create_dir_all(&dev).unwrap();
        assert_eq!(lookup_port(&sys, &dev, "udos.ctl"), None, "no node yet");
        fs::write(dev.join("vport0p1"), b"").unwrap();
        assert_eq!(
            lookup_port(&sys, &dev, "udos.ctl"),
            Some(dev.join("vport0p1"))
        );
        assert_eq!(lookup_port(&sys, &dev, "missing"), None);
    }
}
