//! Which workflows and jobs run: the event's workflows, all their jobs or those `-j`
//! names plus what they need, in stages; and whether udos can run every step of them.

use std::collections::{BTreeMap, BTreeSet};

use crate::value::Value;
use crate::workflow::action::{ActionDef, ActionKind, PinnedAction};
use crate::workflow::{JobKind, StepBody, StepDef, StepUses, Workflow};

use super::run::DEFAULT_BASE;
use super::EngineError;

/// The workflows of a run, with everything they refer to in the repository, read by
/// the host beforehand (the engine does no I/O).
#[derive(Debug, Clone, Default)]
pub struct WorkflowSet {
    /// The workflows `-W` named, in order.
    pub top: Vec<Workflow>,
    /// Reusable workflows they call, by repository-relative path (`.github/workflows/x.yml`).
    pub called: BTreeMap<String, Workflow>,
    /// Local actions their steps use, by repository-relative directory.
    pub actions: BTreeMap<String, ActionDef>,
}

/// `./a/b/` → `a/b`: the key of a local path in a [`WorkflowSet`].
pub fn local_key(uses: &str) -> String {
    uses.trim()
        .trim_start_matches("./")
        .trim_end_matches('/')
        .to_string()
}

/// The workflows and jobs that run.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Selection {
    /// Per top-level workflow that runs: its index in [`WorkflowSet::top`] and the ids
    /// of its jobs that run, in file order.
    pub workflows: Vec<(usize, Vec<String>)>,
}

impl Selection {
    /// No job at all?
    pub fn is_empty(&self) -> bool {
        self.workflows.iter().all(|(_, jobs)| jobs.is_empty())
    }
}

/// Picks the jobs: with `job_filter` empty, every job of the workflows `triggered`
/// says run; otherwise the jobs so named (in any workflow, as act does, whatever the
/// event) and everything they need.
pub fn select(
    set: &WorkflowSet,
    triggered: &[bool],
    job_filter: &[String],
) -> Result<Selection, EngineError> {
    let mut sel = Selection::default();
    if job_filter.is_empty() {
        for (i, wf) in set.top.iter().enumerate() {
            if triggered.get(i).copied().unwrap_or(false) {
                sel.workflows.push((i, wf.jobs.keys().cloned().collect()));
            }
        }
        return Ok(sel);
    }
    let mut found = BTreeSet::new();
    for (i, wf) in set.top.iter().enumerate() {
        let mut wanted: BTreeSet<String> = BTreeSet::new();
        let mut todo: Vec<String> = job_filter
            .iter()
            .filter(|j| wf.jobs.contains_key(*j))
            .cloned()
            .collect();
        found.extend(todo.iter().cloned());
        while let Some(j) = todo.pop() {
            if wanted.insert(j.clone()) {
                todo.extend(wf.jobs[&j].needs.iter().cloned());
            }
        }
        if !wanted.is_empty() {
            let jobs = wf
                .jobs
                .keys()
                .filter(|j| wanted.contains(*j))
                .cloned()
                .collect();
            sel.workflows.push((i, jobs));
        }
    }
    let missing: Vec<&String> = job_filter.iter().filter(|j| !found.contains(*j)).collect();
    if !missing.is_empty() {
        let all: BTreeSet<&String> = set.top.iter().flat_map(|w| w.jobs.keys()).collect();
        return Err(EngineError::Plan(format!(
            "no job {} in the workflows (jobs: {})",
            missing
                .iter()
                .map(|j| format!("`{j}`"))
                .collect::<Vec<_>>()
                .join(", "),
            all.into_iter().cloned().collect::<Vec<_>>().join(", ")
        )));
    }
    Ok(sel)
}

/// The jobs of `workflow` (restricted to `jobs`) in stages: stage 0 needs nothing,
/// stage n needs only jobs of earlier stages. A cycle is an error naming its jobs.
pub fn stages(workflow: &Workflow, jobs: &[String]) -> Result<Vec<Vec<String>>, EngineError> {
    let mut stage_of: BTreeMap<&str, usize> = BTreeMap::new();
    let mut left: Vec<&String> = jobs.iter().collect();
    while !left.is_empty() {
        let before = left.len();
        left.retain(|j| {
            let needs = &workflow.jobs[j.as_str()].needs;
            let ready = needs.iter().all(|n| stage_of.contains_key(n.as_str()));
            if ready {
                let s = needs
                    .iter()
                    .map(|n| stage_of[n.as_str()] + 1)
                    .max()
                    .unwrap_or(0);
                stage_of.insert(j.as_str(), s);
            }
            !ready
        });
        if left.len() == before {
            return Err(EngineError::Plan(format!(
                "{}: the jobs {} need each other in a cycle",
                workflow.file,
                left.iter()
                    .map(|j| format!("`{j}`"))
                    .collect::<Vec<_>>()
                    .join(", ")
            )));
        }
    }
    let n = stage_of.values().max().map(|m| m + 1).unwrap_or(0);
    let mut out = vec![Vec::new(); n];
    for j in jobs {
        out[stage_of[j.as_str()]].push(j.clone());
    }
    Ok(out)
}

/// Which base each job's `runs-on` maps to and which bases have node: what
/// [`check_supported_on`] needs to know whether a job's JavaScript actions can run.
#[derive(Debug, Clone, Default)]
pub struct Runners {
    /// `-P LABEL=BASE`, as the run maps labels.
    pub platforms: Vec<(String, String)>,
    /// The bases that have node.
    pub with_node: BTreeSet<String>,
}

/// Whether a job's base has node, as far as planning can tell.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BaseNode {
    /// It has.
    Has,
    /// This base has none.
    Lacks(String),
    /// `runs-on` is a template: the base is known when the leg starts.
    Unknown,
    /// No label maps to a base: the job is skipped.
    NoBase,
}

/// The base a job's `runs-on` maps to, as far as planning can tell.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JobBase {
    /// This base.
    Base(String),
    /// No label maps to a base: the job is skipped.
    None,
    /// `runs-on` is a template: the base is known when the leg starts.
    Template,
}

impl Runners {
    /// The base `runs-on` maps to, by the rule the run applies to each leg: the first
    /// label `-P` maps, else `default` when a label is one udos runs by default.
    pub fn base_for(&self, runs_on: &Value) -> JobBase {
        let labels: Vec<String> = match runs_on {
            Value::Array(a) => a.iter().map(|v| v.to_string()).collect(),
            Value::Object(o) => match o.get("labels") {
                Some(Value::Array(a)) => a.iter().map(|v| v.to_string()).collect(),
                Some(v) => vec![v.to_string()],
                None => Vec::new(),
            },
            v => vec![v.to_string()],
        };
        if labels.iter().any(|l| l.contains("${{")) {
            return JobBase::Template;
        }
        for label in &labels {
            if let Some((_, base)) = self
                .platforms
                .iter()
                .find(|(l, _)| l.eq_ignore_ascii_case(label))
            {
                return JobBase::Base(base.clone());
            }
        }
        if labels.iter().any(|l| super::run::default_label(l)) {
            JobBase::Base(DEFAULT_BASE.to_string())
        } else {
            JobBase::None
        }
    }

    /// Whether the base `runs-on` maps to has node.
    pub fn node_for(&self, runs_on: &Value) -> BaseNode {
        match self.base_for(runs_on) {
            JobBase::Template => BaseNode::Unknown,
            JobBase::None => BaseNode::NoBase,
            JobBase::Base(b) if self.with_node.contains(&b) => BaseNode::Has,
            JobBase::Base(b) => BaseNode::Lacks(b),
        }
    }
}

/// Can udos run every step of the selected jobs (and of the reusable workflows they
/// call)? Every problem is listed, each naming its job and step. `base_has_node`:
/// whether every job's base has node (JavaScript actions need it); see
/// [`check_supported_on`] to decide it per job.
pub fn check_supported(
    set: &WorkflowSet,
    sel: &Selection,
    base_has_node: bool,
) -> Result<(), EngineError> {
    check(set, sel, &|_| {
        if base_has_node {
            BaseNode::Has
        } else {
            BaseNode::Lacks(DEFAULT_BASE.to_string())
        }
    })
}

/// [`check_supported`], with each job's base (and whether it has node) decided from
/// its `runs-on` by `runners`. A job whose base is known only when its leg starts
/// (`runs-on` is a template) passes here; the host checks its legs then.
pub fn check_supported_on(
    set: &WorkflowSet,
    sel: &Selection,
    runners: &Runners,
) -> Result<(), EngineError> {
    check(set, sel, &|runs_on| runners.node_for(runs_on))
}

/// A workflow of a [`WorkflowSet`].
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum Place {
    /// `top[i]`.
    Top(usize),
    /// `called[key]`.
    Called(String),
}

impl Place {
    fn of<'a>(&self, set: &'a WorkflowSet) -> &'a Workflow {
        match self {
            Place::Top(i) => &set.top[*i],
            Place::Called(k) => &set.called[k],
        }
    }
}

/// Where the selected jobs are: each workflow reached (the selected top-level ones,
/// then every reusable workflow they call, each once) with the jobs of it that run;
/// and the calls to reusable workflows that are not in the repository.
fn reached(set: &WorkflowSet, sel: &Selection) -> (Vec<(Place, Vec<String>)>, Vec<String>) {
    let mut out = Vec::new();
    let mut missing = Vec::new();
    let mut seen_called = BTreeSet::new();
    let mut todo: Vec<(Place, Vec<String>)> = sel
        .workflows
        .iter()
        .map(|(i, jobs)| (Place::Top(*i), jobs.clone()))
        .collect();
    while let Some((place, jobs)) = todo.pop() {
        let wf = place.of(set);
        for id in &jobs {
            let JobKind::Call(call) = &wf.jobs[id].kind else {
                continue;
            };
            let key = local_key(&call.uses);
            match set.called.get(&key) {
                Some(callee) => {
                    if seen_called.insert(key.clone()) {
                        todo.push((Place::Called(key), callee.jobs.keys().cloned().collect()));
                    }
                }
                None => missing.push(format!(
                    "{}: job `{id}`: the reusable workflow `{}` is not in the repository",
                    wf.file, call.uses
                )),
            }
        }
        out.push((place, jobs));
    }
    (out, missing)
}

/// Every step of the selected jobs and of the reusable workflows they call (each
/// workflow once), with where it is (`file: job `x`, step n`), for the host to pin
/// the actions they use ([`StepDef::actions`]).
pub fn selected_steps_mut<'a>(
    set: &'a mut WorkflowSet,
    sel: &Selection,
) -> Vec<(String, &'a mut StepDef)> {
    let wanted: BTreeMap<Place, Vec<String>> = reached(set, sel).0.into_iter().collect();
    let top = set
        .top
        .iter_mut()
        .enumerate()
        .map(|(i, wf)| (Place::Top(i), wf));
    let called = set
        .called
        .iter_mut()
        .map(|(k, wf)| (Place::Called(k.clone()), wf));
    let mut out = Vec::new();
    for (place, wf) in top.chain(called) {
        let Some(jobs) = wanted.get(&place) else {
            continue;
        };
        for (id, job) in wf.jobs.iter_mut() {
            let JobKind::Steps(steps) = &mut job.kind else {
                continue;
            };
            if !jobs.contains(id) {
                continue;
            }
            for step in steps.steps.iter_mut() {
                out.push((
                    format!("{}: job `{id}`, step {}", wf.file, step.number),
                    step,
                ));
            }
        }
    }
    out
}

fn check(
    set: &WorkflowSet,
    sel: &Selection,
    node_for: &dyn Fn(&Value) -> BaseNode,
) -> Result<(), EngineError> {
    let (places, mut problems) = reached(set, sel);
    for (place, jobs) in places {
        let wf = place.of(set);
        for id in jobs {
            let JobKind::Steps(steps) = &wf.jobs[&id].kind else {
                continue;
            };
            let node = node_for(&steps.runs_on);
            for step in &steps.steps {
                let at = format!("{}: job `{id}`, step {}", wf.file, step.number);
                for p in step_problems(set, step, &node) {
                    problems.push(format!("{at}: {p}"));
                }
            }
        }
    }
    if problems.is_empty() {
        Ok(())
    } else {
        problems.sort();
        problems.dedup();
        Err(EngineError::Plan(problems.join("\n")))
    }
}

fn step_problems(set: &WorkflowSet, step: &StepDef, node: &BaseNode) -> Vec<String> {
    let StepBody::Uses { uses, .. } = &step.body else {
        return Vec::new();
    };
    let mut problems = Vec::new();
    match uses {
        StepUses::Docker(image) => problems.push(format!(
            "`uses: {image}`: Docker actions are not supported: udos runs steps in micro-VMs without Docker"
        )),
        StepUses::Remote { .. } if uses.is_checkout() => {}
        StepUses::Remote { raw, .. } => match step.actions.iter().find(|a| &a.uses == raw) {
            None => problems.push(format!(
                "`uses: {raw}`: not resolved before the run (actions of other repositories are fetched and pinned while planning)"
            )),
            Some(a) => problems.extend(def_problem(&format!("`uses: {raw}`"), &a.def, node)),
        },
        StepUses::Local(path) => match set.actions.get(&local_key(path)) {
            None => problems.push(format!(
                "`uses: {path}`: no action.yml or action.yaml in `{}`",
                local_key(path)
            )),
            Some(a) => {
                problems.extend(def_problem(&format!("`uses: {path}`"), a, node));
                problems.extend(nested_problems(a, &step.actions));
            }
        },
    }
    // What the step's actions use in turn.
    for a in &step.actions {
        if a.uses != uses.raw() {
            let who = format!("`{}` (used by a composite action)", a.uses);
            problems.extend(def_problem(&who, &a.def, node));
        }
        problems.extend(nested_problems(&a.def, &step.actions));
    }
    problems
}

/// The `uses:` of a composite action that udos cannot give act: Docker images and
/// actions of other repositories that were not pinned.
fn nested_problems(def: &ActionDef, pinned: &[PinnedAction]) -> Vec<String> {
    def.uses
        .iter()
        .filter_map(|u| {
            if u.starts_with("docker://") {
                Some(format!(
                    "`{u}` (used by a composite action): Docker actions are not supported: udos runs steps in micro-VMs without Docker"
                ))
            } else if u.starts_with("./") || pinned.iter().any(|a| &a.uses == u) {
                None
            } else {
                Some(format!(
                    "`{u}` (used by a composite action): not resolved before the run"
                ))
            }
        })
        .collect()
}

fn def_problem(who: &str, def: &ActionDef, node: &BaseNode) -> Option<String> {
    match &def.kind {
        ActionKind::Composite => None,
        ActionKind::Docker => Some(format!(
            "{who} is a Docker action (`runs.using: docker`): not supported, udos runs steps in micro-VMs without Docker"
        )),
        ActionKind::Node { using, .. } => match node {
            BaseNode::Lacks(base) => Some(format!(
                "{who} is a JavaScript action (`{using}`), and the base `{base}` has no node: map the job's runner to a base with node (-P LABEL=debian)"
            )),
            BaseNode::Has | BaseNode::Unknown | BaseNode::NoBase => None,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::workflow::parse;

    fn set(texts: &[&str]) -> WorkflowSet {
        WorkflowSet {
            top: texts
                .iter()
                .enumerate()
                .map(|(i, t)| parse(t, &format!("w{i}.yml")).unwrap())
                .collect(),
            ..WorkflowSet::default()
        }
    }

    const GRAPH: &str = r#"
on: push
jobs:
  a: {runs-on: x, steps: [{run: a}]}
  b: {runs-on: x, steps: [{run: b}]}
  c: {runs-on: x, needs: [a, b], steps: [{run: c}]}
  d: {runs-on: x, needs: c, steps: [{run: d}]}
  e: {runs-on: x, steps: [{run: e}]}
"#;

    #[test]
    fn a_job_filter_takes_what_the_jobs_need() {
        let s = set(&[
            GRAPH,
            "on: pull_request\njobs:\n  d: {runs-on: x, steps: [{run: d}]}\n",
        ]);
        let sel = select(&s, &[true, false], &[]).unwrap();
        assert_eq!(
            sel.workflows,
            vec![(
                0,
                vec!["a", "b", "c", "d", "e"]
                    .into_iter()
                    .map(String::from)
                    .collect()
            )]
        );
        // -j d: in every workflow, whatever the event; with what it needs.
        let sel = select(&s, &[true, false], &["d".into()]).unwrap();
        assert_eq!(sel.workflows.len(), 2);
        assert_eq!(sel.workflows[0].1, ["a", "b", "c", "d"]);
        assert_eq!(sel.workflows[1].1, ["d"]);
        let err = select(&s, &[true, true], &["zz".into()])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("no job `zz`") && err.contains("a, b, c, d, e"),
            "{err}"
        );
    }

    #[test]
    fn stages_follow_needs_and_cycles_are_named() {
        let s = set(&[GRAPH]);
        let all: Vec<String> = s.top[0].jobs.keys().cloned().collect();
        assert_eq!(
            stages(&s.top[0], &all).unwrap(),
            vec![vec!["a", "b", "e"], vec!["c"], vec!["d"]]
        );
        let cyc = set(&["on: push\njobs:\n  a: {runs-on: x, needs: b, steps: [{run: a}]}\n  b: {runs-on: x, needs: a, steps: [{run: b}]}\n  c: {runs-on: x, steps: [{run: c}]}\n"]);
        let all: Vec<String> = cyc.top[0].jobs.keys().cloned().collect();
        let err = stages(&cyc.top[0], &all).unwrap_err().to_string();
        assert!(err.contains("`a`, `b`") && err.contains("cycle"), "{err}");
    }

    #[test]
    fn unsupported_steps_are_all_listed_with_their_place() {
        let mut s = set(&[r#"
on: push
jobs:
  j:
    runs-on: x
    steps:
      - uses: actions/checkout@v4
      - uses: actions/setup-node@v4
      - uses: docker://alpine
      - uses: ./missing
      - uses: ./node-action
      - uses: ./composite
  k:
    uses: ./.github/workflows/nope.yml
"#]);
        s.actions.insert(
            "node-action".into(),
            ActionDef {
                name: None,
                kind: ActionKind::Node {
                    using: "node20".into(),
                    pre: None,
                    post: None,
                },
                uses: vec![],
            },
        );
        s.actions.insert(
            "composite".into(),
            ActionDef {
                name: None,
                kind: ActionKind::Composite,
                uses: vec![],
            },
        );
        let sel = select(&s, &[true], &[]).unwrap();
        let err = check_supported(&s, &sel, false).unwrap_err().to_string();
        for needle in [
            "step 2: `uses: actions/setup-node@v4`",
            "step 3: `uses: docker://alpine`",
            "step 4: `uses: ./missing`",
            "step 5: `uses: ./node-action` is a JavaScript action",
            "job `k`: the reusable workflow `./.github/workflows/nope.yml`",
        ] {
            assert!(err.contains(needle), "`{needle}` not in:\n{err}");
        }
        assert!(!err.contains("step 1") && !err.contains("step 6"), "{err}");
        // With node in the base, the JavaScript action is fine.
        let err = check_supported(&s, &sel, true).unwrap_err().to_string();
        assert!(!err.contains("node-action"), "{err}");
    }

    fn def(kind: ActionKind, uses: &[&str]) -> ActionDef {
        ActionDef {
            name: None,
            kind,
            uses: uses.iter().map(|u| u.to_string()).collect(),
        }
    }

    fn node() -> ActionKind {
        ActionKind::Node {
            using: "node16".into(),
            pre: None,
            post: None,
        }
    }

    fn pin(uses: &str, def: ActionDef) -> PinnedAction {
        PinnedAction {
            uses: uses.into(),
            at: crate::workflow::action::RemoteUses::parse(uses).unwrap(),
            pin: "f".repeat(40),
            local: None,
            def,
        }
    }

    /// What the host would pin for each `uses:` (the closure through composite actions).
    fn pin_all(s: &mut WorkflowSet, sel: &Selection) {
        let known = |u: &str| -> Option<PinnedAction> {
            match u {
                "o/comp@v1" => Some(pin(u, def(ActionKind::Composite, &["o/js@v2", "./here"]))),
                "o/js@v2" | "o/js@v1" => Some(pin(u, def(node(), &[]))),
                "o/dock@v1" => Some(pin(u, def(ActionKind::Docker, &[]))),
                "o/comp-docker@v1" => Some(pin(
                    u,
                    def(ActionKind::Composite, &["docker://alpine", "o/gone@v1"]),
                )),
                _ => None,
            }
        };
        for (_, step) in selected_steps_mut(s, sel) {
            let StepBody::Uses { uses, .. } = &step.body else {
                continue;
            };
            let mut todo = vec![uses.raw().to_string()];
            while let Some(u) = todo.pop() {
                if let Some(p) = known(&u) {
                    todo.extend(p.def.uses.iter().cloned());
                    step.actions.push(p);
                }
            }
        }
    }

    #[test]
    fn remote_actions_run_once_pinned_by_kind_and_base() {
        let mut s = set(&[r#"
on: push
jobs:
  small:
    runs-on: ubuntu-latest
    steps:
      - uses: o/comp@v1
      - uses: o/js@v1
      - uses: o/dock@v1
      - uses: o/unpinned@v1
      - uses: o/comp-docker@v1
      - uses: actions/checkout@v4
  big:
    runs-on: [self-hosted, big]
    steps:
      - uses: o/comp@v1
      - uses: o/js@v1
  later:
    runs-on: ${{ matrix.os }}
    steps:
      - uses: o/js@v1
  nowhere:
    runs-on: windows-latest
    steps:
      - uses: o/js@v1
"#]);
        let sel = select(&s, &[true], &[]).unwrap();
        let runners = Runners {
            platforms: vec![("big".into(), "debian".into())],
            with_node: BTreeSet::from(["debian".to_string()]),
        };
        // Nothing pinned: every remote action is refused, checkout is served.
        let err = check_supported_on(&s, &sel, &runners)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("job `small`, step 1: `uses: o/comp@v1`: not resolved before the run"),
            "{err}"
        );
        assert!(!err.contains("step 6"), "{err}");
        pin_all(&mut s, &sel);
        let err = check_supported_on(&s, &sel, &runners)
            .unwrap_err()
            .to_string();
        let lines: Vec<&str> = err.lines().collect();
        for needle in [
            "job `small`, step 1: `o/js@v2` (used by a composite action) is a JavaScript action (`node16`), and the base `default` has no node",
            "job `small`, step 2: `uses: o/js@v1` is a JavaScript action (`node16`), and the base `default` has no node",
            "job `small`, step 3: `uses: o/dock@v1` is a Docker action",
            "job `small`, step 4: `uses: o/unpinned@v1`: not resolved before the run",
            "job `small`, step 5: `docker://alpine` (used by a composite action): Docker actions are not supported",
            "job `small`, step 5: `o/gone@v1` (used by a composite action): not resolved",
        ] {
            assert!(lines.iter().any(|l| l.contains(needle)), "`{needle}` not in:\n{err}");
        }
        // The job mapped to a base with node, the job whose base is known only when
        // its legs start, and the job no label maps are not refused here.
        for job in ["big", "later", "nowhere"] {
            assert!(!err.contains(&format!("job `{job}`")), "{job}: {err}");
        }
        assert_eq!(lines.len(), 6, "{err}");
    }

    #[test]
    fn runners_map_labels_as_the_run_does() {
        use crate::engine::contexts::RunFacts;
        use crate::engine::run::{Action, Run, RunConfig};
        let platforms = vec![
            ("big".to_string(), "debian".to_string()),
            ("Ubuntu-22.04".to_string(), "mine".to_string()),
        ];
        let runners = Runners {
            platforms: platforms.clone(),
            with_node: BTreeSet::new(),
        };
        for runs_on in [
            "ubuntu-latest",
            "ubuntu-22.04",
            "[self-hosted, big]",
            "[big, ubuntu-22.04]",
            "{group: g, labels: [x64]}",
            "linux",
            "macos-latest",
        ] {
            let text =
                format!("on: push\njobs:\n  j:\n    runs-on: {runs_on}\n    steps: [{{run: a}}]\n");
            let s = set(&[&text]);
            let sel = select(&s, &[true], &[]).unwrap();
            let JobKind::Steps(job) = &s.top[0].jobs["j"].kind else {
                panic!("a steps job")
            };
            let ours = match runners.base_for(&job.runs_on) {
                JobBase::Base(b) => Some(b),
                JobBase::None => None,
                JobBase::Template => panic!("runs-on: {runs_on} is no template"),
            };
            let cfg = RunConfig {
                facts: RunFacts {
                    event_name: "push".into(),
                    ..RunFacts::default()
                },
                platforms: platforms.clone(),
                max_running: 1,
                ..RunConfig::default()
            };
            let mut run = Run::new(s.clone(), &sel, cfg).unwrap();
            let theirs = run.poll().into_iter().find_map(|a| match a {
                Action::Start(t) => Some(t.base),
                Action::Cancel(_) => None,
            });
            assert_eq!(ours, theirs, "runs-on: {runs_on}");
        }
        let template = Value::str("${{ matrix.os }}");
        assert_eq!(runners.base_for(&template), JobBase::Template);
        assert_eq!(runners.node_for(&template), BaseNode::Unknown);
    }
}
