//! Answers of the read endpoints that `udos_core::wire` does not define (generations,
//! diff, audit, status) and the error body. Shared by the server and the client.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use udos_core::desired::{DesiredSpec, Resources};
use udos_core::wire::{RunningInstance, SignatureState, Unschedulable};

/// Body of every refused request (4xx/5xx): `{"error": "..."}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    /// What went wrong and, where it helps, what to do.
    pub error: String,
}

/// One line of `GET /v1/generations`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GenerationSummary {
    /// Generation number (1, 2, ...).
    pub generation: u64,
    /// The commit it was built from.
    pub commit: String,
    /// sha256(commit + canonical specs JSON), hex.
    pub intent_hash: String,
    /// When it was first published (RFC 3339, UTC).
    pub published_at: String,
    /// Who published it (the `X-Udos-Publisher` header, or `publisher`).
    pub publisher: String,
    /// Whether it is the active generation.
    pub active: bool,
    /// Number of specs.
    pub specs: usize,
    /// Whether its signature verifies under the master's `--intent-pubkey` (false for
    /// a signature the master could not check: see `signature_state`).
    pub signed: bool,
    /// What the master knows of its signature.
    #[serde(default)]
    pub signature_state: SignatureState,
}

/// `GET /v1/generations/{n}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GenerationDetail {
    /// Generation number.
    pub generation: u64,
    /// The commit it was built from.
    pub commit: String,
    /// sha256(commit + canonical specs JSON), hex.
    pub intent_hash: String,
    /// ed25519 signature over `b"udos-intent-v1\n" + intent_hash`, hex, when signed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signature: Option<String>,
    /// What the master knows of that signature.
    #[serde(default)]
    pub signature_state: SignatureState,
    /// When it was first published (RFC 3339, UTC).
    pub published_at: String,
    /// Who published it.
    pub publisher: String,
    /// Whether it is the active generation.
    pub active: bool,
    /// The full desired state, sorted by id.
    pub specs: Vec<DesiredSpec>,
}

/// A spec named by id and content hash.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SpecRef {
    /// Spec id.
    pub id: String,
    /// Its content hash.
    pub hash: String,
}

/// A spec whose content hash differs between two generations.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SpecChange {
    /// Spec id.
    pub id: String,
    /// Hash in `from`.
    pub from_hash: String,
    /// Hash in `to`.
    pub to_hash: String,
}

/// `GET /v1/diff?from=A&to=B`: how B differs from A (by spec id and hash).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiffResponse {
    /// Generation A.
    pub from: u64,
    /// Generation B.
    pub to: u64,
    /// In B, not in A.
    pub added: Vec<SpecRef>,
    /// In A, not in B.
    pub removed: Vec<SpecRef>,
    /// In both with different hashes.
    pub changed: Vec<SpecChange>,
    /// How many specs are identical in both.
    pub unchanged: usize,
    /// What the master knows of A's signature (`unsigned` for generation 0).
    #[serde(default)]
    pub from_signature_state: SignatureState,
    /// What the master knows of B's signature.
    #[serde(default)]
    pub to_signature_state: SignatureState,
}

/// One accepted publication, as `GET /v1/audit` lists it (oldest first).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditEntry {
    /// Sequence number in the audit log.
    pub seq: u64,
    /// When (RFC 3339, UTC).
    pub at: String,
    /// Who (the `X-Udos-Publisher` header, or `publisher`).
    pub publisher: String,
    /// The client's address, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub remote: Option<String>,
    /// Published commit.
    pub commit: String,
    /// The generation it got (or already had).
    pub generation: u64,
    /// Its intent hash.
    pub intent_hash: String,
    /// false when the intent already had a generation (re-publication / rollback).
    pub created: bool,
}

/// Where one desired instance stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum InstanceHealth {
    /// Runs (or, for a workflow run, finished successfully with) the desired hash on a
    /// live worker that has seen the active generation.
    Converged,
    /// Being created with the desired hash.
    Starting,
    /// Reported failed with the desired hash.
    Failed,
    /// The worker runs another hash of it (or, for a workflow run, ran it at another
    /// commit than the active generation's).
    Outdated,
    /// The worker has seen the active generation but does not report the instance.
    Missing,
    /// The worker has not reported the active generation yet.
    Pending,
    /// The worker it is placed on has not been seen within the lease.
    WorkerDown,
    /// No live worker can host it.
    Unschedulable,
}

/// One desired instance in the status report.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstanceStatus {
    /// Replica index.
    pub replica: u32,
    /// The worker it is placed on (none when unschedulable).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub worker: Option<String>,
    /// Where it stands.
    pub state: InstanceHealth,
    /// The hash the worker reports for it, when it reports it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub running_hash: Option<String>,
    /// The commit the worker reports for it (workflow runs: the commit checked out and
    /// run), when it reports one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub running_commit: Option<String>,
    /// The worker's message (failures) or the scheduler's reason (unschedulable).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

/// One spec of the active generation in the status report.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SpecStatus {
    /// Spec id.
    pub id: String,
    /// Desired content hash.
    pub hash: String,
    /// `service` or `workflow_run`.
    pub kind: String,
    /// Its instances, by replica.
    pub instances: Vec<InstanceStatus>,
}

/// Who issued a worker's current token.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TokenIssuedBy {
    /// Enrollment with the enrollment token (a new worker id).
    EnrollmentToken,
    /// Re-enrollment with the worker's own previous token.
    WorkerToken,
    /// The publisher replaced the worker (`POST /v1/workers/{id}/replace`).
    Publisher,
}

/// One enrolled worker in the status report.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkerStatus {
    /// Worker id.
    pub id: String,
    /// Its labels.
    pub labels: BTreeMap<String, String>,
    /// What it offers.
    pub capacity: Resources,
    /// What it reported in use (last heartbeat).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub used: Option<Resources>,
    /// Seen within the lease.
    pub live: bool,
    /// When it enrolled (RFC 3339): when its current token was issued.
    pub enrolled_at: String,
    /// Who issued its current token (absent from masters before schema version 2).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_issued_by: Option<TokenIssuedBy>,
    /// When it last talked to the master (heartbeat or assignment poll), RFC 3339.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_seen_at: Option<String>,
    /// Seconds since then.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_seen_s_ago: Option<u64>,
    /// When it last sent a heartbeat, RFC 3339.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_heartbeat_at: Option<String>,
    /// The generation its last heartbeat applied (0: none yet).
    pub seen_generation: u64,
    /// Instances placed on it, as `spec@replica`.
    pub assigned: Vec<String>,
    /// What its last heartbeat reported.
    pub instances: Vec<RunningInstance>,
}

/// `GET /v1/status`: convergence of the active generation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StatusReport {
    /// Active generation (0 before the first publication).
    pub generation: u64,
    /// Its commit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub commit: Option<String>,
    /// Its intent hash.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub intent_hash: Option<String>,
    /// When it was published (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub published_at: Option<String>,
    /// What the master knows of its signature.
    #[serde(default)]
    pub signature_state: SignatureState,
    /// `converged_instances / desired_instances` (1.0 when nothing is desired).
    pub convergence: f64,
    /// Instances converged (see [`InstanceHealth::Converged`]).
    pub converged_instances: u64,
    /// All instances the active generation asks for (placed or not).
    pub desired_instances: u64,
    /// The lease, seconds.
    pub lease_s: u64,
    /// Every enrolled worker, by id.
    pub workers: Vec<WorkerStatus>,
    /// Every spec of the active generation, by id.
    pub specs: Vec<SpecStatus>,
    /// Instances no live worker can host.
    pub unschedulable: Vec<Unschedulable>,
    /// Why the cluster is not converged, one sentence each.
    pub drift: Vec<String>,
    /// Why the active generation cannot be scheduled, when it cannot (a database an
    /// older master wrote): nothing is placed and workers keep what they run until a
    /// valid desired state is published. Also the first line of `drift`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub problem: Option<String>,
}

impl StatusReport {
    /// Convergence as a percentage, rounded down to a tenth.
    pub fn percent(&self) -> f64 {
        (self.convergence * 1000.0).floor() / 10.0
    }
}
