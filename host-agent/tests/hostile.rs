//! Hostile guests: the step VM's PID 1 is `udos-hostile-init` (`testkit/hostile-init`),
//! which writes crafted sealed output instead of running the step. Every run boots
//! real VMs (QEMU; TCG here) through the `udos` binary, as e2e.rs does.
//!
//! Needs `UDOS_INIT` (the real static udos-init, for the legitimate runs) and
//! `UDOS_HOSTILE_INIT` (the hostile one); `scripts/test` builds and sets both. Without
//! them these tests fail and say how to build them. The images are built once into
//! this file's own state dir (`$UDOS_HOSTILE_TEST_STATE`, default under the cargo
//! target dir), never the one e2e.rs uses.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::{Mutex, MutexGuard, OnceLock};

use serde_json::Value;
use sha2::{Digest, Sha256};

mod common;

fn state_dir() -> PathBuf {
    std::env::var_os("UDOS_HOSTILE_TEST_STATE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("udos-hostile-state"))
}

/// Which PID 1 the image carries.
#[derive(Clone, Copy, Debug)]
enum Init {
    Real,
    Hostile,
}

impl Init {
    fn path(self) -> PathBuf {
        let (var, package, binary) = match self {
            Init::Real => ("UDOS_INIT", "udos-init", "udos-init"),
            Init::Hostile => (
                "UDOS_HOSTILE_INIT",
                "udos-hostile-init",
                "udos-hostile-init",
            ),
        };
        match std::env::var_os(var) {
            Some(p) if !p.is_empty() => PathBuf::from(p),
            _ => panic!(
                "{var} is not set. Build the static {binary} with \
                 `RUSTFLAGS=\"-C target-feature=+crt-static\" cargo build --release -p {package} --target x86_64-unknown-linux-gnu` \
                 and set {var}=<target dir>/x86_64-unknown-linux-gnu/release/{binary} (scripts/test does both)"
            ),
        }
    }
}

fn udos(init: Init, args: &[&str]) -> Output {
    let out = Command::new(env!("CARGO_BIN_EXE_udos"))
        .env("UDOS_INIT", init.path())
        .arg("--state-dir")
        .arg(state_dir())
        .args(args)
        .output()
        .expect("spawn udos");
    eprintln!(
        "$ UDOS_INIT=<{init:?}> udos {}\n--- stderr ---\n{}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// One VM test at a time (2 cores), and both images built once.
fn serial() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    static BUILT: OnceLock<()> = OnceLock::new();
    let guard = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    BUILT.get_or_init(|| {
        for init in [Init::Real, Init::Hostile] {
            assert!(
                udos(init, &["image", "build"]).status.success(),
                "udos image build with the {init:?} init failed"
            );
        }
    });
    guard
}

/// A git working tree with `files` committed and the workflow at
/// `.github/workflows/test.yml`.
fn repo(workflow: &str, files: &[(&str, &str)]) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    std::fs::create_dir_all(root.join(".github/workflows")).unwrap();
    let wf = root.join(".github/workflows/test.yml");
    std::fs::write(&wf, workflow).unwrap();
    for (path, content) in files {
        std::fs::write(root.join(path), content).unwrap();
    }
    common::commit_all(root);
    (dir, wf)
}

/// A workflow of `n` steps running `run`; every step after the first runs even when
/// an earlier one failed. No `id:`: the hostile init reports the step as `_udos_step`.
fn workflow(n: usize, run: &str) -> String {
    let mut wf =
        String::from("on: push\njobs:\n  build:\n    runs-on: ubuntu-latest\n    steps:\n");
    for i in 0..n {
        if i > 0 {
            wf.push_str("      - if: always()\n        run: ");
        } else {
            wf.push_str("      - run: ");
        }
        wf.push_str(run);
        wf.push('\n');
    }
    wf
}

fn run(init: Init, wf: &Path) -> (Output, Value) {
    let out = udos(
        init,
        &[
            "run",
            "--hypervisor",
            "qemu",
            "--json",
            wf.to_str().unwrap(),
        ],
    );
    let report = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "stdout is not one JSON document ({e}): {}",
            String::from_utf8_lossy(&out.stdout)
        )
    });
    (out, report)
}

fn steps(report: &Value) -> &Vec<Value> {
    report["jobs"][0]["steps"].as_array().expect("steps")
}

/// Unique per test run, so nothing a previous run left can make a test pass.
fn nonce() -> String {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap();
    format!("{}-{}", std::process::id(), t.as_nanos())
}

fn sha256_file(path: &Path) -> String {
    hex::encode(Sha256::digest(std::fs::read(path).unwrap()))
}

/// Every path under `root` (not following symlinks) whose name contains `needle`.
fn find_named(root: &Path, needle: &str) -> Vec<PathBuf> {
    find(root, &|p, _| {
        p.file_name()
            .is_some_and(|n| n.to_string_lossy().contains(needle))
    })
}

/// Every regular file under `root` whose contents hold `needle`.
fn find_holding(root: &Path, needle: &str) -> Vec<PathBuf> {
    find(root, &|p, m| {
        m.is_file()
            && std::fs::read(p)
                .is_ok_and(|b| b.windows(needle.len()).any(|w| w == needle.as_bytes()))
    })
}

fn find(root: &Path, hit: &dyn Fn(&Path, &std::fs::Metadata) -> bool) -> Vec<PathBuf> {
    let mut hits = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for e in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            let p = e.path();
            let Ok(m) = std::fs::symlink_metadata(&p) else {
                continue;
            };
            if hit(&p, &m) {
                hits.push(p.clone());
            }
            if m.is_dir() {
                stack.push(p);
            }
        }
    }
    hits
}

/// Runs `args` as the local user `nobody`. (Not `setpriv --reuid`: it keeps root's
/// capabilities until the exec, so the exec itself ignores directory permissions.)
fn as_nobody(args: &[&str]) -> Output {
    let known = Command::new("id").arg("nobody").output().unwrap();
    assert!(
        known.status.success(),
        "these tests need the local user `nobody` (useradd --system nobody)"
    );
    Command::new("runuser")
        .args(["-u", "nobody", "--"])
        .args(args)
        .output()
        .expect("run runuser (util-linux)")
}

#[test]
fn a_guest_cannot_adopt_another_runs_layer() {
    let _g = serial();
    // A legitimate run keeps a secret in its layer.
    let secret = format!("secret-{}", nonce());
    let (_d1, wf) = repo(
        &workflow(
            1,
            &format!("mkdir -p /var/lib/app && echo {secret} > /var/lib/app/key"),
        ),
        &[],
    );
    let (out, report) = run(Init::Real, &wf);
    assert_eq!(out.status.code(), Some(0), "{report:#}");
    let victim = steps(&report)[0]["layer_id"].as_str().unwrap().to_string();
    let victim_erofs = state_dir().join("layers").join(format!("{victim}.erofs"));
    let victim_sum = sha256_file(&victim_erofs);

    // Another run's guest names that layer as its own output, with other bytes.
    let (_d2, wf) = repo(
        &workflow(1, "true"),
        &[(".udos-hostile", &format!("adopt {victim}\n"))],
    );
    let (out, report) = run(Init::Hostile, &wf);
    let step = &steps(&report)[0];
    assert_ne!(
        step["layer_id"].as_str(),
        Some(victim.as_str()),
        "the guest adopted the victim's layer: {step:#}"
    );
    assert!(step["layer_id"].is_null(), "{step:#}");
    assert_eq!(step["status"], "failure", "{step:#}");
    let error = step["error"].as_str().unwrap_or_default();
    assert!(error.contains("layer checksum mismatch"), "{error}");
    assert!(error.contains(&victim), "names the forged id: {error}");
    assert_eq!(out.status.code(), Some(1), "{report:#}");
    assert_eq!(
        sha256_file(&victim_erofs),
        victim_sum,
        "the victim's layer was touched"
    );

    // `udos restore` of that step gives the root without the secret.
    let run_id = report["run_id"].as_i64().unwrap().to_string();
    let t = tempfile::tempdir().unwrap();
    let target = t.path().join("root");
    let out = udos(
        Init::Real,
        &[
            "restore",
            &run_id,
            "1",
            "--target",
            target.to_str().unwrap(),
        ],
    );
    assert!(out.status.success());
    assert!(target.join("bin/busybox").is_file(), "base layer restored");
    assert_eq!(find_holding(&target, &secret), Vec::<PathBuf>::new());
}

#[test]
fn setuid_files_from_a_guest_are_out_of_local_users_reach() {
    let _g = serial();
    let st = state_dir();
    // A state dir as an older udos left it: every tree 0755.
    for d in [
        st.clone(),
        st.join("layers"),
        st.join("runs"),
        st.join("images"),
    ] {
        std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    // Control: `nobody` can run programs and reach the state dir's parent, so what
    // it cannot do below is udos's doing.
    assert!(
        as_nobody(&["true"]).status.success(),
        "runuser cannot run programs as nobody"
    );
    let parent = st.parent().unwrap().to_str().unwrap();
    assert!(
        as_nobody(&["stat", parent]).status.success(),
        "nobody cannot reach {parent}: put the target dir (or UDOS_HOSTILE_TEST_STATE) under a path every user may traverse, or this test proves nothing"
    );

    let (_d, wf) = repo(&workflow(1, "true"), &[(".udos-hostile", "setuid\n")]);
    let (out, report) = run(Init::Hostile, &wf);
    assert_eq!(out.status.code(), Some(0), "{report:#}");
    let layer = steps(&report)[0]["layer_id"].as_str().unwrap().to_string();
    let suid = st
        .join("layers")
        .join(&layer)
        .join("usr/local/bin/udos-hostile-suid");
    let sgid = st
        .join("layers")
        .join(&layer)
        .join("usr/local/bin/udos-hostile-sgid");

    // udos keeps the modes (a later step must see the setuid sudo a step installed):
    // the overlay-form tree the next step's erofs is made from has them...
    let m = std::fs::metadata(&suid).unwrap();
    assert_eq!((m.mode() & 0o7777, m.uid()), (0o4755, 0));
    assert_eq!(std::fs::metadata(&sgid).unwrap().mode() & 0o7777, 0o2755);
    // ...and the copy really would run as root: as root it reports euid 0.
    let as_root = Command::new(&suid).output().unwrap();
    assert!(String::from_utf8_lossy(&as_root.stdout).contains("euid=0"));

    // But no other local user can execute it, or even see that it exists.
    for path in [&suid, &sgid] {
        let p = path.to_str().unwrap();
        let exec = as_nobody(&[p]);
        let said = String::from_utf8_lossy(&exec.stdout);
        assert!(
            !exec.status.success() && !said.contains("euid="),
            "nobody ran the guest's {p}: {said}"
        );
        let stat = as_nobody(&["stat", p]);
        assert!(!stat.status.success(), "nobody can stat {p}");
        assert!(
            String::from_utf8_lossy(&stat.stderr).contains("Permission denied"),
            "{}",
            String::from_utf8_lossy(&stat.stderr)
        );
    }
    for d in ["layers", "runs", "images"] {
        let mode = std::fs::metadata(st.join(d)).unwrap().mode() & 0o777;
        assert_eq!(mode, 0o700, "{d} is {mode:o}");
    }
}

#[test]
fn escaping_paths_are_refused_and_nothing_lands_outside() {
    let _g = serial();
    let name = format!("udos-hostile-escape-{}", nonce());
    let plan =
        format!("escape-dotdot {name}-1\nescape-absolute {name}-2\nescape-symlink {name}-3\n");
    let (_d, wf) = repo(&workflow(3, "true"), &[(".udos-hostile", &plan)]);
    let (out, report) = run(Init::Hostile, &wf);
    assert_eq!(out.status.code(), Some(1), "{report:#}");
    let want = [
        "`..` component",
        "absolute path",
        "is a symlink or not a directory",
    ];
    for (step, why) in steps(&report).iter().zip(want) {
        assert_eq!(step["status"], "failure", "{step:#}");
        assert!(step["layer_id"].is_null(), "{step:#}");
        let error = step["error"].as_str().unwrap_or_default();
        assert!(
            error.contains("refusing layer entry") && error.contains(why),
            "{error}"
        );
    }
    assert_eq!(steps(&report).len(), 3);
    for i in 1..=3 {
        assert!(!Path::new(&format!("/tmp/{name}-{i}")).exists());
    }
    assert_eq!(
        find_named(&state_dir().join("layers"), &name),
        Vec::<PathBuf>::new()
    );
    assert_eq!(
        find_named(&state_dir().join("runs"), &name),
        Vec::<PathBuf>::new()
    );
}

#[test]
fn oversized_claims_are_refused() {
    let _g = serial();
    let plan = "oversized-layer-len\noversized-file\ntoo-many-entries\n";
    let (_d, wf) = repo(&workflow(3, "true"), &[(".udos-hostile", plan)]);
    let (out, report) = run(Init::Hostile, &wf);
    assert_eq!(out.status.code(), Some(1), "{report:#}");
    let want = [
        "extends beyond the end of the output device",
        "layer exceeds max_file_bytes: 1099511627776 >",
        "layer exceeds max_entries: 1000001 > 1000000",
    ];
    assert_eq!(steps(&report).len(), 3);
    for (step, why) in steps(&report).iter().zip(want) {
        assert_eq!(step["status"], "failure", "{step:#}");
        assert!(step["layer_id"].is_null(), "{step:#}");
        let error = step["error"].as_str().unwrap_or_default();
        assert!(error.contains(why), "{error}");
    }
    // Scratch is gone on every path (issue 8, item 8): no unpack directory (the
    // million-entry one included) and no step disk is left behind.
    let leftovers = find(&state_dir(), &|p: &Path, _| {
        let name = p
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        name.ends_with(".tmp") || name == "upper.img" || name == "output.img"
    });
    assert_eq!(leftovers, Vec::<PathBuf>::new());
}
