//! The master's wire API messages (`/v1`, JSON). The endpoints, auth and semantics are
//! in docs/master-api.md; the OpenAPI description is docs/openapi.yaml.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::desired::{DesiredSpec, Resources};

/// `POST /v1/publish` (publisher token).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PublishRequest {
    /// The built commit (40 or 64 hex digits).
    pub commit: String,
    /// The complete desired state at that commit.
    pub specs: Vec<DesiredSpec>,
    /// Optional ed25519 signature (hex, 128 digits) over
    /// `b"udos-intent-v1\n" + intent_hash` (the hash's 64 hex digits as ASCII).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signature: Option<String>,
}

/// What the master knows of a generation's signature.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SignatureState {
    /// Published without a signature.
    #[default]
    Unsigned,
    /// Verifies under the master's `--intent-pubkey`.
    Verified,
    /// Carries a signature the master cannot check: it has no `--intent-pubkey`.
    /// Workers given the key check it themselves; nobody else should trust it.
    Unverified,
    /// Does not verify under the master's `--intent-pubkey` (stored before the master
    /// had that key).
    Invalid,
}

impl SignatureState {
    /// Words for people: never says "signed" unless the master verified it.
    pub fn describe(self) -> &'static str {
        match self {
            SignatureState::Unsigned => "unsigned",
            SignatureState::Verified => "signed (verified by the master)",
            SignatureState::Unverified => {
                "signature NOT verified (the master has no --intent-pubkey)"
            }
            SignatureState::Invalid => "signature INVALID under the master's --intent-pubkey",
        }
    }
}

/// Answer to a publication.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PublishResponse {
    /// The generation number of this intent (the existing one when re-published).
    pub generation: u64,
    /// sha256(commit + canonical JSON of the specs), hex.
    pub intent_hash: String,
    /// false when the same intent was already published (nothing changed).
    pub created: bool,
    /// Specs the current workers cannot host (selector unsatisfiable, no capacity).
    #[serde(default)]
    pub unschedulable: Vec<Unschedulable>,
    /// What the master knows of the generation's signature.
    #[serde(default)]
    pub signature_state: SignatureState,
}

/// A spec instance the scheduler could not place, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Unschedulable {
    /// Spec id.
    pub spec: String,
    /// Replica index.
    pub replica: u32,
    /// Human-readable reason (no worker matches the selector, or none has capacity).
    pub reason: String,
}

/// `POST /v1/enroll` (enrollment token): a worker registers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EnrollRequest {
    /// Stable worker id.
    pub worker_id: String,
    /// Worker labels (`zone=a`, `kvm=true`, ...).
    pub labels: BTreeMap<String, String>,
    /// What it can host.
    pub capacity: Resources,
}

/// `POST /v1/workers/{id}/replace` (publisher token): give an enrolled worker id a
/// new token, revoking the one it has (its token is lost, or its machine replaced).
/// Omitted fields keep the worker's current labels and capacity.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplaceWorkerRequest {
    /// New labels.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub labels: Option<BTreeMap<String, String>>,
    /// New capacity.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub capacity: Option<Resources>,
}

/// Answer to enrollment (and to a replacement).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EnrollResponse {
    /// The worker's own bearer token for every later call.
    pub token: String,
}

/// One spec instance assigned to a worker.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Assignment {
    /// The spec.
    pub spec: DesiredSpec,
    /// Which replica of it (0-based).
    pub replica: u32,
}

/// `GET /v1/assignment?worker=ID&seen=GEN&wait=SECS` (worker token). With `wait`, the
/// master holds the request until a generation newer than `seen` is active or the
/// assignment changes, or `wait` seconds pass (long poll).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AssignmentResponse {
    /// The active generation (0 before the first publication).
    pub generation: u64,
    /// Its commit.
    pub commit: Option<String>,
    /// Its intent hash.
    pub intent_hash: Option<String>,
    /// Its signature, when it was published signed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signature: Option<String>,
    /// Everything this worker should run, sorted by (spec id, replica).
    pub assignments: Vec<Assignment>,
    /// Seconds until the next poll: short while the generation converges.
    pub poll_hint: u64,
}

/// State of a running (or finished) spec instance on a worker.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum InstanceState {
    /// Being created.
    Starting,
    /// Up (service) or in progress (workflow run).
    Running,
    /// Workflow run finished successfully.
    Succeeded,
    /// Workflow run failed, or a service keeps dying.
    Failed,
    /// Being stopped.
    Stopping,
}

/// One instance a worker reports.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunningInstance {
    /// Spec id.
    pub spec: String,
    /// Replica index.
    pub replica: u32,
    /// The spec hash it runs.
    pub hash: String,
    /// Its state.
    pub state: InstanceState,
    /// Seconds since it started.
    pub uptime_s: u64,
    /// For a finished workflow run: the restic snapshot ids of its layers.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub snapshot_ids: Vec<String>,
    /// Short explanation for a failure.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// For a workflow run: the published commit it runs (or ran), checked out and
    /// verified before anything runs; a run whose checkout fails runs nothing and says
    /// why in `message`. `None` for services, and from agents that predate it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub commit: Option<String>,
}

/// `POST /v1/heartbeat` (worker token).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Heartbeat {
    /// Who.
    pub worker_id: String,
    /// The generation whose assignment it is applying.
    pub seen_generation: u64,
    /// Everything it runs or has finished for the current assignment.
    pub instances: Vec<RunningInstance>,
    /// Resources in use.
    pub used: Resources,
}

/// Answer to a heartbeat.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeartbeatResponse {
    /// The active generation, so a worker behind can poll at once.
    pub generation: u64,
}
