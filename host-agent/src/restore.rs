//! `udos restore RUN STEP [--job JOB] --target DIR`: the root as that step of that job
//! leg left it, from restic.
//!
//! The root after step k of a leg is the stack base (the one that leg ran on),
//! workspace, and that leg's layers 1, ..., k (legs never see each other's layers). Each
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

/// The leg of run `run` (its `jobs` and `steps`) that `job` names (by id or display
/// name), or the only leg with steps.
fn pick_leg<'j>(
    jobs: &'j [crate::store::JobRow],
    steps: &[crate::store::StepRow],
    run: i64,
    job: Option<&str>,
) -> Result<&'j crate::store::JobRow> {
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
            [only] => Ok(only),
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
                [only] => Ok(only),
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

/// A layer of a restore point's stack.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChainLayer {
    /// `base`, `workspace` or `step N`.
    pub kind: String,
    /// Layer id.
    pub layer_id: String,
    /// Restic snapshot holding it, if one was recorded.
    pub snapshot_id: Option<String>,
}

/// A restore point, resolved against the store: which step it is and its stack.
#[derive(Debug, Clone)]
pub struct Resolved {
    /// Run number.
    pub run: i64,
    /// The leg's number in the run.
    pub leg: i64,
    /// The leg's job id.
    pub job: String,
    /// The step's number.
    pub step: i64,
    /// The step's display name.
    pub name: String,
    /// Base, workspace, then the leg's step layers up to and including this step.
    pub layers: Vec<ChainLayer>,
    /// How many of `layers` lie below this step's own layer: `layers[..below]` is the
    /// root as the step found it. Equal to `layers.len()` when the step made no layer.
    pub below: usize,
}

impl Resolved {
    /// The step's own layer, if it made one.
    pub fn own_layer(&self) -> Option<&ChainLayer> {
        self.layers.get(self.below)
    }
}

/// Finds the step `point` names and the layers of the root it left.
pub fn resolve(state: &StateDir, store: &Store, point: &Point<'_>) -> Result<Resolved> {
    let (run, step) = (point.run, point.step);
    if store.run(run)?.is_none() {
        bail!(
            "no run {run} in {} (see `udos runs`)",
            state.root().display()
        );
    }
    let (jobs, all_steps) = (store.jobs(run)?, store.steps(run)?);
    let job = pick_leg(&jobs, &all_steps, run, point.job)?;
    let leg = job.leg;
    let steps: Vec<crate::store::StepRow> =
        all_steps.into_iter().filter(|s| s.leg == leg).collect();
    let chosen = steps
        .iter()
        .find(|s| s.number.to_string() == step || s.step_id.as_deref() == Some(step))
        .with_context(|| {
            format!(
                "run {run} has no step `{step}` in that job: give a number 1..{} or a step id",
                steps.len()
            )
        })?;
    // The leg's own base only: a run's inputs hold every base its legs could use (a
    // squashed base beside its plain one, or other jobs' bases). Legs recorded before
    // schema 6 do not say which: then every base is stacked, as before.
    let leg_base = job.base_layer.as_ref();
    let mut layers: Vec<ChainLayer> = store
        .inputs(run)?
        .into_iter()
        .filter(|i| i.kind != "base" || leg_base.is_none_or(|b| *b == i.layer_id))
        .map(|i| ChainLayer {
            kind: i.kind,
            layer_id: i.layer_id,
            snapshot_id: i.snapshot_id,
        })
        .collect();
    let mut below = layers.len();
    for s in steps.iter().filter(|s| s.number <= chosen.number) {
        if let Some(l) = &s.layer_id {
            below = layers.len();
            layers.push(ChainLayer {
                kind: format!("step {}", s.number),
                layer_id: l.clone(),
                snapshot_id: s.snapshot_id.clone(),
            });
        }
    }
    if chosen.layer_id.is_none() {
        below = layers.len();
    }
    Ok(Resolved {
        run,
        leg,
        job: chosen.job_id.clone(),
        step: chosen.number,
        name: chosen.name.clone(),
        layers,
        below,
    })
}

/// Where a layer's files are, in overlay form.
#[derive(Debug)]
pub enum LayerFiles {
    /// The state dir still holds it (`layers/<id>/`, or the base's tree in `images/`).
    /// It may hold the snapshot's description ([`crate::snapshots::LAYER_META`]) at
    /// its top, which is not part of the layer.
    Local(std::path::PathBuf),
    /// Restored from its snapshot into a scratch directory (removed when dropped),
    /// without the snapshot's description.
    Restored(tempfile::TempDir),
}

impl LayerFiles {
    /// The directory.
    pub fn path(&self) -> &Path {
        match self {
            LayerFiles::Local(p) => p,
            LayerFiles::Restored(t) => t.path(),
        }
    }
}

/// Where the state dir keeps a layer: its directory in overlay form and its erofs
/// image (a base's tree and image live in `images/base/<id>/`).
fn local_paths(state: &StateDir, layer: &ChainLayer) -> (std::path::PathBuf, std::path::PathBuf) {
    if layer.kind == "base" {
        let base = state.images_dir().join("base").join(&layer.layer_id);
        (base.join("tree"), base.join("base.erofs"))
    } else {
        (
            state.layer_dir(&layer.layer_id),
            state.layer_erofs(&layer.layer_id),
        )
    }
}

/// The state dir's own copy of a layer, when it is complete: a layer directory and its
/// erofs image (both exist only once the layer is fully made), or the base's tree.
pub fn local_layer(state: &StateDir, layer: &ChainLayer) -> Option<std::path::PathBuf> {
    let (dir, erofs) = local_paths(state, layer);
    (dir.is_dir() && erofs.is_file()).then_some(dir)
}

/// The state dir's erofs image of a layer, when it has the layer complete (as
/// [`local_layer`] says): what a VM mounts.
pub fn local_erofs(state: &StateDir, layer: &ChainLayer) -> Option<std::path::PathBuf> {
    let (dir, erofs) = local_paths(state, layer);
    (dir.is_dir() && erofs.is_file()).then_some(erofs)
}

/// A layer's files: the state dir's copy when it has one, else restored from the
/// layer's snapshot into `restore-scratch/`.
pub fn layer_files(state: &StateDir, repo: &Repo, layer: &ChainLayer) -> Result<LayerFiles> {
    if let Some(dir) = local_layer(state, layer) {
        return Ok(LayerFiles::Local(dir));
    }
    let snap = layer.snapshot_id.as_deref().with_context(|| {
        format!(
            "the {} layer {} is neither in the state dir nor in the repository",
            layer.kind, layer.layer_id
        )
    })?;
    let scratch_root = state.root().join("restore-scratch");
    std::fs::create_dir_all(&scratch_root)?;
    let scratch = tempfile::tempdir_in(&scratch_root)?;
    repo.restore(snap, scratch.path())?;
    let _ = std::fs::remove_file(scratch.path().join(crate::snapshots::LAYER_META));
    Ok(LayerFiles::Restored(scratch))
}

/// Applies `layers` (bottom first) onto the empty directory `target`: the plain root
/// they make, with no whiteouts and no opaque markers. Reads each layer from the state
/// dir when it has it, else from its snapshot.
pub fn materialize(
    state: &StateDir,
    repo: &Repo,
    layers: &[ChainLayer],
    target: &Path,
    progress: &dyn Fn(&str),
) -> Result<()> {
    for layer in layers {
        progress(&format!(
            "applying the {} layer {}",
            layer.kind,
            &layer.layer_id[..layer.layer_id.len().min(12)]
        ));
        let files = layer_files(state, repo, layer)?;
        udos_layer::apply::apply(files.path(), target).with_context(|| {
            format!(
                "applying the {} layer onto {}",
                layer.kind,
                target.display()
            )
        })?;
        // The description may sit at the top of a local layer: never part of the root.
        if matches!(files, LayerFiles::Local(_)) {
            let meta = target.join(crate::snapshots::LAYER_META);
            if meta.symlink_metadata().is_ok() {
                std::fs::remove_file(&meta)?;
            }
        }
    }
    Ok(())
}

/// Restore the root at `point` into `target`, from the snapshots.
pub fn restore(
    state: &StateDir,
    store: &Store,
    repo: &Repo,
    point: &Point<'_>,
    target: &Path,
    progress: &dyn Fn(&str),
) -> Result<RestoreReport> {
    let resolved = resolve(state, store, point)?;
    if target.exists() && std::fs::read_dir(target)?.next().is_some() {
        bail!(
            "{} is not empty: restore into a new or empty directory (nothing was written)",
            target.display()
        );
    }
    std::fs::create_dir_all(target).with_context(|| format!("creating {}", target.display()))?;
    let scratch_root = state.root().join("restore-scratch");
    std::fs::create_dir_all(&scratch_root)?;
    let mut applied = Vec::new();
    for ChainLayer {
        kind,
        layer_id: layer,
        snapshot_id: snap,
    } in resolved.layers
    {
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
        run_id: resolved.run,
        job: resolved.job,
        step: resolved.step,
        target: target.display().to_string(),
        layers: applied,
    })
}
