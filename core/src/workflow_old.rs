//! The parts of a GitHub Actions workflow file udos needs, parsed without losing the rest.
//!
//! Steps keep their original YAML mapping so that the step handed to act in the VM is
//! exactly what the user wrote; udos only reads the keys it must (`id`, `name`, `if`,
//! `run`, `uses`, `continue-on-error`).

use serde_yaml_ng::{Mapping, Value};

use crate::CoreError;

/// A parsed workflow file.
#[derive(Debug, Clone)]
pub struct Workflow {
    /// `name:`, or the file name the caller passed.
    pub name: String,
    /// Workflow-level `env:`.
    pub env: Mapping,
    /// Workflow-level `defaults:`.
    pub defaults: Option<Value>,
    /// Jobs in file order.
    pub jobs: Vec<Job>,
}

/// One job of a workflow.
#[derive(Debug, Clone)]
pub struct Job {
    /// The key under `jobs:`.
    pub id: String,
    /// `name:`, else the id.
    pub name: String,
    /// `runs-on:` labels (a string or a list).
    pub runs_on: Vec<String>,
    /// Job-level `env:`.
    pub env: Mapping,
    /// Job-level `defaults:`.
    pub defaults: Option<Value>,
    /// The steps, in order.
    pub steps: Vec<Step>,
}

/// One step of a job.
#[derive(Debug, Clone)]
pub struct Step {
    /// 1-based position in the job.
    pub number: usize,
    /// `id:`, if the user gave one.
    pub id: Option<String>,
    /// What to call the step on screen: `name:`, else the first line of `run:`, else `uses:`.
    pub display_name: String,
    /// `if:` as written (with or without `${{ }}`).
    pub condition: Option<String>,
    /// `continue-on-error: true`.
    pub continue_on_error: bool,
    /// The step exactly as written.
    pub raw: Mapping,
}

impl Step {
    /// The id act will report this step under inside the VM: the user's id, else a
    /// fixed synthetic one.
    pub fn act_id(&self) -> &str {
        self.id.as_deref().unwrap_or(crate::synth::USER_STEP_ID)
    }

    /// Does `sel` (a 1-based number or an id) name this step?
    pub fn matches(&self, sel: &str) -> bool {
        sel.parse::<usize>().ok() == Some(self.number) || self.id.as_deref() == Some(sel)
    }
}

fn str_key(key: &str) -> Value {
    Value::String(key.to_string())
}

fn get<'a>(map: &'a Mapping, key: &str) -> Option<&'a Value> {
    map.get(str_key(key))
}

fn as_mapping(value: Option<&Value>, what: &str) -> Result<Mapping, CoreError> {
    match value {
        None | Some(Value::Null) => Ok(Mapping::new()),
        Some(Value::Mapping(m)) => Ok(m.clone()),
        Some(_) => Err(CoreError::Invalid(format!("{what} must be a mapping"))),
    }
}

fn scalar_string(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Bool(b) => Some(b.to_string()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

/// Parse a workflow file's text. `fallback_name` names the workflow when it has no `name:`.
pub fn parse(text: &str, fallback_name: &str) -> Result<Workflow, CoreError> {
    let doc: Value = serde_yaml_ng::from_str(text).map_err(|e| CoreError::Yaml(e.to_string()))?;
    let Value::Mapping(top) = doc else {
        return Err(CoreError::Invalid(
            "a workflow file must be a YAML mapping with a `jobs:` key".into(),
        ));
    };
    let name = get(&top, "name")
        .and_then(scalar_string)
        .unwrap_or_else(|| fallback_name.to_string());
    let env = as_mapping(get(&top, "env"), "workflow `env:`")?;
    let defaults = get(&top, "defaults").cloned();
    let jobs_map = match get(&top, "jobs") {
        Some(Value::Mapping(m)) if !m.is_empty() => m,
        Some(Value::Mapping(_)) => return Err(CoreError::Invalid("`jobs:` is empty".into())),
        Some(_) => return Err(CoreError::Invalid("`jobs:` must be a mapping".into())),
        None => return Err(CoreError::Invalid("the workflow has no `jobs:`".into())),
    };
    let mut jobs = Vec::with_capacity(jobs_map.len());
    for (key, value) in jobs_map {
        let id = scalar_string(key)
            .ok_or_else(|| CoreError::Invalid("a job key must be a string".into()))?;
        jobs.push(parse_job(&id, value)?);
    }
    Ok(Workflow {
        name,
        env,
        defaults,
        jobs,
    })
}

fn parse_job(id: &str, value: &Value) -> Result<Job, CoreError> {
    let ctx = |msg: &str| CoreError::Invalid(format!("job `{id}`: {msg}"));
    let Value::Mapping(map) = value else {
        return Err(ctx("must be a mapping"));
    };
    if get(map, "uses").is_some() {
        return Err(ctx(
            "reusable workflows (`uses:` on a job) are not supported yet",
        ));
    }
    for unsupported in ["strategy", "container", "services"] {
        if get(map, unsupported).is_some() {
            return Err(ctx(&format!("`{unsupported}:` is not supported yet")));
        }
    }
    let runs_on = match get(map, "runs-on") {
        Some(Value::Sequence(seq)) => seq.iter().filter_map(scalar_string).collect(),
        Some(v) => scalar_string(v).into_iter().collect(),
        None => return Err(ctx("has no `runs-on:`")),
    };
    let steps_value = match get(map, "steps") {
        Some(Value::Sequence(seq)) if !seq.is_empty() => seq,
        Some(Value::Sequence(_)) => return Err(ctx("`steps:` is empty")),
        Some(_) => return Err(ctx("`steps:` must be a list")),
        None => return Err(ctx("has no `steps:`")),
    };
    let mut steps = Vec::with_capacity(steps_value.len());
    for (i, v) in steps_value.iter().enumerate() {
        steps.push(parse_step(id, i + 1, v)?);
    }
    let mut seen = std::collections::BTreeSet::new();
    for step in &steps {
        if let Some(sid) = &step.id {
            if !seen.insert(sid.clone()) {
                return Err(ctx(&format!("two steps have the id `{sid}`")));
            }
        }
    }
    Ok(Job {
        id: id.to_string(),
        name: get(map, "name")
            .and_then(scalar_string)
            .unwrap_or_else(|| id.to_string()),
        runs_on,
        env: as_mapping(get(map, "env"), &format!("job `{id}` `env:`"))?,
        defaults: get(map, "defaults").cloned(),
        steps,
    })
}

fn parse_step(job: &str, number: usize, value: &Value) -> Result<Step, CoreError> {
    let ctx = |msg: &str| CoreError::Invalid(format!("job `{job}`, step {number}: {msg}"));
    let Value::Mapping(map) = value else {
        return Err(ctx("must be a mapping"));
    };
    let run = get(map, "run").and_then(scalar_string);
    let uses = get(map, "uses").and_then(scalar_string);
    if run.is_some() == uses.is_some() {
        return Err(ctx("needs exactly one of `run:` or `uses:`"));
    }
    let id = get(map, "id").and_then(scalar_string);
    if let Some(id) = &id {
        let ok = id
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
            && id
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
        if !ok || id.starts_with("udos-") {
            return Err(ctx(&format!(
                "step id `{id}` must start with a letter or `_`, contain only letters, digits, `-`, `_`, and not start with `udos-`"
            )));
        }
    }
    let display_name = get(map, "name")
        .and_then(scalar_string)
        .or_else(|| {
            run.as_deref()
                .and_then(|r| r.lines().find(|l| !l.trim().is_empty()))
                .map(|l| format!("Run {}", l.trim()))
        })
        .or_else(|| uses.as_ref().map(|u| format!("Run {u}")))
        .unwrap_or_else(|| format!("step {number}"));
    let continue_on_error = matches!(get(map, "continue-on-error"), Some(Value::Bool(true)));
    Ok(Step {
        number,
        id,
        display_name,
        condition: get(map, "if").and_then(scalar_string),
        continue_on_error,
        raw: map.clone(),
    })
}

impl Workflow {
    /// The job to run: the one named, or the only one.
    pub fn select_job(&self, name: Option<&str>) -> Result<&Job, CoreError> {
        match name {
            Some(n) => self.jobs.iter().find(|j| j.id == n).ok_or_else(|| {
                CoreError::Invalid(format!(
                    "no job `{n}` in the workflow (jobs: {})",
                    self.job_ids()
                ))
            }),
            None if self.jobs.len() == 1 => Ok(&self.jobs[0]),
            None => Err(CoreError::Invalid(format!(
                "the workflow has several jobs ({}): pick one with -j JOB",
                self.job_ids()
            ))),
        }
    }

    fn job_ids(&self) -> String {
        self.jobs
            .iter()
            .map(|j| j.id.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const WF: &str = r#"
name: demo
env: { A: "1" }
jobs:
  build:
    runs-on: ubuntu-latest
    steps:
      - name: first
        run: echo hi
      - id: second
        run: |
          echo a
          echo b
      - uses: actions/checkout@v4
        if: always()
        continue-on-error: true
"#;

    #[test]
    fn parses_jobs_and_steps_in_order() {
        let wf = parse(WF, "f.yml").unwrap();
        assert_eq!(wf.name, "demo");
        let job = wf.select_job(None).unwrap();
        assert_eq!(job.runs_on, vec!["ubuntu-latest"]);
        assert_eq!(job.steps.len(), 3);
        assert_eq!(job.steps[0].display_name, "first");
        assert_eq!(job.steps[1].display_name, "Run echo a");
        assert_eq!(job.steps[1].id.as_deref(), Some("second"));
        assert_eq!(job.steps[2].display_name, "Run actions/checkout@v4");
        assert_eq!(job.steps[2].condition.as_deref(), Some("always()"));
        assert!(job.steps[2].continue_on_error);
        assert!(job.steps[1].matches("2") && job.steps[1].matches("second"));
        assert!(!job.steps[1].matches("1"));
    }

    #[test]
    fn rejects_malformed_files_with_a_reason() {
        for (text, needle) in [
            ("jobs: [", "YAML"),
            ("- a\n- b\n", "mapping"),
            ("name: x\n", "no `jobs:`"),
            ("jobs:\n  a:\n    steps: [{run: x}]\n", "runs-on"),
            ("jobs:\n  a:\n    runs-on: x\n    steps: [{name: x}]\n", "exactly one"),
            (
                "jobs:\n  a:\n    runs-on: x\n    steps: [{run: x, id: s}, {run: y, id: s}]\n",
                "two steps",
            ),
            (
                "jobs:\n  a:\n    runs-on: x\n    strategy: {matrix: {a: [1]}}\n    steps: [{run: x}]\n",
                "strategy",
            ),
        ] {
            let err = parse(text, "f").unwrap_err().to_string();
            assert!(err.contains(needle), "{text:?}: {err}");
        }
    }

    #[test]
    fn several_jobs_need_a_choice() {
        let wf = parse(
            "jobs:\n  a: {runs-on: x, steps: [{run: x}]}\n  b: {runs-on: x, steps: [{run: y}]}\n",
            "f",
        )
        .unwrap();
        assert!(wf.select_job(None).unwrap_err().to_string().contains("-j"));
        assert_eq!(wf.select_job(Some("b")).unwrap().id, "b");
        assert!(wf.select_job(Some("c")).is_err());
    }
}
