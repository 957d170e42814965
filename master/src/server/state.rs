//! In-memory state of a running master: the auth table, the active generation and
//! the current placement snapshot that `GET /v1/assignment` answers from.
//!
//! Writers (publish, enroll, lease changes) update the state, bump `version` and wake
//! the scheduler task, which recomputes the placement (pure `schedule`) off the async
//! threads and installs a new [`Snapshot`] (an `Arc` swapped atomically). Readers never
//! take a lock: they load the current `Arc`.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::{ArcSwap, ArcSwapOption};
use ed25519_dalek::VerifyingKey;
use serde::Serialize;
use tokio::sync::{watch, Notify};
use udos_core::desired;
use udos_core::desired::{DesiredSpec, Resources};
use udos_core::schedule::{try_schedule, Placement, WorkerInventory};
use udos_core::wire::{Heartbeat, InstanceState, SignatureState};

use crate::status::WorkerState;
use crate::store::{GenerationRecord, Store, TokenIssuedBy, WorkerRecord};
use crate::time::now_ms;

/// `poll_hint` while some live worker has not converged on its assignment.
pub(crate) const SHORT_POLL_HINT: u64 = 2;
/// Longest `poll_hint` (also capped at half the lease).
pub(crate) const LONG_POLL_HINT: u64 = 60;

/// One enrolled worker, shared by the auth table and the snapshots.
pub(crate) struct WorkerEntry {
    pub id: String,
    pub labels: std::collections::BTreeMap<String, String>,
    pub capacity: Resources,
    pub token_hash: [u8; 32],
    pub token_issued_by: TokenIssuedBy,
    pub enrolled_at_ms: u64,
    /// Last contact: heartbeat or assignment request (unix ms).
    pub last_seen_ms: AtomicU64,
    /// Open long polls (a worker holding one is live).
    pub polling: AtomicU32,
    /// Snapshot epoch at which its last heartbeat reported exactly its assignment.
    pub known_epoch: AtomicU64,
    /// Same, and nothing is starting or stopping.
    pub settled_epoch: AtomicU64,
    pub hb: Mutex<HbState>,
}

#[derive(Default, Clone)]
pub(crate) struct HbState {
    pub last_heartbeat_ms: Option<u64>,
    pub heartbeat: Option<Heartbeat>,
}

impl WorkerEntry {
    pub fn from_record(r: &WorkerRecord, last_seen_ms: u64) -> Self {
        Self {
            id: r.id.clone(),
            labels: r.labels.clone(),
            capacity: r.capacity,
            token_hash: r.token_hash,
            token_issued_by: r.token_issued_by,
            enrolled_at_ms: r.enrolled_at_ms,
            last_seen_ms: AtomicU64::new(last_seen_ms),
            polling: AtomicU32::new(0),
            known_epoch: AtomicU64::new(0),
            settled_epoch: AtomicU64::new(0),
            hb: Mutex::new(HbState {
                last_heartbeat_ms: r.last_heartbeat_at_ms,
                heartbeat: r.last_heartbeat.clone(),
            }),
        }
    }

    pub fn touch(&self, now: u64) {
        self.last_seen_ms.fetch_max(now, Ordering::Relaxed);
    }

    pub fn is_live(&self, now: u64, lease_ms: u64) -> bool {
        self.polling.load(Ordering::Relaxed) > 0
            || now.saturating_sub(self.last_seen_ms.load(Ordering::Relaxed)) < lease_ms
    }

    pub fn hb_state(&self) -> HbState {
        self.hb.lock().map(|g| g.clone()).unwrap_or_default()
    }

    pub fn status_input(&self, now: u64) -> WorkerState {
        let hb = self.hb_state();
        let last_seen = if self.polling.load(Ordering::Relaxed) > 0 {
            now
        } else {
            self.last_seen_ms.load(Ordering::Relaxed)
        };
        WorkerState {
            id: self.id.clone(),
            labels: self.labels.clone(),
            capacity: self.capacity,
            enrolled_at_ms: self.enrolled_at_ms,
            token_issued_by: self.token_issued_by,
            last_seen_ms: last_seen,
            last_heartbeat_ms: hb.last_heartbeat_ms,
            heartbeat: hb.heartbeat,
        }
    }
}

/// Decrements the poll counter (and refreshes last contact) when a long poll ends,
/// whether it returns or the client goes away.
pub(crate) struct PollGuard(pub Arc<WorkerEntry>);

impl PollGuard {
    pub fn new(e: Arc<WorkerEntry>) -> Self {
        e.polling.fetch_add(1, Ordering::Relaxed);
        Self(e)
    }
}

impl Drop for PollGuard {
    fn drop(&mut self) {
        self.0.touch(now_ms());
        self.0.polling.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Who may do what: workers by id and by token hash.
#[derive(Default, Clone)]
pub(crate) struct AuthTable {
    pub by_id: HashMap<String, Arc<WorkerEntry>>,
    pub by_token: HashMap<[u8; 32], Arc<WorkerEntry>>,
}

/// One worker's precomputed answer.
pub(crate) struct WorkerView {
    /// JSON array of its `Assignment`s, sorted by (spec id, replica).
    pub assignments_json: String,
    /// (spec id, replica, hash), sorted: what its heartbeat should report.
    pub expected: Vec<(String, u32, String)>,
}

/// A consistent placement of the active generation on the live workers.
pub(crate) struct Snapshot {
    /// Bumped at every install.
    pub epoch: u64,
    /// The state version it was computed from.
    pub version: u64,
    pub generation: Option<Arc<GenerationRecord>>,
    pub placement: Placement,
    /// The entries that were live when it was computed.
    pub live: Vec<Arc<WorkerEntry>>,
    pub live_ids: HashSet<String>,
    pub views: HashMap<String, WorkerView>,
    /// `{"generation":..,"commit":..,"intent_hash":..[,"signature":..],"assignments":`
    pub prefix: String,
    pub assigned_total: usize,
    /// Why the active generation cannot be scheduled (one an older master stored):
    /// nothing is placed, workers are answered 503 and keep what they run.
    pub problem: Option<String>,
}

const EMPTY: &str = "[]";

impl Snapshot {
    pub fn generation_number(&self) -> u64 {
        self.generation.as_ref().map_or(0, |g| g.number)
    }

    pub fn assignments_json(&self, worker: &str) -> &str {
        self.views
            .get(worker)
            .map_or(EMPTY, |v| v.assignments_json.as_str())
    }

    pub fn expected(&self, worker: &str) -> &[(String, u32, String)] {
        self.views
            .get(worker)
            .map_or(&[], |v| v.expected.as_slice())
    }

    /// Short while some live worker has not settled on this snapshot.
    pub fn poll_hint(&self, lease_ms: u64) -> u64 {
        let long = LONG_POLL_HINT.min(lease_ms / 2000).max(1);
        if self.generation.is_none() {
            return long;
        }
        let all_settled = self
            .live
            .iter()
            .all(|e| e.settled_epoch.load(Ordering::Relaxed) == self.epoch);
        if all_settled {
            long
        } else {
            SHORT_POLL_HINT.min(long)
        }
    }

    /// The full `AssignmentResponse` body for a worker.
    pub fn body(&self, worker: &str, lease_ms: u64) -> String {
        let a = self.assignments_json(worker);
        let mut s = String::with_capacity(self.prefix.len() + a.len() + 24);
        s.push_str(&self.prefix);
        s.push_str(a);
        s.push_str(",\"poll_hint\":");
        s.push_str(&self.poll_hint(lease_ms).to_string());
        s.push('}');
        s
    }
}

/// Same JSON as `wire::Assignment`, without cloning the spec.
#[derive(Serialize)]
struct AssignmentRef<'a> {
    spec: &'a DesiredSpec,
    replica: u32,
}

#[derive(Serialize)]
struct Head<'a> {
    generation: u64,
    commit: Option<&'a str>,
    intent_hash: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    signature: Option<&'a str>,
}

/// What the scheduler needs to know of these workers.
pub(crate) fn inventory(live: &[Arc<WorkerEntry>]) -> Vec<WorkerInventory> {
    live.iter()
        .map(|e| WorkerInventory {
            id: e.id.clone(),
            labels: e.labels.clone(),
            capacity: e.capacity,
        })
        .collect()
}

/// Place a stored generation, checking it first as a publication would be: a database
/// written by an older master may hold one that is invalid or too large to expand.
fn place(g: &GenerationRecord, inventory: &[WorkerInventory]) -> Result<Placement, String> {
    desired::validate(&g.commit, &g.specs)
        .and_then(|()| try_schedule(&g.specs, inventory))
        .map_err(|e| {
            format!(
                "generation {} cannot be scheduled: {e}; workers keep what they run until a valid desired state is published",
                g.number
            )
        })
}

/// Compute a snapshot (pure scheduling + serialization; run off the async threads).
pub(crate) fn build_snapshot(
    version: u64,
    generation: Option<Arc<GenerationRecord>>,
    auth: &AuthTable,
    now: u64,
    lease_ms: u64,
) -> Snapshot {
    let mut live: Vec<Arc<WorkerEntry>> = auth
        .by_id
        .values()
        .filter(|e| e.is_live(now, lease_ms))
        .cloned()
        .collect();
    live.sort_by(|a, b| a.id.cmp(&b.id));
    let inventory = inventory(&live);
    let specs: &[DesiredSpec] = generation.as_ref().map_or(&[], |g| g.specs.as_slice());
    let (placement, problem) = match generation.as_deref().map(|g| place(g, &inventory)) {
        None => (Placement::default(), None),
        Some(Ok(p)) => (p, None),
        Some(Err(why)) => (Placement::default(), Some(why)),
    };
    let by_id: HashMap<&str, &DesiredSpec> = specs.iter().map(|s| (s.id.as_str(), s)).collect();
    let mut views = HashMap::with_capacity(placement.by_worker.len());
    let mut assigned_total = 0;
    for (worker, list) in &placement.by_worker {
        let mut list: Vec<&(String, u32)> = list.iter().collect();
        list.sort();
        let refs: Vec<AssignmentRef<'_>> = list
            .iter()
            .filter_map(|(id, replica)| {
                by_id.get(id.as_str()).map(|spec| AssignmentRef {
                    spec,
                    replica: *replica,
                })
            })
            .collect();
        assigned_total += refs.len();
        let expected = refs
            .iter()
            .map(|r| (r.spec.id.clone(), r.replica, r.spec.hash.clone()))
            .collect();
        let assignments_json = serde_json::to_string(&refs).unwrap_or_else(|_| EMPTY.to_string());
        views.insert(
            worker.clone(),
            WorkerView {
                assignments_json,
                expected,
            },
        );
    }
    let g = generation.as_deref();
    let head = Head {
        generation: g.map_or(0, |g| g.number),
        commit: g.map(|g| g.commit.as_str()),
        intent_hash: g.map(|g| g.intent_hash.as_str()),
        signature: g.and_then(|g| g.signature.as_deref()),
    };
    let mut prefix = serde_json::to_string(&head).unwrap_or_else(|_| "{}".into());
    prefix.pop(); // the closing brace
    prefix.push_str(",\"assignments\":");
    let live_ids = live.iter().map(|e| e.id.clone()).collect();
    Snapshot {
        epoch: 0,
        version,
        generation,
        placement,
        live,
        live_ids,
        views,
        prefix,
        assigned_total,
        problem,
    }
}

/// Whether a heartbeat reports exactly `expected` (ignoring instances being stopped),
/// and whether nothing is still starting or stopping.
pub(crate) fn heartbeat_matches(
    hb: &Heartbeat,
    expected: &[(String, u32, String)],
) -> (bool, bool) {
    let mut reported: Vec<(&str, u32, &str)> = hb
        .instances
        .iter()
        .filter(|i| i.state != InstanceState::Stopping)
        .map(|i| (i.spec.as_str(), i.replica, i.hash.as_str()))
        .collect();
    reported.sort_unstable();
    let known = reported.len() == expected.len()
        && reported
            .iter()
            .zip(expected)
            .all(|(r, e)| r.0 == e.0 && r.1 == e.1 && r.2 == e.2);
    let settled = known
        && hb
            .instances
            .iter()
            .all(|i| !matches!(i.state, InstanceState::Starting | InstanceState::Stopping));
    (known, settled)
}

/// The whole shared state of a running master.
pub(crate) struct Master {
    pub store: Arc<Mutex<Box<dyn Store>>>,
    pub publisher_hash: [u8; 32],
    pub enroll_hash: [u8; 32],
    pub intent_key: Option<VerifyingKey>,
    pub lease_ms: u64,
    pub auth: ArcSwap<AuthTable>,
    pub active: ArcSwapOption<GenerationRecord>,
    pub snapshot: ArcSwap<Snapshot>,
    pub snap_tx: watch::Sender<u64>,
    pub version: AtomicU64,
    pub recompute: Notify,
    pub enroll_lock: tokio::sync::Mutex<()>,
    pub publish_lock: tokio::sync::Mutex<()>,
    pub shutdown: watch::Receiver<bool>,
    pub counters: Counters,
    /// Serialized `GenerationDetail` of the active generation: (number, signature, body).
    pub detail_cache: Mutex<Option<(u64, Option<String>, axum::body::Bytes)>>,
    /// How long a request body may take to arrive.
    pub body_read_timeout: Duration,
}

/// Request counters for /metrics.
#[derive(Default)]
pub(crate) struct Counters {
    pub assignment: AtomicU64,
    pub heartbeat: AtomicU64,
    pub publish: AtomicU64,
    pub enroll: AtomicU64,
    pub auth_failures: AtomicU64,
    pub recomputes: AtomicU64,
}

impl Master {
    /// What this master knows of a generation's signature: only one that verifies
    /// under its own intent key counts as signed.
    pub fn signature_state(&self, intent_hash: &str, signature: Option<&str>) -> SignatureState {
        match (signature, &self.intent_key) {
            (None, _) => SignatureState::Unsigned,
            (Some(_), None) => SignatureState::Unverified,
            (Some(sig), Some(key)) => match crate::signing::verify_intent(key, intent_hash, sig) {
                Ok(()) => SignatureState::Verified,
                Err(_) => SignatureState::Invalid,
            },
        }
    }

    /// Record a state change and wake the scheduler; returns the new version.
    pub fn bump(&self) -> u64 {
        let v = self.version.fetch_add(1, Ordering::SeqCst) + 1;
        self.recompute.notify_one();
        v
    }

    /// Wait until a snapshot computed from state version ≥ `v` is installed.
    pub async fn wait_for_version(&self, v: u64, limit: Duration) -> Arc<Snapshot> {
        let mut rx = self.snap_tx.subscribe();
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let snap = self.snapshot.load_full();
            if snap.version >= v {
                return snap;
            }
            if tokio::time::timeout_at(deadline, rx.changed())
                .await
                .is_err()
            {
                return snap;
            }
        }
    }

    /// Install a freshly built snapshot: number it, carry the converged marks of the
    /// workers whose answer did not change, publish it to the waiters.
    pub fn install(&self, mut snap: Snapshot) {
        let old = self.snapshot.load_full();
        snap.epoch = old.epoch + 1;
        if old.generation_number() == snap.generation_number() {
            for e in &snap.live {
                if old.assignments_json(&e.id) == snap.assignments_json(&e.id) {
                    let _ = e.known_epoch.compare_exchange(
                        old.epoch,
                        snap.epoch,
                        Ordering::Relaxed,
                        Ordering::Relaxed,
                    );
                    let _ = e.settled_epoch.compare_exchange(
                        old.epoch,
                        snap.epoch,
                        Ordering::Relaxed,
                        Ordering::Relaxed,
                    );
                }
            }
        }
        if snap.problem.is_some() && snap.problem != old.problem {
            tracing::error!("{}", snap.problem.as_deref().unwrap_or_default());
        }
        let epoch = snap.epoch;
        self.snapshot.store(Arc::new(snap));
        self.counters.recomputes.fetch_add(1, Ordering::Relaxed);
        self.snap_tx.send_replace(epoch);
    }

    /// Whether the set of live workers differs from the current snapshot's.
    pub fn liveness_changed(&self, now: u64) -> bool {
        let snap = self.snapshot.load();
        let auth = self.auth.load();
        auth.by_id
            .values()
            .any(|e| e.is_live(now, self.lease_ms) != snap.live_ids.contains(&e.id))
    }

    /// Run a store operation on the blocking pool.
    pub async fn with_store<T, F>(&self, f: F) -> Result<T, crate::store::StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&mut dyn Store) -> Result<T, crate::store::StoreError> + Send + 'static,
    {
        let store = self.store.clone();
        tokio::task::spawn_blocking(move || {
            let mut guard = store.lock().unwrap_or_else(|p| p.into_inner());
            f(guard.as_mut())
        })
        .await
        .unwrap_or_else(|e| {
            Err(crate::store::StoreError::Corrupt(format!(
                "store task failed: {e}"
            )))
        })
    }
}
