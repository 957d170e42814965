//! `udos restore RUN STEP [--job JOB] --target DIR`: the root as that step of that job
//! leg left it, from restic.
//!
//! The root after step k of a leg is the stack base, workspace, and that leg's layers
//! 1, ..., k (legs never see each other's layers). Each
//! layer is restored from its restic snapshot (the plain `restic restore`) into a
//! scratch directory and applied onto the target in order: whiteouts delete, opaque
//! directories replace, everything else is copied.

use std::path::Path;

use anyhow::{bail, Context, Result};
use serde::Serialize;

use crate::restic::Repo;
use crate::state::StateDir;
use crate::store::Store;

/// A restore point: a step of a job leg of a run.
pub struct Point<'a> {
    /// Run number.
    pub run: i64,
    /// A 1-based step number or a step id.
    pub step: &'a str,
    /// The leg: its job id or its display name; needed when several legs have layers.
    pub job: Option<&'a str>,
}

/// What a restore did.
#[derive(Debug, Serialize)]
pub struct RestoreReport {
    /// Run number.
    pub run_id: i64,
    /// The leg's job id.
    pub job: String,
    /// Step number restored.
    pub step: i64,
    /// Target directory.
    pub target: String,
    /// Layers applied, bottom first: (kind, layer id, snapshot id).
    pub layers: Vec<(String, String, String)>,
}

/// The leg `job` names (by id or display name), or the only leg with steps.
fn pick_leg(store: &Store, run: i64, job: Option<&str>) -> Result<i64> {
    let jobs = store.jobs(run)?;
    let steps = store.steps(run)?;
    let with_steps: Vec<&crate::store::JobRow> = jobs
        .iter()
        .filter(|j| steps.iter().any(|s| s.leg == j.leg))
        .collect();
    let describe = |js: &[&crate::store::JobRow]| {
        js.iter()
            .map(|j| format!("`{}`", j.name))
            .collect::<Vec<_>>()
            .join(", ")
    };
    match job {
        None => match with_steps.as_slice() {
            [only] => Ok(only.leg),
            [] => bail!("run {run} has no steps to restore"),
            several => bail!(
                "run {run} has several job legs: name one with --job ({})",
                describe(several)
            ),
        },
        Some(name) => {
            let named: Vec<&crate::store::JobRow> = with_steps
                .iter()
                .copied()
                .filter(|j| j.job_id == name || j.name == name)
                .collect();
            match named.as_slice() {
                [only] => Ok(only.leg),
                [] => bail!(
                    "run {run} has no job leg `{name}` with steps (legs: {})",
                    describe(&with_steps)
                ),
                several => bail!(
                    "`{name}` names several legs of run {run}: give the leg's name ({})",
                    describe(several)
                ),
            }
        }
    }
}

/// Restore the root at `point` into `target`.
pub fn restore(
    state: &StateDir,
    store: &Store,
    repo: &Repo,
    point: &Point<'_>,
    target: &Path,
    progress: &dyn Fn(&str),
) -> Result<RestoreReport> {
    let (run, step) = (point.run, point.step);
    if store.run(run)?.is_none() {
        bail!(
            "no run {run} in {} (see `udos runs`)",
            state.root().display()
        );
    }
    let leg = pick_leg(store, run, point.job)?;
    let steps: Vec<crate::store::StepRow> = store
        .steps(run)?
        .into_iter()
        .filter(|s| s.leg == leg)
        .collect();
    let chosen = steps
        .iter()
        .find(|s| s.number.to_string() == step || s.step_id.as_deref() == Some(step))
        .with_context(|| {
            format!(
                "run {run} has no step `{step}` in that job: give a number 1..{} or a step id",
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
        let _ = std::fs::remove_file(scratch.path().join(crate::snapshots::LAYER_META));
        udos_layer::apply::apply(scratch.path(), target)
            .with_context(|| format!("applying the {kind} layer onto {}", target.display()))?;
        applied.push((kind, layer, snap));
    }
    Ok(RestoreReport {
        run_id: run,
        job: chosen.job_id.clone(),
        step: chosen.number,
        target: target.display().to_string(),
        layers: applied,
    })
}
