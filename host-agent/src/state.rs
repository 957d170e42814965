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
//! ```

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

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
        std::fs::create_dir_all(&root)
            .with_context(|| format!("creating the state directory {}", root.display()))?;
        let root = root.canonicalize()?;
        for sub in ["layers", "runs", "images"] {
            std::fs::create_dir_all(root.join(sub))?;
        }
        Ok(StateDir { root })
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flag_wins_and_layout_is_created() {
        let d = tempfile::tempdir().unwrap();
        let s = StateDir::resolve(Some(&d.path().join("st"))).unwrap();
        assert!(s.layers_dir().is_dir() && s.images_dir().is_dir());
        assert!(s.db().starts_with(s.root()));
        assert!(s.step_dir(3, 1, 2).ends_with("runs/3/leg-1/step-2"));
    }
}
