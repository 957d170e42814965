//! Layer snapshots through one long-lived handle on the restic repository
//! ([`rustic_core`]): a run derives the repository key once, on the snapshot thread
//! while the first VM boots, instead of once per `restic` process (~0.7 s each).
//!
//! A snapshot written here is what `restic backup .` run in the layer directory
//! writes: the layer's contents at the snapshot's root, the directory as its path,
//! host `udos`, the same tags (a comma splits a tag, as `--tag` does). So
//! `restic snapshots`, `restic restore`, `restic check`, the restore code and
//! `udos gc` (all through the restic CLI) read them as before. While it writes, a
//! backup holds a non-exclusive restic lock ([`lock`]), as `restic backup` does, so a
//! concurrent `restic prune` cannot remove its packs before its snapshot exists.
//!
//! rustic_core is built here with its local backend only: other repository types go
//! through the restic CLI ([`Engine::Cli`]), chosen up front, never as a silent retry.

mod lock;

use std::io::Read;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::{Arc, Mutex};

use rustic_backend::LocalBackend;
use rustic_core::repofile::{MasterKey, SnapshotFile};
use rustic_core::{
    BackupOptions, ConfigOptions, Credentials, KeyOptions, LocalSource, LocalSourceFilterOptions,
    LocalSourceSaveOptions, OpenStatus, ParentOptions, ReadSource, ReadSourceEntry, ReadSourceOpen,
    Repository, RepositoryBackends, RepositoryOptions, RusticError, RusticResult, SnapshotOptions,
};

use crate::restic::{Password, Tags};

pub use lock::LockError;

/// The environment variable that picks how layers are snapshotted: `rustic`, `cli`,
/// or `auto` (the default: rustic for a local repository, the CLI otherwise).
pub const ENGINE_VAR: &str = "UDOS_SNAPSHOT_ENGINE";

/// How layer snapshots are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Engine {
    /// One [`LayerRepository`] per run: the key derived once, off the critical path.
    Rustic,
    /// One `restic backup` process per layer (any repository type restic knows).
    Cli,
}

impl Engine {
    /// The engine `setting` (the value of [`ENGINE_VAR`], `None` when unset) asks for,
    /// for a repository that is a local directory (`local`) or not.
    pub fn choose(setting: Option<&str>, local: bool) -> Result<Engine, RepositoryError> {
        match setting.map(str::trim) {
            None | Some("") | Some("auto") if local => Ok(Engine::Rustic),
            None | Some("") | Some("auto") | Some("cli") => Ok(Engine::Cli),
            Some("rustic") if local => Ok(Engine::Rustic),
            Some("rustic") => Err(RepositoryError::RusticNeedsLocal),
            Some(other) => Err(RepositoryError::UnknownEngine(other.to_string())),
        }
    }

    /// What it is, for logs and notices.
    pub fn describe(self) -> &'static str {
        match self {
            Engine::Rustic => "rustic_core, one repository handle per run",
            Engine::Cli => "the restic CLI, one process per layer",
        }
    }
}

/// Why the repository could not be opened or a layer not snapshotted.
#[derive(Debug, thiserror::Error)]
pub enum RepositoryError {
    /// [`ENGINE_VAR`] holds something else than `auto`, `rustic` or `cli`.
    #[error("{ENGINE_VAR}={0} is not `auto`, `rustic` or `cli`")]
    UnknownEngine(String),
    /// [`ENGINE_VAR`] asks for rustic on a repository that is not a local directory.
    #[error(
        "{ENGINE_VAR}=rustic needs a local repository (a directory); \
         this udos writes other repository types through the restic CLI: set {ENGINE_VAR}=cli or unset it"
    )]
    RusticNeedsLocal,
    /// The password file cannot be read.
    #[error("reading the repository password from {path}: {source}")]
    PasswordFile {
        /// The file (`RESTIC_PASSWORD_FILE`).
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The directory holds something else than a restic repository.
    #[error(
        "{0} exists and is not a restic repository (no `config`): move it away or set RESTIC_REPOSITORY"
    )]
    NotARepository(PathBuf),
    /// A file operation on the repository or the layer failed.
    #[error("{what} {path}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// On what.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// rustic_core failed.
    #[error("{what} {location}: {}{}", .error.display_log(), hint(.error))]
    Rustic {
        /// What was being done.
        what: &'static str,
        /// The repository (or the layer).
        location: String,
        /// Why (said in the message: its own `Display` spans many lines).
        error: Box<RusticError>,
    },
    /// The layer could not be read whole; the partial snapshot was removed.
    #[error("snapshotting layer {dir}: {count} entries could not be read, first: {first}")]
    Unreadable {
        /// The layer directory.
        dir: PathBuf,
        /// How many entries failed.
        count: usize,
        /// The first failure.
        first: String,
    },
    /// The restic lock could not be taken.
    #[error(transparent)]
    Lock(#[from] LockError),
}

fn hint(e: &RusticError) -> &'static str {
    let text = e.display_log().to_lowercase();
    if text.contains("password") {
        "\nhint: check RESTIC_PASSWORD_FILE / RESTIC_PASSWORD"
    } else if text.contains("no space left") {
        "\nhint: the repository's disk is full: free space, then run again"
    } else {
        ""
    }
}

/// The host name snapshots carry, as the CLI path gives `restic backup --host udos`.
const HOST: &str = "udos";

/// An open restic repository in a local directory: the key is derived once, in
/// [`LayerRepository::open`]; each [`LayerRepository::backup`] then only reads the
/// index and writes the layer.
pub struct LayerRepository {
    /// The repository, not opened: each backup opens it with `key` (no derivation).
    unopened: Repository<()>,
    /// The master key, decrypted once from the repository's key file.
    key: MasterKey,
    dir: PathBuf,
}

impl std::fmt::Debug for LayerRepository {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LayerRepository")
            .field("dir", &self.dir)
            .finish_non_exhaustive()
    }
}

impl LayerRepository {
    /// Opens the repository in `dir` with `password` (deriving the key), creating it
    /// when `dir` is missing or empty, as `restic init` would.
    pub fn open(dir: &Path, password: &Password) -> Result<LayerRepository, RepositoryError> {
        let credentials = Credentials::password(read_password(password)?);
        let repo = unopened(dir)?;
        let exists = |repo: &Repository<()>| {
            repo.config_id()
                .map(|c| c.is_some())
                .map_err(rustic_err("reading the config of", dir))
        };
        let open = if exists(&repo)? {
            repo.open(&credentials)
                .map_err(rustic_err("opening the repository", dir))?
        } else {
            // Two udos processes never create the same repository at once.
            let _guard = lock_dir(dir)?;
            if exists(&repo)? {
                repo.open(&credentials)
                    .map_err(rustic_err("opening the repository", dir))?
            } else {
                create(repo, dir, &credentials)?
            }
        };
        Ok(LayerRepository {
            unopened: unopened(dir)?,
            key: open.key(),
            dir: dir.to_path_buf(),
        })
    }

    /// The repository's directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Backs up the contents of `layer` as a snapshot with `tags` and returns its full
    /// id. Every entry must be read: a layer with an unreadable file is an error (and
    /// leaves no snapshot), not a restore point missing that file.
    pub fn backup(&self, layer: &Path, tags: &Tags) -> Result<String, RepositoryError> {
        let _lock = lock::RepoLock::acquire(&self.dir, &self.key)?;
        // Opened with the master key: reads the config, derives nothing. Then the
        // index as it is now, with what earlier backups (this handle's or another
        // process's) stored: their blobs are not stored again.
        let indexed = self
            .unopened
            .clone()
            .open(&Credentials::Masterkey(self.key.clone()))
            .map_err(rustic_err("opening the repository", &self.dir))?
            .to_indexed_ids()
            .map_err(rustic_err("reading the index of", &self.dir))?;
        let snap = SnapshotFile::from_options(&snapshot_options(tags)?)
            .map_err(rustic_err("describing a snapshot in", &self.dir))?;
        let snap = SnapshotFile {
            username: username(),
            ..snap
        };
        let source = StrictSource::new(layer)?;
        // No parent: a layer directory is written once, so every file is new; looking
        // for a parent would read every snapshot file of the repository.
        let opts = BackupOptions::default()
            .no_scan(true)
            .parent_opts(ParentOptions::default().force(true));
        let saved = indexed
            .archive(&opts, &source, snap, &[layer.to_path_buf()])
            .map_err(rustic_err("writing a snapshot to", &self.dir))?;
        let failures = source.failures();
        if let Some(first) = failures.first() {
            indexed
                .delete_snapshots(&[saved.id])
                .map_err(rustic_err("removing a partial snapshot from", &self.dir))?;
            return Err(RepositoryError::Unreadable {
                dir: layer.to_path_buf(),
                count: failures.len(),
                first: first.clone(),
            });
        }
        Ok(saved.id.to_hex().as_str().to_string())
    }
}

fn rustic_err(what: &'static str, dir: &Path) -> impl Fn(Box<RusticError>) -> RepositoryError {
    let location = dir.display().to_string();
    move |error| RepositoryError::Rustic {
        what,
        location: location.clone(),
        error,
    }
}

/// The password as restic reads it: `RESTIC_PASSWORD` as is, a password file without
/// its surrounding white space (and byte-order mark).
fn read_password(password: &Password) -> Result<String, RepositoryError> {
    match password {
        Password::Env(p) => Ok(p.clone()),
        Password::File(path) => {
            let text =
                std::fs::read_to_string(path).map_err(|source| RepositoryError::PasswordFile {
                    path: path.clone(),
                    source,
                })?;
            Ok(text.trim_start_matches('\u{feff}').trim().to_string())
        }
    }
}

fn unopened(dir: &Path) -> Result<Repository<()>, RepositoryError> {
    let location = dir.to_str().ok_or_else(|| RepositoryError::Io {
        what: "using",
        path: dir.to_path_buf(),
        source: std::io::Error::other("the path is not UTF-8"),
    })?;
    let backend = LocalBackend::new(location, std::iter::empty())
        .map_err(rustic_err("opening the backend of", dir))?;
    let backends = RepositoryBackends::new(Arc::new(backend), None);
    // A local repository needs no cache of itself.
    let opts = RepositoryOptions::default().no_cache(true);
    Repository::new(&opts, &backends).map_err(rustic_err("opening", dir))
}

/// Creates the repository in `dir` (missing or empty), as `restic init` does.
fn create(
    repo: Repository<()>,
    dir: &Path,
    credentials: &Credentials,
) -> Result<Repository<OpenStatus>, RepositoryError> {
    let empty = std::fs::read_dir(dir)
        .map_err(io_err("listing", dir))?
        .next()
        .is_none();
    if !empty {
        return Err(RepositoryError::NotARepository(dir.to_path_buf()));
    }
    let key = KeyOptions::default()
        .hostname(lock::hostname())
        .username(Some(username()))
        .with_created(true);
    let open = repo
        .init(credentials, &key, &ConfigOptions::default())
        .map_err(rustic_err("creating the repository", dir))?;
    // rustic has no lock files; restic expects their directory.
    let locks = dir.join("locks");
    std::fs::create_dir_all(&locks).map_err(io_err("creating", &locks))?;
    Ok(open)
}

fn io_err(what: &'static str, path: &Path) -> impl Fn(std::io::Error) -> RepositoryError {
    let path = path.to_path_buf();
    move |source| RepositoryError::Io {
        what,
        path: path.clone(),
        source,
    }
}

/// An exclusive `flock` on the directory `dir` (created if missing), held until the
/// file is dropped.
fn lock_dir(dir: &Path) -> Result<std::fs::File, RepositoryError> {
    std::fs::create_dir_all(dir).map_err(io_err("creating", dir))?;
    let f = std::fs::File::open(dir).map_err(io_err("opening", dir))?;
    // SAFETY: flock on a descriptor we own; no memory is involved.
    let rc = unsafe { libc::flock(std::os::fd::AsRawFd::as_raw_fd(&f), libc::LOCK_EX) };
    if rc != 0 {
        return Err(io_err("locking", dir)(std::io::Error::last_os_error()));
    }
    Ok(f)
}

/// The user name restic records (informative only).
fn username() -> String {
    std::env::var("USER")
        .or_else(|_| std::env::var("LOGNAME"))
        .unwrap_or_default()
}

/// Host `udos` and `tags`, each `key=value` split at commas as restic's `--tag` does.
fn snapshot_options(tags: &Tags) -> Result<SnapshotOptions, RepositoryError> {
    let mut opts = SnapshotOptions::default()
        .host(Some(HOST.to_string()))
        .command(Some("udos".to_string()));
    for (k, v) in &tags.0 {
        let list = rustic_core::StringList::from_str(&format!("{k}={v}")).map_err(|e| {
            RepositoryError::Io {
                what: "tagging with",
                path: PathBuf::from(format!("{k}={v}")),
                source: std::io::Error::other(e.to_string()),
            }
        })?;
        opts.tags.push(list);
    }
    Ok(opts)
}

/// What went wrong reading a layer (the archiver only logs and skips such entries).
type Failures = Arc<Mutex<Vec<String>>>;

fn record(failures: &Failures, what: String) {
    failures
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .push(what);
}

/// The layer directory as a backup source: its entries relative to it (so they land
/// at the snapshot's root, as with `restic backup .`), and every failure to read one
/// recorded.
struct StrictSource {
    inner: LocalSource,
    root: PathBuf,
    failures: Failures,
}

impl StrictSource {
    fn new(root: &Path) -> Result<StrictSource, RepositoryError> {
        if !root.is_dir() {
            return Err(io_err("snapshotting", root)(std::io::Error::other(
                "not a directory",
            )));
        }
        let inner = LocalSource::new(
            LocalSourceSaveOptions::default(),
            &rustic_core::Excludes::default(),
            &LocalSourceFilterOptions::default(),
            &[root],
        )
        .map_err(rustic_err("reading", root))?;
        Ok(StrictSource {
            inner,
            root: root.to_path_buf(),
            failures: Arc::default(),
        })
    }

    fn failures(&self) -> Vec<String> {
        self.failures
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

impl ReadSource for StrictSource {
    type Open = StrictOpen;
    type Iter = StrictIter;

    fn size(&self) -> RusticResult<Option<u64>> {
        Ok(None)
    }

    fn entries(&self) -> StrictIter {
        StrictIter {
            inner: self.inner.entries(),
            root: self.root.clone(),
            failures: self.failures.clone(),
        }
    }
}

struct StrictIter {
    inner: <LocalSource as ReadSource>::Iter,
    root: PathBuf,
    failures: Failures,
}

impl Iterator for StrictIter {
    type Item = RusticResult<ReadSourceEntry<StrictOpen>>;

    fn next(&mut self) -> Option<Self::Item> {
        Some(match self.inner.next()? {
            Ok(entry) => {
                let path = entry
                    .path
                    .strip_prefix(&self.root)
                    .map(Path::to_path_buf)
                    .unwrap_or_else(|_| entry.path.clone());
                let open = entry.open.map(|file| StrictOpen {
                    file,
                    path: entry.path.clone(),
                    failures: self.failures.clone(),
                });
                Ok(ReadSourceEntry {
                    path,
                    node: entry.node,
                    open,
                })
            }
            Err(e) => {
                record(&self.failures, e.display_log());
                Err(e)
            }
        })
    }
}

struct StrictOpen {
    file: <LocalSource as ReadSource>::Open,
    path: PathBuf,
    failures: Failures,
}

impl ReadSourceOpen for StrictOpen {
    type Reader = StrictReader;

    fn open(self) -> RusticResult<StrictReader> {
        match self.file.open() {
            Ok(reader) => Ok(StrictReader {
                reader,
                path: self.path,
                failures: self.failures,
            }),
            Err(e) => {
                record(&self.failures, e.display_log());
                Err(e)
            }
        }
    }
}

struct StrictReader {
    reader: std::fs::File,
    path: PathBuf,
    failures: Failures,
}

impl Read for StrictReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.reader.read(buf).inspect_err(|e| {
            if e.kind() != std::io::ErrorKind::Interrupted {
                record(
                    &self.failures,
                    format!("reading {}: {e}", self.path.display()),
                );
            }
        })
    }
}

#[cfg(test)]
mod tests;
