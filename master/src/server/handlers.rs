//! The `/v1` endpoints.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::rejection::QueryRejection;
use axum::extract::{ConnectInfo, Path, Query, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::de::DeserializeOwned;
use serde::Deserialize;
use subtle::ConstantTimeEq;
use udos_core::desired;
use udos_core::wire::{
    EnrollRequest, EnrollResponse, Heartbeat, HeartbeatResponse, PublishRequest, PublishResponse,
    ReplaceWorkerRequest, SignatureState,
};

use super::state::{AuthTable, Master, PollGuard, WorkerEntry};
use super::Peer;
use crate::api::{
    AuditEntry, DiffResponse, ErrorBody, GenerationDetail, GenerationSummary, SpecChange, SpecRef,
    StatusReport,
};
use crate::status::compute_status;
use crate::store::{GenerationRecord, NewPublication, StoreError, TokenIssuedBy, WorkerRecord};
use crate::time::{now_ms, rfc3339};
use crate::token::{generate_token, hash_token};

type Shared = State<Arc<Master>>;

/// Largest accepted publication body.
pub(crate) const MAX_PUBLICATION_BYTES: usize = 64 << 20;
/// Largest accepted body of the other endpoints (enrollments, heartbeats).
pub(crate) const MAX_BODY_BYTES: usize = 2 << 20;

/// How long an assignment request waits for the placement to include a worker that
/// just enrolled or came back.
const JOIN_WAIT: Duration = Duration::from_secs(5);
/// Longest long poll.
const MAX_WAIT_S: u64 = 60;

/// A refused request: status code and `{"error": ...}`.
#[derive(Debug)]
pub(crate) struct ApiError {
    status: StatusCode,
    message: String,
}

impl ApiError {
    fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
        }
    }
    fn bad_request(m: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, m)
    }
    fn unauthorized(m: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, m)
    }
    fn forbidden(m: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, m)
    }
    fn not_found(m: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, m)
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Invalid(i) => Self::bad_request(format!("invalid publication: {i}")),
            other => {
                tracing::error!("store: {other}");
                Self::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    format!("master storage failed: {other}"),
                )
            }
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut resp = (
            self.status,
            Json(ErrorBody {
                error: self.message,
            }),
        )
            .into_response();
        if self.status == StatusCode::UNAUTHORIZED {
            resp.headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        resp
    }
}

type ApiResult<T> = Result<T, ApiError>;

/// Who is calling.
pub(crate) enum Caller {
    Publisher,
    Enroller,
    Worker(Arc<WorkerEntry>),
}

impl Caller {
    fn role(&self) -> &'static str {
        match self {
            Caller::Publisher => "the publisher token",
            Caller::Enroller => "the enrollment token",
            Caller::Worker(_) => "a worker token",
        }
    }
}

fn authenticate(m: &Master, headers: &HeaderMap) -> ApiResult<Caller> {
    let fail = |msg: &str| {
        m.counters.auth_failures.fetch_add(1, Ordering::Relaxed);
        ApiError::unauthorized(msg)
    };
    let Some(value) = headers.get(header::AUTHORIZATION) else {
        return Err(fail(
            "missing bearer token: send `Authorization: Bearer TOKEN`",
        ));
    };
    let token = value
        .to_str()
        .ok()
        .and_then(|v| {
            v.strip_prefix("Bearer ")
                .or_else(|| v.strip_prefix("bearer "))
        })
        .map(str::trim)
        .filter(|t| !t.is_empty());
    let Some(token) = token else {
        return Err(fail(
            "malformed Authorization header: expected `Bearer TOKEN`",
        ));
    };
    let h = hash_token(token);
    // Compare both fixed tokens in constant time, always.
    let is_publisher: bool = h.ct_eq(&m.publisher_hash).into();
    let is_enroller: bool = h.ct_eq(&m.enroll_hash).into();
    if is_publisher {
        return Ok(Caller::Publisher);
    }
    if is_enroller {
        return Ok(Caller::Enroller);
    }
    // Worker tokens are looked up by their sha256: the lookup's timing depends only on
    // the hash of what the client sent, which tells it nothing about stored tokens.
    match m.auth.load().by_token.get(&h) {
        Some(e) => Ok(Caller::Worker(e.clone())),
        None => Err(fail("invalid token: the master does not know it (re-enroll the worker or check the token file)")),
    }
}

fn require_publisher(m: &Master, headers: &HeaderMap, what: &str) -> ApiResult<()> {
    match authenticate(m, headers)? {
        Caller::Publisher => Ok(()),
        other => Err(ApiError::forbidden(format!(
            "{what} needs the publisher token; this request used {}",
            other.role()
        ))),
    }
}

fn require_worker(
    m: &Master,
    headers: &HeaderMap,
    worker: &str,
    what: &str,
) -> ApiResult<Arc<WorkerEntry>> {
    match authenticate(m, headers)? {
        Caller::Worker(e) if e.id == worker => Ok(e),
        Caller::Worker(e) => Err(other_worker(m, &e, worker)),
        other => Err(ApiError::forbidden(format!(
            "{what} needs a worker token (from enroll); this request used {}",
            other.role()
        ))),
    }
}

/// A worker token used for another worker id: 404 when that id is not enrolled, else 403.
fn other_worker(m: &Master, caller: &WorkerEntry, worker: &str) -> ApiError {
    if m.auth.load().by_id.contains_key(worker) {
        ApiError::forbidden(format!(
            "this token belongs to worker `{}`, not `{worker}`",
            caller.id
        ))
    } else {
        ApiError::not_found(format!(
            "worker `{worker}` is not enrolled (this token belongs to worker `{}`)",
            caller.id
        ))
    }
}

/// Read a request body of at most `limit` bytes within the body timeout. Called only
/// once the caller is authenticated: an unknown client never makes the master buffer
/// anything.
async fn read_body(m: &Master, headers: &HeaderMap, body: Body, limit: usize) -> ApiResult<Bytes> {
    use http_body_util::BodyExt as _;
    let too_large = || {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("the body is larger than {limit} bytes"),
        )
    };
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(too_large());
    }
    let collect = http_body_util::Limited::new(body, limit).collect();
    match tokio::time::timeout(m.body_read_timeout, collect).await {
        Ok(Ok(collected)) => Ok(collected.to_bytes()),
        Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => Err(too_large()),
        Ok(Err(e)) => Err(ApiError::bad_request(format!(
            "cannot read the request body: {e}"
        ))),
        Err(_) => Err(ApiError::new(
            StatusCode::REQUEST_TIMEOUT,
            format!(
                "the body did not arrive within {} s",
                m.body_read_timeout.as_secs_f64()
            ),
        )),
    }
}

fn parse_json<T: DeserializeOwned>(body: &Bytes, what: &str) -> ApiResult<T> {
    serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request(format!("{what}: malformed JSON body: {e}")))
}

fn json_response(body: String) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        )],
        body,
    )
        .into_response()
}

fn json_bytes(body: Bytes) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        )],
        body,
    )
        .into_response()
}

fn publisher_name(headers: &HeaderMap) -> String {
    headers
        .get("x-udos-publisher")
        .and_then(|v| v.to_str().ok())
        .map(|s| {
            s.chars()
                .filter(|c| c.is_ascii_graphic() || *c == ' ')
                .take(128)
                .collect::<String>()
        })
        .filter(|s| !s.trim().is_empty())
        .unwrap_or_else(|| "publisher".to_string())
}

fn valid_worker_id(id: &str) -> bool {
    (1..=128).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-')
}

// ---------------------------------------------------------------------------------

pub(crate) async fn healthz() -> &'static str {
    "ok"
}

pub(crate) async fn publish(
    State(m): Shared,
    ConnectInfo(Peer(remote)): ConnectInfo<Peer>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult<Json<PublishResponse>> {
    m.counters.publish.fetch_add(1, Ordering::Relaxed);
    require_publisher(&m, &headers, "publish")?;
    let body = read_body(&m, &headers, body, MAX_PUBLICATION_BYTES).await?;
    let req: PublishRequest = parse_json(&body, "publication")?;
    drop(body);
    desired::validate(&req.commit, &req.specs)
        .map_err(|e| ApiError::bad_request(format!("invalid publication: {e}")))?;
    let intent_hash = desired::intent_hash(&req.commit, &req.specs);
    if let Some(sig) = &req.signature {
        let ok = sig.len() == 128 && sig.bytes().all(|b| b.is_ascii_hexdigit());
        if !ok {
            return Err(ApiError::bad_request(
                "invalid publication: `signature` must be 128 hex digits",
            ));
        }
    }
    if let Some(key) = &m.intent_key {
        let Some(sig) = &req.signature else {
            return Err(ApiError::bad_request(format!(
                "invalid publication: this master requires signed intent; sign `udos-intent-v1\\n{intent_hash}` with the intent key"
            )));
        };
        crate::signing::verify_intent(key, &intent_hash, sig)
            .map_err(|e| ApiError::bad_request(format!("invalid publication: {e}")))?;
    }
    // Checked above when this master has a key; without one it is kept unverified.
    let signature_verified = req.signature.is_some() && m.intent_key.is_some();
    let req = schedulable(&m, req).await?;
    let publisher = publisher_name(&headers);
    let _guard = m.publish_lock.lock().await;
    let at_ms = now_ms();
    let PublishRequest {
        commit,
        mut specs,
        signature,
    } = req;
    let remote = remote.ip().to_string();
    let (outcome, record): (_, GenerationRecord) = {
        let publisher = publisher.clone();
        m.with_store(move |s| {
            let outcome = s.publish(&NewPublication {
                commit: &commit,
                specs: &specs,
                signature: signature.as_deref(),
                signature_verified,
                publisher: &publisher,
                remote: Some(&remote),
                at_ms,
            })?;
            let record = if outcome.created {
                specs.sort_by(|a, b| a.id.cmp(&b.id));
                GenerationRecord {
                    number: outcome.generation,
                    commit,
                    intent_hash: outcome.intent_hash.clone(),
                    specs,
                    signature,
                    published_at_ms: at_ms,
                    publisher,
                }
            } else {
                // An existing generation keeps what was stored first (time,
                // publisher; its signature unless it had none): read it back.
                s.generation(outcome.generation)?.ok_or_else(|| {
                    StoreError::Corrupt(format!("generation {} vanished", outcome.generation))
                })?
            };
            Ok((outcome, record))
        })
        .await?
    };
    let signature_state = m.signature_state(&record.intent_hash, record.signature.as_deref());
    let current = m.active.load_full();
    let changed = current.as_ref().map(|g| (g.number, g.signature.clone()))
        != Some((record.number, record.signature.clone()));
    let snap = if changed {
        m.active.store(Some(Arc::new(record)));
        let v = m.bump();
        m.wait_for_version(v, Duration::from_secs(60)).await
    } else {
        m.snapshot.load_full()
    };
    tracing::info!(
        generation = outcome.generation,
        created = outcome.created,
        publisher = %publisher,
        signature = signature_state.describe(),
        "published {}",
        outcome.intent_hash
    );
    Ok(Json(PublishResponse {
        signature_state,
        generation: outcome.generation,
        intent_hash: outcome.intent_hash,
        created: outcome.created,
        unschedulable: if snap.generation_number() == outcome.generation {
            snap.placement.unschedulable.clone()
        } else {
            Vec::new()
        },
    }))
}

/// Schedule a publication on the live workers before anything is stored, so that
/// one that cannot be scheduled is refused instead of being stored as a generation
/// the master cannot place (validation bounds its size; this also turns a scheduler
/// failure into a refusal).
async fn schedulable(m: &Master, req: PublishRequest) -> ApiResult<PublishRequest> {
    let inventory = super::state::inventory(&m.snapshot.load().live);
    let checked = tokio::task::spawn_blocking(move || {
        let placed = udos_core::schedule::try_schedule(&req.specs, &inventory).map(drop);
        (req, placed)
    })
    .await;
    match checked {
        Ok((req, Ok(()))) => Ok(req),
        Ok((_, Err(e))) => Err(ApiError::bad_request(format!("invalid publication: {e}"))),
        Err(e) => {
            tracing::error!("scheduling a publication failed: {e}");
            Err(ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("scheduling this publication failed ({e}); nothing was stored"),
            ))
        }
    }
}

/// Who may enroll a worker id.
enum Enroller {
    /// The enrollment token: only ids that are not enrolled yet.
    New,
    /// A worker's own token: re-enrolls that worker (new token, labels, capacity).
    Itself(Arc<WorkerEntry>),
}

pub(crate) async fn enroll(
    State(m): Shared,
    headers: HeaderMap,
    body: Body,
) -> ApiResult<Json<EnrollResponse>> {
    m.counters.enroll.fetch_add(1, Ordering::Relaxed);
    let how = match authenticate(&m, &headers)? {
        Caller::Enroller => Enroller::New,
        Caller::Worker(e) => Enroller::Itself(e),
        Caller::Publisher => {
            return Err(ApiError::forbidden(
                "enroll needs the enrollment token (or a worker's own token); the publisher replaces a worker with POST /v1/workers/{id}/replace",
            ))
        }
    };
    let body = read_body(&m, &headers, body, MAX_BODY_BYTES).await?;
    let req: EnrollRequest = parse_json(&body, "enrollment")?;
    if !valid_worker_id(&req.worker_id) {
        return Err(ApiError::bad_request(format!(
            "worker id `{}` must be 1-128 characters of A-Z a-z 0-9 . _ -",
            req.worker_id
        )));
    }
    if let Enroller::Itself(e) = &how {
        if e.id != req.worker_id {
            return Err(other_worker(&m, e, &req.worker_id));
        }
    }
    let _guard = m.enroll_lock.lock().await;
    let old = m.auth.load().by_id.get(&req.worker_id).cloned();
    if let (Enroller::New, Some(_)) = (&how, &old) {
        let id = &req.worker_id;
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            format!(
                "worker `{id}` is already enrolled: re-enroll it with its own worker token, or have the publisher replace it (`udos master replace-worker {id}`, POST /v1/workers/{id}/replace)"
            ),
        ));
    }
    let issuer = match how {
        Enroller::New => TokenIssuedBy::EnrollmentToken,
        Enroller::Itself(_) => TokenIssuedBy::WorkerToken,
    };
    let token = issue_token(
        &m,
        &req.worker_id,
        (req.labels, req.capacity),
        old.as_ref(),
        issuer,
    )
    .await?;
    tracing::info!(worker = %req.worker_id, reenrolled = old.is_some(), "enrolled");
    Ok(Json(EnrollResponse { token }))
}

/// `POST /v1/workers/{id}/replace` (publisher token): a new token for an enrolled
/// worker, whoever holds its current one.
pub(crate) async fn replace_worker(
    State(m): Shared,
    headers: HeaderMap,
    Path(id): Path<String>,
    body: Body,
) -> ApiResult<Json<EnrollResponse>> {
    require_publisher(&m, &headers, "workers/{id}/replace")?;
    let body = read_body(&m, &headers, body, MAX_BODY_BYTES).await?;
    let req: ReplaceWorkerRequest = if body.is_empty() {
        ReplaceWorkerRequest::default()
    } else {
        parse_json(&body, "replacement")?
    };
    let _guard = m.enroll_lock.lock().await;
    let Some(old) = m.auth.load().by_id.get(&id).cloned() else {
        return Err(ApiError::not_found(format!(
            "worker `{id}` is not enrolled (enroll it with the enrollment token)"
        )));
    };
    let labels = req.labels.unwrap_or_else(|| old.labels.clone());
    let capacity = req.capacity.unwrap_or(old.capacity);
    let token = issue_token(
        &m,
        &id,
        (labels, capacity),
        Some(&old),
        TokenIssuedBy::Publisher,
    )
    .await?;
    tracing::warn!(worker = %id, "worker replaced by the publisher: its previous token is revoked");
    Ok(Json(EnrollResponse { token }))
}

/// Give worker `id` a fresh token (the previous one, if any, stops working at once)
/// and these labels and capacity; keeps its last heartbeat. The caller holds
/// `enroll_lock`.
async fn issue_token(
    m: &Master,
    id: &str,
    (labels, capacity): (BTreeMap<String, String>, udos_core::desired::Resources),
    old: Option<&Arc<WorkerEntry>>,
    issuer: TokenIssuedBy,
) -> ApiResult<String> {
    let token = generate_token().map_err(|e| {
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("no randomness: {e}"),
        )
    })?;
    let token_hash = hash_token(&token);
    let now = now_ms();
    let hb = old.map(|o| o.hb_state()).unwrap_or_default();
    let record = WorkerRecord {
        id: id.to_string(),
        labels,
        capacity,
        token_hash,
        token_issued_by: issuer,
        enrolled_at_ms: now,
        last_heartbeat_at_ms: hb.last_heartbeat_ms,
        seen_generation: hb.heartbeat.as_ref().map_or(0, |h| h.seen_generation),
        last_heartbeat: hb.heartbeat.clone(),
    };
    {
        let record = record.clone();
        m.with_store(move |s| s.upsert_worker(&record)).await?;
    }
    let entry = Arc::new(WorkerEntry::from_record(&record, now));
    let mut table: AuthTable = (*m.auth.load_full()).clone();
    if let Some(old) = old {
        table.by_token.remove(&old.token_hash);
    }
    table.by_id.insert(entry.id.clone(), entry.clone());
    table.by_token.insert(token_hash, entry);
    m.auth.store(Arc::new(table));
    m.bump();
    Ok(token)
}

#[derive(Deserialize)]
pub(crate) struct AssignmentQuery {
    worker: String,
    #[serde(default)]
    seen: Option<u64>,
    #[serde(default)]
    wait: Option<u64>,
}

pub(crate) async fn assignment(
    State(m): Shared,
    headers: HeaderMap,
    query: Result<Query<AssignmentQuery>, QueryRejection>,
) -> ApiResult<Response> {
    m.counters.assignment.fetch_add(1, Ordering::Relaxed);
    let Query(q) = query.map_err(|e| {
        ApiError::bad_request(format!(
            "bad query: {e} (want worker=ID&seen=GEN&wait=SECS)"
        ))
    })?;
    let entry = require_worker(&m, &headers, &q.worker, "assignment")?;
    let now = now_ms();
    entry.touch(now);
    let mut snap = m.snapshot.load_full();
    if !snap.live_ids.contains(&entry.id) {
        // Enrolled just now, or back after its lease expired: place it first.
        let v = m.bump();
        snap = m.wait_for_version(v, JOIN_WAIT).await;
    }
    unplaceable(&snap)?;
    // Held at most half a lease, so a worker that died during a long poll is noticed
    // within 1.5 leases; the worker simply polls again.
    let wait = q
        .wait
        .unwrap_or(0)
        .min(MAX_WAIT_S)
        .min((m.lease_ms / 2000).max(1));
    let seen = q.seen.unwrap_or(0);
    let up_to_date = |s: &super::state::Snapshot| {
        s.generation_number() == seen && entry.known_epoch.load(Ordering::Relaxed) == s.epoch
    };
    if wait > 0 {
        // Subscribe before looking at the snapshot again, so that no change is missed.
        let mut rx = m.snap_tx.subscribe();
        snap = m.snapshot.load_full();
        if up_to_date(&snap) {
            let _poll = PollGuard::new(entry.clone());
            let mut shutdown = m.shutdown.clone();
            let deadline = tokio::time::Instant::now() + Duration::from_secs(wait);
            let start_json = snap.assignments_json(&entry.id).to_string();
            loop {
                tokio::select! {
                    r = rx.changed() => {
                        if r.is_err() { break; }
                        let next = m.snapshot.load_full();
                        let changed = next.generation_number() != seen
                            || next.assignments_json(&entry.id) != start_json;
                        snap = next;
                        if changed { break; }
                    }
                    _ = tokio::time::sleep_until(deadline) => break,
                    _ = shutdown.wait_for(|stop| *stop) => break,
                }
            }
        }
    }
    unplaceable(&snap)?;
    Ok(json_response(snap.body(&entry.id, m.lease_ms)))
}

/// 503 while the active generation cannot be scheduled: a worker takes that as the
/// master being away and keeps running its last verified assignment, where an empty
/// answer would make it stop everything.
fn unplaceable(snap: &super::state::Snapshot) -> ApiResult<()> {
    match &snap.problem {
        Some(p) => Err(ApiError::new(StatusCode::SERVICE_UNAVAILABLE, p.clone())),
        None => Ok(()),
    }
}

pub(crate) async fn heartbeat(
    State(m): Shared,
    headers: HeaderMap,
    body: Body,
) -> ApiResult<Json<HeartbeatResponse>> {
    m.counters.heartbeat.fetch_add(1, Ordering::Relaxed);
    let caller = authenticate(&m, &headers)?;
    let Caller::Worker(entry) = caller else {
        return Err(ApiError::forbidden(format!(
            "heartbeat needs a worker token (from enroll); this request used {}",
            caller.role()
        )));
    };
    let body = read_body(&m, &headers, body, MAX_BODY_BYTES).await?;
    let hb: Heartbeat = parse_json(&body, "heartbeat")?;
    if hb.worker_id != entry.id {
        return Err(other_worker(&m, &entry, &hb.worker_id));
    }
    let now = now_ms();
    {
        let hb = hb.clone();
        m.with_store(move |s| s.record_heartbeat(now, &hb)).await?;
    }
    entry.touch(now);
    let snap = m.snapshot.load_full();
    let (known, settled) = if hb.seen_generation == snap.generation_number() {
        super::state::heartbeat_matches(&hb, snap.expected(&entry.id))
    } else {
        (false, false)
    };
    entry
        .known_epoch
        .store(if known { snap.epoch } else { 0 }, Ordering::Relaxed);
    entry
        .settled_epoch
        .store(if settled { snap.epoch } else { 0 }, Ordering::Relaxed);
    if let Ok(mut g) = entry.hb.lock() {
        g.last_heartbeat_ms = Some(now);
        g.heartbeat = Some(hb);
    }
    if !snap.live_ids.contains(&entry.id) {
        m.bump();
    }
    Ok(Json(HeartbeatResponse {
        generation: snap.generation_number(),
    }))
}

/// The status report of the current snapshot (blocking pool: it walks every instance).
pub(crate) async fn current_status(m: &Arc<Master>) -> StatusReport {
    let m = m.clone();
    tokio::task::spawn_blocking(move || {
        let snap = m.snapshot.load_full();
        let auth = m.auth.load_full();
        let now = now_ms();
        let workers: Vec<_> = auth.by_id.values().map(|e| e.status_input(now)).collect();
        let mut report = compute_status(
            snap.generation.as_deref(),
            &snap.placement,
            &workers,
            now,
            m.lease_ms,
            snap.problem.as_deref(),
        );
        if let Some(g) = snap.generation.as_deref() {
            report.signature_state = m.signature_state(&g.intent_hash, g.signature.as_deref());
        }
        report
    })
    .await
    .unwrap_or_else(|e| panic!("status computation panicked: {e}"))
}

pub(crate) async fn status(State(m): Shared, headers: HeaderMap) -> ApiResult<Json<StatusReport>> {
    require_publisher(&m, &headers, "status")?;
    Ok(Json(current_status(&m).await))
}

pub(crate) async fn generations(
    State(m): Shared,
    headers: HeaderMap,
) -> ApiResult<Json<Vec<GenerationSummary>>> {
    require_publisher(&m, &headers, "generations")?;
    let active = m.active.load().as_ref().map(|g| g.number);
    let list = m.with_store(|s| s.generations()).await?;
    Ok(Json(
        list.into_iter()
            .map(|g| {
                let signature_state = m.signature_state(&g.intent_hash, g.signature.as_deref());
                GenerationSummary {
                    generation: g.number,
                    active: Some(g.number) == active,
                    commit: g.commit,
                    intent_hash: g.intent_hash,
                    published_at: rfc3339(g.published_at_ms),
                    publisher: g.publisher,
                    specs: g.spec_count,
                    signed: signature_state == SignatureState::Verified,
                    signature_state,
                }
            })
            .collect(),
    ))
}

fn parse_generation(text: &str) -> ApiResult<u64> {
    text.parse::<u64>()
        .map_err(|_| ApiError::bad_request(format!("`{text}` is not a generation number")))
}

async fn load_generation(m: &Master, n: u64) -> ApiResult<GenerationRecord> {
    if let Some(g) = m.active.load_full() {
        if g.number == n {
            return Ok((*g).clone());
        }
    }
    m.with_store(move |s| s.generation(n))
        .await?
        .ok_or_else(|| ApiError::not_found(format!("generation {n} does not exist")))
}

pub(crate) async fn generation(
    State(m): Shared,
    headers: HeaderMap,
    Path(n): Path<String>,
) -> ApiResult<Response> {
    match authenticate(&m, &headers)? {
        Caller::Publisher | Caller::Worker(_) => {}
        Caller::Enroller => {
            return Err(ApiError::forbidden(
                "generations/{n} needs the publisher token or a worker token; this request used the enrollment token",
            ))
        }
    }
    let n = parse_generation(&n)?;
    // Every worker verifying its assignment asks for the active generation: serve it
    // from a cached serialization.
    if let Some(active) = m.active.load_full() {
        if active.number == n {
            let cached = m.detail_cache.lock().ok().and_then(|c| c.clone());
            if let Some((num, sig, body)) = cached {
                if num == n && sig == active.signature {
                    return Ok(json_bytes(body));
                }
            }
            let body =
                Bytes::from(serde_json::to_vec(&detail(&m, &active, true)).map_err(|e| {
                    ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string())
                })?);
            if let Ok(mut c) = m.detail_cache.lock() {
                *c = Some((n, active.signature.clone(), body.clone()));
            }
            return Ok(json_bytes(body));
        }
    }
    let g = load_generation(&m, n).await?;
    let active = m.active.load().as_ref().map(|a| a.number) == Some(g.number);
    Ok(Json(detail(&m, &g, active)).into_response())
}

fn detail(m: &Master, g: &GenerationRecord, active: bool) -> GenerationDetail {
    GenerationDetail {
        generation: g.number,
        commit: g.commit.clone(),
        intent_hash: g.intent_hash.clone(),
        signature: g.signature.clone(),
        signature_state: m.signature_state(&g.intent_hash, g.signature.as_deref()),
        published_at: rfc3339(g.published_at_ms),
        publisher: g.publisher.clone(),
        active,
        specs: g.specs.clone(),
    }
}

#[derive(Deserialize)]
pub(crate) struct DiffQuery {
    #[serde(default)]
    from: Option<String>,
    #[serde(default)]
    to: Option<String>,
}

pub(crate) async fn diff(
    State(m): Shared,
    headers: HeaderMap,
    query: Result<Query<DiffQuery>, QueryRejection>,
) -> ApiResult<Json<DiffResponse>> {
    require_publisher(&m, &headers, "diff")?;
    let Query(q) =
        query.map_err(|e| ApiError::bad_request(format!("bad query: {e} (want from=A&to=B)")))?;
    let to = match q.to.as_deref() {
        Some(t) => parse_generation(t)?,
        None => m
            .active
            .load()
            .as_ref()
            .map(|g| g.number)
            .ok_or_else(|| ApiError::not_found("nothing has been published yet"))?,
    };
    let from = match q.from.as_deref() {
        Some(f) => parse_generation(f)?,
        None => to.saturating_sub(1),
    };
    let b = load_generation(&m, to).await?;
    let a = if from == 0 {
        None
    } else {
        Some(load_generation(&m, from).await?)
    };
    let a_specs: BTreeMap<&str, &str> = a
        .iter()
        .flat_map(|g| g.specs.iter())
        .map(|s| (s.id.as_str(), s.hash.as_str()))
        .collect();
    let b_specs: BTreeMap<&str, &str> = b
        .specs
        .iter()
        .map(|s| (s.id.as_str(), s.hash.as_str()))
        .collect();
    let mut out = DiffResponse {
        from,
        to,
        added: vec![],
        removed: vec![],
        changed: vec![],
        unchanged: 0,
        from_signature_state: a.as_ref().map_or(SignatureState::Unsigned, |g| {
            m.signature_state(&g.intent_hash, g.signature.as_deref())
        }),
        to_signature_state: m.signature_state(&b.intent_hash, b.signature.as_deref()),
    };
    for (id, hash) in &b_specs {
        match a_specs.get(id) {
            None => out.added.push(SpecRef {
                id: id.to_string(),
                hash: hash.to_string(),
            }),
            Some(old) if old != hash => out.changed.push(SpecChange {
                id: id.to_string(),
                from_hash: old.to_string(),
                to_hash: hash.to_string(),
            }),
            Some(_) => out.unchanged += 1,
        }
    }
    for (id, hash) in &a_specs {
        if !b_specs.contains_key(id) {
            out.removed.push(SpecRef {
                id: id.to_string(),
                hash: hash.to_string(),
            });
        }
    }
    Ok(Json(out))
}

pub(crate) async fn audit(
    State(m): Shared,
    headers: HeaderMap,
) -> ApiResult<Json<Vec<AuditEntry>>> {
    require_publisher(&m, &headers, "audit")?;
    let log = m.with_store(|s| s.audit()).await?;
    Ok(Json(
        log.into_iter()
            .map(|a| AuditEntry {
                seq: a.seq,
                at: rfc3339(a.at_ms),
                publisher: a.publisher,
                remote: a.remote,
                commit: a.commit,
                generation: a.generation,
                intent_hash: a.intent_hash,
                created: a.created,
            })
            .collect(),
    ))
}

/// One Prometheus metric: its HELP and TYPE lines, then one sample per label set.
fn write_metric<L: AsRef<str>>(
    out: &mut String,
    kind: &str,
    name: &str,
    help: &str,
    lines: &[(L, String)],
) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
    for (labels, value) in lines {
        let _ = writeln!(out, "{name}{} {value}", labels.as_ref());
    }
}

pub(crate) async fn metrics(State(m): Shared) -> Response {
    let r = current_status(&m).await;
    let now = now_ms();
    let auth = m.auth.load_full();
    let snap = m.snapshot.load_full();
    let live = r.workers.iter().filter(|w| w.live).count();
    let dead = r.workers.len() - live;
    let lag_ms = auth
        .by_id
        .values()
        .filter(|e| e.is_live(now, m.lease_ms))
        .map(|e| {
            let since = e.hb_state().last_heartbeat_ms.unwrap_or(e.enrolled_at_ms);
            now.saturating_sub(since)
        })
        .max()
        .unwrap_or(0);
    let c = &m.counters;
    let mut out = String::with_capacity(2048);
    let mut gauge = |name: &str, help: &str, lines: &[(&str, String)]| {
        write_metric(&mut out, "gauge", name, help, lines)
    };
    gauge(
        "udos_generation",
        "Active generation number (0 before the first publication).",
        &[("", r.generation.to_string())],
    );
    gauge(
        "udos_convergence_ratio",
        "Desired instances converged (desired hash running on a live worker that has seen the active generation) / desired instances.",
        &[("", format!("{}", r.convergence))],
    );
    gauge(
        "udos_workers",
        "Enrolled workers by state (live: seen within the lease).",
        &[
            ("{state=\"live\"}", live.to_string()),
            ("{state=\"dead\"}", dead.to_string()),
        ],
    );
    gauge(
        "udos_assignments",
        "Spec instances placed on live workers.",
        &[("", snap.assigned_total.to_string())],
    );
    gauge(
        "udos_unschedulable",
        "Spec instances no live worker can host.",
        &[("", snap.placement.unschedulable.len().to_string())],
    );
    gauge(
        "udos_heartbeat_lag_seconds",
        "Longest time since the last heartbeat among live workers (since enrollment if none yet).",
        &[("", format!("{:.3}", lag_ms as f64 / 1000.0))],
    );
    let requests: Vec<(String, String)> = [
        ("assignment", &c.assignment),
        ("heartbeat", &c.heartbeat),
        ("publish", &c.publish),
        ("enroll", &c.enroll),
    ]
    .into_iter()
    .map(|(ep, v)| {
        let labels = format!("{{endpoint=\"{ep}\"}}");
        (labels, v.load(Ordering::Relaxed).to_string())
    })
    .collect();
    write_metric(
        &mut out,
        "counter",
        "udos_requests_total",
        "Requests received, by endpoint.",
        &requests,
    );
    write_metric(
        &mut out,
        "counter",
        "udos_auth_failures_total",
        "Requests refused with 401.",
        &[("", c.auth_failures.load(Ordering::Relaxed).to_string())],
    );
    write_metric(
        &mut out,
        "counter",
        "udos_placements_total",
        "Placement recomputations.",
        &[("", c.recomputes.load(Ordering::Relaxed).to_string())],
    );
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
        )],
        out,
    )
        .into_response()
}

pub(crate) async fn not_found() -> ApiError {
    ApiError::not_found("no such endpoint (see docs/openapi.yaml)")
}
