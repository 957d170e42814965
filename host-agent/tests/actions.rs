//! Actions of other repositories, in real VMs (QEMU; TCG here), fetched from a real git
//! server on loopback (`git daemon`) that the test fills with action repositories: a
//! composite action that uses another remote composite action, a JavaScript action
//! (with a `post:` script) and a Docker action. Steps run with `--network none`: act
//! gets the actions from the step's control layer. Checked: the pinned SHAs in the
//! report and in the restic tags, no fetch on a second run (the server is gone), a
//! moved tag re-pinned, a bad ref and refused kinds as setup errors (exit 2) naming the
//! step, `--local-repository`, and the node action on the Debian base.
//!
//! Needs what e2e.rs needs, git's `git daemon`, and for the node action the Debian base
//! (built once per state dir, as bases.rs does). Five VMs in all.

use std::path::{Path, PathBuf};
use std::process::Output;

use serde_json::Value;

mod common;
use common::{git, json, repo, restic, serial, state_dir, udos, GitDaemon};

/// A `git daemon` on 127.0.0.1 serving the bare repositories under its base path as
/// `git://127.0.0.1:PORT/OWNER/REPO`. Stopped when dropped.
struct GitServer {
    dir: tempfile::TempDir,
    daemon: Option<GitDaemon>,
    port: u16,
}

impl GitServer {
    fn start() -> GitServer {
        let dir = tempfile::tempdir().unwrap();
        let srv = dir.path().join("srv");
        std::fs::create_dir_all(&srv).unwrap();
        let daemon = GitDaemon::start(&srv);
        GitServer {
            port: daemon.port,
            daemon: Some(daemon),
            dir,
        }
    }

    fn url(&self) -> String {
        format!("git://127.0.0.1:{}", self.port)
    }

    /// Stops the daemon: the URL then refuses connections.
    fn stop(&mut self) {
        self.daemon = None;
    }

    /// Commits `files` to the repository `owner/repo` (made on first use), tags the
    /// commit `tag` (annotated; moved if it exists), and publishes it on the server.
    /// Returns the commit.
    fn publish(&self, slug: &str, files: &[(&str, &str)], tag: &str) -> String {
        let work = self.dir.path().join("work").join(slug);
        if !work.exists() {
            std::fs::create_dir_all(&work).unwrap();
            git(&work, &["init", "-q", "-b", "main"]);
        }
        for (p, body) in files {
            let f = work.join(p);
            std::fs::create_dir_all(f.parent().unwrap()).unwrap();
            std::fs::write(f, body).unwrap();
        }
        git(&work, &["add", "-A"]);
        git(&work, &["commit", "-q", "--allow-empty", "-m", tag]);
        git(&work, &["tag", "-f", "-a", tag, "-m", tag]);
        let bare = self.dir.path().join("srv").join(format!("{slug}.git"));
        if !bare.exists() {
            git(
                self.dir.path(),
                &["init", "-q", "--bare", bare.to_str().unwrap()],
            );
        }
        git(
            &work,
            &[
                "push",
                "-q",
                "-f",
                bare.to_str().unwrap(),
                "main",
                &format!("refs/tags/{tag}"),
            ],
        );
        git(&work, &["rev-parse", "HEAD"])
    }
}

/// The inner composite action: writes a file the outer one reads back.
const INNER: &str = r#"
name: inner
inputs:
  word: {default: none}
runs:
  using: composite
  steps:
    - shell: sh
      run: echo "inner ${{ inputs.word }}" > /tmp/inner.txt
"#;

/// The outer composite action: uses the inner one (by its tag), then says hello and
/// whether its tree is the one with `moved.txt`.
const GREET: &str = r#"
name: greet
inputs:
  who: {default: nobody}
outputs:
  said: {value: "${{ steps.s.outputs.said }}"}
  inner: {value: "${{ steps.s.outputs.inner }}"}
  moved: {value: "${{ steps.s.outputs.moved }}"}
  ref: {value: "${{ steps.s.outputs.ref }}"}
runs:
  using: composite
  steps:
    - uses: acme/inner@v1
      with: {word: nested}
    - id: s
      shell: sh
      run: |
        echo "said=hello ${{ inputs.who }}" >> "$GITHUB_OUTPUT"
        echo "inner=$(cat /tmp/inner.txt)" >> "$GITHUB_OUTPUT"
        if test -f "$GITHUB_ACTION_PATH/moved.txt"; then m=yes; else m=no; fi
        echo "moved=$m" >> "$GITHUB_OUTPUT"
        echo "ref=$GITHUB_ACTION_REF" >> "$GITHUB_OUTPUT"
"#;

const JS: &str = r#"
name: js
inputs:
  who: {default: nobody}
runs:
  using: node20
  main: index.js
  post: post.js
"#;

const JS_MAIN: &str = r#"
const fs = require('fs');
fs.appendFileSync(process.env.GITHUB_OUTPUT,
  `greeting=hello ${process.env.INPUT_WHO}\nnode=${process.version}\n`);
"#;

const JS_POST: &str = "require('fs').writeFileSync('/tmp/post-ran', 'yes\\n');\n";

const DOCKER: &str = "name: d\nruns:\n  using: docker\n  image: Dockerfile\n";

fn workflow(uses: &str) -> String {
    format!(
        "name: actions\non: push\njobs:\n  j:\n    runs-on: ubuntu-latest\n    steps:\n      - id: a\n        uses: {uses}\n        with: {{who: world}}\n"
    )
}

fn run(wf: &Path, server: &str, extra: &[&str]) -> (Output, Value) {
    let mut args = vec![
        "run",
        "--hypervisor",
        "qemu",
        "--network",
        "none",
        "--json",
        "--actions-url",
        server,
    ];
    args.extend_from_slice(extra);
    args.push(wf.to_str().unwrap());
    let out = udos(&args);
    let report = if out.status.code() == Some(2) {
        Value::Null
    } else {
        json(&out)
    };
    (out, report)
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn step(report: &Value) -> &Value {
    &report["jobs"][0]["steps"][0]
}

/// The tags of the snapshot `id`.
fn snapshot_tags(id: &str) -> Vec<String> {
    let out = restic(&["snapshots", "--json", id]);
    assert!(out.status.success(), "{}", stderr(&out));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    v[0]["tags"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_str().unwrap().to_string())
        .collect()
}

fn actions_dir() -> PathBuf {
    state_dir().join("actions")
}

#[test]
fn composite_actions_from_a_git_server_run_offline_pinned() {
    let _g = serial();
    let mut server = GitServer::start();
    // Fresh commits (their times differ from any earlier test run's), so the state
    // dir's action store (shared by the tests) does not hold them yet.
    let inner_sha = server.publish("acme/inner", &[("action.yml", INNER)], "v1");
    let greet_sha = server.publish("acme/greet", &[("action.yml", GREET)], "v1");
    server.publish("acme/docker", &[("action.yml", DOCKER)], "v1");
    server.publish(
        "acme/js",
        &[
            ("action.yml", JS),
            ("index.js", JS_MAIN),
            ("post.js", JS_POST),
        ],
        "v1",
    );
    let url = server.url();
    let (_dir, wf) = repo(&workflow("acme/greet@v1"), &[]);

    // 1. Fetched, pinned and run without a network.
    let (out, report) = run(&wf, &url, &["--no-cache"]);
    assert_eq!(out.status.code(), Some(0), "{report:#}");
    let err = stderr(&out);
    assert!(err.contains("fetching `acme/greet@v1`"), "{err}");
    let s = step(&report);
    assert_eq!(s["outputs"]["said"], "hello world");
    assert_eq!(s["outputs"]["inner"], "inner nested");
    assert_eq!(s["outputs"]["moved"], "no");
    // The ref as written, as on GitHub (the tree is still the pinned commit's).
    assert_eq!(s["outputs"]["ref"], "v1");
    assert_eq!(
        s["actions"],
        serde_json::json!([
            {"uses": "acme/greet@v1", "sha": greet_sha, "local": null},
            {"uses": "acme/inner@v1", "sha": inner_sha, "local": null},
        ])
    );
    assert!(actions_dir()
        .join(format!("acme/greet/{greet_sha}/action.yml"))
        .is_file());
    assert!(!actions_dir()
        .join(format!("acme/greet/{greet_sha}/.git"))
        .exists());
    let tags = snapshot_tags(s["snapshot_id"].as_str().unwrap());
    for t in [
        format!("action=acme/greet@{greet_sha}"),
        format!("action=acme/inner@{inner_sha}"),
    ] {
        assert!(tags.contains(&t), "{t} in {tags:?}");
    }

    // 2. Errors before anything runs (exit 2), each naming its step.
    let (bad, _) = run(&repo(&workflow("acme/greet@v9"), &[]).1, &url, &[]);
    let err = stderr(&bad);
    assert_eq!(bad.status.code(), Some(2), "{err}");
    for needle in [
        "job `j`, step 1",
        "`uses: acme/greet@v9`",
        &format!("{url}/acme/greet has no branch or tag `v9`"),
        "it has: main, v1",
    ] {
        assert!(err.contains(needle), "`{needle}` not in: {err}");
    }
    let (docker, _) = run(&repo(&workflow("acme/docker@v1"), &[]).1, &url, &[]);
    let err = stderr(&docker);
    assert_eq!(docker.status.code(), Some(2), "{err}");
    assert!(
        err.contains("step 1: `uses: acme/docker@v1` is a Docker action"),
        "{err}"
    );
    let (js, _) = run(&repo(&workflow("acme/js@v1"), &[]).1, &url, &[]);
    let err = stderr(&js);
    assert_eq!(js.status.code(), Some(2), "{err}");
    assert!(
        err.contains("`uses: acme/js@v1` is a JavaScript action (`node20`), and the base `minimal` has no node"),
        "{err}"
    );
    let (missing, _) = run(&repo(&workflow("acme/nothere@v1"), &[]).1, &url, &[]);
    let err = stderr(&missing);
    assert_eq!(missing.status.code(), Some(2), "{err}");
    assert!(
        err.contains("step 1: `uses: acme/nothere@v1`: cannot read the repository"),
        "{err}"
    );

    // 3. --local-repository: a directory instead of the server's commit.
    let local = tempfile::tempdir().unwrap();
    std::fs::write(
        local.path().join("action.yml"),
        GREET.replace("hello", "howdy"),
    )
    .unwrap();
    let flag = format!("acme/greet@v1={}", local.path().display());
    let (out, report) = run(&wf, &url, &["--no-cache", "--local-repository", &flag]);
    assert_eq!(out.status.code(), Some(0), "{report:#}");
    let s = step(&report);
    let pinned = &s["actions"][0];
    assert_eq!(pinned["uses"], "acme/greet@v1");
    assert_eq!(pinned["local"], local.path().display().to_string());
    let tree = pinned["sha"].as_str().unwrap();
    assert_eq!(tree.len(), 64, "a tree's SHA-256: {pinned}");
    assert_eq!(s["outputs"]["said"], "howdy world");
    // What the local action uses in turn still comes from the server's pin.
    assert_eq!(s["actions"][1]["sha"], inner_sha);

    // 4. The tag moves: planning pins the new commit (`-n` boots nothing).
    let moved = server.publish("acme/greet", &[("moved.txt", "yes")], "v1");
    assert_ne!(moved, greet_sha);
    let dry = udos(&["run", "-n", "--actions-url", &url, wf.to_str().unwrap()]);
    assert_eq!(dry.status.code(), Some(0));
    assert!(
        stderr(&dry).contains(&format!(
            "fetched into the action store: acme/greet@{moved}"
        )),
        "{}",
        stderr(&dry)
    );

    // 5. The server is gone: the pinned commits run from the store, nothing is fetched.
    server.stop();
    let (out, report) = run(&wf, &url, &["--no-cache"]);
    assert_eq!(out.status.code(), Some(0), "{report:#}");
    let err = stderr(&out);
    assert!(!err.contains("udos: fetching"), "{err}");
    let s = step(&report);
    assert_eq!(s["actions"][0]["sha"], moved);
    assert_eq!(s["actions"][1]["sha"], inner_sha);
    assert_eq!(s["outputs"]["moved"], "yes", "the moved tag's tree ran");
    let notices = report["notices"].to_string();
    assert!(
        notices.contains("could not be reached") && notices.contains(&moved),
        "{notices}"
    );
}

#[test]
fn a_node_action_runs_with_the_debian_bases_node() {
    let _g = serial();
    // Built once per state dir (bases.rs builds it too).
    let out = udos(&["base", "build", "debian"]);
    assert!(out.status.success(), "udos base build debian failed");
    let server = GitServer::start();
    let sha = server.publish(
        "acme/js",
        &[
            ("action.yml", JS),
            ("index.js", JS_MAIN),
            ("post.js", JS_POST),
        ],
        "v1",
    );
    let (_dir, wf) = repo(&workflow("acme/js@v1"), &[]);
    let (out, report) = run(
        &wf,
        &server.url(),
        &["--no-cache", "-P", "ubuntu-latest=debian"],
    );
    assert_eq!(out.status.code(), Some(0), "{report:#}");
    let s = step(&report);
    assert_eq!(s["outputs"]["greeting"], "hello world");
    assert!(
        s["outputs"]["node"].as_str().unwrap().starts_with('v'),
        "{s:#}"
    );
    assert_eq!(s["actions"][0]["sha"], sha);
    // act ran the `post:` script when the step ended, in the step's VM: its file is in
    // the step's layer.
    let layer = state_dir()
        .join("layers")
        .join(s["layer_id"].as_str().unwrap());
    assert_eq!(
        std::fs::read_to_string(layer.join("tmp/post-ran")).unwrap(),
        "yes\n"
    );
    let notices = report["notices"].to_string();
    for needle in ["`acme/js@v1` declares `node20`", "has a `post:` script"] {
        assert!(notices.contains(needle), "`{needle}` not in {notices}");
    }
}
