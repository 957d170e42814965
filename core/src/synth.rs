//! Turns "step k of job J" into the single-job workflow act runs inside the step's VM.
//!
//! act only knows whole jobs, and each udos step is a fresh act run in a fresh VM. So
//! the job state that earlier steps built up is *replayed* in front of the user's step:
//!
//! 1. `udos-env` (only when needed) writes the accumulated `$GITHUB_ENV` and
//!    `$GITHUB_PATH` lines, so `env.X` and `PATH` are as earlier steps left them;
//! 2. one `udos-replay-N` step per earlier step that ran and has an `id:` or failed: it
//!    re-emits that step's outputs and, if it failed, exits 1 (with the original's
//!    `continue-on-error`), so `steps.<id>.outputs.*`, `steps.<id>.outcome`,
//!    `success()` and `failure()` mean what they meant on GitHub;
//! 3. the user's step, unchanged except for an `id:` when it had none.
//!
//! Replays run with `if: always()` so a failure does not stop the replay itself.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_yaml_ng::{Mapping, Value};

use crate::workflow_old::{Job, Step, Workflow};

/// The id the user's step carries inside the VM when the user gave it none.
pub const USER_STEP_ID: &str = "udos-step";
/// The id of the replay step that restores `$GITHUB_ENV` / `$GITHUB_PATH`.
pub const ENV_STEP_ID: &str = "udos-env";
/// Where the stable workspace (the git working tree) is in the step's root.
pub const WORKSPACE: &str = "/workspace";
/// Where the synthesized workflow is in the step's root (control layer).
pub const STEP_WORKFLOW_PATH: &str = "/.udos/step.yml";

/// How an earlier step ended, as the host recorded it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PriorStep {
    /// The user's `id:`, if any.
    pub id: Option<String>,
    /// 1-based number in the job.
    pub number: usize,
    /// `success`, `failure` or `skipped`.
    pub outcome: String,
    /// `continue-on-error: true` on the original.
    pub continue_on_error: bool,
    /// Outputs the step set.
    pub outputs: BTreeMap<String, String>,
}

/// Accumulated `$GITHUB_ENV` / `$GITHUB_PATH` from earlier steps.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CarriedEnv {
    /// Variables set through `$GITHUB_ENV`, later ones winning.
    pub env: BTreeMap<String, String>,
    /// Directories added through `$GITHUB_PATH`, in the order they were added.
    pub path: Vec<String>,
}

impl CarriedEnv {
    /// Fold in what one step set.
    pub fn absorb(&mut self, env: &BTreeMap<String, String>, path: &[String]) {
        for (k, v) in env {
            self.env.insert(k.clone(), v.clone());
        }
        self.path.extend(path.iter().cloned());
    }
}

/// What the control layer of a step VM contains.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StepFiles {
    /// Contents of `/.actrc`: one act argument per line.
    pub actrc: String,
    /// Contents of `/.udos/step.yml`.
    pub workflow_yaml: String,
}

fn k(s: &str) -> Value {
    Value::String(s.to_string())
}

/// A heredoc delimiter that does not occur in `body`.
fn delimiter(body: &str) -> String {
    let mut n = 0u32;
    loop {
        let d = format!("UDOS_EOF_{n}");
        if !body.contains(&d) {
            return d;
        }
        n += 1;
    }
}

/// Shell that appends `name<<D\nvalue\nD` blocks (GitHub's multi-line file command
/// syntax) to the file in `$var`.
fn file_command_script(var: &str, entries: &BTreeMap<String, String>) -> String {
    let mut body = String::new();
    for (name, value) in entries {
        let d = delimiter(value);
        body.push_str(&format!("{name}<<{d}\n{value}\n{d}\n"));
    }
    let outer = delimiter(&body);
    format!("cat >> \"${var}\" <<'{outer}'\n{body}{outer}\n")
}

fn replay_step(id: &str, name: &str, script: String, fail: bool, coe: bool) -> Value {
    let mut m = Mapping::new();
    m.insert(k("id"), k(id));
    m.insert(k("name"), k(name));
    m.insert(k("if"), k("always()"));
    let mut run = script;
    if fail {
        run.push_str("exit 1\n");
    }
    m.insert(k("run"), k(&run));
    m.insert(k("shell"), k("sh"));
    if coe {
        m.insert(k("continue-on-error"), Value::Bool(true));
    }
    Value::Mapping(m)
}

/// Build the files for running `step` of `job` in a VM.
pub fn synthesize(
    workflow: &Workflow,
    job: &Job,
    step: &Step,
    prior: &[PriorStep],
    carried: &CarriedEnv,
) -> StepFiles {
    let mut steps: Vec<Value> = Vec::new();

    if !carried.env.is_empty() || !carried.path.is_empty() {
        let mut script = String::new();
        if !carried.env.is_empty() {
            script.push_str(&file_command_script("GITHUB_ENV", &carried.env));
        }
        for p in &carried.path {
            let d = delimiter(p);
            script.push_str(&format!("cat >> \"$GITHUB_PATH\" <<'{d}'\n{p}\n{d}\n"));
        }
        steps.push(replay_step(
            ENV_STEP_ID,
            "udos: restore env from earlier steps",
            script,
            false,
            false,
        ));
    }

    for p in prior {
        let failed = p.outcome == "failure";
        if p.outcome == "skipped" || (p.id.is_none() && !failed) {
            continue;
        }
        let id =
            p.id.clone()
                .unwrap_or_else(|| format!("udos-replay-{}", p.number));
        let script = if p.outputs.is_empty() {
            String::new()
        } else {
            file_command_script("GITHUB_OUTPUT", &p.outputs)
        };
        let script = if script.is_empty() {
            ":\n".to_string()
        } else {
            script
        };
        steps.push(replay_step(
            &id,
            &format!("udos: replay step {}", p.number),
            script,
            failed,
            p.continue_on_error,
        ));
    }

    let mut user = step.raw.clone();
    if step.id.is_none() {
        user.insert(k("id"), k(USER_STEP_ID));
    }
    steps.push(Value::Mapping(user));

    // The workspace is the stable /workspace, not act's per-run host executor
    // directory, so that what a step writes there is in its layer.
    let mut defaults = match &job.defaults {
        Some(Value::Mapping(m)) => m.clone(),
        _ => Mapping::new(),
    };
    let mut run_defaults = match defaults.get(k("run")) {
        Some(Value::Mapping(m)) => m.clone(),
        _ => Mapping::new(),
    };
    let wf_run_wd = matches!(&workflow.defaults, Some(Value::Mapping(m))
        if matches!(m.get(k("run")), Some(Value::Mapping(r)) if r.contains_key(k("working-directory"))));
    if !run_defaults.contains_key(k("working-directory")) && !wf_run_wd {
        run_defaults.insert(k("working-directory"), k(WORKSPACE));
    }
    defaults.insert(k("run"), Value::Mapping(run_defaults));

    let mut job_map = Mapping::new();
    job_map.insert(k("name"), k(&job.name));
    job_map.insert(k("runs-on"), k("ubuntu-latest"));
    if !job.env.is_empty() {
        job_map.insert(k("env"), Value::Mapping(job.env.clone()));
    }
    job_map.insert(k("defaults"), Value::Mapping(defaults));
    job_map.insert(k("steps"), Value::Sequence(steps));

    let mut jobs = Mapping::new();
    jobs.insert(k(&job.id), Value::Mapping(job_map));

    let mut top = Mapping::new();
    top.insert(k("name"), k(&workflow.name));
    top.insert(k("on"), k("push"));
    if !workflow.env.is_empty() {
        top.insert(k("env"), Value::Mapping(workflow.env.clone()));
    }
    if let Some(d) = &workflow.defaults {
        top.insert(k("defaults"), d.clone());
    }
    top.insert(k("jobs"), Value::Mapping(jobs));

    // Serializing a Value of strings and mappings cannot fail.
    let workflow_yaml = serde_yaml_ng::to_string(&Value::Mapping(top)).unwrap_or_default();

    // act reads `.actrc` one flag per line, a flag's value on the same line.
    let actrc = [
        format!("-W {STEP_WORKFLOW_PATH}"),
        format!("-C {WORKSPACE}"),
        // Every `runs-on:` label was rewritten to ubuntu-latest above; it runs on the VM.
        "-P ubuntu-latest=-self-hosted".to_string(),
        "--no-cache-server".to_string(),
        "--pull=false".to_string(),
        format!("--job {}", job.id),
    ];
    StepFiles {
        actrc: actrc.join("\n") + "\n",
        workflow_yaml,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::workflow_old::parse;

    const WF: &str = r#"
name: demo
env: { GLOBAL: "g" }
jobs:
  build:
    runs-on: [self-hosted, linux]
    env: { J: "j" }
    steps:
      - id: make
        run: echo "v=1" >> "$GITHUB_OUTPUT"
      - run: exit 3
      - name: report
        if: failure()
        run: echo "${{ steps.make.outputs.v }}"
"#;

    fn doc(files: &StepFiles) -> Value {
        serde_yaml_ng::from_str(&files.workflow_yaml).unwrap()
    }

    #[test]
    fn first_step_has_no_replays_and_a_workspace_default() {
        let wf = parse(WF, "f").unwrap();
        let job = &wf.jobs[0];
        let files = synthesize(&wf, job, &job.steps[0], &[], &CarriedEnv::default());
        let d = doc(&files);
        let steps = d["jobs"]["build"]["steps"].as_sequence().unwrap();
        assert_eq!(steps.len(), 1);
        assert_eq!(steps[0]["id"], k("make"));
        assert_eq!(
            d["jobs"]["build"]["defaults"]["run"]["working-directory"],
            k(WORKSPACE)
        );
        assert_eq!(d["jobs"]["build"]["runs-on"], k("ubuntu-latest"));
        assert_eq!(d["env"]["GLOBAL"], k("g"));
        assert_eq!(d["jobs"]["build"]["env"]["J"], k("j"));
        assert!(files.actrc.lines().any(|l| l == "-W /.udos/step.yml"));
        assert!(files.actrc.lines().any(|l| l == "-C /workspace"));
        assert!(files.actrc.lines().any(|l| l == "--job build"));
        assert!(files.actrc.contains("ubuntu-latest=-self-hosted"));
    }

    #[test]
    fn later_steps_replay_outputs_failures_and_env() {
        let wf = parse(WF, "f").unwrap();
        let job = &wf.jobs[0];
        let prior = vec![
            PriorStep {
                id: Some("make".into()),
                number: 1,
                outcome: "success".into(),
                continue_on_error: false,
                outputs: BTreeMap::from([("v".into(), "line1\nline2".into())]),
            },
            PriorStep {
                id: None,
                number: 2,
                outcome: "failure".into(),
                continue_on_error: false,
                outputs: BTreeMap::new(),
            },
        ];
        let carried = CarriedEnv {
            env: BTreeMap::from([("FOO".into(), "bar".into())]),
            path: vec!["/opt/bin".into()],
        };
        let files = synthesize(&wf, job, &job.steps[2], &prior, &carried);
        let d = doc(&files);
        let steps = d["jobs"]["build"]["steps"].as_sequence().unwrap();
        let ids: Vec<_> = steps.iter().map(|s| s["id"].as_str().unwrap()).collect();
        assert_eq!(
            ids,
            vec![ENV_STEP_ID, "make", "udos-replay-2", USER_STEP_ID]
        );
        let env_run = steps[0]["run"].as_str().unwrap();
        assert!(
            env_run.contains("FOO<<UDOS_EOF_0\nbar\nUDOS_EOF_0\n"),
            "{env_run}"
        );
        assert!(env_run.contains("/opt/bin"));
        let out_run = steps[1]["run"].as_str().unwrap();
        assert!(out_run.contains("v<<UDOS_EOF_0\nline1\nline2\nUDOS_EOF_0"));
        assert!(!out_run.contains("exit 1"));
        assert!(steps[2]["run"].as_str().unwrap().ends_with("exit 1\n"));
        assert_eq!(steps[2]["if"], k("always()"));
        assert_eq!(steps[3]["if"], k("failure()"));
    }

    #[test]
    fn delimiters_avoid_collisions() {
        assert_eq!(delimiter("x"), "UDOS_EOF_0");
        assert_eq!(delimiter("UDOS_EOF_0 UDOS_EOF_1"), "UDOS_EOF_2");
    }

    #[test]
    fn carried_env_later_wins_and_paths_accumulate() {
        let mut c = CarriedEnv::default();
        c.absorb(&BTreeMap::from([("A".into(), "1".into())]), &["/a".into()]);
        c.absorb(&BTreeMap::from([("A".into(), "2".into())]), &["/b".into()]);
        assert_eq!(c.env["A"], "2");
        assert_eq!(c.path, vec!["/a", "/b"]);
    }
}
