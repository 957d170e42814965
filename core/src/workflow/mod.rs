//! A GitHub Actions workflow file, parsed into types.
//!
//! Every mapping is walked against its row of the support table ([`support`]): each
//! key is either implemented, accepted and reported as ignored, or refused with a
//! message naming the key and where it is. Nothing is dropped silently.
//!
//! Values stay as written where GitHub evaluates them later: templates (strings that
//! may hold `${{ }}`) are kept as text, YAML values (`env:`, `with:`, a matrix) as
//! [`Value`]s; the engine evaluates them when their contexts exist. `uses:` strings are
//! classified with the `github-actions-models` crate. That crate's typed workflow model
//! is not used for the rest: it ignores unknown keys and drops input defaults, both of
//! which udos must see.

pub mod action;
pub mod support;

use indexmap::IndexMap;
use serde_yaml_ng::{Mapping, Value as Yaml};

use crate::value::Value;
use support::Support;

/// Why a workflow file cannot be used. `at` says where (`jobs.build.steps[2]`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WorkflowError {
    /// The file is not YAML.
    #[error("{file}: not valid YAML: {message}")]
    Yaml {
        /// The workflow file.
        file: String,
        /// The parser's message (with line and column).
        message: String,
    },
    /// The YAML is not a workflow udos can run.
    #[error("{file}: {at}: {message}")]
    Invalid {
        /// The workflow file.
        file: String,
        /// Where in the file.
        at: String,
        /// What is wrong.
        message: String,
    },
}

/// `env:`, `with:` and friends: names to values as written (templates are strings).
pub type Env = IndexMap<String, Value>;

/// A parsed workflow file.
#[derive(Debug, Clone, PartialEq)]
pub struct Workflow {
    /// The file, as the user named it (or relative to the repository).
    pub file: String,
    /// `name:`, else the file path (GitHub shows the path).
    pub name: String,
    /// `run-name:` (a template).
    pub run_name: Option<String>,
    /// `on:` as written; [`crate::event`] reads it.
    pub on: Yaml,
    /// Workflow-level `env:`.
    pub env: Env,
    /// Workflow-level `defaults.run`.
    pub defaults: RunDefaults,
    /// The jobs, in file order.
    pub jobs: IndexMap<String, Job>,
    /// Keys that were accepted but have no effect, each with why (shown once per run).
    pub ignored: Vec<String>,
}

/// `defaults.run`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RunDefaults {
    /// `shell:` (a template).
    pub shell: Option<String>,
    /// `working-directory:` (a template).
    pub working_directory: Option<String>,
}

/// One job.
#[derive(Debug, Clone, PartialEq)]
pub struct Job {
    /// The key under `jobs:`.
    pub id: String,
    /// `name:` (a template), if given.
    pub name: Option<String>,
    /// `needs:`, in order.
    pub needs: Vec<String>,
    /// `if:` (a template or bare expression; `true`/`false` literals as text).
    pub condition: Option<String>,
    /// `strategy:`.
    pub strategy: Option<Strategy>,
    /// `continue-on-error:`: a boolean or a template.
    pub continue_on_error: Value,
    /// `timeout-minutes:`: a number or a template.
    pub timeout_minutes: Option<Value>,
    /// What the job does.
    pub kind: JobKind,
}

/// A job runs steps, or calls a reusable workflow.
#[derive(Debug, Clone, PartialEq)]
pub enum JobKind {
    /// `runs-on:` and `steps:`.
    Steps(StepsJob),
    /// `uses: ./.github/workflows/x.yml`.
    Call(CallJob),
}

/// A job of steps.
#[derive(Debug, Clone, PartialEq)]
pub struct StepsJob {
    /// `runs-on:`: a label, a list of labels, or a template.
    pub runs_on: Value,
    /// Job-level `env:`.
    pub env: Env,
    /// Job-level `defaults.run`.
    pub defaults: RunDefaults,
    /// `outputs:`: name to template.
    pub outputs: IndexMap<String, String>,
    /// The steps, in order.
    pub steps: Vec<StepDef>,
}

/// A job that calls a reusable workflow.
#[derive(Debug, Clone, PartialEq)]
pub struct CallJob {
    /// The path of the called workflow, as written (`./.github/workflows/x.yml`).
    pub uses: String,
    /// `with:`: inputs as written.
    pub with: Env,
    /// `secrets:`.
    pub secrets: CallSecrets,
}

/// `secrets:` of a reusable workflow call.
#[derive(Debug, Clone, PartialEq)]
pub enum CallSecrets {
    /// None passed.
    None,
    /// `secrets: inherit`.
    Inherit,
    /// Name to template.
    Map(IndexMap<String, String>),
}

/// `strategy:`.
#[derive(Debug, Clone, PartialEq)]
pub struct Strategy {
    /// `matrix:` as written (an object, or a template string).
    pub matrix: Value,
    /// `fail-fast:` (default true): a boolean or a template.
    pub fail_fast: Value,
    /// `max-parallel:`: a number or a template.
    pub max_parallel: Option<Value>,
}

/// One step.
#[derive(Debug, Clone, PartialEq)]
pub struct StepDef {
    /// 1-based position in the job.
    pub number: usize,
    /// `id:`.
    pub id: Option<String>,
    /// `name:` (a template).
    pub name: Option<String>,
    /// `if:`.
    pub condition: Option<String>,
    /// Step `env:`.
    pub env: Env,
    /// `continue-on-error:`: a boolean or a template.
    pub continue_on_error: Value,
    /// `timeout-minutes:`: a number or a template.
    pub timeout_minutes: Option<Value>,
    /// `run:` or `uses:`.
    pub body: StepBody,
    /// The actions of other repositories act needs for this step: its own `uses:`
    /// (when it names one) and, in turn, those its composite actions use. The host
    /// pins them before the run (docs/actions.md); empty until then.
    pub actions: Vec<action::PinnedAction>,
}

/// What a step does.
#[derive(Debug, Clone, PartialEq)]
pub enum StepBody {
    /// A shell script.
    Run {
        /// The script (a template).
        run: String,
        /// `shell:` (a template).
        shell: Option<String>,
        /// `working-directory:` (a template).
        working_directory: Option<String>,
    },
    /// An action.
    Uses {
        /// What it uses.
        uses: StepUses,
        /// `with:` as written.
        with: Env,
    },
}

/// The kinds of `uses:` on a step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StepUses {
    /// `./path` in the repository.
    Local(String),
    /// `owner/repo[/path]@ref`.
    Remote {
        /// As written.
        raw: String,
        /// `owner/repo`.
        slug: String,
        /// After `@`.
        git_ref: String,
    },
    /// `docker://image`.
    Docker(String),
}

impl StepUses {
    /// As written.
    pub fn raw(&self) -> &str {
        match self {
            StepUses::Local(p) => p,
            StepUses::Remote { raw, .. } => raw,
            StepUses::Docker(i) => i,
        }
    }

    /// `actions/checkout@...`: udos serves the workspace itself.
    pub fn is_checkout(&self) -> bool {
        matches!(self, StepUses::Remote { slug, .. } if slug.eq_ignore_ascii_case("actions/checkout"))
    }
}

impl StepDef {
    /// What to call the step: `name:` (unevaluated), else `Run <first line>`, else
    /// `Run <uses>`, as GitHub shows it.
    pub fn display_name(&self) -> String {
        if let Some(n) = &self.name {
            return n.clone();
        }
        match &self.body {
            StepBody::Run { run, .. } => run
                .lines()
                .find(|l| !l.trim().is_empty())
                .map(|l| format!("Run {}", l.trim()))
                .unwrap_or_else(|| format!("step {}", self.number)),
            StepBody::Uses { uses, .. } => format!("Run {}", uses.raw()),
        }
    }

    /// Does `sel` (a 1-based number or an id) name this step?
    pub fn matches(&self, sel: &str) -> bool {
        sel.parse::<usize>().ok() == Some(self.number) || self.id.as_deref() == Some(sel)
    }
}

impl Workflow {
    /// The ids of the jobs, comma-separated, for messages.
    pub fn job_ids(&self) -> String {
        self.jobs.keys().cloned().collect::<Vec<_>>().join(", ")
    }
}

/// Parses a workflow file's text. `file` names it in messages and is the default name.
pub fn parse(text: &str, file: &str) -> Result<Workflow, WorkflowError> {
    let doc: Yaml = serde_yaml_ng::from_str(text).map_err(|e| WorkflowError::Yaml {
        file: file.to_string(),
        message: e.to_string(),
    })?;
    Parser { file }.workflow(&doc)
}

/// Parses, naming the file in every error.
struct Parser<'a> {
    file: &'a str,
}

fn key(k: &Yaml) -> Option<String> {
    match k {
        Yaml::String(s) => Some(s.clone()),
        Yaml::Bool(b) => Some(b.to_string()),
        Yaml::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

/// A scalar as GitHub stringifies it (`true`, `3.1`).
fn scalar(v: &Yaml) -> Option<String> {
    match v {
        Yaml::String(s) => Some(s.clone()),
        Yaml::Bool(b) => Some(b.to_string()),
        Yaml::Number(n) => Some(Value::Number(n.as_f64().unwrap_or(f64::NAN)).to_string()),
        Yaml::Tagged(t) => scalar(&t.value),
        _ => None,
    }
}

/// Is `id` a valid job or step id? GitHub: starts with a letter or `_`, then
/// letters, digits, `-`, `_`.
fn valid_id(id: &str) -> bool {
    id.chars()
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
}

impl Parser<'_> {
    fn err(&self, at: &str, message: impl Into<String>) -> WorkflowError {
        WorkflowError::Invalid {
            file: self.file.to_string(),
            at: if at.is_empty() {
                "top level".to_string()
            } else {
                at.to_string()
            },
            message: message.into(),
        }
    }

    /// Checks every key of `map` against `table`: unknown and refused keys are errors,
    /// ignored ones are noted.
    fn audit(
        &self,
        map: &Mapping,
        table: &[support::Key],
        at: &str,
        ignored: &mut Vec<String>,
    ) -> Result<(), WorkflowError> {
        for k in map.keys() {
            let Some(name) = key(k) else {
                return Err(self.err(at, "a key must be a string"));
            };
            let here = if at.is_empty() {
                format!("`{name}`")
            } else {
                format!("`{name}` in {at}")
            };
            match support::lookup(table, &name) {
                Some(Support::Supported) => {}
                Some(Support::Ignored(why)) => ignored.push(format!("{here} is ignored: {why}")),
                Some(Support::Refused(why)) => {
                    return Err(self.err(at, format!("`{name}` is not supported: {why}")))
                }
                None => {
                    let known: Vec<&str> = table.iter().map(|k| k.name).collect();
                    return Err(self.err(
                        at,
                        format!("unknown key `{name}` (known here: {})", known.join(", ")),
                    ));
                }
            }
        }
        Ok(())
    }

    fn mapping<'y>(&self, v: &'y Yaml, at: &str) -> Result<&'y Mapping, WorkflowError> {
        match v {
            Yaml::Mapping(m) => Ok(m),
            Yaml::Tagged(t) => self.mapping(&t.value, at),
            _ => Err(self.err(at, "must be a mapping")),
        }
    }

    fn string(&self, v: &Yaml, at: &str) -> Result<String, WorkflowError> {
        scalar(v).ok_or_else(|| self.err(at, "must be a string"))
    }

    fn opt_string(&self, m: &Mapping, k: &str, at: &str) -> Result<Option<String>, WorkflowError> {
        match m.get(k) {
            None | Some(Yaml::Null) => Ok(None),
            Some(v) => self.string(v, &format!("{at}.{k}")).map(Some),
        }
    }

    /// `env:`/`with:`: a mapping of scalars, or a template string (GitHub allows
    /// `env: ${{ fromJSON(...) }}`, which udos refuses: the names must be known).
    fn env(&self, m: &Mapping, k: &str, at: &str) -> Result<Env, WorkflowError> {
        let here = format!("{at}.{k}");
        match m.get(k) {
            None | Some(Yaml::Null) => Ok(Env::new()),
            Some(Yaml::Mapping(map)) => {
                let mut out = Env::new();
                for (name, value) in map {
                    let name =
                        key(name).ok_or_else(|| self.err(&here, "a name must be a string"))?;
                    let value = match value {
                        Yaml::Null => Value::str(""),
                        Yaml::Sequence(_) | Yaml::Mapping(_) => {
                            return Err(self.err(
                                &format!("{here}.{name}"),
                                "must be a string, number or boolean",
                            ))
                        }
                        v => Value::from(v),
                    };
                    out.insert(name, value);
                }
                Ok(out)
            }
            Some(_) => Err(self.err(&here, "must be a mapping of names to values")),
        }
    }

    /// A boolean-or-template key (`continue-on-error`, `fail-fast`).
    fn bool_or_template(
        &self,
        m: &Mapping,
        k: &str,
        default: bool,
        at: &str,
    ) -> Result<Value, WorkflowError> {
        match m.get(k) {
            None | Some(Yaml::Null) => Ok(Value::Bool(default)),
            Some(Yaml::Bool(b)) => Ok(Value::Bool(*b)),
            Some(Yaml::String(s)) => Ok(Value::str(s.clone())),
            Some(_) => Err(self.err(&format!("{at}.{k}"), "must be true, false or an expression")),
        }
    }

    /// A number-or-template key (`timeout-minutes`, `max-parallel`).
    fn number_or_template(
        &self,
        m: &Mapping,
        k: &str,
        at: &str,
    ) -> Result<Option<Value>, WorkflowError> {
        match m.get(k) {
            None | Some(Yaml::Null) => Ok(None),
            Some(Yaml::Number(n)) => Ok(Some(Value::Number(n.as_f64().unwrap_or(f64::NAN)))),
            Some(Yaml::String(s)) => Ok(Some(Value::str(s.clone()))),
            Some(_) => Err(self.err(&format!("{at}.{k}"), "must be a number or an expression")),
        }
    }

    fn condition(&self, m: &Mapping, at: &str) -> Result<Option<String>, WorkflowError> {
        match m.get("if") {
            None | Some(Yaml::Null) => Ok(None),
            Some(v) => self.string(v, &format!("{at}.if")).map(Some),
        }
    }

    fn defaults(
        &self,
        m: &Mapping,
        at: &str,
        ignored: &mut Vec<String>,
    ) -> Result<RunDefaults, WorkflowError> {
        let Some(d) = m.get("defaults").filter(|v| !v.is_null()) else {
            return Ok(RunDefaults::default());
        };
        let here = format!("{at}defaults");
        let d = self.mapping(d, &here)?;
        self.audit(d, support::DEFAULTS, &here, ignored)?;
        let Some(run) = d.get("run").filter(|v| !v.is_null()) else {
            return Ok(RunDefaults::default());
        };
        let here = format!("{here}.run");
        let run = self.mapping(run, &here)?;
        self.audit(run, support::DEFAULTS_RUN, &here, ignored)?;
        Ok(RunDefaults {
            shell: self.opt_string(run, "shell", &here)?,
            working_directory: self.opt_string(run, "working-directory", &here)?,
        })
    }

    fn workflow(&self, doc: &Yaml) -> Result<Workflow, WorkflowError> {
        let top = match doc {
            Yaml::Mapping(m) => m,
            _ => {
                return Err(self.err(
                    "",
                    "a workflow file must be a YAML mapping with `on:` and `jobs:`",
                ))
            }
        };
        let mut ignored = Vec::new();
        self.audit(top, support::WORKFLOW, "", &mut ignored)?;
        let on = match top.get("on") {
            Some(v) if !v.is_null() => v.clone(),
            _ => return Err(self.err("", "the workflow has no `on:` (which events run it)")),
        };
        let jobs_map = match top.get("jobs") {
            Some(Yaml::Mapping(m)) if !m.is_empty() => m,
            Some(Yaml::Mapping(_)) => return Err(self.err("jobs", "is empty")),
            Some(_) => return Err(self.err("jobs", "must be a mapping of job ids to jobs")),
            None => return Err(self.err("", "the workflow has no `jobs:`")),
        };
        let mut jobs = IndexMap::new();
        for (k, v) in jobs_map {
            let id = key(k).ok_or_else(|| self.err("jobs", "a job id must be a string"))?;
            if !valid_id(&id) {
                return Err(self.err(
                    &format!("jobs.{id}"),
                    "a job id must start with a letter or `_` and contain only letters, digits, `-` and `_`",
                ));
            }
            let job = self.job(&id, v, &mut ignored)?;
            jobs.insert(id, job);
        }
        for job in jobs.values() {
            for need in &job.needs {
                if !jobs.contains_key(need) {
                    return Err(self.err(
                        &format!("jobs.{}.needs", job.id),
                        format!(
                            "needs `{need}`, which is not a job of this workflow (jobs: {})",
                            jobs.keys().cloned().collect::<Vec<_>>().join(", ")
                        ),
                    ));
                }
            }
        }
        Ok(Workflow {
            file: self.file.to_string(),
            name: match top.get("name") {
                Some(v) if !v.is_null() => self.string(v, "name")?,
                _ => self.file.to_string(),
            },
            run_name: self.opt_string(top, "run-name", "")?,
            on,
            env: self.env(top, "env", "")?,
            defaults: self.defaults(top, "", &mut ignored)?,
            jobs,
            ignored,
        })
    }

    fn job(&self, id: &str, v: &Yaml, ignored: &mut Vec<String>) -> Result<Job, WorkflowError> {
        let at = format!("jobs.{id}");
        let m = self.mapping(v, &at)?;
        let is_call = m.contains_key("uses");
        self.audit(
            m,
            if is_call {
                support::CALL_JOB
            } else {
                support::JOB
            },
            &at,
            ignored,
        )?;
        let needs = match m.get("needs") {
            None | Some(Yaml::Null) => Vec::new(),
            Some(Yaml::Sequence(s)) => s
                .iter()
                .map(|n| self.string(n, &format!("{at}.needs")))
                .collect::<Result<_, _>>()?,
            Some(v) => vec![self.string(v, &format!("{at}.needs"))?],
        };
        let strategy = match m.get("strategy") {
            None | Some(Yaml::Null) => None,
            Some(s) => Some(self.strategy(s, &format!("{at}.strategy"), ignored)?),
        };
        let kind = if is_call {
            JobKind::Call(self.call_job(m, &at)?)
        } else {
            JobKind::Steps(self.steps_job(m, &at, ignored)?)
        };
        Ok(Job {
            id: id.to_string(),
            name: self.opt_string(m, "name", &at)?,
            needs,
            condition: self.condition(m, &at)?,
            strategy,
            continue_on_error: self.bool_or_template(m, "continue-on-error", false, &at)?,
            timeout_minutes: self.number_or_template(m, "timeout-minutes", &at)?,
            kind,
        })
    }

    fn strategy(
        &self,
        v: &Yaml,
        at: &str,
        ignored: &mut Vec<String>,
    ) -> Result<Strategy, WorkflowError> {
        let m = self.mapping(v, at)?;
        self.audit(m, support::STRATEGY, at, ignored)?;
        let matrix = match m.get("matrix") {
            None | Some(Yaml::Null) => Value::Object(Default::default()),
            Some(v @ (Yaml::Mapping(_) | Yaml::String(_))) => Value::from(v),
            Some(_) => {
                return Err(self.err(
                    &format!("{at}.matrix"),
                    "must be a mapping or an expression",
                ))
            }
        };
        Ok(Strategy {
            matrix,
            fail_fast: self.bool_or_template(m, "fail-fast", true, at)?,
            max_parallel: self.number_or_template(m, "max-parallel", at)?,
        })
    }

    fn call_job(&self, m: &Mapping, at: &str) -> Result<CallJob, WorkflowError> {
        let uses = self.string(&m["uses"], &format!("{at}.uses"))?;
        if !uses.starts_with("./") {
            return Err(self.err(
                &format!("{at}.uses"),
                format!("`{uses}`: only reusable workflows of this repository (`./.github/workflows/...`) are supported; fetching workflows from other repositories needs the network"),
            ));
        }
        let secrets = match m.get("secrets") {
            None | Some(Yaml::Null) => CallSecrets::None,
            Some(Yaml::String(s)) if s == "inherit" => CallSecrets::Inherit,
            Some(Yaml::Mapping(map)) => {
                let mut out = IndexMap::new();
                for (k, v) in map {
                    let name = key(k).ok_or_else(|| {
                        self.err(&format!("{at}.secrets"), "a name must be a string")
                    })?;
                    out.insert(
                        name.clone(),
                        self.string(v, &format!("{at}.secrets.{name}"))?,
                    );
                }
                CallSecrets::Map(out)
            }
            Some(_) => {
                return Err(self.err(
                    &format!("{at}.secrets"),
                    "must be `inherit` or a mapping of names to values",
                ))
            }
        };
        Ok(CallJob {
            uses,
            with: self.env(m, "with", at)?,
            secrets,
        })
    }

    fn steps_job(
        &self,
        m: &Mapping,
        at: &str,
        ignored: &mut Vec<String>,
    ) -> Result<StepsJob, WorkflowError> {
        let runs_on = match m.get("runs-on") {
            None | Some(Yaml::Null) => return Err(self.err(at, "has no `runs-on:`")),
            Some(Yaml::Mapping(group)) => match group.get("labels") {
                Some(labels) => Value::from(labels),
                None => {
                    return Err(self.err(
                        &format!("{at}.runs-on"),
                        "runner groups are not supported: give `labels:` (or a label)",
                    ))
                }
            },
            Some(v) => Value::from(v),
        };
        let outputs = match m.get("outputs") {
            None | Some(Yaml::Null) => IndexMap::new(),
            Some(Yaml::Mapping(map)) => {
                let mut out = IndexMap::new();
                for (k, v) in map {
                    let name = key(k).ok_or_else(|| {
                        self.err(&format!("{at}.outputs"), "a name must be a string")
                    })?;
                    out.insert(
                        name.clone(),
                        self.string(v, &format!("{at}.outputs.{name}"))?,
                    );
                }
                out
            }
            Some(_) => return Err(self.err(&format!("{at}.outputs"), "must be a mapping")),
        };
        let steps_yaml = match m.get("steps") {
            Some(Yaml::Sequence(s)) if !s.is_empty() => s,
            Some(Yaml::Sequence(_)) => return Err(self.err(&format!("{at}.steps"), "is empty")),
            Some(_) => return Err(self.err(&format!("{at}.steps"), "must be a list")),
            None => return Err(self.err(at, "has no `steps:`")),
        };
        let mut steps = Vec::with_capacity(steps_yaml.len());
        let mut seen = std::collections::BTreeSet::new();
        for (i, s) in steps_yaml.iter().enumerate() {
            let step = self.step(i + 1, s, &format!("{at}.steps[{}]", i + 1), ignored)?;
            if let Some(sid) = &step.id {
                if !seen.insert(sid.to_ascii_lowercase()) {
                    return Err(self.err(
                        &format!("{at}.steps[{}]", i + 1),
                        format!("two steps have the id `{sid}`"),
                    ));
                }
            }
            steps.push(step);
        }
        Ok(StepsJob {
            runs_on,
            env: self.env(m, "env", at)?,
            defaults: self.defaults(m, &format!("{at}."), ignored)?,
            outputs,
            steps,
        })
    }

    fn step(
        &self,
        number: usize,
        v: &Yaml,
        at: &str,
        ignored: &mut Vec<String>,
    ) -> Result<StepDef, WorkflowError> {
        let m = self.mapping(v, at)?;
        self.audit(m, support::STEP, at, ignored)?;
        let run = self.opt_string(m, "run", at)?;
        let uses = self.opt_string(m, "uses", at)?;
        let id = self.opt_string(m, "id", at)?;
        if let Some(id) = &id {
            if !valid_id(id) || id.starts_with("udos-") {
                return Err(self.err(
                    at,
                    format!("step id `{id}` must start with a letter or `_`, contain only letters, digits, `-`, `_`, and not start with `udos-`"),
                ));
            }
        }
        let body = match (run, uses) {
            (Some(run), None) => {
                if m.contains_key("with") {
                    return Err(self.err(
                        at,
                        "`with:` is for `uses:` steps; a `run:` step has no inputs",
                    ));
                }
                StepBody::Run {
                    run,
                    shell: self.opt_string(m, "shell", at)?,
                    working_directory: self.opt_string(m, "working-directory", at)?,
                }
            }
            (None, Some(uses)) => {
                for k in ["shell", "working-directory"] {
                    if m.contains_key(k) {
                        return Err(self.err(at, format!("`{k}:` is for `run:` steps")));
                    }
                }
                StepBody::Uses {
                    uses: self.uses(&uses, at)?,
                    with: self.env(m, "with", at)?,
                }
            }
            _ => return Err(self.err(at, "needs exactly one of `run:` or `uses:`")),
        };
        Ok(StepDef {
            number,
            id,
            name: self.opt_string(m, "name", at)?,
            condition: self.condition(m, at)?,
            env: self.env(m, "env", at)?,
            continue_on_error: self.bool_or_template(m, "continue-on-error", false, at)?,
            timeout_minutes: self.number_or_template(m, "timeout-minutes", at)?,
            body,
            actions: Vec::new(),
        })
    }

    fn uses(&self, raw: &str, at: &str) -> Result<StepUses, WorkflowError> {
        use github_actions_models::common::Uses;
        match Uses::parse(raw) {
            Ok(Uses::Local(_)) if raw.trim().starts_with("./") => {
                Ok(StepUses::Local(raw.trim().to_string()))
            }
            Ok(Uses::Local(_)) => Err(self.err(
                &format!("{at}.uses"),
                format!("`{raw}`: `$/` self-repository references are not supported; use `./`"),
            )),
            Ok(Uses::Docker(_)) => Ok(StepUses::Docker(raw.trim().to_string())),
            Ok(Uses::Repository(r)) => Ok(StepUses::Remote {
                raw: raw.trim().to_string(),
                slug: format!("{}/{}", r.owner(), r.repo()),
                git_ref: r.git_ref().to_string(),
            }),
            Err(e) => Err(self.err(&format!("{at}.uses"), e.to_string())),
        }
    }
}

#[cfg(test)]
mod tests;
