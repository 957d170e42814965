//! One leg's steps, as a state machine: which step comes next, what it is once every
//! expression is evaluated, and what the leg carries from step to step
//! (`$GITHUB_ENV`, `$GITHUB_PATH`, masks, `steps.<id>.*`, the job's status).
//!
//! Secret values never go into what the host writes to disk for a step: a value that
//! contains a secret (or anything `::add-mask::` registered) becomes a reference
//! `${{ secrets.UDOS_n }}` that act resolves inside the VM from values the host hands
//! over on a memory-only device ([`ResolvedStep::secrets`]).

use std::collections::BTreeMap;

use indexmap::IndexMap;

use crate::expr::{self, EvalEnv, HashFiles, Piece, Status};
use crate::value::{Object, Value};
use crate::workflow::action::PinnedAction;
use crate::workflow::{Env, StepBody, StepDef, StepUses};

use super::contexts::WORKSPACE;
use super::run::{LegResult, LegTicket};
use super::Conclusion;

/// The PATH act starts steps with inside the VM (PID 1's; docs/pid1.md). Directories
/// from `$GITHUB_PATH` go in front of it.
pub const GUEST_PATH: &str =
    "/run/udos/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
/// Prefix of the secret references the host makes up for values that hold secrets.
pub const SECRET_REF_PREFIX: &str = "UDOS_SECRET_";

/// A step with every expression evaluated: what its VM runs.
#[derive(Debug, Clone, PartialEq)]
pub struct ResolvedStep {
    /// 1-based position in the job.
    pub number: usize,
    /// The user's `id:`.
    pub id: Option<String>,
    /// Display name, evaluated.
    pub name: String,
    /// What it runs.
    pub body: ResolvedBody,
    /// Its whole environment (workflow, job, `$GITHUB_ENV`, step; `GITHUB_*`; `PATH`).
    pub env: IndexMap<String, String>,
    /// `continue-on-error`, evaluated.
    pub continue_on_error: bool,
    /// Its own `timeout-minutes`, evaluated.
    pub timeout_minutes: Option<f64>,
    /// References made up for secret-bearing values: name to value. Never written to
    /// disk by the host.
    pub secrets: BTreeMap<String, String>,
    /// Values the guest must mask in what it prints (secrets in use, add-mask values).
    pub masks: Vec<String>,
    /// The job's key.
    pub job_id: String,
    /// The leg's display name.
    pub leg_name: String,
    /// The workflow's name.
    pub workflow_name: String,
    /// The event name.
    pub event_name: String,
}

/// What a resolved step runs.
#[derive(Debug, Clone, PartialEq)]
pub enum ResolvedBody {
    /// A script.
    Run {
        /// The script, expressions substituted.
        script: String,
        /// `shell:`, if given (else act's default: bash if present, else sh).
        shell: Option<String>,
        /// Absolute working directory.
        working_directory: String,
    },
    /// An action.
    Uses {
        /// `./path` for a local action; for an action of another repository,
        /// `owner/repo[/path]@ref` as written, which the host pinned before the run
        /// (`crate::workflow::action::PinnedAction`: its tree is what the step gets).
        uses: String,
        /// Inputs, evaluated.
        with: IndexMap<String, String>,
    },
}

/// How a VM-run step ended, as the host read it from the guest's record.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct StepRun {
    /// success, failure or cancelled (a step stopped by a cancellation).
    pub outcome: Option<Conclusion>,
    /// The step's exit status, when it failed with one.
    pub exit_code: Option<i32>,
    /// `$GITHUB_OUTPUT`.
    pub outputs: IndexMap<String, String>,
    /// `$GITHUB_ENV`.
    pub env: IndexMap<String, String>,
    /// `$GITHUB_PATH`.
    pub path: Vec<String>,
    /// `::add-mask::` values.
    pub masks: Vec<String>,
    /// Why, when udos (not the step) failed it.
    pub error: Option<String>,
}

/// A step's result, for the report.
#[derive(Debug, Clone, PartialEq)]
pub struct StepSummary {
    /// 1-based position.
    pub number: usize,
    /// The user's id.
    pub id: Option<String>,
    /// Display name.
    pub name: String,
    /// `steps.<id>.outcome`.
    pub outcome: Conclusion,
    /// `steps.<id>.conclusion`.
    pub conclusion: Conclusion,
    /// Outputs.
    pub outputs: IndexMap<String, String>,
    /// Why, when the step failed before or outside its VM.
    pub error: Option<String>,
    /// A note on how udos ran it (`actions/checkout` served from the workspace).
    pub note: Option<String>,
}

/// What comes next in a leg.
#[derive(Debug, Clone, PartialEq)]
pub enum Next {
    /// Run this step in a VM, then [`Leg::record`] its result.
    Run(Box<ResolvedStep>),
    /// This step was decided without a VM (skipped by its `if:`, failed evaluating an
    /// expression, or served by udos): already recorded.
    Decided(StepSummary),
    /// The leg is over.
    Finished(LegResult),
}

/// One leg's steps.
pub struct Leg {
    ticket: LegTicket,
    next: usize,
    steps_ctx: Object,
    env: IndexMap<String, String>,
    path: Vec<String>,
    masks: Vec<String>,
    failed: bool,
    cancelled: bool,
    finished: bool,
    /// Notes for the user (outputs dropped because they held a secret).
    pub notices: Vec<String>,
}

/// The masks of a set of secret values: each value and each of its lines.
pub fn masks_of<'a>(values: impl IntoIterator<Item = &'a str>) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for v in values {
        if v.is_empty() {
            continue;
        }
        out.push(v.to_string());
        if v.contains('\n') {
            out.extend(
                v.lines()
                    .map(str::trim_end)
                    .filter(|l| !l.is_empty())
                    .map(String::from),
            );
        }
    }
    out.sort();
    out.dedup();
    out
}

/// Turns evaluated values into text that is safe to write into the step's workflow:
/// a value holding a mask becomes a secret reference; `${{` in a value is escaped so
/// act does not evaluate it again.
struct SafeText<'a> {
    masks: &'a [String],
    secrets: BTreeMap<String, String>,
}

impl SafeText<'_> {
    fn value(&mut self, v: &str) -> String {
        if self.masks.iter().any(|m| v.contains(m.as_str())) {
            let name = match self.secrets.iter().find(|(_, val)| val.as_str() == v) {
                Some((name, _)) => name.clone(),
                None => {
                    let name = format!("{SECRET_REF_PREFIX}{}", self.secrets.len());
                    self.secrets.insert(name.clone(), v.to_string());
                    name
                }
            };
            format!("${{{{ secrets.{name} }}}}")
        } else {
            escape(v)
        }
    }

    fn template(&mut self, pieces: Vec<Piece>) -> String {
        let mut out = String::new();
        for p in pieces {
            match p {
                Piece::Text(t) => out.push_str(&t),
                Piece::Expr { value, .. } => out.push_str(&self.value(&value.to_string())),
            }
        }
        out
    }
}

/// `${{` → `${{ '${{' }}`: act reads the literal back as `${{`.
pub fn escape(s: &str) -> String {
    s.replace("${{", "${{ '${{' }}")
}

impl Leg {
    /// A leg about to run its first step.
    pub fn new(ticket: LegTicket) -> Leg {
        Leg {
            ticket,
            next: 0,
            steps_ctx: Object::new(),
            env: IndexMap::new(),
            path: Vec::new(),
            masks: Vec::new(),
            failed: false,
            cancelled: false,
            finished: false,
            notices: Vec::new(),
        }
    }

    /// The ticket the leg runs.
    pub fn ticket(&self) -> &LegTicket {
        &self.ticket
    }

    /// The job is cancelled (fail-fast, Ctrl-C, or its timeout): the step running now
    /// is being stopped, and later steps run only if their `if:` asks for it
    /// (`always()`, `cancelled()`).
    pub fn cancel(&mut self) {
        self.cancelled = true;
    }

    /// Everything whose appearance in output must be masked: the leg's secret values
    /// and what `::add-mask::` registered so far.
    pub fn masks(&self) -> Vec<String> {
        let secrets = self
            .ticket
            .contexts
            .get("secrets")
            .and_then(Value::as_object);
        let mut all: Vec<String> = secrets
            .map(|s| masks_of(s.values().filter_map(Value::as_str)))
            .unwrap_or_default();
        all.extend(self.masks.iter().cloned());
        all.sort();
        all.dedup();
        all
    }

    fn status(&self) -> Status {
        Status {
            success: !self.failed && !self.cancelled,
            failure: self.failed,
            cancelled: self.cancelled,
        }
    }

    fn job_status(&self) -> &'static str {
        if self.cancelled {
            "cancelled"
        } else if self.failed {
            "failure"
        } else {
            "success"
        }
    }

    /// The contexts a step's keys see, with `env` as given.
    fn contexts(&self, env: &IndexMap<String, String>) -> Object {
        let mut c = self.ticket.contexts.clone();
        c.insert("steps", Value::Object(self.steps_ctx.clone()));
        let mut job = c
            .get("job")
            .and_then(Value::as_object)
            .cloned()
            .unwrap_or_default();
        job.insert("status", Value::str(self.job_status()));
        c.insert("job", Value::Object(job));
        c.insert(
            "env",
            Value::Object(
                env.iter()
                    .map(|(k, v)| (k.clone(), Value::str(v.clone())))
                    .collect(),
            ),
        );
        c
    }

    /// Evaluates `layer` (an `env:` as written) on top of `env`.
    fn add_env(
        &self,
        env: &mut IndexMap<String, String>,
        layer: &Env,
        what: &str,
    ) -> Result<(), String> {
        for (k, v) in layer {
            let value = match v {
                Value::String(s) => {
                    let ctx = self.contexts(env);
                    let e = EvalEnv {
                        contexts: &ctx,
                        status: self.status(),
                        hash_files: None,
                    };
                    expr::interpolate_to_string(s, &e).map_err(|e| format!("{what} `{k}`: {e}"))?
                }
                other => other.to_string(),
            };
            env.insert(k.clone(), value);
        }
        Ok(())
    }

    /// The environment below the step's own `env:`: `ACT=true` (act sets it, and
    /// workflows use `if: ${{ !env.ACT }}` to skip what cannot run locally),
    /// `--env-file`, the workflow's and the job's `env:`, then what earlier steps wrote
    /// to `$GITHUB_ENV`.
    fn base_env(&self) -> Result<IndexMap<String, String>, String> {
        let mut env = IndexMap::from([("ACT".to_string(), "true".to_string())]);
        self.add_env(&mut env, &self.ticket.env_file, "--env-file")?;
        self.add_env(&mut env, &self.ticket.workflow_env, "workflow env")?;
        self.add_env(&mut env, &self.ticket.job.env, "job env")?;
        for (k, v) in &self.env {
            env.insert(k.clone(), v.clone());
        }
        Ok(env)
    }

    /// The next step, resolved; or a step decided without a VM; or the end.
    pub fn next(&mut self, hash_files: Option<&dyn HashFiles>) -> Next {
        let Some(step) = self.ticket.job.steps.get(self.next).cloned() else {
            return Next::Finished(self.finish());
        };
        self.next += 1;
        match self.resolve(&step, hash_files) {
            Ok(Resolution::Run(r)) => Next::Run(r),
            Ok(Resolution::Skip(name)) => {
                Next::Decided(self.decide(&step, name, Conclusion::Skipped, None, None))
            }
            Ok(Resolution::Served(name, note)) => {
                Next::Decided(self.decide(&step, name, Conclusion::Success, None, Some(note)))
            }
            Err((name, e)) => {
                // An expression that cannot be evaluated fails its step, as on GitHub.
                self.failed = true;
                Next::Decided(self.decide(&step, name, Conclusion::Failure, Some(e), None))
            }
        }
    }

    fn decide(
        &mut self,
        step: &StepDef,
        name: String,
        outcome: Conclusion,
        error: Option<String>,
        note: Option<String>,
    ) -> StepSummary {
        self.set_step_ctx(step, outcome, outcome, &IndexMap::new());
        StepSummary {
            number: step.number,
            id: step.id.clone(),
            name,
            outcome,
            conclusion: outcome,
            outputs: IndexMap::new(),
            error,
            note,
        }
    }

    fn set_step_ctx(
        &mut self,
        step: &StepDef,
        outcome: Conclusion,
        conclusion: Conclusion,
        outputs: &IndexMap<String, String>,
    ) {
        let Some(id) = &step.id else { return };
        let mut o = Object::new();
        o.insert(
            "outputs",
            Value::Object(
                outputs
                    .iter()
                    .map(|(k, v)| (k.clone(), Value::str(v.clone())))
                    .collect(),
            ),
        );
        o.insert("outcome", Value::str(outcome.as_str()));
        o.insert("conclusion", Value::str(conclusion.as_str()));
        self.steps_ctx.insert(id.clone(), Value::Object(o));
    }

    fn resolve(
        &self,
        step: &StepDef,
        hash_files: Option<&dyn HashFiles>,
    ) -> Result<Resolution, (String, String)> {
        let raw_name = step.display_name();
        let base = self.base_env().map_err(|e| (raw_name.clone(), e))?;
        let ctx = self.contexts(&base);
        let e = EvalEnv {
            contexts: &ctx,
            status: self.status(),
            hash_files,
        };
        let name = match &step.name {
            Some(n) => expr::interpolate_to_string(n, &e).unwrap_or_else(|_| n.clone()),
            None => raw_name.clone(),
        };
        let fail = |what: &str, err: expr::ExprError| (name.clone(), format!("{what}: {err}"));
        let runs = expr::condition(step.condition.as_deref().unwrap_or(""), &e)
            .map_err(|err| fail("`if:`", err))?;
        if !runs {
            return Ok(Resolution::Skip(name));
        }
        let mut env = base.clone();
        self.add_env(&mut env, &step.env, "step env")
            .map_err(|err| (name.clone(), err))?;
        let ctx = self.contexts(&env);
        let e = EvalEnv {
            contexts: &ctx,
            status: self.status(),
            hash_files,
        };
        let continue_on_error = match &step.continue_on_error {
            Value::String(s) => expr::evaluate_template(s, &e)
                .map_err(|err| fail("`continue-on-error`", err))?
                .truthy(),
            v => v.truthy(),
        };
        let timeout_minutes = match &step.timeout_minutes {
            None => None,
            Some(Value::String(s)) => expr::evaluate_template(s, &e)
                .map_err(|err| fail("`timeout-minutes`", err))?
                .to_string()
                .trim()
                .parse::<f64>()
                .ok(),
            Some(Value::Number(n)) => Some(*n),
            Some(_) => None,
        };
        let masks = self.masks();
        let mut safe = SafeText {
            masks: &masks,
            secrets: BTreeMap::new(),
        };
        let body = match &step.body {
            StepBody::Run {
                run,
                shell,
                working_directory,
            } => {
                let pieces = expr::interpolate(run, &e).map_err(|err| fail("`run:`", err))?;
                let script = safe.template(pieces);
                let shell = match shell
                    .as_ref()
                    .or(self.ticket.job.defaults.shell.as_ref())
                    .or(self.ticket.workflow_defaults.shell.as_ref())
                {
                    Some(s) => Some(
                        expr::interpolate_to_string(s, &e).map_err(|err| fail("`shell:`", err))?,
                    ),
                    None => None,
                };
                let wd = match working_directory
                    .as_ref()
                    .or(self.ticket.job.defaults.working_directory.as_ref())
                    .or(self.ticket.workflow_defaults.working_directory.as_ref())
                {
                    Some(w) => expr::interpolate_to_string(w, &e)
                        .map_err(|err| fail("`working-directory:`", err))?,
                    None => String::new(),
                };
                ResolvedBody::Run {
                    script,
                    shell: shell.map(|s| safe.value(&s)),
                    working_directory: safe.value(&absolute(&wd)),
                }
            }
            StepBody::Uses { uses, with } => {
                if uses.is_checkout() {
                    return self.checkout(with, &e, name);
                }
                let act_uses = match uses {
                    StepUses::Local(path) => path.clone(),
                    StepUses::Remote { raw, .. } => {
                        // As written: act finds it through `--local-repository` at
                        // its ref (synth), and so sets `github.action_ref` to the ref
                        // as GitHub does. Its pin is in the cache key beside it.
                        match step.actions.iter().find(|a| &a.uses == raw) {
                            Some(_) => raw.clone(),
                            None => {
                                return Err((
                                    name,
                                    format!("`uses: {raw}` was not pinned before the run"),
                                ))
                            }
                        }
                    }
                    StepUses::Docker(_) => {
                        return Err((
                            name,
                            format!(
                                "`uses: {}` is not supported (checked before the run)",
                                uses.raw()
                            ),
                        ))
                    }
                };
                let mut inputs = IndexMap::new();
                for (k, v) in with {
                    let value = match v {
                        Value::String(s) => expr::interpolate_to_string(s, &e)
                            .map_err(|err| fail(&format!("`with.{k}`"), err))?,
                        other => other.to_string(),
                    };
                    inputs.insert(k.clone(), safe.value(&value));
                }
                ResolvedBody::Uses {
                    uses: act_uses,
                    with: inputs,
                }
            }
        };
        let mut full_env = self.ticket.github_env.clone();
        if !self.path.is_empty() {
            let mut p: Vec<&str> = self.path.iter().rev().map(String::as_str).collect();
            p.push(GUEST_PATH);
            full_env.insert("PATH".into(), p.join(":"));
        }
        for (k, v) in env {
            full_env.insert(k, v);
        }
        let full_env = full_env
            .into_iter()
            .map(|(k, v)| {
                let v = safe.value(&v);
                (k, v)
            })
            .collect();
        let step_masks: Vec<String> = masks
            .iter()
            .filter(|m| {
                safe.secrets.values().any(|v| v.contains(m.as_str())) || self.masks.contains(m)
            })
            .cloned()
            .collect();
        Ok(Resolution::Run(Box::new(ResolvedStep {
            number: step.number,
            id: step.id.clone(),
            name,
            body,
            env: full_env,
            continue_on_error,
            timeout_minutes,
            secrets: safe.secrets,
            masks: step_masks,
            job_id: self.ticket.job_id.clone(),
            leg_name: self.ticket.name.clone(),
            workflow_name: self.ticket.workflow_name.clone(),
            event_name: self.ticket.event_name.clone(),
        })))
    }

    /// `actions/checkout` of the workflow's own repository: the workspace is already
    /// the checkout, so udos serves it without a VM.
    fn checkout(
        &self,
        with: &Env,
        e: &EvalEnv,
        name: String,
    ) -> Result<Resolution, (String, String)> {
        let get = |k: &str| -> Result<String, (String, String)> {
            match with.get(k) {
                None => Ok(String::new()),
                Some(Value::String(s)) => expr::interpolate_to_string(s, e)
                    .map_err(|err| (name.clone(), format!("`with.{k}`: {err}"))),
                Some(v) => Ok(v.to_string()),
            }
        };
        let repo = get("repository")?;
        let own = e
            .contexts
            .get("github")
            .and_then(|g| g.get("repository"))
            .map(|v| v.to_string())
            .unwrap_or_default();
        if !repo.is_empty() && !repo.eq_ignore_ascii_case(&own) {
            return Err((
                name,
                format!("actions/checkout of another repository (`{repo}`) needs the network, which udos does not give steps yet"),
            ));
        }
        let path = get("path")?;
        if !path.trim_matches(['.', '/']).is_empty() {
            return Err((
                name,
                format!("actions/checkout with `path: {path}` is not supported: the workspace is checked out at {WORKSPACE}"),
            ));
        }
        Ok(Resolution::Served(
            name,
            format!("the workspace at {WORKSPACE} is the checkout"),
        ))
    }

    /// The actions of other repositories act needs for `step`, pinned (its own
    /// `uses:` and what its composite actions use): the host puts their trees in the
    /// step's VM, and act reads them there.
    pub fn actions(&self, step: &ResolvedStep) -> &[PinnedAction] {
        step.number
            .checked_sub(1)
            .and_then(|i| self.ticket.job.steps.get(i))
            .map(|s| s.actions.as_slice())
            .unwrap_or_default()
    }

    /// A VM-run step ended.
    pub fn record(&mut self, step: &ResolvedStep, run: StepRun) -> StepSummary {
        let outcome = run.outcome.unwrap_or(Conclusion::Failure);
        let conclusion = if outcome == Conclusion::Failure && step.continue_on_error {
            Conclusion::Success
        } else {
            outcome
        };
        if conclusion == Conclusion::Failure {
            self.failed = true;
        }
        let def = self.ticket.job.steps[step.number - 1].clone();
        self.set_step_ctx(&def, outcome, conclusion, &run.outputs);
        for (k, v) in &run.env {
            self.env.insert(k.clone(), v.clone());
        }
        self.path.extend(run.path.iter().cloned());
        for m in masks_of(run.masks.iter().map(String::as_str)) {
            if !self.masks.contains(&m) {
                self.masks.push(m);
            }
        }
        StepSummary {
            number: step.number,
            id: step.id.clone(),
            name: step.name.clone(),
            outcome,
            conclusion,
            outputs: run.outputs,
            error: run.error,
            note: None,
        }
    }

    /// The leg's end: its conclusion and the job's `outputs:` evaluated. An output
    /// that holds a secret is left out, as GitHub does.
    fn finish(&mut self) -> LegResult {
        self.finished = true;
        let outcome = if self.cancelled {
            Conclusion::Cancelled
        } else if self.failed {
            Conclusion::Failure
        } else {
            Conclusion::Success
        };
        let base = self.base_env().unwrap_or_default();
        let ctx = self.contexts(&base);
        let e = EvalEnv {
            contexts: &ctx,
            status: self.status(),
            hash_files: None,
        };
        let masks = self.masks();
        let mut outputs = Object::new();
        let mut error = None;
        for (k, t) in &self.ticket.job.outputs {
            match expr::interpolate_to_string(t, &e) {
                Ok(v) if masks.iter().any(|m| v.contains(m.as_str())) => {
                    self.notices.push(format!(
                        "{}: output `{k}` is left out: it holds a secret",
                        self.ticket.name
                    ))
                }
                Ok(v) => outputs.insert(k.clone(), Value::String(v)),
                Err(err) => error = Some(format!("output `{k}`: {err}")),
            }
        }
        LegResult {
            outcome: if error.is_some() {
                Conclusion::Failure
            } else {
                outcome
            },
            outputs,
            error,
        }
    }
}

enum Resolution {
    Run(Box<ResolvedStep>),
    Skip(String),
    Served(String, String),
}

/// A working directory relative to the workspace made absolute; empty is the
/// workspace.
fn absolute(wd: &str) -> String {
    let wd = wd.trim();
    if wd.is_empty() {
        WORKSPACE.to_string()
    } else if wd.starts_with('/') {
        wd.to_string()
    } else {
        format!("{WORKSPACE}/{}", wd.trim_start_matches("./"))
    }
}

#[cfg(test)]
mod tests;
