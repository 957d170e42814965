use super::*;
use crate::engine::contexts::RunFacts;
use crate::engine::graph::{select, WorkflowSet};
use crate::engine::run::{Action, Run, RunConfig};
use crate::workflow::parse;

/// The ticket of the first leg of a one-job workflow, with `secrets`.
fn ticket(text: &str, secrets: &[(&str, &str)]) -> LegTicket {
    let s = WorkflowSet {
        top: vec![parse(text, "ci.yml").unwrap()],
        ..WorkflowSet::default()
    };
    let sel = select(&s, &[true], &[]).unwrap();
    let mut cfg = RunConfig {
        facts: RunFacts {
            event_name: "push".into(),
            git_ref: "refs/heads/main".into(),
            repository: "octo/hello".into(),
            sha: "abc".into(),
            ..RunFacts::default()
        },
        max_running: 1,
        ..RunConfig::default()
    };
    cfg.env.insert("FROM_FILE".into(), Value::str("file"));
    cfg.env.insert("OVERRIDDEN".into(), Value::str("file"));
    for (k, v) in secrets {
        cfg.secrets.insert(*k, Value::str(*v));
    }
    let mut run = Run::new(s, &sel, cfg).unwrap();
    match run.poll().into_iter().next() {
        Some(Action::Start(t)) => *t,
        other => panic!("expected a leg to start, got {other:?}"),
    }
}

fn run_step(leg: &mut Leg) -> Box<ResolvedStep> {
    match leg.next(None) {
        Next::Run(s) => s,
        other => panic!("expected a step to run, got {other:?}"),
    }
}

fn ok() -> StepRun {
    StepRun {
        outcome: Some(Conclusion::Success),
        ..StepRun::default()
    }
}

fn failed() -> StepRun {
    StepRun {
        outcome: Some(Conclusion::Failure),
        exit_code: Some(3),
        ..StepRun::default()
    }
}

#[test]
fn env_layers_merge_in_githubs_order_and_the_workspace_is_stable() {
    let mut leg = Leg::new(ticket(
        r#"
on: push
env: { OVERRIDDEN: workflow, WF: w }
jobs:
  j:
    runs-on: ubuntu-latest
    env: { OVERRIDDEN: job, JOB: "${{ env.WF }}-j" }
    defaults: { run: { working-directory: sub } }
    steps:
      - run: echo "A=1" >> "$GITHUB_ENV"
      - env: { STEP: "${{ env.A }}", OVERRIDDEN: step }
        run: echo "${{ env.JOB }} ${{ github.ref_name }} ${{ github.workspace }}"
"#,
        &[],
    ));
    let s1 = run_step(&mut leg);
    assert_eq!(s1.env["OVERRIDDEN"], "job");
    assert_eq!(s1.env["FROM_FILE"], "file");
    assert_eq!(s1.env["GITHUB_WORKSPACE"], "/workspace");
    assert_eq!(s1.env["GITHUB_REF_NAME"], "main");
    let ResolvedBody::Run {
        working_directory, ..
    } = &s1.body
    else {
        panic!()
    };
    assert_eq!(working_directory, "/workspace/sub");
    leg.record(
        &s1,
        StepRun {
            env: IndexMap::from([("A".to_string(), "1".to_string())]),
            path: vec!["/opt/a/bin".into(), "/opt/b/bin".into()],
            ..ok()
        },
    );
    let s2 = run_step(&mut leg);
    assert_eq!(s2.env["A"], "1", "$GITHUB_ENV carries over");
    assert_eq!(s2.env["STEP"], "1");
    assert_eq!(s2.env["OVERRIDDEN"], "step");
    assert!(
        s2.env["PATH"].starts_with("/opt/b/bin:/opt/a/bin:"),
        "{}",
        s2.env["PATH"]
    );
    let ResolvedBody::Run { script, .. } = &s2.body else {
        panic!()
    };
    assert_eq!(script, "echo \"w-j main /workspace\"");
}

#[test]
fn a_false_if_skips_without_a_vm_and_steps_see_the_outcome() {
    let mut leg = Leg::new(ticket(
        r#"
on: push
jobs:
  j:
    runs-on: ubuntu-latest
    outputs: { o: "${{ steps.s.outcome }}/${{ steps.s.conclusion }}" }
    steps:
      - id: s
        if: github.ref == 'refs/heads/other'
        run: never
      - run: echo "${{ steps.s.outcome }}"
"#,
        &[],
    ));
    let Next::Decided(sum) = leg.next(None) else {
        panic!("skipped without a VM")
    };
    assert_eq!(sum.outcome, Conclusion::Skipped);
    let s2 = run_step(&mut leg);
    let ResolvedBody::Run { script, .. } = &s2.body else {
        panic!()
    };
    assert_eq!(script, "echo \"skipped\"");
    leg.record(&s2, ok());
    let Next::Finished(r) = leg.next(None) else {
        panic!()
    };
    assert_eq!(
        r.outcome,
        Conclusion::Success,
        "a skipped step does not fail the job"
    );
    assert_eq!(r.outputs.get("o"), Some(&Value::str("skipped/skipped")));
}

#[test]
fn a_failure_skips_later_steps_but_failure_and_always_run() {
    let mut leg = Leg::new(ticket(
        r#"
on: push
jobs:
  j:
    runs-on: ubuntu-latest
    steps:
      - id: soft
        continue-on-error: true
        run: exit 1
      - run: echo after-soft
      - id: hard
        run: exit 3
      - run: echo skipped
      - if: failure()
        run: echo "${{ steps.soft.outcome }} ${{ steps.soft.conclusion }} ${{ steps.hard.outcome }} ${{ job.status }}"
      - if: always()
        run: echo always
"#,
        &[],
    ));
    let soft = run_step(&mut leg);
    let sum = leg.record(&soft, failed());
    assert_eq!(
        (sum.outcome, sum.conclusion),
        (Conclusion::Failure, Conclusion::Success)
    );
    let after = run_step(&mut leg);
    leg.record(&after, ok());
    let hard = run_step(&mut leg);
    let sum = leg.record(&hard, failed());
    assert_eq!(sum.conclusion, Conclusion::Failure);
    assert!(matches!(leg.next(None), Next::Decided(s) if s.outcome == Conclusion::Skipped));
    let on_failure = run_step(&mut leg);
    let ResolvedBody::Run { script, .. } = &on_failure.body else {
        panic!()
    };
    assert_eq!(script, "echo \"failure success failure failure\"");
    leg.record(&on_failure, ok());
    let always = run_step(&mut leg);
    leg.record(&always, ok());
    let Next::Finished(r) = leg.next(None) else {
        panic!()
    };
    assert_eq!(r.outcome, Conclusion::Failure);
}

#[test]
fn secrets_never_reach_the_written_step_but_travel_as_references() {
    let mut leg = Leg::new(ticket(
        r#"
on: push
env: { TOKEN: "${{ secrets.TOKEN }}" }
jobs:
  j:
    runs-on: ubuntu-latest
    outputs: { leak: "${{ steps.s.outputs.v }}", fine: "${{ steps.s.outputs.w }}" }
    steps:
      - id: s
        run: |
          curl -H "auth: ${{ secrets.TOKEN }}" x
          echo "${{ format('{0}-{1}', secrets.TOKEN, 'x') }}"
          echo "${{ secrets.MULTI }}"
      - run: echo "${{ steps.s.outputs.v }}"
"#,
        &[("TOKEN", "s3cr3t"), ("MULTI", "line-one\nline-two")],
    ));
    let s = run_step(&mut leg);
    let files = crate::engine::synth::step_files(&s);
    for needle in ["s3cr3t", "line-one", "line-two"] {
        assert!(
            !files.workflow_yaml.contains(needle),
            "{needle} leaked:\n{}",
            files.workflow_yaml
        );
        assert!(!files.actrc.contains(needle));
    }
    assert!(files.workflow_yaml.contains("${{ secrets.UDOS_SECRET_0 }}"));
    assert!(s.secrets.values().any(|v| v == "s3cr3t"));
    assert!(s.secrets.values().any(|v| v == "s3cr3t-x"));
    assert!(s.secrets.values().any(|v| v == "line-one\nline-two"));
    assert!(
        s.masks.contains(&"line-one".to_string()),
        "each line of a multi-line secret is masked"
    );
    // The env value from the workflow is a reference too.
    assert!(s.env["TOKEN"].starts_with("${{ secrets.UDOS_SECRET_"));
    // An output holding a secret is dropped from the job's outputs.
    leg.record(
        &s,
        StepRun {
            outputs: IndexMap::from([
                ("v".to_string(), "has s3cr3t in it".to_string()),
                ("w".to_string(), "plain".to_string()),
            ]),
            masks: vec!["masked-later".into()],
            ..ok()
        },
    );
    // A later step that inlines that output gets it as a reference as well, and what
    // add-mask registered is now a mask.
    let s2 = run_step(&mut leg);
    assert!(!crate::engine::synth::step_files(&s2)
        .workflow_yaml
        .contains("s3cr3t"));
    assert!(leg.masks().contains(&"masked-later".to_string()));
    leg.record(&s2, ok());
    let Next::Finished(r) = leg.next(None) else {
        panic!()
    };
    assert_eq!(r.outputs.get("leak"), None);
    assert_eq!(r.outputs.get("fine"), Some(&Value::str("plain")));
    assert!(leg.notices.iter().any(|n| n.contains("`leak`")));
}

#[test]
fn values_that_look_like_expressions_are_not_evaluated_again() {
    let mut leg = Leg::new(ticket(
        "on: push\njobs:\n  j:\n    runs-on: ubuntu-latest\n    steps:\n      - id: a\n        run: x\n      - run: echo '${{ steps.a.outputs.t }}'\n",
        &[],
    ));
    let a = run_step(&mut leg);
    leg.record(
        &a,
        StepRun {
            outputs: IndexMap::from([("t".to_string(), "${{ github.token }}".to_string())]),
            ..ok()
        },
    );
    let b = run_step(&mut leg);
    let ResolvedBody::Run { script, .. } = &b.body else {
        panic!()
    };
    assert_eq!(script, "echo '${{ '${{' }} github.token }}'");
}

#[test]
fn checkout_of_the_repository_is_served_and_others_are_refused() {
    let mut leg = Leg::new(ticket(
        r#"
on: push
jobs:
  j:
    runs-on: ubuntu-latest
    steps:
      - uses: actions/checkout@v4
        with: { fetch-depth: 0 }
      - uses: actions/checkout@v4
        with: { repository: other/repo }
      - uses: ./.github/actions/local
        with: { who: "${{ github.repository }}", n: 2 }
"#,
        &[],
    ));
    let Next::Decided(served) = leg.next(None) else {
        panic!()
    };
    assert_eq!(served.outcome, Conclusion::Success);
    assert!(served.note.as_deref().unwrap().contains("/workspace"));
    let Next::Decided(refused) = leg.next(None) else {
        panic!()
    };
    assert_eq!(refused.outcome, Conclusion::Failure);
    assert!(refused.error.as_deref().unwrap().contains("other/repo"));
    // After a failure, the local action is skipped (implicit success()).
    assert!(matches!(leg.next(None), Next::Decided(s) if s.outcome == Conclusion::Skipped));
}

#[test]
fn local_actions_get_their_inputs_evaluated() {
    let mut leg = Leg::new(ticket(
        "on: push\njobs:\n  j:\n    runs-on: ubuntu-latest\n    steps:\n      - uses: ./.github/actions/local\n        with: { who: \"${{ github.repository }}\", n: 2 }\n",
        &[],
    ));
    let s = run_step(&mut leg);
    let ResolvedBody::Uses { uses, with } = &s.body else {
        panic!()
    };
    assert_eq!(uses, "./.github/actions/local");
    assert_eq!(with["who"], "octo/hello");
    assert_eq!(with["n"], "2");
}

#[test]
fn an_expression_error_fails_its_step_with_the_reason() {
    let mut leg = Leg::new(ticket(
        "on: push\njobs:\n  j:\n    runs-on: ubuntu-latest\n    steps:\n      - run: echo ${{ fromJSON('not json') }}\n      - if: failure()\n        run: echo handled\n",
        &[],
    ));
    let Next::Decided(s) = leg.next(None) else {
        panic!()
    };
    assert_eq!(s.outcome, Conclusion::Failure);
    assert!(
        s.error.as_deref().unwrap().contains("run:"),
        "{:?}",
        s.error
    );
    let _ = run_step(&mut leg);
}

#[test]
fn after_a_cancellation_only_steps_that_ask_run() {
    let mut leg = Leg::new(ticket(
        "on: push\njobs:\n  j:\n    runs-on: ubuntu-latest\n    steps:\n      - run: a\n      - run: b\n      - if: cancelled()\n        run: c\n      - if: always()\n        run: d\n",
        &[],
    ));
    let a = run_step(&mut leg);
    leg.cancel();
    leg.record(
        &a,
        StepRun {
            outcome: Some(Conclusion::Cancelled),
            ..StepRun::default()
        },
    );
    assert!(matches!(leg.next(None), Next::Decided(s) if s.outcome == Conclusion::Skipped));
    let c = run_step(&mut leg);
    leg.record(&c, ok());
    let d = run_step(&mut leg);
    leg.record(&d, ok());
    let Next::Finished(r) = leg.next(None) else {
        panic!()
    };
    assert_eq!(r.outcome, Conclusion::Cancelled);
}

#[test]
fn step_timeouts_and_continue_on_error_may_be_expressions() {
    let mut leg = Leg::new(ticket(
        "on: push\njobs:\n  j:\n    runs-on: ubuntu-latest\n    steps:\n      - run: a\n        timeout-minutes: ${{ fromJSON('2') }}\n        continue-on-error: ${{ github.ref_name == 'main' }}\n",
        &[],
    ));
    let s = run_step(&mut leg);
    assert_eq!(s.timeout_minutes, Some(2.0));
    assert!(s.continue_on_error);
}

#[test]
fn an_action_of_another_repository_runs_as_written_once_pinned() {
    use crate::engine::graph::selected_steps_mut;
    use crate::workflow::action::{ActionDef, ActionKind, PinnedAction, RemoteUses};
    let text = "on: push\njobs:\n  j:\n    runs-on: ubuntu-latest\n    steps:\n      - uses: octo/tools/sub@v1\n        with: { who: \"${{ github.repository }}\" }\n      - uses: octo/unpinned@v1\n";
    let mut s = WorkflowSet {
        top: vec![parse(text, "ci.yml").unwrap()],
        ..WorkflowSet::default()
    };
    let sel = select(&s, &[true], &[]).unwrap();
    let sha = "c0ffee".repeat(6) + "c0ff";
    let pinned = PinnedAction {
        uses: "octo/tools/sub@v1".into(),
        at: RemoteUses::parse("octo/tools/sub@v1").unwrap(),
        pin: sha.clone(),
        local: None,
        def: ActionDef {
            name: None,
            kind: ActionKind::Composite,
            uses: vec![],
        },
    };
    for (at, step) in selected_steps_mut(&mut s, &sel) {
        if step.number == 1 {
            assert_eq!(at, "ci.yml: job `j`, step 1");
            step.actions.push(pinned.clone());
        }
    }
    let cfg = RunConfig {
        facts: RunFacts {
            event_name: "push".into(),
            repository: "octo/hello".into(),
            ..RunFacts::default()
        },
        max_running: 1,
        ..RunConfig::default()
    };
    let mut run = Run::new(s, &sel, cfg).unwrap();
    let Some(Action::Start(t)) = run.poll().into_iter().next() else {
        panic!("a leg starts")
    };
    let mut leg = Leg::new(*t);
    let step = run_step(&mut leg);
    let ResolvedBody::Uses { uses, with } = &step.body else {
        panic!("a uses step")
    };
    // As written: act finds the pinned tree by its ref (synth's --local-repository).
    assert_eq!(uses, "octo/tools/sub@v1");
    assert_eq!(with["who"], "octo/hello");
    assert_eq!(leg.actions(&step), [pinned]);
    leg.record(&step, ok());
    // A remote action nobody pinned cannot run: its step fails, saying so.
    let Next::Decided(s) = leg.next(None) else {
        panic!("decided without a VM")
    };
    assert_eq!(s.outcome, Conclusion::Failure);
    assert!(s.error.unwrap().contains("not pinned"));
}
