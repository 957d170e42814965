//! What a worker runs: the [`Executor`] trait the agent loop drives, and
//! [`VmExecutor`], which runs spec instances in real VMs.
//!
//! - **workflow_run**: the generation's commit is fetched and checked out into a
//!   worktree of the run's own ([`super::checkout`]: from the spec's `repository`, else
//!   the agent's `--repository`, else its `--workdir`), verified, and the workflow (a
//!   path relative to that worktree) runs through the step runner
//!   ([`crate::runner::run`]) on a thread of its own: `Running`, then `Succeeded` or
//!   `Failed` with the restic snapshot ids of its layers; the worktree is removed when
//!   the run ends. Every report names the commit. Finished runs are remembered
//!   (`<state>/agent/finished.json`), so a restarted agent does not run them again.
//! - **service**: one long-running VM of the udos image with the base layer as its
//!   root, kernel command line `udos.mode=service`; `Starting` until PID 1 prints
//!   `udos-init: service up`, then `Running`; `Failed` when the VM ends by itself (the
//!   agent then restarts it). Stopping kills the VM.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use udos_core::desired::{DesiredSpec, SpecKind};
use udos_core::wire::{Assignment, InstanceState, RunningInstance};
use udos_vmm::{Disk, VmExit, VmSpec};

use super::checkout::{Checkouts, Source};
use crate::runner::{self, RunSettings};
use crate::setup::Env;
use crate::state::StateDir;
use crate::store::Store;

/// What the agent loop needs from whatever runs instances. Implementations return
/// quickly: work happens in the background and shows up in [`Executor::poll`].
pub trait Executor {
    /// Start an instance of `a.spec` (replica `a.replica`) of the generation at
    /// `commit` (a workflow run runs that commit's files). An instance that cannot
    /// start is best reported by [`Executor::poll`] as `Failed` with a message; an
    /// `Err` is logged by the agent and retried later.
    fn create(&mut self, a: &Assignment, commit: Option<&str>) -> Result<()>;
    /// Stop the instance `(spec, replica)` that runs `hash` (forget it, when it has
    /// finished). Stopping something that does not run is not an error.
    fn stop(&mut self, spec: &str, replica: u32, hash: &str) -> Result<()>;
    /// Everything it runs, or has finished, now.
    fn poll(&mut self) -> Vec<RunningInstance>;
    /// Stop everything (the agent is exiting).
    fn shutdown(&mut self) {}
}

/// Seconds since the epoch.
pub(crate) fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// What a background instance reports.
#[derive(Debug, Clone)]
struct Cell {
    state: InstanceState,
    message: Option<String>,
    snapshot_ids: Vec<String>,
}

type SharedCell = Arc<Mutex<Cell>>;

fn set(cell: &SharedCell, f: impl FnOnce(&mut Cell)) {
    let mut g = cell.lock().unwrap_or_else(|p| p.into_inner());
    f(&mut g);
}

fn get(cell: &SharedCell) -> Cell {
    cell.lock().unwrap_or_else(|p| p.into_inner()).clone()
}

struct Instance {
    spec: String,
    replica: u32,
    hash: String,
    /// The commit a workflow run runs (services: none).
    commit: Option<String>,
    workflow: bool,
    started_unix: u64,
    cell: SharedCell,
    halt: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    /// Being stopped: reported as `Stopping` until its thread ends, then dropped.
    stopping: bool,
    /// Its VM runtime directory (services), removed when it is stopped.
    dir: Option<PathBuf>,
    /// A finished workflow run already written to `finished.json`.
    persisted: bool,
}

impl Instance {
    fn finished(&self) -> bool {
        self.thread.as_ref().is_none_or(|t| t.is_finished())
    }
}

/// A finished workflow run, as `finished.json` keeps it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct FinishedRun {
    spec: String,
    replica: u32,
    hash: String,
    state: InstanceState,
    started_unix: u64,
    #[serde(default)]
    snapshot_ids: Vec<String>,
    #[serde(default)]
    message: Option<String>,
    /// Absent from runs an older agent finished.
    #[serde(default)]
    commit: Option<String>,
}

/// How [`VmExecutor`] runs things.
#[derive(Debug, Clone)]
pub struct VmExecutorConfig {
    /// The repository to fetch a workflow run's commit from when its spec names none
    /// (the agent's `--repository`).
    pub repository: Option<String>,
    /// The repository to fetch from when neither the spec nor `repository` names one
    /// (a local git repository: the agent's `--workdir`).
    pub workdir: PathBuf,
    /// Step VMs get this much memory when a workflow_run spec asks for none, MiB.
    pub default_step_memory_mib: u64,
    /// A step is stopped after this long.
    pub step_timeout: Duration,
    /// Print the guests' consoles on stderr.
    pub stream_console: bool,
}

impl Default for VmExecutorConfig {
    fn default() -> Self {
        VmExecutorConfig {
            repository: None,
            workdir: PathBuf::from("."),
            default_step_memory_mib: 512,
            step_timeout: Duration::from_secs(600),
            stream_console: false,
        }
    }
}

struct Shared {
    state: StateDir,
    env: Env,
    config: VmExecutorConfig,
    checkouts: Checkouts,
    /// Numbers the runs' checkouts.
    runs: AtomicU64,
}

/// Runs spec instances in VMs (see the module docs).
pub struct VmExecutor {
    shared: Arc<Shared>,
    instances: Vec<Instance>,
    finished_file: PathBuf,
    vms_dir: PathBuf,
    seq: u64,
}

/// The console line PID 1 prints once a service VM is up (docs/pid1.md).
pub const SERVICE_UP: &str = "udos-init: service up";

/// Whether a service's `image` names the guest image this worker has: its id (or a
/// prefix of at least 12 hex digits, optionally written `sha256:...`), or `default`.
pub fn image_matches(wanted: &str, have_id: &str) -> bool {
    let w = wanted.trim();
    let w = w.strip_prefix("sha256:").unwrap_or(w);
    w == "default" || w == have_id || (w.len() >= 12 && have_id.starts_with(w))
}

/// vCPUs for a CPU request in thousandths (at least one).
fn vcpus(cpu_millis: u64) -> u32 {
    u32::try_from(cpu_millis.div_ceil(1000)).unwrap_or(1).max(1)
}

impl VmExecutor {
    /// An executor over a prepared environment ([`crate::setup::prepare_env`]); loads
    /// the finished workflow runs of an earlier agent from `state`.
    pub fn new(state: StateDir, env: Env, config: VmExecutorConfig) -> Result<VmExecutor> {
        let agent_dir = state.root().join("agent");
        let vms_dir = agent_dir.join("vms");
        std::fs::create_dir_all(&vms_dir)
            .with_context(|| format!("creating {}", vms_dir.display()))?;
        // VM directories of an earlier agent: their VMs died with it.
        if let Ok(rd) = std::fs::read_dir(&vms_dir) {
            for e in rd.flatten() {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
        let finished_file = agent_dir.join("finished.json");
        let finished: Vec<FinishedRun> = match std::fs::read(&finished_file) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .with_context(|| format!("reading {}", finished_file.display()))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(e).context(format!("reading {}", finished_file.display())),
        };
        let instances = finished
            .into_iter()
            .map(|f| Instance {
                spec: f.spec,
                replica: f.replica,
                hash: f.hash,
                commit: f.commit,
                workflow: true,
                started_unix: f.started_unix,
                cell: Arc::new(Mutex::new(Cell {
                    state: f.state,
                    message: f.message,
                    snapshot_ids: f.snapshot_ids,
                })),
                halt: Arc::new(AtomicBool::new(false)),
                thread: None,
                stopping: false,
                dir: None,
                persisted: true,
            })
            .collect();
        let checkouts = Checkouts::new(&agent_dir)?;
        Ok(VmExecutor {
            shared: Arc::new(Shared {
                state,
                env,
                config,
                checkouts,
                runs: AtomicU64::new(0),
            }),
            instances,
            finished_file,
            vms_dir,
            seq: 0,
        })
    }

    /// The guest image id services must name.
    pub fn image_id(&self) -> &str {
        &self.shared.env.image.id
    }

    fn save_finished(&self) {
        let list: Vec<FinishedRun> = self
            .instances
            .iter()
            .filter(|i| i.workflow && i.persisted && !i.stopping)
            .map(|i| {
                let c = get(&i.cell);
                FinishedRun {
                    spec: i.spec.clone(),
                    replica: i.replica,
                    hash: i.hash.clone(),
                    state: c.state,
                    started_unix: i.started_unix,
                    snapshot_ids: c.snapshot_ids,
                    message: c.message,
                    commit: i.commit.clone(),
                }
            })
            .collect();
        if let Err(e) = super::write_json_atomic(&self.finished_file, &list) {
            eprintln!("udos agent: error: cannot save finished runs: {e:#}");
        }
    }

    fn start_workflow(
        &self,
        spec: &DesiredSpec,
        commit: Option<&str>,
        cell: SharedCell,
        halt: Arc<AtomicBool>,
    ) -> Result<JoinHandle<()>> {
        let SpecKind::WorkflowRun {
            workflow,
            job,
            repository,
        } = &spec.kind
        else {
            unreachable!("only called for workflow runs")
        };
        let shared = self.shared.clone();
        let run = RunOf {
            source: Source::pick(
                repository.as_deref(),
                shared.config.repository.as_deref(),
                &shared.config.workdir,
            ),
            commit: commit.map(str::to_string),
            checkout_name: format!(
                "run-{}-{}",
                shared.runs.fetch_add(1, Ordering::Relaxed) + 1,
                file_name_part(&spec.id)
            ),
            workflow: workflow.clone(),
            job: job.clone(),
        };
        let memory = if spec.resources.memory_mib > 0 {
            spec.resources.memory_mib
        } else {
            shared.config.default_step_memory_mib
        };
        let settings = RunSettings {
            cpus: vcpus(spec.resources.cpu_millis),
            memory_mib: memory.max(64),
            step_timeout: shared.config.step_timeout,
            stream_console: shared.config.stream_console,
            cancel: Some(halt.clone()),
            // NAT egress as `udos run` gives it; no port of the worker itself.
            network: shared
                .env
                .hypervisor
                .has_network()
                .then(|| crate::runner::nat_network(Vec::new())),
            ..RunSettings::default()
        };
        let name = format!("udos-run-{}", spec.id);
        std::thread::Builder::new()
            .name(name)
            .spawn(move || {
                let result = run_at_commit(&shared, &run, &halt, &settings);
                set(&cell, |c| match result {
                    Ok(report) => {
                        c.snapshot_ids = report
                            .jobs
                            .iter()
                            .flat_map(|j| j.steps.iter())
                            .filter_map(|s| s.snapshot_id.clone())
                            .collect();
                        if report.status == udos_core::engine::Conclusion::Success {
                            c.state = InstanceState::Succeeded;
                            c.message = Some(format!("run {}", report.run_id));
                        } else {
                            c.state = InstanceState::Failed;
                            let why = report
                                .jobs
                                .iter()
                                .flat_map(|j| j.steps.iter())
                                .find(|s| s.status == udos_core::engine::Conclusion::Failure)
                                .map(|s| {
                                    format!(
                                        "step {} ({}) failed{}",
                                        s.number,
                                        s.name,
                                        s.error
                                            .as_deref()
                                            .map(|e| format!(": {e}"))
                                            .unwrap_or_default()
                                    )
                                })
                                .unwrap_or_else(|| "the run failed".into());
                            c.message = Some(format!("run {}: {why}", report.run_id));
                        }
                    }
                    Err(e) => {
                        c.state = InstanceState::Failed;
                        c.message = Some(format!("{e:#}"));
                    }
                });
            })
            .context("starting a workflow run thread")
    }

    fn start_service(
        &mut self,
        spec: &DesiredSpec,
        replica: u32,
        cell: SharedCell,
        halt: Arc<AtomicBool>,
    ) -> Result<(JoinHandle<()>, PathBuf)> {
        let SpecKind::Service { image, .. } = &spec.kind else {
            unreachable!("only called for services")
        };
        self.seq += 1;
        let dir = self
            .vms_dir
            .join(format!("{}.{replica}.{}", spec.id, self.seq));
        let shared = self.shared.clone();
        let image = image.clone();
        let memory = spec.resources.memory_mib.max(64);
        let cpus = vcpus(spec.resources.cpu_millis);
        let name = format!("udos-svc-{}-{replica}", spec.id);
        let vm_dir = dir.clone();
        let thread = std::thread::Builder::new()
            .name(name.clone())
            .spawn(move || {
                let env = &shared.env;
                if !image_matches(&image, &env.image.id) {
                    set(&cell, |c| {
                        c.state = InstanceState::Failed;
                        c.message = Some(format!(
                            "image {image} is not on this worker (it has {}; name it by id, a 12+ digit prefix, or `default`)",
                            &env.image.id[..env.image.id.len().min(12)]
                        ));
                    });
                    return;
                }
                let console_cell = cell.clone();
                let stream = shared.config.stream_console;
                let prefix = format!("  [{name}] ");
                let mut spec = VmSpec::new(&name, &env.image.vmlinux, &env.image.initramfs, &vm_dir);
                spec.cmdline = format!(
                    "{} udos.mode=service udos.lowers=udos-l0",
                    udos_images::BASE_CMDLINE
                );
                spec.disks = vec![Disk::read_only(&env.base.erofs, "udos-l0")];
                spec.cpus = cpus;
                spec.memory_mib = memory;
                // Services run until stopped; the timeout is only a backstop.
                spec.timeout = Duration::from_secs(365 * 24 * 3600);
                spec.console = Some(Box::new(move |line: &str| {
                    if stream {
                        eprintln!("{prefix}{line}");
                    }
                    if line.contains(SERVICE_UP) {
                        set(&console_cell, |c| {
                            if c.state == InstanceState::Starting {
                                c.state = InstanceState::Running;
                            }
                        });
                    }
                }));
                let t0 = Instant::now();
                let outcome = env.hypervisor.run_until(spec, &halt);
                if halt.load(Ordering::Acquire) {
                    return;
                }
                let why = match outcome {
                    Ok(o) => {
                        let last = last_console_line(&o.console_log);
                        let exit = match o.exit {
                            VmExit::PoweredOff => "powered off".to_string(),
                            other => other.to_string(),
                        };
                        format!(
                            "the service VM {exit} after {}s{}",
                            t0.elapsed().as_secs(),
                            last.map(|l| format!("; last console line: {l}"))
                                .unwrap_or_default()
                        )
                    }
                    Err(e) => format!("cannot start the service VM: {e}"),
                };
                set(&cell, |c| {
                    c.state = InstanceState::Failed;
                    c.message = Some(why);
                });
            })
            .context("starting a service thread")?;
        Ok((thread, dir))
    }
}

/// The file a workflow_run spec names, inside `workdir` (the run's checkout). The
/// master refuses paths that leave the repository, but a worker does not trust the
/// master: the path must be relative and normalised
/// ([`udos_core::desired::check_workflow_path`]) and, with symlinks followed, still
/// name a file inside `workdir`.
pub fn workflow_file(workdir: &Path, workflow: &str) -> Result<PathBuf> {
    udos_core::desired::check_workflow_path(workflow)
        .map_err(|why| anyhow::anyhow!("refusing the workflow path `{workflow}`: it {why}"))?;
    let root = workdir
        .canonicalize()
        .with_context(|| format!("the working directory {}", workdir.display()))?;
    let path = root.join(workflow);
    let real = path
        .canonicalize()
        .with_context(|| format!("the workflow {}", path.display()))?;
    if !real.starts_with(&root) {
        anyhow::bail!(
            "refusing the workflow path `{workflow}`: it leads to {}, outside {}",
            real.display(),
            root.display()
        );
    }
    Ok(path)
}

/// What a workflow run runs: its commit, from where, and which workflow and job.
struct RunOf {
    source: Source,
    commit: Option<String>,
    /// The file name of its checkout.
    checkout_name: String,
    workflow: String,
    job: Option<String>,
}

/// `id` as a safe part of a file name (spec ids are validated by the master; the
/// agent does not rely on it).
fn file_name_part(id: &str) -> String {
    id.chars()
        .take(64)
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// Check out the run's commit, run its workflow from that checkout, and remove the
/// checkout (when it goes out of scope, whatever happened).
fn run_at_commit(
    shared: &Shared,
    run: &RunOf,
    halt: &AtomicBool,
    settings: &RunSettings,
) -> Result<crate::report::RunReport> {
    let commit = run
        .commit
        .as_deref()
        .context("the assignment names no commit to run")?;
    let checkout = shared
        .checkouts
        .checkout(&run.source, commit, &run.checkout_name)
        .context("nothing ran")?;
    if halt.load(Ordering::Acquire) {
        anyhow::bail!("stopped before it ran");
    }
    let path = workflow_file(checkout.path(), &run.workflow)?;
    run_workflow(
        shared,
        &path,
        run.job.as_deref(),
        checkout.commit(),
        settings,
    )
}

fn run_workflow(
    shared: &Shared,
    path: &Path,
    job: Option<&str>,
    commit: &str,
    settings: &RunSettings,
) -> Result<crate::report::RunReport> {
    let args = crate::plan::PlanArgs {
        positionals: vec![path.display().to_string()],
        jobs: job.into_iter().map(String::from).collect(),
        memory_mib: settings.memory_mib,
        parallel: Some(1),
        // Remote actions are fetched and pinned into the agent's own action store.
        state_root: Some(shared.state.root().to_path_buf()),
        ..crate::plan::PlanArgs::default()
    };
    let req = match crate::plan::plan(&args)?.0 {
        crate::plan::Planned::Run(req) => req,
        crate::plan::Planned::Nothing(reasons) => {
            anyhow::bail!("the workflow does not run: {}", reasons.join("; "))
        }
    };
    // What the run calls `github.sha` is what git says the tree is: the same commit.
    if !req.config.facts.sha.eq_ignore_ascii_case(commit) {
        anyhow::bail!(
            "the planned run is at commit `{}`, not at the published {commit}",
            req.config.facts.sha
        );
    }
    let store = Store::open(&shared.state.db())?;
    runner::run(&shared.env.prepared(&shared.state), store, *req, settings)
}

/// What a console log says last: PID 1's last error or report line
/// (`udos-init: ...`), else the last non-empty line; shortened.
fn last_console_line(path: &Path) -> Option<String> {
    let bytes = std::fs::read(path).ok()?;
    let text = String::from_utf8_lossy(&bytes);
    let lines: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    let pick = |pat: &str| lines.iter().rev().find(|l| l.contains(pat)).copied();
    let line = pick("udos-init: error")
        .or_else(|| pick("udos-init:"))
        .or_else(|| lines.last().copied())?;
    Some(line.chars().take(200).collect())
}

impl Executor for VmExecutor {
    fn create(&mut self, a: &Assignment, commit: Option<&str>) -> Result<()> {
        let cell = Arc::new(Mutex::new(Cell {
            state: InstanceState::Starting,
            message: None,
            snapshot_ids: Vec::new(),
        }));
        let halt = Arc::new(AtomicBool::new(false));
        let workflow = matches!(a.spec.kind, SpecKind::WorkflowRun { .. });
        let (thread, dir) = if workflow {
            set(&cell, |c| c.state = InstanceState::Running);
            (
                self.start_workflow(&a.spec, commit, cell.clone(), halt.clone())?,
                None,
            )
        } else {
            let (t, d) = self.start_service(&a.spec, a.replica, cell.clone(), halt.clone())?;
            (t, Some(d))
        };
        self.instances.push(Instance {
            spec: a.spec.id.clone(),
            replica: a.replica,
            hash: a.spec.hash.clone(),
            commit: workflow
                .then(|| commit.map(str::to_ascii_lowercase))
                .flatten(),
            workflow,
            started_unix: unix_now(),
            cell,
            halt,
            thread: Some(thread),
            stopping: false,
            dir,
            persisted: false,
        });
        Ok(())
    }

    fn stop(&mut self, spec: &str, replica: u32, hash: &str) -> Result<()> {
        let mut forget_finished = false;
        for i in self.instances.iter_mut() {
            if i.spec != spec || i.replica != replica || i.hash != hash || i.stopping {
                continue;
            }
            i.stopping = true;
            i.halt.store(true, Ordering::Release);
            forget_finished |= i.persisted;
        }
        // A killed VM is reaped within milliseconds: wait a little, so that a replace
        // does not see the old instance any more.
        let deadline = Instant::now() + Duration::from_secs(3);
        while self
            .instances
            .iter()
            .any(|i| i.stopping && !i.finished() && !i.workflow)
            && Instant::now() < deadline
        {
            std::thread::sleep(Duration::from_millis(10));
        }
        self.reap();
        if forget_finished {
            self.save_finished();
        }
        Ok(())
    }

    fn poll(&mut self) -> Vec<RunningInstance> {
        self.reap();
        // Workflow runs that finished since the last poll are remembered.
        let mut newly_finished = false;
        for i in self.instances.iter_mut() {
            if i.workflow && !i.persisted && !i.stopping && i.finished() {
                if let Some(t) = i.thread.take() {
                    let _ = t.join();
                }
                i.persisted = true;
                newly_finished = true;
            }
        }
        if newly_finished {
            self.save_finished();
        }
        let now = unix_now();
        self.instances
            .iter()
            .map(|i| {
                let c = get(&i.cell);
                RunningInstance {
                    spec: i.spec.clone(),
                    replica: i.replica,
                    hash: i.hash.clone(),
                    state: if i.stopping {
                        InstanceState::Stopping
                    } else {
                        c.state
                    },
                    uptime_s: now.saturating_sub(i.started_unix),
                    snapshot_ids: c.snapshot_ids,
                    message: c.message,
                    commit: i.commit.clone(),
                }
            })
            .collect()
    }

    fn shutdown(&mut self) {
        for i in &self.instances {
            i.halt.store(true, Ordering::Release);
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        for i in self.instances.iter_mut() {
            if let Some(t) = i.thread.take() {
                while !t.is_finished() && Instant::now() < deadline {
                    std::thread::sleep(Duration::from_millis(10));
                }
                if t.is_finished() {
                    let _ = t.join();
                }
            }
        }
        for i in &self.instances {
            if let Some(d) = &i.dir {
                let _ = std::fs::remove_dir_all(d);
            }
        }
    }
}

impl VmExecutor {
    /// Drop stopped instances whose thread has ended.
    fn reap(&mut self) {
        let mut kept = Vec::with_capacity(self.instances.len());
        for mut i in std::mem::take(&mut self.instances) {
            if i.stopping && i.finished() {
                if let Some(t) = i.thread.take() {
                    let _ = t.join();
                }
                if let Some(d) = &i.dir {
                    let _ = std::fs::remove_dir_all(d);
                }
                continue;
            }
            kept.push(i);
        }
        self.instances = kept;
    }
}

/// Counts of instances by state, for logs.
pub fn summarize(instances: &[RunningInstance]) -> String {
    let mut by: BTreeMap<&'static str, usize> = BTreeMap::new();
    for i in instances {
        *by.entry(super::state_name(i.state)).or_default() += 1;
    }
    if by.is_empty() {
        return "nothing".into();
    }
    by.iter()
        .map(|(k, v)| format!("{v} {k}"))
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn images_are_named_by_id_prefix_or_default() {
        let id = "0123456789abcdef0123456789abcdef";
        assert!(image_matches(id, id));
        assert!(image_matches("0123456789ab", id));
        assert!(image_matches("sha256:0123456789abcd", id));
        assert!(image_matches("default", id));
        assert!(!image_matches("0123", id));
        assert!(!image_matches("ffffffffffffffff", id));
        assert_eq!(vcpus(0), 1);
        assert_eq!(vcpus(250), 1);
        assert_eq!(vcpus(1001), 2);
    }

    #[test]
    fn workflow_files_stay_in_the_working_directory() {
        let outside = tempfile::tempdir().unwrap();
        let secret = outside.path().join("secret.yml");
        std::fs::write(&secret, "name: secret\n").unwrap();
        let repo = tempfile::tempdir().unwrap();
        let wf = repo.path().join(".github/workflows");
        std::fs::create_dir_all(&wf).unwrap();
        std::fs::write(wf.join("ci.yml"), "name: ci\n").unwrap();
        std::os::unix::fs::symlink(&secret, wf.join("link.yml")).unwrap();
        std::os::unix::fs::symlink("ci.yml", wf.join("alias.yml")).unwrap();

        let ok = workflow_file(repo.path(), ".github/workflows/ci.yml").unwrap();
        assert_eq!(std::fs::read_to_string(ok).unwrap(), "name: ci\n");
        // A symlink that stays inside is fine.
        workflow_file(repo.path(), ".github/workflows/alias.yml").unwrap();

        let escape = format!(
            "../{}/secret.yml",
            outside.path().file_name().unwrap().to_string_lossy()
        );
        for (path, why) in [
            (secret.to_str().unwrap(), "absolute"),
            (escape.as_str(), "`..`"),
            (".github/workflows/link.yml", "outside"),
            (".github/workflows/missing.yml", "missing.yml"),
        ] {
            let e = workflow_file(repo.path(), path).unwrap_err();
            assert!(format!("{e:#}").contains(why), "{path}: {e:#}");
        }
    }
}
