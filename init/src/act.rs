//! Running act, and turning its `--json` log (logrus JSON, one object per line) back
//! into console lines and per-step results.

use std::collections::{HashMap, HashSet};
use std::ffi::CString;
use std::os::fd::OwnedFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};

use nix::unistd::Pid;
use serde::Deserialize;
use serde_json::Value;
use udos_layer::{ActResult, ActStep};

use crate::error::Error;
use crate::root::StepRoot;

/// act's PATH: udos's own tools first, then the usual ones.
pub const PATH: &str = "/run/udos/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
/// act's HOME: on the `/run` tmpfs, so its cache never lands in the step's layer.
pub const HOME: &str = "/run/udos/home";

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
    let mut cmd = Command::new(program);
    cmd.args(args)
        .env_clear()
        .env("HOME", HOME)
        .env("PATH", PATH)
        .env("TERM", "dumb")
        .env("CI", "true");
    if stdio == Stdio3::Piped {
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
    }
    let console = stdio == Stdio3::Console;
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
    // syscalls (chroot, chdir, setsid) on memory prepared before the fork.
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
                // The console as controlling terminal, so ^C reaches the shell's jobs.
                libc::ioctl(0, libc::TIOCSCTTY, 1);
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

/// The logrus fields udos reads; the rest of each line is ignored.
#[derive(Debug, Default, Deserialize)]
struct Entry {
    #[serde(default)]
    msg: Option<String>,
    #[serde(default)]
    level: Option<String>,
    /// An array of ids (composite actions nest); the first is the workflow step's id.
    #[serde(default, rename = "stepID")]
    step_id: Option<Value>,
    #[serde(default, rename = "stepResult")]
    step_result: Option<String>,
    #[serde(default)]
    command: Option<String>,
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    arg: Option<String>,
    #[serde(default)]
    raw_output: Option<bool>,
}

impl Entry {
    fn step(&self) -> Option<&str> {
        match self.step_id.as_ref()? {
            Value::Array(ids) => ids.first()?.as_str(),
            Value::String(id) => Some(id),
            _ => None,
        }
    }
}

/// What act reported, step by step, in order of first appearance.
#[derive(Debug, Default)]
pub struct ActLog {
    steps: Vec<ActStep>,
    index: HashMap<String, usize>,
    /// Non-output warnings/errors already shown: act repeats some (git lookups) for
    /// every step, and each console byte is slow on an emulated serial port.
    shown: HashSet<String>,
}

impl ActLog {
    /// Takes one line of act's output; returns what to print on the console, if anything.
    pub fn handle_line(&mut self, line: &str) -> Option<String> {
        let line = line.trim_end_matches(['\n', '\r']);
        if !line.starts_with('{') {
            return Some(line.to_string());
        }
        let Ok(entry) = serde_json::from_str::<Entry>(line) else {
            return Some(line.to_string());
        };
        if let Some(id) = entry.step() {
            let step = self.step_mut(id);
            if let Some(result) = &entry.step_result {
                step.result = ActResult::from_act(result).unwrap_or(ActResult::Failure);
            }
            match (entry.command.as_deref(), &entry.name, &entry.arg) {
                (Some("set-output"), Some(name), Some(arg)) => {
                    step.outputs.insert(name.clone(), arg.clone());
                }
                (Some("set-env"), Some(name), Some(arg)) => {
                    step.env.insert(name.clone(), arg.clone());
                }
                (Some("add-path"), _, Some(arg)) => step.path.push(arg.clone()),
                _ => {}
            }
            // act reports a failed `run:` step's status as an error line of its own.
            if entry.level.as_deref() == Some("error") {
                if let Some(code) = entry
                    .msg
                    .as_deref()
                    .and_then(|m| m.trim().strip_prefix("exit status "))
                    .and_then(|n| n.trim().parse::<i32>().ok())
                {
                    step.exit_code = Some(code);
                }
            }
        }
        let msg = entry.msg.as_deref()?.trim_end_matches(['\n', '\r']);
        if entry.raw_output == Some(true) {
            let mut out = String::new();
            for (i, l) in msg.split('\n').enumerate() {
                if i > 0 {
                    out.push('\n');
                }
                out.push_str("  | ");
                out.push_str(l);
            }
            return Some(out);
        }
        if matches!(entry.level.as_deref(), Some("debug" | "trace")) {
            return None;
        }
        if matches!(entry.level.as_deref(), Some("warning" | "error"))
            && !self.shown.insert(msg.to_string())
        {
            return None;
        }
        Some(msg.to_string())
    }

    fn step_mut(&mut self, id: &str) -> &mut ActStep {
        let i = *self.index.entry(id.to_string()).or_insert_with(|| {
            self.steps.push(ActStep {
                id: id.to_string(),
                ..ActStep::default()
            });
            self.steps.len() - 1
        });
        &mut self.steps[i]
    }

    pub fn into_steps(self) -> Vec<ActStep> {
        self.steps
    }
}

/// Splits a byte stream into lines; bytes are decoded lossily (a step may print anything).
#[derive(Debug, Default)]
pub struct Lines {
    buf: Vec<u8>,
}

/// One line of act's output longer than this is cut (and printed in pieces): PID 1 must
/// not grow without bound on a step that prints a gigabyte without a newline.
const MAX_LINE: usize = 1 << 20;

impl Lines {
    /// Appends bytes; returns the complete lines.
    pub fn push(&mut self, bytes: &[u8]) -> Vec<String> {
        self.buf.extend_from_slice(bytes);
        let mut lines = Vec::new();
        while let Some(nl) = self.buf.iter().position(|&b| b == b'\n') {
            let rest = self.buf.split_off(nl + 1);
            lines.push(String::from_utf8_lossy(&self.buf[..nl]).into_owned());
            self.buf = rest;
        }
        if self.buf.len() > MAX_LINE {
            lines.push(String::from_utf8_lossy(&self.buf).into_owned());
            self.buf.clear();
        }
        lines
    }

    /// The unterminated last line, if any.
    pub fn finish(&mut self) -> Option<String> {
        if self.buf.is_empty() {
            return None;
        }
        let line = String::from_utf8_lossy(&self.buf).into_owned();
        self.buf.clear();
        Some(line)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failed_steps_exit_status_is_recorded() {
        let mut log = ActLog::default();
        for line in [
            r#"{"level":"info","msg":"  ❌  Failure - Main exit 3","stepID":["s"],"stepResult":"failure"}"#,
            r#"{"level":"error","msg":"exit status 3","stepID":["s"]}"#,
            r#"{"level":"error","msg":"exit status x","stepID":["t"]}"#,
        ] {
            log.handle_line(line);
        }
        let steps = log.into_steps();
        assert_eq!(steps[0].exit_code, Some(3));
        assert_eq!(steps[0].result, ActResult::Failure);
        assert_eq!(steps[1].exit_code, None);
    }

    // Lines as act 0.2.89 prints them (trimmed of fields udos ignores).
    const LOG: &str = r#"{"level":"info","msg":"⭐ Run Set up job","step":"Set up job","stepid":["--setup-job"]}
{"level":"warning","msg":"unable to get git ref: repository does not exist","stepID":["one"]}
{"level":"info","msg":"hello\n","raw_output":true,"stage":"Main","stepID":["one"]}
{"level":"info","msg":"  ✅  Success - Main echo hello","stepID":["one"],"stepResult":"success"}
{"arg":"bar","command":"set-env","level":"info","msg":"  ⚙  ::set-env:: FOO=bar","name":"FOO","stepID":["one"]}
{"arg":"hi there","command":"set-output","level":"info","msg":"  ⚙  ::set-output:: greeting=hi there","name":"greeting","stepID":["one"]}
{"arg":"/opt/xbin","command":"add-path","level":"info","msg":"  ⚙  ::add-path:: /opt/xbin","stepID":["one"]}
{"level":"warning","msg":"unable to get git ref: repository does not exist","stepID":["two"]}
{"level":"info","msg":"a\nb\n","raw_output":true,"stepID":["two","inner"]}
{"level":"info","msg":"  ❌  Failure - Main exit 3","stepID":["two"],"stepResult":"failure"}
Error: Job 'udos' failed"#;

    #[test]
    fn collects_results_and_commands_per_step() {
        let mut log = ActLog::default();
        let console: Vec<String> = LOG.lines().filter_map(|l| log.handle_line(l)).collect();
        assert_eq!(
            console,
            [
                "⭐ Run Set up job",
                "unable to get git ref: repository does not exist",
                "  | hello",
                "  ✅  Success - Main echo hello",
                "  ⚙  ::set-env:: FOO=bar",
                "  ⚙  ::set-output:: greeting=hi there",
                "  ⚙  ::add-path:: /opt/xbin",
                "  | a\n  | b",
                "  ❌  Failure - Main exit 3",
                "Error: Job 'udos' failed",
            ]
        );
        let steps = log.into_steps();
        assert_eq!(steps.len(), 2);
        assert_eq!(steps[0].id, "one");
        assert_eq!(steps[0].result, ActResult::Success);
        assert_eq!(steps[0].outputs["greeting"], "hi there");
        assert_eq!(steps[0].env["FOO"], "bar");
        assert_eq!(steps[0].path, ["/opt/xbin"]);
        assert_eq!(steps[1].id, "two");
        assert_eq!(steps[1].result, ActResult::Failure);
        assert!(steps[1].outputs.is_empty());
    }

    #[test]
    fn lines_split_across_reads() {
        let mut lines = Lines::default();
        assert!(lines.push(b"ab").is_empty());
        assert_eq!(lines.push(b"c\nd\n\xffe"), ["abc", "d"]);
        assert_eq!(lines.finish().as_deref(), Some("\u{fffd}e"));
        assert_eq!(lines.finish(), None);
    }
}
