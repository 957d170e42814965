//! The report of a run (`udos run --json`), also stored in SQLite.
//!
//! Everything in it that came from a step (outputs, errors, summaries) has been masked:
//! secret values and `::add-mask::` values read `***`.

use std::collections::BTreeMap;
use std::path::PathBuf;

use indexmap::IndexMap;
use serde::Serialize;
use udos_core::engine::Conclusion;
use udos_core::value::Value;

/// The JSON report of a run.
#[derive(Debug, Clone, Serialize)]
pub struct RunReport {
    /// Run number.
    pub run_id: i64,
    /// Generation number.
    pub generation: i64,
    /// `success`, `failure` or `cancelled`.
    pub status: Conclusion,
    /// The event that ran the workflows.
    pub event: String,
    /// The first workflow file (absolute path).
    pub workflow: String,
    /// Every workflow file that ran.
    pub workflows: Vec<String>,
    /// Hypervisor used.
    pub hypervisor: String,
    /// Guest image id.
    pub image_id: String,
    /// Input layers below the steps' layers.
    pub inputs: Vec<InputReport>,
    /// One entry per job leg, in the order they were decided.
    pub jobs: Vec<JobReport>,
    /// What udos accepted but ignored, skipped, or left out, and why.
    pub notices: Vec<String>,
    /// Wall time of the run, ms.
    pub wall_ms: u64,
    /// Where the run's own time went, ms: `workspace` (listing and hashing the working
    /// tree, and building its layer when its content is new), `snapshot_wait` (after
    /// the last VM, for the layers still being written).
    pub phases_ms: BTreeMap<String, u64>,
    /// Step VMs booted (cached and host-decided steps boot none).
    pub vms_booted: usize,
}

impl RunReport {
    /// Step VMs the legs booted: the steps with a VM phase.
    pub fn count_vms(jobs: &[JobReport]) -> usize {
        jobs.iter()
            .flat_map(|j| &j.steps)
            .filter(|s| s.phases_ms.contains_key("vm"))
            .count()
    }
}

/// An input layer of the run.
#[derive(Debug, Clone, Serialize)]
pub struct InputReport {
    /// `base` or `workspace`.
    pub kind: String,
    /// Layer id.
    pub layer_id: String,
    /// Full restic snapshot id.
    pub snapshot_id: Option<String>,
}

/// One job leg.
#[derive(Debug, Clone, Serialize)]
pub struct JobReport {
    /// The job's key (`caller/job` inside a reusable workflow).
    pub id: String,
    /// Display name (`test (ubuntu, 18)`).
    pub name: String,
    /// The leg's matrix values, or null.
    pub matrix: Option<Value>,
    /// How the leg ended: success, failure, skipped or cancelled.
    pub status: Conclusion,
    /// Same as `status`.
    pub outcome: Conclusion,
    /// `needs.<id>.result`: a failure under `continue-on-error` concludes `success`.
    pub conclusion: Conclusion,
    /// The job's outputs from this leg.
    pub outputs: IndexMap<String, String>,
    /// Why udos ended or skipped it, when it did.
    pub error: Option<String>,
    /// The base it ran on.
    pub base: Option<String>,
    /// The squashed base (of a tagged ancestor commit) it ran on instead of `base`'s
    /// plain one, or null.
    pub squashed_base: Option<SquashedBaseRef>,
    /// The layer id of the base it ran on: the squashed base's when there is one, else
    /// `base`'s plain one (one of the run's `inputs`); null when it got no base.
    pub base_layer: Option<String>,
    /// Its steps, in order (none for a skipped job or a reusable workflow call).
    pub steps: Vec<StepReport>,
}

/// A squashed base a leg ran on (docs/bases.md, "Squashed bases").
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SquashedBaseRef {
    /// Its layer id.
    pub id: String,
    /// The tag of the commit it was made on (the first, when it had several).
    pub tag: String,
    /// That commit.
    pub commit: String,
    /// The run that made it.
    pub run: i64,
}

/// Where a cached step's result was made.
#[derive(Debug, Clone, Serialize)]
pub struct CachedFrom {
    /// Run number.
    pub run_id: i64,
    /// The leg's number in that run.
    pub leg: i64,
    /// Step number.
    pub step: i64,
}

/// An action of another repository a step used, as udos pinned it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ActionReport {
    /// `owner/repo[/path]@ref`, as written.
    pub uses: String,
    /// The commit the ref resolved to; for a `--local-repository` directory, the
    /// SHA-256 of its tree as udos stored it.
    pub sha: String,
    /// The `--local-repository` directory, when the action came from one.
    pub local: Option<String>,
}

impl From<&udos_core::workflow::action::PinnedAction> for ActionReport {
    fn from(a: &udos_core::workflow::action::PinnedAction) -> Self {
        ActionReport {
            uses: a.uses.clone(),
            sha: a.pin.clone(),
            local: a.local.clone(),
        }
    }
}

/// One step of a leg.
#[derive(Debug, Clone, Serialize)]
pub struct StepReport {
    /// 1-based number.
    pub number: usize,
    /// The user's step id.
    pub id: Option<String>,
    /// Display name.
    pub name: String,
    /// success, failure, skipped or cancelled (same as `outcome`).
    pub status: Conclusion,
    /// `steps.<id>.outcome`.
    pub outcome: Conclusion,
    /// `steps.<id>.conclusion`.
    pub conclusion: Conclusion,
    /// The step's exit code (null when it did not run or ended without one).
    pub exit_code: Option<i32>,
    /// Full restic id of the layer snapshot.
    pub snapshot_id: Option<String>,
    /// Layer id (SHA-256 of the layer stream).
    pub layer_id: Option<String>,
    /// Cache key of the step's inputs.
    pub cache_key: Option<String>,
    /// Outputs the step set.
    pub outputs: IndexMap<String, String>,
    /// `$GITHUB_STEP_SUMMARY`, if the step wrote one.
    pub summary: Option<String>,
    /// Set when the step was not run but its recorded result reused (the step cache):
    /// where that result was made.
    pub cached_from: Option<CachedFrom>,
    /// Reused from a recorded run (`cached_from` says which): no VM booted for it.
    pub cached: bool,
    /// Phase timings, ms: materialize, boot, guest, seal, unpack, snapshot, vm.
    pub phases_ms: BTreeMap<String, u64>,
    /// What went wrong, when udos (not the step's program) failed it.
    pub error: Option<String>,
    /// How udos ran it, when not in a VM.
    pub note: Option<String>,
    /// The step VM's console log.
    pub console_log: Option<PathBuf>,
    /// The actions of other repositories it used (its own `uses:` first, then those
    /// its composite actions use), pinned.
    pub actions: Vec<ActionReport>,
}
