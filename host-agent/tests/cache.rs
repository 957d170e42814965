//! The step cache end to end, in real VMs (QEMU; TCG here): an unchanged rerun boots
//! no VM; a change to a file no step reads reruns nothing; a change to a file step 3
//! reads reruns steps 3 onwards only; `--no-cache` reruns all; a cached step's layer
//! restores as before. Needs what e2e.rs needs (scripts/test provides it).

use std::path::Path;

use serde_json::Value;

mod common;
use common::{commit_all, json, repo, serial, udos};

const FIVE: &str = r#"
on: push
jobs:
  five:
    runs-on: ubuntu-latest
    steps:
      - run: echo one > out1.txt
      - run: cat a.txt > out2.txt
      - run: cat b.txt > out3.txt
      - run: cat out1.txt out2.txt out3.txt > all.txt
      - run: grep -q one all.txt
"#;

/// Whether each step of the only leg was reused (`cached`, which says the same as a
/// `cached_from`).
fn cached(report: &Value) -> Vec<bool> {
    report["jobs"][0]["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            let cached = s["cached"].as_bool().expect("`cached` is a boolean");
            assert_eq!(cached, !s["cached_from"].is_null(), "{s:#}");
            cached
        })
        .collect()
}

/// `udos run --hypervisor qemu --json --no-console EXTRA WF`, which must succeed; its
/// report.
fn run_ok(wf: &Path, extra: &[&str]) -> Value {
    let mut args = vec!["run", "--hypervisor", "qemu", "--json", "--no-console"];
    args.extend_from_slice(extra);
    args.push(wf.to_str().unwrap());
    let out = udos(&args);
    let report = json(&out);
    assert_eq!(out.status.code(), Some(0), "{report:#}");
    report
}

fn ran_vm(report: &Value) -> usize {
    report["jobs"][0]["steps"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s["phases_ms"].get("vm").is_some())
        .count()
}

#[test]
fn unchanged_steps_are_reused_and_changed_reads_rerun_from_there() {
    let _g = serial();
    let (dir, wf) = repo(
        FIVE,
        &[("a.txt", "A"), ("b.txt", "B"), ("unrelated.txt", "u1")],
    );
    let run = |extra: &[&str]| run_ok(&wf, extra);
    let first = run(&[]);
    assert_eq!(cached(&first), [false; 5]);
    assert_eq!(ran_vm(&first), 5);
    assert_eq!(first["vms_booted"], 5);

    let again = run(&[]);
    assert_eq!(
        cached(&again),
        [true; 5],
        "an unchanged rerun reuses every step"
    );
    assert_eq!(ran_vm(&again), 0, "and boots no VM");
    assert_eq!(again["vms_booted"], 0);
    let steps = again["jobs"][0]["steps"].as_array().unwrap();
    assert_eq!(steps[2]["cached_from"]["run_id"], first["run_id"]);
    assert!(steps.iter().all(|s| s["status"] == "success"));

    // A file no step reads: nothing reruns (a new commit, too).
    std::fs::write(dir.path().join("unrelated.txt"), "u2").unwrap();
    commit_all(dir.path());
    let unrelated = run(&[]);
    assert_eq!(cached(&unrelated), [true; 5]);

    // A file step 3 reads: steps 1 and 2 are reused, 3 to 5 run.
    std::fs::write(dir.path().join("b.txt"), "B2").unwrap();
    let changed = run(&[]);
    assert_eq!(cached(&changed), [true, true, false, false, false]);
    assert_eq!(ran_vm(&changed), 3);

    // --no-cache runs everything.
    let forced = run(&["--no-cache"]);
    assert_eq!(cached(&forced), [false; 5]);
    assert_eq!(ran_vm(&forced), 5);

    // A cached step's layer restores as before.
    let run_id = again["run_id"].as_i64().unwrap().to_string();
    let t = tempfile::tempdir().unwrap();
    let target = t.path().join("root");
    let out = udos(&[
        "restore",
        &run_id,
        "3",
        "--target",
        target.to_str().unwrap(),
    ]);
    assert!(out.status.success());
    assert_eq!(
        std::fs::read_to_string(target.join("workspace/out3.txt")).unwrap(),
        "B"
    );
    assert_eq!(
        std::fs::read_to_string(target.join("workspace/out1.txt")).unwrap(),
        "one\n"
    );
}

/// A step that opts out is never reused.
#[test]
fn a_step_that_opts_out_always_runs() {
    let _g = serial();
    let (_dir, wf) = repo(
        "on: push\njobs:\n  j:\n    runs-on: ubuntu-latest\n    steps:\n      - run: date > now.txt\n        env: { UDOS_CACHE: 'false' }\n",
        &[],
    );
    for _ in 0..2 {
        assert_eq!(cached(&run_ok(&wf, &[])), [false]);
    }
}

/// A step that looks for a file and finds nothing opens nothing (`[ -f extra.txt ]`
/// is a `stat`), but the workspace root's listing is part of what it read: the file
/// appearing there reruns it. A file added in a directory no step looked in does not.
#[test]
fn a_file_appearing_where_a_step_looked_for_it_reruns_the_step() {
    let _g = serial();
    let (dir, wf) = repo(
        r#"
on: push
jobs:
  probe:
    runs-on: ubuntu-latest
    steps:
      - id: probe
        run: |
          if [ -f extra.txt ]; then seen=yes; else seen=no; fi
          echo "extra=$seen" >> "$GITHUB_OUTPUT"
"#,
        &[("docs/a.md", "a")],
    );
    let run = || {
        let report = run_ok(&wf, &[]);
        let step = &report["jobs"][0]["steps"][0];
        (cached(&report)[0], step["outputs"]["extra"].clone())
    };
    assert_eq!(run(), (false, "no".into()));
    assert_eq!(run(), (true, "no".into()), "unchanged: reused");
    std::fs::write(dir.path().join("docs/b.md"), "b").unwrap();
    assert_eq!(run(), (true, "no".into()), "docs/ was never looked in");
    std::fs::write(dir.path().join("extra.txt"), "x").unwrap();
    assert_eq!(
        run(),
        (false, "yes".into()),
        "extra.txt appeared where the step looked for it"
    );
}
