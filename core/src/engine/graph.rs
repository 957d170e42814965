//! Which workflows and jobs run: the event's workflows, all their jobs or those `-j`
//! names plus what they need, in stages; and whether udos can run every step of them.

use std::collections::{BTreeMap, BTreeSet};

use crate::workflow::action::{ActionDef, ActionKind};
use crate::workflow::{JobKind, StepBody, StepUses, Workflow};

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

/// Can udos run every step of the selected jobs (and of the reusable workflows they
/// call)? Every problem is listed, each naming its job and step. `base_has_node`:
/// JavaScript actions need node in the base.
pub fn check_supported(
    set: &WorkflowSet,
    sel: &Selection,
    base_has_node: bool,
) -> Result<(), EngineError> {
    let mut problems = Vec::new();
    let mut seen_called = BTreeSet::new();
    let mut todo: Vec<(&Workflow, Vec<String>)> = sel
        .workflows
        .iter()
        .map(|(i, jobs)| (&set.top[*i], jobs.clone()))
        .collect();
    while let Some((wf, jobs)) = todo.pop() {
        for id in jobs {
            let job = &wf.jobs[&id];
            match &job.kind {
                JobKind::Call(call) => {
                    let key = local_key(&call.uses);
                    match set.called.get(&key) {
                        Some(callee) => {
                            if seen_called.insert(key.clone()) {
                                todo.push((callee, callee.jobs.keys().cloned().collect()));
                            }
                        }
                        None => problems.push(format!(
                            "{}: job `{id}`: the reusable workflow `{}` is not in the repository",
                            wf.file, call.uses
                        )),
                    }
                }
                JobKind::Steps(steps) => {
                    for step in &steps.steps {
                        let StepBody::Uses { uses, .. } = &step.body else {
                            continue;
                        };
                        let at = format!("{}: job `{id}`, step {}", wf.file, step.number);
                        if let Some(p) = uses_problem(set, uses, base_has_node) {
                            problems.push(format!("{at}: {p}"));
                        }
                    }
                }
            }
        }
    }
    if problems.is_empty() {
        Ok(())
    } else {
        problems.sort();
        Err(EngineError::Plan(problems.join("\n")))
    }
}

fn uses_problem(set: &WorkflowSet, uses: &StepUses, base_has_node: bool) -> Option<String> {
    match uses {
        StepUses::Docker(image) => Some(format!(
            "`uses: {image}`: Docker actions are not supported: udos runs steps in micro-VMs without Docker"
        )),
        StepUses::Remote { .. } if uses.is_checkout() => None,
        StepUses::Remote { raw, .. } => Some(format!(
            "`uses: {raw}`: actions from other repositories are not supported yet (fetching them needs the network); use a local action (`./path`)"
        )),
        StepUses::Local(path) => match set.actions.get(&local_key(path)) {
            None => Some(format!(
                "`uses: {path}`: no action.yml or action.yaml in `{}`",
                local_key(path)
            )),
            Some(a) => match &a.kind {
                ActionKind::Composite => None,
                ActionKind::Docker => Some(format!(
                    "`uses: {path}` is a Docker action: not supported, udos runs steps in micro-VMs without Docker"
                )),
                ActionKind::Node { using, .. } if !base_has_node => Some(format!(
                    "`uses: {path}` is a JavaScript action (`{using}`), and the base has no node: map the job's runner to a base with node (-P)"
                )),
                ActionKind::Node { .. } => None,
            },
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
            },
        );
        s.actions.insert(
            "composite".into(),
            ActionDef {
                name: None,
                kind: ActionKind::Composite,
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
}
