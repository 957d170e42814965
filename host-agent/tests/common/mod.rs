//! Helpers shared by the host agent's integration tests.
//!
//! The VM tests share one state dir (`$UDOS_TEST_STATE`, default under the cargo
//! target dir), so the image is built once; each test makes its own git working tree.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::{Mutex, OnceLock};

use serde_json::Value;

/// Make `root` a git working tree with everything in it committed, as a user's
/// checkout would be (udos takes the workspace layer from git's view of the tree).
pub fn commit_all(root: &Path) {
    for args in [
        &["init", "-q", "."][..],
        &["add", "-A"][..],
        &["commit", "-q", "-m", "test"][..],
    ] {
        let ok = Command::new("git")
            .args(args)
            .current_dir(root)
            .env("GIT_AUTHOR_NAME", "t")
            .env("GIT_AUTHOR_EMAIL", "t@example.invalid")
            .env("GIT_COMMITTER_NAME", "t")
            .env("GIT_COMMITTER_EMAIL", "t@example.invalid")
            .status()
            .expect("run git")
            .success();
        assert!(ok, "git {args:?} in {}", root.display());
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
    let st = state_dir();
    Command::new("restic")
        .args(args)
        .env("RESTIC_REPOSITORY", st.join("restic"))
        .env("RESTIC_PASSWORD_FILE", st.join("restic-password"))
        .output()
        .unwrap()
}
