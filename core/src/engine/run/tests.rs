use super::*;
use crate::engine::graph::{select, WorkflowSet};
use crate::workflow::parse;

fn set(text: &str) -> WorkflowSet {
    WorkflowSet {
        top: vec![parse(text, "ci.yml").unwrap()],
        ..WorkflowSet::default()
    }
}

fn cfg(max_running: usize) -> RunConfig {
    RunConfig {
        facts: RunFacts {
            event_name: "push".into(),
            git_ref: "refs/heads/main".into(),
            repository: "o/r".into(),
            ..RunFacts::default()
        },
        max_running,
        ..RunConfig::default()
    }
}

fn run_of(text: &str, max_running: usize) -> Run {
    let s = set(text);
    let sel = select(&s, &[true], &[]).unwrap();
    Run::new(s, &sel, cfg(max_running)).unwrap()
}

fn started(actions: &[Action]) -> Vec<LegTicket> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Start(t) => Some((**t).clone()),
            _ => None,
        })
        .collect()
}

fn names(ts: &[LegTicket]) -> Vec<String> {
    ts.iter().map(|t| t.name.clone()).collect()
}

fn finish(run: &mut Run, id: LegId, outcome: Conclusion, outputs: &[(&str, &str)]) {
    run.leg_finished(
        id,
        LegResult {
            outcome,
            outputs: outputs
                .iter()
                .map(|(k, v)| (k.to_string(), Value::str(*v)))
                .collect(),
            error: None,
        },
    );
}

fn outcome_of(run: &Run, report_id: &str) -> Vec<Option<Conclusion>> {
    run.legs()
        .iter()
        .filter(|l| l.report_id == report_id)
        .map(|l| l.outcome)
        .collect()
}

const GRAPH: &str = r#"
on: push
jobs:
  a:
    runs-on: ubuntu-latest
    outputs: { v: "${{ steps.x.outputs.v }}" }
    steps: [{run: a}]
  b:
    runs-on: ubuntu-latest
    steps: [{run: b}]
  m:
    runs-on: ubuntu-latest
    strategy:
      matrix:
        os: [x, y, z]
        exclude: [{os: z}]
        include: [{os: w}]
    steps: [{run: m}]
  join:
    needs: [a, b, m]
    runs-on: ubuntu-latest
    steps:
      - run: echo "${{ needs.a.outputs.v }} ${{ needs.m.result }}"
  on-failure:
    needs: join
    if: failure()
    runs-on: ubuntu-latest
    steps: [{run: x}]
"#;

#[test]
fn independent_jobs_start_together_within_the_limit_and_needs_wait() {
    let mut run = run_of(GRAPH, 2);
    let first = started(&run.poll());
    // Two VMs at once: a and b; the matrix legs wait for a slot.
    assert_eq!(names(&first), ["a", "b"]);
    assert_eq!(run.running(), 2);
    finish(&mut run, first[0].id, Conclusion::Success, &[("v", "42")]);
    let next = started(&run.poll());
    assert_eq!(names(&next), ["m (x)"]);
    finish(&mut run, first[1].id, Conclusion::Success, &[]);
    let next2 = started(&run.poll());
    assert_eq!(names(&next2), ["m (y)"]);
    finish(&mut run, next[0].id, Conclusion::Success, &[]);
    let next3 = started(&run.poll());
    // include added a leg: x, y and w (z excluded).
    assert_eq!(names(&next3), ["m (w)"]);
    assert!(started(&run.poll()).is_empty(), "join waits for all of m");
    finish(&mut run, next2[0].id, Conclusion::Success, &[]);
    finish(&mut run, next3[0].id, Conclusion::Success, &[]);
    let join = started(&run.poll());
    assert_eq!(names(&join), ["join"]);
    // needs.* reaches the dependent job's contexts.
    let needs = join[0].contexts.get("needs").unwrap();
    assert_eq!(
        needs
            .get("a")
            .and_then(|a| a.get("outputs"))
            .and_then(|o| o.get("v")),
        Some(&Value::str("42"))
    );
    assert_eq!(
        needs.get("m").and_then(|m| m.get("result")),
        Some(&Value::str("success"))
    );
    finish(&mut run, join[0].id, Conclusion::Success, &[]);
    assert!(started(&run.poll()).is_empty());
    assert!(run.is_done());
    // if: failure() with nothing failed: skipped.
    assert_eq!(outcome_of(&run, "on-failure"), [Some(Conclusion::Skipped)]);
    assert_eq!(run.conclusion(), Conclusion::Success);
}

#[test]
fn a_failure_skips_dependents_unless_they_ask_and_fails_the_run() {
    let mut run = run_of(
        r#"
on: push
jobs:
  a: {runs-on: ubuntu-latest, steps: [{run: a}]}
  b: {needs: a, runs-on: ubuntu-latest, steps: [{run: b}]}
  c: {needs: b, if: failure(), runs-on: ubuntu-latest, steps: [{run: c}]}
  d: {needs: b, if: always(), runs-on: ubuntu-latest, steps: [{run: d}]}
  e: {needs: a, if: "always() && needs.a.result == 'failure'", runs-on: ubuntu-latest, steps: [{run: e}]}
"#,
        4,
    );
    let a = started(&run.poll());
    finish(&mut run, a[0].id, Conclusion::Failure, &[]);
    let next = started(&run.poll());
    // b skipped (a failed); c runs (an ancestor failed); d and e run.
    let mut n = names(&next);
    n.sort();
    assert_eq!(n, ["c", "d", "e"]);
    assert_eq!(outcome_of(&run, "b"), [Some(Conclusion::Skipped)]);
    for t in next {
        finish(&mut run, t.id, Conclusion::Success, &[]);
    }
    run.poll();
    assert!(run.is_done());
    assert_eq!(run.conclusion(), Conclusion::Failure);
}

#[test]
fn fail_fast_cancels_the_other_legs_and_continue_on_error_does_not() {
    let text = |ff: bool, coe: &str| {
        format!(
            r#"
on: push
jobs:
  t:
    runs-on: ubuntu-latest
    continue-on-error: {coe}
    strategy:
      fail-fast: {ff}
      max-parallel: 2
      matrix: {{ n: [1, 2, 3, 4] }}
    steps: [{{run: x}}]
"#
        )
    };
    // fail-fast: the running sibling is cancelled, the queued ones never start.
    let mut run = run_of(&text(true, "false"), 8);
    let legs = started(&run.poll());
    assert_eq!(names(&legs), ["t (1)", "t (2)"], "max-parallel 2");
    finish(&mut run, legs[0].id, Conclusion::Failure, &[]);
    let actions = run.poll();
    assert_eq!(actions, vec![Action::Cancel(legs[1].id)]);
    finish(&mut run, legs[1].id, Conclusion::Cancelled, &[]);
    assert!(started(&run.poll()).is_empty());
    assert!(run.is_done());
    assert_eq!(
        outcome_of(&run, "t"),
        [
            Some(Conclusion::Failure),
            Some(Conclusion::Cancelled),
            Some(Conclusion::Cancelled),
            Some(Conclusion::Cancelled)
        ]
    );
    assert_eq!(run.conclusion(), Conclusion::Failure);

    // fail-fast off: the others go on.
    let mut run = run_of(&text(false, "false"), 8);
    let legs = started(&run.poll());
    finish(&mut run, legs[0].id, Conclusion::Failure, &[]);
    assert_eq!(names(&started(&run.poll())), ["t (3)"]);

    // continue-on-error as an expression, true for n == 1: that failure neither
    // cancels the others nor fails the run.
    let mut run = run_of(&text(true, "${{ matrix.n == 1 }}"), 8);
    let mut live = started(&run.poll());
    let first = live.remove(0);
    finish(&mut run, first.id, Conclusion::Failure, &[]);
    live.extend(started(&run.poll()));
    assert_eq!(live.len(), 2, "no cancellation: {:?}", names(&live));
    while let Some(t) = live.pop() {
        finish(&mut run, t.id, Conclusion::Success, &[]);
        live.extend(started(&run.poll()));
    }
    assert!(run.is_done());
    assert_eq!(run.conclusion(), Conclusion::Success);
    let legs = run.legs();
    assert_eq!(legs[0].outcome, Some(Conclusion::Failure));
    assert_eq!(legs[0].conclusion, Some(Conclusion::Success));
}

#[test]
fn a_matrix_from_needs_outputs_and_leg_contexts() {
    let mut run = run_of(
        r#"
on: push
jobs:
  plan:
    runs-on: ubuntu-latest
    outputs: { list: "${{ steps.p.outputs.list }}" }
    steps: [{id: p, run: x}]
  build:
    needs: plan
    name: build ${{ matrix.target }}
    runs-on: ubuntu-latest
    strategy:
      matrix:
        target: ${{ fromJSON(needs.plan.outputs.list) }}
    steps: [{run: x}]
"#,
        4,
    );
    let p = started(&run.poll());
    finish(
        &mut run,
        p[0].id,
        Conclusion::Success,
        &[("list", r#"["arm", "x86"]"#)],
    );
    let legs = started(&run.poll());
    assert_eq!(names(&legs), ["build arm", "build x86"]);
    let strategy = legs[1].contexts.get("strategy").unwrap();
    assert_eq!(strategy.get("job-index"), Some(&Value::Number(1.0)));
    assert_eq!(strategy.get("job-total"), Some(&Value::Number(2.0)));
    assert_eq!(
        legs[0].contexts.get("matrix").and_then(|m| m.get("target")),
        Some(&Value::str("arm"))
    );
}

#[test]
fn runs_on_maps_through_platforms_and_unknown_labels_skip() {
    let text = r#"
on: push
jobs:
  t:
    runs-on: ${{ matrix.os }}
    strategy: { matrix: { os: [ubuntu-22.04, windows-latest, self-hosted] } }
    steps: [{run: x}]
"#;
    let mut run = run_of(text, 8);
    let legs = started(&run.poll());
    assert_eq!(names(&legs), ["t (ubuntu-22.04)", "t (self-hosted)"]);
    assert!(legs.iter().all(|t| t.base == DEFAULT_BASE));
    assert!(run.notices.iter().any(|n| n.contains("windows-latest")));
    assert_eq!(outcome_of(&run, "t")[1], Some(Conclusion::Skipped));
    // -P maps a label to a base.
    let s = set(text);
    let sel = select(&s, &[true], &[]).unwrap();
    let mut c = cfg(8);
    c.platforms = vec![("windows-latest".into(), "minimal".into())];
    let mut run = Run::new(s, &sel, c).unwrap();
    let legs = started(&run.poll());
    assert_eq!(legs.len(), 3);
    assert_eq!(legs[1].base, "minimal");
}

#[test]
fn the_matrix_filter_picks_legs() {
    let s = set("on: push\njobs:\n  t:\n    runs-on: ubuntu-latest\n    strategy: {matrix: {a: [1, 2], b: [x, y]}}\n    steps: [{run: x}]\n");
    let sel = select(&s, &[true], &[]).unwrap();
    let mut c = cfg(8);
    c.matrix_filter = vec![("a".into(), "2".into())];
    let mut run = Run::new(s, &sel, c).unwrap();
    assert_eq!(names(&started(&run.poll())), ["t (2, x)", "t (2, y)"]);
}

#[test]
fn a_job_if_error_fails_the_job_with_the_reason() {
    let mut run = run_of(
        "on: push\njobs:\n  t:\n    if: nosuchcontext.x\n    runs-on: ubuntu-latest\n    steps: [{run: x}]\n",
        1,
    );
    assert!(started(&run.poll()).is_empty());
    let legs = run.legs();
    assert_eq!(legs[0].outcome, Some(Conclusion::Failure));
    assert!(
        legs[0].error.as_deref().unwrap().contains("nosuchcontext"),
        "{:?}",
        legs[0].error
    );
    assert_eq!(run.conclusion(), Conclusion::Failure);
}

#[test]
fn cancelling_the_run_stops_running_legs_and_skips_the_rest() {
    let mut run = run_of(
        "on: push\njobs:\n  a: {runs-on: ubuntu-latest, steps: [{run: a}]}\n  b: {needs: a, runs-on: ubuntu-latest, steps: [{run: b}]}\n  c: {needs: a, if: always(), runs-on: ubuntu-latest, steps: [{run: c}]}\n",
        2,
    );
    let a = started(&run.poll());
    run.cancel_all();
    assert_eq!(run.poll(), vec![Action::Cancel(a[0].id)]);
    finish(&mut run, a[0].id, Conclusion::Cancelled, &[]);
    // always() still runs after a cancellation, as on GitHub.
    let next = started(&run.poll());
    assert_eq!(names(&next), ["c"]);
    assert_eq!(outcome_of(&run, "b"), [Some(Conclusion::Cancelled)]);
    finish(&mut run, next[0].id, Conclusion::Success, &[]);
    run.poll();
    assert!(run.is_done());
    assert_eq!(run.conclusion(), Conclusion::Cancelled);
}

const CALLER: &str = r#"
on: push
jobs:
  pre:
    runs-on: ubuntu-latest
    outputs: { n: "${{ steps.s.outputs.n }}" }
    steps: [{id: s, run: x}]
  call:
    needs: pre
    uses: ./.github/workflows/reusable.yml
    with:
      count: ${{ fromJSON(needs.pre.outputs.n) }}
      label: hello
    secrets: inherit
  after:
    needs: call
    runs-on: ubuntu-latest
    steps:
      - run: echo "${{ needs.call.outputs.doubled }}"
"#;

const CALLEE: &str = r#"
on:
  workflow_call:
    inputs:
      count: { type: number, required: true }
      label: { type: string, default: none }
      flag: { type: boolean, default: true }
    outputs:
      doubled: { value: "${{ jobs.inner.outputs.d }}" }
jobs:
  inner:
    runs-on: ubuntu-latest
    outputs: { d: "${{ steps.s.outputs.d }}" }
    steps: [{id: s, run: "echo ${{ inputs.count }}"}]
"#;

#[test]
fn a_reusable_workflow_gets_typed_inputs_and_gives_outputs() {
    let mut s = set(CALLER);
    s.called.insert(
        ".github/workflows/reusable.yml".into(),
        parse(CALLEE, ".github/workflows/reusable.yml").unwrap(),
    );
    let sel = select(&s, &[true], &[]).unwrap();
    let mut c = cfg(4);
    c.secrets.insert("TOKEN", Value::str("t0k"));
    let mut run = Run::new(s, &sel, c).unwrap();
    let pre = started(&run.poll());
    finish(&mut run, pre[0].id, Conclusion::Success, &[("n", "3")]);
    let inner = started(&run.poll());
    assert_eq!(names(&inner), ["call / inner"]);
    assert_eq!(inner[0].report_id, "call/inner");
    let inputs = inner[0].contexts.get("inputs").unwrap();
    assert_eq!(inputs.get("count"), Some(&Value::Number(3.0)));
    assert_eq!(inputs.get("label"), Some(&Value::str("hello")));
    assert_eq!(inputs.get("flag"), Some(&Value::Bool(true)));
    assert_eq!(
        inner[0]
            .contexts
            .get("secrets")
            .and_then(|s| s.get("TOKEN")),
        Some(&Value::str("t0k")),
        "secrets: inherit"
    );
    finish(&mut run, inner[0].id, Conclusion::Success, &[("d", "6")]);
    let after = started(&run.poll());
    assert_eq!(names(&after), ["after"]);
    assert_eq!(
        after[0]
            .contexts
            .get("needs")
            .and_then(|n| n.get("call"))
            .and_then(|c| c.get("outputs"))
            .and_then(|o| o.get("doubled")),
        Some(&Value::str("6"))
    );
    let call = run
        .legs()
        .into_iter()
        .find(|l| l.report_id == "call")
        .unwrap();
    assert!(call.is_call);
    assert_eq!(call.outcome, Some(Conclusion::Success));
}

#[test]
fn a_reusable_workflow_with_bad_inputs_fails_the_caller() {
    let mut s = set(&CALLER.replace("      count: ${{ fromJSON(needs.pre.outputs.n) }}\n", ""));
    s.called.insert(
        ".github/workflows/reusable.yml".into(),
        parse(CALLEE, ".github/workflows/reusable.yml").unwrap(),
    );
    let sel = select(&s, &[true], &[]).unwrap();
    let mut run = Run::new(s, &sel, cfg(4)).unwrap();
    let pre = started(&run.poll());
    finish(&mut run, pre[0].id, Conclusion::Success, &[]);
    assert!(started(&run.poll()).is_empty());
    let call = run
        .legs()
        .into_iter()
        .find(|l| l.report_id == "call")
        .unwrap();
    assert_eq!(call.outcome, Some(Conclusion::Failure));
    assert!(
        call.error.as_deref().unwrap().contains("count"),
        "{:?}",
        call.error
    );
    assert_eq!(outcome_of(&run, "after"), [Some(Conclusion::Skipped)]);
}

#[test]
fn dispatch_inputs_are_typed_and_required_ones_checked() {
    let text = r#"
on:
  workflow_dispatch:
    inputs:
      level: { type: choice, options: [low, high], required: true }
      dry: { type: boolean, default: false }
jobs:
  t: {runs-on: ubuntu-latest, steps: [{run: x}]}
"#;
    let s = set(text);
    let sel = select(&s, &[true], &[]).unwrap();
    let mut c = cfg(1);
    c.facts.event_name = "workflow_dispatch".into();
    let err = Run::new(s.clone(), &sel, c.clone())
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("level"), "{err}");
    c.inputs.insert("level".into(), Value::str("high"));
    c.inputs.insert("dry".into(), Value::str("true"));
    let mut run = Run::new(s, &sel, c).unwrap();
    let t = started(&run.poll());
    let inputs = t[0].contexts.get("inputs").unwrap();
    assert_eq!(inputs.get("dry"), Some(&Value::Bool(true)));
    assert_eq!(inputs.get("level"), Some(&Value::str("high")));
}

#[test]
fn a_job_timeout_and_the_default_are_on_the_ticket() {
    let mut run = run_of(
        "on: push\njobs:\n  a: {runs-on: ubuntu-latest, timeout-minutes: 2, steps: [{run: a}]}\n  b: {runs-on: ubuntu-latest, steps: [{run: b}]}\n",
        2,
    );
    let legs = started(&run.poll());
    assert_eq!(legs[0].timeout_minutes, 2.0);
    assert_eq!(legs[1].timeout_minutes, DEFAULT_JOB_TIMEOUT_MINUTES);
}
