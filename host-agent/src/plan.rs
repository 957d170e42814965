//! `udos run` before anything runs: read the workflows and everything they refer to
//! (reusable workflows, local actions), find the event and what it triggers, pick the
//! jobs, fetch and pin the actions of other repositories they use
//! ([`crate::actions`]), and check that udos can run every step. Every problem here is
//! a setup error (exit 2) with nothing built or started.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use udos_core::engine::contexts::RunFacts;
use udos_core::engine::graph::{self, local_key, Runners, Selection, WorkflowSet};
use udos_core::engine::run::{self, Run, RunConfig, DEFAULT_BASE};
use udos_core::event::TriggerDecision;
use udos_core::value::Value;
use udos_core::workflow::{self, JobKind, StepBody, StepUses, Workflow};

use crate::actions::{ActionStore, LocalRepository, Resolver};
use crate::repo::{self, RepoInfo};
use crate::request::{self, Target};
use crate::runner::RunRequest;

/// The built-in bases `-P LABEL=BASE` can name; any other valid name is an imported
/// base, which must exist when the run starts (`udos base list`).
pub const BASES: &[&str] = &[crate::setup::MINIMAL, "debian"];

/// The environment variable naming the base the default labels (`ubuntu-*`, `linux`,
/// `self-hosted`...) run on when `-P` maps none: a built-in or imported base.
pub const DEFAULT_BASE_VAR: &str = "UDOS_DEFAULT_BASE";

/// Is `base` a name a base can have (built-in, or valid for an import)?
fn check_base(base: &str, what: &str) -> Result<()> {
    if BASES.contains(&base) {
        return Ok(());
    }
    udos_images::import::check_base_name(base).map_err(|why| {
        anyhow::anyhow!(
            "{what}: {why} (bases: {}, or an imported base: `udos base list`)",
            BASES.join(", ")
        )
    })
}

/// `-P LABEL=BASE`: a built-in base or the name of an imported one.
fn platforms(flags: &[String]) -> Result<Vec<(String, String)>> {
    let mut known: Vec<&str> = BASES.to_vec();
    for f in flags {
        let Some((_, base)) = f.split_once('=') else {
            continue;
        };
        check_base(base, &format!("-P {f}"))?;
        known.push(base);
    }
    request::platforms(flags, &known)
}

/// The base the default labels get: `$UDOS_DEFAULT_BASE`, else [`DEFAULT_BASE`].
fn default_base() -> Result<String> {
    match std::env::var(DEFAULT_BASE_VAR) {
        Ok(b) if !b.is_empty() => {
            check_base(&b, &format!("${DEFAULT_BASE_VAR}={b}"))?;
            Ok(b)
        }
        _ => Ok(DEFAULT_BASE.to_string()),
    }
}

/// `udos run`'s flags that shape the plan.
#[derive(Debug, Clone, Default)]
pub struct PlanArgs {
    /// Positionals: `[EVENT] [WORKFLOW]`.
    pub positionals: Vec<String>,
    /// `-W`.
    pub workflows: Option<PathBuf>,
    /// `-j`.
    pub jobs: Vec<String>,
    /// `-e`.
    pub eventpath: Option<PathBuf>,
    /// `--input`.
    pub inputs: Vec<String>,
    /// `-s/--secret`.
    pub secrets: Vec<String>,
    /// `--secret-file`.
    pub secret_file: Option<PathBuf>,
    /// `--var`.
    pub vars: Vec<String>,
    /// `--var-file`.
    pub var_file: Option<PathBuf>,
    /// `--env-file`.
    pub env_file: Option<PathBuf>,
    /// `--matrix`.
    pub matrix: Vec<String>,
    /// `--jobs`.
    pub parallel: Option<usize>,
    /// `-P`.
    pub platforms: Vec<String>,
    /// Memory per VM (MiB), to size the default `--jobs`.
    pub memory_mib: u64,
    /// The state directory: its action store holds the actions of other
    /// repositories, its bases say which have node. Without it, actions of other
    /// repositories are not resolved (and so refused).
    pub state_root: Option<PathBuf>,
    /// `-l`: only the jobs are listed, so the actions of other repositories are not
    /// fetched and the steps not checked (a dry run, `-n`, does both: it says what a
    /// run would refuse).
    pub list_only: bool,
    /// `--actions-url` [default: [`crate::actions::DEFAULT_ACTIONS_URL`]].
    pub actions_url: Option<String>,
    /// `--local-repository OWNER/REPO@REF=PATH`.
    pub local_repositories: Vec<String>,
}

/// What planning decided.
pub enum Planned {
    /// Run this.
    Run(Box<RunRequest>),
    /// The event triggers nothing (filters excluded every workflow): why, per workflow.
    Nothing(Vec<String>),
}

/// The workflow files `-W` (or the positional) names: a file, or every `.yml`/`.yaml`
/// in a directory, sorted.
pub fn workflow_files(path: &Path) -> Result<Vec<PathBuf>> {
    if path.is_dir() {
        let mut files: Vec<PathBuf> = std::fs::read_dir(path)
            .with_context(|| format!("listing {}", path.display()))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                p.is_file()
                    && matches!(p.extension().and_then(|e| e.to_str()), Some("yml" | "yaml"))
            })
            .collect();
        files.sort();
        if files.is_empty() {
            bail!("no workflow files (*.yml, *.yaml) in {}", path.display());
        }
        Ok(files)
    } else if path.is_file() {
        Ok(vec![path.to_path_buf()])
    } else {
        bail!(
            "no workflow at {} (give a file or a directory of workflows with -W)",
            path.display()
        )
    }
}

/// Reads and parses a workflow file; `root` makes its name repository-relative.
pub fn load_workflow(path: &Path, root: &Path) -> Result<Workflow> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading the workflow {}", path.display()))?;
    let abs = path.canonicalize().unwrap_or_else(|_| path.to_path_buf());
    let name = abs
        .strip_prefix(root)
        .map(|p| p.display().to_string())
        .unwrap_or_else(|_| path.display().to_string());
    Ok(workflow::parse(&text, &name)?)
}

/// The reusable workflows and local actions `set.top` refers to, read from `root`.
fn load_references(set: &mut WorkflowSet, root: &Path) -> Result<()> {
    let mut todo: Vec<Workflow> = set.top.clone();
    while let Some(wf) = todo.pop() {
        for job in wf.jobs.values() {
            match &job.kind {
                JobKind::Call(call) => {
                    let key = local_key(&call.uses);
                    if set.called.contains_key(&key) {
                        continue;
                    }
                    let path = root.join(&key);
                    if path.is_file() {
                        let callee = load_workflow(&path, root).with_context(|| {
                            format!("the reusable workflow `{}` of job `{}`", call.uses, job.id)
                        })?;
                        todo.push(callee.clone());
                        set.called.insert(key, callee);
                    }
                }
                JobKind::Steps(steps) => {
                    for step in &steps.steps {
                        let StepBody::Uses {
                            uses: StepUses::Local(p),
                            ..
                        } = &step.body
                        else {
                            continue;
                        };
                        let key = local_key(p);
                        if set.actions.contains_key(&key) {
                            continue;
                        }
                        let dir = root.join(&key);
                        let file = ["action.yml", "action.yaml"]
                            .iter()
                            .map(|f| dir.join(f))
                            .find(|f| f.is_file());
                        if let Some(file) = file {
                            let text = std::fs::read_to_string(&file)
                                .with_context(|| format!("reading {}", file.display()))?;
                            let def = workflow::action::parse(&text, &format!("{key}/action.yml"))?;
                            set.actions.insert(key, def);
                        }
                    }
                }
            }
        }
    }
    Ok(())
}

/// The event when none is named: the only event of all the workflows, else `push`
/// (act's rule).
fn default_event(set: &WorkflowSet) -> Result<String> {
    let mut names: Vec<String> = Vec::new();
    for wf in &set.top {
        for n in run::triggers(wf)
            .map_err(|e| anyhow::anyhow!("{e}"))?
            .event_names()
        {
            if !names.iter().any(|x| x == n) {
                names.push(n.to_string());
            }
        }
    }
    Ok(match names.as_slice() {
        [only] => only.clone(),
        _ => "push".into(),
    })
}

/// `--jobs` by default: as many VMs as the cores and memory hold (at least one).
pub fn default_parallel(memory_mib: u64) -> usize {
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let avail_mib = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find(|l| l.starts_with("MemAvailable:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .map(|kb| kb / 1024)
        .unwrap_or(2048);
    // Each VM: its memory plus the hypervisor's own (~256 MiB); keep 1 GiB for the host.
    let by_memory = (avail_mib.saturating_sub(1024) / (memory_mib + 256)).max(1) as usize;
    cores.min(by_memory).max(1)
}

/// Plans `udos run`.
pub fn plan(args: &PlanArgs) -> Result<(Planned, WorkflowSet)> {
    let target: Target = request::target(&args.positionals, args.workflows.as_deref())?;
    let files = workflow_files(&target.workflows)?;
    let first_dir = files[0]
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    // Listed once: the run's workspace layer is made from this listing.
    let tree = crate::workspace::discover(&files[0]).ok();
    let root = tree
        .as_ref()
        .map(|w| w.root.clone())
        .unwrap_or_else(|| first_dir.to_path_buf());
    let root = root.canonicalize().unwrap_or(root);
    let mut set = WorkflowSet::default();
    for f in &files {
        set.top.push(load_workflow(f, &root)?);
    }
    load_references(&mut set, &root)?;

    let event = match &target.event {
        Some(e) => e.clone(),
        None => default_event(&set)?,
    };
    let info: RepoInfo = repo::inspect(&root);
    let mut inputs = request::inputs(&args.inputs)?;
    let mut payload = match &args.eventpath {
        Some(p) => request::event_payload(p)?,
        None => repo::default_payload(&event, &info, &inputs),
    };
    // Inputs in the payload count as given, the flags win (as act does); a dispatch
    // payload carries them all, as strings (`github.event.inputs`).
    if let Some(Value::Object(given)) = payload.get("inputs") {
        for (k, v) in given {
            if !inputs.contains_key(k) {
                inputs.insert(k.clone(), v.clone());
            }
        }
    }
    if event == "workflow_dispatch" {
        if let Value::Object(p) = &mut payload {
            let strings = inputs
                .iter()
                .map(|(k, v)| (k.clone(), Value::str(v.to_string())))
                .collect();
            p.insert("inputs", Value::Object(strings));
        }
    }
    let facts: RunFacts = repo::run_facts(&info, &event, &payload, 0);
    let changed = repo::changed_paths(&root, &payload, &facts.sha);
    let event_facts = repo::event_facts(&facts, changed);

    let mut triggered = Vec::new();
    let mut reasons = Vec::new();
    let mut notices = Vec::new();
    let mut listed_anywhere = false;
    for wf in &set.top {
        let t = run::triggers(wf).map_err(|e| anyhow::anyhow!("{e}"))?;
        listed_anywhere |= t.event_names().contains(&event.as_str());
        match t.decide(&event_facts) {
            TriggerDecision::Runs { notes } => {
                triggered.push(true);
                notices.extend(notes.into_iter().map(|n| format!("{}: {n}", wf.file)));
            }
            TriggerDecision::NotTriggered { reason } => {
                triggered.push(false);
                reasons.push(format!("{}: {reason}", wf.file));
            }
        }
    }
    let selection: Selection = graph::select(&set, &triggered, &args.jobs)?;
    if selection.is_empty() {
        if !listed_anywhere {
            let all: Vec<String> = set
                .top
                .iter()
                .filter_map(|w| run::triggers(w).ok())
                .flat_map(|t| {
                    t.event_names()
                        .into_iter()
                        .map(str::to_string)
                        .collect::<Vec<_>>()
                })
                .collect();
            bail!(
                "no workflow in {} runs on `{event}` (they run on: {}); name the event: udos run EVENT",
                target.workflows.display(),
                all.join(", ")
            );
        }
        return Ok((Planned::Nothing(reasons), set));
    }
    let platforms = platforms(&args.platforms)?;
    let pinned = match &args.state_root {
        Some(state_root) if !args.list_only => {
            pin_actions(&mut set, &selection, resolver(args, state_root)?)
        }
        _ => Pinning::default(),
    };
    notices.extend(pinned.notices);
    let default_base = default_base()?;
    let runners = Runners {
        with_node: bases_with_node(&platforms, &default_base, args.state_root.as_deref()),
        platforms: platforms.clone(),
        default_base: Some(default_base.clone()),
    };
    let mut problems = pinned.problems;
    let checked = match args.list_only {
        true => Ok(()),
        false => graph::check_supported_on(&set, &selection, &runners),
    };
    if let Err(e) = checked {
        // A step whose actions could not be had is not also "not resolved".
        problems.extend(e.to_string().lines().map(str::to_string).filter(|l| {
            !(l.contains("not resolved before the run")
                && pinned
                    .failed
                    .iter()
                    .any(|at| l.starts_with(&format!("{at}: "))))
        }));
    }
    if !problems.is_empty() {
        problems.sort();
        bail!("{}", problems.join("\n"));
    }
    for (i, jobs) in &selection.workflows {
        graph::stages(&set.top[*i], jobs)?;
    }

    let config = RunConfig {
        facts,
        secrets: request::secrets(&args.secrets, args.secret_file.as_deref(), &|k| {
            std::env::var(k).ok()
        })?,
        vars: request::vars(&args.vars, args.var_file.as_deref())?,
        env: request::env_file(args.env_file.as_deref())?,
        inputs,
        platforms,
        matrix_filter: request::matrix(&args.matrix)?,
        max_running: args
            .parallel
            .unwrap_or_else(|| default_parallel(args.memory_mib.max(64))),
        default_base: Some(default_base),
    };
    let bases = graph::bases_used(&set, &selection, &runners);
    // Inputs and the rest are checked now, before anything is built.
    Run::new(set.clone(), &selection, config.clone()).map_err(|e| anyhow::anyhow!("{e}"))?;
    let workflow_paths = selection
        .workflows
        .iter()
        .map(|(i, _)| {
            files[*i]
                .canonicalize()
                .unwrap_or_else(|_| files[*i].clone())
        })
        .collect();
    let request = RunRequest {
        workflow_paths,
        repo_root: root,
        set: set.clone(),
        selection,
        config,
        bases,
        notices,
        workspace: tree,
    };
    Ok((Planned::Run(Box::new(request)), set))
}

/// The resolver `--actions-url` and `--local-repository` ask for.
fn resolver(args: &PlanArgs, state_root: &Path) -> Result<Resolver> {
    let local = args
        .local_repositories
        .iter()
        .map(|f| f.parse::<LocalRepository>())
        .collect::<Result<Vec<_>, _>>()?;
    let url = args
        .actions_url
        .as_deref()
        .unwrap_or(crate::actions::DEFAULT_ACTIONS_URL);
    Ok(Resolver::new(ActionStore::new(state_root), url, local))
}

/// What pinning the actions of a run gave besides the pins.
#[derive(Debug, Default)]
struct Pinning {
    /// For the report.
    notices: Vec<String>,
    /// Actions that could not be had, each naming its step.
    problems: Vec<String>,
    /// Where those steps are.
    failed: Vec<String>,
}

/// Pins the actions of other repositories every selected step uses (its own `uses:`,
/// or a local composite action's, and what their composite actions use in turn) into
/// the steps ([`udos_core::workflow::StepDef::actions`]).
fn pin_actions(set: &mut WorkflowSet, sel: &Selection, mut resolver: Resolver) -> Pinning {
    let local_defs = set.actions.clone();
    let mut out = Pinning::default();
    for (at, step) in graph::selected_steps_mut(set, sel) {
        let roots: Vec<String> = match &step.body {
            StepBody::Uses { uses, .. } if uses.is_checkout() => continue,
            StepBody::Uses {
                uses: StepUses::Remote { raw, .. },
                ..
            } => vec![raw.clone()],
            StepBody::Uses {
                uses: StepUses::Local(p),
                ..
            } => match local_defs.get(&local_key(p)) {
                Some(def) => def.uses.clone(),
                None => continue,
            },
            _ => continue,
        };
        match resolver.closure(&roots) {
            Ok(actions) => step.actions = actions,
            Err(e) => {
                out.problems.push(format!("{at}: {e}"));
                out.failed.push(at);
            }
        }
    }
    if !resolver.fetched.is_empty() {
        eprintln!(
            "udos: fetched into the action store: {}",
            resolver.fetched.join(", ")
        );
    }
    out.notices = resolver.notices;
    out
}

/// The bases of the run that have node: `debian` (its package list has nodejs) and
/// imported bases whose tree has it; never the busybox base.
fn bases_with_node(
    platforms: &[(String, String)],
    default_base: &str,
    state_root: Option<&Path>,
) -> BTreeSet<String> {
    let store = state_root.map(udos_images::ImageStore::new);
    platforms
        .iter()
        .map(|(_, b)| b.as_str())
        .chain([default_base])
        .filter(|b| match *b {
            "debian" => true,
            b if BASES.contains(&b) => false,
            b => store
                .as_ref()
                .and_then(|s| s.named_base(b).ok().flatten())
                .is_some_and(|nb| crate::actions::tree_has_node(&nb.layer.tree)),
        })
        .map(str::to_string)
        .collect()
}

/// `-l`: the jobs by stage, as act lists them.
pub fn list(set: &WorkflowSet, sel: &Selection) -> Result<Vec<[String; 6]>> {
    let mut rows = Vec::new();
    for (i, jobs) in &sel.workflows {
        let wf = &set.top[*i];
        let events = run::triggers(wf)
            .map(|t| t.event_names().join(","))
            .unwrap_or_default();
        for (stage, names) in graph::stages(wf, jobs)?.into_iter().enumerate() {
            for j in names {
                let job = &wf.jobs[&j];
                rows.push([
                    stage.to_string(),
                    j.clone(),
                    job.name.clone().unwrap_or_else(|| j.clone()),
                    wf.name.clone(),
                    wf.file.clone(),
                    events.clone(),
                ]);
            }
        }
    }
    Ok(rows)
}

/// `-n`: what would run, decided as far as the host can without running anything.
pub fn dry_run(set: &WorkflowSet, sel: &Selection) -> Result<String> {
    let mut out = String::new();
    for (i, jobs) in &sel.workflows {
        let wf = &set.top[*i];
        out.push_str(&format!("workflow {} ({})\n", wf.name, wf.file));
        for (stage, names) in graph::stages(wf, jobs)?.into_iter().enumerate() {
            for j in names {
                let job = &wf.jobs[&j];
                out.push_str(&format!("  stage {stage}: job {j}"));
                if !job.needs.is_empty() {
                    out.push_str(&format!(" (needs {})", job.needs.join(", ")));
                }
                if let Some(c) = &job.condition {
                    out.push_str(&format!(" if: {c}"));
                }
                out.push('\n');
                if job.strategy.is_some() {
                    out.push_str("    matrix legs: decided when the job starts\n");
                }
                match &job.kind {
                    JobKind::Call(c) => {
                        out.push_str(&format!("    calls {}\n", c.uses));
                        if let Some(callee) = set.called.get(&local_key(&c.uses)) {
                            for (cid, _) in &callee.jobs {
                                out.push_str(&format!("      job {j}/{cid}\n"));
                            }
                        }
                    }
                    JobKind::Steps(s) => {
                        for step in &s.steps {
                            let how = match &step.body {
                                StepBody::Uses { uses, .. } if uses.is_checkout() => {
                                    " [served from the workspace, no VM]"
                                }
                                _ => "",
                            };
                            out.push_str(&format!(
                                "    step {} {}{}{}\n",
                                step.number,
                                step.display_name(),
                                step.condition
                                    .as_ref()
                                    .map(|c| format!(" (if: {c})"))
                                    .unwrap_or_default(),
                                how
                            ));
                        }
                    }
                }
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::platforms;

    fn flags(f: &[&str]) -> Vec<String> {
        f.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn platforms_name_built_in_or_imported_bases() {
        let p = platforms(&flags(&[
            "ubuntu-latest=debian",
            "small=minimal",
            "mine=alpine-3.20",
        ]))
        .unwrap();
        assert_eq!(
            p,
            vec![
                ("ubuntu-latest".to_string(), "debian".to_string()),
                ("small".to_string(), "minimal".to_string()),
                ("mine".to_string(), "alpine-3.20".to_string()),
            ]
        );
        for bad in ["x=../etc", "x=Upper", "x=", "x=a b"] {
            let e = platforms(&flags(&[bad])).unwrap_err().to_string();
            assert!(
                e.contains(bad) && e.contains("udos base list"),
                "{bad}: {e}"
            );
        }
        assert!(platforms(&flags(&["no-equals-sign"])).is_err());
    }
}
