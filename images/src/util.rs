//! Small helpers shared by the builders: running tools, hashing, atomic writes.

use std::ffi::OsStr;
use std::fs;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use sha2::{Digest, Sha256};

use crate::bounded::run_bounded;

/// Runs `cmd` with stdin on /dev/null, capturing its output, and waits at most `limit`
/// (each caller passes the limit of its kind of call). Fails with the command line
/// and stderr when the program cannot be started, overruns its limit (it is killed)
/// or exits non-zero.
pub(crate) fn run(cmd: &mut Command, limit: Duration) -> Result<Output> {
    let shown = show(cmd);
    let expr = to_duct(cmd)
        .stdin_null()
        .stdout_capture()
        .stderr_capture()
        .unchecked();
    let out = run_bounded(&expr, limit, &format!("`{shown}`"))?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        let stdout = String::from_utf8_lossy(&out.stdout);
        let detail = if stderr.trim().is_empty() {
            stdout.trim().to_string()
        } else {
            stderr.trim().to_string()
        };
        bail!("`{shown}` failed ({}): {}", out.status, tail(&detail, 2000));
    }
    Ok(out)
}

/// Like [`run`] but returns stdout as a string.
pub(crate) fn run_stdout(cmd: &mut Command, limit: Duration) -> Result<String> {
    let out = run(cmd, limit)?;
    String::from_utf8(out.stdout).context("command output is not UTF-8")
}

/// The same program, arguments, directory and environment changes as a duct
/// expression (what [`run_bounded`] runs).
fn to_duct(cmd: &Command) -> duct::Expression {
    let mut e = duct::cmd(cmd.get_program(), cmd.get_args());
    if let Some(d) = cmd.get_current_dir() {
        e = e.dir(d);
    }
    for (k, v) in cmd.get_envs() {
        e = match v {
            Some(v) => e.env(k, v),
            None => e.env_remove(k),
        };
    }
    e
}

fn show(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    s
}

fn tail(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut start = s.len() - max;
    while !s.is_char_boundary(start) {
        start += 1;
    }
    &s[start..]
}

/// Whether `prog` is found in `PATH` (or is an existing path).
pub(crate) fn have_tool(prog: &str) -> bool {
    find_tool(prog).is_some()
}

pub(crate) fn find_tool(prog: &str) -> Option<PathBuf> {
    if prog.contains('/') {
        let p = PathBuf::from(prog);
        return p.is_file().then_some(p);
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    // Debian keeps depmod and mkfs.* in /sbin and /usr/sbin, which a non-root PATH may lack.
    let extra = OsStr::new("/usr/sbin:/sbin");
    std::env::split_paths(&path)
        .chain(std::env::split_paths(extra))
        .map(|d| d.join(prog))
        .find(|p| p.is_file())
}

/// A `Command` for `prog`, resolved through `PATH` plus `/usr/sbin:/sbin`.
pub(crate) fn tool(prog: &str) -> Command {
    match find_tool(prog) {
        Some(p) => Command::new(p),
        None => Command::new(prog),
    }
}

pub(crate) fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

pub(crate) fn sha256_file(path: &Path) -> Result<String> {
    let mut f = fs::File::open(path).with_context(|| format!("open {}", path.display()))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f
            .read(&mut buf)
            .with_context(|| format!("read {}", path.display()))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex::encode(h.finalize()))
}

/// Writes `bytes` to `path` through a temporary file in the same directory and a rename.
pub(crate) fn atomic_write(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = parent_of(path)?;
    fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    let mut tmp = tempfile::Builder::new()
        .prefix(".tmp-")
        .tempfile_in(dir)
        .with_context(|| format!("create a temporary file in {}", dir.display()))?;
    tmp.write_all(bytes)?;
    tmp.as_file().sync_all()?;
    tmp.persist(path)
        .map_err(|e| e.error)
        .with_context(|| format!("rename into {}", path.display()))?;
    Ok(())
}

pub(crate) fn parent_of(path: &Path) -> Result<&Path> {
    match path.parent() {
        Some(p) if p.as_os_str().is_empty() => Ok(Path::new(".")),
        Some(p) => Ok(p),
        None => bail!("{} has no parent directory", path.display()),
    }
}

/// A fresh temporary directory inside `parent` (created if needed), removed on drop.
pub(crate) fn tmp_dir_in(parent: &Path, prefix: &str) -> Result<tempfile::TempDir> {
    fs::create_dir_all(parent).with_context(|| format!("create {}", parent.display()))?;
    tempfile::Builder::new()
        .prefix(prefix)
        .tempdir_in(parent)
        .with_context(|| format!("create a temporary directory in {}", parent.display()))
}

/// Moves a finished directory into place. If `dest` already exists (another builder won the
/// race, contents are content-addressed and therefore equal) the new copy is dropped.
pub(crate) fn publish_dir(staged: tempfile::TempDir, dest: &Path) -> Result<()> {
    if dest.exists() {
        return Ok(());
    }
    let src = staged.keep();
    match fs::rename(&src, dest) {
        Ok(()) => Ok(()),
        Err(_) if dest.exists() => {
            let _ = fs::remove_dir_all(&src);
            Ok(())
        }
        Err(e) => {
            let _ = fs::remove_dir_all(&src);
            Err(e).with_context(|| format!("rename {} to {}", src.display(), dest.display()))
        }
    }
}

/// Copies a file, creating the destination's parent directories.
pub(crate) fn copy_file(src: &Path, dst: &Path) -> Result<()> {
    if let Some(p) = dst.parent() {
        fs::create_dir_all(p).with_context(|| format!("create {}", p.display()))?;
    }
    fs::copy(src, dst).with_context(|| format!("copy {} to {}", src.display(), dst.display()))?;
    Ok(())
}

/// A version or name safe to use in paths and on command lines.
pub(crate) fn check_token(what: &str, s: &str) -> Result<()> {
    let ok = !s.is_empty()
        && s.len() <= 128
        && !s.starts_with(['-', '.'])
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '+' | '_' | '~' | ':'));
    if !ok {
        bail!("invalid {what} {s:?}");
    }
    Ok(())
}

pub(crate) fn io_other(msg: impl Into<String>) -> io::Error {
    io::Error::other(msg.into())
}

/// Takes an exclusive `flock` on `path` (created if needed), held until the returned
/// file is dropped: one builder at a time, across processes.
pub(crate) fn lock_file(path: &Path) -> Result<fs::File> {
    if let Some(dir) = path.parent() {
        fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    }
    let f = fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
        .with_context(|| format!("open {}", path.display()))?;
    // SAFETY: flock(2) on a descriptor we own; no memory is involved.
    let rc = unsafe { libc::flock(std::os::fd::AsRawFd::as_raw_fd(&f), libc::LOCK_EX) };
    if rc != 0 {
        return Err(io::Error::last_os_error()).with_context(|| format!("lock {}", path.display()));
    }
    Ok(f)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    #[test]
    fn a_hanging_tool_fails_naming_the_command_and_the_limit() {
        // dpkg (through dpkg-deb, its child) opening a package that is a FIFO with no
        // writer blocks for ever: a real program, hung for real.
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("stalled.deb");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::S_IRWXU).unwrap();
        let t = Instant::now();
        let err = run(
            tool("dpkg").arg("-x").arg(&fifo).arg(dir.path().join("x")),
            Duration::from_millis(500),
        )
        .unwrap_err()
        .to_string();
        assert!(err.starts_with("`"), "{err}");
        assert!(err.contains("dpkg -x "), "{err}");
        assert!(
            err.ends_with("did not finish within 500 ms and was killed"),
            "{err}"
        );
        assert!(t.elapsed() < Duration::from_secs(6), "{:?}", t.elapsed());
    }

    #[test]
    fn a_failing_tool_reports_its_stderr_and_env_and_dir_are_kept() {
        let dir = tempfile::tempdir().unwrap();
        let out = run_stdout(
            Command::new("sh")
                .args(["-c", "echo \"$UDOS_T $(pwd)\""])
                .env("UDOS_T", "set")
                .current_dir(dir.path()),
            Duration::from_secs(10),
        )
        .unwrap();
        let cwd = dir.path().canonicalize().unwrap();
        assert_eq!(out.trim(), format!("set {}", cwd.display()));
        let err = run(
            Command::new("sh").args(["-c", "echo broken >&2; exit 4"]),
            Duration::from_secs(10),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("failed (exit status: 4): broken"), "{err}");
    }
}
