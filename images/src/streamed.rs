//! Long builds (mmdebstrap, the kernel's `make`) run in a process group of their own,
//! their output handed over line by line as it comes (for progress), and stopped with
//! the whole group at a deadline. Short tools go through [`crate::bounded`] instead.

use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Read};
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// How long a stopped build gets between SIGTERM and SIGKILL to clean up.
const STOP_GRACE: Duration = Duration::from_secs(10);

/// Why [`run_streamed`] did not see the program exit by itself.
#[derive(Debug, thiserror::Error)]
pub enum StreamedError {
    /// The program could not be started.
    #[error("cannot start {what}: {source}")]
    Spawn {
        /// The program.
        what: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// It ran past its deadline and was stopped with its whole process group.
    #[error("{what} did not finish within {} s and was stopped", limit.as_secs())]
    TimedOut {
        /// The program.
        what: String,
        /// The limit.
        limit: Duration,
    },
}

/// The last lines of a program's output, for its error message.
#[derive(Debug, Default)]
pub struct Tail {
    lines: VecDeque<String>,
    keep: usize,
}

impl Tail {
    /// Keeps at most `keep` lines.
    pub fn new(keep: usize) -> Tail {
        Tail {
            lines: VecDeque::with_capacity(keep),
            keep,
        }
    }

    /// Adds a line, dropping the oldest past the limit.
    pub fn push(&mut self, line: &str) {
        if self.lines.len() == self.keep {
            self.lines.pop_front();
        }
        self.lines.push_back(line.to_string());
    }

    /// The kept lines, joined.
    pub fn text(&self) -> String {
        self.lines.iter().cloned().collect::<Vec<_>>().join("\n")
    }
}

/// Runs `cmd` with stdin on /dev/null, in a process group of its own, calling `on_line`
/// with each line of its stdout and stderr as it comes. After `limit` the group gets
/// SIGTERM, then SIGKILL. Returns the program's exit status (success or not).
pub fn run_streamed(
    mut cmd: Command,
    limit: Duration,
    on_line: &mut dyn FnMut(&str),
) -> Result<ExitStatus, StreamedError> {
    let what = cmd.get_program().to_string_lossy().into_owned();
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .spawn()
        .map_err(|source| StreamedError::Spawn {
            what: what.clone(),
            source,
        })?;
    let (tx, rx) = mpsc::channel();
    if let Some(out) = child.stdout.take() {
        spawn_reader(out, tx.clone());
    }
    if let Some(err) = child.stderr.take() {
        spawn_reader(err, tx);
    }
    let deadline = Instant::now() + limit;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            stop(&mut child);
            return Err(StreamedError::TimedOut { what, limit });
        }
        match rx.recv_timeout(left.min(Duration::from_secs(1))) {
            Ok(line) => on_line(&line),
            // A process it left behind may hold the pipes open: its own exit counts.
            Err(mpsc::RecvTimeoutError::Timeout) => {
                if matches!(child.try_wait(), Ok(Some(_))) {
                    while let Ok(line) = rx.try_recv() {
                        on_line(&line);
                    }
                    break;
                }
            }
            // Both pipes closed: it is done.
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        }
    }
    let status = child.wait().map_err(|source| StreamedError::Spawn {
        what: what.clone(),
        source,
    })?;
    Ok(status)
}

fn spawn_reader(src: impl Read + Send + 'static, tx: mpsc::Sender<String>) {
    std::thread::spawn(move || {
        for line in BufReader::new(src).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
}

/// Sends `sig` to the child's process group (it leads its own: see `process_group`).
fn signal_group(child: &Child, sig: libc::c_int) {
    if let Ok(pid) = libc::pid_t::try_from(child.id()) {
        // SAFETY: kill(2) with a negative pid signals that process group; no memory is
        // involved.
        unsafe {
            libc::kill(-pid, sig);
        }
    }
}

/// Stops the program: TERM to its process group, a grace period for it to clean up,
/// then KILL to whatever of the group is left (its leader may be gone by then).
fn stop(child: &mut Child) {
    signal_group(child, libc::SIGTERM);
    let until = Instant::now() + STOP_GRACE;
    while Instant::now() < until {
        if let Ok(Some(_)) = child.try_wait() {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    signal_group(child, libc::SIGKILL);
    let _ = child.wait();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_tail_keeps_the_last_lines() {
        let mut t = Tail::new(2);
        for l in ["a", "b", "c"] {
            t.push(l);
        }
        assert_eq!(t.text(), "b\nc");
    }

    #[test]
    fn lines_of_both_streams_arrive_and_the_status_is_returned() {
        let mut cmd = Command::new("sh");
        cmd.args(["-c", "echo out; echo err >&2; exit 3"]);
        let mut seen = Vec::new();
        let status = run_streamed(cmd, Duration::from_secs(30), &mut |l| {
            seen.push(l.to_string())
        })
        .unwrap();
        assert_eq!(status.code(), Some(3));
        seen.sort();
        assert_eq!(seen, ["err", "out"]);
    }
}
