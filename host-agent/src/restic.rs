//! The restic repository through the restic CLI (driven with duct): where it is, how
//! to open it, and the calls restore, `udos gc` and the CLI snapshot path make.
//!
//! Every restic call pays ~0.7 s of key derivation. Layer snapshots therefore go
//! through one long-lived handle per run ([`crate::repository`]) when the repository
//! is a local directory; the CLI writes them ([`Repo::backup_full`], one `restic
//! backup` per layer) for other repository types or when `UDOS_SNAPSHOT_ENGINE=cli`
//! asks for it ([`Repo::engine`]). Snapshots are plain restic snapshots of the layer
//! in overlay form (whiteouts as 0/0 character devices, opaque dirs as the
//! `user.overlay.opaque` xattr): `restic restore` gives the layer back as it was.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde::Deserialize;

use crate::proc::{run_bounded, RunError};
use crate::repository::{Engine, ENGINE_VAR};

/// How long each kind of restic call may take before it is killed (SIGTERM first, so
/// restic can remove its lock).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// `init`, `cat config`, `snapshots`: metadata only.
    pub metadata: Duration,
    /// `backup` and `restore`: a layer's bytes.
    pub data: Duration,
}

impl Limits {
    /// Metadata calls cost ~0.7 s of key derivation plus a few small reads; five
    /// minutes covers a slow remote backend, and a call stuck on a lock or a dead
    /// backend ends.
    pub const METADATA: Duration = Duration::from_secs(5 * 60);
    /// A 209 MB layer backs up in ~1.7 s and restores in ~1.4 s locally: an hour is
    /// room for layers far larger over a slow link, and still a bound.
    pub const DATA: Duration = Duration::from_secs(60 * 60);
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            metadata: Limits::METADATA,
            data: Limits::DATA,
        }
    }
}

/// Which limit a restic call is under.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum CallKind {
    Metadata,
    Data,
}

/// Where the repository is and how to open it.
#[derive(Debug, Clone)]
pub struct Repo {
    /// `RESTIC_REPOSITORY` value (a path for the embedded default).
    pub location: String,
    /// How the password is given to restic.
    pub password: Password,
    /// Time limits of restic calls.
    pub limits: Limits,
    /// How layer snapshots are written (`UDOS_SNAPSHOT_ENGINE`).
    pub engine: Engine,
}

/// How restic gets the repository password.
#[derive(Debug, Clone)]
pub enum Password {
    /// `RESTIC_PASSWORD_FILE`.
    File(PathBuf),
    /// `RESTIC_PASSWORD` (taken from the caller's environment).
    Env(String),
}

/// Tags put on a layer snapshot.
#[derive(Debug, Clone, Default)]
pub struct Tags(pub Vec<(String, String)>);

impl Tags {
    /// Add `key=value`.
    pub fn with(mut self, key: &str, value: impl ToString) -> Self {
        self.0.push((key.to_string(), value.to_string()));
        self
    }
}

#[derive(Debug, Deserialize)]
struct Summary {
    message_type: String,
    #[serde(default)]
    snapshot_id: Option<String>,
}

/// A snapshot as `restic snapshots --json` lists it.
#[derive(Debug, Clone, Deserialize)]
pub struct SnapshotInfo {
    /// Full id.
    pub id: String,
    /// Tags, `key=value`.
    #[serde(default)]
    pub tags: Vec<String>,
}

impl Repo {
    /// The repository the environment names (`RESTIC_REPOSITORY`, with
    /// `RESTIC_PASSWORD_FILE` or `RESTIC_PASSWORD`), else the embedded default: a
    /// local repository in the state dir with a generated 0600 password file. The
    /// snapshot engine is the one `UDOS_SNAPSHOT_ENGINE` asks for (`auto` by default:
    /// rustic for a local directory, the CLI otherwise).
    pub fn from_env_or_default(state_dir: &Path) -> Result<Repo> {
        Repo::from_vars(state_dir, |name| std::env::var(name).ok())
    }

    /// [`Repo::from_env_or_default`] with the variables `var` gives (the environment,
    /// or a test's map).
    pub fn from_vars(state_dir: &Path, var: impl Fn(&str) -> Option<String>) -> Result<Repo> {
        let mut repo = Repo::from_vars_cli(state_dir, &var)?;
        let setting = var(ENGINE_VAR);
        repo.engine = Engine::choose(setting.as_deref(), repo.local_dir().is_some())?;
        Ok(repo)
    }

    /// A repository whose location and password the caller gives, with the engine
    /// `auto` picks for it.
    pub fn new(location: String, password: Password) -> Repo {
        let local = is_local(&location);
        Repo {
            location,
            password,
            limits: Limits::default(),
            engine: if local { Engine::Rustic } else { Engine::Cli },
        }
    }

    fn from_vars_cli(state_dir: &Path, var: &impl Fn(&str) -> Option<String>) -> Result<Repo> {
        if let Some(location) = var("RESTIC_REPOSITORY") {
            let password = if let Some(f) = var("RESTIC_PASSWORD_FILE") {
                Password::File(PathBuf::from(f))
            } else if let Some(p) = var("RESTIC_PASSWORD") {
                Password::Env(p)
            } else {
                bail!(
                    "RESTIC_REPOSITORY is set but neither RESTIC_PASSWORD_FILE nor RESTIC_PASSWORD is: \
                     set one of them, or unset RESTIC_REPOSITORY to use udos's own repository"
                );
            };
            return Ok(Repo::new(location, password));
        }
        let pw = state_dir.join("restic-password");
        if !pw.exists() {
            write_new_password(&pw)?;
        }
        Ok(Repo::new(
            state_dir.join("restic").display().to_string(),
            Password::File(pw),
        ))
    }

    /// A local directory, when the repository is one (enables listing snapshot ids
    /// without a restic call).
    pub fn local_dir(&self) -> Option<PathBuf> {
        is_local(&self.location).then(|| {
            PathBuf::from(
                self.location
                    .strip_prefix("local:")
                    .unwrap_or(&self.location),
            )
        })
    }

    fn cmd(&self, args: Vec<String>) -> duct::Expression {
        let mut e = duct::cmd("restic", args)
            .env("RESTIC_REPOSITORY", &self.location)
            .env_remove("RESTIC_PASSWORD_COMMAND");
        e = match &self.password {
            Password::File(f) => e
                .env("RESTIC_PASSWORD_FILE", f)
                .env_remove("RESTIC_PASSWORD"),
            Password::Env(p) => e
                .env("RESTIC_PASSWORD", p)
                .env_remove("RESTIC_PASSWORD_FILE"),
        };
        e
    }

    fn run(&self, kind: CallKind, args: Vec<String>, dir: Option<&Path>) -> Result<String> {
        let what = format!("restic {}", args.first().map(String::as_str).unwrap_or(""));
        let mut e = self
            .cmd(args)
            .stdin_null()
            .stdout_capture()
            .stderr_capture()
            .unchecked();
        if let Some(d) = dir {
            e = e.dir(d);
        }
        let limit = match kind {
            CallKind::Metadata => self.limits.metadata,
            CallKind::Data => self.limits.data,
        };
        let out =
            run_bounded(&e, limit, &what).map_err(|err| match err.downcast_ref::<RunError>() {
                Some(r) if r.is_not_found() => anyhow::anyhow!(
                    "restic is not installed: install it (`apt-get install restic`)"
                ),
                _ => anyhow::anyhow!("{err:#} (repository {})", self.location),
            })?;
        if !out.status.success() {
            let stderr = String::from_utf8_lossy(&out.stderr);
            bail!(
                "{what} failed on {}: {}{}",
                self.location,
                stderr.trim(),
                hint(&stderr)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Create the repository if it does not exist yet. With the rustic engine, a
    /// local directory is only checked here: the run's repository handle creates it
    /// on the snapshot thread ([`crate::repository::LayerRepository::open`]), off the
    /// critical path.
    pub fn ensure_initialized(&self) -> Result<()> {
        if let Some(dir) = self.local_dir() {
            if dir.join("config").exists() {
                return Ok(());
            }
            if dir.exists() && std::fs::read_dir(&dir)?.next().is_some() {
                bail!(
                    "{} exists and is not a restic repository (no `config`): move it away or set RESTIC_REPOSITORY",
                    dir.display()
                );
            }
            if self.engine == Engine::Rustic {
                return Ok(());
            }
        } else if self
            .run(
                CallKind::Metadata,
                vec!["cat".into(), "config".into()],
                None,
            )
            .is_ok()
        {
            return Ok(());
        }
        self.run(
            CallKind::Metadata,
            vec!["init".into(), "--quiet".into()],
            None,
        )
        .context("creating the restic repository")?;
        Ok(())
    }

    /// Back up the contents of `dir` (stored at the snapshot's root) with `tags`.
    /// Returns the snapshot id restic printed (short in restic 0.14).
    pub fn backup(&self, dir: &Path, tags: &Tags) -> Result<String> {
        let mut args: Vec<String> = vec![
            "backup".into(),
            "--json".into(),
            "--quiet".into(),
            "--host".into(),
            "udos".into(),
        ];
        for (k, v) in &tags.0 {
            args.push("--tag".into());
            args.push(format!("{k}={v}"));
        }
        args.push(".".into());
        let out = self
            .run(CallKind::Data, args, Some(dir))
            .with_context(|| format!("snapshotting layer {}", dir.display()))?;
        out.lines()
            .filter_map(|l| serde_json::from_str::<Summary>(l).ok())
            .find(|s| s.message_type == "summary")
            .and_then(|s| s.snapshot_id)
            .context("restic backup printed no summary with a snapshot id")
    }

    /// [`Repo::backup`], then the snapshot's full id (for a local repository, from the
    /// `snapshots/` directory; otherwise one more restic call).
    pub fn backup_full(&self, dir: &Path, tags: &Tags) -> Result<String> {
        let short = self.backup(dir, tags)?;
        let mut full = self.resolve_ids(std::slice::from_ref(&short))?;
        full.pop()
            .with_context(|| format!("snapshot {short} not found"))
    }

    /// Full ids of the snapshots with the given short ids (prefixes). For a local
    /// repository this reads the `snapshots/` directory (file names are the ids);
    /// otherwise it asks restic once.
    pub fn resolve_ids(&self, short: &[String]) -> Result<Vec<String>> {
        let all: Vec<String> = match self.local_dir() {
            Some(dir) => std::fs::read_dir(dir.join("snapshots"))
                .with_context(|| format!("listing {}/snapshots", dir.display()))?
                .filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect(),
            None => self.snapshots(&[])?.into_iter().map(|s| s.id).collect(),
        };
        short
            .iter()
            .map(|s| {
                let mut m = all.iter().filter(|id| id.starts_with(s.as_str()));
                match (m.next(), m.next()) {
                    (Some(id), None) => Ok(id.clone()),
                    (None, _) => bail!("snapshot {s} not found in {}", self.location),
                    (Some(_), Some(_)) => bail!("snapshot id {s} is ambiguous"),
                }
            })
            .collect()
    }

    /// `restic snapshots --json`, optionally filtered by tags (all must match).
    /// A local repository not created yet (the snapshot thread creates it on a run's
    /// first layer) has none.
    pub fn snapshots(&self, tags: &[String]) -> Result<Vec<SnapshotInfo>> {
        if self.local_dir().is_some_and(|d| !d.exists()) {
            return Ok(Vec::new());
        }
        let mut args: Vec<String> = vec!["snapshots".into(), "--json".into()];
        if !tags.is_empty() {
            args.push("--tag".into());
            args.push(tags.join(","));
        }
        let out = self.run(CallKind::Metadata, args, None)?;
        serde_json::from_str(&out).context("parsing `restic snapshots --json`")
    }

    /// Restore a snapshot into `target` (which must exist).
    pub fn restore(&self, snapshot: &str, target: &Path) -> Result<()> {
        self.run(
            CallKind::Data,
            vec![
                "restore".into(),
                snapshot.into(),
                "--target".into(),
                target.display().to_string(),
            ],
            None,
        )
        .with_context(|| format!("restoring snapshot {snapshot}"))?;
        Ok(())
    }
}

impl Repo {
    /// Forgets the snapshots `ids` (full or short ids) without touching their data:
    /// [`Repo::prune`] frees what no remaining snapshot uses. Ids go to restic in
    /// batches, so a long list never exceeds the command line's limit.
    pub fn forget(&self, ids: &[String]) -> Result<()> {
        for batch in ids.chunks(FORGET_BATCH) {
            let mut args: Vec<String> = vec!["forget".into(), "--quiet".into()];
            args.extend(batch.iter().cloned());
            self.run(CallKind::Metadata, args, None)
                .with_context(|| format!("forgetting {} snapshots", batch.len()))?;
        }
        Ok(())
    }

    /// Removes the data no snapshot refers to any more (`restic prune`). It takes the
    /// repository's exclusive lock and rewrites packs: a data call.
    pub fn prune(&self) -> Result<()> {
        self.run(CallKind::Data, vec!["prune".into(), "--quiet".into()], None)
            .context("pruning the repository")?;
        Ok(())
    }
}

/// Whether `location` names a local directory (restic's `local:` or a path).
fn is_local(location: &str) -> bool {
    let l = location.strip_prefix("local:").unwrap_or(location);
    l.starts_with('/') || l.starts_with('.')
}

/// Snapshot ids per `restic forget` call.
const FORGET_BATCH: usize = 64;

fn hint(stderr: &str) -> &'static str {
    if stderr.contains("already locked") || stderr.contains("unable to create lock") {
        "\nhint: another restic process holds the lock; if none is running, remove a stale lock with `restic unlock`"
    } else if stderr.contains("wrong password") || stderr.contains("no key found") {
        "\nhint: check RESTIC_PASSWORD_FILE / RESTIC_PASSWORD"
    } else if stderr.contains("no space left") {
        "\nhint: the repository's disk is full: free space, then run again"
    } else if stderr.contains("Is there a repository") {
        "\nhint: the repository does not exist or is unreadable"
    } else {
        ""
    }
}

fn write_new_password(path: &Path) -> Result<()> {
    use std::io::{Read, Write};
    use std::os::unix::fs::OpenOptionsExt;
    let mut bytes = [0u8; 32];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bytes))
        .context("reading /dev/urandom")?;
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)?;
    }
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    writeln!(f, "{}", hex::encode(bytes))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    fn dir_bytes(dir: &Path) -> u64 {
        let mut n = 0;
        let mut todo = vec![dir.to_path_buf()];
        while let Some(p) = todo.pop() {
            let md = std::fs::symlink_metadata(&p).unwrap();
            if md.is_dir() {
                todo.extend(std::fs::read_dir(&p).unwrap().map(|e| e.unwrap().path()));
            } else {
                n += md.len();
            }
        }
        n
    }

    /// A local repository that does not exist yet lists no snapshots (`udos gc`
    /// before any run); a directory that is not a repository is still an error.
    #[test]
    fn a_local_repository_not_created_yet_has_no_snapshots() {
        let dir = tempfile::tempdir().unwrap();
        let repo = Repo::new(
            dir.path().join("repo").display().to_string(),
            Password::Env("test".into()),
        );
        assert!(repo.snapshots(&[]).unwrap().is_empty());
        std::fs::create_dir(dir.path().join("repo")).unwrap();
        assert!(repo.snapshots(&[]).is_err());
    }

    /// A real repository: forgetting a snapshot leaves the other, and pruning then
    /// frees the data only the forgotten one held.
    #[test]
    fn forget_then_prune_frees_only_the_forgotten_snapshots_data() {
        let dir = tempfile::tempdir().unwrap();
        let repo = Repo {
            engine: Engine::Cli,
            ..Repo::new(
                dir.path().join("repo").display().to_string(),
                Password::Env("test".into()),
            )
        };
        repo.ensure_initialized().unwrap();
        let mut shorts = Vec::new();
        for (name, seed) in [("a", 1u32), ("b", 2u32)] {
            let d = dir.path().join(name);
            std::fs::create_dir(&d).unwrap();
            // 2 MiB that do not compress or deduplicate.
            let mut x = seed;
            let bytes: Vec<u8> = (0..2 * 1024 * 1024)
                .map(|_| {
                    x = x.wrapping_mul(1_103_515_245).wrapping_add(12_345);
                    (x >> 16) as u8
                })
                .collect();
            std::fs::write(d.join("data"), bytes).unwrap();
            shorts.push(repo.backup(&d, &Tags::default().with("t", name)).unwrap());
        }
        let ids = repo.resolve_ids(&shorts).unwrap();
        let before = dir_bytes(&dir.path().join("repo"));
        repo.forget(&ids[..1]).unwrap();
        let left: Vec<String> = repo
            .snapshots(&[])
            .unwrap()
            .into_iter()
            .map(|s| s.id)
            .collect();
        assert_eq!(left, vec![ids[1].clone()]);
        repo.prune().unwrap();
        let after = dir_bytes(&dir.path().join("repo"));
        assert!(
            before - after > 1024 * 1024 && after > 2 * 1024 * 1024,
            "{before} -> {after}"
        );
        let back = dir.path().join("back");
        std::fs::create_dir(&back).unwrap();
        repo.restore(&ids[1], &back).unwrap();
        assert_eq!(
            std::fs::read(back.join("data")).unwrap(),
            std::fs::read(dir.path().join("b/data")).unwrap()
        );
    }

    #[test]
    fn a_hung_restic_is_killed_at_its_limit_and_named() {
        // restic reading its password from a FIFO that nobody writes blocks for ever:
        // the real program, hung for real.
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("password");
        duct::cmd!("mkfifo", &fifo).run().unwrap();
        // An existing directory, so `snapshots` asks restic.
        std::fs::create_dir(dir.path().join("repo")).unwrap();
        let limit = Duration::from_millis(800);
        let repo = Repo {
            limits: Limits {
                metadata: limit,
                data: limit,
            },
            ..Repo::new(
                dir.path().join("repo").display().to_string(),
                Password::File(fifo),
            )
        };
        let (tx, rx) = std::sync::mpsc::channel();
        let t = Instant::now();
        let r = repo.clone();
        std::thread::spawn(move || tx.send(r.snapshots(&[]).map(|_| ())));
        let res = rx
            .recv_timeout(limit + crate::proc::TERM_GRACE + Duration::from_secs(10))
            .expect("restic snapshots was not bounded");
        let err = format!("{:#}", res.unwrap_err());
        assert!(
            err.contains("restic snapshots did not finish within 800 ms and was killed"),
            "{err}"
        );
        assert!(
            t.elapsed() < limit + Duration::from_secs(5),
            "{:?}",
            t.elapsed()
        );

        let (tx, rx) = std::sync::mpsc::channel();
        let layer = dir.path().join("layer");
        std::fs::create_dir(&layer).unwrap();
        std::thread::spawn(move || tx.send(repo.backup(&layer, &Tags::default()).map(drop)));
        let err = format!(
            "{:#}",
            rx.recv_timeout(Duration::from_secs(20))
                .expect("restic backup was not bounded")
                .unwrap_err()
        );
        assert!(err.contains("restic backup did not finish within"), "{err}");
    }
}
