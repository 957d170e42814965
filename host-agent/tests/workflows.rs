//! Whole workflows end to end, in real VMs (QEMU; TCG here): several jobs, needs and
//! outputs, a matrix with include and exclude, a local composite action, a reusable
//! workflow, workflow_dispatch with inputs and a payload, secrets, timeouts, and a
//! long job. Needs what e2e.rs needs (scripts/test provides it).

use std::path::Path;

use serde_json::Value;

mod common;
use common::{json, repo, serial, state_dir, udos};

fn jobs(report: &Value) -> Vec<Value> {
    report["jobs"].as_array().expect("jobs[]").clone()
}

fn job<'a>(jobs: &'a [Value], id: &str) -> Vec<&'a Value> {
    jobs.iter().filter(|j| j["id"] == id).collect()
}

const GRAPH: &str = r#"
name: graph
on: push
jobs:
  left:
    runs-on: ubuntu-latest
    outputs:
      word: ${{ steps.w.outputs.word }}
    steps:
      - id: w
        run: |
          echo "word=left-$(cat data/seed.txt)" >> "$GITHUB_OUTPUT"
          echo left > from-left.txt
      - name: skipped by its own if
        if: github.event_name == 'pull_request'
        run: exit 1
      - id: greet
        uses: ./.github/actions/greet
        with:
          who: ${{ steps.w.outputs.word }}
      - run: test "${{ steps.greet.outputs.greeting }}" = "hello left-42"
  right:
    runs-on: ubuntu-latest
    outputs:
      r: ${{ steps.r.outputs.r }}
    steps:
      - id: r
        run: echo "r=right" >> "$GITHUB_OUTPUT"
  matrix:
    runs-on: ubuntu-latest
    strategy:
      matrix:
        os: [ubuntu, debian, alpine]
        v: [1]
        exclude:
          - os: alpine
        include:
          - os: fedora
            v: 2
    outputs:
      leg: ${{ steps.m.outputs.leg }}
    steps:
      - id: m
        run: echo "leg=${{ matrix.os }}-${{ matrix.v }}" >> "$GITHUB_OUTPUT"
  join:
    needs: [left, right, matrix]
    runs-on: ubuntu-latest
    steps:
      - run: |
          test "${{ needs.left.outputs.word }}" = left-42
          test "${{ needs.right.outputs.r }}" = right
          test "${{ needs.left.result }}" = success
          test "${{ needs.matrix.result }}" = success
          test -n "${{ needs.matrix.outputs.leg }}"
          # Legs never see each other's layers.
          test ! -e from-left.txt
  cleanup:
    needs: join
    if: failure()
    runs-on: ubuntu-latest
    steps:
      - run: exit 1
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
        # A composite action runs in the workspace, as on GitHub.
        test -f data/seed.txt
        echo "greeting=hello ${{ inputs.who }}" >> "$GITHUB_OUTPUT"
"#;

#[test]
fn jobs_run_by_needs_with_a_matrix_outputs_and_a_local_action() {
    let _g = serial();
    let (_dir, wf) = repo(
        GRAPH,
        &[
            ("data/seed.txt", "42"),
            (".github/actions/greet/action.yml", GREET),
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
    assert_eq!(out.status.code(), Some(0), "{report:#}");
    assert_eq!(report["status"], "success");
    let jobs = jobs(&report);
    // One entry per leg: left, right, three matrix legs, join, cleanup.
    assert_eq!(jobs.len(), 7, "{report:#}");
    let left = job(&jobs, "left")[0];
    assert_eq!(left["status"], "success");
    assert_eq!(left["outputs"]["word"], "left-42");
    let steps = left["steps"].as_array().unwrap();
    assert_eq!(
        steps[1]["status"], "skipped",
        "skipped by its own if: {left:#}"
    );
    assert!(steps[1]["phases_ms"].get("vm").is_none(), "no VM for it");
    assert_eq!(steps[2]["outputs"]["greeting"], "hello left-42");
    let legs = job(&jobs, "matrix");
    let mut seen: Vec<String> = legs
        .iter()
        .map(|l| {
            format!(
                "{}-{}",
                l["matrix"]["os"].as_str().unwrap(),
                l["matrix"]["v"]
            )
        })
        .collect();
    seen.sort();
    assert_eq!(
        seen,
        ["debian-1", "fedora-2", "ubuntu-1"],
        "exclude and include"
    );
    assert!(legs.iter().all(|l| l["status"] == "success"));
    assert_eq!(job(&jobs, "join")[0]["status"], "success");
    let cleanup = job(&jobs, "cleanup")[0];
    assert_eq!(cleanup["status"], "skipped");
    assert!(cleanup["steps"].as_array().unwrap().is_empty());
    // Each leg is a chain of its own restore points.
    let run = report["run_id"].as_i64().unwrap().to_string();
    let t = tempfile::tempdir().unwrap();
    let target = t.path().join("left-1");
    let r = udos(&[
        "restore",
        &run,
        "1",
        "--job",
        "left",
        "--target",
        target.to_str().unwrap(),
    ]);
    assert!(r.status.success());
    assert!(target.join("workspace/from-left.txt").is_file());
    let r = udos(&[
        "restore",
        &run,
        "1",
        "--target",
        t.path().join("x").to_str().unwrap(),
    ]);
    assert_ne!(r.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&r.stderr).contains("--job"));
}

const DISPATCH: &str = r#"
on:
  workflow_dispatch:
    inputs:
      level:
        type: choice
        options: [low, high]
        required: true
      count:
        type: number
        default: 2
jobs:
  call:
    uses: ./.github/workflows/reusable.yml
    with:
      level: ${{ inputs.level }}
      count: ${{ inputs.count }}
  use:
    needs: call
    runs-on: ubuntu-latest
    steps:
      - run: |
          test "${{ needs.call.outputs.echoed }}" = "high-3"
          test "${{ github.event.custom }}" = from-payload
          test "${{ github.event_name }}" = workflow_dispatch
          test "$GITHUB_EVENT_NAME" = workflow_dispatch
          grep -q from-payload "$GITHUB_EVENT_PATH"
"#;

const REUSABLE: &str = r#"
on:
  workflow_call:
    inputs:
      level:
        type: string
        required: true
      count:
        type: number
    outputs:
      echoed:
        value: ${{ jobs.inner.outputs.e }}
jobs:
  inner:
    runs-on: ubuntu-latest
    outputs:
      e: ${{ steps.s.outputs.e }}
    steps:
      - id: s
        run: echo "e=${{ inputs.level }}-${{ inputs.count }}" >> "$GITHUB_OUTPUT"
"#;

#[test]
fn workflow_dispatch_with_inputs_a_payload_and_a_reusable_workflow() {
    let _g = serial();
    let (dir, wf) = repo(DISPATCH, &[(".github/workflows/reusable.yml", REUSABLE)]);
    let payload = dir.path().join("payload.json");
    std::fs::write(&payload, r#"{"custom": "from-payload"}"#).unwrap();
    // A required input missing: a setup error before anything runs.
    let out = udos(&["run", "workflow_dispatch", "-W", wf.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("level"));
    let out = udos(&[
        "run",
        "workflow_dispatch",
        "-W",
        wf.to_str().unwrap(),
        "--input",
        "level=high",
        "--input",
        "count=3",
        "-e",
        payload.to_str().unwrap(),
        "--hypervisor",
        "qemu",
        "--json",
    ]);
    let report = json(&out);
    assert_eq!(out.status.code(), Some(0), "{report:#}");
    assert_eq!(report["event"], "workflow_dispatch");
    let jobs = jobs(&report);
    let inner = job(&jobs, "call/inner");
    assert_eq!(inner.len(), 1, "{report:#}");
    assert_eq!(inner[0]["outputs"]["e"], "high-3");
    assert_eq!(job(&jobs, "call")[0]["outputs"]["echoed"], "high-3");
    assert_eq!(job(&jobs, "use")[0]["status"], "success");
}

const SECRETS: &str = r###"
on: push
jobs:
  s:
    runs-on: ubuntu-latest
    env:
      TOKEN: ${{ secrets.TOKEN }}
    steps:
      - id: a
        run: |
          echo "token is $TOKEN"
          echo "inline ${{ secrets.TOKEN }}"
          test "$TOKEN" = "${{ secrets.TOKEN }}"
          printf '%s\n' "${{ secrets.MULTI }}"
          echo "::add-mask::runtime-mask-4321"
          echo "runtime-mask-4321 printed"
          echo "mv=runtime-mask-4321" >> "$GITHUB_OUTPUT"
          echo "## summary" >> "$GITHUB_STEP_SUMMARY"
      - run: echo "again ${{ steps.a.outputs.mv }} $TOKEN"
"###;

/// Files under `dir` (recursively, not following links) whose bytes contain `needle`.
fn files_containing(dir: &Path, needle: &[u8]) -> Vec<String> {
    let finder = memchr::memmem::Finder::new(needle);
    let mut hits = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            let p = e.path();
            let Ok(md) = p.symlink_metadata() else {
                continue;
            };
            if md.is_dir() {
                todo.push(p);
            } else if md.is_file() {
                if let Ok(bytes) = std::fs::read(&p) {
                    if finder.find(&bytes).is_some() {
                        hits.push(p.display().to_string());
                    }
                }
            }
        }
    }
    hits
}

#[test]
fn secrets_are_masked_and_never_stored() {
    let _g = serial();
    let (_dir, wf) = repo(SECRETS, &[]);
    // Unique per run: the state dir is shared with earlier runs of the tests.
    let nonce = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    let secret = format!("udos-sekrit-{nonce}");
    let multi_line = format!("second-sekrit-line-{nonce}");
    let (secret, multi_line) = (secret.as_str(), multi_line.as_str());
    // Outside the repository: the workspace is the working tree.
    let elsewhere = tempfile::tempdir().unwrap();
    let secret_file = elsewhere.path().join("secrets.env");
    std::fs::write(
        &secret_file,
        format!("MULTI=\"first-line\n{multi_line}\"\n"),
    )
    .unwrap();
    let out = udos(&[
        "run",
        "--hypervisor",
        "qemu",
        "--json",
        "--secret",
        &format!("TOKEN={secret}"),
        "--secret-file",
        secret_file.to_str().unwrap(),
        wf.to_str().unwrap(),
    ]);
    let report = json(&out);
    assert_eq!(out.status.code(), Some(0), "{report:#}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    for (what, text) in [("report", &stdout), ("console", &stderr)] {
        assert!(!text.contains(secret), "the secret is in the {what}");
        assert!(
            !text.contains(multi_line),
            "a multi-line secret's line is in the {what}"
        );
    }
    assert!(stderr.contains("token is ***"), "masked on the console");
    assert!(
        !stderr.contains("runtime-mask-4321 printed"),
        "add-mask masks what follows"
    );
    let steps = report["jobs"][0]["steps"].as_array().unwrap();
    assert_eq!(steps[0]["outputs"]["mv"], "***");
    assert!(steps[0]["summary"].as_str().unwrap().contains("## summary"));

    // Nowhere in the state dir (layers, console logs, control layers, SQLite)...
    let state = state_dir();
    for needle in [secret, multi_line] {
        let hits = files_containing(&state, needle.as_bytes());
        assert!(hits.is_empty(), "{needle} found in {hits:?}");
    }
    // ...nor in any restore point of the run.
    let run = report["run_id"].as_i64().unwrap().to_string();
    for step in ["1", "2"] {
        let t = tempfile::tempdir().unwrap();
        let target = t.path().join("root");
        let r = udos(&["restore", &run, step, "--target", target.to_str().unwrap()]);
        assert!(r.status.success());
        for needle in [secret, multi_line] {
            let hits = files_containing(&target, needle.as_bytes());
            assert!(hits.is_empty(), "{needle} restored in {hits:?}");
        }
    }
}

const TIMEOUT: &str = r#"
on: push
jobs:
  slow:
    runs-on: ubuntu-latest
    timeout-minutes: 0.4
    steps:
      - run: sleep 600
      - if: always()
        run: echo cleaned > cleaned.txt
"#;

#[test]
fn a_job_past_its_timeout_is_stopped_and_its_always_steps_run() {
    let _g = serial();
    let (_dir, wf) = repo(TIMEOUT, &[]);
    let out = udos(&[
        "run",
        "--hypervisor",
        "qemu",
        "--json",
        wf.to_str().unwrap(),
    ]);
    let report = json(&out);
    assert_eq!(out.status.code(), Some(1), "{report:#}");
    let slow = &report["jobs"][0];
    assert_eq!(slow["status"], "cancelled", "{slow:#}");
    assert!(
        slow["error"].as_str().unwrap().contains("timed out"),
        "{slow:#}"
    );
    let steps = slow["steps"].as_array().unwrap();
    assert_ne!(steps[0]["status"], "success");
    assert_eq!(
        steps[1]["status"], "success",
        "always() runs after the timeout"
    );
}

#[test]
fn a_job_of_40_steps_runs_with_a_bounded_number_of_disks() {
    let _g = serial();
    let mut wf = String::from("on: push\njobs:\n  long:\n    runs-on: ubuntu-latest\n    steps:\n");
    for i in 1..=39 {
        wf.push_str(&format!(
            "      - run: echo {i} > step-{i}.txt && rm -f step-{}.gone\n",
            i.max(2) - 1
        ));
    }
    wf.push_str(
        "      - run: |\n          test \"$(ls step-*.txt | wc -l)\" = 39\n          test \"$(cat step-1.txt step-39.txt)\" = \"$(printf '1\\n39')\"\n          ls /sys/block | grep -c vd > /tmp/disks\n          test \"$(cat /tmp/disks)\" -le 16\n",
    );
    let (_dir, path) = repo(&wf, &[]);
    let out = udos(&[
        "run",
        "--hypervisor",
        "qemu",
        "--json",
        "--no-console",
        path.to_str().unwrap(),
    ]);
    let report = json(&out);
    assert_eq!(out.status.code(), Some(0), "{report:#}");
    let steps = report["jobs"][0]["steps"].as_array().unwrap();
    assert_eq!(steps.len(), 40);
    assert!(steps.iter().all(|s| s["status"] == "success"));
}

const ON_MAIN: &str = r#"
name: on-main
on:
  push:
    branches: [main]
    paths: ["src/**"]
jobs:
  build:
    runs-on: ubuntu-latest
    steps:
      - run: echo build
  test:
    needs: build
    runs-on: ubuntu-latest
    concurrency: ci
    steps:
      - uses: actions/checkout@v4
      - run: echo test
"#;

const ON_PR: &str = r#"
name: on-pr
on: pull_request
jobs:
  lint:
    runs-on: ubuntu-latest
    steps:
      - run: echo lint
"#;

/// `-l` and `-n` decide on the host, boot nothing and record no run; the event and
/// the `on:` filters pick the workflows.
#[test]
fn list_and_dry_run_show_what_the_event_runs_and_boot_nothing() {
    // Not for the VMs: so that no other test's run lands between the two counts.
    let _g = serial();
    let (dir, _wf) = repo(
        ON_MAIN,
        &[(".github/workflows/pr.yml", ON_PR), ("src/a.rs", "x")],
    );
    let root = dir.path();
    let workflows = root.join(".github/workflows");
    let w = workflows.to_str().unwrap();
    let runs_before = json(&udos(&["runs", "--json"])).as_array().map(Vec::len);
    // The test repo's branch is git's default; make it `main` for the filter.
    let branch = std::process::Command::new("git")
        .args(["branch", "-M", "main"])
        .current_dir(root)
        .status()
        .unwrap();
    assert!(branch.success());

    let out = udos(&["run", "-l", "-W", w]);
    assert_eq!(out.status.code(), Some(0));
    let list = String::from_utf8_lossy(&out.stdout);
    assert!(list.contains("build") && list.contains("test"), "{list}");
    assert!(
        !list.contains("lint"),
        "pull_request is not the event: {list}"
    );
    let stage_of = |job: &str| {
        list.lines()
            .find(|l| l.split_whitespace().nth(1) == Some(job))
            .and_then(|l| l.split_whitespace().next().map(str::to_string))
    };
    assert_eq!(stage_of("build").as_deref(), Some("0"));
    assert_eq!(stage_of("test").as_deref(), Some("1"));

    let out = udos(&["run", "pull_request", "-n", "-W", w]);
    assert_eq!(out.status.code(), Some(0));
    let plan = String::from_utf8_lossy(&out.stdout);
    assert!(
        plan.contains("job lint") && !plan.contains("job build"),
        "{plan}"
    );

    let out = udos(&["run", "-n", "-j", "test", "-W", w]);
    let plan = String::from_utf8_lossy(&out.stdout);
    assert!(
        plan.contains("job build") && plan.contains("job test"),
        "needs come along: {plan}"
    );
    assert!(plan.contains("served from the workspace"), "{plan}");

    // A push to another branch triggers nothing: not an error.
    let payload = root.join("other.json");
    std::fs::write(&payload, r#"{"ref": "refs/heads/feature"}"#).unwrap();
    let out = udos(&["run", "-W", w, "-e", payload.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&out.stderr).contains("branches"));
    // An event no workflow listens to is a setup error.
    let out = udos(&["run", "release", "-W", w]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no workflow"));
    let runs_after = json(&udos(&["runs", "--json"])).as_array().map(Vec::len);
    assert_eq!(runs_before, runs_after, "nothing ran");
}

/// `-l` lists the jobs without fetching the actions their steps use: with the actions'
/// server unreachable it still lists them, where a run is refused.
#[test]
fn listing_fetches_no_actions() {
    let (dir, _wf) = repo(
        "on: push
jobs:
  uses-one:
    runs-on: ubuntu-latest
    steps:
      - uses: nobody/missing@v1
",
        &[],
    );
    let w = dir.path().join(".github/workflows");
    let w = w.to_str().unwrap();
    // Port 9 (discard) on loopback: nothing listens, the connection is refused.
    let unreachable = "http://127.0.0.1:9";
    let out = udos(&["run", "-l", "--actions-url", unreachable, "-W", w]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{err}");
    assert!(String::from_utf8_lossy(&out.stdout).contains("uses-one"));
    assert!(!err.contains("fetching"), "{err}");
    let out = udos(&["run", "--actions-url", unreachable, "-W", w]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("nobody/missing@v1"));
}

/// Steps udos cannot run are refused before anything is built, each named.
#[test]
fn unsupported_steps_are_refused_before_anything_runs() {
    let (_dir, wf) = repo(
        "on: push\njobs:\n  j:\n    runs-on: ubuntu-latest\n    steps:\n      - uses: actions/setup-node@v4\n      - uses: docker://alpine\n      - uses: ./missing\n",
        &[],
    );
    let out = udos(&["run", wf.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    for needle in [
        "step 1",
        "setup-node",
        "step 2",
        "Docker",
        "step 3",
        "./missing",
    ] {
        assert!(err.contains(needle), "`{needle}` not in: {err}");
    }
}

const CONCURRENT: &str = r#"
on: push
jobs:
  same:
    runs-on: ubuntu-latest
    steps:
      - run: echo identical > shared.txt
      - run: test "$(cat shared.txt)" = identical
"#;

/// Two runs on one state dir at once (as an agent runs assignments): the layers they
/// share are stored and described once at a time, each run gets its own restore
/// points, tagged with its own run.
#[test]
fn two_runs_at_once_on_one_state_dir_keep_their_own_restore_points() {
    let _g = serial();
    let (_dir, wf) = repo(CONCURRENT, &[]);
    let spawn = || {
        std::process::Command::new(env!("CARGO_BIN_EXE_udos"))
            .arg("--state-dir")
            .arg(state_dir())
            .args([
                "run",
                "--hypervisor",
                "qemu",
                "--json",
                "--no-console",
                "--jobs",
                "1",
            ])
            .arg(&wf)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap()
    };
    let (a, b) = (spawn(), spawn());
    let (a, b) = (a.wait_with_output().unwrap(), b.wait_with_output().unwrap());
    let (ra, rb) = (json(&a), json(&b));
    assert_eq!(
        a.status.code(),
        Some(0),
        "{ra:#}\n{}",
        String::from_utf8_lossy(&a.stderr)
    );
    assert_eq!(
        b.status.code(),
        Some(0),
        "{rb:#}\n{}",
        String::from_utf8_lossy(&b.stderr)
    );
    assert_ne!(ra["run_id"], rb["run_id"]);
    // Both stacked their steps on the same workspace layer, stored and snapshotted
    // while the other run did the same.
    let ws = |r: &Value| r["inputs"][1]["layer_id"].clone();
    assert_eq!(ws(&ra), ws(&rb));
    for r in [&ra, &rb] {
        let run = r["run_id"].as_i64().unwrap();
        let snaps = common::restic(&["snapshots", "--json", "--tag", &format!("run={run}")]);
        let snaps: Value = serde_json::from_slice(&snaps.stdout).unwrap();
        assert_eq!(snaps.as_array().unwrap().len(), 2, "run {run}: {snaps:#}");
        let t = tempfile::tempdir().unwrap();
        let target = t.path().join("root");
        let out = udos(&[
            "restore",
            &run.to_string(),
            "2",
            "--target",
            target.to_str().unwrap(),
        ]);
        assert!(out.status.success());
        assert_eq!(
            std::fs::read_to_string(target.join("workspace/shared.txt")).unwrap(),
            "identical\n"
        );
        assert!(!target.join(".udos-layer.json").exists());
    }
}

/// A step reaches a port of the host only when `--host-port` names it, at its gateway.
#[test]
fn a_step_reaches_a_host_port_only_when_it_is_named() {
    let _g = serial();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let server = std::thread::spawn(move || {
        use std::io::{Read, Write};
        // Answer one request: the named run.
        if let Ok((mut s, _)) = listener.accept() {
            let mut buf = [0u8; 1024];
            let _ = s.read(&mut buf);
            let _ = s.write_all(b"HTTP/1.0 200 OK\r\nContent-Length: 12\r\n\r\nhost-token-7");
        }
    });
    let wf_text = format!(
        "on: push\njobs:\n  net:\n    runs-on: ubuntu-latest\n    steps:\n      - run: |\n          grep -q nameserver /etc/resolv.conf\n          printf 'GET / HTTP/1.0\\r\\n\\r\\n' | busybox nc -w 10 10.0.2.2 {port} > got.txt\n          grep -q host-token-7 got.txt\n"
    );
    let (_dir, wf) = repo(&wf_text, &[]);
    let wf = wf.to_str().unwrap();
    let port_s = port.to_string();
    let named = udos(&[
        "run",
        "--hypervisor",
        "qemu",
        "--json",
        "--host-port",
        &port_s,
        wf,
    ]);
    let report = json(&named);
    assert_eq!(named.status.code(), Some(0), "{report:#}");
    server.join().unwrap();
    // Not named: the same step cannot reach it (the listener is gone, so a refusal
    // either way; the host's other ports are just as unreachable).
    let listener = std::net::TcpListener::bind(("127.0.0.1", port)).unwrap();
    let unnamed = udos(&["run", "--hypervisor", "qemu", "--json", "--no-cache", wf]);
    assert_eq!(unnamed.status.code(), Some(1), "{:#}", json(&unnamed));
    listener.set_nonblocking(true).unwrap();
    assert!(
        listener.accept().is_err(),
        "the unnamed run reached the host"
    );
    // --network none: no NIC at all.
    let none = udos(&[
        "run",
        "--hypervisor",
        "qemu",
        "--json",
        "--network",
        "none",
        "--no-cache",
        wf,
    ]);
    assert_eq!(none.status.code(), Some(1));
}
