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

/// A step's result as act reports it (`stepResult`).
///
/// Read leniently: any word other than `success`, `failure` and `skipped` (an act
/// newer than this crate, or an older record of a step that never reported a result,
/// `""`) reads as [`ActResult::Failure`], so that nothing unknown ever passes as a
/// success. The default is `Failure` for the same reason: a step seen in the log
/// without a result (act was killed mid-step) did not succeed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ActResult {
    /// The step succeeded.
    Success,
    /// The step failed, or its result is unknown.
    #[default]
    Failure,
    /// The step did not run (its `if:` was false).
    Skipped,
}

impl ActResult {
    /// act's word for a known result; `None` for anything else.
    pub fn from_act(word: &str) -> Option<Self> {
        match word {
            "success" => Some(ActResult::Success),
            "failure" => Some(ActResult::Failure),
            "skipped" => Some(ActResult::Skipped),
            _ => None,
        }
    }

    /// The word in the record's JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            ActResult::Success => "success",
            ActResult::Failure => "failure",
            ActResult::Skipped => "skipped",
        }
    }
}

impl std::fmt::Display for ActResult {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for ActResult {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let word = std::borrow::Cow::<str>::deserialize(deserializer)?;
        Ok(ActResult::from_act(&word).unwrap_or(ActResult::Failure))
    }
}

/// The most bytes of step summary a record carries (the note included).
pub const MAX_SUMMARY_BYTES: usize = 1 << 20;
/// Ends a summary that was cut at [`MAX_SUMMARY_BYTES`].
pub const SUMMARY_CUT_NOTE: &str = "\n\n[udos: summary cut at 1 MiB]\n";

/// One step as act reported it in its `--json` log.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ActStep {
    /// act's step id (`stepID`), e.g. `udos-step`.
    pub id: String,
    /// act's `stepResult`.
    pub result: ActResult,
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
    /// The step summary (`$GITHUB_STEP_SUMMARY`): act's `summary` contents, in order,
    /// masked, at most [`MAX_SUMMARY_BYTES`] (see [`ActStep::append_summary`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub summary: Option<String>,
    /// The values the step registered with `::add-mask::`, raw and in order, without
    /// duplicates: the host masks its own copies of the log and outputs with them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub masks: Vec<String>,
}

impl ActStep {
    /// Appends to the summary, keeping it within [`MAX_SUMMARY_BYTES`]: what does not
    /// fit is dropped (at a character boundary) and [`SUMMARY_CUT_NOTE`] ends the
    /// summary instead.
    pub fn append_summary(&mut self, content: &str) {
        let summary = self.summary.get_or_insert_with(String::new);
        if summary.ends_with(SUMMARY_CUT_NOTE) {
            return;
        }
        if summary.len() + content.len() <= MAX_SUMMARY_BYTES {
            summary.push_str(content);
            return;
        }
        let room = MAX_SUMMARY_BYTES.saturating_sub(SUMMARY_CUT_NOTE.len());
        summary.push_str(content);
        let mut cut = room.min(summary.len());
        while !summary.is_char_boundary(cut) {
            cut -= 1;
        }
        summary.truncate(cut);
        summary.push_str(SUMMARY_CUT_NOTE);
    }
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

/// The most entries (files and directories together) a [`ReadSet`] holds.
pub const MAX_READ_ENTRIES: usize = 100_000;
/// The most bytes of paths a [`ReadSet`] holds (so the record stays far below the
/// host's record limit however long the paths).
pub const MAX_READ_BYTES: usize = 8 << 20;

/// The workspace files and directories a step opened, as PID 1 saw them (fanotify):
/// paths relative to `/workspace`, `.` for the workspace itself, sorted, without
/// duplicates. The host keys the step cache on their content (docs/layer-format.md).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReadSet {
    /// Files (and anything else not a directory) opened under `/workspace`.
    #[serde(default)]
    pub files: Vec<String>,
    /// Directories opened (listed) under `/workspace`.
    #[serde(default)]
    pub dirs: Vec<String>,
    /// The set is incomplete (over [`MAX_READ_ENTRIES`] or [`MAX_READ_BYTES`], events
    /// lost, a path that is not UTF-8): the step must never be taken from a cache.
    #[serde(default)]
    pub truncated: bool,
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
    /// What the step read under `/workspace`; `None` when PID 1 could not watch
    /// (no fanotify) or act never ran.
    #[serde(default)]
    pub reads: Option<ReadSet>,
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
            reads: None,
        }
    }

    /// A record of a run that ended well with nothing of act's to report (a job VM's
    /// end, a service's stop).
    pub fn success() -> Self {
        Self {
            status: RecordStatus::Success,
            error: None,
            ..Self::error("")
        }
    }

    /// The step act reported under `id`, if any.
    pub fn step(&self, id: &str) -> Option<&ActStep> {
        self.steps.iter().find(|s| s.id == id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn results_read_leniently_and_write_lowercase() {
        let read = |json: &str| serde_json::from_str::<ActResult>(json).unwrap();
        assert_eq!(read("\"success\""), ActResult::Success);
        assert_eq!(read("\"skipped\""), ActResult::Skipped);
        assert_eq!(read("\"failure\""), ActResult::Failure);
        assert_eq!(read("\"cancelled\""), ActResult::Failure);
        assert_eq!(read("\"\""), ActResult::Failure);
        assert_eq!(
            serde_json::to_string(&ActResult::Skipped).unwrap(),
            "\"skipped\""
        );
    }

    #[test]
    fn an_older_record_still_parses_and_new_fields_stay_out_when_empty() {
        let old = r#"{"id":"s","result":"success","outputs":{"k":"v"},"env":{},"path":[]}"#;
        let step: ActStep = serde_json::from_str(old).unwrap();
        assert_eq!(step.result, ActResult::Success);
        assert_eq!((step.summary.as_deref(), step.masks.len()), (None, 0));
        let json = serde_json::to_string(&step).unwrap();
        assert_eq!(json, old);
    }

    #[test]
    fn a_record_without_reads_parses_and_reads_are_written_as_null() {
        let old = r#"{"version":1,"status":"success","error":null,"act_exit_code":0}"#;
        let record: StepRecord = serde_json::from_str(old).unwrap();
        assert_eq!(record.reads, None);
        let json = serde_json::to_value(&record).unwrap();
        assert_eq!(json["reads"], serde_json::Value::Null);
        let partial: ReadSet = serde_json::from_str(r#"{"files":["a"]}"#).unwrap();
        assert_eq!((partial.dirs.len(), partial.truncated), (0, false));
    }

    #[test]
    fn summaries_are_capped_with_a_note() {
        let mut step = ActStep::default();
        step.append_summary("# one\n");
        step.append_summary("two\n");
        assert_eq!(step.summary.as_deref(), Some("# one\ntwo\n"));
        // "é" is 2 bytes: the cut must not split it.
        let big = "é".repeat(MAX_SUMMARY_BYTES / 2);
        step.append_summary(&big);
        let summary = step.summary.clone().unwrap();
        assert!(summary.len() <= MAX_SUMMARY_BYTES, "{}", summary.len());
        assert!(summary.len() > MAX_SUMMARY_BYTES - SUMMARY_CUT_NOTE.len() - 2);
        assert!(summary.starts_with("# one\ntwo\né"));
        assert!(summary.ends_with(SUMMARY_CUT_NOTE));
        step.append_summary("more");
        assert_eq!(step.summary.unwrap(), summary, "nothing after the note");
    }
}
