//! Helpers shared by the host agent's integration tests.
//!
//! The VM tests share one state dir (`$UDOS_TEST_STATE`, default under the cargo
//! target dir), so the image is built once; each test makes its own git working tree.
#![allow(dead_code)]

use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use serde_json::Value;

/// Make `root` a git working tree with everything in it committed, as a user's
/// checkout would be (udos takes the workspace layer from git's view of the tree).
pub fn commit_all(root: &Path) {
    for args in [
        &["init", "-q", "."][..],
        &["add", "-A"][..],
        &["commit", "-q", "-m", "test"][..],
    ] {
        git(root, args);
    }
}

pub fn state_dir() -> PathBuf {
    std::env::var_os("UDOS_TEST_STATE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("udos-e2e-state"))
}

pub fn udos(args: &[&str]) -> Output {
    udos_in(Command::new(env!("CARGO_BIN_EXE_udos")), &state_dir(), args)
}

/// `udos ARGS` with the built-in default base (`debian` for `ubuntu-*`), not the
/// `minimal` one the test command names for speed (`UDOS_DEFAULT_BASE`).
pub fn udos_on_default_base(args: &[&str]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_udos"));
    cmd.env_remove("UDOS_DEFAULT_BASE");
    udos_in(cmd, &state_dir(), args)
}

/// `cmd` (udos, with what the caller set: its environment) `--state-dir STATE ARGS`,
/// its stderr echoed for the test's log.
pub fn udos_in(mut cmd: Command, state: &Path, args: &[&str]) -> Output {
    let out = cmd
        .arg("--state-dir")
        .arg(state)
        .args(args)
        .output()
        .expect("spawn udos");
    eprintln!(
        "$ udos {}\n--- stderr ---\n{}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// VMs are heavy on a 2-core machine: one test boots at a time, and the image is
/// built once.
pub fn serial() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    static BUILT: OnceLock<()> = OnceLock::new();
    let guard = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    BUILT.get_or_init(|| {
        let out = udos(&["image", "build"]);
        assert!(out.status.success(), "udos image build failed");
    });
    guard
}

/// A git working tree with `files` committed and the workflow at
/// `.github/workflows/test.yml`.
pub fn repo(workflow: &str, files: &[(&str, &str)]) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    std::fs::create_dir_all(root.join(".github/workflows")).unwrap();
    let wf = root.join(".github/workflows/test.yml");
    std::fs::write(&wf, workflow).unwrap();
    for (path, content) in files {
        let p = root.join(path);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, content).unwrap();
    }
    commit_all(root);
    (dir, wf)
}

pub fn json(out: &Output) -> Value {
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "stdout is not one JSON document ({e}): {}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

pub fn restic(args: &[&str]) -> Output {
    restic_in(&state_dir(), args)
}

/// `restic ARGS` on the repository of the state dir `st`.
pub fn restic_in(st: &Path, args: &[&str]) -> Output {
    Command::new("restic")
        .args(args)
        .env("RESTIC_REPOSITORY", st.join("restic"))
        .env("RESTIC_PASSWORD_FILE", st.join("restic-password"))
        .output()
        .unwrap()
}

/// The snapshots in the state dir `st`'s repository whose tags include all of `tags`
/// (comma-separated, as `restic --tag` takes them).
pub fn snapshots_tagged(st: &Path, tags: &str) -> Vec<Value> {
    let out = restic_in(st, &["snapshots", "--json", "--tag", tags]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice::<Value>(&out.stdout)
        .unwrap()
        .as_array()
        .unwrap()
        .clone()
}

/// A state dir of a test's own, `name` under the target's temporary dir, emptied first
/// (for tests whose gc must not touch other tests' runs), with the shared state dir's
/// images hard-linked in and its hypervisor probe copied, so nothing is built again.
pub fn own_state_dir(name: &str) -> PathBuf {
    let st = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(name);
    if st.exists() {
        std::fs::remove_dir_all(&st).unwrap();
    }
    std::fs::create_dir_all(&st).unwrap();
    let ok = Command::new("cp")
        .arg("-al")
        .arg(state_dir().join("images"))
        .arg(st.join("images"))
        .status()
        .unwrap()
        .success();
    assert!(ok);
    let probe = state_dir().join("kvm-probe.json");
    if probe.exists() {
        std::fs::copy(probe, st.join("kvm-probe.json")).unwrap();
    }
    st
}

/// `git ARGS` in `dir` as a user would run it; its trimmed stdout.
pub fn git(dir: &Path, args: &[&str]) -> String {
    let out = Command::new("git")
        .args(args)
        .current_dir(dir)
        .env("GIT_AUTHOR_NAME", "t")
        .env("GIT_AUTHOR_EMAIL", "t@example.invalid")
        .env("GIT_COMMITTER_NAME", "t")
        .env("GIT_COMMITTER_EMAIL", "t@example.invalid")
        .output()
        .expect("run git");
    assert!(
        out.status.success(),
        "git {args:?} in {}: {}",
        dir.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// `git daemon` serving the repositories under `base` on a free loopback port;
/// killed when dropped.
pub struct GitDaemon {
    child: Child,
    /// The port it listens on.
    pub port: u16,
}

impl GitDaemon {
    /// Serves the repositories under `base`.
    pub fn start(base: &Path) -> GitDaemon {
        for _ in 0..20 {
            // A port the kernel just handed out; taken again by the time git binds it
            // only by bad luck, and then we try another.
            let port = std::net::TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
                .port();
            let mut child = Command::new("git")
                .arg("daemon")
                .arg("--listen=127.0.0.1")
                .arg(format!("--port={port}"))
                .arg(format!("--base-path={}", base.display()))
                .arg("--export-all")
                .arg("--reuseaddr")
                .arg(base)
                .stdin(Stdio::null())
                .stderr(Stdio::null())
                .process_group(0)
                .spawn()
                .expect("spawn git daemon");
            for _ in 0..100 {
                if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                    return GitDaemon { child, port };
                }
                if let Ok(Some(_)) = child.try_wait() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            kill_group(&mut child);
        }
        panic!("git daemon did not start");
    }

    /// `git://127.0.0.1:PORT/REPO`.
    pub fn url(&self, repo: &str) -> String {
        format!("git://127.0.0.1:{}/{repo}", self.port)
    }
}

impl Drop for GitDaemon {
    fn drop(&mut self) {
        kill_group(&mut self.child);
    }
}

/// `git daemon` is `git` running `git-daemon`, which forks per connection: kill the
/// whole process group (the child's own, `process_group(0)`), not just `git`.
fn kill_group(child: &mut Child) {
    signal_group(child.id(), libc::SIGKILL);
    let _ = child.wait();
}

fn signal_group(pid: u32, sig: libc::c_int) {
    // SAFETY: kill(2) on the process group of a child this test started and has not
    // reaped yet.
    unsafe {
        libc::kill(-(pid as libc::pid_t), sig);
    }
}
