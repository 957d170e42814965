//! The pure core of udos: no I/O, only data in and data out.
//!
//! - [`workflow`]: parse a GitHub Actions workflow file, keeping each step as written.
//! - [`condition`]: decide whether a step runs, from its `if:` and the job's state.
//! - [`expr`]: evaluate GitHub Actions expressions (`${{ }}`) over [`value::Value`]s.
//! - [`synth`]: build the single-step workflow and `.actrc` a step VM runs.
//! - [`cache`]: content-addressed cache keys for steps.
//! - [`desired`]: desired state (specs), validation, intent hash.
//! - [`schedule`]: placing spec instances on workers, deterministically.
//! - [`reconcile`]: a worker's decision per instance: noop, replace, create, stop.
//! - [`wire`]: the master's API messages.
//! - [`event`]: which workflows an event triggers (`on:` filters), and their inputs.
//! - [`glob`]: GitHub's filter patterns for branches, tags and paths.
//! - [`matrix`]: the legs of a matrix job (`strategy.matrix`).
//! - [`text`]: outside text made safe to print on a terminal.
//!
//! The data path: workflow text → [`workflow::Workflow`] → per step a
//! [`condition::Decision`] and [`synth::StepFiles`] → (host agent) VM → sealed layer.

pub mod cache;
pub mod condition;
pub mod desired;
pub mod engine;
pub mod event;
pub mod expr;
pub mod glob;
pub mod matrix;
pub mod reconcile;
pub mod schedule;
pub mod synth;
pub mod text;
pub mod value;
pub mod wire;
pub mod workflow;
pub mod workflow_old;

/// Errors of the pure core.
#[derive(Debug, thiserror::Error)]
pub enum CoreError {
    /// The file is not valid YAML.
    #[error("the workflow is not valid YAML: {0}")]
    Yaml(String),
    /// The YAML is not a workflow udos can run.
    #[error("invalid workflow: {0}")]
    Invalid(String),
}
