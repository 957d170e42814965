//! Bases in real VMs (QEMU; TCG here): the Debian base built with mmdebstrap (once,
//! cached in the shared test state dir), the one `ubuntu-latest` runs on by default,
//! running git, python3, node, jq, curl and sudo;
//! bases imported from a plain rootfs tar and from a `docker save` tar whose second
//! layer deletes a file of the first; and imports that are refused.
//!
//! Needs what e2e.rs needs, plus mmdebstrap and Debian's archive the first time (about
//! 300 MB). Three VMs in all.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;
use sha2::{Digest, Sha256};

mod common;
use common::{json, repo, serial, snapshots_tagged, state_dir, udos, udos_on_default_base};

const DEBIAN: &str = r#"
name: debian
on: push
jobs:
  tools:
    runs-on: ubuntu-latest
    steps:
      - id: tools
        name: what an ubuntu runner has
        shell: bash
        run: |
          set -euxo pipefail
          cd "$GITHUB_WORKSPACE"
          test "$(git log -1 --format=%s)" = test
          test "$(python3 -c 'import json; print(json.loads("[6, 7]")[1])')" = 7
          test "$(node -e 'console.log(6 * 7)')" = 42
          echo '{"a": [1, 2]}' | jq -e '.a[1] == 2'
          curl --version | head -n 1
          sudo -n true
          test "$(id -u)" = 0
          echo "python=$(python3 --version | cut -d' ' -f2)" >> "$GITHUB_OUTPUT"
          echo "node=$(node --version)" >> "$GITHUB_OUTPUT"
          # act's probe and a step's own question both get the real node's path
          # (udos answers act's probe without starting node: init/src/node_shim.rs).
          echo "probe=$(node --no-warnings -e 'console.log(process.execPath)')" >> "$GITHUB_OUTPUT"
          echo "exec_path=$(node -e 'console.log(process.execPath)')" >> "$GITHUB_OUTPUT"
          echo "real=$(readlink -f /usr/bin/node)" >> "$GITHUB_OUTPUT"
"#;

/// The restic snapshots of base layers whose tags include all of `tags`.
fn base_snapshots(tags: &[String]) -> Vec<Value> {
    snapshots_tagged(&state_dir(), &tags.join(","))
}

fn has_tag(snapshot: &Value, tag: &str) -> bool {
    snapshot["tags"]
        .as_array()
        .is_some_and(|t| t.iter().any(|x| x == tag))
}

#[test]
fn debian_base_runs_what_ubuntu_steps_use() {
    let _g = serial();
    // Built once per state dir; later runs of this test find it.
    let out = udos(&["base", "build", "debian", "--json"]);
    assert!(out.status.success(), "udos base build debian failed");
    let built = json(&out);
    eprintln!(
        "FIGURES debian base {}: build {:.0} s (when it was built), erofs {} MiB, {} packages",
        &built["id"].as_str().unwrap()[..12],
        built["build_ms"].as_u64().unwrap() as f64 / 1000.0,
        built["erofs_bytes"].as_u64().unwrap() >> 20,
        built["package_count"]
    );
    assert!(built["package_count"].as_u64().unwrap() > 100, "{built:#}");
    let packages = std::fs::read_to_string(built["packages_file"].as_str().unwrap()).unwrap();
    for p in [
        "git ",
        "python3 ",
        "nodejs ",
        "jq ",
        "curl ",
        "sudo ",
        "build-essential ",
    ] {
        assert!(
            packages.lines().any(|l| l.starts_with(p)),
            "{p} in the package list"
        );
    }
    assert_eq!(
        format!("{:x}", Sha256::digest(packages.as_bytes())),
        built["packages_sha256"].as_str().unwrap()
    );

    let (_dir, wf) = repo(DEBIAN, &[("README", "x")]);
    let t = std::time::Instant::now();
    // `ubuntu-latest` runs on it when nothing says otherwise.
    let out = udos_on_default_base(&[
        "run",
        "--hypervisor",
        "qemu",
        "--json",
        wf.to_str().unwrap(),
    ]);
    let report = json(&out);
    assert_eq!(out.status.code(), Some(0), "report: {report:#}");
    assert_eq!(report["jobs"][0]["base"], "debian");
    let step = &report["jobs"][0]["steps"][0];
    assert_eq!(step["status"], "success", "{step:#}");
    assert!(step["outputs"]["python"]
        .as_str()
        .unwrap()
        .starts_with("3."));
    assert!(step["outputs"]["node"].as_str().unwrap().starts_with('v'));
    let real = step["outputs"]["real"].as_str().unwrap();
    assert!(real.starts_with("/usr/"), "{step:#}");
    assert_eq!(step["outputs"]["probe"], real, "{step:#}");
    assert_eq!(step["outputs"]["exec_path"], real, "{step:#}");
    eprintln!(
        "FIGURES debian step: run {:.1} s wall, boot {} ms, guest {} ms",
        t.elapsed().as_secs_f64(),
        step["phases_ms"]["boot"],
        step["phases_ms"]["guest"]
    );
    // The run's base input is the Debian base, a restic snapshot tagged with its
    // package list.
    assert_eq!(report["inputs"][0]["kind"], "base");
    assert_eq!(report["inputs"][0]["layer_id"], built["id"]);
    let snaps = base_snapshots(&[
        "kind=base".into(),
        format!("layer={}", built["id"].as_str().unwrap()),
    ]);
    assert!(!snaps.is_empty(), "the Debian base has a snapshot");
    assert!(has_tag(&snaps[0], "base=debian"), "{:#}", snaps[0]);
    assert!(has_tag(
        &snaps[0],
        &format!("packages={}", built["packages_sha256"].as_str().unwrap())
    ));
    assert!(has_tag(
        &snaps[0],
        &format!("package-count={}", built["package_count"])
    ));
}

fn sh(cmd: &mut Command) {
    let out = cmd.output().expect("spawn");
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The busybox base's tree (built by `serial()`).
fn busybox_tree() -> PathBuf {
    let out = json(&udos(&["image", "build", "--json"]));
    Path::new(out["base_layer"].as_str().unwrap())
        .parent()
        .unwrap()
        .join("tree")
}

/// A copy of the busybox root with `extra` files added.
fn root_with(dir: &Path, extra: &[(&str, &str)]) -> PathBuf {
    let root = dir.join("root");
    std::fs::create_dir_all(dir).unwrap();
    sh(Command::new("cp").arg("-a").arg(busybox_tree()).arg(&root));
    // The snapshot's description is not part of a root.
    let _ = std::fs::remove_file(root.join(".udos-layer.json"));
    for (p, body) in extra {
        let f = root.join(p);
        std::fs::create_dir_all(f.parent().unwrap()).unwrap();
        std::fs::write(f, body).unwrap();
    }
    root
}

fn sha256_file(p: &Path) -> String {
    format!("{:x}", Sha256::digest(std::fs::read(p).unwrap()))
}

/// A `docker save` tar: `layers` (tar files) in order, with their config.
fn docker_save(dir: &Path, name: &str, layers: &[&Path], present: &[bool]) -> PathBuf {
    let image = dir.join(format!("{name}-image"));
    std::fs::create_dir_all(&image).unwrap();
    let mut names = Vec::new();
    let mut diff_ids = Vec::new();
    for (i, l) in layers.iter().enumerate() {
        let n = format!("l{i}/layer.tar");
        if present[i] {
            std::fs::create_dir_all(image.join(format!("l{i}"))).unwrap();
            std::fs::copy(l, image.join(&n)).unwrap();
        }
        diff_ids.push(format!("sha256:{}", sha256_file(l)));
        names.push(n);
    }
    let config = serde_json::json!({
        "architecture": "amd64", "os": "linux",
        "rootfs": { "type": "layers", "diff_ids": diff_ids },
    });
    std::fs::write(image.join("config.json"), config.to_string()).unwrap();
    let manifest = serde_json::json!([{
        "Config": "config.json", "RepoTags": [format!("{name}:latest")], "Layers": names,
    }]);
    std::fs::write(image.join("manifest.json"), manifest.to_string()).unwrap();
    let tar = dir.join(format!("{name}.tar"));
    sh(Command::new("tar")
        .arg("-C")
        .arg(&image)
        .arg("-cf")
        .arg(&tar)
        .arg("."));
    tar
}

const IMPORTED: &str = r#"
name: imported
on: push
jobs:
  plain:
    runs-on: [self-hosted, plain-rootfs]
    steps:
      - run: test "$(cat /etc/imported-from)" = plain
  layered:
    runs-on: ubuntu-latest
    steps:
      - run: |
          test ! -e /etc/gone.txt
          test "$(cat /opt/keep.txt)" = keep
          test "$(cat /opt/added.txt)" = added
          test -x /bin/busybox
"#;

#[test]
fn imported_rootfs_and_docker_save_bases_run_steps() {
    let _g = serial();
    let work = tempfile::tempdir().unwrap();
    let w = work.path();

    // A plain rootfs tar, as `tar -C ROOT -c .` writes it (its first entry is `./`).
    let plain_root = root_with(&w.join("plain"), &[("etc/imported-from", "plain")]);
    let plain = w.join("plain-rootfs.tar");
    sh(Command::new("tar")
        .arg("-C")
        .arg(&plain_root)
        .arg("-cf")
        .arg(&plain)
        .arg("."));

    // Two layers: the second deletes /etc/gone.txt (an OCI whiteout) and adds a file.
    let l1_root = root_with(
        &w.join("l1"),
        &[("etc/gone.txt", "gone"), ("opt/keep.txt", "keep")],
    );
    let l1 = w.join("layer1.tar");
    sh(Command::new("tar")
        .arg("-C")
        .arg(&l1_root)
        .arg("-cf")
        .arg(&l1)
        .arg("."));
    let l2_root = w.join("l2");
    for (p, body) in [("etc/.wh.gone.txt", ""), ("opt/added.txt", "added")] {
        let f = l2_root.join(p);
        std::fs::create_dir_all(f.parent().unwrap()).unwrap();
        std::fs::write(f, body).unwrap();
    }
    let l2 = w.join("layer2.tar");
    sh(Command::new("tar")
        .arg("-C")
        .arg(&l2_root)
        .arg("-cf")
        .arg(&l2)
        .args(["etc", "opt"]));
    let saved = docker_save(w, "layered-img", &[&l1, &l2], &[true, true]);

    let out = udos(&[
        "base",
        "import",
        plain.to_str().unwrap(),
        "--name",
        "plain-test",
        "--json",
    ]);
    assert!(out.status.success());
    let plain_base = json(&out);
    assert_eq!(plain_base["name"], "plain-test");
    assert_eq!(plain_base["kind"], "imported");
    // The default name is the file's stem.
    let out = udos(&["base", "import", saved.to_str().unwrap(), "--json"]);
    assert!(out.status.success());
    let layered = json(&out);
    assert_eq!(layered["name"], "layered-img");
    assert!(
        layered["origin"].as_str().unwrap().contains("2 layers"),
        "{layered:#}"
    );
    assert_ne!(plain_base["id"], layered["id"]);
    // Importing the same image again reuses its base.
    let again = json(&udos(&[
        "base",
        "import",
        saved.to_str().unwrap(),
        "--json",
    ]));
    assert_eq!(again["id"], layered["id"]);

    let list = json(&udos(&["base", "list", "--json"]));
    let names: Vec<&str> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["name"].as_str().unwrap())
        .collect();
    for n in ["minimal", "plain-test", "layered-img"] {
        assert!(names.contains(&n), "{n} in {names:?}");
    }

    let (_dir, wf) = repo(IMPORTED, &[("README", "x")]);
    let out = udos(&[
        "run",
        "--hypervisor",
        "qemu",
        "--json",
        "-P",
        "plain-rootfs=plain-test",
        "-P",
        "ubuntu-latest=layered-img",
        wf.to_str().unwrap(),
    ]);
    let report = json(&out);
    assert_eq!(out.status.code(), Some(0), "report: {report:#}");
    for j in report["jobs"].as_array().unwrap() {
        assert_eq!(j["steps"][0]["status"], "success", "{j:#}");
        let base = if j["id"] == "plain" {
            "plain-test"
        } else {
            "layered-img"
        };
        assert_eq!(j["base"], base, "{j:#}");
        let id = if j["id"] == "plain" {
            &plain_base["id"]
        } else {
            &layered["id"]
        };
        assert_eq!(&j["base_layer"], id, "{j:#}");
    }
    // Each leg's restore point stacks its own base, not the other job's.
    let run_id = report["run_id"].as_i64().unwrap().to_string();
    for (job, has, lacks) in [
        ("plain", "etc/imported-from", "opt/keep.txt"),
        ("layered", "opt/keep.txt", "etc/imported-from"),
    ] {
        let target = w.join(format!("restored-{job}"));
        let out = udos(&[
            "restore",
            &run_id,
            "1",
            "--job",
            job,
            "--target",
            target.to_str().unwrap(),
        ]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(target.join(has).is_file(), "{job}: {has}");
        assert!(!target.join(lacks).exists(), "{job}: {lacks}");
    }
    // Both bases are the run's inputs, each a restic snapshot tagged as imported.
    let inputs: Vec<&Value> = report["inputs"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|i| i["kind"] == "base")
        .collect();
    assert_eq!(inputs.len(), 2, "{report:#}");
    for b in [&plain_base, &layered] {
        assert!(inputs.iter().any(|i| i["layer_id"] == b["id"]));
        let snaps = base_snapshots(&[
            "kind=base".into(),
            format!("layer={}", b["id"].as_str().unwrap()),
        ]);
        assert!(has_tag(&snaps[0], "base-kind=imported"), "{:#}", snaps[0]);
    }
}

/// Staging directories an import leaves while it works.
fn leftovers() -> Vec<String> {
    let dir = state_dir().join("images/base");
    std::fs::read_dir(&dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with(".import-"))
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn bad_imports_are_refused_and_leave_nothing() {
    let _g = serial();
    let work = tempfile::tempdir().unwrap();
    let w = work.path();
    let before = json(&udos(&["base", "list", "--json"]));

    // A tar whose member climbs out with `..` (python's tarfile writes it as given).
    let evil = w.join("evil.tar");
    sh(Command::new("python3").arg("-c").arg(format!(
        "import io, tarfile\n\
         t = tarfile.open({:?}, 'w')\n\
         for name in ['etc/ok', '../escaped']:\n\
         \x20   i = tarfile.TarInfo(name); i.size = 2\n\
         \x20   t.addfile(i, io.BytesIO(b'x\\n'))\n\
         t.close()\n",
        evil.to_str().unwrap()
    )));
    let out = udos(&["base", "import", evil.to_str().unwrap(), "--name", "evil"]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("\"../escaped\"") && err.contains("`..`"),
        "{err}"
    );
    assert!(!w.join("escaped").exists());

    // A docker-save tar whose manifest names a layer it does not hold.
    let layer = w.join("only.tar");
    std::fs::create_dir_all(w.join("l")).unwrap();
    std::fs::write(w.join("l/file"), "x").unwrap();
    sh(Command::new("tar")
        .arg("-C")
        .arg(w.join("l"))
        .arg("-cf")
        .arg(&layer)
        .arg("file"));
    let broken = docker_save(w, "broken", &[&layer, &layer], &[true, false]);
    let out = udos(&["base", "import", broken.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("layer 2 of 2 `l1/layer.tar` is not in the archive"),
        "{err}"
    );

    // A name that is not one.
    let out = udos(&["base", "import", layer.to_str().unwrap(), "--name", "../x"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("invalid base name"));

    assert_eq!(json(&udos(&["base", "list", "--json"])), before);
    assert_eq!(leftovers(), Vec::<String>::new());
}
