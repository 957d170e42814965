//! `udos boot` driven through a real terminal: tmux (a server on a socket of its own)
//! runs it in a detached session; the test types into the pane (`send-keys`) and reads
//! what the terminal shows (`capture-pane`). Real VMs (QEMU; TCG where KVM is
//! unusable), a real restic repository and SQLite file.
//!
//! Needs what e2e.rs needs (a static udos-init in `UDOS_INIT`, the host tools) and
//! tmux (scripts/setup installs it).

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use serde_json::Value;

mod common;
use common::{json, repo, restic, serial, state_dir, udos};

/// A VM boot under TCG on a busy 2-core machine: well under this.
const BOOT_LIMIT: Duration = Duration::from_secs(240);
/// A command typed into the guest shell.
const COMMAND_LIMIT: Duration = Duration::from_secs(60);

/// A tmux server of the test's own (`-L`), killed when dropped.
struct Tmux {
    socket: String,
}

impl Tmux {
    /// Starts `command` in a detached 200x50 session `main`.
    fn start(name: &str, command: &str) -> Tmux {
        let t = Tmux {
            socket: format!("udos-boot-test-{}-{name}", std::process::id()),
        };
        let out = t.tmux(&[
            "new-session",
            "-d",
            "-s",
            "main",
            "-x",
            "200",
            "-y",
            "50",
            command,
        ]);
        assert!(out.status.success(), "tmux new-session: {out:?}");
        t
    }

    fn tmux(&self, args: &[&str]) -> Output {
        Command::new("tmux")
            .arg("-L")
            .arg(&self.socket)
            .args(args)
            .output()
            .expect("run tmux")
    }

    /// Types `text` literally, then Enter.
    fn line(&self, text: &str) {
        assert!(self
            .tmux(&["send-keys", "-t", "main", "-l", text])
            .status
            .success());
        self.key("Enter");
    }

    /// Sends one key by tmux's name for it (`C-c`, `C-]`, `Enter`).
    fn key(&self, key: &str) {
        assert!(self
            .tmux(&["send-keys", "-t", "main", key])
            .status
            .success());
    }

    /// What the pane shows, with its scrollback, wrapped lines joined.
    fn pane(&self) -> String {
        String::from_utf8_lossy(
            &self
                .tmux(&["capture-pane", "-p", "-J", "-t", "main", "-S", "-3000"])
                .stdout,
        )
        .into_owned()
    }

    /// Waits until the pane shows `text`; panics with the pane after `limit`.
    fn wait_for(&self, text: &str, limit: Duration) -> String {
        let end = Instant::now() + limit;
        loop {
            let pane = self.pane();
            if pane.contains(text) {
                return pane;
            }
            assert!(
                Instant::now() < end,
                "the terminal did not show {text:?} within {limit:?}:\n{pane}"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = self.tmux(&["kill-server"]);
    }
}

fn tmux_installed() {
    let ok = Command::new("tmux")
        .arg("-V")
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    assert!(
        ok,
        "tmux is needed (scripts/setup installs it: apt-get install tmux)"
    );
}

/// The command the pane runs: udos boot, then whether the terminal's settings are
/// what they were before, and udos's exit status; then it stays, to be read.
fn pane_command(args: &str) -> String {
    format!(
        "sh -c 'before=$(stty -g); {} --state-dir {} {args}; rc=$?; \
         if [ \"$(stty -g)\" = \"$before\" ]; then echo TTY-SAME; else echo TTY-CHANGED; fi; \
         echo UDOS-EXIT=$rc; sleep 3600'",
        env!("CARGO_BIN_EXE_udos"),
        state_dir().display()
    )
}

const WORKFLOW: &str = r#"
name: boot
on: push
jobs:
  build:
    runs-on: ubuntu-latest
    steps:
      - name: write
        id: write
        run: |
          mkdir -p out
          echo "$NONCE" > out/hello.txt
      - name: tool
        run: mkdir -p /opt && echo "tool-$NONCE" > /opt/boot-marker
"#;

/// A run of [`WORKFLOW`], once per test binary: (run id, the nonce its files hold,
/// step 1's layer id).
struct Fixture {
    run: i64,
    nonce: String,
    step1_layer: String,
}

fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos();
        let nonce = format!("boot-{}-{nanos}", std::process::id());
        let wf = WORKFLOW.replace("$NONCE", &nonce);
        let (dir, path) = repo(&wf, &[("tracked.txt", "t")]);
        let out = udos(&[
            "run",
            "--hypervisor",
            "qemu",
            "--no-console",
            "--json",
            path.to_str().unwrap(),
        ]);
        let report = json(&out);
        assert_eq!(out.status.code(), Some(0), "report: {report:#}");
        // The repository is only read when the run starts.
        drop(dir);
        let step1_layer = report["jobs"][0]["steps"][0]["layer_id"]
            .as_str()
            .unwrap()
            .to_string();
        Fixture {
            run: report["run_id"].as_i64().unwrap(),
            nonce,
            step1_layer,
        }
    })
}

/// Evicts a layer from the state dir as `udos gc` does (its directory and erofs
/// image), so a boot has to restore it from its snapshot.
fn evict(layer: &str) {
    let layers = state_dir().join("layers");
    std::fs::remove_dir_all(layers.join(layer)).unwrap();
    std::fs::remove_file(layers.join(format!("{layer}.erofs"))).unwrap();
}

fn runs() -> Vec<Value> {
    let out = udos(&["runs", "--json"]);
    assert!(out.status.success());
    json(&out).as_array().unwrap().clone()
}

/// Waits for the guest shell: a command whose output differs from its echo.
fn wait_for_shell(t: &Tmux) {
    t.wait_for("udos-init: /bin/sh started", BOOT_LIMIT);
    t.line("echo READY-$((6*7))");
    t.wait_for("READY-42", COMMAND_LIMIT);
}

/// The issue's "done when": through a real terminal, a command runs in the restored
/// root (files of both steps, one of them from a layer the state dir had lost), Ctrl-C
/// reaches the guest's job and not udos, `exit` powers off and udos returns with the
/// terminal as it was, and `--keep` makes a restore point that restores with the file
/// the shell wrote, recorded as a new run with a `kind=boot` snapshot.
#[test]
fn boot_through_a_terminal_runs_commands_and_keep_makes_a_restore_point() {
    tmux_installed();
    let _g = serial();
    let f = fixture();
    let before = runs().len();
    evict(&f.step1_layer);

    let t = Tmux::start(
        "keep",
        &pane_command(&format!("boot {} 2 --keep --network none", f.run)),
    );
    wait_for_shell(&t);
    t.line("cat /workspace/out/hello.txt /opt/boot-marker");
    t.wait_for(&format!("tool-{}", f.nonce), COMMAND_LIMIT);
    assert!(t.pane().contains(&format!("{}\n", f.nonce)), "{}", t.pane());
    assert!(
        t.pane().contains("restored from its snapshot"),
        "step 1's layer came from restic: {}",
        t.pane()
    );
    // A job that would run for minutes ends at ^C: the key reached the guest.
    t.line("sleep 600");
    std::thread::sleep(Duration::from_secs(2));
    t.key("C-c");
    t.line("echo AFTER-$((2+3))");
    t.wait_for("AFTER-5", COMMAND_LIMIT);
    t.line("echo kept > /workspace/new.txt && rm /opt/boot-marker");
    t.line("exit");
    let pane = t.wait_for("UDOS-EXIT=", BOOT_LIMIT);
    assert!(pane.contains("UDOS-EXIT=0"), "{pane}");
    assert!(pane.contains("TTY-SAME"), "raw mode was not undone: {pane}");

    let after = runs();
    assert_eq!(after.len(), before + 1, "one new run: {after:#?}");
    let new = &after[0];
    assert_eq!(new["event"], "boot", "{new:#}");
    let new_run = new["run_id"].as_i64().unwrap();
    assert!(
        pane.contains(&format!("kept as run {new_run} step 3")),
        "{pane}"
    );

    let target = tempfile::tempdir().unwrap();
    let root = target.path().join("root");
    let out = udos(&[
        "restore",
        &new_run.to_string(),
        "3",
        "--target",
        root.to_str().unwrap(),
    ]);
    assert!(out.status.success());
    let read = |p: &str| std::fs::read_to_string(root.join(p)).ok();
    assert_eq!(read("workspace/new.txt").as_deref(), Some("kept\n"));
    assert_eq!(
        read("workspace/out/hello.txt"),
        Some(format!("{}\n", f.nonce)),
        "the restore point's own files are under the boot's layer"
    );
    assert!(
        !root.join("opt/boot-marker").exists(),
        "the shell's deletion is part of the layer"
    );

    // The restore point is listed like any step, its layer a snapshot of its own.
    let out = udos(&["layers", &new_run.to_string(), "--json"]);
    let layers = json(&out);
    let text = layers.to_string();
    let boot_layer = step_layer(&layers, 3);
    assert!(text.contains(&f.step1_layer), "{text}");
    let snaps = restic(&[
        "snapshots",
        "--json",
        "--tag",
        &format!("kind=boot,run={new_run}"),
    ]);
    let snaps: Value = serde_json::from_slice(&snaps.stdout).unwrap();
    let snaps = snaps.as_array().unwrap();
    assert_eq!(snaps.len(), 1, "{snaps:#?}");
    let tags: Vec<&str> = snaps[0]["tags"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert!(
        tags.contains(&format!("layer={boot_layer}").as_str()),
        "{tags:?}"
    );
    let parent = step_layer(&json(&udos(&["layers", &f.run.to_string(), "--json"])), 2);
    assert!(
        tags.contains(&format!("parent={parent}").as_str()),
        "{tags:?}"
    );
}

/// The layer id of step `n` in `udos layers --json`.
fn step_layer(layers: &Value, n: i64) -> String {
    let rows = layers["steps"]
        .as_array()
        .unwrap_or_else(|| panic!("no steps in {layers:#}"));
    rows.iter()
        .find(|s| s["number"] == n)
        .and_then(|s| s["layer_id"].as_str())
        .unwrap_or_else(|| panic!("step {n} has no layer: {layers:#}"))
        .to_string()
}

/// Ctrl-] detaches: udos stops the VM, says so, exits 1 with the terminal as it was,
/// and records nothing.
#[test]
fn the_escape_key_stops_the_vm_and_keeps_nothing() {
    tmux_installed();
    let _g = serial();
    let f = fixture();
    let before = runs().len();
    let t = Tmux::start(
        "escape",
        &pane_command(&format!("boot {} 1 --keep --network none", f.run)),
    );
    wait_for_shell(&t);
    t.key("C-]");
    let pane = t.wait_for("UDOS-EXIT=", COMMAND_LIMIT);
    assert!(pane.contains("UDOS-EXIT=1"), "{pane}");
    assert!(pane.contains("detached (Ctrl-])"), "{pane}");
    assert!(pane.contains("TTY-SAME"), "raw mode was not undone: {pane}");
    assert_eq!(runs().len(), before, "nothing was recorded");
    assert_no_boot_scratch();
}

/// Input that is not a terminal is typed into the shell as it is: a script.
#[test]
fn a_script_on_stdin_runs_in_the_restored_root() {
    let _g = serial();
    let f = fixture();
    let mut child = Command::new(env!("CARGO_BIN_EXE_udos"))
        .arg("--state-dir")
        .arg(state_dir())
        .args(["boot", &f.run.to_string(), "write", "--network", "none"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    {
        use std::io::Write;
        let mut stdin = child.stdin.take().unwrap();
        stdin
            .write_all(
                b"cat /workspace/out/hello.txt; test -e /opt/boot-marker || echo NO-MARKER\nexit\n",
            )
            .unwrap();
    }
    let out = wait_with_limit(child, BOOT_LIMIT);
    let stdout = String::from_utf8_lossy(&out.stdout);
    eprintln!("{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(out.status.code(), Some(0), "{stdout}");
    assert!(stdout.contains(&format!("\n{}", f.nonce)), "{stdout}");
    // Step 1's root: step 2's file is not there yet.
    assert!(stdout.contains("\nNO-MARKER"), "{stdout}");
    assert_no_boot_scratch();
}

fn wait_with_limit(mut child: std::process::Child, limit: Duration) -> Output {
    let end = Instant::now() + limit;
    // Read the pipes on threads so a full pipe never stalls the child.
    let mut so = child.stdout.take().unwrap();
    let mut se = child.stderr.take().unwrap();
    let a = std::thread::spawn(move || {
        let mut v = Vec::new();
        std::io::Read::read_to_end(&mut so, &mut v).ok();
        v
    });
    let b = std::thread::spawn(move || {
        let mut v = Vec::new();
        std::io::Read::read_to_end(&mut se, &mut v).ok();
        v
    });
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if Instant::now() >= end {
            let _ = child.kill();
            let _ = child.wait();
            panic!("udos boot did not end within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    Output {
        status,
        stdout: a.join().unwrap(),
        stderr: b.join().unwrap(),
    }
}

/// A boot leaves no scratch (disks, restored layers) behind.
fn assert_no_boot_scratch() {
    let left: Vec<PathBuf> = std::fs::read_dir(state_dir().join("runs"))
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| is_boot_scratch(p))
        .collect();
    assert!(left.is_empty(), "left behind: {left:?}");
}

fn is_boot_scratch(p: &Path) -> bool {
    p.file_name()
        .and_then(|n| n.to_str())
        .is_some_and(|n| n.starts_with("boot-"))
}
