use super::*;

const WF: &str = r#"
name: ci
on: [push, workflow_dispatch]
permissions: read-all
env: { A: "1", N: 3.10, B: true }
defaults:
  run: { shell: bash, working-directory: src }
jobs:
  build:
    runs-on: [self-hosted, linux]
    outputs:
      v: ${{ steps.make.outputs.v }}
    strategy:
      fail-fast: false
      max-parallel: 2
      matrix:
        os: [ubuntu, debian]
        include: [{ os: ubuntu, extra: yes }]
    timeout-minutes: 30
    continue-on-error: ${{ matrix.os == 'debian' }}
    steps:
      - name: first
        id: make
        run: echo "v=1" >> "$GITHUB_OUTPUT"
        env: { X: "${{ matrix.os }}" }
        timeout-minutes: 5
      - uses: ./.github/actions/local
        with: { who: me, n: 1 }
        if: always()
      - uses: actions/checkout@v4
  test:
    needs: build
    if: ${{ needs.build.outputs.v == '1' }}
    runs-on: ubuntu-latest
    steps:
      - run: |
          echo a
          echo b
  call:
    needs: [build, test]
    uses: ./.github/workflows/reusable.yml
    with: { level: 2 }
    secrets: inherit
"#;

#[test]
fn parses_jobs_steps_and_keeps_templates_as_written() {
    let wf = parse(WF, ".github/workflows/ci.yml").unwrap();
    assert_eq!(wf.name, "ci");
    assert_eq!(wf.env["N"], Value::Number(3.1));
    assert_eq!(wf.defaults.shell.as_deref(), Some("bash"));
    assert_eq!(
        wf.jobs.keys().collect::<Vec<_>>(),
        ["build", "test", "call"]
    );
    assert!(
        wf.ignored.iter().any(|n| n.contains("`permissions`")),
        "{:?}",
        wf.ignored
    );

    let build = &wf.jobs["build"];
    let JobKind::Steps(steps) = &build.kind else {
        panic!("build runs steps")
    };
    assert_eq!(
        steps.runs_on,
        Value::Array(vec![Value::str("self-hosted"), Value::str("linux")])
    );
    assert_eq!(steps.outputs["v"], "${{ steps.make.outputs.v }}");
    let strategy = build.strategy.as_ref().unwrap();
    assert_eq!(strategy.fail_fast, Value::Bool(false));
    assert_eq!(strategy.max_parallel, Some(Value::Number(2.0)));
    assert!(strategy.matrix.get("include").is_some());
    assert_eq!(build.timeout_minutes, Some(Value::Number(30.0)));
    assert_eq!(
        build.continue_on_error,
        Value::str("${{ matrix.os == 'debian' }}")
    );
    assert_eq!(steps.steps.len(), 3);
    assert_eq!(steps.steps[0].id.as_deref(), Some("make"));
    assert_eq!(steps.steps[0].display_name(), "first");
    assert_eq!(steps.steps[0].env["X"], Value::str("${{ matrix.os }}"));
    let StepBody::Uses { uses, with } = &steps.steps[1].body else {
        panic!("uses step")
    };
    assert_eq!(uses, &StepUses::Local("./.github/actions/local".into()));
    assert_eq!(with["n"], Value::Number(1.0));
    assert_eq!(steps.steps[1].condition.as_deref(), Some("always()"));
    let StepBody::Uses { uses, .. } = &steps.steps[2].body else {
        panic!("uses step")
    };
    assert!(uses.is_checkout());
    assert_eq!(steps.steps[2].display_name(), "Run actions/checkout@v4");

    let test = &wf.jobs["test"];
    assert_eq!(test.needs, ["build"]);
    let JobKind::Steps(t) = &test.kind else {
        panic!()
    };
    assert_eq!(t.steps[0].display_name(), "Run echo a");

    let JobKind::Call(call) = &wf.jobs["call"].kind else {
        panic!("call job")
    };
    assert_eq!(call.uses, "./.github/workflows/reusable.yml");
    assert_eq!(call.secrets, CallSecrets::Inherit);
    assert_eq!(wf.jobs["call"].needs, ["build", "test"]);
}

#[test]
fn every_refusal_names_the_key_and_where_it_is() {
    let job = |body: &str| format!("on: push\njobs:\n  j:\n    runs-on: x\n{body}");
    for (text, needles) in [
        ("jobs: [".to_string(), vec!["not valid YAML"]),
        ("- a\n".to_string(), vec!["mapping"]),
        (
            "jobs: {j: {runs-on: x, steps: [{run: a}]}}\n".to_string(),
            vec!["no `on:`"],
        ),
        ("on: push\n".to_string(), vec!["no `jobs:`"]),
        (
            "on: push\nfoo: 1\njobs: {j: {runs-on: x, steps: [{run: a}]}}\n".into(),
            vec!["unknown key `foo`", "top level"],
        ),
        (
            job("    container: node:20\n    steps: [{run: a}]\n"),
            vec!["`container` is not supported", "jobs.j", "Docker"],
        ),
        (
            job("    services: {db: {image: postgres}}\n    steps: [{run: a}]\n"),
            vec!["`services`", "jobs.j"],
        ),
        (
            job("    steps: [{run: a, bogus: 1}]\n"),
            vec!["unknown key `bogus`", "jobs.j.steps[1]"],
        ),
        (
            job("    steps: [{name: x}]\n"),
            vec!["exactly one of `run:` or `uses:`"],
        ),
        (
            job("    steps: [{run: a, id: s}, {run: b, id: S}]\n"),
            vec!["two steps have the id `S`", "jobs.j.steps[2]"],
        ),
        (job("    steps: [{run: a, id: udos-x}]\n"), vec!["udos-"]),
        (
            job("    needs: nope\n    steps: [{run: a}]\n"),
            vec!["needs `nope`", "jobs.j.needs"],
        ),
        (
            job("    strategy: {matrix: {a: [1]}, bogus: 2}\n    steps: [{run: a}]\n"),
            vec!["unknown key `bogus`", "jobs.j.strategy"],
        ),
        (
            job("    steps: [{run: a, with: {x: 1}}]\n"),
            vec!["`with:` is for `uses:` steps"],
        ),
        (
            job("    steps: [{uses: nonsense}]\n"),
            vec!["jobs.j.steps[1].uses"],
        ),
        (
            "on: push\njobs:\n  c:\n    uses: org/repo/.github/workflows/x.yml@v1\n".into(),
            vec!["jobs.c.uses", "other repositories"],
        ),
        (
            "on: push\njobs:\n  c:\n    uses: ./x.yml\n    steps: [{run: a}]\n".into(),
            vec!["unknown key `steps`", "jobs.c"],
        ),
        (
            "on: push\njobs:\n  'a b':\n    runs-on: x\n    steps: [{run: a}]\n".into(),
            vec!["job id"],
        ),
        (
            job("    steps: [{run: a, env: {X: [1]}}]\n"),
            vec!["jobs.j.steps[1].env.X"],
        ),
    ] {
        let err = parse(&text, "wf.yml").unwrap_err().to_string();
        assert!(err.starts_with("wf.yml"), "{text:?}: {err}");
        for n in needles {
            assert!(err.contains(n), "{text:?}: `{n}` not in: {err}");
        }
    }
}

#[test]
fn ignored_keys_are_reported_not_dropped() {
    let wf = parse(
        "on: push\nconcurrency: ci\njobs:\n  j:\n    runs-on: x\n    environment: prod\n    steps: [{run: a}]\n",
        "wf.yml",
    )
    .unwrap();
    assert_eq!(wf.ignored.len(), 2, "{:?}", wf.ignored);
    assert!(wf.ignored[0].contains("`concurrency`"));
    assert!(wf.ignored[1].contains("`environment` in jobs.j"));
}

#[test]
fn scalars_are_read_as_github_stringifies_them() {
    let wf = parse(
        "on: push\njobs:\n  j:\n    runs-on: x\n    steps:\n      - run: true\n        name: 42\n",
        "wf.yml",
    )
    .unwrap();
    let JobKind::Steps(s) = &wf.jobs["j"].kind else {
        panic!()
    };
    assert_eq!(s.steps[0].display_name(), "42");
    assert!(matches!(&s.steps[0].body, StepBody::Run { run, .. } if run == "true"));
}
