//! External programs with a time limit. Every program udos runs on the host (mkfs.*,
//! cp, apt, dpkg, depmod, pip, restic, git) goes through [`run_bounded`], so a program
//! that hangs (a stalled mirror, a stuck lock, a password file on a FIFO) fails the
//! call instead of blocking a run forever.
//!
//! The program runs in its own process group. Past its limit the group gets SIGTERM
//! (restic, for one, then removes its repository lock), and SIGKILL after
//! [`TERM_GRACE`]; the call fails naming the program and the limit. When the program
//! exits by itself, whatever it left running in its group is killed too, so no stray
//! child keeps the captured output pipes open (duct's wait reads them to the end).

use std::fmt;
use std::io;
use std::os::unix::process::CommandExt;
use std::process::Output;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::signal::{killpg, Signal};
use nix::sys::wait::{waitid, Id, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;

/// How long a program gets between SIGTERM and SIGKILL: enough for restic to remove
/// its lock, short enough not to matter next to the limit that was just overrun.
pub const TERM_GRACE: Duration = Duration::from_secs(3);

/// Why [`run_bounded`] failed.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("cannot start {what}: {source}")]
    Start {
        what: String,
        #[source]
        source: io::Error,
    },
    #[error("{what} did not finish within {} and was killed", Human(*limit))]
    TimedOut { what: String, limit: Duration },
    /// Waiting failed, or the expression is checked (duct's default) and exited
    /// non-zero.
    #[error("{what} failed: {source}")]
    Failed {
        what: String,
        #[source]
        source: io::Error,
    },
}

impl RunError {
    /// The program could not be started because it is not installed.
    pub fn is_not_found(&self) -> bool {
        matches!(self, RunError::Start { source, .. } if source.kind() == io::ErrorKind::NotFound)
    }
}

/// A duration as people read it in an error: `300 ms`, `3 s`, `10 min`.
pub struct Human(pub Duration);

impl fmt::Display for Human {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let d = self.0;
        let whole_minutes = Duration::from_secs(d.as_secs() / 60 * 60) == d;
        if d >= Duration::from_secs(60) && whole_minutes {
            write!(f, "{} min", d.as_secs() / 60)
        } else if d >= Duration::from_secs(1) {
            write!(f, "{} s", d.as_secs_f64())
        } else {
            write!(f, "{} ms", d.as_millis())
        }
    }
}

/// Runs `expr` (its stdin, stdout and stderr as the expression says) and waits at most
/// `limit`. `what` names the program in errors. A non-zero exit is an error only when
/// the expression is checked (duct's default).
pub fn run_bounded(
    expr: &duct::Expression,
    limit: Duration,
    what: &str,
) -> Result<Output, RunError> {
    let handle = expr
        .before_spawn(|c| {
            c.process_group(0);
            Ok(())
        })
        .start()
        .map_err(|source| RunError::Start {
            what: what.to_string(),
            source,
        })?;
    let groups: Vec<Pid> = handle
        .pids()
        .into_iter()
        .map(|p| Pid::from_raw(p as i32))
        .collect();
    let failed = |source| RunError::Failed {
        what: what.to_string(),
        source,
    };
    match wait_exited(&groups, Instant::now() + limit) {
        Ok(true) => {
            // The leaders are zombies, not reaped: their group ids cannot be reused yet.
            signal_groups(&groups, Signal::SIGKILL);
            handle.wait().cloned().map_err(failed)
        }
        Ok(false) => {
            terminate(&groups);
            let _ = handle.kill();
            Err(RunError::TimedOut {
                what: what.to_string(),
                limit,
            })
        }
        Err(e) => {
            signal_groups(&groups, Signal::SIGKILL);
            let _ = handle.kill();
            Err(failed(e))
        }
    }
}

/// SIGTERM to the groups, then SIGKILL to what is left after [`TERM_GRACE`].
fn terminate(groups: &[Pid]) {
    signal_groups(groups, Signal::SIGTERM);
    let _ = wait_exited(groups, Instant::now() + TERM_GRACE);
    signal_groups(groups, Signal::SIGKILL);
}

fn signal_groups(groups: &[Pid], signal: Signal) {
    for g in groups {
        match killpg(*g, signal) {
            Ok(()) | Err(Errno::ESRCH) => {}
            Err(e) => tracing::warn!(pgid = g.as_raw(), "killpg {signal}: {e}"),
        }
    }
}

/// Waits until every leader has exited (true) or `deadline` passed (false), without
/// reaping them (`WNOWAIT`), so duct still reaps them and their pids stay ours.
fn wait_exited(leaders: &[Pid], deadline: Instant) -> io::Result<bool> {
    // Start with short naps: most calls (a version check, a small cp) take milliseconds.
    let mut nap = Duration::from_millis(1);
    loop {
        let running = still_running(leaders)?;
        if running.is_empty() {
            return Ok(true);
        }
        let now = Instant::now();
        if now >= deadline {
            return Ok(false);
        }
        // Woken the moment a leader exits where the kernel has pidfds (5.3+), so a
        // call that takes 3 ms costs 3 ms, not the next nap; else a nap.
        let left = deadline - now;
        if !wait_any_pidfd(&running, left) {
            std::thread::sleep(nap.min(left));
            nap = (nap * 2).min(Duration::from_millis(20));
        }
    }
}

/// Waits until one of `leaders` (all running) exits or `limit` passes, through their
/// pidfds (readable once the process has exited; nothing is reaped). False when pidfds
/// are not available, so the caller naps instead.
fn wait_any_pidfd(leaders: &[Pid], limit: Duration) -> bool {
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    let mut fds = Vec::with_capacity(leaders.len());
    for pid in leaders {
        // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid.as_raw(), 0) };
        if fd < 0 {
            // ESRCH: reaped already (counts as exited; still_running will say so).
            if Errno::last() == Errno::ESRCH {
                return true;
            }
            return false;
        }
        // SAFETY: a fresh fd that nothing else owns.
        fds.push(unsafe { OwnedFd::from_raw_fd(fd as i32) });
    }
    let mut polls: Vec<libc::pollfd> = fds
        .iter()
        .map(|f| libc::pollfd {
            fd: f.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    let ms = limit.as_millis().clamp(1, i32::MAX as u128) as i32;
    // SAFETY: `polls` is a valid array of `polls.len()` pollfds for the call's duration.
    let n = unsafe { libc::poll(polls.as_mut_ptr(), polls.len() as libc::nfds_t, ms) };
    // EINTR or a timeout: the caller checks again.
    n >= 0 || Errno::last() == Errno::EINTR
}

/// The leaders that have not exited yet.
fn still_running(leaders: &[Pid]) -> io::Result<Vec<Pid>> {
    let mut running = Vec::new();
    for pid in leaders {
        let flags = WaitPidFlag::WEXITED | WaitPidFlag::WNOHANG | WaitPidFlag::WNOWAIT;
        match waitid(Id::Pid(*pid), flags) {
            Ok(WaitStatus::StillAlive) | Err(Errno::EINTR) => running.push(*pid),
            // ECHILD: already reaped, so certainly exited.
            Ok(_) | Err(Errno::ECHILD) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(running)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn alive(pid: i32) -> bool {
        // A zombie counts as gone.
        std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
            !s.rsplit(')')
                .next()
                .unwrap_or("")
                .trim_start()
                .starts_with('Z')
        })
    }

    #[test]
    fn a_program_past_its_limit_is_killed_and_named() {
        let t = Instant::now();
        let err = run_bounded(
            &duct::cmd!("sleep", "30"),
            Duration::from_millis(300),
            "sleep 30",
        )
        .unwrap_err();
        assert!(matches!(err, RunError::TimedOut { .. }), "{err}");
        assert_eq!(
            err.to_string(),
            "sleep 30 did not finish within 300 ms and was killed"
        );
        assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    }

    #[test]
    fn output_and_status_come_back_and_checked_failures_are_errors() {
        let out = run_bounded(
            &duct::cmd!("sh", "-c", "echo out; echo err >&2; exit 3")
                .stdout_capture()
                .stderr_capture()
                .unchecked(),
            Duration::from_secs(10),
            "sh",
        )
        .unwrap();
        assert_eq!(out.status.code(), Some(3));
        assert_eq!(out.stdout, b"out\n");
        assert_eq!(out.stderr, b"err\n");
        let err = run_bounded(&duct::cmd!("false"), Duration::from_secs(10), "false").unwrap_err();
        assert!(matches!(err, RunError::Failed { .. }), "{err}");
        let err = run_bounded(
            &duct::cmd!("/nonexistent/udos-tool"),
            Duration::from_secs(10),
            "udos-tool",
        )
        .unwrap_err();
        assert!(err.is_not_found(), "{err}");
    }

    #[test]
    fn a_program_that_ignores_sigterm_is_killed_after_the_grace() {
        let t = Instant::now();
        let err = run_bounded(
            &duct::cmd!("sh", "-c", "trap '' TERM; sleep 60 & wait; sleep 60"),
            Duration::from_millis(200),
            "stubborn",
        )
        .unwrap_err();
        assert!(matches!(err, RunError::TimedOut { .. }), "{err}");
        let took = t.elapsed();
        assert!(
            took >= TERM_GRACE && took < TERM_GRACE + Duration::from_secs(3),
            "{took:?}"
        );
    }

    #[test]
    fn a_timeout_takes_the_whole_group_down() {
        let dir = tempfile::tempdir().unwrap();
        let pidfile = dir.path().join("child");
        // The grandchild holds the captured stdout: without the group kill, reading
        // the output would wait for it.
        let script = format!("sleep 120 & echo $! > {}; wait", pidfile.display());
        let err = run_bounded(
            &duct::cmd!("sh", "-c", script).stdout_capture(),
            Duration::from_millis(500),
            "sh",
        )
        .unwrap_err();
        assert!(matches!(err, RunError::TimedOut { .. }), "{err}");
        let grandchild: i32 = std::fs::read_to_string(&pidfile)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        while alive(grandchild) {
            assert!(Instant::now() < deadline, "{grandchild} survived");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    #[test]
    fn a_straggler_left_behind_does_not_hold_the_call() {
        // The program exits at once but leaves a child with our stdout pipe open.
        let t = Instant::now();
        let out = run_bounded(
            &duct::cmd!("sh", "-c", "sleep 120 & echo done").stdout_capture(),
            Duration::from_secs(60),
            "sh",
        )
        .unwrap();
        assert_eq!(out.stdout, b"done\n");
        assert!(t.elapsed() < Duration::from_secs(10), "{:?}", t.elapsed());
    }

    #[test]
    fn durations_read_well() {
        assert_eq!(Human(Duration::from_millis(300)).to_string(), "300 ms");
        assert_eq!(Human(Duration::from_secs(3)).to_string(), "3 s");
        assert_eq!(Human(Duration::from_millis(1500)).to_string(), "1.5 s");
        assert_eq!(Human(Duration::from_secs(600)).to_string(), "10 min");
        assert_eq!(Human(Duration::from_secs(90)).to_string(), "90 s");
    }
}
