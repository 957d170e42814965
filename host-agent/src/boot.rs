//! `udos boot RUN STEP [--job JOB] [--keep]`: a VM on a restore point, with a shell on
//! the console and the terminal attached.
//!
//! The VM's lowers are the restore point's stack (base, workspace, the leg's layers up
//! to the step; beyond [`MAX_STEP_LOWERS`] step layers they are squashed into one, as a
//! leg's are), each from the state dir, or restored from its snapshot when the state
//! dir no longer has it. PID 1 runs in manager mode with `/bin/sh` on the console
//! (`udos.mode=manager udos.shell=1`); leaving the shell powers the VM off.
//!
//! With `--keep` the VM also gets an output device: PID 1 seals what the shell changed
//! like a step's layer, and the host verifies it, stores it, snapshots it (tags
//! `kind=boot`, `run=`, `parent=`) and records it as a new run: the source leg's steps
//! up to STEP (the same layers, not copies), then one more step, the boot's layer. That
//! run's last step is the new restore point (`docs/restore-points.md`).

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde::Serialize;
use udos_core::engine::Conclusion;
use udos_layer::boot::{BootConfig, DeviceRef, Mode};
use udos_layer::output::{read_output, ReadLimits, SealedOutput};
use udos_layer::unpack::UnpackLimits;
use udos_layer::RecordStatus;
use udos_vmm::{Attach, Disk, VmExit, VmSpec};

use crate::leg::MAX_STEP_LOWERS;
use crate::report::{CachedFrom, InputReport, JobReport, RunReport, StepReport};
use crate::restic::{Repo, Tags};
use crate::restore::{layer_files, local_erofs, resolve, ChainLayer, LayerFiles, Point, Resolved};
use crate::runner::Prepared;
use crate::snapshots::Snapshotter;
use crate::state::StateDir;
use crate::step_vm::HOST_GRACE;
use crate::store::Store;

/// The event recorded for a run `udos boot --keep` made.
pub const BOOT_EVENT: &str = "boot";
/// What PID 1 prints once the shell runs (`docs/pid1.md`): keystrokes are held until
/// then, since what reaches the serial port while the guest boots is lost.
pub const SHELL_UP: &[u8] = b"udos-init: /bin/sh started";

/// How to boot.
#[derive(Debug, Clone)]
pub struct BootOptions {
    /// Seal what the shell changed as a new layer and restore point.
    pub keep: bool,
    /// vCPUs.
    pub cpus: u32,
    /// Memory, MiB.
    pub memory_mib: u64,
    /// Size of the upper (scratch) disk and of the output device, bytes (sparse).
    pub disk_bytes: u64,
    /// PID 1 ends the shell after this long (and still seals); the host kills the VM
    /// [`HOST_GRACE`] later.
    pub timeout: Duration,
    /// NAT egress and the named host ports, or no NIC.
    pub network: Option<udos_vmm::Network>,
}

impl Default for BootOptions {
    fn default() -> Self {
        BootOptions {
            keep: false,
            cpus: 1,
            memory_mib: 1024,
            disk_bytes: 4 << 30,
            timeout: Duration::from_secs(8 * 3600),
            network: None,
        }
    }
}

/// How the VM ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Ended {
    /// The shell exited and PID 1 powered the VM off.
    PoweredOff,
    /// The escape key detached the terminal: the VM was stopped, nothing sealed.
    Detached,
    /// udos was told to stop (a signal): the VM was stopped, nothing sealed.
    Interrupted,
    /// The VM outlived its timeout and was killed.
    TimedOut,
    /// The hypervisor failed.
    Crashed(String),
}

impl Ended {
    /// How a VM that ended with `exit` ended for the user; `stopped_by_signal`: udos's
    /// stop flag was set (else a stop was the escape key's).
    fn of(exit: &VmExit, stopped_by_signal: bool) -> Ended {
        match exit {
            VmExit::PoweredOff => Ended::PoweredOff,
            VmExit::Stopped if stopped_by_signal => Ended::Interrupted,
            VmExit::Stopped => Ended::Detached,
            VmExit::TimedOut => Ended::TimedOut,
            VmExit::Crashed { .. } => Ended::Crashed(exit.to_string()),
        }
    }

    /// One line for the user.
    pub fn describe(&self) -> String {
        match self {
            Ended::PoweredOff => "the VM powered off".into(),
            Ended::Detached => "detached (Ctrl-]): the VM was stopped, nothing kept".into(),
            Ended::Interrupted => "interrupted: the VM was stopped, nothing kept".into(),
            Ended::TimedOut => "the VM outlived its timeout and was killed, nothing kept".into(),
            Ended::Crashed(why) => format!("the VM {why}, nothing kept"),
        }
    }
}

/// The restore point `--keep` made.
#[derive(Debug, Clone, Serialize)]
pub struct Kept {
    /// The new run.
    pub run_id: i64,
    /// Its step holding the boot's layer (the new restore point).
    pub step: i64,
    /// The layer (SHA-256 of the sealed tar).
    pub layer_id: String,
    /// Its restic snapshot (full id).
    pub snapshot_id: String,
    /// Bytes of the sealed tar.
    pub bytes: u64,
    /// Entries in it.
    pub entries: u64,
}

/// What a boot did.
#[derive(Debug, Clone, Serialize)]
pub struct BootReport {
    /// The restore point booted: run, the leg's job id, step.
    pub run_id: i64,
    /// The leg's job id.
    pub job: String,
    /// The step.
    pub step: i64,
    /// How the VM ended.
    pub ended: Ended,
    /// The shell's outcome, when PID 1 sealed a record (`--keep`).
    pub shell: Option<Conclusion>,
    /// The new restore point, with `--keep`.
    pub kept: Option<Kept>,
}

/// Boots a VM on `point` with a shell on the console and `attach` as its terminal;
/// returns once the VM is gone (and, with `--keep`, its layer is recorded). `stop` (a
/// signal handler's flag) stops the VM.
pub fn boot(
    prep: &Prepared<'_>,
    store: &mut Store,
    point: &Point<'_>,
    opts: &BootOptions,
    mut attach: Attach,
    stop: &AtomicBool,
    progress: &dyn Fn(&str),
) -> Result<BootReport> {
    attach.input_after = Some(SHELL_UP.to_vec());
    let state = prep.state;
    let resolved = resolve(state, store, point)?;
    let scratch_root = state.root().join("runs");
    std::fs::create_dir_all(&scratch_root)?;
    // Not a number, so `udos gc` never takes it for a run's directory.
    let dir = tempfile::Builder::new()
        .prefix("boot-")
        .tempdir_in(&scratch_root)
        .context("creating the boot's scratch directory")?;
    let output = dir.path().join("output.img");
    let outcome = {
        let stack = Stack::build(state, prep.repo, &resolved.layers, dir.path(), progress)?;
        let spec = vm_spec(prep, &resolved, &stack.lowers, dir.path(), &output, opts)?;
        progress(&format!(
            "booting run {} step {} ({} layers) with a shell on the console: `exit` powers it off, Ctrl-] stops it{}",
            resolved.run,
            resolved.step,
            resolved.layers.len(),
            if opts.keep { " (nothing is kept then)" } else { "" }
        ));
        prep.hypervisor
            .run_attached(spec, attach, stop)
            .map_err(|e| anyhow::anyhow!("{} could not run the VM: {e}", prep.hypervisor.name()))?
    };
    let ended = Ended::of(
        &outcome.exit,
        stop.load(std::sync::atomic::Ordering::Acquire),
    );
    progress(&ended.describe());
    let mut report = BootReport {
        run_id: resolved.run,
        job: resolved.job.clone(),
        step: resolved.step,
        ended,
        shell: None,
        kept: None,
    };
    if opts.keep && report.ended == Ended::PoweredOff {
        let (shell, kept) = keep(prep, store, &resolved, &output, opts, progress)?;
        keep_console_log(state, &kept, &outcome.console_log);
        report.shell = Some(shell);
        report.kept = Some(kept);
    }
    Ok(report)
}

/// `--keep`, once the VM powered off: the sealed output verified, its layer stored,
/// snapshotted and recorded as a new run. The shell's outcome and the new point.
fn keep(
    prep: &Prepared<'_>,
    store: &mut Store,
    from: &Resolved,
    output: &Path,
    opts: &BootOptions,
    progress: &dyn Fn(&str),
) -> Result<(Conclusion, Kept)> {
    let sealed = read_sealed(output)?;
    let shell = match sealed.record.status {
        RecordStatus::Success => Conclusion::Success,
        _ => Conclusion::Failure,
    };
    let layer = store_layer(prep.state, &sealed, output, opts.disk_bytes)?;
    progress(&format!(
        "sealed {} entries ({} bytes) as layer {}",
        layer.entries,
        layer.bytes,
        short(&layer.id)
    ));
    let kept = record(prep, store, from, &layer, shell, progress)?;
    Ok((shell, kept))
}

/// What the new run's `workflow` column says: the command that names its source.
fn source_point(from: &Resolved) -> String {
    format!("udos boot {} {} --job {}", from.run, from.step, from.job)
}

fn short(id: &str) -> &str {
    id.get(..12).unwrap_or(id)
}

/// The VM: the stack's lowers, an upper, an output device with `--keep`, PID 1 in
/// manager mode with a shell.
fn vm_spec(
    prep: &Prepared<'_>,
    resolved: &Resolved,
    lowers: &[PathBuf],
    dir: &Path,
    output: &Path,
    opts: &BootOptions,
) -> Result<VmSpec> {
    let upper = dir.join("upper.img");
    udos_images::make_upper_disk(
        &udos_images::ImageStore::new(prep.state.root()).upper_template_dir(),
        &upper,
        opts.disk_bytes,
    )?;
    let mut disks: Vec<Disk> = lowers
        .iter()
        .enumerate()
        .map(|(i, p)| Disk::read_only(p, udos_layer::boot::lower_serial(i)))
        .collect();
    let serial = |s: &str| DeviceRef::Serial(s.to_string());
    let boot = BootConfig {
        mode: Mode::Manager,
        shell: true,
        lowers: disks.iter().map(|d| serial(&d.serial)).collect(),
        upper: Some(serial(udos_layer::boot::SERIAL_UPPER)),
        output: opts.keep.then(|| serial(udos_layer::boot::SERIAL_OUTPUT)),
        timeout: Some(opts.timeout),
        net: opts
            .network
            .as_ref()
            .map(|_| udos_layer::boot::NetConfig::USER_MODE),
        ..BootConfig::default()
    };
    disks.push(Disk::writable(&upper, udos_layer::boot::SERIAL_UPPER));
    if opts.keep {
        std::fs::File::create(output)
            .and_then(|f| f.set_len(opts.disk_bytes))
            .with_context(|| format!("creating the output disk {}", output.display()))?;
        disks.push(Disk::writable(output, udos_layer::boot::SERIAL_OUTPUT));
    }
    Ok(VmSpec {
        name: format!("udos-boot-{}-{}", resolved.run, resolved.step),
        kernel: prep.image.vmlinux.clone(),
        initramfs: prep.image.initramfs.clone(),
        cmdline: format!(
            "console=ttyS0 quiet panic=-1 {}",
            boot.render().context("the boot's kernel command line")?
        ),
        disks,
        cpus: opts.cpus,
        memory_mib: opts.memory_mib,
        runtime_dir: dir.join("vm"),
        timeout: opts.timeout + HOST_GRACE,
        console: None,
        log_filter: None,
        network: opts.network.clone(),
        channel: None,
    })
}

/// The erofs images a restore point's VM mounts, bottom first, and the scratch they
/// were made in.
struct Stack {
    lowers: Vec<PathBuf>,
    /// The layers' files in use: restored ones are scratch, removed with the stack (the squash links their files).
    _files: Vec<LayerFiles>,
}

impl Stack {
    /// The inputs (bases, workspace) as they are; the step layers too, up to
    /// [`MAX_STEP_LOWERS`], else squashed into one. A layer the state dir no longer has
    /// is restored from its snapshot and made an erofs image in `scratch`.
    fn build(
        state: &StateDir,
        repo: &Repo,
        layers: &[ChainLayer],
        scratch: &Path,
        progress: &dyn Fn(&str),
    ) -> Result<Stack> {
        let mut stack = Stack {
            lowers: Vec::new(),
            _files: Vec::new(),
        };
        let (inputs, steps) = split_steps(layers);
        let squash = steps.len() > MAX_STEP_LOWERS;
        for layer in inputs {
            let erofs = stack.erofs(state, repo, layer, scratch, progress)?;
            stack.lowers.push(erofs);
        }
        if !squash {
            for layer in steps {
                let erofs = stack.erofs(state, repo, layer, scratch, progress)?;
                stack.lowers.push(erofs);
            }
            return Ok(stack);
        }
        progress(&format!("squashing {} step layers into one", steps.len()));
        let mut dirs = Vec::new();
        for layer in inputs.iter().chain(steps) {
            dirs.push(stack.dir(state, repo, layer, progress)?);
        }
        let (below, above) = dirs.split_at(inputs.len());
        let erofs = squash_into(scratch, below, above)?;
        stack.lowers.push(erofs);
        Ok(stack)
    }

    /// `layer`'s erofs image: the state dir's, else one made from its snapshot.
    fn erofs(
        &mut self,
        state: &StateDir,
        repo: &Repo,
        layer: &ChainLayer,
        scratch: &Path,
        progress: &dyn Fn(&str),
    ) -> Result<PathBuf> {
        if let Some(p) = local_erofs(state, layer) {
            return Ok(p);
        }
        let dir = self.dir(state, repo, layer, progress)?;
        let img = scratch.join(format!("lower-{}.erofs", self.lowers.len()));
        udos_images::mkfs_erofs(&dir, &img)
            .with_context(|| format!("making an erofs image of the {} layer", layer.kind))?;
        Ok(img)
    }

    /// `layer`'s files in overlay form: the state dir's, else restored (and kept
    /// until the stack is dropped).
    fn dir(
        &mut self,
        state: &StateDir,
        repo: &Repo,
        layer: &ChainLayer,
        progress: &dyn Fn(&str),
    ) -> Result<PathBuf> {
        let files = layer_files(state, repo, layer)?;
        if let LayerFiles::Restored(_) = files {
            progress(&format!(
                "the {} layer {} is not in the state dir: restored from its snapshot",
                layer.kind,
                short(&layer.layer_id)
            ));
        }
        let path = files.path().to_path_buf();
        self._files.push(files);
        Ok(path)
    }
}

/// Splits a stack into its inputs (bases, workspace) and its step layers.
fn split_steps(layers: &[ChainLayer]) -> (&[ChainLayer], &[ChainLayer]) {
    let at = layers
        .iter()
        .position(|l| l.kind.starts_with("step"))
        .unwrap_or(layers.len());
    layers.split_at(at)
}

/// Squashes the step layers `above` (bottom first) into one erofs image in `scratch`,
/// its whiteouts pruned against `below` (bases, workspace), as `leg.rs` does for a
/// long leg.
fn squash_into(scratch: &Path, below: &[PathBuf], above: &[PathBuf]) -> Result<PathBuf> {
    let tree = scratch.join("squashed");
    let refs: Vec<&Path> = above.iter().map(PathBuf::as_path).collect();
    udos_layer::squash::squash(&refs, &tree).context("squashing the step layers")?;
    let below: Vec<&Path> = below.iter().map(PathBuf::as_path).collect();
    udos_layer::squash::prune_whiteouts(&tree, &below).context("pruning the squashed layer")?;
    // The snapshot description in each layer directory is not part of the root.
    let _ = std::fs::remove_file(tree.join(crate::snapshots::LAYER_META));
    let img = scratch.join("squashed.erofs");
    udos_images::mkfs_erofs(&tree, &img)?;
    std::fs::remove_dir_all(&tree)?;
    Ok(img)
}

/// The sealed output, verified.
fn read_sealed(output: &Path) -> Result<SealedOutput> {
    let sealed = read_output(output, &ReadLimits::default()).context(
        "the VM powered off without a sealed output (see its console above): nothing kept",
    )?;
    if sealed.record.status == RecordStatus::Error {
        bail!(
            "the guest could not seal what the shell changed: {}",
            sealed.record.error.as_deref().unwrap_or("no reason given")
        );
    }
    if sealed.layer_len == 0 {
        bail!("the guest sealed no layer: nothing kept");
    }
    sealed
        .verify_layer(output)
        .context("the sealed layer does not match its checksum: refused")?;
    Ok(sealed)
}

/// A layer the boot made, verified and stored.
#[derive(Debug, Clone)]
struct BootLayer {
    id: String,
    bytes: u64,
    entries: u64,
}

/// Stores the verified layer as the runner does (`step_vm::StepVm::store_layer`): under
/// its lock, unpacked (untrusted, bounded) into a private directory, renamed into
/// place, then its erofs image.
fn store_layer(
    state: &StateDir,
    sealed: &SealedOutput,
    output: &Path,
    disk_bytes: u64,
) -> Result<BootLayer> {
    let id = sealed.layer_id.clone();
    let _lock = state.lock_layer(&id)?;
    if !state.layer_erofs(&id).exists() {
        let tmp = state.unpack_dir(&id)?;
        let limits = UnpackLimits {
            max_total_bytes: disk_bytes,
            ..UnpackLimits::default()
        };
        sealed
            .unpack_layer(output, tmp.path(), &limits)
            .context("unpacking the boot's layer")?;
        let final_dir = state.layer_dir(&id);
        if final_dir.exists() {
            std::fs::remove_dir_all(&final_dir)?;
        }
        std::fs::rename(tmp.keep(), &final_dir)?;
        udos_images::mkfs_erofs(&final_dir, &state.layer_erofs(&id))?;
    }
    Ok(BootLayer {
        id,
        bytes: sealed.record.layer.bytes,
        entries: sealed.record.layer.entries,
    })
}

/// Records the boot as a new run: the source run's inputs, its leg's steps up to the
/// restore point (their layers, marked as taken from the source run), then the boot's
/// step with the new layer and its snapshot. A failure after the run began records it
/// as `error`.
fn record(
    prep: &Prepared<'_>,
    store: &mut Store,
    from: &Resolved,
    layer: &BootLayer,
    shell: Conclusion,
    progress: &dyn Fn(&str),
) -> Result<Kept> {
    let (run_id, generation) = store.begin_run(
        &source_point(from),
        &from.job,
        BOOT_EVENT,
        &prep.hypervisor.describe(),
        &prep.image.id,
    )?;
    match record_begun(
        prep, store, from, layer, shell, run_id, generation, progress,
    ) {
        Ok(kept) => Ok(kept),
        Err(e) => {
            let why = crate::errors::describe(&e);
            let _ = store.finish_run(
                run_id,
                "error",
                &serde_json::json!({ "run_id": run_id, "status": "error", "error": why })
                    .to_string(),
            );
            Err(e.context(format!("recording the boot as run {run_id}")))
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn record_begun(
    prep: &Prepared<'_>,
    store: &Store,
    from: &Resolved,
    layer: &BootLayer,
    shell: Conclusion,
    run_id: i64,
    generation: i64,
    progress: &dyn Fn(&str),
) -> Result<Kept> {
    let started = Instant::now();
    let step = from.step + 1;
    let parent = from
        .layers
        .last()
        .map(|l| l.layer_id.clone())
        .unwrap_or_default();
    progress(&format!("snapshotting layer {}", short(&layer.id)));
    let snapshot_id = snapshot(prep, run_id, generation, from, step, &parent, &layer.id)?;
    store.put_layer(&layer.id, "step", layer.bytes, layer.entries)?;
    store.set_layer_snapshot(&layer.id, &snapshot_id)?;
    let inputs = store.inputs(from.run)?;
    for i in &inputs {
        store.add_input(run_id, i.position, &i.kind, &i.layer_id)?;
    }
    let mut steps = source_steps(store, from)?;
    steps.push(StepReport {
        number: step as usize,
        id: None,
        name: format!("udos boot (run {} step {})", from.run, from.step),
        status: shell,
        outcome: shell,
        conclusion: shell,
        exit_code: None,
        snapshot_id: Some(snapshot_id.clone()),
        layer_id: Some(layer.id.clone()),
        cache_key: None,
        outputs: Default::default(),
        summary: None,
        cached_from: None,
        cached: false,
        phases_ms: Default::default(),
        actions: Vec::new(),
        error: None,
        note: Some(format!(
            "what a shell on run {} step {} changed (udos boot --keep)",
            from.run, from.step
        )),
        console_log: None,
    });
    for s in &steps {
        store.put_step(run_id, 0, &from.job, s)?;
    }
    let source_job = store
        .jobs(from.run)?
        .into_iter()
        .find(|j| j.leg == from.leg);
    let job = JobReport {
        id: from.job.clone(),
        name: source_job
            .as_ref()
            .map(|j| j.name.clone())
            .unwrap_or_else(|| from.job.clone()),
        matrix: source_job
            .as_ref()
            .and_then(|j| j.matrix.as_deref())
            .and_then(|m| serde_json::from_str(m).ok()),
        status: shell,
        outcome: shell,
        conclusion: shell,
        outputs: Default::default(),
        error: None,
        base: None,
        squashed_base: None,
        // Booted on the source leg's stack, so on its base.
        base_layer: source_job.as_ref().and_then(|j| j.base_layer.clone()),
        steps,
    };
    store.put_job(run_id, 0, &job)?;
    let report = RunReport {
        run_id,
        generation,
        status: shell,
        event: BOOT_EVENT.into(),
        workflow: source_point(from),
        workflows: Vec::new(),
        hypervisor: prep.hypervisor.describe(),
        image_id: prep.image.id.clone(),
        inputs: inputs
            .iter()
            .map(|i| InputReport {
                kind: i.kind.clone(),
                layer_id: i.layer_id.clone(),
                snapshot_id: i.snapshot_id.clone(),
            })
            .collect(),
        vms_booted: RunReport::count_vms(std::slice::from_ref(&job)),
        jobs: vec![job],
        notices: Vec::new(),
        wall_ms: u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
        phases_ms: Default::default(),
    };
    store.finish_run(run_id, shell.as_str(), &serde_json::to_string(&report)?)?;
    Ok(Kept {
        run_id,
        step,
        layer_id: layer.id.clone(),
        snapshot_id,
        bytes: layer.bytes,
        entries: layer.entries,
    })
}

/// The source leg's steps up to the restore point, as the new run's first steps: the
/// same layers and snapshots, marked as taken from the source run.
fn source_steps(store: &Store, from: &Resolved) -> Result<Vec<StepReport>> {
    let rows = store.steps(from.run)?;
    let mut out = Vec::new();
    for s in rows
        .into_iter()
        .filter(|s| s.leg == from.leg && s.number <= from.step)
    {
        let status: Conclusion = serde_json::from_value(serde_json::Value::String(
            s.status.clone(),
        ))
        .with_context(|| {
            format!(
                "step {} of run {} has status {:?}",
                s.number, from.run, s.status
            )
        })?;
        out.push(StepReport {
            number: s.number as usize,
            id: s.step_id,
            name: s.name,
            status,
            outcome: status,
            conclusion: status,
            exit_code: s.exit_code.and_then(|c| i32::try_from(c).ok()),
            snapshot_id: s.snapshot_id,
            layer_id: s.layer_id,
            cache_key: None,
            outputs: Default::default(),
            summary: None,
            cached_from: Some(CachedFrom {
                run_id: from.run,
                leg: from.leg,
                step: s.number,
            }),
            cached: true,
            phases_ms: Default::default(),
            error: None,
            note: Some(format!("run {} step {}", from.run, s.number)),
            console_log: None,
            actions: Vec::new(),
        });
    }
    Ok(out)
}

/// `restic backup` of the new layer (with its description, under its lock, as every
/// layer snapshot is made); the full snapshot id.
fn snapshot(
    prep: &Prepared<'_>,
    run_id: i64,
    generation: i64,
    from: &Resolved,
    step: i64,
    parent: &str,
    layer: &str,
) -> Result<String> {
    let snapshotter = Snapshotter::start(prep.repo.clone(), prep.state.clone())?;
    snapshotter.queue().add(
        "boot".into(),
        &prep.state.layer_dir(layer),
        Tags::default()
            .with("udos", "layer")
            .with("kind", "boot")
            .with("run", run_id)
            .with("generation", generation)
            .with("job", &from.job)
            .with("leg", 0)
            .with("step", step)
            .with("from_run", from.run)
            .with("from_step", from.step)
            .with("parent", parent)
            .with("layer", layer),
    );
    let done = snapshotter
        .finish()
        .pop()
        .context("the snapshot thread ended without a result")?;
    let short_id = done.result.context("snapshotting the boot's layer")?;
    prep.repo
        .resolve_ids(&[short_id])?
        .pop()
        .context("restic gave no snapshot id")
}

/// Moves the boot's console log to where the new run's step keeps it (the scratch
/// directory goes when the boot returns).
fn keep_console_log(state: &StateDir, kept: &Kept, log: &Path) {
    let dir = state
        .step_dir(kept.run_id, 0, kept.step as usize)
        .join("vm");
    let moved = std::fs::create_dir_all(&dir)
        .and_then(|_| std::fs::copy(log, dir.join(udos_vmm::layout::CONSOLE_LOG)));
    if let Err(e) = moved {
        tracing::warn!("keeping the boot's console log: {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layer(kind: &str, id: &str) -> ChainLayer {
        ChainLayer {
            kind: kind.into(),
            layer_id: id.into(),
            snapshot_id: None,
        }
    }

    #[test]
    fn a_stop_is_the_escape_key_unless_udos_was_signalled() {
        assert_eq!(Ended::of(&VmExit::Stopped, false), Ended::Detached);
        assert_eq!(Ended::of(&VmExit::Stopped, true), Ended::Interrupted);
        assert_eq!(Ended::of(&VmExit::PoweredOff, true), Ended::PoweredOff);
        let crash = VmExit::Crashed {
            code: Some(1),
            signal: None,
            detail: "boom".into(),
        };
        assert_eq!(
            Ended::of(&crash, false),
            Ended::Crashed("crashed (exit code 1): boom".into())
        );
    }

    #[test]
    fn inputs_and_step_layers_are_told_apart() {
        let layers = [
            layer("base", "b1"),
            layer("base", "b0"),
            layer("workspace", "w"),
            layer("step 1", "s1"),
            layer("step 3", "s3"),
        ];
        let (inputs, steps) = split_steps(&layers);
        assert_eq!(inputs.len(), 3);
        assert_eq!(
            steps
                .iter()
                .map(|l| l.layer_id.as_str())
                .collect::<Vec<_>>(),
            ["s1", "s3"]
        );
        let (inputs, steps) = split_steps(&layers[..2]);
        assert_eq!((inputs.len(), steps.len()), (2, 0));
    }

    fn write(path: &Path, text: &str) {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, text).unwrap();
    }

    /// A layer in the state dir as the runner leaves it: its directory (with the
    /// snapshot's description at its top) and its erofs image.
    fn local_step_layer(state: &StateDir, id: &str, files: &[(&str, &str)]) {
        let dir = state.layer_dir(id);
        for (p, text) in files {
            write(&dir.join(p), text);
        }
        write(&dir.join(crate::snapshots::LAYER_META), "{}");
        udos_images::mkfs_erofs(&dir, &state.layer_erofs(id)).unwrap();
    }

    fn whiteout(path: &Path) {
        let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: mknod on a NUL-terminated path we own; a 0/0 character device is an
        // overlay whiteout.
        let rc = unsafe { libc::mknod(c.as_ptr(), libc::S_IFCHR | 0o600, 0) };
        assert_eq!(
            rc,
            0,
            "mknod {}: {}",
            path.display(),
            std::io::Error::last_os_error()
        );
    }

    /// Nine step layers (one more than a VM mounts separately) become one lower that
    /// shows what the nine showed: the latest version of a file, files from every
    /// layer, a deletion of a workspace file; and no snapshot description.
    #[test]
    fn more_step_layers_than_a_vm_mounts_are_squashed_into_one() {
        let tmp = tempfile::tempdir().unwrap();
        let state = StateDir::resolve(Some(&tmp.path().join("state"))).unwrap();
        let repo = Repo::from_env_or_default(state.root()).unwrap();
        let base_dir = state.images_dir().join("base").join("b");
        write(&base_dir.join("tree/etc/os"), "base");
        udos_images::mkfs_erofs(&base_dir.join("tree"), &base_dir.join("base.erofs")).unwrap();
        local_step_layer(
            &state,
            "ws",
            &[("workspace/gone.txt", "x"), ("workspace/kept.txt", "k")],
        );
        let mut layers = vec![layer("base", "b"), layer("workspace", "ws")];
        for i in 1..=MAX_STEP_LOWERS + 1 {
            let id = format!("s{i}");
            let own = format!("workspace/from-{i}");
            local_step_layer(&state, &id, &[("workspace/v", &i.to_string()), (&own, "")]);
            if i == 3 {
                whiteout(&state.layer_dir(&id).join("workspace/gone.txt"));
            }
            layers.push(layer(&format!("step {i}"), &id));
        }
        let scratch = tempfile::tempdir_in(state.root()).unwrap();
        let stack = Stack::build(&state, &repo, &layers, scratch.path(), &|_| {}).unwrap();
        assert_eq!(
            stack.lowers,
            [
                base_dir.join("base.erofs"),
                state.layer_erofs("ws"),
                scratch.path().join("squashed.erofs")
            ]
        );
        let out = scratch.path().join("extracted");
        let ok = std::process::Command::new("fsck.erofs")
            .arg(format!("--extract={}", out.display()))
            .arg(scratch.path().join("squashed.erofs"))
            .status()
            .unwrap()
            .success();
        assert!(ok, "fsck.erofs --extract");
        let ws = out.join("workspace");
        assert_eq!(std::fs::read_to_string(ws.join("v")).unwrap(), "9");
        for i in 1..=MAX_STEP_LOWERS + 1 {
            assert!(ws.join(format!("from-{i}")).is_file(), "from-{i}");
        }
        let gone = std::fs::symlink_metadata(ws.join("gone.txt")).unwrap();
        use std::os::unix::fs::FileTypeExt;
        assert!(
            gone.file_type().is_char_device(),
            "the deletion is a whiteout"
        );
        assert!(
            !ws.join("kept.txt").exists(),
            "the workspace is its own lower"
        );
        assert!(!out.join(crate::snapshots::LAYER_META).exists());
    }

    /// Up to the bound, every layer is its own lower, straight from the state dir.
    #[test]
    fn a_short_stack_mounts_the_state_dirs_images() {
        let tmp = tempfile::tempdir().unwrap();
        let state = StateDir::resolve(Some(&tmp.path().join("state"))).unwrap();
        let repo = Repo::from_env_or_default(state.root()).unwrap();
        local_step_layer(&state, "ws", &[("workspace/a", "a")]);
        local_step_layer(&state, "s1", &[("workspace/b", "b")]);
        let layers = [layer("workspace", "ws"), layer("step 1", "s1")];
        let scratch = tempfile::tempdir_in(state.root()).unwrap();
        let stack = Stack::build(&state, &repo, &layers, scratch.path(), &|_| {}).unwrap();
        assert_eq!(
            stack.lowers,
            [state.layer_erofs("ws"), state.layer_erofs("s1")]
        );
    }

    /// A layer neither in the state dir nor in the repository is refused, naming it.
    #[test]
    fn a_layer_with_no_copy_anywhere_is_refused_clearly() {
        let tmp = tempfile::tempdir().unwrap();
        let state = StateDir::resolve(Some(&tmp.path().join("state"))).unwrap();
        let repo = Repo::from_env_or_default(state.root()).unwrap();
        let scratch = tempfile::tempdir_in(state.root()).unwrap();
        let err = Stack::build(
            &state,
            &repo,
            &[layer("step 2", "gone")],
            scratch.path(),
            &|_| {},
        )
        .err()
        .unwrap();
        let text = format!("{err:#}");
        assert!(
            text.contains("step 2 layer gone is neither in the state dir nor in the repository"),
            "{text}"
        );
    }
}
