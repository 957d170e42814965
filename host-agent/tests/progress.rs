//! The progress display of `udos run`, on a real terminal (a detached tmux session of a
//! fixed size, read with `capture-pane`) and in a log (stderr to a file). Needs what
//! e2e.rs needs, and tmux (scripts/setup installs it).

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

mod common;
use common::{repo, serial, state_dir, udos_in};

/// Two jobs of two steps; `beta` fails. A step's name holds a secret.
const WORKFLOW: &str = r#"
name: progress
on: push
jobs:
  alpha:
    runs-on: ubuntu-latest
    steps:
      - name: alpha-one
        run: echo one > one.txt
      - name: alpha-two ${{ secrets.TOKEN }}
        run: sleep 2; cat one.txt
  beta:
    runs-on: ubuntu-latest
    steps:
      - name: beta-one
        run: sleep 1
      - name: beta-fails
        run: exit 3
"#;

const STATES: [&str; 10] = [
    "queued",
    "booting",
    "running",
    "sealing",
    "snapshotting",
    "cached",
    "done",
    "failed",
    "skipped",
    "cancelled",
];

fn is_duration(s: &str) -> bool {
    s.chars().next().is_some_and(|c| c.is_ascii_digit()) && (s.ends_with('s') || s.ends_with('m'))
}

/// A board row: (name, state, duration); `step` rows start with the step's number.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Row {
    step: Option<u32>,
    name: String,
    state: String,
    duration: String,
}

/// The board rows on a screen: a job row starts at column 0 with its name, a step row
/// is indented and starts with its number; both end with a state and a duration (a
/// collapsed job row with its step count).
fn rows(screen: &str) -> Vec<Row> {
    screen.lines().filter_map(row).collect()
}

fn row(line: &str) -> Option<Row> {
    let mut words: Vec<&str> = line.split_whitespace().collect();
    if words.len() >= 2 && words[words.len() - 1].starts_with("step") {
        words.truncate(words.len() - 2);
    }
    let n = words.len();
    if n < 3 || !STATES.contains(&words[n - 2]) || !is_duration(words[n - 1]) {
        return None;
    }
    let step = if line.starts_with(' ') {
        Some(words[0].parse().ok()?)
    } else {
        None
    };
    let name_from = usize::from(step.is_some());
    Some(Row {
        step,
        name: words[name_from..n - 2].join(" "),
        state: words[n - 2].into(),
        duration: words[n - 1].into(),
    })
}

/// A tmux server of its own (its own socket), killed when dropped.
struct Tmux {
    socket: String,
}

impl Tmux {
    fn cmd(&self, args: &[&str]) -> String {
        let out = Command::new("tmux")
            .arg("-L")
            .arg(&self.socket)
            .args(args)
            .output()
            .expect("tmux (scripts/setup installs it)");
        assert!(
            out.status.success(),
            "tmux {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// The whole pane: its history and the screen.
    fn capture(&self) -> String {
        self.cmd(&["capture-pane", "-p", "-J", "-S", "-", "-t", "progress"])
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = Command::new("tmux")
            .args(["-L", &self.socket, "kill-server"])
            .stderr(Stdio::null())
            .status();
    }
}

fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// The script the pane runs: `udos run` with stderr on the pane's terminal, the JSON
/// report to a file, then its exit code to `exit_file`; the pane stays open after.
fn script(dir: &Path, wf: &Path, secret: &str, exit_file: &Path) -> String {
    let mut env = String::new();
    for var in [
        "UDOS_INIT",
        "UDOS_DEFAULT_BASE",
        "UDOS_KERNEL",
        "PATH",
        "HOME",
    ] {
        if let Ok(v) = std::env::var(var) {
            env.push_str(&format!("export {var}={}\n", shell_quote(&v)));
        }
    }
    format!(
        "{env}unset UDOS_PROGRESS\ncd {dir}\n{udos} --state-dir {state} run -W {wf} --no-cache --secret TOKEN={secret} --json > report.json\necho $? > {exit}.tmp && mv {exit}.tmp {exit}\nsleep 3600\n",
        dir = shell_quote(&dir.display().to_string()),
        udos = shell_quote(env!("CARGO_BIN_EXE_udos")),
        state = shell_quote(&state_dir().display().to_string()),
        wf = shell_quote(&wf.display().to_string()),
        secret = shell_quote(secret),
        exit = shell_quote(&exit_file.display().to_string()),
    )
}

/// No board row shows twice on a screen: the board was redrawn in place, not
/// printed again below itself.
fn assert_drawn_once(screen: &str) {
    let rows = rows(screen);
    for r in &rows {
        let same = rows
            .iter()
            .filter(|o| o.step == r.step && o.name == r.name)
            .count();
        assert_eq!(same, 1, "{r:?} is on the pane {same} times:\n{screen}");
    }
}

#[test]
fn the_board_is_redrawn_in_place_on_a_terminal_and_a_log_gets_plain_lines() {
    let _g = serial();
    let secret = format!("udos-progress-sekrit-{}", std::process::id());
    let (dir, wf) = repo(WORKFLOW, &[]);
    let exit_file = dir.path().join("exit-code");
    let script_file = dir.path().join("run.sh");
    std::fs::write(&script_file, script(dir.path(), &wf, &secret, &exit_file)).unwrap();

    let tmux = Tmux {
        socket: format!("udos-progress-test-{}", std::process::id()),
    };
    tmux.cmd(&[
        "new-session",
        "-d",
        "-s",
        "progress",
        "-x",
        "120",
        "-y",
        "40",
        &format!("sh {}", shell_quote(&script_file.display().to_string())),
    ]);
    let started = Instant::now();
    let mut screens = Vec::new();
    while !exit_file.exists() {
        assert!(
            started.elapsed() < Duration::from_secs(1200),
            "udos run did not end in 20 minutes:\n{}",
            tmux.capture()
        );
        screens.push(tmux.capture());
        std::thread::sleep(Duration::from_millis(300));
    }
    let code = std::fs::read_to_string(&exit_file).unwrap();
    assert_eq!(code.trim(), "1", "beta fails, so the run does");
    std::thread::sleep(Duration::from_millis(300));
    let last = tmux.capture();
    eprintln!("--- the pane at the end ---\n{last}");

    // While it ran, steps were shown with a live state and a duration.
    let live: Vec<Row> = screens
        .iter()
        .flat_map(|s| rows(s))
        .filter(|r| {
            r.step.is_some() && ["booting", "running", "sealing"].contains(&r.state.as_str())
        })
        .collect();
    for name in ["alpha-one", "beta-one"] {
        assert!(
            live.iter().any(|r| r.name == name),
            "{name} was never shown running: {live:?}"
        );
    }
    assert!(live.iter().all(|r| is_duration(&r.duration)));
    for s in screens.iter().chain([&last]) {
        assert_drawn_once(s);
        assert!(!s.contains(&secret), "the secret is on the pane:\n{s}");
    }
    // At the end: both jobs, collapsed, with their final state and step count.
    let jobs: Vec<(String, String)> = last
        .lines()
        .filter_map(|l| Some((row(l)?, l)))
        .filter(|(r, _)| r.step.is_none())
        .map(|(r, l)| (r.name, l.to_string()))
        .collect();
    let find = |name: &str| jobs.iter().find(|(n, _)| n == name).map(|(_, l)| l.clone());
    let alpha = find("alpha").unwrap_or_else(|| panic!("no alpha row:\n{last}"));
    let beta = find("beta").unwrap_or_else(|| panic!("no beta row:\n{last}"));
    assert!(
        alpha.contains(" done ") && alpha.ends_with("2 steps"),
        "{alpha}"
    );
    assert!(
        beta.contains(" failed ") && beta.ends_with("2 steps"),
        "{beta}"
    );
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.path().join("report.json")).unwrap())
            .expect("--json still writes one report on stdout");
    assert_eq!(report["status"], "failure");

    // The same run with stderr to a file: plain lines, no escape sequences.
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_udos"));
    cmd.current_dir(dir.path()).env_remove("UDOS_PROGRESS");
    let out = udos_in(
        cmd,
        &state_dir(),
        &[
            "run",
            "-W",
            wf.to_str().unwrap(),
            "--no-cache",
            "--secret",
            &format!("TOKEN={secret}"),
        ],
    );
    assert_eq!(out.status.code(), Some(1));
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(
        !log.contains('\x1b'),
        "an escape sequence in the log:\n{log}"
    );
    assert!(!log.contains(&secret), "the secret is in the log");
    for line in [
        "udos: job alpha: starting",
        "udos: alpha step 1 \"alpha-one\": starting VM",
        "udos: alpha step 1 \"alpha-one\": success",
        "udos: beta step 2 \"beta-fails\": failure",
        "udos: job alpha: success",
        "udos: job beta: failure",
    ] {
        assert!(
            log.lines().any(|l| l.starts_with(line)),
            "no `{line}` in:\n{log}"
        );
    }
    assert!(rows(&log).is_empty(), "the board is drawn in a log:\n{log}");
}

#[test]
fn board_rows_are_told_from_console_and_log_lines() {
    let screen = "\
  [alpha 1] udos-init: act started (pid 7)
udos: alpha step 1 \"alpha-one\": starting VM
alpha                done      12.3s  2 steps
beta                 running    4.0s
   1 beta-one        running    3.9s
";
    let got = rows(screen);
    assert_eq!(got.len(), 3, "{got:?}");
    assert_eq!(
        got[2],
        Row {
            step: Some(1),
            name: "beta-one".into(),
            state: "running".into(),
            duration: "3.9s".into()
        }
    );
    assert_eq!(got[0].name, "alpha");
    assert_eq!(got[0].state, "done");
}
