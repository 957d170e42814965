//! `udos run --per job` end to end, in real VMs (QEMU; TCG here): the same workflow
//! run once with a VM per step and once with a VM per job gives the same outcomes,
//! conclusions, outputs and exit codes per step; job mode boots one VM for the job,
//! and the job's one layer restores with what its steps wrote. Needs what e2e.rs
//! needs (scripts/test provides it; UDOS_DEFAULT_BASE=minimal for speed).

use serde_json::Value;

mod common;
use common::{json, repo, serial, udos};

/// Outputs between steps, `$GITHUB_ENV`, a file from step 1 read by step 2, a masked
/// secret, a failing step, then `failure()` / `always()` / a skipped step, and a step
/// that overruns its `timeout-minutes` (the guest stops it; the job VM goes on).
const WORKFLOW: &str = r#"
on: push
jobs:
  chain:
    runs-on: ubuntu-latest
    steps:
      - id: first
        run: |
          echo hello > made.txt
          echo "greeting=hi there" >> "$GITHUB_OUTPUT"
          echo "CARRIED=from-env" >> "$GITHUB_ENV"
      - id: second
        run: |
          test "$(cat made.txt)" = hello
          test "$CARRIED" = from-env
          echo "seen=${{ steps.first.outputs.greeting }}" >> "$GITHUB_OUTPUT"
          echo second > second.txt
      - id: secret
        env:
          TOKEN: ${{ secrets.TOKEN }}
        run: |
          test "$TOKEN" = s3cret-value
          echo "token is $TOKEN"
          echo "leak=$TOKEN" >> "$GITHUB_OUTPUT"
      - id: fails
        run: |
          echo doomed > doomed.txt
          exit 3
      - id: skipped
        run: echo never > never.txt
      - id: on-failure
        if: failure()
        run: echo "${{ steps.second.outputs.seen }}" > recovered.txt
      - id: always
        if: always()
        run: rm second.txt
      - id: overrun
        if: always()
        timeout-minutes: 0.1
        run: |
          echo started > overrun.txt
          sleep 120
"#;

/// (id, outcome, conclusion, exit code, outputs, error) of each step of the only job.
fn steps(report: &Value) -> Vec<(Value, Value, Value, Value, Value, Value)> {
    report["jobs"][0]["steps"]
        .as_array()
        .expect("steps")
        .iter()
        .map(|s| {
            (
                s["id"].clone(),
                s["outcome"].clone(),
                s["conclusion"].clone(),
                s["exit_code"].clone(),
                s["outputs"].clone(),
                s["error"].clone(),
            )
        })
        .collect()
}

fn run(per: &str, wf: &str) -> (Option<i32>, Value) {
    run_with(per, wf, &[])
}

fn run_with(per: &str, wf: &str, extra: &[&str]) -> (Option<i32>, Value) {
    let args = [
        "run",
        "--hypervisor",
        "qemu",
        "--per",
        per,
        "--no-cache",
        "--json",
        "--no-console",
        "-s",
        "TOKEN=s3cret-value",
    ];
    let out = udos(&[&args[..], extra, &[wf]].concat());
    (out.status.code(), json(&out))
}

#[test]
fn per_job_gives_the_outcomes_of_per_step_in_one_vm_with_one_restore_point() {
    let _g = serial();
    let (_dir, wf) = repo(WORKFLOW, &[]);
    let wf = wf.to_str().unwrap();

    let (code_step, by_step) = run("step", wf);
    let (code_job, by_job) = run("job", wf);
    assert_eq!(code_step, Some(1), "{by_step:#}");
    assert_eq!(code_job, code_step, "{by_job:#}");
    assert_eq!(steps(&by_job), steps(&by_step), "{by_job:#}");
    assert_eq!(
        by_job["jobs"][0]["conclusion"],
        by_step["jobs"][0]["conclusion"]
    );

    // What the comparison covers, said outright.
    let s = steps(&by_job);
    let outcomes: Vec<&str> = s.iter().map(|x| x.1.as_str().unwrap()).collect();
    assert_eq!(
        outcomes,
        ["success", "success", "success", "failure", "skipped", "success", "success", "failure"]
    );
    assert_eq!(s[1].4["seen"], "hi there");
    assert_eq!(s[3].3, 3, "the failing step's exit code");
    assert_eq!(s[2].4["leak"], "***", "the secret is masked in outputs");
    assert!(!by_job.to_string().contains("s3cret-value"));

    // One VM for the job; one per step that ran with --per step.
    assert_eq!(by_step["vms_booted"], 7, "{by_step:#}");
    assert_eq!(by_job["vms_booted"], 1, "{by_job:#}");

    // The job's one layer is on its last step, and restores with what the steps wrote.
    let job_steps = by_job["jobs"][0]["steps"].as_array().unwrap();
    let with_layer: Vec<&Value> = job_steps
        .iter()
        .filter(|s| !s["layer_id"].is_null())
        .collect();
    assert_eq!(with_layer.len(), 1, "{by_job:#}");
    assert_eq!(with_layer[0]["number"], 8);
    assert!(with_layer[0]["snapshot_id"].is_string(), "{by_job:#}");

    let run_id = by_job["run_id"].as_i64().unwrap().to_string();
    let target = tempfile::tempdir().unwrap();
    let root = target.path().join("root");
    let out = udos(&["restore", &run_id, "8", "--target", root.to_str().unwrap()]);
    assert!(out.status.success());
    let ws = root.join("workspace");
    let read = |p: &str| std::fs::read_to_string(ws.join(p)).unwrap_or_default();
    assert_eq!(read("made.txt"), "hello\n");
    assert_eq!(read("doomed.txt"), "doomed\n");
    assert_eq!(read("recovered.txt"), "hi there\n");
    assert!(!ws.join("second.txt").exists(), "step 7 deleted it");
    assert!(!ws.join("never.txt").exists());
    assert_eq!(read("overrun.txt"), "started\n");
    assert!(
        !root.join(".actrc").exists() && !root.join(".udos").exists(),
        "no control files in the layer"
    );
}

/// The job's deadline stops the job VM mid-step, as it stops a step VM; the
/// `always()` step after it runs in a new job VM, from the job's inputs.
const DEADLINE: &str = r#"
on: push
jobs:
  late:
    runs-on: ubuntu-latest
    timeout-minutes: 0.25
    steps:
      - run: echo one > one.txt
      - run: sleep 300
      - if: always()
        run: echo cleanup > cleanup.txt
"#;

#[test]
fn the_jobs_deadline_stops_the_job_vm_and_always_steps_get_a_new_one() {
    let _g = serial();
    let (_dir, wf) = repo(DEADLINE, &[]);
    let wf = wf.to_str().unwrap();

    let (code_step, by_step) = run("step", wf);
    let (code_job, by_job) = run("job", wf);
    assert_eq!(code_job, code_step, "{by_job:#}");
    assert_eq!(steps(&by_job), steps(&by_step), "{by_job:#}");
    assert_eq!(
        by_job["jobs"][0]["conclusion"],
        by_step["jobs"][0]["conclusion"]
    );
    let outcomes: Vec<Value> = steps(&by_job).into_iter().map(|s| s.1).collect();
    assert_eq!(outcomes, ["success", "cancelled", "success"], "{by_job:#}");
    assert_eq!(by_job["vms_booted"], 2, "{by_job:#}");

    // The second VM's layer, on step 3: the first VM's work went with it.
    let run_id = by_job["run_id"].as_i64().unwrap().to_string();
    let target = tempfile::tempdir().unwrap();
    let root = target.path().join("root");
    let out = udos(&["restore", &run_id, "3", "--target", root.to_str().unwrap()]);
    assert!(out.status.success());
    assert!(root.join("workspace/cleanup.txt").is_file());
    assert!(!root.join("workspace/one.txt").exists());
}

/// Several jobs: needs and job outputs, a matrix, a local composite action that reads
/// the workspace, an action of another repository (its tree, with an executable,
/// travels in the step message), legs that never see each other's files.
const GRAPH: &str = r#"
on: push
jobs:
  left:
    runs-on: ubuntu-latest
    outputs:
      word: ${{ steps.greet.outputs.greeting }}
    steps:
      - run: echo left > from-left.txt
      - id: greet
        uses: ./.github/actions/greet
        with:
          who: left-${{ github.event_name }}
      - run: test "$(cat from-left.txt)" = left
      - id: remote
        uses: acme/say@v1
      - run: test "${{ steps.remote.outputs.said }}" = remote-ok
  matrix:
    runs-on: ubuntu-latest
    strategy:
      matrix:
        os: [ubuntu, debian]
    outputs:
      leg: ${{ steps.m.outputs.leg }}
    steps:
      - id: m
        run: echo "leg=${{ matrix.os }}" >> "$GITHUB_OUTPUT"
  join:
    needs: [left, matrix]
    runs-on: ubuntu-latest
    steps:
      - run: |
          test "${{ needs.left.outputs.word }}" = "hello left-push"
          test -n "${{ needs.matrix.outputs.leg }}"
          test ! -e from-left.txt
"#;

const GREET: &str = r#"
name: greet
inputs:
  who:
    required: true
outputs:
  greeting:
    value: ${{ steps.g.outputs.greeting }}
runs:
  using: composite
  steps:
    - id: g
      shell: sh
      run: |
        test -f data/seed.txt
        echo "greeting=hello ${{ inputs.who }}" >> "$GITHUB_OUTPUT"
"#;

/// An action of another repository (`--local-repository`): it runs a script of its
/// own tree.
const SAY: &str = r#"
name: say
outputs:
  said:
    value: ${{ steps.s.outputs.said }}
runs:
  using: composite
  steps:
    - id: s
      shell: sh
      run: echo "said=$(${{ github.action_path }}/say.sh)" >> "$GITHUB_OUTPUT"
"#;

/// Each job leg's (id, matrix, conclusion, outputs, steps), in a stable order.
fn legs(report: &Value) -> Vec<Value> {
    let mut legs: Vec<Value> = report["jobs"]
        .as_array()
        .expect("jobs")
        .iter()
        .map(|j| {
            let one = serde_json::json!({ "jobs": [j] });
            serde_json::json!([
                j["id"],
                j["matrix"],
                j["conclusion"],
                j["outputs"],
                format!("{:?}", steps(&one)),
            ])
        })
        .collect();
    legs.sort_by_key(|l| l.to_string());
    legs
}

#[test]
fn several_jobs_with_needs_a_matrix_and_actions_agree_per_job() {
    let _g = serial();
    let (_dir, wf) = repo(
        GRAPH,
        &[
            ("data/seed.txt", "42"),
            (".github/actions/greet/action.yml", GREET),
        ],
    );
    let wf = wf.to_str().unwrap();
    let say = tempfile::tempdir().unwrap();
    std::fs::write(say.path().join("action.yml"), SAY).unwrap();
    std::fs::write(say.path().join("say.sh"), "#!/bin/sh\necho remote-ok\n").unwrap();
    std::fs::set_permissions(
        say.path().join("say.sh"),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let flag = format!("acme/say@v1={}", say.path().display());
    let extra = ["--network", "none", "--local-repository", &flag];
    let (code_step, by_step) = run_with("step", wf, &extra);
    let (code_job, by_job) = run_with("job", wf, &extra);
    assert_eq!(code_step, Some(0), "{by_step:#}");
    assert_eq!(code_job, code_step, "{by_job:#}");
    assert_eq!(legs(&by_job), legs(&by_step), "{by_job:#}");
    assert_eq!(legs(&by_job).len(), 4);
    // One VM per leg: left, two matrix legs, join.
    assert_eq!(by_job["vms_booted"], 4, "{by_job:#}");
    assert_eq!(by_step["vms_booted"], 8, "{by_step:#}");
}
