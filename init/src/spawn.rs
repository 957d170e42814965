//! `posix_spawn(3)` in a new session, stdin `/dev/null`, stdout and stderr piped: how
//! PID 1 starts act in a VM. glibc's posix_spawn is a vfork: no copy of PID 1's page
//! tables and no copy-on-write faults after it, which under software emulation saves
//! a few ms on every step (`std::process::Command` would fork, because `setsid` needs
//! a closure between fork and exec).

use std::ffi::{CStr, CString};
use std::mem::MaybeUninit;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use nix::fcntl::OFlag;
use nix::unistd::{pipe2, Pid};

use crate::act::Running;
use crate::error::Error;

/// Spawn attributes, destroyed on drop.
struct Attr(libc::posix_spawnattr_t);

impl Drop for Attr {
    fn drop(&mut self) {
        // SAFETY: initialised by posix_spawnattr_init in `Attr::session`.
        unsafe { libc::posix_spawnattr_destroy(&mut self.0) };
    }
}

impl Attr {
    /// A new session, no signal blocked (PID 1 blocks the ones it reads from its
    /// signalfd, and a mask survives exec), and SIGPIPE back to its default (Rust
    /// ignores it in PID 1, and an ignored signal stays ignored through exec).
    fn session() -> std::io::Result<Attr> {
        // SAFETY: each call gets valid pointers to memory owned here; the attribute
        // object is initialised before any other call uses it, and destroyed by Drop.
        unsafe {
            let mut raw = MaybeUninit::<libc::posix_spawnattr_t>::uninit();
            check(libc::posix_spawnattr_init(raw.as_mut_ptr()))?;
            let mut attr = Attr(raw.assume_init());
            let mut none = MaybeUninit::<libc::sigset_t>::uninit();
            libc::sigemptyset(none.as_mut_ptr());
            check(libc::posix_spawnattr_setsigmask(&mut attr.0, none.as_ptr()))?;
            let mut default = MaybeUninit::<libc::sigset_t>::uninit();
            libc::sigemptyset(default.as_mut_ptr());
            libc::sigaddset(default.as_mut_ptr(), libc::SIGPIPE);
            check(libc::posix_spawnattr_setsigdefault(
                &mut attr.0,
                default.as_ptr(),
            ))?;
            let flags = libc::POSIX_SPAWN_SETSID as libc::c_int
                | libc::POSIX_SPAWN_SETSIGMASK
                | libc::POSIX_SPAWN_SETSIGDEF;
            check(libc::posix_spawnattr_setflags(
                &mut attr.0,
                flags as libc::c_short,
            ))?;
            Ok(attr)
        }
    }
}

/// File actions, destroyed on drop.
struct Actions(libc::posix_spawn_file_actions_t);

impl Drop for Actions {
    fn drop(&mut self) {
        // SAFETY: initialised by posix_spawn_file_actions_init in `Actions::stdio`.
        unsafe { libc::posix_spawn_file_actions_destroy(&mut self.0) };
    }
}

impl Actions {
    /// stdin from `/dev/null`, stdout and stderr onto `out` and `err` (dup2 clears
    /// their close-on-exec flag; every other descriptor of PID 1's is close-on-exec).
    fn stdio(out: &OwnedFd, err: &OwnedFd) -> std::io::Result<Actions> {
        const DEV_NULL: &CStr = c"/dev/null";
        // SAFETY: as in `Attr::session`; the path is a static C string.
        unsafe {
            let mut raw = MaybeUninit::<libc::posix_spawn_file_actions_t>::uninit();
            check(libc::posix_spawn_file_actions_init(raw.as_mut_ptr()))?;
            let mut actions = Actions(raw.assume_init());
            check(libc::posix_spawn_file_actions_addopen(
                &mut actions.0,
                0,
                DEV_NULL.as_ptr(),
                libc::O_RDONLY,
                0,
            ))?;
            check(libc::posix_spawn_file_actions_adddup2(
                &mut actions.0,
                out.as_raw_fd(),
                1,
            ))?;
            check(libc::posix_spawn_file_actions_adddup2(
                &mut actions.0,
                err.as_raw_fd(),
                2,
            ))?;
            Ok(actions)
        }
    }
}

fn check(rc: libc::c_int) -> std::io::Result<()> {
    match rc {
        0 => Ok(()),
        errno => Err(std::io::Error::from_raw_os_error(errno)),
    }
}

fn c_string(bytes: &[u8], program: &Path) -> Result<CString, Error> {
    CString::new(bytes).map_err(|_| Error::Spawn {
        path: program.to_path_buf(),
        error: std::io::Error::other("an argument or variable contains NUL"),
    })
}

/// Starts `program` with `args` and exactly `env`, as described above.
pub fn piped_session(
    program: &Path,
    args: &[String],
    env: &[(&str, &str)],
) -> Result<Running, Error> {
    let spawn_error = |error: std::io::Error| match error.raw_os_error() {
        Some(libc::ENOENT) => Error::ActNotFound {
            path: program.to_path_buf(),
        },
        _ => Error::Spawn {
            path: program.to_path_buf(),
            error,
        },
    };
    let path = c_string(program.as_os_str().as_bytes(), program)?;
    let mut argv = vec![path.clone()];
    for a in args {
        argv.push(c_string(a.as_bytes(), program)?);
    }
    let mut envp = Vec::with_capacity(env.len());
    for (k, v) in env {
        envp.push(c_string(format!("{k}={v}").as_bytes(), program)?);
    }
    let pointers = |strings: &[CString]| -> Vec<*mut libc::c_char> {
        strings
            .iter()
            .map(|s| s.as_ptr().cast_mut())
            .chain(std::iter::once(std::ptr::null_mut()))
            .collect()
    };
    let (argv_p, envp_p) = (pointers(&argv), pointers(&envp));

    let pipe = || {
        pipe2(OFlag::O_CLOEXEC)
            .map_err(|e| spawn_error(std::io::Error::from_raw_os_error(e as i32)))
    };
    let (out_r, out_w) = pipe()?;
    let (err_r, err_w) = pipe()?;
    let attr = Attr::session().map_err(spawn_error)?;
    let actions = Actions::stdio(&out_w, &err_w).map_err(spawn_error)?;
    let mut pid: libc::pid_t = 0;
    // SAFETY: every pointer is valid for the call: the C strings and the NULL-ended
    // pointer arrays live until after it, and attr/actions are initialised.
    let rc = unsafe {
        libc::posix_spawn(
            &mut pid,
            path.as_ptr(),
            &actions.0,
            &attr.0,
            argv_p.as_ptr(),
            envp_p.as_ptr(),
        )
    };
    check(rc).map_err(spawn_error)?;
    // The write ends are the child's now (out_w and err_w close here).
    Ok(Running {
        pid: Pid::from_raw(pid),
        stdout: Some(out_r),
        stderr: Some(err_r),
    })
}

#[cfg(test)]
mod tests {
    use std::io::Read;

    use nix::sys::wait::{waitpid, WaitStatus};

    use super::*;

    fn read_all(fd: OwnedFd) -> String {
        let mut s = String::new();
        std::fs::File::from(fd).read_to_string(&mut s).unwrap();
        s
    }

    #[test]
    fn the_child_has_its_own_session_only_the_given_env_and_piped_output() {
        let script = "echo \"sid=$(cut -d' ' -f6 /proc/$$/stat) pid=$$ X=$X HOME=${HOME-unset}\"; \
                      read line || echo stdin-empty; echo oops >&2; exit 3";
        let running = piped_session(
            Path::new("/bin/sh"),
            &["-c".into(), script.into()],
            &[("X", "1"), ("PATH", "/usr/bin:/bin")],
        )
        .unwrap();
        let out = read_all(running.stdout.unwrap());
        let err = read_all(running.stderr.unwrap());
        let status = waitpid(running.pid, None).unwrap();
        assert_eq!(status, WaitStatus::Exited(running.pid, 3));
        let pid = running.pid.as_raw();
        assert_eq!(
            out,
            format!("sid={pid} pid={pid} X=1 HOME=unset\nstdin-empty\n"),
            "a session of its own (sid = pid), only the variables given, stdin /dev/null"
        );
        assert_eq!(err, "oops\n");
    }

    #[test]
    fn a_missing_program_is_act_not_found() {
        let e = piped_session(Path::new("/nonexistent/act"), &[], &[]).unwrap_err();
        assert!(matches!(e, Error::ActNotFound { .. }), "{e}");
    }
}
