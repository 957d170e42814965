//! One leg of a job on the host: the engine's [`udos_core::engine::leg::Leg`] says
//! which step comes next and what it is; this runs it in a VM over the leg's own chain
//! of layers (base, workspace, this leg's earlier steps — never another leg's), feeds
//! the result back, snapshots each layer, and enforces the job's deadline.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use sha2::{Digest, Sha256};
use udos_core::engine::leg::{Leg, Next, ResolvedStep, StepRun, StepSummary};
use udos_core::engine::run::{LegResult, LegTicket};
use udos_core::engine::synth;
use udos_core::engine::Conclusion;
use udos_layer::RecordStatus;

use crate::hashfiles::LayeredWorkspace;
use crate::job_vm::{JobSlot, JobStepRun};
use crate::progress::{Event, JobRef};
use crate::report::{ActionReport, CachedFrom, StepReport};
use crate::restic::Tags;
use crate::runner::{Per, Prepared, RunSettings};
use crate::snapshots::Queue;
use crate::step_vm::{mask, StepVm, StepVmOutcome};
use crate::store::Store;

/// At most this many step layers are mounted as separate lowers; beyond it they are
/// squashed into one, so a step VM's device count stays bounded however long the job.
pub const MAX_STEP_LOWERS: usize = 8;
/// How long a step that runs after its job was cancelled (`if: always()`) may take.
pub const CLEANUP_STEP_LIMIT: Duration = Duration::from_secs(300);
/// `--per job`: how much later than the job's deadline the guest's own clock stops a
/// step the deadline bounds, so that the host's stop decides, as in step mode.
const JOB_DEADLINE_MARGIN: Duration = Duration::from_secs(10);

/// What every leg of a run shares.
pub struct RunShared<'a> {
    /// Image, base, hypervisor, state, repository.
    pub prep: &'a Prepared<'a>,
    /// VM sizes and console streaming.
    pub settings: &'a RunSettings,
    /// The run's number.
    pub run_id: i64,
    /// The run's generation.
    pub generation: i64,
    /// The workspace layer id.
    pub workspace: String,
    /// The event payload, as JSON.
    pub event_json: Vec<u8>,
    /// The store (one connection, shared).
    pub store: &'a Mutex<Store>,
    /// The squashed bases legs start from, by base name and job (crate::squash_tag).
    pub squashed: crate::squash_tag::Choices,
}

/// How a leg went, for the engine and the report.
pub struct LegOutput {
    /// For the engine.
    pub result: LegResult,
    /// Its steps.
    pub steps: Vec<StepReport>,
    /// What the user should know (outputs left out, ...).
    pub notices: Vec<String>,
    /// The base it ran on, by name (none when it could not get it).
    pub base: Option<String>,
    /// The squashed base it ran on instead of that base's plain one.
    pub squashed: Option<crate::report::SquashedBaseRef>,
    /// The layer id of the base it ran on: the squashed base's, else the plain one's.
    pub base_layer: Option<String>,
}

/// The leg's stack of layers: base and workspace, then its steps' layers (squashed
/// beyond [`MAX_STEP_LOWERS`]).
struct Lowers {
    base: udos_images::BaseLayer,
    workspace: String,
    steps: Vec<String>,
}

impl Lowers {
    fn paths(&self, shared: &RunShared<'_>) -> Vec<PathBuf> {
        let state = shared.prep.state;
        let mut v = vec![self.base.erofs.clone(), state.layer_erofs(&self.workspace)];
        v.extend(self.steps.iter().map(|id| state.layer_erofs(id)));
        v
    }

    /// The workspace as hashFiles sees it before the next step.
    fn view(&self, shared: &RunShared<'_>) -> LayeredWorkspace {
        let state = shared.prep.state;
        let mut layers = vec![state.layer_dir(&self.workspace)];
        layers.extend(self.steps.iter().map(|id| state.layer_dir(id)));
        LayeredWorkspace { layers }
    }

    /// Adds a step's layer, squashing when there are too many.
    fn push(&mut self, shared: &RunShared<'_>, id: &str) -> Result<()> {
        self.steps.push(id.to_string());
        if self.steps.len() > MAX_STEP_LOWERS {
            let squashed = squash(shared, &self.base, &self.steps)?;
            self.steps = vec![squashed];
        }
        Ok(())
    }
}

/// Squashes `ids` (bottom first) into one layer, content-addressed by the ids it
/// holds and the base and workspace it sits on (its whiteouts are pruned against
/// them); made once, under its lock. Not a restore point: the steps' own layers are.
fn squash(shared: &RunShared<'_>, base: &udos_images::BaseLayer, ids: &[String]) -> Result<String> {
    let state = shared.prep.state;
    let mut h = Sha256::new();
    h.update(b"udos-squash-v1\0");
    for id in [&base.id, &shared.workspace].into_iter().chain(ids) {
        h.update(id.as_bytes());
        h.update(b"\0");
    }
    let id = format!("squash-{}", hex::encode(h.finalize()));
    let _lock = state.lock_layer(&id)?;
    if state.layer_erofs(&id).exists() {
        return Ok(id);
    }
    let tmp = state.unpack_dir(&id)?;
    let dirs: Vec<PathBuf> = ids.iter().map(|i| state.layer_dir(i)).collect();
    let refs: Vec<&std::path::Path> = dirs.iter().map(PathBuf::as_path).collect();
    udos_layer::squash::squash(&refs, tmp.path()).context("squashing step layers")?;
    // Whiteouts of paths the lower layers do not have would show as broken entries.
    let below = [base.tree.clone(), state.layer_dir(&shared.workspace)];
    let below: Vec<&std::path::Path> = below.iter().map(PathBuf::as_path).collect();
    udos_layer::squash::prune_whiteouts(tmp.path(), &below)
        .context("pruning the squashed layer")?;
    // The snapshot description in each layer directory is not part of the root.
    let _ = std::fs::remove_file(tmp.path().join(crate::snapshots::LAYER_META));
    let final_dir = state.layer_dir(&id);
    if final_dir.exists() {
        std::fs::remove_dir_all(&final_dir)?;
    }
    std::fs::rename(tmp.keep(), &final_dir)?;
    udos_images::mkfs_erofs(&final_dir, &state.layer_erofs(&id))?;
    Ok(id)
}

/// Turns what the guest sealed into the engine's view of the step.
fn step_run(step: &ResolvedStep, out: &StepVmOutcome) -> StepRun {
    let act = out
        .record
        .as_ref()
        .and_then(|r| r.step(synth::act_id(step)));
    // udos's own error first, else what the guest said (a step timeout, a full disk).
    let guest_error = out
        .record
        .as_ref()
        .and_then(|r| r.error.clone())
        .filter(|_| act.is_none_or(|a| a.result != udos_layer::ActResult::Success));
    let mut run = StepRun {
        error: out.error.clone().or(guest_error),
        ..StepRun::default()
    };
    if let Some(a) = act {
        run.outputs = a.outputs.clone().into_iter().collect();
        run.env = a.env.clone().into_iter().collect();
        run.path = a.path.clone();
        run.masks = a.masks.clone();
        run.exit_code = a.exit_code;
    }
    let result = act.map(|a| a.result);
    run.outcome = Some(if out.stopped {
        Conclusion::Cancelled
    } else if out.timed_out {
        run.error.get_or_insert_with(|| "the step timed out".into());
        Conclusion::Failure
    } else {
        match result {
            Some(udos_layer::ActResult::Success) => {
                run.exit_code = Some(0);
                Conclusion::Success
            }
            Some(udos_layer::ActResult::Failure) => {
                run.exit_code = run.exit_code.or(Some(1));
                Conclusion::Failure
            }
            _ => {
                if run.error.is_none() {
                    run.error = Some(match &out.record {
                        Some(r) if r.status == RecordStatus::Error => {
                            r.error.clone().unwrap_or_else(|| "the guest reported an error".into())
                        }
                        Some(r) if r.step(synth::SETUP_STEP_ID).is_some_and(|s| s.result != udos_layer::ActResult::Success) => {
                            "udos could not link act's workspace to /workspace (does the base have sh, rmdir and ln?)".into()
                        }
                        Some(r) => r
                            .error
                            .clone()
                            .unwrap_or_else(|| "act did not report the step".into()),
                        None => "the step VM produced no result".into(),
                    });
                }
                Conclusion::Failure
            }
        }
    });
    run
}

/// Runs one leg to its end.
pub fn run_leg(
    shared: &RunShared<'_>,
    ticket: LegTicket,
    cancel: &AtomicBool,
    queue: &Queue,
) -> LegOutput {
    // The scope a job VM (`--per job`) runs in across the leg's steps.
    std::thread::scope(|scope| run_leg_in(shared, ticket, cancel, queue, scope))
}

fn run_leg_in<'scope, 'env>(
    shared: &RunShared<'env>,
    ticket: LegTicket,
    cancel: &AtomicBool,
    queue: &Queue,
    scope: &'scope std::thread::Scope<'scope, 'env>,
) -> LegOutput {
    let started = Instant::now();
    let deadline = started + Duration::from_secs_f64(ticket.timeout_minutes * 60.0);
    let leg_index = ticket.id;
    // The base its `runs-on` maps to (made ready before the first leg).
    let base_name = ticket.base.clone();
    let base = match shared.prep.bases.get(&base_name) {
        Ok(b) => b.layer,
        Err(e) => {
            return LegOutput {
                result: LegResult {
                    outcome: Conclusion::Failure,
                    outputs: Default::default(),
                    error: Some(format!("base `{}`: {e:#}", ticket.base)),
                },
                steps: Vec::new(),
                notices: Vec::new(),
                base: None,
                squashed: None,
                base_layer: None,
            }
        }
    };
    // A squashed base of a tagged ancestor commit, made by this job on this base.
    let squashed = shared.squashed.pick(&base_name, &ticket.report_id);
    let base = match &squashed {
        Some((s, layer)) => {
            eprintln!(
                "udos: job {}: starting from the squashed base {} (tag {}, run {})",
                ticket.name,
                &s.id[..12],
                s.tag,
                s.run
            );
            layer.clone()
        }
        None => base,
    };
    let squashed = squashed.map(|(s, _)| s);
    let base_layer = Some(base.id.clone());
    let mut leg = Leg::new(ticket);
    let masks = Arc::new(RwLock::new(leg.masks()));
    let job = JobRef {
        leg: leg_index,
        name: mask(&leg.ticket().name, &leg.masks()),
    };
    let mut lowers = Lowers {
        base,
        workspace: shared.workspace.clone(),
        steps: Vec::new(),
    };
    let mut reports = Vec::new();
    let mut notices = Vec::new();
    let mut cancelled = false;
    let mut timed_out = false;
    let mut missed = false;
    let mut parent = shared.workspace.clone();
    let mut slot = JobSlot::default();
    loop {
        if !cancelled && cancel.load(Ordering::Acquire) {
            cancelled = true;
            leg.cancel();
        }
        if !timed_out && Instant::now() >= deadline {
            timed_out = true;
            leg.cancel();
        }
        let view = lowers.view(shared);
        let next = leg.next(Some(&view));
        let step = match next {
            Next::Finished(mut result) => {
                if timed_out {
                    result.outcome = Conclusion::Cancelled;
                    result.error = Some(format!(
                        "the job timed out after {} minutes",
                        leg.ticket().timeout_minutes
                    ));
                }
                let at = (leg_index, leg.ticket(), &job);
                if let Err(e) = seal_job(shared, at, &mut slot, &mut reports, &parent, queue) {
                    result.outcome = Conclusion::Failure;
                    result.error = Some(e);
                }
                notices.append(&mut leg.notices);
                return LegOutput {
                    result,
                    steps: reports,
                    notices,
                    base: Some(base_name),
                    squashed,
                    base_layer,
                };
            }
            Next::Decided(summary) => {
                let m = masks.read().map(|m| m.clone()).unwrap_or_default();
                step_ended(shared, &job, &summary, &m, None);
                let r = report(&summary, &m, None, None);
                persist(shared, leg_index, leg.ticket(), &r);
                reports.push(r);
                continue;
            }
            Next::Run(step) => step,
        };
        // The actions of other repositories it uses, pinned before the run.
        let actions = leg.actions(&step).to_vec();
        let pinned: Vec<ActionReport> = actions.iter().map(ActionReport::from).collect();
        if let Some(why) = node_missing(&actions, &base_name, &lowers.base.tree) {
            // Known only now when `runs-on` is a template (graph::check_supported_on).
            let summary = leg.record(
                &step,
                StepRun {
                    outcome: Some(Conclusion::Failure),
                    error: Some(why),
                    ..StepRun::default()
                },
            );
            let m = leg.masks();
            let mut r = report(&summary, &m, None, None);
            r.actions = pinned;
            step_ended(shared, &job, &summary, &m, None);
            persist(shared, leg_index, leg.ticket(), &r);
            reports.push(r);
            continue;
        }
        *masks.write().unwrap_or_else(|e| e.into_inner()) = leg.masks();
        let secrets = leg
            .ticket()
            .contexts
            .get("secrets")
            .and_then(|s| s.as_object())
            .cloned();
        // The workspace as this step starts on it: for its key, and for what it reads.
        let entries = match view.entries() {
            Ok(e) => e,
            Err(e) => {
                tracing::warn!("reading the workspace for the step cache: {e}");
                Default::default()
            }
        };
        let key = crate::cache::key(
            &shared.prep.image.id,
            &lowers.base.id,
            &step,
            &lowers.steps,
            secrets.as_ref(),
            &entries,
        )
        .map(|k| crate::actions::key_with(&k, &actions))
        .unwrap_or_default();
        // `udos rerun --from`: this step and the rest of the leg run again.
        if let Some(from) = &shared.settings.rerun_from {
            missed |= from.forces(&step.job_id, step.number);
        }
        // A job VM is one unit: its steps are neither looked up nor kept.
        let per_job = shared.settings.per == Per::Job;
        let cacheable =
            shared.settings.use_cache && !per_job && !missed && !udos_core::cache::opted_out(&step);
        if cacheable && !key.is_empty() {
            match crate::cache::lookup(shared.store, shared.prep.state, &key, &entries) {
                Ok(Some(hit)) => {
                    let summary = leg.record(&step, hit.run.clone());
                    let m = leg.masks();
                    let mut r = report(&summary, &m, None, Some(0));
                    r.actions = pinned.clone();
                    r.cache_key = Some(key.clone());
                    r.cached = true;
                    r.cached_from = Some(CachedFrom {
                        run_id: hit.from.0,
                        leg: hit.from.1,
                        step: hit.from.2,
                    });
                    r.summary = hit.summary.as_deref().map(|t| mask(t, &m));
                    r.note = Some(format!(
                        "cached: its inputs are those of run {} step {}",
                        hit.from.0, hit.from.2
                    ));
                    if let Some(layer) = &hit.layer_id {
                        r.layer_id = Some(layer.clone());
                        r.snapshot_id = shared
                            .store
                            .lock()
                            .ok()
                            .and_then(|st| st.layer_snapshot(layer).ok().flatten());
                        if let Err(e) = lowers.push(shared, layer) {
                            r.error = Some(crate::errors::describe(&e));
                        }
                        parent = layer.clone();
                    }
                    step_ended(shared, &job, &summary, &m, Some((hit.from.0, hit.from.2)));
                    persist(shared, leg_index, leg.ticket(), &r);
                    reports.push(r);
                    continue;
                }
                Ok(None) => {}
                Err(e) => tracing::warn!("looking up the step cache: {e:#}"),
            }
        }
        // Once a step runs, every later step of the leg runs too: its inputs changed.
        missed = true;
        // Its layer will need the repository: open it while the VM boots.
        queue.warm();
        shared.settings.progress.event(Event::StepStarted {
            job: job.clone(),
            number: step.number,
            name: mask(&step.name, &leg.masks()),
            boots: !(per_job && slot.is_live()),
        });
        // The step's own limit, within what is left of the job's (a step that runs
        // after a cancellation gets a cleanup allowance).
        let own = step
            .timeout_minutes
            .filter(|m| *m > 0.0)
            .map(|m| Duration::from_secs_f64(m * 60.0))
            .unwrap_or(shared.settings.step_timeout);
        let left = if cancelled || timed_out {
            CLEANUP_STEP_LIMIT
        } else {
            deadline.saturating_duration_since(Instant::now())
        };
        let limit = own.min(left).min(shared.settings.step_timeout);
        let files = synth::step_files_with_actions(&step, &actions);
        let vm = StepVm {
            prep: shared.prep,
            settings: shared.settings,
            dir: shared
                .prep
                .state
                .step_dir(shared.run_id, leg_index, step.number),
            event_json: &shared.event_json,
            label: format!("{} {}", leg.ticket().name, step.number),
            job: job.clone(),
            masks: masks.clone(),
            actions: crate::actions::control_trees(
                &crate::actions::ActionStore::new(shared.prep.state.root()),
                &actions,
            ),
        };
        let stop = AtomicBool::new(false);
        let done = AtomicBool::new(false);
        let out = std::thread::scope(|s| {
            let (stop, done) = (&stop, &done);
            let watcher = s.spawn(move || {
                // Stops the VM when the leg is cancelled or the job's deadline passes.
                while !done.load(Ordering::Acquire) {
                    if (!cancelled && cancel.load(Ordering::Acquire))
                        || (!timed_out && Instant::now() >= deadline)
                    {
                        stop.store(true, Ordering::Release);
                        return;
                    }
                    std::thread::sleep(Duration::from_millis(50));
                }
            });
            let out = if per_job {
                // The job's deadline is the host's to enforce (it stops the VM), as in
                // step mode, where the guest's clock starts only after its boot.
                let by_deadline = !(cancelled || timed_out) && left < own;
                let run = JobStepRun {
                    step: &step,
                    files: &files,
                    lowers: &lowers.paths(shared),
                    limit: limit
                        + if by_deadline {
                            JOB_DEADLINE_MARGIN
                        } else {
                            Duration::ZERO
                        },
                    // A backstop only: the leg bounds each step and the job itself.
                    life: deadline.saturating_duration_since(Instant::now())
                        + shared.settings.step_timeout,
                };
                let dir = shared.prep.state.step_dir(shared.run_id, leg_index, 0);
                let dir = dir.parent().unwrap_or(&dir);
                slot.run((scope, shared.prep.hypervisor), &vm, dir, run, stop)
            } else {
                vm.run(&step, &files, &lowers.paths(shared), limit, stop)
            };
            done.store(true, Ordering::Release);
            let _ = watcher.join();
            out
        });
        let mut run = step_run(&step, &out);
        let exit_code = run.exit_code;
        if out.stopped && Instant::now() >= deadline && !timed_out {
            run.error = Some(format!(
                "the job timed out after {} minutes",
                leg.ticket().timeout_minutes
            ));
        }
        let summary = leg.record(&step, run.clone());
        *masks.write().unwrap_or_else(|e| e.into_inner()) = leg.masks();
        let m = leg.masks();
        let mut r = report(&summary, &m, Some(&out), exit_code);
        r.actions = pinned;
        r.cache_key = Some(key.clone()).filter(|k| !k.is_empty());
        if let Some(layer) = &out.layer {
            match lowers.push(shared, &layer.id) {
                Ok(()) => {}
                Err(e) => r.error = Some(crate::errors::describe(&e)),
            }
            let mut tags = Tags::default()
                .with("udos", "layer")
                .with("kind", "step")
                .with("run", shared.run_id)
                .with("generation", shared.generation)
                .with("job", &leg.ticket().report_id)
                .with("leg", leg_index)
                .with("step", step.number)
                .with("parent", &parent)
                .with("key", &key)
                .with("layer", &layer.id);
            for a in &actions {
                tags = tags.with("action", format!("{}@{}", a.at.slug(), a.pin));
            }
            let key = format!("leg-{leg_index}-step-{}", step.number);
            queue.add(key.clone(), &shared.prep.state.layer_dir(&layer.id), tags);
            shared.settings.progress.event(Event::SnapshotQueued {
                job: job.clone(),
                number: step.number,
                key,
            });
            parent = layer.id.clone();
            if let Ok(st) = shared.store.lock() {
                let _ = st.put_layer(&layer.id, "step", layer.bytes, layer.entries);
            }
        }
        // After its layer is recorded: a kept result refers to it.
        if shared.settings.use_cache
            && !per_job
            && !udos_core::cache::opted_out(&step)
            && !key.is_empty()
        {
            let kept = out.record.as_ref().and_then(|rec| {
                let reads = crate::cache::reads_of(rec, &entries)?;
                let text = rec
                    .step(synth::act_id(&step))
                    .and_then(|a| a.summary.clone());
                crate::cache::keep(
                    shared.store,
                    &key,
                    &reads,
                    out.layer.as_ref().map(|l| l.id.as_str()),
                    &run,
                    text.as_deref(),
                    secrets.as_ref(),
                    (shared.run_id, leg_index as i64, step.number as i64),
                )
                .map_err(|e| tracing::warn!("keeping a step result: {e:#}"))
                .ok()
            });
            tracing::debug!(step = step.number, kept = ?kept, "step cache");
        }
        if let Some(summary_text) = out
            .record
            .as_ref()
            .and_then(|rec| rec.step(synth::act_id(&step)))
            .and_then(|a| a.summary.clone())
        {
            r.summary = Some(mask(&summary_text, &m));
        }
        step_ended(shared, &job, &summary, &m, None);
        persist(shared, leg_index, leg.ticket(), &r);
        if per_job {
            slot.last_ran = Some(reports.len());
        }
        reports.push(r);
    }
}

/// `--per job`: seals the leg's job VM, if one is up, and makes its layer the job's
/// restore point, on the last step that ran in it (docs/job-mode.md).
fn seal_job(
    shared: &RunShared<'_>,
    (leg, ticket, job): (usize, &LegTicket, &JobRef),
    slot: &mut JobSlot<'_>,
    reports: &mut [StepReport],
    parent: &str,
    queue: &Queue,
) -> Result<(), String> {
    let Some(idx) = slot.last_ran else {
        return Ok(());
    };
    let Some(r) = reports.get_mut(idx) else {
        return Ok(());
    };
    let vm = StepVm {
        prep: shared.prep,
        settings: shared.settings,
        dir: PathBuf::new(),
        event_json: &shared.event_json,
        label: String::new(),
        job: job.clone(),
        masks: Arc::new(RwLock::new(Vec::new())),
        actions: Vec::new(),
    };
    let Some(out) = slot.seal(&vm) else {
        return Ok(());
    };
    for (k, v) in &out.phases {
        r.phases_ms.insert(format!("job_{k}"), *v);
    }
    if let Some(e) = out.error {
        let e = format!("sealing the job's layer: {e}");
        persist(shared, leg, ticket, r);
        return Err(e);
    }
    let Some(layer) = out.layer else {
        return Ok(());
    };
    r.layer_id = Some(layer.id.clone());
    // The layer first: the step's row refers to it.
    if let Ok(st) = shared.store.lock() {
        let _ = st.put_layer(&layer.id, "step", layer.bytes, layer.entries);
    }
    persist(shared, leg, ticket, r);
    let tags = Tags::default()
        .with("udos", "layer")
        .with("kind", "job")
        .with("run", shared.run_id)
        .with("generation", shared.generation)
        .with("job", &ticket.report_id)
        .with("leg", leg)
        .with("step", r.number)
        .with("parent", parent)
        .with("layer", &layer.id);
    queue.add(
        format!("leg-{leg}-step-{}", r.number),
        &shared.prep.state.layer_dir(&layer.id),
        tags,
    );
    Ok(())
}

/// Why `actions` cannot run on the base `name` (its root at `tree`): a JavaScript
/// action and no node in it.
fn node_missing(
    actions: &[udos_core::workflow::action::PinnedAction],
    name: &str,
    tree: &std::path::Path,
) -> Option<String> {
    use udos_core::workflow::action::ActionKind;
    let js = actions
        .iter()
        .find(|a| matches!(a.def.kind, ActionKind::Node { .. }))?;
    (!crate::actions::tree_has_node(tree)).then(|| {
        format!(
            "`{}` is a JavaScript action, and the base `{name}` has no node: map the job's runner to a base with node (-P LABEL=debian)",
            js.uses
        )
    })
}

/// Tells the progress display how step `s` ended (`cached_from`: reused from that run
/// and step).
fn step_ended(
    shared: &RunShared<'_>,
    job: &JobRef,
    s: &StepSummary,
    masks: &[String],
    cached_from: Option<(i64, i64)>,
) {
    shared.settings.progress.event(Event::StepFinished {
        job: job.clone(),
        number: s.number,
        name: mask(&s.name, masks),
        outcome: s.outcome,
        cached_from,
        detail: s
            .error
            .as_deref()
            .or(s.note.as_deref())
            .map(|e| mask(e, masks)),
    });
}

fn report(
    s: &StepSummary,
    masks: &[String],
    vm: Option<&StepVmOutcome>,
    exit_code: Option<i32>,
) -> StepReport {
    StepReport {
        number: s.number,
        id: s.id.clone(),
        name: mask(&s.name, masks),
        status: s.outcome,
        outcome: s.outcome,
        conclusion: s.conclusion,
        exit_code,
        snapshot_id: None,
        layer_id: vm.and_then(|o| o.layer.as_ref()).map(|l| l.id.clone()),
        cache_key: None,
        outputs: s
            .outputs
            .iter()
            .map(|(k, v)| (k.clone(), mask(v, masks)))
            .collect(),
        summary: None,
        cached_from: None,
        cached: false,
        phases_ms: vm.map(|o| o.phases.clone()).unwrap_or_default(),
        error: s.error.as_deref().map(|e| mask(e, masks)),
        note: s.note.clone(),
        console_log: vm.map(|o| o.console_log.clone()),
        actions: Vec::new(),
    }
}

fn persist(shared: &RunShared<'_>, leg: usize, ticket: &LegTicket, r: &StepReport) {
    if let Ok(st) = shared.store.lock() {
        if let Err(e) = st.put_step(shared.run_id, leg as i64, &ticket.report_id, r) {
            tracing::warn!("recording step {} of {}: {e:#}", r.number, ticket.name);
        }
    }
}
