//! Runs one job of a workflow, each step in its own VM, chaining layers.
//!
//! The data path, per step k:
//! 1. decide (pure core) whether the step runs; synthesize its workflow and `.actrc`;
//! 2. build its control layer (erofs), a fresh upper disk and a zeroed output disk;
//! 3. boot the VM with the lowers: base, workspace, layers 1..k-1, control;
//! 4. read the sealed output (untrusted), unpack the layer into overlay form and make
//!    its erofs image, which step k+1 mounts;
//! 5. hand the layer to the snapshot thread, which runs `restic backup` while step k+1's
//!    VM runs (off the critical path), then resolve full snapshot ids once at the end.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use serde::Serialize;
use udos_core::condition::{decide, Decision, JobState};
use udos_core::synth::{synthesize, CarriedEnv, PriorStep};
use udos_core::workflow::{Job, Step, Workflow};
use udos_layer::output::{read_output, ReadLimits};
use udos_layer::unpack::UnpackLimits;
use udos_layer::{RecordStatus, StepRecord};
use udos_vmm::{Disk, Hypervisor, VmExit, VmSpec};

use crate::restic::{Repo, Tags};
use crate::state::StateDir;
use crate::store::{StepRow, Store};
use crate::workspace;

/// How to run.
#[derive(Debug, Clone)]
pub struct RunSettings {
    /// vCPUs per step VM.
    pub cpus: u32,
    /// Memory per step VM, MiB.
    pub memory_mib: u64,
    /// A step VM is killed after this long.
    pub step_timeout: Duration,
    /// Size of each step's upper (scratch) disk and output device, bytes (sparse).
    pub disk_bytes: u64,
    /// Print guest consoles to stderr live.
    pub stream_console: bool,
    /// Set to true (from another thread) to cancel the run: the running step VM is
    /// killed and the remaining steps are not started.
    pub cancel: Option<Arc<AtomicBool>>,
}

impl Default for RunSettings {
    fn default() -> Self {
        RunSettings {
            cpus: 1,
            memory_mib: 1024,
            step_timeout: Duration::from_secs(600),
            disk_bytes: 4 << 30,
            stream_console: true,
            cancel: None,
        }
    }
}

/// Everything a run needs that was prepared beforehand.
pub struct Prepared<'a> {
    /// State directory.
    pub state: &'a StateDir,
    /// The guest image.
    pub image: &'a udos_images::Image,
    /// The base layer.
    pub base: &'a udos_images::BaseLayer,
    /// The chosen hypervisor.
    pub hypervisor: &'a dyn Hypervisor,
    /// The restic repository (initialized).
    pub repo: &'a Repo,
}

/// The JSON report of a run (`udos run --json`).
#[derive(Debug, Clone, Serialize)]
pub struct RunReport {
    /// Run number.
    pub run_id: i64,
    /// Generation number.
    pub generation: i64,
    /// `success` or `failure`.
    pub status: String,
    /// Workflow file.
    pub workflow: String,
    /// Hypervisor used.
    pub hypervisor: String,
    /// Guest image id.
    pub image_id: String,
    /// Input layers below the steps' layers.
    pub inputs: Vec<InputReport>,
    /// The job (one per run for now).
    pub jobs: Vec<JobReport>,
    /// Wall time of the run, from the workspace layer to the last snapshot, ms.
    pub wall_ms: u64,
}

/// An input layer of the run.
#[derive(Debug, Clone, Serialize)]
pub struct InputReport {
    /// `base` or `workspace`.
    pub kind: String,
    /// Layer id.
    pub layer_id: String,
    /// Full restic snapshot id.
    pub snapshot_id: Option<String>,
}

/// One job of a run.
#[derive(Debug, Clone, Serialize)]
pub struct JobReport {
    /// Job id.
    pub id: String,
    /// `success` or `failure`.
    pub status: String,
    /// Its steps, in order.
    pub steps: Vec<StepReport>,
}

/// One step of a run.
#[derive(Debug, Clone, Serialize)]
pub struct StepReport {
    /// 1-based number.
    pub number: usize,
    /// The user's step id.
    pub id: Option<String>,
    /// Display name.
    pub name: String,
    /// `success`, `failure` or `skipped`.
    pub status: String,
    /// The step's exit code (null when skipped).
    pub exit_code: Option<i32>,
    /// Full restic id of the layer snapshot.
    pub snapshot_id: Option<String>,
    /// Layer id (SHA-256 of the layer stream).
    pub layer_id: Option<String>,
    /// Cache key of the step's inputs.
    pub cache_key: Option<String>,
    /// Outputs the step set.
    pub outputs: BTreeMap<String, String>,
    /// Phase timings, ms: materialize, boot, guest, seal, unpack, snapshot, vm.
    pub phases_ms: BTreeMap<String, u64>,
    /// What went wrong, when udos (not the step) failed.
    pub error: Option<String>,
    /// The step VM's console log.
    pub console_log: Option<PathBuf>,
}

/// File at the root of every layer snapshot describing the layer (its tags, as JSON).
pub const LAYER_META: &str = ".udos-layer.json";

/// A layer to snapshot. `key` names the restore point (`base`, `workspace`,
/// `step-N`): two steps that wrote the same bytes share a layer but each gets its own
/// snapshot with its own tags.
struct SnapshotJob {
    key: String,
    dir: PathBuf,
    tags: Tags,
}

struct SnapshotDone {
    key: String,
    result: Result<String>,
    took: Duration,
}

/// Write the layer's description, then back it up. Runs on the snapshot thread, one
/// job at a time, so two restore points of one layer directory never race.
fn snapshot_layer(repo: &Repo, job: &SnapshotJob) -> Result<String> {
    // The snapshot carries its own description, and so is never empty (restic refuses
    // empty snapshots, and a step may write nothing). The erofs image was made before,
    // so no guest sees this file; restore drops it.
    let meta: serde_json::Map<String, serde_json::Value> = job
        .tags
        .0
        .iter()
        .map(|(k, v)| (k.clone(), serde_json::Value::String(v.clone())))
        .collect();
    std::fs::write(job.dir.join(LAYER_META), serde_json::to_vec_pretty(&meta)?)
        .with_context(|| format!("describing layer {}", job.dir.display()))?;
    repo.backup(&job.dir, &job.tags)
}

fn ms(d: Duration) -> u64 {
    d.as_millis() as u64
}

/// Run `job` of `workflow` (read from `workflow_path`).
pub fn run_job(
    prep: &Prepared<'_>,
    store: &mut Store,
    workflow_path: &Path,
    workflow: &Workflow,
    job: &Job,
    settings: &RunSettings,
) -> Result<RunReport> {
    let started = Instant::now();
    let state = prep.state;
    let shown_path = workflow_path
        .canonicalize()
        .unwrap_or_else(|_| workflow_path.to_path_buf());
    let (run_id, generation) = store.begin_run(
        &shown_path.display().to_string(),
        &job.id,
        &prep.hypervisor.describe(),
        &prep.image.id,
    )?;
    tracing::info!(run_id, generation, job = %job.id, hypervisor = prep.hypervisor.name(), "run started");

    // Snapshots happen on their own thread so they overlap the next step's VM.
    let (job_tx, job_rx) = mpsc::channel::<SnapshotJob>();
    let (done_tx, done_rx) = mpsc::channel::<SnapshotDone>();
    let repo = prep.repo.clone();
    let snapshotter = std::thread::spawn(move || {
        for j in job_rx {
            let t = Instant::now();
            let result = snapshot_layer(&repo, &j);
            let _ = done_tx.send(SnapshotDone {
                key: j.key,
                result,
                took: t.elapsed(),
            });
        }
    });
    let snapshot = |key: String, dir: &Path, tags: Tags| {
        let _ = job_tx.send(SnapshotJob {
            key,
            dir: dir.to_path_buf(),
            tags,
        });
    };

    // Inputs: the base layer and the workspace layer.
    let base_tags = Tags::default()
        .with("udos", "layer")
        .with("kind", "base")
        .with("layer", &prep.base.id);
    store.put_layer(&prep.base.id, "base", 0, 0)?;
    if store.layer_snapshot(&prep.base.id)?.is_none() {
        snapshot("base".into(), &prep.base.tree, base_tags);
    }
    let wt = workspace::discover(workflow_path)?;
    let ws_id = wt.layer_id()?;
    let ws_dir = state.layer_dir(&ws_id);
    if !state.layer_erofs(&ws_id).exists() {
        let tmp = state.layers_dir().join(format!("{ws_id}.tmp"));
        let _ = std::fs::remove_dir_all(&tmp);
        std::fs::create_dir_all(&tmp)?;
        let n = wt.materialize(&tmp)?;
        if ws_dir.exists() {
            std::fs::remove_dir_all(&ws_dir)?;
        }
        std::fs::rename(&tmp, &ws_dir)?;
        udos_images::mkfs_erofs(&ws_dir, &state.layer_erofs(&ws_id))?;
        tracing::info!(files = n, layer = %short(&ws_id), root = %wt.root.display(), "workspace layer built");
    }
    store.put_layer(&ws_id, "workspace", 0, wt.files.len() as u64)?;
    if store.layer_snapshot(&ws_id)?.is_none() {
        snapshot(
            "workspace".into(),
            &ws_dir,
            Tags::default()
                .with("udos", "layer")
                .with("kind", "workspace")
                .with("layer", &ws_id),
        );
    }
    store.add_input(run_id, 0, "base", &prep.base.id)?;
    store.add_input(run_id, 1, "workspace", &ws_id)?;

    let mut lowers: Vec<(String, PathBuf)> = vec![
        (prep.base.id.clone(), prep.base.erofs.clone()),
        (ws_id.clone(), state.layer_erofs(&ws_id)),
    ];
    let mut prior: Vec<PriorStep> = Vec::new();
    let mut carried = CarriedEnv::default();
    let mut failed = false;
    let mut reports: Vec<StepReport> = Vec::new();
    let mut parent_layer = ws_id.clone();

    for step in &job.steps {
        let mut report = StepReport {
            number: step.number,
            id: step.id.clone(),
            name: step.display_name.clone(),
            status: "skipped".into(),
            exit_code: None,
            snapshot_id: None,
            layer_id: None,
            cache_key: None,
            outputs: BTreeMap::new(),
            phases_ms: BTreeMap::new(),
            error: None,
            console_log: None,
        };
        let cancelled = settings
            .cancel
            .as_ref()
            .is_some_and(|c| c.load(Ordering::Acquire));
        if cancelled {
            eprintln!(
                "udos: step {} {:?}: not started, the run was cancelled",
                step.number, step.display_name
            );
            failed = true;
            report.error = Some("the run was cancelled".into());
            store.put_step(run_id, &row(&report), "{}", "{}", report.error.as_deref())?;
            reports.push(report);
            continue;
        }
        if decide(step.condition.as_deref(), JobState { failed }) == Decision::Skip {
            eprintln!(
                "udos: step {} {:?}: skipped",
                step.number, step.display_name
            );
            prior.push(PriorStep {
                id: step.id.clone(),
                number: step.number,
                outcome: "skipped".into(),
                continue_on_error: step.continue_on_error,
                outputs: BTreeMap::new(),
            });
            store.put_step(run_id, &row(&report), "{}", "{}", None)?;
            reports.push(report);
            continue;
        }
        eprintln!(
            "udos: step {} {:?}: starting VM",
            step.number, step.display_name
        );
        let outcome = run_step(
            prep, run_id, generation, workflow, job, step, &prior, &carried, &lowers, settings,
        );
        let done = match outcome {
            Ok(done) => done,
            Err(e) => StepDone::failed(format!("{e:#}")),
        };
        report.phases_ms = done.phases;
        report.cache_key = done.cache_key.clone();
        report.console_log = done.console_log.clone();
        report.error = done.error.clone();
        let act = done
            .record
            .as_ref()
            .and_then(|r| r.step(step.act_id()).cloned());
        let (status, exit_code) = match (&done.record, &act) {
            (_, Some(a)) if a.result == "success" => ("success", Some(0)),
            (_, Some(a)) if a.result == "skipped" => ("skipped", None),
            (_, Some(a)) => ("failure", Some(a.exit_code.unwrap_or(1))),
            (Some(r), None) if r.status == RecordStatus::Success => ("skipped", None),
            _ => ("failure", Some(-1)),
        };
        if status == "failure" && report.error.is_none() && act.is_none() {
            report.error = Some(match &done.record {
                Some(r) => r
                    .error
                    .clone()
                    .unwrap_or_else(|| "act did not report the step".into()),
                None => "the step VM produced no result".into(),
            });
        }
        report.status = status.into();
        report.exit_code = exit_code;
        if let Some(a) = &act {
            report.outputs = a.outputs.clone();
            carried.absorb(&a.env, &a.path);
        }
        if let Some(layer) = &done.layer {
            report.layer_id = Some(layer.id.clone());
            store.put_layer(&layer.id, "step", layer.bytes, layer.entries)?;
            lowers.push((layer.id.clone(), state.layer_erofs(&layer.id)));
            snapshot(
                format!("step-{}", step.number),
                &state.layer_dir(&layer.id),
                Tags::default()
                    .with("udos", "layer")
                    .with("kind", "step")
                    .with("run", run_id)
                    .with("generation", generation)
                    .with("job", &job.id)
                    .with("step", step.number)
                    .with("parent", &parent_layer)
                    .with("key", done.cache_key.as_deref().unwrap_or(""))
                    .with("layer", &layer.id),
            );
            parent_layer = layer.id.clone();
        }
        if status == "failure" && !step.continue_on_error {
            failed = true;
        }
        prior.push(PriorStep {
            id: step.id.clone(),
            number: step.number,
            outcome: if status == "skipped" {
                "skipped"
            } else {
                status
            }
            .into(),
            continue_on_error: step.continue_on_error,
            outputs: report.outputs.clone(),
        });
        eprintln!(
            "udos: step {} {:?}: {}{}",
            step.number,
            step.display_name,
            status,
            report
                .error
                .as_deref()
                .map(|e| format!(" ({e})"))
                .unwrap_or_default()
        );
        store.put_step(
            run_id,
            &row(&report),
            &serde_json::to_string(&report.outputs)?,
            &serde_json::to_string(&report.phases_ms)?,
            report.error.as_deref(),
        )?;
        reports.push(report);
    }

    // Wait for the snapshots, then resolve their full ids in one go.
    drop(job_tx);
    eprintln!("udos: waiting for layer snapshots");
    let _ = snapshotter.join();
    let mut short_by_key: BTreeMap<String, String> = BTreeMap::new();
    let mut took_by_key: BTreeMap<String, u64> = BTreeMap::new();
    let mut snapshot_errors = Vec::new();
    for d in done_rx.try_iter() {
        took_by_key.insert(d.key.clone(), ms(d.took));
        match d.result {
            Ok(s) => {
                short_by_key.insert(d.key, s);
            }
            Err(e) => snapshot_errors.push(format!("{e:#}")),
        }
    }
    let shorts: Vec<String> = short_by_key.values().cloned().collect();
    let fulls = prep.repo.resolve_ids(&shorts)?;
    let full_by_key: BTreeMap<String, String> = short_by_key.keys().cloned().zip(fulls).collect();
    for (key, layer) in [("base", &prep.base.id), ("workspace", &ws_id)] {
        if let Some(full) = full_by_key.get(key) {
            store.set_layer_snapshot(layer, full)?;
        }
    }
    for r in &mut reports {
        let key = format!("step-{}", r.number);
        if let (Some(layer), Some(full)) = (&r.layer_id, full_by_key.get(&key)) {
            r.snapshot_id = Some(full.clone());
            store.set_layer_snapshot(layer, full)?;
        }
        if let Some(t) = took_by_key.get(&key) {
            r.phases_ms.insert("snapshot".into(), *t);
        }
        store.put_step(
            run_id,
            &row(r),
            &serde_json::to_string(&r.outputs)?,
            &serde_json::to_string(&r.phases_ms)?,
            r.error.as_deref(),
        )?;
    }

    let mut status = if failed { "failure" } else { "success" };
    if !snapshot_errors.is_empty() {
        // A layer that is not in the repository is not a restore point: say so loudly.
        for e in &snapshot_errors {
            eprintln!("udos: error: {e}");
        }
        status = "failure";
    }
    let inputs = vec![
        InputReport {
            kind: "base".into(),
            layer_id: prep.base.id.clone(),
            snapshot_id: store.layer_snapshot(&prep.base.id)?,
        },
        InputReport {
            kind: "workspace".into(),
            layer_id: ws_id.clone(),
            snapshot_id: store.layer_snapshot(&ws_id)?,
        },
    ];
    let report = RunReport {
        run_id,
        generation,
        status: status.into(),
        workflow: workflow_path.display().to_string(),
        hypervisor: prep.hypervisor.describe(),
        image_id: prep.image.id.clone(),
        inputs,
        jobs: vec![JobReport {
            id: job.id.clone(),
            status: status.into(),
            steps: reports,
        }],
        wall_ms: ms(started.elapsed()),
    };
    store.finish_run(run_id, status, &serde_json::to_string(&report)?)?;
    Ok(report)
}

fn row(r: &StepReport) -> StepRow {
    StepRow {
        number: r.number as i64,
        step_id: r.id.clone(),
        name: r.name.clone(),
        status: r.status.clone(),
        exit_code: r.exit_code.map(i64::from),
        layer_id: r.layer_id.clone(),
        snapshot_id: r.snapshot_id.clone(),
        cache_key: r.cache_key.clone(),
    }
}

fn short(id: &str) -> &str {
    id.get(..12).unwrap_or(id)
}

struct LayerDone {
    id: String,
    bytes: u64,
    entries: u64,
}

struct StepDone {
    record: Option<StepRecord>,
    layer: Option<LayerDone>,
    phases: BTreeMap<String, u64>,
    cache_key: Option<String>,
    console_log: Option<PathBuf>,
    error: Option<String>,
}

impl StepDone {
    fn failed(error: String) -> StepDone {
        StepDone {
            record: None,
            layer: None,
            phases: BTreeMap::new(),
            cache_key: None,
            console_log: None,
            error: Some(error),
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn run_step(
    prep: &Prepared<'_>,
    run_id: i64,
    generation: i64,
    workflow: &Workflow,
    job: &Job,
    step: &Step,
    prior: &[PriorStep],
    carried: &CarriedEnv,
    lowers: &[(String, PathBuf)],
    settings: &RunSettings,
) -> Result<StepDone> {
    let t0 = Instant::now();
    let state = prep.state;
    let dir = state.step_dir(run_id, step.number);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;

    // Control layer: /.actrc and /.udos/step.yml.
    let files = synthesize(workflow, job, step, prior, carried);
    let control = dir.join("control");
    std::fs::create_dir_all(control.join(".udos"))?;
    std::fs::write(control.join(".actrc"), &files.actrc)?;
    std::fs::write(control.join(".udos/step.yml"), &files.workflow_yaml)?;
    std::fs::write(
        control.join(".udos/context.json"),
        serde_json::to_vec_pretty(&serde_json::json!({
            "run_id": run_id, "generation": generation, "job": job.id, "step": step.number,
        }))?,
    )?;
    let control_img = dir.join("control.erofs");
    udos_images::mkfs_erofs(&control, &control_img)?;

    let layer_ids: Vec<String> = lowers.iter().map(|(id, _)| id.clone()).collect();
    let cache_key = udos_core::cache::step_key(&udos_core::cache::StepInputs {
        image_id: &prep.image.id,
        layers: &layer_ids,
        actrc: &files.actrc,
        workflow_yaml: &files.workflow_yaml,
    });

    let upper = dir.join("upper.img");
    udos_images::make_upper_disk(
        &udos_images::ImageStore::new(state.root()).upper_template_dir(),
        &upper,
        settings.disk_bytes,
    )?;
    let output = dir.join("output.img");
    std::fs::File::create(&output)
        .and_then(|f| f.set_len(settings.disk_bytes))
        .with_context(|| format!("creating the output disk {}", output.display()))?;

    let mut disks = Vec::new();
    let mut serials = Vec::new();
    for (i, (_, path)) in lowers.iter().enumerate() {
        let serial = format!("udos-l{i}");
        disks.push(Disk {
            path: path.clone(),
            read_only: true,
            serial: serial.clone(),
        });
        serials.push(serial);
    }
    let control_serial = format!("udos-l{}", lowers.len());
    disks.push(Disk {
        path: control_img,
        read_only: true,
        serial: control_serial.clone(),
    });
    serials.push(control_serial);
    disks.push(Disk {
        path: upper.clone(),
        read_only: false,
        serial: "udos-upper".into(),
    });
    disks.push(Disk {
        path: output.clone(),
        read_only: false,
        serial: "udos-out".into(),
    });
    let guest_timeout = settings.step_timeout.as_secs().max(1);
    let cmdline = format!(
        "console=ttyS0 quiet panic=-1 udos.mode=step udos.lowers={} udos.upper=udos-upper udos.output=udos-out udos.timeout={}",
        serials.join(","),
        guest_timeout
    );
    let prefix = format!("  [{}] ", step.number);
    let stream = settings.stream_console;
    let spec = VmSpec {
        name: format!("udos-{run_id}-{}", step.number),
        kernel: prep.image.vmlinux.clone(),
        initramfs: prep.image.initramfs.clone(),
        cmdline,
        disks,
        cpus: settings.cpus,
        memory_mib: settings.memory_mib,
        runtime_dir: dir.join("vm"),
        // The guest enforces the step timeout itself and still seals; the host's
        // timeout is the backstop for a guest that hangs.
        timeout: settings.step_timeout + Duration::from_secs(60),
        console: Some(Box::new(move |line: &str| {
            if stream {
                eprintln!("{prefix}{line}");
            }
        })),
    };
    let materialize = t0.elapsed();
    let vm_started = Instant::now();
    let never = AtomicBool::new(false);
    let cancel = settings.cancel.as_deref().unwrap_or(&never);
    let outcome = prep.hypervisor.run_until(spec, cancel);
    let vm_wall = vm_started.elapsed();
    let mut phases = BTreeMap::new();
    phases.insert("materialize".to_string(), ms(materialize));
    phases.insert("vm".to_string(), ms(vm_wall));
    let console_log = dir.join("vm").join("console.log");
    let mut done = StepDone {
        record: None,
        layer: None,
        phases,
        cache_key: Some(cache_key),
        console_log: Some(console_log.clone()),
        error: None,
    };
    let outcome = match outcome {
        Ok(o) => o,
        Err(e) => {
            done.error = Some(format!(
                "{} could not run the VM: {e}",
                prep.hypervisor.name()
            ));
            return Ok(done);
        }
    };

    let t_unpack = Instant::now();
    let sealed = match read_output(&output, &ReadLimits::default()) {
        Ok(s) => s,
        Err(e) => {
            let why = match outcome.exit {
                VmExit::TimedOut => format!(
                    "the guest hung and was killed after {}s",
                    (settings.step_timeout + Duration::from_secs(60)).as_secs()
                ),
                VmExit::Crashed { .. } => "the hypervisor crashed".to_string(),
                VmExit::PoweredOff => "the guest stopped without sealing its output".to_string(),
                VmExit::Stopped => "the run was cancelled and its VM killed".to_string(),
            };
            done.error = Some(format!(
                "{why} ({e}); console log: {}",
                console_log.display()
            ));
            return Ok(done);
        }
    };
    let act_ms = sealed.record.timings_ms.get("act").copied().unwrap_or(0);
    let seal_ms = sealed.record.timings_ms.get("seal").copied().unwrap_or(0);
    done.phases.insert("guest".into(), act_ms);
    done.phases.insert("seal".into(), seal_ms);
    if let Some(v) = sealed.record.timings_ms.get("init_to_act") {
        done.phases.insert("init_to_act".into(), *v);
    }
    done.phases
        .insert("boot".into(), ms(vm_wall).saturating_sub(act_ms + seal_ms));
    if sealed.record.status == RecordStatus::Error {
        done.error = sealed.record.error.clone();
    }
    if sealed.layer_len > 0 {
        // The id in the header is the guest's claim: the stream must hash to it before
        // it becomes the step's layer, and only then is an existing layer reused.
        let id = sealed.layer_id.clone();
        if state.layer_erofs(&id).exists() {
            sealed
                .verify_layer(&output)
                .with_context(|| format!("verifying the layer of step {}", step.number))?;
        } else {
            // A private (0700) scratch dir of its own, removed on every error path.
            let tmp = state.unpack_dir(&id)?;
            let limits = UnpackLimits {
                max_total_bytes: settings.disk_bytes,
                ..UnpackLimits::default()
            };
            sealed
                .unpack_layer(&output, tmp.path(), &limits)
                .with_context(|| format!("unpacking the layer of step {}", step.number))?;
            let final_dir = state.layer_dir(&id);
            if final_dir.exists() {
                std::fs::remove_dir_all(&final_dir)?;
            }
            std::fs::rename(tmp.path(), &final_dir)?;
            // Renamed away: nothing left for the guard to remove.
            let _ = tmp.keep();
            udos_images::mkfs_erofs(&final_dir, &state.layer_erofs(&id))?;
        }
        done.layer = Some(LayerDone {
            id: id.clone(),
            bytes: sealed.record.layer.bytes,
            entries: sealed.record.layer.entries,
        });
    }
    done.phases.insert("unpack".into(), ms(t_unpack.elapsed()));
    done.record = Some(sealed.record);
    // The disks are sparse but can hold gigabytes the step wrote: the layer is kept,
    // the scratch is not.
    let _ = std::fs::remove_file(&upper);
    let _ = std::fs::remove_file(&output);
    Ok(done)
}
