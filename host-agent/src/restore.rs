//! `udos restore RUN STEP --target DIR`: the root as that step left it, from restic.
//!
//! The root after step k is the stack base, workspace, layer 1, ..., layer k. Each
//! layer is restored from its restic snapshot (the plain `restic restore`) into a
//! scratch directory and applied onto the target in order: whiteouts delete, opaque
//! directories replace, everything else is copied.

use std::path::Path;

use anyhow::{bail, Context, Result};
use serde::Serialize;

use crate::restic::Repo;
use crate::state::StateDir;
use crate::store::Store;

/// What a restore did.
#[derive(Debug, Serialize)]
pub struct RestoreReport {
    /// Run number.
    pub run_id: i64,
    /// Step number restored.
    pub step: i64,
    /// Target directory.
    pub target: String,
    /// Layers applied, bottom first: (kind, layer id, snapshot id).
    pub layers: Vec<(String, String, String)>,
}

/// Restore the root of `run` after `step` (a 1-based number or a step id) into `target`.
pub fn restore(
    state: &StateDir,
    store: &Store,
    repo: &Repo,
    run: i64,
    step: &str,
    target: &Path,
    progress: &dyn Fn(&str),
) -> Result<RestoreReport> {
    if store.run(run)?.is_none() {
        bail!(
            "no run {run} in {} (see `udos runs`)",
            state.root().display()
        );
    }
    let steps = store.steps(run)?;
    let chosen = steps
        .iter()
        .find(|s| s.number.to_string() == step || s.step_id.as_deref() == Some(step))
        .with_context(|| {
            format!(
                "run {run} has no step `{step}`: give a number 1..{} or a step id",
                steps.len()
            )
        })?;
    if target.exists() && std::fs::read_dir(target)?.next().is_some() {
        bail!(
            "{} is not empty: restore into a new or empty directory (nothing was written)",
            target.display()
        );
    }
    let mut layers: Vec<(String, String, Option<String>)> = store
        .inputs(run)?
        .into_iter()
        .map(|i| (i.kind, i.layer_id, i.snapshot_id))
        .collect();
    for s in steps.iter().filter(|s| s.number <= chosen.number) {
        if let Some(l) = &s.layer_id {
            layers.push((
                format!("step {}", s.number),
                l.clone(),
                s.snapshot_id.clone(),
            ));
        }
    }
    std::fs::create_dir_all(target).with_context(|| format!("creating {}", target.display()))?;
    let scratch_root = state.root().join("restore-scratch");
    std::fs::create_dir_all(&scratch_root)?;
    let mut applied = Vec::new();
    for (kind, layer, snap) in layers {
        let snap = snap.with_context(|| {
            format!(
                "the {kind} layer {layer} has no snapshot in the repository: it cannot be restored"
            )
        })?;
        progress(&format!(
            "restoring {kind} layer from snapshot {}",
            &snap[..snap.len().min(12)]
        ));
        let scratch = tempfile::tempdir_in(&scratch_root)?;
        repo.restore(&snap, scratch.path())?;
        // The layer's description is not part of the root.
        let _ = std::fs::remove_file(scratch.path().join(crate::runner::LAYER_META));
        udos_layer::apply::apply(scratch.path(), target)
            .with_context(|| format!("applying the {kind} layer onto {}", target.display()))?;
        applied.push((kind, layer, snap));
    }
    Ok(RestoreReport {
        run_id: run,
        step: chosen.number,
        target: target.display().to_string(),
        layers: applied,
    })
}
