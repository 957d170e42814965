//! The step record: what happened in a step VM, written by PID 1 next to the layer.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Version of the step record this crate writes and reads.
pub const RECORD_VERSION: u32 = 1;

/// Outcome of a step VM as PID 1 saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RecordStatus {
    /// act ran and every step it ran succeeded.
    Success,
    /// act ran and a step failed (act exited non-zero).
    Failure,
    /// udos itself could not run the step (missing device, act missing, seal failed...).
    Error,
}

/// One step as act reported it in its `--json` log.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ActStep {
    /// act's step id (`stepID`), e.g. `udos-step`.
    pub id: String,
    /// act's `stepResult`: `success`, `failure` or `skipped`.
    pub result: String,
    /// The step's exit status, when act reported one (`exit status N` on failure).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,
    /// `set-output` commands: name -> value.
    #[serde(default)]
    pub outputs: BTreeMap<String, String>,
    /// `set-env` commands: name -> value.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// `add-path` commands, in order.
    #[serde(default)]
    pub path: Vec<String>,
}

/// Counts describing the sealed layer.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LayerStats {
    /// Tar entries written.
    pub entries: u64,
    /// Bytes of the tar stream.
    pub bytes: u64,
    /// Entries skipped (sockets, fifos, device nodes other than whiteouts).
    pub skipped: u64,
}

/// The versioned step record (see docs/layer-format.md).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StepRecord {
    /// Always [`RECORD_VERSION`] when written by this crate.
    pub version: u32,
    /// Overall outcome.
    pub status: RecordStatus,
    /// What broke, when `status` is `error`.
    pub error: Option<String>,
    /// act's exit code; `None` when act did not run.
    pub act_exit_code: Option<i32>,
    /// Steps act reported, in order.
    #[serde(default)]
    pub steps: Vec<ActStep>,
    /// Phase timings inside the guest, in milliseconds.
    #[serde(default)]
    pub timings_ms: BTreeMap<String, u64>,
    /// The sealed layer's counts.
    #[serde(default)]
    pub layer: LayerStats,
}

impl StepRecord {
    /// A record for a step udos could not run.
    pub fn error(message: impl Into<String>) -> Self {
        Self {
            version: RECORD_VERSION,
            status: RecordStatus::Error,
            error: Some(message.into()),
            act_exit_code: None,
            steps: Vec::new(),
            timings_ms: BTreeMap::new(),
            layer: LayerStats::default(),
        }
    }

    /// The step act reported under `id`, if any.
    pub fn step(&self, id: &str) -> Option<&ActStep> {
        self.steps.iter().find(|s| s.id == id)
    }
}
