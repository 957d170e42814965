//! SHIM until the event/matrix branch lands.
#![allow(missing_docs, unused_variables)]
use crate::value::{Object, Value};
use indexmap::IndexMap;
pub struct EventFacts {
    pub name: String,
    pub git_ref: Option<String>,
    pub base_ref: Option<String>,
    pub changed_paths: Option<Vec<String>>,
    pub activity: Option<String>,
}
pub struct Triggers;
pub enum TriggerDecision {
    Runs,
    NotTriggered { reason: String },
}
pub enum InputType {
    String,
    Boolean,
    Number,
    Choice(Vec<String>),
    Environment,
}
pub struct InputSpec {
    pub description: Option<String>,
    pub required: bool,
    pub default: Option<Value>,
    pub kind: InputType,
}
#[derive(Debug, Clone, thiserror::Error)]
#[error("shim")]
pub struct InputError;
pub struct CallSpec {
    pub inputs: IndexMap<String, InputSpec>,
    pub outputs: IndexMap<String, String>,
    pub secrets: IndexMap<String, bool>,
}
impl Triggers {
    pub fn from_model(t: &github_actions_models::workflow::Trigger) -> Triggers {
        Triggers
    }
    pub fn event_names(&self) -> Vec<&str> {
        vec![]
    }
    pub fn decide(&self, facts: &EventFacts) -> TriggerDecision {
        TriggerDecision::Runs
    }
    pub fn dispatch_inputs(&self) -> Option<&IndexMap<String, InputSpec>> {
        None
    }
    pub fn call(&self) -> Option<&CallSpec> {
        None
    }
}
pub fn resolve_inputs(
    specs: &IndexMap<String, InputSpec>,
    given: &IndexMap<String, Value>,
) -> Result<Object, InputError> {
    Err(InputError)
}
