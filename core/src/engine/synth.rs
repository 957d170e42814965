//! A resolved step as the files act reads in the step's VM: `/.actrc` and a one-step
//! workflow (`/.udos/step.yml`).
//!
//! The workflow has two steps: `udos-setup`, which replaces act's scratch workspace
//! (`$HOME/.cache/act/<random>/hostexecutor`, where act runs steps and local actions
//! by default) with a symlink to `/workspace`, so that composite actions and
//! `$GITHUB_WORKSPACE` inside them see the repository; then the user's step, with
//! nothing left for act to evaluate but the host's secret references. act removes the
//! symlink (not its target) when the job ends.
//!
//! Actions of other repositories are in the control layer, one tree per pinned commit
//! under [`ACTIONS_DIR`], and `.actrc` maps each to its tree with
//! `--local-repository`, so act never fetches (docs/actions.md).

use serde_yaml_ng::{Mapping, Value as Yaml};

use super::contexts::{EVENT_PATH, WORKSPACE};
use super::leg::{ResolvedBody, ResolvedStep};
use crate::workflow::action::PinnedAction;

/// The id the user's step has inside the VM when the user gave it none. Not `udos-…`:
/// PID 1 keeps the console output of `udos-` steps (udos's own) quiet.
pub const USER_STEP_ID: &str = "_udos_step";
/// The id of udos's own setup step.
pub const SETUP_STEP_ID: &str = "udos-setup";
/// Where the synthesized workflow is in the step's root (control layer).
pub const STEP_WORKFLOW_PATH: &str = "/.udos/step.yml";

/// Where the trees of the step's actions of other repositories are in its root
/// (control layer).
pub const ACTIONS_DIR: &str = "/.udos/actions";

/// Where `action`'s repository tree is in the step's root: one directory per
/// repository and pin.
pub fn action_dir(action: &PinnedAction) -> String {
    format!(
        "{ACTIONS_DIR}/{}/{}@{}",
        action.at.owner, action.at.repo, action.pin
    )
}

/// The `.actrc` lines that give act `actions` from their trees, each by its ref as
/// written (how the step's `uses:` and its composite actions' name it), so act never
/// fetches and `github.action_ref` is the ref, as on GitHub.
fn local_repository_lines(actions: &[PinnedAction]) -> Vec<String> {
    let mut lines: Vec<String> = Vec::new();
    for a in actions {
        let line = format!(
            "--local-repository {}@{}={}",
            a.at.slug(),
            a.at.git_ref,
            action_dir(a)
        );
        if !lines.contains(&line) {
            lines.push(line);
        }
    }
    lines
}

/// The control layer's files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StepFiles {
    /// `/.actrc`: one act argument per line.
    pub actrc: String,
    /// `/.udos/step.yml`.
    pub workflow_yaml: String,
}

fn k(s: &str) -> Yaml {
    Yaml::String(s.to_string())
}

/// The id act reports the user's step under.
pub fn act_id(step: &ResolvedStep) -> &str {
    step.id.as_deref().unwrap_or(USER_STEP_ID)
}

fn setup_step() -> Yaml {
    let mut m = Mapping::new();
    m.insert(k("id"), k(SETUP_STEP_ID));
    m.insert(k("name"), k("udos: workspace"));
    m.insert(k("working-directory"), k("/"));
    m.insert(k("shell"), k("sh"));
    m.insert(
        k("run"),
        k(&format!(
            "rmdir \"${{{{ github.workspace }}}}\" && ln -s {WORKSPACE} \"${{{{ github.workspace }}}}\"\n"
        )),
    );
    Yaml::Mapping(m)
}

fn user_step(step: &ResolvedStep) -> Yaml {
    let mut m = Mapping::new();
    m.insert(k("id"), k(act_id(step)));
    m.insert(k("name"), k(&super::leg::escape(&step.name)));
    let mut env = Mapping::new();
    for (name, value) in &step.env {
        env.insert(k(name), k(value));
    }
    m.insert(k("env"), Yaml::Mapping(env));
    match &step.body {
        ResolvedBody::Run {
            script,
            shell,
            working_directory,
        } => {
            m.insert(k("run"), k(script));
            if let Some(s) = shell {
                m.insert(k("shell"), k(s));
            }
            m.insert(k("working-directory"), k(working_directory));
        }
        ResolvedBody::Uses { uses, with } => {
            m.insert(k("uses"), k(uses));
            if !with.is_empty() {
                let mut w = Mapping::new();
                for (name, value) in with {
                    w.insert(k(name), k(value));
                }
                m.insert(k("with"), Yaml::Mapping(w));
            }
        }
    }
    Yaml::Mapping(m)
}

/// The files for running `step` in a VM.
pub fn step_files(step: &ResolvedStep) -> StepFiles {
    step_files_with_actions(step, &[])
}

/// The files for running `step` in a VM, with `actions` (pinned, their trees at
/// [`action_dir`]) given to act.
pub fn step_files_with_actions(step: &ResolvedStep, actions: &[PinnedAction]) -> StepFiles {
    let mut job = Mapping::new();
    job.insert(k("name"), k(&super::leg::escape(&step.leg_name)));
    job.insert(k("runs-on"), k("ubuntu-latest"));
    job.insert(
        k("steps"),
        Yaml::Sequence(vec![setup_step(), user_step(step)]),
    );
    let mut jobs = Mapping::new();
    jobs.insert(k(&step.job_id), Yaml::Mapping(job));
    let mut top = Mapping::new();
    top.insert(k("name"), k(&super::leg::escape(&step.workflow_name)));
    top.insert(k("on"), k(&step.event_name));
    top.insert(k("jobs"), Yaml::Mapping(jobs));
    // A mapping of strings cannot fail to serialize.
    let workflow_yaml = serde_yaml_ng::to_string(&Yaml::Mapping(top)).unwrap_or_default();

    // act reads `.actrc` one flag per line, a flag's value on the same line. The
    // dotenv-style files act would read from its working directory by default are
    // pointed at /dev/null: a repository's `.env` or `.secrets` must not leak in.
    let mut actrc = vec![
        format!("-W {STEP_WORKFLOW_PATH}"),
        format!("-C {WORKSPACE}"),
        "-P ubuntu-latest=-self-hosted".to_string(),
        "--no-cache-server".to_string(),
        "--pull=false".to_string(),
        format!("-e {EVENT_PATH}"),
        "--env-file /dev/null".to_string(),
        "--secret-file /dev/null".to_string(),
        "--var-file /dev/null".to_string(),
        "--input-file /dev/null".to_string(),
        format!("--job {}", step.job_id),
    ];
    actrc.extend(local_repository_lines(actions));
    StepFiles {
        actrc: actrc.join("\n") + "\n",
        workflow_yaml,
    }
}

#[cfg(test)]
mod tests {
    use indexmap::IndexMap;

    use super::*;

    fn step(body: ResolvedBody) -> ResolvedStep {
        ResolvedStep {
            number: 2,
            id: None,
            name: "build ${{ it }}".into(),
            body,
            env: IndexMap::from([("A".to_string(), "1".to_string())]),
            continue_on_error: false,
            timeout_minutes: None,
            secrets: Default::default(),
            masks: vec![],
            job_id: "build".into(),
            leg_name: "build (a)".into(),
            workflow_name: "ci".into(),
            event_name: "workflow_dispatch".into(),
        }
    }

    #[test]
    fn the_workflow_has_the_setup_step_then_the_users() {
        let f = step_files(&step(ResolvedBody::Run {
            script: "echo hi\n".into(),
            shell: Some("bash".into()),
            working_directory: "/workspace/sub".into(),
        }));
        let d: Yaml = serde_yaml_ng::from_str(&f.workflow_yaml).unwrap();
        assert_eq!(d["on"], k("workflow_dispatch"));
        let steps = d["jobs"]["build"]["steps"].as_sequence().unwrap();
        assert_eq!(steps[0]["id"], k(SETUP_STEP_ID));
        assert_eq!(steps[1]["id"], k(USER_STEP_ID));
        assert_eq!(steps[1]["run"], k("echo hi\n"));
        assert_eq!(steps[1]["shell"], k("bash"));
        assert_eq!(steps[1]["working-directory"], k("/workspace/sub"));
        assert_eq!(steps[1]["env"]["A"], k("1"));
        assert_eq!(steps[1]["name"], k("build ${{ '${{' }} it }}"));
        for line in [
            "-W /.udos/step.yml",
            "-e /.udos/event.json",
            "--job build",
            "--secret-file /dev/null",
        ] {
            assert!(f.actrc.lines().any(|l| l == line), "{line} in {}", f.actrc);
        }
    }

    #[test]
    fn a_local_action_keeps_its_path_and_inputs() {
        let f = step_files(&step(ResolvedBody::Uses {
            uses: "./.github/actions/x".into(),
            with: IndexMap::from([("who".to_string(), "me".to_string())]),
        }));
        let d: Yaml = serde_yaml_ng::from_str(&f.workflow_yaml).unwrap();
        let s = &d["jobs"]["build"]["steps"][1];
        assert_eq!(s["uses"], k("./.github/actions/x"));
        assert_eq!(s["with"]["who"], k("me"));
        assert!(s.get("working-directory").is_none());
    }

    fn pinned(uses: &str, pin: &str) -> PinnedAction {
        use crate::workflow::action::{ActionDef, ActionKind, RemoteUses};
        PinnedAction {
            uses: uses.into(),
            at: RemoteUses::parse(uses).unwrap(),
            pin: pin.into(),
            local: None,
            def: ActionDef {
                name: None,
                kind: ActionKind::Composite,
                uses: vec![],
            },
        }
    }

    #[test]
    fn actions_of_other_repositories_are_mapped_to_their_trees() {
        let (a, b) = ("a".repeat(40), "b".repeat(40));
        let top = pinned("octo/tools/sub@v1", &a);
        let nested = pinned("octo/more@main", &b);
        let step = step(ResolvedBody::Uses {
            uses: top.uses.clone(),
            with: IndexMap::new(),
        });
        let f = step_files_with_actions(&step, &[top.clone(), nested]);
        let d: Yaml = serde_yaml_ng::from_str(&f.workflow_yaml).unwrap();
        assert_eq!(
            d["jobs"]["build"]["steps"][1]["uses"],
            k("octo/tools/sub@v1")
        );
        let lines: Vec<&str> = f
            .actrc
            .lines()
            .filter(|l| l.starts_with("--local-repository"))
            .collect();
        assert_eq!(
            lines,
            [
                format!("--local-repository octo/tools@v1=/.udos/actions/octo/tools@{a}"),
                format!("--local-repository octo/more@main=/.udos/actions/octo/more@{b}"),
            ]
        );
        assert_eq!(action_dir(&top), format!("/.udos/actions/octo/tools@{a}"));
        // Without actions, no such line.
        assert!(!step_files(&step).actrc.contains("--local-repository"));
    }
}
