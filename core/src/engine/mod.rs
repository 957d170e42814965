//! The workflow engine: which jobs run, in what order, as which matrix legs, and what
//! each step of a leg is once its expressions are evaluated. Pure: the host agent
//! drives it, boots the VMs, and feeds the results back.
//!
//! The run loop, as the host walks it:
//!
//! 1. [`graph::select`] picks the workflows the event triggers and the jobs to run
//!    (`-j` plus what they need), and [`run::Run::new`] takes them.
//! 2. [`run::Run::poll`] says which legs can start now ([`run::Action::Start`] with a
//!    [`run::LegTicket`]) and which running legs to cancel (fail-fast). Job `if:`,
//!    `needs`, matrices (also from `fromJSON(needs...)`), `max-parallel`, `--jobs`,
//!    reusable workflows and job outputs are all decided here.
//! 3. For each started leg the host makes a [`leg::Leg`] and asks it [`leg::Leg::next`]:
//!    a step to run (a [`leg::ResolvedStep`], every expression evaluated, turned into
//!    act's files by [`synth`]), a step skipped by its `if:`, or the end of the leg with
//!    its job outputs. The host runs the step in a VM and hands the result back with
//!    [`leg::Leg::record`].
//! 4. When a leg ends, [`run::Run::leg_finished`]; when nothing is left,
//!    [`run::Run::summary`].

pub mod contexts;
pub mod graph;
pub mod leg;
pub mod run;
pub mod synth;

use serde::{Deserialize, Serialize};

/// How a step, a leg or a job ended, in GitHub's words (`steps.x.outcome`,
/// `needs.x.result`, the report's `status`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Conclusion {
    /// It ran and succeeded.
    Success,
    /// It ran and failed.
    Failure,
    /// It was stopped or never started because the run or its job was cancelled.
    Cancelled,
    /// Its `if:` was false (or what it needs did not succeed).
    Skipped,
}

impl Conclusion {
    /// The word GitHub uses.
    pub fn as_str(self) -> &'static str {
        match self {
            Conclusion::Success => "success",
            Conclusion::Failure => "failure",
            Conclusion::Cancelled => "cancelled",
            Conclusion::Skipped => "skipped",
        }
    }
}

impl std::fmt::Display for Conclusion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why the engine cannot run what it was given. Shown to the user before anything
/// runs (exit code 2) or as a job's error.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EngineError {
    /// A workflow, job or flag asks for something that does not exist or cannot work.
    #[error("{0}")]
    Plan(String),
}
