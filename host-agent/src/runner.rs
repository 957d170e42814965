//! Runs the jobs of a run, each matrix leg as its own chain of step VMs.
//!
//! The engine in the pure core decides ([`udos_core::engine::run::Run`]); this loop
//! only acts: it starts each leg the engine hands out on a thread ([`crate::leg`]),
//! stops legs the engine cancels, and feeds each leg's end back. Before the first leg
//! it makes the workspace layer; after the last, it waits for the snapshots, records
//! their ids, and writes the report. A run that fails after it began is recorded as
//! `error`, never left `running`.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use udos_core::engine::graph::{Selection, WorkflowSet};
use udos_core::engine::run::{Action, LegId, Run, RunConfig};
use udos_core::engine::Conclusion;
use udos_core::value::Value;

use crate::leg::{run_leg, LegOutput, RunShared};
use crate::progress::{Event, JobRef, Progress};
use crate::report::{InputReport, JobReport, RunReport, StepReport};
use crate::restic::{Repo, Tags};
use crate::snapshots::Snapshotter;
use crate::state::StateDir;
use crate::step_vm::mask;
use crate::store::Store;
use crate::workspace;

/// How to run.
#[derive(Debug, Clone)]
pub struct RunSettings {
    /// vCPUs per step VM.
    pub cpus: u32,
    /// Memory per step VM, MiB.
    pub memory_mib: u64,
    /// No step runs longer than this, whatever its `timeout-minutes`.
    pub step_timeout: Duration,
    /// Size of each step's upper (scratch) disk and output device, bytes (sparse).
    pub disk_bytes: u64,
    /// Print guest consoles to stderr live.
    pub stream_console: bool,
    /// Set to true (from another thread) to cancel the run: running legs are stopped,
    /// nothing new starts but steps that ask for it (`if: always()`).
    pub cancel: Option<Arc<AtomicBool>>,
    /// The steps' network: NAT egress and the named host ports, or none.
    pub network: Option<udos_vmm::Network>,
    /// Reuse recorded results of steps whose inputs are unchanged (`--no-cache`: no).
    pub use_cache: bool,
    /// `udos rerun --from`: steps that run again even when their inputs are unchanged.
    pub rerun_from: Option<crate::rerun::RerunFrom>,
    /// Where the run's lines go: plain lines, or the board on a terminal.
    pub progress: Arc<Progress>,
    /// On a tagged commit, squash each leg's final root into a base; start legs from
    /// the squashed base of a tagged ancestor (`--no-squash`: neither).
    pub squash: bool,
    /// A VM per step (default) or per job (`--per`, docs/job-mode.md).
    pub per: Per,
}

/// What one VM runs (`udos run --per`).
#[derive(
    Debug,
    Clone,
    Copy,
    Default,
    PartialEq,
    Eq,
    clap::ValueEnum,
    serde::Serialize,
    serde::Deserialize,
)]
#[serde(rename_all = "snake_case")]
pub enum Per {
    /// Each step in its own VM, with its own restore point.
    #[default]
    Step,
    /// Each job's steps in one VM, one restore point per job (docs/job-mode.md).
    Job,
}

impl Default for RunSettings {
    fn default() -> Self {
        RunSettings {
            cpus: 1,
            memory_mib: 1024,
            step_timeout: Duration::from_secs(6 * 3600),
            disk_bytes: 4 << 30,
            stream_console: true,
            cancel: None,
            network: None,
            use_cache: true,
            rerun_from: None,
            progress: Progress::plain(),
            squash: true,
            per: Per::Step,
        }
    }
}

/// The network a step gets with `--network nat`: the guest's side is
/// [`udos_layer::boot::NetConfig::USER_MODE`]; `host_ports` are the host's own ports it
/// may reach, at its gateway address.
pub fn nat_network(host_ports: Vec<u16>) -> udos_vmm::Network {
    let c = udos_layer::boot::NetConfig::USER_MODE;
    udos_vmm::Network {
        host_ports,
        address: c.address,
        prefix_len: c.prefix_len,
        gateway: c.gateway,
        dns: c.dns,
    }
}

/// Everything a run needs that was prepared beforehand.
pub struct Prepared<'a> {
    /// State directory.
    pub state: &'a StateDir,
    /// The guest image.
    pub image: &'a udos_images::Image,
    /// The bases, by the name a job's `runs-on` maps to.
    pub bases: &'a crate::setup::Bases,
    /// The chosen hypervisor.
    pub hypervisor: &'a dyn udos_vmm::Hypervisor,
    /// The restic repository (initialized).
    pub repo: &'a Repo,
}

/// A run, fully planned: the workflows (read), which jobs run, and everything else
/// the engine needs.
pub struct RunRequest {
    /// The top-level workflow files, absolute.
    pub workflow_paths: Vec<PathBuf>,
    /// The repository's top.
    pub repo_root: PathBuf,
    /// The workflows and what they refer to.
    pub set: WorkflowSet,
    /// The jobs that run.
    pub selection: Selection,
    /// Secrets, vars, inputs, facts, platforms, limits.
    pub config: RunConfig,
    /// The bases the jobs can run on, made ready before the first leg.
    pub bases: BTreeSet<String>,
    /// Notes gathered while planning.
    pub notices: Vec<String>,
    /// The working tree as planning listed it (None: listed when the run starts).
    pub workspace: Option<workspace::WorkingTree>,
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// Runs `req`; the run is recorded under a new run number.
pub fn run(
    prep: &Prepared<'_>,
    store: Store,
    req: RunRequest,
    settings: &RunSettings,
) -> Result<RunReport> {
    // Held to the end: gc frees nothing this run may reuse while it runs.
    let _lock = prep
        .state
        .lock_for_run(crate::state::GC_WAIT, &|m| settings.progress.log(m))?;
    let store = Mutex::new(store);
    let jobs_summary: Vec<String> = req
        .selection
        .workflows
        .iter()
        .flat_map(|(_, jobs)| jobs.iter().cloned())
        .collect();
    let workflows: Vec<String> = req
        .workflow_paths
        .iter()
        .map(|p| p.display().to_string())
        .collect();
    let (run_id, generation) = lock(&store).begin_run(
        &workflows.join(", "),
        &jobs_summary.join(", "),
        &req.config.facts.event_name,
        &prep.hypervisor.describe(),
        &prep.image.id,
    )?;
    tracing::info!(run_id, generation, "run started");
    // Read before the run: the commit the workspace layer is made of.
    let tags = settings
        .squash
        .then(|| crate::squash_tag::TagState::read(&req.repo_root))
        .flatten();
    match run_begun(
        prep,
        &store,
        req,
        settings,
        run_id,
        generation,
        workflows,
        tags.as_ref(),
    ) {
        Ok(report) => {
            if let Some(t) = &tags {
                crate::squash_tag::after_run(prep, &store, t, &report);
            }
            Ok(report)
        }
        Err(e) => {
            let why = crate::errors::describe(&e);
            let _ = lock(&store).finish_run(
                run_id,
                "error",
                &serde_json::json!({ "run_id": run_id, "status": "error", "error": why })
                    .to_string(),
            );
            Err(e.context(format!("run {run_id} ended in an error")))
        }
    }
}

fn lock(store: &Mutex<Store>) -> std::sync::MutexGuard<'_, Store> {
    store.lock().unwrap_or_else(|e| e.into_inner())
}

/// The workspace layer of `tree` (else of the working tree `workflow` is in), made once
/// (content-addressed, under its lock).
fn workspace_layer(
    state: &StateDir,
    workflow: &Path,
    tree: Option<workspace::WorkingTree>,
) -> Result<(String, u64)> {
    let wt = match tree {
        Some(t) => t,
        None => workspace::discover(workflow)?,
    };
    let id = wt.layer_id()?;
    let _lock = state.lock_layer(&id)?;
    if !state.layer_erofs(&id).exists() {
        let tmp = state.unpack_dir(&id)?;
        let n = wt.materialize(tmp.path())?;
        let dir = state.layer_dir(&id);
        if dir.exists() {
            std::fs::remove_dir_all(&dir)?;
        }
        std::fs::rename(tmp.keep(), &dir)?;
        udos_images::mkfs_erofs(&dir, &state.layer_erofs(&id))?;
        tracing::info!(files = n, root = %wt.root.display(), "workspace layer built");
    }
    Ok((id, wt.files.len() as u64))
}

#[allow(clippy::too_many_arguments)]
fn run_begun(
    prep: &Prepared<'_>,
    store: &Mutex<Store>,
    mut req: RunRequest,
    settings: &RunSettings,
    run_id: i64,
    generation: i64,
    workflows: Vec<String>,
    tags: Option<&crate::squash_tag::TagState>,
) -> Result<RunReport> {
    let started = Instant::now();
    req.config.facts.run_id = run_id.to_string();
    req.config.facts.run_number = run_id.to_string();
    let event_json = serde_json::to_vec_pretty(&req.config.facts.event)?;
    let event_name = req.config.facts.event_name.clone();
    let secret_masks =
        udos_core::engine::leg::masks_of(req.config.secrets.values().filter_map(Value::as_str));

    let progress = settings.progress.clone();
    let snapshotter = Snapshotter::start_with(prep.repo.clone(), prep.state.clone(), move |d| {
        progress.event(Event::SnapshotDone {
            key: d.key.clone(),
            ok: d.result.is_ok(),
        })
    })?;
    let queue = snapshotter.queue();
    let first = req
        .workflow_paths
        .first()
        .context("no workflow to run")?
        .clone();
    let mut phases_ms = BTreeMap::new();
    let t = Instant::now();
    let (ws_id, ws_files) = workspace_layer(prep.state, &first, req.workspace.take())?;
    phases_ms.insert("workspace".to_string(), ms(t.elapsed()));
    // Every base the run can use is ready (built or loaded) before the first leg.
    let bases = prep.bases.ready(req.bases.iter().map(String::as_str))?;
    {
        let st = lock(store);
        for b in &bases {
            st.put_layer(&b.layer.id, "base", 0, 0)?;
            if st.layer_snapshot(&b.layer.id)?.is_none() {
                queue.add(
                    base_key(&b.layer.id),
                    &b.layer.tree,
                    crate::setup::base_tags(b),
                );
            }
        }
        st.put_layer(&ws_id, "workspace", 0, ws_files)?;
        if st.layer_snapshot(&ws_id)?.is_none() {
            queue.add(
                "workspace".into(),
                &prep.state.layer_dir(&ws_id),
                Tags::default()
                    .with("udos", "layer")
                    .with("kind", "workspace")
                    .with("layer", &ws_id),
            );
        }
        st.add_input(run_id, 1, "workspace", &ws_id)?;
    }
    let squashed = match tags {
        Some(t) => {
            let images = udos_images::ImageStore::new(prep.state.root());
            let (choices, notes) = crate::squash_tag::prepare(&lock(store), &images, t);
            req.notices.extend(notes);
            choices
        }
        None => Default::default(),
    };

    let mut engine =
        Run::new(req.set, &req.selection, req.config).map_err(|e| anyhow::anyhow!("{e}"))?;
    let shared = RunShared {
        prep,
        settings,
        run_id,
        generation,
        workspace: ws_id.clone(),
        event_json,
        store,
        squashed,
    };
    let outputs = drive(&mut engine, &shared, &queue, &secret_masks);
    drop(queue);

    // Wait for the snapshots still being written; each comes with its full id.
    settings.progress.log("waiting for layer snapshots");
    let t = Instant::now();
    let done = snapshotter.finish();
    phases_ms.insert("snapshot_wait".to_string(), ms(t.elapsed()));
    let mut full_by_key: BTreeMap<String, String> = BTreeMap::new();
    let mut took_by_key: BTreeMap<String, u64> = BTreeMap::new();
    let mut snapshot_errors = Vec::new();
    for d in done {
        took_by_key.insert(d.key.clone(), ms(d.took));
        match d.result {
            Ok(full) => {
                full_by_key.insert(d.key, full);
            }
            Err(e) => snapshot_errors.push(crate::errors::describe(&e)),
        }
    }

    let mut notices = req.notices;
    notices.extend(engine.notices.iter().cloned());
    // A leg on a squashed base used that one instead of its plain base.
    let used = prep.bases.distinct(
        outputs
            .values()
            .filter(|o| o.squashed.is_none())
            .filter_map(|o| o.base.as_deref()),
    );
    let squashed_used: BTreeSet<String> = outputs
        .values()
        .filter_map(|o| o.squashed.as_ref().map(|s| s.id.clone()))
        .collect();
    let mut jobs = Vec::new();
    let mut outputs = outputs;
    {
        let st = lock(store);
        // The bases the jobs used are the run's inputs under the workspace (position
        // 0 and below).
        for (i, b) in used.iter().enumerate() {
            st.add_input(run_id, -(i as i64), "base", &b.layer.id)?;
        }
        for (i, id) in squashed_used.iter().enumerate() {
            st.add_input(run_id, -((used.len() + i) as i64), "base", id)?;
        }
        for b in &bases {
            if let Some(full) = full_by_key.get(&base_key(&b.layer.id)) {
                st.set_layer_snapshot(&b.layer.id, full)?;
            }
        }
        if let Some(full) = full_by_key.get("workspace") {
            st.set_layer_snapshot(&ws_id, full)?;
        }
        for view in engine.legs() {
            let out = outputs.remove(&view.id);
            let mut steps: Vec<StepReport> = Vec::new();
            let mut base = None;
            let mut squashed_base = None;
            let mut base_layer = None;
            if let Some(out) = out {
                notices.extend(out.notices);
                steps = out.steps;
                base = out.base;
                squashed_base = out.squashed;
                base_layer = out.base_layer;
            }
            for s in &mut steps {
                let key = format!("leg-{}-step-{}", view.id, s.number);
                if let (Some(layer), Some(full)) = (&s.layer_id, full_by_key.get(&key)) {
                    s.snapshot_id = Some(full.clone());
                    st.set_layer_snapshot(layer, full)?;
                }
                if let Some(t) = took_by_key.get(&key) {
                    s.phases_ms.insert("snapshot".into(), *t);
                }
                st.put_step(run_id, view.id as i64, &view.report_id, s)?;
            }
            let outcome = view.outcome.unwrap_or(Conclusion::Cancelled);
            let job = JobReport {
                id: view.report_id.clone(),
                name: view.name.clone(),
                matrix: view.matrix.clone().map(Value::Object),
                status: outcome,
                outcome,
                conclusion: view.conclusion.unwrap_or(outcome),
                outputs: view
                    .outputs
                    .iter()
                    .map(|(k, v)| (k.clone(), mask(&v.to_string(), &secret_masks)))
                    .collect(),
                error: view.error.as_deref().map(|e| mask(e, &secret_masks)),
                base_layer,
                base,
                squashed_base,
                steps,
            };
            st.put_job(run_id, view.id as i64, &job)?;
            jobs.push(job);
        }
    }

    let mut status = engine.conclusion();
    if !snapshot_errors.is_empty() {
        // A layer that is not in the repository is not a restore point: say so loudly.
        for e in &snapshot_errors {
            settings.progress.log(&format!("error: {e}"));
        }
        notices.extend(
            snapshot_errors
                .iter()
                .map(|e| format!("snapshot failed: {e}")),
        );
        status = Conclusion::Failure;
    }
    let st = lock(store);
    let report = RunReport {
        run_id,
        generation,
        status,
        event: event_name,
        workflow: workflows.first().cloned().unwrap_or_default(),
        workflows,
        hypervisor: prep.hypervisor.describe(),
        image_id: prep.image.id.clone(),
        inputs: used
            .iter()
            .map(|b| (b.layer.id.clone(), "base"))
            .chain(squashed_used.iter().map(|s| (s.clone(), "base")))
            .chain([(ws_id.clone(), "workspace")])
            .map(|(id, kind)| {
                Ok(InputReport {
                    kind: kind.into(),
                    snapshot_id: st.layer_snapshot(&id)?,
                    layer_id: id,
                })
            })
            .collect::<Result<Vec<_>>>()?,
        vms_booted: RunReport::count_vms(&jobs),
        phases_ms,
        jobs,
        notices,
        wall_ms: ms(started.elapsed()),
    };
    st.finish_run(run_id, status.as_str(), &serde_json::to_string(&report)?)?;
    Ok(report)
}

/// The snapshot key of a base layer.
fn base_key(id: &str) -> String {
    format!("base-{id}")
}

/// The loop: start what the engine says, stop what it cancels, feed back what ends.
/// `masks` (the run's secrets) mask the job names it shows.
fn drive(
    engine: &mut Run,
    shared: &RunShared<'_>,
    queue: &crate::snapshots::Queue,
    masks: &[String],
) -> BTreeMap<LegId, LegOutput> {
    let settings = shared.settings;
    let progress = &settings.progress;
    let job_ref = |id: LegId, name: &str| JobRef {
        leg: id,
        name: mask(name, masks),
    };
    let mut shown = Shown::default();
    let mut outputs = BTreeMap::new();
    let mut cancels: BTreeMap<LegId, Arc<AtomicBool>> = BTreeMap::new();
    let mut cancelled_all = false;
    std::thread::scope(|s| {
        let (tx, rx) = mpsc::channel::<(LegId, LegOutput)>();
        let mut running = 0usize;
        loop {
            if !cancelled_all
                && settings
                    .cancel
                    .as_ref()
                    .is_some_and(|c| c.load(Ordering::Acquire))
            {
                cancelled_all = true;
                progress.log("the run is cancelled: stopping its legs");
                engine.cancel_all();
            }
            let actions = engine.poll();
            shown.update(engine, progress, &job_ref);
            for action in actions {
                match action {
                    Action::Start(ticket) => {
                        let id = ticket.id;
                        progress.event(Event::LegStarted(job_ref(id, &ticket.name)));
                        let flag = Arc::new(AtomicBool::new(false));
                        cancels.insert(id, flag.clone());
                        let (tx, queue) = (tx.clone(), queue.clone());
                        running += 1;
                        s.spawn(move || {
                            let out = run_leg(shared, *ticket, &flag, &queue);
                            let _ = tx.send((id, out));
                        });
                    }
                    Action::Cancel(id) => {
                        if let Some(f) = cancels.get(&id) {
                            f.store(true, Ordering::Release);
                        }
                    }
                }
            }
            if running == 0 {
                if !engine.is_done() {
                    tracing::error!("the engine has nothing running and is not done");
                }
                break;
            }
            match rx.recv_timeout(Duration::from_millis(200)) {
                Ok((id, out)) => {
                    running -= 1;
                    engine.leg_finished(id, out.result.clone());
                    outputs.insert(id, out);
                    shown.update(engine, progress, &job_ref);
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
            }
        }
    });
    outputs
}

/// The legs the progress display was told about: each is queued once it exists and
/// finished once it has an outcome, whether it ran or was decided without running.
#[derive(Default)]
struct Shown {
    queued: BTreeSet<LegId>,
    finished: BTreeSet<LegId>,
}

impl Shown {
    fn update(
        &mut self,
        engine: &Run,
        progress: &Progress,
        job_ref: &dyn Fn(LegId, &str) -> JobRef,
    ) {
        for view in engine.legs() {
            if self.queued.insert(view.id) {
                progress.event(Event::LegQueued(job_ref(view.id, &view.name)));
            }
            if let Some(outcome) = view.outcome {
                if self.finished.insert(view.id) {
                    progress.event(Event::LegFinished {
                        job: job_ref(view.id, &view.name),
                        outcome,
                    });
                }
            }
        }
    }
}
