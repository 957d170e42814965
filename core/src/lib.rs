//! The pure core of udos: no I/O, only data in and data out.
//!
//! The workflow engine:
//! - [`workflow`]: a workflow file parsed into types, every key checked against the
//!   support table; `action.yml` files;
//! - [`value`]: the data expressions work on; [`expr`]: GitHub's expression language;
//! - [`event`]: which workflows an event triggers (`on:` filters), and their inputs;
//!   [`glob`]: GitHub's filter patterns;
//! - [`matrix`]: the legs of a matrix job;
//! - [`engine`]: the job graph, the run and leg state machines, and the files act runs
//!   in a step's VM;
//! - [`cache`]: content-addressed cache keys for steps.
//!
//! The cluster:
//! - [`desired`]: desired state (specs), validation, intent hash;
//! - [`schedule`]: placing spec instances on workers, deterministically;
//! - [`reconcile`]: a worker's decision per instance: noop, replace, create, stop;
//! - [`wire`]: the master's API messages; [`text`]: outside text made safe to print.
//!
//! The data path: workflow text → [`workflow::Workflow`] → [`engine::graph::select`] →
//! [`engine::run::Run`] legs → [`engine::leg::Leg`] steps → (host agent) VM → sealed
//! layer → next step.

pub mod cache;
pub mod desired;
pub mod engine;
pub mod event;
pub mod expr;
pub mod glob;
pub mod matrix;
pub mod reconcile;
pub mod schedule;
pub mod text;
pub mod value;
pub mod wire;
pub mod workflow;
