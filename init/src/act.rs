//! Starting act (or the manager-mode program) inside the step root. Its log is read by
//! `actlog`.

use std::ffi::CString;
use std::os::fd::OwnedFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};

use nix::unistd::Pid;

use crate::error::Error;
use crate::root::StepRoot;

/// act's PATH: udos's own tools first, then the usual ones.
pub const PATH: &str = "/run/udos/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
/// act's HOME: on the `/run` tmpfs, so its cache never lands in the step's layer.
pub const HOME: &str = "/run/udos/home";

/// act's whole environment.
const ENV: &[(&str, &str)] = &[
    ("HOME", HOME),
    ("PATH", PATH),
    ("TERM", "dumb"),
    ("CI", "true"),
    // As on GitHub's runners; glibc has C.UTF-8 built in, so every base has it.
    ("LANG", "C.UTF-8"),
    // act would otherwise ask api.nektosact.com for notices from every step VM with a
    // network: a request off the host nobody asked for, and a wait.
    ("ACT_DISABLE_VERSION_CHECK", "1"),
];

/// A started child: its pid (also its process group and session) and its output pipes.
#[derive(Debug)]
pub struct Running {
    pub pid: Pid,
    pub stdout: Option<OwnedFd>,
    pub stderr: Option<OwnedFd>,
}

/// Where the child's stdio goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stdio3 {
    /// stdin /dev/null, stdout and stderr piped to PID 1 (act).
    Piped,
    /// Inherit the console (manager-mode shell).
    Console,
}

/// Starts `program` inside the step root, in its own session (so its process group can
/// be signalled as a whole), with exactly the environment act needs.
pub fn spawn(
    program: &Path,
    args: &[String],
    root: &StepRoot,
    stdio: Stdio3,
) -> Result<Running, Error> {
    let console = stdio == Stdio3::Console;
    if !console && !root.chroot_child {
        // In a VM: PID 1's root is the step's, and its working directory is `/`.
        return crate::spawn::piped_session(program, args, ENV);
    }
    let mut cmd = Command::new(program);
    cmd.args(args).env_clear().envs(ENV.iter().copied());
    if stdio == Stdio3::Piped {
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
    }
    let new_root = if root.chroot_child {
        let dir = CString::new(root.dir.as_os_str().as_bytes()).map_err(|_| Error::Spawn {
            path: program.to_path_buf(),
            error: std::io::Error::other("root path contains NUL"),
        })?;
        Some(dir)
    } else {
        None
    };
    // SAFETY: the closure runs between fork and exec and only makes async-signal-safe
    // syscalls (chroot, chdir, setsid, ioctl, sigemptyset, sigprocmask) on memory
    // prepared before the fork or on the stack.
    unsafe {
        cmd.pre_exec(move || {
            if let Some(dir) = &new_root {
                if libc::chroot(dir.as_ptr()) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            if libc::chdir(c"/".as_ptr()) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            if libc::setsid() < 0 {
                return Err(std::io::Error::last_os_error());
            }
            if console {
                // The console as controlling terminal, so ^C reaches the shell's jobs;
                // and none of the signals PID 1 blocks (to read them from its
                // signalfd) blocked here: the mask is inherited through exec, and a
                // shell's jobs would never see the ^C the terminal sends.
                libc::ioctl(0, libc::TIOCSCTTY, 1);
                let mut none = std::mem::MaybeUninit::<libc::sigset_t>::uninit();
                libc::sigemptyset(none.as_mut_ptr());
                if libc::sigprocmask(libc::SIG_SETMASK, none.as_ptr(), std::ptr::null_mut()) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn().map_err(|error| match error.kind() {
        std::io::ErrorKind::NotFound => Error::ActNotFound {
            path: program.to_path_buf(),
        },
        _ => Error::Spawn {
            path: program.to_path_buf(),
            error,
        },
    })?;
    // The child is reaped by PID 1's waitpid(-1) loop, never through `child`.
    Ok(Running {
        pid: Pid::from_raw(child.id() as i32),
        stdout: child.stdout.take().map(OwnedFd::from),
        stderr: child.stderr.take().map(OwnedFd::from),
    })
}
