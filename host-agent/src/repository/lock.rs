//! restic's repository locks, for backups written through rustic_core (which writes
//! none). `restic prune` (`udos gc`) takes an exclusive lock and removes packs no
//! index or snapshot names yet: a backup in flight must hold a lock it sees, and must
//! not start while it runs.
//!
//! A lock is restic's: a JSON file (`time`, `exclusive`, `hostname`, `username`,
//! `pid`, `uid`, `gid`) encrypted with the repository's key and stored as
//! `locks/<sha-256 of the ciphertext>`. Like restic, a lock is refreshed every five
//! minutes (restic calls a lock stale after 30), and a lock that cannot be decrypted
//! is ignored.

use std::path::{Path, PathBuf};
use std::sync::{mpsc, Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use aes256ctr_poly1305aes::aead::{Aead, AeadInPlace};
use aes256ctr_poly1305aes::{Aes256CtrPoly1305Aes, Key, Nonce};
use rustic_core::repofile::MasterKey;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// How often a held lock is rewritten with a new time (restic's interval).
const REFRESH: Duration = Duration::from_secs(5 * 60);

/// Why a lock could not be taken.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    /// Another process holds an exclusive lock (restic's `prune`, `check`...).
    #[error(
        "the repository {repo} is locked exclusively by {holder}\n\
         hint: another restic process holds the lock (`udos gc`?); if none is running, remove a stale lock with `restic unlock`"
    )]
    Locked {
        /// The repository.
        repo: PathBuf,
        /// Who holds it, as restic describes it.
        holder: String,
    },
    /// A lock file could not be written, listed or read.
    #[error("{what} {path}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// On what.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
}

/// A lock file's contents (restic's `Lock`).
#[derive(Debug, Serialize, Deserialize)]
struct LockFile {
    #[serde(default)]
    time: String,
    #[serde(default)]
    exclusive: bool,
    #[serde(default)]
    hostname: String,
    #[serde(default)]
    username: String,
    #[serde(default)]
    pid: u32,
    #[serde(default, skip_serializing_if = "is_zero")]
    uid: u32,
    #[serde(default, skip_serializing_if = "is_zero")]
    gid: u32,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

/// A non-exclusive lock held (and refreshed) until dropped.
pub(super) struct RepoLock {
    current: Arc<Mutex<PathBuf>>,
    stop: Option<mpsc::Sender<()>>,
    refresher: Option<JoinHandle<()>>,
}

impl RepoLock {
    /// Takes a non-exclusive lock on the repository in `repo`, as `restic backup`
    /// does: refused while another process holds an exclusive one.
    pub(super) fn acquire(repo: &Path, key: &MasterKey) -> Result<RepoLock, LockError> {
        let key = aead_key(key);
        check_no_exclusive(repo, &key, None)?;
        let path = write_lock(repo, &key)?;
        // Checked again once ours exists: of two processes locking at once, one sees
        // the other (restic's exclusive lockers check again 200 ms after writing).
        if let Err(e) = check_no_exclusive(repo, &key, Some(&path)) {
            let _ = std::fs::remove_file(&path);
            return Err(e);
        }
        let current = Arc::new(Mutex::new(path));
        let (stop, stopped) = mpsc::channel::<()>();
        let refresher = {
            let (dir, current) = (repo.to_path_buf(), current.clone());
            std::thread::Builder::new()
                .name("restic-lock".into())
                .spawn(move || refresh(&dir, &key, &current, &stopped))
                .map_err(|source| LockError::Io {
                    what: "starting the lock refresher for",
                    path: repo.to_path_buf(),
                    source,
                })?
        };
        Ok(RepoLock {
            current,
            stop: Some(stop),
            refresher: Some(refresher),
        })
    }
}

impl Drop for RepoLock {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(t) = self.refresher.take() {
            let _ = t.join();
        }
        let path = self.current.lock().unwrap_or_else(|e| e.into_inner());
        if let Err(e) = std::fs::remove_file(&*path) {
            tracing::warn!(lock = %path.display(), "could not remove the restic lock: {e}");
        }
    }
}

/// Rewrites the lock every [`REFRESH`] until `stopped` says so (its sender dropped).
fn refresh(repo: &Path, key: &Key, current: &Mutex<PathBuf>, stopped: &mpsc::Receiver<()>) {
    while let Err(mpsc::RecvTimeoutError::Timeout) = stopped.recv_timeout(REFRESH) {
        match write_lock(repo, key) {
            Ok(new) => {
                let old =
                    std::mem::replace(&mut *current.lock().unwrap_or_else(|e| e.into_inner()), new);
                let _ = std::fs::remove_file(old);
            }
            Err(e) => tracing::warn!("could not refresh the restic lock: {e}"),
        }
    }
}

/// The 64-byte key restic encrypts files with: AES-256 key, then Poly1305's `k`, `r`.
fn aead_key(key: &MasterKey) -> Key {
    let mut k = Key::default();
    k[0..32].copy_from_slice(&key.encrypt);
    k[32..48].copy_from_slice(&key.mac.k);
    k[48..64].copy_from_slice(&key.mac.r);
    k
}

fn io_err(what: &'static str, path: &Path) -> impl Fn(std::io::Error) -> LockError {
    let path = path.to_path_buf();
    move |source| LockError::Io {
        what,
        path: path.clone(),
        source,
    }
}

/// Writes a new lock file (to a temporary name first, so no reader sees half of it)
/// and returns its path.
fn write_lock(repo: &Path, key: &Key) -> Result<PathBuf, LockError> {
    let lock = LockFile {
        time: rustic_core::jiff::Timestamp::now().to_string(),
        exclusive: false,
        hostname: hostname(),
        username: super::username(),
        pid: std::process::id(),
        uid: owner_ids().0,
        gid: owner_ids().1,
    };
    let plain =
        serde_json::to_vec(&lock).map_err(|e| io_err("encoding a lock for", repo)(e.into()))?;
    let sealed = encrypt(key, &plain).map_err(io_err("encrypting a lock for", repo))?;
    let id = hex::encode(Sha256::digest(&sealed));
    let dir = repo.join("locks");
    std::fs::create_dir_all(&dir).map_err(io_err("creating", &dir))?;
    let tmp = repo.join(format!(".udos-lock-{id}.tmp"));
    let path = dir.join(&id);
    write_synced(&tmp, &sealed).map_err(io_err("writing", &tmp))?;
    std::fs::rename(&tmp, &path).map_err(io_err("storing", &path))?;
    Ok(path)
}

fn write_synced(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let mut f = std::fs::File::create(path)?;
    f.write_all(bytes)?;
    f.sync_all()
}

/// Fails if a lock other than `ours` in `repo` is exclusive.
fn check_no_exclusive(repo: &Path, key: &Key, ours: Option<&Path>) -> Result<(), LockError> {
    let dir = repo.join("locks");
    let entries = match std::fs::read_dir(&dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(io_err("listing", &dir)(e)),
    };
    for entry in entries {
        let path = entry.map_err(io_err("listing", &dir))?.path();
        if Some(path.as_path()) == ours {
            continue;
        }
        let Some(lock) = read_lock(&path, key) else {
            continue;
        };
        if lock.exclusive {
            return Err(LockError::Locked {
                repo: repo.to_path_buf(),
                holder: format!(
                    "PID {} on {} by {} (lock created at {})",
                    lock.pid, lock.hostname, lock.username, lock.time
                ),
            });
        }
    }
    Ok(())
}

/// A lock file's contents; `None` when it is gone, empty or unreadable (restic skips
/// those too).
fn read_lock(path: &Path, key: &Key) -> Option<LockFile> {
    let sealed = std::fs::read(path).ok()?;
    let plain = decrypt(key, &sealed)?;
    // Repository format 2 may compress a file: a leading byte 2, then zstd.
    let json = match plain.first() {
        Some(2) => zstd::decode_all(&plain[1..]).ok()?,
        _ => plain,
    };
    match serde_json::from_slice(&json) {
        Ok(l) => Some(l),
        Err(e) => {
            tracing::warn!(lock = %path.display(), "ignoring an unreadable restic lock: {e}");
            None
        }
    }
}

/// restic's encryption of a file: random nonce, AES-256-CTR ciphertext, Poly1305-AES tag.
fn encrypt(key: &Key, plain: &[u8]) -> std::io::Result<Vec<u8>> {
    let mut nonce = Nonce::default();
    getrandom::fill(&mut nonce).map_err(|e| std::io::Error::other(e.to_string()))?;
    let mut out = nonce.to_vec();
    out.extend_from_slice(plain);
    let tag = Aes256CtrPoly1305Aes::new(key)
        .encrypt_in_place_detached(&nonce, &[], &mut out[16..])
        .map_err(|_| std::io::Error::other("encryption failed"))?;
    out.extend_from_slice(&tag);
    Ok(out)
}

fn decrypt(key: &Key, sealed: &[u8]) -> Option<Vec<u8>> {
    if sealed.len() < 32 {
        return None;
    }
    Aes256CtrPoly1305Aes::new(key)
        .decrypt(Nonce::from_slice(&sealed[..16]), &sealed[16..])
        .ok()
}

/// The host name as restic (Go's `os.Hostname`) reads it: a lock from this host whose
/// process is gone is one `restic unlock` may remove.
pub(super) fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_default()
}

/// This process's user and group ids (of `/proc/self`, which it owns).
fn owner_ids() -> (u32, u32) {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self")
        .map(|m| (m.uid(), m.gid()))
        .unwrap_or((0, 0))
}
