//! Building [`Triggers`] from the workflow model, and completing it from the `on:`
//! value as written.

use github_actions_models::common::EnvValue;
use github_actions_models::workflow::event::{
    BranchFilters, Events, GenericEvent, OptionalBody, PathFilters, PullRequest, Push, TagFilters,
    WorkflowCall, WorkflowCallInputType, WorkflowDispatch, WorkflowDispatchInputType,
};
use github_actions_models::workflow::{Trigger, TriggerSyntax};
use indexmap::IndexMap;

use super::{
    CallOutput, CallSecret, CallSpec, Event, Filter, InputSpec, InputType, TriggerError, Triggers,
};
use crate::glob::PatternList;
use crate::value::{Object, Value};

/// Events with only `types:`, in the model's order.
macro_rules! generic_events {
    ($events:expr, $out:expr; $($field:ident),* $(,)?) => {
        $(
            if let Some(types) = generic_types(&$events.$field) {
                let mut e = Event::new(stringify!($field));
                e.types = types;
                $out.push(e);
            }
        )*
    };
}

impl Triggers {
    /// From the parsed `on:`. See the module docs for what the model cannot tell; use
    /// [`Triggers::from_model_with_source`] when the workflow text is at hand.
    pub fn from_model(t: &Trigger) -> Result<Triggers, TriggerError> {
        let e = &*t.events;
        let mut events = Vec::new();
        generic_events!(e, events;
            branch_protection_rule, check_run, check_suite, create, delete, deployment,
            deployment_status, discussion, discussion_comment, fork, gollum, issue_comment,
            issues, label, merge_group, milestone, page_build, project, project_card,
            project_column, public, pull_request_review, pull_request_review_comment,
            registry_package, release, repository_dispatch, status, watch,
        );
        special_events(e, &mut events)?;
        match &t.syntax {
            TriggerSyntax::Sequence(order) => {
                sort_by_names(&mut events, order.iter().map(|b| b.as_str()))
            }
            // The model keeps no key order for a mapping: alphabetical, predictably.
            _ => events.sort_by(|a, b| a.name.cmp(&b.name)),
        }
        Ok(Triggers {
            events,
            dispatch: body_or_default(&e.workflow_dispatch, dispatch_inputs),
            call: body_or_default(&e.workflow_call, call_spec),
        })
    }

    /// From the parsed `on:` and the same `on:` value as written (a string, a list or
    /// a mapping), which restores what the model drops: the order of events, the error
    /// for `X` with `X-ignore`, input `default:`s, and events the model does not know.
    pub fn from_model_with_source(t: &Trigger, on: &Value) -> Result<Triggers, TriggerError> {
        let mut triggers = Triggers::from_model(t)?;
        let names = source_event_names(on);
        if let Some(unknown) = names
            .iter()
            .find(|n| !triggers.events.iter().any(|e| e.name == **n))
        {
            return Err(TriggerError::UnknownEvent(unknown.to_string()));
        }
        sort_by_names(&mut triggers.events, names.iter().copied());
        if let Value::Object(on) = on {
            check_filter_pairs(on)?;
            triggers.apply_defaults(on);
        }
        Ok(triggers)
    }

    fn apply_defaults(&mut self, on: &Object) {
        if let Some(specs) = self.dispatch.as_mut() {
            set_defaults(specs, on.get("workflow_dispatch"));
        }
        if let Some(call) = self.call.as_mut() {
            set_defaults(&mut call.inputs, on.get("workflow_call"));
        }
    }
}

fn generic_types(body: &OptionalBody<GenericEvent>) -> Option<Vec<String>> {
    match body {
        OptionalBody::Missing => None,
        OptionalBody::Default => Some(Vec::new()),
        OptionalBody::Body(b) => Some(b.types.clone()),
    }
}

/// Events whose bodies carry more than `types:`.
fn special_events(e: &Events, out: &mut Vec<Event>) -> Result<(), TriggerError> {
    if e.image_version.is_present() {
        let mut ev = Event::new("image_version");
        ev.unchecked = vec![
            "on.image_version.names".into(),
            "on.image_version.versions".into(),
        ];
        out.push(ev);
    }
    pull_request_event("pull_request", &e.pull_request, out)?;
    pull_request_event("pull_request_target", &e.pull_request_target, out)?;
    if let Some(ev) = push_event(&e.push)? {
        out.push(ev);
    }
    if e.schedule.is_present() {
        out.push(Event::new("schedule"));
    }
    for (name, present) in [
        ("workflow_call", e.workflow_call.is_present()),
        ("workflow_dispatch", e.workflow_dispatch.is_present()),
    ] {
        if present {
            out.push(Event::new(name));
        }
    }
    match &e.workflow_run {
        OptionalBody::Missing => {}
        OptionalBody::Default => out.push(Event::new("workflow_run")),
        OptionalBody::Body(run) => {
            let mut ev = Event::new("workflow_run");
            ev.types = run.types.clone();
            // The branches filter matches the triggering run's branch, which udos does
            // not know; nor does it know which workflow ran.
            ev.unchecked.push("on.workflow_run.workflows".into());
            if let Some(b) = &run.branch_filters {
                ev.unchecked.push(format!(
                    "on.workflow_run.{}",
                    branch_filter("workflow_run", b)?.key
                ));
            }
            out.push(ev);
        }
    }
    Ok(())
}

fn pull_request_event(
    name: &str,
    body: &OptionalBody<PullRequest>,
    out: &mut Vec<Event>,
) -> Result<(), TriggerError> {
    let mut ev = Event::new(name);
    match body {
        OptionalBody::Missing => return Ok(()),
        OptionalBody::Default => {}
        OptionalBody::Body(pr) => {
            ev.types = pr.types.clone();
            ev.branches = pr
                .branch_filters
                .as_ref()
                .map(|b| branch_filter(name, b))
                .transpose()?;
            ev.paths = pr
                .path_filters
                .as_ref()
                .map(|p| path_filter(name, p))
                .transpose()?;
        }
    }
    out.push(ev);
    Ok(())
}

fn push_event(body: &OptionalBody<Push>) -> Result<Option<Event>, TriggerError> {
    let mut ev = Event::new("push");
    match body {
        OptionalBody::Missing => return Ok(None),
        OptionalBody::Default => {}
        OptionalBody::Body(push) => {
            let b = push.branch_filters.as_ref();
            ev.branches = b.map(|b| branch_filter("push", b)).transpose()?;
            ev.tags = push
                .tag_filters
                .as_ref()
                .map(|t| tag_filter("push", t))
                .transpose()?;
            ev.paths = push
                .path_filters
                .as_ref()
                .map(|p| path_filter("push", p))
                .transpose()?;
        }
    }
    Ok(Some(ev))
}

fn branch_filter(event: &str, f: &BranchFilters) -> Result<Filter, TriggerError> {
    match f {
        BranchFilters::Branches(p) => filter(event, "branches", false, p),
        BranchFilters::BranchesIgnore(p) => filter(event, "branches-ignore", true, p),
    }
}

fn tag_filter(event: &str, f: &TagFilters) -> Result<Filter, TriggerError> {
    match f {
        TagFilters::Tags(p) => filter(event, "tags", false, p),
        TagFilters::TagsIgnore(p) => filter(event, "tags-ignore", true, p),
    }
}

fn path_filter(event: &str, f: &PathFilters) -> Result<Filter, TriggerError> {
    match f {
        PathFilters::Paths(p) => filter(event, "paths", false, p),
        PathFilters::PathsIgnore(p) => filter(event, "paths-ignore", true, p),
    }
}

fn filter(
    event: &str,
    key: &'static str,
    ignore: bool,
    patterns: &[String],
) -> Result<Filter, TriggerError> {
    let patterns = PatternList::parse(patterns).map_err(|source| TriggerError::Pattern {
        event: event.to_string(),
        key,
        source,
    })?;
    let negatives_only = patterns.patterns().iter().all(|p| p.is_negated());
    if !ignore && !patterns.patterns().is_empty() && negatives_only {
        return Err(TriggerError::OnlyNegative {
            event: event.to_string(),
            key,
        });
    }
    Ok(Filter {
        key,
        ignore,
        patterns,
    })
}

/// `Some(f(body))`, `Some(f(default))` for a bodiless event, `None` when absent.
fn body_or_default<B, T: Default>(body: &OptionalBody<B>, f: impl Fn(&B) -> T) -> Option<T> {
    match body {
        OptionalBody::Missing => None,
        OptionalBody::Default => Some(T::default()),
        OptionalBody::Body(b) => Some(f(b)),
    }
}

fn dispatch_inputs(d: &WorkflowDispatch) -> IndexMap<String, InputSpec> {
    d.inputs
        .iter()
        .map(|(name, i)| {
            let kind = match i.r#type {
                WorkflowDispatchInputType::Boolean => InputType::Boolean,
                WorkflowDispatchInputType::Choice => {
                    InputType::Choice(i.options.iter().map(env_string).collect())
                }
                WorkflowDispatchInputType::Environment => InputType::Environment,
                WorkflowDispatchInputType::Number => InputType::Number,
                WorkflowDispatchInputType::String => InputType::String,
            };
            (name.clone(), spec(&i.description, i.required, kind))
        })
        .collect()
}

fn call_spec(c: &WorkflowCall) -> CallSpec {
    let inputs = c
        .inputs
        .iter()
        .map(|(name, i)| {
            let kind = match i.r#type {
                WorkflowCallInputType::Boolean => InputType::Boolean,
                WorkflowCallInputType::Number => InputType::Number,
                WorkflowCallInputType::String => InputType::String,
            };
            (name.clone(), spec(&i.description, i.required, kind))
        })
        .collect();
    let outputs = c
        .outputs
        .iter()
        .map(|(name, o)| {
            let out = CallOutput {
                description: o.description.clone(),
                value: o.value.clone(),
            };
            (name.clone(), out)
        })
        .collect();
    let secrets = c
        .secrets
        .iter()
        .map(|(name, s)| {
            let secret = s.as_ref().map_or_else(CallSecret::default, |s| CallSecret {
                description: s.description.clone(),
                required: s.required,
            });
            (name.clone(), secret)
        })
        .collect();
    CallSpec {
        inputs,
        outputs,
        secrets,
    }
}

fn spec(description: &Option<String>, required: bool, kind: InputType) -> InputSpec {
    InputSpec {
        description: description.clone(),
        required,
        default: None,
        kind,
    }
}

/// A choice option as the string GitHub compares the input with.
fn env_string(v: &EnvValue) -> String {
    match v {
        EnvValue::String(s) => s.clone(),
        EnvValue::Number(n) => Value::Number(*n).to_string(),
        EnvValue::Boolean(b) => b.to_string(),
    }
}

/// Event names in `on:` as written: a string, a list of strings, or a mapping's keys.
fn source_event_names(on: &Value) -> Vec<&str> {
    match on {
        Value::String(s) => vec![s.as_str()],
        Value::Array(items) => items.iter().filter_map(Value::as_str).collect(),
        Value::Object(o) => o.keys().map(String::as_str).collect(),
        _ => Vec::new(),
    }
}

/// Stable-sorts events into the order of `names` (names may repeat; the first counts).
fn sort_by_names<'a>(events: &mut [Event], names: impl Iterator<Item = &'a str>) {
    let names: Vec<&str> = names.collect();
    events.sort_by_key(|e| {
        names
            .iter()
            .position(|n| *n == e.name)
            .unwrap_or(usize::MAX)
    });
}

/// "You cannot use both the `branches` and `branches-ignore` filters for the same
/// event" (and so for tags and paths).
fn check_filter_pairs(on: &Object) -> Result<(), TriggerError> {
    for (event, body) in on.iter() {
        let Value::Object(body) = body else { continue };
        for key in ["branches", "tags", "paths"] {
            let has = |k: &str| body.keys().any(|b| b == k);
            if has(key) && has(&format!("{key}-ignore")) {
                return Err(TriggerError::FilterAndIgnore {
                    event: event.clone(),
                    key,
                });
            }
        }
    }
    Ok(())
}

/// Copies `inputs.<id>.default` from the event's body as written.
fn set_defaults(specs: &mut IndexMap<String, InputSpec>, body: Option<&Value>) {
    let Some(inputs) = body.and_then(|b| b.get("inputs")) else {
        return;
    };
    for (name, spec) in specs.iter_mut() {
        spec.default = inputs
            .get(name)
            .and_then(|i| i.get("default"))
            .filter(|d| !matches!(d, Value::Null))
            .cloned();
    }
}
