//! Real repositories in temporary directories, read back with the `restic` CLI.

use std::collections::BTreeMap;
use std::os::unix::fs::{MetadataExt, PermissionsExt};

use super::*;
use crate::restic::Repo;

/// A `restic` call on the repository `dir` with `password` in `RESTIC_PASSWORD`.
fn restic(dir: &Path, password: &str, args: &[&str]) -> std::process::Output {
    duct::cmd("restic", args)
        .env("RESTIC_REPOSITORY", dir)
        .env("RESTIC_PASSWORD", password)
        .env_remove("RESTIC_PASSWORD_FILE")
        .stdout_capture()
        .stderr_capture()
        .unchecked()
        .run()
        .unwrap()
}

fn restic_ok(dir: &Path, password: &str, args: &[&str]) -> String {
    let out = restic(dir, password, args);
    assert!(
        out.status.success(),
        "restic {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// `restic snapshots --json`: id, host, paths and tags of each snapshot.
#[derive(Debug, serde::Deserialize)]
struct Listed {
    id: String,
    hostname: String,
    paths: Vec<PathBuf>,
    #[serde(default)]
    tags: Vec<String>,
}

fn listed(dir: &Path, password: &str) -> Vec<Listed> {
    serde_json::from_str(&restic_ok(dir, password, &["snapshots", "--json"])).unwrap()
}

fn layer_tags(n: usize) -> Tags {
    Tags::default()
        .with("udos", "layer")
        .with("run", 7)
        .with("step", n)
        .with("layer", format!("layer{n}"))
}

fn small_layer(dir: &Path, n: usize) {
    std::fs::create_dir_all(dir.join("etc")).unwrap();
    std::fs::write(dir.join("etc/step"), format!("step {n}\n")).unwrap();
}

/// Snapshots written through the handle are plain restic snapshots: listed by
/// `restic snapshots` with the full ids the handle returned, host `udos`, the layer
/// directory as path and the tags; `restic check` passes on the repository the handle
/// created; the layer's files are at the snapshot's root.
#[test]
fn snapshots_are_listed_by_restic_with_full_ids_and_tags_and_check_passes() {
    let tmp = tempfile::tempdir().unwrap();
    let repo_dir = tmp.path().join("repo");
    let handle = LayerRepository::open(&repo_dir, &Password::Env("pw".into())).unwrap();
    let mut written = BTreeMap::new();
    for n in 0..3 {
        let layer = tmp.path().join(format!("layer{n}"));
        small_layer(&layer, n);
        let id = handle.backup(&layer, &layer_tags(n)).unwrap();
        assert_eq!(id.len(), 64, "a full id: {id}");
        written.insert(id, (layer, n));
    }
    let snaps = listed(&repo_dir, "pw");
    assert_eq!(snaps.len(), 3);
    for s in snaps {
        let (layer, n) = &written[&s.id];
        assert_eq!(s.hostname, "udos");
        assert_eq!(s.paths, vec![layer.clone()]);
        let mut want: Vec<String> = layer_tags(*n)
            .0
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        let mut got = s.tags.clone();
        want.sort();
        got.sort();
        assert_eq!(got, want);
        let ls = restic_ok(&repo_dir, "pw", &["ls", &s.id]);
        assert!(ls.lines().any(|l| l == "/etc/step"), "{ls}");
    }
    restic_ok(&repo_dir, "pw", &["check", "--read-data"]);
    // The format restic 0.14 writes (v2: compressed with zstd).
    let config: serde_json::Value =
        serde_json::from_str(&restic_ok(&repo_dir, "pw", &["cat", "config"])).unwrap();
    assert_eq!(config["version"], 2, "{config}");
    // No lock is left behind.
    assert_eq!(
        std::fs::read_dir(repo_dir.join("locks")).unwrap().count(),
        0
    );
}

/// A repository `restic init` created (the CLI engine's, or an older udos's) is
/// written by the handle, and `restic backup` still writes to it afterwards.
#[test]
fn a_repository_restic_created_is_shared_with_the_cli() {
    let tmp = tempfile::tempdir().unwrap();
    let repo_dir = tmp.path().join("repo");
    let cli = Repo {
        engine: Engine::Cli,
        ..Repo::new(repo_dir.display().to_string(), Password::Env("pw".into()))
    };
    cli.ensure_initialized().unwrap();
    let layer = tmp.path().join("layer");
    small_layer(&layer, 1);
    let handle = LayerRepository::open(&repo_dir, &cli.password).unwrap();
    let ours = handle.backup(&layer, &layer_tags(1)).unwrap();
    let theirs = cli.backup_full(&layer, &layer_tags(2)).unwrap();
    let mut ids: Vec<String> = listed(&repo_dir, "pw").into_iter().map(|s| s.id).collect();
    ids.sort();
    let mut want = vec![ours, theirs];
    want.sort();
    assert_eq!(ids, want);
    restic_ok(&repo_dir, "pw", &["check", "--read-data"]);
}

/// One file of a layer as it is on disk: what overlayfs and `udos_layer::apply`
/// rely on.
#[derive(Debug, PartialEq, Eq)]
struct Entry {
    mode: u32,
    uid: u32,
    gid: u32,
    rdev: u64,
    content: Option<Vec<u8>>,
    link: Option<PathBuf>,
    xattrs: BTreeMap<String, Vec<u8>>,
}

fn entry(path: &Path) -> Entry {
    let md = std::fs::symlink_metadata(path).unwrap();
    let xattrs = xattr::list(path)
        .unwrap()
        .map(|n| {
            let v = xattr::get(path, &n).unwrap().unwrap_or_default();
            (n.to_string_lossy().into_owned(), v)
        })
        .collect();
    Entry {
        mode: md.mode(),
        uid: md.uid(),
        gid: md.gid(),
        rdev: md.rdev(),
        content: md.is_file().then(|| std::fs::read(path).unwrap()),
        link: md
            .file_type()
            .is_symlink()
            .then(|| std::fs::read_link(path).unwrap()),
        xattrs,
    }
}

/// Every entry under `root` (relative path to what it is), not following symlinks.
fn tree(root: &Path) -> BTreeMap<PathBuf, Entry> {
    let mut out = BTreeMap::new();
    let mut todo = vec![root.to_path_buf()];
    while let Some(dir) = todo.pop() {
        for e in std::fs::read_dir(&dir).unwrap() {
            let p = e.unwrap().path();
            if std::fs::symlink_metadata(&p).unwrap().is_dir() {
                todo.push(p.clone());
            }
            out.insert(p.strip_prefix(root).unwrap().to_path_buf(), entry(&p));
        }
    }
    out
}

/// A layer in overlay form with every kind of entry a step can leave: a whiteout
/// (0/0 character device), an opaque directory (`user.overlay.opaque` xattr), a setuid
/// file, a hardlink, a symlink, an empty file, a file owned by someone else and one
/// large enough to be cut into several chunks.
fn rich_layer(dir: &Path) {
    std::fs::create_dir_all(dir.join("usr/bin")).unwrap();
    std::fs::write(dir.join("usr/bin/tool"), b"#!/bin/sh\necho hi\n").unwrap();
    std::fs::set_permissions(
        dir.join("usr/bin/tool"),
        std::fs::Permissions::from_mode(0o4755),
    )
    .unwrap();
    std::fs::hard_link(dir.join("usr/bin/tool"), dir.join("usr/bin/tool-again")).unwrap();
    std::os::unix::fs::symlink("tool", dir.join("usr/bin/alias")).unwrap();
    std::fs::create_dir_all(dir.join("etc")).unwrap();
    duct::cmd!("mknod", dir.join("etc/removed"), "c", "0", "0")
        .run()
        .unwrap();
    std::fs::create_dir_all(dir.join("var/cache")).unwrap();
    xattr::set(dir.join("var/cache"), "user.overlay.opaque", b"y").unwrap();
    std::fs::write(dir.join("var/cache/fresh"), b"").unwrap();
    std::fs::write(dir.join("var/owned"), b"theirs").unwrap();
    std::os::unix::fs::lchown(dir.join("var/owned"), Some(1234), Some(5678)).unwrap();
    let big: Vec<u8> = (0..6_000_000u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    std::fs::write(dir.join("var/big"), big).unwrap();
}

/// `restic restore` of a snapshot written through the handle gives the layer back
/// exactly: modes (setuid), owners, the whiteout device, the opaque xattr, symlink
/// targets, contents, and the hardlink as one inode.
#[test]
fn restic_restore_gives_a_layer_back_with_whiteouts_xattrs_setuid_and_links() {
    let tmp = tempfile::tempdir().unwrap();
    let repo_dir = tmp.path().join("repo");
    let layer = tmp.path().join("layer");
    rich_layer(&layer);
    let before = tree(&layer);
    assert_eq!(before[Path::new("etc/removed")].rdev, 0);
    assert!(before[Path::new("var/cache")]
        .xattrs
        .contains_key("user.overlay.opaque"));

    let handle = LayerRepository::open(&repo_dir, &Password::Env("pw".into())).unwrap();
    let id = handle.backup(&layer, &layer_tags(1)).unwrap();
    let target = tmp.path().join("restored");
    std::fs::create_dir(&target).unwrap();
    let cli = Repo::new(repo_dir.display().to_string(), Password::Env("pw".into()));
    cli.restore(&id, &target).unwrap();

    let after = tree(&target);
    assert_eq!(after, before);
    let ino = |p: &str| std::fs::metadata(target.join(p)).unwrap().ino();
    assert_eq!(
        ino("usr/bin/tool"),
        ino("usr/bin/tool-again"),
        "hardlink kept"
    );
    restic_ok(&repo_dir, "pw", &["check"]);
}

/// The repository and password the environment names are the ones written:
/// `RESTIC_REPOSITORY` + `RESTIC_PASSWORD`, and `RESTIC_PASSWORD_FILE` (read as restic
/// reads it, without the trailing newline), each checked by the restic CLI given the
/// same variables. A wrong password is refused, with a hint.
#[test]
fn the_restic_environment_variables_are_honoured() {
    let tmp = tempfile::tempdir().unwrap();
    let layer = tmp.path().join("layer");
    small_layer(&layer, 1);
    let state = tmp.path().join("state");
    std::fs::create_dir(&state).unwrap();

    let by_env = tmp.path().join("by-env");
    let vars = BTreeMap::from([
        ("RESTIC_REPOSITORY", by_env.display().to_string()),
        ("RESTIC_PASSWORD", "from the env".to_string()),
    ]);
    let repo = Repo::from_vars(&state, |k| vars.get(k).cloned()).unwrap();
    assert_eq!(repo.engine, Engine::Rustic);
    let dir = repo.local_dir().unwrap();
    let id = LayerRepository::open(&dir, &repo.password)
        .unwrap()
        .backup(&layer, &layer_tags(1))
        .unwrap();
    let ids: Vec<String> = listed(&by_env, "from the env")
        .into_iter()
        .map(|s| s.id)
        .collect();
    assert_eq!(ids, vec![id]);
    assert!(
        !state.join("restic").exists(),
        "the default repository is not used"
    );

    let by_file = tmp.path().join("by-file");
    let pw_file = tmp.path().join("pw");
    std::fs::write(&pw_file, "in a file\n").unwrap();
    let vars = BTreeMap::from([
        ("RESTIC_REPOSITORY", format!("local:{}", by_file.display())),
        ("RESTIC_PASSWORD_FILE", pw_file.display().to_string()),
        (
            "RESTIC_PASSWORD",
            "ignored when a file is named".to_string(),
        ),
    ]);
    let repo = Repo::from_vars(&state, |k| vars.get(k).cloned()).unwrap();
    let id = LayerRepository::open(&repo.local_dir().unwrap(), &repo.password)
        .unwrap()
        .backup(&layer, &layer_tags(1))
        .unwrap();
    let out = duct::cmd!("restic", "snapshots", "--json")
        .env("RESTIC_REPOSITORY", &vars["RESTIC_REPOSITORY"])
        .env("RESTIC_PASSWORD_FILE", &pw_file)
        .env_remove("RESTIC_PASSWORD")
        .read()
        .unwrap();
    let snaps: Vec<Listed> = serde_json::from_str(&out).unwrap();
    assert_eq!(snaps.len(), 1);
    assert_eq!(snaps[0].id, id);

    let wrong = LayerRepository::open(&by_file, &Password::Env("wrong".into())).unwrap_err();
    assert!(wrong.to_string().contains("hint:"), "{wrong}");
}

/// `auto` writes a local directory through the handle and anything else through the
/// CLI; asking for rustic on a remote repository, or for an unknown engine, is an
/// error, never a silent fallback.
#[test]
fn the_engine_is_chosen_explicitly() {
    assert_eq!(Engine::choose(None, true).unwrap(), Engine::Rustic);
    assert_eq!(Engine::choose(Some("auto"), false).unwrap(), Engine::Cli);
    assert_eq!(Engine::choose(Some("cli"), true).unwrap(), Engine::Cli);
    assert!(matches!(
        Engine::choose(Some("rustic"), false),
        Err(RepositoryError::RusticNeedsLocal)
    ));
    assert!(matches!(
        Engine::choose(Some("fast"), true),
        Err(RepositoryError::UnknownEngine(_))
    ));
    let state = tempfile::tempdir().unwrap();
    let vars = BTreeMap::from([
        ("RESTIC_REPOSITORY", "sftp:host:/srv/repo".to_string()),
        ("RESTIC_PASSWORD", "pw".to_string()),
    ]);
    let repo = Repo::from_vars(state.path(), |k| vars.get(k).cloned()).unwrap();
    assert_eq!(repo.engine, Engine::Cli);
}

/// While a backup holds its lock, restic sees it: `restic check` (which needs an
/// exclusive lock) refuses to run; once the lock is dropped it runs.
#[test]
fn restic_sees_the_lock_a_backup_holds() {
    let tmp = tempfile::tempdir().unwrap();
    let repo_dir = tmp.path().join("repo");
    let handle = LayerRepository::open(&repo_dir, &Password::Env("pw".into())).unwrap();
    let held = lock::RepoLock::acquire(&repo_dir, &handle.key).unwrap();
    let out = restic(&repo_dir, "pw", &["check", "--no-lock"]);
    assert!(out.status.success(), "--no-lock ignores it");
    let locks = restic_ok(&repo_dir, "pw", &["list", "locks", "--no-lock"]);
    assert_eq!(locks.lines().count(), 1, "{locks}");
    let out = restic(&repo_dir, "pw", &["check"]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("locked"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    drop(held);
    restic_ok(&repo_dir, "pw", &["check"]);
}
