//! End-to-end: the `udos` binary runs workflows in real VMs (QEMU; TCG on machines
//! without a usable KVM), writes a real restic repository and a real SQLite file, and
//! restores from it with the plain restic CLI underneath.
//!
//! Needs a static udos-init (`UDOS_INIT`, set by scripts/test) and the host tools
//! scripts/setup installs. The image is built once into a state dir shared by these
//! tests (`$UDOS_TEST_STATE`, default under the cargo target dir); each test makes its
//! own git working tree.

use std::path::Path;
use std::process::Command;

use serde_json::Value;

mod common;
use common::{json, repo, restic, serial, state_dir, udos};

const CHAIN: &str = r#"
name: chain
on: push
env:
  GREETING: hello
jobs:
  build:
    runs-on: ubuntu-latest
    steps:
      - name: write
        run: |
          mkdir -p build /opt/tool
          echo "$GREETING from 1" > build/msg.txt
          echo tool > /opt/tool/marker
          echo scratch > /tmp/carried
      - name: read and delete
        run: |
          grep -q "hello from 1" build/msg.txt
          test -f /opt/tool/marker
          test "$(cat /tmp/carried)" = scratch
          rm tracked.txt
          rm -r olddir
      - id: setter
        name: set output and env
        run: |
          test ! -e tracked.txt
          test ! -e olddir
          echo "answer=42" >> "$GITHUB_OUTPUT"
          echo "MODE=layered" >> "$GITHUB_ENV"
          mkdir -p /opt/tool/bin && printf '#!/bin/sh\necho from-path\n' > /opt/tool/bin/mytool
          chmod +x /opt/tool/bin/mytool
          echo /opt/tool/bin >> "$GITHUB_PATH"
      - name: use
        run: |
          test "${{ steps.setter.outputs.answer }}" = 42
          test "$MODE" = layered
          test "$(mytool)" = from-path
          echo ok > used.txt
"#;

#[test]
fn chained_steps_carry_files_deletions_outputs_env_and_restore() {
    let _g = serial();
    let (_dir, wf) = repo(
        CHAIN,
        &[
            ("tracked.txt", "t"),
            ("olddir/a", "a"),
            ("olddir/sub/b", "b"),
        ],
    );
    let out = udos(&[
        "run",
        "--hypervisor",
        "qemu",
        "--json",
        wf.to_str().unwrap(),
    ]);
    let report = json(&out);
    assert_eq!(out.status.code(), Some(0), "report: {report:#}");
    assert_eq!(report["status"], "success");
    assert!(
        report["hypervisor"].as_str().unwrap().starts_with("qemu ("),
        "{report:#}"
    );
    let steps = report["jobs"][0]["steps"].as_array().unwrap();
    assert_eq!(steps.len(), 4);
    for s in steps {
        assert_eq!(s["status"], "success", "{s:#}");
        assert_eq!(s["exit_code"], 0);
        let snap = s["snapshot_id"].as_str().unwrap();
        assert_eq!(snap.len(), 64, "full restic id: {snap}");
        assert_eq!(s["layer_id"].as_str().unwrap().len(), 64);
        for phase in ["materialize", "boot", "guest", "seal", "snapshot"] {
            assert!(s["phases_ms"][phase].is_u64(), "phase {phase} in {s:#}");
        }
    }
    assert_eq!(steps[2]["outputs"]["answer"], "42");
    let run_id = report["run_id"].as_i64().unwrap();
    assert!(report["generation"].as_i64().unwrap() >= 1);

    // The layers are ordinary restic snapshots, listed by the plain CLI with their tags.
    let snaps = restic(&["snapshots", "--json", "--tag", &format!("run={run_id}")]);
    assert!(snaps.status.success());
    let snaps: Value = serde_json::from_slice(&snaps.stdout).unwrap();
    let ids: Vec<&str> = snaps
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["id"].as_str().unwrap())
        .collect();
    for s in steps {
        assert!(ids.contains(&s["snapshot_id"].as_str().unwrap()));
    }

    // `udos runs` and `udos layers` show it.
    let runs = json(&udos(&["runs", "--json"]));
    assert!(runs
        .as_array()
        .unwrap()
        .iter()
        .any(|r| r["run_id"] == run_id && r["status"] == "success"));
    let layers = json(&udos(&["layers", &run_id.to_string(), "--json"]));
    assert_eq!(layers["steps"].as_array().unwrap().len(), 4);
    assert_eq!(layers["inputs"][0]["kind"], "base");

    // Restore: the root as step 2 left it (files created, tracked file and dir deleted)...
    let t = tempfile::tempdir().unwrap();
    let target = t.path().join("after-2");
    let out = udos(&[
        "restore",
        &run_id.to_string(),
        "2",
        "--target",
        target.to_str().unwrap(),
    ]);
    assert!(out.status.success());
    assert_eq!(
        std::fs::read_to_string(target.join("workspace/build/msg.txt")).unwrap(),
        "hello from 1\n"
    );
    assert!(target.join("opt/tool/marker").is_file());
    assert!(!target.join("workspace/tracked.txt").exists());
    assert!(!target.join("workspace/olddir").exists());
    assert!(target.join("bin/busybox").is_file(), "base layer restored");
    assert!(
        !target.join("workspace/used.txt").exists(),
        "step 4 not applied"
    );
    // ...and as step 1 left it, named by number; the last step named by its id.
    let target1 = t.path().join("after-1");
    assert!(udos(&[
        "restore",
        &run_id.to_string(),
        "1",
        "--target",
        target1.to_str().unwrap()
    ])
    .status
    .success());
    assert_eq!(
        std::fs::read_to_string(target1.join("workspace/tracked.txt")).unwrap(),
        "t"
    );
    assert!(target1.join("workspace/olddir/sub/b").is_file());
    let target3 = t.path().join("after-setter");
    assert!(udos(&[
        "restore",
        &run_id.to_string(),
        "setter",
        "--target",
        target3.to_str().unwrap()
    ])
    .status
    .success());
    assert!(target3.join("opt/tool/bin/mytool").is_file());

    // Restoring into a non-empty directory is refused and writes nothing.
    let out = udos(&[
        "restore",
        &run_id.to_string(),
        "1",
        "--target",
        target.to_str().unwrap(),
    ]);
    assert_ne!(out.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&out.stderr).contains("not empty"));
    assert!(!target.join("workspace/tracked.txt").exists());
}

const FAILING: &str = r#"
on: push
jobs:
  build:
    runs-on: ubuntu-latest
    steps:
      - id: first
        run: echo "v=one" >> "$GITHUB_OUTPUT"
      - name: fails
        run: exit 3
      - name: skipped without a VM
        run: echo should-not-run > nope.txt
      - name: runs on failure
        if: failure()
        run: |
          test "${{ steps.first.outputs.v }}" = one
          echo handled > handled.txt
      - name: always runs
        if: always()
        run: test -f handled.txt
"#;

#[test]
fn a_failing_step_fails_the_job_and_only_failure_or_always_steps_run() {
    let _g = serial();
    let (_dir, wf) = repo(FAILING, &[]);
    let out = udos(&[
        "run",
        "--hypervisor",
        "qemu",
        "--json",
        wf.to_str().unwrap(),
    ]);
    let report = json(&out);
    assert_eq!(out.status.code(), Some(1), "{report:#}");
    assert_eq!(report["status"], "failure");
    let steps = report["jobs"][0]["steps"].as_array().unwrap();
    let statuses: Vec<&str> = steps
        .iter()
        .map(|s| s["status"].as_str().unwrap())
        .collect();
    assert_eq!(
        statuses,
        vec!["success", "failure", "skipped", "success", "success"]
    );
    assert_eq!(steps[1]["exit_code"], 3);
    assert!(
        steps[2]["phases_ms"].get("vm").is_none(),
        "no VM for a skipped step"
    );
    assert!(steps[2]["snapshot_id"].is_null());
}

#[test]
fn bad_input_is_a_setup_error_with_a_reason() {
    let (_dir, wf) = repo("jobs: [unclosed", &[]);
    let out = udos(&["run", "--json", wf.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("not valid YAML"), "{err}");
    assert!(out.stdout.is_empty());

    let (_dir2, wf2) = repo(CHAIN, &[]);
    let out = udos(&[
        "run",
        "--kernel",
        "/nonexistent/vmlinuz",
        wf2.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/vmlinuz"));

    let out = udos(&["run", "-j", "nope", wf2.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no job `nope`"));

    let out = udos(&["run", "--json", "/nonexistent/wf.yml"]);
    assert_eq!(out.status.code(), Some(2));

    let out = udos(&["restore", "999999", "1", "--target", "/tmp/udos-never"]);
    assert_ne!(out.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no run 999999"));
    assert!(!Path::new("/tmp/udos-never").exists());
}

const HANG: &str = r#"
on: push
jobs:
  build:
    runs-on: ubuntu-latest
    steps:
      - run: echo before > before.txt
      - name: hangs
        run: sleep 600
"#;

#[test]
fn a_step_that_runs_past_its_timeout_is_stopped_and_reported() {
    let _g = serial();
    let (_dir, wf) = repo(HANG, &[]);
    let out = udos(&[
        "run",
        "--hypervisor",
        "qemu",
        "--json",
        "--timeout",
        "20",
        wf.to_str().unwrap(),
    ]);
    let report = json(&out);
    assert_eq!(out.status.code(), Some(1), "{report:#}");
    let steps = report["jobs"][0]["steps"].as_array().unwrap();
    assert_eq!(steps[0]["status"], "success");
    assert_eq!(steps[1]["status"], "failure");
    // The report says why, not only the console.
    assert!(
        steps[1]["error"]
            .as_str()
            .unwrap_or_default()
            .contains("timed out"),
        "{:#}",
        steps[1]
    );
    // The guest stopped the step itself and still sealed: its layer is a restore point.
    assert_eq!(
        steps[1]["snapshot_id"].as_str().map(str::len),
        Some(64),
        "{:#}",
        steps[1]
    );
}

#[test]
fn a_bad_repository_is_a_setup_error_that_says_what_to_do() {
    let _g = serial();
    let (_dir, wf) = repo(CHAIN, &[]);
    let run_with = |env: &[(&str, &str)]| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_udos"));
        cmd.arg("--state-dir").arg(state_dir());
        cmd.args(["run", "--hypervisor", "qemu", wf.to_str().unwrap()]);
        cmd.env_remove("RESTIC_PASSWORD")
            .env_remove("RESTIC_PASSWORD_FILE");
        for (k, v) in env {
            cmd.env(k, v);
        }
        cmd.output().unwrap()
    };
    // A repository named without a password.
    let out = run_with(&[("RESTIC_REPOSITORY", "/nonexistent/repo")]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("RESTIC_PASSWORD_FILE"), "{err}");

    // A directory that is not a restic repository (corrupt: no config): refused,
    // and left as it was.
    let junk = tempfile::tempdir().unwrap();
    std::fs::write(junk.path().join("precious.txt"), "keep me").unwrap();
    let out = run_with(&[
        ("RESTIC_REPOSITORY", junk.path().to_str().unwrap()),
        ("RESTIC_PASSWORD", "x"),
    ]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("not a restic repository"), "{err}");
    assert_eq!(
        std::fs::read_to_string(junk.path().join("precious.txt")).unwrap(),
        "keep me"
    );
    assert_eq!(std::fs::read_dir(junk.path()).unwrap().count(), 1);
}
