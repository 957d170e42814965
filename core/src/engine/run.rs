//! The run as a state machine over jobs and their legs.
//!
//! A job waits until everything it needs has finished; then its `if:` is evaluated,
//! its matrix expanded (possibly from `needs` outputs) and its legs queued. Legs start
//! within `--jobs` (VMs at once) and `max-parallel`; a failing leg cancels its
//! siblings under `fail-fast`. A job that calls a reusable workflow becomes a nested
//! instance of that workflow, whose jobs run like any other; its outputs are evaluated
//! when they have all finished. Everything is decided here, from plain data; the host
//! only starts and cancels legs and reports how they ended.

use std::collections::BTreeSet;

use indexmap::IndexMap;

use crate::event::{self, Triggers};
use crate::expr::{self, EvalEnv, Status};
use crate::matrix;
use crate::value::{Object, Value};
use crate::workflow::{CallSecrets, Env, Job, JobKind, RunDefaults, StepsJob, Workflow};

use super::contexts::{self, RunFacts};
use super::graph::{local_key, Selection, WorkflowSet};
use super::{Conclusion, EngineError};

/// A leg, by its index in the run (stable for the run's life).
pub type LegId = usize;

/// GitHub's default job timeout, minutes.
pub const DEFAULT_JOB_TIMEOUT_MINUTES: f64 = 360.0;
/// Reusable workflows may nest this deep (GitHub's limit: a caller and three levels).
pub const MAX_CALL_DEPTH: usize = 4;

/// The base a label runs on when `-P` does not say otherwise.
pub const DEFAULT_BASE: &str = "default";

/// What the run was given besides the workflows.
#[derive(Debug, Clone, Default)]
pub struct RunConfig {
    /// Repository, event and numbering.
    pub facts: RunFacts,
    /// `--secret`/`--secret-file`: name to value.
    pub secrets: Object,
    /// `--var`/`--var-file`.
    pub vars: Object,
    /// `--env-file`: below the workflow's `env:`.
    pub env: Env,
    /// `--input k=v`, for `workflow_dispatch` and `workflow_call`.
    pub inputs: IndexMap<String, Value>,
    /// `-P LABEL=BASE`, in order (the first label of a job with a mapping wins).
    pub platforms: Vec<(String, String)>,
    /// `--matrix k:v`.
    pub matrix_filter: Vec<(String, String)>,
    /// `--jobs N`: step VMs at once (at least 1).
    pub max_running: usize,
}

/// What the host should do next.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Run this leg's steps.
    Start(Box<LegTicket>),
    /// Stop this running leg (fail-fast, or the run was cancelled); it still reports
    /// how it ended through [`Run::leg_finished`].
    Cancel(LegId),
}

/// Everything needed to run one leg's steps.
#[derive(Debug, Clone, PartialEq)]
pub struct LegTicket {
    /// Which leg.
    pub id: LegId,
    /// The id in reports: the job's key, `caller/job` inside a reusable workflow.
    pub report_id: String,
    /// The display name: `build (ubuntu, 18)`, `call / test`.
    pub name: String,
    /// The job's key.
    pub job_id: String,
    /// The workflow's name (`github.workflow`).
    pub workflow_name: String,
    /// The workflow file.
    pub workflow_file: String,
    /// The job.
    pub job: StepsJob,
    /// The workflow's `env:` as written, below the job's.
    pub workflow_env: Env,
    /// The workflow's `defaults.run`, below the job's.
    pub workflow_defaults: RunDefaults,
    /// `--env-file`, below the workflow's `env:`.
    pub env_file: Env,
    /// github, vars, secrets, inputs, matrix, strategy, needs, runner, job.
    pub contexts: Object,
    /// The base the leg runs on (`-P` mapping of its `runs-on`).
    pub base: String,
    /// `timeout-minutes` of the job.
    pub timeout_minutes: f64,
    /// The event name (the synthesized workflow's `on:`).
    pub event_name: String,
    /// `GITHUB_*`, `RUNNER_*` and `CI` for the leg's steps.
    pub github_env: IndexMap<String, String>,
}

/// How a leg ended, as the host reports it.
#[derive(Debug, Clone, PartialEq)]
pub struct LegResult {
    /// success, failure or cancelled.
    pub outcome: Conclusion,
    /// The job's `outputs:` as evaluated at the end of the leg.
    pub outputs: Object,
    /// Why, when udos (not a step) ended the leg.
    pub error: Option<String>,
}

/// A leg as the report shows it.
#[derive(Debug, Clone, PartialEq)]
pub struct LegView {
    /// Which leg.
    pub id: LegId,
    /// Report id (see [`LegTicket::report_id`]).
    pub report_id: String,
    /// Display name.
    pub name: String,
    /// The leg's matrix values, if it has a matrix.
    pub matrix: Option<Object>,
    /// How it ended (None while it has not).
    pub outcome: Option<Conclusion>,
    /// The conclusion (`continue-on-error` turns a failure into success).
    pub conclusion: Option<Conclusion>,
    /// Outputs.
    pub outputs: Object,
    /// Why udos ended or skipped it, if it did.
    pub error: Option<String>,
    /// A reusable workflow call (no steps of its own).
    pub is_call: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Waiting,
    Running,
    Done,
}

#[derive(Debug, Clone)]
struct JobState {
    phase: Phase,
    legs: Vec<LegId>,
    outcome: Option<Conclusion>,
    conclusion: Option<Conclusion>,
    outputs: Object,
    fail_fast: bool,
    max_parallel: usize,
    /// Legs of this job running now (steps or a reusable workflow).
    running: usize,
}

#[derive(Debug, Clone)]
enum LegKind {
    Steps { base: String },
    Call { child: Option<usize> },
}

#[derive(Debug, Clone)]
struct LegState {
    instance: usize,
    job: String,
    index: usize,
    total: usize,
    has_matrix: bool,
    matrix: Option<Object>,
    report_id: String,
    name: String,
    phase: Phase,
    outcome: Option<Conclusion>,
    conclusion: Option<Conclusion>,
    outputs: Object,
    kind: LegKind,
    continue_on_error: bool,
    timeout_minutes: f64,
    cancel_sent: bool,
    error: Option<String>,
    finished_order: usize,
}

#[derive(Debug, Clone)]
struct Instance {
    workflow: Workflow,
    jobs: Vec<String>,
    states: IndexMap<String, JobState>,
    inputs: Object,
    secrets: Object,
    /// The call leg that made this instance, for nested reusable workflows.
    parent: Option<LegId>,
    depth: usize,
    id_prefix: String,
    name_prefix: String,
}

/// The run.
#[derive(Debug, Clone)]
pub struct Run {
    set: WorkflowSet,
    cfg: RunConfig,
    instances: Vec<Instance>,
    legs: Vec<LegState>,
    running: usize,
    /// Legs queued to start, in the order they were made.
    waiting: Vec<LegId>,
    pending: Vec<Action>,
    cancelled: bool,
    finished: usize,
    /// Notes for the user (ignored keys, skipped platforms).
    pub notices: Vec<String>,
}

fn status_of(c: Option<Conclusion>) -> &'static str {
    c.map(Conclusion::as_str).unwrap_or("")
}

/// Evaluates every string inside `v` as a template (typed when the whole string is
/// one expression): a matrix written with expressions in it.
fn evaluate_deep(v: &Value, env: &EvalEnv) -> Result<Value, expr::ExprError> {
    Ok(match v {
        Value::String(s) if expr::has_expression(s) => expr::evaluate_template(s, env)?,
        Value::Array(a) => Value::Array(
            a.iter()
                .map(|x| evaluate_deep(x, env))
                .collect::<Result<_, _>>()?,
        ),
        Value::Object(o) => {
            let mut out = Object::new();
            for (k, x) in o {
                out.insert(k.clone(), evaluate_deep(x, env)?);
            }
            Value::Object(out)
        }
        other => other.clone(),
    })
}

/// A template or literal as a boolean (`continue-on-error`, `fail-fast`).
fn template_bool(v: &Value, env: &EvalEnv) -> Result<bool, expr::ExprError> {
    Ok(match v {
        Value::String(s) => expr::evaluate_template(s, env)?.truthy(),
        other => other.truthy(),
    })
}

/// A template or literal as a number (`timeout-minutes`, `max-parallel`).
fn template_number(v: &Value, env: &EvalEnv) -> Result<Option<f64>, expr::ExprError> {
    let v = match v {
        Value::String(s) => expr::evaluate_template(s, env)?,
        other => other.clone(),
    };
    Ok(match v {
        Value::Number(n) if n.is_finite() => Some(n),
        Value::String(s) => s.trim().parse::<f64>().ok(),
        _ => None,
    })
}

/// The `on:` of a workflow as triggers.
pub fn triggers(wf: &Workflow) -> Result<Triggers, EngineError> {
    let model: github_actions_models::workflow::Trigger = serde_yaml_ng::from_value(wf.on.clone())
        .map_err(|e| EngineError::Plan(format!("{}: `on:` is not valid: {e}", wf.file)))?;
    Triggers::from_model_with_source(&model, &Value::from(&wf.on))
        .map_err(|e| EngineError::Plan(format!("{}: `on:` {e}", wf.file)))
}

/// Does `label` run on the default base when `-P` says nothing about it?
pub(crate) fn default_label(label: &str) -> bool {
    let l = label.to_ascii_lowercase();
    l.starts_with("ubuntu")
        || l.starts_with("debian")
        || matches!(l.as_str(), "linux" | "self-hosted" | "x64" | "amd64")
}

impl Run {
    /// A run of the selected jobs. Errors are setup errors (bad inputs).
    pub fn new(set: WorkflowSet, sel: &Selection, cfg: RunConfig) -> Result<Run, EngineError> {
        let mut run = Run {
            instances: Vec::new(),
            legs: Vec::new(),
            running: 0,
            waiting: Vec::new(),
            pending: Vec::new(),
            cancelled: false,
            finished: 0,
            notices: Vec::new(),
            set,
            cfg,
        };
        for (i, jobs) in &sel.workflows {
            let wf = run.set.top[*i].clone();
            for n in &wf.ignored {
                run.notices.push(format!("{}: {n}", wf.file));
            }
            let inputs = run.top_inputs(&wf)?;
            let secrets = run.cfg.secrets.clone();
            run.add_instance(wf, jobs.clone(), inputs, secrets, None, 0, "", "");
        }
        if run.cfg.max_running == 0 {
            run.cfg.max_running = 1;
        }
        Ok(run)
    }

    /// `--input` values for a top-level workflow: typed and checked against its
    /// `workflow_dispatch` (or `workflow_call`) inputs when it declares them.
    fn top_inputs(&self, wf: &Workflow) -> Result<Object, EngineError> {
        let t = triggers(wf)?;
        let specs = match self.cfg.facts.event_name.as_str() {
            "workflow_dispatch" => t.dispatch_inputs(),
            "workflow_call" => t.call().map(|c| &c.inputs),
            _ => None,
        };
        match specs {
            Some(specs) => event::resolve_inputs(specs, &self.cfg.inputs)
                .map_err(|e| EngineError::Plan(format!("{}: {e}", wf.file))),
            None => Ok(self
                .cfg
                .inputs
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect()),
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn add_instance(
        &mut self,
        workflow: Workflow,
        jobs: Vec<String>,
        inputs: Object,
        secrets: Object,
        parent: Option<LegId>,
        depth: usize,
        id_prefix: &str,
        name_prefix: &str,
    ) -> usize {
        let states = jobs
            .iter()
            .map(|j| {
                (
                    j.clone(),
                    JobState {
                        phase: Phase::Waiting,
                        legs: Vec::new(),
                        outcome: None,
                        conclusion: None,
                        outputs: Object::new(),
                        fail_fast: true,
                        max_parallel: usize::MAX,
                        running: 0,
                    },
                )
            })
            .collect();
        self.instances.push(Instance {
            workflow,
            jobs,
            states,
            inputs,
            secrets,
            parent,
            depth,
            id_prefix: id_prefix.to_string(),
            name_prefix: name_prefix.to_string(),
        });
        self.instances.len() - 1
    }

    /// Cancels the whole run (Ctrl-C): queued legs never start, running ones are
    /// stopped, jobs not started yet are decided with `cancelled()` true.
    pub fn cancel_all(&mut self) {
        self.cancelled = true;
        for id in 0..self.legs.len() {
            self.cancel_leg(id);
        }
    }

    fn cancel_leg(&mut self, id: LegId) {
        let leg = &mut self.legs[id];
        match leg.phase {
            Phase::Waiting => {
                leg.phase = Phase::Done;
                leg.outcome = Some(Conclusion::Cancelled);
                leg.conclusion = Some(Conclusion::Cancelled);
                self.finished += 1;
                leg.finished_order = self.finished;
            }
            Phase::Running if !leg.cancel_sent => {
                leg.cancel_sent = true;
                if matches!(leg.kind, LegKind::Steps { .. }) {
                    self.pending.push(Action::Cancel(id));
                } else if let LegKind::Call { child: Some(c) } = leg.kind {
                    let legs: Vec<LegId> = self.instances[c]
                        .states
                        .values()
                        .flat_map(|s| s.legs.clone())
                        .collect();
                    for l in legs {
                        self.cancel_leg(l);
                    }
                }
            }
            _ => {}
        }
    }

    /// Has everything finished?
    pub fn is_done(&self) -> bool {
        self.instances
            .iter()
            .all(|i| i.states.values().all(|s| s.phase == Phase::Done))
    }

    /// Legs currently running steps.
    pub fn running(&self) -> usize {
        self.running
    }

    /// The run's result: failure when a job failed (without `continue-on-error`),
    /// cancelled when one was cancelled, else success.
    pub fn conclusion(&self) -> Conclusion {
        let top = self.instances.iter().filter(|i| i.parent.is_none());
        let cs: Vec<Conclusion> = top
            .flat_map(|i| i.states.values().filter_map(|s| s.conclusion))
            .collect();
        if cs.contains(&Conclusion::Failure) {
            Conclusion::Failure
        } else if cs.contains(&Conclusion::Cancelled) || self.cancelled {
            Conclusion::Cancelled
        } else {
            Conclusion::Success
        }
    }

    /// Every leg, in the order they were created.
    pub fn legs(&self) -> Vec<LegView> {
        self.legs
            .iter()
            .enumerate()
            .map(|(id, l)| LegView {
                id,
                report_id: l.report_id.clone(),
                name: l.name.clone(),
                matrix: l.matrix.clone(),
                outcome: l.outcome,
                conclusion: l.conclusion,
                outputs: l.outputs.clone(),
                error: l.error.clone(),
                is_call: matches!(l.kind, LegKind::Call { .. }),
            })
            .collect()
    }

    /// The secrets a leg's steps may use (for masking and for the step VMs).
    pub fn leg_secrets(&self, id: LegId) -> &Object {
        &self.instances[self.legs[id].instance].secrets
    }

    /// A leg ended.
    pub fn leg_finished(&mut self, id: LegId, result: LegResult) {
        let leg = &mut self.legs[id];
        if leg.phase == Phase::Done {
            return;
        }
        if leg.phase == Phase::Running {
            if matches!(leg.kind, LegKind::Steps { .. }) {
                self.running -= 1;
            }
            let s = &mut self.instances[leg.instance].states[&leg.job];
            s.running = s.running.saturating_sub(1);
        }
        let leg = &mut self.legs[id];
        leg.phase = Phase::Done;
        self.finished += 1;
        leg.finished_order = self.finished;
        leg.outcome = Some(result.outcome);
        leg.conclusion = Some(
            if result.outcome == Conclusion::Failure && leg.continue_on_error {
                Conclusion::Success
            } else {
                result.outcome
            },
        );
        leg.outputs = result.outputs;
        leg.error = result.error;
        let (inst, job, has_matrix) = (leg.instance, leg.job.clone(), leg.has_matrix);
        let fails = result.outcome == Conclusion::Failure && !leg.continue_on_error;
        let state = &self.instances[inst].states[&job];
        if fails && has_matrix && state.fail_fast {
            for sibling in state.legs.clone() {
                if sibling != id {
                    self.cancel_leg(sibling);
                }
            }
        }
    }

    /// Decides what can happen now: jobs whose needs are done are decided and their
    /// legs queued; queued legs start within the limits; finished jobs and reusable
    /// workflow calls are concluded. Call again after every [`Run::leg_finished`].
    pub fn poll(&mut self) -> Vec<Action> {
        let mut actions = Vec::new();
        loop {
            let mut changed = false;
            for inst in 0..self.instances.len() {
                for job in self.instances[inst].jobs.clone() {
                    let phase = self.instances[inst].states[&job].phase;
                    if phase == Phase::Waiting && self.needs_done(inst, &job) {
                        self.start_job(inst, &job);
                        changed = true;
                    }
                }
            }
            changed |= self.finish_calls();
            changed |= self.finish_jobs();
            let started = self.start_legs();
            changed |= !started.is_empty();
            actions.extend(started);
            if !changed {
                break;
            }
        }
        actions.append(&mut self.pending);
        actions
    }

    fn needs_done(&self, inst: usize, job: &str) -> bool {
        let i = &self.instances[inst];
        i.workflow.jobs[job]
            .needs
            .iter()
            .all(|n| i.states.get(n).is_some_and(|s| s.phase == Phase::Done))
    }

    /// All jobs `job` needs, directly or not.
    fn ancestors(&self, inst: usize, job: &str) -> BTreeSet<String> {
        let wf = &self.instances[inst].workflow;
        let mut out = BTreeSet::new();
        let mut todo: Vec<String> = wf.jobs[job].needs.clone();
        while let Some(j) = todo.pop() {
            if out.insert(j.clone()) {
                todo.extend(wf.jobs[&j].needs.iter().cloned());
            }
        }
        out
    }

    fn job_status(&self, inst: usize, job: &str) -> Status {
        let i = &self.instances[inst];
        let results: Vec<Option<Conclusion>> = self
            .ancestors(inst, job)
            .iter()
            .map(|a| i.states.get(a).and_then(|s| s.conclusion))
            .collect();
        Status {
            success: !self.cancelled && results.iter().all(|c| *c == Some(Conclusion::Success)),
            failure: results.contains(&Some(Conclusion::Failure)),
            cancelled: self.cancelled,
        }
    }

    fn needs_context(&self, inst: usize, job: &Job) -> Value {
        let i = &self.instances[inst];
        let mut o = Object::new();
        for n in &job.needs {
            let s = &i.states[n];
            let mut e = Object::new();
            e.insert("result", Value::str(status_of(s.conclusion)));
            e.insert("outputs", Value::Object(s.outputs.clone()));
            o.insert(n.clone(), Value::Object(e));
        }
        Value::Object(o)
    }

    /// github, needs, vars, inputs, secrets, runner: what a job's keys can read.
    fn job_contexts(&self, inst: usize, job: &Job) -> Object {
        let i = &self.instances[inst];
        let mut c = Object::new();
        c.insert(
            "github",
            contexts::github(&self.cfg.facts, &i.workflow.name, &job.id),
        );
        c.insert("needs", self.needs_context(inst, job));
        c.insert("vars", Value::Object(self.cfg.vars.clone()));
        c.insert("inputs", Value::Object(i.inputs.clone()));
        c.insert("secrets", Value::Object(i.secrets.clone()));
        c.insert("runner", contexts::runner());
        c.insert("env", Value::Object(Object::new()));
        c
    }

    fn done_job(&mut self, inst: usize, job: &str, c: Conclusion, error: Option<String>) {
        let report_id = format!("{}{job}", self.instances[inst].id_prefix);
        let name = format!(
            "{}{}",
            self.instances[inst].name_prefix,
            self.instances[inst].workflow.jobs[job]
                .name
                .clone()
                .unwrap_or_else(|| job.to_string())
        );
        // A job that never ran still shows in the report, as one leg.
        self.finished += 1;
        self.legs.push(LegState {
            instance: inst,
            job: job.to_string(),
            index: 0,
            total: 1,
            has_matrix: false,
            matrix: None,
            report_id,
            name,
            phase: Phase::Done,
            outcome: Some(c),
            conclusion: Some(c),
            outputs: Object::new(),
            kind: LegKind::Steps {
                base: String::new(),
            },
            continue_on_error: false,
            timeout_minutes: 0.0,
            cancel_sent: false,
            error,
            finished_order: self.finished,
        });
        let id = self.legs.len() - 1;
        let s = &mut self.instances[inst].states[job];
        s.legs.push(id);
        s.phase = Phase::Running;
    }

    /// A job whose needs are done: `if:`, matrix, legs.
    fn start_job(&mut self, inst: usize, job_id: &str) {
        let job = self.instances[inst].workflow.jobs[job_id].clone();
        let ctx = self.job_contexts(inst, &job);
        let status = self.job_status(inst, job_id);
        let env = EvalEnv {
            contexts: &ctx,
            status,
            hash_files: None,
        };
        let cond = job.condition.as_deref().unwrap_or("");
        match expr::condition(cond, &env) {
            Ok(true) => {}
            Ok(false) => {
                let c = if self.cancelled {
                    Conclusion::Cancelled
                } else {
                    Conclusion::Skipped
                };
                return self.done_job(inst, job_id, c, None);
            }
            Err(e) => {
                return self.done_job(
                    inst,
                    job_id,
                    Conclusion::Failure,
                    Some(format!("`if:` of job `{job_id}`: {e}")),
                )
            }
        }
        let legs = match self.expand(&job, &env) {
            Ok(l) => l,
            Err(e) => return self.done_job(inst, job_id, Conclusion::Failure, Some(e)),
        };
        if legs.is_empty() {
            self.notices.push(format!(
                "job `{job_id}`: the matrix has no legs (after exclude and --matrix), so it is skipped"
            ));
            return self.done_job(inst, job_id, Conclusion::Skipped, None);
        }
        let (fail_fast, max_parallel) = match &job.strategy {
            None => (true, usize::MAX),
            Some(s) => {
                let ff = template_bool(&s.fail_fast, &env).unwrap_or(true);
                let mp = s
                    .max_parallel
                    .as_ref()
                    .and_then(|m| template_number(m, &env).ok().flatten())
                    .filter(|n| *n >= 1.0)
                    .map(|n| n as usize)
                    .unwrap_or(usize::MAX);
                (ff, mp)
            }
        };
        {
            let s = &mut self.instances[inst].states[job_id];
            s.fail_fast = fail_fast;
            s.max_parallel = max_parallel;
            s.phase = Phase::Running;
        }
        let total = legs.len();
        let has_matrix = job.strategy.is_some();
        for (index, values) in legs.into_iter().enumerate() {
            self.add_leg(
                inst,
                &job,
                &ctx,
                status,
                index,
                total,
                has_matrix,
                values,
                fail_fast,
                max_parallel,
            );
        }
    }

    /// The job's legs: its matrix evaluated and expanded, `--matrix` applied; one leg
    /// without a matrix.
    fn expand(&self, job: &Job, env: &EvalEnv) -> Result<Vec<Option<matrix::Leg>>, String> {
        let Some(strategy) = &job.strategy else {
            return Ok(vec![None]);
        };
        let m = evaluate_deep(&strategy.matrix, env)
            .map_err(|e| format!("`strategy.matrix` of job `{}`: {e}", job.id))?;
        let legs = matrix::expand(&m).map_err(|e| format!("job `{}`: {e}", job.id))?;
        let legs = matrix::filter(legs, &self.cfg.matrix_filter);
        Ok(legs.into_iter().map(Some).collect())
    }

    #[allow(clippy::too_many_arguments)]
    fn add_leg(
        &mut self,
        inst: usize,
        job: &Job,
        job_ctx: &Object,
        status: Status,
        index: usize,
        total: usize,
        has_matrix: bool,
        leg: Option<matrix::Leg>,
        fail_fast: bool,
        max_parallel: usize,
    ) {
        let matrix = leg.as_ref().map(|l| l.values.clone());
        let mut ctx = job_ctx.clone();
        ctx.insert("matrix", Value::Object(matrix.clone().unwrap_or_default()));
        let mut strategy = Object::new();
        strategy.insert("fail-fast", Value::Bool(fail_fast));
        strategy.insert("job-index", Value::Number(index as f64));
        strategy.insert("job-total", Value::Number(total as f64));
        strategy.insert(
            "max-parallel",
            Value::Number(if max_parallel == usize::MAX {
                total as f64
            } else {
                max_parallel as f64
            }),
        );
        ctx.insert("strategy", Value::Object(strategy));
        let env = EvalEnv {
            contexts: &ctx,
            status,
            hash_files: None,
        };
        let i = &self.instances[inst];
        let base_name = match &job.name {
            Some(n) if expr::has_expression(n) => {
                expr::interpolate_to_string(n, &env).unwrap_or_else(|_| n.clone())
            }
            Some(n) => match &leg {
                Some(l) => matrix::leg_name(n, l),
                None => n.clone(),
            },
            None => match &leg {
                Some(l) => matrix::leg_name(&job.id, l),
                None => job.id.clone(),
            },
        };
        let name = format!("{}{base_name}", i.name_prefix);
        let report_id = format!("{}{}", i.id_prefix, job.id);
        let mut error = None;
        let continue_on_error = template_bool(&job.continue_on_error, &env).unwrap_or_else(|e| {
            error = Some(format!("`continue-on-error` of job `{}`: {e}", job.id));
            false
        });
        let timeout_minutes = match &job.timeout_minutes {
            None => DEFAULT_JOB_TIMEOUT_MINUTES,
            Some(t) => template_number(t, &env)
                .ok()
                .flatten()
                .filter(|n| *n > 0.0)
                .unwrap_or(DEFAULT_JOB_TIMEOUT_MINUTES),
        };
        let mut phase = Phase::Waiting;
        let mut outcome = None;
        let kind = match &job.kind {
            JobKind::Call(_) => LegKind::Call { child: None },
            JobKind::Steps(steps) => match self.base_for(&steps.runs_on, &env) {
                Ok(Some(base)) => LegKind::Steps { base },
                Ok(None) => {
                    self.notices.push(format!(
                        "{name}: no base for `runs-on: {}`: skipped (map the label with -P LABEL=BASE)",
                        steps.runs_on.to_json()
                    ));
                    phase = Phase::Done;
                    outcome = Some(Conclusion::Skipped);
                    LegKind::Steps {
                        base: String::new(),
                    }
                }
                Err(e) => {
                    phase = Phase::Done;
                    outcome = Some(Conclusion::Failure);
                    error = Some(e);
                    LegKind::Steps {
                        base: String::new(),
                    }
                }
            },
        };
        if error.is_some() && phase != Phase::Done {
            phase = Phase::Done;
            outcome = Some(Conclusion::Failure);
        }
        let finished_order = if phase == Phase::Done {
            self.finished += 1;
            self.finished
        } else {
            0
        };
        self.legs.push(LegState {
            instance: inst,
            job: job.id.clone(),
            index,
            total,
            has_matrix,
            matrix,
            report_id,
            name,
            phase,
            outcome,
            conclusion: outcome,
            outputs: Object::new(),
            kind,
            continue_on_error,
            timeout_minutes,
            cancel_sent: false,
            error,
            finished_order,
        });
        let id = self.legs.len() - 1;
        self.instances[inst].states[&job.id].legs.push(id);
        if phase == Phase::Waiting {
            self.waiting.push(id);
        }
    }

    /// The base a `runs-on:` maps to: the first label `-P` maps, else the first label
    /// udos runs by default; `None` when no label maps.
    fn base_for(&self, runs_on: &Value, env: &EvalEnv) -> Result<Option<String>, String> {
        let evaluated = evaluate_deep(runs_on, env).map_err(|e| format!("`runs-on`: {e}"))?;
        let labels: Vec<String> = match &evaluated {
            Value::Array(a) => a.iter().map(|v| v.to_string()).collect(),
            Value::Object(o) => match o.get("labels") {
                Some(Value::Array(a)) => a.iter().map(|v| v.to_string()).collect(),
                Some(v) => vec![v.to_string()],
                None => Vec::new(),
            },
            v => vec![v.to_string()],
        };
        for label in &labels {
            if let Some((_, base)) = self
                .cfg
                .platforms
                .iter()
                .find(|(l, _)| l.eq_ignore_ascii_case(label))
            {
                return Ok(Some(base.clone()));
            }
        }
        Ok(labels
            .iter()
            .any(|l| default_label(l))
            .then(|| DEFAULT_BASE.to_string()))
    }

    /// Starts queued legs: steps legs within `--jobs` and the job's `max-parallel`;
    /// reusable workflow calls become nested instances at once.
    fn start_legs(&mut self) -> Vec<Action> {
        let mut actions = Vec::new();
        let mut still = Vec::with_capacity(self.waiting.len());
        for id in std::mem::take(&mut self.waiting) {
            if self.legs[id].phase != Phase::Waiting {
                continue;
            }
            let (inst, job) = (self.legs[id].instance, self.legs[id].job.clone());
            let is_steps = matches!(self.legs[id].kind, LegKind::Steps { .. });
            let state = &self.instances[inst].states[&job];
            if state.running >= state.max_parallel
                || (is_steps && self.running >= self.cfg.max_running)
            {
                still.push(id);
                continue;
            }
            self.instances[inst].states[&job].running += 1;
            match self.legs[id].kind.clone() {
                LegKind::Steps { base } => {
                    let ticket = self.ticket(id, base);
                    self.legs[id].phase = Phase::Running;
                    self.running += 1;
                    actions.push(Action::Start(Box::new(ticket)));
                }
                LegKind::Call { .. } => self.start_call(id),
            }
        }
        // Calls may have queued new legs meanwhile; keep creation order.
        still.append(&mut self.waiting);
        self.waiting = still;
        actions
    }

    fn leg_contexts(&self, id: LegId) -> Object {
        let leg = &self.legs[id];
        let i = &self.instances[leg.instance];
        let job = &i.workflow.jobs[&leg.job];
        let mut ctx = self.job_contexts(leg.instance, job);
        ctx.insert(
            "matrix",
            Value::Object(leg.matrix.clone().unwrap_or_default()),
        );
        let state = &i.states[&leg.job];
        let mut strategy = Object::new();
        strategy.insert("fail-fast", Value::Bool(state.fail_fast));
        strategy.insert("job-index", Value::Number(leg.index as f64));
        strategy.insert("job-total", Value::Number(leg.total as f64));
        strategy.insert(
            "max-parallel",
            Value::Number(state.max_parallel.min(leg.total) as f64),
        );
        ctx.insert("strategy", Value::Object(strategy));
        let mut j = Object::new();
        j.insert("status", Value::str("success"));
        ctx.insert("job", Value::Object(j));
        ctx
    }

    fn ticket(&self, id: LegId, base: String) -> LegTicket {
        let leg = &self.legs[id];
        let i = &self.instances[leg.instance];
        let JobKind::Steps(steps) = &i.workflow.jobs[&leg.job].kind else {
            unreachable!("a steps leg belongs to a steps job")
        };
        LegTicket {
            id,
            report_id: leg.report_id.clone(),
            name: leg.name.clone(),
            job_id: leg.job.clone(),
            workflow_name: i.workflow.name.clone(),
            workflow_file: i.workflow.file.clone(),
            job: steps.clone(),
            workflow_env: i.workflow.env.clone(),
            workflow_defaults: i.workflow.defaults.clone(),
            env_file: self.cfg.env.clone(),
            contexts: self.leg_contexts(id),
            base,
            timeout_minutes: leg.timeout_minutes,
            event_name: self.cfg.facts.event_name.clone(),
            github_env: contexts::github_env(&self.cfg.facts, &i.workflow.name, &leg.job),
        }
    }

    /// A reusable workflow call: its inputs and secrets evaluated, the callee's jobs
    /// made a nested instance.
    fn start_call(&mut self, id: LegId) {
        let leg = self.legs[id].clone();
        let i = &self.instances[leg.instance];
        let JobKind::Call(call) = &i.workflow.jobs[&leg.job].kind else {
            unreachable!("a call leg belongs to a call job")
        };
        let fail = |run: &mut Run, e: String| {
            run.legs[id].phase = Phase::Running;
            run.leg_finished(
                id,
                LegResult {
                    outcome: Conclusion::Failure,
                    outputs: Object::new(),
                    error: Some(e),
                },
            );
        };
        if i.depth + 1 >= MAX_CALL_DEPTH {
            return fail(
                self,
                format!(
                    "`{}`: reusable workflows nest deeper than {MAX_CALL_DEPTH} levels",
                    call.uses
                ),
            );
        }
        let Some(callee) = self.set.called.get(&local_key(&call.uses)).cloned() else {
            return fail(
                self,
                format!(
                    "the reusable workflow `{}` is not in the repository",
                    call.uses
                ),
            );
        };
        let ctx = self.leg_contexts(id);
        let env = EvalEnv {
            contexts: &ctx,
            status: Status {
                success: true,
                failure: false,
                cancelled: self.cancelled,
            },
            hash_files: None,
        };
        let mut given = IndexMap::new();
        for (k, v) in &call.with {
            match evaluate_deep(v, &env) {
                Ok(v) => {
                    given.insert(k.clone(), v);
                }
                Err(e) => return fail(self, format!("`with.{k}`: {e}")),
            }
        }
        let inputs = match triggers(&callee) {
            Ok(t) => match t.call() {
                Some(spec) => match event::resolve_inputs(&spec.inputs, &given) {
                    Ok(o) => o,
                    Err(e) => return fail(self, format!("`{}`: {e}", call.uses)),
                },
                None => {
                    return fail(
                        self,
                        format!(
                            "`{}` has no `on: workflow_call`, so it cannot be called",
                            call.uses
                        ),
                    )
                }
            },
            Err(e) => return fail(self, e.to_string()),
        };
        let secrets = match &call.secrets {
            CallSecrets::None => Object::new(),
            CallSecrets::Inherit => i.secrets.clone(),
            CallSecrets::Map(m) => {
                let mut o = Object::new();
                for (k, t) in m {
                    match expr::interpolate_to_string(t, &env) {
                        Ok(v) => o.insert(k.clone(), Value::String(v)),
                        Err(e) => return fail(self, format!("`secrets.{k}`: {e}")),
                    }
                }
                o
            }
        };
        let (depth, id_prefix, name_prefix) = (
            i.depth + 1,
            format!("{}/", leg.report_id),
            format!("{} / ", leg.name),
        );
        let jobs: Vec<String> = callee.jobs.keys().cloned().collect();
        let child = self.add_instance(
            callee,
            jobs,
            inputs,
            secrets,
            Some(id),
            depth,
            &id_prefix,
            &name_prefix,
        );
        self.legs[id].kind = LegKind::Call { child: Some(child) };
        self.legs[id].phase = Phase::Running;
        if self.legs[id].cancel_sent || self.cancelled {
            self.cancel_leg(id);
        }
    }

    /// Call legs whose nested workflow has finished: conclusion and outputs.
    fn finish_calls(&mut self) -> bool {
        let mut changed = false;
        for id in 0..self.legs.len() {
            let LegKind::Call { child: Some(child) } = self.legs[id].kind else {
                continue;
            };
            if self.legs[id].phase != Phase::Running {
                continue;
            }
            let c = &self.instances[child];
            if !c.states.values().all(|s| s.phase == Phase::Done) {
                continue;
            }
            let results: Vec<Conclusion> = c.states.values().filter_map(|s| s.conclusion).collect();
            let outcome = aggregate(&results);
            let (outputs, error) = self.call_outputs(child);
            self.leg_finished(
                id,
                LegResult {
                    outcome: if error.is_some() {
                        Conclusion::Failure
                    } else {
                        outcome
                    },
                    outputs,
                    error,
                },
            );
            changed = true;
        }
        changed
    }

    /// The outputs of a finished reusable workflow: its `on.workflow_call.outputs`
    /// evaluated with the `jobs` context.
    fn call_outputs(&self, child: usize) -> (Object, Option<String>) {
        let c = &self.instances[child];
        let mut jobs = Object::new();
        for (id, s) in &c.states {
            let mut e = Object::new();
            e.insert("result", Value::str(status_of(s.conclusion)));
            e.insert("outputs", Value::Object(s.outputs.clone()));
            jobs.insert(id.clone(), Value::Object(e));
        }
        let mut ctx = Object::new();
        ctx.insert(
            "github",
            contexts::github(&self.cfg.facts, &c.workflow.name, ""),
        );
        ctx.insert("jobs", Value::Object(jobs));
        ctx.insert("inputs", Value::Object(c.inputs.clone()));
        ctx.insert("vars", Value::Object(self.cfg.vars.clone()));
        let env = EvalEnv {
            contexts: &ctx,
            status: Status {
                success: true,
                failure: false,
                cancelled: false,
            },
            hash_files: None,
        };
        let mut out = Object::new();
        let Ok(t) = triggers(&c.workflow) else {
            return (out, None);
        };
        if let Some(spec) = t.call() {
            for (name, output) in &spec.outputs {
                match expr::interpolate_to_string(&output.value, &env) {
                    Ok(v) => out.insert(name.clone(), Value::String(v)),
                    Err(e) => return (out, Some(format!("output `{name}`: {e}"))),
                }
            }
        }
        (out, None)
    }

    /// Running jobs whose legs have all ended: outcome, conclusion, outputs (later
    /// legs' non-empty values win, as on GitHub).
    fn finish_jobs(&mut self) -> bool {
        let mut changed = false;
        for inst in 0..self.instances.len() {
            for job in self.instances[inst].jobs.clone() {
                let s = &self.instances[inst].states[&job];
                if s.phase != Phase::Running
                    || !s.legs.iter().all(|l| self.legs[*l].phase == Phase::Done)
                {
                    continue;
                }
                let mut legs: Vec<&LegState> = s.legs.iter().map(|l| &self.legs[*l]).collect();
                let outcomes: Vec<Conclusion> = legs.iter().filter_map(|l| l.outcome).collect();
                let conclusions: Vec<Conclusion> =
                    legs.iter().filter_map(|l| l.conclusion).collect();
                legs.sort_by_key(|l| l.finished_order);
                let mut outputs = Object::new();
                for l in &legs {
                    for (k, v) in &l.outputs {
                        if !v.to_string().is_empty() || outputs.get(k).is_none() {
                            outputs.insert(k.clone(), v.clone());
                        }
                    }
                }
                let s = &mut self.instances[inst].states[&job];
                s.outcome = Some(aggregate(&outcomes));
                s.conclusion = Some(aggregate(&conclusions));
                s.outputs = outputs;
                s.phase = Phase::Done;
                changed = true;
            }
        }
        changed
    }
}

/// One result for many: failure beats cancelled beats success; all skipped is skipped.
fn aggregate(cs: &[Conclusion]) -> Conclusion {
    if cs.contains(&Conclusion::Failure) {
        Conclusion::Failure
    } else if cs.contains(&Conclusion::Cancelled) {
        Conclusion::Cancelled
    } else if !cs.is_empty() && cs.iter().all(|c| *c == Conclusion::Skipped) {
        Conclusion::Skipped
    } else {
        Conclusion::Success
    }
}

#[cfg(test)]
mod tests;
