//! `udos export RUN STEP --output FILE`: a restore point as an OCI layer tar.
//!
//! Without `--flatten`, the step's own layer, written back from its overlay form with
//! the sealer's own writer (`udos_layer::seal`): whiteouts become `.wh.<name>` files
//! and opaque directories a `.wh..wh..opq` entry, as the OCI image spec's layers have
//! them. It is the stream the guest sealed, byte for byte, so its SHA-256 is the layer
//! id. With `--flatten`, the whole root at that point (base, workspace, the leg's
//! layers up to the step, applied in order) as one tar with no whiteouts.
//!
//! The file is written beside `--output` under a temporary name (mode 0600: it holds
//! what the guest made, setuid files included) and renamed into place when complete,
//! so a failed export leaves nothing behind.

use std::io::Write;
use std::path::Path;

use anyhow::{bail, Context, Result};
use serde::Serialize;
use sha2::{Digest, Sha256};
use udos_layer::SealLimits;

use crate::restic::Repo;
use crate::restore::{layer_files, materialize, resolve, Point};
use crate::state::StateDir;
use crate::store::Store;

/// What to export.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// The step's own layer, with whiteouts.
    Layer,
    /// The whole root at that point, with none.
    Flatten,
}

/// What an export wrote.
#[derive(Debug, Clone, Serialize)]
pub struct ExportReport {
    /// Run number.
    pub run_id: i64,
    /// The leg's job id.
    pub job: String,
    /// Step number.
    pub step: i64,
    /// Layer or flatten.
    pub mode: Mode,
    /// The file written.
    pub output: String,
    /// The step's layer id (for `layer`, the tar's SHA-256 equals it).
    pub layer_id: Option<String>,
    /// SHA-256 of the tar.
    pub sha256: String,
    /// Bytes of the tar.
    pub bytes: u64,
    /// Tar entries (whiteouts and opaque markers included).
    pub entries: u64,
}

/// A writer that hashes what goes through it.
struct Hashing<W> {
    inner: W,
    hasher: Sha256,
}

impl<W: Write> Write for Hashing<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// Writes the tar of the overlay-form directory `dir` to a temporary file beside
/// `output`, then renames it to `output`. Returns (entries, bytes, sha256).
fn write_tar(dir: &Path, output: &Path) -> Result<(u64, u64, String)> {
    let parent = match output.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let tmp = tempfile::Builder::new()
        .prefix(".udos-export.")
        .tempfile_in(parent)
        .with_context(|| format!("creating a file in {}", parent.display()))?;
    let (stats, sha) = {
        let mut out = Hashing {
            inner: std::io::BufWriter::new(tmp.as_file()),
            hasher: Sha256::new(),
        };
        let skip = [crate::snapshots::LAYER_META];
        let stats =
            udos_layer::write_layer_tar_skipping(dir, &mut out, &SealLimits::default(), &skip)
                .with_context(|| format!("writing the tar of {}", dir.display()))?;
        out.flush()?;
        (stats, hex::encode(out.hasher.finalize()))
    };
    tmp.as_file().sync_all()?;
    tmp.persist_noclobber(output)
        .map_err(|e| e.error)
        .with_context(|| format!("writing {}", output.display()))?;
    Ok((stats.entries, stats.bytes, sha))
}

/// `udos export`: the restore point `point` as an OCI layer tar at `output` (which
/// must not exist).
pub fn export(
    state: &StateDir,
    store: &Store,
    repo: &Repo,
    point: &Point<'_>,
    mode: Mode,
    output: &Path,
    progress: &dyn Fn(&str),
) -> Result<ExportReport> {
    let r = resolve(state, store, point)?;
    if output.symlink_metadata().is_ok() {
        bail!(
            "{} exists: export to a new file (nothing was written)",
            output.display()
        );
    }
    let own = r.own_layer().cloned();
    let (entries, bytes, sha256) = match mode {
        Mode::Layer => {
            let Some(layer) = &own else {
                bail!(
                    "step {} of run {} made no layer (it was skipped, cached without one, or sealed nothing): \
                     there is nothing to export; `--flatten` exports the root at that point",
                    r.step,
                    r.run
                );
            };
            let files = layer_files(state, repo, layer)?;
            write_tar(files.path(), output)?
        }
        Mode::Flatten => {
            let scratch_root = state.root().join("restore-scratch");
            std::fs::create_dir_all(&scratch_root)?;
            let scratch = tempfile::tempdir_in(&scratch_root)?;
            materialize(state, repo, &r.layers, scratch.path(), progress)?;
            write_tar(scratch.path(), output)?
        }
    };
    Ok(ExportReport {
        run_id: r.run,
        job: r.job,
        step: r.step,
        mode,
        output: output.display().to_string(),
        layer_id: own.map(|l| l.layer_id),
        sha256,
        bytes,
        entries,
    })
}
