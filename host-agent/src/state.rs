//! The state directory: where udos keeps its database, repository, images and layers.
//!
//! ```text
//! <state>/udos.db                 runs, steps, layers (SQLite)
//! <state>/restic/                 the embedded restic repository (unless RESTIC_REPOSITORY)
//! <state>/restic-password         its generated password (0600)
//! <state>/images/                 guest images and the base layer (udos-images)
//! <state>/layers/<id>/            a layer in overlay form (what restic snapshots)
//! <state>/layers/<id>.erofs       the same layer as a read-only disk image
//! <state>/runs/<run>/leg-<l>/step-<n>/  a step VM's runtime dir: control layer, console log
//! <state>/restore-scratch/        layers being restored (`udos restore`)
//! <state>/gc.lock                 runs hold it shared, `udos gc` exclusive ([`StateLock`])
//! ```
//!
//! Guest-made files (setuid-root binaries included: a step may install sudo, and later
//! steps must see it) live only under `layers/`, `runs/` and `restore-scratch/`. Those,
//! and `images/`, are forced to 0700 every time the state dir is opened, even when they
//! exist with wider modes, so no other local user can reach them
//! (docs/threat-model.md, "Guest"). A state dir udos creates is 0700 itself; one that
//! exists keeps its mode (it may be a directory the user shares).

use std::fs::{DirBuilder, Permissions};
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

/// The subtrees that hold guest-made content (and the images), kept 0700.
const PRIVATE_DIRS: [&str; 4] = ["layers", "runs", "images", "restore-scratch"];

/// A resolved state directory.
#[derive(Debug, Clone)]
pub struct StateDir {
    root: PathBuf,
}

impl StateDir {
    /// `--state-dir`, else `$UDOS_STATE_DIR`, else `$XDG_DATA_HOME/udos`, else
    /// `~/.local/share/udos`.
    pub fn resolve(flag: Option<&Path>) -> Result<StateDir> {
        let root = match flag {
            Some(p) => p.to_path_buf(),
            None => match std::env::var_os("UDOS_STATE_DIR") {
                Some(p) if !p.is_empty() => PathBuf::from(p),
                _ => match std::env::var_os("XDG_DATA_HOME") {
                    Some(x) if !x.is_empty() => PathBuf::from(x).join("udos"),
                    _ => {
                        let home = std::env::var_os("HOME").context(
                            "cannot find a state directory: set --state-dir, UDOS_STATE_DIR or HOME",
                        )?;
                        PathBuf::from(home).join(".local/share/udos")
                    }
                },
            },
        };
        if !root.is_dir() {
            if let Some(parent) = root.parent() {
                std::fs::create_dir_all(parent).with_context(|| {
                    format!("creating the state directory's parent {}", parent.display())
                })?;
            }
            private_dir(&root)?;
        }
        let root = root.canonicalize()?;
        for sub in PRIVATE_DIRS {
            private_dir(&root.join(sub))?;
        }
        Ok(StateDir { root })
    }

    /// A new, empty, private (0700) directory in `layers/` to unpack layer `id` into;
    /// removed when dropped unless kept (`TempDir::keep`). Its name is unique, so two
    /// runs unpacking the same layer never share it.
    pub fn unpack_dir(&self, id: &str) -> Result<tempfile::TempDir> {
        tempfile::Builder::new()
            .prefix(&format!("{id}."))
            .suffix(".tmp")
            .permissions(Permissions::from_mode(0o700))
            .tempdir_in(self.layers_dir())
            .with_context(|| {
                format!(
                    "creating an unpack directory in {}",
                    self.layers_dir().display()
                )
            })
    }

    /// The directory itself.
    pub fn root(&self) -> &Path {
        &self.root
    }
    /// The SQLite database.
    pub fn db(&self) -> PathBuf {
        self.root.join("udos.db")
    }
    /// Where images live.
    pub fn images_dir(&self) -> PathBuf {
        self.root.join("images")
    }
    /// Where layers live.
    pub fn layers_dir(&self) -> PathBuf {
        self.root.join("layers")
    }
    /// A layer in overlay form.
    pub fn layer_dir(&self, id: &str) -> PathBuf {
        self.layers_dir().join(id)
    }
    /// A layer as an erofs image.
    pub fn layer_erofs(&self, id: &str) -> PathBuf {
        self.layers_dir().join(format!("{id}.erofs"))
    }
    /// A step VM's runtime directory: per run, per leg, per step, so legs that run in
    /// parallel never share one.
    pub fn step_dir(&self, run: i64, leg: usize, step: usize) -> PathBuf {
        self.root
            .join("runs")
            .join(run.to_string())
            .join(format!("leg-{leg}"))
            .join(format!("step-{step}"))
    }

    /// Takes the lock of layer `id` (an exclusive `flock` on `layers/<id>.lock`, held
    /// until the file is dropped): storing a layer and describing it for its snapshot
    /// never race with another leg or another `udos` process doing the same.
    pub fn lock_layer(&self, id: &str) -> Result<std::fs::File> {
        let path = self.layers_dir().join(format!("{id}.lock"));
        let f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .with_context(|| format!("opening {}", path.display()))?;
        // SAFETY: flock on a descriptor we own; no memory is involved.
        let rc = unsafe { libc::flock(std::os::fd::AsRawFd::as_raw_fd(&f), libc::LOCK_EX) };
        if rc != 0 {
            return Err(std::io::Error::last_os_error())
                .with_context(|| format!("locking {}", path.display()));
        }
        Ok(f)
    }
}

/// The state dir's lock between runs and gc (`<state>/gc.lock`), held until dropped.
/// Every run (and every command that reads layers: boot, restore, diff, export) holds
/// it shared for its whole length; `udos gc` holds it exclusive. So gc never frees a
/// layer a run is about to reuse from the step cache, and a run never starts from a
/// layer gc is removing.
#[derive(Debug)]
pub struct StateLock(#[allow(dead_code)] std::fs::File);

/// How long a run waits for a gc to finish before giving up.
pub const GC_WAIT: Duration = Duration::from_secs(3600);

impl StateDir {
    fn lock_file(&self) -> Result<std::fs::File> {
        let path = self.root.join("gc.lock");
        std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .with_context(|| format!("opening {}", path.display()))
    }

    /// The lock, shared: waits while a `udos gc` holds it (saying so once through
    /// `waiting`), up to `wait`.
    pub fn lock_for_run(&self, wait: Duration, waiting: &dyn Fn(&str)) -> Result<StateLock> {
        let f = self.lock_file()?;
        let deadline = Instant::now() + wait;
        let mut said = false;
        while !try_flock(&f, libc::LOCK_SH)? {
            if !said {
                waiting("waiting for `udos gc` to finish with this state dir");
                said = true;
            }
            if Instant::now() >= deadline {
                anyhow::bail!(
                    "`udos gc` still holds {} after {} s",
                    self.root.join("gc.lock").display(),
                    wait.as_secs()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(StateLock(f))
    }

    /// The lock, exclusive, for gc: refused at once while a run holds it.
    pub fn lock_for_gc(&self) -> Result<StateLock> {
        let f = self.lock_file()?;
        if !try_flock(&f, libc::LOCK_EX)? {
            anyhow::bail!(
                "a udos run (or boot, restore, diff, export) is using {}: gc frees nothing \
                 while one is in progress; run it again once they have finished",
                self.root.display()
            );
        }
        Ok(StateLock(f))
    }
}

/// `flock(f, op | LOCK_NB)`: false when another holder conflicts.
fn try_flock(f: &std::fs::File, op: libc::c_int) -> Result<bool> {
    // SAFETY: flock on a descriptor we own; no memory is involved.
    let rc = unsafe { libc::flock(std::os::fd::AsRawFd::as_raw_fd(f), op | libc::LOCK_NB) };
    if rc == 0 {
        return Ok(true);
    }
    let e = std::io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
        return Ok(false);
    }
    Err(e).context("locking the state dir")
}

/// Creates `dir` with mode 0700, or narrows an existing one to 0700.
fn private_dir(dir: &Path) -> Result<()> {
    match DirBuilder::new().mode(0o700).create(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(e).with_context(|| format!("creating {}", dir.display())),
    }
    std::fs::set_permissions(dir, Permissions::from_mode(0o700))
        .with_context(|| format!("making {} private (0700)", dir.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_share_the_lock_and_gc_excludes_them() {
        let d = tempfile::tempdir().unwrap();
        let s = StateDir::resolve(Some(&d.path().join("st"))).unwrap();
        let said = std::cell::RefCell::new(Vec::new());
        let waiting = |m: &str| said.borrow_mut().push(m.to_string());
        let a = s.lock_for_run(Duration::ZERO, &waiting).unwrap();
        let b = s.lock_for_run(Duration::ZERO, &waiting).unwrap();
        let e = s.lock_for_gc().unwrap_err().to_string();
        assert!(e.contains("in progress"), "{e}");
        drop(a);
        assert!(s.lock_for_gc().is_err(), "one run still holds it");
        drop(b);
        assert!(said.borrow().is_empty(), "no run had to wait");

        let gc = s.lock_for_gc().unwrap();
        let e = s
            .lock_for_run(Duration::from_millis(250), &waiting)
            .unwrap_err()
            .to_string();
        assert!(e.contains("still holds"), "{e}");
        assert_eq!(said.borrow().len(), 1, "said once: {:?}", said.borrow());

        // A run waits for gc and goes on once it has finished.
        let release = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(300));
            drop(gc);
        });
        let t = Instant::now();
        let run = s.lock_for_run(Duration::from_secs(30), &waiting).unwrap();
        assert!(t.elapsed() >= Duration::from_millis(250));
        release.join().unwrap();
        assert!(s.lock_for_gc().is_err());
        drop(run);
    }

    #[test]
    fn flag_wins_and_layout_is_created() {
        let d = tempfile::tempdir().unwrap();
        let s = StateDir::resolve(Some(&d.path().join("st"))).unwrap();
        assert!(s.layers_dir().is_dir() && s.images_dir().is_dir());
        assert!(s.db().starts_with(s.root()));
        assert!(s.step_dir(3, 1, 2).ends_with("runs/3/leg-1/step-2"));
    }

    fn mode(p: &Path) -> u32 {
        std::fs::metadata(p).unwrap().permissions().mode() & 0o7777
    }

    #[test]
    fn a_new_state_dir_and_its_trees_are_private() {
        let d = tempfile::tempdir().unwrap();
        let s = StateDir::resolve(Some(&d.path().join("a/st"))).unwrap();
        assert_eq!(mode(s.root()), 0o700);
        for sub in PRIVATE_DIRS {
            assert_eq!(mode(&s.root().join(sub)), 0o700, "{sub}");
        }
    }

    #[test]
    fn wider_trees_are_narrowed_and_an_existing_root_keeps_its_mode() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path().join("st");
        for sub in ["", "layers", "runs", "images"] {
            std::fs::create_dir_all(root.join(sub)).unwrap();
            std::fs::set_permissions(root.join(sub), Permissions::from_mode(0o755)).unwrap();
        }
        let s = StateDir::resolve(Some(&root)).unwrap();
        assert_eq!(mode(s.root()), 0o755);
        for sub in PRIVATE_DIRS {
            assert_eq!(mode(&s.root().join(sub)), 0o700, "{sub}");
        }
    }

    #[test]
    fn unpack_dirs_are_private_unique_and_removed_when_dropped() {
        let d = tempfile::tempdir().unwrap();
        let s = StateDir::resolve(Some(d.path())).unwrap();
        let a = s.unpack_dir("ab").unwrap();
        let b = s.unpack_dir("ab").unwrap();
        assert_ne!(a.path(), b.path());
        assert_eq!(mode(a.path()), 0o700);
        assert!(a.path().starts_with(s.layers_dir()));
        let name = a.path().file_name().unwrap().to_string_lossy().into_owned();
        assert!(name.starts_with("ab.") && name.ends_with(".tmp"), "{name}");
        let kept = a.path().to_path_buf();
        drop(a);
        assert!(!kept.exists());
    }
}
