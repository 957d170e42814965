//! The hypervisor process: spawned in its own process group, killed with its group
//! when dropped unreaped (so a caller that unwinds leaves no orphan), and bound to
//! the spawning thread with `PR_SET_PDEATHSIG` (so a host that is SIGKILLed leaves
//! none either). Also the per-VM runtime directory and its lock.

use std::ffi::OsString;
use std::fs::File;
use std::io::{self, Write};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus};
use std::time::{Duration, Instant};

use nix::fcntl::{Flock, FlockArg};
use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;

use crate::{layout, VmmError};

/// A running hypervisor. Dropping it unreaped kills its process group and reaps it.
pub(crate) struct Proc {
    child: Child,
    pid: i32,
    status: Option<ExitStatus>,
    pid_file: PathBuf,
}

/// Renders a command line for error messages and `hypervisor.cmd`.
pub(crate) fn render_args(args: &[OsString]) -> String {
    args.iter()
        .map(|a| {
            let s = a.to_string_lossy();
            if s.is_empty() || s.contains([' ', '\'', '"']) {
                format!("'{}'", s.replace('\'', "'\\''"))
            } else {
                s.into_owned()
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

impl Proc {
    /// Spawns `binary args` in a new process group with stdin on /dev/null (unless
    /// `configure` pipes it: an attached console), no core dumps, and SIGKILL on the death of the calling thread. Writes the pid file and
    /// the command file into `runtime_dir`.
    pub(crate) fn spawn(
        binary: &Path,
        args: &[OsString],
        runtime_dir: &Path,
        configure: impl FnOnce(&mut Command),
    ) -> Result<Proc, VmmError> {
        let mut cmd = Command::new(binary);
        cmd.args(args).stdin(std::process::Stdio::null());
        configure(&mut cmd);
        cmd.process_group(0);
        // SAFETY: the closure runs in the forked child before exec and only calls
        // async-signal-safe functions (prctl, getppid, setrlimit, raise) on
        // stack data; it allocates nothing and touches no lock.
        unsafe {
            let parent = libc::getpid();
            cmd.pre_exec(move || {
                if libc::prctl(
                    libc::PR_SET_PDEATHSIG,
                    libc::SIGKILL as libc::c_ulong,
                    0,
                    0,
                    0,
                ) != 0
                {
                    return Err(io::Error::last_os_error());
                }
                // The parent may have died between fork and prctl.
                if libc::getppid() != parent {
                    libc::raise(libc::SIGKILL);
                }
                let no_core = libc::rlimit {
                    rlim_cur: 0,
                    rlim_max: 0,
                };
                libc::setrlimit(libc::RLIMIT_CORE, &no_core);
                Ok(())
            });
        }
        let command_file = runtime_dir.join(layout::COMMAND);
        let mut listing = binary.display().to_string();
        for a in args {
            listing.push('\n');
            listing.push_str(&a.to_string_lossy());
        }
        listing.push('\n');
        std::fs::write(&command_file, listing)
            .map_err(|e| VmmError::io("writing", &command_file, e))?;
        let child = cmd.spawn().map_err(|source| VmmError::Spawn {
            binary: binary.to_path_buf(),
            args: render_args(args),
            source,
        })?;
        let pid = child.id() as i32;
        let pid_file = runtime_dir.join(layout::PID_FILE);
        let _ = std::fs::write(&pid_file, format!("{pid}\n"));
        tracing::debug!(pid, binary = %binary.display(), "hypervisor started");
        Ok(Proc {
            child,
            pid,
            status: None,
            pid_file,
        })
    }

    pub(crate) fn pid(&self) -> u32 {
        self.pid as u32
    }

    pub(crate) fn take_stdin(&mut self) -> Option<std::process::ChildStdin> {
        self.child.stdin.take()
    }

    pub(crate) fn take_stdout(&mut self) -> Option<std::process::ChildStdout> {
        self.child.stdout.take()
    }

    pub(crate) fn take_stderr(&mut self) -> Option<std::process::ChildStderr> {
        self.child.stderr.take()
    }

    /// Reaps the process if it has exited.
    pub(crate) fn try_wait(&mut self) -> io::Result<Option<ExitStatus>> {
        if let Some(s) = self.status {
            return Ok(Some(s));
        }
        let s = self.child.try_wait()?;
        if let Some(s) = s {
            self.reaped(s);
        }
        Ok(s)
    }

    /// Waits up to `limit` for the process to exit by itself.
    pub(crate) fn wait_for(&mut self, limit: Duration) -> io::Result<Option<ExitStatus>> {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(s) = self.try_wait()? {
                return Ok(Some(s));
            }
            let now = Instant::now();
            if now >= deadline {
                return Ok(None);
            }
            std::thread::sleep((deadline - now).min(Duration::from_millis(10)));
        }
    }

    /// SIGKILLs the whole process group (while the leader is unreaped, so the group id
    /// cannot have been reused) and reaps the leader.
    pub(crate) fn kill(&mut self) -> io::Result<ExitStatus> {
        if let Some(s) = self.status {
            return Ok(s);
        }
        match killpg(Pid::from_raw(self.pid), Signal::SIGKILL) {
            Ok(()) | Err(nix::errno::Errno::ESRCH) => {}
            Err(e) => {
                tracing::warn!(pid = self.pid, "killpg failed: {e}");
                let _ = self.child.kill();
            }
        }
        let s = self.child.wait()?;
        self.reaped(s);
        Ok(s)
    }

    fn reaped(&mut self, s: ExitStatus) {
        self.status = Some(s);
        let _ = std::fs::remove_file(&self.pid_file);
        tracing::debug!(pid = self.pid, status = %s, "hypervisor reaped");
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if self.status.is_none() {
            if let Err(e) = self.kill() {
                tracing::warn!(pid = self.pid, "could not reap the hypervisor: {e}");
            }
        }
    }
}

/// `(code, signal)` of an exit status.
pub(crate) fn code_and_signal(s: ExitStatus) -> (Option<i32>, Option<i32>) {
    (s.code(), s.signal())
}

/// The runtime directory, created and locked for the duration of one VM.
pub(crate) struct RuntimeDir {
    pub(crate) path: PathBuf,
    _lock: Flock<File>,
}

impl RuntimeDir {
    pub(crate) fn prepare(path: &Path) -> Result<RuntimeDir, VmmError> {
        std::fs::create_dir_all(path)
            .map_err(|e| VmmError::io("creating the runtime directory", path, e))?;
        let lock_path = path.join(layout::LOCK);
        let f = File::create(&lock_path).map_err(|e| VmmError::io("creating", &lock_path, e))?;
        let lock = Flock::lock(f, FlockArg::LockExclusiveNonblock).map_err(|(_, e)| {
            if e == nix::errno::Errno::EWOULDBLOCK {
                VmmError::RuntimeDirBusy {
                    path: path.to_path_buf(),
                }
            } else {
                VmmError::io("locking", &lock_path, e.into())
            }
        })?;
        // Leftovers from an earlier VM in the same directory would confuse the reader.
        for name in [
            layout::CONSOLE_LOG,
            layout::HYPERVISOR_STDERR,
            layout::CH_LOG,
            layout::API_SOCKET,
            layout::PID_FILE,
            layout::VM_CONFIG,
            crate::cloud_hypervisor::API_SOCKET_LOCK,
            crate::cloud_hypervisor::SERIAL_FIFO,
        ] {
            let p = path.join(name);
            match std::fs::remove_file(&p) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(VmmError::io("removing the stale", &p, e)),
            }
        }
        Ok(RuntimeDir {
            path: path.to_path_buf(),
            _lock: lock,
        })
    }

    pub(crate) fn file(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }

    /// Creates (empty) a file in the directory, opened for appending so that other
    /// writers of the same file (the hypervisor's stdout and stderr, host notes) never
    /// overwrite each other.
    pub(crate) fn create(&self, name: &str) -> Result<File, VmmError> {
        let p = self.file(name);
        std::fs::OpenOptions::new()
            .create(true)
            .truncate(true)
            .write(true)
            .open(&p)
            .and_then(|f| {
                drop(f);
                std::fs::OpenOptions::new().append(true).open(&p)
            })
            .map_err(|e| VmmError::io("creating", &p, e))
    }
}

/// The last `max` bytes of a file, lossily decoded and trimmed (only those bytes are
/// read: the file may be large).
pub(crate) fn file_tail(path: &Path, max: usize) -> String {
    use std::io::{Read, Seek, SeekFrom};
    let Ok(mut f) = File::open(path) else {
        return String::new();
    };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let mut bytes = Vec::new();
    if f.seek(SeekFrom::Start(len.saturating_sub(max as u64)))
        .is_err()
        || f.take(max as u64).read_to_end(&mut bytes).is_err()
    {
        return String::new();
    }
    String::from_utf8_lossy(&bytes).trim().to_string()
}

/// Appends a line to a log, ignoring errors (used for host-side notes in the
/// hypervisor log).
pub(crate) fn note(path: &Path, line: &str) {
    if let Ok(mut f) = std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .open(path)
    {
        let _ = writeln!(f, "udos-vmm: {line}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn alive(pid: u32) -> bool {
        // A zombie has no cmdline; a live process has /proc/<pid>/stat in state != Z.
        match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
            Ok(s) => !s
                .rsplit(')')
                .next()
                .unwrap_or("")
                .trim_start()
                .starts_with('Z'),
            Err(_) => false,
        }
    }

    #[test]
    fn drop_kills_the_whole_group() {
        let dir = tempfile::tempdir().unwrap();
        let args: Vec<OsString> = vec!["-c".into(), "sleep 300 & echo $! > child; wait".into()];
        let p = Proc::spawn(Path::new("/bin/sh"), &args, dir.path(), |c| {
            c.current_dir(dir.path());
        })
        .unwrap();
        let pid = p.pid();
        let child_file = dir.path().join("child");
        let deadline = Instant::now() + Duration::from_secs(5);
        while !child_file.exists() || std::fs::read_to_string(&child_file).unwrap().is_empty() {
            assert!(Instant::now() < deadline);
            std::thread::sleep(Duration::from_millis(10));
        }
        let grandchild: u32 = std::fs::read_to_string(&child_file)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        assert!(dir.path().join(layout::PID_FILE).exists());
        assert!(alive(pid) && alive(grandchild));
        drop(p);
        assert!(!alive(pid));
        // The grandchild is reparented and reaped by init; give it a moment.
        let deadline = Instant::now() + Duration::from_secs(5);
        while alive(grandchild) {
            assert!(
                Instant::now() < deadline,
                "grandchild {grandchild} survived"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(!dir.path().join(layout::PID_FILE).exists());
    }

    #[test]
    fn runtime_dir_is_exclusive() {
        let dir = tempfile::tempdir().unwrap();
        let rt = dir.path().join("vm");
        let a = RuntimeDir::prepare(&rt).unwrap();
        assert!(matches!(
            RuntimeDir::prepare(&rt),
            Err(VmmError::RuntimeDirBusy { .. })
        ));
        drop(a);
        RuntimeDir::prepare(&rt).unwrap();
    }

    #[test]
    fn render_quotes() {
        let a: Vec<OsString> = vec!["-append".into(), "console=ttyS0 quiet".into()];
        assert_eq!(render_args(&a), "-append 'console=ttyS0 quiet'");
    }
}
