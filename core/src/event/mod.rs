//! Which workflows an event triggers: the `on:` section, decided as GitHub does, and
//! the inputs of `workflow_dispatch` and `workflow_call`.
//!
//! Sources: GitHub's *Events that trigger workflows* and *Workflow syntax for GitHub
//! Actions* (`on.<event>.types`, `on.<push|pull_request|pull_request_target>.<branches|
//! tags|paths>` and their `-ignore` forms, the filter pattern cheat sheet).
//!
//! [`Triggers`] is built from the workflow model (`github-actions-models`). That model
//! drops three things GitHub uses: the order of a mapping's keys, a second filter when
//! both `X` and `X-ignore` are given (it keeps only one), and input `default:`s.
//! [`Triggers::from_model_with_source`] restores them from the `on:` value as written.

mod inputs;
mod model;

use indexmap::IndexMap;

use crate::glob::{PatternError, PatternList};

pub use inputs::{resolve_inputs, InputError, InputSpec, InputType};

/// What udos knows about the event being simulated and the repository.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EventFacts {
    /// `push`, `pull_request`, `workflow_dispatch`, ...
    pub name: String,
    /// `refs/heads/x` or `refs/tags/v1` (push: the pushed ref). A name without
    /// `refs/` is taken as a branch.
    pub git_ref: Option<String>,
    /// `pull_request*`: the base branch, as a ref or a name.
    pub base_ref: Option<String>,
    /// Paths changed by the event; `None` = unknown (paths filters then match, with a
    /// note), as GitHub runs the workflow when it cannot compute the diff.
    pub changed_paths: Option<Vec<String>>,
    /// The payload's `action` (`opened`, `synchronize`, ...), if known.
    pub activity: Option<String>,
}

/// Whether a workflow runs for an event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TriggerDecision {
    /// It runs. `notes` name the filters udos could not check for lack of facts.
    Runs {
        /// One sentence per unchecked filter.
        notes: Vec<String>,
    },
    /// It does not run; `reason` names the key that decided, e.g.
    /// "on.push.branches does not match refs/heads/dev".
    NotTriggered {
        /// Why, naming the `on:` key.
        reason: String,
    },
}

impl TriggerDecision {
    /// Does the workflow run?
    pub fn runs(&self) -> bool {
        matches!(self, TriggerDecision::Runs { .. })
    }
}

/// A workflow's `on:` section, ready to decide events.
#[derive(Debug, Clone, Default)]
pub struct Triggers {
    events: Vec<Event>,
    dispatch: Option<IndexMap<String, InputSpec>>,
    call: Option<CallSpec>,
}

/// `on.workflow_call`: what a caller passes in and gets back.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct CallSpec {
    /// `inputs:`, in file order.
    pub inputs: IndexMap<String, InputSpec>,
    /// `outputs:`, each a value template (`${{ jobs.x.outputs.y }}`), unevaluated.
    pub outputs: IndexMap<String, CallOutput>,
    /// `secrets:` the caller may or must pass.
    pub secrets: IndexMap<String, CallSecret>,
}

/// One `on.workflow_call.outputs` entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CallOutput {
    /// `description:`.
    pub description: Option<String>,
    /// `value:`, an expression template.
    pub value: String,
}

/// One `on.workflow_call.secrets` entry.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CallSecret {
    /// `description:`.
    pub description: Option<String>,
    /// `required:`.
    pub required: bool,
}

/// An `on:` section udos cannot use.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TriggerError {
    /// Both `X` and `X-ignore` for one event.
    #[error(
        "on.{event}: `{key}` and `{key}-ignore` cannot both be used for the same event; \
         use `{key}` with `!` patterns to exclude"
    )]
    FilterAndIgnore {
        /// The event, e.g. `push`.
        event: String,
        /// `branches`, `tags` or `paths`.
        key: &'static str,
    },
    /// A filter pattern that is not valid syntax.
    #[error("on.{event}.{key}: {source}")]
    Pattern {
        /// The event.
        event: String,
        /// The key holding the pattern, e.g. `branches-ignore`.
        key: &'static str,
        /// What is wrong.
        source: PatternError,
    },
    /// A `branches`, `tags` or `paths` list with only `!` patterns. (GitHub: "If you
    /// define a branch with the `!` character, you must also define at least one branch
    /// without the `!` character.")
    #[error("on.{event}.{key} has only `!` patterns; add a positive one, or use `{key}-ignore`")]
    OnlyNegative {
        /// The event.
        event: String,
        /// `branches`, `tags` or `paths`.
        key: &'static str,
    },
    /// A key under `on:` that names no event.
    #[error("on: `{0}` is not an event that triggers workflows")]
    UnknownEvent(String),
}

/// One event under `on:` with its filters.
#[derive(Debug, Clone)]
struct Event {
    name: String,
    /// `types:`; empty = the event's default types.
    types: Vec<String>,
    /// push: the pushed branch; pull_request*: the base branch.
    branches: Option<Filter>,
    /// push only.
    tags: Option<Filter>,
    paths: Option<Filter>,
    /// Keys udos has no facts for (e.g. `on.workflow_run.workflows`).
    unchecked: Vec<String>,
}

impl Event {
    fn new(name: &str) -> Event {
        Event {
            name: name.to_string(),
            types: Vec::new(),
            branches: None,
            tags: None,
            paths: None,
            unchecked: Vec::new(),
        }
    }
}

/// One of `branches`, `tags`, `paths` or its `-ignore` form.
#[derive(Debug, Clone)]
struct Filter {
    /// The key as written, e.g. `branches-ignore`.
    key: &'static str,
    ignore: bool,
    patterns: PatternList,
}

/// What a `git_ref` names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RefKind<'a> {
    Branch(&'a str),
    Tag(&'a str),
    Other,
}

/// A ref in full: a bare name is a branch.
fn full_ref(git_ref: &str) -> String {
    if git_ref.starts_with("refs/") {
        git_ref.to_string()
    } else {
        format!("refs/heads/{git_ref}")
    }
}

fn classify(full: &str) -> RefKind<'_> {
    if let Some(b) = full.strip_prefix("refs/heads/") {
        RefKind::Branch(b)
    } else if let Some(t) = full.strip_prefix("refs/tags/") {
        RefKind::Tag(t)
    } else {
        RefKind::Other
    }
}

/// "By default, a workflow only runs when a `pull_request` event's activity type is
/// `opened`, `synchronize`, or `reopened`" (and likewise `pull_request_target`); every
/// other event runs for all its activity types.
fn default_types(event: &str) -> Option<&'static [&'static str]> {
    match event {
        "pull_request" | "pull_request_target" => Some(&["opened", "synchronize", "reopened"]),
        _ => None,
    }
}

impl Triggers {
    /// Event names in file order. For a mapping read by [`Triggers::from_model`]
    /// alone, whose order the model does not keep: alphabetical.
    pub fn event_names(&self) -> Vec<&str> {
        self.events.iter().map(|e| e.name.as_str()).collect()
    }

    /// `on.workflow_dispatch.inputs`, if the workflow can be dispatched.
    pub fn dispatch_inputs(&self) -> Option<&IndexMap<String, InputSpec>> {
        self.dispatch.as_ref()
    }

    /// `on.workflow_call`, if the workflow is reusable.
    pub fn call(&self) -> Option<&CallSpec> {
        self.call.as_ref()
    }

    /// Does the workflow run for this event?
    pub fn decide(&self, facts: &EventFacts) -> TriggerDecision {
        let Some(event) = self.events.iter().find(|e| e.name == facts.name) else {
            return TriggerDecision::NotTriggered {
                reason: format!(
                    "on: does not list `{}` (it lists: {})",
                    facts.name,
                    self.event_names().join(", ")
                ),
            };
        };
        match check_event(event, facts) {
            Ok(notes) => TriggerDecision::Runs { notes },
            Err(reason) => TriggerDecision::NotTriggered { reason },
        }
    }
}

/// All of an event's filters, in GitHub's conjunction: types, refs, then paths.
fn check_event(event: &Event, facts: &EventFacts) -> Result<Vec<String>, String> {
    let mut notes = Vec::new();
    check_activity(event, facts.activity.as_deref(), &mut notes)?;
    let is_tag = if event.name == "push" {
        check_push_ref(event, facts.git_ref.as_deref(), &mut notes)?
    } else {
        check_base_branch(event, facts.base_ref.as_deref(), &mut notes)?;
        false
    };
    // "Path filters are not evaluated for pushes of tags."
    if !is_tag {
        check_paths(event, facts.changed_paths.as_deref(), &mut notes)?;
    }
    notes.extend(
        event
            .unchecked
            .iter()
            .map(|key| format!("{key} not checked: udos has no facts for it")),
    );
    Ok(notes)
}

fn check_activity(
    event: &Event,
    activity: Option<&str>,
    notes: &mut Vec<String>,
) -> Result<(), String> {
    let explicit = !event.types.is_empty();
    let allowed: Vec<&str> = if explicit {
        event.types.iter().map(String::as_str).collect()
    } else {
        match default_types(&event.name) {
            Some(defaults) => defaults.to_vec(),
            None => return Ok(()),
        }
    };
    let Some(activity) = activity else {
        notes.push(format!(
            "activity unknown: on.{}.types ({}) not checked",
            event.name,
            allowed.join(", ")
        ));
        return Ok(());
    };
    if allowed.contains(&activity) {
        return Ok(());
    }
    Err(if explicit {
        format!(
            "on.{}.types does not include `{activity}` (it lists: {})",
            event.name,
            allowed.join(", ")
        )
    } else {
        format!(
            "on.{} has no types, so it runs only for {}; the activity is `{activity}`",
            event.name,
            allowed.join(", ")
        )
    })
}

/// push: branch filters for branches, tag filters for tags; defining only one kind
/// excludes the other. Returns whether the ref is a tag.
fn check_push_ref(
    event: &Event,
    git_ref: Option<&str>,
    notes: &mut Vec<String>,
) -> Result<bool, String> {
    let full = git_ref.map(full_ref);
    let kind = full.as_deref().map(classify);
    if event.branches.is_none() && event.tags.is_none() {
        return Ok(matches!(kind, Some(RefKind::Tag(_))));
    }
    let (Some(full), Some(kind)) = (full.as_deref(), kind) else {
        notes.push("the pushed ref is unknown: on.push branch and tag filters not checked".into());
        return Ok(false);
    };
    let (filter, short, other) = match kind {
        RefKind::Branch(b) => (&event.branches, b, "tags"),
        RefKind::Tag(t) => (&event.tags, t, "branches"),
        RefKind::Other => {
            return Err(format!(
                "on.push filters branches or tags, and {full} is neither"
            ))
        }
    };
    let Some(filter) = filter else {
        return Err(format!(
            "on.push defines only {other} filters, so {full} does not run it"
        ));
    };
    filter.check_ref(&event.name, short, full, full)?;
    Ok(matches!(kind, RefKind::Tag(_)))
}

/// pull_request*: branch filters match the base branch.
fn check_base_branch(
    event: &Event,
    base: Option<&str>,
    notes: &mut Vec<String>,
) -> Result<(), String> {
    let Some(filter) = &event.branches else {
        return Ok(());
    };
    let Some(base) = base else {
        notes.push(format!(
            "the base branch is unknown: on.{}.{} not checked",
            event.name, filter.key
        ));
        return Ok(());
    };
    let short = base.strip_prefix("refs/heads/").unwrap_or(base);
    let full = format!("refs/heads/{short}");
    filter.check_ref(
        &event.name,
        short,
        &full,
        &format!("the base branch {short}"),
    )
}

fn check_paths(
    event: &Event,
    changed: Option<&[String]>,
    notes: &mut Vec<String>,
) -> Result<(), String> {
    let Some(filter) = &event.paths else {
        return Ok(());
    };
    let key = format!("on.{}.{}", event.name, filter.key);
    let Some(changed) = changed else {
        notes.push(format!("changed paths unknown: {key} treated as matching"));
        return Ok(());
    };
    // "If there are no files changed, the workflow will not run."
    if changed.is_empty() {
        return Err(format!("{key}: the event changed no paths"));
    }
    let selected = changed
        .iter()
        .filter(|p| filter.patterns.selects(p))
        .count();
    match (filter.ignore, selected) {
        (false, 0) => Err(format!(
            "{key} matches none of the {} changed paths",
            changed.len()
        )),
        (true, n) if n == changed.len() => {
            Err(format!("{key} ignores all {} changed paths", changed.len()))
        }
        _ => Ok(()),
    }
}

impl Filter {
    /// Matches a branch or tag: patterns are written without `refs/heads/` or
    /// `refs/tags/`, but a pattern given as a full ref (`refs/...`) matches the full ref.
    fn check_ref(&self, event: &str, short: &str, full: &str, shown: &str) -> Result<(), String> {
        let selected = self.patterns.selects_with(|p| {
            p.matches(short) || (p.body().starts_with("refs/") && p.matches(full))
        });
        match (self.ignore, selected) {
            (false, false) => Err(format!("on.{event}.{} does not match {shown}", self.key)),
            (true, true) => Err(format!("on.{event}.{} matches {shown}", self.key)),
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests;
