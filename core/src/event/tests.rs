//! Each `on:` snippet is parsed by the real workflow model (`github-actions-models`,
//! with its YAML parser) and, where the source matters, as a [`Value`].

use github_actions_models::workflow::Trigger;
use indexmap::IndexMap;

use super::*;
use crate::value::Value;

fn parse(on: &str) -> Result<Triggers, TriggerError> {
    let model: Trigger = yaml_serde::from_str(on).expect("the model parses the snippet");
    let source: Value = yaml_serde::from_str(on).expect("the snippet is YAML");
    Triggers::from_model_with_source(&model, &source)
}

fn triggers(on: &str) -> Triggers {
    parse(on).expect("a valid on: section")
}

fn push(git_ref: &str) -> EventFacts {
    EventFacts {
        name: "push".into(),
        git_ref: Some(git_ref.into()),
        ..EventFacts::default()
    }
}

fn push_paths(git_ref: &str, paths: &[&str]) -> EventFacts {
    EventFacts {
        changed_paths: Some(paths.iter().map(|p| p.to_string()).collect()),
        ..push(git_ref)
    }
}

fn pull_request(base: &str, activity: Option<&str>) -> EventFacts {
    EventFacts {
        name: "pull_request".into(),
        base_ref: Some(base.into()),
        activity: activity.map(str::to_string),
        ..EventFacts::default()
    }
}

fn event(name: &str, activity: Option<&str>) -> EventFacts {
    EventFacts {
        name: name.into(),
        activity: activity.map(str::to_string),
        ..EventFacts::default()
    }
}

fn reason(d: TriggerDecision) -> String {
    match d {
        TriggerDecision::NotTriggered { reason } => reason,
        TriggerDecision::Runs { notes } => panic!("expected not triggered, it runs ({notes:?})"),
    }
}

fn notes(d: TriggerDecision) -> Vec<String> {
    match d {
        TriggerDecision::Runs { notes } => notes,
        TriggerDecision::NotTriggered { reason } => panic!("expected it to run: {reason}"),
    }
}

#[test]
fn the_event_must_be_listed() {
    let t = triggers("[push, pull_request]");
    assert!(t.decide(&push("refs/heads/main")).runs());
    let r = reason(t.decide(&event("workflow_dispatch", None)));
    assert_eq!(
        r,
        "on: does not list `workflow_dispatch` (it lists: push, pull_request)"
    );
}

#[test]
fn event_names_keep_file_order_for_all_three_shapes() {
    assert_eq!(triggers("issues").event_names(), ["issues"]);
    assert_eq!(
        triggers("[workflow_dispatch, push, issues]").event_names(),
        ["workflow_dispatch", "push", "issues"]
    );
    let mapping = "workflow_dispatch:\npush:\n  branches: [main]\nissues:\n  types: [opened]\n";
    assert_eq!(
        triggers(mapping).event_names(),
        ["workflow_dispatch", "push", "issues"]
    );
    // The model alone keeps no mapping order: alphabetical.
    let model: Trigger = yaml_serde::from_str(mapping).unwrap();
    assert_eq!(
        Triggers::from_model(&model).unwrap().event_names(),
        ["issues", "push", "workflow_dispatch"]
    );
}

/// *Workflow syntax*, `on.push.<branches|tags>`, "Example: Including branches and tags".
#[test]
fn docs_push_including_branches_and_tags() {
    let t =
        triggers("push:\n  branches: [main, 'mona/octocat', 'releases/**']\n  tags: [v2, v1.*]\n");
    for r in [
        "refs/heads/main",
        "refs/heads/mona/octocat",
        "refs/heads/releases/10",
        "refs/tags/v2",
        "refs/tags/v1.9.1",
    ] {
        assert!(t.decide(&push(r)).runs(), "{r}");
    }
    assert_eq!(
        reason(t.decide(&push("refs/heads/dev"))),
        "on.push.branches does not match refs/heads/dev"
    );
    assert_eq!(
        reason(t.decide(&push("refs/tags/v3"))),
        "on.push.tags does not match refs/tags/v3"
    );
}

/// *Workflow syntax*, `on.push.<branches|tags>`, "Example: Excluding branches and tags".
#[test]
fn docs_push_excluding_branches_and_tags() {
    let t = triggers(
        "push:\n  branches-ignore: ['mona/octocat', 'releases/**-alpha']\n  tags-ignore: [v2, v1.*]\n",
    );
    for r in [
        "refs/heads/main",
        "refs/heads/releases/beta/3",
        "refs/tags/v3",
    ] {
        assert!(t.decide(&push(r)).runs(), "{r}");
    }
    for (r, key) in [
        ("refs/heads/mona/octocat", "branches-ignore"),
        ("refs/heads/releases/beta/3-alpha", "branches-ignore"),
        ("refs/tags/v2", "tags-ignore"),
        ("refs/tags/v1.9", "tags-ignore"),
    ] {
        assert_eq!(
            reason(t.decide(&push(r))),
            format!("on.push.{key} matches {r}")
        );
    }
}

/// "Example: Including and excluding branches and tags": a later `!` pattern excludes.
#[test]
fn docs_push_including_and_excluding_branches() {
    let t = triggers("push:\n  branches: ['releases/**', '!releases/**-alpha']\n");
    assert!(t.decide(&push("refs/heads/releases/10")).runs());
    assert!(t.decide(&push("refs/heads/releases/beta/mona")).runs());
    assert!(!t.decide(&push("refs/heads/releases/10-alpha")).runs());
    assert!(!t.decide(&push("refs/heads/releases/beta/3-alpha")).runs());
}

/// "If you define only tags/tags-ignore or only branches/branches-ignore, the workflow
/// won't run for events affecting the undefined Git ref. If you define neither ..., the
/// workflow will run for events affecting either branches or tags."
#[test]
fn push_with_only_one_kind_of_ref_filter_skips_the_other_kind() {
    let branches_only = triggers("push:\n  branches: ['**']\n");
    assert_eq!(
        reason(branches_only.decide(&push("refs/tags/v1"))),
        "on.push defines only branches filters, so refs/tags/v1 does not run it"
    );
    let tags_ignore_only = triggers("push:\n  tags-ignore: [nightly]\n");
    assert!(tags_ignore_only.decide(&push("refs/tags/v1")).runs());
    assert!(!tags_ignore_only.decide(&push("refs/heads/main")).runs());
    let neither = triggers("push:\n  paths: ['**']\n");
    assert!(neither.decide(&push_paths("refs/tags/v1", &["a"])).runs());
    assert!(neither.decide(&push_paths("refs/heads/x", &["a"])).runs());
}

#[test]
fn branch_patterns_may_be_written_as_full_refs() {
    let t = triggers("push:\n  branches: ['refs/heads/release/*']\n");
    assert!(t.decide(&push("refs/heads/release/1")).runs());
    assert!(!t.decide(&push("refs/heads/main")).runs());
    // A bare name counts as a branch.
    assert!(t.decide(&push("release/2")).runs());
}

/// `on.pull_request.branches` matches the base branch: "Example: Including branches",
/// "Excluding branches" and "Including and excluding branches".
#[test]
fn docs_pull_request_branches_match_the_base_branch() {
    let including = triggers("pull_request:\n  branches: [main, 'mona/octocat', 'releases/**']\n");
    for base in ["main", "refs/heads/mona/octocat", "releases/10"] {
        assert!(including.decide(&pull_request(base, None)).runs(), "{base}");
    }
    assert_eq!(
        reason(including.decide(&pull_request("dev", Some("opened")))),
        "on.pull_request.branches does not match the base branch dev"
    );

    let excluding =
        triggers("pull_request:\n  branches-ignore: ['mona/octocat', 'releases/**-alpha']\n");
    assert!(excluding.decide(&pull_request("main", None)).runs());
    assert!(!excluding
        .decide(&pull_request("releases/beta/3-alpha", None))
        .runs());

    let both = triggers("pull_request:\n  branches: ['releases/**', '!releases/**-alpha']\n");
    assert!(both
        .decide(&pull_request("releases/beta/mona", None))
        .runs());
    assert!(!both.decide(&pull_request("releases/10-alpha", None)).runs());
}

#[test]
fn pull_request_target_filters_like_pull_request() {
    let t = triggers("pull_request_target:\n  branches: [main]\n  types: [labeled]\n");
    let mut facts = pull_request("main", Some("labeled"));
    facts.name = "pull_request_target".into();
    assert!(t.decide(&facts).runs());
    facts.base_ref = Some("dev".into());
    assert_eq!(
        reason(t.decide(&facts)),
        "on.pull_request_target.branches does not match the base branch dev"
    );
}

/// "By default, a workflow only runs when a pull_request event's activity type is
/// opened, synchronize, or reopened"; `types:` replaces the default.
#[test]
fn activity_types_default_and_explicit() {
    let bare = triggers("pull_request:");
    for a in ["opened", "synchronize", "reopened"] {
        assert!(bare.decide(&pull_request("main", Some(a))).runs(), "{a}");
    }
    assert_eq!(
        reason(bare.decide(&pull_request("main", Some("closed")))),
        "on.pull_request has no types, so it runs only for opened, synchronize, reopened; \
         the activity is `closed`"
    );

    let closed = triggers("pull_request:\n  types: [closed]\n");
    assert!(closed.decide(&pull_request("main", Some("closed"))).runs());
    assert!(!closed.decide(&pull_request("main", Some("opened"))).runs());

    // Events other than pull requests run for every activity when `types` is absent.
    let issues = triggers("issues:");
    assert!(issues.decide(&event("issues", Some("deleted"))).runs());
    let labeled = triggers("label:\n  types: [created, edited]\n");
    assert_eq!(
        reason(labeled.decide(&event("label", Some("deleted")))),
        "on.label.types does not include `deleted` (it lists: created, edited)"
    );
    let dispatch = triggers("repository_dispatch:\n  types: [on-demand-test]\n");
    assert!(dispatch
        .decide(&event("repository_dispatch", Some("on-demand-test")))
        .runs());
}

#[test]
fn unknown_activity_runs_with_a_note() {
    let t = triggers("issues:\n  types: [opened]\n");
    assert_eq!(
        notes(t.decide(&event("issues", None))),
        ["activity unknown: on.issues.types (opened) not checked"]
    );
    assert_eq!(
        notes(triggers("issues:").decide(&event("issues", None))),
        [] as [String; 0]
    );
}

/// "Example: Including paths": runs if at least one path matches.
#[test]
fn docs_paths_include() {
    let t = triggers("push:\n  paths: ['**.js']\n");
    assert!(t
        .decide(&push_paths("refs/heads/main", &["README.md", "src/app.js"]))
        .runs());
    assert_eq!(
        reason(t.decide(&push_paths("refs/heads/main", &["README.md", "docs/a.md"]))),
        "on.push.paths matches none of the 2 changed paths"
    );
}

/// "Example: Excluding paths": "When all the path names match patterns in paths-ignore,
/// the workflow will not run. If any path names do not match ..., the workflow will run."
#[test]
fn docs_paths_ignore() {
    let t = triggers("push:\n  paths-ignore: ['docs/**']\n");
    assert!(t
        .decide(&push_paths("refs/heads/main", &["docs/a.md", "src/lib.rs"]))
        .runs());
    assert_eq!(
        reason(t.decide(&push_paths(
            "refs/heads/main",
            &["docs/a.md", "docs/b/c.md"]
        ))),
        "on.push.paths-ignore ignores all 2 changed paths"
    );
}

/// "Example: Including and excluding paths" (`sub-project/**`, `!sub-project/docs/**`).
#[test]
fn docs_paths_include_and_exclude() {
    let t = triggers("push:\n  paths: ['sub-project/**', '!sub-project/docs/**']\n");
    assert!(t
        .decide(&push_paths("refs/heads/main", &["sub-project/index.js"]))
        .runs());
    assert!(t
        .decide(&push_paths(
            "refs/heads/main",
            &["sub-project/src/index.js"]
        ))
        .runs());
    assert!(!t
        .decide(&push_paths(
            "refs/heads/main",
            &["sub-project/docs/readme.md"]
        ))
        .runs());
}

#[test]
fn paths_unknown_match_with_a_note_and_no_paths_do_not_run() {
    let t = triggers("pull_request:\n  paths: ['src/**']\n");
    assert_eq!(
        notes(t.decide(&pull_request("main", Some("opened")))),
        ["changed paths unknown: on.pull_request.paths treated as matching"]
    );
    // "If there are no files changed, the workflow will not run."
    assert_eq!(
        reason(t.decide(&EventFacts {
            changed_paths: Some(vec![]),
            ..pull_request("main", Some("opened"))
        })),
        "on.pull_request.paths: the event changed no paths"
    );
}

/// "If you define both branches/branches-ignore and paths/paths-ignore, the workflow
/// will only run when both filters are satisfied."
#[test]
fn branches_and_paths_must_both_be_satisfied() {
    let t = triggers("push:\n  branches: [main]\n  paths: ['src/**']\n");
    assert!(t
        .decide(&push_paths("refs/heads/main", &["src/a.rs"]))
        .runs());
    assert!(!t
        .decide(&push_paths("refs/heads/dev", &["src/a.rs"]))
        .runs());
    assert!(!t
        .decide(&push_paths("refs/heads/main", &["docs/a.md"]))
        .runs());
}

/// "Path filters are not evaluated for pushes of tags."
#[test]
fn tag_pushes_skip_path_filters() {
    let t = triggers("push:\n  tags: ['v*']\n  paths: ['src/**']\n");
    assert!(t.decide(&push_paths("refs/tags/v1", &["docs/a.md"])).runs());
}

#[test]
fn unknown_refs_run_with_a_note() {
    let t = triggers("push:\n  branches: [main]\n");
    let facts = EventFacts {
        name: "push".into(),
        ..EventFacts::default()
    };
    assert_eq!(
        notes(t.decide(&facts)),
        ["the pushed ref is unknown: on.push branch and tag filters not checked"]
    );
    let pr = triggers("pull_request:\n  branches: [main]\n");
    assert_eq!(
        notes(pr.decide(&event("pull_request", Some("opened")))),
        ["the base branch is unknown: on.pull_request.branches not checked"]
    );
}

#[test]
fn events_without_filters_run_when_named() {
    let t = triggers("schedule:\n  - cron: '0 0 * * *'\nworkflow_dispatch:\nworkflow_call:\n");
    for name in ["schedule", "workflow_dispatch", "workflow_call"] {
        assert_eq!(
            notes(t.decide(&event(name, None))),
            [] as [String; 0],
            "{name}"
        );
    }
    let run = triggers("workflow_run:\n  workflows: [CI]\n  types: [completed]\n");
    assert_eq!(
        notes(run.decide(&event("workflow_run", Some("completed")))),
        ["on.workflow_run.workflows not checked: udos has no facts for it"]
    );
}

/// "You cannot use both the branches and branches-ignore filters for the same event."
/// The model keeps only one of the two, so this needs the source.
#[test]
fn a_filter_and_its_ignore_form_together_are_an_error() {
    for (on, event, key) in [
        (
            "push:\n  branches: [a]\n  branches-ignore: [b]\n",
            "push",
            "branches",
        ),
        ("push:\n  tags: [a]\n  tags-ignore: [b]\n", "push", "tags"),
        (
            "pull_request:\n  paths-ignore: [a]\n  paths: [b]\n",
            "pull_request",
            "paths",
        ),
    ] {
        // The model alone cannot see it: it keeps one of the two keys.
        let model: Trigger = yaml_serde::from_str(on).unwrap();
        assert!(Triggers::from_model(&model).is_ok());
        let err = parse(on).unwrap_err();
        assert_eq!(
            err,
            TriggerError::FilterAndIgnore {
                event: event.into(),
                key
            }
        );
        assert!(err.to_string().starts_with(&format!(
            "on.{event}: `{key}` and `{key}-ignore` cannot both be used"
        )));
    }
}

#[test]
fn invalid_patterns_and_negative_only_lists_are_errors_naming_the_key() {
    let err = parse("push:\n  branches: ['v[0-9']\n").unwrap_err();
    assert_eq!(
        err.to_string(),
        "on.push.branches: invalid filter pattern `v[0-9`: `[` has no closing `]`"
    );
    let err = parse("pull_request:\n  paths: ['!docs/**']\n").unwrap_err();
    assert_eq!(
        err,
        TriggerError::OnlyNegative {
            event: "pull_request".into(),
            key: "paths"
        }
    );
    // An ignore list of negative patterns is not that error.
    assert!(parse("push:\n  branches-ignore: ['!main']\n").is_ok());
}

#[test]
fn unknown_events_in_the_source_are_errors() {
    let model: Trigger = yaml_serde::from_str("push:\npushh:\n").unwrap();
    let source: Value = yaml_serde::from_str("push:\npushh:\n").unwrap();
    assert_eq!(
        Triggers::from_model_with_source(&model, &source).unwrap_err(),
        TriggerError::UnknownEvent("pushh".into())
    );
}

const DISPATCH: &str = "
workflow_dispatch:
  inputs:
    logLevel:
      description: 'Log level'
      required: true
      default: 'warning'
      type: choice
      options: [info, warning, debug]
    print_tags:
      description: 'True to print to STDOUT'
      required: true
      type: boolean
    tags:
      description: 'Test scenario tags'
      required: true
      type: string
    environment:
      description: 'Environment to run tests against'
      type: environment
      required: true
";

/// The docs' `on.workflow_dispatch.inputs` example, read with its defaults.
#[test]
fn dispatch_inputs_come_with_types_and_defaults() {
    let t = triggers(DISPATCH);
    let inputs = t.dispatch_inputs().unwrap();
    assert_eq!(
        inputs.keys().collect::<Vec<_>>(),
        ["logLevel", "print_tags", "tags", "environment"]
    );
    assert_eq!(
        inputs["logLevel"],
        InputSpec {
            description: Some("Log level".into()),
            required: true,
            default: Some(Value::str("warning")),
            kind: InputType::Choice(vec!["info".into(), "warning".into(), "debug".into()]),
        }
    );
    assert_eq!(inputs["print_tags"].kind, InputType::Boolean);
    assert_eq!(inputs["environment"].kind, InputType::Environment);
    assert_eq!(inputs["tags"].default, None);
    assert!(t.call().is_none());

    let given: IndexMap<String, Value> = [
        ("print_tags".to_string(), Value::str("true")),
        ("tags".to_string(), Value::str("smoke")),
        ("environment".to_string(), Value::str("staging")),
    ]
    .into_iter()
    .collect();
    let resolved = resolve_inputs(inputs, &given).unwrap();
    assert_eq!(
        resolved
            .iter()
            .map(|(k, v)| (k.as_str(), v.clone()))
            .collect::<Vec<_>>(),
        [
            ("logLevel", Value::str("warning")),
            ("print_tags", Value::Bool(true)),
            ("tags", Value::str("smoke")),
            ("environment", Value::str("staging")),
        ]
    );
}

#[test]
fn a_bodiless_dispatch_has_no_inputs() {
    let t = triggers("[push, workflow_dispatch]");
    assert_eq!(t.dispatch_inputs().map(IndexMap::len), Some(0));
    assert!(triggers("push").dispatch_inputs().is_none());
}

/// The docs' `on.workflow_call` examples: inputs (with a default), outputs, secrets.
#[test]
fn call_spec_has_inputs_outputs_and_secrets() {
    let t = triggers(
        "
workflow_call:
  inputs:
    username:
      description: 'A username passed from the caller workflow'
      default: 'john-doe'
      required: false
      type: string
    dry-run:
      type: boolean
  outputs:
    workflow_output1:
      description: 'The first job output'
      value: ${{ jobs.my_job.outputs.job_output1 }}
  secrets:
    access-token:
      description: 'A token passed from the caller workflow'
      required: false
    other:
",
    );
    let call = t.call().unwrap();
    assert_eq!(
        call.inputs["username"].default,
        Some(Value::str("john-doe"))
    );
    assert_eq!(call.inputs["username"].kind, InputType::String);
    assert_eq!(call.inputs["dry-run"].kind, InputType::Boolean);
    assert_eq!(
        call.outputs["workflow_output1"],
        CallOutput {
            description: Some("The first job output".into()),
            value: "${{ jobs.my_job.outputs.job_output1 }}".into(),
        }
    );
    assert_eq!(
        call.secrets["access-token"],
        CallSecret {
            description: Some("A token passed from the caller workflow".into()),
            required: false,
        }
    );
    assert_eq!(call.secrets["other"], CallSecret::default());

    let resolved = resolve_inputs(&call.inputs, &IndexMap::new()).unwrap();
    assert_eq!(resolved.get("username"), Some(&Value::str("john-doe")));
    assert_eq!(resolved.get("dry-run"), Some(&Value::Bool(false)));
}
