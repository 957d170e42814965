//! `udos diff`, `udos export` and `udos gc` on real runs: real VMs (QEMU; TCG where KVM
//! is unusable), a real restic repository and SQLite file, checked against the plain
//! `restic` and GNU `tar` command lines.
//!
//! Needs what e2e.rs needs (a static udos-init in `UDOS_INIT`, the host tools).

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::process::{Command, Output};

use serde_json::Value;

mod common;
use common::{json, own_state_dir, repo, restic, restic_in, serial, udos};

const STEPS: &str = r#"
name: toolbox
on: push
jobs:
  build:
    runs-on: ubuntu-latest
    steps:
      - name: make
        run: |
          mkdir -p out/deep /opt/tb
          printf 'one\n' > out/a.txt
          head -c 5000 /dev/zero | tr '\0' x > out/deep/big.bin
          echo tool > /opt/tb/marker
      - name: change
        run: |
          printf 'two two\n' > out/a.txt
          rm tracked.txt
          rm -r olddir
          ln -s a.txt out/link
          echo new > out/new.txt
          rm -r keep && mkdir keep && echo z > keep/z
      - name: last
        run: echo done > out/done.txt
"#;

/// One run of [`STEPS`] in the shared state dir: (run id, report).
fn run_steps() -> (i64, Value, tempfile::TempDir) {
    let (dir, wf) = repo(
        STEPS,
        &[
            ("tracked.txt", "t"),
            ("olddir/a", "a"),
            ("olddir/sub/b", "b"),
            ("keep/x", "x"),
            ("keep/y", "y"),
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
    (report["run_id"].as_i64().unwrap(), report, dir)
}

fn step_field(report: &Value, step: usize, field: &str) -> String {
    report["jobs"][0]["steps"][step - 1][field]
        .as_str()
        .unwrap_or_else(|| panic!("step {step} has no {field}: {report:#}"))
        .to_string()
}

/// What `restic ls` says a snapshot holds: path -> (type, size), the snapshot's
/// description left out.
fn restic_ls(snapshot: &str) -> BTreeMap<String, (String, u64)> {
    let out = restic(&["ls", "--json", snapshot]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| v["struct_type"] == "node")
        .filter(|v| v["path"] != "/.udos-layer.json")
        .map(|v| {
            (
                v["path"].as_str().unwrap().to_string(),
                (
                    v["type"].as_str().unwrap().to_string(),
                    v["size"].as_u64().unwrap_or(0),
                ),
            )
        })
        .collect()
}

/// One member of a tar as GNU tar lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Member {
    kind: char,
    size: u64,
    name: String,
    link: Option<String>,
}

/// `tar -tv` of a file (our test paths have no spaces).
fn tar_members(tar: &Path) -> Vec<Member> {
    let out = Command::new("tar")
        .args([
            "--list",
            "--verbose",
            "--numeric-owner",
            "--full-time",
            "-f",
        ])
        .arg(tar)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| {
            // drwxr-xr-x 0/0 0 2026-11-28 23:16:29 name [-> target | link to target]
            let f: Vec<&str> = l.split_whitespace().collect();
            let rest = &f[5..];
            let (name, link) = match rest {
                [n, "->", t] => (n.to_string(), Some(t.to_string())),
                [n, "link", "to", t] => (n.to_string(), Some(t.to_string())),
                [n] => (n.to_string(), None),
                _ => panic!("unexpected tar line {l:?}"),
            };
            Member {
                kind: f[0].chars().next().unwrap(),
                size: f[2].parse().unwrap(),
                name,
                link,
            }
        })
        .collect()
}

fn extract(tar: &Path, into: &Path) {
    std::fs::create_dir_all(into).unwrap();
    let ok = Command::new("tar")
        .args(["-x", "--numeric-owner", "-f"])
        .arg(tar)
        .arg("-C")
        .arg(into)
        .status()
        .unwrap()
        .success();
    assert!(ok, "tar -x {}", tar.display());
}

fn entries_of(diff: &Value) -> BTreeMap<String, (String, Value)> {
    diff["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["path"].as_str().unwrap().to_string(),
                (e["change"].as_str().unwrap().to_string(), e.clone()),
            )
        })
        .collect()
}

/// The paths of a layer as `restic ls` gives them: a whiteout (a 0/0 character
/// device in overlay form) is the path it deletes.
fn under_any(path: &str, roots: &BTreeSet<String>) -> bool {
    roots
        .iter()
        .any(|r| path == r || path.starts_with(&format!("{r}/")))
}

#[test]
fn diff_and_export_agree_with_restic_on_what_a_layer_holds() {
    let _g = serial();
    let (run, report, _dir) = run_steps();
    let run_s = run.to_string();
    let snap2 = step_field(&report, 2, "snapshot_id");
    let layer2 = step_field(&report, 2, "layer_id");
    let ls = restic_ls(&snap2);
    let whiteouts: BTreeSet<String> = ls
        .iter()
        .filter(|(_, (t, _))| t == "chardev")
        .map(|(p, _)| p.clone())
        .collect();
    let dirs: BTreeSet<String> = ls
        .iter()
        .filter(|(_, (t, _))| t == "dir")
        .map(|(p, _)| p.clone())
        .collect();
    assert!(whiteouts.contains("/workspace/tracked.txt"), "{ls:#?}");
    assert!(whiteouts.contains("/workspace/olddir"), "{ls:#?}");

    // udos diff RUN 2: every file and link of the layer is added or changed with its
    // size, every whiteout a deletion; nothing else is added or changed, and every
    // deletion is a whiteout, under one, or under a directory the layer replaced.
    let out = udos(&["diff", &run_s, "2", "--json"]);
    assert!(out.status.success());
    let d = json(&out);
    let entries = entries_of(&d);
    for (path, (kind, size)) in &ls {
        let got = entries.get(path);
        match kind.as_str() {
            "file" | "symlink" => {
                let (change, e) = got.unwrap_or_else(|| panic!("{path} missing: {d:#}"));
                assert!(change == "added" || change == "changed", "{path}: {e}");
                if kind == "file" {
                    assert_eq!(e["size_after"].as_u64(), Some(*size), "{path}");
                }
            }
            "chardev" => assert_eq!(got.map(|g| g.0.as_str()), Some("deleted"), "{path}"),
            _ => {}
        }
    }
    for (path, (change, e)) in &entries {
        match change.as_str() {
            "deleted" => assert!(
                under_any(path, &whiteouts)
                    || dirs.iter().any(|dir| path.starts_with(&format!("{dir}/"))),
                "{path} deleted but the layer does not say so"
            ),
            _ if e["kind"] == "dir" => assert_eq!(ls.get(path).map(|l| l.0.as_str()), Some("dir")),
            _ => assert!(
                ls.contains_key(path),
                "{path} {change} but not in the layer"
            ),
        }
    }
    let c = |p: &str| entries.get(p).map(|e| e.0.as_str());
    assert_eq!(c("/workspace/out/a.txt"), Some("changed"));
    assert_eq!(entries["/workspace/out/a.txt"].1["size_before"], 4);
    assert_eq!(c("/workspace/out/new.txt"), Some("added"));
    assert_eq!(c("/workspace/out/link"), Some("added"));
    assert_eq!(c("/workspace/olddir/sub/b"), Some("deleted"));
    assert_eq!(c("/workspace/keep/x"), Some("deleted"));
    assert_eq!(c("/workspace/keep/z"), Some("added"));
    assert_eq!(
        c("/workspace/out/deep/big.bin"),
        None,
        "unchanged by step 2"
    );
    assert_eq!(
        d["deleted"].as_u64().unwrap() as usize,
        entries.values().filter(|e| e.0 == "deleted").count()
    );

    // udos export RUN 2: the layer as sealed (its SHA-256 is the layer id), with OCI
    // whiteouts, and the same entries, sizes and bytes as the snapshot.
    let t = tempfile::tempdir().unwrap();
    let tar2 = t.path().join("step2.tar");
    let out = udos(&[
        "export",
        &run_s,
        "2",
        "--output",
        tar2.to_str().unwrap(),
        "--json",
    ]);
    assert!(out.status.success());
    let e = json(&out);
    assert_eq!(e["layer_id"], layer2.as_str());
    assert_eq!(
        e["sha256"],
        layer2.as_str(),
        "the export is the sealed layer"
    );
    let members = tar_members(&tar2);
    let names: BTreeSet<&str> = members.iter().map(|m| m.name.as_str()).collect();
    for want in [
        "workspace/.wh.tracked.txt",
        "workspace/.wh.olddir",
        "workspace/keep/",
        "workspace/keep/.wh..wh..opq",
        "workspace/keep/z",
    ] {
        assert!(names.contains(want), "{want} not in {names:#?}");
    }
    assert!(members.iter().any(|m| m.name == "workspace/out/link"
        && m.kind == 'l'
        && m.link.as_deref() == Some("a.txt")));
    for m in &members {
        assert!(
            !m.name.starts_with('/') && !m.name.split('/').any(|c| c == ".."),
            "{m:?}"
        );
        assert!(!m.name.contains(".udos-layer.json"), "{m:?}");
        if m.name
            .rsplit('/')
            .next()
            .is_some_and(|n| n.starts_with(".wh."))
        {
            assert_eq!(
                (m.kind, m.size),
                ('-', 0),
                "a whiteout is an empty file: {m:?}"
            );
        }
    }
    // Same paths and types as restic ls (a `.wh.` file is the whiteout of its path).
    let from_tar: BTreeMap<String, (String, u64)> = members
        .iter()
        .filter(|m| !m.name.ends_with("/.wh..wh..opq"))
        .map(|m| {
            let name = m.name.trim_end_matches('/');
            let (dir, base) = name.rsplit_once('/').unwrap_or(("", name));
            let kind = match m.kind {
                'd' => "dir",
                'l' => "symlink",
                _ if base.starts_with(".wh.") => "chardev",
                _ => "file",
            };
            let base = base.strip_prefix(".wh.").unwrap_or(base);
            let path = if dir.is_empty() {
                format!("/{base}")
            } else {
                format!("/{dir}/{base}")
            };
            let size = if kind == "file" { m.size } else { 0 };
            (path, (kind.to_string(), size))
        })
        .collect();
    let from_restic: BTreeMap<String, (String, u64)> = ls
        .iter()
        .map(|(p, (t, s))| (p.clone(), (t.clone(), if t == "file" { *s } else { 0 })))
        .collect();
    assert_eq!(from_tar, from_restic);
    // Bytes: restic dump's tar of the snapshot against ours.
    let dumped = t.path().join("dump.tar");
    let out = restic(&["dump", &snap2, "/"]);
    assert!(out.status.success());
    std::fs::write(&dumped, &out.stdout).unwrap();
    extract(&dumped, &t.path().join("from-restic"));
    extract(&tar2, &t.path().join("from-export"));
    for (path, (kind, _)) in &ls {
        if kind == "file" {
            let rel = path.trim_start_matches('/');
            assert_eq!(
                std::fs::read(t.path().join("from-export").join(rel)).unwrap(),
                std::fs::read(t.path().join("from-restic").join(rel)).unwrap(),
                "{path}"
            );
        }
    }

    // An existing output is refused and left alone.
    let out = udos(&["export", &run_s, "2", "--output", tar2.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    assert_eq!(
        std::fs::metadata(&tar2).unwrap().len(),
        e["bytes"].as_u64().unwrap()
    );

    // --flatten: the whole root after step 3, base and workspace included, no whiteouts.
    let flat = t.path().join("root.tar");
    let out = udos(&[
        "export",
        &run_s,
        "3",
        "--flatten",
        "--output",
        flat.to_str().unwrap(),
    ]);
    assert!(out.status.success());
    let members = tar_members(&flat);
    assert!(
        !members.iter().any(|m| m.name.contains(".wh.")),
        "whiteouts in a flat root"
    );
    let names: BTreeSet<&str> = members.iter().map(|m| m.name.as_str()).collect();
    for want in [
        "bin/busybox",
        "bin/bash",
        "workspace/.git/",
        "workspace/out/done.txt",
        "opt/tb/marker",
        "workspace/keep/z",
    ] {
        assert!(names.contains(want), "{want} not in the flat root");
    }
    for gone in [
        "workspace/tracked.txt",
        "workspace/olddir/",
        "workspace/keep/x",
    ] {
        assert!(!names.contains(gone), "{gone} is in the flat root");
    }
    let root = t.path().join("flat");
    extract(&flat, &root);
    assert_eq!(
        std::fs::read_to_string(root.join("workspace/out/a.txt")).unwrap(),
        "two two\n"
    );

    // Two points: the root after step 1 against the root after step 3.
    let out = udos(&["diff", &run_s, "1", &run_s, "3", "--json"]);
    assert!(out.status.success());
    let entries = entries_of(&json(&out));
    let c = |p: &str| entries.get(p).map(|e| e.0.as_str());
    assert_eq!(c("/workspace/out/a.txt"), Some("changed"));
    assert_eq!(c("/workspace/out/done.txt"), Some("added"));
    assert_eq!(c("/workspace/tracked.txt"), Some("deleted"));
    assert_eq!(c("/workspace/out/deep/big.bin"), None);
    assert_eq!(c("/opt/tb/marker"), None);
    // The text form says the same.
    let out = udos(&["diff", &run_s, "1", &run_s, "3"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("C  /workspace/out/a.txt  4 B -> 8 B"),
        "{text}"
    );
    assert!(text.contains("A  /workspace/out/done.txt  5 B"), "{text}");
}

const GC_STEPS: &str = r#"
name: gc
on: push
jobs:
  build:
    runs-on: ubuntu-latest
    steps:
      - name: unique
        run: echo "run ${{ github.run_id }}" > /unique.txt
      - name: second
        if: vars.FULL == 'yes'
        run: echo more > /second.txt
"#;

fn udos_in(st: &Path, args: &[&str]) -> Output {
    let out = Command::new(env!("CARGO_BIN_EXE_udos"))
        .arg("--state-dir")
        .arg(st)
        .args(args)
        .output()
        .unwrap();
    eprintln!(
        "$ udos {}\n--- stderr ---\n{}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn snapshot_ids(st: &Path) -> BTreeSet<String> {
    let out = restic_in(st, &["snapshots", "--json"]);
    assert!(out.status.success());
    serde_json::from_slice::<Value>(&out.stdout)
        .unwrap()
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["id"].as_str().unwrap().to_string())
        .collect()
}

fn listing(dir: &Path) -> BTreeSet<String> {
    std::fs::read_dir(dir)
        .map(|rd| {
            rd.map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// Everything gc could touch, to see that a dry run touched nothing.
fn state_of(st: &Path) -> (BTreeSet<String>, BTreeSet<String>, BTreeSet<String>, String) {
    (
        snapshot_ids(st),
        listing(&st.join("layers")),
        listing(&st.join("runs")),
        String::from_utf8_lossy(&udos_in(st, &["runs", "--json"]).stdout).into_owned(),
    )
}

/// (layer, snapshot) of every step of a report that made a layer.
fn step_layers(report: &Value) -> Vec<(String, String)> {
    report["jobs"][0]["steps"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s["layer_id"].is_string())
        .map(|s| {
            (
                s["layer_id"].as_str().unwrap().to_string(),
                s["snapshot_id"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

#[test]
fn gc_keeps_the_last_run_whole_and_frees_the_others() {
    let _g = serial();
    let st = own_state_dir("udos-gc-state");
    let (_dir, wf) = repo(GC_STEPS, &[("README", "gc")]);
    let mut reports = Vec::new();
    for full in ["no", "no", "yes"] {
        let out = udos_in(
            &st,
            &[
                "run",
                "--hypervisor",
                "qemu",
                "--json",
                "--var",
                &format!("FULL={full}"),
                wf.to_str().unwrap(),
            ],
        );
        let r = json(&out);
        assert_eq!(out.status.code(), Some(0), "{r:#}");
        reports.push(r);
    }
    let ids: Vec<i64> = reports
        .iter()
        .map(|r| r["run_id"].as_i64().unwrap())
        .collect();
    assert_eq!(ids, vec![1, 2, 3]);
    let kept = &reports[2];
    let kept_layers = step_layers(kept);
    assert_eq!(kept_layers.len(), 2);
    let kept_snaps: BTreeSet<String> = kept_layers
        .iter()
        .map(|(_, s)| s.clone())
        .chain(
            kept["inputs"]
                .as_array()
                .unwrap()
                .iter()
                .map(|i| i["snapshot_id"].as_str().unwrap().to_string()),
        )
        .collect();
    let old: Vec<(String, String)> = reports[..2].iter().flat_map(step_layers).collect();
    assert_eq!(old.len(), 2);

    // A dry run says what it would free and changes nothing.
    let before = state_of(&st);
    let out = udos_in(&st, &["gc", "--keep-last", "1", "--dry-run", "--json"]);
    assert!(out.status.success());
    let dry = json(&out);
    assert_eq!(state_of(&st), before, "--dry-run changed the state dir");
    assert_eq!(dry["dry_run"], true);
    assert_eq!(dry["removed_runs"], serde_json::json!([1, 2]));

    let out = udos_in(&st, &["gc", "--keep-last", "1", "--json"]);
    assert!(out.status.success());
    let done = json(&out);
    assert_eq!(done["removed_runs"], dry["removed_runs"]);
    assert_eq!(done["forgotten_snapshots"], dry["forgotten_snapshots"]);
    assert_eq!(done["freed"], dry["freed"]);
    let forgotten: BTreeSet<String> = done["forgotten_snapshots"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_str().unwrap().to_string())
        .collect();
    let old_snaps: BTreeSet<String> = old.iter().map(|(_, s)| s.clone()).collect();
    assert_eq!(forgotten, old_snaps, "exactly the old runs' step snapshots");
    let after = snapshot_ids(&st);
    assert_eq!(after, &before.0 - &forgotten);
    assert!(kept_snaps.is_subset(&after));
    for (layer, _) in &old {
        assert!(
            !st.join("layers").join(layer).exists(),
            "{layer} still in the state dir"
        );
        assert!(!st.join("layers").join(format!("{layer}.erofs")).exists());
    }
    for (layer, _) in &kept_layers {
        assert!(
            st.join("layers").join(layer).is_dir()
                && st.join("layers").join(format!("{layer}.erofs")).is_file()
        );
    }
    assert!(
        !st.join("runs/1").exists() && !st.join("runs/2").exists() && st.join("runs/3").exists()
    );
    assert!(done["state_bytes_freed"].as_u64().unwrap() > 0);
    let (repo_before, repo_after) = (
        done["repository_bytes"][0].as_u64().unwrap(),
        done["repository_bytes"][1].as_u64().unwrap(),
    );
    assert!(repo_after < repo_before, "{repo_before} -> {repo_after}");
    let runs = json(&udos_in(&st, &["runs", "--json"]));
    assert_eq!(runs.as_array().unwrap().len(), 1);
    assert_eq!(runs[0]["run_id"], 3);

    // Every step of the kept run restores; the removed runs are gone; the repository
    // is sound.
    for step in ["1", "2"] {
        let t = tempfile::tempdir().unwrap();
        let target = t.path().join("root");
        let out = udos_in(
            &st,
            &["restore", "3", step, "--target", target.to_str().unwrap()],
        );
        assert!(out.status.success(), "restore 3 {step}");
        assert_eq!(
            std::fs::read_to_string(target.join("unique.txt")).unwrap(),
            "run 3\n"
        );
        assert_eq!(target.join("second.txt").exists(), step == "2");
        assert!(target.join("workspace/README").is_file() && target.join("bin/busybox").is_file());
    }
    let t = tempfile::tempdir().unwrap();
    let out = udos_in(
        &st,
        &[
            "restore",
            "1",
            "1",
            "--target",
            t.path().join("r").to_str().unwrap(),
        ],
    );
    assert_eq!(out.status.code(), Some(2));
    let check = restic_in(&st, &["check"]);
    assert!(
        check.status.success(),
        "{}",
        String::from_utf8_lossy(&check.stderr)
    );

    // Nothing is left to free.
    let again = json(&udos_in(&st, &["gc", "--keep-last", "1", "--json"]));
    assert_eq!(again["removed_runs"], serde_json::json!([]));
    assert_eq!(again["forgotten_snapshots"], serde_json::json!([]));
    std::fs::remove_dir_all(&st).unwrap();
}

const SLOW_STEP: &str = r#"
name: slow
on: push
jobs:
  build:
    runs-on: ubuntu-latest
    steps:
      - name: slow
        run: sleep 8 && echo done > /slow.txt
"#;

#[test]
fn gc_is_refused_while_a_run_is_in_progress_and_frees_once_it_has_finished() {
    let _g = serial();
    let st = own_state_dir("udos-gc-lock-state");
    let (_dir, wf) = repo(SLOW_STEP, &[("README", "slow")]);
    let first = udos_in(
        &st,
        &[
            "run",
            "--hypervisor",
            "qemu",
            "--json",
            wf.to_str().unwrap(),
        ],
    );
    assert!(first.status.success());
    let run = Command::new(env!("CARGO_BIN_EXE_udos"))
        .arg("--state-dir")
        .arg(&st)
        .args(["run", "--hypervisor", "qemu", "--json", "--no-cache"])
        .arg(&wf)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // The second run holds the state dir's lock from before its row exists to its end.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    loop {
        let runs = json(&udos_in(&st, &["runs", "--json"]));
        if runs.as_array().unwrap().len() == 2 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the second run never began"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let refused = udos_in(&st, &["gc", "--keep-last", "1"]);
    assert!(!refused.status.success());
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(stderr.contains("in progress"), "{stderr}");
    // A dry run changes nothing, so it still says what gc would free.
    let dry = json(&udos_in(
        &st,
        &["gc", "--keep-last", "1", "--dry-run", "--json"],
    ));
    assert_eq!(dry["dry_run"], true);

    let out = run.wait_with_output().unwrap();
    assert!(out.status.success());
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["jobs"][0]["steps"][0]["status"], "success");
    // Now the first run (not the newest) is freed.
    let freed = json(&udos_in(&st, &["gc", "--keep-last", "1", "--json"]));
    assert_eq!(freed["removed_runs"], serde_json::json!([1]), "{freed}");
}
