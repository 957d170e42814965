//! Squash on a git tag, in real VMs (QEMU; TCG here): a run on a tagged commit makes
//! its job's final root (without /workspace) a base with its own restic snapshot; a
//! run on a descendant commit starts from it (the step sees what the tagged run
//! installed, not its old workspace, and misses the cache made on the plain base); a
//! run on a commit before the tag and a `--no-squash` run do not; gc keeps it while
//! the tag exists. Needs what e2e.rs needs (scripts/test provides it).

use std::path::Path;
use std::process::{Command, Output};

use serde_json::Value;

mod common;
use common::{git, json, own_state_dir, serial, snapshots_tagged};

/// Says what the root held before the step, then installs the tool and writes into
/// the workspace.
const TOOL: &str = r#"
on: push
jobs:
  build:
    runs-on: ubuntu-latest
    steps:
      - id: probe
        run: |
          if [ -f /opt/tool/version ]; then echo "had=$(cat /opt/tool/version)" >> "$GITHUB_OUTPUT"; else echo "had=none" >> "$GITHUB_OUTPUT"; fi
          if [ -e /workspace/old.txt ]; then echo "old=present" >> "$GITHUB_OUTPUT"; else echo "old=absent" >> "$GITHUB_OUTPUT"; fi
          if [ -e /workspace/made.txt ]; then echo "made=present" >> "$GITHUB_OUTPUT"; else echo "made=absent" >> "$GITHUB_OUTPUT"; fi
          mkdir -p /opt/tool
          cat version.txt > /opt/tool/version
          echo made > made.txt
          # The tagged run also changes a file of the base, which later runs leave alone.
          if [ "$(cat version.txt)" = 1 ]; then echo /opt/tool/sh >> /etc/shells; fi
"#;

fn udos_in(st: &Path, args: &[&str]) -> Output {
    common::udos_in(Command::new(env!("CARGO_BIN_EXE_udos")), st, args)
}

/// A run of the workflow at `wf`; its report (it must succeed).
fn run(st: &Path, wf: &Path, extra: &[&str]) -> (Value, String) {
    let mut args = vec!["run", "--hypervisor", "qemu", "--json", "--no-console"];
    args.extend_from_slice(extra);
    args.push(wf.to_str().unwrap());
    let out = udos_in(st, &args);
    let report = json(&out);
    assert_eq!(out.status.code(), Some(0), "{report:#}");
    (report, String::from_utf8_lossy(&out.stderr).into_owned())
}

/// The probe step's outputs: had, old, made.
fn probe(report: &Value) -> (String, String, String) {
    let o = &report["jobs"][0]["steps"][0]["outputs"];
    let s = |k: &str| {
        o[k].as_str()
            .unwrap_or_else(|| panic!("{report:#}"))
            .to_string()
    };
    (s("had"), s("old"), s("made"))
}

/// The squashed bases the database records: (layer, commit, base, job, tags, run, snapshot).
fn squashed_rows(st: &Path) -> Vec<(String, String, String, String, String, i64, String)> {
    let db = rusqlite::Connection::open(st.join("udos.db")).unwrap();
    let mut q = db
        .prepare(
            "SELECT layer_id, commit_sha, base_name, job_id, tags, run_id, snapshot_id
             FROM squashed_bases ORDER BY run_id",
        )
        .unwrap();
    q.query_map([], |r| {
        Ok((
            r.get(0)?,
            r.get(1)?,
            r.get(2)?,
            r.get(3)?,
            r.get(4)?,
            r.get(5)?,
            r.get(6)?,
        ))
    })
    .unwrap()
    .collect::<rusqlite::Result<_>>()
    .unwrap()
}

fn squash_snapshots(st: &Path) -> Vec<Value> {
    snapshots_tagged(st, "squash=1")
}

#[test]
fn a_tagged_run_makes_a_base_that_later_runs_on_descendants_use() {
    let _g = serial();
    let st = own_state_dir("udos-squash-tag-state");
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    std::fs::create_dir_all(root.join(".github/workflows")).unwrap();
    let wf = root.join(".github/workflows/test.yml");
    std::fs::write(&wf, TOOL).unwrap();
    std::fs::write(root.join("version.txt"), "0").unwrap();
    std::fs::write(root.join("old.txt"), "old").unwrap();
    git(root, &["init", "-q", "-b", "main", "."]);
    git(root, &["add", "-A"]);
    git(root, &["commit", "-q", "-m", "c0"]);
    let c0 = git(root, &["rev-parse", "HEAD"]);

    // c1, tagged v1: its run is squashed.
    std::fs::write(root.join("version.txt"), "1").unwrap();
    git(root, &["commit", "-q", "-am", "c1"]);
    git(root, &["tag", "v1"]);
    let c1 = git(root, &["rev-parse", "HEAD"]);
    let (tagged, stderr) = run(&st, &wf, &[]);
    assert_eq!(probe(&tagged).0, "none");
    assert!(tagged["jobs"][0]["squashed_base"].is_null());
    assert!(
        stderr.contains("udos: squashed job build at tag v1 into base "),
        "{stderr}"
    );
    let rows = squashed_rows(&st);
    assert_eq!(rows.len(), 1, "{rows:?}");
    let (id, commit, base, job, tags, run_id, snapshot) = rows[0].clone();
    assert_eq!(
        (commit.as_str(), base.as_str(), job.as_str(), tags.as_str()),
        (c1.as_str(), "minimal", "build", "v1")
    );
    assert_eq!(run_id, tagged["run_id"].as_i64().unwrap());
    let base_dir = st.join("images/base").join(&id);
    assert!(base_dir.join("base.erofs").is_file());
    assert_eq!(
        std::fs::read_to_string(base_dir.join("tree/opt/tool/version")).unwrap(),
        "1"
    );
    assert!(
        !base_dir.join("tree/workspace").exists(),
        "the squashed base holds no workspace"
    );
    let snaps = squash_snapshots(&st);
    assert_eq!(snaps.len(), 1, "{snaps:?}");
    assert_eq!(snaps[0]["id"], snapshot.as_str());
    let stags: Vec<&str> = snaps[0]["tags"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_str().unwrap())
        .collect();
    for t in [
        "kind=base",
        "base=minimal",
        "tag=v1",
        "job=build",
        &format!("commit={c1}"),
        &format!("run={run_id}"),
    ] {
        assert!(stags.contains(&t), "{t} not in {stags:?}");
    }

    // c2 on top of it: old.txt deleted, a new version.
    std::fs::remove_file(root.join("old.txt")).unwrap();
    std::fs::write(root.join("version.txt"), "2").unwrap();
    git(root, &["commit", "-q", "-am", "c2"]);
    // --no-squash: the plain base (and a cache entry made on it).
    let (plain, _) = run(&st, &wf, &["--no-squash"]);
    assert_eq!(probe(&plain).0, "none");
    assert!(plain["jobs"][0]["squashed_base"].is_null());
    // By default: the squashed base of v1, which the plain base's cache entry does not fit.
    let (on_squashed, stderr) = run(&st, &wf, &[]);
    assert_eq!(
        probe(&on_squashed),
        ("1".to_string(), "absent".to_string(), "absent".to_string()),
        "the step sees the tool v1 installed, and no workspace of v1's run"
    );
    assert_eq!(on_squashed["jobs"][0]["steps"][0]["cached"], false);
    let sb = &on_squashed["jobs"][0]["squashed_base"];
    assert_eq!(sb["id"], id.as_str(), "{on_squashed:#}");
    assert_eq!(sb["tag"], "v1");
    assert_eq!(sb["commit"], c1.as_str());
    assert_eq!(sb["run"], run_id);
    assert_eq!(on_squashed["jobs"][0]["base"], "minimal");
    assert!(on_squashed["inputs"]
        .as_array()
        .unwrap()
        .iter()
        .any(|i| i["kind"] == "base" && i["layer_id"] == id.as_str()));
    assert!(
        stderr.contains("starting from the squashed base"),
        "{stderr}"
    );
    assert_eq!(on_squashed["jobs"][0]["base_layer"], id.as_str());
    assert_ne!(plain["jobs"][0]["base_layer"], id.as_str());
    assert!(plain["jobs"][0]["base_layer"].is_string(), "{plain:#}");
    // Its restore point stacks the squashed base only (the run's inputs also name the
    // plain one): the base file the tagged run changed is as the step saw it.
    let scratch = tempfile::tempdir().unwrap();
    let target = scratch.path().join("root");
    let run_id_s = on_squashed["run_id"].as_i64().unwrap().to_string();
    let out = udos_in(
        &st,
        &[
            "restore",
            &run_id_s,
            "1",
            "--target",
            target.to_str().unwrap(),
        ],
    );
    assert!(out.status.success());
    let shells = std::fs::read_to_string(target.join("etc/shells")).unwrap();
    assert!(shells.contains("/opt/tool/sh"), "{shells}");
    assert_eq!(
        std::fs::read_to_string(target.join("opt/tool/version")).unwrap(),
        "2"
    );
    assert_eq!(
        squashed_rows(&st).len(),
        1,
        "an untagged run squashes nothing"
    );

    // A branch from before the tag does not descend from it.
    git(root, &["checkout", "-q", "-b", "side", &c0]);
    std::fs::write(root.join("version.txt"), "side").unwrap();
    git(root, &["commit", "-q", "-am", "side"]);
    let (side, _) = run(&st, &wf, &[]);
    assert_eq!(probe(&side).0, "none");
    assert!(side["jobs"][0]["squashed_base"].is_null());
    let side_id = side["run_id"].as_i64().unwrap().to_string();

    // gc keeps the squashed base while v1 names its commit, though only the side
    // run is kept and it never used the base.
    let out = udos_in(&st, &["gc", "--keep-last", "1", "--json"]);
    assert!(out.status.success());
    let report = json(&out);
    assert_eq!(report["kept_runs"][0]["run_id"].to_string(), side_id);
    assert!(base_dir.join("base.erofs").is_file());
    assert_eq!(squash_snapshots(&st).len(), 1);
    assert_eq!(squashed_rows(&st).len(), 1);
    assert!(report["notes"].as_array().unwrap().iter().any(|n| n
        .as_str()
        .unwrap()
        .contains("tag v1 still names its commit")));

    // Without the tag, gc frees it: a dry run says so, a real one does it.
    git(root, &["tag", "-d", "v1"]);
    let out = udos_in(&st, &["gc", "--keep-last", "1", "--dry-run", "--json"]);
    assert!(out.status.success());
    let dry = json(&out);
    assert!(dry["freed"]
        .as_array()
        .unwrap()
        .iter()
        .any(|f| f["what"] == "squashed-base" && f["id"] == id.as_str()));
    assert!(base_dir.is_dir(), "a dry run changes nothing");
    let out = udos_in(&st, &["gc", "--keep-last", "1", "--json"]);
    assert!(out.status.success());
    assert!(!base_dir.exists());
    assert!(squash_snapshots(&st).is_empty());
    assert!(squashed_rows(&st).is_empty());
    let _ = std::fs::remove_dir_all(&st);
}
